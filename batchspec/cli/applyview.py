"""Where apply's progress goes: live bars, plain lines, NDJSON, or nowhere (``--quiet``).

``ApplyOutput.for_stdout(...)`` picks the mode once, from the flags and from stdout itself:

* ``--json``: one JSON object per event (NDJSON), as before; with ``--quiet`` none of them
  (the final result object is still written by the command).
* ``--quiet``: nothing while it works; the command prints no summary either.
* **live** (stdout is a terminal, ``TERM`` is not ``dumb`` and ``CI`` is not set): the plan,
  then one bar per resource redrawn in place (``batchspec.cli.bars``), turned by a small
  ticker thread so spinners and ETAs move between polls; ``close()`` erases the bars.
* **plain** (a pipe, a file, a CI log): ``batchspec.cli.progress.ProgressView`` lines, with
  no control characters at all.

The rendering is in ``bars``/``progress``; this module only does the writing, under one lock
shared with the ticker, so two writers never interleave a frame.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TextIO

from batchspec.cli.bars import LiveBars
from batchspec.cli.colour import PLAIN, Style
from batchspec.cli.progress import ProgressView

if TYPE_CHECKING:
    from batchspec.core.reporting import Progress

TICK_SECONDS = 0.1
#: how long a line said above the bars waits for the frame being written (by the ticker)
LOCK_WAIT_SECONDS = 0.2


def in_ci(env: Mapping[str, str] | None = None) -> bool:
    """True when ``CI`` is set (to anything but empty, ``0`` or ``false``): no person watches,
    even where the runner gives the job a pseudo-terminal."""
    env = os.environ if env is None else env
    return env.get("CI", "").lower() not in ("", "0", "false")


def live_terminal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is a terminal a person watches (not a dumb one, not CI's)."""
    env = os.environ if env is None else env
    if env.get("TERM") == "dumb" or in_ci(env):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@dataclass
class ApplyOutput:
    mode: str  # "json", "quiet", "live" or "plain"
    write: Callable[[str], None]
    style: Style = PLAIN
    width: int = 80
    height: int = 24  # the terminal's rows: the live bars never draw more (``LiveBars``)
    ascii_only: bool = False
    selection: tuple[str, ...] = ()  # --select, to say why a plan selected nothing
    verbose: bool = False  # --verbose: the plan lists unchanged resources too
    clock: Callable[[], float] = time.monotonic
    _said: set[str] = field(default_factory=set)  # ``Progress.said_once`` lines written
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _bars: LiveBars | None = None
    _plain: ProgressView = field(default_factory=lambda: ProgressView())
    _stop: threading.Event = field(default_factory=threading.Event)
    _ticker: threading.Thread | None = None

    @classmethod
    def for_stream(
        cls,
        stream: TextIO,
        *,
        as_json: bool,
        quiet: bool,
        style: Style,
        selection: tuple[str, ...] = (),
        verbose: bool = False,
    ) -> ApplyOutput:
        if as_json:
            mode = "quiet-json" if quiet else "json"
        elif quiet:
            mode = "quiet"
        else:
            mode = "live" if live_terminal(stream) else "plain"
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        size = shutil.get_terminal_size()
        return cls(
            mode=mode,
            write=_writer(stream),
            style=style if mode == "live" else PLAIN,
            width=size.columns,
            height=size.lines,
            ascii_only=not encoding.startswith("utf"),
            selection=selection,
            verbose=verbose,
        )

    def show(self, progress: Progress) -> None:
        """Writes what ``progress`` means in this mode."""
        if self.mode == "json":
            self._emit(json.dumps(progress.to_json(), default=str) + "\n")
            return
        if self.mode in ("quiet", "quiet-json"):
            return
        if progress.said_once is not None:  # one line for all such events: the summary
            if progress.said_once in self._said:  # names each resource
                return
            self._said.add(progress.said_once)
            progress = replace(progress, resource=None, message=progress.said_once)
        if progress.plan is not None:
            from batchspec.cli.render import plan_text

            text = plan_text(progress.plan, self.style, self.selection, unchanged=self.verbose)
            self._emit(text + "\n\n")
        elif self.mode == "plain":
            self._emit(self._plain.render(progress))
        else:
            bars = self._live()
            with self._lock:
                self.write(bars.render(progress, self.clock()))

    def say_above(self, text: str, write_err: Callable[[str], None]) -> bool:
        """Write ``text`` (a line for stderr: a signal's) above the live bars, which are then
        drawn again below it; False, writing nothing, when no bars are on screen.

        Written below them instead, the line was taken for the bars' last line by the next
        redraw (it erases as many lines above the cursor as it drew) and wiped off. When the
        frame being written cannot be waited for (the signal came on the thread writing it),
        the line goes below the bars, which are then left where they are, not erased."""
        bars = self._bars
        if bars is None:
            return False
        if not self._lock.acquire(timeout=LOCK_WAIT_SECONDS):
            write_err(text + "\n")
            bars.leave_on_screen()
            return True
        try:
            self.write(bars.finish())
            write_err(text + "\n")
            self.write(bars.redraw(self.clock()))
        finally:
            self._lock.release()
        return True

    def close(self) -> None:
        """Stops the ticker and erases the bars (call once, before the summary)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bars is not None:
            with self._lock:
                self.write(self._bars.finish())

    def __enter__(self) -> ApplyOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------

    def _emit(self, text: str) -> None:
        if text:
            with self._lock:
                self.write(text)

    def _live(self) -> LiveBars:
        if self._bars is None:
            self._bars = LiveBars(
                width=self.width, height=self.height, style=self.style, ascii_only=self.ascii_only
            )
            self._ticker = threading.Thread(target=self._tick, name="batchspec-bars", daemon=True)
            self._ticker.start()
        return self._bars

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            with self._lock:
                assert self._bars is not None
                if frame := self._bars.redraw(self.clock()):
                    self.write(frame)


def _writer(stream: TextIO) -> Callable[[str], None]:
    closed = False

    def write(text: str) -> None:
        nonlocal closed
        if not text or closed:
            return
        try:
            stream.write(text)
            stream.flush()
        except BrokenPipeError:
            closed = True
            _discard(stream)

    return write


def _discard(stream: TextIO) -> None:
    """The reader of ``stream`` has gone (``apply | head``). The run goes on without it:
    stopping at whichever progress line found the pipe closed would leave the submissions
    half made; the run's record is in ``batchspec history``. What is still written to the
    stream (the summary, the buffered rest) goes to the null device."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)
    with contextlib.suppress(OSError):  # stderr gone too: nothing is left to tell
        os.write(
            2,
            b"batchspec: stdout was closed by its reader; the run goes on without it "
            b"(`batchspec history` shows it)\n",
        )
