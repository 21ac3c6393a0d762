"""The visual report (reporting/): overlays, curves, charts, report.html; and the validation images that
training writes to TensorBoard."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import reporting.__main__ as reporting_cli
from models import build_model
from reporting.build import evaluation_report, run_report
from reporting.curves import read_run
from reporting.figures import FigureJobs
from reporting.html import Section, figure, missing_links, write_page
from reporting.overlays import PLANES, central_planes, plane_slices, render_case_overlay
from tests.synthetic import make_synthetic_task, synthetic_plans, write_folds
from training.cli import prepare_runs
from training.config import TrainConfig
from training.loop import fit
from utils.checkpoint import save_checkpoint

A, B = "Task97_TinyA", "Task98_TinyB"
# the one axial slice that holds each task's validation label, and the label's box in it (y, x)
LABEL_SLICE = {A: (5, (slice(2, 7), slice(3, 9))), B: (1, (slice(6, 11), slice(1, 4)))}


def _png(path: Path) -> np.ndarray:
    """A PNG as float RGB(A) in [0, 1] (matplotlib's reader)."""
    return np.asarray(mpimg.imread(str(path)))


def _assert_picture(path: Path, size: tuple[int, int] | None = None) -> None:
    """A real picture: a PNG of the expected size (width, height), not blank, with some colour."""
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = _png(path)
    if size is not None:
        assert (img.shape[1], img.shape[0]) == size, (path, img.shape)
    rgb = img[..., :3]
    assert rgb.std() > 0.02, f"{path} is blank"
    assert (rgb.max(axis=2) - rgb.min(axis=2)).max() > 0.2, f"{path} has no colour"


def _coloured(panel: np.ndarray) -> np.ndarray:
    """Pixels that are not grey (R, G, B not all equal)."""
    rgb = panel[..., :3]
    return (np.abs(rgb[..., 0] - rgb[..., 1]) > 1e-3) | (np.abs(rgb[..., 1] - rgb[..., 2]) > 1e-3)


# ---------------------------------------------------------------------------------------------
# overlays
# ---------------------------------------------------------------------------------------------
def test_central_planes_go_through_the_structure() -> None:
    mask = np.zeros((10, 20, 30), bool)
    mask[2:5, 14:19, 3:6] = True
    assert central_planes(mask) == (3, 16, 4)
    assert central_planes(np.zeros_like(mask), mask) == (3, 16, 4)  # first non-empty mask
    assert central_planes(np.zeros_like(mask)) == (5, 10, 15)
    vol = np.arange(10 * 20 * 30).reshape(10, 20, 30)
    axial, coronal, sagittal = plane_slices(vol, (3, 16, 4))
    assert np.array_equal(axial, vol[3]) and coronal.shape == (10, 30) and sagittal.shape == (10, 20)
    assert np.array_equal(coronal[0], vol[9, 16]) and np.array_equal(sagittal[-1], vol[0, :, 4])  # z up


def test_overlay_puts_each_label_where_its_mask_is(tmp_path: Path) -> None:
    """A crafted case: an off-centre two-class structure and a prediction shifted along x. In every
    panel of the PNG the coloured pixels are exactly the (magnified) labelled voxels of that plane."""
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (16, 24, 32)).astype(np.float32)
    truth = np.zeros(image.shape, np.uint8)
    truth[2:6, 16:22, 3:10] = 1
    truth[3:5, 17:20, 5:8] = 2
    pred = np.roll(truth, 2, axis=2)  # still cut by the sagittal plane x = 6
    path = tmp_path / "case.png"
    layout = render_case_overlay(
        path, image, truth, {"universal": pred}, spacing_zyx=(2.5, 1.0, 1.0), class_names={1: "a", 2: "b"}
    )
    _assert_picture(path, (layout.width, layout.height))
    assert layout.centre == (3, 18, 6) and layout.rows == ("ground truth", "universal")
    png = _png(path)
    labels = {"ground truth": truth, "universal": pred}
    for (row, plane), (left, top, w, h) in layout.boxes.items():
        got = _coloured(png[top : top + h, left : left + w])
        rows, cols = layout.scales[plane]
        lab = plane_slices(labels[row], layout.centre)[PLANES.index(plane)]
        want = np.repeat(np.repeat(lab > 0, rows, axis=0), cols, axis=1)
        assert got.shape == want.shape and want.any()
        assert np.array_equal(got, want), (row, plane, int((got != want).sum()))
    # the physical aspect: 2.5 mm slices are 2.5 times as tall as 1 mm pixels (whole numbers)
    assert layout.scales["coronal"][0] / layout.scales["coronal"][1] == pytest.approx(2.5, rel=0.2)


# ---------------------------------------------------------------------------------------------
# a tiny training run: TensorBoard validation images, curves
# ---------------------------------------------------------------------------------------------
def _craft_val_case(prep: Path, task: str, case: str, rng: np.random.Generator) -> None:
    """Give a validation case a label in one axial slice only, and an image that differs per slice."""
    base = prep / task / "train" / case
    label = np.load(f"{base}_label.npy")
    image = np.load(f"{base}_image.npy")
    z, box = LABEL_SLICE[task]
    new = np.zeros_like(label)
    new[(z, *box)] = 1
    np.save(f"{base}_label.npy", new)
    np.save(f"{base}_image.npy", rng.normal(0, 1, image.shape).astype(np.float32))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A 2-task universal run (2 epochs of 2 steps, validation after each) on tiny synthetic tasks.
    Returns the run folder and each task's (crafted) validation case prefix."""
    root = tmp_path_factory.mktemp("report_run")
    folds = {}
    _, folds[A] = make_synthetic_task(root / "prep", A, shape=(8, 12, 12), patch=(8, 8, 8), pools=(2, 2, 2),
                                      n_train=2, n_val=1, seed=0)  # fmt: skip
    _, folds[B] = make_synthetic_task(root / "prep", B, num_modalities=2, num_classes=3, shape=(6, 12, 12),
                                      patch=(4, 8, 8), pools=(1, 2, 2), n_train=2, n_val=1, seed=1)  # fmt: skip
    rng = np.random.default_rng(5)
    for task in (A, B):
        _craft_val_case(root / "prep", task, folds[task]["val"][0], rng)
    write_folds(root / "folds.json", folds)
    cfg = TrainConfig(
        mode="universal", tasks=[A, B], prep_dir=str(root / "prep"), folds_file=str(root / "folds.json"),
        results_dir=str(root / "out"), base_channels=4, max_epoch=2, steps_per_epoch=2, save_every=1,
        val_every=1, val_from=1, num_workers=0, device="cpu", log_images_every=0, threads=1,
        model_patch=[8, 8, 8], pools=[2, 2, 2],
    )  # fmt: skip
    (prep,) = prepare_runs(cfg)
    fit(prep, progress=False)
    return prep.run_dir, {t: root / "prep" / t / "train" / folds[t]["val"][0] for t in (A, B)}


@pytest.fixture(scope="module")
def run_dir(tiny_run: tuple[Path, dict[str, Path]]) -> Path:
    return tiny_run[0]


def _decode(encoded: bytes) -> np.ndarray:
    """A TensorBoard image summary (PNG bytes) as a 2D grey array in [0, 1]."""
    img = np.asarray(mpimg.imread(io.BytesIO(encoded), format="png"), dtype=np.float64)
    return img if img.ndim == 2 else img[..., 0]


def test_validation_images_show_each_tasks_labelled_plane(tiny_run: tuple[Path, dict[str, Path]]) -> None:
    """val/<task> holds, per task, image | ground truth | prediction of the axial slice with the
    label: the label panel is exactly that slice's label, the image panel that slice's image."""
    run_dir, val_case = tiny_run
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    ea.Reload()
    tags = ea.Tags()["images"]
    assert sorted(t for t in tags if t.startswith("val/")) == [f"val/{A}", f"val/{B}"]
    for task in (A, B):
        events = ea.Images(f"val/{task}")
        assert [e.step for e in events] == [2, 4]  # after each of the 2 epochs (2 steps each)
        row = _decode(events[-1].encoded_image_string)
        z, _ = LABEL_SLICE[task]
        label = np.load(f"{val_case[task]}_label.npy")[z]
        image = np.load(f"{val_case[task]}_image.npy")[0, z]
        h, w = label.shape
        assert row.shape == (h, 3 * w + 4)  # three panels, 2-pixel separators
        label_panel = row[:, w + 2 : 2 * w + 2]
        assert np.array_equal(label_panel > 0, label > 0)  # the right plane: the one with the label
        lo, hi = np.percentile(image, [1, 99])
        want = np.clip((image - lo) / (hi - lo), 0, 1)
        assert np.abs(row[:, :w] - want).max() <= 1.5 / 255  # and that plane's image (8-bit PNG)


def test_run_report_curves(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    curves = read_run(run_dir)
    assert curves.tasks == [A, B]
    assert [s for s, _ in curves.step_loss[A]] == [1, 3] and [s for s, _ in curves.step_loss[B]] == [2, 4]
    assert [s for s, _ in curves.lr] == [1, 2, 3, 4]
    assert sorted(curves.val_dice) == [f"{A}: 1 structure1", f"{B}: 1 structure1", f"{B}: 2 structure2"]
    assert all([s for s, _ in v] == [2, 4] for v in curves.val_dice.values())
    # python -m reporting --run DIR (a folder of runs works too) writes the page and prints its path
    out = tmp_path / "rep"
    assert reporting_cli.main(["--run", str(run_dir.parent), "--out", str(out)]) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    pngs = sorted((out / "report").glob("curves_*.png"))
    assert len(pngs) == 1
    _assert_picture(pngs[0], (1500, 420))
    assert missing_links(out / "report.html") == []
    text = (out / "report.html").read_text()
    assert "Training curves" in text and "Parameters" in text
    with pytest.raises(FileNotFoundError):
        run_report([tmp_path / "nothing"])


# ---------------------------------------------------------------------------------------------
# the evaluation report (what the demo writes)
# ---------------------------------------------------------------------------------------------
def _write_nifti(array: np.ndarray, path: Path, spacing: tuple[float, float, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def test_evaluation_report(run_dir: Path, tmp_path: Path) -> None:
    """Two modes (a 2-task universal run, two 1-task independent checkpoints), test images with labels,
    predictions (one of them off by a voxel in the "exported" copy): charts, overlays, one page whose
    links all resolve, and the differing labels reported."""
    results, data = tmp_path / "results", tmp_path / "data"
    torch.manual_seed(0)
    indep = tmp_path / "indep"
    for name, m, k in ((A, 1, 2), (B, 2, 3)):
        model = build_model("independent", [m], [k], base_channels=4, pools_per_axis=(2, 2, 2))
        plans = synthetic_plans(name, m, k, [8, 8, 8], [2, 2, 2])
        save_checkpoint(indep / name / "checkpoints" / "best.pt", model.config.to_dict(), [{"name": name, "plans": plans}],
                        model.state_dict())  # fmt: skip
    rng = np.random.default_rng(1)
    rows = []
    for name, k in ((A, 2), (B, 3)):
        for i in range(2):
            case = f"{name.lower()}_{i}.nii.gz"
            image = rng.normal(0, 1, (10, 14, 16)).astype(np.float32)
            label = np.zeros(image.shape, np.uint8)
            label[3:7, 4:9, 5 + i : 11 + i] = 1
            if k == 3:
                label[4:6, 5:7, 6 + i : 8 + i] = 2
            _write_nifti(image, data / name / "imagesTs" / case, (1.0, 1.0, 2.0))
            _write_nifti(label, data / name / "labelsTs" / case, (1.0, 1.0, 2.0))
            for mode in ("independent", "universal", "exported"):
                pred = np.roll(label, 1 if mode == "independent" else 0, axis=1)
                if mode == "exported" and name == B and i == 1:
                    pred[0, 0, 0] = 1  # one voxel off
                _write_nifti(pred, results / "predictions" / mode / name / case, (1.0, 1.0, 2.0))
        for mode in ("independent", "universal"):
            for c in range(1, k):
                rows.append({"mode": mode, "task": name, "class": c, "class_name": f"structure{c}", "dice": 0.9 - 0.1 * c,
                             "hd95_mm": 1.0, "num_cases": 2, "params": 1000, "task_params": 100})  # fmt: skip
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = evaluation_report(
        results, data, [("independent", indep), ("universal", run_dir)], compare=[("exported", "universal")]
    )
    page = results / "report.html"
    assert report.page == page and page.is_file()
    assert missing_links(page) == []
    assert [p for p in report.problems if "voxels differ" in p] == [
        f"{B.lower()}_1.nii.gz ({B}): 1 voxels differ between exported and universal"
    ]
    assets = results / "report"
    _assert_picture(assets / "dice.png", (700, 460))  # 3 (task, class) groups x 2 modes: the minimum width
    _assert_picture(assets / "parameters.png", (1000, 120 + 60 * 2))  # a bar per mode
    overlays = sorted((assets / "overlays").rglob("*.png"))
    assert [p.name for p in overlays] == [
        f"{A.lower()}_0.png",
        f"{A.lower()}_1.png",
        f"{B.lower()}_0.png",
        f"{B.lower()}_1.png",
    ]
    for p in overlays:
        _assert_picture(p)
    assert set(report.images) >= {assets / "dice.png", assets / "parameters.png", *overlays}
    assert (
        len(list(assets.glob("curves_*.png"))) == 1
    )  # the universal run (the independent folders have no logs)
    text = page.read_text()
    for needle in (
        "Summary: Dice per class",
        "Parameters",
        "Exported domains",
        "Training curves",
        "Test cases",
    ):
        assert needle in text
    assert 'src="report/dice.png"' in text  # linked relatively

    # the figures drawn by 2 forked workers: the same files, byte for byte
    if sys.platform.startswith("linux"):
        evaluation_report(results, data, [("independent", indep), ("universal", run_dir)],
                          compare=[("exported", "universal")], out_dir=tmp_path / "w2", workers=2)  # fmt: skip
        drawn = sorted(q.relative_to(assets) for q in assets.rglob("*.png"))
        assert (
            sorted(
                q.relative_to(tmp_path / "w2" / "report") for q in (tmp_path / "w2" / "report").rglob("*.png")
            )
            == drawn
        )
        for rel in drawn:
            assert (tmp_path / "w2" / "report" / rel).read_bytes() == (assets / rel).read_bytes(), rel


def _square(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_figure_jobs_keep_the_order_and_raise_errors(workers: int) -> None:
    jobs = FigureJobs(workers)
    for x in range(5):
        jobs.submit(_square, x)
    assert jobs.wait() == [0, 1, 4, 9, 16]
    jobs = FigureJobs(workers)
    jobs.submit(_square, 2)
    if workers == 1 or not sys.platform.startswith("linux"):  # drawn at once
        with pytest.raises(ValueError, match="negative: -1"):
            jobs.submit(_square, -1)
    else:
        jobs.submit(_square, -1)
        with pytest.raises(ValueError, match="negative: -1"):
            jobs.wait()


def test_missing_links_finds_broken_and_absolute_links(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    body = figure(tmp_path / "a.png", tmp_path) + figure(tmp_path / "gone.png", tmp_path)
    body += f'<a href="{tmp_path / "a.png"}">absolute</a><a href="#top">anchor</a><a href="https://x.org/y">web</a>'
    page = write_page(tmp_path / "p.html", "t", [Section("s", body)])
    assert set(missing_links(page)) == {"gone.png", str(tmp_path / "a.png")}
