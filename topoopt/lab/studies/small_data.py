"""Study 1: does a layer's weight topology track learning on small datasets?

Claim under test: a layer's normalized persistent entropy (E / log n) and mean H0 lifetime
correlate with the model's accuracy, depend on the amount of training data, and change unevenly
across layers during training.

Design (each choice removes a known confound):
- Stratified training subsets from ~25 per class to the full set, a fixed test set, ≥ 5 seeds.
- The same number of gradient steps for every subset size (``budget="steps"``): with a fixed
  epoch count, size and training time are confounded. That variant is run too, labelled
  ``budget="epochs"``.
- ‖W‖_F is recorded as a control: mean lifetime scales with the weights, so a correlation that
  the norm explains is not topology (partial Spearman given ‖W‖_F).
- Holm correction over the Spearman tests actually computed (dataset × budget × layer × metric
  × target), and separately over the partial correlations with accuracy given log size; the
  family sizes are written to analysis.json.

    topoopt small-data --quick       # (or python experiments/small_data.py --quick)
    topoopt small-data               # the full study

Results go to ``--out`` (default experiments/results/small_data, or its quick/ folder with
--quick), each run's TensorBoard scalars under ``--tensorboard`` (default
tensorboard_logs/small_data[_quick]).
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
from topoopt.lab.studies.options import add_sweep_options, apply_overrides, command_parser, output_folders
from topoopt.lab.studies.statistics import holm, partial_spearman
from topoopt.lab.sweep import COMPACT_RESULTS, claim_folder, restore_from_compact, run_cells, save_compact
from topoopt.measure import layer_topology
from topoopt.plotting import new_figure, save_png

# The command line's defaults (relative to the current folder); `run_study` takes its folders.
DEFAULT_OUT = Path("experiments") / "results" / "small_data"
DEFAULT_TENSORBOARD = Path("tensorboard_logs") / "small_data"
METRICS = ("normalized_entropy", "mean_lifetime", "weight_norm")


@dataclass
class SmallDataConfig:
    datasets: list[str] = field(default_factory=lambda: ["digits", "mnist5k", "fashion-mnist"])
    sizes: dict[str, list[int]] = field(default_factory=lambda: {
        "digits": [250, 500, 1000, 1347],
        "mnist5k": [250, 500, 1000, 2000, 4000],
        "fashion-mnist": [250, 500, 1000, 2000, 4000, 8000],
    })
    hidden: list[int] = field(default_factory=lambda: [100, 100])
    seeds: int = 5
    steps: int = 1500
    epochs: int = 30
    budgets: list[str] = field(default_factory=lambda: ["steps", "epochs"])
    batch_size: int = 64
    lr: float = 1e-3
    evaluations: int = 10

    @classmethod
    def quick(cls) -> "SmallDataConfig":
        return cls(datasets=["digits", "mnist5k"], sizes={"digits": [250, 500, 1347], "mnist5k": [250, 1000, 4000]},
                   seeds=5, steps=400, epochs=8, evaluations=4)


def make_cells(config: SmallDataConfig, tensorboard: Path | None = None) -> list[dict]:
    """One cell per dataset × budget × size × seed; each run logs to a folder under `tensorboard`
    (None: no logs)."""
    cells = []
    plain = asdict(config)
    for dataset in config.datasets:
        for budget in config.budgets:
            for size in config.sizes[dataset]:
                for seed in range(config.seeds):
                    cells.append({"id": f"{dataset}/{budget}/n{size}/s{seed}", "dataset": dataset, "budget": budget,
                                  "size": size, "seed": seed, "config": plain,
                                  "tensorboard": None if tensorboard is None else str(tensorboard)})
    return cells


def _writer(cell: dict):
    """The cell's TensorBoard writer (None when the cell has no TensorBoard folder)."""
    if cell.get("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(Path(cell["tensorboard"]) / cell["id"].replace("/", "_"))


def run_cell(cell: dict) -> dict:
    config = SmallDataConfig(**cell["config"])
    full = load_dataset(cell["dataset"])
    data = stratified_subset(full, cell["size"] if cell["size"] < len(full.y_train) else None, seed=cell["seed"])
    torch.manual_seed(cell["seed"])
    model = build_mlp([data.n_features, *config.hidden, data.n_classes])
    optimizer = make_optimizer(model, "adam", lr=config.lr)
    steps = config.steps if cell["budget"] == "steps" else config.epochs * math.ceil(cell["size"] / config.batch_size)
    writer = _writer(cell)

    def on_eval(row, net):
        for name, topo in layer_topology(net).items():
            for metric in METRICS:
                row[f"{name}/{metric}"] = getattr(topo, metric)
        if writer is not None:
            for key, value in row.items():
                if "/" in key:
                    writer.add_scalar(f"topology/{key}", value, row["step"])
            writer.add_scalar("test/accuracy", row["test_accuracy"], row["step"])

    try:
        history = fit_steps(model, data, steps, config.batch_size, optimizer, evaluations=config.evaluations,
                            seed=cell["seed"], on_eval=on_eval)
    finally:
        if writer is not None:
            writer.close()
    return {k: cell[k] for k in ("dataset", "budget", "size", "seed")} | {
        "steps": steps, "history": history, "final": history[-1]}


# ---- statistics ----

def _relative_change(first: float, last: float) -> float:
    return abs(last - first) / max(1e-12, abs(first))


def analyse(records: list[dict]) -> dict:
    from scipy import stats

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["dataset"], record["budget"])].append(record)
    tests, rows = [], []
    friedman = {}
    for (dataset, budget), runs in sorted(groups.items()):
        layers = sorted({key.split("/")[0] for key in runs[0]["final"] if "/" in key})
        accuracy = np.array([r["final"]["test_accuracy"] for r in runs])
        log_size = np.log([r["size"] for r in runs])
        for layer in layers:
            norm = np.array([r["final"][f"{layer}/weight_norm"] for r in runs])
            for metric in METRICS:
                values = np.array([r["final"][f"{layer}/{metric}"] for r in runs])
                for target, against in (("accuracy", accuracy), ("size", log_size)):
                    rho, p = stats.spearmanr(values, against)
                    row = {"dataset": dataset, "budget": budget, "layer": layer, "metric": metric,
                           "target": target, "rho": float(rho), "p": float(p)}
                    if metric != "weight_norm":
                        rho_norm, p_norm = partial_spearman(values, against, norm)
                        row["partial_rho_given_norm"], row["partial_p_given_norm"] = rho_norm, p_norm
                    if target == "accuracy":
                        rho_size, p_size = partial_spearman(values, against, log_size)
                        row["partial_rho_given_log_size"], row["partial_p_given_log_size"] = rho_size, p_size
                    rows.append(row)
                    tests.append(float(p) if np.isfinite(p) else 1.0)
        # Layers changing at different rates: relative change of normalized entropy from the first
        # evaluation (10% into the run, not initialisation) to the last, per run (blocks) and
        # layer (treatments). Layers differ in fan-in and neuron count (fc3 has 9 bars), so a
        # significant result shows uneven change, not that the unevenness reflects learning.
        changes = [[_relative_change(r["history"][0][f"{layer}/normalized_entropy"],
                                     r["history"][-1][f"{layer}/normalized_entropy"]) for r in runs]
                   for layer in layers]
        statistic, p = stats.friedmanchisquare(*changes)
        friedman[f"{dataset}/{budget}"] = {
            "chi2": float(statistic), "p": float(p), "from_step": sorted({r["history"][0]["step"] for r in runs}),
            "median_relative_change": {layer: float(np.median(c)) for layer, c in zip(layers, changes)}}
    for row, adjusted in zip(rows, holm(tests)):
        row["p_holm"] = adjusted
    # Partial correlations with accuracy given log size: their own Holm family (the topology
    # metrics only; the weight norm is the control, not a hypothesis).
    partial = [row for row in rows if row["target"] == "accuracy" and row["metric"] != "weight_norm"]
    partial_p = [p if np.isfinite(p := row["partial_p_given_log_size"]) else 1.0 for row in partial]
    for row, adjusted in zip(partial, holm(partial_p)):
        row["partial_p_given_log_size_holm"] = adjusted
    return {"correlations": rows, "friedman": friedman,
            "holm_family_size": {"correlations": len(tests), "partial_given_log_size": len(partial)}}


def plot(records: list[dict], out: Path) -> None:
    for dataset in sorted({r["dataset"] for r in records}):
        runs = [r for r in records if r["dataset"] == dataset and r["budget"] == "steps"]
        layers = sorted({key.split("/")[0] for key in runs[0]["final"] if "/" in key})
        figure = new_figure(figsize=(4 * len(METRICS), 7))
        axes = figure.subplots(2, len(METRICS))
        sizes = sorted({r["size"] for r in runs})
        for j, metric in enumerate(METRICS):
            for layer in layers:
                means = [np.mean([r["final"][f"{layer}/{metric}"] for r in runs if r["size"] == s]) for s in sizes]
                axes[0, j].plot(sizes, means, marker="o", label=layer)
                largest = [r for r in runs if r["size"] == sizes[-1]]
                steps = [h["step"] for h in largest[0]["history"]]
                curve = np.mean([[h[f"{layer}/{metric}"] for h in r["history"]] for r in largest], axis=0)
                axes[1, j].plot(steps, curve, label=layer)
            axes[0, j].set(xscale="log", xlabel="training-set size", title=f"{metric} (final, mean of seeds)")
            axes[1, j].set(xlabel=f"step (size {sizes[-1]})", title=f"{metric} during training")
            axes[0, j].legend(fontsize=7)
        figure.suptitle(f"{dataset}: per-layer topology, same step budget for every size")
        figure.tight_layout()
        save_png(figure, out / f"{dataset}_topology.png", dpi=110)


def write_correlations(analysis: dict, path: Path) -> None:
    """The correlation rows as CSV: the leading columns, then the others alphabetically."""
    leading = ["dataset", "budget", "layer", "metric", "target", "rho", "p", "p_holm"]
    columns = leading + sorted({k for row in analysis["correlations"] for k in row} - set(leading))
    with open(path, "w") as handle:
        handle.write(",".join(columns) + "\n")
        for row in analysis["correlations"]:
            handle.write(",".join(str(row.get(c, "")) for c in columns) + "\n")


def _check_datasets(config: SmallDataConfig) -> None:
    unknown = [d for d in config.datasets if d not in config.sizes]
    if unknown:
        raise ValueError(f"no subset sizes for {unknown}; known: {list(config.sizes)}")


def run_study(config: SmallDataConfig, out: Path, tensorboard: Path | None = None, jobs: int = 1,
              executor: str = "process", progress: bool = True) -> dict:
    """Run the study's unfinished cells (results in ``out/runs.jsonl``), analyse them and write
    ``config.json``, ``analysis.json``, ``correlations.csv`` and one figure per dataset into
    `out`; each run's scalars go under `tensorboard` (None: none). Returns the analysis."""
    _check_datasets(config)
    cells = make_cells(config, tensorboard)
    claim_folder(out, asdict(config), grid=("datasets", "sizes", "seeds", "budgets"))
    restore_from_compact(out / "runs.jsonl", out / COMPACT_RESULTS)
    records = run_cells(cells, run_cell, out / "runs.jsonl", jobs=jobs,
                        executor=executor, progress=progress, desc="small-data")
    save_compact(records, out / COMPACT_RESULTS)
    analysis = analyse(records)
    (out / "analysis.json").write_text(json.dumps(analysis, indent=2))
    write_correlations(analysis, out / "correlations.csv")
    plot(records, out)
    return analysis


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser("small-data", __doc__)
    add_sweep_options(parser, out_help=f"results folder (default {DEFAULT_OUT}; with --quick, {DEFAULT_OUT}/quick)",
                      tensorboard_help=f"TensorBoard folder (default {DEFAULT_TENSORBOARD}; with --quick, "
                                       f"{DEFAULT_TENSORBOARD}_quick)")
    parser.add_argument("--datasets", nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    config = SmallDataConfig.quick() if args.quick else SmallDataConfig()
    apply_overrides(config, args, ("datasets", "seeds", "steps"))
    out, tensorboard = output_folders(args, DEFAULT_OUT, DEFAULT_TENSORBOARD)
    try:
        _check_datasets(config)
    except ValueError as error:
        raise SystemExit(f"topoopt small-data: {error}") from None
    analysis = run_study(config, out, tensorboard, jobs=args.jobs, executor=args.executor,
                         progress=not args.no_progress)
    print(format_summary(analysis))
    print(f"results in {out}")
    return analysis


def format_summary(analysis: dict) -> str:
    lines = ["dataset/budget  layer  metric              target    rho     p_holm  partial|‖W‖"]
    for row in analysis["correlations"]:
        if row["metric"] == "weight_norm":
            continue
        partial = row.get("partial_rho_given_norm", float("nan"))
        lines.append(f"{row['dataset'] + '/' + row['budget']:<15} {row['layer']:<6} {row['metric']:<19} "
                     f"{row['target']:<8} {row['rho']:+.3f}  {row['p_holm']:.2g}  {partial:+.3f}")
    for key, value in analysis["friedman"].items():
        lines.append(f"Friedman {key}: chi2 {value['chi2']:.2f}, p {value['p']:.2g}, "
                     f"median relative change {value['median_relative_change']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
