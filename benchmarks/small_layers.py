"""Small layers: `h0_deaths` forward + backward against the float32 Gram product of the same cloud.

The target: at N = 100, d = 784, forward + backward within 2.5× the Gram product
``x @ x.T`` (torch, the caller's thread count). Each repeat times, back to back and in turn:
the Gram product, topoopt with its compiled engine, and topoopt without it (the numpy/torch
path a machine without a C compiler takes), so drift hits all three alike; the table gives
medians and the median of the per-repeat ratios. For a cloud the compiled search takes (N ≤ 256),
"floor" is the three compiled calls alone (tree, sorted edge measurement, scatter of a gradient),
with no checks, no autograd and no Python between them: what topoopt cannot go below with this
engine. Its difference from topoopt is Python and autograd.

The cloud is a leaf reused across repeats whose ``.grad`` is reset before each backward, as
in training after ``zero_grad()`` (no clone inside the timing, unlike benchmarks/h0.py).

    python benchmarks/small_layers.py                       # quiet, the default 2 threads
    python benchmarks/small_layers.py --threads 1
    python benchmarks/small_layers.py --contended           # two busy processes beside it
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import topoopt
from topoopt import _native
from topoopt.gram import EXACT_PAIRS_PER_POINT, NEAR_PAIR_RATIO
from topoopt.spanning_tree import BLOCK_ROWS

SHAPES = [(100, 784), (100, 100), (10, 100), (256, 784), (1000, 784)]


def _timer(fn, inner: int):
    def run() -> float:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start) / inner
    return run


def _h0(cloud: torch.Tensor, compiled: bool):
    engine = _native.engine

    def run():
        _native.engine = engine if compiled else None
        try:
            cloud.grad = None
            topoopt.h0_deaths(cloud).sum().backward()
        finally:
            _native.engine = engine
    return run


def _floor(x: torch.Tensor):
    """The compiled calls of a small cloud's forward + backward, called straight."""
    engine, n, d = _native.engine, *x.shape
    points, scratch, edges = x.numpy(), np.empty((n, n), np.float32), np.empty((2, n - 1), np.int64)
    unit, lengths = np.empty((n - 1, d), np.float32), np.empty(n - 1)
    order, result, gradient = np.empty(n - 1, np.int64), np.empty(n - 1, np.float32), np.empty((n, d), np.float32)
    ones = np.ones(n - 1, np.float32)

    def run():
        engine.small_tree(points, n, d, NEAR_PAIR_RATIO, EXACT_PAIRS_PER_POINT * n, scratch, edges[0], edges[1])
        engine.measure(points, 4, n, d, edges[0], edges[1], unit, lengths, order, result)
        engine.scatter(unit, 4, d, edges[0], edges[1], lengths, ones, order, gradient, n)
    return run


def measure(n: int, d: int, repeats: int) -> dict[str, float]:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d)) / d**0.5
    cloud = x.clone().requires_grad_(True)
    inner = max(1, int(2e7 // (2 * n * n * d)))  # about 10 ms of Gram products per timing
    variants = {"gram": _timer(lambda: x @ x.T, inner), "compiled": _timer(_h0(cloud, True), inner)}
    if _native.engine is not None:
        variants["fallback"] = _timer(_h0(cloud, False), inner)
        if 2 < n <= BLOCK_ROWS:
            variants["floor"] = _timer(_floor(x), inner)
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            times[name].append(run())
    result = {name: statistics.median(values) for name, values in times.items()}
    for name in variants:
        if name != "gram":
            result[f"{name} ratio"] = statistics.median(t / g for t, g in zip(times[name], times["gram"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--contended", action="store_true", help="run two busy processes beside the timing")
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{d}" for n, d in SHAPES])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 if args.contended else 0)]
    try:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{'two busy processes beside it' if busy else 'no other load started'}, "
              f"compiled engine {'built' if _native.engine is not None else 'NOT built'}; "
              f"medians of {args.repeats} repeats\n")
        print(f"{'N×d':>9} {'Gram ms':>8} {'topoopt ms':>11} {'× Gram':>7} {'without engine ms':>18} {'× Gram':>7} "
              f"{'floor ms':>9} {'× Gram':>7}")
        for shape in args.shapes:
            n, d = (int(part) for part in shape.split("x"))
            r = measure(n, d, args.repeats)
            fallback = (f"{r['fallback'] * 1e3:>18.3f} {r['fallback ratio']:>6.2f}×" if "fallback" in r
                        else f"{'-':>18} {'-':>7}")
            floor = (f"{r['floor'] * 1e3:>9.3f} {r['floor ratio']:>6.2f}×" if "floor" in r else f"{'-':>9} {'-':>7}")
            print(f"{shape:>9} {r['gram'] * 1e3:>8.3f} {r['compiled'] * 1e3:>11.3f} {r['compiled ratio']:>6.2f}× "
                  f"{fallback} {floor}", flush=True)
    finally:
        for process in busy:
            process.kill()


if __name__ == "__main__":
    main()
