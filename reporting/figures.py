"""matplotlib without a display: figures on the Agg canvas, written atomically as PNG.

No ``pyplot``: every figure is a :class:`matplotlib.figure.Figure` with its own
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, so nothing depends on a display, on the
global backend setting or on pyplot's figure registry (nothing to close, nothing leaks).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.io_utils import atomic_path

__all__ = ["CLASS_COLOURS", "DPI", "FigureJobs", "class_colour", "mode_colour", "new_figure", "save_png"]

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


class FigureJobs:
    """Figure functions run here (``workers <= 1``) or in ``workers`` forked processes.

    Rendering dominates a report (the demo's: 35 PNGs, about 10 s on one core); the figures are
    independent files, so a report may draw them on every core. :meth:`wait` returns the results in
    submission order and re-raises the first error. Workers are forked, on Linux only (forking after
    importing numerical libraries is not safe on macOS; Windows has no fork): elsewhere the figures
    are drawn here, one after another.
    """

    def __init__(self, workers: int = 1) -> None:
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1 and sys.platform.startswith("linux"):
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        self._jobs: list[Future[Any] | Any] = []

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Draw ``fn(*args, **kwargs)`` (now, or in a worker)."""
        self._jobs.append(
            fn(*args, **kwargs) if self._pool is None else self._pool.submit(fn, *args, **kwargs)
        )

    def wait(self) -> list[Any]:
        """Every submitted figure's result, in order (an error in one is raised here)."""
        try:
            return [j.result() if isinstance(j, Future) else j for j in self._jobs]
        finally:
            self._jobs = []
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None
