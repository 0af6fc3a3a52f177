"""One run per folder: an exclusive claim on a run folder, held for the run, released on exit.

The claim is an advisory lock (``flock``) on a lock file in the folder: the kernel grants it to
one process at a time and releases it when that process ends, however it ends, so of two runs
started together into one folder exactly one gets it, and a killed run's claim is gone with it.
The file also holds the owner's process id, for the message a refused run prints. Where
``flock`` does not exist (Windows), the file is created with ``O_EXCL`` instead, and a claim whose
process no longer runs is taken over.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["LOCK_FILE", "RunFolderBusy", "run_lock"]

LOCK_FILE = ".topoopt.lock"


class RunFolderBusy(RuntimeError):
    """Another live run holds the folder."""


@contextmanager
def run_lock(run_dir: Path, option: str = "--log-dir") -> Iterator[None]:
    """Claim `run_dir` for this process (creating it if needed) until the block ends. A folder
    this call created, or found empty, is removed again if the run left nothing in it (of two
    starts racing into a new folder, the one that created it may be the one refused)."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{option} {run_dir}: cannot create it ({error.strerror or error})") from None
    path = run_dir / LOCK_FILE
    release = _claim(path, run_dir, option) if fcntl is not None else _claim_exclusively(path, run_dir, option)
    created = created or all(entry.name == LOCK_FILE for entry in run_dir.iterdir())
    try:
        yield
    finally:
        release()
        if created:
            try:
                run_dir.rmdir()  # only when empty: a start that failed leaves nothing behind
            except OSError:
                pass


def _busy(path: Path, run_dir: Path, option: str) -> RunFolderBusy:
    try:
        owner = path.read_text().split()
    except OSError:
        owner = []
    who = f"process {owner[0]}" if owner and owner[0].isdigit() else "another process"
    return RunFolderBusy(f"{option} {run_dir}: another topoopt run ({who}) is using this folder; wait for it to "
                         f"finish, or choose another {option}")


def _claim(path: Path, run_dir: Path, option: str):
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as error:
        raise ValueError(f"{option} {run_dir}: cannot write there ({error.strerror or error})") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise _busy(path, run_dir, option) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def release() -> None:
        try:  # unlinked while still held, so nobody can lock this file after us
            path.unlink()
        except OSError:
            pass
        os.close(descriptor)

    return release


def _claim_exclusively(path: Path, run_dir: Path, option: str):
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _alive(path):
                raise _busy(path, run_dir, option) from None
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        except OSError as error:
            raise ValueError(f"{option} {run_dir}: cannot write there ({error.strerror or error})") from None
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        return lambda: path.unlink(missing_ok=True)
    raise RunFolderBusy(f"{option} {run_dir}: another run claimed this folder at the same moment; choose another "
                        f"{option}")


def _alive(path: Path) -> bool:
    try:
        parts = path.read_text().split()
    except FileNotFoundError:
        return False
    if len(parts) < 2 or not parts[0].isdigit():
        return True  # being written now
    try:
        os.kill(int(parts[0]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
