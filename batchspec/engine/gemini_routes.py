"""Gemini Batch Mode on the engine: a dialect of ``batchspec serve`` for the ``google-genai`` SDK.

Routes (key as ``x-goog-api-key`` when the server has one; an upload session's URL carries
its own unguessable id instead, as Google's does)::

    POST   /v1beta/models/{model}:batchGenerateContent   {"batch": {displayName, inputConfig}}
    GET    /v1beta/batches                               ?pageSize=&pageToken=
    GET    /v1beta/batches/{id}
    POST   /v1beta/batches/{id}:cancel
    DELETE /v1beta/batches/{id}                          only once done
    POST   /upload/v1beta/files                          resumable: start, then upload/finalize
    GET    /v1beta/files                                 ?pageSize=&pageToken=
    GET    /v1beta/files/{id}
    GET    /v1beta/files/{id}:download?alt=media         (also under /download/v1beta/...)
    DELETE /v1beta/files/{id}

A Gemini batch *is* an engine batch: its requests (inline ``inputConfig.requests.requests``
or the ``{"key", "request"}`` lines of an uploaded ``inputConfig.fileName``) are stored as
a batch input file of ``{"custom_id": key, "method": "POST", "url":
"/v1beta/generateContent", "body": request + model}`` lines and run by the worker like any
other batch, through ``GeminiUpstream`` (``gemini_upstream.py``). An inline request without
``metadata.key`` is keyed ``request-<n>``; its metadata is echoed with its response. The name
is the engine's id with another prefix (``batches/<hex>`` is ``batch_<hex>``; a file
``files/<id>`` is the engine's ``<id>``). The list shows Gemini batches only, newest first.

The object is an Operation ``{name, metadata: GenerateContentBatch, done}``: ``state``
``BATCH_STATE_PENDING`` (validating), ``RUNNING`` (in progress, finalizing, cancelling),
``SUCCEEDED``, ``FAILED`` (the requests were refused: ``error`` says why), ``CANCELLED``,
``EXPIRED``; ``batchStats`` counts as int64 strings; once done (and not failed),
``output.inlinedResponses.inlinedResponses`` (inline input, in request order) or
``output.responsesFile`` (file input: ``files/results-<hex>``, generated from the engine's
result files when read, lines ``{"key", "response"}`` / ``{"key", "error"}``). An error is a
``google.rpc.Status``: the gRPC code of the upstream's HTTP status; requests a cancel or an
expiry left unrun are ``CANCELLED`` / ``DEADLINE_EXCEEDED`` with ``details``
``["BATCH_CANCELLED"]`` / ``["BATCH_EXPIRED"]`` (strings: the SDK types ``details`` so).

Creates are checked as Gemini checks them: at least one request, each with non-empty
``contents``, unique keys; an inline create body over 20 MB (Gemini's limit) is refused
with 400 before it is read whole. Errors use Google's envelope ``{"error": {code, message,
status}}``. Upload sessions live in memory: a restart forgets unfinished ones.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import secrets
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from batchspec.engine.bodies import read_capped, read_json
from batchspec.engine.core import Engine
from batchspec.engine.errors import EngineError
from batchspec.engine.gemini_upstream import camel_keys, error_body
from batchspec.engine.objects import batch_object
from batchspec.storage.blobstore import BlobWriter
from batchspec.wire.gemini_lines import (
    GENERATE_CONTENT_ENDPOINT,
    MAX_INLINE_BYTES,
    REASON_CANCELLED,
    REASON_EXPIRED,
    status_for_http,
)
from batchspec.wire.inputs import iter_requests

API = "/v1beta"
BATCH_PREFIX = "batches/"
ENGINE_BATCH_PREFIX = "batch_"
FILE_PREFIX = "files/"
RESULTS_PREFIX = "results-"
BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch"
#: engine batch metadata keys (the Gemini batch's own fields)
META_DISPLAY_NAME = "gemini_display_name"
META_MODEL = "gemini_model"
META_SOURCE = "gemini_source"
META_REQUESTS = "gemini_requests"
_ACTIVE = {
    "validating": "BATCH_STATE_PENDING",
    "in_progress": "BATCH_STATE_RUNNING",
    "finalizing": "BATCH_STATE_RUNNING",
    "cancelling": "BATCH_STATE_RUNNING",
}
_DONE = {
    "completed": "BATCH_STATE_SUCCEEDED",
    "failed": "BATCH_STATE_FAILED",
    "cancelled": "BATCH_STATE_CANCELLED",
    "expired": "BATCH_STATE_EXPIRED",
}
_MAX_DISPLAY_NAME = 512  # the engine keeps it as a metadata value


class GeminiError(Exception):
    """A refused Gemini call: HTTP status and message (Google's envelope)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.status, self.message), status_code=self.status)


def gemini_routes(engine: Engine) -> list[Route]:
    """The Gemini Batch Mode routes over ``engine`` (see the module docstring)."""
    batches = GeminiBatches(engine)
    files = GeminiFiles(engine)
    return [
        Route(
            f"{API}/models/{{model:str}}:batchGenerateContent",
            _view(batches.create_view),
            methods=["POST"],
        ),
        Route(f"{API}/batches", _view(batches.list_view), methods=["GET"]),
        Route(
            f"{API}/batches/{{name:str}}",
            _view(batches.one_view),
            methods=["GET", "POST", "DELETE"],
        ),
        Route(f"/upload{API}/files", _view(files.upload_view), methods=["POST"]),
        Route(f"{API}/files", _view(files.list_view), methods=["GET"]),
        Route(f"{API}/files/{{name:str}}", _view(files.one_view), methods=["GET", "DELETE"]),
        Route(f"/download{API}/files/{{name:str}}", _view(files.one_view), methods=["GET"]),
    ]


def _view(handler: Any) -> Any:
    """Answer every failure in Google's envelope."""

    async def view(request: Request) -> Response:
        try:
            response: Response = await handler(request)
            return response
        except GeminiError as err:
            return err.response()
        except EngineError as err:
            return GeminiError(err.status, err.message).response()

    return view


# ---------------------------------------------------------------------------------------------
# Batches


class GeminiBatches:
    """The batch routes over one engine; views parse the request and call one method."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- views -----------------------------------------------------------------------------

    async def create_view(self, request: Request) -> Response:
        body = await read_json(request, MAX_INLINE_BYTES, not_json="Invalid JSON payload received.")
        created = await run_in_threadpool(self.create, request.path_params["model"], body)
        return JSONResponse(self.render(created))

    async def list_view(self, request: Request) -> Response:
        params = request.query_params
        page = await run_in_threadpool(
            self.list, _page_size(params.get("pageSize")), params.get("pageToken") or None
        )
        return JSONResponse(page)

    async def one_view(self, request: Request) -> Response:
        name = request.path_params["name"]
        if request.method == "POST":
            batch_id, _, verb = name.partition(":")
            if verb != "cancel":
                raise GeminiError(404, f"Unknown method :{verb} on batches/{batch_id}.")
            await run_in_threadpool(self.cancel, batch_id)
            return JSONResponse({})
        if request.method == "DELETE":
            await run_in_threadpool(self.delete, name)
            return JSONResponse({})
        batch = await run_in_threadpool(self.get, name)
        return JSONResponse(await run_in_threadpool(self.render, batch))

    # -- the API, in-process ---------------------------------------------------------------

    def create(self, model: str, body: Any) -> dict[str, Any]:
        """Store the requests as a batch input file and create an engine batch from it."""
        batch = camel_keys(body.get("batch", body)) if isinstance(body, Mapping) else None
        if not isinstance(batch, Mapping):
            raise GeminiError(400, "batch: an object with inputConfig is required.")
        display_name = str(batch.get("displayName") or "")
        if len(display_name) > _MAX_DISPLAY_NAME:
            raise GeminiError(400, f"batch.displayName: at most {_MAX_DISPLAY_NAME} characters.")
        source = camel_keys(batch.get("inputConfig"))
        if not isinstance(source, Mapping):
            raise GeminiError(400, "batch.inputConfig: fileName or requests is required.")
        model = model.removeprefix("models/")
        if "requests" in source and "fileName" not in source:
            kind, lines = "inline", self._inline_lines(source["requests"], model)
        elif "fileName" in source and "requests" not in source:
            kind, lines = "file", self._file_lines(str(source["fileName"]), model)
        else:
            raise GeminiError(400, "batch.inputConfig: set exactly one of fileName and requests.")
        writer = self.engine.open_upload()
        count = 0
        try:
            for line in lines:
                writer.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
                count += 1
        except BaseException:
            writer.discard()
            raise
        stored = self.engine.register_upload(writer, "gemini_batch_requests.jsonl", "batch")
        metadata = {
            META_DISPLAY_NAME: display_name,
            META_MODEL: model,
            META_SOURCE: kind,
            META_REQUESTS: str(count),
        }
        return self.engine.create_batch(stored["id"], GENERATE_CONTENT_ENDPOINT, "24h", metadata)

    def get(self, name: str) -> dict[str, Any]:
        batch = self.engine.get_batch(self._engine_id(name))
        if batch["endpoint"] != GENERATE_CONTENT_ENDPOINT:
            raise GeminiError(404, f"Batch batches/{name.removeprefix(BATCH_PREFIX)} not found.")
        return batch

    def list(self, page_size: int, token: str | None) -> dict[str, Any]:
        """Gemini batches newest first; the page token is the last name of the page before."""
        store = self.engine.store
        args: list[Any] = [GENERATE_CONTENT_ENDPOINT]
        where = "endpoint = ?"
        if token is not None:
            seq = store.seq_of("batches", self._engine_id(token))
            if seq is None:
                raise GeminiError(400, f"Invalid page token {token!r}.")
            where += " AND seq < ?"
            args.append(seq)
        rows = store.db.execute(
            f"SELECT * FROM batches WHERE {where} ORDER BY seq DESC LIMIT ?",
            (*args, page_size + 1),
        ).fetchall()
        page = [self.render(batch_object(row)) for row in rows[:page_size]]
        answer: dict[str, Any] = {"operations": page}
        if len(rows) > page_size:
            answer["nextPageToken"] = page[-1]["name"]
        return answer

    def cancel(self, name: str) -> None:
        batch = self.get(name)
        try:
            self.engine.cancel_batch(batch["id"])
        except EngineError as err:
            if err.status != 409:  # finalizing or done: nothing left to cancel
                raise

    def delete(self, name: str) -> None:
        batch = self.get(name)
        if batch["status"] in _ACTIVE:
            raise GeminiError(400, "A batch can be deleted only once it is done; cancel it first.")
        with self.engine.store.write() as db:
            db.execute("DELETE FROM results WHERE batch_id = ?", (batch["id"],))
            db.execute("DELETE FROM batches WHERE id = ?", (batch["id"],))
        for file_id in (batch["output_file_id"], batch["error_file_id"], batch["input_file_id"]):
            if file_id:
                with contextlib.suppress(EngineError):  # already gone
                    self.engine.delete_file(file_id)

    # -- rendering -------------------------------------------------------------------------

    def render(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The Operation for an engine batch (see the module docstring)."""
        status = batch["status"]
        metadata = batch.get("metadata") or {}
        counts = batch["request_counts"]
        total = counts["total"] or int(metadata.get(META_REQUESTS) or 0)
        done = status in _DONE
        ended = next(
            (
                batch[key]
                for key in ("completed_at", "cancelled_at", "expired_at", "failed_at")
                if batch.get(key)
            ),
            None,
        )
        stamps = [batch["created_at"], *(batch.get(k) for k in _STAMPS)]
        content: dict[str, Any] = {
            "@type": BATCH_TYPE,
            "model": f"models/{metadata.get(META_MODEL, '')}",
            "displayName": metadata.get(META_DISPLAY_NAME, ""),
            "state": _DONE.get(status) or _ACTIVE.get(status, "BATCH_STATE_UNSPECIFIED"),
            "createTime": _rfc3339(batch["created_at"]),
            "updateTime": _rfc3339(max(s for s in stamps if s)),
            "batchStats": {
                "requestCount": str(total),
                "successfulRequestCount": str(counts["completed"]),
                "failedRequestCount": str(counts["failed"] if status != "failed" else total),
                "pendingRequestCount": str(
                    0 if done else max(total - counts["completed"] - counts["failed"], 0)
                ),
            },
        }
        if ended is not None:
            content["endTime"] = _rfc3339(ended)
        operation: dict[str, Any] = {"name": to_gemini_name(batch["id"]), "metadata": content}
        if done:
            operation["done"] = True
        if status == "failed":
            errors = (batch.get("errors") or {}).get("data") or []
            why = "; ".join(str(e.get("message")) for e in errors[:3]) or "the batch was refused"
            operation["error"] = {"code": 3, "message": why, "status": "INVALID_ARGUMENT"}
        elif done and metadata.get(META_SOURCE) == "inline":
            content["output"] = {"inlinedResponses": {"inlinedResponses": self._inlined(batch)}}
        elif done:
            content["output"] = {"responsesFile": results_file_name(batch["id"])}
        return operation

    def results(self, batch: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(key, {"response"} | {"error"})`` for every finished request of a batch."""
        for file_id in (batch["output_file_id"], batch["error_file_id"]):
            if not file_id:
                continue
            with open(self.engine.file_content_path(file_id), "rb") as handle:
                for raw in handle:
                    if raw.strip():
                        record = json.loads(raw)
                        yield str(record.get("custom_id")), answer_of(record)

    def _inlined(self, batch: Mapping[str, Any]) -> builtins.list[dict[str, Any]]:
        answers = dict(self.results(batch))
        row = self.engine.store.get_batch(batch["id"])
        assert row is not None  # the caller has just read ``batch`` from the store
        blob = self.engine.store.blobs.path(row["input_sha256"])
        inlined = []
        for request in iter_requests(blob):
            line = json.loads(request.raw)
            answer = answers.get(request.custom_id)
            if answer is None:
                continue
            entry = dict(answer)
            if line.get("gemini_metadata") is not None:
                entry["metadata"] = line["gemini_metadata"]
            inlined.append(entry)
        return inlined

    # -- helpers ---------------------------------------------------------------------------

    def _inline_lines(self, requests: Any, model: str) -> Iterator[dict[str, Any]]:
        items = requests.get("requests") if isinstance(requests, Mapping) else None
        if not isinstance(items, list) or not items:
            raise GeminiError(400, "batch.inputConfig.requests.requests: a non-empty list.")
        keys: set[str] = set()
        lines = []
        for index, item in enumerate(items):
            where = f"batch.inputConfig.requests.requests[{index}]"
            if not isinstance(item, Mapping):
                raise GeminiError(400, f"{where}: must be an object with a request.")
            metadata = item.get("metadata")
            key = metadata.get("key") if isinstance(metadata, Mapping) else None
            key = str(key) if key is not None else f"request-{index + 1}"
            lines.append(_line(key, item.get("request"), model, where, keys, metadata))
        return iter(lines)

    def _file_lines(self, file_name: str, model: str) -> Iterator[dict[str, Any]]:
        path = self.engine.file_content_path(engine_file_id(file_name))
        keys: set[str] = set()
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                where = f"{file_name} line {number}"
                try:
                    record = json.loads(raw)
                except ValueError:
                    raise GeminiError(400, f"{where}: not valid JSON.") from None
                if not isinstance(record, Mapping) or record.get("key") is None:
                    raise GeminiError(400, f"{where}: an object with key and request.")
                yield _line(str(record["key"]), record.get("request"), model, where, keys, None)
        if not keys:
            raise GeminiError(400, f"{file_name}: the file holds no requests.")

    def _engine_id(self, name: str) -> str:
        short = name.removeprefix(BATCH_PREFIX)
        if not short or "/" in short or ":" in short:
            raise GeminiError(404, f"Batch {name!r} not found.")
        return ENGINE_BATCH_PREFIX + short


_STAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at")


def _line(
    key: str, request: Any, model: str, where: str, keys: set[str], metadata: Any
) -> dict[str, Any]:
    if key in keys:
        raise GeminiError(400, f"{where}: the key {key!r} is used twice.")
    keys.add(key)
    contents = request.get("contents") if isinstance(request, Mapping) else None
    if not isinstance(contents, list) or not contents:
        raise GeminiError(400, f"{where}.request.contents: a non-empty list is required.")
    body = {**request, "model": model}
    line: dict[str, Any] = {
        "custom_id": key,
        "method": "POST",
        "url": GENERATE_CONTENT_ENDPOINT,
        "body": body,
    }
    if metadata is not None:
        line["gemini_metadata"] = metadata
    return line


def answer_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"response": GenerateContentResponse}`` or ``{"error": Status}`` for one engine line."""
    error = record.get("error")
    if isinstance(error, Mapping):
        code = error.get("code")
        message = str(error.get("message") or code)
        if code == "batch_cancelled":
            status = status_for_http(499, message, reason=REASON_CANCELLED)
        elif code == "batch_expired":
            status = status_for_http(504, message, reason=REASON_EXPIRED)
        else:
            status = status_for_http(504 if code == "request_timeout" else 503, message)
        return {"error": status}
    response = record["response"] if isinstance(record.get("response"), Mapping) else {}
    http = int(response.get("status_code") or 500)
    body = response.get("body")
    if 200 <= http < 300 and isinstance(body, Mapping):
        return {"response": body}
    inner = body.get("error") if isinstance(body, Mapping) else None
    text = inner.get("message") if isinstance(inner, Mapping) else None
    return {"error": status_for_http(http, str(text or f"HTTP {http}"))}


# ---------------------------------------------------------------------------------------------
# Files


#: resumable uploads kept open at once: each holds an open temporary file, so a client that
#: starts uploads and never finishes them must not exhaust the server's file descriptors;
#: past this the oldest session is dropped (its next chunk gets 404, as after a restart)
MAX_UPLOAD_SESSIONS = 64


@dataclass
class _Session:
    """One resumable upload in progress."""

    writer: BlobWriter
    size: int
    display_name: str
    mime_type: str
    received: int = 0
    file: dict[str, Any] | None = None  # set once finalized
    lock: threading.Lock = field(default_factory=threading.Lock)


class GeminiFiles:
    """The Files API (resumable uploads, metadata, downloads) over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batches = GeminiBatches(engine)
        self._sessions: dict[str, _Session] = {}

    async def upload_view(self, request: Request) -> Response:
        upload_id = request.query_params.get("upload_id")
        if upload_id is None:
            return await self._start(request)
        session = self._sessions.get(upload_id)
        if session is None:
            raise GeminiError(404, "No such upload session (it finished or the server restarted).")
        command = {c.strip() for c in request.headers.get("x-goog-upload-command", "").split(",")}
        offset = request.headers.get("x-goog-upload-offset", "").strip()
        if offset and not offset.isdigit():
            raise GeminiError(400, "X-Goog-Upload-Offset: the byte offset of this chunk.")
        limit = max(session.size - session.received, 0) + 1
        chunk = bytes(await read_capped(request, limit)) if "upload" in command else b""
        answer = await run_in_threadpool(
            self._chunk, upload_id, session, int(offset or session.received), chunk, command
        )
        status = "final" if session.file is not None else "active"
        return JSONResponse(answer, headers={"X-Goog-Upload-Status": status})

    async def _start(self, request: Request) -> Response:
        if request.headers.get("x-goog-upload-command", "").strip() != "start":
            raise GeminiError(400, "Only resumable uploads are supported (X-Goog-Upload-Command).")
        declared = request.headers.get("x-goog-upload-header-content-length", "")
        if not declared.isdigit():
            raise GeminiError(400, "X-Goog-Upload-Header-Content-Length: the file size.")
        size = int(declared)
        if size > self.engine.max_upload_bytes:
            raise GeminiError(413, f"The file is too large: the limit is {size} bytes.")
        body = await read_json(request, 64 * 1024, not_json="Invalid JSON payload received.")
        file = camel_keys((body or {}).get("file")) if isinstance(body, Mapping) else None
        file = file if isinstance(file, Mapping) else {}
        upload_id = secrets.token_urlsafe(24)
        self._forget_oldest_sessions(MAX_UPLOAD_SESSIONS - 1)
        self._sessions[upload_id] = _Session(
            writer=self.engine.open_upload(),
            size=size,
            display_name=str(file.get("displayName") or "upload.jsonl"),
            mime_type=request.headers.get("x-goog-upload-header-content-type")
            or str(file.get("mimeType") or "application/octet-stream"),
        )
        base = str(request.base_url).rstrip("/")
        url = f"{base}/upload{API}/files?upload_id={upload_id}&upload_protocol=resumable"
        return JSONResponse(
            {}, headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"}
        )

    def _forget_oldest_sessions(self, keep: int) -> None:
        """Drop the oldest sessions (finished, or abandoned with their file open) beyond
        ``keep``, closing and deleting what an unfinished one had written."""
        while len(self._sessions) > keep:
            oldest = next(iter(self._sessions))
            session = self._sessions.pop(oldest)
            with session.lock:
                if session.file is None:
                    session.writer.discard()

    def _chunk(
        self, upload_id: str, session: _Session, offset: int, chunk: bytes, command: set[str]
    ) -> dict[str, Any]:
        with session.lock:
            if session.file is not None:  # a repeated finalize: the same answer
                return {"file": session.file}
            if offset + len(chunk) <= session.received and offset < session.received:
                chunk = b""  # a chunk sent again after a lost answer: already written
            elif offset != session.received:
                raise GeminiError(
                    400, f"X-Goog-Upload-Offset {offset}: {session.received} bytes received."
                )
            session.writer.write(chunk)
            session.received += len(chunk)
            if "finalize" not in command:
                return {}
            if session.received != session.size:
                raise GeminiError(
                    400, f"The upload holds {session.received} bytes, not {session.size}."
                )
            stored = self.engine.register_upload(session.writer, session.display_name, "batch")
            session.file = gemini_file(stored, session.mime_type, display_name=None)
            return {"file": session.file}

    async def list_view(self, request: Request) -> Response:
        params = request.query_params
        size = _page_size(params.get("pageSize"))
        token = params.get("pageToken") or None
        listing = await run_in_threadpool(
            self.engine.list_files, None, size, engine_file_id(token) if token else None
        )
        files = [gemini_file(f) for f in listing["data"]]
        answer: dict[str, Any] = {"files": files}
        if listing["has_more"]:
            answer["nextPageToken"] = files[-1]["name"]
        return JSONResponse(answer)

    async def one_view(self, request: Request) -> Response:
        name, _, verb = request.path_params["name"].partition(":")
        if verb not in ("", "download"):
            raise GeminiError(404, f"Unknown method :{verb} on files/{name}.")
        if request.method == "DELETE":
            await run_in_threadpool(self.engine.delete_file, engine_file_id(name))
            return JSONResponse({})
        if name.startswith(RESULTS_PREFIX):
            batch = await run_in_threadpool(self.batches.get, name.removeprefix(RESULTS_PREFIX))
            if batch["status"] not in _DONE:
                raise GeminiError(404, f"File files/{name} not found (the batch is not done).")
            if verb == "download" or request.query_params.get("alt") == "media":
                return StreamingResponse(self._results(batch), media_type="application/jsonl")
            return JSONResponse(_results_file(name, batch))
        file_id = engine_file_id(name)
        if verb == "download" or request.query_params.get("alt") == "media":
            path = await run_in_threadpool(self.engine.file_content_path, file_id)
            return StreamingResponse(_read(path), media_type="application/octet-stream")
        return JSONResponse(gemini_file(await run_in_threadpool(self.engine.get_file, file_id)))

    def _results(self, batch: Mapping[str, Any]) -> Iterator[bytes]:
        for key, answer in self.batches.results(batch):
            line = {"key": key, **answer}
            yield json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _read(path: Any) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            yield chunk


def gemini_file(
    file: Mapping[str, Any], mime_type: str | None = None, *, display_name: str | None = None
) -> dict[str, Any]:
    """A Gemini File for an engine FileObject."""
    created = _rfc3339(file["created_at"])
    out: dict[str, Any] = {
        "name": FILE_PREFIX + file["id"],
        "displayName": display_name or file["filename"],
        "mimeType": mime_type or "application/jsonl",
        "sizeBytes": str(file["bytes"]),
        "createTime": created,
        "updateTime": created,
        "state": "ACTIVE",
        "source": "GENERATED" if file["purpose"] == "batch_output" else "UPLOADED",
    }
    if file.get("expires_at"):
        out["expirationTime"] = _rfc3339(file["expires_at"])
    return out


def _results_file(name: str, batch: Mapping[str, Any]) -> dict[str, Any]:
    stamp = _rfc3339(batch["created_at"])
    return {
        "name": FILE_PREFIX + name,
        "displayName": f"results of {to_gemini_name(batch['id'])}",
        "mimeType": "application/jsonl",
        "createTime": stamp,
        "updateTime": stamp,
        "state": "ACTIVE",
        "source": "GENERATED",
        "downloadUri": f"{API}/{FILE_PREFIX}{name}:download?alt=media",
    }


# ---------------------------------------------------------------------------------------------
# names and small helpers


def to_gemini_name(engine_id: str) -> str:
    return BATCH_PREFIX + engine_id.removeprefix(ENGINE_BATCH_PREFIX)


def results_file_name(engine_id: str) -> str:
    return f"{FILE_PREFIX}{RESULTS_PREFIX}{engine_id.removeprefix(ENGINE_BATCH_PREFIX)}"


def engine_file_id(name: str) -> str:
    short = name.removeprefix(FILE_PREFIX)
    if not short or "/" in short:
        raise GeminiError(404, f"File {name!r} not found.")
    return short


def _page_size(value: str | None) -> int:
    if value is None or value == "":
        return 50
    try:
        size = int(value)
    except ValueError:
        raise GeminiError(400, "pageSize: must be an integer.") from None
    return max(1, min(size, 1000))


def _rfc3339(epoch: int | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
