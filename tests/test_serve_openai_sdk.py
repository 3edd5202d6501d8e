"""The engine's HTTP API driven by the official ``openai`` SDK, over real loopback HTTP."""

from __future__ import annotations

from collections import Counter

import httpx
import openai
import pytest
from servers import (
    jsonl_bytes,
    read_jsonl,
    request_lines,
    start_server,
    wait_for,
    wait_for_batch,
)

from batchspec.engine import BuiltinUpstream, Faults, FaultyUpstream, HttpUpstream
from batchspec.wire.outcomes import error_summary

CHAT = "/v1/chat/completions"


def upload(client: openai.OpenAI, lines: list, name: str = "input.jsonl") -> str:
    return client.files.create(file=(name, jsonl_bytes(lines)), purpose="batch").id


def create(client: openai.OpenAI, file_id: str, endpoint: str = CHAT, **metadata: str):
    return client.batches.create(
        input_file_id=file_id,
        endpoint=endpoint,
        completion_window="24h",
        metadata=metadata or None,
    )


def test_whole_cycle_upload_run_download_delete(serve_engine):
    """files.create → batches.create → retrieve until completed → content → delete, via the SDK."""
    server = serve_engine(api_key="sk-test")
    client = server.client()
    lines = request_lines(12)
    file = client.files.create(file=("input.jsonl", jsonl_bytes(lines)), purpose="batch")
    assert (file.object, file.purpose, file.filename) == ("file", "batch", "input.jsonl")
    assert file.bytes == len(jsonl_bytes(lines))

    batch = create(client, file.id, project="demo")
    assert batch.status == "validating"
    assert batch.metadata == {"project": "demo"}
    done = wait_for_batch(client, batch.id)

    assert done.status == "completed"
    assert done.request_counts.total == done.request_counts.completed == 12
    assert done.request_counts.failed == 0
    assert done.error_file_id is None
    for stamp in ("created_at", "in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(done, stamp) is not None, stamp
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens

    output = read_jsonl(client.files.content(done.output_file_id).text)
    assert sorted(r["custom_id"] for r in output) == sorted(line["custom_id"] for line in lines)
    for record in output:
        assert record["id"].startswith("batch_req_")
        assert record["error"] is None
        assert record["response"]["status_code"] == 200
        assert record["response"]["request_id"]
        body = record["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"].startswith("[builtin stand-in]")
    assert sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in output) == (
        done.usage.input_tokens
    )

    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output"
    assert client.files.delete(file.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file.id)


@pytest.mark.parametrize(
    ("endpoint", "object_key"),
    [
        pytest.param("/v1/embeddings", "data", id="embeddings"),
        pytest.param("/v1/responses", "output", id="responses"),
        pytest.param("/v1/completions", "choices", id="completions"),
        pytest.param("/v1/moderations", "results", id="moderations"),
    ],
)
def test_other_endpoints_run_on_the_builtin_stand_in(serve_engine, endpoint, object_key):
    """Every supported endpoint runs end to end and answers in its OpenAI shape."""
    client = serve_engine().client()
    batch = create(client, upload(client, request_lines(3, endpoint=endpoint)), endpoint)
    done = wait_for_batch(client, batch.id)
    assert done.status == "completed", done.errors
    bodies = [
        r["response"]["body"] for r in read_jsonl(client.files.content(done.output_file_id).text)
    ]
    assert len(bodies) == 3
    assert all(object_key in body for body in bodies)


def test_list_batches_paginates_newest_first(serve_engine):
    """batches.list with limit pages via after/has_more, newest first, each batch once."""
    client = serve_engine().client()
    file_id = upload(client, request_lines(1))
    created = [create(client, file_id, n=str(i)).id for i in range(5)]

    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == created[::-1][:2]
    assert first.has_more is True
    assert first.first_id == created[4] and first.last_id == created[3]
    seen = [b.id for b in client.batches.list(limit=2)]  # the SDK follows after=last_id
    assert seen == created[::-1]
    last = client.batches.list(limit=2, after=created[1])
    assert [b.id for b in last.data] == [created[0]]
    assert last.has_more is False


def test_list_files_filters_orders_and_pages(serve_engine):
    """files.list honours purpose, order and limit/after."""
    server = serve_engine()
    client = server.client()
    ids = [upload(client, request_lines(1, prefix=f"f{i}")) for i in range(3)]
    server.engine.create_file(b"{}", "notes.json", "user_data")
    listed = client.files.list(purpose="batch", order="asc", limit=2)
    assert [f.id for f in listed.data] == ids[:2]
    assert [f.id for f in client.files.list(purpose="batch", order="asc")] == ids
    raw = httpx.get(f"{server.v1}/files", params={"order": "desc", "limit": 1}).json()
    assert raw["object"] == "list" and raw["has_more"] is True
    assert raw["data"][0]["purpose"] == "user_data"


def test_errors_surface_as_sdk_exceptions(serve_engine):
    """400, 401, 404, 409, 422 come back in OpenAI's envelope and the SDK raises its classes."""
    server = serve_engine(api_key="sk-right")
    client = server.client()
    file_id = upload(client, request_lines(1))

    with pytest.raises(openai.AuthenticationError) as auth:
        server.client(api_key="sk-wrong").batches.list()
    assert auth.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_does_not_exist")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-does-not-exist")
    with pytest.raises(openai.BadRequestError) as bad:
        client.batches.create(
            input_file_id=file_id,
            endpoint=CHAT,
            completion_window="48h",  # type: ignore[arg-type]
        )
    assert bad.value.param == "completion_window"
    with pytest.raises(openai.BadRequestError):
        create(client, file_id, "/v1/not-an-endpoint")
    with pytest.raises(openai.UnprocessableEntityError):
        create(client, file_id, "/v1/images/generations")
    with pytest.raises(openai.NotFoundError):
        create(client, "file-missing")
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=101)

    done = wait_for_batch(client, create(client, file_id).id)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(done.id)


def test_azure_style_api_key_header_and_paths_without_v1(serve_engine):
    """The api-key header authorises too, and every route answers without the /v1 prefix."""
    server = serve_engine(api_key="sk-azure")
    listed = httpx.get(f"{server.base_url}/batches", headers={"api-key": "sk-azure"})
    assert listed.status_code == 200 and listed.json()["object"] == "list"
    missing = httpx.get(f"{server.base_url}/files/nope", headers={"api-key": "sk-azure"})
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.base_url}/batches").status_code == 401
    unknown = httpx.get(f"{server.v1}/nothing-here", headers={"api-key": "sk-azure"})
    assert unknown.status_code == 404 and "error" in unknown.json()


def test_upload_over_the_cap_is_413_and_leaves_nothing(serve_engine):
    """An upload past max_upload_bytes answers 413 and stores no file."""
    server = serve_engine(max_upload_bytes=2000)
    client = server.client()
    big = jsonl_bytes(request_lines(40))
    assert len(big) > 2000
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.jsonl", big), purpose="batch")
    assert err.value.status_code == 413
    with pytest.raises(openai.APIStatusError) as early:  # refused by Content-Length, unread
        client.files.create(file=("huge.jsonl", b"x" * 3_000_000), purpose="batch")
    assert early.value.status_code == 413
    assert client.files.list().data == []
    assert list((server.engine.data_dir / "tmp").iterdir()) == []


def test_repeated_create_returns_the_existing_batch(serve_engine):
    """A create repeated by a retrying proxy (same file, endpoint, metadata) returns one batch."""
    client = serve_engine().client()
    file_id = upload(client, request_lines(2))
    first = create(client, file_id, key="k1")
    again = client.batches.create(
        input_file_id=file_id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"key": "k1"},
        extra_headers={"x-stainless-retry-count": "1"},
    )
    other = create(client, file_id, key="k2")
    assert again.id == first.id
    assert other.id != first.id
    assert len(client.batches.list().data) == 2


def test_partial_upstream_failures_land_in_the_error_file(serve_engine):
    """Lines whose upstream keeps answering 500 go to the error file with status and body."""
    faults = Faults(error_500=0.4, sticky=True, seed=7)
    upstream = FaultyUpstream(BuiltinUpstream(), faults)
    client = serve_engine(upstream=upstream, max_attempts=2).client()
    lines = request_lines(20)
    expected_failed = {
        line["custom_id"] for line in lines if upstream.draw(line["custom_id"], 0) < 0.4
    }
    assert 0 < len(expected_failed) < 20

    done = wait_for_batch(client, create(client, upload(client, lines)).id)
    assert done.status == "completed"
    assert done.request_counts.failed == len(expected_failed)
    assert done.request_counts.completed == 20 - len(expected_failed)
    errors = read_jsonl(client.files.content(done.error_file_id).text)
    assert {r["custom_id"] for r in errors} == expected_failed
    for record in errors:
        assert record["error"] is None
        assert record["response"]["status_code"] == 500
        assert record["response"]["body"]["error"]["type"] == "server_error"
    output = read_jsonl(client.files.content(done.output_file_id).text)
    assert {r["custom_id"] for r in output}.isdisjoint(expected_failed)
    assert all(upstream.calls[cid] == 2 for cid in expected_failed)


def test_transient_5xx_and_429_are_retried_until_success(serve_engine):
    """The first two attempts fail (500), a 429 with Retry-After follows; all lines succeed."""
    upstream = FaultyUpstream(
        BuiltinUpstream(), Faults(fail_first=2, error_429=0.3, seed=3, retry_after=0.0)
    )
    client = serve_engine(upstream=upstream, max_attempts=10).client()
    lines = request_lines(10)
    done = wait_for_batch(client, create(client, upload(client, lines)).id)
    assert done.status == "completed"
    assert done.request_counts.completed == 10 and done.error_file_id is None
    assert all(upstream.calls[line["custom_id"]] >= 3 for line in lines)
    assert sum(upstream.calls.values()) > 30  # some 429s were retried too


def test_all_failed_batch_is_completed_without_output_file(serve_engine):
    """Every request failing gives completed, output_file_id None, error_file_id set."""
    upstream = FaultyUpstream(BuiltinUpstream(), Faults(error_500=1.0))
    client = serve_engine(upstream=upstream, max_attempts=2).client()
    done = wait_for_batch(client, create(client, upload(client, request_lines(4))).id)
    assert done.status == "completed"
    assert done.output_file_id is None
    assert done.error_file_id is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 4)
    assert len(read_jsonl(client.files.content(done.error_file_id).text)) == 4


def test_upstream_timeouts_become_request_timeout_errors(serve_engine):
    """A line whose upstream never answers ends with top-level error code request_timeout."""
    upstream = FaultyUpstream(BuiltinUpstream(), Faults(timeout=1.0))
    client = serve_engine(upstream=upstream, request_timeout=0.05, max_attempts=2).client()
    done = wait_for_batch(client, create(client, upload(client, request_lines(2))).id)
    errors = read_jsonl(client.files.content(done.error_file_id).text)
    assert [r["error"]["code"] for r in errors] == ["request_timeout"] * 2
    assert all(r["response"] is None for r in errors)
    assert all(upstream.calls[r["custom_id"]] == 2 for r in errors)


def test_upstream_client_error_is_recorded_once_with_its_body(serve_engine):
    """A 400 from the upstream is not retried: one call, status and body in the error file."""
    upstream = FaultyUpstream(BuiltinUpstream(), Faults())
    client = serve_engine(upstream=upstream).client()
    lines = request_lines(2)
    del lines[1]["body"]["messages"]
    done = wait_for_batch(client, create(client, upload(client, lines)).id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    [record] = read_jsonl(client.files.content(done.error_file_id).text)
    assert record["custom_id"] == lines[1]["custom_id"]
    assert record["response"]["status_code"] == 400
    assert record["response"]["body"]["error"]["param"] == "messages"
    assert upstream.calls == Counter({lines[0]["custom_id"]: 1, lines[1]["custom_id"]: 1})


def test_invalid_input_fails_with_line_numbers(serve_engine):
    """A bad input file ends failed, with errors.data naming code and line of each problem."""
    client = serve_engine().client()
    good = request_lines(4)
    good[3]["custom_id"] = good[0]["custom_id"]
    good[2]["url"] = "/v1/embeddings"
    text = [good[0], "{not json", good[2], good[3]]
    done = wait_for_batch(client, create(client, upload(client, text)).id)
    assert done.status == "failed"
    assert done.failed_at is not None
    problems = {(e.code, e.line) for e in done.errors.data}
    assert ("invalid_json_line", 2) in problems
    assert ("url_mismatch", 3) in problems
    assert ("duplicate_custom_id", 4) in problems
    assert done.output_file_id is None and done.error_file_id is None


def test_empty_input_fails_with_empty_file(serve_engine):
    """An empty input file fails validation with code empty_file and no line."""
    client = serve_engine().client()
    file_id = client.files.create(file=("empty.jsonl", b""), purpose="batch").id
    done = wait_for_batch(client, create(client, file_id).id)
    assert done.status == "failed"
    assert [(e.code, e.line) for e in done.errors.data] == [("empty_file", None)]


def test_cancel_mid_run_keeps_finished_and_cancels_the_rest(serve_engine):
    """Cancelling a running batch keeps finished outputs; the rest get batch_cancelled."""
    server = serve_engine(upstream=BuiltinUpstream(latency=0.05), concurrency=2)
    client = server.client()
    lines = request_lines(40)
    batch = create(client, upload(client, lines))
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 4)

    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    assert cancelled.cancelling_at is not None
    done = wait_for_batch(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    output = read_jsonl(client.files.content(done.output_file_id).text)
    errors = read_jsonl(client.files.content(done.error_file_id).text)
    assert len(output) >= 4
    assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}
    ids = [r["custom_id"] for r in output + errors]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)
    assert done.request_counts.completed == len(output)
    assert done.request_counts.failed == len(errors)
    assert client.batches.cancel(batch.id).status == "cancelled"  # repeating is harmless


def test_expiry_keeps_partial_output_and_expires_the_rest(serve_engine):
    """When the (shortened) window passes, the batch is expired with partial output."""
    server = serve_engine(
        upstream=BuiltinUpstream(latency=0.05), concurrency=2, completion_window_seconds=0.8
    )
    client = server.client()
    lines = request_lines(80)
    batch = create(client, upload(client, lines))
    assert batch.completion_window == "24h"
    done = wait_for_batch(client, batch.id)
    assert done.status == "expired" and done.expired_at is not None
    output = read_jsonl(client.files.content(done.output_file_id).text)
    errors = read_jsonl(client.files.content(done.error_file_id).text)
    assert 0 < len(output) < 80
    assert {r["error"]["code"] for r in errors} == {"batch_expired"}
    assert len(output) + len(errors) == 80


def test_restart_mid_batch_resumes_without_repeating_a_line(tmp_path, standin_upstream):
    """Stop the server mid-batch, start another on the same data: every line reaches the
    upstream exactly once and the batch completes."""
    upstream = standin_upstream(latency=0.05)
    data_dir = tmp_path / "engine"
    first = start_server(data_dir, upstream=HttpUpstream(upstream.v1), concurrency=2)
    try:
        client = first.client()
        lines = request_lines(40)
        batch = create(client, upload(client, lines))
        wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 6)
    finally:
        first.stop()
    assert first.engine.store  # closed engine keeps its data on disk
    sent_before_restart = sum(upstream.calls.values())
    assert sent_before_restart < 40

    second = start_server(data_dir, upstream=HttpUpstream(upstream.v1), concurrency=4)
    try:
        client = second.client()
        assert client.batches.retrieve(batch.id).status in (
            "in_progress",
            "finalizing",
            "completed",
        )
        done = wait_for_batch(client, batch.id)
        output = read_jsonl(client.files.content(done.output_file_id).text)
    finally:
        second.stop()
    assert done.status == "completed"
    assert done.request_counts.completed == 40
    assert sorted(r["custom_id"] for r in output) == sorted(line["custom_id"] for line in lines)
    assert len(upstream.calls) == 40
    assert max(upstream.calls.values()) == 1


@pytest.mark.parametrize(
    ("files", "data", "message"),
    [
        pytest.param({"purpose": (None, "batch")}, {}, "no file part", id="no-file"),
        pytest.param({"file": ("in.jsonl", b"{}\n")}, {}, "'purpose' is required", id="purpose"),
        pytest.param(
            {"file": ("in.jsonl", b"{}\n")},
            {"purpose": "batch", "expires_after[anchor]": "last_used_at"},
            "must be 'created_at'",
            id="anchor",
        ),
        pytest.param(
            {"file": ("in.jsonl", b"{}\n")},
            {
                "purpose": "batch",
                "expires_after[anchor]": "created_at",
                "expires_after[seconds]": "soon",
            },
            "must be an integer",
            id="seconds",
        ),
    ],
)
def test_an_upload_openai_would_refuse_is_a_400_and_stores_nothing(
    serve_engine, files, data, message
):
    """An upload without its file part or purpose, or with an expiry OpenAI does not take, is
    a 400 naming the field, and the bytes received are not kept as a file."""
    server = serve_engine(api_key="sk-test")
    answer = httpx.post(
        f"{server.base_url}/v1/files",
        headers={"Authorization": "Bearer sk-test"},
        files=files,
        data=data,
    )
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]
    assert server.engine.list_files(None)["data"] == []


def test_a_limit_that_is_not_an_integer_is_a_400(serve_engine):
    """Listing files or batches with a non-integer limit is a 400 naming the parameter."""
    server = serve_engine(api_key="sk-test")
    for path in ("/v1/files", "/v1/batches"):
        answer = httpx.get(
            f"{server.base_url}{path}",
            headers={"Authorization": "Bearer sk-test"},
            params={"limit": "many"},
        )
        assert answer.status_code == 400, path
        assert answer.json()["error"]["param"] == "limit"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({"endpoint": CHAT, "completion_window": "24h"}, "input_file_id", id="file"),
        pytest.param({"input_file_id": "FILE", "completion_window": "24h"}, "endpoint", id="ep"),
        pytest.param(
            {"input_file_id": "FILE", "endpoint": CHAT, "completion_window": "24h", "metadata": []},
            "metadata",
            id="metadata",
        ),
    ],
)
def test_a_batch_create_openai_would_refuse_is_a_400_naming_the_parameter(
    serve_engine, body, param
):
    """A batch create without an input file or endpoint, or with metadata that is not an
    object, is a 400 naming the parameter, and no batch is made."""
    server = serve_engine(api_key="sk-test")
    stored = server.engine.create_file(jsonl_bytes(request_lines(1)), "in.jsonl", "batch")
    if body.get("input_file_id") == "FILE":
        body = {**body, "input_file_id": stored["id"]}
    answer = httpx.post(
        f"{server.base_url}/v1/batches", headers={"Authorization": "Bearer sk-test"}, json=body
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert server.engine.list_batches(None, 100)["data"] == []


def test_files_the_engine_cannot_find_or_list_are_refused(serve_engine):
    """A file purpose OpenAI does not have, a list limit out of 1..10000, a delete of an
    unknown file, and the content of a file whose bytes were lost are 400/404 answers (a
    client is told, never served an empty file as if it were the input)."""
    server = serve_engine(api_key="sk-test")
    headers = {"Authorization": "Bearer sk-test"}
    url = f"{server.base_url}/v1/files"
    bad_purpose = httpx.post(
        url, headers=headers, files={"file": ("in.jsonl", b"{}\n")}, data={"purpose": "nope"}
    )
    assert bad_purpose.status_code == 400 and bad_purpose.json()["error"]["param"] == "purpose"
    assert httpx.get(url, headers=headers, params={"limit": "0"}).status_code == 400
    assert httpx.delete(f"{url}/file-unknown", headers=headers).status_code == 404

    stored = server.engine.create_file(jsonl_bytes(request_lines(1)), "in.jsonl", "batch")
    server.engine.file_content_path(stored["id"]).unlink()
    lost = httpx.get(f"{url}/{stored['id']}/content", headers=headers)
    assert lost.status_code == 404 and "no longer stored" in lost.json()["error"]["message"]


def test_an_engine_whose_upstream_is_another_serve_says_so_in_each_lines_error(tmp_path):
    """An engine pointed at another `batchspec serve` (a Batch API, not a model server) fails
    each line with an error that says so and what to point --upstream at, not a bare
    'Unknown request URL', short enough that the "first error" line of a Degraded resource
    (``error_summary``) shows the advice whole."""
    other = start_server(tmp_path / "other")
    engine = start_server(tmp_path / "engine", upstream=HttpUpstream(other.v1), max_attempts=1)
    try:
        client = engine.client()
        done = wait_for_batch(client, create(client, upload(client, request_lines(2))).id)
        errors = read_jsonl(client.files.content(done.error_file_id).text)
    finally:
        engine.stop()
        other.stop()
    assert done.request_counts.failed == 2
    messages = [e["response"]["body"]["error"]["message"] for e in errors]
    assert all("is `batchspec serve`, not a model server" in m for m in messages), messages
    assert all("point it at one" in m for m in messages)
    assert error_summary(errors[0]).endswith("or at 'builtin'."), error_summary(errors[0])
