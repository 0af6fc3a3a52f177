"""TensorBoard monitoring of per-layer topology during training.

Tag scheme (one place, `tag`): ``topology/<layer>/<metric>`` for metrics (and ``groups``),
``branching/<layer>`` for branching events, ``optim/<layer>/...`` for a `TopoOptimizer`'s
scales, ``topology_deaths/<layer>`` for histograms, ``topology_diagram/<layer>`` and
``topology_barcode/<layer>`` for figures (TensorBoard's Time Series page, where it opens, orders
groups alphabetically: these come after the signals of ``topology/``, not before). Dots in module names become ``/``.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from topoopt._validation import a_kind, check_instance, check_number, check_positive_int
from topoopt.cloud import cloud_norm, neuron_cloud
from topoopt.groups import BranchingDetector, BranchingEvent, group_count, group_sizes
from topoopt.layers import layer_parameters, user_stacklevel
from topoopt.measure import LayerMeter, MeterSettings
from topoopt.metrics import get_metric, mean_lifetime, normalized_persistent_entropy
from topoopt.optimizer import TopoOptimizer
from topoopt.plotting import new_figure
from topoopt.run_history import Alert, AlertWatch, RunHistory
from topoopt.tree_cache import TreeCache

__all__ = ["TopologyMonitor", "tag"]


def tag(group: str, layer: str, metric: str | None = None) -> str:
    """The TensorBoard tag of a layer's series: ``group/<layer with / for .>[/metric]``."""
    parts = [group, layer.replace(".", "/") or "model"]
    return "/".join(parts + ([metric] if metric else []))


SIGNALS = ("spread", "entropy_deficit")


def _topo_optimizer(optimizer: object) -> TopoOptimizer | None:
    """The TopoOptimizer whose scales the monitor logs: `optimizer` itself, or the one a
    framework's wrapper holds (accelerate's ``.optimizer``, Lightning's ``._optimizer``); None,
    said once, for an optimizer that scales nothing."""
    if optimizer is None:
        return None
    for found in (optimizer, getattr(optimizer, "optimizer", None), getattr(optimizer, "_optimizer", None)):
        if isinstance(found, TopoOptimizer):
            return found
    check_instance("optimizer", optimizer, torch.optim.Optimizer, "a TopoOptimizer (or None)")
    warnings.warn(f"TopologyMonitor: the optimizer is {a_kind(optimizer)}, not a TopoOptimizer: it scales no "
                  f"layer's step, so no lr_scale is logged", UserWarning, stacklevel=3)
    return None


def _signals(cloud: torch.Tensor | None, deaths: torch.Tensor) -> dict[str, float]:
    """`SIGNALS` of one layer: spread (mean lifetime / RMS neuron norm) and entropy deficit."""
    if cloud is None or deaths.numel() == 0:
        return {"spread": 0.0, "entropy_deficit": 0.0}
    rms = cloud_norm(cloud) / math.sqrt(cloud.shape[0])
    spread = float(mean_lifetime(deaths)) / rms if rms > 0 else 0.0
    return {"spread": spread, "entropy_deficit": 1.0 - float(normalized_persistent_entropy(deaths))}


def _label(name: str, layer) -> str:
    """A chart title: the layer's name, with its type and size where the name is a bare index."""
    if name and not name.split(".")[-1].split("[")[0].isdigit():
        return name
    kind = getattr(layer, "kind", type(layer).__name__)
    if any(_is_sharded(p) for p in layer_parameters(layer)):  # its shape would cost a gather on rank 0 alone
        return f"{name or 'model'} ({kind})"
    try:
        n, d = neuron_cloud(layer).shape
        return f"{name or 'model'} ({kind} {n}×{d})"
    except Exception:  # a lazy layer: no shape yet
        return name or "model"


class _NoWriter:
    """What ranks other than 0 write through: nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _is_sharded(tensor: torch.Tensor) -> bool:
    return type(tensor) is not torch.Tensor and hasattr(tensor, "placements")


def _is_writer_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _figures(name: str, deaths: torch.Tensor):
    values = deaths.detach().cpu().double().numpy()
    top = float(values.max()) if values.size else 1.0
    diagram = new_figure(figsize=(4.5, 4.5), layout="constrained")  # labels inside the image
    axes = diagram.subplots()
    axes.scatter([0.0] * len(values), values, s=8)
    axes.plot([0, top * 1.05], [0, top * 1.05], color="grey", linewidth=0.8)
    axes.set(xlabel="birth", ylabel="death", title=f"H0 diagram: {name}")
    barcode = new_figure(figsize=(6, 3.6), layout="constrained")
    axes = barcode.subplots()
    ordered = sorted(values, reverse=True)
    axes.hlines(range(len(ordered)), 0, ordered, linewidth=1.0)
    axes.set(xlabel="filtration value", ylabel="bar", title=f"H0 barcode: {name}")
    return diagram, barcode


class TopologyMonitor(MeterSettings):
    """Logs each layer's topology to TensorBoard every ``every`` steps; never breaks training.

    Call ``step(global_step)`` after each optimizer step, ``flush()`` each epoch, and
    ``close(hparams, final)`` at the end; or use it as a context manager.

    Parameters
    ----------
    model : nn.Module
        The model whose neuron clouds are logged (`topoopt.topological_layers`).
    log_dir : str or Path, optional
        Create and own a `SummaryWriter` there (exactly one of ``log_dir`` and ``writer``).
    writer : SummaryWriter, optional
        Write through this one and leave it open for its owner.
    every : int
        Log at the steps divisible by ``every``.
    metrics : str or sequence of str
        Metric names of `topoopt.METRIC_SPECS`.
    signals : bool
        Also log the signals that move on ordinary networks (`SIGNALS`): ``spread``, the mean
        lifetime over the RMS neuron norm (scale free: it falls when neurons collapse together,
        whatever the weights' size), and ``entropy_deficit``, 1 − normalized entropy (near 0 on a
        random cloud, where the entropy itself reads 0.9999: plot it on a log axis); with a
        `TopoOptimizer`, ``optim/<layer>/lr_change_pct``, (s − 1) in percent.
    diagrams_every : int
        Also log death histograms and persistence-diagram and barcode figures at the steps
        divisible by this (0: never).
    optimizer : TopoOptimizer, optional
        Also log its per-layer ``lr_scale`` and complexity.
    layers : list of str, optional
        Only these layers (all by default).
    embeddings_at : iterable of int
        Steps at which to log each layer's neuron cloud to the projector.
    trees : TreeCache, optional
        Where trees are kept (a new one by default). Measurements are exact whatever is shared:
        a tree is reused only for bit-identical weights.
    groups_ratio : float or None
        Log ``topology/<layer>/groups``, the number of groups of neurons: a gap in the spanning
        tree separates groups when it is at least this many times the layer's median gap (see
        `topoopt.groups`). None turns groups and branching events off, unless ``groups_scale``
        is given.
    groups_scale : float or mapping of layer name to float, optional
        Count groups at this absolute gap instead (per layer with a mapping; layers missing from
        it use ``groups_ratio``). A learning graph's clustering scale (Mapper's DBSCAN ``eps``,
        e.g. 0.1 for a first hidden layer and 0.5 for an output layer in Gabella et al.'s
        settings) makes the live events those of the learning graph (validated in
        experiments/RESULTS.md); the relative default counts only well-separated groups.
    branching_patience : int
        A rise of the group count is a branching event once it has held for this many
        consecutive logged measurements (hysteresis).
    on_branching : callable, optional
        Called as ``on_branching(layer, step, group_sizes)`` at each branching event.
    on_alert : callable, optional
        Called with each `Alert` (with ``signals``): a layer's spread fell tenfold below its first
        value (its neurons collapsing together), or neurons that coincide with another appeared
        (or grew by a tenth of the layer). Each alert is also a text entry ``alerts/<layer>``, a
        warning on the ``topoopt`` logger, and kept in ``alerts``. Their thresholds are stated in
        `topoopt.run_history`; how often they fire on healthy and failing runs is not yet measured.

    Each branching event is also logged as a scalar ``branching/<layer>`` (the new count) and a
    text entry naming the layer, the step and the sizes of the groups, and kept in ``events``.

    A layer whose topology cannot be computed is logged once as skipped, with the reason, and
    training goes on; it also warns once, naming the layer. Under DDP only rank 0 measures and
    writes; with sharded weights (FSDP2) every rank measures (gathering a layer's shards is a
    collective: call ``step`` on every rank) and rank 0 writes. Tags: see `tag`.
    """

    def __init__(
        self,
        model: nn.Module,
        log_dir: str | Path | None = None,
        *,
        writer=None,
        every: int = 1,
        metrics: Sequence[str] = ("normalized_entropy", "mean_lifetime"),
        signals: bool = True,
        diagrams_every: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        layers: Iterable[str] | None = None,
        embeddings_at: Iterable[int] = (),
        trees: TreeCache | None = None,
        groups_ratio: float | None = 4.0,
        groups_scale: float | Mapping[str, float] | None = None,
        branching_patience: int = 3,
        on_branching: Callable[[str, int, list[int]], None] | None = None,
        on_alert: Callable[[Alert], None] | None = None,
    ) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("Pass exactly one of log_dir and writer")
        check_positive_int("every", every)
        if diagrams_every != 0:  # 0 turns the figures off
            check_positive_int("diagrams_every", diagrams_every)
        if isinstance(metrics, str):  # one metric's name, not its letters
            metrics = (metrics,)
        self._metric_fns = {name: get_metric(name) for name in metrics}
        self.signals = bool(signals)
        self.history = RunHistory()
        self.hparams: Mapping[str, object] | None = None  # written at close (the `with` form sets them here)
        self.final: Mapping[str, float] | None = None
        self.meter = LayerMeter(model, layers, owner="TopologyMonitor", trees=trees)
        self.every = every
        self.diagrams_every = diagrams_every
        self.optimizer = _topo_optimizer(optimizer)
        self.embeddings_at = set(embeddings_at)
        check_number("groups_ratio", groups_ratio, low=1.0, low_open=True, none_ok=True)
        check_positive_int("branching_patience", branching_patience)
        self.groups_ratio = groups_ratio
        self.groups_scale = self._scales(groups_scale)
        self.on_branching = on_branching
        self.on_alert = on_alert
        self.alerts: list[Alert] = []
        self._watch = {name: AlertWatch() for name in self.layers}
        self.detectors = {name: BranchingDetector(branching_patience) for name in self.layers}
        self.events: list[BranchingEvent] = []
        self.skipped: dict[str, str] = {}
        self.last: dict[str, dict[str, float]] = {}
        self._active = _is_writer_rank()
        # Sharded weights (FSDP2) are gathered to be measured, a collective: then every rank
        # measures, in the same order, and only rank 0 writes.
        self._measures = self._active or any(_is_sharded(p) for layer in self.layers.values()
                                             for p in layer_parameters(layer))
        self._owns_writer = writer is None
        self.writer = None if self._active else _NoWriter()
        if self._active:
            if writer is None:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(log_dir=str(log_dir))
            self.writer = writer
            self._write_layout()

    def _scales(self, groups_scale) -> dict[str, float]:
        if groups_scale is None:
            return {}
        scales = (dict(groups_scale) if isinstance(groups_scale, Mapping)
                  else dict.fromkeys(self.layers, groups_scale))
        unknown = [name for name in scales if name not in self.layers]
        if unknown:
            raise ValueError(f"groups_scale names layer {unknown[0]!r}, which is not monitored: {list(self.layers)}")
        return {name: check_number(f"groups_scale for layer {name!r}", value, low=0.0)
                for name, value in scales.items()}

    def _write_layout(self) -> None:
        """Custom Scalars: one category per series, one chart per layer in it, so that every
        chart has one line per run and a layer's lines are never drawn over another's."""
        series = [("topology", metric) for metric in self._metric_fns]
        if self.signals:
            series += [("topology", signal) for signal in SIGNALS]
        if self.optimizer is not None:
            series += [("optim", "lr_change_pct")]
        layout = {}
        for group, metric in series:
            layout[metric] = {_label(name, layer): ["Multiline", [f"^{re.escape(tag(group, name, metric))}$"]]
                              for name, layer in self.layers.items()}
        self.writer.add_custom_scalars(layout)

    def _skip(self, name: str, reason: str, step: int) -> None:
        if name not in self.skipped:
            self.skipped[name] = reason
            if self._active:
                warnings.warn(f"TopologyMonitor could not log layer {name!r} at step {step} (it tries again at each "
                              f"step, and says this once): {reason}", RuntimeWarning, stacklevel=user_stacklevel())
            self.writer.add_text(f"skipped/{name}", f"topology not computed: {reason}", step)

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The monitored layers by name (the meter's)."""
        return self.meter.layers


    @torch.no_grad()
    def step(self, global_step: int) -> None:
        """Log what is due at `global_step`."""
        if not self._measures or global_step % self.every:
            return
        diagrams = self.diagrams_every and global_step % self.diagrams_every == 0
        # Every cloud read once and every layer measured in one call (an observer: the cache stays
        # as training left it); when that fails, layer by layer below, to name the one that fails.
        try:
            clouds = self.meter.clouds()
            measured = self.meter.deaths(clouds, passive=True)
        except Exception:
            clouds, measured = {}, None
        for name, module in self.layers.items():
            try:
                if measured is None:
                    cloud = self.meter.cloud(name)
                    deaths = None if cloud is None else self.meter.deaths({name: cloud}, passive=True)[name]
                else:
                    cloud, deaths = clouds.get(name), measured.get(name)
                deaths = torch.zeros(0) if deaths is None else deaths.detach()
                values = {metric: float(fn(deaths)) for metric, fn in self._metric_fns.items()}
            except Exception as error:  # logging must never stop training
                self._skip(name, f"{type(error).__name__}: {error}", global_step)
                continue
            if self.signals:
                try:
                    values.update(_signals(cloud, deaths))
                except Exception as error:  # a signal that cannot be computed never stops the others
                    self._skip(name, f"{type(error).__name__}: {error}", global_step)
            self.last[name] = values
            for metric, value in values.items():
                self.writer.add_scalar(tag("topology", name, metric), value, global_step)
            try:
                if self.groups_ratio is not None or name in self.groups_scale:
                    self._log_groups(name, module, deaths, global_step)
                if diagrams and deaths.numel():
                    self._log_diagrams(name, deaths, global_step)
                if global_step in self.embeddings_at:
                    cloud = neuron_cloud(module).detach().float().cpu()
                    self.writer.add_embedding(cloud, tag=tag("cloud", name).replace("/", "_"), global_step=global_step)
            except OSError:  # the writer's disk, not the layer: the caller must hear it
                raise
            except Exception as error:  # a figure or histogram that cannot be made (overflowing deaths, say)
                self._skip(name, f"{type(error).__name__}: {error}", global_step)
            self.history.record(name, self.last[name], global_step)
            if self.signals:
                for alert in self._watch[name].update(name, global_step, self.last[name], deaths, cloud):
                    self._raise_alert(alert)
        if self.optimizer is not None:
            for name, scale in self.optimizer.scales.items():
                self.writer.add_scalar(tag("optim", name, "lr_scale"), scale, global_step)
                self.writer.add_scalar(tag("optim", name, "lr_change_pct"), 100.0 * (scale - 1.0), global_step)
                self.history.record_scale(name, scale)
                if name in self.optimizer.complexity:
                    self.writer.add_scalar(tag("optim", name, "complexity"), self.optimizer.complexity[name],
                                           global_step)

    def _log_diagrams(self, name: str, deaths: torch.Tensor, step: int) -> None:
        values = deaths.detach().float().cpu()
        # TensorBoard bins up to 1e20 and calls anything beyond "an empty histogram, please file a
        # bug report", which would send the user the wrong way
        if not bool(torch.isfinite(values).all()) or float(values.max()) > 1e20:
            raise ValueError(f"its H0 deaths are beyond a TensorBoard histogram's range of 1e20 (longest "
                             f"{float(deaths.max()):.3g}): no histogram or figure")
        self.writer.add_histogram(tag("topology_deaths", name), values, step)
        diagram, barcode = _figures(name, deaths)
        self.writer.add_figure(tag("topology_diagram", name), diagram, step)
        self.writer.add_figure(tag("topology_barcode", name), barcode, step)

    def _raise_alert(self, alert: Alert) -> None:
        self.alerts.append(alert)
        if not self._active:  # under sharding every rank measures; rank 0 speaks
            return
        self.writer.add_text(tag("alerts", alert.layer), alert.message, alert.step)
        logging.getLogger("topoopt").warning("%s", alert.message)
        if self.on_alert is not None:
            self.on_alert(alert)

    def _log_groups(self, name: str, module: nn.Module, deaths: torch.Tensor, step: int) -> None:
        scale = self.groups_scale.get(name)
        count = group_count(deaths, self.groups_ratio or 4.0, scale=scale)
        self.last[name]["groups"] = float(count)
        self.writer.add_scalar(tag("topology", name, "groups"), count, step)
        rise = self.detectors[name].update(count, step)
        if rise is None:
            return
        first_seen, before, after = rise
        cloud = self.meter.cloud(name)
        u, v = self.meter.edges(name, cloud, passive=True)  # the tree of the deaths just measured
        sizes = group_sizes(deaths, u, v, cloud.shape[0], self.groups_ratio or 4.0, scale=scale)
        event = BranchingEvent(name, step, first_seen, before, after, tuple(sizes))
        self.events.append(event)
        self.writer.add_scalar(tag("branching", name), after, step)
        self.writer.add_text(tag("branching", name),
                             f"step {step}: layer {name} branched from {before} to {after} groups "
                             f"(first seen at step {first_seen}); group sizes {sizes}", step)
        if self.on_branching is not None and self._active:
            self.on_branching(name, step, sizes)

    def log_scalars(self, values: Mapping[str, float], global_step: int) -> None:
        """Log training scalars (loss, accuracy) beside the topology, under their own tags."""
        if self._active:
            for key, value in values.items():
                self.writer.add_scalar(key, value, global_step)

    def flush(self) -> None:
        if self._active:
            self.writer.flush()

    def verdict(self) -> str:
        """What the run's topology did, in a few lines: each layer's signals from first to last
        measurement, how far the optimizer's scales moved, the alerts raised, what was skipped."""
        return self.history.verdict(self.events, self.skipped, self.optimizer is not None, self.alerts)

    def close(self, hparams: Mapping[str, object] | None = None, final: Mapping[str, float] | None = None) -> None:
        """Write the verdict (a text entry, and the ``topoopt`` logger at INFO), the hparams entry
        (booleans as strings, final metrics, every layer's last topology), and close an owned
        writer. Without `hparams` and `final`, those set on the monitor (``monitor.hparams``,
        ``monitor.final``) are used, so that the ``with`` form writes them too; with neither, the
        monitor's own settings stand as the hparams."""
        if not self._active or self.writer is None:
            self.writer = None
            return
        hparams = hparams if hparams is not None else self.hparams
        final = final if final is not None else self.final
        if hparams is None and self.history.steps:  # the `with` form: the monitor's own settings
            hparams = {"monitor_every": self.every, "layers": len(self.layers), "signals": self.signals,
                       "topo_optimizer": self.optimizer is not None}
        try:
            if self.history.steps:
                text = self.verdict()
                logging.getLogger("topoopt").info("%s", text)
                self.writer.add_text("verdict", text.replace("\n", "  \n"), self.history.steps[-1])
            if hparams is not None:
                self._write_hparams(hparams, final)
            self.writer.flush()
        finally:
            if self._owns_writer:
                self.writer.close()
            self.writer = None

    def _write_hparams(self, hparams: Mapping[str, object], final: Mapping[str, float] | None) -> None:
        """The HParams entry of this run: `hparams` (booleans and None as strings), the `final`
        metrics (one scalar each, ``hparam/<name>``) and every layer's topology, read from its own
        series (``topology/<layer>/<metric>``) instead of a one-point copy of each, which would
        fill TensorBoard's first page with single dots."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        log_dir = self.writer.get_logdir() if isinstance(self.writer, SummaryWriter) else None
        if log_dir is None:
            return
        plain = {k: (str(v) if isinstance(v, bool) or v is None else v) for k, v in hparams.items()}
        plain = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in plain.items()}
        ends = {f"hparam/{k}": float(v) for k, v in (final or {}).items() if math.isfinite(float(v))}
        series = {tag("topology", name, metric): value for name, values in self.last.items()
                  for metric, value in values.items()}
        summaries = hparams_summaries(plain, {**ends, **series})
        step = self.history.steps[-1] if self.history.steps else 0
        with SummaryWriter(log_dir=log_dir) as session:  # as add_hparams does, into the same run
            for summary in summaries:
                session.file_writer.add_summary(summary)
            for key, value in ends.items():
                session.add_scalar(key, value, step)

    def __enter__(self) -> "TopologyMonitor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
