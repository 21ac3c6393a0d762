"""Model benchmark: parameters, forward FLOPs, training-step time and peak memory per mode and adapter.

Each configuration runs in its own subprocess (so peak memory is its own) and does `--warmup`
untimed and `--steps` timed training steps: forward, cross-entropy on random labels, backward and
an Adam step, at the given patch and batch. FLOPs are the forward pass's convolutions, counted by
torch.utils.flop_counter (grouped convolutions by their real kernel size C_in/groups).

    python benchmarks/bench_model.py --patch 64 --batch 2              # CPU, every configuration
    python benchmarks/bench_model.py --patch 128 --device cuda         # GPU

The universal model has the five paper tasks (Heart, Liver, Hippocampus, Prostate, Pancreas) and
trains task 0; the dense reference is the independent model of one task. "plain" runs the network
with PyTorch's own InstanceNorm3d / depthwise conv3d (the original's formulation), "fused" with
this project's fused kernels (models/fused.py; same results, tested); "cl" = channels_last_3d;
"fast" = cl + fused + glibc keeping freed memory in its heap (models/runtime.py, which the training
and prediction scripts switch on for CPU runs; it removes the page-fault and zeroing cost of the
many large short-lived activations); "fast-conv1x1" = fast with PyTorch's own 1×1×1 convolution
instead of the channels-last matrix product of models/pointwise.py.

    python benchmarks/bench_model.py --patch 32 --base 8 --pools 3 --threads 1 --steps 15 --warmup 3 \
        --configs universal-separable/fast-conv1x1 universal-separable/fast shared/fast-conv1x1 shared/fast
                                                                       # the laptop demo's step
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# name: (train_mode, module, channels_last, fused, keep freed memory in the heap, 1×1×1 convs as matmuls)
CONFIGS: dict[str, tuple[str, str | None, bool, bool, bool, bool]] = {
    "independent/plain": ("independent", None, False, False, False, False),
    "independent/fused": ("independent", None, False, True, False, True),
    "independent/fast": ("independent", None, True, True, True, True),
    "shared/fast-conv1x1": ("shared", None, True, True, True, False),
    "shared/fast": ("shared", None, True, True, True, True),
    "universal-series/fast": ("universal", "series_adapter", True, True, True, True),
    "universal-parallel/fast": ("universal", "parallel_adapter", True, True, True, True),
    "universal-separable/plain": ("universal", "separable_adapter", False, False, False, False),
    "universal-separable/cl": ("universal", "separable_adapter", True, False, False, False),
    "universal-separable/fused": ("universal", "separable_adapter", False, True, False, True),
    "universal-separable/cl+fused": ("universal", "separable_adapter", True, True, False, True),
    "universal-separable/fast-conv1x1": ("universal", "separable_adapter", True, True, True, False),
    "universal-separable/fast": ("universal", "separable_adapter", True, True, True, True),
}


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.preset_tasks import FIVE_CLASSES, FIVE_MODALITIES  # noqa: E402
from models import build_model, count_parameters  # noqa: E402
from models.pointwise import PointwiseConv3d  # noqa: E402
from models.runtime import keep_freed_memory_in_heap  # noqa: E402
from utils.io_utils import atomic_write_json  # noqa: E402


def run_one(
    name: str,
    patch: tuple[int, int, int],
    batch: int,
    steps: int,
    warmup: int,
    device: str,
    base: int,
    amp: bool,
    pools: int = 5,
    threads: int | None = None,
) -> dict:
    """Measure one configuration in this process; returns a JSON-able dict."""
    mode, module, channels_last, fused, heap, pointwise_matmul = CONFIGS[name]
    if threads:
        torch.set_num_threads(threads)
    if heap and device == "cpu":
        keep_freed_memory_in_heap()
    torch.manual_seed(1)
    if mode == "independent":
        model = build_model(mode, [1], [2], base_channels=base, pools_per_axis=pools)
    else:
        model = build_model(
            mode, FIVE_MODALITIES, FIVE_CLASSES, module=module, base_channels=base, pools_per_axis=pools
        )
    model.set_fused_ops(fused)
    for m in model.modules():
        if isinstance(m, PointwiseConv3d):  # "-conv1x1": PyTorch's own 1×1×1 convolution
            m.use_fused = fused and pointwise_matmul
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)  # type: ignore[call-overload]  # torch's Module.to stubs lack memory_format
    x = torch.randn(batch, 1, *patch, device=device).contiguous(memory_format=fmt)
    target = torch.randint(0, 2, (batch, *patch), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=5e-4)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, 0)
    # The model's FLOPs are its convolutions'. The fused norms compute their statistics with small
    # matrix products (models/fused.py), which the counter would add; they are reported apart.
    op_counts = counter.get_flop_counts().get("Global", {})
    # 1×1×1 convolutions run as F.linear on channels-last inputs (models/pointwise.py): addmm / mm
    fwd_flops = sum(
        n for op, n in op_counts.items() if any(k in str(op) for k in ("convolution", "addmm", "aten.mm"))
    )
    stats_flops = counter.get_total_flops() - fwd_flops

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            logits = model(x, 0)
        F.cross_entropy(logits.float(), target).backward()
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "name": name,
        "device": device,
        "params": count_parameters(model),
        "fwd_gflop": fwd_flops / 1e9,
        "stats_gflop": stats_flops / 1e9,
        "step_s": statistics.median(times),
        "times": times,
        "peak_mb": peak_mb,
        "amp": amp,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, nargs="+", default=[64], help="patch size: one int (cube) or Z Y X")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--base", type=int, default=16, help="base channels (16 = paper preset)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--pools", type=int, default=5, help="stride-2 poolings per axis (5 = paper preset)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per configuration (default: torch's)"
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=list(CONFIGS),
        metavar="CONFIG",
        help="which configurations (default all): " + ", ".join(CONFIGS),
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    patch = tuple(args.patch * 3 if len(args.patch) == 1 else args.patch)
    if len(patch) != 3:
        p.error("--patch takes one or three ints")

    if args._worker:
        print(
            json.dumps(
                run_one(
                    args._worker,
                    patch,
                    args.batch,
                    args.steps,
                    args.warmup,
                    args.device,
                    args.base,
                    args.amp,
                    pools=args.pools,
                    threads=args.threads,
                )
            )
        )
        return 0

    threads = args.threads or torch.get_num_threads()
    print(
        f"patch {patch}, batch {args.batch}, base {args.base}, device {args.device}"
        f"{' (amp bf16)' if args.amp else ''}, torch {torch.__version__}, {threads} CPU threads, "
        f"{args.steps} timed steps (median)"
    )
    results = []
    header = f"{'configuration':<30} {'params':>12} {'fwd GFLOP':>10} {'step s':>8} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for name in args.configs:
        cmd = (
            [
                sys.executable,
                os.path.abspath(__file__),
                "--_worker",
                name,
                "--patch",
                *map(str, patch),
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--device",
                args.device,
                "--base",
                str(args.base),
                "--pools",
                str(args.pools),
            ]
            + (["--amp"] if args.amp else [])
            + (["--threads", str(args.threads)] if args.threads else [])
        )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(
                f"{name:<30} FAILED: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}"
            )
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(
            f"{name:<30} {r['params']:>12,} {r['fwd_gflop']:>10.1f} {r['step_s']:>8.3f} {r['peak_mb']:>9.0f}"
        )
    by_name = {r["name"]: r for r in results}

    def ratio(a: str, b: str) -> None:
        if a in by_name and b in by_name:
            ra, rb = by_name[a], by_name[b]
            print(
                f"step-time ratio {a} / {b}: {ra['step_s'] / rb['step_s']:.2f}"
                f"   (FLOP ratio {ra['fwd_gflop'] / rb['fwd_gflop']:.3f})"
            )

    print()
    ratio("universal-separable/plain", "independent/plain")
    ratio("universal-separable/cl+fused", "independent/plain")
    ratio("universal-separable/fast", "independent/plain")
    ratio("universal-separable/fast", "independent/fast")
    if args.json:
        atomic_write_json(
            args.json,
            {"patch": patch, "batch": args.batch, "device": args.device, "results": results},
            indent=1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
