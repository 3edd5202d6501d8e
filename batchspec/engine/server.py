"""Run the engine's HTTP API under uvicorn: ``batchspec serve``, and servers in threads for tests.

``serve`` binds the socket, opens the engine on a data folder, starts its worker, announces
the URL through a callback (the library never prints) and serves until Ctrl-C or SIGTERM;
then it stops accepting requests, drains in-flight upstream calls, commits and frees the data
folder, so the next ``serve`` resumes unfinished batches without re-running finished lines.
The first signal is announced at once through a second callback (``Stopping``: what the stop
waits for), since the wait can last the drain timeout; a second Ctrl-C stops without waiting
(the requests still in flight are sent again at the next start).

Safety: binding anything but a loopback address without an API key is refused, since the
server would spend the upstream's money for anyone who can reach it. The key is read from the
environment variable named by ``api_key_env`` and never logged. An upstream that is the server
itself (its own port, on its host or loopback) is refused before any line runs.

``start_in_thread`` runs any ASGI app under uvicorn on a thread, on a socket bound before it
starts (port 0 picks a free port, with no race), for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import uvicorn

from batchspec.engine.api_faults import ApiFaults
from batchspec.engine.app import create_app
from batchspec.engine.balancer import make_upstreams, parse_target
from batchspec.engine.core import DEFAULT_MAX_UPLOAD_BYTES, Engine
from batchspec.engine.upstreams import Faults, without_credentials
from batchspec.errors import BatchspecError, UsageError
from batchspec.wire.hosts import is_loopback
from batchspec.wire.inputs import DEFAULT_MAX_LINE_BYTES


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``batchspec serve`` can be told; durations in seconds."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("state/local")
    upstreams: tuple[str, ...] = ("builtin",)  # several: a rotation (balancer.py)
    api_key_env: str | None = None
    upstream_api_key_env: str | None = None
    concurrency: int = 8
    request_timeout: float = 60.0
    max_attempts: int = 5
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    completion_window_seconds: float | None = None
    poll_interval: float = 0.5
    upstream_latency: float = 0.0
    faults: Faults | None = None
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    token_limit_refusals: int = 0  # fault injection: see WorkerSettings
    cancel_delay: float = 0.0  # slow cancels (tests): see WorkerSettings
    api_faults: ApiFaults | None = None  # fault injection at the API: see api_faults


def read_api_key(env_name: str | None) -> str | None:
    """The server's API key from ``env_name``; a clear error when the variable is unset."""
    if env_name is None:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise BatchspecError(
            f"--api-key-env names {env_name}, but that environment variable is not set or "
            f"empty. Export it first (export {env_name}=...)."
        )
    return key


def open_engine(options: ServeOptions) -> Engine:
    """The engine ``serve`` runs: upstream built from the options, not yet started."""
    upstream = make_upstreams(
        options.upstreams,
        api_key_env=options.upstream_api_key_env,
        latency=options.upstream_latency,
        faults=options.faults,
        max_connections=max(2 * options.concurrency, 16),
        request_timeout=options.request_timeout,
    )
    return Engine(
        options.data_dir,
        upstream,
        concurrency=options.concurrency,
        request_timeout=options.request_timeout,
        max_attempts=options.max_attempts,
        completion_window_seconds=options.completion_window_seconds,
        max_upload_bytes=options.max_upload_bytes,
        poll_interval=options.poll_interval,
        max_line_bytes=options.max_line_bytes,
        token_limit_refusals=options.token_limit_refusals,
        cancel_delay=options.cancel_delay,
    )


def refuse_itself_as_upstream(upstreams: Sequence[str], host: str, port: int) -> None:
    """An upstream that is this very server (its port, on its host or on loopback while it
    listens there or on every address) would get each line sent back to a Batch API that has
    no ``/chat/completions``, and every line would fail with a misleading 404 or 401: refuse
    to start, before the worker resumes any batch."""
    for spec in upstreams:
        url = parse_target(spec).url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            continue
        try:
            upstream_port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            continue
        if upstream_port == port and _same_host(parts.hostname, host):
            raise UsageError(
                f"--upstream {without_credentials(url)} is this server itself (it listens on "
                f"{host}:{port}): each line would come back to this Batch API instead of a "
                "model. Point --upstream at the model server (vLLM, Ollama, ...), serve on "
                "another --port, or leave --upstream out for the builtin stand-in."
            )


def _same_host(upstream_host: str, listen_host: str) -> bool:
    listen = listen_host.strip("[]")
    if upstream_host.lower() == listen.lower():
        return True
    return is_loopback(upstream_host) and (is_loopback(listen) or listen in ("0.0.0.0", "::"))


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as err:
        raise BatchspecError(
            f"Cannot listen on {host}:{port} ({err.strerror or err}). "
            "Pick another --port, or stop what is using it."
        ) from None


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return f"http://{shown}:{port}"


@dataclass(frozen=True)
class Stopping:
    """What a stop of ``serve`` waits for, as the first Ctrl-C or SIGTERM finds it."""

    signal: str  # "SIGINT" or "SIGTERM"
    requests_in_flight: int  # requests at the upstream: the engine lets them finish...
    drain_timeout: float  # ...for up to this many seconds
    answering: int  # API requests being answered: uvicorn lets them finish...
    answer_timeout: float  # ...for up to this many seconds


class _Server(uvicorn.Server):
    """uvicorn's server, which also says at once, through ``on_stopping``, that the first
    signal stops it and what the stop waits for, and remembers a second Ctrl-C (``forced``:
    the engine then stops without waiting for its requests)."""

    def __init__(
        self, config: uvicorn.Config, engine: Engine, on_stopping: Callable[[Stopping], None]
    ) -> None:
        super().__init__(config)
        self.engine = engine
        self.on_stopping = on_stopping
        self.forced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        self.forced = self.force_exit
        if first:
            self.on_stopping(
                Stopping(
                    signal=signal.Signals(sig).name,
                    requests_in_flight=self.engine.worker.requests_in_flight,
                    drain_timeout=self.engine.worker.settings.drain_timeout,
                    answering=len(self.server_state.tasks),
                    answer_timeout=float(self.config.timeout_graceful_shutdown or 0),
                )
            )


def serve(
    options: ServeOptions,
    *,
    on_listening: Callable[[str, str], None] | None = None,
    on_stopping: Callable[[Stopping], None] | None = None,
) -> None:
    """Serve the engine until interrupted; ``on_listening(url, upstream)`` is called once bound.

    ``upstream`` is the upstream's description (credentials never included). The first
    Ctrl-C or SIGTERM calls ``on_stopping`` at once, from the signal handler (so it must
    not take locks the main thread may hold: write with ``os.write``).
    """
    api_key = read_api_key(options.api_key_env)
    if api_key is None and not is_loopback(options.host):
        raise BatchspecError(
            f"Refusing to listen on {options.host} without an API key: anyone who can reach "
            "it could spend your upstream. Use --api-key-env NAME, or --host 127.0.0.1."
        )
    # the socket first: a port in use stops it before the data folder is made or locked
    sock = bind_socket(options.host, options.port)
    try:
        refuse_itself_as_upstream(options.upstreams, options.host, sock.getsockname()[1])
        engine = open_engine(options)
    except BaseException:
        sock.close()
        raise
    server: _Server | None = None
    try:
        engine.start()
        app = create_app(engine, api_key=api_key, api_faults=options.api_faults)
        server = _Server(_uvicorn_config(app), engine, on_stopping or (lambda _: None))
        if on_listening is not None:
            on_listening(_url(options.host, sock), engine.upstream.description)
        with _sigterm_ends_cleanly():
            server.run(sockets=[sock])
    finally:
        # a second Ctrl-C while uvicorn stopped, or while the engine drains (``Engine.close``
        # takes it): the engine does not wait for its requests, and still closes whole
        engine.close(wait_for_requests=not (server is not None and server.forced))
        sock.close()


class _Terminated(Exception):
    pass


@contextlib.contextmanager
def _sigterm_ends_cleanly() -> Iterator[None]:
    """uvicorn re-raises the signal that stopped it; make SIGTERM end ``serve`` normally."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _uvicorn_config(app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )


@dataclass
class BackgroundServer:
    """An ASGI app served by uvicorn on a thread; ``stop()`` shuts it down gracefully."""

    base_url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0) -> BackgroundServer:
    """Serve ``app`` on ``host:port`` (0: a free port) from a daemon thread; wait until up."""
    sock = bind_socket(host, port)
    server = uvicorn.Server(_uvicorn_config(app))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the background uvicorn server did not start")
        time.sleep(0.01)
    return BackgroundServer(base_url=_url(host, sock), server=server, thread=thread)


def serve_from_cli_options(
    opts: dict[str, Any],
    *,
    on_listening: Callable[[str, str], None] | None = None,
    on_stopping: Callable[[Stopping], None] | None = None,
) -> None:
    """``batchspec serve``: turn its options into ``ServeOptions`` and ``serve``."""
    faults = None
    if opts["fault_500"] or opts["fault_429"] or opts["fault_timeout"]:
        faults = Faults(
            error_500=opts["fault_500"],
            error_429=opts["fault_429"],
            timeout=opts["fault_timeout"],
            seed=opts["fault_seed"],
        )
    options = ServeOptions(
        host=opts["host"],
        port=opts["port"],
        data_dir=Path(opts["data_dir"]),
        upstreams=tuple(opts["upstream"]),
        api_key_env=opts["api_key_env"],
        upstream_api_key_env=opts["upstream_api_key_env"],
        concurrency=opts["concurrency"],
        request_timeout=opts["request_timeout"],
        max_attempts=opts["max_attempts"],
        max_upload_bytes=opts["max_upload_bytes"],
        completion_window_seconds=opts["completion_window_seconds"],
        poll_interval=opts["poll_interval"],
        upstream_latency=opts["upstream_latency"],
        faults=faults,
        max_line_bytes=opts["max_line_bytes"],
        token_limit_refusals=opts["fault_token_limit"],
        cancel_delay=opts["fault_cancel_delay"],
        api_faults=api_faults_from(
            opts["fault_api_429_from"], opts["fault_api_429_count"], opts["fault_api_retry_after"]
        ),
    )
    serve(options, on_listening=on_listening, on_stopping=on_stopping)


def api_faults_from(start: int | None, count: int | None, retry_after: float) -> ApiFaults | None:
    """``--fault-api-429-from`` and ``--fault-api-429-count`` as ``ApiFaults``: both or
    neither (one alone would refuse nothing, silently)."""
    if start is None and count is None:
        return None
    if start is None or count is None:
        given, missing = (
            ("--fault-api-429-count", "--fault-api-429-from")
            if start is None
            else ("--fault-api-429-from", "--fault-api-429-count")
        )
        raise UsageError(
            f"{given} needs {missing} too: --fault-api-429-from N --fault-api-429-count C "
            "refuses the requests N to N+C-1 with 429."
        )
    return ApiFaults(start, count, retry_after=retry_after)
