"""Where an upstream URL sends its requests, for telling whether two upstreams are one server.

One reading for both sides: ``batchspec serve --upstream`` (``engine.balancer``) refuses a
server named twice, and ``batchspec validate`` (``workspace.project``) refuses the same in a
local provider's ``upstreams:``, at its line, before any apply.
"""

from __future__ import annotations

import difflib
from urllib.parse import urlsplit


def misspells_builtin(text: str) -> bool:
    """Whether ``text`` is ``builtin`` (the offline stand-in) mistyped (``bultin``,
    ``built-in``, ``Builtin``) rather than a host without its scheme: one reading for
    ``batchspec serve --upstream`` and a local provider's ``upstream:`` in batchspec.yaml,
    whose "did you mean 'http://bultin'?" sent the user after a server that is not there."""
    word = text.strip().lower().replace("-", "").replace("_", "")
    if not word or any(c in word for c in ".:/@") or word == "builtin":
        return word == "builtin" and text.strip() != "builtin"
    return difflib.SequenceMatcher(None, word, "builtin").ratio() >= 0.8


def upstream_place(url: str) -> str:
    """Scheme and host in lower case, the default port spelt out, no credentials, no trailing
    slash (``http://GPU1/v1/`` and ``http://gpu1:80/v1`` are one). A URL that cannot be read
    is left as it is (whoever opens it says what is wrong with it)."""
    parts = urlsplit(url.partition("#")[0])
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        return url
    if scheme not in ("http", "https") or not parts.hostname:
        return url
    port = port or (443 if scheme == "https" else 80)
    path = parts.path.rstrip("/")
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{parts.hostname}:{port}{path}{query}"
