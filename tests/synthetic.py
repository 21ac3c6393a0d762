"""Tiny synthetic *preprocessed* tasks (``prepData`` layout of docs/formats.md) for tests and benchmarks.

Each case is a noisy volume with one or two blobs; labels follow the blobs. Nothing here reads raw
NIfTI data, so the training code can be exercised without the preprocessing pipeline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def synthetic_plans(
    task: str,
    num_modalities: int,
    num_classes: int,
    patch: Sequence[int],
    pools: Sequence[int],
    batch_size: int = 2,
) -> dict[str, Any]:
    return {
        "task": task,
        "modalities": [f"MOD{i}" for i in range(num_modalities)],
        "is_ct": False,
        "labels": {str(i): ("background" if i == 0 else f"structure{i}") for i in range(num_classes)},
        "num_classes": num_classes,
        "label_map": {str(i): i for i in range(num_classes)},
        "target_spacing": [1.0, 1.0, 1.0],
        "patch_size": [int(v) for v in patch],
        "pools_per_axis": [int(v) for v in pools],
        "batch_size": batch_size,
        "small_label": num_classes - 1,
        "tumour_classes": [],
        "keep_components": 1,
        "normalisation": {"clip_percentiles": [2, 98], "ct_clip_min": -1024, "zscore": "nonzero"},
        "source": "derived",
        "median_resampled_shape": [16, 16, 16],
    }


def write_synthetic_case(
    split_dir: Path,
    case: str,
    shape: Sequence[int],
    num_modalities: int,
    num_classes: int,
    rng: np.random.Generator,
) -> None:
    """One case: image (M, z, y, x) float32, label uint8, weight uint8 and its sidecar (written last)."""
    shape = tuple(int(s) for s in shape)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    label = np.zeros(shape, np.uint8)
    c = rng.uniform(-0.3, 0.3, 3)
    r = rng.uniform(0.35, 0.55)
    label[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r**2] = 1
    if num_classes > 2:
        label[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < (r / 2) ** 2] = 2
    image = np.stack(
        [
            label.astype(np.float32) * (1.0 + 0.5 * m) + rng.normal(0, 0.4, shape).astype(np.float32)
            for m in range(num_modalities)
        ]
    )
    split_dir.mkdir(parents=True, exist_ok=True)
    np.save(split_dir / f"{case}_image.npy", image.astype(np.float32))
    np.save(split_dir / f"{case}_label.npy", label)
    np.save(split_dir / f"{case}_weight.npy", np.ones(shape, np.uint8))
    sidecar = {
        "case": case,
        "image_file": f"{case}.nii.gz",
        "original_shape": [s + 2 for s in shape],
        "crop_box": [[1, s + 1] for s in shape],
        "resampled_shape": list(shape),
        "original_spacing_xyz": [1.0, 1.0, 1.0],
        "origin_xyz": [0.0, 0.0, 0.0],
        "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        "target_spacing": [1.0, 1.0, 1.0],
        "class_voxels": [int((label == k).sum()) for k in range(num_classes)],
    }
    (split_dir / f"{case}.json").write_text(json.dumps(sidecar))


def make_synthetic_task(
    prep_root: str | os.PathLike[str],
    task: str,
    *,
    num_modalities: int = 1,
    num_classes: int = 2,
    shape: Sequence[int] = (16, 16, 16),
    patch: Sequence[int] = (8, 8, 8),
    pools: Sequence[int] = (2, 2, 2),
    n_train: int = 4,
    n_val: int = 1,
    seed: int = 0,
    batch_size: int = 2,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Write ``prep_root/task`` and return ``(plans, fold0)`` with fold0 = ``{"train": ids, "val": ids}``."""
    root = Path(prep_root) / task
    rng = np.random.default_rng(seed)
    ids = [f"{task.lower()}_{i:03d}" for i in range(n_train + n_val)]
    for cid in ids:
        write_synthetic_case(root / "train", cid, shape, num_modalities, num_classes, rng)
    plans = synthetic_plans(task, num_modalities, num_classes, patch, pools, batch_size)
    (root / "plans.json").write_text(json.dumps(plans, indent=2))
    return plans, {"train": ids[:n_train], "val": ids[n_train:]}


def write_folds(
    path: str | os.PathLike[str], folds: dict[str, dict[str, list[str]]], n_folds: int = 5
) -> None:
    """``fold_splits.json`` with the same fold repeated ``n_folds`` times per task."""
    Path(path).write_text(json.dumps({t: [f] * n_folds for t, f in folds.items()}, indent=1))


#: the two tiny tasks of the training-script tests: 1 modality / 2 classes and 2 modalities / 3 classes
TINY_A, TINY_B = "Task97_TinyA", "Task98_TinyB"


def make_two_tiny_tasks(root: str | os.PathLike[str]) -> Path:
    """``root/prep/{TINY_A,TINY_B}`` (3 training and 1 validation case each) and ``root/folds.json``.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    folds = {}
    _, folds[TINY_A] = make_synthetic_task(
        root / "prep", TINY_A, shape=(8, 12, 12), patch=(8, 8, 8), pools=(2, 2, 2), n_train=3, n_val=1, seed=0
    )
    _, folds[TINY_B] = make_synthetic_task(
        root / "prep",
        TINY_B,
        num_modalities=2,
        num_classes=3,
        shape=(6, 12, 12),
        patch=(4, 8, 8),
        pools=(1, 2, 2),
        n_train=3,
        n_val=1,
        seed=1,
    )
    write_folds(root / "folds.json", folds)
    return root
