"""A batch's files short of an answer while some of its requests failed: the failures' lines
(in the error file) must not stand in for the answers the output file lost. A small OpenAI
stand-in on loopback (``hostile_openai``), real SQLite, the CLI's own entry point."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_openai import HostileOpenAI, Reply, SeenRequest, jsonl
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, Workspace, make_workspace, run_cli

WAIT = ["--wait", "--poll-interval", "0.05", "--timeout", "30"]


@pytest.fixture
def hostile(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileOpenAI]:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    srv = HostileOpenAI()
    yield srv
    srv.stop()


def _one_refused_of_four(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> tuple[Workspace, str, str, str]:
    """A workspace of four requests whose one batch ended completed: three answers in its
    output file, the fourth refused (400) in its error file; counted 3 completed, 1 failed."""
    hostile.initial_status = "in_progress"
    ws = make_workspace(
        tmp_path / "ws",
        providers={
            "srv": {
                "type": "openai",
                "baseUrl": hostile.v1,
                "apiKeyEnv": KEY_ENV,
                "options": {"maxRetries": 0},
            }
        },
        resources=(ResourceSpec("a", 4),),
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [batch_id] = hostile.order
    output = hostile.outputs[batch_id]
    lines = hostile.files[output].splitlines(keepends=True)
    refused = json.loads(lines[-1])["custom_id"]
    hostile.files[output] = b"".join(lines[:-1])
    error_line = {
        "id": "batch_req_refused",
        "custom_id": refused,
        "response": {
            "status_code": 400,
            "request_id": "req_refused",
            "body": {"error": {"message": "refused", "type": "invalid_request_error"}},
        },
        "error": None,
    }
    errors = hostile.add_file(jsonl([error_line]))
    hostile.batches[batch_id].update(
        status="completed",
        output_file_id=output,
        error_file_id=errors,
        request_counts={"total": 4, "completed": 3, "failed": 1},
    )
    hostile.initial_status = "completed"  # a retry would be answered at once
    return ws, batch_id, output, refused


def test_an_output_file_short_of_an_answer_is_downloaded_again_though_requests_failed(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Four requests: three answered (counted completed, in the output file), one refused
    (counted failed, in the error file). The output file's first download comes without its
    last answer, cut where a line ended. The error file's line was counted with the output
    file's as lines of completed requests: three lines for three completed, so the short
    file was recorded at once, the request whose answer it lost taken as unanswered, sent
    again and paid for twice, in silence. Each counted request (completed or failed) has a
    line in one of the files: the short file is downloaded again and every answer kept;
    one create."""
    ws, batch_id, output, refused = _one_refused_of_four(tmp_path, hostile, capsys)
    served = {"n": 0}

    def cut_once(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        if output not in seen.path:
            return reply
        served["n"] += 1
        if served["n"] > 1:
            return reply
        return Reply(200, b"".join(reply.body.splitlines(keepends=True)[:-1]))

    hostile.hooks["GET /v1/files/{id}/content"] = cut_once

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert "downloading them again (2 of 3)" in out, out + err
    assert served["n"] == 2
    assert hostile.creates() == 1, out + err
    answered = {r["custom_id"] for r in ws.outputs("a")}
    assert answered == set(ws.input_ids("a")) - {refused}
    assert [e["custom_id"] for e in ws.errors("a")] == [refused]
    assert code == 0, out + err


def test_a_batch_whose_completed_counts_its_failures_is_not_taken_for_short(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server whose ``completed`` counts its failures too (total 4, completed 4, failed
    1: three answers and one failure, all lines there): its files are whole, so they are
    downloaded once and nothing is said missing."""
    ws, batch_id, output, refused = _one_refused_of_four(tmp_path, hostile, capsys)
    hostile.batches[batch_id]["request_counts"] = {"total": 4, "completed": 4, "failed": 1}

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert "downloading them again" not in out, out
    assert "no readable line" not in out, out
    # its requests done as its counts say, never more than it has ("5/4 (1 failed)")
    assert "completed 4/4 (1 failed)" in out and "5/4" not in out, out
    assert [s.path for s in hostile.seen].count(f"/v1/files/{output}/content") == 1
    assert hostile.creates() == 1
    assert [e["custom_id"] for e in ws.errors("a")] == [refused]
    assert code == 0, out + err


def test_an_expired_batchs_output_file_short_of_an_answer_is_downloaded_again(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch that expired with two of its four requests answered (counted completed 2,
    failed 0) and the other two in its error file (``batch_expired``, counted in neither).
    Its output file's first download comes without its last answer, cut where a line
    ended. Those error lines were counted with the answers: three lines for two completed,
    so the short file was recorded at once and the request whose answer it lost sent again
    with the expired ones and paid for twice, in silence. The answers are counted against
    the completed requests: the file is downloaded again and only the two expired requests
    are sent again."""
    ws, batch_id, output, refused = _one_refused_of_four(tmp_path, hostile, capsys)
    answers = hostile.files[output].splitlines(keepends=True)
    expired = [refused, json.loads(answers[-1])["custom_id"]]
    hostile.files[output] = b"".join(answers[:-1])
    errors = hostile.add_file(
        jsonl(
            [
                {
                    "id": f"batch_req_{cid}",
                    "custom_id": cid,
                    "response": None,
                    "error": {"code": "batch_expired", "message": "expired"},
                }
                for cid in expired
            ]
        )
    )
    hostile.batches[batch_id].update(
        status="expired",
        error_file_id=errors,
        request_counts={"total": 4, "completed": 2, "failed": 0},
    )
    served = {"n": 0}

    def cut_once(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        if output not in seen.path:
            return reply
        served["n"] += 1
        if served["n"] > 1:
            return reply
        return Reply(200, b"".join(reply.body.splitlines(keepends=True)[:-1]))

    hostile.hooks["GET /v1/files/{id}/content"] = cut_once

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert code == 0, out + err
    assert "downloading them again (2 of 3)" in out, out
    [_, retry] = hostile.order
    resent = hostile.files[hostile.batches[retry]["input_file_id"]].splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in resent) == sorted(expired)
    assert {r["custom_id"] for r in ws.outputs("a")} == set(ws.input_ids("a"))
