"""The one measuring seam: which clouds a tool measures, and how.

`TopoPenalty`, `TopoOptimizer`, `TopologyMonitor`, `TopologyEarlyStopping` and `layer_topology`
each hold a `LayerMeter`. It owns the layers (chosen once, with the coverage warning), whether a
neuron's bias is part of its point, how often trees are searched (``tree_every``), the tree cache
and its keys, and the passive rule (observers never change the trees training uses; see
`topoopt.TreeCache`). The tools decide only what to do with the deaths. `layer_topology`, the
one-shot report, is a meter's measurement summarised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from topoopt._range import needs_rescaling, rescale_exponent, rescaled_deaths
from topoopt._validation import check_instance, check_positive_int, compiled_all_finite
from topoopt.cloud import layer_cloud, neuron_cloud
from topoopt.layers import layer_parameters, select_layers
from topoopt.metrics import (
    max_lifetime,
    mean_lifetime,
    normalized_persistent_entropy,
    persistent_entropy,
    total_persistence,
)
from topoopt.neurons import plain_weight_rows
from topoopt.tree_cache import ExactTerm, TreeCache, cache_key

__all__ = ["LayerMeter", "MeterSettings", "LayerTopology", "layer_topology"]


def _sharded(model: nn.Module | None, layers: Mapping[str, Any]) -> bool:
    """Whether the weights are sharded across ranks (FSDP2 or DTensors): their clouds are then
    gathered, and between forward and backward FSDP may lend a layer a gathered weight that it
    frees during backward, so nothing may keep a host view of it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        FSDPModule = ()  # noqa: N806
    if isinstance(model, nn.Module) and FSDPModule and any(isinstance(m, FSDPModule) for m in model.modules()):
        return True
    return any(type(p) is not torch.Tensor and hasattr(p, "placements")
               for layer in layers.values() for p in layer_parameters(layer))


def _longest(deaths: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each non-empty diagram's longest death, with one host sync for them all (not one a layer)."""
    named = [(name, d) for name, d in deaths.items() if d.numel()]
    if not named:
        return {}
    if all(d.device.type == "cpu" for _, d in named):  # no sync to save: each read straight
        return {name: float(d.detach().numpy().max()) for name, d in named}
    device = named[0][1].device
    wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    values = torch.stack([d.detach().max().to(device, wide) for _, d in named]).tolist()
    return {name: value for (name, _), value in zip(named, values)}


class LayerMeter:
    """The layers one tool measures, with its bias rule, tree reuse and tree cache.

    Parameters
    ----------
    model : nn.Module
        The model whose neuron clouds are measured.
    layers : list of names or mapping, optional
        As `topoopt.select_layers` takes them (all clouds by default).
    owner : str
        The tool's name, for the coverage warning and errors.
    include_bias : bool
        Append each neuron's bias to its point.
    tree_every : int
        Search each tree at most every m-th measurement (1: exact).
    trees : TreeCache, optional
        Where trees are kept (a new cache by default); share one between tools of one model.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | Mapping[str, Any] | None = None, *,
                 owner: str, include_bias: bool = False, tree_every: int = 1,
                 trees: TreeCache | None = None) -> None:
        check_positive_int("tree_every", tree_every)
        if trees is not None:
            check_instance("trees", trees, TreeCache, "a topoopt.TreeCache")
        self.layers = select_layers(model, layers, owner=owner)
        self.sharded = _sharded(model, self.layers)
        self.include_bias = bool(include_bias)
        self.tree_every = tree_every
        self.trees = trees if trees is not None else TreeCache()

    def __repr__(self) -> str:
        return (f"LayerMeter(layers={list(self.layers)}, include_bias={self.include_bias}, "
                f"tree_every={self.tree_every})")

    def key(self, name: str) -> str:
        """The tree cache's entry of a layer's cloud."""
        return cache_key(name, self.include_bias)

    def clouds(self, names: Iterable[str] | None = None, fewest: int = 1) -> dict[str, torch.Tensor]:
        """The checked clouds of the named layers (all by default), keeping their graphs;
        layers with no geometry (no neurons or no inputs) or fewer than `fewest` neurons are
        left out. Errors name the layer."""
        found = {}
        for name in self.layers if names is None else names:
            cloud = self.cloud(name)
            if cloud is not None and cloud.shape[0] >= fewest:
                found[name] = cloud
        return found

    def cloud(self, name: str) -> torch.Tensor | None:
        """One layer's checked cloud (`topoopt.cloud.layer_cloud`), a copy when sharded."""
        return layer_cloud(name, self.layers[name], self.include_bias, copy=self.sharded)

    def deaths(self, clouds: Mapping[str, torch.Tensor], passive: bool = False) -> dict[str, torch.Tensor]:
        """Each cloud's H0 deaths in tree order, all searched and measured in one call (the
        small clouds batched); ``passive`` for an observer. A cloud at the end of its dtype's
        range is measured rescaled by a power of two, exactly (`topoopt._range`)."""
        try:
            keyed = self.trees.deaths_many({self.key(name): cloud for name, cloud in clouds.items()},
                                           self.tree_every, passive)
            found = {name: keyed[self.key(name)] for name in clouds}
        except OverflowError:  # some cloud's search overflowed: each on its own below
            found = {}
        longest = _longest(found)  # every layer's longest death, read back at once
        for name, cloud in clouds.items():
            deaths = found.get(name)
            if deaths is not None and (deaths.numel() == 0 or not needs_rescaling(longest[name], cloud.dtype)):
                continue
            found[name] = self._rescaled_deaths(name, cloud, deaths, passive)
        return found

    def clouds_and_deaths(self, names: Iterable[str], fewest: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each named layer's detached cloud and its deaths (`deaths`, not passive), for a tool
        that only reads them; layers as `clouds` leaves them out are left out. A built-in layer
        whose cloud was measured just before through the shared cache (a `TopoOptimizer` after
        a `TopoPenalty`, in one step) gets those deaths, the kept tensor, and its cloud is not
        looked over again: it is bit for bit the cloud that was checked then."""
        known: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        rest = []
        for name in names:
            rows = None if self.sharded or self.include_bias else plain_weight_rows(self.layers[name])
            deaths = None
            if rows is not None and rows.shape[0] >= fewest:
                rows = rows.detach()
                deaths = self.trees.known_deaths(self.key(name), rows, self.tree_every)
            if deaths is None:
                rest.append(name)
            else:
                known[name] = (rows, deaths)
        longest = _longest({name: deaths for name, (_, deaths) in known.items()})
        for name, (rows, deaths) in list(known.items()):  # kept before a rescaled measurement
            if deaths.numel() and needs_rescaling(longest[name], rows.dtype):
                del known[name]
                rest.append(name)
        clouds = {name: cloud.detach() for name, cloud in self.clouds(rest, fewest).items()} if rest else {}
        measured = self.deaths(clouds) if clouds else {}
        return {name: known[name] if name in known else (clouds[name], measured[name])
                for name in names if name in known or name in clouds}

    def _rescaled_deaths(self, name: str, cloud: torch.Tensor, deaths: torch.Tensor | None,
                         passive: bool) -> torch.Tensor:
        """The deaths of one cloud measured at a scale where the engine is exact, scaled back."""
        k = rescale_exponent(cloud)
        if k == 0:  # of ordinary size: its first deaths stand (tiny ones are near-duplicates)
            if deaths is not None:
                return deaths
            key = self.key(name)
            try:
                return self.trees.deaths_many({key: cloud}, self.tree_every, passive)[key]
            except OverflowError:
                raise ValueError(f"Layer {name!r}: its squared distances overflow {cloud.dtype}") from None
        key = f"{self.key(name)}@2^{k}"  # its own tree entry, so that exact reuse still applies
        return rescaled_deaths(lambda scaled: self.trees.deaths_many({key: scaled}, self.tree_every, passive)[key],
                               cloud, k)

    def measure(self, names: Iterable[str] | None = None, passive: bool = False) -> dict[str, torch.Tensor | None]:
        """`deaths` of the named layers' clouds (all by default); None for a layer with no
        geometry to measure."""
        chosen = list(self.layers) if names is None else list(names)
        clouds = self.clouds(chosen)
        deaths = self.deaths(clouds, passive)
        return {name: deaths.get(name) for name in chosen}

    def plain_clouds(self, names: Iterable[str]) -> dict[str, torch.Tensor] | None:
        """Each named layer's cloud read straight from its weight (`plain_weight_rows`), unchecked,
        for `exact_terms`, which checks them; None unless every one is a built-in layer's and
        the meter neither shards nor appends biases."""
        if self.sharded or self.include_bias:
            return None
        clouds = {}
        for name in names:
            rows = plain_weight_rows(self.layers[name])
            if rows is None:
                return None
            clouds[name] = rows
        return clouds

    def exact_terms(self, clouds: Mapping[str, torch.Tensor], code: int, coefficients: Mapping[str, float],
                    sign: float, target: float | None, gradients: bool = True) -> dict[str, ExactTerm] | None:
        """`TreeCache.exact_terms` of the named clouds (a training step's exact lookups and
        penalty terms), keyed by name; None where it does not take them (then nothing changed),
        or ``tree_every`` is not 1."""
        if self.tree_every != 1:
            return None
        keys = {name: self.key(name) for name in clouds}
        found = self.trees.exact_terms({keys[name]: cloud for name, cloud in clouds.items()}, code,
                                       {keys[name]: coefficients[name] for name in clouds}, sign, target, gradients)
        return None if found is None else {name: found[keys[name]] for name in clouds}

    def exact_measurements(self, names: Iterable[str], code: int, fewest: int) -> dict[str, tuple]:
        """(cloud, `ExactTerm` without gradient) of the named built-in layers of `fewest` or more
        neurons, all measured in one compiled call (`exact_terms`), for a tool that only reads
        them (a `TopoOptimizer`'s measuring step); empty where that call does not take them
        all, and without the layers whose deaths left the engine's exact range. The caller
        measures what is missing the general way (`clouds_and_deaths`)."""
        clouds = self.plain_clouds(names)
        if not clouds:
            return {}
        measured = {name: rows.detach() for name, rows in clouds.items()
                    if rows.shape[0] >= max(fewest, 2) and rows.shape[1] >= 1}
        if not all(compiled_all_finite(rows) is not False for name, rows in clouds.items() if name not in measured):
            return {}  # a layer left out is not finite: the general path names it before any search, as always
        clouds = measured
        found = self.exact_terms(clouds, code, dict.fromkeys(clouds, 0.0), 1.0, None, gradients=False) \
            if clouds else None
        if found is None:
            return {}
        return {name: (clouds[name], term) for name, term in found.items() if term.exact}

    def known_metrics(self, names: Iterable[str], code: int, fewest: int = 1) -> dict[str, float]:
        """The metric of code `code` of each named built-in layer's cloud that `exact_terms`
        measured bit for bit as it is now (`TreeCache.known_metric`): a second tool's lookup in
        one step, with nothing looked up or counted. Layers with fewer than `fewest` neurons
        are left out, as `clouds` leaves them out."""
        if self.sharded or self.include_bias:
            return {}
        found = {}
        for name in names:
            rows = plain_weight_rows(self.layers[name])
            if rows is not None and rows.shape[0] >= fewest:
                value = self.trees.known_metric(self.key(name), rows.detach(), code)
                if value is not None:
                    found[name] = value
        return found

    def trees_for(self, clouds: Mapping[str, torch.Tensor], passive: bool = False) -> dict[str, tuple]:
        """Each cloud's tree as (u, v, exact), for a caller that measures the edges itself and
        hands the deaths back with `remember_deaths`."""
        keyed = self.trees.trees_for({self.key(name): cloud for name, cloud in clouds.items()}, self.tree_every,
                                     passive)
        return {name: keyed[self.key(name)] for name in clouds}

    def remember_deaths(self, name: str, deaths: torch.Tensor, exact: bool, copy: bool = True) -> None:
        self.trees.remember_deaths(self.key(name), deaths, exact, copy=copy)

    def edges(self, name: str, cloud: torch.Tensor, passive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The tree (u, v) of one cloud, as `measure` would use it."""
        return self.trees.edges(self.key(name), cloud, self.tree_every, passive)



class MeterSettings:
    """The measuring settings a tool keeps in its `LayerMeter` (``self.meter``), readable and
    settable on the tool itself: its tree cache, ``tree_every`` and ``include_bias``."""

    meter: LayerMeter

    @property
    def trees(self) -> TreeCache:
        return self.meter.trees

    @trees.setter
    def trees(self, trees: TreeCache) -> None:
        check_instance("trees", trees, TreeCache, "a topoopt.TreeCache")
        self.meter.trees = trees

    @property
    def tree_every(self) -> int:
        return self.meter.tree_every

    @tree_every.setter
    def tree_every(self, tree_every: int) -> None:
        check_positive_int("tree_every", tree_every)
        self.meter.tree_every = tree_every

    @property
    def include_bias(self) -> bool:
        return self.meter.include_bias

    @include_bias.setter
    def include_bias(self, include_bias: bool) -> None:
        self.meter.include_bias = bool(include_bias)


@dataclass(frozen=True)
class LayerTopology:
    """H0 summary of one layer's neuron cloud (plain floats, detached from autograd)."""

    n_neurons: int
    dim: int
    normalized_entropy: float
    entropy: float
    mean_lifetime: float
    total_persistence: float
    max_lifetime: float
    zero_bars: int
    weight_norm: float
    deaths: torch.Tensor


@torch.no_grad()
def layer_topology(
    model: nn.Module, layers: Iterable[str] | Mapping[str, Any] | None = None, include_bias: bool = False
) -> dict[str, LayerTopology]:
    """H0 deaths and metrics of every neuron cloud of `model` (or of those in `layers`, as
    `select_layers` takes them), all measured in one call; what it leaves out is said once, as a
    warning."""
    meter = LayerMeter(model, layers, owner="layer_topology", include_bias=include_bias)
    measured = meter.measure(passive=True)
    report = {}
    for name, layer in meter.layers.items():
        deaths = measured[name]
        if deaths is None:  # no neurons or no inputs: an empty diagram
            cloud = torch.zeros(neuron_cloud(layer, include_bias=include_bias).shape)
            deaths = cloud.new_zeros(0)
        else:
            cloud = layer_cloud(name, layer, include_bias).detach()
            deaths = deaths.detach().sort().values
        report[name] = LayerTopology(
            n_neurons=cloud.shape[0],
            dim=cloud.shape[1],
            normalized_entropy=float(normalized_persistent_entropy(deaths)),
            entropy=float(persistent_entropy(deaths)),
            mean_lifetime=float(mean_lifetime(deaths)),
            total_persistence=float(total_persistence(deaths)),
            max_lifetime=float(max_lifetime(deaths)),
            zero_bars=int((deaths == 0).sum()),
            weight_norm=float(torch.linalg.vector_norm(cloud.double())),
            deaths=deaths.cpu(),
        )
    return report
