"""The training loop that every run and study shares, and the one optimizer factory."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from topoopt.optimizer import TopoOptimizer
from topoopt.tree_cache import TreeCache

__all__ = ["OPTIMIZERS", "make_optimizer"]

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(model: nn.Module, name: str, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                   params: Iterable[Any] | None = None, topo: Mapping[str, Any] | None = None,
                   trees: TreeCache | None = None) -> torch.optim.Optimizer:
    """The optimizer of a run: torch's SGD, Adam or AdamW, wrapped in a `TopoOptimizer` when asked.

    Parameters
    ----------
    model : nn.Module
        The network; its parameters are optimized unless `params` is given, and its layers are
        the ones a `TopoOptimizer` measures.
    name : {"sgd", "adam", "adamw"}
        The inner optimizer.
    lr : float
        Learning rate.
    momentum : float, optional
        SGD's momentum (0: none); a non-zero value with Adam or AdamW is a `ValueError`.
    weight_decay : float, optional
        L2 penalty (SGD, Adam) or decoupled weight decay (AdamW); 0 by default for AdamW too
        (torch's own default there is 0.01).
    params : iterable, optional
        Parameters or parameter groups to optimize instead of ``model.parameters()``.
    topo : mapping, optional
        Keyword arguments of `TopoOptimizer` (``policy``, ``strength``, ``metric``, ``every``,
        ``bounds``, ``tree_every``, ...); None gives the inner optimizer alone.
    trees : TreeCache, optional
        The run's shared tree cache, handed to the `TopoOptimizer`.

    Returns
    -------
    torch.optim.Optimizer
        The inner optimizer, or a `TopoOptimizer` around it.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer {name!r}. Valid values are: {', '.join(OPTIMIZERS)}")
    if momentum and name != "sgd":
        raise ValueError(f"Invalid momentum {momentum} with optimizer {name!r}: momentum is an SGD option")
    params = model.parameters() if params is None else params
    if name == "sgd":
        inner = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif name == "adam":
        inner = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        inner = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if topo is None:
        return inner
    return TopoOptimizer(inner, model, trees=trees, **topo)
