"""experiments/surface_window.py: a window's measures tell one common curve from a spread sheet."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def _cloud(spread: float, snapshots: int = 30, neurons: int = 100, dims: int = 40, seed: int = 0) -> np.ndarray:
    """Neurons on a planar curve shared by all (the layer mean) plus an isotropic offset each."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, snapshots)
    path = np.zeros((snapshots, dims))
    path[:, 0], path[:, 1] = np.cos(3 * t), np.sin(3 * t)
    offsets = spread * rng.standard_normal((neurons, dims))
    return path[:, None, :] + offsets[None, :, :] * t[:, None, None]


def test_a_common_planar_curve_is_not_a_surface():
    """Issue #13: 2 PCs explained ~all variance in the plateau, but so did the mean path alone,
    and the neurons' spread was a millionth of the variance: one curve, not the paper's surface."""
    surface_window = pytest.importorskip("surface_window")

    curve = surface_window.window_measures(_cloud(1e-5), 0, 30)
    assert curve["variance_in_2_pcs_all_points"] > 0.999
    assert curve["variance_in_2_pcs_mean_path"] > 0.999
    assert curve["spread_share_mean"] < 1e-6
    spread = surface_window.window_measures(_cloud(0.3), 0, 30)
    assert spread["spread_share_mean"] > 0.1
    assert spread["spread_share_first_last"][1] > spread["spread_share_first_last"][0]
