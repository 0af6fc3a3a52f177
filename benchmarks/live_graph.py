"""How much a live learning graph slows training (issue #14's target: at most 5% at K = 500).

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
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from topoopt.data import load_dataset
from topoopt.live_graph import LiveLearningGraph
from topoopt.models import build_mlp
from topoopt.monitor import TopologyMonitor


def run(steps: int, live: bool, data, folder: str, bound: dict | None = None) -> tuple[float, float, float, float]:
    torch.manual_seed(0)
    model = build_mlp("mlp:784-100-100-10", activation="sigmoid")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = TopologyMonitor(model, log_dir=f"{folder}/events", every=10)
    setup = time.thread_time()
    graph = LiveLearningGraph(model, f"{folder}/graphs", writer=monitor.writer, every=500,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-snapshots", type=int, default=None, help="LiveLearningGraph's bound (default its own)")
    parser.add_argument("--max-neurons", type=int, default=None, help="LiveLearningGraph's bound (default its own)")
    args = parser.parse_args()
    torch.set_num_threads(1)
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
                                                 bound)
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
