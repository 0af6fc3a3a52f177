"""Peak memory of the device search (`topoopt.device_tree`) against its budget
(`device_tree_bytes`), for a spread cloud, two far clusters and one far cluster of almost every
point: on CPU tensors by default (torch's profiler follows every allocation), on CUDA with --cuda
(torch's own peak counter).

    python benchmarks/device_memory.py                 # N = 8192, d = 64, CPU emulation
    python benchmarks/device_memory.py --sizes 4096 8192 --cuda
"""

from __future__ import annotations

import argparse

import torch

from topoopt.device_tree import device_tree, device_tree_bytes


def cloud(kind: str, n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "spread":
        return torch.randn(n, d, generator=generator)
    if kind == "two clusters":
        half = n // 2
        return torch.cat([torch.randn(half, d, generator=generator) * 1e-4 + 100,
                          torch.randn(n - half, d, generator=generator) * 1e-4 - 100])
    return torch.cat([torch.randn(n - 10, d, generator=generator) * 1e-4 + 100,  # one cluster, 10 outliers
                      torch.randn(10, d, generator=generator) * 1e3])


def cpu_peak(points: torch.Tensor) -> int:
    """Largest sum of live tensor bytes during the search, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        device_tree(points)
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:  # torch's own timeline (a private API)
        name = str(action)
        if "CREATE" in name:
            live += size
        elif "DESTROY" in name:
            live -= size
        peak = max(peak, live)
    return peak


def cuda_peak(points: torch.Tensor) -> int:
    points = points.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    device_tree(points)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| cloud | N | peak (MiB) | device_tree_bytes(N, d) (MiB) | peak / budget |")
    print("|---|---:|---:|---:|---:|")
    for n in args.sizes:
        for kind in ("spread", "two clusters", "one cluster"):
            points = cloud(kind, n, args.dim, torch.Generator().manual_seed(0))
            peak = cuda_peak(points) if args.cuda else cpu_peak(points)
            budget = device_tree_bytes(n, args.dim)
            print(f"| {kind} | {n} | {peak / 2**20:.0f} | {budget / 2**20:.0f} | {peak / budget:.2f} |", flush=True)


if __name__ == "__main__":
    main()
