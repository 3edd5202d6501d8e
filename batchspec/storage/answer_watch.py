"""A bounded wait for every answer of a PostgreSQL server: a frozen server hangs nothing.

A server whose processes are stopped (``kill -STOP``, a VM paused), or a host whose kernel
still accepts and acknowledges TCP while the database never answers, leaves every packet
ACKed: TCP keepalives and ``tcp_user_timeout`` never fire, and a frozen server cannot enforce
its own ``statement_timeout``. A statement sent to it would wait forever, holding a CI job for
hours with no word. ``AnswerWatch`` (one daemon thread per process, started on first use)
watches every statement in flight on every ``PostgresSql`` connection, and promises:

* A statement that has had no answer for ``answer_timeout`` seconds is not cut at once: the
  server is *pinged* on a new TCP (or unix-socket) connection to the address the connection
  uses, with an SSLRequest, which a live server answers with one byte before any
  authentication, within ``min(answer_timeout, PING_TIMEOUT_SECONDS)``. A server that answers
  is alive: the statement waits on (a lock waited for on purpose, a long migration, a large
  transfer; the server's own ``lock_timeout`` bounds the first) and is looked at again
  ``answer_timeout`` later. So nothing that a live server is working on is ever cut.
* A server that does not answer the ping has stopped answering: the watch shuts the
  statement's socket down (``shutdown(SHUT_RDWR)``), so libpq returns at once with a
  connection error, and the connection reports it as its server having stopped answering
  (``Watched.stop_waiting``). When the server resumes, it reads the closed socket and
  rolls the session's transaction back, releasing its locks.
* So a frozen server fails the statement within ``answer_timeout`` plus the ping's time
  (about 70 s by default), never later; a timeout of 0 turns the watch off.

Not covered: a server whose postmaster answers while the one backend serving this connection
is stopped (the ping sees a live server, so the statement waits, as for a long statement).
A ping to a server with SSL on may leave one line in its log (the handshake it offered was
never started); pings happen only while a statement waits past the timeout.

The timeout is ``BATCHSPEC_STATE_ANSWER_TIMEOUT`` (seconds) when set, else
``DEFAULT_ANSWER_TIMEOUT_SECONDS``; ``answer_timeout_from_env`` reads it.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from batchspec.errors import StateError

#: the variable that sets how long a state database may go without answering, in seconds
ANSWER_TIMEOUT_ENV = "BATCHSPEC_STATE_ANSWER_TIMEOUT"
DEFAULT_ANSWER_TIMEOUT_SECONDS = 60.0
#: the most a ping waits: a live server answers an SSLRequest in milliseconds
PING_TIMEOUT_SECONDS = 10.0

#: PostgreSQL's SSLRequest: length 8, code 1234.5679; answered 'S' or 'N' (or an error)
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def answer_timeout_from_env(env: Mapping[str, str] = os.environ) -> float:
    """``BATCHSPEC_STATE_ANSWER_TIMEOUT`` in seconds (0: never stop waiting), else the default."""
    text = env.get(ANSWER_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_ANSWER_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise StateError(
            f"{ANSWER_TIMEOUT_ENV} must be a number of seconds (0 to wait for ever), not {text!r}"
        )
    return seconds


@dataclass(frozen=True)
class ServerAddress:
    """Where a connection's server listens: a TCP host and port, or a unix socket's path."""

    family: int
    address: str | tuple[str, int]

    @classmethod
    def of(cls, host: str, port: int) -> ServerAddress:
        """The address of libpq's ``host`` (or ``hostaddr``) and ``port``."""
        if host.startswith("/"):
            return cls(socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
        if host.startswith("@"):  # libpq's abstract unix socket namespace
            return cls(socket.AF_UNIX, f"\0{host[1:]}/.s.PGSQL.{port}")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return cls(family, (host, port))


def server_answers(server: ServerAddress, timeout: float) -> bool:
    """Whether the server at ``server`` answers an SSLRequest on a new connection within
    ``timeout`` seconds (any answer counts: 'S', 'N' or an error; silence, a refusal, a reset
    or a closed connection do not)."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(server.family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(server.address)
            sock.sendall(_SSL_REQUEST)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            return bool(sock.recv(1))
    except OSError:  # refused, reset, unreachable, timed out (socket.timeout is an OSError)
        return False


class Watched(Protocol):
    """A connection whose statements the watch bounds."""

    #: seconds a statement may go without an answer before the server is pinged
    answer_timeout: float
    #: where its server listens (None: not known, so never pinged nor cut)
    server: ServerAddress | None

    def stop_waiting(self) -> None:
        """Its server stopped answering: make the statement in flight return (and say why)."""


@dataclass(eq=False)
class _Wait:
    target: Watched
    due: float


class AnswerWatch:
    """The daemon thread that pings the server of every statement waiting past its timeout."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waits: set[_Wait] = set()
        self._thread: threading.Thread | None = None
        #: when the thread wakes next (inf: when a statement starts); a statement due later
        #: needs no wake-up, so most statements cost a lock and no thread switch
        self._wake_at = math.inf

    @contextlib.contextmanager
    def waiting(self, target: Watched) -> Iterator[None]:
        """The block waits for ``target``'s server to answer: bound the wait."""
        if target.answer_timeout <= 0 or target.server is None:
            yield
            return
        wait = _Wait(target, time.monotonic() + target.answer_timeout)
        with self._cond:
            self._waits.add(wait)
            if wait.due < self._wake_at:
                self._cond.notify()
            self._start()
        try:
            yield
        finally:
            with self._cond:
                self._waits.discard(wait)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._watch, name="batchspec-state-answer-watch", daemon=True
            )
            self._thread.start()

    def _watch(self) -> None:
        while True:
            wait = self._next_due()
            target = wait.target
            assert target.server is not None
            alive = server_answers(target.server, min(target.answer_timeout, PING_TIMEOUT_SECONDS))
            with self._cond:
                if wait not in self._waits:
                    continue  # the answer came meanwhile
                if alive:  # a live server working on it (a lock wait, a long statement)
                    wait.due = time.monotonic() + target.answer_timeout
                    continue
                # under the lock: the statement cannot leave ``waiting()``, so its
                # connection (and socket) is still open and still its own
                self._waits.discard(wait)
                target.stop_waiting()

    def _next_due(self) -> _Wait:
        """Sleep until a statement has waited its timeout; that statement's wait."""
        with self._cond:
            while True:
                if not self._waits:
                    self._wake_at = math.inf
                    self._cond.wait()
                    continue
                wait = min(self._waits, key=lambda w: w.due)
                left = wait.due - time.monotonic()
                if left <= 0:
                    return wait
                self._wake_at = wait.due
                self._cond.wait(left)


#: the process's one watch, shared by every PostgreSQL connection
ANSWER_WATCH = AnswerWatch()


def shut_down_socket(fileno: int) -> None:
    """Shut the socket ``fileno`` down both ways, from any thread: whoever waits on it (libpq)
    sees the connection end at once. The descriptor itself stays open for its owner to close."""
    try:
        sock = socket.socket(fileno=os.dup(fileno))
    except OSError:
        return  # closed meanwhile
    with sock, contextlib.suppress(OSError):  # OSError: not connected any more
        sock.shutdown(socket.SHUT_RDWR)


__all__ = [
    "ANSWER_TIMEOUT_ENV",
    "ANSWER_WATCH",
    "DEFAULT_ANSWER_TIMEOUT_SECONDS",
    "PING_TIMEOUT_SECONDS",
    "AnswerWatch",
    "ServerAddress",
    "Watched",
    "answer_timeout_from_env",
    "server_answers",
    "shut_down_socket",
]
