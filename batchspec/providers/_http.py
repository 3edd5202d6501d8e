"""HTTP plumbing every HTTP provider shares: retries, backoff, error envelopes, creates.

What this module promises:

- Retries follow one ``RetryPolicy`` (``batchspec.wire.retry``; by default ``CLIENT_POLICY``,
  the official SDK's rules): a request is retried after a transport error or timeout and
  after HTTP 408, 409, 429 and every status >= 500 but 501 and 505 (no wait changes those), at
  most ``max_retries`` times; never after
  a 429 whose code is ``insufficient_quota`` (waiting does not buy quota), nor when the
  server answers ``x-should-retry: false``; ``x-should-retry: true`` forces a retry.
- The wait before a retry honours ``retry-after-ms``, then ``Retry-After`` (seconds or an
  HTTP date), capped at 60 s; without them it backs off exponentially from 0.5 s to 8 s with
  up to 25 % jitter.
- Requests that are not idempotent (creating a batch) can ask not to be retried when the
  outcome is *ambiguous* (the server may have acted: 5xx other than 503, a read timeout, a
  dropped connection); they get ``AmbiguousOutcome`` and decide themselves, so a retry
  never pays for a batch twice.
- Every failure becomes a ``ProviderError`` (``RemoteNotFound`` for a 404) built from the
  *response*: the status, the provider's message, its code, the request id and a hint of
  what to do. The API key lives only in a request header and is never formatted into a
  message; as a second line of defence every secret the client knows, and anything shaped
  like an ``sk-`` key, is redacted from messages built here.
- What is read into memory is bounded: an answer (a batch, a listing page) at most
  ``MAX_ANSWER_BYTES`` decoded, else ``ProviderError`` naming the URL; an error answer to a
  download at most ``MAX_ERROR_BODY_BYTES`` (its envelope). File contents stream to disk
  (``download``), refused as a decompression bomb past ``MAX_INFLATION``. Every request
  offers only the encodings whose inflation that bounds (``ACCEPT_ENCODING``: gzip, deflate),
  whatever optional decoders httpx found installed; an answer sent in another encoding
  httpx would decode (``br``, ``zstd``) is refused unread (ambiguous for a create).
- ``create_or_adopt`` is the one create loop: after an ambiguous failure it adopts the batch
  the lost create made (each provider says how to find it) before it sends again, if ever.
- ``cancel_or_ended`` is the one cancel: a cancel refused because the batch has already
  ended (``NOT_CANCELLABLE_STATUSES``, not retried) returns that batch as it is, read back
  with a get; a refusal of a batch still running is raised at once, saying so.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from batchspec.errors import ProviderError, UsageError
from batchspec.providers.base import AmbiguousOutcome as AmbiguousOutcome  # re-exported
from batchspec.providers.base import (
    DeadlineReached,
    RemoteBatch,
    RemoteNotFound,
    RetryNotice,
    call_place,
    pause_before_retry,
    report_retry,
    report_throttle,
    seconds_left,
)
from batchspec.wire.batch_status import NOTHING_TO_CANCEL
from batchspec.wire.hosts import unreachable_url
from batchspec.wire.no_proxy import bypasses_proxy
from batchspec.wire.retry import (
    CLIENT_POLICY,
    NOT_TRANSIENT_5XX,
    RetryPolicy,
    retry_after_seconds,
    should_retry_header,
)
from batchspec.wire.secrets import (
    byte_forms,
    is_placeholder,
    proxy_credentials,
    quoted_forms,
    redact_heads,
    redact_word,
    url_credentials,
)

#: 5xx statuses after which the server has not acted on the request
_UNAMBIGUOUS_5XX = frozenset({503}) | NOT_TRANSIENT_5XX
#: 4xx answers that do not say the request was refused: 408 (a gateway that gave up waiting
#: may still forward it) and 409 (a conflict with something that may be what we sent)
_UNSURE_4XX = frozenset({408, 409})
#: answers saying the service itself is down or unreachable behind its gateway, whatever
#: was asked (a 500 may be about the request: it stays the resource's failure)
_DOWN_STATUSES = frozenset({502, 503, 504})
#: transport errors raised before the request could reach the server
_NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: transport errors worth a retry; others (bad scheme, local protocol misuse) are not
_RETRYABLE_TRANSPORT_ERRORS = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)
#: key-shaped tokens (OpenAI echoes a masked key in its 401 message)
_KEY_PATTERN = re.compile(r"\b(sk|rk)-[A-Za-z0-9_*\-]{6,}")
_MAX_MESSAGE_CHARS = 500
_DOWNLOAD_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ErrorEnvelope:
    """What a provider said in its error body, as far as it could be read."""

    message: str | None
    code: str | None
    type: str | None


def parse_error_envelope(response: httpx.Response) -> ErrorEnvelope:
    """Read ``{"error": {message, type, param, code}}`` and the usual variants leniently."""
    try:
        body = response.json()
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to read
        text = response.text.strip() if response.content else ""
        return ErrorEnvelope(message=text or None, code=None, type=None)
    if not isinstance(body, Mapping):
        return ErrorEnvelope(message=str(body), code=None, type=None)
    error = body.get("error") or body
    if isinstance(error, str):  # {"error": "text"}
        return ErrorEnvelope(message=error, code=_text(body.get("code")), type=None)
    if not isinstance(error, Mapping):
        return ErrorEnvelope(message=str(error), code=None, type=None)
    message = error.get("message") or error.get("detail") or body.get("detail")
    return ErrorEnvelope(
        message=message if isinstance(message, str) else _text(message),
        code=_text(error.get("code")),
        type=_text(error.get("type")),
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def should_retry(
    response: httpx.Response,
    envelope: ErrorEnvelope | None = None,
    policy: RetryPolicy = CLIENT_POLICY,
) -> bool:
    """Whether a failed response is worth another attempt under ``policy``."""
    envelope = envelope or parse_error_envelope(response)
    return policy.retries_status(
        response.status_code,
        code=envelope.code,
        should_retry=should_retry_header(response.headers),
    )


def is_ambiguous_status(status: int) -> bool:
    """Whether a server that answered ``status`` may nevertheless have acted on the request."""
    return status >= 500 and status not in _UNAMBIGUOUS_5XX


@dataclass(frozen=True)
class ErrorContext:
    """Who we were talking to, for messages: names the key's variable, never shows the key.

    ``secrets`` holds the key itself, only to redact it from messages; it is left out of
    ``repr`` so that a logged or printed context cannot leak it.
    """

    provider: str
    base_url: str
    api_key_env: str | None
    key_sent: bool
    secrets: tuple[str, ...] = field(default=(), repr=False)
    #: of ``secrets``, those also taken out of downloaded files (a password of a URL's user
    #: info is not, being sent only inside a Basic token); None: all of them
    answer_secrets: tuple[str, ...] | None = field(default=None, repr=False)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            for form in quoted_forms(secret):
                if is_placeholder(secret):  # "x", "EMPTY": as a word only (wire/secrets.py)
                    text = redact_word(text, form, "[redacted]")
                else:
                    text = redact_heads(text.replace(form, "[redacted]"), form, "[redacted]")
        return _KEY_PATTERN.sub(r"\1-[redacted]", text)

    def file_forms(self) -> tuple[bytes, ...]:
        """The forms of each secret that are taken out of a downloaded file
        (``wire.secrets.byte_forms``)."""
        return byte_forms(self.secrets if self.answer_secrets is None else self.answer_secrets)


def redact_file(path: Path, forms: tuple[bytes, ...]) -> int:
    """Take every one of ``forms`` out of the file at ``path`` (``[redacted]``); its size.

    A batch's output and error files are JSONL: a secret never spans a line, so the file is
    read once to look for one (in blocks overlapping by a form's length) and rewritten line
    by line only when one is there, which a provider's file almost never holds."""
    if not forms or not _holds_any(path, forms):
        return path.stat().st_size
    redacted = path.with_name(path.name + "-redacted")
    with open(path, "rb") as source, open(redacted, "wb") as out:
        for line in source:
            for form in forms:
                if form in line:
                    line = line.replace(form, b"[redacted]")
            out.write(line)
        out.flush()
        os.fsync(out.fileno())
    os.replace(redacted, path)
    return path.stat().st_size


def _holds_any(path: Path, forms: tuple[bytes, ...]) -> bool:
    overlap = max(len(form) for form in forms) - 1
    tail = b""
    with open(path, "rb") as source:
        while block := source.read(_DOWNLOAD_CHUNK):
            window = tail + block
            if any(form in window for form in forms):
                return True
            tail = window[-overlap:] if overlap else b""
    return False


def redact_batch(remote: RemoteBatch, context: ErrorContext) -> RemoteBatch:
    """``remote`` with the key taken out of the provider's own words in it (its ``errors``'
    codes, messages and params): they are recorded in the state and shown by ``apply``,
    ``history`` and ``report``, and a gateway may quote the request's Authorization header
    in a batch's validation error (``invalid auth: Bearer sk-…``)."""
    if not remote.errors:
        return remote

    def clean(text: str | None) -> str | None:
        return None if text is None else context.redact(text)

    errors = tuple(
        dataclasses.replace(e, code=clean(e.code), message=clean(e.message), param=clean(e.param))
        for e in remote.errors
    )
    return dataclasses.replace(remote, errors=errors)


def unsendable_header(headers: Mapping[str, str], context: ErrorContext) -> ProviderError | None:
    """A clear error if a header carrying a secret holds a character HTTP cannot send (a
    control character, a non-ASCII letter), else None; it names the variable, never the value.

    httpx would otherwise fail with the whole header quoted in its message (``Illegal header
    value b'Bearer …'``) or with a bare ``UnicodeEncodeError``."""
    for value in headers.values():
        if not any(secret and secret in value for secret in context.secrets):
            continue
        if all(ch == "\t" or " " <= ch <= "~" for ch in value):
            continue
        variable = f"${context.api_key_env}" if context.api_key_env else "the API key variable"
        return ProviderError(
            f"{context.provider}: the API key in {variable} contains a character that cannot "
            "be sent in an HTTP header (a control character such as a newline, or a non-ASCII "
            f"letter); nothing was sent. Set {variable} again to the key exactly as issued."
        )
    return None


def error_from_response(
    response: httpx.Response,
    *,
    operation: str,
    context: ErrorContext,
    policy: RetryPolicy = CLIENT_POLICY,
) -> ProviderError:
    """Turn a non-2xx response into a ``ProviderError`` with the provider's own words."""
    envelope = parse_error_envelope(response)
    status = response.status_code
    # redacted before it is shortened: a key cut by the "…" would no longer match, and its
    # head would stay (and whitespace collapsed inside a key would hide it as well)
    message_said = context.redact(envelope.message) if envelope.message else None
    said = (_shorten(message_said) or response.reason_phrase or "no message").rstrip(".")
    facts = [f"code {envelope.code}" if envelope.code else "", _request_id_text(response)]
    facts_text = ", ".join(f for f in facts if f)
    message = f"{context.provider}: {operation} failed with HTTP {status}: {said}"
    if facts_text:
        message += f" ({facts_text})"
    retryable = should_retry(response, envelope, policy)
    retries = policy.max_retries if retryable else None
    message += f". {_hint(status, envelope, context, operation, retries)}"
    if 300 <= status < 400:
        message += _redirect_hint(response)
    error_class = RemoteNotFound if _is_not_found(status, envelope) else ProviderError
    return error_class(
        context.redact(message),
        status=status,
        code=envelope.code,
        request_id=response.headers.get("x-request-id"),
        retryable=retryable,
        provider_down=status in _DOWN_STATUSES,
        rate_limited=status == 429 and retryable,  # not out of quota, nor told not to retry
    )


def _redirect_hint(response: httpx.Response) -> str:
    """Where a redirect points, and why it is not followed: the API key would go with it to
    whatever host the server names."""
    location = response.headers.get("location")
    where = f" to {display_url(location)}" if location else ""
    return (
        f" The server redirects{where}; batchspec does not follow redirects (the API key "
        "would go with them): if that is the provider's address, set baseUrl to it."
    )


def _is_not_found(status: int, envelope: ErrorEnvelope) -> bool:
    # LiteLLM relays an upstream 404 with the status in ``code`` ("404")
    return status == 404 or (status < 500 and envelope.code == "404")


def _request_id_text(response: httpx.Response) -> str:
    request_id = response.headers.get("x-request-id")
    return f"request id {request_id}" if request_id else ""


def _shorten(text: str | None) -> str | None:
    if not text:
        return None
    text = " ".join(text.split())
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 1] + "…"
    return text


def _hint(
    status: int,
    envelope: ErrorEnvelope,
    context: ErrorContext,
    operation: str,
    retries: int | None = None,
) -> str:
    """One sentence saying what to do about ``status``; names variables, never values.
    ``retries``: how many times such an answer is retried (None: it is not)."""
    variable = f"${context.api_key_env}" if context.api_key_env else "the provider's key variable"
    if "no_db_connection" in (envelope.type, envelope.code):
        # a LiteLLM proxy without a database says this (HTTP 400) to a key it does not know
        return (
            "A LiteLLM proxy without a database answers so to a key it does not know: "
            f"check the API key in {variable} (the proxy's master key or a virtual key)."
        )
    if status == 401:
        if not context.key_sent:
            return f"No API key was sent: set {variable}."
        return f"Check the API key in {variable}."
    if status == 403:
        return f"The key in {variable} is not allowed to do this; check its permissions."
    if status == 404 and operation.startswith("download of"):
        # the file's id came from the provider's own batch, over the same base URL
        return "The provider does not serve this file now (expired, deleted or not ready)."
    if status == 404 and operation == "list batches":  # its path names no id
        return f"The base URL {context.base_url} is not an OpenAI-compatible API root."
    if status == 404:
        return (
            "The id is unknown to the provider (expired or deleted), or the base URL "
            f"{context.base_url} is not an OpenAI-compatible API root."
        )
    if status == 429 and envelope.code == "insufficient_quota":
        return "The account has no quota left; check its plan and billing. Not retried."
    if status == 429 and retries is None:
        return "Rate limited, and the provider said not to retry; try again later."
    if status == 429 and retries == 0:
        return (
            "Rate limited, and not retried (the provider's maxRetries is 0): try again later, "
            "or set options.maxRetries in batchspec.yaml."
        )
    if status == 429:
        return (
            f"Rate limited; {retries} retries were not enough: try again later, or "
            "give the provider more options.maxRetries, or fewer calls at once "
            "(options.maxConcurrency, or --parallelism)."
        )
    if status in (400, 422):
        return "The provider rejected the request; the message above says why."
    if status == 409:
        return "The object is in a conflicting state; try again later."
    if status == 413:
        return "The file is too large for the provider; split the input into smaller shards."
    if status in NOT_TRANSIENT_5XX:
        return (
            f"The server at {context.base_url} does not implement this request, and waiting "
            "will not change that (not retried): is baseUrl the root of a Batch API (the "
            "URL its /files and /batches are under, e.g. https://api.openai.com/v1)?"
        )
    if status >= 500:
        return f"The provider at {context.base_url} failed on its side; try again later."
    return "See the provider's message."


def error_from_transport(
    exc: httpx.HTTPError,
    *,
    operation: str,
    context: ErrorContext,
    retryable: bool,
    proxy: EnvironmentProxy | None = None,
) -> ProviderError:
    """Describe a transport failure by its type and text (httpx puts no headers in either);
    ``proxy``: the environment proxy the request went through, which a failure to connect
    is about rather than the provider (a refused proxy reads as a refused server)."""
    detail = str(exc) or "no detail"
    what = _transport_problem(exc)
    if proxy is not None and isinstance(exc, (*_NOT_SENT_ERRORS, httpx.ProxyError)):
        host = httpx.URL(context.base_url).host
        message = (
            f"{context.provider}: {operation} failed: {what} to {context.base_url} through "
            f"the proxy {proxy.url} (set by {proxy.variable}) ({type(exc).__name__}: "
            f"{detail}). Check that the proxy is up and lets this through, or connect "
            f"directly by naming the host in NO_PROXY (e.g. NO_PROXY={host})."
        )
        down = isinstance(exc, _NOT_SENT_ERRORS)
        return ProviderError(context.redact(message), retryable=retryable, provider_down=down)
    message = (
        f"{context.provider}: {operation} failed: {what} to {context.base_url} "
        f"({type(exc).__name__}: {detail}). Check that the server is up and the base URL "
        "is right; batchspec retried with backoff."
        if retryable
        else f"{context.provider}: {operation} failed talking to {context.base_url} "
        f"({type(exc).__name__}: {detail})."
    )
    down = isinstance(exc, _NOT_SENT_ERRORS)  # a timeout or a reset may be this call's own
    return ProviderError(context.redact(message), retryable=retryable, provider_down=down)


def _transport_problem(exc: httpx.HTTPError) -> str:
    """``timed out``, ``could not connect`` or ``lost the connection`` (then: ``to URL``)."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, _NOT_SENT_ERRORS):
        return "could not connect"
    return "lost the connection"


@dataclass(frozen=True)
class EnvironmentProxy:
    """A proxy httpx took from the environment: its URL (no credentials) and variable."""

    url: str
    variable: str


def environment_proxy(client: httpx.Client, url: str) -> EnvironmentProxy | None:
    """The proxy ``client`` sends a request for ``url`` through, as httpx itself chose it
    from ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` and ``NO_PROXY`` when the client was
    built; None when it connects directly (or a transport was given, which takes no proxy)."""
    target = httpx.URL(url)
    # httpx mounts one transport per environment proxy; no public API tells which one a URL
    # takes, so ask the method the client itself sends with (and say nothing if it is gone)
    choose = getattr(client, "_transport_for_url", None)
    direct = getattr(client, "_transport", None)
    if choose is None or direct is None or choose(target) is direct:
        return None
    proxies = urllib.request.getproxies()
    for key in (target.scheme, "all"):
        if proxies.get(key):
            found = proxies[key] if "://" in proxies[key] else f"http://{proxies[key]}"
            return EnvironmentProxy(display_url(found).rstrip("/"), f"{key.upper()}_PROXY")
    return None


#: idle connections one client keeps open: one per call that may share it (a given client,
#: or a test's transport; ``pooled_client``'s clients hold one each). httpx keeps 20 by
#: default, so with more calls in flight every answer closed a connection and the next call
#: opened a new one (a TCP, maybe TLS, handshake each)
KEEPALIVE_CONNECTIONS = 256


def new_client(
    base_url: str,
    *,
    transport: httpx.BaseTransport | None = None,
    timeout: float = 60.0,
    verify: ssl.SSLContext | bool | None = None,
    **options: Any,
) -> httpx.Client:
    """The ``httpx.Client`` of a provider whose every request goes to ``base_url``, verifying
    TLS as ``tls_verify_for`` says (or with ``verify``: a context shared by several)."""
    if verify is None:
        verify = True if transport is not None else tls_verify_for(base_url)
    try:
        return httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            verify=verify,
            mounts=None if transport is not None else _direct_if_exempted(base_url),
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=KEEPALIVE_CONNECTIONS
            ),
            **options,
        )
    except (ImportError, ValueError, httpx.InvalidURL) as err:
        if transport is not None or not _environment_proxies():
            raise
        raise _unusable_proxy(err) from None


#: the variables httpx builds a proxy from, each in either case (the lower-case one first)
_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")


def _environment_proxies() -> list[str]:
    """``NAME=URL`` of each proxy variable set, its URL shown without credentials."""
    named = []
    for name in _PROXY_VARIABLES:
        value = os.environ.get(name.lower()) or os.environ.get(name)
        if value:
            shown = re.sub(r"^([A-Za-z0-9+.-]+://)?[^/@]*@", r"\1", value)  # user:password@
            named.append(f"{name}={shown}")
    return named


def _unusable_proxy(err: Exception) -> UsageError:
    """A proxy variable the HTTP client cannot use (a SOCKS proxy without httpx's ``socks``
    extra, a scheme it does not know, a malformed URL): said once, naming the variables, as
    the local engine says its own (``engine.http11.proxy_for``), not httpx's traceback. Each
    client builds every proxy the environment names, so NO_PROXY is no way round it."""
    if isinstance(err, ImportError):  # httpx's words name the package and the extra
        why = "a SOCKS proxy needs the 'socksio' package (pip install 'httpx[socks]')"
    else:
        why = re.sub(r"(?<=://)[^/@\s']*@", "", str(err)).rstrip(".")
    return UsageError(
        f"the proxy the environment names cannot be used ({', '.join(_environment_proxies())}):"
        f" {why}. Fix or unset it; a proxy is an http:// (or https://) URL, e.g. "
        "http://proxy.example:3128"
    )


def pooled_client(
    base_url: str,
    *,
    transport: httpx.BaseTransport | None = None,
    timeout: float = 60.0,
    **options: Any,
) -> tuple[httpx.Client, Callable[[], httpx.Client] | None]:
    """A provider's first client, and how to make more of it for calls that overlap
    (``RetryingClient``'s ``more``): the same client, sharing one TLS context (httpx loads a
    trust store, ~25 ms, for each client that builds its own). With a ``transport`` (a test's,
    one connection pool already), every call uses the one client (None)."""
    if transport is not None:
        return new_client(base_url, transport=transport, timeout=timeout, **options), None
    verify = tls_verify_for(base_url)
    if verify is True:
        verify = httpx.create_ssl_context()

    def make() -> httpx.Client:
        return new_client(base_url, timeout=timeout, verify=verify, **options)

    return make(), make


def _direct_if_exempted(base_url: str) -> dict[str, httpx.BaseTransport | None] | None:
    """Mounts that send every request straight to ``base_url`` when ``NO_PROXY`` exempts its
    host as curl reads it (``wire.no_proxy``; httpx misses networks such as ``10.0.0.0/8``),
    in place of the proxies httpx mounts from the environment (None: its own transport)."""
    url = httpx.URL(base_url)
    no_proxy = urllib.request.getproxies_environment().get("no", "")
    if not no_proxy or not url.host:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    if not bypasses_proxy(url.host, port, no_proxy):
        return None
    return {"all://": None, "http://": None, "https://": None}


def tls_verify_for(base_url: str) -> ssl.SSLContext | bool:
    """What a client of ``base_url`` verifies TLS with (httpx's ``verify``).

    httpx loads a trust store (certifi's roots, ~25 ms) for every client it builds. A
    plain ``http://`` root (a local server, a proxy on loopback) reached with no proxy set in
    the environment never speaks TLS: the client follows no redirects, so each request goes
    to that root. It gets a context that verifies but trusts no root instead: never used,
    and one that would refuse a connection, never accept an unverified one. An ``https://``
    root, or any root behind an environment proxy, gets httpx's default (True).
    """
    if base_url.lower().startswith("http://") and not urllib.request.getproxies():
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, hostname checked
    return True


def display_url(url: str) -> str:
    """``url`` without user info or query, safe to show in a message."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:  # e.g. a port that is no number: shown all the same
        try:
            parts = urlsplit(url)
        except ValueError:
            return "<invalid URL>"
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=""))
    return str(parsed.copy_with(username=None, password=None, query=None))


def require_http_url(provider: str, base_url: str, *, where: str) -> None:
    """Refuse a base URL that is not http(s), saying ``where`` it is set."""
    try:
        scheme = httpx.URL(base_url).scheme
    except httpx.InvalidURL:
        scheme = ""
    why = unreachable_url(base_url)  # OPENAI_BASE_URL is not validated with the project
    if why is not None:
        raise ProviderError(
            f"provider {provider!r}: base URL {display_url(base_url)!r} {why} (set {where})."
        )
    if scheme not in ("http", "https"):
        raise ProviderError(
            f"provider {provider!r}: base URL {display_url(base_url)!r} must start with "
            f"http:// or https:// (set {where})."
        )


def quote_id(object_id: str) -> str:
    """An opaque id (LiteLLM: base64 with '/', '+', '=') quoted whole for a URL path."""
    return quote(object_id, safe="")


def json_object(
    response: httpx.Response,
    operation: str,
    provider: str,
    *,
    api_root: str,
    required: str | None = "id",
) -> Mapping[str, Any]:
    """The response body as a JSON object (with the key ``required`` unless listing), else a
    clear error asking whether the base URL is ``api_root``."""
    try:
        body = response.json()
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to read
        body = None
    if not isinstance(body, Mapping) or (
        required is not None and operation != "list batches" and required not in body
    ):
        raise ProviderError(
            f"{provider}: {operation} answered HTTP {response.status_code} with a body that is "
            f"not the expected JSON object; is the base URL {api_root}?",
            status=response.status_code,
            request_id=response.headers.get("x-request-id"),
        )
    return body


def listed_rows(
    page: Mapping[str, Any], provider: str, *, api_root: str
) -> list[Mapping[str, Any]]:
    """The batch objects of one page of a listing (its ``data`` list), or a ``ProviderError``
    when the page has none: a 200 whose body is some other JSON object (a gateway's notice,
    an error without an error status) read as an empty page would end the listing, and a key
    lookup would take the key as absent and create (and pay for) its batch again."""
    rows = page.get("data")
    if not isinstance(rows, list):
        raise ProviderError(
            f"{provider}: list batches answered HTTP 200 with a JSON object that is not a "
            f"listing (no data list; keys: {', '.join(sorted(map(str, page))[:5]) or 'none'}); "
            f"is the base URL {api_root}?"
        )
    return [row for row in rows if isinstance(row, Mapping)]


#: pages a listing is read to at most: a key lookup reads back to its window, a poll a page
#: past its batches, so a listing still promising more after these never ends
MAX_LIST_PAGES = 5_000


def next_page_cursor(cursor: str, used: set[str], *, provider: str, names: str) -> str:
    """The next page's ``cursor`` of a listing, remembered in ``used`` (the cursors this
    listing has followed); a ``ProviderError`` when it was followed before.

    A server whose pagination comes back to a page it already gave (it ignores the cursor,
    or its pages point at each other) with more pages promised would be paged forever: a key
    lookup holding the run, and its memory growing, until CI kills it. Ending the listing
    there instead would be as wrong: a batch on a page it never reached would be taken as
    absent, and created (and paid for) again after a lost state. ``names``: the listing's
    fields, for the message (``after / last_id / has_more``)."""
    if cursor in used:
        raise ProviderError(
            f"{provider}: list batches: the provider's pagination came back to a page it had "
            f"already given (cursor {cursor!r} again, with more pages promised), so its "
            "listing cannot be read to the end; batchspec stopped paging rather than loop, and "
            "takes no batch as absent from it. Check the server's pagination "
            f"({names} of its batch listing)."
        )
    if len(used) >= MAX_LIST_PAGES:
        raise ProviderError(
            f"{provider}: list batches: {MAX_LIST_PAGES:,} pages read and more still promised "
            "(a listing that never ends, a page at a time?); batchspec stopped paging rather "
            f"than loop, and takes no batch as absent from it. Check the server's pagination "
            f"({names} of its batch listing)."
        )
    used.add(cursor)
    return cursor


def create_or_adopt(
    send: Callable[[], RemoteBatch],
    made_by_lost: Callable[[], RemoteBatch | None],
    *,
    policy: RetryPolicy,
    sleep: Callable[[float], None],
    rand: Callable[[], float],
    resend: bool = True,
) -> RemoteBatch:
    """Create a batch with ``send`` (its request made with ``retry_ambiguous=False``).

    After an ``AmbiguousOutcome`` the batch the lost create made, if ``made_by_lost`` finds
    one, is the answer; otherwise the create is sent again by ``policy`` when ``resend``, and
    the ``AmbiguousOutcome`` is raised when not (the reconciler then waits its bounded window
    before it creates again) or when the retries are spent. Another ``ProviderError`` made no
    batch only when it says so (``sent_nothing``: a 4xx refusal, a 501 or 505, no
    connection) and no earlier attempt was ambiguous (that one may still arrive: the error is
    then raised as an ``AmbiguousOutcome``); a failed lookup of a lost create never says so.
    """
    ambiguous = False
    for retries_done in range(policy.max_attempts):
        try:
            return send()
        except AmbiguousOutcome as lost:
            ambiguous = True
            try:
                made = made_by_lost()
            except ProviderError as err:
                err.sent_nothing = False  # said of the lookup; the create may have been made
                raise
            if made is not None:
                return dataclasses.replace(made, found_after=str(lost))
            if not resend or not lost.retryable or not policy.can_retry(retries_done):
                raise
            sleep(policy.delay(retries_done, rand=rand))
        except ProviderError as err:
            if ambiguous:
                raise _as_ambiguous(err) from err
            raise
    raise AssertionError("unreachable: the loop returns or raises")


#: what a provider answers a cancel that comes after the batch ended (not cancellable):
#: OpenAI (and ``batchspec serve``) 409 ``batch_not_cancellable``; the others do not document
#: it, and their envelopes suggest 400 (Anthropic's ``invalid_request_error``, Google's
#: ``FAILED_PRECONDITION``) or 409/422; a 404 stays ``RemoteNotFound``
NOT_CANCELLABLE_STATUSES = frozenset({400, 409, 412, 422})
#: statuses of a batch a cancel has nothing left to stop in: ``cancelling`` (cancelled out of
#: band, or by an earlier cancel whose answer was lost) and ``finalizing`` (every request has
#: run; its files are being written): returned as they are, in flight, to be polled and
#: collected like any other


def cancel_or_ended(
    http: RetryingClient,
    path: str,
    *,
    batch_id: str,
    get_batch: Callable[[str], RemoteBatch],
    parse: Callable[[httpx.Response], RemoteBatch],
) -> RemoteBatch:
    """Send a cancel (``POST path``) and return the batch ``parse`` reads from its answer.

    A cancel refused with a ``NOT_CANCELLABLE_STATUSES`` status is not retried (waiting will
    not make an ended batch cancellable): the batch is read back, and returned as it is if
    it has ended (completed, failed, expired, cancelled: its outcome is decided and its
    answers are to be collected) or has nothing left to stop (``NOTHING_TO_CANCEL``); if it
    still runs, the refusal is raised, saying the status.
    """
    operation = f"cancel batch {batch_id}"
    response = http.request("POST", path, operation=operation, ok_statuses=NOT_CANCELLABLE_STATUSES)
    if response.status_code not in NOT_CANCELLABLE_STATUSES:
        return parse(response)
    remote = get_batch(batch_id)
    if remote.is_terminal or remote.status in NOTHING_TO_CANCEL:
        return remote
    refused = error_from_response(response, operation=operation, context=http.context)
    refused.details.append(
        f"batch {batch_id} is still {remote.status} at {http.context.provider}: the cancel was "
        "refused, not sent; run the command again later, or look at the batch on the "
        "provider's side"
    )
    raise refused


class FileBody:
    """A request body read from ``path`` afresh on every iteration, so a retry resends it."""

    def __init__(self, path: Path, chunk: int = _DOWNLOAD_CHUNK) -> None:
        self.path = path
        self._chunk = chunk

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as handle:
            while chunk := handle.read(self._chunk):
                yield chunk


class ProgressReader:
    """A binary file that tells ``progress`` how far into it reads have got, for a streamed
    upload's byte bar: at most every ``every_bytes`` or ``every_seconds``, and always at the end.

    httpx seeks it back to 0 for each attempt, so a retry reports from 0 again.
    """

    def __init__(
        self,
        handle: IO[bytes],
        progress: Callable[[int], None],
        *,
        every_bytes: int = 1024 * 1024,
        every_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handle = handle
        self._progress = progress
        self._size = os.fstat(handle.fileno()).st_size
        self._every_bytes = every_bytes
        self._every_seconds = every_seconds
        self._clock = clock
        self._last: tuple[int, float] = (-1, clock())  # (bytes, when) last reported

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        sent, now = self._handle.tell(), self._clock()
        last_sent, last_when = self._last
        due = (
            abs(sent - last_sent) >= self._every_bytes
            or now - last_when >= self._every_seconds
            or (sent >= self._size and sent != last_sent)
        )
        if due and sent != last_sent:
            self._last = (sent, now)
            self._progress(sent)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._handle.seek(offset, whence)
        self._last = (-1, self._last[1]) if position == 0 else self._last
        return position

    def tell(self) -> int:
        return self._handle.tell()

    def fileno(self) -> int:
        return self._handle.fileno()


class RetryingClient:
    """An ``httpx.Client`` wrapper that retries by ``RetryPolicy`` and raises ``ProviderError``.

    Paths are joined onto ``base_url`` verbatim (callers quote ids). The client is closed by
    ``close()`` only if this object created it.

    With ``more`` (``pooled_client``), calls that overlap (a pass's threads) each take a client
    of their own for their whole length, body read, made by ``more`` when none is free, and
    give it back for the next call. One httpx client shared by many threads costs more CPU
    the more connections it holds: httpcore's pool walks every connection, and for each idle
    one every connection again, at each request and each answer (at 32 connections ~0.7 ms
    of a call's ~1.4 ms on loopback). A client per call in flight holds one connection.
    """

    def __init__(
        self,
        *,
        base_url: str,
        client: httpx.Client,
        owns_client: bool,
        context: ErrorContext,
        headers: Mapping[str, str],
        policy: RetryPolicy,
        sleep: Callable[[float], None] = pause_before_retry,
        rand: Callable[[], float] = random.random,
        more: Callable[[], httpx.Client] | None = None,
        max_answer_bytes: int | None = None,  # None: MAX_ANSWER_BYTES
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._max_answer_bytes = max_answer_bytes
        self._client = client
        self._owns_client = owns_client
        self._more = more
        self._free = [client]  # the clients no call holds, the last given back on top
        self._made: list[httpx.Client] = []  # by ``more``: closed by ``close()``
        self._clients_lock = threading.Lock()
        # the credentials of the base URL's user info and of an environment proxy are sent
        # too (Authorization: Basic, Proxy-Authorization), and quoted back as readily
        extra = url_credentials(base_url) + proxy_credentials(os.environ)
        self._context = dataclasses.replace(
            context,
            secrets=(*context.secrets, *extra.all),
            answer_secrets=(*context.secrets, *extra.tokens),
        )
        # the encodings ours to bound (``ACCEPT_ENCODING``), whatever httpx would offer
        self._headers = {"Accept-Encoding": ACCEPT_ENCODING, **headers}
        self._policy = policy
        self._sleep = sleep
        self._rand = rand
        self._unsendable = unsendable_header(self._headers, context)

    @property
    def context(self) -> ErrorContext:
        return self._context

    def __repr__(self) -> str:
        return f"RetryingClient({self._context.base_url!r})"

    def request(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        retry_ambiguous: bool = True,
        headers: Mapping[str, str] | None = None,
        ok_statuses: frozenset[int] = frozenset(),
        **kwargs: Any,
    ) -> httpx.Response:
        """Send until a 2xx (or one of ``ok_statuses``, e.g. a redirect to follow by hand)
        arrives (body read), or raise the last failure as ProviderError. The request (its
        retries too) holds a place among the provider's calls in flight (``call_place``)."""
        with call_place(self._context.provider), self._taken() as client:
            return self._send(
                client,
                method,
                path,
                operation,
                retry_ambiguous,
                headers,
                stream=False,
                kwargs=kwargs,
                ok_statuses=ok_statuses,
            )

    def download(
        self, path: str, dest: Path, *, operation: str, headers: Mapping[str, str] | None = None
    ) -> int:
        """Stream a GET body to ``dest`` atomically (``<dest>.part`` then rename); return bytes.

        A connection lost mid-body restarts the download, at most ``max_retries`` times.
        The download, body and restarts included, holds one place (``call_place``).
        """
        with call_place(self._context.provider), self._taken() as client:
            return self._download(client, path, dest, operation=operation, headers=headers)

    @contextmanager
    def _taken(self) -> Iterator[httpx.Client]:
        """A client for one call, held until the block ends (see the class docstring)."""
        if self._more is None:
            yield self._client
            return
        with self._clients_lock:
            client = self._free.pop() if self._free else None
        if client is None:
            client = self._more()
            with self._clients_lock:
                self._made.append(client)
        try:
            yield client
        finally:
            with self._clients_lock:
                self._free.append(client)

    def _download(
        self,
        client: httpx.Client,
        path: str,
        dest: Path,
        *,
        operation: str,
        headers: Mapping[str, str] | None,
    ) -> int:
        partial = dest.with_name(dest.name + ".part")
        # a gateway relaying a request's 401 may quote its Authorization header in the
        # file; what is kept (results/, the result store) never holds the key. The bytes are
        # looked through as they arrive: a file is read again only to take one out
        forms = self._context.file_forms()
        written, unframed, holds = self._fetch(client, path, partial, operation, headers, forms)
        if unframed:
            written = self._confirm_unframed(client, path, partial, written, operation, headers)
            holds = bool(forms)  # the copy kept may be another download's: looked through
        if holds:
            try:
                written = redact_file(partial, forms)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, dest)
        return written

    def _confirm_unframed(
        self,
        client: httpx.Client,
        path: str,
        partial: Path,
        written: int,
        operation: str,
        headers: Mapping[str, str] | None,
    ) -> int:
        """A body sent with neither a length nor chunks ends where the connection closed: a
        connection cut between two lines brings a shorter file that looks whole (its missing
        answers would be paid for again). Such a body is kept only once another download
        brings the very same bytes (``UNFRAMED_TRIES`` downloads at most, the longer of two
        that differ kept to compare with the next: a cut body is the shorter), else
        ``ProviderError``, and nothing is kept."""
        again = partial.with_name(partial.name + "-again")
        try:
            for _ in range(UNFRAMED_TRIES - 1):
                size, _, _ = self._fetch(client, path, again, operation, headers)
                if size == written and _same_bytes(partial, again):
                    return written
                if size > written:
                    os.replace(again, partial)
                    written = size
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            again.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        raise ProviderError(
            f"{self._context.provider}: {operation}: the server sends the file without a "
            f"length, and {UNFRAMED_TRIES} downloads of it brought different bytes (a "
            "connection closed early?): nothing of it was kept; the next `batchspec apply` "
            "downloads it again",
            retryable=True,
        )

    def _fetch(
        self,
        client: httpx.Client,
        path: str,
        partial: Path,
        operation: str,
        headers: Mapping[str, str] | None,
        forms: tuple[bytes, ...] = (),
    ) -> tuple[int, bool, bool]:
        """One download of a GET body into ``partial`` (restarted on a lost connection, as
        the policy allows): its bytes, whether it came unframed (``_unframed``), and whether
        it holds one of ``forms`` (a secret's, ``ErrorContext.file_forms``)."""
        for retries_done in range(self._policy.max_attempts):
            response = self._send(
                client, "GET", path, operation, True, headers, stream=True, kwargs={}
            )
            try:
                written, holds = _write_body(
                    response,
                    partial,
                    stall_seconds=_stall_seconds(client),
                    provider=self._context.provider,
                    forms=forms,
                )
            except _RETRYABLE_TRANSPORT_ERRORS as exc:
                partial.unlink(missing_ok=True)
                error = error_from_transport(
                    exc, operation=operation, context=self._context, retryable=True
                )
                if not self._policy.can_retry(retries_done):
                    raise error from exc
                delay = self._policy.delay(retries_done, rand=self._rand)
                self._before_retry(operation, delay, error)
                self._say_retry(operation, f"{_transport_problem(exc)} to", retries_done, delay)
                self._sleep(delay)
                continue
            except httpx.HTTPError as exc:  # e.g. a body that fails to decode
                partial.unlink(missing_ok=True)
                raise error_from_transport(
                    exc, operation=operation, context=self._context, retryable=False
                ) from exc
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            finally:
                response.close()
            return written, _unframed(response), holds
        raise AssertionError("unreachable: the loop returns or raises")

    def _say_retry(self, operation: str, problem: str, retries_done: int, delay: float) -> None:
        context = self._context
        retries = self._policy.max_retries
        notice = RetryNotice(
            context.provider, context.base_url, operation, problem, retries_done + 1, retries, delay
        )
        report_retry(notice)

    def _bounded(
        self, client: httpx.Client, operation: str, *, first: bool
    ) -> httpx.Timeout | None:
        """The ``timeout`` of the next attempt: the client's, cut to what the run's
        ``--timeout`` leaves (``seconds_left``); raises ``DeadlineReached`` if nothing is
        left, before anything is sent."""
        left = seconds_left()
        if left is None:
            return None
        if left <= 0:
            error = self._deadline_error(operation)
            error.sent_nothing = first
            raise error
        t = client.timeout
        return httpx.Timeout(
            connect=_cut(t.connect, left),
            read=_cut(t.read, left),
            write=_cut(t.write, left),
            pool=_cut(t.pool, left),
        )

    def _before_retry(self, operation: str, delay: float, error: ProviderError) -> None:
        """Give up rather than wait past the run's ``--timeout`` for a retry."""
        left = seconds_left()
        if left is not None and left <= delay:
            raise self._deadline_error(operation) from error

    def _deadline_error(self, operation: str) -> DeadlineReached:
        return DeadlineReached(
            f"{self._context.provider}: --timeout reached before {operation} ended "
            f"({display_url(self._context.base_url)})"
        )

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
        with self._clients_lock:
            made, self._made = self._made, []
        for client in made:
            client.close()

    def _send(
        self,
        client: httpx.Client,
        method: str,
        path: str,
        operation: str,
        retry_ambiguous: bool,
        headers: Mapping[str, str] | None,
        *,
        stream: bool,
        kwargs: Mapping[str, Any],
        ok_statuses: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        if self._unsendable is not None:
            raise ProviderError(str(self._unsendable), sent_nothing=True)
        url = self._base_url + path
        merged = {**self._headers, **(headers or {})}
        unsure = False  # an attempt that may have reached the server and acted
        for retries_done in range(self._policy.max_attempts):
            last = not self._policy.can_retry(retries_done)
            # by the run's --timeout, if any (nothing sent yet when it is over at the first)
            bounded = self._bounded(client, operation, first=retries_done == 0)
            try:
                request = client.build_request(
                    method, url, headers=merged, timeout=bounded or client.timeout, **kwargs
                )
                response = client.send(request, stream=True)
                unasked = _unasked_encoding(response, self._context.provider)
                if unasked is not None:  # the server has answered: a create may have acted
                    raise unasked if retry_ambiguous else _as_ambiguous(unasked)
                if not stream:
                    _read_whole(
                        response,
                        stall_seconds=_stall_seconds(client),
                        provider=self._context.provider,
                        cap=self._max_answer_bytes or MAX_ANSWER_BYTES,
                    )
            except httpx.TransportError as exc:
                retryable = isinstance(exc, _RETRYABLE_TRANSPORT_ERRORS)
                error = error_from_transport(
                    exc,
                    operation=operation,
                    context=self._context,
                    retryable=retryable,
                    proxy=environment_proxy(client, url),
                )
                not_sent = isinstance(exc, _NOT_SENT_ERRORS)
                if retryable and not retry_ambiguous and not not_sent:
                    raise _as_ambiguous(error) from exc
                unsure = unsure or not not_sent
                if not retryable or last:
                    error.sent_nothing = not unsure
                    raise error from exc
                delay = self._policy.delay(retries_done, rand=self._rand)
                self._before_retry(operation, delay, error)
                self._say_retry(operation, f"{_transport_problem(exc)} to", retries_done, delay)
                self._sleep(delay)
                continue
            if response.is_success or response.status_code in ok_statuses:
                return response
            if stream:
                _read_error_body(response)
            error = error_from_response(
                response, operation=operation, context=self._context, policy=self._policy
            )
            status = response.status_code
            if not retry_ambiguous and (is_ambiguous_status(status) or status in _UNSURE_4XX):
                raise _as_ambiguous(error)  # a create: looked up before any second send
            # 501/505: the server does not implement the request; it made nothing
            refused = 400 <= status < 500 or status in NOT_TRANSIENT_5XX
            unsure = unsure or (status >= 500 and not refused) or status in _UNSURE_4XX
            if not error.retryable or last:
                if status == 429:
                    report_throttle()
                error.sent_nothing = not unsure and refused
                raise error
            retry_after = retry_after_seconds(response.headers)
            if response.status_code == 429 or retry_after is not None:
                report_throttle()  # the pool running this call lets fewer run at once
            delay = self._policy.delay(retries_done, retry_after, rand=self._rand)
            self._before_retry(operation, delay, error)
            self._say_retry(operation, f"HTTP {status} from", retries_done, delay)
            self._sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")


def _cut(seconds: float | None, left: float) -> float:
    return left if seconds is None else min(seconds, left)


def _stall_seconds(client: httpx.Client) -> float | None:
    """How long a body may stall: the client's read timeout, cut to the run's ``--timeout``."""
    left = seconds_left()
    read = client.timeout.read
    return read if left is None else _cut(read, max(left, 0.001))


def _as_ambiguous(error: ProviderError) -> AmbiguousOutcome:
    return AmbiguousOutcome(
        str(error),
        status=error.status,
        code=error.code,
        request_id=error.request_id,
        retryable=error.retryable,
        provider_down=error.provider_down,
    )


#: the content encodings every request offers: those whose inflation ``_refuse_a_bomb``
#: bounds. httpx offers ``br`` and ``zstd`` too once the optional ``brotli`` or
#: ``zstandard`` package is installed, and inflates each chunk off the wire whole before the
#: cap sees it: gzip and deflate grow at most about 1,000 times (a 64 KiB read, some 64 MiB),
#: brotli and zstd without bound (a few KiB of zeros: gigabytes in memory at once)
ACCEPT_ENCODING = "gzip, deflate"
#: encodings httpx decodes (its optional decoders) that no request asks for: an answer
#: sent so anyway is refused unread (``_unasked_encoding``)
_UNBOUNDED_ENCODINGS = frozenset({"br", "zstd"})


def _unasked_encoding(response: httpx.Response, provider: str) -> ProviderError | None:
    """The error for an answer whose ``Content-Encoding`` is one no request asks for
    (``ACCEPT_ENCODING``) and whose inflation nothing bounds, closed unread; else None."""
    header = response.headers.get("content-encoding")
    if not header:
        return None
    found = [
        t.strip().lower() for t in header.split(",") if t.strip().lower() in _UNBOUNDED_ENCODINGS
    ]
    if not found:
        return None
    response.close()
    url = display_url(str(response.request.url))
    return ProviderError(
        f"{provider}: the answer to {response.request.method} {url} (HTTP "
        f"{response.status_code}) came encoded as {found[0]!r}, which was not asked for "
        f"(only {ACCEPT_ENCODING}): not read, nothing of it was kept (a broken or hostile "
        "server, or a proxy in between?)"
    )


#: a download body that brings fewer bytes than this in a read timeout's time is stalled
STALLED_BELOW_BYTES = 64 * 1024
#: a compressed body (``Content-Encoding``) past ``INFLATED_FLOOR`` bytes decoded that has
#: grown more than ``MAX_INFLATION`` times its bytes on the wire is a decompression bomb
#: (JSONL results compress 5-20 times; zeros, 1,000 times)
MAX_INFLATION = 200
INFLATED_FLOOR = 256 * 1024 * 1024
#: the most of one answer read into memory (a batch, a listing page, an error envelope),
#: decoded: an endless body, or one inflating (``Content-Encoding``) less than a bomb does,
#: stops there; file contents are streamed to disk instead (``RetryingClient.download``)
MAX_ANSWER_BYTES = 256 * 1024 * 1024
#: of an error answer to a streamed download, the most read: its envelope comes first
MAX_ERROR_BODY_BYTES = 1024 * 1024


#: downloads of a body sent unframed (``_unframed``) until two of them agree, at most
UNFRAMED_TRIES = 3


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (read a MiB at a time; no stat cache, which
    ``filecmp`` keeps, to be fooled by a file replaced within one clock tick)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:  # buffered: each read is whole
        while True:
            left, right = fa.read(1 << 20), fb.read(1 << 20)
            if left != right:
                return False
            if not left:
                return True


def _unframed(response: httpx.Response) -> bool:
    """Whether an HTTP/1 body had neither a ``Content-Length`` nor chunked framing: it ends
    where the connection closes, so one cut short cleanly is, to HTTP, a whole body."""
    if response.http_version not in ("HTTP/1.0", "HTTP/1.1"):
        return False  # HTTP/2 frames its end of stream
    encoding = response.headers.get("transfer-encoding", "").lower()
    return "content-length" not in response.headers and "chunked" not in encoding


def _write_body(
    response: httpx.Response,
    partial: Path,
    *,
    stall_seconds: float | None,
    provider: str,
    forms: tuple[bytes, ...] = (),
) -> tuple[int, bool]:
    """Write the body to ``partial`` (``stall_checked``); its bytes, and whether it holds
    one of ``forms`` (looked for in each chunk and across two: a form's length less one of
    the previous chunk's end is kept to look across).

    Written with the file descriptor's own calls: a buffered file object's set-up asks the
    kernel three more things, and each call a download makes waits again for the
    interpreter lock that the other downloads of a pass hold in turn."""
    written = 0
    holds = False
    overlap = max((len(form) for form in forms), default=1) - 1
    tail = b""
    out = _create_partial(partial)
    try:
        for chunk in stall_checked(response, stall_seconds, provider=provider):
            if forms and not holds:
                window = tail + chunk if tail else chunk
                holds = any(form in window for form in forms)
                tail = window[-overlap:] if overlap else b""
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view) :]
            written += len(chunk)
        # the caller keeps this file as the only copy of a paid-for result: make it durable
        os.fsync(out)
    finally:
        os.close(out)
    return written, holds


def _create_partial(partial: Path) -> int:
    """``partial`` created (or emptied) for writing; its folder is made when missing (found
    so, not looked for before every download)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        return os.open(partial, flags, 0o666)
    except FileNotFoundError:
        partial.parent.mkdir(parents=True, exist_ok=True)
        return os.open(partial, flags, 0o666)


def _read_whole(
    response: httpx.Response,
    *,
    stall_seconds: float | None,
    provider: str,
    cap: int,
) -> None:
    """Read a streamed response's body into it (as ``Response.read`` does), ``stall_checked``
    and at most ``cap`` bytes decoded: past them, ``ProviderError``."""
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in stall_checked(response, stall_seconds, provider=provider):
            size += len(chunk)
            if size > cap:
                raise _too_large(response, provider, cap)
            chunks.append(chunk)
        response._content = b"".join(chunks)
    except httpx.DecodingError as err:  # a body its Content-Encoding cannot decode: cut off
        raise httpx.RemoteProtocolError(
            f"the body could not be decoded ({err})", request=response.request
        ) from err
    finally:
        response.close()


def _too_large(response: httpx.Response, provider: str, cap: int) -> ProviderError:
    url = display_url(str(response.request.url))
    return ProviderError(
        f"{provider}: the answer to {response.request.method} {url} is larger than "
        f"{cap:,} bytes decoded: not read further, nothing of it was kept "
        "(an answer of the Batch API is far smaller: a broken or hostile server, or a proxy "
        "in between?)"
    )


def _read_error_body(response: httpx.Response) -> None:
    """Read at most ``MAX_ERROR_BODY_BYTES`` of a streamed error answer into it (the
    provider's envelope is at its start), then close it: an endless or inflating error body
    is not held whole."""
    body = bytearray()
    try:
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) >= MAX_ERROR_BODY_BYTES:
                break
    except httpx.DecodingError:  # an error body its encoding cannot decode
        body = bytearray()  # the status still says what went wrong
    except httpx.TransportError:  # cut off: what came says what it can
        pass
    response._content = bytes(body[:MAX_ERROR_BODY_BYTES])
    response.close()


def _refuse_a_bomb(response: httpx.Response, decoded: int, provider: str) -> None:
    """Raise if ``decoded`` bytes of the body are a decompression bomb (``MAX_INFLATION``):
    a few megabytes that inflate to fill the disk, or the memory, before they end."""
    wire = response.num_bytes_downloaded
    if decoded <= INFLATED_FLOOR or decoded <= MAX_INFLATION * max(wire, 1):
        return
    encoding = response.headers.get("content-encoding", "?")
    url = display_url(str(response.request.url))
    raise ProviderError(
        f"{provider}: the answer to {response.request.method} {url} "
        f"inflated past {decoded:,} bytes from {wire:,} on the wire ({encoding}): a "
        "decompression bomb, not read further; nothing of it was kept."
    )


def stall_checked(
    response: httpx.Response,
    stall_seconds: float | None,
    *,
    provider: str,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[bytes]:
    """The body's chunks as they come; ``ReadTimeout`` once it stalls.

    A body that trickles (a byte now and then, each in time for the read timeout, which
    bounds one read, not the body) would hold the run for ever: one that brings fewer than
    ``STALLED_BELOW_BYTES`` in ``stall_seconds`` (the read timeout; counted from its first
    bytes, as a server may think first) is cut, and sent for again like any body cut off."""
    received = 0
    window_start: float | None = None
    window_bytes = 0
    for chunk in response.iter_bytes():
        yield chunk
        received += len(chunk)
        window_bytes += len(chunk)
        if window_start is None:
            window_start = clock()
        _refuse_a_bomb(response, received, provider)
        if stall_seconds is None or clock() - window_start < stall_seconds:
            continue
        if window_bytes < STALLED_BELOW_BYTES:
            raise httpx.ReadTimeout(
                f"the body stalled: {window_bytes:,} bytes came in {stall_seconds:g}s "
                f"({received:,} in all)",
                request=response.request,
            )
        window_start, window_bytes = clock(), 0
