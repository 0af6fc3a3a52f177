"""Wall time of a study sweep run serially and with `--jobs 2` (local processes, and Ray tasks).

Real cells: the sparse-network study's quick grid (digits, `--epochs` epochs each). Every variant
starts from an empty results file; the serial run uses one BLAS thread, as each parallel cell
does. Variants alternate for `--rounds` rounds; the table gives each round's wall seconds and
the medians' ratio to the serial run. Ray's time includes starting and stopping a local Ray.

    python benchmarks/sweep.py                      # 8 cells of ~4 s, 3 rounds (~4 min)
    python benchmarks/sweep.py --busy 2 --rounds 1 --cells 4 --epochs 100   # under contention
    python benchmarks/sweep.py --cells 12 --rounds 2 --epochs 50
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from topoopt.lab.studies import sparse_topologies
from topoopt.lab.sweep import run_cells

VARIANTS = {"serial": {"jobs": 1}, "processes, --jobs 2": {"jobs": 2},
            "ray, --jobs 2": {"jobs": 2, "executor": "ray"}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--busy", type=int, default=0, help="busy processes running beside the sweeps")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        return _rounds(args)
    finally:
        for process in busy:
            process.kill()


def _rounds(args: argparse.Namespace) -> dict:
    config = sparse_topologies.StudyConfig.quick()
    config.epochs = args.epochs
    cells, _ = sparse_topologies.make_cells(config, sparse_topologies.load_permuted(config.dataset).n_features)
    cells = cells[:args.cells]
    torch.set_num_threads(1)
    seconds: dict[str, list[float]] = {name: [] for name in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            options = VARIANTS[name]
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                run_cells(cells, sparse_topologies.run_cell, Path(folder) / "runs.jsonl", progress=False, **options)
                seconds[name].append(time.perf_counter() - start)
    serial = statistics.median(seconds["serial"]) if "serial" in seconds else math.nan
    print(f"{len(cells)} cells, {args.epochs} epochs each, {args.rounds} rounds, {args.busy} busy processes beside")
    print("| variant | wall seconds per round | median / serial |")
    print("|---|---|---:|")
    for name, values in seconds.items():
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.median(values) / serial:.2f}× |")
    return seconds


if __name__ == "__main__":
    main()
