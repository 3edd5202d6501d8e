"""Shared fixtures. Server fixtures start real uvicorn servers on 127.0.0.1 (free ports).

- ``serve_engine(**engine_options) -> servers.EngineServer``: the local engine's OpenAI API
  (builtin stand-in upstream unless ``upstream=`` is given; ``api_key=`` to require a key),
  data under this test's ``tmp_path``; every server is stopped at teardown.
- ``standin_upstream(latency=0.0) -> servers.StandinUpstream``: the stand-in over HTTP, with
  ``.calls`` counting requests per body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import EngineServer, StandinUpstream, start_server, start_standin_upstream


@pytest.fixture
def serve_engine(tmp_path: Path) -> Iterator[Callable[..., EngineServer]]:
    started: list[EngineServer] = []

    def start(data_dir: Path | None = None, **engine_options: Any) -> EngineServer:
        server = start_server(data_dir or tmp_path / "engine", **engine_options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def standin_upstream() -> Iterator[Callable[..., StandinUpstream]]:
    started: list[StandinUpstream] = []

    def start(latency: float = 0.0) -> StandinUpstream:
        upstream = start_standin_upstream(latency=latency)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()
