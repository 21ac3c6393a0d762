"""Data-parallel training under torchrun on the CPU (gloo, 2 processes, tiny models).

* the pieces in this process: the Lovász share of the global batch, the per-task parameter lists,
  the rank-dependent loader seeds, the device rules, ``train_models.sh --gpus``;
* under torchrun (``tests/distkit.py``, hard time limits): 2 processes × batch 1 make the update of
  1 process × batch 2 (independent, shared, universal); a run where only rank 0 writes, whose rank
  0 validates longer than ``--dist_timeout`` while the other waits, and that resumes exactly; a rank
  killed with SIGKILL, one raising an exception and one stuck end the job non-zero, naming the rank.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import build_model
from tests.distkit import CASES, LR, ROOT, reference, script_args, torchrun
from tests.synthetic import TINY_A, TINY_B, make_two_tiny_tasks
from training.cli import prepare_runs
from training.config import TrainConfig
from training.data import epoch_seed
from training.distributed import (
    DistContext,
    GlobalBatchLoss,
    GradientSync,
    init_from_env,
    launched_by_torchrun,
    lovasz_share,
    process_device,
    task_parameters,
)
from training.loop import fit
from training.losses import SegmentationLoss, lovasz_softmax
from training.optim import make_optimizer
from training.state import LATEST, numbered_name
from training.step import StepOptions, train_step
from utils.checkpoint import load_checkpoint

A, B = TINY_A, TINY_B
SCRIPT = "train_model_wt_adapters.py"
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# pieces, in this process
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", ["all", "present"])
def test_lovasz_shares_add_up_to_the_global_batch_loss(classes: str) -> None:
    """Two simulated processes: the shares' values sum to the Lovász-softmax of the whole batch and
    their gradients to its gradient; the mean of per-process losses (plain data parallelism) would not."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(2, 1, 4, 5, 6)
    target[:, :, 1:3, 1:4, 2:5] = 1.0
    target[1, :, 2:3, 2:3, 3:4] = 2.0  # class 2 only in sample 1
    probas = torch.softmax(logits, dim=1)
    full = lovasz_softmax(probas, target, classes=classes)
    (g_full,) = torch.autograd.grad(full, logits, retain_graph=True)
    parts = [probas[r : r + 1] for r in range(2)]
    targets = [target[r : r + 1].to(torch.uint8) for r in range(2)]
    shares = [lovasz_share(parts[r], parts, targets, r, classes) for r in range(2)]
    total = shares[0] + shares[1]
    (g_total,) = torch.autograd.grad(total, logits, retain_graph=True)
    assert float(total.detach()) == pytest.approx(float(full.detach()), rel=1e-12)
    assert torch.allclose(g_total, g_full, rtol=1e-10, atol=1e-14)
    naive = (
        lovasz_softmax(parts[0], target[:1], classes) + lovasz_softmax(parts[1], target[1:], classes)
    ) / 2
    (g_naive,) = torch.autograd.grad(naive, logits)
    assert abs(float(naive.detach()) - float(full.detach())) > 1e-3 and (g_naive - g_full).abs().max() > 1e-3


@pytest.mark.parametrize(
    "mode,module",
    [("independent", None), ("shared", None), ("universal", "separable_adapter"),
     ("universal", "series_adapter"), ("universal", "parallel_adapter")],
)  # fmt: skip
def test_task_parameter_lists_are_what_a_step_gives_gradients(mode: str, module: str | None) -> None:
    """The parameters whose gradients are summed are exactly those a step of the task gives a gradient
    (an unlisted one would drift apart between processes, a listed one without would stop them)."""
    tasks = [(1, 2)] if mode == "independent" else [(1, 2), (2, 3)]
    torch.manual_seed(0)
    model = build_model(mode, [m for m, _ in tasks], [c for _, c in tasks], module=module, base_channels=4,
                        pools_per_axis=(2, 2, 2))  # fmt: skip
    lists = task_parameters(model, range(len(tasks)))
    for t, (modalities, _classes) in enumerate(tasks):
        model.zero_grad(set_to_none=True)
        x = torch.randn(1, modalities, 8, 8, 8)
        model(x, t).sum().backward()
        got = {id(p) for p in model.parameters() if p.grad is not None}
        assert got == {id(p) for p in lists[t]}, (mode, module, t)
    if mode != "independent":  # the task-specific parts are not sent at the other task's steps
        assert len(lists[0]) < sum(1 for _ in model.parameters())


def test_single_process_context_does_nothing_and_sync_returns_the_loss() -> None:
    ctx = init_from_env("cpu", env={})
    assert not ctx.distributed and ctx.is_main and ctx.world_size == 1 and ctx.device == CPU
    assert ctx.run_on_main(lambda: 5, "x") == 5 and ctx.broadcast_object("o") == "o"
    t = torch.ones(2)
    assert ctx.all_reduce_sum(t) is t and ctx.all_gather(t) == [t]
    model = build_model("independent", [1], [2], base_channels=4, pools_per_axis=(2, 2, 2))
    assert GradientSync(ctx, model, [0])(0, torch.tensor(1.5)) == 1.5
    ctx.close()


def test_a_process_group_of_one_exchanges_nothing() -> None:
    """torchrun with one process: the plain loss and no gradient traffic (no group exists here, so any
    collective would fail), so such a run steps like a plain one."""
    ctx = DistContext(world_size=1, backend="gloo")
    loss = SegmentationLoss()
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 2, 4, 4, 4, generator=gen), torch.randint(0, 2, (2, 1, 4, 4, 4)).float()
    assert torch.equal(GlobalBatchLoss(loss, ctx)(logits, target), loss(logits, target))
    model = build_model("independent", [1], [2], base_channels=4, pools_per_axis=(2, 2, 2))
    assert GradientSync(ctx, model, [0])(0, torch.tensor(2.5)) == 2.5


def test_torchrun_environment_and_devices() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert launched_by_torchrun(env) and not launched_by_torchrun({"RANK": "0"})
    assert process_device("cpu", 1, True) == CPU and process_device("auto", 0, False).type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        process_device("cuda:1", 0, True)
    if not torch.cuda.is_available():
        assert process_device("auto", 1, True) == CPU  # auto without CUDA: gloo on the CPU
        with pytest.raises(RuntimeError, match="CUDA"):
            process_device("cuda", 0, True)


def test_loader_seeds_depend_on_the_rank_and_rank0_keeps_the_single_process_seed() -> None:
    import numpy as np

    old = int(np.random.SeedSequence([1993, 3, 1]).generate_state(1)[0] % (2**31 - 1024))
    assert epoch_seed(1993, 3, 1) == epoch_seed(1993, 3, 1, rank=0) == old
    seeds = {epoch_seed(1993, 3, 1, rank=r) for r in range(8)}
    assert len(seeds) == 8


def test_train_models_gpus_dry_run() -> None:
    """``--gpus N`` runs every training command of the paper list under torchrun (N processes);
    TORCHRUN_ARGS replaces --standalone (several nodes); the data steps stay single processes; without
    --gpus nothing runs under torchrun."""
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", "train_models.sh", "--dry_run", "--gpus", "4"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    train = [line for line in out.splitlines() if "train_model_" in line]
    assert len(train) == 10
    assert all(
        "-m torch.distributed.run --standalone --nproc_per_node 4 train_model_" in line for line in train
    )
    assert all("torch.distributed.run" not in line for line in out.splitlines() if "preprocess" in line)
    env["TORCHRUN_ARGS"] = "--nnodes 2 --rdzv_backend c10d --rdzv_endpoint node1:29400"
    out = subprocess.run(["bash", "train_models.sh", "--dry_run", "--gpus", "8"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    train = [line for line in out.splitlines() if "train_model_" in line]
    assert all(
        "torch.distributed.run --nnodes 2 --rdzv_backend c10d --rdzv_endpoint node1:29400 --nproc_per_node 8 "
        in line
        and "--standalone" not in line
        for line in train
    )
    plain = subprocess.run(["bash", "train_models.sh", "--dry_run"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout  # fmt: skip
    assert "torch.distributed.run" not in plain and len(re.findall("train_model_", plain)) == 10


# ---------------------------------------------------------------------------------------------
# under torchrun: 2 processes x batch 1 == 1 process x batch 2
# ---------------------------------------------------------------------------------------------
def test_two_processes_batch1_equal_one_process_batch2(tmp_path: Path) -> None:
    """Per case (independent, shared, universal; universal also with Lovász over present classes and
    gradients cleared to None), every step starts from the one-process run's exact weights and Adam
    state (copied in), so nothing compared here depends on how earlier steps rounded:

    * the step's loss and every gradient the optimizer sees are those of one process with the whole
      batch, the same parameters have (zero / no) gradients;
    * both processes hold bit-identical weights after every step;
    * the weights the step produces match the one-process step wherever the gradient is well above
      float noise (elsewhere, e.g. a conv bias before an instance norm, whose true gradient is 0, Adam
      turns noise into steps of ±lr in either run). A step that used the unsynchronised local
      gradient, or none, moves those weights by about lr and fails.

    The runs compute in float64 (``tests/distkit.py``): they sum the same terms in different orders,
    which leaves differences of about 1e-15 of the largest gradient, far below the tolerances (1e-9),
    which are far below what any real difference in the update gives (1e-3 and more; see
    ``test_lovasz_shares_add_up_to_the_global_batch_loss``). In float32 the same differences reach
    2e-4 after an instance norm over a few voxels: a tolerance there passes or fails by machine.
    """
    refs = {name: reference(name) for name in CASES}  # here, in a process without a process group
    torch.save(refs, tmp_path / "reference.pt")
    rc, out, _ = torchrun([str(ROOT / "tests" / "distkit.py"), "steps", str(tmp_path)], cwd=tmp_path,
                          timeout=120)  # fmt: skip
    assert rc == 0, out[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in CASES:
        ref = refs[name]
        got, other = ranks[0][name], ranks[1][name]
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-6), name
        assert got["losses"] == other["losses"], name
        for k, (gd, gr) in enumerate(zip(got["grads"], ref["grads"], strict=True)):
            scale = max(float(g.abs().max()) for g in gr.values() if g is not None)
            for n, g in gr.items():
                assert (gd[n] is None) == (g is None), (name, k, n)
                if g is not None:
                    assert torch.allclose(gd[n], g, rtol=1e-9, atol=1e-9 * scale), (name, k, n)
            before = ref["before"][k]["model"]
            decay = ref["before"][k]["optimizer"]["param_groups"][0]["weight_decay"]
            for n, w in ref["after"][k].items():
                assert torch.equal(got["after"][k][n], other["after"][k][n]), (name, k, n)
                g = gr.get(n)
                if g is None:  # a buffer, or a parameter without a gradient in either run
                    continue
                # what Adam sees (L2 added), far above float noise: both runs step these the same
                real = (g + decay * before[n]).abs() > 1e-6 * scale
                step_ref = (w - before[n])[real]
                step_got = (got["after"][k][n] - before[n])[real]
                assert torch.allclose(step_got, step_ref, rtol=0.0, atol=1e-6 * LR), (name, k, n)
                if k == 0:  # Adam's first step moves each such weight by about lr: the check has teeth
                    assert bool((step_ref.abs() > 0.5 * LR).all()), (name, k, n)


# ---------------------------------------------------------------------------------------------
# under torchrun: the training script
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_two_tiny_tasks(tmp_path_factory.mktemp("dist_train"))


def _flags(data: Path, results: str = "results", timeout: int = 30) -> list[str]:
    """Tiny universal run: 2 epochs of 2 steps, batch 1 per process, validation after the last."""
    return ["--tasks", A, B, "--prep_dir", str(data / "prep"), "--folds_file", str(data / "folds.json"),
            "--dataset_dir", str(data / "raw"), "--results_dir", results, "--base_outChans", "4",
            "--model_patch", "8", "8", "8", "--pools", "2", "2", "2", "--batch_size", "1", "--max_epoch", "2",
            "--steps_per_epoch", "2", "--save_every", "1", "--val_every", "0", "--num_workers", "0",
            "--threads", "1", "--device", "cpu", "--no_progress", "--dist_timeout", str(timeout)]  # fmt: skip


def _run_dir(results: Path) -> Path:
    return results / "res_u2net3d_universal" / f"{A}_{B}"


def test_torchrun_rank0_writes_waits_out_validation_and_resumes_exactly(data: Path, tmp_path: Path) -> None:
    # rank 0 validates 8 s longer than the 5 s collective timeout; each process works in its own
    # folder, so whatever rank 1 wrote would show up under rank1/
    plan = {"chdir_per_rank": True, "slow_validation": {"rank": 0, "seconds": 8}}
    rc, out, _ = torchrun(script_args(plan, SCRIPT, _flags(data, timeout=5)), cwd=tmp_path, timeout=150)
    assert rc == 0, out[-4000:]
    assert [p for p in (tmp_path / "rank1").rglob("*")] == []  # rank 1 wrote nothing
    run = _run_dir(tmp_path / "rank0" / "results")
    ckdir = run / "checkpoints"
    assert {p.name for p in ckdir.glob("*.pt")} == {LATEST, "best.pt", numbered_name(1), numbered_name(2)}
    log = (run / "train_log.txt").read_text()
    assert "data parallel: 2 processes (gloo), batch per process [1, 1], global batch [2, 2]" in log
    assert log.count("epoch 1: loss") == 1 and log.count("validation after epoch 2") == 1
    assert (run / "val_dice.csv").is_file() and any((run / "tb").iterdir())
    full = load_checkpoint(ckdir / LATEST)
    assert full["train_state"]["world_size"] == 2

    # resume from epoch 1 with 2 processes (both read the checkpoint): epoch 2 again, bit for bit
    resume = ["--resume_ckp", str(run), "--resume_epoch", "1"]
    keep = tmp_path / "copy"
    shutil.copytree(run, keep)  # for the 1-process resume below
    rc, out, _ = torchrun(script_args({}, SCRIPT, _flags(data, str(tmp_path / "rank0" / "results")) + resume),
                          cwd=tmp_path, timeout=150)  # fmt: skip
    assert rc == 0, out[-4000:]
    again = load_checkpoint(ckdir / LATEST)
    for k, v in full["state_dict"].items():
        assert torch.equal(again["state_dict"][k], v), k
    hist = [(h["epoch"], h["loss"]) for h in again["train_state"]["state"]["loss_history"]]
    assert hist == [(h["epoch"], h["loss"]) for h in full["train_state"]["state"]["loss_history"]]
    assert "resumed after epoch 1" in (run / "train_log.txt").read_text()

    # the same checkpoint resumed by ONE process: it trains on, with a warning about the world size
    cfg = TrainConfig(mode="universal", tasks=[A, B], prep_dir=str(data / "prep"), folds_file=str(data / "folds.json"),
                      dataset_dir=str(data / "raw"), results_dir=str(tmp_path / "single"), base_channels=4,
                      model_patch=[8, 8, 8], pools=[2, 2, 2], batch_size=1, max_epoch=2, steps_per_epoch=2,
                      val_every=0, num_workers=0, device="cpu", threads=1)  # fmt: skip
    (prep,) = prepare_runs(cfg, str(keep), resume_epoch=1)
    state = fit(prep, progress=False)
    assert (state.epoch, state.step) == (2, 4)
    log = (keep / "train_log.txt").read_text()
    assert "written by a run of 2 process(es), this one has 1" in log
    assert load_checkpoint(keep / "checkpoints" / LATEST)["train_state"]["world_size"] == 1


@pytest.mark.parametrize(
    "kind,rank,where", [("sigkill", 1, "step"), ("raise", 0, "validation"), ("hang", 1, "step")]
)
def test_torchrun_a_failing_rank_ends_the_job(
    kind: str, rank: int, where: str, data: Path, tmp_path: Path
) -> None:
    """Rank 1 killed (SIGKILL) or stuck (alive, never joining the step's collectives) at its 2nd
    step, or rank 0 raising in its validation while rank 1 waits: the job exits non-zero within a
    bounded time (stuck: --dist_timeout 5 s), and the output names the rank."""
    plan = {"fault": {"rank": rank, "kind": kind, "where": where, "call": 2 if where == "step" else 1}}
    rc, out, seconds = torchrun(script_args(plan, SCRIPT, _flags(data, timeout=5)), cwd=tmp_path, timeout=90)
    assert rc != 0, out[-4000:]
    assert seconds < 60, (seconds, out[-4000:])
    if kind == "sigkill":  # torchrun's summary names the killed process
        assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*-9", out), out[-4000:]
        assert "Signal 9 (SIGKILL)" in out, out[-4000:]
    elif kind == "raise":  # rank 0's error, and the waiting rank 1 told about it
        assert "RuntimeError: planted failure on rank 0" in out, out[-4000:]
        assert "rank 1: rank 0 failed during the validation and checkpoint after epoch 2: RuntimeError: " \
               "planted failure on rank 0" in out, out[-4000:]  # fmt: skip
    else:  # rank 0 gave up waiting for the step's collective, and found who is missing
        assert re.search(r"rank 0: the loss's all-gather .* failed", out), out[-4000:]
        assert "Ranks 1 failed to pass monitoredBarrier" in out, out[-4000:]


def test_gradient_sync_refuses_a_listed_parameter_without_gradient() -> None:
    """A task-parameter list that names a parameter without a gradient stops the step (in every
    process alike) rather than summing mismatched buckets."""
    ctx = DistContext(rank=0, world_size=2, backend="gloo")  # no group is needed to reach the check
    model = build_model("shared", [1, 1], [2, 2], base_channels=4, pools_per_axis=(2, 2, 2))
    sync = GradientSync(ctx, model, [0, 1])
    opt = make_optimizer(model.parameters())
    x, y = torch.randn(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(RuntimeError, match="got no gradient"):
        train_step(model, opt, SegmentationLoss(), x, y, 0, StepOptions(CPU, grad_to_none=True),
                   sync=lambda t, loss: sync(1, loss))  # fmt: skip


def test_ddp_benchmark_worker_smoke(tmp_path: Path) -> None:
    """benchmarks/bench_ddp.py stays runnable: its worker, tiny, one process without torchrun."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_ddp", ROOT / "benchmarks" / "bench_ddp.py")
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    out = tmp_path / "plain.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--smoke", "--worker", "--config", "plain", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert res["world_size"] == 1 and res["median_step_s"] > 0
    assert bench.main(["--smoke", "--loss_scaling", "1", "2", "--json", str(out)]) == 0
    assert [r["world_size"] for r in json.loads(out.read_text())["loss_scaling"]] == [1, 2]


class _TwoRanks(DistContext):
    """Rank 0 of a pretend 2-process job whose rank 1 prepared ``other`` (no process group)."""

    def __init__(self, other: tuple[str, object]) -> None:
        super().__init__(rank=0, world_size=2, backend="gloo")
        self.other = other

    def all_gather_object(self, obj, what="all-gather"):  # type: ignore[no-untyped-def]
        return [obj, self.other]


@pytest.mark.parametrize(
    "other,message",
    [
        (
            ("error", "checkpoint to resume from not found"),
            "error: rank 1: checkpoint to resume from not found",
        ),
        (("ok", "a resume from step 4"), "the processes prepared different runs"),
    ],
)
def test_processes_that_prepared_different_runs_stop_before_training(
    other: tuple[str, object], message: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every process prepares the runs itself (a node that cannot read the checkpoint, or that would
    start afresh while the others resume, e.g. without a shared results folder): rank 0 stops the job
    with the other rank's reason before any training."""
    from training.cli import _train_runs, build_parser

    parser = build_parser("x", ("shared", "universal"), "universal", "")
    args = parser.parse_args(_flags(data, str(tmp_path / "results")))
    cfg = TrainConfig(mode="universal", tasks=[A, B], prep_dir=str(data / "prep"), folds_file=str(data / "folds.json"),
                      results_dir=str(tmp_path / "results"), base_channels=4, model_patch=[8, 8, 8], pools=[2, 2, 2])  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        _train_runs(parser, args, cfg, _TwoRanks(other), "x", False)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # nothing was trained or written
