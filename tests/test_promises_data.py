"""Data-side promises that a planted bug must break: every field of the paper's settings table
(docs/paper_preset.md, "Per-task settings", written out literally below) and the generated
cross-validation folds (each case validated exactly once, never trained on in its own fold)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from utils.folds import DEFAULT_SEED, GENERATED_FOLDS, N_FOLDS, fold_case_ids, make_folds, update_fold_file
from utils.task_settings import NORMALISATION, PRESETS, build_plans, class_names, find_preset

# ---------------------------------------------------------------------------------------------
# the paper's table, literally (docs/paper_preset.md "Per-task settings" and "Inference and evaluation"):
# MSD dataset.json modalities and labels, then what the preset makes of them
# ---------------------------------------------------------------------------------------------
PAPER_TABLE: dict[str, dict[str, Any]] = {
    "Task02_Heart": dict(
        msd_modalities=["MRI"], msd_labels={0: "background", 1: "left atrium"},
        labels={"0": "background", "1": "left atrium"}, label_map={"0": 0, "1": 1},
        patch_size=[80, 192, 128], pools_per_axis=[4, 5, 5], target_spacing=[1.37, 1.25, 1.25], batch_size=2,
        keep_components=1, small_label=1, tumour_classes=[], zero_upper_half_x=False, is_ct=False,
        small_prob=0.3, fore_prob=0.3,
    ),
    "Task03_Liver": dict(
        msd_modalities=["CT"], msd_labels={0: "background", 1: "liver", 2: "cancer"},
        labels={"0": "background", "1": "liver"}, label_map={"0": 0, "1": 1, "2": 1},  # tumour merged
        patch_size=[128, 128, 128], pools_per_axis=[5, 5, 5], target_spacing=[1.0, 0.77, 0.77], batch_size=2,
        keep_components=1, small_label=1, tumour_classes=[], zero_upper_half_x=False, is_ct=True,
        small_prob=0.3, fore_prob=0.3,
    ),
    "Task04_Hippocampus": dict(
        msd_modalities=["MRI"], msd_labels={0: "background", 1: "Anterior", 2: "Posterior"},
        labels={"0": "background", "1": "Anterior", "2": "Posterior"}, label_map={"0": 0, "1": 1, "2": 2},
        patch_size=[40, 56, 40], pools_per_axis=[3, 3, 3], target_spacing=[1.0, 1.0, 1.0], batch_size=9,
        keep_components=2, small_label=2, tumour_classes=[], zero_upper_half_x=False, is_ct=False,
        small_prob=0.3, fore_prob=0.3,
    ),
    "Task05_Prostate": dict(
        msd_modalities=["T2", "ADC"], msd_labels={0: "background", 1: "PZ", 2: "TZ"},
        labels={"0": "background", "1": "PZ", "2": "TZ"}, label_map={"0": 0, "1": 1, "2": 2},
        patch_size=[20, 192, 192], pools_per_axis=[2, 5, 5], target_spacing=[3.6, 0.625, 0.625], batch_size=4,
        keep_components=2, small_label=1, tumour_classes=[], zero_upper_half_x=False, is_ct=False,
        small_prob=0.3, fore_prob=0.3,
    ),
    "Task07_Pancreas": dict(
        msd_modalities=["CT"], msd_labels={0: "background", 1: "pancreas", 2: "cancer"},
        labels={"0": "background", "1": "pancreas"}, label_map={"0": 0, "1": 1, "2": 1},  # cancer merged
        patch_size=[96, 160, 128], pools_per_axis=[4, 5, 5], target_spacing=[2.5, 0.8, 0.8], batch_size=2,
        keep_components=1, small_label=1, tumour_classes=[], zero_upper_half_x=False, is_ct=True,
        small_prob=0.3, fore_prob=0.3,
    ),
    "Task09_Spleen": dict(
        msd_modalities=["CT"], msd_labels={0: "background", 1: "spleen"},
        labels={"0": "background", "1": "spleen"}, label_map={"0": 0, "1": 1},
        patch_size=[96, 160, 128], pools_per_axis=[4, 5, 5], target_spacing=[5.0, 0.8, 0.8], batch_size=2,
        keep_components=1, small_label=1, tumour_classes=[], zero_upper_half_x=True, is_ct=True,
        small_prob=0.0, fore_prob=0.0,  # the original's config: no "small"/"fore" patches for Spleen
    ),
}  # fmt: skip
PLAN_KEYS = ("labels", "label_map", "patch_size", "pools_per_axis", "target_spacing", "batch_size",
             "keep_components", "small_label", "tumour_classes", "zero_upper_half_x", "is_ct", "small_prob",
             "fore_prob")  # fmt: skip
#: the paper's intensity normalisation (docs/paper_preset.md "Preprocessing"); keys added later are not pinned
PAPER_NORMALISATION = {"clip_percentiles": [2, 98], "ct_clip_min": -1024, "ct_clip_for": "all", "zscore": "nonzero",
                       "zero_mask": "none"}  # fmt: skip


def _plans(task: str, name: str | None = None, **overrides: Any) -> dict[str, Any]:
    row = PAPER_TABLE[task]
    # spacings and shapes that would derive something else entirely: the row must win
    return build_plans(name or task, row["msd_modalities"], row["msd_labels"], [[2.0, 2.0, 2.0]] * 3,
                       [[50, 60, 70]] * 3, **overrides)  # fmt: skip


def test_the_paper_rows_are_exactly_the_table() -> None:
    assert sorted(k for k, row in PRESETS.items() if row.paper) == sorted(PAPER_TABLE)


@pytest.mark.parametrize("task", sorted(PAPER_TABLE))
def test_preset_plans_match_the_table(task: str) -> None:
    want = PAPER_TABLE[task]
    plans = _plans(task)
    got = {k: plans[k] for k in PLAN_KEYS}
    assert got == {k: want[k] for k in PLAN_KEYS}
    assert plans["modalities"] == want["msd_modalities"]
    assert plans["num_classes"] == len(want["labels"])
    assert (plans["source"], plans["preset_row"], plans["overrides"]) == ("paper_preset", task, [])
    assert {k: plans["normalisation"][k] for k in PAPER_NORMALISATION} == PAPER_NORMALISATION
    assert {k: NORMALISATION[k] for k in PAPER_NORMALISATION} == {
        **PAPER_NORMALISATION, "clip_percentiles": (2, 98)
    }  # fmt: skip
    # the row itself, field by field (fields another change may add to the row are not listed here)
    row = PRESETS[task]
    assert list(row.target_spacing or ()) == want["target_spacing"]
    assert list(row.patch_size or ()) == want["patch_size"]
    assert list(row.pools_per_axis or ()) == want["pools_per_axis"]
    assert row.batch_size == want["batch_size"]
    assert {str(k): v for k, v in row.label_map or ()} == want["label_map"]
    assert row.keep_components == want["keep_components"]
    assert row.small_label == (1 if task == "Task05_Prostate" else None)  # None: the highest class
    assert list(row.tumour_classes or ()) == want["tumour_classes"]
    assert row.zero_upper_half_x is want["zero_upper_half_x"]
    spleen = task == "Task09_Spleen"
    assert (row.small_prob, row.fore_prob) == ((0.0, 0.0) if spleen else (None, None))  # None: 0.3 / 0.3
    assert row.paper is True


@pytest.mark.parametrize("task", sorted(PAPER_TABLE))
def test_renumbered_tasks_get_their_row_and_overrides_win(task: str) -> None:
    """``Task104_Hippocampus`` gets the Hippocampus row (the part after ``TaskXX_``); an explicit
    setting wins over the row and is listed in ``overrides``."""
    name = "Task1" + task[4:]
    assert find_preset(name) == (task, PRESETS[task])
    plans = _plans(task, name)
    assert {k: plans[k] for k in PLAN_KEYS} == {k: PAPER_TABLE[task][k] for k in PLAN_KEYS}
    assert plans["preset_row"] == task and plans["task"] == name
    over = _plans(task, target_spacing=[1.5, 1.5, 1.5], patch_size=[32, 32, 32], keep_components=2)
    assert over["target_spacing"] == [1.5, 1.5, 1.5] and over["patch_size"] == [32, 32, 32]
    assert over["pools_per_axis"] == [3, 3, 3] and over["keep_components"] == 2
    assert over["overrides"] == ["target_spacing", "patch_size", "keep_components"]


def test_unknown_tasks_are_not_the_paper_preset() -> None:
    assert find_preset("Task42_Kidney") is None
    plans = build_plans("Task42_Kidney", ["CT"], {0: "background", 1: "kidney", 2: "tumour"},
                        [[2.0, 1.0, 1.0]] * 3, [[40, 64, 64]] * 3)  # fmt: skip
    assert plans["source"] == "derived" and plans["preset_row"] is None
    assert plans["normalisation"]["zero_mask"] == "nearest"
    assert plans["tumour_classes"] == [2]  # named tumour: left alone by the post-processing
    lesion = build_plans(
        "Task43_Lesion", ["MR"], {0: "background", 1: "lesion"}, [[1.0, 1.0, 1.0]], [[32, 32, 32]]
    )
    assert lesion["tumour_classes"] == [1]
    assert plans["target_spacing"] == [2.0, 1.0, 1.0]  # the median spacing


# ---------------------------------------------------------------------------------------------
# generated folds
# ---------------------------------------------------------------------------------------------
def _by_hash(ids: list[str], seed: int = DEFAULT_SEED) -> list[str]:
    """The documented order: SHA-256 of "<seed>:<case id>"."""
    return sorted(ids, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())


def test_generated_folds_partition_the_cases() -> None:
    ids = [f"case_{i:03d}" for i in range(12)]
    folds = make_folds(ids)
    assert len(folds) == N_FOLDS == 5
    order = _by_hash(ids)
    for k, fold in enumerate(folds):
        # dealt round robin in hash order: fold k validates on every 5th case from the k-th
        assert fold["val"] == sorted(order[k::5])
        assert fold["train"] == sorted(set(ids) - set(fold["val"]))
        assert not set(fold["train"]) & set(fold["val"])
    vals = [set(f["val"]) for f in folds]
    assert sorted(len(v) for v in vals) == [2, 2, 2, 3, 3]
    assert set().union(*vals) == set(ids) and sum(map(len, vals)) == len(ids)  # each case validated once
    assert len({tuple(sorted(v)) for v in vals}) == 5  # five different validation sets
    # independent of the listing order and of repeats; another seed deals differently
    shuffled = ids[::-1] + ids[:3]
    random.Random(0).shuffle(shuffled)
    assert make_folds(shuffled) == folds
    assert make_folds(ids, seed=7) != folds
    assert make_folds(ids, seed=7)[0]["val"] == sorted(_by_hash(ids, 7)[0::5])
    assert [len(f["val"]) for f in make_folds(ids, n_folds=3)] == [4, 4, 4]


def test_generated_folds_are_stable() -> None:
    """The same ids give the same folds on every machine and version (literal, from the hash)."""
    folds = make_folds(["a", "b", "c", "d", "e", "f", "g"])
    assert [f["val"] for f in folds] == [sorted(_by_hash(list("abcdefg"))[k::5]) for k in range(5)]
    assert [f["val"] for f in folds] == [["a", "e"], ["b", "f"], ["c"], ["d"], ["g"]]


def test_fewer_cases_than_folds() -> None:
    order = _by_hash(["x", "y", "z"])
    folds = make_folds(["z", "x", "y"])
    for k, fold in enumerate(folds):
        assert fold["val"] == [order[k % 3]]
        assert fold["train"] == sorted(set(order) - {order[k % 3]})
    single = make_folds(["only"], n_folds=2)
    assert single == [{"train": ["only"], "val": ["only"]}] * 2  # trained and validated on
    assert make_folds([], n_folds=2) == [{"train": [], "val": []}] * 2
    with pytest.raises(ValueError):
        make_folds(["a"], n_folds=0)


def test_fold_file_round_trip(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(11)]
    path = tmp_path / "fold_splits.json"
    update_fold_file(path, {"Task90_New": ids}, n_folds=4, seed=5)
    assert json.loads(path.read_text())["Task90_New"] == make_folds(ids, 4, 5)
    seen: list[str] = []
    for k in range(4):
        train, val = (
            fold_case_ids(path, "Task90_New", k, "train"),
            fold_case_ids(path, "Task90_New", k, "val"),
        )
        assert sorted(train + val) == sorted(ids) and not set(train) & set(val)
        seen += val
    assert sorted(seen) == sorted(ids)


def test_one_fold_and_defaults(tmp_path: Path) -> None:
    """One fold validates on every case (and, having nothing else, trains on them too); the defaults
    of ``fold_case_ids`` are fold 0's training cases; tasks already in the file are kept while the
    others are added."""
    assert make_folds(["b", "a", "c"], n_folds=1) == [{"train": ["a", "b", "c"], "val": ["a", "b", "c"]}]
    path = tmp_path / "fold_splits.json"
    update_fold_file(path, {"Task10_B": ["x", "y", "z"]})
    added = update_fold_file(path, {"Task10_B": ["other"], "Task11_C": ["p", "q"], "Task09_A": ["m", "n"]})
    assert added == {"Task09_A": GENERATED_FOLDS, "Task11_C": GENERATED_FOLDS}
    data = json.loads(path.read_text())
    assert data["Task10_B"] == make_folds(["x", "y", "z"])  # kept as it was
    assert fold_case_ids(path, "Task10_B") == fold_case_ids(path, "Task10_B", 0, "train") != []
    assert fold_case_ids(data, "Task11_C", 1, "val") == make_folds(["p", "q"])[1]["val"]


# ---------------------------------------------------------------------------------------------
# the rest of build_plans: overrides, validation, derived and demo rows, class names
# ---------------------------------------------------------------------------------------------
def test_every_override_lands_and_is_listed() -> None:
    row = PAPER_TABLE["Task04_Hippocampus"]
    plans = build_plans("Task04_Hippocampus", row["msd_modalities"], row["msd_labels"], [[1.0, 1.0, 1.0]] * 3,
                        [[40, 56, 40]] * 3, label_map={"1": 1, "2": 1}, resample_grid="centred",
                        target_spacing=[2, 1.5, 1.5], patch_size=[1, 32, 32], pools_per_axis=[0, 2, 2],
                        batch_size=1, keep_components=1, small_label=0, zero_upper_half_x=True, small_prob=1.0,
                        fore_prob=0.0, tumour_classes=[1], zero_mask="nearest", ct_clip_for="ct")  # fmt: skip
    want = {
        "label_map": {"0": 0, "1": 1, "2": 1},  # class 0 added when the map leaves it out
        "labels": {"0": "background", "1": "Anterior"},
        "num_classes": 2,
        "resample_grid": "centred",
        "target_spacing": [2.0, 1.5, 1.5],
        "patch_size": [1, 32, 32],
        "pools_per_axis": [0, 2, 2],
        "batch_size": 1,
        "keep_components": 1,
        "small_label": 0,
        "zero_upper_half_x": True,
        "small_prob": 1.0,
        "fore_prob": 0.0,
        "tumour_classes": [1],
    }
    assert {k: plans[k] for k in want} == want
    assert plans["normalisation"]["zero_mask"] == "nearest" and plans["normalisation"]["ct_clip_for"] == "ct"
    assert sorted(plans["overrides"]) == sorted(
        ["label_map", "resample_grid", "target_spacing", "patch_size", "pools_per_axis", "batch_size",
         "keep_components", "small_label", "zero_upper_half_x", "small_prob", "fore_prob", "tumour_classes",
         "zero_mask", "ct_clip_for"]
    )  # fmt: skip
    # a preset task whose patch is overridden: pools and batch follow the new patch, not the row's
    # (32³ halves 3 times down to 4; batch 2·128³ / 32³ = 128, at most 8)
    small = _plans("Task04_Hippocampus", patch_size=[32, 32, 32])
    assert (small["pools_per_axis"], small["batch_size"]) == ([3, 3, 3], 8)
    assert _plans("Task04_Hippocampus", small_label=2)["small_label"] == 2  # the highest class is allowed


@pytest.mark.parametrize(
    "bad",
    [
        {"label_map": {"0": 0, "1": 2}},  # classes not 0..K-1
        {"keep_components": 3},
        {"small_label": 3},
        {"small_label": -1},
        {"batch_size": 0},
        {"zero_mask": "sometimes"},
        {"resample_grid": "corner"},
        {"ct_clip_for": "mr"},
        {"small_prob": 1.5},
        {"fore_prob": -0.1},
        {"small_prob": 0.6, "fore_prob": 0.5},  # more than 1 together
    ],
)
def test_invalid_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _plans("Task04_Hippocampus", **bad)


def test_derived_settings_by_hand() -> None:
    """An unknown task: median spacing (rounded to 3 decimals on the original grid, 4 on the centred
    one), patch = median resampled shape (40, 64, 64) within the 128³ budget, pools while an axis stays
    >= 4 voxels (40 -> 3, 64 -> 4), batch min(8, 2·128³ / (40·64·64) = 25) = 8, no Spleen rule."""
    spacings = [[2.0, 0.78125, 0.78125]] * 3
    plans = build_plans("Task60_Kidney", ["CT", "PET"], {0: "background", 1: "kidney"}, spacings,
                        [[40, 64, 64]] * 3)  # fmt: skip
    assert plans["target_spacing"] == [2.0, 0.781, 0.781]
    assert (plans["patch_size"], plans["pools_per_axis"], plans["batch_size"]) == ([40, 64, 64], [3, 4, 4], 8)
    assert plans["zero_upper_half_x"] is False and plans["keep_components"] == 2 and plans["small_label"] == 1
    assert (plans["small_prob"], plans["fore_prob"]) == (0.3, 0.3)
    assert plans["is_ct"] is True  # the first modality decides
    centred = build_plans("Task60_Kidney", ["MR", "CT"], {0: "background", 1: "kidney"}, spacings,
                          [[40, 64, 64]] * 3, resample_grid="centred")  # fmt: skip
    assert centred["target_spacing"] == [2.0, 0.7812, 0.7812] and centred["is_ct"] is False
    labels = {0: "background", 1: "organ"}
    # at most 5 pools: 256 voxels would halve 6 times down to 4 (batch 2·128³ / (8·256·256) = 8)
    flat = build_plans("Task61_Flat", ["MR"], labels, [[5.0, 0.5, 0.5]] * 3, [[8, 256, 256]] * 3)
    assert (flat["patch_size"], flat["pools_per_axis"], flat["batch_size"]) == ([8, 256, 256], [1, 5, 5], 8)
    # over the 128³ budget: the longest axis shrinks by 5 % (130 -> 123, 123·128·128 <= 128³), pools
    # (4, 5, 5), the patch rounded down to multiples of 2**pools (123 -> 112); batch 2·128³ // that = 2
    big = build_plans("Task62_Big", ["MR"], labels, [[1.0, 1.0, 1.0]] * 3, [[130, 128, 128]] * 3)
    assert (big["patch_size"], big["pools_per_axis"], big["batch_size"]) == ([112, 128, 128], [4, 5, 5], 2)


def test_demo_rows_and_name_matching() -> None:
    """The demo tasks fuse and post-process like their real counterparts; only exact names or the exact
    part after ``TaskXX_`` match a row."""
    labels = {0: "background", 1: "organ", 2: "part"}
    got = {
        name: {k: build_plans(name, ["CT"], labels, [[1.0, 1.0, 1.0]] * 3, [[32, 32, 32]] * 3)[k]
               for k in ("label_map", "keep_components", "small_label", "tumour_classes", "zero_upper_half_x")}
        for name in ("Task91_DemoLiverCT", "Task92_DemoHippoMR", "Task93_DemoProstateMR", "Task94_DemoSpleenCT")
    }  # fmt: skip
    identity = {"0": 0, "1": 1, "2": 2}
    assert got == {
        "Task91_DemoLiverCT": dict(label_map={"0": 0, "1": 1, "2": 1}, keep_components=1, small_label=1,
                                   tumour_classes=[], zero_upper_half_x=False),
        "Task92_DemoHippoMR": dict(label_map=identity, keep_components=2, small_label=2, tumour_classes=[],
                                   zero_upper_half_x=False),
        "Task93_DemoProstateMR": dict(label_map=identity, keep_components=2, small_label=1, tumour_classes=[],
                                      zero_upper_half_x=False),
        "Task94_DemoSpleenCT": dict(label_map=identity, keep_components=1, small_label=2, tumour_classes=[],
                                    zero_upper_half_x=False),
    }  # fmt: skip
    assert all(
        build_plans(n, ["CT"], labels, [[1.0, 1.0, 1.0]] * 3, [[32, 32, 32]] * 3)["source"] == "derived"
        for n in got
    )  # their spacing, patch and normalisation are derived, not the paper's
    assert find_preset("Task11_Heart_extra") is None and find_preset("Task11_heart") == (
        "Task02_Heart",
        PRESETS["Task02_Heart"],
    )


def test_class_names() -> None:
    raw = {0: "background", 1: "kidney", 2: "tumour", 3: "cyst"}
    assert class_names(raw, {0: 0, 1: 1, 2: 2, 3: 3}) == {
        "0": "background",
        "1": "kidney",
        "2": "tumour",
        "3": "cyst",
    }
    # a class that is not its own raw value is named after the raw values it holds, in raw order
    assert class_names(raw, {0: 0, 2: 1, 3: 1}) == {"0": "background", "1": "tumour+cyst"}
    assert class_names(raw, {0: 0, 1: 2, 2: 1}) == {"0": "background", "1": "tumour", "2": "kidney"}
    # class 0 always exists; without a raw name it is "class0"
    assert class_names({1: "a"}, {1: 1}) == {"0": "class0", "1": "a"}
