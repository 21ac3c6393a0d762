"""Benchmark: training steps of the paper preset on a GPU (fp32 and AMP), with the real data loader.

Runs ``--steps`` (20) timed training steps, after ``--warmup`` (3) untimed ones, of

* the universal five-task model (separable adapters; Heart, Liver, Hippocampus, Prostate, Pancreas
  settings: modalities, classes, task patches), model patch 128³, batch 2, base 16, round robin,
  every task patch resized to 128³ by the loader: in fp32 (the preset) and with ``--amp``;
* the dense independent model (1 modality, 2 classes, pools 5,5,5) at the same 128³ patch, batch 2;

and prints, per configuration, the median step time (loader included), the median time of the
same step on a batch already on the GPU (compute only), the peak GPU memory, and whether the data
loader kept up (time spent waiting for batches below 10% of the loop time).

Data: synthetic preprocessed cases (``tests.synthetic``) written to a temporary folder, so the
script runs on a bare GPU machine with only the project's requirements::

    .venv/bin/python benchmarks/bench_train_gpu.py                  # on the GPU machine
    .venv/bin/python benchmarks/bench_train_gpu.py --smoke          # tiny, CPU, a few seconds
    .venv/bin/python benchmarks/bench_train_gpu.py --workers 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.preset_tasks import FIVE_TASKS  # noqa: E402
from models import U2Net3D, build_model  # noqa: E402
from tests.synthetic import make_synthetic_task  # noqa: E402
from training.data import TaskData, make_epoch_loader, scan_cases  # noqa: E402
from training.losses import SegmentationLoss  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.step import StepOptions, train_step  # noqa: E402
from utils.io_utils import atomic_write_json  # noqa: E402
from utils.preprocessing import list_cases  # noqa: E402

#: the configurations and the switches that may follow them (``universal_fp32+gpuaug+triton``)
BASE_CONFIGS = ("universal_fp32", "universal_amp", "independent_fp32", "independent_amp")
CONFIG_EXTRAS = ("composed", "gpuaug", "triton", "compile")
#: (name, modalities, classes, patch, pools) of the five-task preset
PRESET_TASKS = [(t.name, t.modalities, t.classes, t.patch, t.pools) for t in FIVE_TASKS]


def make_tasks(root: Path, *, smoke: bool, cases: int) -> list[TaskData]:
    """Synthetic preprocessed tasks: volumes a bit larger than the task patch."""
    tasks = []
    for i, (name, mods, classes, patch, pools) in enumerate(PRESET_TASKS):
        if smoke:
            patch, pools = (8, 16, 16) if mods == 2 else (16, 16, 16), (2, 2, 2)
        shape = [p + max(8, p // 4) for p in patch]
        plans, _ = make_synthetic_task(
            root,
            name,
            num_modalities=mods,
            num_classes=classes,
            shape=shape,
            patch=patch,
            pools=pools,
            n_train=cases,
            n_val=0,
            seed=i,
        )
        tasks.append(TaskData(name, plans, root / name, list_cases(root / name), []))
    return tasks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(
    label: str,
    model: U2Net3D,
    tasks: list[TaskData],
    *,
    model_patch: tuple[int, int, int] | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    batch: int,
    steps: int,
    warmup: int,
    workers: int,
    channels_last: bool,
    pipeline: str = "two_step",
    augment_on_device: bool = False,
    depthwise_kernel: str = "native",
    compile_backend: str | None = None,
) -> dict[str, Any]:
    model.set_depthwise_kernel(depthwise_kernel)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's Module.to stubs lack memory_format
    model.set_fused_ops(device.type == "cpu" and amp_dtype is None)
    model.train()
    opt = make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    loss_fn = SegmentationLoss()
    options = StepOptions(device, amp_dtype, channels_last, compile_backend=compile_backend)
    for t in tasks:
        scan_cases(t)
    loaders = [
        make_epoch_loader(
            t,
            i,
            1,
            batch_size=batch,
            seed=1993,
            model_patch=model_patch,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            pipeline=pipeline,
            augment_device=device if augment_on_device else None,
        )
        for i, t in enumerate(tasks)
    ]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step_times, waits, compute = [], [], []
    last_batch: dict[int, dict[str, Any]] = {}
    try:
        t_loop = None
        for k in range(warmup + steps):
            if k == warmup:
                sync(device)
                t_loop = time.perf_counter()
            t_idx = k % len(tasks)
            t0 = time.perf_counter()
            b = next(loaders[t_idx])
            t1 = time.perf_counter()
            train_step(model, opt, loss_fn, b["data"], b["seg"], t_idx, options, scaler=scaler)
            sync(device)
            t2 = time.perf_counter()
            last_batch[t_idx] = b
            if k >= warmup:
                waits.append(t1 - t0)
                step_times.append(t2 - t0)
        assert t_loop is not None
        loop_time = time.perf_counter() - t_loop
        # compute only: the same steps on batches already on the device
        gpu_batches = {i: (options.to_input(b["data"]), b["seg"].to(device)) for i, b in last_batch.items()}
        for k in range(steps):
            t_idx = k % len(tasks)
            x, y = gpu_batches[t_idx]
            t0 = time.perf_counter()
            train_step(model, opt, loss_fn, x, y, t_idx, options, scaler=scaler)
            sync(device)
            compute.append(time.perf_counter() - t0)
    finally:
        for ld in loaders:
            ld.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    wait_frac = sum(waits) / loop_time
    res = {
        "config": label,
        "median_step_s": statistics.median(step_times),
        "median_compute_step_s": statistics.median(compute),
        "median_data_wait_s": statistics.median(waits),
        "data_wait_fraction": wait_frac,
        "loader_kept_up": wait_frac < 0.10,
        "peak_gpu_mem_gib": peak,
        "params": sum(p.numel() for p in model.parameters()),
    }
    model.to("cpu")
    del opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes (patch 16³, base 4) for a CPU check of the script"
    )
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (cudnn autotuning, worker start)"
    )
    ap.add_argument("--workers", type=int, default=3, help="loader worker processes per task")
    ap.add_argument("--cases", type=int, default=2, help="synthetic training cases per task")
    ap.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "fp16"],
        help="AMP dtype of the --amp runs (auto: bf16 where supported, else fp16)",
    )
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["universal_fp32", "universal_amp", "independent_fp32"],
        metavar="CONFIG",
        help="which configurations to run: universal_fp32, universal_amp, independent_fp32 or "
        "independent_amp, each optionally followed by +composed (--augment_pipeline composed), +gpuaug "
        "(--augment_device: images resampled on the device), +triton (Triton depthwise kernels), +compile "
        "(torch.compile), e.g. universal_fp32+gpuaug+triton",
    )
    ap.add_argument("--channels_last", action="store_true", help="channels_last_3d on the GPU too")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            ap.error("CUDA is not available (use --smoke for a CPU check)")
        torch.backends.cudnn.benchmark = True
    if args.amp == "auto":
        amp = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    steps, warmup = (3, 1) if args.smoke and args.steps == 20 else (args.steps, args.warmup)
    base = 4 if args.smoke else 16
    model_patch = (16, 16, 16) if args.smoke else (128, 128, 128)
    pools = (2, 2, 2) if args.smoke else (5, 5, 5)
    channels_last = args.channels_last or device.type == "cpu"
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": steps,
        "warmup": warmup,
        "workers_per_task": args.workers,
        "amp_dtype": str(amp).replace("torch.", ""),
        "model_patch": model_patch,
        "base": base,
        "batch": 2,
    }
    print(json.dumps(info), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        t0 = time.perf_counter()
        tasks = make_tasks(Path(tmp), smoke=args.smoke, cases=args.cases)
        print(f"synthetic data: {time.perf_counter() - t0:.1f}s", flush=True)
        liver = [t for t in tasks if t.name == "Task03_Liver"]
        liver[0].plans["patch_size"] = list(
            model_patch
        )  # the dense model at the same patch as the universal one
        for cfg in args.configs:
            base_cfg, *extras = cfg.split("+")
            if base_cfg not in BASE_CONFIGS or not set(extras) <= set(CONFIG_EXTRAS):
                ap.error(f"unknown configuration {cfg!r} (see --help)")
            kind, prec = base_cfg.split("_")
            if "triton" in extras and device.type != "cuda":
                print(f"{cfg:18s} skipped (the Triton kernels need CUDA)", flush=True)
                continue
            torch.manual_seed(1)
            if kind == "universal":
                model = build_model(
                    "universal",
                    [t.num_modalities for t in tasks],
                    [t.num_classes for t in tasks],
                    module="separable_adapter",
                    base_channels=base,
                    pools_per_axis=pools,
                )
                cfg_tasks, mp = tasks, model_patch
            else:
                model = build_model("independent", [1], [2], base_channels=base, pools_per_axis=pools)
                cfg_tasks, mp = liver, None
            res = run_config(
                cfg,
                model,
                cfg_tasks,
                model_patch=mp,
                device=device,
                amp_dtype=amp if prec == "amp" else None,
                batch=2,
                steps=steps,
                warmup=warmup,
                workers=args.workers,
                channels_last=channels_last,
                pipeline="composed" if "composed" in extras else "two_step",
                augment_on_device="gpuaug" in extras,
                depthwise_kernel="triton" if "triton" in extras else "native",
                compile_backend="inductor" if "compile" in extras else None,
            )
            results.append(res)
            print(
                f"{cfg:18s} median step {res['median_step_s']:.3f}s (compute only {res['median_compute_step_s']:.3f}s), "
                f"data wait {100 * res['data_wait_fraction']:.0f}% -> loader {'kept up' if res['loader_kept_up'] else 'did NOT keep up'}, "
                f"peak GPU memory {res['peak_gpu_mem_gib']:.2f} GiB, {res['params']:,} parameters",
                flush=True,
            )
            del model
    if args.json:
        atomic_write_json(args.json, {"info": info, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
