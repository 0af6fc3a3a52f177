"""Learning graphs built while training runs, in a worker process (topoopt.live_graph)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from topoopt.lab.models import build_mlp
from topoopt.learning_graphs import MapperSettings, learning_graph
from topoopt.live_graph import LiveLearningGraph

pytest.importorskip("gudhi")

COARSE = MapperSettings(intervals=4, eps=5.0, min_samples=2)  # a small random walk: a few big nodes


def _walk(model, live, steps):
    """Random-walk the weights; the full-precision fc1 weights of every step."""
    weights = {}
    for step in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        weights[step] = model.fc1.weight.detach().numpy().copy()
        live.step(step)
    return weights


def _recorded_steps(until, record_every, max_snapshots):
    """The documented rule: record at multiples of record_every; when full, keep every other, record half as often."""
    steps = []
    for step in range(until + 1):
        if step % record_every == 0:
            steps.append(step)
            if len(steps) >= max_snapshots:
                steps, record_every = steps[::2], 2 * record_every
    return steps


def test_graphs_are_built_from_exactly_the_recorded_snapshots_and_logged(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = build_mlp("mlp:8-12-3")
    writer = SummaryWriter(tmp_path / "events")
    live = LiveLearningGraph(model, tmp_path / "graphs", writer=writer, every=30, record_every=2, max_snapshots=8,
                             max_neurons=10, settings={"fc1": COARSE, "fc2": COARSE})
    trajectory = live._trajectories["fc1"]
    # The memory bound: one preallocated buffer of max_snapshots × max_neurons × fan-in float32.
    assert trajectory.buffer.shape == (8, 10, 8) and trajectory.buffer.dtype == np.float32
    header = np.lib.format.open_memmap(trajectory.path, mode="r").offset
    assert trajectory.path.stat().st_size == header + 8 * 10 * 8 * 4
    weights = _walk(model, live, 61)
    expected_steps = _recorded_steps(60, 2, 8)
    assert trajectory.steps == expected_steps and len(expected_steps) < 8 and live.record_every == 16
    neurons = trajectory.neurons
    assert len(neurons) == 10 and len(set(neurons)) == 10
    np.testing.assert_array_equal(trajectory.snapshots, np.stack([weights[s][neurons] for s in expected_steps]))
    buffers = trajectory.path.parent
    live.close()
    writer.close()
    assert not buffers.exists()  # close() removes the buffers

    assert not live.errors
    done = {(layer, step): (nodes, png) for layer, step, nodes, png in live.built}
    assert {("fc1", 30), ("fc2", 30)} <= set(done)
    # The build at step 30 is learning_graph on the snapshots recorded up to step 30, node for node.
    steps_30 = _recorded_steps(30, 2, 8)
    points = np.concatenate([weights[s][neurons] for s in steps_30])
    expected = learning_graph(points, np.repeat(steps_30, 10), np.tile(neurons, len(steps_30)), COARSE)
    nodes, png = done[("fc1", 30)]
    assert nodes == expected.graph.number_of_nodes() > 0
    expected.save_html(tmp_path / "expected.html", title="fc1, step 30")
    assert png.with_suffix(".html").read_text() == (tmp_path / "expected.html").read_text()
    # The TensorBoard image is the PNG's RGB pixels.
    events = EventAccumulator(str(tmp_path / "events"), size_guidance={"images": 0})
    events.Reload()
    logged = {event.step: event for event in events.Images("learning_graph/fc1")}
    assert 30 in logged
    import io

    pixels = np.asarray(Image.open(io.BytesIO(logged[30].encoded_image_string)))
    np.testing.assert_array_equal(pixels, np.asarray(Image.open(png).convert("RGB")))


def test_a_row_the_worker_has_still_to_read_is_never_overwritten(tmp_path):
    torch.manual_seed(0)
    model = build_mlp("mlp:8-12-3")
    live = LiveLearningGraph(model, tmp_path, every=10**6, record_every=1, max_snapshots=6, max_neurons=4)
    try:
        _walk(model, live, 3)
        trajectory = live._trajectories["fc1"]
        assert trajectory.rows == [0, 1, 2] and sorted(trajectory.free) == [3, 4, 5]
        before = trajectory.buffer.copy()
        trajectory.pinned = {0, 1, 2, 4, 5}  # a build not yet copied: only row 3 is free to write
        live.step(3)
        assert trajectory.rows[-1] == 3
        np.testing.assert_array_equal(trajectory.buffer[[0, 1, 2, 4, 5]], before[[0, 1, 2, 4, 5]])
        # Every free row awaited by a running build that has not copied them yet: the snapshot is
        # skipped (training never waits), nothing is overwritten.
        from concurrent.futures import Future

        live._running = (3, Future())
        live._copied.clear()
        trajectory.pinned = {0, 1, 2, 3, 4, 5}
        before = trajectory.buffer.copy()
        live.step(4)
        assert live.skipped_snapshots == 1 and trajectory.rows[-1] == 3 and sorted(trajectory.free) == [4, 5]
        np.testing.assert_array_equal(trajectory.buffer, before)
        # Every free row awaited, but no build running (a worker gone): the pins are dropped, no wait.
        live._running = None
        trajectory.pinned = {4, 5}
        live.step(5)
        assert trajectory.rows[-1] in (4, 5) and not trajectory.pinned
    finally:
        live.close()


def test_a_failing_build_is_reported_and_training_goes_on(tmp_path):
    torch.manual_seed(0)
    model = build_mlp("mlp:8-12-3")
    live = LiveLearningGraph(model, tmp_path, every=10, record_every=2, max_neurons=10,
                             settings={"fc1": MapperSettings(lens="nope"), "fc2": COARSE})
    with pytest.warns(RuntimeWarning, match="Live learning graph of fc1 at step 10 failed"):
        _walk(model, live, 11)
        live.close()
    assert [(layer, step) for layer, step, _ in live.errors] == [("fc1", 10)]
    assert "Invalid lens: 'nope'" in live.errors[0][2]
    assert [(layer, step) for layer, step, *_ in live.built] == [("fc2", 10)]


def test_invalid_bounds():
    with pytest.raises(ValueError, match="Invalid max_snapshots: 2"):
        LiveLearningGraph(build_mlp("mlp:8-3"), "unused", max_snapshots=2)


def test_worker_share_spaces_the_builds_out(tmp_path, monkeypatch):
    """After a build of b seconds, builds due within b·(1/share − 1) are skipped and counted;
    each build's time in the worker is recorded."""
    import topoopt.live_graph as live_graph

    torch.manual_seed(0)
    model = build_mlp("mlp:8-12-3")
    live = LiveLearningGraph(model, tmp_path, every=5, record_every=1, max_neurons=10, worker_share=0.25,
                             settings={"fc1": COARSE, "fc2": COARSE})
    try:
        _walk(model, live, 6)  # the build at step 5 is submitted
        live._running[1].result()  # and done in the worker
        live.step(6)  # collected
        [(step, started, finished)] = live.build_intervals
        assert step == 5 and started < finished and live._running is None
        assert live._next_build_at == pytest.approx(finished + 3 * (finished - started))
        monkeypatch.setattr(live_graph, "_now", lambda: live._next_build_at - 1e-6)
        live.step(10)
        assert live._running is None and live.skipped_builds == 1
        monkeypatch.setattr(live_graph, "_now", lambda: live._next_build_at)
        live.step(15)
        assert live._running is not None and live._running[0] == 15
    finally:
        live.close()
    with pytest.raises(ValueError, match="Invalid worker_share: 0"):
        LiveLearningGraph(model, tmp_path, worker_share=0)


def test_a_script_without_a_main_guard_gets_its_graphs_and_a_final_one_at_close(tmp_path):
    """Written as the README's examples are, at the top level of a script: the spawned worker must
    not run the script again (it died of that), and close() builds the last snapshots' graph."""
    script = tmp_path / "train.py"
    script.write_text(f"""
import torch
from topoopt.lab.models import build_mlp
from topoopt.live_graph import LiveLearningGraph

torch.manual_seed(0)
model = build_mlp("mlp:8-12-3")
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
live = LiveLearningGraph(model, {str(tmp_path / 'graphs')!r}, every=10**6, record_every=1, max_neurons=6,
                         worker_share=None)
x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
for step in range(12):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    live.step(step)
live.close()
print("built", sorted({{name for name, *_ in live.built}}), "errors", live.errors)
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "built ['fc1', 'fc2'] errors []" in done.stdout, done.stdout + done.stderr[-2000:]
