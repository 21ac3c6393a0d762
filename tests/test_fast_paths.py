"""The fast inference paths (ONNX Runtime, bf16) agree with fp32 PyTorch; ``auto`` chooses as documented;
the pipelined folder run writes what the sequential one writes, and keeps its error behaviour."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import predict
from demo.data import generate_task
from inference import backends
from inference.backends import ORT_MIN_BASE, OnnxRuntimeNetwork, choose_runtime, native_bf16
from inference.predictor import PREDICT_SETTINGS_JSON, Segmenter, TaskModel
from inference.settings import InferenceSettings
from models import build_model
from training.config import TrainConfig
from training.validation import run_inference_settings
from utils.checkpoint import save_checkpoint
from utils.decathlon import read_label
from utils.metrics import dice

CPU = torch.device("cpu")
NATIVE_BF16 = native_bf16(CPU)


# ---------------------------------------------------------------------------------------------
# what auto chooses
# ---------------------------------------------------------------------------------------------
def test_auto_without_native_bf16_picks_onnxruntime_where_it_is_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backends, "native_bf16", lambda device: False)
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: True)
    fast = choose_runtime("auto", "auto", CPU, ort_faster=True)
    assert (fast.precision, fast.backend, fast.amp) == ("fp32", "onnxruntime", "off")
    slow = choose_runtime("auto", "auto", CPU, ort_faster=False)
    assert (slow.precision, slow.backend) == ("fp32", "torch")
    assert "faster engine" in slow.reason
    # where ONNX Runtime was measured faster: the dense U-Net and the universal separable model at the paper's width
    assert backends.onnxruntime_faster("universal", "separable_adapter", ORT_MIN_BASE)
    assert not backends.onnxruntime_faster("universal", "separable_adapter", ORT_MIN_BASE // 2)
    assert backends.onnxruntime_faster("independent", None, 32) and backends.onnxruntime_faster(
        "shared", None, 16
    )
    assert not backends.onnxruntime_faster("independent", None, 8)  # the demo's width: PyTorch
    assert not backends.onnxruntime_faster("universal", "series_adapter", 16)  # not measured


def test_auto_prefers_native_bf16_and_then_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "native_bf16", lambda device: True)
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: True)
    c = choose_runtime("auto", "auto", CPU)
    assert (c.precision, c.backend, c.amp) == ("bf16", "torch", "bf16")
    assert "native bf16" in c.reason
    # with ONNX Runtime asked for, auto precision is its fp32
    c = choose_runtime("auto", "onnxruntime", CPU)
    assert (c.precision, c.backend) == ("fp32", "onnxruntime")


def test_auto_without_onnxruntime_is_pytorch_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "native_bf16", lambda device: False)
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)
    c = choose_runtime("auto", "auto", CPU)
    assert (c.precision, c.backend) == ("fp32", "torch")
    assert "not installed" in c.reason
    with pytest.raises(ValueError, match="needs the onnxruntime package"):
        choose_runtime("fp32", "onnxruntime", CPU)


def test_explicit_choices_are_kept_or_refused_with_a_reason() -> None:
    c = choose_runtime("fp32", "torch", CPU)
    assert (c.precision, c.backend, c.reason) == ("fp32", "torch", "as asked")
    assert choose_runtime("bf16", "torch", CPU).amp == "bf16"  # explicit bf16 runs even when emulated
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        choose_runtime("fp16", "torch", CPU)
    with pytest.raises(ValueError, match="fp32 only"):
        choose_runtime("bf16", "onnxruntime", CPU)
    with pytest.raises(ValueError, match="CPU only"):
        choose_runtime("fp32", "onnxruntime", torch.device("cuda"))
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_runtime("int8", "torch", CPU)


def test_bf16_flags_are_read_from_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    none = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
    assert backends.parse_bf16_flags(x86) == ("amx_bf16", "avx512_bf16")
    assert backends.parse_bf16_flags(arm) == ("bf16",)
    assert backends.parse_bf16_flags(none) == ()
    # native bf16 needs both the CPU flag and oneDNN's support
    monkeypatch.setattr(backends, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert backends.native_bf16(CPU)
    monkeypatch.setattr(backends, "cpu_bf16_flags", lambda: ())
    assert not backends.native_bf16(CPU)


# ---------------------------------------------------------------------------------------------
# accuracy of each fast path against fp32 PyTorch
# ---------------------------------------------------------------------------------------------
def _agreement(ref: np.ndarray, got: np.ndarray, num_classes: int) -> tuple[float, float]:
    """Fraction of equal voxels, largest per-class Dice difference (foreground classes)."""
    agree = float((ref == got).mean())
    # Dice of the fast path's class c against fp32's: the difference from fp32's own (1.0)
    diffs = [1.0 - dice(got == c, ref == c) for c in range(1, num_classes)]
    return agree, max(diffs)


@pytest.fixture(scope="module")
def wide_model() -> TaskModel:
    """A random-weight base-16 independent model (the paper's width), 3 classes, patch 32³."""
    torch.manual_seed(0)
    model = build_model("independent", [1], [3], base_channels=16, pools_per_axis=(3, 3, 3)).eval()
    plans = {"patch_size": [32, 32, 32], "num_classes": 3, "modalities": ["CT"], "postprocess": False}
    return TaskModel(model, 0, "TaskX", plans)


def _image() -> np.ndarray:
    g = np.random.default_rng(3)
    img = g.standard_normal((1, 40, 56, 48)).astype(np.float32)
    img[:, 10:30, 15:40, 10:35] += 2.0  # a bright block: the network's outputs vary in space
    return img


def _labels(task: TaskModel, **kw: object) -> np.ndarray:
    settings = InferenceSettings(postprocess=False, accum_dtype="float32", **kw)  # type: ignore[arg-type]
    return Segmenter(task, settings).segment_array(_image())


def test_onnxruntime_agrees_with_fp32_pytorch(wide_model: TaskModel) -> None:
    pytest.importorskip("onnxruntime")
    ref = _labels(wide_model)
    got = _labels(wide_model, backend="onnxruntime")
    assert len(np.unique(ref)) == 3  # every class present: the comparison means something
    agree, dice_diff = _agreement(ref, got, 3)
    assert agree >= 0.999, agree
    assert dice_diff <= 0.002, dice_diff


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (AVX-512 BF16 / AMX / Arm BF16)")
def test_native_bf16_agrees_with_fp32_pytorch(wide_model: TaskModel) -> None:
    ref = _labels(wide_model)
    got = _labels(wide_model, amp="bf16")
    agree, dice_diff = _agreement(ref, got, 3)
    assert agree >= 0.999, agree
    assert dice_diff <= 0.002, dice_diff


def test_onnxruntime_network_runs_only_its_task(wide_model: TaskModel) -> None:
    pytest.importorskip("onnxruntime")
    assert isinstance(wide_model.model, torch.nn.Module)
    net = OnnxRuntimeNetwork(wide_model.model, 0)  # type: ignore[arg-type]
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        ref = wide_model.model(x, 0)
    assert torch.allclose(net(x, 0), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(IndexError, match="runs task 0"):
        net(x, 1)


# ---------------------------------------------------------------------------------------------
# predict.py: flags, predict_settings.json, pipelined folder run
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hippo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1-task checkpoint (base 4) for the demo hippocampus task and its generated test images."""
    root = tmp_path_factory.mktemp("fast")
    task_dir = generate_task("Task92_DemoHippoMR", root / "data", n_train=0, n_test=4, size=24)
    torch.manual_seed(1)
    config = {"train_mode": "independent", "in_channels": [1], "num_classes": [3], "module": None,
              "base_channels": 4, "pools_per_axis": [2, 2, 2], "deep_supervision": True, "residual": True}  # fmt: skip
    model = build_model(**config)
    plans = json.loads((task_dir / "dataset.json").read_text())  # only for names
    labels = {str(k): v for k, v in plans["labels"].items()}
    task_plans = {
        "task": "Task92_DemoHippoMR",
        "modalities": ["MRI"],
        "is_ct": False,
        "labels": labels,
        "num_classes": 3,
        "label_map": {k: int(k) for k in labels},
        "target_spacing": [1.0, 1.0, 1.0],
        "patch_size": [16, 16, 16],
        "pools_per_axis": [2, 2, 2],
        "batch_size": 2,
        "small_label": 1,
        "tumour_classes": [],
        "keep_components": 1,
        "normalisation": {"clip_percentiles": [2, 98], "ct_clip_min": -1024, "zscore": "nonzero"},
        "source": "derived",
        "median_resampled_shape": [24, 24, 24],
    }
    ckpt = root / "hippo.pt"
    save_checkpoint(ckpt, config, [{"name": "Task92_DemoHippoMR", "plans": task_plans}], model.state_dict())
    return ckpt, task_dir / "imagesTs"


def test_pipelined_folder_run_writes_what_the_sequential_run_writes(
    hippo: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, images = hippo
    outs = {}
    for name, extra in (("seq", ["--sequential"]), ("pipe", [])):
        out = tmp_path / name
        argv = ["--ckp", str(ckpt), "--input", str(images), "--output", str(out), "--no_progress", *extra]
        assert predict.main(argv) == 0
        outs[name] = {p.name: read_label(p)[0] for p in sorted(out.glob("*.nii.gz"))}
    assert len(outs["seq"]) == 4 and outs["seq"].keys() == outs["pipe"].keys()
    for name, label in outs["seq"].items():
        assert np.array_equal(label, outs["pipe"][name]), name


def test_pipelined_run_reports_a_bad_case_by_name_and_does_the_others(
    hippo: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, images = hippo
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = sorted(images.glob("*.nii.gz"))
    for f in files:
        (inputs / f.name).write_bytes(f.read_bytes())
    bad = inputs / files[1].name  # the second case: read while the first one is segmented
    bad.write_bytes(files[1].read_bytes()[:200])  # truncated gzip
    out = tmp_path / "out"
    status = predict.main(["--ckp", str(ckpt), "--input", str(inputs), "--output", str(out), "--no_progress"])
    assert status == 1
    err = capsys.readouterr().err
    assert bad.name in err and "1 input(s) failed" in err
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == sorted(f.name for f in files if f.name != bad.name)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written


def test_predict_settings_json_records_the_choice(
    hippo: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, images = hippo
    out = tmp_path / "auto"
    argv = ["--ckp", str(ckpt), "--input", str(images), "--output", str(out), "--no_progress"]
    assert predict.main([*argv, "--precision", "auto", "--backend", "auto"]) == 0
    saved = json.loads((out / PREDICT_SETTINGS_JSON).read_text())
    want = choose_runtime("auto", "auto", CPU)
    assert saved["runtime"]["precision"] == want.precision
    assert saved["runtime"]["backend"] == "torch"  # a base-4 network: PyTorch is faster
    assert saved["runtime"]["requested"] == "precision=auto backend=auto"
    assert saved["settings"]["amp"] == want.amp and saved["task"] == "Task92_DemoHippoMR"
    assert "predict.py: PyTorch" in capsys.readouterr().err
    # --amp off is the older spelling of --precision fp32
    out2 = tmp_path / "amp"
    assert predict.main([*argv[:-3], "--output", str(out2), "--no_progress", "--amp", "off"]) == 0
    assert json.loads((out2 / PREDICT_SETTINGS_JSON).read_text())["runtime"]["precision"] == "fp32"


def test_predict_backend_onnxruntime_on_a_checkpoint(hippo: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    ckpt, images = hippo
    labels = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        argv = ["--ckp", str(ckpt), "--input", str(images), "--output", str(out), "--no_progress"]
        assert predict.main([*argv, "--backend", backend]) == 0
        assert json.loads((out / PREDICT_SETTINGS_JSON).read_text())["runtime"]["backend"] == backend
        labels[backend] = np.concatenate([read_label(p)[0].ravel() for p in sorted(out.glob("*.nii.gz"))])
    assert float((labels["torch"] == labels["onnxruntime"]).mean()) >= 0.999
    # an exported file runs with its own engine: --backend torch cannot run an .onnx file
    bad = predict.main(["--model", str(tmp_path / "x.onnx"), "--input", str(images), "--output",
                        str(tmp_path / "o"), "--backend", "torch"])  # fmt: skip
    assert bad == 2


def test_pipelined_run_overlaps_the_stages_in_their_threads(
    hippo: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading runs in the reader thread and writing in the writer thread, the network in the caller's;
    sequential runs do everything in the caller's thread."""
    ckpt, images = hippo
    events: list[tuple[str, str]] = []
    load, finish = Segmenter._load, Segmenter._finish

    def spy_load(self: Segmenter, source: object) -> object:
        events.append(("load", threading.current_thread().name))
        return load(self, source)  # type: ignore[arg-type]

    def spy_finish(self: Segmenter, *a: object) -> object:
        events.append(("finish", threading.current_thread().name))
        return finish(self, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(Segmenter, "_load", spy_load)
    monkeypatch.setattr(Segmenter, "_finish", spy_finish)
    task = TaskModel.from_checkpoint(ckpt, None)
    seg = Segmenter(task, InferenceSettings())
    report = seg.predict_files([images], tmp_path / "p")
    assert len(report.written) == 4 and not report.failed
    assert [n for k, n in events if k == "load"] == ["u2net-read_0"] * 4
    assert [n for k, n in events if k == "finish"] == ["u2net-write_0"] * 4
    events.clear()
    report = seg.predict_files([images], tmp_path / "s", pipeline=False)
    assert {n for _, n in events} == {threading.current_thread().name}


def test_training_validation_takes_the_inference_precision_and_backend() -> None:
    base = {"mode": "independent", "tasks": ["Task02_Heart"]}
    same = run_inference_settings(TrainConfig(**base, amp="bf16"), CPU)  # type: ignore[arg-type]
    assert (same.amp, same.backend) == ("bf16", "torch")  # a bf16 run validates in bf16, as before
    fp32 = run_inference_settings(TrainConfig(**base, amp="bf16", infer_precision="fp32"), CPU)  # type: ignore[arg-type]
    assert fp32.amp == "off"
    if backends.onnxruntime_available():
        ort = run_inference_settings(TrainConfig(**base, infer_backend="onnxruntime"), CPU)  # type: ignore[arg-type]
        assert (ort.amp, ort.backend) == ("off", "onnxruntime")
    with pytest.raises(ValueError, match="runs in fp32"):
        TrainConfig(**base, infer_backend="onnxruntime", infer_precision="bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="infer_precision must be one of"):
        TrainConfig(**base, infer_precision="int8")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["independent", "universal"])
def test_export_ops_upsample_by_broadcast_bit_identically(mode: str) -> None:
    """The exported graph's nearest upsampling (broadcast + reshape) gives exactly F.interpolate's values,
    also with different pools per axis (factors 1 and 2); the ONNX graph then has no Resize node."""
    torch.manual_seed(0)
    if mode == "universal":
        net = build_model(
            mode, [1, 2], [2, 3], module="separable_adapter", base_channels=4, pools_per_axis=(3, 3, 2)
        )
    else:
        net = build_model(mode, [1], [2], base_channels=4, pools_per_axis=(1, 3, 2))
    net.eval()
    x = torch.randn(2, 1, 16, 24, 32)
    net.set_fused_ops(False)
    with torch.inference_mode():
        ref = net(x, 0)
        net.set_export_ops(True)
        got = net(x, 0)
    assert torch.equal(got, ref)
    onnx = pytest.importorskip("onnx")
    from models.export import extract_domain, onnx_bytes

    graph = onnx.load_model_from_string(onnx_bytes(extract_domain(net, 0))).graph
    ops = {n.op_type for n in graph.node}
    assert "Resize" not in ops and "Expand" in ops
