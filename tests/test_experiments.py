"""Smoke tests of the experiment scripts on tiny grids, and the resumable sweep runner."""

import json
import sys
from pathlib import Path

import pytest

from topoopt.sweep import load_results, run_cells

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def _square(cell):
    return {"value": cell["x"] ** 2}


def test_sweep_skips_finished_cells_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    cells = [{"id": f"c{i}", "x": i} for i in range(4)]
    calls = []

    def counted(cell):
        calls.append(cell["id"])
        return _square(cell)

    run_cells(cells[:2], counted, path, progress=False)
    with open(path, "a") as handle:
        handle.write('{"id": "c2", "val')  # a write cut short by a crash
    results = run_cells(cells, counted, path, progress=False)
    assert calls == ["c0", "c1", "c2", "c3"]
    assert [r["value"] for r in results] == [0, 1, 4, 9]
    assert set(load_results(path)) == {"c0", "c1", "c2", "c3"}


def test_sweep_runs_cells_in_parallel_processes(tmp_path):
    cells = [{"id": f"c{i}", "x": i} for i in range(4)]
    results = run_cells(cells, _square, tmp_path / "runs.jsonl", jobs=2, progress=False)
    assert [r["value"] for r in results] == [0, 1, 4, 9]


def test_sweep_rejects_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_cells([{"id": "a"}, {"id": "a"}], _square, tmp_path / "r.jsonl", progress=False)


def test_sparse_topologies_tiny_grid(tmp_path):
    import sparse_topologies

    args = ["--quick", "--seeds", "1", "--epochs", "2", "--out", str(tmp_path / "out"),
            "--tensorboard", str(tmp_path / "tb"), "--no-progress"]
    analysis = sparse_topologies.main(args)
    out = tmp_path / "out" / "digits"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_masks_fixed_density"] >= 10
    assert -1 <= summary["spearman_min_spectral_gap"]["rho"] <= 1
    assert (out / "accuracy_vs_gap_and_density.png").stat().st_size > 0
    assert {m["family"] for m in analysis["masks"]} >= {"banded", "rewired", "biregular", "expander", "block_diagonal", "dense"}
    lines = (out / "runs.jsonl").read_text().splitlines()
    sparse_topologies.main(args)  # a re-run skips every finished cell
    assert (out / "runs.jsonl").read_text().splitlines() == lines
