"""The tree search on the GPU (`topoopt.device_tree`, Borůvka): forward + backward of a layer's H0.

Target: a 4096×4096 layer (N = 4096 neurons of d = 4096 inputs) in ≤ 10 ms on one
H100. Times, in the same run and on the same CUDA cloud: the device search (the engine's path
for CUDA clouds), the previous path (float32 Gram blocks copied to the host, compiled Prim), and
the float32 Gram product alone (IEEE float32, as the engine uses it). Medians, with
`torch.cuda.synchronize()` around each repeat.

    python benchmarks/device_tree.py                   # N = d = 4096, needs CUDA
    python benchmarks/device_tree.py --sizes 1000 4096 --dim 784
    python benchmarks/device_tree.py --cpu --sizes 300 1000 --dim 784
        # the same code on CPU tensors against the compiled Prim (informative only: on a CPU
        # the engine keeps Prim, which reads the matrix once instead of ~log2 N times)

Without CUDA (and without --cpu) it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from topoopt import h0_deaths, spanning_tree


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _forward_backward(x: torch.Tensor, search_types: frozenset[str]):
    def run():
        saved = spanning_tree.DEVICE_SEARCH_TYPES
        spanning_tree.DEVICE_SEARCH_TYPES = search_types
        try:
            cloud = x.clone().requires_grad_(True)
            h0_deaths(cloud).sum().backward()
        finally:
            spanning_tree.DEVICE_SEARCH_TYPES = saved
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096], help="numbers of neurons N")
    parser.add_argument("--dim", type=int, default=4096, help="inputs per neuron d")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="run the device search on CPU tensors instead")
    args = parser.parse_args()

    if args.cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("CUDA is not available: the device tree search was NOT measured (run with --cpu to time "
              "the same code on CPU tensors, which says nothing about the GPU target).")
        return
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"float32 matmul precision {torch.get_float32_matmul_precision()}")
    else:
        print(f"device: CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    device_types = frozenset({device.type})
    print(f"{'N':>6} {'d':>5} | {'device search ms':>16} | {'host Prim ms':>12} | {'Gram ms':>8} | "
          f"{'host ÷ dev':>10} | {'× Gram':>7}")
    for n in args.sizes:
        generator = torch.Generator().manual_seed(n)
        x = (torch.randn(n, args.dim, generator=generator) / args.dim**0.5).to(device)
        on_device = _median_ms(_forward_backward(x, device_types), args.repeats, device)
        on_host = _median_ms(_forward_backward(x, frozenset()), max(3, args.repeats // 4), device)
        gram = _median_ms(lambda: x @ x.T, args.repeats, device)
        print(f"{n:>6} {args.dim:>5} | {on_device:>16.2f} | {on_host:>12.2f} | {gram:>8.2f} | "
              f"{on_host / on_device:>9.2f}× | {on_device / gram:>6.2f}×")


if __name__ == "__main__":
    main()
