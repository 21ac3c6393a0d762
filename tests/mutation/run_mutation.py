"""A small mutation tester: plant one bug at a time into a module and see whether a test selection notices.

    python -m tests.mutation.run_mutation utils/folds.py tests/test_folds.py tests/test_promises_data.py
    python -m tests.mutation.run_mutation utils/metrics.py tests/test_metrics.py --functions hd95,surface
    python -m tests.mutation.run_mutation utils/task_settings.py --functions build_plans -- tests/test_promises_data.py -k paper
    python -m tests.mutation.run_mutation utils/folds.py --list          # the mutants, without running

How (docs/testing.md, "Mutation check"):

* The working tree is copied to a temporary folder first (the mutants never touch the checkout; the
  run sees one consistent snapshot while other files change).
* The module's syntax tree is mutated at one site at a time: comparison operators (``<`` ↔ ``<=``,
  ``>`` ↔ ``>=``, ``==`` ↔ ``!=``, ``in`` ↔ ``not in``, ``is`` ↔ ``is not``), arithmetic (``+`` ↔ ``-``,
  ``*`` ↔ ``/``, ``//`` → ``/``, ``%`` → ``//``, ``**`` → ``*``, also in ``+=`` etc.), ``and`` ↔ ``or``,
  ``not x`` → ``x``, ``-x`` → ``x``, numbers ``n`` → ``n + 1``, ``True`` ↔ ``False``, negated ``if`` /
  ``while`` / conditional-expression tests, ``return x`` → ``return None``, a statement-level call
  removed, ``break`` ↔ ``continue``. Strings, docstrings, annotations, ``raise`` statements (their
  messages) and ``__all__`` are left alone.
* Each mutant runs in a process forked from one that has already imported the heavy libraries
  (torch, NumPy, SciPy, SimpleITK, pytest), with the mutated module put in ``sys.modules`` before
  pytest imports anything of the project; the selection runs with ``-x``. A failing test (or an
  error, or the time limit) kills the mutant; a mutant whose tests all pass survives.

The score is killed / all mutants. Surviving mutants are listed with their line, to be read: each is
either a missing test or an equivalent change (same behaviour); docs/testing.md lists the survivors of
the last run and why each is harmless.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "results", "gpu_out"
)

_COMPARE_SWAP: dict[type, type] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}  # fmt: skip
_BINOP_SWAP: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd,
}  # fmt: skip


@dataclass
class Mutant:
    index: int
    line: int
    what: str
    function: str
    status: str = ""  # killed / survived / timeout
    seconds: float = 0.0


class _Mutator(ast.NodeTransformer):
    """Walks the tree in a fixed order; counts mutation sites and applies the one numbered ``target``
    (-1: none, only list them)."""

    def __init__(self, target: int, functions: set[str] | None) -> None:
        self.target = target
        self.functions = functions
        self.sites: list[tuple[int, str, str]] = []
        self._function = "<module>"

    # -- bookkeeping -----------------------------------------------------------------------------
    def _wanted(self) -> bool:
        return self.functions is None or self._function in self.functions

    def _site(self, node: ast.AST, what: str, make: Callable[[], ast.AST]) -> ast.AST | None:
        """Register a mutation site; return the replacement if it is the target, else None."""
        if not self._wanted():
            return None
        index = len(self.sites)
        self.sites.append((getattr(node, "lineno", 0), what, self._function))
        if index == self.target:
            return make()
        return None

    # -- what is never mutated -----------------------------------------------------------------
    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        outer = self._function
        # top-level functions and methods are named by themselves; nested ones by their outer function
        if outer == "<module>" or "." not in outer:
            self._function = node.name if outer == "<module>" else f"{outer}.{node.name}"
        node.body = self._body(node.body)
        # defaults are mutated like code; annotations and decorators are not
        node.args.defaults = [self.visit(d) for d in node.args.defaults]
        node.args.kw_defaults = [self.visit(d) if d is not None else None for d in node.args.kw_defaults]
        self._function = outer
        return node

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        outer = self._function
        self._function = node.name
        node.body = self._body(node.body)
        self._function = outer
        return node

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        start = 1 if body and _is_docstring(body[0]) else 0
        out = body[:start]
        for stmt in body[start:]:
            new = self.visit(stmt)
            out.extend(new if isinstance(new, list) else [new] if new is not None else [])
        return out or [ast.Pass()]

    def visit_Module(self, node: ast.Module) -> ast.AST:
        node.body = self._body(node.body)
        return node

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        return node  # messages

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        return node  # f-strings

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return node
        node.value = self.visit(node.value)
        return node

    def visit_Import(self, node: ast.Import) -> ast.AST:
        return node

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        return node

    # -- operators -------------------------------------------------------------------------------
    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            new_op = _COMPARE_SWAP.get(type(op))
            if new_op is None:
                continue

            def make(i: int = i, new_op: type = new_op) -> ast.AST:
                node.ops[i] = new_op()
                return node

            repl = self._site(node, f"{type(op).__name__} -> {new_op.__name__}", make)
            if repl is not None:
                return repl
        return node

    def _swap_operator(self, node: ast.BinOp | ast.AugAssign, suffix: str) -> ast.AST:
        """One mutant per arithmetic operator: ``+`` -> ``-`` etc. (``suffix`` "=" for ``+=``)."""
        self.generic_visit(node)
        new_op = _BINOP_SWAP.get(type(node.op))
        if new_op is not None:

            def make() -> ast.AST:
                node.op = new_op()
                return node

            repl = self._site(node, f"{type(node.op).__name__}{suffix} -> {new_op.__name__}{suffix}", make)
            if repl is not None:
                return repl
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        return self._swap_operator(node, "")

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        return self._swap_operator(node, "=")

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        new = ast.Or if isinstance(node.op, ast.And) else ast.And

        def make() -> ast.AST:
            node.op = new()
            return node

        repl = self._site(node, f"{type(node.op).__name__} -> {new.__name__}", make)
        return repl if repl is not None else node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            # -1 is one constant: mutate it as a number (-1 -> 0) and by dropping the sign (-1 -> 1)
            repl = self._site(node, "drop unary -", lambda: node.operand)
            if repl is not None:
                return repl
            value = node.operand.value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                repl = self._site(node, f"-{value!r} -> {-value + 1!r}", lambda: ast.Constant(-value + 1))
                if repl is not None:
                    return repl
            return node
        self.generic_visit(node)
        if isinstance(node.op, (ast.Not, ast.USub)):
            name = "not" if isinstance(node.op, ast.Not) else "-"
            repl = self._site(node, f"drop unary {name}", lambda: node.operand)
            if repl is not None:
                return repl
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        if isinstance(value, bool):
            repl = self._site(node, f"{value} -> {not value}", lambda: ast.Constant(not value))
        elif isinstance(value, (int, float)):
            repl = self._site(node, f"{value!r} -> {value + 1!r}", lambda: ast.Constant(value + 1))
        else:
            repl = None
        return repl if repl is not None else node

    # -- control flow ----------------------------------------------------------------------------
    def _negate_test(self, node: ast.If | ast.While | ast.IfExp, kind: str) -> ast.AST | None:
        def make() -> ast.AST:
            node.test = ast.UnaryOp(op=ast.Not(), operand=node.test)
            return node

        return self._site(node, f"negate {kind} test", make)

    def visit_If(self, node: ast.If) -> ast.AST:
        node.test = self.visit(node.test)
        repl = self._negate_test(node, "if")
        if repl is not None:
            return repl
        node.body = self._body(node.body)
        node.orelse = self._body(node.orelse) if node.orelse else []
        return node

    def visit_While(self, node: ast.While) -> ast.AST:
        node.test = self.visit(node.test)
        repl = self._negate_test(node, "while")
        if repl is not None:
            return repl
        node.body = self._body(node.body)
        node.orelse = self._body(node.orelse) if node.orelse else []
        return node

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self.generic_visit(node)
        repl = self._negate_test(node, "conditional expression")
        return repl if repl is not None else node

    def visit_Return(self, node: ast.Return) -> ast.AST:
        if node.value is None or (isinstance(node.value, ast.Constant) and node.value.value is None):
            return node
        node.value = self.visit(node.value)
        repl = self._site(node, "return None", lambda: ast.Return(value=ast.Constant(None)))
        return repl if repl is not None else node

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        if not isinstance(node.value, ast.Call):
            return node
        node.value = self.visit(node.value)
        repl = self._site(node, "remove call statement", lambda: ast.Pass())
        return repl if repl is not None else node

    def visit_Break(self, node: ast.Break) -> ast.AST:
        repl = self._site(node, "break -> continue", lambda: ast.Continue())
        return repl if repl is not None else node

    def visit_Continue(self, node: ast.Continue) -> ast.AST:
        repl = self._site(node, "continue -> break", lambda: ast.Break())
        return repl if repl is not None else node


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def mutants(source: str, functions: set[str] | None) -> list[Mutant]:
    m = _Mutator(-1, functions)
    m.visit(ast.parse(source))
    return [Mutant(i, line, what, fn) for i, (line, what, fn) in enumerate(m.sites)]


def mutated_tree(source: str, index: int, functions: set[str] | None) -> ast.Module:
    tree = ast.parse(source)
    m = _Mutator(index, functions)
    new = m.visit(copy.deepcopy(tree))
    assert isinstance(new, ast.Module)
    return ast.fix_missing_locations(new)


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def _preload() -> None:
    """Import the heavy third-party libraries once, in the parent (each fork inherits them)."""
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import SimpleITK  # noqa: F401
    import torch  # noqa: F401

    try:
        import nibabel  # noqa: F401
    except ImportError:  # pragma: no cover - optional here
        pass


def _child(module: str, path: Path, tree: ast.Module | None, tests: Sequence[str]) -> None:
    """In the forked process: install the (mutated) module, run pytest, exit with its status."""
    os.setpgid(0, 0)  # its own process group: a timeout ends it and whatever it started
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import importlib
    import importlib.util

    import pytest

    sys.dont_write_bytecode = True
    if tree is not None:
        parent_name, _, leaf = module.rpartition(".")
        parent = importlib.import_module(parent_name) if parent_name else None
        spec = importlib.util.spec_from_file_location(module, path)
        assert spec is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        if parent is not None:
            setattr(parent, leaf, mod)
        try:
            exec(compile(tree, str(path), "exec"), mod.__dict__)
        except Exception:
            os._exit(3)  # the mutant does not even import: killed
    code = pytest.main([*tests, "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-W", "ignore"])
    os._exit(int(code))


def run_one(
    module: str, path: Path, tree: ast.Module | None, tests: Sequence[str], timeout: float
) -> tuple[str, float]:
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _child(module, path, tree, tests)
        finally:
            os._exit(4)
    deadline = t0 + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return ("survived" if code == 0 else "killed"), time.perf_counter() - t0
        if time.perf_counter() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return "timeout", time.perf_counter() - t0
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", help="the module file to mutate, e.g. utils/folds.py")
    ap.add_argument(
        "tests", nargs="*", help="the pytest selection (files, file::test; after --: any pytest arguments)"
    )
    ap.add_argument("--functions", default=None, help="comma-separated top-level functions/classes to mutate "
                    "(<module> for module-level code); default: everything")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=0, help="seconds per mutant (default: 4x baseline + 20)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--list", action="store_true", help="only list the mutants")
    ap.add_argument("--no_snapshot", action="store_true", help="run in the checkout itself (no copy)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after "--" goes to pytest as it is (e.g. -k EXPRESSION)
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    args = ap.parse_intermixed_args(argv)
    args.tests = [*args.tests, *extra]
    functions = set(args.functions.split(",")) if args.functions else None
    rel = Path(args.module)
    source = (ROOT / rel).read_text()
    found = mutants(source, functions)
    if args.list:
        for m in found:
            print(f"#{m.index:3d} line {m.line:4d} [{m.function}] {m.what}")
        print(f"{len(found)} mutants")
        return 0
    if not args.tests:
        ap.error("give the tests to run")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = ROOT
    tmp = None
    if not args.no_snapshot:
        tmp = Path(tempfile.mkdtemp(prefix="mutation_"))
        work = tmp / "tree"
        shutil.copytree(ROOT, work, ignore=IGNORE)
    os.chdir(work)
    sys.path.insert(0, str(work))
    module = ".".join(rel.with_suffix("").parts)
    path = work / rel
    try:
        _preload()
        status, base = run_one(module, path, None, args.tests, 600)
        if status != "survived":
            print(
                f"the tests fail (or time out) without any mutation ({status}); fix them first",
                file=sys.stderr,
            )
            return 2
        timeout = args.timeout or 4 * base + 20
        print(
            f"{rel}: {len(found)} mutants; tests {' '.join(args.tests)}; baseline {base:.1f}s, limit {timeout:.0f}s"
        )
        t_all = time.perf_counter()
        for m in found:
            m.status, m.seconds = run_one(
                module, path, mutated_tree(source, m.index, functions), args.tests, timeout
            )
            if m.status == "survived":
                print(f"  survived #{m.index} line {m.line} [{m.function}] {m.what}", flush=True)
        killed = sum(m.status != "survived" for m in found)
        score = killed / len(found) if found else 1.0
        print(f"{rel}: {killed}/{len(found)} killed ({100 * score:.0f} %), "
              f"{sum(m.status == 'timeout' for m in found)} by timeout, {time.perf_counter() - t_all:.0f}s")  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps({"module": str(rel), "tests": args.tests, "functions": args.functions,
                                                   "killed": killed, "total": len(found), "score": score,
                                                   "mutants": [asdict(m) for m in found]}, indent=1))  # fmt: skip
    finally:
        os.chdir(ROOT)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
