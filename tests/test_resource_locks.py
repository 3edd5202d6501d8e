"""Locks per resource, with real `batchspec apply` processes against one `batchspec serve`.

Runs on different resources of one state proceed side by side; a second run on the same
resource exits 3 naming the holder and the resource; a holder killed with SIGKILL frees its
locks with no `unlock` (PostgreSQL: its session ends; SQLite: its pid is gone on this host).
Each test runs once per backend (``state_location``: an SQLite file or a PostgreSQL database).
The server delays every answer (``--upstream-latency``), so a run holds its locks for a
while: overlap is proven from the state's own event times, never by sleeping in the product.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_faults import serve_processes
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    make_workspace,
    openai_provider,
)

from batchspec.state.store import EventRow, StateStore

LATENCY = "2.0"  # seconds each answer takes at the server: a run holds its locks that long


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_processes(tmp_path)


@pytest.fixture
def ws(tmp_path: Path, serve: Any) -> Workspace:
    srv = serve("--upstream-latency", LATENCY)
    return make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[ResourceSpec("alpha", count=2), ResourceSpec("beta", count=2)],
    )


def env_for(state: Path | str) -> dict[str, str]:
    return {**os.environ, KEY_ENV: SENTINEL_KEY, "BATCHSPEC_STATE": str(state)}


def start(ws: Workspace, state: Path | str, *args: str) -> subprocess.Popen[str]:
    """A separate `batchspec ARGS` process on ``ws`` with the state at ``state``."""
    return subprocess.Popen(
        batchspec_cmd(*args),
        cwd=ws.root,
        env=env_for(state),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_apply(ws: Workspace, state: Path | str, name: str, *extra: str) -> subprocess.Popen[str]:
    return start(
        ws, state, "apply", "--select", name, "--yes", "--wait", "--poll-interval", "0.1",
        "--timeout", "90", *extra,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def events(state: Path | str, action: str, resource: str) -> list[EventRow]:
    with StateStore.open(state) as store:
        return [e for e in store.events(resource=resource) if e.action == action]


def wait_for_event(
    state: Path | str, action: str, resource: str, proc: subprocess.Popen[str]
) -> EventRow:
    """The first ``action`` event of ``resource``, once ``proc`` (still running) records it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = events(state, action, resource)
        if found:
            return found[0]
        assert proc.poll() is None, finish(proc)
        time.sleep(0.05)
    raise AssertionError(f"no {action} event for {resource}")


def test_runs_on_different_resources_overlap(ws: Workspace, state_location: Path | str) -> None:
    """Two applies on different --select run side by side with --lock-timeout 0: the second
    creates its batch while the first still holds its lock and waits for its own batch."""
    first = start_apply(ws, state_location, "alpha")
    created_alpha = wait_for_event(state_location, "create", "alpha", first)
    second = start_apply(ws, state_location, "beta", "--lock-timeout", "0")
    code, _, err = finish(second)
    assert code == 0, err
    assert finish(first)[0] == 0
    [created_beta] = events(state_location, "create", "beta")
    [collected_alpha] = events(state_location, "collect", "alpha")
    # alpha's run held its lock from before its create until after its collect
    assert created_alpha.at < created_beta.at < collected_alpha.at
    assert len(ws.outputs("alpha")) == len(ws.outputs("beta")) == 2


def test_second_run_on_the_same_resource_exits_3_naming_holder_and_resource(
    ws: Workspace, state_location: Path | str
) -> None:
    """A run on a resource another run holds waits --lock-timeout, then exits 3 naming the
    holder (id, pid, command) and the resource; status --json shows the held lock."""
    first = start_apply(ws, state_location, "alpha")
    wait_for_event(state_location, "create", "alpha", first)
    status = start(ws, state_location, "status", "--json")
    code, out, err = finish(status)
    assert code == 0, err
    [lock] = json.loads(out)["locks"]
    assert (lock["resource"], lock["pid"], lock["command"]) == ("alpha", first.pid, "apply")
    began = time.monotonic()
    code, _, err = finish(start_apply(ws, state_location, "alpha", "--lock-timeout", "0.5"))
    assert code == 3, err
    assert time.monotonic() - began >= 0.5
    for part in ("resource alpha", lock["holder_id"], f"pid {first.pid}", "'apply'"):
        assert part in err
    assert f"batchspec unlock {lock['holder_id']}" in err
    assert finish(first)[0] == 0
    assert len(events(state_location, "create", "alpha")) == 1  # one batch, not two


def test_a_killed_holder_frees_its_locks_without_unlock(
    ws: Workspace, state_location: Path | str
) -> None:
    """kill -9 a run holding a resource: the next run on it proceeds with no `unlock`
    (PostgreSQL: the session lock died with the session; SQLite: the pid is gone on this
    host), takes the lock over, and adopts the killed run's batch instead of paying again."""
    first = start_apply(ws, state_location, "alpha")
    wait_for_event(state_location, "create", "alpha", first)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    code, out, err = finish(start_apply(ws, state_location, "alpha", "--lock-timeout", "10"))
    assert code == 0, err
    assert "took over the lock" in out and f"pid {first.pid}" in out
    [takeover] = events_of(state_location, "lock.takeover")
    assert takeover.detail["previous"]["pid"] == first.pid
    assert len(events(state_location, "create", "alpha")) == 1
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ws.input_ids("alpha")


def events_of(state: Path | str, action: str) -> list[EventRow]:
    with StateStore.open(state) as store:
        return [e for e in store.events() if e.action == action]
