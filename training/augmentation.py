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
centre crop of ``SpatialTransform`` then returns the task patch. Then :class:`MirrorAxesTransform`
mirrors the LAST axis. Then, for shared/universal training (``model_patch`` given), the
unified-patch resize to the model patch: batchgenerators ``ResizeTransform`` =
``skimage.transform.resize`` cubic (order 3, pixel-centre aligned, ``clip=True``, no anti-aliasing;
the original used the same function) for data and nearest (order 0) for seg.

Randomness: batchgenerators transforms draw from numpy's global RNG, so :class:`SeededCompose` runs
them with the global RNG temporarily seeded from a per-batch seed the sampler draws, then restores
the previous global state: augmentation is a function of the sampler's seed only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform
from batchgenerators.transforms.spatial_transforms import ResizeTransform, SpatialTransform

from utils.triples import int3

__all__ = [
    "AugmentParams",
    "MirrorAxesTransform",
    "SeededCompose",
    "UnifiedPatchResize",
    "extraction_size",
    "make_transforms",
    "safe_jitter",
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
    p_mirror: float = 0.3
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
    """Per sample, with probability ``p_per_sample``, flip data and seg along ALL of ``axes``.

    ``axes`` are spatial axes of ``(b, c, z, y, x)``: 0 = z, 1 = y, 2 = x. (batchgenerators'
    ``MirrorTransform`` flips each axis with an extra fixed probability 0.5, so its effective
    probability would be ``0.5 * p_per_sample``.) Uses numpy's global RNG like batchgenerators.
    """

    def __init__(
        self,
        axes: Sequence[int] = (2,),
        p_per_sample: float = 0.3,
        data_key: str = "data",
        label_key: str = "seg",
    ) -> None:
        self.axes = tuple(int(a) for a in axes)
        self.p_per_sample = p_per_sample
        self.data_key = data_key
        self.label_key = label_key

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data = data_dict[self.data_key]
        seg = data_dict.get(self.label_key)
        flip_axes = tuple(a + 1 for a in self.axes)  # axes of one sample (c, z, y, x)
        for b in range(len(data)):
            if np.random.uniform() < self.p_per_sample:
                data[b] = np.flip(data[b], axis=flip_axes)
                if seg is not None:
                    seg[b] = np.flip(seg[b], axis=flip_axes)
        return data_dict


class UnifiedPatchResize(ResizeTransform):
    """Resize the task patch to the model patch (shared/universal modes).

    data: ``(B, M, *task_patch)`` -> ``(B, M, *model_patch)`` with ``skimage.transform.resize`` order 3;
    seg: nearest (order 0), returned as float32 like the rest of the pipeline.
    """

    def __init__(self, model_patch: Sequence[int], order: int = 3, order_seg: int = 0) -> None:
        super().__init__([int(v) for v in model_patch], order=order, order_seg=order_seg)

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data_dict = super().__call__(**data_dict)
        data_dict[self.data_key] = data_dict[self.data_key].astype(np.float32, copy=False)
        if data_dict.get(self.label_key) is not None:
            data_dict[self.label_key] = data_dict[self.label_key].astype(np.float32, copy=False)
        return data_dict


class SeededCompose(AbstractTransform):
    """Compose that runs its transforms under numpy's global RNG seeded from ``data_dict[seed_key]``.

    The previous global RNG state is restored afterwards, so nothing outside is affected and the
    augmentation is determined by the loader's per-worker RandomState (which drew ``seed_key``). Without
    ``seed_key`` in the batch the transforms use the global RNG as is.
    """

    def __init__(self, transforms: Sequence[AbstractTransform], seed_key: str = "aug_seed") -> None:
        self.transforms = list(transforms)
        self.seed_key = seed_key

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        seed = data_dict.pop(self.seed_key, None)
        if seed is None:
            for t in self.transforms:
                data_dict = t(**data_dict)
            return data_dict
        saved = np.random.get_state()
        np.random.seed(int(seed))
        try:
            for t in self.transforms:
                data_dict = t(**data_dict)
        finally:
            np.random.set_state(saved)
        return data_dict

    def __repr__(self) -> str:
        return f"SeededCompose({self.transforms!r})"


def make_transforms(
    patch_size: Sequence[int],
    *,
    aug: AugmentParams | None = None,
    model_patch: Sequence[int] | None = None,
) -> SeededCompose:
    """Transform pipeline: [SpatialTransform, MirrorAxesTransform] (if ``aug``), UnifiedPatchResize (if
    ``model_patch`` differs from ``patch_size``)."""
    ts: list[AbstractTransform] = []
    patch = [int(v) for v in patch_size]
    if aug is not None:
        ts.append(
            SpatialTransform(
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
        )
        if aug.p_mirror > 0 and aug.mirror_axes:
            ts.append(MirrorAxesTransform(aug.mirror_axes, aug.p_mirror))
    if model_patch is not None and [int(v) for v in model_patch] != patch:
        ts.append(UnifiedPatchResize(model_patch))
    return SeededCompose(ts)
