"""The lifecycle statuses of a remote batch (OpenAI's names; other dialects map onto them)."""

from __future__ import annotations

#: a batch in one of these may still change: keep polling it
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
#: a batch in one of these never changes again: its files can be collected
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
KNOWN_STATUSES = frozenset(ACTIVE_STATUSES) | TERMINAL_STATUSES
#: the American spellings some servers use (Together's SDK has discussed ``CANCELED``), ours
AMERICAN_SPELLINGS = {"canceling": "cancelling", "canceled": "cancelled"}


def normal_status(value: object) -> str:
    """A server's status lower-cased, with ``canceling``/``canceled`` spelt as ours."""
    text = str(value or "unknown").lower()
    return AMERICAN_SPELLINGS.get(text, text)


#: statuses of a batch with nothing left to cancel: already stopping, or writing its files
NOTHING_TO_CANCEL = frozenset({"cancelling", "finalizing"})
