"""Training: LR rule, schedule, and tiny train -> checkpoint -> resume -> predict runs of every mode."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from models.loading import build_model_from_checkpoint
from models.params import transferable_conv_weights
from tests.synthetic import make_synthetic_task, write_folds
from training.cli import build_parser, config_from_args, main, predict_run, prepare_runs
from training.config import TrainConfig, flag_fields
from training.loop import fit
from training.optim import PlateauHalving, anneal_factor, make_optimizer
from training.state import LATEST, numbered_name
from training.step import task_for_step
from training.validation import run_inference_settings
from utils.checkpoint import load_checkpoint

A, B = "Task97_TinyA", "Task98_TinyB"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny preprocessed tasks: A (1 modality, 2 classes, patch 8³) and B (2 modalities, 3 classes,
    patch (4, 8, 8), so shared/universal runs resize it to the 8³ model patch)."""
    root = tmp_path_factory.mktemp("train")
    folds = {}
    _, folds[A] = make_synthetic_task(root / "prep", A, shape=(8, 12, 12), patch=(8, 8, 8), pools=(2, 2, 2),
                                      n_train=3, n_val=1, seed=0)  # fmt: skip
    _, folds[B] = make_synthetic_task(root / "prep", B, num_modalities=2, num_classes=3, shape=(6, 12, 12),
                                      patch=(4, 8, 8), pools=(1, 2, 2), n_train=3, n_val=1, seed=1)  # fmt: skip
    write_folds(root / "folds.json", folds)
    return root


def _config(data: Path, out: Path, mode: str, tasks: list[str], **kw) -> TrainConfig:
    base = dict(
        mode=mode, tasks=tasks, prep_dir=str(data / "prep"), folds_file=str(data / "folds.json"),
        results_dir=str(out), base_channels=4, max_epoch=2, steps_per_epoch=2, save_every=1, val_every=0,
        num_workers=0, device="cpu", log_images_every=1, threads=1,
    )  # fmt: skip
    if mode != "independent":
        base.update(model_patch=[8, 8, 8], pools=[2, 2, 2])
    base.update(kw)
    return TrainConfig(**base)


def _losses(prep, **kw) -> dict[int, float]:
    got: dict[int, float] = {}
    fit(prep, progress=False, on_step=lambda s, loss: got.__setitem__(s, loss), **kw)
    return got


# ---------------------------------------------------------------------------------------------
# small pieces
# ---------------------------------------------------------------------------------------------
def test_plateau_rule_and_state() -> None:
    rule = PlateauHalving(1.0, window=3, min_delta=0.1, stop_below=0.3)
    # moving averages of 3: [3,2,1] -> 2 (first, nothing to compare); [2,1,0] -> 1 (fell by 1: keep);
    # [1,0,2] -> 1 (fell by 0 < 0.1: halve); [0,2,1] -> 1 (halve again: 0.25 < 0.3, stop)
    for loss in (3.0, 2.0, 1.0, 0.0):
        assert rule.update(loss) == 1.0
    assert rule.update(2.0) == 0.5 and not rule.should_stop
    clone = PlateauHalving(1.0)
    clone.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert clone.update(1.0) == rule.update(1.0) == 0.25
    assert rule.should_stop and clone.should_stop
    assert clone.state_dict() == rule.state_dict()


def test_round_robin_and_optimizer() -> None:
    assert [task_for_step(k, [0, 1, 2]) for k in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]
    assert [task_for_step(k, [3]) for k in (1, 2)] == [3, 3]
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    opt = make_optimizer([p, q])
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["weight_decay"] == 5e-4
    assert len(opt.param_groups[0]["params"]) == 1


def test_cli_flags_all_explained() -> None:
    parser = build_parser("x", ("shared", "universal"), "universal", "d")
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest
    args = parser.parse_args(["--tasks", A, "--amp", "--predict"])
    assert args.amp == "auto" and args.predict == []
    cfg = config_from_args(args)
    assert (cfg.max_epoch, cfg.steps_per_epoch, cfg.save_every, cfg.validation_interval, cfg.val_from) == (
        300,
        300,
        5,
        20,  # shared/universal models validate every 20 epochs (independent: 10)
        100,
    )
    assert (cfg.lr, cfg.weight_decay, cfg.seed, cfg.torch_seed, cfg.base_channels) == (
        3e-4,
        5e-4,
        1993,
        1,
        16,
    )
    assert cfg.run_dir() == Path("results") / "res_u2net3d_universal" / A
    assert cfg.folds_path() == Path("prepData") / "fold_splits.json"


@pytest.mark.parametrize("modes", [("independent", "shared"), ("shared", "universal")])
def test_cli_defaults_are_the_config_defaults(modes: tuple[str, str]) -> None:
    """Every run setting has one flag, and parsing no flags gives exactly TrainConfig's defaults."""
    parser = build_parser("x", modes, modes[0], "d")
    cfg = config_from_args(parser.parse_args(["--tasks", A]))
    assert cfg == TrainConfig(mode=modes[0], tasks=[A])
    flags = dict(flag_fields())
    # extension: no flag, filled in by an extension run (what --ckp added)
    settings = {f.name for f in fields(TrainConfig)} - {"mode", "tasks", "extension"}
    assert set(flags) == settings  # no run setting without a flag
    option_strings = {s for action in parser._actions for s in action.option_strings}
    assert set(flags.values()) <= option_strings
    # a flag reaches its field
    assert (
        config_from_args(parser.parse_args(["--tasks", A, "--no_augment", "--base_outChans", "8"])).augment
        is False
    )
    assert config_from_args(parser.parse_args(["--tasks", A, "--base_outChans", "8"])).base_channels == 8


# ---------------------------------------------------------------------------------------------
# train -> checkpoint -> resume -> predict, every mode
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["independent", "universal"])
def test_resume_from_numbered_checkpoint_and_predict(mode: str, data: Path, tmp_path: Path) -> None:
    tasks = [B] if mode == "independent" else [A, B]
    steps = 1 if mode == "independent" else 2
    # universal: one background loader process per task (MultiThreadedAugmenter), re-seeded per epoch
    workers = 0 if mode == "independent" else 1
    cfg = _config(data, tmp_path, mode, tasks, steps_per_epoch=steps, num_workers=workers)
    (prep,) = prepare_runs(cfg)
    full = _losses(prep)  # uninterrupted: 2 epochs
    assert sorted(full) == list(range(1, 2 * steps + 1))
    ckdir = prep.run_dir / "checkpoints"
    assert {p.name for p in ckdir.glob("*.pt")} == {LATEST, "best.pt", numbered_name(1), numbered_name(2)}
    # resume from the checkpoint of epoch 1 (run folder + --resume_epoch): the next steps repeat exactly
    (again,) = prepare_runs(cfg, str(prep.run_dir), resume_epoch=1)
    resumed = _losses(again)
    assert sorted(resumed) == list(range(steps + 1, 2 * steps + 1))
    for s, loss in resumed.items():
        assert loss == full[s], (s, loss, full[s])
    ck = load_checkpoint(ckdir / LATEST)
    st = ck["train_state"]["state"]
    assert (st["epoch"], st["step"], st["finished"]) == (2, 2 * steps, True)
    assert [h["epoch"] for h in st["loss_history"]] == [1, 2]
    assert ck["model_patch"] == (None if mode == "independent" else [8, 8, 8])
    # the validation CSV was truncated to epoch 1 on resume, then epoch 2 appended once
    rows = (prep.run_dir / "val_dice.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,task,class") and {r.split(",")[0] for r in rows[1:]} == {"2"}
    assert (prep.run_dir / "train_log.txt").is_file() and any((prep.run_dir / "tb").iterdir())
    # --predict val: NIfTI label maps in the original geometry (sidecar: 1-voxel crop margin)
    written = predict_run(again, ["val"], progress=False)
    assert len(written) == len(tasks)
    for path in written:
        img = nib.load(str(path))
        task = path.parent.name
        shape = (8, 12, 12) if task == A else (6, 12, 12)
        assert img.shape == tuple(s + 2 for s in shape)[::-1]  # nibabel: x, y, z
        assert np.asarray(img.dataobj).max() < (2 if task == A else 3)


def test_shared_crash_between_checkpoints_resumes_from_last(data: Path, tmp_path: Path) -> None:
    """save_every=2, crash in epoch 3: latest.pt (epoch 2) is where the run continues, exactly."""
    cfg = _config(data, tmp_path / "a", "shared", [A, B], max_epoch=3, save_every=2)
    (ref,) = prepare_runs(cfg)
    full = _losses(ref)

    cfg2 = _config(data, tmp_path / "b", "shared", [A, B], max_epoch=3, save_every=2)
    (prep,) = prepare_runs(cfg2)

    def crash(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        fit(prep, progress=False, on_step=crash)
    ckdir = prep.run_dir / "checkpoints"
    assert load_checkpoint(ckdir / LATEST)["train_state"]["state"]["epoch"] == 2
    assert (ckdir / numbered_name(2)).is_file() and not (ckdir / numbered_name(3)).exists()
    (again,) = prepare_runs(cfg2, str(prep.run_dir))
    resumed = _losses(again)
    assert resumed == {5: full[5], 6: full[6]}
    a = load_checkpoint(ref.run_dir / "checkpoints" / LATEST)["state_dict"]
    b = load_checkpoint(ckdir / LATEST)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("order", ["original", "same_epoch"])
def test_lr_stop_order_checkpoints_and_resume(order: str, data: Path, tmp_path: Path) -> None:
    """The rate halves every epoch from epoch 2 (window 1, any change is a plateau) and falls below
    --lr_stop after epoch 3. The original's order trains epoch 4 at that rate, validates and stops;
    'same_epoch' stops after epoch 3. A resume from epoch 3's checkpoint finishes exactly like the run."""
    cfg = _config(data, tmp_path, "independent", [A], max_epoch=10, steps_per_epoch=1, save_every=100,
                  lr=1e-3, lr_window=1, lr_min_delta=1e9, lr_stop=3e-4, lr_stop_order=order,
                  log_images_every=0)  # fmt: skip
    (prep,) = prepare_runs(cfg)
    full = _losses(prep)
    last = 4 if order == "original" else 3
    assert sorted(full) == list(range(1, last + 1))
    ckdir = prep.run_dir / "checkpoints"
    st = load_checkpoint(ckdir / LATEST)["train_state"]["state"]
    assert (st["epoch"], st["finished"], st["lr_rule"]["stopped"]) == (last, True, True)
    assert [h["lr"] for h in st["loss_history"]] == [1e-3, 1e-3, 5e-4, 2.5e-4][:last]
    assert [v["epoch"] for v in st["val_history"]] == [last]  # --val_every 0: the last epoch only
    # numbered: the epoch whose halving ran the rate out (the original saved it) and the last
    assert {p.name for p in ckdir.glob("epoch_*.pt")} == {numbered_name(3), numbered_name(last)}
    (again,) = prepare_runs(cfg, str(prep.run_dir), resume_epoch=3)
    resumed = _losses(again)
    assert resumed == ({4: full[4]} if order == "original" else {})
    (done,) = prepare_runs(cfg, "latest")  # a finished run has nothing left to train
    assert _losses(done) == {}


def test_anneal_factor_curve() -> None:
    assert [anneal_factor(k, 10, 0.0) for k in range(10)] == [1.0] * 10  # off: the preset
    f = [anneal_factor(k, 10, 0.5) for k in range(10)]
    assert f[:5] == [1.0] * 5  # the first half at the rule's rate
    assert all(a > b for a, b in zip(f[4:], f[5:], strict=False))  # then strictly falling
    assert 0.0 < f[-1] < 0.1  # the last step still trains, at a small rate
    assert anneal_factor(7, 10, 0.5) == pytest.approx(0.5 * (1 + np.cos(np.pi * 3 / 6)))
    with pytest.raises(ValueError, match="fraction"):
        anneal_factor(0, 10, 1.5)
    with pytest.raises(ValueError, match="lr_anneal"):
        TrainConfig(mode="independent", tasks=[A], lr_anneal=-0.1)


def test_lr_anneal_sets_each_steps_rate_and_resumes_on_the_curve(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--lr_anneal 0.75 over 2 x 2 steps: step 1 at the full rate, steps 2-4 on the cosine; a run
    resumed after epoch 1 trains steps 3-4 at the same rates as the uninterrupted run."""
    import training.loop as loop

    rates: list[float] = []
    real = loop.train_step

    def spy(model, optimizer, *args, **kw):
        rates.append(optimizer.param_groups[0]["lr"])
        return real(model, optimizer, *args, **kw)

    monkeypatch.setattr(loop, "train_step", spy)
    cfg = _config(data, tmp_path, "independent", [A], lr=1e-3, lr_anneal=0.75, log_images_every=0)
    (prep,) = prepare_runs(cfg)
    _losses(prep)
    want = [1e-3 * anneal_factor(k, 4, 0.75) for k in range(4)]
    assert rates == pytest.approx(want) and rates[0] == 1e-3 and rates[1] < 1e-3
    rates.clear()
    (again,) = prepare_runs(cfg, str(prep.run_dir), resume_epoch=1)
    _losses(again)
    assert rates == pytest.approx(want[2:])


# ---------------------------------------------------------------------------------------------
# new domain
# ---------------------------------------------------------------------------------------------
def test_new_domain_freezes_shared_and_keeps_old_tasks(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    common = ["--prep_dir", str(data / "prep"), "--folds_file", str(data / "folds.json"), "--results_dir", str(out),
              "--base_outChans", "4", "--max_epoch", "1", "--steps_per_epoch", "1", "--num_workers", "0",
              "--model_patch", "8", "8", "8", "--pools", "2", "2", "2", "--threads", "1", "--no_progress"]  # fmt: skip
    kw = dict(
        prog="train_model_wt_adapters.py",
        modes=("shared", "universal"),
        default_mode="universal",
        description="",
    )
    assert main(["--tasks", A, *common], **kw) == 0
    old_path = out / "res_u2net3d_universal" / A / "checkpoints" / "best.pt"
    old_ckpt = load_checkpoint(old_path)
    old_model, _ = build_model_from_checkpoint(old_ckpt)

    cfg = config_from_args(build_parser(**{k: kw[k] for k in ("prog", "modes", "default_mode")}, description="").parse_args(
        ["--tasks", B, *common, "--steps_per_epoch", "2", "--ckp", str(old_path), "--out_tag", "adapted",
         "--init_from", A]))  # fmt: skip
    (prep,) = prepare_runs(cfg)
    model = prep.setup.model
    new = prep.setup.new_task
    assert new == 1 and prep.setup.trained_tasks == [1]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".1." in n for n in trainable)  # entry 1 of the per-task lists only
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fit(prep, progress=False)

    ck = load_checkpoint(prep.run_dir / "checkpoints" / LATEST)
    assert [t["name"] for t in ck["tasks"]] == [A, B]
    adapted, _ = build_model_from_checkpoint(ck)
    before = old_ckpt["state_dict"]
    after = ck["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # every old weight bit-identical
    new_keys = [k for k in after if k not in before]
    assert new_keys and all(".1." in k for k in new_keys)
    assert any(not torch.equal(init[n], after[n]) for n in init)  # the new task's parameters did train
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(old_model(x, 0), adapted(x, 0))  # old task's output bit-identical
    report = json.loads((prep.run_dir / "params.json").read_text())
    assert report["new_task"] == B and report["new_task_params"] == report["per_task"][B] > 0
    assert report["trainable"] == report["new_task_params"]
    assert report["total"] == sum(p.numel() for p in old_model.parameters()) + report["new_task_params"]


def test_gpu_benchmark_script_smoke(tmp_path: Path) -> None:
    """benchmarks/bench_train_gpu.py stays runnable (tiny, CPU)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_train_gpu", Path(__file__).parent.parent / "benchmarks" / "bench_train_gpu.py"
    )
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--configs", "universal_fp32", "--steps", "1", "--warmup", "1", "--workers", "0",
                       "--json", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())["results"][0]
    assert (
        res["config"] == "universal_fp32"
        and res["median_step_s"] > 0
        and isinstance(res["loader_kept_up"], bool)
    )


def test_preset_validation_interval_per_mode() -> None:
    """The original validated independent models every 10 epochs and shared/universal ones every 20."""
    assert TrainConfig(mode="independent", tasks=[A]).validation_interval == 10
    for mode in ("shared", "universal"):
        cfg = TrainConfig(mode=mode, tasks=[A])
        assert cfg.validation_interval == 20
        assert [e for e in range(1, 161) if cfg.should_validate(e)] == [100, 120, 140, 160]
    assert TrainConfig(mode="shared", tasks=[A], val_every=10).validation_interval == 10
    assert not any(
        TrainConfig(mode="shared", tasks=[A], val_every=0).should_validate(e) for e in range(1, 301)
    )


def test_validation_uses_the_runs_precision() -> None:
    """A bf16 run validates (and predicts) in bf16, an fp32 run in fp32; the sliding window is the preset's."""
    cpu = torch.device("cpu")
    for amp, expected in (("bf16", "bf16"), ("auto", "bf16"), ("off", "off")):
        settings = run_inference_settings(TrainConfig(mode="shared", tasks=[A], amp=amp), cpu)
        assert settings.amp == expected
    settings = run_inference_settings(TrainConfig(mode="shared", tasks=[A], val_postprocess=False), cpu)
    assert not settings.postprocess and settings.step_fraction == 0.5 and settings.weight_mode == "linear"


def test_new_domain_like_the_original_code(data: Path, tmp_path: Path) -> None:
    """--adapt_scope original_code: a new model of the new task only; the encoder/decoder units' shared
    conv weights are copied from the trained model and stay frozen; their biases, the downsampling
    convs, norms, adapters and heads train from a fresh start; a resume keeps the same parameters frozen."""
    out = tmp_path / "res"
    common = ["--prep_dir", str(data / "prep"), "--folds_file", str(data / "folds.json"), "--results_dir", str(out),
              "--base_outChans", "4", "--max_epoch", "1", "--steps_per_epoch", "1", "--num_workers", "0",
              "--model_patch", "8", "8", "8", "--pools", "2", "2", "2", "--threads", "1", "--no_progress"]  # fmt: skip
    kw = dict(prog="x", modes=("shared", "universal"), default_mode="universal", description="")
    assert main(["--tasks", A, *common], **kw) == 0
    old_path = out / "res_u2net3d_universal" / A / "checkpoints" / "best.pt"
    old = load_checkpoint(old_path)["state_dict"]
    parser = build_parser("x", ("shared", "universal"), "universal", "")
    args = [
        *common,
        "--max_epoch",
        "2",
        "--ckp",
        str(old_path),
        "--out_tag",
        "orig",
        "--adapt_scope",
        "original_code",
    ]
    (prep,) = prepare_runs(config_from_args(parser.parse_args(["--tasks", B, *args])))
    model = prep.setup.model
    assert prep.setup.task_names == [B] and model.config.in_channels == [2] and model.num_tasks == 1
    copied = set(transferable_conv_weights(model))
    assert copied and all(k.endswith(".pointwise.weight") for k in copied)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == copied
    assert not any(k.startswith(("downsamples.", "decoders.0.up_unit")) for k in frozen)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not torch.equal(start["downsamples.0.conv.weight"], old["downsamples.0.conv.weight"])  # fresh
    fit(prep, progress=False)
    ck = load_checkpoint(prep.run_dir / "checkpoints" / LATEST)
    after = ck["state_dict"]
    assert all(torch.equal(after[k], old[k]) for k in copied)  # copied and frozen
    bias = next(iter(copied)).replace(".weight", ".bias")
    assert not torch.equal(after[bias], start[bias])  # the copied convs' biases train
    assert not torch.equal(after["downsamples.0.conv.weight"], start["downsamples.0.conv.weight"])
    report = json.loads((prep.run_dir / "params.json").read_text())
    assert report["trainable"] == report["total"] - sum(after[k].numel() for k in copied)
    assert sorted(ck["train_state"]["frozen_parameters"]) == sorted(copied)
    (again,) = prepare_runs(config_from_args(parser.parse_args(["--tasks", B, *args])), str(prep.run_dir))
    assert {n for n, p in again.setup.model.named_parameters() if not p.requires_grad} == copied
