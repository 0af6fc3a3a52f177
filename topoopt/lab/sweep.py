"""Resumable sweeps over experiment cells: finished cells are skipped on re-run.

Each finished cell appends one JSON line to a results file (flushed and fsynced), so an
interrupted sweep loses at most the cells in flight; a torn or garbled line (not JSON, or not
UTF-8) is ignored on reload, and its cell runs again.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

from topoopt._validation import check_choice, check_positive_int
from topoopt.lab.progress import Heartbeat

# A study's committed copy of its runs.jsonl (see `save_compact`), in the same folder.
COMPACT_RESULTS = "runs_compact.jsonl.gz"

# Where parallel cells run: local processes, or Ray tasks (a local Ray, or the cluster RAY_ADDRESS names).
EXECUTORS = ("process", "ray")

__all__ = ["COMPACT_RESULTS", "EXECUTORS", "claim_folder", "load_compact", "load_results", "restore_from_compact",
           "run_cells", "save_compact"]


def load_results(path: Path) -> dict[str, dict]:
    """Finished cells by id; lines that do not parse (a write cut short, bytes that are not UTF-8)
    are skipped."""
    results: dict[str, dict] = {}
    if not path.exists():
        return results
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and "id" in record:
            results[record["id"]] = record
    return results


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _single_threaded(fn: Callable[[dict], dict], cell: dict) -> dict:
    import torch

    torch.set_num_threads(1)  # N processes on N cores: one BLAS thread each
    return fn(cell)


@contextmanager
def _submitter(executor: str, jobs: int):
    """A function (fn, cell) -> Future that runs `_single_threaded(fn, cell)` on `executor`."""
    if executor == "process":
        pool = ProcessPoolExecutor(max_workers=jobs)
        try:
            yield lambda fn, cell: pool.submit(_single_threaded, fn, cell)
        except BaseException:  # a failed cell, or Ctrl-C: the queued cells are not started
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'topoopt[ray]'") from None
    started = not ray.is_initialized()
    if started and os.environ.get("RAY_ADDRESS"):
        check_ray_address(os.environ["RAY_ADDRESS"])
    if started:  # a cluster named by RAY_ADDRESS brings its own CPUs; a local Ray gets `jobs`
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": jobs}), include_dashboard=False,
                 log_to_driver=False)
    task = ray.remote(num_cpus=1)(_single_threaded)
    try:
        yield lambda fn, cell: task.remote(fn, cell).future()
    finally:
        if started:
            ray.shutdown()


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Refuse a RAY_ADDRESS that is malformed, or where nothing answers, in one line: Ray itself
    retries an unreachable cluster for about 25 s, printing its own log lines."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"Invalid RAY_ADDRESS: {address!r}. It must be host:port, ray://host:port, "
                         f"'auto' or 'local'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise ValueError(f"RAY_ADDRESS={address}: nothing answers at {host}:{port} "
                         f"({error.strerror or error}); start the cluster, or unset RAY_ADDRESS for a local "
                         f"Ray") from None


def run_cells(cells: Sequence[dict], fn: Callable[[dict], dict], results_path: Path, jobs: int = 1,
              progress: bool = True, desc: str = "cells", executor: str = "process") -> list[dict]:
    """Run `fn` on every cell (a dict with a unique "id") not already in `results_path`.

    Returns the results of all cells, in the order of `cells`. With `jobs > 1` the cells run in
    that many processes (`fn` must then be importable at module level); with ``executor="ray"``
    they run as Ray tasks, whatever `jobs` (which sizes a local Ray; a cluster named by
    RAY_ADDRESS brings its own CPUs). Each record is the one a serial run writes, appended as its
    cell ends.
    """
    from tqdm import tqdm

    ids = [cell["id"] for cell in cells]
    if len(set(ids)) != len(ids):
        raise ValueError("cell ids must be unique")
    check_positive_int("jobs", jobs)
    check_choice("executor", executor, EXECUTORS)
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    done = load_results(results_path)
    if results_path.exists() and results_path.stat().st_size:
        with open(results_path, "rb+") as handle:  # end a torn last line so appends start clean
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
    todo = [cell for cell in cells if cell["id"] not in done]
    if progress and len(todo) < len(cells):
        print(f"{desc}: {len(cells) - len(todo)} of {len(cells)} cells already in {results_path}, kept; "
              f"{len(todo)} to run", file=sys.stderr, flush=True)
    heartbeat = Heartbeat(enabled=progress)
    # disable=None: off when not a terminal (a disabled bar does not count: the heartbeat counts `done`)
    with tqdm(total=len(cells), initial=len(cells) - len(todo), desc=desc, disable=None if progress else True) as bar:
        if jobs == 1 and executor == "process":
            for cell in todo:
                record = {**fn(cell), "id": cell["id"]}
                _append(results_path, record)
                done[cell["id"]] = record
                bar.update()
                heartbeat.beat(lambda: f"{desc}: {sum(i in done for i in ids)} of {len(cells)} cells done")
        elif todo:  # no Ray or pool started for a sweep whose cells are all kept
            with _submitter(executor, jobs) as submit:
                futures: dict[Future, dict] = {submit(fn, cell): cell for cell in todo}
                for future in as_completed(futures):
                    cell = futures[future]
                    record = {**future.result(), "id": cell["id"]}
                    _append(results_path, record)
                    done[cell["id"]] = record
                    bar.update()
                    heartbeat.beat(lambda: f"{desc}: {sum(i in done for i in ids)} of {len(cells)} cells done")
    return [done[i] for i in ids]


def claim_folder(out: Path, config: dict, grid: Sequence[str] = ()) -> None:
    """Write `config` as ``out/config.json``, unless the folder holds cells made with other
    settings: a field outside `grid` (the fields that only choose which cells run: seeds,
    datasets, variants...) that differs from the saved config would let those cells be read as
    this run's, so it raises ValueError naming it instead."""
    out = Path(out)
    saved_path = out / "config.json"
    has_cells = (out / "runs.jsonl").exists() or (out / COMPACT_RESULTS).exists()
    now = json.loads(json.dumps(config))  # as it is saved: tuples are lists
    if has_cells and saved_path.exists():
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            saved = {}
        changed = [key for key, value in now.items() if key not in grid and key in saved and saved[key] != value]
        if changed:
            details = ", ".join(f"{key} {saved[key]!r} (now {now[key]!r})" for key in changed)
            raise ValueError(f"--out {out}: its cells were made with {details}; pass another --out, or the same "
                             f"settings")
    out.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(now, indent=2))


def save_compact(records: Sequence[dict], path: Path) -> None:
    """`records` as gzipped JSON lines without spaces: a lossless copy of a results file small
    enough to commit (every number is kept exactly, so an analysis of `load_compact`'s records
    equals that of the originals). The bytes depend only on the records (no time stamp)."""
    import gzip

    text = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
        handle.write(text.encode("utf-8"))


def rounded(value, digits: int = 4):
    """`value` (a record, or any JSON-like value) with every finite float to `digits` significant
    digits: for a lossy committed copy of results whose analysis does not need more."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def load_compact(path: Path) -> list[dict]:
    """The records `save_compact` wrote, in their order."""
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def restore_from_compact(results_path: Path, compact_path: Path) -> None:
    """When `results_path` (a sweep's resume file, not committed) is missing and its compact copy
    exists, write the copy's records back to it, so that `run_cells` skips those cells: a fresh
    clone re-tabulates a committed study without training it again."""
    results_path, compact_path = Path(results_path), Path(compact_path)
    if results_path.exists() or not compact_path.exists():
        return
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with open(results_path, "w") as handle:
        for record in load_compact(compact_path):
            handle.write(json.dumps(record) + "\n")
