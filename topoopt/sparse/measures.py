"""Expander measures of the bipartite graph [[0, M], [Mᵀ, 0]] of a 0/1 mask M (out × in)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["GraphMeasures", "graph_measures"]


@dataclass(frozen=True)
class GraphMeasures:
    """σ₁ ≥ σ₂: the two largest singular values of M (the adjacency's top eigenvalues are ±σ).

    - ``spectral_gap`` σ₁ − σ₂ and ``normalized_gap`` 1 − σ₂/σ₁ (0 when σ₁ = 0);
    - ``ramanujan_bound`` √(d_L−1) + √(d_R−1) with d_L, d_R the mean row and column degrees, and
      ``ramanujan_margin`` = bound − σ₂ (≥ 0: a Ramanujan graph, an optimal expander);
    - ``algebraic_connectivity``: λ₂ of the Laplacian D − A of the out+in nodes (0 iff disconnected);
    - ``density``: edges / (out·in); ``connected``: one component, isolated nodes included;
    - ``isolated_outputs`` (rows without an input: units whose output is their bias alone) and
      ``isolated_inputs`` (columns nothing reads: unused pixels or dead units of the previous
      layer). Any isolated node makes λ₂ = 0, so for graphs with uneven degrees (Erdős–Rényi,
      X-Net) λ₂ = 0 counts dead units rather than measuring expansion.
    """

    sigma1: float
    sigma2: float
    spectral_gap: float
    normalized_gap: float
    ramanujan_bound: float
    ramanujan_margin: float
    algebraic_connectivity: float
    density: float
    connected: bool
    left_degree: float
    right_degree: float
    isolated_outputs: int = 0
    isolated_inputs: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def graph_measures(mask: torch.Tensor | np.ndarray) -> GraphMeasures:
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float64)
    if m.ndim != 2 or not np.isin(m, (0.0, 1.0)).all():
        raise ValueError("mask must be a 2-D 0/1 matrix")
    out_features, in_features = m.shape
    singular = np.linalg.svd(m, compute_uv=False)
    sigma1 = float(singular[0])
    sigma2 = float(singular[1]) if len(singular) > 1 else 0.0
    n = out_features + in_features
    adjacency = np.zeros((n, n))
    adjacency[:out_features, out_features:] = m
    adjacency[out_features:, :out_features] = m.T
    laplacian = np.diag(adjacency.sum(axis=1)) - adjacency
    algebraic = float(np.linalg.eigvalsh(laplacian)[1])
    components, _ = connected_components(csr_matrix(adjacency), directed=False)
    left, right = float(m.sum(axis=1).mean()), float(m.sum(axis=0).mean())
    bound = math.sqrt(max(left - 1, 0.0)) + math.sqrt(max(right - 1, 0.0))
    return GraphMeasures(
        sigma1=sigma1,
        sigma2=sigma2,
        spectral_gap=sigma1 - sigma2,
        normalized_gap=1 - sigma2 / sigma1 if sigma1 > 0 else 0.0,
        ramanujan_bound=bound,
        ramanujan_margin=bound - sigma2,
        algebraic_connectivity=max(algebraic, 0.0),
        density=float(m.mean()),
        connected=components == 1,
        left_degree=left,
        right_degree=right,
        isolated_outputs=int((m.sum(axis=1) == 0).sum()),
        isolated_inputs=int((m.sum(axis=0) == 0).sum()),
    )
