"""Seeded 0/1 masks (out × in) wiring a sparse layer by a bipartite graph.

Rows are the layer's output neurons, columns its inputs. Degree balance when widths differ:
every generator except `erdos_renyi` and `xnet` gives each row (output) exactly `degree`
inputs, and the banded windows start at ⌊i·in/out⌋, spreading the out·degree edges evenly over
the columns (column degrees within 1 of out·degree/in; tests check this), so both sides are as
regular as the widths allow. Rewiring preserves both sides' degrees.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import torch

from topoopt._validation import check_choice, check_number, check_positive_int, invalid

__all__ = [
    "MASK_FAMILIES",
    "banded",
    "rewired_banded",
    "random_biregular",
    "erdos_renyi",
    "xnet",
    "ramanujan_expander",
    "block_diagonal",
    "make_mask",
    "family_seed",
    "mask_fingerprint",
]


def _check(out_features: int, in_features: int, degree: int) -> None:
    check_positive_int("out_features", out_features)
    check_positive_int("in_features", in_features)
    if not 1 <= degree <= in_features:
        raise invalid("degree", degree, f"in [1, in_features={in_features}]")


def _as_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask.astype(np.float32))


def _banded(out_features: int, in_features: int, degree: int) -> np.ndarray:
    mask = np.zeros((out_features, in_features), dtype=np.int8)
    # Row i's window starts at ⌊i·in/out⌋: the circulant i, …, i+degree−1 for equal widths, and
    # windows spread evenly over the columns otherwise.
    for row in range(out_features):
        start = (row * in_features) // out_features
        mask[row, [(start + j) % in_features for j in range(degree)]] = 1
    if (mask.sum(axis=1) != degree).any():  # a window wrapped onto itself: degree > in_features
        raise ValueError("degree too large for in_features")
    return mask


def banded(out_features: int, in_features: int, degree: int) -> torch.Tensor:
    """Banded/circulant: row i connects to `degree` consecutive columns from ⌊i·in/out⌋, modulo
    `in_features` (for equal widths, the circulant graph i → i, …, i+degree−1)."""
    _check(out_features, in_features, degree)
    return _as_tensor(_banded(out_features, in_features, degree))


def _rewire(mask: np.ndarray, swaps: int, rng: np.random.Generator) -> np.ndarray:
    """Degree-preserving double-edge swaps: (a,b),(c,d) → (a,d),(c,b) when both are new."""
    mask = mask.copy()
    rows, cols = np.nonzero(mask)
    n_edges = len(rows)
    picks = rng.integers(0, n_edges, size=(swaps, 2))
    for first, second in picks:
        a, b, c, d = rows[first], cols[first], rows[second], cols[second]
        if a == c or b == d or mask[a, d] or mask[c, b]:
            continue
        mask[a, b] = mask[c, d] = 0
        mask[a, d] = mask[c, b] = 1
        cols[first], cols[second] = d, b
    return mask


def rewired_banded(out_features: int, in_features: int, degree: int, p: float, seed: int) -> torch.Tensor:
    """A banded mask after p·5·|E| attempted degree-preserving edge swaps (Maslov–Sneppen).

    p = 0 is the banded mask; p = 1 (about 5 swaps per edge) is indistinguishable from a uniform
    random biregular graph. Degrees on both sides are those of the banded mask, whatever p.
    """
    _check(out_features, in_features, degree)
    check_number("p", p, low=0.0, high=1.0)
    base = _banded(out_features, in_features, degree)
    swaps = int(round(p * 5 * base.sum()))
    return _as_tensor(_rewire(base, swaps, np.random.default_rng(seed)))


def random_biregular(out_features: int, in_features: int, degree: int, seed: int) -> torch.Tensor:
    """Uniform random (bi)regular bipartite graph with the banded mask's degrees (10 swaps/edge)."""
    _check(out_features, in_features, degree)
    base = _banded(out_features, in_features, degree)
    return _as_tensor(_rewire(base, 10 * int(base.sum()), np.random.default_rng(seed)))


def erdos_renyi(out_features: int, in_features: int, n_edges: int, seed: int) -> torch.Tensor:
    """`n_edges` positions drawn uniformly without replacement; degrees are not controlled."""
    if not 0 <= n_edges <= out_features * in_features:
        raise invalid("n_edges", n_edges, f"in [0, {out_features * in_features}]")
    rng = np.random.default_rng(seed)
    mask = np.zeros(out_features * in_features, dtype=np.int8)
    mask[rng.choice(out_features * in_features, size=n_edges, replace=False)] = 1
    return _as_tensor(mask.reshape(out_features, in_features))


def xnet(out_features: int, in_features: int, degree: int, seed: int) -> torch.Tensor:
    """X-Net (Prabhu et al. 2018): each node on the smaller side gets `degree` random neighbours."""
    small, large = sorted((out_features, in_features))
    if not 1 <= degree <= large:
        raise invalid("degree", degree, f"in [1, {large}]")
    rng = np.random.default_rng(seed)
    mask = np.zeros((small, large), dtype=np.int8)
    for node in range(small):
        mask[node, rng.choice(large, size=degree, replace=False)] = 1
    return _as_tensor(mask if out_features <= in_features else mask.T)


def ramanujan_expander(out_features: int, in_features: int, degree: int, seed: int, tries: int = 200) -> torch.Tensor:
    """A random biregular mask whose second singular value meets the Ramanujan bound.

    Draws random biregular graphs until σ₂(M) ≤ √(d_L−1) + √(d_R−1); raises `RuntimeError` if
    none of `tries` does. Attempt a uses the seed derived from (seed, a), never seed + a: with
    `random_biregular(…, seed)` itself as the first attempt, an expander drawn with the seed of
    a biregular mask was that very mask whenever it passed the bound (most do).
    """
    from topoopt.sparse.measures import graph_measures

    for attempt in range(tries):
        attempt_seed = int(np.random.SeedSequence([seed, attempt, 0x5A3E]).generate_state(1)[0])
        mask = random_biregular(out_features, in_features, degree, attempt_seed)
        if graph_measures(mask).ramanujan_margin >= 0:
            return mask
    raise RuntimeError(f"No Ramanujan mask found in {tries} tries ({out_features}×{in_features}, degree {degree})")


def block_diagonal(out_features: int, in_features: int, degree: int, blocks: int = 2) -> torch.Tensor:
    """`blocks` disconnected banded blocks (a negative control: information cannot cross blocks)."""
    _check(out_features, in_features, degree)
    if not 2 <= blocks <= min(out_features, in_features):
        raise invalid("blocks", blocks, f"in [2, {min(out_features, in_features)}]")
    row_edges = np.linspace(0, out_features, blocks + 1).astype(int)
    col_edges = np.linspace(0, in_features, blocks + 1).astype(int)
    mask = np.zeros((out_features, in_features), dtype=np.int8)
    for b in range(blocks):
        rows, cols = row_edges[b + 1] - row_edges[b], col_edges[b + 1] - col_edges[b]
        if degree > cols:
            raise invalid("degree", degree, f"at most a block's {cols} inputs")
        mask[row_edges[b]:row_edges[b + 1], col_edges[b]:col_edges[b + 1]] = _banded(rows, cols, degree)
    return _as_tensor(mask)


MASK_FAMILIES = ("banded", "rewired", "biregular", "erdos_renyi", "xnet", "expander", "block_diagonal")


def family_seed(family: str, index: int, layer: int = 0) -> int:
    """A seed of the stream of `family` for its `index`-th mask and a given layer.

    Each family has its own stream (keyed by its name), so two families never share seeds:
    otherwise two generators built on the same random biregular draw return the same mask.
    """
    check_choice("mask family", family, MASK_FAMILIES)
    return int(np.random.SeedSequence([zlib.crc32(family.encode()), index, layer]).generate_state(1)[0])


def mask_fingerprint(masks: list[torch.Tensor] | torch.Tensor) -> str:
    """A hash of one mask or a network's list of masks (shapes and entries): equal masks, equal
    fingerprints; used to detect the same wiring appearing twice in a study."""
    masks = [masks] if isinstance(masks, torch.Tensor) else masks
    digest = hashlib.sha256()
    for mask in masks:
        array = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.int8)
        digest.update(repr(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def make_mask(family: str, out_features: int, in_features: int, degree: int, seed: int, p: float = 0.5) -> torch.Tensor:
    """One mask of `family` with `degree` edges per row (Erdős–Rényi: the same edge count)."""
    check_choice("mask family", family, MASK_FAMILIES)
    if family == "banded":
        return banded(out_features, in_features, degree)
    if family == "rewired":
        return rewired_banded(out_features, in_features, degree, p, seed)
    if family == "biregular":
        return random_biregular(out_features, in_features, degree, seed)
    if family == "erdos_renyi":
        return erdos_renyi(out_features, in_features, out_features * degree, seed)
    if family == "xnet":
        return xnet(out_features, in_features, degree, seed)
    if family == "expander":
        return ramanujan_expander(out_features, in_features, degree, seed)
    return block_diagonal(out_features, in_features, degree)
