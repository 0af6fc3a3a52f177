"""One training run: a config, a run folder, TensorBoard logs, atomic checkpoints and resume.

A run folder holds ``config.json``, ``metrics.csv`` (one row per epoch: loss, train and test
accuracy, and each layer's topology), ``summary.json``, ``checkpoint.pt`` and the TensorBoard
events. Checkpoints are written to a temporary file and renamed, so an interrupted write never
corrupts the previous one. Ctrl-C finishes the step in progress, saves a checkpoint (mid-epoch,
with the epoch's batch order) and stops; ``--resume`` continues bit-identically.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from topoopt.data import load_dataset, stratified_subset
from topoopt.layers import layer_topology
from topoopt.models import build_mlp, initialise, parse_model_spec
from topoopt.monitor import TopologyMonitor
from topoopt.optimizer import TopoOptimizer
from topoopt.penalty import TopoPenalty

__all__ = ["TrainConfig", "train", "fit", "fit_steps"]


@dataclass
class TrainConfig:
    dataset: str = "mnist5k"
    data_dir: str | None = None
    subset: int | None = None
    model: str = "mlp:784-100-100-10"
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


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available here")
    return torch.device(choice)


def _make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        inner = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        inner = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    elif config.optimizer == "adamw":
        inner = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"Invalid optimizer {config.optimizer!r}. Valid values are: sgd, adam, adamw")
    if config.topo_optimizer is None:
        return inner
    return TopoOptimizer(inner, model, metric=config.topo_metric, policy=config.topo_optimizer,
                         strength=config.topo_strength, every=config.topo_every,
                         bounds=tuple(config.topo_bounds), tree_every=config.tree_every)


def _save_atomically(payload: dict, path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


@torch.no_grad()
def _accuracy(model, x, y, batch: int = 2048) -> float:
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train one run and return its summary (also written to ``summary.json``)."""
    from tqdm import tqdm

    device = _device(config.device)
    # Data and shapes first: a dataset that cannot be had, or a model that does not fit it,
    # must leave no run folder behind.
    data = stratified_subset(load_dataset(config.dataset, config.data_dir), config.subset, seed=config.seed)
    widths = parse_model_spec(config.model)
    if widths[0] != data.n_features or widths[-1] != data.n_classes:
        raise ValueError(f"--model {config.model} maps {widths[0]} inputs to {widths[-1]} classes, but "
                         f"{config.dataset} has {data.n_features} features and {data.n_classes} classes")
    run_dir = Path(config.log_dir or Path("tensorboard_logs") / config.name())
    checkpoint_path = run_dir / "checkpoint.pt"
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise FileExistsError(f"Run folder {run_dir} is not empty: pass --resume to continue it, or another --log-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    torch.manual_seed(config.seed)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    model = build_mlp(config.model, activation=config.activation, bias=config.bias)
    initialise(model, config.init, std=config.init_std)
    model.to(device)
    optimizer = _make_optimizer(config, model)
    penalty = (TopoPenalty(model, metric=config.penalty, weight=config.penalty_weight, direction=config.penalty_direction,
                           every=config.penalty_every, tree_every=config.tree_every) if config.penalty else None)
    generator = torch.Generator().manual_seed(config.seed)
    start_epoch, global_step, rows, partial = 0, 0, [], None
    if resume and checkpoint_path.exists():
        saved = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        start_epoch, global_step, rows = saved["epoch"], saved["global_step"], saved["rows"]
        partial = saved.get("partial")

    def checkpoint(epoch: int, in_progress: dict | None = None) -> None:
        _save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                          "epoch": epoch, "global_step": global_step, "rows": rows, "partial": in_progress}, checkpoint_path)

    monitor = TopologyMonitor(model, log_dir=run_dir, every=config.monitor_every, diagrams_every=config.diagrams_every,
                              optimizer=optimizer if isinstance(optimizer, TopoOptimizer) else None)
    started = time.perf_counter()
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
                    optimizer.step()
                    monitor.step(global_step)
                    global_step += 1
                    total += loss.item() * len(batch)
                    correct += int((logits.argmax(1) == y_train[batch]).sum())
                    seen += len(batch)
                    bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{correct / seen:.3f}")
                    if stop.requested:  # Ctrl-C: finish the step, save, stop
                        checkpoint(epoch, {"order": order.cpu(), "next_batch": index + 1, "total": total,
                                           "correct": correct, "seen": seen})
                        print(f"\nInterrupted at step {global_step}: saved {checkpoint_path}; continue with --resume")
                        raise KeyboardInterrupt
                model.eval()
                row = {"epoch": epoch + 1, "step": global_step, "loss": total / seen, "train_accuracy": correct / seen,
                       "test_accuracy": _accuracy(model, x_test, y_test)}
                for name, topo in layer_topology(model).items():
                    row[f"{name}/normalized_entropy"] = topo.normalized_entropy
                    row[f"{name}/mean_lifetime"] = topo.mean_lifetime
                    row[f"{name}/weight_norm"] = topo.weight_norm
                rows.append(row)
                monitor.log_scalars({"train/loss": row["loss"], "train/accuracy": row["train_accuracy"],
                                     "test/accuracy": row["test_accuracy"]}, global_step)
                monitor.flush()
                checkpoint(epoch + 1)
                if progress:
                    print(f"{config.name()} epoch {epoch + 1}: loss {row['loss']:.4f}, test accuracy {row['test_accuracy']:.3f}")
            with open(run_dir / "metrics.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            summary = {"run": config.name(), "run_dir": str(run_dir), "seconds": time.perf_counter() - started, **rows[-1]}
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        finally:
            final = {k: v for k, v in summary.items() if k in ("test_accuracy", "train_accuracy", "loss")}
            monitor.close(hparams={k: v for k, v in dataclasses.asdict(config).items() if k != "topo_bounds"}, final=final)
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
