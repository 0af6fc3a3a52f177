"""Scalar summaries of an H0 diagram, each differentiable with finite gradients.

All functions take the finite H0 deaths of `topoopt.h0_deaths` (births are 0, so a death is a
lifetime). Zero lifetimes, from coinciding neurons, are allowed everywhere: they are left out of
the entropies (a bar of length 0 carries no probability mass) and counted in the mean lifetime
(so the mean moves continuously as coinciding neurons separate). No metric returns NaN, and none
has a NaN or infinite gradient, even for an all-zero layer.

`METRIC_SPECS` is the one registry of metric names used across topoopt (penalties, the optimizer
wrapper, the monitor, the command line): each entry says whether the metric is scale free and
how the optimizer makes it a dimensionless complexity. `METRICS` maps the names to the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from topoopt._validation import check_choice, check_instance, check_number, functorch_active
from topoopt.host_metrics import METRIC_CODES, entropy_parts, metric_and_slope

__all__ = [
    "persistent_entropy",
    "normalized_persistent_entropy",
    "mean_lifetime",
    "total_persistence",
    "max_lifetime",
    "METRICS",
    "METRIC_SPECS",
    "COMPLEXITY_METRICS",
    "MetricSpec",
    "metric_spec",
    "get_metric",
    "dimensionless_complexity",
]


def _check_deaths(deaths: torch.Tensor) -> torch.Tensor:
    check_instance("deaths", deaths, torch.Tensor, "a torch.Tensor")
    if deaths.dim() != 1:
        raise ValueError(f"Invalid deaths: a tensor of shape {tuple(deaths.shape)}. It must be a 1-D tensor of "
                         f"lifetimes")
    if deaths.numel():
        negative = deaths.detach().numpy().min() < 0 if _on_host(deaths) else bool((deaths < 0).any())
        if negative:
            raise ValueError("Invalid deaths: a negative value. They must be non-negative lifetimes (H0 bars are "
                             "born at 0)")
    return deaths


def _on_host(deaths: torch.Tensor) -> bool:
    """Whether the entropies take `_HostEntropy` (a CPU float32/float64 diagram): one node in
    float64 numpy instead of ~15 torch operations on ~100 numbers (99 bars, 1 thread: forward
    + backward 140 against 271 µs, a forward without a graph 37 against 89 µs). The torch version below stays
    for other devices and dtypes and under torch.func; tests check that the two agree, values
    and gradients (except where the "total" normalization is ill-conditioned, Σl near 1: log Σl
    → 0 there, and float32 and float64 sums can give arbitrarily different values)."""
    return deaths.device.type == "cpu" and deaths.dtype in (torch.float32, torch.float64) and not functorch_active()


def _entropy(deaths: torch.Tensor, normalization: str | None) -> torch.Tensor:
    """Persistent entropy, raw (None) or divided by log count or log total; checked deaths."""
    if _on_host(deaths):
        return _HostEntropy.apply(deaths, normalization)
    return _torch_entropy(deaths, normalization)


def _torch_entropy(deaths: torch.Tensor, normalization: str | None) -> torch.Tensor:
    entropy, count = _entropy_and_count(deaths)
    if normalization is None:
        return entropy
    if normalization == "count":
        denominator = torch.log(count.to(deaths.dtype))
        valid = count > 1
    else:
        total = deaths.sum()  # guarded: log 0 would make the all-zero diagram's gradient NaN
        denominator = torch.log(torch.where(total > 0, total, torch.ones_like(total)))
        valid = (count > 0) & (denominator != 0)
    safe_denominator = torch.where(valid, denominator, torch.ones_like(denominator))
    return torch.where(valid, entropy / safe_denominator, torch.zeros_like(entropy))


class _HostEntropy(torch.autograd.Function):
    """`_entropy` of a CPU diagram as one autograd node, in float64 numpy
    (`topoopt.host_metrics.entropy_and_slope` says how the slope is found).

    Under ``create_graph=True`` the backward is the torch version's, differentiable again, so
    second derivatives (Hessians) are exact.
    """

    @staticmethod
    def forward(ctx, deaths: torch.Tensor, normalization: str | None) -> torch.Tensor:
        bars = deaths.detach().numpy().astype(np.float64)
        parts = entropy_parts(bars, normalization)
        ctx.stash = (bars, parts)
        ctx.normalization = normalization
        ctx.save_for_backward(deaths)
        return deaths.new_tensor(parts.value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable again
            (deaths,) = ctx.saved_tensors
            with torch.enable_grad():
                value = _torch_entropy(deaths, ctx.normalization)
                (result,) = torch.autograd.grad(value, deaths, grad, create_graph=True)
            return result, None
        bars, parts = ctx.stash
        return torch.from_numpy(parts.slope(bars) * float(grad)).to(grad.dtype), None


def _entropy_and_count(deaths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positive = deaths > 0
    count = positive.sum()
    total = deaths.sum()
    # Where-guards keep both the value and the gradient finite: at l = 0, p·log p → 0.
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    p = torch.where(positive, deaths / safe_total, torch.ones_like(deaths))
    entropy = -(p * torch.log(p)).sum()
    return entropy, count


def persistent_entropy(deaths: torch.Tensor) -> torch.Tensor:
    """Persistent entropy E = −Σ pᵢ log pᵢ, pᵢ = lᵢ / Σl over the positive lifetimes.

    Rucco et al. (2016) "Characterisation of the idiotypic immune network through persistent
    entropy". 0 for an empty diagram or one with a single positive bar.

    Parameters
    ----------
    deaths : torch.Tensor
        1-D tensor of H0 lifetimes (deaths; births are 0), e.g. from `topoopt.h0_deaths`;
        zero lifetimes allowed, any order.

    Returns
    -------
    torch.Tensor
        A scalar, differentiable, finite; in [0, log n] for n positive bars. Scale free.
    """
    return _entropy(_check_deaths(deaths), None)


def normalized_persistent_entropy(
    deaths: torch.Tensor, normalization: Literal["count", "total"] = "count"
) -> torch.Tensor:
    """Persistent entropy divided by its maximum, a complexity score of the neuron cloud.

    `normalization="count"` (default): E / log n, n the number of positive lifetimes, in [0, 1];
    1 when all bars are equal (neurons evenly spread), near 0 when one gap dominates (clustered
    neurons). 0 when n ≤ 1. It is invariant to the scale of the weights.

    `normalization="total"`: E / log Σl, as giotto-tda's `PersistenceEntropy(normalize=True)`.
    Not the default: it changes when the weights are rescaled, and it is negative or unbounded
    when Σl < 1 (log Σl ≤ 0), which is common for small weights. 0 where Σl = 1.

    Parameters
    ----------
    deaths : torch.Tensor
        1-D tensor of H0 lifetimes (deaths; births are 0), e.g. from `topoopt.h0_deaths`;
        zero lifetimes allowed, any order.
    normalization : {"count", "total"}
        The denominator: log of the number of positive bars, or log of their total.

    Returns
    -------
    torch.Tensor
        A scalar, differentiable, with finite gradients even for an all-zero diagram.
    """
    check_choice("normalization", normalization, ("count", "total"))
    return _entropy(_check_deaths(deaths), normalization)


def mean_lifetime(deaths: torch.Tensor) -> torch.Tensor:
    """Mean H0 lifetime over all N−1 bars, zero-length ones included; 0 for an empty diagram.

    Equals the total length of the minimum spanning tree over N−1: the typical gap between a
    neuron and its nearest group. It scales with the weights, so read it beside ‖W‖.

    Parameters
    ----------
    deaths : torch.Tensor
        1-D tensor of H0 lifetimes (deaths; births are 0), e.g. from `topoopt.h0_deaths`;
        zero lifetimes allowed, any order.

    Returns
    -------
    torch.Tensor
        A scalar, differentiable (each bar's gradient is 1 / (N−1)).
    """
    deaths = _check_deaths(deaths)
    if deaths.numel() == 0:
        return deaths.sum()
    return deaths.mean()


def total_persistence(deaths: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """Σ lᵢᵖ over all bars (p > 0); for p = 1 the length of the minimum spanning tree.

    Parameters
    ----------
    deaths : torch.Tensor
        1-D tensor of H0 lifetimes (deaths; births are 0), e.g. from `topoopt.h0_deaths`;
        zero lifetimes allowed, any order.
    p : float
        The exponent, finite and > 0. For p < 1 zero bars are left out of the gradient (lᵖ has
        an infinite slope at 0).

    Returns
    -------
    torch.Tensor
        A scalar, differentiable.
    """
    deaths = _check_deaths(deaths)
    check_number("exponent p", p, low=0.0, low_open=True)
    if p >= 1:
        return deaths.pow(p).sum()
    # lᵖ has an infinite slope at 0 for p < 1: zero bars are left out of the gradient.
    positive = deaths > 0
    safe = torch.where(positive, deaths, torch.ones_like(deaths))
    return torch.where(positive, safe.pow(p), torch.zeros_like(deaths)).sum()


def max_lifetime(deaths: torch.Tensor) -> torch.Tensor:
    """Longest finite H0 bar: the largest gap separating two groups of neurons; 0 when empty.

    Parameters
    ----------
    deaths : torch.Tensor
        1-D tensor of H0 lifetimes (deaths; births are 0), e.g. from `topoopt.h0_deaths`;
        zero lifetimes allowed, any order.

    Returns
    -------
    torch.Tensor
        A scalar; its gradient reaches the longest bar only.
    """
    deaths = _check_deaths(deaths)
    if deaths.numel() == 0:
        return deaths.sum()
    return deaths.max()


@dataclass(frozen=True)
class MetricSpec:
    """What topoopt knows about a metric, in one place for the penalty, optimizer and monitor.

    Attributes
    ----------
    name : str
        The name used by `TopoPenalty`, `TopoOptimizer` and the command line.
    function : callable
        ``function(deaths) -> Tensor``: the metric of a 1-D tensor of H0 deaths.
    scale_free : bool
        Unchanged when every weight is multiplied by c > 0 (else it scales by c).
    complexity : str or None
        How `TopoOptimizer` makes it a dimensionless complexity: ``"as is"`` (already in
        [0, 1]), ``"per rms norm"`` (divided by the layer's RMS neuron norm), ``"per bar and rms
        norm"`` (also by the number of bars), or None (not offered).
    """

    name: str
    function: Callable[[torch.Tensor], torch.Tensor]
    scale_free: bool
    complexity: str | None


METRIC_SPECS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("normalized_entropy", normalized_persistent_entropy, True, "as is"),
        MetricSpec("mean_lifetime", mean_lifetime, False, "per rms norm"),
        MetricSpec("total_persistence", total_persistence, False, "per bar and rms norm"),
        MetricSpec("max_lifetime", max_lifetime, False, "per rms norm"),
        # Scale free, but grows with log(number of bars): not comparable across layers.
        MetricSpec("entropy", persistent_entropy, True, None),
    )
}

METRICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    name: spec.function for name, spec in METRIC_SPECS.items()
}

# The metrics TopoOptimizer can steer by (dimensionless complexities).
COMPLEXITY_METRICS: tuple[str, ...] = tuple(n for n, spec in METRIC_SPECS.items() if spec.complexity)


def metric_spec(name: str) -> MetricSpec:
    """The `MetricSpec` called `name`.

    Parameters
    ----------
    name : str
        A key of `METRIC_SPECS`.

    Returns
    -------
    MetricSpec

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    """
    spec = METRIC_SPECS.get(name) if isinstance(name, str) else None  # per layer and step: a dict look-up
    return spec if spec is not None else METRIC_SPECS[check_choice("metric", name, METRIC_SPECS)]


def get_metric(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The metric function called `name` (``metric_spec(name).function``).

    Parameters
    ----------
    name : str
        A key of `METRIC_SPECS`; an unknown name is a `ValueError` listing the valid ones.

    Returns
    -------
    callable
        ``function(deaths) -> Tensor``, differentiable.
    """
    return metric_spec(name).function


# Metrics whose host value is the torch function's (the entropies are computed in float64 on the
# host either way, the longest bar is exact); the mean and total sum in the deaths' dtype there.
_HOST_EXACT = ("normalized_entropy", "entropy", "max_lifetime")


def dimensionless_complexity(name: str, deaths: torch.Tensor, rms_norm: float) -> float:
    """The metric as `TopoOptimizer` compares it across layers (see `MetricSpec.complexity`).

    Parameters
    ----------
    name : str
        A metric whose `MetricSpec.complexity` is not None (one of `COMPLEXITY_METRICS`).
    deaths : torch.Tensor
        The layer's H0 deaths (e.g. from `topoopt.h0_deaths`).
    rms_norm : float
        The layer's RMS neuron norm, ‖W‖_F / √N.

    Returns
    -------
    float
        Dimensionless: invariant to the scale of the weights; 0 for an all-zero layer.
    """
    _complexity_spec(name)  # the name first, then the deaths, as the errors always came
    return complexity_of_measured(name, _check_deaths(deaths), rms_norm)


def _complexity_spec(name: str) -> MetricSpec:
    spec = metric_spec(name)
    if spec.complexity is None:
        check_choice("complexity metric", name, COMPLEXITY_METRICS)  # raises: a metric, not a complexity
    return spec


def engine_complexity_code(name: str) -> int | None:
    """The compiled engine's code of a complexity metric that `complexity_of_measured` takes as
    the engine gives it (its value as is, computed on the host), else None: a metric value the
    engine measured for a penalty (`TreeCache.known_metric`) is then the complexity itself."""
    spec = _complexity_spec(name)
    return METRIC_CODES[name] if spec.complexity == "as is" and name in _HOST_EXACT else None


def complexity_of_measured(name: str, deaths: torch.Tensor, rms_norm: float) -> float:
    """`dimensionless_complexity` of deaths this package measured (a 1-D tensor of lengths,
    never negative), without checking them again: `TopoOptimizer` asks on each measuring step."""
    spec = _complexity_spec(name)
    if name in _HOST_EXACT and _on_host(deaths):  # the torch function's value, without its ~25 µs
        bars = deaths.detach().numpy()
        value = float(bars.dtype.type(metric_and_slope(name, bars, slope=False)[0]))
    else:
        value = float(spec.function(deaths))
    if spec.complexity == "as is":
        return value
    divisor = rms_norm * (deaths.numel() if spec.complexity == "per bar and rms norm" else 1)
    return value / divisor if divisor > 0 else 0.0
