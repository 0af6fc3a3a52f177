import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    np.random.seed(0)


def gudhi_h0_deaths(points: np.ndarray) -> np.ndarray:
    """Finite H0 deaths from gudhi's RipsComplex (zero-length bars dropped by gudhi)."""
    import gudhi

    tree = gudhi.RipsComplex(points=points).create_simplex_tree(max_dimension=1)
    tree.compute_persistence()
    deaths = tree.persistence_intervals_in_dimension(0)[:, 1]
    return np.sort(deaths[np.isfinite(deaths)])
