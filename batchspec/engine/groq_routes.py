"""Groq's dialect on the engine: OpenAI's Files and Batches API under ``/groq/openai/v1``.

Groq's batch API is OpenAI's, served under ``https://api.groq.com/openai/v1``; the official
``groq`` SDK appends ``/openai/v1`` to its base URL, so ``Groq(base_url="http://HOST/groq")``
talks to these routes. They are the app's own views with one difference, as Groq documents:
a create accepts a ``completion_window`` from ``24h`` to ``7d`` (``core.GROQ_WINDOWS``), and
the batch's deadline is that long. Keys are ``Authorization: Bearer``, as on ``/v1``.

The prefix keeps the dialects apart: ``/v1`` stays as strict as OpenAI (``24h`` only), so a
client that would send Groq's windows to OpenAI is still refused there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchspec.engine.core import GROQ_WINDOWS, Engine

PREFIX = "/groq/openai/v1"


def groq_routes(
    views: Any, engine: Engine, json_body: Callable[[Request], Awaitable[dict[str, Any]]]
) -> list[Route]:
    """Routes under ``PREFIX`` over the app's views (``app._Views``); create takes Groq's
    windows. ``json_body`` is the app's parser of a JSON object body (400 otherwise)."""

    async def create_batch(request: Request) -> Response:
        body = await json_body(request)
        created = await run_in_threadpool(
            lambda: engine.create_batch(
                body.get("input_file_id"),
                body.get("endpoint"),
                body.get("completion_window"),
                body.get("metadata"),
                body.get("output_expires_after"),
                windows=GROQ_WINDOWS,
            )
        )
        return JSONResponse(created)

    return [
        Route(f"{PREFIX}/files", views.create_file, methods=["POST"]),
        Route(f"{PREFIX}/files", views.list_files, methods=["GET"]),
        Route(f"{PREFIX}/files/{{file_id:str}}", views.get_file, methods=["GET"]),
        Route(f"{PREFIX}/files/{{file_id:str}}", views.delete_file, methods=["DELETE"]),
        Route(f"{PREFIX}/files/{{file_id:str}}/content", views.file_content, methods=["GET"]),
        Route(f"{PREFIX}/batches", create_batch, methods=["POST"]),
        Route(f"{PREFIX}/batches", views.list_batches, methods=["GET"]),
        Route(f"{PREFIX}/batches/{{batch_id:str}}", views.get_batch, methods=["GET"]),
        Route(f"{PREFIX}/batches/{{batch_id:str}}/cancel", views.cancel_batch, methods=["POST"]),
    ]
