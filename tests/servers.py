"""Test helpers: the engine's HTTP API and a counting stand-in upstream, on loopback threads.

Reusable by any test (see the fixtures ``serve_engine`` and ``standin_upstream`` in
``conftest.py``): ``start_server(data_dir, **engine_options)`` opens an ``Engine`` with fast
test timings, serves it under uvicorn on 127.0.0.1 with a free port and returns an
``EngineServer`` (``.base_url``, ``.v1``, ``.client()`` for the official ``openai`` SDK,
``.stop()``). ``start_standin_upstream`` serves the builtin stand-in over HTTP in its own
thread and counts the calls per request body, so a test can prove no line was sent twice.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from batchspec.engine import Engine, Upstream
from batchspec.engine.app import create_app
from batchspec.engine.server import BackgroundServer, start_in_thread
from batchspec.engine.upstreams import BuiltinUpstream, standin_app

#: Timings that keep tests fast: quick polls and commits, near-instant retry backoff.
FAST_ENGINE_OPTIONS: dict[str, Any] = {
    "poll_interval": 0.02,
    "commit_interval": 0.01,
    "retry_base_delay": 0.001,
    "retry_max_delay": 0.01,
    "drain_timeout": 5.0,
}
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class EngineServer:
    """A running engine behind its HTTP API; ``base_url`` has no ``/v1``."""

    base_url: str
    engine: Engine
    background: BackgroundServer
    api_key: str | None

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def client(self, *, api_key: str | None = None, max_retries: int = 0, **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(
            base_url=self.v1,
            api_key=api_key or self.api_key or "unused-key",
            max_retries=max_retries,
            timeout=10.0,
            **kwargs,
        )

    def stop(self) -> None:
        """Stop serving, then close the engine (drains in-flight requests, commits)."""
        self.background.stop()
        self.engine.close()


def start_server(
    data_dir: Path,
    *,
    upstream: Upstream | None = None,
    api_key: str | None = None,
    **engine_options: Any,
) -> EngineServer:
    """An engine on ``data_dir`` (builtin upstream unless given), served on a free port."""
    options = {**FAST_ENGINE_OPTIONS, **engine_options}
    engine = Engine(data_dir, upstream or BuiltinUpstream(), **options).start()
    try:
        background = start_in_thread(create_app(engine, api_key=api_key))
    except BaseException:
        engine.close()
        raise
    return EngineServer(background.base_url, engine, background, api_key)


@dataclass
class StandinUpstream:
    """The builtin stand-in served over HTTP; ``calls`` counts requests per body sha256."""

    base_url: str
    background: BackgroundServer
    calls: Counter[str]

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def stop(self) -> None:
        self.background.stop()


def start_standin_upstream(*, latency: float = 0.0) -> StandinUpstream:
    app = standin_app(latency=latency)
    background = start_in_thread(app)
    return StandinUpstream(background.base_url, background, app.state.calls)


# ---------------------------------------------------------------------------------------------
# Stopping servers at teardown, off the test's thread

_stopping: list[tuple[threading.Thread, list[BaseException]]] = []


def stop_after_test(servers: Iterable[Any]) -> None:
    """Fixture teardown: stop ``servers`` (anything with ``.stop()``), in order, on a thread
    of their own. A uvicorn server takes 0.1-0.2 s to shut down (its main loop's tick, then
    0.1 s for connections) and a ``batchspec serve`` process as long plus its exit; the next
    test need not wait for that. Each test's servers have their own ports and data folders.
    ``join_stopped`` (end of session) waits for all of them and re-raises the first error."""
    servers = list(servers)
    if not servers:
        return
    errors: list[BaseException] = []

    def stop_all() -> None:
        for server in servers:
            try:
                server.stop()
            except BaseException as err:  # kept for join_stopped
                errors.append(err)

    thread = threading.Thread(target=stop_all, name="test-teardown-stop", daemon=True)
    thread.start()
    _stopping[:] = [(t, e) for t, e in _stopping if t.is_alive() or e]
    _stopping.append((thread, errors))


def join_stopped(timeout: float = 60.0) -> None:
    """Wait for every ``stop_after_test`` thread; raise the first error a stop raised."""
    for thread, _ in _stopping:
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("a server stopped at teardown did not stop within 60 s")
    errors = [err for _, errs in _stopping for err in errs]
    _stopping.clear()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------------------------
# Batch inputs and waiting


def request_lines(
    count: int,
    *,
    endpoint: str = "/v1/chat/completions",
    model: str = "test-model",
    prefix: str = "req",
) -> list[dict[str, Any]]:
    """``count`` valid request lines with distinct custom_ids and distinct bodies."""
    lines = []
    for i in range(count):
        if endpoint == "/v1/chat/completions":
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": f"Say something about item {i}."}],
            }
        elif endpoint == "/v1/embeddings":
            body = {"model": model, "input": f"item {i}"}
        elif endpoint == "/v1/responses":
            body = {"model": model, "input": f"Say something about item {i}."}
        elif endpoint == "/v1/completions":
            body = {"model": model, "prompt": f"Item {i} is"}
        else:
            body = {"model": model, "input": f"item {i}"}
        lines.append(
            {"custom_id": f"{prefix}-{i}", "method": "POST", "url": endpoint, "body": body}
        )
    return lines


def jsonl_bytes(lines: Iterable[dict[str, Any] | str]) -> bytes:
    return "".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
    ).encode()


def wait_for(predicate: Any, *, timeout: float = 15.0, interval: float = 0.02) -> Any:
    """Poll ``predicate()`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def wait_for_batch(client: Any, batch_id: str, *, timeout: float = 15.0) -> Any:
    """Retrieve a batch through the SDK until it is terminal."""

    def terminal() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in TERMINAL else None

    return wait_for(terminal, timeout=timeout)


def read_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Chat upstreams that record when requests arrive and how many overlap (rotation tests)


@dataclass
class RecordingUpstream:
    """A chat-completions stand-in on loopback that records arrivals and overlap."""

    base_url: str
    background: BackgroundServer
    arrivals: list[float]  # time.monotonic() of each request's arrival
    peak: list[int]  # [requests in flight now, most ever in flight at once]

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def max_in_flight(self) -> int:
        return self.peak[1]

    def stop(self) -> None:
        self.background.stop()


def start_recording_upstream(*, latency: float = 0.0, port: int = 0) -> RecordingUpstream:
    """``standin_app``'s answers after ``latency`` s, on ``port`` (0: a free one)."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from batchspec.engine.upstreams import answer

    arrivals: list[float] = []
    peak = [0, 0]

    async def endpoint(request: Request) -> JSONResponse:
        arrivals.append(time.monotonic())
        peak[0] += 1
        peak[1] = max(peak)
        try:
            body = json.loads(await request.body())
            if latency > 0:
                await asyncio.sleep(latency)
            result = answer(request.url.path, body)
            return JSONResponse(result.body, status_code=result.status_code)
        finally:
            peak[0] -= 1

    app = Starlette(routes=[Route("/v1/{path:path}", endpoint, methods=["POST"])])
    background = start_in_thread(app, port=port)
    return RecordingUpstream(background.base_url, background, arrivals, peak)


class QuietHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` for the tests' scripted and hostile servers that says
    nothing when a client hangs up mid-answer (what batchspec does to a body it refuses):
    the default prints a traceback from the handler's thread, which may still run during
    the next test of the worker and land in that test's captured output."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)
