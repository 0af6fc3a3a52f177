"""Step-size policies of TopoOptimizer: values derived by hand."""

from __future__ import annotations

import pytest

from topoopt.policies import COLLAPSE_SPREAD, POLICIES, collapse_policy


def test_collapse_policy_boosts_only_collapsed_layers_and_is_transient():
    """s = 1 + strength · max(0, 1 − c/spread): full boost at c = 0, linear in between, exactly 1
    once the layer has spread (c ≥ spread), whatever the strength."""
    complexity = {"collapsed": 0.0, "halfway": 0.25, "spread": 0.5, "random": 1.3}
    scales = collapse_policy(complexity, {}, 7.0)
    assert COLLAPSE_SPREAD == 0.5
    assert scales == {"collapsed": 8.0, "halfway": 4.5, "spread": 1.0, "random": 1.0}
    assert collapse_policy(complexity, {}, 0.0) == dict.fromkeys(complexity, 1.0)
    assert collapse_policy({"a": 0.1}, {}, 1.0, spread=0.2) == {"a": 1.5}
    assert POLICIES["collapse"] is collapse_policy


def test_collapse_policy_rejects_a_non_positive_spread():
    with pytest.raises(ValueError, match="Invalid spread"):
        collapse_policy({"a": 0.1}, {}, 1.0, spread=0.0)
