"""Which layers of a model have a neuron cloud, and a per-layer topology report."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from topoopt.cloud import CLOUD_LAYER_TYPES, ParameterLayer, layer_cloud, neuron_cloud
from topoopt.metrics import (
    max_lifetime,
    mean_lifetime,
    normalized_persistent_entropy,
    persistent_entropy,
    total_persistence,
)
from topoopt.persistence import h0_deaths

__all__ = ["topological_layers", "select_layers", "layer_parameters", "LayerTopology", "layer_topology"]


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP/DataParallel and torch.compile wrap the user's model; layer names are the inner ones.
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def topological_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv layer of `model` by its `named_modules` name, in definition order.

    A model that is itself a single layer is returned under the name "" .
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {
        name: module
        for name, module in _unwrap(model).named_modules()
        if isinstance(module, CLOUD_LAYER_TYPES)
    }


def select_layers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The layers named in `layers` (all of them when None); unknown names are a `KeyError`."""
    available = topological_layers(model)
    if layers is None:
        return available
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of layer names, got the string {layers!r}")
    chosen = list(layers)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise KeyError(
            f"Unknown layer name(s) {unknown}. Layers with a neuron cloud: {list(available)}"
        )
    return {name: available[name] for name in chosen}


def layer_parameters(module: nn.Module | ParameterLayer) -> list[torch.Tensor]:
    """The parameters that produce a layer's weight and bias, each once.

    Its own (``weight``, ``bias``) and, for a parametrized layer (``weight_norm``,
    ``spectral_norm``, any ``torch.nn.utils.parametrize``), the parametrization's: there
    ``module.parameters(recurse=False)`` sees only the bias.
    """
    if isinstance(module, ParameterLayer):
        return [t for t in (module.weight, module.bias) if t is not None]
    # what ``module.parameters(recurse=False)`` gives (its own, once, no None), without the
    # generator machinery: the optimizer asks on each measuring step
    found = {id(p): p for p in module._parameters.values() if p is not None}
    parametrizations = module._modules.get("parametrizations")  # where torch.nn.utils.parametrize keeps them
    if isinstance(parametrizations, nn.Module):
        found.update((id(p), p) for p in parametrizations.parameters())
    return list(found.values())


@dataclass(frozen=True)
class LayerTopology:
    """H0 summary of one layer's neuron cloud (plain floats, detached from autograd)."""

    n_neurons: int
    dim: int
    normalized_entropy: float
    entropy: float
    mean_lifetime: float
    total_persistence: float
    max_lifetime: float
    zero_bars: int
    weight_norm: float
    deaths: torch.Tensor


@torch.no_grad()
def layer_topology(
    model: nn.Module, layers: Iterable[str] | None = None, include_bias: bool = False
) -> dict[str, LayerTopology]:
    """H0 deaths and metrics of every Linear/Conv layer (or those named in `layers`)."""
    report = {}
    for name, module in select_layers(model, layers).items():
        cloud = layer_cloud(name, module, include_bias)
        if cloud is None:  # no neurons or no inputs: an empty diagram
            shape = neuron_cloud(module, include_bias=include_bias).shape
            cloud = torch.zeros(shape)
            deaths = cloud.new_zeros(0)
        else:
            cloud = cloud.detach()
            deaths = h0_deaths(cloud)
        report[name] = LayerTopology(
            n_neurons=cloud.shape[0],
            dim=cloud.shape[1],
            normalized_entropy=float(normalized_persistent_entropy(deaths)),
            entropy=float(persistent_entropy(deaths)),
            mean_lifetime=float(mean_lifetime(deaths)),
            total_persistence=float(total_persistence(deaths)),
            max_lifetime=float(max_lifetime(deaths)),
            zero_bars=int((deaths == 0).sum()),
            weight_norm=float(torch.linalg.vector_norm(cloud.double())),
            deaths=deaths.cpu(),
        )
    return report
