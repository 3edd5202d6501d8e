"""A loopback HTTP/1.1 proxy that adds a fixed latency to every request: the benchmarks' stand-in
for the round trip to a hosted API (``start_latency_proxy``, used by fleet.py, apply.py,
parallel_apply.py and shared_state.py).

Why asyncio: the proxy runs inside the bench's own process, on a 2-core machine beside the two
processes being measured (the client under test and ``batchspec serve``). Real network
latency costs no CPU, so its stand-in must cost close to none: a request waiting out its
latency is a timer on one event loop (on its own thread), not a thread; the bytes are
forwarded as they came, parsed only as far as HTTP/1.1 framing needs. The thread-per-connection
``http.server`` + ``httpx`` proxy it replaces spent ~1.2 ms of CPU a call (1.4-2.2 CPU s per
fleet pass); this one ~0.35 ms, most of it the event loop's wake-ups and loopback's send/recv.

What it promises, per request:

- the head is read up to ``\\r\\n\\r\\n`` and the body in full (Content-Length or chunked);
  then ``latency`` seconds pass before it is sent upstream: no answer comes sooner;
- upstream, it goes over a kept-alive connection from a pool (at most ``MAX_UPSTREAM`` open);
  a pooled connection idle over ``IDLE_LIMIT`` s is dropped before reuse (uvicorn closes idle
  ones after 5 s: a request sent on a connection the server is closing is reset, and a reset
  create is an unsure one), and a request that fails on a reused connection before any answer
  byte came back is sent once more on a fresh one (the server had closed it);
- the answer (Content-Length, chunked, or up to the upstream's close; none for HEAD, 1xx, 204
  and 304) is written back in one write with a Content-Length; the body's bytes are not
  decoded, so ``Content-Encoding`` is kept; hop-by-hop headers are dropped both ways;
- both sides are HTTP/1.1 keep-alive with TCP_NODELAY (with Nagle on, a body written after its
  head waited for the peer's delayed ACK: ~40 ms a call); ``Connection: close`` is honoured;
- an upstream failure answers that request 502; a malformed request is answered 400 and its
  connection closed; nothing a connection does stops the loop.

``counts`` counts the requests by method; with ``timeline``, each answered request appends
``(arrived, answered, method, path)``: ``time.perf_counter()`` after its body was read and
after its answer was written.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable
from typing import TypeVar
from urllib.parse import urlsplit

Timeline = list[tuple[float, float, str, str]]
T = TypeVar("T")

#: Headers of one connection, not of the message: neither forwarded nor answered as they came.
#: ``expect``: a ``100-continue`` is answered here, before the body is read.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "expect"}
)
IDLE_LIMIT = 2.0  # seconds a pooled upstream connection may idle before it is dropped
MAX_UPSTREAM = 256  # upstream connections open at once; more requests wait for one
BACKLOG = 1024  # dozens of connections opened at once must not be reset
BUFFER_LIMIT = 1 << 20  # a head may be this long; bodies are read in buffers of up to twice it
UPSTREAM_TIMEOUT = 120.0  # seconds for the upstream to answer a request before it is a 502


class _Malformed(Exception):
    """A request (or an answer) that does not parse as HTTP/1.1."""


class _Message:
    """A parsed head: its first line, its header lines as they came, the ones to pass on (all
    but the hop-by-hop ones, byte for byte), and the values by lowercased name."""

    __slots__ = ("first", "lines", "forwarded", "values")

    def __init__(self, head: bytes) -> None:
        first, *lines = head[:-4].split(b"\r\n")
        forwarded: list[bytes] = []
        values: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise _Malformed(f"bad header line {line[:80]!r}")
            key = name.decode("latin-1").lower()
            if key not in HOP_BY_HOP:
                forwarded.append(line)
            text = value.strip().decode("latin-1")
            values[key] = f"{values[key]}, {text}" if key in values else text
        self.first, self.lines, self.forwarded, self.values = first, lines, forwarded, values

    def tokens(self, name: str) -> set[str]:
        """The comma-separated tokens of a header, lowercased (``Connection: close``)."""
        return {t.strip().lower() for t in self.values.get(name, "").split(",")} - {""}


class _Answer:
    """An upstream's answer, read in full: what the client is sent, and whether the upstream
    connection may carry another request."""

    __slots__ = ("head", "body", "reusable")

    def __init__(self, head: _Message, body: bytes, reusable: bool) -> None:
        self.head, self.body, self.reusable = head, body, reusable


class LatencyProxy:
    """The running proxy. As a ``socketserver`` server: ``server_address`` is (host, port) it
    listens on, ``shutdown()`` stops it (and closes every connection)."""

    def __init__(
        self, upstream: str, latency: float, counts: Counter[str], timeline: Timeline | None
    ) -> None:
        parts = urlsplit(upstream)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._authority = parts.netloc.encode("ascii")
        self._prefix = parts.path.rstrip("/").encode("ascii")
        self._latency = latency
        self._counts = counts
        self._timeline = timeline
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._loop = asyncio.new_event_loop()
        self._slots = asyncio.Semaphore(MAX_UPSTREAM)
        self._server = self._loop.run_until_complete(self._listen())
        self.server_address: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="latency-proxy", daemon=True
        )
        self._thread.start()

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(
            self._serve_client, "127.0.0.1", 0, backlog=BACKLOG, limit=BUFFER_LIMIT
        )

    def shutdown(self) -> None:
        """Stop listening, close every connection and end the loop's thread (idempotent)."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    async def _close(self) -> None:
        self._server.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports just closed release their sockets

    # --- the client side ---------------------------------------------------------------------

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        _no_delay(writer)
        try:
            while await self._answer_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-request
        except asyncio.CancelledError:
            pass  # shutdown(): end as a task that finished (3.11's streams log a cancelled one)
        except (_Malformed, ValueError, asyncio.LimitOverrunError) as exc:
            body = f"latency proxy: malformed request: {exc}".encode()
            writer.write(_answer_bytes(b"HTTP/1.1 400 Bad Request", [], body, keep_alive=False))
        except Exception as exc:  # a bug here must not stop the loop; say it, close the connection
            print(f"latency proxy: {exc!r}", file=sys.stderr)
        finally:
            writer.close()

    async def _answer_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request, answer it ``latency`` seconds later; whether the connection stays."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed its connection between requests
        request = _Message(head)
        method_b, target, version = _split_first_line(request.first)
        method = method_b.decode("ascii")
        if "100-continue" in request.tokens("expect"):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await _read_body(reader, request)
        self._counts[method] += 1
        arrived = time.perf_counter()
        await asyncio.sleep(self._latency)
        try:
            answer = await _within(UPSTREAM_TIMEOUT, self._forward(method, target, request, body))
        except Exception as exc:
            answer = _bad_gateway(exc)
        connection = request.tokens("connection")
        keep_alive = "close" not in connection and (
            version == b"HTTP/1.1" or "keep-alive" in connection
        )
        status, lines = answer.head.first, answer.head.forwarded
        if _has_body(method, answer.head):
            writer.write(_answer_bytes(status, lines, answer.body, keep_alive))
        else:  # HEAD, 204, 304: no body; a Content-Length, if any, is the upstream's to say
            lines = [*lines, *_content_length_lines(answer.head.lines)]
            writer.write(_answer_bytes(status, lines, b"", keep_alive, length=False))
        await writer.drain()
        if self._timeline is not None:
            path = target.decode("latin-1")
            self._timeline.append((arrived, time.perf_counter(), method, path))
        return keep_alive

    # --- the upstream side -------------------------------------------------------------------

    async def _forward(self, method: str, target: bytes, request: _Message, body: bytes) -> _Answer:
        lines = [b"%s %s%s HTTP/1.1" % (method.encode("ascii"), self._prefix, target)]
        lines += [b"Host: " + self._authority, *request.forwarded]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d" % len(body))
        message = b"\r\n".join(lines) + b"\r\n\r\n" + body
        async with self._slots:
            for attempt in (1, 2):
                reader, writer, reused = await self._connection()
                try:
                    try:
                        writer.write(message)
                        await writer.drain()
                        head = await reader.readuntil(b"\r\n\r\n")
                    except (
                        ConnectionResetError,
                        BrokenPipeError,
                        asyncio.IncompleteReadError,
                    ) as exc:
                        nothing_came = not getattr(exc, "partial", b"")
                        if reused and nothing_came and attempt == 1:
                            writer.close()
                            continue  # the upstream had closed the idle connection: once more
                        raise
                    answer = await _read_answer(reader, method, head)
                except BaseException:
                    writer.close()
                    raise
                if answer.reusable:
                    self._release(reader, writer)
                else:
                    writer.close()
                return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def _release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Pool a connection; close the stale ones at the bottom (the least recently used),
        not left to linger half-closed once uvicorn closes its end."""
        now = time.monotonic()
        while self._idle and now - self._idle[0][2] > IDLE_LIMIT:
            self._idle.pop(0)[1].close()
        self._idle.append((reader, writer, now))

    async def _connection(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A pooled connection (the most recently used) if one is fresh, else a new one; and
        whether it was reused."""
        now = time.monotonic()
        while self._idle:
            reader, writer, since = self._idle.pop()
            if now - since <= IDLE_LIMIT and not reader.at_eof() and not writer.is_closing():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(self._host, self._port, limit=BUFFER_LIMIT)
        _no_delay(writer)
        return reader, writer, False


def start_latency_proxy(
    upstream: str, latency: float, timeline: Timeline | None = None
) -> tuple[LatencyProxy, Counter[str]]:
    """Forward every request to ``upstream`` after ``latency`` seconds; count them by method;
    with ``timeline``, append (arrived, answered, method, path) for each request to it."""
    counts: Counter[str] = Counter()
    return LatencyProxy(upstream, latency, counts, timeline), counts


# --- HTTP/1.1 framing ------------------------------------------------------------------------


async def _read_answer(reader: asyncio.StreamReader, method: str, head: bytes) -> _Answer:
    """The rest of an upstream's answer whose head is ``head`` (interim 1xx answers skipped)."""
    answer = _Message(head)
    while 100 <= _status(answer) < 200 and _status(answer) != 101:
        answer = _Message(await reader.readuntil(b"\r\n\r\n"))
    version = answer.first[:8]
    connection = answer.tokens("connection")
    reusable = "close" not in connection and (version == b"HTTP/1.1" or "keep-alive" in connection)
    if not _has_body(method, answer):
        return _Answer(answer, b"", reusable)
    if "chunked" in answer.tokens("transfer-encoding"):
        return _Answer(answer, await _read_chunked(reader), reusable)
    if "content-length" in answer.values:
        return _Answer(
            answer, await reader.readexactly(int(answer.values["content-length"])), reusable
        )
    return _Answer(answer, await reader.read(), False)  # delimited by the upstream's close


async def _read_body(reader: asyncio.StreamReader, request: _Message) -> bytes:
    if "chunked" in request.tokens("transfer-encoding"):
        return await _read_chunked(reader)
    length = request.values.get("content-length")
    return await reader.readexactly(int(length)) if length else b""


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body, decoded (its trailers, if any, are dropped)."""
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b"".join(chunks)
        chunk = await reader.readexactly(size + 2)
        if chunk[-2:] != b"\r\n":
            raise _Malformed("a chunk does not end with CRLF")
        chunks.append(chunk[:-2])


def _bad_gateway(exc: Exception) -> _Answer:
    head = _Message(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n\r\n")
    return _Answer(head, f"latency proxy: the upstream failed: {exc!r}".encode(), False)


def _split_first_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _Malformed(f"bad request line {line[:80]!r}")
    return parts[0], parts[1], parts[2]


def _status(answer: _Message) -> int:
    parts = answer.first.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise _Malformed(f"bad status line {answer.first[:80]!r}")
    return int(parts[1])


def _has_body(method: str, answer: _Message) -> bool:
    status = _status(answer)
    return method != "HEAD" and status >= 200 and status not in (204, 304)


def _content_length_lines(lines: list[bytes]) -> list[bytes]:
    return [line for line in lines if line[:15].lower() == b"content-length:"]


def _answer_bytes(
    status: bytes, lines: list[bytes], body: bytes, keep_alive: bool, length: bool = True
) -> bytes:
    head = [status, *lines]
    if length:
        head.append(b"Content-Length: %d" % len(body))
    if not keep_alive:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _no_delay(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY (asyncio sets it on its TCP sockets already; said here, as it matters)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, or TimeoutError after ``seconds`` (no extra task on 3.11+)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover  (3.10)
