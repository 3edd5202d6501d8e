"""Crash safety: `batchspec apply` killed with SIGKILL at each step never pays twice.

The apply under test runs as its own process against the engine's OpenAI API on loopback.
The server side holds one route (tests/probes.py) so the process is known to be stuck in
that very call when it is killed: after the upload was sent, after the create reached the
engine, or before it did. The re-run must end with exactly one remote batch, counted by the
server (creates as requests received, batches as the engine holds them), and complete
results. The engine dedupes repeated creates itself, so the count of create *requests* is
what proves the client did not create twice.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from probes import ProbedServer, ServeProcess, start_serve_process
from servers import stop_after_test
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    make_workspace,
    openai_provider,
    run_cli,
    served,
)

from batchspec.engine.upstreams import BuiltinUpstream

FAST = ["--poll-interval", "0.05"]
HOLD = 30.0  # seconds a route is held at most (released earlier by the test)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


served = functools.partial(served, count=4)  # this file's jobs are 4 requests


def start_apply(ws: Workspace, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes", *args),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL


def rerun_converges(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> str:
    """Re-run apply --wait in this process; assert complete results; return its stdout."""
    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
    assert ws.errors("triage") == []
    return out


def actions(ws: Workspace) -> list[str]:
    with ws.store() as store:
        return [e.action for e in store.events(resource="triage")]


def test_killed_after_the_create_reached_the_server_adopts_it(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL after the engine created the batch but before its answer arrived: the state
    has a `creating` intent with no remote id; the re-run adopts the batch by its metadata
    key and never sends a second create."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    created = srv.probe.hold("POST /batches", HOLD, after=True)
    proc = start_apply(ws)
    assert created.wait(20), "the create never reached the server"
    kill(proc)
    srv.probe.release("POST /batches")

    assert srv.batch_count() == 1
    with ws.store() as store:
        [intent] = store.batches()
    assert (intent.remote_id, intent.status) == (None, "creating")

    out = rerun_converges(ws, capsys)

    assert srv.probe.counts["POST /batches"] == 1
    assert srv.batch_count() == 1
    with ws.store() as store:
        [batch] = store.batches()
    [remote] = srv.client().batches.list().data
    assert batch.remote_id == remote.id
    assert "adopt" in actions(ws) and "create" not in actions(ws)
    assert f"took over the lock of dead process {proc.pid}" in out


def test_killed_during_the_upload_creates_exactly_once(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL between the recorded intent and the create (stuck in the upload): the state
    holds a pending intent and the server no batch; the re-run creates exactly one."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    uploading = srv.probe.hold("POST /files", HOLD, drop=True)
    proc = start_apply(ws)
    assert uploading.wait(20), "the upload never reached the server"
    kill(proc)
    srv.probe.release("POST /files")

    with ws.store() as store:
        [intent] = store.batches()
    assert intent.remote_id is None and intent.status != "creating"
    assert srv.batch_count() == 0

    rerun_converges(ws, capsys)

    assert srv.probe.counts["POST /batches"] == 1
    assert srv.batch_count() == 1
    assert actions(ws).count("intent") == 1  # the re-run used the recorded intent
    assert actions(ws).count("create") == 1


def test_killed_before_the_create_arrived_creates_exactly_once(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL while the create was on its way but never reached the engine: the `creating`
    intent finds nothing to adopt; the re-run waits out the create's confirm window (it
    might still arrive), then creates one batch, reusing the upload."""
    srv = server()
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV, createConfirmSeconds=1)},
        resources=(ResourceSpec("triage", count=4),),
    )
    creating = srv.probe.hold("POST /batches", HOLD, drop=True)
    proc = start_apply(ws)
    assert creating.wait(20), "the create never left the client"
    kill(proc)
    srv.probe.release("POST /batches")

    with ws.store() as store:
        [intent] = store.batches()
    assert (intent.remote_id, intent.status) == (None, "creating")
    assert srv.batch_count() == 0

    out = rerun_converges(ws, capsys)

    assert "waiting to confirm an earlier create" in out
    assert "createConfirmSeconds" in out  # the wait names the option that sets it
    assert srv.batch_count() == 1
    assert srv.probe.counts["POST /batches"] == 2  # the dropped one and the real one
    assert srv.probe.counts["POST /files"] == 1  # the recorded file id was reused
    assert "adopt" not in actions(ws)


def test_killed_while_waiting_only_polls_on_the_rerun(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL during `apply --wait` after the remote id was recorded: the re-run polls and
    collects the same batch; nothing is uploaded or created again."""
    srv = server(upstream=BuiltinUpstream(latency=0.3))
    ws = served(tmp_path / "ws", srv)
    polled = srv.probe.hold("GET /batches/{id}", HOLD)  # first poll: the id is recorded
    proc = start_apply(ws, "--wait", *FAST)
    assert polled.wait(20)
    kill(proc)
    srv.probe.release("GET /batches/{id}")

    rerun_converges(ws, capsys)

    assert srv.probe.counts["POST /batches"] == 1
    assert srv.probe.counts["POST /files"] == 1
    assert srv.batch_count() == 1
    assert "adopt" not in actions(ws)


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        proc = start_serve_process(tmp_path / "engine", *args)
        started.append(proc)
        return proc

    yield start
    stop_after_test(started)


def test_killed_right_after_its_batch_appears_on_batchspec_serve(
    tmp_path: Path, serve_process: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """Real timing against a `batchspec serve` process with a slow upstream: kill apply as
    soon as its batch is listed; the re-run ends with that one batch and complete results,
    either adopted or already recorded."""
    srv = serve_process("--upstream-latency", "0.5")
    ws = served(tmp_path / "ws", srv, count=3)
    client = srv.client()
    proc = start_apply(ws, "--wait", *FAST)
    deadline = time.monotonic() + 20
    while not client.batches.list().data:
        assert time.monotonic() < deadline and proc.poll() is None
    kill(proc)

    rerun_converges(ws, capsys)

    [remote] = client.batches.list().data
    assert remote.status == "completed"
    with ws.store() as store:
        [batch] = store.batches()
        events = store.events(resource="triage")
    assert batch.remote_id == remote.id
    bound = [e for e in events if e.action in ("create", "adopt")]
    assert len(bound) == 1 and bound[0].detail["remote_id"] == remote.id


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_while_a_create_is_answered_records_that_create(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    sig: signal.Signals,
) -> None:
    """Ctrl-C (or SIGTERM) while the server holds a create's answer: the run waits for that
    call, as its thread goes on anyway, and records the batch it made (`create`) before it
    exits 130 (143); the audit said `create-intent, interrupted` and left the batch to the
    next run's `adopt`. Exactly one batch either way."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    created = srv.probe.hold("POST /batches", HOLD, after=True)
    proc = start_apply(ws)
    assert created.wait(20), "the create never reached the server"
    proc.send_signal(sig)
    time.sleep(0.3)  # the signal is handled while the create's answer is still held
    srv.probe.release("POST /batches")
    assert proc.wait(timeout=30) == (130 if sig == signal.SIGINT else 143)

    assert srv.batch_count() == 1
    before = actions(ws)
    assert "create" in before and before.index("create") > before.index("create-intent")
    with ws.store() as store:
        [batch] = store.batches()
    assert batch.remote_id == srv.client().batches.list().data[0].id
    rerun_converges(ws, capsys)
    assert srv.probe.counts["POST /batches"] == 1
    assert "adopt" not in actions(ws)


def test_interrupted_while_a_create_is_answered_sends_no_create_still_queued(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while one create is answered and another waits for a place under the
    provider's maxConcurrency: the waiting create is dropped, not sent after the Ctrl-C
    (the run waited for each create it had queued, so the pool started it as the first
    ended); its intent is pending again, so the next run creates it at once, without
    waiting createConfirmSeconds for a batch that was never asked for."""
    srv = server()
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV, maxConcurrency=1)},
        resources=(ResourceSpec("a", count=2), ResourceSpec("b", count=2)),
    )
    created = srv.probe.hold("POST /batches", HOLD, after=True)
    proc = start_apply(ws)
    assert created.wait(20), "the create never reached the server"
    time.sleep(0.5)  # the second create is queued behind the first meanwhile
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    srv.probe.release("POST /batches")
    assert proc.wait(timeout=30) == 130

    assert srv.probe.counts["POST /batches"] == 1
    assert srv.batch_count() == 1
    with ws.store() as store:
        assert [b.status for b in store.batches() if b.remote_id is None] == ["pending"]
        assert "create-not-sent" in [e.action for e in store.events()]
    started = time.monotonic()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
    assert code == 0, err
    assert "waiting to confirm an earlier create" not in out
    assert time.monotonic() - started < 30  # not createConfirmSeconds (120 s) later
    assert srv.batch_count() == 2
