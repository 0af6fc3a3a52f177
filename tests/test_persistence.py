"""h0_deaths against gudhi, scipy and ripser, its gradients, and its input handling."""

import numpy as np
import pytest
import torch
from conftest import gudhi_h0_deaths
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import cdist

from topoopt import MemoryBudgetError, _native, h0_deaths, h0_edges, spanning_tree


def positive(deaths: torch.Tensor) -> np.ndarray:
    values = deaths.detach().cpu().double().numpy()
    return values[values > 0]


def scipy_h0_deaths(points: np.ndarray) -> np.ndarray:
    # A dense graph loses edges shorter than 1e-8 (scipy masks them as "no edge"), a sparse one
    # keeps every stored entry; duplicate pairs get the smallest positive float, not 0.
    distances = np.triu(cdist(points, points), k=1)
    distances[np.triu(distances == 0, k=1)] = np.finfo(np.float64).tiny
    deaths = minimum_spanning_tree(csr_matrix(distances)).data
    return np.sort(np.where(deaths <= np.finfo(np.float64).tiny, 0.0, deaths))


def make_cloud(kind: str, n: int, d: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=(n, d))
    if kind == "quantised":  # ties and duplicates
        x = np.round(x * 2) / 2
    elif kind == "duplicates":
        x = x[rng.integers(0, max(1, n // 3), n)]
    elif kind == "near_duplicates":
        x = x[rng.integers(0, max(1, n // 3), n)] + 1e-4 * rng.normal(size=(n, d))
    elif kind == "collinear":
        x = np.outer(rng.normal(size=n), rng.normal(size=d))
    elif kind == "offset":  # a common component far larger than the spread
        x = 1e3 + x
    elif kind == "tiny_cluster":  # zero/tiny initialisation with a few grown neurons
        x[10:] *= 1e-6
    elif kind == "nested_clusters":  # clusters inside clusters, each far from its parent's centre
        x = x * 1e-6 + np.repeat(rng.normal(size=(n // 50 + 1, d)), 50, axis=0)[:n] * 1e-3
        x[: n // 4] += 10 * rng.normal(size=d)
    elif kind == "small_clusters":  # many groups of a few neurons each, far from the centre
        x = 5.0 + 1e-4 * x + np.repeat(rng.normal(size=(n // 4 + 1, d)), 4, axis=0)[:n]
    elif kind == "plane":  # a dense two-dimensional sheet: one component of near pairs
        x = rng.normal(size=(n, 2)) @ rng.normal(size=(2, d))
    return x * scale


CASES = [
    (kind, n, d, scale)
    for kind, n, d in [
        ("gaussian", 2, 1),
        ("gaussian", 3, 2),
        ("gaussian", 200, 3),
        ("gaussian", 300, 784),
        ("gaussian", 64, 4096),
        ("gaussian", 2000, 16),
        ("quantised", 400, 3),
        ("duplicates", 300, 10),
        ("near_duplicates", 300, 50),
        ("collinear", 300, 20),
        ("offset", 200, 30),
        ("tiny_cluster", 400, 64),
        ("nested_clusters", 400, 32),
        ("small_clusters", 600, 16),
        ("plane", 500, 8),
    ]
    for scale in (1e-8, 1.0, 1e3)
]


@pytest.mark.parametrize("kind,n,d,scale", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_gudhi_and_scipy(kind, n, d, scale, dtype):
    rng = np.random.default_rng(n * 7 + d)
    x = make_cloud(kind, n, d, scale, rng).astype(np.float32 if dtype == torch.float32 else np.float64)
    deaths = h0_deaths(torch.tensor(x, dtype=dtype))
    assert deaths.shape == (n - 1,)
    assert torch.all(deaths[1:] >= deaths[:-1])
    reference = x.astype(np.float64)
    expected = gudhi_h0_deaths(reference)
    np.testing.assert_allclose(positive(deaths), expected, rtol=1e-5, atol=0)
    np.testing.assert_allclose(deaths.double().numpy(), scipy_h0_deaths(reference), rtol=1e-5, atol=1e-12 * scale)


def test_matches_ripser():
    from ripser import ripser

    x = np.random.default_rng(3).normal(size=(150, 12))
    diagram = ripser(x, maxdim=0)["dgms"][0][:, 1]
    np.testing.assert_allclose(positive(h0_deaths(torch.tensor(x))), np.sort(diagram[np.isfinite(diagram)]), rtol=1e-5)


def test_matches_torch_topological():
    from torch_topological.nn import VietorisRipsComplex

    x = torch.randn(120, 9, dtype=torch.float64)
    diagram = VietorisRipsComplex(dim=0)(x)[0].diagram[:, 1]
    expected = torch.sort(diagram[torch.isfinite(diagram)]).values
    np.testing.assert_allclose(positive(h0_deaths(x)), expected.numpy(), rtol=1e-6)


def test_tree_edges_span_the_cloud():
    x = torch.randn(50, 4)
    u, v = h0_edges(x)
    assert u.shape == v.shape == (49,)
    assert_no_cycle(u, v, 50)


def assert_no_cycle(u, v, n):
    """The edges (u, v) on n points close no cycle (with n − 1 of them: a spanning tree)."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in zip(u.tolist(), v.tolist()):
        assert find(a) != find(b), "tree edges form a cycle"
        parent[find(a)] = find(b)


def test_zero_bars_are_kept():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    assert h0_deaths(x).tolist() == [0.0, 5.0]


def test_fewer_than_two_points_give_an_empty_tensor():
    assert h0_deaths(torch.randn(1, 5)).shape == (0,)
    assert h0_deaths(torch.randn(0, 5)).shape == (0,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_points_are_rejected(bad):
    x = torch.randn(5, 3)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        h0_deaths(x)


@pytest.mark.parametrize("bad,error", [(torch.randn(5), ValueError), (torch.ones(3, 2, dtype=torch.int64), TypeError),
                                       (np.ones((3, 2)), TypeError)])
def test_malformed_input_is_rejected(bad, error):
    with pytest.raises(error, match="points"):
        h0_deaths(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    x = torch.randn(40, 8).to(dtype)
    deaths = h0_deaths(x)
    assert deaths.dtype == torch.float32
    np.testing.assert_allclose(positive(deaths), gudhi_h0_deaths(x.float().double().numpy()), rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    x = torch.randn(300, 64, device="cuda", requires_grad=True)
    deaths = h0_deaths(x)
    assert deaths.device.type == "cuda"
    deaths.sum().backward()
    np.testing.assert_allclose(positive(deaths), gudhi_h0_deaths(x.detach().cpu().double().numpy()), rtol=1e-5)


# ---- gradients ----

def test_gradcheck_at_generic_points():
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: h0_deaths(p), (x,))


def test_two_point_gradient_by_hand():
    """d|a−b|/da = (a−b)/|a−b| and the opposite for b."""
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    h0_deaths(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[-0.6, -0.8], [0.6, 0.8]], dtype=torch.float64))


def test_three_point_gradient_by_hand():
    """On a line at 0, 1, 3 the tree is {0–1, 1–3}: deaths (1, 2); d(sum)/dx = (−1, 0, +1)."""
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64, requires_grad=True)
    deaths = h0_deaths(x)
    torch.testing.assert_close(deaths, torch.tensor([1.0, 2.0], dtype=torch.float64))
    (deaths * torch.tensor([10.0, 1.0], dtype=torch.float64)).sum().backward()
    # 10·|x1−x0| + |x2−x1| → d/dx = (−10, 10 − 1, 1).
    torch.testing.assert_close(x.grad, torch.tensor([[-10.0], [9.0], [1.0]], dtype=torch.float64))


@pytest.mark.parametrize("n", [2, 100])
def test_all_zero_cloud_has_zero_gradient(n):
    x = torch.zeros(n, 30, requires_grad=True)
    deaths = h0_deaths(x)
    assert torch.all(deaths == 0)
    deaths.sum().backward()
    assert torch.all(x.grad == 0)


def test_duplicate_rows_have_finite_gradients():
    base = torch.randn(5, 3, dtype=torch.float64)
    x = base[torch.tensor([0, 0, 1, 2, 2, 3, 4])].clone().requires_grad_(True)
    h0_deaths(x).sum().backward()
    assert torch.isfinite(x.grad).all()


# ---- properties ----

cloud_shapes = st.tuples(st.integers(2, 40), st.integers(1, 12), st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(cloud_shapes)
def test_invariant_under_row_permutation(shape):
    """Renumbering the neurons does not change the deaths."""
    n, d, seed = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(h0_deaths(x[torch.randperm(n, generator=g)]), h0_deaths(x))


@settings(max_examples=40, deadline=None)
@given(cloud_shapes)
def test_invariant_under_rotation_and_translation(shape):
    """A rigid motion of the cloud preserves every distance, hence every death."""
    n, d, seed = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    shift = 100 * torch.randn(d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(h0_deaths(x @ rotation + shift), h0_deaths(x), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(cloud_shapes, st.floats(1e-6, 1e6))
def test_scaling_scales_the_deaths(shape, c):
    """Multiplying the cloud by c > 0 multiplies every death by c."""
    n, d, seed = shape
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(h0_deaths(c * x), c * h0_deaths(x), rtol=1e-9, atol=0)


# ---- memory ----

def test_oversized_cloud_fails_before_allocating(monkeypatch):
    monkeypatch.setattr(spanning_tree, "available_bytes", lambda device: 10 * 2**20)
    with pytest.raises(MemoryBudgetError, match=r"2000×2000 float32 distance matrix"):
        h0_deaths(torch.randn(2000, 3))


@pytest.mark.skipif(_native.engine is None, reason="compiled engine not built")
@pytest.mark.parametrize("n", [2, 3, 57, 400])
def test_compiled_and_numpy_prim_agree(n):
    x = torch.randn(n, 6)
    squared = spanning_tree._squared_distances(x)
    native_u, native_v = spanning_tree.prim_tree(squared)
    numpy_u, numpy_v = spanning_tree._prim_numpy(squared)
    assert np.array_equal(native_u, numpy_u) and np.array_equal(native_v, numpy_v)


def test_numpy_fallback_matches_gudhi(monkeypatch):
    monkeypatch.setattr(_native, "engine", None)
    x = np.random.default_rng(5).normal(size=(200, 7))
    np.testing.assert_allclose(positive(h0_deaths(torch.tensor(x))), gudhi_h0_deaths(x), rtol=1e-5)


@pytest.mark.parametrize("kind", ["tiny_cluster", "nested_clusters", "small_clusters", "plane"])
def test_clustered_clouds_recompute_few_pairs_exactly(kind, monkeypatch):
    """Clusters far from the centre make most pairs "near"; they are measured about their own
    centres instead of recomputing O(N²) pairs in float64 (the cost stays ~ a few Gram passes)."""
    recomputed = []
    original = spanning_tree._recompute_exactly
    monkeypatch.setattr(spanning_tree, "_recompute_exactly",
                        lambda result, points, pairs, f: (recomputed.append(len(pairs)),
                                                          original(result, points, pairs, f)))
    n = 1200
    x = make_cloud(kind, n, 64, 1.0, np.random.default_rng(0)).astype(np.float32)
    deaths = h0_deaths(torch.tensor(x))
    assert sum(recomputed) <= 40 * n
    np.testing.assert_allclose(positive(deaths), gudhi_h0_deaths(x.astype(np.float64)), rtol=1e-5, atol=0)


def test_a_cloud_near_the_top_of_float32_is_searched_exactly():
    """Its float32 mean overflows (the general search used to raise OverflowError there); a
    power-of-two scale changes nothing but the deaths' scale."""
    torch.manual_seed(0)
    base = torch.rand(40, 5)
    big = base * 2.0**125  # entries up to 4e37, all positive: a float32 sum of 40 of them overflows
    assert not torch.isfinite(big.sum(dim=0)).all()
    torch.testing.assert_close(h0_deaths(big), h0_deaths(base) * 2.0**125, rtol=1e-6, atol=0)


def test_a_cloud_near_float32_s_largest_keeps_its_tree_where_denormals_flush():
    torch.manual_seed(0)
    base = torch.rand(40, 5)
    big = base * 2.0**127  # entries up to 1.7e38
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        flushed = h0_deaths(big)
    finally:
        torch.set_flush_denormal(False)
    torch.testing.assert_close(flushed.double(), h0_deaths(base).double() * 2.0**127, rtol=1e-6, atol=0)


def test_points_of_no_coordinates_coincide():
    points = torch.zeros(5, 0, requires_grad=True)
    deaths = h0_deaths(points)
    assert torch.equal(deaths, torch.zeros(4))
    deaths.sum().backward()
    assert points.grad.shape == (5, 0)


def test_torch_func_transforms_are_refused_in_one_line_and_metrics_still_take_them():
    import topoopt

    w = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="cannot run inside a torch.func transform"):
        torch.func.grad(lambda w: topoopt.mean_lifetime(h0_deaths(w)))(w)
    deaths = h0_deaths(w)
    gradient = torch.func.grad(lambda d: topoopt.normalized_persistent_entropy(d))(deaths)
    assert torch.isfinite(gradient).all()
