"""A layer's neurons as a point cloud: neuron i is the vector of its incoming weights."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["neuron_cloud", "CLOUD_LAYER_TYPES"]

# Layers whose neurons each own one weight vector (subclasses, e.g. masked layers, included).
CLOUD_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def neuron_cloud(module: nn.Module, include_bias: bool = False) -> torch.Tensor:
    """The N×d cloud of a layer's neurons, keeping the autograd graph to its weight.

    `nn.Linear`: row i of the weight, the incoming weights of output neuron i. `nn.Conv1d/2d/3d`:
    one flattened filter per output channel. With `include_bias`
    a neuron's bias is appended as one more coordinate. A layer with an ``effective_weight``
    (a masked layer) gives that instead of its raw weight. Any other module is a `TypeError`.
    """
    if not isinstance(module, CLOUD_LAYER_TYPES):
        raise TypeError(
            f"neuron_cloud takes an nn.Linear or a convolution, got {type(module).__name__}"
        )
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"This {type(module).__name__} is not initialised yet: run one forward pass first"
        )
    # Masked layers (topoopt.sparse.SparseLinear) expose the weight they really use, so that a
    # topological gradient never reaches a pruned connection.
    weight = getattr(module, "effective_weight", weight)
    cloud = weight.reshape(weight.shape[0], -1)
    if include_bias:
        if module.bias is None:
            raise ValueError(f"include_bias=True, but this {type(module).__name__} has no bias")
        if cloud.shape[0] != module.bias.shape[0]:
            raise ValueError(
                f"include_bias=True needs one bias per neuron: {cloud.shape[0]} neurons, "
                f"{module.bias.shape[0]} biases"
            )
        cloud = torch.cat([cloud, module.bias.unsqueeze(1)], dim=1)
    return cloud
