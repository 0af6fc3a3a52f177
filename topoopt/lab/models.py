"""Small models for experiments, built from a compact spec such as ``mlp:784-100-100-10``."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "build_mlp", "parse_model_spec", "initialise"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}

InitName = Literal["default", "zero", "normal"]


def parse_model_spec(spec: str) -> list[int]:
    """Layer widths of ``mlp:IN-H1-...-OUT``; a malformed spec is a `ValueError` saying why."""
    kind, _, widths = spec.partition(":")
    if kind != "mlp" or not widths:
        raise ValueError(f"Invalid model spec {spec!r}: expected 'mlp:IN-H1-...-OUT', e.g. mlp:64-32-10")
    try:
        sizes = [int(width) for width in widths.split("-")]
    except ValueError:
        raise ValueError(f"Invalid model spec {spec!r}: widths must be integers") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"Invalid model spec {spec!r}: needs at least two positive widths")
    weights = sum(a * b for a, b in zip(sizes, sizes[1:]))
    if weights > MAX_MLP_WEIGHTS:
        raise ValueError(f"Invalid model spec {spec!r}: {weights:,} weights, more than the {MAX_MLP_WEIGHTS:,} "
                         f"(4 GB of float32) this command line builds")
    return sizes


MAX_MLP_WEIGHTS = 10**9


def initialise(model: nn.Module, init: InitName = "default", std: float = 1e-6,
               generator: torch.Generator | None = None) -> None:
    """Re-initialise every Linear layer: torch's default, exact zeros, or N(0, std²).

    Zero initialisation makes all hidden neurons of a layer receive the same gradient: they stay
    coincident in exact arithmetic (Gabella et al. 2019 study how they branch anyway).
    """
    if init not in ("default", "zero", "normal"):
        raise ValueError(f"Invalid init {init!r}. Valid values are 'default', 'zero' and 'normal'")
    if init == "normal" and not (math.isfinite(std) and std >= 0):
        raise ValueError(f"Invalid init std: {std}")
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            if init == "default":
                module.reset_parameters()
            elif init == "zero":
                module.weight.zero_()
            else:
                module.weight.normal_(0.0, std, generator=generator)
            if module.bias is not None and init != "default":
                module.bias.zero_()


def build_mlp(spec: str | list[int], activation: str = "relu", bias: bool = True) -> nn.Sequential:
    """A multilayer perceptron; its Linear layers are named ``fc1``, ``fc2``, ... for reports."""
    sizes = parse_model_spec(spec) if isinstance(spec, str) else list(spec)
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"Invalid activation {activation!r}. Valid values are: {', '.join(sorted(ACTIVATIONS))}"
        )
    layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        layers[f"fc{index}"] = nn.Linear(fan_in, fan_out, bias=bias)
        if index < len(sizes) - 1:
            layers[f"act{index}"] = ACTIVATIONS[activation]()
    return nn.Sequential(OrderedDict(layers))
