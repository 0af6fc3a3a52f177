"""Lightning integration: per-layer topology in the trainer's own TensorBoard logger.

An optional extra (``pip install topoopt[lightning]``); ``import topoopt`` does not import
Lightning. The callback owns a `topoopt.TopologyMonitor` that writes through the trainer's
`TensorBoardLogger` (its ``experiment`` writer), with the tag scheme of the monitor
(``topology/<layer>/<metric>``, ``optim/<layer>/lr_scale`` when the optimizer is a
`TopoOptimizer`), at the trainer's ``global_step``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from topoopt._validation import check_positive_int
from topoopt.early_stopping import TopologyEarlyStopping
from topoopt.monitor import TopologyMonitor
from topoopt.optimizer import TopoOptimizer

__all__ = ["TopologyCallback", "TopologyEarlyStoppingCallback"]


class TopologyCallback(pl.Callback):
    """Logs each layer's H0 topology every ``every`` optimizer steps to the trainer's TensorBoard.

    Parameters
    ----------
    every : int
        Log after every ``every``-th optimizer step (the trainer's ``global_step``).
    metrics : str or sequence of str
        Metric names of `topoopt.METRICS`.
    diagrams_every : int
        Also log death histograms and diagram/barcode figures every this many steps (0: never).
    layers : list of str, optional
        Layer names as the LightningModule's ``named_modules`` gives them (``"net.fc1"``); all
        layers with a neuron cloud by default.
    verbose : bool
        At the end of fitting, log the monitor's verdict (what each layer's topology did, how far
        the scales moved, the branching events) through Lightning's rank-zero info.
    **monitor_options
        The rest of `TopologyMonitor`'s options: ``signals``, ``groups_ratio``, ``groups_scale``,
        ``branching_patience``, ``on_branching``, ``on_alert``, ``embeddings_at``.

    The trainer needs a `TensorBoardLogger` (Lightning's default when tensorboard is
    installed); without one, ``fit`` stops at the start with a ``ValueError`` saying so.
    ``monitor`` is the `TopologyMonitor` in use (``monitor.last`` holds the latest values).
    """

    def __init__(self, every: int = 50, metrics: str | Sequence[str] = ("normalized_entropy", "mean_lifetime"),
                 diagrams_every: int = 0, layers: Iterable[str] | None = None, verbose: bool = True,
                 **monitor_options) -> None:
        super().__init__()
        check_positive_int("every", every)
        known = {"signals", "groups_ratio", "groups_scale", "branching_patience", "on_branching", "on_alert",
                 "embeddings_at"}
        unknown = sorted(set(monitor_options) - known)
        if unknown:
            raise TypeError(f"TopologyCallback got unknown option(s) {unknown}; valid: {sorted(known)}")
        self.monitor_options = monitor_options
        self.verbose = bool(verbose)
        self.every = every
        self.metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        self.diagrams_every = diagrams_every
        self.layers = None if layers is None else list(layers)
        self.monitor: TopologyMonitor | None = None
        self._last_step = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = _tensorboard_writer(trainer)
        optimizer = next((o for o in trainer.optimizers if isinstance(o, TopoOptimizer)), None)
        self.monitor = TopologyMonitor(pl_module, writer=writer, every=self.every, metrics=self.metrics,
                                       diagrams_every=self.diagrams_every, optimizer=optimizer, layers=self.layers,
                                       **self.monitor_options)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches share a global step: log each step once.
        if self.monitor is not None and step != self._last_step:
            self._last_step = step
            self.monitor.step(step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            if self.verbose and self.monitor.history.steps:
                rank_zero_info(self.monitor.verdict())
            self.monitor.close()  # flushes; the writer stays open, the logger owns it
            self.monitor = None


class TopologyEarlyStoppingCallback(pl.Callback):
    """Stops fitting when every layer's topology has settled (`topoopt.TopologyEarlyStopping`),
    checked at the end of each training epoch; needs no validation split.

    Keyword arguments go to `TopologyEarlyStopping` (``metrics``, ``tolerance``, ``patience``,
    ``min_checks``, ``layers``, ``min_loss_drop``). ``loss`` names the logged training loss
    (``self.log("train_loss", ...)``) that guards against stopping a run stuck at its first loss;
    when it is not logged, the guard is off. With ``verbose``, the stop is logged with its reason,
    as Lightning's ``EarlyStopping`` does. ``stopped_epoch`` is the epoch it stopped at (or None);
    its state is saved in and restored from Lightning checkpoints.
    """

    def __init__(self, loss: str = "train_loss", verbose: bool = True, **options) -> None:
        super().__init__()
        self.loss_key = loss
        self.verbose = bool(verbose)
        self.options = options
        self.stopper: TopologyEarlyStopping | None = None
        self.stopped_epoch: int | None = None
        self._restored: dict | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stopper = TopologyEarlyStopping(pl_module, **self.options)
        if self._restored is not None:
            self.stopper.load_state_dict(self._restored)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stopper is None:
            return
        logged = trainer.callback_metrics.get(self.loss_key)
        stop = self.stopper.update(None if logged is None else float(logged))
        # the loss may differ between ranks: every rank must take the same decision, or some wait forever
        if trainer.strategy.reduce_boolean_decision(stop, all=False):
            self.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True
            if self.verbose:
                rank_zero_info(f"TopologyEarlyStopping stopped fitting at epoch {trainer.current_epoch}: "
                               f"{self.stopper.reason}")

    def state_dict(self) -> dict:
        return self.stopper.state_dict() if self.stopper is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict) or None


def _tensorboard_writer(trainer: pl.Trainer):
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    raise ValueError("TopologyCallback logs to TensorBoard: give the Trainer a "
                     "lightning.pytorch.loggers.TensorBoardLogger (found: "
                     f"{[type(logger).__name__ for logger in trainer.loggers] or 'no logger'})")
