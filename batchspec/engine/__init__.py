"""The local batch engine: an OpenAI-compatible Files + Batches API over any upstream.

``Engine`` (``core.py``) is the API, usable in-process; ``create_app`` (``app.py``) serves it
over HTTP and ``serve`` (``server.py``) runs that under uvicorn (``batchspec serve``).
Storage is ``store.py``, execution ``worker.py``, upstreams (an OpenAI-compatible URL, the
offline builtin stand-in, fault injection) ``upstreams.py``, several of them in one rotation
``balancer.py``. The other dialects of
``batchspec serve`` are ``*_routes.py`` (Anthropic, Gemini, Azure, Groq, Together), and
``chat_bridge.py`` runs Anthropic and Gemini request lines on a chat-completions upstream.
"""

from __future__ import annotations

from batchspec.engine.balancer import BalancedUpstream, UpstreamTarget, make_upstreams
from batchspec.engine.core import Engine
from batchspec.engine.errors import EngineError
from batchspec.engine.upstreams import (
    BuiltinUpstream,
    Faults,
    FaultyUpstream,
    HttpUpstream,
    Upstream,
    UpstreamResponse,
    make_upstream,
)

__all__ = [
    "BalancedUpstream",
    "BuiltinUpstream",
    "Engine",
    "EngineError",
    "Faults",
    "FaultyUpstream",
    "HttpUpstream",
    "Upstream",
    "UpstreamResponse",
    "UpstreamTarget",
    "make_upstream",
    "make_upstreams",
]
