"""Attacks on the drain's lookup of a retired generation's unconfirmed create (``drain``,
``hold``): a create found and adopted is cancelled even when that cancel fails once, so the
batch a user retired does not run on, and bill, to its end. A real ``batchspec serve``
process behind a slow gateway that holds creates and refuses chosen routes; real SQLite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from probes import ServeProcess
from slow_gateway import SlowGateway
from test_replace_hold import (
    CREATE,
    FAST,
    SLOW,
    answered_once,
    in_order,
    killed_while_its_create_is_held,
    serve,
)
from workspaces import KEY_ENV, SENTINEL_KEY, run_cli

__all__ = ["serve"]  # a fixture, used by name


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
    cancels it (it was only polled: it ran its 60 requests to the end, billed, while the new
    generation waited), and each line is answered once."""
    srv = serve(*SLOW, "0")
    ws, gw = killed_while_its_create_is_held(tmp_path, srv, gateways, hold=3.0, timeout=1)
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
