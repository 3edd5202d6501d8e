"""Mutation testing of the money paths: plant one-line bugs, run the tests that should notice.

A small AST mutator, written for this repository (mutmut 3 and cosmic-ray rewrite or import
the package in ways that do not reach the ``python -m batchspec`` subprocesses many of our
tests start). Each mutant is one change at one place:

    comparison   < <= > >= == != in / not in, is / is not: swapped for its neighbour
    boolean      and <-> or; ``not x`` -> ``x``; all(...) <-> any(...)
    constant     True <-> False; an integer n -> n + 1
    arithmetic   + <-> -, * -> +, // -> *
    loop         break <-> continue
    statement    a call on its own line (``store.update(...)``) -> ``pass``

Docstrings, decorators, type annotations and ``raise`` lines are left alone. The repository
is copied once to a temporary folder; for each mutant the module is rewritten there and the scope's
test files run (``pytest -x``, in the order given: put the fast, sharp ones first) with
``PYTHONPATH`` set to the copy, so subprocesses import the mutant too. A mutant is *killed*
when the tests fail, *timeout* when they run past ``--timeout`` (counted as killed, as
mutmut does), *survived* otherwise. The score per scope is (killed + timeout) / mutants.

Not part of the test run. Usage (one scope, about 6 minutes on one core):

    .venv/bin/python scripts/mutation.py plan
    .venv/bin/python scripts/mutation.py --list            # the scopes and their mutant counts
    .venv/bin/python scripts/mutation.py inputs ledger --timeout 120 --json out.json
    .venv/bin/python scripts/mutation.py inputs --survivors-of out.json   # after new tests
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("batchspec", "tests", "schemas", "examples", "docs", "scripts", ".ci", "pyproject.toml")
COPIED += ("README.md",)


@dataclass(frozen=True)
class Scope:
    """Source files (a file, or a folder of them, so a module split into a package keeps its
    scope) and optionally only some functions in them, with the tests that guard them."""

    name: str
    sources: tuple[str, ...]
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()  # empty: every function and module-level statement


SCOPES = (
    Scope(
        "plan",
        ("batchspec/core/plan.py",),
        ("tests/test_plan.py", "tests/test_plan_properties.py"),
    ),
    Scope(
        "adoption",
        (
            "batchspec/core/reconcile/adopt.py",
            "batchspec/core/reconcile/submit.py",
            "batchspec/core/reconcile/intent.py",
            "batchspec/core/batches.py",
            "batchspec/providers/base.py",
        ),
        (
            "tests/test_adoption.py",
            "tests/test_adoption_lookup.py",
            "tests/test_adoption_confirm.py",
            "tests/test_apply_local.py",  # the serial submit path (providers not pooled)
            "tests/test_replace.py",
            "tests/test_state_lost.py",
            "tests/test_crash_safety.py",
            "tests/test_create_in_transit.py",
            "tests/test_admission.py",
        ),
        functions=(
            "find_remote",
            "look_up_before_create",
            "window_seconds",
            "confirm_deadline",
            "look_up_until",
            "bind_adopted",
            "record_remote",
            "submit_queued",
            "_has_capacity",
            "_submit_batch",
            "_confirm_ambiguous_create",
            "_ensure_uploaded",
            "record_intent",
            "batch_key",
            "metadata_for_key",
            "batch_metadata",
            "find_batch_by_key",
        ),
    ),
    Scope("lock", ("batchspec/state/lock.py",), ("tests/test_lock.py", "tests/test_cli_unlock.py")),
    Scope(
        "ledger",
        ("batchspec/state/ledger.py",),
        (
            "tests/test_ledger.py",
            "tests/test_state.py",
            "tests/test_collect.py",
            "tests/test_retries.py",
        ),
    ),
    Scope(
        "inputs",
        ("batchspec/wire/inputs.py",),
        ("tests/test_inputs.py",),
        functions=("check_custom_id", "scan_batch_input", "require_valid_input", "iter_requests"),
    ),
    Scope(
        "collect",
        ("batchspec/core/reconcile/collect.py",),
        ("tests/test_collect.py", "tests/test_progress.py", "tests/test_retries.py"),
    ),
    Scope(
        "results",
        ("batchspec/core/results.py",),
        (
            "tests/test_ledger.py",
            "tests/test_collect.py",
            "tests/test_retries.py",
            "tests/test_incremental.py",
        ),
    ),
)


# ---------------------------------------------------------------------------------------------
# Finding mutants


@dataclass(frozen=True)
class Mutant:
    scope: str
    path: str  # relative to the repository
    line: int
    description: str
    start: tuple[int, int]  # (line, col) of the replaced source, 1-based line, 0-based col
    end: tuple[int, int]
    replacement: str


COMPARE_SWAPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
COMPARE_FLIPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.Gt,
    ast.Gt: ast.Lt,
    ast.LtE: ast.GtE,
    ast.GtE: ast.LtE,
}
BINOP_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Add,
    ast.FloorDiv: ast.Mult,
}
SYMBOL = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.FloorDiv: "//",
}


def _copy_node(node: ast.AST) -> ast.AST:
    return ast.parse(ast.unparse(node), mode="eval").body  # type: ignore[attr-defined,no-any-return]


def _is_str(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, raise statements, and what they hold."""
    skip: set[int] = set()

    def drop(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and _is_str(first.value):
            drop(first)
        for decorator in getattr(node, "decorator_list", ()):  # @dataclass(frozen=True) ...
            drop(decorator)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            drop(node.returns)
            for arg in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs]:
                drop(arg.annotation)
            drop(node.args.vararg.annotation if node.args.vararg else None)
            drop(node.args.kwarg.annotation if node.args.kwarg else None)
        elif isinstance(node, ast.AnnAssign):
            drop(node.annotation)
        elif isinstance(node, ast.Raise):
            drop(node)
    return skip


def _in_scope_nodes(tree: ast.Module, functions: Sequence[str]) -> Iterator[ast.AST]:
    if not functions:
        yield from ast.walk(tree)
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in functions:
            yield from ast.walk(node)


def _expr_mutants(node: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    """(description, replacement node) for one expression node."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            for table in (COMPARE_SWAPS, COMPARE_FLIPS):
                new_op = table.get(type(op))
                if new_op is None:
                    continue
                mutated = _copy_node(node)
                assert isinstance(mutated, ast.Compare)
                mutated.ops[i] = new_op()
                yield f"{SYMBOL[type(op)]} -> {SYMBOL[new_op]}", mutated
    elif isinstance(node, ast.BoolOp):
        mutated = _copy_node(node)
        assert isinstance(mutated, ast.BoolOp)
        mutated.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield ("and -> or" if isinstance(node.op, ast.And) else "or -> and"), mutated
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "not x -> x", _copy_node(node.operand)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        swap = {"all": "any", "any": "all"}.get(node.func.id)
        if swap:
            mutated = _copy_node(node)
            assert isinstance(mutated, ast.Call) and isinstance(mutated.func, ast.Name)
            mutated.func.id = swap
            yield f"{node.func.id}(...) -> {swap}(...)", mutated
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        yield f"{node.value} -> {not node.value}", ast.Constant(not node.value)
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        yield f"{node.value} -> {node.value + 1}", ast.Constant(node.value + 1)
    elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
        new_op = BINOP_SWAPS[type(node.op)]
        mutated = _copy_node(node)
        assert isinstance(mutated, ast.BinOp)
        mutated.op = new_op()
        yield f"{SYMBOL[type(node.op)]} -> {SYMBOL[new_op]}", mutated


def find_mutants(scope: Scope, path: Path) -> list[Mutant]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    skip = _skipped_nodes(tree)
    rel = str(path.relative_to(ROOT))
    mutants: list[Mutant] = []
    seen: set[int] = set()
    for node in _in_scope_nodes(tree, scope.functions):
        if id(node) in skip or id(node) in seen or not hasattr(node, "end_lineno"):
            continue
        seen.add(id(node))
        start = (node.lineno, node.col_offset)  # type: ignore[attr-defined]
        end = (node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        if isinstance(node, ast.Break | ast.Continue):
            other = "continue" if isinstance(node, ast.Break) else "break"
            mutants.append(
                Mutant(
                    scope.name, rel, start[0], f"{ast.unparse(node)} -> {other}", start, end, other
                )
            )
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            mutants.append(
                Mutant(scope.name, rel, start[0], "call statement -> pass", start, end, "pass")
            )
        elif isinstance(node, ast.expr):
            for description, replacement in _expr_mutants(node):
                text = f"({ast.unparse(replacement)})"
                mutants.append(Mutant(scope.name, rel, start[0], description, start, end, text))
    return sorted(mutants, key=lambda m: (m.path, m.start, m.description))


def scope_files(scope: Scope) -> list[Path]:
    files: list[Path] = []
    for source in scope.sources:
        path = ROOT / source
        if path.is_dir():
            files.extend(sorted(path.rglob("*.py")))
        elif path.is_file():
            files.append(path)
    return files


def apply_mutant(source: str, mutant: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode("utf-8")))
    data = source.encode("utf-8")
    begin = offsets[mutant.start[0] - 1] + mutant.start[1]
    finish = offsets[mutant.end[0] - 1] + mutant.end[1]
    mutated = data[:begin] + mutant.replacement.encode("utf-8") + data[finish:]
    text = mutated.decode("utf-8")
    ast.parse(text)  # a mutant always compiles
    return text


# ---------------------------------------------------------------------------------------------
# Running them


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | timeout
    seconds: float


@dataclass
class ScopeResult:
    scope: str
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def score(self) -> float:
        total = len(self.outcomes)
        return (self.count("killed") + self.count("timeout")) / total if total else 1.0


def run_tests(copy: Path, tests: Sequence[str], timeout: float) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=copy,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # the whole session: a test's `batchspec serve` children would otherwise outlive it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout", time.monotonic() - started
    status = "survived" if returncode == 0 else "killed"
    return status, time.monotonic() - started


def make_copy(into: Path) -> Path:
    copy = into / "repo"
    copy.mkdir()
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source, copy / name, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis")
            )
        elif source.is_file():
            shutil.copy2(source, copy / name)
    return copy


def _key(mutant: Mutant) -> tuple[str, int, str, str]:
    return (mutant.path, mutant.line, mutant.description, mutant.replacement)


def survivors_in(path: Path) -> set[tuple[str, int, str, str]]:
    """The mutants that survived in an earlier ``--json`` file."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    return {
        (m["path"], m["line"], m["description"], m["replacement"])
        for m in (row["mutant"] for row in rows if row["status"] == "survived")
    }


def run_scope(
    scope: Scope,
    copy: Path,
    timeout: float,
    limit: int | None,
    only: set[tuple[str, int, str, str]] | None = None,
) -> ScopeResult:
    result = ScopeResult(scope.name)
    tests = [t for t in scope.tests if (ROOT / t).exists()]
    status, seconds = run_tests(copy, tests, timeout)
    if status != "survived":
        raise SystemExit(
            f"{scope.name}: the tests do not pass unmutated ({status}); fix that first"
        )
    mutants = [m for path in scope_files(scope) for m in find_mutants(scope, path)]
    if only is not None:
        mutants = [m for m in mutants if _key(m) in only]
    if limit is not None:
        mutants = mutants[:limit]
    print(f"{scope.name}: {len(mutants)} mutants, baseline {seconds:.1f}s", flush=True)
    for i, mutant in enumerate(mutants, 1):
        target = copy / mutant.path
        original = target.read_text(encoding="utf-8")
        target.write_text(apply_mutant(original, mutant), encoding="utf-8")
        try:
            status, seconds = run_tests(copy, tests, timeout)
        finally:
            target.write_text(original, encoding="utf-8")
        result.outcomes.append(Outcome(mutant, status, seconds))
        mark = {"killed": ".", "timeout": "T", "survived": "S"}[status]
        print(mark, end="" if i % 50 else f" {i}\n", flush=True)
    print(flush=True)
    return result


def report(results: Sequence[ScopeResult]) -> None:
    print(
        f"\n{'scope':<10} {'mutants':>8} {'killed':>7} {'timeout':>8} {'survived':>9} {'score':>7}"
    )
    for r in results:
        print(
            f"{r.scope:<10} {len(r.outcomes):>8} {r.count('killed'):>7} {r.count('timeout'):>8} "
            f"{r.count('survived'):>9} {r.score:>7.1%}"
        )
    for r in results:
        survivors = [o.mutant for o in r.outcomes if o.status == "survived"]
        if survivors:
            print(f"\nsurvived in {r.scope}:")
            for m in survivors:
                print(f"  {m.path}:{m.line}: {m.description}  ->  {m.replacement[:70]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scopes", nargs="*", help="scopes to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list scopes and mutant counts")
    parser.add_argument("--show", action="store_true", help="with --list: every mutant too")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per mutant run")
    parser.add_argument("--limit", type=int, help="only the first N mutants of each scope")
    parser.add_argument("--json", type=Path, help="write every outcome to this file")
    parser.add_argument(
        "--survivors-of",
        type=Path,
        metavar="FILE.json",
        help="only the mutants that survived in this earlier --json file (after new tests)",
    )
    args = parser.parse_args(argv)
    by_name = {s.name: s for s in SCOPES}
    unknown = [s for s in args.scopes if s not in by_name]
    if unknown:
        parser.error(f"unknown scope(s) {unknown}; known: {sorted(by_name)}")
    chosen = [by_name[s] for s in args.scopes] or list(SCOPES)
    if args.list:
        for scope in chosen:
            mutants = [m for p in scope_files(scope) for m in find_mutants(scope, p)]
            files = ", ".join(str(p.relative_to(ROOT)) for p in scope_files(scope))
            print(f"{scope.name:<10} {len(mutants):>5} mutants  {files}")
            for m in mutants if args.show else ():
                print(f"    {m.path}:{m.line}: {m.description}  ->  {m.replacement[:60]}")
        return 0
    with tempfile.TemporaryDirectory(prefix="batchspec-mutation-") as tmp:
        copy = make_copy(Path(tmp))
        only = survivors_in(args.survivors_of) if args.survivors_of else None
        results = [run_scope(s, copy, args.timeout, args.limit, only) for s in chosen]
    report(results)
    if args.json:
        args.json.write_text(
            json.dumps([asdict(o) for r in results for o in r.outcomes], indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
