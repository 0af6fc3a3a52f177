"""The failure suite: real training failures, each with a healthy twin that differs in one thing,
trained while every detector's signal is recorded at the same checks.

A run records, every `CHECK_EVERY` steps (step 0 included), what a practitioner watches (the
training loss on a fixed probe batch, each layer's gradient norm on it, each layer's update over the
last interval relative to its weights, the fraction of dead or saturated units on the probe batch,
each layer's weight norm, and Neural Persistence of each Linear layer), what topoopt watches (each
layer's `spread` and entropy deficit, and `AlertWatch`'s alerts with their defaults), and, for the
outcome only, test accuracy and loss. Detectors never read the test set.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from topoopt._validation import check_choice
from topoopt.lab.data import Dataset, load_dataset, stratified_subset
from topoopt.lab.models import build_mlp
from topoopt.measure import layer_topology
from topoopt.neural_persistence import neural_persistence
from topoopt.run_history import AlertWatch

__all__ = ["BASES", "FAILURES", "WHAT", "CHECK_EVERY", "STEPS", "config_of", "run_one", "suite_data"]

CHECK_EVERY = 20
STEPS = 1500
BATCH = 64
PROBE = 512

BASES = {
    "mlp": {"data": "mnist5k", "model": "mlp", "widths": [784, 64, 64, 10], "activation": "relu", "lr": 0.05},
    "mlp-sigmoid": {"data": "mnist5k", "model": "mlp", "widths": [784, 64, 64, 10], "activation": "sigmoid",
                    "lr": 0.5},
    "deep-relu": {"data": "mnist5k", "model": "mlp", "widths": [784] + [32] * 8 + [10], "activation": "relu",
                  "lr": 0.05, "init": "kaiming"},
    "cnn": {"data": "fashion5k", "model": "cnn", "lr": 0.05},
}

# Each failure: its healthy twin (a base) and the one thing changed.
FAILURES = {
    "symmetric-init": ("mlp", {"init": "symmetric"}),
    "duplicated": ("mlp", {"init": "tiled"}),
    "tiny-init": ("mlp", {"init": "tiny"}),
    "high-lr": ("mlp", {"lr": 1.0}),
    "frozen": ("mlp", {"frozen": "fc1"}),
    "label-noise": ("mlp", {"label_noise": 0.5}),
    "saturated": ("mlp-sigmoid", {"init_scale": 50.0}),
    "vanishing": ("deep-relu", {"activation": "sigmoid"}),
    "cnn-high-lr": ("cnn", {"lr": 0.5}),
    "cnn-symmetric": ("cnn", {"init": "symmetric"}),
}

WHAT = {
    "symmetric-init": "every hidden neuron starts as a copy of its layer's first",
    "duplicated": "a copy bug: fc1's 64 rows are 4 rows tiled 16 times",
    "tiny-init": "N(0, 1e-6²) everywhere: the plateau",
    "high-lr": "lr ×20: the ReLUs die",
    "frozen": "fc1 left at its initialisation by mistake",
    "label-noise": "half the training labels random: the net memorises them",
    "saturated": "×50 the default init: the sigmoids saturate",
    "vanishing": "8 sigmoid hidden layers: vanishing gradients",
    "cnn-high-lr": "the CNN at lr ×10",
    "cnn-symmetric": "every filter starts as a copy of its layer's first",
}


def config_of(name: str) -> dict:
    """A base's or a failure's full configuration (a failure: its twin's, with the change)."""
    check_choice("configuration", name, [*BASES, *FAILURES])
    if name in BASES:
        return {"name": name, "twin": name, **BASES[name]}
    twin, change = FAILURES[name]
    return {"name": name, "twin": twin, **BASES[twin], **change}


def suite_data(name: str) -> Dataset:
    """mnist5k (4,000 train, 1,000 test), or 4,000 Fashion-MNIST training images (stratified) and
    the first 1,000 of its test set."""
    if name == "mnist5k":
        return load_dataset("mnist5k")
    if name == "fashion5k":
        full = load_dataset("fashion-mnist")
        small = stratified_subset(full, 4000, seed=0)
        return Dataset("fashion5k", small.x_train, small.y_train, full.x_test[:1000], full.y_test[:1000])
    raise ValueError(f"Unknown suite dataset {name!r}")


def build_cnn(activation: str = "relu") -> nn.Sequential:
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
    return nn.Sequential(OrderedDict([
        ("image", nn.Unflatten(1, (1, 28, 28))),
        ("conv1", nn.Conv2d(1, 8, 3)), ("act1", act()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(8, 16, 3)), ("act2", act()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(16 * 5 * 5, 10)),
    ]))


def _weighted(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _activations(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.Sigmoid))}


@torch.no_grad()
def _initialise(model: nn.Module, config: dict, generator: torch.Generator) -> None:
    layers = list(_weighted(model).values())
    init = config.get("init", "default")
    hidden = layers[:-1]
    if init == "symmetric":
        for layer in hidden:
            layer.weight.copy_(layer.weight[:1].expand_as(layer.weight))
            layer.bias.fill_(float(layer.bias[0]))
    elif init == "tiled":
        first = layers[0]
        first.weight.copy_(first.weight[:4].repeat(first.weight.shape[0] // 4, *[1] * (first.weight.dim() - 1)))
        first.bias.copy_(first.bias[:4].repeat(first.bias.shape[0] // 4))
    elif init == "kaiming":  # He et al.'s normal init, the one a deep ReLU stack trains from
        for layer in layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
            layer.bias.zero_()
    elif init == "tiny":
        for layer in layers:
            layer.weight.normal_(0.0, 1e-6, generator=generator)
            layer.bias.zero_()
    elif init != "default":
        raise ValueError(f"Invalid init {init!r}")
    for layer in layers:
        layer.weight.mul_(config.get("init_scale", 1.0))


def build_model(config: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if config["model"] == "cnn":
        model = build_cnn(config.get("activation", "relu"))
    else:
        model = build_mlp(config["widths"], activation=config["activation"])
    _initialise(model, config, torch.Generator().manual_seed(seed))
    if config.get("frozen"):
        for parameter in getattr(model, config["frozen"]).parameters():
            parameter.requires_grad_(False)
    return model


def _noisy_labels(labels: torch.Tensor, fraction: float, seed: int, classes: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10_000 + seed)
    noisy = labels.clone()
    chosen = torch.rand(len(labels), generator=generator) < fraction
    noisy[chosen] = torch.randint(classes, (int(chosen.sum()),), generator=generator)
    return noisy


def _dead_fraction(output: torch.Tensor, kind: type) -> float:
    """Units never active on the probe batch (ReLU), or saturated on all of it (sigmoid: a(1 − a)
    below 1e-3), over all units (a conv channel's units are its positions)."""
    units = output.transpose(0, 1).reshape(output.shape[1], -1) if output.dim() > 2 else output.T
    if kind is nn.ReLU:
        dead = (units <= 0).all(dim=1)
    else:
        dead = (units * (1 - units) < 1e-3).all(dim=1)
    return float(dead.double().mean())


class _Recorder:
    """Every signal of one run at its checks, and the seconds each kind of signal cost."""

    def __init__(self, model: nn.Module, probe: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.model, self.probe = model, probe
        self.layers, self.activation_modules = _weighted(model), _activations(model)
        self.signals: dict[str, dict[str, list]] = {}
        self.alerts: list[dict] = []
        self.watch = {name: AlertWatch() for name in self.layers}
        self.previous = {name: m.weight.detach().clone() for name, m in self.layers.items()}
        self.seconds = {"probe": 0.0, "update_ratio": 0.0, "weight_norm": 0.0, "neural_persistence": 0.0,
                        "topology": 0.0}

    def _put(self, signal: str, layer: str, value) -> None:
        self.signals.setdefault(signal, {}).setdefault(layer, []).append(value)

    def record(self, step: int) -> None:
        started = time.perf_counter()
        outputs = {}
        hooks = [m.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.detach()))
                 for name, m in self.activation_modules.items()]
        self.model.zero_grad(set_to_none=True)
        x, y = self.probe
        loss = F.cross_entropy(self.model(x), y)
        for hook in hooks:
            hook.remove()
        trainable = [m.weight for m in self.layers.values() if m.weight.requires_grad]
        grads = dict(zip([n for n, m in self.layers.items() if m.weight.requires_grad],
                         torch.autograd.grad(loss, trainable) if trainable else ()))
        self._put("loss", "model", float(loss.detach()))
        for name in self.layers:
            self._put("grad_norm", name, float(grads[name].norm()) if name in grads else 0.0)
        for name, module in self.activation_modules.items():
            self._put("dead_fraction", name, _dead_fraction(outputs[name], type(module)))
        self.seconds["probe"] += time.perf_counter() - started

        started = time.perf_counter()
        for name, module in self.layers.items():
            weight = module.weight.detach()
            before = self.previous[name]
            self._put("update_ratio", name, None if step == 0 else
                      float((weight - before).norm() / before.norm().clamp_min(1e-30)))
            self.previous[name] = weight.clone()
        self.seconds["update_ratio"] += time.perf_counter() - started
        started = time.perf_counter()
        for name, module in self.layers.items():
            self._put("weight_norm", name, float(module.weight.detach().norm()))
        self.seconds["weight_norm"] += time.perf_counter() - started
        started = time.perf_counter()
        for name, module in self.layers.items():
            if isinstance(module, nn.Linear):
                self._put("neural_persistence", name, neural_persistence(module.weight))
        self.seconds["neural_persistence"] += time.perf_counter() - started

        started = time.perf_counter()
        with warnings.catch_warnings():  # the frozen layer's and the copies' notes, once per check
            warnings.simplefilter("ignore")
            report = layer_topology(self.model, list(self.layers))
        for name, summary in report.items():
            rms = summary.weight_norm / math.sqrt(summary.n_neurons)
            values = {"spread": summary.mean_lifetime / rms if rms > 0 else 0.0,
                      "entropy_deficit": 1.0 - summary.normalized_entropy}
            for signal, value in values.items():
                self._put(signal, name, value)
            for alert in self.watch[name].update(name, step, values, summary.deaths):
                self.alerts.append({"kind": alert.kind, "layer": alert.layer, "step": alert.step})
        self.seconds["topology"] += time.perf_counter() - started

    def fill_diverged(self) -> None:
        """After a non-finite loss the run stops: every later check reads as non-finite."""
        for series in self.signals.values():
            for values in series.values():
                values.append(float("nan"))


@torch.no_grad()
def _evaluate(model: nn.Module, data: Dataset) -> tuple[float, float]:
    logits = model(data.x_test)
    return float((logits.argmax(1) == data.y_test).double().mean()), float(F.cross_entropy(logits, data.y_test))


def run_one(name: str, seed: int, data: Dataset, steps: int = STEPS) -> dict:
    """Train one configuration on one seed; every signal at every check, and the outcome."""
    config = config_of(name)
    model = build_model(config, seed)
    labels = data.y_train
    if config.get("label_noise"):
        labels = _noisy_labels(labels, config["label_noise"], seed, data.n_classes)
    generator = torch.Generator().manual_seed(seed)
    probe_index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(50_000 + seed))[:PROBE]
    recorder = _Recorder(model, (data.x_train[probe_index], labels[probe_index]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config["lr"], momentum=0.9)
    checks, accuracy, test_loss = [], [], []
    train_seconds, diverged_at = 0.0, None
    order = torch.randperm(len(labels), generator=generator)
    position = 0
    for step in range(steps + 1):
        if step % CHECK_EVERY == 0 or step == steps:  # the budget's last step is always seen
            checks.append(step)
            if diverged_at is None:
                recorder.record(step)
                acc, loss = _evaluate(model, data)
                accuracy.append(acc)
                test_loss.append(loss)
            else:
                recorder.fill_diverged()
                accuracy.append(0.0)
                test_loss.append(float("inf"))
        if step == steps or diverged_at is not None:
            continue
        started = time.perf_counter()
        if position + BATCH > len(order):
            order, position = torch.randperm(len(labels), generator=generator), 0
        batch = order[position:position + BATCH]
        position += BATCH
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x_train[batch]), labels[batch])
        if not torch.isfinite(loss):
            diverged_at = step
        else:
            loss.backward()
            optimizer.step()
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                diverged_at = step + 1
        train_seconds += time.perf_counter() - started
    return {"config": name, "seed": seed, "steps": checks, "test_accuracy": accuracy, "test_loss": test_loss,
            "signals": recorder.signals, "alerts": recorder.alerts, "diverged_at": diverged_at,
            "seconds": {**recorder.seconds, "train": train_seconds}}

