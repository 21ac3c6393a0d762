"""Preprocessing throughput, to predict how long a Decathlon task takes.

    .venv/bin/python benchmarks/bench_preprocess.py [--work DIR] [--sizes 128x128x64 ...] [--skip_demo]

Prints

1. cases per second of ``preprocess_taskSep`` on the demo tasks (``demo.data`` defaults:
   4 tasks x 15 cases, ~64**3 voxels) with ``--nProc 1`` and ``--nProc 2`` (spawn start-up included);
2. the time of ONE case (image + label: integrity check, read, crop, B-spline resampling,
   normalisation, saving) against its voxel count, for generated CT-like volumes up to
   512 x 512 x 200, resampled from (2.5, 0.7, 0.7) mm to (2.5, 0.8, 0.8) mm (Pancreas preset) and,
   with ``--liver``, to (1.0, 0.77, 0.77) mm (Liver preset: 2.5x more slices).

Timings are wall-clock on whatever machine runs it, with SimpleITK using all cores for one case
(``--nProc 1``); numbers are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.data import generate_demo_data  # noqa: E402
from utils.decathlon import check_nifti_integrity, read_image, read_label  # noqa: E402
from utils.io_utils import atomic_write_nifti  # noqa: E402
from utils.prep_runner import run_preprocessing  # noqa: E402
from utils.preprocessing import preprocess_arrays, save_case, stored_dtype  # noqa: E402
from utils.task_settings import NORMALISATION  # noqa: E402
from utils.triples import int3  # noqa: E402


def ct_like_case(folder: Path, shape_zyx: tuple[int, int, int], seed: int = 0) -> tuple[Path, Path]:
    """Write a CT-like int16 volume (air, body, organ, noise) and its label; returns their paths."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape_zyx)
    body = (y[:, None] / 0.8) ** 2 + (x[None, :] / 0.9) ** 2 < 1  # (y, x)
    img = np.empty(shape_zyx, dtype=np.int16)
    lab = np.zeros(shape_zyx, dtype=np.uint8)
    for k in range(shape_zyx[0]):
        sl = np.where(body, 40, -1000).astype(np.float32)
        organ = (z[k] / 0.7) ** 2 + (y[:, None] / 0.45) ** 2 + ((x[None, :] + 0.3) / 0.4) ** 2 < 1
        sl[organ] = 90
        sl += rng.normal(0, 20, sl.shape).astype(np.float32)
        img[k] = np.rint(sl).astype(np.int16)
        lab[k] = organ
    paths = []
    for arr, name in ((img, "img.nii.gz"), (lab, "lab.nii.gz")):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing((0.7, 0.7, 2.5))
        im.SetOrigin((-180.0, -180.0, -500.0))
        atomic_write_nifti(im, folder / name)
        paths.append(folder / name)
    return paths[0], paths[1]


def one_case(img: Path, lab: Path, target: tuple[float, float, float], out: Path) -> dict[str, float]:
    """Time the phases of one case."""
    plans = {
        "modalities": ["CT"],
        "is_ct": True,
        "label_map": {"0": 0, "1": 1},
        "num_classes": 2,
        "target_spacing": list(target),
        "resample_grid": "original",
        "normalisation": dict(NORMALISATION),
    }
    t = {}
    t0 = time.perf_counter()
    check_nifti_integrity(img)
    check_nifti_integrity(lab)
    t["verify"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    image, geom = read_image(img, 1, verify=False)
    label, _ = read_label(lab, verify=False)
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    im, w, lb, side = preprocess_arrays(image, geom, plans, label, pixel_dtype=stored_dtype(img))
    t["crop+resample+normalise"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_case(out, "case", im, w, side, label=lb)
    t["save"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    t["out_voxels"] = float(np.prod(im.shape[1:]))
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", default=None, help="scratch folder (default: a temporary folder, removed afterwards)"
    )
    ap.add_argument(
        "--sizes",
        nargs="+",
        default=["64x128x128", "100x256x256", "200x512x512"],
        help="CT-like volumes as ZxYxX (default: 64x128x128 100x256x256 200x512x512)",
    )
    ap.add_argument("--skip_demo", action="store_true", help="skip the demo-task throughput part")
    ap.add_argument(
        "--liver", action="store_true", help="also time the Liver preset target spacing (1, 0.77, 0.77)"
    )
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_demo:
            demo = work / "demo"
            t0 = time.perf_counter()
            generate_demo_data(demo, seed=0)
            n = sum(1 for _ in demo.glob("Task*/images*/[!.]*.nii.gz"))
            print(f"demo data: {n} cases generated in {time.perf_counter() - t0:.1f} s")
            for n_proc in (1, 2):
                prep = work / f"prep{n_proc}"
                shutil.rmtree(prep, ignore_errors=True)
                s = run_preprocessing(demo, prep, n_proc=n_proc, progress=False, log=lambda _m: None)
                assert s.ok, s.failed
                print(
                    f"demo tasks, --nProc {n_proc}: {s.done} cases in {s.seconds:.1f} s = {s.done / s.seconds:.1f} cases/s"
                )
        print("\none CT-like case (image + label), --nProc 1:")
        header = f"{'shape zyx':>14} {'voxels':>8} {'target':>16} {'out voxels':>10} " + " ".join(
            f"{k:>10}" for k in ("verify", "read", "resample+", "save", "total [s]")
        )
        print(header)
        targets = [(2.5, 0.8, 0.8)] + ([(1.0, 0.77, 0.77)] if args.liver else [])
        for spec in args.sizes:
            shape = int3(spec.lower().split("x"))
            folder = work / f"ct_{spec}"
            folder.mkdir(exist_ok=True)
            img, lab = ct_like_case(folder, shape)
            for target in targets:
                t = one_case(img, lab, target, folder / "out")
                print(
                    f"{spec:>14} {np.prod(shape) / 1e6:>7.1f}M {str(target):>16} {t['out_voxels'] / 1e6:>9.1f}M "
                    + " ".join(
                        f"{t[k]:>10.2f}"
                        for k in ("verify", "read", "crop+resample+normalise", "save", "total")
                    )
                )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
