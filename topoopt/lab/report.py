"""Plain-text tables of per-layer topology, for terminals and logs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from topoopt.measure import LayerTopology

__all__ = ["format_table", "topology_table"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, left_columns: int = 1) -> str:
    """A plain-text table: the first `left_columns` columns left-aligned (labels), the others
    right-aligned (numbers); floats with 4 significant digits, other values (pre-formatted
    strings included) as ``str`` gives them."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

    def line(texts) -> str:
        return "  ".join(t.ljust(w) if i < left_columns else t.rjust(w)
                         for i, (t, w) in enumerate(zip(texts, widths)))

    lines = [line(map(str, header)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [line(row) for row in cells])


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def topology_table(report: Mapping[str, LayerTopology]) -> str:
    """One row per layer: neurons, normalized entropy, mean lifetime, max lifetime, ‖W‖."""
    header = ["layer", "neurons", "dim", "norm. entropy", "mean lifetime", "max lifetime", "‖W‖_F"]
    rows = [
        [name, t.n_neurons, t.dim, t.normalized_entropy, t.mean_lifetime, t.max_lifetime, t.weight_norm]
        for name, t in report.items()
    ]
    return format_table(header, rows)
