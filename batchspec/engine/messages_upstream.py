"""Run Anthropic Messages requests (``/v1/messages`` lines) on any engine upstream.

The engine's upstreams speak OpenAI (the builtin stand-in, vLLM, Ollama, a LiteLLM proxy...).
``MessagesUpstream`` wraps one: a line whose ``url`` is ``/v1/messages`` is converted to a
chat completion request, sent as ``/v1/chat/completions``, and the answer converted back to a
Messages-API ``message``; every other line passes through untouched. So the Anthropic
dialect of ``batchspec serve`` (``anthropic_routes.py``) and ``/v1/messages`` batches in the
OpenAI dialect run wherever chat completions run.

Request mapping (Messages -> chat): ``system`` (a string or text blocks) becomes the first
system message; text blocks stay text parts; ``image`` blocks become ``image_url`` parts
(base64 sources as data URLs); ``tool_use`` blocks become assistant ``tool_calls``;
``tool_result`` blocks become ``tool`` messages; ``max_tokens``, ``temperature``, ``top_p``
map as they are, ``top_k`` is passed through (vLLM and Ollama understand it),
``stop_sequences`` becomes ``stop``, ``metadata.user_id`` ``user``, ``tools`` /
``tool_choice`` / ``disable_parallel_tool_use`` their function-calling equivalents. Anything
else (``thinking``, documents, ``stream``...) is answered 400 ``invalid_request_error``: the
engine will not pretend to honour a parameter it drops.

Answer mapping (chat -> message): the first choice's text becomes a text block and its tool
calls ``tool_use`` blocks; ``finish_reason`` stop -> ``end_turn`` (OpenAI does not say
whether a stop sequence matched), length -> ``max_tokens``, tool_calls -> ``tool_use``,
content_filter -> ``refusal``; usage prompt/completion tokens -> input/output tokens. An
error answer keeps its status, with Anthropic's ``{"type": "error", "error": {type,
message}}`` body.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from batchspec.engine.chat_bridge import ChatBridge
from batchspec.engine.upstreams import Upstream
from batchspec.wire.anthropic_lines import STATUS_ERROR_TYPE

MESSAGES_PATHS = ("/v1/messages", "/messages")

_PASSED = ("max_tokens", "temperature", "top_p", "top_k")
_HANDLED = frozenset(
    {
        "model",
        "messages",
        "system",
        "stop_sequences",
        "metadata",
        "tools",
        "tool_choice",
        *_PASSED,
    }
)
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class UnsupportedMessages(ValueError):
    """A Messages request the engine cannot run on a chat-completions upstream."""


class MessagesUpstream(ChatBridge):
    """An ``Upstream`` that also runs ``/v1/messages`` lines (see the module docstring)."""

    def __init__(self, inner: Upstream) -> None:
        super().__init__(
            inner,
            urls=MESSAGES_PATHS,
            to_chat=messages_to_chat,
            from_chat=chat_to_message,
            error_body=error_body,
            unsupported=UnsupportedMessages,
        )


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope for an HTTP status."""
    fallback = "api_error" if status >= 500 else "invalid_request_error"
    kind = STATUS_ERROR_TYPE.get(status) or fallback
    return {"type": "error", "error": {"type": kind, "message": message}}


# ---------------------------------------------------------------------------------------------
# Messages -> chat completions


def messages_to_chat(params: Any) -> dict[str, Any]:
    """An OpenAI chat body for Messages ``params``; ``UnsupportedMessages`` if impossible."""
    if not isinstance(params, Mapping):
        raise UnsupportedMessages("The request parameters must be an object.")
    unknown = sorted(k for k in params if k not in _HANDLED)
    if unknown:
        raise UnsupportedMessages(
            f"{', '.join(unknown)}: not supported by the local engine, which runs Messages "
            "requests as chat completions."
        )
    chat: dict[str, Any] = {"model": params.get("model")}
    messages: list[dict[str, Any]] = []
    system = params.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system, "system")})
    raw = params.get("messages")
    if not isinstance(raw, list) or not raw:
        raise UnsupportedMessages("messages: must be a non-empty list.")
    for index, message in enumerate(raw):
        messages.extend(_chat_messages(message, f"messages.{index}"))
    chat["messages"] = messages
    for key in _PASSED:
        if params.get(key) is not None:
            chat[key] = params[key]
    if params.get("stop_sequences"):
        chat["stop"] = list(params["stop_sequences"])
    metadata = params.get("metadata")
    if isinstance(metadata, Mapping) and metadata.get("user_id"):
        chat["user"] = str(metadata["user_id"])
    _tools_to_chat(params, chat)
    return chat


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for block in content:
            if not isinstance(block, Mapping) or block.get("type") != "text":
                raise UnsupportedMessages(f"{where}: only text blocks are supported here.")
            texts.append(str(block.get("text", "")))
        return "\n".join(texts)
    raise UnsupportedMessages(f"{where}: must be a string or a list of blocks.")


def _chat_messages(message: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant"):
        raise UnsupportedMessages(f"{where}.role: must be 'user' or 'assistant'.")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise UnsupportedMessages(f"{where}.content: must be a string or a list of blocks.")
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        kind = block.get("type") if isinstance(block, Mapping) else None
        at = f"{where}.content.{index}"
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image" and role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, at)}})
        elif kind == "tool_use" and role == "assistant":
            arguments = json.dumps(block.get("input") or {})
            function = {"name": block.get("name"), "arguments": arguments}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
        elif kind == "tool_result" and role == "user":
            result = block.get("content", "")
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": block.get("tool_use_id"),
                    "content": _text(result, f"{at}.content"),
                }
            )
        else:
            raise UnsupportedMessages(f"{at}: a {kind!r} block is not supported in a {role} turn.")
    if role == "assistant":
        text = "\n".join(p["text"] for p in parts)
        turn: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _image_url(block: Mapping[str, Any], where: str) -> str:
    source = block.get("source")
    if isinstance(source, Mapping) and source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if isinstance(source, Mapping) and source.get("type") == "url":
        return str(source.get("url"))
    raise UnsupportedMessages(f"{where}.source: must be a base64 or url source.")


def _tools_to_chat(params: Mapping[str, Any], chat: dict[str, Any]) -> None:
    tools = params.get("tools")
    if tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.get("name"),
                    **({"description": tool["description"]} if tool.get("description") else {}),
                    "parameters": tool.get("input_schema") or {"type": "object"},
                },
            }
            for tool in tools
            if isinstance(tool, Mapping)
        ]
    choice = params.get("tool_choice")
    if not isinstance(choice, Mapping):
        return
    kind = choice.get("type")
    if kind in ("auto", "none"):
        chat["tool_choice"] = kind
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "tool":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if choice.get("disable_parallel_tool_use"):
        chat["parallel_tool_calls"] = False


# ---------------------------------------------------------------------------------------------
# chat completion -> message


def chat_to_message(completion: Mapping[str, Any], *, model: Any) -> dict[str, Any]:
    """A Messages-API ``message`` for a chat completion (its first choice)."""
    choices = completion["choices"] if isinstance(completion.get("choices"), list) else []
    choice = choices[0] if choices and isinstance(choices[0], Mapping) else {}
    message = choice["message"] if isinstance(choice.get("message"), Mapping) else {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": str(message["content"])})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {"_raw_arguments": function.get("arguments")}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": arguments,
            }
        )
    usage = completion["usage"] if isinstance(completion.get("usage"), Mapping) else {}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else 0
    source = str(completion.get("id") or json.dumps(completion, sort_keys=True))
    return {
        "id": "msg_" + hashlib.sha256(source.encode()).hexdigest()[:24],
        "type": "message",
        "role": "assistant",
        "model": completion.get("model") or model,
        "content": content,
        "stop_reason": _STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn"),
        "stop_sequence": None,
        "usage": {
            "input_tokens": int(usage.get("prompt_tokens") or 0),
            "output_tokens": int(usage.get("completion_tokens") or 0),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": int(cached or 0),
        },
    }
