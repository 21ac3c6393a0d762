"""The predictor used by ``predict.py`` and by training's validation.

A :class:`TaskModel` is a trained network ready for one of its tasks (model, task index, the task's
plans, the model patch). A :class:`Segmenter` pairs it with one :class:`InferenceSettings` and
segments:

* a preprocessed array (:meth:`Segmenter.segment_array`): sliding window
  (:func:`inference.sliding_window.infer_case`, with the unified-patch resize when the model patch
  differs from the task patch), then post-processing (:func:`inference.postprocess.postprocess`);
* a preprocessed case on disk (:meth:`Segmenter.segment_prepared_case`, validation);
* a raw image (:meth:`Segmenter.segment_file`: a NIfTI, MetaImage or NRRD file, nnU-Net channel
  files or a DICOM series folder): the task's preprocessing from its plans
  (:func:`utils.preprocessing.preprocess_image`), the above, and the label map put back into the
  original geometry as a uint8 image of the output's format (:func:`inference.geometry.write_label_nifti`,
  which writes the format its suffix names)
  or a DICOM Segmentation (:func:`inference.dicom.write_dicom_seg`);
* files and folders (:meth:`Segmenter.predict_files`, cases found by :func:`inference.inputs.collect_cases`):
  a bad input is reported by name and skipped, the others are still segmented; DICOM inputs are listed
  in ``cases.csv`` beside the outputs.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from inference.backends import OnnxRuntimeNetwork, RuntimeChoice
from inference.dicom import highdicom_problem, write_dicom_seg
from inference.geometry import restore_to_original, write_label_nifti
from inference.inputs import InputCase, collect_cases, output_format_problem
from inference.postprocess import postprocess
from inference.settings import InferenceSettings
from inference.sliding_window import NetworkFn, infer_case
from models.loading import build_model_from_checkpoint
from models.runtime import resolve_device
from models.unet import U2Net3D
from utils.checkpoint import choose_task, load_checkpoint
from utils.decathlon import DataError, ImageSource
from utils.dicom_series import DicomSeries
from utils.io_utils import (
    DiskFullError,
    atomic_write_csv,
    atomic_write_json,
    check_writable_folder,
    remove_stale_temporaries,
)
from utils.preprocessing import preprocess_image
from utils.triples import Int3, int3

__all__ = [
    "CASES_CSV",
    "PREDICT_SETTINGS_JSON",
    "PredictReport",
    "Segmenter",
    "TaskModel",
    "collect_cases",
    "write_predict_settings",
]

#: how the label maps in a folder were made (precision, backend, every inference setting)
PREDICT_SETTINGS_JSON = "predict_settings.json"

#: the table of DICOM inputs written beside their outputs (output file -> series)
CASES_CSV = "cases.csv"
CASES_COLUMNS = [
    "output",
    "status",
    "series_uid",
    "series_description",
    "modality",
    "files",
    "folder",
    "reason",
]


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
        model_file: the checkpoint's file name (recorded in DICOM Segmentations), "" when unknown.
    """

    model: U2Net3D | NetworkFn
    task_idx: int
    task_name: str
    plans: dict[str, Any]
    model_patch: Int3 | None = None
    model_file: str = ""

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
        return cls(model, idx, task, plans, int3(mp) if mp is not None else None, Path(ckpt_path).name)


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


@dataclass
class _LoadedCase:
    """A raw image after the task's preprocessing: image (M, z, y, x) float32 (dropped once on the
    network's device), weight map (z, y, x) uint8 and the sidecar (geometry) dict."""

    image: np.ndarray | None
    weight: np.ndarray
    sidecar: dict[str, Any]


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
        self._run: U2Net3D | NetworkFn = task.model
        if settings.backend == "onnxruntime":
            if isinstance(task.model, U2Net3D):  # the task's domain, exported to ONNX in memory
                self._run = OnnxRuntimeNetwork(task.model, task.task_idx)
            elif getattr(getattr(task.model, "exported", None), "format", None) != "onnx":
                raise ValueError("backend onnxruntime needs a checkpoint's model or an .onnx file")

    def _network(self, x: torch.Tensor, task_idx: int) -> torch.Tensor:
        return self._run(x, task_idx)

    def segment_array(self, image: np.ndarray | torch.Tensor, weight: np.ndarray | None = None) -> np.ndarray:
        """Label map of a preprocessed case.

        Args:
            image: (M, z, y, x) preprocessed image (NumPy, memmap, or a tensor on the device).
            weight: (z, y, x) weight map (non-zero inside the body) for post-processing, or None.

        Returns:
            uint8 (z, y, x) label map, post-processed when the settings say so.
        """
        return self._postprocess(self._network_labels(image), weight)

    def _network_labels(self, image: np.ndarray | torch.Tensor) -> np.ndarray:
        """The network stage: uint8 (z, y, x) labels of a preprocessed (M, z, y, x) case, not post-processed."""
        t = self.task
        return infer_case(
            self._network,
            image,
            t.task_idx,
            t.task_patch,
            self.settings,
            model_patch=t.model_patch,
            num_classes=t.num_classes,
        )

    def _postprocess(self, label: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
        if not self.settings.postprocess:
            return label
        return postprocess(
            label,
            self.task.plans,
            weight,
            closing_border=self.settings.closing_border,
            weight_mask=self.settings.weight_mask,
        )

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
        self,
        image_path: ImageSource,
        out_path: str | os.PathLike[str],
        *,
        series: DicomSeries | None = None,
    ) -> np.ndarray:
        """Preprocess, segment, post-process one raw image and write its label map.

        Args:
            image_path: an image file, the channel files of one case, or a folder holding one DICOM
                series (:func:`utils.decathlon.read_image`).
            out_path: the output; its suffix picks the format (``.nii.gz``/``.nii``, ``.mha``, ``.nrrd``;
                ``.dcm``: a DICOM Segmentation of ``series``).
            series: the DICOM series of ``image_path`` (needed for ``.dcm`` outputs).

        Returns:
            the uint8 (z, y, x) label map as written (original shape).

        Raises:
            DataError: the image cannot be read or does not match the task's modalities.
        """
        loaded = self._load(image_path)
        return self._finish(self._network_stage(loaded), loaded, out_path, series)

    # the three stages of a raw image, run one after another (segment_file) or overlapped over a
    # folder (predict_files): read + preprocess, network, post-process + write
    def _load(self, image_path: ImageSource) -> _LoadedCase:
        image, weight, sidecar = preprocess_image(image_path, self.task.plans)
        return _LoadedCase(image, weight, sidecar)

    def _network_stage(self, loaded: _LoadedCase) -> np.ndarray:
        # on a GPU the (M, z, y, x) image goes there whole (the class scores stay on the CPU)
        image = torch.from_numpy(loaded.image).to(self.settings.device)
        loaded.image = None  # the preprocessed image is not needed after this stage
        return self._network_labels(image)

    def _finish(
        self,
        raw_label: np.ndarray,
        loaded: _LoadedCase,
        out_path: str | os.PathLike[str],
        series: DicomSeries | None,
    ) -> np.ndarray:
        label = self._postprocess(raw_label, loaded.weight)
        if str(out_path).lower().endswith(".dcm"):
            if series is None:
                raise ValueError("a DICOM Segmentation needs the source DICOM series")
            full = restore_to_original(label, loaded.sidecar)
            write_dicom_seg(
                full, series, self.task.plans, out_path, task=self.task.task_name, model=self.task.model_file
            )
            return full
        return write_label_nifti(label, loaded.sidecar, out_path)  # SimpleITK writes the format of the suffix

    def predict_files(
        self,
        inputs: Sequence[str | os.PathLike[str]],
        output_dir: str | os.PathLike[str],
        *,
        log: Callable[[str], None] | None = None,
        skip_existing: bool = False,
        output_format: str | None = None,
        pipeline: bool = True,
    ) -> PredictReport:
        """Segment every input case into ``output_dir``, going on after failures.

        Inputs become cases as :func:`inference.inputs.collect_cases` says (image files, nnU-Net channel
        files of one case, DICOM series folders); each output is named after its case in the input's
        format, or in ``output_format``. DICOM cases are listed in ``output_dir/cases.csv`` (output file,
        status, series UID, description, modality, file count, folder, reason).

        Outputs are written atomically, so an existing output is always complete: with
        ``skip_existing`` a rerun after an interruption only segments what is missing. Temporary
        files that a killed run left in ``output_dir`` are removed first. When the disk fills up,
        the remaining inputs are reported as not done (each would fail the same way).

        Args:
            inputs: files and/or folders (of images, of DICOM series).
            output_dir: created if missing; an output may not overwrite its input.
            log: where failure messages go (default: ``tqdm.write`` to stderr).
            skip_existing: keep outputs that already exist (``report.skipped``) instead of redoing them.
            output_format: ``"nifti"``, ``"mha"``, ``"nrrd"`` or ``"dicom-seg"`` (DICOM inputs only);
                None: each input's own format (NIfTI for DICOM series).
            pipeline: overlap the stages of consecutive cases (read + preprocess the next case and
                post-process + write the previous one while the network runs); False: one case,
                one stage after another. The label maps are the same either way.

        Raises:
            OSError: ``output_dir`` cannot be created or written (the message says which and why).
        """

        def _log(msg: str) -> None:
            if log is not None:
                log(msg)
            else:
                tqdm.write(msg, file=sys.stderr)

        def _fail(case: InputCase, path: Path, why: str, *, quiet: bool = False) -> None:
            report.failed.append((path, why))
            status[case.name] = ("failed", why)
            if not quiet:
                _log(f"FAILED {path}: {why}")

        out_dir = check_writable_folder(output_dir)
        remove_stale_temporaries(out_dir)  # partial outputs of a killed run (never those of a live one)
        cases, problems = collect_cases(inputs, len(self.task.plans["modalities"]), output_format)
        report = PredictReport()
        status: dict[str, tuple[str, str]] = {}
        for path, why in problems:
            report.failed.append((path, why))
            _log(f"FAILED {path}: {why}")
        todo: list[InputCase] = []
        no_seg = highdicom_problem() if output_format == "dicom-seg" else None
        for case in cases:
            refused = output_format_problem(case, output_format) or no_seg
            if refused:
                _fail(case, case.path, refused)
            elif skip_existing and (out_dir / case.output_name(output_format)).is_file():
                report.skipped.append(out_dir / case.output_name(output_format))
                status[case.name] = ("kept", "")
            else:
                todo.append(case)
        bar = tqdm(
            total=len(todo),
            desc=f"segmenting ({self.task.task_name})",
            unit="image",
            disable=not self.settings.progress,
        )

        def _failed(case: InputCase, e: BaseException) -> None:
            if isinstance(e, DataError):
                path, reason = Path(e.path), e.reason
            else:
                path, reason = case.path, (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            _fail(case, path, reason)

        def _load(case: InputCase) -> _LoadedCase:
            target = out_dir / case.output_name(output_format)
            sources = [case.source] if isinstance(case.source, Path) else list(case.source)
            if case.kind != "dicom" and any(target.resolve() == p.resolve() for p in sources):
                raise ValueError("output would overwrite the input; choose another --output folder")
            return self._load(case.source)

        # Pipelined (docs/inference.md, "A folder of cases"): while the network segments case n, a
        # reader thread preprocesses case n+1 and a writer thread post-processes and writes case n-1
        # (at most one case ahead, one behind). Sequential: each case's three stages in turn.
        reader = ThreadPoolExecutor(1, thread_name_prefix="u2net-read") if pipeline else None
        writer = ThreadPoolExecutor(1, thread_name_prefix="u2net-write") if pipeline else None

        def _start_load(i: int) -> Future[_LoadedCase] | None:
            if reader is None or i >= len(todo):
                return None
            return reader.submit(_load, todo[i])

        writing: tuple[InputCase, Callable[[], object]] | None = None
        disk_full = False

        def _collect(job: tuple[InputCase, Callable[[], object]] | None) -> None:
            """Finish (or wait for) a case's post-processing and write; record the outcome."""
            nonlocal disk_full
            if job is None:
                return
            case, finish = job
            try:
                finish()
                report.written.append(out_dir / case.output_name(output_format))
                status[case.name] = ("written", "")
            except DiskFullError as e:  # the others would fail the same way, after their segmentation
                _fail(case, case.path, str(e))
                disk_full = True
            except Exception as e:  # report the case by name, go on with the others
                _failed(case, e)
            bar.update(1)

        try:

            def _rest_not_done(start: int) -> None:
                for rest in todo[start:]:
                    _fail(rest, rest.path, "not done: the disk is full", quiet=True)

            next_load = _start_load(0)
            for i, case in enumerate(todo):
                if disk_full:
                    _rest_not_done(i)
                    break
                bar.set_postfix_str(case.output_name(output_format))
                target = out_dir / case.output_name(output_format)
                try:
                    this_load, next_load = next_load, _start_load(i + 1)
                    loaded = this_load.result() if this_load is not None else _load(case)
                    raw_label = self._network_stage(loaded)
                except Exception as e:
                    _failed(case, e)
                    bar.update(1)
                    continue
                job = functools.partial(self._finish, raw_label, loaded, target, case.series)
                if writer is None:
                    _collect((case, job))
                else:
                    _collect(writing)  # the previous case's write: at most one case behind
                    writing = None
                    if disk_full:  # this case would fail the same way
                        _rest_not_done(i)
                        break
                    writing = (case, writer.submit(job).result)
            _collect(writing)
        finally:
            for pool in (reader, writer):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        dicom = [c for c in cases if c.series is not None]
        if dicom:  # which output is which series
            rows = [
                {
                    "output": c.output_name(output_format),
                    "status": status.get(c.name, ("failed", ""))[0],
                    "series_uid": c.series.uid,
                    "series_description": c.series.description,
                    "modality": c.series.modality,
                    "files": c.series.n_files,
                    "folder": str(c.series.folder),
                    "reason": status.get(c.name, ("", ""))[1],
                }
                for c in dicom
                if c.series is not None
            ]
            atomic_write_csv(out_dir / CASES_CSV, CASES_COLUMNS, rows)
        return report


def write_predict_settings(
    output_dir: str | os.PathLike[str],
    runtime: RuntimeChoice,
    settings: InferenceSettings,
    *,
    source: str | os.PathLike[str],
    task: str,
) -> Path:
    """Write ``output_dir/predict_settings.json``: the model file and task, the chosen precision and
    backend with the reason (:class:`inference.backends.RuntimeChoice`) and every inference setting.

    Raises:
        OSError: ``output_dir`` cannot be created or written.
    """
    out_dir = check_writable_folder(output_dir)
    path = out_dir / PREDICT_SETTINGS_JSON
    atomic_write_json(
        path,
        {
            "model": os.fspath(source),
            "task": task,
            "runtime": runtime.to_json(),
            "settings": asdict(settings),
        },
    )
    return path
