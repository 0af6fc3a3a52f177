"""Host reads of one H0 measurement on the device path: the operations that make a GPU wait
for the host (a scalar read by item/bool/int/float, nonzero, equal, bincount, tolist, a
boolean-mask index), counted at torch's dispatcher while a CPU cloud goes down the code a CUDA
cloud takes. A CUDA cloud's own finiteness check adds one (`finite_each`); on the CPU it is the
compiled pass, which the dispatcher does not see.

    python benchmarks/host_reads.py
"""

from __future__ import annotations

import collections
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from topoopt import h0_deaths, spanning_tree

READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default",
         "aten.is_nonzero.default", "aten.masked_select.default", "aten.bincount.default",
         "aten._unique2.default", "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor"}


class _Reads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in READS:
            self.counts[name.split(".")[1]] += 1
        elif name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.counts["boolean index"] += 1
        return func(*args, **(kwargs or {}))


def count_host_reads(points: torch.Tensor) -> collections.Counter:
    """Host reads by kind while `h0_deaths(points)` runs the device search (emulated on CPU)."""
    reads = _Reads()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        reads.counts["tolist"] += 1
        return tolist(self)

    with mock.patch.object(spanning_tree, "DEVICE_SEARCH_TYPES", frozenset({"cpu", "cuda"})), \
            mock.patch.object(torch.Tensor, "tolist", counted_tolist), reads:
        h0_deaths(points)
    return reads.counts


def clouds(n: int, d: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A spread cloud, and eight tight clusters far apart (each searched again about its centre)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d, generator=g) * 10
    return {"spread": torch.randn(n, d, generator=g),
            "8 clusters": centres[torch.arange(n) % 8] + 0.01 * torch.randn(n, d, generator=g)}


def main() -> None:
    print("| N | cloud | host reads | by kind |")
    print("|---:|---|---:|---|")
    for n in (1000, 4096):
        for name, x in clouds(n).items():
            counts = count_host_reads(x)
            print(f"| {n} | {name} | {sum(counts.values())} | "
                  f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items()))} |")


if __name__ == "__main__":
    main()
