"""Small synthetic tasks in the Medical Segmentation Decathlon (or nnU-Net v2) layout, for newcomers and CI.

``python -m demo.data --out DIR [--seed S] [--n_train 12] [--n_test 3] [--size 64]
[--layout msd|nnunetv2] [--format nifti|mha|nrrd]`` writes

==========================  ==========================  =========  =====================================
task                        modalities                  classes    what it exercises
==========================  ==========================  =========  =====================================
Task91_DemoLiverCT          CT (int16 HU, air -1000)    3 raw -> 2 tumour (label 2) inside the organ, fused
                                                                   by the settings table; anisotropic,
                                                                   per-case spacing
Task92_DemoHippoMR          MRI (float32, ~0-500)       3          two adjacent structures; zero
                                                                   background (non-zero crop); a stray
                                                                   label 254; ``._*`` junk files
Task93_DemoProstateMR       T2 + ADC as one 4D NIfTI    3          two modalities on the 4th axis,
                            (int16, different scales)              oblique direction, anisotropic
Task94_DemoSpleenCT         CT (int16)                  2          the "new domain"; flipped direction,
                                                                   thick slices
Task95_DemoLiverTumourCT    CT (Task91's cases)         3          Task91's images and labels, the tumour
                                                                   kept as class 2: a trained domain's
                                                                   label set grows (``--add_classes_to``);
                                                                   written only when named in ``--tasks``
==========================  ==========================  =========  =====================================

Every case is a random phantom: organ-like blobs (ellipsoids with random size, rotation and smooth
surface perturbation) inside a body, with correlated noise, structures of overlapping intensity,
and organ contrast of roughly 1.5-2.5 noise standard deviations, so that a model has to learn them
(a small 3D U-Net reaches Dice ~0.9 on them after ~150 iterations of batch 2, i.e. a few minutes
on two CPU cores). Shapes are defined in
coordinates normalised to the field of view, so after resampling to the (median) target spacing
every case is about ``size`` voxels per axis (Prostate: 0.6 x size slices). Everything is
deterministic for a seed: case ``i`` of task ``t`` uses the generator ``default_rng([seed, t, i])``.

``--layout nnunetv2`` writes the same cases as nnU-Net v2 raw datasets: folders
``Dataset091_DemoLiverCT``, ..., one file per modality (``imagesTr/liverct_001_0000.nii.gz``), labels by
name (``labelsTr/liverct_001.nii.gz``) and a ``dataset.json`` with ``channel_names``, ``labels`` (name ->
value), ``numTraining`` and ``file_ending``. ``--format`` picks the image format (``.nii.gz``, ``.mha``
or ``.nrrd``) of either layout; the voxels and geometry are the same in every combination.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from utils.io_utils import atomic_write, atomic_write_image, atomic_write_json
from utils.triples import float3, int3

__all__ = [
    "DEMO_FORMATS",
    "DEMO_LAYOUTS",
    "DEMO_TASKS",
    "GROWN_DEMO_TASKS",
    "DemoCase",
    "DemoTask",
    "generate_demo_data",
    "generate_task",
    "main",
    "task_folder_name",
]

#: the layouts and image formats the generator writes (format -> file suffix)
DEMO_LAYOUTS = ("msd", "nnunetv2")
DEMO_FORMATS = {"nifti": ".nii.gz", "mha": ".mha", "nrrd": ".nrrd"}

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DemoCase:
    """One generated case: images (one (z, y, x) array per modality), label, geometry."""

    images: list[np.ndarray]
    label: np.ndarray
    spacing_zyx: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3, row-major
    dtype: type


@dataclass(frozen=True)
class DemoTask:
    """A demo task: its ``dataset.json`` fields and the phantom generator of its cases."""

    prefix: str
    description: str
    modalities: tuple[str, ...]
    labels: Mapping[int, str]
    make_case: Callable[[np.random.Generator, int], DemoCase]
    same_cases_as: str | None = None  # write that task's cases (same seeds: same images and raw labels)


# ---------------------------------------------------------------------------------------------
# phantom building blocks (coordinates normalised to [-1, 1] over the field of view)
# ---------------------------------------------------------------------------------------------


def _coords(shape: Sequence[int]) -> Coords:
    """Voxel-centre coordinates in [-1, 1], as broadcastable (n,1,1), (1,n,1), (1,1,n) arrays."""
    axes = [((np.arange(n, dtype=np.float32) + 0.5) / n) * 2 - 1 for n in shape]
    return (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Random rotation matrix with Euler angles up to ``max_deg`` degrees."""
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth(
    rng: np.random.Generator, coords: Sequence[np.ndarray], n_terms: int = 6, freq: float = 2.5
) -> np.ndarray:
    """A smooth random field in [-1, 1]: a normalised sum of random low-frequency cosines."""
    out = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)), dtype=np.float32)
    for _ in range(n_terms):
        w = rng.normal(size=3)
        w *= rng.uniform(0.5, freq) / (np.linalg.norm(w) + 1e-9)
        out += np.cos(w[0] * coords[0] + w[1] * coords[1] + w[2] * coords[2] + rng.uniform(0, 2 * np.pi))
    return out / n_terms


def _blob(
    coords: Coords,
    rng: np.random.Generator,
    centre: Sequence[float],
    radii: Sequence[float] | np.ndarray,
    *,
    max_rot_deg: float = 20.0,
    wobble: float = 0.15,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A randomly rotated ellipsoid with a smoothly perturbed surface.

    Returns the mask and the blob's local coordinates (unit radius), e.g. to split it.
    """
    rot = _rotation(rng, max_rot_deg)
    d = [coords[i] - np.float32(centre[i]) for i in range(3)]
    rotated = [sum(np.float32(rot[j, i]) * d[j] for j in range(3)) / np.float32(radii[i]) for i in range(3)]
    q = [np.broadcast_to(a, np.broadcast_shapes(*(c.shape for c in coords))) for a in rotated]
    f = q[0] ** 2 + q[1] ** 2 + q[2] ** 2
    limit = (1.0 + wobble * _smooth(rng, q)) ** 2
    return f < limit, q


def _noise(rng: np.random.Generator, shape: Sequence[int], sigma_vox: float = 0.5) -> np.ndarray:
    """Spatially correlated Gaussian noise with unit standard deviation."""
    g = rng.standard_normal(tuple(shape), dtype=np.float32)
    g = ndimage.gaussian_filter(g, sigma_vox, mode="reflect")
    return g / max(float(g.std()), 1e-6)


def _grid(
    rng: np.random.Generator,
    size: int,
    nominal_spacing: Sequence[float],
    spacing: Sequence[float],
    scale: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[tuple[int, int, int], Coords]:
    """Raw shape for a field of view of about ``size * scale`` voxels at ``nominal_spacing``
    (jittered by +-5 %), sampled at ``spacing``; and the normalised coordinates of that grid."""
    fov = [size * k * n for k, n in zip(scale, nominal_spacing, strict=True)]
    fov = [f * rng.uniform(0.95, 1.05) for f in fov]
    shape = int3(max(8, int(round(f / s))) for f, s in zip(fov, spacing, strict=True))
    return shape, _coords(shape)


def _origin(rng: np.random.Generator, base: Sequence[float]) -> tuple[float, float, float]:
    return float3(round(float(b + rng.uniform(-20, 20)), 3) for b in base)


def _body(coords: Coords, rng: np.random.Generator, ry: float, rx: float) -> tuple[np.ndarray, np.ndarray]:
    """Elliptic cylinder (along z) body and its inner part (without a fat/skin rim)."""
    _, y, x = coords
    wob = 0.04 * _smooth(rng, (coords[0] * 0, y, x), n_terms=4)
    r = (y / np.float32(ry)) ** 2 + (x / np.float32(rx)) ** 2
    body = np.broadcast_to(r < (1 + wob) ** 2, np.broadcast_shapes(*(c.shape for c in coords)))
    inner = np.broadcast_to(r < (0.88 + wob) ** 2, body.shape)
    return body, inner


# ---------------------------------------------------------------------------------------------
# the four tasks
# ---------------------------------------------------------------------------------------------


def _make_liver(rng: np.random.Generator, size: int) -> DemoCase:
    s_z = float(rng.choice([2.0, 2.5, 3.0]))
    s_yx = round(float(rng.uniform(1.1, 1.5)), 3)
    spacing = (s_z, s_yx, s_yx)
    shape, c = _grid(rng, size, (2.5, 1.3, 1.3), spacing)
    sigma = 20.0
    body, inner = _body(c, rng, rng.uniform(0.85, 0.92), rng.uniform(0.9, 0.97))
    img = np.full(shape, -1000.0, dtype=np.float32)
    img[body] = -100.0  # fat rim
    img[inner] = 40.0  # soft tissue
    spine, _ = _blob(c, rng, (0.0, 0.6, 0.0), (1.5, 0.12, 0.12), max_rot_deg=3, wobble=0.05)
    img[spine & inner] = 400.0
    liver_mean = 40.0 + rng.uniform(2.0, 2.5) * sigma
    s = rng.uniform(0.9, 1.1, 3)
    centre = (rng.uniform(-0.15, 0.15), rng.uniform(-0.2, 0.0), rng.uniform(-0.35, -0.25))
    liver, _ = _blob(c, rng, centre, (0.75 * s[0], 0.6 * s[1], 0.5 * s[2]))
    liver &= inner
    other, _ = _blob(c, rng, (rng.uniform(-0.2, 0.2), -0.1, rng.uniform(0.35, 0.45)), (0.35, 0.3, 0.25))
    img[other & inner & ~liver] = 40.0 + rng.uniform(0.8, 1.2) * sigma  # stomach-like, overlaps
    img[liver] = liver_mean
    label = liver.astype(np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        tc = [centre[i] + rng.uniform(-0.3, 0.3) * r for i, r in enumerate((0.75, 0.6, 0.5))]
        # hyperdense lesions (3-4 noise sigmas above the organ) of 5-7 voxels' radius at size 40: large and
        # distinct enough that Task95 learns them as their own class in the demo's short schedule on every
        # seed (with 4-6 voxels, one seed in two ended below 0.80 tumour Dice: a few voxels of boundary
        # error are a large share of a small lesion)
        tumour, _ = _blob(c, rng, tc, rng.uniform(0.25, 0.35, 3), wobble=0.2)
        tumour &= liver
        img[tumour] = liver_mean + rng.uniform(60, 80)
        label[tumour] = 2
    img += sigma * _noise(rng, shape)
    img[~body] = -1000.0 + 10.0 * rng.standard_normal(int((~body).sum())).astype(np.float32)
    return DemoCase(
        [img], label, spacing, _origin(rng, (-60.0, -60.0, -400.0)), tuple(np.eye(3).ravel()), np.int16
    )


def _make_hippo(rng: np.random.Generator, size: int) -> DemoCase:
    s = round(float(rng.uniform(0.9, 1.1)), 3)
    spacing = (s, s, s)
    shape, c = _grid(rng, size, (1.0, 1.0, 1.0), spacing, (1.25, 1.25, 1.25))  # cropped to ~size
    sigma = 40.0
    head, _ = _blob(c, rng, (0, 0, 0), rng.uniform(0.68, 0.76, 3), max_rot_deg=5, wobble=0.05)
    bias = 1.0 + 0.05 * _smooth(rng, c, n_terms=3, freq=1.5)
    img = np.zeros(shape, dtype=np.float32)
    img[head] = 300.0
    side = float(rng.choice([-1.0, 1.0]))
    vent, _ = _blob(c, rng, (0.0, rng.uniform(-0.25, 0.25), 0.5 * side), (0.2, 0.12, 0.1))
    img[vent & head] = 150.0
    sc = rng.uniform(0.9, 1.1, 3)
    centre = (rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06), rng.uniform(-0.08, 0.08) - 0.04 * side)
    struct, q = _blob(c, rng, centre, (0.44 * sc[0], 0.6 * sc[1], 0.44 * sc[2]), max_rot_deg=12)
    struct &= head & ~vent
    split = rng.uniform(-0.15, 0.15)
    anterior = struct & (q[1] < split)
    posterior = struct & ~anterior
    img[anterior] = 300.0 + rng.uniform(2.5, 2.8) * sigma
    img[posterior] = 300.0 + rng.uniform(1.5, 1.8) * sigma
    spot, _ = _blob(c, rng, (rng.uniform(-0.3, 0.3), 0.5, -0.42 * side), (0.1, 0.1, 0.1))
    img[spot & head & ~struct] = 300.0 + 1.8 * sigma  # bright distractor
    img = (img * bias + sigma * _noise(rng, shape) * head).astype(np.float32)
    img[~head] = 0.0
    np.maximum(img, 1.0, out=img, where=head)  # MR magnitude: positive inside the head
    label = np.zeros(shape, dtype=np.uint8)
    label[anterior] = 1
    label[posterior] = 2
    return DemoCase(
        [img], label, spacing, _origin(rng, (-30.0, -40.0, -20.0)), tuple(np.eye(3).ravel()), np.float32
    )


def _make_prostate(rng: np.random.Generator, size: int) -> DemoCase:
    inplane = round(float(rng.uniform(0.8, 1.0)), 3)
    spacing = (round(float(rng.uniform(2.8, 3.6)), 3), inplane, inplane)
    shape, c = _grid(rng, size, (3.2, 0.9, 0.9), spacing, (0.6, 1.15, 1.15))  # cropped in y, x to ~size
    body, _ = _body(c, rng, rng.uniform(0.65, 0.75), rng.uniform(0.75, 0.85))
    s = rng.uniform(0.9, 1.1, 3)
    centre = (rng.uniform(-0.1, 0.1), rng.uniform(0.0, 0.1), rng.uniform(-0.05, 0.05))
    gland, q = _blob(c, rng, centre, (0.7 * s[0], 0.48 * s[1], 0.56 * s[2]), max_rot_deg=10, wobble=0.1)
    gland &= body
    tz = gland & (q[0] ** 2 + ((q[1] + 0.15) / 0.8) ** 2 + q[2] ** 2 < 0.72**2)
    pz = gland & ~tz & (q[1] > -0.05)
    stroma = gland & ~tz & ~pz
    fat, _ = _blob(c, rng, (0, rng.uniform(-0.55, -0.45), rng.uniform(-0.3, 0.3)), (0.8, 0.12, 0.25))
    fat &= body & ~gland
    images = []
    # (tissue, pz, tz, stroma, sigma) per modality: T2 ~ 0-1000, ADC ~ 0-3000
    for tissue, d_pz, d_tz, d_st, sigma in ((500.0, 2.2, -1.8, -0.6, 70.0), (1300.0, 1.8, -1.4, 0.3, 200.0)):
        img = np.zeros(shape, dtype=np.float32)
        img[body] = tissue
        img[pz] = tissue + d_pz * sigma
        img[tz] = tissue + d_tz * sigma
        img[stroma] = tissue + d_st * sigma
        img[fat] = tissue + d_pz * sigma  # distractor as bright as the PZ
        bias = 1.0 + 0.1 * _smooth(rng, c, n_terms=3, freq=1.5)
        img = img * bias + sigma * _noise(rng, shape) * body
        img[~body] = 0.0
        np.maximum(img, 1.0, out=img, where=body)
        images.append(img.astype(np.float32))
    label = np.zeros(shape, dtype=np.uint8)
    label[pz] = 1
    label[tz] = 2
    angle = np.deg2rad(rng.uniform(5, 15))  # oblique acquisition: rotation about z
    direction = (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)
    return DemoCase(images, label, spacing, _origin(rng, (-30.0, -30.0, -50.0)), direction, np.int16)


def _make_spleen(rng: np.random.Generator, size: int) -> DemoCase:
    inplane = round(float(rng.uniform(1.2, 1.6)), 3)
    spacing = (round(float(rng.uniform(3.0, 5.0)), 2), inplane, inplane)
    shape, c = _grid(rng, size, (4.0, 1.4, 1.4), spacing)
    sigma = 20.0
    body, inner = _body(c, rng, rng.uniform(0.85, 0.92), rng.uniform(0.9, 0.97))
    img = np.full(shape, -1000.0, dtype=np.float32)
    img[body] = -100.0
    img[inner] = 40.0
    spine, _ = _blob(c, rng, (0.0, 0.6, 0.0), (1.5, 0.12, 0.12), max_rot_deg=3, wobble=0.05)
    img[spine & inner] = 450.0
    liver_like, _ = _blob(c, rng, (0.0, -0.1, rng.uniform(-0.5, -0.4)), (0.7, 0.5, 0.35))
    img[liver_like & inner] = 40.0 + 1.0 * sigma  # overlaps the spleen's intensity range
    s = rng.uniform(0.9, 1.1, 3)
    centre = (rng.uniform(-0.15, 0.15), rng.uniform(0.05, 0.2), rng.uniform(0.35, 0.45))
    spleen, _ = _blob(c, rng, centre, (0.8 * s[0], 0.65 * s[1], 0.45 * s[2]), wobble=0.25)
    spleen &= inner & ~spine
    img[spleen] = 40.0 + rng.uniform(2.0, 2.5) * sigma
    kidney, _ = _blob(c, rng, (rng.uniform(-0.5, 0.5), 0.5, 0.45), (0.2, 0.15, 0.12))
    img[kidney & inner & ~spleen] = 40.0 + 2.0 * sigma  # same intensity as spleen, other shape
    img += sigma * _noise(rng, shape)
    img[~body] = -1000.0 + 10.0 * rng.standard_normal(int((~body).sum())).astype(np.float32)
    direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # flipped x and y
    return DemoCase(
        [img], spleen.astype(np.uint8), spacing, _origin(rng, (80.0, 70.0, -300.0)), direction, np.int16
    )


#: the demo tasks, keyed by task folder name (order = task index for the seeds)
DEMO_TASKS: Mapping[str, DemoTask] = {
    "Task91_DemoLiverCT": DemoTask(
        "liverct",
        "Synthetic CT: liver-like organ with tumours (label 2, fused into the organ for training)",
        ("CT",),
        {0: "background", 1: "liver", 2: "tumour"},
        _make_liver,
    ),
    "Task92_DemoHippoMR": DemoTask(
        "hippomr",
        "Synthetic MRI: two adjacent structures (anterior, posterior) in a zero-background head",
        ("MRI",),
        {0: "background", 1: "anterior", 2: "posterior"},
        _make_hippo,
    ),
    "Task93_DemoProstateMR": DemoTask(
        "prostatemr",
        "Synthetic two-modality MRI (T2, ADC) as 4D NIfTI: peripheral and transition zones",
        ("T2", "ADC"),
        {0: "background", 1: "PZ", 2: "TZ"},
        _make_prostate,
    ),
    "Task94_DemoSpleenCT": DemoTask(
        "spleenct",
        "Synthetic CT: spleen-like organ, thick slices, flipped direction (the new domain)",
        ("CT",),
        {0: "background", 1: "spleen"},
        _make_spleen,
    ),
}
#: tasks written only when named (``--tasks``): another label set of a demo task's cases
GROWN_DEMO_TASKS: Mapping[str, DemoTask] = {
    "Task95_DemoLiverTumourCT": DemoTask(
        "livertumourct",
        "The cases of Task91_DemoLiverCT with the tumour as its own class (a trained liver domain gains a class)",
        ("CT",),
        {0: "background", 1: "liver", 2: "tumour"},
        _make_liver,
        same_cases_as="Task91_DemoLiverCT",
    ),
}
_ALL_TASKS: Mapping[str, DemoTask] = {**DEMO_TASKS, **GROWN_DEMO_TASKS}


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _as_nifti_stores(
    spacing_xyz: Sequence[float], origin_xyz: Sequence[float], direction: Sequence[float], four_d: bool
) -> tuple[float, ...]:
    """A 3x3 direction as a (3D or 4D) NIfTI file of the MSD layout with this spacing and origin gives it
    back (NIfTI keeps float32 numbers): written that way, an oblique direction is the same in every layout
    and format (MetaImage and NRRD store it as given)."""
    n = 4 if four_d else 3
    probe = sitk.Image([2] * n, sitk.sitkUInt8)
    d = np.eye(n)
    d[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    probe.SetDirection(d.ravel().tolist())
    probe.SetSpacing([*spacing_xyz, 1.0][:n])
    probe.SetOrigin([*origin_xyz, 0.0][:n])
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "direction.nii")
        sitk.WriteImage(probe, path)
        back = np.asarray(sitk.ReadImage(path).GetDirection()).reshape(n, n)
    return tuple(float(v) for v in back[:3, :3].ravel())


def _to_sitk(case: DemoCase, arrays: list[np.ndarray], dtype: type) -> sitk.Image:
    """3D image (one array) or 4D image (modalities on the 4th axis) with the case geometry."""
    data = [np.rint(a).astype(dtype) if np.issubdtype(dtype, np.integer) else a.astype(dtype) for a in arrays]
    # spacing, origin and direction as NIfTI stores them (float32), so that every format holds the same numbers
    spacing_xyz = [float(np.float32(s)) for s in case.spacing_zyx[::-1]]
    origin_xyz = [float(np.float32(o)) for o in case.origin_xyz]
    # the image's direction for every file of the case (the MSD image of a multi-modality task is 4D)
    direction = _as_nifti_stores(spacing_xyz, origin_xyz, case.direction, four_d=len(case.images) > 1)
    if len(data) == 1:
        img = sitk.GetImageFromArray(data[0])
        img.SetSpacing(spacing_xyz)
        img.SetOrigin(origin_xyz)
        img.SetDirection(direction)
        return img
    img = sitk.GetImageFromArray(np.stack(data), isVector=False)  # (t, z, y, x) -> 4D
    d4 = np.eye(4)
    d4[:3, :3] = np.asarray(direction).reshape(3, 3)
    img.SetSpacing([*spacing_xyz, 1.0])
    img.SetOrigin([*origin_xyz, 0.0])
    img.SetDirection(d4.ravel().tolist())
    return img


def task_folder_name(name: str, layout: str = "msd") -> str:
    """The folder of a demo task in a layout: ``Task91_DemoLiverCT`` (MSD) or ``Dataset091_DemoLiverCT``
    (nnU-Net v2: ``Dataset`` + the 3-digit number)."""
    if layout == "msd":
        return name
    number, rest = name[len("Task") :].split("_", 1)
    return f"Dataset{int(number):03d}_{rest}"


def generate_task(
    name: str,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train: int = 12,
    n_test: int = 3,
    size: int = 64,
    layout: str = "msd",
    file_format: str = "nifti",
) -> Path:
    """Write one demo task (``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs`` and the test
    cases' labels in ``labelsTs``, which real tasks do not have).

    Args:
        layout: ``"msd"`` (a 3D or 4D image per case, files listed in ``dataset.json``) or ``"nnunetv2"``
            (one 3D file per modality, ``CASE_0000``, ``CASE_0001``, ...; files found by name).
        file_format: ``"nifti"`` (``.nii.gz``), ``"mha"`` or ``"nrrd"``.

    Returns the task folder (:func:`task_folder_name`).
    """
    if layout not in DEMO_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {DEMO_LAYOUTS}")
    if file_format not in DEMO_FORMATS:
        raise ValueError(f"unknown format {file_format!r}; choose from {tuple(DEMO_FORMATS)}")
    ext = DEMO_FORMATS[file_format]
    nnunet = layout == "nnunetv2"
    task = _ALL_TASKS[name]
    task_idx = list(_ALL_TASKS).index(task.same_cases_as or name)
    root = Path(out_dir) / task_folder_name(name, layout)
    training, test = [], []
    for i in range(n_train + n_test):
        is_test = i >= n_train
        case_no = 101 + (i - n_train) if is_test else i + 1
        case_id = f"{task.prefix}_{case_no:03d}"
        rng = np.random.default_rng([seed, task_idx, case_no])
        case = task.make_case(rng, size)
        if name == "Task92_DemoHippoMR" and case_no == 3:  # MSD quirk: a stray label value 254
            bg = np.argwhere(case.label == 0)
            case.label[tuple(bg[len(bg) // 2])] = 254
        sub = "imagesTs" if is_test else "imagesTr"
        if nnunet:  # one 3D file per modality
            for c, image in enumerate(case.images):
                atomic_write_image(
                    _to_sitk(case, [image], case.dtype), root / sub / f"{case_id}_{c:04d}{ext}"
                )
        else:
            atomic_write_image(_to_sitk(case, case.images, case.dtype), root / sub / f"{case_id}{ext}")
        # test labels go to labelsTs/ (not part of the MSD layout: real tasks have none); the demo
        # scores its test predictions against them
        atomic_write_image(
            _to_sitk(case, [case.label], np.uint8),
            root / ("labelsTs" if is_test else "labelsTr") / f"{case_id}{ext}",
        )
        if is_test:
            test.append(f"./imagesTs/{case_id}{ext}")
        else:
            training.append({"image": f"./imagesTr/{case_id}{ext}", "label": f"./labelsTr/{case_id}{ext}"})
    if name == "Task92_DemoHippoMR" and n_train:  # MSD quirk: macOS resource forks in the archive
        junk = f"._{task.prefix}_001" + ("_0000" if nnunet else "")
        for sub, fname in (("imagesTr", junk + ext), ("labelsTr", f"._{task.prefix}_001{ext}")):
            atomic_write(root / sub / fname, lambda f: f.write(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X"))
    demo = {
        "demo_seed": seed,
        "demo_size": size,
        "reference": "generated by demo.data (synthetic, not medical data)",
    }
    meta: dict[str, object]
    if nnunet:
        meta = {
            "name": name.split("_", 1)[1],
            "description": task.description,
            "channel_names": {str(i): m for i, m in enumerate(task.modalities)},
            "labels": {v: k for k, v in task.labels.items()},
            "numTraining": n_train,
            "file_ending": ext,
            "licence": "CC0",
            **demo,
        }
    else:
        meta = {
            "name": name.split("_", 1)[1],
            "description": task.description,
            "reference": demo["reference"],
            "licence": "CC0",
            "release": "1.0",
            "tensorImageSize": "4D" if len(task.modalities) > 1 else "3D",
            "modality": {str(i): m for i, m in enumerate(task.modalities)},
            "labels": {str(k): v for k, v in task.labels.items()},
            "numTraining": n_train,
            "numTest": n_test,
            "training": training,
            "test": test,
            "demo_seed": seed,
            "demo_size": size,
        }
    atomic_write_json(root / "dataset.json", meta, indent=4)
    return root


def generate_demo_data(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train: int = 12,
    n_test: int = 3,
    size: int = 64,
    tasks: Sequence[str] | None = None,
    layout: str = "msd",
    file_format: str = "nifti",
) -> list[Path]:
    """Write the demo tasks (those of :data:`DEMO_TASKS`, or ``tasks``, named as in :data:`DEMO_TASKS` or
    :data:`GROWN_DEMO_TASKS`) into ``out_dir`` in a layout
    and format (:func:`generate_task`); returns the task folders."""
    names = list(tasks) if tasks else list(DEMO_TASKS)
    unknown = [t for t in names if t not in _ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; choose from {list(_ALL_TASKS)}")
    return [
        generate_task(
            t,
            out_dir,
            seed=seed,
            n_train=n_train,
            n_test=n_test,
            size=size,
            layout=layout,
            file_format=file_format,
        )
        for t in names
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m demo.data --out DIR [--seed S] ...``."""
    ap = argparse.ArgumentParser(
        prog="python -m demo.data",
        description="Write small synthetic tasks (Task folders with dataset.json, imagesTr, labelsTr, imagesTs, "
        "plus the test labels in labelsTs; MSD or nnU-Net v2 layout) for trying the pipeline without "
        "downloading data.",
    )
    ap.add_argument(
        "--out", required=True, help="output folder (e.g. dataset/ or demo_data/); created if missing"
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives identical files (default 0)"
    )
    ap.add_argument("--n_train", type=int, default=12, help="training cases per task (default 12)")
    ap.add_argument("--n_test", type=int, default=3, help="test cases per task (default 3)")
    ap.add_argument(
        "--size",
        type=int,
        default=64,
        help="about how many voxels per axis after resampling (default 64, min 16)",
    )
    ap.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help=f"subset of {list(_ALL_TASKS)} (default: the first four)",
    )
    ap.add_argument(
        "--layout",
        choices=DEMO_LAYOUTS,
        default="msd",
        help="msd: TaskNN_Name folders, one (3D or 4D) image per case, files listed in dataset.json; nnunetv2: "
        "DatasetNNN_Name folders, one file per modality (CASE_0000, CASE_0001, ...) found by name (default msd)",
    )
    ap.add_argument(
        "--format",
        dest="file_format",
        choices=tuple(DEMO_FORMATS),
        default="nifti",
        help="image format: nifti (.nii.gz), mha (MetaImage) or nrrd (default nifti)",
    )
    args = ap.parse_args(argv)
    if args.size < 16:
        ap.error("--size must be at least 16")
    if args.n_train < 0 or args.n_test < 0:
        ap.error("--n_train and --n_test must be >= 0")
    try:
        roots = generate_demo_data(
            args.out,
            seed=args.seed,
            n_train=args.n_train,
            n_test=args.n_test,
            size=args.size,
            tasks=args.tasks,
            layout=args.layout,
            file_format=args.file_format,
        )
    except ValueError as e:
        ap.error(str(e))
    for r in roots:
        print(f"wrote {r} ({args.n_train} training, {args.n_test} test cases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
