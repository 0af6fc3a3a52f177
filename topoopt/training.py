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
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from topoopt.data import DATASETS, default_model, load_dataset, stratified_subset
from topoopt.layers import layer_topology
from topoopt.loop import OPTIMIZERS, make_optimizer
from topoopt.models import ACTIVATIONS, build_mlp, initialise, parse_model_spec
from topoopt.monitor import TopologyMonitor
from topoopt.optimizer import COMPLEXITY_METRICS, POLICIES, TopoOptimizer
from topoopt.penalty import PENALTY_METRICS, TopoPenalty
from topoopt.progress import Heartbeat, Ticker
from topoopt.tree_cache import TreeCache

__all__ = ["CHANGEABLE_ON_RESUME", "TrainConfig", "saved_config", "train", "fit", "fit_steps"]

# Options a resumed run may change: the epoch budget (to extend a run) and where the data and
# the computation live. Everything else would silently change the run, so it is refused.
CHANGEABLE_ON_RESUME = ("epochs", "data_dir", "device", "log_dir")

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
TEMPORARY_CHECKPOINT = "checkpoint.tmp"
_CHECKPOINT_KEYS = ("model", "optimizer", "generator", "epoch", "global_step", "rows")


@dataclass
class TrainConfig:
    dataset: str = "mnist5k"
    data_dir: str | None = None
    subset: int | None = None
    model: str | None = None          # None: the dataset's default, `topoopt.data.default_model`
    activation: str = "relu"
    bias: bool = True
    init: str = "default"
    init_std: float = 1e-6
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 5
    batch_size: int = 64
    topo_optimizer: str | None = None
    topo_metric: str = "normalized_entropy"
    topo_strength: float = 1.0
    topo_every: int = 10
    topo_bounds: tuple[float, float] = (0.25, 4.0)
    penalty: str | None = None
    penalty_weight: float = 1e-3
    penalty_direction: str = "minimize"
    penalty_every: int = 1
    tree_every: int = 1
    monitor_every: int = 10
    diagrams_every: int = 200
    seed: int = 0
    device: str = "auto"
    log_dir: str | None = None
    run_name: str | None = None

    def name(self) -> str:
        if self.run_name:
            return self.run_name
        parts = [self.dataset, self.optimizer]
        if self.topo_optimizer:
            parts.append(f"topo-{self.topo_optimizer}")
        if self.penalty:
            parts.append(f"pen-{self.penalty}")
        return "_".join(parts + [f"s{self.seed}"])

    def run_dir(self) -> Path:
        return Path(self.log_dir or Path("tensorboard_logs") / self.name())

    def resolved(self) -> "TrainConfig":
        """A checked copy with the dataset's default model filled in; a bad value is a
        `ValueError` naming the command-line option."""
        config = dataclasses.replace(self, topo_bounds=_pair(self.topo_bounds))
        _check_config(config)
        if config.model is None:
            config.model = default_model(config.dataset)
        return config


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _require(field: str, value, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{_option(field)} {value!r}: must be {requirement}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_choice(field: str, value, choices) -> None:
    _require(field, value, value in choices, f"one of {', '.join(map(str, choices))}")


def _check_config(config: TrainConfig) -> None:
    """Every option's type and range, before anything is loaded or written."""
    _check_choice("dataset", config.dataset, DATASETS)
    _require("subset", config.subset, config.subset is None or _is_count(config.subset), "an integer ≥ 1")
    if config.model is not None:
        try:
            parse_model_spec(config.model)
        except ValueError as error:
            raise ValueError(f"--model {config.model}: {error}") from None
    _check_choice("activation", config.activation, sorted(ACTIVATIONS))
    _check_choice("init", config.init, ("default", "zero", "normal"))
    _require("init_std", config.init_std, _is_number(config.init_std) and config.init_std >= 0, "a finite number ≥ 0")
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _require("lr", config.lr, _is_number(config.lr) and config.lr > 0, "a finite number > 0")
    _require("momentum", config.momentum, _is_number(config.momentum) and 0 <= config.momentum < 1,
             "a finite number in [0, 1)")
    _require("momentum", config.momentum, config.momentum == 0 or config.optimizer == "sgd",
             "0 with --optimizer adam/adamw (momentum is an SGD option)")
    _require("weight_decay", config.weight_decay, _is_number(config.weight_decay) and config.weight_decay >= 0,
             "a finite number ≥ 0")
    for field in ("epochs", "batch_size", "topo_every", "penalty_every", "tree_every", "monitor_every",
                  "diagrams_every"):
        _require(field, getattr(config, field), _is_count(getattr(config, field)), "an integer ≥ 1")
    if config.topo_optimizer is not None:
        _check_choice("topo_optimizer", config.topo_optimizer, sorted(POLICIES))
    _check_choice("topo_metric", config.topo_metric, COMPLEXITY_METRICS)
    _require("topo_strength", config.topo_strength, _is_number(config.topo_strength) and config.topo_strength >= 0,
             "a finite number ≥ 0")
    bounds = config.topo_bounds
    _require("topo_bounds", bounds, isinstance(bounds, tuple) and len(bounds) == 2
             and all(_is_number(b) and b > 0 for b in bounds) and bounds[0] <= 1 <= bounds[1],
             "two finite numbers LOW ≤ 1 ≤ HIGH (the range of each layer's step scale)")
    if config.penalty is not None:
        _check_choice("penalty", config.penalty, PENALTY_METRICS)
    _require("penalty_weight", config.penalty_weight, _is_number(config.penalty_weight) and config.penalty_weight >= 0,
             "a finite number ≥ 0 (--penalty-direction chooses the sign)")
    _check_choice("penalty_direction", config.penalty_direction, ("minimize", "maximize"))
    _require("seed", config.seed, isinstance(config.seed, int) and not isinstance(config.seed, bool), "an integer")
    _check_choice("device", config.device, ("auto", "cpu", "cuda"))


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
    config.topo_bounds = _pair(config.topo_bounds)
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
    if run_dir.is_dir() and any(run_dir.iterdir()) and not resume:
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
    return payload


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


@torch.no_grad()
def _accuracy(model, x, y, batch: int = 2048) -> float:
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN or infinite; the message names the step."""


def _guarded(action, model: torch.nn.Module, step: int, run_dir: Path):
    """``action()``; an error it raises because the weights diverged (not finite, or so large that
    their squares, and so the distances between neurons, overflow in float32) becomes a
    `TrainingDiverged` that says so: measuring such weights fails in several ways."""
    try:
        return action()
    except (ValueError, FloatingPointError) as error:
        if all(bool(torch.isfinite(p.detach().float().square().sum())) for p in model.parameters()):
            raise
        raise TrainingDiverged(f"training diverged at step {step}: the weights overflow "
                               f"({type(error).__name__}); try a smaller --lr. The last good checkpoint "
                               f"is in {run_dir}") from None


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train one run and return its summary (also written to ``summary.json``).

    With `resume`, a run folder that holds a run continues it from its last intact checkpoint,
    with its saved configuration (see `CHANGEABLE_ON_RESUME`); an empty or missing folder starts
    a new run. ``summary["seconds"]`` is the training time summed over all resumed segments.
    """
    from tqdm import tqdm

    # Everything is checked, loaded and built before the run folder is created or written, so a
    # bad option, a missing dataset or a damaged checkpoint leaves nothing behind.
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
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    model = build_mlp(config.model, activation=config.activation, bias=config.bias)
    initialise(model, config.init, std=config.init_std)
    model.to(device)
    trees = TreeCache()  # one per run: the penalty, the optimizer and the monitor search once per step between them
    optimizer = _make_optimizer(config, model, trees)
    penalty = (TopoPenalty(model, metric=config.penalty, weight=config.penalty_weight,
                           direction=config.penalty_direction, every=config.penalty_every,
                           tree_every=config.tree_every, trees=trees)
               if config.penalty else None)
    generator = torch.Generator().manual_seed(config.seed)
    start_epoch, global_step, rows, partial, seconds_before = 0, 0, [], None, 0.0
    if saved is not None:
        _restore(saved, model, optimizer, penalty, generator, run_dir)
        start_epoch, global_step, rows = saved["epoch"], saved["global_step"], saved["rows"]
        partial, seconds_before = saved.get("partial"), float(saved.get("seconds", 0.0))
        if len(rows) > config.epochs or (partial is not None and start_epoch >= config.epochs):
            raise ValueError(f"--epochs {config.epochs}: the run in {run_dir} has already trained "
                             f"{len(rows) + (partial is not None)} epochs; "
                             f"pass --epochs {max(len(rows), start_epoch + 1)} "
                             f"or more, or another --log-dir")
    _open_run_dir(run_dir, config)
    if start_epoch >= config.epochs and partial is None and rows:
        return _finish(config, run_dir, rows, seconds_before)

    started = time.perf_counter()
    trained = {"seconds": seconds_before}  # training time over all segments, as of the last checkpoint

    def checkpoint(epoch: int, in_progress: dict | None = None) -> None:
        trained["seconds"] = seconds_before + time.perf_counter() - started
        _save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "penalty": penalty.state_dict() if penalty is not None else {},
                          "generator": generator.get_state(), "epoch": epoch, "global_step": global_step,
                          "rows": rows, "partial": in_progress, "seconds": trained["seconds"]}, run_dir)

    monitor = TopologyMonitor(model, log_dir=run_dir, every=config.monitor_every, diagrams_every=config.diagrams_every,
                              optimizer=optimizer if isinstance(optimizer, TopoOptimizer) else None, trees=trees)
    heartbeat = Heartbeat(enabled=progress)
    summary: dict = {}
    with _StopOnInterrupt() as stop:
        try:
            for epoch in range(start_epoch, config.epochs):
                model.train()
                if partial is not None:  # resuming inside an epoch: same batches, same order
                    order, first = partial["order"].to(device), partial["next_batch"]
                    total, correct, seen = partial["total"], partial["correct"], partial["seen"]
                    partial = None
                else:
                    order, first = torch.randperm(len(x_train), generator=generator).to(device), 0
                    total, correct, seen = 0.0, 0, 0
                batches = order.split(config.batch_size)
                bar = tqdm(batches[first:], desc=f"{config.name()} epoch {epoch + 1}/{config.epochs}",
                           disable=None if progress else True, leave=False)  # None: off when not a terminal
                for index, batch in enumerate(bar, start=first):
                    optimizer.zero_grad()
                    logits = model(x_train[batch])
                    loss = F.cross_entropy(logits, y_train[batch])
                    objective = loss + penalty() if penalty is not None else loss
                    objective.backward()
                    _guarded(optimizer.step, model, global_step + 1, run_dir)
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise TrainingDiverged(f"training diverged at step {global_step + 1} (loss {loss_value}); "
                                               f"try a smaller --lr. The last good checkpoint is in {run_dir}")
                    _guarded(lambda: monitor.step(global_step), model, global_step + 1, run_dir)
                    global_step += 1
                    total += loss_value * len(batch)
                    correct += int((logits.argmax(1) == y_train[batch]).sum())
                    seen += len(batch)
                    bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{correct / seen:.3f}")
                    heartbeat.beat(lambda: f"{config.name()} epoch {epoch + 1}/{config.epochs}: batch {index + 1}/"
                                           f"{len(batches)}, loss {total / seen:.4f}")
                    if stop.requested:  # Ctrl-C: finish the step, save, stop
                        checkpoint(epoch, {"order": order.cpu(), "next_batch": index + 1, "total": total,
                                           "correct": correct, "seen": seen})
                        print(f"\nInterrupted at step {global_step}: saved {run_dir / CHECKPOINT}; "
                              "continue with --resume")
                        raise KeyboardInterrupt
                model.eval()
                row = {"epoch": epoch + 1, "step": global_step, "loss": total / seen, "train_accuracy": correct / seen,
                       "test_accuracy": _accuracy(model, x_test, y_test)}
                for name, topo in _guarded(lambda: layer_topology(model), model, global_step, run_dir).items():
                    row[f"{name}/normalized_entropy"] = topo.normalized_entropy
                    row[f"{name}/mean_lifetime"] = topo.mean_lifetime
                    row[f"{name}/weight_norm"] = topo.weight_norm
                rows.append(row)
                monitor.log_scalars({"train/loss": row["loss"], "train/accuracy": row["train_accuracy"],
                                     "test/accuracy": row["test_accuracy"]}, global_step)
                monitor.flush()
                checkpoint(epoch + 1)
                _write_metrics(rows, run_dir)
                if progress:
                    print(f"{config.name()} epoch {epoch + 1}: loss {row['loss']:.4f}, "
                          f"test accuracy {row['test_accuracy']:.3f}", flush=True)
            summary = _finish(config, run_dir, rows, trained["seconds"])
        finally:
            final = {k: v for k, v in summary.items() if k in ("test_accuracy", "train_accuracy", "loss")}
            monitor.close(hparams={k: v for k, v in dataclasses.asdict(config).items() if k != "topo_bounds"},
                          final=final)
    return summary


def _restore(saved: dict, model, optimizer, penalty, generator, run_dir: Path) -> None:
    """Load a checkpoint's states; one that does not fit this run is a one-line `ValueError`."""
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if penalty is not None and saved.get("penalty"):  # absent in checkpoints of older versions
            penalty.load_state_dict(saved["penalty"])
        generator.set_state(saved["generator"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{run_dir / CHECKPOINT} does not fit this run's model or optimizer "
                         f"({type(error).__name__}); was config.json edited? "
                         "Start again in another --log-dir") from None


def _finish(config: TrainConfig, run_dir: Path, rows: list[dict], seconds: float) -> dict:
    """metrics.csv and summary.json of a finished run; the summary is returned."""
    _write_metrics(rows, run_dir)
    summary = {"run": config.name(), "run_dir": str(run_dir), "seconds": seconds, **rows[-1]}
    _write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


class _StopOnInterrupt:
    """Turns the first Ctrl-C into a request the training loop honours after a whole step (so no
    half-applied update is saved); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def fit(model: torch.nn.Module, data, epochs: int, batch_size: int, optimizer: torch.optim.Optimizer,
        seed: int = 0, penalty: TopoPenalty | None = None, on_epoch=None) -> list[dict]:
    """Minibatch training of a classifier on in-memory tensors; one history row per epoch.

    Each row holds epoch, step, loss, train_accuracy (on the epoch's batches) and test_accuracy.
    ``on_epoch(row, model)`` may add entries to the row (e.g. topology metrics).
    """
    generator = torch.Generator().manual_seed(seed)
    history, step = [], 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(data.x_train), generator=generator)
        total, correct = 0.0, 0
        for batch in order.split(batch_size):
            optimizer.zero_grad()
            logits = model(data.x_train[batch])
            loss = F.cross_entropy(logits, data.y_train[batch])
            (loss + penalty() if penalty is not None else loss).backward()
            optimizer.step()
            step += 1
            total += loss.item() * len(batch)
            correct += int((logits.argmax(1) == data.y_train[batch]).sum())
        model.eval()
        row = {"epoch": epoch, "step": step, "loss": total / len(order), "train_accuracy": correct / len(order),
               "test_accuracy": _accuracy(model, data.x_test, data.y_test)}
        if on_epoch is not None:
            on_epoch(row, model)
        history.append(row)
    return history


def fit_steps(model: torch.nn.Module, data, steps: int, batch_size: int, optimizer: torch.optim.Optimizer,
              evaluations: int = 10, seed: int = 0, penalty: TopoPenalty | None = None, on_eval=None) -> list[dict]:
    """Train for exactly `steps` minibatches (reshuffling each epoch); evaluate `evaluations` times.

    A fixed step budget removes the confound between training-set size and training time that a
    fixed epoch count has. Each history row: step, epoch (fractional), train_loss (mean since the
    last evaluation), test_accuracy, seconds (training time so far); ``on_eval(row, model)`` may
    add entries.
    """
    if steps < 1 or evaluations < 1:
        raise ValueError(f"Invalid steps/evaluations: {steps}/{evaluations}")
    checkpoints = sorted({max(1, round(steps * (i + 1) / evaluations)) for i in range(evaluations)})
    generator = torch.Generator().manual_seed(seed)
    history, step, running, count, seconds = [], 0, 0.0, 0, 0.0
    batches_per_epoch = max(1, math.ceil(len(data.x_train) / batch_size))
    while step < steps:
        order = torch.randperm(len(data.x_train), generator=generator)
        for batch in order.split(batch_size):
            started = time.perf_counter()
            model.train()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            (loss + penalty() if penalty is not None else loss).backward()
            optimizer.step()
            seconds += time.perf_counter() - started
            step += 1
            running += loss.item()
            count += 1
            if step == checkpoints[len(history)]:
                model.eval()
                row = {"step": step, "epoch": step / batches_per_epoch, "train_loss": running / count,
                       "test_accuracy": _accuracy(model, data.x_test, data.y_test), "seconds": seconds}
                running, count = 0.0, 0
                if on_eval is not None:
                    on_eval(row, model)
                history.append(row)
            if step == steps:
                break
    return history
