"""topoopt.loop: the one optimizer factory and the one training loop."""

import pytest
import torch

from topoopt.loop import make_optimizer
from topoopt.models import build_mlp
from topoopt.optimizer import TopoOptimizer


@pytest.mark.parametrize("name, cls, options", [
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}),
    ("adam", torch.optim.Adam, {"lr": 1e-3, "weight_decay": 0.0}),
    ("adamw", torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.0}),
])
def test_make_optimizer_builds_torchs_optimizer_with_the_given_hyper_parameters(name, cls, options):
    model = build_mlp("mlp:6-5-3")
    optimizer = make_optimizer(model, name, **options)
    reference = cls(model.parameters(), **options)
    assert type(optimizer) is cls
    assert optimizer.param_groups[0].keys() == reference.param_groups[0].keys()
    for key, value in reference.param_groups[0].items():
        if key != "params":
            assert optimizer.param_groups[0][key] == value, key
    assert [p is q for p, q in zip(optimizer.param_groups[0]["params"], model.parameters())] == [True] * 4


def test_make_optimizer_wraps_in_a_topo_optimizer_and_accepts_parameter_groups():
    model = build_mlp("mlp:6-5-3")
    groups = [{"params": [model.fc1.weight, model.fc1.bias], "lr": 0.1},
              {"params": [model.fc2.weight, model.fc2.bias]}]
    optimizer = make_optimizer(model, "sgd", lr=0.05, params=groups, topo={"policy": "awaken", "strength": 2.0})
    assert isinstance(optimizer, TopoOptimizer)
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.05]
    assert optimizer.strength == 2.0


def test_make_optimizer_rejects_unknown_names_and_momentum_outside_sgd():
    model = build_mlp("mlp:6-5-3")
    with pytest.raises(ValueError, match="Invalid optimizer 'rmsprop'. Valid values are: sgd, adam, adamw"):
        make_optimizer(model, "rmsprop", lr=0.1)
    with pytest.raises(ValueError, match="momentum is an SGD option"):
        make_optimizer(model, "adam", lr=0.1, momentum=0.9)
