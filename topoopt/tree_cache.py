"""Spanning trees of layers' neuron clouds, shared and reused between measurements.

Searching the tree costs O(N²·d); re-measuring its N−1 edges costs O(N·d). A tree is reused
- always while the layer's weights are unchanged (same tensor version), so `TopoPenalty` and
  `TopoOptimizer` measuring the same step search once between them; and
- for up to `tree_every − 1` further lookups after the weights moved, when asked to. Measured on
  this project's machines (shared/PERF_NOTES.md): a tree from 1 SGD step earlier gave a worst
  sorted-death error of 0.3%, from 10 steps earlier 2.4%.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from topoopt.cloud import neuron_cloud
from topoopt.persistence import _as_cloud, edge_lengths
from topoopt.spanning_tree import euclidean_mst_edges

__all__ = ["layer_deaths"]


@dataclass
class _Tree:
    weights_key: tuple[int, ...]
    u: torch.Tensor
    v: torch.Tensor
    reuses: int = 0


_TREES: "weakref.WeakKeyDictionary[nn.Module, dict[bool, _Tree]]" = weakref.WeakKeyDictionary()


def _weights_key(module: nn.Module, include_bias: bool) -> tuple[int, ...]:
    tensors = [module.weight] + ([module.bias] if include_bias and module.bias is not None else [])
    return tuple(x for t in tensors for x in (t.data_ptr(), t._version, t.shape.numel()))


def layer_deaths(name: str, module: nn.Module, include_bias: bool = False, tree_every: int = 1) -> torch.Tensor:
    """The H0 deaths of a layer's neuron cloud, differentiable, in tree order (unsorted).

    NaN/Inf weights raise a `ValueError` naming the layer. Metrics that do not depend on the
    order of the deaths (all of `topoopt.METRICS`) can take the result directly.
    """
    try:
        cloud = _as_cloud(neuron_cloud(module, include_bias=include_bias), argument="weights")
    except ValueError as error:
        raise ValueError(f"Layer {name!r}: {error}") from None
    if cloud.shape[0] < 2:
        return cloud.reshape(-1)[:0]
    key = _weights_key(module, include_bias)
    trees = _TREES.setdefault(module, {})
    tree = trees.get(include_bias)
    if tree is None or tree.u.numel() != cloud.shape[0] - 1:
        tree = None
    elif tree.weights_key != key:
        if tree.reuses + 1 < tree_every:
            tree.reuses += 1
            tree.weights_key = key
        else:
            tree = None
    if tree is None:
        u, v = euclidean_mst_edges(cloud.detach())
        tree = _Tree(key, u, v)
        trees[include_bias] = tree
    return edge_lengths(cloud, tree.u, tree.v)
