"""Benchmark: our sliding-window inference vs MONAI's ``sliding_window_inference``.

Same model, same volume (1 x 1 x 128 x 160 x 160), patch 64³, overlap 0.5 (step of half a
patch), same number of windows per forward pass. Prints both times and the ratio ours / MONAI,
then the peak memory of segmenting a 512 x 512 x 400 volume with our accumulator (measured in a
fresh subprocess with ``resource.getrusage``).

MONAI is a benchmark-only dependency (not in requirements.txt):
``.venv/bin/pip install --no-deps monai==1.5.1``.

    .venv/bin/python benchmarks/bench_inference.py                 # DynUNet, as the issue's figure
    .venv/bin/python benchmarks/bench_inference.py --model u2net   # our dense U-Net (base 16, pools 5,5,5)
    .venv/bin/python benchmarks/bench_inference.py --model universal --skip-memory --volume-mode
        # our universal separable model; --paths fp32 auto bf16 onnxruntime picks our paths
    .venv/bin/python benchmarks/bench_inference.py --skip-speed    # memory only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from inference.backends import (  # noqa: E402
    OnnxRuntimeNetwork,
    choose_runtime,
    native_bf16,
    onnxruntime_faster,
)
from inference.settings import InferenceSettings  # noqa: E402
from inference.sliding_window import sliding_window  # noqa: E402
from models import build_model  # noqa: E402
from models.runtime import amp_dtype, autocast  # noqa: E402
from models.unet import U2Net3D  # noqa: E402


def make_model(name: str, base: int) -> tuple[torch.nn.Module, Callable[[torch.Tensor, int], torch.Tensor]]:
    """The benchmark model and a ``f(x, task_idx)`` predictor around it."""
    if name == "dynunet":
        from monai.networks.nets import DynUNet  # optional dependency, only for this comparison

        net = DynUNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            kernel_size=[3, 3, 3, 3, 3],
            strides=[1, 2, 2, 2, 2],
            upsample_kernel_size=[2, 2, 2, 2],
            filters=[base, 2 * base, 4 * base, 8 * base, 16 * base],
            norm_name="instance",
            res_block=True,
        )
        net.eval()
        return net, lambda x, t: net(x)
    if name in ("u2net", "universal"):
        ours: U2Net3D
        if name == "u2net":  # the dense U-Net (independent mode)
            ours = build_model("independent", [1], [2], base_channels=base, pools_per_axis=(5, 5, 5))
        else:  # the universal separable model, five domains (the paper's), task 0 segmented
            ours = build_model(
                "universal", [1, 1, 1, 2, 1], [2, 3, 3, 3, 3], module="separable_adapter", base_channels=base,
                pools_per_axis=(5, 5, 5),
            )  # fmt: skip
        ours.eval()
        return ours, lambda x, t: ours(x, t)
    raise ValueError(name)


def path_network(
    args: argparse.Namespace,
    net: torch.nn.Module,
    predictor: Callable[[torch.Tensor, int], torch.Tensor],
    path: str,
) -> tuple[Callable[[torch.Tensor, int], torch.Tensor], InferenceSettings, str]:
    """Network function, settings and a label for one of our paths: ``fp32`` (PyTorch), ``auto``
    (what ``predict.py --precision auto --backend auto`` picks here), ``bf16`` or ``onnxruntime``."""
    dev = torch.device(args.device)
    if path == "auto":
        cfg = net.config if isinstance(net, U2Net3D) else None
        faster = cfg is not None and onnxruntime_faster(cfg.train_mode, cfg.module, cfg.base_channels)
        choice = choose_runtime("auto", "auto", dev, ort_faster=faster)
    elif path == "bf16":
        choice = choose_runtime("bf16", "torch", dev)
    elif path == "onnxruntime":
        choice = choose_runtime("fp32", "onnxruntime", dev)
    else:
        choice = choose_runtime("fp32", "torch", dev)
    label = f"{path} = {choice.backend} {choice.precision}"
    if choice.precision == "bf16" and not native_bf16(dev):
        label += " (EMULATED: no native bf16 here)"
    settings = InferenceSettings(
        batch_size=args.batch_size, device=str(dev), accum_device=args.accum_device, amp=choice.amp
    )
    if choice.backend == "onnxruntime":
        if not isinstance(net, U2Net3D):
            raise SystemExit("the onnxruntime path needs one of our models (--model u2net or universal)")
        return OnnxRuntimeNetwork(net, 0), settings, label
    return predictor, settings, label


def speed(args: argparse.Namespace) -> None:
    from monai.inferers import sliding_window_inference  # optional dependency, only for this comparison

    torch.manual_seed(0)
    dev = torch.device(args.device)
    net, predictor = make_model(args.model, args.base)
    net.to(dev)
    vol_dev = torch.randn(1, 1, 128, 160, 160).to(dev)
    patch = (64, 64, 64)

    monai_net = net if args.model == "dynunet" else (lambda x: net(x, 0))

    def ours_fn(path: str) -> tuple[Callable[[], np.ndarray], str]:
        fn, settings, label = path_network(args, net, predictor, path)

        def run() -> np.ndarray:  # the same input as MONAI's: the volume already on the device
            return sliding_window(fn, vol_dev[0], 0, patch, settings)

        return run, label

    def monai() -> np.ndarray:
        with torch.inference_mode(), torch.autocast(dev.type, enabled=args.amp):
            logits = sliding_window_inference(  # one tensor in, one tensor out
                vol_dev, patch, args.batch_size, monai_net, overlap=0.5, mode=args.monai_mode
            )
            assert isinstance(logits, torch.Tensor)
            return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()

    runs: dict[str, tuple[Callable[[], np.ndarray], str]] = {p: ours_fn(p) for p in args.paths}
    runs["MONAI"] = (monai, f"MONAI sliding_window_inference, {'autocast' if args.amp else 'fp32'}")
    # warm-up of every path, and its labels: agreement with our fp32 labels (random weights: ties
    # broken by rounding), and between our fp32 and MONAI (different blending)
    labels = {name: fn() for name, (fn, _) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits all alike
        for name, (fn, _) in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(
        f"model={args.model} base={args.base} device={dev} threads={torch.get_num_threads()} amp={args.amp} "
        f"volume=1x1x128x160x160 patch=64^3 overlap=0.5 batch={args.batch_size} monai_mode={args.monai_mode} "
        f"our accumulator on {args.accum_device}; median of {args.repeats} interleaved runs after a warm-up"
    )
    ref = labels.get("fp32")
    med = {name: float(np.median(t)) for name, t in times.items()}
    for name, (_, label) in runs.items():
        agree = (
            f"  labels = ours fp32 on {float((labels[name] == ref).mean()) * 100:.3f} % of voxels"
            if ref is not None
            else ""
        )
        print(f"{label:52s}: median {med[name]:6.2f} s  runs {[round(t, 2) for t in times[name]]}{agree}")
    for name in args.paths:
        print(f"ratio ours {name} / MONAI = {med[name] / med['MONAI']:.3f}")


def volume_mode(args: argparse.Namespace) -> None:
    """The universal model's volume mode: one forward pass of a whole 128³ case, per path."""
    torch.manual_seed(0)
    net, predictor = make_model("universal", args.base)
    x = torch.randn(1, 1, 128, 128, 128)
    outs: dict[str, torch.Tensor] = {}
    print(f"universal separable model (base {args.base}, pools 5,5,5): one 1x1x128^3 forward pass per path")
    for path in args.paths:
        fn, settings, label = path_network(args, net, predictor, path)
        dtype = amp_dtype(settings.amp, torch.device(args.device))
        times = []
        for _ in range(1 + args.repeats):
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast(torch.device(args.device), dtype):
                out = fn(x, 0)
            times.append(time.perf_counter() - t0)
        outs[path] = out.float().argmax(1)
        agree = float((outs[path] == outs[args.paths[0]]).float().mean()) * 100
        print(
            f"{label:52s}: median {float(np.median(times[1:])):6.2f} s (first {times[0]:.2f} s)  "
            f"labels = {args.paths[0]} on {agree:.3f} %"
        )


def memory_child(
    shape: tuple[int, int, int], patch: int, accum: str, device: str, model: str, base: int
) -> None:
    """Runs in a fresh process: segment a large volume, print peak CPU RSS (and GPU memory)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    if model == "pointwise":
        # a 1x1x1 "conv" written as a broadcast (torch's CPU Conv3d allocates ~0.5 GiB of scratch
        # for 2 x 128^3 windows, which would hide what the accumulator costs)
        w = torch.tensor([1.0, -1.0], device=dev).view(1, 2, 1, 1, 1)
        b = torch.tensor([0.0, 0.1], device=dev).view(1, 2, 1, 1, 1)

        def pointwise(x: torch.Tensor, t: int) -> torch.Tensor:
            return x * w + b

        predictor: Callable[[torch.Tensor, int], torch.Tensor] = pointwise
    else:
        net, predictor = make_model(model, base)
        net.to(dev)
    image = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    settings = InferenceSettings(
        batch_size=2, device=str(dev), accum_dtype="float16" if accum == "float16" else "float32"
    )
    label = sliding_window(predictor, image, 0, (patch,) * 3, settings, num_classes=2)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    gpu = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0
    print(
        json.dumps(
            {
                "baseline_mib": base_rss,
                "peak_mib": peak,
                "gpu_peak_mib": gpu,
                "seconds": dt,
                "label_shape": list(label.shape),
            }
        )
    )


def memory(args: argparse.Namespace) -> None:
    shape = (400, 512, 512)
    nvox = int(np.prod(shape))
    variants: list[tuple[str, dict[str, str] | None]] = [("", None)]
    if args.fixed_mmap_threshold:  # glibc's dynamic mmap threshold keeps freed batch buffers in the heap
        variants.append(
            (" MALLOC_MMAP_THRESHOLD_=1048576", {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"})
        )
    for accum in args.accum:
        for label, env in variants:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--memory-child",
                accum,
                "--mem-patch",
                str(args.mem_patch),
                "--mem-device",
                args.mem_device,
                "--mem-model",
                args.mem_model,
                "--base",
                str(args.base),
            ]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            bytes_acc = 2 if accum == "float16" else 4
            gpu = f", GPU peak allocated {r['gpu_peak_mib']:.0f} MiB" if args.mem_device == "cuda" else ""
            print(
                f"memory 512x512x400 (z=400), 2 classes, model {args.mem_model} on {args.mem_device}, patch "
                f"{args.mem_patch}^3, accumulator {accum} on cpu{label}: peak RSS {r['peak_mib']:.0f} MiB, of "
                f"which {r['peak_mib'] - r['baseline_mib']:.0f} MiB above the process with the input volume "
                f"loaded ({r['baseline_mib']:.0f} MiB; the float32 image alone is {nvox * 4 / 2**20:.0f} MiB); "
                f"accumulator {2 * nvox * bytes_acc / 2**20:.0f} MiB, label map {nvox / 2**20:.0f} MiB{gpu}; "
                f"{r['seconds']:.1f} s"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        choices=["dynunet", "u2net", "universal"],
        default="dynunet",
        help="model used by both: MONAI's DynUNet, our dense U-Net (independent) or universal separable model",
    )
    p.add_argument(
        "--paths",
        nargs="+",
        default=["fp32", "auto"],
        choices=["fp32", "auto", "bf16", "onnxruntime"],
        help="our inference paths to time (fp32 first: the others' labels are compared with it)",
    )
    p.add_argument(
        "--volume-mode", action="store_true", help="also time the universal model's one 128^3 forward"
    )
    p.add_argument("--base", type=int, default=16, help="channels of the model's first level")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward pass (both)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument(
        "--monai-mode", default="constant", choices=["constant", "gaussian"], help="MONAI blending"
    )
    p.add_argument("--mem-patch", type=int, default=128, help="patch edge for the memory run")
    p.add_argument(
        "--accum",
        nargs="+",
        default=["float32"],
        choices=["float32", "float16"],
        help="accumulator dtypes for the memory run",
    )
    p.add_argument("--device", default="cpu", help="device of the speed run (cpu or cuda)")
    p.add_argument("--accum-device", default="cpu", help="where our accumulator lives in the speed run")
    p.add_argument("--amp", action="store_true", help="autocast in the speed run (both)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--mem-device", default="cpu", help="device of the model in the memory run")
    p.add_argument(
        "--mem-model",
        default="pointwise",
        choices=["pointwise", "u2net", "dynunet"],
        help="model of the memory run (pointwise: a 1x1x1 linear map, so only our buffers count)",
    )
    p.add_argument(
        "--fixed-mmap-threshold",
        action="store_true",
        help="also measure memory with glibc's MALLOC_MMAP_THRESHOLD_=1 MiB",
    )
    p.add_argument("--skip-speed", action="store_true", help="only the memory run")
    p.add_argument("--skip-memory", action="store_true", help="only the speed run")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(
            (400, 512, 512), args.mem_patch, args.memory_child, args.mem_device, args.mem_model, args.base
        )
        return
    if not args.skip_speed:
        speed(args)
    if args.volume_mode:
        volume_mode(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
