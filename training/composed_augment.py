"""The augmentation and the unified-patch resize as ONE coordinate map: one interpolation per sample.

The preset (``--augment_pipeline two_step``, :class:`training.augmentation.SampleAugmenter` then
:class:`training.augmentation.UnifiedPatchResize`) interpolates each augmented sample twice: the
batchgenerators ``SpatialTransform`` samples the extraction region at the task patch's voxels (cubic
B-spline), then the resize samples that result at the model patch's voxels (cubic B-spline again,
skimage's ``resize``). Both are coordinate maps, so they compose: :class:`ComposedAugmenter` (``--augment_pipeline
composed``) computes, for every voxel ``o`` of the model patch, its position in the task patch
(``t = (o + 0.5) * P / Q - 0.5``, skimage's voxel-centre alignment), pushes it through the drawn
elastic field (linearly interpolated between the task patch's voxels, where batchgenerators drew it),
rotation and scaling, and samples the extraction region there ONCE (``scipy.ndimage.map_coordinates``,
cubic B-spline, constant-0 border, as batchgenerators; ``AugmentParams.order_data`` = 1, ``--augment_interp
linear``: linear, without the spline's prefilter, cheaper: ``benchmarks/bench_loader.py``).

Faithful in distribution:

* the same random numbers: :func:`draw_transform` consumes numpy's global RNG exactly as
  ``SpatialTransform`` and :class:`training.augmentation.MirrorAxesTransform` do (same calls, same
  order, batchgenerators' own elastic-field function), so under one seed both pipelines draw the same
  elastic field, angles, scale and mirroring;
* a sample with no spatial transform drawn (about 25 % in the preset) is the centre crop resized by
  :func:`utils.preprocessing.resize_image`, exactly as in the two-step pipeline;
* where the two-step resize darkens the model patch's border voxels (skimage pads the task patch with
  zeros, so voxels whose position ``t`` lies within two voxels of the task patch's edge blend toward
  0), the composed sample is multiplied by the same per-axis factors (the row sums of
  :func:`utils.preprocessing.resize_matrix`): exact for a locally constant image, close for smooth ones;
* values are clipped like skimage's resize clips them to the range of the augmented task patch: here
  to the range of the composed sample before the border darkening (the same values, sampled more
  or less densely);
* labels are nearest-neighbour at the composed positions (the two-step pipeline rounds twice, so
  label borders may move by up to one model-patch voxel).

Two further differences of detail: the cubic spline is prefiltered on the part of the extraction
region the sample reads plus a 12-voxel margin (the spline prefilter is global, but its influence
decays by 0.268 per voxel: ~1e-7 after 12), and the sampler's "fore"/"small" acceptance test
(:meth:`training.sampling.PatchSampler._holds`) sees the model-patch sample instead of the task-patch one
(the same structure up to the resampling: a structure thinner than one model-patch voxel may be seen
in one and not the other). ``tests/test_composed_augment.py`` checks all of this against the
two-step result.

:meth:`ComposedAugmenter.plan` does everything but the image interpolation, for the GPU path
(``--augment_device cuda``, :mod:`training.device_augment`): labels and the structure test stay in the
loader processes, the image is resampled on the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from batchgenerators.augmentations.utils import (
    create_matrix_rotation_x_3d,
    create_matrix_rotation_y_3d,
    create_matrix_rotation_z_3d,
    elastic_deform_coordinates,
)
from scipy.ndimage import map_coordinates

from training.augmentation import AugmentParams
from utils.preprocessing import resize_image, resize_matrix, resize_nearest
from utils.triples import int3

__all__ = [
    "ComposedAugmenter",
    "DevicePlan",
    "SampleTransform",
    "border_factors",
    "draw_transform",
    "linear_matrix",
    "patch_positions",
]

Shape3 = tuple[int, int, int]
#: voxels of extra context around what a sample reads, for the cubic spline prefilter
PREFILTER_MARGIN = 12


@dataclass(frozen=True)
class SampleTransform:
    """The random transform of one sample, as batchgenerators draws it.

    Attributes:
        offsets: elastic displacement ``(3, *patch)`` (float64) at the task patch's voxels, or None.
        matrix: ``(3, 3)``: a zero-centred position (row vector) ``u`` maps to ``u @ matrix`` (rotation
            times scale, as ``rotate_coords_3d`` then ``scale_coords``).
        spatial: any spatial transform was drawn (else batchgenerators centre-crops).
        flips: spatial axes (0 = z, 1 = y, 2 = x) mirrored.
    """

    offsets: np.ndarray | None
    matrix: np.ndarray
    spatial: bool
    flips: tuple[int, ...]


def draw_transform(patch_size: Sequence[int], aug: AugmentParams) -> SampleTransform:
    """Draw one sample's transform from numpy's global RNG exactly as :class:`SampleAugmenter`'s
    ``SpatialTransform`` (batchgenerators 0.25 ``augment_spatial``, ``p_rot_per_axis=1``, one scale
    for all axes) and mirroring do: same calls in the same order."""
    patch = int3(patch_size)
    offsets = None
    matrix = np.identity(3)
    spatial = False
    if aug.p_elastic > 0 and np.random.uniform() < aug.p_elastic:
        a = np.random.uniform(aug.alpha[0], aug.alpha[1])
        s = np.random.uniform(aug.sigma[0], aug.sigma[1])
        offsets = elastic_deform_coordinates(np.zeros((3, *patch)), a, s)
        spatial = True
    if aug.p_rotation > 0 and np.random.uniform() < aug.p_rotation:
        a_x = np.random.uniform(aug.angle[0], aug.angle[1]) if np.random.uniform() <= 1 else 0.0
        a_y = np.random.uniform(0.0, 0.0) if np.random.uniform() <= 1 else 0.0
        a_z = np.random.uniform(0.0, 0.0) if np.random.uniform() <= 1 else 0.0
        rot = create_matrix_rotation_x_3d(a_x, np.identity(3))
        rot = create_matrix_rotation_y_3d(a_y, rot)
        matrix = create_matrix_rotation_z_3d(a_z, rot)
        spatial = True
    if aug.p_scale > 0 and np.random.uniform() < aug.p_scale:
        lo, hi = aug.scale
        if np.random.random() < 0.5 and lo < 1:
            sc = np.random.uniform(lo, 1)
        else:
            sc = np.random.uniform(max(lo, 1), hi)
        matrix = matrix * sc
        spatial = True
    flips: list[int] = []
    if aug.p_mirror > 0 and aug.mirror_axes and np.random.uniform() < aug.p_mirror:
        for axis in aug.mirror_axes:
            if np.random.uniform() < aug.p_mirror_flip:
                flips.append(int(axis))
    return SampleTransform(offsets, matrix, spatial, tuple(flips))


def patch_positions(patch: int, out: int) -> np.ndarray:
    """Position in the task patch (voxel units) of each model-patch voxel along one axis:
    ``(o + 0.5) * patch / out - 0.5`` (skimage's resize), exactly ``o`` when the sizes agree."""
    if patch == out:
        return np.arange(out, dtype=np.float64)
    return (np.arange(out, dtype=np.float64) + 0.5) * (patch / out) - 0.5


def linear_matrix(patch: int, out: int) -> np.ndarray:
    """``(out, patch)`` linear interpolation at :func:`patch_positions`, clamped at the ends (what
    ``F.interpolate(mode="trilinear", align_corners=False)`` does along one axis)."""
    pos = np.clip(patch_positions(patch, out), 0.0, patch - 1.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), patch - 1)
    i1 = np.minimum(i0 + 1, patch - 1)
    w = pos - i0
    m = np.zeros((out, patch))
    rows = np.arange(out)
    np.add.at(m, (rows, i0), 1.0 - w)
    np.add.at(m, (rows, i1), w)
    return m


def border_factors(patch: Sequence[int], out: Sequence[int]) -> list[np.ndarray] | None:
    """Per-axis factors by which the two-step resize (zero padding around the task patch) darkens
    the model patch's border voxels: the row sums of :func:`utils.preprocessing.resize_matrix`
    (1 inside). None when no axis is resized."""
    if tuple(patch) == tuple(out):
        return None
    return [
        resize_matrix(int(p), int(q)).sum(axis=1) if p != q else np.ones(int(q))
        for p, q in zip(patch, out, strict=True)
    ]


def _upsample_offsets(offsets: np.ndarray, out: Shape3) -> np.ndarray:
    """Elastic offsets ``(3, *patch)`` at the model patch's positions, ``(3, *out)`` (separable linear)."""
    patch = offsets.shape[1:]
    res = offsets
    for axis in range(3):
        if patch[axis] != out[axis]:
            res = np.moveaxis(
                np.tensordot(linear_matrix(patch[axis], out[axis]), res, axes=([1], [axis + 1])), 0, axis + 1
            )
    return res


def _clip_range(lo: float, hi: float, out: np.ndarray) -> tuple[float, float]:
    """skimage's clip range (with the constant-0 border): the source range ``[lo, hi]``, widened to 0
    when 0 lies outside it but inside the output's range."""
    if not lo <= 0.0 <= hi and float(out.min()) <= 0.0 <= float(out.max()):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return lo, hi


class DevicePlan(dict[str, Any]):
    """What the GPU path needs to resample one sample's image (:func:`training.device_augment.resample`):
    ``region`` (M, *S) float32 tensor (the part of the extraction region the sample reads), ``matrix``
    (3, 3) and ``shift`` (3,) (a zero-centred task-patch position ``u`` maps to ``u @ matrix + shift``
    in ``region``'s voxels), ``offsets`` (3, *patch) float32 tensor or None, ``patch`` and ``out``
    sizes, ``clip`` (clip as the two-step resize does; ``clip_range`` (M, 2) or None: the resampled
    sample's range before the darkening), ``border`` (darken the border as its zero padding
    does: for regions with context), ``flips``, ``nonzero``. A dict (so the data loader moves its
    tensors through shared memory and pins them); :meth:`any` answers the sampler's "holds some
    image" test."""

    def any(self) -> bool:
        return bool(self["nonzero"])


class ComposedAugmenter:
    """Augmentation + resize to the model patch in one interpolation (module docstring).

    ``augmenter(data (M, *extraction), seg (1, *extraction)) -> (data (M, *out), seg (1, *out))``,
    float32, drawing from numpy's global RNG like :class:`training.augmentation.SampleAugmenter`;
    :meth:`resize` is the same for a plain crop of the task patch (no augmentation).

    Args:
        patch_size: task patch ``P``.
        out_size: model patch ``Q`` (``P`` when there is no resize).
        aug: augmentation parameters (the preset's by default).
    """

    def __init__(self, patch_size: Sequence[int], out_size: Sequence[int], aug: AugmentParams) -> None:
        self.patch_size = int3(patch_size)
        self.out_size = int3(out_size)
        self.aug = aug
        # voxels read beyond the sampled positions: the cubic spline's prefilter needs context, a linear
        # (or nearest) interpolation only the neighbours
        self.read_margin = PREFILTER_MARGIN if aug.order_data > 1 else 1
        self.resized = self.patch_size != self.out_size
        self._u = [
            patch_positions(p, q) - (p - 1) / 2.0 for p, q in zip(self.patch_size, self.out_size, strict=True)
        ]
        factors = border_factors(self.patch_size, self.out_size)
        self._border = (
            None
            if factors is None
            else (factors[0][:, None, None] * factors[1][None, :, None] * factors[2][None, None, :]).astype(
                np.float32
            )
        )

    # -- the composed map -----------------------------------------------------------------------------
    def _positions(self, tf: SampleTransform, extraction: Sequence[int]) -> np.ndarray:
        """Position ``(3, *out)`` (float64, voxels of the extraction region) of every model-patch voxel."""
        centre = [e / 2.0 - 0.5 for e in extraction]  # batchgenerators' centre crop (random_crop=False)
        u = self._u
        shape = self.out_size
        pos = np.empty((3, *shape))
        for i in range(3):
            # the affine part is a sum of three 1-D terms (broadcast), the elastic part a full field
            pos[i] = (
                centre[i]
                + tf.matrix[0, i] * u[0][:, None, None]
                + tf.matrix[1, i] * u[1][None, :, None]
                + tf.matrix[2, i] * u[2][None, None, :]
            )
        if tf.offsets is not None:
            off = _upsample_offsets(tf.offsets, shape)
            pos += np.einsum("j...,ji->i...", off, tf.matrix)
        return pos

    def _read_box(self, pos: np.ndarray, extraction: Sequence[int]) -> tuple[list[slice], np.ndarray]:
        """The part of the extraction region the positions read, plus ``read_margin`` voxels."""
        size = [int(e) for e in extraction]
        margin = self.read_margin
        # at least 2 voxels per axis (the GPU path normalises by size - 1), always inside the region
        lo = [min(max(int(math.floor(pos[i].min())) - margin, 0), max(size[i] - 2, 0)) for i in range(3)]
        hi = [min(max(int(math.ceil(pos[i].max())) + margin + 1, lo[i] + 2), size[i]) for i in range(3)]
        return [slice(a, b) for a, b in zip(lo, hi, strict=True)], np.asarray(lo, dtype=np.float64)

    def _draw(self) -> SampleTransform:
        return draw_transform(self.patch_size, self.aug)

    def _centre_crop(self, array: np.ndarray) -> np.ndarray:
        start = [(e - p) // 2 for e, p in zip(array.shape[1:], self.patch_size, strict=True)]
        return array[
            :,
            start[0] : start[0] + self.patch_size[0],
            start[1] : start[1] + self.patch_size[1],
            start[2] : start[2] + self.patch_size[2],
        ]

    def _labels(self, seg: np.ndarray, box: list[slice], pos: np.ndarray) -> np.ndarray:
        return map_coordinates(
            np.ascontiguousarray(seg[0][tuple(box)], dtype=np.float32),
            pos,
            order=0,
            mode="constant",
            cval=0.0,
            output=np.float32,
        )[None]

    def _border_and_clip(self, out: np.ndarray) -> None:
        """In place, one modality: the two-step resize's border darkening, then its clip to the range
        of the sample before the resize (here: the composed sample before the darkening)."""
        if not self.resized:
            return
        lo, hi = float(out.min()), float(out.max())
        if self._border is not None:
            out *= self._border
        np.clip(out, *_clip_range(lo, hi, out), out=out)

    @staticmethod
    def _mirror(array: np.ndarray, flips: tuple[int, ...]) -> np.ndarray:
        for axis in flips:
            array = np.flip(array, axis=axis + 1)
        return np.ascontiguousarray(array, dtype=np.float32)

    def resize(self, data: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A plain task-patch crop to the model patch, as the two-step pipeline resizes it."""
        if not self.resized:
            return data.astype(np.float32, copy=False), seg.astype(np.float32, copy=False)
        return resize_image(data, self.out_size), self._resized_labels(seg)

    def _resized_labels(self, seg: np.ndarray) -> np.ndarray:
        """A plain crop's labels ``(1, *patch)`` at the model patch, as the two-step pipeline: nearest."""
        if not self.resized:
            return seg.astype(np.float32, copy=False)
        return resize_nearest(seg[0], self.out_size)[None].astype(np.float32, copy=False)

    def __call__(self, data: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tf = self._draw()
        if not tf.spatial:
            out, lab = self.resize(self._centre_crop(data), self._centre_crop(seg))
            return self._mirror(out, tf.flips), self._mirror(lab, tf.flips)
        pos = self._positions(tf, data.shape[1:])
        box, lo = self._read_box(pos, data.shape[1:])
        pos -= lo[:, None, None, None]
        source = data[(slice(None), *box)]
        out = np.empty((data.shape[0], *self.out_size), dtype=np.float32)
        for m in range(data.shape[0]):
            map_coordinates(
                np.ascontiguousarray(source[m], dtype=np.float32),
                pos,
                order=self.aug.order_data,
                mode="constant",
                cval=0.0,
                output=out[m],
            )
        for m in range(out.shape[0]):
            self._border_and_clip(out[m])
        return self._mirror(out, tf.flips), self._mirror(self._labels(seg, box, pos), tf.flips)

    # -- the GPU path --------------------------------------------------------------------------------
    def plan(self, data: np.ndarray, seg: np.ndarray) -> tuple[DevicePlan, np.ndarray]:
        """Everything of :meth:`__call__` but the image interpolation: the labels (model patch, CPU)
        and the :class:`DevicePlan` of the image."""
        tf = self._draw()
        if not tf.spatial and not self.resized:
            return self.plan_resize(self._centre_crop(data), self._centre_crop(seg), tf.flips)
        # (a sample without a spatial transform is the identity map here: read with its context, its
        # border darkened like the spatial ones', labels as the two-step resize makes them)
        pos = self._positions(tf, data.shape[1:])
        box, lo = self._read_box(pos, data.shape[1:])
        pos -= lo[:, None, None, None]
        source = np.ascontiguousarray(data[(slice(None), *box)], dtype=np.float32)
        centre = np.array([e / 2.0 - 0.5 for e in data.shape[1:]])
        plan = self._device_plan(source, tf.matrix, centre - lo, tf.offsets, tf.flips, border=True)
        if not tf.spatial:
            labels = self._resized_labels(self._centre_crop(seg))
        else:
            labels = self._labels(seg, box, pos)
        return plan, self._mirror(labels, tf.flips)

    def plan_resize(
        self, data: np.ndarray, seg: np.ndarray, flips: tuple[int, ...] = ()
    ) -> tuple[DevicePlan, np.ndarray]:
        """:meth:`plan` of a plain task-patch crop (resized on the device)."""
        source = np.ascontiguousarray(data, dtype=np.float32)
        shift = np.array([(p - 1) / 2.0 for p in self.patch_size])  # u + shift = the task-patch position
        lab = self._resized_labels(seg)
        # the crop has no context: the resampling's own zero padding darkens the border as the resize's does
        plan = self._device_plan(source, np.identity(3), shift, None, flips, border=False)
        return plan, self._mirror(lab, flips)

    def _device_plan(
        self,
        source: np.ndarray,
        matrix: np.ndarray,
        shift: np.ndarray,
        offsets: np.ndarray | None,
        flips: tuple[int, ...],
        *,
        border: bool,
    ) -> DevicePlan:
        return DevicePlan(
            region=torch.from_numpy(source),
            matrix=torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)),
            shift=torch.from_numpy(np.ascontiguousarray(shift, dtype=np.float32)),
            offsets=None if offsets is None else torch.from_numpy(offsets.astype(np.float32)),
            patch=self.patch_size,
            out=self.out_size,
            clip=self.resized,
            # skimage clips to the resized patch's range: a plain crop's own; a sample read from a region
            # with context: the sample's range before the darkening (decided on the device)
            clip_range=None
            if border or not self.resized
            else torch.tensor([[float(m.min()), float(m.max())] for m in source], dtype=torch.float32),
            border=border and self.resized,
            flips=tuple(flips),
            nonzero=bool(source.any()),
        )
