"""Cross-validation folds: ``fold_splits.json`` (``docs/formats.md``).

``{"<TaskName>": [{"train": [case ids], "val": [case ids]}, ... one dict per fold]}``. The split
of a task is deterministic: cases are ordered by a keyed hash (SHA-256 of ``"<seed>:<case id>"``,
independent of NumPy versions and of the order the cases are listed in) and dealt round-robin
into the folds. Entries already in the file are never rewritten.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.io_utils import atomic_write_json, read_json

__all__ = [
    "DEFAULT_SEED",
    "FOLDS_FILE_NAME",
    "N_FOLDS",
    "default_folds_file",
    "fold_case_ids",
    "make_folds",
    "update_fold_file",
]

N_FOLDS = 5
DEFAULT_SEED = 1993
#: name of the fold splits written by preprocessing next to the preprocessed data
FOLDS_FILE_NAME = "fold_splits.json"


def default_folds_file(prep_dir: str | os.PathLike[str]) -> Path:
    """Where preprocessing writes, and training reads, the fold splits: ``<prep_dir>/fold_splits.json``."""
    return Path(prep_dir) / FOLDS_FILE_NAME


def make_folds(
    case_ids: Sequence[str], n_folds: int = N_FOLDS, seed: int = DEFAULT_SEED
) -> list[dict[str, list[str]]]:
    """Split case ids into ``n_folds`` train/val folds; every case is in exactly one val set.

    With fewer cases than folds, fold ``k`` validates on case ``k mod n`` (a single case is
    both trained and validated on). Lists are sorted.
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    ids = sorted(set(case_ids))
    if not ids:
        return [{"train": [], "val": []} for _ in range(n_folds)]
    order = sorted(ids, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    folds = []
    for k in range(n_folds):
        val = order[k::n_folds] if len(ids) >= n_folds else [order[k % len(ids)]]
        val_set = set(val)
        train = [c for c in ids if c not in val_set] or list(val)
        folds.append({"train": sorted(train), "val": sorted(val)})
    return folds


def update_fold_file(
    path: str | os.PathLike[str],
    task_cases: Mapping[str, Sequence[str]],
    n_folds: int = N_FOLDS,
    seed: int = DEFAULT_SEED,
) -> list[str]:
    """Add splits for the tasks of ``task_cases`` that the file does not have yet (atomically).

    Returns the names of the tasks added; existing entries are kept as they are.
    """
    path = Path(path)
    data: dict[str, Any] = read_json(path) if path.is_file() else {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of task -> folds")
    added = [t for t in sorted(task_cases) if t not in data]
    if not added:
        return []
    for t in added:
        data[t] = make_folds(task_cases[t], n_folds, seed)
    atomic_write_json(path, data)
    return added


def fold_case_ids(
    fold_splits: str | os.PathLike[str] | Mapping[str, Any],
    task: str,
    fold: int = 0,
    part: str = "train",
) -> list[str]:
    """Case ids of ``part`` (``"train"`` / ``"val"``) of ``fold`` for ``task`` from ``fold_splits.json``.

    ``fold_splits`` is the file path or its parsed content ``{"<Task>": [{"train": [...], "val": [...]},
    ...]}``. Ids are used as given; an id ending in ``.nii.gz`` is stripped to the case id.
    """
    splits: Mapping[str, Any] = fold_splits if isinstance(fold_splits, Mapping) else read_json(fold_splits)
    if task not in splits:
        raise KeyError(f"task {task!r} not in fold splits (have {sorted(splits)})")
    folds = splits[task]
    if not 0 <= fold < len(folds):
        raise IndexError(f"fold {fold} out of range: {task} has {len(folds)} folds")
    ids = folds[fold][part]
    return [Path(i).name[: -len(".nii.gz")] if str(i).endswith(".nii.gz") else str(i) for i in ids]
