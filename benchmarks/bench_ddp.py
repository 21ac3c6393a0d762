"""Benchmark: data-parallel training steps under torchrun (gloo on the CPU, nccl on GPUs).

Times ``--steps`` training steps (after ``--warmup``) of the universal model (separable adapters,
round robin over three tasks: 1 modality / 2 classes, 2 / 3, 1 / 2), on batches already in memory
(no loader: the step and its communication only), in these configurations:

* ``plain``      -- one process without torchrun: the single-process path of the training loop;
* ``own``        -- N processes under torchrun with the project's design: the loss of the global
  batch (:class:`training.distributed.GlobalBatchLoss`, an all-gather of probabilities and labels)
  and the sum of the task's gradients (:class:`training.distributed.GradientSync`);
* ``own_local``  -- the same gradient sum with each process's own loss (not the global batch's):
  what the global Lovász-softmax costs;
* ``ddp``        -- ``torch.nn.parallel.DistributedDataParallel(find_unused_parameters=True)`` with each
  process's own loss (gradients averaged): the stock way, for comparison.

Prints, per configuration and number of processes, the median step time, steps per second and
global samples per second (steps/s × batch per process × processes); ``--repeat N`` runs N rounds
over the configurations and keeps the fastest of each (for a machine that other jobs share);
``--json`` saves them::

    python benchmarks/bench_ddp.py                             # CPU: plain, own/ddp × 1 and 2 processes
    python benchmarks/bench_ddp.py --device cuda --procs 1     # GPU: DDP overhead at world size 1
    python benchmarks/bench_ddp.py --loss_scaling 1 2 4 8 16   # the global loss's cost as W grows
    python benchmarks/bench_ddp.py --smoke                     # tiny, a few seconds

On the CPU every process runs ``--threads`` (1) threads; the model is the demo's size (base 8,
32³ model patch, 3 pools) unless ``--base``, ``--patch``, ``--pools`` say otherwise; on a GPU the
default is the paper preset's (base 16, 128³, 5 pools, batch 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models import build_model  # noqa: E402
from training.distributed import GlobalBatchLoss, GradientSync, init_from_env, lovasz_share  # noqa: E402
from training.losses import SegmentationLoss  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.step import StepOptions, train_step  # noqa: E402

#: the benchmark's tasks: (modalities, classes)
TASKS = [(1, 2), (2, 3), (1, 2)]
CONFIGS = ("plain", "own", "own_local", "ddp")


def worker(args: argparse.Namespace) -> None:
    """One process of a configuration (under torchrun unless ``plain``): time the steps, rank 0
    writes ``--out``."""
    torch.set_num_threads(args.threads)
    ctx = init_from_env(args.device, timeout_s=600)
    device = ctx.device
    torch.manual_seed(1)
    model = build_model(
        "universal",
        [m for m, _ in TASKS],
        [c for _, c in TASKS],
        base_channels=args.base,
        pools_per_axis=(args.pools,) * 3,
    )
    channels_last = device.type == "cpu"
    model.set_fused_ops(device.type == "cpu")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's Module.to stubs lack memory_format
    model.train()
    ctx.broadcast_parameters(model)
    tasks = list(range(len(TASKS)))
    loss = SegmentationLoss()
    net: torch.nn.Module = model
    loss_fn: Any = loss
    sync = None
    if args.config in ("own", "own_local") and ctx.distributed:
        sync = GradientSync(ctx, model, tasks)
        if args.config == "own":
            loss_fn = GlobalBatchLoss(loss, ctx)
        else:
            loss_fn = lambda logits, target: loss(logits, target) / ctx.world_size  # noqa: E731
    elif args.config == "ddp" and ctx.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    optimizer = make_optimizer(model.parameters())
    options = StepOptions(device, None, channels_last)
    gen = torch.Generator().manual_seed(100 + ctx.rank)
    patch = (args.patch,) * 3
    batches = []
    for m, c in TASKS:
        label = torch.randint(0, c, (args.batch, 1, *patch), generator=gen).float()
        batches.append((torch.randn(args.batch, m, *patch, generator=gen), label))
    times = []
    for k in range(args.warmup + args.steps):
        t = k % len(TASKS)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(net, optimizer, loss_fn, *batches[t], t, options, sync=sync)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    mean_over_ranks = (
        float(ctx.all_reduce_sum(torch.tensor([median], dtype=torch.float64, device=device))[0])
        / ctx.world_size
    )
    if ctx.is_main:
        Path(args.out).write_text(
            json.dumps(
                {"median_step_s": median, "mean_over_ranks_s": mean_over_ranks, "world_size": ctx.world_size}
            )
        )
    ctx.close()


def loss_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """What the loss of the global batch costs each process as the job grows: the Lovász share
    (:func:`training.distributed.lovasz_share`, forward and backward) with W simulated processes
    (copies of this batch as the others'), 3 classes, one process; time and peak GPU memory."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    gen = torch.Generator(device=device).manual_seed(0)
    patch = (args.patch,) * 3
    logits = torch.randn(args.batch, 3, *patch, device=device, generator=gen, requires_grad=True)
    target = torch.randint(0, 3, (args.batch, 1, *patch), device=device, generator=gen).to(torch.uint8)
    out = []
    for world in args.loss_scaling:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times = []
        for k in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            probas = torch.softmax(logits, dim=1)
            share = lovasz_share(probas, [probas.detach()] * world, [target] * world, 0)
            share.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if k >= args.warmup:
                times.append(time.perf_counter() - t0)
        res: dict[str, Any] = {"world_size": world, "median_s": statistics.median(times)}
        if device.type == "cuda":
            res["peak_extra_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        out.append(res)
        mem = f", peak {res['peak_extra_gib']:.2f} GiB" if "peak_extra_gib" in res else ""
        print(
            f"Lovász share, {world:>3} processes x batch {args.batch}: {res['median_s'] * 1e3:.1f} ms{mem}",
            flush=True,
        )
    return out


def launch(args: argparse.Namespace, config: str, procs: int, out: Path) -> dict[str, Any]:
    """Run one configuration in fresh processes; returns its figures."""
    common = [
        "--worker",
        "--config",
        config,
        "--out",
        str(out),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--base",
        str(args.base),
        "--patch",
        str(args.patch),
        "--pools",
        str(args.pools),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    script = str(Path(__file__).resolve())
    if config == "plain":
        cmd = [sys.executable, script, *common]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            script,
            *common,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{config} x {procs} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    figures = json.loads(out.read_text())
    step = float(figures["median_step_s"])
    return {
        "config": config,
        "processes": procs,
        "median_step_s": step,
        "steps_per_s": 1.0 / step,
        "samples_per_s": args.batch * procs / step,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="processes per torchrun run")
    ap.add_argument("--configs", nargs="+", default=["plain", "own", "ddp"], choices=CONFIGS)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--base", type=int, default=None, help="base channels (CPU 8, GPU 16)")
    ap.add_argument("--patch", type=int, default=None, help="model patch edge (CPU 32, GPU 128)")
    ap.add_argument("--pools", type=int, default=None, help="pools per axis (CPU 3, GPU 5)")
    ap.add_argument("--batch", type=int, default=None, help="batch per process (CPU 1, GPU 2)")
    ap.add_argument("--smoke", action="store_true", help="tiny: base 4, patch 8, 2 pools, 2 steps")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument(
        "--repeat", type=int, default=1, help="rounds over the configurations; the fastest of each counts"
    )
    ap.add_argument(
        "--loss_scaling",
        type=int,
        nargs="+",
        default=None,
        metavar="W",
        help="instead: time the loss of the global batch for W simulated processes (one process, no torchrun)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="plain", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.smoke:
        args.base, args.patch, args.pools, args.steps, args.warmup = 4, 8, 2, 2, 1
    args.base = args.base or (16 if gpu else 8)
    args.patch = args.patch or (128 if gpu else 32)
    args.pools = args.pools or (5 if gpu else 3)
    args.batch = args.batch or (2 if gpu else 1)
    setup = {k: getattr(args, k) for k in ("device", "base", "patch", "pools", "batch", "steps", "threads")}
    if args.worker:
        worker(args)
        return 0
    if args.loss_scaling:
        scaling = loss_scaling(args)
        if args.json:
            Path(args.json).write_text(json.dumps({"setup": setup, "loss_scaling": scaling}, indent=1))
        return 0
    runs = [(c, n) for c in args.configs for n in ([1] if c == "plain" else args.procs)]
    best: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):  # rounds over all configurations; the fastest round counts
            for config, procs in runs:
                res = launch(args, config, procs, Path(tmp) / f"{config}_{procs}.json")
                print(
                    f"{config:>10} x {procs}: median step {res['median_step_s']:.4f} s, {res['steps_per_s']:.2f} "
                    f"steps/s, {res['samples_per_s']:.2f} samples/s"
                    + (f" (round {rep + 1})" if args.repeat > 1 else ""),
                    flush=True,
                )
                key = (config, procs)
                if key not in best or res["median_step_s"] < best[key]["median_step_s"]:
                    best[key] = {
                        **res,
                        "rounds": best.get(key, {}).get("rounds", []) + [res["median_step_s"]],
                    }
                else:
                    best[key]["rounds"].append(res["median_step_s"])
    results = [best[k] for k in runs]
    if args.repeat > 1:
        print("fastest round of each:")
        for res in results:
            print(
                f"{res['config']:>10} x {res['processes']}: median step {res['median_step_s']:.4f} s, "
                f"{res['steps_per_s']:.2f} steps/s, {res['samples_per_s']:.2f} samples/s",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": setup, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
