"""Data-parallel test kit: launch torchrun on the CPU (gloo), plant per-rank faults, compare steps.

    python tests/distkit.py steps OUT_DIR              (under torchrun) the equivalence steps of CASES
    python tests/distkit.py run PLAN_JSON SCRIPT ARGS  (under torchrun) SCRIPT with the plan's faults

``PLAN_JSON`` (every key optional)::

    {"chdir_per_rank": true,                   # each process works in ./rank<RANK>/ (relative paths
                                               # then show which process wrote what)
     "fault": {"rank": 1, "kind": "sigkill" | "raise" | "hang", "where": "step" | "validation",
               "call": n},                     # at that rank's n-th training step / validation
     "slow_validation": {"rank": 0, "seconds": s}}   # validation takes s seconds longer

The tests call :func:`torchrun`, which runs ``python -m torch.distributed.run --standalone`` in its
own session with a hard time limit: on expiry the whole process group (agent and workers) is killed,
so nothing can hang the test suite.
"""

from __future__ import annotations

import copy
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models import build_model  # noqa: E402
from training.distributed import GlobalBatchLoss, GradientSync, init_from_env  # noqa: E402
from training.losses import SegmentationLoss  # noqa: E402
from training.optim import make_optimizer  # noqa: E402
from training.step import StepOptions, train_step  # noqa: E402

CPU = torch.device("cpu")

#: the equivalence cases: name -> (mode, module, steps, Lovász classes, gradients to None)
CASES: dict[str, tuple[str, str | None, int, str, bool]] = {
    "independent": ("independent", None, 3, "all", False),
    "shared": ("shared", None, 4, "all", False),
    "universal": ("universal", "separable_adapter", 4, "all", False),
    "universal_present_grad_none": ("universal", "separable_adapter", 4, "present", True),
}
#: tasks of the tiny models: (modalities, classes)
TASKS = [(1, 2), (2, 3)]
#: Adam's learning rate in the equivalence cases
LR = 1e-3


def case_model(name: str) -> torch.nn.Module:
    mode, module, *_ = CASES[name]
    tasks = TASKS[:1] if mode == "independent" else TASKS
    torch.manual_seed(1)
    return build_model(
        mode,
        [m for m, _ in tasks],
        [c for _, c in tasks],
        module=module,
        base_channels=4,
        pools_per_axis=(2, 2, 2),
    ).double()  # float64: the runs compared differ only by how they sum, not by float32 rounding


def case_batches(name: str) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per step: (task, image (2, M, 8, 8, 8), label (2, 1, 8, 8, 8)); round robin over the model's tasks.

    Sample 1 holds every class of its task, sample 0 only background and class 1: the classes
    present in the global batch differ from those of sample 0 alone."""
    mode, _, steps, _, _ = CASES[name]
    num_tasks = 1 if mode == "independent" else len(TASKS)
    gen = torch.Generator().manual_seed(7)
    out = []
    for k in range(steps):
        t = k % num_tasks
        modalities, classes = TASKS[t]
        label = torch.zeros(2, 1, 8, 8, 8)
        label[:, :, 2:6, 1:6, 2:7] = 1.0
        if classes > 2:
            label[1, :, 3:5, 2:4, 3:6] = 2.0
        image = label * 1.5 + torch.randn(2, modalities, 8, 8, 8, generator=gen, dtype=torch.float64)
        out.append((t, image, label))
    return out


def run_case(
    name: str,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    samples: slice,
    sync: Callable[[int, torch.Tensor], float] | None = None,
    start_states: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``samples`` of every step's batch (Adam, lr :data:`LR`).

    Args:
        start_states: if given, before step k the model and optimizer are loaded from
            ``start_states[k]`` (the reference's states before its step k), so that every step starts
            from the reference's exact weights and Adam moments.

    Returns:
        ``{"losses": [...], "grads": [{name: grad or None}], "before": [states], "after": [weights]}``:
        per step the loss, every parameter's gradient as the optimizer got it (after ``sync``), the
        model and optimizer states before the step and the weights after it.
    """
    *_, grad_none = CASES[name]
    optimizer = make_optimizer(model.parameters(), lr=LR)
    options = StepOptions(CPU, None, channels_last=False, grad_to_none=grad_none, dtype=torch.float64)
    out: dict[str, Any] = {"losses": [], "grads": [], "before": [], "after": []}

    def capture(task_idx: int, loss: torch.Tensor) -> float:
        value = float(loss) if sync is None else sync(task_idx, loss)
        out["grads"].append(
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        )
        return value

    for k, (t, image, label) in enumerate(case_batches(name)):
        if start_states is not None:
            model.load_state_dict(start_states[k]["model"])
            optimizer.load_state_dict(start_states[k]["optimizer"])
        out["before"].append(
            {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}
        )
        res = train_step(model, optimizer, loss_fn, image[samples], label[samples], t, options, sync=capture)
        out["losses"].append(res.loss)
        out["after"].append(copy.deepcopy(model.state_dict()))
    return out


def reference(name: str) -> dict[str, Any]:
    """One process, batch 2: per step the loss, gradients, starting states and resulting weights that a
    2-process run must reproduce (on one thread: tiny tensors gain nothing from more, and on a busy
    machine lose a lot)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = case_model(name)
        classes = CASES[name][3]
        return run_case(name, model, SegmentationLoss(classes=classes), slice(0, 2))
    finally:
        torch.set_num_threads(threads)


def steps_worker(out_dir: str) -> None:
    """Under torchrun: every case with batch 1 per process (rank r takes sample r), each step started
    from the states of ``OUT_DIR/reference.pt`` ({case: :func:`reference`}, computed by the test in a
    process without a process group). Writes ``rank<r>.pt`` = {case: run_case's dict}."""
    refs = torch.load(Path(out_dir) / "reference.pt")
    ctx = init_from_env("cpu", timeout_s=60)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    try:
        for name in CASES:
            model = case_model(name)
            ctx.broadcast_parameters(model)
            classes = CASES[name][3]
            tasks = [0] if CASES[name][0] == "independent" else list(range(len(TASKS)))
            loss_fn = GlobalBatchLoss(SegmentationLoss(classes=classes), ctx)
            sync = GradientSync(ctx, model, tasks)
            results[name] = run_case(
                name, model, loss_fn, slice(ctx.rank, ctx.rank + 1), sync, start_states=refs[name]["before"]
            )
        torch.save(results, Path(out_dir) / f"rank{ctx.rank}.pt")
    finally:
        ctx.close()


# ----------------------------------------------------------------------------------------------
# faults planted into the training scripts
# ----------------------------------------------------------------------------------------------
def _install(plan: dict[str, Any], rank: int) -> None:
    import training.loop as loop  # the module the scripts' training loop runs in

    fault = plan.get("fault")
    if fault and int(fault["rank"]) == rank:
        name = "_validate_and_log" if fault.get("where") == "validation" else "train_step"
        real = getattr(loop, name)
        calls = 0

        def faulty(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == int(fault.get("call", 1)):
                kind = fault["kind"]
                if kind == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if kind == "raise":
                    raise RuntimeError(f"planted failure on rank {rank}")
                while True:  # "hang": alive, but never joins the collectives
                    time.sleep(60)
            return real(*args, **kwargs)

        setattr(loop, name, faulty)
    slow = plan.get("slow_validation")
    if slow and int(slow["rank"]) == rank:
        real_validate = loop._validate_and_log

        def validate(*args: Any, **kwargs: Any) -> Any:
            time.sleep(float(slow["seconds"]))
            return real_validate(*args, **kwargs)

        loop._validate_and_log = validate  # type: ignore[assignment]


def script_worker(plan: dict[str, Any], script: str, args: list[str]) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if plan.get("chdir_per_rank"):
        work = Path.cwd() / f"rank{rank}"
        work.mkdir(parents=True, exist_ok=True)
        os.chdir(work)
    _install(plan, rank)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


# ----------------------------------------------------------------------------------------------
# the launcher the tests use
# ----------------------------------------------------------------------------------------------
def torchrun(
    args: list[str], *, cwd: str | os.PathLike[str], timeout: float = 120.0, nproc: int = 2
) -> tuple[int, str, float]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N ARGS`` in ``cwd``, one thread
    per process. Returns (exit status, output, seconds). Killed with its workers after ``timeout``
    (then an AssertionError)."""
    Path(cwd).mkdir(parents=True, exist_ok=True)
    log = Path(cwd) / f"torchrun-{time.monotonic_ns()}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            raise AssertionError(
                f"torchrun still running after {timeout} s:\n{log.read_text(errors='replace')[-4000:]}"
            ) from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - t0
    return proc.returncode, log.read_text(errors="replace"), seconds


def script_args(plan: dict[str, Any], script: str, args: list[str]) -> list[str]:
    """torchrun arguments that run ``SCRIPT ARGS`` of the repository under this kit with ``plan``."""
    return [str(Path(__file__).resolve()), "run", json.dumps(plan), str(ROOT / script), *args]


if __name__ == "__main__":
    if sys.argv[1] == "steps":
        steps_worker(sys.argv[2])
    elif sys.argv[1] == "run":
        script_worker(json.loads(sys.argv[2]), sys.argv[3], sys.argv[4:])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r} (steps, run)")
