"""The steering study (issue #17) on a tiny configuration: digits, 64-8-8-10, a few dozen steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from topoopt.lab.data import load_dataset
from topoopt.lab.studies import steer
from topoopt.lab.studies.steer import (
    SteerConfig,
    censored_median,
    first_step_at,
    make_cells,
    run_cell,
    signed_rank_p,
    summarise,
)


def _tiny(configs, **changes) -> SteerConfig:
    settings = dict(configs=configs, seeds=2, dataset="digits", hidden=[8, 8], steps=60, eval_every=20,
                    batch_size=50, steered_lr_mult=16.0)
    settings.update(changes)
    return SteerConfig(**settings)


def test_first_step_at_and_censored_median():
    curve = [{"step": 0, "accuracy": 0.1}, {"step": 100, "accuracy": 0.2}, {"step": 200, "accuracy": 0.85}]
    assert first_step_at(curve, 0.2) == 100
    assert first_step_at(curve, 0.2, strict=True) == 200
    assert first_step_at(curve, 0.9) is None
    assert censored_median([300, None, 100]) == 300
    assert censored_median([300, None, 100, 200]) == 250
    assert censored_median([300, None, None, 100]) == math.inf


def test_plain_cell_is_plain_sgd_with_the_surface_initialisation():
    """sgd-x1 at seed 3 is exactly plain SGD (lr 0.05) from N(0, 1e-6²) drawn as in the
    learning-graph study, with the seed's shuffle; its curve is evaluated at steps 0, 20, 40, 60."""
    config = _tiny(["sgd-x1"])
    record = run_cell({"id": "sgd-x1/s3", "name": "sgd-x1", "seed": 3, "config": config.__dict__})
    data = load_dataset("digits")
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False), torch.nn.Sigmoid(),
                                torch.nn.Linear(8, 8, bias=False), torch.nn.Sigmoid(),
                                torch.nn.Linear(8, 10, bias=False))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            layer.weight.normal_(0.0, 1e-6, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    shuffle = torch.Generator().manual_seed(3)
    step = 0
    while step < 60:
        for batch in torch.randperm(len(data.y_train), generator=shuffle).split(50):
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            optimizer.step()
            step += 1
            if step == 60:
                break
    with torch.no_grad():
        accuracy = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    assert [row["step"] for row in record["curve"]] == [0, 20, 40, 60]
    assert record["final_accuracy"] == accuracy
    assert record["mean_scales"] == {"fc1": 1.0, "fc2": 1.0, "fc3": 1.0}
    assert record["settings"]["lr"] == 0.05 and not record["diverged"]
    rms = float(model[0].weight.detach().double().norm()) / math.sqrt(8)
    assert record["curve"][-1]["fc1"]["rms_norm"] == pytest.approx(rms, rel=1e-12)


def test_study_runs_matched_controls_from_the_steered_scales_and_resumes(tmp_path):
    config = _tiny(["sgd-x16", "topo-collapse", "topo-collapse-matched", "pen-spread", "lars"],
                   collapse_strength=3.0, penalty_weight=1.0, penalty_target=0.05)
    records, summary = steer.run_study(config, tmp_path, progress=False)
    assert len(records) == 10
    by_id = {f"{r['config']}/s{r['seed']}": r for r in records}
    for seed in (0, 1):
        steered, matched = by_id[f"topo-collapse/s{seed}"], by_id[f"topo-collapse-matched/s{seed}"]
        assert matched["mean_scales"] == steered["mean_scales"]
        # The collapse policy's scale lies in [1, 1 + strength] and was > 1 somewhere on the tiny init's drift.
        assert all(1.0 <= s <= 4.0 for s in steered["mean_scales"].values())
        # The penalty switched a layer off at the step its mean lifetime first reached the target.
        spread = by_id[f"pen-spread/s{seed}"]
        assert spread["penalty_off_step"] is not None
    assert summary["table"]["sgd-x16"]["n"] == 2
    assert set(summary["tests"]) == {"pen-spread", "topo-collapse"}
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 10
    again, _ = steer.run_study(config, tmp_path, progress=False)  # resumes: nothing re-run, nothing appended
    assert (tmp_path / "runs.jsonl").read_text().splitlines() == lines
    assert [r["final_accuracy"] for r in again] == [r["final_accuracy"] for r in records]


def _record(name, kind, seed, to80, accuracy, budget=1000):
    return {"config": name, "kind": kind, "seed": seed, "settings": {"lr": 0.05}, "budget": budget, "eval_every": 100,
            "diverged": False, "steps_to_20": 100, "steps_to_80": to80, "final_accuracy": accuracy,
            "mean_scales": {"fc1": 1.0}, "seconds": 1.0}


def test_summarise_picks_the_best_control_and_tests_against_it():
    """Control A reaches 80% at 500 on every seed, B is censored; the steered run is 100 steps
    faster than A on all 10 seeds: exact Wilcoxon p = 2/2¹⁰, Holm over the one steered config."""
    records = []
    for seed in range(10):
        records.append(_record("A", "control", seed, 500, 0.90))
        records.append(_record("B", "control", seed, None, 0.10))
        records.append(_record("S", "steered", seed, 400, 0.91))
    summary = summarise(records)
    assert summary["best_control"] == "A"
    test = summary["tests"]["S"]
    assert test["median_diff_steps_to_80"] == -100
    assert test["wilcoxon_p_steps_to_80"] == pytest.approx(2 / 2**10)
    assert test["holm_p_steps_to_80"] == pytest.approx(2 / 2**10)
    assert test["mean_diff_final_accuracy"] == pytest.approx(0.01)
    assert summary["table"]["B"]["median_steps_to_80"] == math.inf
    assert summary["pareto"]["S"]["dominates_every_control"]
    # A censored steered run counts one evaluation past the budget, behind every run that got there.
    records = [_record("A", "control", s, 500, 0.9) for s in range(10)] + \
              [_record("S", "steered", s, None, 0.9) for s in range(10)]
    assert summarise(records)["tests"]["S"]["median_diff_steps_to_80"] == 1100 - 500
    assert not summarise(records)["pareto"]["S"]["dominates_every_control"]


def test_signed_rank_p_is_exact_with_ties_and_matches_scipy_without():
    """All 10 differences alike (tied): only the two all-same-sign flips are as extreme, p = 2/2¹⁰.
    Without ties it equals scipy's exact test."""
    from scipy import stats

    assert signed_rank_p([-100] * 10) == pytest.approx(2 / 2**10)
    assert signed_rank_p([0, 0, 0]) == 1.0
    untied = [-1.0, -2, -3, -4, -5, -6, -7, -8, 9, -10]
    assert signed_rank_p(untied) == pytest.approx(stats.wilcoxon(untied, method="exact").pvalue)
    # Ties: |d| = 1, 1, 2 get mid-ranks 1.5, 1.5, 3; of the 8 sign flips, 2 are as extreme as all negative.
    assert signed_rank_p([-1, -1, -2]) == pytest.approx(2 / 8)


def test_make_cells_rejects_unknown_configurations():
    with pytest.raises(ValueError, match="Invalid configuration"):
        make_cells(SteerConfig(configs=["sgd-x3"]))
    cells = make_cells(SteerConfig(configs=["sgd-x1"], seeds=2, first_seed=100))
    assert [c["id"] for c in cells] == ["sgd-x1/s100", "sgd-x1/s101"]
    json.dumps(cells)  # plain data


def test_schedules_expand_and_replays_take_the_own_the_next_or_the_mean_of_the_others():
    assert steer.expand_schedule([[2.0, 3], [1.0, 2]], 7).tolist() == [2, 2, 2, 1, 1, 1, 1]  # ended early: last kept
    assert steer.expand_schedule([[2.0, 3], [1.0, 2]], 4).tolist() == [2, 2, 2, 1]
    steered = {s: {"schedule": {"fc1": [[float(s + 1), 4]]}} for s in (0, 1, 2)}
    assert steer.replay_schedule("own", 1, steered, 4)["fc1"].tolist() == [2.0] * 4
    assert steer.replay_schedule("other", 2, steered, 4)["fc1"].tolist() == [1.0] * 4  # cyclic: 2 → 0
    assert steer.replay_schedule("mean", 0, steered, 4)["fc1"].tolist() == [2.5] * 4  # mean of seeds 1 and 2
    with pytest.raises(ValueError, match="at least two seeds"):
        steer.replay_schedule("mean", 0, {0: steered[0]}, 4)
    with pytest.raises(ValueError, match="Invalid replay"):
        steer.replay_schedule("shuffled", 0, steered, 4)


def test_replays_follow_the_closed_loops_schedule_and_need_its_runs(tmp_path):
    # A wide spread target, so that the policy moves the scales within the tiny run's 60 steps.
    config = _tiny(["topo-collapse", "replay-own", "replay-other", "replay-mean"], collapse_strength=3.0,
                   collapse_spread=1.5)
    records, summary = steer.run_study(config, tmp_path, progress=False)
    by_id = {f"{r['config']}/s{r['seed']}": r for r in records}
    for seed in (0, 1):
        closed = by_id[f"topo-collapse/s{seed}"]
        runs = closed["schedule"]["fc1"]
        assert sum(count for _, count in runs) == closed["steps_run"]
        assert len({scale for scale, _ in runs}) > 1  # the policy moved the scale on the tiny init's drift
        own = by_id[f"replay-own/s{seed}"]
        assert own["mean_scales"] == pytest.approx(closed["mean_scales"], rel=1e-12)
        # Scaling SGD's lr or its update is the same step up to rounding: the curves agree.
        for a, b in zip(own["curve"], closed["curve"]):
            assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.02)
        assert by_id[f"replay-other/s{seed}"]["mean_scales"] == pytest.approx(
            by_id[f"topo-collapse/s{1 - seed}"]["mean_scales"], rel=1e-12)
    assert set(summary["collapse_vs_replays"]) == {"replay-own", "replay-other", "replay-mean"}
    assert "holm_p_steps_to_80" in summary["collapse_vs_replays"]["replay-mean"]
    assert "replay-other" in steer.comparison_lines(summary)
    with pytest.raises(ValueError, match="add topo-collapse"):
        steer.run_study(_tiny(["replay-own"]), tmp_path / "alone", progress=False)


def test_a_replay_sets_each_layers_lr_from_the_schedule_step_by_step():
    layers = {"fc1": torch.nn.Linear(2, 2), "fc2": torch.nn.Linear(2, 2)}
    optimizer = torch.optim.SGD([{"params": [m.weight]} for m in layers.values()], lr=0.1)
    schedule = {"fc1": np.array([1.0, 2.0, 3.0]), "fc2": np.array([0.5, 0.25, 0.0])}
    replay = steer._Replay(optimizer, list(layers), 0.1, schedule)

    class State:
        step = 2  # the step in progress, 1-based: the schedule's second entry

    replay.before_step(State())
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.2), pytest.approx(0.025)]


def test_a_replayed_schedule_is_what_trains_the_network():
    """A replay of an all-zero schedule never moves the weights: the accuracy stays where it began
    (a replay that ignored its schedule would train at the steered lr)."""
    config = _tiny(["replay-own"], steps=60, steered_lr_mult=64.0)
    cell = make_cells(config)[0]
    frozen = run_cell(cell, schedule={name: np.zeros(60) for name in ("fc1", "fc2", "fc3")})
    assert len({row["accuracy"] for row in frozen["curve"]}) == 1
    moving = run_cell(cell, schedule={name: np.ones(60) for name in ("fc1", "fc2", "fc3")})
    assert len({row["accuracy"] for row in moving["curve"]}) > 1


def test_topo_collapse_runs_recorded_without_their_schedule_run_again_for_the_replays(tmp_path, capsys):
    config = _tiny(["topo-collapse", "topo-collapse-matched"], seeds=2, collapse_spread=1.5)
    steer.run_study(config, tmp_path, progress=False)
    path = tmp_path / "runs.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.pop("schedule", None)  # as a results file made before the replays existed
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    replays = _tiny(["topo-collapse", "topo-collapse-matched", "replay-mean"], seeds=2, collapse_spread=1.5)
    again, summary = steer.run_study(replays, tmp_path, progress=False)
    assert "recorded without its schedule" in capsys.readouterr().out
    assert all("schedule" in r for r in again if r["config"] == "topo-collapse")
    assert "replay-mean" in summary["collapse_vs_replays"]
