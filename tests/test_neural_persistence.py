"""Neural persistence against gudhi's H0 of the same filtered bipartite graph."""

from __future__ import annotations

import math

import gudhi
import numpy as np
import pytest
import torch

from topoopt.neural_persistence import bipartite_lifetimes, neural_persistence


def _gudhi_lifetimes(weight: torch.Tensor) -> np.ndarray:
    """Vertices at 0, each edge at 1 − |w|/max|w| (the descending filtration, flipped): the finite H0
    deaths are the lifetimes."""
    absolute = weight.abs().double().numpy()
    normalised = absolute / absolute.max()
    outputs, inputs = absolute.shape
    tree = gudhi.SimplexTree()
    for vertex in range(outputs + inputs):
        tree.insert([vertex], filtration=0.0)
    for i in range(outputs):
        for j in range(inputs):
            tree.insert([i, outputs + j], filtration=1.0 - normalised[i, j])
    tree.compute_persistence()
    pairs = tree.persistence(min_persistence=-1)  # zero-length bars too
    return np.sort([death for dim, (_, death) in pairs if dim == 0 and math.isfinite(death)])


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 2), (20, 30)])
def test_lifetimes_match_gudhi(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    ours = np.sort(bipartite_lifetimes(weight))
    assert len(ours) == sum(shape) - 1
    np.testing.assert_allclose(ours, _gudhi_lifetimes(weight), atol=1e-12)


def test_value_is_the_normalized_two_norm_and_extremes():
    weight = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    lifetimes = _gudhi_lifetimes(weight)
    assert neural_persistence(weight) == pytest.approx(np.linalg.norm(lifetimes) / math.sqrt(14), rel=1e-12)
    assert neural_persistence(torch.ones(4, 4)) == 0.0  # every edge enters at once: nothing persists
    assert neural_persistence(torch.zeros(3, 2)) == 0.0  # no filtration at all, by convention
    with pytest.raises(ValueError, match="all zero"):
        bipartite_lifetimes(torch.zeros(3, 2))
    conv = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    assert neural_persistence(conv) == neural_persistence(conv.reshape(4, 18))  # one row per output
    assert 0.0 <= neural_persistence(weight) <= 1.0


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="2 or more dimensions"):
        neural_persistence(torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        bipartite_lifetimes(torch.tensor([[1.0, float("nan")]]))
    assert math.isnan(neural_persistence(torch.tensor([[1.0, float("inf")]])))  # a diverged layer: NaN
