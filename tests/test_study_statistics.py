"""The studies' statistics: Holm families are the p-values actually computed, the limits of each
test are stated beside it, and the committed results agree with what their code computes."""

import json
from pathlib import Path

import numpy as np
import pytest

from topoopt.lab.studies.statistics import holm, paired_t_minimum_effect, wilcoxon_minimum_p

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


def _ablation_records(datasets=("a", "b"), variants=("plain", "v1", "v2"), seeds=5, shift=0.0):
    rng = np.random.default_rng(0)
    records = []
    for d in datasets:
        for v in variants:
            for s in range(seeds):
                accuracy = 0.8 + 0.01 * s + (shift if v == "v1" else 0.0) + 0.002 * rng.standard_normal()
                records.append({"dataset": d, "optimizer": "adam", "variant": v, "seed": s, "test_accuracy": accuracy,
                                "seconds": 1.0, "curve": [(10, accuracy)]})
    return records


def test_ablation_holm_family_is_the_comparisons_made():
    """Plain against itself is no test: 2 datasets × 2 variants = 4 comparisons, not 6 rows."""
    from topoopt.lab.studies.ablate import analyse

    table = analyse(_ablation_records())
    tested = [row for row in table if "paired_t_p" in row]
    assert len(table) == 6 and len(tested) == 4
    assert {row["holm_family_size"] for row in tested} == {4}
    assert [row["paired_t_p_holm"] for row in tested] == pytest.approx(holm([row["paired_t_p"] for row in tested]))


def test_exact_wilcoxon_on_five_pairs_cannot_reach_five_percent():
    """All five differences of one sign give the smallest exact two-sided p: 2/2⁵ = 0.0625."""
    from scipy import stats

    assert wilcoxon_minimum_p(5) == 0.0625
    assert stats.wilcoxon([0.1, 0.2, 0.3, 0.4, 0.5]).pvalue == pytest.approx(0.0625)
    assert wilcoxon_minimum_p(6) == pytest.approx(0.03125)
    with pytest.raises(ValueError):
        wilcoxon_minimum_p(0)


def test_ablation_summary_flags_the_wilcoxon_floor_and_counts_harms():
    from topoopt.lab.studies.ablate import analyse, summarise

    summary = summarise(analyse(_ablation_records(shift=-0.05)))
    assert summary["comparisons"] == 4
    assert summary["wilcoxon_min_p"] == 0.0625 and summary["wilcoxon_can_reach_alpha"] is False
    assert summary["worse_holm"] == 2 and summary["better_holm"] == 0  # v1 is 5 points worse on both datasets
    assert all(row["wilcoxon_min_p"] == 0.0625 for row in analyse(_ablation_records()) if row["variant"] != "plain")


def test_paired_t_minimum_effect_has_the_stated_power():
    """Simulated paired differences of that mean are detected in ~80% of experiments."""
    from scipy import stats

    effect = paired_t_minimum_effect(1.0, 5)
    differences = np.random.default_rng(0).normal(effect, 1.0, size=(100_000, 5))
    t = differences.mean(axis=1) / (differences.std(axis=1, ddof=1) / np.sqrt(5))
    assert np.mean(np.abs(t) > stats.t.ppf(0.975, 4)) == pytest.approx(0.8, abs=0.01)
    assert paired_t_minimum_effect(2.0, 5) == pytest.approx(2 * effect)
    assert paired_t_minimum_effect(1.0, 5, alpha=0.05 / 110) > 3 * effect


def test_committed_ablation_table_matches_its_holm_family():
    table = json.loads((RESULTS / "ablate" / "table.json").read_text())
    tested = [row for row in table["table"] if "paired_t_p" in row]
    assert table["summary"]["comparisons"] == len(tested) == 110
    assert [row["paired_t_p_holm"] for row in tested] == pytest.approx(holm([row["paired_t_p"] for row in tested]))
    # The write-up's headline: one harm survives Holm, no benefit does.
    assert (table["summary"]["better_holm"], table["summary"]["worse_holm"]) == (0, 1)


def test_committed_small_data_analysis_matches_its_holm_families():
    analysis = json.loads((RESULTS / "small_data" / "analysis.json").read_text())
    rows = analysis["correlations"]
    assert analysis["holm_family_size"]["correlations"] == len(rows) == 108
    assert [r["p_holm"] for r in rows] == pytest.approx(holm([r["p"] for r in rows]))
    partial = [r for r in rows if "partial_p_given_log_size_holm" in r]
    assert analysis["holm_family_size"]["partial_given_log_size"] == len(partial) == 36
    survivors = {(r["dataset"], r["budget"], r["layer"], r["metric"])
                 for r in partial if r["partial_p_given_log_size_holm"] < 0.05}
    assert survivors == {("digits", "epochs", "fc1", "mean_lifetime")}


def test_committed_compact_runs_reproduce_the_committed_tables():
    """The gzipped copies of runs.jsonl are lossless: analysing them gives the committed tables
    (to the last bits of a least-squares fit, which depend on the BLAS)."""
    from topoopt.lab.studies import ablate, small_data
    from topoopt.lab.sweep import COMPACT_RESULTS, load_compact

    table = ablate.analyse(load_compact(RESULTS / "ablate" / COMPACT_RESULTS))
    assert {"table": table, "best": ablate.best_per_dataset(table), "summary": ablate.summarise(table)} == \
        json.loads((RESULTS / "ablate" / "table.json").read_text())
    analysis = small_data.analyse(load_compact(RESULTS / "small_data" / COMPACT_RESULTS))
    committed = json.loads((RESULTS / "small_data" / "analysis.json").read_text())
    assert analysis["holm_family_size"] == committed["holm_family_size"]
    assert analysis["friedman"] == committed["friedman"]
    for row, saved in zip(analysis["correlations"], committed["correlations"], strict=True):
        assert row.keys() == saved.keys()
        assert {k: v for k, v in row.items() if isinstance(v, float)} == pytest.approx(
            {k: v for k, v in saved.items() if isinstance(v, float)}, rel=1e-9, nan_ok=True)
