"""``python -m demo.summary`` (the README's demo table) on a small fabricated results folder.

Run folders hold ``checkpoints/best.pt`` files of the demo's real configurations (base 8, 3 pools:
the universal model of Liver, Hippocampus and Prostate, the same extended to Spleen, and Spleen
adapted as the original code did), so the parameter columns must give the README's figures
("142k (17k per task)", "+17,006", "92,790 trained"). The predictions and test labels are tiny
NIfTI volumes whose Dice and HD95 are worked out by hand in the comments.

Volumes are (z, y, x) = (6, 8, 8) with spacing z 3 mm, y 1 mm, x 0.5 mm (SimpleITK order x, y, z:
(0.5, 1, 3)). A 3×3×3 cube shifted by one voxel along one axis against its reference has Dice
2·18/54 = 2/3 and HD95 = that axis's spacing: of its 26 surface voxels, 16 lie on the other cube's
surface (0), 9 are one step away along the shift (the spacing), and the centre one is inside the
other cube, 0.5 mm (one x step) from its surface; the 95th percentile (position 23.75 of 0..25)
is the spacing.
"""

from __future__ import annotations

import csv
import math
import runpy
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from demo import seed_table, summary
from models import build_model
from models.params import freeze_for_task, transferable_conv_weights
from utils.checkpoint import save_checkpoint
from utils.metrics import evaluate_folder

SPACING_XYZ = (0.5, 1.0, 3.0)
SHAPE = (6, 8, 8)
LIVER, HIPPO, PROSTATE, SPLEEN = (
    "Task91_DemoLiverCT",
    "Task92_DemoHippoMR",
    "Task93_DemoProstateMR",
    "Task94_DemoSpleenCT",
)
CLASSES = {
    LIVER: {"0": "background", "1": "liver"},
    HIPPO: {"0": "background", "1": "anterior", "2": "posterior"},
    PROSTATE: {"0": "background", "1": "PZ", "2": "TZ"},
    SPLEEN: {"0": "background", "1": "spleen"},
}
MODALITIES = {LIVER: 1, HIPPO: 1, PROSTATE: 2, SPLEEN: 1}
#: the volume's diagonal in mm, HD95 when one mask is empty: sqrt(18² + 8² + 4²)
DIAGONAL = math.sqrt(18.0**2 + 8.0**2 + 4.0**2)


def _cube(z: int, y: int, x: int) -> tuple[slice, slice, slice]:
    return (slice(z, z + 3), slice(y, y + 3), slice(x, x + 3))


def _write(path: Path, array: np.ndarray) -> None:
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing(SPACING_XYZ)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _labels(*cubes: tuple[tuple[slice, slice, slice], int]) -> np.ndarray:
    a = np.zeros(SHAPE, np.uint8)
    for box, value in cubes:
        a[box] = value
    return a


def _plans(task: str) -> dict[str, Any]:
    n = len(CLASSES[task])
    label_map = {"0": 0, "1": 1, "2": 1} if task == LIVER else {str(c): c for c in range(n)}
    return {"task": task, "num_classes": n, "labels": CLASSES[task], "label_map": label_map,
            "patch_size": [32, 32, 32], "pools_per_axis": [3, 3, 3], "modalities": ["M"] * MODALITIES[task]}  # fmt: skip


def _checkpoint(folder: Path, tasks: list[str], mode: str, *, trained: list[int], frozen: list[str] | None = None,
                model: Any = None) -> None:  # fmt: skip
    if model is None:
        model = build_model(mode, [MODALITIES[t] for t in tasks], [len(CLASSES[t]) for t in tasks],
                            base_channels=8, pools_per_axis=(3, 3, 3))  # fmt: skip
    save_checkpoint(folder / "checkpoints" / "best.pt", model.config.to_dict(),
                    [{"name": t, "plans": _plans(t)} for t in tasks], model.state_dict(),
                    train_state={"trained_tasks": trained, "frozen_parameters": frozen or []})  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    data, res, runs = root / "data", root / "results", root / "runs"
    # test labels
    centre = (slice(2, 3), slice(3, 4), slice(3, 4))  # of the liver cube: a "tumour" voxel (raw label 2)
    _write(data / LIVER / "labelsTs" / "liver_101.nii.gz", _labels((_cube(1, 2, 2), 1), (centre, 2)))
    _write(data / LIVER / "labelsTs" / "liver_102.nii.gz", _labels((_cube(1, 2, 2), 1)))
    _write(data / HIPPO / "labelsTs" / "hippo_101.nii.gz", _labels((_cube(0, 0, 0), 1), (_cube(3, 4, 4), 2)))
    _write(
        data / PROSTATE / "labelsTs" / "prostate_101.nii.gz",
        _labels((_cube(0, 0, 0), 1), (_cube(3, 4, 4), 2)),
    )
    _write(data / SPLEEN / "labelsTs" / "spleen_101.nii.gz", _labels((_cube(2, 2, 2), 1)))
    # predictions, the same for every mode
    preds = {
        LIVER: {
            # the cube one slice up (z): Dice 2/3, HD95 3 mm; the raw label's tumour voxel (2) at the
            # cube's centre is liver (label_map 2 -> 1), else Dice would be 2·17/53
            "liver_101": _labels((_cube(2, 2, 2), 1)),
            "liver_102": _labels((_cube(1, 2, 2), 1)),  # exact: Dice 1, HD95 0
        },
        # anterior exact; posterior missing: Dice 0, HD95 = the diagonal
        HIPPO: {"hippo_101": _labels((_cube(0, 0, 0), 1))},
        PROSTATE: {"prostate_101": _labels((_cube(0, 0, 0), 1), (_cube(3, 4, 4), 2))},  # exact
        SPLEEN: {"spleen_101": _labels((_cube(2, 3, 2), 1))},  # one step along y: Dice 2/3, HD95 1 mm
    }
    modes = {"independent": [LIVER, HIPPO], "universal": [LIVER, HIPPO, PROSTATE],
             "universal_adapted": [SPLEEN], "universal_adapted_original": [SPLEEN]}  # fmt: skip
    for mode, tasks in modes.items():
        for task in tasks:
            for case, arr in preds[task].items():
                _write(res / "predictions" / mode / task / f"{case}.nii.gz", arr)
    # checkpoints: independent = one run folder per task
    for task in (HIPPO, LIVER):
        _checkpoint(runs / "independent" / task, [task], "independent", trained=[0])
    _checkpoint(runs / "universal", [LIVER, HIPPO, PROSTATE], "universal", trained=[0, 1, 2])
    # the universal model extended to the new domain: only the new task's parameters train
    ext = build_model("universal", [1, 1, 2], [2, 3, 3], base_channels=8, pools_per_axis=(3, 3, 3))
    new = ext.add_task(1, 2)
    freeze_for_task(ext, new)
    frozen = [n for n, p in ext.named_parameters() if not p.requires_grad]
    _checkpoint(runs / "adapted", [LIVER, HIPPO, PROSTATE, SPLEEN], "universal", trained=[new], frozen=frozen,
                model=ext)  # fmt: skip
    # as the original code did: a new one-task model whose shared conv weights were copied and frozen
    one = build_model("universal", [1], [2], base_channels=8, pools_per_axis=(3, 3, 3))
    _checkpoint(runs / "adapted_original", [SPLEEN], "universal", trained=[0], frozen=transferable_conv_weights(one),
                model=one)  # fmt: skip
    return root


#: (mode, task, class, class_name, dice, hd95_mm, num_cases, params, task_params), worked out by hand
EXPECTED = [
    # (2/3 + 1) / 2 = 0.8333; (3 mm + 0) / 2 = 1.5 mm
    ("independent", LIVER, 1, "liver", "0.8333", "1.50", 2, 514_758, None),
    ("independent", HIPPO, 1, "anterior", "1.0000", "0.00", 1, 514_821, None),
    ("independent", HIPPO, 2, "posterior", "0.0000", f"{DIAGONAL:.2f}", 1, 514_821, None),
    # README: "universal (separable) ... 142k (17k per task)"
    ("universal", LIVER, 1, "liver", "0.8333", "1.50", 2, 142_056, 17_006),
    ("universal", HIPPO, 1, "anterior", "1.0000", "0.00", 1, 142_056, 17_069),
    ("universal", HIPPO, 2, "posterior", "0.0000", f"{DIAGONAL:.2f}", 1, 142_056, 17_069),
    ("universal", PROSTATE, 1, "PZ", "1.0000", "0.00", 1, 142_056, 17_285),
    ("universal", PROSTATE, 2, "TZ", "1.0000", "0.00", 1, 142_056, 17_285),
    # README: "universal, extended to the new domain ... +17,006" (only its adapters, norms, heads train)
    ("universal_adapted", SPLEEN, 1, "spleen", "0.6667", "1.00", 1, 142_056 + 17_006, 17_006),
    # README: "adapted as the original code did ... 92,790 trained" (of a 107,702-parameter model)
    ("universal_adapted_original", SPLEEN, 1, "spleen", "0.6667", "1.00", 1, 107_702, 92_790),
]


def test_summary_rows_by_hand(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = demo / "runs"
    argv = ["--dataset_dir", str(demo / "data"), "--results_dir", str(demo / "results"),
            "--run", f"independent={runs / 'independent'}", "--run", f"universal={runs / 'universal'}",
            "--run", f"universal_adapted={runs / 'adapted'}",
            "--run", f"universal_adapted_original={runs / 'adapted_original'}"]  # fmt: skip
    assert summary.main(argv) == 0  # below --min_dice, but not --strict
    out = capsys.readouterr().out
    with open(demo / "results" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(summary.FIELDS)
    got = [tuple(r[k] for k in summary.FIELDS) for r in rows]
    # the independent models' own part (norms and heads of a one-task model): pinned as the model gives it
    indep_own = {HIPPO: 1_469, LIVER: 1_406}
    want = [tuple(str(v) for v in (*e[:8], e[8] if e[8] is not None else indep_own[e[1]])) for e in EXPECTED]
    assert got == want
    # the table printed, e.g. the adapted rows' parameters with thousands separators
    assert "92,790" in out and "17,006" in out and "107,702" in out
    assert "4 foreground Dice below 0.8" in out  # the two posterior rows (0) and the two spleen rows (2/3)
    # per-case CSVs of every (mode, task)
    for mode in ("independent", "universal", "universal_adapted", "universal_adapted_original"):
        assert (demo / "results" / "eval" / mode).is_dir()
    # --strict fails on a Dice below --min_dice (spleen 2/3); a low enough threshold passes
    base = argv[:4]
    adapted = [*base, "--run", f"universal_adapted={runs / 'adapted'}"]
    assert summary.main([*adapted, "--strict"]) == 1
    assert summary.main([*adapted, "--strict", "--min_dice", "0.6"]) == 0
    # --tasks keeps only the named tasks
    assert summary.main([*base, "--run", f"universal={runs / 'universal'}", "--run", f"universal_adapted={runs / 'adapted'}",
                         "--tasks", SPLEEN, HIPPO]) == 0  # fmt: skip
    with open(demo / "results" / "summary.csv", newline="") as f:
        assert [(r["mode"], r["task"], r["class"]) for r in csv.DictReader(f)] == [
            ("universal", HIPPO, "1"), ("universal", HIPPO, "2"), ("universal_adapted", SPLEEN, "1")
        ]  # fmt: skip


def test_hd95_uses_the_files_spacing_in_array_order(demo: Path) -> None:
    """The NIfTI spacing (x, y, z) = (0.5, 1, 3) is the arrays' (z, y, x) = (3, 1, 0.5): a shift along z
    costs 3 mm, along y 1 mm (reversed it would be 0.5 mm and 1 mm)."""
    liver_rows, means = evaluate_folder(demo / "results" / "predictions" / "universal" / LIVER,
                                        demo / "data" / LIVER / "labelsTs", 2, label_map=_plans(LIVER)["label_map"])  # fmt: skip
    assert [r["case"] for r in liver_rows] == ["liver_101", "liver_102"]
    assert liver_rows[0]["hd95_1"] == pytest.approx(3.0) and liver_rows[0]["dice_1"] == pytest.approx(2 / 3)
    assert liver_rows[1]["hd95_1"] == 0.0 and means["hd95_1"] == pytest.approx(1.5)
    (spleen,), _ = evaluate_folder(demo / "results" / "predictions" / "universal_adapted" / SPLEEN,
                                   demo / "data" / SPLEEN / "labelsTs", 2)  # fmt: skip
    assert spleen["hd95_1"] == pytest.approx(1.0)
    (hippo,), _ = evaluate_folder(demo / "results" / "predictions" / "universal" / HIPPO,
                                  demo / "data" / HIPPO / "labelsTs", 3)  # fmt: skip
    assert hippo["hd95_2"] == pytest.approx(DIAGONAL) and hippo["dice_2"] == 0.0


def test_command_line(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--dataset_dir", str(demo / "data"), "--results_dir", str(demo / "results")]
    adapted = [*base, "--run", f"universal_adapted={demo / 'runs' / 'adapted'}"]
    # a Dice equal to --min_dice is not below it (spleen: exactly 2/3)
    assert summary.main([*adapted, "--strict", "--min_dice", repr(2 / 3)]) == 0
    assert "every foreground Dice >= 0.6666666666666666" in capsys.readouterr().out
    # --dataset_dir, --results_dir and --run are required; --run is MODE=FOLDER
    for argv in (adapted[2:], [*adapted[:2], *adapted[4:]], base, [*base, "--run", "no_folder"]):
        with pytest.raises(SystemExit) as e:
            summary.main(argv)
        assert e.value.code == 2
    assert "--run needs MODE=FOLDER" in capsys.readouterr().err
    # the module runs as a script (train_models.sh --demo calls it so)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: demo.summary is already imported
        mp.setattr(sys, "argv", ["demo.summary", "--help"])
        with pytest.raises(SystemExit) as e:
            runpy.run_module("demo.summary", run_name="__main__")
    assert e.value.code == 0 and "usage: python -m demo.summary" in capsys.readouterr().out


def test_seed_table_reports_min_mean_spread_and_the_floor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = "mode,task,class,class_name,dice,hd95_mm,num_cases,params,task_params\n"
    for seed, (a, b) in {3: (0.90, 0.85), 12: (0.80, 0.79)}.items():
        (tmp_path / f"seed_{seed}.csv").write_text(
            fields + f"universal,TaskA,1,liver,{a},1,3,10,5\nuniversal,TaskA,2,tumour,{b},1,3,10,5\n"
        )
    files = sorted(tmp_path.glob("seed_*.csv"))
    assert seed_table.main([str(f) for f in files]) == 1  # 0.79 < 0.80
    out = capsys.readouterr().out
    assert "| universal | TaskA | 1 liver | 2 | 0.800 | 0.850 | 0.100 | 12 | 0 |" in out
    assert "| universal | TaskA | 2 tumour | 2 | 0.790 | 0.820 | 0.060 | 12 | 1 |" in out
    assert seed_table.main([str(f) for f in files] + ["--floor", "0.75"]) == 0
