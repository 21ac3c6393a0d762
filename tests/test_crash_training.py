"""Training under real faults: the scripts killed with SIGKILL, resumed, compared with an uninterrupted run.

The runs are real subprocesses of ``train_model_wt_adapters.py`` (tiny universal model, CPU, one
thread). ``tests/crashkit.py`` plants the fault: the process hangs at an exact point and is
SIGKILLed there. The points are drawn at random from a fixed seed (``U2NET_CRASH_SEED`` picks
another one).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.crashkit import finish, kill_at_marker, launch
from tests.synthetic import TINY_A, TINY_B, make_two_tiny_tasks
from training.cli import main
from training.state import LATEST, LOCK_NAME
from utils.checkpoint import load_checkpoint
from utils.io_utils import TMP_PREFIX

A, B = TINY_A, TINY_B
SCRIPT = "train_model_wt_adapters.py"
STEPS, EPOCHS = 3, 4
SEED = int(os.environ.get("U2NET_CRASH_SEED", "2"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_two_tiny_tasks(tmp_path_factory.mktemp("crash_train"))


def _flags(data: Path) -> list[str]:
    """Tiny universal run: 4 epochs of 3 steps, validation after epochs 2 and 4, numbered checkpoints
    after epochs 2 and 4 (``--results_dir`` is relative: the runs differ only in their folder)."""
    return ["--tasks", A, B, "--prep_dir", str(data / "prep"), "--folds_file", str(data / "folds.json"),
            "--results_dir", "results", "--base_outChans", "4", "--model_patch", "8", "8", "8",
            "--pools", "2", "2", "2", "--max_epoch", str(EPOCHS), "--steps_per_epoch", str(STEPS),
            "--save_every", "2", "--val_every", "2", "--val_from", "1", "--num_workers", "0",
            "--threads", "1", "--device", "cpu", "--no_progress"]  # fmt: skip


def _run_dir(cwd: Path) -> Path:
    return cwd / "results" / "res_u2net3d_universal" / f"{A}_{B}"


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts / lists / tensors equal bit for bit (``torch.equal`` on every tensor)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)  # NaN == NaN here


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_training_killed_mid_epoch_and_mid_checkpoint_write_resumes_bit_identical(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(SEED)
    flags = _flags(data)
    # 1. SIGKILL before a random step in the middle of an epoch (after the first checkpoint)
    cwd = tmp_path / "crash"
    run = _run_dir(cwd)
    k = rng.choice([s for s in range(STEPS + 2, STEPS * EPOCHS + 1) if (s - 1) % STEPS])
    first = launch(SCRIPT, flags, cwd=cwd, plan={"fault": "step", "call": k, "marker": str(tmp_path / "m1")})
    # meanwhile, the uninterrupted run of the same command line, in this process
    ref_cwd = tmp_path / "ref"
    ref_cwd.mkdir()
    with monkeypatch.context() as m:
        m.chdir(ref_cwd)
        assert (
            main(flags, prog=SCRIPT, modes=("shared", "universal"), default_mode="universal", description="")
            == 0
        )
    kill_at_marker(first, tmp_path / "m1")
    done = (k - 1) // STEPS
    assert load_checkpoint(run / "checkpoints" / LATEST)["train_state"]["state"]["epoch"] == done, k
    assert (run / LOCK_NAME).is_file()  # the dead run's lock file stays; it must not block the resume

    # 2. resume with --resume_ckp latest; SIGKILL half-way through writing the n-th checkpoint after it
    n = rng.randint(1, EPOCHS - done)
    plan = {"fault": "torch_save", "call": n, "marker": str(tmp_path / "m2")}
    kill_at_marker(launch(SCRIPT, [*flags, "--resume_ckp", "latest"], cwd=cwd, plan=plan), tmp_path / "m2")
    partial = list((run / "checkpoints").glob(f"{TMP_PREFIX}*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0, partial  # a half-written temporary file
    latest = load_checkpoint(run / "checkpoints" / LATEST)  # ... and the checkpoint before it, intact
    assert latest["train_state"]["state"]["epoch"] == done + n - 1, (k, n)

    # 3. --continue finds that checkpoint; SIGKILL right after the m-th epoch's checkpoint is in place
    # (TensorBoard must already hold that epoch's events: the resume drops everything after it)
    done += n - 1
    m = rng.randint(1, EPOCHS - done)
    plan = {"fault": "after_checkpoint", "call": m, "marker": str(tmp_path / "m3")}
    kill_at_marker(launch(SCRIPT, [*flags, "--continue"], cwd=cwd, plan=plan), tmp_path / "m3")
    done += m
    assert load_checkpoint(run / "checkpoints" / LATEST)["train_state"]["state"]["epoch"] == done, (k, n, m)

    # 4. --continue again finishes the run
    rc, out = finish(launch(SCRIPT, [*flags, "--continue"], cwd=cwd))
    assert rc == 0, out
    assert f"resumed after epoch {done}" in out

    # bit-identical to the uninterrupted run: weights, optimizer state, RNG states, histories, and
    # every checkpoint file (latest, best, numbered)
    ref_run = _run_dir(ref_cwd)
    names = sorted(p.name for p in (ref_run / "checkpoints").iterdir())
    assert names == ["best.pt", "epoch_0002.pt", "epoch_0004.pt", LATEST]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names  # no temporary file left
    for name in names:
        assert_identical(
            load_checkpoint(ref_run / "checkpoints" / name), load_checkpoint(run / "checkpoints" / name), name
        )
    assert not [p for p in run.rglob(f"{TMP_PREFIX}*")]
    # validation CSV and TensorBoard: every step exactly once, with the uninterrupted run's values
    assert (run / "val_dice.csv").read_text() == (ref_run / "val_dice.csv").read_text()
    rows = (run / "val_dice.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows].count("2") == [r.split(",")[0] for r in rows].count("4") == 3
    got, want = _scalars(run), _scalars(ref_run)
    assert set(got) == set(want) and want["loss/step"]
    for tag, events in want.items():
        assert got[tag] == events, tag
    assert [s for s, _ in got["loss/step"]] == list(range(1, STEPS * EPOCHS + 1))
    assert [s for s, _ in got["val_dice/mean"]] == [2 * STEPS, 4 * STEPS]
