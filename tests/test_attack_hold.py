"""Attacks on the drain's lookup of a retired generation's unconfirmed create (``drain``,
``hold``): a create found and adopted is cancelled even when that cancel fails once, so the
batch a user retired does not run on, and bill, to its end. A real ``batchspec serve``
process behind a slow gateway that holds creates and refuses chosen routes; real SQLite."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from probes import ServeProcess
from slow_gateway import SlowGateway, start_slow_gateway
from test_replace_hold import FAST, SLOW, answered_once, gateways, in_order, serve
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    batchspec_cmd,
    make_workspace,
    openai_provider,
    run_cli,
)

__all__ = ["gateways", "serve"]  # fixtures, used by name

CREATE = "POST /v1/batches"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def test_an_adopted_create_whose_cancel_failed_is_cancelled_by_the_next_pass(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An apply killed while a gateway holds its create; `apply --replace` retires the
    generation (the create not found yet); the create lands; the next apply's drain finds and
    adopts it, but the gateway refuses its cancel (a warning); the apply after that still
    cancels it (it was only polled: it ran its 120 requests to the end, billed, while the new
    generation waited), and each line is answered once."""
    srv = serve(*SLOW, "0")
    gw = start_slow_gateway(srv.base_url, hold={CREATE: 4.0})
    gateways.append(gw)
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(gw.v1, KEY_ENV, timeout=2)},
        resources=(ResourceSpec("triage", count=120),),
    )
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes"),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert gw.arrived(CREATE).wait(30), "the create never reached the gateway"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    gw.hold.clear()  # the create in transit is still held; the next ones go through
    assert run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)[0] == 0
    gw.wait_until_forwarded(CREATE, 1)
    client = srv.client()
    [old] = client.batches.list().data
    gw.refuse[f"POST /v1/batches/{old.id}/cancel"] = 400

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert "refused by the test gateway" in out + err
    assert client.batches.retrieve(old.id).status == "in_progress"
    gw.refuse.clear()

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert client.batches.retrieve(old.id).status in ("cancelling", "cancelled"), out
    with ws.store() as store:
        [batch] = store.batches(store.generations("triage")[0].id)
        actions = [(e.action, e.batch_id) for e in store.events(resource="triage")]
    assert batch.remote_id == old.id
    assert actions.count(("adopt", batch.id)) == 1 and actions.count(("cancel", batch.id)) == 1
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
    assert code == 0, err
    answered_once(in_order(client, old.id), ws)
