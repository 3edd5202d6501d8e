"""Mistral batch jobs on the engine: a dialect of ``batchspec serve`` for the ``mistralai`` SDK.

Routes (``Authorization: Bearer <key>`` when the server has one), beside OpenAI's
``/v1/files`` which Mistral's SDK shares (its file objects carry ``size_bytes``,
``sample_type`` and ``source`` too: ``objects.file_object``)::

    POST /v1/batch/jobs               {input_files, endpoint, model?, metadata?, timeout_hours?}
    GET  /v1/batch/jobs               ?page=&page_size=&model=&status=&created_after=&order_by=
                                      and the metadata filter as extra query parameters
    GET  /v1/batch/jobs/{id}
    POST /v1/batch/jobs/{id}/cancel

A Mistral job *is* an engine batch: the lines of its input files (Mistral's ``{"custom_id",
"body"}``, or OpenAI's with ``method``/``url``) are stored as one batch input file of the
engine's own lines (``url`` = the job's endpoint, ``body.model`` = the job's model, else
the line's) and run by the worker like any other batch. That converted file's name records the
job's own fields (``mistral-job {"input_files", "model", "requests"}``), so the job's
metadata keeps its 16 pairs for the client, and a batch is a Mistral job exactly when its
input file is named so (the list shows those only, newest first). The job's id is the
engine's; ``output_file`` and ``error_file`` are the engine's result files.

Statuses: ``mistral_lines.FROM_OURS``. Creates are checked as Mistral checks them: at
least one input file of purpose ``batch``, an endpoint Mistral takes (one the engine cannot
run answers 422), a model on every line or on the job, unique ``custom_id``s across the
files, ``timeout_hours`` 1 to 168. Cancelling a finished job returns it unchanged. Errors use
Mistral's body ``{"object": "error", "message", "type", "param", "code"}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchspec.engine.bodies import CREATE_BODY_LIMIT, read_json
from batchspec.engine.core import Engine
from batchspec.engine.errors import EngineError, bad_request
from batchspec.engine.upstreams import SUPPORTED_ENDPOINTS
from batchspec.wire import mistral_lines

PREFIX = "/v1/batch/jobs"
#: the name of a converted input file starts so; the JSON after it holds the job's fields
FILE_MARKER = "mistral-job "
#: query parameters of the list that are not part of the metadata filter
_LIST_PARAMS = frozenset(
    {
        "page",
        "page_size",
        "model",
        "agent_id",
        "created_after",
        "created_by_me",
        "status",
        "order_by",
    }
)
_WINDOWS = frozenset(f"{h}h" for h in range(1, mistral_lines.MAX_TIMEOUT_HOURS + 1))


def mistral_routes(engine: Engine) -> list[Route]:
    """The Mistral batch job routes over ``engine`` (see the module docstring)."""
    jobs = MistralJobs(engine)
    return [
        Route(PREFIX, _view(jobs.create_view), methods=["POST"]),
        Route(PREFIX, _view(jobs.list_view), methods=["GET"]),
        Route(f"{PREFIX}/{{job_id:str}}", _view(jobs.get_view), methods=["GET"]),
        Route(f"{PREFIX}/{{job_id:str}}/cancel", _view(jobs.cancel_view), methods=["POST"]),
    ]


def _view(handler: Any) -> Any:
    """Answer every refusal in Mistral's error body."""

    async def view(request: Request) -> Response:
        try:
            response: Response = await handler(request)
            return response
        except EngineError as err:
            body = {
                "object": "error",
                "message": err.message,
                "type": err.type,
                "param": err.param,
                "code": err.code,
            }
            return JSONResponse(body, status_code=err.status)

    return view


class MistralJobs:
    """The job routes over one engine; views parse the request and call one method."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- views -----------------------------------------------------------------------------

    async def create_view(self, request: Request) -> Response:
        body = await read_json(request, CREATE_BODY_LIMIT, not_json="Invalid JSON body.")
        return JSONResponse(await run_in_threadpool(self.create, body))

    async def list_view(self, request: Request) -> Response:
        params = request.query_params
        return JSONResponse(
            await run_in_threadpool(
                self.list,
                page=_int(params.get("page"), "page", 0),
                page_size=_int(params.get("page_size"), "page_size", 100),
                model=params.get("model") or None,
                statuses=params.getlist("status"),
                created_after=params.get("created_after") or None,
                oldest_first=params.get("order_by") == "created",
                metadata={k: v for k, v in params.items() if k not in _LIST_PARAMS},
            )
        )

    async def get_view(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.get, request.path_params["job_id"]))

    async def cancel_view(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.cancel, request.path_params["job_id"]))

    # -- the API, in-process ---------------------------------------------------------------

    def create(self, body: Any) -> dict[str, Any]:
        """Convert the input files into one engine input file and create a batch from it."""
        if not isinstance(body, Mapping):
            raise bad_request("The body must be a JSON object with input_files and endpoint.")
        if body.get("requests") is not None or body.get("agent_id") is not None:
            raise bad_request(
                "Inline requests and agents are not served here: upload input files.",
                param="requests" if body.get("requests") is not None else "agent_id",
            )
        inputs = body.get("input_files")
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(i, str) for i in inputs)
        ):
            raise bad_request("input_files: a non-empty list of file ids.", param="input_files")
        endpoint = body.get("endpoint")
        if endpoint not in mistral_lines.ENDPOINTS:
            raise bad_request(
                f"endpoint: one of {', '.join(mistral_lines.ENDPOINTS)}.", param="endpoint"
            )
        if endpoint not in SUPPORTED_ENDPOINTS:
            raise EngineError(422, f"The local engine cannot run {endpoint}.", param="endpoint")
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise bad_request("model: a non-empty string.", param="model")
        hours = body.get("timeout_hours", mistral_lines.DEFAULT_TIMEOUT_HOURS)
        if isinstance(hours, bool) or not isinstance(hours, int) or f"{hours}h" not in _WINDOWS:
            raise bad_request(
                f"timeout_hours: an integer from 1 to {mistral_lines.MAX_TIMEOUT_HOURS}.",
                param="timeout_hours",
            )
        writer = self.engine.open_upload()
        count = 0
        try:
            for line in self._lines(inputs, str(endpoint), model):
                writer.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
                count += 1
        except BaseException:
            writer.discard()
            raise
        fields = {"input_files": inputs, "model": model, "requests": count}
        stored = self.engine.register_upload(writer, FILE_MARKER + json.dumps(fields), "batch")
        batch = self.engine.create_batch(
            stored["id"], str(endpoint), f"{hours}h", body.get("metadata"), windows=_WINDOWS
        )
        return self.render(batch)

    def get(self, job_id: str) -> dict[str, Any]:
        batch = self.engine.get_batch(job_id)
        if self._fields(batch) is None:
            raise EngineError(404, f"No such batch job: '{job_id}'.", param="job_id")
        return self.render(batch)

    def list(
        self,
        *,
        page: int,
        page_size: int,
        model: str | None,
        statuses: list[str],
        created_after: str | None,
        metadata: Mapping[str, str],
        oldest_first: bool = False,
    ) -> dict[str, Any]:
        """Mistral jobs newest first, filtered, one page of them, and how many matched."""
        if page < 0 or not 1 <= page_size <= 1000:
            raise bad_request("page >= 0 and page_size from 1 to 1000.", param="page_size")
        since = _epoch(created_after) if created_after else None
        wanted = {s.upper() for s in statuses}
        matched = []
        for job in self._all_jobs():
            kept = (
                (model is None or job["model"] == model)
                and (not wanted or job["status"] in wanted)
                and (since is None or job["created_at"] >= since)
                and all((job["metadata"] or {}).get(k) == v for k, v in metadata.items())
            )
            if kept:
                matched.append(job)
        if oldest_first:
            matched.reverse()
        rows = matched[page * page_size : (page + 1) * page_size]
        return {"data": rows, "object": "list", "total": len(matched)}

    def cancel(self, job_id: str) -> dict[str, Any]:
        self.get(job_id)
        try:
            self.engine.cancel_batch(job_id)
        except EngineError as err:
            if err.status != 409:  # finalizing or done: nothing left to cancel
                raise
        return self.get(job_id)

    # -- rendering -------------------------------------------------------------------------

    def render(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The ``BatchJobOut`` of an engine batch that is a Mistral job."""
        fields = self._fields(batch) or {}
        counts = batch["request_counts"]
        status = batch["status"]
        errors = (batch.get("errors") or {}).get("data") or []
        ended = next(
            (
                batch[key]
                for key in ("completed_at", "cancelled_at", "expired_at", "failed_at")
                if batch.get(key)
            ),
            None,
        )
        return {
            "id": batch["id"],
            "object": "batch",
            "input_files": fields.get("input_files") or [],
            "metadata": batch.get("metadata"),
            "endpoint": batch["endpoint"],
            "model": fields.get("model") or batch.get("model"),
            "agent_id": None,
            "output_file": batch["output_file_id"],
            "error_file": batch["error_file_id"],
            "errors": [{"message": str(e.get("message")), "count": 1} for e in errors],
            "outputs": None,
            "status": mistral_lines.FROM_OURS.get(status, status.upper()),
            "created_at": batch["created_at"],
            "total_requests": counts["total"] or int(fields.get("requests") or 0),
            "completed_requests": counts["completed"] + counts["failed"],
            "succeeded_requests": counts["completed"],
            "failed_requests": counts["failed"],
            "started_at": batch.get("in_progress_at"),
            "completed_at": ended,
        }

    # -- helpers ---------------------------------------------------------------------------

    def _fields(self, batch: Mapping[str, Any]) -> dict[str, Any] | None:
        """The job's own fields from its converted input file's name; None if not a job."""
        row = self.engine.store.get_file(batch["input_file_id"])
        name = str(row["filename"]) if row is not None else ""
        if not name.startswith(FILE_MARKER):
            return None
        fields = json.loads(name[len(FILE_MARKER) :])
        return fields if isinstance(fields, dict) else None

    def _all_jobs(self) -> Iterator[dict[str, Any]]:
        rows = self.engine.store.db.execute(
            "SELECT b.id FROM batches b JOIN files f ON f.id = b.input_file_id"
            " WHERE substr(f.filename, 1, ?) = ? ORDER BY b.seq DESC",
            (len(FILE_MARKER), FILE_MARKER),
        ).fetchall()
        for row in rows:
            yield self.render(self.engine.get_batch(row[0]))

    def _lines(
        self, inputs: Sequence[str], endpoint: str, model: str | None
    ) -> Iterator[dict[str, Any]]:
        """The engine's lines for every line of every input file, checked as Mistral does."""
        seen: set[str] = set()
        for file_id in inputs:
            file = self.engine.get_file(file_id)
            if file["purpose"] != "batch":
                raise bad_request(
                    f"File '{file_id}' has purpose '{file['purpose']}', not 'batch'.",
                    param="input_files",
                )
            with open(self.engine.file_content_path(file_id), "rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    if raw.strip():
                        yield _line(raw, f"{file_id} line {number}", endpoint, model, seen)
        if not seen:
            raise bad_request("The input files hold no requests.", param="input_files")


def _line(
    raw: bytes, where: str, endpoint: str, model: str | None, seen: set[str]
) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except ValueError:
        raise bad_request(f"{where}: not valid JSON.", param="input_files") from None
    body = record.get("body") if isinstance(record, Mapping) else None
    custom_id = record.get("custom_id") if isinstance(record, Mapping) else None
    if not isinstance(custom_id, str) or not custom_id or not isinstance(body, Mapping):
        raise bad_request(f"{where}: an object with custom_id and body.", param="input_files")
    if custom_id in seen:
        raise bad_request(f"{where}: custom_id {custom_id!r} is used twice.", param="input_files")
    seen.add(custom_id)
    if record.get("url") not in (None, endpoint):
        raise bad_request(f"{where}: url differs from the job's endpoint.", param="input_files")
    line_model = model or body.get("model")  # the job's model wins, as at Mistral
    if not line_model:
        raise bad_request(f"{where}: no model, on the line or the job.", param="model")
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": endpoint,
        "body": {**body, "model": line_model},
    }


def _int(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"{name} must be an integer.", param=name) from None


def _epoch(value: str) -> int:
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise bad_request("created_after: an ISO 8601 time.", param="created_after") from None
