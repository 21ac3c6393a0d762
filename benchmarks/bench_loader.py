"""Benchmark: training samples per second of ONE loader process (one CPU core) at the paper preset.

For each of the five preset tasks (Heart, Liver, Hippocampus, Prostate, Pancreas: their modalities
and task patches, synthetic cases a bit larger than the patch), batches of 2 are sampled and augmented
exactly as a loader worker does it (:class:`training.sampling.PatchSampler` with the preset's
augmentation and "fore"/"small" redraws) and brought to the 128³ model patch, by each pipeline:

* ``before``: the two-step pipeline as it was before issue 11 (skimage's ``resize`` per voxel);
* ``two_step``: the preset's two-step pipeline now (the same resize, computed separably: same values);
* ``composed``: ``--augment_pipeline composed`` (one interpolation per sample);
* ``composed_linear``: the same with ``--augment_interp linear`` (that interpolation linear, not cubic);
* ``device_plan``: the loader-process share of ``--augment_device cuda`` (transforms, labels and the
  region to read; the image resampling then runs on the GPU and is not counted here).

Samples per second per process = samples / CPU time of the process. BLAS and OpenMP threads are set
to 1 before numpy is imported, as one process per core would run. ``--centre_voxels`` picks how the
"fore"/"small" structure voxel is drawn (``all``: uniform over every voxel, the preset; ``subset``: the
cached subset of 2,048); ``--voxel_draws N`` also times N such draws alone on a Liver-sized label
(300 x 400 x 400 voxels, a 4.8-million-voxel structure) and reports the memory of each index.

    .venv/bin/python benchmarks/bench_loader.py                       # all pipelines, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_loader.py --pipelines two_step composed --batches 2
    .venv/bin/python benchmarks/bench_loader.py --pipelines composed composed_linear --batches 2
    .venv/bin/python benchmarks/bench_loader.py --pipelines two_step --centre_voxels subset
    .venv/bin/python benchmarks/bench_loader.py --pipelines --voxel_draws 2000   # the draws alone
    .venv/bin/python benchmarks/bench_loader.py --smoke               # tiny, a few seconds
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage.transform import resize as skimage_resize  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.preset_tasks import FIVE_TASKS  # noqa: E402
from tests.synthetic import make_synthetic_task  # noqa: E402
from training.augmentation import (  # noqa: E402
    AugmentParams,
    SampleAugmenter,
    extraction_size,
    safe_jitter,
)
from training.composed_augment import ComposedAugmenter  # noqa: E402
from training.sampling import PatchSampler, compute_case_info, structure_voxel  # noqa: E402
from utils.io_utils import atomic_write_json  # noqa: E402
from utils.preprocessing import list_cases, resize_image, resize_nearest  # noqa: E402

#: (name, modalities, classes, patch) of the five-task preset
PRESET_TASKS = [(t.name, t.modalities, t.classes, t.patch) for t in FIVE_TASKS]
PIPELINES = ("before", "two_step", "composed", "composed_linear", "device_plan")


def skimage_resize_image(image: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The resize as it was computed before issue 11 (skimage, voxel by voxel)."""
    return np.stack(
        [
            skimage_resize(
                np.asarray(m, dtype=np.float32),
                shape,
                order=3,
                mode="constant",
                cval=0.0,
                clip=True,
                anti_aliasing=False,
                preserve_range=True,
            )
            for m in image
        ]
    ).astype(np.float32)


def make_sampler(
    pipeline: str,
    cases: list[str],
    plans: dict[str, Any],
    out: tuple[int, int, int],
    seed: int,
    centre_voxels: str = "all",
) -> tuple[PatchSampler, Any]:
    """The worker's sampler for ``pipeline`` and the batch-level step that follows it (the resize)."""
    patch = tuple(int(v) for v in plans["patch_size"])
    aug = AugmentParams(order_data=1) if pipeline == "composed_linear" else AugmentParams()
    info = {
        i: compute_case_info(np.load(c + "_label.npy"), plans["small_label"]) for i, c in enumerate(cases)
    }
    kwargs: dict[str, Any] = dict(
        patch_size=patch,
        batch_size=2,
        small_label=plans["small_label"],
        extraction=extraction_size(patch, aug),
        jitter=safe_jitter(patch, aug),
        seed=seed,
        case_info=info,
        centre_voxels=centre_voxels,
    )
    after = None
    if pipeline in ("before", "two_step"):
        kwargs["augmenter"] = SampleAugmenter(patch, aug)
        resize = skimage_resize_image if pipeline == "before" else resize_image

        def after(batch: dict[str, Any]) -> dict[str, Any]:
            batch["data"] = np.stack([resize(d, out) for d in batch["data"]])
            batch["seg"] = np.stack([resize_nearest(s[0], out)[None] for s in batch["seg"]]).astype(
                np.float32
            )
            return batch

    else:
        composed = ComposedAugmenter(patch, out, aug)
        device = pipeline == "device_plan"
        kwargs.update(
            augmenter=composed.plan if device else composed,
            finish=composed.plan_resize if device else composed.resize,
            output_size=out,
        )
    return PatchSampler(cases, **kwargs), after


def run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    results = []
    for i, (name, mods, classes, patch) in enumerate(PRESET_TASKS):
        out = (128, 128, 128)
        if args.smoke:
            patch, out = ((8, 16, 16) if mods == 2 else (12, 12, 12)), (16, 16, 16)
        shape = [p + max(8, p // 4) for p in patch]
        plans, _ = make_synthetic_task(
            root,
            name,
            num_modalities=mods,
            num_classes=classes,
            shape=shape,
            patch=patch,
            n_train=args.cases,
            n_val=0,
            seed=i,
        )
        cases = list_cases(root / name)
        for pipeline in args.pipelines:
            sampler, after = make_sampler(pipeline, cases, plans, out, 1993 + i, args.centre_voxels)
            samples = 0
            cpu0 = time.process_time()
            wall0 = time.perf_counter()
            for _ in range(args.batches):
                batch = sampler.next_batch()
                if after is not None:
                    batch = after(batch)
                samples += len(batch["kinds"])
            cpu = time.process_time() - cpu0
            wall = time.perf_counter() - wall0
            res = {
                "task": name,
                "pipeline": pipeline,
                "samples": samples,
                "cpu_s": cpu,
                "wall_s": wall,
                "samples_per_s": samples / max(cpu, 1e-9),
                "patch": list(patch),
                "out": list(out),
            }
            results.append(res)
            print(
                f"{name:20s} {pipeline:12s} {res['samples_per_s']:7.2f} samples/s per process "
                f"({samples} samples, {cpu:.1f} s CPU, {wall:.1f} s wall)",
                flush=True,
            )
    return results


def voxel_draws(n: int) -> dict[str, Any]:
    """Time ``n`` draws of a uniform structure voxel alone, per ``centre_voxels`` mode, on a Liver-sized
    label: ``all`` (:func:`training.sampling.structure_voxel` on a memory map, one slice read per draw),
    ``subset`` (an index into the cached 2,048 voxels), and for reference a flat int32 list of every
    voxel (the memory the per-slice counts avoid)."""
    shape = (300, 400, 400)
    label = np.zeros(shape, np.uint8)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    label[((zz - 150) / 110.0) ** 2 + ((yy - 200) / 120.0) ** 2 + ((xx - 190) / 90.0) ** 2 <= 1] = 1
    with tempfile.TemporaryDirectory(prefix="bench_voxels_") as tmp:
        path = os.path.join(tmp, "label.npy")
        np.save(path, label)
        mm = np.load(path, mmap_mode="r")
        info = compute_case_info(label, None)
        total = int(info.fore_cumcount[-1])
        rs = np.random.RandomState(0)
        out: dict[str, Any] = {"label_shape": list(shape), "structure_voxels": total}
        t0 = time.process_time()
        for _ in range(n):
            structure_voxel(mm, info.fore_cumcount, int(rs.randint(total)), None)
        out["all_us_per_draw"] = 1e6 * (time.process_time() - t0) / n
        t0 = time.process_time()
        for _ in range(n):
            info.fore_points[rs.randint(len(info.fore_points))].astype(np.int64)
        out["subset_us_per_draw"] = 1e6 * (time.process_time() - t0) / n
        flat = np.flatnonzero(label).astype(np.int32)
        t0 = time.process_time()
        for _ in range(n):
            np.array(np.unravel_index(int(flat[rs.randint(len(flat))]), shape), dtype=np.int64)
        out["flat_list_us_per_draw"] = 1e6 * (time.process_time() - t0) / n
        out["bytes_all_cumcount"] = int(info.fore_cumcount.nbytes)
        out["bytes_subset"] = int(info.fore_points.nbytes)
        out["bytes_flat_int32_list"] = int(flat.nbytes)
        del mm
    print(
        f"structure-voxel draws on a {shape} label with {total} structure voxels: "
        f"all {out['all_us_per_draw']:.1f} us/draw (index {out['bytes_all_cumcount']} B), "
        f"subset {out['subset_us_per_draw']:.1f} us/draw ({out['bytes_subset']} B), "
        f"flat int32 list {out['flat_list_us_per_draw']:.1f} us/draw ({out['bytes_flat_int32_list'] / 1e6:.1f} MB)",
        flush=True,
    )
    return out


def summary(results: list[dict[str, Any]]) -> str:
    """Markdown table: samples/s per process by task and pipeline, and the preset's round-robin mean
    (one sample of each task in turn: harmonic mean of the rates)."""
    pipelines = [p for p in PIPELINES if any(r["pipeline"] == p for r in results)]
    lines = ["| task | " + " | ".join(pipelines) + " |", "|---|" + "---|" * len(pipelines)]
    for name, *_ in PRESET_TASKS:
        row = {r["pipeline"]: r["samples_per_s"] for r in results if r["task"] == name}
        lines.append(
            f"| {name} | " + " | ".join(f"{row[p]:.2f}" if p in row else "–" for p in pipelines) + " |"
        )
    means = []
    for p in pipelines:
        rates = [r["samples_per_s"] for r in results if r["pipeline"] == p]
        means.append(len(rates) / sum(1.0 / v for v in rates) if rates else float("nan"))
    lines.append("| five tasks, round robin | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipelines", nargs="*", default=list(PIPELINES), choices=PIPELINES)
    ap.add_argument(
        "--centre_voxels", default="all", choices=("all", "subset"), help="structure voxels of 'fore'/'small'"
    )
    ap.add_argument("--voxel_draws", type=int, default=0, help="also time N structure-voxel draws alone")
    ap.add_argument("--batches", type=int, default=3, help="batches of 2 per task and pipeline")
    ap.add_argument("--cases", type=int, default=2, help="synthetic cases per task")
    ap.add_argument("--smoke", action="store_true", help="tiny patches (a few seconds)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    draws = voxel_draws(args.voxel_draws) if args.voxel_draws > 0 else None
    results: list[dict[str, Any]] = []
    if args.pipelines:
        with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
            results = run(args, Path(tmp))
        print()
        print(summary(results))
    if args.json:
        atomic_write_json(
            args.json,
            {"results": results, "summary": summary(results) if results else "", "voxel_draws": draws},
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
