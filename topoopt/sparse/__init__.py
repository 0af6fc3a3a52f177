"""Sparse layers wired by fixed bipartite graphs, their masks, and the graphs' expander measures."""

from topoopt.sparse.layer import SparseLinear
from topoopt.sparse.masks import (
    MASK_FAMILIES,
    banded,
    block_diagonal,
    erdos_renyi,
    family_seed,
    make_mask,
    mask_fingerprint,
    ramanujan_expander,
    random_biregular,
    rewired_banded,
    xnet,
)
from topoopt.sparse.measures import GraphMeasures, graph_measures

__all__ = [
    "SparseLinear",
    "MASK_FAMILIES",
    "banded",
    "rewired_banded",
    "random_biregular",
    "erdos_renyi",
    "xnet",
    "ramanujan_expander",
    "block_diagonal",
    "make_mask",
    "family_seed",
    "mask_fingerprint",
    "GraphMeasures",
    "graph_measures",
]
