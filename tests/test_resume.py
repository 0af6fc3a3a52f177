"""--resume protects the run: it continues bit-identically after Ctrl-C with every option that keeps
state between steps, refuses options that would change the run, and the main job and the
learning-graph study resume too (issues #10 and #16)."""

import json
import os
import signal

import pytest
import torch

from topoopt.lab.cli import main

TINY = ["train", "--dataset", "digits", "--model", "mlp:64-16-10", "--epochs", "2", "--batch-size", "128",
        "--quiet", "--monitor-every", "5", "--diagrams-every", "1000"]  # 11 batches an epoch


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def _interrupt_at(monkeypatch, step: int) -> None:
    """SIGINT right after training step `step` (0-based), as Ctrl-C would."""
    from topoopt import monitor as monitor_module

    original = monitor_module.TopologyMonitor.step

    def interrupting_step(self, global_step):
        original(self, global_step)
        if global_step == step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(monitor_module.TopologyMonitor, "step", interrupting_step)


def _weights(run) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


STATEFUL = {
    "penalty every 3": ["--penalty", "mean_lifetime", "--penalty-direction", "maximize", "--penalty-every", "3"],
    "tree every 4": ["--penalty", "normalized_entropy", "--tree-every", "4"],
    "TopoOptimizer": ["--topo-optimizer", "calm", "--topo-every", "3"],
    "all together": ["--topo-optimizer", "calm", "--topo-every", "3", "--penalty", "mean_lifetime",
                     "--penalty-direction", "maximize", "--penalty-every", "3", "--tree-every", "4"],
}


@pytest.mark.parametrize("options", list(STATEFUL.values()), ids=list(STATEFUL))
def test_ctrl_c_then_resume_is_bit_identical(tmp_path, monkeypatch, capsys, options):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(TINY + options + ["--log-dir", str(straight)]) == 0
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 13)  # mid-way through epoch 2; 14 penalty calls: not a multiple of 3 or 4
        assert main(TINY + options + ["--log-dir", str(split)]) == 130
    assert "Interrupted at step 14" in capsys.readouterr().out
    assert main(TINY + ["--log-dir", str(split), "--resume"]) == 0  # the saved options are used
    a, b = _weights(straight), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(TINY + ["--epochs", "1", "--log-dir", str(run)]) == 0
    return run


@pytest.mark.parametrize("changed,named", [
    (["--lr", "0.5"], ["--lr"]),
    (["--activation", "tanh", "--seed", "7"], ["--activation", "--seed"]),
    (["--batch-size", "64"], ["--batch-size"]),
    (["--model", "mlp:64-8-10"], ["--model"]),
    (["--subset", "500"], ["--subset"]),
    (["--optimizer", "adam"], ["--optimizer"]),
    (["--topo-optimizer", "calm"], ["--topo-optimizer"]),
    (["--penalty", "mean_lifetime"], ["--penalty"]),
])
def test_resume_refuses_a_changed_option(finished, capsys, changed, named):
    config = (finished / "config.json").read_text()
    assert run_cli(["train", "--log-dir", str(finished), "--resume", "--epochs", "2", "--quiet"] + changed) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert all(option in err for option in named)
    assert (finished / "config.json").read_text() == config  # untouched


def test_resume_may_extend_a_run_but_not_shorten_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(TINY + ["--epochs", "1", "--log-dir", str(run)]) == 0
    assert run_cli(["train", "--log-dir", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert json.loads((run / "summary.json").read_text())["epoch"] == 2
    assert run_cli(["train", "--log-dir", str(run), "--resume", "--epochs", "1", "--quiet"]) == 2
    assert "--epochs 1" in capsys.readouterr().err


def test_main_job_resumes_and_reports_honestly(tmp_path, monkeypatch, capsys):
    from topoopt.lab.studies import steer

    argv = ["main", "--steps", "100", "--seeds", "1", "--skip-learning-graphs", "--quiet",
            "--log-root", str(tmp_path / "tb"), "--results", str(tmp_path / "results")]
    runs = tmp_path / "results" / "steer" / "quick" / "runs.jsonl"
    original, calls = steer.run_cell, []

    def interrupting_cell(cell, *args, **kwargs):
        calls.append(cell["id"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(cell, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(steer, "run_cell", interrupting_cell)
        assert run_cli(argv) == 130
    assert "run it again" in capsys.readouterr().out
    first = runs.read_text().splitlines()
    assert len(first) == 2  # the two finished runs are on record
    assert run_cli(argv + ["--resume"]) == 0
    lines = runs.read_text().splitlines()
    assert lines[:2] == first and len(lines) == 6  # read back, not rerun; the other four run once


def test_learning_graph_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    from topoopt.lab.studies import learning_graphs
    from topoopt.learning_graphs import load_trajectory

    config = learning_graphs.RunConfig(setting="tree", dataset="digits", epsilon=1e-3, epochs=6, snapshots=21,
                                       tensorboard=str(tmp_path / "tb"))
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    expected = learning_graphs.train_and_record(config, straight, progress=False)
    original = torch.optim.SGD.step
    calls = []

    def interrupting_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 30:  # in the third epoch (14 batches an epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", interrupting_step)
        with pytest.raises(KeyboardInterrupt):
            learning_graphs.train_and_record(config, split, progress=False)
    assert torch.load(split / learning_graphs.TRAINING_CHECKPOINT, weights_only=True)["step"] == 42
    (split / "trajectory" / "snapshots.jsonl").open("a").write('{"index": 99, "st')  # a torn line, as a kill leaves
    assert learning_graphs.train_and_record(config, split, progress=False) == expected
    assert (split / "nines.json").read_text() == (straight / "nines.json").read_text()
    online = (straight / learning_graphs.ONLINE_EVENTS).read_text()  # the live detectors resume too
    assert (split / learning_graphs.ONLINE_EVENTS).read_text() == online
    for layer in ("fc1", "fc2"):
        a, b = load_trajectory(straight / "trajectory", layer), load_trajectory(split / "trajectory", layer)
        assert a.steps.tolist() == b.steps.tolist() and (a.points == b.points).all()
