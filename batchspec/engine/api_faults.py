"""Fault injection at the HTTP API itself (``batchspec serve --fault-api-429-from``): rate limits.

The upstream faults (``upstreams.Faults``) make the *engine's* model calls fail; these make the
*API* refuse its clients, as a provider's rate limiter does. ``ApiFaults(start, count)``
answers the API requests numbered ``start`` to ``start + count - 1`` (1-based, in the order
they arrive, every route counted) with HTTP 429, OpenAI's ``rate_limit_exceeded`` envelope and
``Retry-After`` / ``retry-after-ms`` headers, without the engine seeing them; every other
request goes through. So a test can watch a client slow down when refused and speed up again.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send


@dataclass(frozen=True)
class ApiFaults:
    """Refuse requests ``start`` .. ``start + count - 1`` with 429 (``retry_after`` seconds)."""

    start: int
    count: int
    retry_after: float = 0.05


class RateLimitFaults:
    """Pure ASGI middleware applying ``ApiFaults``; ``refused`` counts the 429s it sent."""

    def __init__(self, app: ASGIApp, faults: ApiFaults) -> None:
        self.app = app
        self.faults = faults
        self.seen = 0
        self.refused = 0
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self._lock:
            self.seen += 1
            first = self.faults.start
            refuse = first <= self.seen < first + self.faults.count
            self.refused += refuse
        if not refuse:
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {
                "error": {
                    "message": "Injected fault: rate limit reached for requests.",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
        ).encode()
        retry_after = self.faults.retry_after
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(max(1, round(retry_after))).encode()),
            (b"retry-after-ms", str(int(retry_after * 1000)).encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
