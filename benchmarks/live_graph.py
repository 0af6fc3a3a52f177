"""How much a live learning graph slows training (issue #14's target: at most 5% at K = 500).

784-100-100-10 on mnist5k, SGD lr 0.05, batch 100, one training thread; every variant logs
topology with TopologyMonitor(every=10). "live" adds LiveLearningGraph(every=500), whose Mapper
builds run in a worker process. Variants alternate, median of the repeats.

Two clocks: wall time, and the training thread's own CPU time (`time.thread_time`): on a machine
with a free core the worker does not compete and the wall-time slowdown is the CPU-time one; on
a busy machine (every core taken) wall time also counts the worker's builds and the other
processes, and only the CPU-time ratio still isolates what the live graph adds to each step.

    python benchmarks/live_graph.py --steps 3000 --repeats 3
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


def run(steps: int, live: bool, data, folder: str) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_mlp("mlp:784-100-100-10", activation="sigmoid")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = TopologyMonitor(model, log_dir=f"{folder}/events", every=10)
    graph = LiveLearningGraph(model, f"{folder}/graphs", writer=monitor.writer, every=500) if live else None
    generator = torch.Generator().manual_seed(0)
    started, started_cpu = time.perf_counter(), time.thread_time()
    for step in range(steps):
        batch = torch.randint(0, len(data.x_train), (100,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
        optimizer.step()
        monitor.step(step)
        if graph is not None:
            graph.step(step)
    seconds = time.perf_counter() - started  # training time; the last build finishes after
    cpu = time.thread_time() - started_cpu
    if graph is not None:
        graph.close()
        print(f"  live: {len(graph.built)} graphs built during {steps} steps")
    monitor.close()
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist5k")
    times = {"plain": [], "live": []}
    cpu = {"plain": [], "live": []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for variant in ("plain", "live"):
                wall, thread = run(args.steps, variant == "live", data, f"{folder}/{variant}{repeat}")
                times[variant].append(wall)
                cpu[variant].append(thread)
                print(f"{variant} {repeat}: {wall:.2f} s wall, {thread:.2f} s training-thread CPU")
    plain, live = statistics.median(times["plain"]), statistics.median(times["live"])
    print(f"median wall: plain {plain:.2f} s, live {live:.2f} s, slowdown {100 * (live / plain - 1):+.1f}%")
    plain, live = statistics.median(cpu["plain"]), statistics.median(cpu["live"])
    print(f"median training-thread CPU: plain {plain:.2f} s, live {live:.2f} s, "
          f"slowdown {100 * (live / plain - 1):+.1f}%")


if __name__ == "__main__":
    main()
