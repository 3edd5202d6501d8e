"""Request and result lines for Gemini Batch Mode, in both directions.

Pure functions, standard library only (``batchspec.wire.inputs`` calls them while validating;
the ``gemini`` provider and the Gemini dialect of ``batchspec serve`` share them).

**Request lines** a ``gemini`` provider accepts, one form or another per line:

- Gemini's own request as a batch line: ``{"custom_id", "method": "POST", "url":
  "/v1beta/generateContent", "body": GenerateContentRequest}`` (manifest endpoint
  ``/v1beta/generateContent``), where ``body.model`` names the model (``gemini-2.5-flash`` or
  ``models/gemini-2.5-flash``; one per batch, as everywhere) and the other keys are
  ``GenerateContentRequest`` fields (``contents``, ``systemInstruction``, ``generationConfig``,
  ``tools``, ``toolConfig``, ``safetySettings``, ``cachedContent``; snake_case accepted). The
  body is sent as it is, without ``model`` (the batch names it). A key that is not a
  GenerateContentRequest field is refused (``unknown_field``); an OpenAI chat parameter there
  (``messages``, ``max_tokens``, ...) is named as such, with where Gemini takes it.
- an OpenAI chat line (``"url": "/v1/chat/completions"``), converted by ``chat_to_request``:

  ============================  ===============================================================
  OpenAI chat                   Gemini GenerateContentRequest
  ============================  ===============================================================
  system/developer messages     ``systemInstruction.parts`` (texts); only before the first
                                other message
  user / assistant messages     ``contents`` with roles ``user`` / ``model``; text parts stay
                                text, ``image_url`` data URLs become ``inlineData``
  assistant ``tool_calls``      ``functionCall`` parts (``arguments`` parsed as JSON)
  ``tool`` messages             a ``user`` turn with a ``functionResponse`` part, named after
                                the call it answers
  ``max_completion_tokens`` /   ``generationConfig.maxOutputTokens``
  ``max_tokens``
  ``temperature``, ``top_p``    ``temperature``, ``topP``
  ``stop`` (at most 5)          ``stopSequences``
  ``n``                         ``candidateCount``
  ``seed``                      ``seed``
  ``presence_penalty`` /        ``presencePenalty`` / ``frequencyPenalty``
  ``frequency_penalty``
  ``logprobs`` / ``top_logprobs`` ``responseLogprobs`` / ``logprobs``
  ``response_format``           json_object -> ``responseMimeType: application/json``;
                                json_schema -> the same plus ``responseJsonSchema``
  ``tools`` (functions)         ``tools[0].functionDeclarations`` (``parameters`` as they are)
  ``tool_choice``               none/auto/required/{function} -> ``toolConfig.
                                functionCallingConfig.mode`` NONE/AUTO/ANY (+ its name)
  ============================  ===============================================================

  What cannot map is a validation problem (``unmappable_parameter``), found by ``validate``
  and ``apply`` before anything is sent: ``logit_bias``, ``user``, ``store``, ``metadata``,
  ``parallel_tool_calls``, ``json_schema.strict: true``, ``stream``, more than 5 stop
  sequences, audio and file parts, http(s) image URLs (Gemini reads images inline or from its
  own files), names on messages, a system message after the conversation started, and every
  other key (``reasoning_effort``, ``modalities``, ``prediction``, ``functions``, ...).
  Lines for other endpoints cannot run on Gemini (``unsupported_endpoint``). What no provider
  takes is refused as for every other one (``batchspec.wire.request_checks``): a message that
  is not an object or has no OpenAI role, an output limit that is not an integer >= 1.

**Result lines.** Gemini answers each request with ``{"key", "response"}`` or ``{"key",
"error"}`` (a results file) or ``{"metadata": {"key"}, "response" | "error"}`` (inline).
``result_line`` turns each into the OpenAI-shaped line the reconciler classifies
(``batchspec.wire.outcomes``): a response -> ``status_code`` 200 with the Gemini
*GenerateContentResponse* as ``body`` (not converted to a chat completion; its
``usageMetadata`` stays in it); an error (a ``google.rpc.Status``) -> the HTTP status of its
gRPC code, its ``details`` kept in the body's ``error`` (``INVALID_ARGUMENT`` 400 is final,
``RESOURCE_EXHAUSTED`` 429, ``INTERNAL`` 500, ``UNAVAILABLE`` 503 and ``DEADLINE_EXCEEDED``
504 are retried), ``CANCELLED`` ->
``batch_cancelled``, a status whose ``details`` say ``BATCH_EXPIRED`` (a string, or an
``ErrorInfo`` with that reason) -> ``batch_expired``. An
unknown code counts as final (400): retrying what we cannot read could pay twice for nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from batchspec.wire.chat_convert import Unmappable as Unmappable  # raised to callers
from batchspec.wire.chat_convert import no_extras, plain_text, short
from batchspec.wire.request_checks import (
    first_message_problem,
    output_limit_problem,
    sampling_problem,
)

#: the manifest endpoint of Gemini's own request lines (body = GenerateContentRequest)
GENERATE_CONTENT_ENDPOINT = "/v1beta/generateContent"
CHAT_ENDPOINT = "/v1/chat/completions"
#: Gemini Batch Mode limits (its documentation): inline create body, one input file
MAX_INLINE_BYTES = 20 * 1024 * 1024
MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024
MAX_STOP_SEQUENCES = 5

#: Gemini's batch states (REST ``BATCH_STATE_*``; the SDK shows ``JOB_STATE_*``) -> ours
STATES = {
    "PENDING": "validating",
    "RUNNING": "in_progress",
    "SUCCEEDED": "completed",
    "FAILED": "failed",
    "CANCELLED": "cancelled",
    "EXPIRED": "expired",
    "CANCELLING": "cancelling",
}

#: google.rpc.Code -> (HTTP status, canonical name)
GRPC_CODES: dict[int, tuple[int, str]] = {
    1: (499, "CANCELLED"),
    2: (500, "UNKNOWN"),
    3: (400, "INVALID_ARGUMENT"),
    4: (504, "DEADLINE_EXCEEDED"),
    5: (404, "NOT_FOUND"),
    6: (409, "ALREADY_EXISTS"),
    7: (403, "PERMISSION_DENIED"),
    8: (429, "RESOURCE_EXHAUSTED"),
    9: (400, "FAILED_PRECONDITION"),
    10: (409, "ABORTED"),
    11: (400, "OUT_OF_RANGE"),
    12: (501, "UNIMPLEMENTED"),
    13: (500, "INTERNAL"),
    14: (503, "UNAVAILABLE"),
    15: (500, "DATA_LOSS"),
    16: (401, "UNAUTHENTICATED"),
}
_CODE_OF_NAME = {name: code for code, (_, name) in GRPC_CODES.items()}
#: the gRPC code for an HTTP status (Google's mapping), the other way round
HTTP_TO_GRPC = {
    400: 3,
    401: 16,
    403: 7,
    404: 5,
    408: 4,
    409: 10,
    413: 3,
    429: 8,
    499: 1,
    500: 13,
    501: 12,
    503: 14,
    504: 4,
}
#: the ``details`` the engine puts on requests a cancel or an expiry left unrun (an
#: ``ErrorInfo`` with this ``reason`` is read the same way)
REASON_CANCELLED = "BATCH_CANCELLED"
REASON_EXPIRED = "BATCH_EXPIRED"

#: GenerateContentRequest fields (camelCase and snake_case)
REQUEST_FIELDS = frozenset(
    {
        "model",
        "contents",
        "systemInstruction",
        "system_instruction",
        "tools",
        "toolConfig",
        "tool_config",
        "safetySettings",
        "safety_settings",
        "generationConfig",
        "generation_config",
        "cachedContent",
        "cached_content",
    }
)
#: OpenAI chat parameters met in a GenerateContentRequest, and where Gemini takes them
_OPENAI_FIELDS = {
    "messages": "contents (roles user/model) and systemInstruction",
    "max_tokens": "generationConfig.maxOutputTokens",
    "max_completion_tokens": "generationConfig.maxOutputTokens",
    "temperature": "generationConfig.temperature",
    "top_p": "generationConfig.topP",
    "stop": "generationConfig.stopSequences",
    "n": "generationConfig.candidateCount",
    "seed": "generationConfig.seed",
    "response_format": "generationConfig.responseMimeType",
    "tool_choice": "toolConfig.functionCallingConfig",
    "presence_penalty": "generationConfig.presencePenalty",
    "frequency_penalty": "generationConfig.frequencyPenalty",
    "logprobs": "generationConfig.responseLogprobs",
    "top_logprobs": "generationConfig.logprobs",
    "logit_bias": "nothing (Gemini has no logit bias)",
    "user": "nothing (Gemini has no end-user id)",
    "store": "nothing",
    "metadata": "nothing (a batch request's metadata is batchspec's)",
    "parallel_tool_calls": "nothing",
    "stream": "nothing (batched requests do not stream)",
}

_DATA_URL = re.compile(r"^data:(?P<media>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)$", re.DOTALL)
#: chat keys mapped by ``chat_to_request`` (value -> generationConfig key where it is direct)
_GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "topP",
    "n": "candidateCount",
    "seed": "seed",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
    "top_logprobs": "logprobs",
}
_MAPPED_KEYS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "logprobs",
        "response_format",
        "tools",
        "tool_choice",
        *_GENERATION_KEYS,
    }
)
#: keys accepted when they ask for OpenAI's default (the value is then simply not sent)
_DEFAULT_ONLY = {
    "logit_bias": (None, {}),
    "stream": (None, False),
    "stream_options": (None,),
    "parallel_tool_calls": (None, True),
    "user": (None,),
    "store": (None, False),
    "metadata": (None, {}),
}
_WHY_NOT = {
    "logit_bias": "Gemini has no logit bias",
    "user": "Gemini has no end-user id",
    "store": "Gemini does not store completions",
    "metadata": "a Gemini request carries no metadata of its own",
    "parallel_tool_calls": "Gemini cannot turn parallel function calls off",
    "stream": "batched requests do not stream",
    "stream_options": "batched requests do not stream",
}


# ---------------------------------------------------------------------------------------------
# Request lines


def line_problems(line: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(code, message)`` for what keeps a line from becoming a Gemini request.

    Only what is specific to Gemini; ``custom_id``, ``method``, ``url`` and ``model`` are
    checked by ``batchspec.wire.inputs``.
    """
    url, body = line.get("url"), line.get("body")
    if not isinstance(url, str) or not isinstance(body, Mapping):
        return []  # reported by batchspec.wire.inputs already
    if url == GENERATE_CONTENT_ENDPOINT:
        return request_problems(body, "body")
    if url != CHAT_ENDPOINT:
        return [
            (
                "unsupported_endpoint",
                f"url {url!r} cannot run on Gemini Batch Mode: use {CHAT_ENDPOINT} "
                f"(converted) or {GENERATE_CONTENT_ENDPOINT} lines",
            )
        ]
    try:
        chat_to_request(body)
    except Unmappable as err:
        return [(err.code, err.message)]
    return []


def request_problems(request: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    """What is wrong with a GenerateContentRequest (its field names and ``contents``)."""
    problems = []
    for key in request:
        if key in REQUEST_FIELDS:
            continue
        if key in _OPENAI_FIELDS:
            problems.append(
                (
                    "unknown_field",
                    f"{where}.{key} is an OpenAI chat parameter, not a GenerateContentRequest "
                    f"field; Gemini takes it as {_OPENAI_FIELDS[key]}",
                )
            )
        else:
            problems.append(
                ("unknown_field", f"{where}.{key} is not a GenerateContentRequest field")
            )
    contents = request.get("contents")
    if not isinstance(contents, list) or not contents:
        problems.append(("missing_contents", f"{where}.contents must be a non-empty list"))
    elif not all(isinstance(c, Mapping) and isinstance(c.get("parts"), list) for c in contents):
        problems.append(
            ("invalid_contents", f"{where}.contents: every entry needs a list of parts")
        )
    for key in ("generationConfig", "generation_config"):
        if key in request and not isinstance(request[key], Mapping):
            problems.append(("invalid_params", f"{where}.{key} must be an object"))
        elif isinstance(request.get(key), Mapping):
            problems.extend(_count_problems(request[key], f"{where}.{key}"))
    return problems


#: generationConfig's counts, with the code of a bad one: what the budget's bound reads
_CONFIG_COUNTS = {
    "maxOutputTokens": "invalid_max_tokens",
    "max_output_tokens": "invalid_max_tokens",
    "candidateCount": "invalid_params",
    "candidate_count": "invalid_params",
}


def _count_problems(config: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    """A ``generationConfig`` count that Gemini's JSON reading (protobuf's) refuses: not an
    integer >= 0, as a number (``100``, ``100.0``) or a string of digits (``"100"``). Such a
    request fails on its own after the batch ran, and the budget would read it as unset."""
    problems = []
    for key, code in _CONFIG_COUNTS.items():
        value = config.get(key)
        if value is None or _is_proto_count(value):
            continue
        problems.append((code, f"{where}.{key} {short(value)} is not an integer >= 0"))
    return problems


def _is_proto_count(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    if isinstance(value, float):
        return value.is_integer() and value >= 0
    return isinstance(value, str) and value.strip().isdecimal()


def model_name(model: str) -> str:
    """A model as the create URL names it, without the ``models/`` prefix."""
    return model.removeprefix("models/")


def to_request(line: Mapping[str, Any]) -> dict[str, Any]:
    """The GenerateContentRequest for one validated line (without ``model``)."""
    if line.get("url") == GENERATE_CONTENT_ENDPOINT:
        return {k: v for k, v in line["body"].items() if k != "model"}
    return chat_to_request(line["body"])


def chat_to_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """A GenerateContentRequest for an OpenAI chat body; ``Unmappable`` if impossible."""
    for key, value in body.items():
        if key in _MAPPED_KEYS:
            continue
        allowed = _DEFAULT_ONLY.get(key)
        if allowed is not None and value in allowed:
            continue
        why = _WHY_NOT.get(key, "it has no Gemini equivalent")
        raise Unmappable(f"body.{key} = {short(value)} cannot be sent to Gemini: {why}")
    request: dict[str, Any] = {}
    system, contents = _contents(body.get("messages"))
    request["contents"] = contents
    if system:
        request["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    config = _generation_config(body)
    if config:
        request["generationConfig"] = config
    _tools(body, request)
    return request


def _generation_config(body: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    found = output_limit_problem(body, ("max_tokens", "max_completion_tokens"))
    if found is not None:
        raise Unmappable(found[1], code=found[0])
    found = sampling_problem(body)
    if found is not None:
        raise Unmappable(found[1], code=found[0])
    # null is "not set", as validate and the budget's bound read it (``wire.usage``)
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None:
        config["maxOutputTokens"] = limit
    for key, target in _GENERATION_KEYS.items():
        if body.get(key) is not None:
            config[target] = body[key]
    if body.get("logprobs"):
        config["responseLogprobs"] = True
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise Unmappable(
                f"body.stop holds {len(stops)} sequences; Gemini takes at most {MAX_STOP_SEQUENCES}"
            )
        config["stopSequences"] = stops
    config.update(_response_format(body.get("response_format")))
    return config


def _response_format(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise Unmappable("body.response_format.json_schema.schema must be an object")
        if spec.get("strict"):
            raise Unmappable(
                "body.response_format.json_schema.strict = true cannot be sent to Gemini: it "
                "has no strict mode (drop strict to send the schema as responseJsonSchema)"
            )
        return {"responseMimeType": "application/json", "responseJsonSchema": spec["schema"]}
    raise Unmappable(f"body.response_format = {short(value)} has no Gemini equivalent")


def _contents(raw: Any) -> tuple[list[str], list[dict[str, Any]]]:
    if not isinstance(raw, list) or not raw:
        raise Unmappable("body.messages must be a non-empty list", code="missing_messages")
    found = first_message_problem(raw)  # objects with OpenAI's roles, as every dialect asks
    if found is not None:
        raise Unmappable(found[1], code=found[0])
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call id -> function name, for tool answers
    for index, message in enumerate(raw):
        where = f"body.messages[{index}]"
        role = message.get("role")
        if role in ("system", "developer"):
            if contents:
                raise Unmappable(
                    f"{where} is a {role} message after the conversation started: Gemini "
                    "takes one system instruction, before the contents"
                )
            no_extras(message, where, allowed=("role", "content"), target="Gemini")
            system.append(plain_text(message.get("content"), where))
        elif role == "user":
            no_extras(message, where, allowed=("role", "content"), target="Gemini")
            contents.append({"role": "user", "parts": _user_parts(message, where)})
        elif role == "assistant":
            no_extras(message, where, allowed=("role", "content", "tool_calls"), target="Gemini")
            contents.append({"role": "model", "parts": _model_parts(message, where, call_names)})
        elif role == "tool":
            no_extras(message, where, allowed=("role", "content", "tool_call_id"), target="Gemini")
            name = call_names.get(str(message.get("tool_call_id")))
            if name is None:
                raise Unmappable(
                    f"{where} answers tool call {message.get('tool_call_id')!r}, which no "
                    "earlier assistant message made: Gemini names function answers by function"
                )
            answer = {"name": name, "response": {"content": plain_text(message["content"], where)}}
            contents.append({"role": "user", "parts": [{"functionResponse": answer}]})
        else:
            raise Unmappable(f"{where} has role {role!r}, which Gemini does not know")
    if not contents:
        raise Unmappable("body.messages holds only system messages: Gemini needs a user turn")
    return system, contents


def _user_parts(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list) or not content:
        raise Unmappable(f"{where}.content must be a string or a non-empty list of parts")
    return [_user_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]


def _user_part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text":
        return {"text": str(part.get("text", ""))}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image
        match = _DATA_URL.match(url) if isinstance(url, str) else None
        if match:
            return {"inlineData": {"mimeType": match["media"], "data": match["data"]}}
        raise Unmappable(
            f"{where}: Gemini takes images inline: use a data: URL (base64), not a link"
        )
    raise Unmappable(f"{where}: a {kind!r} part has no Gemini equivalent")


def _model_parts(
    message: Mapping[str, Any], where: str, call_names: dict[str, str]
) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    text = plain_text(message.get("content"), where)
    if text:
        parts.append({"text": text})
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
        name = str(function.get("name"))
        call_names[str(call.get("id"))] = name
        parts.append({"functionCall": {"name": name, "args": arguments}})
    if not parts:
        raise Unmappable(f"{where} has neither content nor tool calls", code="invalid_message")
    return parts


def _tools(body: Mapping[str, Any], request: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools:
        declarations = [_declaration(tool, f"body.tools[{i}]") for i, tool in enumerate(tools)]
        request["tools"] = [{"functionDeclarations": declarations}]
    choice = body.get("tool_choice")
    if choice is None:
        return
    config: dict[str, Any]
    if choice in ("none", "auto", "required"):
        config = {"mode": {"none": "NONE", "auto": "AUTO", "required": "ANY"}[choice]}
    elif isinstance(choice, Mapping) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise Unmappable(f"body.tool_choice = {short(choice)} names no function")
        config = {"mode": "ANY", "allowedFunctionNames": [name]}
    else:
        raise Unmappable(f"body.tool_choice = {short(choice)} has no Gemini equivalent")
    request["toolConfig"] = {"functionCallingConfig": config}


def _declaration(tool: Any, where: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or tool.get("type") != "function":
        raise Unmappable(f"{where}: only function tools can be mapped")
    declaration: dict[str, Any] = {"name": function.get("name")}
    if function.get("description") is not None:
        declaration["description"] = function["description"]
    if function.get("parameters") is not None:
        declaration["parameters"] = function["parameters"]
    return declaration


# ---------------------------------------------------------------------------------------------
# Batch states


def batch_status(state: Any) -> str:
    """Our status for a Gemini batch state (``BATCH_STATE_X`` or ``JOB_STATE_X``); an unknown
    state is kept, lower-cased (then never terminal: the reconciler keeps polling)."""
    text = str(state or "unknown")
    short = text.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_")
    return STATES.get(short, text.lower())


# ---------------------------------------------------------------------------------------------
# Result lines


def result_key(record: Mapping[str, Any]) -> str | None:
    """The key a results line (``key``) or an inline response (``metadata.key``) answers."""
    key = record.get("key")
    if key is None and isinstance(record.get("metadata"), Mapping):
        key = record["metadata"].get("key")
    return str(key) if key is not None else None


def is_success(record: Mapping[str, Any]) -> bool:
    return isinstance(record.get("response"), Mapping) and not record.get("error")


def result_line(batch_name: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Our output/error line for one Gemini result (see the module docstring)."""
    key = result_key(record)
    line: dict[str, Any] = {"id": request_id(batch_name, str(key)), "custom_id": key}
    if is_success(record):
        response = record["response"]
        line["response"] = {
            "status_code": 200,
            "request_id": response.get("responseId"),
            "body": response,
        }
        line["error"] = None
        return line
    status = record.get("error") or record.get("status")
    if not isinstance(status, Mapping):
        line["response"] = None
        line["error"] = {
            "code": "gemini_unknown_result",
            "message": "Gemini answered this request with neither a response nor an error "
            f"batchspec can read ({short(dict(record))}); not retried.",
        }
        return line
    reason = _error_reason(status)
    code = _grpc_code(status)
    message = str(status.get("message") or "")
    if reason in (REASON_EXPIRED, REASON_CANCELLED) or code == 1:
        expired = reason == REASON_EXPIRED
        line["response"] = None
        line["error"] = {
            "code": "batch_expired" if expired else "batch_cancelled",
            "message": message or "The request was not run: the batch ended first.",
        }
        return line
    unknown = (400, str(status.get("status") or "UNKNOWN_CODE"))
    http, name = GRPC_CODES.get(code, unknown) if code is not None else unknown
    if code is not None and code >= 100:  # an HTTP status already
        http, name = code, str(status.get("status") or f"HTTP_{code}")
    error: dict[str, Any] = {"message": message or name, "type": name, "param": None, "code": name}
    if status.get("details"):
        error["details"] = status["details"]  # which field was wrong: kept as Gemini gave it
    line["response"] = {"status_code": http, "request_id": None, "body": {"error": error}}
    line["error"] = None
    return line


def _grpc_code(status: Mapping[str, Any]) -> int | None:
    code = status.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(code, str) and code.isdigit():
        return int(code)
    name = status.get("status") or code
    return _CODE_OF_NAME.get(str(name)) if name is not None else None


def _error_reason(status: Mapping[str, Any]) -> str | None:
    for detail in status.get("details") or []:
        if isinstance(detail, Mapping) and detail.get("reason"):
            return str(detail["reason"])
        if detail in (REASON_CANCELLED, REASON_EXPIRED):
            return str(detail)
    return None


def status_for_http(http: int, message: str, *, reason: str | None = None) -> dict[str, Any]:
    """A ``google.rpc.Status`` for an HTTP status (the engine's side of ``result_line``)."""
    code = HTTP_TO_GRPC.get(http, 13 if http >= 500 else 3)
    status: dict[str, Any] = {"code": code, "message": message, "status": GRPC_CODES[code][1]}
    if reason is not None:
        # a bare string, not an ErrorInfo object: the google-genai SDK types details as strings
        status["details"] = [reason]
    return status


def usage_totals(responses: Iterable[Mapping[str, Any]]) -> tuple[int, int, int]:
    """(prompt, candidates, total) tokens summed over GenerateContentResponses."""
    prompt = candidates = total = 0
    for response in responses:
        usage = response.get("usageMetadata")
        if not isinstance(usage, Mapping):
            continue
        p = _count(usage.get("promptTokenCount"))
        c = _count(usage.get("candidatesTokenCount"))
        prompt += p
        candidates += c
        total += _count(usage.get("totalTokenCount")) or p + c
    return prompt, candidates, total


def _count(value: Any) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def request_id(batch_name: str, key: str) -> str:
    """A stable ``batch_req_…`` id for a result line (Gemini's lines carry none)."""
    digest = hashlib.sha256(f"{batch_name}:{key}".encode()).hexdigest()
    return f"batch_req_{digest[:32]}"
