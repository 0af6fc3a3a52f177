"""TopoOptimizer: the torch.optim contract, exact step scaling, checkpoints, AMP and DDP."""

import copy
import io
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from topoopt import TopoOptimizer
from topoopt.lab.models import build_mlp


def problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 10, generator=g, dtype=dtype)
    y = x[:, :3].argmax(dim=1)  # learnable labels
    torch.manual_seed(seed)
    net = build_mlp("mlp:10-8-6-3").to(dtype)
    return net, x, y


def loss_fn(net, x, y):
    return F.cross_entropy(net(x), y)


def fixed_scales(scales):
    return lambda complexity, change, strength: dict(scales)


INNER = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
}


def train(optimizer, net, x, y, steps, scheduler=None):
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(net, x, y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


# ---- errors ----

@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"metric": "entropie"}, ValueError,
         "Invalid metric: 'entropie'. It must be one of 'normalized_entropy', 'mean_lifetime', "
         "'total_persistence', 'max_lifetime'"),
        ({"policy": "fast"}, ValueError, "Invalid policy: 'fast'. It must be one of 'calm', 'awaken', 'contrast'"),
        ({"policy": 3}, TypeError, "Invalid policy: an int. It must be a policy's name or a callable"),
        ({"strength": -1.0}, ValueError, "Invalid strength: -1.0"),
        ({"ema": 1.0}, ValueError, r"Invalid ema: 1.0. It must be a finite number in \[0, 1\) \(1 would never "
                                   r"update the average\)"),
        ({"ema": 1.5}, ValueError, "Invalid ema: 1.5"),
        ({"every": 0}, ValueError, "Invalid every: 0. It must be an integer ≥ 1"),
        ({"bounds": (0.0, 2.0)}, ValueError, "Invalid lower bound: 0.0"),
        ({"bounds": (1.5, 2.0)}, ValueError, r"Invalid bounds: \(1.5, 2.0\). It must be a pair with low ≤ 1 ≤ high"),
        ({"bounds": 2.0}, ValueError, r"Invalid bounds: 2.0. It must be a pair \(low, high\)"),
        ({"layers": ["fc9"]}, KeyError, r"Unknown layer name\(s\) \['fc9'\]"),
    ],
)
def test_error_inputs(kwargs, error, message):
    net, _, _ = problem()
    with pytest.raises(error, match=message):
        TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, **kwargs)


def test_rejects_non_optimizers_and_double_wrapping():
    net, _, _ = problem()
    with pytest.raises(TypeError, match="inner, the optimizer class to build, is missing"):
        TopoOptimizer([], net)
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net)
    with pytest.raises(TypeError, match="already a TopoOptimizer"):
        TopoOptimizer(wrapped, net)


def test_layer_outside_the_optimizer_is_an_error():
    net, _, _ = problem()
    with pytest.raises(ValueError, match="Layer 'fc3' has no parameter in the optimizer's param_groups"):
        TopoOptimizer(torch.optim.SGD(net.fc1.parameters(), lr=0.1), net, layers=["fc1", "fc3"])


# ---- behaviour ----

def test_is_an_optimizer_sharing_groups_and_state():
    net, x, y = problem()
    inner = torch.optim.Adam(net.parameters())
    wrapper = TopoOptimizer(inner, net)
    assert isinstance(wrapper, torch.optim.Optimizer)
    assert wrapper.param_groups is inner.param_groups
    train(wrapper, net, x, y, 1)
    assert wrapper.state is inner.state and len(wrapper.state) == len(list(net.parameters()))


@pytest.mark.parametrize("name", sorted(INNER))
def test_unit_scales_reproduce_the_bare_optimizer_exactly(name):
    net_a, x, y = problem()
    net_b = copy.deepcopy(net_a)
    bare = INNER[name](net_a.parameters())
    wrapped = TopoOptimizer(INNER[name](net_b.parameters()), net_b, strength=0.0, every=1)
    train(bare, net_a, x, y, 15)
    train(wrapped, net_b, x, y, 15)
    assert all(s == 1.0 for s in wrapped.scales.values())
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_known_scale_multiplies_that_layers_update_exactly(name):
    scales = {"fc1": 0.5, "fc2": 3.0, "fc3": 1.0}
    net_a, x, y = problem()
    net_b = copy.deepcopy(net_a)
    bare = INNER[name](net_a.parameters())
    wrapped = TopoOptimizer(INNER[name](net_b.parameters()), net_b, policy=fixed_scales(scales), bounds=(0.1, 10))
    start = {n: p.detach().clone() for n, p in net_b.named_parameters()}
    train(bare, net_a, x, y, 1)
    train(wrapped, net_b, x, y, 1)
    for (pname, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        layer = pname.split(".")[0]
        torch.testing.assert_close(b - start[pname], scales[layer] * (a - start[pname]), rtol=1e-12, atol=1e-15)
    assert wrapped.scales == scales


def test_scales_are_clipped_to_bounds():
    net, x, y = problem()
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net,
                            policy=fixed_scales({"fc1": 100.0, "fc2": 0.001, "fc3": 1.0}), bounds=(0.5, 2.0))
    train(wrapped, net, x, y, 1)
    assert wrapped.scales == {"fc1": 2.0, "fc2": 0.5, "fc3": 1.0}


def test_calm_brakes_and_awaken_accelerates():
    net, x, y = problem()
    calm = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, policy="calm", strength=5.0, every=1)
    train(calm, net, x, y, 3)
    assert all(0.25 <= s <= 1.0 for s in calm.scales.values()) and min(calm.scales.values()) < 1.0
    zero_net, x, y = problem()
    nn.init.zeros_(zero_net.fc1.weight)
    awaken = TopoOptimizer(torch.optim.SGD(zero_net.parameters(), lr=0.1), zero_net, policy="awaken", strength=1.0)
    train(awaken, zero_net, x, y, 1)
    assert awaken.scales["fc1"] == 2.0  # a collapsed cloud: complexity 0, s = 1 + strength
    assert 1.0 <= awaken.scales["fc2"] < 1.5
    assert set(awaken.complexity) == {"fc1", "fc2", "fc3"}


@pytest.mark.parametrize("metric", ["mean_lifetime", "total_persistence", "max_lifetime"])
def test_lifetime_complexities_are_scale_free(metric):
    net, x, y = problem()
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, metric=metric)
    first = wrapped.update_scales() and dict(wrapped.complexity)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(7.0)
    wrapped.update_scales()
    for name, value in first.items():
        assert wrapped.complexity[name] == pytest.approx(value, rel=1e-6)


def test_measures_every_k_steps():
    net, x, y = problem()
    calls = []
    def policy(complexity, change, strength):
        calls.append(1)
        return {}
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, policy=policy, every=4)
    train(wrapped, net, x, y, 9)
    assert len(calls) == 3 and wrapped.topo_step == 9


@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("with_scheduler", [False, True])
def test_loss_decreases(name, with_scheduler):
    net, x, y = problem(torch.float32)
    wrapped = TopoOptimizer(INNER[name](net.parameters()), net, policy="calm", every=5)
    scheduler = torch.optim.lr_scheduler.StepLR(wrapped, step_size=20, gamma=0.5) if with_scheduler else None
    losses = train(wrapped, net, x, y, 60, scheduler)
    assert losses[-1] < 0.5 * losses[0]


def test_lbfgs_closure_passes_through():
    net, x, y = problem()
    wrapped = TopoOptimizer(torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=5), net, policy="awaken", every=1)
    calls = []

    def closure():
        calls.append(1)
        wrapped.zero_grad()
        loss = loss_fn(net, x, y)
        loss.backward()
        return loss

    first = loss_fn(net, x, y).item()
    for _ in range(5):
        returned = wrapped.step(closure)
    assert isinstance(returned, torch.Tensor) and len(calls) > 5
    assert loss_fn(net, x, y).item() < first


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 1.0 / (1 + epoch)),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=20),
    ],
)
def test_schedulers_see_the_same_lr_sequence(make_scheduler):
    net_a, x, y = problem()
    net_b = copy.deepcopy(net_a)
    bare = torch.optim.SGD(net_a.parameters(), lr=0.1)
    wrapped = TopoOptimizer(torch.optim.SGD(net_b.parameters(), lr=0.1), net_b, policy=fixed_scales({"fc1": 2.0}),
                            every=1)
    sched_a, sched_b = make_scheduler(bare), make_scheduler(wrapped)
    lrs_a, lrs_b = [], []
    for _ in range(12):
        for optimizer, net, scheduler, lrs in ((bare, net_a, sched_a, lrs_a), (wrapped, net_b, sched_b, lrs_b)):
            train(optimizer, net, x, y, 1, scheduler)
            lrs.append([g["lr"] for g in optimizer.param_groups])
    assert lrs_a == lrs_b
    assert sched_b.get_last_lr() == sched_a.get_last_lr()


def test_exception_in_inner_step_leaves_lr_and_wrapper_usable():
    net, x, y = problem()
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    wrapped = TopoOptimizer(inner, net, policy=fixed_scales({"fc1": 2.0}), every=1)
    original_step = inner.step
    inner.step = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    loss_fn(net, x, y).backward()
    with pytest.raises(RuntimeError, match="boom"):
        wrapped.step()
    assert [g["lr"] for g in wrapped.param_groups] == [0.1]
    inner.step = original_step
    train(wrapped, net, x, y, 2)


def test_zero_grad_add_param_group_hooks_and_deepcopy():
    net, x, y = problem()
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net)
    loss_fn(net, x, y).backward()
    wrapped.zero_grad(set_to_none=False)
    assert all(torch.all(p.grad == 0) for p in net.parameters())
    wrapped.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    wrapped.add_param_group({"params": [extra], "lr": 0.5})
    assert len(wrapped.base_optimizer.param_groups) == 2 and wrapped.param_groups[1]["lr"] == 0.5
    seen = []
    wrapped.register_step_pre_hook(lambda opt, args, kwargs: seen.append("pre"))
    wrapped.register_step_post_hook(lambda opt, args, kwargs: seen.append("post"))
    train(wrapped, net, x, y, 1)
    assert seen == ["pre", "post"]
    clone = copy.deepcopy(wrapped)
    assert clone.base_optimizer is not wrapped.base_optimizer and clone.scales == wrapped.scales
    assert clone.param_groups is clone.base_optimizer.param_groups


# ---- checkpoints ----

def test_state_dict_round_trip_resumes_bit_identically():
    def run(steps, checkpoint_at=None):
        net, x, y = problem()
        wrapped = TopoOptimizer(torch.optim.Adam(net.parameters(), lr=0.01), net, policy="calm", strength=3.0, every=2)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(wrapped, gamma=0.95)
        for step in range(steps):
            if step == checkpoint_at:
                buffer = io.BytesIO()
                torch.save({"model": net.state_dict(), "optim": wrapped.state_dict(), "sched": scheduler.state_dict()},
                           buffer)
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                net, x, y = problem(seed=0)
                net.load_state_dict(saved["model"])
                wrapped = TopoOptimizer(torch.optim.Adam(net.parameters(), lr=0.01), net, policy="calm", strength=3.0,
                                        every=2)
                scheduler = torch.optim.lr_scheduler.ExponentialLR(wrapped, gamma=0.95)
                wrapped.load_state_dict(saved["optim"])
                scheduler.load_state_dict(saved["sched"])
                assert wrapped.param_groups is wrapped.base_optimizer.param_groups
            train(wrapped, net, x, y, 1, scheduler)
        return net, wrapped

    straight, straight_opt = run(11)
    resumed, resumed_opt = run(11, checkpoint_at=5)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert straight_opt.scales == resumed_opt.scales and straight_opt.topo_step == resumed_opt.topo_step
    assert straight_opt.smoothed == resumed_opt.smoothed


def test_loading_a_plain_optimizer_state_is_an_error():
    net, _, _ = problem()
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net)
    with pytest.raises(KeyError, match="was not saved by a TopoOptimizer"):
        wrapped.load_state_dict(torch.optim.SGD(net.parameters(), lr=0.1).state_dict())


# ---- AMP ----

def test_grad_scaler_unscales_and_skips_steps_on_inf():
    net, x, y = problem(torch.float32)
    wrapped = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, policy=fixed_scales({"fc1": 2.0}), every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in net.parameters()]
    wrapped.zero_grad()
    scaler.scale(loss_fn(net, x, y)).backward()
    net.fc2.weight.grad[0, 0] = float("inf")
    scaler.step(wrapped)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert scaler.get_scale() == 512.0 and wrapped.topo_step == 0
    wrapped.zero_grad()
    scaler.scale(loss_fn(net, x, y)).backward()
    grads = [p.grad.detach() / 512.0 for p in net.parameters()]
    scaler.step(wrapped)
    scaler.update()
    assert wrapped.topo_step == 1
    # Unscaled: SGD moved fc3's bias (s = 1) by exactly −lr · grad.
    torch.testing.assert_close(net.fc3.bias - before[-1], -0.1 * grads[-1])


# ---- torch.compile ----

def test_compiled_model_still_trains():
    net, x, y = problem(torch.float32)
    compiled = torch.compile(net, backend="eager")
    wrapped = TopoOptimizer(torch.optim.SGD(compiled.parameters(), lr=0.1), compiled, every=1)
    losses = train(wrapped, compiled, x, y, 20)
    assert losses[-1] < losses[0] and set(wrapped.scales) == {"fc1", "fc2", "fc3"}


# ---- DDP ----

def _ddp_worker(rank, world_size, port, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        net = build_mlp("mlp:10-8-6-3")
        model = DistributedDataParallel(net)
        wrapped = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, policy="calm", strength=5.0,
                                every=2)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(6):
            x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
            wrapped.zero_grad()
            F.cross_entropy(model(x), y).backward()
            wrapped.step()
        results[rank] = ([p.detach().clone() for p in net.parameters()], dict(wrapped.scales))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_on_weights_and_scales():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    (weights0, scales0), (weights1, scales1) = results[0], results[1]
    assert scales0 == scales1 and any(s != 1.0 for s in scales0.values())
    assert all(torch.equal(a, b) for a, b in zip(weights0, weights1))


def test_contrast_policy_ranks_layers_by_standardised_complexity():
    from topoopt import contrast_policy

    scales = contrast_policy({"a": 0.99, "b": 0.995, "c": 1.0}, {}, strength=0.5)
    assert scales["a"] > 1.0 > scales["c"] and scales["b"] == pytest.approx(1.0)
    assert scales["a"] * scales["c"] == pytest.approx(1.0)
    assert contrast_policy({"a": 0.3, "b": 0.3}, {}, 2.0) == {"a": 1.0, "b": 1.0}


def test_state_dict_carries_the_settings_and_a_resume_with_others_is_refused():
    net, _, _ = problem()
    saved = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, policy="contrast", every=5).state_dict()
    assert saved["topoopt"]["settings"]["policy"] == "contrast" and saved["topoopt"]["settings"]["every"] == 5
    same = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, policy="contrast", every=5)
    same.load_state_dict(saved)
    other = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, policy="calm", every=5)
    with pytest.raises(ValueError, match=r"settings differ from the saved ones \(policy 'contrast' → 'calm'\)"):
        other.load_state_dict(saved)
    del saved["topoopt"]["settings"]  # the explicit way to resume with new settings
    other.load_state_dict(saved)


def test_a_policy_returning_nonsense_is_named():
    net, _, _ = problem()
    for policy, message in [(lambda c, ch, s: None, "must return a mapping"),
                            (lambda c, ch, s: dict.fromkeys(c, "x"), r"the scale 'x': expected a number"),
                            (lambda c, ch, s: dict.fromkeys(c), "the scale None: expected a number")]:
        optimizer = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, policy=policy)
        with pytest.raises(TypeError, match=message):
            optimizer.update_scales()


def test_fine_tuning_measures_only_the_layers_it_steps():
    net, _, _ = problem()
    for p in net.fc1.parameters():
        p.requires_grad_(False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    with pytest.warns(UserWarning, match=r"does not measure 1 layer\(s\) whose parameters the optimizer does not.*fc1"):
        optimizer = TopoOptimizer(torch.optim.SGD(trainable, lr=0.1), net, every=1)
    optimizer.update_scales()
    assert set(optimizer.complexity) == {"fc2", "fc3"} and optimizer.scales["fc1"] == 1.0
    for p in net.fc1.parameters():  # gradual unfreezing: measured from the next measuring step on
        p.requires_grad_(True)
    optimizer.add_param_group({"params": list(net.fc1.parameters())})
    optimizer.update_scales()
    assert set(optimizer.complexity) == {"fc1", "fc2", "fc3"}


def test_a_policy_that_cannot_take_its_arguments_is_refused_at_construction():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"Invalid policy: .*It must take \(complexity, change, strength\)"):
        TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, policy=lambda complexity: {})


def test_collapse_on_another_metric_than_the_spread_is_said():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="policy 'collapse' reads a layer's spread"):
        TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, policy="collapse")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, policy="collapse", metric="mean_lifetime")


def test_scales_a_failed_policy_left_half_written_are_applied_once_valid():
    """A policy whose value for a later layer is refused raises after the earlier layers' scales
    were written; the next measuring step must scale the steps with the scales it then sets."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    answers = iter([{"0": 1.0, "2": 1.0}, {"0": 0.5, "2": float("nan")}, {"0": 0.5, "2": 1.0}])
    optimizer = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, policy=lambda m, c, s: next(answers),
                              every=1)

    def step():
        optimizer.zero_grad()
        net(torch.randn(4, 6)).sum().backward()
        optimizer.step()

    step()
    with pytest.raises(ValueError, match="non-finite scale"):
        step()
    before = net[0].weight.detach().clone()
    plain = copy.deepcopy(net)
    step()
    assert optimizer.scales == {"0": 0.5, "2": 1.0}
    assert {tuple(p.shape) for p in optimizer._topo.scaled[0]} == {(8, 6), (8,)}
    assert not torch.equal(net[0].weight, before) and not torch.equal(net[0].weight, plain[0].weight)
