"""Explore tasks (MSD or nnU-Net v2 layout): image headers and label sizes (docs/paper_preset.md,
"Data exploration").

    python data_explore.py --dataset_dir dataset/ --out_dir results/data_explore/

Reads every training image's header (dims, spacings, datatype, NIfTI scaling slope/intercept; any
supported format: NIfTI, MetaImage, NRRD; an nnU-Net case's channel files, which must share their
geometry) and each training label (voxel count per label, smallest label), and writes

* ``<out_dir>/meta_per_case.csv``: one row per training case;
* ``<out_dir>/stats_per_task.csv``: per task and quantity (dims, spacings, smallest-label size),
  the min, max, mean and median;

and prints a summary table. Dims and spacings are given in (z, y, x) order like the rest of the
project (NIfTI headers store x, y, z). Unreadable cases get an ``error`` entry and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from utils.decathlon import (
    CaseEntry,
    DataError,
    check_same_geometry,
    find_tasks,
    load_nifti,
    load_task,
    read_geometry,
    read_label,
)
from utils.image_io import image_format, read_file_geometry, stored_datatype, unsupported_file_reason
from utils.io_utils import atomic_write_csv

CASE_COLUMNS = [
    "task",
    "case",
    "image_file",
    "n_modalities",
    "dim_z",
    "dim_y",
    "dim_x",
    "spacing_z",
    "spacing_y",
    "spacing_x",
    "datatype",
    "scl_slope",
    "scl_inter",
    "label_voxels",
    "smallest_label",
    "smallest_label_voxels",
    "error",
]
STAT_QUANTITIES = ["dim_z", "dim_y", "dim_x", "spacing_z", "spacing_y", "spacing_x", "smallest_label_voxels"]


def _fmt_scale(value: float | None) -> str:
    return "none" if value is None or not np.isfinite(value) else f"{float(value):g}"


def _header_facts(path: Path) -> dict[str, Any]:
    """Shape (x, y, z[, t]), spacings (x, y, z), stored datatype and NIfTI slope/intercept of an image file."""
    if image_format(path) == "nifti":
        hdr = load_nifti(path).header
        slope, inter = hdr.get_slope_inter()
        return {
            "shape": tuple(int(v) for v in hdr.get_data_shape()),
            "zooms": tuple(float(v) for v in hdr.get_zooms()),
            "datatype": str(hdr.get_data_dtype()),
            "slope": slope,
            "inter": inter,
        }
    geom = read_file_geometry(path)  # MetaImage / NRRD: SimpleITK's header reader
    z, y, x = geom.size_zyx
    shape = (x, y, z) + ((geom.n_modalities,) if geom.n_modalities > 1 else ())
    return {
        "shape": shape,
        "zooms": geom.spacing_xyz,
        "datatype": stored_datatype(path),
        "slope": None,
        "inter": None,
    }


def _read_label_values(path: Path) -> np.ndarray:
    if image_format(path) == "nifti":
        try:
            return np.asarray(np.asanyarray(load_nifti(path).dataobj))
        except Exception as e:  # noqa: BLE001 - truncated/corrupt label
            raise DataError(path, f"cannot read label ({type(e).__name__}: {e})") from e
    return read_label(path, verify=False)[0]


def explore_case(task: str, case: CaseEntry, labels: dict[int, str]) -> dict[str, Any]:
    """Header facts of a training image (or of an nnU-Net case's channel files) and label sizes of its
    label map (one CSV row)."""
    row: dict[str, Any] = {c: "" for c in CASE_COLUMNS}
    row.update(task=task, case=case.case_id, image_file=str(case.image))
    try:
        channels = case.images if len(case.images) > 1 else (case.image,)
        for path in channels:
            if not path.is_file():
                raise DataError(path, "file not found")
            if image_format(path) is None:
                raise DataError(path, unsupported_file_reason(path))
        facts = _header_facts(case.image)
        shape, zooms = facts["shape"], facts["zooms"]
        if len(shape) < 3:
            raise DataError(case.image, f"expected 3D/4D, header says shape {shape}")
        if len(channels) > 1:  # one 3D file per modality, all of one geometry
            first = read_geometry(channels[0])
            for c, path in enumerate(channels[1:], start=1):
                check_same_geometry(
                    first, read_geometry(path), path, what=(f"channel 0 ({channels[0].name})", f"channel {c}")
                )
        row.update(
            n_modalities=len(channels) if len(channels) > 1 else (int(shape[3]) if len(shape) > 3 else 1),
            dim_z=int(shape[2]),
            dim_y=int(shape[1]),
            dim_x=int(shape[0]),
            spacing_z=round(float(zooms[2]), 5),
            spacing_y=round(float(zooms[1]), 5),
            spacing_x=round(float(zooms[0]), 5),
            datatype=facts["datatype"],
            scl_slope=_fmt_scale(facts["slope"]),
            scl_inter=_fmt_scale(facts["inter"]),
        )
        if case.label is None or not case.label.is_file():
            raise DataError(case.label or case.image, "label file not found")
        lab = _read_label_values(case.label)
        values, counts = np.unique(np.rint(lab).astype(np.int64), return_counts=True)
        found = dict(zip(values.tolist(), counts.tolist(), strict=True))
        row["label_voxels"] = ";".join(f"{v}:{found[v]}" for v in sorted(found))
        fg = {k: found.get(k, 0) for k in labels if k > 0}
        if fg:
            smallest = min(fg, key=lambda k: (fg[k], k))
            row.update(smallest_label=smallest, smallest_label_voxels=fg[smallest])
    except DataError as e:
        row["error"] = f"{e.path}: {e.reason}"
    except Exception as e:  # noqa: BLE001 - report and go on
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def task_stats(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and quantity: n, min, max, mean, median (rows with errors left out)."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        good = [r for r in rows if r["task"] == task and not r["error"]]
        for q in STAT_QUANTITIES:
            vals = np.asarray([float(r[q]) for r in good if r[q] != ""], dtype=np.float64)
            if vals.size == 0:
                out.append(
                    {"task": task, "quantity": q, "n": 0, "min": "", "max": "", "mean": "", "median": ""}
                )
                continue
            out.append(
                {
                    "task": task,
                    "quantity": q,
                    "n": int(vals.size),
                    "min": round(float(vals.min()), 4),
                    "max": round(float(vals.max()), 4),
                    "mean": round(float(vals.mean()), 4),
                    "median": round(float(np.median(vals)), 4),
                }
            )
    return out


def format_summary(rows: Sequence[dict[str, Any]], stats: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table: per task the cases, modalities, median (min-max) dims and spacings,
    datatype(s) and the median smallest-label size."""

    def cell(task: str, qs: Sequence[str], fmt: str) -> str:
        parts = []
        for q in qs:
            s = next(s for s in stats if s["task"] == task and s["quantity"] == q)
            parts.append("-" if s["n"] == 0 else format(s["median"], fmt))
        return "x".join(parts)

    def rng(task: str, qs: Sequence[str], fmt: str) -> str:
        lo = [next(s for s in stats if s["task"] == task and s["quantity"] == q)["min"] for q in qs]
        hi = [next(s for s in stats if s["task"] == task and s["quantity"] == q)["max"] for q in qs]
        if "" in lo:
            return "-"
        return "x".join(format(v, fmt) for v in lo) + " .. " + "x".join(format(v, fmt) for v in hi)

    header = [
        "task",
        "cases",
        "mod",
        "median dims zyx",
        "dims range",
        "median spacing zyx",
        "spacing range",
        "dtype",
        "smallest lbl (median)",
        "errors",
    ]
    table = [header]
    for task in sorted({r["task"] for r in rows}):
        rs = [r for r in rows if r["task"] == task]
        good = [r for r in rs if not r["error"]]
        mods = sorted({str(r["n_modalities"]) for r in good})
        dtypes = sorted({r["datatype"] for r in good})
        smallest = next(s for s in stats if s["task"] == task and s["quantity"] == "smallest_label_voxels")
        table.append(
            [
                task,
                str(len(rs)),
                ",".join(mods) or "-",
                cell(task, ["dim_z", "dim_y", "dim_x"], ".0f"),
                rng(task, ["dim_z", "dim_y", "dim_x"], ".0f"),
                cell(task, ["spacing_z", "spacing_y", "spacing_x"], ".3g"),
                rng(task, ["spacing_z", "spacing_y", "spacing_x"], ".3g"),
                ",".join(dtypes) or "-",
                "-" if smallest["n"] == 0 else f"{smallest['median']:.0f}",
                str(len(rs) - len(good)),
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def explore_dataset(
    dataset_dir: str | os.PathLike[str], tasks: Sequence[str] | None = None, *, progress: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-case rows and per-task statistics for the (selected) tasks of ``dataset_dir``."""
    task_dirs = find_tasks(dataset_dir)
    if tasks:
        task_dirs = [p for p in task_dirs if p.name in set(tasks)]
    jobs: list[tuple[str, CaseEntry, dict[int, str]]] = []
    for td in task_dirs:
        t = load_task(td)
        jobs.extend((t.name, c, dict(t.labels)) for c in t.training)
    rows = [
        explore_case(*j)
        for j in tqdm(jobs, desc="reading headers and labels", unit="case", disable=not progress)
    ]
    return rows, task_stats(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns 0, or 1 when some case could not be read, 2 when nothing was found."""
    ap = argparse.ArgumentParser(
        description="Per-case header/label facts and per-task statistics of tasks in the MSD or nnU-Net v2 "
        "layout (CSV + summary table)."
    )
    ap.add_argument(
        "--dataset_dir",
        default="dataset",
        help="folder holding the task folders (MSD Task* or nnU-Net v2 Dataset* folders with their "
        "dataset.json; default: dataset)",
    )
    ap.add_argument(
        "--out_dir", default="results/data_explore", help="where the CSVs go (default: results/data_explore)"
    )
    ap.add_argument(
        "--tasks", nargs="+", default=None, metavar="TASK", help="only these task folders (default: all)"
    )
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        rows, stats = explore_dataset(args.dataset_dir, args.tasks, progress=not args.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"no training cases found in the task folders of {args.dataset_dir}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    atomic_write_csv(out / "meta_per_case.csv", CASE_COLUMNS, rows)
    atomic_write_csv(
        out / "stats_per_task.csv", ["task", "quantity", "n", "min", "max", "mean", "median"], stats
    )
    print(format_summary(rows, stats))
    errors = [r for r in rows if r["error"]]
    for r in errors:
        print(f"ERROR {r['task']}/{r['case']}: {r['error']}")
    print(f"\nwrote {out / 'meta_per_case.csv'} ({len(rows)} cases) and {out / 'stats_per_task.csv'}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
