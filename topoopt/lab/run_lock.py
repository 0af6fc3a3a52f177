"""One run per folder: an exclusive claim on a run folder, held for the run, released on exit.

The claim is a lock file created with ``O_CREAT | O_EXCL`` (atomic on every local file system):
of two runs started together into one folder, exactly one gets it and the other is refused in one
line. The file holds the owner's process id and host; a claim whose process no longer runs on
this host (a killed run) is stale and taken over.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_FILE", "RunFolderBusy", "run_lock"]

LOCK_FILE = ".topoopt.lock"
_UNWRITTEN_GRACE_S = 10.0  # an empty lock file younger than this is a claim being written, not a stale one


class RunFolderBusy(RuntimeError):
    """Another live run holds the folder."""


@contextmanager
def run_lock(run_dir: Path, option: str = "--log-dir") -> Iterator[None]:
    """Claim `run_dir` for this process (creating it if needed) until the block ends. A folder
    this call created is removed again if the run left nothing in it."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{option} {run_dir}: cannot create it ({error.strerror or error})") from None
    path = run_dir / LOCK_FILE
    _claim(path, run_dir, option)
    try:
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        if created:
            try:
                run_dir.rmdir()  # only when empty: a start that failed leaves nothing behind
            except OSError:
                pass


def _claim(path: Path, run_dir: Path, option: str) -> None:
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            if owner is None:  # stale: taken over once
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                continue
            raise RunFolderBusy(f"{option} {run_dir}: another topoopt run ({owner}) is using this folder; wait for "
                                f"it to finish, or choose another {option}") from None
        except OSError as error:
            raise ValueError(f"{option} {run_dir}: cannot write there ({error.strerror or error})") from None
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        return
    raise RunFolderBusy(f"{option} {run_dir}: another run claimed this folder at the same moment; choose another "
                        f"{option}")


def _owner(path: Path) -> str | None:
    """Who holds the claim ("process 123 on host"), or None when it is stale."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None  # released meanwhile
    parts = text.split()
    if len(parts) < 2 or not parts[0].isdigit():
        return "a run starting now" if age < _UNWRITTEN_GRACE_S else None
    pid, host = int(parts[0]), parts[1]
    if host != socket.gethostname():
        return f"process {pid} on {host}"  # another machine's process cannot be checked: never stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return f"process {pid}"
