"""Benchmark: `batchspec apply --wait` against a minimal official-SDK script, same job, same server.

The job: N chat requests (default 50,000) in one JSONL file. The server: `batchspec serve` on
loopback with the builtin upstream (the offline stand-in) and high concurrency, started
fresh, on a fresh data folder, for every run. The two clients, each its own process:

- **apply**: `python -m batchspec apply WS --wait --yes --poll-interval 0.5` on a workspace
  whose provider is `type: openai` with `baseUrl` at the server;
- **sdk**: the few lines a user would write with the official `openai` package (upload,
  create, poll every 0.5 s, stream the output file to disk): ``python bench/apply.py
  sdk-client INPUT BASE_URL OUTPUT``.

Wall time is measured around the client process only (from spawn to exit), peak RSS from
``os.wait4``'s ``ru_maxrss`` of that process (not the server's). Both outputs are checked to
hold one line per request. Runs alternate (apply, sdk, apply, sdk, ...) and the medians are
reported with their ratio, against the targets: ratio <= 1.0, apply's RSS <= 100 MB.
batchspec is compiled to bytecode first, as an installed package is (the ``openai``
package the SDK script imports is): ``parallel_apply.compile_batchspec``.

A third client, ``openai-batch`` (PyPI; bench only, never a dependency), runs the same job
with ``--openai-batch-path DIR`` (install it there with ``pip install --no-deps --target DIR
openai-batch``). ``--shards 6`` splits the job in six batches: apply uploads and creates them
side by side, the SDK script one after another. ``--latency 0.1`` puts the fleet bench's
proxy (``latency_proxy.start_latency_proxy``) between every client and the server, adding
that many seconds to each request, as a round trip to a hosted API does (default 0: loopback).

    .venv/bin/python bench/apply.py                         # 50,000 requests, 3 rounds
    .venv/bin/python bench/apply.py --requests 5000 --rounds 1
    .venv/bin/python bench/apply.py --profile               # also cProfile one apply run
    .venv/bin/python bench/apply.py --openai-batch-path /tmp/ob   # a third contender
    .venv/bin/python bench/apply.py --shards 6              # six batches
    .venv/bin/python bench/apply.py --shards 6 --latency 0.1   # ... 100 ms from the server

Only loopback addresses are used; every process is stopped at the end.
"""

from __future__ import annotations

import sys


def sdk_client(input_path: str, base_url: str, output_path: str) -> None:
    """The minimal official-SDK batch client (its imports kept here: it runs on its own)."""
    import os
    import time

    import openai

    client = openai.OpenAI(base_url=base_url, api_key=os.environ["BENCH_API_KEY"])
    with open(input_path, "rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    if batch.status != "completed" or not batch.output_file_id:
        raise SystemExit(f"batch ended {batch.status}")
    with client.files.with_streaming_response.content(batch.output_file_id) as response:
        response.stream_to_file(output_path)


def sdk_sharded_client(input_path: str, base_url: str, output_path: str, shards: str) -> None:
    """The SDK script for a job split in ``shards`` files: uploads and creates them one after
    another, polls them all every 0.5 s, then streams each output file, in order."""
    import os
    import time

    import openai

    client = openai.OpenAI(base_url=base_url, api_key=os.environ["BENCH_API_KEY"])
    with open(input_path, "rb") as f:
        lines = f.readlines()
    n = int(shards)
    size = -(-len(lines) // n)
    batches = []
    for i in range(n):
        part = b"".join(lines[i * size : (i + 1) * size])
        uploaded = client.files.create(file=(f"part-{i}.jsonl", part), purpose="batch")
        batches.append(
            client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
        )
    done = ("completed", "failed", "expired", "cancelled")
    while not all(b.status in done for b in batches):
        time.sleep(0.5)
        batches = [b if b.status in done else client.batches.retrieve(b.id) for b in batches]
    with open(output_path, "wb") as out:
        for b in batches:
            if b.status != "completed" or not b.output_file_id:
                raise SystemExit(f"batch ended {b.status}")
            out.write(client.files.content(b.output_file_id).content)


def openai_batch_client(input_path: str, base_url: str, output_path: str) -> None:
    """The same job with the ``openai-batch`` package (PyPI; bench only): submit, poll every
    0.5 s, download."""
    import os

    from openai_batch import Batch
    from openai_batch.providers import Provider

    batch = Batch(submission_input_file=input_path, output_file=output_path)
    batch.provider = Provider(base_url=base_url, api_key=os.environ["BENCH_API_KEY"])
    result, _, _ = batch.submit_wait_download(interval=0.5)
    if result.status != "completed":
        raise SystemExit(f"batch ended {result.status}")


if __name__ == "__main__" and sys.argv[1:2] == ["sdk-client"]:
    sdk_client(*sys.argv[2:5])
    sys.exit(0)
if __name__ == "__main__" and sys.argv[1:2] == ["sdk-sharded-client"]:
    sdk_sharded_client(*sys.argv[2:6])
    sys.exit(0)
if __name__ == "__main__" and sys.argv[1:2] == ["openai-batch-client"]:
    openai_batch_client(*sys.argv[2:5])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# The harness (not imported by the sdk client above)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

KEY_ENV = "BENCH_API_KEY"
BENCH_KEY = "sk-bench-not-a-real-key"
THIS = Path(__file__).resolve()
OPENAI_BATCH_PATH: list[str] = []  # --openai-batch-path: where the openai-batch package is


def write_input(path: Path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            body = {
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Classify the ticket: billing, bug or other."},
                    {"role": "user", "content": f"Ticket {i}: my invoice number {i * 7} is wrong."},
                ],
                "max_tokens": 20,
            }
            line = {"custom_id": f"t-{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")


def write_workspace(root: Path, base_url: str, n: int, shards: int = 1) -> Path:
    """A workspace with one resource of ``n`` requests on an openai-type provider, split in
    ``shards`` batches (``limits.maxRequestsPerBatch``) when more than one."""
    (root / "manifests").mkdir(parents=True)
    (root / "batchspec.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Project\n"
        "manifests: [manifests/*.yaml]\n"
        "providers:\n"
        f"  bench:\n    type: openai\n    baseUrl: {base_url}\n    apiKeyEnv: {KEY_ENV}\n"
    )
    (root / "manifests" / "job.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Batch\nmetadata:\n  name: job\nspec:\n"
        "  provider: bench\n  endpoint: /v1/chat/completions\n"
        "  input: ../data/input.jsonl\n  output: ../results/job.jsonl\n"
        "  errors: ../results/job.errors.jsonl\n  retry: {maxAttempts: 1}\n"
        + (f"  limits: {{maxRequestsPerBatch: {-(-n // shards)}}}\n" if shards > 1 else "")
    )
    write_input(root / "data" / "input.jsonl", n)
    return root / "results" / "job.jsonl"


@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(data_dir: Path, concurrency: int) -> Server:
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
        "--api-key-env",
        KEY_ENV,
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
            elif not match:
                sys.stderr.write(f"[serve] {line}")

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 30
    while not found:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("batchspec serve did not start")
        time.sleep(0.02)
    return Server(found[0], process)


@dataclass(frozen=True)
class Measure:
    client: str
    seconds: float
    peak_rss_mb: float


def run_client(name: str, argv: list[str], cwd: Path, env: dict[str, str]) -> Measure:
    """Spawn the client, wait for it with wait4: wall time and its own peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env={**os.environ, KEY_ENV: BENCH_KEY, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    err = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(f"{name} exited {process.returncode}:\n{err}")
    return Measure(name, seconds, usage.ru_maxrss / 1024)  # ru_maxrss is in KiB on Linux


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def one_run(
    client: str,
    n: int,
    concurrency: int,
    tmp: Path,
    profile: Path | None,
    shards: int = 1,
    latency: float = 0.0,
) -> Measure:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{client}-", dir=tmp))
    server = start_server(run_dir / "engine", concurrency)
    url = server.url
    proxy = None
    if latency > 0:
        from parallel_apply import start_latency_proxy  # the harness's, beside this file

        proxy, _ = start_latency_proxy(server.url, latency)
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
    env: dict[str, str] = {}
    try:
        if client == "apply":
            output = write_workspace(run_dir / "ws", f"{url}/v1", n, shards)
            prefix = [sys.executable, "/tmp/ph/trace2.py"]
            if profile is not None:
                prefix += ["-m", "cProfile", "-o", str(profile)]
            argv = [*prefix, "apply", str(run_dir / "ws")]
            argv += ["--wait", "--yes", "--poll-interval", "0.5"]
        else:
            write_input(run_dir / "input.jsonl", n)
            output = run_dir / "output.jsonl"
            mode = {"sdk": "sdk-client", "openai-batch": "openai-batch-client"}[client]
            if client == "sdk" and shards > 1:
                mode = "sdk-sharded-client"
            argv = [sys.executable, str(THIS), mode, str(run_dir / "input.jsonl")]
            argv += [f"{url}/v1", str(output)]
            if mode == "sdk-sharded-client":
                argv.append(str(shards))
            if client == "openai-batch":
                env["PYTHONPATH"] = OPENAI_BATCH_PATH[0]
        measure = run_client(client, argv, run_dir, env)
    finally:
        if proxy is not None:
            proxy.shutdown()
        server.stop()
    lines = count_lines(output)
    if lines != n:
        raise SystemExit(f"{client}: {lines} output lines, expected {n}")
    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="cProfile one more apply run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument(
        "--shards", type=int, default=1, help="split the job in this many batches (e.g. 6)"
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds a proxy adds to every request, client to server (default 0: loopback)",
    )
    parser.add_argument(
        "--openai-batch-path",
        help="a folder holding the openai-batch package (`pip install --no-deps --target "
        "DIR openai-batch`): also time it as a third client (single batch only)",
    )
    args = parser.parse_args()
    from parallel_apply import compile_batchspec  # the harness's, beside this file

    compile_batchspec()  # as installed: the SDK script's openai package is compiled too
    tmp = Path(tempfile.mkdtemp(prefix="bench-apply-"))
    clients = ["apply", "sdk"]
    if args.openai_batch_path and args.shards == 1:
        OPENAI_BATCH_PATH.append(args.openai_batch_path)
        clients.append("openai-batch")
    results: dict[str, list[Measure]] = {c: [] for c in clients}
    shards = f", {args.shards} shards (the SDK script one after another)" if args.shards > 1 else ""
    latency = f", {args.latency * 1000:.0f} ms added per request" if args.latency > 0 else ""
    print(
        f"{args.requests:,} chat requests{shards}, batchspec serve --concurrency "
        f"{args.concurrency} (builtin upstream){latency}, {args.rounds} round(s); client wall "
        "time and peak RSS"
    )
    for round_no in range(1, args.rounds + 1):
        for client in clients:
            m = one_run(
                client, args.requests, args.concurrency, tmp, None, args.shards, args.latency
            )
            results[client].append(m)
            print(f"  round {round_no} {client:12}: {m.seconds:7.2f} s  {m.peak_rss_mb:6.1f} MB")
    medians = {c: statistics.median(m.seconds for m in results[c]) for c in clients}
    apply_s, sdk_s = medians["apply"], medians["sdk"]
    apply_mb = max(m.peak_rss_mb for m in results["apply"])
    sdk_mb = max(m.peak_rss_mb for m in results["sdk"])
    ratio = apply_s / sdk_s
    target = 1.0
    print(
        "median "
        + ", ".join(f"{c} {s:.2f} s" for c, s in medians.items())
        + f"; apply/sdk {ratio:.3f} (target <= {target})"
    )
    if "openai-batch" in medians:
        print(f"apply/openai-batch {apply_s / medians['openai-batch']:.3f}")
    print(f"peak RSS apply {apply_mb:.1f} MB (target <= 100), sdk {sdk_mb:.1f} MB")
    verdict = "met" if ratio <= target and apply_mb <= 100 else "MISSED"
    print(f"targets {verdict}")
    if args.profile:
        profile = tmp / "apply.prof"
        one_run("apply", args.requests, args.concurrency, tmp, profile, args.shards, args.latency)
        import pstats

        print(f"\ncProfile of one apply run ({profile}), top 25 by cumulative time:")
        pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(25)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
