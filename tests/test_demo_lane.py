"""demo.lane: the demo's jobs in one warm Python process -- parsing, order, logs, failure, waiting, and a
training run whose checkpoint is bit-identical to the same command run as its own process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from demo.lane import Job, Lane, failed_marker, fork_is_safe, main, parse_jobs
from tests.synthetic import TINY_A, TINY_B, make_two_tiny_tasks
from utils.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MODES = [pytest.param(True, id="fork"), pytest.param(False, id="subprocess")]


def test_parse_jobs() -> None:
    jobs = parse_jobs(["--log", "a.log", "x.py", "1", "--flag", ":::", "--after", "d", "--done", "e", "-m", "pkg.mod",
                       "-v", ":::"])  # fmt: skip
    assert jobs == [
        Job(("x.py", "1", "--flag"), log=Path("a.log")),
        Job(("-m", "pkg.mod", "-v"), after=Path("d"), done=Path("e")),
    ]
    for bad, why in [
        (["--log", "a", ":::", "x.py"], "job 1: no command"),
        (["x.py", ":::", ":::", "y.py"], "job 2: no command"),
        (["--log"], "needs a file"),
        (["--wait", "f", "x.py"], "unknown option --wait"),
        (["-m"], "-m needs a module"),
        (["train.sh", "1"], "not a Python script"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_jobs(bad)


def _script(path: Path, body: str) -> str:
    path.write_text("import sys\n" + body)
    return str(path)


@pytest.mark.parametrize("fork", MODES)
def test_lane_runs_in_order_logs_and_stops_at_the_first_failure(
    tmp_path: Path, fork: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    if fork and not fork_is_safe():
        pytest.skip("forked jobs only on Linux")
    trace = tmp_path / "trace.txt"
    ok = _script(tmp_path / "ok.py", f"open({str(trace)!r}, 'a').write(sys.argv[1] + '\\n')\nprint('out', sys.argv[1])\n"
                                     "print('err', sys.argv[1], file=sys.stderr)\n")  # fmt: skip
    bad = _script(tmp_path / "bad.py", "print('about to fail')\nsys.exit(3)\n")
    log1, log2 = tmp_path / "one.log", tmp_path / "two.log"
    done1, done2 = tmp_path / "one.done", tmp_path / "two.done"
    jobs = [
        Job((ok, "first"), log=log1, done=done1),
        Job((ok, "second"), log=log1),
        Job((bad,), log=log2, done=done2),
        Job((ok, "never"), log=log1),
    ]
    assert Lane(fork).run(jobs) == 1
    assert trace.read_text().split() == ["first", "second"]  # in order; nothing after the failure
    assert sorted(log1.read_text().splitlines()) == sorted(
        ["out first", "err first", "out second", "err second"]
    )
    assert log2.read_text().splitlines() == ["about to fail"]
    assert done1.exists() and not failed_marker(done1).exists()
    assert failed_marker(done2).exists() and not done2.exists()
    err = capsys.readouterr().err
    assert "failed (exit status 3)" in err and "about to fail" in err  # the log's end on the lane's stderr


@pytest.mark.parametrize("fork", MODES)
def test_lane_waits_for_a_file_and_gives_up_when_its_job_failed(tmp_path: Path, fork: bool) -> None:
    if fork and not fork_is_safe():
        pytest.skip("forked jobs only on Linux")
    trace = tmp_path / "trace.txt"
    ok = _script(tmp_path / "ok.py", f"open({str(trace)!r}, 'a').write(sys.argv[1] + '\\n')\n")
    gate = tmp_path / "gate.done"
    timer = threading.Timer(0.3, lambda: (trace.write_text("gate\n"), gate.touch()))
    timer.start()
    assert Lane(fork).run([Job((ok, "after_gate"), after=gate)], poll_s=0.05) == 0
    timer.join()
    assert trace.read_text().split() == ["gate", "after_gate"]  # started only once the file was there

    other = tmp_path / "other.done"
    failed_marker(other).touch()
    assert Lane(fork).run([Job((ok, "blocked"), after=other)], poll_s=0.05) == 1
    assert "blocked" not in trace.read_text()


def test_module_jobs_and_uncaught_exceptions(tmp_path: Path) -> None:
    """``-m module`` runs the module as __main__ (here in a subprocess lane: the module need not be
    importable by the test process); an uncaught exception fails the job with its traceback in the log."""
    pkg = tmp_path / "lanepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "hello.py").write_text(
        "import sys\nif __name__ == '__main__':\n    print('hello', *sys.argv[1:])\n"
    )
    (pkg / "boom.py").write_text("raise RuntimeError('boom')\n")
    log = tmp_path / "m.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    cmd = [sys.executable, "-m", "demo.lane", "--log", str(log), "-m", "lanepkg.hello", "a", "b", ":::",
           "--log", str(log), "-m", "lanepkg.boom"]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    text = log.read_text()
    assert "hello a b" in text and "RuntimeError: boom" in text


def test_lane_options_times_and_preload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--times`` records every job (start <= end, status, command); ``--preload`` of a missing module is
    a clear error before any job runs."""
    monkeypatch.setenv("DEMO_LANE_FORK", "0")  # subprocess jobs: the test process stays as it is
    ok = _script(tmp_path / "ok.py", "print(sys.argv[1])\n")
    bad = _script(tmp_path / "bad.py", "sys.exit(4)\n")
    times = tmp_path / "times.tsv"
    log = tmp_path / "log.txt"
    assert main(["--times", str(times), "--log", str(log), ok, "x", ":::", "--log", str(log), bad]) == 1
    lines = [line.split("\t") for line in times.read_text().splitlines()]
    assert [(st, cmd) for _, _, st, cmd in lines] == [("0", f"{ok} x"), ("4", bad)]
    assert all(float(a) <= float(b) for a, b, _, _ in lines)
    if fork_is_safe():
        monkeypatch.setenv("DEMO_LANE_FORK", "1")
        assert main(["--preload", "no_such_module_xyz", "--log", str(log), ok, "never"]) == 2
        assert "never" not in log.read_text()
    assert main(["--times"]) == 2


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "best.pt")["state_dict"]


@pytest.mark.skipif(not fork_is_safe(), reason="forked jobs only on Linux")
def test_training_in_a_warm_lane_gives_the_checkpoint_of_its_own_process(tmp_path: Path) -> None:
    data = make_two_tiny_tasks(tmp_path / "data")
    flags = ["--tasks", TINY_A, TINY_B, "--prep_dir", str(data / "prep"), "--folds_file", str(data / "folds.json"),
             "--results_dir", "results", "--base_outChans", "4", "--model_patch", "8", "8", "8", "--pools", "2", "2",
             "2", "--max_epoch", "2", "--steps_per_epoch", "3", "--val_every", "0", "--num_workers", "0",
             "--threads", "1", "--device", "cpu", "--no_progress", "--seed", "5", "--torch_seed", "5"]  # fmt: skip
    script = str(ROOT / "train_model_wt_adapters.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    own, lane = tmp_path / "own", tmp_path / "lane"
    own.mkdir()
    lane.mkdir()
    subprocess.run(
        [sys.executable, script, *flags], cwd=own, env=env, check=True, capture_output=True, timeout=300
    )
    out = subprocess.run([sys.executable, "-m", "demo.lane", "--log", str(lane / "train.log"), script, *flags],
                         cwd=lane, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr + (lane / "train.log").read_text()
    run = Path("results") / "res_u2net3d_universal" / f"{TINY_A}_{TINY_B}"
    a, b = _state(own / run), _state(lane / run)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "epoch 2" in (lane / "train.log").read_text()  # the run's output went to the job's log
