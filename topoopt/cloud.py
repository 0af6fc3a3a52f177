"""A layer's neurons as a point cloud: neuron i is the vector of its incoming weights."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from topoopt import _native
from topoopt._validation import check_positive_int, compiled_all_finite, functorch_active, invalid
from topoopt.neurons import LayerPart, cloud_specs, plain_weight_rows, weight_cloud
from topoopt.persistence import as_cloud

__all__ = ["neuron_cloud", "layer_cloud", "weight_cloud", "cloud_norm", "ParameterLayer", "LayerPart",
           "NeuronSample", "sample_neurons"]


def cloud_norm(cloud: torch.Tensor) -> float:
    """‖cloud‖_F, summed in float64 (a float32 sum of squares overflows for weights near 1e19):
    one compiled pass for a CPU float32/float64 cloud (at 100×784, 20 µs against 64–80 µs for
    `torch.linalg.vector_norm` with a float64 dtype), torch elsewhere."""
    if _native.engine is not None and cloud.device.type == "cpu" and cloud.dtype in (torch.float32, torch.float64):
        x = cloud.detach().contiguous()
        norm = math.sqrt(_native.engine.sum_of_squares(x.numpy(), x.element_size()))
    else:
        norm = float(torch.linalg.vector_norm(cloud.detach(), dtype=torch.float64))
    if math.isinf(norm) or (norm < 1e-150 and cloud.numel()):  # float64 squares beyond or below the range
        largest = float(cloud.detach().abs().max())
        if largest > 0:
            return largest * float(torch.linalg.vector_norm(cloud.detach().double() / largest))
    return norm


@dataclass(frozen=True, eq=False)
class ParameterLayer:
    """A layer known only by its parameters (no module): neuron i is row i of ``weight``,
    flattened (a Linear weight, or a Conv weight per output channel), ``bias`` its optional bias.

    What `TopoOptimizer` builds when it is given parameters instead of a model. A transposed
    convolution's weight is laid out (in, out, ...): give the module for those.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None


def neuron_cloud(module: nn.Module | ParameterLayer | LayerPart | NeuronSample,
                 include_bias: bool = False) -> torch.Tensor:
    """The N×d cloud of a layer's neurons, keeping the autograd graph to its weight.

    What a neuron is, layer type by layer type, is `topoopt.neurons`' registry: row i of a
    Linear weight, one flattened filter per Conv/ConvTranspose output channel, a column of HF's
    Conv1D, ... A module with several clouds (attention's Q/K/V, an RNN's gates) is measured by
    its parts (`LayerPart`, as `topological_layers` lists them). With `include_bias` each
    neuron's bias is appended as one more coordinate. A layer with an ``effective_weight`` (a
    masked layer) gives that instead of its raw weight; a parametrized weight (weight norm,
    spectral norm, ...) is read as the layer uses it. A module of an unknown type is a
    `TypeError` (see `topoopt.register_layer`).
    """
    if isinstance(module, NeuronSample):
        cloud = neuron_cloud(module.layer, include_bias)
        return cloud.index_select(0, module.rows.to(cloud.device))
    if isinstance(module, ParameterLayer):
        cloud = whole(weight_cloud(module.weight))
        return _with_bias(cloud, whole(module.bias), "layer") if include_bias else cloud
    if isinstance(module, LayerPart):
        spec, kind = module.spec, f"{module.kind}{module.part}"
        module = module.module
    else:
        if not isinstance(module, nn.Module):
            raise TypeError(f"neuron_cloud takes a layer (an nn.Module, ParameterLayer or LayerPart), "
                            f"got {type(module).__name__}")
        specs = cloud_specs(module)
        if specs is None:
            raise TypeError(f"neuron_cloud: {type(module).__name__} has no registered neuron cloud "
                            f"(see topoopt.register_layer)")
        if list(specs) != [""]:
            raise TypeError(f"neuron_cloud: a {type(module).__name__} has several neuron clouds "
                            f"({', '.join(specs)}): measure its parts, as topological_layers lists them")
        spec, kind = specs[""], type(module).__name__
    cloud = whole(spec.rows(module))
    return _with_bias(cloud, whole(spec.bias(module)), kind) if include_bias else cloud


def whole(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A sharded tensor (a DTensor: FSDP2's parameters, tensor parallelism) gathered whole on
    every rank, differentiably (its gradient goes back to each rank's shard); any other tensor
    as it is. A layer's H0 needs all its neurons: a shard's tree is not the layer's. Gathering is
    a collective, so every rank must measure the same layers in the same order, as the tools do."""
    if tensor is not None and type(tensor) is not torch.Tensor and hasattr(tensor, "full_tensor") \
            and hasattr(tensor, "placements"):
        return tensor.full_tensor()
    return tensor


@dataclass(frozen=True, eq=False)
class NeuronSample:
    """A fixed subset of a layer's neurons, measured in its place (for vocabulary-sized layers).

    ``rows`` are the kept neurons' indices, drawn once (see `sample_neurons`), so every
    measurement of a run sees the same neurons. The subset's H0 is not the layer's: a subset's
    nearest neighbours are farther apart, so its deaths are longer (mean lifetime biased upward,
    roughly by (N/k)^(1/d_eff) for a cloud of intrinsic dimension d_eff), while a scale-free
    metric such as normalized entropy moves much less.
    """

    layer: nn.Module | ParameterLayer | LayerPart
    rows: torch.Tensor


def sample_neurons(layer, size: int, seed: int = 0) -> NeuronSample:
    """`size` neurons of `layer`, drawn uniformly without replacement by a generator seeded
    with `seed` (sorted, so the subset keeps the layer's order)."""
    check_positive_int("sample size", size, at_least=2)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise invalid("seed", seed, "an int")
    n = neuron_cloud(layer).shape[0]
    if size > n:
        raise invalid("sample size", size, f"at most the layer's {n} neurons (measure it whole)")
    size, seed = int(size), int(seed)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=generator)[:size].sort().values
    return NeuronSample(layer, rows)


def _with_bias(cloud: torch.Tensor, bias: torch.Tensor | None, kind: str) -> torch.Tensor:
    if bias is None:
        raise ValueError(f"include_bias=True, but this {kind} has no bias")
    if bias.dim() not in (1, 2) or cloud.shape[0] != bias.shape[0]:
        raise ValueError(
            f"include_bias=True needs one bias per neuron: {cloud.shape[0]} neurons, "
            f"bias of shape {tuple(bias.shape)}"
        )
    # a GRU's candidate gate has two biases a neuron (N×2): both are appended
    return torch.cat([cloud, bias.unsqueeze(1) if bias.dim() == 1 else bias], dim=1)


def layer_cloud(name: str, module: nn.Module | ParameterLayer, include_bias: bool = False,
                copy: bool = False) -> torch.Tensor | None:
    """The layer's cloud checked for measuring, or None when it has no geometry to measure.

    None for a layer with no neurons or no incoming weights (``Linear(5, 0)``, ``Linear(0, 5)``):
    its diagram is empty. Errors name the layer: NaN/Inf weights, weights on the ``meta`` device.
    float16/bfloat16 weights come back as float32. With `copy`, the cloud is a differentiable copy
    that shares no memory with the weights: the compiled engine's host views of a tensor make its
    storage unresizable for good, which FSDP2 needs for the gathered weights it lends a layer.
    """
    if not (copy or include_bias):  # a built-in layer's finite CPU weight: no checks but the finiteness pass
        rows = plain_weight_rows(module)
        if rows is not None and rows.numel() and not functorch_active() and compiled_all_finite(rows):
            return rows
    try:
        cloud = neuron_cloud(module, include_bias=include_bias)
        if copy:
            cloud = cloud.clone()
        if cloud.device.type == "meta":
            raise ValueError("its weights are on the 'meta' device (not materialised): call "
                             "model.to_empty(device=...) and initialise them before measuring")
        if cloud.shape[0] == 0 or cloud.shape[1] == 0:
            return None
        return as_cloud(cloud, argument="weights")
    except (TypeError, ValueError) as error:
        kind = TypeError if isinstance(error, TypeError) else ValueError  # a subclass may not take one message
        raise kind(f"Layer {name!r}: {error}") from None
