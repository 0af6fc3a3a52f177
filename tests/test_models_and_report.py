"""Model specs and initialisation (topoopt.lab.models), text tables (topoopt.lab.report) and the H1
diagram (topoopt.h1_diagram, against ripser)."""

import numpy as np
import pytest
import torch

from topoopt import h1_diagram, layer_topology
from topoopt.lab.models import build_mlp, initialise, parse_model_spec
from topoopt.lab.report import format_table, topology_table


@pytest.mark.parametrize("spec,widths", [("mlp:784-100-10", [784, 100, 10]), ("mlp:4-3", [4, 3])])
def test_parse_model_spec(spec, widths):
    assert parse_model_spec(spec) == widths


@pytest.mark.parametrize(
    "spec,message",
    [("cnn:4-3", "expected 'mlp:IN-H1-...-OUT'"), ("mlp:4-x", "widths must be integers"),
     ("mlp:4", "needs at least two positive widths"), ("mlp:4-0-3", "needs at least two positive widths")],
)
def test_malformed_specs_say_why(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_model_spec(spec)


def test_build_mlp_names_layers_and_places_activations():
    model = build_mlp("mlp:6-5-4-3", activation="tanh", bias=False)
    assert [name for name, _ in model.named_children()] == ["flatten", "fc1", "act1", "fc2", "act2", "fc3"]
    assert isinstance(model.act1, torch.nn.Tanh) and model.fc1.bias is None
    assert model(torch.randn(2, 6)).shape == (2, 3)
    with pytest.raises(ValueError, match="Invalid activation 'swish'"):
        build_mlp("mlp:6-3", activation="swish")


def test_initialise_zero_normal_and_default():
    model = build_mlp("mlp:6-5-3")
    initialise(model, "zero")
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
    initialise(model, "normal", std=1e-3, generator=torch.Generator().manual_seed(0))
    weights = model.fc1.weight.detach()
    assert 0.5e-3 < float(weights.std()) < 2e-3 and float(model.fc1.bias.abs().sum()) == 0
    reference = torch.empty(5, 6).normal_(0.0, 1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(weights, reference)
    initialise(model, "default")
    bound = 1 / 6**0.5  # torch's default: U(−1/√fan_in, 1/√fan_in)
    assert float(model.fc1.weight.abs().max()) <= bound and float(model.fc1.weight.std()) > 0.1
    with pytest.raises(ValueError, match="Invalid init std: -1"):
        initialise(model, "normal", std=-1)


def test_format_table_aligns_and_rounds():
    table = format_table(["name", "value"], [["a", 1.234567], ["long name", 12]])
    assert table.splitlines() == ["name       value", "---------  -----", "a          1.235", "long name     12"]
    labelled = format_table(["a", "b", "n"], [["x", "long", 1.0], ["yy", "z", "pre"]], left_columns=2)
    assert labelled.splitlines() == ["a   b       n", "--  ----  ---", "x   long    1", "yy  z     pre"]


def test_topology_table_has_one_row_per_layer_with_the_report_values():
    model = build_mlp("mlp:6-5-3")
    report = layer_topology(model)
    lines = topology_table(report).splitlines()
    assert len(lines) == 2 + len(report)
    assert lines[2].split()[:3] == ["fc1", "5", "6"]
    assert f"{report['fc1'].mean_lifetime:.4g}" in lines[2]


def test_h1_diagram_matches_ripser_on_a_circle():
    ripser = pytest.importorskip("ripser")
    angles = torch.linspace(0, 2 * np.pi, 13)[:-1]
    circle = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1).double()
    diagram = h1_diagram(circle)
    expected = ripser.ripser(circle.numpy(), maxdim=1)["dgms"][1]
    assert diagram.shape == expected.shape == (1, 2)
    np.testing.assert_allclose(diagram.detach().numpy(), expected, rtol=1e-6)
    assert h1_diagram(circle[:2]).shape == (0, 2)
