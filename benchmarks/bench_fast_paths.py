"""Accuracy of the fast inference paths against fp32 PyTorch (``predict.py --precision/--backend``).

For every path (ONNX Runtime fp32, PyTorch bf16) and every case, the label map is compared with the
one of fp32 PyTorch (the reference): the share of equal voxels, and the change of each foreground
class's Dice against the test label (or, without labels, the Dice against the reference's labels).
The bar (tests/test_fast_paths.py): >= 99.9 % equal voxels, Dice within 0.002.

Cases:

* ``--demo_results results/demo --demo_data dataset_demo``: every trained demo model (independent,
  shared, universal) on its task's test images, post-processed, in the original geometry, scored
  against ``labelsTs``;
* ``--random``: random-weight base-16 models (the dense U-Net and the universal separable model,
  pools 5,5,5) on one 96 x 128 x 128 volume with 64³ windows.

bf16 on a CPU without native bf16 runs emulated (slow, but the same rounding of the inputs and
weights); the table says so.

    .venv/bin/python benchmarks/bench_fast_paths.py --demo_results results/demo --demo_data dataset_demo --random
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from inference.backends import native_bf16, onnxruntime_available  # noqa: E402
from inference.geometry import restore_to_original  # noqa: E402
from inference.predictor import Segmenter, TaskModel  # noqa: E402
from inference.settings import InferenceSettings  # noqa: E402
from models import build_model  # noqa: E402
from utils.checkpoint import best_checkpoints, load_checkpoint  # noqa: E402
from utils.decathlon import apply_label_map, read_label  # noqa: E402
from utils.metrics import dice  # noqa: E402
from utils.preprocessing import preprocess_image  # noqa: E402

PATHS = {"onnxruntime": {"backend": "onnxruntime"}, "bf16": {"amp": "bf16"}}


def compare(ref: np.ndarray, got: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(share of voxels equal to the reference, largest |Dice(got, truth) - Dice(ref, truth)|)."""
    agree = float((ref == got).mean())
    diffs = [abs(dice(got == c, truth == c) - dice(ref == c, truth == c)) for c in range(1, num_classes)]
    return agree, max(diffs)


def demo_rows(results: Path, data: Path, paths: list[str]) -> list[tuple[str, str, float, float, int]]:
    """(model, path, worst agreement, worst Dice change, cases) per demo model and path."""
    rows = []
    for mode in ("independent", "shared", "universal"):
        for ck in best_checkpoints(results / f"res_u2net3d_{mode}_demo"):
            ckpt = load_checkpoint(ck)
            for entry in ckpt["tasks"]:
                name = entry["name"]
                images = sorted((data / name / "imagesTs").glob("*.nii.gz"))
                task = TaskModel.from_checkpoint(ck, name)
                worst = {p: [1.0, 0.0] for p in paths}
                for img_path in images:
                    image, weight, sidecar = preprocess_image(img_path, task.plans)
                    truth = apply_label_map(read_label(data / name / "labelsTs" / img_path.name)[0],
                                            task.plans["label_map"])  # fmt: skip
                    ref = restore_to_original(
                        Segmenter(task, InferenceSettings()).segment_array(image, weight), sidecar
                    )
                    for p in paths:
                        seg = Segmenter(task, InferenceSettings(**PATHS[p]))  # type: ignore[arg-type]
                        got = restore_to_original(seg.segment_array(image, weight), sidecar)
                        agree, dd = compare(ref, got, truth, task.num_classes)
                        worst[p] = [min(worst[p][0], agree), max(worst[p][1], dd)]
                for p in paths:
                    rows.append((f"demo {mode} {name}", p, worst[p][0], worst[p][1], len(images)))
    return rows


def random_rows(paths: list[str]) -> list[tuple[str, str, float, float, int]]:
    g = np.random.default_rng(3)
    image = g.standard_normal((1, 96, 128, 128)).astype(np.float32)
    image[:, 20:70, 30:100, 40:90] += 2.0
    rows = []
    for kind in ("dense", "universal"):
        torch.manual_seed(0)
        if kind == "dense":
            net = build_model("independent", [1], [3], base_channels=16, pools_per_axis=(5, 5, 5)).eval()
        else:
            net = build_model("universal", [1, 1, 1, 2, 1], [3, 3, 3, 3, 3], module="separable_adapter",
                              base_channels=16, pools_per_axis=(5, 5, 5)).eval()  # fmt: skip
        task = TaskModel(net, 0, "random", {"patch_size": [64, 64, 64], "num_classes": 3})
        ref = Segmenter(task, InferenceSettings(postprocess=False)).segment_array(image)
        for p in paths:
            got = Segmenter(task, InferenceSettings(postprocess=False, **PATHS[p])).segment_array(image)  # type: ignore[arg-type]
            agree, dd = compare(ref, got, ref, 3)
            rows.append((f"random base-16 {kind}, 96x128x128", p, agree, dd, 1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo_results", type=Path, default=None, help="the demo's results folder")
    ap.add_argument("--demo_data", type=Path, default=None, help="the demo's dataset folder")
    ap.add_argument("--random", action="store_true", help="also random-weight base-16 models")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="fast paths")
    args = ap.parse_args()
    paths = [p for p in args.paths if p != "onnxruntime" or onnxruntime_available()]
    t0 = time.perf_counter()
    rows = []
    if args.demo_results is not None and args.demo_data is not None:
        rows += demo_rows(args.demo_results, args.demo_data, paths)
    if args.random:
        rows += random_rows(paths)
    emulated = (
        " (bf16 EMULATED: this CPU has no native bf16)"
        if "bf16" in paths and not native_bf16(torch.device("cpu"))
        else ""
    )
    print(f"fast paths vs fp32 PyTorch{emulated}; {time.perf_counter() - t0:.0f} s")
    print("| model, cases | path | equal voxels (worst case) | largest Dice change | cases |")
    print("|---|---|---|---|---|")
    for name, p, agree, dd, n in rows:
        flag = "" if agree >= 0.999 and dd <= 0.002 else "  **MISSES THE BAR**"
        print(f"| {name} | {p} | {agree * 100:.3f} % | {dd:.4f} | {n} |{flag}")


if __name__ == "__main__":
    main()
