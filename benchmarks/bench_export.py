"""Benchmark: one sliding-window case on the CPU with the universal model (PyTorch) and with one
domain exported by ``models.export`` (TorchScript, ONNX Runtime).

The same case (a random volume), the same windows, blending and settings
(:func:`inference.sliding_window.sliding_window`, batch 2, half-patch steps); only the network
function differs:

* ``pytorch (fused)``: the universal model as ``predict.py --ckp`` runs it (fused CPU kernels);
* ``pytorch (plain)``: the universal model with plain PyTorch ops (what the export traces);
* ``torchscript``: the exported domain, ``torch.jit.load``;
* ``onnxruntime``: the exported domain in ONNX Runtime (CPU provider, as many threads as torch).

Prints the median time of each, the ratio to ``pytorch (fused)``, and the share of voxels whose
label equals that of ``pytorch (fused)``. Needs ``onnx`` and ``onnxruntime`` for the ONNX row.

    .venv/bin/python benchmarks/bench_export.py                       # the demo's model: base 8, pools 3, 32³
    .venv/bin/python benchmarks/bench_export.py --base 16 --pools 5 --patch 128 --volume 192 256 256
    .venv/bin/python benchmarks/bench_export.py --ckp results/demo/.../best.pt --task Task92_DemoHippoMR
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from inference.settings import InferenceSettings  # noqa: E402
from inference.sliding_window import sliding_window  # noqa: E402
from models import build_model  # noqa: E402
from models.export import ExportError, export_domain, load_exported  # noqa: E402
from models.loading import build_model_from_checkpoint  # noqa: E402
from tests.synthetic import synthetic_plans  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint, task_index  # noqa: E402

NetworkFn = Callable[[torch.Tensor, int], torch.Tensor]


def _random_checkpoint(folder: Path, base: int, pools: int, patch: int) -> Path:
    """A universal separable model of the demo's shape (3 tasks: 1, 1, 2 modalities; 2, 3, 3 classes)."""
    torch.manual_seed(0)
    in_channels, num_classes = [1, 1, 2], [2, 3, 3]
    model = build_model(
        "universal",
        in_channels,
        num_classes,
        module="separable_adapter",
        base_channels=base,
        pools_per_axis=pools,
    )
    cfg = model.config.to_dict()
    names = ["Task91_DemoLiverCT", "Task92_DemoHippoMR", "Task93_DemoProstateMR"]
    tasks = [
        {"name": n, "plans": synthetic_plans(n, m, k, [patch] * 3, [pools] * 3)}
        for n, m, k in zip(names, in_channels, num_classes, strict=True)
    ]
    path = folder / "universal.pt"
    save_checkpoint(path, cfg, tasks, model.state_dict(), model_patch=[patch] * 3)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckp", default=None, help="a trained checkpoint (default: a random demo-sized model)")
    ap.add_argument("--task", default="Task92_DemoHippoMR", help="the domain to export")
    ap.add_argument("--base", type=int, default=8, help="random model: base channels")
    ap.add_argument("--pools", type=int, default=3, help="random model: pools per axis")
    ap.add_argument("--patch", type=int, default=32, help="random model: the (cubic) window")
    ap.add_argument("--volume", type=int, nargs=3, default=[96, 96, 96], help="the case's size (z y x)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckp = Path(args.ckp) if args.ckp else _random_checkpoint(folder, args.base, args.pools, args.patch)
        ckpt = load_checkpoint(ckp)
        t = task_index(ckpt, args.task)
        model, tasks = build_model_from_checkpoint(ckpt)
        patch = ckpt.get("model_patch") or tasks[t]["plans"]["patch_size"]
        channels = model.config.in_channels[t]
        fused: NetworkFn = model
        plain_model, _ = build_model_from_checkpoint(ckpt)
        plain_model.set_fused_ops(False)
        runners: dict[str, NetworkFn] = {"pytorch (fused)": fused, "pytorch (plain)": plain_model}
        export_domain(ckp, args.task, folder / "domain.pt", "torchscript", check=False)
        ts = load_exported(folder / "domain.pt")
        runners["torchscript"] = lambda x, _t: ts.run(x)
        try:
            export_domain(ckp, args.task, folder / "domain.onnx", "onnx", check=False)
            ox = load_exported(folder / "domain.onnx", threads=torch.get_num_threads())
            runners["onnxruntime"] = lambda x, _t: ox.run(x)
        except ExportError as e:
            print(f"(no ONNX row: {e})")
        image = np.random.default_rng(0).standard_normal((channels, *args.volume), dtype=np.float32)
        settings = InferenceSettings(batch_size=2)
        index = {"pytorch (fused)": t, "pytorch (plain)": t}
        labels = {
            name: sliding_window(fn, image, index.get(name, 0), patch, settings)
            for name, fn in runners.items()
        }
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeats):  # interleaved: load from other processes hits all alike
            for name, fn in runners.items():
                t0 = time.perf_counter()
                sliding_window(fn, image, index.get(name, 0), patch, settings)
                times[name].append(time.perf_counter() - t0)
    cfg = model.config
    print(
        f"{'trained' if args.ckp else 'random'} {cfg.train_mode} {cfg.module or ''} model, base {cfg.base_channels}, "
        f"pools {cfg.pools_per_axis}; domain {args.task}; volume {tuple(args.volume)} x {channels} modality(ies), "
        f"window {tuple(patch)}, batch 2, half-patch steps; CPU, {torch.get_num_threads()} thread(s)"
    )
    ref = float(np.median(times["pytorch (fused)"]))
    for name, ts_ in times.items():
        med = float(np.median(ts_))
        agree = float((labels[name] == labels["pytorch (fused)"]).mean())
        print(
            f"{name:16s}: median {med:6.2f} s  ({med / ref:4.2f} x pytorch fused)  runs {[round(v, 2) for v in ts_]}"
            f"  labels equal on {100 * agree:.4f} % of voxels"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
