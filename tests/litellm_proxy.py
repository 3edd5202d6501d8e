"""Test helper: a real, unmodified LiteLLM proxy on 127.0.0.1 in front of our servers.

``start_litellm_proxy(workdir, models=..., files_base=..., upstream_key=...)`` writes a proxy
config (one model-list entry per ``models`` name -> OpenAI-compatible ``/v1`` base URL, and
``files_settings`` pointing the proxy's own Files/Batches routes at ``files_base``), runs
``litellm --config cfg.yaml --host 127.0.0.1 --port P`` as a subprocess with the recipe's
environment (no price-map download, a master key that is not ``sk-1234``) and waits for
``GET /health/liveliness``. The proxy's log is kept in ``workdir/litellm.log`` and its tail
is shown when it fails to start. ``run_litellm_proxy(workdir, config)`` does the same with a
whole config of the test's own (e.g. ``files_settings`` for several providers).

``litellm_unavailable()`` says why the proxy cannot run here (not installed), or None.

``FailFirstCreate`` is ASGI middleware for an upstream: it lets the engine act on the first
``POST /v1/batches`` and then answers 500 instead of the engine's answer, so a client that
retries sends the same create again; it records each create's ``x-stainless-retry-count``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

T = TypeVar("T")

MASTER_KEY = "sk-proxy-master-test-5b7d1e9c"  # the proxy refuses publicly known keys
START_TIMEOUT = 90.0


def litellm_executable() -> Path:
    return Path(sys.executable).parent / "litellm"


def litellm_unavailable() -> str | None:
    """Why the proxy cannot run in this environment, or None when it can."""
    if importlib.util.find_spec("litellm") is None or not litellm_executable().exists():
        return (
            "litellm[proxy] is not installed in this environment; install the test extra "
            "(pip install -e '.[test]') to run the LiteLLM proxy tests"
        )
    if importlib.util.find_spec("prisma") is None:
        return "prisma is not installed (the test extra installs it with litellm[proxy])"
    return None


@dataclass
class LiteLLMProxy:
    base_url: str
    master_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, *, models: dict[str, str], files_base: str, upstream_key: str) -> None:
    config: dict[str, Any] = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": "openai/any-model",
                    "api_base": base,
                    "api_key": upstream_key,
                },
            }
            for name, base in models.items()
        ],
        "files_settings": [
            {"custom_llm_provider": "openai", "api_base": files_base, "api_key": upstream_key}
        ],
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def start_litellm_proxy(
    workdir: Path, *, models: dict[str, str], files_base: str, upstream_key: str
) -> LiteLLMProxy:
    """Run the proxy (see the module docstring); raises with its log when it does not start."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "litellm.yaml"
    write_config(config, models=models, files_base=files_base, upstream_key=upstream_key)
    return _run(workdir, config)


def run_litellm_proxy(workdir: Path, config: dict[str, Any]) -> LiteLLMProxy:
    """Run the proxy with ``config`` (a master key from the environment is added)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "litellm.yaml"
    settings = {**config.get("general_settings", {}), "master_key": "os.environ/LITELLM_MASTER_KEY"}
    path.write_text(yaml.safe_dump({**config, "general_settings": settings}, sort_keys=False))
    return _run(workdir, path)


def _run(workdir: Path, config: Path) -> LiteLLMProxy:
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "LITELLM_LOG": "ERROR",
        "NO_DOCS": "True",
    }
    log_path = workdir / "litellm.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(litellm_executable()),
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
        )
    proxy = LiteLLMProxy(f"http://127.0.0.1:{port}", MASTER_KEY, process, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"the LiteLLM proxy exited ({process.returncode}):\n{proxy.log_tail()}"
            )
        try:
            if httpx.get(f"{proxy.base_url}/health/liveliness", timeout=2).status_code == 200:
                return proxy
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proxy.stop()
            raise RuntimeError(f"the LiteLLM proxy did not start in time:\n{proxy.log_tail()}")
        time.sleep(0.2)


@dataclass
class FailFirstCreate:
    """ASGI middleware: the engine creates the batch, the client gets a 500 (once, armed)."""

    app: Any
    armed: bool = False
    creates: list[str | None] = field(default_factory=list)  # x-stainless-retry-count each

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        is_create = (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].rstrip("/") in ("/v1/batches", "/batches")
        )
        if not is_create:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        retry = headers.get(b"x-stainless-retry-count")
        self.creates.append(retry.decode() if retry is not None else None)
        if not self.armed:
            await self.app(scope, receive, send)
            return
        self.armed = False

        async def swallow(message: Any) -> None:
            return None  # the engine acted; its answer is lost on the way back

        await self.app(scope, receive, swallow)
        body = b'{"error": {"message": "injected: lost answer", "type": "server_error"}}'
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# -- started early ---------------------------------------------------------------------------

_early: dict[str, tuple[Future[Any], Callable[[Any], None]]] = {}


def start_early(name: str, build: Callable[[], T], stop: Callable[[T], None]) -> None:
    """Build ``name`` (a proxy and the servers behind it: seconds, mostly LiteLLM's imports) on
    a thread of its own now, while the tests before the ones that use it run
    (``conftest.pytest_collection_finish``); ``take_early`` hands it to its fixture, and
    ``stop_unclaimed`` stops one no fixture took (a run stopped early)."""
    if name not in _early:
        future = ThreadPoolExecutor(1, thread_name_prefix=name).submit(build)
        _early[name] = (future, stop)


def take_early(name: str) -> Any | None:
    """What ``start_early`` built for ``name`` (its error, raised), or None if it was not."""
    started = _early.pop(name, None)
    return None if started is None else started[0].result()


def stop_unclaimed() -> None:
    for future, stop in _early.values():
        if future.exception() is None:
            stop(future.result())
    _early.clear()
