"""Compact JSON for the engine's hot path: orjson when installed (the ``fast`` extra), else json.

Both produce one-line UTF-8 JSON without spaces, the form OpenAI's batch output lines use.
orjson rejects NaN/Infinity on output where json would write them; upstream bodies are
parsed JSON, so they never hold those values.
"""

from __future__ import annotations

from typing import Any

try:
    import orjson

    def loads(raw: bytes | bytearray | str) -> Any:
        return orjson.loads(raw)

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

except ImportError:  # pragma: no cover - exercised only without the extra
    import json

    def loads(raw: bytes | bytearray | str) -> Any:
        return json.loads(raw)

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = ["dumps", "loads"]
