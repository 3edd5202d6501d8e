"""Azure OpenAI's paths on the engine, and a test-only "Azure flavour" of its answers.

``azure_routes(views)`` serves the same Files and Batches views under Azure's two path styles:

- ``/openai/v1/files|batches...`` (Azure's v1 API);
- ``/openai/files|batches...?api-version=...`` (the older, versioned API): a request without
  ``api-version`` is refused with 400, as the query parameter is required there.

Azure's ``api-key`` header is accepted by the app's auth (``app.py``). Azure documents batch
endpoints unversioned (``"endpoint": "/chat/completions"``); a create on these paths
accepts that form and stores the engine's (``/v1/chat/completions``). Request *lines* are run
as they are, so their ``url`` must still be the ``/v1/...`` form the batch's endpoint has.

``AzureFlavour`` is ASGI middleware for tests: on ``/openai/`` paths it rewrites the JSON
answers the way Azure's previews have looked (``Validating``/``InProgress`` statuses,
ISO-8601 timestamps, ``request_counts: null``, unversioned endpoints), so a client's lenient
parsing is exercised against a real server rather than canned responses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchspec.engine.bodies import read_create_body

View = Callable[[Request], Any]
_TIMESTAMPS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def azure_routes(views: Any) -> list[Route]:
    """Routes for Azure's v1 and versioned paths over the app's views (``app._Views``)."""
    routes: list[Route] = []
    for prefix, versioned in (("/openai/v1", False), ("/openai", True)):

        def route(
            path: str, view: View, method: str, prefix: str = prefix, versioned: bool = versioned
        ) -> Route:
            handler = _requiring_api_version(view) if versioned else view
            return Route(prefix + path, handler, methods=[method])

        routes += [
            route("/files", views.create_file, "POST"),
            route("/files", views.list_files, "GET"),
            route("/files/{file_id:str}", views.get_file, "GET"),
            route("/files/{file_id:str}", views.delete_file, "DELETE"),
            route("/files/{file_id:str}/content", views.file_content, "GET"),
            route("/batches", _with_versioned_endpoint(views.create_batch_from), "POST"),
            route("/batches", views.list_batches, "GET"),
            route("/batches/{batch_id:str}", views.get_batch, "GET"),
            route("/batches/{batch_id:str}/cancel", views.cancel_batch, "POST"),
        ]
    return routes


def _requiring_api_version(view: View) -> View:
    async def handler(request: Request) -> Response:
        if not request.query_params.get("api-version"):
            return JSONResponse(
                {
                    "error": {
                        "message": "Missing required query parameter 'api-version' (Azure's "
                        "versioned paths need it, e.g. ?api-version=2024-10-21).",
                        "type": "invalid_request_error",
                        "param": "api-version",
                        "code": "missing_api_version",
                    }
                },
                status_code=400,
            )
        response: Response = await view(request)
        return response

    return handler


def _with_versioned_endpoint(create_from: Callable[[dict[str, Any]], Any]) -> View:
    """The create view, fed a body whose unversioned ``endpoint`` gained its ``/v1``."""

    async def handler(request: Request) -> Response:
        body = await read_create_body(request)
        endpoint = body.get("endpoint")
        if (
            isinstance(endpoint, str)
            and endpoint.startswith("/")
            and not endpoint.startswith("/v1/")
        ):
            body = {**body, "endpoint": "/v1" + endpoint}
        response: Response = await create_from(body)
        return response

    return handler


class AzureFlavour:
    """ASGI middleware (tests): answers on ``/openai/`` paths look like Azure's previews."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/openai/"):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def buffered(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if _is_json(start):
                body = json.dumps(azure_flavoured(json.loads(body))).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, buffered)


def _is_json(start: Message) -> bool:
    return any(
        k == b"content-type" and v.startswith(b"application/json")
        for k, v in start.get("headers", [])
    )


def azure_flavoured(value: Any) -> Any:
    """An OpenAI-shaped answer as Azure's previews wrote it (see the module docstring)."""
    if not isinstance(value, dict):
        return value
    kind = value.get("object")
    if kind == "list":
        return {**value, "data": [azure_flavoured(item) for item in value.get("data") or []]}
    if kind not in ("batch", "file"):
        return value
    out = dict(value)
    for key in _TIMESTAMPS:
        if isinstance(out.get(key), int):
            out[key] = datetime.fromtimestamp(out[key], timezone.utc).isoformat()
    if kind == "batch":
        out["status"] = "".join(part.capitalize() for part in str(out["status"]).split("_"))
        out["request_counts"] = None
        endpoint = out.get("endpoint")
        if isinstance(endpoint, str) and endpoint.startswith("/v1/"):
            out["endpoint"] = endpoint[3:]
    return out
