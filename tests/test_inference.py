"""Sliding-window inference: stitching, weight maps, padding, TTA, unified-patch resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.settings import InferenceSettings
from inference.sliding_window import (
    ResizingNetwork,
    infer_case,
    pad_to_patch,
    patch_starts,
    patch_weight_map,
    scaled_shape,
    sliding_window,
    window_positions,
)
from utils.preprocessing import resize_image, resize_nearest

S = InferenceSettings


def pointwise(x: torch.Tensor, task_idx: int) -> torch.Tensor:
    """Translation-equivariant, no border effect: 3 classes from 2 modalities, voxel by voxel."""
    a, b = x[:, 0:1], x[:, 1:2]
    return torch.cat([torch.zeros_like(a), 2.0 * a - b, torch.sin(3.0 * b) + 0.1 * task_idx], dim=1)


def whole_volume(image: np.ndarray, task_idx: int = 0) -> np.ndarray:
    return torch.softmax(pointwise(torch.from_numpy(image)[None], task_idx), dim=1)[0].numpy()


@pytest.mark.parametrize("weight_mode", ["linear", "linear_symmetric", "gaussian", "constant"])
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
    """The preset's map (the original's calPatchWeights): centred at patch/2, 1 there, falling
    linearly with the Euclidean distance to 1e-20 at voxel (0, 0, 0), the farthest one."""
    w = patch_weight_map((9, 11, 7))
    assert w.shape == (9, 11, 7) and w.dtype == np.float32 and w.max() == 1.0
    # centre (4.5, 5.5, 3.5): the nearest voxels are 8 at distance sqrt(3) / 2
    d = np.sqrt(((np.indices((9, 11, 7)) - np.array([4.5, 5.5, 3.5])[:, None, None, None]) ** 2).sum(0))
    expected = 1 - (d - d.min()) / (d.max() - d.min()) + 1e-20
    np.testing.assert_allclose(w, expected.astype(np.float32), rtol=1e-6)
    assert w[4:6, 5:7, 3:5].min() == 1.0 and w[0, 0, 0] == np.float32(1e-20)
    we = patch_weight_map((8, 8, 8))
    assert we[4, 4, 4] == 1.0 and (we == 1.0).sum() == 1 and we[0, 0, 0] == np.float32(1e-20)
    # the far corner (7, 7, 7) is 3 voxels from the centre, (0, 0, 0) 4: weight 1 - 3/4
    assert we[7, 7, 7] == pytest.approx(0.25, abs=1e-6)
    # the previous symmetric map, kept as an option: centre (p-1)/2, every corner floored at 1e-3
    ws = patch_weight_map((9, 11, 7), "linear_symmetric")
    assert ws[4, 5, 3] == 1.0
    for c in [(0, 0, 0), (8, 10, 6), (0, 10, 0), (8, 0, 6)]:
        assert ws[c] == np.float32(1e-3)
    assert abs(ws[2, 5, 3] - (1 - 2 / np.sqrt(4**2 + 5**2 + 3**2))) < 1e-6


@pytest.mark.parametrize("patch", [(9, 9, 9), (8, 12, 6)])
def test_gaussian_weight_map_everywhere(patch: tuple[int, int, int]) -> None:
    """The Gaussian map at every voxel: sigma = patch / 8 per axis around (p - 1) / 2, maximum 1,
    floored at 1e-3 (a doubled sigma, or another centre, changes most voxels)."""
    g = patch_weight_map(patch, "gaussian")
    idx = np.indices(patch).astype(np.float64)
    centre = (np.array(patch) - 1) / 2.0
    sigma = np.array(patch) / 8.0
    z = ((idx - centre[:, None, None, None]) / sigma[:, None, None, None]) ** 2
    expected = np.exp(-0.5 * z.sum(0))
    expected = np.maximum(expected / expected.max(), 1e-3)
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-7)
    wide = np.exp(-0.5 * (z / 4).sum(0))  # sigma doubled
    assert np.abs(np.maximum(wide / wide.max(), 1e-3) - g).max() > 0.3


def test_window_positions_like_the_original_loop() -> None:
    """Starts and multiplicities equal a transcription of the original's loop (centres from p//2
    every step while below size + p//2, clipped to size - p//2), for many sizes and patches."""
    for patch in range(2, 12):
        for size in range(1, 40):
            h = patch // 2
            starts = [min(c, size - h) - h for c in range(h, size + h, h)]
            expected = sorted((s, starts.count(s)) for s in set(starts))
            assert window_positions(size, patch, h) == expected, (size, patch)
    # half-patch steps: the last window twice; an odd patch's last window one voxel past the end
    assert window_positions(8, 8, 4) == [(0, 2)]
    assert window_positions(12, 8, 4) == [(0, 1), (4, 2)]
    assert window_positions(9, 7, 3) == [(0, 1), (3, 2)]  # [3, 10) over 9 voxels
    assert window_positions(7, 8, 4) == [(-1, 2)]  # shorter than the patch (volume mode)
    assert window_positions(12, 8, 4, "once") == [(0, 1), (4, 1)]


def test_patch_starts_half_step() -> None:
    assert patch_starts(64, 64, 32) == [0]
    assert patch_starts(100, 64, 32) == [0, 32, 36]
    assert patch_starts(128, 64, 32) == [0, 32, 64]


def test_window_positions_edge_cases() -> None:
    """A one-voxel patch (every voxel a window, once), a step of one voxel, and the sizes refused."""
    assert window_positions(5, 1, 1) == [(s, 1) for s in range(5)]
    assert window_positions(1, 1, 1) == [(0, 1)]
    assert patch_starts(10, 8, 1) == [0, 1, 2]
    assert patch_starts(10, 8, 0) == [0, 1, 2]  # a step below one voxel counts as one
    for size, patch in ((0, 8), (5, 0)):
        with pytest.raises(ValueError):
            window_positions(size, patch, 4)
    with pytest.raises(ValueError):
        patch_starts(7, 8, 4)


def test_windows_host_grid_and_multiplicities() -> None:
    """``_windows``: the windows in the coordinates of the host grid (the volume padded just enough,
    per axis), their multiplicities, and the padding before/after each axis."""
    from inference.sliding_window import _windows

    full = (slice(0, 8), slice(0, 8), slice(0, 8))
    # every axis shorter than the patch, each by a different amount (the volume mode's windows)
    assert _windows((7, 6, 5), (8, 8, 8), S()) == ([full], [8], [1, 2, 3], [0, 0, 0])
    # an odd patch: the last window reaches one voxel past the end along z only
    windows, counts, before, after = _windows((9, 8, 8), (7, 8, 8), S())
    assert windows == [(slice(0, 7), slice(0, 8), slice(0, 8)), (slice(3, 10), slice(0, 8), slice(0, 8))]
    assert (counts, before, after) == ([4, 8], [0, 0, 0], [1, 0, 0])
    # a two-voxel patch steps by one voxel: starts 0, 1, 2 (the last twice) per axis
    windows, counts, before, after = _windows((4, 4, 4), (2, 2, 2), S())
    assert len(windows) == 27 and sorted(set(counts)) == [1, 2, 4, 8] and sum(counts) == 4**3


def test_mirror_sets_and_the_class_limit_of_the_label_map() -> None:
    """TTA mirrors every subset of the axes (duplicates ignored), the empty one first; the chunked
    argmax takes up to 256 classes (uint8), whatever the volume's depth."""
    from inference.sliding_window import _argmax_chunked, _flip_sets

    assert _flip_sets([2, 0, 1, 0]) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    acc = torch.zeros((256, 300, 1, 2))
    acc[255, ::2, 0, 1] = 1.0
    region = (slice(0, 300), slice(0, 1), slice(0, 2))
    labels = _argmax_chunked(acc, region)
    assert labels.shape == (300, 1, 2) and labels[::2, 0, 1].min() == 255 and labels[1::2].max() == 0
    with pytest.raises(ValueError):
        _argmax_chunked(torch.zeros((257, 2, 1, 1)), (slice(0, 2), slice(0, 1), slice(0, 1)))
    # equal patches (any sequence type) take the plain sliding window in infer_case
    from inference.sliding_window import _same

    assert _same((8, 8, 8), [8, 8, 8]) and not _same((8, 8, 8), (8, 8, 9))


def test_padding_modes_and_scaled_shape() -> None:
    image = torch.ones((1, 5, 8, 10))
    padded, region = pad_to_patch(image, (8, 8, 8))  # ceil_both: 3 short -> 2 + 2 (9 voxels)
    assert tuple(padded.shape[1:]) == (9, 8, 10) and region == (slice(2, 7), slice(0, 8), slice(0, 10))
    padded, region = pad_to_patch(image, (8, 8, 8), "exact")  # 1 before, 2 after
    assert tuple(padded.shape[1:]) == (8, 8, 10) and region[0] == slice(1, 6)
    assert float(padded.sum()) == float(image.sum())
    padded, region = pad_to_patch(torch.ones((1, 4, 8, 8)), (8, 8, 8), "exact")  # 4 short: 2 + 2
    assert tuple(padded.shape[1:]) == (8, 8, 8) and region[0] == slice(2, 6)
    # int(s * (m / t)) as the original, not round(): 49 * (8 / 49) = 7.999999999999999
    assert scaled_shape((49, 13, 10), (49, 6, 8), (8, 8, 8)) == (7, 17, 10)
    assert scaled_shape((49, 13, 10), (49, 6, 8), (8, 8, 8), "round") == (8, 17, 10)
    assert scaled_shape((1, 13, 10), (8, 6, 8), (8, 8, 8), "round") == (1, 17, 10)  # one voxel stays one
    assert scaled_shape((1, 13, 10), (8, 6, 8), (8, 8, 8)) == (1, 17, 10)


def test_repeated_windows_run_once_and_count_as_often_as_the_original_visits_them() -> None:
    """The original evaluates the last window along each axis twice; the project runs every distinct
    window once and weights it by its multiplicity: the same blend, fewer forward passes."""
    image = np.random.default_rng(6).normal(scale=3.0, size=(1, 8, 8, 12)).astype(np.float32)
    seen: list[int] = []

    def net(x: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(x.shape[0])
        return _window_ramp(x, t)

    got = sliding_window(net, image, 0, (8, 8, 8), S(batch_size=4))
    assert sum(seen) == 2  # x starts 0 and 4; the original ran 2 * 2 * 3 = 12 windows
    np.testing.assert_array_equal(got, _brute_blend(image, "logits", counts=(1, 2)).argmax(0))
    once = sliding_window(_window_ramp, image, 0, (8, 8, 8), S(window_count="once"))
    np.testing.assert_array_equal(once, _brute_blend(image, "logits", counts=(1, 1)).argmax(0))
    assert (once != got).sum() > 0


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


def _brute_blend(image: np.ndarray, blend: str, counts: tuple[int, int] = (1, 2)) -> np.ndarray:
    """Windows of 8³ at x = 0 and 4 over an (1, 8, 8, 12) image, the preset's linear weights, by
    hand; ``counts``: how often each is counted (the original's loop: the last one twice)."""
    w = patch_weight_map((8, 8, 8))
    acc = np.zeros((2, 8, 8, 12))
    for x0, n in zip((0, 4), counts, strict=True):
        logits = _window_ramp(torch.from_numpy(image[None, :, :, :, x0 : x0 + 8]), 0)[0].double().numpy()
        scores = logits if blend == "logits" else np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
        acc[:, :, :, x0 : x0 + 8] += n * scores * w
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
    for x0, n in ((0, 1), (4, 2)):
        norm[:, :, x0 : x0 + 8] += n * patch_weight_map((8, 8, 8))
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


def test_predict_flags_reach_the_settings() -> None:
    """The defaults of predict.py are the preset's; every option of this module has a flag."""
    import predict

    assert predict.settings_from_args(
        predict.build_parser().parse_args(["--ckp", "x", "--input", "i", "--output", "o"])
    ) == S(progress=True)
    args = ["--ckp", "x", "--input", "i", "--output", "o", "--weight_mode", "linear_symmetric",
            "--window_count", "once", "--pad_mode", "exact", "--volume_scaling", "round",
            "--accumulator", "float32", "--closing_border", "keep", "--weight_mask", "before_after"]  # fmt: skip
    got = predict.settings_from_args(predict.build_parser().parse_args(args))
    assert (got.weight_mode, got.window_count, got.pad_mode, got.volume_scaling) == (
        "linear_symmetric",
        "once",
        "exact",
        "round",
    )
    assert (got.accum_dtype, got.closing_border, got.weight_mask) == ("float32", "keep", "before_after")
    fp16 = predict.build_parser().parse_args(
        ["--ckp", "x", "--input", "i", "--output", "o", "--fp16_accumulator"]
    )
    assert predict.settings_from_args(fp16).accum_dtype == "float16"


def test_weight_map_arguments_and_degenerate_patches() -> None:
    """Patches of one voxel along an axis are valid (a single voxel weighs 1), other shapes and modes
    are refused; the symmetric ramp of an even patch is 1 at its eight central voxels and 0 (floored
    at ``eps``) at its corners; ``eps`` and ``sigma_scale`` reach the map."""
    assert patch_weight_map((1, 4, 4)).shape == (1, 4, 4)
    for mode in ("linear", "linear_symmetric"):
        one = patch_weight_map((1, 1, 1), mode)
        assert one.shape == (1, 1, 1) and one.dtype == np.float32 and one[0, 0, 0] == 1.0
    for bad in ((8, 8), (0, 8, 8), (8, 8, 8, 8)):
        with pytest.raises(ValueError):
            patch_weight_map(bad)
    with pytest.raises(ValueError):
        patch_weight_map((8, 8, 8), "cosine")  # type: ignore[arg-type]
    ws = patch_weight_map((8, 6, 4), "linear_symmetric", eps=0.0)
    d = np.sqrt(((np.indices((8, 6, 4)) - np.array([3.5, 2.5, 1.5])[:, None, None, None]) ** 2).sum(0))
    np.testing.assert_allclose(ws, 1 - (d - d.min()) / (d.max() - d.min()), rtol=1e-6, atol=1e-7)
    assert ws[3:5, 2:4, 1:3].min() == 1.0 and ws[0, 0, 0] == 0.0
    assert patch_weight_map((8, 8, 8), "gaussian", eps=0.5).min() == np.float32(0.5)
    wide = patch_weight_map((9, 9, 9), "gaussian", sigma_scale=0.25)
    assert wide[0, 4, 4] == pytest.approx(np.exp(-0.5 * (4 / 2.25) ** 2), rel=1e-6)


def test_to_tensor_copies_only_when_it_must() -> None:
    """float32 C-contiguous writeable arrays and float32 tensors are used in place; other dtypes are
    converted to float32, read-only (memmap-like) and non-contiguous arrays copied."""
    from inference.sliding_window import _to_tensor

    arr = np.zeros((1, 2, 3, 4), dtype=np.float32)
    assert np.shares_memory(_to_tensor(arr).numpy(), arr)
    t = torch.zeros((1, 2, 3, 4))
    assert _to_tensor(t).data_ptr() == t.data_ptr()
    assert _to_tensor(t.double()).dtype == torch.float32
    assert _to_tensor(arr.astype(np.float64)).dtype == torch.float32
    frozen = arr.copy()
    frozen.flags.writeable = False
    got = _to_tensor(frozen)
    assert not np.shares_memory(got.numpy(), frozen) and got.numpy().flags.writeable
    flipped = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)[..., ::-1]  # negative strides
    got = _to_tensor(flipped)
    assert not np.shares_memory(got.numpy(), flipped) and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), flipped)


def test_a_single_window_counted_twice_keeps_the_probabilities() -> None:
    """Every window counted twice (here the only one, along x): the weighted scores and the weight sum
    both double, so the probabilities are those of the whole volume (not of halved logits)."""
    image = np.random.default_rng(7).normal(size=(2, 1, 1, 8)).astype(np.float32)
    probs = sliding_window(pointwise, image, 0, (1, 1, 8), S(), output="probabilities")
    np.testing.assert_allclose(probs, whole_volume(image), rtol=1e-5, atol=1e-6)


def test_float16_accumulator_floors_the_weights() -> None:
    """A float16 accumulator floors the linear map at 1e-3 (its 1e-20 corner would vanish); the
    blend keeps the ramp of the map (a window-dependent network shows it)."""
    image = np.random.default_rng(8).normal(scale=3.0, size=(1, 8, 8, 12)).astype(np.float32)
    probs = sliding_window(
        _window_ramp, image, 0, (8, 8, 8), S(accum_dtype="float16"), output="probabilities"
    )
    w = np.maximum(patch_weight_map((8, 8, 8)), np.float32(1e-3)).astype(np.float64)
    acc, norm = np.zeros((2, 8, 8, 12)), np.zeros((8, 8, 12))
    for x0, n in ((0, 1), (4, 2)):
        acc[:, :, :, x0 : x0 + 8] += (
            n * w * _window_ramp(torch.from_numpy(image[None, ..., x0 : x0 + 8]), 0)[0].numpy()
        )
        norm[:, :, x0 : x0 + 8] += n * w
    expected = np.exp(acc / norm) / np.exp(acc / norm).sum(0, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=2e-2)


def test_volume_mode_round_scaling_probabilities() -> None:
    """``volume_scaling="round"``: no padding first, the probabilities come back at the whole input
    shape (every voxel, summing to 1; axes of decreasing length, so that no axis is cut to another's
    length) and agree with the label map."""
    image = np.ascontiguousarray(_cube_image().transpose(0, 3, 2, 1))  # (1, 14, 12, 10)
    settings = S(volume_scaling="round")
    label = infer_case(threshold, image, 0, (8, 6, 6), settings, model_patch=(16, 12, 12))
    probs = infer_case(
        threshold, image, 0, (8, 6, 6), settings, model_patch=(16, 12, 12), output="probabilities"
    )
    assert probs.shape == (2, 14, 12, 10) and label.shape == (14, 12, 10)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), label)
    np.testing.assert_array_equal(label, (image[0] > 0.5).astype(np.uint8))


def test_volume_mode_probabilities_come_back_trilinear() -> None:
    """unified_mode="volume", probabilities: those of the scaled case, resized back to the input
    shape trilinearly (half-voxel centres, ``align_corners=False``)."""
    image = np.random.default_rng(9).normal(size=(1, 10, 12, 14)).astype(np.float32)
    task_patch, model_patch = (6, 6, 8), (12, 12, 16)
    got = infer_case(threshold, image, 0, task_patch, S(), model_patch=model_patch, output="probabilities")
    scaled = resize_image(image, (20, 24, 28))
    small = sliding_window(threshold, scaled, 0, model_patch, S(), output="probabilities")
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(small)[None], size=(10, 12, 14), mode="trilinear", align_corners=False
    )[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def test_resizing_network_resizes_both_ways_trilinear() -> None:
    """The patch mode's wrapper: the batch resized trilinearly (``align_corners=False``) to the model
    patch, the logits (the first element of a tuple output) resized back the same way."""
    interpolate = torch.nn.functional.interpolate
    x = torch.from_numpy(np.random.default_rng(10).normal(size=(2, 1, 6, 6, 8)).astype(np.float32))

    def net(v: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([torch.zeros_like(v), v**2 + t], dim=1), torch.full_like(v, 7.0)

    got = ResizingNetwork(net, (6, 6, 8), (12, 12, 16))(x, 1)
    up = interpolate(x, size=(12, 12, 16), mode="trilinear", align_corners=False)
    expected = interpolate(net(up, 1)[0], size=(6, 6, 8), mode="trilinear", align_corners=False)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_trilinear_volume_resize_modality_by_modality() -> None:
    """``volume_resize="trilinear"`` resizes each modality of (M, z, y, x) like one trilinear
    interpolation of the whole (``align_corners=False``)."""
    from inference.sliding_window import _resize_image

    image = np.random.default_rng(11).normal(size=(2, 5, 6, 7)).astype(np.float32)
    got = _resize_image(image, (9, 4, 14), "trilinear")
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image)[None], size=(9, 4, 14), mode="trilinear", align_corners=False
    )[0]
    assert got.shape == (2, 9, 4, 14) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        _resize_image(image, (9, 4, 14), "cubic").numpy(), resize_image(image, (9, 4, 14))
    )


def test_progress_bar_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    """``progress=False`` (the default) writes nothing; ``progress=True`` shows a bar over the windows."""
    image = np.zeros((2, 8, 8, 12), dtype=np.float32)
    sliding_window(pointwise, image, 0, (8, 8, 8), S())
    assert capsys.readouterr().err == ""
    sliding_window(pointwise, image, 0, (8, 8, 8), S(progress=True))
    assert "sliding window" in capsys.readouterr().err


def test_inference_settings_defaults_and_checks() -> None:
    """The defaults are the paper preset (batch 2 as the original's ``config.batch_size``, no progress
    bar); the checks accept the edges of their ranges and refuse what lies past them; mirror axes
    become a tuple of ints; the accumulator dtype maps to torch's."""
    from dataclasses import asdict

    assert asdict(S()) == {
        "step_fraction": 0.5, "weight_mode": "linear", "window_count": "original", "pad_mode": "ceil_both",
        "blend": "logits", "mirror_tta": False, "mirror_axes": (0, 1, 2), "batch_size": 2, "device": "cpu",
        "amp": "off", "backend": "torch", "accum_dtype": "float64", "accum_device": "cpu", "unified_mode": "volume",
        "volume_scaling": "pad_floor", "volume_resize": "cubic", "postprocess": True, "closing_border": "erode",
        "weight_mask": "before", "progress": False,
    }  # fmt: skip
    assert S(step_fraction=1.0).step_fraction == 1.0 and S(batch_size=1).batch_size == 1
    for bad in ({"step_fraction": 0.0}, {"step_fraction": 1.5}, {"batch_size": 0}, {"mirror_axes": (3,)},
                {"weight_mode": "cosine"}, {"amp": "fp8"}):  # fmt: skip
        with pytest.raises(ValueError):
            S(**bad)  # type: ignore[arg-type]
    axes = S(mirror_axes=[2, np.int64(0)]).mirror_axes  # type: ignore[arg-type]
    assert axes == (2, 0) and isinstance(axes, tuple) and all(type(a) is int for a in axes)
    names = ("float64", "float32", "float16")
    dtypes = {name: S(accum_dtype=name).torch_accum_dtype for name in names}  # type: ignore[arg-type]
    assert dtypes == {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}
