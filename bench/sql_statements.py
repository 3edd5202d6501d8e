"""Count the state's SQL statements per resource in the fleet's submit and poll+collect passes.

Starts ``batchspec serve`` on 127.0.0.1 with a model stand-in that answers nothing until
told to (``parallel_apply``), writes a workspace of ``--manifests`` manifests of
``--requests`` requests, and runs ``batchspec apply`` twice *in this process* (the submit
pass, then, once every batch has completed, the poll+collect pass) with SQLite's trace
callback on the state's connection. For each pass it prints the statements per resource by
kind (SAVEPOINT/RELEASE, SELECT by table, INSERT, UPDATE, ...); ``--verbose`` adds the
statements themselves with their literals masked, ``--sites REGEX`` where the statements
matching REGEX come from (the state method and the steps calling it), ``--dump FILE`` a JSON
dump of every state table after the passes (to compare two builds: ids and timestamps
differ between runs, the rows and their order must not). It also prints the CPU time of
this thread per resource in each pass (the apply's main thread: it records every step,
while the pool's threads make the provider calls); ``--untraced`` measures it without the
trace.

SQLite traces a statement again each time it fires a trigger (the state's serial counter),
with the same text: such an immediate repeat of a write is counted once.

Run:  .venv/bin/python bench/sql_statements.py --manifests 50
      .venv/bin/python bench/sql_statements.py --sites '^SAVEPOINT'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from parallel_apply import (
    BENCH_KEY,
    KEY_ENV,
    start_gated_model,
    start_serve,
    wait_until,
    write_workspace,
)

_connect = sqlite3.connect
WRITES = ("INSERT", "UPDATE", "DELETE")


class Trace(list[str]):
    """The statements of the state's connection, as batchspec sends them."""

    sites: Counter[tuple[str, str, str]] | None = None
    pattern: re.Pattern[str] | None = None

    def append(self, sql: str) -> None:
        if self and sql == self[-1] and sql.lstrip()[:6].upper() in WRITES:
            return  # a trigger it fired, traced with its text
        super().append(sql)
        if self.sites is not None and self.pattern is not None and self.pattern.search(sql):
            self.sites[_site(sql)] += 1


def _site(sql: str) -> tuple[str, str, str]:
    frames = [f for f in traceback.extract_stack()[:-2] if "/batchspec/" in f.filename]
    state = [f.name for f in frames if "/batchspec/state/" in f.filename]
    steps = [
        f.name for f in frames if "/state/" not in f.filename and "/storage/" not in f.filename
    ]
    return (_masked(sql)[:60], state[0] if state else "", " < ".join(steps[::-1][:4]))


STATEMENTS = Trace()


def connect(path: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
    conn = _connect(path, *args, **kwargs)
    if str(path).endswith("batchspec.db"):
        conn.set_trace_callback(STATEMENTS.append)
    return conn


def _masked(sql: str) -> str:
    sql = re.sub(r"'(?:[^']|'')*'", "S", " ".join(sql.split()))
    return re.sub(r"\b\d+\b", "N", sql)


def kind(sql: str) -> str:
    s = " ".join(sql.split())
    head = s.split(" ", 1)[0].upper()
    if head in ("SELECT", "WITH"):
        tables = set(re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", s, re.I))
        return "SELECT " + ",".join(sorted(tables))
    if head == "INSERT":
        return "INSERT " + re.findall(r"INTO\s+(\w+)", s, re.I)[0]
    if head == "UPDATE":
        return "UPDATE " + s.split()[1]
    if head == "DELETE":
        return "DELETE " + re.findall(r"FROM\s+(\w+)", s, re.I)[0]
    return head


def apply(root: Path, parallelism: int) -> None:
    from batchspec.cli.main import main

    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["apply", str(root), "--yes", "--quiet", "--parallelism", str(parallelism)])
    except SystemExit as err:
        if err.code:
            raise
    finally:
        os.chdir(cwd)


def report(label: str, n: int, statements: list[str], verbose: bool) -> None:
    print(f"{label}: {len(statements)} statements, {len(statements) / n:.2f} a resource")
    for name, count in Counter(kind(s) for s in statements).most_common():
        print(f"  {count / n:8.2f}  {name}")
    if verbose:
        for text, count in Counter(_masked(s)[:160] for s in statements).most_common(40):
            print(f"    {count / n:7.2f}  {text}")


def dump(db: Path) -> dict[str, list[list[Any]]]:
    conn = _connect(db)
    try:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        return {t: [list(r) for r in conn.execute(f"SELECT * FROM {t}")] for (t,) in list(tables)}
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifests", type=int, default=50)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--parallelism", type=int, default=16)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--sites", metavar="REGEX")
    parser.add_argument("--dump", metavar="FILE")
    parser.add_argument("--untraced", action="store_true", help="no trace: CPU time only")
    args = parser.parse_args()
    if not args.untraced:
        sqlite3.connect = connect  # type: ignore[assignment]
    import batchspec.cli.main  # noqa: F401 - imported before any pass is timed

    if args.sites:
        Trace.sites, Trace.pattern = Counter(), re.compile(args.sites)
    os.environ[KEY_ENV] = BENCH_KEY
    tmp = Path(tempfile.mkdtemp(prefix="bench-sql-"))
    model, gate, model_url = start_gated_model()
    serve, serve_url = start_serve(tmp / "engine", model_url)
    try:
        ws = tmp / "ws"
        write_workspace(ws, serve_url + "/v1", args.manifests, args.requests)
        passes = []
        for label in ("submit pass", "poll+collect pass"):
            if passes:
                wait_until(serve_url, lambda s: s == "in_progress", args.manifests)
                gate.set()
                wait_until(serve_url, lambda s: s == "completed", args.manifests)
            STATEMENTS.clear()
            cpu = time.thread_time()
            apply(ws, args.parallelism)
            cpu = time.thread_time() - cpu
            passes.append((label, list(STATEMENTS), cpu))
        for label, statements, cpu in passes:
            print(f"{label}: {cpu / args.manifests * 1000:.2f} main-thread CPU ms a resource")
            if not args.untraced:
                report(label, args.manifests, statements, args.verbose)
        for (sql, method, steps), count in (Trace.sites or Counter()).most_common(60):
            print(f"  {count / args.manifests:6.2f}  {sql}  [{method}]  {steps}")
        if args.dump:
            state = dump(ws / "state" / "batchspec.db")
            Path(args.dump).write_text(json.dumps(state, indent=0, default=str))
    finally:
        gate.set()
        serve.terminate()
        serve.wait(timeout=30)
        model.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
