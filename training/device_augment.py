"""The GPU augmentation path (``--augment_device cuda``): each sample's spatial transforms and the
resize to the model patch as ONE ``grid_sample`` on the device.

The loader processes do everything else (:meth:`training.composed_augment.ComposedAugmenter.plan`):
draw the transforms (the same random numbers as the CPU pipelines), compute the labels at the model
patch (nearest neighbour, on the CPU, so the sampler's "fore"/"small" acceptance test is unchanged
from the composed CPU pipeline) and cut the part of the extraction region the sample reads. Here,
in the training process, :func:`resample` builds the sampling grid of the model patch from the plan
(task-patch positions, elastic offsets upsampled trilinearly, rotation and scale) and resamples the
image in one ``torch.nn.functional.grid_sample``.

Its interpolation differs from the CPU pipelines', which both use cubic B-splines:

* **trilinear** (``grid_sample`` has no cubic mode for volumes): slightly smoother images (no spline
  sharpening, no overshoot), the difference largest where the image has fine texture; on smooth
  images the two agree closely (``tests/test_device_augment.py``);
* **border**: outside the region ``grid_sample`` reads zeros (``padding_mode="zeros"``) and blends
  toward them within one voxel, where the B-spline's constant-0 mode cuts off at the last voxel; the
  region holds the sample's whole neighbourhood, so this only matters where the volume itself ends;
* the two-step resize's border darkening and clip are reproduced as in the composed CPU pipeline.

Written with torch operations only, so it runs — and is tested — on CPU tensors too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from training.composed_augment import DevicePlan, border_factors

__all__ = ["resample", "resample_batch"]


@functools.lru_cache(maxsize=32)
def _border_cpu(patch: tuple[int, int, int], out: tuple[int, int, int]) -> torch.Tensor | None:
    factors = border_factors(patch, out)
    if factors is None:
        return None
    fz, fy, fx = (torch.from_numpy(f.astype(np.float32)) for f in factors)
    return fz[:, None, None] * fy[None, :, None] * fx[None, None, :]


_BORDER_ON_DEVICE: dict[
    tuple[tuple[int, int, int], tuple[int, int, int], torch.device], torch.Tensor | None
] = {}


def _border(
    patch: tuple[int, int, int], out: tuple[int, int, int], device: torch.device
) -> torch.Tensor | None:
    """The two-step resize's border darkening, ``(*out)``, kept on ``device`` (copied once)."""
    key = (patch, out, device)
    if key not in _BORDER_ON_DEVICE:
        cpu = _border_cpu(patch, out)
        _BORDER_ON_DEVICE[key] = None if cpu is None else cpu.to(device)
    return _BORDER_ON_DEVICE[key]


def _positions(plan: DevicePlan, device: torch.device) -> torch.Tensor:
    """``(*out, 3)`` positions (z, y, x voxels of ``plan["region"]``) of the model patch's voxels.

    Built on the device from Python numbers (no small host-to-device copies, which would wait for
    the GPU); the elastic offsets come with the plan (pinned by the loader, copied asynchronously).
    """
    patch, out = plan["patch"], plan["out"]
    axes = []
    for p, q in zip(patch, out, strict=True):
        o = torch.arange(int(q), device=device, dtype=torch.float32)
        # patch_positions(p, q) - (p - 1) / 2: (o + 0.5) * p / q - 0.5 - (p - 1) / 2, or o - (p - 1) / 2
        axes.append(o - (p - 1) / 2.0 if p == q else (o + 0.5) * (p / q) - 0.5 - (p - 1) / 2.0)
    u = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # zero-centred task-patch positions
    offsets = plan["offsets"]
    if offsets is not None:
        # align_corners=False: source position (o + 0.5) * P / Q - 0.5, clamped, as the CPU pipeline
        off = F.interpolate(
            offsets.to(device, non_blocking=True)[None],
            size=tuple(out),
            mode="trilinear",
            align_corners=False,
        )
        u = u + off[0].movedim(0, -1)
    m = plan["matrix"].tolist()  # a CPU tensor: no GPU wait
    shift = plan["shift"].tolist()
    return torch.stack(
        [u[..., 0] * m[0][i] + u[..., 1] * m[1][i] + u[..., 2] * m[2][i] + shift[i] for i in range(3)], dim=-1
    )


def resample(plan: DevicePlan, device: torch.device | str) -> torch.Tensor:
    """One sample's image at the model patch, ``(M, *out)`` float32 on ``device`` (module docstring)."""
    device = torch.device(device)
    region = plan["region"].to(device, non_blocking=True).float()
    pos = _positions(plan, device)
    # grid_sample: (x, y, z) order in [-1, 1] with the first and last voxel centres at -1 and 1
    scale = [2.0 / max(int(s) - 1, 1) for s in region.shape[1:]]
    grid = torch.stack([pos[..., i] * scale[i] - 1.0 for i in (2, 1, 0)], dim=-1)
    out = F.grid_sample(region[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[
        0
    ]
    if plan["clip"]:
        border = _border(tuple(plan["patch"]), tuple(plan["out"]), device) if plan["border"] else None
        flat = out.reshape(out.shape[0], -1)
        if plan["clip_range"] is not None:  # a plain crop: its own range, as skimage
            lo, hi = plan["clip_range"].to(device, non_blocking=True).unbind(1)
        else:  # the sample's range before the darkening
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        if border is not None:
            out = out * border
            flat = out.reshape(out.shape[0], -1)
        # skimage's clip: widened to 0 when 0 is outside [lo, hi] but inside the output's range
        widen = ((lo > 0) | (hi < 0)) & (flat.amin(dim=1) <= 0) & (flat.amax(dim=1) >= 0)
        lo = torch.where(widen, lo.clamp_max(0.0), lo)
        hi = torch.where(widen, hi.clamp_min(0.0), hi)
        out = torch.maximum(torch.minimum(out, hi.view(-1, 1, 1, 1)), lo.view(-1, 1, 1, 1))
    for axis in plan["flips"]:
        out = out.flip(int(axis) + 1)
    return out


def resample_batch(plans: Sequence[DevicePlan], device: torch.device | str) -> torch.Tensor:
    """A batch's images at the model patch, ``(B, M, *out)`` float32 on ``device``."""
    return torch.stack([resample(p, device) for p in plans])
