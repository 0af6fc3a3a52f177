"""Differentiable H0 persistence of a point cloud (Vietoris–Rips, Euclidean).

Convention (that of gudhi's `RipsComplex` and ripser): every point is born at 0 and an edge enters
the filtration at its length, so the finite H0 deaths are the edge lengths of a Euclidean minimum
spanning tree. Unlike gudhi and ripser, zero-length bars (coinciding points) are *kept*: a cloud of
N points always has N−1 finite deaths, and a metric computed from them moves continuously when two
coinciding neurons separate. Compare with those libraries on the positive deaths only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from topoopt import _native
from topoopt._range import needs_rescaling, rescale_exponent, rescaled_deaths
from topoopt._threads import PARALLEL_MIN_ELEMENTS, caller_threads, engine_threads
from topoopt._validation import all_finite, check_instance, functorch_active
from topoopt.spanning_tree import (
    compiled_tree,
    euclidean_mst_edges,
    native_small_tree_handles,
    tree_without_the_compiled_search,
)

__all__ = ["h0_deaths", "h0_edges", "edge_lengths", "h1_diagram"]

# Below 2⁻⁶⁰ (≈ 8.7e-19) a float32 length's square is subnormal (< 2⁻¹²⁰): too few digits left.
_SMALLEST_SAFE_LENGTH = 2.0**-60


def as_cloud(points: torch.Tensor, argument: str = "points") -> torch.Tensor:
    if functorch_active():
        raise RuntimeError("topoopt's H0 cannot run inside a torch.func transform (grad, vmap, jacrev, "
                           "functional_call under them): its tree search needs the values themselves; compute the "
                           "deaths outside the transform (the metrics accept torch.func), or use torch.autograd")
    check_instance(argument, points, torch.Tensor, "a torch.Tensor")
    if points.dim() != 2:
        raise ValueError(f"Invalid {argument}: a tensor of shape {tuple(points.shape)}. It must be an N×d matrix "
                         f"(one row per point)")
    if not points.is_floating_point():
        raise TypeError(f"Invalid {argument}: a {points.dtype} tensor. It must be a floating-point tensor")
    if points.dtype in (torch.float16, torch.bfloat16):
        points = points.float()
    if points.numel() and not all_finite(points):
        with engine_threads():
            bad = int((~torch.isfinite(points)).any(dim=1).sum())
            raise ValueError(f"Invalid {argument}: NaN or Inf in {bad} of {points.shape[0]} rows. They must be "
                             f"finite")
    return points


def h0_edges(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Endpoints (u, v) of the N−1 minimum-spanning-tree edges whose lengths are the H0 deaths.

    Found without autograd. Re-gathering `‖points[u] − points[v]‖` later gives the deaths of a
    slightly moved cloud without searching the tree again (see `topoopt.TreeCache` and ``tree_every``).
    """
    return euclidean_mst_edges(as_cloud(points))


def edge_lengths(points: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Differentiable lengths of edges (u, v); the gradient is 0, never NaN, at zero length.

    Exact over the whole float32 range, where a float32 squared norm overflows above about 1.8e19
    and loses digits in subnormals below about 1e-19: the compiled engine sums every squared
    length in double; without it (or for clouds of 2 M entries and more) edges outside that
    range are measured again in float64 (one reduction decides). One autograd node, run
    single-threaded (see `topoopt._threads`) or compiled.
    """
    return _EdgeLengths.apply(points, u, v, False)


class _EdgeLengths(torch.autograd.Function):
    """‖points[u] − points[v]‖ per edge, optionally sorted, with a hand-written backward.

    One node instead of five (two gathers, a difference, a norm, a sort) is what keeps a small
    layer's forward + backward near the cost of its Gram product. The backward is the norm's:
    (x_u − x_v)/‖x_u − x_v‖ times the incoming gradient, 0 at zero length, scattered to both
    endpoints with opposite signs.
    """

    @staticmethod
    def forward(ctx, points: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sort: bool) -> torch.Tensor:
        ctx.native = native_edges_handle(points)
        if ctx.native:
            u, v = int64_index(u), int64_index(v)  # saved for `native_scatter`, which reads them as int64
            result, lengths, unit, order = native_measure(points.detach(), u, v, sort)
            ctx.save_for_backward(u, v, unit, lengths, order)
            ctx.points_shape = points.shape
            return result
        with engine_threads(), caller_threads(elements=points.numel()):
            difference, lengths = measure_edges(points.detach(), u, v)
            if sort:
                order = torch.argsort(lengths, stable=True)
                lengths, u, v, difference = lengths[order], u[order], v[order], difference[order]
        ctx.save_for_backward(u, v, difference, lengths)
        ctx.points_shape, ctx.points_dtype = points.shape, points.dtype
        return lengths.to(points.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return twice_guarded(_edge_lengths_backward, ctx, grad)


def twice_guarded(backward, ctx, *grads):
    """Run a hand-written backward; under ``create_graph=True`` (grad mode on) through
    `once_differentiable` (which costs ~15 µs, so only then), with its rule: differentiating the
    result again raises when the incoming gradient itself requires grad; otherwise the result
    is a constant of the graph, as for torch's own once-differentiable functions. A second
    derivative through the tree's edge lengths is not implemented."""
    if torch.is_grad_enabled():
        return once_differentiable(backward)(ctx, *grads)
    return backward(ctx, *grads)


def _edge_lengths_backward(ctx, grad: torch.Tensor):
    if ctx.native:
        u, v, unit, lengths, order = ctx.saved_tensors
        return native_scatter(unit, u, v, lengths, order, grad, ctx.points_shape), None, None, None
    u, v, difference, lengths = ctx.saved_tensors
    with engine_threads(), caller_threads(elements=difference.numel()):
        safe = torch.where(lengths > 0, lengths, torch.ones_like(lengths))
        coefficient = torch.where(lengths > 0, grad.to(lengths.dtype) / safe, torch.zeros_like(lengths))
        step = (difference * coefficient.unsqueeze(1)).to(ctx.points_dtype)
        result = step.new_zeros(ctx.points_shape)
        result.index_add_(0, u, step)
        result.index_add_(0, v, step, alpha=-1)
    return result, None, None, None


def native_edges_handle(points: torch.Tensor) -> bool:
    """Whether the compiled engine measures this cloud's edges: built, float32 or float64 on the
    CPU, at least one column, and small enough that one thread is the right count (above
    `PARALLEL_MIN_ELEMENTS` the torch path gets the caller's threads)."""
    return (_native.engine is not None and points.device.type == "cpu"
            and points.dtype in (torch.float32, torch.float64) and points.dim() == 2
            and points.shape[1] >= 1 and points.numel() < PARALLEL_MIN_ELEMENTS)


def native_measure(points: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sort: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One compiled call: the edges' lengths as the result (the points' dtype; ascending when
    `sort`, ties in edge order), and, for `native_scatter`, the lengths in edge order (float64,
    summed in double: exact for any float32 cloud), the unit directions (x_u − x_v)/‖x_u − x_v‖
    (the points' dtype, 0 at zero length; finite even where a float32 difference would overflow)
    and the sorting order (None without `sort`). IndexError for an endpoint outside the cloud.
    Buffers come from numpy: its allocations and views cost a fraction of torch's, which were
    most of a small cloud's call."""
    x = points.contiguous()
    if u.shape != v.shape or u.dim() != 1:
        raise ValueError(f"edge endpoints u and v must be two 1-D tensors of one length, got {tuple(u.shape)} "
                         f"and {tuple(v.shape)}")
    result, lengths, unit, order = _measure_buffers(x.numpy(), _int64_view(u), _int64_view(v), sort)
    lengths_tensor = torch.from_numpy(lengths)
    if sort:
        return torch.from_numpy(result), lengths_tensor, torch.from_numpy(unit), torch.from_numpy(order)
    return lengths_tensor.to(points.dtype), lengths_tensor, torch.from_numpy(unit), None


def _measure_buffers(points: np.ndarray, u: np.ndarray, v: np.ndarray, sort: bool
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`engine.measure` of a C-contiguous float32/float64 N×d array along int64 edges: (sorted
    lengths in the points' dtype, lengths in edge order as float64, unit directions, order),
    the first and last empty without `sort`."""
    count, (n, d) = u.shape[0], points.shape
    lengths = np.empty(count, dtype=np.float64)
    unit = np.empty((count, d), dtype=points.dtype)
    order = np.empty(count if sort else 0, dtype=np.int64)
    result = np.empty(count if sort else 0, dtype=points.dtype)
    _native.engine.measure(points, points.itemsize, n, d, u, v, unit, lengths, order, result)
    return result, lengths, unit, order


def native_scatter(unit: torch.Tensor, u: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                   order: torch.Tensor | None, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The gradient with respect to the points of `native_measure`'s result: grad times each
    edge's unit direction, added at u and subtracted at v; 0 at zero length."""
    if grad.dtype != unit.dtype or not grad.is_contiguous():
        grad = grad.to(unit.dtype).contiguous()
    result = np.empty(tuple(shape), dtype=NUMPY_DTYPES[unit.dtype])  # zeroed by the engine
    _native.engine.scatter(unit.numpy(), unit.element_size(), shape[1], u.numpy(), v.numpy(), lengths.numpy(),
                           grad.numpy(), order.numpy() if order is not None else NO_ORDER, result, shape[0])
    return torch.from_numpy(result)


NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
NO_ORDER = np.empty(0, dtype=np.int64)


def int64_index(index: torch.Tensor) -> torch.Tensor:
    """Edge endpoints as the engine reads them, int64 and contiguous (a tree's already are)."""
    if index.dtype == torch.int64 and index.is_contiguous():
        return index
    return index.to(torch.int64).contiguous()


def _int64_view(index: torch.Tensor) -> np.ndarray:
    """A numpy view of `int64_index(index)`."""
    return int64_index(index).numpy()


def measure_edges(points: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    difference = points.index_select(0, u) - points.index_select(0, v)
    lengths = torch.linalg.vector_norm(difference, dim=1)
    if points.dtype == torch.float64 or lengths.numel() == 0:
        return difference, lengths
    positive = torch.where(lengths > 0, lengths, torch.full_like(lengths, math.inf))
    unsafe = ~torch.isfinite(lengths.max()) | (positive.min() < _SMALLEST_SAFE_LENGTH)
    if not bool(unsafe):
        return difference, lengths
    wide = points.double()
    difference = wide.index_select(0, u) - wide.index_select(0, v)
    return difference, torch.linalg.vector_norm(difference, dim=1)


def h0_deaths(points: torch.Tensor) -> torch.Tensor:
    """Finite H0 death times of the Vietoris–Rips filtration of `points`, sorted ascending.

    The deaths are the edge lengths of a Euclidean minimum spanning tree (the tree is chosen
    without autograd, then its N−1 edges are re-measured with it), zero-length bars included.

    Parameters
    ----------
    points : torch.Tensor
        An N×d floating tensor, one row per point (per neuron). float16/bfloat16 are computed
        in float32; any device.

    Returns
    -------
    torch.Tensor
        The N−1 deaths, sorted ascending, on the input's device; empty when N < 2.
        Differentiable: the gradient flows through the N−1 tree edges only, and is 0 (never
        NaN) where points coincide.

    Raises
    ------
    ValueError
        NaN or Inf in `points`, or a shape other than N×d.
    MemoryBudgetError
        The N×N float32 distance matrix of the distinct points would not fit in memory.

    Examples
    --------
    >>> h0_deaths(torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]]))
    tensor([0., 5.])
    """
    cloud = as_cloud(points)
    if cloud.shape[0] < 2:
        return cloud.reshape(-1)[:0]
    if cloud.shape[1] == 0:  # N points of no coordinates all coincide: N − 1 zero deaths
        return cloud.sum(dim=1)[1:]
    try:
        deaths = _deaths_of(cloud)
        if not needs_rescaling(float(deaths.detach().max()), cloud.dtype):
            return deaths
    except OverflowError:  # a search's scale factors beyond the dtype: measured rescaled below
        deaths = None
    k = rescale_exponent(cloud)
    if k == 0:
        if deaths is None:
            raise ValueError("points: their squared distances overflow the dtype") from None
        return deaths
    return rescaled_deaths(_deaths_of, cloud, k)


def _deaths_of(cloud: torch.Tensor) -> torch.Tensor:
    if native_small_tree_handles(cloud) and native_edges_handle(cloud):
        return _SmallCloudDeaths.apply(cloud)
    u, v = euclidean_mst_edges(cloud.detach())
    return _EdgeLengths.apply(cloud, u, v, True)


class _SmallCloudDeaths(torch.autograd.Function):
    """`h0_deaths` of a small float32 CPU cloud (one the compiled search takes): the tree search
    and the sorted measurement of its edges called straight from one forward, in numpy buffers.
    The same calls and values as `euclidean_mst_edges` then `_EdgeLengths`, whose wrappers cost
    ~40 µs more a call (benchmarks/small_layers.py); the backward is `_EdgeLengths`'s."""

    @staticmethod
    def forward(ctx, points: torch.Tensor) -> torch.Tensor:
        p = points.detach().contiguous().numpy()
        n = p.shape[0]
        edges = compiled_tree(p, np.empty((n, n), dtype=np.float32))
        if edges is None:  # many near pairs: the general search, given the cloud in its own layout
            # as `euclidean_mst_edges` gives it (its float32 sums, and so near-tied trees, follow the layout)
            u, v = (_int64_view(index) for index in tree_without_the_compiled_search(points.detach()))
        else:
            u, v = edges[0], edges[1]
        result, lengths, unit, order = _measure_buffers(p, u, v, sort=True)
        ctx.save_for_backward(torch.from_numpy(u), torch.from_numpy(v), torch.from_numpy(unit),
                              torch.from_numpy(lengths), torch.from_numpy(order))
        ctx.native, ctx.points_shape = True, points.shape
        return torch.from_numpy(result)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return twice_guarded(_edge_lengths_backward, ctx, grad)[0]


def h1_diagram(points: torch.Tensor) -> torch.Tensor:
    """H1 persistence diagram (k×2 births and deaths) of the Vietoris–Rips filtration.

    Routed through torch-topological's `VietorisRipsComplex`; far costlier than H0 (it builds the
    whole filtration), meant for monitoring small layers, not for every training step.
    """
    from torch_topological.nn import VietorisRipsComplex

    cloud = as_cloud(points)
    if cloud.shape[0] < 3:
        return cloud.new_zeros((0, 2))
    info = VietorisRipsComplex(dim=1)(cloud)
    return info[1].diagram
