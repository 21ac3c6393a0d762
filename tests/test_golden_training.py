"""The training side against the original's own functions (golden data of ``tests/golden/gen_training.py``).

Regenerate the data with ``python -m tests.golden.make_golden --original PATH/u2net_torch_src --only training``.
Integers and labels are compared exactly, the resized images to 1e-5; the structure-voxel distribution with
a chi-square test at fixed seeds (the same verdict on every machine: integer counts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.golden import gen_training as gen
from training.augmentation import AugmentParams, SampleAugmenter, UnifiedPatchResize, extraction_size
from training.config import TrainConfig
from training.loop import end_of_epoch, make_lr_rule
from training.optim import PlateauHalving
from training.sampling import (
    PatchSampler,
    choose_kind,
    compute_case_info,
    extract_patch,
    num_foreground_samples,
)
from training.step import task_for_step
from utils.task_settings import build_plans, patch_kind_probs

DATA = Path(__file__).resolve().parent / "golden" / "data" / "training.npz"
KIND_NAMES = {v: k for k, v in gen.KIND_CODES.items()}


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    if not DATA.is_file():
        pytest.fail(f"{DATA} missing: python -m tests.golden.make_golden --original ... --only training")
    with np.load(DATA) as d:
        return {k: d[k] for k in d.files}


def _plans(task: str) -> dict:
    """The project's settings of a paper task, as preprocessing writes them."""
    return build_plans(task, ["CT"], {0: "background", 1: "a", 2: "b"}, [[1.0, 1.0, 1.0]], [[64, 64, 64]])


def _sampler(
    tmp_path: Path, label: np.ndarray, patch: tuple[int, int, int], small_label: int = 2, **kw
) -> PatchSampler:
    """A sampler over one case holding ``label`` (image: ones), with that case loaded."""
    prefix = tmp_path / f"case_{len(list(tmp_path.iterdir()))}"
    np.save(f"{prefix}_image.npy", np.ones((1, *label.shape), np.float32))
    np.save(f"{prefix}_label.npy", label)
    sampler = PatchSampler([str(prefix)], patch, 1, small_label=small_label, **kw)
    sampler._advance_case()
    return sampler


def _replay(seed: int) -> np.random.RandomState:
    """numpy's stream of the original's cc_augment after its three augmentation gates (elastic,
    rotation, scaling: one uniform each), where its centre draws begin."""
    rs = np.random.RandomState(seed)
    rs.random_sample(3)
    return rs


# ---------------------------------------------------------------------------------------------
# settings and augmentation arguments
# ---------------------------------------------------------------------------------------------
def test_per_task_probabilities_are_the_originals(golden: dict[str, np.ndarray]) -> None:
    """small_probs / fore_probs of the original's config.py per task (Spleen 0 / 0) = the plans'."""
    for table, index in (("small_probs", 0), ("fore_probs", 1)):
        for task, p in zip(golden[f"config_{table}_tasks"], golden[f"config_{table}"], strict=True):
            plans = _plans(str(task))
            assert patch_kind_probs(plans)[index] == p, (task, table)
            assert plans[table[:-1]] == p
    aug = AugmentParams()
    for table, value in (
        ("scale_probs", aug.p_scale),
        ("deform_probs", aug.p_elastic),
        ("rotate_probs", aug.p_rotation),
        ("mirror_probs", aug.p_mirror),
    ):
        assert set(golden[f"config_{table}"]) == {value}, table


def test_augmentation_arguments_are_the_originals(golden: dict[str, np.ndarray]) -> None:
    """What augment_patch hands to cc_augment = what the project hands to SpatialTransform."""
    spatial = SampleAugmenter((4, 4, 4), AugmentParams()).spatial
    for key in ("alpha", "sigma", "angle_x", "angle_y", "angle_z", "scale"):
        np.testing.assert_array_equal(
            np.asarray(getattr(spatial, key), np.float64), golden[f"aug_{key}"], key
        )
    for key in ("p_el_per_sample", "p_scale_per_sample", "p_rot_per_sample"):
        assert getattr(spatial, key) == golden[f"aug_{key}"], key
    assert list(spatial.patch_center_dist_from_border) == list(golden["aug_patch_center_dist_from_border"])


def test_augmented_grid_defect_of_the_original_is_fixed(golden: dict[str, np.ndarray]) -> None:
    """A spatial transform that changes nothing (scaling by 1). The original's cc_augment samples an
    even patch axis half a voxel off its plain crop: the (cubic) image at +0.5 voxel, the (nearest,
    .5 rounded up) label at +1, so image and label disagree by half a voxel. This project's sample
    grid lies on the plain crop's voxels: image and label are the plain crop's."""
    image, label = gen.grid_case()
    img, lab = golden["grid_image"], golden["grid_label"]
    np.testing.assert_array_equal(lab[:-1, :-1, :-1], label[1:, 1:, 1:])  # the label: one voxel on
    shift = img[1:-2, 1:-2, 1:-2] - image[1:-2, 1:-2, 1:-2]  # the image: half a voxel (0.5 * (1 + 10 + 100))
    assert abs(float(shift.mean()) - 55.5) < 0.05 and float(np.abs(shift - 55.5).max()) < 1.0  # edge effects
    # the project, from a volume with the same encoding around an interior centre
    shape, patch = (20, 18, 16), gen.GRID_PATCH
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    vol, seg = 1 + z + 10 * y + 100 * x, z + 20 * y + 400 * x
    aug = AugmentParams(p_elastic=0.0, p_rotation=0.0, p_scale=1.0, scale=(1.0, 1.0), p_mirror=0.0)
    centre, ext = np.array([10, 9, 8]), extraction_size(patch, aug)
    region = [extract_patch(a[None], centre - np.asarray(ext) // 2, ext) for a in (vol, seg)]
    out_img, out_seg = SampleAugmenter(patch, aug)(region[0], region[1])
    crop = tuple(slice(c - p // 2, c - p // 2 + p) for c, p in zip(centre, patch, strict=True))
    np.testing.assert_allclose(out_img[0], vol[crop], atol=1e-3)
    np.testing.assert_array_equal(out_seg[0], seg[crop])


# ---------------------------------------------------------------------------------------------
# patch kinds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_index", range(len(gen.KIND_TASKS)))
def test_patch_kinds_and_batch_composition(golden: dict[str, np.ndarray], task_index: int) -> None:
    """gen_batch's kinds, queue item by queue item, from the same uniform numbers: the batch rule, the
    forced-foreground samples and the task's probabilities (Spleen: "fore" first, then only "any")."""
    task = gen.KIND_TASKS[task_index]
    p_small, p_fore = patch_kind_probs(_plans(task))
    seen: set[str] = set()
    for b in gen.KIND_BATCH_SIZES:
        avail = gen.kind_queue(task_index, b)
        rs = np.random.RandomState(gen.kind_seed(task_index, b))
        got, item = [], 0
        for _ in range(gen.KIND_BATCHES):
            for i in range(b):
                u = rs.random_sample()
                require = i < num_foreground_samples(b)
                while require and not avail[item, 0]:  # a draw without foreground is passed over
                    item += 1
                fore, small = bool(avail[item, 0]), bool(avail[item, 1])
                got.append((item, gen.KIND_CODES[choose_kind(u, require, fore, small, p_small, p_fore)]))
                item += 1
        want = golden[f"kinds_{task}_b{b}"]
        np.testing.assert_array_equal(np.asarray(got), want, f"{task}, batch {b}")
        seen |= {KIND_NAMES[k] for k in want[:, 1]}
    assert seen == ({"fore", "any"} if task == "Task09_Spleen" else {"any", "fore", "small"}), seen


# ---------------------------------------------------------------------------------------------
# centres
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "task"),
    [("fore", "Task04_Hippocampus"), ("small", "Task04_Hippocampus"), ("small", "Task05_Prostate")],
)
def test_structure_voxel_draws_number_for_number(
    golden: dict[str, np.ndarray], kind: str, task: str, tmp_path: Path
) -> None:
    """The same random numbers pick the same structure voxel (uniform over all its voxels: more than
    the 2,048 of the 'subset' option); "small" is the task's small label (Prostate: 1, else the highest)."""
    label, _ = gen.voxel_case(large=True)
    sampler = _sampler(tmp_path, label, (2, 2, 2), small_label=int(_plans(task)["small_label"]))
    info = sampler.case_info(0)
    got = []
    for s in range(gen.VOXEL_SEEDS):
        sampler.rs = _replay(s)
        got.append(np.ravel_multi_index(tuple(sampler._centre(kind, info)), label.shape))
    key = "voxel_small_prostate_per_seed" if task == "Task05_Prostate" else f"voxel_{kind}_per_seed"
    np.testing.assert_array_equal(got, golden[key])


def _draw_counts(sampler: PatchSampler, kind: str, n: int, size: int) -> np.ndarray:
    info = sampler.case_info(0)
    sampler.rs = np.random.RandomState(12345)
    flat = [np.ravel_multi_index(tuple(sampler._centre(kind, info)), info.shape) for _ in range(n)]
    return np.bincount(flat, minlength=size)


@pytest.mark.parametrize("kind", ["fore", "small"])
def test_structure_voxel_distribution(golden: dict[str, np.ndarray], kind: str, tmp_path: Path) -> None:
    """3,000 draws of the project (its own seed) and of the original: the same distribution (chi-square
    test of homogeneity, p > 0.01), each uniform over the structure; the cached subset of the
    'subset' option (here 8 voxels) is told apart (p < 1e-6)."""
    label, _ = gen.voxel_case()
    mask = (label > 0 if kind == "fore" else label == 2).ravel()
    theirs = np.bincount(golden[f"voxel_{kind}_draws"], minlength=label.size)[mask]
    ours = _draw_counts(_sampler(tmp_path, label, (2, 2, 2)), kind, gen.VOXEL_DRAWS, label.size)
    assert ours[~mask].sum() == 0
    ours = ours[mask]
    p_same = stats.chi2_contingency(np.stack([ours, theirs])).pvalue
    assert p_same > 0.01, p_same
    assert stats.chisquare(ours).pvalue > 0.01 and stats.chisquare(theirs).pvalue > 0.01
    if kind == "fore":  # the small structure has 5 voxels: fewer than the subset
        subset = _sampler(tmp_path, label, (2, 2, 2), centre_voxels="subset", max_points=8)
        old = _draw_counts(subset, kind, gen.VOXEL_DRAWS, label.size)[mask]
        assert stats.chi2_contingency(np.stack([old + 0.5, theirs + 0.5])).pvalue < 1e-6


@pytest.mark.parametrize("case", range(len(gen.CENTRE_GEOMETRY)))
def test_patch_centres(golden: dict[str, np.ndarray], case: int, tmp_path: Path) -> None:
    """'any' and 'fore'/'small' centres (offsets, padding of a volume smaller than the patch, odd patch
    sizes) from the same random numbers; and the centre boxes of gen_center_bboxes."""
    label, patch, _ = gen.centre_cases()[case]
    sampler = _sampler(tmp_path, label, patch)
    info = sampler.case_info(0)
    for kind in ("any", "fore", "small"):
        got = []
        for s in range(gen.CENTRE_SEEDS):
            sampler.rs = _replay(1000 * case + s)
            got.append(sampler._centre(kind, info))
        np.testing.assert_array_equal(np.asarray(got), golden[f"centre_{case}_{kind}"], kind)
    # gen_center_bboxes: the structure's box grown by the patch, within the volume
    scan = compute_case_info(label, 2)
    for kind, bbox in (("fore", scan.fore_bbox), ("small", scan.small_bbox)):
        assert bbox is not None
        lo = np.maximum(bbox[:, 0] - np.asarray(patch), 0)
        hi = np.minimum(bbox[:, 1] + np.asarray(patch), np.asarray(label.shape) - 1)
        np.testing.assert_array_equal(np.stack([lo, hi], 1).ravel(), golden[f"boxes_{case}_{kind}"], kind)


# ---------------------------------------------------------------------------------------------
# unified patch resize
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", range(len(gen.RESIZE_CASES)))
def test_unified_patch_resize(golden: dict[str, np.ndarray], case: int) -> None:
    """augment_patch's resize to the model patch (images cubic, labels nearest) = UnifiedPatchResize."""
    _, model_patch = gen.RESIZE_CASES[case]
    image, label = gen.resize_case(case)
    out = UnifiedPatchResize(model_patch)(data=image[None, None], seg=label[None, None].astype(np.float32))
    step = gen.RESIZE_STRIDE if max(model_patch) > 64 else 1
    img, lab = out["data"][0, 0], out["seg"][0, 0]
    np.testing.assert_allclose(
        img[::step, ::step, ::step], golden[f"resize_{case}_image"], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(lab[::step, ::step, ::step], golden[f"resize_{case}_label"])
    np.testing.assert_array_equal(
        np.bincount(lab.astype(np.int64).ravel(), minlength=3), golden[f"resize_{case}_label_counts"]
    )


# ---------------------------------------------------------------------------------------------
# learning-rate rule, stop, validation, checkpoints, round robin
# ---------------------------------------------------------------------------------------------
def _lr_config(golden: dict[str, np.ndarray], **kw) -> TrainConfig:
    max_epoch, val_from, val_every, save_every, window = (int(v) for v in golden["lr_schedule"])
    lr, weight_decay = (float(v) for v in golden["lr_base"])
    return TrainConfig(
        mode="independent", tasks=["Task02_Heart"], max_epoch=max_epoch, val_from=val_from, val_every=val_every,
        save_every=save_every, lr=lr, weight_decay=weight_decay, lr_window=window, **kw,
    )  # fmt: skip


def _run_rule(config: TrainConfig, losses: np.ndarray, reload_at: int = 0) -> tuple[list, list, list, int]:
    """The project's end-of-epoch decisions over the original's epoch losses; the rule goes through a
    JSON checkpoint round trip after epoch ``reload_at``."""
    rule = make_lr_rule(config)
    lrs, validated, kept = [], [], []
    for epoch in range(1, config.max_epoch + 1):
        end = end_of_epoch(config, rule, epoch, float(losses[epoch - 1]))
        lrs.append(end.lr_used)
        validated += [epoch] if end.validate else []
        kept += [epoch] if end.keep else []
        if end.stop:
            return lrs, validated, kept, epoch
        if epoch == reload_at:
            state = json.loads(json.dumps(rule.state_dict()))
            rule = PlateauHalving()
            rule.load_state_dict(state)
    return lrs, validated, kept, config.max_epoch


def test_lr_rule_stop_validation_checkpoints_round_robin(golden: dict[str, np.ndarray]) -> None:
    """The original's train() over a fixed loss sequence: the rate of every epoch (the halving epochs),
    the last epoch trained (one more epoch at the rate below 1e-8), the validation epochs, the saved
    epochs (the project keeps these and also the last one), and the task of every step."""
    losses = golden["lr_epoch_loss"]
    last = int(golden["lr_last_epoch"])
    n_tasks = len(gen.LR_TASKS)
    lr_steps = golden["lr_step_lr"].reshape(last, n_tasks)
    assert (lr_steps == lr_steps[:, :1]).all()  # the rate changes between epochs only
    for reload_at in (0, 60):
        lrs, validated, kept, stopped = _run_rule(_lr_config(golden), losses, reload_at)
        assert stopped == last
        np.testing.assert_array_equal(lrs, lr_steps[:, 0])
        assert validated == golden["lr_eval_epochs"].tolist()
        saved = set(golden["lr_saved_epochs"].tolist())
        assert saved <= set(kept) and set(kept) - saved <= {last}
    steps = golden["lr_step_task"]
    assert [task_for_step(k, list(range(n_tasks))) for k in range(1, len(steps) + 1)] == steps.tolist()
    # the option: stop in the epoch whose halving crossed 1e-8 (one epoch less)
    *_, stopped = _run_rule(_lr_config(golden, lr_stop_order="same_epoch"), losses)
    assert stopped == last - 1
