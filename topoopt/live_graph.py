"""Learning graphs while training runs: a bounded trajectory, Mapper rebuilt in a worker process.

`LiveLearningGraph` records each layer's neuron cloud every ``record_every`` steps (a fixed,
seeded subset of at most ``max_neurons`` neurons) and, every ``every`` steps, has one worker
process build the Mapper learning graph of the trajectory so far (Gabella et al. 2019;
`topoopt.learning_graphs`), draw it, and write the interactive HTML into ``folder``. While a
build is running, the next one is skipped, so a slow build never queues up work; and the worker
builds at most ``worker_share`` of the time (a quarter by default), because on a machine whose
second core is not really free a busy worker slows training too.

What the training thread does, and no more (measured in ``benchmarks/live_graph.py``):

- a record copies the chosen neurons' weights straight into a preallocated, memory-mapped
  ``.npy`` buffer (one row of ``max_snapshots`` per snapshot, in a hidden folder inside
  ``folder`` that ``close()`` removes);
- a build sends the worker only the buffer's path, the rows to read and their steps (a few kB):
  the worker reads the points from the file itself, so no tens of MB are concatenated and
  pickled on the training side;
- the worker draws the PNG and also encodes the TensorBoard image summary (exactly what
  ``writer.add_image`` would write), so the training thread only appends the finished bytes to
  the writer's event file;
- the worker process is spawned (not forked) at construction and imports its libraries then,
  not at the first build; the buffers' disk space is reserved and their pages touched then too.

Memory bound: at most ``max_snapshots`` snapshots per layer are kept; when full, every other
one is dropped and the recording interval doubles, so the trajectory spans all of training at a
coarser step. A layer of d inputs thus holds at most ``max_snapshots × max_neurons × d`` float32
values, the buffer file's size: 200 × 100 × 784 × 4 bytes = 63 MB for a 784-input layer with the
defaults (file pages, shared with the worker through the page cache). During a build the worker
holds a copy of the points of every layer (the same bound again: it copies them first, so that
the training thread can go on recording) plus Mapper's working memory for one layer at a time (a
float64 PCA of its points, about twice their float32 size).

Rows the worker has still to read are never overwritten: a thinned-out row is reused only once
the worker has copied its points (it signals this through an event as soon as it has, before
building anything). The training thread never waits for the worker: a snapshot that finds every
free row still awaited is skipped (counted in ``skipped_snapshots``; it happens with small
buffers, right after a thinning, while the worker has not yet copied its points; measured
before this rule: waiting there made training 80% slower with 50 × 50 buffers).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from torch import nn

from topoopt._validation import check_number, check_positive_int
from topoopt.cloud import neuron_cloud
from topoopt.layers import select_layers

__all__ = ["LiveLearningGraph"]


@dataclass
class _LayerTrajectory:
    neurons: np.ndarray  # indices of the recorded neurons
    path: Path  # the buffer file: max_snapshots × neurons × d float32
    buffer: np.ndarray | None  # its memory map (None once closed)
    steps: list[int] = field(default_factory=list)  # recorded steps, in order
    rows: list[int] = field(default_factory=list)  # the buffer row of each recorded step
    free: list[int] = field(default_factory=list)  # rows not in use
    pinned: set[int] = field(default_factory=set)  # rows a submitted build has still to read
    index: torch.Tensor | None = None  # `neurons` as a tensor on the layer's device

    @property
    def snapshots(self) -> np.ndarray:
        """The recorded snapshots in step order (a copy): len(steps) × neurons × d."""
        return np.asarray(self.buffer[self.rows])


class LiveLearningGraph:
    """Rebuilds each layer's learning graph every ``every`` steps, off the training thread.

    Parameters
    ----------
    model : nn.Module
        The model whose layers are followed.
    folder : str or Path
        Where ``<layer>_step<k>.html`` (interactive) and ``.png`` files are written.
    writer : SummaryWriter, optional
        Also log each graph as the image ``learning_graph/<layer>``.
    every : int
        Rebuild the graphs at the steps divisible by this.
    record_every : int
        Record a snapshot at the steps divisible by this (it doubles when the memory bound is
        reached, see the module docstring).
    max_neurons, max_snapshots : int
        The memory bound.
    layers : list of str, optional
        Only these layers (every neuron cloud by default).
    settings : dict, optional
        Layer name → `topoopt.learning_graphs.MapperSettings` (the default settings otherwise).

    seed : int
        Chooses the recorded neurons.
    worker_share : float or None
        At most this share of wall time spent building: after a build of b seconds the next
        one waits (b / worker_share − b) seconds, and the builds due meanwhile are skipped
        (``skipped_builds``). A busy worker slows training even with a core of its own when
        that core is not really free (a VM's second vCPU, a hyperthread sibling): on this
        project's 2-vCPU machine a step beside a build took 8% longer, so the default 0.25
        keeps the whole cost near 2.5% (``benchmarks/live_graph.py --decompose``). None: build
        at every `every`-th step the worker is free (on a machine with cores to spare).

    Call ``step(global_step)`` after each optimizer step and ``close()`` at the end (it waits for
    a running build, logs it, stops the worker and removes the buffers). ``built`` lists (layer,
    step, nodes, png path) of the graphs done; ``build_intervals`` (step, start, end) when the
    worker built them, on `time.monotonic()`'s clock. A build that fails (in the worker, or the worker
    itself) is reported as a warning and listed in ``errors`` as (layer, step, message); training
    goes on, and the next build starts a new worker if the old one died.
    """

    def __init__(self, model: nn.Module, folder: str | Path, *, writer=None, every: int = 500, record_every: int = 10,
                 max_neurons: int = 100, max_snapshots: int = 200, layers=None, settings: dict | None = None,
                 seed: int = 0, worker_share: float | None = 0.25) -> None:
        for name, value in (("every", every), ("record_every", record_every), ("max_neurons", max_neurons)):
            check_positive_int(name, value)
        check_positive_int("max_snapshots", max_snapshots, at_least=4)
        check_number("worker_share", worker_share, low=0.0, low_open=True, high=1.0, none_ok=True)
        self.worker_share = worker_share
        self._next_build_at = 0.0  # time.monotonic() before which a build waits (worker_share)
        self.skipped_builds = 0
        self.build_intervals: list[tuple[int, float, float]] = []  # (step, worker start, end), time.monotonic()
        self.layers = select_layers(model, layers)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer, self.every, self.record_every = writer, every, record_every
        self.max_snapshots = max_snapshots
        self.settings = dict(settings or {})
        self._buffers = Path(tempfile.mkdtemp(prefix=".live_graph-", dir=self.folder))
        generator = np.random.default_rng(seed)
        self._trajectories: dict[str, _LayerTrajectory] = {}
        for number, (name, module) in enumerate(self.layers.items()):
            cloud = neuron_cloud(module)
            chosen = np.sort(generator.choice(cloud.shape[0], size=min(cloud.shape[0], max_neurons), replace=False))
            path = self._buffers / f"layer{number}.npy"
            buffer = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                               shape=(max_snapshots, len(chosen), cloud.shape[1]))
            if hasattr(os, "posix_fallocate"):  # the disk space now: a full disk must not crash a record later
                with open(path, "r+b") as file:
                    os.posix_fallocate(file.fileno(), 0, path.stat().st_size)
            buffer[:] = 0  # touch every page now: a first touch while recording costs 4× the copy
            self._trajectories[name] = _LayerTrajectory(chosen, path, buffer, free=list(range(max_snapshots))[::-1])
        self._pool: ProcessPoolExecutor | None = None
        self._copied = None  # the worker's "points copied" event
        self._running: tuple[int, Future] | None = None
        self.built: list[tuple[str, int, int, Path]] = []
        self.errors: list[tuple[str, int, str]] = []
        self.skipped_snapshots = 0
        self.worker_peak_mb = 0.0  # the worker's peak resident memory, as it last reported it
        # torch's SummaryWriter: the worker encodes the image summary, the training thread appends it.
        torch_writer = sys.modules.get("torch.utils.tensorboard.writer")
        self._encode_in_worker = torch_writer is not None and isinstance(writer, torch_writer.SummaryWriter)
        self._start_worker()

    def _start_worker(self) -> None:
        # spawn, not fork: a forked copy of a process running torch threads can deadlock. The
        # event can only reach the worker at its creation (initargs), not with a task.
        context = get_context("spawn")
        self._copied = context.Event()
        nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10) if hasattr(os, "getpriority") else None
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_start,
                                         initargs=(self._copied, nice))
        with _main_not_reimported():
            self._pool.submit(_warm_up, self._encode_in_worker)  # spawns it now; imports off the first build
        # Lower its priority at once, so that its start (importing torch, before the initializer runs)
        # is niced too (`_processes` is private: best effort; the initializer does it in any case).
        for pid in getattr(self._pool, "_processes", None) or {}:
            try:
                os.setpriority(os.PRIO_PROCESS, pid, nice)
            except (OSError, TypeError):
                pass

    def step(self, global_step: int) -> None:
        if self._running is not None and self._running[1].done():
            self._collect()
        if global_step % self.record_every == 0:
            self._record(global_step)
        if global_step > 0 and global_step % self.every == 0:
            if self._running is None and _now() >= self._next_build_at:
                self._submit(global_step)
            else:
                self.skipped_builds += 1

    @torch.no_grad()
    def _record(self, step: int) -> None:
        rows: dict[str, int] = {}
        for name, trajectory in self._trajectories.items():
            row = self._free_row(trajectory)
            if row is None:  # every free row still awaited by the worker: skip, never wait
                for taken, kept in rows.items():
                    self._trajectories[taken].free.append(kept)
                self.skipped_snapshots += 1
                return
            rows[name] = row
        for name, module in self.layers.items():
            trajectory = self._trajectories[name]
            cloud = neuron_cloud(module).detach()
            if trajectory.index is None or trajectory.index.device != cloud.device:
                trajectory.index = torch.as_tensor(trajectory.neurons, device=cloud.device)
            row = rows[name]
            target = torch.from_numpy(trajectory.buffer[row])
            if cloud.device.type == "cpu" and cloud.dtype == torch.float32:
                torch.index_select(cloud, 0, trajectory.index, out=target)  # one copy, into the buffer
            else:
                target.copy_(cloud.index_select(0, trajectory.index))
            trajectory.steps.append(step)
            trajectory.rows.append(row)
        if len(trajectory.steps) >= self.max_snapshots:  # the memory bound: thin out, record half as often
            for kept in self._trajectories.values():
                kept.free.extend(kept.rows[1::2])
                kept.steps, kept.rows = kept.steps[::2], kept.rows[::2]
            self.record_every *= 2

    def _free_row(self, trajectory: _LayerTrajectory) -> int | None:
        """A free buffer row that no submitted build has still to read, or None."""
        running = self._running is not None and not self._running[1].done()
        if trajectory.pinned and (self._copied.is_set() or not running):  # pins of a build that has read them
            for kept in self._trajectories.values():
                kept.pinned.clear()
        for position in range(len(trajectory.free) - 1, -1, -1):
            if trajectory.free[position] not in trajectory.pinned:
                return trajectory.free.pop(position)
        return None

    def _submit(self, step: int) -> None:
        jobs = []
        for name, trajectory in self._trajectories.items():
            if len(trajectory.steps) < 2:
                continue
            stem = self.folder / f"{name.replace('.', '_') or 'model'}_step{step}"
            tag = f"learning_graph/{name.replace('.', '/') or 'model'}" if self._encode_in_worker else None
            last = name == list(self.layers)[-1]  # the output layer: its leaves end in classes, so labelled
            jobs.append((name, str(trajectory.path), list(trajectory.rows), list(trajectory.steps), trajectory.neurons,
                         self.settings.get(name), str(stem), f"{name}, step {step}", tag, last))
        if not jobs:
            return
        try:
            if self._pool is None:
                self._start_worker()
            self._copied.clear()
            future = self._pool.submit(_build, jobs)
        except Exception as error:  # a broken pool: report it, start a new worker next time
            self._report([job[0] for job in jobs], step, f"could not start the build: {error!r}")
            self._drop_worker()
            return
        for name, *_ in jobs:
            self._trajectories[name].pinned = set(self._trajectories[name].rows)
        self._running = (step, future)

    def _collect(self) -> None:
        step, future = self._running
        self._running = None
        for trajectory in self._trajectories.values():
            trajectory.pinned.clear()
        try:
            results, peak_mb, started, finished = future.result()
        except Exception as error:  # the worker died, or a result could not be sent back
            self._report(list(self._trajectories), step, f"the worker failed: {error!r}")
            self._drop_worker()
            return
        self.worker_peak_mb = peak_mb
        self.build_intervals.append((step, started, finished))
        if self.worker_share is not None:  # idle long enough that builds take at most this share of the time
            self._next_build_at = finished + (finished - started) * (1 / self.worker_share - 1)
        for name, outcome in results:
            if isinstance(outcome, str):
                self._report([name], step, outcome)
                continue
            nodes, png, summary = outcome
            self.built.append((name, step, nodes, Path(png)))
            if self.writer is not None:
                self._log_image(name, step, png, summary)

    def _log_image(self, name: str, step: int, png: str, summary: bytes | None) -> None:
        if summary is not None:  # the worker encoded the very summary that add_image makes
            from tensorboard.compat.proto.summary_pb2 import Summary

            self.writer._get_file_writer().add_summary(Summary.FromString(summary), step)
            return
        from PIL import Image

        image = np.asarray(Image.open(png).convert("RGB"))
        self.writer.add_image(f"learning_graph/{name.replace('.', '/') or 'model'}", image, step, dataformats="HWC")

    def _report(self, layers: list[str], step: int, message: str) -> None:
        for name in layers:
            self.errors.append((name, step, message))
        warnings.warn(f"Live learning graph of {', '.join(layers)} at step {step} failed: {message}",
                      RuntimeWarning, stacklevel=3)

    def _drop_worker(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        """Wait for the build in progress, build the last recorded snapshots' graph if no build saw
        them yet, and release the worker and the trajectory files."""
        if self._running is not None:
            self._collect()
        last = max((t.steps[-1] for t in self._trajectories.values() if t.steps), default=None)
        built = max((step for _, step, *_ in self.built), default=None)
        if last is not None and last != built and self._pool is not None:
            self._submit(last)  # the final graph, whatever the share the worker had
            if self._running is not None:
                self._collect()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for trajectory in self._trajectories.values():
            trajectory.buffer = None
        shutil.rmtree(self._buffers, ignore_errors=True)


@contextmanager
def _main_not_reimported() -> Iterator[None]:
    """While the worker spawns, hide the main script from it. A spawned process re-imports the
    parent's ``__main__`` file, and a script without an ``if __name__ == "__main__":`` guard would
    then run its training again in the worker, which would die of it. The worker needs nothing
    from the script: its code is all in this module."""
    main = sys.modules.get("__main__")
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if main is not None and key in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)
            if "__spec__" not in saved:
                main.__dict__.pop("__spec__", None)


_COPIED = None  # in the worker: the event set once a build's points are copied
_now = time.monotonic  # the system's clock, which the worker's timestamps also read


def _start(copied, nice: int | None) -> None:
    """The worker: one thread, and a lower priority (nice + 10) than training, which it must not slow."""
    global _COPIED
    _COPIED = copied
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    if nice is None:
        os.nice(10)
    elif os.getpriority(os.PRIO_PROCESS, 0) < nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def _warm_up(tensorboard: bool) -> None:
    torch.set_num_threads(1)
    import topoopt.learning_graphs  # noqa: F401

    if tensorboard:
        from torch.utils.tensorboard import summary  # noqa: F401


def read_points(path: str, rows: list[int], steps: list[int], neurons: np.ndarray):
    """A trajectory's Mapper input from its buffer: (points, point_steps, point_neurons)."""
    snapshots = np.load(path, mmap_mode="r")[rows]  # a copy of those rows
    points = snapshots.reshape(-1, snapshots.shape[-1])
    return points, np.repeat(np.asarray(steps), len(neurons)), np.tile(neurons, len(rows))


def _build(jobs: list) -> tuple[list, float, float, float]:
    """In the worker: each layer's Mapper graph, PNG, HTML and TensorBoard image summary.

    Returns ([(layer, (nodes, PNG path, summary bytes or None) or an error message)], peak MB,
    and the build's start and end on `time.monotonic()`'s clock, which is the system's).
    """
    import resource

    started = time.monotonic()
    torch.set_num_threads(1)
    inputs = []
    for _, path, rows, steps, neurons, *_ in jobs:
        try:
            inputs.append(read_points(path, rows, steps, neurons))
        except Exception:
            inputs.append(traceback.format_exc())
    if _COPIED is not None:
        _COPIED.set()  # the training thread may now reuse these rows
    results = []
    for job, points in zip(jobs, inputs):
        try:
            if isinstance(points, str):
                raise RuntimeError(points)
            results.append((job[0], _build_layer(points, *job[5:])))
        except Exception:
            results.append((job[0], traceback.format_exc()))
    return results, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, started, time.monotonic()


def _build_layer(points, settings, stem: str, title: str, tag: str | None, label_leaves: bool = False):
    from topoopt.learning_graphs import MapperSettings, leaf_labels, learning_graph

    graph = learning_graph(*points, settings or MapperSettings())
    labels = leaf_labels(graph.graph) if label_leaves else None
    graph.save_png(f"{stem}.png", title=title, labels=labels)
    graph.save_html(f"{stem}.html", title=title, labels=labels)
    summary = None
    if tag is not None:
        from PIL import Image
        from torch.utils.tensorboard.summary import image

        rgb = np.asarray(Image.open(f"{stem}.png").convert("RGB"))
        summary = image(tag, rgb, dataformats="HWC").SerializeToString()
    return graph.graph.number_of_nodes(), f"{stem}.png", summary
