"""Trajectory recording and resume, Mapper learning graphs and their statistics."""

import json

import networkx as nx
import numpy as np
import pytest
import torch

from topoopt.lab.models import build_mlp
from topoopt.learning_graphs import (
    KMAPPER_OLD_OVERLAP_AS_GAIN,
    MapperSettings,
    TrajectoryRecorder,
    branching_events,
    graph_statistics,
    learning_graph,
    load_trajectory,
    terminal_leaves,
)


def train_steps(model, steps, recorder, start=0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(start)
    for step in range(start + 1, start + steps + 1):
        optimizer.zero_grad()
        model(torch.randn(8, 6, generator=g)).pow(2).sum().backward()
        optimizer.step()
        recorder.record(step, epoch=step // 10, accuracy=0.5)


def test_recorder_writes_chunks_and_the_loader_flattens_them(tmp_path):
    model = build_mlp("mlp:6-5-3")
    with TrajectoryRecorder(model, tmp_path, every=2, chunk_size=3) as recorder:
        train_steps(model, 20, recorder)
    trajectory = load_trajectory(tmp_path, "fc1")
    assert trajectory.steps.tolist() == list(range(2, 21, 2))
    assert trajectory.points.shape == (10 * 5, 6)
    assert (trajectory.snapshot.tolist()[:6] == [0, 0, 0, 0, 0, 1]
            and trajectory.neuron.tolist()[:6] == [0, 1, 2, 3, 4, 0])
    np.testing.assert_array_equal(trajectory.clouds()[-1], model.fc1.weight.detach().numpy())
    assert len(list((tmp_path / "fc1").glob("chunk_*.npy"))) == 4  # chunks of 3, 3, 3, 1


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path):
    model = build_mlp("mlp:6-5-3")
    recorder = TrajectoryRecorder(model, tmp_path, every=1, chunk_size=4)
    train_steps(model, 6, recorder)  # 4 on record, 2 buffered and then lost with the "crash"
    del recorder
    assert load_trajectory(tmp_path, "fc1").steps.tolist() == [1, 2, 3, 4]
    resumed = TrajectoryRecorder(model, tmp_path, every=1, chunk_size=4)
    assert resumed.last_step == 4
    assert not resumed.record(3)  # replayed steps already on record are skipped
    for step in range(5, 10):
        resumed.record(step)
    resumed.close()
    assert load_trajectory(tmp_path, "fc1").steps.tolist() == list(range(1, 10))


def test_unknown_layer_lists_the_recorded_ones(tmp_path):
    model = build_mlp("mlp:6-5-3")
    TrajectoryRecorder(model, tmp_path).close()
    with pytest.raises(KeyError, match=r"Recorded layers: \['fc1', 'fc2'\]"):
        load_trajectory(tmp_path, "fc9")


def test_gudhi_gain_reproduces_keplermapper_old_overlap():
    """kmapper < 1.2 widened a cube of base width w to w(1 + 0.99); gudhi widens w to w/(1 − g)."""
    w = 1.0
    assert w / (1 - KMAPPER_OLD_OVERLAP_AS_GAIN) == pytest.approx(w * (1 + 0.99))


def branching_cloud(n_branches=10, snapshots=60, d=30, seed=0):
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_branches, d))
    t = np.linspace(0, 1, snapshots)[:, None, None]
    clouds = 3 * t * directions[None] + 0.005 * rng.normal(size=(snapshots, n_branches, d))
    points = clouds.reshape(-1, d)
    return points, np.repeat(np.arange(snapshots), n_branches) * 10, np.tile(np.arange(n_branches), snapshots)


def test_a_branching_trajectory_gives_a_tree_with_one_branch_per_neuron():
    points, steps, neurons = branching_cloud()
    graph = learning_graph(points, steps, neurons, MapperSettings(lens="norm", intervals=15, eps=0.5))
    stats = graph_statistics(graph)
    assert stats["cycles"] == 0 and stats["components"] == 1 and stats["branches"] == 10
    leaves = terminal_leaves(graph.graph)
    assert sorted(n for leaf in leaves for n in graph.graph.nodes[leaf]["neurons"]) == list(range(10))
    json.dumps(graph.to_json())


def test_statistics_on_hand_made_graphs():
    """A path 0–1–2 that forks into 3 and 4 at node 2, and a 4-cycle: counts by definition."""
    fork = nx.Graph()
    for node, step, patch in [(0, 0, (0,)), (1, 1, (1,)), (2, 2, (2,)), (3, 3, (3,)), (4, 3, (3,))]:
        fork.add_node(node, mean_step=step, patch=patch, neurons=[node])
    fork.add_edges_from([(0, 1), (1, 2), (2, 3), (2, 4)])
    stats = graph_statistics(fork)
    assert (stats["nodes"], stats["edges"], stats["cycles"], stats["leaves"], stats["branches"]) == (5, 4, 0, 3, 2)
    (event,) = branching_events(fork)
    assert event["node"] == 2 and [c["neurons"] for c in event["children"]] == [[3], [4]]
    cycle = nx.cycle_graph(4)
    nx.set_node_attributes(cycle, {n: {"mean_step": n, "patch": (n,), "neurons": [n]} for n in cycle})
    assert graph_statistics(cycle)["cycles"] == 1


def test_exports(tmp_path):
    points, steps, neurons = branching_cloud(n_branches=3, snapshots=20)
    graph = learning_graph(points, steps, neurons, MapperSettings(lens="pca_norm", intervals=8, eps=0.5))
    graph.save_png(tmp_path / "g.png")
    graph.save_html(tmp_path / "g.html")
    graph.save_json(tmp_path / "g.json")
    assert (tmp_path / "g.png").stat().st_size > 1000
    assert "<canvas" in (tmp_path / "g.html").read_text()
    assert len(json.loads((tmp_path / "g.json").read_text())["nodes"]) == graph.graph.number_of_nodes()


def test_the_html_has_the_pngs_colours_a_legend_and_the_leaves_labels(tmp_path):
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    from topoopt.learning_graphs import leaf_labels

    points, steps, neurons = branching_cloud()
    graph = learning_graph(points, steps, neurons, MapperSettings(lens="norm", intervals=15, eps=0.5))
    labels = leaf_labels(graph.graph)
    assert sorted(labels.values(), key=int) == [str(n) for n in range(10)]  # one leaf per branching neuron
    graph.save_html(tmp_path / "g.html", labels=labels)
    text = (tmp_path / "g.html").read_text()
    data = json.loads(text.split("const data=", 1)[1].split(";const c=", 1)[0])
    by_id = {node["id"]: node for node in data["nodes"]}
    low, high = data["legend"]["low"], data["legend"]["high"]
    for node, attributes in graph.graph.nodes(data=True):
        expected = to_hex(colormaps["viridis"]((attributes["mean_step"] - low) / (high - low)))
        assert by_id[node]["colour"] == expected  # viridis, as the PNG's colour bar
        assert by_id[node]["label"] == labels.get(node, "")
    assert data["legend"]["stops"][0] == to_hex(colormaps["viridis"](0.0)) and 'id="legend"' in text


def test_unknown_lens_lists_valid_ones():
    with pytest.raises(ValueError, match="Invalid lens: 'umap'. It must be one of 'pca_norm', 'norm', 'pca3'"):
        learning_graph(np.zeros((4, 3)), np.arange(4), np.arange(4), MapperSettings(lens="umap"))


def test_exact_zero_groups_finds_identical_neurons():
    from topoopt.lab.studies.learning_graphs import exact_zero_groups

    weight = torch.zeros(6, 3)
    weight[4:] = 1.0
    assert exact_zero_groups(weight) == [[0, 3], [4, 5]]


def test_tree_study_quick_smoke(tmp_path):
    from topoopt.lab.studies.learning_graphs import main

    result = main(["--setting", "tree", "--dataset", "digits", "--epochs", "2", "--epsilons", "0.001", "--seeds", "0",
                   "--out", str(tmp_path), "--tensorboard", str(tmp_path / "tb")])
    (run,) = result["runs"]
    assert set(run["layers"]) == {"fc1", "fc2"}
    folder = next(tmp_path.glob("tree_digits_*"))
    assert (folder / "fc2_graph.png").exists() and (folder / "fc1_graph.html").exists()


def test_local_pca_dimension_of_a_noisy_plane_and_line():
    """Points near a 2-D plane (a line) in R^20 have local dimension 2 (1)."""
    from topoopt.lab.studies.learning_graphs import local_pca_dimension

    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(20, 20)))[0]
    for dims in (1, 2):
        flat = np.c_[rng.uniform(size=(2000, dims)), np.zeros((2000, 20 - dims))] @ rotation
        assert local_pca_dimension(flat + 1e-4 * rng.normal(size=flat.shape)) == dims
