"""Groups of neurons and branching events, read live off a layer's H0 deaths.

At a scale s, a layer's neurons fall into 1 + #{deaths > s} groups: cutting the minimum
spanning tree's edges longer than s leaves that many connected pieces (single linkage). topoopt
takes s relative to the layer's own scale, so one setting serves every layer and every moment
of training: **a gap separates groups when it is at least ``ratio`` times the layer's median
gap** (the median H0 death, the typical distance from a neuron to its nearest neighbour in the
tree). A cloud of noise, whose gaps are all alike, is one group whatever its size; neurons
that have split into tight groups far apart leave a few gaps far above the median. When more
than half of the gaps are 0 (coinciding neurons), any positive gap separates.

An absolute scale is the other choice (``scale=`` in `group_count`, ``groups_scale=`` in
`TopologyMonitor`): a gap longer than that distance separates groups, whatever the layer's own
scale. It is what a learning graph's clustering uses (Mapper's DBSCAN ``eps``), and the one that
reproduces the learning graph's branching events live (`experiments/RESULTS.md`, "Live topology
against the learning graphs"); the relative threshold counts only well-separated groups, which a
continuously fanning-out layer never forms.

A *branching event* (Gabella et al. 2019 read them off learning graphs after training) is a
rise of the group count that stays risen: `BranchingDetector` confirms a new count only after it
has held for ``patience`` consecutive measurements, so noise around the threshold does not flap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from topoopt._validation import check_number, check_positive_int

__all__ = ["group_threshold", "group_count", "group_sizes", "BranchingDetector", "BranchingEvent"]


def group_threshold(deaths: torch.Tensor, ratio: float = 4.0) -> float:
    """The gap above which neurons are in different groups: ``ratio`` × the median death."""
    check_number("ratio", ratio, low=1.0, low_open=True)
    if deaths.numel() == 0:
        return 0.0
    return ratio * float(deaths.detach().median())


def group_count(deaths: torch.Tensor, ratio: float = 4.0, scale: float | None = None) -> int:
    """Number of groups of the layer's neurons (see the module docstring); 1 for N ≤ 1.

    With ``scale``, gaps above that absolute distance separate groups instead (``ratio`` unused).
    """
    threshold = group_threshold(deaths, ratio) if scale is None else float(scale)
    return 1 + int((deaths.detach() > threshold).sum())


def group_sizes(deaths: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n: int, ratio: float = 4.0,
                scale: float | None = None) -> list[int]:
    """Sizes of the groups, largest first: the pieces of the tree (u, v) without its long edges.

    `deaths` are the lengths of the edges (u, v), in the same order (tree order, as
    `TreeCache.deaths_in_tree_order` gives them).
    """
    threshold = group_threshold(deaths, ratio) if scale is None else float(scale)
    keep = (deaths.detach() <= threshold).cpu().numpy()
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(u.cpu().numpy()[keep], v.cpu().numpy()[keep]):
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(n)])
    return sorted(np.unique(roots, return_counts=True)[1].tolist(), reverse=True)


@dataclass(frozen=True)
class BranchingEvent:
    """A confirmed rise of a layer's group count."""

    layer: str
    step: int  # the measurement at which the rise was confirmed
    first_seen: int  # the first measurement with the higher count
    groups_before: int
    groups: int
    sizes: tuple[int, ...] = ()


class BranchingDetector:
    """Online branching events of one layer, with hysteresis.

    Feed it each measurement's group count with `update`. A count above the confirmed one
    becomes confirmed, as an event, once counts above the old one have been seen at
    ``patience`` consecutive measurements (the new count is the smallest of them). A fall is
    confirmed the same way, without an event (groups can merge again). ``confirmed`` is the
    current count.
    """

    def __init__(self, patience: int = 3) -> None:
        self.patience = check_positive_int("patience", patience)
        self.confirmed: int | None = None
        self._direction = 0
        self._streak: list[int] = []
        self._first_seen = 0

    def update(self, count: int, step: int) -> tuple[int, int, int] | None:
        """The (first_seen, before, after) of a rise confirmed at this measurement, else None."""
        if self.confirmed is None:
            self.confirmed = count
            return None
        direction = (count > self.confirmed) - (count < self.confirmed)
        if direction == 0 or direction != self._direction:
            self._streak, self._direction, self._first_seen = [], direction, step
        if direction == 0:
            return None
        self._streak.append(count)
        if len(self._streak) < self.patience:
            return None
        before = self.confirmed
        self.confirmed = min(self._streak) if direction > 0 else max(self._streak)
        first_seen, self._streak, self._direction = self._first_seen, [], 0
        return (first_seen, before, self.confirmed) if direction > 0 else None

    def state_dict(self) -> dict:
        return {"confirmed": self.confirmed, "direction": self._direction, "streak": list(self._streak),
                "first_seen": self._first_seen}

    def load_state_dict(self, state: dict) -> None:
        self.confirmed = state["confirmed"]
        self._direction, self._streak, self._first_seen = state["direction"], list(state["streak"]), state["first_seen"]
