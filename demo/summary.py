"""Summary of the laptop demo: Dice per (mode, task, class) of the test predictions, and parameters.

    python -m demo.summary --dataset_dir dataset_demo --results_dir results/demo \\
        --run independent=results/demo/res_u2net3d_independent_demo \\
        --run shared=results/demo/res_u2net3d_shared_demo/Task91_..._Task93_... ...

For every ``--run MODE=FOLDER`` the checkpoint(s) below FOLDER (``*/checkpoints/best.pt`` or
``checkpoints/best.pt``) say which tasks the mode has and how many parameters it costs; the
predictions are read from ``<results_dir>/predictions/<MODE>/<task>/<case>.nii.gz`` (written by
``predict.py``) and compared with the test labels ``<dataset_dir>/<task>/labelsTs/<case>.nii.gz``
(the demo generator writes them; real MSD tasks have none), in the original geometry. Raw label
values are mapped to the classes the model uses with the plans' ``label_map`` (e.g. the demo
liver's tumour is fused into the liver). Writes ``<results_dir>/summary.csv`` with one row per (mode, task, foreground class):

``mode, task, class, class_name, dice, hd95_mm, num_cases, params, task_params``

``dice`` (and ``hd95_mm``) is the mean over the task's test cases (:func:`utils.metrics.evaluate_folder`,
per-case CSVs in ``<results_dir>/eval/<mode>/<task>.csv``); ``params`` the parameters of the model that
segments the task (independent: the task's own model; shared/universal: the one model of all
tasks; universal_adapted: the extended model, old tasks included; an adaptation with
``--adapt_scope original_code``: the new model of the new task alone) and ``task_params`` the part
of them specific to the task. For an adapted domain that is what the new domain costs: the
parameters its run trained (its adapters, norms and heads when the trained model was extended;
everything but the copied, frozen convolution weights with ``--adapt_scope original_code``).

A domain whose label set grew (``--add_classes_to``, e.g. mode ``universal_new_classes``) gets a row per
class of its new label set (old and new classes), and one per class of its OLD label set under the
domain's old name: the predictions mapped back to the old classes (a new class into the class its raw
label values belonged to, e.g. tumour into liver) against the same test labels read with the old
``label_map`` -- what the grown model does on the task it was trained for before, to set beside that
model's own row. The mapped predictions go to ``<results_dir>/eval/<mode>/<task>_as_<domain>/``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from models.loading import build_model_from_checkpoint
from models.params import parameter_counts
from utils.checkpoint import best_checkpoints, load_checkpoint
from utils.io_utils import atomic_write_csv, atomic_write_image
from utils.metrics import evaluate_folder

FIELDS = ("mode", "task", "class", "class_name", "dice", "hd95_mm", "num_cases", "params", "task_params")


def evaluate_mode(
    mode: str, folder: Path, dataset_dir: Path, results_dir: Path, tasks: Sequence[str] | None
) -> list[dict[str, Any]]:
    """Rows of one mode: every trained task of every checkpoint below ``folder``."""
    rows = []
    for ck_path in best_checkpoints(folder):
        ckpt = load_checkpoint(ck_path)
        model, ck_tasks = build_model_from_checkpoint(ckpt)
        counts = parameter_counts(model)
        train_state = ckpt.get("train_state") or {}
        trained = train_state.get("trained_tasks") or list(range(len(ck_tasks)))
        frozen = set(train_state.get("frozen_parameters") or [])
        own = sum(p.numel() for n, p in model.named_parameters() if n not in frozen) if frozen else None
        for t in trained:
            name, plans = ck_tasks[t]["name"], ck_tasks[t]["plans"]
            if tasks and name not in tasks:
                continue
            label_dir = dataset_dir / name / "labelsTs"
            pred_dir = results_dir / "predictions" / mode / name
            if not label_dir.is_dir():
                raise FileNotFoundError(f"no test labels {label_dir}")
            case_rows, means = evaluate_folder(
                pred_dir,
                label_dir,
                int(plans["num_classes"]),
                label_map=plans.get("label_map"),
                csv_path=results_dir / "eval" / mode / f"{name}.csv",
            )
            names = plans.get("labels") or {}
            task_params = own if own is not None else counts.per_task[t]
            for c in range(1, int(plans["num_classes"])):
                rows.append(
                    {
                        "mode": mode,
                        "task": name,
                        "class": c,
                        "class_name": names.get(str(c), f"class{c}"),
                        "dice": float(means[f"dice_{c}"]),
                        "hd95_mm": float(means[f"hd95_{c}"]),
                        "num_cases": len(case_rows),
                        "params": counts.total,
                        "task_params": task_params,
                    }
                )
            ext = (train_state.get("config") or {}).get("extension") or {}
            if ext.get("kind") == "new_classes" and int(ext.get("index", -1)) == t:
                rows += _old_label_set_rows(
                    mode, ext, plans, pred_dir, label_dir, results_dir, counts.total, task_params
                )
    return rows


def old_class_of_new(new_plans: Mapping[str, Any], old_label_map: Mapping[str, Any]) -> dict[int, int]:
    """The class of a grown domain's OLD label set that each class of its new one falls into: through the
    raw label values (new class c holds raw values R; it was old class ``old_label_map[min(R)]``, 0 for a
    raw value the old set did not list)."""
    raw_of: dict[int, list[int]] = {}
    for raw, c in (new_plans.get("label_map") or {}).items():
        raw_of.setdefault(int(c), []).append(int(raw))
    old = {int(k): int(v) for k, v in old_label_map.items()}
    return {c: old.get(min(raws), 0) for c, raws in raw_of.items()}


def _old_label_set_rows(
    mode: str,
    ext: Mapping[str, Any],
    new_plans: Mapping[str, Any],
    pred_dir: Path,
    label_dir: Path,
    results_dir: Path,
    params: int,
    task_params: int,
) -> list[dict[str, Any]]:
    """A grown domain scored on its OLD label set (``ext``: the run's ``extension``): its predictions mapped
    back to the old classes (:func:`old_class_of_new`, e.g. tumour -> liver when the tumour was fused into
    the liver) against the same test labels read with the old ``label_map``; one row per old foreground
    class, task = the domain's old name, to compare with the model it grew from."""
    mapping = old_class_of_new(new_plans, ext["old_label_map"])
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for c, old in mapping.items():
        lut[c] = old
    mapped_dir = results_dir / "eval" / mode / f"{ext['task']}_as_{ext['domain']}"
    for f in sorted(pred_dir.iterdir()):
        if not f.name.endswith((".nii.gz", ".nii")) or f.name.startswith("."):
            continue  # what evaluate_folder reads
        img = sitk.ReadImage(str(f))
        out = sitk.GetImageFromArray(lut[np.clip(sitk.GetArrayFromImage(img), 0, len(lut) - 1)])
        out.CopyInformation(img)
        atomic_write_image(out, mapped_dir / f.name)
    k_old = int(ext["classes_before"])
    case_rows, means = evaluate_folder(
        mapped_dir,
        label_dir,
        k_old,
        label_map=ext["old_label_map"],
        csv_path=results_dir / "eval" / mode / f"{ext['domain']}.csv",
    )
    names = ext.get("old_labels") or {}
    return [
        {
            "mode": mode,
            "task": ext["domain"],
            "class": c,
            "class_name": names.get(str(c), f"class{c}"),
            "dice": float(means[f"dice_{c}"]),
            "hd95_mm": float(means[f"hd95_{c}"]),
            "num_cases": len(case_rows),
            "params": params,
            "task_params": task_params,
        }
        for c in range(1, k_old)
    ]


def format_table(rows: Sequence[dict]) -> str:
    w_mode = max([18, *(len(str(r["mode"])) for r in rows)])
    w_task = max([24, *(len(str(r["task"])) for r in rows)])
    head = (
        f"{'mode':{w_mode}s} {'task':{w_task}s} {'class':14s} {'dice':>6s} {'hd95':>6s} {'params':>10s} "
        f"{'task_params':>11s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['mode']:{w_mode}s} {r['task']:{w_task}s} {str(r['class']) + ' ' + r['class_name']:14s} "
            f"{r['dice']:6.3f} {r['hd95_mm']:6.2f} {r['params']:>10,} {r['task_params']:>11,}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset_dir", required=True, help="demo data (Task folders with labelsTs)")
    ap.add_argument(
        "--results_dir", required=True, help="demo results folder (predictions/<mode>/<task>/ inside)"
    )
    ap.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="MODE=FOLDER",
        help="a mode name and the run folder(s) of its checkpoint(s); repeat per mode",
    )
    ap.add_argument("--tasks", nargs="+", default=None, help="only these tasks")
    ap.add_argument("--min_dice", type=float, default=0.8, help="report every foreground Dice below this")
    ap.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a Dice is below --min_dice"
    )
    args = ap.parse_args(argv)
    results = Path(args.results_dir)
    rows: list[dict] = []
    for item in args.run:
        mode, sep, folder = item.partition("=")
        if not sep:
            ap.error(f"--run needs MODE=FOLDER, got {item!r}")
        rows += evaluate_mode(mode, Path(folder), Path(args.dataset_dir), results, args.tasks)
    out = results / "summary.csv"
    atomic_write_csv(
        out, FIELDS, [{**r, "dice": f"{r['dice']:.4f}", "hd95_mm": f"{r['hd95_mm']:.2f}"} for r in rows]
    )
    print(format_table(rows))
    low = [r for r in rows if r["dice"] < args.min_dice]
    print(
        f"\nwrote {out}; Dice on the test cases (labelsTs); "
        + (
            f"{len(low)} foreground Dice below {args.min_dice}"
            if low
            else f"every foreground Dice >= {args.min_dice}"
        )
    )
    return 1 if low and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
