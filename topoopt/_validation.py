"""Argument and value checks shared by the public API, with one message form:
``Invalid <name>: <value>. It must be <what it must be>`` (a ValueError for a bad value, a
TypeError for a bad kind of object)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

from topoopt import _native

__all__ = ["UnknownName", "check_positive_int", "check_number", "check_choice", "check_instance", "invalid",
           "a_kind", "finite_each", "all_finite", "compiled_all_finite"]


class UnknownName(KeyError):
    """A name (a layer's, a key's) that is not there: a KeyError whose message prints as written
    (a plain KeyError prints its message quoted, as a key)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def invalid(name: str, value: object, must: str, kind: type[Exception] = ValueError) -> Exception:
    """The one message form, for checks no helper here covers."""
    return kind(f"Invalid {name}: {value!r}. It must be {must}")


def check_positive_int(name: str, value: object, *, at_least: int = 1, none_ok: bool = False) -> int | None:
    """`value` if it is an int ≥ `at_least` (bools excluded; None too when `none_ok`)."""
    if type(value) is int and value >= at_least:  # the common case, without the ABC check
        return value
    if none_ok and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < at_least:
        raise invalid(name, value, f"an integer ≥ {at_least}" + (", or None" if none_ok else ""))
    return int(value)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(high):
        return "" if math.isinf(low) else f" {'>' if low_open else '≥'} {low:g}"
    if math.isinf(low):
        return f" {'<' if high_open else '≤'} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(name: str, value: object, *, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False, none_ok: bool = False,
                 note: str = "") -> float | None:
    """`value` as a float if it is a finite real number (numpy's included, bools excluded) in the
    interval; None too when `none_ok`. `note` is added to the message (why the bound is there)."""
    if none_ok and value is None:
        return None
    try:
        real = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        real = False
    inside = real and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not inside:
        must = "a finite number" + _interval(low, high, low_open, high_open) + (", or None" if none_ok else "")
        raise invalid(name, value, must + (f" ({note})" if note else ""))
    return float(value)


def check_choice(name: str, value: object, choices: Iterable[object]) -> object:
    """`value` if it is one of `choices`."""
    choices = list(choices)
    if not any(isinstance(value, type(choice)) and isinstance(value, bool) == isinstance(choice, bool)
               and value == choice for choice in choices):
        raise invalid(name, value, "one of " + ", ".join(repr(choice) for choice in choices))
    return value


def check_instance(name: str, value: object, kinds: type | tuple[type, ...], what: str) -> object:
    """`value` if it is an instance of `kinds`, else a TypeError that names what it is."""
    if not isinstance(value, kinds):
        raise TypeError(f"Invalid {name}: {a_kind(value)}. It must be {what}")
    return value


def a_kind(value: object) -> str:
    """'an int', 'a str': the value's type with its article, for messages."""
    kind = type(value).__name__
    spelled = kind[:2].isupper()  # an acronym (SGD, LSTM) is read letter by letter
    vowel_sound = kind[:1] in "AEFHILMNORSX" if spelled else kind[:1].lower() in "aeiou" or kind.startswith("nd")
    return ("an " if vowel_sound else "a ") + kind


def all_finite(tensor: torch.Tensor) -> bool:
    """`finite_each` of one tensor, without building lists: a cloud is checked a few times a
    training step (one compiled pass for a CPU float32/float64 tensor)."""
    flag = compiled_all_finite(tensor)
    return flag if flag is not None else finite_each([tensor])[0]


def compiled_all_finite(tensor: torch.Tensor) -> bool | None:
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
        flags[i] = compiled_all_finite(tensor)
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
