"""One lane of the laptop demo: several script runs one after another in ONE warm Python process.

    python -m demo.lane [--times FILE] [--preload MOD,...] --log L1 train_model_no_adapters.py ARGS... ::: \\
                        --after DONE --log L2 predict.py ARGS... ::: \\
                        --log L3 -m models.export ARGS...

Each job is a command as ``python`` would take it (``script.py ARGS`` or ``-m module ARGS``), its
options before it; jobs are separated by ``:::``. They run in order; the first that fails stops
the lane (exit 1, the end of its log printed to stderr).

Why: the demo runs about ten training, export and prediction commands on two cores, and every
fresh interpreter spends 5-8 s importing torch, its optimiser machinery (``torch._dynamo``),
SciPy and batchgenerators before it trains a step. Here the lane imports them once and runs each
job in a child forked from that warm process (Linux): a fresh process state per job (seeds, the
allocator setting, loggers) as with ``python script.py``, without the imports. Elsewhere (macOS,
where forking after importing numerical libraries is not safe, and Windows) each job is a plain
subprocess.

Job options:
    --log FILE    the job's stdout and stderr, appended (the demo starts from an empty folder)
    --after FILE  wait until FILE exists before starting; fail if ``FILE.failed`` appears instead
    --done FILE   touch FILE when the job succeeded, ``FILE.failed`` when it failed

Lane options (before the first job): ``--times FILE`` appends a line per job:
``start<TAB>end<TAB>status<TAB>command`` (seconds since the epoch), e.g. for the demo's account of
where its time went; ``--preload MOD,...`` the modules to import before the first job (default: those
of the training, export and predict scripts, :data:`PRELOAD`).
``DEMO_LANE_FORK=0`` runs every job as a subprocess on Linux too.
"""

from __future__ import annotations

import importlib
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

#: separates the jobs on the command line
JOB_SEPARATOR = ":::"
#: modules a warm lane imports before its first job (what the training, export and predict
#: commands import; torch._dynamo is imported by the first torch optimiser)
PRELOAD: tuple[str, ...] = ("torch", "torch._dynamo", "training.cli", "predict", "models.export")


@dataclass(frozen=True)
class Job:
    """One command of a lane and what surrounds it.

    Attributes:
        command: ``["script.py", ARGS...]`` or ``["-m", "module", ARGS...]``.
        log: where stdout and stderr go (appended); None: the lane's own.
        after: a file to wait for before starting (``<after>.failed`` means the job it waits for failed).
        done: touched when the job succeeded (``<done>.failed`` when it failed).
    """

    command: tuple[str, ...]
    log: Path | None = None
    after: Path | None = None
    done: Path | None = None


def failed_marker(path: Path) -> Path:
    """The file that says the job behind ``path`` (a ``--done`` file) failed."""
    return path.with_name(path.name + ".failed")


def parse_jobs(argv: Sequence[str]) -> list[Job]:
    """Split ``argv`` at ``:::`` into jobs (options first, then the command).

    Raises:
        ValueError: an empty job, an option without its value, or a command that is neither
            ``script.py ...`` nor ``-m module ...``.
    """
    groups: list[list[str]] = [[]]
    for arg in argv:
        if arg == JOB_SEPARATOR:
            groups.append([])
        else:
            groups[-1].append(arg)
    if len(groups) > 1 and not groups[-1]:  # a trailing ':::' ends the last job
        groups.pop()
    jobs = []
    for n, group in enumerate(groups, 1):
        opts: dict[str, Path] = {}
        i = 0
        while i < len(group) and group[i] in ("--log", "--after", "--done"):
            if i + 1 >= len(group):
                raise ValueError(f"job {n}: {group[i]} needs a file")
            opts[group[i][2:]] = Path(group[i + 1])
            i += 2
        command = tuple(group[i:])
        if not command:
            raise ValueError(f"job {n}: no command (give 'script.py ARGS' or '-m module ARGS')")
        if command[0] == "-m":
            if len(command) < 2:
                raise ValueError(f"job {n}: -m needs a module name")
        elif command[0].startswith("-"):
            raise ValueError(f"job {n}: unknown option {command[0]} (job options: --log, --after, --done)")
        elif not command[0].endswith(".py"):
            raise ValueError(
                f"job {n}: {command[0]!r} is not a Python script (give 'script.py ARGS' or '-m module ARGS')"
            )
        jobs.append(Job(command, log=opts.get("log"), after=opts.get("after"), done=opts.get("done")))
    return jobs


def _run_command(command: tuple[str, ...]) -> int:
    """Run ``command`` in this process as ``python COMMAND`` would; returns its exit status."""
    try:
        if command[0] == "-m":
            sys.argv = [command[1], *command[2:]]
            # a preloaded module runs afresh as __main__ (as python -m would), not beside its imported copy
            sys.modules.pop(command[1], None)
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(command)
            sys.path[0] = str(Path(command[0]).resolve().parent)  # as python puts the script's folder first
            runpy.run_path(command[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1
    return 0


def _child(job: Job) -> int:
    """The forked child: output to the job's log, run the command, report its status."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if job.log is not None:
        fd = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        # Python-level output to the new descriptors too (sys.stdout may have been replaced, e.g. by pytest)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process ends with the job)
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    try:
        return _run_command(job.command)
    except BaseException:  # the traceback goes to the job's log, as a crashing script's would
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class Lane:
    """Runs jobs one after another; forwards SIGTERM/SIGINT to the running job."""

    def __init__(self, fork: bool, times: Path | None = None) -> None:
        self.fork = fork
        self.times = times
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        if self._pid is not None:
            os.kill(self._pid, signal.SIGTERM)
        if self._proc is not None:
            self._proc.terminate()
        raise SystemExit(128 + signum)

    def run_job(self, job: Job) -> int:
        """Run one job to its end; returns its exit status."""
        if not self.fork:
            log = open(job.log, "ab") if job.log is not None else None  # noqa: SIM115 (closed below)
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, *job.command], stdout=log, stderr=subprocess.STDOUT if log else None
                )
                return self._proc.wait()
            finally:
                self._proc = None
                if log is not None:
                    log.close()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child; its outcome is the parent's status)
            os._exit(_child(job))
        self._pid = pid
        try:
            _, status = os.waitpid(pid, 0)
        finally:
            self._pid = None
        return os.waitstatus_to_exitcode(status)

    def run(self, jobs: Sequence[Job], poll_s: float = 0.5) -> int:
        """Run ``jobs`` in order; stop at the first failure. Returns 0 or 1."""
        signal.signal(signal.SIGTERM, self._stop)
        for job in jobs:
            if job.after is not None:
                while not job.after.exists():
                    if failed_marker(job.after).exists():
                        print(
                            f"lane: {' '.join(job.command[:2])} not started: the job behind {job.after} failed",
                            file=sys.stderr,
                        )
                        return 1
                    time.sleep(poll_s)
            start = time.time()
            status = self.run_job(job)
            if self.times is not None:
                with open(self.times, "a", encoding="utf-8") as f:
                    f.write(f"{start:.2f}\t{time.time():.2f}\t{status}\t{' '.join(job.command)}\n")
            if job.done is not None:
                (job.done if status == 0 else failed_marker(job.done)).touch()
            if status != 0:
                print(f"lane: {' '.join(job.command)} failed (exit status {status})", file=sys.stderr)
                if job.log is not None and job.log.exists():
                    tail = job.log.read_text(errors="replace").splitlines()[-20:]
                    print("\n".join(tail), file=sys.stderr)
                return 1
        return 0


def fork_is_safe() -> bool:
    """Whether jobs may run in forked children (Linux; see the module docstring)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m demo.lane JOB ::: JOB ...``; returns 0 when every job succeeded."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    times, preload = None, PRELOAD
    while args and args[0] in ("--times", "--preload"):
        if len(args) < 2:
            print(f"python -m demo.lane: error: {args[0]} needs a value", file=sys.stderr)
            return 2
        if args[0] == "--times":
            times = Path(args[1])
        else:
            preload = tuple(m for m in args[1].split(",") if m)
        args = args[2:]
    try:
        jobs = parse_jobs(args)
    except ValueError as e:
        print(f"python -m demo.lane: error: {e}", file=sys.stderr)
        return 2
    fork = fork_is_safe() and os.environ.get("DEMO_LANE_FORK", "1") != "0"
    if fork:
        for name in preload:
            try:
                importlib.import_module(name)
            except ImportError as e:
                print(f"python -m demo.lane: error: --preload {name}: {e}", file=sys.stderr)
                return 2
    return Lane(fork, times).run(jobs)


if __name__ == "__main__":
    sys.exit(main())
