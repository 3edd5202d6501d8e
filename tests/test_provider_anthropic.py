"""The anthropic provider: line mapping, result mapping, and the provider against our server.

The server is the engine's Anthropic dialect (``/v1/messages/batches``) on loopback, behind a
``RequestProbe`` (tests/probes.py) that counts requests per route and can hold one, so a
create whose answer is lost is real timing, not a mock.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from probes import ProbedServer
from servers import jsonl_bytes, read_jsonl, request_lines, wait_for
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, make_workspace, run_cli

from batchspec.core.budget import line_bound
from batchspec.core.sharding import shard_limits
from batchspec.engine import BuiltinUpstream
from batchspec.engine.upstreams import UpstreamResponse
from batchspec.errors import ProviderError
from batchspec.providers.anthropic import AnthropicProvider, _maker, parse_message_batch
from batchspec.providers.base import Provider, RemoteBatch, RemoteNotFound
from batchspec.providers.journal import JournalEntry
from batchspec.wire.anthropic_lines import (
    Unmappable,
    chat_to_params,
    line_problems,
    result_line,
    to_request,
)
from batchspec.wire.outcomes import classify_result_line
from batchspec.wire.usage import max_output_of_request
from batchspec.workspace.manifest import load_workspace

CREATE = "POST /messages/batches"
CHAT = "/v1/chat/completions"
FAST = ["--poll-interval", "0.05"]


# ---------------------------------------------------------------------------------------------
# OpenAI chat -> Anthropic (pure)


def chat(**body: Any) -> dict[str, Any]:
    return {"model": "claude-x", "messages": [{"role": "user", "content": "Hi"}], **body}


def test_chat_body_maps_to_messages_parameters() -> None:
    """System, roles, limits, sampling, stop, user, tools and images map as documented."""
    body = {
        "model": "claude-x",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use JSON."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
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
        "max_completion_tokens": 77,
        "max_tokens": 5,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": "END",
        "user": "u-1",
        "tools": [
            {
                "type": "function",
                "function": {"name": "look", "description": "d", "parameters": {"type": "object"}},
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "n": 1,
        "logprobs": False,
        "response_format": {"type": "text"},
    }
    params = chat_to_params(body)
    assert params == {
        "model": "claude-x",
        "system": "Be brief.\n\nUse JSON.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "call_1", "name": "look", "input": {"q": 1}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"}],
            },
        ],
        "max_tokens": 77,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
        "tools": [{"name": "look", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }


def test_max_tokens_defaults_when_absent() -> None:
    """Anthropic requires max_tokens: 4096 unless the provider's defaultMaxTokens says."""
    assert chat_to_params(chat())["max_tokens"] == 4096
    assert chat_to_params(chat(), default_max_tokens=300)["max_tokens"] == 300
    assert chat_to_params(chat(max_tokens=12))["max_tokens"] == 12


def test_a_null_max_completion_tokens_sends_the_lines_max_tokens() -> None:
    """``max_completion_tokens: null`` beside ``max_tokens: 100`` is sent with 100, the limit
    validate and the budget's bound read (null is not set): it was sent with defaultMaxTokens,
    a request the budget counted at 100 answering up to 64,000 tokens."""
    body = chat(max_completion_tokens=None, max_tokens=100)
    assert chat_to_params(body, default_max_tokens=64_000)["max_tokens"] == 100
    assert max_output_of_request("/v1/chat/completions", body, unset=64_000) == 100


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(chat(n=2), "body.n = 2", id="n"),
        pytest.param(chat(logprobs=True), "body.logprobs", id="logprobs"),
        pytest.param(chat(top_logprobs=3), "body.top_logprobs", id="top_logprobs"),
        pytest.param(chat(response_format={"type": "json_object"}), "response_format", id="json"),
        pytest.param(chat(presence_penalty=0.5), "presence_penalty", id="presence"),
        pytest.param(chat(logit_bias={"1": 2}), "logit_bias", id="logit_bias"),
        pytest.param(chat(seed=7), "body.seed", id="seed"),
        pytest.param(chat(stream=True), "body.stream", id="stream"),
        pytest.param(chat(temperature=1.5), "range is 0-1", id="temperature"),
        pytest.param(chat(store=True), "body.store", id="unknown-key"),
        pytest.param(
            chat(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]),
            "after the conversation started",
            id="late-system",
        ),
        pytest.param(
            chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
            "'input_audio' part",
            id="audio",
        ),
        pytest.param(
            chat(messages=[{"role": "user", "content": "a", "name": "bob"}]),
            "messages[0].name",
            id="name",
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
            "role 'function', which Anthropic does not know",
            id="openai-role-anthropic-lacks",
        ),
        pytest.param(
            chat(messages=[{"role": "system", "content": "a"}]), "needs a user turn", id="sys-only"
        ),
        pytest.param(
            chat(messages=[{"role": "user", "content": 5}]), "string or a list", id="content"
        ),
        pytest.param(
            chat(
                messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            ),
            "data: URL or an http(s) URL",
            id="image-url",
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
        pytest.param(
            chat(
                messages=[
                    {"role": "user", "content": "a"},
                    {"role": "tool", "content": "42", "tool_call_id": "call_1"},
                ]
            ),
            "answers tool call 'call_1', which no earlier assistant message made",
            id="tool-result-without-its-call",
        ),
        pytest.param(
            chat(
                messages=[
                    {"role": "user", "content": "a"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"type": "function", "function": {"name": "f"}}],
                    },
                ]
            ),
            "tool_calls[0].id is missing",
            id="tool-call-without-id",
        ),
        pytest.param(chat(tool_choice={"type": "function"}), "tool_choice", id="choice-no-name"),
        pytest.param(chat(tool_choice="sometimes"), "tool_choice", id="choice-word"),
        pytest.param(chat(tools=[{"type": "retrieval"}]), "only function tools", id="tool-type"),
    ],
)
def test_what_cannot_map_is_refused_with_a_reason(body: dict[str, Any], fragment: str) -> None:
    """Each unmappable parameter raises Unmappable naming it."""
    with pytest.raises(Unmappable) as raised:
        chat_to_params(body)
    assert fragment in raised.value.message


def test_line_forms_and_their_problems() -> None:
    """Native {custom_id, params} and url /v1/messages lines pass as they are; other
    endpoints cannot run; missing max_tokens is a problem for Anthropic's own form."""
    params = {"model": "claude-x", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}]}
    native = {"custom_id": "a", "params": params}
    wrapped = {"custom_id": "b", "method": "POST", "url": "/v1/messages", "body": params}
    assert line_problems(native) == line_problems(wrapped) == []
    assert to_request(native) == {"custom_id": "a", "params": params}
    assert to_request(wrapped) == {"custom_id": "b", "params": params}
    no_limit = {"custom_id": "c", "params": {**params, "max_tokens": None}}
    assert [code for code, _ in line_problems(no_limit)] == ["missing_max_tokens"]
    embed = {"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
    assert [code for code, _ in line_problems(embed)] == ["unsupported_endpoint"]


# ---------------------------------------------------------------------------------------------
# Anthropic results -> our lines (pure)


@pytest.mark.parametrize(
    ("result", "state", "category", "status"),
    [
        pytest.param(
            {"type": "succeeded", "message": {"id": "msg_1", "type": "message"}},
            "ok",
            None,
            200,
            id="succeeded",
        ),
        pytest.param(
            {
                "type": "errored",
                "error": {
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": "bad"},
                },
            },
            "failed",
            "invalid_request_error",
            400,
            id="invalid-request-final",
        ),
        pytest.param(
            {"type": "errored", "error": {"type": "error", "error": {"type": "overloaded_error"}}},
            "retryable",
            "server_error",
            529,
            id="overloaded-retried",
        ),
        pytest.param(
            {"type": "errored", "error": {"type": "error", "error": {"type": "rate_limit_error"}}},
            "retryable",
            "rate_limit",
            429,
            id="rate-limit-retried",
        ),
        pytest.param(
            {"type": "errored", "error": {"type": "error", "error": {"type": "new_kind"}}},
            "failed",
            "new_kind",
            400,
            id="unknown-type-final",
        ),
        pytest.param({"type": "canceled"}, "retryable", "cancelled", None, id="canceled"),
        pytest.param({"type": "expired"}, "retryable", "expired", None, id="expired"),
        pytest.param(
            {"type": "errored", "error": {"type": "overloaded_error", "message": "busy"}},
            "retryable",
            "server_error",
            529,
            id="flat-error-retried",
        ),
        pytest.param(
            {"type": "weird"}, "failed", "anthropic_weird_result", None, id="unknown-result-final"
        ),
    ],
)
def test_results_become_lines_the_reconciler_classifies(
    result: dict[str, Any], state: str, category: str | None, status: int | None
) -> None:
    """Each result type becomes an OpenAI-shaped line with the outcome documented for it."""
    line = result_line("msgbatch_1", {"custom_id": "r1", "result": result})
    assert line["custom_id"] == "r1"
    outcome = classify_result_line(line)
    assert (outcome.state, outcome.category) == (state, category)
    response = line["response"]
    assert (response["status_code"] if response else None) == status
    if result["type"] == "succeeded":
        assert response["body"] == result["message"]


# ---------------------------------------------------------------------------------------------
# The provider against our server


class ScriptedUpstream:
    """The builtin stand-in, but answering ``fail[custom_id]`` (a status) the first
    ``times`` sends of that custom_id; counts sends per custom_id."""

    description = "scripted stand-in"

    def __init__(self, fail: dict[str, int] | None = None, times: int = 1, latency: float = 0.0):
        self.inner = BuiltinUpstream(latency=latency)
        self.fail = fail or {}
        self.times = times
        self.calls: Counter[str] = Counter()

    async def send(self, url: str, body: Any, *, custom_id: str, attempt: int) -> UpstreamResponse:
        self.calls[custom_id] += 1
        status = self.fail.get(custom_id)
        if status is not None and self.calls[custom_id] <= self.times:
            error = {"message": f"scripted {status}", "type": "x", "param": None, "code": None}
            return UpstreamResponse(status, {"error": error})
        return await self.inner.send(url, body, custom_id=custom_id, attempt=attempt)

    async def aclose(self) -> None:
        return None


def provider_for(srv: ProbedServer, data_dir: Path, **kwargs: Any) -> AnthropicProvider:
    options: dict[str, Any] = {"api_key": SENTINEL_KEY, "timeout": 10.0, **kwargs}
    return AnthropicProvider("claude", base_url=srv.base_url, data_dir=data_dir, **options)


def native_lines(count: int, prefix: str = "m") -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "params": {
                "model": "claude-x",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": f"Tell me about item {i}."}],
            },
        }
        for i in range(count)
    ]


def stage(provider: AnthropicProvider, tmp_path: Path, lines: list[dict[str, Any]]) -> str:
    source = tmp_path / f"in-{time.monotonic_ns()}.jsonl"
    source.write_bytes(jsonl_bytes(lines))
    return provider.upload_file(source, filename="in.jsonl").id


def create(provider: AnthropicProvider, file_id: str, key: str = "k1") -> RemoteBatch:
    return provider.create_batch(
        input_file_id=file_id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"batchspec_resource": "r", "batchspec_attempt": key},
    )


def ended(provider: AnthropicProvider, batch_id: str) -> RemoteBatch:
    return wait_for(lambda: (b := provider.get_batch(batch_id)).is_terminal and b)


def download(provider: AnthropicProvider, file_id: str | None, dest: Path) -> list[dict]:
    assert file_id is not None
    provider.download_file(file_id, dest)
    return read_jsonl(dest.read_text())


def test_provider_satisfies_the_protocol(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """AnthropicProvider is a providers.base.Provider."""
    with provider_for(server(), tmp_path / "p") as provider:
        assert isinstance(provider, Provider)


def test_upload_stages_locally_and_create_sends_requests_inline(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """Nothing is sent on upload; one create carries every (converted) request; results come
    back as our output lines with the Anthropic message as body; metadata is journaled."""
    srv = server()
    with provider_for(srv, tmp_path / "p") as provider:
        file_id = stage(provider, tmp_path, request_lines(3, model="claude-x"))
        assert file_id.startswith("staged-")
        assert sum(srv.probe.counts.values()) == 0
        assert provider.get_file(file_id).bytes
        batch = create(provider, file_id)
        done = ended(provider, batch.id)
        assert (done.status, done.endpoint, done.input_file_id) == ("completed", CHAT, file_id)
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed) == (3, 3)
        assert done.error_file_id is None
        lines = download(provider, done.output_file_id, tmp_path / "out.jsonl")
        assert sorted(r["custom_id"] for r in lines) == ["req-0", "req-1", "req-2"]
        message = lines[0]["response"]["body"]
        assert message["type"] == "message" and message["content"][0]["type"] == "text"
        assert [b.metadata["batchspec_attempt"] for b in provider.list_batches()] == ["k1"]
    assert srv.probe.counts[CREATE] == 1
    [stored] = srv.engine.list_batches(None, 100)["data"]
    requests = read_jsonl(srv.engine.file_content_path(stored["input_file_id"]).read_text())
    assert requests[0]["body"]["max_tokens"] == 4096  # converted, with the default


def test_a_batchs_results_are_there_while_the_batch_is(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """`get_file` of a batch's results id answers while the batch exists and is
    RemoteNotFound for an unknown batch: a drain asks it before writing a retired batch's
    answers off as gone after a 404 on the results (it was RemoteNotFound for every results
    id, so a passing 404 settled the batch without its answers, paid again by the next)."""
    srv = server()
    with provider_for(srv, tmp_path / "p") as provider:
        done = ended(provider, create(provider, stage(provider, tmp_path, native_lines(2))).id)
        assert done.output_file_id is not None
        assert provider.get_file(done.output_file_id).id == done.output_file_id
        with pytest.raises(RemoteNotFound):
            provider.get_file(done.output_file_id.replace(done.id, "msgbatch_unknown"))


@pytest.mark.parametrize(
    "counts",
    [None, {}, {"succeeded": None, "errored": None}],
    ids=["missing", "empty", "nulls"],
)
def test_an_ended_batch_whose_counts_cannot_be_read_offers_both_result_parts(
    counts: Any,
) -> None:
    """An ended batch without readable ``request_counts`` (a gateway trimming the object)
    offers its succeeded and its failed results both: offered neither, it was recorded
    ended with nothing to collect, and every answered request was sent again and paid for
    again."""
    data = {"id": "msgbatch_1", "processing_status": "ended", "request_counts": counts}
    batch = parse_message_batch(data, None)
    assert batch.status == "completed"
    assert batch.output_file_id == "results:succeeded:msgbatch_1"
    assert batch.error_file_id == "results:failed:msgbatch_1"


def test_errored_results_keep_their_status_and_are_split_from_successes(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """An upstream 529 is an errored overloaded_error (retryable), an unsupported parameter
    an errored invalid_request_error (final); both in the failed part only."""
    srv = server(upstream=ScriptedUpstream(fail={"m-1": 529}, times=99), max_attempts=1)
    lines = native_lines(3)
    lines[2]["params"]["thinking"] = {"type": "enabled", "budget_tokens": 10}
    with provider_for(srv, tmp_path / "p") as provider:
        done = ended(provider, create(provider, stage(provider, tmp_path, lines)).id)
        assert done.status == "completed"
        assert done.request_counts is not None and done.request_counts.failed == 2
        good = download(provider, done.output_file_id, tmp_path / "ok.jsonl")
        bad = {r["custom_id"]: r for r in download(provider, done.error_file_id, tmp_path / "e")}
    assert [r["custom_id"] for r in good] == ["m-0"]
    assert bad["m-1"]["response"]["status_code"] == 529
    assert classify_result_line(bad["m-1"]).state == "retryable"
    assert bad["m-2"]["response"]["status_code"] == 400
    assert "thinking" in bad["m-2"]["response"]["body"]["error"]["message"]
    assert classify_result_line(bad["m-2"]).state == "failed"


def test_cancel_ends_the_batch_cancelled_with_unrun_requests_cancelled(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """canceling -> cancelling, then ended with a cancel -> cancelled; requests that never
    ran are batch_cancelled lines (retryable)."""
    srv = server(upstream=BuiltinUpstream(latency=0.5), concurrency=1)
    with provider_for(srv, tmp_path / "p") as provider:
        batch = create(provider, stage(provider, tmp_path, native_lines(6)))
        wait_for(lambda: provider.get_batch(batch.id).status == "in_progress")
        assert provider.cancel_batch(batch.id).status in ("cancelling", "cancelled")
        done = ended(provider, batch.id)
        assert done.status == "cancelled"
        lines = download(provider, done.error_file_id, tmp_path / "e.jsonl")
    assert lines and all(r["error"]["code"] == "batch_cancelled" for r in lines)


def test_expiry_ends_the_batch_expired(server: Callable[..., ProbedServer], tmp_path: Path) -> None:
    """A batch whose deadline passes ends expired, its unrun requests batch_expired."""
    srv = server(
        upstream=BuiltinUpstream(latency=0.5), concurrency=1, completion_window_seconds=0.8
    )
    with provider_for(srv, tmp_path / "p") as provider:
        done = ended(provider, create(provider, stage(provider, tmp_path, native_lines(6))).id)
        assert done.status == "expired"
        lines = download(provider, done.error_file_id, tmp_path / "e.jsonl")
    assert lines and all(r["error"]["code"] == "batch_expired" for r in lines)


def test_create_again_with_the_same_metadata_returns_the_journaled_batch(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """A second create with the same metadata (a re-run that lost its state of the create)
    returns the batch made first; a fresh provider on the same data folder lists it with its
    metadata, so the reconciler's adoption by metadata works."""
    srv = server()
    with provider_for(srv, tmp_path / "p") as first:
        made = create(first, stage(first, tmp_path, native_lines(2)))
    with provider_for(srv, tmp_path / "p") as second:
        again = create(second, stage(second, tmp_path, native_lines(2)))
        listed = next(iter(second.list_batches()))
    assert again.id == made.id
    assert listed.metadata == {"batchspec_resource": "r", "batchspec_attempt": "k1"}
    assert srv.probe.counts[CREATE] == 1


def test_lost_answer_refuses_while_unsure_then_adopts_by_custom_ids(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """The create's answer never arrives (held past the client's timeout): while the batch it
    made is in progress the provider refuses to create another, naming it; once it has
    ended, its custom_ids match and it is adopted. One create reached the server."""
    srv = server(upstream=BuiltinUpstream(latency=0.3), concurrency=1)
    srv.probe.hold(CREATE, 5.0, after=True)
    with provider_for(srv, tmp_path / "p", timeout=0.5, max_retries=0) as provider:
        file_id = stage(provider, tmp_path, native_lines(3))
        with pytest.raises(ProviderError) as unsure:
            create(provider, file_id)
        srv.probe.release(CREATE)
        [made] = srv.engine.list_batches(None, 100)["data"]
        anthropic_id = "msgbatch_" + made["id"].removeprefix("batch_")
        assert anthropic_id in str(unsure.value)
        assert "cannot be checked until it has ended" in str(unsure.value)
        wait_for(lambda: srv.engine.get_batch(made["id"])["status"] == "completed")
        adopted = create(provider, file_id)
    assert adopted.id == anthropic_id
    assert adopted.metadata["batchspec_attempt"] == "k1"
    assert srv.probe.counts[CREATE] == 1


def test_lost_create_that_made_nothing_is_sent_again(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """A create refused before the engine saw it leaves the journal unconfirmed; the next
    create finds no candidate and sends it: exactly one batch exists."""
    srv = server()
    srv.probe.hold(CREATE, 0.1, drop=True)
    with provider_for(srv, tmp_path / "p", max_retries=0) as provider:
        file_id = stage(provider, tmp_path, native_lines(2))
        with pytest.raises(ProviderError):
            create(provider, file_id)
        srv.probe.release(CREATE)
        made = create(provider, file_id)
    assert [b["id"] for b in srv.engine.list_batches(None, 100)["data"]] == [
        "batch_" + made.id.removeprefix("msgbatch_")
    ]


def test_lost_create_ignores_a_foreign_batch_of_the_same_size(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """After a lost create, an ended batch with the same request count but other custom_ids
    (someone else's) is not adopted: the create is sent."""
    srv = server()
    srv.probe.hold(CREATE, 0.1, drop=True)
    with provider_for(srv, tmp_path / "p", max_retries=0) as provider:
        file_id = stage(provider, tmp_path, native_lines(2))
        with pytest.raises(ProviderError):
            create(provider, file_id)
        srv.probe.release(CREATE)
        foreign = httpx.post(
            f"{srv.base_url}/v1/messages/batches",
            headers={"x-api-key": SENTINEL_KEY, "anthropic-version": "2023-06-01"},
            json={"requests": native_lines(2, prefix="other")},
        ).json()
        wait_for(lambda: provider.get_batch(foreign["id"]).is_terminal)
        made = create(provider, file_id)
    assert made.id != foreign["id"]
    assert srv.probe.counts[CREATE] == 3  # dropped, foreign, ours


def test_oversized_batches_are_refused_before_sending(
    server: Callable[..., ProbedServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the request cap, the provider says to lower maxRequestsPerBatch and sends nothing."""
    monkeypatch.setattr("batchspec.providers.anthropic.MAX_REQUESTS", 2)
    srv = server()
    with (
        provider_for(srv, tmp_path / "p") as provider,
        pytest.raises(ProviderError, match="maxRequestsPerBatch"),
    ):
        create(provider, stage(provider, tmp_path, native_lines(3)))
    assert srv.probe.counts[CREATE] == 0


def test_wrong_key_is_a_clear_401(server: Callable[..., ProbedServer], tmp_path: Path) -> None:
    """A wrong x-api-key: HTTP 401 naming $ANTHROPIC_API_KEY, the key never shown."""
    srv = server()
    wrong = "sk-ant-wrong-0123456789abcdef"
    with (
        provider_for(srv, tmp_path / "p", api_key=wrong, max_retries=0) as provider,
        pytest.raises(ProviderError) as raised,
    ):
        next(iter(provider.list_batches()))
    assert raised.value.status == 401
    assert "$ANTHROPIC_API_KEY" in str(raised.value) and wrong not in str(raised.value)


# ---------------------------------------------------------------------------------------------
# validate and apply with an anthropic provider


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    return SENTINEL_KEY


def anthropic_workspace(root: Path, base_url: str, *resources: ResourceSpec) -> Any:
    provider = {"type": "anthropic", "baseUrl": base_url, "apiKeyEnv": KEY_ENV}
    return make_workspace(root, providers={"claude": provider}, resources=resources)


def test_anthropic_providers_shard_at_100k_requests(tmp_path: Path) -> None:
    """apply splits anthropic inputs at 100,000 requests (Anthropic's inline cap)."""
    ws = anthropic_workspace(tmp_path, "http://127.0.0.1:9", ResourceSpec("t", 1, "claude"))
    workspace = load_workspace([str(ws.root)])
    assert shard_limits(workspace, workspace.resources[0]).max_requests == 100_000


def test_validate_reports_unmappable_lines_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batchspec validate` fails on a chat line Anthropic cannot take, at its line."""
    ws = anthropic_workspace(tmp_path, "http://127.0.0.1:9", ResourceSpec("t", 3, "claude"))
    lines = request_lines(3)
    lines[1]["body"]["n"] = 3
    ws.write_input("t", lines)
    code, out, err = run_cli(["validate", str(ws.root)], capsys)
    assert code == 1
    assert "t.jsonl:2" in out + err and "body.n = 3" in out + err


def test_a_dollar_budget_bounds_lines_without_a_limit_at_the_providers_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chat line that sets no max_tokens goes to Anthropic with the provider's
    defaultMaxTokens: the plan's bound, and so its dollar budget, count that (it counted
    4,096 whatever the option said); the re-reads of a retry or a kept-answers generation
    (budget.line_bound) count each line as the scan does."""
    provider = {
        "type": "anthropic",
        "baseUrl": "http://127.0.0.1:9",
        "apiKeyEnv": KEY_ENV,
        "options": {"defaultMaxTokens": 20_000},
        "pricing": {"*": {"input": 1.0, "output": 2.0}},
    }
    spec = {"budget": {"maxCostUSD": 0.05}}
    ws = make_workspace(
        tmp_path, providers={"claude": provider}, resources=[ResourceSpec("t", 3, "claude", spec)]
    )
    lines = request_lines(3)
    lines[2]["body"]["max_tokens"] = 100  # a limit of its own still bounds its line
    ws.write_input("t", lines)

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 1, err  # 40,100 output tokens at $2/M: over $0.05 (8,292 were under)
    assert json.loads(out)["estimates"]["t"]["max_output_tokens"] == 2 * 20_000 + 100
    assert "maxCostUSD 0.05" in err
    assert "a request that sets none counts 20,000 (the provider's defaultMaxTokens)" in err

    workspace = load_workspace([str(ws.root)])
    bound = line_bound(workspace.resources[0], workspace.project.providers)
    assert [bound(line) for line in lines] == [20_000, 20_000, 100]


def test_validate_accepts_anthropic_lines_only_for_the_messages_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """{custom_id, params} lines validate with endpoint /v1/messages, not with chat."""
    spec = {"endpoint": "/v1/messages", "model": "claude-x"}
    ws = anthropic_workspace(tmp_path, "http://127.0.0.1:9", ResourceSpec("t", 2, "claude", spec))
    ws.write_input("t", native_lines(2))
    assert run_cli(["validate", str(ws.root)], capsys)[0] == 0
    ws2 = anthropic_workspace(tmp_path / "2", "http://127.0.0.1:9", ResourceSpec("t", 2, "claude"))
    ws2.write_input("t", native_lines(2))
    code, out, err = run_cli(["validate", str(ws2.root)], capsys)
    assert code == 1 and "needs the endpoint '/v1/messages'" in out + err


@pytest.mark.parametrize("form", ["chat", "native"])
def test_apply_end_to_end_with_an_anthropic_provider(
    server: Callable[..., ProbedServer],
    tmp_path: Path,
    api_key: str,
    capsys: pytest.CaptureFixture[str],
    form: str,
) -> None:
    """`batchspec apply --wait` converges on Message Batches: results in input order with
    messages as bodies, a final error in the errors file, one create and no file upload."""
    srv = server()
    spec = {} if form == "chat" else {"endpoint": "/v1/messages", "model": "claude-x"}
    ws = anthropic_workspace(tmp_path / "ws", srv.base_url, ResourceSpec("t", 4, "claude", spec))
    if form == "chat":
        lines = request_lines(4)
    else:  # the last request asks for a parameter the engine refuses: a final 400
        lines = native_lines(4)
        refused = {**lines[3]["params"], "thinking": {"type": "enabled"}}
        lines[3] = {"custom_id": "bad", "params": refused}
    ws.write_input("t", lines)

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    outputs = ws.outputs("t")
    expected = ws.input_ids("t")[: 4 if form == "chat" else 3]
    assert [r["custom_id"] for r in outputs] == expected
    assert all(r["response"]["body"]["type"] == "message" for r in outputs)
    if form == "native":
        [bad] = ws.errors("t")
        assert (bad["custom_id"], bad["response"]["status_code"]) == ("bad", 400)
    assert srv.probe.counts[CREATE] == 1
    assert not any(route.endswith("/files") for route in srv.probe.counts)


def test_apply_retries_an_overloaded_request_in_a_second_batch(
    server: Callable[..., ProbedServer],
    tmp_path: Path,
    api_key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An errored overloaded_error (529) is retried by apply in attempt 2 with only that
    request, and the resource converges complete."""
    upstream = ScriptedUpstream(fail={"req-2": 529}, times=1)
    srv = server(upstream=upstream, max_attempts=1)
    ws = anthropic_workspace(tmp_path / "ws", srv.base_url, ResourceSpec("t", 4, "claude"))
    ws.write_input("t", request_lines(4))

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("t")] == ws.input_ids("t")
    assert srv.probe.counts[CREATE] == 2
    assert upstream.calls["req-2"] == 2 and upstream.calls["req-0"] == 1
    second = srv.engine.list_batches(None, 100)["data"][0]
    requests = read_jsonl(srv.engine.file_content_path(second["input_file_id"]).read_text())
    assert [r["custom_id"] for r in requests] == ["req-2"]
    assert requests[0]["url"] == "/v1/messages"


def test_import_adopts_a_batch_made_outside_batchspec_with_force(
    server: Callable[..., ProbedServer],
    tmp_path: Path,
    api_key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A Message Batch created elsewhere has no input file to verify: `import` refuses it
    unless --force; forced, the next apply collects it without creating anything."""
    srv = server()
    spec = {"endpoint": "/v1/messages", "model": "claude-x"}
    ws = anthropic_workspace(tmp_path / "ws", srv.base_url, ResourceSpec("t", 3, "claude", spec))
    ws.write_input("t", native_lines(3))
    made = httpx.post(
        f"{srv.base_url}/v1/messages/batches",
        headers={"x-api-key": SENTINEL_KEY, "anthropic-version": "2023-06-01"},
        json={"requests": native_lines(3)},
    ).json()

    code, out, err = run_cli(["import", "t", made["id"], str(ws.root)], capsys)
    assert code == 1 and "--force" in out + err
    assert run_cli(["import", "t", made["id"], str(ws.root), "--force"], capsys)[0] == 0
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("t")] == ["m-0", "m-1", "m-2"]
    assert srv.probe.counts[CREATE] == 1  # the outside create only


def test_a_listing_from_a_cursor_sends_after_id_and_lists_the_older_batches(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """``list_batches(after=...)`` starts Anthropic's listing at that batch with ``after_id``
    (its cursor's name; ``after`` would be ignored, the listing read from the top), newest
    first, paging on from there; a cursor it refuses raises."""
    srv = server()
    with provider_for(srv, tmp_path / "p") as provider:
        lines = request_lines(1, model="claude-x")
        made = [
            create(provider, stage(provider, tmp_path, lines), key=f"k{n}").id for n in range(4)
        ]
        newest_first = made[::-1]
        srv.probe.targets.clear()
        listed = [b.id for b in provider.list_batches(page_size=2, after=newest_first[0])]
        assert listed == newest_first[1:]
        assert [t.split("?", 1)[1] for t in srv.probe.targets] == [
            f"limit=2&after_id={newest_first[0]}",
            f"limit=2&after_id={newest_first[2]}",
        ]
        with pytest.raises(ProviderError):
            next(iter(provider.list_batches(after="msgbatch_unknown")))


def _lost(name: str, started_at: float) -> JournalEntry:
    """A create of ``name`` sent at ``started_at`` whose answer never came (3 requests)."""
    return JournalEntry(
        name, {"batchspec_resource": name}, "/v1/messages", "f", 3, "ids", started_at
    )


@pytest.mark.parametrize(
    ("alpha_sent", "rival_sent", "maker"),
    [
        pytest.param(1_130.0, None, "alpha", id="no-rival"),
        pytest.param(1_130.0, 1_099.5, "beta", id="rival-sent-before-it-was-made"),
        pytest.param(1_130.0, 1_099.5 - 86_400, "alpha", id="rival-lingering-from-yesterday"),
        pytest.param(1_100.5, 1_099.5, None, id="too-close-to-tell"),
    ],
)
def test_the_maker_of_a_batch_two_lost_creates_could_have_made(
    alpha_sent: float, rival_sent: float | None, maker: str | None
) -> None:
    """A batch with alpha's custom_ids made at 1,100, alpha's lost create sent at
    ``alpha_sent`` (within its clock slack). beta's lost create sent just before the batch
    was made, alpha's half a minute after it: beta's. beta's sent a day ago (a row
    lingering, its resource gone): no rival. Both sent within a second of it: no telling."""
    alpha = _lost("alpha", alpha_sent)
    rivals = [] if rival_sent is None else [_lost("beta", rival_sent)]
    made = _maker(RemoteBatch("msgbatch_1", "completed", created_at=1_100), alpha, rivals)
    assert (made.key if made is not None else None) == maker
