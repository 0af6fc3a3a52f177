"""The early-stopping study (issue #14, part 3): its quick mode, its runs replayed by hand, and
its paired statistics on small hand-worked examples."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from topoopt.early_stopping import NeuralPersistenceStopping, TopologyEarlyStopping
from topoopt.lab.models import build_mlp
from topoopt.lab.studies import stopping
from topoopt.lab.studies.statistics import holm, paired_t_minimum_effect
from topoopt.lab.studies.steer import signed_rank_p
from topoopt.lab.studies.stopping import (
    StoppingConfig,
    paired_comparison,
    read_compact,
    run_cell,
    sign_test,
    subset,
    validation_split,
    wilcoxon_exact,
)
from topoopt.lab.sweep import load_results


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("stopping_quick")
    config = StoppingConfig.quick()
    stopping.main(["--quick", "--out", str(out), "--no-progress"])
    records = list(load_results(out / "runs.jsonl").values())
    compact = {r["id"]: r for r in read_compact(out / "runs_compact.jsonl.gz")}
    # The committed compact copy keeps every stop's test accuracy exactly.
    assert set(compact) == {r["id"] for r in records}
    assert all(compact[r["id"]]["stops"][rule]["test_accuracy"] == stop["test_accuracy"]
               for r in records for rule, stop in r["stops"].items())
    summary = json.loads((out / "summary.json").read_text())
    return config, out, records, summary


def test_quick_mode_runs_every_cell_and_writes_its_files(quick):
    config, out, records, summary = quick
    assert sorted(r["id"] for r in records) == sorted(
        f"{d}/s{s}/{arm}" for d in ("digits", "mnist5k-500") for s in (0, 1) for arm in ("all", "validation"))
    for name in ("summary.json", "table.md", "runs_compact.jsonl.gz", "differences.png", "config.json", "runs.jsonl"):
        assert (out / name).exists()
    assert summary["family_size"] == 4  # 2 candidate rules × 2 datasets
    assert set(summary["tests"]) == {f"{d}/{r}-vs-validation" for d in ("digits", "mnist5k-500")
                                     for r in ("topology", "np")}


def test_validation_rule_trains_on_exactly_80_percent(quick):
    _, _, records, _ = quick
    sizes = {(r["dataset"], r["arm"]): (r["n_examples"], r["n_trained"], r["n_validation"]) for r in records}
    # digits: 1,347 training examples; 20% held out is ceil(269.4) = 270. mnist5k-500: 400 + 100.
    assert sizes[("digits", "validation")] == (1347, 1077, 270)
    assert sizes[("digits", "all")] == (1347, 1347, 0)
    assert sizes[("mnist5k-500", "validation")] == (500, 400, 100)
    assert sizes[("mnist5k-500", "all")] == (500, 500, 0)
    assert {r["n_test"] for r in records if r["dataset"] == "digits"} == {450}
    assert {r["n_test"] for r in records if r["dataset"] == "mnist5k-500"} == {1000}
    # The split is a partition of the seed's training subset, stratified (50 of each class held out).
    data = subset("mnist5k-500", 1)
    fitted, x_val, y_val = validation_split(data, 0.2, 1)
    both = torch.cat([fitted.x_train, x_val])
    assert len(both) == 500 and len(torch.unique(both, dim=0)) == len(torch.unique(data.x_train, dim=0))
    assert torch.bincount(y_val).tolist() == [10] * 10


def test_stops_are_within_the_cap_and_read_off_the_curve(quick):
    config, _, records, _ = quick
    for record in records:
        curve = record["curve"]
        assert [row["epoch"] for row in curve] == list(range(1, len(curve) + 1))
        for rule, stop in record["stops"].items():
            assert 1 <= stop["epoch"] <= config.max_epochs == 8
            assert stop["fired"] or stop["epoch"] == config.max_epochs
            if rule != "validation":
                assert stop["test_accuracy"] == curve[stop["epoch"] - 1]["test_accuracy"]
        if record["arm"] == "all":
            assert len(curve) == config.max_epochs and set(record["stops"]) == {"topology", "np", "cap"}
        else:
            stop = record["stops"]["validation"]
            losses = [row["val_loss"] for row in curve]
            assert stop["best_epoch"] == int(np.argmin(losses)) + 1  # the first of the lowest
            assert len(curve) == stop["epoch"]
            if stop["fired"]:
                assert stop["epoch"] - stop["best_epoch"] == config.validation_patience
            # Restored weights: the test accuracy the curve recorded at the best epoch.
            assert stop["test_accuracy"] == curve[stop["best_epoch"] - 1]["test_accuracy"]


def test_summary_table_is_the_records_medians(quick):
    _, _, records, summary = quick
    for dataset in ("digits", "mnist5k-500"):
        for rule in ("topology", "np", "validation", "cap"):
            stops = [r["stops"][rule] for r in records if r["dataset"] == dataset and rule in r["stops"]]
            row = summary["table"][dataset][rule]
            assert row["n"] == 2
            assert row["median_test_accuracy"] == pytest.approx(np.median([s["test_accuracy"] for s in stops]))
            assert row["median_epochs"] == np.median([s["epoch"] for s in stops])
    for dataset, row in summary["exploratory"].items():  # the two parts add up to the paired mean difference
        assert row["data_points"] + row["timing_points"] == pytest.approx(
            summary["tests"][f"{dataset}/topology-vs-validation"]["mean_diff_points"])
        cap = [r["stops"]["cap"]["test_accuracy"] for r in sorted(records, key=lambda r: r["seed"])
               if r["dataset"] == dataset and r["arm"] == "all"]
        topo = [r["stops"]["topology"]["test_accuracy"] for r in sorted(records, key=lambda r: r["seed"])
                if r["dataset"] == dataset and r["arm"] == "all"]
        assert row["topology-vs-cap"]["mean_diff_points"] == pytest.approx(100 * np.mean(np.subtract(topo, cap)))
    raw = [t["p_noninferiority_t"] for t in summary["tests"].values()]
    assert [t["holm_p_noninferiority_t"] for t in summary["tests"].values()] == pytest.approx(holm(raw))
    for test in summary["tests"].values():
        if test["sd_diff_points"] > 0:
            assert test["mde_points_80pct_power"] == pytest.approx(
                paired_t_minimum_effect(test["sd_diff_points"], 2, alpha=0.05 / 4))


def _fit_epoch(model, optimizer, x, y, generator, batch_size):
    for batch in torch.randperm(len(y), generator=generator).split(batch_size):
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()


def test_each_rule_alone_reproduces_the_shared_run(tmp_path):
    """The topology and NP rules read off one shared run stop where each, run alone, stops; the
    validation arm is plain training on the 80% with the same seed's init and shuffle, restored
    to its best validation epoch."""
    torch.set_num_threads(1)
    config = StoppingConfig(datasets=["digits"], seeds=1, first_seed=5, hidden=[16], max_epochs=15,
                            validation_patience=2, topology_tolerance=0.05, topology_patience=2, np_patience=1)
    plain = config.__dict__
    shared = run_cell({"id": "x", "dataset": "digits", "seed": 5, "arm": "all", "config": plain})
    data = subset("digits", 5)

    def alone(make_rule):
        torch.manual_seed(5)
        model = build_mlp([64, 16, 10])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator, rule = torch.Generator().manual_seed(5), make_rule(model)
        epoch = 0
        while epoch < 15:
            epoch += 1
            _fit_epoch(model, optimizer, data.x_train, data.y_train, generator, 32)
            if rule.update():
                break
        with torch.no_grad():
            return epoch, float((model(data.x_test).argmax(1) == data.y_test).float().mean())

    topo = alone(lambda m: TopologyEarlyStopping(m, tolerance=0.05, patience=2))
    persistence = alone(lambda m: NeuralPersistenceStopping(m, patience=1))
    assert shared["stops"]["topology"]["fired"] and topo[0] < 15  # the example exercises a real stop
    assert (shared["stops"]["topology"]["epoch"], shared["stops"]["topology"]["test_accuracy"]) == topo
    assert (shared["stops"]["np"]["epoch"], shared["stops"]["np"]["test_accuracy"]) == persistence

    held = run_cell({"id": "y", "dataset": "digits", "seed": 5, "arm": "validation", "config": plain})
    fitted, x_val, y_val = validation_split(data, 0.2, 5)
    torch.manual_seed(5)
    model = build_mlp([64, 16, 10])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator, best, best_state, waited = torch.Generator().manual_seed(5), math.inf, None, 0
    epoch = 0
    while epoch < 15:
        epoch += 1
        _fit_epoch(model, optimizer, fitted.x_train, fitted.y_train, generator, 32)
        with torch.no_grad():
            loss = float(F.cross_entropy(model(x_val), y_val))
        best, best_state, waited = ((loss, copy.deepcopy(model.state_dict()), 0) if loss < best
                                    else (best, best_state, waited + 1))
        if waited >= 2:
            break
    model.load_state_dict(best_state)
    with torch.no_grad():
        accuracy = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    assert (held["stops"]["validation"]["epoch"], held["stops"]["validation"]["test_accuracy"]) == (epoch, accuracy)


def test_paired_comparison_by_hand():
    # Δ in points: 1, −1, 3, 0. Mean 0.75, SD √(8.75/3); non-inferiority t = (0.75 + 1)/(SD/2), 3 df.
    result = paired_comparison([0.90, 0.85, 0.88, 0.80], [0.89, 0.86, 0.85, 0.80], margin=1.0)
    sd = math.sqrt(8.75 / 3)
    assert result["mean_diff_points"] == pytest.approx(0.75)
    assert result["sd_diff_points"] == pytest.approx(sd)
    assert result["p_noninferiority_t"] == pytest.approx(stats.t.sf(1.75 / (sd / 2), 3))
    assert result["p_paired_t"] == pytest.approx(2 * stats.t.sf(0.75 / (sd / 2), 3))
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert result["ci95_points"] == pytest.approx([0.75 - half, 0.75 + half])
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    # Sign test: 2 of the 3 non-zero differences positive: two-sided p 1.
    assert result["p_sign"] == pytest.approx(1.0)
    # Wilcoxon: |Δ| 1, 1, 3 → ranks 1.5, 1.5, 3; W+ = 4.5; of the 8 sign patterns, 6 are at least
    # 1.5 from the centre 3 (W+ ∈ {0, 1.5, 1.5, 4.5, 4.5, 6}).
    assert result["p_wilcoxon"] == pytest.approx(6 / 8)
    # Δ + margin = 2, 0, 4, 1: all three non-zero positive, W+ its maximum: one-sided p 1/8.
    assert result["p_noninferiority_wilcoxon"] == pytest.approx(1 / 8)


def test_exact_wilcoxon_agrees_with_the_sign_flip_count_and_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = rng.integers(-4, 5, size=12).astype(float)  # ties and zeros
        assert wilcoxon_exact(d) == pytest.approx(signed_rank_p(d))
    d = rng.normal(size=25)  # no ties: scipy's exact distribution
    assert wilcoxon_exact(d) == pytest.approx(stats.wilcoxon(d, method="exact").pvalue)
    assert wilcoxon_exact(d, "greater") == pytest.approx(stats.wilcoxon(d, method="exact",
                                                                        alternative="greater").pvalue)
    assert sign_test([1, 2, 3, -1, 0]) == pytest.approx(stats.binomtest(3, 4).pvalue)
