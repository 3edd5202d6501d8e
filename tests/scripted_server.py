"""Test helper: a programmable HTTP/1.1 server on 127.0.0.1 that answers from a script.

Real sockets, real HTTP, so a client's whole stack (httpx, h11, the OS) is exercised; the
*answers* are chosen by the test. ``ScriptedServer.script(*answers)`` queues what the next
requests get, in order; an ``Answer`` says the status, headers and body, and can also

- ``delay`` the answer (past a client's read timeout; ``reset()`` cuts the wait short),
- ``cut_after`` N bytes of a body whose ``Content-Length`` promised more, then close the
  connection (a connection lost mid-body),
- ``hang_up``: close the connection without answering at all,
- ``trickle`` its body a byte at a time, that many seconds apart (each byte in time for a
  read timeout; ``reset()`` ends it),
- be ``close_delimited``: sent with no ``Content-Length``, ended by closing the connection
  (so a body ``cut_after`` N bytes is, to the client, a whole shorter body).

An answer may also be a function of the request it answers (to echo a header back). Every
request is recorded as it arrived (``Seen``: method, raw target, headers, body) so tests
assert on what the server received: the auth header, a re-sent upload, a create's body.
Bodies are read in 64 KiB chunks and kept only up to ``KEEP_BODY_BYTES`` (``Seen.size`` is
always the full length), so a very large upload does not fill the test's memory.

``refused_port()`` holds a port bound but never listening: connecting to it is refused by
the OS, and the port cannot be taken by anyone else while it is held.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from servers import QuietHTTPServer

KEEP_BODY_BYTES = 1024 * 1024
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Seen:
    """One request as the server received it; header names are lower-case."""

    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes
    size: int

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Answer:
    """What the server does with one request."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    cut_after: int | None = None
    hang_up: bool = False
    close_delimited: bool = False
    trickle: float = 0.0


AnswerLike = Answer | Callable[[Seen], Answer]


def json_answer(status: int, payload: Any, **headers: str) -> Answer:
    """``payload`` as a JSON body; keyword names stand for headers (x_request_id)."""
    names = {k.replace("_", "-"): v for k, v in headers.items()}
    return Answer(
        status, json.dumps(payload).encode(), {"content-type": "application/json", **names}
    )


class ScriptedServer:
    """A threaded HTTP server on a free loopback port; see the module docstring."""

    def __init__(self) -> None:
        self._answers: list[AnswerLike] = []
        self._repeat: AnswerLike | None = None
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._httpd = QuietHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def script(self, *answers: AnswerLike, then: AnswerLike | None = None) -> None:
        """Answer the next requests with ``answers`` in order, and any after them with
        ``then`` (without it, an unscripted request gets a 599 that is never retried)."""
        with self._lock:
            self._answers.extend(answers)
            self._repeat = then

    def reset(self) -> None:
        """Forget the script and the recorded requests; end any delayed answer now."""
        self._released.set()
        with self._lock:
            self._answers.clear()
            self._repeat = None
            self.requests.clear()
        self._released = threading.Event()

    def methods(self) -> list[str]:
        return [seen.method for seen in self.requests]

    def stop(self) -> None:
        self._released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _next(self, seen: Seen) -> tuple[Answer, threading.Event]:
        with self._lock:
            self.requests.append(seen)
            chosen = self._answers.pop(0) if self._answers else self._repeat
            released = self._released
        if chosen is None:
            chosen = json_answer(
                599,
                {"error": {"message": "scripted server: no answer left"}},
                x_should_retry="false",
            )
        return (chosen(seen) if callable(chosen) else chosen), released


def _handler_for(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # headers and body leave in separate writes: without this, Nagle's algorithm
            # and the client's delayed ACK add ~40 ms to every answer
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Quiet: the tests read ``requests``, not a log."""

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except (BrokenPipeError, ConnectionResetError):
                # the client gave up (its read timeout) before a delayed answer was written
                self.close_connection = True

        def _serve(self) -> None:
            body, size = self._read_body()
            headers = {name.lower(): value for name, value in self.headers.items()}
            seen = Seen(self.command, self.path, headers, body, size)
            answer, released = server._next(seen)
            if answer.delay:
                released.wait(answer.delay)
            if answer.hang_up:
                self.close_connection = True
                return
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            if not answer.close_delimited:
                self.send_header("Content-Length", str(len(answer.body)))
            if answer.cut_after is not None or answer.close_delimited:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if answer.trickle:
                for i in range(len(answer.body)):
                    self.wfile.write(answer.body[i : i + 1])
                    self.wfile.flush()
                    if released.wait(answer.trickle):
                        self.close_connection = True
                        return
                return
            self.wfile.write(answer.body[: answer.cut_after])
            self.wfile.flush()

        do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815

        def _read_body(self) -> tuple[bytes, int]:
            kept = bytearray()
            size = 0
            for chunk in self._body_chunks():
                size += len(chunk)
                if len(kept) < KEEP_BODY_BYTES:
                    kept += chunk[: KEEP_BODY_BYTES - len(kept)]
            return bytes(kept), size

        def _body_chunks(self) -> Iterator[bytes]:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    length = int(self.rfile.readline().split(b";")[0], 16)
                    if length == 0:
                        self.rfile.readline()
                        return
                    yield from _read_exactly(self.rfile, length)
                    self.rfile.readline()
            yield from _read_exactly(self.rfile, int(self.headers.get("Content-Length") or 0))

    return Handler


def _read_exactly(stream: Any, length: int) -> Iterator[bytes]:
    while length > 0:
        chunk = stream.read(min(_CHUNK, length))
        if not chunk:
            return
        length -= len(chunk)
        yield chunk


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: every connection is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()
