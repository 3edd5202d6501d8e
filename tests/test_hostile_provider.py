"""Attacks from a provider whose files and batch objects lie: an output file that is the
batch's input, a line answering another shard's request, a file that ends at a line boundary
before its last answers, a request answered in both files, a status that goes backwards, a
create answered with an id the provider then does not know, and an apply SIGKILLed while it
downloads. For each: no answer lost or doubled in the result files, nothing paid twice
(creates counted at the server), an honest exit code. A small OpenAI stand-in on loopback
(``hostile_openai``), real SQLite, the CLI's own entry point (or its own process, to kill)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_openai import HostileOpenAI, Reply, SeenRequest, answer_line, jsonl
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
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
    small file row by row, a large one through a table); two creates, nothing sent again."""
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
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0

    hostile.finish_all()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", *WAIT], capsys)

    assert code == 0, out + err
    assert _answers(ws) == _own_answers(ws)
    assert hostile.creates() == 2
