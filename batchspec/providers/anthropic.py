"""The ``anthropic`` provider: Anthropic's Message Batches behind the ``Provider`` protocol.

Message Batches differ from OpenAI's Batch API in three ways this module absorbs:

**Inline requests.** There is no file upload: ``upload_file`` *stages* the input locally
(``staging.StagedInputs``; the file id is ``staged-<sha256>``, nothing is sent) and
``create_batch`` reads it back, turns every line into ``{"custom_id", "params"}``
(``anthropic_lines.to_request``: Anthropic lines as they are, OpenAI chat lines converted)
and POSTs them as one JSON body to ``/v1/messages/batches``, streamed from a temporary file
(so memory stays flat) with its exact ``Content-Length``. A body over 256 MB or over 100,000
requests is refused before sending; ``apply`` shards ``anthropic`` inputs at 100,000
requests and 200 MB of lines, which stays under both.

**States and results.** ``processing_status`` maps to our statuses: ``in_progress`` ->
in_progress, ``canceling`` -> cancelling, ``ended`` -> ``cancelled`` if a cancel was
initiated, else ``expired`` if any request expired, else ``completed`` (with every request
errored it is still ``completed``: the reconciler then finds no success and reports the
resource Degraded). ``request_counts``: total = all five counts, completed = succeeded,
failed = errored + canceled + expired (counts missing or all unreadable: unknown, and an
ended batch then offers both parts). An ended batch has two pseudo files,
``results:succeeded:<id>`` (output) and ``results:failed:<id>`` (errors); ``download_file``
fetches the JSONL at ``/v1/messages/batches/<id>/results`` and writes the lines of that part
in our output/error line format (``anthropic_lines.result_line``).

**No metadata, so adoption is by journal.** The reconciler finds its batches after a crash by
their metadata keys. Anthropic keeps none, so the provider journals every create locally
(``journal.Journal``: metadata, request count, digest of the custom_ids, time)
*before* sending it and records the batch id from the answer; ``get_batch`` and
``list_batches`` report the journaled metadata with each batch, so the reconciler adopts as
usual. When an answer was lost (a crash, a timeout, a 5xx after Anthropic may have acted),
the next create with the same metadata first looks for the batch it may have made: batches
listed since that create was sent, not claimed by another journal row, with the same
request count. An *ended* candidate is verified by comparing the custom_ids in its results
with the ones sent; a match is adopted. An in-progress candidate cannot be verified (its
requests cannot be read back), so the provider refuses to create another and raises a
``ProviderError`` naming it: re-running after it ends settles it (adopted if its
custom_ids match, ignored if not). It never blindly pays twice. Custom_ids say nothing of
the prompts (resources share ``req-0``, ``req-1``...): a batch another lost create of the same
count and custom_ids could have made too goes to the create sent before it was made
(``_maker``); when they were too close together to tell, it is set aside for good
(``Journal.set_aside``) and each is created anew: its requests are paid for once more, never
answered with another's prompts. A create refused for sure made nothing and is forgotten.
A batch made outside batchspec is not journaled: ``batchspec import --force`` adopts it
(there is no input file to verify it against).

Headers: ``x-api-key`` and ``anthropic-version``. Retries, backoff and error messages come
from ``_http`` (Anthropic's ``{"type": "error", "error": {type, message}}`` envelope is read
there; 529 ``overloaded_error`` is retried like any 5xx).
"""

from __future__ import annotations

import functools
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from batchspec import __version__
from batchspec.errors import InputError, ProviderError
from batchspec.providers._http import (
    ErrorContext,
    FileBody,
    RetryingClient,
    cancel_or_ended,
    create_or_adopt,
    display_url,
    json_object,
    listed_rows,
    next_page_cursor,
    pooled_client,
    quote_id,
    require_http_url,
)
from batchspec.providers.base import (
    AmbiguousOutcome,
    RemoteBatch,
    RemoteNotFound,
    RequestCounts,
    epoch_seconds,
    lenient_count,
    pause_before_retry,
    required_id,
)
from batchspec.providers.journal import Journal, JournalEntry, ids_digest, metadata_key
from batchspec.providers.staging import StagedInputs, Staging, read_records, results_file_id
from batchspec.wire import anthropic_lines
from batchspec.wire.inputs import iter_requests
from batchspec.wire.retry import client_policy

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"
MAX_REQUESTS = anthropic_lines.MAX_BATCH_REQUESTS
MAX_BODY_BYTES = anthropic_lines.MAX_BATCH_BODY_BYTES
BATCHES = "/v1/messages/batches"
#: how far before a lost create's journal time a batch may be dated and still be its own
_CLOCK_SKEW = 300
#: a create sent more than this many seconds after a batch was made did not make it (a
#: batch's ``created_at`` may be whole seconds, and two clocks differ a little); used only to
#: tell apart two lost creates that could each have made a batch (``_maker``)
_ORDER_MARGIN = 2.0
#: how long after it was sent a lost create may still have made a batch (a gateway holding
#: it; longer than any sane ``createConfirmSeconds``): an older lost create, say of a
#: resource since removed, whose row lingers, is no rival for the batches made after that
_RIVAL_REACH = 3600
_MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class _Body:
    """A create's JSON body, written to ``path``: ``{"requests": [...]}``."""

    path: Path
    size: int
    requests: int
    ids_sha256: str


class AnthropicProvider(StagedInputs):
    """A ``providers.base.Provider`` for Anthropic Message Batches (see the module docstring)."""

    lists_newest_first = True  # documented: most recently created first

    def __init__(
        self,
        name: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None,
        data_dir: Path,
        api_key_env: str | None = "ANTHROPIC_API_KEY",
        anthropic_version: str = DEFAULT_VERSION,
        default_max_tokens: int | None = None,
        client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 5,
        timeout: float = 60.0,
        sleep: Callable[[float], None] = pause_before_retry,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        require_http_url(name, base_url, where="baseUrl in batchspec.yaml")
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.data_dir = Path(data_dir)
        self.default_max_tokens = default_max_tokens or anthropic_lines.DEFAULT_MAX_TOKENS
        self._policy = client_policy(max_retries)
        self._sleep = sleep
        self._rand = rand
        self._clock = clock
        owns_client = client is None
        more = None
        if client is None:
            client, more = pooled_client(self.base_url, transport=transport, timeout=timeout)
        headers = {
            "User-Agent": f"batchspec/{__version__}",
            "Accept": "application/json",
            "anthropic-version": anthropic_version,
        }
        if api_key:
            headers["x-api-key"] = api_key
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
            more=more,
        )
        self._staging = Staging(self.data_dir)
        self._journal_db: Journal | None = None  # opened on first use: building does no I/O
        self._journal_lock = threading.Lock()  # a pass polls and downloads from threads

    def __repr__(self) -> str:
        return f"AnthropicProvider(name={self.name!r}, base_url={display_url(self.base_url)!r})"

    def __enter__(self) -> AnthropicProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def _journal(self) -> Journal:
        with self._journal_lock:
            if self._journal_db is None:
                self._journal_db = Journal(self.data_dir)
            return self._journal_db

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
        """Create a Message Batch from a staged input, never a second one for the same metadata.

        ``completion_window`` is Anthropic's fixed 24 h whatever is asked.
        """
        staged = self.get_file(input_file_id)
        key = metadata_key(metadata)
        earlier = self._journal.get(key)
        if earlier is not None:
            found = self._recorded(earlier) if earlier.remote_id else self._made_by_lost(earlier)
            if found is not None:
                self._staging.remove(staged.id)
                return found
        body = self._write_body(self._staging.path(staged.id))
        try:
            entry = JournalEntry(
                key=key,
                metadata=dict(metadata),
                endpoint=endpoint,
                file_id=staged.id,
                requests=body.requests,
                ids_sha256=body.ids_sha256,
                started_at=self._clock(),
            )
            self._journal.begin(entry)
            created = self._send_create(body, entry)
        finally:
            body.path.unlink(missing_ok=True)
        self._staging.remove(staged.id)
        return created

    def get_batch(self, batch_id: str) -> RemoteBatch:
        response = self._http.request(
            "GET", f"{BATCHES}/{quote_id(batch_id)}", operation=f"get batch {batch_id}"
        )
        return self._parse(self._json(response, "get batch"))

    def list_batches(
        self, *, page_size: int = 100, after: str | None = None
    ) -> Iterator[RemoteBatch]:
        """Every listed batch, newest first (Anthropic's order), fetched page by page;
        ``after``: those listed after that batch id (Anthropic's ``after_id``)."""
        limit = max(1, min(page_size, _MAX_PAGE_SIZE))
        used: set[str] = set() if after is None else {after}
        while True:
            params: dict[str, Any] = {"limit": limit}
            if after is not None:
                params["after_id"] = after
            response = self._http.request("GET", BATCHES, operation="list batches", params=params)
            page = self._json(response, "list batches")
            rows = listed_rows(
                page, self.name, api_root=f"Anthropic's API root ({DEFAULT_BASE_URL})"
            )
            journal = self._journal.by_remote_id()
            for row in rows:
                yield self._parse(row, journal)
            next_after = page.get("last_id") or (rows[-1].get("id") if rows else None)
            if not page.get("has_more") or not rows or not next_after:
                return
            after = next_page_cursor(
                str(next_after), used, provider=self.name, names="after_id / last_id / has_more"
            )

    def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Cancel a batch: ``canceling`` comes back as cancelling. One that has ended before
        the cancel arrived is returned as it is (completed, expired, cancelled), whether
        Anthropic answers it ended or refuses the cancel (``_http.cancel_or_ended``)."""
        return cancel_or_ended(
            self._http,
            f"{BATCHES}/{quote_id(batch_id)}/cancel",
            batch_id=batch_id,
            get_batch=self.get_batch,
            parse=lambda response: self._parse(self._json(response, "cancel batch")),
        )

    def close(self) -> None:
        self._http.close()
        if self._journal_db is not None:
            self._journal_db.close()
            self._journal_db = None

    # -- create internals ------------------------------------------------------------------

    def _write_body(self, staged: Path) -> _Body:
        """Convert the staged lines into the create's JSON body, in a temporary file."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.data_dir, prefix="create-", suffix=".json")
        path = Path(name)
        ids: list[str] = []
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(b'{"requests":[')
                for request in iter_requests(staged):
                    converted = self._request(staged, request.line, request.raw)
                    out.write((b"," if ids else b"") + _dumps(converted))
                    ids.append(request.custom_id)
                out.write(b"]}")
            size = path.stat().st_size
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if not ids or len(ids) > MAX_REQUESTS or size > MAX_BODY_BYTES:
            path.unlink(missing_ok=True)
            raise ProviderError(
                f"{self.name}: a Message Batch holds 1 to {MAX_REQUESTS:,} requests in at most "
                f"{MAX_BODY_BYTES // (1024 * 1024)} MB; this one would hold {len(ids):,} "
                f"requests in {size:,} bytes. Lower maxRequestsPerBatch / maxBytesPerBatch "
                f"of provider {self.name!r} in batchspec.yaml so that shards fit."
            )
        return _Body(path, size, len(ids), ids_digest(ids))

    def _request(self, staged: Path, line: int, raw: bytes) -> dict[str, Any]:
        try:
            return anthropic_lines.to_request(
                json.loads(raw), default_max_tokens=self.default_max_tokens
            )
        except (anthropic_lines.Unmappable, KeyError, TypeError, ValueError) as err:
            # validate/apply check every line first; reaching this means an unchecked input
            raise InputError(
                f"{staged}:{line}: this line cannot be sent to Anthropic ({err}); "
                "run `batchspec validate` on the workspace"
            ) from None

    def _send_create(self, body: _Body, entry: JournalEntry) -> RemoteBatch:
        """Send the create once (``_http`` retries what surely did not reach Anthropic)."""
        headers = {"Content-Type": "application/json", "Content-Length": str(body.size)}

        def send() -> RemoteBatch:
            try:
                response = self._http.request(
                    "POST",
                    BATCHES,
                    operation="create batch",
                    content=FileBody(body.path),
                    headers=headers,
                    retry_ambiguous=False,
                )
            except AmbiguousOutcome:
                raise
            except ProviderError:
                # refused for sure (a 4xx, a 429 past its retries): no batch was made. Left
                # unconfirmed, the row took as its own, at the next create, a batch another
                # resource's lost create made with the same custom_ids
                self._journal.forget(entry.key)
                raise
            data = self._json(response, "create batch")
            self._journal.confirm(entry.key, str(data["id"]))
            return self._parse(data)

        # a lost create may still be in transit: never re-sent here (the journal keeps it
        # unconfirmed; the reconciler waits its bounded window before creating again)
        return create_or_adopt(
            send,
            functools.partial(self._made_by_lost, entry),
            policy=self._policy,
            sleep=self._sleep,
            rand=self._rand,
            resend=False,
        )

    def _recorded(self, entry: JournalEntry) -> RemoteBatch | None:
        """The batch a confirmed journal row names; None when Anthropic no longer has it."""
        assert entry.remote_id is not None
        try:
            return self.get_batch(entry.remote_id)
        except RemoteNotFound:
            self._journal.forget(entry.key)
            return None

    def _made_by_lost(self, entry: JournalEntry) -> RemoteBatch | None:
        """The batch a create whose answer was lost made, None if it made none; or refuse.

        See the module docstring: candidates are unclaimed batches listed since the create
        was sent with its request count; an ended one is verified by its custom_ids.
        """
        since = entry.started_at - _CLOCK_SKEW
        claimed = self._journal.by_remote_id()
        # other lost creates of as many requests with the same custom_ids (resources reuse
        # req-0, req-1...): a batch ended with them is as much theirs, and taken as this
        # one's its answers (to other prompts) were written as this resource's results
        rivals = [
            other
            for other in self._journal.unconfirmed()
            if other.key != entry.key
            and (other.requests, other.ids_sha256) == (entry.requests, entry.ids_sha256)
        ]
        unsure: list[RemoteBatch] = []
        for batch in self.list_batches(page_size=100):
            if batch.created_at is not None and batch.created_at < since:
                break
            counts = batch.request_counts
            if batch.id in claimed or counts is None or counts.total != entry.requests:
                continue
            if not batch.is_terminal:
                unsure.append(batch)
            elif self._result_ids_digest(batch.id) == entry.ids_sha256:
                maker = _maker(batch, entry, rivals)
                if maker is None:
                    # its maker cannot be told: set aside for good, for this create and its
                    # rivals alike (one left alone later would take it, whoever made it).
                    # Taken, it wrote one resource's answers as another's; set aside, its
                    # requests are paid for once more, the cost of a lost create not found
                    self._journal.set_aside(batch.id)
                if maker is not entry:
                    continue  # another lost create's batch, or set aside
                self._journal.confirm(entry.key, batch.id)
                return self.get_batch(batch.id)
        if not unsure:
            return None
        raise ProviderError(_unsure_message(self.name, entry, unsure), retryable=False)

    def _result_ids_digest(self, batch_id: str) -> str:
        ids: set[str] = set()
        with tempfile.TemporaryDirectory(dir=self._ensure_dir()) as tmp:
            raw = Path(tmp) / "results.jsonl"
            self._fetch_results(batch_id, raw)
            for record in read_records(raw):
                if isinstance(record.get("custom_id"), str):
                    ids.add(record["custom_id"])
        return ids_digest(ids)

    # -- results ---------------------------------------------------------------------------

    def _download_results(self, batch_id: str, succeeded: bool, dest: Path) -> int:
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        with tempfile.TemporaryDirectory(dir=self._ensure_dir()) as tmp:
            raw = Path(tmp) / "results.jsonl"
            self._fetch_results(batch_id, raw)
            written = 0
            try:
                with open(partial, "wb") as out:
                    for record in read_records(raw):
                        if anthropic_lines.is_success(record) != succeeded:
                            continue
                        line = _dumps(anthropic_lines.result_line(batch_id, record)) + b"\n"
                        out.write(line)
                        written += len(line)
                    out.flush()
                    os.fsync(out.fileno())
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, dest)
        return written

    def _fetch_results(self, batch_id: str, dest: Path) -> int:
        return self._http.download(
            f"{BATCHES}/{quote_id(batch_id)}/results",
            dest,
            operation=f"download of the results of batch {batch_id}",
            headers={"Accept": "application/binary"},
        )

    def _ensure_dir(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    # -- parsing ---------------------------------------------------------------------------

    def _json(self, response: httpx.Response, operation: str) -> Mapping[str, Any]:
        return json_object(
            response, operation, self.name, api_root=f"Anthropic's API root ({DEFAULT_BASE_URL})"
        )

    def _parse(
        self, data: Mapping[str, Any], journal: Mapping[str, JournalEntry] | None = None
    ) -> RemoteBatch:
        entry = (journal if journal is not None else self._journal.by_remote_id()).get(
            str(data["id"])
        )
        return parse_message_batch(data, entry)


def parse_message_batch(data: Mapping[str, Any], entry: JournalEntry | None) -> RemoteBatch:
    """A MessageBatch as a ``RemoteBatch`` (see the module docstring for the mapping)."""
    batch_id = required_id(data, "message batch")
    raw = data.get("request_counts")
    counts = {
        kind: lenient_count(raw.get(kind)) if isinstance(raw, Mapping) else 0
        for kind in ("processing", "succeeded", "errored", "canceled", "expired")
    }
    unsuccessful = counts["errored"] + counts["canceled"] + counts["expired"]
    # a batch holds at least one request: no count read means the counts are unknown (a
    # gateway trimmed them), and then an ended batch offers both parts of its results
    known = isinstance(raw, Mapping) and sum(counts.values()) > 0
    processing = str(data.get("processing_status") or "unknown").lower()
    ended = processing == "ended"
    if processing == "canceling":
        status = "cancelling"
    elif ended and data.get("cancel_initiated_at"):
        status = "cancelled"
    elif ended:
        status = "expired" if counts["expired"] else "completed"
    else:
        status = processing  # in_progress, or kept as it came (then never terminal)
    return RemoteBatch(
        id=batch_id,
        status=status,
        endpoint=entry.endpoint if entry else None,
        input_file_id=entry.file_id if entry else None,
        output_file_id=results_file_id("succeeded", batch_id)
        if ended and (counts["succeeded"] or not known)
        else None,
        error_file_id=results_file_id("failed", batch_id)
        if ended and (unsuccessful or not known)
        else None,
        completion_window="24h",
        request_counts=RequestCounts(
            total=sum(counts.values()), completed=counts["succeeded"], failed=unsuccessful
        )
        if known
        else None,
        usage=None,  # Message Batches report no usage; the results carry it per message
        metadata=dict(entry.metadata) if entry else {},
        created_at=epoch_seconds(data.get("created_at")),
        expires_at=epoch_seconds(data.get("expires_at")),
        completed_at=epoch_seconds(data.get("ended_at")),
    )


def _maker(
    batch: RemoteBatch, entry: JournalEntry, rivals: list[JournalEntry]
) -> JournalEntry | None:
    """Which lost create made ``batch`` (ended with ``entry``'s custom_ids, dated within its
    window): ``entry`` if no rival's window (``_CLOCK_SKEW`` before it was sent to
    ``_RIVAL_REACH`` after) holds the batch too; else the only one of them sent before the
    batch was made (``_ORDER_MARGIN``); None when the order cannot tell."""
    created = batch.created_at
    could = [entry] + [
        other
        for other in rivals
        if created is None
        or other.started_at - _CLOCK_SKEW <= created <= other.started_at + _RIVAL_REACH
    ]
    if len(could) == 1:
        return entry
    if created is None:
        return None
    before = [e for e in could if e.started_at <= created + _ORDER_MARGIN]
    return before[0] if len(before) == 1 else None


def _what(entry: JournalEntry) -> str:
    meta = entry.metadata
    return (
        f"{meta.get('batchspec_resource')} shard {int(meta.get('batchspec_shard', 0)) + 1} "
        f"attempt {meta.get('batchspec_attempt')}"
        if "batchspec_resource" in meta
        else "this batch"
    )


def _unsure_message(provider: str, entry: JournalEntry, unsure: list[RemoteBatch]) -> str:
    what = _what(entry)
    sent = datetime.fromtimestamp(entry.started_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    shown = ", ".join(f"{b.id} ({b.status})" for b in unsure[:5])
    return (
        f"{provider}: the create of {what} sent at {sent} lost its answer, and Anthropic "
        f"batches carry no metadata to recognise it by. {shown} holds the same number of "
        f"requests ({entry.requests}) but cannot be checked until it has ended. Nothing "
        "was created, so nothing is paid twice: re-run `batchspec apply` once it has ended "
        "(it is adopted if its custom_ids match, ignored if not), or cancel it on Anthropic's "
        "side if it is not yours."
    )


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
