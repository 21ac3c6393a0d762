"""DICOM Segmentation output (``predict.py --output_format dicom-seg``), written with highdicom.

highdicom is an optional dependency (``pip install highdicom``; ``requirements-dev.txt`` pins the
tested version): nothing else of the project needs it, and :func:`highdicom_problem` says, before
any image is segmented, when it is missing.

A segmentation of a DICOM series (:class:`utils.dicom_series.DicomSeries`) is written as one DICOM
Segmentation object (SOP class Segmentation Storage, ``BINARY``):

* it references the source series: study, patient and frame of reference are the source's, and
  each frame names the source slice (SOPInstanceUID) it segments;
* it holds one segment per foreground class of the task's plans (segment number = class value,
  label = the class name from ``plans["labels"]``); frames without any voxel of a segment are left
  out, as DICOM allows;
* every segment carries the algorithm: name ``3D U2-Net (u2net3d)``, the package version, the family
  "Artificial Intelligence" and, as parameters, the task and the model file.

The label map must be the series' own grid: slice ``k`` of the (z, y, x) array is the ``k``-th file of
:func:`utils.dicom_series.series_slices`, which is the order the image was read in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from utils.dicom_series import DicomSeries, series_slices
from utils.io_utils import atomic_path
from utils.version import __version__

__all__ = ["ALGORITHM_NAME", "HIGHDICOM_PIN", "highdicom_problem", "segment_names", "write_dicom_seg"]

ALGORITHM_NAME = "3D U2-Net (u2net3d)"
#: the version requirements-dev.txt pins (the one the tests run)
HIGHDICOM_PIN = "highdicom==0.28.2"


def highdicom_problem() -> str | None:
    """None when highdicom can be imported, else what to do."""
    try:
        import highdicom  # noqa: F401
    except ImportError as e:
        return (
            f"--output_format dicom-seg needs highdicom (an optional dependency): pip install '{HIGHDICOM_PIN}' "
            f"({type(e).__name__}: {e})"
        )
    return None


def segment_names(plans: Mapping[str, Any]) -> dict[int, str]:
    """Foreground class -> name from the plans (``labels``: ``{"1": "liver"}``; ``class<k>`` when absent)."""
    labels = plans.get("labels") or {}
    return {c: str(labels.get(str(c), f"class{c}")) for c in range(1, int(plans["num_classes"]))}


def write_dicom_seg(
    label: np.ndarray,
    series: DicomSeries,
    plans: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    task: str = "",
    model: str = "",
) -> Path:
    """Write a (z, y, x) label map of ``series`` as a DICOM Segmentation, atomically.

    Args:
        label: uint8 label map in the series' grid (slice k = the k-th file of :func:`series_slices`).
        series: the source series.
        plans: the task's plans (``num_classes``, ``labels``).
        path: the output file (``.dcm``).
        task, model: recorded as the algorithm's parameters.

    Raises:
        ValueError: the label map does not fit the series, or holds values beyond the classes.
        ImportError: highdicom is missing.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    files, _ = series_slices(series)
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    label = np.asarray(label, dtype=np.uint8)
    if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
        expected: tuple[int, ...] = (
            int(sources[0].NumberOfFrames),
            int(sources[0].Rows),
            int(sources[0].Columns),
        )
    else:
        expected = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if label.shape != expected:
        raise ValueError(
            f"label map {label.shape} does not fit the DICOM series {expected} (slices, rows, columns)"
        )
    names = segment_names(plans)
    if label.size and int(label.max()) > max(names, default=0):
        raise ValueError(f"label value {int(label.max())} beyond the task's classes {sorted(names)}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        parameters={k: v for k, v in (("task", task), ("model", model)) if v} or None,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=c,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.AnatomicalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for c, name in sorted(names.items())
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=label,  # one frame per source slice (or per frame of a multi-frame source)
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="u2net3d",
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=__version__,
        device_serial_number="0",
        series_description=f"{ALGORITHM_NAME} {task}".strip()[:64],
        content_label="SEGMENTATION",
    )
    out = Path(path)
    with atomic_path(out, size_hint=int(label.size) // 8 + (1 << 16)) as tmp:
        seg.save_as(str(tmp))
    return out
