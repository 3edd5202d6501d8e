"""The ``mistral`` provider: Mistral's batch jobs behind the ``Provider`` protocol.

Mistral's API (``https://api.mistral.ai``, ``Authorization: Bearer``) differs from OpenAI's
Batch API in ways this module absorbs:

**Files and jobs.** Inputs are files uploaded to ``/v1/files`` with purpose ``batch``; a job
(``POST /v1/batch/jobs``) names a list of ``input_files``, one ``endpoint``, the ``model``,
``metadata`` and ``timeout_hours`` (our ``completion_window``: ``24h`` -> 24). The lines are
Mistral's ``{"custom_id", "body"}`` with the model in the job, not the body
(``mistral_lines.to_line``). Since the create needs the lines' model, ``upload_file``
*stages* the input locally (``staging.Staging``; the id is ``staged-<sha256>``,
nothing is sent) and ``create_batch`` converts it, uploads the converted file and creates
the job from it. A crash between the two leaves an unused file at Mistral, never a job.

**Statuses and results.** ``mistral_lines.batch_status`` maps the job status;
``total_requests`` / ``succeeded_requests`` / ``failed_requests`` are our counts; the job's
``output_file`` and ``error_file`` are ordinary files downloaded from
``/v1/files/{id}/content``, in OpenAI's line shape. Mistral reports no usage per job (each
line's body keeps its own ``usage``).

**Adoption by metadata.** A job keeps ``metadata`` (string pairs): batchspec's key is sent
there with the manifest's own pairs, and read back when listing, so the reconciler finds its
jobs after a crash. A create whose answer was lost (a timeout, a 5xx after Mistral may have
acted) is never sent again blindly: the jobs listed with that metadata (the filter goes as
extra query parameters, as mistralai's SDK sends it; matches are checked here too) are
searched first; a keyed create not found raises ``AmbiguousOutcome`` so that the reconciler
keeps looking it up for a bounded window, as for OpenAI.

Retries, backoff and error messages come from ``_http`` (Mistral's ``{"object": "error",
"message", ...}`` body and its 422 ``{"detail": ...}`` are read there).
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from batchspec import __version__
from batchspec.errors import InputError
from batchspec.providers._http import (
    ErrorContext,
    RetryingClient,
    cancel_or_ended,
    create_or_adopt,
    display_url,
    json_object,
    listed_rows,
    new_client,
    next_page_cursor,
    quote_id,
    redact_batch,
    require_http_url,
)
from batchspec.providers.base import (
    METADATA_KEYS,
    BatchValidationError,
    RemoteBatch,
    RemoteFile,
    RemoteNotFound,
    RequestCounts,
    UploadProgress,
    lenient_count,
    listed_after,
    optional_file_id,
    parse_file,
    pause_before_retry,
    required_id,
)
from batchspec.providers.staging import Staging
from batchspec.storage.private import ensure_private_dir
from batchspec.wire import mistral_lines
from batchspec.wire.inputs import iter_requests
from batchspec.wire.retry import client_policy

DEFAULT_BASE_URL = "https://api.mistral.ai"
_API_ROOT = f"Mistral's API root ({DEFAULT_BASE_URL})"
_PAGE_SIZE = 100
#: how many listed jobs a lost create's lookup reads before it gives up
_LOOKUP_JOBS = 1000


class MistralProvider:
    """A ``providers.base.Provider`` for Mistral batch jobs (see the module docstring)."""

    lists_newest_first = False  # Mistral documents no order for its listing

    def __init__(
        self,
        name: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None,
        data_dir: Path,
        api_key_env: str | None = "MISTRAL_API_KEY",
        client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 5,
        timeout: float = 60.0,
        sleep: Callable[[float], None] = pause_before_retry,
        rand: Callable[[], float] = random.random,
    ) -> None:
        require_http_url(name, base_url, where="baseUrl in batchspec.yaml")
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.data_dir = Path(data_dir)
        self._policy = client_policy(max_retries)
        self._sleep = sleep
        self._rand = rand
        owns_client = client is None
        if client is None:
            client = new_client(self.base_url, transport=transport, timeout=timeout)
        headers = {"User-Agent": f"batchspec/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = RetryingClient(
            base_url=self.base_url,
            client=client,
            owns_client=owns_client,
            context=ErrorContext(
                provider=name,
                base_url=display_url(self.base_url),
                api_key_env=api_key_env,
                key_sent=bool(api_key),
                secrets=(api_key,) if api_key else (),
            ),
            headers=headers,
            policy=self._policy,
            sleep=sleep,
            rand=rand,
        )
        self._staging = Staging(self.data_dir)

    def __repr__(self) -> str:
        return f"MistralProvider(name={self.name!r}, base_url={display_url(self.base_url)!r})"

    def __enter__(self) -> MistralProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- files -----------------------------------------------------------------------------

    def upload_file(
        self,
        path: Path,
        *,
        filename: str,
        purpose: str = "batch",
        progress: UploadProgress | None = None,
    ) -> RemoteFile:
        """Stage ``path`` (nothing is sent: the create converts and uploads it)."""
        staged = self._staging.stage(path)
        return RemoteFile(
            id=staged.id,
            bytes=staged.size,
            filename=filename,
            purpose=purpose,
            created_at=staged.created_at,
        )

    def get_file(self, file_id: str) -> RemoteFile:
        if not file_id.startswith("staged-"):
            response = self._http.request(
                "GET", f"/v1/files/{quote_id(file_id)}", operation=f"get file {file_id}"
            )
            return parse_file(
                _file(json_object(response, "get file", self.name, api_root=_API_ROOT))
            )
        try:
            staged = self._staging.get(file_id)
        except FileNotFoundError:
            raise RemoteNotFound(
                f"{self.name}: file {file_id} is not staged (any more); it is staged again "
                "on the next upload.",
                status=404,
            ) from None
        return RemoteFile(id=staged.id, bytes=staged.size, created_at=staged.created_at)

    def download_file(self, file_id: str, dest: Path) -> int:
        """A staged input (copied), or a Mistral file's content (a job's output or errors)."""
        if file_id.startswith("staged-"):
            source = self.get_file(file_id)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._staging.path(source.id), dest)
            return dest.stat().st_size
        return self._http.download(
            f"/v1/files/{quote_id(file_id)}/content",
            dest,
            operation=f"download of file {file_id}",
            headers={"Accept": "application/octet-stream"},
        )

    # -- jobs ------------------------------------------------------------------------------

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
    ) -> RemoteBatch:
        """Convert and upload a staged input, then create a job from it (see the docstring)."""
        staged = self.get_file(input_file_id)
        with tempfile.TemporaryDirectory(dir=self._ensure_dir()) as tmp:
            lines = Path(tmp) / "mistral_batch_input.jsonl"
            model = self._write_lines(self._staging.path(staged.id), lines)
            uploaded = self._upload(lines)
        payload: dict[str, Any] = {
            "input_files": [uploaded],
            "endpoint": endpoint,
            "model": model,
            "metadata": dict(metadata),
            "timeout_hours": mistral_lines.timeout_hours(completion_window),
        }
        created = self._send_create(payload)
        self._staging.remove(staged.id)
        return created

    def get_batch(self, batch_id: str) -> RemoteBatch:
        response = self._http.request(
            "GET", f"/v1/batch/jobs/{quote_id(batch_id)}", operation=f"get batch {batch_id}"
        )
        return redact_batch(
            parse_job(json_object(response, "get batch", self.name, api_root=_API_ROOT)),
            self._http.context,
        )

    def list_batches(
        self,
        *,
        page_size: int = _PAGE_SIZE,
        after: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Iterator[RemoteBatch]:
        """Every listed job, in Mistral's order, page by page (``metadata``: only jobs with it;
        ``after``: those listed after that job, read on our side: Mistral pages by number)."""
        return listed_after(self._pages(page_size, metadata), after)

    def _pages(self, page_size: int, metadata: Mapping[str, str] | None) -> Iterator[RemoteBatch]:
        size = max(1, min(page_size, _PAGE_SIZE))
        first_ids: set[str] = set()  # the job each page read so far began with
        for page in itertools.count():
            params: dict[str, Any] = {**(metadata or {}), "page": page, "page_size": size}
            response = self._http.request(
                "GET", "/v1/batch/jobs", operation="list batches", params=params
            )
            body = json_object(response, "list batches", self.name, api_root=_API_ROOT)
            rows = listed_rows(body, self.name, api_root=_API_ROOT)
            if rows and page:  # a page that begins as an earlier one did: the same page again
                next_page_cursor(
                    str(rows[0].get("id")), first_ids, provider=self.name, names="page / total"
                )
            elif rows:
                first_ids.add(str(rows[0].get("id")))
            for row in rows:
                job = redact_batch(parse_job(row), self._http.context)
                if all(job.metadata.get(k) == v for k, v in (metadata or {}).items()):
                    yield job
            total = body.get("total")
            seen = (page + 1) * size
            if len(rows) < size or (isinstance(total, int) and seen >= total):
                return

    def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Cancel a job: CANCELLATION_REQUESTED comes back as cancelling. A job that has ended
        before the cancel arrived is returned as it is (SUCCESS -> completed, ...), whether
        Mistral answers it ended or refuses the cancel (``_http.cancel_or_ended``)."""
        return cancel_or_ended(
            self._http,
            f"/v1/batch/jobs/{quote_id(batch_id)}/cancel",
            batch_id=batch_id,
            get_batch=self.get_batch,
            parse=lambda response: redact_batch(
                parse_job(json_object(response, "cancel batch", self.name, api_root=_API_ROOT)),
                self._http.context,
            ),
        )

    def close(self) -> None:
        self._http.close()

    # -- create internals ------------------------------------------------------------------

    def _write_lines(self, staged: Path, dest: Path) -> str:
        """Write Mistral's lines of ``staged`` to ``dest``; return the batch's one model."""
        model: str | None = None
        with open(dest, "wb") as out:
            for request in iter_requests(staged):
                try:
                    line, named = mistral_lines.to_line(json.loads(request.raw))
                except (KeyError, TypeError, ValueError) as err:
                    raise InputError(
                        f"{staged}:{request.line}: this line cannot be sent to Mistral ({err}); "
                        "run `batchspec validate` on the workspace"
                    ) from None
                if named is None or (model is not None and named != model):
                    # validate/apply check every line first; reaching this means an unchecked input
                    raise InputError(
                        f"{staged}:{request.line}: a Mistral batch job takes one model from "
                        "body.model of every line; run `batchspec validate` on the workspace"
                    )
                model = named
                out.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode())
                out.write(b"\n")
        if model is None:
            raise InputError(f"{staged}: the batch input holds no requests")
        return model

    def _upload(self, lines: Path) -> str:
        with open(lines, "rb") as handle:
            # httpx seeks the handle back to 0 for every attempt, so retries resend it whole
            response = self._http.request(
                "POST",
                "/v1/files",
                operation="upload of the batch input",
                data={"purpose": "batch"},
                files={"file": (lines.name, handle, "application/jsonl")},
            )
        return str(json_object(response, "upload file", self.name, api_root=_API_ROOT)["id"])

    def _send_create(self, payload: Mapping[str, Any]) -> RemoteBatch:
        metadata = payload["metadata"]
        keyed = all(metadata.get(k) for k in METADATA_KEYS)

        def send() -> RemoteBatch:
            response = self._http.request(
                "POST",
                "/v1/batch/jobs",
                operation="create batch",
                json=payload,
                retry_ambiguous=False,
            )
            return redact_batch(
                parse_job(json_object(response, "create batch", self.name, api_root=_API_ROOT)),
                self._http.context,
            )

        # a keyed create may still be in transit: never re-sent here (the reconciler looks it
        # up for a bounded window first); an unkeyed one cannot be told apart, so it is re-sent
        return create_or_adopt(
            send,
            lambda: self._find(payload) if keyed else None,
            policy=self._policy,
            sleep=self._sleep,
            rand=self._rand,
            resend=not keyed,
        )

    def _find(self, payload: Mapping[str, Any]) -> RemoteBatch | None:
        """The job a create whose answer was lost made, found by batchspec's key."""
        key = {k: payload["metadata"][k] for k in METADATA_KEYS}
        listed = self.list_batches(metadata=key)
        return next(itertools.islice(listed, _LOOKUP_JOBS), None)

    def _ensure_dir(self) -> Path:
        ensure_private_dir(self.data_dir)  # converted requests: as private as the state
        return self.data_dir


# ---------------------------------------------------------------------------------------------
# objects


def parse_job(data: Mapping[str, Any]) -> RemoteBatch:
    """A Mistral ``BatchJobOut`` as a ``RemoteBatch`` (see the module docstring)."""
    inputs = data.get("input_files")
    metadata = data.get("metadata")
    errors = data.get("errors")
    return RemoteBatch(
        id=required_id(data, "batch job"),
        status=mistral_lines.batch_status(data.get("status")),
        endpoint=data.get("endpoint"),
        input_file_id=str(inputs[0]) if isinstance(inputs, list) and inputs else None,
        output_file_id=optional_file_id(data, "output_file"),
        error_file_id=optional_file_id(data, "error_file"),
        request_counts=RequestCounts(
            total=_int(data.get("total_requests")),
            completed=_int(data.get("succeeded_requests")),
            failed=_int(data.get("failed_requests")),
        ),
        metadata={str(k): str(v) for k, v in metadata.items()}
        if isinstance(metadata, Mapping)
        else {},
        errors=tuple(
            BatchValidationError(code="batch_error", message=str(row.get("message") or ""))
            for row in (errors if isinstance(errors, list) else [])
            if isinstance(row, Mapping)
        ),
        created_at=_int(data.get("created_at")) or None,
        completed_at=_int(data.get("completed_at")) or None,
    )


def _file(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A Mistral file object read as OpenAI's (``size_bytes`` is its ``bytes``)."""
    return {**data, "bytes": data.get("bytes", data.get("size_bytes"))}


def _int(value: Any) -> int:
    return lenient_count(value)
