"""Request and result lines for Anthropic Message Batches, in both directions.

Pure functions, standard library only (``batchspec.wire.inputs`` calls them while validating).

**Request lines** an ``anthropic`` provider accepts, one form or another per line:

- Anthropic's own form ``{"custom_id", "params": {...Messages parameters...}}`` (manifest
  endpoint ``/v1/messages``), sent as it is;
- the batch-line form with ``"url": "/v1/messages"`` and the Messages parameters as ``body``,
  sent as ``{"custom_id", "params": body}``;
- an OpenAI chat line (``"url": "/v1/chat/completions"``), converted by ``chat_to_params``:

  ============================  ===============================================================
  OpenAI chat                   Anthropic Messages
  ============================  ===============================================================
  ``model``                     ``model`` (unchanged: write an Anthropic model name)
  system/developer messages     ``system`` (texts joined by a blank line); only *before* the
                                first other message: a later one has no Anthropic equivalent
  user / assistant messages     ``messages`` with the same roles; text parts stay text,
                                ``image_url`` parts become ``image`` blocks (data URLs as
                                base64, http(s) URLs as ``url`` sources)
  assistant ``tool_calls``      ``tool_use`` blocks (``arguments`` parsed as JSON)
  ``tool`` messages             user messages holding a ``tool_result`` block (its
                                ``tool_call_id`` must be an earlier tool call's ``id``)
  ``max_completion_tokens`` /   ``max_tokens``; when both are absent, ``defaultMaxTokens`` of the
  ``max_tokens``                provider (4096 unless set), since Anthropic requires it
  ``temperature``               ``temperature`` (Anthropic's range is 0-1: above 1 cannot map)
  ``top_p``                     ``top_p``
  ``stop`` (string or list)     ``stop_sequences`` (a list)
  ``user``                      ``metadata.user_id``
  ``tools`` (functions)         ``tools`` (``name``, ``description``, ``input_schema`` =
                                ``parameters``; ``strict`` is dropped)
  ``tool_choice``               none/auto/required/{function} -> none/auto/any/{tool}
  ``parallel_tool_calls: false`` ``tool_choice.disable_parallel_tool_use: true``
  ============================  ===============================================================

  What cannot map is a validation problem (``unmappable_parameter``), found by ``validate``
  and ``apply`` before anything is sent: ``n`` > 1, ``logprobs``/``top_logprobs``,
  ``response_format`` other than text, non-zero ``presence_penalty``/``frequency_penalty``,
  ``logit_bias``, ``seed``, ``stream``, audio and file parts, a system message after the
  conversation started, ``temperature`` above 1, and every other key (``store``,
  ``metadata``, ``reasoning_effort``, ``modalities``, ``functions``, ...). Lines for other
  endpoints (embeddings, ...) cannot run on Anthropic (``unsupported_endpoint``). What no
  provider takes is refused as for every other one (``batchspec.wire.request_checks``): a
  message that is not an object or has no OpenAI role, an output limit (here also
  ``params.max_tokens``) that is not an integer >= 1.

**Result lines.** Anthropic's results JSONL (``{"custom_id", "result": {"type": ...}}``) is
turned into the OpenAI-shaped output/error lines the reconciler classifies
(``batchspec.wire.outcomes``): ``succeeded`` -> ``response.status_code`` 200 with the Anthropic
*message* as ``body`` (not converted to a chat completion); ``errored`` -> the HTTP status of
its error type (``invalid_request_error`` 400 is final, ``overloaded_error`` 529 and
``api_error`` 500 are retried, ``rate_limit_error`` 429 too) with ``body.error`` =
``{message, type, code: type}``; ``canceled`` -> ``error.code`` ``batch_cancelled``; ``expired``
-> ``batch_expired``. An unknown error type counts as final (400): retrying what we cannot
read could pay twice for nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from batchspec.wire.chat_convert import Unmappable as Unmappable  # raised to callers
from batchspec.wire.chat_convert import no_extras, plain_text, short
from batchspec.wire.request_checks import (
    first_message_problem,
    output_limit_problem,
    sampling_problem,
)

CUSTOM_ID_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
MESSAGES_ENDPOINT = "/v1/messages"
CHAT_ENDPOINT = "/v1/chat/completions"
DEFAULT_MAX_TOKENS = 4096
#: Message Batches limits (Anthropic's documentation): requests per batch, bytes per create body
MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BODY_BYTES = 256 * 1024 * 1024

#: HTTP status for each Anthropic error type (their documented statuses)
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
#: the error type for an HTTP status, the other way round (unknown 5xx: api_error)
STATUS_ERROR_TYPE = {status: kind for kind, status in ERROR_STATUS.items()}

_DATA_URL = re.compile(r"^data:(?P<media>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)$", re.DOTALL)
#: chat keys mapped by ``chat_to_params``; any other key is unmappable
_MAPPED_KEYS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)
#: the chat parameters that become ``max_tokens``
_CHAT_LIMIT_KEYS = ("max_tokens", "max_completion_tokens")
#: keys accepted when they ask for OpenAI's default (the value is then simply not sent)
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "seed": (None,),
    "stream": (None, False),
    "stream_options": (None,),
    "response_format": (None,),
}
_WHY_NOT = {
    "n": "Anthropic returns one answer per request; send n separate lines",
    "logprobs": "Anthropic returns no log probabilities",
    "top_logprobs": "Anthropic returns no log probabilities",
    "presence_penalty": "Anthropic has no presence penalty",
    "frequency_penalty": "Anthropic has no frequency penalty",
    "logit_bias": "Anthropic has no logit bias",
    "seed": "Anthropic has no seed",
    "stream": "batched requests do not stream",
    "stream_options": "batched requests do not stream",
    "response_format": "Anthropic has no response_format; ask for JSON in the prompt, use a "
    "tool, or write Anthropic lines (endpoint /v1/messages)",
}


# ---------------------------------------------------------------------------------------------
# Request lines


def is_native(line: Mapping[str, Any]) -> bool:
    """Anthropic's own form: ``params`` and none of the batch-line keys."""
    return "params" in line and not any(k in line for k in ("method", "url", "body"))


def line_problems(line: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(code, message)`` for what keeps a line from becoming an Anthropic request.

    Only what is specific to Anthropic; ``custom_id``, ``method``, ``url`` and ``model`` are
    checked by ``batchspec.wire.inputs``.
    """
    if is_native(line):
        params = line.get("params")
        if not isinstance(params, Mapping):
            return [("invalid_params", "params must be an object of Messages parameters")]
        return _params_problems(params, "params")
    url, body = line.get("url"), line.get("body")
    if not isinstance(url, str) or not isinstance(body, Mapping):
        return []  # reported by batchspec.wire.inputs already
    if url == MESSAGES_ENDPOINT:
        return _params_problems(body, "body")
    if url != CHAT_ENDPOINT:
        return [
            (
                "unsupported_endpoint",
                f"url {url!r} cannot run on Anthropic Message Batches: use "
                f"{CHAT_ENDPOINT} (converted) or {MESSAGES_ENDPOINT} lines",
            )
        ]
    try:
        chat_to_params(body)
    except Unmappable as err:
        return [(err.code, err.message)]
    return []


def _params_problems(params: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    problems = []
    if params.get("max_tokens") is None:
        problems.append(
            ("missing_max_tokens", f"{where}.max_tokens is required by Anthropic (an integer >= 1)")
        )
    else:
        found = output_limit_problem(params, ("max_tokens",), where)
        if found is not None:
            problems.append(found)
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        problems.append(("missing_messages", f"{where}.messages must be a non-empty list"))
    return problems


def to_request(
    line: Mapping[str, Any], *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """The inline request ``{"custom_id", "params"}`` for one validated line."""
    if is_native(line):
        params = dict(line["params"])
    elif line.get("url") == MESSAGES_ENDPOINT:
        params = dict(line["body"])
    else:
        params = chat_to_params(line["body"], default_max_tokens=default_max_tokens)
    return {"custom_id": line["custom_id"], "params": params}


def chat_to_params(
    body: Mapping[str, Any], *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """Anthropic Messages parameters for an OpenAI chat body; ``Unmappable`` if impossible."""
    for key, value in body.items():
        if key in _MAPPED_KEYS:
            continue
        allowed = _DEFAULT_ONLY.get(key)
        if allowed is not None and (value in allowed or _is_text_format(key, value)):
            continue
        why = _WHY_NOT.get(key, "it has no Anthropic equivalent")
        raise Unmappable(f"body.{key} = {short(value)} cannot be sent to Anthropic: {why}")
    params: dict[str, Any] = {"model": body.get("model")}
    system, messages = _messages(body.get("messages"))
    if system:
        params["system"] = system
    params["messages"] = messages
    found = output_limit_problem(body, _CHAT_LIMIT_KEYS)
    if found is not None:
        raise Unmappable(found[1], code=found[0])
    found = sampling_problem(body)
    if found is not None:
        raise Unmappable(found[1], code=found[0])
    # null is "not set", as validate and the budget's bound read it (``wire.usage``)
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    params["max_tokens"] = default_max_tokens if limit is None else limit
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, (int, float)) and temperature > 1:
            raise Unmappable(
                f"body.temperature = {temperature} cannot be sent to Anthropic: its range is 0-1"
            )
        params["temperature"] = temperature
    if body.get("top_p") is not None:
        params["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop is not None:
        params["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user") is not None:
        params["metadata"] = {"user_id": body["user"]}
    _tools(body, params)
    return params


def _is_text_format(key: str, value: Any) -> bool:
    return key == "response_format" and isinstance(value, Mapping) and value.get("type") == "text"


def _messages(raw: Any) -> tuple[str, list[dict[str, Any]]]:
    if not isinstance(raw, list) or not raw:
        raise Unmappable("body.messages must be a non-empty list", code="missing_messages")
    found = first_message_problem(raw)  # objects with OpenAI's roles, as every dialect asks
    if found is not None:
        raise Unmappable(found[1], code=found[0])
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    call_ids: set[str] = set()  # the tool_use ids the assistant messages made so far
    for index, message in enumerate(raw):
        where = f"body.messages[{index}]"
        role = message.get("role")
        if role in ("system", "developer"):
            if messages:
                raise Unmappable(
                    f"{where} is a {role} message after the conversation started: Anthropic "
                    "takes one system prompt, before the messages"
                )
            system.append(plain_text(message.get("content"), where))
        elif role == "user":
            messages.append({"role": "user", "content": _user_content(message, where)})
        elif role == "assistant":
            content = _assistant_content(message, where)
            call_ids.update(b["id"] for b in content if b["type"] == "tool_use")
            messages.append({"role": "assistant", "content": content})
        elif role == "tool":
            if message.get("tool_call_id") not in call_ids:
                # Anthropic refuses a tool_result whose tool_use_id no tool_use block made
                raise Unmappable(
                    f"{where} answers tool call {message.get('tool_call_id')!r}, which no "
                    "earlier assistant message made: Anthropic matches each tool result to "
                    "its tool_use block by that id"
                )
            result = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id"),
                "content": plain_text(message.get("content"), where),
            }
            messages.append({"role": "user", "content": [result]})
        else:
            raise Unmappable(f"{where} has role {role!r}, which Anthropic does not know")
    if not messages:
        raise Unmappable("body.messages holds only system messages: Anthropic needs a user turn")
    return "\n\n".join(system), messages


def _user_content(message: Mapping[str, Any], where: str) -> Any:
    no_extras(message, where, allowed=("role", "content"), target="Anthropic")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Unmappable(f"{where}.content must be a string or a list of parts")
    return [_user_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]


def _user_part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text":
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image
        if isinstance(url, str):
            match = _DATA_URL.match(url)
            if match:
                source = {
                    "type": "base64",
                    "media_type": match["media"],
                    "data": match["data"],
                }
                return {"type": "image", "source": source}
            if url.startswith(("http://", "https://")):
                return {"type": "image", "source": {"type": "url", "url": url}}
        raise Unmappable(f"{where}: an image must be a data: URL or an http(s) URL")
    raise Unmappable(f"{where}: a {kind!r} part has no Anthropic equivalent")


def _assistant_content(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    no_extras(message, where, allowed=("role", "content", "tool_calls"), target="Anthropic")
    blocks: list[dict[str, Any]] = []
    text = plain_text(message.get("content"), where)
    if text:
        blocks.append({"type": "text", "text": text})
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or call.get("type", "function") != "function":
            raise Unmappable(f"{where}.tool_calls[{index}] must be a function call")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            raise Unmappable(
                f"{where}.tool_calls[{index}].function.arguments is not JSON"
            ) from None
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise Unmappable(
                f"{where}.tool_calls[{index}].id is missing: Anthropic's tool_use blocks need "
                "the id their tool results answer"
            )
        name = function.get("name")
        blocks.append({"type": "tool_use", "id": call_id, "name": name, "input": arguments})
    if not blocks:
        raise Unmappable(f"{where} has neither content nor tool calls", code="invalid_message")
    return blocks


def _tools(body: Mapping[str, Any], params: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools:
        params["tools"] = [_tool(tool, f"body.tools[{i}]") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    mapped: dict[str, Any] | None = None
    if choice in ("none", "auto"):
        mapped = {"type": choice}
    elif choice == "required":
        mapped = {"type": "any"}
    elif isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise Unmappable(f"body.tool_choice = {short(choice)} has no Anthropic equivalent")
        mapped = {"type": "tool", "name": name}
    elif choice is not None:
        raise Unmappable(f"body.tool_choice = {short(choice)} has no Anthropic equivalent")
    if body.get("parallel_tool_calls") is False:
        mapped = {**(mapped or {"type": "auto"}), "disable_parallel_tool_use": True}
    if mapped is not None:
        params["tool_choice"] = mapped


def _tool(tool: Any, where: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or tool.get("type") != "function":
        raise Unmappable(f"{where}: only function tools can be mapped")
    mapped: dict[str, Any] = {"name": function.get("name")}
    if function.get("description") is not None:
        mapped["description"] = function["description"]
    mapped["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return mapped


# ---------------------------------------------------------------------------------------------
# Result lines


def result_line(batch_id: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Our output/error line for one line of Anthropic's results (see the module docstring)."""
    custom_id = raw.get("custom_id")
    result: Mapping[str, Any] = raw["result"] if isinstance(raw.get("result"), Mapping) else {}
    kind = result.get("type")
    line: dict[str, Any] = {"id": request_id(batch_id, str(custom_id)), "custom_id": custom_id}
    if kind == "succeeded":
        message = result.get("message")
        request = message.get("id") if isinstance(message, Mapping) else None
        line["response"] = {"status_code": 200, "request_id": request, "body": message}
        line["error"] = None
    elif kind == "errored":
        line["response"] = _errored_response(result.get("error"))
        line["error"] = None
    elif kind in ("canceled", "expired"):
        code = "batch_cancelled" if kind == "canceled" else "batch_expired"
        why = "was cancelled" if kind == "canceled" else "expired"
        line["response"] = None
        line["error"] = {"code": code, "message": f"The request was not run: the batch {why}."}
    else:
        line["response"] = None
        line["error"] = {
            "code": f"anthropic_{kind or 'unknown'}_result",
            "message": f"Anthropic reported a result of type {kind!r}, which batchspec "
            "does not know; not retried.",
        }
    return line


def is_success(raw: Mapping[str, Any]) -> bool:
    result = raw.get("result")
    return isinstance(result, Mapping) and result.get("type") == "succeeded"


def _errored_response(error: Any) -> dict[str, Any]:
    # Anthropic nests it: {"type": "error", "error": {"type": ..., "message": ...}}
    inner = error.get("error") if isinstance(error, Mapping) else None
    if not isinstance(inner, Mapping):
        inner = error if isinstance(error, Mapping) else {}
    kind = str(inner.get("type") or "unknown_error")
    body = {
        "error": {
            "message": str(inner.get("message") or kind),
            "type": kind,
            "param": None,
            "code": kind,
        }
    }
    request = error.get("request_id") if isinstance(error, Mapping) else None
    return {"status_code": ERROR_STATUS.get(kind, 400), "request_id": request, "body": body}


def request_id(batch_id: str, custom_id: str) -> str:
    """A stable ``batch_req_…`` id for a result line (Anthropic's lines carry none)."""
    digest = hashlib.sha256(f"{batch_id}:{custom_id}".encode()).hexdigest()
    return f"batch_req_{digest[:32]}"
