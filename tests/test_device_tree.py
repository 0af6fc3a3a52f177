"""The device-resident tree search (Borůvka, `topoopt.device_tree`), run on CPU tensors through
the same code a CUDA cloud takes: against gudhi and scipy, with exact ties, and its gradients."""

import itertools

import numpy as np
import pytest
import torch
from conftest import gudhi_h0_deaths
from test_persistence import CASES, assert_no_cycle, make_cloud, positive, scipy_h0_deaths

from topoopt import h0_deaths, spanning_tree
from topoopt.device_tree import device_tree


@pytest.fixture
def device_search_on_cpu(monkeypatch):
    """Send CPU clouds through the device search, as CUDA clouds are."""
    monkeypatch.setattr(spanning_tree, "DEVICE_SEARCH_TYPES", frozenset({"cpu", "cuda"}))


def kruskal(squared: np.ndarray) -> set[tuple[int, int]]:
    """Kruskal's tree under the order (value, lower index, higher index): the reference tree."""
    n = squared.shape[0]
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    tree = set()
    for _length, a, b in sorted((squared[a, b], a, b) for a, b in itertools.combinations(range(n), 2)):
        if find(a) != find(b):
            parent[find(a)] = find(b)
            tree.add((a, b))
    return tree


@pytest.mark.parametrize("kind,n,d,scale", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_gudhi_and_scipy(kind, n, d, scale, dtype, device_search_on_cpu):
    rng = np.random.default_rng(n * 7 + d)
    x = make_cloud(kind, n, d, scale, rng).astype(np.float32 if dtype == torch.float32 else np.float64)
    deaths = h0_deaths(torch.tensor(x, dtype=dtype))
    assert deaths.shape == (n - 1,)
    reference = x.astype(np.float64)
    np.testing.assert_allclose(positive(deaths), gudhi_h0_deaths(reference), rtol=1e-5, atol=0)
    np.testing.assert_allclose(deaths.double().numpy(), scipy_h0_deaths(reference), rtol=1e-5, atol=1e-12 * scale)


@pytest.mark.parametrize("seed", range(4))
def test_ties_are_broken_by_index_exactly(seed):
    """On integer points (whose squared distances are exact), the tree is Kruskal's under
    (length, lower index, higher index): equal lengths everywhere, yet one determined tree."""
    rng = np.random.default_rng(seed)
    half = rng.integers(-2, 3, size=(20, 3)).astype(np.float64)
    x = np.concatenate([half, -half])  # the mean is exactly 0, so centring changes nothing
    u, v = device_tree(torch.tensor(x))
    squared = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    assert set(zip(u.tolist(), v.tolist())) == kruskal(squared)


@pytest.mark.parametrize("n", [2, 3, 100])
def test_all_zero_and_all_equal_clouds(n):
    for x in (torch.zeros(n, 30), torch.ones(n, 30).mul_(0.37)):
        u, v = device_tree(x)
        assert u.shape == (n - 1,)
        assert sorted(zip(u.tolist(), v.tolist())) == [(0, j) for j in range(1, n)]


def test_tree_is_spanning(device_search_on_cpu):
    x = torch.tensor(make_cloud("duplicates", 200, 5, 1.0, np.random.default_rng(1)))
    u, v = spanning_tree.euclidean_mst_edges(x)
    assert_no_cycle(u, v, 200)


def test_fewer_than_two_points():
    for n in (0, 1):
        u, v = device_tree(torch.randn(n, 4))
        assert u.shape == v.shape == (0,)


def test_gradcheck_through_the_device_search(device_search_on_cpu):
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: h0_deaths(p), (x,))


def test_duplicates_have_finite_zero_gradients(device_search_on_cpu):
    x = torch.zeros(50, 8, requires_grad=True)
    h0_deaths(x).sum().backward()
    assert torch.all(x.grad == 0)


def test_small_blocks_give_the_same_tree(monkeypatch):
    """Rows are processed in blocks on big clouds; the tree does not depend on the block size."""
    x = torch.tensor(make_cloud("small_clusters", 300, 16, 1.0, np.random.default_rng(2)), dtype=torch.float32)
    whole = device_tree(x)
    from topoopt import device_tree as module

    monkeypatch.setattr(module, "_BLOCK_ELEMENTS", 7 * 300)
    blocked = device_tree(x)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])


def test_cpu_clouds_keep_the_compiled_prim(monkeypatch):
    monkeypatch.setattr(spanning_tree, "device_tree", lambda points: pytest.fail("CPU cloud sent to the device search"))
    h0_deaths(torch.randn(30, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_clouds_search_on_the_device(monkeypatch):
    monkeypatch.setattr(spanning_tree, "prim_tree", lambda squared: pytest.fail("CUDA cloud searched on the host"))
    x = torch.randn(700, 64)
    deaths = h0_deaths(x.cuda().requires_grad_(True))
    deaths.sum().backward()
    np.testing.assert_allclose(np.sort(positive(deaths)), gudhi_h0_deaths(x.double().numpy()), rtol=1e-5)


def test_the_tf32_setting_can_be_read():
    """torch refuses to read its old TF32 flag after the new one was set; only the new is read."""
    from topoopt.gram import matmul_precision

    assert matmul_precision(torch.device("cuda")) == "ieee"  # torch's default: IEEE float32 products
    assert matmul_precision(torch.device("cpu")) == "ieee"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_tf32_setting_does_not_change_the_tree():
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    x = torch.tensor(make_cloud("near_duplicates", 300, 50, 1.0, np.random.default_rng(3)), dtype=torch.float32)
    try:
        matmul.fp32_precision = "tf32"
        deaths = h0_deaths(x.cuda())
    finally:
        matmul.fp32_precision = saved
    np.testing.assert_allclose(np.sort(positive(deaths)), gudhi_h0_deaths(x.double().numpy()), rtol=1e-5)


def test_a_device_search_keeps_the_callers_cpu_threads(monkeypatch):
    """The single-thread switch is for CPU work only: a search on the device runs with the
    caller's thread count (emulated: CPU clouds sent down the device path)."""
    from topoopt import spanning_tree

    seen = []
    monkeypatch.setattr(spanning_tree, "DEVICE_SEARCH_TYPES", frozenset({"cpu"}))
    monkeypatch.setattr(spanning_tree, "device_tree", lambda points: (seen.append(torch.get_num_threads()),
                                                                       device_tree(points))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        spanning_tree.tree_without_the_compiled_search(torch.randn(300, 8))
    finally:
        torch.set_num_threads(before)
    assert seen == [2]


def test_a_far_cluster_searched_again_is_checked_against_the_memory_left(monkeypatch):
    """The outer level fits; the cluster's own search would not fit beside it: a MemoryBudgetError
    naming the cluster's size, instead of running out of device memory."""
    from topoopt import device_tree as module
    from topoopt.gram import MemoryBudgetError

    g = torch.Generator().manual_seed(0)
    cluster = torch.cat([torch.randn(290, 16, generator=g) * 1e-4 + 100, torch.randn(10, 16, generator=g) * 1e3])
    calls = []

    def memory(device):
        calls.append(device)
        return 10**12 if len(calls) == 1 else module.device_tree_bytes(100)

    monkeypatch.setattr(module, "available_bytes", memory)
    with pytest.raises(MemoryBudgetError, match=r"A cloud of 290 points"):
        device_tree(cluster)
    assert len(calls) == 2


def _emulated_product(mantissa_bits: int):
    """A float32 product with reduced-precision inputs, emulated on the CPU: each input truncated
    to a `mantissa_bits`-bit mantissa (the coarser of the hardware's roundings), the products
    summed in float32; float64 products keep their precision (the settings are float32's)."""
    mask = ~((1 << (23 - mantissa_bits)) - 1)

    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype != torch.float32:
            return a @ b
        return (a.contiguous().view(torch.int32) & mask).view(torch.float32) @ \
            (b.contiguous().view(torch.int32) & mask).view(torch.float32)

    return product


_emulated_tf32_product = _emulated_product(10)  # TF32 tensor cores
_emulated_bf16_product = _emulated_product(7)  # oneDNN's bfloat16 setting


def _accelerator_whose_search(monkeypatch, search) -> None:
    """CPU clouds sent down the device path as an XPU or MPS cloud's, whose search is `search`,
    with no device type warned about yet."""
    monkeypatch.setattr(spanning_tree, "DEVICE_SEARCH_TYPES", frozenset({"cpu"}))
    monkeypatch.setattr(spanning_tree, "_WARNED_HOST_SEARCH", set())
    monkeypatch.setattr(spanning_tree, "device_tree", search)


def test_an_emulated_tf32_product_does_change_the_deaths(monkeypatch):
    """The control for the next test: a TF32 Gram product taken as if it were float32 is off by
    far more than the 1e-5 promised against gudhi."""
    from topoopt import device_tree as search

    monkeypatch.setattr(search, "_matmul", _emulated_tf32_product)
    x = torch.tensor(make_cloud("gaussian", 200, 3, 1.0, np.random.default_rng(5)), dtype=torch.float32)
    u, v = device_tree(x)
    deaths = (x[u] - x[v]).double().norm(dim=1)
    assert not np.allclose(np.sort(positive(deaths)), gudhi_h0_deaths(x.double().numpy()), rtol=1e-5)


@pytest.mark.parametrize("kind,n,d,scale", [case for case in CASES if case[1] >= 64])
def test_under_tf32_the_split_product_keeps_the_tree_exact(monkeypatch, kind, n, d, scale):
    """With TF32 products (emulated) the cloud is split into TF32-exact halves: the deaths agree
    with gudhi's as a float32 search's do, with no float64 Gram product."""
    from topoopt import device_tree as search

    monkeypatch.setattr(search, "_matmul", _emulated_tf32_product)
    monkeypatch.setattr(search, "_precision", lambda device: "tf32")
    x = torch.tensor(make_cloud(kind, n, d, scale, np.random.default_rng(5)), dtype=torch.float32)
    u, v = device_tree(x)
    assert_no_cycle(u, v, n)
    deaths = (x[u] - x[v]).double().norm(dim=1)
    np.testing.assert_allclose(np.sort(positive(deaths)), gudhi_h0_deaths(x.double().numpy()), rtol=1e-5)


def test_the_tf32_split_is_exact_in_tf32():
    """hi and lo hold at most 11 significant bits each (what a TF32 product reads without rounding),
    and hi + lo is x to 2⁻²² of it."""
    from topoopt.device_tree import tf32_split

    x = torch.randn(500, 37) * torch.logspace(-3, 3, 37)
    left, right = tf32_split(x)
    lo, hi = left[:, :37], left[:, 37:74]
    for part in (hi, lo):
        assert torch.equal(part.view(torch.int32) & 0x1FFF, torch.zeros_like(part, dtype=torch.int32))
    assert torch.equal(left[:, 74:], hi) and torch.equal(right[:, :37], hi) and torch.equal(right[:, 37:74], lo)
    assert torch.equal(right[:, 74:], hi)
    assert ((hi.double() + lo.double() - x.double()).abs() <= 2.0**-22 * x.double().abs()).all()


def test_an_accelerator_without_the_searchs_operations_falls_back_to_the_host_once(monkeypatch):
    """An XPU or MPS device that lacks an operation of the device search (MPS has no float64) is
    searched on the host from then on, with one warning that names the device (emulated: CPU
    clouds sent down the device path, whose search raises as MPS's would)."""
    import warnings

    calls = []

    def lacking_float64(points):
        calls.append(points.shape[0])
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")

    _accelerator_whose_search(monkeypatch, lacking_float64)
    x = torch.tensor(make_cloud("gaussian", 300, 20, 1.0, np.random.default_rng(1)), dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="not run on cpu .*doesn't support float64.*searched on the CPU"):
        first = spanning_tree.tree_without_the_compiled_search(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = spanning_tree.tree_without_the_compiled_search(x)
    assert calls == [300]  # tried once
    for u, v in (first, second):
        np.testing.assert_allclose(np.sort((x[u] - x[v]).double().norm(dim=1).numpy()),
                                   gudhi_h0_deaths(x.double().numpy()), rtol=1e-5)


def test_a_memory_budget_error_on_an_accelerator_is_not_a_fallback(monkeypatch):
    from topoopt.gram import MemoryBudgetError

    def too_large(points):
        raise MemoryBudgetError("needs 9 GiB")

    _accelerator_whose_search(monkeypatch, too_large)
    with pytest.raises(MemoryBudgetError, match="9 GiB"):
        spanning_tree.tree_without_the_compiled_search(torch.randn(300, 5))


def test_a_device_measurement_reads_the_host_a_few_times_not_twice_a_round():
    """Host reads (what makes a GPU wait) of one measurement on the device path: a spread cloud's
    are its scale factor, its near-pair count, one per Borůvka round and the range check; a
    clustered cloud adds a few per cluster searched again. Counted at torch's dispatcher."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from host_reads import clouds, count_host_reads

    x = clouds(1000)
    assert sum(count_host_reads(x["spread"]).values()) <= 8
    assert sum(count_host_reads(x["8 clusters"]).values()) <= 8 * 7


@pytest.mark.parametrize("kind,n,d", [("gaussian", 200, 3), ("gaussian", 300, 784), ("small_clusters", 600, 16)])
def test_under_bfloat16_products_the_gram_pass_is_taken_in_float64(monkeypatch, kind, n, d):
    from topoopt import device_tree as search

    monkeypatch.setattr(search, "_matmul", _emulated_bf16_product)
    x = torch.tensor(make_cloud(kind, n, d, 1.0, np.random.default_rng(2)), dtype=torch.float32)
    monkeypatch.setattr(search, "_precision", lambda device: "ieee")  # the control: taken as float32
    u, v = device_tree(x)
    reference = gudhi_h0_deaths(x.double().numpy())
    wrong = np.sort(positive((x[u] - x[v]).double().norm(dim=1)))
    monkeypatch.setattr(search, "_precision", lambda device: "bf16")
    u, v = device_tree(x)
    np.testing.assert_allclose(np.sort(positive((x[u] - x[v]).double().norm(dim=1))), reference, rtol=1e-5)
    if kind == "gaussian" and d == 3:
        assert not np.allclose(wrong, reference, rtol=1e-5)


def test_the_matmul_precision_is_read_per_device(monkeypatch):
    from types import SimpleNamespace

    from topoopt.gram import matmul_precision

    monkeypatch.setattr(torch.backends.mkldnn, "matmul", SimpleNamespace(fp32_precision="bf16"))
    assert matmul_precision(torch.device("cpu")) == "bf16"
    assert matmul_precision(torch.device("xpu")) == "bf16"
    monkeypatch.setattr(torch.backends.mkldnn, "matmul", SimpleNamespace(fp32_precision="tf32"))
    assert matmul_precision(torch.device("cpu")) == "ieee"  # no CPU has TF32
    assert matmul_precision(torch.device("xpu")) == "tf32"
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(fp32_precision="tf32"))
    assert matmul_precision(torch.device("cuda")) == "tf32"


def test_an_accelerators_out_of_memory_is_raised_not_taken_for_a_missing_operation(monkeypatch):
    def out_of_memory(points):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)")

    _accelerator_whose_search(monkeypatch, out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        spanning_tree.tree_without_the_compiled_search(torch.randn(300, 5))
    assert spanning_tree._WARNED_HOST_SEARCH == set()
