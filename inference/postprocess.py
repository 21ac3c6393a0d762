"""Post-processing of a predicted label map (docs/paper_preset.md, "Inference and evaluation").

Driven only by the task's plans (``docs/formats.md``), never by task names:

* ``num_classes``: classes 1 .. num_classes-1 are foreground;
* ``tumour_classes``: foreground classes copied unchanged (several lesions may coexist);
* ``keep_components``: 1 = keep the largest connected component of each other class,
  2 = keep the largest two when the second is more than a tenth of the first, 0 = keep all;
* ``zero_upper_half_x``: after the closing, before the component step, clear every voxel whose
  last-axis index is at or beyond ``W // 2`` (the original's rule for Task09_Spleen, which lies in
  the other half).

As the original's ``post_processing`` (the defaults): predictions outside the weight map
(``weight == 0``, i.e. outside modality 0's non-zero region) are removed once, first; then for every
other foreground class, in ascending order: binary closing of the class mask over the whole grid
(18-connectivity, SciPy's default border: the outside counts as background, so foreground on the
grid's faces is eroded; the closing may fill voxels of weight 0, and they stay), the half-grid rule,
and the component filter (18-connectivity). The output starts from zeros and each class is written
over the previous ones, so where the closed regions of two classes overlap the higher class wins.

Ties: when the components that decide what is kept have equal sizes, the original's component
functions fail (``labeled == array_of_two_labels``; NumPy 1.14, which it pinned, compared that to a
scalar ``False`` and dropped the class; current NumPy raises, and its bare ``except`` then kept every
component). Here the component found first (lowest label of ``scipy.ndimage.label``) wins.

Options: ``closing_border="keep"`` closes without eroding at the grid's faces;
``weight_mask="before_after"`` also removes what the closing put outside the weight map.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from inference.settings import CLOSING_BORDERS, WEIGHT_MASKS, ClosingBorder, WeightMask

__all__ = ["STRUCTURE_18", "close_mask", "keep_largest_components", "postprocess"]

STRUCTURE_18: np.ndarray = ndimage.generate_binary_structure(3, 2)
"""3x3x3 structuring element with 18-connectivity (faces and edges, no corners)."""


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Tight bounding box of a 3D boolean mask, or None when empty."""
    slices = ndimage.find_objects(mask.astype(np.uint8, copy=False))
    return slices[0] if slices else None


def close_mask(
    mask: np.ndarray, box: tuple[slice, slice, slice], border: ClosingBorder = "erode"
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Binary closing (18-connectivity) of a 3D boolean mask, computed on a box around it.

    Args:
        mask: (z, y, x) bool, the whole grid.
        box: the mask's bounding box.
        border: ``"erode"``: the closing of the whole grid with SciPy's default border (outside =
            background, so foreground on the grid's faces is eroded), the original's; ``"keep"``:
            the grid's faces are not eroded (the mask is closed as if the outside could be
            dilated into).

    Returns:
        (closed mask on the returned box, that box). The closing lies within the box grown by one
        voxel (the dilation's reach), so the result equals the whole-grid closing there and is
        empty elsewhere.
    """
    if border == "erode":
        grown = tuple(
            slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box, mask.shape, strict=True)
        )
        sub: tuple[slice, slice, slice] = (grown[0], grown[1], grown[2])
        return ndimage.binary_closing(mask[sub], structure=STRUCTURE_18), sub
    if border == "keep":
        padded = np.pad(mask[box], 1, mode="constant", constant_values=False)
        closed = ndimage.binary_closing(padded, structure=STRUCTURE_18)
        return closed[1:-1, 1:-1, 1:-1], box
    raise ValueError(f"closing border must be one of {CLOSING_BORDERS}, got {border!r}")


def keep_largest_components(mask: np.ndarray, keep_components: int) -> np.ndarray:
    """Filter the connected components (18-connectivity) of a boolean 3D mask.

    Args:
        mask: (z, y, x) bool.
        keep_components: 1 = the largest; 2 = the largest two when size(2nd) > size(1st) / 10,
            else the largest; 0 = all. Ties are broken by label order (the component that
            ``scipy.ndimage.label`` numbers first wins; the original failed on ties, see the
            module docstring).

    Returns:
        bool (z, y, x).
    """
    if keep_components not in (0, 1, 2):
        raise ValueError(f"keep_components must be 0, 1 or 2, got {keep_components}")
    if keep_components == 0:
        return mask.astype(bool, copy=True)
    labelled, n = ndimage.label(mask, structure=STRUCTURE_18)
    if n <= 1:
        return labelled > 0
    sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-sizes, kind="stable")
    keep = [order[0] + 1]
    if keep_components == 2 and sizes[order[1]] * 10 > sizes[order[0]]:
        keep.append(order[1] + 1)
    return np.isin(labelled, keep)


def postprocess(
    label: np.ndarray,
    plans: Mapping[str, Any],
    weight: np.ndarray | None = None,
    *,
    closing_border: ClosingBorder = "erode",
    weight_mask: WeightMask = "before",
) -> np.ndarray:
    """Post-process a label map of one case.

    Args:
        label: (z, y, x) integer label map (preprocessed grid).
        plans: the task's plans dict; uses ``num_classes`` (else the maximum label + 1),
            ``tumour_classes`` (default []), ``keep_components`` (default 1) and
            ``zero_upper_half_x`` (default False: Task09_Spleen's rule, which clears every voxel at
            last-axis index >= W // 2 after the closing, before the component step).
        weight: optional (z, y, x) weight map of the case (non-zero = inside the body).
        closing_border: ``"erode"`` (the original) or ``"keep"`` (:func:`close_mask`).
        weight_mask: ``"before"`` (the original: predictions outside the weight map are removed
            before the closing only) or ``"before_after"`` (and after it).

    Returns:
        uint8 (z, y, x) label map.
    """
    if label.ndim != 3:
        raise ValueError(f"label map must be (z, y, x), got shape {label.shape}")
    if weight_mask not in WEIGHT_MASKS:
        raise ValueError(f"weight_mask must be one of {WEIGHT_MASKS}, got {weight_mask!r}")
    label = np.asarray(label)
    num_classes = int(plans.get("num_classes", int(label.max(initial=0)) + 1))
    tumour = {int(c) for c in plans.get("tumour_classes", [])}
    keep_components = int(plans.get("keep_components", 1))
    half_x = label.shape[2] // 2 if plans.get("zero_upper_half_x", False) else None
    inside: np.ndarray | None = None
    if weight is not None:
        if weight.shape != label.shape:
            raise ValueError(f"weight map shape {weight.shape} differs from label shape {label.shape}")
        inside = np.asarray(weight) != 0
        label = np.where(inside, label, 0)

    out = np.zeros(label.shape, dtype=np.uint8)
    for c in range(1, num_classes):
        mask = label == c
        box = _bbox(mask)
        if box is None:
            continue
        if c in tumour:
            out[mask] = c
            continue
        closed, sub = close_mask(mask, box, closing_border)
        if half_x is not None:  # in the whole grid's coordinates, whatever the box
            closed[:, :, max(half_x - sub[2].start, 0) :] = False
        closed = keep_largest_components(closed, keep_components)
        out[sub][closed] = c
    if inside is not None and weight_mask == "before_after":
        out[~inside] = 0
    return out
