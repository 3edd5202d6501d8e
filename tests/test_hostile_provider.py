"""Attacks from a provider whose files and batch objects lie: an output file that is the
batch's input, a line answering another shard's request, a file that ends at a line boundary
before its last answers, a request answered in both files, a status that goes backwards, a
create answered with an id the provider then does not know, and an apply SIGKILLed while it
downloads. For each: no answer lost or doubled in the result files, nothing paid twice
(creates counted at the server), an honest exit code. A small OpenAI stand-in on loopback
(``hostile_openai``), real SQLite, the CLI's own entry point (or its own process, to kill)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_openai import HostileOpenAI, Reply, SeenRequest, answer_line, jsonl
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    make_workspace,
    run_cli,
)

import batchspec.state.ledger as ledger_module

WAIT = ["--wait", "--poll-interval", "0.05", "--timeout", "30"]


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


@pytest.fixture
def hostile() -> Iterator[HostileOpenAI]:
    srv = HostileOpenAI()
    yield srv
    srv.stop()


def _workspace(tmp_path: Path, srv: HostileOpenAI, *resources: ResourceSpec) -> Workspace:
    provider = {
        "type": "openai",
        "baseUrl": srv.v1,
        "apiKeyEnv": KEY_ENV,
        "options": {"maxRetries": 0},
    }
    return make_workspace(
        tmp_path / "ws", providers={"srv": provider}, resources=resources or (ResourceSpec("a"),)
    )


def _answers(ws: Workspace, name: str = "a") -> dict[str, str]:
    """custom_id: the answer the result file holds for it (one line each, checked)."""
    outputs = ws.outputs(name)
    answers = {
        o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in outputs
    }
    assert len(answers) == len(outputs), "a custom_id written twice"
    return answers


def _own_answers(ws: Workspace, name: str = "a") -> dict[str, str]:
    """What the honest server answers each request of ``name``'s input."""
    lines = [json.loads(x) for x in ws.input_path(name).read_text().splitlines()]
    return {x["custom_id"]: "answer to " + json.dumps(x["body"]["messages"]) for x in lines}


def test_an_output_file_id_naming_the_batchs_input_file_is_polled_again_not_collected(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """The batch ends ``completed`` with ``output_file_id`` naming its own input file (a
    gateway mixing up the two ids) for its create and first polls: its lines are requests,
    not results. They were each recorded as a final failure (``unknown_error``), the request
    lines written to the errors file, the resource Degraded (exit 4), and the real answers
    never fetched (an ended batch is not polled again), so `--replace` paid for them again.
    It is kept finalizing (said once) and polled until the provider names the right file;
    the same `apply --wait` collects it; one create."""
    ws = _workspace(tmp_path, hostile)
    lies = {"left": 4}

    def input_as_output(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        body = json.loads(reply.body)
        if body.get("object") == "list":  # the listing lies as the objects do
            rows = [{**b, "output_file_id": b["input_file_id"]} for b in body["data"]]
            return Reply.of({**body, "data": rows}) if lies["left"] > 0 else reply
        lies["left"] -= 1
        return (
            Reply.of({**body, "output_file_id": body["input_file_id"]})
            if lies["left"] >= 0
            else reply
        )

    for route in ("POST /v1/batches", "GET /v1/batches/{id}", "GET /v1/batches"):
        hostile.hooks[route] = input_as_output

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert code == 0, out + err
    assert (out + err).count("names its input file as its output file") == 1, out + err
    assert lies["left"] < 0
    assert _answers(ws) == _own_answers(ws) and ws.errors("a") == []
    assert hostile.creates() == 1


def test_an_output_file_holding_request_lines_is_not_recorded_as_failures(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """The batch's output file is served as a copy of its input (request lines, each with
    its custom_id, none with a response or an error: a gateway echoing the upload): each
    line was recorded as a final failure (``unknown_error``), the request lines written as
    the errors file and the resource Degraded (exit 4), as if the provider had refused every
    request. Nothing is recorded (exit 1: not batch results, the batch not collected, no
    result file written); nothing is sent again."""
    ws = _workspace(tmp_path, hostile)

    def echoed(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        batch = json.loads(reply.body)
        server.files[batch["output_file_id"]] = server.files[batch["input_file_id"]]
        return reply

    hostile.hooks["POST /v1/batches"] = echoed

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert code == 1, out + err
    assert "not batch results" in out, out
    assert not ws.errors_path("a").exists() and not ws.output_path("a").exists()
    with ws.store() as store:
        (batch,) = store.batches(store.generations("a")[0].id)
        assert batch.collected_at is None
    assert hostile.creates() == 1


@pytest.mark.parametrize("direct_lines", [100, 0], ids=["row-by-row", "through-a-table"])
def test_a_line_answering_another_shards_request_does_not_replace_that_shards_answer(
    tmp_path: Path,
    hostile: HostileOpenAI,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    direct_lines: int,
) -> None:
    """Two shards; the shard that ends first has, besides its own two answers, a line for a
    request of the other shard (which its batch never carried). That line was recorded as
    the answer, and the other shard's own answer, collected later, dropped (an ``ok`` row is
    final): the results held an answer to a question never asked there. Each request keeps
    the answer of the batch that carried it, whichever way the ledger records a file (a
    small file row by row, a large one through a table); the collect says the line was
    left out (it counted it as one more answer of its batch); two creates, nothing sent
    again."""
    monkeypatch.setattr(ledger_module, "DIRECT_LINES", direct_lines)
    hostile.initial_status = "in_progress"
    ws = _workspace(
        tmp_path, hostile, ResourceSpec("a", 4, spec={"limits": {"maxRequestsPerBatch": 2}})
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    first, second = hostile.order
    carried = [
        json.loads(x)["custom_id"] for x in hostile.files[hostile.outputs[first]].splitlines()
    ]
    stranger = next(cid for cid in ws.input_ids("a") if cid not in carried)
    output = hostile.outputs[first]
    hostile.files[output] += jsonl([answer_line(stranger, "a stray answer")])
    hostile.batches[first].update(status="completed", output_file_id=output)
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0, out + err
    said = "3 answers; 1 line answers a request its batch did not carry (another shard's"
    assert said in out, out
    with ws.store() as store:
        assert store.events(resource="a", action="collect")[0].detail["not_carried"] == 1

    hostile.finish_all()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert code == 0, out + err
    assert _answers(ws) == _own_answers(ws)
    assert hostile.creates() == 2


def _cut_at_a_line(times: int) -> object:
    """A hook serving each file's first ``times`` downloads without their last line (a body
    sent without a length and ended by a closed connection, cut where a line ended)."""
    served = {"n": 0}

    def hook(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        served["n"] += 1
        if served["n"] > times:
            return reply
        return Reply(200, b"".join(reply.body.splitlines(keepends=True)[:-1]))

    return hook


def test_an_output_file_short_of_answers_its_batch_counted_is_downloaded_again(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """The batch counts its three requests completed and its output file comes with two
    lines, whole (cut where a line ended: no half line tells). The missing request was
    taken as unanswered, sent again and paid for twice, and the run said nothing of it.
    Nothing of the short file is recorded: it is downloaded again (said) and all three
    answers collected by the same apply; one create."""
    ws = _workspace(tmp_path, hostile)
    hostile.hooks["GET /v1/files/{id}/content"] = _cut_at_a_line(1)  # type: ignore[assignment]

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert code == 0, out + err
    assert "readable lines for 2 of the 3 requests it counted completed" in out, out
    assert _answers(ws) == _own_answers(ws)
    assert hostile.creates() == 1


def test_an_output_file_always_short_of_its_counts_is_taken_as_it_is_and_said(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """A provider whose output file lacks its last line on every download: after three
    downloads the file is taken as all there is (a resource must not wait for ever for a
    line that never comes), and the collect line and its event say the request it counted
    completed had no readable line, before that request is sent again."""
    ws = _workspace(tmp_path, hostile)
    hostile.hooks["GET /v1/files/{id}/content"] = _cut_at_a_line(3)  # type: ignore[assignment]

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert code == 0, out + err
    assert "1 request it counted completed had no readable line in its files (3 downloads)" in out
    assert _answers(ws) == _own_answers(ws)
    assert hostile.creates() == 2
    with ws.store() as store:
        first = store.events(resource="a", action="collect")[0]
    assert first.detail["missing"] == 1


def _held_at(call: int, reached: threading.Event, release: threading.Event) -> object:
    """A hook holding the ``call``-th download (1 = the first) until ``release`` is set,
    ``reached`` set once it holds it: the apply is then inside that download."""
    calls = {"n": 0}

    def hook(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        with server.lock:
            calls["n"] += 1
            mine = calls["n"]
        if mine == call:
            reached.set()
            release.wait(30)
        return reply

    return hook


@pytest.mark.parametrize(
    ("shards", "held"),
    [pytest.param(1, 1, id="its-only-file"), pytest.param(2, 2, id="the-second-shards-file")],
)
def test_apply_killed_while_it_downloads_collects_every_answer_once_on_the_rerun(
    tmp_path: Path,
    hostile: HostileOpenAI,
    capsys: pytest.CaptureFixture[str],
    shards: int,
    held: int,
) -> None:
    """SIGKILL of an apply (its own process) while a finished batch's file is on its way
    (the provider has answered nothing yet; with two shards, the other shard's file may be
    collected already): the re-run collects what is left, and the result file holds every
    request's own answer exactly once; nothing is created again."""
    count = 2 * shards
    ws = _workspace(
        tmp_path, hostile, ResourceSpec("a", count, spec={"limits": {"maxRequestsPerBatch": 2}})
    )
    reached, release = threading.Event(), threading.Event()
    hostile.hooks["GET /v1/files/{id}/content"] = _held_at(held, reached, release)  # type: ignore[assignment]
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes", *WAIT),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert reached.wait(30), "the download never reached the server"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert code == 0, out + err
    assert [o["custom_id"] for o in ws.outputs("a")] == ws.input_ids("a")
    assert _answers(ws) == _own_answers(ws)
    assert hostile.creates() == shards


def test_an_answer_with_bytes_that_are_not_utf8_is_said_before_it_is_sent_again(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first batch's answer to ``req-1`` holds two bytes that are not UTF-8 (no JSON),
    on every download: it cannot be read, so its request is unanswered and a retry sends it
    again, which the run did in silence (the collect line counted two answers and nothing
    else). The collect line and its event say which line of which file was no result; the
    other answers are kept, and only ``req-1`` is sent again."""
    ws = _workspace(tmp_path, hostile)

    def garbled(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        if server.outputs["batch_1"] not in seen.path:
            return reply
        lines = reply.body.splitlines(keepends=True)
        lines[1] = lines[1].replace(b"answer to", b"answ\xff\xfe to")
        return Reply(200, b"".join(lines))

    hostile.hooks["GET /v1/files/{id}/content"] = garbled

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert code == 0, out + err
    said = "1 line of the output file (line 2) is no result (not JSON"
    assert said in out, out
    assert _answers(ws) == _own_answers(ws)
    assert hostile.creates() == 2
    with ws.store() as store:
        first_collect = store.events(resource="a", action="collect")[0]
    assert first_collect.detail["unreadable"].startswith("1 line of the output file (line 2)")


def test_a_request_answered_in_both_files_keeps_its_answer_and_is_not_sent_again(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """The errors file repeats ``req-0``, which the output file answered, as a retryable
    failure (HTTP 500): the answer is kept (an ``ok`` row is final), nothing is sent again,
    and the run is Healthy (held)."""
    ws = _workspace(tmp_path, hostile)

    def with_errors(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        failed = {
            "id": "batch_req_x",
            "custom_id": "req-0",
            "response": {"status_code": 500, "body": {"error": {"message": "boom"}}},
            "error": None,
        }
        batch = json.loads(reply.body)
        batch["error_file_id"] = server.add_file(jsonl([failed]))
        return Reply.of(batch)

    hostile.hooks["POST /v1/batches"] = with_errors

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert code == 0, out + err
    assert _answers(ws) == _own_answers(ws) and ws.errors("a") == []
    assert hostile.creates() == 1


def test_a_create_answered_with_an_id_the_provider_then_does_not_know_is_not_created_again(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """The create answers 200 with an id its polls answer 404 for: apply exits 1 naming the
    batch, and the next apply asks again instead of creating a second batch (held)."""
    hostile.initial_status = "in_progress"
    ws = _workspace(tmp_path, hostile)
    hostile.hooks["POST /v1/batches"] = lambda server, seen, reply: Reply.of(
        {**json.loads(reply.body), "id": "batch_ghost"}
    )
    for _ in range(2):
        code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)
        assert code == 1, out + err
        assert "batch_ghost" in err and "Traceback" not in err
    assert hostile.creates() == 1


def test_a_batch_with_nothing_answered_whose_output_file_id_names_its_input_is_collected(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """The batch ends ``completed`` with every request refused (HTTP 400, all in its error
    file, ``completed`` 0) and its ``output_file_id`` naming its own input file. With nothing
    answered it is not kept finalizing, so it was recorded ended with that id as its output
    file: every collect downloaded the input, found request lines ("not batch results") and
    failed (exit 1) on every apply, the failures in the error file never recorded. The id
    naming the input is taken as no output file: the error file is collected, each request
    a final failure (exit 4), nothing created again."""
    ws = _workspace(tmp_path, hostile)

    def all_refused(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        body = json.loads(reply.body)
        rows = body["data"] if body.get("object") == "list" else [body]
        for batch in rows:
            if batch.get("error_file_id") is None:
                lines = server.files[batch["input_file_id"]].splitlines()
                refused = [
                    {
                        "id": "batch_req_x",
                        "custom_id": json.loads(x)["custom_id"],
                        "response": {
                            "status_code": 400,
                            "body": {"error": {"message": "bad", "code": "invalid_value"}},
                        },
                        "error": None,
                    }
                    for x in lines
                    if x.strip()
                ]
                batch["error_file_id"] = server.add_file(jsonl(refused))
            batch.update(output_file_id=batch["input_file_id"])
            batch["request_counts"] = {"total": 3, "completed": 0, "failed": 3}
        with server.lock:
            for batch in rows:
                server.batches[batch["id"]].update(batch)
        return Reply.of(body)

    for route in ("POST /v1/batches", "GET /v1/batches/{id}", "GET /v1/batches"):
        hostile.hooks[route] = all_refused

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert "not batch results" not in out + err, out + err
    assert code == 4, out + err
    assert sorted(e["custom_id"] for e in ws.errors("a")) == sorted(ws.input_ids("a"))
    assert hostile.creates() == 1


def test_a_file_short_of_an_answer_and_holding_another_shards_line_is_downloaded_again(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two shards; the first shard's output file comes, on its first download, without its
    last answer and with a line for a request of the other shard instead. That line is left
    out, but it was counted as a line the batch's requests have: the file looked as long as
    the batch's counts, was not downloaded again, and the request whose answer was cut off
    was sent again (paid twice) in silence. The stray line is said and not counted; the file
    is downloaded again and every request keeps its own answer; two creates."""
    hostile.initial_status = "in_progress"
    ws = _workspace(
        tmp_path, hostile, ResourceSpec("a", 4, spec={"limits": {"maxRequestsPerBatch": 2}})
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    first = hostile.order[0]
    output = hostile.outputs[first]
    carried = [json.loads(x)["custom_id"] for x in hostile.files[output].splitlines()]
    stranger = next(cid for cid in ws.input_ids("a") if cid not in carried)
    served = {"n": 0}

    def swapped_once(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        if output not in seen.path:
            return reply
        served["n"] += 1
        if served["n"] > 1:
            return reply
        kept = reply.body.splitlines(keepends=True)[:-1]
        return Reply(200, b"".join(kept) + jsonl([answer_line(stranger, "a stray answer")]))

    hostile.hooks["GET /v1/files/{id}/content"] = swapped_once
    hostile.finish_all()
    hostile.initial_status = "completed"  # a retry would be answered at once

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert code == 0, out + err
    assert "readable lines for 1 of the 2 requests it counted completed" in out, out
    assert _answers(ws) == _own_answers(ws)
    assert hostile.creates() == 2
