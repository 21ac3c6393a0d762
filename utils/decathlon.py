"""Reading tasks (``dataset.json`` in the MSD or the nnU-Net v2 layout) and their images.

Two layouts, told apart by ``dataset.json`` (docs/data_pipeline.md, "Your data")::

    # Medical Segmentation Decathlon: "modality", "labels" (value -> name), "training" / "test" lists
    <dataset_dir>/Task04_Hippocampus/dataset.json
    <dataset_dir>/Task04_Hippocampus/imagesTr/hippocampus_001.nii.gz   # 3D, or 4D: modalities on axis 4
    <dataset_dir>/Task04_Hippocampus/labelsTr/hippocampus_001.nii.gz
    <dataset_dir>/Task04_Hippocampus/imagesTs/hippocampus_267.nii.gz

    # nnU-Net v2: "channel_names", "labels" (name -> value), "file_ending"; files found by name
    <dataset_dir>/Dataset004_Hippocampus/dataset.json
    <dataset_dir>/Dataset004_Hippocampus/imagesTr/hippocampus_001_0000.mha   # one file per channel
    <dataset_dir>/Dataset004_Hippocampus/labelsTr/hippocampus_001.mha
    <dataset_dir>/Dataset004_Hippocampus/imagesTs/hippocampus_267_0000.mha

Either way the task is named after its folder, its modalities are listed in channel order and its
labels map raw values to names. An nnU-Net case with several channel files is read as one
multi-modality image (the files must share their geometry). Region-based labels and ``ignore``
labels of nnU-Net are refused with a message. Images may be NIfTI, MetaImage (``.mha``/``.mhd``) or
NRRD (:mod:`utils.image_io`); :func:`read_image` also takes a folder holding one DICOM series
(:mod:`utils.dicom_series`).

Arrays are returned in (z, y, x) order (images with a leading modality axis), geometry in
SimpleITK's (x, y, z) order, as in ``docs/formats.md``. Files named ``._*`` (macOS resource forks
found in the MSD archives) are never treated as images.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import SimpleITK as sitk

from utils.dicom_series import describe_series, find_series, read_series
from utils.image_io import (
    IMAGE_SUFFIXES,
    DataError,
    Geometry,
    check_nifti_integrity,
    geometry_from_sitk,
    image_suffix,
    is_junk_file,
    load_nifti,
    read_file_geometry,
    read_sitk_file,
    strip_image_suffix,
    unsupported_file_reason,
)
from utils.io_utils import read_json

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LAYOUTS = ("msd", "nnunetv2")

#: what :func:`read_image` reads: one file (3D, or 4D with the modalities on the 4th axis), a folder
#: holding one DICOM series, or the channel files of one case (one 3D file per modality, in order)
ImageSource: TypeAlias = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

__all__ = [
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "CaseEntry",
    "DataError",
    "DecathlonTask",
    "Geometry",
    "ImageSource",
    "apply_label_map",
    "case_id_from_path",
    "channel_case",
    "check_image_values",
    "check_nifti_integrity",
    "check_same_geometry",
    "detect_layout",
    "find_tasks",
    "is_junk_file",
    "load_nifti",
    "load_task",
    "read_geometry",
    "read_image",
    "read_label",
    "source_case_id",
    "source_paths",
]

#: nnU-Net channel files: ``<case>_<4-digit channel>`` before the suffix
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseEntry:
    """One case of a task: its id and file paths.

    ``image`` is the image file (MSD) or the first channel file (nnU-Net); ``images`` lists every
    channel file of an nnU-Net case (empty for MSD); :attr:`source` is what :func:`read_image` takes.
    """

    case_id: str
    image: Path
    label: Path | None = None
    images: tuple[Path, ...] = ()

    @property
    def source(self) -> Path | tuple[Path, ...]:
        """The image file, or the channel files of a case with several."""
        return self.images if len(self.images) > 1 else self.image


@dataclass(frozen=True)
class DecathlonTask:
    """A parsed ``dataset.json`` (either layout).

    Attributes:
        name: task folder name, e.g. ``Task04_Hippocampus`` or ``Dataset004_Hippocampus``.
        root: the task folder.
        modalities: modality names in channel order (MSD "modality", nnU-Net "channel_names").
        labels: raw label value -> name.
        training: training cases (image + label).
        test: test cases (image only).
        layout: ``"msd"`` or ``"nnunetv2"``.
        file_ending: nnU-Net's ``file_ending`` (MSD: ``.nii.gz``).
    """

    name: str
    root: Path
    modalities: tuple[str, ...]
    labels: Mapping[int, str]
    training: tuple[CaseEntry, ...]
    test: tuple[CaseEntry, ...]
    layout: str = "msd"
    file_ending: str = ".nii.gz"


def case_id_from_path(path: str | os.PathLike[str]) -> str:
    """Case id = file name without its image suffix (``hippocampus_001.nii.gz`` -> ``hippocampus_001``)."""
    return strip_image_suffix(path)


def channel_case(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """``(case id, channel)`` of an nnU-Net channel file name (``la_003_0001.mha`` -> ``("la_003", 1)``),
    None when the name has no 4-digit channel number."""
    m = _CHANNEL.match(strip_image_suffix(path))
    return (m.group("case"), int(m.group("channel"))) if m else None


def source_paths(source: ImageSource) -> list[Path]:
    """The paths of an image source (one for a file or a DICOM folder, one per channel file)."""
    if isinstance(source, str | os.PathLike):
        return [Path(source)]
    return [Path(p) for p in source]


def source_case_id(source: ImageSource) -> str:
    """The case id of an image source: file name without suffix; of channel files without ``_0000``;
    a folder's name."""
    paths = source_paths(source)
    if len(paths) > 1:
        found = channel_case(paths[0])
        return found[0] if found else case_id_from_path(paths[0])
    return paths[0].name if paths[0].is_dir() else case_id_from_path(paths[0])


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------


def find_tasks(dataset_dir: str | os.PathLike[str]) -> list[Path]:
    """Every task folder of ``dataset_dir``: a subfolder (``Task*``, ``Dataset*`` or any other name, not
    hidden) that holds a ``dataset.json``, sorted by name."""
    root = Path(dataset_dir)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "dataset.json").is_file()
    )


def detect_layout(meta: Mapping[str, Any]) -> str:
    """``"nnunetv2"`` (``channel_names``) or ``"msd"`` (``modality``) from a parsed ``dataset.json``.

    Raises:
        ValueError: neither.
    """
    if "channel_names" in meta:
        return "nnunetv2"
    if "modality" in meta:
        return "msd"
    raise ValueError(
        'dataset.json is neither MSD ("modality", "labels", "training") nor nnU-Net v2 ("channel_names", '
        '"labels", "file_ending")'
    )


def _resolve(root: Path, rel: str) -> Path:
    return (root / rel).resolve() if not os.path.isabs(rel) else Path(rel)


def _label_path_for(root: Path, image: Path) -> Path:
    return root / "labelsTr" / image.name


def load_task(task_dir: str | os.PathLike[str]) -> DecathlonTask:
    """Parse ``<task_dir>/dataset.json``, MSD or nnU-Net v2 (:func:`detect_layout`).

    MSD: ``training`` entries are ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``
    (a missing "label" key means ``labelsTr/<same name>``); ``test`` entries are strings or
    ``{"image": ...}`` dicts. nnU-Net v2: the training cases are the ``labelsTr/CASE<file_ending>`` files
    with their channel files ``imagesTr/CASE_0000<file_ending>``, ...; test cases are the channel files
    of ``imagesTs/`` (or the ``"dataset"`` entry's files where there is one). Files whose name starts with
    ``._`` are skipped. Paths are resolved against the task folder; whether the files exist is checked
    when a case is read.

    Raises:
        DataError: ``dataset.json`` is missing, not JSON, of neither layout, lacks a required key, or
            asks for what is not supported (nnU-Net region-based or ``ignore`` labels, a file ending
            that is not a supported image format).
    """
    root = Path(task_dir).resolve()
    meta_path = root / "dataset.json"
    try:
        meta = read_json(meta_path)
    except FileNotFoundError as e:
        raise DataError(meta_path, "dataset.json not found") from e
    except ValueError as e:
        raise DataError(meta_path, f"not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(meta_path, "dataset.json must hold a JSON object")
    try:
        layout = detect_layout(meta)
    except ValueError as e:
        raise DataError(meta_path, str(e)) from e
    return _load_nnunet(root, meta_path, meta) if layout == "nnunetv2" else _load_msd(root, meta_path, meta)


def _load_msd(root: Path, meta_path: Path, meta: Mapping[str, Any]) -> DecathlonTask:
    if "labels" not in meta:
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


def _nnunet_labels(meta_path: Path, raw: Any, meta: Mapping[str, Any]) -> dict[int, str]:
    """nnU-Net's ``labels`` (name -> value) as value -> name; region-based and ignore labels refused."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(
            meta_path, '"labels" must map label names to integer values, e.g. {"background": 0, "liver": 1}'
        )
    regions = {k: v for k, v in raw.items() if isinstance(v, list | tuple)}
    if regions or "regions_class_order" in meta:
        example = (
            next(iter(regions.items())) if regions else ("regions_class_order", meta["regions_class_order"])
        )
        raise DataError(
            meta_path,
            f"region-based labels are not supported ({example[0]!r}: {example[1]!r}): this project trains one "
            "class per label value; give every label name a single integer value",
        )
    ignore = [k for k in raw if str(k).strip().lower() == "ignore"]
    if ignore:
        raise DataError(
            meta_path,
            f'an "ignore" label ({ignore[0]!r}: {raw[ignore[0]]!r}) is not supported: every labelled voxel is '
            "trained on; remove it from dataset.json and give those voxels a class (or 0)",
        )
    labels: dict[int, str] = {}
    for name, value in raw.items():
        try:
            v = int(value)
            if v != float(value):
                raise ValueError
        except (TypeError, ValueError) as e:
            raise DataError(
                meta_path, f'label {name!r} has value {value!r}; "labels" values must be integers'
            ) from e
        if v in labels:
            raise DataError(meta_path, f"labels {labels[v]!r} and {name!r} share the value {v}")
        labels[v] = str(name)
    if 0 not in labels:
        raise DataError(meta_path, '"labels" needs the background at 0 (e.g. "background": 0)')
    return dict(sorted(labels.items()))


def _nnunet_channel_files(folder: Path, case: str, n: int, ending: str) -> tuple[Path, ...]:
    return tuple(folder / f"{case}_{c:04d}{ending}" for c in range(n))


def _load_nnunet(root: Path, meta_path: Path, meta: Mapping[str, Any]) -> DecathlonTask:
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in meta]
    if missing:
        raise DataError(meta_path, f"nnU-Net v2 dataset.json lacks {', '.join(repr(k) for k in missing)}")
    try:
        channels = sorted(meta["channel_names"].items(), key=lambda kv: int(kv[0]))
        modalities = tuple(str(v) for _, v in channels)
        if [int(k) for k, _ in channels] != list(range(len(channels))):
            raise ValueError(f"channels {[k for k, _ in channels]} are not numbered 0, 1, ...")
    except (AttributeError, ValueError) as e:
        raise DataError(meta_path, f'"channel_names" must map "0", "1", ... to names ({e})') from e
    if not modalities:
        raise DataError(meta_path, '"channel_names" is empty')
    labels = _nnunet_labels(meta_path, meta["labels"], meta)
    ending = str(meta["file_ending"])
    if ending.lower() not in IMAGE_SUFFIXES:
        raise DataError(
            meta_path,
            f'"file_ending" {ending!r} is not a supported image format; use one of {", ".join(IMAGE_SUFFIXES)}',
        )
    n = len(modalities)

    training: list[CaseEntry] = []
    if isinstance(meta.get("dataset"), dict):  # explicit file lists (newer nnU-Net v2 dataset.json)
        for case, entry in meta["dataset"].items():
            images = tuple(_resolve(root, str(p)) for p in entry.get("images", []))
            if not images:
                raise DataError(meta_path, f'"dataset" entry {case!r} lists no images')
            label = _resolve(root, str(entry["label"])) if entry.get("label") else None
            training.append(CaseEntry(str(case), images[0], label, images))
    else:
        labels_dir = root / "labelsTr"
        found = (
            sorted(p for p in labels_dir.iterdir() if p.name.endswith(ending) and not is_junk_file(p))
            if labels_dir.is_dir()
            else []
        )
        for label in found:
            case = label.name[: -len(ending)]
            images = _nnunet_channel_files(root / "imagesTr", case, n, ending)
            training.append(CaseEntry(case, images[0], label, images))

    test: list[CaseEntry] = []
    test_dir = root / "imagesTs"
    if test_dir.is_dir():
        test_ids = set()
        for p in test_dir.iterdir():
            named = channel_case(p) if p.name.endswith(ending) and not is_junk_file(p) else None
            if named is not None:
                test_ids.add(named[0])
        for case in sorted(test_ids):
            images = _nnunet_channel_files(test_dir, case, n, ending)
            test.append(CaseEntry(case, images[0], None, images))

    return DecathlonTask(
        name=root.name,
        root=root,
        modalities=modalities,
        labels=labels,
        training=tuple(sorted(training, key=lambda c: c.case_id)),
        test=tuple(test),
        layout="nnunetv2",
        file_ending=ending,
    )


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def _read_source_image(source: ImageSource, verify: bool) -> tuple[sitk.Image, Path]:
    """One SimpleITK float32 image of a source (3D or 4D) and the path to name in messages."""
    paths = source_paths(source)
    if len(paths) == 1:
        path = paths[0]
        if path.is_dir():
            return _read_dicom_folder(path), path
        return read_sitk_file(path, sitk.sitkFloat32, verify=verify), path
    # channel files: one 3D volume each, the same geometry, stacked in order as a 4D image
    volumes, first_geom = [], None
    for c, path in enumerate(paths):
        if not path.is_file():
            raise DataError(
                path, f"file not found (channel {c} of the {len(paths)} channel files of this case)"
            )
        vol = read_sitk_file(path, sitk.sitkFloat32, verify=verify)
        if vol.GetDimension() != 3:
            raise DataError(
                path,
                f"a channel file must hold one 3D volume, found a {vol.GetDimension()}D image of size {vol.GetSize()}",
            )
        geom = geometry_from_sitk(vol)
        if first_geom is None:
            first_geom = geom
        else:
            check_same_geometry(first_geom, geom, path, what=(f"channel 0 ({paths[0].name})", f"channel {c}"))
        volumes.append(sitk.GetArrayViewFromImage(vol).copy())
    assert first_geom is not None
    stacked = sitk.GetImageFromArray(np.stack(volumes), isVector=False)  # (M, z, y, x) -> 4D
    d4 = np.eye(4)
    d4[:3, :3] = np.asarray(first_geom.direction).reshape(3, 3)
    stacked.SetSpacing([*first_geom.spacing_xyz, 1.0])
    stacked.SetOrigin([*first_geom.origin_xyz, 0.0])
    stacked.SetDirection(d4.ravel().tolist())
    return stacked, paths[0]


def _read_dicom_folder(folder: Path) -> sitk.Image:
    series = find_series(folder)
    if not series:
        images = [p.name for p in folder.iterdir() if image_suffix(p) and not is_junk_file(p)]
        hint = f" (it holds {len(images)} image file(s): give them, not the folder)" if images else ""
        raise DataError(
            folder, f"a folder given as one image must hold one DICOM series; it holds none{hint}"
        )
    if len(series) > 1:
        raise DataError(
            folder,
            f"the folder holds {len(series)} DICOM series: {describe_series(series)}; give a folder holding one "
            "series (move the others out)",
        )
    image, _ = read_series(series[0])
    return image


def read_image(
    path: ImageSource,
    expected_modalities: int | Sequence[str] | None = None,
    *,
    verify: bool = True,
    task: str = "",
) -> tuple[np.ndarray, Geometry]:
    """Read an image as float32 (modality, z, y, x) and check what it holds.

    Args:
        path: an image file (NIfTI, MetaImage, NRRD; 3D, or 4D with the modalities on the 4th axis),
            a folder holding one DICOM series, or the channel files of one case (a list, one 3D file per
            modality in channel order, equal geometry).
        expected_modalities: the modalities ``dataset.json`` lists (their number, or their names
            for a clearer message); a mismatch with the image (3D = 1, 4D = length of the 4th
            axis, channel files = their number) raises.
        verify: run the format's integrity check first (:func:`utils.image_io.check_file_integrity`).
        task: the task's name, for messages.

    Raises:
        DataError: missing/corrupt/truncated/unsupported file, not 3D/4D (e.g. a 2D slice), channel
            files of different geometry, several or broken DICOM series, wrong modality count, NaN/Inf
            voxels, or a modality whose voxels are all 0.
    """
    names = (
        None if expected_modalities is None or isinstance(expected_modalities, int) else expected_modalities
    )
    n_expected = len(names) if names is not None else expected_modalities
    image, where = _read_source_image(path, verify)
    dim = image.GetDimension()
    if dim not in (3, 4):
        raise DataError(
            where,
            f"expected a 3D image (or 4D with the modalities on its 4th axis), found a {dim}D image of size "
            f"{image.GetSize()}: give the whole volume, not a slice",
        )
    geom = geometry_from_sitk(image)
    if n_expected is not None and geom.n_modalities != n_expected:
        n_files = len(source_paths(path))
        kind = (
            f"{n_files} channel files"
            if n_files > 1
            else (
                "a 3D image (1 modality)" if dim == 3 else f"{geom.n_modalities} modalities on its 4th axis"
            )
        )
        listed = f" ({', '.join(names)})" if names else ""
        of_task = f" for {task}" if task else ""
        raise DataError(
            where,
            f"image has {kind} but dataset.json lists {n_expected} modalities{listed}{of_task}: give a 3D "
            "image for a 1-modality task, else a 4D image with the modalities in that order on its 4th axis "
            "or one file per modality named CASE_0000, CASE_0001, ... (nnU-Net)",
        )
    array = sitk.GetArrayFromImage(image)  # 3D: (z, y, x); 4D: (t, z, y, x)
    if dim == 3:
        array = array[np.newaxis]
    array = np.ascontiguousarray(array, dtype=np.float32)
    check_image_values(array, where, names)
    return array, geom


def read_geometry(path: ImageSource) -> Geometry:
    """Geometry from the header(s) only (fast; no voxel data is read); of channel files, the first file's
    with ``n_modalities`` = their number; of a DICOM folder, the series' (its slices are read).

    Raises:
        DataError: the file is missing or its header cannot be read, or it is not 3D/4D.
    """
    paths = source_paths(path)
    if len(paths) == 1 and paths[0].is_dir():
        return geometry_from_sitk(_read_dicom_folder(paths[0]))
    geom = read_file_geometry(paths[0])
    if len(paths) > 1:
        return Geometry(geom.size_zyx, geom.spacing_xyz, geom.origin_xyz, geom.direction, len(paths))
    return geom


def read_label(path: str | os.PathLike[str], *, verify: bool = True) -> tuple[np.ndarray, Geometry]:
    """Read an integer label map (z, y, x) of any supported format. Float-stored labels are rounded to
    the nearest integer.

    Raises:
        DataError: missing/corrupt/truncated/unsupported file, or not a 3D label (4D with one volume is
            accepted).
    """
    path = Path(path)
    if image_suffix(path) is None and path.exists():
        raise DataError(path, unsupported_file_reason(path))
    image = read_sitk_file(path, None, verify=verify)
    if image.GetDimension() not in (3, 4):
        raise DataError(path, f"expected a 3D label map, found a {image.GetDimension()}D image")
    geom = geometry_from_sitk(image)
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 4:
        if array.shape[0] != 1:
            raise DataError(path, f"label is 4D with {array.shape[0]} volumes; expected 3D")
        array = array[0]
    if array.dtype.kind == "f":
        array = np.rint(array).astype(np.int32)
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


def check_same_geometry(
    image: Geometry,
    label: Geometry,
    label_path: str | os.PathLike[str],
    *,
    rtol: float = 1e-3,
    direction_atol: float = 1e-3,
    what: tuple[str, str] = ("image", "label"),
) -> None:
    """Raise unless image and label (or two channel files: ``what`` names them) share shape, spacing,
    origin and direction.

    Spacing is compared relatively (``rtol``); the origin per axis within
    ``0.01 mm + rtol * max(|origin|, spacing)``; the direction cosines within ``direction_atol``.

    Raises:
        DataError: naming ``label_path`` and what differs.
    """
    a, b = what
    if image.size_zyx != label.size_zyx:
        raise DataError(
            label_path,
            f"{a} and {b} differ in shape: {a} {image.size_zyx} vs {b} {label.size_zyx} (z, y, x)",
        )
    sp_i, sp_l = np.asarray(image.spacing_xyz), np.asarray(label.spacing_xyz)
    if not np.allclose(sp_i, sp_l, rtol=rtol, atol=1e-6):
        raise DataError(
            label_path,
            f"{a} and {b} differ in spacing: {a} {tuple(sp_i)} vs {b} {tuple(sp_l)} (x, y, z)",
        )
    o_i, o_l = np.asarray(image.origin_xyz), np.asarray(label.origin_xyz)
    tol = 0.01 + rtol * np.maximum(np.abs(o_i), sp_i)
    if np.any(np.abs(o_i - o_l) > tol):
        raise DataError(
            label_path,
            f"{a} and {b} differ in origin: {a} {tuple(o_i)} vs {b} {tuple(o_l)} (x, y, z)",
        )
    if not np.allclose(image.direction, label.direction, atol=direction_atol, rtol=0):
        raise DataError(
            label_path,
            f"{a} and {b} differ in direction: {a} {tuple(np.round(image.direction, 4))} "
            f"vs {b} {tuple(np.round(label.direction, 4))}",
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
