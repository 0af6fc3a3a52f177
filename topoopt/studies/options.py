"""Command-line options every resumable sweep study shares, and applying them to its config."""

from __future__ import annotations

import argparse

__all__ = ["add_sweep_options", "apply_overrides", "positive_int"]


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1 (argparse names the option in its message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {text}")
    return value


def add_sweep_options(parser: argparse.ArgumentParser, out_help: str | None = None,
                      tensorboard_help: str | None = None) -> None:
    """--quick, --seeds, --jobs, --out, --tensorboard and --no-progress."""
    parser.add_argument("--quick", action="store_true", help="a small grid that finishes in minutes")
    parser.add_argument("--seeds", type=positive_int, default=None, help="how many seeds (≥ 1)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="cells run in parallel (≥ 1)")
    parser.add_argument("--out", default=None, help=out_help)
    parser.add_argument("--tensorboard", default=None, help=tensorboard_help)
    parser.add_argument("--no-progress", action="store_true")


def apply_overrides(config, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Copy each option in `names` that was given on the command line into `config`."""
    for name in names:
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
