"""Statistics shared by the studies: multiple-testing correction and partial rank correlation."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["holm", "paired_t_minimum_effect", "partial_spearman", "wilcoxon_minimum_p"]


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


def wilcoxon_minimum_p(n: int) -> float:
    """The smallest two-sided p-value an exact Wilcoxon signed-rank test can give on `n` pairs
    without ties: 2 / 2ⁿ (all signs alike). 0.0625 for 5 pairs, so such a test can never reach
    p < 0.05 there."""
    if n < 1:
        raise ValueError(f"Invalid number of pairs: {n}")
    return min(1.0, 2.0 / 2**n)


def paired_t_minimum_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t-test on `n` pairs detects with
    probability `power` at level `alpha`, when the paired differences have standard deviation
    `sd` (non-central t; the effect is in the units of `sd`)."""
    from scipy import optimize, stats

    if n < 2 or sd < 0 or not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"Invalid power inputs: sd={sd}, n={n}, alpha={alpha}, power={power}")
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(d: float) -> float:
        noncentrality = d * math.sqrt(n)
        # The wrong-sign tail is negligible where scipy's non-central t returns NaN for it.
        wrong_sign = np.nan_to_num(stats.nct.cdf(-critical, df, noncentrality), nan=0.0)
        return stats.nct.sf(critical, df, noncentrality) + wrong_sign - power

    upper = 1.0
    while shortfall(upper) < 0:
        upper *= 2
    return float(optimize.brentq(shortfall, 1e-6, upper)) * sd
