"""What `MergePenalty` costs in training time: one epoch of the merging study's MLP (784-128-128-10,
mnist5k, Adam, batch 128) and of its CNN (Fashion-MNIST), plain against with the penalty on the
hidden layers, alternating, median of the ratios measured in the same run.

    python benchmarks/merge_penalty.py --repeats 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from topoopt.lab.studies.failure_suite import suite_data
from topoopt.lab.studies.merging import DATA, HIDDEN, build, train
from topoopt.merging import MergePenalty


def epoch_seconds(model_name: str, data, penalised: bool) -> float:
    torch.manual_seed(0)
    model = build(model_name)
    penalty = MergePenalty(model, keep=0.5, weight=1e-2, layers=list(HIDDEN[model_name])) if penalised else None
    started = time.perf_counter()
    train(model, data, 1, 0, penalty)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | plain epoch (s, median) | with MergePenalty (s, median) | ratio (median of pairs) |")
    print("|---|---:|---:|---:|")
    for model_name in ("mlp", "cnn"):
        data = suite_data(DATA[model_name])
        epoch_seconds(model_name, data, True)  # warm-up
        plain, penalised = [], []
        for _ in range(args.repeats):
            plain.append(epoch_seconds(model_name, data, False))
            penalised.append(epoch_seconds(model_name, data, True))
        ratios = np.array(penalised) / np.array(plain)
        print(f"| {model_name} | {np.median(plain):.2f} | {np.median(penalised):.2f} | {np.median(ratios):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
