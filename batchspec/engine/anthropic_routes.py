"""Anthropic's Message Batches API on the engine: the second dialect of ``batchspec serve``.

Routes (``x-api-key`` when the server has a key; ``anthropic-version`` required, as Anthropic
does)::

    POST   /v1/messages/batches                 {"requests": [{custom_id, params}, ...]}
    GET    /v1/messages/batches                 ?after_id=&before_id=&limit= (1..1000, 20)
    GET    /v1/messages/batches/{id}
    POST   /v1/messages/batches/{id}/cancel
    DELETE /v1/messages/batches/{id}            only once ended
    GET    /v1/messages/batches/{id}/results    JSONL, only once ended

A Message Batch *is* an engine batch: its requests are stored as a batch input file of
``{"custom_id", "method": "POST", "url": "/v1/messages", "body": params}`` lines and run by
the worker like any other batch, through ``MessagesUpstream`` (Messages requests become chat
completions on the upstream, see ``messages_upstream.py``). The id is the engine's with
another prefix (``msgbatch_<hex>`` is ``batch_<hex>``), so nothing new is stored. The list
shows the engine's ``/v1/messages`` batches only.

Mapping of the engine's state: validating/in_progress/finalizing -> ``in_progress``,
cancelling -> ``canceling``, every terminal status -> ``ended``. ``request_counts``:
succeeded = completed lines; errored = lines that failed (all of them when validation
failed); the lines a cancel or expiry left unrun are ``canceled`` / ``expired``; processing
= the rest. Results lines: a 2xx answer is ``succeeded`` with the message, another answer is
``errored`` with Anthropic's error object, ``batch_cancelled`` / ``batch_expired`` are
``canceled`` / ``expired``, a timeout or unreachable upstream is an ``errored`` api error.
Timestamps are RFC 3339 strings; ``expires_at`` is the engine's deadline.

Requests are checked when the batch is created, as Anthropic does: 1 to 100,000 requests,
unique ``custom_id`` matching ``^[a-zA-Z0-9_-]{1,64}$``, ``params`` with ``model``,
``max_tokens`` and ``messages``; a body over 256 MB (Anthropic's documented limit) is refused
with 413 as soon as it passes the cap, and one that is not JSON (nested too deep included)
with 400 (``bodies.py``). Errors use Anthropic's envelope
``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from batchspec.engine.bodies import read_json
from batchspec.engine.core import Engine
from batchspec.engine.errors import EngineError
from batchspec.engine.messages_upstream import error_body
from batchspec.engine.objects import batch_object
from batchspec.wire.anthropic_lines import (
    CUSTOM_ID_PATTERN,
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_REQUESTS,
    MESSAGES_ENDPOINT,
)
from batchspec.wire.inputs import iter_requests

PREFIX = "/v1/messages/batches"
ID_PREFIX = "msgbatch_"
ENGINE_PREFIX = "batch_"
#: metadata key holding the number of requests (the engine counts them only once validated)
REQUESTS_KEY = "message_batch_requests"
_ID_RULE = re.compile(CUSTOM_ID_PATTERN)
_ACTIVE = {"validating": "in_progress", "in_progress": "in_progress", "finalizing": "in_progress"}


class AnthropicError(Exception):
    """A refused Message Batches call: HTTP status and Anthropic's error type."""

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind

    def response(self) -> JSONResponse:
        body = error_body(self.status, self.message)
        if self.kind:
            body["error"]["type"] = self.kind
        return JSONResponse(body, status_code=self.status)


def anthropic_routes(engine: Engine) -> list[Route]:
    """The Message Batches routes over ``engine`` (see the module docstring)."""
    batches = MessageBatches(engine)
    return [
        Route(PREFIX, _view(batches.create_view), methods=["POST"]),
        Route(PREFIX, _view(batches.list_view), methods=["GET"]),
        Route(f"{PREFIX}/{{batch_id:str}}", _view(batches.get_view), methods=["GET"]),
        Route(f"{PREFIX}/{{batch_id:str}}", _view(batches.delete_view), methods=["DELETE"]),
        Route(f"{PREFIX}/{{batch_id:str}}/cancel", _view(batches.cancel_view), methods=["POST"]),
        Route(f"{PREFIX}/{{batch_id:str}}/results", _view(batches.results_view), methods=["GET"]),
    ]


def _view(handler: Any) -> Any:
    """Check ``anthropic-version`` and answer every failure in Anthropic's envelope."""

    async def view(request: Request) -> Response:
        try:
            if not request.headers.get("anthropic-version"):
                raise AnthropicError(400, "anthropic-version: header is required")
            response: Response = await handler(request)
            return response
        except AnthropicError as err:
            return err.response()
        except EngineError as err:
            kind = "not_found_error" if err.status == 404 else None
            return AnthropicError(err.status, err.message, kind).response()

    return view


class MessageBatches:
    """The dialect over one engine; views parse the request and call one method."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- views -----------------------------------------------------------------------------

    async def create_view(self, request: Request) -> Response:
        body = await read_json(
            request, MAX_BATCH_BODY_BYTES, not_json="The request body is not valid JSON."
        )
        batch = await run_in_threadpool(self.create, body)
        return JSONResponse(self.render(batch, _base(request)))

    async def list_view(self, request: Request) -> Response:
        params = request.query_params
        page = await run_in_threadpool(
            self.list,
            after_id=params.get("after_id") or None,
            before_id=params.get("before_id") or None,
            limit=_limit(params.get("limit")),
        )
        base = _base(request)
        data = [self.render(batch, base) for batch in page["data"]]
        return JSONResponse(
            {
                "data": data,
                "has_more": page["has_more"],
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def get_view(self, request: Request) -> Response:
        batch = await run_in_threadpool(self.get, request.path_params["batch_id"])
        return JSONResponse(self.render(batch, _base(request)))

    async def cancel_view(self, request: Request) -> Response:
        batch = await run_in_threadpool(self.cancel, request.path_params["batch_id"])
        return JSONResponse(self.render(batch, _base(request)))

    async def delete_view(self, request: Request) -> Response:
        deleted = await run_in_threadpool(self.delete, request.path_params["batch_id"])
        return JSONResponse({"id": deleted, "type": "message_batch_deleted"})

    async def results_view(self, request: Request) -> Response:
        batch = await run_in_threadpool(self.get, request.path_params["batch_id"])
        if batch["status"] in _ACTIVE or batch["status"] == "cancelling":
            raise AnthropicError(
                400,
                f"Message Batch {to_anthropic_id(batch['id'])} has not ended yet; its results "
                "are available once processing_status is 'ended'.",
            )
        return StreamingResponse(self.results(batch), media_type="application/x-jsonl")

    # -- the API, in-process ---------------------------------------------------------------

    def create(self, body: Any) -> dict[str, Any]:
        """Store the requests as a batch input file and create an engine batch from it."""
        requests = check_requests(body)
        writer = self.engine.open_upload()
        try:
            for item in requests:
                line = {
                    "custom_id": item["custom_id"],
                    "method": "POST",
                    "url": MESSAGES_ENDPOINT,
                    "body": item["params"],
                }
                writer.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
        except BaseException:
            writer.discard()
            raise
        stored = self.engine.register_upload(writer, "message_batch_requests.jsonl", "batch")
        created = self.engine.create_batch(
            stored["id"], MESSAGES_ENDPOINT, "24h", {REQUESTS_KEY: str(len(requests))}
        )
        return self._with_counts(created)

    def get(self, message_batch_id: str) -> dict[str, Any]:
        return self._with_counts(self.engine.get_batch(self._engine_id(message_batch_id)))

    def list(self, *, after_id: str | None, before_id: str | None, limit: int) -> dict[str, Any]:
        """Newest first, like Anthropic; ``before_id`` pages towards newer batches."""
        store = self.engine.store
        if after_id is not None and before_id is not None:
            raise AnthropicError(400, "Use after_id or before_id, not both.")
        cursor = after_id or before_id
        seq = store.seq_of("batches", self._engine_id(cursor)) if cursor else None
        if cursor and seq is None:
            raise AnthropicError(400, f"The cursor {cursor!r} names no known Message Batch.")
        where, order = "endpoint = ?", "DESC"
        args: list[Any] = [MESSAGES_ENDPOINT]
        if after_id is not None:
            where += " AND seq < ?"
            args.append(seq)
        elif before_id is not None:
            where, order = where + " AND seq > ?", "ASC"
            args.append(seq)
        rows = store.db.execute(
            f"SELECT * FROM batches WHERE {where} ORDER BY seq {order} LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        page = rows[:limit]
        if order == "ASC":
            page.reverse()
        return {
            "data": [self._with_counts(batch_object(row)) for row in page],
            "has_more": len(rows) > limit,
        }

    def cancel(self, message_batch_id: str) -> dict[str, Any]:
        engine_id = self._engine_id(message_batch_id)
        try:
            self.engine.cancel_batch(engine_id)
        except EngineError as err:
            if err.status != 409:  # finalizing or ended: nothing left to cancel
                raise
        return self.get(message_batch_id)

    def delete(self, message_batch_id: str) -> str:
        """Forget an ended batch with its result files (and its request file, if ours)."""
        batch = self.get(message_batch_id)
        if batch["status"] in _ACTIVE or batch["status"] == "cancelling":
            raise AnthropicError(
                400, "A Message Batch can be deleted only once it has ended; cancel it first."
            )
        with self.engine.store.write() as db:
            db.execute("DELETE FROM results WHERE batch_id = ?", (batch["id"],))
            db.execute("DELETE FROM batches WHERE id = ?", (batch["id"],))
        owned_input = REQUESTS_KEY in (batch.get("metadata") or {})
        files = [batch["output_file_id"], batch["error_file_id"]]
        for file_id in [*files, batch["input_file_id"] if owned_input else None]:
            if file_id:
                with contextlib.suppress(EngineError):  # already gone
                    self.engine.delete_file(file_id)
        return to_anthropic_id(batch["id"])

    def results(self, batch: Mapping[str, Any]) -> Iterator[bytes]:
        """The results JSONL of an ended batch, one line per request."""
        if batch["status"] == "failed":
            yield from self._rejected_results(batch)
            return
        for file_id in (batch["output_file_id"], batch["error_file_id"]):
            if not file_id:
                continue
            with open(self.engine.file_content_path(file_id), "rb") as handle:
                for raw in handle:
                    if raw.strip():
                        yield _dumps(result_of(json.loads(raw))) + b"\n"

    # -- rendering -------------------------------------------------------------------------

    def render(self, batch: Mapping[str, Any], base_url: str) -> dict[str, Any]:
        """The MessageBatch object for an engine batch (see the module docstring)."""
        status = batch["status"]
        ended = status not in _ACTIVE and status != "cancelling"
        counts = _request_counts(batch)
        message_batch_id = to_anthropic_id(batch["id"])
        ended_at = next(
            (
                batch[key]
                for key in ("completed_at", "cancelled_at", "expired_at", "failed_at")
                if batch.get(key)
            ),
            None,
        )
        return {
            "id": message_batch_id,
            "type": "message_batch",
            "processing_status": "ended" if ended else _ACTIVE.get(status, "canceling"),
            "request_counts": counts,
            "ended_at": _rfc3339(ended_at) if ended else None,
            "created_at": _rfc3339(batch["created_at"]),
            "expires_at": _rfc3339(batch["expires_at"]),
            "archived_at": None,
            "cancel_initiated_at": _rfc3339(batch.get("cancelling_at")),
            "results_url": f"{base_url}{PREFIX}/{message_batch_id}/results" if ended else None,
        }

    # -- helpers ---------------------------------------------------------------------------

    def _engine_id(self, message_batch_id: str) -> str:
        if not message_batch_id.startswith(ID_PREFIX):
            raise AnthropicError(
                404, f"No Message Batch {message_batch_id!r}.", kind="not_found_error"
            )
        return ENGINE_PREFIX + message_batch_id[len(ID_PREFIX) :]

    def _with_counts(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The engine batch plus the number of lines that failed on their own (not unrun)."""
        if batch["endpoint"] != MESSAGES_ENDPOINT:
            raise AnthropicError(
                404, f"No Message Batch {to_anthropic_id(batch['id'])!r}.", "not_found_error"
            )
        row = self.engine.store.db.execute(
            "SELECT COUNT(*) FROM results WHERE batch_id = ? AND ok = 0", (batch["id"],)
        ).fetchone()
        return {**batch, "_errored": int(row[0])}

    def _rejected_results(self, batch: Mapping[str, Any]) -> Iterator[bytes]:
        """Every request of a batch that failed validation, as errored."""
        errors = (batch.get("errors") or {}).get("data") or []
        why = "; ".join(str(e.get("message")) for e in errors[:3]) or "the batch was rejected"
        row = self.engine.store.get_batch(batch["id"])
        assert row is not None  # the caller has just read ``batch`` from the store
        blob = self.engine.store.blobs.path(row["input_sha256"])
        for request in iter_requests(blob):
            error = {"type": "error", "error": {"type": "invalid_request_error", "message": why}}
            line = {"custom_id": request.custom_id, "result": {"type": "errored", "error": error}}
            yield _dumps(line) + b"\n"


def check_requests(body: Any) -> list[Mapping[str, Any]]:
    """The create's requests, checked as Anthropic checks them; ``AnthropicError`` if not."""
    requests = body.get("requests") if isinstance(body, Mapping) else None
    if not isinstance(requests, list) or not requests:
        raise AnthropicError(400, "requests: a non-empty list of requests is required.")
    if len(requests) > MAX_BATCH_REQUESTS:
        raise AnthropicError(400, f"requests: at most {MAX_BATCH_REQUESTS:,} requests per batch.")
    seen: set[str] = set()
    for index, item in enumerate(requests):
        where = f"requests.{index}"
        if not isinstance(item, Mapping):
            raise AnthropicError(400, f"{where}: must be an object with custom_id and params.")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not _ID_RULE.match(custom_id):
            raise AnthropicError(
                400, f"{where}.custom_id: must be a string matching {CUSTOM_ID_PATTERN}."
            )
        if custom_id in seen:
            raise AnthropicError(400, f"{where}.custom_id: {custom_id!r} is used twice.")
        seen.add(custom_id)
        _check_params(item.get("params"), f"{where}.params")
    return requests


def _check_params(params: Any, where: str) -> None:
    if not isinstance(params, Mapping):
        raise AnthropicError(400, f"{where}: Field required (an object of Messages parameters).")
    if not isinstance(params.get("model"), str) or not params["model"]:
        raise AnthropicError(400, f"{where}.model: Field required.")
    max_tokens = params.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise AnthropicError(400, f"{where}.max_tokens: Field required (an integer >= 1).")
    if not isinstance(params.get("messages"), list) or not params["messages"]:
        raise AnthropicError(400, f"{where}.messages: Field required (a non-empty list).")


def result_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """One results line for one of the engine's output/error lines."""
    custom_id = record.get("custom_id")
    error = record.get("error")
    if isinstance(error, Mapping):
        code = error.get("code")
        if code in ("batch_cancelled", "batch_expired"):
            kind = "canceled" if code == "batch_cancelled" else "expired"
            return {"custom_id": custom_id, "result": {"type": kind}}
        status = 504 if code == "request_timeout" else 500
        body: Any = error_body(status, str(error.get("message") or code))
        return {"custom_id": custom_id, "result": {"type": "errored", "error": body}}
    response = record["response"] if isinstance(record.get("response"), Mapping) else {}
    status = int(response.get("status_code") or 500)
    body = response.get("body")
    if 200 <= status < 300:
        return {"custom_id": custom_id, "result": {"type": "succeeded", "message": body}}
    if not (isinstance(body, Mapping) and body.get("type") == "error"):
        inner = body.get("error") if isinstance(body, Mapping) else None
        text = inner.get("message") if isinstance(inner, Mapping) else None
        body = error_body(status, str(text or body or f"HTTP {status}"))
    return {"custom_id": custom_id, "result": {"type": "errored", "error": body}}


def _request_counts(batch: Mapping[str, Any]) -> dict[str, int]:
    counts = batch["request_counts"]
    metadata = batch.get("metadata") or {}
    total = counts["total"] or int(metadata.get(REQUESTS_KEY) or 0)
    succeeded, errored = counts["completed"], batch["_errored"]
    status = batch["status"]
    out = {"processing": 0, "succeeded": succeeded, "errored": 0, "canceled": 0, "expired": 0}
    if status == "failed":
        out["errored"] = total - succeeded
    elif status in ("cancelled", "expired"):
        out["errored"] = errored
        out["canceled" if status == "cancelled" else "expired"] = total - succeeded - errored
    else:
        out["errored"] = errored
        out["processing"] = max(total - succeeded - errored, 0)
    return out


def to_anthropic_id(engine_id: str) -> str:
    return ID_PREFIX + engine_id.removeprefix(ENGINE_PREFIX)


def _rfc3339(epoch: int | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _limit(value: str | None) -> int:
    if value is None or value == "":
        return 20
    try:
        limit = int(value)
    except ValueError:
        raise AnthropicError(400, "limit: must be an integer.") from None
    if not 1 <= limit <= 1000:
        raise AnthropicError(400, "limit: must be between 1 and 1000.")
    return limit


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
