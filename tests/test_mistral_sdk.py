"""The official ``mistralai`` SDK as a client of our server's Mistral batch jobs dialect.

Real uvicorn on 127.0.0.1, the engine behind it (builtin stand-in upstream), the SDK's own
multipart upload, request building, query parameters and response models (mistralai 3.x).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import SDKError
from servers import EngineServer, wait_for

from batchspec.engine import BuiltinUpstream

KEY = "mistral-test-key-0123456789"
MODEL = "mistral-small-latest"
CHAT = "/v1/chat/completions"
DONE = ("SUCCESS", "FAILED", "CANCELLED", "TIMEOUT_EXCEEDED")
ServeEngine = Callable[..., EngineServer]


def client(server: EngineServer, key: str = KEY) -> Mistral:
    return Mistral(api_key=key, server_url=server.base_url, timeout_ms=10_000)


def lines(count: int, prefix: str = "r", **body: Any) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "body": {"messages": [{"role": "user", "content": f"Tell me about {i}."}], **body},
        }
        for i in range(count)
    ]


def upload(sdk: Mistral, tmp_path: Path, rows: list[dict[str, Any]], name: str = "in") -> str:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with open(path, "rb") as handle:
        made = sdk.files.upload(file={"file_name": path.name, "content": handle}, purpose="batch")
    return made.id


def done(sdk: Mistral, job_id: str) -> Any:
    return wait_for(lambda: (job := sdk.batch.jobs.get(job_id=job_id)).status in DONE and job)


def test_upload_create_get_and_download_the_output(
    serve_engine: ServeEngine, tmp_path: Path
) -> None:
    """files.upload (purpose batch) gives a Mistral file object; a job from two input files
    goes QUEUED/RUNNING -> SUCCESS with its counts, and the output file downloads as one
    OpenAI-shaped line per custom_id of both files."""
    sdk = client(serve_engine(api_key=KEY))
    first = upload(sdk, tmp_path, lines(2, "a"), "a")
    second = upload(sdk, tmp_path, lines(1, "b"), "b")
    retrieved = sdk.files.retrieve(file_id=first)
    assert (retrieved.purpose, retrieved.sample_type, retrieved.source) == (
        "batch",
        "batch_request",
        "upload",
    )
    assert retrieved.size_bytes > 0 and retrieved.deleted is False
    job = sdk.batch.jobs.create(
        input_files=[first, second],
        endpoint=CHAT,
        model=MODEL,
        metadata={"team": "triage"},
        timeout_hours=48,
    )
    assert job.status in ("QUEUED", "RUNNING") and job.input_files == [first, second]
    assert (job.model, job.metadata, job.total_requests) == (MODEL, {"team": "triage"}, 3)
    finished = done(sdk, job.id)
    assert finished.status == "SUCCESS" and finished.completed_at is not None
    assert (finished.succeeded_requests, finished.failed_requests) == (3, 0)
    assert finished.completed_requests == 3 and finished.error_file is None
    output = sdk.files.retrieve(file_id=finished.output_file)
    assert (output.sample_type, output.source) == ("batch_result", "mistral")
    content = sdk.files.download(file_id=finished.output_file).read().decode()
    answers = {row["custom_id"]: row for row in map(json.loads, content.splitlines())}
    assert sorted(answers) == ["a-0", "a-1", "b-0"]
    body = answers["b-0"]["response"]["body"]
    assert answers["b-0"]["response"]["status_code"] == 200
    assert "about 0" in body["choices"][0]["message"]["content"] and body["model"] == MODEL


def test_list_filters_by_metadata_and_status_and_pages(
    serve_engine: ServeEngine, tmp_path: Path
) -> None:
    """list's metadata filter (sent as extra query parameters) keeps only matching jobs;
    pages follow page/page_size with the total of all matches; OpenAI batches are not jobs."""
    server = serve_engine(api_key=KEY)
    sdk = client(server)
    file_id = upload(sdk, tmp_path, lines(1))
    made = [
        sdk.batch.jobs.create(
            input_files=[file_id], endpoint=CHAT, model=MODEL, metadata={"run": str(i % 2)}
        ).id
        for i in range(5)
    ]
    server.client().batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata={"run": "0"}
    )
    ones = sdk.batch.jobs.list(metadata={"run": "1"})
    assert [j.id for j in ones.data] == [made[3], made[1]] and ones.total == 2
    page = sdk.batch.jobs.list(page=1, page_size=2)
    assert page.total == 5 and [j.id for j in page.data] == [made[2], made[1]]
    oldest = sdk.batch.jobs.list(order_by="created", page_size=1)
    assert [j.id for j in oldest.data] == [made[0]]
    for job_id in made:
        done(sdk, job_id)
    assert sdk.batch.jobs.list(status=["SUCCESS"]).total == 5
    assert sdk.batch.jobs.list(status=["RUNNING", "QUEUED"]).total == 0


def test_cancel_requests_then_cancels(serve_engine: ServeEngine, tmp_path: Path) -> None:
    """cancel -> CANCELLATION_REQUESTED or CANCELLED at once, then CANCELLED; requests that
    never ran are in the error file; cancelling again returns the job unchanged."""
    server = serve_engine(api_key=KEY, upstream=BuiltinUpstream(latency=0.4), concurrency=1)
    sdk = client(server)
    job = sdk.batch.jobs.create(
        input_files=[upload(sdk, tmp_path, lines(5))], endpoint=CHAT, model=MODEL
    )
    asked = sdk.batch.jobs.cancel(job_id=job.id)
    assert asked.status in ("CANCELLATION_REQUESTED", "CANCELLED")
    finished = done(sdk, job.id)
    assert finished.status == "CANCELLED" and finished.error_file is not None
    errors = sdk.files.download(file_id=finished.error_file).read().decode().splitlines()
    assert errors and all(json.loads(e)["error"]["code"] == "batch_cancelled" for e in errors)
    assert sdk.batch.jobs.cancel(job_id=job.id).status == "CANCELLED"


@pytest.mark.parametrize(
    ("rows", "create", "fragment"),
    [
        pytest.param(lines(1), {"model": None}, "no model", id="no-model"),
        pytest.param(lines(1) + lines(1), {}, "used twice", id="duplicate-id"),
        pytest.param(lines(1), {"input_files": ["file-nope"]}, "No such file", id="unknown-file"),
        pytest.param(lines(1), {"endpoint": "/v1/ocr"}, "cannot run", id="endpoint-not-run"),
        pytest.param(lines(1), {"timeout_hours": 0}, "timeout_hours", id="timeout"),
    ],
)
def test_invalid_creates_are_refused_in_mistrals_error_body(
    serve_engine: ServeEngine,
    tmp_path: Path,
    rows: list[dict[str, Any]],
    create: dict[str, Any],
    fragment: str,
) -> None:
    """Creates Mistral would refuse answer 4xx (an SDKError) with Mistral's error body, and
    create nothing."""
    server = serve_engine(api_key=KEY)
    sdk = client(server)
    arguments = {"input_files": [upload(sdk, tmp_path, rows)], "endpoint": CHAT, "model": MODEL}
    with pytest.raises(SDKError) as raised:
        sdk.batch.jobs.create(**{**arguments, **create})
    assert 400 <= raised.value.status_code < 500
    body = json.loads(raised.value.body)
    assert body["object"] == "error" and fragment in body["message"]
    assert server.engine.list_batches(None, 100)["data"] == []


def test_a_line_model_serves_when_the_job_names_none(
    serve_engine: ServeEngine, tmp_path: Path
) -> None:
    """A job without a model runs each line with its body's model."""
    sdk = client(serve_engine(api_key=KEY))
    job = sdk.batch.jobs.create(
        input_files=[upload(sdk, tmp_path, lines(2, model="open-mistral-nemo"))], endpoint=CHAT
    )
    finished = done(sdk, job.id)
    content = sdk.files.download(file_id=finished.output_file).read().decode()
    assert {json.loads(r)["response"]["body"]["model"] for r in content.splitlines()} == {
        "open-mistral-nemo"
    }


def test_wrong_key_is_refused(serve_engine: ServeEngine) -> None:
    """A wrong bearer key is 401 on the job routes; an unknown job is 404."""
    server = serve_engine(api_key=KEY)
    with pytest.raises(SDKError) as raised:
        client(server, key="wrong-key-123").batch.jobs.list()
    assert raised.value.status_code == 401
    with pytest.raises(SDKError) as missing:
        client(server).batch.jobs.get(job_id="batch_nope")
    assert missing.value.status_code == 404
    answer = httpx.get(f"{server.base_url}/v1/batch/jobs", headers={"Authorization": "Bearer x"})
    assert answer.status_code == 401


_CHAT = "/v1/chat/completions"
_OK_LINE = {
    "custom_id": "a",
    "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
}


def _lines(*records: Any) -> bytes:
    return b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records
    )


@pytest.mark.parametrize(
    ("body", "content", "message"),
    [
        pytest.param(["x"], None, "must be a JSON object", id="not-object"),
        pytest.param({"requests": []}, None, "Inline requests", id="inline"),
        pytest.param({"input_files": [], "endpoint": _CHAT}, None, "input_files", id="no-files"),
        pytest.param({"endpoint": "/v1/nope"}, _lines(_OK_LINE), "endpoint: one of", id="endpoint"),
        pytest.param({"endpoint": _CHAT, "model": ""}, _lines(_OK_LINE), "model: a", id="model"),
        pytest.param(
            {"endpoint": _CHAT}, _lines(_OK_LINE, b"{oops"), "line 2: not valid", id="json"
        ),
        pytest.param(
            {"endpoint": _CHAT}, _lines({"custom_id": "a"}), "custom_id and body", id="body"
        ),
        pytest.param({"endpoint": _CHAT}, _lines(_OK_LINE, _OK_LINE), "used twice", id="twice"),
        pytest.param(
            {"endpoint": _CHAT},
            _lines({**_OK_LINE, "url": "/v1/embeddings"}),
            "url differs",
            id="url",
        ),
        pytest.param(
            {"endpoint": _CHAT},
            _lines({"custom_id": "a", "body": {"messages": []}}),
            "no model",
            id="no-model",
        ),
        pytest.param({"endpoint": _CHAT}, b"\n\n", "hold no requests", id="empty"),
    ],
)
def test_a_job_mistral_would_refuse_is_a_400_naming_the_line(
    serve_engine: ServeEngine, body: Any, content: bytes | None, message: str
) -> None:
    """A batch job Mistral refuses (inline requests, no input files, an unknown endpoint, an
    empty model; an input line that is not JSON, lacks custom_id/body, repeats a custom_id,
    names another url or no model; no line at all) is a 400 naming the field or the file
    and line, and no job is made (nothing runs on a half-read input)."""
    server = serve_engine(api_key=KEY)
    if content is not None:
        stored = server.engine.create_file(content, "in.jsonl", "batch")
        body = {**body, "input_files": [stored["id"]]}
    answer = httpx.post(
        f"{server.base_url}/v1/batch/jobs",
        headers={"Authorization": f"Bearer {KEY}"},
        json=body,
    )
    assert answer.status_code == 400, answer.text
    assert message in answer.text
    assert server.engine.list_batches(None, 100)["data"] == []


def test_mistral_job_listing_and_lookups_refuse_what_mistral_refuses(
    serve_engine: ServeEngine,
) -> None:
    """A page size out of 1..1000, a page that is not an integer and a created_after that is
    not ISO 8601 are 400s; an OpenAI batch of the same engine is no Mistral job (404); a
    cancel of a finished job answers it as it ended; an output file is no input (400)."""
    server = serve_engine(api_key=KEY)
    url = f"{server.base_url}/v1/batch/jobs"
    headers = {"Authorization": f"Bearer {KEY}"}
    for params in ({"page_size": "0"}, {"page": "one"}, {"created_after": "yesterday"}):
        assert httpx.get(url, headers=headers, params=params).status_code == 400, params
    stored = server.engine.create_file(_lines(_OK_LINE), "in.jsonl", "batch")
    openai_batch = server.engine.create_batch(stored["id"], _CHAT, "24h", {})
    assert httpx.get(f"{url}/{openai_batch['id']}", headers=headers).status_code == 404

    sdk = client(server)
    job = sdk.batch.jobs.create(input_files=[stored["id"]], endpoint=_CHAT, model="m")
    ended = wait_for(lambda: (j := sdk.batch.jobs.get(job_id=job.id)).status == "SUCCESS" and j)
    cancelled = httpx.post(f"{url}/{job.id}/cancel", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "SUCCESS"
    refused = httpx.post(
        url,
        headers=headers,
        json={"input_files": [ended.output_file], "endpoint": _CHAT, "model": "m"},
    )
    assert refused.status_code == 400 and "not 'batch'" in refused.text
