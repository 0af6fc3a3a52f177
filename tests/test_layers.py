"""neuron_cloud, layer selection and layer_topology."""

import numpy as np
import pytest
import torch
from torch import nn

from topoopt import h0_deaths, layer_topology, neuron_cloud, select_layers, topological_layers
from topoopt.lab.models import build_mlp


def test_linear_cloud_is_the_weight_rows_and_keeps_the_graph():
    layer = nn.Linear(5, 3)
    cloud = neuron_cloud(layer)
    assert cloud.shape == (3, 5)
    assert torch.equal(cloud, layer.weight)
    cloud.sum().backward()
    assert torch.equal(layer.weight.grad, torch.ones(3, 5))


@pytest.mark.parametrize(
    "layer,shape",
    [(nn.Conv1d(2, 4, 3), (4, 6)), (nn.Conv2d(3, 8, (2, 3)), (8, 18)), (nn.Conv3d(1, 5, 2), (5, 8))],
)
def test_conv_cloud_has_one_flattened_filter_per_channel(layer, shape):
    cloud = neuron_cloud(layer)
    assert cloud.shape == shape
    assert torch.equal(cloud[1], layer.weight[1].flatten())


def test_bias_is_an_extra_coordinate():
    layer = nn.Linear(4, 2)
    cloud = neuron_cloud(layer, include_bias=True)
    assert cloud.shape == (2, 5)
    assert torch.equal(cloud[:, -1], layer.bias)


def test_bias_option_without_bias_is_an_error():
    with pytest.raises(ValueError, match="has no bias"):
        neuron_cloud(nn.Linear(4, 2, bias=False), include_bias=True)


def test_other_modules_are_rejected_by_type_name():
    with pytest.raises(TypeError, match="BatchNorm1d has no registered neuron cloud"):
        neuron_cloud(nn.BatchNorm1d(3))


def test_layers_are_found_by_name_through_wrappers():
    model = build_mlp("mlp:8-6-4-2")
    assert list(topological_layers(model)) == ["fc1", "fc2", "fc3"]
    assert list(topological_layers(torch.nn.DataParallel(model))) == ["fc1", "fc2", "fc3"]


def test_unknown_layer_names_list_the_valid_ones():
    with pytest.raises(KeyError, match=r"Unknown layer name\(s\) \['fc9'\].*\['fc1', 'fc2', 'fc3'\]"):
        select_layers(build_mlp("mlp:8-6-4-2"), ["fc1", "fc9"])


def test_layer_topology_reports_each_layer():
    model = build_mlp("mlp:8-6-4-2")
    report = layer_topology(model)
    assert list(report) == ["fc1", "fc2", "fc3"]
    fc1 = report["fc1"]
    assert (fc1.n_neurons, fc1.dim) == (6, 8)
    deaths = h0_deaths(model.fc1.weight.detach())
    assert fc1.mean_lifetime == pytest.approx(deaths.mean().item())
    shares = deaths / deaths.sum()  # E / log n over the 5 bars of 6 neurons
    assert fc1.normalized_entropy == pytest.approx(float(-(shares * shares.log()).sum() / np.log(5)), rel=1e-6)
    assert list(layer_topology(model, layers=["fc2"])) == ["fc2"]


def test_layer_topology_names_a_layer_with_nan_weights():
    model = build_mlp("mlp:8-6-4-2")
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="Layer 'fc2'.*NaN or Inf"):
        layer_topology(model)


def test_zero_initialised_layer_has_zero_metrics():
    model = build_mlp("mlp:8-6-4-2")
    nn.init.zeros_(model.fc1.weight)
    fc1 = layer_topology(model)["fc1"]
    assert fc1.mean_lifetime == 0 and fc1.normalized_entropy == 0 and fc1.zero_bars == 5


def test_an_effective_weight_is_found_wherever_the_module_keeps_it():
    """`neuron_cloud` reads a layer's ``effective_weight`` before its raw weight: a class
    property (topoopt.sparse), a plain instance attribute or a registered buffer alike."""
    layer = nn.Linear(4, 3)
    assert neuron_cloud(layer) is layer.weight
    masked = layer.weight.detach() * 0.5
    layer.effective_weight = masked  # a plain tensor attribute: kept in the instance's __dict__
    assert neuron_cloud(layer) is masked
    buffered = nn.Linear(4, 3)
    buffered.register_buffer("effective_weight", torch.ones(3, 4))
    assert torch.equal(neuron_cloud(buffered), torch.ones(3, 4))

    class MaskedByGetattr(nn.Linear):  # answers the name in its own __getattr__ (a referee's case)
        def __getattr__(self, name):
            if name == "effective_weight":
                return self.weight * 0.0
            return super().__getattr__(name)

    assert bool((neuron_cloud(MaskedByGetattr(4, 3)) == 0).all())


def test_layer_parameters_are_a_module_s_own_and_its_parametrizations():
    from topoopt.layers import layer_parameters

    plain, no_bias = nn.Linear(4, 3), nn.Linear(4, 3, bias=False)
    assert layer_parameters(plain) == [plain.weight, plain.bias]
    assert layer_parameters(no_bias) == [no_bias.weight]
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    found = layer_parameters(normed)
    expected = list(normed.parameters(recurse=False)) + list(normed.parametrizations.parameters())
    assert {id(p) for p in found} == {id(p) for p in expected} and len(found) == len(expected) == 3
