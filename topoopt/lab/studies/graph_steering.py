"""Steered learning-graph runs: the trainings whose learning graphs stand
beside the plain baselines of Gabella et al.'s tree and surface settings.

Every steered run starts from the baseline's initial weights, sees the same batches and runs at
the same learning rate (the paper's 0.05); only the steering differs:

- ``pen-spread``: `TopoPenalty` maximising each layer's mean H0 lifetime (coefficient 1), each
  layer switched off once its mean lifetime reaches 0.5 (the setting of `topoopt steer`). The
  gradient of a spanning-tree edge's length is a unit vector, so the push apart does not shrink
  with the weights: it separates ε-tiny neurons that a learning rate only moves together.
- ``pen-entropy``: `TopoPenalty` maximising normalized persistent entropy (coefficient 1,
  always on): the scale-free metric, which asks for evenly spread gaps, not large ones. Being
  scale-free, its gradient grows as 1/scale: at an ε-tiny initialisation one step throws the
  neurons to a norm set by lr·coefficient/ε (measured: output layer 10⁻⁵ → 9.85 in 150 steps at
  ε = 1e-6, lr 0.05), a kick rather than steering (experiments/RESULTS.md).
- ``topo-collapse``: `TopoOptimizer`, policy ``collapse`` on mean lifetime / RMS neuron norm,
  strength 7, every 10 steps: up to × 8 while a layer's neurons nearly coincide relative to
  their norm, × 1 once spread (`topoopt.policies.collapse_policy`).
- ``topo-awaken``: `TopoOptimizer`, policy ``awaken`` on the same metric, strength 4 (the
  steering study's pilot: in effect a global × 4 on the plateau).
- ``collapse-matched``: the matched control of ``topo-collapse``: plain SGD with a constant
  per-layer learning rate 0.05 × that layer's mean scale in the ``topo-collapse`` run of the
  same setting, ε and seed (so it needs that run first).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from topoopt.lab.loop import make_optimizer
from topoopt.optimizer import TopoOptimizer
from topoopt.penalty import TopoPenalty
from topoopt.policies import awaken_policy, collapse_policy

__all__ = ["STEERINGS", "Steering", "build_steering", "mean_scales"]

SPREAD_TARGET = 0.5  # mean H0 lifetime at which `pen-spread` switches a layer off
SCALES_FILE = "scales.json"

STEERINGS: dict[str, str] = {
    "none": "plain SGD (the baseline)",
    "pen-spread": "TopoPenalty, maximise mean H0 lifetime, coefficient 1, off per layer at 0.5",
    "pen-entropy": "TopoPenalty, maximise normalized persistent entropy, coefficient 1",
    "topo-collapse": "TopoOptimizer, collapse policy on mean lifetime / RMS norm, strength 7, every 10",
    "topo-awaken": "TopoOptimizer, awaken policy on mean lifetime / RMS norm, strength 4, every 10",
    "collapse-matched": "SGD, constant per-layer lr 0.05 × the layer's mean scale in topo-collapse",
}


@dataclass
class Steering:
    """What a steered run adds to plain SGD: an optimizer (maybe a `TopoOptimizer`), a penalty, and
    the bookkeeping that a checkpoint must carry (scale sums, switched-off layers)."""

    name: str
    optimizer: torch.optim.Optimizer
    penalty: TopoPenalty | None = None
    topo: TopoOptimizer | None = None
    scale_sums: dict[str, float] | None = None
    switched_off: dict[str, int] | None = None
    matched: dict[str, float] | None = None  # a matched control's constant per-layer lr multipliers
    steps: int = 0

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The training loss plus the penalty while any layer's coefficient is on."""
        if self.penalty is not None and any(self.penalty.coefficients.values()):
            return loss + self.penalty()
        return loss

    def after_step(self, step: int) -> None:
        self.steps = step
        if self.topo is not None:
            for name, scale in self.topo.scales.items():
                self.scale_sums[name] += scale
        if self.switched_off is not None:  # a penalty switched off layer by layer (pen-spread)
            for name, value in self.penalty.last_values.items():
                if name not in self.switched_off and value >= SPREAD_TARGET:
                    self.penalty.coefficients[name] = 0.0
                    self.switched_off[name] = step

    def snapshot(self) -> dict:
        """Per-snapshot extras for the trajectory record."""
        extra: dict = {}
        if self.topo is not None:
            extra["scales"] = {k: float(v) for k, v in self.topo.scales.items()}
        if self.penalty is not None:
            extra["penalty_on"] = {k: bool(v) for k, v in self.penalty.coefficients.items()}
        return extra

    def summary(self) -> dict:
        out: dict = {"steering": self.name, "description": STEERINGS[self.name]}
        if self.scale_sums is not None and self.steps:
            out["mean_scales"] = {k: v / self.steps for k, v in self.scale_sums.items()}
        if self.matched is not None:
            out["mean_scales"] = dict(self.matched)
        if self.switched_off is not None:
            out["penalty_off_step"] = dict(self.switched_off)
        return out

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scale_sums": self.scale_sums,
                 "switched_off": self.switched_off, "steps": self.steps}
        if self.penalty is not None:
            state["penalty"] = self.penalty.state_dict()
            state["coefficients"] = dict(self.penalty.coefficients)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scale_sums, self.switched_off, self.steps = state["scale_sums"], state["switched_off"], state["steps"]
        if self.penalty is not None:
            self.penalty.load_state_dict(state["penalty"])
            self.penalty.coefficients.update(state["coefficients"])


def mean_scales(run_folder: Path) -> dict[str, float]:
    """The per-layer mean scales that a finished `topo-*` run wrote (for its matched control)."""
    path = run_folder / SCALES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the steered run it is matched to first")
    return json.loads(path.read_text())["mean_scales"]


def build_steering(name: str, model: nn.Module, lr: float,
                   matched_scales: Callable[[], dict[str, float]] | None = None) -> Steering:
    """The optimizer and penalty of steering `name` (see `STEERINGS`) for `model` at `lr`."""
    if name not in STEERINGS:
        raise ValueError(f"Unknown steering {name!r}. Valid ones are: {', '.join(STEERINGS)}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if name == "collapse-matched":
        if matched_scales is None:
            raise ValueError("collapse-matched needs the topo-collapse run's mean scales")
        scales = matched_scales()
        groups = [{"params": [linears[n].weight], "lr": lr * scales[n]} for n in linears]
        return Steering(name, make_optimizer(model, "sgd", lr=lr, params=groups), matched=dict(scales))
    if name == "none":
        return Steering(name, make_optimizer(model, "sgd", lr=lr))
    if name.startswith("pen-"):
        metric = "mean_lifetime" if name == "pen-spread" else "normalized_entropy"
        penalty = TopoPenalty(model, metric=metric, direction="maximize", weight=1.0)
        return Steering(name, make_optimizer(model, "sgd", lr=lr), penalty=penalty,
                        switched_off={} if name == "pen-spread" else None)
    if name == "topo-collapse":
        policy, strength = partial(collapse_policy, spread=0.5), 7.0
    else:
        policy, strength = awaken_policy, 4.0
    topo = make_optimizer(model, "sgd", lr=lr, topo={"metric": "mean_lifetime", "policy": policy, "strength": strength,
                                                    "every": 10, "bounds": (0.25, 1.0 + strength)})
    return Steering(name, topo, topo=topo, scale_sums=dict.fromkeys(linears, 0.0))
