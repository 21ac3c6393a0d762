"""Segmentation metrics: Dice and the 95th-percentile Hausdorff distance (HD95, mm), CSV output.

Conventions (also in ``docs/inference.md``); every value is finite, never NaN or inf:

=====================  ==========  =====================================================
prediction / reference  Dice        HD95
=====================  ==========  =====================================================
both empty              1.0         0.0
one of them empty       0.0         the volume's diagonal in mm, ``sqrt(sum((shape * spacing)**2))``
                                    (an upper bound of any distance inside the image)
both non-empty          2|A∩B|/(|A|+|B|)  see below
=====================  ==========  =====================================================

HD95: the surface of a mask is its voxels with at least one 6-neighbour outside the mask (voxels
on the array border count as surface). For every surface voxel of A the Euclidean distance (in mm,
voxel centres, ``spacing`` per axis) to the nearest surface voxel of B is taken, and vice versa;
HD95 = max(95th percentile of A→B, 95th percentile of B→A) (NumPy's default linear
interpolation of percentiles). Identical masks give 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from utils.io_utils import atomic_write_csv

__all__ = [
    "dice",
    "evaluate_case",
    "evaluate_folder",
    "hd95",
    "mean_per_class",
    "surface",
    "write_metrics_csv",
]

_STRUCT_6 = ndimage.generate_binary_structure(3, 1)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape; 1.0 when both are empty.

    The original's ``binary_dice3d`` computes ``(2|A∩B| + 1e-10) / (|A| + |B| + 1e-10)``: the same
    value within 1e-10 (both empty: 1 in both; one empty: 1e-10 / size there, exactly 0 here).
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape}, reference {ref.shape}")
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean (z, y, x) mask: mask minus its erosion with 6-connectivity."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_STRUCT_6, border_value=0)


def _diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing, strict=True))))


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two boolean (z, y, x) masks.

    Args:
        pred, ref: boolean masks of one shape.
        spacing: voxel size (z, y, x) in mm.

    Returns:
        HD95 in mm; 0.0 when both are empty; the volume diagonal in mm when exactly one is empty.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"expected two 3D masks of one shape, got {pred.shape} and {ref.shape}")
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values (z, y, x), got {spacing}")
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not has_p and not has_r:
        return 0.0
    if not has_p or not has_r:
        return _diagonal_mm(pred.shape, spacing)
    # crop to the union's bounding box plus one voxel: distances and surfaces are unchanged
    union = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    box = tuple(
        slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(union, pred.shape, strict=True)
    )
    sp, sr = surface(pred[box]), surface(ref[box])
    sampling = [float(s) for s in spacing]
    dist_to_r = ndimage.distance_transform_edt(~sr, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=sampling)
    d_pr = dist_to_r[sp]
    d_rp = dist_to_p[sr]
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def evaluate_case(
    pred: np.ndarray,
    ref: np.ndarray,
    num_classes: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    with_hd95: bool = True,
    include_background: bool = False,
) -> dict[str, float]:
    """Dice (and HD95) of every foreground class 1..num_classes-1 of one case.

    Args:
        pred, ref: integer (z, y, x) label maps of one shape.
        spacing: (z, y, x) mm.
        include_background: also class 0 (the original's ``multiClassDice`` reports it too).

    Returns:
        ``{"dice_1": ..., "hd95_1": ..., "dice_2": ...}`` (HD95 keys only when ``with_hd95``;
        ``dice_0``/``hd95_0`` first with ``include_background``).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape}, reference {ref.shape}")
    row: dict[str, float] = {}
    for c in range(0 if include_background else 1, num_classes):
        p, r = pred == c, ref == c
        row[f"dice_{c}"] = dice(p, r)
        if with_hd95:
            row[f"hd95_{c}"] = hd95(p, r, spacing)
    return row


def mean_per_class(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of every numeric metric column (``dice_*``, ``hd95_*``) over the given rows."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for k, v in row.items():
            if k.startswith(("dice_", "hd95_")) and isinstance(v, (int, float)):
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def write_metrics_csv(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    *,
    mean_label: str = "mean",
) -> dict[str, float]:
    """Write per-case rows (each with a ``case`` key and metric keys) and a last row of the
    per-class means (``case`` = ``mean_label``) to CSV, atomically.

    Returns:
        the per-class means.
    """
    path = os.fspath(path)
    means = mean_per_class(rows)
    metric_keys: list[str] = []
    other_keys: list[str] = []
    for row in rows:
        for k in row:
            if k == "case":
                continue
            target = metric_keys if k.startswith(("dice_", "hd95_")) else other_keys
            if k not in target:
                target.append(k)

    def _order(k: str) -> tuple[int, str]:
        name, _, cls = k.partition("_")
        return (int(cls) if cls.isdigit() else 10**6, name)

    fields = ["case", *other_keys, *sorted(metric_keys, key=_order)]
    atomic_write_csv(path, fields, [*rows, {"case": mean_label, **means}])
    return means


def evaluate_folder(
    pred_dir: str | os.PathLike[str],
    ref_dir: str | os.PathLike[str],
    num_classes: int,
    *,
    label_map: Mapping[str, int] | Mapping[int, int] | None = None,
    csv_path: str | os.PathLike[str] | None = None,
    with_hd95: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Dice/HD95 of every predicted NIfTI label map against the reference of the same file name.

    Args:
        pred_dir: folder of predictions (``predict.py`` output).
        ref_dir: folder of reference label maps (e.g. ``labelsTr``), same file names.
        num_classes: classes incl. background (the plans' ``num_classes``).
        label_map: the plans' ``label_map`` (raw value -> class) applied to the references, e.g.
            tumour fused into the organ; values not listed become 0. None = use them as they are.
        csv_path: if given, the rows and the means are written there (:func:`write_metrics_csv`).

    Returns:
        (one row per case: ``case`` + metric keys, per-class means). Spacing is the reference's.
    """

    def _names(folder: str | os.PathLike[str]) -> list[str]:
        return sorted(
            n for n in os.listdir(folder) if n.endswith((".nii.gz", ".nii")) and not n.startswith(".")
        )

    lut: np.ndarray | None = None
    if label_map is not None:
        lut = np.zeros(256, dtype=np.uint8)
        for k, v in label_map.items():
            if 0 <= int(k) < 256:
                lut[int(k)] = int(v)
    rows: list[dict[str, Any]] = []
    for name in _names(pred_dir):
        ref_path = os.path.join(os.fspath(ref_dir), name)
        if not os.path.isfile(ref_path):
            raise FileNotFoundError(f"no reference {ref_path} for prediction {name}")
        pred_img = sitk.ReadImage(os.path.join(os.fspath(pred_dir), name))
        ref_img = sitk.ReadImage(ref_path)
        pred = sitk.GetArrayFromImage(pred_img)
        ref = sitk.GetArrayFromImage(ref_img).astype(np.int64)
        if lut is not None:
            ref = np.where((ref >= 0) & (ref < 256), lut[np.clip(ref, 0, 255)], 0)
        spacing = tuple(float(s) for s in ref_img.GetSpacing()[:3][::-1])
        case = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
        rows.append({"case": case, **evaluate_case(pred, ref, num_classes, spacing, with_hd95=with_hd95)})
    means = write_metrics_csv(csv_path, rows) if csv_path is not None else mean_per_class(rows)
    return rows, means
