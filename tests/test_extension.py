"""Extending a trained model: a new domain with a warm start (``--init_from``), and a trained domain whose
label set grows (``--add_classes_to``). Tiny models and tasks; the checkpoints are built, not trained."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict
from demo import summary
from demo.data import generate_task
from demo.summary import old_class_of_new
from models import U2Net3D, build_model
from models.export import export_domain, load_exported
from models.loading import build_model_from_checkpoint
from models.params import freeze_for_new_classes, freeze_for_task, split_parameters
from models.report import format_parameter_report
from reporting.build import _extension_section, _mode_parameters
from tests.synthetic import make_synthetic_task, synthetic_plans, write_folds
from training.cli import build_parser, config_from_args, prepare_runs
from training.loop import fit
from training.setup import check_label_growth, choose_init_source, parent_classes
from training.state import LATEST
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.intensity import foreground_samples, intensity_distance, summarise_samples
from utils.prep_runner import run_preprocessing

MODES = [("shared", None), ("universal", "separable_adapter"), ("universal", "series_adapter")]
A, X = "Task80_ExtA", "Task81_ExtX"  # the trained model's domains (1 modality, 2 classes each)
NEW = "Task82_ExtNew"  # a new domain (1 modality, 2 classes)
MORE = "Task83_ExtAMore"  # A's images with a third class
TWO = "Task84_ExtTwoMod"  # a new domain with 2 modalities and 3 classes


def _perturbed(model: U2Net3D, seed: int = 0) -> U2Net3D:
    """Every parameter moved, so that no two tasks' norms or heads agree (fresh norms are all (1, 0))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _entries(model: U2Net3D, t: int) -> dict[str, dict[str, torch.Tensor]]:
    """Task ``t``'s entry of every per-task list, by list name."""
    return {
        name: m[t].state_dict() for name, m in model.named_modules() if type(m).__name__ == "TaskModuleList"
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# warm start
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "module"), MODES)
def test_add_task_warm_start_copies_what_fits(mode: str, module: str | None) -> None:
    """init_from copies the source task's adapters and norms always, the input head when the modality count
    matches and the class heads when the class count matches; the rest starts fresh; old tasks unchanged."""
    torch.manual_seed(0)
    model = _perturbed(
        build_model(mode, [1, 2], [2, 3], module=module, base_channels=4, pools_per_axis=(1, 2, 2))
    )
    x = torch.randn(1, 1, 4, 8, 8)
    before = model(x, 0)
    same = model.add_task(1, 2, init_from=0)  # fits task 0 entirely
    for name, entry in _entries(model, same).items():
        assert _same(entry, _entries(model, 0)[name]), name
    with torch.no_grad():
        assert torch.equal(model(x, same), model(x, 0)) and torch.equal(model(x, 0), before)
    other = model.add_task(1, 3, init_from=1)  # 1 modality (task 1 has 2), 3 classes (as task 1)
    src, dst = _entries(model, 1), _entries(model, other)
    for name in dst:
        copied = _same(dst[name], src[name])
        assert copied == (not name.startswith("input_heads")), name
    assert set(model.task_parts_alike(1, other)) == {
        f"{n}.{other}" for n in dst if not n.startswith("input_heads")
    }
    fresh = model.add_task(1, 2)  # no warm start: the adapters and norms are nobody's copies
    for name, entry in _entries(model, fresh).items():
        if "depthwise" in name or "adapters" in name:
            assert not any(_same(entry, _entries(model, t)[name]) for t in range(fresh)), name


def _stats(median: float, spread: float) -> dict[str, Any]:
    return {
        "region": "foreground",
        "cases": 2,
        "voxels": 10,
        "per_modality": [
            {
                "mean": median,
                "std": spread / 4,
                "p0_5": median - spread / 2,
                "p50": median,
                "p99_5": median + spread / 2,
            }
        ],
    }


def _plans(name: str, modalities: list[str], classes: int = 2, stats: dict | None = None) -> dict[str, Any]:
    plans = synthetic_plans(name, len(modalities), classes, [8, 8, 8], [2, 2, 2])
    plans["modalities"] = modalities
    if stats is not None:
        plans["intensity_stats"] = stats
    return plans


def test_choose_init_source_modalities_first_then_intensities() -> None:
    old = [
        {"name": "MR", "plans": _plans("MR", ["MRI"], stats=_stats(100.0, 100.0))},
        {"name": "CT_far", "plans": _plans("CT_far", ["CT"], stats=_stats(-500.0, 200.0))},
        {"name": "CT_near", "plans": _plans("CT_near", ["CT"], stats=_stats(90.0, 100.0))},
        {"name": "T2ADC", "plans": _plans("T2ADC", ["T2", "ADC"])},
    ]
    new = _plans("new", ["ct"], stats=_stats(100.0, 100.0))  # names match case-insensitively
    choice = choose_init_source("auto", new, old)
    assert choice.source == "CT_near" and "nearest foreground intensities" in choice.how
    assert choose_init_source(None, new, old).source == "CT_near"  # the default is auto
    # the MR task is nearer by intensity but another modality: modality names come first
    assert intensity_distance(
        new["intensity_stats"], old[0]["plans"]["intensity_stats"]
    ) < intensity_distance(new["intensity_stats"], old[2]["plans"]["intensity_stats"])
    # plans without statistics (written before they existed): the first task with the same modalities
    no_stats = {k: v for k, v in new.items() if k != "intensity_stats"}
    choice = choose_init_source("auto", no_stats, old)
    assert choice.source == "CT_far" and "no intensity statistics" in choice.how
    old_plans = copy.deepcopy(old)
    del old_plans[2]["plans"]["intensity_stats"]
    assert "CT_near" in choose_init_source("auto", new, old_plans).how
    assert choose_init_source("auto", new, old_plans).source == "CT_far"
    # no task with these modality names: the same number of modalities, then intensities
    assert choose_init_source("auto", _plans("n", ["PET"], stats=_stats(101.0, 100.0)), old).source == "MR"
    assert (
        choose_init_source("auto", _plans("n", ["A", "B"]), old).source == "T2ADC"
    )  # the only 2-modality task
    # explicit task, none, unknown
    assert choose_init_source("MR", new, old).source == "MR"
    assert choose_init_source("none", new, old).source is None
    with pytest.raises(ValueError, match="not a task of the checkpoint"):
        choose_init_source("Task00_Nope", new, old)


def test_intensity_statistics_and_distance() -> None:
    image = np.stack([np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.full((4, 4, 4), 7.0, np.float32)])
    label = np.zeros((4, 4, 4), np.uint8)
    label[1:3, 1:3, 1:3] = 2
    samples = foreground_samples(image, label, max_samples=5)
    assert samples.shape == (2, 5) and (samples[1] == 7).all()
    assert set(samples[0]) <= set(image[0][label > 0].tolist())
    stats = summarise_samples([samples, foreground_samples(image, np.zeros_like(label))])
    assert stats is not None and stats["cases"] == 1 and len(stats["per_modality"]) == 2
    assert summarise_samples([foreground_samples(image, np.zeros_like(label))]) is None
    a, b = _stats(0.0, 10.0), _stats(10.0, 10.0)
    assert intensity_distance(a, a) == 0.0 and intensity_distance(a, b) == pytest.approx(30.0 / 20.0)
    assert intensity_distance(a, None) is None


def test_preprocessing_writes_intensity_statistics(tmp_path: Path) -> None:
    """plans.json gets the raw foreground statistics of the training cases, kept by a rerun."""
    generate_task("Task94_DemoSpleenCT", tmp_path / "data", n_train=2, n_test=0, size=16)
    run_preprocessing(tmp_path / "data", tmp_path / "prep", progress=False, log=lambda _m: None)
    plans_path = tmp_path / "prep" / "Task94_DemoSpleenCT" / "plans.json"
    stats = json.loads(plans_path.read_text())["intensity_stats"]
    assert stats["cases"] == 2 and stats["region"] == "foreground"
    (m,) = stats["per_modality"]
    assert m["p0_5"] <= m["p50"] <= m["p99_5"] and 0 < m["p50"] < 300  # the demo spleen: ~40 + 2 x 20 HU
    run_preprocessing(tmp_path / "data", tmp_path / "prep", progress=False, log=lambda _m: None)
    assert json.loads(plans_path.read_text())["intensity_stats"] == stats


# ---------------------------------------------------------------------------------------------
# the command line: a trained checkpoint, new tasks preprocessed
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/model.pt``: a universal model of A and X (perturbed weights, 8³ model patch), and the
    preprocessed tasks NEW, MORE (A's images with a third class) and TWO."""
    root = tmp_path_factory.mktemp("ext")
    prep, folds = root / "prep", {}
    for name, mods, classes, seed in ((NEW, 1, 2, 3), (MORE, 1, 3, 4), (TWO, 2, 3, 5)):
        _, folds[name] = make_synthetic_task(prep, name, num_modalities=mods, num_classes=classes, shape=(8, 12, 12),
                                             patch=(8, 8, 8), pools=(2, 2, 2), n_train=2, n_val=1, seed=seed)  # fmt: skip
    write_folds(root / "folds.json", folds)
    # NEW's foreground intensities are X's, not A's
    new_plans = json.loads((prep / NEW / "plans.json").read_text())
    new_plans["intensity_stats"] = _stats(200.0, 100.0)
    (prep / NEW / "plans.json").write_text(json.dumps(new_plans))
    torch.manual_seed(0)
    model = _perturbed(build_model("universal", [1, 1], [2, 2], base_channels=4, pools_per_axis=(2, 2, 2)))
    tasks = [
        {"name": A, "plans": _plans(A, ["MOD0"], stats=_stats(0.0, 100.0))},
        {"name": X, "plans": _plans(X, ["MOD0"], stats=_stats(190.0, 100.0))},
    ]
    save_checkpoint(
        root / "model.pt", model.config.to_dict(), tasks, model.state_dict(), model_patch=[8, 8, 8]
    )
    return root


def _prepare(root: Path, out: Path, *extra: str):
    args = ["--prep_dir", str(root / "prep"), "--folds_file", str(root / "folds.json"), "--results_dir", str(out),
            "--base_outChans", "4", "--max_epoch", "1", "--steps_per_epoch", "1", "--num_workers", "0",
            "--model_patch", "8", "8", "8", "--pools", "2", "2", "2", "--threads", "1", "--val_every", "0",
            "--save_every", "1", "--ckp", str(root / "model.pt"), *extra]  # fmt: skip
    parser = build_parser("x", ("shared", "universal"), "universal", "")
    (prep,) = prepare_runs(config_from_args(parser.parse_args(args)))
    return prep


def test_new_domain_warm_start_from_the_command_line(trained: Path, tmp_path: Path) -> None:
    """Default (auto): NEW starts as a copy of X (same modalities, nearest intensities), which the run's
    config, checkpoint, params.json and log record; --init_from none starts fresh; TWO (2 modalities,
    3 classes) copies adapters and norms only."""
    old, _ = build_model_from_checkpoint(load_checkpoint(trained / "model.pt"))
    prep = _prepare(trained, tmp_path / "auto", "--tasks", NEW)
    model, idx = prep.setup.model, prep.setup.new_task
    assert (
        idx == 2
        and prep.config.extension["init_from"] == X
        and "nearest" in prep.config.extension["init_how"]
    )
    for name, entry in _entries(model, idx).items():
        assert _same(entry, _entries(old, 1)[name]), name  # X's parameters, every one of them
    fit(prep, progress=False)
    ck = load_checkpoint(prep.run_dir / "checkpoints" / LATEST)
    assert ck["train_state"]["config"]["extension"]["init_from"] == X
    assert json.loads((prep.run_dir / "config.json").read_text())["extension"]["init_from"] == X
    report = json.loads((prep.run_dir / "params.json").read_text())
    assert report["extension"]["init_from"] == X and f"copied from {X}" in format_parameter_report(report)
    assert f"copied from {X}" in (prep.run_dir / "train_log.txt").read_text()

    fresh = _prepare(trained, tmp_path / "none", "--tasks", NEW, "--init_from", "none").setup
    assert fresh.extension is not None and fresh.extension["init_from"] is None
    for name, entry in _entries(fresh.model, 2).items():
        if "depthwise" in name:
            assert not any(_same(entry, _entries(old, t)[name]) for t in (0, 1)), name

    two = _prepare(trained, tmp_path / "two", "--tasks", TWO, "--init_from", A).setup
    copied = {n for n, e in _entries(two.model, 2).items() if _same(e, _entries(old, 0)[n])}
    assert copied == {n for n in _entries(two.model, 2) if "heads" not in n}
    assert two.extension is not None and "input head" in " ".join(two.extension["fresh"])
    with pytest.raises(ValueError, match="not a task of the checkpoint"):
        _prepare(trained, tmp_path / "bad", "--tasks", NEW, "--init_from", "Task00_Nope")
    with pytest.raises(ValueError, match="original_code"):
        _prepare(
            trained, tmp_path / "orig", "--tasks", NEW, "--init_from", A, "--adapt_scope", "original_code"
        )


# ---------------------------------------------------------------------------------------------
# growing a domain's label set
# ---------------------------------------------------------------------------------------------
def _label_plans(name: str, label_map: dict[int, int], labels: dict[int, str]) -> dict[str, Any]:
    k = len(set(label_map.values()))
    plans = _plans(name, ["CT"], k)
    plans["label_map"] = {str(r): c for r, c in label_map.items()}
    plans["labels"] = {str(c): n for c, n in labels.items()}
    return plans


def test_label_growth_keeps_existing_classes_or_is_refused() -> None:
    fused = _label_plans("Liver", {0: 0, 1: 1, 2: 1}, {0: "background", 1: "liver+tumour"})
    split = _label_plans("LiverTumour", {0: 0, 1: 1, 2: 2}, {0: "background", 1: "liver", 2: "tumour"})
    assert check_label_growth(fused, split, "Liver") == [2]  # the fused class splits: tumour becomes class 2
    assert parent_classes(fused, split, [2]) == [1]  # ... and starts as a copy of the liver class
    plain = _label_plans("Organ", {0: 0, 1: 1}, {0: "background", 1: "organ"})
    assert check_label_growth(plain, split, "Organ") == [2]  # a class from the background
    swapped = _label_plans("Swapped", {0: 0, 1: 2, 2: 1}, {0: "background", 1: "tumour", 2: "liver"})
    with pytest.raises(
        ValueError,
        match=r"renumbers or drops class 1 \(liver\+tumour\).*raw label 1 was class 1, now class 2",
    ):
        check_label_growth(fused, swapped, "Liver")
    with pytest.raises(ValueError, match="drops class"):
        check_label_growth(split, fused, "LiverTumour")
    with pytest.raises(ValueError, match="adds no class"):
        check_label_growth(fused, fused, "Liver")
    lost = _label_plans("Lost", {0: 0, 1: 0, 2: 1, 3: 2}, {0: "background", 1: "tumour", 2: "cyst"})
    with pytest.raises(ValueError, match="renumbers or drops class 1"):
        check_label_growth(fused, lost, "Liver")
    mri = {**split, "modalities": ["MRI"]}
    with pytest.raises(ValueError, match="keeps the domain's images"):
        check_label_growth(fused, mri, "Liver")
    # the summary maps the grown set back: tumour (raw 2) into the liver class it was fused into
    assert old_class_of_new(split, fused["label_map"]) == {0: 0, 1: 1, 2: 1}


@pytest.mark.parametrize(("mode", "module"), MODES[:2])
def test_add_classes_keeps_other_domains_bit_identical(mode: str, module: str | None) -> None:
    """The grown domain's heads keep their old channels' weights and get new ones; a training step with only
    that domain's parameters free leaves every other domain's outputs and every shared weight unchanged."""
    torch.manual_seed(0)
    model = _perturbed(
        build_model(mode, [1, 1], [2, 3], module=module, base_channels=4, pools_per_axis=(1, 2, 2))
    )
    model.set_fused_ops(False)
    xs = [torch.randn(1, 1, 4, 8, 8), torch.randn(1, 1, 4, 8, 8)]
    with torch.no_grad():
        before = model(xs[1], 1), model(xs[0], 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    orig = copy.deepcopy(model)
    grown = model.add_classes(0, 4)
    assert model.config.num_classes == [4, 3] and grown == ["ds_heads.1.heads.0", "output_heads.heads.0"]
    now = model.state_dict()
    for k, v in state.items():  # the grown heads' old channels and everything else: as they were
        assert torch.equal(now[k][: v.shape[0]], v) and now[k].shape[1:] == v.shape[1:], k
        grew = now[k].shape != v.shape
        assert grew == k.startswith(tuple(grown)) and (not grew or (v.shape[0], now[k].shape[0]) == (2, 4)), k
    with torch.no_grad():
        assert model(xs[0], 0).shape[1] == 4
    # started from their parents (background, class 1): the same labels as before, until trained
    warm = copy.deepcopy(orig)
    warm.add_classes(0, 4, parents=[0, 1])
    with torch.no_grad():
        logits = warm(xs[0], 0)
    # (a head with more channels may round differently: close, not bit-equal; the margin of 1 keeps the labels)
    assert torch.allclose(logits[:, :2], before[1], atol=1e-5)
    assert torch.allclose(logits[:, 2:], before[1] - 1.0, atol=1e-5)  # the parents' logits, 1 lower
    for scope in ("heads", "domain"):
        trainable = set(freeze_for_new_classes(model, 0, scope))
        own = set(split_parameters(model).per_task[0])
        assert trainable <= own and (trainable == own) == (scope == "domain")
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=5e-4)
        model(xs[0], 0).square().mean().backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in state if not torch.equal(after[k][: state[k].shape[0]], state[k])}
    assert changed and changed <= set(split_parameters(model).per_task[0])
    with torch.no_grad():
        assert torch.equal(model(xs[1], 1), before[0])  # the other domain: bit-identical
    with pytest.raises(ValueError, match="needs more"):
        model.add_classes(1, 3)


def test_grow_classes_from_the_command_line_round_trip(trained: Path, tmp_path: Path) -> None:
    """--add_classes_to A with MORE (A's label set + class 2): the domain takes MORE's name and plans, only its
    parameters train, X stays bit-identical; checkpoint, params.json, predict.py and the exported domain all
    have 3 classes; a label set that drops a class is refused."""
    old_ck = load_checkpoint(trained / "model.pt")
    old, _ = build_model_from_checkpoint(old_ck)
    prep = _prepare(trained, tmp_path / "res", "--tasks", MORE, "--add_classes_to", A)
    assert prep.setup.task_names == [MORE, X] and prep.setup.trained_tasks == [0]
    ext = prep.config.extension
    assert ext["kind"] == "new_classes" and ext["added_classes"] == {"2": "structure2"} and ext["domain"] == A
    assert ext["init"] == "fresh" and ext["parents"] == {"2": 0}  # raw label 2 was A's background
    trainable = {n for n, p in prep.setup.model.named_parameters() if p.requires_grad}
    assert trainable == set(split_parameters(prep.setup.model).per_task[0])
    fit(prep, progress=False)
    ck_path = prep.run_dir / "checkpoints" / LATEST
    ck = load_checkpoint(ck_path)
    assert [t["name"] for t in ck["tasks"]] == [MORE, X] and ck["model_config"]["num_classes"] == [3, 2]
    assert ck["tasks"][0]["plans"]["num_classes"] == 3
    grown, _ = build_model_from_checkpoint(ck)
    own = set(split_parameters(grown).per_task[0])
    for k, v in old_ck["state_dict"].items():
        if k not in own:
            assert torch.equal(ck["state_dict"][k], v), k  # shared weights and X's: bit-identical
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(grown(x, 1), old(x, 1))
        assert grown(x, 0).shape[1] == 3
    report = json.loads((prep.run_dir / "params.json").read_text())
    assert (
        report["extension"]["added_params"]
        == report["per_task"][MORE]
        - sum(old_ck["state_dict"][k].numel() for k in split_parameters(old).per_task[0])
        > 0
    )
    assert "added 2 structure2" in (prep.run_dir / "train_log.txt").read_text()
    # predict.py and the exported domain: the new label set
    data = generate_task("Task91_DemoLiverCT", tmp_path / "data", n_train=0, n_test=1, size=16)
    common = ["--input", str(data / "imagesTs"), "--no_progress"]
    assert (
        predict.main(["--ckp", str(ck_path), "--task", MORE, *common, "--output", str(tmp_path / "p")]) == 0
    )
    (out,) = sorted((tmp_path / "p").glob("*.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))) <= {0, 1, 2}
    exported = export_domain(ck_path, MORE, tmp_path / "more.pt")
    loaded = load_exported(exported.path)
    assert (
        loaded.metadata["num_classes"] == 3 and loaded.metadata["labels"] == ck["tasks"][0]["plans"]["labels"]
    )
    assert loaded.run(torch.zeros(1, 1, 8, 8, 8)).shape[1] == 3
    assert predict.main(["--model", str(exported.path), *common, "--output", str(tmp_path / "e")]) == 0
    assert np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(out))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "e" / out.name))),
    )
    # the demo summary: every class of the new label set, and the old label set under the domain's old name
    shutil.copytree(data / "labelsTs", tmp_path / "ds" / MORE / "labelsTs")
    shutil.copytree(tmp_path / "p", tmp_path / "r" / "predictions" / "grown" / MORE)
    rows = summary.evaluate_mode("grown", prep.run_dir, tmp_path / "ds", tmp_path / "r", None)
    assert [(r["task"], r["class"], r["class_name"]) for r in rows] == [
        (MORE, 1, "structure1"),
        (MORE, 2, "structure2"),
        (A, 1, "structure1"),
    ]
    # the report: the grown domain's plans (labels) and what the run added
    plans: dict[str, Any] = {}
    extensions: list[tuple[str, dict[str, Any]]] = []
    _mode_parameters("grown", [ck_path], plans, extensions)
    assert plans[MORE]["num_classes"] == 3 and extensions[0][1]["added_classes"] == {"2": "structure2"}
    assert "+ 2 structure2" in _extension_section(extensions).body
    # a label set that adds nothing (NEW has 2 classes like A) or that is another domain's
    with pytest.raises(ValueError, match="adds no class"):
        _prepare(trained, tmp_path / "r2", "--tasks", NEW, "--add_classes_to", A)
    with pytest.raises(ValueError, match="not a task of the checkpoint"):
        _prepare(trained, tmp_path / "r3", "--tasks", MORE, "--add_classes_to", "Task00_Nope")


def test_freeze_for_new_task_unchanged_by_warm_start() -> None:
    """A warm-started new domain still trains only its own parameters."""
    model = build_model("universal", [1, 1], [2, 2], base_channels=4, pools_per_axis=2)
    t = model.add_task(1, 2, init_from=1)
    assert set(freeze_for_task(model, t)) == set(split_parameters(model).per_task[t])
