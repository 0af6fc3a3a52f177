"""Argument checks shared by the public constructors, with one message form."""

from __future__ import annotations

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: object) -> int:
    """`value` if it is an int ≥ 1 (bools excluded), else ``ValueError("Invalid <name>: ...")``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}. It must be an integer ≥ 1")
    return value
