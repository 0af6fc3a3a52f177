"""topoopt.lab.loop: the one optimizer factory and the one training loop."""

import math

import pytest
import torch

from topoopt.lab.loop import make_optimizer
from topoopt.lab.models import build_mlp
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
    with pytest.raises(ValueError, match="Invalid optimizer: 'rmsprop'. It must be one of 'sgd', 'adam', 'adamw'"):
        make_optimizer(model, "rmsprop", lr=0.1)
    with pytest.raises(ValueError, match="momentum is an SGD option"):
        make_optimizer(model, "adam", lr=0.1, momentum=0.9)


# ---- the loop ----
def _data(n_train=50, n_test=20, seed=0):
    from topoopt.lab.data import Dataset

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # three classes
    return Dataset("toy", x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def _model(seed=0):
    torch.manual_seed(seed)
    return build_mlp("mlp:6-5-3")


def _reference_training(model, data, batch_size, seed, steps):
    """The loop written out by hand: shuffled minibatches, cross-entropy, one SGD step each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses, taken = [], 0
    while taken < steps:
        for batch in torch.randperm(len(data.x_train), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            optimizer.step()
            losses.append((loss.item(), len(batch)))
            taken += 1
            if taken == steps:
                break
    return losses


def _same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_fit_matches_a_hand_written_loop_and_reports_each_epoch():
    from topoopt.lab.loop import accuracy, fit

    data, model, reference = _data(), _model(), _model()
    history = fit(model, data, epochs=2, batch_size=16, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), seed=4)
    losses = _reference_training(reference, data, batch_size=16, seed=4, steps=8)  # 4 batches an epoch
    assert _same_weights(model, reference)
    assert [row["epoch"] for row in history] == [1, 2] and [row["step"] for row in history] == [4, 8]
    second_epoch = losses[4:]
    assert history[1]["loss"] == pytest.approx(sum(v * n for v, n in second_epoch) / 50, rel=1e-12)
    assert history[1]["test_accuracy"] == accuracy(reference, data.x_test, data.y_test)


def test_fit_steps_evaluates_at_evenly_spaced_steps_with_the_mean_loss_since_the_last():
    from topoopt.lab.loop import fit_steps

    data, model, reference = _data(), _model(), _model()
    seen = []
    history = fit_steps(model, data, steps=10, batch_size=16, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        evaluations=4, seed=2, on_eval=lambda row, net: seen.append(row["step"]))
    losses = _reference_training(reference, data, batch_size=16, seed=2, steps=10)
    assert _same_weights(model, reference)
    assert [row["step"] for row in history] == seen == [2, 5, 8, 10]  # round(10 · k / 4)
    assert [row["epoch"] for row in history] == [0.5, 1.25, 2.0, 2.5]  # 4 batches an epoch
    assert history[1]["train_loss"] == pytest.approx(sum(v for v, _ in losses[2:5]) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="Invalid steps/evaluations: 0/1"):
        fit_steps(model, data, steps=0, batch_size=16, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  evaluations=1)


def test_a_stopped_loop_resumes_bit_identically_from_its_checkpointed_state():
    """Stop inside the second epoch, save the state as a checkpoint would (plain data), rebuild
    everything and continue: the weights equal those of a run that never stopped."""
    from topoopt.lab.loop import Callback, LoopState, run_loop

    data = _data()

    class StopAt(Callback):
        def after_step(self, state):
            state.stop = state.step == 6

    def build():
        model = _model()
        return model, make_optimizer(model, "sgd", lr=0.1, momentum=0.9), torch.Generator().manual_seed(1)

    model, optimizer, generator = build()
    run_loop(model, optimizer, data.x_train, data.y_train, batch_size=16, generator=generator, epochs=3)

    first, first_optimizer, first_generator = build()
    stopped = run_loop(first, first_optimizer, data.x_train, data.y_train, batch_size=16,
                       generator=first_generator, epochs=3, callbacks=[StopAt()])
    assert stopped.stop and (stopped.epoch, stopped.step, stopped.next_batch) == (1, 6, 2)
    saved = {"model": first.state_dict(), "optimizer": first_optimizer.state_dict(),
             "generator": first_generator.get_state(), "epoch": stopped.epoch, "step": stopped.step,
             "partial": stopped.partial_epoch()}

    resumed, resumed_optimizer, resumed_generator = build()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_generator.set_state(saved["generator"])
    state = LoopState(resumed, resumed_optimizer).resume(saved["epoch"], saved["step"], saved["partial"])
    final = run_loop(resumed, resumed_optimizer, data.x_train, data.y_train, batch_size=16,
                     generator=resumed_generator, epochs=3, state=state)
    assert not final.stop and (final.epoch, final.step) == (3, 12)
    assert _same_weights(model, resumed)


def test_callbacks_are_called_in_the_documented_order():
    from topoopt.lab.loop import Callback, run_loop

    calls = []

    class Record(Callback):
        def on_train_begin(self, state):
            calls.append("begin")

        def on_epoch_begin(self, state):
            calls.append(f"epoch {state.epoch}")

        def before_backward(self, state):
            assert all(p.grad is None for p in state.model.parameters()) and len(state.batch) == len(state.logits)
            calls.append(f"loss {state.step}")

        def before_step(self, state):
            assert all(p.grad is not None for p in state.model.parameters())
            calls.append(f"before {state.step}")

        def after_step(self, state):
            calls.append(f"after {state.step}")

        def on_epoch_end(self, state):
            calls.append(f"end {state.epoch}")

        def on_train_end(self, state):
            calls.append("done")

    data, model = _data(n_train=20), _model()
    run_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), data.x_train, data.y_train, batch_size=16,
             generator=torch.Generator().manual_seed(0), epochs=2, steps=3, callbacks=[Record()])
    assert calls == ["begin", "epoch 0", "loss 1", "before 1", "after 1", "loss 2", "before 2", "after 2", "end 0",
                     "epoch 1", "loss 3", "before 3", "after 3", "done"]  # the step budget ends epoch 1 inside it
    with pytest.raises(ValueError, match="budget"):
        run_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), data.x_train, data.y_train, batch_size=16,
                 generator=torch.Generator().manual_seed(0))


def test_a_non_finite_loss_stops_the_loop_before_the_step_updates_anything():
    """The third batch's inputs are poisoned with NaN: `StopOnNonFiniteLoss` abandons step 3 in
    ``before_backward``, so the weights are those after step 2, ``state.step`` is 2 and no
    ``after_step`` sees step 3."""
    from topoopt.lab.loop import Callback, StopOnNonFiniteLoss, run_loop

    data = _data()
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
    x = data.x_train.clone()
    x[order[32:48]] = float("nan")
    after = []

    class Record(Callback):
        def after_step(self, state):
            after.append(state.step)

    model, reference = _model(), _model()
    stop = StopOnNonFiniteLoss()
    state = run_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), x, data.y_train, batch_size=16,
                     generator=torch.Generator().manual_seed(0), epochs=2, callbacks=[stop, Record()])
    run_loop(reference, torch.optim.SGD(reference.parameters(), lr=0.1), x, data.y_train, batch_size=16,
             generator=torch.Generator().manual_seed(0), steps=2)
    assert stop.diverged and state.stop and math.isnan(state.loss)
    assert (state.step, state.epoch, state.next_batch, after) == (2, 0, 2, [1, 2])
    assert _same_weights(model, reference)
