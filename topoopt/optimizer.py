"""TopoOptimizer: a drop-in wrapper that scales each layer's step by its topological complexity.

The wrapper lets the inner optimizer take its step, then moves each layer's parameters to
``p_old + s_l · (p_new − p_old)``: the effective step is exactly s_l times the inner step, for
SGD, Adam (where scaling the gradient would change nothing), LBFGS or any other optimizer.
``group["lr"]`` is never touched, so learning-rate schedulers see what they would see without
the wrapper. The wrapper *is* a ``torch.optim.Optimizer`` and shares the inner optimizer's
``param_groups`` and ``state`` (as davda54/sam does), so schedulers, ``GradScaler`` and
checkpointing accept it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from topoopt._validation import check_positive_int
from topoopt.cloud import layer_cloud
from topoopt.layers import layer_parameters, select_layers
from topoopt.metrics import get_metric
from topoopt.tree_cache import TreeCache, cache_key

__all__ = ["TopoOptimizer", "POLICIES", "COMPLEXITY_METRICS", "calm_policy", "awaken_policy", "contrast_policy"]

# Complexities are made dimensionless so that one policy works for every metric and layer size:
# entropy is already in [0, 1]; lifetimes are divided by the layer's RMS neuron norm.
COMPLEXITY_METRICS = ("normalized_entropy", "mean_lifetime", "total_persistence", "max_lifetime")

Policy = Callable[[Mapping[str, float], Mapping[str, float], float], dict[str, float]]


def calm_policy(complexity: Mapping[str, float], change: Mapping[str, float], strength: float) -> dict[str, float]:
    """A brake: s_l = 1 / (1 + strength · (max(0, c_l − c̄) + v_l)), so s_l ≤ 1.

    c_l is the layer's smoothed complexity, c̄ its mean over the wrapped layers, and v_l the
    smoothed absolute change of c_l between measurements. Layers whose cloud is more complex
    than the others', or whose topology is still changing fast, take smaller steps; settled,
    simple layers keep the inner optimizer's step.
    """
    mean = sum(complexity.values()) / len(complexity)
    return {
        name: 1.0 / (1.0 + strength * (max(0.0, c - mean) + change.get(name, 0.0)))
        for name, c in complexity.items()
    }


def awaken_policy(complexity: Mapping[str, float], change: Mapping[str, float], strength: float) -> dict[str, float]:
    """An accelerator: s_l = 1 + strength · (1 − min(c_l, 1)), so s_l ≥ 1.

    A layer whose cloud is still structureless (neurons coinciding or collapsed onto a few
    points, as after zero or tiny initialisation: complexity near 0) takes larger steps until
    its neurons have spread out (complexity near 1, where s_l = 1).
    """
    return {name: 1.0 + strength * (1.0 - min(c, 1.0)) for name, c in complexity.items()}


def contrast_policy(complexity: Mapping[str, float], change: Mapping[str, float], strength: float) -> dict[str, float]:
    """Relative braking: s_l = exp(−strength · z_l), z_l = (c_l − c̄) / sd(c) across the layers.

    Added after the small-data study found normalized entropy within 0.98–1.0 in every layer, so
    that `calm` and `awaken` scales stay within ~2% of 1. Standardising across layers makes the
    policy act on the *ranking* of layers: the most complex layer is slowed, the least sped up,
    by factors set by `strength` alone (the geometric mean of the scales is 1). All layers equal,
    or a single layer: s = 1.
    """
    values = list(complexity.values())
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if spread == 0:
        return {name: 1.0 for name in complexity}
    return {name: math.exp(-strength * (c - mean) / spread) for name, c in complexity.items()}


POLICIES: dict[str, Policy] = {"calm": calm_policy, "awaken": awaken_policy, "contrast": contrast_policy}


def _check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise ValueError(f"Invalid {name}: {value}")
    return float(value)


class TopoOptimizer(torch.optim.Optimizer):
    """Wraps any ``torch.optim.Optimizer``; layer l's step becomes s_l times the inner step.

    Every ``every`` steps (the first step included), the complexity of each wrapped layer's
    neuron cloud is measured with ``metric`` (under ``torch.no_grad``, outside the loss graph)
    and smoothed with an exponential moving average of factor ``ema``. ``policy`` turns the
    smoothed complexities into scales ("calm" brakes, "awaken" accelerates; see
    `calm_policy` and `awaken_policy`, or pass a callable of the same signature), which are
    clipped to ``bounds``. With ``tree_every=m`` the spanning trees are searched at most every
    m-th measurement and re-measured in between (cheaper; see `topoopt.tree_cache`); a tree that
    `TopoPenalty` found is reused when both are given the same ``trees`` (a `TreeCache`).
    Parameters outside the wrapped layers, and layers with fewer than 2 neurons or no inputs,
    keep s = 1.

    Which parameters a scale moves: those that produce the layer's weight and bias (its own, and
    a parametrization's, such as ``weight_norm``'s ``original0``/``original1``). A parameter
    shared by several wrapped layers (tied weights) is moved once, by the mean of their scales.

    Safety. After the inner step, the scaled tensors (already in hand) are checked: a NaN or Inf
    there raises ``FloatingPointError`` naming the layers, with the parameters left exactly as
    the inner optimizer left them (never scaled, so the wrapper never turns Inf into NaN). Pass
    ``check_finite=False`` to skip that check (it costs one host sync per step on a GPU). Layers
    at s = 1 are not touched on any step; their non-finite weights are reported at the next
    measurement (``ValueError`` naming the layer and what was measured). If the inner step
    raises (a failing closure, say), the step did not happen: with a closure the parameters and
    the inner optimizer's state are restored (they are copied before such a step), without one
    the parameters are as the inner optimizer left them; either way ``topo_step`` and the
    moving averages are unchanged.

    ``scales`` (layer → s_l) and ``complexity`` (layer → last measured value) are readable for
    monitoring. ``state_dict()`` holds the inner optimizer's state and the wrapper's own, as
    plain data that loads with ``torch.load(weights_only=True)``.

    Under DistributedDataParallel the weights are identical on every rank, and the measurement is
    deterministic, so every rank computes the same scales without communicating.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        metric: str = "normalized_entropy",
        policy: str | Policy = "calm",
        strength: float = 1.0,
        every: int = 10,
        ema: float = 0.9,
        bounds: tuple[float, float] = (0.25, 4.0),
        layers: Iterable[str] | None = None,
        include_bias: bool = False,
        tree_every: int = 1,
        trees: TreeCache | None = None,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, TopoOptimizer):
            raise TypeError("optimizer is already a TopoOptimizer; wrap the inner optimizer once")
        if metric not in COMPLEXITY_METRICS:
            raise ValueError(f"Unknown metric {metric!r}. Valid metrics are: {', '.join(COMPLEXITY_METRICS)}")
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ValueError(f"Unknown policy {policy!r}. Valid policies are: {', '.join(POLICIES)}")
            policy_fn = POLICIES[policy]
        elif callable(policy):
            policy_fn = policy
        else:
            raise TypeError(f"policy must be a name or a callable, got {type(policy).__name__}")
        strength = _check_number("strength", strength, 0.0, math.inf)
        ema = _check_number("ema", ema, 0.0, 1.0)
        if ema == 1.0:
            raise ValueError(f"Invalid ema: {ema} (1 would never update the average)")
        check_positive_int("every", every)
        check_positive_int("tree_every", tree_every)
        if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
            raise ValueError(f"Invalid bounds: {bounds!r}. Expected (low, high)")
        low = _check_number("lower bound", bounds[0], 0.0, math.inf, low_open=True)
        high = _check_number("upper bound", bounds[1], 0.0, math.inf, low_open=True)
        if not low <= 1.0 <= high:
            raise ValueError(f"Invalid bounds: {tuple(bounds)}. They must satisfy low ≤ 1 ≤ high")
        if trees is not None and not isinstance(trees, TreeCache):
            raise TypeError(f"trees must be a topoopt.TreeCache, got {type(trees).__name__}")
        chosen = select_layers(model, layers)
        managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, module in chosen.items():
            if not any(id(p) in managed for p in layer_parameters(module)):
                raise ValueError(f"Layer {name!r} has no parameter in the optimizer's param_groups")

        self._attached = False
        # Optimizer.__init__ sets up hooks and step patching; its param_groups/state are dropped
        # by the setters below, since the inner optimizer's are shared instead.
        super().__init__([{"params": []}], {})
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self._attached = True

        self.metric = metric
        self.policy = policy
        self._policy_fn = policy_fn
        self.strength = strength
        self.every = every
        self.ema = ema
        self.bounds = (low, high)
        self.include_bias = include_bias
        self.tree_every = tree_every
        self.trees = trees if trees is not None else TreeCache()
        self.check_finite = bool(check_finite)
        self._layers = chosen
        self._metric_fn = get_metric(metric)
        self.topo_step = 0
        self.complexity: dict[str, float] = {}
        self.smoothed: dict[str, float] = {}
        self.change: dict[str, float] = {}
        self.scales: dict[str, float] = {name: 1.0 for name in chosen}
        self._scaled: tuple[list[torch.Tensor], list[float], list[str]] | None = None

    # ---- sharing the inner optimizer's groups and state ----
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups if self.__dict__.get("_attached") else []

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self.__dict__.get("_attached"):
            self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state if self.__dict__.get("_attached") else {}

    @state.setter
    def state(self, value) -> None:
        if self.__dict__.get("_attached"):
            self.optimizer.state = value

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer's own __getstate__ keeps only defaults/state/param_groups; deepcopy and
        # pickle need the inner optimizer, the layers and the moving averages too.
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.__dict__.get("_attached"):
            self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (f"TopoOptimizer(metric={self.metric!r}, policy={self.policy!r}, strength={self.strength}, "
                f"every={self.every}, bounds={self.bounds}, layers={list(self._layers)})\n  {self.optimizer!r}")

    # ---- measuring topology ----
    def _measure(self, name: str, module: nn.Module) -> float | None:
        cloud = layer_cloud(name, module, self.include_bias)
        if cloud is None or cloud.shape[0] < 2:
            return None
        cloud = cloud.detach()
        deaths = self.trees.deaths(cache_key(name, self.include_bias), cloud, self.tree_every)
        value = float(self._metric_fn(deaths))
        if self.metric != "normalized_entropy":
            # In float64: the float32 norm of weights of about 1e19 overflows.
            rms_norm = float(torch.linalg.vector_norm(cloud.double())) / math.sqrt(cloud.shape[0])
            bars = deaths.numel() if self.metric == "total_persistence" else 1
            value = value / (rms_norm * bars) if rms_norm > 0 else 0.0
        if not math.isfinite(value):
            raise ValueError(f"Layer {name!r}: measuring its {self.metric} gave {value} "
                             f"(longest bar {float(deaths.max()):.3g}); the weights' scale is out of range")
        return value

    @torch.no_grad()
    @torch.compiler.disable
    def update_scales(self) -> dict[str, float]:
        """Measure every wrapped layer now, update the moving averages and the scales."""
        measured = {}
        for name, module in self._layers.items():
            value = self._measure(name, module)
            if value is None:
                continue
            self.complexity[name] = value
            previous = self.smoothed.get(name)
            if previous is None:
                self.smoothed[name] = value
                self.change[name] = 0.0
            else:
                self.smoothed[name] = self.ema * previous + (1 - self.ema) * value
                jump = abs(self.smoothed[name] - previous)
                self.change[name] = self.ema * self.change[name] + (1 - self.ema) * jump
            measured[name] = self.smoothed[name]
        scales = dict(self._policy_fn(measured, self.change, self.strength)) if measured else {}
        low, high = self.bounds
        for name in self._layers:
            raw = float(scales.get(name, 1.0))
            if not math.isfinite(raw):
                raise ValueError(f"The policy gave layer {name!r} a non-finite scale: {raw}")
            self.scales[name] = min(max(raw, low), high)
        self._scaled = None
        return dict(self.scales)

    # ---- the step ----
    def _scaled_parameters(self) -> tuple[list[torch.Tensor], list[float], list[str]]:
        """Each parameter of a wrapped layer once, with its scale (a shared one: the mean)."""
        managed = {id(p) for group in self.param_groups for p in group["params"]}
        found: dict[int, tuple[torch.Tensor, list[float], list[str]]] = {}
        for name, module in self._layers.items():
            for param in layer_parameters(module):
                if id(param) in managed:
                    entry = found.setdefault(id(param), (param, [], []))
                    entry[1].append(self.scales[name])
                    entry[2].append(name)
        params, factors, owners = [], [], []
        for param, scales, names in found.values():
            factor = sum(scales) / len(scales)
            if factor != 1.0:
                params.append(param)
                factors.append(factor)
                owners.append("/".join(dict.fromkeys(names)))
        return params, factors, owners

    def _own_state(self) -> dict[str, Any]:
        return {
            "topo_step": self.topo_step,
            "layers": list(self._layers),
            "complexity": dict(self.complexity),
            "smoothed": dict(self.smoothed),
            "change": dict(self.change),
            "scales": dict(self.scales),
        }

    def _restore_own_state(self, own: dict[str, Any]) -> None:
        self.topo_step = int(own["topo_step"])
        self.complexity = {k: float(v) for k, v in own["complexity"].items()}
        self.smoothed = {k: float(v) for k, v in own["smoothed"].items()}
        self.change = {k: float(v) for k, v in own["change"].items()}
        self.scales = {k: float(v) for k, v in own["scales"].items()}
        self._scaled = None

    def _snapshot_for_closure(self) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        params = [p for group in self.param_groups for p in group["params"]]
        with torch.no_grad():
            values = [p.detach().clone() for p in params]
        state = {param: copy.deepcopy(entry) for param, entry in self.optimizer.state.items()}
        return params, values, state

    def _restore_snapshot(self, snapshot) -> None:
        params, values, state = snapshot
        with torch.no_grad():
            for param, value in zip(params, values):
                param.copy_(value)
        self.optimizer.state.clear()
        self.optimizer.state.update(state)

    def _non_finite_layers(self, params: list[torch.Tensor], owners: list[str]) -> list[str]:
        largest = torch.stack(torch._foreach_norm(params, math.inf))  # NaN or Inf where any is
        finite = torch.isfinite(largest)
        if bool(finite.all()):
            return []
        return sorted({owners[i] for i in torch.nonzero(~finite).flatten().tolist()})

    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        own_before = self._own_state()
        if self.topo_step % self.every == 0:
            self.update_scales()
        if self._scaled is None:
            self._scaled = self._scaled_parameters()
        params, factors, owners = self._scaled
        snapshot = self._snapshot_for_closure() if closure is not None else None
        if params:
            with torch.no_grad():
                before = torch._foreach_mul(params, 1.0)  # one batched copy
        try:
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        except BaseException:
            if snapshot is not None:
                self._restore_snapshot(snapshot)
            self._restore_own_state(own_before)
            raise
        self.topo_step += 1  # the inner step was taken
        if params:
            with torch.no_grad():
                bad = self._non_finite_layers(params, owners) if self.check_finite else []
                if bad:
                    raise FloatingPointError(
                        f"TopoOptimizer step {self.topo_step - 1}: the inner optimizer's step made the "
                        f"weights of layer(s) {bad} NaN or Inf (non-finite gradients?). They were left "
                        f"as the inner optimizer left them, unscaled.")
                # p ← p_old + s·(p_new − p_old), batched over all scaled tensors.
                torch._foreach_sub_(params, before)
                torch._foreach_mul_(params, factors)
                torch._foreach_add_(params, before)
        return loss

    # ---- checkpointing ----
    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        state["topoopt"] = self._own_state()
        if self.tree_every > 1:  # approximate trees: the resumed run must reuse the same ones
            state["topoopt"]["trees"] = self.trees.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop("topoopt", None)
        if own is None:
            raise KeyError("This state_dict has no 'topoopt' entry: it was not saved by a TopoOptimizer")
        if list(own["layers"]) != list(self._layers):
            raise ValueError(f"The saved layers {list(own['layers'])} differ from this wrapper's {list(self._layers)}")
        self.optimizer.load_state_dict(state_dict)  # replaces the inner groups; shared via property
        self._restore_own_state(own)
        if "trees" in own:
            self.trees.load_state_dict(own["trees"])
