"""One domain of a trained model as a standalone network file (TorchScript or ONNX).

    python -m models.export --ckp best.pt --task Task04_Hippocampus --format onnx --out hippo.onnx

:func:`extract_domain` builds a one-task :class:`models.unet.U2Net3D` with the same configuration
and copies into it the shared weights and entry ``t`` of every per-task list (adapters, norms,
heads): nothing of the other domains, nothing of training. :class:`DomainNet` wraps it so that
``forward(x)`` needs no task index: ``(N, modalities, D, H, W) -> (N, classes, D, H, W)`` logits,
with D, H, W any multiples of the model's total stride. The exported graph uses plain PyTorch ops
(``set_export_ops(True)``: the fused kernels are a CPU-training device, and nearest upsampling is
written as broadcast + reshape, which ONNX Runtime runs faster than its Resize).

The file carries what inference needs as JSON metadata (:func:`domain_metadata`): task name,
labels, modalities, target spacing, normalisation, patch sizes, post-processing rules and the
task's whole ``plans`` (what ``predict.py --model`` preprocesses with), plus parameter counts. It is
stored as the ONNX ``metadata_props`` entry ``u2net3d`` and as the TorchScript extra file
``u2net3d.json``. :func:`load_exported` reads either kind back as a callable ``x -> logits``.

ONNX export uses PyTorch's TorchScript-based exporter (``dynamo=False``): it handles the dynamic
spatial sizes, takes seconds, and needs only the ``onnx`` package (to write the metadata), while
the ``torch.export``-based one also needs ``onnxscript`` and is ten times slower here. ``onnx`` and
``onnxruntime`` are optional dependencies (``requirements-dev.txt``): they are imported inside the
functions that need them, with a clear error when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from models.loading import build_model_from_checkpoint
from models.norms import TaskModuleList
from models.params import parameter_counts
from models.unet import U2Net3D, count_parameters
from utils.checkpoint import CheckpointError, choose_task, load_checkpoint
from utils.io_utils import atomic_path, atomic_write

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_FORMATS",
    "EXPORT_VERSION",
    "METADATA_KEY",
    "DomainNet",
    "ExportResult",
    "ExportedModel",
    "ExportError",
    "domain_metadata",
    "domain_state_dict",
    "export_domain",
    "export_onnx",
    "export_torchscript",
    "extract_domain",
    "format_of",
    "format_parameter_line",
    "load_exported",
    "main",
    "onnx_bytes",
    "onnx_runner",
    "onnxruntime_session",
]

ExportFormat = Literal["onnx", "torchscript"]
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
EXPORT_FORMAT = "u2net3d-domain"
EXPORT_VERSION = 1
#: the ONNX metadata_props key and (with ``.json``) the TorchScript extra file of the metadata
METADATA_KEY = "u2net3d"
TORCHSCRIPT_EXTRA = f"{METADATA_KEY}.json"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
DEFAULT_OPSET = 17
ONNX_HINT = "pip install onnx==1.23.2 onnxruntime==1.32.0 (or use --format torchscript / a .pt file)"


class ExportError(ValueError):
    """A file is not an exported u2net3d domain, or an optional package is missing."""


class DomainNet(nn.Module):
    """One domain of a U²-Net as a standalone network: ``forward(x)`` without a task index.

    Args:
        net: a one-task :class:`U2Net3D` (from :func:`extract_domain`).
    """

    def __init__(self, net: U2Net3D) -> None:
        super().__init__()
        if net.num_tasks != 1:
            raise ValueError(f"DomainNet wraps a one-task network, got {net.num_tasks} tasks")
        self.net = net

    @property
    def in_channels(self) -> int:
        return self.net.config.in_channels[0]

    @property
    def num_classes(self) -> int:
        return self.net.config.num_classes[0]

    @property
    def total_strides(self) -> tuple[int, ...]:
        return self.net.total_strides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (N, modalities, D, H, W), D, H, W multiples of ``total_strides``.
        Returns logits (N, classes, D, H, W)."""
        return self.net(x, 0)


def _task_list_prefixes(model: nn.Module) -> list[str]:
    """Names of the model's :class:`TaskModuleList` modules, longest first."""
    names = [name for name, m in model.named_modules() if isinstance(m, TaskModuleList)]
    return sorted(names, key=len, reverse=True)


def domain_state_dict(model: U2Net3D, task_idx: int) -> dict[str, torch.Tensor]:
    """The state dict of task ``task_idx``'s one-task network: every shared entry as it is, entry
    ``task_idx`` of each per-task list renamed to entry 0, the other tasks' entries dropped."""
    if not 0 <= task_idx < model.num_tasks:
        raise IndexError(f"task_idx {task_idx} out of range: the model has {model.num_tasks} task(s)")
    prefixes = [p + "." for p in _task_list_prefixes(model)]
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        for head in prefixes:
            if key.startswith(head):
                idx, _, rest = key[len(head) :].partition(".")
                if idx.isdigit():
                    if int(idx) == task_idx:
                        out[f"{head}0.{rest}"] = value
                    break
        else:
            out[key] = value
    return out


def extract_domain(model: U2Net3D, task_idx: int) -> DomainNet:
    """Task ``task_idx`` of ``model`` as a standalone :class:`DomainNet` (CPU, eval, plain ops).

    The copy holds the shared weights and only that task's adapters, norms and heads; its parameter
    count is checked to be ``shared + per_task[task_idx]`` of :func:`models.params.parameter_counts`.
    ``model`` itself is not changed.
    """
    cfg = model.config
    one = replace(cfg, in_channels=[cfg.in_channels[task_idx]], num_classes=[cfg.num_classes[task_idx]])
    net = U2Net3D(one)
    net.load_state_dict(domain_state_dict(model, task_idx), strict=True)
    net.eval()
    net.set_export_ops(True)
    counts = parameter_counts(model)
    want = counts.shared + counts.per_task[task_idx]
    got = count_parameters(net)
    if got != want:  # pragma: no cover - a per-task module outside a TaskModuleList would do this
        raise RuntimeError(f"the extracted domain has {got} parameters, expected shared + own = {want}")
    return DomainNet(net).eval()


def domain_metadata(
    model: U2Net3D,
    task_idx: int,
    tasks: Sequence[Mapping[str, Any]],
    model_patch: Sequence[int] | None,
    *,
    source: str | None = None,
) -> dict[str, Any]:
    """What inference needs to use task ``task_idx``'s exported network (plain JSON values).

    Args:
        model: the universal (or shared / independent) model.
        tasks: the checkpoint's task list ``[{"name", "plans"}]`` in task-index order.
        model_patch: the checkpoint's model patch (shared/universal), or None.
        source: where the weights came from (e.g. the checkpoint's file name).
    """
    plans = dict(tasks[task_idx]["plans"])
    counts = parameter_counts(model)
    cfg = model.config
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "task": str(tasks[task_idx]["name"]),
        "labels": plans.get("labels"),
        "num_classes": int(cfg.num_classes[task_idx]),
        "modalities": plans.get("modalities"),
        "in_channels": int(cfg.in_channels[task_idx]),
        "target_spacing": plans.get("target_spacing"),
        "normalisation": plans.get("normalisation"),
        "is_ct": plans.get("is_ct"),
        "patch_size": plans.get("patch_size"),
        "model_patch": None if model_patch is None else [int(s) for s in model_patch],
        "divisible_by": [int(s) for s in model.total_strides],
        "postprocess": {
            "tumour_classes": list(plans.get("tumour_classes", [])),
            "keep_components": int(plans.get("keep_components", 1)),
        },
        "plans": plans,
        "io": {
            "input": INPUT_NAME,
            "output": OUTPUT_NAME,
            "layout": "(N, modalities, D, H, W) -> (N, classes, D, H, W) logits",
        },
        "parameters": {
            "domain": counts.shared + counts.per_task[task_idx],
            "shared": counts.shared,
            "domain_own": counts.per_task[task_idx],
            "universal_total": counts.total,
            "universal_per_task": list(counts.per_task),
        },
        "source": {
            "train_mode": cfg.train_mode,
            "module": cfg.module,
            "tasks": [str(t["name"]) for t in tasks],
            "task_index": int(task_idx),
            "model_config": cfg.to_dict(),
            "checkpoint": source,
        },
    }


def _example_input(net: DomainNet) -> torch.Tensor:
    """A small traceable input: twice the total stride per axis."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, net.in_channels, *(2 * s for s in net.total_strides), generator=g)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence the tracer's notes about the model's input checks (plain Python, not in the graph)
    and the exporters' notes on instance norm, constant folding and their own deprecation (PyTorch
    2.13 marks TorchScript and the TorchScript-based ONNX exporter deprecated; both work as before)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        yield


def export_torchscript(net: DomainNet, metadata: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Trace ``net`` and write it (with ``metadata`` as the extra file ``u2net3d.json``) atomically."""
    with _quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(net, (_example_input(net),), check_trace=False)
        extra = {TORCHSCRIPT_EXTRA: json.dumps(dict(metadata))}
        return atomic_write(path, lambda f: torch.jit.save(traced, f, _extra_files=extra))


def onnx_bytes(net: DomainNet, *, opset: int = DEFAULT_OPSET) -> bytes:
    """``net`` as an ONNX model in memory (dynamic N, D, H, W; no metadata): what
    :func:`export_onnx` writes, and what ``predict.py --backend onnxruntime`` runs without a file."""
    axes = {0: "N", 2: "D", 3: "H", 4: "W"}
    with tempfile.TemporaryDirectory(prefix="u2net-onnx-") as tmp, _quiet_tracing(), torch.no_grad():
        path = os.path.join(tmp, "domain.onnx")
        torch.onnx.export(
            net,
            (_example_input(net),),
            path,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        with open(path, "rb") as f:
            return f.read()


def export_onnx(
    net: DomainNet, metadata: Mapping[str, Any], path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET
) -> Path:
    """Export ``net`` to ONNX (dynamic N, D, H, W), store ``metadata`` as ``metadata_props``,
    check the model with ``onnx.checker`` and write it atomically.

    Raises:
        ExportError: the optional package ``onnx`` is not installed.
    """
    try:
        import onnx  # optional dependency: only ONNX export needs it
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx package: {ONNX_HINT}") from e
    proto = onnx.load_model_from_string(onnx_bytes(net, opset=opset))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(dict(metadata))
    proto.doc_string = (
        f"3D U2-Net, domain {metadata.get('task')}: {INPUT_NAME} (N, modalities, D, H, W) -> "
        f"{OUTPUT_NAME} (N, classes, D, H, W); metadata in metadata_props['{METADATA_KEY}']"
    )
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)


# ----------------------------------------------------------------------------------------------
# reading exported files back
# ----------------------------------------------------------------------------------------------
@dataclass
class ExportedModel:
    """An exported domain network ready to run: ``run(x) -> logits`` on ``device``.

    Attributes:
        run: ``x (N, modalities, D, H, W) -> logits (N, classes, D, H, W)``; ONNX models take and
            return CPU tensors.
        metadata: the JSON metadata written by :func:`domain_metadata`.
        format: ``"onnx"`` or ``"torchscript"``.
        device: where ``run`` computes.
        parameters: the number of weights the file holds (ONNX: elements of its float initialisers).
    """

    run: Callable[[torch.Tensor], torch.Tensor]
    metadata: dict[str, Any]
    format: str
    device: torch.device
    parameters: int


def format_of(path: str | os.PathLike[str]) -> ExportFormat:
    """``"onnx"`` for a ``.onnx`` file, else ``"torchscript"`` (``.pt``, ``.ts``, ...)."""
    return "onnx" if os.fspath(path).lower().endswith(".onnx") else "torchscript"


def _check_metadata(meta: Any, path: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path!r}: not an exported u2net3d domain (no '{METADATA_KEY}' metadata)")
    if int(meta.get("version", 0)) > EXPORT_VERSION:
        raise ExportError(
            f"{path!r}: export version {meta['version']} is newer than supported ({EXPORT_VERSION})"
        )
    for key in ("task", "plans", "in_channels", "num_classes", "divisible_by"):
        if key not in meta:
            raise ExportError(f"{path!r}: the metadata lacks {key!r}")
    return meta


def _load_torchscript(path: str, device: torch.device) -> ExportedModel:
    if not zipfile.is_zipfile(path):
        raise ExportError(f"{path!r}: not a TorchScript archive")
    extra = {TORCHSCRIPT_EXTRA: ""}
    try:
        with _quiet_tracing():
            module = torch.jit.load(path, map_location=device, _extra_files=extra)
    except Exception as e:  # torch raises RuntimeError and others for non-TorchScript archives
        raise ExportError(f"{path!r}: not a TorchScript file ({type(e).__name__}: {str(e)[:200]})") from e
    try:
        meta = json.loads(extra[TORCHSCRIPT_EXTRA] or "null")
    except json.JSONDecodeError as e:
        raise ExportError(f"{path!r}: unreadable metadata ({e})") from e
    module.eval()
    params = sum(p.numel() for p in module.parameters())
    return ExportedModel(module, _check_metadata(meta, path), "torchscript", device, params)


def _load_onnx(path: str, device: torch.device, threads: int | None) -> ExportedModel:
    if device.type != "cpu":
        raise ExportError(f"{path!r}: ONNX models run on the CPU (ONNX Runtime); use --device cpu")
    try:
        session = onnxruntime_session(path, threads)
    except ExportError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        raise ExportError(f"{path!r}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from e
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path!r}: unreadable metadata ({e})") from e
    meta = _check_metadata(meta, path)

    return ExportedModel(onnx_runner(session), meta, "onnx", device, int(meta["parameters"]["domain"]))


def onnxruntime_session(model: str | bytes, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of a model file or of model bytes (:func:`onnx_bytes`).

    Args:
        threads: intra-op threads (default: ``torch.get_num_threads()``, as PyTorch would use).

    Raises:
        ExportError: onnxruntime is not installed.
    """
    try:
        import onnxruntime as ort  # optional dependency: only running ONNX models needs it
    except ImportError as e:
        raise ExportError(f"running an ONNX model needs onnxruntime: {ONNX_HINT}") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def onnx_runner(session: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (N, modalities, D, H, W) -> logits`` (float32 CPU tensors) through an ONNX Runtime session."""

    def run(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: arr})
        return torch.from_numpy(np.asarray(out))

    return run


def load_exported(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", *, threads: int | None = None
) -> ExportedModel:
    """Load an exported domain (format from the suffix: ``.onnx`` = ONNX, else TorchScript).

    Args:
        device: TorchScript: any torch device; ONNX: ``cpu`` (ONNX Runtime's CPU provider).
        threads: ONNX Runtime's intra-op threads (default: ``torch.get_num_threads()``).

    Raises:
        ExportError: missing file, not an exported domain, or onnxruntime missing for a ``.onnx``.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ExportError(f"{p!r}: file not found")
    dev = torch.device(device)
    if format_of(p) == "onnx":
        return _load_onnx(p, dev, threads)
    return _load_torchscript(p, dev)


# ----------------------------------------------------------------------------------------------
# checkpoint -> file
# ----------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What :func:`export_domain` wrote and measured."""

    path: Path
    format: str
    metadata: dict[str, Any]
    max_abs_diff: float | None  # exported file vs the universal model on random input (None: not checked)
    max_abs_logit: float | None
    check_shape: tuple[int, ...] | None


def _check_patch(meta: Mapping[str, Any]) -> list[int]:
    """The window the model sees at inference: the model patch, else the task patch."""
    patch = meta["model_patch"] or meta["patch_size"]
    return [int(s) for s in patch]


def export_domain(
    ckp: str | os.PathLike[str],
    task: str | None,
    out: str | os.PathLike[str],
    fmt: ExportFormat | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> ExportResult:
    """Export task ``task`` of checkpoint ``ckp`` to ``out`` and (``check``) compare the written file's
    output with the universal model's on a random window of the inference patch (fp32, CPU).

    Raises:
        CheckpointError, ValueError (unknown task), ExportError (optional package missing).
    """
    fmt = fmt or format_of(out)
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    ckpt = load_checkpoint(ckp)
    t, task = choose_task(ckpt, task)
    model, tasks = build_model_from_checkpoint(ckpt)
    model.set_fused_ops(False)  # the reference computes with the same plain ops as the export
    net = extract_domain(model, t)
    meta = domain_metadata(model, t, tasks, ckpt.get("model_patch"), source=Path(ckp).name)
    if fmt == "onnx":
        path = export_onnx(net, meta, out, opset=opset)
    else:
        path = export_torchscript(net, meta, out)
    diff = peak = None
    shape: tuple[int, ...] | None = None
    if check:
        loaded = load_exported(path)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, net.in_channels, *_check_patch(meta), generator=g)
        with torch.inference_mode():
            ref = model(x, t)
            got = loaded.run(x)
        diff = float((got.float() - ref).abs().max())
        peak = float(ref.abs().max())
        shape = tuple(x.shape)
    return ExportResult(path, fmt, meta, diff, peak, shape)


def format_parameter_line(meta: Mapping[str, Any]) -> str:
    """``exported domain N (shared S + own D) vs universal model T (shared S + per task [..])``."""
    p = meta["parameters"]
    mode = meta["source"]["train_mode"] + (f" {meta['source']['module']}" if meta["source"]["module"] else "")
    per_task = ", ".join(
        f"{name} {n:,}" for name, n in zip(meta["source"]["tasks"], p["universal_per_task"], strict=True)
    )
    return (
        f"parameters: exported domain {p['domain']:,} (shared {p['shared']:,} + {meta['task']} {p['domain_own']:,})"
        f" | {mode} model {p['universal_total']:,} (shared {p['shared']:,} + per task: {per_task})"
        f" | {100.0 * p['domain'] / p['universal_total']:.1f} %"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.export``; returns the exit status (0 ok, 1 check failed, 2 bad usage)."""
    ap = argparse.ArgumentParser(
        prog="python -m models.export",
        description="Export one domain (task) of a trained 3D U²-Net checkpoint as a standalone "
        "ONNX or TorchScript network with the metadata inference needs (predict.py --model FILE). "
        "See docs/export_and_report.md.",
    )
    ap.add_argument("--ckp", required=True, metavar="CKPT", help="checkpoint written by training")
    ap.add_argument(
        "--task",
        default=None,
        metavar="NAME",
        help="the domain to export, as named in the checkpoint (may be left out for one-task checkpoints)",
    )
    ap.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=None,
        help="onnx or torchscript (default: from --out's suffix: .onnx = onnx, else torchscript)",
    )
    ap.add_argument("--out", required=True, metavar="FILE", help="the file to write (.onnx, .pt)")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    ap.add_argument(
        "--no_check",
        action="store_true",
        help="skip running the written file against the universal model (ONNX: needs onnxruntime)",
    )
    ap.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="the check fails when max |exported - universal| > tolerance * max(1, max |logit|)",
    )
    args = ap.parse_args(argv)
    try:
        res = export_domain(
            args.ckp, args.task, args.out, args.format, opset=args.opset, check=not args.no_check
        )
    except (CheckpointError, ExportError, ValueError) as e:
        print(f"models.export: {e}", file=sys.stderr)
        return 2
    meta = res.metadata
    print(
        f"exported {meta['task']} of {args.ckp} to {res.path} ({res.format}); input (N, {meta['in_channels']}, D, H, W) "
        f"with D, H, W multiples of {tuple(meta['divisible_by'])}, output {meta['num_classes']} classes"
    )
    print(format_parameter_line(meta))
    if res.max_abs_diff is None:
        return 0
    assert res.max_abs_logit is not None
    runner = "ONNX Runtime (CPU)" if res.format == "onnx" else "TorchScript (CPU)"
    ok = res.max_abs_diff <= args.tolerance * max(1.0, res.max_abs_logit)
    print(
        f"check ({runner}): max |exported - universal| = {res.max_abs_diff:.2e} on random input "
        f"{res.check_shape} (max |logit| {res.max_abs_logit:.3g}): {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
