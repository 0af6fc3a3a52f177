"""Argument and value checks shared by the public API, with one message form."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from topoopt import _native

__all__ = ["check_positive_int", "finite_each", "all_finite"]


def check_positive_int(name: str, value: object) -> int:
    """`value` if it is an int ≥ 1 (bools excluded), else ``ValueError("Invalid <name>: ...")``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}. It must be an integer ≥ 1")
    return value


def all_finite(tensor: torch.Tensor) -> bool:
    """`finite_each` of one tensor, without building lists: a cloud is checked a few times a
    training step (one compiled pass for a CPU float32/float64 tensor)."""
    flag = _compiled_all_finite(tensor)
    return flag if flag is not None else finite_each([tensor])[0]


def _compiled_all_finite(tensor: torch.Tensor) -> bool | None:
    """The compiled read-only pass for a CPU float32/float64 tensor; None for the others."""
    if _native.engine is None or tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.float64):
        return None
    x = tensor.detach().contiguous()
    return _native.engine.all_finite(x.numpy(), x.element_size())


def finite_each(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Whether each tensor is free of NaN and Inf.

    CPU float32/float64 tensors: one compiled read-only pass each (no allocation, no thread
    count to switch). The others: each tensor's minimum and maximum (NaN propagates into both,
    an Inf is one of them; no temporary the size of the tensor), all read back with one host sync.
    """
    flags: list[bool | None] = [None] * len(tensors)
    rest = []
    for i, tensor in enumerate(tensors):
        flags[i] = _compiled_all_finite(tensor)
        if flags[i] is None:
            rest.append(i)
    if rest:
        checks = [torch.isfinite(torch.stack(torch.aminmax(tensors[i].detach()))).all() if tensors[i].numel()
                  else torch.ones((), dtype=torch.bool, device=tensors[i].device) for i in rest]
        probes = torch.stack([check.to(checks[0].device) for check in checks]).tolist()
        for i, flag in zip(rest, probes):
            flags[i] = flag
    return flags  # type: ignore[return-value]


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running."""
    return getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()
