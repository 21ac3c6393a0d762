"""Preprocessing of whole tasks: plans, parallel cases, resumption, failures, fold splits.

``preprocess_taskSep.py`` is a thin command line over :func:`run_preprocessing`. Per task:

1. parse ``dataset.json``, read the training images' headers, compute the plans
   (:func:`utils.task_settings.build_plans`); if ``plans.json`` already exists with different
   preprocessing settings, the task is refused unless ``overwrite`` (its arrays would be stale);
2. write ``plans.json``, remove stray temporary files, and queue every case that is not done
   (sidecar + arrays present) or every case with ``overwrite``;
3. all queued cases of all tasks run in a pool of spawned worker processes (a progress bar);
   a case that fails is reported by file name and reason and the others go on;
4. ``plans.json`` is rewritten with the median shape of the cases actually preprocessed (a
   derived patch size follows it) and the raw foreground intensity statistics of up to 8 training
   cases (:mod:`utils.intensity`, kept from an earlier run of the same settings); fold splits are added to ``fold_splits.json`` for tasks whose
   training cases are all done.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from utils.decathlon import DataError, DecathlonTask, find_tasks, load_task, read_geometry
from utils.folds import update_fold_file
from utils.intensity import task_intensity_stats
from utils.io_utils import atomic_write_json, read_json, remove_stale_temporaries
from utils.preprocessing import case_is_done, preprocess_case, preprocess_image, save_case
from utils.task_settings import PREPROCESSING_KEYS, build_plans

__all__ = ["CaseJob", "CaseResult", "RunSummary", "TaskRun", "plan_task", "run_case", "run_preprocessing"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class CaseJob:
    """One case to preprocess (picklable: sent to a worker process)."""

    task: str
    case_id: str
    image: str
    label: str | None
    out_dir: str
    plans: Mapping[str, Any]
    channels: tuple[
        str, ...
    ] = ()  # the channel files of an nnU-Net case with several (``image`` = the first)


@dataclass(frozen=True)
class CaseResult:
    """Outcome of a case: ``ok``, or the offending ``file`` and the ``reason``."""

    task: str
    case_id: str
    ok: bool
    train: bool = True
    file: str = ""
    reason: str = ""
    seconds: float = 0.0
    voxels: int = 0


@dataclass
class TaskRun:
    """A task being preprocessed: its plans, the queued jobs and what was skipped."""

    task: DecathlonTask
    out_dir: Path
    plans: dict[str, Any]
    overrides: Mapping[str, Any]
    spacings: list[tuple[float, float, float]] = field(default_factory=list)
    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    jobs: list[CaseJob] = field(default_factory=list)
    skipped: int = 0


@dataclass
class RunSummary:
    """What a run did."""

    tasks: list[str] = field(default_factory=list)
    done: int = 0
    skipped: int = 0
    failed: list[CaseResult] = field(default_factory=list)
    task_errors: dict[str, str] = field(default_factory=dict)
    folds_added: dict[str, str] = field(default_factory=dict)  # task -> where its folds came from
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No case and no task failed."""
        return not self.failed and not self.task_errors


# ---------------------------------------------------------------------------------------------
# one case (runs in a worker)
# ---------------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def run_case(job: CaseJob) -> CaseResult:
    """Preprocess and save one case; never raises (errors come back in the result)."""
    t0 = time.perf_counter()
    train = job.label is not None
    source: str | list[str] = list(job.channels) if job.channels else job.image
    try:
        if job.label is not None:
            img, lab, weight, side = preprocess_case(source, job.label, job.plans, case_id=job.case_id)
            save_case(job.out_dir, job.case_id, img, weight, side, label=lab)
        else:
            img, weight, side = preprocess_image(source, job.plans, case_id=job.case_id)
            save_case(job.out_dir, job.case_id, img, weight, side)
        voxels = int(np.prod(side["original_shape"])) * int(img.shape[0])
        return CaseResult(job.task, job.case_id, True, train, seconds=time.perf_counter() - t0, voxels=voxels)
    except DataError as e:
        return CaseResult(job.task, job.case_id, False, train, e.path, e.reason, time.perf_counter() - t0)
    except MemoryError:
        return CaseResult(
            job.task, job.case_id, False, train, job.image, "out of memory", time.perf_counter() - t0
        )
    except Exception as e:  # noqa: BLE001 - one bad case must not stop the others
        reason = f"{type(e).__name__}: {e}"
        return CaseResult(job.task, job.case_id, False, train, job.image, reason, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key in PREPROCESSING_KEYS:
        a, b = old.get(key), new.get(key)
        if key == "target_spacing" and a is not None and b is not None:
            same = len(a) == len(b) and bool(np.allclose(a, b, rtol=1e-6, atol=1e-9))
        else:
            same = a == b
        if not same:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def plan_task(
    task_dir: str | os.PathLike[str],
    prep_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> TaskRun:
    """Compute a task's plans, write ``plans.json`` and queue the cases that need work.

    Args:
        task_dir: the task folder (with ``dataset.json``).
        prep_dir: the preprocessed-data root; output goes to ``<prep_dir>/<task>/``.
        overwrite: redo every case (and accept changed settings).
        overrides: keyword arguments for :func:`utils.task_settings.build_plans`.

    Raises:
        DataError: bad ``dataset.json``.
        ValueError: settings that cannot be derived, or that differ from the existing
            ``plans.json`` without ``overwrite``.
    """
    overrides = dict(overrides or {})
    task = load_task(task_dir)
    spacings, shapes = [], []
    for case in task.training:
        try:
            geom = read_geometry(case.image)
        except DataError:
            continue  # reported when the case itself runs
        spacings.append(geom.spacing_zyx)
        shapes.append(geom.size_zyx)
    plans = build_plans(task.name, task.modalities, task.labels, spacings, shapes, **overrides)

    out_dir = Path(prep_dir) / task.name
    plans_path = out_dir / "plans.json"
    if plans_path.is_file() and not overwrite:
        previous = read_json(plans_path)
        diffs = _differences(previous, plans)
        if diffs:
            raise ValueError(
                f"{plans_path} was written with other preprocessing settings ({'; '.join(diffs)}); "
                "rerun with --overwrite to redo the task with the new settings"
            )
        if previous.get("intensity_stats"):  # same data and settings: no need to read the cases again
            plans["intensity_stats"] = previous["intensity_stats"]
    atomic_write_json(plans_path, plans)
    remove_stale_temporaries(out_dir)  # of plans.json (those of the cases: below)

    run = TaskRun(task, out_dir, plans, overrides, spacings, shapes)
    for sub, cases, with_label in (("train", task.training, True), ("test", task.test, False)):
        folder = out_dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        for case in cases:
            if not overwrite and case_is_done(folder, case.case_id, with_label=with_label):
                run.skipped += 1
                continue
            run.jobs.append(
                CaseJob(
                    task.name,
                    case.case_id,
                    str(case.image),
                    str(case.label) if with_label and case.label is not None else None,
                    str(folder),
                    plans,
                    tuple(str(p) for p in case.images) if len(case.images) > 1 else (),
                )
            )
    return run


def _finalise_task(run: TaskRun, failed_train: bool, folds_file: Path | None, log: Log) -> dict[str, str]:
    """Rewrite plans.json with the real median shape; add fold splits when training is complete."""
    train_dir = run.out_dir / "train"
    done_ids, resampled = [], []
    for case in run.task.training:
        if case_is_done(train_dir, case.case_id, with_label=True):
            done_ids.append(case.case_id)
            resampled.append(read_json(train_dir / f"{case.case_id}.json")["resampled_shape"])
    if resampled:
        # same settings, but the median shape (and a derived patch) from the real resampled cases;
        # the target spacing is the one the cases were made with
        final = build_plans(
            run.task.name,
            run.task.modalities,
            run.task.labels,
            run.spacings,
            run.shapes,
            resampled_shapes_zyx=resampled,
            **{**run.overrides, "target_spacing": run.plans["target_spacing"]},
        )
        final["overrides"] = list(run.plans["overrides"])
        # raw foreground intensities (utils.intensity), e.g. for a new domain's --init_from auto
        stats = run.plans.get("intensity_stats") or task_intensity_stats(run.task)
        if stats is not None:
            final["intensity_stats"] = stats
        atomic_write_json(run.out_dir / "plans.json", final)
        run.plans = final
    if folds_file is None:
        return {}
    all_done = len(done_ids) == len(run.task.training)
    if failed_train or not all_done:
        log(
            f"{run.task.name}: fold splits not written, {len(run.task.training) - len(done_ids)} training case(s) missing"
        )
        return {}
    return update_fold_file(folds_file, {run.task.name: done_ids})


def _select_tasks(dataset_dir: Path, tasks: Sequence[str] | None) -> list[Path]:
    found = find_tasks(dataset_dir)
    if not tasks:
        return found
    by_name = {p.name: p for p in found}
    missing = [t for t in tasks if t not in by_name]
    if missing:
        raise FileNotFoundError(
            f"task(s) {missing} not found in {dataset_dir} (folders with dataset.json: {sorted(by_name) or 'none'})"
        )
    return [by_name[t] for t in tasks]


def run_preprocessing(
    dataset_dir: str | os.PathLike[str],
    prep_dir: str | os.PathLike[str],
    *,
    tasks: Sequence[str] | None = None,
    n_proc: int = 1,
    overwrite: bool = False,
    folds_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Log = print,
) -> RunSummary:
    """Preprocess tasks of ``dataset_dir`` into ``prep_dir`` (see the module docstring).

    Args:
        dataset_dir: folder of task folders (MSD ``Task*`` or nnU-Net ``Dataset*``, each with a ``dataset.json``).
        prep_dir: output root.
        tasks: task folder names (default: every folder with a ``dataset.json``).
        n_proc: worker processes (1 = in this process).
        overwrite: redo cases that are done; accept changed settings.
        folds_file: ``fold_splits.json`` to create/extend (``None``: no folds).
        overrides: :func:`utils.task_settings.build_plans` keyword arguments for every task.
        progress: show a progress bar.
        log: where messages go.

    Raises:
        FileNotFoundError: a requested task does not exist.
    """
    t0 = time.perf_counter()
    summary = RunSummary()
    dataset_dir, prep_dir = Path(dataset_dir), Path(prep_dir)
    task_dirs = _select_tasks(dataset_dir, tasks)
    if not task_dirs:
        hint = (
            " (it is itself a task folder: give the folder above it)"
            if (dataset_dir / "dataset.json").is_file()
            else ""
        )
        log(
            f"no task folders (subfolders with a dataset.json, MSD or nnU-Net v2 layout) in {dataset_dir}{hint}"
        )
    runs: list[TaskRun] = []
    remove_stale_temporaries(prep_dir)  # of fold_splits.json, left by a killed run
    for task_dir in task_dirs:
        summary.tasks.append(task_dir.name)
        try:
            run = plan_task(task_dir, prep_dir, overwrite=overwrite, overrides=overrides)
        except (DataError, ValueError) as e:
            summary.task_errors[task_dir.name] = str(e)
            log(f"FAILED task {task_dir.name}: {e}")
            continue
        p = run.plans
        log(
            f"{run.task.name}: {len(run.task.training)} training + {len(run.task.test)} test cases, "
            f"{run.skipped} already done; {p['source']} settings: spacing {p['target_spacing']}, "
            f"patch {p['patch_size']}, pools {p['pools_per_axis']}, classes {p['num_classes']}"
        )
        runs.append(run)
        summary.skipped += run.skipped

    jobs = [j for r in runs for j in r.jobs]
    # largest files first: better load balance across workers
    jobs.sort(key=lambda j: -os.path.getsize(j.image) if os.path.isfile(j.image) else 0)
    results: list[CaseResult] = []
    n_proc = max(1, min(int(n_proc), len(jobs) or 1))
    bar = tqdm(total=len(jobs), desc="preprocessing", unit="case", disable=not progress or not jobs)

    def _collect(res: CaseResult) -> None:
        results.append(res)
        if not res.ok:
            bar.write(f"FAILED {res.task}/{res.case_id}: {res.file}: {res.reason}")
        bar.update(1)

    threads = max(1, (os.cpu_count() or 1) // n_proc)
    try:
        if n_proc == 1:
            previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            _init_worker(threads)
            try:
                for job in jobs:
                    _collect(run_case(job))
            finally:
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
        elif jobs:
            ctx = mp.get_context("spawn")
            with ctx.Pool(n_proc, initializer=_init_worker, initargs=(threads,)) as pool:
                for res in pool.imap_unordered(run_case, jobs, chunksize=1):
                    _collect(res)
    finally:
        bar.close()

    summary.done = sum(r.ok for r in results)
    summary.failed = sorted((r for r in results if not r.ok), key=lambda r: (r.task, r.case_id))
    failed_train = {r.task for r in summary.failed if r.train}
    for run in runs:
        try:
            added = _finalise_task(
                run, run.task.name in failed_train, Path(folds_file) if folds_file else None, log
            )
        except (DataError, ValueError, OSError) as e:
            summary.task_errors[run.task.name] = f"finalising failed: {e}"
            log(f"FAILED task {run.task.name}: finalising: {e}")
            continue
        summary.folds_added.update(added)
    summary.seconds = time.perf_counter() - t0
    return summary
