"""Post-processing of a predicted label map (docs/paper_preset.md, "Inference and evaluation").

Driven only by the task's plans (``docs/formats.md``), never by task names:

* ``num_classes``: classes 1 .. num_classes-1 are foreground;
* ``tumour_classes``: foreground classes copied unchanged (several lesions may coexist);
* ``keep_components``: 1 = keep the largest connected component of each other class,
  2 = keep the largest two when the second is more than a tenth of the first, 0 = keep all;
* ``zero_upper_half_x``: before the component step, clear every voxel whose last-axis index is at or
  beyond ``W // 2`` (the original's rule for Task09_Spleen, which lies in the other half).

For every other foreground class: binary closing (3D, 18-connectivity), then the connected
components (18-connectivity, as the original) are filtered as above. Like the original, the output
starts from zeros and classes are written in ascending order, so where the closed regions of two
classes overlap the higher class wins. Predictions outside the weight map (``weight == 0``, i.e.
outside modality 0's non-zero region) are removed before (so that they never count as a component)
and after (so that the closing cannot bring them back).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["STRUCTURE_18", "keep_largest_components", "postprocess"]

STRUCTURE_18: np.ndarray = ndimage.generate_binary_structure(3, 2)
"""3x3x3 structuring element with 18-connectivity (faces and edges, no corners)."""


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Tight bounding box of a 3D boolean mask, or None when empty."""
    slices = ndimage.find_objects(mask.astype(np.uint8, copy=False))
    return slices[0] if slices else None


def _closing(mask: np.ndarray) -> np.ndarray:
    """Binary closing with 18-connectivity that never erodes at the array border (the mask is
    zero-padded by one voxel first; the closing of a set stays inside its bounding box)."""
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    closed = ndimage.binary_closing(padded, structure=STRUCTURE_18)
    return closed[1:-1, 1:-1, 1:-1]


def keep_largest_components(mask: np.ndarray, keep_components: int) -> np.ndarray:
    """Filter the connected components (18-connectivity) of a boolean 3D mask.

    Args:
        mask: (z, y, x) bool.
        keep_components: 1 = the largest; 2 = the largest two when size(2nd) > size(1st) / 10,
            else the largest; 0 = all. Ties are broken by label order (first found wins).

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
) -> np.ndarray:
    """Post-process a label map of one case.

    Args:
        label: (z, y, x) integer label map (preprocessed grid).
        plans: the task's plans dict; uses ``num_classes`` (else the maximum label + 1),
            ``tumour_classes`` (default []), ``keep_components`` (default 1) and
            ``zero_upper_half_x`` (default False: Task09_Spleen's rule, which clears every voxel at
            last-axis index >= W // 2 before the component step).
        weight: optional (z, y, x) weight map of the case (non-zero = inside the body).

    Returns:
        uint8 (z, y, x) label map.
    """
    if label.ndim != 3:
        raise ValueError(f"label map must be (z, y, x), got shape {label.shape}")
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
        sub = _closing(mask[box])
        if half_x is not None:  # in the whole grid's coordinates, whatever the box
            sub[:, :, max(half_x - box[2].start, 0) :] = False
        sub = keep_largest_components(sub, keep_components)
        out[box][sub] = c
    if inside is not None:
        out[~inside] = 0
    return out
