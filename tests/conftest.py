"""Shared fixtures. Server fixtures start real uvicorn servers on 127.0.0.1 (free ports).

- ``serve_engine(**engine_options) -> servers.EngineServer``: the local engine's OpenAI API
  (builtin stand-in upstream unless ``upstream=`` is given; ``api_key=`` to require a key),
  data under this test's ``tmp_path``; every server is stopped at teardown.
- ``standin_upstream(latency=0.0) -> servers.StandinUpstream``: the stand-in over HTTP, with
  ``.calls`` counting requests per body.
- ``server(**options) -> probes.ProbedServer``: the engine's app behind a request probe
  (counts and holds routes), requiring ``workspaces.SENTINEL_KEY`` unless ``api_key=`` says
  otherwise.
- ``scripted -> scripted_server.ScriptedServer``: a programmable HTTP server that answers
  from a script and records every request; one per test module, reset for each test.
- ``postgres_cluster`` (session): a throwaway PostgreSQL cluster (``postgres.Cluster``);
  ``postgres_url``: an empty schema of its own on it; ``state_location``: parametrised over
  both backends, an SQLite file's path or a PostgreSQL URL.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litellm_proxy import stop_unclaimed
from postgres import Cluster, find_bin_dir, start_cluster
from probes import ProbedServer, start_probed_server
from scripted_server import ScriptedServer
from servers import (
    EngineServer,
    StandinUpstream,
    join_stopped,
    start_server,
    start_standin_upstream,
    stop_after_test,
)
from slow_gateway import SlowGateway
from workspaces import SENTINEL_KEY

pytest_plugins = ["ci_skips"]  # with CI=true a skip is a failure (tests/ci_skips.py)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile batchspec to bytecode once, as ``pip install`` does an installed package: the
    suite starts hundreds of ``batchspec`` processes, and with an editable install under
    PYTHONDONTWRITEBYTECODE (as on the machines this runs on) each of them compiled every
    module it imported again (~0.15 s of CPU a process). Bytecode only ever read, never
    trusted over a newer source (Python checks the source's time and size)."""
    import compileall

    import batchspec

    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # the controller compiled it before it started the workers

    compileall.compile_dir(Path(batchspec.__file__).parent, quiet=1)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start, each on a thread of its own, the slow setups the selected tests will need (a
    test module's ``start_early(tmp_path_factory)``: the LiteLLM proxies, ~5 s of imports
    each), so that their start overlaps the tests that run before them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # each worker collects every test and learns which ones it runs only as it goes: a
        # setup started here would be started in every worker, its imports (hundreds of MB
        # of allocations) under the memory tests of the others; the fixture builds it
        return
    factory = session.config._tmp_path_factory  # what the tmp_path_factory fixture gives
    modules = {id(item.module): item.module for item in session.items if hasattr(item, "module")}
    for module in modules.values():
        start = getattr(module, "start_early", None)
        if start is not None:
            start(factory)


def pytest_sessionfinish(session: pytest.Session) -> None:
    stop_unclaimed()  # a setup started early that no test took (a run stopped early)


@pytest.fixture(scope="session", autouse=True)
def servers_stopped_at_teardown() -> Iterator[None]:
    """The fixtures below stop their servers off the test's thread (``stop_after_test``);
    at the end of the session every one of those stops has finished, or this fails."""
    yield
    join_stopped()


@pytest.fixture
def serve_engine(tmp_path: Path) -> Iterator[Callable[..., EngineServer]]:
    started: list[EngineServer] = []

    def start(data_dir: Path | None = None, **engine_options: Any) -> EngineServer:
        server = start_server(data_dir or tmp_path / "engine", **engine_options)
        started.append(server)
        return server

    yield start
    stop_after_test(started)


@pytest.fixture
def standin_upstream() -> Iterator[Callable[..., StandinUpstream]]:
    started: list[StandinUpstream] = []

    def start(latency: float = 0.0) -> StandinUpstream:
        upstream = start_standin_upstream(latency=latency)
        started.append(upstream)
        return upstream

    yield start
    stop_after_test(started)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., ProbedServer]]:
    """Start probed engine servers (requiring the sentinel key unless told otherwise), each
    on its own data folder; every one is stopped at teardown."""
    started: list[ProbedServer] = []

    def start(**options: Any) -> ProbedServer:
        options.setdefault("api_key", SENTINEL_KEY)
        srv = start_probed_server(tmp_path / f"engine{len(started)}", **options)
        started.append(srv)
        return srv

    yield start
    stop_after_test(started)


@pytest.fixture(scope="module")
def scripted_server_of_module() -> Iterator[ScriptedServer]:
    srv = ScriptedServer()
    yield srv
    srv.stop()


@pytest.fixture
def scripted(scripted_server_of_module: ScriptedServer) -> Iterator[ScriptedServer]:
    """The module's scripted server with an empty script and no recorded requests."""
    scripted_server_of_module.reset()
    yield scripted_server_of_module
    scripted_server_of_module.reset()


# -- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """One throwaway PostgreSQL cluster for the session (tests/postgres.py).

    Missing binaries or driver: a skip on a developer's machine, a failure with CI=true.
    """
    bin_dir = find_bin_dir()
    missing = None
    if bin_dir is None:
        missing = "the PostgreSQL server binaries (apt-get install postgresql) are not installed"
    elif importlib.util.find_spec("psycopg") is None:
        missing = "psycopg is not installed (pip install -e '.[test]')"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}; with CI=true a missing PostgreSQL is a failure, not a skip")
        pytest.skip(missing)
    assert bin_dir is not None
    cluster = start_cluster(bin_dir)
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: Cluster) -> Iterator[str]:
    """A URL to an empty schema of its own on the session's PostgreSQL cluster."""
    url = postgres_cluster.new_schema()
    yield url
    postgres_cluster.drop_schema(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def state_location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a state store lives, once per backend: an SQLite file, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return tmp_path / "state" / "batchspec.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def gateways() -> Iterator[list[SlowGateway]]:
    """Slow gateways a test starts (``slow_gateway.start_slow_gateway``), stopped after it."""
    started: list[SlowGateway] = []
    yield started
    for gw in started:
        gw.stop()
