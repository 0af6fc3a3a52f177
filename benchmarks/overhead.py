"""Training-step overhead of TopoOptimizer and TopoPenalty against the plain optimizer.

Times blocks of 10 steps (so `every=10` pays its measurement once a block) of an MLP at batch
128 on CPU, the variants interleaved block by block, and reports the median time per step and
its ratio to the plain optimizer's, all measured in the same run on the same data; "paired" is
the median of each block's ratio to the plain block next to it (for a shared machine).

The "floor" variant is the plain step plus only the compiled work an exact penalty and wrapper
cannot avoid, called straight, with no Python between the calls but a loop: on a measuring step
(every `every` steps), per layer one tree search (every `--tree-every` measurements), one
measurement of its edges and one scatter of their gradient, that gradient added to the weight's;
on every step, the wrapper's copy before the inner step and its scaling after it. No cache, no
checks, no metric or policy. The real variants cannot go below it without a faster search or
measurement, or a wrapper without its copy; it shows how much of their cost is anything else.

    python benchmarks/overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from topoopt import TopoOptimizer, TopoPenalty, TreeCache, _native
from topoopt.lab.models import build_mlp
from topoopt.spanning_tree import euclidean_mst_edges

INNER = {"sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), "adam": lambda p: torch.optim.Adam(p, lr=1e-3)}


def make_block(spec: str, inner: str, variant: str, every: int, tree_every: int):
    """A function running 10 training steps of one variant (its own model and optimizer)."""
    torch.manual_seed(0)
    model = build_mlp(spec)
    optimizer = INNER[inner](model.parameters())
    penalty = None
    trees = TreeCache()  # "both" shares it: one tree search per layer and step between the two
    if variant in ("optimizer", "both"):
        optimizer = TopoOptimizer(optimizer, model, policy="calm", every=every, tree_every=tree_every, trees=trees)
    if variant in ("penalty", "both"):
        penalty = TopoPenalty(model, metric="normalized_entropy", weight=1e-3, every=every, tree_every=tree_every,
                              trees=trees)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, int(spec.split(":")[1].split("-")[0]), generator=g)
    y = torch.randint(0, 10, (128,), generator=g)

    floor = _CompiledFloor(model, every, tree_every) if variant == "floor" else None

    def block():
        for _ in range(10):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            if floor is None:
                optimizer.step()
            else:
                floor.before_step()
                optimizer.step()
                floor.after_step()

    block()  # warm-up
    return block


class _CompiledFloor:
    """The compiled calls of an exact every-step penalty and wrapper, and nothing else (see the
    module's docstring); called around a plain optimizer's step."""

    def __init__(self, model: torch.nn.Module, every: int, tree_every: int) -> None:
        self.weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        self.every, self.tree_every, self.steps, self.measurements = every, tree_every, 0, 0
        self.trees = [None] * len(self.weights)
        self.engine = _native.engine
        if self.engine is None:
            raise SystemExit("the floor variant needs the compiled engine (pip install -e . with a C compiler)")
        self.empty = np.empty(0)
        self.buffers = [dict(unit=np.empty((n - 1, d), np.float32), lengths=np.empty(n - 1),
                             grad_of_lengths=np.full(n - 1, 1e-6, np.float32), grad=np.empty((n, d), np.float32),
                             copy=np.empty((n, d), np.float32)) for n, d in (w.shape for w in self.weights)]

    def before_step(self) -> None:
        engine, empty = self.engine, self.empty
        measuring = self.steps % self.every == 0
        for i, (weight, b) in enumerate(zip(self.weights, self.buffers)):
            n, d = weight.shape
            points = weight.detach().numpy()
            b["copy"][...] = points  # the wrapper's copy before the inner step
            if not measuring:
                continue
            if self.measurements % self.tree_every == 0:
                tree = euclidean_mst_edges(weight.detach())
                self.trees[i] = [np.ascontiguousarray(end.numpy(), dtype=np.int64) for end in tree]
            u, v = self.trees[i]
            engine.measure(points, 4, n, d, u, v, b["unit"], b["lengths"], empty.view(np.int64), empty)
            engine.scatter(b["unit"], 4, d, u, v, b["lengths"], b["grad_of_lengths"], empty.view(np.int64),
                           b["grad"], n)
            # the penalty's gradient, accumulated (tiny, so that the floor trains as the others do:
            # clouds that collapse would take the slower search for near pairs)
            weight.grad.add_(torch.from_numpy(b["grad"]))
        self.measurements += measuring
        self.steps += 1

    def after_step(self) -> None:
        self.engine.scale_steps([w.detach().numpy() for w in self.weights], [b["copy"] for b in self.buffers],
                                [0.1] * len(self.weights), True)


def per_step_times(blocks: dict, repeats: int) -> dict:
    """Seconds per step of each block in each repeat; variants interleaved so drift hits all alike."""
    times = {name: [] for name in blocks}
    for _ in range(repeats):
        for name, block in blocks.items():
            start = time.perf_counter()
            block()
            times[name].append((time.perf_counter() - start) / 10)
    return times


def paired_ratio(times: list[float], plain: list[float]) -> float:
    """The median over repeats of a variant's block time over the plain block's of the same
    repeat, seconds apart: on a shared machine, where a block's time swings with the other
    processes, a ratio of medians taken minutes apart can come out below 1."""
    return statistics.median(t / p for t, p in zip(times, plain))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp:784-100-100-10", "mlp:784-1000-1000-10"])
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tree-every", type=int, default=1, help="tree_every of TopoPenalty and TopoOptimizer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128, "
          f"median of {args.blocks} blocks of 10 steps, tree_every={args.tree_every}\n")
    header = f"{'model':<22} {'inner':<5} {'variant':<22} {'ms/step':>8} {'× plain':>8} {'paired':>7}"
    print(header)
    print("-" * len(header))
    for spec in args.models:
        for inner in INNER:
            blocks = {"plain": make_block(spec, inner, "plain", 1, args.tree_every)}
            for every in (10, 1):
                for variant in ("floor", "optimizer", "penalty", "both"):
                    blocks[f"{variant} every={every}"] = make_block(spec, inner, variant, every, args.tree_every)
            times = per_step_times(blocks, args.blocks)
            medians = {name: statistics.median(values) for name, values in times.items()}
            for label, seconds in medians.items():
                print(f"{spec:<22} {inner:<5} {label:<22} {seconds * 1e3:>8.2f} {seconds / medians['plain']:>7.2f}× "
                      f"{paired_ratio(times[label], times['plain']):>6.2f}×")
        print()


if __name__ == "__main__":
    main()
