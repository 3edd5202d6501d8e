"""The token usage one result line reports, whatever dialect answered it.

Every collected line is OpenAI-shaped (``{"custom_id", "response": {"status_code", "body"}}``,
see ``batchspec.wire.anthropic_lines`` and ``gemini_lines``); its ``body`` is the provider's
own answer, so the usage is read by shape, first match wins:

=====================================  =========================================================
``body.usage.prompt_tokens``           OpenAI chat/completions/embeddings, Azure, LiteLLM, Groq,
                                       Together, the local engine: ``prompt_tokens`` in,
                                       ``completion_tokens`` out (0 when absent: embeddings)
``body.usage.input_tokens``            Anthropic messages (plus ``cache_creation_input_tokens``
                                       and ``cache_read_input_tokens``: all are input) and the
                                       OpenAI Responses API: ``input_tokens`` / ``output_tokens``
``body.usageMetadata``                 Gemini: ``promptTokenCount`` in, ``candidatesTokenCount``
                                       (+ ``thoughtsTokenCount``) out
=====================================  =========================================================

A line with none of these (an error, an unknown shape) reports no usage: ``None``, never 0.
Cached input is counted as input at the full price: an upper bound, stated as such.

**Before** a batch runs, ``max_output_of_request`` bounds what one request line may answer:
its ``max_completion_tokens``, ``max_tokens`` (OpenAI chat/completions, Anthropic
``params``) or ``generationConfig.maxOutputTokens`` (Gemini); when it sets none, the most its
model answers (``UNSET_OUTPUT_BOUNDS``: 16,384 for gpt-4o, 100,000 for o3, ...; else 4,096);
times the choices it asks for (``n``, ``best_of``, ``candidateCount``: each is generated and
billed); 0 for embeddings and moderations, which answer no tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

from batchspec.wire import anthropic_lines


class LineUsage(NamedTuple):
    """What one answer used (a tuple: one is made for every answer collected)."""

    input_tokens: int
    output_tokens: int


def usage_of_line(line: Mapping[str, Any]) -> LineUsage | None:
    """The usage one parsed result line reports (see the module docstring), or ``None``."""
    # type(...) is dict first: parsed JSON is dicts, and an ABC check costs as much as the rest
    response = line.get("response")
    if not (type(response) is dict or isinstance(response, Mapping)):
        return None
    body = response.get("body")
    if not (type(body) is dict or isinstance(body, Mapping)):
        return None
    usage = body.get("usage")
    if type(usage) is dict or isinstance(usage, Mapping):
        if "prompt_tokens" in usage:
            return LineUsage(
                _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
            )
        if "input_tokens" in usage:
            inputs = sum(
                _count(usage.get(k))
                for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
            )
            return LineUsage(inputs, _count(usage.get("output_tokens")))
    meta = body.get("usageMetadata")
    if isinstance(meta, Mapping):
        out = _count(meta.get("candidatesTokenCount")) + _count(meta.get("thoughtsTokenCount"))
        return LineUsage(_count(meta.get("promptTokenCount")), out)
    return None


#: the output bound assumed for a request that sets no limit, to a model not in
#: ``UNSET_OUTPUT_BOUNDS`` (Anthropic's defaultMaxTokens: what its provider sets then)
DEFAULT_MAX_OUTPUT_TOKENS = 4096

#: what a request that sets no output limit may answer, by model family (the longest prefix
#: that ends at a ``-``, ``.``, ``:`` or the name's end wins): the family's documented most.
#: Reasoning models think for up to their whole limit unasked, so 4,096 is no bound for them.
#: The input scans cached by ``workspace.inputcache`` sum these bounds: a change here renames
#: its table (``input_scansN``), and ``tests/test_budget.py`` holds the two together.
UNSET_OUTPUT_BOUNDS: Mapping[str, int] = {
    "gpt-3.5": 4_096,
    "gpt-4": 8_192,
    "gpt-4-turbo": 4_096,
    "gpt-4o": 16_384,
    "chatgpt-4o": 16_384,
    "gpt-4.1": 32_768,
    "gpt-4.5": 16_384,
    "gpt-5": 128_000,
    "gpt-6": 128_000,
    "gpt-oss": 131_072,
    "o1": 100_000,
    "o1-mini": 65_536,
    "o3": 100_000,
    "o4": 100_000,
    "codex": 100_000,
    "gemini-1.5": 8_192,
    "gemini-2.0": 8_192,
    "gemini-2.5": 65_536,
    "gemini-3": 65_536,
    "gemini-4": 65_536,
    # Google's aliases of its newest models (2.5 and later), not a generation number
    "gemini-flash-latest": 65_536,
    "gemini-flash-lite-latest": 65_536,
    "gemini-pro-latest": 65_536,
}
_BOUNDARY = ("-", ".", ":", "@")


@functools.lru_cache(maxsize=256)
def unset_output_bound(model: str | None) -> int:
    """The output bound of a request to ``model`` that sets no limit (``UNSET_OUTPUT_BOUNDS``;
    ``DEFAULT_MAX_OUTPUT_TOKENS`` for any other model). The name is read as the family's:
    lower case, without a route's or a fine-tune's prefix (``openai/``, ``models/``,
    ``ft:``)."""
    if not isinstance(model, str):
        return DEFAULT_MAX_OUTPUT_TOKENS
    name = model.strip().lower().rsplit("/", 1)[-1].removeprefix("ft:")
    best = ""
    for prefix in UNSET_OUTPUT_BOUNDS:
        if (
            len(prefix) > len(best)
            and name.startswith(prefix)
            and (len(name) == len(prefix) or name[len(prefix)] in _BOUNDARY)
        ):
            best = prefix
    return UNSET_OUTPUT_BOUNDS[best] if best else DEFAULT_MAX_OUTPUT_TOKENS


_NO_OUTPUT = ("/embeddings", "/moderations")


def provider_output_limit(
    provider_type: str | None, options: Mapping[str, Any] | None
) -> int | None:
    """The output limit a provider sends a request that sets none with, when it sets one: an
    ``anthropic`` provider's ``defaultMaxTokens`` (Anthropic requires a limit); else None."""
    if provider_type != "anthropic" or not options:
        return None
    limit = options.get("defaultMaxTokens")
    return limit if type(limit) is int and limit > 0 else None


def max_output_of_request(
    url: Any, body: Mapping[str, Any], model: str | None = None, unset: int | None = None
) -> int:
    """The most output tokens one request may be charged for (see the module docstring);
    ``model``: the one it is sent to when its body names none (a Mistral job's); ``unset``:
    the limit its provider sets when it sets none (Anthropic's ``defaultMaxTokens``)."""
    if isinstance(url, str) and url.rstrip("/").endswith(_NO_OUTPUT):
        return 0
    # every choice is generated and billed: ``n`` (OpenAI, Mistral), ``best_of`` (OpenAI
    # completions: generated server-side, billed though not returned), ``candidateCount``
    n, best_of = body.get("n"), body.get("best_of")
    choices = 1 if n is None and best_of is None else max(_limit(n), _limit(best_of), 1)
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        limit = _limit(body.get(key))
        if limit:
            return limit * choices
    config = body.get("generationConfig") or body.get("generation_config")
    if isinstance(config, Mapping):
        choices = max(choices, _limit(config.get("candidateCount")), 1)
        for key in ("maxOutputTokens", "max_output_tokens"):
            limit = _limit(config.get(key))
            if limit:
                return limit * choices
    return (unset or unset_output_bound(body.get("model") or model)) * choices


def max_output_of_line(line: Any, model: str | None = None, unset: int | None = None) -> int:
    """``max_output_of_request`` of one parsed request line, as the input scan sums it: its
    ``url`` and ``body``, or an Anthropic ``{custom_id, params}`` line's ``params``."""
    if not isinstance(line, Mapping):
        return 0
    params = line.get("params")
    if isinstance(params, Mapping) and anthropic_lines.is_native(line):
        return max_output_of_request(anthropic_lines.MESSAGES_ENDPOINT, params)
    body = line.get("body")
    if not isinstance(body, Mapping):
        return 0
    url = line.get("url")
    return max_output_of_request(url if isinstance(url, str) else None, body, model, unset)


def _limit(value: Any) -> int:
    """A request's count parameter as a server may read it: an integer, and also what lax
    validators take for one (pydantic: vLLM, LiteLLM; protobuf JSON: Gemini), an integral
    float (``100000.0``) or a string of digits (``"100000"``). Taking those for "not set"
    would bound the request at the default while it is served at its own limit. Anything
    else (``0``, ``-5``, ``true``, ``1.5``, a list) is "not set": never a bound below the
    default, never an error. ``validate`` refuses all of these for ``max_tokens``,
    ``max_completion_tokens`` and ``max_output_tokens`` (``wire.request_checks``); the lax
    reading serves what it does not check (``generationConfig``, ``n``)."""
    if value is None:  # the common cases first: a scan asks this of every request
        return 0
    if type(value) is int:
        return value if value > 0 else 0
    if isinstance(value, float) and value.is_integer():
        return int(value) if value > 0 else 0
    if isinstance(value, str) and value.strip().isdecimal():
        try:
            return int(value)
        except ValueError:  # more digits than Python converts (4,300): as not set, no crash
            return 0
    return _count(value)


def _count(value: Any) -> int:
    if type(value) is int:  # parsed JSON's integers: the common case, checked first
        return value if value > 0 else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
