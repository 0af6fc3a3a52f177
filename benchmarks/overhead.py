"""Training-step overhead of TopoOptimizer and TopoPenalty against the plain optimizer.

Times blocks of 10 steps (so `every=10` pays its measurement once a block) of an MLP at batch
128 on CPU, the variants interleaved block by block, and reports the median time per step and
its ratio to the plain optimizer's, all measured in the same run on the same data.

    python benchmarks/overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from topoopt import TopoOptimizer, TopoPenalty, TreeCache
from topoopt.models import build_mlp

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

    def block():
        for _ in range(10):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            optimizer.step()

    block()  # warm-up
    return block


def per_step_medians(blocks: dict, repeats: int) -> dict:
    """Median seconds per step of each block; variants interleaved so drift hits all alike."""
    times = {name: [] for name in blocks}
    for _ in range(repeats):
        for name, block in blocks.items():
            start = time.perf_counter()
            block()
            times[name].append((time.perf_counter() - start) / 10)
    return {name: statistics.median(values) for name, values in times.items()}


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
    header = f"{'model':<22} {'inner':<5} {'variant':<22} {'ms/step':>8} {'× plain':>8}"
    print(header)
    print("-" * len(header))
    for spec in args.models:
        for inner in INNER:
            blocks = {"plain": make_block(spec, inner, "plain", 1, args.tree_every)}
            for every in (10, 1):
                for variant in ("optimizer", "penalty", "both"):
                    blocks[f"{variant} every={every}"] = make_block(spec, inner, variant, every, args.tree_every)
            medians = per_step_medians(blocks, args.blocks)
            for label, seconds in medians.items():
                print(f"{spec:<22} {inner:<5} {label:<22} {seconds * 1e3:>8.2f} {seconds / medians['plain']:>7.2f}×")
        print()


if __name__ == "__main__":
    main()
