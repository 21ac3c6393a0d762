"""Validation Dice on the fold's validation cases and NIfTI predictions, via the inference modules.

Validation runs the evaluation of REFERENCE.md ("Inference and evaluation") on the preprocessed
(cropped, resampled) grid: sliding-window segmentation of the whole case
(:func:`utils.inference.segment_case`, with the unified-patch volume scaling for shared/universal
models), post-processing (:func:`utils.postprocess.postprocess`) and Dice per foreground class
against the preprocessed label (:func:`utils.metrics.evaluate_case`). ``--predict`` writes the same
label maps back in the original geometry as NIfTI (:func:`utils.geometry.write_label_nifti`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.data import TaskData
from utils.geometry import write_label_nifti
from utils.inference import segment_case
from utils.metrics import evaluate_case, mean_per_class, write_metrics_csv
from utils.postprocess import postprocess
from utils.sampling import case_id_of


@dataclass(frozen=True)
class InferenceSettings:
    """How validation / prediction segments a case."""

    device: torch.device = torch.device("cpu")
    model_patch: tuple[int, int, int] | None = None
    amp: bool = False
    postprocess: bool = True
    batch_size: int = 2
    progress: bool = False


@dataclass
class TaskValidation:
    """Validation of one task: per-case rows ``{"case", "dice_1", ...}`` and per-class means."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    means: dict[str, float] = field(default_factory=dict)
    example: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # image, label, prediction slices


def segment_prepared_case(
    model: nn.Module, case: str, task_idx: int, plans: dict[str, Any], settings: InferenceSettings
) -> np.ndarray:
    """Label map (z, y, x) of a preprocessed case (``<case>_image.npy``; post-processed with its weight map)."""
    image = np.load(case + "_image.npy", mmap_mode="r")
    patch = tuple(int(v) for v in plans["patch_size"])

    def predictor(x: torch.Tensor, t: int) -> torch.Tensor:
        return model(x, t)

    label = segment_case(
        predictor,
        image,
        task_idx,
        patch,
        model_patch=settings.model_patch,
        batch_size=settings.batch_size,
        device=settings.device,
        num_classes=int(plans["num_classes"]),
        amp=settings.amp,
        progress=settings.progress,
    )
    if settings.postprocess:
        weight_path = Path(case + "_weight.npy")
        weight = np.load(weight_path, mmap_mode="r") if weight_path.is_file() else None
        label = postprocess(label, plans, weight)
    return label


def _example_slices(case: str, pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The axial slice with the most foreground: image (modality 0), reference, prediction."""
    counts = (ref > 0).sum(axis=(1, 2))
    z = int(np.argmax(counts)) if counts.any() else ref.shape[0] // 2
    image = np.load(case + "_image.npy", mmap_mode="r")
    return np.array(image[0, z], dtype=np.float32), np.array(ref[z]), np.array(pred[z])


def validate_task(
    model: nn.Module,
    task: TaskData,
    task_idx: int,
    settings: InferenceSettings,
    *,
    max_cases: int | None = None,
) -> TaskValidation:
    """Dice per foreground class of every validation case of ``task`` (model must be in eval mode)."""
    result = TaskValidation(task.name)
    cases = task.val_cases[:max_cases] if max_cases else task.val_cases
    for case in cases:
        pred = segment_prepared_case(model, case, task_idx, task.plans, settings)
        ref = np.load(case + "_label.npy", mmap_mode="r")
        row = {"case": case_id_of(case), **evaluate_case(pred, np.asarray(ref), task.num_classes, with_hd95=False)}
        result.rows.append(row)
        if result.example is None:
            result.example = _example_slices(case, pred, np.asarray(ref))
    result.means = mean_per_class(result.rows)
    return result


def validate(
    model: nn.Module,
    tasks: Sequence[TaskData],
    task_indices: Sequence[int],
    settings: InferenceSettings,
    *,
    max_cases: int | None = None,
    csv_dir: Path | None = None,
) -> list[TaskValidation]:
    """Validate the tasks ``task_indices`` (indices into ``tasks`` = model task indices).

    Writes one per-case CSV per task into ``csv_dir`` (with a last row of means) when given.
    The model is put in eval mode and back into train mode afterwards.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for t in task_indices:
            res = validate_task(model, tasks[t], t, settings, max_cases=max_cases)
            if csv_dir is not None and res.rows:
                write_metrics_csv(csv_dir / f"{tasks[t].name}.csv", res.rows)
            out.append(res)
    finally:
        model.train(was_training)
    return out


def mean_dice(results: Sequence[TaskValidation]) -> float:
    """Mean over every (task, foreground class) of the per-class mean Dice."""
    vals = [v for r in results for k, v in r.means.items() if k.startswith("dice_")]
    return float(np.mean(vals)) if vals else float("nan")


def predict_cases_to_nifti(
    model: nn.Module,
    task: TaskData,
    task_idx: int,
    cases: Sequence[str],
    out_dir: Path,
    settings: InferenceSettings,
) -> list[Path]:
    """Segment preprocessed cases and write them as NIfTI in the original geometry
    (``out_dir/<case>.nii.gz``; geometry from the case sidecars)."""
    was_training = model.training
    model.eval()
    written = []
    try:
        for case in cases:
            with open(case + ".json", encoding="utf-8") as f:
                sidecar = json.load(f)
            label = segment_prepared_case(model, case, task_idx, task.plans, settings)
            path = out_dir / f"{case_id_of(case)}.nii.gz"
            write_label_nifti(label, sidecar, path)
            written.append(path)
    finally:
        model.train(was_training)
    return written
