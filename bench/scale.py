"""Benchmark: batchspec on a 1 GB / 250,000-request input, and `plan` over 1,000 manifests.

Generates, in a temporary folder, one OpenAI chat JSONL of about 4 KB per request (~1 GB for
250,000 lines) and a workspace over it, then runs each command as its own child process and
takes its wall time, CPU time and peak RSS from ``os.wait4`` (the child alone: the server and
this harness are not counted):

  bare         ``for line in f: json.loads(line); sha256.update(line)`` (the reference loop)
  validate     ``batchspec validate WS --json``
  plan-cold    ``batchspec plan WS --json`` with no input cache yet (reads the whole input)
  plan-warm    the same again: the input cache answers, the input is not read
  apply        ``batchspec apply WS --wait --yes`` against ``batchspec serve`` (a separate
               process on 127.0.0.1 with the builtin upstream, the offline stand-in, and
               ``--concurrency 256``): shard, upload, create, poll, download, merge
  plan-1000-*  ``batchspec plan`` on a second workspace of 1,000 manifests with 3 requests
               each (local provider), cold (no state, no cache) and warm: the median of
               ``--warm-runs`` runs after it (a manifest changed less than 2 s before a run
               reads is not cached by it, see batchspec.workspace.manifestcache, so the first
               warm run
               right after generating the workspace may still read some)

With ``--state-url URL`` (or ``--postgres``: a throwaway cluster started with
tests/postgres.py, as the suite does) the big workspace keeps its state in PostgreSQL, so
apply also streams every shard and result file into the state's blob tables, and one more
command is measured:

  restore      ``batchspec apply WS2 --wait --yes`` in a fresh copy of the workspace (no
               state/, no results/) with the server stopped: results/ rebuilt from the blobs
               in PostgreSQL alone, checked byte for byte against apply's

"x bare" is a command's wall time over the bare loop's. Targets (issue 5, issue 12): apply's
and restore's peak RSS at most 100 MB; plan over 1,000 manifests under 1 s when warm. Wall
times include the interpreter's start-up, which is what a user waits for.

Run:  .venv/bin/python bench/scale.py                        # 250,000 requests, ~1 GB
      .venv/bin/python bench/scale.py --requests 20000       # a quick look
      .venv/bin/python bench/scale.py --skip-apply --keep /tmp/scale
      .venv/bin/python bench/scale.py --only manifests          # plan over 1,000 manifests
      .venv/bin/python bench/scale.py --postgres --manifests 10  # the state in PostgreSQL

Only loopback addresses are used; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MODEL = "gpt-4o-mini"
ENDPOINT = "/v1/chat/completions"
TARGET_APPLY_RSS_MB = 100.0
TARGET_WARM_PLAN_1000_S = 1.0

BARE = """
import hashlib, json, sys
sha = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for line in f:
        json.loads(line)
        sha.update(line)
print(sha.hexdigest())
"""

VOCABULARY = (
    "the customer reports that order shipment arrived late and the invoice total was wrong "
    "please review account history refund policy escalate priority ticket payment card "
    "declined subscription renewal password reset login error résumé café 東京 привет 🙂"
)
WORDS = VOCABULARY.split(" ")


@dataclass(frozen=True)
class Measurement:
    name: str
    seconds: float
    cpu_seconds: float
    rss_mb: float
    returncode: int
    stdout: str
    stderr: str


def run(name: str, argv: list[str], env: dict[str, str] | None = None) -> Measurement:
    """One child process: wall time, CPU (user + sys) and peak RSS of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    # Drain both pipes while it runs, so a chatty child never blocks on a full pipe.
    chunks: dict[str, bytes] = {}

    def drain(key: str, stream: object) -> None:
        chunks[key] = stream.read()  # type: ignore[attr-defined]

    readers = [
        threading.Thread(target=drain, args=("out", proc.stdout)),
        threading.Thread(target=drain, args=("err", proc.stderr)),
    ]
    for t in readers:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    for t in readers:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measurement(
        name,
        seconds,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss / 1024,
        proc.returncode,
        chunks["out"].decode(errors="replace"),
        chunks["err"].decode(errors="replace"),
    )


# ---------------------------------------------------------------------------------------------
# Inputs


def generate(path: Path, requests: int, line_bytes: int, seed: int = 7) -> None:
    """``requests`` chat requests of about ``line_bytes`` bytes each, distinct texts."""
    rng = random.Random(seed)
    pool = " ".join(rng.choice(WORDS) for _ in range(200_000))
    text_chars = max(line_bytes - 300, 10)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for i in range(requests):
            start = rng.randrange(0, len(pool) - text_chars - 1)
            request = {
                "custom_id": f"ticket-{i:07d}",
                "method": "POST",
                "url": ENDPOINT,
                "body": {
                    "model": MODEL,
                    "messages": [
                        {"role": "system", "content": "Classify the ticket: billing, bug, other."},
                        {"role": "user", "content": f"{i}: " + pool[start : start + text_chars]},
                    ],
                    "max_tokens": 16,
                },
            }
            f.write(json.dumps(request, ensure_ascii=False) + "\n")


def project_yaml(provider: str) -> str:
    return (
        "apiVersion: batchspec/v1\nkind: Project\n"
        "state: {path: state/batchspec.db}\n"
        "manifests: ['manifests/*.yaml']\n"
        f"providers:\n{provider}"
    )


def manifest_yaml(name: str, provider: str, input_path: str) -> str:
    return (
        "apiVersion: batchspec/v1\nkind: Batch\n"
        f"metadata: {{name: {name}}}\n"
        "spec:\n"
        f"  provider: {provider}\n"
        f"  endpoint: {ENDPOINT}\n"
        f"  input: {input_path}\n"
        f"  model: {MODEL}\n"
        f"  output: ../results/{name}.jsonl\n"
        f"  errors: ../results/{name}.errors.jsonl\n"
    )


def big_workspace(root: Path, data: Path, base_url: str) -> Path:
    ws = root / "big"
    (ws / "manifests").mkdir(parents=True, exist_ok=True)
    provider = (
        f"  srv: {{type: openai, baseUrl: '{base_url}', apiKeyEnv: BENCH_API_KEY, "
        "options: {timeout: 600}}\n"
    )
    (ws / "batchspec.yaml").write_text(project_yaml(provider))
    (ws / "manifests" / "big.yaml").write_text(manifest_yaml("big", "srv", str(data)))
    return ws


def many_manifests_workspace(root: Path, count: int) -> Path:
    """``count`` manifests, each over its own 3-request input, on the local provider."""
    ws = root / "many"
    (ws / "manifests").mkdir(parents=True, exist_ok=True)
    (ws / "data").mkdir(exist_ok=True)
    (ws / "batchspec.yaml").write_text(
        project_yaml("  here: {type: local, options: {upstream: builtin}}\n")
    )
    for n in range(count):
        name = f"job-{n:04d}"
        lines = [
            json.dumps(
                {
                    "custom_id": f"{name}-{k}",
                    "method": "POST",
                    "url": ENDPOINT,
                    "body": {"model": MODEL, "messages": [{"role": "user", "content": f"{n} {k}"}]},
                }
            )
            for k in range(3)
        ]
        (ws / "data" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        (ws / "manifests" / f"{name}.yaml").write_text(
            manifest_yaml(name, "here", f"../data/{name}.jsonl")
        )
    return ws


# ---------------------------------------------------------------------------------------------
# The server


class Server:
    """``batchspec serve --port 0`` on 127.0.0.1 in its own process."""

    def __init__(self, data_dir: Path, concurrency: int) -> None:
        argv = [
            sys.executable,
            "-m",
            "batchspec",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            "--concurrency",
            str(concurrency),
            "--max-upload-bytes",
            str(1 << 30),
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = ""
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            match = re.search(r"serving on (http://\S+)", raw.decode())
            if match:
                self.url = match.group(1)
                break
        if not self.url:
            raise SystemExit("batchspec serve did not start")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=250_000)
    ap.add_argument("--line-bytes", type=int, default=4_000, help="approximate bytes per line")
    ap.add_argument("--manifests", type=int, default=1_000)
    ap.add_argument("--concurrency", type=int, default=256, help="the server's, to the upstream")
    ap.add_argument("--skip-apply", action="store_true")
    ap.add_argument(
        "--only", choices=["manifests"], help="only plan over --manifests manifests, cold and warm"
    )
    ap.add_argument("--warm-runs", type=int, default=5, help="warm plan runs (median reported)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    ap.add_argument(
        "--state-url", help="keep the big workspace's state in this (empty) PostgreSQL database"
    )
    ap.add_argument(
        "--postgres",
        action="store_true",
        help="start a throwaway PostgreSQL cluster (tests/postgres.py) for --state-url",
    )
    args = ap.parse_args()
    if args.postgres and not args.state_url:
        return with_throwaway_postgres(args)

    with tempfile.TemporaryDirectory(prefix="batchspec-scale-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.only == "manifests":
            return report(bench_manifests(root, args), 0.0, args.manifests)
        return bench(root, args)


def with_throwaway_postgres(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from postgres import find_bin_dir, start_cluster  # the suite's throwaway cluster

    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL server binaries (apt-get install postgresql)")
    cluster = start_cluster(bin_dir)
    try:
        args.state_url = cluster.new_database()
        with tempfile.TemporaryDirectory(prefix="batchspec-scale-") as tmp:
            root = args.keep or Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            return bench(root, args)
    finally:
        cluster.stop()


def bench(root: Path, args: argparse.Namespace) -> int:
    py = [sys.executable, "-m", "batchspec"]
    data = root / "input.jsonl"
    if not data.exists():
        t = time.perf_counter()
        generate(data, args.requests, args.line_bytes)
        print(f"generated {data} in {time.perf_counter() - t:.1f} s")
    size_mb = data.stat().st_size / 1e6
    print(f"input: {args.requests:,} requests, {size_mb:,.1f} MB; python {sys.version.split()[0]}")
    server = Server(root / "engine", args.concurrency)
    results: list[Measurement] = []
    # the state's URL reaches the children only (BATCHSPEC_STATE), never the report
    env = {"BENCH_API_KEY": "unused"} | (
        {"BATCHSPEC_STATE": args.state_url} if args.state_url else {}
    )
    try:
        ws = big_workspace(root, data, server.url + "/v1")
        run("warm-page-cache", [sys.executable, "-c", BARE, str(data)])
        results.append(run("bare", [sys.executable, "-c", BARE, str(data)]))
        results.append(run("validate", [*py, "validate", str(ws), "--json"]))
        results.append(run("plan-cold", [*py, "plan", str(ws), "--json"], env=env))
        results.append(run("plan-warm", [*py, "plan", str(ws), "--json"], env=env))
        if not args.skip_apply:
            apply_argv = [*py, "apply", str(ws), "--wait", "--yes", "--poll-interval", "1"]
            applied = run("apply", apply_argv, env=env)
            results.append(applied)
            check_apply(applied, ws, args.requests)
    finally:
        server.stop()
    if args.state_url and not args.skip_apply:
        results.append(bench_restore(root, ws, env))
    results.extend(bench_manifests(root, args))
    return report(results, size_mb, args.manifests)


def bench_manifests(root: Path, args: argparse.Namespace) -> list[Measurement]:
    """``plan`` over many manifests: cold once, then warm ``--warm-runs`` times (median)."""
    py = [sys.executable, "-m", "batchspec"]
    many = many_manifests_workspace(root, args.manifests)
    shutil.rmtree(many / "state", ignore_errors=True)  # cold even in a --keep folder
    argv = [*py, "plan", str(many)]
    name = f"plan-{args.manifests}"
    cold = run(f"{name}-cold", argv)
    warm = [run(f"{name}-warm", argv) for _ in range(max(args.warm_runs, 1))]
    print(f"{name}-warm runs, wall s: " + " ".join(f"{m.seconds:.2f}" for m in warm))
    # the lower median: a run that happened, with its own CPU time and RSS
    median = sorted(warm, key=lambda m: m.seconds)[(len(warm) - 1) // 2]
    return [cold, median]


def bench_restore(root: Path, ws: Path, env: dict[str, str]) -> Measurement:
    """A fresh copy of the workspace, the server stopped: results/ from the state's blobs."""
    fresh = root / "big-fresh-checkout"
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(ws, fresh, ignore=shutil.ignore_patterns("state", "results"))
    py = [sys.executable, "-m", "batchspec"]
    m = run("restore", [*py, "apply", str(fresh), "--wait", "--yes"], env=env)
    for name in ("big.jsonl", "big.errors.jsonl"):
        want, got = ws / "results" / name, fresh / "results" / name
        if want.exists() and (not got.exists() or file_sha(want) != file_sha(got)):
            print(f"restore FAILED: {got} differs from {want}")
    return m


def file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_apply(m: Measurement, ws: Path, requests: int) -> None:
    output = ws / "results" / "big.jsonl"
    lines = count_lines(output) if output.exists() else 0
    errors = ws / "results" / "big.errors.jsonl"
    if m.returncode != 0 or lines != requests or (errors.exists() and errors.stat().st_size):
        print(f"apply FAILED: exit {m.returncode}, {lines:,} output lines")
        print(m.stdout[-3000:], m.stderr[-3000:])


def report(results: list[Measurement], size_mb: float, manifests: int) -> int:
    bare = next((m for m in results if m.name == "bare"), None)
    print()
    print(
        f"{'command':<18}{'wall s':>9}{'cpu s':>9}{'x bare':>8}{'MB/s':>9}{'peak RSS MB':>13}  exit"
    )
    for m in results:
        per_file = bare is not None and (
            not m.name.startswith("plan-") or m.name in ("plan-cold", "plan-warm")
        )
        ratio = f"{m.seconds / bare.seconds:.2f}" if per_file and bare else ""
        rate = f"{size_mb / m.seconds:.0f}" if per_file else ""
        print(
            f"{m.name:<18}{m.seconds:>9.2f}{m.cpu_seconds:>9.2f}{ratio:>8}{rate:>9}"
            f"{m.rss_mb:>13.1f}  {m.returncode}"
        )
        if m.returncode != 0:
            print(f"    stderr: {m.stderr.strip()[-500:]}")
    ok = True
    for applied in (m for m in results if m.name in ("apply", "restore")):
        met = applied.rss_mb <= TARGET_APPLY_RSS_MB and applied.returncode == 0
        ok &= met
        print(
            f"\n{applied.name} peak RSS {applied.rss_mb:.1f} MB "
            f"(target <= {TARGET_APPLY_RSS_MB:.0f}): " + ("met" if met else "MISSED")
        )
    warm = next(m for m in results if m.name == f"plan-{manifests}-warm")
    met = warm.seconds < TARGET_WARM_PLAN_1000_S and warm.returncode == 0
    ok &= met
    print(
        f"plan over {manifests:,} manifests, warm (median): {warm.seconds:.2f} s "
        f"(target < {TARGET_WARM_PLAN_1000_S:.0f} s): " + ("met" if met else "MISSED")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
