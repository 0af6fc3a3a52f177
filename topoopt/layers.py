"""Which neuron clouds a model has, what is left out and why, and the parameters behind each cloud."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from topoopt._validation import UnknownName, check_choice, check_instance, check_positive_int
from topoopt.cloud import NeuronSample, ParameterLayer
from topoopt.neurons import FUSED_QKV_CHOICES, LayerPart, check_spec, cloud_specs, not_a_cloud_reason

__all__ = ["topological_layers", "select_layers", "layer_parameters", "coverage",
           "Coverage", "MeasuredCloud", "SkippedParameter", "TopologyCoverageWarning", "DEFAULT_MAX_NEURONS"]


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP/DataParallel and torch.compile wrap the user's model; layer names are the inner ones.
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


DEFAULT_MAX_NEURONS = 30_000
"""Layers with more neurons are left out unless named: above every hidden layer of common models
(Llama-2-70B's MLP has 28,672), below every language model's vocabulary (BERT 30,522, Llama 32,000,
GPT-2 50,257, Llama-3 128,256), whose one measurement costs many training steps."""


class TopologyCoverageWarning(UserWarning):
    """Some of a model's weights are not measured: unknown layer types, or layers left out by size."""


@dataclass(frozen=True)
class MeasuredCloud:
    """One neuron cloud that is measured, with what one exact measurement costs."""

    layer_type: str
    neurons: int
    dim: int

    @property
    def gram_gflop(self) -> float:
        """The dominant cost of a tree search: one triangle of the N×N Gram product, N²·d flops."""
        return self.neurons * self.neurons * self.dim / 1e9

    @property
    def matrix_mib(self) -> float:
        """One N×N float32 matrix, the search's working set on a device."""
        return 4 * self.neurons * self.neurons / 2**20


@dataclass(frozen=True)
class SkippedParameter:
    """A parameter no measured cloud uses, and why."""

    name: str
    layer_type: str
    shape: tuple[int, ...]
    reason: str
    known: bool  # left out by design (an embedding, a norm), not for want of a definition


@dataclass
class Coverage:
    """What topoopt measures in a model: every cloud with its shape and cost, every parameter it
    leaves out with the reason, and the layers left out for their size (`max_neurons`)."""

    measured: dict[str, MeasuredCloud]
    skipped: list[SkippedParameter]
    oversized: dict[str, MeasuredCloud]
    max_neurons: int | None

    @property
    def unknown_types(self) -> list[str]:
        """Layer types holding weights of 2+ dimensions that no definition covers."""
        return list(dict.fromkeys(p.layer_type for p in self.skipped if not p.known))

    def __str__(self) -> str:
        width = max([len(name or "<model>") for name in self.measured] + [14])
        kinds = max([len(cloud.layer_type) for cloud in self.measured.values()] + [4])
        lines = [f"{'measured cloud':<{width}}  {'type':<{kinds}}  {'neurons × dim':>15}  {'Gram GFLOP':>10}  "
                 f"{'N×N MiB':>8}"]
        for name, cloud in self.measured.items():
            lines.append(f"{name or '<model>':<{width}}  {cloud.layer_type:<{kinds}}  "
                         f"{f'{cloud.neurons} × {cloud.dim}':>15}  {cloud.gram_gflop:>10.3f}  {cloud.matrix_mib:>8.1f}")
        total = sum(c.gram_gflop for c in self.measured.values())
        lines.append(f"{len(self.measured)} clouds, {total:.3f} GFLOP per full measurement")
        for name, cloud in self.oversized.items():
            lines.append(f"left out for size: {name or '<model>'} ({cloud.layer_type}, {cloud.neurons} × {cloud.dim} > "
                         f"max_neurons={self.max_neurons}, {cloud.gram_gflop:.1f} GFLOP)")
        groups: dict[tuple[str, str], list[str]] = {}
        for skipped in self.skipped:
            groups.setdefault((skipped.layer_type, skipped.reason), []).append(skipped.name)
        for (layer_type, reason), names in groups.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            lines.append(f"not measured: {layer_type} ({shown}): {reason}")
        return "\n".join(lines)


def _join(name: str, suffix: str) -> str:
    if not suffix:
        return name
    return suffix.removeprefix(".") if not name else name + suffix


def _discover(model: nn.Module, fused_qkv: str, max_neurons: int | None) -> tuple[dict[str, Any], Coverage]:
    """Every neuron cloud of `model` by name, in definition order, and what is left out."""
    check_instance("model", model, nn.Module, "an nn.Module")
    check_choice("fused_qkv", fused_qkv, FUSED_QKV_CHOICES)
    check_positive_int("max_neurons", max_neurons, none_ok=True)
    root = _unwrap(model)
    layers: dict[str, Any] = {}
    measured: dict[str, MeasuredCloud] = {}
    oversized: dict[str, MeasuredCloud] = {}
    stood_for: set[int] = set()  # submodules an ancestor's clouds stand for (a fused QKV child)
    used: set[int] = set()
    too_big: set[int] = set()  # parameters of the layers left out for their size
    for name, module in root.named_modules():
        if id(module) in stood_for:
            continue
        specs = cloud_specs(module, fused_qkv)
        if specs is None:
            continue
        for suffix, spec in specs.items():
            full = _join(name, suffix)
            if full in layers or full in oversized:
                raise ValueError(f"Two neuron clouds of the model are both named {full!r}: rename the module "
                                 f"whose name ends in '[...]'")
            if spec.child:
                stood_for.add(id(module.get_submodule(spec.child)))
            if spec.checked:  # a registered layer stands for its whole subtree
                stood_for.update(id(m) for m in module.modules() if m is not module)
            layer = module if suffix == "" else LayerPart(module, suffix, spec)
            params = layer_parameters(layer)
            if any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
                shape = (0, 0)  # a lazy layer: its size is known after the first forward pass
            else:
                shape = tuple(check_spec(full, module, spec).shape)
            cloud = MeasuredCloud(type(module).__name__ + suffix, *shape)
            if max_neurons is not None and shape[0] > max_neurons:
                oversized[full] = cloud
                too_big.update(id(p) for p in params)
                continue
            used.update(id(p) for p in params)
            layers[full] = layer
            measured[full] = cloud
    skipped, seen = [], set(used)
    for name, module in root.named_modules():
        for pname, parameter in module.named_parameters(prefix=name, recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            reason = not_a_cloud_reason(module, pname.rsplit(".", 1)[-1], parameter)
            known = reason is not None
            if id(parameter) in too_big:
                reason, known = "its layer is left out for its size (max_neurons)", True
            skipped.append(SkippedParameter(pname, type(module).__name__, tuple(parameter.shape),
                                            reason or f"no neuron cloud is defined for {type(module).__name__} "
                                                      f"(topoopt.register_layer)", known))
    return layers, Coverage(measured, skipped, oversized, max_neurons)


def topological_layers(model: nn.Module, *, max_neurons: int | None = DEFAULT_MAX_NEURONS,
                       fused_qkv: str = "split") -> dict[str, Any]:
    """Every neuron cloud of `model` by name, in definition order (see `topoopt.neurons`).

    A layer with one cloud (Linear, Conv, ConvTranspose, HF Conv1D, Bilinear) is listed as its
    module, under its `named_modules` name ("" for a model that is itself one layer); a module with
    several (attention's Q/K/V, an RNN's gates) as one `LayerPart` per cloud, ``"attn[q]"``,
    ``"lstm[l0.f]"``. Layers of more than `max_neurons` neurons (vocabulary-sized heads) are left
    out (None: no limit); `fused_qkv` ("split" or "whole") says how fused QKV projections are read.
    """
    return _discover(model, fused_qkv, max_neurons)[0]


def coverage(model: nn.Module, *, max_neurons: int | None = DEFAULT_MAX_NEURONS,
             fused_qkv: str = "split") -> Coverage:
    """What topoopt measures in `model` and what it leaves out, with reasons and costs;
    ``print(topoopt.coverage(model))`` shows it as a table."""
    return _discover(model, fused_qkv, max_neurons)[1]


def select_layers(model: nn.Module, layers: Iterable[str] | Mapping[str, Any] | None = None, *,
                  owner: str | None = None, max_neurons: int | None = DEFAULT_MAX_NEURONS,
                  fused_qkv: str = "split") -> dict[str, Any]:
    """The layers named in `layers` (all of them when None); unknown names are a `KeyError`.

    `layers` may also be a mapping of name → layer, as `topological_layers` returns it (with other
    options, or with `sample_neurons` in place of a large layer): it is then taken as it is. A
    name given explicitly is measured whatever its size. With `owner` (the calling class's name),
    a model whose weights are only partly measured gets one `TopologyCoverageWarning` naming what
    is left out, and a model with nothing to measure a `ValueError`.
    """
    if isinstance(layers, Mapping):
        chosen = dict(layers)
        for name, layer in chosen.items():
            if not isinstance(name, str):
                raise TypeError(f"layers: layer names must be strings, got {name!r}")
            if not isinstance(layer, (nn.Module, ParameterLayer, LayerPart, NeuronSample)):
                raise TypeError(f"layers[{name!r}] is a {type(layer).__name__}, not a layer "
                                f"(an nn.Module, LayerPart, ParameterLayer or NeuronSample)")
            if isinstance(layer, nn.Module):
                specs = cloud_specs(layer)
                if specs is None or list(specs) != [""]:
                    what = "has no neuron cloud" if specs is None else f"has several clouds ({', '.join(specs)})"
                    raise TypeError(f"layers[{name!r}]: a {type(layer).__name__} {what}; give a layer, or "
                                    f"the parts topological_layers lists")
        if not chosen and owner is not None:
            raise ValueError(f"{owner}: layers is empty, so there is nothing to measure")
        return chosen
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of layer names, got the string {layers!r}")
    if layers is not None:
        available = topological_layers(model, max_neurons=None, fused_qkv=fused_qkv)
        chosen_names = list(layers)
        if not chosen_names and owner is not None:
            raise ValueError(f"{owner}: layers is empty, so there is nothing to measure")
        unknown = [name for name in chosen_names if name not in available]
        if unknown:
            raise UnknownName(f"Unknown layer name(s) {unknown}. Layers with a neuron cloud: {list(available)}")
        return {name: available[name] for name in chosen_names}
    available, report = _discover(model, fused_qkv, max_neurons)
    if owner is not None:
        _speak(owner, report)
    return available


def _speak(owner: str, report: Coverage) -> None:
    """One warning line for what is left out, or an error when nothing is measured."""
    unknown = report.unknown_types
    if not report.measured:
        found = unknown or list(dict.fromkeys(p.layer_type for p in report.skipped))
        big = f"; left out for size: {list(report.oversized)}" if report.oversized else ""
        raise ValueError(f"{owner}: the model has no layer with a neuron cloud (its parameters are in "
                         f"{found or 'no layer'}{big}); see topoopt.coverage(model) and topoopt.register_layer")
    parts = []
    if unknown:
        examples = [p.name for p in report.skipped if not p.known][:3]
        parts.append(f"weights of layer types it has no neuron definition for, {unknown} (e.g. {examples}): "
                     f"register them with topoopt.register_layer")
    if report.oversized:
        sizes = ", ".join(f"{name!r} ({cloud.neurons} neurons)" for name, cloud in report.oversized.items())
        parts.append(f"layers above max_neurons={report.max_neurons}, {sizes}: name them in layers= to "
                     f"measure them, or pass a topoopt.sample_neurons of them")
    if parts:
        warnings.warn(f"{owner} does not measure " + "; and ".join(parts), TopologyCoverageWarning,
                      stacklevel=user_stacklevel())


def user_stacklevel() -> int:
    """The `warnings.warn` stacklevel of the first caller outside topoopt, so that a warning
    points at the user's line, however deep in the package it was raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_globals.get("__name__", "").split(".")[0] == "topoopt"
                                 or frame.f_globals.get("__name__") == "torch.utils._contextlib"):  # no_grad
        frame, level = frame.f_back, level + 1
    return level


_PLAIN_WEIGHT_LAYERS = frozenset({nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                  nn.ConvTranspose3d})


def layer_parameters(module: nn.Module | ParameterLayer | LayerPart | NeuronSample) -> list[torch.Tensor]:
    """The parameters that produce a layer's weight and bias, each once.

    Its own (``weight``, ``bias``) and, for a parametrized layer (``weight_norm``,
    ``spectral_norm``, any ``torch.nn.utils.parametrize``), the parametrization's: there
    ``module.parameters(recurse=False)`` sees only the bias.
    """
    if isinstance(module, NeuronSample):
        return layer_parameters(module.layer)
    if isinstance(module, ParameterLayer):
        return [t for t in (module.weight, module.bias) if t is not None]
    if isinstance(module, LayerPart):
        if module.spec.parameters is not None:
            return list(module.spec.parameters(module.module))
        module = module.module
    elif type(module) not in _PLAIN_WEIGHT_LAYERS:  # a registered type may say which parameters make it
        spec = (cloud_specs(module) or {}).get("")
        if spec is not None and spec.parameters is not None:
            return list(spec.parameters(module))
    # what ``module.parameters(recurse=False)`` gives (its own, once, no None), without the
    # generator machinery: the optimizer asks on each measuring step
    found = {id(p): p for p in module._parameters.values() if p is not None}
    parametrizations = module._modules.get("parametrizations")  # where torch.nn.utils.parametrize keeps them
    if isinstance(parametrizations, nn.Module):
        found.update((id(p), p) for p in parametrizations.parameters())
    return list(found.values())
