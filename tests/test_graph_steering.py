"""Steered learning-graph runs, their comparison with the baseline, and the live-topology
validation's matching (topoopt.lab.studies.graph_steering, graph_comparison, live_validation)."""

import json

import numpy as np
import pytest
import torch

from topoopt.lab.models import build_mlp
from topoopt.lab.studies import learning_graphs
from topoopt.lab.studies.graph_comparison import first_step_above
from topoopt.lab.studies.graph_steering import STEERINGS, build_steering
from topoopt.lab.studies.live_validation import accuracy_jumps, match_events
from topoopt.learning_graphs import load_trajectory


def test_match_events_pairs_closest_first_one_to_one():
    # 100 could pair with 0 or 250; the closest pair (250, 260) is taken first, so 100 pairs with 0.
    assert match_events([100, 260, 2000], [0, 250, 900], window=300) == (2, 1, 1)
    assert match_events([], [5, 6], window=300) == (0, 2, 0)
    assert match_events([10, 20], [], window=300) == (0, 0, 2)
    assert match_events([0], [301], window=300) == (0, 1, 1)


def test_accuracy_jumps_are_rises_above_the_threshold():
    curve = [(0, 0.1), (150, 0.16), (300, 0.2), (450, 0.5), (600, 0.45), (750, 0.52)]
    assert accuracy_jumps(curve, 0.05) == [150, 450, 750]
    assert first_step_above(curve, 0.2) == 300
    assert first_step_above(curve, 0.9) is None


def test_build_steering_rejects_unknown_names_and_needs_matched_scales():
    model = build_mlp([4, 3, 2], activation="sigmoid", bias=False)
    with pytest.raises(ValueError, match="Unknown steering 'fast'"):
        build_steering("fast", model, 0.05)
    with pytest.raises(ValueError, match="mean scales"):
        build_steering("collapse-matched", model, 0.05)
    matched = build_steering("collapse-matched", model, 0.05, matched_scales=lambda: {"fc1": 3.0, "fc2": 0.5})
    assert [g["lr"] for g in matched.optimizer.param_groups] == [pytest.approx(0.15), pytest.approx(0.025)]
    assert set(STEERINGS) >= {"none", "pen-spread", "pen-entropy", "topo-collapse", "topo-awaken"}


def test_pen_spread_switches_a_layer_off_at_its_target():
    torch.manual_seed(0)
    model = build_mlp([6, 5, 3], activation="sigmoid", bias=False)
    steering = build_steering("pen-spread", model, 0.05)
    with torch.no_grad():
        model.fc1.weight.mul_(1e-6)  # fc1 collapsed: mean lifetime far below 0.5; fc2 spread out
        model.fc2.weight.mul_(100.0)
    steering.loss(torch.zeros(())).backward()
    steering.after_step(1)
    assert steering.switched_off == {"fc2": 1}
    assert steering.penalty.coefficients["fc2"] == 0.0 and steering.penalty.coefficients["fc1"] == 1.0


def test_steered_runs_start_like_the_baseline_and_are_compared(tmp_path):
    out = tmp_path / "graphs"
    learning_graphs.main(["--setting", "tree", "--quick", "--epochs", "2", "--dataset", "digits",
                          "--epsilons", "1e-3", "--seeds", "0", "--steer", "topo-collapse", "collapse-matched",
                          "--compare", "--out", str(out), "--tensorboard", str(tmp_path / "tb")])
    runs = out
    base, steered = runs / "tree_digits_eps0.001_s0_e2", runs / "tree_digits_eps0.001_s0_e2_topo-collapse"
    matched = runs / "tree_digits_eps0.001_s0_e2_collapse-matched"
    for layer in ("fc1", "fc2"):  # the same initial weights
        np.testing.assert_array_equal(load_trajectory(base / "trajectory", layer).clouds()[0],
                                      load_trajectory(steered / "trajectory", layer).clouds()[0])
    collapse = json.loads((steered / "summary.json").read_text())["training"]["mean_scales"]
    assert json.loads((matched / "summary.json").read_text())["training"]["mean_scales"] == collapse
    rows = json.loads((runs / "comparison" / "tree_comparison.json").read_text())
    assert [r["steering"] for r in rows] == ["none", "collapse-matched", "topo-collapse"]
    assert (runs / "comparison" / "tree_eps0.001_s0_graphs.png").stat().st_size > 10_000
    online = json.loads((base / "summary.json").read_text())["online_events"]
    assert isinstance(online, list)
    assert {e["ratio"] for e in online} <= {*learning_graphs.LIVE_RATIOS, learning_graphs.MAPPER_EPS}


def test_validate_counts_matches_and_what_chance_would_give(tmp_path):
    from topoopt.lab.studies.live_validation import validate

    run = tmp_path / "tree_x"
    run.mkdir()
    offline = [1000.0, 2000.0, 5000.0]
    online = [{"layer": "fc2", "step": s + 60, "ratio": 4.0} for s in offline] + [
        {"layer": "fc2", "step": 20_000, "ratio": 4.0}]
    summary = {"config": {"epsilon": 1e-6, "seed": 0, "steer": "none"}, "training": {"steps": 30_000},
               "layers": {"fc2": {"event_steps": offline}}, "events": {"fc2": []}, "online_events": online}
    (run / "summary.json").write_text(json.dumps(summary))
    curve = [{"step": s, "accuracy": a} for s, a in [(0, 0.1), (900, 0.1), (1050, 0.3), (1200, 0.32)]]
    (run / "nines.json").write_text(json.dumps(curve))
    block = validate(tmp_path, window=300, jump=0.05, shuffles=100)["ratios"]["4.0"]
    (row,) = block["rows"]
    assert (row["online"], row["offline"], row["matched"], row["missed"], row["false"]) == (4, 3, 3, 0, 1)
    # four events over 30,000 steps: three offline events within ±300 steps by chance ≈ 4·3·600/30,000
    assert row["matched_by_chance"] < 1.0
    # The same events shifted by one offset within ±500 steps: each matches while 60 + shift is within
    # ±300, i.e. for 60% of the offsets, so 3 × 0.6 = 1.8 by local chance.
    assert 1.4 < row["matched_by_local_chance"] < 2.2
    # The accuracy-curve detector fires once, at the jump (1,050), and matches the event at 1,000.
    assert (row["accuracy_detector_events"], row["matched_by_accuracy_detector"]) == (1, 1)
    assert block["jumps"] == 1 and block["jumps_with_event_within_window"] == 1  # the jump at 1,050: event 1,060
    assert block["median_lag"] == 10 and block["median_first_event_minus_first_jump"] == 10
