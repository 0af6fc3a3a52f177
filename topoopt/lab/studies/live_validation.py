"""Validation of live topology: do the branching events that `TopologyMonitor` detects
while training runs agree with the learning graph's events found after training, and do they
come before or after the jumps in test accuracy?

It reads the tree runs of `topoopt learning-graphs` (each run folder's ``summary.json``: the
offline Mapper events, and the online events that the live monitor logged every
``groups_every`` steps at each gap ratio of `learning_graphs.LIVE_RATIOS`, and at the absolute
scale of the layer's Mapper clustering, marked as ratio 0; ``nines.json``: test
accuracy at every snapshot).

Matching. Per run, layer and ratio, online events (at the step they were confirmed, which is
when a user sees them) and offline events (the mean step of the node that splits) are paired
one to one, closest pairs first, when they lie within ``window`` steps: matched pairs; offline
events left over are *missed*, online events left over are *false*.

Accuracy jumps are rises of more than ``jump`` in test accuracy between consecutive snapshots;
for each, the lag of the nearest online event of any layer (event step − jump step: negative
means the event came first), and per run and layer the first online event's step minus the first
jump's.

Chance. A detector that fires often matches anything. Each count is also computed with the run's
online events shifted in time by a uniform random offset (circularly over the run; ``shuffles``
offsets, seeded): "matched by chance" and "jumps with an event within the window by chance" are
the means over the offsets. That baseline is easy to beat when every event sits near the accuracy
rise, so two harder ones sit beside it: "local chance", each run's events shifted by a uniform
offset within ±``local`` steps (not circularly), and the trivial detector that reads only the test
accuracy curve and fires at every accuracy jump, matched against the same offline events.

    python -m topoopt.lab.studies.live_validation experiments/results/learning_graphs/full
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from topoopt.lab.studies.options import command_parser

__all__ = ["match_events", "accuracy_jumps", "validate"]


def match_events(online: list[float], offline: list[float], window: float) -> tuple[int, int, int]:
    """(matched, missed, false): closest pairs first, one to one, within ±`window` steps."""
    pairs = sorted((abs(a - b), i, j) for i, a in enumerate(online) for j, b in enumerate(offline)
                   if abs(a - b) <= window)
    used_online, used_offline = set(), set()
    for _, i, j in pairs:
        if i not in used_online and j not in used_offline:
            used_online.add(i)
            used_offline.add(j)
    matched = len(used_online)
    return matched, len(offline) - matched, len(online) - matched


def accuracy_jumps(curve: list[tuple[int, float]], jump: float) -> list[int]:
    """Steps at which test accuracy rose by more than `jump` since the previous evaluation."""
    return [int(b[0]) for a, b in zip(curve, curve[1:]) if b[1] - a[1] > jump]


def validate(folder: Path, window: float = 300, jump: float = 0.05, shuffles: int = 200,
             local: float = 500) -> dict:
    """Per ratio: matched/missed/false per layer and ε, and the event–jump lags (module docstring)."""
    runs = []
    for summary_path in sorted(folder.glob("tree_*/summary.json")):
        summary = json.loads(summary_path.read_text())
        if summary["config"].get("steer", "none") != "none" or summary.get("online_events") is None:
            continue
        if summary["config"]["epsilon"] == 0:
            continue
        curve = [(n["step"], n["accuracy"]) for n in json.loads((summary_path.parent / "nines.json").read_text())]
        runs.append((summary, curve))
    from topoopt.lab.studies.learning_graphs import LIVE_RATIOS, MAPPER_EPS

    ratios = sorted({e["ratio"] for summary, _ in runs for e in summary["online_events"]} | {*LIVE_RATIOS, MAPPER_EPS})
    report: dict = {"window": window, "jump": jump, "local": local, "runs": [s["config"] for s, _ in runs],
                    "ratios": {}}
    rng = np.random.default_rng(0)
    local_rng = np.random.default_rng(1)  # its own stream: the circular shifts stay those published
    for ratio in ratios:
        rows, lags, jumps_seen, chance_hits, first_lags = [], [], 0, 0.0, []
        for summary, curve in runs:
            total = float(summary["training"]["steps"])
            shifts = rng.uniform(0, total, size=shuffles)
            nearby = local_rng.uniform(-local, local, size=shuffles)
            online_all = [e for e in summary["online_events"] if e.get("ratio", 4.0) == ratio]
            jumps = accuracy_jumps(curve, jump)
            for layer, offline_events in summary["events"].items():
                online = [e["step"] for e in online_all if e["layer"] == layer]
                offline = summary["layers"][layer].get("event_steps") or [e["step"] for e in offline_events]
                matched, missed, false = match_events(online, offline, window)
                chance = np.mean([match_events([(t + shift) % total for t in online], offline, window)[0]
                                  for shift in shifts]) if online and offline else 0.0
                near = np.mean([match_events([t + shift for t in online], offline, window)[0]
                                for shift in nearby]) if online and offline else 0.0
                rows.append({"epsilon": summary["config"]["epsilon"], "seed": summary["config"]["seed"],
                             "layer": layer, "online": len(online), "offline": len(offline),
                             "matched": matched, "missed": missed, "false": false,
                             "matched_by_chance": float(chance), "matched_by_local_chance": float(near),
                             "accuracy_detector_events": len(jumps),
                             "matched_by_accuracy_detector": match_events(jumps, offline, window)[0]})
                if online and jumps:
                    first_lags.append(float(min(online) - jumps[0]))
            steps = np.array([e["step"] for e in online_all], dtype=float)
            for jump_step in jumps:
                jumps_seen += 1
                if steps.size:
                    lags.append(float(steps[np.argmin(np.abs(steps - jump_step))] - jump_step))
                    shifted = (steps[None, :] + shifts[:, None]) % total
                    chance_hits += float(np.mean(np.abs(shifted - jump_step).min(axis=1) <= window))
        lags_array = np.array(lags)
        report["ratios"][str(ratio)] = {
            "rows": rows,
            "by_layer": _totals(rows, "layer"),
            "by_epsilon": _totals(rows, "epsilon"),
            "jumps": jumps_seen,
            "jumps_with_event_within_window": int((np.abs(lags_array) <= window).sum()) if lags else 0,
            "jumps_with_event_within_window_by_chance": chance_hits,
            "median_first_event_minus_first_jump": float(np.median(first_lags)) if first_lags else None,
            "median_lag": float(np.median(lags_array)) if lags else None,
            "events_before_jump": int((lags_array < 0).sum()) if lags else 0,
            "events_after_jump": int((lags_array > 0).sum()) if lags else 0,
        }
    return report


def _totals(rows: list[dict], key: str) -> dict:
    out: dict = {}
    for row in rows:
        total = out.setdefault(str(row[key]), {"online": 0, "offline": 0, "matched": 0, "missed": 0, "false": 0,
                                               "matched_by_chance": 0.0, "matched_by_local_chance": 0.0,
                                               "accuracy_detector_events": 0, "matched_by_accuracy_detector": 0})
        for field in total:
            total[field] += row[field]
    return out


def markdown(report: dict) -> str:
    lines = [f"Matching window ±{report['window']:g} steps; accuracy jump: a rise of more than "
             f"{100 * report['jump']:g} points between evaluations; {len(report['runs'])} runs.", "",
             f"Local chance: events shifted by a uniform offset within ±{report.get('local', 500):g} steps. The "
             "accuracy-curve detector fires at every accuracy jump and reads nothing else.", "",
             "| detector | layer | offline events | online events | matched | matched by chance | matched by local "
             "chance | accuracy-curve detector: matched (its events) | missed | false | "
             "jumps with an online event of any layer within the window (by chance) | median lag (event − jump) | "
             "median first event − first jump |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ratio, block in report["ratios"].items():
        ratio = "Mapper's eps (absolute)" if float(ratio) == 0 else ratio
        for layer, t in block["by_layer"].items():
            lag = "–" if block["median_lag"] is None else f"{block['median_lag']:+.0f}"
            first = block["median_first_event_minus_first_jump"]
            first = "–" if first is None else f"{first:+.0f}"
            lines.append(f"| {ratio} | {layer} | {t['offline']} | {t['online']} | {t['matched']} | "
                         f"{t['matched_by_chance']:.1f} | {t['matched_by_local_chance']:.1f} | "
                         f"{t['matched_by_accuracy_detector']} ({t['accuracy_detector_events']}) | "
                         f"{t['missed']} | {t['false']} | "
                         f"{block['jumps_with_event_within_window']}/{block['jumps']} "
                         f"({block['jumps_with_event_within_window_by_chance']:.1f}) | {lag} | {first} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser("", __doc__, module="topoopt.lab.studies.live_validation")
    parser.add_argument("folder", help="a learning-graphs output folder, e.g. experiments/results/learning_graphs/full")
    parser.add_argument("--window", type=float, default=300)
    parser.add_argument("--jump", type=float, default=0.05)
    parser.add_argument("--local", type=float, default=500, help="the local chance baseline's largest shift, in steps")
    parser.add_argument("--out", default=None, help="where to write live_validation.json/.md (default: the folder)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    report = validate(folder, args.window, args.jump, local=args.local)
    out = Path(args.out) if args.out else folder
    (out / "live_validation.json").write_text(json.dumps(report, indent=1))
    (out / "live_validation.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
