"""nnU-Net v2 datasets and MetaImage/NRRD files: reading, the checks of every format, and a tiny end-to-end
run (preprocess, train, predict) whose results equal those of the same task in MSD NIfTI layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import data_explore
import predict
import preprocess_taskSep
from demo.data import generate_task, task_folder_name
from inference.inputs import collect_cases
from training.cli import main as train_main
from utils.checkpoint import load_checkpoint
from utils.decathlon import DataError, load_task, read_image, read_label

PROSTATE = "Task93_DemoProstateMR"  # two modalities: a 4D image (MSD) or two channel files (nnU-Net)
NNUNET = task_folder_name(PROSTATE, "nnunetv2")


def _image(arr: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img


# ---------------------------------------------------------------------------------------------
# the demo generator and the two layouts
# ---------------------------------------------------------------------------------------------


def test_demo_writes_both_layouts_and_formats_alike(tmp_path: Path) -> None:
    msd = generate_task(PROSTATE, tmp_path / "msd", n_train=2, n_test=1, size=16)
    nnu = generate_task(
        PROSTATE, tmp_path / "nnu", n_train=2, n_test=1, size=16, layout="nnunetv2", file_format="mha"
    )
    nrrd = generate_task(PROSTATE, tmp_path / "nrrd", n_train=2, n_test=1, size=16, file_format="nrrd")
    assert nnu.name == "Dataset093_DemoProstateMR"
    assert sorted(p.name for p in (nnu / "imagesTr").iterdir()) == [
        f"prostatemr_00{i}_000{c}.mha" for i in (1, 2) for c in (0, 1)
    ]
    assert sorted(p.name for p in (nnu / "labelsTr").iterdir()) == [
        "prostatemr_001.mha",
        "prostatemr_002.mha",
    ]
    meta = json.loads((nnu / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T2", "1": "ADC"} and meta["file_ending"] == ".mha"
    assert meta["labels"] == {"background": 0, "PZ": 1, "TZ": 2} and meta["numTraining"] == 2
    tasks = [load_task(p) for p in (msd, nnu, nrrd)]
    assert [t.layout for t in tasks] == ["msd", "nnunetv2", "msd"]
    assert {(t.modalities, tuple(t.labels.items())) for t in tasks} == {
        (("T2", "ADC"), ((0, "background"), (1, "PZ"), (2, "TZ")))
    }
    assert [[c.case_id for c in t.training] for t in tasks] == [["prostatemr_001", "prostatemr_002"]] * 3
    assert [[c.case_id for c in t.test] for t in tasks] == [["prostatemr_101"]] * 3
    for cases in zip(*(t.training for t in tasks), strict=True):
        images = [read_image(c.source, ["T2", "ADC"]) for c in cases]
        labels = [read_label(c.label)[0] for c in cases]
        for (arr, geom), lab in zip(images[1:], labels[1:], strict=True):
            np.testing.assert_array_equal(arr, images[0][0])
            np.testing.assert_array_equal(lab, labels[0])
            # NRRD stores spacing x direction as vectors: the spacing comes back within a rounding error
            np.testing.assert_allclose(geom.spacing_xyz, images[0][1].spacing_xyz, rtol=1e-12)
            assert geom.n_modalities == 2
            np.testing.assert_allclose(geom.direction, images[0][1].direction, atol=1e-6)


def _nnunet_task(root: Path, name: str, labels: dict, **extra: object) -> Path:
    task = root / name
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nrrd", **extra}
    (task / "dataset.json").write_text(json.dumps(meta))
    vol = np.random.default_rng(0).uniform(1, 100, (8, 10, 12)).astype(np.float32)
    sitk.WriteImage(_image(vol), str(task / "imagesTr" / "c_001_0000.nrrd"))
    sitk.WriteImage(_image((vol > 50).astype(np.uint8)), str(task / "labelsTr" / "c_001.nrrd"))
    return task


def test_unsupported_dataset_json_clear_error_other_tasks_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    _nnunet_task(data, "Dataset001_Good", {"background": 0, "organ": 1})
    _nnunet_task(data, "Dataset002_Regions", {"background": 0, "whole": [1, 2], "core": 2})
    _nnunet_task(data, "Dataset003_Ignore", {"background": 0, "organ": 1, "ignore": 2})
    _nnunet_task(data, "Dataset004_Png", {"background": 0, "organ": 1}, file_ending=".png")
    (data / "Dataset005_Neither").mkdir()
    (data / "Dataset005_Neither" / "dataset.json").write_text('{"labels": {"0": "background"}}')
    rc = preprocess_taskSep.main(
        ["--dataset_dir", str(data), "--prep_dir", str(tmp_path / "prep"), "--nProc", "1", "--no_progress"]
    )
    out = capsys.readouterr().out
    assert rc == 1
    failed = out.split("Failed tasks:")[1]
    for task, why in (
        ("Dataset002_Regions", "region-based labels are not supported ('whole': [1, 2])"),
        ("Dataset003_Ignore", "an \"ignore\" label ('ignore': 2) is not supported"),
        ("Dataset004_Png", "\"file_ending\" '.png' is not a supported image format"),
        ("Dataset005_Neither", "dataset.json is neither MSD"),
    ):
        assert any(line.strip().startswith(f"{task}:") and why in line for line in failed.splitlines()), (
            task,
            out,
        )
    assert "1 case(s) preprocessed" in out
    assert (tmp_path / "prep" / "Dataset001_Good" / "train" / "c_001.json").is_file()
    plans = json.loads((tmp_path / "prep" / "Dataset001_Good" / "plans.json").read_text())
    assert plans["modalities"] == ["CT"] and plans["labels"] == {"0": "background", "1": "organ"}


# ---------------------------------------------------------------------------------------------
# every format gets the same checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".mha", ".nrrd", ".mhd", ".nii"])
def test_checks_apply_to_every_format(ext: str, tmp_path: Path) -> None:
    vol = np.random.default_rng(0).uniform(1, 100, (8, 10, 12)).astype(np.float32)

    def write(name: str, arr: np.ndarray) -> Path:
        path = tmp_path / f"{name}{ext}"
        sitk.WriteImage(_image(arr, (1.0,) * arr.ndim), str(path), useCompression=False)
        return path

    good = write("good", vol)
    arr, geom = read_image(good, 1)
    np.testing.assert_array_equal(arr[0], vol)
    assert geom.size_zyx == (8, 10, 12)
    nan = vol.copy()
    nan[3, 4, 5] = np.nan
    cases = {
        write("nan", nan): r"1 voxel\(s\) .*are NaN or Inf \(the first at \(z, y, x\) = \(3, 4, 5\)\)",
        write("zero", np.zeros_like(vol)): "every voxel of the image is 0",
        write("two_d", vol[0]): "found a 2D image",
    }
    data_file = tmp_path / "good.raw" if ext == ".mhd" else good
    cut = tmp_path / f"trunc{ext}"
    if ext == ".mhd":  # the header names the data file: cut a copy of that
        cut.write_text(good.read_text().replace("good.raw", "trunc.raw"))
        (tmp_path / "trunc.raw").write_bytes(data_file.read_bytes()[:1000])
    else:
        cut.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    cases[cut] = "truncated"
    junk = tmp_path / f"junk{ext}"
    junk.write_bytes(b"this is a text file, not an image\n" * 20)
    cases[junk] = "not a readable"
    for path, why in cases.items():
        with pytest.raises(DataError, match=why) as e:
            read_image(path, 1)
        assert e.value.path == str(path)
    with pytest.raises(
        DataError, match="image has a 3D image .1 modality. but dataset.json lists 2 modalities"
    ):
        read_image(good, ["T2", "ADC"])
    if ext == ".mhd":
        (tmp_path / "good.raw").unlink()
        with pytest.raises(DataError, match="its voxel data file good.raw is missing"):
            read_image(good, 1)


def test_channel_files_and_unknown_files(tmp_path: Path) -> None:
    vol = np.random.default_rng(1).uniform(1, 100, (8, 10, 12)).astype(np.float32)
    a, b, c = tmp_path / "case_0000.mha", tmp_path / "case_0001.mha", tmp_path / "other_0001.mha"
    sitk.WriteImage(_image(vol), str(a))
    sitk.WriteImage(_image(vol * 2), str(b))
    arr, geom = read_image([a, b], ["T2", "ADC"])
    assert arr.shape == (2, 8, 10, 12) and geom.n_modalities == 2
    np.testing.assert_array_equal(arr[1], vol * 2)
    sitk.WriteImage(_image(vol, (1.0, 1.0, 2.0)), str(c))
    with pytest.raises(DataError, match=r"channel 0 \(case_0000.mha\) and channel 1 differ in spacing") as e:
        read_image([a, c], 2)
    assert e.value.path == str(c)
    with pytest.raises(DataError, match=r"file not found \(channel 1 of the 2 channel files"):
        read_image([a, tmp_path / "missing_0001.mha"], 2)
    with pytest.raises(DataError, match="image has 3 channel files but dataset.json lists 2 modalities"):
        read_image([a, b, a], 2)
    odd = tmp_path / "scan.img"
    odd.write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match=r"unsupported file type \.img: images must be \.nii\.gz"):
        read_image(odd, 1)
    # predict.py's input cases: channel files of the task's modality count form one case, others stay files
    cases, problems = collect_cases([tmp_path, odd], n_channels=2)
    assert [(k.name, k.kind) for k in cases] == [("case", "channels"), ("other_0001", "file")]
    assert cases[0].output_name() == "case.mha" and cases[0].output_name("nifti") == "case.nii.gz"
    assert problems == [(odd, problems[0][1])] and "unsupported file type .img" in problems[0][1]
    cases, _ = collect_cases([tmp_path], n_channels=1)
    assert sorted(k.output_name("nrrd") for k in cases) == [
        "case_0000.nrrd",
        "case_0001.nrrd",
        "other_0001.nrrd",
    ]


# ---------------------------------------------------------------------------------------------
# end to end: nnU-Net layout in .mha == MSD layout in NIfTI
# ---------------------------------------------------------------------------------------------


def _train(
    prep: Path, results: Path, data: Path, tasks: list[str], mode: str = "independent", *extra: str
) -> int:
    script = "train_model_no_adapters.py" if mode == "independent" else "train_model_wt_adapters.py"
    modes = ("independent", "shared") if mode == "independent" else ("shared", "universal")
    args = ["--trainMode", mode, "--tasks", *tasks, "--prep_dir", str(prep), "--results_dir", str(results),
            "--dataset_dir", str(data), "--base_outChans", "4", "--batch_size", "2", "--max_epoch", "1",
            "--steps_per_epoch", "2", "--val_every", "1", "--save_every", "1", "--num_workers", "0",
            "--threads", "1", "--device", "cpu", "--log_images_every", "1000", "--no_progress"]  # fmt: skip
    args += ["--patch_size", "8", "16", "16", "--pools", "1", "2", "2"] if mode == "independent" else []
    args += ["--model_patch", "8", "16", "16", "--pools", "1", "2", "2"] if mode != "independent" else []
    return train_main([*args, *extra], prog=script, modes=modes, default_mode=mode, description="")


def test_nnunet_mha_task_gives_the_msd_nifti_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    msd_data, nnu_data, prep = tmp_path / "msd", tmp_path / "nnunet", tmp_path / "prep"
    kw = {"n_train": 3, "n_test": 2, "size": 16}
    generate_task(PROSTATE, msd_data, **kw)
    generate_task(PROSTATE, nnu_data, layout="nnunetv2", file_format="mha", **kw)
    # exploring: the same facts from either layout
    rows = {}
    for data in (msd_data, nnu_data):
        assert data_explore.main(["--dataset_dir", str(data), "--out_dir", str(tmp_path / data.name / "x"),
                                  "--no_progress"]) == 0  # fmt: skip
        with open(tmp_path / data.name / "x" / "meta_per_case.csv") as f:
            rows[data.name] = [
                {k: v for k, v in r.items() if k not in ("task", "image_file")} for r in csv.DictReader(f)
            ]
    assert rows["msd"] == rows["nnunet"] and rows["msd"][0]["n_modalities"] == "2"
    # preprocessing both into one prepData: the same arrays
    for data in (msd_data, nnu_data):
        assert preprocess_taskSep.main(["--dataset_dir", str(data), "--prep_dir", str(prep), "--nProc", "1",
                                        "--no_progress"]) == 0  # fmt: skip
    msd_files = sorted(p.name for p in (prep / PROSTATE / "train").iterdir())
    assert msd_files == sorted(p.name for p in (prep / NNUNET / "train").iterdir())
    for name in msd_files:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(
                np.load(prep / PROSTATE / "train" / name), np.load(prep / NNUNET / "train" / name)
            )
    side = json.loads((prep / NNUNET / "train" / "prostatemr_001.json").read_text())
    assert side["case"] == "prostatemr_001" and [Path(p).name for p in side["image_files"]] == [
        "prostatemr_001_0000.mha",
        "prostatemr_001_0001.mha",
    ]
    # a few training steps (validated in the original geometry, against labelsTr/*.mha): the same model
    results = tmp_path / "results"
    assert _train(prep, results, msd_data, [PROSTATE]) == 0
    assert _train(prep, results, nnu_data, [NNUNET], "independent", "--predict", "test") == 0
    run_test = next(results.rglob(f"{NNUNET}/predictions/{NNUNET}/test"))  # imagesTs: channel files -> .mha
    assert sorted(p.name for p in run_test.iterdir()) == ["prostatemr_101.mha", "prostatemr_102.mha"]
    ckpts = {t: next(results.rglob(f"{t}/checkpoints/best.pt")) for t in (PROSTATE, NNUNET)}
    a, b = (load_checkpoint(ckpts[t])["state_dict"] for t in (PROSTATE, NNUNET))
    assert all(torch.equal(a[k], b[k]) for k in a)
    dice = {t: (ckpts[t].parent.parent / "eval" / "epoch_0001" / f"{t}.csv").read_text() for t in ckpts}
    assert dice[PROSTATE] == dice[NNUNET] and ",original," in dice[NNUNET]  # scored against labelsTr/*.mha
    # predicting each layout's test images: the same label maps, each in its input's format
    for task, data in ((PROSTATE, msd_data), (NNUNET, nnu_data)):
        argv = [
            "--ckp",
            str(ckpts[task]),
            "--input",
            str(data / task / "imagesTs"),
            "--output",
            str(tmp_path / task),
        ]
        assert predict.main([*argv, "--no_progress"]) == 0
    assert sorted(p.name for p in (tmp_path / NNUNET).iterdir()) == [
        "predict_settings.json",
        "prostatemr_101.mha",
        "prostatemr_102.mha",
    ]
    for case in ("prostatemr_101", "prostatemr_102"):
        x = sitk.ReadImage(str(tmp_path / PROSTATE / f"{case}.nii.gz"))
        y = sitk.ReadImage(str(tmp_path / NNUNET / f"{case}.mha"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(x), sitk.GetArrayFromImage(y))
        np.testing.assert_allclose(x.GetOrigin(), y.GetOrigin(), atol=1e-4)
        assert sitk.GetArrayFromImage(x).any()
    # a universal model of an MSD task and an nnU-Net task together
    assert _train(prep, results, tmp_path, [PROSTATE, NNUNET], mode="universal") == 0
    ckpt = load_checkpoint(next(results.rglob("res_u2net3d_universal/*/checkpoints/latest.pt")))
    assert [t["name"] for t in ckpt["tasks"]] == [PROSTATE, NNUNET]
    capsys.readouterr()
