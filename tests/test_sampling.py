"""Patch sampling / augmentation loader on tiny synthetic preprocessed cases (docs/formats.md)."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from training.augmentation import (
    AugmentParams,
    MirrorAxesTransform,
    SampleAugmenter,
    extraction_size,
    safe_jitter,
    seeded_global_rng,
)
from training.loader import TrainLoader
from training.sampling import (
    PatchSampler,
    compute_case_info,
    extract_patch,
    num_foreground_samples,
    structure_voxel,
)
from utils.folds import fold_case_ids
from utils.preprocessing import list_cases

PATCH = (8, 12, 10)
TASK = "Task99_Tiny"


def _write_case(
    split_dir: Path, cid: str, shape: tuple[int, int, int], boxes: dict[int, tuple], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    image = (1.0 + rng.random((2, *shape))).astype(np.float32)  # never 0 inside the volume
    label = np.zeros(shape, np.uint8)
    for value, (z0, z1, y0, y1, x0, x1) in boxes.items():
        label[z0:z1, y0:y1, x0:x1] = value
    np.save(split_dir / f"{cid}_image.npy", image)
    np.save(split_dir / f"{cid}_label.npy", label)
    np.save(split_dir / f"{cid}_weight.npy", np.ones(shape, np.uint8))
    sidecar = {
        "case": cid,
        "resampled_shape": list(shape),
        "class_voxels": [int((label == c).sum()) for c in range(3)],
    }
    (split_dir / f"{cid}.json").write_text(json.dumps(sidecar))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prep") / TASK
    tr = root / "train"
    tr.mkdir(parents=True)
    # a:   both labels, structures far from the centre
    _write_case(tr, "tiny_000", (20, 30, 26), {1: (2, 9, 3, 12, 2, 9), 2: (4, 7, 5, 8, 4, 7)}, 0)
    # b:   both labels at the other corner
    _write_case(tr, "tiny_001", (18, 28, 30), {1: (10, 17, 15, 26, 18, 28), 2: (12, 15, 20, 23, 22, 25)}, 1)
    # c:   no small label (2)
    _write_case(tr, "tiny_002", (16, 24, 22), {1: (5, 11, 8, 16, 6, 14)}, 2)
    # d:   smaller than the patch
    _write_case(tr, "tiny_003", (6, 8, 7), {1: (1, 4, 2, 6, 2, 5), 2: (2, 3, 3, 5, 3, 4)}, 3)
    # e:   no foreground at all
    _write_case(tr, "tiny_004", (12, 16, 14), {}, 4)
    # unfinished case (no sidecar) must not be listed
    np.save(tr / "tiny_005_image.npy", np.zeros((2, 4, 4, 4), np.float32))
    plans = {
        "task": TASK,
        "modalities": ["T2", "ADC"],
        "num_classes": 3,
        "patch_size": list(PATCH),
        "small_label": 2,
        "batch_size": 5,
    }
    (root / "plans.json").write_text(json.dumps(plans))
    return root


@pytest.fixture(scope="module")
def plans(task_dir: Path) -> dict:
    return json.loads((task_dir / "plans.json").read_text())


def test_list_cases_and_folds(task_dir: Path, tmp_path: Path) -> None:
    cases = list_cases(task_dir)
    assert [Path(c).name for c in cases] == [f"tiny_00{i}" for i in range(5)]
    splits = {TASK: [{"train": ["tiny_003", "tiny_000.nii.gz"], "val": ["tiny_001"]}] * 5}
    path = tmp_path / "fold_splits.json"
    path.write_text(json.dumps(splits))
    ids = fold_case_ids(path, TASK, 0, "train")
    assert ids == ["tiny_003", "tiny_000"]
    assert [Path(c).name for c in list_cases(task_dir, case_ids=ids)] == ["tiny_000", "tiny_003"]
    with pytest.raises(ValueError):
        list_cases(task_dir, case_ids=["tiny_005"])


def test_case_info_and_extract_patch() -> None:
    label = np.zeros((10, 12, 14), np.uint8)
    label[2:5, 3:9, 4:6] = 1
    label[3, 4, 5] = 2
    info = compute_case_info(label, small_label=2, max_points=5)
    assert info.fore_bbox.tolist() == [[2, 4], [3, 8], [4, 5]]
    assert info.small_bbox.tolist() == [[3, 3], [4, 4], [5, 5]]
    assert len(info.fore_points) == 5 and all(label[tuple(p)] > 0 for p in info.fore_points)
    assert info.fore_cumcount.tolist() == [0, 0, 12, 24, 36, 36, 36, 36, 36, 36]
    assert info.small_cumcount.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert compute_case_info(np.zeros((3, 3, 3), np.uint8), 2).fore_bbox is None
    arr = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6) + 1
    out = extract_patch(arr, (-2, 3, 1), (6, 4, 7))
    assert out.shape == (2, 6, 4, 7)
    np.testing.assert_array_equal(out[:, 2:6, 0:2, 0:5], arr[:, 0:4, 3:5, 1:6])
    assert np.count_nonzero(out) == 2 * 4 * 2 * 5
    assert not extract_patch(arr, (10, 0, 0), (2, 2, 2)).any()


def test_geometry_helpers() -> None:
    aug = AugmentParams()
    ext = extraction_size(PATCH, aug)
    assert all(e >= p and (e - p) % 2 == 0 for e, p in zip(ext, PATCH, strict=True))
    assert ext[1] >= math.hypot(12, 10) * 1.25
    assert safe_jitter((40, 56, 40), None) == (19, 27, 19)
    assert safe_jitter((40, 56, 40), aug) == (10, 7, 7)
    assert [num_foreground_samples(b) for b in (1, 2, 3, 4, 9)] == [1, 2, 2, 3, 4]


@pytest.mark.parametrize("augment", [False, True])
def test_first_samples_hold_foreground(task_dir: Path, plans: dict, augment: bool) -> None:
    batch = 5  # first ceil(5/3)+1 = 3 must hold foreground
    n_batches = 12 if augment else 40
    for seed in (0, 1, 2):
        it = TrainLoader(list_cases(task_dir), plans, batch, seed=seed, augment=augment)
        for _ in range(n_batches):
            b = next(it)
            b = {**b, "data": b["data"].numpy(), "seg": b["seg"].numpy()}
            assert b["data"].shape == (batch, 2, *PATCH) and b["seg"].shape == (batch, 1, *PATCH)
            assert b["data"].dtype == np.float32
            for i in range(3):
                assert b["kinds"][i] in ("fore", "small")
                assert (b["seg"][i] > 0).any(), (seed, b["kinds"], b["case_ids"])
                if b["kinds"][i] == "small":
                    assert (b["seg"][i] == 2).any()
            assert set(np.unique(b["seg"])) <= {0.0, 1.0, 2.0}
            assert "tiny_004" not in b["case_ids"][:3]


def test_structure_voxel_is_the_kth_in_raster_order() -> None:
    """structure_voxel(k) = np.where(structure)[k] for every k (the original's voxel list), reading one
    slice of the label."""
    rng = np.random.default_rng(5)
    label = (rng.random((7, 9, 6)) < 0.3).astype(np.uint8) * rng.integers(1, 3, (7, 9, 6)).astype(np.uint8)
    info = compute_case_info(label, small_label=2)
    for value, cumcount, mask in (
        (None, info.fore_cumcount, label > 0),
        (2, info.small_cumcount, label == 2),
    ):
        voxels = np.argwhere(mask)
        assert int(cumcount[-1]) == len(voxels)
        got = np.array([structure_voxel(label, cumcount, k, value) for k in range(len(voxels))])
        np.testing.assert_array_equal(got, voxels)
        with pytest.raises(IndexError):
            structure_voxel(label, cumcount, len(voxels), value)


def test_kind_probabilities_from_the_plans(task_dir: Path, plans: dict) -> None:
    """Task09_Spleen's plans (small_prob = fore_prob = 0, as the original's config): the forced samples
    are "fore", all the others "any"; plans written before the keys existed get the preset row's
    values; --kind_probs overrides both."""
    cases = [c for c in list_cases(task_dir) if Path(c).name in ("tiny_000", "tiny_001", "tiny_003")]
    spleen = {**plans, "small_prob": 0.0, "fore_prob": 0.0}
    legacy = {**plans, "preset_row": "Task09_Spleen"}  # no small_prob / fore_prob keys
    for p in (spleen, legacy):
        it = TrainLoader(cases, p, 5, seed=0, augment=False)
        for _ in range(20):
            assert next(it)["kinds"] == ["fore"] * 3 + ["any"] * 2
    kinds = set()
    it = TrainLoader(cases, spleen, 5, seed=0, augment=False, kind_probs=(0.3, 0.3))
    for _ in range(20):
        kinds |= set(next(it)["kinds"])
    assert kinds == {"any", "fore", "small"}


def test_kind_distribution(task_dir: Path) -> None:
    # cases that always have both labels, so kinds are exactly the drawn ones
    cases = [c for c in list_cases(task_dir) if Path(c).name in ("tiny_000", "tiny_001", "tiny_003")]
    loader = PatchSampler(cases, PATCH, 9, small_label=2, seed=7)
    counts_first = {"small": 0, "fore": 0, "any": 0}
    counts_rest = {"small": 0, "fore": 0, "any": 0}
    n = 400
    for _ in range(n):
        kinds = loader.next_batch()["kinds"]
        for k in kinds[:4]:
            counts_first[k] += 1
        for k in kinds[4:]:
            counts_rest[k] += 1
    # 1600 / 2000 draws: binomial std <= 0.0125; tolerance 0.05 is > 4 std
    assert counts_first["any"] == 0
    assert counts_first["small"] / (4 * n) == pytest.approx(0.3, abs=0.05)
    assert counts_rest["small"] / (5 * n) == pytest.approx(0.3, abs=0.05)
    assert counts_rest["fore"] / (5 * n) == pytest.approx(0.3, abs=0.05)
    assert counts_rest["any"] / (5 * n) == pytest.approx(0.4, abs=0.05)


def test_two_draws_per_case(task_dir: Path) -> None:
    cases = [c for c in list_cases(task_dir) if Path(c).name != "tiny_004"]
    loader = PatchSampler(cases, PATCH, 4, small_label=2, seed=3)
    ids = sum((loader.next_batch()["case_ids"] for _ in range(10)), [])
    assert all(ids[i] == ids[i + 1] for i in range(0, len(ids), 2))
    # shuffled passes: every case appears once per pass of 4 cases x 2 draws
    assert sorted(set(ids[:8])) == sorted(Path(c).name for c in cases)


def test_padding_small_volume(task_dir: Path) -> None:
    small = [c for c in list_cases(task_dir) if Path(c).name == "tiny_003"]  # (6, 8, 7) < patch
    loader = PatchSampler(small, PATCH, 6, small_label=2, seed=0)
    n_any = 0
    for _ in range(10):
        b = loader.next_batch()
        for i in range(6):
            nz = np.argwhere(b["data"][i, 0] != 0)
            box = nz.max(0) - nz.min(0) + 1
            assert len(nz) == np.prod(box) and (box <= (6, 8, 7)).all()  # the volume part, zero around
            assert (b["data"][i, 0][b["seg"][i, 0] > 0] != 0).all()
            if b["kinds"][i] == "any":  # the whole volume lies inside the patch
                n_any += 1
                assert len(nz) == 6 * 8 * 7 and np.count_nonzero(b["seg"][i]) == 3 * 4 * 3
                # the original's rule puts the volume in the middle: padding split ceil/floor per axis
                assert nz.min(0).tolist() == [1, 2, 2] and nz.max(0).tolist() == [6, 9, 8]
    assert n_any > 0
    # the other centre rule places a smaller volume anywhere inside the patch
    safe = PatchSampler(small, PATCH, 6, small_label=2, seed=0, centre_mode="safe")
    corners = set()
    for _ in range(10):
        b = safe.next_batch()
        corners |= {
            tuple(np.argwhere(b["data"][i, 0] != 0).min(0)) for i in range(6) if b["kinds"][i] == "any"
        }
    assert len(corners) > 1


def _one_voxel_case(root: Path, shape: tuple[int, int, int], voxel: tuple[int, int, int]) -> list[str]:
    split = root / "train"
    split.mkdir(parents=True)
    label = np.zeros(shape, np.uint8)
    label[voxel] = 1
    np.save(split / "one_image.npy", np.ones((1, *shape), np.float32))
    np.save(split / "one_label.npy", label)
    (split / "one.json").write_text("{}")
    return list_cases(root)


@pytest.mark.parametrize("mode", ["original", "safe"])
def test_fore_centre_offsets(tmp_path: Path, mode: str) -> None:
    """'original': the centre lies up to patch/2 - 1 voxels from the picked structure voxel (and in
    the volume); 'safe': at most the safe jitter, small enough to survive any augmentation."""
    patch = (16, 16, 16)
    cases = _one_voxel_case(tmp_path, (64, 64, 64), (32, 32, 32))
    jitter = safe_jitter(patch, AugmentParams())
    sampler = PatchSampler(cases, patch, 1, small_label=1, seed=1, centre_mode=mode, jitter=jitter)
    sampler.next_batch()  # loads the case
    info = sampler.case_info(0)
    offsets = np.array([sampler._centre("fore", info) - 32 for _ in range(3000)])
    bound = 16 // 2 - 1 if mode == "original" else max(jitter)
    assert np.abs(offsets).max() <= bound
    if mode == "original":  # the whole range is used
        assert np.abs(offsets).max(0).tolist() == [bound] * 3
    else:
        assert (np.abs(offsets).max(0) <= np.array(jitter)).all()
    assert max(jitter) < 16 // 2 - 2  # the two rules differ


@pytest.mark.parametrize("mode", ["original", "safe"])
def test_augmentation_redrawn_until_the_structure_stays(tmp_path: Path, mode: str) -> None:
    """A one-voxel structure and strong rotation/scaling: 'original' redraws (counted) until every
    'fore' patch holds the voxel; 'safe' never needs to (its jitter keeps the voxel inside)."""
    patch = (8, 12, 12)
    cases = _one_voxel_case(tmp_path, (24, 40, 40), (12, 20, 20))
    aug = AugmentParams(p_elastic=0.0, p_rotation=1.0, p_scale=1.0, p_mirror=0.0)
    sampler = PatchSampler(
        cases,
        patch,
        3,
        small_label=1,
        seed=2,
        centre_mode=mode,
        augmenter=SampleAugmenter(patch, aug),
        extraction=extraction_size(patch, aug),
        jitter=safe_jitter(patch, aug),
    )
    retries = 0
    for _ in range(20):
        b = sampler.next_batch()
        retries += b["aug_retries"]
        for i, kind in enumerate(b["kinds"]):
            if kind == "fore":
                assert (b["seg"][i] > 0).any()
    assert (retries > 0) == (mode == "original")


def test_shapes_unified_resize_and_determinism(task_dir: Path, plans: dict) -> None:
    state = np.random.get_state()
    cases = list_cases(task_dir)
    a = TrainLoader(cases, plans, 3, model_patch=(16, 16, 16), seed=11)
    b = TrainLoader(cases, plans, 3, model_patch=(16, 16, 16), seed=11)
    c = TrainLoader(cases, plans, 3, model_patch=(16, 16, 16), seed=12)
    differs = False
    for _ in range(3):
        ba, bb, bc = next(a), next(b), next(c)
        assert isinstance(ba["data"], torch.Tensor) and ba["data"].dtype == torch.float32
        assert ba["data"].shape == (3, 2, 16, 16, 16) and ba["seg"].shape == (3, 1, 16, 16, 16)
        assert set(torch.unique(ba["seg"]).tolist()) <= {0.0, 1.0, 2.0}
        assert torch.equal(ba["data"], bb["data"]) and torch.equal(ba["seg"], bb["seg"])
        assert ba["kinds"] == bb["kinds"] and ba["case_ids"] == bb["case_ids"]
        differs |= not torch.equal(ba["data"], bc["data"])
        assert (ba["seg"][:2] > 0).flatten(1).any(1).all()  # resize keeps the foreground
    assert differs
    # the global numpy RNG is untouched by the loader/transforms
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]


@pytest.mark.parametrize(("p_flip", "effective"), [(0.5, 0.15), (1.0, 0.3)])
def test_mirror_last_axis_probability(p_flip: float, effective: float) -> None:
    """The preset gates with p 0.3 and then flips with p 0.5 (effective 0.15, as the original's
    batchgenerators call); p_flip 1.0 is the earlier behaviour (0.3)."""
    rng = np.random.default_rng(0)
    n = 4000
    data = rng.random((n, 1, 2, 3, 4)).astype(np.float32)
    seg = rng.integers(0, 3, (n, 1, 2, 3, 4)).astype(np.float32)
    d0, s0 = data.copy(), seg.copy()
    with seeded_global_rng(5):
        out = MirrorAxesTransform((2,), 0.3, p_flip)(data=data, seg=seg)
    flipped = np.array([np.array_equal(out["data"][i], d0[i, :, :, :, ::-1]) for i in range(n)])
    same = np.array([np.array_equal(out["data"][i], d0[i]) for i in range(n)])
    assert (flipped ^ same).all()  # each sample is either untouched or flipped on x only
    assert flipped.mean() == pytest.approx(effective, abs=0.025)  # std <= 0.0073
    np.testing.assert_array_equal(out["seg"][flipped], s0[flipped][..., ::-1])
    np.testing.assert_array_equal(out["seg"][same], s0[same])
    assert AugmentParams().p_mirror * AugmentParams().p_mirror_flip == pytest.approx(0.15)


def _centre_crop(volume: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    off = [(e - p) // 2 for e, p in zip(volume.shape, patch, strict=True)]
    return volume[off[0] : off[0] + patch[0], off[1] : off[1] + patch[1], off[2] : off[2] + patch[2]]


def test_rotation_is_about_first_axis() -> None:
    """Rotation only: a volume that is a z-ramp plus a function of the (y, x) distance to the centre
    is invariant to rotations in the (y, x) plane (about z) but not to rotations about y or x;
    a y-ramp changes (so a rotation did happen)."""
    rot = AugmentParams(p_elastic=0, p_rotation=1.0, p_scale=0, p_mirror=0)
    none = AugmentParams(p_elastic=0, p_rotation=0.0, p_scale=0, p_mirror=0)
    ext = extraction_size(PATCH, rot)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in ext], indexing="ij")
    r2 = (y - (ext[1] - 1) / 2) ** 2 + (x - (ext[2] - 1) / 2) ** 2
    seg = np.zeros((1, *ext), np.float32)
    with_rot = SampleAugmenter(PATCH, rot)
    without = SampleAugmenter(PATCH, none)
    for volume in (2.0 * z + 0.05 * r2, y):
        with seeded_global_rng(3):
            plain = without(volume[None].copy(), seg.copy())[0][0]
        np.testing.assert_allclose(
            plain, _centre_crop(volume, PATCH), atol=1e-4
        )  # no rotation: the centre crop
    for seed in (3, 4, 5):
        symmetric = 2.0 * z + 0.05 * r2
        with seeded_global_rng(seed):
            out = with_rot(symmetric[None].copy(), seg.copy())[0][0]
        np.testing.assert_allclose(out, _centre_crop(symmetric, PATCH), atol=0.05)
        with seeded_global_rng(seed):
            out_y = with_rot(y[None].copy(), seg.copy())[0][0]
        assert np.abs(out_y - _centre_crop(y, PATCH)).max() > 0.1


def test_loader_worker_processes_are_deterministic(task_dir: Path, plans: dict) -> None:
    """Two loaders with 2 worker processes each give the same batches; 1 worker equals in-process;
    close() stops the workers."""
    cases = list_cases(task_dir)
    single = TrainLoader(cases, plans, 2, seed=5, num_workers=0)
    one = TrainLoader(cases, plans, 2, seed=5, num_workers=1)
    with (
        TrainLoader(cases, plans, 2, seed=5, num_workers=2) as a,
        TrainLoader(cases, plans, 2, seed=5, num_workers=2) as b,
    ):
        batches_a = [next(a) for _ in range(4)]
        batches_b = [next(b) for _ in range(4)]
        assert len(mp.active_children()) >= 4
    for ba, bb in zip(batches_a, batches_b, strict=True):
        assert torch.equal(ba["data"], bb["data"]) and torch.equal(ba["seg"], bb["seg"])
        assert ba["case_ids"] == bb["case_ids"]
    # batches alternate between the two workers: not all equal to each other
    assert not torch.equal(batches_a[0]["data"], batches_a[1]["data"])
    try:
        for _ in range(2):
            bs, b1 = next(single), next(one)
            assert b1["data"].shape == (2, 2, *PATCH)
            assert torch.equal(bs["data"], b1["data"]) and torch.equal(bs["seg"], b1["seg"])
            assert bs["kinds"] == b1["kinds"]
    finally:
        one.close()
        single.close()
    deadline = time.monotonic() + 10
    while mp.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mp.active_children()
    with pytest.raises(RuntimeError, match="closed"):
        next(one)
