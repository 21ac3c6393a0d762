"""Offline preprocessing of tasks in the MSD or nnU-Net v2 layout (docs/paper_preset.md, "Preprocessing").

    python preprocess_taskSep.py --dataset_dir dataset/ --prep_dir prepData/ [--tasks ...] [--nProc N]

Writes ``<prep_dir>/<task>/plans.json`` and per case ``train/`` or ``test/`` arrays plus a JSON
sidecar (``docs/formats.md``), and adds 5 fold splits per task to ``fold_splits.json``. Cases
already done are skipped unless ``--overwrite``; failed cases are listed at the end and make the
exit code 1. See ``docs/data_pipeline.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from utils.folds import default_folds_file
from utils.prep_runner import run_preprocessing


def _label_map(text: str) -> dict[int, int]:
    """Parse ``'{"0":0,"1":1,"2":1}'`` or ``0:0,1:1,2:1``."""
    try:
        data = (
            json.loads(text) if text.strip().startswith("{") else dict(p.split(":") for p in text.split(","))
        )
        return {int(k): int(v) for k, v in data.items()}
    except (ValueError, AttributeError) as e:
        raise argparse.ArgumentTypeError(f"not a label map: {text!r} (use '0:0,1:1,2:1' or JSON)") from e


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    ap = argparse.ArgumentParser(
        description="Crop, resample, normalise and save tasks (MSD or nnU-Net v2 layout) for training/inference (one plans.json "
        "per task, one set of .npy arrays + JSON sidecar per case), in parallel and resumable.",
    )
    ap.add_argument(
        "--dataset_dir",
        default="dataset",
        help="folder holding the task folders: MSD Task* or nnU-Net v2 Dataset* folders, each with its "
        "dataset.json (default: dataset)",
    )
    ap.add_argument("--prep_dir", default="prepData", help="output folder (default: prepData)")
    ap.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="task folder names to process (default: every folder with a dataset.json)",
    )
    ap.add_argument(
        "--nProc",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="worker processes; 1 runs in this process (default: min(4, CPU count))",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="redo cases that are already done and accept settings that differ from an existing plans.json",
    )
    ap.add_argument(
        "--folds_file",
        default=None,
        help="fold splits JSON to create/extend; existing task entries are kept "
        "(default: <prep_dir>/fold_splits.json, where training looks for it)",
    )
    ap.add_argument("--no_folds", action="store_true", help="do not touch any fold splits file")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    g = ap.add_argument_group(
        "settings overrides (apply to every selected task; default: paper preset or derived)"
    )
    g.add_argument(
        "--target_spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="target spacing in mm"
    )
    g.add_argument("--patch_size", type=int, nargs=3, metavar=("Z", "Y", "X"), help="patch size in voxels")
    g.add_argument("--pools", type=int, nargs=3, metavar=("Z", "Y", "X"), help="stride-2 poolings per axis")
    g.add_argument("--batch_size", type=int, help="batch size of the independent model")
    g.add_argument(
        "--label_map",
        type=_label_map,
        help="raw label -> class, e.g. '0:0,1:1,2:1' to fuse label 2 into 1; unlisted values become 0",
    )
    g.add_argument(
        "--keep_components",
        type=int,
        choices=(1, 2),
        help="post-processing: keep the largest 1 or 2 components",
    )
    g.add_argument(
        "--zero_upper_half_x",
        choices=("on", "off"),
        default=None,
        help="post-processing: clear every voxel at last-axis index >= W // 2 before keeping the largest "
        "component (the original did this for Task09_Spleen only, which is 'on' by default)",
    )
    g.add_argument("--small_label", type=int, help='class whose bounding box "small" patches sample')
    g.add_argument(
        "--zero_mask",
        choices=("none", "nearest"),
        help="'nearest': the zero background of the original image stays 0 after B-spline resampling "
        "(default for tasks outside the paper preset); 'none': as the paper (default for preset tasks)",
    )
    g.add_argument(
        "--resample_grid",
        choices=("original", "centred"),
        help="'original' (default): the original's SimpleITK grid (image origin and direction, spacings "
        "rounded to 3 decimals, int(n * spacing / target) voxels, the file's voxel type, e.g. int16 CT); "
        "'centred': the crop's physical extent with voxel centres aligned, round(n * spacing / target) "
        "voxels, float32. Predictions go back to the original grid by the inverse of the same grid",
    )
    g.add_argument(
        "--ct_clip_for",
        choices=("all", "ct"),
        help="which tasks get the clip below -1024: 'all' (default, as the original) or 'ct' (CT tasks only)",
    )
    g.add_argument(
        "--ignore_preset",
        action="store_true",
        help="derive every setting from the data even for tasks in the settings table",
    )
    g.add_argument(
        "--max_voxels", type=int, default=None, help="voxel budget of a derived patch (default 128**3)"
    )
    return ap


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``utils.task_settings.build_plans`` from the parsed flags."""
    out: dict[str, Any] = {}
    pairs = {
        "target_spacing": args.target_spacing,
        "patch_size": args.patch_size,
        "pools_per_axis": args.pools,
        "batch_size": args.batch_size,
        "label_map": args.label_map,
        "keep_components": args.keep_components,
        "small_label": args.small_label,
        "max_voxels": args.max_voxels,
        "zero_mask": args.zero_mask,
        "resample_grid": args.resample_grid,
        "ct_clip_for": args.ct_clip_for,
        "zero_upper_half_x": None if args.zero_upper_half_x is None else args.zero_upper_half_x == "on",
    }
    out.update({k: v for k, v in pairs.items() if v is not None})
    if args.ignore_preset:
        out["use_preset"] = False
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preprocessing; returns the exit code (0 = every case done, 1 = failures)."""
    args = build_parser().parse_args(argv)
    if args.nProc < 1:
        print("--nProc must be >= 1", file=sys.stderr)
        return 2
    folds_file = args.folds_file or default_folds_file(args.prep_dir)
    try:
        summary = run_preprocessing(
            args.dataset_dir,
            args.prep_dir,
            tasks=args.tasks,
            n_proc=args.nProc,
            overwrite=args.overwrite,
            folds_file=None if args.no_folds else folds_file,
            overrides=overrides_from_args(args),
            progress=not args.no_progress,
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"\n{summary.done} case(s) preprocessed, {summary.skipped} already done, {len(summary.failed)} failed "
        f"in {summary.seconds:.1f} s; prepared data in {args.prep_dir}"
    )
    if summary.folds_added:
        added = ", ".join(f"{task} ({source})" for task, source in summary.folds_added.items())
        print(f"fold splits added to {folds_file} for: {added}")
    if summary.task_errors:
        print("\nFailed tasks:")
        for task, reason in summary.task_errors.items():
            print(f"  {task}: {reason}")
    if summary.failed:
        print("\nFailed cases:")
        for r in summary.failed:
            print(f"  {r.task}/{r.case_id}: {r.file}: {r.reason}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
