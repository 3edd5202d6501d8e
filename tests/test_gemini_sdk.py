"""The official ``google-genai`` SDK as a client of our server's Gemini Batch Mode dialect.

Real uvicorn on 127.0.0.1, the engine behind it (builtin stand-in upstream, or the stand-in
served over HTTP as an OpenAI-compatible upstream), the SDK's own request building, resumable
uploads, paging and response parsing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors, types
from servers import EngineServer, jsonl_bytes, request_lines, wait_for

from batchspec.engine import BuiltinUpstream, HttpUpstream
from batchspec.engine.gemini_upstream import chat_to_response, request_to_chat

KEY = "gemini-test-key-0123456789"
MODEL = "gemini-2.5-flash"
ServeEngine = Callable[..., EngineServer]
DONE = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")


def client(server: EngineServer, key: str = KEY) -> genai.Client:
    options = types.HttpOptions(base_url=server.base_url, api_version="v1beta", timeout=10_000)
    return genai.Client(api_key=key, http_options=options)


def requests(count: int, prefix: str = "r", **config: Any) -> list[dict[str, Any]]:
    return [
        {
            "contents": [{"role": "user", "parts": [{"text": f"Tell me about item {i}."}]}],
            "metadata": {"key": f"{prefix}-{i}"},
            **({"config": config} if config else {}),
        }
        for i in range(count)
    ]


def done(sdk: genai.Client, name: str) -> types.BatchJob:
    return wait_for(lambda: (job := sdk.batches.get(name=name)).state.name in DONE and job)


def test_inline_create_get_and_inlined_responses(serve_engine: ServeEngine) -> None:
    """Inline requests -> PENDING, then SUCCEEDED with one inlined response per request, in
    order, carrying its metadata, candidates and usage metadata."""
    sdk = client(serve_engine(api_key=KEY))
    job = sdk.batches.create(
        model=MODEL,
        src=requests(3, max_output_tokens=50, temperature=0.2, stop_sequences=["END"]),
        config={"display_name": "triage"},
    )
    assert job.name.startswith("batches/") and job.display_name == "triage"
    assert job.state.name in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert job.model == f"models/{MODEL}"
    finished = done(sdk, job.name)
    assert finished.state.name == "JOB_STATE_SUCCEEDED" and finished.end_time is not None
    inlined = finished.dest.inlined_responses
    assert [r.metadata for r in inlined] == [{"key": "r-0"}, {"key": "r-1"}, {"key": "r-2"}]
    response = inlined[1].response
    assert "item 1" in response.candidates[0].content.parts[0].text
    assert response.candidates[0].finish_reason.name == "STOP"
    assert response.usage_metadata.prompt_token_count > 0
    assert response.usage_metadata.candidates_token_count > 0


def test_resumable_upload_then_a_batch_from_the_file(
    serve_engine: ServeEngine, tmp_path: Path
) -> None:
    """files.upload (resumable, its chunks sent without the key) stores the file; a batch
    from its name ends with a responses file whose lines answer each key."""
    server = serve_engine(api_key=KEY)
    sdk = client(server)
    path = tmp_path / "requests.jsonl"
    lines = [
        {"key": f"k{i}", "request": {"contents": [{"parts": [{"text": f"Filed {i}"}]}]}}
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    uploaded = sdk.files.upload(
        file=str(path), config={"mime_type": "application/jsonl", "display_name": "reqs"}
    )
    assert uploaded.name.startswith("files/") and uploaded.size_bytes == path.stat().st_size
    assert sdk.files.get(name=uploaded.name).display_name == "reqs"
    job = sdk.batches.create(model=MODEL, src=uploaded.name)
    finished = done(sdk, job.name)
    assert finished.state.name == "JOB_STATE_SUCCEEDED"
    content = sdk.files.download(file=finished.dest.file_name)
    answers = {row["key"]: row for row in map(json.loads, content.decode().splitlines())}
    assert sorted(answers) == ["k0", "k1", "k2"]
    assert "Filed 2" in answers["k2"]["response"]["candidates"][0]["content"]["parts"][0]["text"]


def test_list_pages_newest_first(serve_engine: ServeEngine) -> None:
    """The SDK's pager follows nextPageToken through every Gemini batch, newest first; an
    OpenAI-dialect batch is not listed."""
    server = serve_engine(api_key=KEY)
    sdk = client(server)
    made = [sdk.batches.create(model=MODEL, src=requests(1, prefix=f"b{i}")).name for i in range(5)]
    openai_file = server.engine.create_file(
        b'{"custom_id":"x","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"a"}}\n',
        "in.jsonl",
        "batch",
    )
    server.engine.create_batch(openai_file["id"], "/v1/embeddings", "24h")
    listed = [job.name for job in sdk.batches.list(config={"page_size": 2})]
    assert listed == list(reversed(made))


def test_cancel_leaves_unrun_requests_cancelled(serve_engine: ServeEngine) -> None:
    """cancel -> CANCELLED; requests that never ran answer a CANCELLED status (code 1)."""
    server = serve_engine(api_key=KEY, upstream=BuiltinUpstream(latency=0.4), concurrency=1)
    sdk = client(server)
    job = sdk.batches.create(model=MODEL, src=requests(5))
    sdk.batches.cancel(name=job.name)
    finished = done(sdk, job.name)
    assert finished.state.name == "JOB_STATE_CANCELLED"
    errors_seen = [r.error for r in finished.dest.inlined_responses if r.error]
    assert errors_seen and all(e.code == 1 for e in errors_seen)  # google.rpc CANCELLED
    assert all(e.details == ["BATCH_CANCELLED"] for e in errors_seen)


def test_delete_only_once_done(serve_engine: ServeEngine) -> None:
    """Deleting a running batch is refused (400); a done one is deleted and then 404."""
    server = serve_engine(api_key=KEY, upstream=BuiltinUpstream(latency=0.3), concurrency=1)
    sdk = client(server)
    job = sdk.batches.create(model=MODEL, src=requests(2))
    with pytest.raises(errors.ClientError) as refused:
        sdk.batches.delete(name=job.name)
    assert refused.value.code == 400
    done(sdk, job.name)
    sdk.batches.delete(name=job.name)
    with pytest.raises(errors.ClientError) as gone:
        sdk.batches.get(name=job.name)
    assert gone.value.code == 404


@pytest.mark.parametrize(
    ("src", "fragment"),
    [
        pytest.param(requests(1) + requests(1), "used twice", id="duplicate-key"),
        pytest.param("files/file-nope", "No such file", id="unknown-file"),
    ],
)
def test_invalid_creates_are_refused_in_googles_envelope(
    serve_engine: ServeEngine, src: Any, fragment: str
) -> None:
    """Creates Gemini would refuse answer a 4xx ClientError with Google's error status."""
    sdk = client(serve_engine(api_key=KEY))
    with pytest.raises(errors.ClientError) as raised:
        sdk.batches.create(model=MODEL, src=src)
    assert fragment in str(raised.value.message)
    assert raised.value.status in ("INVALID_ARGUMENT", "NOT_FOUND")


def test_a_request_without_contents_is_a_400_in_googles_envelope(
    serve_engine: ServeEngine,
) -> None:
    """(The SDK refuses empty contents itself; sent raw) the create answers 400 with
    Google's {"error": {code, message, status}} and creates nothing."""
    server = serve_engine(api_key=KEY)
    answer = httpx.post(
        f"{server.base_url}/v1beta/models/{MODEL}:batchGenerateContent",
        headers={"x-goog-api-key": KEY},
        json={"batch": {"input_config": {"requests": {"requests": [{"request": {}}]}}}},
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert "contents" in error["message"]
    assert server.engine.list_batches(None, 100)["data"] == []


def test_wrong_key_is_refused_and_upload_sessions_need_their_id(
    serve_engine: ServeEngine,
) -> None:
    """A wrong x-goog-api-key is 401 UNAUTHENTICATED; an upload chunk without a valid
    session id gets nowhere, with or without a key."""
    server = serve_engine(api_key=KEY)
    wrong = client(server, key="wrong-key-123")
    with pytest.raises(errors.ClientError) as raised:
        list(wrong.batches.list())
    assert raised.value.code == 401 and raised.value.status == "UNAUTHENTICATED"
    forged = httpx.post(
        f"{server.base_url}/upload/v1beta/files?upload_id=guess",
        headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"},
        content=b"{}\n",
    )
    assert forged.status_code == 404
    assert server.engine.list_files()["data"] == []


def test_an_openai_compatible_upstream_runs_gemini_requests_as_chat(
    serve_engine: ServeEngine, standin_upstream: Callable[..., Any]
) -> None:
    """Over an HTTP upstream serving only OpenAI routes, each Gemini request reaches it as a
    chat completion and comes back as a GenerateContentResponse."""
    upstream = standin_upstream()
    server = serve_engine(api_key=KEY, upstream=HttpUpstream(upstream.v1))
    sdk = client(server)
    job = sdk.batches.create(
        model=MODEL,
        src=[
            {
                "contents": [{"role": "user", "parts": [{"text": "Hello"}]}],
                "config": {"system_instruction": "Be kind."},
            }
        ],
    )
    finished = done(sdk, job.name)
    [answer] = finished.dest.inlined_responses
    assert answer.response.candidates[0].content.parts[0].text.startswith("[builtin stand-in]")
    assert sum(upstream.calls.values()) == 1


def test_requests_map_to_chat_and_back() -> None:
    """The engine-side mapping: system instruction, roles, inline images, function calls
    and answers, generation config and tools to chat; a chat completion back to candidates
    with function calls, finish reasons and usage metadata."""
    chat = request_to_chat(
        {
            "model": "models/gemini-x",
            "system_instruction": {"parts": [{"text": "Be kind."}]},
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "Look"},
                        {"inline_data": {"mime_type": "image/png", "data": "AAAA"}},
                    ],
                },
                {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"a_b": 1}}}]},
                {
                    "role": "user",
                    "parts": [{"functionResponse": {"name": "f", "response": {"content": "ok"}}}],
                },
            ],
            "generationConfig": {
                "maxOutputTokens": 50,
                "topK": 5,
                "stopSequences": ["END"],
                "responseMimeType": "application/json",
            },
            "tools": [{"functionDeclarations": [{"name": "f", "parameters": {"type": "object"}}]}],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY"}},
        }
    )
    assert chat["model"] == "gemini-x"
    assert chat["messages"][0] == {"role": "system", "content": "Be kind."}
    assert chat["messages"][1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,AAAA"},
    }
    call = chat["messages"][2]["tool_calls"][0]
    assert call["function"] == {"name": "f", "arguments": '{"a_b": 1}'}
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": call["id"], "content": "ok"}
    assert (chat["max_tokens"], chat["top_k"], chat["stop"]) == (50, 5, ["END"])
    assert chat["response_format"] == {"type": "json_object"}
    assert chat["tool_choice"] == "required" and chat["tools"][0]["function"]["name"] == "f"
    response = chat_to_response(
        {
            "id": "chatcmpl-1",
            "model": "m",
            "choices": [
                {
                    "message": {
                        "content": "Sure.",
                        "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 2}'}}],
                    },
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3},
        },
        model="m",
    )
    [candidate] = response["candidates"]
    assert candidate["content"]["parts"] == [
        {"text": "Sure."},
        {"functionCall": {"name": "f", "args": {"x": 2}}},
    ]
    assert candidate["finishReason"] == "MAX_TOKENS"
    assert response["usageMetadata"] == {
        "promptTokenCount": 7,
        "candidatesTokenCount": 3,
        "totalTokenCount": 10,
    }


def test_unsupported_parameters_make_that_request_an_error(serve_engine: ServeEngine) -> None:
    """A parameter the engine cannot honour (safetySettings) fails that request with an
    INVALID_ARGUMENT status; the others succeed."""
    sdk = client(serve_engine(api_key=KEY))
    mixed = requests(2)
    mixed[1]["config"] = {
        "safety_settings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    }
    finished = done(sdk, sdk.batches.create(model=MODEL, src=mixed).name)
    first, second = finished.dest.inlined_responses
    assert first.response is not None and first.error is None
    assert second.error.code == 3  # google.rpc INVALID_ARGUMENT
    assert "safetySettings" in (second.error.message or "")


def _inline(*items: Any, display_name: str = "") -> dict[str, Any]:
    batch: dict[str, Any] = {"inputConfig": {"requests": {"requests": list(items)}}}
    if display_name:
        batch["displayName"] = display_name
    return {"batch": batch}


def _ask(i: int) -> dict[str, Any]:
    return {"request": {"contents": [{"parts": [{"text": f"item {i}"}]}]}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({"batch": "nope"}, "an object with inputConfig", id="batch-not-object"),
        pytest.param(_inline(_ask(0), display_name="x" * 513), "at most 512", id="long-name"),
        pytest.param({"batch": {"displayName": "d"}}, "fileName or requests", id="no-input"),
        pytest.param(
            {"batch": {"inputConfig": {"requests": {"requests": []}, "fileName": "files/x"}}},
            "exactly one of fileName and requests",
            id="both-inputs",
        ),
        pytest.param(_inline(), "a non-empty list", id="no-requests"),
        pytest.param(_inline(_ask(0), "text"), "requests[1]: must be an object", id="not-object"),
        pytest.param(
            _inline({**_ask(0), "metadata": {"key": "k"}}, {**_ask(1), "metadata": {"key": "k"}}),
            "the key 'k' is used twice",
            id="duplicate-key",
        ),
        pytest.param(
            _inline({"request": {"contents": []}}), "request.contents: a non-empty", id="empty"
        ),
    ],
)
def test_a_batch_create_gemini_would_refuse_is_a_400_naming_the_field(
    serve_engine: ServeEngine, body: dict[str, Any], message: str
) -> None:
    """A create that Gemini refuses (no input, both inputs, an empty or malformed request
    list, a key used twice, an over-long name) is a 400 naming the field and request, and no
    batch is made (so nothing is run and paid for on a half-read input)."""
    server = serve_engine(api_key=KEY)
    answer = httpx.post(
        f"{server.base_url}/v1beta/models/{MODEL}:batchGenerateContent",
        headers={"x-goog-api-key": KEY},
        json=body,
    )
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]
    assert server.engine.list_batches(None, 100)["data"] == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b'{"key": "a", "request": {"contents": [{}]}}\n{oops\n', "line 2: not valid"),
        pytest.param(b'{"request": {"contents": [{}]}}\n', "line 1: an object with key"),
        pytest.param(b"\n\n", "the file holds no requests"),
    ],
    ids=["not-json", "no-key", "empty"],
)
def test_a_batch_from_a_file_gemini_would_refuse_names_the_line(
    serve_engine: ServeEngine, content: bytes, message: str
) -> None:
    """A batch from an uploaded file with a line that is not JSON, a line without a key, or
    no request at all is a 400 naming the file and line; no batch is made."""
    server = serve_engine(api_key=KEY)
    stored = server.engine.create_file(content, "requests.jsonl", "batch")
    answer = httpx.post(
        f"{server.base_url}/v1beta/models/{MODEL}:batchGenerateContent",
        headers={"x-goog-api-key": KEY},
        json={"batch": {"inputConfig": {"fileName": f"files/{stored['id']}"}}},
    )
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]
    assert server.engine.list_batches(None, 100)["data"] == []


def test_batch_names_gemini_does_not_know_are_refused(serve_engine: ServeEngine) -> None:
    """Only Gemini batches answer under /batches: an OpenAI batch of the same engine, a
    malformed name, an unknown verb and a page token naming no batch are refused (404/400);
    a cancel of a batch that already finished is answered, not an error."""
    server = serve_engine(api_key=KEY)
    headers = {"x-goog-api-key": KEY}
    base = f"{server.base_url}/v1beta"
    stored = server.engine.create_file(jsonl_bytes(request_lines(1)), "in.jsonl", "batch")
    openai_batch = server.engine.create_batch(stored["id"], "/v1/chat/completions", "24h", {})
    other = openai_batch["id"].removeprefix("batch_")
    assert httpx.get(f"{base}/batches/{other}", headers=headers).status_code == 404
    assert httpx.get(f"{base}/batches/a:b", headers=headers).status_code == 404
    listed = httpx.get(f"{base}/batches", headers=headers, params={"pageToken": "batches/zz"})
    assert listed.status_code == 400 and "page token" in listed.json()["error"]["message"]

    sdk = client(server)
    job = sdk.batches.create(model=MODEL, src=requests(1))
    done(sdk, job.name)
    short = job.name.removeprefix("batches/")
    assert httpx.post(f"{base}/batches/{short}:pause", headers=headers).status_code == 404
    cancelled = httpx.post(f"{base}/batches/{short}:cancel", headers=headers)
    assert cancelled.status_code == 200, cancelled.text
    assert sdk.batches.get(name=job.name).state.name == "JOB_STATE_SUCCEEDED"


def test_a_resumable_upload_survives_a_resent_chunk_and_refuses_wrong_offsets_and_sizes(
    serve_engine: ServeEngine,
) -> None:
    """Gemini's resumable upload, chunk by chunk: a chunk sent again after a lost answer is not
    written twice, a chunk at the wrong offset or a finalize short of the declared size is a
    400 (never a file with missing or doubled requests), a repeated finalize answers the same
    file, and the stored file lists, reads back byte for byte and deletes."""
    server = serve_engine(api_key=KEY)
    headers = {"x-goog-api-key": KEY}
    base = server.base_url
    data = jsonl_bytes([{"key": f"k{i}", "request": {"contents": [{}]}} for i in range(4)])
    half = len(data) // 2

    def start(**extra: str) -> httpx.Response:
        return httpx.post(
            f"{base}/upload/v1beta/files",
            headers={**headers, **extra},
            json={"file": {"displayName": "reqs.jsonl"}},
        )

    assert start().status_code == 400  # no X-Goog-Upload-Command: start
    no_size = start(**{"x-goog-upload-command": "start"})
    assert no_size.status_code == 400 and "Content-Length" in no_size.json()["error"]["message"]
    too_big = start(
        **{"x-goog-upload-command": "start", "x-goog-upload-header-content-length": str(10**12)}
    )
    assert too_big.status_code == 413
    started = start(
        **{"x-goog-upload-command": "start", "x-goog-upload-header-content-length": str(len(data))}
    )
    url = started.headers["x-goog-upload-url"]

    def send(chunk: bytes, offset: int, command: str = "upload") -> httpx.Response:
        return httpx.post(
            url,
            headers={"x-goog-upload-command": command, "x-goog-upload-offset": str(offset)},
            content=chunk,
        )

    assert send(data[:half], 0).status_code == 200
    assert send(data[:half], 0).status_code == 200  # resent after a lost answer
    wrong = send(data[half:], half + 1)
    assert wrong.status_code == 400 and f"{half} bytes received" in wrong.json()["error"]["message"]
    short = send(data[half:-1], half, "upload, finalize")
    assert short.status_code == 400 and f"not {len(data)}" in short.json()["error"]["message"]
    done_ = send(data[-1:], len(data) - 1, "upload, finalize")
    assert done_.status_code == 200 and done_.headers["x-goog-upload-status"] == "final"
    again = send(b"", len(data), "finalize")
    assert again.json() == done_.json()

    name = done_.json()["file"]["name"]
    short_name = name.removeprefix("files/")
    listed = httpx.get(f"{base}/v1beta/files", headers=headers).json()["files"]
    assert [f["name"] for f in listed] == [name]
    meta = httpx.get(f"{base}/v1beta/{name}", headers=headers).json()
    assert meta["sizeBytes"] == str(len(data))
    content = httpx.get(f"{base}/download/v1beta/{name}:download", headers=headers)
    assert content.content == data  # each request once, none lost
    assert httpx.get(f"{base}/v1beta/{name}:copy", headers=headers).status_code == 404
    assert httpx.delete(f"{base}/v1beta/files/{short_name}", headers=headers).status_code == 200
    assert httpx.get(f"{base}/v1beta/files", headers=headers).json()["files"] == []


def test_a_results_file_is_there_only_once_its_batch_is_done(serve_engine: ServeEngine) -> None:
    """The responses file of a batch still running is not found (a client must not read half
    the answers as all of them); once it is done the file's metadata names its batch."""
    from batchspec.engine import BuiltinUpstream

    server = serve_engine(api_key=KEY, upstream=BuiltinUpstream(latency=0.3), concurrency=1)
    sdk = client(server)
    headers = {"x-goog-api-key": KEY}
    stored = server.engine.create_file(
        jsonl_bytes(
            [
                {"key": f"k{i}", "request": {"contents": [{"parts": [{"text": "hi"}]}]}}
                for i in range(3)
            ]
        ),
        "reqs.jsonl",
        "batch",
    )
    job = sdk.batches.create(model=MODEL, src=f"files/{stored['id']}")
    short = job.name.removeprefix("batches/")
    results = f"{server.base_url}/v1beta/files/results-{short}"
    early = httpx.get(results, headers=headers)
    assert early.status_code == 404 and "not done" in early.json()["error"]["message"]
    done(sdk, job.name)
    meta = httpx.get(results, headers=headers).json()
    assert meta["displayName"] == f"results of {job.name}"
