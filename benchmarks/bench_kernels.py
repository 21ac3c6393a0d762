"""Benchmark (issue 11): the model-only training step and the depthwise kernels, plain vs new.

1. Depthwise conv3d layers at the preset's shapes (batch 2; 16 channels at 128³ down to 256 at 8³):
   forward + backward time of PyTorch's native kernels and of the Triton kernels
   (``models/triton_depthwise.py``), and the Triton results' largest difference to native (forward,
   input, weight and bias gradients) in float32.
2. Model-only step (forward, cross-entropy, backward, Adam), 128³, batch 2, base 16, median of
   ``--steps``: dense independent model vs the five-task separable universal model (task 0), fp32 vs
   bf16 autocast, native vs Triton depthwise kernels, eager vs ``torch.compile`` (inductor; compile
   time reported), with the peak GPU memory; and the compiled model's largest output difference to
   the eager one.

Triton rows need CUDA (skipped on a CPU). Each configuration runs in this process, one after another.

    .venv/bin/python benchmarks/bench_kernels.py                   # GPU
    .venv/bin/python benchmarks/bench_kernels.py --smoke           # tiny, CPU, seconds
    .venv/bin/python benchmarks/bench_kernels.py --device cpu --patch 32 --pools 3 --configs separable_fp32 separable_compiled
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.preset_tasks import FIVE_CLASSES, FIVE_MODALITIES  # noqa: E402
from models import build_model  # noqa: E402
from models.runtime import compiled  # noqa: E402
from models.triton_depthwise import depthwise_conv3d_triton, triton_available  # noqa: E402
from utils.io_utils import atomic_write_json  # noqa: E402

#: name: (mode, amp, depthwise kernel, compile)
CONFIGS: dict[str, tuple[str, bool, str, bool]] = {
    "dense_fp32": ("independent", False, "native", False),
    "dense_bf16": ("independent", True, "native", False),
    "separable_fp32": ("universal", False, "native", False),
    "separable_fp32_triton": ("universal", False, "triton", False),
    "separable_bf16": ("universal", True, "native", False),
    "separable_bf16_triton": ("universal", True, "triton", False),
    "separable_compiled": ("universal", False, "native", True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layer(
    device: torch.device, channels: int, size: int, steps: int, gen: torch.Generator
) -> dict[str, Any]:
    """One depthwise layer (batch 2, ``channels`` at ``size``³): time of forward + backward per kernel."""
    x = torch.randn(2, channels, size, size, size, device=device, generator=gen, requires_grad=True)
    w = torch.randn(channels, 1, 3, 3, 3, device=device, generator=gen, requires_grad=True)
    b = torch.randn(channels, device=device, generator=gen, requires_grad=True)
    g = torch.randn(2, channels, size, size, size, device=device, generator=gen)
    row: dict[str, Any] = {"channels": channels, "size": size}
    kernels: dict[str, Any] = {"native": lambda: F.conv3d(x, w, b, padding=1, groups=channels)}
    if device.type == "cuda" and triton_available():
        kernels["triton"] = lambda: depthwise_conv3d_triton(x, w, b)
    results: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, fn in kernels.items():
        times = []
        for k in range(steps + 2):
            _sync(device)
            t0 = time.perf_counter()
            y = fn()
            grads = torch.autograd.grad(y, (x, w, b), g)
            _sync(device)
            if k >= 2:
                times.append(time.perf_counter() - t0)
        results[name] = (y.detach(), *grads)
        row[f"{name}_ms"] = 1e3 * statistics.median(times)
    if "triton" in results:
        pairs = zip(results["triton"], results["native"], strict=True)
        row["triton_max_err"] = [float((a - r).abs().max()) for a, r in pairs]
    return row


def bench_layers(device: torch.device, patch: int, steps: int) -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    size, channels = patch, 16
    while size >= 4:
        rows.append(_layer(device, channels, size, steps, gen))
        size //= 2
        channels *= 2
    return rows


def bench_model(
    name: str, device: torch.device, patch: int, base: int, pools: int, steps: int, warmup: int
) -> dict[str, Any]:
    mode, amp, kernel, comp = CONFIGS[name]
    torch.manual_seed(1)
    if mode == "independent":
        model = build_model(mode, [1], [2], base_channels=base, pools_per_axis=pools)
    else:
        model = build_model(
            mode,
            FIVE_MODALITIES,
            FIVE_CLASSES,
            module="separable_adapter",
            base_channels=base,
            pools_per_axis=pools,
        )
    model.set_fused_ops(False)  # the GPU's plain formulation (the fused ops are a CPU optimisation)
    model.set_depthwise_kernel(kernel)
    model.to(device)
    net = compiled(model) if comp else model
    x = torch.randn(2, 1, patch, patch, patch, device=device)
    target = torch.randint(0, 2, (2, patch, patch, patch), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=5e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x, 0)
        F.cross_entropy(logits.float(), target).backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    res: dict[str, Any] = {
        "config": name,
        "step_s": statistics.median(times),
        "first_step_s": first,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else float("nan"),
    }
    if comp:  # the compiled network's outputs against the eager network's (same weights)
        with torch.no_grad():
            res["compiled_max_abs_diff"] = float((net(x, 0) - model(x, 0)).abs().max())
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--pools", type=int, default=5, help="stride-2 poolings per axis (5 = the preset)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--no_layers", action="store_true", help="skip the per-layer depthwise timings")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (compile skipped)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    pools = args.pools
    if args.smoke:
        args.patch, args.base, args.steps, args.warmup, pools = 16, 4, 2, 1, 2
        args.configs = [c for c in args.configs if not CONFIGS[c][3]]
    layers = [] if args.no_layers else bench_layers(device, args.patch, max(3, args.steps // 4))
    for r in layers:
        tri = (
            f"{r['triton_ms']:8.2f} ms  max err {max(r['triton_max_err']):.2e}"
            if "triton_ms" in r
            else "     –"
        )
        print(
            f"depthwise {r['channels']:4d} ch at {r['size']:3d}³: native {r['native_ms']:8.2f} ms   triton {tri}",
            flush=True,
        )
    results = []
    for name in args.configs:
        if CONFIGS[name][2] == "triton" and (device.type != "cuda" or not triton_available()):
            print(f"{name:24s} skipped (Triton kernels need CUDA and the triton package)")
            continue
        r = bench_model(name, device, args.patch, args.base, pools, args.steps, args.warmup)
        results.append(r)
        extra = (
            f", compiled vs eager max |diff| {r['compiled_max_abs_diff']:.2e}"
            if "compiled_max_abs_diff" in r
            else ""
        )
        print(
            f"{name:24s} step {r['step_s']:.4f} s (first {r['first_step_s']:.1f} s), peak {r['peak_gib']:.2f} GiB{extra}",
            flush=True,
        )
    if args.json:
        atomic_write_json(
            args.json, {"device": str(device), "patch": args.patch, "layers": layers, "models": results}
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
