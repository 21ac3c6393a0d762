"""Segment raw NIfTI images with a trained 3D U²-Net checkpoint.

    python predict.py --ckp results/model.pt --task Task04_Hippocampus \\
        --input dataset/Task04_Hippocampus/imagesTs --output predictions/Task04

Every input image (3D, or 4D with the modalities on the 4th axis) is preprocessed with the plans
stored in the checkpoint, segmented with a sliding window, post-processed, put back into its
original geometry and written as a uint8 NIfTI label map with the same file name. Inputs that fail
(unreadable, wrong number of modalities, ...) are reported by name; the others are still
segmented, and the exit status is then 1. See docs/inference.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from utils.checkpoint import CheckpointError
from utils.cpu_perf import keep_freed_memory_in_heap
from utils.predict_api import PredictOptions, load_task_model, predict_files


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" only for options whose default says something."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predict.py",
        description=__doc__.split("\n\n")[0] + " See docs/inference.md.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--ckp", required=True, metavar="CKPT",
                   help="checkpoint file written by training (model settings, task plans and weights)")  # fmt: skip
    p.add_argument("--task", default=None, metavar="NAME",
                   help="task to segment, as named in the checkpoint (e.g. Task04_Hippocampus); "
                        "may be left out when the checkpoint holds a single task")  # fmt: skip
    p.add_argument("--input", required=True, nargs="+", metavar="DIR_OR_FILE",
                   help="NIfTI images (.nii.gz/.nii) and/or folders of them (hidden ._* files are skipped)")  # fmt: skip
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output folder (created if missing); one label map per input, same file name")  # fmt: skip
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the model runs; the probability accumulator always stays in CPU memory")  # fmt: skip
    p.add_argument("--tta", action="store_true",
                   help="mirror test-time augmentation: average over the 8 flips of z, y, x (8x slower; "
                        "off in the paper preset)")  # fmt: skip
    p.add_argument("--no_postprocess", action="store_true",
                   help="skip post-processing (closing, largest component(s), removal outside the body)")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=2, help="sliding-window patches per forward pass")
    p.add_argument("--weight_mode", default="linear", choices=["linear", "gaussian", "constant"],
                   help="patch blending weights: 'linear' = 1 at the patch centre falling linearly to ~0 "
                        "at the corners (paper); 'gaussian'; 'constant' = plain average")  # fmt: skip
    p.add_argument("--unified_mode", default="volume", choices=["volume", "patch"],
                   help="shared/universal checkpoints whose model patch differs from the task patch: "
                        "'volume' scales the whole image by model/task patch (paper), 'patch' resizes "
                        "each window; ignored otherwise")  # fmt: skip
    p.add_argument("--amp", action="store_true",
                   help="mixed precision (float16 autocast on CUDA, bfloat16 on CPU)")  # fmt: skip
    p.add_argument("--fp16_accumulator", action="store_true",
                   help="keep the blended probabilities in float16 (halves that memory; for huge CT volumes)")  # fmt: skip
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("predict.py: --batch_size must be >= 1", file=sys.stderr)
        return 2
    if args.device == "cpu":
        keep_freed_memory_in_heap()  # faster CPU inference on large volumes (utils/cpu_perf.py)
    try:
        loaded = load_task_model(args.ckp, args.task, args.device)
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"predict.py: {e}", file=sys.stderr)
        return 2
    options = PredictOptions(
        device=args.device,
        batch_size=args.batch_size,
        weight_mode=args.weight_mode,
        mirror_tta=args.tta,
        postprocess=not args.no_postprocess,
        unified_mode=args.unified_mode,
        amp=args.amp,
        accum_dtype=torch.float16 if args.fp16_accumulator else torch.float32,
        progress=not args.no_progress,
    )
    report = predict_files(loaded, args.input, args.output, options)
    n_in = len(report.written) + len(report.failed)
    print(f"wrote {len(report.written)} of {n_in} label maps to {args.output}", file=sys.stderr)
    if report.failed:
        print(f"{len(report.failed)} input(s) failed:", file=sys.stderr)
        for path, why in report.failed:
            print(f"  {path}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
