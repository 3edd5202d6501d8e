"""The gemini provider: line mapping, result mapping, and the provider against our server.

The server is the engine's Gemini dialect (``/v1beta/...``) on loopback, behind a
``RequestProbe`` (tests/probes.py) that counts requests per route and can hold one, so a
create whose answer is lost is real timing, not a mock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from probes import ProbedServer, route_of
from servers import jsonl_bytes, read_jsonl, request_lines, wait_for
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    batchspec_cmd,
    make_workspace,
    run_cli,
)

from batchspec.engine import BuiltinUpstream
from batchspec.errors import ProviderError
from batchspec.providers import _http, gemini
from batchspec.providers.base import (
    AmbiguousOutcome,
    Provider,
    RemoteBatch,
    RemoteNotFound,
    find_batch_by_key,
)
from batchspec.providers.gemini import (
    GeminiProvider,
    display_name_for,
    metadata_of,
    parse_operation,
)
from batchspec.wire.gemini_lines import (
    Unmappable,
    batch_status,
    chat_to_request,
    line_problems,
    result_line,
)
from batchspec.wire.outcomes import classify_result_line

MODEL = "gemini-x"
CREATE = route_of("POST", f"/v1beta/models/{MODEL}:batchGenerateContent")
UPLOAD = route_of("POST", "/upload/v1beta/files")
CHAT = "/v1/chat/completions"
NATIVE = "/v1beta/generateContent"
FAST = ["--poll-interval", "0.05"]
OBJECT = {"type": "object"}
KEYS = {
    "batchspec_resource": "t",
    "batchspec_spec": "ab" * 32,
    "batchspec_shard": "0",
    "batchspec_attempt": "1",
}


# ---------------------------------------------------------------------------------------------
# OpenAI chat -> Gemini (pure)


def chat(**body: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body}


def test_chat_body_maps_to_a_generate_content_request() -> None:
    """System, roles, images, tool calls and answers, limits, sampling, stop, JSON output
    and tools map as documented."""
    body = chat(
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "look", "arguments": '{"q": 1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        ],
        max_completion_tokens=77,
        temperature=1.5,
        top_p=0.9,
        stop="END",
        n=2,
        seed=7,
        presence_penalty=0.5,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        tools=[
            {"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}
        ],
        tool_choice={"type": "function", "function": {"name": "look"}},
        user=None,
        stream=False,
    )
    assert chat_to_request(body) == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "What is this?"},
                    {"inlineData": {"mimeType": "image/png", "data": "AAAA"}},
                ],
            },
            {"role": "model", "parts": [{"functionCall": {"name": "look", "args": {"q": 1}}}]},
            {
                "role": "user",
                "parts": [{"functionResponse": {"name": "look", "response": {"content": "a cat"}}}],
            },
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {
            "maxOutputTokens": 77,
            "temperature": 1.5,
            "topP": 0.9,
            "candidateCount": 2,
            "seed": 7,
            "presencePenalty": 0.5,
            "stopSequences": ["END"],
            "responseMimeType": "application/json",
            "responseJsonSchema": {},
        },
        "tools": [{"functionDeclarations": [{"name": "look", "parameters": OBJECT}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["look"]}},
    }


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(chat(logit_bias={"1": 2}), "body.logit_bias", id="logit_bias"),
        pytest.param(chat(user="u-1"), "body.user", id="user"),
        pytest.param(chat(store=True), "body.store", id="store"),
        pytest.param(chat(metadata={"a": "b"}), "body.metadata", id="metadata"),
        pytest.param(chat(parallel_tool_calls=False), "parallel_tool_calls", id="parallel"),
        pytest.param(chat(stream=True), "body.stream", id="stream"),
        pytest.param(chat(reasoning_effort="low"), "body.reasoning_effort", id="unknown-key"),
        pytest.param(chat(stop=list("abcdef")), "at most 5", id="six-stops"),
        pytest.param(
            chat(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {}, "strict": True},
                }
            ),
            "strict",
            id="strict-schema",
        ),
        pytest.param(
            chat(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/a"}}],
                    }
                ]
            ),
            "data: URL",
            id="linked-image",
        ),
        pytest.param(
            chat(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]),
            "after the conversation started",
            id="late-system",
        ),
        pytest.param(
            chat(messages=[{"role": "user", "content": "a", "name": "bob"}]),
            "messages[0].name",
            id="name",
        ),
        pytest.param(
            chat(messages=[{"role": "tool", "tool_call_id": "nope", "content": "x"}]),
            "no earlier assistant message made",
            id="orphan-tool-answer",
        ),
        pytest.param(chat(messages=[]), "must be a non-empty list", id="no-messages"),
        pytest.param(chat(messages=["hi"]), "messages[0] must be an object", id="not-object"),
        pytest.param(
            chat(messages=[{"role": "critic", "content": "a"}]),
            'role "critic" is not one of system, developer',
            id="role",
        ),
        pytest.param(
            chat(messages=[{"role": "function", "name": "f", "content": "a"}]),
            "role 'function', which Gemini does not know",
            id="openai-role-gemini-lacks",
        ),
        pytest.param(
            chat(messages=[{"role": "system", "content": "a"}]), "needs a user turn", id="sys-only"
        ),
        pytest.param(
            chat(messages=[{"role": "user", "content": 5}]), "string or a non-empty", id="content"
        ),
        pytest.param(
            chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
            "'input_audio' part",
            id="audio",
        ),
        pytest.param(
            chat(
                messages=[
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": None, "tool_calls": ["x"]},
                ]
            ),
            "tool_calls[0] must be a function call",
            id="tool-call",
        ),
        pytest.param(
            chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant"}]),
            "neither content nor tool calls",
            id="empty-assistant",
        ),
        pytest.param(chat(tool_choice={"type": "function"}), "names no function", id="choice"),
        pytest.param(chat(tool_choice="sometimes"), "tool_choice", id="choice-word"),
        pytest.param(chat(tools=[{"type": "retrieval"}]), "only function tools", id="tool-type"),
        pytest.param(
            chat(response_format={"type": "json_schema", "json_schema": {"schema": 5}}),
            "schema must be an object",
            id="schema-not-object",
        ),
        pytest.param(chat(response_format={"type": "xml"}), "response_format", id="format"),
    ],
)
def test_what_cannot_map_is_refused_with_a_reason(body: dict[str, Any], fragment: str) -> None:
    """Each unmappable parameter raises Unmappable naming it."""
    with pytest.raises(Unmappable) as raised:
        chat_to_request(body)
    assert fragment in raised.value.message


@pytest.mark.parametrize(
    ("extra", "config"),
    [
        pytest.param({"response_format": {"type": "text"}}, None, id="text-is-the-default"),
        pytest.param(
            {"response_format": {"type": "json_object"}},
            {"responseMimeType": "application/json"},
            id="json-object",
        ),
        pytest.param({"logprobs": True}, {"responseLogprobs": True}, id="logprobs"),
    ],
)
def test_output_options_keep_their_meaning(extra: dict[str, Any], config: Any) -> None:
    """Options that change what comes back (JSON only, log probabilities) reach Gemini's
    generationConfig; the default text format adds nothing."""
    assert chat_to_request(chat(**extra)).get("generationConfig") == config


def test_a_null_max_completion_tokens_sends_the_lines_max_tokens() -> None:
    """``max_completion_tokens: null`` beside ``max_tokens: 100`` is sent as maxOutputTokens
    100, the limit validate and the budget's bound read (null is not set): it was sent with
    no limit, a request the budget counted at 100 answering up to its model's most."""
    body = chat(max_completion_tokens=None, max_tokens=100)
    assert chat_to_request(body)["generationConfig"] == {"maxOutputTokens": 100}


def test_gemini_lines_and_their_problems() -> None:
    """A generateContent line with a GenerateContentRequest passes; an OpenAI-only field in
    it is named with where Gemini takes it; other endpoints cannot run on Gemini."""
    request = {"model": MODEL, "contents": [{"role": "user", "parts": [{"text": "x"}]}]}
    line = {"custom_id": "a", "method": "POST", "url": NATIVE, "body": request}
    assert line_problems(line) == []
    openai_field = {**line, "body": {**request, "max_tokens": 5}}
    [(code, message)] = line_problems(openai_field)
    assert code == "unknown_field" and "generationConfig.maxOutputTokens" in message
    empty = {**line, "body": {"model": MODEL, "contents": []}}
    assert [code for code, _ in line_problems(empty)] == ["missing_contents"]
    embed = {"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
    assert [code for code, _ in line_problems(embed)] == ["unsupported_endpoint"]


@pytest.mark.parametrize(
    ("config", "code"),
    [
        pytest.param({"maxOutputTokens": -5}, "invalid_max_tokens", id="negative"),
        pytest.param({"maxOutputTokens": 1.5}, "invalid_max_tokens", id="fraction"),
        pytest.param({"maxOutputTokens": True}, "invalid_max_tokens", id="boolean"),
        pytest.param({"max_output_tokens": "lots"}, "invalid_max_tokens", id="word"),
        pytest.param({"candidateCount": [2]}, "invalid_params", id="count-list"),
        pytest.param({"candidate_count": -1}, "invalid_params", id="count-negative"),
    ],
)
def test_a_generation_config_count_gemini_refuses_is_refused_before_upload(
    config: dict[str, Any], code: str
) -> None:
    """generationConfig.maxOutputTokens and candidateCount are read as protobuf JSON reads
    an integer: 100, 100.0 and "100" pass (the budget reads them as 100); a negative, a
    fraction, a boolean, a word or a list is refused, naming the field: Gemini fails that
    request after the batch ran, and the budget read it as no limit."""
    request = {"model": MODEL, "contents": [{"role": "user", "parts": [{"text": "x"}]}]}
    line = {"custom_id": "a", "method": "POST", "url": NATIVE, "body": request}
    for fine in (100, 100.0, "100", 0):
        ok = {**request, "generationConfig": {"maxOutputTokens": fine, "candidateCount": fine}}
        assert line_problems({**line, "body": ok}) == []
    [(found, message)] = line_problems({**line, "body": {**request, "generationConfig": config}})
    [key] = config
    assert found == code and f"body.generationConfig.{key}" in message


def test_states_and_display_names() -> None:
    """BATCH_STATE_* and JOB_STATE_* map to our statuses (an unknown one is kept); the
    display name carries batchspec's key both ways, another name carries none."""
    assert [batch_status(f"BATCH_STATE_{s}") for s in ("PENDING", "RUNNING", "SUCCEEDED")] == [
        "validating",
        "in_progress",
        "completed",
    ]
    assert [batch_status(f"JOB_STATE_{s}") for s in ("FAILED", "CANCELLED", "EXPIRED")] == [
        "failed",
        "cancelled",
        "expired",
    ]
    assert batch_status("JOB_STATE_CANCELLING") == "cancelling"  # the SDK's, never terminal
    assert batch_status("JOB_STATE_PAUSED") == "job_state_paused"
    name = display_name_for(KEYS)
    assert name == f"batchspec/t/{'ab' * 32}/0/1" and metadata_of(name) == KEYS
    assert metadata_of("my own batch") == {} and display_name_for({"a": "b"}) == "batchspec"


def test_a_finished_operation_offers_only_the_result_files_it_has() -> None:
    """A succeeded batch with no failures offers its succeeded part and no failed part (never
    a download of a file that is not there); a failed batch offers neither and carries
    Gemini's error, so its requests fail as a whole with that reason."""
    done = parse_operation(
        {
            "name": "batches/ok",
            "done": True,
            "response": {
                "state": "BATCH_STATE_SUCCEEDED",
                "batchStats": {"requestCount": "3", "successfulRequestCount": "3"},
                "displayName": display_name_for(KEYS),
            },
        }
    )
    assert done.status == "completed" and done.metadata == KEYS
    assert done.output_file_id is not None and done.error_file_id is None
    assert done.request_counts is not None and done.request_counts.total == 3
    failed = parse_operation(
        {
            "name": "batches/bad",
            "metadata": {"state": "BATCH_STATE_FAILED"},
            "error": {"code": 3, "status": "INVALID_ARGUMENT", "message": "bad request file"},
        }
    )
    assert failed.status == "failed"
    assert (failed.output_file_id, failed.error_file_id) == (None, None)
    assert [(e.code, e.message) for e in failed.errors] == [
        ("INVALID_ARGUMENT", "bad request file")
    ]


@pytest.mark.parametrize("batch_id", ["batches/", "batches/a/b", "batches/x:cancel", "../a"])
def test_a_batch_id_that_is_not_one_name_is_not_found_and_not_sent(
    server: Callable[..., ProbedServer], tmp_path: Path, batch_id: str
) -> None:
    """A batch id that would point elsewhere in the API (a path, a method suffix) is "not
    found" without a request, so a damaged state row can never cancel or read another object."""
    srv = server()
    with provider_for(srv, tmp_path / "p") as provider:
        with pytest.raises(RemoteNotFound):
            provider.get_batch(batch_id)
        with pytest.raises(RemoteNotFound):
            provider.cancel_batch(batch_id)
    assert sum(srv.probe.counts.values()) == 0


# ---------------------------------------------------------------------------------------------
# Gemini results -> our lines (pure)


@pytest.mark.parametrize(
    ("record", "state", "category", "status"),
    [
        pytest.param(
            {"key": "r1", "response": {"candidates": [], "responseId": "x"}},
            "ok",
            None,
            200,
            id="response",
        ),
        pytest.param(
            {"key": "r1", "error": {"code": 3, "message": "bad"}},
            "failed",
            "INVALID_ARGUMENT",
            400,
            id="invalid-argument-final",
        ),
        pytest.param(
            {"key": "r1", "error": {"code": 8, "message": "quota"}},
            "retryable",
            "rate_limit",
            429,
            id="exhausted-retried",
        ),
        pytest.param(
            {"metadata": {"key": "r1"}, "error": {"code": 14}},
            "retryable",
            "server_error",
            503,
            id="unavailable-retried",
        ),
        pytest.param(
            {"key": "r1", "error": {"code": 1, "message": "cancelled"}},
            "retryable",
            "cancelled",
            None,
            id="cancelled",
        ),
        pytest.param(
            {"key": "r1", "error": {"code": 4, "details": ["BATCH_EXPIRED"]}},
            "retryable",
            "expired",
            None,
            id="expired",
        ),
        pytest.param(
            {"key": "r1", "error": {"code": 77}}, "failed", "UNKNOWN_CODE", 400, id="unknown-final"
        ),
        pytest.param({"key": "r1"}, "failed", "gemini_unknown_result", None, id="unreadable"),
    ],
)
def test_results_become_lines_the_reconciler_classifies(
    record: dict[str, Any], state: str, category: str | None, status: int | None
) -> None:
    """Each Gemini result becomes an OpenAI-shaped line with the outcome documented for it."""
    line = result_line("batches/b1", record)
    assert line["custom_id"] == "r1"
    outcome = classify_result_line(line)
    assert (outcome.state, outcome.category) == (state, category)
    response = line["response"]
    assert (response["status_code"] if response else None) == status
    if "response" in record:
        assert response["body"] == record["response"]


@pytest.mark.parametrize(
    "stats", [None, {}, {"requestCount": None}], ids=["missing", "empty", "nulls"]
)
def test_a_done_batch_whose_stats_cannot_be_read_offers_both_result_parts(stats: Any) -> None:
    """A SUCCEEDED batch without readable ``batchStats`` (a gateway trimming the object)
    offers its succeeded and its failed results both and reports its counts unknown: with
    counts of 0 it offered neither, was recorded ended with nothing to collect, and every
    answered request was sent again and paid for again."""
    meta: dict[str, Any] = {"state": "BATCH_STATE_SUCCEEDED"}
    if stats is not None:
        meta["batchStats"] = stats
    batch = parse_operation({"name": "batches/b1", "metadata": meta, "done": True})
    assert batch.request_counts is None
    assert batch.output_file_id == "results:succeeded:batches/b1"
    assert batch.error_file_id == "results:failed:batches/b1"


def test_an_error_line_keeps_the_details_gemini_gave() -> None:
    """A failed request's ``google.rpc.Status`` details (which field was wrong: Gemini's
    error lines are undocumented, so kept whole) reach the errors file with its message,
    not just the code and message."""
    violations = {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": "contents[0].parts", "description": "empty"}],
    }
    record = {"key": "r1", "error": {"code": 3, "message": "bad", "details": [violations]}}
    error = result_line("batches/b1", record)["response"]["body"]["error"]
    assert (error["message"], error["code"], error["details"]) == (
        "bad",
        "INVALID_ARGUMENT",
        [violations],
    )


# ---------------------------------------------------------------------------------------------
# The provider against our server


def provider_for(srv: ProbedServer, data_dir: Path, **kwargs: Any) -> GeminiProvider:
    options: dict[str, Any] = {"api_key": SENTINEL_KEY, "timeout": 10.0, **kwargs}
    return GeminiProvider("gem", base_url=srv.base_url, data_dir=data_dir, **options)


def stage(provider: GeminiProvider, tmp_path: Path, lines: list[dict[str, Any]]) -> str:
    source = tmp_path / f"in-{time.monotonic_ns()}.jsonl"
    source.write_bytes(jsonl_bytes(lines))
    return provider.upload_file(source, filename="in.jsonl").id


def create(provider: GeminiProvider, file_id: str, **keys: str) -> RemoteBatch:
    return provider.create_batch(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata={**KEYS, **keys}
    )


def ended(provider: GeminiProvider, batch_id: str) -> RemoteBatch:
    return wait_for(lambda: (b := provider.get_batch(batch_id)).is_terminal and b)


def download(provider: GeminiProvider, file_id: str | None, dest: Path) -> list[dict]:
    assert file_id is not None
    provider.download_file(file_id, dest)
    return read_jsonl(dest.read_text())


def native_lines(count: int, prefix: str = "g") -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": NATIVE,
            "body": {
                "model": f"models/{MODEL}",
                "contents": [{"role": "user", "parts": [{"text": f"Tell me about item {i}."}]}],
            },
        }
        for i in range(count)
    ]


def test_provider_satisfies_the_protocol(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """GeminiProvider is a providers.base.Provider."""
    with provider_for(server(), tmp_path / "p") as provider:
        assert isinstance(provider, Provider)


def test_small_batches_go_inline_with_the_key_as_display_name(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """Nothing is sent on upload; one inline create carries every converted request; results
    come back as our lines by key with the GenerateContentResponse as body; usage is summed;
    the listed batch reads its metadata back from the display name."""
    srv = server()
    with provider_for(srv, tmp_path / "p") as provider:
        file_id = stage(provider, tmp_path, request_lines(3, model=MODEL))
        assert file_id.startswith("staged-") and sum(srv.probe.counts.values()) == 0
        batch = create(provider, file_id)
        done = ended(provider, batch.id)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed) == (3, 3)
        assert done.error_file_id is None
        assert done.usage is not None and done.usage.input_tokens > 0
        lines = download(provider, done.output_file_id, tmp_path / "out.jsonl")
        assert [r["custom_id"] for r in lines] == ["req-0", "req-1", "req-2"]
        assert lines[0]["response"]["body"]["candidates"][0]["content"]["role"] == "model"
        assert [b.metadata for b in provider.list_batches()] == [KEYS]
    assert srv.probe.counts[CREATE] == 1 and srv.probe.counts[UPLOAD] == 0
    [stored] = srv.engine.list_batches(None, 100)["data"]
    assert stored["metadata"]["gemini_source"] == "inline"


def test_an_inline_batchs_answers_are_kept_without_the_key(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """An inline batch's answers, read from its operation rather than downloaded as a file,
    are kept with the key redacted as a downloaded file's are (an answer quoting it)."""
    srv = server()
    lines = request_lines(2, model=MODEL)
    for line in lines:
        line["body"]["messages"] = [{"role": "user", "content": f"say {SENTINEL_KEY} back"}]
    with provider_for(srv, tmp_path / "p") as provider:
        done = ended(provider, create(provider, stage(provider, tmp_path, lines)).id)
        download(provider, done.output_file_id, tmp_path / "out.jsonl")
    kept = (tmp_path / "out.jsonl").read_text()
    assert "say [redacted] back" in kept and SENTINEL_KEY not in kept


def test_an_inline_batchs_answers_are_read_past_the_cap_other_answers_have(
    server: Callable[..., ProbedServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inline batch's answers come inside its operation, read whole: the cap that bounds
    any other API answer (``MAX_ANSWER_BYTES``, shrunk here below one operation's size) must
    not leave them uncollected; Gemini's own cap (``INLINE_RESULTS_MAX_BYTES``) is larger."""
    monkeypatch.setattr(_http, "MAX_ANSWER_BYTES", 512)
    srv = server()
    with provider_for(srv, tmp_path / "p") as provider:
        batch = create(provider, stage(provider, tmp_path, request_lines(3, model=MODEL)))
        done = ended(provider, batch.id)
        lines = download(provider, done.output_file_id, tmp_path / "out.jsonl")
    assert [r["custom_id"] for r in lines] == ["req-0", "req-1", "req-2"]
    assert len(json.dumps(lines)) > 512
    assert gemini.INLINE_RESULTS_MAX_BYTES > 256 * 1024 * 1024


def test_large_batches_are_uploaded_then_created_from_the_file(
    server: Callable[..., ProbedServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over inlineMaxBytes the requests are uploaded (resumable, in two chunks here) and the
    batch names the file; failed requests land in the error part with their status."""
    srv = server(api_key=SENTINEL_KEY)
    lines = native_lines(3)
    lines[2]["body"]["safetySettings"] = [{"category": "X", "threshold": "BLOCK_NONE"}]
    monkeypatch.setattr("batchspec.providers.gemini._UPLOAD_CHUNK", 300)
    with provider_for(srv, tmp_path / "p", inline_max_bytes=10) as provider:
        done = ended(provider, create(provider, stage(provider, tmp_path, lines)).id)
        good = download(provider, done.output_file_id, tmp_path / "ok.jsonl")
        bad = download(provider, done.error_file_id, tmp_path / "bad.jsonl")
    assert sorted(r["custom_id"] for r in good) == ["g-0", "g-1"]
    assert [r["custom_id"] for r in bad] == ["g-2"]
    assert bad[0]["response"]["status_code"] == 400
    assert classify_result_line(bad[0]).state == "failed"
    assert srv.probe.counts[UPLOAD] >= 3  # start + two chunks or more
    [stored] = srv.engine.list_batches(None, 100)["data"]
    assert stored["metadata"]["gemini_source"] == "file"


@pytest.mark.parametrize("answer", [[1, 2], "done"], ids=["array", "string"])
def test_a_finished_upload_answered_with_no_json_object_is_a_provider_error(
    server: Callable[..., ProbedServer], tmp_path: Path, answer: Any
) -> None:
    """The last chunk answered 200 with JSON that is not an object (a gateway's page): a
    ProviderError naming the upload, no traceback, and no create sent."""
    srv = server(api_key=SENTINEL_KEY)
    srv.probe.refuse(r"^POST /upload/v1beta/files\?.*upload_id=", 200, answer, query=True)
    with provider_for(srv, tmp_path / "p", inline_max_bytes=10, max_retries=0) as provider:
        file_id = stage(provider, tmp_path, native_lines(2))
        with pytest.raises(ProviderError, match="upload of the batch requests"):
            create(provider, file_id)
    assert srv.probe.counts[CREATE] == 0


@pytest.mark.parametrize(
    "page",
    [{"message": "down for maintenance"}, {"operations": "none"}],
    ids=["a-notice", "operations-not-a-list"],
)
def test_a_batch_list_answered_with_no_listing_is_a_provider_error(
    server: Callable[..., ProbedServer], tmp_path: Path, page: dict[str, Any]
) -> None:
    """A 200 to a list that is no listing (a gateway's notice) is a ProviderError, not an
    empty listing: read as one, a key lookup found no batch with the key and the reconciler
    created it, and paid for it, again. An empty listing (``{}``: Google omits an empty
    list) is still one."""
    srv = server(api_key=SENTINEL_KEY)
    with provider_for(srv, tmp_path / "p", max_retries=0) as provider:
        assert list(provider.list_batches()) == []
        srv.probe.refuse(r"^GET /v1beta/batches$", 200, page)
        with pytest.raises(ProviderError, match="not a listing"):
            list(provider.list_batches())


def test_cancel_ends_the_batch_cancelled_and_unrun_requests_are_retryable(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """cancel -> cancelling (Gemini keeps the batch RUNNING until it ends: not in_progress,
    which a later cancel would send again) -> cancelled; requests that never ran are
    batch_cancelled lines (retryable)."""
    srv = server(upstream=BuiltinUpstream(latency=0.5), concurrency=1)
    with provider_for(srv, tmp_path / "p") as provider:
        batch = create(provider, stage(provider, tmp_path, native_lines(6)))
        wait_for(lambda: provider.get_batch(batch.id).status == "in_progress")
        assert provider.cancel_batch(batch.id).status in ("cancelling", "cancelled")
        done = ended(provider, batch.id)
        assert done.status == "cancelled"
        lines = download(provider, done.error_file_id, tmp_path / "e.jsonl")
    assert lines and all(r["error"]["code"] == "batch_cancelled" for r in lines)
    assert all(classify_result_line(r).state == "retryable" for r in lines)


def test_lost_create_answer_is_found_by_display_name_not_sent_again(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """The create's answer is held past the client's timeout: the provider looks the batch
    up by its display name and returns it; the server saw one create."""
    srv = server()
    srv.probe.hold(CREATE, 2.0, after=True)
    with provider_for(srv, tmp_path / "p", timeout=0.5) as provider:
        batch = create(provider, stage(provider, tmp_path, native_lines(2)))
    srv.probe.release(CREATE)
    assert batch.metadata == KEYS
    assert srv.probe.counts[CREATE] == 1 and srv.batch_count() == 1


def test_a_create_still_in_transit_is_not_sent_again(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """A keyed create held on its way past the client's timeout, not listed yet, is never
    re-sent by the provider (AmbiguousOutcome: the reconciler looks it up through its
    window); a second create would be a second batch paid for once the first arrives."""
    srv = server()
    srv.probe.hold(CREATE, 2.0, times=1)
    with provider_for(srv, tmp_path / "p", timeout=0.5) as provider:
        file_id = stage(provider, tmp_path, native_lines(2))
        with pytest.raises(AmbiguousOutcome):
            create(provider, file_id)
    srv.probe.release(CREATE)
    assert srv.probe.counts[CREATE] == 1


def test_a_key_lookup_reads_past_an_older_batch_listed_before_the_keys_batch(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """Gemini documents no order for its listing: a batch older than the lookup's window,
    listed before the key's batch, must not end the scan (it did: the key's batch was missed,
    and a lost state or a lost create answer had it created, and paid for, again)."""
    srv = server()
    with provider_for(srv, tmp_path / "p") as provider:
        wanted = create(provider, stage(provider, tmp_path, native_lines(1)))
        other = create(provider, stage(provider, tmp_path, native_lines(1)), batchspec_shard="1")
        engine_id = "batch_" + other.id.removeprefix("batches/")
        with srv.engine.store.write() as db:  # made three days ago, and listed first
            db.execute(
                "UPDATE batches SET created_at = created_at - 259200 WHERE id = ?", (engine_id,)
            )
        listed = [(b.id, b.created_at or 0) for b in provider.list_batches()]
        found = find_batch_by_key(provider, KEYS, since=time.time() - 25 * 3600)
    assert [i for i, _ in listed] == [other.id, wanted.id] and listed[0][1] < listed[1][1]
    assert found.batch is not None and found.batch.id == wanted.id
    assert (found.listed, found.stopped_at_window) == (2, False)


def test_wrong_key_is_a_clear_401(server: Callable[..., ProbedServer], tmp_path: Path) -> None:
    """A wrong x-goog-api-key: HTTP 401 naming $GEMINI_API_KEY, the key never shown."""
    srv = server()
    wrong = "AIza-wrong-0123456789abcdef"
    with (
        provider_for(srv, tmp_path / "p", api_key=wrong, max_retries=0) as provider,
        pytest.raises(ProviderError) as raised,
    ):
        next(iter(provider.list_batches()))
    assert raised.value.status == 401
    assert "$GEMINI_API_KEY" in str(raised.value) and wrong not in str(raised.value)


# ---------------------------------------------------------------------------------------------
# validate and apply with a gemini provider


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    return SENTINEL_KEY


def gemini_workspace(root: Path, base_url: str, *resources: ResourceSpec, **options: Any) -> Any:
    provider: dict[str, Any] = {"type": "gemini", "baseUrl": base_url, "apiKeyEnv": KEY_ENV}
    if options:
        provider["options"] = options
    return make_workspace(root, providers={"gem": provider}, resources=resources)


def test_validate_refuses_an_openai_field_in_a_gemini_request_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batchspec validate` names file:line of a generateContent body holding max_tokens,
    and of a chat line holding logit_bias."""
    spec = {"endpoint": NATIVE, "model": f"models/{MODEL}"}
    ws = gemini_workspace(
        tmp_path,
        "http://127.0.0.1:9",
        ResourceSpec("g", 3, "gem", spec),
        ResourceSpec("c", 2, "gem"),
    )
    lines = native_lines(3)
    lines[1]["body"]["max_tokens"] = 10
    ws.write_input("g", lines)
    chat_lines = request_lines(2)
    chat_lines[1]["body"]["logit_bias"] = {"50256": -100}
    ws.write_input("c", chat_lines)
    code, out, err = run_cli(["validate", str(ws.root)], capsys)
    assert code == 1
    assert "g.jsonl:2" in out + err and "body.max_tokens is an OpenAI chat parameter" in out + err
    assert "c.jsonl:2" in out + err and "body.logit_bias" in out + err


@pytest.mark.parametrize("form", ["chat-inline", "native-file"])
def test_apply_end_to_end_with_a_gemini_provider(
    server: Callable[..., ProbedServer],
    tmp_path: Path,
    api_key: str,
    capsys: pytest.CaptureFixture[str],
    form: str,
) -> None:
    """`batchspec apply --wait` converges on Gemini Batch Mode (inline chat lines, or Gemini
    lines uploaded as a file): results in input order with GenerateContentResponses as
    bodies, one create, and the next plan has nothing to do."""
    srv = server(api_key=SENTINEL_KEY)
    if form == "chat-inline":
        ws = gemini_workspace(tmp_path / "ws", srv.base_url, ResourceSpec("t", 4, "gem"))
    else:
        spec = {"endpoint": NATIVE, "model": f"models/{MODEL}"}
        ws = gemini_workspace(
            tmp_path / "ws", srv.base_url, ResourceSpec("t", 4, "gem", spec), inlineMaxBytes=10
        )
        ws.write_input("t", native_lines(4))

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    outputs = ws.outputs("t")
    assert [r["custom_id"] for r in outputs] == ws.input_ids("t")
    assert all(r["response"]["body"]["candidates"] for r in outputs)
    model = MODEL if form == "native-file" else "test-model"
    assert srv.probe.counts[route_of("POST", f"/v1beta/models/{model}:batchGenerateContent")] == 1
    assert (srv.probe.counts[UPLOAD] > 0) == (form == "native-file")
    code, _, err = run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)
    assert code == 0, err


def test_apply_killed_after_the_create_reached_gemini_adopts_it(
    server: Callable[..., ProbedServer],
    tmp_path: Path,
    api_key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGKILL after the engine created the batch but before its answer arrived: the re-run
    finds it by its display name and adopts it; one create in all, complete results."""
    srv = server(api_key=SENTINEL_KEY)
    ws = gemini_workspace(tmp_path / "ws", srv.base_url, ResourceSpec("t", 3, "gem"))
    create_route = route_of("POST", "/v1beta/models/test-model:batchGenerateContent")
    created = srv.probe.hold(create_route, 30.0, after=True)
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes"),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert created.wait(20), "the create never reached the server"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    srv.probe.release(create_route)
    with ws.store() as store:
        [intent] = store.batches()
    assert (intent.remote_id, intent.status) == (None, "creating")

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    assert srv.probe.counts[create_route] == 1 and srv.batch_count() == 1
    assert [r["custom_id"] for r in ws.outputs("t")] == ws.input_ids("t")
    with ws.store() as store:
        actions = [e.action for e in store.events(resource="t")]
    assert "adopt" in actions and "create" not in actions
