"""Spanning trees of layers' neuron clouds, kept between measurements by an explicit owner.

Searching a layer's tree costs O(N²·d); re-measuring its N−1 edges costs O(N·d). A `TreeCache`
keeps, for each layer, the tree and a copy of the cloud it was searched on:

- **Exact reuse.** A lookup whose cloud is bit-for-bit the searched one reuses the tree. The
  contents are compared, not `Tensor._version` or `data_ptr`: writes through ``.data`` (EMA,
  clipping, Lookahead, ``load_state_dict`` helpers) leave the version counter unchanged.
- **Approximate reuse**, only when the caller asks for it with ``tree_every=m > 1``: up to m − 1
  lookups of moved weights re-measure the old tree's edges before the next search. The entry
  keeps the cloud it was *searched on*, so a later exact lookup (``tree_every=1``) of moved
  weights always searches again: an approximate tree can never reach an exact caller.
  Measured on this project's machines: a tree from 1 SGD step earlier
  gave a worst sorted-death error of 0.3%, from 10 steps earlier 2.4%.

Owner and sharing rule: `TopoPenalty`, `TopoOptimizer` and `TopologyMonitor` each create their
own cache unless one is passed as ``trees=``. Pass one cache to several of them (of one model)
to search once per step between them. The approximate-reuse count is then shared: a lookup of
weights that moved counts once, and a lookup of the very cloud the last approximate lookup saw
(an optimizer right after a penalty, in one step) counts nothing and, without a graph, gets the
deaths measured then (the entry keeps a copy of that cloud to compare). Entries are keyed by
layer name (and whether the bias is included). ``state_dict()`` holds every entry as plain
tensors and ints, so a resumed run reuses exactly the trees the interrupted one would have.

Observers are passive: a lookup with ``passive=True`` (a `TopoPenalty` call that builds no graph,
`TopologyMonitor`, `TopologyEarlyStopping`) never changes the entries training uses. It reuses a
tree where its own `tree_every` allows without counting the reuse; otherwise it searches, and
keeps that tree apart, with a copy of its cloud, for exact reuse only: a later lookup of that very
cloud that would have searched (training's next step, after a monitor logged the new weights)
takes it instead, as found by the same deterministic search, and carries on as if it had searched
itself. So logging or monitoring through a shared cache never changes which trees training gets
(with ``tree_every > 1`` a counted reuse would move the trajectory), and a monitor still
saves training a search.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from topoopt import _native, spanning_tree
from topoopt._range import needs_rescaling
from topoopt._threads import PARALLEL_MIN_ELEMENTS
from topoopt._validation import check_positive_int
from topoopt.cloud import layer_cloud
from topoopt.many_clouds import edge_lengths_many, trees_of_many
from topoopt.persistence import edge_lengths
from topoopt.spanning_tree import (
    BLOCK_ROWS,
    EXACT_PAIRS_PER_POINT,
    NEAR_PAIR_RATIO,
    compiled_tree,
    euclidean_mst_edges,
    native_small_tree_handles,
    tree_without_the_compiled_search,
)

__all__ = ["TreeCache", "cache_key", "measure_layer", "measure_layers"]


@dataclass
class _Entry:
    searched_on: torch.Tensor  # a detached copy of the cloud the tree was searched on
    u: torch.Tensor
    v: torch.Tensor
    reuses: int = 0  # approximate lookups served since the search
    deaths: torch.Tensor | None = None  # the searched cloud's deaths (tree order, detached), once measured
    moved: torch.Tensor | None = None  # a copy of the cloud of the last approximate lookup
    moved_deaths: torch.Tensor | None = None  # its deaths, once measured
    spare: torch.Tensor | None = None  # memory for the next `moved` copy (that of the last search's)
    metric: tuple[int, float] | None = None  # (code, value) of `deaths`' metric, when the engine measured it
    views: tuple | None = None  # numpy views of searched_on, u and v, for the compiled lookups

    def __getstate__(self) -> dict[str, Any]:
        # A copy's views would be arrays of their own, no longer searched_on's memory: made again
        return {**self.__dict__, "views": None}


class TreeCache:
    """Per-layer minimum spanning trees, reused only where that is exact or asked for.

    A tree is reused for a bit-identical cloud, or, with ``tree_every=m``, for up to m − 1
    lookups of moved weights. Pass one cache as ``trees=`` to a `TopoPenalty` and a
    `TopoOptimizer` to search each layer once a step between them; a `TopologyMonitor` given it
    too is passive (it never changes a tree training uses).
    With ``tree_every > 1`` their ``state_dict()`` carries it (exact trees need no saving: a
    resumed run searches again and finds the same). The module's docstring
    (``topoopt.tree_cache``) gives the rules in full.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        # trees searched for passive lookups: (cloud copy, u, v) per key, for exact reuse only
        self._observed: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.searches = 0  # tree searches run so far (for tests and benchmarks)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_observed", {})  # a cache pickled before passive lookups kept trees

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TreeCache(layers={list(self._entries)}, searches={self.searches})"

    def edges(self, key: str, cloud: torch.Tensor, tree_every: int = 1,
              passive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The tree (u, v) to measure `cloud` with: reused when exact or allowed, else searched
        (and kept, unless `passive`: see the module's docstring)."""
        check_positive_int("tree_every", tree_every)
        cloud = cloud.detach()
        reused = self._reusable(key, cloud, tree_every, passive)
        if reused is not None:
            return reused[:2]
        observed = self._observed_tree(key, cloud)
        u, v = observed if observed is not None else euclidean_mst_edges(cloud)
        self._store(key, cloud, u, v, passive, searched=observed is None)
        return u, v

    def edges_many(
        self, clouds: Mapping[str, torch.Tensor], tree_every: int = 1, passive: bool = False
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`edges` of each keyed cloud, the trees to search searched together (`trees_of_many`)."""
        return {key: found[:2] for key, found in self._edges_many(clouds, tree_every, passive).items()}

    def trees_for(self, clouds: Mapping[str, torch.Tensor], tree_every: int = 1,
                  passive: bool = False) -> dict[str, tuple]:
        """`edges_many`, each tree as (u, v, exact): exact when searched on this very cloud.

        For a caller that measures the edges itself (`topoopt.penalty_node`) and then hands the
        deaths to `remember_deaths` (not after a `passive` lookup: nothing was kept for it)."""
        return {key: found[:3] for key, found in self._edges_many(clouds, tree_every, passive).items()}

    def remember_deaths(self, key: str, deaths: torch.Tensor, exact: bool = True, copy: bool = True) -> None:
        """Keep the deaths (tree order) just measured on the tree `trees_for` gave for `key`
        (`exact` as it said), so that a graphless lookup of the same cloud (`deaths_many`) gets
        a copy instead of measuring. ``copy=False`` keeps the tensor itself: for a caller that
        never writes to it again."""
        kept = deaths.detach().clone() if copy else deaths.detach()
        if exact:
            self._entries[key].deaths = kept
            self._entries[key].metric = None
        else:
            self._entries[key].moved_deaths = kept

    def known_deaths(self, key: str, cloud: torch.Tensor, tree_every: int = 1) -> torch.Tensor | None:
        """The deaths already measured on this very cloud (the last search's, or the last
        approximate lookup's while `tree_every` allows it), the kept tensor itself (the caller
        must not write to it); else None. What `deaths_many` would give a graphless lookup of
        it, with no tree looked up and no reuse counted: a second tool's lookup in one step."""
        entry = self._entries.get(key)
        if entry is None or not _same_layout(entry.searched_on, cloud):
            return None
        if _same_values(entry.searched_on, cloud):
            return entry.deaths
        if entry.moved_deaths is not None and entry.reuses < tree_every and _same_values(entry.moved, cloud):
            return entry.moved_deaths
        return None

    def _edges_many(self, clouds: Mapping[str, torch.Tensor], tree_every: int,
                    passive: bool = False) -> dict[str, tuple]:
        """`edges_many`, each tree as (u, v, exact, again): exact for a cloud it was searched on,
        again for the cloud of the last approximate lookup."""
        check_positive_int("tree_every", tree_every)
        if tree_every == 1 and not passive:
            found = self.compiled_exact_trees(clouds)
            if found is not None:
                return {key: (u, v, True, False) for key, (u, v) in found.items()}
        found: dict[str, tuple[torch.Tensor, torch.Tensor, bool, bool]] = {}
        missing: dict[str, torch.Tensor] = {}
        for key, cloud in clouds.items():
            cloud = cloud.detach()
            reused = self._reusable(key, cloud, tree_every, passive)
            if reused is None:
                missing[key] = cloud
            else:
                found[key] = reused
        observed = {key: tree for key, cloud in missing.items() if (tree := self._observed_tree(key, cloud))}
        to_search = [key for key in missing if key not in observed]
        if to_search:
            observed |= {key: tree for key, tree in zip(to_search, trees_of_many([missing[k] for k in to_search]))}
        for key, cloud in missing.items():
            u, v = observed[key]
            self._store(key, cloud, u, v, passive, searched=key in to_search)
            found[key] = (u, v, True, False)
        return {key: found[key] for key in clouds}

    def compiled_exact_trees(self, clouds: Mapping[str, torch.Tensor]) -> dict[str, tuple] | None:
        """`edges_many` of exact, active lookups (``tree_every=1``) of contiguous float32 CPU
        clouds that the compiled search takes, a shorter way, which a measuring step takes for
        every layer: the same trees, entries and count, and nothing kept until every tree is
        found. None, with nothing changed, where a lookup needs the general rules (an entry kept
        on another device or holding an approximate lookup's cloud, inference mode)."""
        if _native.engine is None or torch.is_inference_mode_enabled():
            return None
        found: dict[str, tuple] = {}
        missing: dict[str, torch.Tensor] = {}
        for key, cloud in clouds.items():
            cloud = cloud.detach()
            if not (native_small_tree_handles(cloud) and cloud.is_contiguous()):
                return None
            entry = self._entries.get(key)
            if entry is not None:
                if entry.searched_on.device != cloud.device or entry.moved is not None:
                    return None
                if _same_layout(entry.searched_on, cloud) and _same_values(entry.searched_on, cloud):
                    found[key] = (entry.u, entry.v)
                    continue
            missing[key] = cloud
        trees = {}
        for key, cloud in missing.items():  # as `_edges_many`: a tree a passive lookup found, else searched
            observed = self._observed_tree(key, cloud)
            if observed is not None:
                trees[key] = (*observed, False)
                continue
            n = cloud.shape[0]
            edges = compiled_tree(cloud.numpy(), np.empty((n, n), dtype=np.float32))
            if edges is None:  # declined (many near pairs): the general search, as `trees_of_many` takes it
                trees[key] = (*tree_without_the_compiled_search(cloud), True)
            else:  # two tensors (unpacking one into its rows cost ~10 µs)
                trees[key] = (torch.from_numpy(edges[0]), torch.from_numpy(edges[1]), True)
        for key, (u, v, searched) in trees.items():
            self._store(key, missing[key], u, v, searched=searched)
            found[key] = (self._entries[key].u, self._entries[key].v)
        return {key: found[key] for key in clouds}

    def exact_terms(self, clouds: Mapping[str, torch.Tensor], code: int, coefficients: Mapping[str, float],
                    sign: float, target: float | None, gradients: bool = True) -> dict[str, ExactTerm] | None:
        """The exact, active lookups of a training step's float32 CPU clouds and each layer's
        penalty term (and, with `gradients`, its gradient), measured along its tree
        (`engine.exact_terms`: one compiled call for every layer's finiteness check, exact-reuse
        comparison, search, copy and term), with the entries, copies and search count
        `trees_for` leaves and each cloud's deaths (and the metric of metric code `code`) kept
        for a graphless lookup of it. A wrapper's measurement is one without gradients.

        None, with nothing changed, where a lookup needs the general rules (an entry kept on
        another device or holding an approximate lookup's cloud; a cloud not contiguous float32
        on the CPU, or too big for one compiled search; inference mode) or a cloud is not finite
        (the caller's general path names it)."""
        engine = _native.engine
        if engine is None or torch.is_inference_mode_enabled():
            return None
        layers, plans = [], []
        host_search = "cpu" not in spanning_tree.DEVICE_SEARCH_TYPES  # (tests send CPU clouds to the other)
        for key, cloud in clouds.items():
            x = cloud.detach()
            n, d = x.shape
            if not (host_search and x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()
                    and 2 <= n <= BLOCK_ROWS and d >= 1 and n * d < PARALLEL_MIN_ELEMENTS):
                return None  # (bigger clouds' edges are measured by torch, on the caller's threads)
            entry = self._entries.get(key)
            kept = u = v = _EMPTY
            if entry is not None:
                if entry.moved is not None or entry.searched_on.device.type != "cpu":
                    return None
                if entry.views is None:
                    entry.views = _host_views(entry)
                if entry.views and entry.views[0].shape == (n, d):
                    kept, u, v = entry.views
            u_new, v_new = np.empty(n - 1, dtype=np.int64), np.empty(n - 1, dtype=np.int64)
            points = x.numpy()
            taken = None  # a passive lookup's tree of this very cloud (not the entry's): measured along it
            if key in self._observed and not (kept is not _EMPTY and engine.same_bytes(kept, points)):
                taken = self._observed_tree(key, x)
            if taken is not None:
                taken = tuple(edge.contiguous() for edge in taken)
                u, v, u_new, v_new = taken[0].numpy(), taken[1].numpy(), _EMPTY, _EMPTY
            deaths = np.empty(n - 1, dtype=np.float32)
            gradient = np.empty((n, d), dtype=np.float32) if gradients else _EMPTY
            layers.append((points, n, d, kept, u, v, u_new, v_new, deaths, gradient, coefficients[key]))
            plans.append((key, x, entry, kept is not _EMPTY, taken, u_new, v_new, deaths, gradient))
        target = math.nan if target is None else target
        outcomes = engine.exact_terms(layers, code, sign, target, NEAR_PAIR_RATIO, EXACT_PAIRS_PER_POINT)
        if type(outcomes) is int:  # a cloud not finite: nothing was written
            return None
        # Every layer the engine wrote into gets its entry first, with nothing that can fail between;
        # then the declined ones (untouched so far) are searched the general way and measured.
        found = {}
        declined = []
        for layer, plan, outcome in zip(layers, plans, outcomes):
            if outcome[0] < 0:
                declined.append((layer, plan))
                continue
            key, x, entry, in_place, taken, u_new, v_new = plan[:7]
            if taken is not None:  # measured along a passive lookup's tree, whose search counted
                del self._observed[key]
                found[key] = self._exact_found(key, x, entry, in_place, taken, None, False, plan[7:], code, outcome)
            elif outcome[0] == 1:
                tree = torch.from_numpy(u_new), torch.from_numpy(v_new)
                views = (layer[3], u_new, v_new) if in_place else None
                found[key] = self._exact_found(key, x, entry, in_place, tree, views, True, plan[7:], code, outcome)
            else:
                found[key] = self._exact_found(key, x, entry, False, None, None, False, plan[7:], code, outcome)
        for layer, (key, x, entry, in_place, *_, deaths, gradient) in declined:
            tree = tuple(edge.contiguous() for edge in tree_without_the_compiled_search(x))
            given = (*layer[:4], tree[0].numpy(), tree[1].numpy(), _EMPTY, _EMPTY, *layer[8:])
            outcome = engine.exact_terms([given], code, sign, target, NEAR_PAIR_RATIO, EXACT_PAIRS_PER_POINT)[0]
            found[key] = self._exact_found(key, x, entry, in_place, tree, None, True, (deaths, gradient), code, outcome)
        if any(entry is None for _, (_, _, entry, *_) in declined):  # new entries in the clouds' order, as stored
            for key, (_, _, entry, *_) in zip(clouds, plans):           # one by one the general way
                if entry is None:
                    self._entries[key] = self._entries.pop(key)
        return {key: found[key] for key in clouds}

    def _exact_found(self, key: str, x: torch.Tensor, entry: _Entry | None, in_place: bool, tree: tuple | None,
                     views: tuple | None, searched: bool, written: tuple, code: int, outcome: tuple) -> ExactTerm:
        """One layer's outcome of `exact_terms`: its entry (a new one for a new `tree`, holding the
        copy the engine wrote into the old one's memory when `in_place`, else a clone) and its
        deaths, metric and term."""
        deaths = torch.from_numpy(written[0])
        gradient = torch.from_numpy(written[1]) if written[1] is not _EMPTY else None
        _, metric, term, longest = outcome
        if tree is not None:
            self.searches += searched
            kept = entry.searched_on if in_place else x.clone()
            entry = self._entries[key] = _Entry(kept, *tree, spare=entry.spare if entry else None)
            entry.views = views if views is not None else _host_views(entry)
        exact = math.isfinite(metric) and not needs_rescaling(longest, torch.float32)
        entry.deaths, entry.metric = deaths, (code, metric) if exact else None
        return ExactTerm(entry.u, entry.v, deaths, gradient, metric, term, exact)

    def known_metric(self, key: str, cloud: torch.Tensor, code: int) -> float | None:
        """The metric of code `code` of this very cloud when `exact_terms` measured it (and its
        deaths were in the engine's exact range), else None: what a graphless lookup of it would
        give, with no tree looked up and no reuse counted (a `TopoOptimizer` after a
        `TopoPenalty` of the same metric, in one step). `cloud` is detached."""
        entry = self._entries.get(key)
        if entry is None or entry.metric is None or entry.metric[0] != code or not entry.views:
            return None
        if not (cloud.is_cpu and cloud.dtype == torch.float32 and cloud.is_contiguous()
                and cloud.shape == entry.searched_on.shape):
            return None
        return entry.metric[1] if _native.engine.same_bytes(entry.views[0], cloud.numpy()) else None

    def _observed_tree(self, key: str, cloud: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The tree a passive lookup searched on this very cloud, if it did (else None)."""
        observed = self._observed.get(key)
        if observed is not None and _same_layout(observed[0], cloud) and _same_values(observed[0], cloud):
            return observed[1], observed[2]
        return None

    def _store(self, key: str, cloud: torch.Tensor, u: torch.Tensor, v: torch.Tensor, passive: bool = False,
               searched: bool = True) -> None:
        """Keep a tree for `cloud`: an active lookup's as the key's entry (as if searched now, when
        it came from a passive lookup's search); a passive one's apart (`_observed`)."""
        self.searches += searched
        u, v = _ordinary(u), _ordinary(v)
        if passive:
            if searched:
                old = self._observed.get(key)
                self._observed[key] = (_copy_into(old[0] if old else None, cloud), u, v)
            return
        if not searched:  # an observed tree, taken: the entry holds it now
            self._observed.pop(key, None)
        old = self._entries.get(key)
        # the old copies' memory, no new allocation
        self._entries[key] = _Entry(_copy_into(old.searched_on if old else None, cloud), u, v,
                                    spare=(old.moved if old.moved is not None else old.spare) if old else None)

    def _reusable(self, key: str, cloud: torch.Tensor, tree_every: int, passive: bool = False) -> tuple | None:
        """The cached tree (u, v, exact, again) when it may measure `cloud` (counting an
        approximate reuse unless `cloud` is the last one counted, or the caller is passive),
        else None."""
        entry = self._entries.get(key)
        if entry is not None and entry.searched_on.device != cloud.device:  # loaded on another device
            with torch.inference_mode(False):
                moved = entry.moved.to(cloud.device) if entry.moved is not None else None
                entry = _Entry(entry.searched_on.to(cloud.device), entry.u.to(cloud.device),
                               entry.v.to(cloud.device), entry.reuses, moved=moved)
            self._entries[key] = entry
        if entry is not None and _same_layout(entry.searched_on, cloud):
            if _same_values(entry.searched_on, cloud):
                return entry.u, entry.v, True, False
            if entry.reuses < tree_every and entry.moved is not None and _same_values(entry.moved, cloud):
                return entry.u, entry.v, False, True
            if entry.reuses + 1 < tree_every:
                if passive:  # the tree, not counted (training's next lookup counts as if none had been)
                    return entry.u, entry.v, False, False
                entry.reuses += 1
                entry.moved = _copy_into(entry.moved if entry.moved is not None else entry.spare, cloud)
                entry.moved_deaths, entry.spare = None, None
                return entry.u, entry.v, False, False
        return None

    def deaths_in_tree_order(self, key: str, cloud: torch.Tensor, tree_every: int = 1,
                             passive: bool = False) -> torch.Tensor:
        """The H0 deaths of `cloud`, differentiable, in tree order (unsorted).

        Exact (equal to `topoopt.h0_deaths` up to order) when ``tree_every=1``. Metrics that do
        not depend on the order of the deaths (all of `topoopt.METRICS`) can take them directly.
        """
        if cloud.shape[0] < 2:
            return cloud.reshape(-1)[:0]
        u, v = self.edges(key, cloud, tree_every, passive)
        return edge_lengths(cloud, u, v)

    def deaths_many(self, clouds: Mapping[str, torch.Tensor], tree_every: int = 1,
                    passive: bool = False) -> dict[str, torch.Tensor]:
        """`deaths_in_tree_order` of each keyed cloud, in one call: the small clouds' tree
        searches and every edge measurement are batched (`topoopt.many_clouds`).

        A cloud bit-for-bit equal to one already measured through this cache, asked for without
        a graph (a `TopoOptimizer` after a `TopoPenalty` in the same step), gets those deaths
        again (a copy) instead of a second measurement."""
        measured = {key: cloud for key, cloud in clouds.items() if cloud.shape[0] >= 2}
        edges = self._edges_many(measured, tree_every, passive)
        lengths: dict[str, torch.Tensor] = {}
        to_measure = []
        for key, (u, _, exact, again) in edges.items():
            entry = self._entries.get(key)
            # only deaths kept with the very tree this lookup got (a passive search keeps none)
            kept = entry is not None and entry.u is u
            known = (entry.deaths if exact else entry.moved_deaths if again else None) if kept else None
            wants_graph = torch.is_grad_enabled() and measured[key].requires_grad
            if known is not None and not wants_graph:
                lengths[key] = known.clone()  # measured before on this very cloud (a shared cache)
            else:
                to_measure.append(key)
        if to_measure:
            fresh = edge_lengths_many([measured[key] for key in to_measure], [edges[key][:2] for key in to_measure])
            for key, deaths in zip(to_measure, fresh):
                lengths[key] = deaths
                if not passive:
                    self.remember_deaths(key, deaths, edges[key][2])  # a copy: the caller may modify its own
        return {key: lengths[key] if key in lengths else cloud.reshape(-1)[:0] for key, cloud in clouds.items()}

    def clear(self) -> None:
        self._entries.clear()
        self._observed.clear()

    def state_dict(self) -> dict[str, Any]:
        """The entries as plain tensors. Like a module's ``state_dict()``, it holds references
        (a later search writes its cloud into the old entry's memory, as an optimizer step writes
        a parameter's): save it, or deep-copy it to keep a snapshot in memory. One cache shared
        by a penalty and an optimizer is then stored once in a checkpoint."""
        return {
            "entries": {
                key: {"searched_on": e.searched_on, "u": e.u, "v": e.v, "reuses": e.reuses,
                      **({"moved": e.moved} if e.moved is not None else {})}
                for key, e in self._entries.items()
            },
            "searches": self.searches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load entries as copies: the cache later writes into its own, never into the caller's.
        (Trees searched for passive lookups are not saved: a resumed run searches those again.)"""
        entries = {}
        for key, saved in state_dict["entries"].items():
            moved = saved.get("moved")
            entries[key] = _Entry(saved["searched_on"].clone(), saved["u"], saved["v"], int(saved["reuses"]),
                                  moved=moved.clone() if moved is not None else None)
        self._entries = entries
        self._observed.clear()
        self.searches = int(state_dict.get("searches", 0))


def measure_layer(
    trees: TreeCache, name: str, module, include_bias: bool = False, tree_every: int = 1, passive: bool = False
) -> torch.Tensor | None:
    """A layer's H0 deaths (tree order) through `trees`; None for a layer with nothing to measure.
    ``passive=True`` for an observer: the trees training uses are left as they were (see the
    module's docstring).

    Errors name the layer (NaN/Inf or meta weights, see `topoopt.cloud.layer_cloud`).
    """
    cloud = layer_cloud(name, module, include_bias)
    if cloud is None:
        return None
    return trees.deaths_in_tree_order(cache_key(name, include_bias), cloud, tree_every, passive)


def measure_layers(
    trees: TreeCache, layers: Mapping[str, Any], include_bias: bool = False, tree_every: int = 1,
    passive: bool = False,
) -> dict[str, torch.Tensor | None]:
    """`measure_layer` of every named layer, in one call: the small layers' tree searches and
    all the edge measurements are batched (`topoopt.many_clouds`), with the same results
    (``passive`` as there).

    Errors name the layer, as `measure_layer`'s do.
    """
    clouds = {name: layer_cloud(name, module, include_bias) for name, module in layers.items()}
    keyed = {cache_key(name, include_bias): cloud for name, cloud in clouds.items() if cloud is not None}
    deaths = trees.deaths_many(keyed, tree_every, passive)
    return {name: None if cloud is None else deaths[cache_key(name, include_bias)] for name, cloud in clouds.items()}


@dataclass(frozen=True)
class ExactTerm:
    """One layer's outcome of `TreeCache.exact_terms`: its tree (u, v), deaths (tree order,
    float32, the cache's own: not to be written to), the term's gradient with respect to the
    cloud (None when none was asked for), metric and term, and whether the metric is finite and
    the deaths in the range where the engine is exact (`topoopt._range`)."""

    u: torch.Tensor
    v: torch.Tensor
    deaths: torch.Tensor
    gradient: torch.Tensor | None
    metric: float
    term: float
    exact: bool


_EMPTY = np.empty(0, dtype=np.uint8)  # an empty buffer: "none" to the engine


def _host_views(entry: _Entry) -> tuple:
    """Numpy views of an entry's copy and tree for `TreeCache.exact_terms` (made once an entry:
    ~1 µs each), or () when the engine cannot read them in place."""
    kept, u, v = entry.searched_on, entry.u, entry.v
    if not (kept.dtype == torch.float32 and kept.device.type == "cpu" and kept.is_contiguous()
            and not kept.is_inference()  # (written only through `_copy_into`, which replaces it)
            and all(t.dtype == torch.int64 and t.device.type == "cpu" and t.is_contiguous() for t in (u, v))):
        return ()
    return kept.numpy(), u.numpy(), v.numpy()


def _copy_into(buffer: torch.Tensor | None, cloud: torch.Tensor) -> torch.Tensor:
    """A copy of `cloud`, written into `buffer` when its layout allows (no new allocation); an
    ordinary tensor even under inference mode (see `_ordinary`)."""
    if (buffer is not None and not buffer.is_inference() and _same_layout(buffer, cloud)
            and buffer.stride() == cloud.stride()):
        if cloud.numel() >= _PARALLEL_COPY and _native.engine is not None and cloud.device.type == "cpu" \
                and cloud.dtype in _HOST_DTYPES and cloud.is_contiguous():  # torch's copy would wake its other threads
            _native.engine.copy_all([cloud.numpy()], [buffer.numpy()])
            return buffer
        return buffer.copy_(cloud)  # an ordinary tensor stays one, in inference mode too
    with torch.inference_mode(False):
        return cloud.clone()


def _ordinary(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or an ordinary copy of an inference tensor: what the cache keeps is written in
    place and saved for backward later, outside inference mode, which inference tensors forbid
    (a lookup under `torch.inference_mode()`, a Lightning validation step's, broke the next
    training step)."""
    if not tensor.is_inference():
        return tensor
    with torch.inference_mode(False):
        return tensor.clone()


def _same_values(searched_on: torch.Tensor, cloud: torch.Tensor) -> bool:
    """Whether `cloud` is the searched cloud again: the same bytes, compared by the compiled
    engine for CPU float tensors (at 100×784 `torch.equal` took ~100 µs, a memcmp a few), else
    `torch.equal`. Equal bytes are equal values; values equal only up to the sign of a zero
    (0.0 and −0.0) count as different and search again, which is still exact."""
    if (_native.engine is not None and cloud.device.type == "cpu" and searched_on.dtype in _HOST_DTYPES
            and searched_on.is_contiguous() and cloud.is_contiguous()):
        return _native.engine.same_bytes(searched_on.numpy(), cloud.numpy())
    return torch.equal(searched_on, cloud)


_HOST_DTYPES = (torch.float32, torch.float64)
# From this many elements torch copies in parallel; in a training step its other threads are
# asleep, and waking them cost more than the copy (a 100×784 layer: 41 against 20 µs).
_PARALLEL_COPY = 32768


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def cache_key(name: str, include_bias: bool) -> str:
    """The entry of a layer's cloud, with or without its bias column."""
    return f"{name}+bias" if include_bias else name
