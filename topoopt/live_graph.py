"""Learning graphs while training runs: a bounded trajectory, Mapper rebuilt in a worker process.

`LiveLearningGraph` records each layer's neuron cloud every ``record_every`` steps (a fixed,
seeded subset of at most ``max_neurons`` neurons) and, every ``every`` steps, hands the
trajectory so far to one worker process that builds the Mapper learning graph (Gabella et al.
2019; `topoopt.learning_graphs`), draws it, and writes the interactive HTML into ``folder``. The
training thread only copies the snapshot and, later, logs the finished PNG as a TensorBoard
image: the graph is never built on it. While a build is running, the next one is skipped, so a
slow build never queues up work.

Memory bound: at most ``max_snapshots`` snapshots per layer are kept; when full, every other
one is dropped and the recording interval doubles, so the trajectory spans all of training at
a coarser step. A layer of d inputs thus holds at most ``max_snapshots × max_neurons × d``
float32 values: 200 × 100 × 784 × 4 bytes = 63 MB for a 784-input layer with the defaults.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from torch import nn

from topoopt._validation import check_positive_int
from topoopt.cloud import neuron_cloud
from topoopt.layers import select_layers

__all__ = ["LiveLearningGraph"]


@dataclass
class _LayerTrajectory:
    neurons: np.ndarray  # indices of the recorded neurons
    snapshots: list[np.ndarray]
    steps: list[int]


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
        Only these layers (all Linear/Conv layers by default).
    settings : dict, optional
        Layer name → `topoopt.learning_graphs.MapperSettings` (the default settings otherwise).

    Call ``step(global_step)`` after each optimizer step and ``close()`` at the end (it waits for
    a running build and logs it). ``built`` lists (layer, step, nodes, png path) of the graphs done.
    """

    def __init__(self, model: nn.Module, folder: str | Path, writer=None, every: int = 500, record_every: int = 10,
                 max_neurons: int = 100, max_snapshots: int = 200, layers=None, settings: dict | None = None,
                 seed: int = 0) -> None:
        for name, value in (("every", every), ("record_every", record_every), ("max_neurons", max_neurons)):
            check_positive_int(name, value)
        if isinstance(max_snapshots, bool) or not isinstance(max_snapshots, int) or max_snapshots < 4:
            raise ValueError(f"Invalid max_snapshots: {max_snapshots!r}. It must be an integer ≥ 4")
        self.layers = select_layers(model, layers)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer, self.every, self.record_every = writer, every, record_every
        self.max_snapshots = max_snapshots
        self.settings = dict(settings or {})
        generator = np.random.default_rng(seed)
        self._trajectories = {}
        for name, module in self.layers.items():
            n = neuron_cloud(module).shape[0]
            chosen = np.sort(generator.choice(n, size=min(n, max_neurons), replace=False))
            self._trajectories[name] = _LayerTrajectory(chosen, [], [])
        self._pool: ProcessPoolExecutor | None = None
        self._running: list[tuple[str, int, Future]] = []
        self.built: list[tuple[str, int, int, Path]] = []

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        self._collect()
        if global_step % self.record_every == 0:
            self._record(global_step)
        if global_step > 0 and global_step % self.every == 0 and not self._running:
            self._submit(global_step)

    def _record(self, step: int) -> None:
        for name, module in self.layers.items():
            trajectory = self._trajectories[name]
            cloud = neuron_cloud(module).detach()[torch.as_tensor(trajectory.neurons)]
            trajectory.snapshots.append(cloud.float().cpu().numpy().copy())
            trajectory.steps.append(step)
        if len(trajectory.snapshots) >= self.max_snapshots:  # the memory bound: thin out, record half as often
            for kept in self._trajectories.values():
                kept.snapshots, kept.steps = kept.snapshots[::2], kept.steps[::2]
            self.record_every *= 2

    def _submit(self, step: int) -> None:
        if self._pool is None:
            # spawn, not fork: a forked copy of a process running torch threads can deadlock.
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"),
                                             initializer=_one_thread)
        for name, trajectory in self._trajectories.items():
            if len(trajectory.snapshots) < 2:
                continue
            points = np.concatenate(trajectory.snapshots)
            point_steps = np.repeat(np.asarray(trajectory.steps), len(trajectory.neurons))
            point_neurons = np.tile(trajectory.neurons, len(trajectory.snapshots))
            stem = self.folder / f"{name.replace('.', '_') or 'model'}_step{step}"
            future = self._pool.submit(_build, points, point_steps, point_neurons, self.settings.get(name),
                                       str(stem), f"{name}, step {step}")
            self._running.append((name, step, future))

    def _collect(self, wait: bool = False) -> None:
        still = []
        for name, step, future in self._running:
            if not (wait or future.done()):
                still.append((name, step, future))
                continue
            nodes, png = future.result()
            self.built.append((name, step, nodes, Path(png)))
            if self.writer is not None:
                from PIL import Image

                image = np.asarray(Image.open(png).convert("RGB"))
                self.writer.add_image(f"learning_graph/{name.replace('.', '/') or 'model'}", image, step,
                                      dataformats="HWC")
        self._running = still

    def close(self) -> None:
        self._collect(wait=True)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _one_thread() -> None:
    """The worker: one thread, and a lower priority than training, which it must not slow."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.nice(10)


def _build(points, point_steps, point_neurons, settings, stem: str, title: str) -> tuple[int, str]:
    """In the worker: the Mapper graph, its PNG and its HTML; (number of nodes, PNG path)."""
    torch.set_num_threads(1)
    from topoopt.learning_graphs import MapperSettings, learning_graph

    graph = learning_graph(points, point_steps, point_neurons, settings or MapperSettings())
    graph.save_png(f"{stem}.png", title=title)
    graph.save_html(f"{stem}.html", title=title)
    return graph.graph.number_of_nodes(), f"{stem}.png"
