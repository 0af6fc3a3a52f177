"""The failure study: its suite's failures, its detectors, the evident rule and the tally."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from topoopt.lab.studies import failure_detectors as fd
from topoopt.lab.studies import failures
from topoopt.lab.studies.failure_suite import FAILURES, _dead_fraction, build_model, config_of, run_one, suite_data


def test_each_failure_is_its_twin_with_one_thing_changed():
    for failure, (twin, change) in FAILURES.items():
        config, healthy = config_of(failure), config_of(twin)
        assert config["twin"] == twin
        assert {k for k in config if config[k] != healthy.get(k)} == {"name", *change}
    with pytest.raises(ValueError, match="Invalid configuration: 'typo'"):
        config_of("typo")


def test_broken_initialisations_and_the_frozen_layer_are_what_they_say():
    symmetric = build_model(config_of("symmetric-init"), 0)
    for layer in (symmetric.fc1, symmetric.fc2):
        assert torch.equal(layer.weight, layer.weight[:1].expand_as(layer.weight))
    assert len(torch.unique(symmetric.fc3.weight, dim=0)) == 10  # the output layer keeps its init
    tiled = build_model(config_of("duplicated"), 0).fc1.weight
    assert len(torch.unique(tiled, dim=0)) == 4 and torch.equal(tiled[4:8], tiled[:4])
    assert build_model(config_of("tiny-init"), 0).fc2.weight.abs().max() < 1e-5
    frozen = build_model(config_of("frozen"), 0)
    assert not frozen.fc1.weight.requires_grad and frozen.fc2.weight.requires_grad
    cnn = build_model(config_of("cnn-symmetric"), 0)
    assert torch.equal(cnn.conv2.weight, cnn.conv2.weight[:1].expand_as(cnn.conv2.weight))
    assert cnn(torch.zeros(2, 784)).shape == (2, 10)
    healthy, saturated = build_model(config_of("mlp-sigmoid"), 3), build_model(config_of("saturated"), 3)
    assert torch.allclose(saturated.fc1.weight, 50 * healthy.fc1.weight)


def test_dead_and_saturated_units():
    relu = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]])
    assert _dead_fraction(relu, nn.ReLU) == pytest.approx(1 / 3)
    sigmoid = torch.tensor([[1.0 - 1e-6, 0.5], [1e-7, 0.4]])
    assert _dead_fraction(sigmoid, nn.Sigmoid) == 0.5
    channels = torch.zeros(4, 2, 3, 3)
    channels[:, 1, 0, 0] = 1.0
    assert _dead_fraction(channels, nn.ReLU) == 0.5  # a channel is dead when every position is


@pytest.fixture(scope="module")
def mnist():
    return suite_data("mnist5k")


def test_a_run_records_every_signal_at_every_check(mnist):
    record = run_one("symmetric-init", 0, mnist, steps=40)
    assert record["steps"] == [0, 20, 40]
    assert {a["layer"] for a in record["alerts"] if a["step"] == 0 and a["kind"] == "coincident"} == {"fc1", "fc2"}
    signals = record["signals"]
    assert set(signals) == {"loss", "grad_norm", "update_ratio", "dead_fraction", "weight_norm",
                            "neural_persistence", "spread", "entropy_deficit"}
    assert signals["update_ratio"]["fc1"][0] is None and signals["update_ratio"]["fc3"][1] > 0
    # The copies start coincident; the output layer's distinct columns pull them apart, slowly.
    assert signals["spread"]["fc1"][0] == 0.0 and 0 < signals["spread"]["fc1"][2] < 0.1
    assert all(len(v) == 3 for series in signals.values() for v in series.values())
    odd = run_one("mlp", 0, mnist, steps=30)  # a budget off the check grid: its last step is seen too
    assert odd["steps"] == [0, 20, 30]
    frozen = run_one("frozen", 0, mnist, steps=20)
    assert frozen["signals"]["grad_norm"]["fc1"] == [0.0, 0.0]
    assert frozen["signals"]["update_ratio"]["fc1"][1] == 0.0


def _record(values, steps=None, alerts=()):
    steps = steps or list(range(0, 20 * len(values), 20))
    return {"steps": steps, "alerts": list(alerts), "test_accuracy": [0.5] * len(steps),
            "signals": {"weight_norm": {"fc1": list(values)}, "loss": {"model": list(values)}}}


def test_envelopes_calibrate_their_margin_on_left_out_pilots():
    pilots = [_record([1.0, 2.0, 4.0]), _record([1.1, 2.2, 4.4]), _record([0.9, 1.9, 3.8])]
    envelope = fd.calibrate("weight_norm", pilots)
    # Leaving out 1.1× (0.041 decades above the other two) needs the 0.05 margin; nothing less.
    assert envelope.margin == 0.05
    assert not envelope.outside(_record([1.0, 2.1, 4.2])).any()
    assert envelope.outside(_record([1.0, 2.0, 40.0])).tolist() == [False, False, True]
    assert envelope.outside(_record([1.0, float("nan"), 4.0])).tolist() == [False, True, False]
    assert envelope.outside(_record([1.0, 2.0, 1e-30])).tolist() == [False, False, True]  # floored, still below
    wild = [_record([1.0, 2.0, 4.0]), _record([1.0, 2.0, 4e30])]
    uncalibrated = fd.calibrate("weight_norm", wild)
    assert uncalibrated.margin == math.inf  # no margin keeps the pilots inside: it never fires,
    assert not uncalibrated.outside(_record([1.0, float("nan"), 1e40])).any()  # not even on NaN
    with pytest.raises(ValueError, match="at least two pilot runs"):
        fd.calibrate("weight_norm", pilots[:1])


def test_reference_free_detectors_episodes_and_the_evident_rule():
    record = _record([2.3, 2.0, 3.6, float("nan")], alerts=[{"kind": "coincident", "layer": "fc1", "step": 20}])
    assert fd.alarms("loss-divergence", record, {}).tolist() == [False, False, True, True]
    assert fd.alarms("topoopt-alerts", record, {}).tolist() == [False, True, False, False]
    assert fd.episodes(np.array([True, True, False, True, False])) == 2
    assert fd.detection_step(np.array([False, False, True]), [0, 20, 40]) == 40
    assert fd.detection_step(np.zeros(3, dtype=bool), [0, 20, 40]) is None
    twin = np.full(8, 0.9)
    lagging = {"steps": list(range(0, 160, 20)), "test_accuracy": [0.1, 0.9, 0.8, 0.8, 0.84, 0.8, 0.8, 0.8]}
    assert fd.evident_step(lagging, twin, memorising=False) == 40  # ≥ 5 points below for 5 checks in a row
    short = {**lagging, "test_accuracy": [0.9] * 4 + [0.5] * 4}
    assert fd.evident_step(short, twin, memorising=False) is None  # 4 checks are not enough
    falling = {**lagging, "test_accuracy": [0.1, 0.5, 0.7, 0.64, 0.6, 0.6, 0.6, 0.6]}
    assert fd.evident_step(falling, twin, memorising=True) == 60  # below its own best (0.7) from step 60


def test_quick_study_tallies_detectors_and_resumes(tmp_path):
    out = tmp_path / "quick"
    summary = failures.main(["--quick", "--steps", "60", "--out", str(out), "--no-progress"])
    assert set(summary["failures"]) == set(failures.QUICK_FAILURES)
    symmetric = summary["failures"]["symmetric-init"]["detectors"]
    assert symmetric["topoopt-alerts"]["steps"] == [0, 0]
    assert symmetric["topoopt"]["steps"] == [0, 0]
    assert set(summary["healthy"]["mlp"]) >= {"topoopt", "standard", *fd.DETECTORS}
    assert summary["tests"]["symmetric-init"]["n"] == 2
    assert (out / "symmetric-init.png").stat().st_size > 0 and (out / "table.md").read_text().startswith("Detected")
    record = next(json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()
                  if json.loads(line)["id"] == "symmetric-init/0")
    text = failures.narrative(summary, record)
    assert "topoopt's alerts: coincident on fc1, fc2 at step 0" in text and "the loss: its envelope" in text
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 8  # 2 pilots and 2 seeds of the twin, 2 seeds of each failure
    (out / "runs.jsonl").unlink()  # a fresh clone: the committed compact copy is read back, nothing trains
    again = failures.main(["--quick", "--steps", "60", "--out", str(out), "--no-progress"])
    assert json.dumps(again, sort_keys=True) == json.dumps(summary, sort_keys=True)
    with pytest.raises(SystemExit):  # runs of another length are never mixed in
        failures.main(["--quick", "--steps", "80", "--out", str(out), "--no-progress"])
