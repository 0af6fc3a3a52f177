"""Detectors of the failure suite, the rule that says when a failure is evident, and the tally.

Every signal gets the same detector: an envelope of the healthy twin's pilot runs at each check (in
log10, values below 1e-12 read as 1e-12), widened by a margin chosen on those pilots alone (the
smallest of `MARGINS` at which no pilot, left out of the envelope, leaves it). A run's detector
fires at the first check where any layer's value leaves its envelope (or is not finite). Two
detectors need no reference runs: topoopt's alerts with their defaults (`AlertWatch`), and the loss
divergence rule (the probe loss non-finite or above 1.5 × its first value).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["MARGINS", "TOPOLOGY", "STANDARD", "DETECTORS", "Envelope", "calibrate", "alarms", "evident_step",
           "detection_step", "episodes", "twin_median_accuracy"]

MARGINS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)
FLOOR = 1e-12
DIVERGENCE = 1.5
EVIDENT_GAP = 0.05
EVIDENT_CHECKS = 5

TOPOLOGY = ("topoopt-alerts", "spread", "entropy_deficit")
STANDARD = ("loss-divergence", "loss", "grad_norm", "update_ratio", "dead_fraction", "weight_norm",
            "neural_persistence")
DETECTORS = TOPOLOGY + STANDARD
ENVELOPED = tuple(d for d in DETECTORS if d not in ("topoopt-alerts", "loss-divergence"))


def _logged(values: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """log10 of a series (floored), and where it is missing (None: no value at that check)."""
    missing = np.array([v is None for v in values])
    raw = np.array([np.nan if v is None else v for v in values], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        logged = np.log10(np.maximum(raw, FLOOR))
    logged[np.isnan(raw) & ~missing] = np.nan  # a non-finite value stays non-finite
    return logged, missing


class Envelope:
    """The healthy range of one signal, per layer and check, from reference runs."""

    def __init__(self, signal: str, references: Sequence[dict], margin: float = 0.0) -> None:
        self.signal, self.margin = signal, margin
        self.low, self.high = {}, {}
        for layer in references[0]["signals"][signal]:
            stacked = np.array([_logged(r["signals"][signal][layer])[0] for r in references])
            # a column no reference has (update ratios at step 0) is all NaN, which numpy warns of
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self.low[layer] = np.nanmin(stacked, axis=0)
                self.high[layer] = np.nanmax(stacked, axis=0)

    def outside(self, record: dict, margin: float | None = None) -> np.ndarray:
        """At each check: does any layer's value leave the envelope (or is it non-finite)?"""
        margin = self.margin if margin is None else margin
        flags = np.zeros(len(record["steps"]), dtype=bool)
        if margin == math.inf:  # a signal no margin could calibrate never fires, not even on NaN
            return flags
        for layer, values in record["signals"][self.signal].items():
            logged, missing = _logged(values)
            low, high = self.low[layer], self.high[layer]
            known = np.isfinite(low) & np.isfinite(high) & ~missing
            with np.errstate(invalid="ignore"):
                flags |= known & (~np.isfinite(logged) | (logged < low - margin) | (logged > high + margin))
        return flags


def calibrate(signal: str, pilots: Sequence[dict]) -> Envelope:
    """The envelope of all `pilots` with the smallest margin at which no pilot, left out of the
    envelope of the others, leaves it; margin inf (never fires) when none of `MARGINS` does."""
    if len(pilots) < 2:
        raise ValueError(f"Calibrating {signal!r} needs at least two pilot runs, got {len(pilots)}")
    for margin in MARGINS:
        if not any(
                Envelope(signal, [p for j, p in enumerate(pilots) if j != i]).outside(pilot, margin).any()
                for i, pilot in enumerate(pilots)):
            return Envelope(signal, pilots, margin)
    return Envelope(signal, pilots, math.inf)


def alarms(detector: str, record: dict, envelopes: dict[str, Envelope]) -> np.ndarray:
    """Where `detector` alarms on `record`, check by check."""
    steps = record["steps"]
    if detector == "topoopt-alerts":
        flags = np.zeros(len(steps), dtype=bool)
        for alert in record["alerts"]:
            flags[steps.index(alert["step"])] = True
        return flags
    if detector == "loss-divergence":
        loss = np.array(record["signals"]["loss"]["model"], dtype=float)
        with np.errstate(invalid="ignore"):
            return ~np.isfinite(loss) | (loss > DIVERGENCE * loss[0])
    if detector not in envelopes:
        raise ValueError(f"Unknown detector {detector!r}")
    if detector not in record["signals"]:  # no such units in this model (no activation to watch)
        return np.zeros(len(steps), dtype=bool)
    return envelopes[detector].outside(record)


def detection_step(flags: np.ndarray, steps: Sequence[int]) -> int | None:
    hits = np.flatnonzero(flags)
    return int(steps[hits[0]]) if len(hits) else None


def episodes(flags: np.ndarray) -> int:
    """Alarms counted as episodes: maximal runs of consecutive alarming checks."""
    return int(flags[0]) + int(np.sum(flags[1:] & ~flags[:-1])) if len(flags) else 0


def twin_median_accuracy(pilots: Sequence[dict]) -> np.ndarray:
    return np.median(np.array([p["test_accuracy"] for p in pilots]), axis=0)


def evident_step(record: dict, twin_accuracy: np.ndarray, memorising: bool) -> int | None:
    """The first check from which the failure shows on the test set for `EVIDENT_CHECKS` checks in a
    row: accuracy `EVIDENT_GAP` below the twin's pilot median at the same checks, or, for a failure
    by memorising (`memorising`), below the run's own best accuracy so far."""
    accuracy = np.array(record["test_accuracy"], dtype=float)
    reference = np.maximum.accumulate(accuracy) if memorising else twin_accuracy
    below = accuracy <= reference - EVIDENT_GAP
    for start in range(len(below) - EVIDENT_CHECKS + 1):
        if below[start:start + EVIDENT_CHECKS].all():
            return int(record["steps"][start])
    return None
