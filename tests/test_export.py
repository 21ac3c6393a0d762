"""Exporting one domain as a standalone network (models/export.py) and segmenting with it
(inference/exported.py, predict.py --model)."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict
from demo.data import generate_task
from inference.exported import ExportedNetwork, load_exported_task
from models import U2Net3D, build_model
from models.export import (
    METADATA_KEY,
    ExportError,
    domain_state_dict,
    export_domain,
    extract_domain,
    load_exported,
    main,
)
from models.params import parameter_counts
from tests.synthetic import synthetic_plans
from utils.checkpoint import save_checkpoint

TOL = 1e-4  # max |exported - universal| in fp32 on random input

# (train_mode, module, in_channels, num_classes, exported task)
CONFIGS = {
    "separable": ("universal", "separable_adapter", [1, 2, 1], [2, 3, 3], 1),
    "series": ("universal", "series_adapter", [1, 2], [2, 3], 1),
    "parallel": ("universal", "parallel_adapter", [2, 1], [3, 2], 0),
    "shared": ("shared", None, [1, 2], [2, 3], 1),
    "independent": ("independent", None, [2], [3], 0),
}


def _model(name: str, seed: int = 0) -> U2Net3D:
    """A tiny model whose every parameter is perturbed, so that no two tasks' norms or heads agree
    (a fresh model's norms are all (1, 0): picking the wrong task's entries would go unnoticed)."""
    mode, module, in_ch, n_cls, _ = CONFIGS[name]
    torch.manual_seed(seed)
    model = build_model(mode, in_ch, n_cls, module=module, base_channels=4, pools_per_axis=(2, 1, 2))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    model.eval()
    model.set_fused_ops(False)
    return model


def _checkpoint(name: str, folder: Path) -> tuple[Path, U2Net3D, int, str]:
    model = _model(name)
    cfg = model.config
    tasks = [
        {"name": f"Task9{i}_T{i}", "plans": synthetic_plans(f"Task9{i}_T{i}", c, k, [8, 4, 8], [2, 1, 2])}
        for i, (c, k) in enumerate(zip(cfg.in_channels, cfg.num_classes, strict=True))
    ]
    path = folder / f"{name}.pt"
    patch = None if cfg.train_mode == "independent" else [8, 8, 8]
    save_checkpoint(path, cfg.to_dict(), tasks, model.state_dict(), model_patch=patch)
    t = CONFIGS[name][4]
    return path, model, t, tasks[t]["name"]


def _inputs(channels: int) -> list[torch.Tensor]:
    """Random inputs of two sizes and batch sizes (the exported graph has dynamic N, D, H, W)."""
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, channels, 8, 4, 8, generator=g), torch.randn(2, channels, 12, 6, 4, generator=g)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_extracted_domain_equals_universal_model(name: str) -> None:
    model = _model(name)
    t = CONFIGS[name][4]
    net = extract_domain(model, t)
    counts = parameter_counts(model)
    assert sum(p.numel() for p in net.parameters()) == counts.shared + counts.per_task[t]
    if model.num_tasks > 1:
        assert sum(p.numel() for p in net.parameters()) < counts.total
    for x in _inputs(net.in_channels):
        with torch.no_grad():
            ref, got = model(x, t), net(x)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) <= TOL
        # the test can fail: another task with as many modalities and classes gives other logits
        for other in range(model.num_tasks):
            cfg = model.config
            same_io = (cfg.in_channels[other], cfg.num_classes[other]) == (
                cfg.in_channels[t],
                cfg.num_classes[t],
            )
            if other != t and same_io:
                with torch.no_grad():
                    assert float((model(x, other) - got).abs().max()) > 1e-2


def test_domain_state_dict_keeps_shared_and_one_task() -> None:
    model = _model("separable")
    sd = domain_state_dict(model, 2)
    full = model.state_dict()
    # shared pointwise conv as it is; task 2's depthwise kernel renamed to entry 0; no other task
    key = "encoders.0.unit1.pointwise.weight"
    assert torch.equal(sd[key], full[key])
    assert torch.equal(sd["encoders.0.unit1.depthwise.0.weight"], full["encoders.0.unit1.depthwise.2.weight"])
    assert not any(re.search(r"depthwise\.[12]\.", k) for k in sd)
    assert not any(k.endswith(("heads.2.weight", "norms.2.weight")) for k in sd)
    with pytest.raises(IndexError):
        domain_state_dict(model, 3)


def _metadata_checks(meta: dict, model: U2Net3D, t: int, task: str) -> None:
    counts = parameter_counts(model)
    assert meta["task"] == task and meta["num_classes"] == model.config.num_classes[t]
    assert meta["in_channels"] == model.config.in_channels[t]
    plans = meta["plans"]
    for key in ("labels", "modalities", "target_spacing", "normalisation", "patch_size"):
        assert meta[key] == plans[key], key
    assert meta["postprocess"] == {"tumour_classes": [], "keep_components": 1}
    assert meta["divisible_by"] == [4, 2, 4]
    assert meta["parameters"]["domain"] == counts.shared + counts.per_task[t]
    assert meta["parameters"]["universal_total"] == counts.total


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torchscript_export_equals_universal_model(name: str, tmp_path: Path) -> None:
    ckp, model, t, task = _checkpoint(name, tmp_path)
    res = export_domain(ckp, task, tmp_path / "domain.pt", "torchscript")
    assert res.max_abs_diff is not None and res.max_abs_diff <= TOL
    loaded = load_exported(res.path)
    _metadata_checks(loaded.metadata, model, t, task)
    counts = parameter_counts(model)
    assert loaded.parameters == counts.shared + counts.per_task[t]  # the file holds one domain only
    for x in _inputs(model.config.in_channels[t]):
        with torch.no_grad():
            assert float((loaded.run(x) - model(x, t)).abs().max()) <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnx_export_equals_universal_model(name: str, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    ckp, model, t, task = _checkpoint(name, tmp_path)
    res = export_domain(ckp, task, tmp_path / "domain.onnx", "onnx")
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-3
    loaded = load_exported(res.path)
    _metadata_checks(loaded.metadata, model, t, task)
    exact = copy.deepcopy(model).double()
    for x in _inputs(model.config.in_channels[t]):
        with torch.no_grad():
            ref, ref64 = model(x, t), exact(x.double(), t)
            err = float((loaded.run(x) - ref).abs().max())
        # ONNX Runtime's kernels round differently from PyTorch's: the bound is TOL beyond PyTorch's
        # own fp32 rounding error at this input (~1e-5 for all but the separable adapter, whose
        # depthwise conv + instance norm on a few voxels amplifies rounding to ~1e-4)
        floor = float((ref.double() - ref64).abs().max())
        assert err <= TOL + floor, (err, floor)
    proto = onnx.load(str(res.path))
    onnx.checker.check_model(proto)
    assert json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])["task"] == task
    # the file holds one domain's weights only (perturbed weights: no two initialisers coincide)
    floats = sum(
        numpy_helper.to_array(i).size
        for i in proto.graph.initializer
        if numpy_helper.to_array(i).dtype == np.float32
    )
    counts = parameter_counts(model)
    assert floats == counts.shared + counts.per_task[t]


@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file")  # --ckp given an exported file
def test_export_cli_prints_parameter_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckp, model, t, task = _checkpoint("separable", tmp_path)
    out = tmp_path / "sub" / "domain.pt"
    assert main(["--ckp", str(ckp), "--task", task, "--format", "torchscript", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    counts = parameter_counts(model)
    assert f"exported domain {counts.shared + counts.per_task[t]:,}" in text
    assert f"model {counts.total:,}" in text and ": ok" in text
    assert out.is_file() and not list(out.parent.glob(".u2tmp-*"))
    # bad usage: unknown task, ambiguous task, not a checkpoint
    assert main(["--ckp", str(ckp), "--task", "Nope", "--out", str(out)]) == 2
    assert main(["--ckp", str(ckp), "--out", str(out)]) == 2
    assert main(["--ckp", str(out), "--task", task, "--out", str(tmp_path / "x.pt")]) == 2
    assert "Nope" in capsys.readouterr().err


def test_load_exported_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckp, _, _, task = _checkpoint("shared", tmp_path)
    with pytest.raises(ExportError, match="not found"):
        load_exported(tmp_path / "missing.pt")
    with pytest.raises(ExportError, match="TorchScript"):
        load_exported(ckp)  # a checkpoint, not an exported network
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ExportError, match="needs onnxruntime"):
        load_exported(junk)
    out = export_domain(ckp, task, tmp_path / "d.pt", "torchscript", check=False).path
    with pytest.raises(ValueError, match="holds task"):
        load_exported_task(out, "Task99_Other")
    net = load_exported_task(out, task).model
    assert isinstance(net, ExportedNetwork)
    with pytest.raises(ValueError, match="multiple of the total stride"):
        net(torch.zeros(1, 2, 8, 4, 6), 0)
    with pytest.raises(IndexError):
        net(torch.zeros(1, 2, 8, 4, 8), 1)


# ---------------------------------------------------------------------------------------------
# predict.py --model gives the labels of predict.py --ckp
# ---------------------------------------------------------------------------------------------
def test_predict_with_exported_domain_equals_checkpoint(tmp_path: Path) -> None:
    """A universal 2-task model with a model patch (16³) that differs from the task patch (8, 16, 16):
    the exported prostate domain (4D two-modality images) segments raw NIfTI images with the same
    labels as the checkpoint, as TorchScript and (when onnxruntime is installed) as ONNX."""
    task = "Task93_DemoProstateMR"
    task_dir = generate_task(task, tmp_path / "data", n_train=0, n_test=2, size=20)
    torch.manual_seed(0)
    config = {"train_mode": "universal", "in_channels": [1, 2], "num_classes": [2, 3],
              "module": "separable_adapter", "base_channels": 4, "pools_per_axis": [2, 2, 2]}  # fmt: skip
    model = build_model(**config)
    plans = synthetic_plans(task, 2, 3, [8, 16, 16], [2, 2, 2])
    plans.update(modalities=["T2", "ADC"], target_spacing=[3.0, 1.2, 1.2], keep_components=2)
    tasks = [{"name": "TaskX_Other", "plans": synthetic_plans("TaskX_Other", 1, 2, [16] * 3, [2] * 3)},
             {"name": task, "plans": plans}]  # fmt: skip
    ckp = tmp_path / "model.pt"
    save_checkpoint(ckp, config, tasks, model.state_dict(), model_patch=[16, 16, 16])
    inputs = task_dir / "imagesTs"
    common = ["--input", str(inputs), "--no_progress"]
    assert predict.main(["--ckp", str(ckp), "--task", task, *common, "--output", str(tmp_path / "ckp")]) == 0
    files = {"pt": tmp_path / "prostate.pt"}
    try:
        import onnx  # noqa: F401  (optional: ONNX export)
        import onnxruntime  # noqa: F401  (optional: ONNX inference)

        files["onnx"] = tmp_path / "prostate.onnx"
    except ImportError:
        pass
    for kind, path in files.items():
        assert export_domain(ckp, task, path).path == path
        out = tmp_path / kind
        assert predict.main(["--model", str(path), *common, "--output", str(out)]) == 0
        for f in sorted(inputs.iterdir()):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ckp" / f.name)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f.name)))
            assert a.shape == b.shape and a.any()
            assert np.array_equal(a, b), (kind, f.name, int((a != b).sum()))
    # --model and --ckp exclude each other; a wrong --task is refused
    with pytest.raises(SystemExit):
        predict.main(["--ckp", str(ckp), "--model", str(files["pt"]), *common, "--output", str(tmp_path)])
    assert predict.main(["--model", str(files["pt"]), "--task", "TaskX_Other", *common, "--output", "x"]) == 2
