"""Topological penalty terms: per-layer H0 metrics as a differentiable loss term."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import nn

from topoopt import penalty_node
from topoopt._range import needs_rescaling
from topoopt._validation import UnknownName, check_choice, check_number, check_positive_int, invalid
from topoopt.host_metrics import METRIC_CODES
from topoopt.layers import layer_parameters
from topoopt.measure import LayerMeter, MeterSettings
from topoopt.metrics import METRIC_SPECS, get_metric
from topoopt.tree_cache import TreeCache

__all__ = ["TopoPenalty", "PENALTY_METRICS"]

PENALTY_METRICS: tuple[str, ...] = tuple(METRIC_SPECS)


class TopoPenalty(MeterSettings, nn.Module):
    """Weighted sum over layers of an H0 metric of each layer's neuron cloud, to add to a loss.

    What each setting does to the weight cloud, through the gradient of the H0 deaths:

    - ``mean_lifetime`` / ``total_persistence``, ``direction="maximize"``: pushes neurons that are
      nearest neighbours in the spanning tree apart, spreading the cloud (against redundant,
      coinciding neurons). ``"minimize"`` pulls them together, merging neurons into groups
      (a sparsity-like pressure on the number of distinct neurons).
    - ``normalized_entropy``, ``"maximize"``: evens out the tree's edge lengths, so neurons spread
      uniformly; ``"minimize"`` makes a few gaps dominate, so neurons form well-separated clusters.
      Scale free: it does not shrink or grow the weights.
    - ``target=t``: the squared distance (metric − t)², holding the metric near t instead.

    Parameters
    ----------
    model : nn.Module
        The model whose neuron clouds are penalised (`topoopt.topological_layers`).
    metric : str
        A name of `topoopt.METRIC_SPECS`.
    weight : float or dict
        The loss coefficient, ≥ 0: one number for every layer, or a dict from layer name to
        number (layers missing from the dict get 0 and are not measured). Kept per layer in
        ``coefficients``. The sign of the term is ``direction``'s.
    layers : list of str, optional
        Only these layers (all by default).
    direction : {"minimize", "maximize"}
        The sign of the term.
    target : float, optional
        Penalise (metric − target)² instead (``direction`` must stay "minimize").
    every : int
        Compute the term on every k-th call that builds a graph (the 1st, k+1-th, ...); in
        between it is an exact zero with no graph. A call without a graph (under
        ``torch.no_grad()`` or inference mode: logging, evaluation) always computes the value
        and does not count, and is passive in the tree cache (no reuse counted, no tree training
        uses changed), so it cannot shift the training schedule. Pass ``weight`` ≈ k·λ to keep
        the same average pressure.
    tree_every : int
        Search a layer's spanning tree at most every m-th time its weights changed and re-measure
        its edges in between: cheaper, exact only when m = 1 (see `topoopt.TreeCache`). A tree
        found for bit-identical weights is always reused.
    include_bias : bool
        Append each neuron's bias to its weight vector.
    trees : TreeCache, optional
        Where trees are kept (a new one by default); pass the one a `TopoOptimizer` uses to
        search once per step between them.

    Layers the compiled engine measures (CPU, float32/float64) give one autograd node for the
    whole term, its gradient found in the forward (`topoopt.penalty_node`); other layers, and
    calls under torch.func or forward-mode AD, the graph of the metric functions. The values
    are the same up to rounding (the one node sums the mean lifetime and total persistence in
    float64: where a float32 sum overflows, it gives the finite value, not an error).

    Calling it with no arguments returns a scalar tensor. A layer with NaN/Inf weights raises a
    ``ValueError`` naming it, and so does a metric that is not finite. A layer with no neurons
    or no inputs contributes 0. A zero-initialised layer gives a finite value and zero gradient
    (a penalty alone cannot break that symmetry). ``last_values`` holds the latest metric of
    each measured layer (those with a weight above 0). ``state_dict()`` carries the call counter
    (for ``every``) and, when ``tree_every > 1``, the cached trees, so a resumed run computes
    exactly what the interrupted one would have.
    """

    def __init__(
        self,
        model: nn.Module,
        metric: str = "normalized_entropy",
        *,
        weight: float | Mapping[str, float] = 1.0,
        layers: Iterable[str] | None = None,
        direction: Literal["minimize", "maximize"] = "minimize",
        target: float | None = None,
        every: int = 1,
        tree_every: int = 1,
        include_bias: bool = False,
        trees: TreeCache | None = None,
    ) -> None:
        super().__init__()
        check_choice("metric", metric, PENALTY_METRICS)
        check_choice("direction", direction, ("minimize", "maximize"))
        if target is not None:
            check_number("target", target, low=0.0, high=1.0 if metric == "normalized_entropy" else math.inf,
                         note=f"a value {metric} can take")
            if direction == "maximize":
                raise invalid("target", target, "None with direction='maximize' (a target is approached from "
                                                "both sides)")
        check_positive_int("every", every)
        # a plain object holding the layers: the model's parameters stay out of this module's
        self.meter = LayerMeter(model, layers, owner="TopoPenalty", include_bias=include_bias, tree_every=tree_every,
                                trees=trees)
        chosen = self.meter.layers
        self.coefficients = self._layer_coefficients(weight, chosen)
        self.metric = metric
        self.direction = direction
        self.target = float(target) if target is not None else None
        self.every = every
        self._metric_fn = get_metric(metric)
        self._calls = 0
        self.last_values: dict[str, float] = {}

    @staticmethod
    def _layer_coefficients(weight, chosen: Mapping[str, nn.Module]) -> dict[str, float]:
        if not isinstance(weight, Mapping):
            _check_coefficient("weight", weight)
            return {name: float(weight) for name in chosen}
        unknown = [name for name in weight if name not in chosen]
        if unknown:
            raise UnknownName(f"weight names unknown layer(s) {unknown}. Chosen layers: {list(chosen)}")
        values = {name: weight.get(name, 0.0) for name in chosen}
        for name, value in values.items():
            _check_coefficient(f"weight for layer {name!r}", value)
        return {name: float(value) for name, value in values.items()}

    @property
    def weights(self) -> dict[str, float]:
        """Deprecated name of ``coefficients`` (the loss coefficients, not network weights)."""
        warnings.warn("TopoPenalty.weights is now TopoPenalty.coefficients", DeprecationWarning, stacklevel=2)
        return self.coefficients

    @property
    def layer_names(self) -> list[str]:
        return list(self.meter.layers)


    def _term(self, value: torch.Tensor) -> torch.Tensor:
        if self.target is not None:
            return (value - self.target) ** 2
        return -value if self.direction == "maximize" else value

    @torch.compiler.disable
    def forward(self) -> torch.Tensor:
        """The penalty term now: Σ over layers of coefficient × (±metric, or (metric − target)²).

        Returns
        -------
        torch.Tensor
            A differentiable scalar on the layers' device, to add to the loss; an exact
            zero without a graph on the calls that `every` skips. ``last_values`` then holds each
            measured layer's metric.

        Raises
        ------
        ValueError
            When a layer's metric is not finite (diverged weights).
        """
        # A call without a graph (logging, evaluation) does not count for `every`, and is passive
        # in the tree cache, so that it cannot change which trees training's calls get.
        passive = not torch.is_grad_enabled()
        if not passive:
            self.__dict__["_calls"] += 1  # (nn.Module's __setattr__ cost ~5 µs a call)
            if (self._calls - 1) % self.every:
                return self._zero()
            total = self._exact_step_total()
            if total is not None:
                return total
        clouds = self.meter.clouds([name for name in self.meter.layers if self.coefficients[name] != 0.0])
        if penalty_node.handles(list(clouds.values()), self.metric):
            try:
                node_total = self._one_node_total(clouds, passive)
            except (OverflowError, ValueError):  # finite weights, non-finite lengths: a cloud at the end of
                node_total = None                 # its dtype's range, which the general path rescales
            if node_total is not None:
                return node_total
        # All layers in one call: the small ones' tree searches and every edge measurement are
        # batched (benchmarks/all_layers.py), with the deaths of one-layer calls.
        all_deaths = self.meter.deaths(clouds, passive)
        total = self._zero()
        device = total.device
        for name in clouds:
            deaths = all_deaths[name]
            value = self._metric_fn(deaths)
            self.last_values[name] = float(value.detach())
            if not math.isfinite(self.last_values[name]):
                raise ValueError(f"Layer {name!r}: its {self.metric} is {self.last_values[name]}, "
                                 f"not finite (longest bar {float(deaths.detach().max()):.3g})")
            total = total + (self.coefficients[name] * self._term(value)).to(device)
        return total

    def _zero(self) -> torch.Tensor:
        """A float32 zero on the last layer's device: where the output, and so the loss, lives
        when layers are spread over devices (model parallel); each layer's term is moved there."""
        last = next(reversed(self.meter.layers.values()))
        # a module's own weight parameter, never computed (a parametrization would run, and
        # spectral_norm's would update its state); else the parameters that make the layer
        weight = last._parameters.get("weight") if isinstance(last, nn.Module) else None
        device = weight.device if weight is not None else layer_parameters(last)[0].device
        return torch.zeros((), device=device, dtype=torch.float32)

    def _exact_step_total(self) -> torch.Tensor | None:
        """`forward` on a training call whose layers are all built-in layers with float32 CPU
        weights, with exact trees: every layer's lookup and term in one compiled call
        (`LayerMeter.exact_terms`) and one autograd node; None where that does not hold, or a
        cloud is not finite or its deaths left the engine's exact range (the general path names
        the layer, or rescales)."""
        if self.meter.tree_every != 1 or not penalty_node.handles_metric(self.metric):
            return None
        clouds = self.meter.plain_clouds([name for name in self.meter.layers if self.coefficients[name] != 0.0])
        if not clouds or any(cloud.shape[0] < 2 or cloud.shape[1] < 1 for cloud in clouds.values()):
            return None
        sign = -1.0 if self.direction == "maximize" else 1.0
        found = self.meter.exact_terms(clouds, METRIC_CODES[self.metric], self.coefficients, sign, self.target)
        if found is None:
            return None
        terms = {name: penalty_node.LayerTerm(self.coefficients[name], sign, self.target) for name in clouds}
        return penalty_node.penalty_of_terms(clouds, found, terms, self._metric_fn, self.last_values)

    def _one_node_total(self, clouds: dict[str, torch.Tensor], passive: bool) -> torch.Tensor | None:
        """`forward` for CPU layers the compiled engine measures: one autograd node
        (`topoopt.penalty_node`), the same trees and values; None when a cloud's deaths left the
        range where the engine is exact."""
        searched = {name: cloud for name, cloud in clouds.items() if cloud.shape[0] >= 2}
        trees = self.meter.trees_for(searched, passive)
        no_edge = torch.empty(0, dtype=torch.int64) if len(searched) < len(clouds) else None
        edges = {name: trees[name] if name in searched else (no_edge, no_edge) for name in clouds}
        sign = -1.0 if self.direction == "maximize" else 1.0
        terms = {name: penalty_node.LayerTerm(self.coefficients[name], sign, self.target) for name in clouds}
        total, deaths, longest = penalty_node.one_node_penalty(clouds, edges, self.metric, terms, self._metric_fn,
                                                               self.last_values)
        if any(needs_rescaling(value, clouds[name].dtype) for name, value in longest.items()):
            return None  # deaths at the end of the dtype's range: measured again, rescaled, by the general path
        if not passive:
            for name in searched:  # fresh arrays of the one node's own: kept without a copy
                self.meter.remember_deaths(name, deaths[name], trees[name][2], copy=False)
        return total

    def get_extra_state(self) -> dict:
        state = {"calls": self._calls}
        if self.tree_every > 1:
            state["trees"] = self.trees.state_dict()
        return state

    def set_extra_state(self, state: dict) -> None:
        self._calls = int(state["calls"])
        if "trees" in state:
            self.trees.load_state_dict(state["trees"])

    def extra_repr(self) -> str:
        goal = f"target={self.target}" if self.target is not None else f"direction={self.direction!r}"
        return f"metric={self.metric!r}, {goal}, layers={self.layer_names}, every={self.every}"


def _check_coefficient(what: str, value: object) -> None:
    """A loss coefficient: a real number (numpy's included), finite and ≥ 0."""
    check_number(what, value, low=0.0, note="the term's sign is direction's: direction='maximize' raises the metric")
