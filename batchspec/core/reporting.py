"""What a run reports while it works: ``Progress`` events for the face to render, sizes in words."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batchspec.core.plan import Plan
from batchspec.state.store import utc_timestamp


@dataclass(frozen=True)
class Progress:
    """One thing apply did or saw, for the CLI to render (text, NDJSON or a progress bar)."""

    event: str
    resource: str | None
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)
    plan: Plan | None = None  # set on the "plan" event
    at: str = field(default_factory=utc_timestamp)  # when it happened (UTC, as in history)

    def to_json(self) -> dict[str, Any]:
        out = {
            "event": self.event,
            "at": self.at,
            "resource": self.resource,
            "message": self.message,
            **self.data,
        }
        if self.plan is not None:
            out["plan"] = self.plan.to_json()
        return out


Reporter = Callable[[Progress], None]


_UNITS = ("bytes", "KB", "MB", "GB", "TB")


def format_size(size: int) -> str:
    """``4335`` -> ``"4.3 KB"``; below 1 KB, exact bytes."""
    value = float(size)
    for unit in _UNITS:
        if value < 1000 or unit == _UNITS[-1]:
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
