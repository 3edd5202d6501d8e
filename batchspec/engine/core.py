"""``Engine``: the local batch engine's API, OpenAI Files + Batches in-process.

Every method returns the same OpenAI-shaped dict the HTTP API returns (``objects.py``) and
raises ``EngineError`` with the HTTP status and OpenAI error fields on a refused call. The
HTTP app (``app.py``) is a thin view over this class, and the ``local`` provider calls it
directly. Methods are thread-safe; batches run on the worker thread (``worker.py``) once
``start()`` is called, and only while the engine is open: closing it leaves unfinished
batches to resume at the next ``start()``.

Choices where OpenAI is silent or unhelpful for a local engine:

- The wire ``completion_window`` is ``"24h"``, unless a dialect's route accepts more
  (Groq's ``24h`` to ``7d``: ``GROQ_WINDOWS``), the deadline then being that long;
  ``completion_window_seconds`` (a setting) shortens the real deadline so tests can expire
  a batch in seconds.
- A create repeated with the same input file, endpoint, window, metadata and output expiry
  returns the existing batch while it is unfinished or younger than ``idempotency_window``
  seconds (a retrying proxy sends POST twice). Use distinct metadata to run a file twice.
- Cancelling a ``finalizing`` or terminal (completed/failed/expired) batch answers 409;
  cancelling a ``cancelling`` or ``cancelled`` batch returns it unchanged. A cancelled batch
  starts no new line and stops once the requests it has in flight have answered (their
  answers are kept: the upstream did the work), or after ``drain_timeout`` seconds, when
  those still in flight are dropped; ``cancel_delay`` (a setting, for tests) keeps it
  ``cancelling``, its lines still running, that many seconds first, as OpenAI's may for up
  to 10 minutes.
- An endpoint OpenAI knows but the engine cannot run (images, videos) answers 422; an
  unknown endpoint 400. Unknown ids answer 404, an unknown ``after`` cursor 400.
- One engine process per data folder (an exclusive lock); a second one fails with
  ``StateLockedError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from batchspec.engine.errors import EngineError, bad_request, file_too_large, not_found
from batchspec.engine.gemini_upstream import GeminiUpstream
from batchspec.engine.messages_upstream import MessagesUpstream
from batchspec.engine.objects import batch_object, deleted_file_object, file_object, list_object
from batchspec.engine.store import EngineLock, Store, dumps, new_id, now
from batchspec.engine.upstreams import SUPPORTED_ENDPOINTS, BuiltinUpstream, Upstream
from batchspec.engine.worker import Worker, WorkerSettings
from batchspec.storage.blobstore import BlobWriter
from batchspec.wire.inputs import DEFAULT_MAX_LINE_BYTES
from batchspec.wire.retry import upstream_policy

DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
WIRE_COMPLETION_WINDOW = "24h"
DAY = 24 * 60 * 60
#: OpenAI expires batch input files after 30 days unless told otherwise.
BATCH_FILE_EXPIRY = 30 * DAY
FILE_PURPOSES = ("batch", "batch_output", "assistants", "fine-tune", "vision", "user_data", "evals")
#: Endpoints OpenAI's Batch API accepts that this engine cannot run (422, not 400).
UNSUPPORTED_OPENAI_ENDPOINTS = ("/v1/images/generations", "/v1/images/edits", "/v1/videos")
MIN_EXPIRY_SECONDS, MAX_EXPIRY_SECONDS = 3600, 30 * DAY
#: the engines started and not yet closed in this process, each with its drain timeout;
#: replaced whole under ``_RUNNING_LOCK`` (never changed in place), so a signal handler reads
#: it without a lock: see ``running_engines_drain``
_running: Mapping[int, float] = {}
_RUNNING_LOCK = threading.Lock()
#: Groq's completion windows, "24h" to "7d", in hours or days
GROQ_WINDOWS = frozenset({f"{h}h" for h in range(24, 169)} | {f"{d}d" for d in range(1, 8)})


class Engine:
    """Files and batches stored under ``data_dir``, executed against ``upstream``."""

    def __init__(
        self,
        data_dir: Path | str,
        upstream: Upstream | None = None,
        *,
        concurrency: int = 8,
        request_timeout: float = 60.0,
        completion_window_seconds: float | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        poll_interval: float = 0.5,
        max_attempts: int = 5,
        retry_base_delay: float = 0.5,
        retry_max_delay: float = 30.0,
        idempotency_window: float = 60.0,
        commit_interval: float = 0.05,
        drain_timeout: float = 30.0,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        token_limit_refusals: int = 0,
        cancel_delay: float = 0.0,
        lock_timeout: float = 0.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.data_dir = Path(data_dir)
        self._lock = EngineLock(self.data_dir)
        self._lock.acquire(lock_timeout)  # another process's engine on the folder: wait
        self.store = Store(self.data_dir)
        self.store.blobs.clean_tmp()
        self.upstream: Upstream = upstream if upstream is not None else BuiltinUpstream()
        self.completion_window_seconds = completion_window_seconds
        self.max_upload_bytes = max_upload_bytes
        self.idempotency_window = idempotency_window
        self.worker = Worker(
            self.store,
            # also runs /v1/messages (Anthropic) and /v1beta/generateContent (Gemini) lines
            MessagesUpstream(GeminiUpstream(self.upstream)),
            WorkerSettings(
                concurrency=concurrency,
                request_timeout=request_timeout,
                retry=upstream_policy(
                    max_attempts=max_attempts,
                    initial_delay=retry_base_delay,
                    max_delay=retry_max_delay,
                ),
                poll_interval=poll_interval,
                commit_interval=commit_interval,
                drain_timeout=drain_timeout,
                max_line_bytes=max_line_bytes,
                token_limit_refusals=token_limit_refusals,
                cancel_delay=cancel_delay,
            ),
        )
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Engine:
        """Begin executing (resuming any unfinished batches). Idempotent."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        self.worker.start()
        _set_running(id(self), self.worker.settings.drain_timeout)
        return self

    def close(self, *, wait_for_requests: bool = True) -> None:
        """Stop cleanly: in-flight requests finish (up to the drain timeout; at once without
        ``wait_for_requests``: they are sent again at the next start), results are committed,
        the lock is freed.

        Ctrl-C (or SIGTERM's ``Terminated``) while it waits stops the wait, not the close: the
        close still commits what finished, closes the store and frees the folder, then the
        interruption goes on. Raised in the middle of the close, it skipped all three (the
        answers of the last moments were sent, and paid for, again)."""
        if self._closed:
            return
        self._closed = True
        interrupted: list[BaseException] = []

        def stop_worker() -> None:
            self.worker.stop(wait_for_requests=wait_for_requests and not interrupted)

        steps: tuple[Callable[[], None], ...] = (
            lambda: _set_running(id(self), None),  # closing: a Ctrl-C now is not waited for
            stop_worker,
            self.store.close,
            self._lock.release,
        )
        for step in steps:
            while True:  # each step runs to its end, whatever Ctrl-C comes meanwhile
                try:
                    if interrupted:
                        self.worker.hurry()  # no more waiting for the requests in flight
                    step()
                    break
                except KeyboardInterrupt as err:  # Terminated is one too
                    interrupted.append(err)
        if interrupted:
            raise interrupted[0]

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files -------------------------------------------------------------------------------

    def open_upload(self) -> BlobWriter:
        """A writer for streaming an upload to disk under ``max_upload_bytes`` (413 past it)."""
        return self.store.blobs.writer(self.max_upload_bytes, too_large=file_too_large)

    def create_file(
        self,
        source: BinaryIO | Path | bytes,
        filename: str,
        purpose: str,
        *,
        expires_after_seconds: int | None = None,
    ) -> dict[str, Any]:
        """Store a file from a binary stream, a path or bytes; return its FileObject."""
        _check_purpose(purpose)
        writer = self.open_upload()
        try:
            if isinstance(source, bytes):
                writer.write(source)
            elif isinstance(source, Path):
                with open(source, "rb") as fh:
                    writer.copy_from(fh)
            else:
                writer.copy_from(source)
        except BaseException:
            writer.discard()
            raise
        return self.register_upload(
            writer, filename, purpose, expires_after_seconds=expires_after_seconds
        )

    def register_upload(
        self,
        writer: BlobWriter,
        filename: str,
        purpose: str,
        *,
        expires_after_seconds: int | None = None,
        file_id: str | None = None,
    ) -> dict[str, Any]:
        """Finish an upload written through ``open_upload`` and record it as a file (with
        ``file_id`` when a dialect announced the id before the bytes came: Together's)."""
        try:
            _check_purpose(purpose)
            lifetime = _file_lifetime(purpose, expires_after_seconds)
            sha256 = writer.commit()
        except BaseException:
            writer.discard()
            raise
        row = self.store.insert_file(
            sha256=sha256,
            size=writer.size,
            filename=filename or "upload.jsonl",
            purpose=purpose,
            expires_after=lifetime,
            file_id=file_id,
        )
        return file_object(row)

    def get_file(self, file_id: str) -> dict[str, Any]:
        return file_object(self._file_row(file_id))

    def file_content_path(self, file_id: str) -> Path:
        path = self.store.blobs.path(self._file_row(file_id)["sha256"])
        if not path.exists():
            raise EngineError(404, f"The content of file '{file_id}' is no longer stored.")
        return path

    def list_files(
        self,
        purpose: str | None = None,
        limit: int = 10_000,
        after: str | None = None,
        order: str = "desc",
    ) -> dict[str, Any]:
        if not 1 <= limit <= 10_000:
            raise bad_request("limit must be between 1 and 10000.", param="limit")
        if order not in ("asc", "desc"):
            raise bad_request("order must be 'asc' or 'desc'.", param="order")
        after_seq = self._cursor("files", after)
        rows = self.store.list_files(
            purpose=purpose, limit=limit + 1, after_seq=after_seq, ascending=order == "asc"
        )
        return list_object([file_object(r) for r in rows[:limit]], has_more=len(rows) > limit)

    def delete_file(self, file_id: str) -> dict[str, Any]:
        if not self.store.delete_file(file_id):
            raise not_found("file", file_id)
        return deleted_file_object(file_id)

    def _file_row(self, file_id: str) -> Any:
        row = self.store.get_file(file_id)
        if row is None:
            raise not_found("file", file_id)
        return row

    def _cursor(self, table: str, after: str | None) -> int | None:
        if after is None or after == "":
            return None
        seq = self.store.seq_of(table, after)
        if seq is None:
            raise bad_request(f"The cursor after='{after}' names no known object.", param="after")
        return seq

    # -- batches -----------------------------------------------------------------------------

    def create_batch(
        self,
        input_file_id: Any,  # these three come from a request's JSON: checked below
        endpoint: Any,
        completion_window: Any = WIRE_COMPLETION_WINDOW,
        metadata: Mapping[str, str] | None = None,
        output_expires_after: Mapping[str, Any] | None = None,
        *,
        windows: Collection[str] = (WIRE_COMPLETION_WINDOW,),
    ) -> dict[str, Any]:
        """Create a batch (status ``validating``), or return the one a repeated create made."""
        _check_batch_request(input_file_id, endpoint, completion_window, metadata, windows)
        _check_expires_after(output_expires_after, param="output_expires_after")
        input_file = self._file_row(input_file_id)
        if input_file["purpose"] != "batch":
            raise bad_request(
                f"File '{input_file_id}' has purpose '{input_file['purpose']}'; "
                "a batch input file must be uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        key = _idempotency_key(
            input_file_id, endpoint, completion_window, metadata, output_expires_after
        )
        created_at = now()
        wall = time.time()
        window = self.completion_window_seconds
        if window is None:
            window = _window_seconds(completion_window)
        deadline = wall + window
        with self.store.write() as db:
            since = created_at - math.ceil(self.idempotency_window)
            existing = self.store.find_repeated_create(db, key, since)
            if existing is not None:
                return batch_object(existing)
            batch_id = new_id("batch_")
            self.store.insert_batch(
                db,
                {
                    "id": batch_id,
                    "status": "validating",
                    "endpoint": endpoint,
                    "input_file_id": input_file_id,
                    "input_sha256": input_file["sha256"],
                    "completion_window": completion_window,
                    "metadata": dumps(dict(metadata)) if metadata is not None else None,
                    "output_expires_after": dumps(dict(output_expires_after))
                    if output_expires_after
                    else None,
                    "idempotency_key": key,
                    "created_at": created_at,
                    "expires_at": math.ceil(created_at + window),
                    "deadline": deadline,
                },
            )
            row = self.store.get_batch(batch_id, db)
        assert row is not None  # inserted in the transaction above
        self.worker.wake(created=batch_id)
        return batch_object(row)

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return batch_object(self._batch_row(batch_id))

    def list_batches(self, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        """Batches newest first; ``after`` is the last id of the previous page."""
        if not 1 <= limit <= 100:
            raise bad_request("limit must be between 1 and 100.", param="limit")
        rows = self.store.list_batches(limit=limit + 1, after_seq=self._cursor("batches", after))
        return list_object([batch_object(r) for r in rows[:limit]], has_more=len(rows) > limit)

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        moved, row = self.store.move_and_read_batch(
            batch_id,
            from_statuses=("validating", "in_progress"),
            to_status="cancelling",
            cancelling_at=now(),
        )
        if row is None:
            raise not_found("batch", batch_id)
        if not moved and row["status"] not in ("cancelling", "cancelled"):
            raise EngineError(
                409,
                f"Cannot cancel a batch with status '{row['status']}'.",
                param="batch_id",
                code="batch_not_cancellable",
            )
        self.worker.wake()
        return batch_object(row)

    def _batch_row(self, batch_id: str) -> Any:
        row = self.store.get_batch(batch_id)
        if row is None:
            raise not_found("batch", batch_id)
        return row


# ---------------------------------------------------------------------------------------------
# Request checks (400/422 before anything is stored)


def running_engines_drain() -> float | None:
    """How long the engines running in this process may take to stop (the longest drain
    timeout: each lets the requests it has sent finish, rather than send, and pay for, them
    again); None when none runs. Safe to call from a signal handler (no lock taken), so that a
    command told to stop can say what it waits for, and only when it does."""
    drains = tuple(_running.values())
    return max(drains) if drains else None


def _set_running(engine: int, drain: float | None) -> None:
    global _running
    with _RUNNING_LOCK:
        running = {k: v for k, v in _running.items() if k != engine}
        if drain is not None:
            running[engine] = drain
        _running = running


def _check_purpose(purpose: str) -> None:
    if purpose not in FILE_PURPOSES:
        raise bad_request(
            f"Invalid purpose {purpose!r}: use one of {', '.join(FILE_PURPOSES)}.",
            param="purpose",
        )


def _file_lifetime(purpose: str, expires_after_seconds: int | None) -> int | None:
    """Seconds a new file lives from its ``created_at`` (None: for ever)."""
    if expires_after_seconds is not None:
        _check_expires_after(
            {"anchor": "created_at", "seconds": expires_after_seconds}, param="expires_after"
        )
        return expires_after_seconds
    return BATCH_FILE_EXPIRY if purpose == "batch" else None


def _check_expires_after(value: Mapping[str, Any] | None, *, param: str) -> None:
    if value is None:
        return
    seconds = value.get("seconds") if isinstance(value, Mapping) else None
    anchor = value.get("anchor") if isinstance(value, Mapping) else None
    if anchor != "created_at" or not isinstance(seconds, int) or isinstance(seconds, bool):
        raise bad_request(
            f"{param} must be {{'anchor': 'created_at', 'seconds': <int>}}.", param=param
        )
    if not MIN_EXPIRY_SECONDS <= seconds <= MAX_EXPIRY_SECONDS:
        raise bad_request(
            f"{param}.seconds must be between {MIN_EXPIRY_SECONDS} and {MAX_EXPIRY_SECONDS}.",
            param=param,
        )


def _check_batch_request(
    input_file_id: Any,
    endpoint: Any,
    completion_window: Any,
    metadata: Any,
    windows: Collection[str] = (WIRE_COMPLETION_WINDOW,),
) -> None:
    if not isinstance(input_file_id, str) or not input_file_id:
        raise bad_request("input_file_id is required (a string).", param="input_file_id")
    if not isinstance(endpoint, str) or not endpoint:
        raise bad_request("endpoint is required (a string).", param="endpoint")
    if endpoint in UNSUPPORTED_OPENAI_ENDPOINTS:
        raise EngineError(
            422,
            f"The local engine cannot run {endpoint}; it runs {', '.join(SUPPORTED_ENDPOINTS)}.",
            param="endpoint",
            code="unsupported_endpoint",
        )
    if endpoint not in SUPPORTED_ENDPOINTS:
        raise bad_request(
            f"Invalid endpoint {endpoint!r}: use one of {', '.join(SUPPORTED_ENDPOINTS)}.",
            param="endpoint",
        )
    if completion_window not in windows:
        accepted = "only '24h' is" if len(windows) == 1 else "'24h' to '7d' are"
        raise bad_request(
            f"Invalid completion_window {completion_window!r}: {accepted} supported.",
            param="completion_window",
        )
    _check_metadata(metadata)


def _window_seconds(window: str) -> float:
    """Seconds of an accepted window: ``"24h"`` -> 86400, ``"7d"`` -> 604800."""
    return int(window[:-1]) * (DAY if window.endswith("d") else 3600)


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise bad_request("metadata must be an object of strings.", param="metadata")
    if len(metadata) > 16:
        raise bad_request("metadata may hold at most 16 pairs.", param="metadata")
    for key, value in metadata.items():
        if not isinstance(key, str) or len(key) > 64:
            raise bad_request("metadata keys are strings of at most 64 chars.", param="metadata")
        if not isinstance(value, str) or len(value) > 512:
            raise bad_request(
                f"metadata[{key!r}] must be a string of at most 512 chars.", param="metadata"
            )


def _idempotency_key(
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: Mapping[str, str] | None,
    output_expires_after: Mapping[str, Any] | None,
) -> str:
    canonical = json.dumps(
        [input_file_id, endpoint, completion_window, metadata or {}, output_expires_after or {}],
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
