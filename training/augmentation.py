"""Per-sample augmentation of training patches (batchgenerators transforms), paper preset.

Per sample: ``SpatialTransform`` with elastic deformation (alpha (0, 750), sigma (10, 13), p 0.3),
rotation about the FIRST array axis (z of ``(z, y, x)``) by (0, 2π) with p 0.3, scaling
(0.75, 1.25) with p 0.5, ``random_crop=False`` (centre crop to the task patch), constant-0 borders,
cubic data / nearest seg. In batchgenerators' convention the spatial axes of ``(b, c, d0, d1, d2)``
are called x, y, z and ``angle_x`` builds the matrix that leaves coordinate 0 unchanged
(``create_matrix_rotation_x_3d``), i.e. rotates in the (d1, d2) = (y, x) plane about axis 0; so
``angle_x = (0, 2π)`` and ``angle_y = angle_z = (0, 0)``, as the original did.

When augmenting, the sampler cuts a larger region around the centre (:func:`extraction_size`: room
for the worst-case rotation and 1.25 up-scaling plus an elastic margin) so that rotated / scaled
patches show real image context, as in the original, which interpolated from the whole volume; the
centre crop of ``SpatialTransform`` then returns the task patch. Its sample grid lies on the plain
crop's voxels (``size - patch`` even, centre at ``(size - 1) / 2``): sample ``j`` of an axis is voxel
``centre - patch // 2 + j`` before the transform, the same voxel as in a plain crop. (The original's
``cc_augment`` centred its grid at ``centre + j - (patch - 1) / 2``: for an even patch axis half a voxel
off, the cubic image read at +0.5 and the nearest-neighbour label at +1; docs/paper_preset.md, defect
fixed; ``tests/test_golden_training.py``.) Then :class:`MirrorAxesTransform`
mirrors the LAST axis: a gate with p 0.3, then a flip with p 0.5 (effective 0.15, as the original).
:class:`SampleAugmenter` does these steps for one sample, so that the sampler
(:mod:`training.sampling`) can redraw them until a "fore"/"small" patch still holds its structure.
Then, for shared/universal training (``model_patch`` given), :class:`UnifiedPatchResize` resizes
the batch to the model patch: images cubic with :func:`utils.preprocessing.resize_image` (skimage's
resize, order 3, constant-0 border, no anti-aliasing, as the original; inference scales whole
volumes with the same function), labels nearest neighbour.

Randomness: batchgenerators transforms draw from numpy's global RNG, so the sampler runs them
under :func:`seeded_global_rng` with a per-batch seed it draws from its own RNG: augmentation is a
function of the sampler's seed only, and nobody else's random numbers change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform
from batchgenerators.transforms.spatial_transforms import SpatialTransform

from utils.preprocessing import resize_image, resize_nearest
from utils.triples import int3

__all__ = [
    "AugmentParams",
    "MirrorAxesTransform",
    "SampleAugmenter",
    "UnifiedPatchResize",
    "extraction_size",
    "safe_jitter",
    "seeded_global_rng",
]

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class AugmentParams:
    """Augmentation settings; the defaults are the paper preset."""

    p_elastic: float = 0.3
    alpha: tuple[float, float] = (0.0, 750.0)
    sigma: tuple[float, float] = (10.0, 13.0)
    p_rotation: float = 0.3
    angle: tuple[float, float] = (0.0, 2.0 * math.pi)  # about array axis 0 (z)
    p_scale: float = 0.5
    scale: tuple[float, float] = (0.75, 1.25)
    p_mirror: float = 0.3  # the gate; each axis then flips with p_mirror_flip (effective 0.15)
    p_mirror_flip: float = 0.5
    mirror_axes: tuple[int, ...] = (2,)  # spatial axes (0 = z, 1 = y, 2 = x): the last one
    elastic_margin: int = 4  # voxels allowed for the elastic displacement (extraction and jitter)
    order_data: int = 3
    order_seg: int = 0

    @property
    def rotates(self) -> bool:
        return self.p_rotation > 0 and self.angle[0] != self.angle[1]

    @property
    def scale_max(self) -> float:
        return max(1.0, self.scale[1]) if self.p_scale > 0 else 1.0

    @property
    def scale_min(self) -> float:
        return min(1.0, self.scale[0]) if self.p_scale > 0 else 1.0

    @property
    def margin(self) -> int:
        return self.elastic_margin if self.p_elastic > 0 else 0


def extraction_size(patch_size: Sequence[int], aug: AugmentParams | None) -> Shape3:
    """Size ``(z, y, x)`` of the region the loader cuts around a centre before augmentation.

    Without augmentation the task patch itself. With augmentation: room for the largest scale
    (coordinates are multiplied by up to ``scale_max``), for a rotation in the (y, x) plane (the patch's
    (y, x) diagonal) and for the elastic margin on both sides; ``size - patch`` is kept even so the
    centre crop of ``SpatialTransform`` is centred on the sampled centre.
    """
    p = [int(v) for v in patch_size]
    if aug is None:
        return (p[0], p[1], p[2])
    s = aug.scale_max
    m = 2 * aug.margin
    ez = math.ceil(p[0] * s) + m
    if aug.rotates:
        diag = math.hypot(p[1], p[2])
        ey, ex = math.ceil(diag * s) + m, math.ceil(diag * s) + m
    else:
        ey, ex = math.ceil(p[1] * s) + m, math.ceil(p[2] * s) + m
    out = [ez, ey, ex]
    out = [max(o, pp) for o, pp in zip(out, p, strict=True)]
    out = [o + ((o - pp) % 2) for o, pp in zip(out, p, strict=True)]
    return (out[0], out[1], out[2])


def safe_jitter(patch_size: Sequence[int], aug: AugmentParams | None) -> Shape3:
    """Largest centre offset (voxels per axis) from a picked structure voxel that keeps the voxel inside
    the final patch.

    Without augmentation ``patch // 2 - 1`` (as the original). With augmentation the voxel must survive
    down-scaling by ``scale_min`` (it is seen ``1/scale`` farther from the centre), a rotation in the
    (y, x) plane (an offset ``(dy, dx)`` may turn onto one axis: radius ``sqrt(2) * jitter``) and the
    elastic margin.
    """
    half = [max(int(v) / 2.0 - 1.0, 0.0) for v in patch_size]
    if aug is None:
        return int3(max(int(v) // 2 - 1, 0) for v in patch_size)
    s, m = aug.scale_min, aug.margin
    jz = math.floor(s * half[0] - m)
    if aug.rotates:
        r = min(half[1], half[2])
        jy = jx = math.floor((s * r - m) / math.sqrt(2.0))
    else:
        jy, jx = math.floor(s * half[1] - m), math.floor(s * half[2] - m)
    return (max(jz, 0), max(jy, 0), max(jx, 0))


class MirrorAxesTransform(AbstractTransform):
    """Mirroring as the original did it: per sample, a gate with probability ``p_per_sample``, then
    each of ``axes`` flips with probability ``p_flip`` (batchgenerators' mirror function flips an
    axis with 0.5): with one axis the effective probability is ``p_per_sample * p_flip`` (0.15 in the
    preset). ``p_flip=1`` flips whenever the gate fires.

    ``axes`` are spatial axes of ``(b, c, z, y, x)``: 0 = z, 1 = y, 2 = x. Uses numpy's global RNG like
    batchgenerators (one draw for the gate, one per axis when it fires).
    """

    def __init__(
        self,
        axes: Sequence[int] = (2,),
        p_per_sample: float = 0.3,
        p_flip: float = 0.5,
        data_key: str = "data",
        label_key: str = "seg",
    ) -> None:
        self.axes = tuple(int(a) for a in axes)
        self.p_per_sample = p_per_sample
        self.p_flip = p_flip
        self.data_key = data_key
        self.label_key = label_key

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data = data_dict[self.data_key]
        seg = data_dict.get(self.label_key)
        for b in range(len(data)):
            if np.random.uniform() >= self.p_per_sample:
                continue
            for axis in self.axes:
                if np.random.uniform() < self.p_flip:
                    data[b] = np.flip(data[b], axis=axis + 1)  # axes of one sample: (c, z, y, x)
                    if seg is not None:
                        seg[b] = np.flip(seg[b], axis=axis + 1)
        return data_dict


class UnifiedPatchResize(AbstractTransform):
    """Resize the task patch to the model patch (shared/universal modes), as the original: images
    cubic (:func:`utils.preprocessing.resize_image`, the same function inference uses for the whole
    volume), labels nearest neighbour.

    data: ``(B, M, *task_patch)`` -> ``(B, M, *model_patch)``; seg ``(B, 1, ...)`` likewise; float32.
    """

    def __init__(self, model_patch: Sequence[int], data_key: str = "data", label_key: str = "seg") -> None:
        self.model_patch = int3(model_patch)
        self.data_key = data_key
        self.label_key = label_key

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data = data_dict[self.data_key]
        data_dict[self.data_key] = np.stack([resize_image(sample, self.model_patch) for sample in data])
        seg = data_dict.get(self.label_key)
        if seg is not None:
            data_dict[self.label_key] = np.stack(
                [resize_nearest(sample[0], self.model_patch)[None] for sample in seg]
            ).astype(np.float32, copy=False)
        return data_dict


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run a block under numpy's global RNG seeded with ``seed`` and restore the previous state
    afterwards: batchgenerators transforms draw from the global RNG, and this makes them a function
    of the sampler's own seed without touching anyone else's random numbers."""
    saved = np.random.get_state()
    np.random.seed(int(seed))
    try:
        yield
    finally:
        np.random.set_state(saved)


class SampleAugmenter:
    """Augments one sample: elastic deformation, rotation, scaling (batchgenerators
    ``SpatialTransform``, centre crop of the extraction region to the task patch), then mirroring.

    ``augmenter(data (M, *extraction), seg (1, *extraction)) -> (data (M, *patch), seg (1, *patch))``,
    float32, drawing from numpy's global RNG (use :func:`seeded_global_rng`). Every call draws new
    augmentation parameters, so calling it again is a fresh draw.
    """

    def __init__(self, patch_size: Sequence[int], aug: AugmentParams) -> None:
        patch = list(int3(patch_size))
        self.patch_size = int3(patch)
        self.spatial = SpatialTransform(
            patch,
            patch_center_dist_from_border=[p // 2 for p in patch],  # unused with random_crop=False
            do_elastic_deform=aug.p_elastic > 0,
            alpha=aug.alpha,
            sigma=aug.sigma,
            do_rotation=aug.p_rotation > 0,
            angle_x=aug.angle,  # about array axis 0 (see module docstring)
            angle_y=(0.0, 0.0),
            angle_z=(0.0, 0.0),
            do_scale=aug.p_scale > 0,
            scale=aug.scale,
            border_mode_data="constant",
            border_cval_data=0,
            order_data=aug.order_data,
            border_mode_seg="constant",
            border_cval_seg=0,
            order_seg=aug.order_seg,
            random_crop=False,
            p_el_per_sample=aug.p_elastic,
            p_scale_per_sample=aug.p_scale,
            p_rot_per_sample=aug.p_rotation,
        )
        self.mirror = (
            MirrorAxesTransform(aug.mirror_axes, aug.p_mirror, aug.p_mirror_flip)
            if aug.p_mirror > 0 and aug.mirror_axes
            else None
        )

    def __call__(self, data: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = {
            "data": data[None].astype(np.float32, copy=False),
            "seg": seg[None].astype(np.float32, copy=False),
        }
        batch = self.spatial(**batch)
        if self.mirror is not None:
            batch = self.mirror(**batch)
        return (
            np.ascontiguousarray(batch["data"][0], dtype=np.float32),
            np.ascontiguousarray(batch["seg"][0], dtype=np.float32),
        )
