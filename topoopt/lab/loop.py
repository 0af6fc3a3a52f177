"""The training loop that every run and study shares, its callbacks, and the one optimizer factory.

`run_loop` trains a classifier on in-memory tensors with minibatches in a seeded random order,
and calls its callbacks at fixed points; everything else a run does (evaluation, logging,
checkpoints, progress, stopping) is a callback. `fit` and `fit_steps` (the studies' loops),
`topoopt.lab.training.train` (the CLI's runs, with checkpoints and resume), the steering study's
`run_cell` and the learning-graph study's `train_and_record` are thin wrappers over it.

One step, in order::

    state.step += 1; model.train(); optimizer.zero_grad()
    logits = model(x[batch]); loss = cross_entropy(logits, y[batch])
    state.batch, state.logits, state.loss = batch, logits, loss.item()
    callbacks.before_backward(state)      # a stop here abandons the step: no update
    objective(loss).backward()
    callbacks.before_step(state)          # gradients are there, the update is not yet
    optimizer.step()
    state's epoch sums updated
    callbacks.after_step(state)           # then: stop if state.stop or the step budget is spent

and each epoch draws ``torch.randperm(len(x), generator=generator)`` (unless it resumes a saved
order), calls ``on_epoch_begin``, runs its batches, then ``on_epoch_end``.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from topoopt._validation import check_choice, invalid
from topoopt.lab.progress import Heartbeat
from topoopt.optimizer import TopoOptimizer
from topoopt.tree_cache import TreeCache

__all__ = ["OPTIMIZERS", "Callback", "LoopState", "Progress", "StopOnInterrupt", "StopOnNonFiniteLoss", "accuracy",
           "fit", "fit_steps", "make_optimizer", "run_loop"]

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(model: nn.Module, name: str, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                   params: Iterable[Any] | None = None, topo: Mapping[str, Any] | None = None,
                   trees: TreeCache | None = None) -> torch.optim.Optimizer:
    """The optimizer of a run: torch's SGD, Adam or AdamW, wrapped in a `TopoOptimizer` when asked.

    Parameters
    ----------
    model : nn.Module
        The network; its parameters are optimized unless `params` is given, and its layers are
        the ones a `TopoOptimizer` measures.
    name : {"sgd", "adam", "adamw"}
        The inner optimizer.
    lr : float
        Learning rate.
    momentum : float, optional
        SGD's momentum (0: none); a non-zero value with Adam or AdamW is a `ValueError`.
    weight_decay : float, optional
        L2 penalty (SGD, Adam) or decoupled weight decay (AdamW); 0 by default for AdamW too
        (torch's own default there is 0.01).
    params : iterable, optional
        Parameters or parameter groups to optimize instead of ``model.parameters()``.
    topo : mapping, optional
        Keyword arguments of `TopoOptimizer` (``policy``, ``strength``, ``metric``, ``every``,
        ``bounds``, ``tree_every``, ...); None gives the inner optimizer alone.
    trees : TreeCache, optional
        The run's shared tree cache, handed to the `TopoOptimizer`.

    Returns
    -------
    torch.optim.Optimizer
        The inner optimizer, or a `TopoOptimizer` around it.
    """
    check_choice("optimizer", name, OPTIMIZERS)
    if momentum and name != "sgd":
        raise invalid("momentum", momentum, f"0 with optimizer {name!r} (momentum is an SGD option)")
    params = model.parameters() if params is None else params
    if name == "sgd":
        inner = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif name == "adam":
        inner = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        inner = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if topo is None:
        return inner
    return TopoOptimizer(inner, model, trees=trees, **topo)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> float:
    """The share of `x` that `model` classifies as `y` (in chunks of `batch`, without gradients;
    the model's train/eval mode is left as it is)."""
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


@dataclass
class LoopState:
    """Where training stands; `run_loop` updates it in place and every callback receives it.

    Attributes
    ----------
    model, optimizer
        What is trained, and how.
    epoch : int
        0-based index of the epoch in progress (in ``on_epoch_end``: of the epoch just finished;
        the loop adds 1 after it). Also the number of whole epochs done before this one.
    step : int
        1-based number of the step in progress, from the start of the step (so an error raised
        during it names it); after the step (or a step abandoned in ``before_backward``), the
        number of steps taken.
    order : Tensor or None
        The epoch's example order (None between epochs: the next epoch draws one).
    next_batch : int
        Index in the epoch's batches of the next batch to train.
    batches : int
        Batches in the current epoch.
    batch : Tensor or None
        The indices of the last step's examples (from ``before_backward`` on: this step's).
    logits : Tensor or None
        The last step's training logits (before its update).
    loss : float
        The last step's loss (cross-entropy, without what `objective` adds).
    loss_sum, correct, seen
        The epoch so far: sum of loss × batch size, correctly classified examples, examples.
    seconds : float
        Time spent in steps (forward, backward, update), callbacks excluded.
    stop : bool
        Set by a callback to end the loop after the current hook; the state then records where
        it stopped, and `run_loop` given it again continues from there.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    step: int = 0
    order: torch.Tensor | None = None
    next_batch: int = 0
    batches: int = 0
    batch: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss: float = float("nan")
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    stop: bool = False

    def partial_epoch(self) -> dict | None:
        """The epoch in progress as plain data for a checkpoint (None between epochs); `resume`
        takes it back."""
        if self.order is None:
            return None
        return {"order": self.order.cpu(), "next_batch": self.next_batch, "total": self.loss_sum,
                "correct": self.correct, "seen": self.seen}

    def resume(self, epoch: int, step: int, partial: dict | None = None) -> "LoopState":
        """Continue at `epoch` (whole epochs done) and `step`, inside the epoch `partial`
        describes (as `partial_epoch` returned it) when one is given. Returns the state."""
        self.epoch, self.step = epoch, step
        if partial is not None:
            self.order, self.next_batch = partial["order"], partial["next_batch"]
            self.loss_sum, self.correct, self.seen = partial["total"], partial["correct"], partial["seen"]
        return self


class Callback:
    """Hooks `run_loop` calls; override the ones needed. Each receives the `LoopState`, may read
    and change it (``state.stop = True`` ends the loop), and may raise to abort training.

    Hooks, in the order they are called:

    - ``on_train_begin(state)``: once, before the first step (a callback may keep `state`).
    - ``on_epoch_begin(state)``: the epoch's order is drawn; ``state.next_batch`` is its first
      batch (not 0 when resuming inside the epoch).
    - ``before_backward(state)``: the step's loss is computed (``state.loss``, ``state.logits``
      and ``state.batch`` are this step's), nothing is backpropagated yet. ``state.stop = True``
      here abandons the step (no backward pass, no update, ``state.step`` back to the steps
      taken, no ``after_step``) and ends the loop: a stop on a non-finite loss goes here.
    - ``before_step(state)``: after the backward pass, before ``optimizer.step()`` (gradient
      clipping or rescaling goes here).
    - ``after_step(state)``: after the update; ``state.loss``, ``state.logits``, ``state.batch``
      and the epoch's sums include this step.
    - ``on_epoch_end(state)``: after the epoch's last batch (not when the loop stops inside it).
    - ``on_train_end(state)``: once, when the loop ends without an error.

    Callbacks run in the order given to `run_loop`, so one may rely on an earlier one's work.
    """

    def on_train_begin(self, state: LoopState) -> None:
        pass

    def on_epoch_begin(self, state: LoopState) -> None:
        pass

    def before_backward(self, state: LoopState) -> None:
        pass

    def before_step(self, state: LoopState) -> None:
        pass

    def after_step(self, state: LoopState) -> None:
        pass

    def on_epoch_end(self, state: LoopState) -> None:
        pass

    def on_train_end(self, state: LoopState) -> None:
        pass


def run_loop(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
             batch_size: int, generator: torch.Generator, epochs: int | None = None, steps: int | None = None,
             objective: Callable[[torch.Tensor], torch.Tensor] | None = None,
             callbacks: Sequence[Callback] = (), state: LoopState | None = None) -> LoopState:
    """Minibatch training of a classifier with cross-entropy; returns the final `LoopState`.

    Parameters
    ----------
    model : nn.Module
        The classifier: ``model(x[batch])`` gives logits.
    optimizer : torch.optim.Optimizer
        Its optimizer (`make_optimizer` builds the usual ones).
    x, y : Tensor
        Training inputs and class labels, on the model's device.
    batch_size : int
        Examples per step (an epoch's last batch may be smaller).
    generator : torch.Generator
        Draws each epoch's order (CPU); seed it for a reproducible run and save its state in a
        checkpoint to resume one.
    epochs : int, optional
        Train until `epochs` whole epochs are done (counting those before a resumed `state`).
    steps : int, optional
        Stop right after step number `steps`, inside an epoch or at its end (``on_epoch_end`` is
        then not called for the epoch it ends in). Give `epochs`, `steps` or both.
    objective : callable, optional
        ``objective(loss) -> Tensor``: what is minimised, from the batch's mean cross-entropy
        (for example ``lambda loss: loss + penalty()``); None minimises the loss itself.
    callbacks : sequence of Callback
        Called at the points described in `Callback`, in this order.
    state : LoopState, optional
        Where to start (see `LoopState.resume`); None starts a new run at step 0.

    Returns
    -------
    LoopState
        ``state.stop`` tells a stop asked by a callback from a spent budget.
    """
    if epochs is None and steps is None:
        raise ValueError("run_loop needs a budget: epochs, steps or both")
    state = state if state is not None else LoopState(model, optimizer)
    state.stop = False
    for callback in callbacks:
        callback.on_train_begin(state)
    while epochs is None or state.epoch < epochs:
        if state.order is None:
            state.order = torch.randperm(len(x), generator=generator)
            state.next_batch, state.loss_sum, state.correct, state.seen = 0, 0.0, 0, 0
        state.order = state.order.to(x.device)  # a resumed order comes from a checkpoint, on the CPU
        batches = state.order.split(batch_size)
        state.batches = len(batches)
        for callback in callbacks:
            callback.on_epoch_begin(state)
        while state.next_batch < len(batches):
            batch = batches[state.next_batch]
            if not _step(state, x, y, batch, objective, callbacks):
                return _end(state, callbacks)
            state.next_batch += 1
            for callback in callbacks:
                callback.after_step(state)
            if state.stop or (steps is not None and state.step >= steps):
                return _end(state, callbacks)
        for callback in callbacks:
            callback.on_epoch_end(state)
        state.epoch, state.order, state.next_batch = state.epoch + 1, None, 0
        if state.stop:
            return _end(state, callbacks)
    return _end(state, callbacks)


def _step(state: LoopState, x, y, batch, objective, callbacks) -> bool:
    """One step (see the module's docstring); False when a ``before_backward`` hook abandoned it."""
    started = time.perf_counter()
    state.step += 1
    model, optimizer = state.model, state.optimizer
    model.train()
    optimizer.zero_grad()
    logits = model(x[batch])
    loss = F.cross_entropy(logits, y[batch])
    state.batch, state.logits, state.loss = batch, logits, loss.item()
    for callback in callbacks:
        callback.before_backward(state)
    if state.stop:
        state.step -= 1
        state.seconds += time.perf_counter() - started
        return False
    (objective(loss) if objective is not None else loss).backward()
    for callback in callbacks:
        callback.before_step(state)
    optimizer.step()
    state.seconds += time.perf_counter() - started
    state.loss_sum += state.loss * len(batch)
    state.correct += int((logits.argmax(1) == y[batch]).sum())
    state.seen += len(batch)
    return True


def _end(state: LoopState, callbacks: Sequence[Callback]) -> LoopState:
    for callback in callbacks:
        callback.on_train_end(state)
    return state


class StopOnInterrupt(Callback):
    """Turns the first Ctrl-C into ``state.stop`` after the step in progress (so no half-applied
    update is ever saved); a second Ctrl-C interrupts at once. A context manager: the handler is
    installed in its block (on the main thread only); `requested` says whether Ctrl-C came."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def after_step(self, state: LoopState) -> None:
        if self.requested:
            state.stop = True


class StopOnNonFiniteLoss(Callback):
    """Stops the loop before a step whose loss is NaN or ±Inf updates anything (the step is
    abandoned, see ``Callback.before_backward``); `diverged` says whether it did."""

    def __init__(self) -> None:
        self.diverged = False

    def before_backward(self, state: LoopState) -> None:
        if not math.isfinite(state.loss):
            self.diverged = state.stop = True


class Progress(Callback):
    """A progress bar per epoch on a terminal (running loss and accuracy), and a heartbeat line
    at least every 30 s when the output is a log file (`topoopt.lab.progress.Heartbeat`).

    `describe(state)` names the epoch in both, e.g. ``"run epoch 2/5"``.
    """

    def __init__(self, describe: Callable[[LoopState], str], enabled: bool = True) -> None:
        self.describe, self.enabled = describe, enabled
        self.heartbeat = Heartbeat(enabled=enabled)
        self.bar = None

    def on_epoch_begin(self, state: LoopState) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=state.batches, initial=state.next_batch, desc=self.describe(state),
                        disable=None if self.enabled else True, leave=False)  # None: off when not a terminal

    def after_step(self, state: LoopState) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{state.loss_sum / state.seen:.4f}", acc=f"{state.correct / state.seen:.3f}")
        self.heartbeat.beat(lambda: f"{self.describe(state)}: batch {state.next_batch}/{state.batches}, "
                                    f"loss {state.loss_sum / state.seen:.4f}")

    def on_epoch_end(self, state: LoopState) -> None:
        self.bar.close()

    def on_train_end(self, state: LoopState) -> None:
        if self.bar is not None:
            self.bar.close()


def _plus_penalty(penalty) -> Callable[[torch.Tensor], torch.Tensor] | None:
    return None if penalty is None else (lambda loss: loss + penalty())


class _EpochRows(Callback):
    def __init__(self, data, on_epoch) -> None:
        self.data, self.on_epoch, self.history = data, on_epoch, []

    def on_epoch_end(self, state: LoopState) -> None:
        state.model.eval()
        row = {"epoch": state.epoch + 1, "step": state.step, "loss": state.loss_sum / state.seen,
               "train_accuracy": state.correct / state.seen,
               "test_accuracy": accuracy(state.model, self.data.x_test, self.data.y_test)}
        if self.on_epoch is not None:
            self.on_epoch(row, state.model)
        self.history.append(row)


def fit(model: nn.Module, data, epochs: int, batch_size: int, optimizer: torch.optim.Optimizer,
        seed: int = 0, penalty=None, on_epoch=None) -> list[dict]:
    """Minibatch training of a classifier on in-memory tensors; one history row per epoch.

    Each row holds epoch, step, loss, train_accuracy (on the epoch's batches) and test_accuracy.
    ``on_epoch(row, model)`` may add entries to the row (e.g. topology metrics). `penalty` (a
    `TopoPenalty`) is added to each batch's loss.
    """
    rows = _EpochRows(data, on_epoch)
    run_loop(model, optimizer, data.x_train, data.y_train, batch_size=batch_size,
             generator=torch.Generator().manual_seed(seed), epochs=epochs, objective=_plus_penalty(penalty),
             callbacks=[rows])
    return rows.history


class _StepRows(Callback):
    def __init__(self, data, at_steps: list[int], batches_per_epoch: int, on_eval) -> None:
        self.data, self.at_steps, self.batches_per_epoch, self.on_eval = data, at_steps, batches_per_epoch, on_eval
        self.history: list[dict] = []
        self.running, self.count = 0.0, 0

    def after_step(self, state: LoopState) -> None:
        self.running += state.loss
        self.count += 1
        if state.step != self.at_steps[len(self.history)]:
            return
        state.model.eval()
        row = {"step": state.step, "epoch": state.step / self.batches_per_epoch,
               "train_loss": self.running / self.count,
               "test_accuracy": accuracy(state.model, self.data.x_test, self.data.y_test), "seconds": state.seconds}
        self.running, self.count = 0.0, 0
        if self.on_eval is not None:
            self.on_eval(row, state.model)
        self.history.append(row)


def fit_steps(model: nn.Module, data, steps: int, batch_size: int, optimizer: torch.optim.Optimizer,
              evaluations: int = 10, seed: int = 0, penalty=None, on_eval=None) -> list[dict]:
    """Train for exactly `steps` minibatches (reshuffling each epoch); evaluate `evaluations` times.

    A fixed step budget removes the confound between training-set size and training time that a
    fixed epoch count has. Each history row: step, epoch (fractional), train_loss (mean since the
    last evaluation), test_accuracy, seconds (training time so far); ``on_eval(row, model)`` may
    add entries.
    """
    if steps < 1 or evaluations < 1:
        raise ValueError(f"Invalid steps/evaluations: {steps}/{evaluations}")
    at_steps = sorted({max(1, round(steps * (i + 1) / evaluations)) for i in range(evaluations)})
    batches_per_epoch = max(1, math.ceil(len(data.x_train) / batch_size))
    rows = _StepRows(data, at_steps, batches_per_epoch, on_eval)
    run_loop(model, optimizer, data.x_train, data.y_train, batch_size=batch_size,
             generator=torch.Generator().manual_seed(seed), steps=steps, objective=_plus_penalty(penalty),
             callbacks=[rows])
    return rows.history
