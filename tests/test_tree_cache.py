"""TreeCache: exact whenever asked to be, whatever else wrote to the weights; resumable."""

import io

import pytest
import torch
from torch import nn

from topoopt import TopologyMonitor, TopoOptimizer, TopoPenalty, TreeCache, h0_deaths, mean_lifetime, measure_layers
from topoopt.lab.models import build_mlp
from topoopt.persistence import edge_lengths
from topoopt.tree_cache import measure_layer


def exact_mean_lifetime(layer: nn.Linear) -> float:
    return float(mean_lifetime(h0_deaths(layer.weight.detach())))


def moved(layer: nn.Linear, seed: int) -> None:
    """Move the weights far enough that the old tree is no longer minimal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.add_(torch.randn(layer.weight.shape, generator=g, dtype=layer.weight.dtype))


def test_identical_weights_reuse_the_tree_and_moved_weights_search_again():
    cloud = torch.randn(30, 5, dtype=torch.float64)
    trees = TreeCache()
    first = trees.deaths_in_tree_order("fc", cloud)
    assert torch.equal(trees.deaths_in_tree_order("fc", cloud.clone()), first) and trees.searches == 1
    moved_cloud = cloud + 0.5 * torch.randn_like(cloud)
    assert torch.allclose(torch.sort(trees.deaths_in_tree_order("fc", moved_cloud)).values, h0_deaths(moved_cloud))
    assert trees.searches == 2


def test_approximate_reuse_counts_lookups_of_moved_weights():
    cloud = torch.randn(30, 5, dtype=torch.float64)
    trees = TreeCache()
    trees.deaths_in_tree_order("fc", cloud, tree_every=3)
    for k in range(1, 7):
        trees.deaths_in_tree_order("fc", cloud + 1e-3 * k, tree_every=3)
    # Searches at lookups 0, 3 and 6 (of moved weights each time).
    assert trees.searches == 3


def test_an_approximate_tree_never_reaches_an_exact_caller_sharing_the_cache():
    torch.manual_seed(0)
    net = build_mlp("mlp:6-40-3").double()
    trees = TreeCache()
    approximate = TopoPenalty(net, metric="mean_lifetime", tree_every=10, trees=trees, weight={"fc1": 1.0})
    approximate()
    moved(net.fc1, 1)
    approximate()  # reuses the old tree on purpose
    stale = approximate.last_values["fc1"]
    exact = exact_mean_lifetime(net.fc1)
    assert abs(stale - exact) > 1e-3  # the scenario is real: the old tree is wrong now
    exact_penalty = TopoPenalty(net, metric="mean_lifetime", trees=trees, weight={"fc1": 1.0})
    exact_penalty()
    assert exact_penalty.last_values["fc1"] == pytest.approx(exact, rel=1e-12)
    optimizer = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, metric="mean_lifetime",
                              trees=trees, layers=["fc1"])
    optimizer.update_scales()
    rms = float(net.fc1.weight.detach().norm()) / 40**0.5
    assert optimizer.complexity["fc1"] == pytest.approx(exact / rms, rel=1e-12)
    monitor = TopologyMonitor(net, writer=_NullWriter(), metrics="mean_lifetime", trees=trees)
    monitor.step(0)
    assert monitor.last["fc1"]["mean_lifetime"] == pytest.approx(exact, rel=1e-12)


def test_writes_through_data_are_seen_by_every_exact_owner():
    torch.manual_seed(0)
    net = build_mlp("mlp:6-40-3").double()
    penalty = TopoPenalty(net, metric="mean_lifetime", weight={"fc1": 1.0})
    optimizer = TopoOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, metric="mean_lifetime", layers=["fc1"])
    penalty()
    optimizer.update_scales()
    version = net.fc1.weight._version
    net.fc1.weight.data.mul_(2.0).add_(torch.randn(40, 6, dtype=torch.float64))  # EMA/clipping-style write
    assert net.fc1.weight._version == version  # invisible to a version counter
    exact = exact_mean_lifetime(net.fc1)
    value = penalty()
    assert penalty.last_values["fc1"] == pytest.approx(exact, rel=1e-12)
    assert float(value.detach()) == pytest.approx(exact, rel=1e-12)
    optimizer.update_scales()
    rms = float(net.fc1.weight.detach().norm()) / 40**0.5
    assert optimizer.complexity["fc1"] == pytest.approx(exact / rms, rel=1e-12)


def test_state_dict_round_trip_keeps_trees_and_counts():
    cloud = torch.randn(20, 4, dtype=torch.float64)
    trees = TreeCache()
    trees.deaths_in_tree_order("fc", cloud, tree_every=5)
    trees.deaths_in_tree_order("fc", cloud + 0.1, tree_every=5)
    buffer = io.BytesIO()
    torch.save(trees.state_dict(), buffer)
    buffer.seek(0)
    restored = TreeCache()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for k in range(2, 8):
        a = trees.deaths_in_tree_order("fc", cloud + 0.1 * k, tree_every=5)
        b = restored.deaths_in_tree_order("fc", cloud + 0.1 * k, tree_every=5)
        assert torch.equal(a, b)
    assert restored.searches == trees.searches


class _NullWriter:
    """Accepts the SummaryWriter calls the monitor makes, and keeps nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_a_graphless_lookup_of_measured_weights_reuses_their_deaths(monkeypatch):
    """A TopoOptimizer after a TopoPenalty in one step (one shared cache) measures the same
    weights again without a graph: it gets the deaths already measured, a copy of them."""
    import topoopt.tree_cache as tree_cache

    measured = []
    original = tree_cache.edge_lengths_many
    monkeypatch.setattr(tree_cache, "edge_lengths_many", lambda clouds, edges: measured.append(len(clouds))
                        or original(clouds, edges))
    weight = torch.randn(30, 5, requires_grad=True)
    trees = TreeCache()
    first = trees.deaths_many({"fc": weight})["fc"]
    assert first.requires_grad and measured == [1]
    with torch.no_grad():
        again = trees.deaths_many({"fc": weight})["fc"]
    assert measured == [1] and torch.equal(again, first.detach())  # nothing measured again
    again.mul_(2)  # the caller's copy: the cache keeps its own
    with torch.no_grad():
        assert torch.equal(trees.deaths_many({"fc": weight})["fc"], first.detach())
    # With a graph wanted, or with moved weights, the edges are measured again.
    assert trees.deaths_many({"fc": weight})["fc"].requires_grad and measured[-1] == 1
    with torch.no_grad():
        weight.add_(1e-3)
        moved_deaths = trees.deaths_many({"fc": weight})["fc"]
    assert measured[-1] == 1 and torch.allclose(torch.sort(moved_deaths).values, h0_deaths(weight.detach()))


def test_state_dicts_alias_like_a_module_s_and_loading_copies():
    """A search writes its cloud into the old entry's memory: a state_dict holds references, as
    a module's does (a deep copy is a snapshot), and a loaded state is copied, never written."""
    import copy

    cache = TreeCache()
    cloud = torch.randn(20, 5)
    cache.edges("a", cloud)
    state = cache.state_dict()
    snapshot = copy.deepcopy(state)
    cache.edges("a", cloud + 1.0)
    assert torch.equal(snapshot["entries"]["a"]["searched_on"], cloud)
    assert torch.equal(cache.state_dict()["entries"]["a"]["searched_on"], cloud + 1.0)
    restored = TreeCache()
    restored.load_state_dict(snapshot)
    restored.edges("a", cloud - 1.0)
    assert torch.equal(snapshot["entries"]["a"]["searched_on"], cloud)
    shared = {"penalty": cache.state_dict(), "optimizer": cache.state_dict()}
    saved = io.BytesIO()
    torch.save(shared, saved)
    alone = io.BytesIO()
    torch.save({"penalty": cache.state_dict()}, alone)
    assert saved.getbuffer().nbytes < alone.getbuffer().nbytes + 1000  # the shared cloud stored once


def test_a_moved_cloud_again_respects_the_asking_caller_s_budget():
    torch.manual_seed(0)
    cloud = torch.randn(30, 6)
    cache = TreeCache()
    cache.edges("a", cloud, tree_every=10)
    for step in range(1, 9):
        moved = cloud + 1e-3 * step
        cache.edges("a", moved, tree_every=10)  # 8 approximate reuses
    cache.edges("a", moved, tree_every=2)  # the same cloud, but this caller allows 1 reuse: searched
    assert cache.searches == 2


def test_the_same_moved_cloud_looked_up_twice_counts_once():
    """A penalty and an optimizer sharing a cache look up the same moved weights in one step:
    the second lookup counts nothing and, without a graph, is served the deaths measured then."""
    torch.manual_seed(0)
    cloud = torch.randn(30, 6)
    cache = TreeCache()
    cache.edges("a", cloud, tree_every=3)  # the search
    served = []
    for step in range(1, 7):
        moved = cloud + 1e-3 * step
        first = cache.deaths_many({"a": moved}, tree_every=3)["a"]
        again = cache.deaths_many({"a": moved.clone()}, tree_every=3)["a"]
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        served.append(cache.searches)
    assert served == [1, 1, 2, 2, 2, 3]  # searched at steps 0, 3 and 6: every 3rd change, as alone


def test_an_exact_caller_never_gets_the_tree_of_a_moved_cloud():
    torch.manual_seed(0)
    cloud = torch.randn(30, 6)
    cache = TreeCache()
    cache.edges("a", cloud, tree_every=5)
    moved = cloud + 0.5 * torch.randn(30, 6)
    cache.edges("a", moved, tree_every=5)  # approximate: the old tree
    assert cache.searches == 1
    u, v = cache.edges("a", moved, tree_every=1)  # the same cloud, asked exactly: searched
    assert cache.searches == 2
    expected_u, expected_v = TreeCache().edges("b", moved)
    assert torch.equal(u, expected_u) and torch.equal(v, expected_v)


def test_a_search_forgets_the_last_moved_cloud():
    torch.manual_seed(0)
    cloud = torch.randn(30, 6)
    cache = TreeCache()
    cache.edges("a", cloud, tree_every=2)
    moved = cloud + 1e-3
    cache.edges("a", moved, tree_every=2)  # counted: 1 of 1 allowed
    cache.edges("a", cloud - 1e-3, tree_every=2)  # a search
    cache.edges("a", moved, tree_every=2)  # counted afresh, not "again"
    cache.edges("a", moved + 1e-3, tree_every=2)  # over the budget: a search
    assert cache.searches == 3


def test_a_resumed_cache_counts_as_the_interrupted_one():
    torch.manual_seed(0)
    clouds = [torch.randn(30, 6) + 1e-3 * step for step in range(8)]
    clouds[4] = clouds[3].clone()  # weights that did not move between two steps

    def run(resume_at):
        cache = TreeCache()
        for step, cloud in enumerate(clouds):
            if step == resume_at:
                state = io.BytesIO()
                torch.save(cache.state_dict(), state)
                cache = TreeCache()
                state.seek(0)
                cache.load_state_dict(torch.load(state))
            cache.deaths_many({"a": cloud}, tree_every=3)
        return cache.searches, cache.state_dict()["entries"]["a"]["reuses"]

    assert run(4) == run(None)


def _trajectory(log, *, one_node=True, monitor_dir=None, tree_every=2, monkeypatch=None):
    """Six SGD steps of a small net with a TopoPenalty (every=2), optionally logging the penalty
    under no_grad after each step or monitoring through the same cache; the final weights."""
    from topoopt import penalty_node

    if not one_node:
        monkeypatch.setattr(penalty_node, "handles", lambda *args: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trees = TreeCache()
    penalty = TopoPenalty(model, metric="mean_lifetime", direction="maximize", weight=1.0, every=2,
                          tree_every=tree_every, trees=trees)
    monitor = TopologyMonitor(model, log_dir=monitor_dir, trees=trees) if monitor_dir is not None else None
    for step in range(6):
        optimizer.zero_grad()
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        (model(x).pow(2).mean() + penalty()).backward()
        optimizer.step()
        if log:
            with torch.no_grad():
                penalty()  # a logging call
        if monitor is not None:
            monitor.step(step)
    if monitor is not None:
        monitor.close()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), trees.searches


@pytest.mark.parametrize("one_node", [True, False])
def test_logging_a_penalty_under_no_grad_leaves_training_s_trees_alone(one_node, monkeypatch):
    """With tree_every > 1, a graphless penalty call used to count a reuse or replace the tree,
    which moved the training trajectory (a new user's trial); it is passive now."""
    plain, _ = _trajectory(False, one_node=one_node, monkeypatch=monkeypatch)
    logged, _ = _trajectory(True, one_node=one_node, monkeypatch=monkeypatch)
    assert torch.equal(plain, logged)


def test_a_monitor_sharing_the_cache_leaves_training_s_trees_alone(tmp_path):
    plain, _ = _trajectory(False, tree_every=5)
    monitored, _ = _trajectory(False, tree_every=5, monitor_dir=tmp_path)
    assert torch.equal(plain, monitored)


@pytest.mark.parametrize("tree_every", [1, 3])
def test_a_monitor_beside_a_penalty_and_an_optimizer_changes_nothing_and_saves_their_search(tree_every, tmp_path):
    """Penalty, optimizer and a monitor logging after every step, one cache: the same final
    weights as without the monitor, and (exact trees) no more searches than one a layer a step
    plus the monitor's first: training takes the monitor's tree of the weights it logged."""

    def run(monitored):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        trees = TreeCache()
        optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, every=1,
                                  tree_every=tree_every, trees=trees)
        penalty = TopoPenalty(model, metric="mean_lifetime", direction="maximize", weight=0.5,
                              tree_every=tree_every, trees=trees)
        monitor = TopologyMonitor(model, log_dir=tmp_path / str(monitored), trees=trees) if monitored else None
        for step in range(8):
            optimizer.zero_grad()
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            (model(x).pow(2).mean() + penalty()).backward()
            optimizer.step()
            if monitor is not None:
                monitor.step(step)
        if monitor is not None:
            monitor.close()
        return torch.cat([p.detach().flatten() for p in model.parameters()]), trees.searches

    (plain, plain_searches), (monitored, monitored_searches) = run(False), run(True)
    assert torch.equal(plain, monitored)
    if tree_every == 1:
        assert plain_searches == 3 * 8 and monitored_searches <= 3 * (8 + 1)


def test_an_observer_measuring_and_then_asking_for_the_tree_searches_once():
    """A passive lookup's tree is kept apart for exact reuse: the monitor's branching report asks
    for the tree of the deaths it just measured and gets it without a second search."""
    trees = TreeCache()
    layer = nn.Linear(6, 10)
    deaths = measure_layer(trees, "fc", layer, passive=True)
    u, v = trees.edges("fc", layer.weight.detach(), passive=True)
    assert trees.searches == 1 and len(trees._entries) == 0
    assert torch.equal(deaths, edge_lengths(layer.weight.detach(), u, v))


def test_a_passive_lookup_never_writes_the_cache():
    """Miss, approximate reuse, exact reuse and a measured lookup, all passive: the entries,
    their counts and their kept deaths are unchanged (searches are still counted)."""
    import copy

    trees = TreeCache()
    cloud = torch.randn(12, 4)
    trees.deaths_many({"fc": cloud}, tree_every=3)
    before = copy.deepcopy(trees._entries)
    moved = cloud + 1e-3
    for tree_every in (1, 3):
        trees.edges("fc", moved, tree_every, passive=True)
        trees.deaths_many({"fc": moved, "other": cloud}, tree_every, passive=True)
        trees.deaths_many({"fc": cloud}, tree_every, passive=True)
        measure_layers(trees, {"fc": nn.Linear(4, 12)}, passive=True)
    assert set(trees._entries) == {"fc"}
    entry, kept = trees._entries["fc"], before["fc"]
    assert torch.equal(entry.searched_on, kept.searched_on) and torch.equal(entry.u, kept.u)
    assert entry.reuses == kept.reuses == 0 and entry.moved is None and torch.equal(entry.deaths, kept.deaths)
    # and an active lookup afterwards counts as if none of those had happened
    trees.edges("fc", moved, 3)
    assert trees._entries["fc"].reuses == 1


def test_a_passive_search_is_never_served_the_deaths_kept_for_another_cloud():
    """A passive lookup that searched for itself got (u, v, exact) for its own cloud; the entry's
    kept deaths belong to the cloud training searched on and must not be handed out for it."""
    trees = TreeCache()
    cloud = torch.randn(12, 4)
    trees.deaths_many({"fc": cloud})  # training: searched and its deaths kept
    other = torch.randn(12, 4) * 3
    with torch.no_grad():
        passive = trees.deaths_many({"fc": other}, passive=True)["fc"]
    assert torch.allclose(torch.sort(passive).values, h0_deaths(other))


@pytest.mark.parametrize("one_node", [True, False])
def test_lookups_under_inference_mode_keep_ordinary_tensors(one_node, monkeypatch, tmp_path):
    """A penalty logged under `torch.inference_mode()` (a Lightning validation step's), an
    optimizer's `update_scales` and an early-stopping check there: what the cache kept was
    inference tensors, and the next training call (saving the tree for backward) or the next
    search into the kept memory failed, or a sharing monitor silently logged nothing (a referee's
    cases). Kept tensors are ordinary now."""
    from topoopt import penalty_node
    from topoopt.early_stopping import TopologyEarlyStopping

    if not one_node:
        monkeypatch.setattr(penalty_node, "handles", lambda *args: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    trees = TreeCache()
    penalty = TopoPenalty(model, metric="mean_lifetime", weight=0.1, trees=trees)
    optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, every=1, tree_every=3, trees=trees)
    stopper = TopologyEarlyStopping(model)
    with TopologyMonitor(model, log_dir=tmp_path, trees=trees) as monitor:
        for step in range(3):
            with torch.inference_mode():
                penalty()
                optimizer.update_scales()
                stopper.update()
            optimizer.zero_grad()
            (model(torch.randn(4, 8)).pow(2).mean() + penalty()).backward()  # saves the kept tree for backward
            optimizer.step()
            stopper.update()
            monitor.step(step)
        assert monitor.skipped == {} and set(monitor.last) == {"0", "2"}
    kept = [t for e in trees._entries.values() for t in (e.searched_on, e.u, e.v, e.moved) if t is not None]
    kept += [t for observed in trees._observed.values() for t in observed]
    assert kept and not any(t.is_inference() for t in kept)


def test_a_cache_pickled_before_observed_trees_existed_still_works():
    import pickle

    trees = TreeCache()
    trees.edges("fc", torch.randn(9, 3))
    state = dict(trees.__dict__)
    del state["_observed"]  # as pickled by the version before
    old = TreeCache.__new__(TreeCache)
    old.__dict__.update(state)
    restored = pickle.loads(pickle.dumps(old))
    restored.edges("fc", torch.randn(9, 3), passive=True)
    assert len(restored._observed) == 1


def test_an_observed_tree_taken_by_training_is_not_kept_twice():
    trees = TreeCache()
    cloud = torch.randn(10, 4)
    trees.edges("fc", cloud, passive=True)
    assert len(trees._observed) == 1 and trees.searches == 1
    trees.edges("fc", cloud)  # training takes it, without a search
    assert len(trees._observed) == 0 and trees.searches == 1 and torch.equal(trees._entries["fc"].searched_on, cloud)


def test_exact_lookups_of_compiled_clouds_keep_what_the_general_path_keeps(monkeypatch):
    """`TreeCache.compiled_exact_trees`, the short path of exact active lookups of float32 CPU clouds,
    leaves the cache as the general path does: the same trees, copies, spare memory, deaths and
    search count, through searches, exact reuses, a layer whose shape changes, a float64 cloud
    and a cloud the compiled search declines (copies: too many near pairs)."""
    served = []
    original = TreeCache.compiled_exact_trees

    def run(short: bool) -> tuple[TreeCache, list]:
        monkeypatch.setattr(TreeCache, "compiled_exact_trees", lambda self, clouds: served.append(
            original(self, clouds)) or served[-1] if short else None)
        torch.manual_seed(0)
        trees, seen = TreeCache(), []
        a, b = torch.randn(30, 8), torch.randn(12, 5)
        for clouds in ({"a": a, "b": b}, {"a": a, "b": b}, {"a": a + 0.1, "b": b},
                       {"a": torch.randn(31, 8)}, {"a": torch.randn(31, 8).double()},
                       {"a": torch.randn(4, 8).repeat(10, 1)}, {"b": b * 2}):
            found = trees.deaths_many(clouds)
            seen.append({key: (d.clone(), *trees.edges_many({key: clouds[key]})[key]) for key, d in found.items()})
        monkeypatch.undo()
        return trees, seen

    short, long = run(True), run(False)
    assert sum(found is not None for found in served) >= 4 and None in served  # both paths taken
    assert short[0].searches == long[0].searches
    for got, expected in zip(short[1], long[1]):
        assert got.keys() == expected.keys()
        for key in got:
            for x, y in zip(got[key], expected[key]):
                assert torch.equal(x, y)
    for key, entry in short[0]._entries.items():
        other = long[0]._entries[key]
        assert torch.equal(entry.searched_on, other.searched_on) and torch.equal(entry.u, other.u)
        assert (entry.spare is None) == (other.spare is None) and entry.reuses == other.reuses


@pytest.mark.parametrize("between", [None, "data write", "other metric"])
def test_a_wrapper_after_a_penalty_of_its_metric_takes_that_metric_and_only_for_the_same_weights(
        monkeypatch, between):
    """A TopoOptimizer of normalized entropy after a TopoPenalty of it, one cache and one step,
    takes each layer's metric the penalty measured (`LayerMeter.known_metrics`) instead of
    measuring again: the same scales, step by step, as a wrapper that always measures. A write
    through ``.data`` between the two, or a penalty of another metric, gives it nothing to take."""
    from topoopt.measure import LayerMeter

    original, taken = LayerMeter.known_metrics, []

    def run(take: bool):
        monkeypatch.setattr(LayerMeter, "known_metrics", lambda self, names, code, fewest=1: (
            taken.append(original(self, names, code, fewest)) or taken[-1]) if take else {})
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3))
        trees = TreeCache()
        optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), model,
                                  metric="normalized_entropy", policy="contrast", every=1, trees=trees)
        penalty = TopoPenalty(model, metric="mean_lifetime" if between == "other metric" else "normalized_entropy",
                              weight=0.3, trees=trees)
        seen = []
        for step in range(5):
            optimizer.zero_grad()
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            (model(x).pow(2).mean() + penalty()).backward()
            if between == "data write":
                model[2].weight.data.mul_(1.01)
            optimizer.step()
            seen.append((dict(optimizer.complexity), dict(optimizer.scales)))
        monkeypatch.undo()
        return seen, torch.cat([p.detach().flatten() for p in model.parameters()])

    (taking, weights), (measuring, weights_measured) = run(True), run(False)
    assert taking == measuring and torch.equal(weights, weights_measured)
    served = [set(found) for found in taken]
    if between is None:
        assert served == [{"0", "2", "4"}] * 5
    elif between == "data write":
        assert served == [{"0", "4"}] * 5
    else:
        assert served == [set()] * 5


def test_a_training_step_s_compiled_lookups_and_terms_keep_what_the_general_path_keeps():
    """`TreeCache.exact_terms` (lookups, copies, searches and terms in one compiled call) against
    `trees_for` and then `engine.layer_term` of each cloud: the same trees, deaths, metrics,
    terms, gradients, entries and search count, through a first search, exact reuse, moved
    clouds written into the kept memory, a layer whose shape changes, a cloud the compiled
    search declines (copies), a tree a passive lookup searched, and a NaN cloud (None, with
    nothing changed)."""
    import numpy as np

    from topoopt import _native
    from topoopt.host_metrics import METRIC_CODES

    if _native.engine is None:
        pytest.skip("compiled engine not built")
    code, coefficients = METRIC_CODES["normalized_entropy"], {"a": 0.5, "b": 2.0}
    torch.manual_seed(0)
    a, b = torch.randn(30, 8), torch.randn(12, 5)
    copies = torch.randn(4, 8).repeat(10, 1)
    observed = torch.randn(12, 5)
    steps = [{"a": a, "b": b}, {"a": a, "b": b}, {"a": a + 0.1, "b": b * 2}, {"a": torch.randn(31, 8), "b": b},
             {"a": copies, "b": b}, {"a": copies + 0.01, "b": b}, {"a": a, "b": observed}]
    short, general = TreeCache(), TreeCache()
    for clouds in steps:
        if clouds["b"] is observed:  # a monitor measured it first
            for trees in (short, general):
                trees.edges("b", observed, passive=True)
        found = short.exact_terms(clouds, code, coefficients, -1.0, None)
        trees = general.trees_for(clouds)
        for key, cloud in clouds.items():
            n, d = cloud.shape
            deaths, gradient = np.empty(n - 1, np.float32), np.empty((n, d), np.float32)
            u, v = (edge.contiguous() for edge in trees[key][:2])
            metric, term, _ = _native.engine.layer_term(cloud.numpy(), 4, n, d, u.numpy(), v.numpy(), code,
                                                        coefficients[key], -1.0, np.nan, deaths, gradient)
            general.remember_deaths(key, torch.from_numpy(deaths), trees[key][2])
            got = found[key]
            assert torch.equal(got.u, u) and torch.equal(got.v, v)
            assert torch.equal(got.deaths, torch.from_numpy(deaths)) and torch.equal(got.gradient,
                                                                                     torch.from_numpy(gradient))
            assert (got.metric, got.term) == (metric, term) and got.exact
        assert short.searches == general.searches and short._observed.keys() == general._observed.keys()
        for key, entry in short._entries.items():
            other = general._entries[key]
            assert torch.equal(entry.searched_on, other.searched_on) and torch.equal(entry.u, other.u)
            assert torch.equal(entry.deaths, other.deaths) and (entry.spare is None) == (other.spare is None)
    assert short.searches == 2 + 0 + 2 + 2 + 1 + 1 + 2  # the passive lookup's search, taken, counts once
    bad = a.clone()
    bad[3, 1] = float("nan")
    kept = short._entries["b"].searched_on.clone()
    assert short.exact_terms({"b": b * 3, "a": bad}, code, coefficients, -1.0, None) is None
    assert short.searches == general.searches and torch.equal(short._entries["b"].searched_on, kept)


@pytest.mark.parametrize("metric", ["normalized_entropy", "mean_lifetime", "total_persistence"])
def test_a_wrapper_s_measuring_steps_in_one_compiled_call_change_nothing(monkeypatch, metric):
    """A TopoOptimizer alone measures its built-in float32 layers in one compiled call
    (`LayerMeter.exact_measurements`): the same complexities, scales, weights and search count,
    step by step, as the general path; a NaN layer still gets the general path's error."""
    from topoopt.measure import LayerMeter

    original, served = LayerMeter.exact_measurements, []

    def run(short: bool):
        monkeypatch.setattr(LayerMeter, "exact_measurements", lambda self, names, code, fewest: (
            served.append(original(self, names, code, fewest)) or served[-1]) if short else {})
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 2))
        optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), model, metric=metric,
                                  policy="contrast", every=1)
        seen = []
        for step in range(5):
            optimizer.zero_grad()
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
            optimizer.step()
            seen.append((dict(optimizer.complexity), dict(optimizer.scales)))
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        with torch.no_grad():
            model[2].weight[1, 1] = float("nan")
        with pytest.raises(ValueError, match="Layer '2': Invalid weights"):
            optimizer.update_scales()
        monkeypatch.undo()
        return seen, weights, optimizer.trees.searches

    short, general = run(True), run(False)
    assert short[0] == general[0] and torch.equal(short[1], general[1]) and short[2] == general[2]
    assert [set(found) for found in served[:5]] == [{"0", "2"}] * 5  # the 2-neuron layer is left out
    assert served[5] == {}  # the NaN layer: nothing measured here


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_cache_after_a_training_step_keeps_its_clouds_and_trees_together(how):
    """A cache copied (deepcopy, pickle: `torch.save` of a whole penalty) after `exact_terms`
    ran, then used for the next step, keeps in each entry the cloud its tree was searched on: the
    copy's kept memory is its own (a referee found the copied numpy views of the old memory
    written instead, with the new tree beside the old cloud)."""
    import copy
    import pickle

    from topoopt.host_metrics import METRIC_CODES

    torch.manual_seed(0)
    a, b = torch.randn(20, 6), torch.randn(20, 6)
    trees = TreeCache()
    assert trees.exact_terms({"fc": a}, METRIC_CODES["mean_lifetime"], {"fc": 1.0}, 1.0, None) is not None
    trees = copy.deepcopy(trees) if how == "deepcopy" else pickle.loads(pickle.dumps(trees))
    trees.exact_terms({"fc": b}, METRIC_CODES["mean_lifetime"], {"fc": 1.0}, 1.0, None)
    entry = trees._entries["fc"]
    assert torch.equal(entry.searched_on, b)
    with torch.no_grad():
        layer = nn.Linear(6, 20)
        layer.weight.copy_(b)
    deaths = measure_layers(trees, {"fc": layer}, passive=True)["fc"]
    assert torch.equal(deaths.sort().values, h0_deaths(b))


def test_what_a_training_step_s_compiled_call_leaves_to_the_general_path():
    """Found by a referee, each against the general path: a cloud of 2,000,000 or more numbers
    (whose edges torch measures, on the caller's threads) is not taken; a new entry of a cloud the
    compiled search declines keeps its place in the cache's order; an entry loaded under
    inference mode is replaced by an ordinary copy, not written into; and a wrapper whose
    layer of two neurons is NaN raises before any layer is searched."""
    from topoopt.host_metrics import METRIC_CODES

    code = METRIC_CODES["mean_lifetime"]
    torch.manual_seed(0)
    wide = torch.randn(100, 20_000)
    trees = TreeCache()
    assert trees.exact_terms({"wide": wide}, code, {"wide": 1.0}, 1.0, None) is None and len(trees) == 0

    clouds = {"zero": torch.zeros(10, 4), "b": torch.randn(7, 3), "c": torch.randn(5, 2)}
    trees.exact_terms(clouds, code, dict.fromkeys(clouds, 1.0), 1.0, None)
    assert list(trees._entries) == list(clouds)

    saved = trees.state_dict()
    with torch.inference_mode():
        trees.load_state_dict(saved)
    moved = {key: cloud + 0.5 for key, cloud in clouds.items()}
    trees.exact_terms(moved, code, dict.fromkeys(clouds, 1.0), 1.0, None)
    assert not any(entry.searched_on.is_inference() for entry in trees._entries.values())
    assert all(torch.equal(trees._entries[key].searched_on, cloud) for key, cloud in moved.items())
    trees._entries["b"].searched_on.add_(0.0)  # an ordinary tensor, written in place outside inference mode

    torch.manual_seed(0)
    model = build_mlp("mlp:12-9-2-4")
    optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, every=1)
    with torch.no_grad():
        model.fc2.weight[1, 3] = float("nan")
    with pytest.raises(ValueError, match="Layer 'fc2': Invalid weights"):
        optimizer.update_scales()
    assert optimizer.trees.searches == 0 and len(optimizer.trees) == 0
