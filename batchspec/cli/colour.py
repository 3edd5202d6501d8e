"""Colour for people at a terminal, and none anywhere else.

``colour_wanted(stream, no_color=...)`` decides once per command: colour only when the stream
is a terminal, ``--no-color`` was not given, ``NO_COLOR`` is unset or empty (no-color.org) and
``TERM`` is not ``dumb``. Renderers take a ``Style``: ``PLAIN`` paints nothing, so text for a
pipe, a file or a CI log is byte for byte what it was before colour existed; ``ANSI`` wraps
words in SGR escapes. The palette is small and means the same everywhere:

====================  =========================================================
green                 create / retry (``+``), Synced, Healthy, a finished bar
yellow                refresh (``~``), OutOfSync, Pending, Progressing
red                   prune / cancel (``-``), Degraded, errors, failed counts
magenta               replace (``-/+``), Orphaned
cyan                  collect / restore (``<``), an active bar
dim                   in sync (``=``), Suspended / Missing / Unknown, hints
====================  =========================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

RESET = "\x1b[0m"
_CODES = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
}
_ACTION_COLOURS = {
    "create": "green",
    "retry": "green",
    "refresh": "yellow",
    "collect": "cyan",
    "restore": "cyan",
    "replace": "magenta",
    "prune": "red",
    "cancel": "red",
    "orphaned": "magenta",
    "none": "dim",
}
_STATE_COLOURS = {
    "Synced": "green",
    "OutOfSync": "yellow",
    "Orphaned": "magenta",
    "Healthy": "green",
    "Pending": "yellow",
    "Progressing": "yellow",
    "Degraded": "red",
    "Suspended": "dim",
    "Missing": "dim",
    "Unknown": "dim",
}


def colour_wanted(
    stream: TextIO, *, no_color: bool = False, env: Mapping[str, str] | None = None
) -> bool:
    """True when ``stream`` should get colour: a terminal, and nobody said otherwise."""
    env = os.environ if env is None else env
    if no_color or env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@dataclass(frozen=True)
class Style:
    """Paints words with the palette above, or leaves them alone (``enabled=False``)."""

    enabled: bool

    def paint(self, text: str, *styles: str) -> str:
        if not self.enabled or not styles or not text:
            return text
        codes = ";".join(_CODES[s] for s in styles)
        return f"\x1b[{codes}m{text}{RESET}"

    def action(self, kind: str, text: str) -> str:
        """``text`` (a plan symbol or action name) in the colour of action ``kind``."""
        colour = _ACTION_COLOURS.get(kind)
        return self.paint(text, colour) if colour else text

    def state(self, value: str) -> str:
        """A sync or health value (``Synced``, ``Degraded``, ...) in its colour."""
        colour = _STATE_COLOURS.get(value)
        return self.paint(value, colour) if colour else value

    def bold(self, text: str) -> str:
        return self.paint(text, "bold")

    def dim(self, text: str) -> str:
        return self.paint(text, "dim")

    def error(self, text: str) -> str:
        return self.paint(text, "bold", "red")


PLAIN = Style(enabled=False)
ANSI = Style(enabled=True)


def style_for(stream: TextIO, *, no_color: bool = False) -> Style:
    return ANSI if colour_wanted(stream, no_color=no_color) else PLAIN
