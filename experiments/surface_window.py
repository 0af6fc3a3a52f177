"""Issue #13, items 1–4: where the "surface" of Gabella et al. lives, and how robust its read-outs are.

Re-analysis of the surface runs of `topoopt learning-graphs --setting surface` (784-100-100-10
from N(0, 1e-6²), mnist5k, 60,000 steps) through topoopt's public API; it retrains the runs
whose trajectories are not on disk (trajectories are git-ignored) with the study's training
(`record_run`, evaluated only at snapshots) and checks each against the committed run's
accuracy at all 201 snapshots.

- ``windows``: per seed, the first hidden layer's cloud in two windows defined from the data:
  the plateau (snapshot n/20 up to test accuracy > 20%, the window used before) and the
  branching window (from the output layer's first branching event up to test accuracy ≥ 50%,
  and, as a variant, up to its last branching event). In each: neuron spread around the
  snapshot's mean as a share of the window's variance, each neuron's RMS distance from the layer
  mean, variance in 2 PCs of all points and of the mean path alone, and the local dimension
  (50-neighbour local PCA, TwoNN).
- ``pca3``: cycle counts of the first hidden layer's PCA-3 Mapper graph under the authors'
  notebook defaults (15 cubes, overlap 0.5, DBSCAN eps 1) and one-at-a-time variations, for the
  surface runs and perturbed tree runs (ε = 1e-6).
- ``second``: the second hidden layer's branch count under variations of its Mapper settings.
- ``imbalance``: steps until test accuracy first exceeds 20% when the training set has full
  MNIST's class proportions (majority class "1") instead of mnist5k's balanced classes (a
  training loop identical to the study's but evaluated every 300 steps; ``--validate`` checks it
  retraces the committed balanced run).

    python experiments/surface_window.py windows pca3 second      # ~25 min with training
    python experiments/surface_window.py imbalance

``--out`` (default experiments/results/learning_graphs/surface_window) receives summary.json and
the retrained runs; ``--committed`` (default experiments/results/learning_graphs/full) is where
the learning-graph study's committed runs are read, to check the retrained ones against.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from topoopt.lab.studies.learning_graphs import RunConfig, local_pca_dimension, two_nn_dimension
from topoopt.learning_graphs import (
    PAPER_SETTINGS,
    MapperSettings,
    branching_events,
    graph_statistics,
    learning_graph,
    load_trajectory,
)

DEFAULT_OUT = Path("experiments") / "results" / "learning_graphs" / "surface_window"
DEFAULT_COMMITTED = Path("experiments") / "results" / "learning_graphs" / "full"


@dataclass(frozen=True)
class Folders:
    """Where this analysis writes (`out`: summary.json, and the retrained runs under ``runs/``,
    whose trajectories git ignores) and where the study's committed runs are read (`committed`)."""

    out: Path
    committed: Path

    def run(self, config: RunConfig) -> Path:
        return self.out / "runs" / config.name()

    def committed_file(self, config: RunConfig, name: str) -> Path:
        return self.committed / config.name() / name

# The authors' notebook defaults for the 3-PCA lens: 15 cubes, overlap 0.5, DBSCAN eps 1. Their
# code used KeplerMapper < 1.2, where overlap p widens each cube to (1 + p)·w; gudhi's gain g gives
# w / (1 − g), so p = 0.5 is g = 1/3 (as p = 0.99 is KMAPPER_OLD_OVERLAP_AS_GAIN). g = 0.5 is the
# reading of KeplerMapper ≥ 1.2, one of the variations.
NOTEBOOK_PCA3 = MapperSettings(lens="pca3", intervals=15, gain=0.5 / 1.5, eps=1.0)
PCA3_VARIANTS = {
    "notebook (15, overlap 0.5 old kmapper, eps 1)": NOTEBOOK_PCA3,
    # gudhi's MapperComplex raised a TypeError with gain exactly 0.5 on these points; 0.499 is nearly the same cover.
    "overlap 0.5 as kmapper>=1.2 (gain 0.499)": replace(NOTEBOOK_PCA3, gain=0.499),
    "10 cubes": replace(NOTEBOOK_PCA3, intervals=10),
    "20 cubes": replace(NOTEBOOK_PCA3, intervals=20),
    "eps 0.5": replace(NOTEBOOK_PCA3, eps=0.5),
    "eps 2": replace(NOTEBOOK_PCA3, eps=2.0),
    "previous topoopt (20, overlap 0.99 old kmapper, eps 0.1)": PAPER_SETTINGS["surface"],
}
# MNIST's training-set class counts (60,000 images): "1" is the majority class.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def surface_config(seed: int) -> RunConfig:
    return RunConfig(setting="surface", epsilon=1e-6, seed=seed, epochs=1500, snapshots=201)


def tree_config(seed: int, epsilon: float = 1e-6) -> RunConfig:
    return RunConfig(setting="tree", epsilon=epsilon, seed=seed, epochs=750, snapshots=201)


def record_run(config: RunConfig, folder: Path) -> dict:
    """`train_and_record` (same initialisation, batch order, updates and snapshots) with the
    test set evaluated only at recorded snapshots rather than after every step: 3-4 times
    faster, and training is unchanged (evaluation draws no random numbers). The accuracy at every
    snapshot is compared with the committed run's in `windows`."""
    import math

    import torch
    import torch.nn.functional as F

    from topoopt.lab.data import load_dataset
    from topoopt.lab.loop import make_optimizer
    from topoopt.lab.studies.learning_graphs import _initialised_model
    from topoopt.learning_graphs import TrajectoryRecorder

    data = load_dataset(config.dataset, config.data_dir)
    model = _initialised_model(config, data.n_features)  # the study's own initialisation
    optimizer = make_optimizer(model, "sgd", lr=config.lr)
    total_steps = math.ceil(len(data.y_train) / config.batch_size) * config.epochs
    every = max(1, total_steps // (config.snapshots - 1))
    recorder = TrajectoryRecorder(model, folder / "trajectory", every=every, chunk_size=64)
    curve = []

    def snapshot(step: int, epoch: int) -> None:
        if step % every == 0:  # the snapshots `train_and_record` keeps (step 0 included)
            with torch.no_grad():
                accuracy = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
            recorder.record(step, epoch, accuracy, force=(step == 0))
            curve.append((step, accuracy))

    shuffle = torch.Generator().manual_seed(config.seed)
    step = 0
    snapshot(0, 0)
    for epoch in range(1, config.epochs + 1):
        for batch in torch.randperm(len(data.y_train), generator=shuffle).split(config.batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            optimizer.step()
            step += 1
            snapshot(step, epoch)
    recorder.close()
    return {"steps": step, "final_accuracy": curve[-1][1], "accuracy_curve": curve}


def committed_accuracy(folders: Folders, config: RunConfig) -> dict[int, float]:
    """Test accuracy by step at the committed run's snapshots (empty when it is not on disk)."""
    path = folders.committed_file(config, "nines.json")
    return {n["step"]: n["accuracy"] for n in json.loads(path.read_text())} if path.exists() else {}


def matches(recorded: dict[int, float], curve) -> bool | None:
    """Whether (step, accuracy) pairs agree with `recorded` at the steps both have (None: nothing recorded)."""
    return all(abs(recorded[s] - a) < 1e-6 for s, a in curve if s in recorded) if recorded else None


def ensure_run(config: RunConfig, folders: Folders) -> Path:
    """The run's folder, training and recording it first if its trajectory is not on disk."""
    folder = folders.run(config)
    if not (folder / "training.json").exists():
        import shutil

        shutil.rmtree(folder / "trajectory", ignore_errors=True)  # an interrupted recording
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        training = record_run(config, folder)
        training["train_seconds"] = time.perf_counter() - started
        recorded = committed_accuracy(folders, config)
        if recorded:
            training["matches_committed_accuracy"] = matches(recorded, training["accuracy_curve"])
        (folder / "training.json").write_text(json.dumps(training))
        print(f"trained {config.name()} in {training['train_seconds']:.0f} s: "
              f"accuracy {training['final_accuracy']:.3f}, "
              f"same as committed run: {training.get('matches_committed_accuracy')}", flush=True)
    return folder


def committed_summary(config: RunConfig, folders: Folders) -> dict | None:
    path = folders.committed_file(config, "summary.json")
    return json.loads(path.read_text()) if path.exists() else None


def _variance_in_2_pcs(points: np.ndarray) -> float:
    from sklearn.decomposition import PCA

    return float(np.cumsum(PCA(n_components=2, random_state=0).fit(points).explained_variance_ratio_)[1])


def window_measures(clouds: np.ndarray, start: int, stop: int) -> dict:
    """Measures of the cloud in snapshots [start, stop) (clouds: snapshots × neurons × d)."""
    window = clouds[start:stop].astype(np.float64)
    means = window.mean(axis=1)
    points = window.reshape(-1, window.shape[-1])
    total = float(((points - points.mean(axis=0)) ** 2).sum(axis=1).mean())
    spread = ((window - means[:, None, :]) ** 2).sum(axis=2).mean(axis=1)  # per snapshot
    return {
        "snapshots": [int(start), int(stop)],
        "points": int(len(points)),
        "spread_share_mean": float(spread.mean() / total),
        "spread_share_first_last": [float(spread[0] / total), float(spread[-1] / total)],
        "neuron_rms_from_layer_mean_median": float(np.median(np.sqrt(spread))),
        "neuron_rms_from_layer_mean_first_last": [float(np.sqrt(spread[0])), float(np.sqrt(spread[-1]))],
        "variance_in_2_pcs_all_points": _variance_in_2_pcs(points),
        "variance_in_2_pcs_mean_path": _variance_in_2_pcs(means),
        "local_pca_dimension_50": local_pca_dimension(points, neighbours=50),
        "local_pca_dimension_200": local_pca_dimension(points, neighbours=200),
        "two_nn_dimension": two_nn_dimension(points),
    }


def windows(seeds: list[int], folders: Folders) -> dict:
    results = {}
    for seed in seeds:
        config = surface_config(seed)
        folder = ensure_run(config, folders)
        output = load_trajectory(folder / "trajectory", "fc3")
        first = load_trajectory(folder / "trajectory", "fc1")
        events = sorted(e["step"] for e in branching_events(
            learning_graph(output.points, output.point_steps(), output.neuron, PAPER_SETTINGS["output"]).graph))
        accuracy = np.nan_to_num(first.accuracy, nan=0.0)
        steps = first.steps
        n = first.n_snapshots
        escape = int(np.argmax(accuracy > 0.2))
        half = int(np.argmax(accuracy >= 0.5))
        branch_start = int(np.searchsorted(steps, events[0]))
        last_event = int(np.searchsorted(steps, events[-1])) + 1
        clouds = first.clouds()
        committed = committed_summary(config, folders)
        results[str(seed)] = {
            "final_accuracy": float(accuracy[-1]),
            "committed_final_accuracy": committed["training"]["final_accuracy"] if committed else None,
            "output_branching_event_steps": [round(e) for e in events],
            "committed_output_event_steps": ([round(e["step"]) for e in committed["events"]["fc3"]]
                                             if committed else None),
            "step_accuracy_above_20pct": int(steps[escape]),
            "step_accuracy_50pct": int(steps[half]),
            "plateau": {"steps": [int(steps[n // 20]), int(steps[escape - 1])],
                        **window_measures(clouds, n // 20, escape)},
            "branching_to_50pct": {"steps": [int(steps[branch_start]), int(steps[half])],
                                   **window_measures(clouds, branch_start, half + 1)},
            "branching_to_last_event": {"steps": [int(steps[branch_start]), int(steps[last_event - 1])],
                                        **window_measures(clouds, branch_start, last_event)},
        }
        print(json.dumps({seed: results[str(seed)]}, indent=1), flush=True)
    return results


def pca3(surface_seeds: list[int], tree_seeds: list[int], folders: Folders) -> dict:
    runs = [surface_config(s) for s in surface_seeds] + [tree_config(s) for s in tree_seeds]
    results = {"settings": {name: asdict(settings) for name, settings in PCA3_VARIANTS.items()}, "graphs": {}}
    for config in runs:
        folder = ensure_run(config, folders)
        first = load_trajectory(folder / "trajectory", "fc1")
        row = {}
        for name, settings in PCA3_VARIANTS.items():
            graph = learning_graph(first.points, first.point_steps(), first.neuron, settings)
            stats = graph_statistics(graph)
            row[name] = {k: stats[k] for k in ("nodes", "edges", "components", "cycles")} | {
                "cycles_per_node": stats["cycles"] / max(1, stats["nodes"]), "seconds": round(graph.seconds, 1)}
        results["graphs"][config.name()] = row
        print(config.name(), json.dumps({k: (v["nodes"], v["cycles"]) for k, v in row.items()}), flush=True)
    return results


def second(seeds: list[int], folders: Folders) -> dict:
    base = PAPER_SETTINGS["second"]
    variants = {"paper (25, eps 0.2)": base, "eps 0.1": replace(base, eps=0.1), "eps 0.3": replace(base, eps=0.3),
                "eps 0.5": replace(base, eps=0.5), "15 intervals": replace(base, intervals=15),
                "35 intervals": replace(base, intervals=35)}
    results = {}
    for seed in seeds:
        folder = ensure_run(surface_config(seed), folders)
        layer = load_trajectory(folder / "trajectory", "fc2")
        results[str(seed)] = {}
        for name, settings in variants.items():
            stats = graph_statistics(learning_graph(layer.points, layer.point_steps(), layer.neuron, settings))
            results[str(seed)][name] = {k: stats[k] for k in ("nodes", "cycles", "branches", "branching_events")}
        print(seed, json.dumps(results[str(seed)]), flush=True)
    return results


def plateau_escape(data, seed: int, max_steps: int, every: int = 300) -> list[dict]:
    """The surface run's training (as `train_and_record`: same initialisation, batch order and
    updates) evaluated only every `every` steps, until test accuracy exceeds 20% or `max_steps`.
    Evaluating less often changes nothing in training (no random numbers are drawn by it)."""
    import torch
    import torch.nn.functional as F

    from topoopt.lab.loop import make_optimizer
    from topoopt.lab.studies.learning_graphs import _initialised_model

    config = surface_config(seed)
    model = _initialised_model(config, data.n_features)
    optimizer = make_optimizer(model, "sgd", lr=config.lr)
    shuffle = torch.Generator().manual_seed(seed)
    curve, step = [], 0
    while step < max_steps:
        for batch in torch.randperm(len(data.y_train), generator=shuffle).split(config.batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            optimizer.step()
            step += 1
            if step % every == 0:
                with torch.no_grad():
                    predictions = model(data.x_test).argmax(1)
                curve.append({"step": step, "accuracy": float((predictions == data.y_test).float().mean()),
                              "predicted": torch.bincount(predictions, minlength=10).tolist()})
                if curve[-1]["accuracy"] > 0.2 or step >= max_steps:
                    return curve
    return curve


def _escape_step(curve: list[dict]) -> int | None:
    """The step at which test accuracy first exceeded 20% (None: not within the curve)."""
    return curve[-1]["step"] if curve[-1]["accuracy"] > 0.2 else None


def _plateau_classes(curve: list[dict]) -> list[int]:
    """The classes predicted most often while accuracy is at chance level (≤ 11%)."""
    return sorted({int(np.argmax(c["predicted"])) for c in curve if c["accuracy"] <= 0.11})


def _balanced_sample(y: np.ndarray, per_class, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `per_class[c]` examples of each class c, drawn without replacement."""
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), size=int(per_class[c]), replace=False)
                                   for c in range(10)]))


def imbalance(seeds: list[int], max_steps: int, validate: bool, folders: Folders) -> dict:
    """Plateau length with full MNIST's class proportions (a subset of mnist5k's training split:
    each class keeps its share of MNIST's counts relative to "1", which keeps all 400)."""
    from topoopt.lab.data import Dataset, load_dataset

    full = load_dataset("mnist5k")
    y = full.y_train.numpy()
    per_class = np.bincount(y, minlength=10)
    keep_share = np.array(MNIST_TRAIN_COUNTS) / max(MNIST_TRAIN_COUNTS)
    results = {"mnist5k_train_counts": per_class.tolist()}
    for seed in seeds:
        row: dict = {}
        if validate:  # the fast loop on the balanced data must retrace the committed run
            started = time.perf_counter()
            curve = plateau_escape(full, seed, max_steps)
            recorded = committed_accuracy(folders, surface_config(seed))
            row["balanced"] = {"step_accuracy_above_20pct": _escape_step(curve),
                               "matches_committed_run": matches(recorded, ((c["step"], c["accuracy"]) for c in curve)),
                               "plateau_predicted_classes": _plateau_classes(curve),
                               "seconds": round(time.perf_counter() - started)}
            print(seed, "balanced", json.dumps(row["balanced"]), flush=True)
        rng = np.random.default_rng(seed)
        keep = _balanced_sample(y, [round(per_class[c] * keep_share[c]) for c in range(10)], rng)
        subset = Dataset("mnist5k-imbalanced", full.x_train[keep], full.y_train[keep], full.x_test, full.y_test)
        started = time.perf_counter()
        curve = plateau_escape(subset, seed, max_steps)
        plateau = [c for c in curve if c["accuracy"] <= 0.11]
        row["imbalanced"] = {"train_counts": np.bincount(y[keep], minlength=10).tolist(), "train_size": int(len(keep)),
                             "step_accuracy_above_20pct": _escape_step(curve),
                             "plateau_predicted_classes": _plateau_classes(curve),
                             "plateau_share_predicted_1": float(np.mean([c["predicted"][1] / sum(c["predicted"])
                                                                         for c in plateau])),
                             "seconds": round(time.perf_counter() - started)}
        print(seed, "imbalanced", json.dumps(row["imbalanced"]), flush=True)
        # Control for the smaller training set: balanced, same size as the imbalanced subset.
        same_size = _balanced_sample(y, [len(keep) // 10] * 10, rng)
        control = Dataset("mnist5k-balanced-small", full.x_train[same_size], full.y_train[same_size], full.x_test,
                          full.y_test)
        curve = plateau_escape(control, seed, max_steps)
        row["balanced_same_size"] = {"train_size": int(len(same_size)),
                                     "step_accuracy_above_20pct": _escape_step(curve)}
        print(seed, "balanced, same size", json.dumps(row["balanced_same_size"]), flush=True)
        results[str(seed)] = row
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", choices=["windows", "pca3", "second", "imbalance"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1], help="surface seeds")
    parser.add_argument("--tree-seeds", type=int, nargs="+", default=[0, 1, 2], help="ε = 1e-6 tree seeds for pca3")
    parser.add_argument("--imbalance-steps", type=int, default=45_000)
    parser.add_argument("--validate", action="store_true", help="imbalance: also retrace the balanced run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--committed", type=Path, default=DEFAULT_COMMITTED,
                        help=f"the learning-graph study's committed runs (default {DEFAULT_COMMITTED})")
    args = parser.parse_args(argv)
    folders = Folders(out=args.out, committed=args.committed)
    folders.out.mkdir(parents=True, exist_ok=True)
    path = folders.out / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    for part in args.parts:
        started = time.perf_counter()
        if part == "windows":
            summary["windows"] = windows(args.seeds, folders)
        elif part == "pca3":
            summary["pca3"] = pca3(args.seeds, args.tree_seeds, folders)
        elif part == "second":
            summary["second_hidden_layer"] = second(args.seeds, folders)
        else:
            summary["imbalance"] = imbalance(args.seeds, args.imbalance_steps, args.validate, folders)
        summary.setdefault("seconds", {})[part] = round(time.perf_counter() - started)
        path.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
