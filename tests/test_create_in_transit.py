"""A create still in transit is never sent twice (DESIGN invariant 1, issue 10 item 2).

A slow gateway (tests/slow_gateway.py) sits in front of a real `batchspec serve` process and
holds every ``POST /v1/batches`` for longer than batchspec's provider ``timeout``, then
delivers it, as a gateway with a long upstream timeout does. The engine behind it would
fold a repeated create into one batch (its own idempotency), so the tests count what a paid
provider would bill: the creates the gateway *forwarded*.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from probes import ServeProcess, start_serve_process
from slow_gateway import SlowGateway, start_slow_gateway
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    make_workspace,
    openai_provider,
    run_cli,
)

CREATE = "POST /v1/batches"
HOLD = 3.0  # seconds the gateway keeps a create before delivering it
FAST = ("--poll-interval", "0.05", "--timeout", "60")


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[[], tuple[ServeProcess, SlowGateway]]]:
    started: list[tuple[ServeProcess, SlowGateway]] = []

    def start() -> tuple[ServeProcess, SlowGateway]:
        srv = start_serve_process(tmp_path / "engine")
        gw = start_slow_gateway(srv.base_url, hold={CREATE: HOLD})
        started.append((srv, gw))
        return srv, gw

    yield start
    for srv, gw in started:
        gw.stop()
        srv.stop()


def workspace(root: Path, gw: SlowGateway, **options: float) -> Workspace:
    return make_workspace(
        root,
        providers={"srv": openai_provider(gw.v1, KEY_ENV, **options)},
        resources=(ResourceSpec("triage", count=4),),
    )


def assert_one_batch_with_every_answer(ws: Workspace, srv: ServeProcess) -> None:
    [remote] = srv.client().batches.list().data
    with ws.store() as store:
        [batch] = store.batches()
    assert batch.remote_id == remote.id
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")


def test_apply_killed_while_its_create_is_held_never_creates_again(
    tmp_path: Path,
    gateway: Callable[[], tuple[ServeProcess, SlowGateway]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGKILL apply while the gateway holds its create; the re-run finds nothing listed yet
    but waits to confirm the earlier create (its window is open) instead of creating again,
    then adopts the batch once it is delivered: one create reached the provider."""
    srv, gw = gateway()
    ws = workspace(tmp_path / "ws", gw, timeout=2)
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes"),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert gw.arrived(CREATE).wait(30), "the create never reached the gateway"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    # a pass that finds the create unconfirmed says so once and ends the resource's pass
    # (or, if the gateway delivered it already, adopts it and says nothing of waiting)
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0, err
    assert out.count("waiting to confirm an earlier create") <= 1
    assert gw.received[CREATE] == 1

    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    gw.wait_until_forwarded(CREATE, 1)
    assert gw.received[CREATE] == 1
    assert gw.forwarded[CREATE] == 1
    assert "waiting to confirm an earlier create" in out
    assert_one_batch_with_every_answer(ws, srv)
    with ws.store() as store:
        actions = [e.action for e in store.events(resource="triage")]
    assert "adopt" in actions and "create" not in actions


def test_a_create_slower_than_the_timeout_is_sent_once(
    tmp_path: Path,
    gateway: Callable[[], tuple[ServeProcess, SlowGateway]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a provider timeout (1 s) shorter than the create's transit (3 s), one apply looks
    the key up with backoff through the confirm window instead of re-sending it, and adopts
    the batch when it appears: one create reached the provider."""
    srv, gw = gateway()
    ws = workspace(tmp_path / "ws", gw, timeout=1)

    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    assert gw.received[CREATE] == 1
    assert gw.forwarded[CREATE] == 1
    assert "got no clear answer" in out
    assert_one_batch_with_every_answer(ws, srv)
    with ws.store() as store:
        actions = [e.action for e in store.events(resource="triage")]
    assert actions.count("create-unconfirmed") == 1 and "adopt" in actions


def test_a_create_made_whose_answer_was_lost_is_recorded_as_found_after_its_error(
    tmp_path: Path,
    gateway: Callable[[], tuple[ServeProcess, SlowGateway]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The provider made the batch at once but its answer came after batchspec's timeout:
    the create's lookup finds it straight away, and the audit's `create` event says it was
    found after an unclear answer (the timeout), not that the create simply succeeded."""
    srv, gw = gateway()
    gw.hold.clear()
    gw.hold_answers[CREATE] = HOLD
    ws = workspace(tmp_path / "ws", gw, timeout=1)

    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    assert gw.forwarded[CREATE] == 1
    assert_one_batch_with_every_answer(ws, srv)
    with ws.store() as store:
        [create] = [e for e in store.events(resource="triage") if e.action == "create"]
    assert "timed out" in create.detail["found_after"], create.detail
    assert SENTINEL_KEY not in create.detail["found_after"]
