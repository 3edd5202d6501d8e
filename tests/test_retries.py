"""Partial failure end to end: `batchspec apply --wait` against `batchspec serve` with faults.

Each test starts a real `batchspec serve` process with hidden fault flags and asserts on what
the *server* received (input files of every attempt, read back with the official openai
SDK), on the merged files and on the state's record. The engine's own per-line retries are
off (``--max-attempts 1``) so injected upstream failures land in the batch's error file,
where batchspec has to find and resubmit them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_faults import (
    apply_wait,
    custom_ids,
    error_code,
    in_input_order,
    received_batches,
    serve_processes,
    served_workspace,
)
from servers import FAST_ENGINE_OPTIONS, request_lines, wait_for
from workspaces import (
    KEY_ENV,
    ResourceSpec,
    make_workspace,
    openai_provider,
    run_cli,
    write_manifest,
)

from batchspec.core.reconcile.collect import SHORT_ATTEMPTS
from batchspec.engine import BuiltinUpstream, Engine
from batchspec.engine.app import create_app
from batchspec.engine.server import start_in_thread
from batchspec.state.ledger import RequestLedger


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_processes(tmp_path)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-not-checked")


def test_upstream_500s_are_retried_with_exactly_the_failed_ids(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """10% upstream 500s: every attempt k+1 the server received holds exactly the custom_ids
    that attempt k's error file failed with 500, in input order; the job converges with one
    result per request in input order and an empty errors file."""
    srv = serve("--fault-500", "0.1", "--fault-seed", "5", "--max-attempts", "1")
    ws = served_workspace(
        tmp_path / "ws", srv, ResourceSpec("triage", count=200, spec={"retry": {"maxAttempts": 6}})
    )
    ids = ws.input_ids("triage")

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    batches = received_batches(srv.client())
    assert [b.attempt for b in batches] == list(range(1, len(batches) + 1))
    assert all(b.shard == 0 for b in batches)
    first = batches[0]
    assert first.input_ids == ids
    assert 5 <= len(first.error_ids) <= 40  # ~10% of 200 failed: the retries had work to do
    assert len(batches) >= 2
    for done, retry in zip(batches, batches[1:], strict=False):
        assert {error_code(e) for e in done.errors} == {"http_500"}
        assert retry.input_ids == in_input_order(done.error_ids, ids)
        assert sorted(done.output_ids + done.error_ids) == sorted(done.input_ids)
    assert batches[-1].errors == []
    assert [r["custom_id"] for r in ws.outputs("triage")] == ids
    assert ws.errors("triage") == []
    with ws.store() as store:
        [gen] = store.generations("triage")
        assert (gen.status, gen.succeeded, gen.failed) == ("complete", 200, 0)
        intents = [e.detail for e in store.events(resource="triage") if e.action == "intent"]
    assert [i["requests"] for i in intents] == [len(b.input_ids) for b in batches]
    assert all("retry" in i["reason"] for i in intents[1:])


def test_an_expired_batch_keeps_its_partial_results_and_retries_the_rest(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch that expires mid-run: the lines it finished are collected (not sent again) and
    only its batch_expired lines go in the next attempt; the final output is complete."""
    srv = serve(
        "--completion-window-seconds",
        "1.5",
        "--upstream-latency",
        "0.1",
        "--concurrency",
        "2",
    )
    ws = served_workspace(
        tmp_path / "ws", srv, ResourceSpec("slow", count=50, spec={"retry": {"maxAttempts": 6}})
    )
    ids = ws.input_ids("slow")

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    batches = received_batches(srv.client())
    first = batches[0]
    assert first.status == "expired"
    assert 0 < len(first.output_ids) < 50  # partial output ...
    assert {error_code(e) for e in first.errors} == {"batch_expired"}  # ... and the rest expired
    assert batches[1].input_ids == in_input_order(first.error_ids, ids)
    sent = [cid for b in batches for cid in b.input_ids]
    answered = [cid for b in batches for cid in b.output_ids]
    assert sorted(answered) == sorted(ids)  # every request answered exactly once
    assert len(sent) - len(ids) == sum(len(b.error_ids) for b in batches[:-1])
    assert batches[-1].status == "completed" and batches[-1].errors == []
    assert [r["custom_id"] for r in ws.outputs("slow")] == ids
    assert ws.errors("slow") == []


def test_all_failed_ends_degraded_never_success(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every request 500s and maxAttempts is 2: two attempts, then Degraded: apply --wait exits
    4, the errors file holds every request in input order, status shows Degraded (and each
    batch's requests as failed, not only as ended), and a re-run is still Degraded (exit 4)
    without submitting anything more."""
    srv = serve("--fault-500", "1.0", "--max-attempts", "1")
    ws = served_workspace(
        tmp_path / "ws", srv, ResourceSpec("doomed", count=6, spec={"retry": {"maxAttempts": 2}})
    )
    ids = ws.input_ids("doomed")

    code, out, err = apply_wait(ws, capsys)

    assert code == 4, out + err
    batches = received_batches(srv.client())
    assert [(b.attempt, b.status, len(b.input_ids)) for b in batches] == [
        (1, "completed", 6),
        (2, "completed", 6),
    ]
    assert all(b.output_ids == [] for b in batches)
    assert ws.outputs("doomed") == []
    assert [r["custom_id"] for r in ws.errors("doomed")] == ids
    assert {error_code(r) for r in ws.errors("doomed")} == {"http_500"}
    with ws.store() as store:
        [gen] = store.generations("doomed")
        assert (gen.status, gen.succeeded, gen.failed) == ("degraded", 0, 6)
        [event] = [e for e in store.events(resource="doomed") if e.action == "results"]
    assert event.detail["degraded"] == (
        "6 request(s) unresolved after 2 attempt(s): attempts exhausted (retry.maxAttempts 2)"
    )

    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    [status] = json.loads(out)["resources"]
    assert status["health"] == "Degraded"
    assert status["succeeded"] == 0
    code, out, _ = run_cli(["status", str(ws.root)], capsys)
    assert out.count(" completed 6/6 (6 failed)") == 2, out  # ended, not answered: says so

    code, out, err = apply_wait(ws, capsys)
    assert code == 4, out + err
    assert len(received_batches(srv.client())) == 2


def test_an_unreachable_local_model_server_is_retried_as_a_server_error(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The engine's model server refuses every connection (its own attempts off): each answer
    is an ``upstream_unreachable`` error, which batchspec retries as a server error, so
    retry.maxAttempts 2 sends a second attempt with the same requests before Degraded, not
    one attempt failed for good."""
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = serve("--upstream", f"http://127.0.0.1:{port}/v1", "--max-attempts", "1")
    ws = served_workspace(
        tmp_path / "ws", srv, ResourceSpec("down", count=3, spec={"retry": {"maxAttempts": 2}})
    )

    code, out, err = apply_wait(ws, capsys)

    assert code == 4, out + err
    batches = received_batches(srv.client())
    assert [(b.attempt, len(b.input_ids)) for b in batches] == [(1, 3), (2, 3)]
    assert {error_code(r) for b in batches for r in b.errors} == {"upstream_unreachable"}
    with ws.store() as store:
        [event] = [e for e in store.events(resource="down") if e.action == "results"]
    assert "attempts exhausted" in event.detail["degraded"]


def test_a_partly_failed_job_with_attempts_exhausted_is_degraded(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """60% 500s and one retry leave some requests failed twice: what succeeded is written in
    input order, the rest is in errors, and the resource is Degraded with exit 4, not Healthy."""
    srv = serve("--fault-500", "0.6", "--fault-seed", "3", "--max-attempts", "1")
    ws = served_workspace(
        tmp_path / "ws", srv, ResourceSpec("flaky", count=30, spec={"retry": {"maxAttempts": 2}})
    )
    ids = ws.input_ids("flaky")

    code, out, err = apply_wait(ws, capsys)

    batches = received_batches(srv.client())
    still_failing = batches[-1].error_ids
    assert len(batches) == 2 and still_failing  # 0.6 * 0.6 of 30: some fail twice
    assert code == 4, out + err
    outputs = [r["custom_id"] for r in ws.outputs("flaky")]
    errors = [r["custom_id"] for r in ws.errors("flaky")]
    assert errors == in_input_order(still_failing, ids)
    assert outputs == [cid for cid in ids if cid not in set(still_failing)]
    with ws.store() as store:
        [gen] = store.generations("flaky")
    assert gen.status == "degraded"


def test_non_retryable_failures_are_final_and_not_resubmitted(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 400 (the upstream rejects an empty messages list) goes to errors at once: no second
    attempt is created for it, and the resource is Healthy (exit 0)."""
    srv = serve()
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("mixed", count=1))
    lines = request_lines(5, prefix="m")
    lines[2]["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
    ws.write_input("mixed", lines)

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    [batch] = received_batches(srv.client())
    assert batch.error_ids == ["m-2"]
    assert [r["custom_id"] for r in ws.errors("mixed")] == ["m-2"]
    assert ws.errors("mixed")[0]["response"]["status_code"] == 400
    assert [r["custom_id"] for r in ws.outputs("mixed")] == ["m-0", "m-1", "m-3", "m-4"]


def test_a_job_failed_for_good_without_a_retry_says_not_retryable(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every request answered 400 (not retryable): one attempt, Degraded, and the results
    message and event name the code as "not retryable", never "attempts exhausted"."""
    srv = serve()
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("bad", count=1))
    lines = request_lines(3, prefix="b")
    for line in lines:
        line["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
    ws.write_input("bad", lines)

    code, out, err = apply_wait(ws, capsys)

    assert code == 4, out + err
    assert len(received_batches(srv.client())) == 1
    with ws.store() as store:
        [event] = [e for e in store.events(resource="bad") if e.action == "results"]
    assert event.detail["degraded"].startswith("not retryable: ")
    assert "(3)" in event.detail["degraded"]
    assert f"degraded: {event.detail['degraded']}" in out
    assert "attempts exhausted" not in event.detail["degraded"]
    # the summary and status say why, from the errors file's first line (it only named it)
    first = ws.errors("bad")[0]
    message = first["response"]["body"]["error"]["message"]
    why = f"      first error: {first['custom_id']}: http_400: {message}"
    assert why in out, out
    code, out, _ = run_cli(["status", str(ws.root)], capsys)
    assert why in out, out
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    [status] = json.loads(out)["resources"]
    assert status["first_error"].startswith(why.split("first error: ")[1])


def test_an_error_summary_is_one_printable_line_of_bounded_length() -> None:
    """A provider's error text goes to a terminal: control characters become spaces, a long
    message is cut, and an HTTP error answer gives its body's code and message."""
    from batchspec.wire.outcomes import ERROR_SUMMARY_CHARS, error_summary

    hostile = {"custom_id": "r-1", "error": {"code": "bad", "message": "a\x1b[2J\nb" + "x" * 500}}
    text = error_summary(hostile)
    assert text.startswith("r-1: bad: a [2J b") and "\x1b" not in text and "\n" not in text
    assert len(text) <= len("r-1: bad: ") + ERROR_SUMMARY_CHARS
    answer = {"status_code": 400, "body": {"error": {"code": "invalid", "message": "no"}}}
    assert error_summary({"custom_id": "r-2", "response": answer}) == "r-2: invalid: no"
    assert error_summary({"custom_id": "r-3", "response": {"status_code": 503}}) == "r-3: http_503"


def test_token_limit_exceeded_is_requeued_without_using_an_attempt(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server refuses the first two batches with token_limit_exceeded: with maxAttempts 1
    the shard is still resubmitted (a requeue is not an attempt), each time only after the
    backoff (doubling), and the job converges."""
    srv = serve("--fault-token-limit", "2")
    ws = served_workspace(
        tmp_path / "ws",
        srv,
        ResourceSpec("queued", count=4, spec={"retry": {"maxAttempts": 1}}),
        requeueBackoffSeconds=0.5,
    )

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    batches = received_batches(srv.client())
    assert [b.status for b in batches] == ["failed", "failed", "completed"]
    for refused in batches[:2]:
        assert [e.code for e in refused.raw.errors.data] == ["token_limit_exceeded"]
    assert all(b.input_ids == ws.input_ids("queued") for b in batches)
    assert [r["custom_id"] for r in ws.outputs("queued")] == ws.input_ids("queued")
    with ws.store() as store:
        rows = store.batches()
        events = list(store.events(resource="queued"))
    # the wait before each resubmission, measured from when apply saw the refusal
    seen_failed = [
        e.at for e in events if e.action == "poll" and e.detail.get("status") == "failed"
    ]
    created = [e.at for e in events if e.action == "create"]
    assert len(seen_failed) == 2 and len(created) == 3
    waits = [_seconds(c) - _seconds(f) for f, c in zip(seen_failed, created[1:], strict=True)]
    assert waits[0] >= 0.5 - 0.05 and waits[1] >= 1.0 - 0.05, waits
    assert [r.attempt for r in rows] == [1, 2, 3]


@pytest.mark.parametrize(
    ("shard_line", "input_line"),
    [(7, 17), (1, 11), (10, 20)],
    ids=["middle", "first-line-of-shard", "last-line-of-shard"],
)
def test_a_batch_failing_validation_is_final_and_reported_with_input_lines(
    tmp_path: Path,
    serve: Any,
    capsys: pytest.CaptureFixture[str],
    shard_line: int,
    input_line: int,
) -> None:
    """The server rejects shard 2's file (one line too long, at line 7 of that shard = input
    line 17; also at the shard's first and last line): that shard's requests fail finally (no
    retry), the provider's line number is reported mapped back to the input, and the other
    shards' results are written."""
    srv = serve("--max-line-bytes", "400")
    spec = {"limits": {"maxRequestsPerBatch": 10}, "retry": {"maxAttempts": 3}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("big", count=25, spec=spec))
    lines = request_lines(25, prefix="v")
    lines[input_line - 1]["body"]["messages"][0]["content"] = "x" * 500
    ws.write_input("big", lines)
    ids = ws.input_ids("big")

    code, out, err = apply_wait(ws, capsys)

    batches = received_batches(srv.client())
    assert [(b.shard, b.attempt, b.status) for b in batches] == [
        (0, 1, "completed"),
        (1, 1, "failed"),
        (2, 1, "completed"),
    ]
    [problem] = batches[1].raw.errors.data
    assert problem.line == shard_line
    assert code == 0, out + err
    assert [r["custom_id"] for r in ws.errors("big")] == ids[10:20]
    assert [r["custom_id"] for r in ws.outputs("big")] == ids[:10] + ids[20:]
    with ws.store() as store:
        [collect] = [
            e.detail
            for e in store.events(resource="big")
            if e.action == "collect" and e.detail.get("status") == "failed"
        ]
        [gen] = store.generations("big")
        states = RequestLedger(store.db).state_counts(gen.id)
        codes = RequestLedger(store.db).failure_codes(gen.id)
    assert codes == {"line_too_large": 10}  # the provider's code, not a generic one
    assert collect["errors"][0]["line"] == shard_line
    assert collect["errors"][0]["input_line"] == input_line
    assert states == {"ok": 15, "failed": 10}
    assert f"input line {input_line}: the line is longer than 400 bytes" in out  # told


def _seconds(timestamp: str) -> float:
    from batchspec.state.store import parse_timestamp

    return parse_timestamp(timestamp).timestamp()


def test_a_batch_cancelled_by_someone_else_is_retried(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch cancelled on the provider by someone else (not `batchspec cancel`): its
    finished lines are kept, only its batch_cancelled lines go in the next attempt, and the
    job converges."""
    srv = serve("--upstream-latency", "0.1", "--concurrency", "1")
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("cut", count=12))
    ids = ws.input_ids("cut")
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0, out + err
    client = srv.client()
    [batch] = client.batches.list().data
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 3)
    client.batches.cancel(batch.id)

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    first, second = received_batches(client)
    assert first.status == "cancelled"
    assert 3 <= len(first.output_ids) < 12
    assert {error_code(e) for e in first.errors} == {"batch_cancelled"}
    assert second.input_ids == in_input_order(first.error_ids, ids)
    assert [r["custom_id"] for r in ws.outputs("cut")] == ids


class DropFromDownloads:
    """ASGI middleware: file downloads leave out the lines of these custom_ids, ``times``
    times each, as a provider that loses lines would. Everything else passes through
    untouched."""

    def __init__(self, app: Any, drop: set[str], times: int = 1) -> None:
        self.app = app
        self.drop = dict.fromkeys(drop, times)
        self.dropped: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/content"):
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        body = bytearray()

        async def buffered(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            kept = [line for line in bytes(body).splitlines(keepends=True) if self._keep(line)]
            data = b"".join(kept)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(data)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": data})

        await self.app(scope, receive, buffered)

    def _keep(self, line: bytes) -> bool:
        try:
            cid = json.loads(line).get("custom_id")
        except ValueError:
            return True
        if self.drop.get(cid):
            self.drop[cid] -= 1
            self.dropped.append(cid)
            return False
        return True


def test_requests_missing_from_both_files_are_resubmitted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A provider whose files lose two lines, on every download of the batch's file (it is
    downloaded ``SHORT_ATTEMPTS`` times: its counts say those were completed): those
    requests are in neither the output nor the error file, so they count as unresolved and
    exactly they are sent again."""
    engine = Engine(tmp_path / "engine", BuiltinUpstream(), **FAST_ENGINE_OPTIONS).start()
    app = DropFromDownloads(create_app(engine), {"req-2", "req-5"}, times=SHORT_ATTEMPTS)
    background = start_in_thread(app)
    try:
        ws = make_workspace(
            tmp_path / "ws",
            providers={"srv": openai_provider(f"{background.base_url}/v1", KEY_ENV)},
            resources=[ResourceSpec("lossy", count=8)],
        )

        code, out, err = apply_wait(ws, capsys)

        assert code == 0, out + err
        assert app.dropped == ["req-2", "req-5"] * SHORT_ATTEMPTS
        batches = sorted(
            engine.list_batches(None, 100)["data"],
            key=lambda b: int(b["metadata"]["batchspec_attempt"].partition("k")[0]),
        )
        assert len(batches) == 2
        retry_file = engine.file_content_path(batches[1]["input_file_id"]).read_bytes()
        assert custom_ids(retry_file) == ["req-2", "req-5"]
        assert [r["custom_id"] for r in ws.outputs("lossy")] == ws.input_ids("lossy")
        assert ws.errors("lossy") == []
    finally:
        background.stop()
        engine.close()


def test_a_degraded_resource_retries_again_when_max_attempts_is_raised(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """maxAttempts 1 leaves a job Degraded; raising retry.maxAttempts (not part of the spec
    hash) makes plan say retry for exactly the failed requests, and apply resubmits only those
    until the job converges: results rewritten whole, in input order, generation complete."""
    srv = serve("--fault-500", "0.6", "--fault-seed", "3", "--max-attempts", "1")
    ws = served_workspace(
        tmp_path / "ws", srv, ResourceSpec("flaky", count=30, spec={"retry": {"maxAttempts": 1}})
    )
    ids = ws.input_ids("flaky")
    code, out, err = apply_wait(ws, capsys)
    assert code == 4, out + err
    failed = [r["custom_id"] for r in ws.errors("flaky")]
    assert failed and len(received_batches(srv.client())) == 1

    write_manifest(ws, ResourceSpec("flaky", spec={"retry": {"maxAttempts": 8}}))
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    [action] = json.loads(out)["actions"]
    assert (action["action"], action["requests"]) == ("retry", len(failed)), out
    assert "attempt 2 of 8" in action["reason"]

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    batches = received_batches(srv.client())
    assert len(batches) >= 2
    assert batches[1].input_ids == in_input_order(failed, ids)
    assert [r["custom_id"] for r in ws.outputs("flaky")] == ids
    assert ws.errors("flaky") == []
    with ws.store() as store:
        [gen] = store.generations("flaky")
    assert (gen.status, gen.succeeded, gen.failed) == ("complete", 30, 0)


def test_exactly_one_request_failed_for_good_makes_the_job_degraded(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seed 0 makes exactly one of eight requests 500 (req-3) and maxAttempts 1 allows no
    retry: a single unanswered request must still end Degraded with exit 4 and say so, never
    "complete" (a job that silently dropped one paid-for answer)."""
    srv = serve("--fault-500", "0.1", "--fault-seed", "0", "--max-attempts", "1")
    ws = served_workspace(
        tmp_path / "ws", srv, ResourceSpec("one", count=8, spec={"retry": {"maxAttempts": 1}})
    )

    code, out, err = apply_wait(ws, capsys)

    assert code == 4, out + err
    [batch] = received_batches(srv.client())
    assert batch.error_ids == ["req-3"]
    assert [r["custom_id"] for r in ws.errors("one")] == ["req-3"]
    reason = "1 request(s) unresolved after 1 attempt(s): attempts exhausted (retry.maxAttempts 1)"
    assert f"degraded: {reason}" in out
    with ws.store() as store:
        [gen] = store.generations("one")
        [event] = [e for e in store.events(resource="one") if e.action == "results"]
    assert (gen.status, gen.succeeded) == ("degraded", 7)
    assert (event.detail["unresolved"], event.detail["degraded"]) == (1, reason)


def test_a_one_request_job_whose_request_failed_is_degraded(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job of one request answered 400 (final, nothing unresolved): no request succeeded, so
    it is Degraded (exit 4), "not retryable: http_400 (1)", not a complete job with no
    results."""
    srv = serve()
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("single", count=1))
    [line] = request_lines(1, prefix="s")
    line["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
    ws.write_input("single", [line])

    code, out, err = apply_wait(ws, capsys)

    assert code == 4, out + err
    with ws.store() as store:
        [gen] = store.generations("single")
        [event] = [e for e in store.events(resource="single") if e.action == "results"]
    assert (gen.status, gen.succeeded, gen.failed) == ("degraded", 0, 1)
    assert event.detail["degraded"] == "not retryable: http_400 (1)"
    assert "degraded: not retryable: http_400 (1)" in out


def _final_codes_job(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str], flags: list[str], count: int
) -> tuple[int, str, str]:
    """A job with retry.on empty (every failure final) against faults ``flags``; the lines the
    seeded draw leaves to the upstream carry no messages, so it answers them 400 and no
    request succeeds (which is what makes the job Degraded)."""
    srv = serve(*flags, "--max-attempts", "1", "--request-timeout", "0.5")
    ws = served_workspace(
        tmp_path / "ws", srv, ResourceSpec("codes", count=count, spec={"retry": {"on": []}})
    )
    lines = request_lines(count)
    for index in UNFAULTED[count]:
        lines[index]["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
    ws.write_input("codes", lines)
    code, out, err = apply_wait(ws, capsys)
    with ws.store() as store:
        [event] = [e for e in store.events(resource="codes") if e.action == "results"]
    assert len(received_batches(srv.client())) == 1  # nothing is retried
    return code, out + err, event.detail["degraded"]


# the lines each seeded fault draw leaves to the upstream (so answered 400 when empty)
UNFAULTED = {6: (3, 5), 8: (0, 1)}


def test_the_degraded_reason_names_three_final_codes_without_a_tail(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three distinct final codes (seed 20: three 500s, two 400s, one 429) and no success:
    the reason names all three with their counts, most frequent first, and claims no "more
    code(s)"."""
    flags = ["--fault-500", "0.3", "--fault-429", "0.3", "--fault-seed", "20"]
    code, out, reason = _final_codes_job(tmp_path, serve, capsys, flags, 6)
    assert code == 4, out
    assert reason == "not retryable: server_error (3), http_400 (2), rate_limit (1)"
    assert f"degraded: {reason}" in out


def test_the_degraded_reason_shows_three_codes_and_counts_the_rest(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Four distinct final codes (seed 62: three 500s, two 400s, two 429s, a timeout): the reason
    shows the three most frequent with their counts and "and 1 more code(s)" for the fourth,
    so a user reading apply's output or the history learns how many kinds of failure there
    were."""
    flags = ["--fault-500", "0.2", "--fault-429", "0.2", "--fault-timeout", "0.2"]
    code, out, reason = _final_codes_job(tmp_path, serve, capsys, [*flags, "--fault-seed", "62"], 8)
    assert code == 4, out
    assert reason == (
        "not retryable: server_error (3), http_400 (2), rate_limit (2) and 1 more code(s)"
    )
    assert f"degraded: {reason}" in out
