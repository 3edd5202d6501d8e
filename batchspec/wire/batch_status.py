"""The lifecycle statuses of a remote batch (OpenAI's names; other dialects map onto them)."""

from __future__ import annotations

#: a batch in one of these may still change: keep polling it
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
#: a batch in one of these never changes again: its files can be collected
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
KNOWN_STATUSES = frozenset(ACTIVE_STATUSES) | TERMINAL_STATUSES
