"""What a run reports while it works: ``Progress`` events for the face to render, sizes in words."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
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
    #: what text output says instead, once per run for all the events carrying the same
    #: words, when the summary at the end names each resource (a replace refused for 200
    #: resources is one line, not 200 hints); NDJSON carries each event as it is
    said_once: str | None = None

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

#: the logger of the local engine (``batchspec.engine``: its worker, its upstream rotation)
ENGINE_LOG = "batchspec.engine"


class _ReportEngineLog(logging.Handler):
    """An engine log record (a warning or worse) as a ``warning`` event, ``source: engine``."""

    def __init__(self, report: Reporter) -> None:
        super().__init__(logging.WARNING)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                err = record.exc_info[1]
                message += f" ({type(err).__name__}: {err})"
            data = {"source": "engine", "level": record.levelname.lower()}
            self.report(Progress("warning", None, f"local engine: {message}", data))
        except Exception:  # a log call must never break the engine's thread
            self.handleError(record)


@contextlib.contextmanager
def engine_log_reported(report: Reporter) -> Iterator[None]:
    """While a run drives the local engine in this process, the engine's warnings and errors
    (Python logging, from its worker thread: an upstream out of rotation, a failed commit)
    are reported as ``warning`` events, so the face shows them as every other warning (a
    line, a line above the bars, an NDJSON object), not bare on stderr in the middle of the
    progress (Python's last-resort handler, with tracebacks). ``report`` is then called from
    that thread too. The engine's INFO lines stay unreported, as they were unshown."""
    log = logging.getLogger(ENGINE_LOG)
    handler = _ReportEngineLog(report)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


_UNITS = ("bytes", "KB", "MB", "GB", "TB")


def format_size(size: int) -> str:
    """``4335`` -> ``"4.3 KB"``; below 1 KB, exact bytes."""
    value = float(size)
    for unit in _UNITS:
        if value < 1000 or unit == _UNITS[-1]:
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
