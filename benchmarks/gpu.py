"""The device checks, in one go, for a session that is lent a GPU (nothing here runs without one).

1. ``make test``'s CUDA tests (those skipped on a CPU machine), on the GPU.
2. H0 forward + backward of a Gaussian N×784 float32 cloud on the device, N = 1000, 4096, 20,000:
   median ms over repeats (synchronised), against the Gram product of the same cloud. Goal: a
   4096×784 layer in ≤ 10 ms on an H100/H200-class GPU.
3. Peak device memory of each search against the budget `MemoryBudgetError` checks
   (`topoopt.device_tree.device_tree_bytes`), for a spread and a clustered cloud.
4. resnet18 (batch 32, 3×64×64) and GPT-2 small (4×128 tokens, its block matrices): one full
   measurement as a ratio to one AdamW training step, on the device.

Prints one table per part and writes them to ``$OUT/gpu.md`` when ``$OUT`` is set (the device
tool's folder), else to the working folder. Record the figures in benchmarks/RESULTS.md.

    python benchmarks/gpu.py            # about 3–5 minutes on an H200
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cuda_tests() -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or device",
                           "tests/test_device_tree.py", "tests/test_persistence.py"], capture_output=True, text=True)
    return "## CUDA tests\n\n```\n" + done.stdout[-2000:] + "\n```\n"


def h0_speed() -> str:
    from topoopt import h0_deaths

    lines = ["## H0 forward + backward on the device (float32, N×784)", "",
             "| N | Gram ms | H0 fwd+bwd ms | ratio |", "|---:|---:|---:|---:|"]
    for n in (1000, 4096, 20_000):
        x = (torch.randn(n, 784, device="cuda") / 28).requires_grad_()
        repeats = 5 if n > 10_000 else 15

        def h0():
            x.grad = None
            h0_deaths(x).sum().backward()

        h0()  # warm-up
        gram = _timed(lambda: x.detach() @ x.detach().T, repeats)
        both = _timed(h0, repeats)
        lines.append(f"| {n} | {gram * 1e3:.2f} | {both * 1e3:.2f} | {both / gram:.1f}× |")
    return "\n".join(lines) + "\n"


def memory_against_budget() -> str:
    from topoopt.device_tree import device_tree, device_tree_bytes

    lines = ["## Peak device memory of the search against its budget", "",
             "| cloud | N | peak MiB | budget MiB | peak / budget |", "|---|---:|---:|---:|---:|"]
    for kind in ("spread", "clustered"):
        for n in (4096, 8192):
            if kind == "spread":
                x = torch.randn(n, 784, device="cuda")
            else:
                x = torch.randn(16, 784, device="cuda").repeat(n // 16, 1) + 1e-4 * torch.randn(n, 784, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            device_tree(x)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            budget = device_tree_bytes(n, x.shape[1])
            lines.append(f"| {kind} | {n} | {peak / 2**20:.0f} | {budget / 2**20:.0f} | {peak / budget:.2f} |")
    return "\n".join(lines) + "\n"


def models_on_device() -> str:
    import torch.nn.functional as F
    import torchvision
    from transformers import GPT2Config, GPT2LMHeadModel

    from topoopt import TopoOptimizer, TreeCache

    lines = ["## One full measurement against one training step, on the device", "",
             "| model | clouds | step ms | measure ms | ratio |", "|---|---:|---:|---:|---:|"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resnet = torchvision.models.resnet18(weights=None).cuda()
        gpt2 = GPT2LMHeadModel(GPT2Config()).cuda()
    images, labels = torch.randn(32, 3, 64, 64, device="cuda"), torch.randint(0, 1000, (32,), device="cuda")
    tokens = torch.randint(0, 50257, (4, 128), device="cuda")
    for name, model, loss_fn in (("resnet18", resnet, lambda: F.cross_entropy(resnet(images), labels)),
                                 ("GPT-2 small", gpt2, lambda: gpt2(tokens, labels=tokens).loss)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = TopoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model, every=10**9)

        def step():
            wrapped.zero_grad()
            loss_fn().backward()
            wrapped.step()

        def measure():
            wrapped.trees = TreeCache()
            wrapped.update_scales()

        step()
        step_time, measure_time = _timed(step, 5), _timed(measure, 3)
        lines.append(f"| {name} | {len(wrapped.layer_names)} | {step_time * 1e3:.1f} | {measure_time * 1e3:.1f} | "
                     f"{measure_time / step_time:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device; none is visible here")
    parts = [f"# Device checks: {torch.cuda.get_device_name()}, torch {torch.__version__}\n"]
    for part in (cuda_tests, h0_speed, memory_against_budget, models_on_device):
        try:
            parts.append(part())
        except Exception as error:  # one failing part must not cost the others' figures
            parts.append(f"## {part.__name__}: failed: {type(error).__name__}: {error}\n")
        print(parts[-1], flush=True)
    out = Path(os.environ.get("OUT", "."))
    (out / "gpu.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
