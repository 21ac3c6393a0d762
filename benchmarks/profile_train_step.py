"""Profile of the universal training step (issue 11): where the time between the network's own step
and the full training step goes.

Two views of the same step (five-task separable universal model, round robin, batch 2, Lovász-softmax
+ focal loss, Adam; model patch 128³ on a GPU):

1. **Phases**, each followed by a synchronisation so that its time is its own (medians over
   ``--steps``): data (``--loader``: the real loader's ``next``), host-to-device copy, network forward,
   Lovász-softmax forward, focal forward, loss backward (to the logits), network backward, reading
   the loss value, optimiser step; plus the network's forward + backward without deep supervision,
   whose difference to the full one is what deep supervision costs.
2. **torch.profiler** over ``--steps`` unsynchronised calls of the real
   :func:`training.step.train_step` (as training runs them): the named ranges (``step/*``, ``loss/*``)
   and the top operators by self device time (self CPU time on a CPU).

    .venv/bin/python benchmarks/profile_train_step.py                      # GPU, 128³
    .venv/bin/python benchmarks/profile_train_step.py --device cpu --patch 64 --steps 3
    .venv/bin/python benchmarks/profile_train_step.py --smoke              # tiny, CPU, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.preset_tasks import FIVE_TASKS  # noqa: E402
from models import build_model  # noqa: E402
from tests.synthetic import make_synthetic_task  # noqa: E402
from training.data import TaskData, make_epoch_loader  # noqa: E402
from training.losses import SegmentationLoss, focal_loss, lovasz_softmax  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.step import StepOptions, train_step  # noqa: E402
from utils.io_utils import atomic_write_json  # noqa: E402
from utils.preprocessing import list_cases  # noqa: E402

#: (name, modalities, classes, patch) of the five-task preset
PRESET_TASKS = [(t.name, t.modalities, t.classes, t.patch) for t in FIVE_TASKS]
PHASES = [
    "data (loader next)",
    "host-to-device copy",
    "network forward",
    "Lovász-softmax forward",
    "focal forward",
    "loss backward (to the logits)",
    "network backward",
    "loss value read (.item)",
    "optimiser step (Adam)",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--patch", type=int, default=128, help="model patch (cube)")
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="steps per view (round robin over the tasks)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--depthwise_kernel", default="native", choices=["native", "triton"])
    ap.add_argument("--loader", action="store_true", help="time the real loader too (synthetic cases)")
    ap.add_argument("--workers", type=int, default=4, help="with --loader: worker processes per task")
    ap.add_argument("--augment_pipeline", default="two_step", choices=["two_step", "composed"])
    ap.add_argument("--row_limit", type=int, default=25)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.patch, args.base, args.steps, args.warmup = 16, 4, min(args.steps, 2), 1
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    pools = 2 if args.smoke else 5
    patch = (args.patch,) * 3
    amp = torch.bfloat16 if args.amp else None
    mods = [t[1] for t in PRESET_TASKS]
    classes = [t[2] for t in PRESET_TASKS]
    torch.manual_seed(1)
    model = build_model(
        "universal", mods, classes, module="separable_adapter", base_channels=args.base, pools_per_axis=pools
    ).to(device)
    model.set_fused_ops(device.type == "cpu" and amp is None)
    model.set_depthwise_kernel(args.depthwise_kernel)
    no_ds = build_model(
        "universal",
        mods,
        classes,
        module="separable_adapter",
        base_channels=args.base,
        pools_per_axis=pools,
        deep_supervision=False,
    ).to(device)
    no_ds.set_fused_ops(device.type == "cpu" and amp is None)
    no_ds.set_depthwise_kernel(args.depthwise_kernel)
    channels_last = device.type == "cpu"  # as the training scripts (--channels_last auto)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's Module.to stubs lack memory_format
        no_ds.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # as above
    opt = make_optimizer(model.parameters())
    options = StepOptions(device, amp, channels_last)
    loss_fn = SegmentationLoss()
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _, m, c, _ in PRESET_TASKS:
        data = torch.randn(args.batch, m, *patch, generator=gen)
        seg = torch.randint(0, c, (args.batch, 1, *patch), generator=gen).float()
        if device.type == "cuda":
            data, seg = data.pin_memory(), seg.pin_memory()
        batches.append((data, seg))
    tmp = tempfile.TemporaryDirectory(prefix="profile_step_")
    loaders: list[Any] = []
    if args.loader:
        for i, (name, m, c, tp) in enumerate(PRESET_TASKS):
            tp = (8, 16, 16) if args.smoke and m == 2 else ((12, 12, 12) if args.smoke else tp)
            plans, _ = make_synthetic_task(
                Path(tmp.name),
                name,
                num_modalities=m,
                num_classes=c,
                shape=[p + max(8, p // 4) for p in tp],
                patch=tp,
                n_train=2,
                n_val=0,
                seed=i,
            )
            task = TaskData(name, plans, Path(tmp.name) / name, list_cases(Path(tmp.name) / name), [])
            loaders.append(
                make_epoch_loader(
                    task,
                    i,
                    1,
                    batch_size=args.batch,
                    seed=1993,
                    model_patch=patch,
                    num_workers=args.workers,
                    pin_memory=device.type == "cuda",
                    pipeline=args.augment_pipeline,
                )
            )

    def batch_for(k: int) -> tuple[int, torch.Tensor, torch.Tensor, float]:
        t = k % len(PRESET_TASKS)
        if loaders:
            b, dt = _timed(device, lambda: next(loaders[t]))
            return t, b["data"], b["seg"], dt
        return t, batches[t][0], batches[t][1], 0.0

    def measure(k: int) -> tuple[list[float], float, float]:
        """One step in synchronised phases; returns the phase times and the network's forward +
        backward with and without deep supervision."""
        t, data, seg, t_data = batch_for(k)
        (x, y), t_h2d = _timed(device, lambda: (options.to_input(data), seg.to(device, non_blocking=True)))
        opt.zero_grad(set_to_none=False)

        def forward(net: torch.nn.Module) -> torch.Tensor:
            with options.autocast():
                out: torch.Tensor = net(x, t).float()
                return out

        logits, t_fwd = _timed(device, lambda: forward(model))
        lov, t_lov = _timed(device, lambda: lovasz_softmax(torch.softmax(logits, dim=1), y))
        foc, t_foc = _timed(device, lambda: focal_loss(logits, y))
        loss = lov + foc
        (g,), t_lbwd = _timed(device, lambda: torch.autograd.grad(loss, [logits]))
        _, t_nbwd = _timed(device, lambda: logits.backward(g))
        _, t_item = _timed(device, lambda: float(loss.detach()))
        _, t_opt = _timed(device, opt.step)
        # the network alone, with and without deep supervision (forward + backward of a sum)
        _, t_ds = _timed(device, lambda: forward(model).sum().backward())
        _, t_nods = _timed(device, lambda: forward(no_ds).sum().backward())
        return [t_data, t_h2d, t_fwd, t_lov, t_foc, t_lbwd, t_nbwd, t_item, t_opt], t_ds, t_nods

    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    no_ds_times: list[float] = []
    ds_times: list[float] = []
    try:
        for k in range(args.warmup + args.steps):
            times, t_ds, t_nods = measure(k)
            if k >= args.warmup:
                for name, v in zip(PHASES, times, strict=True):
                    phases[name].append(v)
                ds_times.append(t_ds)
                no_ds_times.append(t_nods)
        med = {p: statistics.median(v) for p, v in phases.items()}
        total = sum(med.values())
        ds_cost = statistics.median(ds_times) - statistics.median(no_ds_times)
        print(
            f"device {device} ({torch.get_num_threads()} threads), model patch {patch}, batch {args.batch}, "
            f"base {args.base}, amp {args.amp}, depthwise {args.depthwise_kernel}, channels_last {channels_last}, "
            f"loader {args.loader}, torch {torch.__version__}"
        )
        lines = ["| phase (synchronised) | median (s) | share |", "|---|---|---|"]
        for p in PHASES:
            lines.append(f"| {p} | {med[p]:.4f} | {100 * med[p] / total:.1f} % |")
        lines.append(f"| **total** | **{total:.4f}** | 100 % |")
        lines.append(
            f"| of which deep supervision (network fwd+bwd with minus without) | {ds_cost:.4f} | "
            f"{100 * ds_cost / total:.1f} % |"
        )
        table = "\n".join(lines)
        print(table, flush=True)

        # 2. the real train_step, unsynchronised, under torch.profiler
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for k in range(args.steps):
                t, data, seg, _ = batch_for(k)
                train_step(model, opt, loss_fn, data, seg, t, options)
            _sync(device)
            loop = time.perf_counter() - t0
        print(f"\n{args.steps} train_step calls under the profiler: {loop / args.steps:.4f} s per step")
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        events = prof.key_averages()
        named = [e for e in events if e.key.startswith(("step/", "loss/"))]
        print(
            "\nnamed ranges (CPU total = time the host spent inside; on a GPU mostly launch time and waits):"
        )
        for e in sorted(named, key=lambda e: e.key):
            dev = getattr(e, "device_time_total", 0.0) if device.type == "cuda" else 0.0
            print(
                f"  {e.key:28s} CPU {e.cpu_time_total / 1e3 / args.steps:9.2f} ms/step"
                + (f"   device {dev / 1e3 / args.steps:9.2f} ms/step" if device.type == "cuda" else "")
            )
        top = events.table(sort_by=sort, row_limit=args.row_limit)
        print(top)
        if device.type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
        if args.json:
            atomic_write_json(
                args.json,
                {
                    "device": str(device),
                    "patch": patch,
                    "phases_median_s": med,
                    "total_s": total,
                    "deep_supervision_s": ds_cost,
                    "train_step_s": loop / args.steps,
                    "phase_table": table,
                    "profiler_table": top,
                },
            )
    finally:
        for ld in loaders:
            ld.close()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
