"""`TopoPenalty`'s term for CPU layers as one autograd node, its gradient found in the forward.

Built the usual way, a penalty over three small layers is ~15 autograd nodes (edge lengths,
metric, term, sums) whose fixed costs were most of its time: on 784-100-100-10, 0.7–1.0 ms
forward and backward for ~0.1 ms of arithmetic (measured with the trees given). Here each layer
costs one compiled call (`engine.layer_term`): it measures the tree's edges, takes their metric
and its slope (the formulas of `topoopt.host_metrics`) and the layer's term, and scatters the
term's slope onto the neurons; the node's backward hands those gradients over, times the
incoming one. On a training call whose layers are all built-in float32 layers with exact trees,
every layer's tree lookup and term are one compiled call together (`TreeCache.exact_terms`;
`penalty_of_terms` makes the node). The penalty's gradient is needed on every call that builds
a graph (the loss's backward follows), so nothing is computed in vain.

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
from topoopt.persistence import NUMPY_DTYPES, edge_lengths, int64_index, native_edges_handle
from topoopt.tree_cache import ExactTerm

__all__ = ["handles", "handles_metric", "LayerTerm", "one_node_penalty", "penalty_of_terms"]


def handles(clouds: Sequence[torch.Tensor], metric: str) -> bool:
    """Whether the one node computes this penalty: there are clouds, the compiled engine
    measures every one (CPU, float32/float64, small enough for one thread) and `handles_metric`."""
    return bool(clouds) and handles_metric(metric) and all(native_edges_handle(cloud) for cloud in clouds)


def handles_metric(metric: str) -> bool:
    """Whether the one node may compute a penalty of this metric now: the metric has a host
    slope, and neither a torch.func transform nor forward-mode AD is active (they need the
    per-layer graph)."""
    forward_ad_active = getattr(forward_ad, "_current_level", -1) >= 0  # dual tensors: no tangent here
    return metric in HOST_METRICS and not functorch_active() and not forward_ad_active


@dataclass(frozen=True)
class LayerTerm:
    """One layer's share of the penalty: coefficient × (±metric, or (metric − target)²)."""

    coefficient: float
    sign: float = 1.0  # −1 to maximise
    target: float | None = None

    def of_tensor(self, metric: torch.Tensor) -> torch.Tensor:
        if self.target is not None:
            return self.coefficient * (metric - self.target) ** 2
        return self.coefficient * (self.sign * metric)


@dataclass
class _Measured:
    cloud: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    gradient: torch.Tensor | None  # of this layer's term with respect to its cloud


def one_node_penalty(
    clouds: Mapping[str, torch.Tensor],
    edges: Mapping[str, Sequence[torch.Tensor]],
    metric: str,
    terms: Mapping[str, LayerTerm],
    torch_metric: Callable[[torch.Tensor], torch.Tensor],
    last_values: dict[str, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """The penalty Σ term(metric(deaths)) over the named clouds, measured along `edges` (u, v,
and anything after them).

    Returns the total (a scalar tensor of the clouds' promoted dtype, float32 at least, with one
    autograd node when a cloud requires grad), each layer's deaths in tree order (detached, the
    cloud's dtype) and each non-empty diagram's longest death (NaN where a death is); each
    layer's metric goes into `last_values` as it is measured. Raises ValueError naming a layer
    whose metric is not finite, before any graph is built.
    """
    wants_graph = torch.is_grad_enabled()
    engine, code = _native.engine, METRIC_CODES[metric]
    measured: list[_Measured] = []
    chosen_terms = []
    deaths: dict[str, torch.Tensor] = {}
    longest: dict[str, float] = {}
    total = 0.0
    for name, cloud in clouds.items():
        u, v = int64_index(edges[name][0]), int64_index(edges[name][1])
        x = cloud.detach()
        if not x.is_contiguous():
            x = x.contiguous()
        n, d = x.shape
        layer_deaths = np.empty(u.shape[0], dtype=NUMPY_DTYPES[x.dtype])  # rounded to the cloud's dtype
        gradient = torch.empty((n, d), dtype=x.dtype) if wants_graph and cloud.requires_grad else None
        term = terms[name]
        value, layer_total, longest_death = engine.layer_term(
            x.numpy(), x.element_size(), n, d, u.numpy(), v.numpy(), code, term.coefficient, term.sign,
            math.nan if term.target is None else term.target, layer_deaths,
            _NO_GRADIENT if gradient is None else gradient.numpy())
        last_values[name] = value
        if not math.isfinite(value):
            raise ValueError(f"Layer {name!r}: its {metric} is {value}, not finite "
                             f"(longest bar {longest_death if layer_deaths.size else 0.0:.3g})")
        total += layer_total
        deaths[name] = torch.from_numpy(layer_deaths)
        if layer_deaths.size:
            longest[name] = longest_death
        if gradient is not None:
            measured.append(_Measured(cloud, u, v, gradient))
            chosen_terms.append(term)
    dtype = torch.promote_types(torch.float32, _common_dtype(clouds.values()))
    if not measured:
        return torch.tensor(total, dtype=dtype), deaths, longest
    plan = _Plan(measured, chosen_terms, torch_metric, torch.tensor(total, dtype=dtype))
    return _PenaltyNode.apply(plan, *(m.cloud for m in measured)), deaths, longest


def penalty_of_terms(
    clouds: Mapping[str, torch.Tensor],
    found: Mapping[str, ExactTerm],
    terms: Mapping[str, LayerTerm],
    torch_metric: Callable[[torch.Tensor], torch.Tensor],
    last_values: dict[str, float],
) -> torch.Tensor | None:
    """`one_node_penalty`'s total from the terms and gradients `TreeCache.exact_terms` measured
    (a training step's exact lookups, in one compiled call; the deaths stay in the cache). None
    where a metric is not finite or a cloud's deaths left the engine's exact range: the general
    path then names the layer or rescales."""
    total, measured, chosen_terms = 0.0, [], []
    for key, cloud in clouds.items():
        layer = found[key]
        if not layer.exact:
            return None
        total += layer.term
        if cloud.requires_grad:
            measured.append(_Measured(cloud, layer.u, layer.v, layer.gradient))
            chosen_terms.append(terms[key])
    for key in clouds:
        last_values[key] = found[key].metric
    if not measured:
        return torch.scalar_tensor(total, dtype=torch.float32)
    plan = _Plan(measured, chosen_terms, torch_metric, torch.scalar_tensor(total, dtype=torch.float32))
    return _PenaltyNode.apply(plan, *(m.cloud for m in measured))


_NO_GRADIENT = bytearray()  # an empty writable buffer: no gradient asked for


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
