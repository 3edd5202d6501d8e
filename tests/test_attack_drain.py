"""Attacks on the drain of retired batches: answers kept and reused only for the very same
request line, never lost, never paid twice (real ``batchspec serve``, real SQLite)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from probes import ProbedServer
from serve_faults import received_batches
from servers import request_lines, wait_for
from test_drain import FAST, REQUESTS, completed, ended, output_ids, slow_server
from workspaces import KEY_ENV, SENTINEL_KEY, run_cli, served


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def test_a_drained_answer_whose_line_changed_is_sent_again(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A cancelled batch answers req-0 while it stops; the new input changes req-0's body:
    the new generation sends req-0 again (the old answer is for another request)."""
    srv = slow_server(server, cancel_delay=1.5)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: completed(client, first.id) >= 2)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    lines = request_lines(REQUESTS)
    lines[0]["body"]["messages"][0]["content"] = "Something else entirely."
    ws.write_input("triage", lines)
    answered = output_ids(client, ended(client, first.id))
    assert "req-0" in answered
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
    assert code == 0, err
    [second] = [b for b in received_batches(client) if b.id != first.id]
    assert "req-0" in second.input_ids
    assert set(second.input_ids) == ({"req-0"} | set(ws.input_ids("triage"))) - (
        set(answered) - {"req-0"}
    )


def test_a_retired_generation_killed_before_its_ledger_keeps_its_answers(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """An apply killed after its create and before the ledger (no ledger rows), then a new
    input (two lines added) on a runner without the request-index folder: the old batch's
    answers are still kept and reused, not paid for again."""
    srv = slow_server(server, cancel_delay=1.5)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    with ws.store() as store:
        store.db.execute("delete from requests")  # as a kill before the ledger's commit
    shutil.rmtree(ws.state_path.parent / "input-index")
    wait_for(lambda: completed(client, first.id) >= 2)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    ws.write_input("triage", request_lines(REQUESTS + 2))
    answered = output_ids(client, ended(client, first.id))
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
    assert code == 0, err
    second = [b for b in received_batches(client) if b.id != first.id]
    assert len(second) == 1
    assert set(second[0].input_ids).isdisjoint(answered), out
