"""Segment raw NIfTI images with a trained checkpoint (the logic behind ``predict.py``).

For every input image: the task's preprocessing from the plans stored in the checkpoint
(:func:`utils.preprocessing.preprocess_image`), sliding-window segmentation
(:func:`utils.inference.segment_case`, with the unified-patch resize when the checkpoint's
``model_patch`` differs from the task patch), post-processing (:func:`utils.postprocess.postprocess`)
and the label map put back into the original geometry and written as a uint8 NIfTI with the input's
file name (:func:`utils.geometry.write_label_nifti`).

A bad input (unreadable, truncated, wrong number of modalities) is reported by name and skipped;
the others are still segmented.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.checkpoint import build_model_from_checkpoint, load_checkpoint, task_index
from utils.decathlon import DataError
from utils.geometry import write_label_nifti
from utils.inference import UnifiedMode, WeightMode, segment_case
from utils.postprocess import postprocess

__all__ = [
    "LoadedTask",
    "PredictOptions",
    "PredictReport",
    "collect_inputs",
    "load_task_model",
    "output_name",
    "predict_files",
    "segment_file",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class PredictOptions:
    """Inference settings (defaults = the paper preset)."""

    device: str = "cpu"
    batch_size: int = 2
    weight_mode: WeightMode = "linear"
    mirror_tta: bool = False
    postprocess: bool = True
    unified_mode: UnifiedMode = "volume"
    step_fraction: float = 0.5
    amp: bool = False
    accum_dtype: torch.dtype = torch.float32
    progress: bool = True


@dataclass
class LoadedTask:
    """A model ready for one task: the model (eval mode, on its device), the task's index, plans,
    patch and the checkpoint's model patch."""

    model: nn.Module
    task_idx: int
    task_name: str
    plans: dict[str, Any]
    task_patch: tuple[int, int, int]
    model_patch: tuple[int, int, int] | None
    num_classes: int


@dataclass
class PredictReport:
    """Outcome of :func:`predict_files`: written outputs and failures ``(input, reason)``."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def output_name(path: str | os.PathLike[str]) -> str:
    """The output file name of an input: the same file name."""
    return Path(path).name


def collect_inputs(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand folders (their ``*.nii.gz`` / ``*.nii`` files, hidden ``._*`` files skipped, sorted)
    and keep files as given.

    Returns:
        (images to segment, problems ``(path, reason)``: missing paths, folders without images,
        non-NIfTI files, two inputs with the same file name).
    """
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and _is_nifti(q))
            if not found:
                problems.append((p, "folder holds no .nii.gz / .nii images"))
            files.extend(found)
        elif p.is_file():
            if p.name.endswith(NIFTI_SUFFIXES):
                files.append(p)
            else:
                problems.append((p, "not a NIfTI file (.nii.gz or .nii)"))
        else:
            problems.append((p, "no such file or folder"))
    seen: dict[str, Path] = {}
    unique: list[Path] = []
    for f in files:
        name = output_name(f)
        if name in seen:
            if seen[name].resolve() != f.resolve():
                problems.append((f, f"same file name as {seen[name]}; outputs would overwrite each other"))
            continue
        seen[name] = f
        unique.append(f)
    return unique, problems


def load_task_model(
    ckpt_path: str | os.PathLike[str], task: str | None, device: str | torch.device = "cpu"
) -> LoadedTask:
    """Load a checkpoint and pick a task (``None``: the checkpoint's only task).

    Raises:
        CheckpointError: not a checkpoint; ValueError: unknown/ambiguous task; RuntimeError: the
        device is not available.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available on this machine")
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    names = [t["name"] for t in ckpt["tasks"]]
    if task is None:
        if len(names) != 1:
            raise ValueError(f"the checkpoint holds {len(names)} tasks {names}; choose one with --task")
        task = names[0]
    idx = task_index(ckpt, task)
    model, tasks = build_model_from_checkpoint(ckpt)
    model.to(dev).eval()
    plans = dict(tasks[idx]["plans"])
    task_patch = tuple(int(s) for s in plans["patch_size"])
    mp = ckpt.get("model_patch")
    model_patch = tuple(int(s) for s in mp) if mp is not None else None
    num_classes = int(ckpt["model_config"]["num_classes"][idx])
    if int(plans.get("num_classes", num_classes)) != num_classes:
        raise ValueError(
            f"checkpoint inconsistent: task {task!r} plans say {plans['num_classes']} classes, "
            f"the model has {num_classes}"
        )
    return LoadedTask(model, idx, task, plans, task_patch, model_patch, num_classes)  # type: ignore[arg-type]


def segment_file(
    loaded: LoadedTask,
    image_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    options: PredictOptions = PredictOptions(),
) -> np.ndarray:
    """Preprocess, segment, post-process one raw image and write its label map.

    Returns:
        the uint8 (z, y, x) label map as written (original shape).

    Raises:
        DataError: the image cannot be read or does not match the task's modalities.
    """
    from utils.preprocessing import preprocess_image  # data pipeline (SimpleITK reading, resampling)

    image_np, weight, sidecar = preprocess_image(image_path, loaded.plans)
    # on a GPU the (M, z, y, x) image goes there whole (the class map stays on the CPU)
    image = torch.from_numpy(image_np).to(options.device)
    del image_np
    model = loaded.model

    def predictor(x: torch.Tensor, task_idx: int) -> torch.Tensor:
        return model(x, task_idx)

    label = segment_case(
        predictor,
        image,
        loaded.task_idx,
        loaded.task_patch,
        model_patch=loaded.model_patch,
        unified_mode=options.unified_mode,
        step_fraction=options.step_fraction,
        batch_size=options.batch_size,
        weight_mode=options.weight_mode,
        mirror_tta=options.mirror_tta,
        device=options.device,
        num_classes=loaded.num_classes,
        accum_dtype=options.accum_dtype,
        amp=options.amp,
        progress=options.progress,
    )
    del image
    if options.postprocess:
        label = postprocess(label, loaded.plans, weight)
    return write_label_nifti(label, sidecar, out_path)


def predict_files(
    loaded: LoadedTask,
    inputs: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    options: PredictOptions = PredictOptions(),
    *,
    log: Callable[[str], None] | None = None,
) -> PredictReport:
    """Segment every input image into ``output_dir`` (same file names), going on after failures.

    Args:
        loaded: from :func:`load_task_model`.
        inputs: files and/or folders of NIfTI images.
        output_dir: created if missing; must not be the folder of an input (no overwriting).
        log: where failure messages go (default: ``tqdm.write`` to stderr).

    Returns:
        a :class:`PredictReport`.
    """
    from tqdm import tqdm

    def _log(msg: str) -> None:
        if log is not None:
            log(msg)
        else:
            tqdm.write(msg, file=sys.stderr)

    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, problems = collect_inputs(inputs)
    report = PredictReport()
    for path, why in problems:
        report.failed.append((path, why))
        _log(f"FAILED {path}: {why}")
    bar = tqdm(files, desc=f"segmenting ({loaded.task_name})", unit="image", disable=not options.progress)
    for path in bar:
        bar.set_postfix_str(path.name)
        target = out_dir / output_name(path)
        try:
            if target.resolve() == path.resolve():
                raise ValueError("output would overwrite the input; choose another --output folder")
            segment_file(loaded, path, target, options)
            report.written.append(target)
        except Exception as e:  # report the case by name, go on with the others
            if isinstance(e, DataError):
                reason = e.reason
            else:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            report.failed.append((path, reason))
            _log(f"FAILED {path}: {reason}")
    return report
