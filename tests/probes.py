"""Test helpers: watch (and slow down) the engine's HTTP API, and run a real `batchspec serve`.

``start_probed_server(data_dir, api_key=..., **engine_options)`` serves the engine like
``servers.start_server`` but behind a ``RequestProbe``: an ASGI wrapper that counts (and
logs, in order) every request by route (``"POST /files"``, ``"POST /batches"``, ...) and can
hold a route for a while, either *before* the engine sees the request or *after* the engine
has answered but before the answer leaves (or replace that answer by an error status), or
answer requests itself (``refuse``: a status and body the engine never sees, as a provider
answers what the engine does not emulate). A
held route sets a ``threading.Event``, so a test knows exactly when a client is stuck in
that call, e.g. to SIGKILL it then. ``peak`` is the most requests it ever answered at once
(calls that overlapped). This is real timing on the server side; the client under test is
not touched.

``start_serve_process(data_dir, *args)`` runs ``batchspec serve --port 0`` as a separate
process and reads the URL it announces.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers import FAST_ENGINE_OPTIONS, EngineServer

from batchspec.engine import Engine, Upstream
from batchspec.engine.api_faults import ApiFaults
from batchspec.engine.app import create_app
from batchspec.engine.server import start_in_thread
from batchspec.engine.upstreams import BuiltinUpstream

_ID = re.compile(r"/(file|batch)[-_][^/]+")


def route_of(method: str, path: str) -> str:
    """``POST /v1/batches`` -> ``"POST /batches"``; object ids become ``{id}``."""
    path = path.removeprefix("/v1")
    return f"{method} {_ID.sub('/{id}', path)}"


@dataclass
class Hold:
    seconds: float
    after: bool  # hold the answer (the engine has acted) rather than the request
    drop: bool = False  # after the hold, answer 503 without the engine ever seeing it
    times: int | None = None  # hold only this many requests, then let the route go
    replace_status: int | None = None  # send this status instead of the engine's answer
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    async def wait(self) -> None:
        self.reached.set()
        deadline = time.monotonic() + self.seconds
        while not self.released.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)


class RequestProbe:
    """ASGI middleware: counts requests per route and holds the routes it is told to."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: Counter[str] = Counter()
        self.log: list[str] = []
        #: "METHOD /raw/path" of every request, in the order they arrived
        self.raw_log: list[str] = []
        self.holds: dict[str, Hold] = {}
        #: "METHOD /raw/path?query" of every request, in the order they arrived
        self.targets: list[str] = []
        #: (pattern on "METHOD /raw/path" or, with its flag, on "METHOD /raw/path?query",
        #: status, JSON body, the flag) answered without the engine
        self.refusals: list[tuple[re.Pattern[str], int, bytes, bool]] = []
        self._spent: list[Hold] = []
        self._lock = threading.Lock()
        self.active = 0  # requests being answered now
        self.peak = 0  # the most requests ever answered at once (calls that overlapped)
        #: (route, start, end) of every request answered, on the monotonic clock
        self.spans: list[tuple[str, float, float]] = []

    def hold(
        self,
        route: str,
        seconds: float,
        *,
        after: bool = False,
        drop: bool = False,
        times: int | None = None,
        replace_status: int | None = None,
    ) -> threading.Event:
        """Hold the next requests to ``route``; the event is set when one is being held.

        ``after``: the engine acts at once, its answer is held. ``drop``: the request is held,
        then refused with a 503 the engine never saw (a create that never arrived).
        ``times``: only that many requests are held. ``replace_status`` (with ``after``): the
        engine acts, then its answer is replaced by this status (a create that made a batch
        but answered 500).
        """
        hold = Hold(seconds, after, drop, times, replace_status)
        self.holds[route] = hold
        return hold.reached

    def refuse(self, pattern: str, status: int, body: Any, *, query: bool = False) -> None:
        """Answer every request whose ``"METHOD /raw/path"`` (``query``: with its query
        string, ``"?limit=5&after=..."``) matches ``pattern`` (a regular expression, searched)
        with ``status`` and ``body`` as JSON; the engine never sees it."""
        self.refusals.append((re.compile(pattern), status, json.dumps(body).encode(), query))

    def release(self, route: str) -> None:
        """Stop holding ``route``; requests held now go on at once."""
        hold = self.holds.pop(route, None)
        if hold is not None:
            hold.released.set()

    def release_all(self) -> None:
        for route in list(self.holds):
            self.release(route)
        for hold in self._spent:
            hold.released.set()

    def _take_hold(self, route: str) -> Hold | None:
        with self._lock:
            self.counts[route] += 1
            self.log.append(route)
            hold = self.holds.get(route)
            if hold is not None and hold.times is not None:
                hold.times -= 1
                if hold.times <= 0:
                    self._spent.append(self.holds.pop(route))
            return hold

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        start = time.monotonic()
        try:
            await self._answer(scope, receive, send)
        finally:
            with self._lock:
                self.active -= 1
                route = route_of(scope["method"], scope["path"])
                self.spans.append((route, start, time.monotonic()))

    async def _answer(self, scope: Any, receive: Any, send: Any) -> None:
        route = route_of(scope["method"], scope["path"])
        hold = self._take_hold(route)
        raw = f"{scope['method']} {scope['path']}"
        query = scope.get("query_string", b"").decode()
        target = f"{raw}?{query}" if query else raw
        with self._lock:
            self.raw_log.append(raw)
            self.targets.append(target)
        refusal = next((r for r in self.refusals if r[0].search(target if r[3] else raw)), None)
        if refusal is not None:
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": refusal[1], "headers": headers})
            await send({"type": "http.response.body", "body": refusal[2]})
        elif hold is None:
            await self.app(scope, receive, send)
        elif hold.drop:
            await hold.wait()
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        elif not hold.after:
            await hold.wait()
            await self.app(scope, receive, send)
        else:

            async def held_send(message: Any) -> None:
                if message["type"] == "http.response.start":
                    await hold.wait()
                if hold.replace_status is None:
                    await send(message)
                elif message["type"] == "http.response.start":
                    body = b'{"error": {"message": "replaced by the probe"}}'
                    headers = [(b"content-type", b"application/json")]
                    await send(
                        {
                            "type": "http.response.start",
                            "status": hold.replace_status,
                            "headers": headers,
                        }
                    )
                    await send({"type": "http.response.body", "body": body})

            await self.app(scope, receive, held_send)


@dataclass
class ProbedServer(EngineServer):
    probe: RequestProbe = field(default=None)  # type: ignore[assignment]

    def batch_count(self) -> int:
        """Batches the engine holds (whoever created them)."""
        return len(self.engine.list_batches(None, 100)["data"])

    def stop(self) -> None:
        self.probe.release_all()
        super().stop()


def start_probed_server(
    data_dir: Path,
    *,
    upstream: Upstream | None = None,
    api_key: str | None = None,
    api_faults: ApiFaults | None = None,
    **engine_options: Any,
) -> ProbedServer:
    """``servers.start_server`` with a ``RequestProbe`` in front of the app."""
    options = {**FAST_ENGINE_OPTIONS, **engine_options}
    engine = Engine(data_dir, upstream or BuiltinUpstream(), **options).start()
    try:
        probe = RequestProbe(create_app(engine, api_key=api_key, api_faults=api_faults))
        background = start_in_thread(probe)
    except BaseException:
        engine.close()
        raise
    return ProbedServer(background.base_url, engine, background, api_key, probe)


# ---------------------------------------------------------------------------------------------
# A real `batchspec serve` process


@dataclass
class ServeProcess:
    base_url: str
    process: subprocess.Popen[str]
    api_key: str | None

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def client(self) -> Any:
        import openai

        return openai.OpenAI(
            base_url=self.v1, api_key=self.api_key or "unused", max_retries=0, timeout=10.0
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_serve_process(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    api_key: str | None = None,
    timeout: float = 20.0,
) -> ServeProcess:
    """``batchspec serve --port 0 --data-dir DATA_DIR ARGS``; waits for its URL on stderr."""
    argv = [
        sys.executable,
        "-m",
        "batchspec",
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--poll-interval",
        "0.02",
        *args,
    ]
    process = subprocess.Popen(
        argv,
        env={**os.environ, **(env or {})},
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

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not found:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"batchspec serve did not start (exit {process.poll()})")
        time.sleep(0.02)
    return ServeProcess(found[0], process, api_key)
