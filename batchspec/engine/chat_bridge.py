"""Run another dialect's request lines on an upstream that speaks only chat completions.

The engine's upstreams speak OpenAI. A ``ChatBridge`` wraps one for one dialect (Anthropic
Messages in ``messages_upstream.py``, Gemini GenerateContent in ``gemini_upstream.py``): a
line whose ``url`` is one of the dialect's is converted to a chat completion request, sent as
``/v1/chat/completions``, and the answer converted back; every other line passes through
untouched. A request the dialect's converter rejects is answered 400, and an upstream error
keeps its status, both in the dialect's error envelope.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

from batchspec.engine.upstreams import Upstream, UpstreamResponse

CHAT_URL = "/v1/chat/completions"


class ChatBridge:
    """An ``Upstream`` that also runs one dialect's lines (see the module docstring)."""

    def __init__(
        self,
        inner: Upstream,
        *,
        urls: Collection[str],
        to_chat: Callable[[Any], dict[str, Any]],
        from_chat: Callable[..., dict[str, Any]],
        error_body: Callable[[int, str], dict[str, Any]],
        unsupported: type[Exception],
    ) -> None:
        self.inner = inner
        self.description = inner.description
        self.times_requests: bool = getattr(inner, "times_requests", False)
        self._urls = urls
        self._to_chat = to_chat
        self._from_chat = from_chat
        self._error_body = error_body
        self._unsupported = unsupported

    def __getattr__(self, name: str) -> Any:  # e.g. ``calls`` of the wrapped stand-in
        return getattr(self.inner, name)

    async def send(self, url: str, body: Any, *, custom_id: str, attempt: int) -> UpstreamResponse:
        if url not in self._urls:
            return await self.inner.send(url, body, custom_id=custom_id, attempt=attempt)
        try:
            chat = self._to_chat(body)
        except self._unsupported as err:
            return UpstreamResponse(400, self._error_body(400, str(err)))
        answered = await self.inner.send(CHAT_URL, chat, custom_id=custom_id, attempt=attempt)
        if answered.status_code < 300 and isinstance(answered.body, Mapping):
            converted = self._from_chat(answered.body, model=chat.get("model"))
            return dataclasses.replace(answered, body=converted)
        return dataclasses.replace(
            answered, body=self._error_body(answered.status_code, _error_text(answered.body))
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def _error_text(body: Any) -> str:
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping) and error.get("message"):
        return str(error["message"])
    return body if isinstance(body, str) and body else "The upstream answered with an error."
