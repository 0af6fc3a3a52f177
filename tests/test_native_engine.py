"""The compiled engine (topoopt/_native/engine.c) against gudhi and against the numpy/torch paths
it replaces, which stay for machines without a C compiler (and for CUDA, float16, big clouds)."""

import numpy as np
import pytest
import torch
from conftest import gudhi_h0_deaths
from test_persistence import assert_no_cycle, make_cloud, positive

from topoopt import _native, edge_lengths, h0_deaths, h0_edges, metrics, spanning_tree
from topoopt._validation import finite_each
from topoopt.many_clouds import h0_deaths_many

pytestmark = pytest.mark.skipif(_native.engine is None, reason="compiled engine not built")

KINDS = ["gaussian", "quantised", "duplicates", "near_duplicates", "collinear", "offset", "tiny_cluster",
         "small_clusters", "plane"]


def deaths_and_gradient(x: torch.Tensor, weights: torch.Tensor):
    cloud = x.clone().requires_grad_(True)
    deaths = h0_deaths(cloud)
    (deaths * weights).sum().backward()
    return deaths.detach(), cloud.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [1e-25, 1e-8, 1.0, 1e3, 1e25])
def test_small_clouds_match_gudhi(kind, scale):
    """Every kind of small cloud (the compiled path, or its fallback for many near pairs), in
    float32, across float32's range: squares of 1e-25 and 1e25 under- and overflow in float32."""
    x = make_cloud(kind, 120, 24, scale, np.random.default_rng(11)).astype(np.float32)
    deaths = h0_deaths(torch.from_numpy(x))
    assert deaths.shape == (119,) and torch.all(deaths[1:] >= deaths[:-1])
    np.testing.assert_allclose(positive(deaths), gudhi_h0_deaths(x.astype(np.float64)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["gaussian", "near_duplicates", "collinear", "offset", "plane"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_and_fallback_paths_agree(kind, dtype, monkeypatch):
    """Same deaths and same gradient (through the sorted deaths, so the order matters) with and
    without the compiled engine. Kinds with exact ties are left out: their trees may differ by
    which of two equal edges they take, which moves the gradient between coinciding points."""
    x = torch.tensor(make_cloud(kind, 150, 40, 1.0, np.random.default_rng(5)), dtype=dtype)
    weights = torch.rand(149, dtype=dtype, generator=torch.Generator().manual_seed(1))
    compiled = deaths_and_gradient(x, weights)
    monkeypatch.setattr(_native, "engine", None)
    fallback = deaths_and_gradient(x, weights)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(compiled[0], fallback[0], rtol=rtol, atol=0)
    torch.testing.assert_close(compiled[1], fallback[1], rtol=rtol, atol=rtol * float(compiled[1].abs().max()))


@pytest.mark.parametrize("n", [2, 3, 4, 5, 17, 256])
def test_every_size_spans_the_cloud(n):
    """Sizes around the Gram kernel's 4×4 blocks, and the largest small cloud."""
    x = torch.randn(n, 9)
    u, v = h0_edges(x)
    assert u.shape == (n - 1,)
    assert_no_cycle(u, v, n)
    np.testing.assert_allclose(positive(h0_deaths(x)), gudhi_h0_deaths(x.double().numpy()), rtol=1e-5)


def test_zero_layer_and_copies():
    """An all-zero layer (zero initialisation): N−1 zero bars and a zero, finite gradient."""
    cloud = torch.zeros(40, 7, requires_grad=True)
    deaths = h0_deaths(cloud)
    deaths.sum().backward()
    assert torch.equal(deaths, torch.zeros(39)) and torch.equal(cloud.grad, torch.zeros(40, 7))


@pytest.mark.parametrize("d", [4, 64, 784])
def test_gram_distances_are_accurate(d):
    """The compiled Gram pass leaves squared distances accurate to the relative 4e-6 that the
    tree search promises (near pairs exactly; the rest within float32's Gram error)."""
    rng = np.random.default_rng(d)
    x = rng.normal(size=(100, d)).astype(np.float32)
    x[50:60] = x[40:50] + 1e-4 * rng.normal(size=(10, d)).astype(np.float32)  # some near pairs
    scratch = np.empty((100, 100), dtype=np.float32)
    u, v = np.empty(99, dtype=np.int64), np.empty(99, dtype=np.int64)
    near = _native.engine.small_tree(x, 100, d, spanning_tree.NEAR_PAIR_RATIO, 400, scratch, u, v)
    assert near >= 10
    wide = x.astype(np.float64)
    exact = ((wide[:, None, :] - wide[None, :, :]) ** 2).sum(axis=2)
    off_diagonal = ~np.eye(100, dtype=bool)
    ratio = scratch.astype(np.float64)[off_diagonal] / exact[off_diagonal]
    scale = 2.0 ** np.round(np.log2(np.median(ratio)))  # the matrix is rescaled by a power of two
    assert scale == 2.0 ** -np.round(np.log2((wide**2).sum(axis=1).max()))
    assert np.abs(ratio / scale - 1).max() <= 4e-6


def test_many_near_pairs_take_the_general_search():
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32) + 1e4  # far from the origin
    scratch = np.empty((50, 50), dtype=np.float32)
    u, v = np.empty(49, dtype=np.int64), np.empty(49, dtype=np.int64)
    assert _native.engine.small_tree(x, 50, 8, spanning_tree.NEAR_PAIR_RATIO, 200, scratch, u, v) == -1
    np.testing.assert_allclose(positive(h0_deaths(torch.from_numpy(x))), gudhi_h0_deaths(x.astype(np.float64)),
                               rtol=1e-5)


@pytest.mark.parametrize("engine", ["compiled", "fallback"])
def test_an_edge_outside_the_cloud_is_an_index_error(engine, monkeypatch):
    if engine == "fallback":
        monkeypatch.setattr(_native, "engine", None)
    with pytest.raises(IndexError):
        edge_lengths(torch.randn(5, 3), torch.tensor([0, 1]), torch.tensor([2, 5]))


def test_lengths_are_exact_beyond_float32_squares():
    """Squared lengths of 1e-30 or 1e30 do not fit in float32; the lengths themselves do."""
    for scale in (1e-30, 1e30):
        x = torch.tensor([[0.0, 0.0], [3.0, 4.0]]) * scale
        torch.testing.assert_close(h0_deaths(x), torch.tensor([5.0 * scale]), rtol=1e-6, atol=0)


def test_a_second_derivative_fails_loudly():
    """Under create_graph=True the first derivative is right, and differentiating it again
    raises instead of returning an incomplete second derivative."""
    cloud = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(h0_deaths(cloud).square().sum(), cloud, create_graph=True)
    expected = torch.autograd.grad(h0_deaths(cloud).square().sum(), cloud)[0]
    torch.testing.assert_close(grad, expected)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_gradcheck():
    x = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: h0_deaths(p) * torch.arange(1.0, 12.0, dtype=torch.float64), (x,))


def test_many_clouds_mix_compiled_and_fallback_clouds():
    """float16 and float32 clouds in one call: the first by the torch path, the second compiled."""
    clouds = [torch.randn(20, 6).half().requires_grad_(), torch.randn(30, 6).requires_grad_()]
    deaths = h0_deaths_many(clouds)
    sum(d.float().sum() for d in deaths).backward()
    for cloud, measured in zip(clouds, deaths):
        single = cloud.detach().clone().requires_grad_()
        expected = h0_deaths(single)
        expected.float().sum().backward()
        torch.testing.assert_close(measured, expected)
        torch.testing.assert_close(cloud.grad, single.grad)


def test_finite_each():
    good, bad = torch.randn(5, 3), torch.randn(4)
    bad[2] = float("nan")
    inf = torch.tensor([1.0, float("inf")], dtype=torch.float64)
    assert finite_each([good, bad, inf, good.half(), bad.half()]) == [True, False, False, True, False]


_DRAWS = torch.Generator().manual_seed(7)  # fixed diagrams, whatever ran before the import
DIAGRAMS = {
    "random": torch.rand(60, dtype=torch.float64, generator=_DRAWS) + 0.01,
    "with zero bars": torch.cat([torch.zeros(5, dtype=torch.float64),
                                 torch.rand(20, dtype=torch.float64, generator=_DRAWS) + 0.01]),
    # every bar ≥ 5e-5: finite differences (eps 1e-6) never cross the kink at zero
    "total below 1": (torch.rand(30, dtype=torch.float64, generator=_DRAWS) + 0.05) * 1e-3,
    "one positive bar": torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64),
    "all zero": torch.zeros(4, dtype=torch.float64),
}


@pytest.mark.parametrize("diagram", DIAGRAMS)
@pytest.mark.parametrize("metric", ["entropy", "count", "total"])
def test_host_entropy_equals_the_torch_version(diagram, metric, monkeypatch):
    """The entropies' one-node CPU version against their torch operations: values, gradients,
    and finite differences."""
    def measure(deaths):
        if metric == "entropy":
            return metrics.persistent_entropy(deaths)
        return metrics.normalized_persistent_entropy(deaths, normalization=metric)

    deaths = DIAGRAMS[diagram].clone().requires_grad_(True)
    host = measure(deaths)
    (host_grad,) = torch.autograd.grad(host, deaths)
    if DIAGRAMS[diagram].min() > 0:  # finite differences only away from the zero bars' kinks
        assert torch.autograd.gradcheck(measure, (deaths,))
    monkeypatch.setattr(metrics, "_on_host", lambda deaths: False)
    reference = measure(deaths)
    (reference_grad,) = torch.autograd.grad(reference, deaths)
    torch.testing.assert_close(host, reference, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(host_grad, reference_grad, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(host_grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cloud_norm_in_float64(dtype, monkeypatch):
    from topoopt.cloud import cloud_norm

    x = (torch.randn(50, 30, dtype=torch.float64) * 3e19).to(dtype)  # its float32 squares overflow
    expected = float(torch.linalg.vector_norm(x.double()))
    assert cloud_norm(x) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(_native, "engine", None)
    assert cloud_norm(x) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_wrappers_compiled_scaling_equals_its_torch_one(dtype, monkeypatch):
    """TopoOptimizer's step scaling (copy, check, lerp back) compiled and in torch: the same
    weights after several steps, and the same error for a non-finite step."""
    from topoopt import TopoOptimizer
    from topoopt.lab.models import build_mlp

    def run(compiled: bool, poison: bool = False):
        if not compiled:
            monkeypatch.setattr(_native, "engine", None)
        torch.manual_seed(0)
        model = build_mlp("mlp:12-9-7-3").to(dtype)
        optimizer = TopoOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, policy="contrast",
                                  strength=1.0, every=2)
        x, y = torch.randn(16, 12, dtype=dtype), torch.randint(0, 3, (16,))
        for step in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if poison and step == 4:
                model.fc2.weight.grad[0, 0] = float("nan")
            optimizer.step()
        monkeypatch.undo()
        return [p.detach().clone() for p in model.parameters()], optimizer

    compiled, optimizer = run(True)
    assert any(s != 1.0 for s in optimizer.scales.values())
    # (the compiled entropy sums in another order than numpy's pairwise sum, ~1e-16 apart in
    # float64 and ~1e-8 from float32 deaths; the contrast policy divides those differences by its
    # spread floor, 0.005, and carries them into the weights at ~1e-12 and ~3e-6)
    for a, b in zip(compiled, run(False)[0]):
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-11, atol=0)
    for compiled_path in (True, False):
        with pytest.raises(FloatingPointError, match=r"\['fc2'\]"):
            run(compiled_path, poison=True)


@pytest.mark.parametrize("cloud", [
    [[0.0], [1e20], [3e20]],  # squared distances beyond float32
    [[0.0], [1.0], [2.1], [2.15]],  # times 1e-23 below: squared distances below float32's range
])
@pytest.mark.parametrize("scale", [1.0, 1e-23])
def test_few_points_at_extreme_scales(cloud, scale, monkeypatch):
    """Too few pairs to exceed the near-pair budget: the compiled search must still rescale, or
    hand the cloud to the general search (found by a referee: it gave [1e20, 3e20] here)."""
    x = torch.tensor(cloud, dtype=torch.float32) * scale
    compiled = h0_deaths(x)
    monkeypatch.setattr(_native, "engine", None)
    torch.testing.assert_close(compiled, h0_deaths(x), rtol=1e-6, atol=0)
    np.testing.assert_allclose(positive(compiled), gudhi_h0_deaths(x.double().numpy()), rtol=1e-5)


def test_a_few_outliers_far_out():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    x[10] += 1e20
    x[20] += 3e20
    x[30] -= 2e20
    np.testing.assert_allclose(positive(h0_deaths(x)), gudhi_h0_deaths(x.double().numpy()), rtol=1e-5)


def test_gradient_finite_where_a_float32_difference_overflows():
    x = torch.tensor([[3e38, 1.0], [-3e38, 0.0]], requires_grad=True)
    edge_lengths(x, torch.tensor([0]), torch.tensor([1])).sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))


def test_scaling_any_number_of_tensors_and_as_torch_lerps():
    """More tensors than any fixed bound, and results equal to torch._foreach_lerp_'s, bit for bit."""
    params = [torch.randn(7) for _ in range(5000)]
    before = [p + torch.randn(7) for p in params]
    weights = [(-0.2, 0.3, 0.6, 0.9, 1.7)[i % 5] for i in range(5000)]
    expected = [p.clone() for p in params]
    torch._foreach_lerp_(expected, before, weights)
    copies = [torch.empty(7) for _ in params]
    _native.engine.copy_all([p.numpy() for p in params], [c.numpy() for c in copies])
    assert all(torch.equal(c, p) for c, p in zip(copies, params))
    assert _native.engine.scale_steps([p.numpy() for p in params], [b.numpy() for b in before], weights, True) == []
    assert all(torch.equal(p, e) for p, e in zip(params, expected))


def test_entropy_second_derivatives_and_torch_func():
    """The one-node entropy keeps the torch version's second derivatives and works under torch.func."""
    deaths = torch.rand(6, dtype=torch.float64) + 0.1
    hessian = torch.autograd.functional.hessian(metrics.persistent_entropy, deaths)
    reference = torch.autograd.functional.hessian(lambda d: metrics._torch_entropy(d, None), deaths)
    torch.testing.assert_close(hessian, reference)
    assert hessian.abs().max() > 0.1
    leaf = deaths.clone().requires_grad_()
    (expected,) = torch.autograd.grad(metrics.normalized_persistent_entropy(leaf), leaf)
    torch.testing.assert_close(torch.func.grad(metrics.normalized_persistent_entropy)(deaths), expected)


def test_the_wrappers_kept_views_follow_replaced_parameter_memory():
    """The compiled scaling keeps numpy views of the parameters between steps; a parameter given
    new memory (``p.data = ...``) must be scaled in that memory, not in the old one."""
    from topoopt import TopoOptimizer
    from topoopt.lab.models import build_mlp

    def run(replace: bool):
        torch.manual_seed(0)
        model = build_mlp("mlp:12-9-7-3")
        optimizer = TopoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, policy="contrast",
                                  strength=1.0, every=1)
        x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
        for step in range(4):
            if replace and step == 2:
                model.fc1.weight.data = model.fc1.weight.data.clone()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        assert any(s != 1.0 for s in optimizer.scales.values())
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gaussian", "clustered", "duplicates", "wide"])
def test_the_general_search_s_compiled_block_pass_equals_its_torch_one(kind, monkeypatch):
    """The multi-block Gram pass: distances, mirror and near pairs, compiled and in torch, equal
    bit for bit (the compiled pass keeps torch's float32 order of operations)."""
    from topoopt import spanning_tree

    torch.manual_seed(0)
    n, d = (600, 30) if kind != "wide" else (520, 784)
    x = torch.randn(n, d)
    if kind == "clustered":
        x = torch.randn(12, d).repeat(50, 1) + 1e-4 * torch.randn(n, d)
    if kind == "duplicates":
        x[300:400] = x[0:100]
    compiled = spanning_tree._gram_pass(x, torch.float32, spanning_tree.NEAR_PAIR_RATIO)
    monkeypatch.setattr(_native, "engine", None)
    reference = spanning_tree._gram_pass(x, torch.float32, spanning_tree.NEAR_PAIR_RATIO)
    assert torch.equal(compiled[0], reference[0])
    assert torch.equal(compiled[1], reference[1])
    assert compiled[2] == reference[2]
    if kind in ("clustered", "duplicates"):
        assert compiled[1].shape[0] > 0


@pytest.mark.parametrize("kind", ["gaussian", "duplicates", "clustered", "three points", "transposed, declined"])
def test_a_small_cloud_s_one_node_deaths_equal_the_search_then_edge_lengths(kind):
    """`h0_deaths` of a small float32 CPU cloud (`persistence._SmallCloudDeaths`: search and
    measurement in one forward) against `euclidean_mst_edges` then the sorted `_EdgeLengths`:
    equal values and gradients, bit for bit, a cloud the compiled search declines included."""
    from topoopt.persistence import _EdgeLengths, _SmallCloudDeaths
    from topoopt.spanning_tree import euclidean_mst_edges

    torch.manual_seed(1)
    x = {"gaussian": lambda: torch.randn(60, 30), "three points": lambda: torch.randn(3, 5),
         "duplicates": lambda: torch.randn(20, 8).repeat(3, 1),
         "clustered": lambda: torch.randn(4, 16).repeat(25, 1) + 1e-5 * torch.randn(100, 16),
         # declined (1e25 leaves the compiled search's range), near ties, not contiguous: the general
         # search's float32 sums follow the layout, which must be the caller's (a referee's case)
         "transposed, declined": lambda: ((torch.eye(64, 73) + 3e-7 * torch.randn(64, 73)) * 1e25).T.contiguous().T,
         }[kind]()
    weights = torch.rand(x.shape[0] - 1)
    results = []
    for one_node in (True, False):
        cloud = x.clone().requires_grad_(True)
        deaths = (_SmallCloudDeaths.apply(cloud) if one_node
                  else _EdgeLengths.apply(cloud, *euclidean_mst_edges(cloud.detach()), True))
        (deaths * weights).sum().backward()
        results.append((deaths.detach(), cloud.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(h0_deaths(x), results[0][0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("row", [0, 3, 19])
def test_the_compiled_search_declines_a_cloud_with_a_non_finite_coordinate(bad, row):
    """Callers check finiteness first, but the compiled search must not build a tree of NaN
    distances either: a NaN in any row (not only the last) made it accept the cloud."""
    x = np.random.default_rng(0).standard_normal((20, 5)).astype(np.float32)
    x[row, 2] = bad
    u, v = np.empty(19, np.int64), np.empty(19, np.int64)
    assert _native.engine.small_tree(x, 20, 5, spanning_tree.NEAR_PAIR_RATIO, 80, np.empty((20, 20), np.float32),
                                      u, v) == -1
