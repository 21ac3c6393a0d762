"""Run one of the project's scripts with a fault planted at an exact point, for the crash tests.

    python tests/crashkit.py PLAN_JSON SCRIPT [ARGS...]

``PLAN_JSON`` is ``{"fault": NAME, "call": n, "marker": PATH}``. At the ``n``-th call of the
patched function the fault touches ``marker`` and then hangs, so that the test can SIGKILL the
process at exactly that point (nothing is added to the production code for this):

* ``step``        -- ``training.loop.train_step``: before optimisation step ``n`` of this process.
* ``after_checkpoint`` -- ``training.loop.save_training_checkpoint``: just after the ``n``-th
  epoch's checkpoint files are in place.
* ``torch_save``  -- ``torch.save``: half the serialised checkpoint is in the temporary file.
* ``np_save``     -- ``numpy.save``: half the ``.npy`` bytes are in the temporary file.
* ``nifti_write`` -- ``SimpleITK.WriteImage``: the temporary ``.nii.gz`` is cut to half its size.

The script then runs as ``__main__`` with ``SCRIPT ARGS...`` as its command line. Without a fault
(``{}``) it is a plain run. The tests use :func:`launch`, :func:`kill_at_marker` and :func:`finish`.
"""

from __future__ import annotations

import importlib
import io
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

#: fault name -> the (module, function) it replaces
TARGETS = {
    "step": ("training.loop", "train_step"),
    "after_checkpoint": ("training.loop", "save_training_checkpoint"),
    "torch_save": ("torch", "save"),
    "np_save": ("numpy", "save"),
    "nifti_write": ("SimpleITK", "WriteImage"),
}


def _hang(marker: str) -> None:
    Path(marker).touch()
    while True:  # until the test kills the process
        time.sleep(60)


def _half_write(serialise: Callable[[io.BytesIO], None], f: Any, marker: str) -> None:
    buf = io.BytesIO()
    serialise(buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    _hang(marker)


def _fault(name: str, real: Callable[..., Any], marker: str) -> Callable[..., Any]:
    """What the n-th call does instead of ``real``."""
    if name == "step":
        return lambda *a, **k: _hang(marker)
    if name == "after_checkpoint":
        return lambda *a, **k: (real(*a, **k), _hang(marker))
    if name == "torch_save":
        return lambda obj, f, *a, **k: _half_write(lambda b: real(obj, b), f, marker)
    if name == "np_save":
        return lambda f, arr, *a, **k: _half_write(lambda b: real(b, arr, *a, **k), f, marker)

    def cut(image: Any, path: str, *a: Any, **k: Any) -> None:  # nifti_write
        real(image, path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        _hang(marker)

    return cut


def install(plan: dict[str, Any]) -> None:
    """Patch the function the plan names (see the module docstring)."""
    if not plan:
        return
    name, n, marker = plan["fault"], int(plan["call"]), str(plan["marker"])
    module_name, attr = TARGETS[name]
    module = importlib.import_module(module_name)  # the module the script will use
    real = getattr(module, attr)
    fault = _fault(name, real, marker)
    calls = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return fault(*args, **kwargs) if calls == n else real(*args, **kwargs)

    setattr(module, attr, wrapped)


def launch(
    script: str | os.PathLike[str],
    args: list[str],
    *,
    cwd: str | os.PathLike[str],
    plan: dict[str, Any] | None = None,
    log: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``SCRIPT ARGS`` (a path relative to the repository) under this helper in ``cwd``,
    its output going to ``log`` (default: a new ``run-*.log`` in ``cwd``; see :func:`output`)."""
    Path(cwd).mkdir(parents=True, exist_ok=True)
    out = open(log or Path(cwd) / f"run-{time.monotonic_ns()}.log", "wb")  # the child writes it
    cmd = [sys.executable, str(Path(__file__).resolve()), json.dumps(plan or {}), str(ROOT / script), *args]
    # one thread per process: tiny tensors gain nothing from more, and busy-waiting OpenMP threads on
    # a loaded 2-core CI machine make a run many times slower
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    proc.log_path = out.name  # type: ignore[attr-defined]
    out.close()
    return proc


def output(proc: subprocess.Popen[bytes]) -> str:
    """What the process printed so far."""
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def kill_at_marker(
    proc: subprocess.Popen[bytes], marker: str | os.PathLike[str], timeout: float = 120.0
) -> None:
    """Wait until the planted fault has touched ``marker``, then SIGKILL the process."""
    t_end = time.monotonic() + timeout
    while not Path(marker).exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"process ended (rc {proc.returncode}) before the fault:\n{output(proc)[-3000:]}"
            )
        if time.monotonic() > t_end:
            proc.kill()
            raise AssertionError(f"fault not reached within {timeout} s:\n{output(proc)[-3000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def finish(proc: subprocess.Popen[bytes], timeout: float = 240.0) -> tuple[int, str]:
    """Wait for the process; returns its exit status and output."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {timeout} s:\n{output(proc)[-3000:]}") from None
    return proc.returncode, output(proc)


def main(argv: list[str]) -> None:
    plan = json.loads(argv[0])
    script = argv[1]
    install(plan)
    sys.argv = [script, *argv[2:]]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
