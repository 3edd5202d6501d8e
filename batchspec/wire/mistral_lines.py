"""Mistral batch jobs: the line format, the endpoints and the statuses, for both sides.

A Mistral batch input line is ``{"custom_id", "body"}``: no ``method`` or ``url`` (the job
names one ``endpoint``) and no ``model`` in the body (the job names it). batchspec's lines
(OpenAI's ``{custom_id, method, url, body}``) become Mistral lines by dropping ``method``
and ``url`` and moving ``body.model`` to the job (``to_line``); a batch uses one model, as
``batchspec.wire.inputs`` already checks for every provider.

Output and error lines are OpenAI's shape (``{"id", "custom_id", "response": {"status_code",
"body"}, "error"}``) and are kept as they come.

Statuses (``BatchJobStatus``) and ours: QUEUED -> validating, RUNNING -> in_progress,
SUCCESS -> completed, FAILED -> failed, TIMEOUT_EXCEEDED -> expired,
CANCELLATION_REQUESTED -> cancelling, CANCELLED -> cancelled; another is kept lower-cased
(never terminal, so the reconciler keeps polling).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: the endpoints a Mistral batch job takes (mistralai's ``APIEndpoint``)
ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/fim/completions",
    "/v1/moderations",
    "/v1/chat/moderations",
    "/v1/ocr",
    "/v1/classifications",
    "/v1/chat/classifications",
    "/v1/conversations",
    "/v1/audio/transcriptions",
)
#: Mistral's ``timeout_hours`` (default 24); batchspec's ``completion_window`` maps onto it
DEFAULT_TIMEOUT_HOURS = 24
MAX_TIMEOUT_HOURS = 168

TO_OURS = {
    "QUEUED": "validating",
    "RUNNING": "in_progress",
    "SUCCESS": "completed",
    "FAILED": "failed",
    "TIMEOUT_EXCEEDED": "expired",
    "CANCELLATION_REQUESTED": "cancelling",
    "CANCELLED": "cancelled",
}
FROM_OURS = {
    "validating": "QUEUED",
    "in_progress": "RUNNING",
    "finalizing": "RUNNING",
    "cancelling": "CANCELLATION_REQUESTED",
    "completed": "SUCCESS",
    "failed": "FAILED",
    "expired": "TIMEOUT_EXCEEDED",
    "cancelled": "CANCELLED",
}


def batch_status(value: Any) -> str:
    """Our status for a Mistral job status (see the module docstring)."""
    text = str(value or "unknown")
    return TO_OURS.get(text.upper(), text.lower())


def timeout_hours(completion_window: str | None) -> int:
    """``"24h"`` -> 24, ``"2d"`` -> 48; anything else is Mistral's default, 24."""
    window = (completion_window or "").strip().lower()
    try:
        if window.endswith("h"):
            hours = int(window[:-1])
        elif window.endswith("d"):
            hours = int(window[:-1]) * 24
        else:
            return DEFAULT_TIMEOUT_HOURS
    except ValueError:
        return DEFAULT_TIMEOUT_HOURS
    return max(1, min(hours, MAX_TIMEOUT_HOURS))


def to_line(line: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A batchspec line as a Mistral line, and the model its body named (moved to the job)."""
    body = dict(line["body"])
    model = body.pop("model", None)
    return {"custom_id": line["custom_id"], "body": body}, model if model else None


def line_problems(line: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(code, message)`` for what keeps a line from running in a Mistral batch job.

    Only what is specific to Mistral; ``custom_id``, ``method``, ``url`` and ``model`` (one
    per file, and required on every line here, moderation included) are checked by
    ``batchspec.wire.inputs``.
    """
    url = line.get("url")
    if isinstance(url, str) and url not in ENDPOINTS:
        return [
            (
                "unsupported_endpoint",
                f"url {url!r} cannot run in a Mistral batch job: use one of {', '.join(ENDPOINTS)}",
            )
        ]
    return []
