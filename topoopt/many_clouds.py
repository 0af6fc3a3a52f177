"""H0 of many clouds in one call (every layer of a model): the fixed cost of a call paid once.

A small layer's H0 is mostly fixed cost: at 10×100, a tree search of ~15 small tensor operations
(about 100 µs) and an autograd node of ~10 more each way (170 µs forward + backward), against a
few µs of arithmetic (benchmarks/all_layers.py). Measuring layers together removes most of it:
- small clouds of the same shape (N ≤ 256) are searched together: one batched Gram product and
  one near-pair pass for the stack, then the compiled Prim per cloud; bigger clouds, and CUDA
  clouds, are searched one by one (their own arithmetic dominates);
- all edges are measured by one autograd node, clouds of equal width in one concatenated
  gather and norm.
The results are those of the one-cloud calls: the same operations on the same rows, so on this
project's machines the trees are the same and the deaths equal to the last bit (tests check
rtol 1e-6, since a BLAS library may round a batched product differently).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from topoopt import spanning_tree
from topoopt._range import needs_rescaling
from topoopt._threads import caller_threads, engine_threads
from topoopt.gram import EXACT_PAIRS_PER_POINT, NEAR_PAIR_RATIO, centred_scaled, exact_squared, matmul_precision
from topoopt.persistence import (
    as_cloud,
    h0_deaths,
    measure_edges,
    native_edges_handle,
    native_measure,
    native_scatter,
    twice_guarded,
)

__all__ = ["h0_deaths_many", "trees_of_many", "edge_lengths_many"]

Edges = tuple[torch.Tensor, torch.Tensor]


def h0_deaths_many(clouds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`topoopt.h0_deaths` of each cloud (sorted ascending, differentiable), in one call.

    Equal to the one-cloud calls (see the module's note) and faster when there are several
    small clouds: the shared overhead is paid once. Clouds may differ in shape, dtype and device.
    """
    clouds = [as_cloud(cloud, f"clouds[{i}]") for i, cloud in enumerate(clouds)]
    try:
        edges = trees_of_many([cloud.detach() for cloud in clouds])
    except OverflowError:  # a cloud at the end of its dtype's range: each measured on its own, rescaled
        return [h0_deaths(cloud) for cloud in clouds]
    deaths = edge_lengths_many(clouds, edges, sort=True)
    # a cloud whose deaths left the exact range is measured again, rescaled (see topoopt._range)
    return [h0_deaths(cloud) if d.numel() and needs_rescaling(float(d.detach().max()), cloud.dtype) else d
            for cloud, d in zip(clouds, deaths)]


@torch.no_grad()
def trees_of_many(clouds: Sequence[torch.Tensor]) -> list[Edges]:
    """`topoopt.spanning_tree.euclidean_mst_edges` of each (checked, finite) cloud."""
    trees: list[Edges | None] = [None] * len(clouds)
    same_shape: dict[tuple, list[int]] = {}
    for i, cloud in enumerate(clouds):
        n = cloud.shape[0]
        if 2 < n <= spanning_tree.BLOCK_ROWS and cloud.device.type not in spanning_tree.DEVICE_SEARCH_TYPES:
            same_shape.setdefault((cloud.shape, cloud.dtype, cloud.device), []).append(i)
    groups = [members for members in same_shape.values() if len(members) > 1]
    if groups:
        with engine_threads():
            for members in groups:
                stacked = _small_trees(torch.stack([clouds[i].detach() for i in members]))
                for i, edges in zip(members, stacked):
                    if edges is not None:
                        trees[i] = edges
    for i, cloud in enumerate(clouds):
        if trees[i] is None and spanning_tree.native_small_tree_handles(cloud):
            # straight to the compiled search, and if it declines, straight past it
            trees[i] = (spanning_tree.native_small_tree(cloud)
                        or spanning_tree.tree_without_the_compiled_search(cloud))
    return [edges if edges is not None else spanning_tree.euclidean_mst_edges(cloud)
            for edges, cloud in zip(trees, clouds)]


def _small_trees(stack: torch.Tensor) -> list[Edges | None]:
    """`spanning_tree._small_cloud_tree` of each cloud of a k×N×d stack, batched: None for a
    cloud with many near pairs (left to the one-cloud search, as there)."""
    if spanning_tree.native_small_tree_handles(stack):  # a declined cloud straight past the compiled search
        return [(torch.from_numpy(edges[0]), torch.from_numpy(edges[1])) if edges is not None
                else spanning_tree.tree_without_the_compiled_search(cloud)
                for edges, cloud in zip(spanning_tree.native_small_trees(stack), stack)]
    k, n, d = stack.shape
    if matmul_precision(stack.device) != "ieee":  # float32 products in bfloat16: one cloud at a time, in float64
        return [spanning_tree.tree_without_the_compiled_search(cloud) for cloud in stack]
    # The operations of `spanning_tree._gram_pass` (one block), along a batch dimension.
    x, sq_norms, factors = centred_scaled(stack, torch.float32)
    block = torch.bmm(x, x.transpose(1, 2))
    near = spanning_tree.near_pairs_of_block(block, sq_norms[:, :, None], sq_norms[:, None, :],
                                              NEAR_PAIR_RATIO).long()
    many = torch.bincount(near[:, 0], minlength=k) > EXACT_PAIRS_PER_POINT * n
    near = near[~many[near[:, 0]]]
    if near.shape[0]:  # as `spanning_tree._recompute_exactly`, for all the clouds' pairs at once
        which, rows, cols = near.T
        exact = exact_squared(stack.double().reshape(k * n, d), which * n + rows, which * n + cols,
                              factors.square()[which])
        block[which, rows, cols] = exact
        block[which, cols, rows] = exact
    trees: list[Edges | None] = []
    for b, skip in enumerate(many.tolist()):
        if skip:
            trees.append(None)
            continue
        u, v = spanning_tree.prim_tree(block[b].numpy())
        trees.append((torch.from_numpy(u), torch.from_numpy(v)))
    return trees


def edge_lengths_many(clouds: Sequence[torch.Tensor], edges: Sequence[Edges], sort: bool = False) -> list[torch.Tensor]:
    """`topoopt.edge_lengths` (or, sorted, `h0_deaths`' lengths) of each cloud's edges, as
    one autograd node."""
    if not clouds:
        return []
    flat = [tensor for pair in edges for tensor in pair]
    return list(_ManyEdgeLengths.apply(sort, len(clouds), *clouds, *flat))


class _ManyEdgeLengths(torch.autograd.Function):
    """`persistence._EdgeLengths` for many clouds: inputs (sort, k, clouds…, u₀, v₀, u₁, v₁, …),
    one output per cloud. A cloud the compiled engine takes is measured alone (one call, no
    fixed cost to share); the others are measured concatenated by width, dtype and device."""

    @staticmethod
    def forward(ctx, sort: bool, k: int, *inputs: torch.Tensor):
        clouds, index = inputs[:k], inputs[k:]
        outputs: list[torch.Tensor | None] = [None] * k
        saved: list[torch.Tensor | None] = []
        plan = []  # per group: its members, where its saved tensors start, and whether compiled
        native = [native_edges_handle(cloud) for cloud in clouds]
        for i in (i for i in range(k) if native[i]):
            u, v = index[2 * i].to(torch.int64).contiguous(), index[2 * i + 1].to(torch.int64).contiguous()
            result, lengths, unit, order = native_measure(clouds[i].detach(), u, v, sort)
            plan.append(([i], len(saved), True))
            saved += [u, v, unit, lengths, order]
            outputs[i] = result.to(clouds[i].dtype)
        rest = [i for i in range(k) if not native[i]]
        with engine_threads(), caller_threads(elements=sum(clouds[i].numel() for i in rest)):
            for members in _groups(clouds, rest):
                points, u, v, sizes = _concatenated(members, clouds, index)
                difference, lengths = measure_edges(points, u, v)
                if sort:
                    order = _sorted_within_segments(lengths, sizes)
                    lengths, u, v, difference = lengths[order], u[order], v[order], difference[order]
                plan.append((members, len(saved), False))
                saved += [u, v, difference, lengths]
                parts = lengths.to(clouds[members[0]].dtype).split(sizes)
                for i, part in zip(members, parts):  # not views: a caller may modify one in place
                    outputs[i] = part.clone() if len(parts) > 1 else part
        ctx.save_for_backward(*saved)
        ctx.plan = plan
        ctx.shapes = [(cloud.shape, cloud.dtype) for cloud in clouds]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return twice_guarded(_many_edge_lengths_backward, ctx, *grads)


def _many_edge_lengths_backward(ctx, *grads: torch.Tensor):
    saved = ctx.saved_tensors
    result: list[torch.Tensor | None] = [None] * len(grads)
    # (an unused output's gradient comes as zeros, never None)
    for members, at, native in ctx.plan:
        if native:
            i = members[0]
            u, v, unit, lengths, order = saved[at : at + 5]
            result[i] = native_scatter(unit, u, v, lengths, order, grads[i], ctx.shapes[i][0])
    torch_plan = [(members, at) for members, at, native in ctx.plan if not native]
    with engine_threads(), caller_threads(elements=sum(saved[at + 2].numel() for _, at in torch_plan)):
        for members, at in torch_plan:
            u, v, difference, lengths = saved[at : at + 4]
            grad = grads[members[0]] if len(members) == 1 else torch.cat([grads[i] for i in members])
            safe = torch.where(lengths > 0, lengths, torch.ones_like(lengths))
            coefficient = torch.where(lengths > 0, grad.to(lengths.dtype) / safe, torch.zeros_like(lengths))
            dtype = ctx.shapes[members[0]][1]
            step = (difference * coefficient.unsqueeze(1)).to(dtype)
            rows = [ctx.shapes[i][0][0] for i in members]
            total = step.new_zeros((sum(rows), difference.shape[1]))
            total.index_add_(0, u, step)
            total.index_add_(0, v, step, alpha=-1)
            for i, part in zip(members, total.split(rows)):
                result[i] = part.view(ctx.shapes[i][0])
    return (None, None, *result, *([None] * (2 * len(grads))))


def _groups(clouds: Sequence[torch.Tensor], indices: Sequence[int]) -> list[list[int]]:
    """`indices` of clouds grouped by (width, dtype, device)."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        cloud = clouds[i]
        groups.setdefault((cloud.shape[1], cloud.dtype, cloud.device), []).append(i)
    return list(groups.values())


def _concatenated(members: list[int], clouds, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The members' rows stacked, their edges renumbered into the stack, and edges per member."""
    if len(members) == 1:
        i = members[0]
        return clouds[i].detach(), index[2 * i], index[2 * i + 1], [index[2 * i].shape[0]]
    offsets = np.cumsum([0] + [clouds[i].shape[0] for i in members[:-1]]).tolist()
    points = torch.cat([clouds[i].detach() for i in members])
    u = torch.cat([index[2 * i] + offset for i, offset in zip(members, offsets)])
    v = torch.cat([index[2 * i + 1] + offset for i, offset in zip(members, offsets)])
    return points, u, v, [index[2 * i].shape[0] for i in members]


def _sorted_within_segments(lengths: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The order sorting each consecutive segment of `lengths` ascending (stably), segments kept."""
    order = torch.argsort(lengths, stable=True)
    if len(sizes) == 1:
        return order
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=lengths.device),
                                      torch.tensor(sizes, device=lengths.device))
    return order[torch.argsort(segment[order], stable=True)]
