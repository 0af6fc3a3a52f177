"""One training run: a config, a run folder, TensorBoard logs, checked checkpoints and resume.

A run folder holds ``config.json``, ``metrics.csv`` (one row per epoch: loss, train and test
accuracy, and each layer's topology), ``summary.json``, ``checkpoint.pt`` (and the one before
it, ``checkpoint.prev.pt``) and the TensorBoard events. Every option is checked, the data
loaded and the model, optimizer and penalty built before the folder is created, so a bad option
leaves nothing behind. Checkpoints are written to a temporary file, synced and renamed; on
resume their zip checksums are verified, and a damaged latest checkpoint falls back to the one
before it. Ctrl-C finishes the step in progress, saves a checkpoint (mid-epoch, with the epoch's
batch order) and stops; ``resume=True`` continues bit-identically, with the saved configuration:
only the options in `CHANGEABLE_ON_RESUME` may differ.

The epochs run on `topoopt.lab.loop.run_loop`; what a run adds to it (the divergence check, the
monitor, progress, the epoch's metrics row and checkpoint, Ctrl-C) is a list of its callbacks.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from topoopt.lab.data import Dataset, load_dataset, stratified_subset
from topoopt.lab.loop import (
    Callback,
    LoopState,
    Progress,
    StopOnInterrupt,
    accuracy,
    fit,  # re-exported for the studies
    fit_steps,
    make_optimizer,
    run_loop,
)
from topoopt.lab.models import build_mlp, initialise, parse_model_spec
from topoopt.lab.progress import Ticker
from topoopt.lab.run_lock import LOCK_FILE, run_lock
from topoopt.lab.train_config import TrainConfig
from topoopt.measure import layer_topology
from topoopt.monitor import TopologyMonitor
from topoopt.optimizer import TopoOptimizer
from topoopt.penalty import TopoPenalty
from topoopt.tree_cache import TreeCache

__all__ = ["CHANGEABLE_ON_RESUME", "TrainConfig", "saved_config", "train", "fit", "fit_steps"]

# Options a resumed run may change: the epoch budget (to extend a run) and where the data and
# the computation live. Everything else would silently change the run, so it is refused.
CHANGEABLE_ON_RESUME = ("epochs", "data_dir", "device", "log_dir")

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
TEMPORARY_CHECKPOINT = "checkpoint.tmp"
_CHECKPOINT_KEYS = ("model", "optimizer", "generator", "epoch", "global_step", "rows")


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available here")
    return torch.device(choice)


def _make_optimizer(config: TrainConfig, model: torch.nn.Module,
                    trees: TreeCache | None = None) -> torch.optim.Optimizer:
    topo = None
    if config.topo_optimizer is not None:
        topo = {"metric": config.topo_metric, "policy": config.topo_optimizer, "strength": config.topo_strength,
                "every": config.topo_every, "bounds": tuple(config.topo_bounds), "tree_every": config.tree_every}
    return make_optimizer(model, config.optimizer, lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, topo=topo, trees=trees)


def _load_data(config: TrainConfig):
    """The dataset and its subset, and a check that the model maps its features to its classes."""
    data = load_dataset(config.dataset, config.data_dir)
    try:
        data = stratified_subset(data, config.subset, seed=config.seed)
    except ValueError as error:
        raise ValueError(f"--subset {config.subset}: {error}") from None
    widths = parse_model_spec(config.model)
    if widths[0] != data.n_features or widths[-1] != data.n_classes:
        raise ValueError(f"--model {config.model} maps {widths[0]} inputs to {widths[-1]} classes, but "
                         f"{config.dataset} has {data.n_features} features and {data.n_classes} classes")
    classes = torch.unique(data.y_train)
    if classes.numel() < 2:
        print(f"topoopt: warning: every training label of {config.dataset} is class {int(classes[0])} "
              f"({len(data.y_train)} examples): the model can only learn to predict it", file=sys.stderr)
    return data


# ---- the run folder ----
def _comparable(config: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as in config.json


def saved_config(run_dir: str | Path) -> TrainConfig | None:
    """The configuration in a run folder's ``config.json`` (None when there is none yet)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot be read ({type(error).__name__}); the run cannot be resumed "
                         f"with its saved configuration") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a configuration (a JSON object was expected)")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    config.topo_bounds = tuple(config.topo_bounds) if isinstance(config.topo_bounds, list) else config.topo_bounds
    if config.model is None:  # written before the default depended on the dataset
        config.model = "mlp:784-100-100-10"
    return config


def _refuse_changes(saved: TrainConfig, config: TrainConfig, run_dir: Path) -> None:
    """A resumed run continues with its saved configuration; a differing option is refused."""
    old, new = _comparable(saved), _comparable(config)
    changed = [k for k in new if k not in CHANGEABLE_ON_RESUME and old.get(k) != new[k]]
    if changed:
        details = ", ".join(f"{_option(k)} {new[k]!r} (saved: {old.get(k)!r})" for k in changed)
        raise ValueError(f"--resume: {details} differ from the run in {run_dir}; a resumed run keeps its "
                         f"configuration (only {', '.join(map(_option, CHANGEABLE_ON_RESUME))} may change)")


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--log-dir {run_dir}: exists and is not a folder")
    if run_dir.is_dir() and any(entry.name != LOCK_FILE for entry in run_dir.iterdir()) and not resume:
        raise FileExistsError(f"Run folder {run_dir} is not empty: pass --resume to continue it, or another --log-dir")


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _open_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Create the run folder (last, after every check) and write config.json into it."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(run_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=2))
    except OSError as error:
        if created:
            _remove_empty(run_dir)
        raise ValueError(f"--log-dir {run_dir}: cannot write there ({error.strerror or error})") from None


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


# ---- checkpoints ----
class _DamagedCheckpoint(Exception):
    pass


def _read_checkpoint(path: Path) -> dict:
    """A checkpoint whose zip checksums hold and which has every entry; else `_DamagedCheckpoint`."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as error:
        raise _DamagedCheckpoint(f"not a readable checkpoint ({type(error).__name__})") from None
    if damaged is not None:
        raise _DamagedCheckpoint(f"checksum mismatch in {damaged}")
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 (never follow torch's advice to load unsafely)
        raise _DamagedCheckpoint(f"cannot be loaded ({type(error).__name__})") from None
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise _DamagedCheckpoint(f"entries {missing} are missing")
    _check_fields(payload)
    return payload


def _check_fields(payload: dict) -> None:
    """Each entry of a checkpoint has its type and a possible value (one per finished epoch in
    ``rows``); a checkpoint whose checksums hold but whose fields do not is damaged too."""
    def natural(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def seconds(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0

    checks = {
        "epoch": (natural, "an integer ≥ 0"),
        "global_step": (natural, "an integer ≥ 0"),
        "seconds": (seconds, "a finite number of seconds ≥ 0"),
        "rows": (lambda rows: isinstance(rows, list) and all(isinstance(row, dict) for row in rows),
                 "a list of metrics rows"),
        "partial": (lambda value: value is None or isinstance(value, dict), "None or a dict"),
        "model": (lambda value: isinstance(value, dict), "a state dict"),
        "optimizer": (lambda value: isinstance(value, dict), "a state dict"),
    }
    for field, (valid, expected) in checks.items():
        if field in payload and not valid(payload[field]):
            raise _DamagedCheckpoint(f"its field {field!r} is {payload[field]!r:.60}, not {expected}")
    if len(payload["rows"]) != payload["epoch"]:
        raise _DamagedCheckpoint(f"its field 'epoch' is {payload['epoch']} but 'rows' holds "
                                 f"{len(payload['rows'])} finished epochs")


def _load_checkpoint(run_dir: Path) -> dict | None:
    """The latest intact checkpoint. A damaged latest one is set aside (renamed *.damaged) and the
    one before it used, with a warning; when none is intact, a one-line `ValueError`."""
    (run_dir / TEMPORARY_CHECKPOINT).unlink(missing_ok=True)  # left by a kill during a save
    problems = []
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            payload = _read_checkpoint(path)
        except _DamagedCheckpoint as error:
            problems.append((path, str(error)))
            continue
        for damaged, why in problems:
            os.replace(damaged, damaged.with_name(damaged.name + ".damaged"))
            print(f"topoopt: {damaged} is damaged ({why}): set aside as {damaged.name}.damaged; "
                  f"resuming from {path}", file=sys.stderr)
        return payload
    if problems:
        path, why = problems[0]
        raise ValueError(f"{path} is damaged ({why}) and there is no intact earlier checkpoint; "
                         f"start again in another --log-dir")
    return None


def _save_checkpoint(payload: dict, run_dir: Path) -> None:
    """Write, sync, then rotate: the latest becomes ``checkpoint.prev.pt``, so two are kept."""
    temporary = run_dir / TEMPORARY_CHECKPOINT
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    latest = run_dir / CHECKPOINT
    if latest.exists():
        os.replace(latest, run_dir / PREVIOUS_CHECKPOINT)
    os.replace(temporary, latest)


def _write_metrics(rows: list[dict], run_dir: Path) -> None:
    if not rows:
        return
    temporary = run_dir / "metrics.csv.tmp"
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, run_dir / "metrics.csv")


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN or infinite; the message names the step."""


def _diverged(error: Exception, model: torch.nn.Module, step: int, run_dir: Path,
              config: TrainConfig) -> TrainingDiverged | None:
    """A `TrainingDiverged` that says so when `error` was raised because the weights diverged (not
    finite, or so large that their squares, and so the distances between neurons, overflow in
    float32): measuring such weights fails in several ways. None when the weights are sound."""
    if all(bool(torch.isfinite(p.detach().float().square().sum())) for p in model.parameters()):
        return None
    return TrainingDiverged(f"training diverged at step {step}: the weights overflow "
                            f"({type(error).__name__}); {_divergence_advice(config, run_dir)}")


def _divergence_advice(config: TrainConfig, run_dir: Path) -> str:
    """Which options to lower (the initial weights' scale when they alone overflow, the penalty's
    weight when it is large, else the learning rate), and the last checkpoint when there is one."""
    causes = []
    if config.init == "normal" and config.init_std is not None and config.init_std > 1e3:
        causes.append(f"--init-std {config.init_std:g} (the initial weights alone are that large)")
    if config.penalty is not None and config.penalty_weight > 1e3:
        causes.append(f"--penalty-weight {config.penalty_weight:g}")
    causes.append(f"--lr {config.lr:g}")
    where = (f"; the last good checkpoint is in {run_dir}" if (run_dir / CHECKPOINT).exists()
             else "; no checkpoint was written: rerun with the corrected option")
    return f"lower {' or '.join(causes)}{where}"


@dataclass
class _Run:
    """One run, checked, loaded and built (and restored from its checkpoint when resumed)."""

    config: TrainConfig
    run_dir: Path
    data: Dataset            # on the run's device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    penalty: TopoPenalty | None
    trees: TreeCache
    generator: torch.Generator
    state: LoopState
    rows: list[dict]         # metrics.csv: one row per finished epoch
    seconds_before: float    # training time of the segments before this one
    seconds: float = 0.0     # training time over all segments, as of the last checkpoint

    def finished(self) -> bool:
        return self.state.epoch >= self.config.epochs and self.state.order is None and bool(self.rows)

    def checkpoint(self, seconds: float, at_epoch_end: bool = False) -> None:
        """Save the whole run: states, the loop's position (inside an epoch, or at the end of the
        epoch in progress) and the rows."""
        epoch, partial = (self.state.epoch + 1, None) if at_epoch_end else (self.state.epoch,
                                                                             self.state.partial_epoch())
        self.seconds = seconds
        _save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                          "penalty": self.penalty.state_dict() if self.penalty is not None else {},
                          "generator": self.generator.get_state(), "epoch": epoch, "global_step": self.state.step,
                          "rows": self.rows, "partial": partial, "seconds": seconds}, self.run_dir)


def _prepare(config: TrainConfig, resume: bool, progress: bool) -> _Run:
    """Everything is checked, loaded and built before the run folder is created or written, so a
    bad option, a missing dataset or a damaged checkpoint leaves nothing behind."""
    config = config.resolved()
    device = _device(config.device)
    with Ticker(lambda: f"{config.name()}: loading {config.dataset}", enabled=progress):
        data = _load_data(config)
    run_dir = config.run_dir()
    _check_run_dir(run_dir, resume)
    saved = None
    if resume:
        previous = saved_config(run_dir)
        if previous is not None:
            _refuse_changes(previous.resolved(), config, run_dir)
        saved = _load_checkpoint(run_dir) if run_dir.is_dir() else None
    torch.manual_seed(config.seed)
    data = Dataset(data.name, data.x_train.to(device), data.y_train.to(device), data.x_test.to(device),
                   data.y_test.to(device))
    model = build_mlp(config.model, activation=config.activation, bias=config.bias)
    initialise(model, config.init, std=config.init_std)
    model.to(device)
    trees = TreeCache()  # one per run: the penalty, the optimizer and the monitor search once per step between them
    optimizer = _make_optimizer(config, model, trees)
    penalty = (TopoPenalty(model, metric=config.penalty, weight=config.penalty_weight,
                           direction=config.penalty_direction, every=config.penalty_every,
                           tree_every=config.tree_every, trees=trees)
               if config.penalty else None)
    run = _Run(config, run_dir, data, model, optimizer, penalty, trees, torch.Generator().manual_seed(config.seed),
               LoopState(model, optimizer), rows=[], seconds_before=0.0)
    if saved is not None:
        _restore(saved, run)
    return run


def _restore(saved: dict, run: _Run) -> None:
    """Load a checkpoint into `run`; one that does not fit this run is a one-line `ValueError`,
    and so is one that has already trained more epochs than asked for."""
    try:
        run.model.load_state_dict(saved["model"])
        run.optimizer.load_state_dict(saved["optimizer"])
        if run.penalty is not None and saved.get("penalty"):  # absent in checkpoints of older versions
            run.penalty.load_state_dict(saved["penalty"])
        run.generator.set_state(saved["generator"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{run.run_dir / CHECKPOINT} does not fit this run's model or optimizer "
                         f"({type(error).__name__}); was config.json edited? "
                         "Start again in another --log-dir") from None
    epoch, rows, partial = saved["epoch"], saved["rows"], saved.get("partial")
    if len(rows) > run.config.epochs or (partial is not None and epoch >= run.config.epochs):
        raise ValueError(f"--epochs {run.config.epochs}: the run in {run.run_dir} has already trained "
                         f"{len(rows) + (partial is not None)} epochs; "
                         f"pass --epochs {max(len(rows), epoch + 1)} "
                         f"or more, or another --log-dir")
    run.state.resume(epoch, saved["global_step"], partial)
    run.rows = rows
    run.seconds_before = run.seconds = float(saved.get("seconds", 0.0))


class _FiniteLoss(Callback):
    """A NaN or ±Inf loss stops the run before its step updates anything, as the studies' loop
    does (`topoopt.lab.loop.StopOnNonFiniteLoss`): the weights stay the last good ones."""

    def __init__(self, run_dir: Path, config: TrainConfig) -> None:
        self.run_dir, self.config = run_dir, config

    def before_backward(self, state: LoopState) -> None:
        if not math.isfinite(state.loss):
            raise TrainingDiverged(f"training diverged at step {state.step} (loss {state.loss}); "
                                   f"{_divergence_advice(self.config, self.run_dir)}")


class _MonitorSteps(Callback):
    def __init__(self, monitor: TopologyMonitor) -> None:
        self.monitor = monitor

    def after_step(self, state: LoopState) -> None:
        self.monitor.step(state.step - 1)  # the monitor counts steps from 0


class _EpochRecord(Callback):
    """At each epoch's end: the metrics row (test accuracy, each layer's topology), TensorBoard
    scalars, a checkpoint, metrics.csv and a line on the terminal."""

    def __init__(self, run: _Run, monitor: TopologyMonitor, elapsed, progress: bool) -> None:
        self.run, self.monitor, self.elapsed, self.progress = run, monitor, elapsed, progress

    def on_epoch_end(self, state: LoopState) -> None:
        run, model = self.run, state.model
        model.eval()
        row = {"epoch": state.epoch + 1, "step": state.step, "loss": state.loss_sum / state.seen,
               "train_accuracy": state.correct / state.seen,
               "test_accuracy": accuracy(model, run.data.x_test, run.data.y_test)}
        for name, topo in layer_topology(model).items():
            row[f"{name}/normalized_entropy"] = topo.normalized_entropy
            row[f"{name}/mean_lifetime"] = topo.mean_lifetime
            row[f"{name}/weight_norm"] = topo.weight_norm
            rms = topo.weight_norm / math.sqrt(topo.n_neurons) if topo.n_neurons else 0.0
            row[f"{name}/spread"] = topo.mean_lifetime / rms if rms > 0 else 0.0
        run.rows.append(row)
        self.monitor.log_scalars({"train/loss": row["loss"], "train/accuracy": row["train_accuracy"],
                                  "test/accuracy": row["test_accuracy"]}, state.step)
        self.monitor.flush()
        run.checkpoint(self.elapsed(), at_epoch_end=True)
        _write_metrics(run.rows, run.run_dir)
        if self.progress:
            spreads = [(key.removesuffix("/spread"), value) for key, value in row.items() if key.endswith("/spread")]
            shown = ", ".join(f"{name} {value:.3g}" for name, value in spreads[:4]) + (" …" if len(spreads) > 4 else "")
            print(f"{run.config.name()} epoch {state.epoch + 1}: loss {row['loss']:.4f}, "
                  f"test accuracy {row['test_accuracy']:.3f}; spread {shown}", flush=True)


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train one run and return its summary (also written to ``summary.json``).

    The run folder is claimed for the run (`topoopt.lab.run_lock`): a second run started into it is
    refused. With `resume`, a run folder that holds a run continues it from its last intact checkpoint,
    with its saved configuration (see `CHANGEABLE_ON_RESUME`); an empty or missing folder starts
    a new run. ``summary["seconds"]`` is the training time summed over all resumed segments.
    """
    run_dir = config.resolved().run_dir()
    with run_lock(run_dir):  # one run per folder, claimed before anything is checked
        fresh = not any(entry.name != LOCK_FILE for entry in run_dir.iterdir())
        try:
            run = _prepare(config, resume, progress)
            _open_run_dir(run.run_dir, run.config)
            if run.finished():
                return _finish(run.config, run.run_dir, run.rows, run.seconds_before)
            return _train_epochs(run, progress)
        except BaseException:
            if fresh and not (run_dir / CHECKPOINT).exists():  # a failed start: nothing may block the rerun
                for entry in run_dir.iterdir():
                    if entry.name != LOCK_FILE:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            raise


def _train_epochs(run: _Run, progress: bool) -> dict:
    """The run's remaining epochs on `run_loop`; Ctrl-C finishes the step in progress, saves a
    checkpoint (mid-epoch, with the epoch's batch order) and stops."""
    config, state = run.config, run.state
    started = time.perf_counter()

    def elapsed() -> float:  # training time over all segments
        return run.seconds_before + time.perf_counter() - started

    monitor = TopologyMonitor(run.model, log_dir=run.run_dir, every=config.monitor_every,
                              diagrams_every=config.diagrams_every, trees=run.trees,
                              optimizer=run.optimizer if isinstance(run.optimizer, TopoOptimizer) else None)
    summary: dict = {}
    try:
        with StopOnInterrupt() as stop:
            callbacks = [_FiniteLoss(run.run_dir, config), _MonitorSteps(monitor),
                         Progress(lambda s: f"{config.name()} epoch {s.epoch + 1}/{config.epochs}", enabled=progress),
                         _EpochRecord(run, monitor, elapsed, progress), stop]
            try:
                run_loop(run.model, run.optimizer, run.data.x_train, run.data.y_train, batch_size=config.batch_size,
                         generator=run.generator, epochs=config.epochs, callbacks=callbacks, state=state,
                         objective=None if run.penalty is None else (lambda loss: loss + run.penalty()))
            except TrainingDiverged:
                raise
            except (ValueError, FloatingPointError) as error:
                diverged = _diverged(error, run.model, state.step, run.run_dir, config)
                if diverged is None:
                    raise
                raise diverged from None
        if state.stop:  # Ctrl-C: the step is finished; save and stop
            run.checkpoint(elapsed())
            print(f"\nInterrupted at step {state.step}: saved {run.run_dir / CHECKPOINT}; continue with --resume")
            raise KeyboardInterrupt
        summary = _finish(config, run.run_dir, run.rows, run.seconds)
    finally:
        final = {k: v for k, v in summary.items() if k in ("test_accuracy", "train_accuracy", "loss")}
        monitor.close(hparams={k: v for k, v in dataclasses.asdict(config).items() if k != "topo_bounds"},
                      final=final)
    if progress and summary and monitor.history.steps:
        print(monitor.verdict(), flush=True)
    return summary


def _finish(config: TrainConfig, run_dir: Path, rows: list[dict], seconds: float) -> dict:
    """metrics.csv and summary.json of a finished run; the summary is returned."""
    _write_metrics(rows, run_dir)
    summary = {"run": config.name(), "run_dir": str(run_dir), "seconds": seconds, **rows[-1]}
    _write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
