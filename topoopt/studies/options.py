"""Command-line options every resumable sweep study shares, and applying them to its config."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_sweep_options", "apply_overrides", "output_folders", "positive_int"]


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


def output_folders(args: argparse.Namespace, out: Path, tensorboard: Path) -> tuple[Path, Path]:
    """The results and TensorBoard folders: ``--out`` and ``--tensorboard`` when given, else the
    study's defaults (with --quick: ``out/quick`` and ``tensorboard_quick``, so a quick grid never
    mixes with the full one)."""
    if args.quick:
        out, tensorboard = out / "quick", tensorboard.with_name(tensorboard.name + "_quick")
    return (Path(args.out) if args.out is not None else out,
            Path(args.tensorboard) if args.tensorboard is not None else tensorboard)
