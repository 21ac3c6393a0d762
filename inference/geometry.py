"""Putting a label map back into the original image geometry and writing it as NIfTI.

The preprocessed arrays of a case live in a cropped, resampled grid (see ``docs/formats.md``):
the original image was cropped to ``crop_box`` (half-open, original voxel indices, (z, y, x)) and
the crop resampled to ``resampled_shape`` on the sidecar's ``resample_grid``. Undoing that for a
label map means

1. nearest-neighbour resampling of the (z, y, x) label map to the crop box size, the inverse of the
   grid the case was made on:

   * ``"original"`` (the original's ``resample2fixedSize``): SimpleITK nearest neighbour from a
     grid of the target spacing to one of the original spacing (neither rounded), both at the
     image file's origin and direction: crop voxel ``i`` takes label voxel
     ``floor(i * original_spacing / target_spacing + 0.5)`` (ties decided by SimpleITK's
     floating point in physical coordinates, hence the same origin and direction), 0 beyond the
     label map;
   * ``"centred"`` (sidecars without ``resample_grid`` too): voxel centres aligned,
     :func:`utils.preprocessing.resize_nearest`;

2. pasting it into a zero volume of ``original_shape``,
3. writing it with the original spacing, origin and direction (from the sidecar).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import SimpleITK as sitk

from utils.io_utils import atomic_write_nifti
from utils.preprocessing import resample_grid_of, resize_nearest


def restore_to_original(label: np.ndarray, sidecar: Mapping[str, Any]) -> np.ndarray:
    """Undo crop + resampling for a label map.

    Args:
        label: (z, y, x) label map in the preprocessed grid (``resampled_shape``).
        sidecar: the case sidecar dict (keys ``original_shape``, ``crop_box``, ``resample_grid``;
            for the original grid also ``target_spacing``, ``original_spacing_xyz``,
            ``origin_xyz``, ``direction``).

    Returns:
        uint8 (z, y, x) label map of ``original_shape``; zero outside the crop box.
    """
    original_shape = tuple(int(s) for s in sidecar["original_shape"])
    box = [(int(a), int(b)) for a, b in sidecar["crop_box"]]
    if len(original_shape) != 3 or len(box) != 3:
        raise ValueError(f"sidecar has original_shape={original_shape}, crop_box={box}; expected 3D")
    crop_shape = tuple(b - a for a, b in box)
    if any(s <= 0 for s in crop_shape) or any(
        a < 0 or b > n for (a, b), n in zip(box, original_shape, strict=True)
    ):
        raise ValueError(f"crop_box {box} does not fit original_shape {original_shape}")
    if label.ndim != 3:
        raise ValueError(f"label map must be (z, y, x), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError("label values must be in 0..255 to be written as uint8")
    label = label.astype(np.uint8, copy=False)
    if resample_grid_of(sidecar) == "original":
        crop = resample_to_crop(label, sidecar, crop_shape)
    else:
        crop = resize_nearest(label, crop_shape)
    out = np.zeros(original_shape, dtype=np.uint8)
    out[box[0][0] : box[0][1], box[1][0] : box[1][1], box[2][0] : box[2][1]] = crop
    return out


def resample_to_crop(
    label: np.ndarray, sidecar: Mapping[str, Any], crop_shape: tuple[int, ...]
) -> np.ndarray:
    """The original grid's way back: a (z, y, x) label map of the target spacing resampled (nearest,
    SimpleITK) to ``crop_shape`` voxels of the original spacing, both grids at the image file's
    origin and direction, 0 beyond the label map. Returns uint8 ``crop_shape``."""
    spacing, origin, direction = _geometry_3d(sidecar)
    target_xyz = [float(s) for s in sidecar["target_spacing"]][::-1]
    if len(target_xyz) != 3:
        raise ValueError(f"sidecar target_spacing must hold 3 values, got {sidecar['target_spacing']!r}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(label, dtype=np.uint8))
    image.SetOrigin(origin)
    image.SetSpacing(target_xyz)
    image.SetDirection(direction)
    out = sitk.Resample(
        image,
        [int(s) for s in crop_shape[::-1]],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        origin,
        spacing,
        direction,
        0.0,
        sitk.sitkUInt8,
    )
    return sitk.GetArrayFromImage(out)


def _geometry_3d(sidecar: Mapping[str, Any]) -> tuple[list[float], list[float], list[float]]:
    """Spacing, origin (x, y, z) and 3x3 row-major direction from a sidecar.

    Tolerates 4D geometry (spacing of 4, direction of 16), keeping the spatial 3x3 block.
    """
    spacing = [float(s) for s in sidecar["original_spacing_xyz"]]
    origin = [float(s) for s in sidecar["origin_xyz"]]
    direction = [float(d) for d in sidecar["direction"]]
    if len(direction) == 16:
        d4 = np.asarray(direction).reshape(4, 4)
        direction = d4[:3, :3].ravel().tolist()
    if len(spacing) < 3 or len(origin) < 3 or len(direction) != 9:
        raise ValueError(
            f"sidecar geometry is not 3D: spacing={spacing}, origin={origin}, direction of {len(direction)}"
        )
    return spacing[:3], origin[:3], direction


def label_to_sitk(label: np.ndarray, sidecar: Mapping[str, Any]) -> sitk.Image:
    """Wrap an original-shape (z, y, x) label map as a uint8 SimpleITK image with the sidecar geometry."""
    original_shape = tuple(int(s) for s in sidecar["original_shape"])
    if tuple(label.shape) != original_shape:
        raise ValueError(f"label shape {label.shape} differs from original_shape {original_shape}")
    spacing, origin, direction = _geometry_3d(sidecar)
    img = sitk.GetImageFromArray(np.ascontiguousarray(label, dtype=np.uint8))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def write_label_nifti(
    label: np.ndarray,
    sidecar: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    restore: bool = True,
) -> np.ndarray:
    """Write a predicted label map as a uint8 NIfTI in the original geometry.

    Args:
        label: (z, y, x) label map, in the preprocessed grid (``restore=True``) or already in the
            original shape (``restore=False``).
        sidecar: the case sidecar (``original_shape``, ``crop_box``, ``original_spacing_xyz``,
            ``origin_xyz``, ``direction``).
        path: output file (``.nii.gz``), written atomically.

    Returns:
        the uint8 (z, y, x) label map in the original shape, as written.
    """
    full = restore_to_original(label, sidecar) if restore else np.asarray(label, dtype=np.uint8)
    atomic_write_nifti(label_to_sitk(full, sidecar), path)
    return full


def sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    """The 4x4 voxel (i, j, k) -> RAS world affine of a SimpleITK image, as nibabel reports it.

    SimpleITK works in LPS; NIfTI/nibabel in RAS, hence the sign flip of the first two rows.
    """
    ndim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)[:3, :3]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
