"""What converting an OpenAI chat request into another dialect's request shares.

``anthropic_lines`` (to Messages params) and ``gemini_lines`` (to a GenerateContentRequest)
read the same chat body: both reject what the target cannot express with ``Unmappable``
(its ``code`` becomes the line's problem code in ``validate``), read text-only content the
same way and quote offending values the same short way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class Unmappable(ValueError):
    """An OpenAI chat request that the target dialect cannot express."""

    def __init__(self, message: str, code: str = "unmappable_parameter") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def plain_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise Unmappable(f"{where}: a {kind!r} part cannot be mapped here, only text")
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    if content is None:
        return ""
    raise Unmappable(f"{where}.content must be a string or a list of parts")


def no_extras(
    message: Mapping[str, Any], where: str, *, allowed: tuple[str, ...], target: str
) -> None:
    """Raise ``Unmappable`` for a set key of ``message`` outside ``allowed``."""
    for key, value in message.items():
        if key not in allowed and value is not None:
            raise Unmappable(f"{where}.{key} has no {target} equivalent")


def short(value: Any) -> str:
    """``value`` as JSON, cut to 60 characters for a message."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:59] + "…"
