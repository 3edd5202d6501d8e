"""JSON request bodies read under a size cap, for every route family of ``batchspec serve``.

Starlette's ``request.body()`` buffers whatever the client sends: a 1 GB chunked body to a
create route would sit in memory whole (and its parse several times over). ``read_json``
reads the body chunk by chunk and stops the moment it passes ``limit``: a declared
``Content-Length`` over the cap is refused before a byte is read, a chunked body as soon as
it grows past it. The answer to a body the server did not read to its end carries
``Connection: close`` (added by the app's outer middleware), so the server stops reading
the rest instead of draining it.

Failures are ``EngineError`` (OpenAI's envelope); the Anthropic routes turn them into
Anthropic's. 413 ``request_too_large`` over the cap; 400 for a body that is not JSON,
including one nested too deep to parse (a parser's recursion limit is a client error, not a
server failure).

Caps (bytes):

- ``CREATE_BODY_LIMIT`` (OpenAI and Azure ``POST /batches``): a create holds an input file
  id, an endpoint, a window and at most 16 metadata pairs (64-char keys, 512-char values),
  under 10 KB; 2 MiB leaves room for any client's extras and refuses nothing real.
- Anthropic's inline Message Batches: their documented limit, 256 MB
  (``anthropic_lines.MAX_BATCH_BODY_BYTES``), the size batchspec's own Anthropic provider
  shards to, so anything it (or the official SDK) sends to the real API is accepted here.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from batchspec.engine import jsonfast
from batchspec.engine.errors import EngineError

CREATE_BODY_LIMIT = 2 * 1024 * 1024


def too_large(limit: int) -> EngineError:
    """The 413 for a request body over ``limit`` bytes."""
    return EngineError(
        413,
        f"The request body is too large: the limit is {_size(limit)}.",
        code="request_too_large",
    )


async def read_capped(request: Request, limit: int) -> bytearray:
    """The whole body, read in chunks; ``too_large`` as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return body  # not copied to bytes: a 256 MB body would briefly be there twice


async def read_json(request: Request, limit: int, *, not_json: str) -> Any:
    """The body parsed as JSON under ``limit``; a 400 saying ``not_json`` when it is not JSON."""
    raw = await read_capped(request, limit)
    try:
        return jsonfast.loads(raw) if raw else None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise EngineError(400, not_json) from None


async def read_create_body(request: Request) -> dict[str, Any]:
    """An OpenAI/Azure create's JSON object under ``CREATE_BODY_LIMIT``."""
    body = await read_json(request, CREATE_BODY_LIMIT, not_json=_NOT_A_CREATE)
    if not isinstance(body, dict):
        raise EngineError(400, _NOT_A_CREATE)
    return body


_NOT_A_CREATE = (
    "We could not parse the JSON body of your request: send a JSON object "
    "with input_file_id, endpoint and completion_window."
)


def _size(limit: int) -> str:
    mib = 1024 * 1024
    return f"{limit // mib} MiB" if limit % mib == 0 else f"{limit} bytes"


__all__ = ["CREATE_BODY_LIMIT", "read_capped", "read_create_body", "read_json", "too_large"]
