"""Stream-validate an OpenAI batch input file (JSONL) before anything is uploaded.

``scan_batch_input`` reads the file once, in binary, 1 MiB at a time, hashing every byte as it
goes and checking each line as it is split off. It never holds the whole file: memory is one
read chunk, at most one over-long line prefix (bounded by ``max_line_bytes``) and the set of
``custom_id``s seen so far (needed to name the first line of a duplicate). The result is an
``InputReport``: counts, size, sha256, the models seen, the first ``MAX_SHOWN`` problems and
the count of all of them. ``require_valid_input`` raises ``InputError`` when a file is not ok.
``iter_requests`` streams the request lines of a validated file in file order. The same scan
can write the file's request index (``index=``, ``batchspec.wire.request_index``): each
request's line, offset, size, fingerprint and ``custom_id``, so that ``apply`` shards and
records its ledger without parsing the file again.

Lines
    Lines end with ``\\n``; a ``\\r`` before it (CRLF) is accepted and is not part of the line.
    The last line need not end with a newline. Line numbers are 1-based physical line
    numbers in the file, blank lines included, so they match what an editor shows.

Blank lines
    A line that is empty or holds only spaces, tabs and CR (JSON whitespace) is blank: it is
    hashed like every other byte but is not a request. ``iter_requests`` skips it, so shards
    rebuilt from request lines never carry one; ``InputReport.blank_lines`` counts them so a
    caller that uploads the file as it is can tell whether blank lines would go along.
    Every other line is a request line and counts toward ``InputReport.requests`` whether
    it is valid or not. Form feeds and other control bytes do not make a line blank (they
    make it invalid JSON).

Rules, each with its stable ``code`` (OpenAI's name where it has one)
    ``empty_file``          file-level: no request lines (zero bytes, or only blank lines).
    ``too_many_tasks``      file-level: more request lines than ``max_requests``.
    ``line_too_large``      the line's bytes (without its line ending) exceed
                            ``max_line_bytes`` (default ``DEFAULT_MAX_LINE_BYTES`` = 10 MiB, a
                            bound on memory; raise it for lines carrying large images). The
                            line is skipped unread: no other check applies to it.
    ``invalid_utf8``        the line's bytes are not valid UTF-8.
    ``byte_order_mark``     the line starts with a UTF-8 byte-order mark (BOM).
    ``invalid_json_line``   the line is not one JSON value. Strict JSON: ``NaN``,
                            ``Infinity``, lone UTF-16 surrogate escapes (``"\\ud800"``) and
                            nesting deeper than about 1,000 levels are rejected.
    ``not_an_object``       the line is JSON but not an object.
    ``missing_custom_id``   ``custom_id`` absent or null.
    ``invalid_custom_id``   ``custom_id`` not a string, empty, or (when ``custom_id_pattern``
                            is given, e.g. Anthropic's ``^[a-zA-Z0-9_-]{1,64}$``) not a full
                            match of that pattern.
    ``duplicate_custom_id`` the ``custom_id`` was used before; the message names that line.
    ``invalid_method``      ``method`` absent or anything but the string ``"POST"`` (exact
                            case, as OpenAI requires).
    ``missing_url``         ``url`` absent or null.
    ``invalid_url``         ``url`` not a string.
    ``url_mismatch``        ``url`` differs from ``endpoint``; without ``endpoint``, from the
                            first request line's url (OpenAI: one endpoint per batch).
    ``missing_body``        ``body`` absent or null.
    ``invalid_body``        ``body`` not an object.
    ``missing_model``       ``body.model`` absent or null. Exception: a ``/v1/moderations``
                            line may omit it (OpenAI defaults it) unless ``model`` is given.
    ``invalid_model``       ``body.model`` not a string or empty.
    ``missing_messages``    a ``/chat/completions`` line's ``body.messages`` absent;
    ``invalid_messages``    not a list, or empty (the provider would refuse that line after
                            the upload).
    ``invalid_message``     one of a chat line's messages is not an object;
    ``missing_role``        one has no ``role``;
    ``invalid_role``        one's ``role`` is not one of OpenAI's: system, developer, user,
                            assistant, tool, function. The first such message of a line is
                            reported (``body.messages[2].role "usr" ...``); content is not
                            looked at, its shapes vary by provider.
    ``invalid_max_tokens``  ``body.max_tokens``, ``max_completion_tokens`` or
                            ``max_output_tokens``, on any endpoint, set (not null) to anything
                            but a JSON integer >= 1: ``0``, ``-5``, ``1.5``, ``100.0``,
                            ``"100"``, ``true``. The budget would not read such a limit as
                            the provider does (``wire.usage``).
    ``streamed_request``    ``body.stream`` set to anything but false: a batched request is
                            answered whole, never streamed.
    ``invalid_parameter``   ``temperature``, ``top_p``, a penalty, ``n`` or ``seed`` of the
                            wrong type or out of the range every OpenAI-compatible API takes
                            (``"hot"``, ``top_p: 2``, ``n: 0``).
                            The last six are ``batchspec.wire.request_checks``, shared with
                            the Anthropic and Gemini dialects. None of the last eight applies
                            with ``check_messages=False`` (the engine), nor the last six but
                            ``streamed_request`` with ``strict_params=False`` (the ``local``
                            provider's inputs: vLLM takes a role such as ``ipython``,
                            llama.cpp and LM Studio ``max_tokens: -1`` for no limit).
    ``model_mismatch``      ``body.model`` differs from ``model`` (the manifest's); without
                            ``model``, from the first line that named a model (OpenAI and
                            Azure: one model or deployment per file). The message names it.

    A line can have several problems; they are reported in the order above. Problems are
    collected in file order; the report keeps the first ``MAX_SHOWN`` (file-level problems
    first, since they are decided at the end and would otherwise hide behind line problems)
    and counts them all in ``problem_count``.

Anthropic (``dialect="anthropic"``, for ``anthropic`` providers)
    A line may also be Anthropic's own ``{"custom_id", "params"}``: then ``method``, ``url``
    and ``body`` are not asked for, and the model rules apply to ``params.model``. Every line
    is further checked by ``batchspec.wire.anthropic_lines.line_problems``: Messages
    parameters need ``max_tokens`` and ``messages`` (``missing_max_tokens``,
    ``invalid_max_tokens``, ``missing_messages``, ``invalid_params``), an OpenAI chat line
    must be convertible (``unmappable_parameter``, and the chat rules above:
    ``invalid_message``, ``missing_role``, ``invalid_role``, ``invalid_max_tokens``) and other
    endpoints cannot run there (``unsupported_endpoint``). Pass ``custom_id_pattern`` for
    Anthropic's id rule as well.

Gemini (``dialect="gemini"``, for ``gemini`` providers)
    Every line is further checked by ``batchspec.wire.gemini_lines.line_problems``: a
    ``/v1beta/generateContent`` body must be a GenerateContentRequest (``unknown_field``,
    ``missing_contents``, ...), an OpenAI chat line must be convertible
    (``unmappable_parameter``, and the chat rules above: ``invalid_message``,
    ``missing_role``, ``invalid_role``, ``invalid_max_tokens``) and other endpoints cannot run
    there (``unsupported_endpoint``).

Mistral (``dialect="mistral"``, for ``mistral`` providers)
    Every line needs ``body.model``, moderation lines included (the job names one model,
    taken from the lines), and its ``url`` must be an endpoint Mistral batch jobs take
    (``batchspec.wire.mistral_lines.line_problems``: ``unsupported_endpoint``).

Per provider type
    ``rules_for_provider(type)`` gives the keyword arguments above that a provider type's
    inputs are scanned with (``validate`` and ``apply`` both use it).

Endpoint matching
    ``url`` must equal ``endpoint`` exactly, as OpenAI requires: ``"/chat/completions"`` does
    not match ``"/v1/chat/completions"``. Azure's older line format used the unversioned form;
    pass ``allow_unversioned_url=True`` (for Azure only) to treat ``/x`` as ``/v1/x``.

JSON backend
    orjson (the optional ``fast`` extra) is used when importable, else the standard library
    with the same strictness (``JSON_BACKEND`` says which). One known difference: a number too
    large for a double (``1e400``) is invalid JSON under orjson and infinity under json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import IO, Any

from batchspec.errors import InputError
from batchspec.wire import anthropic_lines, gemini_lines, mistral_lines
from batchspec.wire.request_checks import (
    first_message_problem,
    json_type,
    output_limit_problem,
    sampling_problem,
)
from batchspec.wire.request_index import RequestIndexWriter
from batchspec.wire.usage import max_output_of_request, provider_output_limit

try:  # the optional `fast` extra: several times faster than json on large lines
    import orjson
except ImportError:  # tests hide orjson in a subprocess to cover this path
    orjson = None  # type: ignore[assignment]

MAX_SHOWN = 20
#: A line longer than this (bytes, without its line ending) is ``line_too_large``. It bounds
#: the memory one line can take; OpenAI states no per-line limit beyond the file's 200 MB.
DEFAULT_MAX_LINE_BYTES = 10 * 1024 * 1024
#: Bytes read (and hashed) at a time.
READ_CHUNK_BYTES = 1024 * 1024
JSON_BACKEND = "orjson" if orjson is not None else "json"

_BOM = b"\xef\xbb\xbf"
_JSON_WHITESPACE = b" \t\r"
_MISSING: Any = object()
_SHOWN_VALUE_CHARS = 60


@dataclass(frozen=True)
class InputProblem:
    """One problem: ``line`` is the 1-based physical line, None for a file-level problem."""

    line: int | None
    code: str
    message: str
    #: the line is held to a setting of the resource that scans it (its endpoint or model),
    #: not to the file alone: a report shared by several resources says whose
    #: (``naming_the_resource``)
    against_spec: bool = False


@dataclass(frozen=True)
class InputReport:
    """What one scan of a batch input found. ``problems`` holds at most ``MAX_SHOWN``."""

    path: str
    requests: int
    bytes: int
    sha256: str
    models: tuple[str, ...]
    problems: tuple[InputProblem, ...]
    problem_count: int
    blank_lines: int = 0  # blank lines (skipped, not requests), see the module docstring
    urls: tuple[str, ...] = ()  # distinct request urls, in first-seen order
    #: the output tokens every request may answer at most, summed (``wire.usage``)
    max_output_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0


@dataclass(frozen=True)
class RequestLine:
    """One request line of a validated file; ``raw`` is its bytes without the line ending."""

    line: int
    custom_id: str
    raw: bytes


# ---------------------------------------------------------------------------------------------
# Physical lines


def _iter_lines(
    f: IO[bytes], max_line_bytes: int, on_chunk: Callable[[bytes], object] | None
) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(line_number, content)`` for every physical line of ``f``.

    ``content`` drops the ``\\n`` but keeps a ``\\r`` (JSON parsers treat it as whitespace,
    so not copying the line to strip it saves time). It is None for a line whose content is
    over ``max_line_bytes``: such a line is skipped as it streams by, never held whole.
    """
    lineno = 0
    parts: list[bytes] = []  # the unfinished line carried across chunks
    carried = 0
    skipping = False  # inside an over-long line already reported
    read = f.read
    while chunk := read(READ_CHUNK_BYTES):
        if on_chunk is not None:
            on_chunk(chunk)
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if lines:
            if skipping:
                del lines[0]  # the end of the over-long line: already yielded
                skipping = False
            elif parts:
                parts.append(lines[0])
                lines[0] = b"".join(parts)
                parts, carried = [], 0
            for line in lines:
                lineno += 1
                if len(line) > max_line_bytes and _content_len(line) > max_line_bytes:
                    yield lineno, None
                else:
                    yield lineno, line
        if skipping or not tail:
            continue
        parts.append(tail)
        carried += len(tail)
        if carried > max_line_bytes + 1:  # +1: a final \r is not content
            lineno += 1
            yield lineno, None
            parts, carried, skipping = [], 0, True
    if parts:
        line = b"".join(parts)
        lineno += 1
        yield lineno, (None if _content_len(line) > max_line_bytes else line)


def _content_len(line: bytes) -> int:
    return len(line) - 1 if line.endswith(b"\r") else len(line)


def _is_blank(line: bytes) -> bool:
    # Fast path: almost every request line starts with "{".
    return not line or (line[0] in _JSON_WHITESPACE and not line.strip(_JSON_WHITESPACE))


# ---------------------------------------------------------------------------------------------
# Parsing one line


class _LineError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _failure(line: bytes, err: Exception) -> _LineError:
    """Classify a line the parser refused: not UTF-8, a BOM, or bad JSON."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return _LineError(
            "invalid_utf8",
            f"bytes are not valid UTF-8 (byte 0x{line[bad.start]:02x} at byte {bad.start + 1} "
            "of the line); save the file as UTF-8",
        )
    if line.startswith(_BOM):
        return _LineError(
            "byte_order_mark",
            "the line starts with a UTF-8 byte-order mark (BOM); save the file as UTF-8 "
            "without BOM",
        )
    if isinstance(err, json.JSONDecodeError):
        detail = f"{err.msg} at column {err.colno}"
    elif isinstance(err, RecursionError):
        detail = "nested too deeply"
    else:
        detail = str(err)
    return _LineError("invalid_json_line", f"invalid JSON: {detail}")


def _parse_orjson(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as err:
        raise _failure(line, err) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# parse_constant makes the standard library as strict as orjson about NaN and Infinity.
_STRICT_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse_json(line: bytes) -> Any:
    try:
        obj = _STRICT_DECODER.decode(line.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise _failure(line, err) from None
    # A lone surrogate escape cannot be encoded as UTF-8 to send; orjson refuses it, so do we.
    # One regex search is cheap (faster than two `in` tests); the walk runs only on a hit.
    if _SURROGATE_ESCAPE.search(line) is not None and _has_lone_surrogate(obj):
        raise _LineError("invalid_json_line", "invalid JSON: lone UTF-16 surrogate escape")
    return obj


def _has_lone_surrogate(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_parse: Callable[[bytes], Any] = _parse_orjson if orjson is not None else _parse_json


# ---------------------------------------------------------------------------------------------
# Checking one request


def _shown(value: str) -> str:
    """A value quoted for a message, cut short so a huge value cannot flood the output."""
    if len(value) > _SHOWN_VALUE_CHARS:
        value = value[:_SHOWN_VALUE_CHARS] + "…"
    return repr(value)


def _versioned(url: str) -> str:
    return url if url.startswith("/v1/") else "/v1" + url


class _Checker:
    """The rules for request lines, and the few facts they remember across lines."""

    def __init__(
        self,
        endpoint: str | None,
        model: str | None,
        custom_id_pattern: str | None,
        allow_unversioned_url: bool,
        dialect: str = "openai",
    ) -> None:
        self.anthropic = dialect == "anthropic"
        self.gemini = dialect == "gemini"
        self.mistral = dialect == "mistral"
        self.normalize_url: Callable[[str], str] | None = (
            _versioned if allow_unversioned_url else None
        )
        self.endpoint = endpoint
        self.endpoint_key = self._url_key(endpoint) if endpoint is not None else None
        self.model = model
        self.id_pattern = re.compile(custom_id_pattern) if custom_id_pattern else None
        self.first_line_of_id: dict[str, int] = {}
        self.models: dict[str, int] = {}  # model -> first line; insertion order = first seen
        self.first_url: tuple[str, str, int] | None = None  # (url, key, line)
        self.urls: dict[str, None] = {}  # distinct urls seen, first-seen order
        self.shown: list[InputProblem] = []
        self.count = 0
        self.max_output_tokens = 0
        #: each request's messages and output limits checked (``check_messages``)
        self.requests = True
        #: the roles and output limits held to OpenAI's rules (``strict_params``)
        self.strict = True
        #: the output limit the provider sets on a request that sets none (``default_max_tokens``)
        self.unset_output: int | None = None

    def problem(self, line: int, code: str, message: str, *, against_spec: bool = False) -> None:
        self.count += 1
        if len(self.shown) < MAX_SHOWN:
            self.shown.append(InputProblem(line, code, message, against_spec))

    def _url_key(self, url: str) -> str:
        return self.normalize_url(url) if self.normalize_url is not None else url

    def check(self, line: int, obj: Any) -> None:
        if type(obj) is not dict:
            self.problem(
                line, "not_an_object", f"the line is a JSON {json_type(obj)}, not an object"
            )
            return
        self.check_custom_id(line, obj.get("custom_id"))
        if self.anthropic and anthropic_lines.is_native(obj):
            self.check_native_anthropic(line, obj)
            return
        method = obj.get("method", _MISSING)
        if method != "POST":
            self.check_method(line, method)
        url = self.check_url(line, obj.get("url"))
        body = obj.get("body")
        if type(body) is dict:
            self.check_model(line, body.get("model"), url, obj.get("custom_id"))
            if self.requests and not (self.anthropic or self.gemini):
                # Anthropic's and Gemini's own rules check these (below), with the same helpers
                custom_id = obj.get("custom_id")
                if _chat(url or self.endpoint):
                    self.check_messages(line, body.get("messages", _MISSING), custom_id)
                if self.strict:
                    self.check_output_limits(line, body, custom_id)
                found = sampling_problem(body, params=self.strict)
                if found is not None:
                    self.problem(line, found[0], found[1] + _of_custom_id(custom_id))
            self.max_output_tokens += max_output_of_request(
                url, body, self.model, self.unset_output
            )
        elif body is None:
            self.problem(line, "missing_body", "body is missing; it holds the request's parameters")
        else:
            self.problem(line, "invalid_body", f"body must be an object, not a {json_type(body)}")
        if self.anthropic:
            self.dialect_problems(line, obj, anthropic_lines.line_problems(obj))
        elif self.gemini:
            self.dialect_problems(line, obj, gemini_lines.line_problems(obj))
        elif self.mistral:
            for code, message in mistral_lines.line_problems(obj):
                self.problem(line, code, message)

    def check_native_anthropic(self, line: int, obj: dict[str, Any]) -> None:
        """Anthropic's own ``{custom_id, params}`` line (see the module docstring)."""
        messages = anthropic_lines.MESSAGES_ENDPOINT
        if self.endpoint_key is not None and self.endpoint_key != messages:
            self.problem(
                line,
                "url_mismatch",
                f"an Anthropic {{custom_id, params}} line needs the endpoint {messages!r}, "
                f"not {self.endpoint!r}",
                against_spec=True,
            )
        params = obj.get("params")
        if type(params) is dict:
            self.check_model(line, params.get("model"), messages, obj.get("custom_id"))
            self.max_output_tokens += max_output_of_request(messages, params)
        self.dialect_problems(line, obj, anthropic_lines.line_problems(obj))

    def dialect_problems(
        self, line: int, obj: dict[str, Any], found: Iterable[tuple[str, str]]
    ) -> None:
        """A dialect's problems of a line, each naming its custom_id, as the OpenAI
        dialect's do."""
        custom_id = _of_custom_id(obj.get("custom_id"))
        for code, message in found:
            self.problem(line, code, message + custom_id)

    def check_custom_id(self, line: int, custom_id: Any) -> None:
        if type(custom_id) is not str:
            if custom_id is None:
                self.problem(
                    line, "missing_custom_id", "custom_id is missing; every line needs a unique one"
                )
            else:
                self.problem(
                    line,
                    "invalid_custom_id",
                    f"custom_id must be a string, not a {json_type(custom_id)}",
                )
            return
        if not custom_id:
            self.problem(line, "invalid_custom_id", "custom_id is empty")
            return
        if self.id_pattern is not None and not self.id_pattern.fullmatch(custom_id):
            self.problem(
                line,
                "invalid_custom_id",
                f"custom_id {_shown(custom_id)} does not match {self.id_pattern.pattern}",
            )
        first = self.first_line_of_id.setdefault(custom_id, line)
        if first != line:
            self.problem(
                line,
                "duplicate_custom_id",
                f"duplicate custom_id {_shown(custom_id)} (first seen on line {first})",
            )

    def check_method(self, line: int, method: Any) -> None:
        if method is _MISSING:
            found = "missing"
        elif type(method) is str:
            found = _shown(method)
        else:
            found = f"a {json_type(method)}"
        self.problem(line, "invalid_method", f"method is {found}; it must be 'POST'")

    def check_url(self, line: int, url: Any) -> str | None:
        """Check the url; return it when it is a string (the model rule depends on it)."""
        if type(url) is not str:
            if url is None:
                want = f"; it must be {self.endpoint!r}" if self.endpoint else ""
                self.problem(line, "missing_url", f"url is missing{want}", against_spec=bool(want))
            else:
                self.problem(line, "invalid_url", f"url must be a string, not a {json_type(url)}")
            return None
        key = self._url_key(url)
        if url not in self.urls:
            self.urls[url] = None
        if self.endpoint_key is not None:
            if key != self.endpoint_key:
                self.problem(
                    line,
                    "url_mismatch",
                    f"url {_shown(url)} differs from the endpoint {self.endpoint!r}",
                    against_spec=True,
                )
        elif self.first_url is None:
            self.first_url = (url, key, line)
        elif key != self.first_url[1]:
            first_url, _, first_line = self.first_url
            self.problem(
                line,
                "url_mismatch",
                f"url {_shown(url)} differs from {_shown(first_url)} on line {first_line}; "
                "a batch has one endpoint",
            )
        return url

    def check_messages(self, line: int, messages: Any, custom_id: Any) -> None:
        """A chat completion answers at least one message, each an object with a role OpenAI
        knows: a line without any, or with one of another role, is refused by the provider
        after its upload (``[] is too short``, ``Invalid value: 'usr'``), so here, before a
        cent. The message names the line's ``custom_id``, as the provider's answer would have."""
        if type(messages) is list and messages:
            found = first_message_problem(messages) if self.strict else None
            if found is not None:
                self.problem(line, found[0], found[1] + _of_custom_id(custom_id))
            return
        of = f" of custom_id {_shown(custom_id)}" if type(custom_id) is str and custom_id else ""
        if messages is _MISSING:
            why = "is missing; a chat line needs it"
        elif type(messages) is not list:
            why = f"must be a list, not a {json_type(messages)}"
        else:
            why = "is empty; a chat line needs a message"
        code = "missing_messages" if messages is _MISSING else "invalid_messages"
        self.problem(line, code, f"body.messages{of} {why}")

    def check_output_limits(self, line: int, body: dict[str, Any], custom_id: Any) -> None:
        """An output-token limit that is not an integer >= 1 is refused by the provider after
        the upload, and would not bound the budget's estimate as it reads (``wire.usage``)."""
        found = output_limit_problem(body)
        if found is not None:
            self.problem(line, found[0], found[1] + _of_custom_id(custom_id))

    def check_model(self, line: int, model: Any, url: str | None, custom_id: Any = None) -> None:
        if type(model) is not str or not model:
            if model is None:
                if self.model is None and not self.mistral and _moderation(url or self.endpoint):
                    return
                why = "; a Mistral batch job takes its model from the lines" if self.mistral else ""
                self.problem(
                    line, "missing_model", "body.model is missing" + why + _of_custom_id(custom_id)
                )
            else:
                kind = "empty" if model == "" else f"a {json_type(model)}"
                self.problem(
                    line,
                    "invalid_model",
                    f"body.model must be a non-empty string, not {kind}{_of_custom_id(custom_id)}",
                )
            return
        self.models.setdefault(model, line)
        if self.model is not None:
            if model != self.model:
                self.problem(
                    line,
                    "model_mismatch",
                    f"body.model {_shown(model)} differs from the manifest's model "
                    f"{_shown(self.model)}",
                    against_spec=True,
                )
            return
        reference = next(iter(self.models))  # the first model named in the file
        if model != reference:
            self.problem(
                line,
                "model_mismatch",
                f"body.model {_shown(model)} differs from {_shown(reference)} on line "
                f"{self.models[reference]}; a batch file uses one model",
            )


def _of_custom_id(custom_id: Any) -> str:
    return f" (custom_id {_shown(custom_id)})" if type(custom_id) is str and custom_id else ""


def _chat(url: str | None) -> bool:
    return url is not None and url.rstrip("/").endswith("/chat/completions")


def _moderation(url: str | None) -> bool:
    return url is not None and url.rstrip("/").endswith("/moderations")


# ---------------------------------------------------------------------------------------------
# Public API


def scan_batch_input(
    path: str | os.PathLike[str],
    *,
    endpoint: str | None = None,
    model: str | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_requests: int | None = None,
    custom_id_pattern: str | None = None,
    allow_unversioned_url: bool = False,
    dialect: str = "openai",
    index: RequestIndexWriter | None = None,
    check_messages: bool = True,
    strict_params: bool = True,
    default_max_tokens: int | None = None,
) -> InputReport:
    """Read ``path`` once and report every problem (see the module docstring for the rules).

    ``index``: also record every request line's facts there, from the same pass
    (``batchspec.wire.request_index``; meaningful only when the report is ok).
    ``check_messages=False`` (the engine, as OpenAI's batch validation): a chat line's
    ``messages`` and a request's output limits are the request's own business, answered per
    line (400), not the file's. ``strict_params=False`` (the ``local`` provider: model servers
    of the user's own, such as vLLM, take roles such as ``ipython`` and ``max_tokens: -1``):
    the roles and output limits are theirs to judge; ``messages`` is still checked.
    ``default_max_tokens`` (an ``anthropic`` provider's ``defaultMaxTokens``): the output limit
    a chat line that sets none is sent with, which bounds it in ``max_output_tokens``.
    Raises ``InputError`` only when the file cannot be read at all; problems in its content
    are returned in the report, never raised.
    """
    checker = _Checker(endpoint, model, custom_id_pattern, allow_unversioned_url, dialect)
    checker.requests = check_messages
    checker.strict = strict_params
    checker.unset_output = default_max_tokens
    sha = hashlib.sha256()
    parse, check, problem = _parse, checker.check, checker.problem
    add = index.add if index is not None else None
    requests = blank_lines = 0
    offset = 0  # of the line at hand (kept exact only while no line is over-long)
    size = 0

    def hashed(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)
        sha.update(chunk)

    try:
        # unbuffered: _iter_lines reads big chunks itself (a buffered file's isatty ioctl,
        # lseeks and extra read at the end were syscalls for nothing)
        with open(path, "rb", buffering=0) as f:
            for lineno, line in _iter_lines(f, max_line_bytes, hashed):
                start = offset
                if line is None:
                    requests += 1
                    problem(
                        lineno,
                        "line_too_large",
                        f"the line is longer than {max_line_bytes:,} bytes",
                    )
                    continue
                offset += len(line) + 1
                if _is_blank(line):
                    blank_lines += 1
                    continue
                requests += 1
                try:
                    obj = parse(line)
                except _LineError as err:
                    problem(lineno, err.code, err.message)
                    continue
                check(lineno, obj)
                if add is not None:
                    add(lineno, start, line, obj)
    except OSError as err:
        raise InputError(
            f"{os.fspath(path)}: cannot read the batch input ({err.strerror or err}); "
            "check the manifest's spec.input"
        ) from None
    file_level = _file_level_problems(requests, max_requests)
    shown = file_level + checker.shown[: MAX_SHOWN - len(file_level)]
    return InputReport(
        path=os.fspath(path),
        requests=requests,
        bytes=size,
        sha256=sha.hexdigest(),
        models=tuple(checker.models),
        problems=tuple(shown),
        problem_count=checker.count + len(file_level),
        blank_lines=blank_lines,
        urls=tuple(checker.urls),
        max_output_tokens=checker.max_output_tokens,
    )


def _file_level_problems(requests: int, max_requests: int | None) -> list[InputProblem]:
    if requests == 0:
        return [
            InputProblem(
                None, "empty_file", "the file has no requests (it is empty or only blank lines)"
            )
        ]
    if max_requests is not None and requests > max_requests:
        return [
            InputProblem(
                None,
                "too_many_tasks",
                f"the file has {requests:,} requests, more than the limit of {max_requests:,}",
            )
        ]
    return []


def rules_for_provider(
    provider_type: str | None,
    *,
    custom_id_pattern: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``scan_batch_input`` options a provider type's inputs are checked with
    (``custom_id_pattern``: the provider's own rule; Anthropic's by default; ``options``: the
    provider's, of which an Anthropic ``defaultMaxTokens`` bounds the lines that set none)."""
    if custom_id_pattern is None and provider_type == "anthropic":
        custom_id_pattern = anthropic_lines.CUSTOM_ID_PATTERN
    default = provider_output_limit(provider_type, options)
    return {
        "custom_id_pattern": custom_id_pattern,
        "allow_unversioned_url": provider_type == "azure",
        "dialect": provider_type
        if provider_type in ("anthropic", "gemini", "mistral")
        else "openai",
        # the local engine fronts model servers of the user's own, whose rules are laxer
        "strict_params": provider_type != "local",
        **({"default_max_tokens": default} if default else {}),
    }


def require_valid_input(
    path: str | os.PathLike[str],
    *,
    endpoint: str | None = None,
    model: str | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_requests: int | None = None,
    custom_id_pattern: str | None = None,
    allow_unversioned_url: bool = False,
    dialect: str = "openai",
) -> InputReport:
    """Scan ``path`` and return the report, or raise ``InputError`` listing its problems."""
    report = scan_batch_input(
        path,
        endpoint=endpoint,
        model=model,
        max_line_bytes=max_line_bytes,
        max_requests=max_requests,
        custom_id_pattern=custom_id_pattern,
        allow_unversioned_url=allow_unversioned_url,
        dialect=dialect,
    )
    if report.ok:
        return report
    raise InputError(
        f"{report.path}: {report.problem_count} problem(s) in the batch input",
        details=problem_lines(report),
    )


def naming_the_resource(report: InputReport, whose: str) -> InputReport:
    """``report`` with each problem held to a resource's own endpoint or model saying whose
    (``whose``: e.g. ``resource x in manifests/x.yaml``): an input two manifests share, one
    with a wrong endpoint, said "differs from the endpoint '/v1/embeddings'" without which."""
    if not any(p.against_spec for p in report.problems):
        return report
    problems = tuple(
        replace(p, message=f"{p.message} (set by {whose})") if p.against_spec else p
        for p in report.problems
    )
    return replace(report, problems=problems)


def problem_lines(report: InputReport, *, shown_path: str | None = None) -> list[str]:
    """One ``path:line: message`` line per shown problem, then ``... and N more`` if any;
    ``shown_path`` replaces the report's path (e.g. relative to the working directory)."""
    path = shown_path or report.path
    lines = [
        f"{path}:{p.line}: {p.message}" if p.line is not None else f"{path}: {p.message}"
        for p in report.problems
    ]
    hidden = report.problem_count - len(report.problems)
    if hidden:
        lines.append(f"... and {hidden} more")
    return lines


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read 1 MiB at a time."""
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:  # whole chunks: no buffer (nor its syscalls)
        while chunk := f.read(READ_CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


def iter_requests(
    path: str | os.PathLike[str], *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[RequestLine]:
    """Stream the request lines of an already-validated file, in file order.

    Blank lines are skipped; ``raw`` has no line ending (neither ``\\n`` nor ``\\r``). A line
    that cannot yield a ``custom_id`` raises ``InputError`` naming ``path:line``: run
    ``scan_batch_input`` first.
    """
    where = os.fspath(path)
    with open(path, "rb", buffering=0) as f:  # _iter_lines reads whole chunks itself
        for lineno, line in _iter_lines(f, max_line_bytes, None):
            if line is None:
                raise InputError(
                    f"{where}:{lineno}: the line is longer than {max_line_bytes:,} bytes; "
                    "validate the input first"
                )
            if _is_blank(line):
                continue
            raw = line[:-1] if line.endswith(b"\r") else line
            yield RequestLine(lineno, _custom_id(where, lineno, line), raw)


def _custom_id(where: str, lineno: int, line: bytes) -> str:
    try:
        obj = _parse(line)
    except _LineError as err:
        raise InputError(f"{where}:{lineno}: {err.message}; validate the input first") from None
    custom_id = obj.get("custom_id") if type(obj) is dict else None
    if type(custom_id) is not str or not custom_id:
        raise InputError(f"{where}:{lineno}: no custom_id; validate the input first")
    return custom_id


__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "JSON_BACKEND",
    "MAX_SHOWN",
    "InputProblem",
    "InputReport",
    "RequestLine",
    "file_sha256",
    "naming_the_resource",
    "iter_requests",
    "problem_lines",
    "require_valid_input",
    "rules_for_provider",
    "scan_batch_input",
]
