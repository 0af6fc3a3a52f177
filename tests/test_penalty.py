"""TopoPenalty: values against the metrics, every=k, targets, weights, and bad input."""

import numpy as np
import pytest
import torch

from topoopt import TopoPenalty, h0_deaths, mean_lifetime, normalized_persistent_entropy
from topoopt.lab.models import build_mlp, initialise


def model():
    return build_mlp("mlp:12-8-6-3")


def test_value_is_the_weighted_sum_of_layer_metrics():
    net = model()
    penalty = TopoPenalty(net, metric="mean_lifetime", weight={"fc1": 2.0, "fc3": 0.5})
    expected = 2.0 * mean_lifetime(h0_deaths(net.fc1.weight)) + 0.5 * mean_lifetime(h0_deaths(net.fc3.weight))
    torch.testing.assert_close(penalty(), expected)


def test_maximize_negates_and_target_squares_the_distance():
    net = model()
    value = normalized_persistent_entropy(h0_deaths(net.fc2.weight))
    assert TopoPenalty(net, layers=["fc2"], direction="maximize")().item() == pytest.approx(-value.item())
    assert TopoPenalty(net, layers=["fc2"], target=0.5)().item() == pytest.approx((value.item() - 0.5) ** 2)


def test_gradient_reaches_the_weights_and_maximizing_lifetime_spreads_neurons():
    torch.manual_seed(1)
    net = model()
    penalty = TopoPenalty(net, metric="mean_lifetime", direction="maximize", layers=["fc1"])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    before = mean_lifetime(h0_deaths(net.fc1.weight.detach())).item()
    for _ in range(20):
        optimizer.zero_grad()
        penalty().backward()
        optimizer.step()
    assert mean_lifetime(h0_deaths(net.fc1.weight.detach())).item() > before * 1.2


def test_every_k_returns_an_exact_zero_without_graph_in_between():
    penalty = TopoPenalty(model(), every=3)
    values = [penalty() for _ in range(7)]
    computed = [i for i, v in enumerate(values) if v.requires_grad]
    assert computed == [0, 3, 6]
    assert all(v.item() == 0.0 and v.grad_fn is None for i, v in enumerate(values) if i not in computed)


def test_tree_reuse_remeasures_the_cached_edges():
    net = model()
    penalty = TopoPenalty(net, metric="mean_lifetime", tree_every=5, layers=["fc1"])
    penalty()
    with torch.no_grad():
        net.fc1.weight.mul_(2.0)  # same tree, doubled lengths
    assert penalty().item() == pytest.approx(2 * mean_lifetime(h0_deaths(net.fc1.weight / 2)).item(), rel=1e-5)


@pytest.mark.parametrize("metric", ["normalized_entropy", "mean_lifetime", "total_persistence"])
def test_zero_initialised_network_gives_finite_penalty_and_gradients(metric):
    net = model()
    initialise(net, "zero")
    value = TopoPenalty(net, metric=metric)()
    value.backward()
    assert torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_nan_weights_name_the_layer():
    net = model()
    with torch.no_grad():
        net.fc2.weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match="Layer 'fc2'.*NaN or Inf"):
        TopoPenalty(net)()


def test_unknown_metric_and_layer_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=("Invalid metric: 'lifetime'. It must be one of "
                                          "'normalized_entropy', 'mean_lifetime'")):
        TopoPenalty(model(), metric="lifetime")
    with pytest.raises(KeyError, match=r"\['fc1', 'fc2', 'fc3'\]"):
        TopoPenalty(model(), layers=["fc4"])
    with pytest.raises(KeyError, match="weight names unknown layer"):
        TopoPenalty(model(), weight={"fc7": 1.0})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"direction": "up"}, "Invalid direction: 'up'"),
        ({"every": 0}, "Invalid every: 0"),
        ({"weight": float("nan")}, "Invalid weight: nan"),
        ({"weight": {"fc2": float("inf")}}, "Invalid weight for layer 'fc2'"),
        ({"weight": -1.0}, "Invalid weight: -1.0. It must be a finite number ≥ 0"),
        ({"weight": {"fc1": -0.5}}, "Invalid weight for layer 'fc1'.*≥ 0"),
        ({"weight": True}, "It must be a finite number"),
        ({"weight": "0.1"}, "Invalid weight: '0.1'. It must be a finite number"),
        ({"target": 0.5, "direction": "maximize"}, "Invalid target: 0.5. It must be None with direction='maximize'"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TopoPenalty(model(), **kwargs)


def test_a_numpy_scalar_weight_or_target_is_a_number():
    penalty = TopoPenalty(model(), weight=np.float32(0.25), target=np.float32(0.5))
    assert set(penalty.coefficients.values()) == {0.25} and all(type(c) is float for c in penalty.coefficients.values())
    assert float(penalty().detach()) >= 0.0
    with pytest.raises(ValueError, match="Invalid target: True"):
        TopoPenalty(model(), target=True)


def test_penalty_does_not_own_the_model_parameters():
    penalty = TopoPenalty(model())
    assert list(penalty.parameters()) == []
    assert list(penalty.state_dict()) == ["_extra_state"]  # its call counter, not the weights


def test_calls_without_a_graph_compute_and_do_not_shift_every():
    """A logging or evaluation call under no_grad always gives the value and leaves the
    training schedule of `every` as it was (it used to take the computing turns)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    penalty = TopoPenalty(net, weight=1.0, every=2)
    reference = TopoPenalty(net, weight=1.0, every=2)
    logged, trained, expected = [], [], []
    for _ in range(4):
        with torch.no_grad():
            logged.append(penalty().item())
        trained.append(penalty().item())
        expected.append(reference().item())
    assert trained == expected and expected[0] > 0 and expected[1] == 0.0
    assert all(value == expected[0] for value in logged)  # the weights did not move
    with torch.inference_mode():
        assert penalty().item() == expected[0]
    assert penalty.state_dict()["_extra_state"]["calls"] == 4


@pytest.mark.parametrize("metric,target", [("normalized_entropy", 2.0), ("normalized_entropy", -0.1),
                                           ("mean_lifetime", -1.0)])
def test_a_target_the_metric_cannot_reach_is_refused(metric, target):
    with pytest.raises(ValueError, match=f"Invalid target: {target}. It must be a finite number .*{metric} can take"):
        TopoPenalty(model(), metric=metric, target=target)


def test_an_unknown_layer_prints_its_message_as_written():
    with pytest.raises(KeyError) as raised:
        TopoPenalty(model(), layers=["fc9"])
    assert str(raised.value).startswith("Unknown layer name(s) ['fc9']")


def test_a_skipped_call_computes_no_parametrized_weight():
    """A call that `every` skips returns a zero on the last layer's device without reading a
    parametrized weight: spectral_norm's power iteration would update its state (and so the
    model's later forward passes)."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), spectral_norm(torch.nn.Linear(10, 4)))
    penalty = TopoPenalty(model, every=2)
    state = model[2].parametrizations.weight[0]._u
    penalty()
    before = state.clone()
    assert float(penalty()) == 0.0
    assert torch.equal(state, before)


@pytest.mark.parametrize("short_way", ["exact_terms", "compiled_exact_trees"])
def test_the_compiled_lookups_of_a_training_step_change_nothing(monkeypatch, short_way):
    """`TreeCache.exact_terms` (a training step's lookups and terms in one compiled call) and
    `TreeCache.compiled_exact_trees` (the short way to the trees alone) give the values,
    gradients, trees and search count of the general path over a few training steps, and leave
    a NaN layer to the general path's error, with no tree searched before it."""
    from topoopt import TreeCache

    original, used = getattr(TreeCache, short_way), []

    def run(short: bool):
        if short_way == "compiled_exact_trees":  # the trees' short way alone, under the one node
            monkeypatch.setattr(TreeCache, "exact_terms", lambda self, *args, **kwargs: None)
        monkeypatch.setattr(TreeCache, short_way, lambda self, *args, **kwargs: used.append(
            original(self, *args, **kwargs)) or used[-1] if short else None)
        torch.manual_seed(0)
        model = build_mlp("mlp:12-9-7-3")
        penalty = TopoPenalty(model, metric="normalized_entropy", weight=0.5)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        seen = []
        for step in range(4):
            optimizer.zero_grad()
            total = penalty() + (model(torch.randn(5, 12)) ** 2).mean()
            total.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            seen.append((float(total.detach()), grads, dict(penalty.last_values)))
            if step != 1:  # one step without an update: the trees are reused exactly
                optimizer.step()
        with torch.no_grad():
            model.fc2.weight[0, 0] = float("nan")
        searches = penalty.trees.searches
        with pytest.raises(ValueError, match="Layer 'fc2': Invalid weights: NaN or Inf in 1 of 7 rows"):
            penalty()
        assert penalty.trees.searches == searches
        monkeypatch.undo()
        return seen, searches

    short, general = run(True), run(False)
    assert any(found is not None for found in used) and short[1] == general[1]
    for (total, grads, values), (total2, grads2, values2) in zip(short[0], general[0]):
        assert total == total2 and values == values2
        assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_a_coefficient_changed_to_another_type_gives_its_own_term():
    """0.1 == np.float32(0.1), but the term of the float32 coefficient is another number: a call
    after the change gives the value of the changed coefficient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Linear(9, 7)).double()
    penalty = TopoPenalty(model, metric="mean_lifetime", weight=0.1)
    penalty()
    penalty.coefficients["0"] = np.float32(0.1)
    kept = float(penalty().detach())
    assert kept == float(penalty().detach())


def test_a_failed_measurement_keeps_no_tree(monkeypatch):
    """A layer whose search is refused (here: over its memory budget) raises before the cache
    keeps any other layer's tree, as the general path does."""
    import topoopt.spanning_tree as spanning_tree

    monkeypatch.setattr(spanning_tree, "available_bytes", lambda device: 100_000)
    penalty = TopoPenalty(torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Linear(9, 300)))
    with pytest.raises(spanning_tree.MemoryBudgetError):
        penalty()
    assert len(penalty.trees) == 0 and penalty.trees.searches == 0
