"""H0 at the ends of the floating-point range, by an exact power-of-two rescaling.

Deaths are lengths, so for any integer k, deaths(x) = 2⁻ᵏ · deaths(2ᵏ · x), and multiplying by a
power of two is exact in floating point wherever the result stays in the normal range. The
engine's search and measurement are exact for clouds of moderate size; at the ends of a dtype's
range they are not (float64 clouds near 1e200 overflow their squares, near 1e-160 their search's
scale factors; float32 subnormals lose the search's Gram products). So such a cloud is measured at
a scale where they are exact, and its deaths scaled back: one rounding, to the nearest value the
dtype can hold. The gradient is unchanged by the rescaling (the edges' unit vectors).

The check is made on the deaths, after the fact, so that a cloud of ordinary size pays nothing:
deaths that are not finite, or whose longest is outside `SAFE`, send the cloud through the
rescaled path (a search that overflows, too). A cloud whose largest coordinate is already of
ordinary size keeps its first deaths: tiny deaths there are near-duplicates, measured exactly down
to a limit: in float64 a gap below ~1e-154 of the cloud's largest coordinate has a square below the
dtype's range and reads as 0 (float32 clouds are measured in float64, so theirs never does).
"""

from __future__ import annotations

import math

import torch

__all__ = ["SAFE_EXPONENTS", "needs_rescaling", "rescale_exponent", "ldexp", "rescaled_deaths"]

# |x| and deaths within [2^low, 2^high] are measured exactly as they are. float32 is exact up to
# its largest value already (its lengths are summed in float64): only its subnormals are rescaled.
SAFE_EXPONENTS = {torch.float32: (-60, 128), torch.float64: (-250, 250)}


def _safe(value: float, dtype: torch.dtype) -> bool:
    low, high = SAFE_EXPONENTS[dtype]
    return 2.0**low <= value <= 2.0**high


def needs_rescaling(longest: float, dtype: torch.dtype) -> bool:
    """Whether deaths whose longest is `longest` may have left the exact range."""
    if dtype not in SAFE_EXPONENTS:
        return False
    return not math.isfinite(longest) or (longest != 0.0 and not _safe(longest, dtype))


def rescale_exponent(cloud: torch.Tensor) -> int:
    """k such that 2ᵏ · cloud has its largest coordinate near 1; 0 when it already is of ordinary
    size (or is all zeros)."""
    largest = float(cloud.detach().abs().max()) if cloud.numel() else 0.0
    if cloud.dtype not in SAFE_EXPONENTS or largest == 0.0 or _safe(largest, cloud.dtype):
        return 0
    return -math.frexp(largest)[1]


def ldexp(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """tensor · 2ᵏ, exactly and differentiably, in steps whose factors the dtype can hold."""
    step = 100 if tensor.dtype == torch.float32 else 1000
    while k:
        part = max(-step, min(step, k))
        tensor = tensor * (2.0**part)
        k -= part
    return tensor


def rescaled_deaths(measure, cloud: torch.Tensor, k: int) -> torch.Tensor:
    """``measure(cloud)`` taken as 2⁻ᵏ · measure(2ᵏ · cloud). A float32 cloud is measured in float64
    (exact: its values and the power of two fit), so that each death is rounded to float32 once,
    at the end: rounding at scale 1 and again into the subnormals could be one unit off."""
    wide = cloud.double() if cloud.dtype == torch.float32 else cloud
    return ldexp(measure(ldexp(wide, k)), -k).to(cloud.dtype)
