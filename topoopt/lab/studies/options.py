"""Command-line options every resumable sweep study shares, and applying them to its config."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from topoopt.lab.sweep import EXECUTORS

__all__ = ["CommandParser", "HelpFormatter", "add_sweep_options", "apply_overrides", "command_parser",
           "output_folders", "positive_int"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and every option's default in its help (argparse's own
    defaults formatter shows them only where an option already has a help text)."""

    def _format_action(self, action: argparse.Action) -> str:
        shows = (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                 and not (action.help and "default" in action.help))
        if shows:
            action = copy.copy(action)
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
        return super()._format_action(action)


class CommandParser(argparse.ArgumentParser):
    """Errors in one line (the option and what is wrong), exit status 2, no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_parser(command: str, description: str | None, module: str | None = None) -> CommandParser:
    """The parser of ``topoopt <command>`` (or, without a command, of ``python -m <module>``): its
    own name in usage lines, defaults in its help."""
    prog = f"topoopt {command}" if command else f"python -m {module}"
    return CommandParser(prog=prog, description=description, formatter_class=HelpFormatter)


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
    """--quick, --seeds, --jobs, --executor, --out, --tensorboard and --no-progress."""
    parser.add_argument("--quick", action="store_true", help="a small grid that finishes in minutes")
    parser.add_argument("--seeds", type=positive_int, default=None, help="how many seeds (≥ 1)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="cells run in parallel (≥ 1)")
    parser.add_argument("--executor", choices=EXECUTORS, default="process",
                        help="where cells run: local processes (with --jobs > 1; else here, one by one), or "
                             "Ray tasks (pip install 'topoopt[ray]'): a local Ray with --jobs CPUs, or the cluster "
                             "RAY_ADDRESS names, which brings its own CPUs")
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
