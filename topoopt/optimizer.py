"""TopoOptimizer: a drop-in wrapper that scales each layer's step by its topological complexity.

The wrapper lets the inner optimizer take its step, then moves each layer's parameters to
``p_old + s_l · (p_new − p_old)``: the effective step is exactly s_l times the inner step, for
SGD, Adam (where scaling the gradient would change nothing), LBFGS or any other optimizer.
``group["lr"]`` is never touched, so learning-rate schedulers see what they would see without
the wrapper. The wrapper *is* a ``torch.optim.Optimizer`` and shares the inner optimizer's
``param_groups`` and ``state`` objects (as davda54/sam does), so schedulers, ``GradScaler``,
gradient clipping and checkpointing accept it.

Framework proxies (Lightning's ``LightningOptimizer``) subclass the wrapper's class and forward
unknown attributes to it. So every mutable piece of the wrapper's own state lives in two objects
the proxy shares (`_WrapperState`, and the `LayerMeter` that holds the layers, trees and tree
settings), which the properties read and write through, never in attributes a method would
re-bind on the proxy.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from topoopt import _native
from topoopt._validation import (
    UnknownName,
    a_kind,
    check_choice,
    check_instance,
    check_number,
    check_positive_int,
    finite_each,
    invalid,
)
from topoopt.cloud import ParameterLayer, cloud_norm
from topoopt.host_metrics import METRIC_CODES
from topoopt.layers import TopologyCoverageWarning, layer_parameters, select_layers, user_stacklevel
from topoopt.measure import LayerMeter, MeterSettings
from topoopt.metrics import COMPLEXITY_METRICS, complexity_of_measured, engine_complexity_code, metric_spec
from topoopt.policies import COLLAPSE_SPREAD, POLICIES, Policy, awaken_policy, calm_policy, contrast_policy
from topoopt.tree_cache import TreeCache

__all__ = [
    "TopoOptimizer",
    "POLICIES",
    "COMPLEXITY_METRICS",
    "calm_policy",
    "awaken_policy",
    "contrast_policy",
]

# The keys torch.optim.Optimizer keeps per instance for hooks; none of them pickles reliably.
_HOOK_KEYS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _local_shards(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """Each parameter's tensor on this rank: a sharded one's (a DTensor under FSDP2) local shard,
    which the elementwise scaling p_old + s·(p_new − p_old) may treat alone; and whether any was
    sharded."""
    local = [p.to_local() if type(p) is not torch.Tensor and hasattr(p, "to_local") else p for p in params]
    return local, any(a is not b for a, b in zip(local, params))


def _agreed(finite: list[bool]) -> list[bool]:
    """`finite` as every rank sees it: a tensor is finite only if its shard is on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return finite
    flags = torch.tensor([int(ok) for ok in finite], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flags = flags.cuda()
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [bool(flag) for flag in flags.tolist()]


def _host_views(tensors: list[torch.Tensor]) -> list | None:
    """numpy views (sharing memory) of plain, contiguous CPU float32/float64 tensors, for the
    compiled step scaling; None when any tensor is not one (CUDA, float16, a tensor subclass
    such as DTensor) or no engine was built."""
    if _native.engine is None:
        return None
    views = []
    for tensor in tensors:
        plain = tensor.detach()
        if (type(plain) is not torch.Tensor or plain.device.type != "cpu" or not plain.is_contiguous()
                or plain.dtype not in (torch.float32, torch.float64)):
            return None
        views.append(plain.numpy())
    return views


@dataclass
class _WrapperState:
    """Everything the wrapper changes as it runs (see the module docstring for why one object)."""

    topo_step: int = 0
    complexity: dict[str, float] = field(default_factory=dict)
    smoothed: dict[str, float] = field(default_factory=dict)
    change: dict[str, float] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    scaled: tuple[list[torch.Tensor], list[float], list[str]] | None = None  # cache, not saved

    def as_dict(self, layers: list[str]) -> dict[str, Any]:
        return {"topo_step": self.topo_step, "layers": list(layers), "complexity": dict(self.complexity),
                "smoothed": dict(self.smoothed), "change": dict(self.change), "scales": dict(self.scales)}

    def load(self, saved: Mapping[str, Any]) -> None:
        self.topo_step = int(saved["topo_step"])
        for key in ("complexity", "smoothed", "change", "scales"):
            setattr(self, key, {k: float(v) for k, v in saved[key].items()})
        self.scaled = None


class TopoOptimizer(MeterSettings, torch.optim.Optimizer):
    """Wraps any ``torch.optim.Optimizer``; layer l's step becomes s_l times the inner step.

    Two ways to build it:

    - ``TopoOptimizer(optimizer, model, ...)``: wrap an existing optimizer; the layers are the
      model's neuron clouds, as `topoopt.topological_layers` lists them (or those in ``layers``).
    - ``TopoOptimizer(params, inner=torch.optim.AdamW, lr=1e-3, ...)``: the torch.optim form,
      for frameworks that take an optimizer class and keyword arguments (skorch, ignite, config
      files). ``params`` is what the inner optimizer accepts: ``model.named_parameters()``,
      ``model.parameters()`` or param groups. Each parameter of 2 or more dimensions is a layer
      whose neurons are its rows (a Linear weight, a Conv weight per output channel), named
      after it (``"fc1.weight"`` → ``"fc1"``; unnamed: ``"param<i>"``); a named 1-D parameter
      ``"<layer>.bias"`` with one entry per neuron is that layer's bias. Unknown keyword
      arguments go to ``inner``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer or iterable
        The optimizer to wrap, or the parameters for ``inner``.
    model : nn.Module, optional
        The model whose layers are measured: required in the first form; in the second, it lets
        each layer be read by its type (`topoopt.neurons`) instead of as rows of its weight.
    metric : str
        Complexity measure: ``"normalized_entropy"`` (in [0, 1]) or a lifetime metric
        (``"mean_lifetime"``, ``"total_persistence"``, ``"max_lifetime"``) divided by the layer's
        RMS neuron norm, so that it is dimensionless.
    policy : str or callable
        ``"calm"`` (a brake), ``"awaken"`` (an accelerator), ``"contrast"`` (acts on the ranking
        of layers), or a callable ``(complexity, change, strength) -> {layer: scale}``; see
        `topoopt.policies`.
    strength : float
        How strongly the policy acts (≥ 0; 0 gives s = 1 everywhere).
    every : int
        Measure every ``every`` steps (the first step included); scales hold in between.
    ema : float
        Factor of the exponential moving average of each layer's complexity, in [0, 1).
    bounds : (float, float)
        Scales are clipped to [low, high], with 0 < low ≤ 1 ≤ high.
    layers : list of str, optional
        Only these layers (all by default).
    include_bias : bool
        Append each neuron's bias to its weight vector before measuring.
    tree_every : int
        Search each spanning tree at most every m-th measurement and re-measure its edges in
        between (cheaper, approximate; see `topoopt.TreeCache`). 1 is exact.
    trees : TreeCache, optional
        Where trees are kept (a new one by default); share one with a `TopoPenalty` to search
        once per step between them.
    check_finite : bool
        Check the scaled tensors after each step (see Safety).
    inner : type or callable, optional
        The optimizer class to build from ``params`` (second form only).

    Which parameters a scale moves: those that produce the layer's weight and bias (its own, and
    a parametrization's, such as ``weight_norm``'s ``original0``/``original1``). A parameter
    shared by several wrapped layers (tied weights) is moved once, by the mean of their scales.
    Parameters outside the wrapped layers, and layers with fewer than 3 neurons or no inputs,
    keep s = 1 and stay out of the policy's statistics. A parameter holding several clouds
    (attention's packed Q/K/V, an RNN layer's gates) is moved by the mean of their scales, as a
    tied one is.

    Safety. After the inner step, the scaled tensors (already in hand) are checked: a NaN or Inf
    there raises ``FloatingPointError`` naming the layers, with the parameters left exactly as
    the inner optimizer left them (never scaled, so the wrapper never turns Inf into NaN). Pass
    ``check_finite=False`` to skip that check (it costs one host sync per step on a GPU). Layers
    at s = 1 are not touched on any step; their non-finite weights are reported at the next
    measurement (``ValueError`` naming the layer and what was measured). If the inner step
    raises (a failing closure, say), the step did not happen: ``topo_step`` and the moving
    averages are unchanged. With a closure and an inner optimizer that may evaluate it again
    after moving the parameters (LBFGS, or any optimizer outside torch.optim's own), the
    parameters and the inner state are copied before the step and restored; torch.optim's other
    optimizers evaluate the closure first, before changing anything, so they need no copy.
    Without a closure, the parameters are as the inner optimizer left them.

    ``scales`` (layer → s_l) and ``complexity`` (layer → last measured value) are readable for
    monitoring. ``state_dict()`` holds the inner optimizer's state and the wrapper's own (its
    moving averages and its settings), as plain data that loads with
    ``torch.load(weights_only=True)``; loading it into a wrapper built with other settings (another
    policy, strength, every, ...) is a ``ValueError`` naming them. The state-dict, load and step
    hooks of ``torch.optim.Optimizer`` fire as on a bare optimizer (global step hooks once per
    step). Under DistributedDataParallel the weights are identical on every rank, and the
    measurement is deterministic, so every rank computes the same scales without communicating.
    Under FSDP2 each sharded weight is gathered to be measured (a collective: step on every rank),
    every rank computes the same scales, and each scales its own shards.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Iterable[Any],
        model: nn.Module | None = None,
        *,
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
        inner: Callable[..., torch.optim.Optimizer] | None = None,
        **inner_kwargs: Any,
    ) -> None:
        if isinstance(optimizer, TopoOptimizer):
            raise TypeError("optimizer is already a TopoOptimizer; wrap the inner optimizer once")
        self._policy_fn = _policy_function(policy)
        settings = _check_settings(metric, strength, every, ema, bounds, tree_every, trees)
        if self._policy_fn is POLICIES["collapse"] and metric != "mean_lifetime":
            warnings.warn(f"TopoOptimizer: policy 'collapse' reads a layer's spread, metric='mean_lifetime' (its "
                          f"mean H0 lifetime over its RMS neuron norm); with metric={metric!r} it acts only where "
                          f"that metric falls below {COLLAPSE_SPREAD}", UserWarning, stacklevel=2)
        if isinstance(optimizer, torch.optim.Optimizer):
            if inner is not None or inner_kwargs:
                raise TypeError("inner and its keyword arguments are for the parameter form, "
                                "TopoOptimizer(params, inner=..., lr=...); got an optimizer instance")
            if model is None:
                raise TypeError("TopoOptimizer(optimizer, model): the model whose layers to measure is missing")
            base, chosen = optimizer, select_layers(model, layers, owner="TopoOptimizer")
            chosen = _layers_it_steps(chosen, base, named=layers is not None)
        else:
            base, chosen = _build_from_parameters(optimizer, inner, inner_kwargs, layers, model)

        # Optimizer.__init__ sets up the hooks and patches `step` for them; its own groups and
        # state are then replaced by the inner optimizer's *objects*, shared from here on.
        super().__init__([{"params": []}], {})
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults = base.defaults
        self.metric, self.policy = settings["metric"], policy
        self.strength, self.every, self.ema = settings["strength"], every, settings["ema"]
        self.bounds = settings["bounds"]
        self.meter = LayerMeter(model, chosen, owner="TopoOptimizer", include_bias=include_bias,
                                tree_every=tree_every, trees=trees)
        self.check_finite = bool(check_finite)
        self._topo = _WrapperState(scales={name: 1.0 for name in chosen})
        self._copies: list[torch.Tensor] = []  # the scaled parameters before the inner step
        self._copy_views: list | None = None  # their numpy views, for the compiled scaling
        self._views_of_params: tuple | None = None  # (memory stamp, numpy views) of the scaled parameters

    # ---- read-only views of the wrapper's state (safe through a forwarding proxy) ----
    @property
    def topo_step(self) -> int:
        return self._topo.topo_step

    @property
    def scales(self) -> dict[str, float]:
        return self._topo.scales

    @property
    def complexity(self) -> dict[str, float]:
        return self._topo.complexity

    @property
    def smoothed(self) -> dict[str, float]:
        return self._topo.smoothed

    @property
    def change(self) -> dict[str, float]:
        return self._topo.change

    @property
    def layer_names(self) -> list[str]:
        return list(self.meter.layers)

    @property
    def _layers(self) -> dict[str, Any]:
        return self.meter.layers


    # ---- the optimizer contract ----
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:  # Optimizer.__init__'s placeholder group
            super().add_param_group(param_group)
        else:
            base.add_param_group(param_group)
            self._topo.scaled = None  # the new parameters may belong to wrapped layers (unfreezing)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        # Like Optimizer's, leave out hooks and a `step` patched onto the instance (an LR
        # scheduler's counter): closures that do not pickle. Keep the inner optimizer, the
        # layers and the moving averages, which a bare optimizer's three keys cannot hold.
        state = {k: v for k, v in self.__dict__.items() if k not in _HOOK_KEYS and k != "step"}
        state["_topo"] = copy.copy(self._topo)
        state["_topo"].scaled = None
        state["_copies"], state["_copy_views"], state["_views_of_params"] = [], None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # fills in empty hooks and re-patches `step`

    def __repr__(self) -> str:
        return (f"TopoOptimizer(metric={self.metric!r}, policy={self.policy!r}, strength={self.strength}, "
                f"every={self.every}, bounds={self.bounds}, layers={list(self._layers)})\n  {self.base_optimizer!r}")

    # ---- measuring topology ----
    def _measure_all(self) -> dict[str, float]:
        """Each wrapped layer's complexity (layers of fewer than 3 neurons, and layers with no
        parameter in the optimizer's groups, left out): the metric a penalty measured on the
        very same weights this step, else built-in float32 CPU layers in one compiled call
        (`LayerMeter.exact_measurements`), else all in one call of the general path
        (`TreeCache.deaths_many`: batched searches, one edge measurement)."""
        managed = {id(p) for group in self.param_groups for p in group["params"]}
        stepped = [name for name, layer in self._layers.items()  # frozen layers: measured once unfrozen
                   if any(id(p) in managed for p in layer_parameters(layer))]
        scaled_by_norm = metric_spec(self.metric).complexity != "as is"
        code = engine_complexity_code(self.metric)
        known = self.meter.known_metrics(stepped, code, fewest=_FEWEST_NEURONS) if code is not None else {}
        rest = [name for name in stepped if name not in known]
        measured_code = METRIC_CODES.get(self.metric)
        exact = self.meter.exact_measurements(rest, measured_code, _FEWEST_NEURONS) \
            if rest and measured_code is not None else {}
        rest = [name for name in rest if name not in exact]
        measured = self.meter.clouds_and_deaths(rest, fewest=_FEWEST_NEURONS) if rest else {}
        values = {}
        for name in stepped:
            if name in known:  # measured by a penalty of the same metric on this very cloud
                values[name] = known[name]
                continue
            if name in exact:
                cloud, term = exact[name]
                if code is not None:  # the engine's metric is the complexity
                    values[name] = term.metric
                    continue
                deaths = term.deaths
            elif name in measured:
                cloud, deaths = measured[name]
            else:
                continue
            rms_norm = cloud_norm(cloud) / math.sqrt(cloud.shape[0]) if scaled_by_norm else 1.0
            value = complexity_of_measured(self.metric, deaths, rms_norm)
            if not math.isfinite(value):
                raise ValueError(f"Layer {name!r}: measuring its {self.metric} gave {value} "
                                 f"(longest bar {float(deaths.max()):.3g}); the weights' scale is out of range")
            values[name] = value
        return values

    @torch.no_grad()
    @torch.compiler.disable
    def update_scales(self) -> dict[str, float]:
        """Measure every wrapped layer now, update the moving averages and the scales.

        `step` calls it on its measuring steps; call it directly to refresh the scales between them.

        Returns
        -------
        dict
            Layer name → scale s_l, clipped to `bounds` (a copy of ``scales``).
        """
        return self._update_scales()

    def _update_scales(self) -> dict[str, float]:
        """`update_scales`, for a caller already eager and without a graph (`_begin_step`)."""
        topo = self._topo
        measured = {}
        for name, value in self._measure_all().items():
            topo.complexity[name] = value
            previous = topo.smoothed.get(name)
            if previous is None:
                topo.smoothed[name] = value
                topo.change[name] = 0.0
            else:
                topo.smoothed[name] = self.ema * previous + (1 - self.ema) * value
                jump = abs(topo.smoothed[name] - previous)
                topo.change[name] = self.ema * topo.change[name] + (1 - self.ema) * jump
            measured[name] = topo.smoothed[name]
        scales = self._policy_fn(measured, topo.change, self.strength) if measured else {}
        if not isinstance(scales, Mapping):
            raise TypeError(f"The policy must return a mapping of layer name to scale, got {type(scales).__name__}")
        low, high = self.bounds
        for name in self._layers:
            raw = scales.get(name, 1.0)
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                raise TypeError(f"The policy gave layer {name!r} the scale {raw!r}: expected a number")
            raw = float(raw)
            if not math.isfinite(raw):
                raise ValueError(f"The policy gave layer {name!r} a non-finite scale: {raw}")
            scale = min(max(raw, low), high)
            topo.scales[name] = 1.0 if abs(scale - 1.0) <= SCALE_DEADBAND else scale
        topo.scaled = None  # the parameters to scale, found again (the layers' parameters may be new)
        return dict(topo.scales)

    # ---- the step ----
    def _scaled_parameters(self) -> tuple[list[torch.Tensor], list[float], list[str]]:
        """Each parameter of a wrapped layer once, with its scale (a shared one: the mean)."""
        managed = {id(p) for group in self.param_groups for p in group["params"]}
        found: dict[int, tuple[torch.Tensor, list[float], list[str]]] = {}
        for name, layer in self._layers.items():
            for param in layer_parameters(layer):
                if id(param) in managed:
                    entry = found.setdefault(id(param), (param, [], []))
                    entry[1].append(self._topo.scales[name])
                    entry[2].append(name)
        params, factors, owners = [], [], []
        for param, scales, names in found.values():
            factor = sum(scales) / len(scales)
            if factor != 1.0:
                params.append(param)
                factors.append(factor)
                owners.append("/".join(dict.fromkeys(names)))
        return params, factors, owners

    @torch.no_grad()
    @torch.compiler.disable
    def _begin_step(self, closure: Callable[[], Any] | None) -> dict[str, Any]:
        """Measure when due and copy what a failed step must restore; eager under torch.compile."""
        topo = self._topo
        plan: dict[str, Any] = {"own": None}
        if topo.topo_step % self.every == 0:  # only a measuring step changes the averages before it succeeds
            plan["own"] = topo.as_dict(list(self._layers))
            self._update_scales()
        if topo.scaled is None:
            topo.scaled = self._scaled_parameters()
        plan["before"], plan["views"] = self._copy_of(_local_shards(topo.scaled[0])[0])
        if closure is not None and _may_evaluate_closure_again(self.base_optimizer):
            all_params = [p for group in self.param_groups for p in group["params"]]
            plan["rollback"] = (all_params, [p.detach().clone() for p in all_params],
                                {p: copy.deepcopy(s) for p, s in self.base_optimizer.state.items()})
        return plan

    @torch.compiler.disable
    def _abort_step(self, plan: dict[str, Any]) -> None:
        if "rollback" in plan:
            params, values, state = plan["rollback"]
            with torch.no_grad():
                torch._foreach_copy_(params, values)
            self.base_optimizer.state.clear()
            self.base_optimizer.state.update(state)
        if plan["own"] is not None:
            self._topo.load(plan["own"])

    @torch.no_grad()
    @torch.compiler.disable
    def _finish_step(self, plan: dict[str, Any]) -> None:
        """Count the step, then scale it: p ← p_old + s·(p_new − p_old), batched."""
        topo = self._topo
        topo.topo_step += 1  # the inner step was taken
        params, factors, owners = topo.scaled
        if not params:
            return
        params, sharded = _local_shards(params)
        if sharded:  # each rank scales its own shards; all of them must agree before any raises
            if self.check_finite:
                self._raise_if_not_finite(_agreed(finite_each(params)), owners)
            torch._foreach_lerp_(params, plan["before"], [1.0 - factor for factor in factors])
            return
        params_now, before_now = self._param_views(params), plan["views"]
        if params_now is not None and before_now is not None:  # one compiled call: check, then scale
            bad = _native.engine.scale_steps(params_now, before_now, [1.0 - factor for factor in factors],
                                             self.check_finite)
            self._raise_if_not_finite([i not in bad for i in range(len(params))], owners)
            return
        if self.check_finite:
            self._raise_if_not_finite(finite_each(params), owners)
        before = plan["before"]
        try:  # p_new + (1 − s)(p_old − p_new) = p_old + s·(p_new − p_old), one batched pass
            torch._foreach_lerp_(params, before, [1.0 - factor for factor in factors])
        except TypeError:  # a torch without lerp's scalar-list overload (raised before any write)
            torch._foreach_sub_(params, before)
            torch._foreach_mul_(params, factors)
            torch._foreach_add_(params, before)

    def _raise_if_not_finite(self, finite: list[bool], owners: list[str]) -> None:
        if not all(finite):
            bad = sorted({owner for owner, ok in zip(owners, finite) if not ok})
            raise FloatingPointError(
                f"TopoOptimizer step {self._topo.topo_step - 1}: the inner optimizer's step made the "
                f"weights of layer(s) {bad} NaN or Inf (non-finite gradients?). They were left "
                f"as the inner optimizer left them, unscaled.")

    def _copy_of(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list | None]:
        """The parameters' values now, in buffers kept between steps (allocating a fresh copy
        each step cost page faults; the same peak memory either way), and numpy views of those
        buffers when the compiled engine can scale the step (CPU float tensors), else None."""
        copies = self._copies
        if len(copies) != len(params) or any(
                c.shape != p.shape or c.dtype != p.dtype or c.device != p.device for c, p in zip(copies, params)):
            copies = self._copies = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
            self._copy_views = _host_views(copies)
        views = self._copy_views
        sources = self._param_views(params) if views is not None else None
        if sources is not None:
            _native.engine.copy_all(sources, views)
        elif params:
            torch._foreach_copy_(copies, params)
        return copies, views if sources is not None else None

    def _param_views(self, params: list[torch.Tensor]) -> list | None:
        """`_host_views` of the parameters, kept while each still has the same memory, shape and
        dtype (``p.data = ...`` gives a parameter new memory: then the views are made again).
        Making them cost ~5 µs a tensor, twice a step."""
        stamp = [(p.data_ptr(), p.shape, p.dtype) for p in params]
        cached = self._views_of_params
        if cached is None or cached[0] != stamp:
            cached = self._views_of_params = (stamp, _host_views(params))
        return cached[1]

    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        """One inner step, then each wrapped layer's update multiplied by its scale s_l
        (measuring first on every `every`-th step). See the class's Safety paragraph for failures.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss, as for the inner optimizer.

        Returns
        -------
        loss : Any
            What the inner optimizer's step returns (the closure's loss, or None).
        """
        topo = self._topo
        if closure is None and topo.topo_step % self.every and topo.scaled is not None and not topo.scaled[0]:
            # nothing to measure, copy or scale: the inner step, counted
            loss = _inner_step(self.base_optimizer, None)
            topo.topo_step += 1
            return loss
        plan = self._begin_step(closure)
        try:
            loss = _inner_step(self.base_optimizer, closure)
        except BaseException:
            self._abort_step(plan)
            raise
        self._finish_step(plan)
        return loss

    # ---- checkpointing ----
    def _settings(self) -> dict[str, Any]:
        """The wrapper's own hyper-parameters, as plain data (a callable policy by its name)."""
        policy = self.policy if isinstance(self.policy, str) else (
            f"callable {getattr(self.policy, '__module__', '?')}.{getattr(self.policy, '__qualname__', '?')}")
        return {"metric": self.metric, "policy": policy, "strength": self.strength, "every": self.every,
                "ema": self.ema, "bounds": list(self.bounds), "tree_every": self.tree_every,
                "include_bias": self.include_bias}

    def state_dict(self) -> dict[str, Any]:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = self.base_optimizer.state_dict()
        state["topoopt"] = self._topo.as_dict(list(self._layers))
        state["topoopt"]["settings"] = self._settings()
        if self.tree_every > 1:  # approximate trees: the resumed run must reuse the same ones
            state["topoopt"]["trees"] = self.trees.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        own = state_dict.pop("topoopt", None)
        if own is None:
            raise UnknownName("This state_dict has no 'topoopt' entry: it was not saved by a TopoOptimizer")
        if list(own["layers"]) != list(self._layers):
            saved, mine = list(own["layers"]), list(self._layers)
            only_saved, only_mine = [n for n in saved if n not in mine], [n for n in mine if n not in saved]
            difference = (f"saved only: {only_saved[:5]}{' …' if len(only_saved) > 5 else ''}; "
                          f"this wrapper's only: {only_mine[:5]}{' …' if len(only_mine) > 5 else ''}"
                          if only_saved or only_mine else "the same layers in another order")
            raise ValueError(f"The saved layers differ from this wrapper's ({difference})")
        if "settings" in own:
            mine = self._settings()
            changed = [f"{key} {own['settings'].get(key)!r} → {value!r}" for key, value in mine.items()
                       if own["settings"].get(key) != value]
            if changed:
                raise ValueError(f"This TopoOptimizer's settings differ from the saved ones ({'; '.join(changed)}): "
                                 f"build it with the saved settings, or delete state_dict['topoopt']['settings'] "
                                 f"to resume with the new ones")
        base = self.base_optimizer
        groups, state = self.param_groups, self.state
        base.load_state_dict(state_dict)
        # The inner load re-binds its groups and state to new objects; put their contents into
        # the shared ones instead, so that everything holding them (this wrapper, a proxy, a
        # scheduler) stays linked.
        groups[:] = base.param_groups
        base.param_groups = groups
        new_state = dict(base.state)
        state.clear()
        state.update(new_state)
        base.state = state
        self._topo.load(own)
        if "trees" in own:
            self.trees.load_state_dict(own["trees"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


# Scales this close to 1 are exactly 1: a step changed by at most 0.1% is not worth copying and
# rescaling the layer's parameters on every step (on resnet18, 5–15% of a step at every=10, for
# `calm`'s 0.99995 at initialisation).
SCALE_DEADBAND = 1e-3

# A layer of 2 neurons has one bar: its normalized entropy is 0 whatever its weights (a binary
# classifier's head), so it would read as the simplest layer of any model and move every policy's
# cross-layer statistics. Smaller layers keep s = 1 and stay out of them.
_FEWEST_NEURONS = 3

# torch.optim's optimizers that call the closure once, first, before changing anything: if it
# raises, nothing has moved, so their closure steps need no copy (Lightning passes a closure on
# every step). LBFGS, and any optimizer not listed, may call it again after moving parameters.
_CLOSURE_FIRST = tuple(
    getattr(torch.optim, name) for name in ("SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD",
                                            "NAdam", "RAdam", "RMSprop", "Rprop", "SparseAdam", "Adafactor", "Muon")
    if hasattr(torch.optim, name)
)


def _may_evaluate_closure_again(base: torch.optim.Optimizer) -> bool:
    step = getattr(type(base).step, "__wrapped__", type(base).step)
    return not any(isinstance(base, cls) and step is getattr(cls.step, "__wrapped__", cls.step)
                   for cls in _CLOSURE_FIRST)


def _inner_step(base: torch.optim.Optimizer, closure: Callable[[], Any] | None) -> Any:
    """The inner optimizer's step with its own hooks, but not the global ones.

    torch.optim runs the global step hooks around every patched ``step``; the wrapper's own
    step already ran them, so calling the inner's patched step would run them twice.
    """
    patched = type(base).step
    raw = getattr(patched, "__wrapped__", None)
    if raw is None or not getattr(patched, "hooked", False) or "step" in base.__dict__:
        return base.step(closure) if closure is not None else base.step()
    args: tuple = (base, closure) if closure is not None else (base,)
    kwargs: dict[str, Any] = {}
    for hook in base._optimizer_step_pre_hooks.values():
        result = hook(base, args, kwargs)
        if result is not None:
            args, kwargs = result
    loss = raw(*args, **kwargs)
    base._optimizer_step_code()
    for hook in base._optimizer_step_post_hooks.values():
        hook(base, args, kwargs)
    return loss


def _policy_function(policy: str | Policy) -> Policy:
    if isinstance(policy, str):
        return POLICIES[check_choice("policy", policy, POLICIES)]
    if callable(policy):
        try:
            inspect.signature(policy).bind({}, {}, 1.0)
        except TypeError:
            raise TypeError(f"Invalid policy: {policy!r}. It must take (complexity, change, strength): two "
                            f"mappings of layer name to number and a float, and return each layer's scale") from None
        except ValueError:  # no signature to read (a builtin): it is called as it is
            pass
        return policy
    raise TypeError(f"Invalid policy: {a_kind(policy)}. It must be a policy's name or a callable")


def _check_settings(metric, strength, every, ema, bounds, tree_every, trees) -> dict[str, Any]:
    check_choice("metric", metric, COMPLEXITY_METRICS)
    strength = check_number("strength", strength, low=0.0)
    ema = check_number("ema", ema, low=0.0, high=1.0, high_open=True,
                       note="1 would never update the average" if ema == 1 else "")
    check_positive_int("every", every)
    check_positive_int("tree_every", tree_every)
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
        raise invalid("bounds", bounds, "a pair (low, high)")
    low = check_number("lower bound", bounds[0], low=0.0, low_open=True)
    high = check_number("upper bound", bounds[1], low=0.0, low_open=True)
    if not low <= 1.0 <= high:
        raise invalid("bounds", tuple(bounds), "a pair with low ≤ 1 ≤ high")
    if trees is not None:
        check_instance("trees", trees, TreeCache, "a topoopt.TreeCache")
    return {"metric": metric, "strength": strength, "ema": ema, "bounds": (low, high)}


def _layers_it_steps(chosen: dict[str, Any], base: torch.optim.Optimizer, named: bool) -> dict[str, Any]:
    """The chosen layers, checked against the optimizer. Layers the user named must each have a
    parameter there; of the model's layers found by default (fine-tuning: an optimizer over the
    trainable parameters), the frozen ones are kept but not measured until their parameters join
    the optimizer (``add_param_group``, gradual unfreezing), with one warning naming them."""
    managed = {id(p) for group in base.param_groups for p in group["params"]}
    stepped = {name: layer for name, layer in chosen.items() if any(id(p) in managed for p in layer_parameters(layer))}
    frozen = [name for name in chosen if name not in stepped]
    if named and frozen:
        raise ValueError(f"Layer {frozen[0]!r} has no parameter in the optimizer's param_groups: leave it out of "
                         f"layers=, or give its parameters to the optimizer")
    if not stepped:
        raise ValueError("TopoOptimizer: none of the model's layers has a parameter in the optimizer's param_groups")
    if frozen:
        warnings.warn(f"TopoOptimizer does not measure {len(frozen)} layer(s) whose parameters the optimizer does not "
                      f"step (frozen, as in fine-tuning) until they join it: {frozen[:5]}"
                      f"{' …' if len(frozen) > 5 else ''}", TopologyCoverageWarning, stacklevel=user_stacklevel())
    return chosen


def _build_from_parameters(
    params: Iterable[Any], inner: Callable[..., torch.optim.Optimizer] | None,
    inner_kwargs: dict[str, Any], layers: Iterable[str] | None, model: nn.Module | None,
) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """The inner optimizer built from `params`, and its layers: with `model`, the model's
    clouds that have a parameter among `params`; without, one per weight of 2+ dimensions."""
    if _built_by_zero():
        raise TypeError("TopoOptimizer cannot be ZeroRedundancyOptimizer's optimizer_class: each rank would measure "
                        "only the layers in its shard and scale them differently; wrap ZeRO instead: "
                        "TopoOptimizer(ZeroRedundancyOptimizer(model.parameters(), optimizer_class=...), model)")
    if inner is None:
        raise TypeError("TopoOptimizer(params, inner=torch.optim.SGD, lr=...): inner, the optimizer "
                        "class to build, is missing (or pass an optimizer instance and the model)")
    if not callable(inner):
        raise invalid("inner", inner, "an optimizer class or a callable returning one", TypeError)
    if isinstance(params, (torch.Tensor, str)) or not isinstance(params, Iterable):
        raise TypeError(f"Invalid params: {a_kind(params)}. It must be an iterable of parameters, "
                        f"(name, parameter) pairs or param groups")
    params = [dict(g) if isinstance(g, Mapping) else g for g in params]
    base = inner(params, **inner_kwargs)
    if not isinstance(base, torch.optim.Optimizer):
        raise TypeError(f"Invalid inner: it built {a_kind(base)}. It must build a torch.optim.Optimizer")
    if model is not None:
        check_instance("model", model, nn.Module, "an nn.Module")
        chosen = select_layers(model, layers, owner="TopoOptimizer")
        return base, _layers_it_steps(chosen, base, named=layers is not None)
    named = _named_tensors(params)
    suspects = [name or f"param{index}" for index, (name, tensor) in enumerate(named)
                if tensor.dim() >= 3 or (tensor.dim() == 2 and name is not None and _NOT_ROWS.search(name))]
    if suspects:
        warnings.warn(f"TopoOptimizer(params, inner=...) without model= reads each weight as rows of neurons, "
                      f"which may be wrong for {suspects[:4]}{' and more' if len(suspects) > 4 else ''} (by their "
                      f"names embeddings, packed Q/K/V, RNN or HF Conv1D weights; 3+-D weights are read as Conv, "
                      f"wrong for a ConvTranspose); pass model=your_model to read each layer by its type",
                      TopologyCoverageWarning, stacklevel=user_stacklevel())
    available = _parameter_layers(named)
    if layers is None:
        chosen = available
    else:
        if isinstance(layers, str):
            raise TypeError(f"layers must be a list of layer names, got the string {layers!r}")
        unknown = [name for name in layers if name not in available]
        if unknown:
            raise UnknownName(f"Unknown layer name(s) {unknown}. Layers with a neuron cloud: {list(available)}")
        chosen = {name: available[name] for name in layers}
    if not chosen:
        raise ValueError("params hold no parameter of 2 or more dimensions, so no layer has a neuron cloud")
    return base, chosen


def _built_by_zero() -> bool:
    """Whether this construction is ZeroRedundancyOptimizer building its per-rank optimizer."""
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # a torch without distributed
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), ZeroRedundancyOptimizer):
            return True
        frame = frame.f_back
    return False


# Parameter names whose rows are not a layer's neurons (the parameter form cannot see the module).
_NOT_ROWS = re.compile(r"(^|\.)(in_proj_weight|[qkv]_proj_weight|weight_(ih|hh|hr)(_l\d+(_reverse)?)?|c_attn\.weight|"
                       r"c_fc\.weight|c_proj\.weight|wte\.weight|wpe\.weight|[a-z_]*embed[a-z_]*\.weight)$")


def _named_tensors(params: list[Any]) -> list[tuple[str | None, torch.Tensor]]:
    found: list[tuple[str | None, torch.Tensor]] = []

    def add(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            found.append((None, item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            found.append((str(item[0]), item[1]))
        else:
            raise TypeError(f"Invalid params: they hold {a_kind(item)}. They must hold tensors or "
                            f"(name, tensor) pairs")

    for item in params:
        if isinstance(item, dict):
            group = item["params"]
            for member in [group] if isinstance(group, torch.Tensor) else group:
                add(member)
        else:
            add(item)
    return found


def _parameter_layers(named: list[tuple[str | None, torch.Tensor]]) -> dict[str, ParameterLayer]:
    weights: dict[str, torch.Tensor] = {}
    for index, (name, tensor) in enumerate(named):
        if tensor.dim() >= 2:
            layer = f"param{index}" if name is None else name.removesuffix(".weight")
            weights[layer] = tensor
    biases = {name.removesuffix(".bias"): tensor for name, tensor in named
              if name is not None and name.endswith(".bias") and tensor.dim() == 1}
    return {
        layer: ParameterLayer(weight, biases.get(layer) if layer in biases and
                              biases[layer].shape[0] == weight.shape[0] else None)
        for layer, weight in weights.items()
    }
