"""Apply's live progress on a terminal: one bar per resource, redrawn in place.

Pure, in three parts, so every frame can be tested as a string without a terminal:

* ``advance(board, progress, now) -> Board``: folds one ``Progress`` event into an immutable
  ``Board`` (per resource: its batches by remote id with status, counts, shard and attempt,
  and when their counts were first seen, for the ETA).
* ``board_lines(board, now, ...) -> list[str]``: one line per resource, e.g.
  ``⠹ triage  ━━━━━━━━╸━━━━━━━━━━━  12/20  60%  1 failed  2 shards  attempt 2  ETA 0:04``;
  a spinner and the provider's word while it is validating, uploading or creating (an upload
  that reports its bytes gets a byte bar: ``1.2/4.3 MB  27%``); ✓ / ✗
  when the resource is done. Lines are cut to the terminal width so they never wrap.
* ``LiveBars``: remembers how many lines of bars are on screen and returns the bytes that
  redraw them (cursor up, erase to the end of the screen, the new lines), with milestones
  (created, collected, results written, warnings, ...) printed above the bars, where they
  stay; ``finish()`` erases the bars, so the closing summary takes their place.

The ETA is the requests left over the rate seen since the batch's counts were first seen,
taken from the provider's own counts; no rate yet, no ETA. Times come in as ``now``
(monotonic seconds) so a test chooses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from batchspec.cli.colour import PLAIN, Style
from batchspec.wire.batch_status import TERMINAL_STATUSES

if TYPE_CHECKING:
    from batchspec.core.reporting import Progress

UP_AND_ERASE = "\r\x1b[{n}A\x1b[J"  # to column 0, n lines up, erase to the end of the screen
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
ASCII_SPINNER = "|/-\\"
BAR_WIDTH = 24
SPIN_PER_SECOND = 10
#: events the bars show by themselves; every other event is a milestone line above them
BAR_EVENTS = frozenset(
    {"plan", "poll", "wait", "upload", "upload_progress", "creating", "download"}
)
#: milestone lines drawn in a colour above the bars
_LINE_COLOURS = {
    "warning": "yellow",
    "throttled": "yellow",
    "skip": "yellow",
    "queued": "yellow",
    "download_failed": "red",
    "create_refused": "yellow",
}


@dataclass(frozen=True)
class BatchBar:
    """One remote batch as the last poll (or its creation) described it."""

    remote_id: str
    status: str = "submitted"
    total: int | None = None
    completed: int = 0
    failed: int = 0
    shard: int | None = None
    attempt: int | None = None
    first_counted: tuple[float, int] | None = None  # (when, answered) of the first counts seen

    @property
    def answered(self) -> int:
        return self.completed + self.failed

    def eta(self, now: float) -> float | None:
        """Seconds left at the rate seen so far, or None without a rate."""
        if self.total is None or self.first_counted is None or self.status in TERMINAL_STATUSES:
            return None
        since, answered_then = self.first_counted
        gained, elapsed = self.answered - answered_then, now - since
        if gained <= 0 or elapsed <= 0:
            return None
        return max(0, self.total - self.answered) * elapsed / gained


@dataclass(frozen=True)
class ResourceBar:
    name: str
    activity: str = "starting"  # what it does while no batch has counts: uploading, ...
    batches: tuple[BatchBar, ...] = ()
    outcome: str | None = None  # "done" (results written), "degraded", "cancelled"
    upload: tuple[int, int] | None = None  # (bytes sent, file size) while uploading

    def current(self) -> tuple[BatchBar, ...]:
        """The latest attempt of each shard (a retry carries only what is left)."""
        latest: dict[object, BatchBar] = {}
        for b in self.batches:
            key = b.shard if b.shard is not None else b.remote_id
            if key not in latest or (b.attempt or 0) >= (latest[key].attempt or 0):
                latest[key] = b
        return tuple(latest.values())


@dataclass(frozen=True)
class Board:
    resources: tuple[ResourceBar, ...] = ()

    def get(self, name: str) -> ResourceBar | None:
        return next((r for r in self.resources if r.name == name), None)

    def put(self, bar: ResourceBar) -> Board:
        if self.get(bar.name) is None:
            return Board((*self.resources, bar))
        return Board(tuple(bar if r.name == bar.name else r for r in self.resources))


# ---------------------------------------------------------------------------------------------
# events -> board


def advance(board: Board, progress: Progress, now: float) -> Board:
    """The board after ``progress`` (events without a resource leave it as it is)."""
    name = progress.resource
    if name is None:
        return board
    bar = board.get(name) or ResourceBar(name)
    data = progress.data
    event = progress.event
    if event == "upload":
        bar = replace(bar, activity="uploading " + _upload_size(data), upload=None)
    elif event == "upload_progress":
        sent, size = data.get("sent"), data.get("bytes")
        if isinstance(sent, int) and isinstance(size, int) and size > 0:
            bar = replace(bar, activity="uploading", upload=(min(sent, size), size))
    elif event == "creating":
        bar = replace(bar, activity="creating a batch", upload=None)
    elif event in ("create", "adopt") and "remote_id" in data:
        verb = "created" if event == "create" else "adopted"
        if bar.outcome == "cancelled":
            # a replace cancelled the old generation, and this batch is the new one's: the
            # old batches and their "cancelled" are no longer the resource's progress
            bar = replace(bar, batches=(), outcome=None)
        bar = _with_batch(bar, BatchBar(str(data["remote_id"]), status=verb), data, now)
        bar = replace(bar, activity=verb, upload=None)
    elif event == "poll" and "remote_id" in data and not data.get("retired"):
        # a retired generation's batch (``drain``) is not the resource's progress
        old = next((b for b in bar.batches if b.remote_id == data["remote_id"]), None)
        fresh = old or BatchBar(str(data["remote_id"]))
        bar = _with_batch(bar, replace(fresh, status=str(data.get("status", ""))), data, now)
    elif event == "download":
        bar = replace(bar, activity="downloading")
    elif event == "collect":
        bar = replace(bar, activity="collected")
    elif event == "download_failed":
        bar = replace(bar, activity="download failed")
    elif event == "queued":
        bar = replace(bar, activity="queued")
    elif event == "results":
        status = str(data.get("status", ""))
        bar = replace(bar, outcome="degraded" if status == "degraded" else "done")
    elif event == "cancel":
        bar = replace(bar, outcome="cancelled")
    return board.put(bar)


def _with_batch(
    bar: ResourceBar, batch: BatchBar, data: Mapping[str, Any], now: float
) -> ResourceBar:
    total = data.get("total")
    if isinstance(total, int) and total > 0:
        batch = replace(
            batch,
            total=total,
            completed=_int(data.get("completed")),
            failed=_int(data.get("failed")),
        )
        if batch.first_counted is None:
            batch = replace(batch, first_counted=(now, batch.answered))
    elif batch.total is None and isinstance(data.get("requests"), int):
        batch = replace(batch, total=data["requests"])
    if isinstance(data.get("shard"), int):
        batch = replace(batch, shard=data["shard"])
    if isinstance(data.get("attempt"), int):
        batch = replace(batch, attempt=data["attempt"])
    others = tuple(b for b in bar.batches if b.remote_id != batch.remote_id)
    return replace(bar, batches=(*others, batch))


def _sent_of_size(sent: int, size: int) -> str:
    """``1.1/4.3 MB``, in the unit of the file's size: a 480-byte upload is ``240/480 bytes``
    and a 48 KB one ``12.0/48.0 KB``, not ``0.0/0.0 MB``."""
    if size < 1_000:
        return f"{sent}/{size} bytes"
    if size < 1_000_000:
        return f"{sent / 1_000:,.1f}/{size / 1_000:,.1f} KB"
    return f"{sent / 1_000_000:,.1f}/{size / 1_000_000:,.1f} MB"


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _upload_size(data: Mapping[str, Any]) -> str:
    from batchspec.core.reporting import format_size

    size = data.get("bytes")
    return f"({format_size(size)})" if isinstance(size, int) else ""


# ---------------------------------------------------------------------------------------------
# board -> lines


def board_lines(
    board: Board, now: float, *, width: int = 80, style: Style = PLAIN, ascii_only: bool = False
) -> list[str]:
    """One line per resource, each at most ``width - 1`` visible characters."""
    name_width = max((len(r.name) for r in board.resources), default=0)
    return [
        resource_line(
            r, now, name_width=name_width, width=width, style=style, ascii_only=ascii_only
        )
        for r in board.resources
    ]


def resource_line(
    bar: ResourceBar,
    now: float,
    *,
    name_width: int = 0,
    width: int = 80,
    style: Style = PLAIN,
    ascii_only: bool = False,
) -> str:
    batches = bar.current()
    counted = [b for b in batches if b.total]
    total = sum(b.total or 0 for b in counted)
    answered = sum(b.answered for b in counted)
    failed = sum(b.failed for b in counted)
    statuses = {b.status for b in batches}

    parts = [_mark(bar, now, style, ascii_only) + " " + style.bold(bar.name.ljust(name_width))]
    if bar.upload is not None and bar.outcome is None and not batches:
        sent, size = bar.upload
        parts.append(style.paint(bar_cells(sent, size, ascii_only=ascii_only), "cyan"))
        parts.append(f"{_sent_of_size(sent, size)} {sent * 100 // size:>3}%")
    elif counted and not statuses <= {"validating", "created", "adopted", "submitted"}:
        colour = "green" if bar.outcome == "done" else "red" if bar.outcome else "cyan"
        parts.append(style.paint(bar_cells(answered, total, ascii_only=ascii_only), colour))
        parts.append(f"{answered:,}/{total:,} {answered * 100 // total:>3}%")
    if failed:
        parts.append(style.paint(f"{failed:,} failed", "red"))
    shards = {b.shard for b in batches if b.shard is not None}
    if len(shards) > 1:
        parts.append(f"{len(shards)} shards")
    attempt = max((b.attempt or 1 for b in batches), default=1)
    if attempt > 1:
        parts.append(style.paint(f"attempt {attempt}", "yellow"))
    etas = [e for b in batches if (e := b.eta(now)) is not None]
    if etas and bar.outcome is None:
        parts.append(f"ETA {format_duration(max(etas))}")
    parts.append(style.dim(_doing(bar, statuses)))
    return fit("  ".join(p for p in parts if p), width - 1)


def _mark(bar: ResourceBar, now: float, style: Style, ascii_only: bool) -> str:
    if bar.outcome == "done":
        return style.paint("+" if ascii_only else "✓", "green")
    if bar.outcome is not None:
        return style.paint("x" if ascii_only else "✗", "red")
    frames = ASCII_SPINNER if ascii_only else SPINNER
    return style.paint(frames[int(now * SPIN_PER_SECOND) % len(frames)], "cyan")


def _doing(bar: ResourceBar, statuses: set[str]) -> str:
    if bar.outcome is not None:
        return bar.outcome
    if bar.activity in ("downloading", "download failed", "collected", "queued") or not statuses:
        return bar.activity
    return ", ".join(sorted(statuses))


def bar_cells(done: int, total: int, width: int = BAR_WIDTH, *, ascii_only: bool = False) -> str:
    """``done`` of ``total`` as ``width`` cells: ``━━━━╺━━━━`` style (``##..`` in ASCII)."""
    filled = 0 if total <= 0 else min(width, done * width // total)
    if ascii_only:
        return "[" + "#" * filled + "." * (width - filled) + "]"
    return "━" * filled + "╺" * (filled < width) + " " * max(0, width - filled - 1)


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``1:15``; an hour or more -> ``1h05m``."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}:{secs:02d}"


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` visible characters (escape sequences do not count)."""
    out, visible, i = [], 0, 0
    while i < len(text) and visible < width:
        if text[i] == "\x1b":
            end = text.find("m", i)
            end = len(text) - 1 if end < 0 else end
            out.append(text[i : end + 1])
            i = end + 1
            continue
        out.append(text[i])
        visible += 1
        i += 1
    if text[i:] and "\x1b[" in text:  # cut short (or only codes left): close any colour open
        out.append("\x1b[0m")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# the screen


@dataclass
class LiveBars:
    """What to write, event by event, to keep the bars at the bottom of a terminal."""

    width: int = 80
    #: the terminal's rows: a frame is at most one fewer, since "n lines up" stops at the
    #: top of the screen, and lines scrolled past it could never be erased again
    height: int = 24
    style: Style = PLAIN
    ascii_only: bool = False
    board: Board = field(default_factory=Board)
    _drawn: int = 0  # lines of bars on screen, right above the cursor

    def render(self, progress: Progress, now: float) -> str:
        """Text for ``progress``: a milestone line above the bars, then the bars redrawn."""
        self.board = advance(self.board, progress, now)
        if progress.event in BAR_EVENTS:
            return self.redraw(now)
        prefix = f"[{progress.resource}] " if progress.resource else ""
        colour = _LINE_COLOURS.get(progress.event)
        line = prefix + (self.style.paint(progress.message, colour) if colour else progress.message)
        return self._erase() + line + "\n" + self._draw(now)  # above the bars: it may wrap

    def redraw(self, now: float) -> str:
        """The bars drawn again at ``now`` (spinners turn, ETAs count down)."""
        if not self.board.resources:
            return ""
        return self._erase() + self._draw(now)

    def finish(self) -> str:
        """Erases the bars: the summary printed next takes their place."""
        return self._erase()

    def leave_on_screen(self) -> None:
        """Something was written below the bars: leave them there (the next frame is drawn
        below it), since erasing as many lines above the cursor would wipe that off."""
        self._drawn = 0

    def _erase(self) -> str:
        text = UP_AND_ERASE.format(n=self._drawn) if self._drawn else ""
        self._drawn = 0
        return text

    def _draw(self, now: float) -> str:
        board = self.board
        rows = max(self.height - 1, 1)
        more = ""
        if len(board.resources) > rows:  # the unfinished first, then a line for the rest
            unfinished = [r for r in board.resources if r.outcome is None]
            shown = (unfinished + [r for r in board.resources if r.outcome is not None])[: rows - 1]
            done = len(board.resources) - len(unfinished)
            dots = "..." if self.ascii_only else "…"
            hidden = len(board.resources) - len(shown)
            more = self.style.dim(
                fit(f"{dots} and {hidden:,} more ({done:,} done)", self.width - 1)
            )
            board = Board(tuple(shown))
        lines = board_lines(
            board, now, width=self.width, style=self.style, ascii_only=self.ascii_only
        )
        if more:
            lines.append(more)
        self._drawn = len(lines)
        return "".join(line + "\n" for line in lines)
