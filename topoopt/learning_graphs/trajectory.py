"""Recording each layer's neuron cloud during training, to disk, in chunks, resumably.

Layout of a trajectory folder::

    <folder>/<layer>/chunk_000000.npy   (snapshots_in_chunk, N, d) float32
    <folder>/snapshots.jsonl            one line per snapshot: index, step, epoch, accuracy
                                        (and any extra entries passed to `record`)

A chunk is written to a temporary file and renamed, then its snapshots' lines are appended:
a snapshot is on record only once both are durable. Memory is bounded by one chunk per layer.
Reopening the folder continues after the last recorded step; a snapshot at or before it is
skipped, so a resumed run neither loses nor duplicates snapshots (call `flush()` right before
saving a training checkpoint, so that every snapshot up to the checkpoint is on record). A
resumed run that replays steps past its checkpoint recomputes the same snapshots and skips them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from topoopt._validation import UnknownName, check_positive_int
from topoopt.cloud import neuron_cloud
from topoopt.layers import select_layers

__all__ = ["TrajectoryRecorder", "Trajectory", "load_snapshots", "load_trajectory", "recorded_layers"]


def _folder_name(layer: str) -> str:
    return layer.replace(".", "_") or "model"


class TrajectoryRecorder:
    """Call ``record(step, epoch, accuracy)`` after optimizer steps; every ``every``-th step is kept."""

    def __init__(self, model: nn.Module, folder: str | Path, layers: Iterable[str] | None = None,
                 every: int = 1, chunk_size: int = 64) -> None:
        check_positive_int("every", every)
        check_positive_int("chunk_size", chunk_size)
        self.layers = select_layers(model, layers)
        self.folder = Path(folder)
        self.every = every
        self.chunk_size = chunk_size
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob("*/.chunk_*.tmp.npy"):  # left by a kill during a write
            stale.unlink()
        self._meta_path = self.folder / "snapshots.jsonl"
        _drop_torn_line(self._meta_path)
        existing = _read_meta(self._meta_path)
        self.n_recorded = len(existing)
        self.last_step = existing[-1]["step"] if existing else -1
        self._buffer: list[dict] = []
        self._clouds: dict[str, list[np.ndarray]] = {name: [] for name in self.layers}
        manifest = {"layers": {name: _folder_name(name) for name in self.layers}, "every": every}
        (self.folder / "manifest.json").write_text(json.dumps(manifest, indent=2))

    def due(self, step: int, force: bool = False) -> bool:
        """Whether `record(step, ...)` would keep a snapshot (to skip evaluating when it would not)."""
        return step > self.last_step and (force or step % self.every == 0)

    def record(self, step: int, epoch: int = 0, accuracy: float | None = None, force: bool = False,
               extra: dict | None = None) -> bool:
        """Keep a snapshot at `step` if it is due (or `force`) and not already on record; `extra`
        (plain JSON data) is stored in its line of snapshots.jsonl."""
        if not self.due(step, force):
            return False
        with torch.no_grad():
            for name, module in self.layers.items():
                self._clouds[name].append(neuron_cloud(module).detach().float().cpu().numpy().copy())
        self._buffer.append({"index": self.n_recorded + len(self._buffer), "step": int(step), "epoch": int(epoch),
                             "accuracy": None if accuracy is None else float(accuracy), **(extra or {})})
        self.last_step = step
        if len(self._buffer) >= self.chunk_size:
            self.flush()
        return True

    def flush(self) -> None:
        """Write the buffered snapshots as one chunk per layer, then put them on record."""
        if not self._buffer:
            return
        chunk = self._buffer[0]["index"]
        for name, clouds in self._clouds.items():
            layer_dir = self.folder / _folder_name(name)
            layer_dir.mkdir(exist_ok=True)
            target = layer_dir / f"chunk_{chunk:06d}.npy"
            temporary = layer_dir / f".chunk_{chunk:06d}.tmp.npy"
            np.save(temporary, np.stack(clouds))
            os.replace(temporary, target)
            clouds.clear()
        with open(self._meta_path, "a") as handle:
            for line in self._buffer:
                handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.n_recorded += len(self._buffer)
        self._buffer.clear()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "TrajectoryRecorder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _drop_torn_line(path: Path) -> None:
    """Cut a last line that a kill left without its newline, so that appends start clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "rb+") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _read_meta(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for text in path.read_bytes().splitlines():
        try:
            lines.append(json.loads(text.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            break  # a torn last line: that snapshot was not on record
    return lines


def load_snapshots(folder: str | Path) -> list[dict]:
    """The snapshots on record, one dict each: index, step, epoch, accuracy and any extras."""
    return _read_meta(Path(folder) / "snapshots.jsonl")


@dataclass(frozen=True)
class Trajectory:
    """A layer's recorded clouds, flattened: point i is neuron `neuron[i]` at snapshot `snapshot[i]`."""

    points: np.ndarray      # (snapshots·N) × d
    snapshot: np.ndarray    # (snapshots·N,) snapshot index of each point
    neuron: np.ndarray      # (snapshots·N,) neuron index of each point
    steps: np.ndarray       # (snapshots,) training step of each snapshot
    epochs: np.ndarray
    accuracy: np.ndarray    # NaN where not recorded

    @property
    def n_snapshots(self) -> int:
        return len(self.steps)

    @property
    def n_neurons(self) -> int:
        return int(self.neuron.max()) + 1 if len(self.neuron) else 0

    def point_steps(self) -> np.ndarray:
        return self.steps[self.snapshot]

    def clouds(self) -> np.ndarray:
        """snapshots × N × d."""
        return self.points.reshape(self.n_snapshots, self.n_neurons, -1)


def recorded_layers(folder: str | Path) -> list[str]:
    return list(json.loads((Path(folder) / "manifest.json").read_text())["layers"])


def load_trajectory(folder: str | Path, layer: str) -> Trajectory:
    """Load one layer's trajectory; only snapshots on record (in snapshots.jsonl) are returned."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if layer not in manifest["layers"]:
        raise UnknownName(f"Layer {layer!r} was not recorded. Recorded layers: {list(manifest['layers'])}")
    meta = _read_meta(folder / "snapshots.jsonl")
    layer_dir = folder / manifest["layers"][layer]
    chunks = sorted(layer_dir.glob("chunk_*.npy"))
    clouds = np.concatenate([np.load(chunk) for chunk in chunks])[: len(meta)] if chunks else np.empty((0, 0, 0))
    n_snapshots, n_neurons = clouds.shape[0], clouds.shape[1] if clouds.ndim == 3 else 0
    return Trajectory(
        points=clouds.reshape(n_snapshots * n_neurons, -1),
        snapshot=np.repeat(np.arange(n_snapshots), n_neurons),
        neuron=np.tile(np.arange(n_neurons), n_snapshots),
        steps=np.array([m["step"] for m in meta[:n_snapshots]]),
        epochs=np.array([m["epoch"] for m in meta[:n_snapshots]]),
        accuracy=np.array([np.nan if m["accuracy"] is None else m["accuracy"] for m in meta[:n_snapshots]]),
    )
