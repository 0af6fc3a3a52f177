"""Plain-text tables of per-layer topology, for terminals and logs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from topoopt.layers import LayerTopology

__all__ = ["format_table", "topology_table"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned first column, right-aligned others; floats with 4 significant digits."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(_align(str(h), w, i) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(_align(c, w, i) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _align(text: str, width: int, column: int) -> str:
    return text.ljust(width) if column == 0 else text.rjust(width)


def topology_table(report: Mapping[str, LayerTopology]) -> str:
    """One row per layer: neurons, normalized entropy, mean lifetime, max lifetime, ‖W‖."""
    header = ["layer", "neurons", "dim", "norm. entropy", "mean lifetime", "max lifetime", "‖W‖_F"]
    rows = [
        [name, t.n_neurons, t.dim, t.normalized_entropy, t.mean_lifetime, t.max_lifetime, t.weight_norm]
        for name, t in report.items()
    ]
    return format_table(header, rows)
