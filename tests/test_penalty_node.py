"""The one-node penalty (`topoopt.penalty_node`) against TopoPenalty's per-layer graph, the
compiled metrics against numpy and torch, and the cache's byte comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from topoopt import TopoOptimizer, TopoPenalty, TreeCache, _native, penalty_node, spanning_tree
from topoopt.host_metrics import HOST_METRICS, METRIC_CODES, entropy_and_slope, metric_and_slope
from topoopt.metrics import METRIC_SPECS

pytestmark = pytest.mark.skipif(_native.engine is None, reason="needs the compiled engine")


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Unflatten(1, (1, 9)), nn.Conv1d(1, 5, 3), nn.Flatten(),
                          nn.Linear(35, 1), nn.Linear(1, 4))  # "5": a cloud of one neuron
    return model.to(dtype)


def _total_and_grads(model, general: bool, monkeypatch, backward=lambda t: t.backward(), **kwargs):
    if general:
        monkeypatch.setattr(penalty_node, "handles", lambda *args: False)
    penalty = TopoPenalty(model, **kwargs)
    model.zero_grad()
    total = penalty()
    backward(total)
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    monkeypatch.undo()
    return total, grads, dict(penalty.last_values)


@pytest.mark.parametrize("metric", list(METRIC_SPECS))
@pytest.mark.parametrize("goal", [{}, {"direction": "maximize"}, {"target": 0.3}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_node_equals_the_per_layer_graph(metric, goal, dtype, monkeypatch):
    model = _model(dtype)
    weight = {"0": 0.5, "3": 2.0, "5": 1.5, "6": 0.0}
    for include_bias in (False, True):
        kwargs = dict(metric=metric, weight=weight, include_bias=include_bias, **goal)
        total, grads, values = _total_and_grads(model, False, monkeypatch, **kwargs)
        assert type(total.grad_fn).__name__ == "_PenaltyNodeBackward"
        expected, expected_grads, expected_values = _total_and_grads(model, True, monkeypatch, **kwargs)
        assert type(expected.grad_fn).__name__ != "_PenaltyNodeBackward"
        rtol = 1e-5 if dtype == torch.float32 else 1e-12
        assert total.dtype == expected.dtype
        torch.testing.assert_close(total, expected, rtol=rtol, atol=1e-7)
        assert values.keys() == expected_values.keys() == {"0", "3", "5"}  # "6" has coefficient 0
        for name in values:
            assert values[name] == pytest.approx(expected_values[name], rel=rtol, abs=1e-7)
        assert any(g.abs().sum() > 0 for g in grads)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6 * float(want.abs().max() + 1e-30))


def test_zero_layers_and_duplicates_give_finite_gradients(monkeypatch):
    model = _model()
    with torch.no_grad():
        model[0].weight.zero_()
        model[3].weight[1] = model[3].weight[0]
    for metric in METRIC_SPECS:
        total, grads, _ = _total_and_grads(model, False, monkeypatch, metric=metric)
        assert torch.isfinite(total)
        assert all(torch.isfinite(g).all() for g in grads)
        assert float(grads[0].abs().sum()) == 0.0  # a zero layer: a penalty cannot break its symmetry
        expected, expected_grads, _ = _total_and_grads(model, True, monkeypatch, metric=metric)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_the_incoming_gradient_scales_and_a_retained_graph_accumulates(monkeypatch):
    model = _model()
    _, grads, _ = _total_and_grads(model, False, monkeypatch)
    _, tripled, _ = _total_and_grads(model, False, monkeypatch, backward=lambda t: (3 * t).backward())
    for one, three in zip(grads, tripled):
        torch.testing.assert_close(three, 3 * one, rtol=1e-6, atol=1e-8)

    def twice(total):
        total.backward(retain_graph=True)
        total.backward()

    _, doubled, _ = _total_and_grads(model, False, monkeypatch, backward=twice)
    for one, two in zip(grads, doubled):  # the node's saved gradients were not modified in place
        torch.testing.assert_close(two, 2 * one, rtol=1e-6, atol=1e-8)


def test_create_graph_differentiates_the_per_layer_graph(monkeypatch):
    """Under create_graph the node's backward is the per-layer graph's: the same first-order
    gradient, and the same refusal of a second derivative through the tree's edge lengths
    (not implemented, `persistence.twice_guarded`)."""
    def gradients(model, general):
        if general:
            monkeypatch.setattr(penalty_node, "handles", lambda *args: False)
        total = TopoPenalty(model, metric="normalized_entropy")()
        grads = torch.autograd.grad(total, [model[0].weight, model[3].weight], create_graph=True)
        norm = sum((g**2).sum() for g in grads)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            norm.backward()
        monkeypatch.undo()
        return [g.detach() for g in grads]

    model = _model(torch.float64)
    _, plain, _ = _total_and_grads(model, False, monkeypatch, metric="normalized_entropy")
    one_node, general = gradients(model, False), gradients(model, True)
    for got, want, first_order in zip(one_node, general, [plain[0], plain[2]]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(got, first_order, rtol=1e-12, atol=0)


def test_without_a_graph_or_the_engine(monkeypatch):
    model = _model()
    penalty = TopoPenalty(model, metric="mean_lifetime")
    with torch.no_grad():
        value = penalty()
    assert value.grad_fn is None and value.item() > 0
    monkeypatch.setattr(_native, "engine", None)
    assert not penalty_node.handles([model[0].weight], "mean_lifetime")
    general = TopoPenalty(model, metric="mean_lifetime")()
    assert type(general.grad_fn).__name__ != "_PenaltyNodeBackward"
    torch.testing.assert_close(general.detach(), value, rtol=1e-5, atol=0)


def test_a_non_finite_metric_names_its_layer(monkeypatch):
    model = _model()
    with torch.no_grad():
        model[0].weight.mul_(1e38)  # 8 bars near 1e38 each: a float32 total overflows
    for general in (False, True):
        if general:
            monkeypatch.setattr(penalty_node, "handles", lambda *args: False)
        with pytest.raises(ValueError, match=r"Layer '0': its total_persistence is inf"):
            TopoPenalty(model, metric="total_persistence")()
        monkeypatch.undo()


def test_a_shared_cache_serves_the_optimizer_the_penalty_s_deaths():
    model = _model()
    trees = TreeCache()
    penalty = TopoPenalty(model, metric="normalized_entropy", trees=trees)
    optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, policy="calm", every=1,
                              trees=trees)
    x = torch.randn(4, 12)
    for step in range(3):
        optimizer.zero_grad()
        (model(x).sum() + penalty()).backward()
        fresh = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, policy="calm")
        fresh.update_scales()  # the weights the optimizer measures next, measured on their own
        optimizer.step()
        assert optimizer.complexity == fresh.complexity
        assert trees.searches == 3 * (step + 1)  # "0", "3", "6" (one neuron has no tree): nothing twice


def test_the_cached_deaths_are_the_measured_ones():
    model = _model()
    trees = TreeCache()
    TopoPenalty(model, metric="normalized_entropy", trees=trees)()
    served = trees.deaths_many({"0": model[0].weight.detach()})["0"]
    alone = TreeCache().deaths_many({"0": model[0].weight.detach()})["0"]
    torch.testing.assert_close(served, alone, rtol=0, atol=0)


def _diagrams():
    rng = np.random.default_rng(3)
    return [rng.random(99), np.r_[rng.random(20), 0.0, 0.0, 0.0], np.zeros(5), np.zeros(0),
            np.array([2.0, 2.0, 1.0]), rng.random(40) * 1e-20, rng.random(7) * 1e20, np.array([0.0, 3.0])]


@pytest.mark.parametrize("name", list(METRIC_CODES))
def test_compiled_metrics_equal_numpy_and_torch(name):
    torch_metric = METRIC_SPECS[name].function
    for bars in _diagrams():
        value, slope = metric_and_slope(name, bars)
        numpy_value, numpy_slope = HOST_METRICS[name](bars)
        assert value == pytest.approx(numpy_value, rel=1e-12, abs=1e-300)
        np.testing.assert_allclose(slope, numpy_slope, rtol=1e-12, atol=0)
        deaths = torch.tensor(bars, requires_grad=True)
        # the torch metrics of an all-zero or empty diagram are 0 with a zero gradient, as here
        expected = torch_metric(deaths)
        (gradient,) = torch.autograd.grad(expected, deaths) if bars.size else (torch.zeros(0),)
        assert value == pytest.approx(float(expected.detach()), rel=1e-12, abs=1e-300)
        np.testing.assert_allclose(slope, gradient.numpy(), rtol=1e-10, atol=1e-300)
        assert metric_and_slope(name, bars, slope=False)[1] is None


def test_compiled_total_normalized_entropy():
    for bars in _diagrams():
        slope = np.empty_like(bars)
        value = _native.engine.metric_slope(bars, 2, slope)
        expected, expected_slope = entropy_and_slope(bars, "total")
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-300)
        np.testing.assert_allclose(slope, expected_slope, rtol=1e-12, atol=0)


def test_metric_slope_rejects_bad_codes_and_sizes():
    with pytest.raises(ValueError, match="metric code"):
        _native.engine.metric_slope(np.ones(3), 9, np.empty(3))
    with pytest.raises(ValueError, match="wrong size"):
        _native.engine.metric_slope(np.ones(3), 1, np.empty(2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("code", sorted(set(METRIC_CODES.values()) | {2}))
@pytest.mark.parametrize("term", [(0.3, 1.0, None), (0.3, -1.0, None), (2.0, 1.0, 0.4)])
def test_layer_term_is_measure_metric_term_then_scatter(dtype, code, term):
    """`engine.layer_term` against its parts: `measure`, a cast of the lengths to the cloud's
    dtype, `metric_slope` of those, the metric cast too, `LayerTerm`'s term and derivative, and
    `scatter` of the slope times the derivative cast to the dtype; with a zero-length edge, and
    float32 lengths beyond its range (infinite deaths, as a cast makes them)."""
    engine = _native.engine
    coefficient, sign, target = term
    rng = np.random.default_rng(code)
    for scale in (1.0, 1e-30, 3e38 if dtype == np.float32 else 1e200):
        points = (rng.uniform(-1.0, 1.0, (9, 4)) * scale).astype(dtype)
        points[3] = points[5]  # an edge of length 0
        u = np.array([0, 1, 2, 3, 4, 5, 6, 7], dtype=np.int64)
        v = np.array([1, 2, 3, 5, 5, 6, 7, 8], dtype=np.int64)
        itemsize = points.itemsize
        unit, lengths = np.empty((8, 4), dtype), np.empty(8)
        engine.measure(points, itemsize, 9, 4, u, v, unit, lengths, np.empty(0, np.int64), np.empty(0))
        with np.errstate(over="ignore", invalid="ignore"):
            expected_deaths = lengths.astype(dtype)
            slope = np.empty(8)
            metric = float(dtype(engine.metric_slope(expected_deaths.astype(np.float64), code, slope)))
            gap = None if target is None else metric - target
            expected_term = coefficient * sign * metric if gap is None else coefficient * gap * gap
            derivative = coefficient * sign if gap is None else coefficient * 2.0 * gap
            expected_gradient = np.empty((9, 4), dtype)
            engine.scatter(unit, itemsize, 4, u, v, lengths, (slope * derivative).astype(dtype),
                           np.empty(0, np.int64), expected_gradient, 9)
        deaths, gradient = np.empty(8, dtype), np.empty((9, 4), dtype)
        value, layer_total, longest = engine.layer_term(points, itemsize, 9, 4, u, v, code, coefficient, sign,
                                                       np.nan if target is None else target, deaths, gradient)
        np.testing.assert_array_equal(deaths, expected_deaths)
        assert value == metric or (np.isnan(value) and np.isnan(metric))
        assert layer_total == expected_term or (np.isnan(layer_total) and np.isnan(expected_term))
        assert longest == expected_deaths.max()
        if np.isfinite(metric):
            np.testing.assert_array_equal(gradient, expected_gradient)
        if dtype == np.float32 and scale == 3e38:
            assert np.isinf(deaths).any()
        without = engine.layer_term(points, itemsize, 9, 4, u, v, code, coefficient, sign,
                                    np.nan if target is None else target, deaths, bytearray())
        assert without == (value, layer_total, longest) or np.isnan(value)
    with pytest.raises(ValueError, match="metric code"):
        engine.layer_term(points, itemsize, 9, 4, u, v, 9, 1.0, 1.0, np.nan, deaths, gradient)
    with pytest.raises(ValueError, match="sizes"):
        engine.layer_term(points, itemsize, 9, 4, u, v, code, 1.0, 1.0, np.nan, deaths, gradient[:3])
    with pytest.raises(IndexError):
        engine.layer_term(points, itemsize, 9, 4, u, v + 1, code, 1.0, 1.0, np.nan, deaths, gradient)


@pytest.mark.parametrize("second, expected", [(1e33, np.finfo(np.float32).max), (1.7e38, np.inf)])
def test_float32_lengths_just_beyond_its_range_round_as_a_cast(second, expected):
    """A float32 cloud's length between FLT_MAX and FLT_MAX + half its last unit rounds to
    FLT_MAX, as numpy's and torch's casts round it (a referee found the compiled rounding made it
    infinite); beyond, infinite. The one node, the sorted deaths and the per-layer graph agree."""
    top = np.finfo(np.float32).max
    points = np.array([[top, second], [0.0, 0.0]], dtype=np.float32)
    engine, u, v = _native.engine, np.array([0], np.int64), np.array([1], np.int64)
    unit, lengths, deaths = np.empty((1, 2), np.float32), np.empty(1), np.empty(1, np.float32)
    engine.measure(points, 4, 2, 2, u, v, unit, lengths, np.empty(0, np.int64), np.empty(0))
    value = engine.layer_term(points, 4, 2, 2, u, v, METRIC_CODES["max_lifetime"], 1.0, 1.0, np.nan, deaths,
                              np.empty((2, 2), np.float32))[0]
    with np.errstate(over="ignore"):
        assert deaths[0] == lengths.astype(np.float32)[0] == expected and value == float(expected)
    cloud = torch.from_numpy(points)
    from topoopt import h0_deaths
    from topoopt.persistence import edge_lengths

    assert float(h0_deaths(cloud)[0]) == float(edge_lengths(cloud, torch.tensor([0]), torch.tensor([1]))[0]) == expected
    if np.isfinite(expected):
        layer = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            layer.weight.copy_(cloud)
        assert float(TopoPenalty(nn.Sequential(layer), metric="max_lifetime")().detach()) == expected


def test_the_cache_compares_bytes():
    cloud = torch.randn(30, 6)
    trees = TreeCache()
    trees.edges("a", cloud)
    trees.edges("a", cloud.clone())
    assert trees.searches == 1  # the same bytes: reused
    signed = cloud.clone()
    signed[0, 0] = 0.0
    trees.edges("b", signed)
    flipped = signed.clone()
    flipped[0, 0] = -0.0  # equal values, other bytes: searched again (still exact)
    trees.edges("b", flipped)
    assert trees.searches == 3
    transposed = torch.randn(6, 30).T  # not contiguous: torch.equal compares
    trees.edges("c", transposed)
    trees.edges("c", transposed.clone())
    assert trees.searches == 4
    assert not _native.engine.same_bytes(np.zeros(3), np.zeros(4))


def test_forward_mode_ad_and_no_layers_take_the_general_path():
    from torch.autograd import forward_ad

    weight = torch.randn(6, 4)
    assert penalty_node.handles([weight], "mean_lifetime")
    assert not penalty_node.handles([], "mean_lifetime")
    with forward_ad.dual_level():
        assert not penalty_node.handles([weight], "mean_lifetime")
    on_meta = nn.Sequential(nn.Linear(4, 3)).to("meta")
    assert TopoPenalty(on_meta, weight=0.0)().device.type == "meta"  # nothing measured: the layers' device


def test_errors_leave_the_same_last_values_in_both_paths(monkeypatch):
    import warnings

    model = _model()
    with torch.no_grad():
        # two groups 6e38 apart: the tree's longest edge is beyond float32's range
        model[3].weight.copy_(torch.tensor([[-3e38, 0, 0]] * 2 + [[3e38, 0, 0]] * 3)[:, None])
    for general in (False, True):
        if general:
            monkeypatch.setattr(penalty_node, "handles", lambda *args: False)
        penalty = TopoPenalty(model, metric="max_lifetime")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no numpy overflow warning before the error
            with pytest.raises(ValueError, match=r"Layer '3': its max_lifetime is inf"):
                penalty()
        assert penalty.last_values["3"] == float("inf") and np.isfinite(penalty.last_values["0"])
        monkeypatch.undo()


def test_host_metrics_take_any_float_array_and_propagate_nan():
    from topoopt.metrics import dimensionless_complexity

    bars = np.array([1.0, 2.0, 3.0])
    for name in METRIC_CODES:
        expected = metric_and_slope(name, bars)
        for other in (bars.astype(np.float32), np.repeat(bars, 2)[::2]):  # float32, strided
            value, slope = metric_and_slope(name, other)
            assert value == pytest.approx(expected[0], rel=1e-7)
            np.testing.assert_allclose(slope, expected[1], rtol=1e-7)
    for order in ([1.0, np.nan], [np.nan, 1.0]):
        assert np.isnan(metric_and_slope("max_lifetime", np.array(order))[0])
    for bad in (torch.tensor([1.0, -2.0, 3.0]), torch.ones(2, 3)):
        with pytest.raises(ValueError):
            dimensionless_complexity("normalized_entropy", bad, 1.0)


def test_a_declined_compiled_search_is_not_run_twice(monkeypatch):
    calls = []
    engine = _native.engine

    class Counting:  # the engine, counting its compiled searches
        def __getattr__(self, name):
            found = getattr(engine, name)
            return (lambda *args: calls.append(1) or found(*args)) if name == "small_tree" else found

    monkeypatch.setattr(_native, "engine", Counting())
    clustered = torch.zeros(50, 10)  # every pair a near pair: the compiled search declines
    trees = TreeCache()
    u, v = trees.edges_many({"zero": clustered})["zero"]
    assert len(calls) == 1 and u.shape == (49,)
    assert trees.deaths_many({"zero": clustered})["zero"].abs().max() == 0


def test_weights_modified_in_place_before_the_backward_are_an_error():
    model = _model()
    total = TopoPenalty(model, metric="normalized_entropy")()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()


def test_exact_terms_is_the_lookup_search_copy_and_layer_term_of_each_layer():
    """`engine.exact_terms` against its parts, layer by layer: a cloud equal to its kept copy is
    measured along the kept tree (status 0); a moved one is searched as `small_tree` searches it,
    copied into its kept memory and measured along the new tree (1); one with a given tree is
    copied and measured along it (2); one the search declines is left untouched (-1); with every
    layer's term, metric, deaths and gradient those of `layer_term`. A layer that is not finite
    is named by its index, with nothing written for any layer."""
    engine, rng = _native.engine, np.random.default_rng(3)
    ratio, pairs = spanning_tree.NEAR_PAIR_RATIO, spanning_tree.EXACT_PAIRS_PER_POINT
    code, sign, target = METRIC_CODES["normalized_entropy"], -1.0, np.nan

    def tree_of(points):
        n, d = points.shape
        u, v = np.empty(n - 1, np.int64), np.empty(n - 1, np.int64)
        assert engine.small_tree(points, n, d, ratio, pairs * n, np.empty((n, n), np.float32), u, v) >= 0
        return u, v

    same = rng.standard_normal((12, 5)).astype(np.float32)
    moved = rng.standard_normal((30, 7)).astype(np.float32)
    given = rng.standard_normal((9, 4)).astype(np.float32)
    declined = np.repeat(rng.standard_normal((2, 6)).astype(np.float32), 10, axis=0)  # copies: many near pairs
    old_u, old_v = tree_of(same)
    given_u, given_v = np.arange(8, dtype=np.int64), np.arange(1, 9, dtype=np.int64)  # a path, not the tree
    kept = {"same": same.copy(), "moved": rng.standard_normal((30, 7)).astype(np.float32),
            "given": np.zeros((9, 4), np.float32), "declined": np.zeros((20, 6), np.float32)}
    out = {name: (np.full(n - 1, -7, np.int64), np.full(n - 1, -7, np.int64), np.full(n - 1, -7, np.float32),
                  np.empty((n, d), np.float32))
           for name, (n, d) in {"same": (12, 5), "moved": (30, 7), "given": (9, 4), "declined": (20, 6)}.items()}
    empty = np.empty(0, np.int64)

    def layers(points_of=lambda name, p: p):
        return [
            (points_of("same", same), 12, 5, kept["same"], old_u, old_v, *out["same"][:2], *out["same"][2:], 0.5),
            (points_of("moved", moved), 30, 7, kept["moved"], *tree_of(kept["moved"]), *out["moved"][:2],
             *out["moved"][2:], 2.0),
            (points_of("given", given), 9, 4, kept["given"], given_u, given_v, empty, empty, *out["given"][2:], 1.0),
            (points_of("declined", declined), 20, 6, kept["declined"], empty, empty, *out["declined"][:2],
             out["declined"][2], np.empty(0, np.float32), 1.0),
        ]

    before = {name: array.copy() for name, array in kept.items()}
    nan_moved = moved.copy()
    nan_moved[4, 2] = np.nan
    assert engine.exact_terms(layers(lambda name, p: nan_moved if name == "moved" else p), code, sign, target,
                              ratio, pairs) == 1
    assert all(np.array_equal(kept[name], before[name]) for name in kept)

    outcomes = engine.exact_terms(layers(), code, sign, target, ratio, pairs)
    assert [status for status, *_ in outcomes] == [0, 1, 2, -1]
    new_u, new_v = tree_of(moved)
    assert np.array_equal(out["moved"][0], new_u) and np.array_equal(out["moved"][1], new_v)
    assert np.array_equal(kept["moved"], moved) and np.array_equal(kept["given"], given)
    assert np.array_equal(kept["same"], same) and np.array_equal(kept["declined"], before["declined"])
    trees = {"same": (old_u, old_v), "moved": (new_u, new_v), "given": (given_u, given_v)}
    for (name, points, coefficient), (_, metric, term, longest) in zip(
            [("same", same, 0.5), ("moved", moved, 2.0), ("given", given, 1.0)], outcomes):
        deaths, gradient = np.empty(points.shape[0] - 1, np.float32), np.empty(points.shape, np.float32)
        expected = engine.layer_term(points, 4, *points.shape, *trees[name], code, coefficient, sign, target,
                                     deaths, gradient)
        assert (metric, term, longest) == expected
        assert np.array_equal(out[name][2], deaths) and np.array_equal(out[name][3], gradient)
    assert all(np.all(array == -7) for array in out["declined"][:3])  # declined: no tree, no deaths

    with pytest.raises(ValueError, match="sizes"):
        engine.exact_terms([(same, 12, 5, kept["same"][:3], old_u, old_v, *out["same"], 1.0)], code, sign, target,
                           ratio, pairs)
    with pytest.raises(ValueError, match="sizes"):  # no tree given and none to search into
        engine.exact_terms([(same, 12, 5, kept["same"], empty, empty, empty, empty, *out["same"][2:], 1.0)], code,
                           sign, target, ratio, pairs)
    with pytest.raises(IndexError):
        engine.exact_terms([(same, 12, 5, kept["same"], old_u + 12, old_v, *out["same"], 1.0)], code, sign, target,
                           ratio, pairs)
