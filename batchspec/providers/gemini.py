"""The ``gemini`` provider: Gemini API Batch Mode behind the ``Provider`` protocol.

Batch Mode differs from OpenAI's Batch API in ways this module absorbs:

**Requests inline or in a file, by size.** ``upload_file`` *stages* the input locally
(``staging.StagedInputs``; the file id is ``staged-<sha256>``, nothing is sent), because
the create names the model in its URL and decides between the two forms Gemini takes.
``create_batch`` converts every line to a GenerateContentRequest
(``gemini_lines.to_request``: Gemini lines as they are, OpenAI chat lines converted) and
sends them inline (``inputConfig.requests``, each with ``metadata.key`` = the custom_id)
when they fit in ``inlineMaxBytes`` (default 19 MB, under Gemini's 20 MB), else uploads them
as a JSONL file of ``{"key", "request"}`` lines with Google's resumable protocol (``POST
/upload/v1beta/files``, then the bytes to the session URL, 8 MiB at a time, the last chunk
``upload, finalize``; the session URL is taken on our base URL's host and gets no API key)
and creates the batch from ``inputConfig.fileName``. The model is the lines' (one per batch,
as ``validate`` checks). A file over 2 GB is refused before sending.

**States and results.** ``metadata.state`` (``BATCH_STATE_*``, or ``JOB_STATE_*``) maps to our
statuses: PENDING -> validating, RUNNING -> in_progress, SUCCEEDED -> completed, FAILED ->
failed, CANCELLED -> cancelled, EXPIRED -> expired, CANCELLING (the SDK's
``JOB_STATE_CANCELLING``) -> cancelling; another state is kept (never terminal). A batch a
cancel was accepted for is ``cancelling`` until it ends (Gemini keeps it RUNNING meanwhile);
a cancel that finds it ended returns it as it ended.
``batchStats`` (int64 strings): total = requestCount, completed = successfulRequestCount,
failed = failedRequestCount (none of them read: unknown, and a done batch then offers both
parts). A done batch has two pseudo files, ``results:succeeded:<name>``
(output) and ``results:failed:<name>`` (errors): ``download_file`` reads
``metadata.output`` (``inlinedResponses`` from the batch itself, or the ``responsesFile``
from ``/download/v1beta/files/<id>:download?alt=media``) and writes the lines of that part in
our line format (``gemini_lines.result_line``, joined by key). Requests a cancel or expiry
left without an answer have no line: they stay unresolved and the next attempt retries them.
Usage: Gemini reports none per batch; for inline batches it is summed from the responses'
``usageMetadata``; a file batch's lines keep ``usageMetadata`` in their bodies.

**Adoption by display name.** Gemini batches carry no metadata, but a display name:
batchspec's key is written there (``batchspec/<resource>/<spec>/<shard>/<attempt>``) and read
back as the batch's metadata, so the reconciler finds its batches after a crash by listing
them, as with OpenAI. A create whose answer was lost (a timeout, a 5xx after Gemini may have
acted) is never sent again blindly: the batches listed are searched for its display name
first, and a keyed one not found there is not sent again by the provider at all (it may
still be in transit; the reconciler looks it up through its confirm window). The manifest's
own ``metadata`` pairs are not sent (Gemini has nowhere to keep them).

Auth: ``x-goog-api-key``. Retries, backoff and error messages come from ``_http`` (Google's
``{"error": {code, message, status}}`` envelope is read there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from batchspec import __version__
from batchspec.errors import InputError, ProviderError
from batchspec.providers._http import (
    ErrorContext,
    RetryingClient,
    cancel_or_ended,
    create_or_adopt,
    display_url,
    json_object,
    new_client,
    next_page_cursor,
    redact_batch,
    redact_file,
    require_http_url,
)
from batchspec.providers.base import (
    METADATA_KEYS,
    BatchValidationError,
    RemoteBatch,
    RemoteNotFound,
    RequestCounts,
    Usage,
    epoch_seconds,
    lenient_count,
    listed_after,
    pause_before_retry,
)
from batchspec.providers.staging import StagedInputs, Staging, read_records, results_file_id
from batchspec.storage.private import ensure_private_dir
from batchspec.wire import gemini_lines
from batchspec.wire.batch_status import TERMINAL_STATUSES
from batchspec.wire.inputs import iter_requests
from batchspec.wire.retry import client_policy

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
DEFAULT_API_VERSION = "v1beta"
#: inline requests up to this many bytes of JSON (Gemini's limit is 20 MB for the whole body)
DEFAULT_INLINE_MAX_BYTES = 19 * 1024 * 1024
#: the most of one answer read into memory: an inline batch's operation carries all its
#: answers (up to 19 MB of requests can ask for far more than _http's 256 MiB of answers)
INLINE_RESULTS_MAX_BYTES = 2 * 1024 * 1024 * 1024
MAX_FILE_BYTES = gemini_lines.MAX_FILE_BYTES
DISPLAY_PREFIX = "batchspec"
#: how many list pages a lost create's lookup reads before it gives up
_LOOKUP_PAGES = 10
_PAGE_SIZE = 100
_UPLOAD_CHUNK = 8 * 1024 * 1024
_FRACTION = re.compile(r"\.\d+")


class GeminiProvider(StagedInputs):
    """A ``providers.base.Provider`` for Gemini Batch Mode (see the module docstring)."""

    lists_newest_first = False  # Gemini documents no order for its listing

    def __init__(
        self,
        name: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None,
        data_dir: Path,
        api_key_env: str | None = "GEMINI_API_KEY",
        api_version: str = DEFAULT_API_VERSION,
        inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES,
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
        self.api_version = api_version.strip("/")
        self.inline_max_bytes = inline_max_bytes
        self._policy = client_policy(max_retries)
        self._sleep = sleep
        self._rand = rand
        owns_client = client is None
        if client is None:
            client = new_client(self.base_url, transport=transport, timeout=timeout)
        context = ErrorContext(
            provider=name,
            base_url=display_url(self.base_url),
            api_key_env=api_key_env,
            key_sent=bool(api_key),
            secrets=(api_key,) if api_key else (),
        )
        headers = {"User-Agent": f"batchspec/{__version__}", "Accept": "application/json"}
        self._http = RetryingClient(
            base_url=self.base_url,
            client=client,
            owns_client=owns_client,
            context=context,
            headers={**headers, **({"x-goog-api-key": api_key} if api_key else {})},
            policy=self._policy,
            sleep=sleep,
            rand=rand,
            # an inline batch's answers come inside its operation, read whole: a cap any
            # other Batch API answer stays far below would leave paid-for results uncollected
            max_answer_bytes=INLINE_RESULTS_MAX_BYTES,
        )
        # the upload session URL is its own credential: the key is never sent there
        self._uploads = RetryingClient(
            base_url="",
            client=client,
            owns_client=False,
            context=context,
            headers=headers,
            policy=self._policy,
            sleep=sleep,
            rand=rand,
        )
        self._staging = Staging(self.data_dir)

    def __repr__(self) -> str:
        return f"GeminiProvider(name={self.name!r}, base_url={display_url(self.base_url)!r})"

    def __enter__(self) -> GeminiProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def _api(self) -> str:
        return f"/{self.api_version}"

    # -- files: staged locally -------------------------------------------------------------

    # -- batches ---------------------------------------------------------------------------

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
    ) -> RemoteBatch:
        """Create a batch from a staged input, inline or from an uploaded file by size.

        ``completion_window`` is Gemini's own (48 h) whatever is asked.
        """
        staged = self.get_file(input_file_id)
        display_name = display_name_for(metadata)
        with tempfile.TemporaryDirectory(dir=self._ensure_dir()) as tmp:
            lines = Path(tmp) / "requests.jsonl"
            model, size = self._write_file_lines(self._staging.path(staged.id), lines)
            if size + 1024 <= self.inline_max_bytes:
                source: dict[str, Any] = {"requests": {"requests": list(_inline(lines))}}
            elif size > MAX_FILE_BYTES:
                raise ProviderError(
                    f"{self.name}: a Gemini batch file holds at most 2 GB; this one would be "
                    f"{size:,} bytes. Lower maxBytesPerBatch of provider {self.name!r} in "
                    "batchspec.yaml so that shards fit."
                )
            else:
                source = {"fileName": self._upload(lines, size, display_name)}
        payload = {"batch": {"displayName": display_name, "inputConfig": source}}
        created = self._send_create(model, payload, display_name)
        self._staging.remove(staged.id)
        return created

    def get_batch(self, batch_id: str) -> RemoteBatch:
        return redact_batch(parse_operation(self._operation(batch_id)), self._http.context)

    def list_batches(
        self, *, page_size: int = _PAGE_SIZE, after: str | None = None
    ) -> Iterator[RemoteBatch]:
        """Every listed batch, in Gemini's order, fetched page by page (``after``: those
        listed after that batch, read on our side: Gemini's cursor is a page token)."""
        return listed_after(self._pages(page_size), after)

    def _pages(self, page_size: int) -> Iterator[RemoteBatch]:
        token: str | None = None
        used: set[str] = set()
        while True:
            params: dict[str, Any] = {"pageSize": max(1, min(page_size, 1000))}
            if token:
                params["pageToken"] = token
            response = self._http.request(
                "GET", f"{self._api}/batches", operation="list batches", params=params
            )
            page = _json(response, "list batches", self.name)
            for row in _listed_operations(page, self.name):
                if isinstance(row, Mapping) and row.get("name"):
                    yield redact_batch(parse_operation(row), self._http.context)
            next_token = page.get("nextPageToken")
            if not next_token:
                return
            token = next_page_cursor(
                str(next_token), used, provider=self.name, names="pageToken / nextPageToken"
            )

    def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Cancel a batch. ``:cancel`` answers an empty body, so the batch is read back: one
        that has ended (SUCCEEDED, FAILED, EXPIRED, CANCELLED) is returned as it is, also when
        the cancel is refused because it ended first (``_http.cancel_or_ended``); one still
        PENDING or RUNNING is cancelling (Gemini has no state of its own for that)."""

        def after_cancel(_response: httpx.Response) -> RemoteBatch:
            remote = self.get_batch(batch_id)
            if remote.is_terminal:
                return remote
            return dataclasses.replace(remote, status="cancelling")

        return cancel_or_ended(
            self._http,
            f"{self._api}/{_batch_path(batch_id)}:cancel",
            batch_id=batch_id,
            get_batch=self.get_batch,
            parse=after_cancel,
        )

    def close(self) -> None:
        self._http.close()

    # -- create internals ------------------------------------------------------------------

    def _write_file_lines(self, staged: Path, dest: Path) -> tuple[str, int]:
        """Convert the staged lines to ``{"key", "request"}`` lines; return (model, bytes)."""
        model: str | None = None
        size = 0
        with open(dest, "wb") as out:
            for request in iter_requests(staged):
                line = json.loads(request.raw)
                try:
                    converted = gemini_lines.to_request(line)
                except (gemini_lines.Unmappable, KeyError, TypeError, ValueError) as err:
                    # validate/apply check every line first; reaching this means an unchecked input
                    raise InputError(
                        f"{staged}:{request.line}: this line cannot be sent to Gemini ({err}); "
                        "run `batchspec validate` on the workspace"
                    ) from None
                if model is None:
                    model = gemini_lines.model_name(str(line["body"]["model"]))
                record = _dumps({"key": request.custom_id, "request": converted}) + b"\n"
                out.write(record)
                size += len(record)
        if model is None:
            raise InputError(f"{staged}: the batch input holds no requests")
        return model, size

    def _upload(self, lines: Path, size: int, display_name: str) -> str:
        """Upload the request lines with the resumable protocol; return the file's name."""
        started = self._http.request(
            "POST",
            f"/upload/{self.api_version}/files",
            operation="upload of the batch requests",
            json={"file": {"displayName": display_name}},
            headers={
                "X-Goog-Upload-Protocol": "resumable",
                "X-Goog-Upload-Command": "start",
                "X-Goog-Upload-Header-Content-Length": str(size),
                "X-Goog-Upload-Header-Content-Type": "application/jsonl",
            },
        )
        session = started.headers.get("x-goog-upload-url")
        if not session:
            raise ProviderError(
                f"{self.name}: the upload was not given a session URL (X-Goog-Upload-URL); is "
                f"the base URL Gemini's API root ({DEFAULT_BASE_URL})?"
            )
        url = self._on_our_host(session)
        offset = 0
        answer: httpx.Response | None = None
        with open(lines, "rb") as handle:
            while True:
                chunk = handle.read(_UPLOAD_CHUNK)
                last = offset + len(chunk) >= size
                answer = self._uploads.request(
                    "POST",
                    url,
                    operation="upload of the batch requests",
                    content=chunk,
                    headers={
                        "X-Goog-Upload-Command": "upload, finalize" if last else "upload",
                        "X-Goog-Upload-Offset": str(offset),
                    },
                )
                offset += len(chunk)
                if last:
                    break
        body = _json(answer, "upload of the batch requests", self.name, required=None)
        file = body.get("file")
        if not isinstance(file, Mapping) or not file.get("name"):
            raise ProviderError(f"{self.name}: the finished upload did not name its file.")
        return str(file["name"])

    def _on_our_host(self, session: str) -> str:
        """The session URL on our base URL's scheme and host (as the official SDK does)."""
        ours, theirs = urlsplit(self.base_url), urlsplit(session)
        return urlunsplit((ours.scheme, ours.netloc, theirs.path, theirs.query, ""))

    def _send_create(
        self, model: str, payload: Mapping[str, Any], display_name: str
    ) -> RemoteBatch:
        body = _dumps(payload)
        path = f"{self._api}/models/{model}:batchGenerateContent"
        headers = {"Content-Type": "application/json"}

        def send() -> RemoteBatch:
            response = self._http.request(
                "POST",
                path,
                operation="create batch",
                content=body,
                headers=headers,
                retry_ambiguous=False,
            )
            return redact_batch(
                parse_operation(_json(response, "create batch", self.name)), self._http.context
            )

        # a keyed create may still be in transit (a gateway holding it past our timeout):
        # never re-sent here; the reconciler looks it up for a bounded window before it
        # creates again (an unkeyed one cannot be told apart, so it is re-sent)
        return create_or_adopt(
            send,
            lambda: self._find(display_name),
            policy=self._policy,
            sleep=self._sleep,
            rand=self._rand,
            resend=display_name == DISPLAY_PREFIX,
        )

    def _find(self, display_name: str) -> RemoteBatch | None:
        """The batch a create whose answer was lost made, found by its display name."""
        if display_name == DISPLAY_PREFIX:
            return None  # not batchspec's key: nothing to recognise it by
        wanted = metadata_of(display_name)
        for index, batch in enumerate(self.list_batches()):
            if batch.metadata == wanted:
                return batch
            if index >= _LOOKUP_PAGES * _PAGE_SIZE:
                break
        return None

    # -- results ---------------------------------------------------------------------------

    def _operation(self, batch_id: str) -> Mapping[str, Any]:
        response = self._http.request(
            "GET", f"{self._api}/{_batch_path(batch_id)}", operation=f"get batch {batch_id}"
        )
        return _json(response, "get batch", self.name)

    def _download_results(self, name: str, succeeded: bool, dest: Path) -> int:
        output = _output(self._operation(name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        with tempfile.TemporaryDirectory(dir=self._ensure_dir()) as tmp:
            written = 0
            try:
                with open(partial, "wb") as out:
                    for record in self._records(output, Path(tmp) / "responses.jsonl"):
                        if gemini_lines.is_success(record) != succeeded:
                            continue
                        line = _dumps(gemini_lines.result_line(name, record)) + b"\n"
                        out.write(line)
                        written += len(line)
                    out.flush()
                    os.fsync(out.fileno())
                # inline answers come in the operation, not through a download: kept without
                # the key as a downloaded file is
                written = redact_file(partial, self._http.context.file_forms())
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, dest)
        return written

    def _records(self, output: Mapping[str, Any], scratch: Path) -> Iterator[Mapping[str, Any]]:
        inlined = output.get("inlinedResponses")
        if isinstance(inlined, Mapping):
            rows = inlined.get("inlinedResponses") or []
            yield from (row for row in rows if isinstance(row, Mapping))
            return
        responses_file = output.get("responsesFile")
        if not responses_file:
            return
        self._http.download(
            f"/download/{self.api_version}/{responses_file}:download?alt=media",
            scratch,
            operation=f"download of the results file {responses_file}",
        )
        yield from read_records(scratch)

    def _ensure_dir(self) -> Path:
        ensure_private_dir(self.data_dir)  # converted requests and answers: private
        return self.data_dir


# ---------------------------------------------------------------------------------------------
# display names and operations


def display_name_for(metadata: Mapping[str, str]) -> str:
    """``batchspec/<resource>/<spec>/<shard>/<attempt>``: batchspec's key, where Gemini keeps it."""
    if not all(metadata.get(key) for key in METADATA_KEYS):
        return DISPLAY_PREFIX
    return "/".join([DISPLAY_PREFIX, *(metadata[key] for key in METADATA_KEYS)])


def metadata_of(display_name: Any) -> dict[str, str]:
    """batchspec's metadata pairs read back from a display name; none for another name."""
    parts = str(display_name or "").split("/")
    if len(parts) != len(METADATA_KEYS) + 1 or parts[0] != DISPLAY_PREFIX:
        return {}
    return dict(zip(METADATA_KEYS, parts[1:], strict=True))


def parse_operation(data: Mapping[str, Any]) -> RemoteBatch:
    """A batch Operation as a ``RemoteBatch`` (see the module docstring for the mapping)."""
    name = str(data["name"])
    meta = _batch_fields(data)
    status = gemini_lines.batch_status(meta.get("state"))
    stats = meta.get("batchStats")
    counts = None
    if isinstance(stats, Mapping):
        counts = RequestCounts(
            total=_int(stats.get("requestCount")),
            completed=_int(stats.get("successfulRequestCount")),
            failed=_int(stats.get("failedRequestCount")),
        )
        if not (counts.total or counts.completed or counts.failed):
            counts = None  # a batch holds a request: none counted is counts unknown (trimmed)
    done = status in TERMINAL_STATUSES and status != "failed"
    output = _output(data)
    inlined = output.get("inlinedResponses")
    rows = inlined.get("inlinedResponses") if isinstance(inlined, Mapping) else None
    usage = None
    if isinstance(rows, list):
        responses = [r["response"] for r in rows if isinstance(r, Mapping) and r.get("response")]
        prompt, candidates, total = gemini_lines.usage_totals(responses)
        usage = Usage(input_tokens=prompt, output_tokens=candidates, total_tokens=total)
    error = data.get("error")
    errors: tuple[BatchValidationError, ...] = ()
    if isinstance(error, Mapping):
        errors = (
            BatchValidationError(
                code=str(error.get("status") or error.get("code") or "batch_failed"),
                message=str(error.get("message") or ""),
            ),
        )
    return RemoteBatch(
        id=name,
        status=status,
        output_file_id=results_file_id("succeeded", name)
        if done and (counts is None or counts.completed)
        else None,
        error_file_id=results_file_id("failed", name)
        if done and (counts is None or counts.failed)
        else None,
        completion_window="48h",
        request_counts=counts,
        usage=usage,
        metadata=metadata_of(meta.get("displayName")),
        errors=errors,
        created_at=_epoch(meta.get("createTime")),
        completed_at=_epoch(meta.get("endTime")),
    )


def _batch_fields(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The GenerateContentBatch of an Operation: its ``metadata`` (``response`` once done)."""
    meta = data.get("metadata")
    if isinstance(meta, Mapping) and meta:
        return meta
    response = data.get("response")
    return response if isinstance(response, Mapping) else {}


def _output(data: Mapping[str, Any]) -> Mapping[str, Any]:
    for holder in (data.get("metadata"), data.get("response")):
        if isinstance(holder, Mapping) and isinstance(holder.get("output"), Mapping):
            output: Mapping[str, Any] = holder["output"]
            return output
    return {}


def _batch_path(batch_id: str) -> str:
    short = batch_id.removeprefix("batches/")
    if not short or "/" in short or ":" in short:
        raise RemoteNotFound(f"no such Gemini batch {batch_id!r}", status=404)
    return f"batches/{short}"


def _inline(lines: Path) -> Iterator[dict[str, Any]]:
    for record in read_records(lines):
        yield {"request": record["request"], "metadata": {"key": record["key"]}}


def _json(
    response: httpx.Response, operation: str, provider: str, *, required: str | None = "name"
) -> Mapping[str, Any]:
    return json_object(
        response,
        operation,
        provider,
        api_root=f"Gemini's API root ({DEFAULT_BASE_URL})",
        required=required,
    )


#: the fields of a ListOperationsResponse; Google omits an empty list, so ``{}`` is a listing
_LISTING_KEYS = frozenset({"operations", "nextPageToken", "unreachable"})


def _listed_operations(page: Mapping[str, Any], provider: str) -> list[Any]:
    """The operations of one page of a listing, or a ``ProviderError`` when the page is none:
    a 200 holding some other JSON object (a gateway's notice) read as an empty page would
    have a key lookup take the key as absent and create (and pay for) its batch again."""
    rows = page.get("operations", [])
    if not isinstance(rows, list) or (page and not _LISTING_KEYS.intersection(page)):
        keys = ", ".join(sorted(map(str, page))[:5])
        raise ProviderError(
            f"{provider}: list batches answered HTTP 200 with a JSON object that is not a "
            f"listing (no operations list; keys: {keys}); is the base URL Gemini's API root "
            f"({DEFAULT_BASE_URL})?"
        )
    return rows


def _epoch(value: Any) -> int | None:
    """Unix seconds from an RFC 3339 time with any fraction (Google writes nanoseconds)."""
    return epoch_seconds(_FRACTION.sub("", str(value), count=1)) if value else None


def _int(value: Any) -> int:
    return lenient_count(value)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
