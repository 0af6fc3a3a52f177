"""Step-size policies of `TopoOptimizer`: per-layer complexities in, per-layer scales out.

A policy is a function ``(complexity, change, strength) -> {layer: scale}``: ``complexity`` maps
each measured layer to its smoothed, dimensionless complexity, ``change`` to the smoothed
absolute change of that complexity between measurements. Scales are clipped to the optimizer's
bounds afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from topoopt._validation import check_number

__all__ = ["Policy", "POLICIES", "calm_policy", "awaken_policy", "contrast_policy", "collapse_policy",
           "COLLAPSE_SPREAD", "CONTRAST_MIN_SPREAD"]

Policy = Callable[[Mapping[str, float], Mapping[str, float], float], dict[str, float]]


def calm_policy(complexity: Mapping[str, float], change: Mapping[str, float], strength: float) -> dict[str, float]:
    """A brake: s_l = 1 / (1 + strength · (max(0, c_l − c̄) + v_l)), so s_l ≤ 1.

    c_l is the layer's smoothed complexity, c̄ its mean over the wrapped layers, and v_l the
    smoothed absolute change of c_l between measurements. Layers whose cloud is more complex
    than the others', or whose topology is still changing fast, take smaller steps; settled,
    simple layers keep the inner optimizer's step.
    """
    mean = sum(complexity.values()) / len(complexity)
    return {
        name: 1.0 / (1.0 + strength * (max(0.0, c - mean) + change.get(name, 0.0)))
        for name, c in complexity.items()
    }


def awaken_policy(complexity: Mapping[str, float], change: Mapping[str, float], strength: float) -> dict[str, float]:
    """An accelerator: s_l = 1 + strength · (1 − min(c_l, 1)), so s_l ≥ 1.

    A layer whose cloud is still structureless (neurons coinciding or collapsed onto a few
    points, as after zero or tiny initialisation: complexity near 0) takes larger steps until
    its neurons have spread out (complexity near 1, where s_l = 1).
    """
    return {name: 1.0 + strength * (1.0 - min(c, 1.0)) for name, c in complexity.items()}


CONTRAST_MIN_SPREAD = 0.005
"""`contrast_policy`'s floor on the spread it divides by. Below it, the layers' differences are
noise, not a ranking: at PyTorch's default initialisation every layer's normalized entropy is
0.9997–0.99999, and standardising those differences gave scales from 0.41 to the 4.0 bound. The
small-data study's real differences (0.98–1.0, a spread near 0.007) stay above it."""


def contrast_policy(complexity: Mapping[str, float], change: Mapping[str, float], strength: float,
                    min_spread: float = CONTRAST_MIN_SPREAD) -> dict[str, float]:
    """Relative braking: s_l = exp(−strength · z_l), z_l = (c_l − c̄) / max(sd(c), min_spread).

    For layers whose complexities all sit close together (normalized entropy within 0.98–1.0
    in every layer, where `calm` and `awaken` scales stay within ~2% of 1), standardising across
    layers makes the policy act on the *ranking* of layers: the most complex layer is slowed,
    the least sped up, by factors set by `strength` alone (the geometric mean of the scales is
    1). Differences smaller than `min_spread` move the scales only in proportion to their size,
    so noise is not promoted to a ranking. All layers equal, or a single layer: s = 1.
    """
    check_number("min_spread", min_spread, low=0.0, low_open=True)
    values = list(complexity.values())
    mean = sum(values) / len(values)
    spread = max(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), min_spread)
    # the exponent is clamped where exp would overflow; the optimizer's bounds clip far inside it
    return {name: math.exp(min(max(-strength * (c - mean) / spread, -700.0), 700.0)) for name, c in complexity.items()}


COLLAPSE_SPREAD = 0.5
"""`collapse_policy`'s threshold: a layer whose mean H0 lifetime is at least this fraction of
its RMS neuron norm counts as spread (an isotropic random cloud of 100 neurons in 100 or 784
dimensions sits near 1.3; a tiny cloud riding a common drift, as on the plateau after tiny
initialisation, falls towards 0)."""


def collapse_policy(complexity: Mapping[str, float], change: Mapping[str, float], strength: float,
                    spread: float = COLLAPSE_SPREAD) -> dict[str, float]:
    """A transient, scale-aware accelerator: s_l = 1 + strength · max(0, 1 − c_l / spread).

    Meant for ``metric="mean_lifetime"``, where c_l is the layer's mean H0 lifetime (its
    neurons' mean nearest-neighbour gap in the spanning tree) divided by its RMS neuron norm: how
    far apart the neurons are *relative to their size*. Unlike `awaken` on that metric, which
    already acts at c_l < 1 (so on every healthy layer too), this policy acts only on collapse:
    a layer whose neurons nearly coincide relative to their norm (c_l → 0: the rigidly drifting
    noise cloud of a tiny initialisation's plateau) takes up to 1 + strength times the inner
    step, and the layer returns to s = 1 once it has spread (c_l ≥ ``spread``), so the boost is
    transient where a larger learning rate is not. A cloud at its tiny initialisation, not yet
    drifting, is already spread in this sense (c ≈ 1.3) and is left alone: the policy reads the
    cloud's shape only, whatever the weights' scale.
    """
    check_number("spread", spread, low=0.0, low_open=True)
    return {name: 1.0 + strength * max(0.0, 1.0 - c / spread) for name, c in complexity.items()}


POLICIES: dict[str, Policy] = {"calm": calm_policy, "awaken": awaken_policy, "contrast": contrast_policy,
                                 "collapse": collapse_policy}
