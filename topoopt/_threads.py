"""The engine's thread policy: one thread for its many small operations, the caller's for big
matrix products.

Measured on this project's 2-core machine (benchmarks/RESULTS.md, "Under contention"): with one
other busy process, torch's default 2 OpenMP threads made `h0_deaths` at N = 100 take 456 ms
instead of 1.7 ms with 1 thread. Each parallel region ends at a barrier where a thread spins
waiting for a sibling that the OS has descheduled; an engine of many small operations pays that
wait many times. A big matrix product has few barriers, so it keeps the caller's threads (it is
2× faster with 2 threads on a quiet machine and no slower under contention).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["engine_threads", "caller_threads", "PARALLEL_MIN_FLOPS", "PARALLEL_MIN_ELEMENTS"]

# A product smaller than this (about 1 ms on one core here) runs on the engine's single thread.
PARALLEL_MIN_FLOPS = 1e8
# Elementwise work on fewer elements than this (a 1000×784 cloud has 0.8 M) stays single-threaded;
# on a quiet machine, a 4096×784 cloud's block arithmetic and backward ran 31% slower on one thread.
PARALLEL_MIN_ELEMENTS = 2_000_000

_state = threading.local()


@contextmanager
def engine_threads() -> Iterator[None]:
    """Run the block with one intra-op thread, restoring the caller's count afterwards.

    Nested use is free. torch's thread count is process wide: another Python thread running
    torch ops during the block also runs single-threaded for that time.
    """
    if getattr(_state, "caller", None) is not None:
        yield
        return
    caller = torch.get_num_threads()
    _state.caller = caller
    if caller > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if caller > 1:
            torch.set_num_threads(caller)
        _state.caller = None


@contextmanager
def caller_threads(flops: float = 0.0, elements: int = 0) -> Iterator[None]:
    """Inside `engine_threads`, give big work back the caller's threads: a product of at least
    `PARALLEL_MIN_FLOPS`, or elementwise work on at least `PARALLEL_MIN_ELEMENTS` elements."""
    caller = getattr(_state, "caller", None)
    big = flops >= PARALLEL_MIN_FLOPS or elements >= PARALLEL_MIN_ELEMENTS
    if caller is None or caller == 1 or not big:
        yield
        return
    torch.set_num_threads(caller)
    try:
        yield
    finally:
        torch.set_num_threads(1)
