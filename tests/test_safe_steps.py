"""TopoOptimizer and TopoPenalty never corrupt weights silently: shared and parametrized
weights, non-finite steps, weights at the edges of the float32 range, failing closures, layers
with nothing to measure, and resumes that are bit-identical with every option."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from topoopt import TopoOptimizer, TopoPenalty, h0_deaths, layer_topology, neuron_cloud, topological_layers
from topoopt.lab.models import build_mlp


def fixed_scales(scales):
    return lambda complexity, change, strength: dict(scales)


def batch(dtype=torch.float64, seed=0, features=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, features, generator=g, dtype=dtype)
    return x, x[:, :classes].argmax(dim=1)


# ---- which parameters a scale moves ----

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)
        self.b = nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("scales,expected", [({"a": 0.5, "b": 0.5}, 0.5), ({"a": 0.5, "b": 2.0}, 1.25)])
def test_a_shared_weight_is_scaled_once_by_the_mean_of_its_layers_scales(scales, expected):
    torch.manual_seed(0)
    net = Tied().double()
    x, y = batch()
    reference = copy.deepcopy(net)
    bare = torch.optim.SGD(reference.parameters(), lr=0.1)
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, policy=fixed_scales(scales))
    start = net.a.weight.detach().clone()
    for optimizer, model in ((bare, reference), (wrapped, net)):
        optimizer.zero_grad()
        F.cross_entropy(model(x)[:, :3], y).backward()
        optimizer.step()
    inner_step = reference.a.weight.detach() - start
    torch.testing.assert_close(net.a.weight.detach() - start, expected * inner_step, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bias", [True, False])
def test_a_parametrized_weight_is_measured_as_used_and_its_parameters_scaled(bias):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3)).double()
    parametrizations.weight_norm(net[0])
    x, y = batch()
    reference = copy.deepcopy(net)
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, policy=fixed_scales({"0": 0.5, "2": 1.0}))
    bare = torch.optim.SGD(reference.parameters(), lr=0.1)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    for optimizer, model in ((bare, reference), (wrapped, net)):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for (name, moved), (_, inner) in zip(net.named_parameters(), reference.named_parameters()):
        factor = 0.5 if name.startswith("0.") else 1.0
        torch.testing.assert_close(moved - start[name], factor * (inner - start[name]), rtol=1e-12, atol=1e-15)
    # The cloud is the weight the layer computes with (g · v / ‖v‖), not a raw parameter.
    torch.testing.assert_close(neuron_cloud(net[0]), net[0].weight)


# ---- non-finite values ----

def test_a_nan_gradient_on_a_non_measuring_step_is_reported_and_never_scaled():
    net = build_mlp("mlp:6-8-3").double()
    x, y = batch()
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net,
                            policy=fixed_scales({"fc1": 0.5, "fc2": 1.0}), every=100)
    wrapped.zero_grad()
    F.cross_entropy(net(x), y).backward()
    wrapped.step()  # measures; step 1 will not
    wrapped.zero_grad()
    F.cross_entropy(net(x), y).backward()
    net.fc1.weight.grad[0, 0] = float("nan")
    before = net.fc1.weight.detach().clone()
    with pytest.raises(FloatingPointError, match=r"layer\(s\) \['fc1'\] NaN or Inf"):
        wrapped.step()
    expected = before - 0.1 * net.fc1.weight.grad  # the inner step, unscaled
    assert torch.equal(torch.isnan(net.fc1.weight), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    # to the last bit or two: SGD's foreach kernel may fuse the multiply-add (FMA) on this CPU;
    # a scaled step (× 0.5) would be off by far more
    torch.testing.assert_close(net.fc1.weight.detach()[finite], expected[finite], rtol=1e-14, atol=0)
    assert wrapped.topo_step == 2


def test_an_inf_update_stays_inf_never_nan():
    net = build_mlp("mlp:6-8-3").double()
    x, y = batch()
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, policy=fixed_scales({"fc1": 0.5}),
                            every=100)
    wrapped.zero_grad()
    F.cross_entropy(net(x), y).backward()
    net.fc1.weight.grad[1, 2] = float("-inf")
    with pytest.raises(FloatingPointError):
        wrapped.step()
    assert not torch.isnan(net.fc1.weight).any() and torch.isinf(net.fc1.weight).sum() == 1


@pytest.mark.parametrize("scale", [1e19, 1e-22])
def test_weights_at_the_edges_of_float32_give_exact_deaths_metrics_and_gradients(scale):
    torch.manual_seed(0)
    base = torch.randn(40, 784, dtype=torch.float64)
    cloud = (base * scale).float().requires_grad_()
    deaths = h0_deaths(cloud)
    reference = h0_deaths(cloud.detach().double())
    assert torch.isfinite(deaths).all()
    torch.testing.assert_close(deaths.double(), reference, rtol=1e-6, atol=0)
    net = nn.Sequential(nn.Linear(784, 40), nn.Sigmoid(), nn.Linear(40, 3))
    with torch.no_grad():
        net[0].weight.copy_(cloud)
    penalty = TopoPenalty(net, metric="mean_lifetime", weight={"0": 1.0})
    penalty().backward()
    assert torch.isfinite(net[0].weight.grad).all() and net[0].weight.grad.abs().sum() > 0
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, metric="mean_lifetime")
    wrapped.update_scales()
    assert 0 < wrapped.complexity["0"] < 10


def test_an_overflowing_measurement_names_the_layer_and_the_metric():
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(5, 4) * 1e38)
    penalty = TopoPenalty(net, metric="total_persistence", weight={"0": 1.0})
    with pytest.raises(ValueError, match=r"Layer '0': its total_persistence is inf"):
        penalty()


# ---- failed steps ----

def test_a_closure_failing_mid_step_leaves_parameters_state_and_counters_as_before():
    net = build_mlp("mlp:6-8-3").double()
    x, y = batch()
    wrapped = TopoOptimizer(torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=5), net,
                            policy=fixed_scales({"fc1": 0.5}), every=1)
    calls = []

    def closure(fail_at=None):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("data loader failed")
        wrapped.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    wrapped.step(closure)
    saved_params = [p.detach().clone() for p in net.parameters()]
    saved_state = copy.deepcopy(wrapped.state_dict())
    calls.clear()
    with pytest.raises(RuntimeError, match="data loader failed"):
        wrapped.step(lambda: closure(fail_at=3))
    for before, after in zip(saved_params, net.parameters()):
        assert torch.equal(before, after)
    after_state = wrapped.state_dict()
    assert after_state["topoopt"] == saved_state["topoopt"]
    inner_before, inner_after = saved_state["state"][0], after_state["state"][0]
    assert inner_before["n_iter"] == inner_after["n_iter"] and inner_before["func_evals"] == inner_after["func_evals"]
    torch.testing.assert_close(inner_before["d"], inner_after["d"], rtol=0, atol=0)


# ---- layers with nothing to measure, and layers measured differently ----

def test_layers_without_neurons_or_inputs_have_empty_diagrams_and_unit_scales():
    net = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 0), nn.Linear(0, 5), nn.Linear(5, 3))
    report = layer_topology(net)
    assert report["1"].deaths.numel() == 0 and report["2"].deaths.numel() == 0
    assert report["2"].n_neurons == 5 and report["2"].mean_lifetime == 0.0
    penalty = TopoPenalty(net, metric="mean_lifetime")
    assert torch.isfinite(penalty())
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, layers=["0", "1", "3"], policy="awaken")
    wrapped.zero_grad()
    net(torch.randn(2, 4)).sum().backward()
    wrapped.step()
    assert wrapped.scales["1"] == 1.0


def test_weights_on_the_meta_device_name_the_layer():
    with torch.device("meta"):
        net = build_mlp("mlp:4-5-2")
    with pytest.raises(ValueError, match=r"Layer 'fc1': its weights are on the 'meta' device"):
        TopoPenalty(net)()
    with pytest.raises(ValueError, match=r"Layer 'fc1': its weights are on the 'meta' device"):
        layer_topology(net)


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_convolutions_give_one_filter_per_output_channel(groups):
    layer = nn.ConvTranspose2d(4, 6, kernel_size=3, groups=groups)
    cloud = neuron_cloud(layer)
    assert cloud.shape == (6, (4 // groups) * 9)
    # Output channel j sees only its filter: a unit impulse on input channel i gives the
    # kernel weight[i, j_in_group] in output channel j (zero bias), so read the filter back.
    layer.bias.data.zero_()
    for j in range(6):
        group, within = divmod(j, 6 // groups)
        inputs = range(group * (4 // groups), (group + 1) * (4 // groups))
        rows = []
        for i in inputs:
            impulse = torch.zeros(1, 4, 1, 1)
            impulse[0, i] = 1.0
            rows.append(layer(impulse)[0, j].flatten())
        torch.testing.assert_close(cloud[j], torch.cat(rows).detach())
    assert list(topological_layers(nn.Sequential(layer))) == ["0"]


# ---- resume, bit-identical with every option ----

def test_penalty_every_and_approximate_trees_resume_bit_identically():
    def build():
        torch.manual_seed(0)
        net = build_mlp("mlp:6-24-16-3").double()
        inner = torch.optim.Adam(net.parameters(), lr=0.01)
        optimizer = TopoOptimizer(inner, net, metric="mean_lifetime", policy="contrast", every=2, tree_every=4)
        penalty = TopoPenalty(net, metric="mean_lifetime", direction="maximize", weight=0.05, every=3, tree_every=4)
        return net, optimizer, penalty

    def run(steps, interrupt_at=None):
        net, optimizer, penalty = build()
        for step in range(steps):
            if step == interrupt_at:
                buffer = io.BytesIO()
                torch.save({"model": net.state_dict(), "optim": optimizer.state_dict(),
                            "penalty": penalty.state_dict()}, buffer)
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                net, optimizer, penalty = build()
                net.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optim"])
                penalty.load_state_dict(saved["penalty"])
            x, y = batch(seed=step)
            optimizer.zero_grad()
            (F.cross_entropy(net(x), y) + penalty()).backward()
            optimizer.step()
        return net

    straight = run(17)
    for interrupt_at in (5, 7):
        resumed = run(17, interrupt_at)
        for a, b in zip(straight.parameters(), resumed.parameters()):
            assert torch.equal(a, b)


def test_a_closure_failing_under_sgd_leaves_everything_as_before_without_a_copy():
    net = build_mlp("mlp:6-8-3").double()
    x, y = batch()
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net,
                            policy=fixed_scales({"fc1": 0.5}), every=1)

    def closure():
        wrapped.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    wrapped.step(closure)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="bad batch"):
        wrapped.step(lambda: (_ for _ in ()).throw(RuntimeError("bad batch")))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())) and wrapped.topo_step == 1
