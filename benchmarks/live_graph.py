"""How much a live learning graph slows training (target: at most 5% at K = 500).

784-100-100-10 on mnist5k, SGD lr 0.05, batch 100, one training thread; every variant logs
topology with TopologyMonitor(every=10). "live" adds LiveLearningGraph(every=500), whose Mapper
builds run in a worker process. Variants alternate, median of the repeats.

Two clocks: wall time, and the training thread's own CPU time (`time.thread_time`): on a machine
with a free core the worker does not compete and the wall-time slowdown is the CPU-time one; on
a busy machine (every core taken) wall time also counts the worker's builds and the other
processes, and only the CPU-time ratio still isolates what the live graph adds to each step.
"in step()" is the training thread's CPU time inside `LiveLearningGraph.step` alone (the direct
cost, free of the run-to-run noise of the whole loop), and "setup" the CPU time of constructing it.

    OMP_NUM_THREADS=1 python benchmarks/live_graph.py --steps 3000 --repeats 5

`--decompose` measures the slowdown inside one long live run instead of between runs (whose
ratios this machine's drift spreads from 0.75 to 1.40): every step's duration is classed by
whether a build was running in the worker (`LiveLearningGraph.build_intervals`), and

    slowdown = step()'s share of the time  +  (all steps' mean duration / idle steps' mean − 1)

where the second term is what the worker's builds cost the training thread by running beside
it (the busy share of the steps times how much slower a busy step is). Busy and idle stretches
alternate every few seconds, so drift hits both alike; the interval is a bootstrap over build
cycles (each build with the idle stretch before it).

    OMP_NUM_THREADS=1 python benchmarks/live_graph.py --decompose --steps 300000   # worker_share 0.25

Without a limit (`--worker-share none`) the worker is busy almost all the time and the few idle
steps are not typical ones, so the decomposition needs the limit; compare plain and live runs
(the default mode) there.
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from topoopt.lab.data import load_dataset
from topoopt.lab.models import build_mlp
from topoopt.live_graph import LiveLearningGraph
from topoopt.monitor import TopologyMonitor


def run(steps: int, live: bool, data, folder: str, bound: dict | None = None,
        worker_share: float | None = 0.25) -> tuple[float, float, float, float]:
    torch.manual_seed(0)
    model = build_mlp("mlp:784-100-100-10", activation="sigmoid")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = TopologyMonitor(model, log_dir=f"{folder}/events", every=10)
    setup = time.thread_time()
    graph = LiveLearningGraph(model, f"{folder}/graphs", writer=monitor.writer, every=500, worker_share=worker_share,
                              **(bound or {})) if live else None
    setup = time.thread_time() - setup
    generator = torch.Generator().manual_seed(0)
    in_step = 0.0
    started, started_cpu = time.perf_counter(), time.thread_time()
    for step in range(steps):
        batch = torch.randint(0, len(data.x_train), (100,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
        optimizer.step()
        monitor.step(step)
        if graph is not None:
            before = time.thread_time()
            graph.step(step)
            in_step += time.thread_time() - before
    seconds = time.perf_counter() - started  # training time; the last build finishes after
    cpu = time.thread_time() - started_cpu
    if graph is not None:
        graph.close()
        print(f"  live: {len(graph.built)} graphs built during {steps} steps")
    monitor.close()
    return seconds, cpu, in_step, setup


def decompose(steps: int, data, folder: str, worker_share: float | None, seed: int = 0) -> None:
    """One live run, every step timed and classed busy or idle; see the module docstring."""
    torch.manual_seed(0)
    model = build_mlp("mlp:784-100-100-10", activation="sigmoid")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = TopologyMonitor(model, log_dir=f"{folder}/events", every=10)
    graph = LiveLearningGraph(model, f"{folder}/graphs", writer=monitor.writer, every=500, worker_share=worker_share)
    generator = torch.Generator().manual_seed(seed)
    starts, ends, live = np.empty(steps), np.empty(steps), np.empty(steps)
    in_step = 0.0
    for step in range(steps):
        starts[step] = time.monotonic()
        batch = torch.randint(0, len(data.x_train), (100,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
        optimizer.step()
        monitor.step(step)
        before, before_wall = time.thread_time(), time.monotonic()
        graph.step(step)
        in_step += time.thread_time() - before
        ends[step] = time.monotonic()
        live[step] = ends[step] - before_wall
    graph.close()
    monitor.close()
    intervals = sorted((start, end) for _, start, end in graph.build_intervals)
    durations = ends - starts - live  # the training step alone; step()'s own cost is counted apart
    busy = np.zeros(steps, dtype=bool)
    for start, end in intervals:  # a step overlapping a build is busy
        busy[(ends > start) & (starts < end)] = True
    # build cycles: each build's start opens a cycle holding it and the idle stretch after it
    cycle = np.array([bisect.bisect_right([start for start, _ in intervals], t) for t in starts])
    rng = np.random.default_rng(0)
    cycles = np.unique(cycle)

    def contention(chosen: np.ndarray) -> float:
        mask = np.isin(cycle, chosen)
        idle = durations[mask & ~busy]
        return durations[mask].mean() / idle.mean() - 1

    point = contention(cycles)
    draws = [contention(rng.choice(cycles, size=len(cycles))) for _ in range(2000)]
    low, high = np.percentile(draws, [2.5, 97.5])
    built = sum(end - start for start, end in intervals)
    wall = ends[-1] - starts[0]
    print(f"worker_share={worker_share}: {steps} steps in {wall:.1f} s, {len(intervals)} builds "
          f"({built:.1f} s, {100 * built / wall:.0f}% of the time), {graph.skipped_builds} builds skipped, "
          f"{100 * busy.mean():.0f}% of the steps busy")
    print(f"  mean step: idle {1e3 * durations[~busy].mean():.3f} ms, busy {1e3 * durations[busy].mean():.3f} ms "
          f"({100 * (durations[busy].mean() / durations[~busy].mean() - 1):+.1f}%)")
    print(f"  contention: {100 * point:+.2f}% (95% bootstrap over {len(cycles)} build cycles: "
          f"{100 * low:+.2f}% to {100 * high:+.2f}%)")
    direct = live.sum() / durations.sum()
    print(f"  in step(): {live.sum():.3f} s wall ({in_step:.3f} s CPU), {100 * direct:.2f}% of the training steps' "
          f"time")
    print(f"  slowdown = {100 * (point + direct):+.2f}% (upper end {100 * (high + direct):+.2f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-snapshots", type=int, default=None, help="LiveLearningGraph's bound (default its own)")
    parser.add_argument("--max-neurons", type=int, default=None, help="LiveLearningGraph's bound (default its own)")
    parser.add_argument("--decompose", action="store_true", help="one long run, the slowdown decomposed (see above)")
    parser.add_argument("--worker-share", type=lambda text: None if text == "none" else float(text), default=0.25,
                        help="LiveLearningGraph's worker_share (default 0.25, its own; 'none': no limit)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.decompose:
        with tempfile.TemporaryDirectory() as folder:
            decompose(args.steps, load_dataset("mnist5k"), folder, args.worker_share)
        return
    bound = {k: v for k, v in (("max_snapshots", args.max_snapshots), ("max_neurons", args.max_neurons))
             if v is not None}
    data = load_dataset("mnist5k")
    times = {"plain": [], "live": []}
    cpu = {"plain": [], "live": []}
    direct = []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for variant in ("plain", "live"):
                wall, thread, in_step, setup = run(args.steps, variant == "live", data, f"{folder}/{variant}{repeat}",
                                                   bound, args.worker_share)
                times[variant].append(wall)
                cpu[variant].append(thread)
                extra = f", {in_step:.3f} s in step(), {setup:.3f} s setup" if variant == "live" else ""
                if variant == "live":
                    direct.append(in_step)
                print(f"{variant} {repeat}: {wall:.2f} s wall, {thread:.2f} s training-thread CPU{extra}")
    plain, live = statistics.median(times["plain"]), statistics.median(times["live"])
    print(f"median wall: plain {plain:.2f} s, live {live:.2f} s, slowdown {100 * (live / plain - 1):+.1f}%")
    # each repeat's pair ran back to back: its ratio is immune to the machine's drift between repeats
    ratios = sorted(b / a for a, b in zip(times["plain"], times["live"]))
    print(f"paired wall ratios live/plain: median {statistics.median(ratios):.3f}, "
          f"quartiles {ratios[len(ratios) // 4]:.3f}–{ratios[(3 * len(ratios)) // 4]:.3f}, n = {len(ratios)}")
    plain, live = statistics.median(cpu["plain"]), statistics.median(cpu["live"])
    print(f"median training-thread CPU: plain {plain:.2f} s, live {live:.2f} s, "
          f"slowdown {100 * (live / plain - 1):+.1f}%")
    print(f"median training-thread CPU in LiveLearningGraph.step: {statistics.median(direct):.3f} s, "
          f"{100 * statistics.median(direct) / plain:.1f}% of the plain run's")


if __name__ == "__main__":
    main()
