"""The official ``anthropic`` SDK as a client of our server's Message Batches dialect.

Real uvicorn on 127.0.0.1, the engine behind it (builtin stand-in upstream, or the stand-in
served over HTTP as an OpenAI-compatible upstream), the SDK's own request building, paging
and JSONL decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from servers import EngineServer, wait_for

from batchspec.engine import BuiltinUpstream, HttpUpstream
from batchspec.engine.messages_upstream import (
    UnsupportedMessages,
    chat_to_message,
    messages_to_chat,
)

KEY = "sk-ant-test-key-0123456789"
ServeEngine = Callable[..., EngineServer]


def client(server: EngineServer, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=key, max_retries=0, timeout=10)


def requests(count: int, prefix: str = "r", **params: Any) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "params": {
                "model": "claude-test",
                "max_tokens": 100,
                "messages": [{"role": "user", "content": f"Tell me about item {i}, please."}],
                **params,
            },
        }
        for i in range(count)
    ]


def ended(sdk: anthropic.Anthropic, batch_id: str) -> Any:
    return wait_for(
        lambda: (b := sdk.messages.batches.retrieve(batch_id)).processing_status == "ended" and b
    )


def test_create_retrieve_results_cycle(serve_engine: ServeEngine) -> None:
    """create -> in_progress with every request processing; ended with every request
    succeeded; results decode as messages answering each custom_id."""
    sdk = client(serve_engine(api_key=KEY))
    batch = sdk.messages.batches.create(
        requests=requests(3, system="Answer briefly.", temperature=0.2, stop_sequences=["END"])
    )
    assert batch.id.startswith("msgbatch_") and batch.type == "message_batch"
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 3 and batch.results_url is None
    assert batch.expires_at > batch.created_at
    done = ended(sdk, batch.id)
    counts = done.request_counts
    assert (counts.succeeded, counts.errored, counts.processing) == (3, 0, 0)
    assert done.ended_at is not None and done.results_url
    results = {r.custom_id: r.result for r in sdk.messages.batches.results(batch.id)}
    assert sorted(results) == ["r-0", "r-1", "r-2"]
    message = results["r-1"].message  # type: ignore[union-attr]
    assert results["r-1"].type == "succeeded"
    assert message.role == "assistant" and message.stop_reason == "end_turn"
    assert "item 1" in message.content[0].text  # type: ignore[union-attr]
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_list_pages_with_after_id_and_before_id(serve_engine: ServeEngine) -> None:
    """Newest first; the SDK's auto-paging follows after_id; before_id pages back."""
    sdk = client(serve_engine(api_key=KEY))
    made = [sdk.messages.batches.create(requests=requests(1, prefix=f"b{i}")).id for i in range(5)]
    newest_first = list(reversed(made))
    assert [b.id for b in sdk.messages.batches.list(limit=2)] == newest_first
    page = sdk.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2] and page.has_more
    after = sdk.messages.batches.list(limit=2, after_id=newest_first[1])
    assert [b.id for b in after.data] == newest_first[2:4]
    before = sdk.messages.batches.list(limit=2, before_id=newest_first[3])
    assert [b.id for b in before.data] == newest_first[1:3]
    assert before.has_more


def test_cancel_then_results_hold_canceled_requests(serve_engine: ServeEngine) -> None:
    """cancel -> canceling (cancel_initiated_at set) -> ended; unrun requests are canceled."""
    server = serve_engine(api_key=KEY, upstream=BuiltinUpstream(latency=0.4), concurrency=1)
    sdk = client(server)
    batch = sdk.messages.batches.create(requests=requests(5))
    cancelled = sdk.messages.batches.cancel(batch.id)
    assert cancelled.processing_status in ("canceling", "ended")
    assert cancelled.cancel_initiated_at is not None
    done = ended(sdk, batch.id)
    assert done.request_counts.canceled >= 1
    assert done.request_counts.canceled + done.request_counts.succeeded == 5
    kinds = [r.result.type for r in sdk.messages.batches.results(batch.id)]
    assert kinds.count("canceled") == done.request_counts.canceled


def test_delete_only_once_ended(serve_engine: ServeEngine) -> None:
    """Deleting an in-progress batch is refused (400); an ended one is deleted and gone."""
    server = serve_engine(api_key=KEY, upstream=BuiltinUpstream(latency=0.3), concurrency=1)
    sdk = client(server)
    batch = sdk.messages.batches.create(requests=requests(2))
    with pytest.raises(anthropic.BadRequestError, match="only once it has ended"):
        sdk.messages.batches.delete(batch.id)
    ended(sdk, batch.id)
    deleted = sdk.messages.batches.delete(batch.id)
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.batches.retrieve(batch.id)
    assert server.engine.list_batches(None, 100)["data"] == []


def test_results_before_the_end_are_refused(serve_engine: ServeEngine) -> None:
    """The results of a batch still processing are not served (the SDK refuses first, and
    the raw route answers 400)."""
    server = serve_engine(api_key=KEY, upstream=BuiltinUpstream(latency=0.5), concurrency=1)
    sdk = client(server)
    batch = sdk.messages.batches.create(requests=requests(2))
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        sdk.messages.batches.results(batch.id)
    answer = httpx.get(
        f"{server.base_url}/v1/messages/batches/{batch.id}/results",
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
    )
    assert answer.status_code == 400 and answer.json()["type"] == "error"


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        pytest.param([], "non-empty list", id="empty"),
        pytest.param([{"custom_id": "a.b", "params": {}}], "custom_id", id="bad-id"),
        pytest.param(requests(1) + requests(1), "used twice", id="duplicate"),
        pytest.param(
            [{"custom_id": "a", "params": {"model": "m", "messages": [{"role": "user"}]}}],
            "max_tokens",
            id="no-max-tokens",
        ),
    ],
)
def test_invalid_creates_are_400_invalid_request(
    serve_engine: ServeEngine, payload: list[Any], fragment: str
) -> None:
    """Creates Anthropic would refuse are refused the same way: 400 invalid_request_error."""
    sdk = client(serve_engine(api_key=KEY))
    with pytest.raises(anthropic.BadRequestError, match=fragment) as raised:
        sdk.messages.batches.create(requests=payload)
    assert raised.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_auth_and_version_headers(serve_engine: ServeEngine) -> None:
    """A wrong key is 401 authentication_error; a request without anthropic-version is 400."""
    server = serve_engine(api_key=KEY)
    with pytest.raises(anthropic.AuthenticationError) as raised:
        client(server, key="sk-ant-wrong").messages.batches.list()
    assert raised.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    answer = httpx.get(f"{server.base_url}/v1/messages/batches", headers={"x-api-key": KEY})
    assert answer.status_code == 400 and "anthropic-version" in answer.text


def test_unknown_batch_is_404_not_found_error(serve_engine: ServeEngine) -> None:
    """An unknown id is NotFoundError; an OpenAI-dialect batch is not a Message Batch."""
    server = serve_engine(api_key=KEY)
    sdk = client(server)
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.batches.retrieve("msgbatch_nope")
    openai_file = server.engine.create_file(
        b'{"custom_id":"x","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"a"}}\n',
        "in.jsonl",
        "batch",
    )
    batch = server.engine.create_batch(openai_file["id"], "/v1/embeddings", "24h")
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.batches.retrieve("msgbatch_" + batch["id"].removeprefix("batch_"))
    assert [b.id for b in sdk.messages.batches.list()] == []


def test_errored_requests_carry_anthropic_error_objects(serve_engine: ServeEngine) -> None:
    """A parameter the engine cannot honour makes that request errored (invalid_request_error);
    the others succeed."""
    sdk = client(serve_engine(api_key=KEY))
    mixed = requests(2)
    mixed[1]["params"]["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    batch = sdk.messages.batches.create(requests=mixed)
    done = ended(sdk, batch.id)
    assert (done.request_counts.succeeded, done.request_counts.errored) == (1, 1)
    results = {r.custom_id: r.result for r in sdk.messages.batches.results(batch.id)}
    errored = results["r-1"]
    assert errored.type == "errored"
    assert errored.error.error.type == "invalid_request_error"  # type: ignore[union-attr]
    assert "thinking" in errored.error.error.message  # type: ignore[union-attr]


def test_an_openai_compatible_upstream_runs_messages_as_chat_completions(
    serve_engine: ServeEngine, standin_upstream: Callable[..., Any], tmp_path: Path
) -> None:
    """Over an HTTP upstream serving only OpenAI routes, each Messages request reaches it as
    a chat completion and its answer comes back as a message."""
    upstream = standin_upstream()
    server = serve_engine(api_key=KEY, upstream=HttpUpstream(upstream.v1))
    sdk = client(server)
    batch = sdk.messages.batches.create(requests=requests(2, system="Be kind."))
    ended(sdk, batch.id)
    results = [r.result for r in sdk.messages.batches.results(batch.id)]
    assert [r.type for r in results] == ["succeeded", "succeeded"]
    assert sum(upstream.calls.values()) == 2
    assert results[0].message.content[0].text.startswith("[builtin stand-in]")  # type: ignore[union-attr]


def test_messages_map_to_chat_and_back() -> None:
    """The engine-side mapping: system, blocks, tools and limits to chat; a chat completion
    with a tool call back to a message with tool_use, stop reason and usage."""
    chat = messages_to_chat(
        {
            "model": "m",
            "system": [{"type": "text", "text": "Be kind."}],
            "max_tokens": 50,
            "top_k": 5,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u"},
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Look"},
                        {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}],
                },
            ],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        }
    )
    assert chat["messages"][0] == {"role": "system", "content": "Be kind."}
    assert chat["messages"][1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "https://x/a.png"},
    }
    assert chat["messages"][2]["tool_calls"][0]["function"] == {
        "name": "f",
        "arguments": '{"a": 1}',
    }
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "t1", "content": "ok"}
    assert (chat["max_tokens"], chat["top_k"], chat["stop"], chat["user"]) == (50, 5, ["END"], "u")
    assert (chat["tool_choice"], chat["parallel_tool_calls"]) == ("required", False)
    with pytest.raises(UnsupportedMessages, match="thinking"):
        messages_to_chat({"model": "m", "max_tokens": 1, "messages": [], "thinking": {}})
    message = chat_to_message(
        {
            "id": "chatcmpl-1",
            "model": "m",
            "choices": [
                {
                    "message": {
                        "content": "Sure.",
                        "tool_calls": [
                            {"id": "c1", "function": {"name": "f", "arguments": '{"x": 2}'}}
                        ],
                    },
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3},
        },
        model="m",
    )
    assert message["content"] == [
        {"type": "text", "text": "Sure."},
        {"type": "tool_use", "id": "c1", "name": "f", "input": {"x": 2}},
    ]
    assert message["stop_reason"] == "tool_use"
    assert (message["usage"]["input_tokens"], message["usage"]["output_tokens"]) == (7, 3)


def _one(**params: Any) -> dict[str, Any]:
    [item] = requests(1)
    return {**item, "params": {**item["params"], **params}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({"requests": []}, "a non-empty list of requests", id="none"),
        pytest.param({"requests": ["text"]}, "requests.0: must be an object", id="not-object"),
        pytest.param({"requests": [{"custom_id": "a"}]}, "0.params: Field", id="no-params"),
        pytest.param({"requests": [_one(model="")]}, "requests.0.params.model", id="no-model"),
        pytest.param({"requests": [_one(max_tokens=0)]}, "max_tokens: Field", id="max-tokens-0"),
        pytest.param({"requests": [_one(messages=[])]}, "messages: Field", id="no-messages"),
    ],
)
def test_a_create_anthropic_would_refuse_is_a_400_naming_the_request(
    serve_engine: ServeEngine, body: dict[str, Any], message: str
) -> None:
    """A Message Batch create Anthropic refuses (no requests, a request that is not an object,
    params missing or without model, max_tokens or messages) is a 400 naming the request and
    field, and no batch is made (nothing runs on a half-valid batch)."""
    server = serve_engine(api_key=KEY)
    answer = httpx.post(
        f"{server.base_url}/v1/messages/batches",
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        json=body,
    )
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]
    assert server.engine.list_batches(None, 100)["data"] == []


def test_listing_and_naming_batches_anthropic_would_refuse(serve_engine: ServeEngine) -> None:
    """Both cursors at once, a cursor naming no batch, a limit that is not an integer or out
    of 1..1000 are 400s; an id without the msgbatch_ prefix is a 404; a cancel of an ended
    batch answers it ended (its results stay collectable), not an error."""
    server = serve_engine(api_key=KEY)
    sdk = client(server)
    url = f"{server.base_url}/v1/messages/batches"
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    batch = sdk.messages.batches.create(requests=requests(1))
    ended(sdk, batch.id)
    refused = {
        "both cursors": {"after_id": batch.id, "before_id": batch.id},
        "unknown cursor": {"after_id": "msgbatch_nope"},
        "limit not int": {"limit": "ten"},
        "limit 0": {"limit": "0"},
    }
    for why, params in refused.items():
        assert httpx.get(url, headers=headers, params=params).status_code == 400, why
    assert httpx.get(f"{url}/batch_123", headers=headers).status_code == 404

    cancelled = sdk.messages.batches.cancel(batch.id)
    assert (cancelled.processing_status, cancelled.request_counts.succeeded) == ("ended", 1)
