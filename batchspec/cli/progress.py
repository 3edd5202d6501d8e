"""Apply's progress for people: a live status line on a terminal, plain lines in a CI log.

``ProgressView.render(progress)`` turns one ``reconcile.Progress`` event into the exact text
to write next (possibly empty); ``finish()`` gives what clears the screen's status line at
the end. The view keeps a little memory (the last poll of each batch), nothing else: it does
no I/O, so the CLI writes what it returns and tests read it directly.

* **live** (stdout is a terminal): polls, uploads, downloads and waits share one status
  line, rewritten in place (carriage return + erase to end of line) and cut to the terminal
  width so it never wraps; a poll shows a bar and the request counts, a wait the counts of
  every resource waited on. Milestones (created, collected, results written, warnings, ...)
  are printed as lines of their own above it.
* **plain** (a pipe, a CI log): no control characters at all. Milestones, uploads and
  downloads are lines; a poll is a line only when its batch's status or counts changed; a
  wait only when the set of resources waited on changed. A log shows what happened, not
  every tick.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchspec.wire.batch_status import TERMINAL_STATUSES

if TYPE_CHECKING:
    from batchspec.core.reconcile import Progress

CLEAR_LINE = "\r\x1b[K"  # back to column 0, erase to the end of the line
BAR_WIDTH = 20
STATUS_EVENTS = frozenset({"poll", "upload", "download", "wait"})


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[#########...........]``: ``done`` of ``total`` as ``width`` cells (empty when 0)."""
    filled = 0 if total <= 0 else min(width, done * width // total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def poll_counts(data: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(answered, total)`` from a poll event's data, or None when the provider gave none."""
    total = data.get("total")
    if not isinstance(total, int) or total <= 0:
        return None
    done = sum(n for n in (data.get("completed"), data.get("failed")) if isinstance(n, int))
    return done, total


@dataclass
class ProgressView:
    live: bool
    width: int = 80
    _status_on_screen: bool = False
    _polls: dict[str, tuple[object, ...]] = field(default_factory=dict)
    _latest: dict[str, str] = field(default_factory=dict)  # resource -> its last poll, short
    _waiting: tuple[str, ...] = ()

    def render(self, progress: Progress) -> str:
        """The text to write for ``progress`` ("" when it shows nothing)."""
        if progress.event == "plan":  # the CLI prints the plan itself
            return ""
        if progress.event == "poll":
            return self._poll(progress)
        if progress.event == "wait":
            return self._wait(progress)
        if progress.event in STATUS_EVENTS and self.live:
            return self._status(_prefixed(progress, progress.message + " ..."))
        return self._line(_prefixed(progress, progress.message))

    def finish(self) -> str:
        """Clears the status line if one is on screen (call once, at the end)."""
        if not self._status_on_screen:
            return ""
        self._status_on_screen = False
        return CLEAR_LINE

    # -----------------------------------------------------------------------------------------

    def _poll(self, progress: Progress) -> str:
        data = progress.data
        status = str(data.get("status", ""))
        counts = poll_counts(data)
        if progress.resource:
            self._latest[progress.resource] = (
                f"{progress.resource} {counts[0]}/{counts[1]}"
                if counts
                else f"{progress.resource} {status}"
            )
        key = str(data.get("remote_id", progress.message))
        seen = (status, counts)
        changed = self._polls.get(key) != seen
        self._polls[key] = seen
        if not self.live:
            return self._line(_prefixed(progress, progress.message)) if changed else ""
        if status in TERMINAL_STATUSES:  # a finished batch is a milestone: keep it on screen
            return self._line(_prefixed(progress, progress.message)) if changed else ""
        text = f"batch {data.get('remote_id', '?')} {status}"
        if counts:
            done, total = counts
            text += f" {progress_bar(done, total)} {done}/{total} ({done * 100 // total}%)"
        return self._status(_prefixed(progress, text))

    def _wait(self, progress: Progress) -> str:
        names = tuple(str(n) for n in progress.data.get("resources", ()) or ())
        if not self.live:
            changed = names != self._waiting
            self._waiting = names
            return self._line(progress.message) if changed else ""
        counts = [self._latest[n] for n in names if n in self._latest]
        text = progress.message + (": " + ", ".join(counts) if counts else "")
        return self._status(text)

    def _status(self, text: str) -> str:
        self._status_on_screen = True
        return CLEAR_LINE + _fit(text, self.width - 1)

    def _line(self, text: str) -> str:
        if self.live and self._status_on_screen:
            self._status_on_screen = False
            return CLEAR_LINE + text + "\n"
        return text + "\n"


def _prefixed(progress: Progress, text: str) -> str:
    return f"[{progress.resource}] {text}" if progress.resource else text


def _fit(text: str, width: int) -> str:
    if width < 4 or len(text) <= width:
        return text
    return text[: width - 3] + "..."
