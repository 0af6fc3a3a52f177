"""Study: does topology show a failing run earlier than the signals practitioners watch?

Ten real training failures (`failure_suite.FAILURES`), each beside its healthy twin, trained on
mnist5k and Fashion-MNIST with MLPs and a small CNN; every detector of `failure_detectors` reads
the same checks of the same runs. Envelopes and margins come from pilot seeds (100–103) of the
healthy twins only; the measured seeds are 0–9. The pre-registration (hypotheses, the family, the
rule that says when a failure is evident, what the design cannot detect) is in
experiments/RESULTS.md ("What topology sees in failing runs").

    topoopt failures --quick     # two failures, 2 pilots and 2 seeds: a minute
    topoopt failures             # the pre-registered study (resumable: re-run to continue)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from topoopt.lab.studies import failure_detectors as fd
from topoopt.lab.studies.failure_suite import (
    BASES,
    CHECK_EVERY,
    FAILURES,
    STEPS,
    WHAT,
    config_of,
    run_one,
    suite_data,
)
from topoopt.lab.studies.options import command_parser, positive_int
from topoopt.lab.studies.statistics import holm
from topoopt.lab.sweep import COMPACT_RESULTS, load_results, restore_from_compact, rounded, run_cells, save_compact

__all__ = ["PILOT_SEEDS", "QUICK_FAILURES", "summarise", "report", "narrative", "main"]

RESULTS = Path("experiments/results/failures")
PILOT_SEEDS = (100, 101, 102, 103)
QUICK_FAILURES = ("symmetric-init", "tiny-init")  # one topology sees at step 0, one it cannot see
GOAL_SEEDS = 0.8   # the goal: topology strictly first on ≥ 80% of the seeds …
GOAL_KINDS = 3     # … of at least this many failure kinds
COSTS = {"topoopt-alerts": "topology", "spread": "topology", "entropy_deficit": "topology",
         "loss-divergence": "probe", "loss": "probe", "grad_norm": "probe", "dead_fraction": "probe",
         "update_ratio": "update_ratio", "weight_norm": "weight_norm", "neural_persistence": "neural_persistence"}

_data_cache: dict = {}


def _run_cell(cell: dict) -> dict:
    name = cell["config"]
    data_name = config_of(name)["data"]
    if data_name not in _data_cache:
        _data_cache[data_name] = suite_data(data_name)
    return rounded(run_one(name, cell["seed"], _data_cache[data_name], cell["steps"]), 5)


def make_cells(failures: tuple[str, ...], seeds: tuple[int, ...], pilots: tuple[int, ...], steps: int) -> list[dict]:
    bases = sorted({FAILURES[f][0] for f in failures}, key=list(BASES).index)
    cells = [{"config": b, "seed": s, "role": "pilot"} for b in bases for s in pilots]
    cells += [{"config": c, "seed": s, "role": "measured"} for c in [*bases, *failures] for s in seeds]
    return [{**c, "steps": steps, "id": f"{c['config']}/{c['seed']}"} for c in cells]


def _composite(detectors: tuple[str, ...], record: dict, envelopes: dict) -> np.ndarray:
    flags = np.zeros(len(record["steps"]), dtype=bool)
    for detector in detectors:
        flags |= fd.alarms(detector, record, envelopes)
    return flags


def _sign_p(wins: int, n: int) -> float:
    """One-sided sign test: P(at least `wins` of `n` under a fair coin); ties count as losses."""
    return float(sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n)


def summarise(records: list[dict], failures: tuple[str, ...], pilots: tuple[int, ...]) -> dict:
    """Envelopes from the pilots, then per failure the detections, lead times and the sign test,
    per healthy base the false alarms, and the cost of each detector."""
    by = {}
    for record in records:
        by.setdefault(record["config"], {})[record["seed"]] = record
    bases = sorted({FAILURES[f][0] for f in failures}, key=list(BASES).index)
    envelopes, margins, twin_accuracy = {}, {}, {}
    for base in bases:
        pilot_runs = [by[base][s] for s in pilots]
        envelopes[base] = {s: fd.calibrate(s, pilot_runs) for s in fd.ENVELOPED}
        margins[base] = {s: envelopes[base][s].margin for s in fd.ENVELOPED}
        twin_accuracy[base] = fd.twin_median_accuracy(pilot_runs)
    groups = {"topoopt": fd.TOPOLOGY, "standard": fd.STANDARD}

    def flags(detector: str, record: dict) -> np.ndarray:
        env = envelopes[config_of(record["config"])["twin"]]
        return _composite(groups[detector], record, env) if detector in groups else fd.alarms(detector, record, env)

    detectors = (*groups, *fd.DETECTORS)
    per_failure, tests = {}, {}
    for failure in failures:
        twin = FAILURES[failure][0]
        runs = [r for s, r in sorted(by[failure].items()) if s not in pilots]
        evident = [fd.evident_step(r, twin_accuracy[twin], memorising=failure == "label-noise") for r in runs]
        rows = {}
        for detector in detectors:
            found = [fd.detection_step(flags(detector, r), r["steps"]) for r in runs]
            leads = [e - d for e, d in zip(evident, found) if e is not None and d is not None]
            rows[detector] = {"steps": found, "detected": sum(d is not None for d in found),
                              "in_time": sum(e is not None and d is not None and d <= e
                                             for e, d in zip(evident, found)),
                              "median_lead": float(np.median(leads)) if leads else None}
        ours, theirs = rows["topoopt"]["steps"], rows["standard"]["steps"]
        inf = math.inf
        wins = sum((a if a is not None else inf) < (b if b is not None else inf) for a, b in zip(ours, theirs))
        ties = sum((a if a is not None else inf) == (b if b is not None else inf) for a, b in zip(ours, theirs))
        tests[failure] = {"wins": wins, "ties": ties, "losses": len(runs) - wins - ties, "n": len(runs),
                          "p": _sign_p(wins, len(runs))}
        per_failure[failure] = {"twin": twin, "evident": evident, "detectors": rows}
    for failure, adjusted in zip(tests, holm([t["p"] for t in tests.values()])):
        tests[failure]["holm_p"] = adjusted

    healthy = {}
    for base in bases:
        runs = [r for s, r in sorted(by[base].items()) if s not in pilots]
        steps = sum(r["steps"][-1] for r in runs)
        healthy[base] = {}
        for d in detectors:
            alarmed = [flags(d, r) for r in runs]  # each run's alarms computed once
            count = sum(fd.episodes(a) for a in alarmed)
            healthy[base][d] = {"episodes": count, "runs_alarmed": sum(bool(a.any()) for a in alarmed),
                                "runs": len(runs), "per_10k_steps": 1e4 * count / max(steps, 1)}
    pooled = {d: float(np.mean([healthy[b][d]["per_10k_steps"] for b in bases])) for d in detectors}
    best_standard = min(fd.STANDARD, key=lambda d: pooled[d])
    caught = sum(row["detectors"][best_standard]["in_time"] for row in per_failure.values())
    runs = sum(len(row["evident"]) for row in per_failure.values())
    kinds = [f for f, t in tests.items() if t["wins"] >= GOAL_SEEDS * t["n"]]
    goal = {"kinds_won": kinds, "topoopt_false_alarms": pooled["topoopt"],
            "best_standard": best_standard, "best_standard_false_alarms": pooled[best_standard],
            "best_standard_caught": [caught, runs],
            "met": len(kinds) >= GOAL_KINDS and pooled["topoopt"] <= pooled[best_standard]}

    measured = [r for r in records if r["seed"] not in pilots]
    train = np.median([r["seconds"]["train"] / max(r["steps"][-1], 1) for r in measured])
    cost = {}
    for detector, part in COSTS.items():
        per_step = np.median([r["seconds"][part] / len(r["steps"]) / CHECK_EVERY for r in measured])
        cost[detector] = {"seconds_per_step": float(per_step), "of_training_step": float(per_step / train)}
    return {"failures": per_failure, "tests": tests, "healthy": healthy, "false_alarms_pooled": pooled,
            "goal": goal, "margins": margins, "cost": cost, "train_seconds_per_step": float(train),
            "seeds": sorted({r["seed"] for r in measured}), "pilots": list(pilots)}


def _steps(value) -> str:
    return "—" if value is None else f"{value:,}"


def report(summary: dict) -> str:
    detectors = ("topoopt", "standard", *fd.DETECTORS)
    lines = ["Detected on n of the seeds before the failure was evident (in time), and the median lead in steps "
             "(evident step − detection step, over runs where both exist):", "",
             "| failure | evident | " + " | ".join(detectors) + " |", "|---|---:|" + "---:|" * len(detectors)]
    for failure, row in summary["failures"].items():
        n = len(row["evident"])
        evident = sum(e is not None for e in row["evident"])
        cells = []
        for d in detectors:
            cell = row["detectors"][d]
            lead = "" if cell["median_lead"] is None else f" ({cell['median_lead']:+,.0f})"
            cells.append(f"{cell['in_time']}/{n}{lead}")
        lines.append(f"| {failure} | {evident}/{n} | " + " | ".join(cells) + " |")
    lines += ["", "Median step at which each detector fired (runs where it fired at all, of n), whether or not the "
              "failure became evident:", "",
              "| failure | " + " | ".join(detectors) + " |", "|---|" + "---:|" * len(detectors)]
    for failure, row in summary["failures"].items():
        cells = []
        for d in detectors:
            fired = [step for step in row["detectors"][d]["steps"] if step is not None]
            cells.append(f"{np.median(fired):,.0f} ({len(fired)}/{len(row['evident'])})" if fired else
                         f"— (0/{len(row['evident'])})")
        lines.append(f"| {failure} | " + " | ".join(cells) + " |")
    lines += ["", "False alarms per 10,000 steps on the healthy twins' measured seeds (runs with any alarm):", "",
              "| healthy run | " + " | ".join(detectors) + " |", "|---|" + "---:|" * len(detectors)]
    for base, row in summary["healthy"].items():
        lines.append(f"| {base} | " + " | ".join(f"{row[d]['per_10k_steps']:.1f} ({row[d]['runs_alarmed']}/"
                                                  f"{row[d]['runs']})" for d in detectors) + " |")
    lines += ["", "Topology first (topoopt's detectors against the earliest standard one), per failure: "
              "wins / ties / losses over seeds, one-sided sign test (ties as losses), Holm:", ""]
    for failure, test in summary["tests"].items():
        lines.append(f"- {failure}: {test['wins']}/{test['ties']}/{test['losses']}, p {test['p']:.3g} "
                     f"(Holm {test['holm_p']:.3g})")
    goal = summary["goal"]
    lines += ["", f"Goal (topology first on ≥ {GOAL_SEEDS:.0%} of seeds for ≥ {GOAL_KINDS} failure kinds, with no more "
              f"false alarms than the best standard detector): kinds {', '.join(goal['kinds_won']) or 'none'}; "
              f"topoopt {goal['topoopt_false_alarms']:.2f} false alarms per 10,000 steps against "
              f"{goal['best_standard']}'s {goal['best_standard_false_alarms']:.2f} (a detector that caught "
              f"{goal['best_standard_caught'][0]} of {goal['best_standard_caught'][1]} failing runs in time: "
              f"few alarms can mean it sees little): {'met' if goal['met'] else 'not met'}",
              "", "Cost per training step (median, as a fraction of the step itself, "
              f"{summary['train_seconds_per_step'] * 1e3:.2f} ms) when measured every {CHECK_EVERY} steps: " +
              ", ".join(f"{d} {c['of_training_step']:.2f}" for d, c in summary["cost"].items())]
    return "\n".join(lines)


def _first(row: dict, detectors: tuple[str, ...], index: int) -> tuple[int | None, str | None]:
    """The earliest step any of `detectors` fired on run `index`, and every one that fired then."""
    steps = {d: row["detectors"][d]["steps"][index] for d in detectors}
    fired = [step for step in steps.values() if step is not None]
    if not fired:
        return None, None
    return min(fired), ", ".join(d for d, step in steps.items() if step == min(fired))


def narrative(summary: dict, record: dict, index: int = 0) -> str:
    """What one failing run showed, in plain words: when the failure became evident, what topoopt
    said and when, what the loss said and when, and the earliest standard detector."""
    failure = record["config"]
    row = summary["failures"][failure]
    evident = row["evident"][index]
    at = lambda step: "never" if step is None else f"at step {step:,}"  # noqa: E731
    lines = [f"{failure} ({WHAT[failure]}), seed {record['seed']}: "
             + (f"evident on the test set at step {evident:,}" if evident is not None else
                f"never evident on the test set within {record['steps'][-1]:,} steps")]
    alerts = record["alerts"]
    if alerts:
        first = min(alerts, key=lambda a: a["step"])
        layers = sorted({a["layer"] for a in alerts if a["step"] == first["step"] and a["kind"] == first["kind"]})
        lines.append(f"  topoopt's alerts: {first['kind']} on {', '.join(layers)} at step {first['step']:,}")
    else:
        lines.append("  topoopt's alerts (defaults): none")
    step, which = _first(row, ("spread", "entropy_deficit"), index)
    lines.append(f"  topoopt's envelopes (spread, entropy deficit): {at(step)}" + (f" ({which})" if which else ""))
    lines.append(f"  the loss: its envelope {at(row['detectors']['loss']['steps'][index])}, the divergence rule "
                 f"{at(row['detectors']['loss-divergence']['steps'][index])}")
    step, which = _first(row, fd.STANDARD, index)
    lines.append(f"  the earliest standard detectors: {which} {at(step)}" if which else
                 "  no standard detector fired")
    return "\n".join(lines)


def plot_failure(record: dict, twin: list[dict], summary_row: dict, seed_index: int, path: Path) -> None:
    """One failing run beside its twin: test accuracy, the probe loss and each layer's spread, with
    the step where topoopt and the earliest standard detector fired and the failure became evident."""
    from topoopt.plotting import new_figure, save_png

    figure = new_figure(figsize=(12, 3.6), layout="constrained")
    axes = figure.subplots(1, 3)
    steps = record["steps"]
    for reference in twin:
        axes[0].plot(steps, reference["test_accuracy"], color="tab:grey", alpha=0.5)
        axes[1].plot(steps, reference["signals"]["loss"]["model"], color="tab:grey", alpha=0.5)
    axes[0].plot(steps, record["test_accuracy"], color="tab:red")
    axes[1].plot(steps, record["signals"]["loss"]["model"], color="tab:red")
    for layer, values in record["signals"]["spread"].items():
        axes[2].plot(steps, [max(v, 1e-12) for v in values], label=layer)
    axes[2].set_yscale("log")
    marks = {"topoopt": ("tab:green", "topoopt"), "standard": ("tab:blue", "earliest standard")}
    for key, (colour, label) in marks.items():
        step = summary_row["detectors"][key]["steps"][seed_index]
        if step is not None:
            for ax in axes:
                ax.axvline(step, color=colour, linestyle="--", label=f"{label} @ {step}" if ax is axes[0] else None)
    evident = summary_row["evident"][seed_index]
    if evident is not None:
        for ax in axes:
            ax.axvline(evident, color="black", linestyle=":", label=f"evident @ {evident}" if ax is axes[0] else None)
    axes[0].set(title=f"{record['config']} (red) and healthy twin (grey)", xlabel="step", ylabel="test accuracy")
    axes[1].set(title="training loss (probe batch)", xlabel="step")
    axes[2].set(title="spread per layer", xlabel="step")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    save_png(figure, path)


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser("failures", __doc__)
    parser.add_argument("--quick", action="store_true",
                        help=f"failures {', '.join(QUICK_FAILURES)}; 2 pilot and 2 measured seeds")
    parser.add_argument("--seeds", type=positive_int, default=10)
    parser.add_argument("--failures", nargs="+", choices=list(FAILURES), default=None,
                        help="which failures (default: all, or the quick two)")
    parser.add_argument("--steps", type=positive_int, default=STEPS)
    parser.add_argument("--out", default=None,
                        help=f"results folder (default {RESULTS}; {RESULTS / 'quick'} with --quick)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--brief", action="store_true",
                        help="print, per failure, what its first seed showed and when, instead of the tables")
    args = parser.parse_args(argv)
    failures = tuple(args.failures or (QUICK_FAILURES if args.quick else FAILURES))
    seeds = tuple(range(2 if args.quick else args.seeds))
    pilots = PILOT_SEEDS[:2] if args.quick else PILOT_SEEDS
    folder = Path(args.out) if args.out else RESULTS / "quick" if args.quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    restore_from_compact(folder / "runs.jsonl", folder / COMPACT_RESULTS)
    cells = make_cells(failures, seeds, pilots, args.steps)
    held = {record["steps"][-1] for record in load_results(folder / "runs.jsonl").values()}
    if held - {args.steps}:
        parser.error(f"{folder} holds runs of {', '.join(map(str, sorted(held)))} steps, not {args.steps}: "
                     f"pass another --out")
    records = run_cells(cells, _run_cell, folder / "runs.jsonl", progress=not args.no_progress, desc="failures")
    save_compact(records, folder / COMPACT_RESULTS)
    summary = summarise(records, failures, pilots)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    text = report(summary)
    (folder / "table.md").write_text(text + "\n")
    by = {(r["config"], r["seed"]): r for r in records}
    for failure in failures:
        twin = FAILURES[failure][0]
        plot_failure(by[(failure, seeds[0])], [by[(twin, s)] for s in pilots], summary["failures"][failure], 0,
                     folder / f"{failure}.png")
    print(text if not args.brief else "\n".join(narrative(summary, by[(f, seeds[0])]) for f in failures))
    print(f"results in {folder}")
    return summary


if __name__ == "__main__":
    main()
