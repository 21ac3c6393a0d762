"""Validation Dice on the fold's validation cases, and NIfTI predictions, with the project's predictor.

Validation runs the evaluation of ``docs/paper_preset.md`` ("Inference and evaluation") with the
same :class:`inference.predictor.Segmenter` that ``predict.py`` uses: sliding-window segmentation of
the whole preprocessed case (with the unified-patch volume scaling for shared/universal models),
post-processing, and Dice per foreground class (:func:`utils.metrics.evaluate_case`) — in the
original geometry against the raw label, as the original did, when the raw data are at hand
(``--val_grid original``, the default), else on the preprocessed grid.
:func:`predict_cases_to_nifti` writes the same label maps back in the original geometry as NIfTI.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.backends import RuntimeChoice, choose_runtime, onnxruntime_faster
from inference.geometry import restore_to_original, write_label_nifti
from inference.predictor import Segmenter, TaskModel
from inference.settings import InferenceSettings
from models.runtime import resolve_amp
from models.unet import U2Net3D
from training.config import TrainConfig
from training.data import TaskData
from utils.decathlon import IMAGE_SUFFIXES, apply_label_map, read_label
from utils.io_utils import read_json
from utils.metrics import evaluate_case, mean_per_class, write_metrics_csv
from utils.preprocessing import case_id_of


@dataclass
class TaskValidation:
    """Validation of one task: per-case rows ``{"case", "dice_1", ...}`` and per-class means."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    means: dict[str, float] = field(default_factory=dict)
    example: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # image, label, prediction slices


def run_runtime(config: TrainConfig, device: torch.device) -> RuntimeChoice:
    """The precision and backend of a run's validation and ``--predict``
    (:func:`inference.backends.choose_runtime`).

    Raises:
        ValueError: a combination that cannot run (e.g. onnxruntime with bf16, or not installed).
    """
    precision = config.infer_precision
    if precision == "same":
        amp = resolve_amp(config.amp, device)
        precision = "fp32" if amp == "off" else amp
    faster = onnxruntime_faster(config.mode, config.module, config.base_channels)
    return choose_runtime(precision, config.infer_backend, device, ort_faster=faster)


def run_inference_settings(
    config: TrainConfig, device: torch.device, *, postprocess: bool | None = None, progress: bool = False
) -> InferenceSettings:
    """The inference settings of a training run (validation and ``--predict``): the paper preset's
    sliding window on the run's device, in the precision and backend of ``--infer_precision`` /
    ``--infer_backend`` (by default the run's mixed precision — a bf16 run validates in bf16 — and
    PyTorch). ``postprocess`` defaults to the run's ``val_postprocess``."""
    runtime = run_runtime(config, device)
    return InferenceSettings(
        device=str(device),
        amp=runtime.amp,
        backend=runtime.backend,  # type: ignore[arg-type]
        postprocess=config.val_postprocess if postprocess is None else postprocess,
        progress=progress,
    )


def task_segmenter(
    model: U2Net3D,
    task: TaskData,
    task_idx: int,
    model_patch: Sequence[int] | None,
    settings: InferenceSettings,
) -> Segmenter:
    """The predictor of one of the model's tasks (the model must be on ``settings.device``, in eval mode)."""
    mp = None if model_patch is None else (int(model_patch[0]), int(model_patch[1]), int(model_patch[2]))
    return Segmenter(TaskModel(model, task_idx, task.name, dict(task.plans), mp), settings)


def _example_slices(
    case: str, pred: np.ndarray, ref: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The axial slice with the most foreground: image (modality 0), reference, prediction."""
    counts = (ref > 0).sum(axis=(1, 2))
    z = int(np.argmax(counts)) if counts.any() else ref.shape[0] // 2
    image = np.load(case + "_image.npy", mmap_mode="r")
    return np.array(image[0, z], dtype=np.float32), np.array(ref[z]), np.array(pred[z])


def raw_label_path(dataset_dir: str | os.PathLike[str], task: str, case: str) -> Path:
    """The raw label of a preprocessed case: ``<dataset_dir>/<task>/labelsTr/<case id><suffix>``, the first
    supported image suffix found (MSD and nnU-Net v2 layouts name labels alike; ``.nii.gz`` when none is)."""
    folder = Path(dataset_dir) / task / "labelsTr"
    cid = case_id_of(case)
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{cid}{suffix}").is_file():
            return folder / f"{cid}{suffix}"
    return folder / f"{cid}.nii.gz"


def validate_task(
    segmenter: Segmenter,
    task: TaskData,
    *,
    max_cases: int | None = None,
    dataset_dir: str | os.PathLike[str] | None = None,
) -> TaskValidation:
    """Dice per foreground class of every validation case of ``task``.

    With ``dataset_dir`` (the original's evaluation), a case whose raw label exists there is scored in
    the original geometry: the prediction is put back into the original grid and compared with the
    raw label mapped to the task's classes (tumour fused into the organ). Otherwise, and without
    ``dataset_dir``, the prediction is scored on the preprocessed grid. Each row says which
    (``grid``: ``original`` / ``preprocessed``).
    """
    result = TaskValidation(task.name)
    cases = task.val_cases[:max_cases] if max_cases else task.val_cases
    for case in cases:
        pred = segmenter.segment_prepared_case(case)
        ref = np.asarray(np.load(case + "_label.npy", mmap_mode="r"))
        raw = raw_label_path(dataset_dir, task.name, case) if dataset_dir is not None else None
        if raw is not None and raw.is_file():
            raw_label, _ = read_label(raw)
            original_ref = apply_label_map(raw_label, task.plans["label_map"])
            original_pred = restore_to_original(pred, read_json(case + ".json"))
            metrics = evaluate_case(original_pred, original_ref, task.num_classes, with_hd95=False)
            grid = "original"
        else:
            metrics = evaluate_case(pred, ref, task.num_classes, with_hd95=False)
            grid = "preprocessed"
        row = {"case": case_id_of(case), "grid": grid, **metrics}
        result.rows.append(row)
        if result.example is None:
            result.example = _example_slices(case, pred, ref)
    result.means = mean_per_class(result.rows)
    return result


def validate(
    model: U2Net3D,
    tasks: Sequence[TaskData],
    task_indices: Sequence[int],
    model_patch: Sequence[int] | None,
    settings: InferenceSettings,
    *,
    max_cases: int | None = None,
    csv_dir: Path | None = None,
    dataset_dir: str | os.PathLike[str] | None = None,
) -> list[TaskValidation]:
    """Validate the tasks ``task_indices`` (indices into ``tasks`` = model task indices).

    ``dataset_dir``: score in the original geometry where the raw labels are found
    (:func:`validate_task`). Writes one per-case CSV per task into ``csv_dir`` (with a last row of
    means) when given.
    The model is put in eval mode and back into train mode afterwards.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for t in task_indices:
            segmenter = task_segmenter(model, tasks[t], t, model_patch, settings)
            res = validate_task(segmenter, tasks[t], max_cases=max_cases, dataset_dir=dataset_dir)
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


def predict_cases_to_nifti(segmenter: Segmenter, cases: Sequence[str], out_dir: Path) -> list[Path]:
    """Segment preprocessed cases and write them as NIfTI in the original geometry
    (``out_dir/<case>.nii.gz``; geometry from the case sidecars). The model must be in eval mode."""
    written = []
    for case in cases:
        sidecar = read_json(case + ".json")
        label = segmenter.segment_prepared_case(case)
        path = out_dir / f"{case_id_of(case)}.nii.gz"
        write_label_nifti(label, sidecar, path)
        written.append(path)
    return written
