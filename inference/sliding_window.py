"""Sliding-window inference over a preprocessed case.

A *network function* is any callable ``f(x, task_idx) -> logits`` with ``x`` of shape
(N, M, pz, py, px) and logits of shape (N, C, pz, py, px), e.g. a model from
``models.build_model`` (``model(x, task_idx)``). It must already live on the settings' device and be
in eval mode; nothing here moves or changes it. All knobs come in one
:class:`inference.settings.InferenceSettings`.

What happens (``docs/paper_preset.md``, "Inference and evaluation"):

* the (M, z, y, x) volume is zero-padded (symmetrically) to at least the patch size,
* patches start every ``step_fraction * patch`` voxels per axis (half a patch by default), the
  last one flush with the end of the volume,
* each patch's logits (``blend="logits"``, the original) or softmax probabilities are multiplied
  by a patch weight map (``"linear"``: 1 at the centre, falling linearly with the Euclidean
  distance to ~0 at the corners; ``"gaussian"``; ``"constant"``), and summed into an accumulator
  that lives on the CPU (or ``accum_device``), so a large CT never needs the whole class map on
  the GPU,
* the label map is the argmax of the sum (the per-voxel weight sum is common to all classes, so
  the label path never divides); probabilities are the softmax of sum / sum of weights (logits) or
  sum / sum of weights itself (probabilities),
* padding is cropped away again.

Shared/universal models use one model patch for every task. :func:`infer_case` bridges the task
patch and the model patch in one of two ways:

* ``unified_mode="volume"`` (the paper, default): the whole volume is scaled by
  model_patch / task_patch per axis (cubic, the same resize as training's; ``volume_resize`` may
  choose trilinear), segmented with the model patch, and the label map scaled back to the original
  shape with nearest neighbour (probabilities: trilinear).
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

from inference.settings import InferenceSettings, WeightMode
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
    "sliding_window",
]


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
        mode: ``"linear"`` (docs/paper_preset.md; the original ``calPatchWeights``): with ``d`` the
            Euclidean distance (in voxels) of a voxel centre to the patch centre,
            ``w = 1 - (d - d_min) / (d_max - d_min)``, i.e. exactly 1 at the centre voxel(s) and 0
            at the corners; ``"gaussian"``: ``exp(-sum(((i - c) / (sigma_scale * p))**2) / 2)``
            scaled to a maximum of 1 (nnU-Net style); ``"constant"``: all ones.
        eps: floor so that every voxel keeps a strictly positive weight (the corners get ``eps``
            instead of 0; voxels covered only by a patch corner are still predicted).
        sigma_scale: Gaussian sigma as a fraction of the patch size per axis.

    Returns:
        float32 array of shape ``patch_size``, values in [eps, 1], maximum exactly 1.
    """
    p = [int(s) for s in patch_size]
    if len(p) != 3 or min(p) < 1:
        raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
    if mode == "constant":
        return np.ones(p, dtype=np.float32)
    axes = [np.arange(n, dtype=np.float64) - (n - 1) / 2.0 for n in p]
    if mode == "linear":
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
        raise ValueError(f"unknown weight mode {mode!r}; expected 'linear', 'gaussian' or 'constant'")
    return np.maximum(w, eps).astype(np.float32)


def patch_starts(size: int, patch: int, step: int) -> list[int]:
    """Start indices of the windows along one axis (``size >= patch``): every ``step`` voxels,
    the last window flush with the end, no duplicates."""
    if size < patch:
        raise ValueError(f"axis of {size} voxels is smaller than the patch ({patch}); pad first")
    if size == patch:
        return [0]
    starts = list(range(0, size - patch, max(1, step)))
    starts.append(size - patch)
    return starts


def pad_to_patch(
    image: torch.Tensor, patch_size: Sequence[int]
) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """Zero-pad (M, z, y, x) symmetrically to at least ``patch_size`` per axis.

    Returns:
        the padded tensor (the input itself when no padding is needed) and the slices of the
        original region inside it.
    """
    shape = image.shape[1:]
    pads = [max(0, int(p) - int(s)) for p, s in zip(patch_size, shape, strict=True)]
    before = [p // 2 for p in pads]
    z, y, x = (slice(b, b + int(s)) for b, s in zip(before, shape, strict=True))
    region = (z, y, x)
    if not any(pads):
        return image, region
    # F.pad takes the last axis first
    flat: list[int] = []
    for b, p in zip(reversed(before), reversed(pads), strict=True):
        flat += [b, p - b]
    return F.pad(image, flat, mode="constant", value=0.0), region


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


def _batched(
    items: Sequence[tuple[slice, slice, slice]], n: int
) -> Iterator[Sequence[tuple[slice, slice, slice]]]:
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
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[slice, slice, slice]]:
    """Run the window loop. Returns the weighted probability sum (C, Z, Y, X) on the settings'
    ``accum_device``, the weight sum (Z, Y, X) float32 (or None) and the region of the unpadded
    volume inside the padded grid (Z, Y, X)."""
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3:
        raise ValueError(f"patch_size must be 3 ints (z, y, x), got {patch_size}")
    batch_size, accum_dtype = settings.batch_size, settings.torch_accum_dtype
    img = _to_tensor(image)
    if img.ndim != 4:
        raise ValueError(f"image must be (M, z, y, x), got shape {tuple(img.shape)}")
    img, region = pad_to_patch(img, patch)
    spatial = tuple(img.shape[1:])
    dev = torch.device(settings.device)
    acc_dev = torch.device(settings.accum_device)
    dtype = amp_dtype(settings.amp, dev)

    steps = [max(1, int(math.floor(p * settings.step_fraction))) for p in patch]
    starts = [patch_starts(s, p, st) for s, p, st in zip(spatial, patch, steps, strict=True)]
    windows = [
        (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
        for z, y, x in itertools.product(*starts)
    ]
    w_np = patch_weight_map(patch, settings.weight_mode)
    w_dev = torch.from_numpy(w_np).to(dev)[None, None]  # (1, 1, pz, py, px)
    w_acc = torch.from_numpy(w_np).to(acc_dev)
    flips = _flip_sets(settings.mirror_axes) if settings.mirror_tta else [()]

    acc: torch.Tensor | None = None
    if num_classes is not None:
        acc = torch.zeros((num_classes, *spatial), dtype=accum_dtype, device=acc_dev)
    norm = torch.zeros(spatial, dtype=torch.float32, device=acc_dev) if with_norm else None

    def add(probs_acc: torch.Tensor, batch: Sequence[tuple[slice, slice, slice]]) -> None:
        assert acc is not None
        for i, w in enumerate(batch):
            acc[(slice(None), *w)] += probs_acc[i]
            if norm is not None:
                norm[w] += w_acc

    # GPU model, CPU accumulator: copy each batch's probabilities into one of two pinned buffers
    # asynchronously and add the *previous* batch on the CPU while the GPU computes this one.
    pipelined = dev.type == "cuda" and acc_dev.type == "cpu"
    pinned: list[torch.Tensor] = []
    pending: tuple[torch.Tensor, Sequence[tuple[slice, slice, slice]], torch.cuda.Event] | None = None

    pbar = (
        tqdm(total=len(windows), desc="sliding window", unit="patch", leave=False)
        if settings.progress
        else None
    )
    try:
        for k, batch in enumerate(_batched(windows, batch_size)):
            x = torch.stack([img[(slice(None), *w)] for w in batch])
            x = x.to(dev, non_blocking=True)
            probs = _forward_scores(network, x, task_idx, flips, dev, dtype, settings.blend)
            probs.mul_(w_dev)
            if acc is None:
                acc = torch.zeros((probs.shape[1], *spatial), dtype=accum_dtype, device=acc_dev)
            elif probs.shape[1] != acc.shape[0]:
                raise ValueError(f"the network returned {probs.shape[1]} classes, expected {acc.shape[0]}")
            if pipelined:
                if len(pinned) < 2:
                    pinned.append(
                        torch.empty((batch_size, *probs.shape[1:]), dtype=accum_dtype, pin_memory=True)
                    )
                buf = pinned[k % 2][: len(batch)]
                buf.copy_(probs.to(accum_dtype), non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(dev))
                if pending is not None:
                    pending[2].synchronize()
                    add(pending[0], pending[1])
                pending = (buf, batch, event)
            else:
                add(probs.to(device=acc_dev, dtype=accum_dtype), batch)
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
        settings: step, weights, TTA, batch, device, AMP, accumulator.
        num_classes: C, to allocate the accumulator up front (otherwise taken from the first output).
        output: ``"labels"``: uint8 (z, y, x) argmax of the blended scores (only the (C, Z, Y, X)
            accumulator is needed: no weight-sum volume, no division, argmax in slabs);
            ``"probabilities"``: float32 (C, z, y, x) that sum to 1 per voxel (the softmax of the
            blended logits, or the blended probabilities, per ``settings.blend``).

    Returns:
        the label map or probabilities at the input's spatial shape.
    """
    want_probs = output == "probabilities"
    acc, norm, region = _accumulate(
        network, image, task_idx, patch_size, settings, num_classes, with_norm=want_probs
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
            differs from the task patch is bridged (module docstring).
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
    scaled = _resize_image(image, _scaled_shape(shape, task_patch, model_patch), settings.volume_resize)
    result = sliding_window(
        network, scaled, task_idx, model_patch, settings, num_classes=num_classes, output=output
    )
    del scaled
    if output == "labels":
        return resize_nearest(result, shape)
    out = np.empty((result.shape[0], *shape), dtype=np.float32)
    for c in range(result.shape[0]):
        pc = torch.from_numpy(result[c])[None, None]
        out[c] = F.interpolate(pc, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
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


def _scaled_shape(
    shape: Sequence[int], task_patch: Sequence[int], model_patch: Sequence[int]
) -> tuple[int, ...]:
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
