"""Progress lines for logs: when output is not a terminal (no progress bar), a line at least
every 30 s (one every 15 s, for margin), so that a long run never looks hung in a log file."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

__all__ = ["Heartbeat", "Ticker"]


class Heartbeat:
    """``beat(describe)`` prints ``describe()`` when `interval` seconds have passed since the last
    line; it does nothing on a terminal (the progress bar shows progress there) or when disabled."""

    def __init__(self, enabled: bool = True, interval: float = 15.0, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        is_terminal = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = enabled and not is_terminal
        self.interval = interval
        self._last = time.monotonic()

    def beat(self, describe: Callable[[], str]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            print(describe(), file=self.stream, flush=True)
            self._last = now


class Ticker:
    """A context manager: while its block runs, ``describe()`` is printed every `interval`
    seconds (from a background thread, so a long call that has no steps to beat on is covered);
    nothing on a terminal or when disabled."""

    def __init__(self, describe: Callable[[], str], enabled: bool = True, interval: float = 15.0, stream=None) -> None:
        self._heartbeat = Heartbeat(enabled=enabled, interval=interval, stream=stream)
        self._describe = describe
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._done.wait(self._heartbeat.interval):
            print(self._describe(), file=self._heartbeat.stream, flush=True)

    def __enter__(self) -> "Ticker":
        if self._heartbeat.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
