"""Exact H0 over the whole finite range of each dtype, subnormals included, against an independent
exact reference: the stored values' squared distances summed in 80-digit decimal arithmetic,
Prim's tree on them, and each death's square root correctly rounded to the dtype."""

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from topoopt import TopoOptimizer, TopoPenalty, h0_deaths, h0_deaths_many, layer_topology

EXPONENTS = {torch.float64: (-300, 300), torch.float32: (-44, 37)}  # float32 below -38 is subnormal


def exact_deaths(points: torch.Tensor) -> np.ndarray:
    """The MST edge lengths of the stored values, each correctly rounded to float64."""
    with localcontext() as context:
        context.prec = 80
        rows = [[Decimal(float(v)) for v in row] for row in points.double().tolist()]
        n = len(rows)
        squared = [[sum((a - b) ** 2 for a, b in zip(rows[i], rows[j])) for j in range(n)] for i in range(n)]
        inside, best, deaths = [False] * n, [None] * n, []
        best[0] = Decimal(0)
        for _ in range(n):
            i = min((j for j in range(n) if not inside[j] and best[j] is not None), key=lambda j: best[j])
            inside[i] = True
            if i:
                deaths.append(float(best[i].sqrt()))
            for j in range(n):
                if not inside[j] and (best[j] is None or squared[i][j] < best[j]):
                    best[j] = squared[i][j]
    return np.sort(np.array(deaths))


@st.composite
def clouds(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    low, high = EXPONENTS[dtype]
    exponent = draw(st.integers(low, high))
    n, d = draw(st.integers(2, 7)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.normal(size=(n, d)) * 10.0**exponent
    if draw(st.booleans()):  # a duplicated neuron
        values[-1] = values[0]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@settings(max_examples=400, deadline=None)
@given(clouds())
def test_deaths_are_exact_at_every_scale(points):
    """Each death equals the exact tree's, correctly rounded to the dtype (float32: the very same
    value; float64: within 2 ulps, the square root and the engine's last rounding)."""
    expected = torch.tensor(exact_deaths(points)).to(points.dtype).double().numpy()
    for got in (h0_deaths(points), h0_deaths_many([points])[0]):
        assert torch.isfinite(got).all()
        got = got.double().numpy()
        if points.dtype == torch.float32:
            np.testing.assert_array_equal(got, expected)
        else:
            np.testing.assert_allclose(got, expected, rtol=4.5e-16, atol=0)


@pytest.mark.parametrize("dtype,scales", [(torch.float64, [1e300, 1e200, 1e-160, 1e-300]),
                                          (torch.float32, [1e35, 1e-40])])
def test_every_tool_reads_an_extreme_model_as_its_scale_one_twin(dtype, scales):
    """Scale-free values (normalized entropy, the optimizer's scales) are those of the same model
    at scale 1; lifetimes are those times the scale; the penalty's gradient is finite. (Deeper in
    float32's subnormals the stored weights themselves lose bits, so they are no longer the scale-1
    model's: the exact-deaths property above covers them against their stored values.)"""
    def model_at(scale):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8)).to(dtype)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(scale)
        return model

    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    reference = model_at(1.0)
    ref_topology = layer_topology(reference)
    ref_optimizer = TopoOptimizer(torch.optim.SGD(reference.parameters(), lr=0.0), reference,
                                  metric="mean_lifetime", policy="contrast")
    ref_scales = ref_optimizer.update_scales()
    ref_penalty = float(TopoPenalty(reference, metric="normalized_entropy")())
    for scale in scales:
        model = model_at(scale)
        for name, topology in layer_topology(model).items():
            assert topology.normalized_entropy == pytest.approx(ref_topology[name].normalized_entropy, rel=tolerance)
            assert topology.mean_lifetime == pytest.approx(ref_topology[name].mean_lifetime * scale, rel=tolerance)
        optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, metric="mean_lifetime",
                                  policy="contrast")
        scales_now = optimizer.update_scales()
        assert scales_now == pytest.approx(ref_scales, rel=tolerance)
        penalty = TopoPenalty(model, metric="mean_lifetime")
        value = penalty()
        assert float(value) == pytest.approx(float(TopoPenalty(reference, metric="mean_lifetime")()) * scale,
                                             rel=tolerance)
        value.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert float(TopoPenalty(model, metric="normalized_entropy")()) == pytest.approx(ref_penalty, rel=tolerance)


def test_a_cloud_of_ordinary_size_with_tiny_gaps_keeps_its_first_measurement():
    """Near-duplicates inside a cloud of size ~1 are not rescaled, and their tiny deaths are exact
    down to the stated limit: a float64 gap below ~1e-154 of the cloud's size reads as 0."""
    points = torch.tensor([[0.0, 1.0], [1e-100, 1.0], [1.0, 0.0]], dtype=torch.float64)
    deaths = h0_deaths(points)
    assert float(deaths[0]) == 1e-100 and float(deaths[1]) == pytest.approx(math.sqrt(2.0))
    below = torch.tensor([[0.0, 1.0], [1e-200, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert float(h0_deaths(below)[0]) == 0.0


def test_a_subnormal_death_is_rounded_once():
    """Found by the property above: measured at scale 1 in float32 and scaled back into the
    subnormals, this death was rounded twice and came out one unit high."""
    points = torch.tensor([[4.5092e-40, 6.9296e-40, -7.8658e-40, -2.3177e-40],
                           [-1.5708e-39, -3.1056e-40, -1.2331e-39, 1.8388e-40]], dtype=torch.float32)
    expected = torch.tensor(exact_deaths(points)).to(torch.float32)
    assert torch.equal(h0_deaths(points), expected)
    assert torch.equal(h0_deaths_many([points])[0], expected)
