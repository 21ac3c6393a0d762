"""Reading Medical Segmentation Decathlon (MSD) tasks: ``dataset.json`` and NIfTI images.

Layout (docs/paper_preset.md, "Data")::

    <dataset_dir>/TaskXX_Name/dataset.json
    <dataset_dir>/TaskXX_Name/imagesTr/*.nii.gz   # 3D, or 4D with the modalities on the 4th axis
    <dataset_dir>/TaskXX_Name/labelsTr/*.nii.gz
    <dataset_dir>/TaskXX_Name/imagesTs/*.nii.gz

Arrays are returned in (z, y, x) order (images with a leading modality axis), geometry in
SimpleITK's (x, y, z) order, as in ``docs/formats.md``. Files named ``._*`` (macOS resource forks
found in the MSD archives) are never treated as images.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from utils.io_utils import read_json
from utils.triples import float3

NIFTI_SUFFIXES = (".nii.gz", ".nii")

__all__ = [
    "CaseEntry",
    "DataError",
    "DecathlonTask",
    "Geometry",
    "apply_label_map",
    "case_id_from_path",
    "check_image_values",
    "check_nifti_integrity",
    "check_same_geometry",
    "find_tasks",
    "is_junk_file",
    "load_nifti",
    "load_task",
    "read_geometry",
    "read_image",
    "read_label",
]


class DataError(ValueError):
    """A case that cannot be processed; ``path`` names the offending file, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class CaseEntry:
    """One case of a task: its id (image file name without ``.nii.gz``) and file paths."""

    case_id: str
    image: Path
    label: Path | None = None


@dataclass(frozen=True)
class DecathlonTask:
    """A parsed ``dataset.json``.

    Attributes:
        name: task folder name, e.g. ``Task04_Hippocampus``.
        root: the task folder.
        modalities: modality names in channel order (``dataset.json`` "modality").
        labels: raw label value -> name (``dataset.json`` "labels").
        training: training cases (image + label).
        test: test cases (image only).
    """

    name: str
    root: Path
    modalities: tuple[str, ...]
    labels: Mapping[int, str]
    training: tuple[CaseEntry, ...]
    test: tuple[CaseEntry, ...]


@dataclass(frozen=True)
class Geometry:
    """Spatial geometry of a (3D or 4D) NIfTI file.

    ``size_zyx`` is the spatial array shape; ``spacing_xyz``, ``origin_xyz`` and ``direction``
    (9 floats, row-major) are SimpleITK's, restricted to the three spatial axes;
    ``n_modalities`` is the length of the 4th axis (1 for 3D files).
    """

    size_zyx: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]
    n_modalities: int = 1

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel spacing in (z, y, x) order (mm)."""
        x, y, z = self.spacing_xyz
        return (z, y, x)

    def as_dict(self) -> dict[str, Any]:
        """The sidecar keys of ``docs/formats.md`` that describe the original geometry."""
        return {
            "original_shape": list(self.size_zyx),
            "original_spacing_xyz": list(self.spacing_xyz),
            "origin_xyz": list(self.origin_xyz),
            "direction": list(self.direction),
        }


def is_junk_file(path: str | os.PathLike[str]) -> bool:
    """True for files that are not images: ``._*`` resource forks and other hidden files."""
    return Path(path).name.startswith(".")


def case_id_from_path(path: str | os.PathLike[str]) -> str:
    """Case id = file name without ``.nii.gz`` / ``.nii`` (``hippocampus_001``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_tasks(dataset_dir: str | os.PathLike[str]) -> list[Path]:
    """Every ``Task*`` folder of ``dataset_dir`` that holds a ``dataset.json``, sorted by name."""
    root = Path(dataset_dir)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("Task") and (p / "dataset.json").is_file()
    )


def _resolve(root: Path, rel: str) -> Path:
    return (root / rel).resolve() if not os.path.isabs(rel) else Path(rel)


def _label_path_for(root: Path, image: Path) -> Path:
    return root / "labelsTr" / image.name


def load_task(task_dir: str | os.PathLike[str]) -> DecathlonTask:
    """Parse ``<task_dir>/dataset.json``.

    ``training`` entries are ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``
    (a missing "label" key means ``labelsTr/<same name>``); ``test`` entries are strings or
    ``{"image": ...}`` dicts. Entries whose file name starts with ``._`` are skipped. Paths are
    resolved against the task folder; whether the files exist is checked when a case is read.

    Raises:
        DataError: ``dataset.json`` is missing, not JSON, or lacks "modality"/"labels".
    """
    root = Path(task_dir).resolve()
    meta_path = root / "dataset.json"
    try:
        meta = read_json(meta_path)
    except FileNotFoundError as e:
        raise DataError(meta_path, "dataset.json not found") from e
    except ValueError as e:
        raise DataError(meta_path, f"not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "modality" not in meta or "labels" not in meta:
        raise DataError(meta_path, 'dataset.json needs "modality" and "labels"')
    try:
        modalities = tuple(str(v) for _, v in sorted(meta["modality"].items(), key=lambda kv: int(kv[0])))
        labels = {int(k): str(v) for k, v in sorted(meta["labels"].items(), key=lambda kv: int(kv[0]))}
    except (AttributeError, ValueError) as e:
        raise DataError(meta_path, f'"modality"/"labels" must map integer strings to names ({e})') from e

    training: list[CaseEntry] = []
    for entry in meta.get("training", []) or []:
        if isinstance(entry, str):
            image, label = _resolve(root, entry), None
        else:
            image = _resolve(root, entry["image"])
            label = _resolve(root, entry["label"]) if entry.get("label") else None
        if is_junk_file(image):
            continue
        training.append(CaseEntry(case_id_from_path(image), image, label or _label_path_for(root, image)))

    test: list[CaseEntry] = []
    for entry in meta.get("test", []) or []:
        image = _resolve(root, entry if isinstance(entry, str) else entry["image"])
        if is_junk_file(image):
            continue
        test.append(CaseEntry(case_id_from_path(image), image, None))

    return DecathlonTask(
        name=root.name,
        root=root,
        modalities=modalities,
        labels=labels,
        training=tuple(sorted(training, key=lambda c: c.case_id)),
        test=tuple(sorted(test, key=lambda c: c.case_id)),
    )


# ---------------------------------------------------------------------------------------------
# NIfTI reading
# ---------------------------------------------------------------------------------------------


def load_nifti(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    """``nibabel.load`` of a NIfTI file (NIfTI-2 images are a subclass); TypeError for other formats."""
    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image):
        raise TypeError(f"not a NIfTI image: nibabel reads it as {type(img).__name__}")
    return img


class _NonFiniteCounter:
    """Counts NaN/Inf values in the voxel bytes of a NIfTI stream fed chunk by chunk.

    Args:
        offset: where the voxel data starts (header + extensions), in bytes.
        dtype: the stored voxel type (with its byte order); only floating types are checked.
    """

    def __init__(self, offset: int, dtype: np.dtype) -> None:
        self.skip = offset
        self.dtype = dtype
        self.check = dtype.kind in "fc"
        self.carry = b""
        self.seen = 0  # voxels checked so far
        self.count = 0
        self.first = -1  # flat index (NIfTI order: x fastest) of the first NaN/Inf

    def feed(self, chunk: bytes) -> None:
        if not self.check:
            return
        if self.skip:
            cut = min(self.skip, len(chunk))
            chunk, self.skip = chunk[cut:], self.skip - cut
        data = self.carry + chunk
        n = len(data) // self.dtype.itemsize * self.dtype.itemsize
        values = np.frombuffer(data[:n], dtype=self.dtype)
        self.carry = data[n:]
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            if self.first < 0:
                self.first = self.seen + int(bad[0])
            self.count += int(bad.size)
        self.seen += values.size


def check_nifti_integrity(path: str | os.PathLike[str]) -> None:
    """Make sure a NIfTI file holds all the voxel data its header announces, all of it finite.

    SimpleITK silently reads a truncated ``.nii.gz`` (missing voxels become garbage or zeros) and
    turns NaN/Inf voxels into 0, so the whole file is read once here: this catches truncation (end
    of stream missing, or fewer bytes than header offset + voxel bytes), corruption (CRC mismatch)
    and NaN/Inf values of floating-point images.

    Raises:
        DataError: the file is missing, not NIfTI, truncated or corrupt, or holds NaN/Inf voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        nifti = load_nifti(path)
        header = nifti.header
        shape = header.get_data_shape()
        dtype = np.dtype(header.get_data_dtype())
        # where the voxels start on disk (the image's header copy says 0)
        offset = int(getattr(nifti.dataobj, "offset", header.get_data_offset()))
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a readable NIfTI"
        raise DataError(
            path, f"not a readable NIfTI file ({type(e).__name__}: {e}); convert the image to NIfTI (.nii.gz)"
        ) from e
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    counter = _NonFiniteCounter(offset, dtype)
    total = 0
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
                counter.feed(chunk)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(
            path,
            f"truncated or corrupt gzip stream ({type(e).__name__}: {e}): an interrupted copy or "
            "download? copy the file again",
        ) from e
    if total < expected:
        raise DataError(
            path,
            f"truncated: header announces {expected} bytes of data, file holds {total} (an interrupted copy "
            "or download?); copy the file again",
        )
    if counter.count:
        where = np.unravel_index(counter.first, shape, order="F")  # NIfTI: (x, y, z[, modality])
        zyx = f"(z, y, x) = ({where[2]}, {where[1]}, {where[0]})" if len(where) >= 3 else str(where)
        mod = f" of modality {where[3]}" if len(where) >= 4 else ""
        raise DataError(
            path,
            f"{counter.count} voxel(s) are NaN or Inf (the first at {zyx}{mod}): a broken conversion or "
            "export; fix or re-export the image",
        )


def _geometry_from_image(image: sitk.Image) -> Geometry:
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 3:
        direction = tuple(float(d) for d in image.GetDirection())
        n_mod = 1
    elif dim == 4:
        direction = tuple(float(d) for d in np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3].ravel())
        n_mod = int(size[3])
    else:
        raise ValueError(f"{dim}D image")
    return Geometry(
        size_zyx=(int(size[2]), int(size[1]), int(size[0])),
        spacing_xyz=float3(image.GetSpacing()[:3]),
        origin_xyz=float3(image.GetOrigin()[:3]),
        direction=direction,
        n_modalities=n_mod,
    )


def read_geometry(path: str | os.PathLike[str]) -> Geometry:
    """Geometry from the header only (fast; no voxel data is read).

    Raises:
        DataError: the file is missing or its header cannot be read, or it is not 3D/4D.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DataError(path, f"cannot read NIfTI header ({_sitk_reason(e)})") from e
    dim = reader.GetDimension()
    size = reader.GetSize()
    if dim not in (3, 4):
        raise DataError(path, f"expected a 3D or 4D image, found {dim}D of size {size}")
    if dim == 3:
        direction = tuple(float(d) for d in reader.GetDirection())
        n_mod = 1
    else:
        direction = tuple(float(d) for d in np.asarray(reader.GetDirection()).reshape(4, 4)[:3, :3].ravel())
        n_mod = int(size[3])
    return Geometry(
        size_zyx=(int(size[2]), int(size[1]), int(size[0])),
        spacing_xyz=float3(reader.GetSpacing()[:3]),
        origin_xyz=float3(reader.GetOrigin()[:3]),
        direction=direction,
        n_modalities=n_mod,
    )


def _sitk_reason(e: Exception) -> str:
    """The useful last line of a SimpleITK exception message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _read_sitk(path: Path, pixel_type: int | None, verify: bool) -> sitk.Image:
    if not path.is_file():
        raise DataError(path, "file not found")
    if verify:
        check_nifti_integrity(path)
    try:
        if pixel_type is None:
            return sitk.ReadImage(str(path))
        return sitk.ReadImage(str(path), pixel_type)
    except RuntimeError as e:
        raise DataError(path, f"cannot read image ({_sitk_reason(e)})") from e


def read_image(
    path: str | os.PathLike[str],
    expected_modalities: int | Sequence[str] | None = None,
    *,
    verify: bool = True,
    task: str = "",
) -> tuple[np.ndarray, Geometry]:
    """Read a 3D or 4D NIfTI image as float32 (modality, z, y, x) and check what it holds.

    Args:
        path: the image file.
        expected_modalities: the modalities ``dataset.json`` lists (their number, or their names
            for a clearer message); a mismatch with the file (3D = 1, 4D = length of the 4th
            axis) raises.
        verify: run :func:`check_nifti_integrity` first (catches truncated files).
        task: the task's name, for messages.

    Raises:
        DataError: missing/corrupt/truncated/non-NIfTI file, not 3D/4D (e.g. a 2D slice), wrong
            modality count, NaN/Inf voxels, or a modality whose voxels are all 0.
    """
    path = Path(path)
    image = _read_sitk(path, sitk.sitkFloat32, verify)
    dim = image.GetDimension()
    if dim not in (3, 4):
        raise DataError(
            path,
            f"expected a 3D image (or 4D with the modalities on its 4th axis), found a {dim}D image of size "
            f"{image.GetSize()}: give the whole volume, not a slice",
        )
    geom = _geometry_from_image(image)
    names = (
        None if expected_modalities is None or isinstance(expected_modalities, int) else expected_modalities
    )
    n_expected = len(names) if names is not None else expected_modalities
    if n_expected is not None and geom.n_modalities != n_expected:
        kind = "a 3D image (1 modality)" if dim == 3 else f"{geom.n_modalities} modalities on its 4th axis"
        listed = f" ({', '.join(names)})" if names else ""
        of_task = f" for {task}" if task else ""
        raise DataError(
            path,
            f"image has {kind} but dataset.json lists {n_expected} modalities{listed}{of_task}: give a 3D "
            "image for a 1-modality task, else a 4D image with the modalities in that order on its 4th axis",
        )
    array = sitk.GetArrayFromImage(image)  # 3D: (z, y, x); 4D: (t, z, y, x)
    if dim == 3:
        array = array[np.newaxis]
    array = np.ascontiguousarray(array, dtype=np.float32)
    check_image_values(array, path, names)
    return array, geom


def check_image_values(
    image: np.ndarray, path: str | os.PathLike[str], modality_names: Sequence[str] | None = None
) -> None:
    """Refuse an image with NaN/Inf voxels or a modality whose voxels are all 0.

    Args:
        image: (M, z, y, x) image as read.
        path: the file, for the message.
        modality_names: names for the message (default: their numbers).

    Raises:
        DataError: naming the file, the modality and what is wrong.
    """
    for m in range(image.shape[0]):
        vol = image[m]
        which = "the image" if image.shape[0] == 1 else f"modality {m}"
        if modality_names is not None and m < len(modality_names):
            which += f" ({modality_names[m]})"
        finite = np.isfinite(vol)
        if not finite.all():
            bad = int(vol.size - np.count_nonzero(finite))
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise DataError(
                path,
                f"{bad} voxel(s) of {which} are NaN or Inf (the first at (z, y, x) = {first}): a broken "
                "conversion or export; fix or re-export the image",
            )
        if not vol.any():
            raise DataError(
                path, f"every voxel of {which} is 0: an empty or failed export; re-export the image"
            )


def read_label(path: str | os.PathLike[str], *, verify: bool = True) -> tuple[np.ndarray, Geometry]:
    """Read an integer label map (z, y, x). Float-stored labels are rounded to the nearest integer.

    Raises:
        DataError: missing/corrupt/truncated file, or not a 3D label (4D with one volume is accepted).
    """
    path = Path(path)
    image = _read_sitk(path, None, verify)
    geom = _geometry_from_image(image)
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 4:
        if array.shape[0] != 1:
            raise DataError(path, f"label is 4D with {array.shape[0]} volumes; expected 3D")
        array = array[0]
    if array.dtype.kind == "f":
        array = np.rint(array).astype(np.int32)
    return array, geom


def check_same_geometry(
    image: Geometry,
    label: Geometry,
    label_path: str | os.PathLike[str],
    *,
    rtol: float = 1e-3,
    direction_atol: float = 1e-3,
) -> None:
    """Raise unless image and label share shape, spacing, origin and direction.

    Spacing is compared relatively (``rtol``); the origin per axis within
    ``0.01 mm + rtol * max(|origin|, spacing)``; the direction cosines within ``direction_atol``.

    Raises:
        DataError: naming ``label_path`` and what differs.
    """
    if image.size_zyx != label.size_zyx:
        raise DataError(
            label_path,
            f"image and label differ in shape: image {image.size_zyx} vs label {label.size_zyx} (z, y, x)",
        )
    sp_i, sp_l = np.asarray(image.spacing_xyz), np.asarray(label.spacing_xyz)
    if not np.allclose(sp_i, sp_l, rtol=rtol, atol=1e-6):
        raise DataError(
            label_path,
            f"image and label differ in spacing: image {tuple(sp_i)} vs label {tuple(sp_l)} (x, y, z)",
        )
    o_i, o_l = np.asarray(image.origin_xyz), np.asarray(label.origin_xyz)
    tol = 0.01 + rtol * np.maximum(np.abs(o_i), sp_i)
    if np.any(np.abs(o_i - o_l) > tol):
        raise DataError(
            label_path,
            f"image and label differ in origin: image {tuple(o_i)} vs label {tuple(o_l)} (x, y, z)",
        )
    if not np.allclose(image.direction, label.direction, atol=direction_atol, rtol=0):
        raise DataError(
            label_path,
            f"image and label differ in direction: image {tuple(np.round(image.direction, 4))} "
            f"vs label {tuple(np.round(label.direction, 4))}",
        )


def apply_label_map(label: np.ndarray, label_map: Mapping[int, int] | Mapping[str, int]) -> np.ndarray:
    """Map raw label values to the classes used; any value not in ``label_map`` becomes 0.

    This is the label sanitation of docs/paper_preset.md ("Preprocessing"): with the identity map of ``dataset.json``'s
    labels, stray values such as Hippocampus' 254 become background, and ``{0:0, 1:1, 2:1}``
    fuses a tumour label into its organ.

    Returns:
        uint8 array of the same shape.
    """
    out = np.zeros(label.shape, dtype=np.uint8)
    for raw, cls in label_map.items():
        cls = int(cls)
        if cls == 0:
            continue
        if not 0 <= cls <= 255:
            raise ValueError(f"class {cls} does not fit uint8")
        out[label == int(raw)] = cls
    return out
