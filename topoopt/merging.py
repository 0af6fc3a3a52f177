"""Merging redundant neurons along a layer's H0 tree.

A layer's minimum spanning tree is a single-linkage clustering of its neurons: cutting its k − 1
longest edges leaves k groups of neurons whose incoming weights nearly coincide. Such neurons
compute nearly the same activation, so each group can become one neuron (its members' mean
incoming weights and bias) whose outgoing weights are the sum of the members' (the next layer's
columns added): for exact copies the network's function is unchanged, up to float rounding; for
near copies the change is bounded by how far apart they are, the deaths the merge removes. Like
single linkage, a chain of close neurons can merge neurons that are far apart at its ends.

Supported: `nn.Sequential` chains (nested ones included) of `nn.Linear` → `nn.Linear`,
`nn.Conv1d/2d/3d` → the same (``groups=1``), and a convolution → `nn.Flatten()` → `nn.Linear` (each
channel's block of the Linear's inputs summed), with elementwise modules between them (activations,
dropout, identity) and, after a convolution, pooling that acts on each channel alone (max, average,
adaptive). Anything else between a layer and the layer that reads it (normalisation, a flatten of
other dimensions) is refused in one line naming it.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from topoopt._validation import UnknownName, check_instance, check_number, invalid
from topoopt.cloud import neuron_cloud
from topoopt.persistence import edge_lengths, h0_edges

__all__ = ["merge_neurons", "MergePenalty", "MergeReport", "LayerMerge", "tree_clusters"]

_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.Sigmoid, nn.Tanh, nn.Softplus,
                nn.Mish, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout1d,
                nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_MERGEABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Pooling within each channel: copies of a channel pool to copies, so a convolution merges through it.
_CHANNELWISE = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


@dataclass(frozen=True)
class LayerMerge:
    """What merging did to one layer."""

    layer: str
    next_layer: str
    neurons_before: int
    neurons_after: int
    longest_merged_edge: float  # the largest distance between neurons joined in a group
    groups: tuple[tuple[int, ...], ...]  # the old neurons each new neuron stands for


@dataclass
class MergeReport:
    """Every merged layer, and the parameter counts before and after."""

    layers: list[LayerMerge] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0

    def __str__(self) -> str:
        lines = [f"{m.layer}: {m.neurons_before} → {m.neurons_after} neurons (longest merged edge "
                 f"{m.longest_merged_edge:.3g}; next layer {m.next_layer})" for m in self.layers]
        lines.append(f"parameters {self.parameters_before:,} → {self.parameters_after:,}")
        return "\n".join(lines)


def tree_clusters(cloud: torch.Tensor, k: int) -> tuple[list[list[int]], float]:
    """The k groups of the cloud's rows left by cutting its H0 tree's k − 1 longest edges (single
    linkage), each sorted, ordered by their first row; and the longest edge kept inside a group."""
    n = cloud.shape[0]
    if not 1 <= k <= n:
        raise invalid("number of groups", k, f"in [1, {n}], the layer's neurons")
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    longest = 0.0
    if n > 1 and k < n:
        with torch.no_grad():
            u, v = h0_edges(cloud)
            lengths = edge_lengths(cloud.double(), u, v)
        order = np.argsort(lengths.numpy(), kind="stable")[: n - k]  # the shortest n − k edges join groups
        for index in order:
            parent[root(int(u[index]))] = root(int(v[index]))
        longest = float(lengths[order[-1]])
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda members: members[0]), longest


def merge_neurons(model: nn.Module, keep: float | int | Mapping[str, float | int]) -> tuple[nn.Module, MergeReport]:
    """A copy of `model` whose layers keep only `keep` of their neurons, merged along their H0 trees.

    Parameters
    ----------
    model : nn.Sequential
        The network; its layers are found by their `named_modules` names (``"fc1"``, ``"0.2"``).
    keep : float, int or mapping
        Per layer (a mapping from layer name) or for every mergeable layer (one number): an int
        is the number of neurons to keep, a float in (0, 1] the fraction (rounded, at least 1).
        A mergeable layer is one whose outputs the next layer of the chain reads directly (so
        never the output layer).

    Returns
    -------
    (nn.Module, MergeReport)
        The smaller model (the input is left as it was) and what was merged.
    """
    check_instance("model", model, nn.Sequential, "an nn.Sequential (nested ones included)")
    merged = copy.deepcopy(model)
    chain = _chain(merged)
    pairs = _pairs(chain)
    targets = _targets(keep, pairs, chain)
    report = MergeReport(parameters_before=sum(p.numel() for p in model.parameters()))
    for name, k in targets.items():
        layer, (next_name, next_layer) = chain[name], pairs[name]
        cloud = neuron_cloud(layer, include_bias=layer.bias is not None).detach()
        groups, longest = tree_clusters(cloud, k)
        _merge(layer, next_layer, groups)
        report.layers.append(LayerMerge(name, next_name, cloud.shape[0], len(groups), longest,
                                        tuple(tuple(g) for g in groups)))
    report.parameters_after = sum(p.numel() for p in merged.parameters())
    return merged, report


def _chain(model: nn.Sequential) -> dict[str, nn.Module]:
    """The leaf modules of a (nested) Sequential in execution order, by name."""
    leaves: dict[str, nn.Module] = {}
    composites: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) or any(name.startswith(f"{c}.") for c in composites):
            continue
        if any(True for _ in module.children()):
            composites.append(name)  # a block with its own forward: a barrier the merge cannot see through
        leaves[name] = module
    return leaves


def _pairs(chain: dict[str, nn.Module]) -> dict[str, tuple[str, nn.Module] | str]:
    """For each mergeable layer, the layer that reads its outputs, or why none can be merged."""
    names = list(chain)
    pairs: dict[str, tuple[str, nn.Module] | str] = {}
    for index, name in enumerate(names):
        layer = chain[name]
        if not isinstance(layer, _MERGEABLE):
            continue
        if type(layer) not in _MERGEABLE or hasattr(layer, "parametrizations"):
            pairs[name] = (f"a {type(layer).__name__} (a subclass, a masked or a parametrized layer) computes its "
                           f"weight in its own way; only plain Linear and ConvNd layers are merged")
            continue
        reason = "it is the last layer (its neurons are the outputs)"
        flattened = False
        is_conv = isinstance(layer, nn.modules.conv._ConvNd)
        for later in names[index + 1:]:
            module = chain[later]
            if isinstance(module, _ELEMENTWISE) or (is_conv and not flattened and isinstance(module, _CHANNELWISE)):
                continue
            whole = type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1)
            if is_conv and not flattened and whole:
                flattened = True
                continue
            if flattened and type(module) is nn.Linear and module.in_features % layer.out_channels == 0:
                pairs[name] = (later, module)
                reason = ""
            elif flattened:
                reason = (f"{later!r} ({type(module).__name__}) reads the flattened channels; only an nn.Linear whose "
                          f"inputs are whole channel blocks is supported after a flatten")
            elif isinstance(module, _MERGEABLE) and _compatible(layer, module):
                pairs[name] = (later, module)
                reason = ""
            else:
                reason = (f"{later!r} ({type(module).__name__}) sits between it and the next layer; merging "
                          f"through it is not supported" if not isinstance(module, _MERGEABLE) else
                          f"the next layer {later!r} ({type(module).__name__}) is not of a kind it can feed "
                          f"neuron by neuron (Linear → Linear, ConvNd → ConvNd with groups=1)")
            break
        if reason:
            pairs[name] = reason
    return pairs


def _compatible(layer: nn.Module, next_layer: nn.Module) -> bool:
    if type(next_layer) not in _MERGEABLE or hasattr(next_layer, "parametrizations"):
        return False
    if isinstance(layer, nn.Linear):
        return type(next_layer) is nn.Linear
    return (type(next_layer) is type(layer) and layer.groups == 1 and next_layer.groups == 1
            and isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed and not next_layer.transposed)


def _targets(keep, pairs, chain) -> dict[str, int]:
    mergeable = {name: pair for name, pair in pairs.items() if isinstance(pair, tuple)}
    if isinstance(keep, Mapping):
        for name in keep:
            if name not in pairs:
                raise UnknownName(f"merge_neurons: {name!r} is not a Linear/Conv layer of the model; "
                               f"layers: {list(pairs)}")
            if not isinstance(pairs[name], tuple):
                raise ValueError(f"merge_neurons: layer {name!r} cannot be merged: {pairs[name]}")
        wanted = dict(keep)
    else:
        wanted = dict.fromkeys(mergeable, keep)
    return {name: _keep_count("merge_neurons", name, amount, neuron_cloud(chain[name]).shape[0])
            for name, amount in wanted.items()}


def _keep_count(owner: str, name: str, amount, n: int) -> int:
    """How many of a layer's n neurons to keep: an int ≥ 1, or a fraction in (0, 1] (rounded, ≥ 1)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not math.isfinite(amount):
        raise invalid(f"{owner} keep for layer {name!r}", amount, "an int ≥ 1 or a fraction in (0, 1]")
    if not isinstance(amount, numbers.Integral):
        check_number(f"{owner} keep fraction for layer {name!r}", amount, low=0.0, low_open=True, high=1.0)
        amount = max(1, round(float(amount) * n))
    if amount < 1:
        raise invalid(f"{owner} keep for layer {name!r}", amount, "an int ≥ 1 or a fraction in (0, 1]")
    if amount > n:
        raise invalid(f"{owner} keep for layer {name!r}", amount, f"at most the layer's {n} neurons")
    return int(amount)


@torch.no_grad()
def _merge(layer: nn.Module, next_layer: nn.Module, groups: list[list[int]]) -> None:
    """Each group becomes one neuron: mean incoming weights and bias; the next layer's inputs from
    the group's members are summed."""
    weight = layer.weight
    new_weight = torch.stack([weight[g].mean(dim=0) for g in groups])
    layer.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    if layer.bias is not None:
        layer.bias = nn.Parameter(torch.stack([layer.bias[g].mean() for g in groups]),
                                  requires_grad=layer.bias.requires_grad)
    following = next_layer.weight  # (out, in, ...): the inputs are dimension 1
    if isinstance(next_layer, nn.Linear) and not isinstance(layer, nn.Linear):  # through a flatten
        blocks = following.reshape(following.shape[0], weight.shape[0], -1)  # (out, channel, position)
        summed = torch.stack([blocks[:, g].sum(dim=1) for g in groups], dim=1).reshape(following.shape[0], -1)
    else:
        summed = torch.stack([following[:, g].sum(dim=1) for g in groups], dim=1)
    next_layer.weight = nn.Parameter(summed, requires_grad=following.requires_grad)
    if isinstance(layer, nn.Linear):
        layer.out_features = len(groups)
    else:
        layer.out_channels = len(groups)
    if isinstance(next_layer, nn.Linear):
        next_layer.in_features = summed.shape[1]
    else:
        next_layer.in_channels = len(groups)


class MergePenalty(nn.Module):
    """A loss term that makes layers mergeable: the sum of each layer's N − k shortest H0 deaths.

    Those are the tree edges `merge_neurons` would collapse to keep k neurons: pulling them to 0
    gathers the layer's neurons into k tight groups, so that merging after training changes the
    function little, while the k − 1 longest edges (the gaps between groups) are left free. The
    term is in the weights' units; ``weight`` sets its strength. Measured through the same seam as
    `topoopt.TopoPenalty` (exact trees, one batched call).

    Parameters
    ----------
    model : nn.Module
        The network.
    keep : float, int or mapping
        As `merge_neurons` takes it: per layer or for all, neurons to keep (int) or a fraction.
    weight : float
        The loss coefficient, ≥ 0.
    layers : list of str, optional
        The layers to pull into groups (by default every measured layer but the last: the output
        layer's neurons are the outputs).
    """

    def __init__(self, model: nn.Module, keep: float | int | Mapping[str, float | int] = 0.5, *, weight: float = 1.0,
                 layers: list[str] | None = None) -> None:
        super().__init__()
        from topoopt.layers import topological_layers
        from topoopt.measure import LayerMeter

        if layers is None:
            layers = list(topological_layers(model))[:-1]
        if not layers:
            raise ValueError("MergePenalty: no layer to pull into groups (the output layer is never merged)")
        if isinstance(keep, Mapping):
            unknown = [name for name in keep if name not in layers]
            if unknown:
                raise UnknownName(f"MergePenalty: keep names layer(s) {unknown} that it does not pull; "
                                  f"layers: {layers}")
        self.weight = check_number("weight", weight, low=0.0)
        self.meter = LayerMeter(model, layers, owner="MergePenalty")
        self.merged_edges = {}
        for name, layer in self.meter.layers.items():
            n = neuron_cloud(layer).shape[0]
            amount = keep.get(name, n) if isinstance(keep, Mapping) else keep
            self.merged_edges[name] = n - _keep_count("MergePenalty", name, amount, n)
        self.last_values: dict[str, float] = {}

    def forward(self) -> torch.Tensor:
        clouds = self.meter.clouds(fewest=2)
        deaths = self.meter.deaths(clouds)
        device = next(iter(clouds.values())).device if clouds else torch.device("cpu")
        total = torch.zeros((), device=device)
        for name, values in deaths.items():
            shortest = torch.sort(values).values[: self.merged_edges[name]].sum()
            self.last_values[name] = float(shortest.detach())
            total = total + shortest.to(device)
        return self.weight * total
