"""Apply's progress as plain lines: what a pipe, a file or a CI log gets.

``ProgressView.render(progress)`` turns one ``Progress`` event into the exact text to write
next (possibly empty). It keeps a little memory (the last poll of each batch, the last set of
resources waited on) and does no I/O, so the CLI writes what it returns and tests read it.
No control characters ever: milestones, uploads and downloads are lines; a poll is a line
only when its batch's status or counts changed; a wait only when the set of resources
waited on changed. A log shows what happened, not every tick. (On a terminal,
``batchspec.cli.applyview`` draws bars instead.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchspec.core.reporting import Progress


@dataclass
class ProgressView:
    _polls: dict[str, tuple[object, ...]] = field(default_factory=dict)
    _waiting: tuple[str, ...] = ()

    def render(self, progress: Progress) -> str:
        """The text to write for ``progress`` ("" when it shows nothing)."""
        # the plan is printed by the CLI; an upload's bytes and a create about to be sent
        # are for the live bar: a log keeps "uploading ..." and "created batch ..."
        if progress.event in ("plan", "upload_progress", "creating"):
            return ""
        if progress.event == "poll":
            return self._poll(progress)
        if progress.event == "wait":
            return self._wait(progress)
        if progress.event == "warning" and not progress.resource:
            return f"Warning: {progress.message}\n"
        return _prefixed(progress, progress.message) + "\n"

    def _poll(self, progress: Progress) -> str:
        data = progress.data
        key = str(data.get("remote_id", progress.message))
        seen = (
            data.get("status", ""),
            data.get("total"),
            data.get("completed"),
            data.get("failed"),
        )
        changed = self._polls.get(key) != seen
        self._polls[key] = seen
        return _prefixed(progress, progress.message) + "\n" if changed else ""

    def _wait(self, progress: Progress) -> str:
        names = tuple(str(n) for n in progress.data.get("resources", ()) or ())
        changed = names != self._waiting
        self._waiting = names
        return progress.message + "\n" if changed else ""


def _prefixed(progress: Progress, text: str) -> str:
    return f"[{progress.resource}] {text}" if progress.resource else text
