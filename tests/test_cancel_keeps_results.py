"""Cancel keeps finished results (issue 10, item 5), end to end through `batchspec serve`.

The server runs 40 requests slowly (one at a time, with upstream latency), so `batchspec
cancel` lands mid-batch: the server ends the batch ``cancelled`` with some answers in its
output file. The next `apply` polls the cancelling batch to its end, collects what finished
and writes it; `results` prints those answers and `status` shows the batch cancelled with
its counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from probes import ServeProcess, start_serve_process
from servers import stop_after_test, wait_for
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, make_workspace, openai_provider, run_cli

REQUESTS = 40
FAST = ("--poll-interval", "0.05", "--timeout", "60")


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        proc = start_serve_process(tmp_path / "engine", *args)
        started.append(proc)
        return proc

    yield start
    stop_after_test(started)


def test_cancel_mid_batch_keeps_the_answers_that_finished(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """Cancel lands mid-batch and says it is under way; the next apply waits for the cancel to
    finish, collects the answers that made it (counting answers and errors apart) and writes
    them: `results` prints them, `status` says cancelled with the server's counts."""
    srv = serve("--upstream-latency", "0.05", "--concurrency", "1")
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=(ResourceSpec("triage", count=REQUESTS),),
    )
    client = srv.client()
    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0, err
    [remote] = client.batches.list().data
    wait_for(lambda: client.batches.retrieve(remote.id).request_counts.completed >= 5)

    code, out, err = run_cli(["cancel", "triage", str(ws.root)], capsys)
    assert code == 0, err
    assert out.startswith("cancelling 1 batch of triage: answers that finish before")
    ended = wait_for(
        lambda: (b := client.batches.retrieve(remote.id)).status == "cancelled" and b, timeout=30
    )
    finished = client.files.content(ended.output_file_id).text.splitlines()
    assert 0 < len(finished) < REQUESTS
    assert ended.request_counts.completed == len(finished)

    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    unanswered = REQUESTS - len(finished)
    assert f"(cancelled): {len(finished)} answers, {unanswered} errors" in out

    code, out, err = run_cli(["results", "triage", str(ws.root)], capsys)
    assert code == 0, err
    printed = [json.loads(line) for line in out.splitlines()]
    assert [r["custom_id"] for r in printed] == [json.loads(x)["custom_id"] for x in finished]
    assert all(r["response"]["status_code"] == 200 for r in printed)

    code, out, err = run_cli(["status", str(ws.root), "--json"], capsys)
    assert code == 0, err
    [status] = json.loads(out)["resources"]
    assert status["generation_status"] == "cancelled"
    assert status["succeeded"] == len(finished)
    [batch] = status["batches"]
    assert batch["status"] == "cancelled"
    assert (batch["completed"], batch["total"]) == (len(finished), REQUESTS)
