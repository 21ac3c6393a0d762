"""Overlay pictures of one case: the image with ground truth and predictions on the structure's three
central planes.

The planes go through the centre of the ground truth's foreground bounding box (of the predictions'
when the ground truth is empty; the volume's centre when both are): axial (a z slice, y down, x
right), coronal (a y slice) and sagittal (an x slice), both with z pointing up. Each panel is the
grey image (1st to 99th percentile of the volume) with every labelled voxel blended with its class
colour (:data:`reporting.figures.CLASS_COLOURS`); voxels are magnified by whole numbers per axis so
that the panels keep the physical aspect of the voxel spacing.

The panels are placed on the figure pixel for pixel (``Figure.figimage``: no resampling), and
:func:`render_case_overlay` returns where: a test can find every label exactly where its mask is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from reporting.figures import class_colour, new_figure, save_png
from utils.triples import int3

__all__ = [
    "ALPHA",
    "PLANES",
    "OverlayLayout",
    "central_planes",
    "grey",
    "overlay_rgb",
    "plane_slices",
    "render_case_overlay",
]

ALPHA = 0.5  # weight of the class colour in a labelled pixel
PLANES = ("axial", "coronal", "sagittal")
_LEFT, _TOP, _BOTTOM, _GAP = 150, 44, 30, 6  # margins (px): row titles, column titles, legend


def central_planes(*masks: np.ndarray) -> tuple[int, int, int]:
    """(z, y, x) of the centre of the first non-empty mask's bounding box (the volume's centre when
    every mask is empty)."""
    shape = masks[0].shape
    for mask in masks:
        idx = np.nonzero(mask)
        if idx[0].size:
            return int3([int((i.min() + i.max()) // 2) for i in idx])
    return (shape[0] // 2, shape[1] // 2, shape[2] // 2)


def plane_slices(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """The axial (y, x), coronal (z, x) and sagittal (z, y) slices of ``volume`` (z, y, x) through
    ``centre``; coronal and sagittal with z pointing up (row 0 = the last z)."""
    z, y, x = (int(c) for c in centre)
    return [volume[z], volume[::-1, y, :], volume[::-1, :, x]]


def grey(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A 2D slice as grey RGB (h, w, 3) in [0, 1], ``lo`` black and ``hi`` white."""
    g = (
        np.clip((np.asarray(image, np.float32) - lo) / (hi - lo), 0.0, 1.0)
        if hi > lo
        else np.zeros(image.shape)
    )
    return np.repeat(np.asarray(g, np.float32)[..., None], 3, axis=2)


def overlay_rgb(image_rgb: np.ndarray, label: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Blend every labelled pixel (label c > 0) of a grey RGB slice with class c's colour.

    Args:
        image_rgb: (h, w, 3) grey image in [0, 1]; label: (h, w) integer classes.
    Returns:
        (h, w, 3) float32; unlabelled pixels stay grey (R = G = B), labelled ones are not.
    """
    out = np.array(image_rgb, dtype=np.float32, copy=True)
    for c in np.unique(label):
        if c <= 0:
            continue
        mask = label == c
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(class_colour(int(c)), np.float32)
    return out


def _magnify(panel: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return np.repeat(np.repeat(panel, rows, axis=0), cols, axis=1)


def _axis_scales(shape: Sequence[int], spacing_zyx: Sequence[float], target_px: int) -> tuple[int, int, int]:
    """Whole-number magnification per axis (z, y, x): the physical aspect, the largest panel side
    about ``target_px``."""
    sp = np.asarray(spacing_zyx, np.float64)
    extent = np.asarray(shape, np.float64) * sp
    mm_per_px = max(extent.max() / target_px, 1e-6)
    return int3([max(1, int(round(s / mm_per_px))) for s in sp])


@dataclass(frozen=True)
class OverlayLayout:
    """Where the panels are in the PNG: ``boxes[(row, plane)] = (left, top, width, height)`` in pixels
    from the top-left corner; ``scales[plane] = (rows, cols)`` magnification of the slice's axes."""

    width: int
    height: int
    rows: tuple[str, ...]
    centre: tuple[int, int, int]
    boxes: dict[tuple[str, str], tuple[int, int, int, int]]
    scales: dict[str, tuple[int, int]]


def render_case_overlay(
    path: str | os.PathLike[str],
    image: np.ndarray,
    truth: np.ndarray | None,
    predictions: Mapping[str, np.ndarray],
    *,
    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    class_names: Mapping[int, str] | None = None,
    title: str = "",
    target_px: int = 200,
) -> OverlayLayout:
    """Write one case's overlay PNG: a row for the ground truth (if given) and one per prediction,
    a column per plane (axial, coronal, sagittal through the structure's centre).

    Args:
        image: (z, y, x) image (e.g. modality 0).
        truth: (z, y, x) reference classes, or None.
        predictions: name (e.g. the training mode) -> (z, y, x) predicted classes.
        spacing_zyx: voxel spacing (mm), for the panels' aspect.
        class_names: class -> name, for the legend.
    Returns:
        the :class:`OverlayLayout` of the written PNG.
    """
    vol = np.asarray(image, np.float32)
    labels: dict[str, np.ndarray] = {}
    if truth is not None:
        labels["ground truth"] = np.asarray(truth)
    labels.update({name: np.asarray(p) for name, p in predictions.items()})
    for name, lab in labels.items():
        if lab.shape != vol.shape:
            raise ValueError(f"{name}: label shape {lab.shape} differs from the image's {vol.shape}")
    centre = central_planes(*labels.values()) if labels else central_planes(np.zeros(vol.shape, bool))
    lo, hi = (float(v) for v in np.percentile(vol, [1, 99])) if vol.size else (0.0, 1.0)
    sz, sy, sx = _axis_scales(vol.shape, spacing_zyx, target_px)
    scales = {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}
    image_slices = plane_slices(vol, centre)
    sizes = [
        (s.shape[0] * scales[p][0], s.shape[1] * scales[p][1])
        for s, p in zip(image_slices, PLANES, strict=True)
    ]
    row_names = tuple(labels) or ("image",)
    row_h = max(h for h, _ in sizes)
    width = _LEFT + sum(w for _, w in sizes) + _GAP * (len(PLANES) + 1)
    height = _TOP + len(row_names) * (row_h + _GAP) + _BOTTOM
    fig = new_figure(width, height)
    boxes: dict[tuple[str, str], tuple[int, int, int, int]] = {}
    for r, name in enumerate(row_names):
        lab_slices = plane_slices(labels[name], centre) if name in labels else [None] * 3
        top = _TOP + r * (row_h + _GAP)
        left = _LEFT + _GAP
        for plane, img2d, lab2d, (h, w) in zip(PLANES, image_slices, lab_slices, sizes, strict=True):
            rgb = grey(img2d, lo, hi)
            if lab2d is not None:
                rgb = overlay_rgb(rgb, lab2d)
            panel = _magnify(rgb, *scales[plane])
            # figimage's offsets are from the bottom-left corner; origin="upper" puts row 0 on top
            fig.figimage(panel, xo=left, yo=height - top - h, origin="upper", resize=False)
            boxes[(name, plane)] = (left, top, w, h)
            left += w + _GAP
        fig.text(8 / width, 1 - (top + row_h / 2) / height, name, va="center", ha="left", fontsize=9)
    z, y, x = centre
    left = _LEFT + _GAP
    for plane, (_, w), where in zip(PLANES, sizes, (f"z={z}", f"y={y}", f"x={x}"), strict=True):
        fig.text(
            (left + w / 2) / width, 1 - (_TOP - 6) / height, f"{plane} ({where})", ha="center", fontsize=8
        )
        left += w + _GAP
    if title:
        fig.text(8 / width, 1 - 12 / height, title, ha="left", va="center", fontsize=9, weight="bold")
    present = sorted({int(c) for lab in labels.values() for c in np.unique(lab) if c > 0})
    left_px = 8
    for c in present:
        text = f"■ {c} {(class_names or {}).get(c, '')}".rstrip()
        fig.text(
            left_px / width, 10 / height, text, color=class_colour(c), fontsize=9, ha="left", va="bottom"
        )
        left_px += 14 + 7 * len(text)
    save_png(fig, path)
    return OverlayLayout(width, height, row_names, centre, boxes, {p: scales[p] for p in PLANES})
