"""Figures for files and TensorBoard, without touching the user's matplotlib backend.

topoopt draws on `matplotlib.figure.Figure` objects directly instead of through pyplot: such a
figure renders to a file or to TensorBoard with the Agg canvas, needs no display, and never
calls ``matplotlib.use`` (which would switch the backend of a user's notebook or GUI session).
"""

from __future__ import annotations

from typing import Any

__all__ = ["new_figure", "save_png"]


def new_figure(**kwargs: Any):
    """A `matplotlib.figure.Figure` (keyword arguments as for it: ``figsize``, ``dpi``, ...).

    Draw with ``figure.subplots()``; save with ``figure.savefig(path)``. It is not registered
    with pyplot, so it needs no closing and holds no memory after it goes out of scope.
    """
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_png(figure, path, dpi: int = 100) -> None:
    """Save `figure` as a PNG of at most 256 colours (a palette image, about a third of the size
    of the RGBA one and indistinguishable for line and scatter plots): for figures kept in git."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    image = Image.open(buffer).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
