"""H0 of a neuron cloud (d = 784): topoopt against torch-topological, giotto-ph, ripser, gudhi.

Every method is timed in the same run on the same cloud; the table reports medians and ratios
against torch-topological and against the N×N float32 Gram product alone (the arithmetic floor).
topoopt and torch-topological are timed forward + backward (of one leaf cloud, its gradient reset
before each call); the others give no gradient.

    python benchmarks/h0.py                 # N ∈ {100, 1000, 4096}
    python benchmarks/h0.py --large 20000   # one N = 20,000 layer, topoopt only
    python benchmarks/h0.py --contended --sizes 100 1000
        # with two busy processes on the cores (`python -c 'while True: pass'`), at the
        # default thread count: topoopt and torch-topological in the same run
    python benchmarks/h0.py --clustered --sizes 1000 3000 --threads 1
        # clouds whose near pairs are most pairs (tiny neurons beside grown ones, nested
        # clusters, a dense sheet), against a Gaussian cloud and the Gram product of the same N
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import topoopt


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _topoopt(x: torch.Tensor):
    cloud = x.clone().requires_grad_(True)  # one leaf, its .grad reset (no clone in the timing)

    def run():
        cloud.grad = None
        topoopt.h0_deaths(cloud).sum().backward()
    return run


def _torch_topological(x: torch.Tensor):
    from torch_topological.nn import VietorisRipsComplex

    complex_ = VietorisRipsComplex(dim=0)
    cloud = x.clone().requires_grad_(True)

    def run():
        cloud.grad = None
        diagram = complex_(cloud)[0].diagram
        diagram[torch.isfinite(diagram)].sum().backward()
    return run


def _gram(x: torch.Tensor):
    return lambda: x @ x.T


def _giotto(x: np.ndarray):
    from gph import ripser_parallel

    return lambda: ripser_parallel(x, maxdim=0, n_threads=torch.get_num_threads())


def _ripser(x: np.ndarray):
    import warnings

    from ripser import ripser

    def run():
        with warnings.catch_warnings():  # "more columns than rows": intended, d = 784 > N = 100
            warnings.simplefilter("ignore", UserWarning)
            ripser(x, maxdim=0)
    return run


def _gudhi(x: np.ndarray):
    import gudhi

    def run():
        tree = gudhi.RipsComplex(points=x).create_simplex_tree(max_dimension=1)
        tree.compute_persistence()
    return run


def _clustered_cloud(kind: str, n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=generator)
    if kind == "tiny neurons + 10 grown":  # zero/tiny initialisation after a few neurons grew
        x[10:] *= 1e-6
    elif kind == "nested clusters":
        centres = torch.randn(n // 50 + 1, d, generator=generator).repeat_interleave(50, dim=0)[:n]
        x = x * 1e-6 + centres * 1e-3
        x[: n // 4] += 10 * torch.randn(d, generator=generator)
    elif kind == "dense 2-D sheet":
        x = torch.randn(n, 2, generator=generator) @ torch.randn(2, d, generator=generator)
    return x


def clustered(sizes: list[int], d: int, repeats: int) -> None:
    """topoopt on clouds where the Gram identity loses most pairs, against a Gaussian cloud."""
    print(f"{'N':>6} {'cloud':<26} {'median ms':>10} {'vs Gaussian':>12} {'vs Gram':>8}")
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        kinds = ["Gaussian", "tiny neurons + 10 grown", "nested clusters", "dense 2-D sheet"]
        clouds = {kind: _clustered_cloud(kind, n, d, generator) for kind in kinds}
        floor = _time(_gram(clouds["Gaussian"]), repeats)
        medians = {kind: _time(_topoopt(cloud), repeats) for kind, cloud in clouds.items()}
        for kind, seconds in medians.items():
            print(f"{n:>6} {kind:<26} {seconds * 1e3:>10.1f} {seconds / medians['Gaussian']:>11.2f}× "
                  f"{seconds / floor:>7.2f}×")
        print()


def contended(sizes: list[int], dim: int, repeats: int) -> None:
    """topoopt and torch-topological with two busy processes on the machine, same run."""
    import subprocess
    import sys

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(1.0)
        generator = torch.Generator().manual_seed(0)
        print(f"two busy processes running; {torch.get_num_threads()} threads; median of {repeats}")
        for n in sizes:
            x = torch.randn(n, dim, generator=generator) / dim**0.5
            ours = _time(_topoopt(x), repeats)
            theirs = _time(_torch_topological(x), repeats)
            floor = _time(_gram(x), repeats)
            print(f"N = {n:>5}: topoopt {ours * 1e3:8.1f} ms, torch-topological {theirs * 1e3:8.1f} ms "
                  f"({theirs / ours:.1f}× faster), Gram {floor * 1e3:7.1f} ms")
    finally:
        for process in busy:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 4096])
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--large", type=int, default=0, help="also time one cloud of this many neurons")
    parser.add_argument("--clustered", action="store_true", help="time clustered clouds instead (see above)")
    parser.add_argument("--contended", action="store_true", help="two busy processes run beside the timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.clustered:
        clustered(args.sizes, args.dim, args.repeats)
        return
    if args.contended:
        contended(args.sizes, args.dim, args.repeats)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d = {args.dim}, "
          f"median of {args.repeats} (slow references: of 3)\n")
    header = f"{'N':>6} {'method':<28} {'median ms':>10} {'vs torch-topological':>21} {'vs Gram':>8}"
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(0)
    for n in args.sizes:
        x = torch.randn(n, args.dim, generator=generator) / args.dim**0.5
        x_np = x.double().numpy()
        methods = {
            "Gram product X·Xᵀ (floor)": (_gram(x), args.repeats),
            "topoopt.h0_deaths fwd+bwd": (_topoopt(x), args.repeats),
            "torch-topological fwd+bwd": (_torch_topological(x), 3),
            "giotto-ph ripser_parallel": (_giotto(x_np), 3),
            "ripser": (_ripser(x_np), 3),
            "gudhi RipsComplex": (_gudhi(x_np), 3),
        }
        medians = {name: _time(fn, repeats) for name, (fn, repeats) in methods.items()}
        reference, floor = medians["torch-topological fwd+bwd"], medians["Gram product X·Xᵀ (floor)"]
        for name, seconds in medians.items():
            print(f"{n:>6} {name:<28} {seconds * 1e3:>10.1f} {reference / seconds:>20.2f}× "
                  f"{seconds / floor:>7.2f}×")
        print()
    if args.large:
        x = torch.randn(args.large, args.dim, generator=generator) / args.dim**0.5
        seconds = _time(_topoopt(x), 1)
        print(f"N = {args.large}, d = {args.dim}: topoopt.h0_deaths forward+backward {seconds:.1f} s")


if __name__ == "__main__":
    main()
