"""Seeded reruns are bit-identical on one machine with one thread count: `topoopt train`, a
steering run, a failure-suite run and a sparse-network cell, each run twice from scratch and
compared field by field (only wall-clock seconds may differ)."""

from __future__ import annotations

import math

import torch

from topoopt.lab.cli import main
from topoopt.lab.studies import sparse_topologies, steer
from topoopt.lab.studies.failure_suite import run_one, suite_data


def _without_seconds(value):
    """The record with every wall-clock field dropped; NaN made comparable."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if "second" not in k}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def test_train_reruns_are_bit_identical(tmp_path):
    argv = ["train", "--dataset", "digits", "--model", "mlp:64-16-10", "--epochs", "2", "--batch-size", "128",
            "--quiet", "--topo-optimizer", "calm", "--penalty", "mean_lifetime"]
    states = []
    for run in ("a", "b"):
        assert main(argv + ["--log-dir", str(tmp_path / run)]) == 0
        states.append(torch.load(tmp_path / run / "checkpoint.pt", weights_only=False)["model"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_steering_run_reruns_bit_identically():
    config = steer.SteerConfig(configs=["topo-collapse"], seeds=1, dataset="digits", hidden=[8, 8], steps=60,
                               eval_every=20, batch_size=50, collapse_spread=1.5)
    cell = steer.make_cells(config)[0]
    assert _without_seconds(steer.run_cell(cell)) == _without_seconds(steer.run_cell(cell))


def test_a_failure_suite_run_reruns_bit_identically():
    data = suite_data("mnist5k")
    assert _without_seconds(run_one("duplicated", 3, data, steps=60)) == \
        _without_seconds(run_one("duplicated", 3, data, steps=60))


def test_a_sparse_network_cell_reruns_bit_identically():
    config = sparse_topologies.StudyConfig.quick()
    config.epochs = 2
    cells, _ = sparse_topologies.make_cells(config, sparse_topologies.load_permuted(config.dataset).n_features)
    cell = cells[1]
    assert _without_seconds(sparse_topologies.run_cell(cell)) == _without_seconds(sparse_topologies.run_cell(cell))
