"""Command-line options every resumable sweep study shares, and applying them to its config."""

from __future__ import annotations

import argparse

__all__ = ["add_sweep_options", "apply_overrides"]


def add_sweep_options(parser: argparse.ArgumentParser, out_help: str | None = None,
                      tensorboard_help: str | None = None) -> None:
    """--quick, --seeds, --jobs, --out, --tensorboard and --no-progress."""
    parser.add_argument("--quick", action="store_true", help="a small grid that finishes in minutes")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=None, help=out_help)
    parser.add_argument("--tensorboard", default=None, help=tensorboard_help)
    parser.add_argument("--no-progress", action="store_true")


def apply_overrides(config, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Copy each option in `names` that was given on the command line into `config`."""
    for name in names:
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
