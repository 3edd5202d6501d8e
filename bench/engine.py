"""Benchmark: a 10,000-request batch through the local engine over HTTP.

Starts, each in its own process (so none shares a GIL with another):

- an upstream: a minimal asyncio HTTP/1.1 server that answers every POST with a small chat
  completion after ``--latency`` seconds (default 0.02), like a model server with fixed latency;
- the engine: ``python -m batchspec serve --upstream http://127.0.0.1:<port>/v1``;

then uploads the batch with httpx, creates it, polls until it is terminal and prints the
throughput beside the theoretical maximum (concurrency ÷ latency) and the overhead per
request (concurrency ÷ throughput − latency).

    .venv/bin/python bench/engine.py                      # concurrency 32 and 8, 10,000 lines
    .venv/bin/python bench/engine.py --requests 2000 --concurrency 16

Only loopback addresses are used; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

RESPONSE_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A fixed benchmark reply."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }
).encode()


# ---------------------------------------------------------------------------------------------
# The upstream process


class _FixedLatencyHttp(asyncio.Protocol):
    """HTTP/1.1 keep-alive: each complete request is answered ``latency`` seconds later."""

    latency = 0.02

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            match = re.search(rb"(?i)content-length:\s*(\d+)", self.buffer[:head_end])
            length = int(match.group(1)) if match else 0
            if len(self.buffer) < head_end + 4 + length:
                return
            self.buffer = self.buffer[head_end + 4 + length :]
            asyncio.get_running_loop().call_later(self.latency, self._answer)

    def _answer(self) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(  # type: ignore[attr-defined]
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req_bench\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(RESPONSE_BODY), RESPONSE_BODY)
        )


async def _run_upstream(latency: float) -> None:
    _FixedLatencyHttp.latency = latency
    server = await asyncio.get_running_loop().create_server(
        _FixedLatencyHttp, "127.0.0.1", 0, backlog=1024
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def start_upstream(latency: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", "upstream", "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


async def _raw_client_rate(upstream_url: str, concurrency: int, requests: int) -> float:
    """The upstream's ceiling: a bare asyncio keep-alive client, no engine in between."""
    port = int(upstream_url.rsplit(":", 1)[1].split("/")[0])
    body = b'{"model":"bench-model","messages":[]}'
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    remaining = [requests]

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while remaining[0] > 0:
            remaining[0] -= 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"content-length: (\d+)", head)
            await reader.readexactly(int(match.group(1)) if match else 0)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return requests / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# The engine process


def start_engine(
    data_dir: Path, upstream: str, concurrency: int
) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "batchspec", "serve",
            "--port", "0",
            "--data-dir", str(data_dir),
            "--upstream", upstream,
            "--concurrency", str(concurrency),
            "--poll-interval", "0.05",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"serving on (http://\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the engine did not start: {line}{proc.stderr.read()}")
    return proc, match.group(1)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# The driver


def batch_input(path: Path, requests: int) -> None:
    with open(path, "w") as f:
        for i in range(requests):
            line = {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "bench-model",
                    "messages": [{"role": "user", "content": f"Benchmark request number {i}."}],
                },
            }
            f.write(json.dumps(line) + "\n")


def run_once(base_url: str, input_path: Path) -> dict[str, float]:
    with httpx.Client(base_url=f"{base_url}/v1", timeout=60) as client:
        with open(input_path, "rb") as fh:
            file_id = client.post(
                "/files", files={"file": ("bench.jsonl", fh)}, data={"purpose": "batch"}
            ).json()["id"]
        t_create = time.perf_counter()
        batch = client.post(
            "/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        ).json()
        t_first = t_last = None
        first_count = 0
        while True:
            batch = client.get(f"/batches/{batch['id']}").json()
            counts = batch["request_counts"]
            done = counts["completed"] + counts["failed"]
            now = time.perf_counter()
            if batch["status"] == "in_progress" and t_first is None and done > 0:
                t_first, first_count = now, done
            if done == counts["total"] and counts["total"] and t_last is None:
                t_last = now
            if batch["status"] in ("completed", "failed", "expired", "cancelled"):
                break
            time.sleep(0.05)
        t_end = time.perf_counter()
    if batch["status"] != "completed" or batch["request_counts"]["failed"]:
        raise SystemExit(f"unexpected result: {json.dumps(batch)}")
    total = batch["request_counts"]["total"]
    execution = (total - first_count) / ((t_last or t_end) - (t_first or t_create))
    return {"end_to_end": total / (t_end - t_create), "execution": execution}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["driver", "upstream"], default="driver")
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[32, 8])
    args = parser.parse_args()
    if args.role == "upstream":
        asyncio.run(_run_upstream(args.latency))
        return

    upstream, upstream_url = start_upstream(args.latency)
    print(
        f"{args.requests:,} chat requests, upstream latency {args.latency * 1000:.0f} ms, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    print(f"{'concurrency':>11} {'max req/s':>10} {'raw client':>11} {'end-to-end':>11} "
          f"{'execution':>10} {'ratio':>6} {'overhead/req':>13}")  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as tmp:
            input_path = Path(tmp) / "bench.jsonl"
            batch_input(input_path, args.requests)
            for concurrency in args.concurrency:
                engine, base_url = start_engine(
                    Path(tmp) / f"engine-{concurrency}", upstream_url, concurrency
                )
                try:
                    rates = run_once(base_url, input_path)
                finally:
                    stop(engine)
                raw = asyncio.run(
                    _raw_client_rate(upstream_url, concurrency, min(args.requests, 3000))
                )
                maximum = concurrency / args.latency
                overhead_ms = (concurrency / rates["execution"] - args.latency) * 1000
                print(
                    f"{concurrency:>11} {maximum:>10,.0f} {raw:>11,.0f} "
                    f"{rates['end_to_end']:>11,.0f} "
                    f"{rates['execution']:>10,.0f} {rates['execution'] / maximum:>6.2f} "
                    f"{overhead_ms:>10.2f} ms"
                )
    finally:
        stop(upstream)
    print("max: concurrency / latency; raw client: a bare asyncio client against the same")
    print("upstream (its real ceiling: timer granularity and loopback add ~1 ms per request);")
    print("end-to-end: create -> completed (validation, execution, output files);")
    print("execution: first to last finished request; ratio = execution / max;")
    print("overhead/req = concurrency / execution - latency.")


if __name__ == "__main__":
    main()
