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

from inference.dicom import highdicom_problem
from inference.exported import load_exported_task
from inference.inputs import OUTPUT_FORMATS
from inference.predictor import Segmenter, TaskModel
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
from models.runtime import AMP_MODES, keep_freed_memory_in_heap, resolve_amp, resolve_device
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
        "--amp",
        nargs="?",
        const="auto",
        default=DEFAULTS.amp,
        choices=AMP_MODES,
        help="mixed precision autocast: --amp alone = auto (bfloat16 where supported, else float16 "
        "on CUDA); off = fp32 (the paper preset)",
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
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def settings_from_args(args: argparse.Namespace) -> InferenceSettings:
    """The inference settings of parsed flags (device and AMP resolved)."""
    device = resolve_device(args.device)
    return InferenceSettings(
        device=str(device),
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
        amp=resolve_amp(args.amp, device),
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
        settings = settings_from_args(args)
        if args.model is not None:
            task = load_exported_task(args.model, args.task, settings.device)
        else:
            task = TaskModel.from_checkpoint(args.ckp, args.task, settings.device)
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"predict.py: {e}", file=sys.stderr)
        return 2
    if tune_cpu_allocator and settings.device == "cpu":
        keep_freed_memory_in_heap()  # faster CPU inference on large volumes
    try:
        report = Segmenter(task, settings).predict_files(
            args.input, args.output, skip_existing=not args.overwrite, output_format=args.output_format
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
