"""Euclidean minimum spanning tree of a point cloud, found without autograd.

The H0 deaths of a Vietoris–Rips filtration are the edge lengths of a Euclidean minimum spanning
tree (EMST). This module only *chooses* the tree; `topoopt.persistence` re-measures its N−1 edges
with autograd. Splitting combinatorics from geometry is what makes the backward cheap (it touches
N−1 edges, not N² distances), the design pytorch-topological uses for its pairings.

Why not a library here: scipy's dense MST takes seconds at N = 4096 and reads 0 as "no edge",
gudhi and ripser build the whole filtration (≈ 900 MiB at 4096×784) and give no edge indices.
`benchmarks/h0.py` measures this module against them.

Steps:
1. Exact duplicate rows are merged first: each copy joins its representative with a zero-length
   edge. A zero-initialised layer is then a single point and costs nothing.
2. Squared distances come from a float32 Gram product of the centred, rescaled cloud, one row
   block at a time, upper triangle only (half the flops), mirrored into one N×N float32 matrix.
3. The Gram identity |x|²+|y|²−2x·y loses relative accuracy when two points are close compared
   with their norms. Entries below `NEAR_PAIR_RATIO`·(|x|²+|y|²) are recomputed exactly from
   float64 differences, so near-duplicates cannot pick a wrong tree.
4. Prim's algorithm on the dense matrix, O(N²), compiled (`topoopt/_native/engine.c`) or, where
   no compiler was found at install time, a numpy loop over the same shrinking frontier.
A float32 cloud of one Gram block (N ≤ 256) takes steps 2–4 in one compiled call around its Gram
product (`native_small_trees`): as ~15 torch operations they cost 6× the product at 100×784.
A CUDA cloud takes none of these steps: its tree is searched on the GPU (`topoopt.device_tree`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from topoopt import _native
from topoopt._threads import caller_threads, engine_threads
from topoopt.device_tree import device_tree
from topoopt.gram import (
    EXACT_PAIRS_PER_POINT,
    MAX_DEPTH,
    NEAR_PAIR_RATIO,
    NEAR_PAIR_RATIO_FLOAT64,
    SMALL_COMPONENT,
    MemoryBudgetError,
    available_bytes,
    centred_scaled,
    exact_squared,
    far_from_centre,
    matmul_precision,
)

__all__ = ["euclidean_mst_edges", "distance_matrix_bytes", "MemoryBudgetError"]

# Clouds on these devices search their tree where they are (`topoopt.device_tree`, Borůvka):
# copying a GPU's N×N matrix to the host for Prim costs more than the search. Tests add "cpu"
# to run that code without a GPU. An XPU or MPS device that lacks one of the search's operations
# (MPS has no float64) falls back to the host search, with one warning.
DEVICE_SEARCH_TYPES = frozenset({"cuda", "xpu", "mps"})
_WARNED_HOST_SEARCH: set[str] = set()  # accelerator types already told their search runs on the host

# Rows per Gram block: 256 rows × N columns keeps the float32 block at 20 MiB for N = 20,000.
BLOCK_ROWS = 256

def distance_matrix_bytes(n_points: int) -> int:
    """Peak bytes the tree search needs for `n_points` unique points: one float32 N×N matrix."""
    return 4 * n_points * n_points


def _check_memory(n_points: int, device: torch.device) -> None:
    # The matrix lives in host memory, where Prim runs (CUDA clouds go to `topoopt.device_tree`).
    needed = distance_matrix_bytes(n_points)
    available = available_bytes(torch.device("cpu"))
    if needed > 0.8 * available:
        raise MemoryBudgetError(
            f"A cloud of {n_points} distinct points needs a {n_points}×{n_points} float32 distance "
            f"matrix ({needed / 2**30:.1f} GiB), but only {available / 2**30:.1f} GiB of memory "
            f"is available. Compute H0 on a subset of the neurons, or on a larger machine."
        )


def _may_have_duplicates(points: torch.Tensor) -> bool:
    """Cheap screen: equal rows have equal projections, so distinct projections rule them out.

    The float64 projection of one row can differ in its last bits with the row's position (BLAS
    blocking), hence the 1e-11 relative tolerance; distinct random rows are ~1/N² apart.
    """
    direction = torch.linspace(1.0, 2.0, points.shape[1], device=points.device, dtype=torch.float64)
    projection = torch.sort(points.double() @ direction).values
    gaps = projection[1:] - projection[:-1]
    return bool((gaps <= 1e-11 * projection.abs().max()).any())


def _merge_duplicates(points: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Unique rows, the original index representing each, and zero-length edges for the copies."""
    n = points.shape[0]
    no_copies = (points, np.arange(n), np.empty((0, 2), dtype=np.int64))
    if not _may_have_duplicates(points):
        return no_copies
    unique_rows, inverse = torch.unique(points, dim=0, return_inverse=True)
    if unique_rows.shape[0] == n:
        return no_copies
    inverse = inverse.cpu().numpy()
    representative = np.empty(unique_rows.shape[0], dtype=np.int64)
    # Writing in reverse leaves the first occurrence of each row as its representative.
    reverse = np.arange(n)[::-1]
    representative[inverse[reverse]] = reverse
    copies = np.flatnonzero(representative[inverse] != np.arange(n))
    zero_edges = np.stack([representative[inverse[copies]], copies], axis=1)
    return points[torch.as_tensor(representative, device=points.device)], representative, zero_edges


def _squared_distances(points: torch.Tensor) -> np.ndarray:
    """N×N float32 squared distances of the cloud, every entry accurate to a relative 4e-6.

    Distances are those of the cloud centred and multiplied by a power of two (which keeps the
    Gram product accurate and free of under/overflow; the tree does not change). Diagonal
    unspecified.
    """
    result, _ = _accurate_squared_distances(points, depth=0)
    return result.numpy()


def _accurate_squared_distances(points: torch.Tensor, depth: int) -> tuple[torch.Tensor, float]:
    """Squared distances times factor², near pairs repaired at bounded cost; (matrix, factor).

    The Gram identity loses the pairs that are close compared with their norms. A few of them
    are recomputed exactly. Many of them means clusters far from the cloud's centre (2,990
    tiny neurons beside 10 grown ones, say: 98% of the pairs). Such a cluster is a connected
    component of the near pairs; measured again about its *own* centre, its pairs are no
    longer near, so each large component is recursed into, and the cost stays a small multiple
    of the Gram product instead of O(N²·d) float64 gathers (benchmarks/h0.py, "clustered").
    A component about as wide as its distance from the centre (a dense sheet through it, say)
    gains nothing from centring again; its Gram product is taken in float64 instead, whose near
    pairs (1e-8 of the norms) are genuinely rare.
    """
    n = points.shape[0]
    result, pairs, factor = _gram_pass(points, torch.float32, NEAR_PAIR_RATIO)
    if pairs.shape[0] <= EXACT_PAIRS_PER_POINT * n or depth >= MAX_DEPTH:
        _recompute_exactly(result, points, pairs, factor**2)
        return result, factor
    exact: list[torch.Tensor] = []
    for group in _components(n, pairs.numpy()):
        if len(group) <= SMALL_COMPONENT:
            rows, cols = np.triu_indices(len(group), k=1)
            exact.append(torch.as_tensor(np.stack([group[rows], group[cols]], axis=1)))
            continue
        index = torch.as_tensor(group, device=points.device)
        members = points[index]
        if far_from_centre(members, points) and len(group) < n:
            inner, inner_factor = _accurate_squared_distances(members, depth + 1)
        else:  # centring again would not help: a float64 Gram product of the group instead
            inner, near, inner_factor = _gram_pass(members, torch.float64, NEAR_PAIR_RATIO_FLOAT64)
            _recompute_exactly(inner, members, near, inner_factor**2)
        # Both factors are powers of two, so moving to this level's scale is exact.
        inner.mul_((factor / inner_factor) ** 2)
        result.numpy()[np.ix_(group, group)] = inner.numpy()
    if exact:
        _recompute_exactly(result, points, torch.cat(exact), factor**2)
    return result, factor


def _gram_pass(points: torch.Tensor, dtype: torch.dtype, ratio: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Squared distances from the Gram product in `dtype` (upper triangle, mirrored into a
    float32 matrix), the pairs closer than ``ratio·(|x|²+|y|²)``, and the power-of-two factor."""
    n = points.shape[0]
    if dtype == torch.float32 and matmul_precision(points.device) != "ieee":  # a bfloat16 product: too coarse
        dtype, ratio = torch.float64, NEAR_PAIR_RATIO_FLOAT64
    x, sq_norms, factor = centred_scaled(points, dtype)
    factor = float(factor)
    if n <= BLOCK_ROWS:  # one block: the whole square at once, no mirroring
        block = x @ x.T
        near = near_pairs_of_block(block, sq_norms[:, None], sq_norms[None, :], ratio)
        return block.to(device="cpu", dtype=torch.float32), near, factor
    result = torch.empty((n, n), dtype=torch.float32)
    near_pairs: list[torch.Tensor] = []
    compiled = _native.engine is not None and x.device.type == "cpu" and x.dtype == torch.float32
    for start in range(0, n, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, n)
        # Only the product gets the caller's threads: as torch operations, the block's elementwise
        # passes were ~10 short parallel regions, each a barrier that stalls under contention
        # (N = 1000 with two busy processes: ~300 ms, against ~50 ms on one thread). Compiled,
        # they are one pass (benchmarks/RESULTS.md, "Under contention").
        with caller_threads(flops=2.0 * (stop - start) * (n - start) * x.shape[1]):
            block = x[start:stop] @ x[start:].T
        if compiled:  # the same values and pairs in one pass, on this thread
            pairs = np.empty((stop - start) * (n - start) * 2, dtype=np.int32)  # pages touched only as filled
            count = _native.engine.block_distances(block.numpy(), sq_norms[start:stop].numpy(),
                                                   sq_norms[start:].numpy(), ratio, result.numpy(), n, start, pairs)
            near_pairs.append(torch.from_numpy(pairs[: 2 * count].reshape(count, 2)) + start)
            continue
        with caller_threads(elements=(stop - start) * (n - start)):
            near_pairs.append(
                near_pairs_of_block(block, sq_norms[start:stop, None], sq_norms[None, start:], ratio) + start)
            block = block.to(device="cpu", dtype=torch.float32)
            result[start:stop, start:] = block
            result[start:, start:stop] = block.T
    return result, torch.cat(near_pairs), factor


def near_pairs_of_block(block: torch.Tensor, row_norms: torch.Tensor, col_norms: torch.Tensor,
                         ratio: float) -> torch.Tensor:
    """Turn a Gram block into squared distances, in place; its pairs (i < j) closer than
    ``ratio·(|x|²+|y|²)``, as int32 (row, column) offsets into the block."""
    block.mul_(-2).add_(row_norms).add_(col_norms).clamp_(min=0)
    threshold = torch.add(row_norms, col_norms).mul_(ratio)
    near = torch.triu(block < threshold, diagonal=1)
    return torch.nonzero(near).to(device="cpu", dtype=torch.int32)


def _components(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """The connected components (of 2 or more points) of the graph on n points with edges `pairs`."""
    labels = np.arange(n, dtype=pairs.dtype)
    u, v = np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
    while True:
        lowest = np.minimum(labels[u], labels[v])
        before = labels.copy()
        np.minimum.at(labels, u, lowest)
        np.minimum.at(labels, v, lowest)
        labels = labels[labels]  # pointer jumping: follow each label to its own label
        if np.array_equal(labels, before):
            break
    order = np.argsort(labels, kind="stable")
    boundaries = np.flatnonzero(np.diff(labels[order])) + 1
    return [group for group in np.split(order, boundaries) if len(group) > 1]


def _recompute_exactly(
    result: torch.Tensor, points: torch.Tensor, pairs: torch.Tensor, factor: float
) -> None:
    """Overwrite `result` at `pairs` (and their mirror) with float64 squared differences."""
    if pairs.shape[0] == 0:
        return
    rows, cols = pairs.to(device=points.device, dtype=torch.int64).T
    # float64 once: converting gathered rows instead costs a copy per pair
    exact = exact_squared(points.double(), rows, cols, factor).cpu()
    rows, cols = rows.cpu(), cols.cpu()
    result[rows, cols] = exact
    result[cols, rows] = exact


def prim_tree(squared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prim's algorithm on a dense symmetric float32 matrix; the N−1 tree edges (u, v).

    Uses the compiled loop when it was built at install time (5× faster at N = 1000), the numpy
    one otherwise; both scan the same frontier in the same order and give the same tree.
    """
    if _native.engine is None:
        return _prim_numpy(squared)
    n = squared.shape[0]
    edge_u = np.empty(n - 1, dtype=np.int64)
    edge_v = np.empty(n - 1, dtype=np.int64)
    _native.engine.prim(np.ascontiguousarray(squared, dtype=np.float32), n, edge_u, edge_v)
    return edge_u, edge_v


def _prim_numpy(squared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prim's algorithm as a numpy loop over a shrinking frontier (no compiler needed)."""
    n = squared.shape[0]
    frontier = np.arange(1, n)
    key = squared[0, 1:].copy()
    parent = np.zeros(n - 1, dtype=np.int64)
    edge_u = np.empty(n - 1, dtype=np.int64)
    edge_v = np.empty(n - 1, dtype=np.int64)
    size = n - 1
    for k in range(n - 1):
        nearest = int(key[:size].argmin())
        vertex = int(frontier[nearest])
        edge_u[k] = parent[nearest]
        edge_v[k] = vertex
        # Remove `nearest` from the frontier by moving the last entry into its slot.
        size -= 1
        frontier[nearest] = frontier[size]
        key[nearest] = key[size]
        parent[nearest] = parent[size]
        if size == 0:
            break
        candidate = squared[vertex].take(frontier[:size])
        closer = candidate < key[:size]
        np.copyto(key[:size], candidate, where=closer)
        np.copyto(parent[:size], vertex, where=closer)
    return edge_u, edge_v


@torch.no_grad()
def euclidean_mst_edges(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Endpoints (u, v) of the N−1 edges of a Euclidean minimum spanning tree of `points`.

    `points` is an N×d floating tensor on any device, free of NaN/Inf (the caller checks). The
    indices come back as int64 tensors on the points' device. Exact duplicates are joined by
    zero-length edges; ties between equal lengths are broken arbitrarily (every minimum spanning
    tree has the same sorted edge lengths, so the H0 deaths do not depend on the choice).
    Runs single-threaded but for big matrix products (`topoopt._threads`). A CUDA cloud's tree
    is searched on its device (`topoopt.device_tree`), with ties broken by index.
    """
    n = points.shape[0]
    device = points.device
    if n < 2:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty
    points = points.detach()
    if native_small_tree_handles(points):  # compiled and single-threaded: no thread count to switch
        edges = native_small_tree(points)
        if edges is not None:
            return edges
    return tree_without_the_compiled_search(points)


@torch.no_grad()
def tree_without_the_compiled_search(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`euclidean_mst_edges` of a cloud of 2 or more points, for one that `native_small_tree`
    declined (many near pairs) or does not take: the general searches."""
    n, device = points.shape[0], points.device
    if device.type in DEVICE_SEARCH_TYPES and device.type not in _WARNED_HOST_SEARCH:
        try:  # on the device: the caller's CPU threads are left alone
            return device_tree(points)
        except (RuntimeError, TypeError, NotImplementedError, AttributeError) as error:
            if device.type == "cuda" or _out_of_memory(error):
                raise
            _WARNED_HOST_SEARCH.add(device.type)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            warnings.warn(f"topoopt's on-device tree search does not run on {device.type} ({reason}); the "
                          f"trees of {device.type} clouds are searched on the CPU from now on (each cloud "
                          f"copied there, its edges back)", RuntimeWarning, stacklevel=2)
    if device.type in DEVICE_SEARCH_TYPES and device.type != "cpu":  # one whose device search failed
        u, v = tree_without_the_compiled_search(points.to("cpu"))
        return u.to(device), v.to(device)
    if device.type not in ("cpu", *DEVICE_SEARCH_TYPES) and device.type not in _WARNED_HOST_SEARCH:
        _WARNED_HOST_SEARCH.add(device.type)
        warnings.warn(f"topoopt searches the spanning trees of {device.type} clouds on the host (CUDA, XPU and "
                      f"MPS have an on-device search): their distances are copied to the CPU block by block",
                      RuntimeWarning, stacklevel=2)
    with engine_threads():
        edges = _small_cloud_tree(points) if n <= BLOCK_ROWS else None
        if edges is None:
            edges = _tree_of_distinct_points(points)
    all_edges = torch.as_tensor(edges, device=device)
    return all_edges[:, 0], all_edges[:, 1]


def _out_of_memory(error: Exception) -> bool:
    """Whether a device's error is its memory running out (MPS says so only in its message)."""
    return isinstance(error, getattr(torch, "OutOfMemoryError", MemoryError)) or "out of memory" in str(error).lower()


def _small_cloud_tree(points: torch.Tensor) -> np.ndarray | None:
    """The tree of a cloud of one Gram block, without the duplicate screen and memory check
    (their fixed costs were most of a small layer's time); None when near pairs abound (copies
    or clusters), which the general path handles. Duplicates found here are near pairs,
    recomputed exactly as zero."""
    n = points.shape[0]
    result, pairs, factor = _gram_pass(points, torch.float32, NEAR_PAIR_RATIO)
    if pairs.shape[0] > EXACT_PAIRS_PER_POINT * n:
        return None
    _recompute_exactly(result, points, pairs, factor**2)
    u, v = prim_tree(result.numpy())
    return np.stack([u, v], axis=1)


def native_small_tree_handles(points: torch.Tensor) -> bool:
    """Whether `native_small_trees` takes this cloud (or stack of clouds): a compiled engine,
    float32 on the CPU (unless tests send CPU clouds to the device search), at most one Gram
    block of rows, at least 2 rows and 1 column."""
    n, d = points.shape[-2:]
    return (_native.engine is not None and points.dtype == torch.float32 and points.device.type == "cpu"
            and points.device.type not in DEVICE_SEARCH_TYPES and 2 <= n <= BLOCK_ROWS and d >= 1)


def native_small_trees(stack: torch.Tensor) -> list[np.ndarray | None]:
    """`_small_cloud_tree` of each cloud of a k×N×d float32 CPU stack, one compiled call each
    (Gram product, distances, near pairs recomputed in double, Prim); None for a cloud with more
    than `EXACT_PAIRS_PER_POINT`·N near pairs, as there, or whose float32 Gram product under- or
    overflows (largest squared norm outside [1e-30, 1e30]). Each tree is a 2×(N−1) array: the
    rows u and v.

    No centring first (a pass over the cloud that cost more than the product at 100×784): a
    cloud far from the origin has many near pairs and takes the general, centred search instead.
    The compiled call rescales its distances by a power of two, as the general search does."""
    k, n, d = stack.shape
    points = stack.detach().contiguous().numpy()
    scratch = np.empty((n, n), dtype=np.float32)
    return [compiled_tree(points[b], scratch) for b in range(k)]


def native_small_tree(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`native_small_trees` of one cloud (one that `native_small_tree_handles`), as (u, v)
    tensors, with no stacking: its Python-side cost was most of a 10×100 layer's search."""
    n = points.shape[0]
    edges = compiled_tree(points.contiguous().numpy(), np.empty((n, n), dtype=np.float32))
    if edges is None:
        return None
    return torch.from_numpy(edges[0]), torch.from_numpy(edges[1])


def compiled_tree(points: np.ndarray, scratch: np.ndarray) -> np.ndarray | None:
    """One compiled search of an N×d float32 cloud (scratch: N×N float32): its 2×(N−1) edges, or
    None where the compiled search declines."""
    n, d = points.shape
    edges = np.empty((2, n - 1), dtype=np.int64)
    near = _native.engine.small_tree(points, n, d, NEAR_PAIR_RATIO, EXACT_PAIRS_PER_POINT * n, scratch,
                                     edges[0], edges[1])
    return None if near < 0 else edges


def _tree_of_distinct_points(points: torch.Tensor) -> np.ndarray:
    unique_points, representative, zero_edges = _merge_duplicates(points)
    n_unique = unique_points.shape[0]
    edges = [zero_edges]
    if n_unique > 1:
        _check_memory(n_unique, points.device)
        squared = _squared_distances(unique_points)
        u, v = prim_tree(squared)
        edges.append(np.stack([representative[u], representative[v]], axis=1))
    return np.concatenate(edges)
