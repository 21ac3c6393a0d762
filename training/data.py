"""Per-task training data and the per-epoch, deterministically seeded patch loaders.

Loaders are rebuilt at the start of every epoch with a seed derived from ``(seed, epoch, task)``:
the batches of epoch ``e`` depend on nothing but those numbers (and ``num_workers``), so a run
resumed from the checkpoint of epoch ``e - 1`` sees exactly the batches an uninterrupted run saw.
Each case's sampling information (bounding boxes, voxel subsets; one full scan of its label) is
computed once per run in the main process and handed to every epoch's loader (and its worker
processes), so rebuilding the loaders costs no label scans.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.augmentation import AugmentParams
from training.loader import TrainLoader
from training.sampling import CaseInfo, compute_case_info
from utils.folds import fold_case_ids
from utils.io_utils import read_json
from utils.preprocessing import list_cases

Shape3 = tuple[int, int, int]


@dataclass
class TaskData:
    """One task's preprocessed data for training and validation.

    Attributes:
        name: task folder name (``Task04_Hippocampus``).
        plans: the task's ``plans.json``; ``plans["patch_size"]`` is the patch actually sampled
            (a ``--patch_size`` override is written into it, so checkpoints carry the right patch).
        prep_dir: ``prepData/<task>``.
        train_cases, val_cases: case prefixes ``prepData/<task>/train/<case>`` of the fold.
    """

    name: str
    plans: dict[str, Any]
    prep_dir: Path
    train_cases: list[str]
    val_cases: list[str]
    case_info: dict[int, CaseInfo] = field(default_factory=dict, repr=False)

    @property
    def patch_size(self) -> Shape3:
        p = self.plans["patch_size"]
        return (int(p[0]), int(p[1]), int(p[2]))

    @property
    def num_classes(self) -> int:
        return int(self.plans["num_classes"])

    @property
    def num_modalities(self) -> int:
        return len(self.plans["modalities"])

    @property
    def class_names(self) -> dict[int, str]:
        labels = self.plans.get("labels") or {}
        return {c: str(labels.get(str(c), f"class{c}")) for c in range(self.num_classes)}


def read_plans(prep_root: str | os.PathLike[str], task: str) -> dict[str, Any]:
    path = Path(prep_root) / task / "plans.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: preprocess the task first (python preprocess_taskSep.py --tasks {task})"
        )
    plans: dict[str, Any] = read_json(path)
    return plans


def load_task_data(
    prep_root: str | os.PathLike[str],
    task: str,
    folds_file: str | os.PathLike[str],
    fold: int = 0,
    *,
    patch_size: Sequence[int] | None = None,
    pools: Sequence[int] | None = None,
    plans: dict[str, Any] | None = None,
) -> TaskData:
    """Plans and fold cases of one task.

    Args:
        prep_root: ``prepData``.
        folds_file: ``fold_splits.json`` (written by ``preprocess_taskSep.py``).
        patch_size: override of the plans' patch (z, y, x).
        pools: override of the plans' pools per axis (independent models).
        plans: use these plans instead of ``plans.json`` (a resumed run keeps its checkpoint's plans).
    """
    plans = dict(plans) if plans is not None else dict(read_plans(prep_root, task))
    if patch_size is not None:
        plans["patch_size"] = [int(v) for v in patch_size]
    if pools is not None:
        plans["pools_per_axis"] = [int(v) for v in pools]
    task_dir = Path(prep_root) / task
    if not Path(folds_file).is_file():
        raise FileNotFoundError(f"fold splits file {folds_file} not found (preprocess_taskSep.py writes it)")
    train_ids = fold_case_ids(folds_file, task, fold, "train")
    val_ids = fold_case_ids(folds_file, task, fold, "val")
    train_cases = list_cases(task_dir, "train", train_ids)
    val_cases = list_cases(task_dir, "train", val_ids)
    if not train_cases:
        raise ValueError(f"{task}: fold {fold} has no training cases")
    return TaskData(task, plans, task_dir, train_cases, val_cases)


def placeholder_task(prep_root: str | os.PathLike[str], name: str, plans: dict[str, Any]) -> TaskData:
    """A task of the model that this run does not train (old tasks of a new-domain run): no cases."""
    return TaskData(name, dict(plans), Path(prep_root) / name, [], [])


def scan_cases(task: TaskData) -> dict[int, CaseInfo]:
    """Compute (once) the sampling information of every training case, indexed like ``train_cases``."""
    if len(task.case_info) != len(task.train_cases):
        small = task.plans.get("small_label")
        small_label = int(small) if small is not None else None
        for i, case in enumerate(task.train_cases):
            if i not in task.case_info:
                label = np.load(case + "_label.npy", mmap_mode="r")
                task.case_info[i] = compute_case_info(label, small_label)
    return task.case_info


def epoch_seed(seed: int, epoch: int, task_idx: int, rank: int = 0) -> int:
    """Loader seed of ``task_idx`` in ``epoch``: a fixed function of the three numbers and, in a
    data-parallel run, the process's rank (rank 0 keeps the single-process seed, so a one-process
    run is unchanged; every other rank draws its own patches)."""
    entropy = [int(seed), int(epoch), int(task_idx)] + ([int(rank)] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] % (2**31 - 1024))


def make_epoch_loader(
    task: TaskData,
    task_idx: int,
    epoch: int,
    *,
    batch_size: int,
    seed: int,
    model_patch: Sequence[int] | None = None,
    num_workers: int = 0,
    augment: bool | AugmentParams = True,
    centre_mode: str = "original",
    centre_voxels: str = "all",
    kind_probs: Sequence[float] | None = None,
    pin_memory: bool = False,
    rank: int = 0,
    pipeline: str = "two_step",
    augment_device: torch.device | None = None,
) -> TrainLoader:
    """Batch iterator of ``task`` for ``epoch``, seeded from ``(seed, epoch, task_idx)`` (and ``rank``,
    the process's rank in a data-parallel run, :func:`epoch_seed`).

    Yields ``{"data": (B, M, *P), "seg": (B, 1, *P), ...}`` tensors with ``P = model_patch`` (resized)
    or the task patch. Close it (or use it as a context manager) when the epoch is over.
    ``pipeline``, ``augment_device``, ``centre_voxels`` and ``kind_probs``: :class:`training.loader.TrainLoader`'s
    (``--augment_pipeline``, ``--augment_device``, ``--centre_voxels``, ``--kind_probs``).
    """
    return TrainLoader(
        task.train_cases,
        task.plans,
        batch_size,
        model_patch=model_patch,
        num_workers=num_workers,
        seed=epoch_seed(seed, epoch, task_idx, rank),
        augment=augment,
        centre_mode=centre_mode,
        centre_voxels=centre_voxels,
        kind_probs=kind_probs,
        case_info=scan_cases(task),
        pin_memory=pin_memory,
        pipeline=pipeline,
        augment_device=augment_device,
    )
