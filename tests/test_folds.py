"""Fold splits: the original's shipped folds for MSD tasks, generated folds for the rest, both formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils.folds import (
    GENERATED_FOLDS,
    MSD_FOLDS_FILE,
    ORIGINAL_FOLDS,
    default_folds_file,
    fold_case_ids,
    make_folds,
    original_folds,
    update_fold_file,
)


def _msd_ids(task: str) -> list[str]:
    entry = json.loads(MSD_FOLDS_FILE.read_text())[task]["fold0"]
    return [str(c) for c in entry["train"] + entry["val"]]


def test_msd_tasks_get_the_original_folds(tmp_path: Path) -> None:
    shipped = json.loads(MSD_FOLDS_FILE.read_text())
    assert sorted(shipped) == [
        f"Task{i:02d}_{n}"
        for i, n in enumerate(
            [
                "BrainTumour",
                "Heart",
                "Liver",
                "Hippocampus",
                "Prostate",
                "Lung",
                "Pancreas",
                "HepaticVessel",
                "Spleen",
                "Colon",
            ],
            start=1,
        )
    ]
    ids = _msd_ids("Task04_Hippocampus")
    assert len(ids) == 260
    path = default_folds_file(tmp_path / "prep")
    added = update_fold_file(path, {"Task04_Hippocampus": list(reversed(ids))})
    assert added == {"Task04_Hippocampus": ORIGINAL_FOLDS}
    for k in range(5):
        for part in ("train", "val"):
            assert (
                fold_case_ids(path, "Task04_Hippocampus", k, part)
                == shipped["Task04_Hippocampus"][f"fold{k}"][part]
            )
    # what generated folds would have given differs: the shipped ones are really used
    assert fold_case_ids(path, "Task04_Hippocampus", 0, "val") != make_folds(ids)[0]["val"]


def test_other_tasks_and_msd_subsets_get_generated_folds(tmp_path: Path) -> None:
    ids = _msd_ids("Task09_Spleen")
    assert original_folds("Task09_Spleen", ids) is not None
    subset = ids[:10]  # a subset of an MSD task: the shipped folds name missing cases
    assert original_folds("Task09_Spleen", subset) is None
    path = tmp_path / "fold_splits.json"
    added = update_fold_file(
        path, {"Task09_Spleen": subset, "Task91_DemoLiverCT": ["a", "b", "c", "d", "e", "f"]}
    )
    assert added == {"Task09_Spleen": GENERATED_FOLDS, "Task91_DemoLiverCT": GENERATED_FOLDS}
    data = json.loads(path.read_text())
    assert data["Task09_Spleen"] == make_folds(subset) and isinstance(data["Task91_DemoLiverCT"], list)
    assert update_fold_file(path, {"Task09_Spleen": ids}) == {}  # existing entries are kept
    assert json.loads(path.read_text()) == data
    # MSD folds can be turned off
    other = tmp_path / "other.json"
    assert update_fold_file(other, {"Task09_Spleen": ids}, msd_folds=None) == {
        "Task09_Spleen": GENERATED_FOLDS
    }


def test_both_formats_are_read() -> None:
    ours = {"T": [{"train": ["a", "b.nii.gz"], "val": ["c"]}, {"train": ["c"], "val": ["a", "b"]}]}
    original = {
        "T": {
            "fold1": {"train": ["c"], "val": ["a", "b"]},
            "fold0": {"train": ["a", "b.nii.gz"], "val": ["c"]},
        }
    }
    for splits in (ours, original):
        assert fold_case_ids(splits, "T", 0, "train") == ["a", "b"]
        assert fold_case_ids(splits, "T", 1, "val") == ["a", "b"]
        with pytest.raises(IndexError):
            fold_case_ids(splits, "T", 2)
    with pytest.raises(KeyError, match="not in fold splits"):
        fold_case_ids(ours, "U")


def test_folds_live_with_the_preprocessed_data(tmp_path: Path) -> None:
    """Two datasets with a task of the same name keep separate folds (one file per prep_dir)."""
    a, b = default_folds_file(tmp_path / "prepA"), default_folds_file(tmp_path / "prepB")
    assert a != b and a.parent == tmp_path / "prepA"
    update_fold_file(a, {"Task90_X": ["x1", "x2", "x3", "x4", "x5"]})
    update_fold_file(b, {"Task90_X": ["y1", "y2", "y3", "y4", "y5"]})
    assert set(fold_case_ids(a, "Task90_X", 0)) <= {"x1", "x2", "x3", "x4", "x5"}
    assert set(fold_case_ids(b, "Task90_X", 0)) <= {"y1", "y2", "y3", "y4", "y5"}
