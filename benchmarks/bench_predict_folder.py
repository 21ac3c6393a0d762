"""Benchmark: segmenting a folder of cases one stage after another vs pipelined (``predict.py``'s default).

The folder holds 8 demo-size cases (the demo's liver task, 40³ voxels) and 2 CT-size cases
(512 x 512 x 120 int16, 0.8 x 0.8 x 2.5 mm, written as .nii.gz). Each mode runs in a fresh process
(:meth:`inference.predictor.Segmenter.predict_files` with ``pipeline=False`` / ``True``) and reports
its wall time and peak resident memory (``ru_maxrss``); the label maps of both must be identical.

The model: a checkpoint (``--ckp``/``--task``, e.g. a demo model), or by default a random-weight
independent U-Net of the demo's width (base 8, pools 3,3,3, patch 32³, 1 modality, 2 classes,
target spacing 2.5 x 1.6 x 1.6 mm: a CT-size case becomes 120 x 256 x 256).

    .venv/bin/python benchmarks/bench_predict_folder.py
    .venv/bin/python benchmarks/bench_predict_folder.py --precision auto --backend auto
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from demo.data import generate_task  # noqa: E402
from inference.backends import choose_runtime, onnxruntime_faster  # noqa: E402
from inference.predictor import Segmenter, TaskModel  # noqa: E402
from inference.settings import InferenceSettings  # noqa: E402
from models import build_model  # noqa: E402
from models.runtime import keep_freed_memory_in_heap  # noqa: E402
from models.unet import U2Net3D  # noqa: E402
from tests.synthetic import synthetic_plans  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.decathlon import read_label  # noqa: E402


def make_ct_case(path: Path, shape: tuple[int, int, int], seed: int) -> None:
    """A CT-like int16 volume (z, y, x): air, a body ellipse of soft tissue, one brighter organ."""
    g = np.random.default_rng(seed)
    z, y, x = (np.arange(n, dtype=np.float32) for n in shape)
    yy, xx = np.meshgrid(
        (y - shape[1] / 2) / (shape[1] * 0.42), (x - shape[2] / 2) / (shape[2] * 0.36), indexing="ij"
    )
    body = (yy**2 + xx**2) < 1.0
    vol = np.full(shape, -1000, dtype=np.int16)
    vol[:, body] = 40
    zz = (z[:, None, None] - shape[0] / 2) / (shape[0] * 0.3)
    organ = (zz**2 + ((yy + 0.2) / 0.35)[None] ** 2 + ((xx - 0.3) / 0.3)[None] ** 2) < 1.0
    vol[organ] = 120
    vol = (vol + g.normal(0, 20, shape)).astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(path), useCompression=True)


def make_inputs(folder: Path, n_small: int, n_ct: int, ct_shape: tuple[int, int, int]) -> Path:
    task = generate_task("Task91_DemoLiverCT", folder / "demo", n_train=0, n_test=n_small, size=40, seed=5)
    inputs = folder / "inputs"
    inputs.mkdir()
    for p in sorted((task / "imagesTs").glob("*.nii.gz")):
        os.link(p, inputs / p.name)
    for i in range(n_ct):
        make_ct_case(inputs / f"ct_{i:02d}.nii.gz", ct_shape, seed=i)
    return inputs


def random_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    config = {"train_mode": "independent", "in_channels": [1], "num_classes": [2], "module": None,
              "base_channels": 8, "pools_per_axis": [3, 3, 3], "deep_supervision": True, "residual": True}  # fmt: skip
    model = build_model(**config)  # type: ignore[arg-type]
    plans = synthetic_plans("TaskB_Bench", 1, 2, [32, 32, 32], [3, 3, 3])
    plans["target_spacing"] = [2.5, 1.6, 1.6]
    path = folder / "bench.pt"
    save_checkpoint(path, config, [{"name": "TaskB_Bench", "plans": plans}], model.state_dict())
    return path


def child(args: argparse.Namespace) -> None:
    """One mode in this fresh process: segment the folder, print wall time and peak RSS as JSON."""
    keep_freed_memory_in_heap()  # as predict.py does on CPU
    dev = torch.device("cpu")
    task = TaskModel.from_checkpoint(args.ckp, args.task, "cpu")
    cfg = task.model.config if isinstance(task.model, U2Net3D) else None
    faster = cfg is None or onnxruntime_faster(cfg.train_mode, cfg.module, cfg.base_channels)
    runtime = choose_runtime(args.precision, args.backend, dev, ort_faster=faster)
    settings = InferenceSettings(amp=runtime.amp, backend=runtime.backend)  # type: ignore[arg-type]
    seg = Segmenter(task, settings)
    t0 = time.perf_counter()
    report = seg.predict_files([args.inputs], args.out, pipeline=args.child == "pipelined")
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": dt, "peak_mib": peak, "written": len(report.written),
                      "failed": len(report.failed), "runtime": runtime.describe()}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckp", default=None, help="checkpoint (default: a random-weight demo-width model)")
    p.add_argument("--task", default=None, help="the checkpoint's task to segment with")
    p.add_argument("--n_small", type=int, default=8, help="demo-size cases")
    p.add_argument("--n_ct", type=int, default=2, help="CT-size cases")
    p.add_argument("--ct_shape", type=int, nargs=3, default=[120, 512, 512], help="CT-size case (z, y, x)")
    p.add_argument("--precision", default="fp32", help="as predict.py --precision")
    p.add_argument("--backend", default="torch", help="as predict.py --backend")
    p.add_argument("--rounds", type=int, default=1, help="runs of each mode (alternating)")
    p.add_argument("--child", default=None, choices=["sequential", "pipelined"], help=argparse.SUPPRESS)
    p.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-folder-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        inputs = make_inputs(root, args.n_small, args.n_ct, tuple(args.ct_shape))
        ckp = args.ckp or str(random_checkpoint(root))
        print(f"inputs: {args.n_small} demo-size + {args.n_ct} CT-size {args.ct_shape} cases "
              f"(made in {time.perf_counter() - t0:.0f} s); torch threads {torch.get_num_threads()}")  # fmt: skip
        results: dict[str, list[dict[str, float]]] = {"sequential": [], "pipelined": []}
        for r in range(args.rounds):
            for mode in results:
                out = root / f"out_{mode}_{r}"
                cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--inputs", str(inputs),
                       "--out", str(out), "--ckp", ckp, "--precision", args.precision, "--backend", args.backend]  # fmt: skip
                if args.task:
                    cmd += ["--task", args.task]
                res = subprocess.run(cmd, check=True, capture_output=True, text=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                results[mode].append(row)
                print(f"{mode:10s}: {row['seconds']:6.1f} s, peak RSS {row['peak_mib']:6.0f} MiB, "
                      f"{row['written']} written, {row['failed']} failed ({row['runtime']})")  # fmt: skip
        same = all(
            np.array_equal(read_label(a)[0], read_label(root / "out_pipelined_0" / a.name)[0])
            for a in sorted((root / "out_sequential_0").glob("*.nii.gz"))
        )
        seq = float(np.median([r["seconds"] for r in results["sequential"]]))
        pipe = float(np.median([r["seconds"] for r in results["pipelined"]]))
        mem_s = max(r["peak_mib"] for r in results["sequential"])
        mem_p = max(r["peak_mib"] for r in results["pipelined"])
        print(f"pipelined / sequential wall time = {pipe / seq:.3f} ({seq:.1f} s -> {pipe:.1f} s); peak RSS "
              f"{mem_s:.0f} -> {mem_p:.0f} MiB ({mem_p / mem_s:.2f}x); identical label maps: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
