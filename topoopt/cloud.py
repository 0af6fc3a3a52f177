"""A layer's neurons as a point cloud: neuron i is the vector of its incoming weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from topoopt import _native
from topoopt.persistence import _as_cloud

__all__ = ["neuron_cloud", "layer_cloud", "weight_cloud", "cloud_norm", "ParameterLayer", "CLOUD_LAYER_TYPES"]

# Layers whose neurons each own one weight vector (subclasses, e.g. masked layers, included).
CLOUD_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def cloud_norm(cloud: torch.Tensor) -> float:
    """‖cloud‖_F, summed in float64 (a float32 sum of squares overflows for weights near 1e19):
    one compiled pass for a CPU float32/float64 cloud (at 100×784, 20 µs against 64–80 µs for
    `torch.linalg.vector_norm` with a float64 dtype), torch elsewhere."""
    if _native.engine is not None and cloud.device.type == "cpu" and cloud.dtype in (torch.float32, torch.float64):
        x = cloud.detach().contiguous()
        return math.sqrt(_native.engine.sum_of_squares(x.numpy(), x.element_size()))
    return float(torch.linalg.vector_norm(cloud.detach(), dtype=torch.float64))


def weight_cloud(weight: torch.Tensor, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """The N×d cloud of a weight tensor of 2 or more dimensions, one row per output neuron.

    A Linear or Conv weight is (out, in/groups, *kernel): row i is output unit i's weight,
    flattened. A transposed convolution stores (in, out/groups, *kernel); its output channel j of
    group g reads the slice ``weight[g-th block of inputs, j]``, which becomes one row.
    """
    if weight.dim() < 2:
        raise ValueError(f"A neuron cloud needs a weight of 2 or more dimensions, got shape {tuple(weight.shape)}")
    if not transposed:
        if weight.dim() == 2:
            return weight  # already N×d: no view, so no extra autograd node in a penalty's backward
        return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))
    in_channels, out_per_group, *kernel = weight.shape
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, *kernel).transpose(1, 2)
    row_length = (in_channels // groups) * math.prod(kernel)
    return grouped.reshape(groups * out_per_group, row_length)


@dataclass(frozen=True, eq=False)
class ParameterLayer:
    """A layer known only by its parameters (no module): neuron i is row i of ``weight``,
    flattened (a Linear weight, or a Conv weight per output channel), ``bias`` its optional bias.

    What `TopoOptimizer` builds when it is given parameters instead of a model. A transposed
    convolution's weight is laid out (in, out, ...): give the module for those.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None


def neuron_cloud(module: nn.Module | ParameterLayer, include_bias: bool = False) -> torch.Tensor:
    """The N×d cloud of a layer's neurons, keeping the autograd graph to its weight.

    `nn.Linear`: row i of the weight, the incoming weights of output neuron i. `nn.Conv1d/2d/3d`
    and `nn.ConvTranspose1d/2d/3d`: one flattened filter per output channel. With `include_bias`
    a neuron's bias is appended as one more coordinate. A layer with an ``effective_weight``
    (a masked layer) gives that instead of its raw weight; a parametrized weight (weight norm,
    spectral norm, ...) is read as the layer uses it. Any other module is a `TypeError`.
    """
    if isinstance(module, ParameterLayer):
        cloud = weight_cloud(module.weight)
        return _with_bias(cloud, module.bias, "layer") if include_bias else cloud
    if not isinstance(module, CLOUD_LAYER_TYPES):
        supported = ", ".join(kind.__name__ for kind in CLOUD_LAYER_TYPES)
        raise TypeError(f"neuron_cloud takes one of {supported}; got {type(module).__name__}")
    weight = module.weight
    if type(weight) is not nn.Parameter and isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"This {type(module).__name__} is not initialised yet: run one forward pass first"
        )
    # Masked layers (topoopt.sparse.SparseLinear) expose the weight they really use, so that a
    # topological gradient never reaches a pruned connection. (Looked up only where it may be:
    # a module's failed attribute lookup builds an error message, ~5 µs a layer and call.)
    if _may_have(module, "effective_weight"):
        weight = getattr(module, "effective_weight", weight)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    cloud = weight_cloud(weight, transposed=transposed, groups=getattr(module, "groups", 1))
    return _with_bias(cloud, module.bias, type(module).__name__) if include_bias else cloud


def _may_have(module: nn.Module, name: str) -> bool:
    """Whether `getattr(module, name)` can succeed: the class, the instance or one of the
    module's parameter, buffer or submodule tables has the name, or the class answers unknown
    names itself (its own ``__getattr__``)."""
    kind = type(module)
    return (hasattr(kind, name) or name in module.__dict__ or name in module._parameters
            or name in module._buffers or name in module._modules or kind.__getattr__ is not nn.Module.__getattr__)


def _with_bias(cloud: torch.Tensor, bias: torch.Tensor | None, kind: str) -> torch.Tensor:
    if bias is None:
        raise ValueError(f"include_bias=True, but this {kind} has no bias")
    if bias.dim() != 1 or cloud.shape[0] != bias.shape[0]:
        raise ValueError(
            f"include_bias=True needs one bias per neuron: {cloud.shape[0]} neurons, "
            f"bias of shape {tuple(bias.shape)}"
        )
    return torch.cat([cloud, bias.unsqueeze(1)], dim=1)


def layer_cloud(name: str, module: nn.Module | ParameterLayer, include_bias: bool = False) -> torch.Tensor | None:
    """The layer's cloud checked for measuring, or None when it has no geometry to measure.

    None for a layer with no neurons or no incoming weights (``Linear(5, 0)``, ``Linear(0, 5)``):
    its diagram is empty. Errors name the layer: NaN/Inf weights, weights on the ``meta`` device.
    float16/bfloat16 weights come back as float32.
    """
    try:
        cloud = neuron_cloud(module, include_bias=include_bias)
        if cloud.device.type == "meta":
            raise ValueError("its weights are on the 'meta' device (not materialised): call "
                             "model.to_empty(device=...) and initialise them before measuring")
        if cloud.shape[0] == 0 or cloud.shape[1] == 0:
            return None
        return _as_cloud(cloud, argument="weights")
    except (TypeError, ValueError) as error:
        raise type(error)(f"Layer {name!r}: {error}") from None
