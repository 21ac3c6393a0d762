"""DICOM in (series folders, checked geometry from the headers) and DICOM SEG out (highdicom)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import predict
from tests.dicomkit import CLASSES, ct_phantom, oblique_direction, tiny_ct_checkpoint, write_series
from utils.decathlon import DataError, read_image
from utils.dicom_series import find_series, read_series, series_slices

pydicom = pytest.importorskip("pydicom")  # requirements-dev.txt brings it with highdicom


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_ct_checkpoint(tmp_path_factory.mktemp("dicom") / "model.pt")


def _predict(ckpt: Path, inputs: list[Path], out: Path, *extra: str) -> int:
    args = ["--ckp", str(ckpt), "--input", *map(str, inputs), "--output", str(out), "--no_progress"]
    return predict.main([*args, "--no_postprocess", *extra])  # the raw argmax: a richer label map


def test_series_geometry_from_headers_not_file_order(tmp_path: Path) -> None:
    """Shuffled file names, an oblique orientation: the volume and its geometry are the ones written."""
    vol = ct_phantom()
    d = oblique_direction()
    info = write_series(tmp_path / "s", vol, direction=d, spacing_xyz=(0.8, 0.9, 2.5), origin=(-10, 20, 30))
    (series,) = find_series(tmp_path / "s")
    assert (series.uid, series.description, series.modality, series.n_files) == (
        info["uid"],
        "CT abdomen",
        "CT",
        10,
    )
    files, spacing = series_slices(series)
    assert files == [info["files"][k] for k in range(10)] and spacing == pytest.approx(2.5)
    image, _ = read_series(series)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), vol.astype(np.float32))
    np.testing.assert_allclose(image.GetSpacing(), (0.8, 0.9, 2.5), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (-10, 20, 30), atol=1e-6)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), d, atol=1e-6)
    array, geom = read_image(tmp_path / "s", ["CT"])  # the reader every pipeline step uses
    assert array.shape == (1, 10, 20, 24) and geom.size_zyx == (10, 20, 24)


def test_dicom_seg_matches_nifti_voxel_by_voxel(ckpt: Path, tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    info = write_series(tmp_path / "in" / "patient1", ct_phantom())
    assert _predict(ckpt, [tmp_path / "in"], tmp_path / "nii", "--output_format", "nifti") == 0
    assert _predict(ckpt, [tmp_path / "in"], tmp_path / "seg", "--output_format", "dicom-seg") == 0
    uid = info["uid"]
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == sorted(
        ["cases.csv", f"{uid}.dcm", "predict_settings.json"]
    )
    nifti = sitk.ReadImage(str(tmp_path / "nii" / f"{uid}.nii.gz"))
    label = sitk.GetArrayFromImage(nifti)
    assert label.shape == (10, 20, 24) and set(np.unique(label)) == {0, 1, 2}  # a non-trivial label map
    seg = hd.seg.segread(str(tmp_path / "seg" / f"{uid}.dcm"))
    # one segment per foreground class, named from the plans; the algorithm's name and version
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [CLASSES["1"], CLASSES["2"]]
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "3D U2-Net (u2net3d)" and algo.AlgorithmVersion == "0.1.0"
    # it references the source series and its slices
    assert seg.StudyInstanceUID == info["study"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    refs = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(info["sops"].values())
    # voxel by voxel: each source slice (found by its position, not by any order) against the NIfTI
    sops = [info["sops"][k] for k in range(10)]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sops, combine_segments=True)
    for k, sop in enumerate(sops):
        ds = pydicom.dcmread(str(info["files"][k]), stop_before_pixels=True)
        z = nifti.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])
        assert z[:2] == (0, 0)
        np.testing.assert_array_equal(pixels[sops.index(sop)], label[z[2]], err_msg=f"slice {k}")
    # cases.csv: which output is which series
    (row,) = list(csv.DictReader(open(tmp_path / "seg" / "cases.csv")))
    assert (row["output"], row["status"], row["series_uid"]) == (f"{uid}.dcm", "written", uid)
    assert (row["series_description"], row["files"]) == ("CT abdomen", "10")


def test_bad_dicom_inputs_each_named_others_done(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("highdicom")
    root = tmp_path / "in"  # a folder of series folders
    good = write_series(root / "good", ct_phantom(seed=1))
    two_a = write_series(root / "two", ct_phantom(seed=2), description="arterial")
    two_b = write_series(root / "two", ct_phantom(seed=3), description="venous", seed=1, prefix="B")
    gap = write_series(root / "gap", ct_phantom(seed=4), skip=(4,), description="gappy")
    uneven = write_series(root / "uneven", ct_phantom(seed=5), description="uneven")
    for k in range(6, 10):  # the last 4 slices 0.5 mm further away: uneven, not missing
        ds = pydicom.dcmread(str(uneven["files"][k]))
        d = oblique_direction()[:, 2]
        ds.ImagePositionPatient = [
            f"{float(v) + 0.5 * d[i]:.6f}" for i, v in enumerate(ds.ImagePositionPatient)
        ]
        ds.save_as(str(uneven["files"][k]))
    notes = tmp_path / "notes.xyz"
    notes.write_text("not an image")
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(ct_phantom().astype(np.float32)), str(nifti))
    lone = good["files"][3]
    out = tmp_path / "out"
    rc = _predict(ckpt, [root, notes, nifti, lone], out, "--output_format", "dicom-seg")
    err = capsys.readouterr().err
    assert rc == 1
    listing = err.split("input(s) failed:")[1]
    expected = [
        (str(root / "two"), "the folder holds 2 DICOM series: "),
        (str(root / "two"), f'{two_a["uid"]} ("arterial", 10 file(s))'),
        (str(root / "two"), f'{two_b["uid"]} ("venous", 10 file(s))'),
        (str(root / "gap"), f'DICOM series {gap["uid"]} ("gappy", 9 file(s))'),
        (str(root / "gap"), "1 slice(s) missing (slice spacing 2.5 mm"),
        (str(root / "uneven"), f'{uneven["uid"]} ("uneven", 10 file(s))'),
        (str(root / "uneven"), "uneven slice spacing (gaps from 2.5 to 3 mm)"),
        (str(notes), "unsupported file type .xyz"),
        (str(nifti), "--output_format dicom-seg needs DICOM input"),
        (str(lone), "a single DICOM file: give the folder that holds its series"),
    ]
    for path, why in expected:
        assert any(line.strip().startswith(f"{path}:") and why in line for line in listing.splitlines()), (
            path,
            why,
            listing,
        )
    assert "6 input(s) failed" in err and "wrote 1 of 7 label maps" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cases.csv", f"{good['uid']}.dcm", "predict_settings.json"]
    )
    rows = {r["series_uid"]: r for r in csv.DictReader(open(out / "cases.csv"))}
    assert rows[good["uid"]]["status"] == "written"
    assert rows[gap["uid"]]["status"] == "failed" and "missing" in rows[gap["uid"]]["reason"]


def test_several_series_folder_given_to_read_image(tmp_path: Path) -> None:
    a = write_series(tmp_path / "s", ct_phantom(), description="a")
    b = write_series(tmp_path / "s", ct_phantom(), description="b", seed=3, prefix="B")
    with pytest.raises(DataError) as e:
        read_image(tmp_path / "s", 1)
    assert "the folder holds 2 DICOM series" in e.value.reason
    assert (
        f'{a["uid"]} ("a", 10 file(s))' in e.value.reason
        and f'{b["uid"]} ("b", 10 file(s))' in e.value.reason
    )
