"""DICOM series as input images: finding the series of a folder, checking and reading one as a volume.

A folder that holds one series (its slices, one file each, in any file order and with any names)
is one input image. Its geometry comes from the headers, never from the file order: the slices are
sorted by their position along the slice normal (``ImagePositionPatient`` projected on the
cross product of the two ``ImageOrientationPatient`` directions), and the series is refused,
naming it, when

* the folder holds several series (the message lists each: UID, description, slice count);
* the slices have different orientations or sizes, or two slices share a position;
* the slice spacing is uneven (the message says how many slices look missing where the gaps are
  whole multiples of the usual one), or the slices do not line up along their normal (gantry tilt);
* it is a single 2D image.

SimpleITK's GDCM reader then reads the slices in that order (rescale slope/intercept applied: CT in
HU). A single multi-frame file (enhanced DICOM) is read as it is. Nothing here needs pydicom.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from utils.image_io import DataError, is_junk_file, sitk_reason

__all__ = [
    "DicomSeries",
    "describe_series",
    "dicom_files",
    "find_series",
    "looks_like_dicom",
    "read_series",
    "series_slices",
]

#: DICOM tags, as SimpleITK's metadata keys name them
TAG_SERIES_UID = "0020|000e"
TAG_DESCRIPTION = "0008|103e"
TAG_MODALITY = "0008|0060"
TAG_POSITION = "0020|0032"
TAG_ORIENTATION = "0020|0037"
TAG_SOP_UID = "0008|0018"


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder.

    Attributes:
        uid: SeriesInstanceUID.
        description: SeriesDescription ("" when absent).
        modality: Modality (``CT``, ``MR``, ...; "" when absent).
        folder: the folder holding its files.
        files: its files, as GDCM lists them (use :func:`series_slices` for the checked slice order).
    """

    uid: str
    description: str
    modality: str
    folder: Path
    files: tuple[Path, ...]

    @property
    def n_files(self) -> int:
        return len(self.files)

    def label(self) -> str:
        """``UID ("description", N files)`` for messages."""
        desc = f'"{self.description}", ' if self.description else ""
        return f"{self.uid} ({desc}{self.n_files} file(s))"


def looks_like_dicom(path: str | os.PathLike[str]) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble (hidden files never count)."""
    p = Path(path)
    if is_junk_file(p) or not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The DICOM files directly inside ``folder`` (sorted by name)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if looks_like_dicom(p))


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DataError(path, f"not a readable DICOM file ({sitk_reason(e)})") from e
    return reader


def find_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """Every DICOM series directly inside ``folder`` (not its subfolders), sorted by UID.

    Raises:
        DataError: GDCM cannot scan the folder.
    """
    root = Path(folder)
    if not dicom_files(root):
        return []
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(root))
    except RuntimeError as e:
        raise DataError(root, f"cannot scan the DICOM files ({sitk_reason(e)})") from e
    out = []
    for uid in sorted(uids):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(root), uid)
        paths = tuple(Path(f) for f in files if not is_junk_file(f))
        if not paths:
            continue
        head = _header(paths[0])
        out.append(
            DicomSeries(
                uid=uid,
                description=_tag(head, TAG_DESCRIPTION),
                modality=_tag(head, TAG_MODALITY),
                folder=root,
                files=paths,
            )
        )
    return out


def describe_series(series: Sequence[DicomSeries]) -> str:
    """One line per series: ``UID ("description", N file(s))``."""
    return "; ".join(s.label() for s in series)


def _floats(text: str, n: int, path: Path, what: str) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in text.replace(",", "\\").split("\\") if v.strip()])
    except ValueError:
        values = np.asarray([])
    if values.size != n:
        raise DataError(path, f"{what} missing or malformed ({text!r}): not a slice of a 3D series")
    return values


def series_slices(series: DicomSeries) -> tuple[list[Path], float]:
    """The series' files in slice order (along the slice normal) and the slice spacing (mm).

    Raises:
        DataError: naming the series: different orientations or sizes, slices at the same
            position, uneven spacing or missing slices, gantry tilt, a single 2D slice.
    """
    where = f"DICOM series {series.label()} in {series.folder}"
    if series.n_files == 1:
        return [series.files[0]], 0.0
    positions, orientation, size = [], None, None
    for path in series.files:
        head = _header(path)
        iop = _floats(_tag(head, TAG_ORIENTATION), 6, path, "ImageOrientationPatient")
        ipp = _floats(_tag(head, TAG_POSITION), 3, path, "ImagePositionPatient")
        slice_size = tuple(head.GetSize()[:2])
        if orientation is None:
            orientation, size = iop, slice_size
        elif not np.allclose(iop, orientation, atol=1e-4):
            raise DataError(
                series.folder, f"{where}: the slices have different orientations (a localizer mixed in?)"
            )
        elif slice_size != size:
            raise DataError(
                series.folder, f"{where}: the slices have different sizes ({size} and {slice_size})"
            )
        positions.append(ipp)
    assert orientation is not None
    normal = np.cross(orientation[:3], orientation[3:])
    pos = np.asarray(positions)
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    dup = int(np.sum(gaps <= 1e-4))
    if dup:
        raise DataError(
            series.folder,
            f"{where}: {dup} slice(s) share a position with another (duplicate files, or several "
            "acquisitions in one series?); give one volume",
        )
    spacing = float(np.median(gaps))
    tol = max(0.01, 0.01 * spacing)
    if np.any(np.abs(gaps - spacing) > tol):
        steps = gaps / spacing
        whole = np.abs(steps - np.rint(steps)) * spacing <= tol
        if np.all(whole):
            missing = int(np.sum(np.rint(steps) - 1))
            at = [f"{along[i]:.2f}..{along[i + 1]:.2f} mm" for i in np.flatnonzero(np.rint(steps) > 1)][:5]
            raise DataError(
                series.folder,
                f"{where}: {missing} slice(s) missing (slice spacing {spacing:g} mm, gaps between "
                f"{', '.join(at)} along the slice normal); give the complete series",
            )
        raise DataError(
            series.folder,
            f"{where}: uneven slice spacing (gaps from {gaps.min():g} to {gaps.max():g} mm); a volume needs "
            "equally spaced slices: resample it first",
        )
    # every slice must sit on the line through the first one along the normal (no gantry tilt)
    offsets = pos[order] - pos[order[0]]
    sideways = offsets - np.outer(offsets @ normal, normal)
    if np.any(np.linalg.norm(sideways, axis=1) > max(0.01, 0.05 * spacing)):
        raise DataError(
            series.folder,
            f"{where}: the slices do not line up along their normal (gantry tilt?); resample the series first",
        )
    return [series.files[int(i)] for i in order], spacing


def read_series(series: DicomSeries, pixel_type: int = sitk.sitkFloat32) -> tuple[sitk.Image, list[Path]]:
    """Check a series (:func:`series_slices`) and read it as one 3D image.

    Returns:
        ``(image, files)``: the volume (z axis = the files' order, geometry from the headers) and
        the files in that order (slice ``k`` of the image is ``files[k]``).

    Raises:
        DataError: naming the series and what is wrong.
    """
    files, spacing = series_slices(series)
    where = f"DICOM series {series.label()} in {series.folder}"
    try:
        if len(files) == 1:
            image = sitk.ReadImage(str(files[0]), pixel_type, imageIO="GDCMImageIO")
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetImageIO("GDCMImageIO")
            reader.SetFileNames([str(f) for f in files])
            reader.SetOutputPixelType(pixel_type)
            image = reader.Execute()
    except RuntimeError as e:
        raise DataError(series.folder, f"{where}: cannot read the slices ({sitk_reason(e)})") from e
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and image.GetSize()[2] == 1):
        raise DataError(series.folder, f"{where}: a single 2D image, not a volume")
    if spacing and not np.isclose(image.GetSpacing()[2], spacing, rtol=1e-3, atol=1e-3):
        raise DataError(
            series.folder,
            f"{where}: the reader's slice spacing {image.GetSpacing()[2]:g} mm differs from the slice positions' "
            f"{spacing:g} mm",
        )
    return image, files
