"""Learning graphs built while training runs, in a worker process (topoopt.live_graph)."""

import pytest
import torch

from topoopt.learning_graphs import MapperSettings
from topoopt.live_graph import LiveLearningGraph
from topoopt.models import build_mlp

pytest.importorskip("gudhi")


def test_graphs_are_built_off_thread_logged_and_the_trajectory_stays_bounded(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = build_mlp("mlp:8-12-3")
    writer = SummaryWriter(tmp_path / "events")
    coarse = MapperSettings(intervals=4, eps=5.0, min_samples=2)  # this small random walk: a few big nodes
    live = LiveLearningGraph(model, tmp_path / "graphs", writer=writer, every=30, record_every=2, max_snapshots=8,
                             max_neurons=10, settings={"fc1": coarse, "fc2": coarse})
    for step in range(61):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        live.step(step)
    live.close()
    writer.close()
    assert {layer for layer, *_ in live.built} == {"fc1", "fc2"}
    assert all(png.exists() and png.with_suffix(".html").exists() for _, _, nodes, png in live.built), live.built
    assert all(nodes > 0 for _, _, nodes, _ in live.built), live.built
    trajectory = live._trajectories["fc1"]
    assert len(trajectory.snapshots) < 8 and trajectory.snapshots[0].shape == (10, 8)  # 10 of 12 neurons
    assert live.record_every > 2  # thinned at least once
    assert trajectory.steps == sorted(trajectory.steps) and trajectory.steps[0] == 0
    events = EventAccumulator(str(tmp_path / "events"), size_guidance={"images": 0})
    events.Reload()
    assert "learning_graph/fc1" in events.Tags()["images"]


def test_invalid_bounds():
    with pytest.raises(ValueError, match="Invalid max_snapshots: 2"):
        LiveLearningGraph(build_mlp("mlp:8-3"), "unused", max_snapshots=2)
