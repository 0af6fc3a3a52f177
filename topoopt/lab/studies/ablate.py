"""Study 2: do TopoPenalty and TopoOptimizer make training better on small datasets?

Grid: {SGD, Adam} × {plain, + TopoPenalty (entropy or lifetime, two weights each),
+ TopoOptimizer (each policy, two strengths), both} × datasets × seeds, every cell with the same
step budget. Per cell: final test accuracy (mean, 95% t-interval), steps to reach the plain
baseline's final accuracy, wall-time ratio to plain, and a paired t-test (and Wilcoxon) against
plain at the same seeds, Holm-corrected over the comparisons actually made. With 5 seeds the
exact Wilcoxon test cannot reach p < 0.05 (its minimum is 0.0625) and the paired t-test detects
only effects of about 1.7 seed-to-seed SDs uncorrected; `summarise` reports both.

    topoopt ablate --quick --jobs 2     # (or python experiments/ablate.py --quick)
    topoopt ablate --jobs 2             # the full grid

Results go to ``--out`` (default experiments/results/ablate, or its quick/ folder with --quick),
TensorBoard hparams to ``--tensorboard`` (default tensorboard_logs/ablate[_quick]).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from topoopt.lab.data import load_dataset, stratified_subset
from topoopt.lab.loop import fit_steps, make_optimizer
from topoopt.lab.models import build_mlp
from topoopt.lab.report import format_table
from topoopt.lab.studies.options import add_sweep_options, apply_overrides, command_parser, output_folders
from topoopt.lab.studies.statistics import holm, paired_t_minimum_effect, wilcoxon_minimum_p
from topoopt.lab.sweep import COMPACT_RESULTS, claim_folder, restore_from_compact, run_cells, save_compact
from topoopt.optimizer import TopoOptimizer
from topoopt.penalty import TopoPenalty

# The command line's defaults (relative to the current folder); `run_study` takes its folders.
DEFAULT_OUT = Path("experiments") / "results" / "ablate"
DEFAULT_TENSORBOARD = Path("tensorboard_logs") / "ablate"

@dataclass(frozen=True)
class PenaltySetting:
    """A `TopoPenalty` added to the loss."""

    metric: str
    direction: str
    weight: float


@dataclass(frozen=True)
class TopoSetting:
    """A `TopoOptimizer` around the inner optimizer."""

    policy: str
    strength: float
    metric: str = "normalized_entropy"


@dataclass(frozen=True)
class Variant:
    """What a cell adds to plain training: a penalty, a TopoOptimizer, both or neither."""

    penalty: PenaltySetting | None = None
    optimizer: TopoSetting | None = None


_ENTROPY_MAX_001 = PenaltySetting("normalized_entropy", "maximize", 0.01)

# name → variant; "plain" must come first (the baseline of every comparison).
VARIANTS: dict[str, Variant] = {
    "plain": Variant(),
    "pen-entropy-max-0.01": Variant(penalty=_ENTROPY_MAX_001),
    "pen-entropy-max-0.1": Variant(penalty=PenaltySetting("normalized_entropy", "maximize", 0.1)),
    "pen-lifetime-max-0.001": Variant(penalty=PenaltySetting("mean_lifetime", "maximize", 0.001)),
    "pen-lifetime-max-0.01": Variant(penalty=PenaltySetting("mean_lifetime", "maximize", 0.01)),
    "opt-calm-1": Variant(optimizer=TopoSetting("calm", 1.0)),
    "opt-calm-4": Variant(optimizer=TopoSetting("calm", 4.0)),
    "opt-awaken-1": Variant(optimizer=TopoSetting("awaken", 1.0)),
    "opt-awaken-4": Variant(optimizer=TopoSetting("awaken", 4.0)),
    "both-calm-1+entropy-0.01": Variant(penalty=_ENTROPY_MAX_001, optimizer=TopoSetting("calm", 1.0)),
    # Follow-up (after the first grid): calm/awaken scales stayed within ~2% of 1 because
    # normalized entropy is 0.98–1.0 in every layer; contrast standardises across layers.
    "opt-contrast-0.5": Variant(optimizer=TopoSetting("contrast", 0.5)),
    "opt-contrast-lifetime-0.5": Variant(optimizer=TopoSetting("contrast", 0.5, "mean_lifetime")),
}

# (dataset, training-set size or None for the whole training split)
DATASETS: dict[str, tuple[str, int | None]] = {
    "digits": ("digits", None),
    "mnist5k-100": ("mnist5k", 100),
    "mnist5k-500": ("mnist5k", 500),
    "mnist5k-4000": ("mnist5k", None),
    "fashion-2000": ("fashion-mnist", 2000),
}


@dataclass
class AblationConfig:
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    optimizers: list[str] = field(default_factory=lambda: ["sgd", "adam"])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: int = 5
    steps: int = 1500
    evaluations: int = 15
    batch_size: int = 64
    hidden: list[int] = field(default_factory=lambda: [100, 100])
    topo_every: int = 10
    tree_every: int = 1

    @classmethod
    def quick(cls) -> "AblationConfig":
        variants = ["plain", "pen-entropy-max-0.1", "pen-lifetime-max-0.01", "opt-calm-4", "opt-awaken-4",
                    "both-calm-1+entropy-0.01"]
        return cls(datasets=["digits", "mnist5k-500"], variants=variants, seeds=3, steps=500, evaluations=10)


LR = {"sgd": 0.05, "adam": 1e-3}
MOMENTUM = {"sgd": 0.9, "adam": 0.0}


def make_cells(config: AblationConfig) -> list[dict]:
    unknown = [v for v in config.variants if v not in VARIANTS] + [d for d in config.datasets if d not in DATASETS]
    if unknown:
        raise ValueError(f"Unknown variant/dataset names {unknown}. Variants: {list(VARIANTS)}; "
                         f"datasets: {list(DATASETS)}")
    plain = asdict(config)
    return [{"id": f"{d}/{o}/{v}/s{s}", "dataset": d, "optimizer": o, "variant": v, "seed": s, "config": plain}
            for d in config.datasets for o in config.optimizers for v in config.variants for s in range(config.seeds)]


def run_cell(cell: dict) -> dict:
    config = AblationConfig(**cell["config"])
    name, size = DATASETS[cell["dataset"]]
    data = stratified_subset(load_dataset(name), size, seed=cell["seed"])
    torch.manual_seed(cell["seed"])
    model = build_mlp([data.n_features, *config.hidden, data.n_classes])
    variant = VARIANTS[cell["variant"]]
    topo = None
    if variant.optimizer is not None:
        topo = {"policy": variant.optimizer.policy, "strength": variant.optimizer.strength,
                "every": config.topo_every, "tree_every": config.tree_every, "metric": variant.optimizer.metric}
    optimizer = make_optimizer(model, cell["optimizer"], lr=LR[cell["optimizer"]], momentum=MOMENTUM[cell["optimizer"]],
                               topo=topo)
    penalty = None
    if variant.penalty is not None:
        penalty = TopoPenalty(model, metric=variant.penalty.metric, direction=variant.penalty.direction,
                              weight=variant.penalty.weight, tree_every=config.tree_every)

    def on_eval(row, net):
        if isinstance(optimizer, TopoOptimizer):
            row["scales"] = dict(optimizer.scales)

    history = fit_steps(model, data, config.steps, config.batch_size, optimizer, evaluations=config.evaluations,
                        seed=cell["seed"], penalty=penalty, on_eval=on_eval)
    return {k: cell[k] for k in ("dataset", "optimizer", "variant", "seed")} | {
        "test_accuracy": history[-1]["test_accuracy"], "seconds": history[-1]["seconds"],
        "curve": [(h["step"], h["test_accuracy"]) for h in history], "scales": history[-1].get("scales")}


def _ci95(values: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    if len(values) < 2:
        return float(values.mean()), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def analyse(records: list[dict]) -> list[dict]:
    from scipy import stats

    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in records:
        cells[(r["dataset"], r["optimizer"], r["variant"])][r["seed"]] = r
    table = []
    for (dataset, optimizer, variant), runs in sorted(cells.items()):
        baseline = cells.get((dataset, optimizer, "plain"), {})
        seeds = sorted(set(runs) & set(baseline))
        accuracy = np.array([runs[s]["test_accuracy"] for s in seeds])
        base = np.array([baseline[s]["test_accuracy"] for s in seeds])
        mean, half = _ci95(accuracy)
        target = base.mean() if len(base) else float("nan")
        reach = []
        for s in seeds:
            hits = [step for step, acc in runs[s]["curve"] if acc >= target]
            reach.append(hits[0] if hits else None)
        reached = [x for x in reach if x is not None]
        row = {"dataset": dataset, "optimizer": optimizer, "variant": variant, "n": len(seeds),
               "accuracy_mean": mean, "accuracy_ci95": half, "delta_vs_plain": float(mean - target),
               "steps_to_plain_final": float(np.median(reached)) if reached else None,
               "reached_plain_final": len(reached),
               "time_ratio": float(np.median([runs[s]["seconds"] / baseline[s]["seconds"] for s in seeds]))}
        if variant != "plain" and len(seeds) > 1:
            differences = accuracy - base
            if np.allclose(differences, 0):
                row["paired_t_p"], row["wilcoxon_p"] = 1.0, 1.0
            else:
                row["paired_t_p"] = float(stats.ttest_rel(accuracy, base).pvalue)
                row["wilcoxon_p"] = float(stats.wilcoxon(accuracy, base).pvalue)
            # With 5 pairs the exact Wilcoxon test cannot go below 0.0625: say so beside it.
            row["wilcoxon_min_p"] = wilcoxon_minimum_p(len(seeds))
            row["sd_of_differences"] = float(np.std(differences, ddof=1))
        table.append(row)
    tested = [row for row in table if "paired_t_p" in row]
    # The Holm family is exactly the p-values computed here (plain against itself is no test).
    for row, adjusted in zip(tested, holm([row["paired_t_p"] for row in tested])):
        row["paired_t_p_holm"] = adjusted
        row["holm_family_size"] = len(tested)
    return table


def summarise(table: list[dict], alpha: float = 0.05, power: float = 0.8) -> dict:
    """The headline counts and the design's power, computed from the table so the write-up can
    quote them: comparisons in the Holm family, significant ones in each direction before and
    after correction, what the Wilcoxon column can reach, and the smallest effect the paired
    t-test detects with probability `power` (median seed-to-seed SD of paired differences)."""
    tested = [row for row in table if "paired_t_p" in row]
    if not tested:
        return {"comparisons": 0}

    def count(key: str, sign: int) -> int:
        return sum(row[key] < alpha and sign * row["delta_vs_plain"] > 0 for row in tested)

    n = int(np.median([row["n"] for row in tested]))
    sd = float(np.median([row["sd_of_differences"] for row in tested]))
    family = len(tested)
    return {
        "comparisons": family,
        "seeds": n,
        "better_uncorrected": count("paired_t_p", +1), "worse_uncorrected": count("paired_t_p", -1),
        "better_holm": count("paired_t_p_holm", +1), "worse_holm": count("paired_t_p_holm", -1),
        "significant_holm": [{k: row[k] for k in ("dataset", "optimizer", "variant", "delta_vs_plain", "paired_t_p",
                                                  "paired_t_p_holm")}
                             for row in tested if row["paired_t_p_holm"] < alpha],
        "wilcoxon_min_p": wilcoxon_minimum_p(n),
        "wilcoxon_can_reach_alpha": wilcoxon_minimum_p(n) < alpha,
        "median_sd_of_differences": sd,
        "minimum_detectable_effect_uncorrected": paired_t_minimum_effect(sd, n, alpha, power),
        "minimum_detectable_effect_holm_first_step": paired_t_minimum_effect(sd, n, alpha / family, power),
        "power": power,
    }


def best_per_dataset(table: list[dict]) -> dict[str, dict]:
    """The variant with the highest mean accuracy per dataset and optimizer, and whether it beats
    plain significantly (paired t-test, Holm-corrected over every comparison in the table)."""
    best = {}
    for row in table:
        key = f"{row['dataset']}/{row['optimizer']}"
        if key not in best or row["accuracy_mean"] > best[key]["accuracy_mean"]:
            best[key] = row
    for key, row in best.items():
        significant = (row["variant"] != "plain" and row.get("paired_t_p_holm", 1.0) < 0.05
                       and row["delta_vs_plain"] > 0)
        best[key] = {"variant": row["variant"], "accuracy_mean": row["accuracy_mean"],
                     "delta_vs_plain": row["delta_vs_plain"], "paired_t_p": row.get("paired_t_p"),
                     "paired_t_p_holm": row.get("paired_t_p_holm"), "beats_plain_significantly": significant}
    return best


def write_tensorboard(records: list[dict], log_dir: Path) -> None:
    """One HParams run per cell; a cell whose run an earlier invocation wrote is not written again."""
    from torch.utils.tensorboard import SummaryWriter

    named = {f"{r['dataset']}_{r['optimizer']}_{r['variant']}_s{r['seed']}": r for r in records}
    new = {name: r for name, r in named.items() if not (Path(log_dir) / name).exists()}
    if not new:
        return
    with SummaryWriter(log_dir) as writer:
        for name, r in new.items():
            hparams = {k: r[k] for k in ("dataset", "optimizer", "variant", "seed")}
            metrics = {"hparam/test_accuracy": r["test_accuracy"], "hparam/seconds": r["seconds"]}
            writer.add_hparams(hparams, metrics, run_name=name)


def ablation_table(table: list[dict]) -> str:
    """The `analyse` table as text, one line per cell (dataset × optimizer × variant)."""
    header = ["dataset", "opt", "variant", "acc", "±95%", "Δ plain", "p(t)", "Holm", "steps→plain", "time×"]
    rows = []
    for r in table:
        p, steps = r.get("paired_t_p"), r["steps_to_plain_final"]
        rows.append([r["dataset"], r["optimizer"], r["variant"], f"{r['accuracy_mean']:.4f}",
                     f"{r['accuracy_ci95']:.4f}" if math.isfinite(r["accuracy_ci95"]) else "—",
                     f"{r['delta_vs_plain']:+.4f}",
                     "" if p is None else f"{p:.3f}", "" if p is None else f"{r['paired_t_p_holm']:.2f}",
                     "never" if steps is None else f"{steps:.0f}", f"{r['time_ratio']:.2f}"])
    return format_table(header, rows, left_columns=3)


def run_study(config: AblationConfig, out: Path, tensorboard: Path | None = None, jobs: int = 1,
              executor: str = "process", progress: bool = True) -> dict:
    """Run the grid's unfinished cells (results in ``out/runs.jsonl``), analyse every cell and
    write ``out/config.json`` and ``out/table.json``; TensorBoard hparams go to `tensorboard`
    (None: none). Returns the table, the best variant per dataset and the summary."""
    cells = make_cells(config)
    claim_folder(out, asdict(config), grid=("datasets", "optimizers", "variants", "seeds"))
    restore_from_compact(out / "runs.jsonl", out / COMPACT_RESULTS)
    records = run_cells(cells, run_cell, out / "runs.jsonl", jobs=jobs, executor=executor,
                        progress=progress, desc="ablate")
    save_compact(records, out / COMPACT_RESULTS)
    table = analyse(records)
    result = {"table": table, "best": best_per_dataset(table), "summary": summarise(table)}
    (out / "table.json").write_text(json.dumps(result, indent=2))
    if tensorboard is not None:
        write_tensorboard(records, tensorboard)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser("ablate", __doc__)
    add_sweep_options(parser, out_help=f"results folder (default {DEFAULT_OUT}; with --quick, {DEFAULT_OUT}/quick)",
                      tensorboard_help=f"TensorBoard folder (default {DEFAULT_TENSORBOARD}; with --quick, "
                                       f"{DEFAULT_TENSORBOARD}_quick)")
    parser.add_argument("--datasets", nargs="+", default=None, help=f"from {list(DATASETS)}")
    parser.add_argument("--variants", nargs="+", default=None, help=f"from {list(VARIANTS)}")
    parser.add_argument("--optimizers", nargs="+", choices=["sgd", "adam"], default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    config = AblationConfig.quick() if args.quick else AblationConfig()
    apply_overrides(config, args, ("datasets", "variants", "optimizers", "seeds", "steps"))
    if "plain" not in config.variants:
        config.variants = ["plain", *config.variants]
    out, tensorboard = output_folders(args, DEFAULT_OUT, DEFAULT_TENSORBOARD)
    result = run_study(config, out, tensorboard, jobs=args.jobs, executor=args.executor, progress=not args.no_progress)
    print(ablation_table(result["table"]))
    print(json.dumps(result["best"], indent=2))
    print(json.dumps(result["summary"], indent=2))
    print(f"results in {out}")
    return result


if __name__ == "__main__":
    main()
