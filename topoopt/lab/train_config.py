"""The options of `topoopt train`, each declared once: its default, the values it accepts and its
help. The command line builds its parser from these declarations (`add_train_options`) and a run
checks its configuration against them (`check_config`), so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from topoopt.lab.data import DATASETS, default_model
from topoopt.lab.loop import OPTIMIZERS
from topoopt.lab.models import ACTIVATIONS, parse_model_spec
from topoopt.optimizer import COMPLEXITY_METRICS, POLICIES
from topoopt.penalty import PENALTY_METRICS

__all__ = ["TrainConfig", "add_train_options", "check_config"]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Accepts:
    """What an option accepts beyond a list of choices: a test (which may instead raise a
    `ValueError` saying what is wrong), the words that say it in an error, and how the command
    line reads the text (int or float; None: as it is)."""

    test: Callable[[Any], bool]
    says: str
    reads: type | None = None


COUNT = Accepts(lambda v: _is_integer(v) and v >= 1, "an integer ≥ 1", int)
POSITIVE = Accepts(lambda v: _is_number(v) and v > 0, "a finite number > 0", float)
NON_NEGATIVE = Accepts(lambda v: _is_number(v) and v >= 0, "a finite number ≥ 0", float)
FRACTION = Accepts(lambda v: _is_number(v) and 0 <= v < 1, "a finite number in [0, 1)", float)
SEED = Accepts(lambda v: _is_integer(v) and 0 <= v < 2**63, "an integer in [0, 2**63)", int)


def _model_spec(value) -> bool:
    if not isinstance(value, str):
        return False
    parse_model_spec(value)  # a ValueError says what is wrong with it
    return True


def option(default, *, accepts: Accepts | None = None, choices: Sequence | None = None, help: str | None = None,
           metavar=None, nargs: int | None = None, flag: str | None = None):
    """A `TrainConfig` field with its command-line declaration (`flag`: a store-false switch)."""
    return field(default=default, metadata={"accepts": accepts, "choices": choices, "help": help,
                                            "metavar": metavar, "nargs": nargs, "flag": flag})


@dataclass
class TrainConfig:
    dataset: str = option("mnist5k", choices=DATASETS)
    data_dir: str | None = option(None, help="folder with the dataset's files (mnist, fashion-mnist)")
    subset: int | None = option(None, accepts=COUNT, help="stratified training subset size")
    model: str | None = option(None, accepts=Accepts(_model_spec, "mlp:IN-H1-...-OUT"),
                               help="mlp:IN-H1-...-OUT (default: mlp:IN-100-100-10, IN the dataset's features: "
                                    "64 for digits, 784 else)")
    activation: str = option("relu", choices=tuple(sorted(ACTIVATIONS)))
    bias: bool = option(True, flag="--no-bias", help="Linear layers without bias")
    init: str = option("default", choices=("default", "zero", "normal"))
    init_std: float = option(1e-6, accepts=NON_NEGATIVE, help="std of --init normal")
    optimizer: str = option("sgd", choices=OPTIMIZERS)
    lr: float = option(0.05, accepts=POSITIVE)
    momentum: float = option(0.0, accepts=FRACTION, help="SGD momentum, in [0, 1)")
    weight_decay: float = option(0.0, accepts=NON_NEGATIVE)
    epochs: int = option(5, accepts=COUNT, help="total epochs; may be raised on --resume to extend a run")
    batch_size: int = option(64, accepts=COUNT)
    topo_optimizer: str | None = option(None, choices=tuple(sorted(POLICIES)), metavar="POLICY",
                                        help=f"wrap the optimizer in TopoOptimizer with this policy "
                                             f"({', '.join(POLICIES)})")
    topo_metric: str = option("normalized_entropy", choices=COMPLEXITY_METRICS)
    topo_strength: float = option(1.0, accepts=NON_NEGATIVE)
    topo_every: int = option(10, accepts=COUNT)
    topo_bounds: tuple[float, float] = option((0.25, 4.0), accepts=POSITIVE, nargs=2, metavar=("LOW", "HIGH"),
                                              help="range of each layer's step scale, LOW ≤ 1 ≤ HIGH")
    penalty: str | None = option(None, choices=PENALTY_METRICS, metavar="METRIC",
                                 help=f"add TopoPenalty on this metric ({', '.join(PENALTY_METRICS)})")
    penalty_weight: float = option(1e-3, accepts=NON_NEGATIVE)
    penalty_direction: str = option("minimize", choices=("minimize", "maximize"))
    penalty_every: int = option(1, accepts=COUNT)
    tree_every: int = option(1, accepts=COUNT)
    monitor_every: int = option(10, accepts=COUNT)
    diagrams_every: int = option(200, accepts=COUNT)
    seed: int = option(0, accepts=SEED)
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    log_dir: str | None = option(None, help="run folder (default tensorboard_logs/<run-name>)")
    run_name: str | None = option(None)

    def name(self) -> str:
        if self.run_name:
            return self.run_name
        parts = [self.dataset, self.optimizer]
        if self.topo_optimizer:
            parts.append(f"topo-{self.topo_optimizer}")
        if self.penalty:
            parts.append(f"pen-{self.penalty}")
        return "_".join(parts + [f"s{self.seed}"])

    def run_dir(self) -> Path:
        return Path(self.log_dir or Path("tensorboard_logs") / self.name())

    def resolved(self) -> "TrainConfig":
        """A checked copy with the dataset's default model filled in; a bad value is a
        `ValueError` naming the command-line option."""
        import dataclasses

        pair = tuple(self.topo_bounds) if isinstance(self.topo_bounds, (list, tuple)) else self.topo_bounds
        config = dataclasses.replace(self, topo_bounds=pair)
        check_config(config)
        if config.model is None:
            config.model = default_model(config.dataset)
        return config


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _reader(accepts: Accepts) -> Callable[[str], Any]:
    """The command line's reading of an option's text, refused in argparse's one line."""
    def read(text: str):
        if accepts.reads is None:
            value = text
        else:
            try:
                value = accepts.reads(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {accepts.says}, got {text!r}") from None
        try:
            accepted = accepts.test(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if not accepted:
            raise argparse.ArgumentTypeError(f"must be {accepts.says}, got {text}")
        return value

    return read


def add_train_options(parser: argparse.ArgumentParser, with_defaults: bool = True) -> None:
    """Every `TrainConfig` field as an option of `parser`; without defaults an option not given
    is left out of the parsed namespace (how a resumed run tells the options given)."""
    for spec in fields(TrainConfig):
        meta = spec.metadata
        default = spec.default if with_defaults else argparse.SUPPRESS
        if meta["flag"]:
            parser.add_argument(meta["flag"], dest=spec.name, action="store_false", default=default, help=meta["help"])
            continue
        kwargs: dict[str, Any] = {"default": default, "help": meta["help"]}
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if meta["accepts"] is not None:
            kwargs["type"] = _reader(meta["accepts"])
        for key in ("metavar", "nargs"):
            if meta[key] is not None:
                kwargs[key] = meta[key]
        parser.add_argument(_flag(spec.name), **kwargs)


def _refuse(name: str, value, requirement: str) -> None:
    raise ValueError(f"{_flag(name)} {value!r}: must be {requirement}")


def check_config(config: TrainConfig) -> None:
    """Every option's value against its declaration, then what options require of each other;
    a `ValueError` names the option."""
    for spec in fields(TrainConfig):
        value, meta = getattr(config, spec.name), spec.metadata
        if value is None and spec.default is None:
            continue
        if meta["choices"] is not None and value not in meta["choices"]:
            _refuse(spec.name, value, f"one of {', '.join(map(str, meta['choices']))}")
        accepts = meta["accepts"]
        if accepts is None:
            continue
        try:
            accepts.test(value)
        except ValueError as error:  # the test's own words
            raise ValueError(f"{_flag(spec.name)} {value}: {error}") from None
        if meta["nargs"]:
            if not (isinstance(value, tuple) and len(value) == meta["nargs"] and all(map(accepts.test, value))):
                _refuse(spec.name, value, f"{meta['nargs']} values, each {accepts.says}")
        elif not accepts.test(value):
            _refuse(spec.name, value, accepts.says)
    if config.momentum != 0 and config.optimizer != "sgd":
        _refuse("momentum", config.momentum, "0 with --optimizer adam/adamw (momentum is an SGD option)")
    low, high = config.topo_bounds
    if not low <= 1 <= high:
        _refuse("topo_bounds", config.topo_bounds, "two finite numbers LOW ≤ 1 ≤ HIGH (the range of each layer's "
                                                   "step scale)")
