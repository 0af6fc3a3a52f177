"""H0 of many clouds in one call (`h0_deaths_many`, `measure_layers`): the one-cloud results,
values and gradients, for every kind of cloud the engine meets."""

import numpy as np
import pytest
import torch
from conftest import gudhi_h0_deaths
from test_persistence import make_cloud, positive
from torch import nn

from topoopt import TreeCache, h0_deaths
from topoopt.many_clouds import h0_deaths_many
from topoopt.tree_cache import measure_layer, measure_layers

KINDS = ["gaussian", "quantised", "duplicates", "near_duplicates", "offset", "tiny_cluster", "small_clusters"]


def clouds_of_every_kind(dtype: torch.dtype) -> list[torch.Tensor]:
    """Same-shape small clouds of each kind (batched together), odd shapes, tiny and empty ones."""
    rng = np.random.default_rng(0)
    clouds = [make_cloud(kind, 60, 12, 1.0, rng) for kind in KINDS]
    clouds += [make_cloud("gaussian", n, d, 1.0, rng) for n, d in [(2, 3), (3, 3), (3, 3), (300, 12), (40, 784)]]
    clouds += [np.zeros((60, 12)), np.zeros((1, 12)), np.zeros((0, 12))]
    return [torch.tensor(cloud, dtype=dtype) for cloud in clouds]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deaths_and_gradients_are_the_one_cloud_ones(dtype):
    clouds = [cloud.requires_grad_(True) for cloud in clouds_of_every_kind(dtype)]
    weights = [torch.randn(max(0, cloud.shape[0] - 1), dtype=dtype) for cloud in clouds]
    many = h0_deaths_many(clouds)
    sum((deaths * w).sum() for deaths, w in zip(many, weights)).backward()
    batched_grads = [cloud.grad.clone() for cloud in clouds]
    for cloud, deaths, w, grad in zip(clouds, many, weights, batched_grads):
        cloud.grad = None
        single = h0_deaths(cloud)
        (single * w).sum().backward()
        assert deaths.dtype == single.dtype and deaths.shape == single.shape
        torch.testing.assert_close(deaths, single, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, cloud.grad, rtol=1e-6, atol=1e-12)


def test_matches_gudhi():
    clouds = clouds_of_every_kind(torch.float32)[:7]
    for cloud, deaths in zip(clouds, h0_deaths_many(clouds)):
        np.testing.assert_allclose(positive(deaths), gudhi_h0_deaths(cloud.double().numpy()), rtol=1e-5, atol=0)


def test_gradcheck():
    clouds = [torch.randn(n, d, dtype=torch.float64, requires_grad=True) for n, d in [(7, 4), (7, 4), (5, 4), (6, 3)]]
    assert torch.autograd.gradcheck(lambda *points: tuple(h0_deaths_many(points)), tuple(clouds))


def test_an_unused_output_gets_zero_gradient():
    a, b = (torch.randn(8, 3, requires_grad=True) for _ in range(2))
    deaths = h0_deaths_many([a, b])
    deaths[0].sum().backward()
    assert torch.all(b.grad == 0) and torch.any(a.grad != 0)


def test_measure_layers_equals_measure_layer():
    torch.manual_seed(0)
    layers = {f"fc{i}": nn.Linear(d, n) for i, (n, d) in enumerate([(100, 784), (100, 100), (10, 100), (32, 32),
                                                                   (32, 32), (1, 32)])}
    batched, single = TreeCache(), TreeCache()
    for include_bias in (False, True):
        together = measure_layers(batched, layers, include_bias=include_bias)
        for name, module in layers.items():
            alone = measure_layer(single, name, module, include_bias)
            assert torch.equal(together[name], alone) if alone.numel() else together[name].shape == (0,)
    assert batched.searches == single.searches == 10  # the 1-neuron layer needs no tree
    measure_layers(batched, layers)  # unchanged weights: every tree reused
    assert batched.searches == 10


def test_measure_layers_reuses_and_counts_like_measure_layer():
    torch.manual_seed(1)
    layers = {"a": nn.Linear(6, 20), "b": nn.Linear(6, 20)}
    trees = TreeCache()
    for _ in range(4):
        with torch.no_grad():
            for module in layers.values():
                module.weight.add_(1e-3)
        measure_layers(trees, layers, tree_every=3)
    assert trees.searches == 4  # searched at lookups 0 and 3 of each layer


def test_same_shape_small_clouds_are_searched_together(monkeypatch):
    from topoopt import spanning_tree

    alone = []
    original = spanning_tree.euclidean_mst_edges
    monkeypatch.setattr(spanning_tree, "euclidean_mst_edges", lambda points: alone.append(points) or original(points))
    compiled = spanning_tree.native_small_tree  # a lone small cloud goes straight to the compiled search
    monkeypatch.setattr(spanning_tree, "native_small_tree", lambda points: alone.append(points) or compiled(points))
    clouds = [torch.randn(50, 8) for _ in range(5)] + [torch.randn(40, 8), torch.randn(300, 8)]
    h0_deaths_many(clouds)
    assert [cloud.shape[0] for cloud in alone] == [40, 300]  # one of its shape, and a big one


def test_outputs_may_be_modified_in_place():
    a, b = (torch.randn(8, 3, requires_grad=True) for _ in range(2))
    deaths = h0_deaths_many([a, b])
    doubled = deaths[0].clone()
    deaths[1].mul_(0)
    assert torch.all(deaths[1] == 0) and torch.all(deaths[0] == doubled)
