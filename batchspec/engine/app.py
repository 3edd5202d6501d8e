"""The HTTP face of the engine: OpenAI's Files and Batches API as a Starlette app.

Routes (each also without the ``/v1`` prefix, as LiteLLM and some clients send them)::

    POST   /v1/files                 multipart: file, purpose, expires_after[anchor|seconds]
    GET    /v1/files                 ?purpose=&limit=&order=&after=
    GET    /v1/files/{id}
    GET    /v1/files/{id}/content    raw bytes
    DELETE /v1/files/{id}
    POST   /v1/batches               JSON: input_file_id, endpoint, completion_window, metadata
    GET    /v1/batches               ?after=&limit=
    GET    /v1/batches/{id}
    POST   /v1/batches/{id}/cancel

The same views answer on Azure's paths (``/openai/v1/...`` and ``/openai/...?api-version=``,
``azure_routes.py``) and on Groq's (``/groq/openai/v1/...``, ``groq_routes.py``); Together's
dialect is served under ``/together/v1/...`` (``together_routes.py``), Anthropic's Message
Batches dialect under ``/v1/messages/batches`` (``anthropic_routes.py``, errors in
Anthropic's envelope), Gemini Batch Mode under ``/v1beta/...`` (``gemini_routes.py``,
Google's envelope), and Mistral's batch jobs under ``/v1/batch/jobs`` (``mistral_routes.py``,
beside the shared ``/v1/files``).

Every error is OpenAI's envelope ``{"error": {message, type, param, code}}``: 400 bad request,
401 missing or wrong key, 404 unknown id or route, 405, 409 not cancellable, 413 upload over
the cap, 422 endpoint the engine cannot run. With an API key, every request needs
``Authorization: Bearer <key>`` (or Azure's ``api-key: <key>``, Anthropic's
``x-api-key: <key>``, Google's ``x-goog-api-key: <key>``; a Gemini upload session's URL is
its own credential, as Google's is); the key is never logged.
Engine calls that touch SQLite run in the thread pool, so the event loop stays responsive.
"""

from __future__ import annotations

import hmac
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchspec.engine.anthropic_routes import anthropic_routes
from batchspec.engine.api_faults import ApiFaults, RateLimitFaults
from batchspec.engine.azure_routes import azure_routes
from batchspec.engine.bodies import read_create_body
from batchspec.engine.core import Engine
from batchspec.engine.errors import EngineError, bad_request, file_too_large
from batchspec.engine.gemini_routes import gemini_routes
from batchspec.engine.gemini_upstream import error_body as google_error_body
from batchspec.engine.groq_routes import groq_routes
from batchspec.engine.messages_upstream import error_body
from batchspec.engine.mistral_routes import mistral_routes
from batchspec.engine.together_routes import UPLOAD_PREFIX, together_routes
from batchspec.engine.uploads import read_upload
from batchspec.engine.upstreams import BATCH_API_HEADER, SUPPORTED_ENDPOINTS

#: Bytes of multipart framing allowed on top of the file cap before a Content-Length is refused.
MULTIPART_SLACK = 1024 * 1024


def create_app(
    engine: Engine, *, api_key: str | None = None, api_faults: ApiFaults | None = None
) -> Starlette:
    """An ASGI app serving ``engine``; pass ``api_key`` to require it on every request, and
    ``api_faults`` to answer some requests 429 (tests: ``api_faults``)."""
    views = _Views(engine)
    routes: list[Route] = []
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/files", views.create_file, methods=["POST"]),
            Route(f"{prefix}/files", views.list_files, methods=["GET"]),
            Route(f"{prefix}/files/{{file_id:str}}", views.get_file, methods=["GET"]),
            Route(f"{prefix}/files/{{file_id:str}}", views.delete_file, methods=["DELETE"]),
            Route(f"{prefix}/files/{{file_id:str}}/content", views.file_content, methods=["GET"]),
            Route(f"{prefix}/batches", views.create_batch, methods=["POST"]),
            Route(f"{prefix}/batches", views.list_batches, methods=["GET"]),
            Route(f"{prefix}/batches/{{batch_id:str}}", views.get_batch, methods=["GET"]),
            Route(
                f"{prefix}/batches/{{batch_id:str}}/cancel", views.cancel_batch, methods=["POST"]
            ),
        ]
    routes += azure_routes(views)
    routes += groq_routes(views, engine, read_create_body)
    routes += together_routes(engine, read_create_body)
    routes += anthropic_routes(engine)
    routes += gemini_routes(engine)
    routes += mistral_routes(engine)
    app = Starlette(
        routes=routes,
        exception_handlers={EngineError: _engine_error, HTTPException: _http_error},
    )
    app.state.engine = engine
    app.add_middleware(_RequestIdAndAuth, api_key=api_key)
    if api_faults is not None:
        app.add_middleware(RateLimitFaults, faults=api_faults)
    return app


def error_response(
    status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type, "param": None, "code": code}},
        status_code=status,
    )


async def _engine_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    return JSONResponse(exc.envelope(), status_code=exc.status)


#: what a model server answers and this Batch API does not: a request for one of them here
#: is almost always an engine whose --upstream points at a `batchspec serve`
_MODEL_ENDPOINTS = tuple(e.removeprefix("/v1") for e in SUPPORTED_ENDPOINTS if e.startswith("/v1/"))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"Unknown request URL: {request.method} {request.url.path}."}.get(
        exc.status_code, str(exc.detail)
    )
    if exc.status_code == 404 and request.url.path.rstrip("/").endswith(_MODEL_ENDPOINTS):
        message += (  # short enough that a status's "first error" shows the advice whole
            " This is `batchspec serve`, not a model server: point the upstream that sent"
            " this at one (vLLM, Ollama, llama.cpp, ...) or at 'builtin'."
        )
        response = error_response(exc.status_code, message)
        response.headers[BATCH_API_HEADER] = "1"  # an engine in front of it: not a model
        return response
    return error_response(exc.status_code, message)


class _Views:
    """The route handlers; each parses the request and makes one engine call."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def create_file(self, request: Request) -> Response:
        length = request.headers.get("content-length")
        if (
            length
            and length.isdigit()
            and int(length) > self.engine.max_upload_bytes + MULTIPART_SLACK
        ):
            raise file_too_large(self.engine.max_upload_bytes)
        upload = await read_upload(
            request.headers.get("content-type", ""), request.stream(), self.engine.open_upload
        )
        try:
            if upload.file is None:
                raise bad_request("The upload has no file part ('file').", param="file")
            purpose = upload.fields.get("purpose")
            if not purpose:
                raise bad_request("'purpose' is required (e.g. 'batch').", param="purpose")
            expires = _expires_after_seconds(upload.fields)
        except BaseException:
            upload.discard()
            raise
        created = await run_in_threadpool(
            self.engine.register_upload,
            upload.file,
            upload.filename or "upload.jsonl",
            purpose,
            expires_after_seconds=expires,
        )
        return JSONResponse(created)

    async def list_files(self, request: Request) -> Response:
        params = request.query_params
        listing = await run_in_threadpool(
            self.engine.list_files,
            purpose=params.get("purpose") or None,
            limit=_int_param(params.get("limit"), "limit", 10_000),
            after=params.get("after") or None,
            order=params.get("order") or "desc",
        )
        return JSONResponse(listing)

    async def get_file(self, request: Request) -> Response:
        return JSONResponse(
            await run_in_threadpool(self.engine.get_file, request.path_params["file_id"])
        )

    async def delete_file(self, request: Request) -> Response:
        return JSONResponse(
            await run_in_threadpool(self.engine.delete_file, request.path_params["file_id"])
        )

    async def file_content(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        path = await run_in_threadpool(self.engine.file_content_path, file_id)
        return FileResponse(path, media_type="application/octet-stream")

    async def create_batch(self, request: Request) -> Response:
        return await self.create_batch_from(await read_create_body(request))

    async def create_batch_from(self, body: dict[str, Any]) -> Response:
        """The create view once its body is read (Azure's paths rewrite it first)."""
        created = await run_in_threadpool(
            self.engine.create_batch,
            body.get("input_file_id"),
            body.get("endpoint"),
            body.get("completion_window"),
            body.get("metadata"),
            body.get("output_expires_after"),
        )
        return JSONResponse(created)

    async def list_batches(self, request: Request) -> Response:
        params = request.query_params
        listing = await run_in_threadpool(
            self.engine.list_batches,
            after=params.get("after") or None,
            limit=_int_param(params.get("limit"), "limit", 20),
        )
        return JSONResponse(listing)

    async def get_batch(self, request: Request) -> Response:
        return JSONResponse(
            await run_in_threadpool(self.engine.get_batch, request.path_params["batch_id"])
        )

    async def cancel_batch(self, request: Request) -> Response:
        return JSONResponse(
            await run_in_threadpool(self.engine.cancel_batch, request.path_params["batch_id"])
        )


def _int_param(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"{name} must be an integer.", param=name) from None


def _expires_after_seconds(fields: dict[str, str]) -> int | None:
    seconds = fields.get("expires_after[seconds]") or fields.get("expires_after.seconds")
    anchor = fields.get("expires_after[anchor]") or fields.get("expires_after.anchor")
    if seconds is None and anchor is None:
        return None
    if anchor not in (None, "created_at"):
        raise bad_request("expires_after[anchor] must be 'created_at'.", param="expires_after")
    try:
        return int(seconds or "")
    except ValueError:
        raise bad_request(
            "expires_after[seconds] must be an integer.", param="expires_after"
        ) from None


class _RequestIdAndAuth:
    """Pure ASGI middleware: an ``x-request-id`` on every answer, and the API key check.

    An answer sent before the request body was read to its end (a refused key, a body over
    its cap) says ``Connection: close``, so the server drops the connection rather than read
    and discard the rest of a body that may be gigabytes long.
    """

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req_{uuid.uuid4().hex}".encode()
        body_read = not _has_body(scope)

        async def receive_tracked() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read = True
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-request-id", request_id)]
                if not body_read:
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            await send(message)

        # a presigned upload URL (Together's dialect) carries its own secret token, no key
        presigned = scope["path"].startswith(UPLOAD_PREFIX)
        if self._key is not None and not presigned and not self._authorised(scope):
            response = _unauthorised(scope["path"])
            await response(scope, receive_tracked, send_with_id)
            return
        await self.app(scope, receive_tracked, send_with_id)

    def _authorised(self, scope: Scope) -> bool:
        assert self._key is not None
        if scope["path"] == GEMINI_UPLOAD_PATH and b"upload_id=" in scope["query_string"]:
            return True  # the session id is the credential; the route checks it
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                candidate = value[7:].strip()
            elif name in (b"api-key", b"x-api-key", b"x-goog-api-key"):
                candidate = value.strip()
            else:
                continue
            if hmac.compare_digest(candidate, self._key):
                return True
        return False


GEMINI_UPLOAD_PATH = "/upload/v1beta/files"


def _unauthorised(path: str) -> JSONResponse:
    """The 401 in the envelope of the API the path belongs to."""
    if path.startswith("/v1/messages"):
        return JSONResponse(error_body(401, "invalid x-api-key"), status_code=401)
    if path.startswith(("/v1beta/", "/upload/v1beta/", "/download/v1beta/")):
        message = "API key not valid. Please pass a valid API key (x-goog-api-key)."
        return JSONResponse(google_error_body(401, message), status_code=401)
    return error_response(
        401,
        "Missing or incorrect API key. Send it as 'Authorization: Bearer <key>'.",
        code="invalid_api_key",
    )


def _has_body(scope: Scope) -> bool:
    """Whether the request announces a body (chunked, or a non-zero Content-Length)."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
    return False
