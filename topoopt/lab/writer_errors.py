"""Errors of background writer threads (TensorBoard's event writer), caught instead of printed.

A full disk makes TensorBoard's writer thread raise in the background: Python prints its traceback
to stderr, in the middle of whatever the command prints, and the same error reaches the main thread
only at the next write. Inside `caught_writer_errors`, an `OSError` raised by TensorBoard's writer
thread is kept, not printed, so the command can say it once, in its own one line; any other
thread's error is printed as usual.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["caught_writer_errors"]

# The class of TensorBoard's event-writer thread (tensorboard.summary.writer.event_file_writer),
# which torch.utils.tensorboard's SummaryWriter uses too.
WRITER_THREAD = "_AsyncWriterThread"


@contextmanager
def caught_writer_errors() -> Iterator[list[OSError]]:
    """Within the block, the `OSError`s of TensorBoard's writer threads go into the yielded list
    (any other thread's error is printed as usual)."""
    caught: list[OSError] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == WRITER_THREAD:
            caught.append(args.exc_value)
        else:
            previous(args)

    threading.excepthook = hook
    try:
        yield caught
    finally:
        threading.excepthook = previous
