"""Smoke tests of the experiment scripts on tiny grids, and the resumable sweep runner."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from topoopt.lab.studies.statistics import holm
from topoopt.lab.sweep import load_results, run_cells

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
    from topoopt.lab.studies import sparse_topologies

    args = ["--quick", "--seeds", "1", "--epochs", "2", "--out", str(tmp_path / "out"),
            "--tensorboard", str(tmp_path / "tb"), "--no-progress"]
    analysis = sparse_topologies.main(args)
    out = tmp_path / "out" / "digits"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_masks_fixed_density"] >= 10
    fixed = [m for m in analysis["masks"] if m["family"] != "dense" and m["degree"] == 4]  # the main degree
    assert summary["n_masks_fixed_density"] == len(fixed)
    rho = stats.spearmanr([m["min_spectral_gap"] for m in fixed], [m["accuracy"] for m in fixed]).statistic
    assert summary["spearman_min_spectral_gap"]["rho"] == pytest.approx(rho)
    assert (out / "accuracy_vs_gap_and_density.png").stat().st_size > 0
    families = {m["family"] for m in analysis["masks"]}
    assert families >= {"banded", "rewired", "biregular", "expander", "block_diagonal", "dense"}
    lines = (out / "runs.jsonl").read_text().splitlines()
    sparse_topologies.main(args)  # a re-run skips every finished cell
    assert (out / "runs.jsonl").read_text().splitlines() == lines


def test_small_data_tiny_grid(tmp_path):
    from topoopt.lab.studies import small_data

    analysis = small_data.main(["--quick", "--datasets", "digits", "--seeds", "3", "--steps", "20",
                                "--out", str(tmp_path / "out"), "--tensorboard", str(tmp_path / "tb"), "--no-progress"])
    rows = [r for r in analysis["correlations"] if r["budget"] == "steps"]
    assert {r["layer"] for r in rows} == {"fc1", "fc2", "fc3"}
    p_values = [r["p"] if np.isfinite(r["p"]) else 1.0 for r in analysis["correlations"]]  # NaN: untestable
    assert [r["p_holm"] for r in analysis["correlations"]] == pytest.approx(holm(p_values))
    assert "digits/steps" in analysis["friedman"]
    assert (tmp_path / "out" / "digits_topology.png").exists()
    assert (tmp_path / "out" / "correlations.csv").read_text().startswith("dataset,budget,layer,metric,target")


def test_holm_adjustment_matches_the_definition():
    from topoopt.lab.studies.statistics import holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_ablate_tiny_grid_through_the_cli(tmp_path, capsys):
    from topoopt.lab.cli import main

    assert main(["ablate", "--datasets", "digits", "--variants", "opt-calm-4", "pen-entropy-max-0.1",
                 "--optimizers", "adam", "--seeds", "2", "--steps", "30", "--out", str(tmp_path / "out"),
                 "--tensorboard", str(tmp_path / "tb"), "--no-progress"]) == 0
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    variants = {row["variant"] for row in table["table"]}
    assert variants == {"plain", "opt-calm-4", "pen-entropy-max-0.1"}
    assert "digits/adam" in table["best"]
    assert "steps→plain" in capsys.readouterr().out


def test_a_rerun_with_other_settings_into_the_same_folder_is_refused_in_one_line(tmp_path, capsys):
    """Cells are found again by dataset, variant and seed: a rerun with another run length into
    the same --out would read the old cells as its own. Refused, naming the setting; more seeds
    (a field that only adds cells) are welcome; a bad variant leaves no folder behind."""
    from topoopt.lab.cli import main

    def ablate(*extra):
        return main(["ablate", "--datasets", "digits", "--variants", "plain", "--optimizers", "sgd",
                     "--out", str(tmp_path / "out"), "--tensorboard", str(tmp_path / "tb"), "--no-progress", *extra])

    assert ablate("--seeds", "1", "--steps", "30") == 0
    saved = (tmp_path / "out" / "config.json").read_text()
    capsys.readouterr()
    assert ablate("--seeds", "1", "--steps", "45") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "steps 30 (now 45)" in err and "another --out" in err
    assert (tmp_path / "out" / "config.json").read_text() == saved
    assert ablate("--seeds", "2", "--steps", "30") == 0
    assert len(load_results(tmp_path / "out" / "runs.jsonl")) == 2
    runs = [folder for folder in (tmp_path / "tb").iterdir() if folder.is_dir()]
    assert len(runs) == 2 and all(len(list(run.glob("events.out.tfevents.*"))) == 1 for run in runs)
    assert main(["ablate", "--variants", "plainx", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert not (tmp_path / "bad").exists()


def test_study_folders_are_the_options_or_the_defaults_kept_apart_for_quick_grids():
    from argparse import Namespace

    from topoopt.lab.studies.options import output_folders

    defaults = (Path("results") / "study", Path("logs") / "study")
    assert output_folders(Namespace(quick=False, out=None, tensorboard=None), *defaults) == defaults
    assert output_folders(Namespace(quick=True, out=None, tensorboard=None), *defaults) == (
        Path("results") / "study" / "quick", Path("logs") / "study_quick")
    assert output_folders(Namespace(quick=True, out="o", tensorboard="t"), *defaults) == (Path("o"), Path("t"))


def test_compact_results_round_trip_and_restore_a_missing_resume_file(tmp_path):
    from topoopt.lab.sweep import load_compact, restore_from_compact, save_compact

    records = [{"id": "a", "x": 0.1 + 0.2, "curve": [[1, 1 / 3]], "nan": float("nan")}, {"id": "b", "x": 1e-300}]
    save_compact(records, tmp_path / "c.gz")
    first = (tmp_path / "c.gz").read_bytes()
    save_compact(records, tmp_path / "c.gz")
    assert (tmp_path / "c.gz").read_bytes() == first  # no time stamp: no change in git
    loaded = load_compact(tmp_path / "c.gz")
    assert loaded[0]["x"] == 0.1 + 0.2 and loaded[0]["curve"] == [[1, 1 / 3]] and loaded[1] == records[1]
    restore_from_compact(tmp_path / "runs.jsonl", tmp_path / "c.gz")
    calls = []
    results = run_cells([{"id": "a"}, {"id": "b"}, {"id": "c", "x": 2}], lambda c: calls.append(c["id"]) or {"x": 4},
                        tmp_path / "runs.jsonl", progress=False)
    assert calls == ["c"] and [r["x"] for r in results] == [0.1 + 0.2, 1e-300, 4]


def test_ray_tasks_write_the_records_a_serial_sweep_writes(tmp_path):
    """`--executor ray`: a local Ray (2 CPUs) runs real study cells; each record equals the serial
    run's but for its wall-clock seconds."""
    pytest.importorskip("ray")
    from test_reruns import _without_seconds

    from topoopt.lab.studies import sparse_topologies

    config = sparse_topologies.StudyConfig.quick()
    config.epochs = 1
    cells, _ = sparse_topologies.make_cells(config, sparse_topologies.load_permuted(config.dataset).n_features)
    cells = cells[:3]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each parallel cell runs: one BLAS thread
    try:
        serial = run_cells(cells, sparse_topologies.run_cell, tmp_path / "serial.jsonl", progress=False)
    finally:
        torch.set_num_threads(threads)
    on_ray = run_cells(cells, sparse_topologies.run_cell, tmp_path / "ray.jsonl", jobs=2, executor="ray",
                       progress=False)
    assert [_without_seconds(r) for r in on_ray] == [_without_seconds(r) for r in serial]
    assert set(load_results(tmp_path / "ray.jsonl")) == {cell["id"] for cell in cells}


@pytest.mark.parametrize("address, message", [
    ("nonsense", "Invalid RAY_ADDRESS: 'nonsense'. It must be host:port"),
    ("127.0.0.1:99999", "Invalid RAY_ADDRESS: '127.0.0.1:99999'. It must be host:port"),
    ("127.0.0.1:\u00b2", "Invalid RAY_ADDRESS: '127.0.0.1:\u00b2'. It must be host:port"),
    ("127.0.0.1:1", "RAY_ADDRESS=127.0.0.1:1: nothing answers at 127.0.0.1:1"),
])
def test_a_bad_ray_address_is_refused_in_one_line(tmp_path, monkeypatch, address, message):
    """Before Ray is started: Ray itself would retry for ~25 s, printing its own logs."""
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ValueError, match=message):
        run_cells([{"id": "a", "x": 1}], _square, tmp_path / "r.jsonl", jobs=2, executor="ray", progress=False)
    assert not (tmp_path / "r.jsonl").exists() or not load_results(tmp_path / "r.jsonl")


def test_an_unknown_executor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Invalid executor: 'dask'. It must be one of 'process', 'ray'"):
        run_cells([{"id": "a", "x": 1}], _square, tmp_path / "r.jsonl", jobs=2, executor="dask", progress=False)
