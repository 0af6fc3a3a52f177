"""Each metric of `topoopt.METRIC_SPECS` with its slope, in float64 numpy on the host.

The slope is the gradient of the metric with respect to each bar, as the torch functions of
`topoopt.metrics` give it through autograd (their guards included: 0 at a zero bar where the
torch version's where-guards give 0, the longest bars sharing `max`'s gradient evenly). The
one-node penalty (`topoopt.penalty_node`) and the entropies' CPU node use them: a few numpy
calls on ~100 numbers instead of ~15 torch operations and their autograd nodes. Tests check
values and slopes against the torch functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from topoopt import _native

__all__ = ["HOST_METRICS", "METRIC_CODES", "metric_and_slope", "entropy_and_slope", "entropy_parts", "EntropyParts"]


def entropy_and_slope(bars: np.ndarray, normalization: str | None) -> tuple[float, np.ndarray]:
    """Persistent entropy, raw (None) or divided by log count or log total, and its slope.

    With L = Σl, pᵢ = lᵢ/L over the positive bars and E = −Σ pᵢ log pᵢ:
    ∂E/∂lᵢ = −(log pᵢ + E)/L for a positive bar and (1 − E)/L for a zero one (through L only,
    as the torch version's where-guards give); all 0 when L = 0. Divided by log n (count) the
    slope is scaled by 1/log n; divided by log L (total) it gains −E/(L·log²L) per bar.
    """
    parts = entropy_parts(bars, normalization)
    return parts.value, parts.slope(bars)


class EntropyParts:
    """What the entropy's value and, later and only when asked, its slope are made of."""

    __slots__ = ("positive", "total", "entropy", "scale", "shift")

    def __init__(self, positive: np.ndarray, total: float, entropy: float, scale: float, shift: float):
        self.positive, self.total, self.entropy, self.scale, self.shift = positive, total, entropy, scale, shift

    @property
    def value(self) -> float:
        return self.scale * self.entropy

    def slope(self, bars: np.ndarray) -> np.ndarray:
        slope = np.zeros_like(bars)
        if self.total > 0:
            total, entropy, scale, shift = self.total, self.entropy, self.scale, self.shift
            slope[:] = scale * (1.0 - entropy) / total + shift
            slope[self.positive] = scale * -(np.log(bars[self.positive] / total) + entropy) / total + shift
        return slope


def entropy_parts(bars: np.ndarray, normalization: str | None) -> EntropyParts:
    """`entropy_and_slope` in two halves: the value now, the slope on demand."""
    positive = bars > 0
    count, total = int(positive.sum()), float(bars.sum())
    entropy = 0.0
    if total > 0:
        p = bars[positive] / total
        entropy = float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: one bar gives 0, not −0 (as the engine)
    scale, shift = 1.0, 0.0  # value = scale·E; slope = scale·∂E/∂l + shift
    if normalization == "count":
        scale = 1.0 / math.log(count) if count > 1 else 0.0
    elif normalization == "total":
        denominator = math.log(total) if total > 0 else 0.0
        valid = count > 0 and denominator != 0
        scale = 1.0 / denominator if valid else 0.0
        shift = -entropy / (total * denominator**2) if valid else 0.0
    return EntropyParts(positive, total, entropy, scale, shift)


def _mean_and_slope(bars: np.ndarray) -> tuple[float, np.ndarray]:
    if bars.size == 0:
        return 0.0, bars.copy()
    return float(bars.mean()), np.full_like(bars, 1.0 / bars.size)


def _total_and_slope(bars: np.ndarray) -> tuple[float, np.ndarray]:
    return float(bars.sum()), np.ones_like(bars)


def _max_and_slope(bars: np.ndarray) -> tuple[float, np.ndarray]:
    if bars.size == 0:
        return 0.0, bars.copy()
    longest = bars.max()
    ties = bars == longest
    return float(longest), ties / ties.sum()


# The compiled engine's codes for them (`engine.metric_slope`; code 2, entropy / log total, is
# `normalized_persistent_entropy(normalization="total")`, which no registered name uses).
METRIC_CODES: dict[str, int] = {
    "entropy": 0,
    "normalized_entropy": 1,
    "mean_lifetime": 3,
    "total_persistence": 4,
    "max_lifetime": 5,
}


def metric_and_slope(name: str, bars: np.ndarray, slope: bool = True) -> tuple[float, np.ndarray | None]:
    """`HOST_METRICS[name]` of `bars` (taken as float64), in one compiled call when the engine
    is built; the slope only when asked for (else None)."""
    bars = np.ascontiguousarray(bars, dtype=np.float64)  # the engine reads float64 only
    if _native.engine is not None:
        out = np.empty_like(bars) if slope else np.empty(0)
        return _native.engine.metric_slope(bars, METRIC_CODES[name], out), out if slope else None
    value, gradient = HOST_METRICS[name](bars)
    return value, gradient if slope else None


# Name (a key of METRIC_SPECS) → bars (float64, non-negative, any order) → (value, slope).
HOST_METRICS: dict[str, Callable[[np.ndarray], tuple[float, np.ndarray]]] = {
    "normalized_entropy": lambda bars: entropy_and_slope(bars, "count"),
    "entropy": lambda bars: entropy_and_slope(bars, None),
    "mean_lifetime": _mean_and_slope,
    "total_persistence": _total_and_slope,
    "max_lifetime": _max_and_slope,
}
