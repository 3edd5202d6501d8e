"""Together's batch dialect on the engine, under ``/together/v1``.

The official SDK reaches it as ``Together(base_url="http://HOST/together")``.

Together's API is "loosely OpenAI-compatible"; these routes answer the way its docs and its
official ``together`` SDK (3.x) expect::

    POST /together/v1/files               form: purpose=batch-api, file_name, file_type, checksum
                                          -> 302, Location: <upload URL>, X-Together-File-Id
    PUT  /together/uploads/{token}        the bytes (a presigned URL: no API key; the token is it)
    POST /together/v1/files/{id}/preprocess   -> FileResponse once the bytes are stored
    GET  /together/v1/files[/{id}[/content]]
    POST /together/v1/batches             {endpoint, input_file_id, completion_window?, model_id?}
                                          -> {"job": BatchJob, "warning": null}
    GET  /together/v1/batches             -> a bare JSON array of BatchJob
    GET  /together/v1/batches/{id}        -> BatchJob
    POST /together/v1/batches/{id}/cancel -> BatchJob

Differences from OpenAI kept as Together has them: upper-case statuses (``VALIDATING``,
``IN_PROGRESS``, ``COMPLETED``, ``FAILED``, ``EXPIRED``, ``CANCELLED``; the engine's
``finalizing`` and ``cancelling`` read ``IN_PROGRESS``), ISO-8601 timestamps, ``progress``
0-100 instead of counts, no metadata, file purpose ``batch-api`` (the only purpose kept here),
and input lines ``{"custom_id", "body"}`` without ``method``/``url``. A create converts those
lines into the engine's own (``method: POST``, ``url`` = the batch endpoint) as a new file and
remembers the file the client named, so a job reports the ``input_file_id`` it was given.

An upload announced but never PUT is forgotten when the process stops (the client starts
again); the checksum, when sent, must be the sha256 of the bytes (400 otherwise).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from batchspec.engine.core import Engine
from batchspec.engine.errors import EngineError, bad_request, not_found
from batchspec.engine.store import new_id

PREFIX = "/together/v1"
#: the path of presigned upload URLs: the app lets these through without an API key
UPLOAD_PREFIX = "/together/uploads/"
PURPOSES = ("fine-tune", "batch-api", "eval", "calibration")
#: the metadata key under which a converted batch remembers the file the client named
INPUT_KEY = "together_input_file_id"
_STATUS = {"finalizing": "IN_PROGRESS", "cancelling": "IN_PROGRESS"}
_CHUNK = 1024 * 1024

JsonBody = Callable[[Request], Awaitable[dict[str, Any]]]


def together_routes(engine: Engine, json_body: JsonBody) -> list[Route]:
    """Together's routes over ``engine``; ``json_body`` parses a JSON object body (400 else)."""
    dialect = _Together(engine, json_body)
    return [
        Route(f"{PREFIX}/files", dialect.announce_upload, methods=["POST"]),
        Route(f"{UPLOAD_PREFIX}{{token:str}}", dialect.receive_upload, methods=["PUT"]),
        Route(f"{PREFIX}/files/{{file_id:str}}/preprocess", dialect.preprocess, methods=["POST"]),
        Route(f"{PREFIX}/files", dialect.list_files, methods=["GET"]),
        Route(f"{PREFIX}/files/{{file_id:str}}", dialect.get_file, methods=["GET"]),
        Route(f"{PREFIX}/files/{{file_id:str}}/content", dialect.file_content, methods=["GET"]),
        Route(f"{PREFIX}/batches", dialect.create_batch, methods=["POST"]),
        Route(f"{PREFIX}/batches", dialect.list_batches, methods=["GET"]),
        Route(f"{PREFIX}/batches/{{batch_id:str}}", dialect.get_batch, methods=["GET"]),
        Route(f"{PREFIX}/batches/{{batch_id:str}}/cancel", dialect.cancel_batch, methods=["POST"]),
    ]


class _Together:
    def __init__(self, engine: Engine, json_body: JsonBody) -> None:
        self.engine = engine
        self.json_body = json_body
        self.pending: dict[str, dict[str, str]] = {}  # upload token -> announced file

    # -- files -------------------------------------------------------------------------------

    async def announce_upload(self, request: Request) -> Response:
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        purpose = fields.get("purpose", "")
        if purpose not in PURPOSES:
            raise bad_request(f"Invalid purpose {purpose!r}: use one of {', '.join(PURPOSES)}.")
        if purpose != "batch-api":
            raise bad_request("This server keeps batch-api files only.", param="purpose")
        if not fields.get("file_name"):
            raise bad_request("file_name is required.", param="file_name")
        token = secrets.token_urlsafe(24)
        file_id = new_id("file-")
        self.pending[token] = {**fields, "id": file_id}
        location = str(request.base_url).rstrip("/") + UPLOAD_PREFIX + token
        return Response(
            status_code=302, headers={"Location": location, "X-Together-File-Id": file_id}
        )

    async def receive_upload(self, request: Request) -> Response:
        announced = self.pending.pop(request.path_params["token"], None)
        if announced is None:
            raise EngineError(403, "This upload URL is unknown or was already used.")
        writer = self.engine.open_upload()
        digest = hashlib.sha256()
        try:
            async for chunk in request.stream():
                digest.update(chunk)
                await run_in_threadpool(writer.write, chunk)
            checksum = announced.get("checksum")
            if checksum and checksum.lower() != digest.hexdigest():
                raise bad_request("The bytes do not match the announced checksum.")
        except BaseException:
            writer.discard()
            raise
        await run_in_threadpool(
            lambda: self.engine.register_upload(
                writer, announced["file_name"], "batch", file_id=announced["id"]
            )
        )
        return Response(status_code=200)

    async def preprocess(self, request: Request) -> Response:
        return await self.get_file(request)

    async def get_file(self, request: Request) -> Response:
        found = await run_in_threadpool(self.engine.get_file, request.path_params["file_id"])
        return JSONResponse(together_file(found))

    async def list_files(self, request: Request) -> Response:
        listing = await run_in_threadpool(self.engine.list_files, "batch")
        return JSONResponse({"object": "list", "data": [together_file(f) for f in listing["data"]]})

    async def file_content(self, request: Request) -> Response:
        path = await run_in_threadpool(
            self.engine.file_content_path, request.path_params["file_id"]
        )
        return FileResponse(path, media_type="application/octet-stream")

    # -- batches -----------------------------------------------------------------------------

    async def create_batch(self, request: Request) -> Response:
        body = await self.json_body(request)
        input_file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise bad_request("input_file_id is required.", param="input_file_id")
        if not isinstance(endpoint, str) or not endpoint:
            raise bad_request("endpoint is required.", param="endpoint")
        created = await run_in_threadpool(self._create, input_file_id, endpoint)
        return JSONResponse({"job": together_job(created), "warning": None})

    def _create(self, input_file_id: str, endpoint: str) -> dict[str, Any]:
        source = self.engine.file_content_path(input_file_id)
        original = self.engine.get_file(input_file_id)
        writer = self.engine.open_upload()
        try:
            with open(source, "rb") as lines:
                for number, raw in enumerate(lines, start=1):
                    if raw.strip():
                        writer.write(_engine_line(raw, endpoint, number))
        except BaseException:
            writer.discard()
            raise
        converted = self.engine.register_upload(writer, original["filename"], "batch")
        return self.engine.create_batch(
            converted["id"], endpoint, "24h", {INPUT_KEY: input_file_id}
        )

    async def list_batches(self, request: Request) -> Response:
        listing = await run_in_threadpool(self.engine.list_batches, None, 100)
        return JSONResponse([together_job(b) for b in listing["data"]])

    async def get_batch(self, request: Request) -> Response:
        found = await run_in_threadpool(self.engine.get_batch, request.path_params["batch_id"])
        return JSONResponse(together_job(found))

    async def cancel_batch(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        try:
            found = await run_in_threadpool(self.engine.cancel_batch, batch_id)
        except EngineError as err:
            if err.status != 409:
                raise
            found = await run_in_threadpool(self.engine.get_batch, batch_id)
        return JSONResponse(together_job(found))


def _engine_line(raw: bytes, endpoint: str, number: int) -> bytes:
    """A Together line ``{custom_id, body}`` as an engine line (``method``, ``url`` added)."""
    try:
        line = json.loads(raw)
    except ValueError:
        line = None
    if not isinstance(line, dict) or "custom_id" not in line or "body" not in line:
        raise bad_request(f"Line {number} is not a JSON object with custom_id and body.")
    engine_line = {"custom_id": line["custom_id"], "method": "POST", "url": endpoint}
    return (json.dumps({**engine_line, "body": line["body"]}) + "\n").encode()


def _iso(value: Any) -> str | None:
    if not isinstance(value, int):
        return None
    return datetime.fromtimestamp(value, timezone.utc).isoformat().replace("+00:00", "Z")


def together_file(found: dict[str, Any]) -> dict[str, Any]:
    """An engine FileObject as Together's FileResponse."""
    if found.get("purpose") not in ("batch", "batch_output"):
        raise not_found("file", found["id"])
    return {
        "id": found["id"],
        "object": "file",
        "bytes": found["bytes"],
        "created_at": found["created_at"],
        "filename": found["filename"],
        "FileType": "jsonl",
        "purpose": "batch-api",
        "processing_status": "COMPLETED",
    }


def together_job(batch: dict[str, Any]) -> dict[str, Any]:
    """An engine batch as Together's BatchJob (see the module docstring)."""
    counts = batch.get("request_counts") or {}
    total = counts.get("total") or 0
    done = (counts.get("completed") or 0) + (counts.get("failed") or 0)
    errors = (batch.get("errors") or {}).get("data") or []
    metadata = batch.get("metadata") or {}
    status = str(batch["status"])
    return {
        "id": batch["id"],
        "user_id": "local",
        "input_file_id": metadata.get(INPUT_KEY, batch["input_file_id"]),
        "file_size_bytes": None,
        "status": _STATUS.get(status, status.upper()),
        "job_deadline": _iso(batch.get("expires_at")),
        "created_at": _iso(batch.get("created_at")),
        "completed_at": _iso(
            batch.get("completed_at")
            or batch.get("failed_at")
            or batch.get("expired_at")
            or batch.get("cancelled_at")
        ),
        "endpoint": batch["endpoint"],
        "progress": round(100.0 * done / total, 1) if total else 0.0,
        "model_id": batch.get("model"),
        "output_file_id": batch.get("output_file_id"),
        "error_file_id": batch.get("error_file_id"),
        "error": "; ".join(str(e.get("message")) for e in errors) or None,
    }
