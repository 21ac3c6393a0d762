"""Per-case preprocessing (docs/paper_preset.md, "Preprocessing"), as plain typed functions.

For one case:

1. read the image (3D, or 4D = several modalities) and crop every modality (and the label) to the
   bounding box of the non-zero voxels of modality 0, widened by 5 voxels;
2. resample to the task's target spacing: images with cubic B-spline interpolation, labels with
   nearest neighbour (SimpleITK), on the plans' ``resample_grid``
   (:data:`utils.task_settings.RESAMPLE_GRIDS`): ``"original"`` (default,
   :func:`resample_to_spacing`) is the original's grid and pixel type: the image file's origin and
   direction, spacings rounded to 3 decimals, ``int(n * spacing / target)`` voxels, the voxel type
   of the file kept (an int16 CT stays int16, so its B-spline values are integers); ``"centred"``
   (:func:`resample_volume`) covers the crop's physical extent with aligned voxel centres, in
   float32. ``inference.geometry`` undoes whichever the sidecar names;
3. clip below -1024 (every task, or CT only with ``normalisation.ct_clip_for == "ct"``); weight
   map = (modality 0 > 0) after resampling (with the plans' ``normalisation.zero_mask ==
   "nearest"``, the zero background of the original image (zero voxels connected to its border),
   mapped with nearest neighbour, is set to 0 first, so B-spline ringing around a zero background
   does not leak into the weight map and the statistics; the paper preset uses ``"none"``);
4. clip each modality to its 2nd-98th percentile, z-score it with the mean and std of its voxels
   > 0; voxels that are 0 stay 0;
5. labels: the task's ``label_map`` (values not listed, e.g. a stray 254, become 0; tumour fused
   into organ for Liver/Pancreas).

:func:`preprocess_image` does this for an image alone (inference on new images);
:func:`preprocess_case` for an image and its label. :func:`save_case` writes the arrays and the
sidecar of ``docs/formats.md`` atomically, sidecar last.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from utils.decathlon import (
    DataError,
    Geometry,
    ImageSource,
    apply_label_map,
    check_same_geometry,
    read_image,
    read_label,
    source_case_id,
    source_paths,
)
from utils.io_utils import atomic_save_npy, atomic_write_json
from utils.task_settings import CT_CLIP_MODES, LEGACY_RESAMPLE_GRID, RESAMPLE_GRIDS, estimate_resampled_shape

__all__ = [
    "CROP_MARGIN",
    "case_files",
    "case_id_of",
    "case_is_done",
    "clip_ct",
    "crop_to_box",
    "label_class_voxels",
    "list_cases",
    "nonzero_bbox",
    "normalise_modality",
    "preprocess_arrays",
    "preprocess_case",
    "preprocess_image",
    "nearest_indices",
    "resample_grid_of",
    "resample_to_spacing",
    "resample_volume",
    "stored_dtype",
    "resize_image",
    "resize_matrix",
    "separable_resize",
    "resize_nearest",
    "save_case",
    "weight_map",
    "zero_background",
]

#: voxels added on every side of modality 0's non-zero bounding box
CROP_MARGIN = 5

Box = list[list[int]]


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------


def nonzero_bbox(volume: np.ndarray, margin: int = CROP_MARGIN) -> Box:
    """Bounding box of the non-zero voxels of a (z, y, x) volume, widened by ``margin`` voxels
    and clipped to the volume, as half-open ``[[z0, z1], [y0, y1], [x0, x1]]``.

    An all-zero volume gives the whole volume.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
    nz = volume != 0
    box: Box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(nz.any(axis=other))
        n = volume.shape[axis]
        if hits.size == 0:
            return [[0, s] for s in volume.shape]
        box.append([max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, n)])
    return box


def zero_background(volume: np.ndarray) -> np.ndarray:
    """Boolean mask of the zero background: voxels equal to 0 that are connected (6-neighbourhood)
    to the border of the (z, y, x) volume. Isolated zeros inside tissue (e.g. 0 HU in a CT) are
    not background."""
    zero = volume == 0
    if not zero.any():
        return zero
    labels, _ = ndimage.label(zero)
    faces = np.concatenate(
        [labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]
    )
    border = np.unique(faces)
    border = border[border > 0]
    if border.size == 0:
        return np.zeros_like(zero)
    return np.isin(labels, border)


def crop_to_box(volume: np.ndarray, box: Sequence[Sequence[int]]) -> np.ndarray:
    """Crop the last three axes of ``volume`` to a half-open (z, y, x) box."""
    (z0, z1), (y0, y1), (x0, x1) = box
    return volume[..., z0:z1, y0:y1, x0:x1]


def resample_to_spacing(
    volume: np.ndarray,
    spacing_zyx: Sequence[float],
    target_spacing_zyx: Sequence[float],
    *,
    origin_xyz: Sequence[float],
    direction: Sequence[float],
    is_label: bool = False,
) -> np.ndarray:
    """Resample a (z, y, x) volume to ``target_spacing_zyx`` on the original's grid (``"original"``).

    The volume (a crop) is placed at the image file's ``origin_xyz`` with its ``direction`` (3x3,
    row-major) and its spacing rounded to 3 decimals, and sampled with SimpleITK's ``Resample``
    (identity transform) on a grid with the same origin and direction, the target spacing rounded
    to 3 decimals and :func:`utils.task_settings.estimate_resampled_shape` voxels (truncated:
    output voxel ``i`` lies at input index ``i * target / spacing``, so the last input voxels may
    be dropped; an output voxel beyond the input gets 0). Origin and direction cancel out
    mathematically; they are passed as the original did so that nearest-neighbour ties (input
    index exactly k + 0.5) round the way SimpleITK rounds them in its physical coordinates.

    Images: cubic B-spline in the volume's own pixel type (an int16 volume gives int16 values:
    SimpleITK truncates the interpolated value); labels: nearest neighbour. It resamples even
    when the shape comes out unchanged.

    Returns:
        (z', y', x') array of ``volume``'s dtype.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
    if len(direction) != 9:
        raise ValueError(f"direction must be a 3x3 row-major matrix (9 values), got {len(direction)}")
    new_shape = estimate_resampled_shape(volume.shape, spacing_zyx, target_spacing_zyx, "original")
    in_spacing_xyz = [round(float(s), 3) for s in spacing_zyx][::-1]
    out_spacing_xyz = [round(float(s), 3) for s in target_spacing_zyx][::-1]
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume))
    origin = [float(v) for v in origin_xyz]
    cosines = [float(v) for v in direction]
    image.SetOrigin(origin)
    image.SetSpacing(in_spacing_xyz)
    image.SetDirection(cosines)
    out = sitk.Resample(
        image,
        list(new_shape[::-1]),
        sitk.Transform(),
        sitk.sitkNearestNeighbor if is_label else sitk.sitkBSpline,
        origin,
        out_spacing_xyz,
        cosines,
        0.0,
        image.GetPixelID(),
    )
    return sitk.GetArrayFromImage(out)


def resample_volume(
    volume: np.ndarray,
    spacing_zyx: Sequence[float],
    new_shape_zyx: Sequence[int],
    *,
    is_label: bool = False,
) -> np.ndarray:
    """Resample a (z, y, x) volume to ``new_shape_zyx`` over the same physical extent (``"centred"``).

    Both grids span ``[0, n * spacing)`` per axis with voxel centres in the middle of their
    voxels, so every output sample lies inside the input (no border fill). Images use cubic
    B-spline interpolation (float32 result), labels nearest neighbour (dtype kept); a volume
    whose shape does not change is copied. Origin and direction do not change the voxel values
    and are not needed here.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
    new_shape = tuple(int(s) for s in new_shape_zyx)
    if tuple(volume.shape) == new_shape:
        return volume.astype(volume.dtype if is_label else np.float32, copy=True)
    in_spacing_xyz = [float(s) for s in spacing_zyx][::-1]
    in_size_xyz = list(volume.shape[::-1])
    out_size_xyz = list(new_shape[::-1])
    out_spacing_xyz = [n * s / m for n, s, m in zip(in_size_xyz, in_spacing_xyz, out_size_xyz, strict=True)]
    if is_label:
        src_dtype = volume.dtype
        small = volume.size == 0 or (int(volume.min()) >= 0 and int(volume.max()) <= 255)
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.uint8 if small else np.int32))
        interpolator = sitk.sitkNearestNeighbor
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
        interpolator = sitk.sitkBSpline
    image.SetSpacing(in_spacing_xyz)
    image.SetOrigin([s / 2 for s in in_spacing_xyz])
    out = sitk.Resample(
        image,
        out_size_xyz,
        sitk.Transform(),
        interpolator,
        [s / 2 for s in out_spacing_xyz],
        out_spacing_xyz,
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )
    array = sitk.GetArrayFromImage(out)
    if is_label:
        return array.astype(src_dtype, copy=False)
    return array.astype(np.float32, copy=False)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of a nearest-neighbour resize along one axis.

    Voxel centres are aligned ("nearest-exact", i.e. ``align_corners=False``): output voxel ``i``
    takes input voxel ``floor((i + 0.5) * in_size / out_size)``.

    Returns:
        int64 array of shape (out_size,), values in [0, in_size).
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    idx = np.floor((np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size)).astype(np.int64)
    return np.clip(idx, 0, in_size - 1)


def resize_nearest(volume: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a 3D array (labels) to ``out_shape``.

    Args:
        volume: (z, y, x) array of any dtype.
        out_shape: target (z, y, x).

    Returns:
        (out_shape) array of the same dtype (a copy, even when the shape is unchanged).
    """
    if volume.ndim != 3 or len(out_shape) != 3:
        raise ValueError(
            f"resize_nearest expects a 3D volume and a 3D shape, got {volume.shape} -> {out_shape}"
        )
    out_shape = tuple(int(s) for s in out_shape)
    if tuple(volume.shape) == out_shape:
        return volume.copy()
    iz, iy, ix = (nearest_indices(i, o) for i, o in zip(volume.shape, out_shape, strict=True))
    # fancy-index one axis at a time: never materialises more than the output
    return volume[iz][:, iy][:, :, ix]


def resize_image(image: np.ndarray, shape: Sequence[int], order: int = 3) -> np.ndarray:
    """Resize every modality of an (M, z, y, x) image to ``shape`` as the original did: skimage's
    ``resize`` with spline order 3 (cubic), constant-0 border, clipping to the input range, no
    anti-aliasing (the original's scikit-image 0.14 default). Training's unified-patch resize and
    inference's whole-volume scaling both use it.

    Computed axis by axis (:func:`resize_matrix`): skimage's resize is ``scipy.ndimage.zoom`` of a
    tensor-product B-spline, a linear map that factorises over the axes, so three float64 matrix
    products give the same values (equal to skimage's float32 output; tested) 20-60x faster than
    its per-voxel 64-tap evaluation (docs/data_pipeline.md). Then the same clip as skimage's.

    Returns:
        float32 (M, *shape).
    """
    if image.ndim != 4:
        raise ValueError(f"expected an (M, z, y, x) image, got shape {image.shape}")
    out_shape = tuple(int(s) for s in shape)
    if len(out_shape) != 3 or min(out_shape) < 1:
        raise ValueError(f"expected a positive (z, y, x) shape, got {shape}")
    out = np.empty((image.shape[0], *out_shape), dtype=np.float32)
    for m in range(image.shape[0]):
        volume = np.asarray(image[m], dtype=np.float32)
        resized = separable_resize(volume.astype(np.float64), out_shape, order)
        out[m] = _clip_like_skimage(volume, resized)
    return out


@functools.lru_cache(maxsize=128)
def resize_matrix(in_size: int, out_size: int, order: int = 3) -> np.ndarray:
    """The 1-D map of skimage's resize along one axis, ``(out_size, in_size)`` float64 (read-only).

    Column ``j`` is ``scipy.ndimage.zoom`` of the unit vector ``e_j`` with skimage's arguments (spline
    ``order``, ``grid-constant`` border with 0, ``grid_mode=True``: voxel centres aligned), so the
    matrix is that zoom exactly, border handling included. Row sums below 1 are the border voxels
    that the zero padding darkens.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    eye = np.eye(in_size)
    cols = [
        ndimage.zoom(eye[j], out_size / in_size, order=order, mode="grid-constant", cval=0.0, grid_mode=True)
        for j in range(in_size)
    ]
    matrix = np.stack(cols, axis=1)
    if matrix.shape != (out_size, in_size):  # zoom's output length is round(in * factor)
        raise AssertionError(f"zoom gave {matrix.shape[0]} samples for {in_size} -> {out_size}")
    matrix.setflags(write=False)
    return matrix


def separable_resize(volume: np.ndarray, shape: Sequence[int], order: int = 3) -> np.ndarray:
    """skimage's resize (zoom, no clip) of a 3D volume by :func:`resize_matrix` along each axis
    whose size changes; computed in the volume's float dtype."""
    a = volume
    (z, y, x), (qz, qy, qx) = a.shape, (int(v) for v in shape)
    dtype = a.dtype
    if qz != z:
        a = (resize_matrix(z, qz, order).astype(dtype, copy=False) @ a.reshape(z, -1)).reshape(qz, y, x)
    if qy != y:
        a = np.matmul(resize_matrix(y, qy, order).astype(dtype, copy=False), a)
    if qx != x:
        a = a @ resize_matrix(x, qx, order).T.astype(dtype, copy=False)
    return a if a is not volume else a.copy()


def _clip_like_skimage(source: np.ndarray, resized: np.ndarray) -> np.ndarray:
    """skimage's ``clip=True`` with a constant-0 border: clip to the source's range, widened to 0 when
    0 lies outside it but inside the resized values' range."""
    lo, hi = float(source.min()), float(source.max())
    if not lo <= 0.0 <= hi and float(resized.min()) <= 0.0 <= float(resized.max()):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return np.clip(resized, lo, hi)


def clip_ct(volume: np.ndarray, minimum: float = -1024.0) -> np.ndarray:
    """Values below ``minimum`` (HU) are set to ``minimum`` (in place, in the volume's dtype; returns
    ``volume``). An integer type that cannot hold values below ``minimum`` is left alone."""
    if volume.dtype.kind in "iu" and np.iinfo(volume.dtype).min >= minimum:
        return volume
    below = volume < minimum
    if below.any():
        volume[below] = minimum
    return volume


def weight_map(modality0: np.ndarray) -> np.ndarray:
    """uint8 map, 1 where modality 0 (after resampling and CT clipping) is > 0."""
    return (modality0 > 0).astype(np.uint8)


def normalise_modality(volume: np.ndarray, percentiles: Sequence[float] = (2.0, 98.0)) -> np.ndarray:
    """Clip to the given percentiles (of the whole volume), then z-score with the mean and std of
    the voxels > 0; voxels that are 0 after clipping stay 0. Falls back to all voxels when none
    is > 0, and to std 1 for a constant volume. Returns float32."""
    v = np.array(volume, dtype=np.float32, copy=True)
    lo, hi = np.percentile(v, [float(percentiles[0]), float(percentiles[1])])
    np.clip(v, lo, hi, out=v)
    positive = v > 0
    ref = v[positive] if positive.any() else v.ravel().copy()
    del positive
    mean = float(np.add.reduce(ref, dtype=np.float64)) / ref.size
    ref -= np.float32(mean)
    std = (float(np.add.reduce(ref * ref, dtype=np.float64)) / ref.size) ** 0.5
    del ref
    if not np.isfinite(std) or std < 1e-8:
        std = 1.0
    zero = v == 0
    v -= np.float32(mean)
    v *= np.float32(1.0 / std)
    v[zero] = 0.0
    return v


def label_class_voxels(label: np.ndarray, num_classes: int) -> list[int]:
    """Voxel count per class 0..num_classes-1."""
    counts = np.bincount(label.ravel(), minlength=num_classes)[:num_classes]
    return [int(c) for c in counts]


# ---------------------------------------------------------------------------------------------
# whole cases
# ---------------------------------------------------------------------------------------------


def resample_grid_of(settings: Mapping[str, Any]) -> str:
    """The ``resample_grid`` of plans or of a case sidecar; files written before the key existed
    were made on the centred grid (:data:`utils.task_settings.LEGACY_RESAMPLE_GRID`)."""
    grid = str(settings.get("resample_grid", LEGACY_RESAMPLE_GRID))
    if grid not in RESAMPLE_GRIDS:
        raise ValueError(f"unknown resample_grid {grid!r}; expected one of {RESAMPLE_GRIDS}")
    return grid


#: SimpleITK scalar pixel types and the NumPy dtype ``GetArrayFromImage`` gives for them
_SITK_DTYPES: Mapping[int, np.dtype] = {
    sitk.sitkUInt8: np.dtype(np.uint8),
    sitk.sitkInt8: np.dtype(np.int8),
    sitk.sitkUInt16: np.dtype(np.uint16),
    sitk.sitkInt16: np.dtype(np.int16),
    sitk.sitkUInt32: np.dtype(np.uint32),
    sitk.sitkInt32: np.dtype(np.int32),
    sitk.sitkUInt64: np.dtype(np.uint64),
    sitk.sitkInt64: np.dtype(np.int64),
    sitk.sitkFloat32: np.dtype(np.float32),
    sitk.sitkFloat64: np.dtype(np.float64),
}


def stored_dtype(path: str | os.PathLike[str]) -> np.dtype | None:
    """The voxel dtype SimpleITK reads ``path`` as (from the header only), or ``None`` for a
    non-scalar type. The original resampled the image in this type."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return _SITK_DTYPES.get(reader.GetPixelID())


def _target_spacing(plans: Mapping[str, Any]) -> tuple[float, float, float]:
    ts = tuple(float(s) for s in plans["target_spacing"])
    if len(ts) != 3 or any(not s > 0 for s in ts):
        raise ValueError(f"plans target_spacing must be 3 positive numbers, got {plans['target_spacing']!r}")
    return ts


def preprocess_arrays(
    image: np.ndarray,
    geometry: Geometry,
    plans: Mapping[str, Any],
    label: np.ndarray | None = None,
    *,
    pixel_dtype: np.dtype | type | str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Preprocess arrays already in memory.

    Args:
        image: (M, z, y, x) in the original grid (float32 as :func:`utils.decathlon.read_image`
            gives it, or any real dtype).
        geometry: the image's geometry (spacing; origin and direction for the original grid).
        plans: the task's plans (``target_spacing``, ``resample_grid``, ``is_ct``, ``normalisation``,
            ``label_map``).
        label: optional raw integer (z, y, x) label in the same grid.
        pixel_dtype: the voxel type of the image file (:func:`stored_dtype`); on the original grid
            the image is resampled in it, as the original did (``None``: ``image``'s dtype).

    Returns:
        ``(image, weight, label, sidecar)``: float32 (M, z, y, x), uint8 (z, y, x), uint8
        (z, y, x) or ``None``, and the sidecar fields that depend on the arrays (``original_shape``,
        ``crop_box``, ``resampled_shape``, ``target_spacing``, ``resample_grid``, ``class_voxels``
        with a label).
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (modality, z, y, x), got shape {image.shape}")
    norm = plans.get("normalisation", {})
    percentiles = tuple(norm.get("clip_percentiles", (2, 98)))
    ct_min = float(norm.get("ct_clip_min", -1024))
    target = _target_spacing(plans)
    box = nonzero_bbox(image[0], CROP_MARGIN)
    cropped = crop_to_box(image, box)
    crop_shape = cropped.shape[1:]
    grid = resample_grid_of(plans)
    new_shape = estimate_resampled_shape(crop_shape, geometry.spacing_zyx, target, grid)
    ct_clip_for = str(norm.get("ct_clip_for", "ct"))  # plans without the key: CT only, as before it
    if ct_clip_for not in CT_CLIP_MODES:
        raise ValueError(f"unknown normalisation ct_clip_for {ct_clip_for!r}")
    clip_min = ct_clip_for == "all" or bool(plans.get("is_ct", False))

    def resample(volume: np.ndarray, is_label: bool) -> np.ndarray:
        if grid == "centred":
            return resample_volume(volume, geometry.spacing_zyx, new_shape, is_label=is_label)
        out = resample_to_spacing(
            volume,
            geometry.spacing_zyx,
            target,
            origin_xyz=geometry.origin_xyz,
            direction=geometry.direction,
            is_label=is_label,
        )
        assert out.shape == new_shape, (out.shape, new_shape)
        return out

    zero_mask = str(norm.get("zero_mask", "none"))
    if zero_mask not in ("none", "nearest"):
        raise ValueError(f"unknown normalisation zero_mask {zero_mask!r}")
    keep: np.ndarray | None = None
    if zero_mask == "nearest":  # the zero background of the original stays 0 (no B-spline ringing)
        inside = (~zero_background(cropped[0])).astype(np.uint8)
        keep = resample(inside, True).astype(bool)

    # the original grid resamples the file's own voxel type (float32 holds every int16/uint16 value)
    dtype = np.dtype(pixel_dtype) if pixel_dtype is not None and grid == "original" else None
    out = np.empty((image.shape[0], *new_shape), dtype=np.float32)
    weight: np.ndarray | None = None
    for m in range(image.shape[0]):
        vol = resample(cropped[m] if dtype is None else cropped[m].astype(dtype), False)
        if keep is not None:
            vol[~keep] = 0
        if clip_min:
            clip_ct(vol, ct_min)
        if m == 0:
            weight = weight_map(vol)
        out[m] = normalise_modality(vol, percentiles)
    assert weight is not None

    sidecar: dict[str, Any] = {
        "original_shape": [int(s) for s in image.shape[1:]],
        "crop_box": box,
        "resampled_shape": [int(s) for s in new_shape],
        "target_spacing": [float(s) for s in target],
        "resample_grid": grid,
    }
    lab_out: np.ndarray | None = None
    if label is not None:
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise ValueError(f"label shape {label.shape} differs from image shape {image.shape[1:]}")
        mapped = apply_label_map(
            crop_to_box(label, box), {int(k): int(v) for k, v in plans["label_map"].items()}
        )
        lab_out = resample(mapped, True).astype(np.uint8, copy=False)
        sidecar["class_voxels"] = label_class_voxels(lab_out, int(plans["num_classes"]))
    return out, weight, lab_out, sidecar


def _source_dtype(image_path: ImageSource) -> np.dtype | None:
    """:func:`stored_dtype` of an image file (of the first channel file); None for a DICOM series folder."""
    first = source_paths(image_path)[0]
    return stored_dtype(first) if first.is_file() else None


def _modalities(plans: Mapping[str, Any]) -> list[str]:
    return [str(m) for m in plans["modalities"]]


def _sidecar(
    case_id: str, image_path: ImageSource, geometry: Geometry, fields: Mapping[str, Any]
) -> dict[str, Any]:
    geo = geometry.as_dict()
    paths = source_paths(image_path)
    side: dict[str, Any] = {
        "case": case_id,
        "image_file": str(paths[0].resolve()),
        "original_shape": geo["original_shape"],
        "crop_box": fields["crop_box"],
        "resampled_shape": fields["resampled_shape"],
        "original_spacing_xyz": geo["original_spacing_xyz"],
        "origin_xyz": geo["origin_xyz"],
        "direction": geo["direction"],
        "target_spacing": fields["target_spacing"],
        "resample_grid": fields["resample_grid"],
    }
    if "class_voxels" in fields:
        side["class_voxels"] = fields["class_voxels"]
    if len(paths) > 1:  # a case of several channel files (nnU-Net): all of them, in channel order
        side["image_files"] = [str(p.resolve()) for p in paths]
    return side


def preprocess_image(
    image_path: ImageSource,
    plans: Mapping[str, Any],
    *,
    verify: bool = True,
    case_id: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Preprocess one raw image (3D or 4D) without a label, e.g. for inference.

    Args:
        image_path: the image file (NIfTI, MetaImage, NRRD), a folder holding one DICOM series, or
            the channel files of one case (:func:`utils.decathlon.read_image`).
        plans: the task's ``plans.json`` dict.
        verify: check the file for truncation first (decompresses it once more).
        case_id: the sidecar's case id (default: from the file name, :func:`utils.decathlon.source_case_id`).

    Returns:
        ``(image, weight, sidecar)``: float32 (M, z, y, x), uint8 (z, y, x) and the sidecar dict
        of ``docs/formats.md`` (no ``class_voxels``).

    Raises:
        DataError: unreadable/truncated/non-NIfTI file, not 3D/4D, a modality count that disagrees
            with the plans, NaN/Inf voxels or an all-zero modality (:func:`utils.decathlon.read_image`).
    """
    image, geom = read_image(image_path, _modalities(plans), verify=verify, task=str(plans.get("task", "")))
    img, weight, _, fields = preprocess_arrays(image, geom, plans, pixel_dtype=_source_dtype(image_path))
    return img, weight, _sidecar(case_id or source_case_id(image_path), image_path, geom, fields)


def preprocess_case(
    image_path: ImageSource,
    label_path: str | os.PathLike[str],
    plans: Mapping[str, Any],
    *,
    verify: bool = True,
    case_id: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Preprocess a training case (image + label); the image as :func:`preprocess_image` takes it.

    Returns:
        ``(image, label, weight, sidecar)``: float32 (M, z, y, x), uint8 (z, y, x) classes,
        uint8 (z, y, x) weight, and the sidecar dict (with ``class_voxels``).

    Raises:
        DataError: missing/unreadable/truncated image or label, image and label with different
            shape or geometry, modality count disagreeing with the plans.
    """
    label_path = Path(label_path)
    if not label_path.is_file():
        raise DataError(label_path, "label file not found")
    image, geom = read_image(image_path, _modalities(plans), verify=verify, task=str(plans.get("task", "")))
    label, lgeom = read_label(label_path, verify=verify)
    check_same_geometry(geom, lgeom, label_path)
    img, weight, lab, fields = preprocess_arrays(
        image, geom, plans, label, pixel_dtype=_source_dtype(image_path)
    )
    assert lab is not None
    return img, lab, weight, _sidecar(case_id or source_case_id(image_path), image_path, geom, fields)


# ---------------------------------------------------------------------------------------------
# output files
# ---------------------------------------------------------------------------------------------


def case_files(out_dir: str | os.PathLike[str], case_id: str, *, with_label: bool) -> dict[str, Path]:
    """Paths of a case's output files (``docs/formats.md``): image, [label], weight, sidecar."""
    d = Path(out_dir)
    files = {"image": d / f"{case_id}_image.npy"}
    if with_label:
        files["label"] = d / f"{case_id}_label.npy"
    files["weight"] = d / f"{case_id}_weight.npy"
    files["sidecar"] = d / f"{case_id}.json"
    return files


def case_is_done(out_dir: str | os.PathLike[str], case_id: str, *, with_label: bool) -> bool:
    """A case is done when its sidecar and all its arrays exist."""
    return all(p.is_file() for p in case_files(out_dir, case_id, with_label=with_label).values())


def save_case(
    out_dir: str | os.PathLike[str],
    case_id: str,
    image: np.ndarray,
    weight: np.ndarray,
    sidecar: Mapping[str, Any],
    label: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write a case atomically: arrays first, the sidecar last (it marks a finished case)."""
    files = case_files(out_dir, case_id, with_label=label is not None)
    files["sidecar"].unlink(missing_ok=True)  # an overwritten case is "not done" until finished
    atomic_save_npy(files["image"], image.astype(np.float32, copy=False))
    if label is not None:
        atomic_save_npy(files["label"], label.astype(np.uint8, copy=False))
    atomic_save_npy(files["weight"], weight.astype(np.uint8, copy=False))
    atomic_write_json(files["sidecar"], dict(sidecar))
    return files


def case_id_of(case: str | os.PathLike[str]) -> str:
    """Case id of a case prefix path ``.../train/<case>`` (the file name part)."""
    return Path(case).name


def list_cases(
    task_prep_dir: str | os.PathLike[str],
    split: str = "train",
    case_ids: Iterable[str] | None = None,
) -> list[str]:
    """Finished preprocessed cases of one task as case prefix paths ``<task_prep_dir>/<split>/<case>``.

    A case counts when its sidecar ``<case>.json`` (written last) and ``<case>_image.npy`` exist, and for
    ``split == "train"`` also ``<case>_label.npy``. Sorted by case id.

    Args:
        task_prep_dir: ``prepData/<Task>``.
        split: ``"train"`` or ``"test"``.
        case_ids: if given, keep only these cases (e.g. a fold's ``"train"`` list, see
            :func:`utils.folds.fold_case_ids`); raises ``ValueError`` when one of them is not preprocessed.
    """
    split_dir = Path(task_prep_dir) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no preprocessed split folder {split_dir}")
    found: dict[str, str] = {}
    for sidecar in split_dir.glob("*.json"):
        cid = sidecar.name[: -len(".json")]
        if cid.startswith("._"):
            continue
        if not (split_dir / f"{cid}_image.npy").is_file():
            continue
        if split == "train" and not (split_dir / f"{cid}_label.npy").is_file():
            continue
        found[cid] = str(split_dir / cid)
    if case_ids is None:
        return [found[k] for k in sorted(found)]
    wanted = sorted(set(case_ids))
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValueError(f"{len(missing)} case(s) not preprocessed in {split_dir}: {missing[:10]}")
    return [found[c] for c in wanted]
