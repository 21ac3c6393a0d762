"""Sliding-window inference: stitching, weight maps, padding, TTA, unified-patch resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.settings import InferenceSettings
from inference.sliding_window import (
    ResizingNetwork,
    infer_case,
    patch_starts,
    patch_weight_map,
    sliding_window,
)
from utils.preprocessing import resize_image, resize_nearest

S = InferenceSettings


def pointwise(x: torch.Tensor, task_idx: int) -> torch.Tensor:
    """Translation-equivariant, no border effect: 3 classes from 2 modalities, voxel by voxel."""
    a, b = x[:, 0:1], x[:, 1:2]
    return torch.cat([torch.zeros_like(a), 2.0 * a - b, torch.sin(3.0 * b) + 0.1 * task_idx], dim=1)


def whole_volume(image: np.ndarray, task_idx: int = 0) -> np.ndarray:
    return torch.softmax(pointwise(torch.from_numpy(image)[None], task_idx), dim=1)[0].numpy()


@pytest.mark.parametrize("weight_mode", ["linear", "gaussian", "constant"])
def test_stitching_equals_whole_volume(weight_mode: str) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 13, 21, 17)).astype(np.float32)
    probs = sliding_window(
        pointwise,
        image,
        1,
        (8, 8, 8),
        S(batch_size=3, weight_mode=weight_mode),
        num_classes=3,
        output="probabilities",
    )
    assert probs.shape == (3, 13, 21, 17) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, whole_volume(image, 1), rtol=1e-5, atol=1e-6)
    labels = sliding_window(pointwise, image, 1, (8, 8, 8), S(batch_size=2, weight_mode=weight_mode))
    np.testing.assert_array_equal(labels, whole_volume(image, 1).argmax(0))


def test_smaller_than_patch_is_padded_and_cropped_and_tta() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 5, 9, 30)).astype(np.float32)
    seen: list[tuple[int, ...]] = []

    def pred(x: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return pointwise(x, t)

    probs = sliding_window(
        pred, image, 0, (8, 12, 16), S(mirror_tta=True, batch_size=4), output="probabilities"
    )
    assert probs.shape == (3, 5, 9, 30)
    assert all(s[2:] == (8, 12, 16) for s in seen)
    np.testing.assert_allclose(probs, whole_volume(image), rtol=1e-5, atol=1e-6)


def test_weight_map_centre_and_corners() -> None:
    w = patch_weight_map((9, 11, 7))
    assert w.shape == (9, 11, 7) and w.dtype == np.float32
    assert w[4, 5, 3] == 1.0 and w.max() == 1.0
    for c in [(0, 0, 0), (8, 10, 6), (0, 10, 0), (8, 0, 6)]:
        assert 0.0 < w[c] <= 1e-3
    assert w.min() > 0
    # falls linearly with Euclidean distance: halfway to the corner -> ~0.5
    assert abs(w[2, 5, 3] - (1 - 2 / np.sqrt(4**2 + 5**2 + 3**2))) < 1e-6
    we = patch_weight_map((8, 8, 8))
    assert np.all(we[3:5, 3:5, 3:5] == 1.0) and we[0, 0, 0] <= 1e-3
    g = patch_weight_map((9, 9, 9), "gaussian")
    assert g[4, 4, 4] == 1.0 and 0 < g[0, 0, 0] < 1e-2


def test_patch_starts_half_step() -> None:
    assert patch_starts(64, 64, 32) == [0]
    assert patch_starts(100, 64, 32) == [0, 32, 36]
    assert patch_starts(128, 64, 32) == [0, 32, 64]


def _cube_image() -> np.ndarray:
    image = np.zeros((1, 10, 12, 14), dtype=np.float32)
    image[0, 2:7, 3:9, 4:11] = 1.0
    return image


def threshold(x: torch.Tensor, t: int) -> torch.Tensor:
    """Class 1 where x > 0.3 (after a 2x trilinear upsampling of a binary cube, voxels inside
    stay >= 0.75**3 and voxels outside <= 0.25)."""
    return torch.cat([torch.zeros_like(x[:, :1]), 10.0 * x[:, :1] - 3.0], dim=1)


def test_unified_resize_volume_mode() -> None:
    """Faithful mode: the volume is scaled by model/task patch, the model sees model-patch windows,
    the label map comes back at the original shape (nearest)."""
    image = _cube_image()
    seen: list[tuple[int, ...]] = []

    def pred(x: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(tuple(x.shape[2:]))
        return threshold(x, t)

    task_patch, model_patch = (6, 6, 8), (12, 12, 16)  # factor 2 on every axis
    label = infer_case(pred, image, 0, task_patch, S(), model_patch=model_patch)
    assert set(seen) == {model_patch}
    assert label.shape == (10, 12, 14) and label.dtype == np.uint8
    np.testing.assert_array_equal(label, (image[0] > 0.5).astype(np.uint8))
    probs = infer_case(pred, image, 0, task_patch, S(), model_patch=model_patch, output="probabilities")
    assert probs.shape == (2, 10, 12, 14)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), label)


def test_unified_resize_patch_mode() -> None:
    image = _cube_image()
    seen: list[tuple[int, ...]] = []

    def pred(x: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(tuple(x.shape[2:]))
        return threshold(x, t)

    wrapped = ResizingNetwork(pred, (6, 6, 8), (12, 12, 16))
    assert wrapped(torch.zeros(2, 1, 6, 6, 8), 0).shape == (2, 2, 6, 6, 8)
    patch_mode = S(unified_mode="patch")
    label = infer_case(pred, image, 0, (6, 6, 8), patch_mode, model_patch=(12, 12, 16))
    assert set(seen) == {(12, 12, 16)}
    assert label.shape == (10, 12, 14)
    # constant image: the resize is exact, so every voxel is class 1
    ones = np.ones((1, 10, 12, 14), dtype=np.float32)
    assert infer_case(pred, ones, 0, (6, 6, 8), patch_mode, model_patch=(12, 12, 16)).min() == 1
    # inside the cube (away from its faces) the class is 1, far outside 0
    assert label[3:6, 4:8, 5:10].min() == 1 and label[8:, :, :].max() == 0


def test_float16_accumulator_and_module_predictor() -> None:
    conv = torch.nn.Conv3d(2, 3, kernel_size=1)
    rng = np.random.default_rng(2)
    image = rng.normal(size=(2, 9, 10, 11)).astype(np.float32)

    def pred(x: torch.Tensor, t: int) -> torch.Tensor:
        return conv(x)

    ref = torch.softmax(conv(torch.from_numpy(image)[None]), 1)[0].detach().numpy()
    p16 = sliding_window(pred, image, 0, (6, 6, 6), S(accum_dtype="float16"), output="probabilities")
    np.testing.assert_allclose(p16, ref, atol=5e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipelined_cpu_accumulator_matches_cpu() -> None:
    conv = torch.nn.Conv3d(2, 3, kernel_size=3, padding=1)
    rng = np.random.default_rng(3)
    image = rng.normal(size=(2, 19, 23, 29)).astype(np.float32)
    conv_gpu = torch.nn.Conv3d(2, 3, kernel_size=3, padding=1).cuda()
    conv_gpu.load_state_dict(conv.state_dict())
    ref = sliding_window(lambda x, t: conv(x), image, 0, (8, 8, 8), S(batch_size=3), output="probabilities")
    for img in (image, torch.from_numpy(image).cuda()):  # CPU input, and input already on the GPU
        for accum_device in ("cpu", "cuda"):
            settings = S(batch_size=3, device="cuda", accum_device=accum_device)
            got = sliding_window(
                lambda x, t: conv_gpu(x), img, 0, (8, 8, 8), settings, output="probabilities"
            )
            np.testing.assert_allclose(got, ref, atol=1e-4)
    labels = sliding_window(lambda x, t: conv_gpu(x), image, 0, (8, 8, 8), S(device="cuda", mirror_tta=True))
    assert labels.shape == image.shape[1:]


def _window_ramp(x: torch.Tensor, t: int) -> torch.Tensor:
    """2-class logits that depend on the position inside the window: class 1 = image + 3 * (local x - 3.5)."""
    local = torch.arange(x.shape[-1], dtype=x.dtype).view(1, 1, 1, 1, -1) - (x.shape[-1] - 1) / 2
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1] + 3.0 * local], dim=1)


def _brute_blend(image: np.ndarray, blend: str) -> np.ndarray:
    """Windows of 8³ at x = 0 and 4 over an (1, 8, 8, 12) image, linear weights, by hand."""
    w = patch_weight_map((8, 8, 8))
    acc = np.zeros((2, 8, 8, 12))
    for x0 in (0, 4):
        logits = _window_ramp(torch.from_numpy(image[None, :, :, :, x0 : x0 + 8]), 0)[0].double().numpy()
        scores = logits if blend == "logits" else np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
        acc[:, :, :, x0 : x0 + 8] += scores * w
    return acc


def test_blend_logits_or_probabilities() -> None:
    """The preset blends the weighted logits (the original), the option the probabilities; the two
    give different labels where overlapping windows disagree."""
    image = np.random.default_rng(4).normal(scale=3.0, size=(1, 8, 8, 12)).astype(np.float32)
    labels = {}
    for blend in ("logits", "probabilities"):
        got = sliding_window(_window_ramp, image, 0, (8, 8, 8), S(blend=blend))
        np.testing.assert_array_equal(got, _brute_blend(image, blend).argmax(0))
        labels[blend] = got
    assert (labels["logits"] != labels["probabilities"]).sum() > 0
    assert S().blend == "logits"
    # probabilities of a logit blend: the softmax of the weighted mean logit
    probs = sliding_window(_window_ramp, image, 0, (8, 8, 8), S(), output="probabilities")
    acc = _brute_blend(image, "logits")
    norm = np.zeros((8, 8, 12))
    for x0 in (0, 4):
        norm[:, :, x0 : x0 + 8] += patch_weight_map((8, 8, 8))
    mean_logit = acc / norm
    expected = np.exp(mean_logit) / np.exp(mean_logit).sum(0, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_volume_mode_scales_with_the_training_resize() -> None:
    """unified_mode="volume" scales the case with the cubic resize training uses (the original), the
    option with trilinear interpolation; a threshold network shows the difference."""
    rng = np.random.default_rng(5)
    image = rng.normal(size=(1, 7, 9, 11)).astype(np.float32)
    task_patch, model_patch = (4, 4, 4), (8, 8, 8)
    scaled_shape = (14, 18, 22)

    def pred(x: torch.Tensor, t: int) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1] - 0.3], dim=1)

    cubic = infer_case(pred, image, 0, task_patch, S(), model_patch=model_patch)
    expected = resize_nearest((resize_image(image, scaled_shape)[0] > 0.3).astype(np.uint8), image.shape[1:])
    np.testing.assert_array_equal(cubic, expected)
    trilinear = infer_case(pred, image, 0, task_patch, S(volume_resize="trilinear"), model_patch=model_patch)
    assert (cubic != trilinear).sum() > 0
