"""Segment raw images (NIfTI, MetaImage, NRRD, DICOM series) with a trained 3D U²-Net checkpoint.

    python predict.py --ckp results/model.pt --task Task04_Hippocampus \\
        --input dataset/Task04_Hippocampus/imagesTs --output predictions/Task04

Every input image (3D, or 4D with the modalities on the 4th axis) is preprocessed with the plans
stored in the checkpoint, segmented with a sliding window, post-processed, put back into its
original geometry and written as a uint8 label map named after its input, in the input's format
(NIfTI, MetaImage .mha, NRRD; NIfTI for DICOM series) unless --output_format says otherwise
(``dicom-seg``: a DICOM Segmentation of each DICOM series, with highdicom). nnU-Net channel files
(``case_0000``, ``case_0001``, ...) form one case; a folder holding one DICOM series is one case
named after its SeriesInstanceUID (``cases.csv`` in --output maps outputs to series). Inputs that fail
(unreadable, wrong number of modalities, ...) are reported by name; the others are still
segmented, and the exit status is then 1. Label maps are written atomically, so those already in
the output folder are complete and kept (a rerun after an interruption does only the rest) unless
--overwrite. See docs/inference.md and docs/reliability.md.

``--model FILE`` segments with one domain exported by ``python -m models.export`` (ONNX or
TorchScript) instead of a checkpoint; see docs/export_and_report.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from inference.backends import BACKENDS, PRECISIONS, RuntimeChoice, choose_runtime, onnxruntime_faster
from inference.dicom import highdicom_problem
from inference.exported import load_exported_task
from inference.inputs import OUTPUT_FORMATS
from inference.predictor import Segmenter, TaskModel, write_predict_settings
from inference.settings import (
    ACCUM_DTYPES,
    BLEND_MODES,
    CLOSING_BORDERS,
    PAD_MODES,
    UNIFIED_MODES,
    VOLUME_RESIZES,
    VOLUME_SCALINGS,
    WEIGHT_MASKS,
    WEIGHT_MODES,
    WINDOW_COUNTS,
    InferenceSettings,
)
from models.export import format_of
from models.runtime import AMP_MODES, keep_freed_memory_in_heap, resolve_device
from models.unet import U2Net3D
from utils.checkpoint import CheckpointError

DEFAULTS = InferenceSettings()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" only for options whose default says something."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line; inference defaults come from :class:`InferenceSettings`."""
    p = argparse.ArgumentParser(
        prog="predict.py",
        description=__doc__.split("\n\n")[0] + " See docs/inference.md.",
        formatter_class=_HelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--ckp",
        metavar="CKPT",
        help="checkpoint file written by training (model settings, task plans and weights)",
    )
    source.add_argument(
        "--model",
        metavar="FILE",
        help="instead of --ckp: one domain exported by 'python -m models.export' (.onnx, run with "
        "onnxruntime on the CPU, or a TorchScript .pt); it carries its task's plans",
    )
    p.add_argument(
        "--task",
        default=None,
        metavar="NAME",
        help="task to segment, as named in the checkpoint (e.g. Task04_Hippocampus); "
        "may be left out when the checkpoint holds a single task (with --model: checked against "
        "the file's task)",
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="DIR_OR_FILE",
        help="images (.nii.gz, .nii, .mha, .mhd, .nrrd; 3D, 4D with the modalities on the 4th axis, or one "
        "file per modality named CASE_0000, CASE_0001, ... as nnU-Net does) and/or folders of them; a folder "
        "holding one DICOM series, or a folder of such folders (hidden ._* files are skipped)",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="output folder (created if missing); one label map per input, same file name",
    )
    p.add_argument(
        "--output_format",
        default=None,
        choices=OUTPUT_FORMATS,
        help="format of the label maps: nifti (.nii.gz), mha (MetaImage), nrrd, or dicom-seg (a DICOM "
        "Segmentation referencing its source series; DICOM input only, needs highdicom); default: each "
        "input's own format (NIfTI for DICOM series)",
    )
    p.add_argument(
        "--device",
        default=DEFAULTS.device,
        help="where the model runs: cpu, cuda, cuda:N or auto; the class-score accumulator always "
        "stays in CPU memory",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="mirror test-time augmentation: average over the 8 flips of z, y, x (8x slower; "
        "off in the paper preset)",
    )
    p.add_argument(
        "--no_postprocess",
        action="store_true",
        help="skip post-processing (closing, largest component(s), removal outside the body)",
    )
    p.add_argument(
        "--batch_size", type=int, default=DEFAULTS.batch_size, help="sliding-window patches per forward pass"
    )
    p.add_argument(
        "--step_fraction",
        type=float,
        default=DEFAULTS.step_fraction,
        help="window step as a fraction of the patch (0.5 = half a patch, the paper)",
    )
    p.add_argument(
        "--weight_mode",
        default=DEFAULTS.weight_mode,
        choices=WEIGHT_MODES,
        help="patch blending weights: 'linear' = 1 at voxel patch//2 falling linearly with the distance to "
        "~0 at the first corner (the original); 'linear_symmetric' = centred at (patch-1)/2, floored at "
        "1e-3 (this project's earlier default); 'gaussian'; 'constant' = plain average",
    )
    p.add_argument(
        "--window_count",
        default=DEFAULTS.window_count,
        choices=WINDOW_COUNTS,
        help="'original': the windows of the original's loop, the last one along each axis counted twice "
        "(run once, weighted twice); 'once': the last window flush with the end, every window once",
    )
    p.add_argument(
        "--pad_mode",
        default=DEFAULTS.pad_mode,
        choices=PAD_MODES,
        help="an axis shorter than the patch is zero-padded by 'ceil_both' = ceil(shortfall/2) on both "
        "sides (the original) or 'exact' = shortfall//2 before and the rest after",
    )
    p.add_argument(
        "--blend",
        default=DEFAULTS.blend,
        choices=BLEND_MODES,
        help="what overlapping windows are blended as: 'logits' (the paper; labels = argmax of the weighted "
        "logits) or softmax 'probabilities'",
    )
    p.add_argument(
        "--volume_resize",
        default=DEFAULTS.volume_resize,
        choices=VOLUME_RESIZES,
        help="with --unified_mode volume: scale the image 'cubic' (the paper, as in training) or 'trilinear'",
    )
    p.add_argument(
        "--volume_scaling",
        default=DEFAULTS.volume_scaling,
        choices=VOLUME_SCALINGS,
        help="with --unified_mode volume: 'pad_floor' = pad to the task patch, scaled size "
        "int(size * model/task patch), labels back to the padded shape, crop (the original); "
        "'round' = no padding first, round()",
    )
    p.add_argument(
        "--unified_mode",
        default=DEFAULTS.unified_mode,
        choices=UNIFIED_MODES,
        help="shared/universal checkpoints whose model patch differs from the task patch: "
        "'volume' scales the whole image by model/task patch (paper), 'patch' resizes "
        "each window; ignored otherwise",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="arithmetic of the network: fp32 (the paper preset, the reference); bf16 (bfloat16 autocast); "
        "fp16 (CUDA only); auto = bf16 where the CPU or GPU computes it natively (AVX-512 BF16 / AMX / "
        "Arm BF16, or a bf16 GPU; never emulated), else fp32. The choice and its reason are printed and "
        "stored in --output/predict_settings.json (docs/performance.md, 'Fast inference paths')",
    )
    p.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="what runs the network: torch (PyTorch, the preset); onnxruntime (CPU, fp32: the task's "
        "domain exported to ONNX in memory, about twice as fast as PyTorch at the paper's width; needs "
        "the onnxruntime package); auto = onnxruntime on a CPU in fp32 when installed, for the networks where "
        "it was measured faster (the dense U-Net and the universal separable model, at least 16 channels "
        "wide), else torch. Default: torch; with --model, the file's engine "
        "(onnxruntime for .onnx, torch for TorchScript)",
    )
    p.add_argument(
        "--amp",
        nargs="?",
        const="auto",
        default=None,
        choices=AMP_MODES,
        help="older spelling of --precision: off = fp32, --amp alone = auto",
    )
    p.add_argument(
        "--accumulator",
        default=DEFAULTS.accum_dtype,
        choices=ACCUM_DTYPES,
        help="dtype of the blended class scores: float64 (the original), float32 (half the memory), "
        "float16 (a quarter; for huge CT volumes)",
    )
    p.add_argument(
        "--fp16_accumulator",
        action="store_true",
        help="the same as --accumulator float16",
    )
    p.add_argument(
        "--closing_border",
        default=DEFAULTS.closing_border,
        choices=CLOSING_BORDERS,
        help="post-processing closing: 'erode' = over the whole grid, foreground on its faces eroded "
        "(the original); 'keep' = the faces are not eroded",
    )
    p.add_argument(
        "--weight_mask",
        default=DEFAULTS.weight_mask,
        choices=WEIGHT_MASKS,
        help="post-processing removes predictions outside the body 'before' the closing (the original) "
        "or 'before_after' (also what the closing adds there)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="segment every input again; by default inputs whose label map already exists in --output are "
        "skipped (outputs are written atomically, so an existing one is complete: a rerun after an "
        "interruption only does what is missing)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="segment a folder one case and one stage at a time; by default the next case is read and "
        "preprocessed and the previous one post-processed and written while the network runs (at most "
        "one case ahead; the same label maps)",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def runtime_from_args(args: argparse.Namespace, ort_faster: bool = True) -> RuntimeChoice:
    """The precision and backend of parsed flags (``--amp``, if given, stands for ``--precision``)."""
    precision = args.precision
    if args.amp is not None:
        precision = {"off": "fp32"}.get(args.amp, args.amp)
    backend = args.backend
    if args.model is not None:  # an exported file runs with its own engine
        fmt = "onnxruntime" if format_of(args.model) == "onnx" else "torch"
        if backend not in (None, "auto", fmt):
            raise ValueError(
                f"--backend {backend} cannot run {args.model!r} (a {format_of(args.model)} file)"
            )
        backend = fmt
        if fmt == "onnxruntime" and precision == "auto":
            precision = "fp32"
    return choose_runtime(precision, backend or "torch", resolve_device(args.device), ort_faster=ort_faster)


def settings_from_args(args: argparse.Namespace, runtime: RuntimeChoice | None = None) -> InferenceSettings:
    """The inference settings of parsed flags (device, precision and backend resolved)."""
    runtime = runtime or runtime_from_args(args)
    return InferenceSettings(
        device=runtime.device,
        batch_size=args.batch_size,
        step_fraction=args.step_fraction,
        weight_mode=args.weight_mode,
        window_count=args.window_count,
        pad_mode=args.pad_mode,
        blend=args.blend,
        volume_resize=args.volume_resize,
        volume_scaling=args.volume_scaling,
        mirror_tta=args.tta,
        postprocess=not args.no_postprocess,
        closing_border=args.closing_border,
        weight_mask=args.weight_mask,
        unified_mode=args.unified_mode,
        amp=runtime.amp,
        backend="torch" if args.model is not None else runtime.backend,  # type: ignore[arg-type]
        accum_dtype="float16" if args.fp16_accumulator else args.accumulator,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None, *, tune_cpu_allocator: bool = False) -> int:
    """Segment the inputs; returns the exit status (0 all written, 1 some inputs failed, 2 bad usage).

    ``tune_cpu_allocator``: keep freed memory in the heap on CPU (process-wide; only for the
    script's own process, see :func:`models.runtime.keep_freed_memory_in_heap`).
    """
    args = build_parser().parse_args(argv)
    if args.output_format == "dicom-seg" and (missing := highdicom_problem()):
        print(f"predict.py: {missing}", file=sys.stderr)
        return 2
    try:
        device = str(resolve_device(args.device))
        if args.model is not None:
            task = load_exported_task(args.model, args.task, device)
        else:
            task = TaskModel.from_checkpoint(args.ckp, args.task, device)
        cfg = task.model.config if isinstance(task.model, U2Net3D) else None
        faster = cfg is None or onnxruntime_faster(cfg.train_mode, cfg.module, cfg.base_channels)
        runtime = runtime_from_args(args, faster)
        settings = settings_from_args(args, runtime)
        segmenter = Segmenter(task, settings)
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"predict.py: {e}", file=sys.stderr)
        return 2
    print(f"predict.py: {runtime.describe()}", file=sys.stderr)
    if tune_cpu_allocator and settings.device == "cpu":
        keep_freed_memory_in_heap()  # faster CPU inference on large volumes
    try:
        write_predict_settings(
            args.output, runtime, settings, source=args.model or args.ckp, task=task.task_name
        )
        report = segmenter.predict_files(
            args.input,
            args.output,
            skip_existing=not args.overwrite,
            output_format=args.output_format,
            pipeline=not args.sequential,
        )
    except OSError as e:  # the output folder cannot be created or written
        print(f"predict.py: {e}", file=sys.stderr)
        return 2
    n_in = len(report.written) + len(report.failed) + len(report.skipped)
    print(f"wrote {len(report.written)} of {n_in} label maps to {args.output}", file=sys.stderr)
    if report.skipped:
        print(
            f"{len(report.skipped)} label map(s) already in {args.output} were kept (--overwrite redoes them)",
            file=sys.stderr,
        )
    if report.failed:
        print(f"{len(report.failed)} input(s) failed:", file=sys.stderr)
        for path, why in report.failed:
            print(f"  {path}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(tune_cpu_allocator=True))
