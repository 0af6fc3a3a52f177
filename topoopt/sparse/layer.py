"""A Linear layer whose connections are fixed by a 0/1 mask (Bourely et al., arXiv 1706.05683)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SparseLinear"]


class SparseLinear(nn.Linear):
    """``y = x (W ⊙ M)ᵀ + b`` with a fixed out × in 0/1 mask M, saved in ``state_dict``.

    Masked weights start at exactly 0 and get exactly 0 gradient, so every torch optimizer
    (weight decay and Adam included) keeps them at 0. Each neuron is initialised from
    U(−1/√k, 1/√k) with k its real fan-in, as nn.Linear does with the dense fan-in. Being an
    ``nn.Linear``, its neuron cloud (`topoopt.neuron_cloud`) and topology work unchanged.
    """

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, bias: bool = True,
                 generator: torch.Generator | None = None) -> None:
        mask = torch.as_tensor(mask)
        if mask.shape != (out_features, in_features):
            raise ValueError(f"mask must have shape (out_features, in_features) = {(out_features, in_features)}, "
                             f"got {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1")
        self._generator = generator
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not hasattr(self, "mask"):
            return  # nn.Linear.__init__ calls this before the mask exists
        fan_in = self.mask.sum(dim=1, keepdim=True)
        bound = torch.where(fan_in > 0, fan_in.clamp(min=1).rsqrt(), torch.zeros_like(fan_in))
        with torch.no_grad():
            noise = torch.rand(self.weight.shape, generator=self._generator, dtype=self.weight.dtype)
            self.weight.copy_((2 * noise - 1) * bound * self.mask)
            if self.bias is not None:
                noise = torch.rand(self.bias.shape, generator=self._generator, dtype=self.bias.dtype)
                self.bias.copy_((2 * noise - 1) * bound.squeeze(1))

    @property
    def effective_weight(self) -> torch.Tensor:
        """W ⊙ M, the weight the layer computes with (and its neuron cloud)."""
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight, self.bias)

    @property
    def density(self) -> float:
        return float(self.mask.mean())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density:.3f}"
