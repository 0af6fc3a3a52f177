"""Every layer of a model at once (`topoopt.tree_cache.measure_layers`) against a loop of
`measure_layer` calls: forward + backward of the sum of each layer's normalized entropy, the
weights moved before every repeat (so every tree is searched again, as in an exact
`TopoPenalty` step). Both variants alternate repeat by repeat in the same run; medians.

    OMP_NUM_THREADS=1 python benchmarks/all_layers.py
    python benchmarks/all_layers.py --models mlp:784-100-100-10 --repeats 300

The load average (`os.getloadavg`) is printed before and after: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from topoopt import TreeCache, normalized_persistent_entropy
from topoopt.lab.models import build_mlp
from topoopt.layers import select_layers
from topoopt.tree_cache import measure_layer, measure_layers

DEFAULT_MODELS = ["mlp:784-100-100-10", "mlp:64-" + "-".join(["32"] * 16) + "-10"]


def _step(model: torch.nn.Module, layers: dict, trees: TreeCache, together: bool) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1e-4)
    if together:
        deaths = measure_layers(trees, layers).values()
    else:
        deaths = [measure_layer(trees, name, module) for name, module in layers.items()]
    total = sum(normalized_persistent_entropy(d) for d in deaths if d is not None and d.numel())
    total.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average before "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'model':<40} {'layers':>6} | {'loop ms':>8} | {'together ms':>11} | {'loop ÷ together':>15}")
    for spec in args.models:
        torch.manual_seed(0)
        model = build_mlp(spec)
        layers = select_layers(model, None)
        trees = {True: TreeCache(), False: TreeCache()}
        times = {True: [], False: []}
        for repeat in range(args.repeats + 5):
            for together in (repeat % 2 == 0, repeat % 2 == 1):
                start = time.perf_counter()
                _step(model, layers, trees[together], together)
                if repeat >= 5:  # warm-up
                    times[together].append(time.perf_counter() - start)
        loop, batched = (1e3 * statistics.median(times[k]) for k in (False, True))
        print(f"{spec[:40]:<40} {len(layers):>6} | {loop:>8.3f} | {batched:>11.3f} | {loop / batched:>14.2f}×")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
