"""Study: does stopping on topology, without a validation split, and so
training on 25% more examples, give test accuracy equal to or better than validation-loss early
stopping on small data?

Three stopping rules, one model, optimizer and epoch cap, paired by seed:

- ``topology``: `TopologyEarlyStopping` (every layer's H0 metrics settled within a relative
  tolerance for ``patience`` checks), trained on all the training examples;
- ``np``: `NeuralPersistenceStopping` (Rieck et al., ICLR 2019: the mean normalised neural
  persistence has not risen for ``patience`` checks), trained on all the training examples;
- ``validation``: validation-loss early stopping with patience, trained on a stratified 80% and
  watching the other 20%; the weights of the best validation epoch are restored at the stop
  (Keras ``restore_best_weights=True``, Lightning's best checkpoint).

Every rule checks once per epoch. At a seed, all three start from the same initial weights and
draw their batch orders from the same generator seed; the training subset (mnist5k, Fashion-MNIST)
and the 80/20 split are drawn with that seed too. The topology and NP rules only observe: they
do not change training, so both are read off one training run on all the data, which goes on to
the cap (``run_to_cap``; it also gives the ``cap`` reference: all the data, no stopping, not
tested). Each rule's wall time is the training time up to its stop plus its own checks' time
(the per-epoch test evaluation, for the record, is timed by none); the validation rule's time
includes its validation-loss evaluations and the restore.

Measures: test accuracy at the stop (always on the dataset's fixed held-out test split), epochs
used, wall time. Paired comparisons per dataset: topology − validation and NP − validation, a
family of 2 × (number of datasets) non-inferiority tests (one-sided paired t against the margin,
Holm), with paired-t 95% CIs, exact sign and Wilcoxon signed-rank tests, and the effect each
test detects with 80% power. The pre-registration is in experiments/RESULTS.md ("Early stopping
without a validation split").

    topoopt stopping --quick        # a few seconds (digits and mnist5k-500, tiny network)
    topoopt stopping                # the pre-registered study (resumable: re-run to continue)
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from topoopt.early_stopping import NeuralPersistenceStopping, TopologyEarlyStopping
from topoopt.lab.data import Dataset, load_dataset, stratified_subset
from topoopt.lab.loop import make_optimizer
from topoopt.lab.models import build_mlp
from topoopt.lab.studies.options import add_sweep_options, apply_overrides, command_parser, positive_int
from topoopt.lab.studies.statistics import holm, paired_t_minimum_effect
from topoopt.lab.sweep import claim_folder, load_compact, load_results, rounded, run_cells, save_compact

__all__ = ["DATASETS", "RULES", "StoppingConfig", "make_cells", "run_cell", "subset", "validation_split",
           "rule_records", "paired_comparison", "exploratory", "wilcoxon_exact", "sign_test", "summarise",
           "format_table", "write_compact", "read_compact", "run_study", "main"]

RESULTS_DIR = Path("experiments") / "results" / "stopping"
# key → (dataset of topoopt.lab.data, training-subset size; None: the whole training split)
DATASETS: dict[str, tuple[str, int | None]] = {
    "digits": ("digits", None),
    "mnist5k-500": ("mnist5k", 500),
    "mnist5k-2000": ("mnist5k", 2000),
    "fashion-mnist-2000": ("fashion-mnist", 2000),
}
RULES = ("topology", "np", "validation", "cap")  # "cap": all the data, no stopping (a reference, not tested)
CANDIDATES = ("topology", "np")  # each compared with "validation"


@dataclass
class StoppingConfig:
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    seeds: int = 20
    first_seed: int = 0
    hidden: list[int] = field(default_factory=lambda: [100, 100])
    activation: str = "relu"
    lr: float = 1e-3                  # Adam
    batch_size: int = 32
    max_epochs: int = 100             # the cap of every rule
    run_to_cap: bool = True           # the all-data run goes on to the cap (the "cap" reference)
    validation_fraction: float = 0.2
    validation_patience: int = 10
    topology_tolerance: float = 0.01
    topology_patience: int = 3
    topology_metrics: list[str] = field(default_factory=lambda: ["normalized_entropy", "mean_lifetime"])
    np_patience: int = 3
    np_min_delta: float = 0.0

    @classmethod
    def quick(cls) -> "StoppingConfig":
        return cls(datasets=["digits", "mnist5k-500"], seeds=2, hidden=[16], max_epochs=8, validation_patience=2,
                   topology_patience=2, np_patience=2)


def make_cells(config: StoppingConfig) -> list[dict]:
    """Two cells per dataset and seed: ``all`` (the topology and NP rules) and ``validation``."""
    unknown = [name for name in config.datasets if name not in DATASETS]
    if unknown:
        raise ValueError(f"Unknown dataset(s) {unknown}. Valid ones are: {', '.join(DATASETS)}")
    plain = asdict(config)
    return [{"id": f"{name}/s{seed}/{arm}", "dataset": name, "seed": seed, "arm": arm, "config": plain}
            for name in config.datasets for seed in range(config.first_seed, config.first_seed + config.seeds)
            for arm in ("all", "validation")]


_FULL: dict[str, Dataset] = {}


def subset(name: str, seed: int) -> Dataset:
    """The training set of `name` at `seed` (a stratified subset drawn with `seed`, or the whole
    training split) with the dataset's fixed test split."""
    source, size = DATASETS[name]
    if source not in _FULL:
        _FULL[source] = load_dataset(source)
    return stratified_subset(_FULL[source], size, seed=seed)


def validation_split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """(the data trained on, x_val, y_val): a stratified split of the training examples drawn with
    `seed`; the held-out part has ceil(fraction · n) examples (scikit-learn's rounding)."""
    n = len(data.y_train)
    fit_index, held_index = train_test_split(np.arange(n), test_size=fraction, stratify=data.y_train.numpy(),
                                             random_state=seed)
    fit_index, held_index = (torch.from_numpy(np.sort(i)) for i in (fit_index, held_index))
    fitted = Dataset(data.name, data.x_train[fit_index], data.y_train[fit_index], data.x_test, data.y_test)
    return fitted, data.x_train[held_index], data.y_train[held_index]


def _model(config: StoppingConfig, seed: int, data: Dataset) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same initial weights for every rule at a seed
    return build_mlp([data.n_features, *config.hidden, data.n_classes], activation=config.activation)


def _train_epoch(model, optimizer, data: Dataset, batch_size: int, generator: torch.Generator) -> float:
    model.train()
    total = 0.0
    for batch in torch.randperm(len(data.y_train), generator=generator).split(batch_size):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(batch)
    model.eval()
    return total / len(data.y_train)


@torch.no_grad()
def _accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def run_cell(cell: dict) -> dict:
    """One training run: the ``all`` arm (topology and NP rules watching one run on all the
    training examples) or the ``validation`` arm. Its record holds a per-epoch curve (train loss,
    test accuracy, seconds of training and of each rule's check) and each rule's stop."""
    config = StoppingConfig(**cell["config"])
    seed = cell["seed"]
    data = subset(cell["dataset"], seed)
    n_examples = len(data.y_train)
    if cell["arm"] == "validation":
        fitted, x_val, y_val = validation_split(data, config.validation_fraction, seed)
    else:
        fitted = data
    model = _model(config, seed, fitted)
    optimizer = make_optimizer(model, "adam", lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    curve: list[dict] = []
    stops: dict[str, dict] = {}
    if cell["arm"] == "all":
        watchers = {"topology": TopologyEarlyStopping(model, metrics=config.topology_metrics,
                                                      tolerance=config.topology_tolerance,
                                                      patience=config.topology_patience),
                    "np": NeuralPersistenceStopping(model, patience=config.np_patience, min_delta=config.np_min_delta)}
    else:
        best_loss, best_epoch, best_state, waited = math.inf, 0, None, 0
    for epoch in range(1, config.max_epochs + 1):
        started = time.perf_counter()
        train_loss = _train_epoch(model, optimizer, fitted, config.batch_size, generator)
        row = {"epoch": epoch, "train_loss": train_loss, "train_seconds": time.perf_counter() - started}
        if cell["arm"] == "all":
            for rule, watcher in watchers.items():
                if rule in stops:
                    continue
                started = time.perf_counter()
                fired = watcher.update()
                row[f"{rule}_seconds"] = time.perf_counter() - started
                row[rule] = (watcher.history[-1] if rule == "np"
                             else float(np.mean([v for k, v in watcher.history[-1].items()
                                                 if k.endswith("mean_lifetime")])))
                if fired:
                    stops[rule] = {"epoch": epoch, "fired": True}
        else:
            started = time.perf_counter()
            with torch.no_grad():
                val_loss = float(F.cross_entropy(model(x_val), y_val))
            if val_loss < best_loss:
                best_loss, best_epoch, waited = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                waited += 1
            row["validation_seconds"] = time.perf_counter() - started
            row["val_loss"] = val_loss
            if waited >= config.validation_patience:
                stops["validation"] = {"epoch": epoch, "fired": True}
        row["test_accuracy"] = _accuracy(model, data.x_test, data.y_test)  # the record's; timed by no rule
        curve.append(row)
        rules = CANDIDATES if cell["arm"] == "all" else ("validation",)
        for rule in rules:
            if rule in stops and "test_accuracy" not in stops[rule]:
                stops[rule]["test_accuracy"] = row["test_accuracy"]
        if all(rule in stops for rule in rules) and not (cell["arm"] == "all" and config.run_to_cap):
            break
    for rule in (CANDIDATES if cell["arm"] == "all" else ("validation",)):
        if rule not in stops:  # never fired: stopped by the cap
            stops[rule] = {"epoch": config.max_epochs, "fired": False, "test_accuracy": curve[-1]["test_accuracy"]}
        stop = stops[rule]
        stop["seconds"] = float(sum(r["train_seconds"] + r.get(f"{rule}_seconds", 0.0) for r in curve[:stop["epoch"]]))
    if cell["arm"] == "all" and len(curve) == config.max_epochs:
        stops["cap"] = {"epoch": config.max_epochs, "fired": False, "test_accuracy": curve[-1]["test_accuracy"],
                        "seconds": float(sum(r["train_seconds"] for r in curve))}
    if cell["arm"] == "validation":
        stop = stops["validation"]
        stop["test_accuracy_unrestored"] = stop["test_accuracy"]
        started = time.perf_counter()
        model.load_state_dict(best_state)
        stop["seconds"] += time.perf_counter() - started
        stop["best_epoch"] = best_epoch
        stop["best_val_loss"] = best_loss
        stop["test_accuracy"] = _accuracy(model, data.x_test, data.y_test)
    return {"dataset": cell["dataset"], "seed": seed, "arm": cell["arm"], "n_examples": n_examples,
            "n_trained": len(fitted.y_train), "n_validation": n_examples - len(fitted.y_train),
            "n_test": len(data.y_test), "max_epochs": config.max_epochs, "stops": stops, "curve": curve}


# ---- analysis ----

def rule_records(records: list[dict]) -> list[dict]:
    """One row per (dataset, seed, rule): test accuracy at the stop, epochs used, wall time."""
    rows = []
    for record in records:
        for rule, stop in record["stops"].items():
            rows.append({"dataset": record["dataset"], "seed": record["seed"], "rule": rule,
                         "n_trained": record["n_trained"], "epochs": stop["epoch"], "fired": stop["fired"],
                         "test_accuracy": stop["test_accuracy"], "seconds": stop["seconds"]})
    return rows


def wilcoxon_exact(differences, alternative: str = "two-sided") -> float:
    """Exact Wilcoxon signed-rank p-value for any n, ties included: zero differences dropped,
    mid-ranks of |d|, and the null distribution of W+ (each rank's sign a fair coin) counted
    exactly over the doubled (integer) ranks. ``alternative``: "two-sided" or "greater" (W+ large:
    the differences tend to be positive)."""
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return 1.0
    doubled = np.rint(2 * stats.rankdata(np.abs(d))).astype(int)
    counts = np.zeros(int(doubled.sum()) + 1, dtype=object)  # exact integers: 2ⁿ can exceed float precision
    counts[0] = 1
    for r in doubled:
        shifted = np.zeros_like(counts)
        shifted[r:] = counts[:len(counts) - r]
        counts = counts + shifted
    total = 2**n
    observed = int(doubled[d > 0].sum())
    sums = np.arange(len(counts))
    if alternative == "greater":
        return float(counts[sums >= observed].sum() / total)
    if alternative != "two-sided":
        raise ValueError(f"Invalid alternative: {alternative!r}")
    centre = doubled.sum() / 2
    return float(counts[np.abs(sums - centre) >= abs(observed - centre)].sum() / total)


def sign_test(differences, alternative: str = "two-sided") -> float:
    """Exact sign test (binomial, zero differences dropped)."""
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    if len(d) == 0:
        return 1.0
    return float(stats.binomtest(int((d > 0).sum()), len(d), 0.5, alternative=alternative).pvalue)


def paired_comparison(candidate, reference, margin: float) -> dict:
    """candidate − reference, paired, in accuracy points (× 100): mean, SD, paired-t 95% CI, the
    one-sided non-inferiority p (H0: mean ≤ −margin), the two-sided paired-t p, the exact sign and
    Wilcoxon p (two-sided, against 0) and the exact one-sided Wilcoxon on d + margin."""
    from scipy import stats

    d = 100 * (np.asarray(candidate, dtype=float) - np.asarray(reference, dtype=float))
    n = len(d)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    if se > 0:
        p_noninferiority = float(stats.t.sf((mean + margin) / se, n - 1))
        p_two_sided = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    else:  # every difference the same
        p_noninferiority = 0.0 if mean > -margin else 1.0
        p_two_sided = 1.0 if mean == 0 else 0.0
    return {"n": n, "mean_diff_points": mean, "sd_diff_points": sd, "median_diff_points": float(np.median(d)),
            "ci95_points": [mean - half, mean + half], "wins": int((d > 0).sum()), "ties": int((d == 0).sum()),
            "losses": int((d < 0).sum()), "p_noninferiority_t": p_noninferiority, "p_paired_t": p_two_sided,
            "p_sign": sign_test(d), "p_wilcoxon": wilcoxon_exact(d),
            "p_noninferiority_wilcoxon": wilcoxon_exact(d + margin, alternative="greater")}


def summarise(records: list[dict], margin: float = 1.0, alpha: float = 0.025) -> dict:
    """Per dataset and rule: medians; per dataset: the paired comparisons of each candidate rule
    with the validation rule, Holm over the whole family (candidates × datasets)."""
    rows = rule_records(records)
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in rows)]
    table: dict[str, dict] = {}
    for dataset in datasets:
        table[dataset] = {}
        for rule in RULES:
            runs = sorted((r for r in rows if r["dataset"] == dataset and r["rule"] == rule), key=lambda r: r["seed"])
            if runs:
                table[dataset][rule] = {
                    "n": len(runs), "n_trained": runs[0]["n_trained"],
                    "mean_test_accuracy": float(np.mean([r["test_accuracy"] for r in runs])),
                    "median_test_accuracy": float(np.median([r["test_accuracy"] for r in runs])),
                    "sd_test_accuracy": float(np.std([r["test_accuracy"] for r in runs], ddof=1)) if len(runs) > 1
                    else math.nan,
                    "median_epochs": float(np.median([r["epochs"] for r in runs])),
                    "epochs_range": [int(min(r["epochs"] for r in runs)), int(max(r["epochs"] for r in runs))],
                    "fired": int(sum(r["fired"] for r in runs)),
                    "median_seconds": float(np.median([r["seconds"] for r in runs]))}
    tests: dict[str, dict] = {}
    for dataset in datasets:
        by_rule = {rule: {r["seed"]: r for r in rows if r["dataset"] == dataset and r["rule"] == rule}
                   for rule in RULES}
        for rule in CANDIDATES:
            seeds = sorted(set(by_rule[rule]) & set(by_rule["validation"]))
            if len(seeds) < 2:
                continue
            test = paired_comparison([by_rule[rule][s]["test_accuracy"] for s in seeds],
                                     [by_rule["validation"][s]["test_accuracy"] for s in seeds], margin)
            test["median_epochs_diff"] = float(np.median(
                [by_rule[rule][s]["epochs"] - by_rule["validation"][s]["epochs"] for s in seeds]))
            tests[f"{dataset}/{rule}-vs-validation"] = test
    family = len(tests)
    for test, adjusted in zip(tests.values(), holm([t["p_noninferiority_t"] for t in tests.values()])):
        test["holm_p_noninferiority_t"] = adjusted
        test["noninferior"] = adjusted < alpha
    for test, adjusted in zip(tests.values(), holm([t["p_paired_t"] for t in tests.values()])):
        test["holm_p_paired_t"] = adjusted
    for test in tests.values():
        sd = test["sd_diff_points"]
        # Two-sided at 2α/family = one-sided α/family, Holm's strictest step.
        test["mde_points_80pct_power"] = (paired_t_minimum_effect(sd, test["n"], alpha=2 * alpha / family)
                                          if sd > 0 else 0.0)
    return {"margin_points": margin, "alpha_one_sided": alpha, "family_size": family, "table": table, "tests": tests,
            "exploratory": exploratory(records, margin)}


def exploratory(records: list[dict], margin: float = 1.0) -> dict:
    """Not pre-registered, uncorrected, per dataset: each candidate rule against the ``cap``
    reference (all the data, no stopping); what restoring the best validation weights changed
    (restored − at the stop, points); and topology − validation split in two at the validation
    rule's best epoch e*: ``data`` = all-data run at e* − validation rule (restored, also at e*),
    ``timing`` = topology at its stop − all-data run at e* (the two sum to the paired mean Δ)."""
    result: dict[str, dict] = {}
    for dataset in DATASETS:
        full = {r["seed"]: r for r in records if r["dataset"] == dataset and r["arm"] == "all"}
        held = {r["seed"]: r for r in records if r["dataset"] == dataset and r["arm"] == "validation"}
        seeds = sorted(set(full) & set(held))
        if len(seeds) < 2 or any("cap" not in full[s]["stops"] for s in seeds):
            continue
        row = {f"{rule}-vs-cap": paired_comparison([full[s]["stops"][rule]["test_accuracy"] for s in seeds],
                                                   [full[s]["stops"]["cap"]["test_accuracy"] for s in seeds], margin)
               for rule in CANDIDATES}
        stops = {s: held[s]["stops"]["validation"] for s in seeds}
        at_best = {s: full[s]["curve"][stops[s]["best_epoch"] - 1]["test_accuracy"] for s in seeds}
        row["validation_restore_points"] = float(np.mean(
            [100 * (stops[s]["test_accuracy"] - stops[s]["test_accuracy_unrestored"]) for s in seeds]))
        row["median_validation_best_epoch"] = float(np.median([stops[s]["best_epoch"] for s in seeds]))
        row["data_points"] = float(np.mean([100 * (at_best[s] - stops[s]["test_accuracy"]) for s in seeds]))
        row["timing_points"] = float(np.mean([100 * (full[s]["stops"]["topology"]["test_accuracy"] - at_best[s])
                                              for s in seeds]))
        result[dataset] = row
    return result


def format_table(summary: dict) -> str:
    """The results as Markdown: per dataset and rule, then the paired comparisons."""
    lines = ["| data (trained on) | rule | mean test acc. | median test acc. | median epochs (range) | fired "
             "| median seconds |", "|---|---|---:|---:|---:|---:|---:|"]
    for dataset, rules in summary["table"].items():
        for rule, row in rules.items():
            lines.append(f"| {dataset} ({row['n_trained']}) | {rule} | {row['mean_test_accuracy']:.4f} "
                         f"| {row['median_test_accuracy']:.4f} | {row['median_epochs']:g} "
                         f"({row['epochs_range'][0]}–{row['epochs_range'][1]}) | {row['fired']}/{row['n']} "
                         f"| {row['median_seconds']:.2f} |")
    lines += ["", f"Paired differences (rule − validation, accuracy points; margin {summary['margin_points']:g}, "
                  f"family of {summary['family_size']}, Holm):", "",
              "| comparison | mean Δ | 95% CI | W/T/L | NI p (Holm) | non-inferior | paired-t p (Holm) | sign p "
              "| Wilcoxon p | NI Wilcoxon p | MDE (80%) |", "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, t in summary["tests"].items():
        low, high = t["ci95_points"]
        lines.append(f"| {name} | {t['mean_diff_points']:+.2f} | [{low:+.2f}, {high:+.2f}] "
                     f"| {t['wins']}/{t['ties']}/{t['losses']} | {t['holm_p_noninferiority_t']:.3g} "
                     f"| {'yes' if t['noninferior'] else 'no'} | {t['holm_p_paired_t']:.3g} | {t['p_sign']:.3g} "
                     f"| {t['p_wilcoxon']:.3g} | {t['p_noninferiority_wilcoxon']:.3g} "
                     f"| {t['mde_points_80pct_power']:.2f} |")
    return "\n".join(lines)


def write_compact(records: list[dict], path: Path) -> None:
    """Every record, its floats to 4 significant digits except the test accuracies (exact: they
    are what is compared), gzipped; read back with `read_compact`."""
    compact = []
    for record in records:
        copy = rounded(record)
        for rule, stop in record["stops"].items():
            copy["stops"][rule]["test_accuracy"] = stop["test_accuracy"]
        compact.append(copy)
    save_compact(compact, path)


def read_compact(path: Path) -> list[dict]:
    """The records `write_compact` wrote."""
    return load_compact(path)


def plot(records: list[dict], summary: dict, path: Path) -> None:
    """Paired differences in test accuracy (rule − validation) per dataset, one dot a seed."""
    from topoopt.plotting import new_figure

    names = list(summary["tests"])
    figure = new_figure(figsize=(9, 0.45 * len(names) + 1.5))
    axis = figure.subplots()
    rows = rule_records(records)
    for i, name in enumerate(names):
        dataset, rest = name.split("/")
        rule = rest.split("-vs-")[0]
        mine = {r["seed"]: r["test_accuracy"] for r in rows if r["dataset"] == dataset and r["rule"] == rule}
        reference = {r["seed"]: r["test_accuracy"] for r in rows
                     if r["dataset"] == dataset and r["rule"] == "validation"}
        d = [100 * (mine[s] - reference[s]) for s in sorted(set(mine) & set(reference))]
        axis.scatter(d, np.full(len(d), i) + np.linspace(-0.15, 0.15, len(d)), s=10, alpha=0.6)
        low, high = summary["tests"][name]["ci95_points"]
        axis.plot([low, high], [i, i], color="k", lw=2)
    axis.axvline(0, color="grey", lw=0.8)
    axis.axvline(-summary["margin_points"], color="red", lw=0.8, ls="--", label="non-inferiority margin")
    axis.set_yticks(range(len(names)), names, fontsize=8)
    axis.set_xlabel("test accuracy, rule − validation stopping (points); bar: paired-t 95% CI")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def run_study(config: StoppingConfig, out: Path, progress: bool = True, jobs: int = 1,
              executor: str = "process") -> tuple[list[dict], dict]:
    """Run every cell not yet in <out>/runs.jsonl, then summarise all of them into <out>:
    summary.json, table.md, runs_compact.jsonl.gz, differences.png."""
    out = Path(out)
    cells = make_cells(config)
    claim_folder(out, asdict(config), grid=("datasets", "seeds", "first_seed"))
    run_cells(cells, run_cell, out / "runs.jsonl", jobs=jobs, executor=executor, progress=progress, desc="stopping")
    done = load_results(out / "runs.jsonl")
    records = [done[c["id"]] for c in cells]
    summary = summarise(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(format_table(summary) + "\n")
    write_compact(records, out / "runs_compact.jsonl.gz")
    plot(records, summary, out / "differences.png")
    return records, summary


def main(argv: list[str] | None = None) -> None:
    parser = command_parser("stopping", __doc__)
    add_sweep_options(parser, out_help=f"results folder (default {RESULTS_DIR}; {RESULTS_DIR / 'quick'} with --quick)",
                      tensorboard_help="not used by this study")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=None)
    parser.add_argument("--first-seed", type=int, default=None, help="seeds first_seed … first_seed+seeds−1")
    parser.add_argument("--max-epochs", type=positive_int, default=None, help="the epoch cap of every rule")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small networks: one thread is faster on a shared machine
    config = StoppingConfig.quick() if args.quick else StoppingConfig()
    apply_overrides(config, args, ("datasets", "seeds", "first_seed", "max_epochs"))
    out = Path(args.out) if args.out is not None else (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    _, summary = run_study(config, out, progress=not args.no_progress, jobs=args.jobs, executor=args.executor)
    print(format_table(summary))
    print(f"results in {out}")
