"""Sliding-window inference over a preprocessed case.

A *network function* is any callable ``f(x, task_idx) -> logits`` with ``x`` of shape
(N, M, pz, py, px) and logits of shape (N, C, pz, py, px), e.g. a model from
``models.build_model`` (``model(x, task_idx)``); a tuple output counts by its first element (the
original's universal model returned ``(logits, share_map, para_map)``). It must already live on the
settings' device and be in eval mode; nothing here moves or changes it. All knobs come in one
:class:`inference.settings.InferenceSettings`.

What happens by default (the original's ``batch_segmentation``; ``docs/paper_preset.md``, "Inference
and evaluation"):

* a volume smaller than the patch along an axis is zero-padded by ceil(shortfall / 2) on both sides
  (``pad_mode="ceil_both"``; it may end one voxel larger than the patch) and cropped back at the end,
* window centres run from ``patch // 2`` every ``step`` voxels (``step_fraction * patch``, half a
  patch) while the window starts inside the volume, each clipped to ``size - patch // 2``
  (``window_count="original"``): the last window along an axis is visited twice, so the border
  windows count twice and the corner windows up to eight times; with an odd patch the last window
  reaches one voxel past the end (zeros). Each distinct window is run once and its weighted scores
  multiplied by its multiplicity (the same sum, without the repeated forward passes),
* each window's logits (``blend="logits"``, the original) or softmax probabilities are multiplied
  by a patch weight map (``"linear"``: 1 at voxel ``patch // 2``, falling linearly with the
  Euclidean distance to ~0 at the first corner; ``"linear_symmetric"``, ``"gaussian"``,
  ``"constant"``), and summed into an accumulator (float64 by default, as the original's) that
  lives on the CPU (or ``accum_device``), so a large CT never needs the whole class map on the GPU,
* the label map is the argmax of the sum (the per-voxel weight sum is common to all classes, so
  the label path never divides); probabilities are the softmax of sum / sum of weights (logits) or
  sum / sum of weights itself (probabilities),
* padding is cropped away again.

Shared/universal models use one model patch for every task. :func:`infer_case` bridges the task
patch and the model patch in one of two ways:

* ``unified_mode="volume"`` (the paper, default): the volume is padded to the task patch as above,
  scaled to ``int(size * model_patch / task_patch)`` per axis (``volume_scaling="pad_floor"``; cubic,
  the same resize as training's; ``volume_resize`` may choose trilinear), segmented with the model
  patch (a scaled axis shorter than the model patch is covered by windows reaching past it, zeros),
  the label map scaled back to the padded shape with nearest neighbour (probabilities: trilinear)
  and the padding cropped. ``volume_scaling="round"``: no padding first, ``round(...)``.
* ``unified_mode="patch"``: the sliding window runs with the task patch on the original volume and
  each patch batch is resized to the model patch before the network and its logits resized back
  (:class:`ResizingNetwork`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from inference.settings import InferenceSettings, PadMode, VolumeScaling, WeightMode, WindowCount
from models.runtime import amp_dtype, autocast
from utils.preprocessing import resize_image, resize_nearest

NetworkFn = Callable[[torch.Tensor, int], torch.Tensor]
Output = Literal["labels", "probabilities"]

__all__ = [
    "NetworkFn",
    "ResizingNetwork",
    "infer_case",
    "pad_to_patch",
    "patch_starts",
    "patch_weight_map",
    "scaled_shape",
    "sliding_window",
    "window_positions",
]

Window = tuple[slice, slice, slice]


# ----------------------------------------------------------------------------------------------
# weight maps and window positions
# ----------------------------------------------------------------------------------------------
def patch_weight_map(
    patch_size: Sequence[int],
    mode: WeightMode = "linear",
    *,
    eps: float = 1e-3,
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """Weight of each voxel of a patch when patches are blended.

    Args:
        patch_size: (pz, py, px).
        mode: with ``d`` the Euclidean distance (in voxels) of voxel index ``i`` to a centre ``c``:

            * ``"linear"`` (the original's ``calPatchWeights``): ``c = p / 2`` per axis (voxel
              ``p // 2`` for an even patch, between two voxels for an odd one),
              ``w = 1 - (d - d_min) / (d_max - d_min) + 1e-20`` in float64, then float32: 1 at the
              centre, falling linearly to 1e-20 at the voxel farthest from it (index 0 on every
              axis); the far corner keeps a small positive weight;
            * ``"linear_symmetric"``: ``c = (p - 1) / 2`` (symmetric), the same ramp, floored at
              ``eps`` (0 at all eight corners before the floor);
            * ``"gaussian"``: ``exp(-sum(((i - c) / (sigma_scale * p))**2) / 2)`` with
              ``c = (p - 1) / 2``, scaled to a maximum of 1 (nnU-Net style), floored at ``eps``;
            * ``"constant"``: all ones.
        eps: floor of ``"linear_symmetric"`` and ``"gaussian"``.
        sigma_scale: Gaussian sigma as a fraction of the patch size per axis.

    Returns:
        float32 array of shape ``patch_size``, values in (0, 1], maximum 1.
    """
    p = [int(s) for s in patch_size]
    if len(p) != 3 or min(p) < 1:
        raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
    if mode == "constant":
        return np.ones(p, dtype=np.float32)
    if mode == "linear":
        # the original's float64 operations in its order: (dz^2 + dy^2) + dx^2, sqrt, ramp, + 1e-20
        axes = [np.arange(n, dtype=np.float64) - n / 2 for n in p]
        d = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
        d_min, d_max = d.min(), d.max()
        if d_max == d_min:  # a single voxel: the original divides 0 by 0
            return np.ones(p, dtype=np.float32)
        return (1.0 - (d - d_min) / (d_max - d_min) + 1e-20).astype(np.float32)
    axes = [np.arange(n, dtype=np.float64) - (n - 1) / 2.0 for n in p]
    if mode == "linear_symmetric":
        sq = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
        d = np.sqrt(sq)
        d_min, d_max = d.min(), d.max()
        w = np.ones_like(d) if d_max == d_min else 1.0 - (d - d_min) / (d_max - d_min)
    elif mode == "gaussian":
        sig = [max(sigma_scale * n, 1e-6) for n in p]
        g = [np.exp(-0.5 * (a / s) ** 2) for a, s in zip(axes, sig, strict=True)]
        w = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
        w = w / w.max()
    else:
        raise ValueError(
            f"unknown weight mode {mode!r}; expected 'linear', 'linear_symmetric', 'gaussian' or 'constant'"
        )
    return np.maximum(w, eps).astype(np.float32)


def patch_starts(size: int, patch: int, step: int) -> list[int]:
    """Start indices of the windows along one axis (``size >= patch``) for ``window_count="once"``:
    every ``step`` voxels, the last window flush with the end, no duplicates."""
    if size < patch:
        raise ValueError(f"axis of {size} voxels is smaller than the patch ({patch}); pad first")
    if size == patch:
        return [0]
    starts = list(range(0, size - patch, max(1, step)))
    starts.append(size - patch)
    return starts


def window_positions(
    size: int, patch: int, step: int, count: WindowCount = "original"
) -> list[tuple[int, int]]:
    """Distinct window starts along one axis and how often each is counted.

    ``count="original"``: the original's loop, centres ``patch // 2, patch // 2 + step, ...`` while
    below ``size + patch // 2`` (i.e. while the window starts inside the volume), each clipped to
    ``size - patch // 2``; a window starts ``patch // 2`` before its centre. The clipped centres
    coincide, so the last window is counted more than once (twice with half-patch steps). A start
    may be negative (an axis shorter than the patch) and a window may end one voxel past the volume
    (odd patch): those voxels are zeros. ``count="once"``: :func:`patch_starts` (needs
    ``size >= patch``), each window once.

    Returns:
        ``[(start, multiplicity), ...]`` in increasing order of start.
    """
    step = max(1, int(step))
    if count == "once":
        return [(s, 1) for s in patch_starts(size, patch, step)]
    if count != "original":
        raise ValueError(f"unknown window count {count!r}; expected 'original' or 'once'")
    if size < 1 or patch < 1:
        raise ValueError(f"size and patch must be positive, got {size} and {patch}")
    last = size - 2 * (patch // 2)
    positions: dict[int, int] = {}
    for k in range(-(-size // step)):  # range(patch//2, size + patch//2, step), as starts
        start = min(k * step, last)
        positions[start] = positions.get(start, 0) + 1
    return sorted(positions.items())


def pad_to_patch(
    image: torch.Tensor, patch_size: Sequence[int], mode: PadMode = "ceil_both"
) -> tuple[torch.Tensor, Window]:
    """Zero-pad (M, z, y, x) to at least ``patch_size`` per axis.

    Args:
        mode: ``"ceil_both"`` (the original's ``pad2gePatch``): an axis short by ``k`` voxels gets
            ``ceil(k / 2)`` on both sides (``k + 1`` in all when ``k`` is odd); ``"exact"``:
            ``k // 2`` before and the rest after (exactly the patch).

    Returns:
        the padded tensor (the input itself when no padding is needed) and the slices of the
        original region inside it.
    """
    shape = image.shape[1:]
    short = [max(0, int(p) - int(s)) for p, s in zip(patch_size, shape, strict=True)]
    if mode == "ceil_both":
        before = [-(-k // 2) for k in short]
        after = before
    elif mode == "exact":
        before = [k // 2 for k in short]
        after = [k - b for k, b in zip(short, before, strict=True)]
    else:
        raise ValueError(f"unknown pad mode {mode!r}; expected 'ceil_both' or 'exact'")
    z, y, x = (slice(b, b + int(s)) for b, s in zip(before, shape, strict=True))
    region = (z, y, x)
    if not any(short):
        return image, region
    return _pad(image, before, after), region


def _pad(image: torch.Tensor, before: Sequence[int], after: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial axes of (M, z, y, x) by ``before``/``after`` voxels per axis."""
    flat: list[int] = []
    for b, a in zip(reversed(before), reversed(after), strict=True):  # F.pad takes the last axis first
        flat += [int(b), int(a)]
    return F.pad(image, flat, mode="constant", value=0.0)


def _windows(
    spatial: Sequence[int], patch: Sequence[int], settings: InferenceSettings
) -> tuple[list[Window], list[int], list[int], list[int]]:
    """The distinct windows over a volume of shape ``spatial`` and their multiplicities.

    Returns:
        (windows in the coordinates of the host grid, multiplicities, padding before, padding
        after): the host grid is the volume zero-padded so that every window lies inside it.
    """
    steps = [max(1, int(math.floor(p * settings.step_fraction))) for p in patch]
    per_axis = [
        window_positions(s, p, st, settings.window_count)
        for s, p, st in zip(spatial, patch, steps, strict=True)
    ]
    before = [max(0, -pos[0][0]) for pos in per_axis]
    after = [max(0, pos[-1][0] + p - s) for pos, p, s in zip(per_axis, patch, spatial, strict=True)]
    windows: list[Window] = []
    counts: list[int] = []
    for (z, cz), (y, cy), (x, cx) in itertools.product(*per_axis):
        z, y, x = z + before[0], y + before[1], x + before[2]
        windows.append((slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2])))
        counts.append(cz * cy * cx)
    return windows, counts, before, after


# ----------------------------------------------------------------------------------------------
# the core accumulation loop
# ----------------------------------------------------------------------------------------------
def _to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(M, z, y, x) float32 tensor without copying when possible (memmaps are copied); tensors keep
    their device (an image already on the GPU is cut into windows there)."""
    if isinstance(image, torch.Tensor):
        t = image.detach()
        return t if t.dtype == torch.float32 else t.float()
    arr = np.asarray(image)
    if arr.dtype != np.float32 or not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=np.float32, order="C")
    return torch.from_numpy(arr)


def _flip_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All subsets of the spatial axes to mirror (the empty set first)."""
    unique = sorted({int(a) for a in axes})
    return [c for r in range(len(unique) + 1) for c in itertools.combinations(unique, r)]


def _batched(items: Sequence[int], n: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _forward_scores(
    network: NetworkFn,
    x: torch.Tensor,
    task_idx: int,
    flips: Sequence[tuple[int, ...]],
    device: torch.device,
    dtype: torch.dtype | None,
    blend: str,
) -> torch.Tensor:
    """Class scores (N, C, pz, py, px) float32 on ``device`` — the logits (``blend="logits"``) or the
    softmax probabilities — averaged over mirrors."""
    probs: torch.Tensor | None = None
    for axes in flips:
        dims = [a + 2 for a in axes]
        xi = torch.flip(x, dims) if dims else x
        with autocast(device, dtype):
            out = network(xi, task_idx)
        if isinstance(out, (tuple, list)):
            out = out[0]
        p = out.float() if blend == "logits" else torch.softmax(out.float(), dim=1)
        if dims:
            p = torch.flip(p, dims)
        probs = p if probs is None else probs.add_(p)
    assert probs is not None
    if len(flips) > 1:
        probs.mul_(1.0 / len(flips))
    return probs


def _accumulate(
    network: NetworkFn,
    image: np.ndarray | torch.Tensor,
    task_idx: int,
    patch_size: Sequence[int],
    settings: InferenceSettings,
    num_classes: int | None,
    *,
    with_norm: bool,
    pad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, Window]:
    """Run the window loop. Returns the weighted score sum (C, Z, Y, X) on the settings'
    ``accum_device``, the weight sum (Z, Y, X) float32 (or None) and the region of the input volume
    inside the (padded) grid (Z, Y, X).

    ``pad``: pad an axis shorter than the patch first (``settings.pad_mode``); without it
    (the volume mode's scaled case, as the original) the windows reach past the volume (zeros).
    """
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3:
        raise ValueError(f"patch_size must be 3 ints (z, y, x), got {patch_size}")
    batch_size, accum_dtype = settings.batch_size, settings.torch_accum_dtype
    img = _to_tensor(image)
    if img.ndim != 4:
        raise ValueError(f"image must be (M, z, y, x), got shape {tuple(img.shape)}")
    shape = tuple(int(s) for s in img.shape[1:])
    region: Window = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    if pad or (settings.window_count == "once" and any(s < p for s, p in zip(shape, patch, strict=True))):
        img, region = pad_to_patch(img, patch, settings.pad_mode)
    windows, counts, before, after = _windows(tuple(img.shape[1:]), patch, settings)
    if any(before) or any(after):  # windows that reach past the volume see zeros there
        img = _pad(img, before, after)
        zs, ys, xs = (slice(r.start + b, r.stop + b) for r, b in zip(region, before, strict=True))
        region = (zs, ys, xs)
    spatial = tuple(img.shape[1:])
    dev = torch.device(settings.device)
    acc_dev = torch.device(settings.accum_device)
    dtype = amp_dtype(settings.amp, dev)
    # the scores travel to the accumulator in float32 (float16 for a float16 accumulator) and are
    # added there (a float64 accumulator promotes them, as the original added float32 into float64)
    move_dtype = torch.float16 if accum_dtype == torch.float16 else torch.float32

    w_np = patch_weight_map(patch, settings.weight_mode)
    if accum_dtype == torch.float16:
        # the linear map's ~1e-20 corner would vanish in float16 (a volume corner covered only by a
        # window corner would lose its scores): keep every weight representable
        w_np = np.maximum(w_np, np.float32(1e-3))
    w_dev = torch.from_numpy(w_np).to(dev)[None, None]  # (1, 1, pz, py, px)
    w_acc = torch.from_numpy(w_np).to(acc_dev)
    flips = _flip_sets(settings.mirror_axes) if settings.mirror_tta else [()]
    repeated = any(c != 1 for c in counts)
    counts_dev = torch.tensor(counts, dtype=torch.float32, device=dev) if repeated else None

    acc: torch.Tensor | None = None
    if num_classes is not None:
        acc = torch.zeros((num_classes, *spatial), dtype=accum_dtype, device=acc_dev)
    norm = torch.zeros(spatial, dtype=torch.float32, device=acc_dev) if with_norm else None

    def add(probs_acc: torch.Tensor, batch: Sequence[int]) -> None:
        assert acc is not None
        for i, k in enumerate(batch):
            w = windows[k]
            acc[(slice(None), *w)] += probs_acc[i]
            if norm is not None:
                norm[w] += w_acc if counts[k] == 1 else w_acc * counts[k]

    # GPU model, CPU accumulator: copy each batch's scores into one of two pinned buffers
    # asynchronously and add the *previous* batch on the CPU while the GPU computes this one.
    pipelined = dev.type == "cuda" and acc_dev.type == "cpu"
    pinned: list[torch.Tensor] = []
    pending: tuple[torch.Tensor, Sequence[int], torch.cuda.Event] | None = None

    pbar = (
        tqdm(total=len(windows), desc="sliding window", unit="patch", leave=False)
        if settings.progress
        else None
    )
    try:
        for j, batch in enumerate(_batched(range(len(windows)), batch_size)):
            x = torch.stack([img[(slice(None), *windows[k])] for k in batch])
            x = x.to(dev, non_blocking=True)
            probs = _forward_scores(network, x, task_idx, flips, dev, dtype, settings.blend)
            probs.mul_(w_dev)
            if counts_dev is not None:
                # a window visited m times adds m times its weighted scores (m a power of two with
                # half-patch steps: exact in float32)
                probs.mul_(counts_dev[batch[0] : batch[-1] + 1].view(-1, 1, 1, 1, 1))
            if acc is None:
                acc = torch.zeros((probs.shape[1], *spatial), dtype=accum_dtype, device=acc_dev)
            elif probs.shape[1] != acc.shape[0]:
                raise ValueError(f"the network returned {probs.shape[1]} classes, expected {acc.shape[0]}")
            if pipelined:
                if len(pinned) < 2:
                    pinned.append(
                        torch.empty((batch_size, *probs.shape[1:]), dtype=move_dtype, pin_memory=True)
                    )
                buf = pinned[j % 2][: len(batch)]
                buf.copy_(probs.to(move_dtype), non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(dev))
                if pending is not None:
                    pending[2].synchronize()
                    add(pending[0], pending[1])
                pending = (buf, batch, event)
            else:
                add(probs.to(device=acc_dev, dtype=move_dtype), batch)
            if pbar is not None:
                pbar.update(len(batch))
        if pending is not None:
            pending[2].synchronize()
            add(pending[0], pending[1])
    finally:
        if pbar is not None:
            pbar.close()
    assert acc is not None
    return acc, norm, region


def _argmax_chunked(acc: torch.Tensor, region: tuple[slice, slice, slice], chunk: int = 16) -> np.ndarray:
    """uint8 argmax over classes of acc (C, Z, Y, X) inside ``region``, a few slices at a time."""
    if acc.shape[0] > 256:
        raise ValueError(f"at most 256 classes fit a uint8 label map, got {acc.shape[0]}")
    zs, ys, xs = region
    out = np.empty((zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start), dtype=np.uint8)
    for z0 in range(zs.start, zs.stop, chunk):
        z1 = min(z0 + chunk, zs.stop)
        # running maximum over classes: elementwise ops, much faster than torch.argmax over a
        # short leading axis; strict '>' keeps the first maximum, as argmax does
        best = acc[0, z0:z1, ys, xs].clone()
        idx = torch.zeros(best.shape, dtype=torch.uint8, device=acc.device)
        for c in range(1, acc.shape[0]):
            a = acc[c, z0:z1, ys, xs]
            better = a > best
            idx.masked_fill_(better, c)
            torch.maximum(best, a, out=best)
        out[z0 - zs.start : z1 - zs.start] = idx.cpu().numpy()
    return out


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def sliding_window(
    network: NetworkFn,
    image: np.ndarray | torch.Tensor,
    task_idx: int,
    patch_size: Sequence[int],
    settings: InferenceSettings,
    *,
    num_classes: int | None = None,
    output: Output = "labels",
) -> np.ndarray:
    """Segment a whole case with windows of one size (the size ``network`` expects).

    Args:
        network: ``f(x (N, M, pz, py, px), task_idx) -> logits (N, C, pz, py, px)``, on the settings'
            device.
        image: preprocessed case (M, z, y, x), float: NumPy array, memmap or tensor (on the CPU, or
            already on the device, which saves the per-batch host-to-device copies).
        task_idx: task index passed to the network.
        patch_size: window (pz, py, px).
        settings: step, weights, window count, padding, TTA, batch, device, AMP, accumulator.
        num_classes: C, to allocate the accumulator up front (otherwise taken from the first output).
        output: ``"labels"``: uint8 (z, y, x) argmax of the blended scores (only the (C, Z, Y, X)
            accumulator is needed: no weight-sum volume, no division, argmax in slabs);
            ``"probabilities"``: float32 (C, z, y, x) that sum to 1 per voxel (the softmax of the
            blended logits, or the blended probabilities, per ``settings.blend``).

    Returns:
        the label map or probabilities at the input's spatial shape.
    """
    return _sliding_window(network, image, task_idx, patch_size, settings, num_classes, output, pad=True)


def _sliding_window(
    network: NetworkFn,
    image: np.ndarray | torch.Tensor,
    task_idx: int,
    patch_size: Sequence[int],
    settings: InferenceSettings,
    num_classes: int | None,
    output: Output,
    *,
    pad: bool,
) -> np.ndarray:
    want_probs = output == "probabilities"
    acc, norm, region = _accumulate(
        network, image, task_idx, patch_size, settings, num_classes, with_norm=want_probs, pad=pad
    )
    if not want_probs:
        return _argmax_chunked(acc, region)
    assert norm is not None
    out = acc[(slice(None), *region)].float()
    out.div_(norm[region])
    if settings.blend == "logits":
        out = torch.softmax(out, dim=0)
    return out.cpu().contiguous().numpy()


@torch.inference_mode()
def infer_case(
    network: NetworkFn,
    image: np.ndarray | torch.Tensor,
    task_idx: int,
    task_patch: Sequence[int],
    settings: InferenceSettings,
    *,
    model_patch: Sequence[int] | None = None,
    num_classes: int | None = None,
    output: Output = "labels",
) -> np.ndarray:
    """Segment a preprocessed case for any training mode (no post-processing).

    Args:
        image: (M, z, y, x) preprocessed case.
        task_patch: the task's patch (pz, py, px) from its plans.
        settings: see :class:`InferenceSettings`; ``unified_mode`` picks how a model patch that
            differs from the task patch is bridged, ``volume_scaling`` how the volume mode sizes the
            scaled case (module docstring).
        model_patch: the model's patch (shared/universal: 128³ in the paper preset); None or equal
            to ``task_patch`` for independent models.
        num_classes, output: as in :func:`sliding_window`.

    Returns:
        uint8 (z, y, x) labels or float32 (C, z, y, x) probabilities at the input's spatial shape.
    """
    if model_patch is None or _same(task_patch, model_patch):
        return sliding_window(
            network, image, task_idx, task_patch, settings, num_classes=num_classes, output=output
        )
    if settings.unified_mode == "patch":
        wrapped = ResizingNetwork(network, task_patch, model_patch)
        return sliding_window(
            wrapped, image, task_idx, task_patch, settings, num_classes=num_classes, output=output
        )
    shape = tuple(int(s) for s in image.shape[1:])
    if settings.volume_scaling == "pad_floor":
        # the original: pad to the task patch, scale by int(), segment the scaled case without
        # padding it again, labels back to the padded shape, crop
        padded, region = pad_to_patch(_to_tensor(image), task_patch, settings.pad_mode)
        grid = tuple(int(s) for s in padded.shape[1:])
        source: np.ndarray | torch.Tensor = padded
    else:
        region = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
        grid, source = shape, image
    scaled_to = scaled_shape(grid, task_patch, model_patch, settings.volume_scaling)
    scaled = _resize_image(source, scaled_to, settings.volume_resize)
    del source
    result = _sliding_window(
        network,
        scaled,
        task_idx,
        model_patch,
        settings,
        num_classes,
        output,
        pad=settings.volume_scaling == "round",
    )
    del scaled
    if output == "labels":
        labels = resize_nearest(result, grid)
        return labels if grid == shape else np.ascontiguousarray(labels[region])
    out = np.empty((result.shape[0], *shape), dtype=np.float32)
    for c in range(result.shape[0]):
        pc = torch.from_numpy(result[c])[None, None]
        up = F.interpolate(pc, size=grid, mode="trilinear", align_corners=False)[0, 0]
        out[c] = up[region].numpy()
    return out


def _same(a: Sequence[int], b: Sequence[int]) -> bool:
    return tuple(int(s) for s in a) == tuple(int(s) for s in b)


# ----------------------------------------------------------------------------------------------
# unified patch (shared / universal models)
# ----------------------------------------------------------------------------------------------
class ResizingNetwork:
    """Wraps a network trained on ``model_patch`` so that it takes ``task_patch`` windows:
    the input batch (N, M, *task_patch) is resized (trilinear) to model_patch, and the logits
    (N, C, *model_patch) resized (trilinear) back to task_patch. Used by ``unified_mode="patch"``."""

    def __init__(self, network: NetworkFn, task_patch: Sequence[int], model_patch: Sequence[int]) -> None:
        self.network = network
        self.task_patch = tuple(int(s) for s in task_patch)
        self.model_patch = tuple(int(s) for s in model_patch)

    def __call__(self, x: torch.Tensor, task_idx: int) -> torch.Tensor:
        """x (N, M, *task_patch) -> logits (N, C, *task_patch)."""
        if tuple(x.shape[2:]) != self.model_patch:
            x = F.interpolate(x, size=self.model_patch, mode="trilinear", align_corners=False)
        out = self.network(x, task_idx)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if tuple(out.shape[2:]) != self.task_patch:
            out = F.interpolate(out.float(), size=self.task_patch, mode="trilinear", align_corners=False)
        return out


def scaled_shape(
    shape: Sequence[int],
    task_patch: Sequence[int],
    model_patch: Sequence[int],
    rounding: VolumeScaling = "pad_floor",
) -> tuple[int, ...]:
    """Shape of a case of ``shape`` scaled by model_patch / task_patch per axis: ``"pad_floor"``
    (the original) ``int(s * (m / t))`` in exactly that float arithmetic (e.g. ``49 * (128 / 49)`` is
    127.99999999999999, so 127), ``"round"`` ``round(s * m / t)``; at least 1."""
    if rounding == "pad_floor":
        return tuple(
            max(1, int(int(s) * (int(m) / int(t))))
            for s, t, m in zip(shape, task_patch, model_patch, strict=True)
        )
    return tuple(
        max(1, int(round(s * m / t))) for s, t, m in zip(shape, task_patch, model_patch, strict=True)
    )


def _resize_image(image: np.ndarray | torch.Tensor, shape: Sequence[int], method: str) -> torch.Tensor:
    """Resize (M, z, y, x) to (M, *shape): ``"cubic"`` as in training (the original; on the CPU,
    :func:`utils.preprocessing.resize_image`) or ``"trilinear"`` (on the image's device), modality by
    modality (bounded memory)."""
    if method == "cubic":
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        resized = torch.from_numpy(resize_image(array, shape))
        return resized.to(image.device) if isinstance(image, torch.Tensor) else resized
    t = _to_tensor(image)
    out = torch.empty((t.shape[0], *[int(s) for s in shape]), dtype=torch.float32, device=t.device)
    for m in range(t.shape[0]):
        out[m] = F.interpolate(t[m][None, None], size=tuple(shape), mode="trilinear", align_corners=False)[
            0, 0
        ]
    return out
