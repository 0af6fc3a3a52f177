"""Statistics shared by the studies: multiple-testing correction and partial rank correlation."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["holm", "partial_spearman"]


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order."""
    order = np.argsort(p_values)
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, (m - rank) * p_values[index])
        adjusted[index] = min(1.0, running)
    return adjusted.tolist()


def partial_spearman(x, y, control) -> tuple[float, float]:
    """Spearman ρ of x and y with a linear effect of `control` removed from the ranks, and its
    two-sided p-value (t-test, n − 3 degrees of freedom); NaN when a residual is constant."""
    from scipy import stats

    ranks = [stats.rankdata(v) for v in (x, y, control)]
    design = np.column_stack([np.ones(len(ranks[0])), ranks[2]])
    residuals = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in ranks[:2]]
    if np.std(residuals[0]) == 0 or np.std(residuals[1]) == 0:
        return float("nan"), float("nan")
    rho = float(np.corrcoef(*residuals)[0, 1])
    n = len(ranks[0])
    t = rho * math.sqrt((n - 3) / max(1e-12, 1 - rho**2))
    return rho, float(2 * stats.t.sf(abs(t), n - 3))
