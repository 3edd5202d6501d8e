"""Test helper: a slow gateway on loopback that holds creates in transit, then delivers them.

``start_slow_gateway(upstream, hold={"POST /v1/batches": 3.0})`` serves a threaded
``http.server`` proxy on 127.0.0.1 in front of ``upstream`` (e.g. a ``batchspec serve``
process). Every request is forwarded as it came; a request whose ``"METHOD /path"`` is in
``hold`` is first read whole, then kept for that many seconds, then forwarded *even if the
client has given up or died meanwhile*: what a gateway or load balancer with a long upstream
timeout does to a request the client timed out on. ``received`` counts requests as they
arrive, ``forwarded`` as they reach the upstream, so a test can say how many creates reached
the provider; ``arrived(route)`` is an event set when the first such request arrives. A route
in ``hold_answers`` is forwarded at once and its *answer* kept that many seconds: the provider
has acted, and the client learns of it late. A route in ``refuse`` is answered with that HTTP
status and an error body, never forwarded (a file the provider cannot serve for a while); a
status of 0 closes the connection with no answer at all (a reset). With ``echo_auth`` that
error body quotes the request's Authorization header, as a careless proxy might. A route in
``truncate`` is forwarded, and its answer's headers (with the whole ``Content-Length``) and
first half of its body are sent before the connection closes (a body cut off mid-stream).
A path in ``swap`` is forwarded as the path it maps to (a file asked for is answered with
another file's content). A route in ``answer_200`` is answered 200 with that body, never
forwarded (a gateway's page or notice sent as a success).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from servers import EngineServer, QuietHTTPServer
from workspaces import KEY_ENV, ResourceSpec, Workspace, make_workspace

from batchspec.engine.upstreams import BuiltinUpstream

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass
class SlowGateway:
    """A running gateway; ``v1`` is its OpenAI API root."""

    base_url: str
    server: ThreadingHTTPServer
    hold: dict[str, float]
    hold_answers: dict[str, float] = field(default_factory=dict)
    refuse: dict[str, int] = field(default_factory=dict)
    echo_auth: bool = False
    truncate: set[str] = field(default_factory=set)
    swap: dict[str, str] = field(default_factory=dict)
    answer_200: dict[str, bytes] = field(default_factory=dict)
    received: Counter[str] = field(default_factory=Counter)
    forwarded: Counter[str] = field(default_factory=Counter)
    events: dict[str, threading.Event] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def arrived(self, route: str) -> threading.Event:
        with self.lock:
            return self.events.setdefault(route, threading.Event())

    def wait_until_forwarded(self, route: str, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` requests to ``route`` have reached the upstream."""
        deadline = time.monotonic() + timeout
        while self.forwarded[route] < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{route} forwarded {self.forwarded[route]} < {count}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_slow_gateway(
    upstream: str, *, hold: dict[str, float], hold_answers: dict[str, float] | None = None
) -> SlowGateway:
    """Serve the gateway on a free loopback port in a daemon thread; ``upstream`` has no /v1."""
    client = httpx.Client(base_url=upstream.rstrip("/"), timeout=60.0)
    gateway: SlowGateway

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self) -> None:
            route = f"{self.command} {urlsplit(self.path).path}"
            body = self._body()
            with gateway.lock:
                gateway.received[route] += 1
                gateway.events.setdefault(route, threading.Event()).set()
            if route in gateway.refuse:
                self._refuse(gateway.refuse[route])
                return
            if route in gateway.answer_200:
                self._answer_200(gateway.answer_200[route])
                return
            if route in gateway.hold:
                time.sleep(gateway.hold[route])
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            target = gateway.swap.get(urlsplit(self.path).path, self.path)
            answer = client.request(self.command, target, headers=headers, content=body)
            with gateway.lock:
                gateway.forwarded[route] += 1
            time.sleep(gateway.hold_answers.get(route, 0.0))
            try:
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-encoding":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.send_header("Connection", "close")
                self.end_headers()
                if route in gateway.truncate:  # half the body, then the connection closes
                    self.wfile.write(answer.content[: len(answer.content) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(answer.content)
            except OSError:  # the client gave up (timed out, or was killed): delivered anyway
                pass
            self.close_connection = True

        def _answer_200(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def _refuse(self, status: int) -> None:
            if status == 0:  # a reset: the connection closes with no answer
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            said = "refused by the test gateway"
            if gateway.echo_auth:
                said += f" (you sent {self.headers.get('Authorization')})"
            body = json.dumps({"error": {"message": said, "type": "server_error"}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        do_GET = do_POST = do_DELETE = _forward

    server = QuietHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    gateway = SlowGateway(
        f"http://127.0.0.1:{server.server_address[1]}", server, dict(hold), dict(hold_answers or {})
    )
    threading.Thread(target=server.serve_forever, name="slow-gateway", daemon=True).start()
    return gateway


def gated_workspace(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    upstream: BuiltinUpstream,
    *resources: ResourceSpec,
) -> tuple[Workspace, EngineServer, SlowGateway]:
    """A workspace whose `openai` provider (one client retry) reaches a ``batchspec serve``
    of ``upstream`` through a slow gateway (no hold: set ``refuse`` and the rest per test);
    resources alpha (4 requests) and beta (5) unless ``resources`` are given."""
    srv = serve_engine(upstream=upstream)
    gw = start_slow_gateway(srv.base_url, hold={})
    gateways.append(gw)
    provider = {
        "type": "openai",
        "baseUrl": gw.v1,
        "apiKeyEnv": KEY_ENV,
        "options": {"maxRetries": 1},
    }
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": provider},
        resources=resources
        or (ResourceSpec("alpha", count=4), ResourceSpec("beta", count=5, prefix="b")),
    )
    return ws, srv, gw


def gated_and_slow_workspace(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    latency: float,
    beta: int | None = None,
) -> tuple[Workspace, EngineServer, SlowGateway]:
    """alpha (4 requests) on a fast ``batchspec serve`` behind a slow gateway (provider
    ``srv``), beta (``beta`` requests, default ``ResourceSpec``'s) on a second serve whose
    model takes ``latency`` s a request, one at a time (provider ``slow``): beta keeps an
    ``apply --wait`` polling while alpha's batch has ended. No client retries."""
    srv = serve_engine(tmp_path / "fast")
    slow = serve_engine(tmp_path / "slow", upstream=BuiltinUpstream(latency=latency), concurrency=1)
    gw = start_slow_gateway(srv.base_url, hold={})
    gateways.append(gw)
    providers = {
        name: {"type": "openai", "baseUrl": url, "apiKeyEnv": KEY_ENV, "options": {"maxRetries": 0}}
        for name, url in (("srv", gw.v1), ("slow", slow.v1))
    }
    counted = {} if beta is None else {"count": beta}
    ws = make_workspace(
        tmp_path / "ws",
        providers=providers,
        resources=(
            ResourceSpec("alpha", count=4),
            ResourceSpec("beta", provider="slow", **counted),
        ),
    )
    return ws, srv, gw
