"""Reports: a training run's curves (:func:`run_report`) and an evaluation of several modes on test
images (:func:`evaluation_report`, what the laptop demo writes), each as PNGs and one ``report.html``.

Layout of what is written into ``out_dir``::

    report.html                      the page (relative links only)
    report/curves_<mode>_<run>.png   training curves of each run
    report/dice.png                  Dice per class across modes          (evaluation)
    report/parameters.png            shared vs per-domain parameters      (evaluation)
    report/overlays/<task>/<case>.png  image, ground truth and predictions (evaluation)
"""

from __future__ import annotations

import csv
import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from models.export import ExportError, load_exported
from models.loading import build_model_from_checkpoint
from models.params import parameter_counts
from reporting.charts import ModeParameters, plot_dice_chart, plot_parameter_chart
from reporting.curves import RunCurves, find_runs, plot_run_curves, read_run
from reporting.figures import FigureJobs
from reporting.html import Section, figure, missing_links, table, write_page
from reporting.overlays import render_case_overlay
from utils.checkpoint import best_checkpoints, load_checkpoint
from utils.decathlon import apply_label_map, read_image, read_label

__all__ = ["Report", "evaluation_report", "run_report"]

REPORT_HTML = "report.html"
ASSETS = "report"
NIFTI = (".nii.gz", ".nii")


@dataclass
class Report:
    """What a report wrote, and what it found wrong (labels that differ, links that do not resolve)."""

    page: Path
    images: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _case_name(file_name: str) -> str:
    for suffix in NIFTI:
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI) and not p.name.startswith("."))


# ----------------------------------------------------------------------------------------------
# training curves
# ----------------------------------------------------------------------------------------------
def _curves_section(
    runs: Sequence[tuple[str, RunCurves]], assets: Path, page_dir: Path, report: Report, jobs: FigureJobs
) -> Section:
    parts = [
        '<p class="note">Loss per task (each step faint, its moving average, the epoch means as dots), '
        "learning rate, and validation Dice per class (the run's val_dice.csv); loss and learning rate "
        "from the run's TensorBoard events (tb/).</p>"
    ]
    for mode, curves in runs:
        label = f"{mode}: {curves.name}" if mode else curves.name
        parts.append(f"<h3>{html.escape(label)}</h3>")
        if curves.is_empty():
            parts.append('<p class="note">nothing logged yet</p>')
            continue
        png = assets / f"curves_{_safe(mode or 'run')}_{_safe(curves.name)}.png"
        jobs.submit(plot_run_curves, curves, png, title=label)
        report.images.append(png)
        parts.append(figure(png, page_dir))
        last = [(k, s[-1][0], f"{s[-1][1]:.4f}") for k, s in curves.val_dice.items() if s]
        if last:
            parts.append(table(["task: class", "step", "last validation Dice"], last))
    return Section("Training curves", "\n".join(parts))


def run_report(
    folders: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    title: str = "",
) -> Report:
    """Curves of every run folder in ``folders`` (a run folder, or a folder of run folders) and their
    checkpoints' parameters, in ``out_dir/report.html`` (default: the first folder).

    Raises:
        FileNotFoundError: no run folder found.
    """
    runs = [r for f in folders for r in find_runs(f)]
    if not runs:
        raise FileNotFoundError(
            f"no training run folder (tb/, val_dice.csv or checkpoints/) in {list(map(str, folders))}"
        )
    out = Path(out_dir) if out_dir is not None else Path(folders[0])
    page = out / REPORT_HTML
    report = Report(page)
    jobs = FigureJobs()
    sections = [_curves_section([("", read_run(r)) for r in runs], out / ASSETS, out, report, jobs)]
    jobs.wait()
    rows = []
    for r in runs:
        for ck in best_checkpoints(r):
            model, tasks = build_model_from_checkpoint(load_checkpoint(ck))
            counts = parameter_counts(model)
            mode = model.config.train_mode + (f" ({model.config.module})" if model.config.module else "")
            for t, task in enumerate(tasks):
                labels = task["plans"].get("labels") or {}
                rows.append(
                    [
                        r.name,
                        mode,
                        task["name"],
                        ", ".join(
                            f"{c} {n}"
                            for c, n in sorted(labels.items(), key=lambda kv: int(kv[0]))
                            if c != "0"
                        ),
                        f"{counts.total:,}",
                        f"{counts.shared:,}",
                        f"{counts.per_task[t]:,}",
                    ]
                )
    if rows:
        sections.append(
            Section(
                "Parameters",
                table(["run", "model", "task", "classes", "total", "shared", "task's own"], rows, left=4),
            )
        )
    write_page(page, title or f"Training report: {', '.join(r.name for r in runs)}", sections)
    report.problems += [f"{page}: broken link {link}" for link in missing_links(page)]
    return report


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def read_summary(path: Path) -> list[dict[str, str]]:
    """Rows of a ``summary.csv`` (``demo/summary.py``), or none when it does not exist."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _mode_parameters(
    mode: str,
    checkpoints: Sequence[Path],
    plans: dict[str, dict[str, Any]],
    extensions: list[tuple[str, dict[str, Any]]] | None = None,
) -> ModeParameters:
    """Parameters of a mode's models; ``plans`` collects each task's plans on the way, ``extensions`` the
    ``(mode, extension)`` of each checkpoint whose run extended a trained model (its config's ``extension``)."""
    mp = ModeParameters(mode)
    for ck in checkpoints:
        ckpt = load_checkpoint(ck)
        ext = ((ckpt.get("train_state") or {}).get("config") or {}).get("extension")
        if ext and extensions is not None:
            extensions.append((mode, dict(ext)))
        model, tasks = build_model_from_checkpoint(ckpt)
        counts = parameter_counts(model)
        for task in tasks:
            plans.setdefault(str(task["name"]), dict(task["plans"]))
        if model.num_tasks == 1:  # a one-domain model: all of it is that domain's own
            name = str(tasks[0]["name"])
            mp.per_domain[name] = mp.per_domain.get(name, 0) + counts.total
        else:
            mp.shared += counts.shared
            for t, task in enumerate(tasks):
                name = str(task["name"])
                mp.per_domain[name] = mp.per_domain.get(name, 0) + counts.per_task[t]
    return mp


#: what trained when a domain's label set grew, by ``--add_classes_train``
_TRAINED = {"domain": "the domain's adapters, norms and heads", "heads": "the domain's class heads"}


def _extension_section(extensions: Sequence[tuple[str, Mapping[str, Any]]]) -> Section:
    """What each extension run added to its trained model: a new domain (and where its parameters started)
    or a grown label set (the classes and parameters added)."""
    rows = []
    for mode, ext in extensions:
        if ext.get("kind") == "new_domain":
            start = "fresh" if ext.get("init_from") is None else f"copied from {ext['init_from']}"
            rows.append(
                [
                    mode,
                    "new domain",
                    str(ext.get("task")),
                    f"own parameters start {start}: {ext.get('init_how', '')}",
                ]
            )
        elif ext.get("kind") == "new_classes":
            added = ", ".join(f"{c} {n}" for c, n in (ext.get("added_classes") or {}).items())
            rows.append(
                [
                    mode,
                    "new classes",
                    f"{ext.get('domain')} → {ext.get('task')}",
                    f"classes {ext.get('classes_before')} → {ext.get('classes_after')}: + {added}; "
                    f"{int(ext.get('added_params', 0)):,} parameters added; trained: "
                    + _TRAINED.get(str(ext.get("train_scope")), str(ext.get("train_scope"))),
                ]
            )
    note = (
        '<p class="note">Runs that extended a trained model (<code>--ckp</code>): a new domain, or a trained '
        "domain whose label set grew (<code>--add_classes_to</code>); every other domain stayed frozen.</p>"
    )
    return Section(
        "Extensions of a trained model", note + table(["mode", "kind", "domain", "what"], rows, left=4)
    )


def _summary_section(rows: Sequence[Mapping[str, str]], dice_png: Path | None, page_dir: Path) -> Section:
    header = ["mode", "task", "class", "Dice", "HD95 (mm)", "cases", "parameters", "task's own"]
    body = [
        [
            r["mode"],
            r["task"],
            f"{r['class']} {r['class_name']}",
            r["dice"],
            r["hd95_mm"],
            r["num_cases"],
            f"{int(r['params']):,}",
            f"{int(r['task_params']):,}",
        ]
        for r in rows
    ]
    parts = [
        '<p class="note">Mean over each task\'s test cases, in the original geometry, after post-processing '
        "(summary.csv).</p>",
        table(header, body, left=3),
    ]
    if dice_png is not None:
        parts.append(figure(dice_png, page_dir))
    return Section("Summary: Dice per class", "\n".join(parts))


def _parameters_section(modes: Sequence[ModeParameters], png: Path, page_dir: Path) -> Section:
    domains = list(dict.fromkeys(d for m in modes for d in m.per_domain))
    rows = [
        [
            m.mode,
            f"{m.total:,}",
            f"{m.shared:,}",
            *[f"{m.per_domain[d]:,}" if d in m.per_domain else "–" for d in domains],
        ]
        for m in modes
    ]
    note = (
        '<p class="note">What each mode needs to serve its domains: parameters shared by several domains '
        "and each domain's own (adapters, norms, heads; for one-domain models, the whole model).</p>"
    )
    return Section(
        "Parameters",
        note
        + table(["mode", "total", "shared", *[f"{d} own" for d in domains]], rows)
        + figure(png, page_dir),
    )


def _compare_labels(results_dir: Path, a: str, b: str) -> tuple[list[list[Any]], list[str]]:
    """Compare the label maps of ``predictions/a/<task>/`` with ``predictions/b/<task>/``."""
    rows: list[list[Any]] = []
    problems: list[str] = []
    root_a = results_dir / "predictions" / a
    task_dirs = sorted(p for p in root_a.iterdir() if p.is_dir()) if root_a.is_dir() else []
    if not task_dirs:
        problems.append(f"no predictions in {root_a}")
    for task_dir in task_dirs:
        cases = same = differing = 0
        for f in _nifti_files(task_dir):
            other = results_dir / "predictions" / b / task_dir.name / f.name
            if not other.is_file():
                problems.append(f"{other}: missing (to compare with {f})")
                continue
            la = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
            lb = sitk.GetArrayFromImage(sitk.ReadImage(str(other)))
            n = int(np.count_nonzero(la != lb)) if la.shape == lb.shape else int(la.size)
            cases += 1
            if n == 0:
                same += 1
            else:
                differing += n
                problems.append(f"{f.name} ({task_dir.name}): {n} voxels differ between {a} and {b}")
        rows.append([a, b, task_dir.name, cases, same, differing])
    return rows, problems


def _export_rows(files: Sequence[Path], page_dir: Path) -> tuple[list[list[Any]], list[str]]:
    rows: list[list[Any]] = []
    problems: list[str] = []
    for f in files:
        try:
            meta = load_exported(f).metadata
        except ExportError as e:
            problems.append(str(e))
            continue
        p = meta["parameters"]
        rows.append(
            [
                f.name,
                meta["task"],
                f"{f.stat().st_size / 2**20:.2f}",
                f"{p['domain']:,}",
                f"{p['universal_total']:,}",
                f"{100.0 * p['domain'] / p['universal_total']:.1f} %",
                f"{meta['source']['train_mode']} {meta['source']['module'] or ''}".strip(),
            ]
        )
    return rows, problems


def _overlay_section(
    results_dir: Path,
    dataset_dir: Path,
    modes: Sequence[str],
    plans: Mapping[str, Mapping[str, Any]],
    assets: Path,
    page_dir: Path,
    report: Report,
    max_cases: int | None,
    jobs: FigureJobs,
) -> Section:
    pred_root = results_dir / "predictions"
    names = [p.name for p in sorted(pred_root.iterdir()) if p.is_dir()] if pred_root.is_dir() else []
    order = [m for m in modes if m in names] + [n for n in names if n not in modes]
    tasks = sorted({t.name for m in order for t in (pred_root / m).iterdir() if t.is_dir()})
    parts = [
        '<p class="note">Each test case on the three planes through the centre of its ground-truth structure '
        "(axial; coronal and sagittal with z up): the image (1st modality) with the ground truth and each "
        "mode's prediction blended in the class colours.</p>"
    ]
    for task in tasks:
        task_plans = plans.get(task, {})
        label_dir = dataset_dir / task / "labelsTs"
        image_dir = dataset_dir / task / "imagesTs"
        preds_of = {m: pred_root / m / task for m in order if (pred_root / m / task).is_dir()}
        cases = [f.name for f in _nifti_files(image_dir)]
        if max_cases is not None:
            cases = cases[:max_cases]
        if not cases:
            report.problems.append(f"no test images in {image_dir} for the overlays of {task}")
            continue
        raw_names = task_plans.get("labels") or {}
        class_names = {int(k): str(v) for k, v in raw_names.items()}
        parts.append(f"<h3>{html.escape(task)}</h3>")
        for name in cases:
            image, geom = read_image(image_dir / name)
            truth = None
            if (label_dir / name).is_file():
                raw, _ = read_label(label_dir / name)
                label_map = task_plans.get("label_map")
                truth = apply_label_map(raw, label_map) if label_map else raw
            preds = {m: read_label(d / name)[0] for m, d in preds_of.items() if (d / name).is_file()}
            case = _case_name(name)
            png = assets / "overlays" / _safe(task) / f"{_safe(case)}.png"
            jobs.submit(
                render_case_overlay,
                png,
                image[0],
                truth,
                preds,
                spacing_zyx=geom.spacing_zyx,
                class_names=class_names,
                title=f"{task} {case}",
            )
            report.images.append(png)
            parts.append(figure(png, page_dir, case, width=420))
    return Section("Test cases: ground truth and predictions", "\n".join(parts))


def evaluation_report(
    results_dir: str | os.PathLike[str],
    dataset_dir: str | os.PathLike[str],
    evals: Sequence[tuple[str, str | os.PathLike[str]]],
    *,
    compare: Sequence[tuple[str, str]] = (),
    export_files: Sequence[str | os.PathLike[str]] = (),
    out_dir: str | os.PathLike[str] | None = None,
    max_cases: int | None = 10,
    title: str = "3D U²-Net: evaluation report",
    workers: int = 1,
) -> Report:
    """The report of an evaluation (the laptop demo's): summary table and Dice chart
    (``<results_dir>/summary.csv``), parameters per mode, exported domains, label comparisons,
    training curves and one overlay per test case.

    Args:
        results_dir: holds ``summary.csv`` and ``predictions/<mode>/<task>/<case>.nii.gz``.
        dataset_dir: ``<task>/imagesTs`` (and ``labelsTs``, the ground truth) of the test cases.
        evals: ``(mode, folder)``: the run folder(s) of each mode (checkpoints, curves).
        compare: ``(a, b)`` prediction folders that must hold the same label maps (e.g. an exported
            domain's and its universal model's); a difference is reported as a problem.
        export_files: exported domains (``python -m models.export``) to list with their parameters.
        out_dir: where ``report.html`` and ``report/`` go (default ``results_dir``).
        max_cases: overlays per task (None: all).
        workers: processes that draw the training curves and overlays (:class:`reporting.figures.FigureJobs`).
    """
    results = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results
    assets = out / ASSETS
    page = out / REPORT_HTML
    report = Report(page)
    sections: list[Section] = []
    rows = read_summary(results / "summary.csv")
    if rows:
        dice_png = plot_dice_chart(rows, assets / "dice.png")
        report.images.append(dice_png)
        sections.append(_summary_section(rows, dice_png, out))
    plans: dict[str, dict[str, Any]] = {}
    extensions: list[tuple[str, dict[str, Any]]] = []
    modes = [
        _mode_parameters(mode, best_checkpoints(Path(folder)), plans, extensions) for mode, folder in evals
    ]
    modes = [m for m in modes if m.total]
    if modes:
        png = plot_parameter_chart(modes, assets / "parameters.png")
        report.images.append(png)
        sections.append(_parameters_section(modes, png, out))
    if extensions:
        sections.append(_extension_section(extensions))
    if export_files or compare:
        parts = [
            '<p class="note">Domains exported on their own (<code>python -m models.export</code>: the shared weights '
            "and that domain's adapters, norms and heads) and the test cases they segmented "
            '(<code>predict.py --model</code>): "identical" counts the cases whose label map equals the full '
            "model's.</p>"
        ]
        exp_rows, problems = _export_rows([Path(f) for f in export_files], out)
        report.problems += problems
        if exp_rows:
            parts.append(
                table(
                    ["file", "task", "MB", "parameters", "universal model", "share", "from"], exp_rows, left=2
                )
            )
        for a, b in compare:
            cmp_rows, problems = _compare_labels(results, a, b)
            report.problems += problems
            parts.append(
                table(
                    ["predictions", "vs", "task", "cases", "identical", "differing voxels"], cmp_rows, left=3
                )
            )
        sections.append(Section("Exported domains", "\n".join(parts)))
    jobs = FigureJobs(workers)
    curves = [(mode, read_run(r)) for mode, folder in evals for r in find_runs(folder)]
    if curves:
        sections.append(_curves_section(curves, assets, out, report, jobs))
    sections.append(
        _overlay_section(
            results, Path(dataset_dir), [m for m, _ in evals], plans, assets, out, report, max_cases, jobs
        )
    )
    jobs.wait()
    write_page(page, title, sections, intro=html.escape(f"results: {results}; test images: {dataset_dir}"))
    report.problems += [f"{page}: broken link {link}" for link in missing_links(page)]
    return report
