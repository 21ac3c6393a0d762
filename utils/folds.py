"""Cross-validation folds: ``fold_splits.json`` (``docs/formats.md``), written next to the
preprocessed data (``<prep_dir>/fold_splits.json``) and read by training.

Two formats are read, per task: this project's list ``[{"train": [case ids], "val": [case ids]},
... one dict per fold]`` and the original's mapping ``{"fold0": {"train": [...], "val": [...]},
...}``. Which folds a task gets (:func:`update_fold_file`):

* an MSD task that the original shipped folds for (``utils/msd_fold_splits.json``, the original's
  ``fold_splits.json`` for all ten tasks, kept as data) gets exactly those, when they name exactly
  the task's training cases;
* any other task gets generated folds: cases ordered by a keyed hash (SHA-256 of
  ``"<seed>:<case id>"``, independent of NumPy versions and of the order the cases are listed in)
  and dealt round-robin into the folds.

Entries already in the file are never rewritten.
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
    "original_folds",
    "update_fold_file",
]

N_FOLDS = 5
DEFAULT_SEED = 1993
#: name of the fold splits written by preprocessing next to the preprocessed data
FOLDS_FILE_NAME = "fold_splits.json"
#: the original's fold_splits.json (all ten MSD tasks), shipped as data
MSD_FOLDS_FILE = Path(__file__).with_name("msd_fold_splits.json")
#: where a task's folds came from (:func:`update_fold_file`)
ORIGINAL_FOLDS, GENERATED_FOLDS = "original (MSD)", "generated"


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


def _case_id(entry: Any) -> str:
    """A case id as fold files name it: a bare id, or a file name ending in ``.nii.gz``."""
    text = str(entry)
    return Path(text).name[: -len(".nii.gz")] if text.endswith(".nii.gz") else text


def _fold_entries(folds: Any) -> list[Mapping[str, Any]]:
    """A task's folds in either format, as a list of ``{"train", "val"}`` in fold order."""
    if isinstance(folds, Mapping):
        keys = sorted((k for k in folds if str(k).startswith("fold")), key=lambda k: int(str(k)[4:]))
        return [folds[k] for k in keys]
    return list(folds)


def original_folds(task: str, case_ids: Sequence[str], path: str | os.PathLike[str] = MSD_FOLDS_FILE) -> Any:
    """The original's folds of ``task`` (its own format) when they split exactly ``case_ids``; None
    when the task is not in the file or its cases differ (e.g. a subset of an MSD task)."""
    data = read_json(path)
    entry = data.get(task)
    if entry is None:
        return None
    folds = _fold_entries(entry)
    if not folds:
        return None
    named = {_case_id(c) for c in list(folds[0]["train"]) + list(folds[0]["val"])}
    return entry if named == set(case_ids) else None


def update_fold_file(
    path: str | os.PathLike[str],
    task_cases: Mapping[str, Sequence[str]],
    n_folds: int = N_FOLDS,
    seed: int = DEFAULT_SEED,
    *,
    msd_folds: str | os.PathLike[str] | None = MSD_FOLDS_FILE,
) -> dict[str, str]:
    """Add splits for the tasks of ``task_cases`` that the file does not have yet (atomically): the
    original's folds where they fit (:func:`original_folds`; ``msd_folds=None`` never uses them),
    generated ones otherwise.

    Returns:
        ``{task: ORIGINAL_FOLDS | GENERATED_FOLDS}`` of the tasks added; existing entries are kept.
    """
    path = Path(path)
    data: dict[str, Any] = read_json(path) if path.is_file() else {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of task -> folds")
    added: dict[str, str] = {}
    for t in sorted(task_cases):
        if t in data:
            continue
        shipped = original_folds(t, task_cases[t], msd_folds) if msd_folds is not None else None
        if shipped is not None:
            data[t], added[t] = shipped, ORIGINAL_FOLDS
        else:
            data[t], added[t] = make_folds(task_cases[t], n_folds, seed), GENERATED_FOLDS
    if added:
        atomic_write_json(path, data)
    return added


def fold_case_ids(
    fold_splits: str | os.PathLike[str] | Mapping[str, Any],
    task: str,
    fold: int = 0,
    part: str = "train",
) -> list[str]:
    """Case ids of ``part`` (``"train"`` / ``"val"``) of ``fold`` for ``task`` from ``fold_splits.json``.

    ``fold_splits`` is the file path or its parsed content, each task in either format (module
    docstring). Ids are used as given; an id ending in ``.nii.gz`` is stripped to the case id.
    """
    splits: Mapping[str, Any] = fold_splits if isinstance(fold_splits, Mapping) else read_json(fold_splits)
    if task not in splits:
        raise KeyError(f"task {task!r} not in fold splits (have {sorted(splits)})")
    folds = _fold_entries(splits[task])
    if not 0 <= fold < len(folds):
        raise IndexError(f"fold {fold} out of range: {task} has {len(folds)} folds")
    return [_case_id(i) for i in folds[fold][part]]
