"""Reading image files of every supported format, with the checks that catch broken files.

Supported files (SimpleITK reads them all; the geometry comes from their headers):

=============  =========  ===================================================================
suffix         format     checked before the voxels are used
=============  =========  ===================================================================
``.nii.gz``    NIfTI      the whole (compressed) stream is read once: truncation, CRC errors
``.nii``       NIfTI      and NaN/Inf voxels (:func:`check_nifti_integrity`)
``.mha``       MetaImage  the header is read first; voxel data that does not read whole
``.mhd``       MetaImage  (``.raw``/``.zraw`` beside it) is reported as truncated or corrupt
``.nrrd``      NRRD       (the readers refuse short data: their error is turned into a message)
=============  =========  ===================================================================

After reading, every format goes through the same value checks (NaN/Inf, an all-zero modality:
:func:`utils.decathlon.check_image_values`). A file of any other suffix is refused with a message
that lists the supported ones. DICOM series (folders) are read by :mod:`utils.dicom_series`.

Arrays are (z, y, x); geometry is SimpleITK's (x, y, z) order, as in ``docs/formats.md``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from utils.triples import float3

__all__ = [
    "FORMAT_NAMES",
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "DataError",
    "Geometry",
    "check_file_integrity",
    "check_nifti_integrity",
    "geometry_from_sitk",
    "image_format",
    "image_suffix",
    "is_image_file",
    "is_junk_file",
    "load_nifti",
    "read_file_geometry",
    "read_sitk_file",
    "sitk_reason",
    "stored_datatype",
    "strip_image_suffix",
    "unsupported_file_reason",
]

#: supported suffix -> format name (longest suffix first: ``.nii.gz`` before ``.nii``)
IMAGE_FORMATS: Mapping[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".mha": "mha",
    ".mhd": "mhd",
    ".nrrd": "nrrd",
}
IMAGE_SUFFIXES = tuple(IMAGE_FORMATS)
#: human names of the formats, for messages
FORMAT_NAMES: Mapping[str, str] = {"nifti": "NIfTI", "mha": "MetaImage", "mhd": "MetaImage", "nrrd": "NRRD"}
#: output format -> the suffix a label map of that format is written with. ``.mhd`` inputs get ``.mha``
#: outputs: the same MetaImage format in one file (a ``.mhd`` header names its ``.raw`` data file, which an
#: atomic write under a temporary name would break).
OUTPUT_SUFFIXES: Mapping[str, str] = {"nifti": ".nii.gz", "mha": ".mha", "mhd": ".mha", "nrrd": ".nrrd"}
_SUPPORTED_TEXT = ", ".join(IMAGE_SUFFIXES)


class DataError(ValueError):
    """A case that cannot be processed; ``path`` names the offending file, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class Geometry:
    """Spatial geometry of a (3D or 4D) image.

    ``size_zyx`` is the spatial array shape; ``spacing_xyz``, ``origin_xyz`` and ``direction``
    (9 floats, row-major) are SimpleITK's, restricted to the three spatial axes;
    ``n_modalities`` is the length of the 4th axis (1 for 3D files), or the number of channel files.
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


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------


def is_junk_file(path: str | os.PathLike[str]) -> bool:
    """True for files that are not images: ``._*`` resource forks and other hidden files."""
    return Path(path).name.startswith(".")


def image_suffix(path: str | os.PathLike[str]) -> str | None:
    """The supported suffix a file name ends with (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``;
    case-insensitive, returned in lower case), or None."""
    name = Path(path).name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def image_format(path: str | os.PathLike[str]) -> str | None:
    """``"nifti"``, ``"mha"``, ``"mhd"``, ``"nrrd"`` from the file name, or None (unsupported)."""
    suffix = image_suffix(path)
    return IMAGE_FORMATS[suffix] if suffix else None


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """A supported image file name that is not hidden (``._*`` resource forks are skipped)."""
    return image_suffix(path) is not None and not is_junk_file(path)


def strip_image_suffix(name: str | os.PathLike[str]) -> str:
    """File name without its supported suffix (``liver_001.nii.gz`` -> ``liver_001``); other names as they are."""
    text = Path(name).name
    suffix = image_suffix(text)
    return text[: -len(suffix)] if suffix else text


def unsupported_file_reason(path: str | os.PathLike[str]) -> str:
    """Why a file is not read, for messages: its suffix and what is supported."""
    p = Path(path)
    ext = "".join(p.suffixes[-2:]) if p.suffixes else "(none)"
    return (
        f"unsupported file type {ext}: images must be {_SUPPORTED_TEXT} files, or a folder holding one "
        "DICOM series"
    )


# ---------------------------------------------------------------------------------------------
# NIfTI integrity (the whole stream)
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


def check_file_integrity(path: str | os.PathLike[str]) -> None:
    """The format's up-front check: the NIfTI stream check; for MetaImage and NRRD files, whose readers
    refuse short or corrupt data themselves, that the file exists and its header reads.

    Raises:
        DataError: missing file, unsupported suffix, or a file that is broken.
    """
    path = Path(path)
    fmt = image_format(path)
    if fmt is None:
        raise DataError(path, unsupported_file_reason(path))
    if fmt == "nifti":
        check_nifti_integrity(path)
        return
    _read_header(path)
    if fmt == "mhd":
        data = _mhd_data_file(path)
        if data is not None and not data.is_file():
            raise DataError(path, f"its voxel data file {data.name} is missing: copy it next to the header")


def _mhd_data_file(path: Path) -> Path | None:
    """The separate data file a ``.mhd`` header names (``ElementDataFile = x.raw``); None for
    ``LOCAL`` data or file lists/patterns (left to the reader)."""
    try:
        with open(path, encoding="latin-1") as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "ElementDataFile":
                    name = value.strip()
                    if (
                        name.upper() == "LOCAL"
                        or name.upper().startswith("LIST")
                        or " " in name
                        or "%" in name
                    ):
                        return None
                    return path.parent / name
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def sitk_reason(e: Exception) -> str:
    """The useful last line of a SimpleITK exception message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _format_name(path: Path) -> str:
    fmt = image_format(path)
    return FORMAT_NAMES.get(fmt, "image") if fmt else "image"


def _read_header(path: Path) -> sitk.ImageFileReader:
    if not path.is_file():
        raise DataError(path, "file not found")
    if image_format(path) is None:
        raise DataError(path, unsupported_file_reason(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        name = _format_name(path)
        raise DataError(
            path,
            f"not a readable {name} file ({sitk_reason(e)}): is it really {name}? re-export or copy it again",
        ) from e
    return reader


def geometry_from_sitk(image: sitk.Image | sitk.ImageFileReader) -> Geometry:
    """Geometry of a 3D or 4D SimpleITK image (or of a reader after ``ReadImageInformation``).

    Raises:
        ValueError: not 3D/4D.
    """
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


def read_file_geometry(path: str | os.PathLike[str]) -> Geometry:
    """Geometry of one image file from its header only (fast; no voxel data is read).

    Raises:
        DataError: the file is missing, of an unsupported type, its header cannot be read, or it is
            not 3D/4D.
    """
    path = Path(path)
    reader = _read_header(path)
    dim = reader.GetDimension()
    if dim not in (3, 4):
        raise DataError(path, f"expected a 3D or 4D image, found {dim}D of size {reader.GetSize()}")
    return geometry_from_sitk(reader)


#: SimpleITK scalar pixel types -> NumPy type names (for reports)
_PIXEL_NAMES = {
    sitk.sitkUInt8: "uint8",
    sitk.sitkInt8: "int8",
    sitk.sitkUInt16: "uint16",
    sitk.sitkInt16: "int16",
    sitk.sitkUInt32: "uint32",
    sitk.sitkInt32: "int32",
    sitk.sitkUInt64: "uint64",
    sitk.sitkInt64: "int64",
    sitk.sitkFloat32: "float32",
    sitk.sitkFloat64: "float64",
}


def stored_datatype(path: str | os.PathLike[str]) -> str:
    """The voxel type an image file stores, as a NumPy name (``int16``), from its header.

    Raises:
        DataError: as :func:`read_file_geometry`.
    """
    reader = _read_header(Path(path))
    return _PIXEL_NAMES.get(reader.GetPixelID(), sitk.GetPixelIDValueAsString(reader.GetPixelID()))


def read_sitk_file(
    path: str | os.PathLike[str], pixel_type: int | None = None, *, verify: bool = True
) -> sitk.Image:
    """Read one image file of a supported format with SimpleITK.

    Args:
        path: the file.
        pixel_type: SimpleITK pixel type to read as (None: as stored).
        verify: run the format's up-front check first (:func:`check_file_integrity`; for NIfTI it
            decompresses the file once more).

    Raises:
        DataError: missing file, unsupported suffix, broken header, or voxel data that does not read
            (truncated or corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    fmt = image_format(path)
    if fmt is None:
        raise DataError(path, unsupported_file_reason(path))
    if verify:
        check_file_integrity(path)
    try:
        if pixel_type is None:
            return sitk.ReadImage(str(path))
        return sitk.ReadImage(str(path), pixel_type)
    except RuntimeError as e:
        if fmt == "nifti":
            raise DataError(path, f"cannot read image ({sitk_reason(e)})") from e
        _read_header(path)  # raises "not a readable ..." when even the header is broken
        raise DataError(
            path,
            f"the header reads but the voxel data does not: truncated or corrupt {_format_name(path)} file "
            f"(an interrupted copy or download?); copy the file again (reader: {sitk_reason(e)})",
        ) from e
