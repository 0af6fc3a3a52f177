"""The command line on tiny configs, resume, and the offline datasets."""

import csv
import json

import pytest
import torch

from topoopt.lab.cli import main
from topoopt.lab.data import DatasetUnavailable, load_dataset, stratified_subset
from topoopt.lab.models import build_mlp

TINY = ["train", "--dataset", "digits", "--model", "mlp:64-16-10", "--epochs", "2", "--batch-size", "128",
        "--quiet", "--monitor-every", "2", "--diagrams-every", "5"]


def test_train_writes_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(TINY + ["--log-dir", str(run), "--topo-optimizer", "calm", "--penalty", "mean_lifetime",
                        "--penalty-direction", "maximize", "--topo-every", "3"]) == 0
    assert json.loads((run / "config.json").read_text())["topo_optimizer"] == "calm"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and "fc1/normalized_entropy" in rows[0]
    summary = json.loads((run / "summary.json").read_text())
    model = build_mlp("mlp:64-16-10")  # the saved weights, evaluated again on the test split
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["model"])
    digits = load_dataset("digits")
    with torch.no_grad():
        correct = int((model(digits.x_test).argmax(1) == digits.y_test).sum())
    assert summary["test_accuracy"] == correct / len(digits.y_test) == float(rows[-1]["test_accuracy"])
    assert list(run.glob("events.out.tfevents.*"))
    assert "test accuracy" in capsys.readouterr().out


def test_resume_continues_bit_identically(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(TINY[:6] + ["3"] + TINY[7:] + ["--log-dir", str(straight)]) == 0
    assert main(TINY + ["--log-dir", str(split)]) == 0  # 2 epochs, then resume to 3
    assert main(TINY[:6] + ["3"] + TINY[7:] + ["--log-dir", str(split), "--resume"]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_folder_needs_resume(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert main(TINY + ["--log-dir", str(tmp_path)]) == 2
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [("--epochs", "0"), ("--lr", "-1"), ("--dataset", "cifar"),
                                          ("--topo-optimizer", "fast"), ("--model", "mlp:64-x-10")])
def test_invalid_options_name_the_option(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", option, value])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_unavailable_dataset_is_one_clear_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(TINY[:1] + ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--log-dir", str(run),
                            "--quiet"]) == 2
    assert not run.exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dataset-fashion-mnist" in err and "Traceback" not in err


def test_offline_datasets_and_stratified_subsets():
    digits = load_dataset("digits")
    assert digits.n_features == 64 and digits.n_classes == 10 and float(digits.x_train.max()) <= 1.0
    subset = stratified_subset(digits, 50, seed=3)
    assert len(subset.y_train) == 50 and torch.equal(subset.x_test, digits.x_test)
    assert subset.y_train.bincount().min() >= 4
    assert torch.equal(stratified_subset(digits, 50, seed=3).y_train, subset.y_train)
    mnist = load_dataset("mnist5k")
    assert mnist.n_features == 784 and len(mnist.y_test) == 1000
    with pytest.raises(ValueError, match="Invalid subset size"):
        stratified_subset(digits, 5)
    with pytest.raises(DatasetUnavailable, match="pass --data-dir"):
        load_dataset("fashion-mnist", data_dir="/nonexistent")


def test_main_job_prints_the_steering_table_against_matched_controls(tmp_path, capsys):
    argv = ["main", "--steps", "100", "--seeds", "1", "--skip-learning-graphs", "--skip-failures", "--quiet",
            "--log-root", str(tmp_path / "tb"), "--results", str(tmp_path / "results")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "results" / "steer" / "quick" / "summary.json").read_text())
    assert f"best control: {summary['best_control']}" in out
    for name in ("sgd-x64", "init-default-steered-lr", "lars", "pen-spread", "topo-collapse", "topo-collapse-matched"):
        assert name in out
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in out


def test_main_job_shows_the_failing_runs_and_the_replay_row(tmp_path, capsys):
    argv = ["main", "--steps", "100", "--seeds", "2", "--skip-learning-graphs", "--quiet",
            "--log-root", str(tmp_path / "tb"), "--results", str(tmp_path / "results")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "symmetric-init (every hidden neuron starts as a copy of its layer's first), seed 0" in out
    assert "topoopt's alerts: coincident on fc1, fc2 at step 0" in out
    assert "the loss: its envelope" in out and "tiny-init" in out
    assert "topo-collapse vs replay-mean (its scales replayed as a per-layer lr schedule" in out


def test_ctrl_c_saves_mid_epoch_and_resume_is_bit_identical(tmp_path, monkeypatch, capsys):
    import os
    import signal

    from topoopt import monitor as monitor_module

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(TINY + ["--log-dir", str(straight)]) == 0
    original = monitor_module.TopologyMonitor.step

    def interrupting_step(self, global_step):
        original(self, global_step)
        if global_step == 13:  # in the second epoch (11 batches an epoch)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(monitor_module.TopologyMonitor, "step", interrupting_step)
    assert main(TINY + ["--log-dir", str(split)]) == 130
    assert "Interrupted at step 14" in capsys.readouterr().out
    saved = torch.load(split / "checkpoint.pt", weights_only=True)
    assert saved["partial"]["next_batch"] == 3 and saved["epoch"] == 1
    monkeypatch.setattr(monitor_module.TopologyMonitor, "step", original)
    assert main(TINY + ["--log-dir", str(split), "--resume"]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_that_does_not_fit_the_data_is_one_line(tmp_path, capsys):
    assert main(TINY[:1] + ["--dataset", "digits", "--model", "mlp:784-10-10", "--log-dir", str(tmp_path / "r"),
                            "--quiet"]) == 2
    assert "maps 784 inputs to 10 classes, but digits has 64 features" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
