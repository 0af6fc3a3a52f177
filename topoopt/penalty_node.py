"""`TopoPenalty`'s term for CPU layers as one autograd node, its gradient found in the forward.

Built the usual way, a penalty over three small layers is ~15 autograd nodes (edge lengths,
metric, term, sums) whose fixed costs were most of its time: on 784-100-100-10, 0.7–1.0 ms
forward and backward for ~0.1 ms of arithmetic (measured with the trees given). Here each layer
costs two compiled calls: one measures its tree's edges and gives their metric and its slope
(`engine.measure_metric`, the formulas of `topoopt.host_metrics`), one scatters the slope onto
the neurons; the node's backward hands those gradients over, times the incoming one. The penalty's
gradient is needed on every call that builds a graph (the loss's backward follows), so nothing
is computed in vain.

The values are those of the per-layer graph: the deaths are rounded to the cloud's dtype before
the metric, and the metric after it, as there. The sums differ in order, and the mean lifetime
and total persistence are summed in float64 where the graph sums in the cloud's dtype (tests:
float32 rtol 1e-5, float64 1e-12).
Under ``create_graph=True`` the backward recomputes the per-layer graph and differentiates it, so
higher derivatives are those of `topoopt.TopoPenalty`'s general path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.autograd import forward_ad

from topoopt import _native
from topoopt._validation import functorch_active
from topoopt.host_metrics import HOST_METRICS, METRIC_CODES
from topoopt.persistence import NO_ORDER, NUMPY_DTYPES, edge_lengths, int64_index, native_edges_handle

__all__ = ["handles", "LayerTerm", "one_node_penalty"]


def handles(clouds: Sequence[torch.Tensor], metric: str) -> bool:
    """Whether the one node computes this penalty: there are clouds, the compiled engine
    measures every one (CPU, float32/float64, small enough for one thread), the metric has a
    host slope, and neither a torch.func transform nor forward-mode AD is active (they need the
    per-layer graph)."""
    forward_ad_active = getattr(forward_ad, "_current_level", -1) >= 0  # dual tensors: no tangent here
    return (bool(clouds) and metric in HOST_METRICS and not functorch_active() and not forward_ad_active
            and all(native_edges_handle(cloud) for cloud in clouds))


@dataclass(frozen=True)
class LayerTerm:
    """One layer's share of the penalty: coefficient × (±metric, or (metric − target)²)."""

    coefficient: float
    sign: float = 1.0  # −1 to maximise
    target: float | None = None

    def value_and_derivative(self, metric: float) -> tuple[float, float]:
        if self.target is not None:
            gap = metric - self.target
            return self.coefficient * gap * gap, self.coefficient * 2.0 * gap
        return self.coefficient * self.sign * metric, self.coefficient * self.sign

    def of_tensor(self, metric: torch.Tensor) -> torch.Tensor:
        if self.target is not None:
            return self.coefficient * (metric - self.target) ** 2
        return self.coefficient * (self.sign * metric)


@dataclass
class _Measured:
    cloud: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    deaths: np.ndarray  # in tree order, in the cloud's dtype
    metric: float
    gradient: torch.Tensor | None  # of this layer's term with respect to its cloud


def one_node_penalty(
    clouds: Mapping[str, torch.Tensor],
    edges: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    metric: str,
    terms: Mapping[str, LayerTerm],
    torch_metric: Callable[[torch.Tensor], torch.Tensor],
    last_values: dict[str, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The penalty Σ term(metric(deaths)) over the named clouds, measured along `edges`.

    Returns the total (a scalar tensor of the clouds' promoted dtype, float32 at least, with one
    autograd node when a cloud requires grad) and each layer's deaths in tree order (detached,
    the cloud's dtype); each layer's metric goes into `last_values` as it is measured. Raises
    ValueError naming a layer whose metric is not finite, before any graph is built.
    """
    wants_graph = torch.is_grad_enabled()
    engine, code = _native.engine, METRIC_CODES[metric]
    measured: dict[str, _Measured] = {}
    total = 0.0
    for name, cloud in clouds.items():
        # The engine is called directly, its buffers kept in numpy: through `native_measure` and
        # `native_scatter`, which hand back tensors, the node's forward + backward took 7% longer.
        u, v = (int64_index(index) for index in edges[name])
        x = cloud.detach().contiguous()
        n, d = x.shape
        count, dtype, itemsize = u.shape[0], NUMPY_DTYPES[x.dtype], x.element_size()
        u_np, v_np = u.numpy(), v.numpy()
        lengths = np.empty(count, dtype=np.float64)
        unit = np.empty((count, d), dtype=dtype)
        deaths = np.empty(count, dtype=dtype)  # the lengths rounded to the cloud's dtype, as the graph's
        wants_slope = wants_graph and cloud.requires_grad
        slope = np.empty(count, dtype=np.float64) if wants_slope else _NO_SLOPE
        value = engine.measure_metric(x.numpy(), itemsize, n, d, u_np, v_np, code, unit, lengths, deaths, slope)
        value = _rounded(value, deaths.dtype)  # as the per-layer graph's metric, in the cloud's dtype
        last_values[name] = value
        if not math.isfinite(value):
            longest = float(deaths.max()) if deaths.size else 0.0
            raise ValueError(f"Layer {name!r}: its {metric} is {value}, not finite (longest bar {longest:.3g})")
        term, derivative = terms[name].value_and_derivative(value)
        total += term
        gradient = None
        if wants_slope:
            grad = (slope * derivative).astype(dtype)
            gradient = torch.empty((n, d), dtype=x.dtype)  # zeroed by the engine
            engine.scatter(unit, itemsize, d, u_np, v_np, lengths, grad, NO_ORDER, gradient.numpy(), n)
        measured[name] = _Measured(cloud, u, v, deaths, value, gradient)
    dtype = torch.promote_types(torch.float32, _common_dtype(clouds.values()))
    deaths = {name: torch.from_numpy(m.deaths) for name, m in measured.items()}
    differentiable = [m for m in measured.values() if m.gradient is not None]
    if not differentiable:
        return torch.tensor(total, dtype=dtype), deaths
    plan = _Plan(differentiable, [terms[name] for name, m in measured.items() if m.gradient is not None],
                 torch_metric, torch.tensor(total, dtype=dtype))
    return _PenaltyNode.apply(plan, *(m.cloud for m in differentiable)), deaths


_FLOAT32_OVERFLOW = 3.4028235677973366e38  # above this a float64 rounds to a float32 infinity
_NO_SLOPE = np.empty(0, dtype=np.float64)


def _rounded(value: float, dtype: np.dtype) -> float:
    if dtype == np.float32 and abs(value) >= _FLOAT32_OVERFLOW:
        return math.copysign(math.inf, value)
    return float(dtype.type(value))


def _common_dtype(clouds) -> torch.dtype:
    dtype = torch.float32
    for cloud in clouds:
        dtype = torch.promote_types(dtype, cloud.dtype)
    return dtype


@dataclass
class _Plan:
    layers: list[_Measured]
    terms: list[LayerTerm]
    torch_metric: Callable[[torch.Tensor], torch.Tensor]
    total: torch.Tensor
    handed_over: bool = False  # the gradients went to a backward

    def recomputed(self, clouds: Sequence[torch.Tensor]) -> torch.Tensor:
        """The per-layer graph of the same total, for a backward that must be differentiable."""
        total = torch.zeros((), dtype=self.total.dtype)
        for layer, term, cloud in zip(self.layers, self.terms, clouds):
            total = total + term.of_tensor(self.torch_metric(edge_lengths(cloud, layer.u, layer.v)))
        return total


class _PenaltyNode(torch.autograd.Function):
    """The penalty's total; its gradient with respect to each cloud was found in the forward."""

    @staticmethod
    def forward(ctx, plan: _Plan, *clouds: torch.Tensor) -> torch.Tensor:
        ctx.plan = plan
        ctx.save_for_backward(*clouds)
        return plan.total.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.plan
        clouds = ctx.saved_tensors  # (also autograd's check that no cloud was modified in place since)
        create_graph = torch.is_grad_enabled()
        if create_graph or plan.handed_over:
            # create_graph=True, or a second backward through a retained graph (the gradients
            # found in the forward were handed over to the first): differentiate the per-layer graph.
            with torch.enable_grad():
                total = plan.recomputed(clouds)
                grads = torch.autograd.grad(total, clouds, grad, create_graph=create_graph, allow_unused=True)
            return (None, *grads)
        # Handed over, not copied: autograd may keep them as the weights' .grad (~50 µs a 100×784
        # layer saved, a multiplication and an allocation).
        plan.handed_over = True
        gradients = [layer.gradient for layer in plan.layers]
        for layer in plan.layers:
            layer.gradient = None
        if float(grad) != 1.0:
            for gradient in gradients:
                gradient.mul_(grad.to(gradient.dtype))
        return (None, *gradients)
