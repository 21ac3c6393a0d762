"""Demo task generator: MSD layout, determinism, what each task exercises (tiny size, CPU)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from demo.data import DEMO_TASKS, generate_demo_data, main
from utils.decathlon import load_task, read_geometry


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*.nii.gz") if not q.name.startswith(".")):
        h.update(p.name.encode())
        h.update(sitk.GetArrayFromImage(sitk.ReadImage(str(p))).tobytes())
    return h.hexdigest()


def test_demo_tasks_layout_and_content(tmp_path: Path) -> None:
    assert (
        main(["--out", str(tmp_path), "--seed", "3", "--n_train", "2", "--n_test", "1", "--size", "20"]) == 0
    )
    assert len(DEMO_TASKS) >= 4
    for name in DEMO_TASKS:
        root = tmp_path / name
        meta = json.loads((root / "dataset.json").read_text())
        assert {"modality", "labels", "training", "test", "numTraining"} <= set(meta)
        task = load_task(root)
        assert len(task.training) == 2 and len(task.test) == 1
        assert all(c.image.is_file() and c.label.is_file() for c in task.training)  # type: ignore[union-attr]
        geom = read_geometry(task.training[0].image)
        assert geom.n_modalities == len(task.modalities)
        assert any(abs(o) > 1 for o in geom.origin_xyz)  # realistic, non-zero origin
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(task.training[0].label)))
        assert lab.shape == geom.size_zyx
        assert set(np.unique(lab)) - {254} <= set(task.labels)
    liver = load_task(tmp_path / "Task91_DemoLiverCT")
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(liver.training[0].image)))
    assert ct.min() < -900 and ct.max() > 50  # Hounsfield-like
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(liver.training[0].label)))
    assert {1, 2} <= set(np.unique(lab))  # tumour inside the organ
    prostate = read_geometry(load_task(tmp_path / "Task93_DemoProstateMR").training[0].image)
    assert (
        prostate.n_modalities == 2 and prostate.spacing_zyx[0] > 2 * prostate.spacing_zyx[1]
    )  # 4D, anisotropic
    spleen = read_geometry(load_task(tmp_path / "Task94_DemoSpleenCT").training[0].image)
    assert not np.allclose(spleen.direction, np.eye(3).ravel())  # non-identity direction
    hippo = tmp_path / "Task92_DemoHippoMR"
    assert (hippo / "imagesTr" / "._hippomr_001.nii.gz").is_file()  # MSD junk files present...
    assert all(not c.image.name.startswith("._") for c in load_task(hippo).training)  # ...and ignored


def test_demo_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    kw = {"n_train": 1, "n_test": 0, "size": 16, "tasks": ["Task92_DemoHippoMR", "Task94_DemoSpleenCT"]}
    generate_demo_data(tmp_path / "a", seed=5, **kw)
    generate_demo_data(tmp_path / "b", seed=5, **kw)
    generate_demo_data(tmp_path / "c", seed=6, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
