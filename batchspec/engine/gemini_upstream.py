"""Run Gemini GenerateContentRequests (``/v1beta/generateContent`` lines) on any upstream.

The engine's upstreams speak OpenAI. ``GeminiUpstream`` wraps one: a line whose ``url`` is
``/v1beta/generateContent`` (its body a GenerateContentRequest plus ``model``) is converted
to a chat completion request, sent as ``/v1/chat/completions``, and the answer converted back
to a GenerateContentResponse; every other line passes through untouched. So the Gemini
dialect of ``batchspec serve`` (``gemini_routes.py``) runs wherever chat completions run.

Request mapping (Gemini -> chat): ``systemInstruction`` becomes the first system message;
``contents`` roles ``user``/``model`` become user/assistant messages; ``text`` parts stay
text, ``inlineData`` parts become ``image_url`` data URLs, ``functionCall`` parts assistant
``tool_calls`` and ``functionResponse`` parts ``tool`` messages; ``generationConfig``
``maxOutputTokens``, ``temperature``, ``topP``, ``topK``, ``candidateCount``, ``seed``,
``presencePenalty``, ``frequencyPenalty``, ``stopSequences``, ``responseLogprobs``/
``logprobs``, ``responseMimeType: application/json`` (+ ``responseJsonSchema``) map to their
chat equivalents; ``tools[].functionDeclarations`` and ``toolConfig`` to tools and
``tool_choice``. Anything else (``safetySettings``, ``cachedContent``, ``thinkingConfig``,
file parts...) is answered 400 ``INVALID_ARGUMENT``: the engine will not pretend to honour a
parameter it drops.

Answer mapping (chat -> GenerateContentResponse): one candidate per choice, its text a text
part and its tool calls ``functionCall`` parts; ``finish_reason`` stop/tool_calls ->
``STOP``, length -> ``MAX_TOKENS``, content_filter -> ``SAFETY``; usage -> ``usageMetadata``
(``promptTokenCount``, ``candidatesTokenCount``, ``totalTokenCount``). An error answer keeps
its status, with Google's ``{"error": {code, message, status}}`` body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from batchspec.engine.chat_bridge import ChatBridge
from batchspec.engine.upstreams import Upstream
from batchspec.wire.gemini_lines import GENERATE_CONTENT_ENDPOINT, GRPC_CODES, HTTP_TO_GRPC

_REQUEST_KEYS = frozenset({"model", "contents", "systemInstruction", "generationConfig"})
_REQUEST_KEYS_WITH_TOOLS = _REQUEST_KEYS | {"tools", "toolConfig"}
#: generationConfig key -> chat key, where the value passes as it is
_CONFIG_KEYS = {
    "maxOutputTokens": "max_tokens",
    "temperature": "temperature",
    "topP": "top_p",
    "topK": "top_k",
    "candidateCount": "n",
    "seed": "seed",
    "presencePenalty": "presence_penalty",
    "frequencyPenalty": "frequency_penalty",
    "logprobs": "top_logprobs",
}
_CONFIG_HANDLED = frozenset(
    {
        *_CONFIG_KEYS,
        "stopSequences",
        "responseLogprobs",
        "responseMimeType",
        "responseJsonSchema",
        "responseSchema",
    }
)
_FINISH_REASONS = {
    "stop": "STOP",
    "tool_calls": "STOP",
    "function_call": "STOP",
    "length": "MAX_TOKENS",
    "content_filter": "SAFETY",
}
_SNAKE = re.compile(r"_([a-z])")


class UnsupportedGemini(ValueError):
    """A GenerateContentRequest the engine cannot run on a chat-completions upstream."""


class GeminiUpstream(ChatBridge):
    """An ``Upstream`` that also runs ``/v1beta/generateContent`` lines (module docstring)."""

    def __init__(self, inner: Upstream) -> None:
        super().__init__(
            inner,
            urls=(GENERATE_CONTENT_ENDPOINT,),
            to_chat=request_to_chat,
            from_chat=chat_to_response,
            error_body=error_body,
            unsupported=UnsupportedGemini,
        )


def error_body(status: int, message: str) -> dict[str, Any]:
    """Google's error envelope for an HTTP status."""
    code = HTTP_TO_GRPC.get(status, 13 if status >= 500 else 3)
    return {"error": {"code": status, "message": message, "status": GRPC_CODES[code][1]}}


def camel_keys(value: Any) -> Any:
    """An object's own keys in camelCase (the REST API accepts snake_case as well); values,
    such as a function's arguments or a schema's property names, are left as they are."""
    if not isinstance(value, Mapping):
        return value
    return {_SNAKE.sub(lambda m: m[1].upper(), str(k)): v for k, v in value.items()}


# ---------------------------------------------------------------------------------------------
# GenerateContentRequest -> chat completions


def request_to_chat(raw: Any) -> dict[str, Any]:
    """An OpenAI chat body for a GenerateContentRequest; ``UnsupportedGemini`` if impossible."""
    if not isinstance(raw, Mapping):
        raise UnsupportedGemini("The request must be an object.")
    request = camel_keys(raw)
    unknown = sorted(k for k in request if k not in _REQUEST_KEYS_WITH_TOOLS)
    if unknown:
        raise UnsupportedGemini(
            f"{', '.join(unknown)}: not supported by the local engine, which runs Gemini "
            "requests as chat completions."
        )
    chat: dict[str, Any] = {"model": str(request.get("model") or "").removeprefix("models/")}
    messages: list[dict[str, Any]] = []
    system = request.get("systemInstruction")
    if isinstance(system, str):  # the REST API takes a bare string too
        system = {"parts": [{"text": system}]}
    if system:
        parts = system.get("parts") if isinstance(system, Mapping) else None
        messages.append({"role": "system", "content": _texts(parts, "systemInstruction")})
    contents = request.get("contents")
    if not isinstance(contents, list) or not contents:
        raise UnsupportedGemini("contents: must be a non-empty list.")
    calls: dict[str, list[str]] = {}  # function name -> ids of its calls not yet answered
    for index, content in enumerate(contents):
        messages.extend(_chat_messages(content, f"contents[{index}]", calls))
    chat["messages"] = messages
    _config_to_chat(camel_keys(request.get("generationConfig")), chat)
    _tools_to_chat(request.get("tools"), camel_keys(request.get("toolConfig")), chat)
    return chat


def _texts(parts: Any, where: str) -> str:
    if not isinstance(parts, list):
        raise UnsupportedGemini(f"{where}.parts: must be a list.")
    texts = []
    for part in parts:
        if not isinstance(part, Mapping) or "text" not in part:
            raise UnsupportedGemini(f"{where}: only text parts are supported here.")
        texts.append(str(part["text"]))
    return "\n".join(texts)


def _chat_messages(content: Any, where: str, calls: dict[str, list[str]]) -> list[dict[str, Any]]:
    role = content.get("role", "user") if isinstance(content, Mapping) else None
    parts = content.get("parts") if isinstance(content, Mapping) else None
    if role not in ("user", "model") or not isinstance(parts, list):
        raise UnsupportedGemini(f"{where}: needs role 'user' or 'model' and a list of parts.")
    out: list[dict[str, Any]] = []
    chat_parts: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    for index, raw_part in enumerate(parts):
        at = f"{where}.parts[{index}]"
        if not isinstance(raw_part, Mapping):
            raise UnsupportedGemini(f"{at}: must be an object.")
        part = camel_keys(raw_part)
        if "text" in part:
            chat_parts.append({"type": "text", "text": str(part["text"])})
        elif "inlineData" in part and role == "user":
            data = camel_keys(_object(part["inlineData"]))
            url = f"data:{data.get('mimeType')};base64,{data.get('data')}"
            chat_parts.append({"type": "image_url", "image_url": {"url": url}})
        elif "functionCall" in part and role == "model":
            call = _object(part["functionCall"])
            name = str(call.get("name"))
            call_id = f"call_{len(tool_calls)}_{name}"
            calls.setdefault(name, []).append(call_id)
            arguments = json.dumps(call.get("args") or {})
            function = {"name": name, "arguments": arguments}
            tool_calls.append({"id": call_id, "type": "function", "function": function})
        elif "functionResponse" in part and role == "user":
            answer = (
                part["functionResponse"] if isinstance(part["functionResponse"], Mapping) else {}
            )
            name = str(answer.get("name"))
            pending = calls.get(name) or [f"call_{name}"]
            call_id = pending.pop(0)
            result = answer.get("response")
            text = result.get("content") if isinstance(result, Mapping) else None
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": text if isinstance(text, str) else json.dumps(result),
                }
            )
        else:
            kind = next(iter(part), "empty")
            raise UnsupportedGemini(f"{at}: a {kind!r} part is not supported in a {role} turn.")
    if role == "model":
        text = "\n".join(p["text"] for p in chat_parts)
        turn: dict[str, Any] = {"role": "assistant", "content": text or None}
        if tool_calls:
            turn["tool_calls"] = tool_calls
        out.append(turn)
    elif chat_parts:
        out.append({"role": "user", "content": chat_parts})
    return out


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _config_to_chat(config: Any, chat: dict[str, Any]) -> None:
    if config is None:
        return
    if not isinstance(config, Mapping):
        raise UnsupportedGemini("generationConfig: must be an object.")
    unknown = sorted(k for k in config if k not in _CONFIG_HANDLED)
    if unknown:
        raise UnsupportedGemini(
            f"generationConfig.{', generationConfig.'.join(unknown)}: not supported by the "
            "local engine."
        )
    for key, target in _CONFIG_KEYS.items():
        if config.get(key) is not None:
            chat[target] = config[key]
    if config.get("stopSequences"):
        chat["stop"] = list(config["stopSequences"])
    if config.get("responseLogprobs"):
        chat["logprobs"] = True
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    if config.get("responseMimeType") == "application/json":
        chat["response_format"] = (
            {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
            if isinstance(schema, Mapping)
            else {"type": "json_object"}
        )


def _tools_to_chat(tools: Any, tool_config: Any, chat: dict[str, Any]) -> None:
    declarations = [
        camel_keys(declaration)
        for tool in tools or []
        if isinstance(tool, Mapping)
        for declaration in camel_keys(tool).get("functionDeclarations") or []
        if isinstance(declaration, Mapping)
    ]
    if declarations:
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": d.get("name"),
                    **({"description": d["description"]} if d.get("description") else {}),
                    "parameters": d.get("parameters")
                    or d.get("parametersJsonSchema")
                    or {"type": "object"},
                },
            }
            for d in declarations
        ]
    calling = tool_config.get("functionCallingConfig") if isinstance(tool_config, Mapping) else None
    if not isinstance(calling, Mapping):
        return
    calling = camel_keys(calling)
    mode = str(calling.get("mode") or "AUTO").upper()
    names = calling.get("allowedFunctionNames") or []
    if mode == "ANY" and len(names) == 1:
        chat["tool_choice"] = {"type": "function", "function": {"name": names[0]}}
    else:
        chat["tool_choice"] = {"NONE": "none", "ANY": "required"}.get(mode, "auto")


# ---------------------------------------------------------------------------------------------
# chat completion -> GenerateContentResponse


def chat_to_response(completion: Mapping[str, Any], *, model: Any) -> dict[str, Any]:
    """A GenerateContentResponse for a chat completion (one candidate per choice)."""
    choices = completion["choices"] if isinstance(completion.get("choices"), list) else []
    candidates = []
    for index, choice in enumerate(choices):
        if not isinstance(choice, Mapping):
            continue
        message = choice["message"] if isinstance(choice.get("message"), Mapping) else {}
        parts: list[dict[str, Any]] = []
        if message.get("content"):
            parts.append({"text": str(message["content"])})
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except ValueError:
                arguments = {"_raw_arguments": function.get("arguments")}
            parts.append({"functionCall": {"name": function.get("name"), "args": arguments}})
        candidates.append(
            {
                "content": {"role": "model", "parts": parts},
                "finishReason": _FINISH_REASONS.get(str(choice.get("finish_reason")), "STOP"),
                "index": choice.get("index", index),
            }
        )
    usage = completion["usage"] if isinstance(completion.get("usage"), Mapping) else {}
    prompt = int(usage.get("prompt_tokens") or 0)
    output = int(usage.get("completion_tokens") or 0)
    response: dict[str, Any] = {
        "candidates": candidates,
        "usageMetadata": {
            "promptTokenCount": prompt,
            "candidatesTokenCount": output,
            "totalTokenCount": int(usage.get("total_tokens") or prompt + output),
        },
        "modelVersion": completion.get("model") or model,
    }
    if completion.get("id"):
        response["responseId"] = str(completion["id"])
    return response
