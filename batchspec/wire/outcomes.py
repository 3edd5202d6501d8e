"""What one line of a provider's output or error file means for its request.

Each result line is classified once, when it is collected:

* ``ok``: ``response.status_code`` is 2xx and there is no top-level ``error``.
* ``retryable``: the request may succeed if sent again. Its *category* names why, and the
  manifest's ``retry.on`` decides which categories are retried:
  ``rate_limit`` (HTTP 429), ``server_error`` (HTTP 5xx), ``timeout`` (HTTP 408 or
  ``request_timeout``), ``expired`` (``batch_expired``), ``cancelled`` (``batch_cancelled``,
  unless a user cancelled on purpose). The local engine's ``upstream_unreachable`` (its model
  server refused or dropped the connection through all of the engine's own attempts) is a
  ``server_error``, as a 5xx or a timeout is: a server that was down may be up again, and,
  like those, a dropped connection may have reached a model (the attempts are bounded by
  ``retry.maxAttempts``, and each is checked against the budget before it is sent).
* ``failed``: final. Any other 4xx (``context_length_exceeded``, invalid requests, ...) and
  unknown top-level error codes: sending it again would fail again and cost again.

The classification looks at the line's content, not at which file it came from, because
providers differ on where a non-200 response lands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

State = Literal["ok", "retryable", "failed"]

RETRY_CATEGORIES = ("server_error", "rate_limit", "timeout", "expired", "cancelled")

_TOP_LEVEL_CODES = {
    "batch_expired": "expired",
    "batch_cancelled": "cancelled",
    "request_timeout": "timeout",
    "upstream_unreachable": "server_error",  # the local engine's: its model server was down
}


@dataclass(frozen=True)
class Outcome:
    state: State
    category: str | None  # a RETRY_CATEGORIES entry for retryable; an error code otherwise


_OK = Outcome("ok", None)  # frozen: one for every answer


def classify_result_line(
    line: Mapping[str, Any], *, retry_on: tuple[str, ...] = RETRY_CATEGORIES
) -> Outcome:
    """Classify one parsed output/error line (see the module docstring)."""
    error = line.get("error")
    response = line.get("response")
    # type(...) is dict first: parsed JSON is dicts, and an ABC check is slow on every line
    if type(response) is dict or isinstance(response, Mapping):
        status = response.get("status_code")
    else:
        status = None
    if not error and isinstance(status, int) and 200 <= status < 300:
        return _OK
    category = _category(error, status)
    if category in RETRY_CATEGORIES:
        return Outcome("retryable" if category in retry_on else "failed", category)
    return Outcome("failed", category or _code(error, response))


def _category(error: Any, status: Any) -> str | None:
    if isinstance(error, Mapping):
        return _TOP_LEVEL_CODES.get(str(error.get("code")))
    if status == 429:
        return "rate_limit"
    if status == 408:
        return "timeout"
    if isinstance(status, int) and status >= 500:
        return "server_error"
    return None


def _code(error: Any, response: Any) -> str:
    if isinstance(error, Mapping) and error.get("code"):
        return str(error["code"])
    body = response.get("body") if isinstance(response, Mapping) else None
    inner = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(inner, Mapping) and inner.get("code"):
        return str(inner["code"])
    status = response.get("status_code") if isinstance(response, Mapping) else None
    return f"http_{status}" if status else "unknown_error"


#: the longest error message ``error_summary`` keeps (a provider may send a page of text)
ERROR_SUMMARY_CHARS = 200


def error_summary(line: Mapping[str, Any]) -> str:
    """``custom_id: code: message`` of one error-file line, on one printable line of at most
    ``ERROR_SUMMARY_CHARS`` of message: a provider's text is shown on a terminal, so control
    characters (a colour code, a newline) become spaces."""
    error, response = line.get("error"), line.get("response")
    message = error.get("message") if isinstance(error, Mapping) else None
    body = response.get("body") if isinstance(response, Mapping) else None
    inner = body.get("error") if isinstance(body, Mapping) else None
    if not message and isinstance(inner, Mapping):
        message = inner.get("message")
    text = f"{line.get('custom_id')}: {_code(error, response)}"
    if message:
        message = " ".join(str(message).split())
        if len(message) > ERROR_SUMMARY_CHARS:
            message = message[: ERROR_SUMMARY_CHARS - 1] + "…"
        text += f": {message}"
    return "".join(c if c.isprintable() else " " for c in text)
