"""Synthetic DICOM CT series and a tiny checkpoint for the DICOM tests (pydicom writes the slices)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import build_model
from utils.checkpoint import save_checkpoint

#: the tiny task of the DICOM tests: CT, liver and tumour
TASK = "Task90_DicomCT"
CLASSES = {"0": "background", "1": "liver", "2": "tumour"}


def oblique_direction(a_deg: float = 20.0, b_deg: float = 10.0) -> np.ndarray:
    """A 3x3 rotation (columns = the image axes' directions in patient space): about x, then y."""
    a, b = math.radians(a_deg), math.radians(b_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    return rx @ ry


def ct_phantom(shape: Sequence[int] = (10, 20, 24), seed: int = 0) -> np.ndarray:
    """int16 HU volume (z, y, x) in -1024..3000: air, a body, a bright blob off centre (an asymmetric image)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    vol = np.full(shape, -1000.0)
    vol[(y / 0.9) ** 2 + (x / 0.95) ** 2 < 1] = 40.0
    vol[(z - 0.2) ** 2 + (y + 0.3) ** 2 + (x - 0.4) ** 2 < 0.2] = 150.0
    vol += rng.normal(0, 15, shape)
    return np.rint(np.clip(vol, -1024, 3000)).astype(np.int16)  # stored as unsigned + intercept -1024


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    spacing_xyz: Sequence[float] = (0.8, 0.9, 2.5),
    origin: Sequence[float] = (-10.0, 20.0, 30.0),
    direction: np.ndarray | None = None,
    description: str = "CT abdomen",
    skip: Sequence[int] = (),
    study_uid: str | None = None,
    seed: int = 0,
    prefix: str = "IM",
) -> dict[str, Any]:
    """Write ``volume`` (z, y, x) as one DICOM CT slice per file, with shuffled file names (``IM0007``...;
    another ``prefix`` for a second series in the same folder).

    Slice ``k`` lies at ``origin + k * spacing_z * direction[:, 2]``; ``skip`` leaves slices out.

    Returns:
        ``{"uid": SeriesInstanceUID, "study": StudyInstanceUID, "sops": {k: SOPInstanceUID}, "files": {k: path}}``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    d = oblique_direction() if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    study = study_uid or generate_uid()
    series, frame = generate_uid(), generate_uid()
    names = list(range(volume.shape[0]))
    random.Random(seed).shuffle(names)  # file order says nothing about slice order
    out: dict[str, Any] = {"uid": series, "study": study, "sops": {}, "files": {}}
    for k in range(volume.shape[0]):
        if k in skip:
            continue
        pos = np.asarray(origin, dtype=np.float64) + d[:, 2] * spacing_xyz[2] * k
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "P1", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "synthetic"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, k + 1
        ds.SeriesDescription = description
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in [*d[:, 0], *d[:, 1]]]
        ds.PixelSpacing = [f"{spacing_xyz[1]:.6f}", f"{spacing_xyz[0]:.6f}"]  # between rows (y), columns (x)
        ds.SliceThickness = f"{spacing_xyz[2]:.6f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (volume[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        path = folder / f"{prefix}{names[k]:04d}"
        ds.save_as(str(path), enforce_file_format=True)
        out["sops"][k], out["files"][k] = sop, path
    return out


def tiny_ct_checkpoint(path: Path, seed: int = 0) -> Path:
    """An untrained independent model of :data:`TASK` (1 modality, 3 classes), its plans in the checkpoint."""
    torch.manual_seed(seed)
    config = {"train_mode": "independent", "in_channels": [1], "num_classes": [3], "module": None,
              "base_channels": 4, "pools_per_axis": [1, 2, 2], "deep_supervision": True, "residual": True}  # fmt: skip
    model = build_model(**config)
    plans = {
        "task": TASK,
        "modalities": ["CT"],
        "is_ct": True,
        "labels": dict(CLASSES),
        "num_classes": 3,
        "label_map": {"0": 0, "1": 1, "2": 2},
        "target_spacing": [2.5, 1.0, 1.0],
        "patch_size": [8, 16, 16],
        "pools_per_axis": [1, 2, 2],
        "batch_size": 2,
        "small_label": 2,
        "tumour_classes": [],
        "keep_components": 1,
        "normalisation": {"clip_percentiles": [2, 98], "ct_clip_min": -1024, "zscore": "nonzero"},
        "source": "derived",
        "median_resampled_shape": [10, 18, 19],
    }
    save_checkpoint(path, config, [{"name": TASK, "plans": plans}], model.state_dict())
    return path
