"""Topology early stopping and Rieck et al.'s neural persistence, against hand computations."""

import math

import pytest
import torch

from topoopt.early_stopping import NeuralPersistenceStopping, TopologyEarlyStopping, neural_persistence
from topoopt.lab.models import build_mlp


def test_neural_persistence_of_a_two_by_two_layer_by_hand():
    # |w| / max = [[1, .5], [.25, .75]]: the maximum spanning tree of the bipartite graph keeps
    # 1, .75 and .5 (.25 would close a cycle): persistences 0, .25, .5.
    weight = torch.tensor([[4.0, -2.0], [1.0, 3.0]])
    assert neural_persistence(weight, normalize=False) == pytest.approx(math.sqrt(0.25**2 + 0.5**2))
    assert neural_persistence(weight) == pytest.approx(math.sqrt(0.3125) / math.sqrt(3))
    assert neural_persistence(weight, p=1, normalize=False) == pytest.approx(0.75)
    assert neural_persistence(torch.zeros(3, 2)) == 0.0


def test_neural_persistence_is_scale_free_and_in_the_unit_interval():
    weight = torch.randn(20, 30, dtype=torch.float64)
    value = neural_persistence(weight)
    assert neural_persistence(7.5 * weight) == pytest.approx(value, rel=1e-12)
    assert 0.0 <= value <= 1.0


def test_topology_stopping_waits_for_patience_settled_checks():
    model = build_mlp("mlp:6-10-3")
    stopper = TopologyEarlyStopping(model, tolerance=0.01, patience=2)
    decisions = [stopper.update()]  # the first check has nothing to compare with
    with torch.no_grad():
        model.fc1.weight.mul_(1.5)  # moves mean lifetime by 50%: not settled
    decisions.append(stopper.update())
    with torch.no_grad():
        model.fc1.weight.mul_(1.001)  # 0.1%: settled
    decisions.append(stopper.update())
    decisions.append(stopper.update())  # unchanged: settled again, patience 2 reached
    assert decisions == [False, False, False, True] and stopper.settled == 2
    restored = TopologyEarlyStopping(model, tolerance=0.01, patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.should_stop and len(restored.history) == 4


def test_neural_persistence_stopping_stops_when_it_stops_rising():
    model = build_mlp("mlp:6-10-3")
    stopper = NeuralPersistenceStopping(model, patience=2)
    assert not stopper.update()
    assert not stopper.update()  # unchanged: waited 1
    assert stopper.update() and stopper.waited == 2


@pytest.mark.parametrize("kwargs,message", [({"tolerance": -1}, "Invalid tolerance"),
                                            ({"patience": 0}, "Invalid patience")])
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TopologyEarlyStopping(build_mlp("mlp:6-3"), **kwargs)


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_loss_that_is_not_finite_stops_at_once(loss):
    """A diverged run is neither stuck nor settled: a NaN or infinite loss stops it, saying why,
    before the weights (NaN too, after such a step) are measured; a resumed stopper stays stopped."""
    model = build_mlp("mlp:6-10-3")
    stopper = TopologyEarlyStopping(model, patience=3, min_checks=5)
    assert stopper.update(2.0) is False
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    assert stopper.update(loss) is True and stopper.should_stop
    assert stopper.reason == f"training loss {loss}: the run diverged" and len(stopper.history) == 1
    restored = TopologyEarlyStopping(model, patience=3, min_checks=5)
    restored.load_state_dict(stopper.state_dict())
    assert restored.should_stop and restored.diverged


def test_a_run_stuck_at_its_first_loss_is_not_settled():
    """A tiny-initialised network at chance: its topology does not move, and neither does its
    loss (ln 10). With the loss given, the checks do not count as settled until it falls."""
    model = build_mlp("mlp:6-10-3")
    stopper = TopologyEarlyStopping(model, tolerance=0.01, patience=2, min_loss_drop=0.1)
    chance = math.log(10)
    assert [stopper.update(chance) for _ in range(5)] == [False] * 5
    assert stopper.settled == 0 and stopper.reason.startswith("stuck: training loss 2.303")
    assert [stopper.update(0.85 * chance) for _ in range(2)] == [False, True]  # 15% lower: settled twice
    assert "settled for 2 checks" in stopper.reason
    restored = TopologyEarlyStopping(model, tolerance=0.01, patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.first_loss == pytest.approx(chance)
    with pytest.raises(ValueError, match="Invalid min_loss_drop"):
        TopologyEarlyStopping(model, min_loss_drop=1.0)
