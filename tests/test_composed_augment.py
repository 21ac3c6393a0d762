"""Issue 11's loader: the exact separable resize, the composed pipeline (one interpolation per sample)
against the two-step preset, and the GPU path's resampling (run on CPU tensors)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from skimage.transform import resize as skimage_resize

from tests.synthetic import make_synthetic_task, write_folds
from training.augmentation import (
    AugmentParams,
    SampleAugmenter,
    UnifiedPatchResize,
    extraction_size,
    seeded_global_rng,
)
from training.cli import prepare_runs
from training.composed_augment import ComposedAugmenter, DevicePlan, draw_transform
from training.config import TrainConfig
from training.device_augment import resample
from training.loader import TrainLoader
from training.loop import augment_params, fit
from utils.preprocessing import list_cases, resize_image

PATCH, OUT = (12, 16, 20), (24, 24, 24)
AUG = AugmentParams()


def _smooth_region(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image (values 1..4) and a ball label over an extraction region."""
    zz, yy, xx = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    image = (np.sin(3 * zz) + np.cos(4 * yy) * xx + 2.0).astype(np.float32)[None]
    label = (((zz - 0.5) ** 2 + (yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.1).astype(np.float32)[None]
    return image, label


def _two_step(
    data: np.ndarray, seg: np.ndarray, seed: int, aug: AugmentParams = AUG
) -> tuple[np.ndarray, ...]:
    with seeded_global_rng(seed):
        d, s = SampleAugmenter(PATCH, aug)(data, seg)
    b = UnifiedPatchResize(OUT)(data=d[None], seg=s[None])
    return b["data"][0], b["seg"][0]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(((a > 0) & (b > 0)).sum()) / max(float((a > 0).sum() + (b > 0).sum()), 1.0)


@pytest.mark.parametrize(("shape", "out"), [((9, 17, 12), (16, 11, 12)), ((6, 7, 8), (6, 7, 8))])
def test_resize_image_equals_skimage(shape: tuple[int, int, int], out: tuple[int, int, int]) -> None:
    """The separable resize gives skimage's resize (cubic, constant 0, clip, no anti-aliasing) exactly,
    for a modality that straddles 0 and for a positive one (whose clip range widens to the border's 0)."""
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(size=shape), rng.uniform(0.5, 3.0, size=shape)]).astype(np.float32)
    want = np.stack([skimage_resize(m, out, order=3, mode="constant", cval=0.0, clip=True,
                                    anti_aliasing=False, preserve_range=True) for m in image])  # fmt: skip
    np.testing.assert_allclose(resize_image(image, out), want, rtol=0, atol=1e-6)


def test_draws_the_same_random_numbers_as_batchgenerators() -> None:
    """Without a resize the composed augmenter IS batchgenerators' SpatialTransform + mirroring: the
    same draws, the same positions, the same cubic interpolation (to float32 rounding), seed by seed."""
    region, label = _smooth_region(extraction_size(PATCH, AUG))
    composed = ComposedAugmenter(PATCH, PATCH, AUG)
    plain = SampleAugmenter(PATCH, AUG)
    spatial = 0
    for seed in range(8):
        with seeded_global_rng(seed):
            want_d, want_s = plain(region, label)
            state = np.random.get_state()[2]
        with seeded_global_rng(seed):
            got_d, got_s = composed(region, label)
            assert np.random.get_state()[2] == state  # as many draws
        with seeded_global_rng(seed):
            spatial += draw_transform(PATCH, AUG).spatial
        np.testing.assert_allclose(got_d, want_d, rtol=0, atol=2e-5)
        np.testing.assert_array_equal(got_s, want_s)
    assert 0 < spatial < 8  # both kinds of sample were seen


def test_composed_agrees_with_two_step_on_smooth_volumes() -> None:
    """On a smooth image the single interpolation agrees with augment-then-resize: within 0.01 inside
    (values 1..4), 0.05 within 3 voxels of the border (the two-step zero padding, emulated), labels with
    Dice >= 0.9 (double vs single rounding moves the border by up to a voxel)."""
    region, label = _smooth_region(extraction_size(PATCH, AUG))
    composed = ComposedAugmenter(PATCH, OUT, AUG)
    for seed in range(6):
        want_d, want_s = _two_step(region, label, seed)
        with seeded_global_rng(seed):
            got_d, got_s = composed(region, label)
        err = np.abs(got_d - want_d)
        assert err[:, 3:-3, 3:-3, 3:-3].max() < 1e-2, seed
        assert err.max() < 5e-2, seed
        assert _dice(got_s, want_s) >= 0.9, seed


def test_composed_without_augmentation_is_the_resize() -> None:
    """No transform drawn: exactly the two-step result (centre crop, then resize_image / nearest)."""
    none = AugmentParams(p_elastic=0, p_rotation=0, p_scale=0, p_mirror=0)
    region, label = _smooth_region(extraction_size(PATCH, AUG))
    want_d, want_s = _two_step(region, label, 0, none)
    got_d, got_s = ComposedAugmenter(PATCH, OUT, none)(region, label)
    np.testing.assert_array_equal(got_d, want_d)
    np.testing.assert_array_equal(got_s, want_s)


def test_device_resampling_matches_composed_cpu() -> None:
    """The GPU path (torch ops, here on CPU tensors): the same labels as the composed CPU pipeline and,
    on a smooth volume (values 1..4), a trilinear image within 0.005 of its cubic one; for a sample
    without a spatial transform the CPU resizes the bare crop, whose cubic spline rings against the
    crop's zero padding, while the device reads the region: 0.01 inside, 0.05 at the border."""
    region, label = _smooth_region(extraction_size(PATCH, AUG))
    composed = ComposedAugmenter(PATCH, OUT, AUG)
    spatial: list[bool] = []
    for seed in range(6):
        with seeded_global_rng(seed):
            want_d, want_s = composed(region, label)
        with seeded_global_rng(seed):
            plan, got_s = composed.plan(region, label)
        with seeded_global_rng(seed):
            draw = draw_transform(PATCH, AUG)
        spatial.append(draw.spatial)
        assert isinstance(plan, DevicePlan) and plan.any()
        got_d = resample(plan, "cpu").numpy()
        assert got_d.shape == want_d.shape
        np.testing.assert_array_equal(got_s, want_s)
        err = np.abs(got_d - want_d)
        # an augmented sample: both read the region; a plain one: the CPU resizes the crop (whose cubic
        # spline rings against the crop's zero padding), the device reads the region
        assert err.max() < (5e-3 if draw.spatial else 5e-2), seed
        assert err[:, 3:-3, 3:-3, 3:-3].max() < (5e-3 if draw.spatial else 1e-2), seed
    assert spatial and not all(spatial)


def test_linear_interpolation_reads_its_neighbours_and_matches_the_device_path() -> None:
    """``--augment_interp linear`` (order 1): the same samples whether the region read around the
    positions has the cubic prefilter's 12-voxel margin or only the neighbours (bit-identical); the
    GPU path's trilinear resampling (run on CPU tensors) gives the same values up to float rounding;
    and it is not the cubic result (the flag changes the images, never the labels)."""
    linear = AugmentParams(order_data=1)
    region, label = _smooth_region(extraction_size(PATCH, AUG))
    lin, cubic = ComposedAugmenter(PATCH, OUT, linear), ComposedAugmenter(PATCH, OUT, AUG)
    assert lin.read_margin < cubic.read_margin
    spatial = 0
    for seed in range(6):
        with seeded_global_rng(seed):
            got_d, got_s = lin(region, label)
        with seeded_global_rng(seed):
            cub_d, cub_s = cubic(region, label)
        with seeded_global_rng(seed):
            plan, _ = lin.plan(region, label)
        wide = ComposedAugmenter(PATCH, OUT, linear)
        wide.read_margin = 1000  # the whole region
        with seeded_global_rng(seed):
            wide_d, _ = wide(region, label)
        with seeded_global_rng(seed):
            draw = draw_transform(PATCH, AUG)
        np.testing.assert_array_equal(got_d, wide_d)
        np.testing.assert_array_equal(got_s, cub_s)
        if draw.spatial:
            spatial += 1
            np.testing.assert_allclose(resample(plan, "cpu").numpy(), got_d, atol=2e-5)
            assert np.abs(got_d - cub_d).max() > 1e-4, seed
    assert spatial >= 3


@pytest.mark.parametrize("mode", ["composed", "device"])
def test_loader_pipelines_give_model_patch_batches(tmp_path: Path, mode: str) -> None:
    """The loader's composed and GPU paths (device = CPU here) give model-patch batches of the preset
    kinds, with the structure of every "fore" patch present (the redraw rule, at the model patch), and
    the two paths agree on the labels."""
    plans, _ = make_synthetic_task(
        tmp_path, "Task90_Tiny", shape=(16, 20, 20), patch=PATCH, n_train=3, n_val=0
    )
    cases = list_cases(tmp_path / "Task90_Tiny")
    kwargs = dict(model_patch=OUT, seed=7, num_workers=0)
    with (
        TrainLoader(cases, plans, 2, pipeline="composed", **kwargs) as cpu,
        TrainLoader(  # type: ignore[arg-type]
            cases,
            plans,
            2,
            augment_device=torch.device("cpu"),
            **kwargs,  # type: ignore[arg-type]
        ) as dev,
    ):
        for _ in range(3):
            a, b = next(cpu), next(dev if mode == "device" else cpu)
            assert tuple(a["data"].shape) == (2, 1, *OUT) and tuple(a["seg"].shape) == (2, 1, *OUT)
            assert tuple(b["data"].shape) == (2, 1, *OUT) and b["data"].dtype == torch.float32
            for batch in (a, b):
                for k, kind in enumerate(batch["kinds"]):
                    if kind in ("fore", "small") and batch["aug_fallbacks"] == 0:
                        assert batch["seg"][k].max() > 0
            if mode == "device":
                assert torch.equal(a["seg"], b["seg"]) and a["kinds"] == b["kinds"]


def _tiny_shared_runs(
    tmp_path: Path, tasks: tuple[str, ...], steps_per_epoch: int
) -> Callable[..., TrainConfig]:
    """Synthetic tasks under ``tmp_path`` and a maker of tiny one-epoch shared-run configs for them."""
    folds = {}
    for i, name in enumerate(tasks):
        _, folds[name] = make_synthetic_task(tmp_path / "prep", name, shape=(10, 14, 14), patch=(6, 10, 12),
                                             n_train=3, n_val=1, seed=i)  # fmt: skip
    write_folds(tmp_path / "folds.json", folds)

    def config(**kw: Any) -> TrainConfig:
        return TrainConfig(
            mode="shared", tasks=list(folds), prep_dir=str(tmp_path / "prep"), folds_file=str(tmp_path / "folds.json"),
            results_dir=str(tmp_path / "out"), base_channels=2, model_patch=[8, 8, 8], pools=[1, 1, 1], max_epoch=1,
            steps_per_epoch=steps_per_epoch, val_every=0, num_workers=0, device="cpu", threads=1, **kw,
        )  # fmt: skip

    return config


def test_training_run_with_composed_pipeline(tmp_path: Path) -> None:
    """The flags reach the loop: a shared run with --augment_pipeline composed trains on model-patch
    batches (finite losses) and records the settings; --augment_device cuda without a GPU is refused
    with a clear message; unknown values are refused."""
    config = _tiny_shared_runs(tmp_path, ("Task97_TinyA", "Task98_TinyB"), steps_per_epoch=4)
    (prep,) = prepare_runs(config(augment_pipeline="composed"))
    losses: list[float] = []
    fit(prep, progress=False, on_step=lambda s, loss: losses.append(loss))
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert json.loads((prep.run_dir / "config.json").read_text())["augment_pipeline"] == "composed"
    (prep,) = prepare_runs(config(augment_device="cuda", out_tag="gpu"))
    with pytest.raises(ValueError, match="augment_device cuda needs a CUDA"):
        fit(prep, progress=False)
    with pytest.raises(ValueError, match="augment_pipeline"):
        config(augment_pipeline="fast")


def test_augment_interp_reaches_the_loader(tmp_path: Path) -> None:
    """``--augment_interp``: the preset is cubic (order 3); 'linear' gives order 1 and, from the same
    seeds and initial weights, other training losses (the flag would give identical ones if the loader
    ignored it); an unknown value is refused."""
    runs = _tiny_shared_runs(tmp_path, ("Task97_TinyA",), steps_per_epoch=3)

    def config(**kw: Any) -> TrainConfig:
        return runs(augment_pipeline="composed", **kw)

    preset = augment_params(config())
    assert isinstance(preset, AugmentParams) and preset.order_data == 3 and preset == AugmentParams()
    linear = augment_params(config(augment_interp="linear"))
    assert isinstance(linear, AugmentParams) and linear.order_data == 1
    assert augment_params(config(augment=False)) is False
    losses: dict[str, list[float]] = {}
    for interp in ("cubic", "linear"):
        (prep,) = prepare_runs(config(augment_interp=interp, out_tag=interp))
        losses[interp] = []
        fit(prep, progress=False, on_step=lambda s, loss, out=losses[interp]: out.append(loss))
        assert json.loads((prep.run_dir / "config.json").read_text())["augment_interp"] == interp
    assert len(losses["linear"]) == 3 and all(np.isfinite(losses["linear"]))
    assert losses["linear"] != losses["cubic"]
    with pytest.raises(ValueError, match="augment_interp"):
        config(augment_interp="quintic")
