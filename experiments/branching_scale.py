"""A branching detector whose scale comes from the layer: groups = 1 + #{H0 deaths > c × the
layer's RMS neuron norm}, against the Mapper-eps absolute scale and the default ratio 4, computed
offline on the tree runs' snapshots, tuned on seed 0, tested on seeds 1–2, and counted on healthy
default-init MLP runs. The pre-registration and results are in experiments/RESULTS.md ("A
branching detector whose scale comes from the layer").

It reads the trajectories of the live-validation runs (not committed; 61 MB each). Make them with
    topoopt learning-graphs --setting tree --epsilons 1e-6 1e-8 1e-4 1e-3 1e-2 --seeds 0 1 2 --light \
        --out experiments/results/learning_graphs/live_validation/full
then run `python experiments/branching_scale.py` (a minute); it writes
experiments/results/branching_scale/analysis.json.

The addendum (surface runs, CNN false alarms; c fixed at 0.2) reads the surface runs made by
    topoopt learning-graphs --setting surface --seeds 42 0 1 --light \
        --out experiments/results/learning_graphs/live_validation/surface
and `python experiments/branching_scale.py addendum` writes .../branching_scale/addendum.json.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from topoopt import neuron_cloud
from topoopt.groups import BranchingDetector, group_count
from topoopt.lab.studies.failure_suite import BATCH, CHECK_EVERY, STEPS, build_model, config_of, suite_data
from topoopt.lab.studies.live_validation import accuracy_jumps, match_events
from topoopt.learning_graphs import load_trajectory
from topoopt.persistence import h0_deaths

FOLDER = Path("experiments/results/learning_graphs/live_validation/full")
OUT = Path("experiments/results/branching_scale")
MAPPER = {"fc1": 0.1, "fc2": 0.5}
SURFACE = Path("experiments/results/learning_graphs/live_validation/surface")
SURFACE_MAPPER = {"fc1": 0.1, "fc2": 0.2, "fc3": 0.5}  # PAPER_SETTINGS: first, second, output
CS = (0.05, 0.1, 0.2, 0.5)
CHOSEN = "rms0.2"  # tuned on the tree runs' seed 0; the addendum does not re-tune
WINDOW, LOCAL, SHIFTS = 300, 500, 200


def _detectors(layer: str, mapper: dict[str, float] = MAPPER) -> dict:
    found = {f"rms{c}": ("rms", c) for c in CS}
    found["mapper"] = ("abs", mapper[layer])
    found["ratio4"] = ("ratio", 4.0)
    return found


def _count(deaths, rms: float, kind: str, value: float) -> int:
    if kind == "rms":
        return group_count(deaths, scale=value * rms)
    if kind == "abs":
        return group_count(deaths, scale=value)
    return group_count(deaths, ratio=value)


def tree_events(folder: Path = FOLDER, pattern: str = "tree_*", mapper: dict[str, float] = MAPPER) -> list[dict]:
    """Each run's offline Mapper events and each detector's events, per layer."""
    runs = []
    for summary_path in sorted(folder.glob(f"{pattern}/summary.json")):
        summary = json.loads(summary_path.read_text())
        curve = [(n["step"], n["accuracy"]) for n in json.loads((summary_path.parent / "nines.json").read_text())]
        events = {}
        for layer in mapper:
            trajectory = load_trajectory(summary_path.parent / "trajectory", layer)
            detectors = {name: BranchingDetector(patience=2) for name in _detectors(layer, mapper)}
            online = {name: [] for name in detectors}
            for cloud, step in zip(trajectory.clouds(), trajectory.steps):
                x = torch.as_tensor(cloud, dtype=torch.float64)
                deaths, rms = h0_deaths(x), float(x.norm()) / np.sqrt(x.shape[0])
                for name, (kind, value) in _detectors(layer, mapper).items():
                    if detectors[name].update(_count(deaths, rms, kind, value), int(step)):
                        online[name].append(int(step))
            events[layer] = {"offline": summary["layers"][layer].get("event_steps") or [], "online": online}
        runs.append({"epsilon": summary["config"]["epsilon"], "seed": summary["config"]["seed"], "curve": curve,
                     "events": events})
    return runs


def tally(name: str, runs: list[dict]) -> dict:
    rng = np.random.default_rng(1)
    matched = chance = online = offline = 0
    for run in runs:
        for events in run["events"].values():
            found, truth = events["online"][name], events["offline"]
            shifts = rng.uniform(-LOCAL, LOCAL, SHIFTS)
            matched += match_events(found, truth, WINDOW)[0]
            if found and truth:
                chance += float(np.mean([match_events([t + s for t in found], truth, WINDOW)[0] for s in shifts]))
            online, offline = online + len(found), offline + len(truth)
    return {"matched": matched, "local_chance": round(chance, 1), "excess": round(matched - chance, 1),
            "online": online, "offline": offline}


def accuracy_detector(runs: list[dict]) -> dict:
    matched = offline = events = 0
    for run in runs:
        jumps = accuracy_jumps([tuple(point) for point in run["curve"]], 0.05)
        for layer_events in run["events"].values():
            matched += match_events(jumps, layer_events["offline"], WINDOW)[0]
            offline, events = offline + len(layer_events["offline"]), events + len(jumps)
    return {"matched": matched, "offline": offline, "events": events}


def healthy_events(chosen: str, twin: str = "mlp") -> dict:
    """Events per 10,000 steps on one of the failure suite's healthy twins, seeds 0–9, patience 3
    (the Mapper scale only on the MLP, whose layers have one)."""
    config = config_of(twin)
    data = suite_data(config["data"])
    kinds = {chosen: ("rms", float(chosen[3:])), "mapper": ("abs", None), "ratio4": ("ratio", 4.0)}
    if twin != "mlp":
        del kinds["mapper"]
    events, total = dict.fromkeys(kinds, 0), 0
    for seed in range(10):
        model = build_model(config, seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
        generator = torch.Generator().manual_seed(seed)
        order, position = torch.randperm(len(data.y_train), generator=generator), 0
        layers = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        detectors = {(k, name): BranchingDetector(3) for k in kinds for name in layers}
        for step in range(STEPS + 1):
            if step % CHECK_EVERY == 0:
                for name, layer in layers.items():
                    weight = neuron_cloud(layer).detach().double()
                    deaths, rms = h0_deaths(weight), float(weight.norm()) / np.sqrt(weight.shape[0])
                    for k, (kind, value) in kinds.items():
                        value = (0.5 if name == "fc3" else 0.1) if kind == "abs" else value
                        if detectors[(k, name)].update(_count(deaths, rms, kind, value), step):
                            events[k] += 1
            if step == STEPS:
                break
            if position + BATCH > len(order):
                order, position = torch.randperm(len(data.y_train), generator=generator), 0
            batch = order[position:position + BATCH]
            position += BATCH
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            optimizer.step()
        total += STEPS
    return {k: {"events": v, "per_10k_steps": 1e4 * v / total} for k, v in events.items()}


def main() -> dict:
    torch.set_num_threads(1)
    runs = tree_events()
    names = [f"rms{c}" for c in CS] + ["mapper", "ratio4"]
    tune, test = [r for r in runs if r["seed"] == 0], [r for r in runs if r["seed"] != 0]
    tuned = {name: tally(name, tune) for name in names}
    chosen = max((n for n in names if n.startswith("rms")), key=lambda n: tuned[n]["excess"])
    tested = {name: tally(name, test) for name in names}
    per_layer = {layer: {name: tally(name, [{**r, "events": {layer: r["events"][layer]}} for r in test])
                         for name in (chosen, "mapper")} for layer in ("fc1", "fc2")}
    healthy = healthy_events(chosen)
    adopted = tested[chosen]["excess"] >= tested["mapper"]["excess"] and healthy[chosen]["per_10k_steps"] <= 1
    analysis = {"tune": tuned, "chosen": chosen, "test": tested, "test_per_layer": per_layer,
                "accuracy_detector_test": accuracy_detector(test), "healthy_mlp": healthy, "adopted": adopted}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "analysis.json").write_text(json.dumps(analysis, indent=1))
    print(json.dumps(analysis, indent=1))
    return analysis


def addendum() -> dict:
    """The surface runs (D-rms at every c, c = 0.2 the chosen one; the Mapper scale; ratio 4) and
    the CNN twin's false alarms, as the addendum to the pre-registration plans them."""
    torch.set_num_threads(1)
    runs = tree_events(SURFACE, "surface_*", SURFACE_MAPPER)
    names = [f"rms{c}" for c in CS] + ["mapper", "ratio4"]
    surface = {name: tally(name, runs) for name in names}
    per_layer = {layer: {name: tally(name, [{**r, "events": {layer: r["events"][layer]}} for r in runs])
                         for name in (CHOSEN, "mapper", "ratio4")} for layer in SURFACE_MAPPER}
    cnn = healthy_events(CHOSEN, "cnn")
    reopened = surface[CHOSEN]["excess"] > surface["mapper"]["excess"] and cnn[CHOSEN]["per_10k_steps"] <= 1
    analysis = {"chosen": CHOSEN, "surface_runs": [{"seed": r["seed"], "epsilon": r["epsilon"]} for r in runs],
                "surface": surface, "surface_per_layer": per_layer,
                "accuracy_detector_surface": accuracy_detector(runs),
                "healthy_cnn": cnn, "reopened": reopened}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "addendum.json").write_text(json.dumps(analysis, indent=1))
    print(json.dumps(analysis, indent=1))
    return analysis


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", choices=("main", "addendum"), default="main",
                        help="main: the tree runs and the MLP twin (analysis.json); addendum: the surface runs "
                             "and the CNN twin (addendum.json)")
    addendum() if parser.parse_args().part == "addendum" else main()
