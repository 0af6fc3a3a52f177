"""Stalls under contention: whole processes whose `h0_deaths` calls all run ~5× slow.

Beside two busy processes (on this project's 2-core machine, every core taken), each of
`--processes` fresh Python processes times `--calls` forward + backward passes of `h0_deaths`
on one N×d cloud at the default 2 threads and reports its median and slowest call. A stall shows
as a process whose median is several times the others' (OpenMP threads spinning at barriers for
a descheduled sibling did this: 3 processes in 10 at N = 1000, ~310 ms against 32–65 ms).
With ``--against PATH`` the processes alternate between this checkout and another one (a git
worktree with its own build), so that both meet the same load.

    python benchmarks/stalls.py                                  # N = 1000, 10 processes
    python benchmarks/stalls.py --against /tmp/old_checkout --processes 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

_ONE_PROCESS = """
import json, sys, time, torch
import topoopt
n, d, calls = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
x = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) / d ** 0.5
cloud = x.clone().requires_grad_(True)
times = []
for _ in range(calls + 1):  # the first call warms up
    start = time.perf_counter()
    cloud.grad = None
    topoopt.h0_deaths(cloud).sum().backward()
    times.append(time.perf_counter() - start)
print(json.dumps({"file": topoopt.__file__, "times": times[1:]}))
"""


def one_process(checkout: Path, n: int, d: int, calls: int) -> dict:
    environment = dict(os.environ, PYTHONPATH=str(checkout))
    output = subprocess.run([sys.executable, "-c", _ONE_PROCESS, str(n), str(d), str(calls)], env=environment,
                            capture_output=True, text=True, check=True, cwd=checkout).stdout
    result = json.loads(output.strip().splitlines()[-1])
    if not result["file"].startswith(str(checkout)):
        raise SystemExit(f"{checkout} imported topoopt from {result['file']}: give a checkout with its own build")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--processes", type=int, default=10, help="fresh processes per checkout")
    parser.add_argument("--against", type=Path, help="another checkout, run alternately with this one")
    parser.add_argument("--stall-ms", type=float, default=150.0, help="a call slower than this counts as stalled")
    args = parser.parse_args()
    checkouts = {"this checkout": HERE}
    if args.against is not None:
        checkouts["against"] = args.against.resolve()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    results: dict[str, list[list[float]]] = {name: [] for name in checkouts}
    try:
        for round_ in range(args.processes):
            for name, checkout in checkouts.items():
                times = one_process(checkout, args.n, args.dim, args.calls)["times"]
                results[name].append(times)
                print(f"{name:<14} process {round_ + 1:>2}: median {statistics.median(times) * 1e3:7.1f} ms, "
                      f"slowest {max(times) * 1e3:7.1f} ms", flush=True)
    finally:
        for process in busy:
            process.kill()
    print(f"\nN = {args.n}, d = {args.dim}, two busy processes; a call over {args.stall_ms:.0f} ms counts as slow")
    for name, runs in results.items():
        medians = sorted(statistics.median(times) * 1e3 for times in runs)
        slow_calls = sum(t * 1e3 > args.stall_ms for times in runs for t in times)
        stalled = sum(m > args.stall_ms for m in medians)
        print(f"{name:<14} processes with a median over {args.stall_ms:.0f} ms: {stalled} of {len(runs)}; "
              f"medians {medians[0]:.0f}–{medians[-1]:.0f} ms; slow calls {slow_calls} of "
              f"{sum(len(times) for times in runs)}; slowest {max(max(t) for t in runs) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
