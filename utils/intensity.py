"""Intensity statistics of a task's foreground, before normalisation (``plans.json`` key ``intensity_stats``).

Preprocessing z-scores every case on its own (docs/paper_preset.md, "Preprocessing"), so the
arrays the network sees no longer tell how two tasks' raw intensities compare. These statistics
keep that: per modality, the mean, standard deviation and the 0.5th, 50th and 99.5th percentiles
of the raw voxels inside the label (any foreground class) of up to :data:`MAX_CASES` training
cases (an evenly spaced pick of at most :data:`MAX_SAMPLES_PER_CASE` voxels per case). A new domain
uses them to find the trained domain whose images look most alike
(:func:`intensity_distance`; ``--init_from auto``).

``plans.json``::

    "intensity_stats": {"region": "foreground", "cases": 8, "voxels": 160000,
                        "per_modality": [{"mean": 95.1, "std": 30.2, "p0_5": 20.0, "p50": 96.0,
                                          "p99_5": 170.0}, ...]}

Plans written before the key existed have none; every user of the key must work without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from utils.decathlon import DataError, DecathlonTask, read_image, read_label

__all__ = [
    "MAX_CASES",
    "MAX_SAMPLES_PER_CASE",
    "STAT_KEYS",
    "foreground_samples",
    "intensity_distance",
    "summarise_samples",
    "task_intensity_stats",
]

#: training cases read per task (evenly spaced over the case list)
MAX_CASES = 8
#: foreground voxels kept per case (an evenly spaced pick, so the statistics are deterministic)
MAX_SAMPLES_PER_CASE = 20_000
#: the per-modality keys
STAT_KEYS = ("mean", "std", "p0_5", "p50", "p99_5")


def foreground_samples(
    image: np.ndarray, label: np.ndarray, max_samples: int = MAX_SAMPLES_PER_CASE
) -> np.ndarray:
    """The raw intensities of an evenly spaced pick of the voxels where ``label > 0``.

    Args:
        image: (M, z, y, x) raw image (any real dtype).
        label: (z, y, x) raw integer label.
        max_samples: at most this many voxels.
    Returns:
        float64 (M, n) with n <= ``max_samples`` (n = 0 for an empty label).
    """
    if image.ndim != 4 or tuple(image.shape[1:]) != tuple(label.shape):
        raise ValueError(
            f"image (M, z, y, x) and label (z, y, x) must match, got {image.shape} and {label.shape}"
        )
    idx = np.flatnonzero(label.reshape(-1) > 0)
    if idx.size > max_samples:
        idx = idx[np.linspace(0, idx.size - 1, max_samples).round().astype(np.int64)]
    return image.reshape(image.shape[0], -1)[:, idx].astype(np.float64)


def summarise_samples(samples: Sequence[np.ndarray]) -> dict[str, Any] | None:
    """The ``intensity_stats`` dict of the per-case samples of :func:`foreground_samples` (None when
    every case had an empty label)."""
    parts = [s for s in samples if s.size]
    if not parts:
        return None
    data = np.concatenate(parts, axis=1)
    per_modality = []
    for values in data:
        p = np.percentile(values, [0.5, 50.0, 99.5])
        per_modality.append(
            {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "p0_5": float(p[0]),
                "p50": float(p[1]),
                "p99_5": float(p[2]),
            }
        )
    return {
        "region": "foreground",
        "cases": len(parts),
        "voxels": int(data.shape[1]),
        "per_modality": per_modality,
    }


def intensity_distance(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> float | None:
    """How unlike two tasks' foreground intensities are (0 = the same); None when either lacks statistics.

    Per modality (the first ``min(M_a, M_b)``): the gaps between the two tasks' 0.5th, 50th and 99.5th
    percentiles, summed and divided by the sum of their two percentile ranges (p99.5 - p0.5), so that
    the measure is in units of the foreground's own spread (HU for CT, arbitrary units for MRI alike);
    the mean over those modalities.
    """
    if not a or not b:
        return None
    ma, mb = a.get("per_modality") or [], b.get("per_modality") or []
    n = min(len(ma), len(mb))
    if n == 0:
        return None
    total = 0.0
    for sa, sb in zip(ma[:n], mb[:n], strict=True):
        gap = sum(abs(float(sa[k]) - float(sb[k])) for k in ("p0_5", "p50", "p99_5"))
        spread = (float(sa["p99_5"]) - float(sa["p0_5"])) + (float(sb["p99_5"]) - float(sb["p0_5"]))
        total += gap / max(spread, 1e-6)
    d = total / n
    return d if math.isfinite(d) else None


def task_intensity_stats(task: DecathlonTask, max_cases: int = MAX_CASES) -> dict[str, Any] | None:
    """``intensity_stats`` of a task: the raw images and labels of up to ``max_cases`` training cases
    (evenly spaced over the list; unreadable cases are skipped: preprocessing reports them). None when
    no case with a foreground could be read."""
    cases = [c for c in task.training if c.label is not None]
    if len(cases) > max_cases:
        cases = [cases[i] for i in np.linspace(0, len(cases) - 1, max_cases).round().astype(int)]
    samples = []
    for case in cases:
        assert case.label is not None
        try:
            image, _ = read_image(case.source, len(task.modalities), verify=False, task=task.name)
            label, _ = read_label(case.label, verify=False)
        except DataError:
            continue
        if tuple(label.shape) != tuple(image.shape[1:]):
            continue
        samples.append(foreground_samples(image, label))
    return summarise_samples(samples)
