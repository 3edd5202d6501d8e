"""Benchmark: an apply pass over many manifests, serial (--parallelism 1) against parallel.

Starts ``batchspec serve`` (a separate process on 127.0.0.1) whose upstream is a loopback
model stand-in that answers nothing until it is told to, and puts a proxy in front of serve
(bench/latency_proxy.py) that adds ``--latency`` seconds (default 0.1, a round trip to a
hosted API) to every request.
A workspace of ``--manifests`` manifests (default 100, ``--requests`` each) is submitted once
(the submit pass, timed: uploads and creates are still made one after another), then:

  poll pass      every batch in flight: one ``apply`` pass that polls them all
  collect pass   every batch completed: one ``apply`` pass that polls, downloads and merges

Each pass runs from a copy of the workspace and its state taken at that point, as its own
``batchspec apply`` child process, ``--runs`` times (default 3) for each parallelism; the
median wall time is printed with the requests the proxy forwarded per pass.

Run:  .venv/bin/python bench/parallel_apply.py
      .venv/bin/python bench/parallel_apply.py --baseline-src /tmp/main   # and an older one
      .venv/bin/python bench/parallel_apply.py --manifests 300 --latency 0.1 --runs 3

Only loopback addresses are used; every server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from latency_proxy import start_latency_proxy

KEY_ENV = "BATCHSPEC_BENCH_KEY"
BENCH_KEY = "bench-key-not-secret"
BASELINE_SRC: list[str] = []  # --baseline-src, e.g. an export of main


def compile_batchspec() -> None:
    """Compile batchspec's modules to bytecode, as ``pip install`` does for an installed
    package (the ``openai`` package the SDK script imports is compiled that way). An editable
    install is compiled by its first run, except where PYTHONDONTWRITEBYTECODE is set, as on
    the machine these figures come from: there every run compiled ~80 modules (0.15 s)."""
    import batchspec

    package = str(Path(batchspec.__file__).parent)
    subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=True)


def start_gated_model() -> tuple[ThreadingHTTPServer, threading.Event, str]:
    """An OpenAI chat stand-in that holds every request until the event is set."""
    gate = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # as the proxy's (below): no delayed-ACK stall a call

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            gate.wait()
            body = json.dumps(
                {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion",
                    "model": "bench",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "ok"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                }
            ).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the engine gave up waiting (its request timeout) and retries
                pass

    server = _LoopbackServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, gate, f"http://127.0.0.1:{server.server_address[1]}/v1"


class _LoopbackServer(ThreadingHTTPServer):
    # the default listen backlog (5) resets connections when dozens are opened at once
    request_queue_size = 256
    daemon_threads = True


def start_serve(data_dir: Path, upstream: str) -> tuple[subprocess.Popen[str], str]:
    argv = [
        *(sys.executable, "-m", "batchspec", "serve", "--port", "0"),
        *("--data-dir", str(data_dir), "--upstream", upstream, "--concurrency", "8"),
        *("--api-key-env", KEY_ENV),
    ]
    env = {**os.environ, KEY_ENV: BENCH_KEY}
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
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
    return process, found[0]


def write_workspace(root: Path, base_url: str, manifests: int, requests: int) -> None:
    (root / "manifests").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "batchspec.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Project\nmanifests: [manifests/*.yaml]\n"
        f"providers:\n  bench:\n    type: openai\n    baseUrl: {base_url}\n"
        f"    apiKeyEnv: {KEY_ENV}\n"
    )
    for m in range(manifests):
        name = f"job-{m:04d}"
        (root / "manifests" / f"{name}.yaml").write_text(
            f"apiVersion: batchspec/v1\nkind: Batch\nmetadata:\n  name: {name}\nspec:\n"
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


def apply_pass(root: Path, parallelism: int) -> float:
    """One ``batchspec apply`` pass; parallelism 0: the batchspec in ``--baseline-src``."""
    argv = [sys.executable, "-m", "batchspec", "apply", str(root), "--yes", "--quiet"]
    env = {**os.environ, KEY_ENV: BENCH_KEY}
    if parallelism:
        argv += ["--parallelism", str(parallelism)]
    else:
        env["PYTHONPATH"] = BASELINE_SRC[0]
    start = time.perf_counter()
    # run from the workspace: from a source checkout, `python -m` would import that instead
    done = subprocess.run(argv, env=env, capture_output=True, cwd=root)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"apply failed: {done.stderr.decode()[-2000:]}")
    return seconds


def time_pass(
    label: str, snapshot: Path, tmp: Path, runs: int, counts: Counter[str], modes: list[int]
) -> None:
    for parallelism in modes:
        times = []
        for run in range(runs):
            copy = tmp / f"{label}-{parallelism}-{run}"
            shutil.copytree(snapshot, copy)
            before = sum(counts.values())
            times.append(apply_pass(copy, parallelism))
            calls = sum(counts.values()) - before
        mode = f"--parallelism {parallelism:<3}" if parallelism else "baseline        "
        print(
            f"{label:<14} {mode} median {statistics.median(times):6.2f} s"
            f"  (runs: {', '.join(f'{t:.2f}' for t in times)}; {calls} requests per pass)"
        )


def wait_until(base_url: str, status_ok: Any, n: int) -> None:
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        seen, after = [], None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            page = httpx.get(f"{base_url}/v1/batches", params=params, headers=headers).json()
            seen += page["data"]
            if not page.get("has_more"):
                break
            after = page["last_id"]
        if len(seen) >= n and all(status_ok(b["status"]) for b in seen):
            return
        time.sleep(0.2)
    raise SystemExit("serve did not reach the expected state")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifests", type=int, default=100)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parallelism", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--baseline-src",
        help="also time the passes with the batchspec package found in this folder "
        "(e.g. `git archive main | tar -x -C /tmp/main`)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    if args.baseline_src:
        BASELINE_SRC.append(args.baseline_src)
        args.parallelism = [0, *args.parallelism]
    tmp = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    model, gate, model_url = start_gated_model()
    serve, serve_url = start_serve(tmp / "engine", model_url)
    proxy, counts = start_latency_proxy(serve_url, args.latency)
    try:
        ws = tmp / "ws"
        proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}/v1"
        write_workspace(ws, proxy_url, args.manifests, args.requests)
        print(
            f"{args.manifests} manifests x {args.requests} requests, "
            f"{args.latency * 1000:.0f} ms added per request, medians of {args.runs}"
        )
        seconds = apply_pass(ws, 16)
        print(f"{'submit pass':<14} (uploads and creates, one at a time) {seconds:6.2f} s")
        wait_until(serve_url, lambda s: s == "in_progress", args.manifests)
        shutil.copytree(ws, tmp / "in-flight")
        time_pass("poll pass", tmp / "in-flight", tmp, args.runs, counts, args.parallelism)
        gate.set()
        wait_until(serve_url, lambda s: s == "completed", args.manifests)
        shutil.copytree(ws, tmp / "completed")
        time_pass("collect pass", tmp / "completed", tmp, args.runs, counts, args.parallelism)
    finally:
        gate.set()
        proxy.shutdown()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
        model.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
