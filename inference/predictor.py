"""The predictor used by ``predict.py`` and by training's validation.

A :class:`TaskModel` is a trained network ready for one of its tasks (model, task index, the task's
plans, the model patch). A :class:`Segmenter` pairs it with one :class:`InferenceSettings` and
segments:

* a preprocessed array (:meth:`Segmenter.segment_array`): sliding window
  (:func:`inference.sliding_window.infer_case`, with the unified-patch resize when the model patch
  differs from the task patch), then post-processing (:func:`inference.postprocess.postprocess`);
* a preprocessed case on disk (:meth:`Segmenter.segment_prepared_case`, validation);
* a raw NIfTI image (:meth:`Segmenter.segment_file`): the task's preprocessing from its plans
  (:func:`utils.preprocessing.preprocess_image`), the above, and the label map put back into the
  original geometry as a uint8 NIfTI (:func:`inference.geometry.write_label_nifti`);
* files and folders (:meth:`Segmenter.predict_files`): a bad input is reported by name and skipped,
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
from tqdm import tqdm

from inference.geometry import write_label_nifti
from inference.postprocess import postprocess
from inference.settings import InferenceSettings
from inference.sliding_window import NetworkFn, infer_case
from models.loading import build_model_from_checkpoint
from models.runtime import resolve_device
from models.unet import U2Net3D
from utils.checkpoint import choose_task, load_checkpoint
from utils.decathlon import DataError
from utils.io_utils import DiskFullError, check_writable_folder, remove_stale_temporaries
from utils.preprocessing import preprocess_image
from utils.triples import Int3, int3

__all__ = [
    "PredictReport",
    "Segmenter",
    "TaskModel",
    "collect_inputs",
    "output_name",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class TaskModel:
    """A model ready for one task.

    Attributes:
        model: the network (eval mode, on its device): a :class:`U2Net3D`, or any network function
            ``f(x, task_idx) -> logits`` such as an exported domain
            (:class:`inference.exported.ExportedNetwork`).
        task_idx: the task's index in the model.
        task_name: e.g. ``Task04_Hippocampus``.
        plans: the task's plans (patch, classes, post-processing, preprocessing).
        model_patch: the shared/universal model patch, or None (independent models).
    """

    model: U2Net3D | NetworkFn
    task_idx: int
    task_name: str
    plans: dict[str, Any]
    model_patch: Int3 | None = None

    @property
    def task_patch(self) -> Int3:
        return int3(self.plans["patch_size"])

    @property
    def num_classes(self) -> int:
        return int(self.plans["num_classes"])

    @classmethod
    def from_checkpoint(
        cls, ckpt_path: str | os.PathLike[str], task: str | None, device: str = "cpu"
    ) -> TaskModel:
        """Load a checkpoint and pick a task (``None``: the checkpoint's only task).

        Raises:
            CheckpointError: not a checkpoint; ValueError: unknown/ambiguous task, inconsistent
            checkpoint; RuntimeError: the device is not available.
        """
        dev = resolve_device(device)
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        idx, task = choose_task(ckpt, task)
        model, tasks = build_model_from_checkpoint(ckpt)
        model.to(dev).eval()
        plans = dict(tasks[idx]["plans"])
        num_classes = model.config.num_classes[idx]
        if int(plans.get("num_classes", num_classes)) != num_classes:
            raise ValueError(
                f"checkpoint {os.fspath(ckpt_path)!r} inconsistent: task {task!r} plans say "
                f"{plans['num_classes']} classes, the model has {num_classes}"
            )
        mp = ckpt.get("model_patch")
        return cls(model, idx, task, plans, int3(mp) if mp is not None else None)


@dataclass
class PredictReport:
    """Outcome of :meth:`Segmenter.predict_files`: written outputs, failures ``(input, reason)`` and
    outputs that already existed and were kept (``skip_existing``)."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

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


class Segmenter:
    """Segments images of one task with one model and one set of inference settings.

    Args:
        task: the model and the task to segment.
        settings: sliding window, TTA, device, AMP, post-processing; the model must already be on
            ``settings.device``.
    """

    def __init__(self, task: TaskModel, settings: InferenceSettings) -> None:
        self.task = task
        self.settings = settings

    def _network(self, x: torch.Tensor, task_idx: int) -> torch.Tensor:
        return self.task.model(x, task_idx)

    def segment_array(self, image: np.ndarray | torch.Tensor, weight: np.ndarray | None = None) -> np.ndarray:
        """Label map of a preprocessed case.

        Args:
            image: (M, z, y, x) preprocessed image (NumPy, memmap, or a tensor on the device).
            weight: (z, y, x) weight map (non-zero inside the body) for post-processing, or None.

        Returns:
            uint8 (z, y, x) label map, post-processed when the settings say so.
        """
        t = self.task
        label = infer_case(
            self._network,
            image,
            t.task_idx,
            t.task_patch,
            self.settings,
            model_patch=t.model_patch,
            num_classes=t.num_classes,
        )
        if self.settings.postprocess:
            label = postprocess(label, t.plans, weight)
        return label

    def probabilities(self, image: np.ndarray | torch.Tensor) -> np.ndarray:
        """Blended class probabilities (C, z, y, x) float32 of a preprocessed case."""
        t = self.task
        return infer_case(
            self._network,
            image,
            t.task_idx,
            t.task_patch,
            self.settings,
            model_patch=t.model_patch,
            num_classes=t.num_classes,
            output="probabilities",
        )

    def segment_prepared_case(self, case: str) -> np.ndarray:
        """Label map (z, y, x) of a preprocessed case ``<case>_image.npy`` (with ``<case>_weight.npy``
        for post-processing when it exists)."""
        image = np.load(case + "_image.npy", mmap_mode="r")
        weight_path = Path(case + "_weight.npy")
        weight = np.load(weight_path, mmap_mode="r") if weight_path.is_file() else None
        return self.segment_array(image, weight)

    def segment_file(
        self, image_path: str | os.PathLike[str], out_path: str | os.PathLike[str]
    ) -> np.ndarray:
        """Preprocess, segment, post-process one raw NIfTI image and write its label map.

        Returns:
            the uint8 (z, y, x) label map as written (original shape).

        Raises:
            DataError: the image cannot be read or does not match the task's modalities.
        """
        image_np, weight, sidecar = preprocess_image(image_path, self.task.plans)
        # on a GPU the (M, z, y, x) image goes there whole (the class scores stay on the CPU)
        image = torch.from_numpy(image_np).to(self.settings.device)
        del image_np
        label = self.segment_array(image, weight)
        del image
        return write_label_nifti(label, sidecar, out_path)

    def predict_files(
        self,
        inputs: Sequence[str | os.PathLike[str]],
        output_dir: str | os.PathLike[str],
        *,
        log: Callable[[str], None] | None = None,
        skip_existing: bool = False,
    ) -> PredictReport:
        """Segment every input image into ``output_dir`` (same file names), going on after failures.

        Outputs are written atomically, so an existing output is always complete: with
        ``skip_existing`` a rerun after an interruption only segments what is missing. Temporary
        files that a killed run left in ``output_dir`` are removed first. When the disk fills up,
        the remaining inputs are reported as not done (each would fail the same way).

        Args:
            inputs: files and/or folders of NIfTI images.
            output_dir: created if missing; an output may not overwrite its input.
            log: where failure messages go (default: ``tqdm.write`` to stderr).
            skip_existing: keep outputs that already exist (``report.skipped``) instead of redoing them.

        Raises:
            OSError: ``output_dir`` cannot be created or written (the message says which and why).
        """

        def _log(msg: str) -> None:
            if log is not None:
                log(msg)
            else:
                tqdm.write(msg, file=sys.stderr)

        out_dir = check_writable_folder(output_dir)
        remove_stale_temporaries(out_dir)  # partial outputs of a killed run (never those of a live one)
        files, problems = collect_inputs(inputs)
        report = PredictReport()
        for path, why in problems:
            report.failed.append((path, why))
            _log(f"FAILED {path}: {why}")
        if skip_existing:
            report.skipped = [out_dir / output_name(f) for f in files if (out_dir / output_name(f)).is_file()]
            files = [f for f in files if not (out_dir / output_name(f)).is_file()]
        bar = tqdm(
            files,
            desc=f"segmenting ({self.task.task_name})",
            unit="image",
            disable=not self.settings.progress,
        )
        for i, path in enumerate(bar):
            bar.set_postfix_str(path.name)
            target = out_dir / output_name(path)
            try:
                if target.resolve() == path.resolve():
                    raise ValueError("output would overwrite the input; choose another --output folder")
                self.segment_file(path, target)
                report.written.append(target)
            except DiskFullError as e:  # the others would fail the same way, after their segmentation
                report.failed.append((path, str(e)))
                _log(f"FAILED {path}: {e}")
                for rest in files[i + 1 :]:
                    report.failed.append((rest, "not done: the disk is full"))
                break
            except Exception as e:  # report the case by name, go on with the others
                if isinstance(e, DataError):
                    reason = e.reason
                else:
                    reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                report.failed.append((path, reason))
                _log(f"FAILED {path}: {reason}")
        return report
