"""Neural persistence (Rieck et al. 2019): the H0 persistence of a layer's weighted bipartite graph,
a topology of the *connections* rather than of the neuron cloud. Kept as the reference
comparator for the per-layer signals: the failure study watches it beside `spread`.

The layer's absolute weights, divided by the largest, filter the complete bipartite graph from
1 down to 0; every vertex is born at 1, and the edges of a maximum spanning tree kill the
components, each at its weight w. The diagram's points are (1, w); neural persistence is the
2-norm of their lifetimes 1 − w, divided by its largest possible value √(edges of the tree).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import minimum_spanning_tree

__all__ = ["neural_persistence", "bipartite_lifetimes"]


def bipartite_lifetimes(weight: torch.Tensor) -> np.ndarray:
    """Lifetimes 1 − w of the bipartite graph's H0 diagram (one per tree edge), for a 2-D weight
    (outputs × inputs). All-zero weights have no filtration: every lifetime is 1."""
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"Invalid weight: neural persistence needs a non-empty 2-D weight, got shape "
                         f"{tuple(weight.shape)}")
    absolute = weight.detach().abs().double().cpu().numpy()
    if not np.isfinite(absolute).all():
        raise ValueError("Invalid weight: it holds NaN or Inf")
    largest = absolute.max()
    outputs, inputs = absolute.shape
    if largest == 0:
        return np.ones(outputs + inputs - 1)
    normalised = absolute / largest
    rows, cols = np.indices(absolute.shape)
    # A minimum spanning tree of 2 − w is a maximum one of w (every spanning tree has the same
    # number of edges), and 2 − w ≥ 1 keeps every edge: scipy reads a zero as no edge.
    graph = coo_matrix((2.0 - normalised.ravel(), (rows.ravel(), outputs + cols.ravel())),
                       shape=(outputs + inputs, outputs + inputs))
    tree = minimum_spanning_tree(graph.tocsr())
    return tree.data - 1.0


def neural_persistence(weight: torch.Tensor) -> float:
    """Normalized neural persistence of one layer, in [0, 1] (Rieck et al. 2019, p = 2)."""
    lifetimes = bipartite_lifetimes(weight)
    return float(np.linalg.norm(lifetimes) / np.sqrt(len(lifetimes)))
