"""The `topoopt` command line: `topoopt train ...` and `topoopt main` (the job behind `make run`)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from collections.abc import Sequence
from pathlib import Path

from topoopt.lab.data import DatasetUnavailable
from topoopt.lab.run_lock import RunFolderBusy
from topoopt.lab.studies.options import CommandParser, HelpFormatter, positive_int
from topoopt.lab.train_config import add_train_options
from topoopt.lab.training import CHANGEABLE_ON_RESUME
from topoopt.lab.writer_errors import caught_writer_errors

__all__ = ["main", "build_parser"]


def _add_train_options(parser: argparse.ArgumentParser, with_defaults: bool = True) -> None:
    """The options of `topoopt train` (declared once, in `topoopt.lab.train_config`), and --resume
    and --quiet; without defaults an option not given is left out of the parsed namespace."""
    add_train_options(parser, with_defaults)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --log-dir from its last checkpoint, with its saved options "
                             f"(only {', '.join('--' + n.replace('_', '-') for n in CHANGEABLE_ON_RESUME)} may differ)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def _config(args: argparse.Namespace, given: set[str]):
    """The run's configuration; on --resume, the saved one with the options given on top (the
    training refuses those that may not change)."""
    from topoopt.lab.training import TrainConfig, saved_config

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if args.resume:
        saved = saved_config(config.run_dir())
        if saved is not None:
            config = dataclasses.replace(saved, **{k: getattr(config, k) for k in given & fields})
    return config


def _given_options(argv: Sequence[str]) -> set[str]:
    """The train options named on the command line (not left at their defaults)."""
    probe = CommandParser(prog="topoopt train")
    _add_train_options(probe, with_defaults=False)
    return set(vars(probe.parse_args(argv)))


def _train(args: argparse.Namespace) -> int:
    from topoopt.lab.training import train

    summary = train(_config(args, _given_options(args.argv[1:])), resume=args.resume, progress=not args.quiet)
    print(f"test accuracy {summary['test_accuracy']:.4f}; run folder {summary['run_dir']}")
    print(f"look at it: tensorboard --logdir {summary['run_dir']}")
    return 0


def _main_job(args: argparse.Namespace) -> int:
    """The quick steering study and the quick steered learning graphs (see `_run_main_job`), on one
    thread. Every part resumes where an interrupted job stopped."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    # Small networks and 784×784 PCAs: with the 2 cores shared by other work, 1,000 training
    # steps took 1.1–1.8 s on one thread against 5.8–44 s on two, and a PCA of a trajectory 1 s
    # against 9–42 s. So one thread, torch's and BLAS's (numpy, scikit-learn).
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            return _run_main_job(args)
    except KeyboardInterrupt:
        print("\nMain job interrupted: run it again (make run, or topoopt main with the same options) "
              "to continue where it stopped.")
        raise
    finally:
        torch.set_num_threads(threads)


def _run_main_job(args: argparse.Namespace) -> int:
    """What topology sees and what it steers, small enough to run here: two failing runs of the
    failure suite beside their healthy twin, the quick steering study against matched controls and
    an open-loop replay of its schedule, then quick learning graphs of steered runs."""
    import time

    from topoopt.lab.studies import failures, learning_graphs, steer

    started = time.perf_counter()
    results, logs = Path(args.results), Path(args.log_root)
    print("Main job: what does topology see in a failing run, and can steering by it beat a learning rate? "
          "(mnist5k, offline)", flush=True)
    if not args.skip_failures:
        print(f"\n1. Failing runs beside their healthy twin (784-64-64-10 ReLU, SGD): "
              f"{' and '.join(failures.QUICK_FAILURES)}, 2 pilot and 2 measured seeds × 1,500 steps. When each "
              "failure showed on the test set, and when topoopt and the usual signals said so (the full study, "
              "ten failures × 10 seeds, is `topoopt failures`).", flush=True)
        failure_argv = ["--quick", "--brief", "--out", str(results / "failures" / "quick")]
        if args.quiet:
            failure_argv.append("--no-progress")
        failures.main(failure_argv)
    print(f"\n2. Steering: the surface network (784-100-100-10, N(0, 1e-6²) init), steered runs against matched "
          f"controls and the replay of topo-collapse's schedule without topology, {args.seeds} seed(s) × "
          f"{args.steps:,} steps (the full study, 10 seeds, is `topoopt steer`).", flush=True)
    configs = steer.SteerConfig.quick().configs
    if args.seeds < 2:  # a replay of the other seeds' mean schedule needs other seeds
        configs = [name for name in configs if name != "replay-mean"]
        print("(one seed: the replay of the other seeds' schedule is left out)")
    steer_argv = ["--quick", "--steps", str(args.steps), "--seeds", str(args.seeds), "--configs", *configs,
                  "--out", str(results / "steer" / "quick"), "--tensorboard", str(logs / "steer_quick")]
    if args.quiet:
        steer_argv.append("--no-progress")
    steer.main(steer_argv)
    if not args.skip_learning_graphs:
        print("\n3. Learning graphs (Gabella et al. 2019) of steered runs beside the plain baseline, quick runs: "
              "the tree (784-100-10, zero + N(0, 1e-6²)) for 4,000 steps at the paper's lr 0.05, plain, pen-spread, "
              "topo-collapse and its matched per-layer lr; the surface (784-100-100-10, N(0, 1e-6²)) at lr "
              f"{learning_graphs.QUICK_SURFACE_LR} for 12,000 steps (its plateau lasts 1/lr), plain and pen-spread.",
              flush=True)
        graphs = results / "learning_graphs" / "quick"
        # --light: each layer's graph, statistics and events; not the PCA-3 graph of thousands of
        # cycles, the HTML or the PCA plots, which took most of the job's time
        common = ["--quick", "--light", "--epsilons", "1e-6", "--compare", "--out", str(graphs),
                  "--tensorboard", str(logs / "learning_graphs")]
        learning_graphs.main(["--setting", "tree", *common, "--steer", "pen-spread", "topo-collapse",
                              "collapse-matched"])
        learning_graphs.main(["--setting", "surface", *common, "--steer", "pen-spread"])
        comparison = graphs / "comparison"
        for table in sorted(comparison.glob("*_comparison.md")):
            print(f"\n{table.stem}:\n{table.read_text()}")
        print(f"Side-by-side learning graphs: {comparison}/*_graphs.png; the full-length ones and the 10-seed "
              "tests are in experiments/RESULTS.md (\"Steering against matched controls\", \"Learning graphs of "
              "steered training\").")
    print(f"\nMain job finished in {time.perf_counter() - started:.0f} s (this invocation; finished parts of an "
          "interrupted job are read back, not rerun).")
    print(f"Look at the runs: tensorboard --logdir {args.log_root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="topoopt", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", formatter_class=HelpFormatter,
                                help="train one model with optional topology-aware optimizer and penalty")
    _add_train_options(train)
    train.set_defaults(handler=_train)
    main_job = commands.add_parser("main", formatter_class=HelpFormatter,
                                   help="the main job behind `make run` (offline, mnist5k)")
    main_job.add_argument("--steps", type=positive_int, default=3000,
                          help="step budget of each run of the quick steering study (default 3000)")
    main_job.add_argument("--seeds", type=positive_int, default=2, help="seeds of the quick steering study")
    main_job.add_argument("--results", default="experiments/results",
                          help="folder for the studies' results (default experiments/results)")
    main_job.add_argument("--log-root", default="tensorboard_logs")
    main_job.add_argument("--quiet", action="store_true")
    main_job.add_argument("--resume", action="store_true",
                          help="continue an interrupted main job (it always does: the flag is accepted for symmetry)")
    main_job.add_argument("--skip-learning-graphs", action="store_true", help="leave out the learning graphs")
    main_job.add_argument("--skip-failures", action="store_true", help="leave out the failing runs")
    main_job.set_defaults(handler=_main_job)
    for name, module in STUDIES.items():
        commands.add_parser(name, help=f"run a study ({module}); see `topoopt {name} --help`", add_help=False)
    return parser


# Studies parse their own options: `topoopt sparse --help`.
STUDIES = {
    "sparse": "topoopt.lab.studies.sparse_topologies",
    "small-data": "topoopt.lab.studies.small_data",
    "ablate": "topoopt.lab.studies.ablate",
    "learning-graphs": "topoopt.lab.studies.learning_graphs",
    "steer": "topoopt.lab.studies.steer",
    "stopping": "topoopt.lab.studies.stopping",
    "merging": "topoopt.lab.studies.merging",
    "failures": "topoopt.lab.studies.failures",
}


_FULL_DISK = "; free some space and run the same command again (train: with --resume): finished work is kept"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if hasattr(sys.stdout, "reconfigure"):  # in a log file too, each line as soon as it is printed
        sys.stdout.reconfigure(line_buffering=True)
    with caught_writer_errors() as background:
        status = _run_command(command, argv)
    if background and status == 0:  # the command finished, but a writer thread could not write
        full = _FULL_DISK if background[0].errno == errno.ENOSPC else ""
        print(f"topoopt {command}: a background writer (TensorBoard's) failed: {background[0]}{full}", file=sys.stderr)
        return 2
    return status


def _run_command(command: str | None, argv: list[str]) -> int:
    """Run one command; every error it can explain is one line on stderr and an exit status."""
    try:
        if command in STUDIES:
            import importlib

            importlib.import_module(STUDIES[command]).main(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.handler(args)
    except DatasetUnavailable as error:
        print(f"topoopt: {error}", file=sys.stderr)
        return 2
    except (FileExistsError, ValueError, RunFolderBusy) as error:  # bad options or files, a busy folder, ...
        print(f"topoopt {command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a folder or file that cannot be written or read (a full disk): errno, text and path
        print(f"topoopt {command}: {error}{_FULL_DISK if error.errno == errno.ENOSPC else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
