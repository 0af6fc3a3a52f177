"""Metrics against direct formulas, their edge cases, and finite gradients at zero lifetimes."""

import math

import numpy as np
import pytest
import torch

from topoopt import (
    METRIC_SPECS,
    METRICS,
    dimensionless_complexity,
    get_metric,
    h0_deaths,
    max_lifetime,
    mean_lifetime,
    normalized_persistent_entropy,
    persistent_entropy,
    total_persistence,
)


def test_entropy_matches_the_formula_over_positive_lifetimes():
    deaths = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    p = np.array([0.25, 0.25, 0.5])
    expected = -(p * np.log(p)).sum()
    assert persistent_entropy(deaths).item() == pytest.approx(expected)
    assert normalized_persistent_entropy(deaths).item() == pytest.approx(expected / math.log(3))


def test_equal_lifetimes_have_normalized_entropy_one():
    assert normalized_persistent_entropy(torch.full((7,), 0.3)).item() == pytest.approx(1.0)


def test_giotto_normalization_divides_by_log_total():
    deaths = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    expected = persistent_entropy(deaths).item() / math.log(8.0)
    assert normalized_persistent_entropy(deaths, normalization="total").item() == pytest.approx(expected)


def test_giotto_normalization_agrees_with_giotto_formula_and_depends_on_scale():
    deaths = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    small = normalized_persistent_entropy(deaths, normalization="total")
    assert small.item() < 0  # Σl = 0.6 < 1: the reason it is not the default
    count = normalized_persistent_entropy(deaths)
    assert normalized_persistent_entropy(10 * deaths).item() == pytest.approx(count.item())


def test_mean_lifetime_counts_zero_bars():
    deaths = torch.tensor([0.0, 0.0, 3.0])
    assert mean_lifetime(deaths).item() == pytest.approx(1.0)


def test_total_persistence_and_max_lifetime():
    deaths = torch.tensor([0.0, 1.0, 2.0])
    assert total_persistence(deaths).item() == pytest.approx(3.0)
    assert total_persistence(deaths, p=2).item() == pytest.approx(5.0)
    assert total_persistence(deaths, p=0.5).item() == pytest.approx(1 + math.sqrt(2))
    assert max_lifetime(deaths).item() == 2.0


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize("deaths", [torch.zeros(0), torch.zeros(1), torch.zeros(9), torch.tensor([0.0, 0.0, 2.0])])
def test_degenerate_diagrams_give_finite_values_and_gradients(name, deaths):
    deaths = deaths.clone().requires_grad_(True)
    value = get_metric(name)(deaths)
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(deaths.grad).all()


def test_empty_and_single_bar_values():
    assert mean_lifetime(torch.zeros(0)).item() == 0.0
    assert normalized_persistent_entropy(torch.tensor([2.0])).item() == 0.0
    assert persistent_entropy(torch.zeros(5)).item() == 0.0


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize("n", [2, 50])
def test_zero_layer_gives_zero_gradients_end_to_end(name, n):
    """A zero-initialised layer: every metric is finite and its gradient is exactly zero."""
    weight = torch.zeros(n, 20, requires_grad=True)
    value = get_metric(name)(h0_deaths(weight))
    value.backward()
    assert torch.isfinite(value)
    assert torch.all(weight.grad == 0)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_duplicate_rows_give_finite_gradients_end_to_end(name):
    base = torch.randn(6, 4, dtype=torch.float64)
    weight = base[torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])].clone().requires_grad_(True)
    get_metric(name)(h0_deaths(weight)).backward()
    assert torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("name", ["normalized_entropy", "entropy", "mean_lifetime", "total_persistence"])
def test_metric_gradients_match_finite_differences(name):
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: get_metric(name)(h0_deaths(p)), (x,))


def test_unknown_metric_lists_the_valid_ones():
    with pytest.raises(ValueError, match=("Invalid metric: 'entropie'. It must be one of 'normalized_entropy', "
                                          "'mean_lifetime', 'total_persistence', 'max_lifetime', 'entropy'")):
        get_metric("entropie")


@pytest.mark.parametrize("bad", [torch.zeros(2, 2), torch.tensor([-1.0, 1.0])])
def test_malformed_deaths_are_rejected(bad):
    with pytest.raises(ValueError, match="deaths"):
        mean_lifetime(bad)


@pytest.mark.parametrize("p", [0, -1, float("nan")])
def test_invalid_exponent(p):
    with pytest.raises(ValueError, match="Invalid exponent p"):
        total_persistence(torch.ones(3), p=p)


def test_invalid_normalization():
    with pytest.raises(ValueError, match="Invalid normalization: 'log'"):
        normalized_persistent_entropy(torch.ones(3), normalization="log")


@pytest.mark.parametrize("name", sorted(METRIC_SPECS))
def test_the_registry_says_truly_which_metrics_are_scale_free(name):
    """metric(c·W) = metric(W) for a scale-free metric, c·metric(W) for a length."""
    spec = METRIC_SPECS[name]
    weights = torch.randn(30, 7, dtype=torch.float64)
    plain, scaled = spec.function(h0_deaths(weights)), spec.function(h0_deaths(3.0 * weights))
    expected = plain if spec.scale_free else 3.0 * plain
    torch.testing.assert_close(scaled, expected, rtol=1e-12, atol=0)
    if spec.complexity is not None:  # the optimizer's complexity is dimensionless either way
        def complexity(w):
            return dimensionless_complexity(name, h0_deaths(w), float(w.norm()) / 30**0.5)

        assert complexity(3.0 * weights) == pytest.approx(complexity(weights), rel=1e-12)
        assert 0.0 <= complexity(weights) <= 10.0


def test_dimensionless_complexity_names_a_bad_metric_before_bad_deaths():
    """With both arguments wrong, the metric's error comes first (as it always has)."""
    from topoopt.metrics import dimensionless_complexity

    with pytest.raises(ValueError, match="Invalid metric: 'bogus'"):
        dimensionless_complexity("bogus", -torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="Invalid complexity metric: 'entropy'"):
        dimensionless_complexity("entropy", [1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        dimensionless_complexity("normalized_entropy", -torch.ones(3), 1.0)


def test_one_bar_has_an_entropy_of_plus_zero():
    """A 2-neuron layer (one bar): 0.0, not −0.0, from the host and the compiled formulas alike."""
    from topoopt.metrics import normalized_persistent_entropy, persistent_entropy

    deaths = torch.tensor([4.5])
    for value in (normalized_persistent_entropy(deaths), persistent_entropy(deaths)):
        assert float(value) == 0.0 and math.copysign(1.0, float(value)) == 1.0
