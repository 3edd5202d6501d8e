"""Benchmark: many `batchspec apply --wait` processes sharing one PostgreSQL state.

Starts a throwaway PostgreSQL cluster (as the tests do: tests/postgres.py; or give ``--url``
of an empty database you own) and ``batchspec serve`` on 127.0.0.1 whose built-in stand-in
model answers each request after ``--latency`` seconds, behind a proxy that adds ``--rtt``
seconds to every API call (default 0.1: a round trip to a hosted API; the proxy of
bench/latency_proxy.py). A workspace of ``--resources``
resources (default 200, ``--requests`` each, labelled ``group: g0`` .. ``g{N-1}``) is then
applied three ways, each from a fresh database and a fresh serve:

  one        one process: ``apply --wait`` on every resource
  (a) split  ``--processes`` processes at once (default 8), each ``--select group=gK``: its
             own slice of the resources (locks per resource: they run side by side)
  (b) same   ``--processes`` processes at once, all on every resource (they take turns:
             one converges everything, the others then find everything in sync)

Printed per case: wall time (first start to last exit), exit codes, and from the server
itself the number of remote batches per (resource, shard): it must be exactly 1 everywhere
(no duplicate paid for). Targets: zero duplicates; (a) at least 3x faster than one.

Run:  .venv/bin/python bench/shared_state.py
      .venv/bin/python bench/shared_state.py --resources 80 --processes 8   # smaller
      .venv/bin/python bench/shared_state.py --url postgresql://me@localhost/empty_db

Only loopback addresses are used; every server (and the cluster) is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

KEY_ENV = "BATCHSPEC_BENCH_KEY"
BENCH_KEY = "bench-key-not-secret"
REPO = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(REPO / "bench"))
from parallel_apply import start_latency_proxy  # noqa: E402  (a sibling script)


@dataclass(frozen=True)
class Case:
    label: str
    selections: tuple[tuple[str, ...], ...]  # one --select list per process


@dataclass(frozen=True)
class Outcome:
    wall: float
    exit_codes: tuple[int, ...]
    batches_per_shard: Counter[int]  # how many (resource, shard) have N remote batches
    shards: int


# -- servers ------------------------------------------------------------------------------------


@contextmanager
def postgres_databases(url: str | None) -> Iterator[object]:
    """Yields ``new_database() -> URL``: a fresh database per case (or ``url``'s schema
    emptied, when one was given)."""
    if url is not None:
        import psycopg

        def reuse() -> str:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
            return url

        yield reuse
        return
    sys.path.insert(0, str(REPO / "tests"))
    from postgres import find_bin_dir, start_cluster  # the tests' throwaway cluster

    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL binaries (initdb) found: install them or pass --url")
    cluster = start_cluster(bin_dir)
    try:
        yield cluster.new_database
    finally:
        cluster.stop()


@contextmanager
def serve(data_dir: Path, latency: float) -> Iterator[str]:
    """``batchspec serve`` on a free loopback port; yields its /v1 URL."""
    argv = [
        *(sys.executable, "-m", "batchspec", "serve", "--port", "0", "--data-dir", str(data_dir)),
        *("--upstream-latency", str(latency), "--concurrency", "32", "--poll-interval", "0.05"),
        *("--api-key-env", KEY_ENV),
    ]
    process = subprocess.Popen(
        argv,
        env={**os.environ, KEY_ENV: BENCH_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    found: list[str] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            match = re.search(r"serving on (http://\S+)", line)
            if match and not found:
                found.append(match.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 30
    while not found:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("batchspec serve did not start")
        time.sleep(0.02)
    try:
        yield found[0] + "/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the workspace ------------------------------------------------------------------------------


def write_workspace(root: Path, v1: str, resources: int, requests: int, groups: int) -> None:
    shutil.rmtree(root, ignore_errors=True)
    (root / "manifests").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "batchspec.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Project\nmanifests: [manifests/*.yaml]\n"
        f"providers:\n  bench:\n    type: openai\n    baseUrl: {v1}\n    apiKeyEnv: {KEY_ENV}\n"
    )
    for m in range(resources):
        name = f"job-{m:04d}"
        (root / "manifests" / f"{name}.yaml").write_text(
            f"apiVersion: batchspec/v1\nkind: Batch\nmetadata:\n  name: {name}\n"
            f"  labels: {{group: g{m % groups}}}\nspec:\n"
            "  provider: bench\n  endpoint: /v1/chat/completions\n"
            f"  input: ../data/{name}.jsonl\n  output: ../results/{name}.jsonl\n"
            f"  errors: ../results/{name}.errors.jsonl\n  retry: {{maxAttempts: 1}}\n"
        )
        lines = [
            {
                "custom_id": f"{name}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "bench", "messages": [{"role": "user", "content": f"q{m} {i}"}]},
            }
            for i in range(requests)
        ]
        (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


# -- a case -------------------------------------------------------------------------------------


def run_case(case: Case, root: Path, state_url: str) -> tuple[float, tuple[int, ...]]:
    """Start one ``apply --wait`` per selection at once; wall time until the last exits."""
    env = {**os.environ, KEY_ENV: BENCH_KEY}
    logs = [root.parent / f"{case.label}-{i}.log" for i in range(len(case.selections))]
    started = time.monotonic()
    processes = []
    for select, log in zip(case.selections, logs, strict=True):
        argv = [
            *(sys.executable, "-m", "batchspec", "apply", str(root), "--yes", "--wait"),
            *("--quiet", "--state", state_url, "--lock-timeout", "3600"),
            *("--poll-interval", "0.5", "--timeout", "3600"),
            *(arg for s in select for arg in ("--select", s)),
        ]
        with open(log, "w") as out:
            processes.append(subprocess.Popen(argv, env=env, stdout=out, stderr=out))
    codes = tuple(p.wait() for p in processes)
    wall = time.monotonic() - started
    for code, log in zip(codes, logs, strict=True):
        if code != 0:
            print(f"  {log.name} exited {code}:\n{log.read_text()[-2000:]}", file=sys.stderr)
    return wall, codes


def remote_batches(v1: str) -> Counter[tuple[str, str]]:
    """How many remote batches the server holds per (resource, shard), from their metadata."""
    counts: Counter[tuple[str, str]] = Counter()
    after: str | None = None
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    with httpx.Client(timeout=30) as client:
        while True:
            params = {"limit": "100", **({"after": after} if after else {})}
            page = client.get(f"{v1}/batches", params=params, headers=headers).json()
            for batch in page["data"]:
                meta = batch.get("metadata") or {}
                counts[(meta.get("batchspec_resource"), meta.get("batchspec_shard"))] += 1
            if not page.get("has_more") or not page["data"]:
                return counts
            after = page["data"][-1]["id"]


def measure(case: Case, args: argparse.Namespace, new_database: object, work: Path) -> Outcome:
    state_url = new_database()  # type: ignore[operator]
    with serve(work / f"engine-{case.label}", args.latency) as v1:
        proxy, _ = start_latency_proxy(v1.removesuffix("/v1"), args.rtt)
        try:
            root = work / f"ws-{case.label}"
            proxied = f"http://127.0.0.1:{proxy.server_address[1]}/v1"
            write_workspace(root, proxied, args.resources, args.requests, args.processes)
            wall, codes = run_case(case, root, state_url)
        finally:
            proxy.shutdown()
        per_shard = remote_batches(v1)  # from the server itself, not through the proxy
    return Outcome(wall, codes, Counter(per_shard.values()), len(per_shard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resources", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2, help="requests per resource")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per answer")
    parser.add_argument("--rtt", type=float, default=0.1, help="seconds added to each API call")
    parser.add_argument("--url", default=None, help="an empty PostgreSQL database to use")
    args = parser.parse_args()
    everything: tuple[str, ...] = ()
    cases = [
        Case("one", (everything,)),
        Case("a-split", tuple((f"group=g{k}",) for k in range(args.processes))),
        Case("b-same", tuple(everything for _ in range(args.processes))),
    ]
    print(
        f"{args.resources} resources x {args.requests} requests, {args.processes} processes, "
        f"answers after {args.latency:g} s, API calls +{args.rtt:g} s, state in PostgreSQL"
    )
    results: dict[str, Outcome] = {}
    with (
        tempfile.TemporaryDirectory(prefix="batchspec-bench-") as tmp,
        postgres_databases(args.url) as new_database,
    ):
        for case in cases:
            results[case.label] = outcome = measure(case, args, new_database, Path(tmp))
            per_shard = ", ".join(
                f"{n} batch(es): {count} shard(s)"
                for n, count in sorted(outcome.batches_per_shard.items())
            )
            print(
                f"{case.label:>8}: {len(case.selections)} process(es), wall "
                f"{outcome.wall:6.1f} s, exit codes {sorted(set(outcome.exit_codes))}, "
                f"remote batches per shard: {per_shard} ({outcome.shards} shards)",
                flush=True,
            )
    one = results["one"].wall
    duplicates = sum(
        (n - 1) * count for o in results.values() for n, count in o.batches_per_shard.items()
    )
    print(
        f"speed-up (a) vs one: {one / results['a-split'].wall:.2f}x (target >= 3x); "
        f"(b) vs one: {one / results['b-same'].wall:.2f}x; duplicates: {duplicates} (target 0)"
    )


if __name__ == "__main__":
    main()
