"""The `topoopt` command line: `topoopt train ...` and `topoopt main` (the job behind `make run`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from topoopt.data import DATASETS, DatasetUnavailable
from topoopt.optimizer import COMPLEXITY_METRICS, POLICIES
from topoopt.penalty import PENALTY_METRICS

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _model_spec(text: str) -> str:
    from topoopt.models import parse_model_spec

    try:
        parse_model_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    defaults = _defaults()
    parser.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    parser.add_argument("--data-dir", default=None, help="folder with the dataset's files (mnist, fashion-mnist)")
    parser.add_argument("--subset", type=_positive_int, default=None, help="stratified training subset size")
    parser.add_argument("--model", type=_model_spec, default=defaults.model, help="mlp:IN-H1-...-OUT (default %(default)s)")
    parser.add_argument("--activation", choices=["relu", "sigmoid", "tanh", "gelu"], default=defaults.activation)
    parser.add_argument("--no-bias", dest="bias", action="store_false", help="Linear layers without bias")
    parser.add_argument("--init", choices=["default", "zero", "normal"], default=defaults.init)
    parser.add_argument("--init-std", type=float, default=defaults.init_std, help="std of --init normal")
    parser.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=defaults.optimizer)
    parser.add_argument("--lr", type=_positive_float, default=defaults.lr)
    parser.add_argument("--momentum", type=float, default=defaults.momentum)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--epochs", type=_positive_int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    parser.add_argument("--topo-optimizer", choices=sorted(POLICIES), default=None, metavar="POLICY",
                        help=f"wrap the optimizer in TopoOptimizer with this policy ({', '.join(POLICIES)})")
    parser.add_argument("--topo-metric", choices=COMPLEXITY_METRICS, default=defaults.topo_metric)
    parser.add_argument("--topo-strength", type=float, default=defaults.topo_strength)
    parser.add_argument("--topo-every", type=_positive_int, default=defaults.topo_every)
    parser.add_argument("--topo-bounds", type=_positive_float, nargs=2, default=defaults.topo_bounds, metavar=("LOW", "HIGH"))
    parser.add_argument("--penalty", choices=PENALTY_METRICS, default=None, metavar="METRIC",
                        help=f"add TopoPenalty on this metric ({', '.join(PENALTY_METRICS)})")
    parser.add_argument("--penalty-weight", type=float, default=defaults.penalty_weight)
    parser.add_argument("--penalty-direction", choices=["minimize", "maximize"], default=defaults.penalty_direction)
    parser.add_argument("--penalty-every", type=_positive_int, default=defaults.penalty_every)
    parser.add_argument("--tree-every", type=_positive_int, default=defaults.tree_every)
    parser.add_argument("--monitor-every", type=_positive_int, default=defaults.monitor_every)
    parser.add_argument("--diagrams-every", type=_positive_int, default=defaults.diagrams_every)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=defaults.device)
    parser.add_argument("--log-dir", default=None, help="run folder (default tensorboard_logs/<run-name>)")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--resume", action="store_true", help="continue the run in --log-dir from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _defaults():
    from topoopt.training import TrainConfig

    return TrainConfig()


def _config(args: argparse.Namespace):
    from topoopt.training import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def _train(args: argparse.Namespace) -> int:
    from topoopt.training import train

    summary = train(_config(args), resume=args.resume, progress=not args.quiet)
    print(f"test accuracy {summary['test_accuracy']:.4f}; run folder {summary['run_dir']}")
    return 0


def _main_job(args: argparse.Namespace) -> int:
    """mnist5k twice: the plain optimizer, then TopoOptimizer + TopoPenalty; a side-by-side table."""
    import time

    from topoopt.report import format_table
    from topoopt.training import TrainConfig, train

    started = time.perf_counter()

    common = dict(dataset="mnist5k", model="mlp:784-100-100-10", optimizer="sgd", lr=0.1, momentum=0.9,
                  epochs=args.epochs, seed=args.seed, diagrams_every=100)
    runs = {
        "plain": TrainConfig(**common, run_name=f"main_plain_s{args.seed}"),
        "topo": TrainConfig(**common, topo_optimizer="calm", topo_strength=2.0, penalty="normalized_entropy",
                            penalty_direction="maximize", penalty_weight=0.01, run_name=f"main_topo_s{args.seed}"),
    }
    summaries = {}
    for label, config in runs.items():
        config.log_dir = f"{args.log_root}/{config.run_name}"
        summaries[label] = train(config, resume=True, progress=not args.quiet)
    plain, topo = summaries["plain"], summaries["topo"]
    rows = [["test accuracy", plain["test_accuracy"], topo["test_accuracy"]],
            ["train accuracy", plain["train_accuracy"], topo["train_accuracy"]],
            ["seconds", plain["seconds"], topo["seconds"]]]
    for layer in ("fc1", "fc2", "fc3"):
        for metric in ("normalized_entropy", "mean_lifetime"):
            key = f"{layer}/{metric}"
            rows.append([key, plain[key], topo[key]])
    print()
    print(format_table(["mnist5k, 784-100-100-10, SGD", "plain", "TopoOptimizer + TopoPenalty"], rows))
    if not args.skip_learning_graphs:
        from topoopt.studies import learning_graphs

        print("\nLearning graphs (Gabella et al. 2019), quick runs on mnist5k:")
        for setting in ("tree", "surface"):
            learning_graphs.main(["--setting", setting, "--quick"])
        print(f"Graphs (PNG, JSON, HTML): {learning_graphs.RESULTS_DIR / 'quick'}")
    print(f"\nMain job finished in {time.perf_counter() - started:.0f} s.")
    print(f"Look at the runs: tensorboard --logdir {args.log_root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="topoopt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one model with optional topology-aware optimizer and penalty")
    _add_train_options(train)
    train.set_defaults(handler=_train)
    main_job = commands.add_parser("main", help="the main job behind `make run` (offline, mnist5k)")
    main_job.add_argument("--epochs", type=_positive_int, default=10)
    main_job.add_argument("--seed", type=int, default=0)
    main_job.add_argument("--log-root", default="tensorboard_logs")
    main_job.add_argument("--quiet", action="store_true")
    main_job.add_argument("--skip-learning-graphs", action="store_true", help="only the plain/topology comparison")
    main_job.set_defaults(handler=_main_job)
    for name, module in STUDIES.items():
        commands.add_parser(name, help=f"run a study ({module}); see `topoopt {name} --help`", add_help=False)
    return parser


# Studies parse their own options: `topoopt sparse --help`.
STUDIES = {
    "sparse": "topoopt.studies.sparse_topologies",
    "small-data": "topoopt.studies.small_data",
    "ablate": "topoopt.studies.ablate",
    "learning-graphs": "topoopt.studies.learning_graphs",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STUDIES:
        import importlib

        try:
            importlib.import_module(STUDIES[argv[0]]).main(argv[1:])
        except DatasetUnavailable as error:
            print(f"topoopt: {error}", file=sys.stderr)
            return 2
        return 0
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DatasetUnavailable as error:
        print(f"topoopt: {error}", file=sys.stderr)
        return 2
    except (FileExistsError, ValueError) as error:  # bad combinations of options, NaN weights, ...
        print(f"topoopt {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
