"""Minimum spanning tree of a cloud on the cloud's own device: Borůvka in batched tensor ops.

`topoopt.spanning_tree` sends a CUDA cloud here, so that no N×N matrix is copied to the host; a
CPU cloud stays with its compiled Prim loop. The same code runs on CPU tensors, which is how the
tests check it without a GPU.

Why Borůvka and not Prim on the device: Prim adds one vertex per step, N − 1 dependent steps of a
few kernel launches each (several µs apiece: tens of ms at N = 4096, more than the Gram product).
Borůvka adds every component's cheapest outgoing edge at once, so the number of components at
least halves each round: ⌈log₂ N⌉ rounds (12 at N = 4096), each a few streaming passes over the
N×N matrix. On a CPU the opposite holds: the compiled Prim loop reads the matrix once, Borůvka
about log₂ N times.

Exactness, as in `topoopt.spanning_tree`:
- squared distances come from one float32 Gram product of the centred cloud, kept on the device;
  its near pairs, whose Gram value lost its digits, are recomputed exactly: a few in float64,
  clusters of many about their own centre (recursively), a dense sheet by a float64 Gram product;
- ties are broken by the strict order (length, lower index, higher index), so Borůvka's chosen
  edges never close a cycle, whatever the ties (duplicates, an all-zero layer);
- under a user's TF32 matmul setting (10-bit mantissa) each coordinate is split into a high
  and a low part, both exact in TF32, x = hi + lo, and x·y is taken as lo·hi' + hi·lo' + hi·hi'
  in one product over 3d columns (small terms first, so float32 accumulation rounds them at
  their own size): each term is exact in the tensor cores, so the error stays near a float32
  product's (`gram.NEAR_PAIR_RATIO_TF32`), at TF32 speed instead of float64's (1/64 rate on many
  GPUs). Under a bfloat16 setting (oneDNN's, 7 bits) the Gram product is taken in float64.
Host traffic: a few scalars per round (how many components are left) and O(N) index vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from topoopt.gram import (
    EXACT_PAIRS_PER_POINT,
    MAX_DEPTH,
    NEAR_PAIR_RATIO,
    NEAR_PAIR_RATIO_FLOAT64,
    NEAR_PAIR_RATIO_TF32,
    SMALL_COMPONENT,
    MemoryBudgetError,
    available_bytes,
    centred_scaled,
    exact_squared,
    far_from_centre,
    matmul_precision,
)

__all__ = ["device_tree", "device_tree_bytes"]

# Temporaries (masked rows, comparisons) are built this many matrix entries at a time: 64 MiB of
# float32, one block for N ≤ 4096.
_BLOCK_ELEMENTS = 1 << 24


def device_tree_bytes(n_points: int, dims: int = 0) -> int:
    """Peak device bytes of one level of the search: the N×N float32 matrix and its near-pair
    mask (5 bytes an entry), plus the block temporaries (at most 16 bytes per block entry: the
    component labelling's int64 candidates beside its masks), plus the cloud's working copies when
    `dims` is given (40 bytes a coordinate at most: the centred float32 copy, the TF32 split's two
    N×3d halves, the float64 copy the exact recompute reads). A cluster of g points far from the
    cloud's centre is searched again about its own, with this level's matrix still held: it needs
    `device_tree_bytes(g, d)` more, checked against the memory free when it is reached, so that it
    raises `MemoryBudgetError` instead of running out (benchmarks/device_memory.py)."""
    return 5 * n_points * n_points + 16 * _BLOCK_ELEMENTS + 40 * n_points * dims


@torch.no_grad()
def device_tree(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Endpoints (u, v), int64 on the points' device, of the N−1 edges of a Euclidean minimum
    spanning tree of the finite N×d cloud `points`; the tree is the unique minimum under the
    order (squared length, lower index, higher index), computed on the points' device."""
    n = points.shape[0]
    if n < 2:
        empty = torch.empty(0, dtype=torch.int64, device=points.device)
        return empty, empty
    _check_memory(n, points.shape[1], points.device)
    squared, _ = _squared_distances(points.detach(), depth=0)
    return _boruvka(squared)


def _check_memory(n_points: int, dims: int, device: torch.device) -> None:
    needed = device_tree_bytes(n_points, dims)
    available = available_bytes(device)
    if needed > 0.8 * available:
        raise MemoryBudgetError(
            f"A cloud of {n_points} points needs a {n_points}×{n_points} float32 distance matrix "
            f"and its masks ({needed / 2**30:.1f} GiB) on {device}, but only "
            f"{available / 2**30:.1f} GiB is free. Compute H0 on a subset of the neurons, or on a "
            f"larger device."
        )


def _row_blocks(n: int) -> Iterator[slice]:
    rows = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _boruvka(squared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum spanning tree of a symmetric N×N matrix under (value, lower, higher)."""
    n = squared.shape[0]
    device = squared.device
    index = torch.arange(n, device=device)
    labels = index.clone()  # each point's component, named by one of its points
    no_edge = n * n  # above every edge key lower·N + higher
    found_u: list[torch.Tensor] = []
    found_v: list[torch.Tensor] = []
    components = n
    while components > 1:
        # Each point's cheapest edge to another component; argmin takes the lowest index among
        # equal values, which is the (lower, higher) order for edges sharing this point.
        nearest = torch.empty(n, dtype=torch.int64, device=device)
        for rows in _row_blocks(n):
            block = squared[rows].masked_fill(labels[rows, None] == labels[None, :], math.inf)
            nearest[rows] = block.argmin(dim=1)
        length = squared[index, nearest]
        # Each component's cheapest edge: least length, then least (lower, higher) key.
        least = torch.full((n,), math.inf, dtype=squared.dtype, device=device)
        least.scatter_reduce_(0, labels, length, "amin")
        key = torch.minimum(index, nearest) * n + torch.maximum(index, nearest)
        key = torch.where(length == least[labels], key, no_edge)
        chosen = torch.full((n,), no_edge, dtype=torch.int64, device=device)
        chosen.scatter_reduce_(0, labels, key, "amin")
        active = chosen < no_edge  # the components' names
        chosen = torch.where(active, chosen, 0)
        lower, higher = chosen // n, chosen % n
        across = torch.where(labels[lower] == index, labels[higher], labels[lower])
        parent = torch.where(active, across, index)
        # Two components that chose each other chose the same edge (the order is strict): the
        # lower name becomes the root and the higher one adds the edge.
        mutual = (parent[parent] == index) & (index < parent)
        parent = torch.where(mutual, index, parent)
        adds = torch.nonzero(active & (parent != index)).flatten()  # the round's one host read
        found_u.append(lower[adds])
        found_v.append(higher[adds])
        components -= adds.shape[0]
        for _ in range(max(1, math.ceil(math.log2(n)))):  # every chain of hooks is shorter than n
            parent = parent[parent]
        labels = parent[labels]
    return torch.cat(found_u), torch.cat(found_v)


def _squared_distances(points: torch.Tensor, depth: int) -> tuple[torch.Tensor, float]:
    """N×N float32 squared distances times factor² (a power of two), every entry accurate to a
    relative 4e-6, on the points' device; (matrix, factor). The recursion of the host search
    (`topoopt.spanning_tree`), in device tensor ops."""
    n = points.shape[0]
    squared, near, factor = _gram_pass(points, torch.float32, NEAR_PAIR_RATIO)
    # count_nonzero: a bool sum would first copy the N×N mask to int64 (8 bytes an entry)
    near_pairs = int(torch.count_nonzero(near))
    if near_pairs <= EXACT_PAIRS_PER_POINT * n or depth >= MAX_DEPTH:
        if near_pairs:  # else no pair to find (a host read saved)
            _recompute_exactly(squared, points, near, factor**2)
        return squared, factor
    labels = _component_labels(near)
    sizes = torch.bincount(labels, minlength=n)
    member_size = sizes[labels]
    in_small = (member_size > 1) & (member_size <= SMALL_COMPONENT)
    small_pairs = near  # the near pairs are not needed once labelled: their mask is reused
    for rows in _row_blocks(n):
        small_pairs[rows] = (labels[rows, None] == labels[None, :]) & in_small[rows, None]
    small_pairs.triu_(diagonal=1)
    _recompute_exactly(squared, points, small_pairs, factor**2)
    del near, small_pairs  # 1 byte an entry less while a large group is searched again
    for root in torch.nonzero(sizes > SMALL_COMPONENT).flatten().tolist():
        group = torch.nonzero(labels == root).flatten()
        # The group's own matrices come on top of this level's: checked against what is free now.
        _check_memory(group.shape[0], points.shape[1], points.device)
        members = points[group]
        if group.shape[0] < n and far_from_centre(members, points):
            inner, inner_factor = _squared_distances(members, depth + 1)
        else:  # centring again would not help: a float64 Gram product of the group instead
            inner, inner_near, inner_factor = _gram_pass(members, torch.float64, NEAR_PAIR_RATIO_FLOAT64)
            _recompute_exactly(inner, members, inner_near, inner_factor**2)
            del inner_near
        # Both factors are powers of two, so moving to this level's scale is exact.
        squared[group[:, None], group[None, :]] = inner.mul_((factor / inner_factor) ** 2)
        del inner  # before the next group's memory is checked
    return squared, factor


def _gram_pass(points: torch.Tensor, dtype: torch.dtype, ratio: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Symmetric float32 squared distances from a Gram product in `dtype`, the mask (strict
    upper triangle) of pairs closer than ``ratio·(|x|²+|y|²)``, and the power-of-two factor."""
    n = points.shape[0]
    precision = _precision(points.device) if dtype == torch.float32 else "ieee"
    if precision == "bf16":  # too few bits to split into: float64, as a dense sheet's pass
        dtype, ratio = torch.float64, NEAR_PAIR_RATIO_FLOAT64
    x, sq_norms, factor = centred_scaled(points, dtype)
    left = right = x
    if precision == "tf32":
        left, right = tf32_split(x)
        ratio = max(ratio, NEAR_PAIR_RATIO_TF32)
    factor = float(factor)
    squared = torch.empty((n, n), dtype=torch.float32, device=points.device)
    for rows in _row_blocks(n):
        block = _matmul(left[rows], right.T)
        squared[rows] = block.mul_(-2).add_(sq_norms[rows, None]).add_(sq_norms[None, :]).clamp_(min=0)
    # A product's (i, j) and (j, i) entries may differ in their last bits; Borůvka needs one
    # length per edge. Symmetrised in place, a row block against its column block at a time (a
    # whole transposed copy would be a second N×N matrix at the peak).
    for rows in _row_blocks(n):
        tail = slice(rows.start, n)
        least = torch.minimum(squared[rows, tail], squared[tail, rows].T)
        squared[rows, tail] = least
        squared[tail, rows] = least.T
    near = torch.empty((n, n), dtype=torch.bool, device=points.device)
    threshold_norms = sq_norms.float() * ratio
    for rows in _row_blocks(n):
        near[rows] = squared[rows] < threshold_norms[rows, None] + threshold_norms[None, :]
    return squared, near.triu_(diagonal=1), factor


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Gram product (a seam: the tests put an emulated TF32 product here)."""
    return a @ b


_precision = matmul_precision  # a seam: the tests emulate a TF32 or bfloat16 device on the CPU


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 `x` rounded to the nearest value with a 10-bit mantissa (ties away from zero),
    which a TF32 product reads exactly. |x| must stay below float32's largest TF32 value."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right), N×3d, with left @ right.T = lo·hi' + hi·lo' + hi·hi' for x = hi + lo (both
    TF32-exact, |lo| ≤ 2⁻¹¹|x|, lo rounded again to 2⁻¹¹ of itself): x·y to ~3·2⁻²² |x||y| before
    the product's own float32 rounding. The small terms come first, so that a sum in column order
    adds them before the large one."""
    hi = _round_to_tf32(x)
    lo = _round_to_tf32(x - hi)
    return torch.cat([lo, hi, hi], dim=1), torch.cat([hi, lo, hi], dim=1)


def _recompute_exactly(squared: torch.Tensor, points: torch.Tensor, mask: torch.Tensor, factor: float) -> None:
    """Overwrite `squared` at the pairs of `mask` (and their mirror) with float64 squared
    differences times `factor`."""
    rows, cols = torch.nonzero(mask).T
    if rows.shape[0] == 0:
        return
    exact = exact_squared(points.double(), rows, cols, factor)
    squared[rows, cols] = exact
    squared[cols, rows] = exact


def _component_labels(upper: torch.Tensor) -> torch.Tensor:
    """Connected components of the graph whose edges are the True entries of `upper` (strict
    upper triangle): each point's label is the lowest index of its component.

    Each round hooks every component onto the lowest label among its neighbours, then follows
    the hooks to their ends; a component with a neighbour merges every round, so O(log N) rounds.
    """
    n = upper.shape[0]
    index = torch.arange(n, device=upper.device)
    labels = index.clone()
    while True:
        lowest = torch.empty_like(labels)
        for rows in _row_blocks(n):
            adjacent = upper[rows] | upper[:, rows].T
            lowest[rows] = torch.where(adjacent, labels[None, :], n).amin(dim=1)
        hooked = labels.clone().scatter_reduce_(0, labels, lowest, "amin")
        while True:
            jumped = hooked[hooked]
            if torch.equal(jumped, hooked):
                break
            hooked = jumped
        hooked = hooked[labels]
        if torch.equal(hooked, labels):
            return labels
        labels = hooked
