"""Early stopping without a validation split: stop when the layers' topology has settled.

`TopologyEarlyStopping` watches each layer's H0 metrics (exact, `topoopt.TreeCache`) and stops
when all of them have changed by less than a relative ``tolerance`` for ``patience``
consecutive checks. `NeuralPersistenceStopping` is the criterion of Rieck et al., "Neural
Persistence: A Complexity Measure for Deep Neural Networks Using Algebraic Topology" (ICLR 2019),
reimplemented from the paper's definitions, for comparison: the mean normalised neural
persistence of the layers, stopped when it has not risen by more than ``min_delta`` for
``patience`` checks. Neither needs held-out data, so every example can be trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from topoopt._validation import check_number, check_positive_int
from topoopt.cloud import neuron_cloud
from topoopt.layers import select_layers
from topoopt.measure import LayerMeter
from topoopt.metrics import get_metric
from topoopt.neural_persistence import neural_persistence

__all__ = ["TopologyEarlyStopping", "NeuralPersistenceStopping", "neural_persistence"]


class TopologyEarlyStopping:
    """Stops when every layer's topology has stopped changing (call `update` after each epoch).

    Parameters
    ----------
    model : nn.Module
        The model whose neuron clouds are watched (`topoopt.topological_layers`).
    metrics : str or sequence of str
        Names of `topoopt.METRIC_SPECS`.
    tolerance : float
        A check is "settled" when every layer's every metric moved by less than this fraction of
        its previous value (|m_t − m_{t−1}| ≤ tolerance · |m_{t−1}|; an exact 0 stays settled only
        at 0).
    patience : int
        Stop after this many settled checks in a row.
    min_checks : int
        Never stop before this many checks (the first epochs, when a zero-initialised layer may
        not have moved yet).
    layers : list of str, optional
        Only these layers.
    min_loss_drop : float
        With ``update(loss)``, a check counts as settled only once the training loss has fallen
        by this fraction below the first loss seen: a network stuck at chance (tiny
        initialisation, dead units) has a topology that does not move either, and is stuck, not
        settled.

    ``update()`` returns ``should_stop``. ``history`` holds each check's values; ``reason`` says
    why the last check did not count as settled, or why it stopped. A loss given as NaN or
    infinite stops at once (the run diverged), as Lightning's ``EarlyStopping(check_finite=True)``
    does.
    """

    def __init__(self, model: nn.Module, metrics: str | Sequence[str] = ("normalized_entropy", "mean_lifetime"),
                 tolerance: float = 0.01, patience: int = 3, min_checks: int = 1,
                 layers: Iterable[str] | None = None, min_loss_drop: float = 0.1) -> None:
        check_number("tolerance", tolerance, low=0.0)
        check_number("min_loss_drop", min_loss_drop, low=0.0, high=1.0, high_open=True)
        check_positive_int("patience", patience)
        check_positive_int("min_checks", min_checks)
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        self._metric_fns = {name: get_metric(name) for name in metrics}
        self.meter = LayerMeter(model, layers, owner="TopologyEarlyStopping")
        self.tolerance, self.patience, self.min_checks = float(tolerance), patience, min_checks
        self.history: list[dict[str, float]] = []
        self.settled = 0
        self.should_stop = False
        self.min_loss_drop = float(min_loss_drop)
        self.first_loss: float | None = None
        self.diverged = False
        self.reason = ""

    @property
    def layers(self) -> dict:
        """The watched layers by name (the meter's)."""
        return self.meter.layers

    @torch.no_grad()
    def _values(self) -> dict[str, float]:
        values = {}
        for name, deaths in self.meter.measure(passive=True).items():
            for metric, fn in self._metric_fns.items():
                values[f"{name}/{metric}"] = 0.0 if deaths is None else float(fn(deaths))
        return values

    def update(self, loss: float | None = None) -> bool:
        """One check (after an epoch); `loss`, the epoch's training loss, guards against calling
        a run stuck at its first loss settled (see ``min_loss_drop``)."""
        if loss is not None and not math.isfinite(float(loss)):  # before measuring: the weights may be NaN too
            self.diverged = self.should_stop = True
            self.reason = f"training loss {float(loss)}: the run diverged"
            return True
        values = self._values()
        stuck = False
        if loss is not None:
            loss = float(loss)
            if self.first_loss is None:
                self.first_loss = loss
            stuck = self.first_loss is not None and not loss <= (1 - self.min_loss_drop) * self.first_loss
        if self.history:
            previous = self.history[-1]
            moved = any(abs(values[k] - previous[k]) > self.tolerance * abs(previous[k]) for k in values)
            self.settled = 0 if moved or stuck else self.settled + 1
            self.reason = ("topology still moving" if moved else
                           f"stuck: training loss {loss:.4g} not {self.min_loss_drop:.0%} below its first, "
                           f"{self.first_loss:.4g}" if stuck else f"settled for {self.settled} check(s)")
        self.history.append(values)
        self.should_stop = len(self.history) >= self.min_checks and self.settled >= self.patience
        if self.should_stop:
            self.reason = f"every layer's topology settled for {self.settled} checks in a row"
        return self.should_stop

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history], "settled": self.settled, "first_loss": self.first_loss,
                "diverged": self.diverged}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.settled = int(state["settled"])
        self.first_loss = state.get("first_loss")
        self.diverged = bool(state.get("diverged", False))
        self.should_stop = self.diverged or (len(self.history) >= self.min_checks and self.settled >= self.patience)


class NeuralPersistenceStopping:
    """Rieck et al.'s criterion: stop when the mean normalised neural persistence of the layers
    has not risen by more than ``min_delta`` for ``patience`` checks (call `update` per epoch)."""

    def __init__(self, model: nn.Module, patience: int = 3, min_delta: float = 0.0,
                 layers: Iterable[str] | None = None) -> None:
        check_positive_int("patience", patience)
        check_number("min_delta", min_delta, low=0.0)
        self.layers = select_layers(model, layers)
        self.patience, self.min_delta = patience, float(min_delta)
        self.history: list[float] = []
        self.best = -math.inf
        self.waited = 0
        self.should_stop = False

    def update(self) -> bool:
        value = sum(neural_persistence(neuron_cloud(layer)) for layer in self.layers.values()) / len(self.layers)
        self.history.append(value)
        if value > self.best + self.min_delta:
            self.best, self.waited = value, 0
        else:
            self.waited += 1
        self.should_stop = self.waited >= self.patience
        return self.should_stop
