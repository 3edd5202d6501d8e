"""Attacks on the cancel of a batch the provider will not cancel: a refusal for a batch that is
already stopping (cancelled out of band, or by a cancel whose answer was lost) is no failure."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from probes import ProbedServer
from servers import wait_for
from test_drain import REQUESTS, completed, slow_server
from workspaces import KEY_ENV, SENTINEL_KEY, run_cli, served


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def test_a_refused_cancel_of_a_batch_already_cancelling_is_recorded_not_failed(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """The batch was cancelled on the provider's side (it is `cancelling`) and the provider
    refuses a second cancel with a 409: `batchspec cancel` records it cancelling and exits 0
    (the stop it asked for is under way), and a later apply does not send it again."""
    srv = slow_server(server, cancel_delay=30)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: completed(client, first.id) >= 1)
    assert client.batches.cancel(first.id).status == "cancelling"  # out of band
    srv.probe.refuse(
        r"^POST /v1/batches/[^/]+/cancel$",
        409,
        {
            "error": {
                "message": "Cannot cancel a batch with status 'cancelling'.",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
    )

    code, out, err = run_cli(["cancel", "triage", str(ws.root)], capsys)

    assert code == 0, err
    with ws.store() as store:
        [batch] = store.batches()
    assert batch.status == "cancelling"


def test_a_refused_cancel_of_a_finalizing_batch_keeps_it_in_flight_not_failed(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch finalizing when `batchspec cancel` reaches it: the provider refuses the cancel
    (409, nothing left to stop) and the batch reads back `finalizing`: the command records it
    in flight (a later apply collects it) and the generation cancelled, and exits 0."""
    srv = slow_server(server, cancel_delay=30)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    finalizing = {**client.batches.retrieve(first.id).model_dump(), "status": "finalizing"}
    srv.probe.refuse(rf"^GET /v1/batches/{first.id}$", 200, finalizing)
    srv.probe.refuse(
        r"^POST /v1/batches/[^/]+/cancel$",
        409,
        {
            "error": {
                "message": "Cannot cancel a batch with status 'finalizing'.",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
    )

    code, out, err = run_cli(["cancel", "triage", str(ws.root)], capsys)

    assert code == 0, err
    with ws.store() as store:
        [batch] = store.batches()
        [gen] = store.generations("triage")
    assert batch.status == "finalizing" and gen.status == "cancelled"
