"""The design card's comparison: learning graphs of steered runs beside the
plain baseline's, with the numbers that say how they differ.

For each (ε, seed) of a setting, `compare` reads the finished runs (`topoopt learning-graphs
--steer ...`) and writes, under ``<out>/comparison/``:

- ``<setting>_eps<ε>_s<seed>_graphs.png``: one row per run (baseline first), one column per
  layer's learning graph, and a last column with the test-accuracy curves of all the runs;
- ``<setting>_comparison.json`` and ``.md`` (rows of runs compared before are kept): per run
  and layer, the graph's branches, its first branching step and number of branching events
  (offline, from the Mapper graph), the live monitor's branching events (online), and per run
  the steps to 20% and 80% test accuracy, the final accuracy and the mean step scales of a
  `TopoOptimizer`.

The figure is also logged to TensorBoard (``comparison/<setting>...``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from topoopt.plotting import new_figure, save_png

__all__ = ["compare", "run_row", "first_step_above"]

MONITOR_RATIO = 4.0  # the online events counted are those of TopologyMonitor's default gap ratio


def first_step_above(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """The first recorded step whose test accuracy is ≥ `threshold`, or None."""
    return next((int(step) for step, accuracy in curve if accuracy is not None and accuracy >= threshold), None)


def run_row(folder: Path) -> dict:
    """One run's numbers (see the module docstring), read from its folder."""
    summary = json.loads((folder / "summary.json").read_text())
    curve = [(n["step"], n["accuracy"]) for n in json.loads((folder / "nines.json").read_text())]
    online = summary.get("online_events") or []
    layers = {}
    for layer, stats in summary["layers"].items():
        events = summary["events"].get(layer, [])
        live = [e for e in online if e["layer"] == layer and e.get("ratio", MONITOR_RATIO) == MONITOR_RATIO]
        layers[layer] = {
            "branches": stats["branches"], "nodes": stats["nodes"], "cycles": stats["cycles"],
            "branching_events": len(events),
            "first_branching_step": round(min(e["step"] for e in events)) if events else None,
            "online_events": len(live),
            "first_online_event_step": min(e["step"] for e in live) if live else None,
        }
    training = summary["training"]
    return {"run": folder.name, "steering": summary["config"].get("steer", "none"),
            "final_accuracy": training["final_accuracy"], "steps_to_20": first_step_above(curve, 0.2),
            "steps_to_80": first_step_above(curve, 0.8), "mean_scales": training.get("mean_scales"),
            "penalty_off_step": training.get("penalty_off_step"), "layers": layers, "curve": curve}


def _figure(rows: list[dict], folders: list[Path], title: str):
    from matplotlib.image import imread

    layers = list(rows[0]["layers"])
    figure = new_figure(figsize=(4.2 * (len(layers) + 1), 3.6 * len(rows)))
    grid = figure.subplots(len(rows), len(layers) + 1, squeeze=False)
    for r, (row, folder) in enumerate(zip(rows, folders)):
        for c, layer in enumerate(layers):
            axes = grid[r][c]
            axes.axis("off")
            image = folder / f"{layer}_graph.png"
            if image.exists():
                axes.imshow(imread(image))
            stats = row["layers"][layer]
            axes.set_title(f"{row['steering']}: {layer}\n{stats['branches']} branches, "
                           f"{stats['branching_events']} events, first at {stats['first_branching_step']}",
                           fontsize=9)
        axes = grid[r][-1]
        for other in rows:
            steps, accuracy = zip(*other["curve"])
            highlight = other is row
            axes.plot(steps, accuracy, linewidth=1.6 if highlight else 0.7, alpha=1.0 if highlight else 0.35,
                      label=other["steering"] if highlight else None)
        axes.set_xscale("symlog", linthresh=100)  # the escape happens early; the budget runs long
        axes.set(xlabel="step (linear to 100, then logarithmic)", ylabel="test accuracy", ylim=(0, 1))
        axes.set_title(f"{row['steering']}: final {row['final_accuracy']:.3f}, 80% at {row['steps_to_80']}",
                       fontsize=9)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 0.985))
    return figure


def _markdown(rows: list[dict]) -> str:
    lines = ["| run | steering | layer | branches | branching events (offline) | first branching step | "
             "online events | first online event | steps to 20% | steps to 80% | final accuracy | mean scale |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for layer, stats in row["layers"].items():
            scale = row["mean_scales"][layer] if row["mean_scales"] else 1.0
            lines.append(f"| {row['run']} | {row['steering']} | {layer} | {stats['branches']} | "
                         f"{stats['branching_events']} | {stats['first_branching_step']} | {stats['online_events']} | "
                         f"{stats['first_online_event_step']} | {row['steps_to_20']} | {row['steps_to_80']} | "
                         f"{row['final_accuracy']:.3f} | {scale:.2f} |")
    return "\n".join(lines) + "\n"


def compare(out: Path, setting: str, epsilons: list[float], seeds: list[int], steerings: list[str],
            configs: list, tensorboard: str | None = None) -> dict:
    """Figures and tables of each (ε, seed)'s steered runs beside its baseline (module docstring).
    `configs` are the runs' `RunConfig`s (their setting, ε, seed, steering and folder `name()`)."""
    runs = {config.name(): config for config in configs}
    target = out / "comparison"
    target.mkdir(parents=True, exist_ok=True)
    table: list[dict] = []
    figures = []
    for epsilon in epsilons:
        for seed in seeds:
            chosen = [c for c in runs.values()
                      if c.setting == setting and c.epsilon == epsilon and c.seed == seed
                      and (c.steer or "none") in {"none", *steerings}]
            chosen.sort(key=lambda c: (c.steer != "none", c.steer))
            folders = [out / c.name() for c in chosen if (out / c.name() / "summary.json").exists()]
            if len(folders) < 2:
                continue
            rows = [run_row(folder) for folder in folders]
            table.extend(rows)
            path = target / f"{setting}_eps{epsilon:g}_s{seed}_graphs.png"
            figure = _figure(rows, folders, f"{setting} setting, ε = {epsilon:g}, seed {seed}: "
                                            "learning graphs of steered runs beside the baseline")
            save_png(figure, path, dpi=80)  # a palette PNG: these figures are kept in git
            figures.append(path)
    # rows of runs compared earlier (other seeds, say) stay; a run compared again is replaced
    path = target / f"{setting}_comparison.json"
    rows = {row["run"]: row for row in (json.loads(path.read_text()) if path.exists() else [])}
    rows.update({row["run"]: {k: v for k, v in row.items() if k != "curve"} for row in table})
    plain = sorted(rows.values(), key=lambda row: (row["run"].split("_s")[1].split("_")[0], row["steering"] != "none",
                                                    row["steering"]))
    path.write_text(json.dumps(plain, indent=1))
    (target / f"{setting}_comparison.md").write_text(_markdown(plain))
    if tensorboard and figures:
        from matplotlib.image import imread
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(Path(tensorboard) / "comparison")) as writer:
            for path in figures:
                image = imread(path)[..., :3]
                writer.add_image(f"comparison/{path.stem}", (np.asarray(image) * 255).astype(np.uint8),
                                 dataformats="HWC")
    return {"rows": plain, "figures": [str(p) for p in figures]}
