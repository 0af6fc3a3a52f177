"""Squared distances from the Gram identity, exact where it loses its digits: what the host tree
search (`topoopt.spanning_tree`), the device search (`topoopt.device_tree`) and the batched search
of small clouds (`topoopt.many_clouds`) share.

|x|² + |y|² − 2x·y is one matrix product for all pairs, but it loses relative accuracy when two
points are close compared with their norms. So the cloud is centred and multiplied by a power of
two first (exact, and it keeps the product free of under- and overflow; the tree does not change),
and the pairs below `NEAR_PAIR_RATIO`·(|x|² + |y|²) are measured again from float64 differences.
"""

from __future__ import annotations

import os

import torch

__all__ = ["NEAR_PAIR_RATIO", "NEAR_PAIR_RATIO_FLOAT64", "NEAR_PAIR_RATIO_TF32",
           "EXACT_PAIRS_PER_POINT", "SMALL_COMPONENT", "MAX_DEPTH",
           "MemoryBudgetError", "available_bytes", "matmul_precision", "centred_scaled", "exact_squared",
           "far_from_centre"]

# Measured: the float32 Gram error of a squared distance is at most ~6 eps (|x|²+|y|²)
# (eps = 6e-8; clouds of d = 4 to 4096). Above this ratio the relative error of a distance is
# ≤ 6 eps / (2 · 0.05) ≈ 3.6e-6, below the 1e-5 agreement we promise against gudhi.
NEAR_PAIR_RATIO = 0.05
# A TF32 product of the split cloud (`device_tree.tf32_split`, small terms first) errs by
# ≤ 3·2⁻²² |x||y| in its inputs and by float32 accumulation over 3d terms: measured up to ~12 eps
# (|x|²+|y|²) on the Gram value against float32's ~8 (d = 64, N = 1000, float32 sums). Three
# times float32's ratio keeps the float32 bound on the pairs above it, with a margin.
NEAR_PAIR_RATIO_TF32 = 0.15
# float64 Gram error is ~6 eps64 (|x|²+|y|²) ≈ 7e-16 (|x|²+|y|²): above 1e-8 of the norms a
# distance is good to ≤ 4e-8.
NEAR_PAIR_RATIO_FLOAT64 = 1e-8
# Near pairs recomputed exactly before clusters are measured about their own centres instead.
EXACT_PAIRS_PER_POINT = 4
# Components this small have all their pairs recomputed exactly (cheaper than another pass).
SMALL_COMPONENT = 8
# Nested clusters deeper than this (each a cluster far from its parent's centre) are recomputed
# exactly: float32's exponent range allows only a few dozen such levels anyway.
MAX_DEPTH = 16
# Float64 pair differences are recomputed this many elements (pairs × d) at a time (64 MiB).
_PAIR_CHUNK_ELEMENTS = 8 * 1024 * 1024
# Above this magnitude the mean and the centred values of a float32 cloud can overflow.
_LARGE = 2.0**64


class MemoryBudgetError(MemoryError):
    """The N×N distance matrix of a cloud would not fit in the memory available."""


def matmul_precision(device: torch.device) -> str:
    """How float32 matrix products run on `device` under the user's settings (read, never set:
    setting them here would mix torch's old and new precision APIs, which torch then refuses to
    read): "tf32" (a 10-bit mantissa: CUDA, or XPU through oneDNN), "bf16" (7 bits: oneDNN on a
    CPU or XPU that has it) or "ieee". A CPU has no TF32, so its "tf32" setting is "ieee"."""
    if device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        own = getattr(matmul, "fp32_precision", None)
        if own is None:  # older torch: only the legacy flag
            return "tf32" if matmul.allow_tf32 else "ieee"
    elif device.type in ("cpu", "xpu"):
        own = getattr(getattr(getattr(torch.backends, "mkldnn", None), "matmul", None), "fp32_precision", None)
        if own is None:
            return "ieee"
    else:
        return "ieee"
    if own == "none":  # follows the global setting
        own = getattr(torch.backends, "fp32_precision", "none")
    if own == "tf32" and device.type == "cpu":
        return "ieee"
    return own if own in ("tf32", "bf16") else "ieee"


def available_bytes(device: torch.device) -> int:
    """Memory a search may take on `device`: free device memory plus what PyTorch's caching
    allocator holds unused (CUDA, XPU), Metal's recommended working set less what tensors hold
    (MPS), or the host's available memory."""
    if device.type in ("cuda", "xpu"):
        backend = getattr(torch, device.type)
        free, _ = backend.mem_get_info(device)
        cached = backend.memory_reserved(device) - backend.memory_allocated(device)
        return int(free) + max(0, int(cached))
    if device.type == "mps":  # unified memory: what Metal recommends, less what tensors hold
        return max(0, int(torch.mps.recommended_max_memory()) - int(torch.mps.current_allocated_memory()))
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _power_of_two_below(magnitude: torch.Tensor) -> torch.Tensor:
    """2^−round(log2 m) per entry (1 where m is 0), in float64."""
    magnitude = magnitude.double()
    exponent = torch.round(torch.log2(torch.where(magnitude > 0, magnitude, 1.0)))
    return torch.pow(2.0, -exponent)


def centred_scaled(points: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, |x|², factor) of a cloud (N×d) or a stack of clouds (k×N×d): x is each cloud centred
    and multiplied by a power of two (largest |entry| near 1), in `dtype`; distances of x are those
    of the cloud times `factor` (a float64 tensor, one entry per cloud)."""
    largest = points.abs().amax(dim=(-2, -1))
    # A huge cloud is scaled down first, by a power of two (exact; at most 2⁻¹⁰⁰, since a smaller
    # factor would be a float32 subnormal, 0 where denormals flush).
    prescale = torch.where(largest.double() > _LARGE, torch.clamp(_power_of_two_below(largest), min=2.0**-100), 1.0)
    if points.device.type != "cpu":  # multiplied by 1 rather than asked (a host read) whether to
        points = points * prescale.to(points.dtype)[..., None, None]
    elif bool((prescale != 1.0).any()):
        points = points * prescale.to(points.dtype)[..., None, None]
    # Centre in the input's own precision: the difference of close floats is exact (Sterbenz).
    centred = points - points.mean(dim=-2, keepdim=True)
    factor = _power_of_two_below(centred.abs().amax(dim=(-2, -1)))
    x = (centred * factor.to(centred.dtype)[..., None, None]).to(dtype)
    return x, (x * x).sum(dim=-1), factor * prescale


def exact_squared(wide: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  factor: float | torch.Tensor) -> torch.Tensor:
    """float32 squared distances × `factor` (one number, or one per pair) of the pairs
    (rows[i], cols[i]) of the float64 cloud `wide`, from their differences, a chunk of pairs at a
    time, on `wide`'s device."""
    per_chunk = max(1, _PAIR_CHUNK_ELEMENTS // max(1, wide.shape[-1]))
    parts = []
    for start in range(0, rows.shape[0], per_chunk):
        chunk = slice(start, start + per_chunk)
        difference = wide.index_select(0, rows[chunk]) - wide.index_select(0, cols[chunk])
        scale = factor[chunk] if isinstance(factor, torch.Tensor) else factor
        parts.append((torch.linalg.vector_norm(difference, dim=1).square_() * scale).float())
    return torch.cat(parts) if parts else torch.empty(0, device=wide.device)


def far_from_centre(members: torch.Tensor, points: torch.Tensor) -> bool:
    """Whether a group's own centre is farther from the cloud's than the group is wide, so that
    centring on it shrinks the norms the Gram identity loses precision against."""
    own_centre = members.double().mean(dim=0)
    offset = (own_centre - points.double().mean(dim=0)).square().sum()
    spread = (members.double() - own_centre).square().sum(dim=1).mean()
    return bool(offset > spread)  # one host read
