"""matplotlib without a display: figures on the Agg canvas, written atomically as PNG.

No ``pyplot``: every figure is a :class:`matplotlib.figure.Figure` with its own
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, so nothing depends on a display, on the
global backend setting or on pyplot's figure registry (nothing to close, nothing leaks).
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.io_utils import atomic_path

__all__ = ["CLASS_COLOURS", "DPI", "class_colour", "mode_colour", "new_figure", "save_png"]

DPI = 100

#: label colours (RGB in [0, 1]) of classes 1, 2, ...: saturated, far from grey, so that an overlay's
#: labelled pixels never look grey
CLASS_COLOURS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.15, 0.15),  # red
    (0.15, 0.85, 0.15),  # green
    (0.2, 0.45, 1.0),  # blue
    (1.0, 0.85, 0.0),  # yellow
    (1.0, 0.2, 1.0),  # magenta
    (0.0, 0.9, 0.9),  # cyan
    (1.0, 0.55, 0.0),  # orange
    (0.6, 0.3, 1.0),  # violet
)

_MODE_COLOURS = {
    "independent": "#4c72b0",
    "shared": "#dd8452",
    "universal": "#55a868",
    "universal_adapted": "#c44e52",
}
_OTHER_COLOURS = ("#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")


def class_colour(c: int) -> tuple[float, float, float]:
    """The overlay colour of foreground class ``c`` (>= 1)."""
    return CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]


def mode_colour(mode: str, index: int = 0) -> str:
    """A fixed colour per training mode (others by position)."""
    return _MODE_COLOURS.get(mode, _OTHER_COLOURS[index % len(_OTHER_COLOURS)])


def new_figure(width_px: int, height_px: int, dpi: int = DPI) -> Figure:
    """A figure of exactly ``width_px`` x ``height_px`` pixels on an Agg canvas."""
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG of its own pixel size, atomically (:func:`utils.io_utils.atomic_path`)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, facecolor="white")
    return Path(path)
