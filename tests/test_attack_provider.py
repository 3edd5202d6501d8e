"""Attacks from a hostile or buggy provider: a create or a poll answered with another batch's
object. Both resources use the same custom_ids (``req-0``…) with different prompts, as
teams' inputs do, so another batch's answers would join this one's requests. A small OpenAI
stand-in on loopback (``hostile_openai``), real SQLite, the CLI's own entry point."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_openai import HostileOpenAI, Reply, SeenRequest, answer_line, jsonl
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, Workspace, make_workspace, run_cli

from batchspec.errors import ProviderError
from batchspec.providers.anthropic import parse_message_batch
from batchspec.providers.base import RemoteBatch
from batchspec.providers.gemini import parse_operation
from batchspec.providers.mistral import parse_job


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


@pytest.fixture
def hostile() -> Iterator[HostileOpenAI]:
    srv = HostileOpenAI()
    yield srv
    srv.stop()


def _workspace(tmp_path: Path, srv: HostileOpenAI) -> Workspace:
    """alpha and beta, three requests each with the same custom_ids; beta's prompts differ."""
    provider = {
        "type": "openai",
        "baseUrl": srv.v1,
        "apiKeyEnv": KEY_ENV,
        "options": {"maxRetries": 0},
    }
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": provider},
        resources=(ResourceSpec("alpha"), ResourceSpec("beta")),
    )
    lines = [json.loads(line) for line in ws.input_path("beta").read_text().splitlines()]
    for line in lines:
        line["body"]["messages"][0]["content"] += " (beta)"
    ws.write_input("beta", lines)
    return ws


def _batch_id(ws: Workspace, name: str) -> str:
    """The remote id of ``name``'s (only) batch."""
    with ws.store() as store:
        (batch,) = store.batches(store.generations(name)[0].id)
    assert batch.remote_id is not None
    return batch.remote_id


def _answers(ws: Workspace, name: str) -> list[str]:
    return [o["response"]["body"]["choices"][0]["message"]["content"] for o in ws.outputs(name)]


def _beta_answered_with_alphas_batch(
    server: HostileOpenAI, seen: SeenRequest, reply: Reply
) -> Reply:
    created = json.loads(reply.body)
    if created["metadata"]["batchspec_resource"] == "beta":
        return Reply.of(server.batches["batch_1"])
    return reply


def test_a_create_answered_with_another_batch_adopts_its_own_and_keeps_its_answers(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """beta's create is answered with alpha's batch (a gateway's cache, a retried create
    answered with the first one's): it is not bound to beta (whose results would be alpha's
    answers, and whose own batch, made and paid for, never collected); beta's own batch is
    found by its key and adopted, no third create is sent, and each resource's results
    answer its own prompts."""
    ws = _workspace(tmp_path, hostile)
    assert run_cli(["apply", str(ws.root), "--yes", "-s", "alpha"], capsys)[0] == 0
    hostile.hooks["POST /v1/batches"] = _beta_answered_with_alphas_batch
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)
    assert code == 0, out + err
    assert "Traceback" not in err
    assert hostile.creates() == 2
    with ws.store() as store:
        remote_ids = {
            name: [b.remote_id for b in store.batches(store.generations(name)[0].id)]
            for name in ("alpha", "beta")
        }
    assert remote_ids == {"alpha": ["batch_1"], "beta": ["batch_2"]}
    assert all("(beta)" in answer for answer in _answers(ws, "beta"))
    assert not any("(beta)" in answer for answer in _answers(ws, "alpha"))


def test_a_poll_answered_with_another_batch_records_nothing_of_it(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """A poll of alpha's batch answered with beta's (ended, its output file named): nothing
    of it is recorded (alpha's batch stays in flight, with no file id; exit 1, no
    traceback); once the provider answers right, the next apply collects alpha's own
    answers, and nothing was created again."""
    hostile.initial_status = "in_progress"
    ws = _workspace(tmp_path, hostile)
    for name in ("alpha", "beta"):  # alpha's batch is batch_1, beta's batch_2
        assert run_cli(["apply", str(ws.root), "--yes", "-s", name], capsys)[0] == 0
    hostile.finish_all()

    def beta_for_alpha(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        return Reply.of(server.batches["batch_2"]) if "batch_1" in seen.path else reply

    hostile.hooks["GET /v1/batches/{id}"] = beta_for_alpha
    hostile.hooks["GET /v1/batches"] = _listing_with_beta_for_alpha
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 1, out + err
    assert "another batch" in err
    assert "Traceback" not in err
    with ws.store() as store:
        (alpha,) = store.batches(store.generations("alpha")[0].id)
    assert (alpha.status, alpha.output_file_id) == ("in_progress", None)
    hostile.hooks.clear()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)
    assert code == 0, out + err
    assert hostile.creates() == 2
    assert not any("(beta)" in answer for answer in _answers(ws, "alpha"))
    assert all("(beta)" in answer for answer in _answers(ws, "beta"))


def test_an_output_file_served_empty_for_a_batch_counted_completed_is_not_taken_as_unanswered(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """alpha's batch ends ``completed`` with its three requests counted completed, and its
    output file is served with HTTP 200 and no body: nothing is recorded and nothing sent
    again (taken as three unanswered requests, they were retried twice, paid three times, and
    alpha ended Degraded); the next apply, once the file is served, collects it."""
    ws = _workspace(tmp_path, hostile)
    hostile.hooks["GET /v1/files/{id}/content"] = lambda server, seen, reply: Reply(200, b"")
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", "-s", "alpha"], capsys)
    assert code == 1, out + err
    assert "served the output file of batch batch_1 empty" in out + err
    assert hostile.creates() == 1
    with ws.store() as store:
        (alpha,) = store.batches(store.generations("alpha")[0].id)
    assert alpha.collected_at is None
    hostile.hooks.clear()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "-s", "alpha"], capsys)
    assert code == 0, out + err
    assert hostile.creates() == 1
    assert len(_answers(ws, "alpha")) == 3


def _without_counts(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
    """A batch object (or listing) with its request counts left out, as Together's jobs are."""
    body = json.loads(reply.body)
    if body.get("object") == "list":
        return Reply.of({**body, "data": [{**b, "request_counts": None} for b in body["data"]]})
    return Reply.of({**body, "request_counts": None}) if body.get("object") == "batch" else reply


def test_an_output_file_served_empty_for_a_completed_batch_without_counts_is_not_recorded(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """alpha's batch ends ``completed`` with no request counts (Together's jobs carry none)
    and no error file, and its output file is served with HTTP 200 and no body: a completed
    batch answered each request in one of its files, so nothing is recorded and nothing sent
    again (taken as three unanswered requests, they were sent again and paid for twice); the
    next apply, once the file is served, collects it."""
    ws = _workspace(tmp_path, hostile)
    for route in ("POST /v1/batches", "GET /v1/batches/{id}", "GET /v1/batches"):
        hostile.hooks[route] = _without_counts
    hostile.hooks["GET /v1/files/{id}/content"] = lambda server, seen, reply: Reply(200, b"")
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", "-s", "alpha"], capsys)
    assert code == 1, out + err
    assert "served the output file of batch batch_1 empty" in out + err
    assert hostile.creates() == 1
    del hostile.hooks["GET /v1/files/{id}/content"]
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "-s", "alpha"], capsys)
    assert code == 0, out + err
    assert hostile.creates() == 1
    assert len(_answers(ws, "alpha")) == 3


def _listing_with_beta_for_alpha(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
    """The listing, with alpha's row replaced by beta's batch (polls may read the list)."""
    page: dict[str, Any] = json.loads(reply.body)
    page["data"] = [server.batches["batch_2"] if r["id"] == "batch_1" else r for r in page["data"]]
    return Reply.of(page)


def test_a_key_a_gateway_quotes_in_a_batchs_errors_is_not_recorded_or_shown(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """A create answered with the batch ``failed`` and a validation error quoting the
    request's Authorization header: the key is in no line apply writes, not in the state
    (its ``provider_errors``, its ``collect`` event) and not in ``history --json``."""
    ws = _workspace(tmp_path, hostile)

    def failed_quoting_the_key(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        said = f"invalid auth: {seen.headers['authorization']}"
        batch = json.loads(reply.body)
        batch.update(status="failed", output_file_id=None)
        batch["errors"] = {"data": [{"code": "bad_auth", "message": said, "param": said}]}
        return Reply.of(batch)

    hostile.hooks["POST /v1/batches"] = failed_quoting_the_key
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", "-s", "alpha"], capsys)
    assert code == 4, out + err
    assert "invalid auth: Bearer [redacted]" in out
    _, history, _ = run_cli(["history", str(ws.root), "--json"], capsys)
    for text in (out, err, history):
        assert SENTINEL_KEY not in text
    assert SENTINEL_KEY.encode() not in ws.state_bytes()


@pytest.mark.parametrize(
    ("trimmed_away", "said"),
    [
        pytest.param({"output_file_id": None}, "names no output file", id="no-output-file"),
        pytest.param(
            {"output_file_id": None, "error_file_id": None, "request_counts": None},
            "names neither an output nor an error file",
            id="no-counts-no-file",
        ),
    ],
)
def test_a_batch_completed_without_its_files_is_polled_again_not_retried(
    tmp_path: Path,
    hostile: HostileOpenAI,
    capsys: pytest.CaptureFixture[str],
    trimmed_away: dict[str, Any],
    said: str,
) -> None:
    """Polls answer alpha's batch ``completed`` without the file its answers are in: its
    three requests counted completed with ``output_file_id`` null (a gateway trimming the
    object, or a provider still writing the file), or no ``request_counts`` and neither file
    (Together's jobs carry no counts). It is kept in flight (``finalizing``, said once), not
    recorded ended (then collected with nothing, never polled again, and its three requests
    sent again and paid for again), and beta beside it is collected all the same; once the
    object is whole, the same ``apply --wait`` collects alpha."""
    hostile.initial_status = "in_progress"
    ws = _workspace(tmp_path, hostile)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    hostile.finish_all()
    polls = {"alpha": 0}
    alpha_id = _batch_id(ws, "alpha")

    def trimmed(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        body = json.loads(reply.body)
        if body["id"] != alpha_id:
            return reply
        polls["alpha"] += 1
        return Reply.of({**body, **trimmed_away}) if polls["alpha"] <= 3 else reply

    hostile.hooks["GET /v1/batches/{id}"] = trimmed
    hostile.hooks["GET /v1/batches"] = lambda server, seen, reply: Reply(500, b"{}")  # by id
    wait = ["--wait", "--timeout", "30", "--poll-interval", "0.05"]
    code, out, err = run_cli(["apply", str(ws.root), "--yes", *wait], capsys)
    assert code == 0, out + err
    assert (out + err).count(said) == 1, out + err
    assert hostile.creates() == 2 and polls["alpha"] > 3
    assert len(_answers(ws, "alpha")) == 3 and len(_answers(ws, "beta")) == 3


def test_a_batch_whose_completed_counts_its_failures_too_ends_as_it_says(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server whose ``completed`` counts every finished request (total 3, completed 3,
    failed 3: each failed, an error file only) ended as it says: alpha is collected
    Degraded (exit 4), not kept waiting for an output file that will never come, and beta
    is collected beside it."""
    hostile.initial_status = "in_progress"
    ws = _workspace(tmp_path, hostile)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    hostile.finish_all()
    alpha_id = _batch_id(ws, "alpha")
    failures = [
        {
            "id": f"batch_req_{cid}",
            "custom_id": cid,
            "response": {"status_code": 400, "body": {"error": {"message": "bad", "type": "x"}}},
            "error": None,
        }
        for cid in ("req-0", "req-1", "req-2")
    ]
    errors = hostile.add_file(jsonl(failures))

    def all_failed(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        body = json.loads(reply.body)
        if body.get("id") != alpha_id:
            return reply
        counts = {"total": 3, "completed": 3, "failed": 3}
        return Reply.of(
            {**body, "output_file_id": None, "error_file_id": errors, "request_counts": counts}
        )

    hostile.hooks["GET /v1/batches/{id}"] = all_failed
    hostile.hooks["GET /v1/batches"] = lambda server, seen, reply: Reply(500, b"{}")  # by id
    wait = ["--wait", "--timeout", "30", "--poll-interval", "0.05"]
    code, out, err = run_cli(["apply", str(ws.root), "--yes", *wait], capsys)
    assert code == 4, out + err
    assert "names no output file" not in out + err
    assert len(_answers(ws, "beta")) == 3 and _answers(ws, "alpha") == []


def test_a_request_answered_twice_in_one_file_is_said_not_passed_over(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output file answering ``req-0`` twice, differently: the first answer is kept (as
    before), and the collect line and its event say a line repeated a custom_id, instead
    of the run reporting Healthy as if the file were sound."""
    ws = _workspace(tmp_path, hostile)

    def answered_twice(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        return Reply(200, jsonl([answer_line("req-0", "first")]) + reply.body)

    hostile.hooks["GET /v1/files/{id}/content"] = answered_twice
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", "-s", "alpha"], capsys)
    assert code == 0, out + err
    assert "1 line answered a custom_id its file had already answered" in out
    assert _answers(ws, "alpha")[0] == "first"
    with ws.store() as store:
        (collect,) = store.events(resource="alpha", action="collect")
    assert collect.detail["repeated"] == 1


@pytest.mark.parametrize(
    ("parse", "data"),
    [
        pytest.param(
            parse_message_batch,
            {
                "id": "msgbatch_1",
                "processing_status": "ended",
                "request_counts": {"succeeded": "x"},
            },
            id="anthropic-count-as-text",
        ),
        pytest.param(
            parse_job,
            {"id": "job_1", "status": "SUCCESS", "created_at": float("inf"), "total_requests": []},
            id="mistral-infinite-time",
        ),
        pytest.param(
            parse_operation,
            {"name": "batches/1", "metadata": {"batchStats": {"requestCount": float("inf")}}},
            id="gemini-infinite-count",
        ),
    ],
)
def test_other_dialects_read_wrong_types_leniently(
    parse: Callable[..., RemoteBatch], data: dict[str, Any]
) -> None:
    """Anthropic's, Mistral's and Gemini's batch objects with a count that is text, an array
    or NaN, or a time of Infinity, are read (a count of 0, no time) rather than raised as a
    bare ValueError or OverflowError: a traceback ended the run."""
    args = (data, None) if parse is parse_message_batch else (data,)
    assert parse(*args).id


@pytest.mark.parametrize(
    ("parse", "data"),
    [
        pytest.param(parse_message_batch, {"processing_status": "ended"}, id="anthropic-no-id"),
        pytest.param(parse_job, {"id": None, "status": "SUCCESS"}, id="mistral-null-id"),
        pytest.param(
            parse_job, {"id": "job_1", "output_file": {"id": "f"}}, id="mistral-object-file"
        ),
    ],
)
def test_other_dialects_refuse_ids_that_cannot_be_used(
    parse: Callable[..., RemoteBatch], data: dict[str, Any]
) -> None:
    """An id that is missing, null or an object is a ``ProviderError``, not a KeyError
    traceback, a batch named ``None``, or a dict bound into the state (a database error)."""
    args = (data, None) if parse is parse_message_batch else (data,)
    with pytest.raises(ProviderError, match="not a"):
        parse(*args)


def _trimmed_everywhere(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
    """Every batch object with its output file left out (a gateway trimming them)."""
    if reply.status != 200:
        return reply
    body = json.loads(reply.body)
    if body.get("object") == "list":
        return Reply.of({**body, "data": [{**b, "output_file_id": None} for b in body["data"]]})
    return Reply.of({**body, "output_file_id": None}) if body.get("object") == "batch" else reply


def test_a_cancel_that_finds_a_batch_ended_without_its_file_keeps_it_finalizing(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cancel is refused (409: the batch ended) and the batch read back says completed,
    three requests done, no output file: recorded finalizing, not completed (collected then
    with nothing, its three answers taken as errors, and `--replace` paid for them again).
    Once the provider names the file, the answers are collected; no second batch."""
    hostile.initial_status = "in_progress"
    ws = _workspace(tmp_path, hostile)
    assert run_cli(["apply", str(ws.root), "--yes", "-s", "alpha"], capsys)[0] == 0
    hostile.finish_all()
    for route in ("GET /v1/batches/{id}", "GET /v1/batches", "POST /v1/batches/{id}/cancel"):
        hostile.hooks[route] = _trimmed_everywhere
    refusal = {"error": {"message": "completed", "type": "x", "code": "batch_not_cancellable"}}
    hostile.hooks["POST /v1/batches/{id}/cancel"] = lambda s, seen, r: Reply.of(refusal, 409)

    code, out, err = run_cli(["cancel", "alpha", str(ws.root)], capsys)

    assert code == 0, out + err
    with ws.store() as store:
        (alpha,) = store.batches(store.generations("alpha")[0].id)
    assert alpha.status == "finalizing", alpha
    hostile.hooks.clear()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "-s", "alpha"], capsys)
    assert code == 0, out + err
    assert len(_answers(ws, "alpha")) == 3 and hostile.creates() == 1


def _down_for(calls: int, then: Callable[[], None]) -> Callable[..., Reply]:
    """A hook answering 503 (a gateway with its provider down) to its first ``calls``
    requests, then calling ``then`` once and answering as the server does."""
    seen = {"n": 0}

    def hook(server: HostileOpenAI, _seen: SeenRequest, reply: Reply) -> Reply:
        seen["n"] += 1
        if seen["n"] <= calls:
            return Reply(503, b'{"error": {"message": "upstream unavailable"}}')
        if seen["n"] == calls + 1:
            then()
        return reply

    return hook


def test_apply_wait_waits_out_a_provider_down_for_a_while_and_collects_once_it_is_back(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Batches in flight, and their provider down (503 through every call's retries) for a
    few polls: `apply --wait --timeout` says so each time and keeps waiting, then collects
    when it is back; nothing is created again. A long CI wait ended at the first blip (exit
    1 after ~13 s of retries, whatever --timeout said)."""
    hostile.initial_status = "in_progress"
    ws = _workspace(tmp_path, hostile)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    down = _down_for(4, hostile.finish_all)
    hostile.hooks["GET /v1/batches"] = hostile.hooks["GET /v1/batches/{id}"] = down
    wait = ["--wait", "--timeout", "30", "--poll-interval", "0.05"]

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *wait], capsys)

    assert code == 0, out + err
    assert "`apply --wait` tries again in" in out + err and "until --timeout" in out + err
    assert hostile.creates() == 2
    assert len(_answers(ws, "alpha")) == 3 and len(_answers(ws, "beta")) == 3


def test_apply_wait_waits_out_a_rate_limit_past_the_retries_and_collects_after_it(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Batches in flight and the account throttled (429 with Retry-After, past the client's
    retries) for a few polls: `apply --wait --timeout` waits it out as an outage and collects
    once it passes; a throttled poll read nothing, so nothing is created again. A long CI
    wait ended at the first storm (exit 1)."""
    hostile.initial_status = "in_progress"
    ws = _workspace(tmp_path, hostile)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    seen = {"n": 0}

    def throttled(server: HostileOpenAI, _seen: SeenRequest, reply: Reply) -> Reply:
        seen["n"] += 1
        if seen["n"] <= 4:
            body = b'{"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}'
            return Reply(429, body, {"retry-after": "0.01"})
        if seen["n"] == 5:
            server.finish_all()
        return reply

    hostile.hooks["GET /v1/batches"] = hostile.hooks["GET /v1/batches/{id}"] = throttled
    wait = ["--wait", "--timeout", "30", "--poll-interval", "0.05"]

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *wait], capsys)

    assert code == 0, out + err
    [throttle, *_] = [line for line in (out + err).splitlines() if "HTTP 429" in line]
    assert "`apply --wait` tries again in" in throttle, throttle
    assert hostile.creates() == 2
    assert len(_answers(ws, "alpha")) == 3 and len(_answers(ws, "beta")) == 3


def test_apply_wait_on_a_provider_down_from_the_start_fails_at_once_without_a_timeout(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Down from the first call and no --timeout bounding the wait (a wrong base URL looks
    the same): exit 1 naming the provider, not a wait without end; with a --timeout that
    the outage outlasts, exit 5 (timed out), having said why it waited."""
    hostile.initial_status = "in_progress"
    ws = _workspace(tmp_path, hostile)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    hostile.hooks["GET /v1/batches"] = hostile.hooks["GET /v1/batches/{id}"] = (
        lambda server, seen, reply: Reply(503, b"{}")
    )
    fast = ["--wait", "--poll-interval", "0.05"]

    code, out, err = run_cli(["apply", str(ws.root), *fast], capsys)
    assert code == 1 and "tries again" not in out + err, out + err

    code, out, err = run_cli(["apply", str(ws.root), *fast, "--timeout", "1"], capsys)
    assert code == 5, out + err
    assert "tries again" in out + err


def _listing_with_stale_copies(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
    """The listing, each batch on it listed a second time right after, as it was before it
    ended (a gateway whose pages mix a cache's rows with the current ones)."""
    page: dict[str, Any] = json.loads(reply.body)
    rows = [
        copy
        for row in page["data"]
        for copy in (row, {**row, "status": "in_progress", "output_file_id": None})
    ]
    return Reply.of({**page, "data": rows})


def test_a_listing_showing_an_ended_batch_again_as_running_collects_it(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """A listing that shows each ended batch twice, the second time stale (running): the
    ended copy is taken (an ended batch never runs again), as when two segments of a listing
    disagree; the last copy on a page was taken, and the batch not read by id that pass was
    left in flight, its answers ready, pass after pass."""
    hostile.initial_status = "in_progress"
    ws = _workspace(tmp_path, hostile)
    for name in ("alpha", "beta"):  # listed beta first; alpha is the one read by id
        assert run_cli(["apply", str(ws.root), "--yes", "-s", name], capsys)[0] == 0
    hostile.finish_all()
    hostile.hooks["GET /v1/batches"] = _listing_with_stale_copies

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, out + err
    assert len(_answers(ws, "alpha")) == 3 and len(_answers(ws, "beta")) == 3
    assert hostile.creates() == 2


def _hung_workspace(tmp_path: Path, srv: HostileOpenAI, count: int) -> Workspace:
    """``count`` resources on a provider whose calls time out after 3 s, retried 3 times."""
    provider = {
        "type": "openai",
        "baseUrl": srv.v1,
        "apiKeyEnv": KEY_ENV,
        "options": {"timeout": 3, "maxRetries": 3},
    }
    resources = [ResourceSpec(f"r{i}", provider="srv") for i in range(count)]
    return make_workspace(tmp_path / "ws", providers={"srv": provider}, resources=resources)


def test_a_download_stalled_mid_body_ends_apply_at_its_timeout(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output file sent half, its full Content-Length promised: each attempt waited its
    3 s read timeout, four times, and `apply --wait --timeout 1` ended after ~16 s with exit
    1. Every call is cut to what --timeout leaves: exit 5 soon after it, and the next apply
    collects everything without creating anything again."""
    import time

    hostile.initial_status = "in_progress"
    ws = _hung_workspace(tmp_path, hostile, 4)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    hostile.finish_all()
    victim = hostile.outputs["batch_1"]

    def stall(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        if victim in seen.path:
            half = reply.body[: len(reply.body) // 2]
            return Reply(200, half, {"Content-Length": str(len(reply.body))})
        return reply

    hostile.hooks["GET /v1/files/{id}/content"] = stall
    started = time.monotonic()
    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--timeout", "1"], capsys)
    took = time.monotonic() - started
    assert code == 5, (out, err)
    assert took < 3, took  # one cut read, not four 3 s timeouts and their backoff
    hostile.hooks.clear()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert hostile.creates() == 4
    assert all(ws.output_path(f"r{i}").is_file() for i in range(4))


def test_a_provider_that_never_answers_a_poll_is_a_timeout_not_a_failure(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Polls and listings that hang: `apply --wait --timeout 1` failed the first pass (exit
    1) after its calls' own timeouts and retries; it stops at its timeout, exit 5."""
    import time

    hostile.initial_status = "in_progress"
    ws = _hung_workspace(tmp_path, hostile, 2)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0

    def hang(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        time.sleep(5)
        return reply

    hostile.hooks["GET /v1/batches"] = hang
    hostile.hooks["GET /v1/batches/{id}"] = hang
    started = time.monotonic()
    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--timeout", "1"], capsys)
    assert code == 5, (out, err)
    assert time.monotonic() - started < 3
    assert "--timeout" in out


def test_an_earlier_attempts_stored_file_damaged_before_the_results_are_written_is_not_used(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attempt 1's output file is in the result store while attempt 2 runs; its stored copy
    is damaged on disk (one flipped bit) before attempt 2 ends. The results are written from
    the provider's file downloaded again, not from the damaged bytes (which were written
    and recorded as the results, so every later restore wrote them again), and nothing is
    created again."""
    hostile.initial_status = "in_progress"
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": {"type": "openai", "baseUrl": hostile.v1, "apiKeyEnv": KEY_ENV}},
        resources=(ResourceSpec("alpha"),),
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    output = hostile.outputs["batch_1"]  # its last request answered HTTP 500 (retryable)
    *whole, last = hostile.files[output].splitlines()
    failed = json.loads(last)
    failed["response"].update(status_code=500, body={"error": {"message": "overloaded"}})
    hostile.files[output] = b"\n".join([*whole, json.dumps(failed).encode()]) + b"\n"
    hostile.finish_all()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0  # collects, retries one
    assert hostile.creates() == 2
    (blob,) = [p for p in (ws.state_path.parent / "store").glob("??/*")]
    damaged = bytearray(blob.read_bytes())
    damaged[10] ^= 1
    blob.write_bytes(bytes(damaged))
    hostile.finish_all()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)
    assert code == 0, out + err
    assert [o["id"] for o in ws.outputs("alpha")] == [
        f"batch_req_{cid}" for cid in ws.input_ids("alpha")
    ]
    assert hostile.creates() == 2


def test_a_download_of_content_already_stored_damaged_replaces_the_damaged_copy(
    tmp_path: Path, hostile: HostileOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two resources whose output files are the same bytes share one stored copy; damaged
    on disk (one flipped bit) after the first is collected, the second's download (whole,
    hashed) replaces it, and the second's results are written from what came (they were
    written from the damaged copy, the download thrown away, and recorded as the results)."""
    hostile.initial_status = "in_progress"
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": {"type": "openai", "baseUrl": hostile.v1, "apiKeyEnv": KEY_ENV}},
        resources=(ResourceSpec("alpha"), ResourceSpec("beta")),
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    hostile.batches["batch_1"].update(status="completed", output_file_id=hostile.outputs["batch_1"])
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    (blob,) = [p for p in (ws.state_path.parent / "store").glob("??/*")]
    damaged = bytearray(blob.read_bytes())
    damaged[10] ^= 1
    blob.write_bytes(bytes(damaged))
    hostile.finish_all()
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0, out + err
    for name in ("alpha", "beta"):
        expected = [f"batch_req_{cid}" for cid in ws.input_ids(name)]
        assert [o["id"] for o in ws.outputs(name)] == expected, name
    assert blob.read_bytes() != bytes(damaged)
