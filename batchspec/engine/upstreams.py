"""Upstreams: where the engine sends each request line of a batch.

- ``HttpUpstream``: any OpenAI-compatible base URL (vLLM, Ollama, llama.cpp, LM Studio, a
  LiteLLM proxy, OpenAI itself). A line's ``url`` and ``body`` are forwarded as they are, over
  one keep-alive connection pool (``http11.py``, which honours ``HTTP_PROXY``/``NO_PROXY``);
  the API key comes from an environment variable and is never logged or put in an error.
  Several of them behind one rotation (least in flight first, failing ones taken out, per
  upstream rate limits) are ``balancer.BalancedUpstream``.
- ``BuiltinUpstream``: a deterministic **offline stand-in, not a model**. It answers chat,
  completions and responses with a reply derived from the prompt (prefixed ``[builtin
  stand-in]``) and realistic ``usage`` (about 4 characters per token), embeddings with a unit
  vector derived from the input's sha256, and moderations with "not flagged". It exists so
  batchspec runs end to end on a machine with no account and no network.
- ``FaultyUpstream``: wraps another upstream and injects 500s, 429s and timeouts for tests,
  decided by a seeded hash of ``custom_id`` and attempt, so every run is reproducible.
- ``standin_app``: the stand-in served over HTTP (a separate upstream server for tests and the
  benchmark), counting the calls it receives.

Base URLs: with a base URL ending in ``/v1`` (the OpenAI convention, e.g.
``http://localhost:11434/v1``) a line's ``/v1/chat/completions`` goes to
``<base>/chat/completions``; otherwise to ``<base>/v1/chat/completions``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import os
import re
import struct
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from batchspec.engine import jsonfast
from batchspec.engine.http11 import ConnectFailed, ConnectionFailed, Http11Pool
from batchspec.errors import BatchspecError, UsageError
from batchspec.wire.request_checks import first_message_problem, output_limit_problem
from batchspec.wire.retry import retry_after_seconds
from batchspec.wire.secrets import byte_forms, proxy_credentials
from batchspec.wire.upstream_place import misspells_builtin

#: the header `batchspec serve` sends with the 404 it answers a model endpoint with: an
#: engine whose upstream is a serve (a Batch API, not a model server) knows it by this
BATCH_API_HEADER = "x-batchspec-batch-api"

SUPPORTED_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
    "/v1/messages",  # Anthropic Messages, run as chat completions (messages_upstream.py)
    "/v1beta/generateContent",  # Gemini, run as chat completions (gemini_upstream.py)
)


@dataclass(frozen=True)
class UpstreamResponse:
    """What an upstream answered: status, parsed JSON body (or text), request id, Retry-After."""

    status_code: int
    body: Any
    request_id: str | None = None
    retry_after: float | None = None  # seconds the upstream asked us to wait


class UpstreamUnreachable(Exception):
    """The upstream could not be reached (connection refused, reset, DNS, protocol error)."""


class UpstreamNotConnected(UpstreamUnreachable):
    """No connection could be opened, so the request was never sent (safe to send elsewhere)."""


class Upstream(Protocol):
    """Sends one request line; the engine adds timeouts and retries around ``send``.

    An upstream whose ``times_requests`` attribute is true applies the request timeout itself
    (raising ``TimeoutError``), and the worker then does not (``balancer.BalancedUpstream``).
    """

    description: str

    async def send(
        self, url: str, body: Any, *, custom_id: str, attempt: int
    ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Any OpenAI-compatible server


def without_credentials(url: str) -> str:
    """``url`` without the ``user:password@`` of its authority, query or fragment: fit for
    messages even when the URL is malformed (a port that is not a number).

    Everything after ``://`` up to the last ``@`` goes: a password someone did not
    percent-encode may hold ``/``, ``#``, ``?`` or ``@``, which ``urlsplit`` would read as the
    end of the authority (showing a URL with an ``@`` in its path or query shortened is the
    lesser harm)."""
    scheme, sep, rest = url.partition("://")
    if sep:
        url = f"{scheme}://{rest.rpartition('@')[2]}"
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def refuse_a_raw_password(url: str) -> None:
    """A usage error when ``url``'s password holds '/', '?' or '#' not percent-encoded: those
    end the host, so the password would be read as a port, a path or ``#`` limits (and shown
    in their messages)."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest and "@" not in urlsplit(url).netloc:
        raise UsageError(
            f"Upstream {without_credentials(url)!r}: its user:password holds '/', '?' or '#', "
            "which end a URL's host: percent-encode them (%2F, %3F, %23)."
        )


REDACTED = b"[redacted]"


class HttpUpstream:
    """Forwards lines to an OpenAI-compatible base URL over one keep-alive connection pool.

    Its key is sent in each request's Authorization header and redacted from every answer
    (``[redacted]``) before the answer is parsed and recorded as a line's result."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        max_connections: int = 64,
    ) -> None:
        refuse_a_raw_password(base_url)
        parts = urlsplit(base_url)
        # Never show credentials embedded in the URL.
        shown = without_credentials(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                f"Upstream {shown!r} is not an http(s) URL; "
                "use e.g. http://localhost:11434/v1 or 'builtin'."
            )
        try:
            port = parts.port
        except ValueError as err:  # out of range, or not a number
            raise UsageError(f"Upstream {shown}: {err}.") from None
        netloc = parts.hostname
        if port:
            netloc += f":{port}"
        self.description = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        refuse_an_endpoint_path(self.description, parts.path)
        self._path = parts.path.rstrip("/")
        self._strip_v1 = self._path.endswith("/v1")
        # the key as it could come back in an answer: an upstream (a careless proxy) that
        # quotes the Authorization header in its error would otherwise put it in the batch's
        # error file, which every client downloads and keeps (results/, the state store)
        # (a placeholder key, "EMPTY" or "x", is not: wire/secrets.py)
        # and so is the Basic token of a proxy from HTTP(S)_PROXY (its Proxy-Authorization),
        # which a proxy refusing with a 407 may quote (not its password: never sent as it is,
        # and maybe a word an answer holds)
        self._secrets = byte_forms([api_key or "", *proxy_credentials(os.environ).tokens])
        try:
            self._pool = Http11Pool(
                base_url,
                max_connections=max_connections,
                headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            )
        except ValueError as err:  # an unusable HTTP_PROXY
            raise UsageError(f"Upstream {self.description}: {err}.") from None

    def target(self, url: str) -> str:
        """The request target (path) a line's ``url`` is sent to."""
        path = url if url.startswith("/") else f"/{url}"
        if self._strip_v1 and path.startswith("/v1/"):
            path = path[3:]
        return self._path + path

    async def send(self, url: str, body: Any, *, custom_id: str, attempt: int) -> UpstreamResponse:
        try:
            response = await self._pool.post(self.target(url), jsonfast.dumps(body))
        # a proxy's refusal is quoted in these (a CONNECT's status line): without the key or
        # the proxy's credentials, and not chained to the exception that quotes them whole
        except ConnectFailed as err:
            raise UpstreamNotConnected(self._redacted_text(str(err))) from None
        except ConnectionFailed as err:
            raise UpstreamUnreachable(self._redacted_text(str(err))) from None
        if 300 <= response.status_code < 400:
            return self._redirected(response.status_code, response.headers.get("location"))
        if response.status_code == 404 and BATCH_API_HEADER in response.headers:
            return self._a_batch_api()
        raw = response.body
        for secret in self._secrets:
            if secret in raw:
                raw = raw.replace(secret, REDACTED)
        try:
            parsed: Any = jsonfast.loads(raw)
        except ValueError:  # orjson.JSONDecodeError is a ValueError too
            parsed = raw.decode("utf-8", "replace")
            if 200 <= response.status_code < 300:
                return self._not_json(response.status_code, parsed)
        request_id = response.headers.get("x-request-id")
        if request_id is not None:  # recorded with the line's result, as the body is
            request_id = self._redacted_text(request_id)
        return UpstreamResponse(
            status_code=response.status_code,
            body=parsed,
            request_id=request_id,
            retry_after=retry_after_seconds(response.headers),
        )

    def _redacted_text(self, text: str) -> str:
        raw = text.encode("utf-8", "surrogateescape")
        for secret in self._secrets:
            raw = raw.replace(secret, REDACTED)
        return raw.decode("utf-8", "replace")

    def _not_json(self, status: int, text: str) -> UpstreamResponse:
        """A success whose body is not JSON (a captive portal's page, a wrong path served by
        a web server) is no result: a 502, so the line is retried (elsewhere, in a rotation)
        instead of completing with the page as its answer."""
        preview = " ".join(text[:80].split())
        return _api_error(
            502,
            f"The upstream {self.description} answered {status} with a body that is not JSON "
            f"({preview!r}); is its URL the OpenAI-compatible base URL?",
        )

    def _redirected(self, status: int, location: str | None) -> UpstreamResponse:
        """A redirect is no result and is never followed (a POST re-sent elsewhere, perhaps
        with the key, to a login page): the upstream URL is misconfigured. A 502 naming it and
        where it points (without credentials, query or fragment), so the member is taken out
        of rotation like a failing one and the line is retried (elsewhere, in a rotation)."""
        where = f" to {without_credentials(location)}" if location else " with no Location"
        return _api_error(
            502,
            f"The upstream {self.description} answered a redirect ({status}){where}; "
            "redirects are not followed: give the URL it should be called at "
            "(the OpenAI-compatible base URL)",
        )

    def _a_batch_api(self) -> UpstreamResponse:
        """Another `batchspec serve` runs batches and answers no request: the upstream URL is
        misconfigured, as a redirect's is. A 502 saying so, so the member is taken out of
        rotation (and said to be) and the line is retried elsewhere, not failed for good
        with a 404 on each line sent to it."""
        return _api_error(
            502,
            f"The upstream {self.description} is `batchspec serve`, not a model server: "
            "point it at one (vLLM, Ollama, llama.cpp, ...) or at 'builtin'.",
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


# ---------------------------------------------------------------------------------------------
# The builtin offline stand-in


def estimate_tokens(text: str) -> int:
    """About four characters per token, OpenAI's rule of thumb; at least one for non-empty."""
    return math.ceil(len(text) / 4) if text else 0


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or a list of parts with ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text_of(part) for part in content)
    if isinstance(content, Mapping):
        for key in ("text", "content", "input_text"):
            if key in content:
                return _text_of(content[key])
    return ""


def _stable_id(prefix: str, body: Any) -> str:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return f"{prefix}{digest[:24]}"


def _api_error(status: int, message: str, *, param: str | None = None) -> UpstreamResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return UpstreamResponse(status_code=status, body=body)


def _reply(prompt: str, max_tokens: Any) -> tuple[str, str]:
    """The stand-in's reply to a prompt, and its finish reason."""
    words = prompt.split()
    preview = " ".join(words[:12])
    text = f"[builtin stand-in] {len(words)} words received; they begin: {preview}"
    if isinstance(max_tokens, int) and max_tokens > 0 and estimate_tokens(text) > max_tokens:
        return text[: max_tokens * 4], "length"
    return text, "stop"


def _unit_vector(text: str, dimensions: int) -> list[float]:
    raw = b""
    counter = 0
    while len(raw) < dimensions * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [
        (word / 0xFFFFFFFF) * 2 - 1
        for word in struct.unpack(f"<{dimensions}I", raw[: dimensions * 4])
    ]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 8) for v in values]


MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


class BuiltinUpstream:
    """The offline stand-in (not a model): deterministic, OpenAI-shaped answers.

    ``latency`` delays every answer (seconds), so tests can cancel or expire a running batch.
    ``calls`` counts the calls per ``custom_id``, for in-process tests.
    """

    description = "builtin (offline stand-in, not a model)"

    def __init__(self, *, latency: float = 0.0) -> None:
        self.latency = latency
        self.calls: Counter[str] = Counter()

    async def send(self, url: str, body: Any, *, custom_id: str, attempt: int) -> UpstreamResponse:
        self.calls[custom_id] += 1
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        return answer(url, body)

    async def aclose(self) -> None:
        return None


#: models the stand-in does not serve (each request naming one answers 404)
UNKNOWN_MODEL_PREFIX = "no-such-"


def answer(url: str, body: Any) -> UpstreamResponse:
    """The stand-in's answer to one request (pure, apart from ``created`` timestamps)."""
    path = url[3:] if url.startswith("/v1/") else url
    handler = _HANDLERS.get(path)
    if handler is None:
        return _api_error(404, f"The builtin stand-in does not serve {url}.")
    if not isinstance(body, Mapping):
        return _api_error(400, "The request body must be a JSON object.")
    if path != "/moderations" and not isinstance(body.get("model"), str):
        return _api_error(400, "You must provide a model parameter.", param="model")
    required = _REQUIRED.get(path)
    if required is not None and body.get(required) in (None, "", []):
        return _api_error(400, f"'{required}' is a required property.", param=required)
    # what OpenAI refuses per request, refused as it does (400), so that a request sent to
    # serve without batchspec's own validation fails here as it would at the provider
    problem = output_limit_problem(body)
    messages = body.get("messages")
    if problem is None and path == "/chat/completions" and isinstance(messages, list):
        problem = first_message_problem(messages)
    if problem is not None:
        return _api_error(400, problem[1])
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not 0 <= temperature <= 2:
        # OpenAI's range; validate leaves parameter ranges to the provider (they differ)
        side = "greater than the maximum of 2" if temperature > 2 else "less than the minimum of 0"
        return _api_error(400, f"{temperature} is {side} - 'temperature'", param="temperature")
    model = body.get("model")
    if isinstance(model, str) and model.startswith(UNKNOWN_MODEL_PREFIX):
        # as a provider answers a model it does not serve: a request that fails for good,
        # offline (what validate cannot know, a failure to try the errors files and retries on)
        return _api_error(
            404, f"The model `{model}` does not exist or you do not have access to it."
        )
    return UpstreamResponse(
        status_code=200, body=handler(body), request_id=_stable_id("req_", body)
    )


def _chat(body: Mapping[str, Any]) -> dict[str, Any]:
    messages = body["messages"] if isinstance(body.get("messages"), list) else []
    texts = [_text_of(m.get("content")) for m in messages if isinstance(m, Mapping)]
    prompt_tokens = sum(estimate_tokens(t) + 3 for t in texts) + 3
    last_user = next(
        (
            _text_of(m.get("content"))
            for m in reversed(messages)
            if isinstance(m, Mapping) and m.get("role") == "user"
        ),
        texts[-1] if texts else "",
    )
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    text, finish = _reply(last_user, limit)
    completion_tokens = estimate_tokens(text)
    return {
        "id": _stable_id("chatcmpl-", body),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": _chat_usage(prompt_tokens, completion_tokens),
        "system_fingerprint": "builtin-stand-in",
    }


def _chat_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _completions(body: Mapping[str, Any]) -> dict[str, Any]:
    prompt = _text_of(body.get("prompt", ""))
    text, finish = _reply(prompt, body.get("max_tokens"))
    prompt_tokens, completion_tokens = estimate_tokens(prompt), estimate_tokens(text)
    return {
        "id": _stable_id("cmpl-", body),
        "object": "text_completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _responses(body: Mapping[str, Any]) -> dict[str, Any]:
    raw_input = body.get("input", "")
    prompt = (
        _text_of(raw_input)
        if not isinstance(raw_input, list)
        else " ".join(
            _text_of(item.get("content", item)) if isinstance(item, Mapping) else _text_of(item)
            for item in raw_input
        )
    )
    text, finish = _reply(prompt, body.get("max_output_tokens"))
    input_tokens, output_tokens = estimate_tokens(prompt), estimate_tokens(text)
    return {
        "id": _stable_id("resp_", body),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if finish == "stop" else "incomplete",
        "model": body["model"],
        "output": [
            {
                "type": "message",
                "id": _stable_id("msg_", body),
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def _embeddings(body: Mapping[str, Any]) -> dict[str, Any]:
    raw = body.get("input", "")
    inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    dimensions = body["dimensions"] if isinstance(body.get("dimensions"), int) else 16
    base64_format = body.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for index, item in enumerate(inputs):
        text = item if isinstance(item, str) else json.dumps(item)
        tokens += len(item) if isinstance(item, list) else estimate_tokens(text)
        vector: Any = _unit_vector(text, max(1, dimensions))
        if base64_format:
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _moderations(body: Mapping[str, Any]) -> dict[str, Any]:
    raw = body.get("input", "")
    inputs = raw if isinstance(raw, list) else [raw]
    result = {
        "flagged": False,
        "categories": dict.fromkeys(MODERATION_CATEGORIES, False),
        "category_scores": dict.fromkeys(MODERATION_CATEGORIES, 0.0),
    }
    return {
        "id": _stable_id("modr-", body),
        "model": body.get("model") or "omni-moderation-latest",
        "results": [dict(result) for _ in inputs],
    }


#: The field each endpoint cannot do without (OpenAI answers 400 without it).
_REQUIRED = {"/chat/completions": "messages", "/embeddings": "input", "/moderations": "input"}

_HANDLERS = {
    "/chat/completions": _chat,
    "/completions": _completions,
    "/responses": _responses,
    "/embeddings": _embeddings,
    "/moderations": _moderations,
}


# ---------------------------------------------------------------------------------------------
# Fault injection (tests)


@dataclass(frozen=True)
class Faults:
    """Which faults to inject; fractions are of (custom_id, n-th send) pairs, drawn by hash.

    The n-th send of a ``custom_id`` through this upstream draws afresh, so a line that a
    client resubmits in a later batch may succeed, as with a real transient fault.
    ``sticky`` draws by ``custom_id`` alone, so a faulty line fails on every attempt;
    ``fail_first`` makes the first N attempts of every line answer 500, so retries succeed.
    """

    error_500: float = 0.0
    error_429: float = 0.0
    timeout: float = 0.0
    fail_first: int = 0
    sticky: bool = False
    seed: int = 0
    retry_after: float | None = 0.0  # sent with 429s (seconds); None sends no header


class FaultyUpstream:
    """Injects ``Faults`` in front of another upstream; ``calls`` counts sends per custom_id."""

    def __init__(self, inner: Upstream, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self.description = f"{inner.description} with injected faults"
        self.calls: Counter[str] = Counter()

    def draw(self, custom_id: str, attempt: int) -> float:
        key = f"{self.faults.seed}:{custom_id}" + ("" if self.faults.sticky else f":{attempt}")
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64

    async def send(self, url: str, body: Any, *, custom_id: str, attempt: int) -> UpstreamResponse:
        sends = self.calls[custom_id]  # earlier sends of this line, in any batch
        self.calls[custom_id] += 1
        faults = self.faults
        if attempt < faults.fail_first:
            return _api_error(500, f"Injected fault: attempt {attempt + 1} fails.")
        u = self.draw(custom_id, sends)
        if u < faults.error_500:
            return _api_error(500, "Injected fault: server error.")
        if u < faults.error_500 + faults.error_429:
            response = _api_error(429, "Injected fault: rate limit reached.")
            return UpstreamResponse(429, response.body, retry_after=faults.retry_after)
        if u < faults.error_500 + faults.error_429 + faults.timeout:
            await asyncio.sleep(3600)  # the engine's per-request timeout cancels this
        return await self.inner.send(url, body, custom_id=custom_id, attempt=attempt)

    async def aclose(self) -> None:
        await self.inner.aclose()


# ---------------------------------------------------------------------------------------------
# Construction from a CLI/config string

#: what a line's ``url`` adds to a base URL; a base URL ending in one names an endpoint
_ENDPOINT_SUFFIXES = tuple(
    e.removeprefix("/v1") for e in SUPPORTED_ENDPOINTS if e.startswith("/v1/")
)


def refuse_an_endpoint_path(shown: str, path: str) -> None:
    """A base URL that ends in an endpoint (``.../v1/chat/completions``) would get the line's
    own endpoint appended to it (``.../chat/completions/chat/completions``) and every line
    would fail with the server's 404: refuse it up front, naming the base URL meant."""
    trimmed = path.rstrip("/")
    for suffix in _ENDPOINT_SUFFIXES:
        if trimmed.lower().endswith(suffix):
            base = shown.rstrip("/")[: -len(suffix)]
            raise UsageError(
                f"Upstream {shown!r} names an endpoint ({suffix}), not a base URL: each "
                f"line's own endpoint is appended to it. Use {base!r}."
            )


def unknown_upstream_message(shown: str) -> str:
    """Why ``shown`` is no upstream; a host without a scheme gets the URL it likely meant."""
    hint = "use 'builtin' or an OpenAI-compatible base URL such as http://localhost:8000/v1"
    if misspells_builtin(shown):
        return f"Unknown upstream {shown!r}: did you mean 'builtin' (the offline stand-in)?"
    if "://" not in shown:
        shown = shown.rpartition("@")[2]  # user:password@host read as a scheme and a path
    if "://" not in shown and shown and not any(c.isspace() for c in shown):
        hint = (
            f"a base URL needs its scheme: did you mean 'http://{shown}'? "
            "('builtin' is the offline stand-in)"
        )
    return f"Unknown upstream {shown!r}: {hint}."


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_several_urls(spec: str) -> None:
    """A usage error when ``spec`` is several URLs run together (``A,B``), shown with no
    URL's credentials, query or fragment."""
    if spec.count("://") < 2 and not (spec.startswith("builtin") and "://" in spec):
        return
    # One piece per URL, from its scheme to the next one's: a password may hold ',' or '#'.
    starts = [0, *(m.start() for m in _SCHEME.finditer(spec)), len(spec)]
    shown = ""
    for piece in (spec[a:b] for a, b in pairwise(starts) if a < b):
        url = piece.rstrip(",; \t\r\n")
        separator = piece[len(url) :]
        if "://" in url:
            url = without_credentials(url)
        else:  # builtin, or a host without its scheme (user:password@host)
            url = re.split(r"[?#]", url.rpartition("@")[2])[0]
        shown += url + separator
    raise UsageError(
        f"Upstream {shown!r} holds more than one URL: repeat --upstream for each "
        "(BATCHSPEC_UPSTREAM separates them with spaces)."
    )


def make_upstream(
    spec: str,
    *,
    api_key_env: str | None = None,
    latency: float = 0.0,
    faults: Faults | None = None,
    max_connections: int = 64,
) -> Upstream:
    """``builtin`` or an http(s) base URL, with the API key read from ``api_key_env``."""
    upstream: Upstream
    refuse_several_urls(spec)
    if spec == "builtin":
        upstream = BuiltinUpstream(latency=latency)
    elif spec.startswith(("http://", "https://")):
        api_key = None
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise BatchspecError(
                    f"The upstream API key variable {api_key_env} is not set or empty. "
                    f"Export it (export {api_key_env}=...) or drop --upstream-api-key-env."
                )
        upstream = HttpUpstream(spec, api_key=api_key, max_connections=max_connections)
    else:
        raise UsageError(unknown_upstream_message(without_credentials(spec)))
    if faults is not None:
        upstream = FaultyUpstream(upstream, faults)
    return upstream


# ---------------------------------------------------------------------------------------------
# The stand-in over HTTP (a separate upstream server for tests and benchmarks)


def standin_app(*, latency: float = 0.0) -> Any:
    """A Starlette app answering like ``BuiltinUpstream`` on ``/v1/...``.

    ``app.state.calls`` counts requests per sha256 of the request body, so a test can check
    that no request line reached the upstream twice.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    calls: Counter[str] = Counter()

    async def endpoint(request: Request) -> JSONResponse:
        raw = await request.body()
        calls[hashlib.sha256(raw).hexdigest()] += 1
        if latency > 0:
            await asyncio.sleep(latency)
        try:
            body = json.loads(raw)
        except ValueError:
            result = _api_error(400, "The request body is not valid JSON.")
        else:
            result = answer(request.url.path, body)
        headers = {"x-request-id": result.request_id} if result.request_id else None
        return JSONResponse(result.body, status_code=result.status_code, headers=headers)

    app = Starlette(routes=[Route("/v1/{path:path}", endpoint, methods=["POST"])])
    app.state.calls = calls
    return app
