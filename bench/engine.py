"""Benchmark: a 10,000-request batch through the local engine over HTTP.

Starts, each in its own process (so none shares a GIL with another):

- an upstream: a minimal asyncio HTTP/1.1 server that answers every POST with a small chat
  completion after ``--latency`` seconds (default 0.02), like a model server with fixed latency;
- the engine: ``python -m batchspec serve --upstream http://127.0.0.1:<port>/v1``;

then uploads the batch with httpx, creates it, polls until it is terminal and prints the
throughput beside the theoretical maximum (concurrency ÷ latency) and the overhead per
request (concurrency ÷ throughput − latency).

The two-upstream case (scale-out, ``balancer.py``) starts two such upstreams that each serve
at most ``--slots`` requests at once (more wait in a queue, like a model server's batch
slots), so each one's theoretical capacity is slots ÷ latency; the engine gets both
(``--upstream A --upstream B``) and twice as many requests in flight as all the slots, and
the figure is its execution rate against the sum of both capacities (target: ≥ 0.9). A
reference run follows: one upstream with all the slots, no rotation, same concurrency.

    .venv/bin/python bench/engine.py                      # concurrency 32 and 8, then two upstreams
    .venv/bin/python bench/engine.py --requests 2000 --concurrency 16 --case single
    .venv/bin/python bench/engine.py --case two-upstreams --latency 0.05 --slots 16

Only loopback addresses are used; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
    """HTTP/1.1 keep-alive: each complete request is answered ``latency`` seconds later.

    With ``slots`` > 0, at most that many requests are being answered at once (the process
    over); the others wait their turn in arrival order.
    """

    latency = 0.02
    slots = 0
    busy = 0
    waiting: collections.deque[_FixedLatencyHttp] = collections.deque()

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
            cls = _FixedLatencyHttp
            if cls.slots and cls.busy >= cls.slots:
                cls.waiting.append(self)
            else:
                self._start()

    def _start(self) -> None:
        _FixedLatencyHttp.busy += 1
        asyncio.get_running_loop().call_later(self.latency, self._answer)

    def _answer(self) -> None:
        cls = _FixedLatencyHttp
        cls.busy -= 1
        if cls.waiting:
            cls.waiting.popleft()._start()
        if self.transport.is_closing():
            return
        self.transport.write(  # type: ignore[attr-defined]
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req_bench\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(RESPONSE_BODY), RESPONSE_BODY)
        )


async def _run_upstream(latency: float, slots: int) -> None:
    _FixedLatencyHttp.latency = latency
    _FixedLatencyHttp.slots = slots
    server = await asyncio.get_running_loop().create_server(
        _FixedLatencyHttp, "127.0.0.1", 0, backlog=1024
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def start_upstream(latency: float, slots: int = 0) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--role",
            "upstream",
            "--latency",
            str(latency),
            "--slots",
            str(slots),
        ],  # fmt: skip
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
    data_dir: Path, upstreams: list[str], concurrency: int
) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "batchspec", "serve",
            "--port", "0",
            "--data-dir", str(data_dir),
            *(arg for upstream in upstreams for arg in ("--upstream", upstream)),
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


def single_upstream_case(args: argparse.Namespace, tmp: Path, input_path: Path) -> None:
    upstream, upstream_url = start_upstream(args.latency)
    print(f"{'concurrency':>11} {'max req/s':>10} {'raw client':>11} {'end-to-end':>11} "
          f"{'execution':>10} {'ratio':>6} {'overhead/req':>13}")  # fmt: skip
    try:
        for concurrency in args.concurrency:
            engine, base_url = start_engine(
                tmp / f"engine-{concurrency}", [upstream_url], concurrency
            )
            try:
                rates = run_once(base_url, input_path)
            finally:
                stop(engine)
            raw = asyncio.run(_raw_client_rate(upstream_url, concurrency, min(args.requests, 3000)))
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


def two_upstreams_case(args: argparse.Namespace, tmp: Path, input_path: Path) -> None:
    slots = args.slots
    started = [start_upstream(args.latency, slots) for _ in range(2)]
    capacity = 2 * slots / args.latency
    concurrency = 4 * slots  # twice all the slots: both upstreams stay busy
    print(
        f"two upstreams, {slots} slots each at {args.latency * 1000:.0f} ms: capacity "
        f"{slots / args.latency:,.0f} + {slots / args.latency:,.0f} = {capacity:,.0f} req/s; "
        f"engine concurrency {concurrency}"
    )
    try:
        engine, base_url = start_engine(
            tmp / "engine-two", [url for _, url in started], concurrency
        )
        try:
            rates = run_once(base_url, input_path)
        finally:
            stop(engine)
    finally:
        for proc, _ in started:
            stop(proc)
    ratio = rates["execution"] / capacity
    verdict = "meets" if ratio >= 0.9 else "MISSES"
    print(
        f"end-to-end {rates['end_to_end']:,.0f} req/s, execution {rates['execution']:,.0f} "
        f"req/s = {ratio:.2f} x capacity ({verdict} the 0.9 target)"
    )
    # the same capacity in one upstream, no rotation: what the engine reaches on this machine
    proc, url = start_upstream(args.latency, 2 * slots)
    try:
        engine, base_url = start_engine(tmp / "engine-one", [url], concurrency)
        try:
            reference = run_once(base_url, input_path)
        finally:
            stop(engine)
    finally:
        stop(proc)
    print(
        f"reference, one upstream of {2 * slots} slots (no rotation): execution "
        f"{reference['execution']:,.0f} req/s = {reference['execution'] / capacity:.2f} x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["driver", "upstream"], default="driver")
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--slots", type=int, default=16, help="per upstream (two-upstream case)")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[32, 8])
    parser.add_argument("--case", choices=["all", "single", "two-upstreams"], default="all")
    args = parser.parse_args()
    if args.role == "upstream":
        asyncio.run(_run_upstream(args.latency, args.slots))
        return

    print(
        f"{args.requests:,} chat requests, upstream latency {args.latency * 1000:.0f} ms, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        input_path = Path(tmp) / "bench.jsonl"
        batch_input(input_path, args.requests)
        if args.case in ("all", "single"):
            single_upstream_case(args, Path(tmp), input_path)
        if args.case in ("all", "two-upstreams"):
            two_upstreams_case(args, Path(tmp), input_path)


if __name__ == "__main__":
    main()
