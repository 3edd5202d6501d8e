"""The provider protocol: upload a file, create/get/list/cancel a batch, download a file.

Every provider family (OpenAI-compatible, Azure, Anthropic, the in-process local engine)
implements ``Provider`` and returns these frozen dataclasses, parsed leniently: unknown
fields are ignored, nulls are tolerated, statuses are normalised to lower case and an
unrecognised status is kept as it came (``BatchStatus.is_terminal`` is then False, so the
reconciler keeps polling rather than guessing). Ids are opaque strings of any length.

Failures raise ``batchspec.errors.ProviderError`` carrying the provider's status, message,
code and request id, never our API key. A missing object raises ``RemoteNotFound``.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from batchspec.errors import ProviderError
from batchspec.wire.batch_status import TERMINAL_STATUSES, normal_status

#: the metadata pairs that make a remote batch batchspec's own: together, one attempt's key
METADATA_KEYS = ("batchspec_resource", "batchspec_spec", "batchspec_shard", "batchspec_attempt")


class RemoteNotFound(ProviderError):
    """The provider answered 404 for a file or batch id."""


class AmbiguousOutcome(ProviderError):
    """A non-idempotent request failed in a way that may have reached the server and acted.

    For a create carrying batchspec's key the batch may exist (or still appear, from a
    gateway that holds the request): the caller must look it up before creating again.
    """


@dataclass(frozen=True)
class RemoteFile:
    id: str
    bytes: int | None = None
    filename: str | None = None
    purpose: str | None = None
    created_at: int | None = None
    expires_at: int | None = None


@dataclass(frozen=True)
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class BatchValidationError:
    """One entry of a batch's ``errors.data`` (validation failures); ``line`` is 1-based."""

    code: str | None
    message: str | None
    line: int | None = None
    param: str | None = None


@dataclass(frozen=True)
class RemoteBatch:
    id: str
    status: str  # normalised lower case; see KNOWN_STATUSES
    endpoint: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completion_window: str | None = None
    request_counts: RequestCounts | None = None
    usage: Usage | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    errors: tuple[BatchValidationError, ...] = ()
    created_at: int | None = None
    expires_at: int | None = None
    completed_at: int | None = None
    #: the error of a create that got no clear answer, when this is the batch it was then
    #: found to have made (``_http.create_or_adopt``): the audit records the create so
    found_after: str | None = None
    #: when it ended, however it did (OpenAI's ``completed_at``, ``cancelled_at``,
    #: ``expired_at`` or ``failed_at``: the latest given); None where not said
    ended_at: int | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


#: called with the bytes of an upload sent so far (a retry starts again from 0)
UploadProgress = Callable[[int], None]


@runtime_checkable
class Provider(Protocol):
    """What the reconciler needs from a place where batches run."""

    name: str
    #: whether ``list_batches`` is known to list newest first (documented, or our engine): a
    #: key lookup stops at the first batch older than its window only then, and reads the
    #: whole listing (up to ``UNORDERED_SCAN_MAX``) of a provider whose order is not known
    lists_newest_first: bool

    def upload_file(
        self,
        path: Path,
        *,
        filename: str,
        purpose: str = "batch",
        progress: UploadProgress | None = None,
    ) -> RemoteFile:
        """Upload a batch input file, streamed from disk.

        ``progress``, if given, hears the bytes sent so far as they go (a provider that only
        stages the file locally may never call it).
        """
        ...

    def get_file(self, file_id: str) -> RemoteFile:
        """Raise ``RemoteNotFound`` when the provider no longer has it."""
        ...

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
    ) -> RemoteBatch: ...

    def get_batch(self, batch_id: str) -> RemoteBatch: ...

    def list_batches(
        self, *, page_size: int = 100, after: str | None = None
    ) -> Iterator[RemoteBatch]:
        """Every batch the provider lists, in its order (``lists_newest_first``), following
        pagination lazily; ``after``: only those listed after the batch with that id (the
        provider's own cursor where it has one: OpenAI, Azure and serve ``after``, Anthropic
        ``after_id``; a cursor the provider refuses raises as any failed call does)."""
        ...

    def cancel_batch(self, batch_id: str) -> RemoteBatch: ...

    def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to ``dest``; return the number of bytes written."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class KeyLookup:
    """What ``find_batch_by_key`` saw: the batch carrying the key (or None), and the cost."""

    batch: RemoteBatch | None
    listed: int  # batches read from the provider's list before the scan stopped
    stopped_at_window: bool  # the scan ended at a batch older than ``since``


def listed_after(batches: Iterable[RemoteBatch], after: str | None) -> Iterator[RemoteBatch]:
    """``batches`` past the one whose id is ``after`` (all of them when ``after`` is None):
    the start cursor of a provider whose listing has none of its own (Gemini, Mistral,
    Together), read on our side; nothing when that batch is never listed."""
    if after is None:
        yield from batches
        return
    found = False
    for batch in batches:
        if found:
            yield batch
        found = found or batch.id == after


def find_batch_by_key(
    provider: Provider, metadata: Mapping[str, str], *, since: float, page_size: int = 100
) -> KeyLookup:
    """Page the provider's batches, newest first, for the one whose metadata holds ``metadata``.

    Bounded: the scan stops at the first batch created before ``since`` (epoch seconds), which
    is never matched, so the cost is the pages back to ``since``, not the account's history,
    unless the batch listed after it is newer: a listing seen out of order (a compatible
    server listing oldest first) is read as one in no known order, as below.
    That holds only where the listing is newest first (``Provider.lists_newest_first``): on a
    provider whose order is not known (Gemini, Mistral, Together), a batch older than ``since``
    is skipped, not an end, and the scan reads on to the end of the listing or
    ``UNORDERED_SCAN_MAX`` batches: stopping at an old batch listed first would miss the key's
    batch listed after it, and a missed batch is one created, and paid for, again.
    Every provider reports batchspec's key in ``RemoteBatch.metadata`` (OpenAI, Azure, LiteLLM,
    serve and Mistral keep it remotely; Gemini in the display name; Anthropic and Together only
    in their local journal, so after a lost state their batches are not recognised).
    """
    return BatchListing(provider, page_size=page_size).find_by_key(metadata, since=since)


#: batches a key lookup reads at most from a provider whose listing is not newest first
UNORDERED_SCAN_MAX = 10_000
#: batches a key lookup reads at most from a newest-first listing before it must have
#: reached one older than its window; past it the lookup fails (``BatchListing``)
NEWEST_FIRST_SCAN_MAX = 200_000


#: seconds a newest-first listing may list a batch after an older one and still be taken as
#: newest first (batches made within moments, clocks of a server's nodes apart): a scan ends
#: only at a batch older than its window by more than this, so no batch it let pass is in it
ORDER_SLACK = 60


class BatchListing:
    """One scan of a provider's batches, read lazily and shared by many lookups.

    ``find_by_key`` answers exactly as a scan of its own would (the same batch, the same
    ``listed`` count), but pages already read are not asked for again: a pass that looks up
    the keys of many intents pays for the pages back to the oldest window once, not per key.
    A page that could not be read raises, and the next scan starts the listing again (a
    listing that failed half-way is never taken for a listing that ended: a key it had not
    reached yet would be taken as absent, and its batch created again).
    """

    def __init__(self, provider: Provider, *, page_size: int = 100) -> None:
        self._provider = provider
        self._page_size = page_size
        #: said by the provider; False for good once the listing is seen out of that order
        self._newest_first = provider.lists_newest_first
        self._start()

    def _start(self) -> None:
        self._batches = self._provider.list_batches(page_size=self._page_size)
        self._seen: list[RemoteBatch] = []
        self._exhausted = False
        self._last_created: int | None = None

    def _item(self, index: int) -> RemoteBatch | None:
        """The listing's batch at ``index``, read if need be; None past its end."""
        while index >= len(self._seen):
            if self._exhausted:
                return None
            try:
                remote = next(self._batches)
            except StopIteration:
                self._exhausted = True
                continue
            except BaseException:
                self._start()
                raise
            self._note_order(remote)
            self._seen.append(remote)
        return self._seen[index]

    def _note_order(self, remote: RemoteBatch) -> None:
        """A batch listed after an older one: the listing is not newest first, whatever the
        provider says (a compatible server may list oldest first), so no old batch ends a
        scan of it: the key's batch may come after."""
        created = remote.created_at
        if created is None:
            return
        if self._last_created is not None and created > self._last_created + ORDER_SLACK:
            self._newest_first = False
        self._last_created = created

    def _scan(self) -> Iterator[RemoteBatch]:
        index = 0
        while (remote := self._item(index)) is not None:
            yield remote
            index += 1

    def _ends_window(self, index: int, since: float) -> bool:
        """Whether the batch at ``index`` ends a newest-first scan back to ``since``: it is
        older, and the next one (read now) does not show the listing out of order."""
        remote = self._seen[index]
        if not self._newest_first or remote.created_at is None:
            return False
        if remote.created_at >= since - ORDER_SLACK:
            return False
        self._item(index + 1)
        return self._newest_first

    def _require_an_end(self, listed: int) -> None:
        """Fail a newest-first scan that read ``NEWEST_FIRST_SCAN_MAX`` batches and has not
        come to its window's edge: a listing that never ends (fresh rows and cursors on
        every page, or rows without a date) held the run and its memory for ever. Taking
        the key as absent instead would pay for its batch again, so no answer is given."""
        if listed > NEWEST_FIRST_SCAN_MAX and self._newest_first:
            raise ProviderError(
                f"{self._provider.name}: list batches: {NEWEST_FIRST_SCAN_MAX:,} batches listed "
                "and none yet older than the lookup's window (more than any account makes in "
                "one: a listing that never ends, or rows without a date?); "
                "batchspec stopped paging, and takes no batch as absent from it. Check the "
                "server's batch listing (its dates, has_more and last_id)."
            )

    def read_back_to(self, since: float) -> int:
        """Read (and keep) every page a ``find_by_key`` back to ``since`` may need; how many
        batches that took."""
        listed = 0
        for _ in self._scan():
            listed += 1
            self._require_an_end(listed)
            if self._ends_window(listed - 1, since):
                break
            if not self._newest_first and listed >= UNORDERED_SCAN_MAX:
                break
        return listed

    def find_by_key(self, metadata: Mapping[str, str], *, since: float) -> KeyLookup:
        listed = 0
        for remote in self._scan():
            listed += 1
            self._require_an_end(listed)
            if self._ends_window(listed - 1, since):
                return KeyLookup(None, listed, True)
            if remote.created_at is not None and remote.created_at < since:
                pass  # in no known order: the key's batch may be listed after this one
            elif all(remote.metadata.get(k) == v for k, v in metadata.items()):
                return KeyLookup(remote, listed, False)
            if not self._newest_first and listed >= UNORDERED_SCAN_MAX:
                break
        return KeyLookup(None, listed, False)

    def listed_since(self, since: float) -> list[RemoteBatch]:
        """Every batch a ``find_by_key`` back to ``since`` would look at (created at or
        after ``since``, or of no known date), newest first as listed: the same pages."""
        found = []
        for index, remote in enumerate(self._scan()):
            listed = index + 1
            self._require_an_end(listed)
            if self._ends_window(index, since):
                break
            if remote.created_at is None or remote.created_at >= since:
                found.append(remote)
            if not self._newest_first and listed >= UNORDERED_SCAN_MAX:
                break
        return found


# -- rate limits --------------------------------------------------------------------------------

#: who hears, on this thread, that a provider asked us to slow down (a 429 or a Retry-After)
_throttle_listener: ContextVar[Callable[[], None] | None] = ContextVar(
    "batchspec_throttle_listener", default=None
)


def report_throttle() -> None:
    """Tell whoever runs the current call (``core.reconcile.prefetch.BoundedCalls``) that the
    provider answered 429 or sent ``Retry-After``: it lowers the calls it lets run at once."""
    listener = _throttle_listener.get()
    if listener is not None:
        listener()


def listen_for_throttles(listener: Callable[[], None] | None) -> Token[Callable[[], None] | None]:
    """Set the current thread's throttle listener; ``reset_throttle_listener`` undoes it."""
    return _throttle_listener.set(listener)


def reset_throttle_listener(token: Token[Callable[[], None] | None]) -> None:
    _throttle_listener.reset(token)


# -- retries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryNotice:
    """A call failed in a way worth another attempt, and waits ``delay`` seconds first."""

    provider: str
    base_url: str
    operation: str  # "list batches", "upload of ...", ...
    problem: str  # "could not connect", "HTTP 503", ...
    retry: int  # which retry comes next, from 1
    retries: int  # the most there will be (the provider's maxRetries)
    delay: float

    @property
    def text(self) -> str:
        """``srv: could not connect to http://…/v1 (list batches); retry 1 of 5 in 0.5 s``."""
        return (
            f"{self.provider}: {self.problem} {self.base_url} ({self.operation}); "
            f"retry {self.retry} of {self.retries} in {self.delay:.1f} s"
        )


#: who hears, on this thread, that a call is about to wait and try again (the reconciler: a
#: provider that is down would otherwise keep a run silent through all the backoff)
_retry_listener: ContextVar[Callable[[RetryNotice], None] | None] = ContextVar(
    "batchspec_retry_listener", default=None
)


def report_retry(notice: RetryNotice) -> None:
    """Tell whoever listens on this thread that a call is about to be retried."""
    listener = _retry_listener.get()
    if listener is not None:
        listener(notice)


def listen_for_retries(
    listener: Callable[[RetryNotice], None] | None,
) -> Token[Callable[[RetryNotice], None] | None]:
    """Set the current thread's retry listener; ``reset_retry_listener`` undoes it."""
    return _retry_listener.set(listener)


def reset_retry_listener(token: Token[Callable[[RetryNotice], None] | None]) -> None:
    _retry_listener.reset(token)


class CallStopped(Exception):
    """The pool running this call closed (Ctrl-C, or its pass failed) while the call waited
    to be retried: it gives up at once rather than keep the run from stopping. A create it
    was retrying has its intent recorded, so the next run looks its key up, as after any
    create whose answer never came."""


#: set by the pool running the calls on this thread (``core.reconcile.prefetch.BoundedCalls``)
#: when it closes, so a call waiting to retry (a 429's Retry-After) stops waiting
_stopping: ContextVar[threading.Event | None] = ContextVar("batchspec_stopping", default=None)


def pause_before_retry(seconds: float) -> None:
    """Wait ``seconds`` before a retry (the clients' default ``sleep``); raise
    ``CallStopped`` as soon as the pool running this call closes, if one does."""
    stopping = _stopping.get()
    if stopping is None:
        time.sleep(seconds)
    elif stopping.wait(seconds):
        raise CallStopped("the run is stopping: the call is not retried")


class DeadlineReached(ProviderError):
    """``apply --wait --timeout`` ran out while a provider call was under way or about to
    be retried: the call gives up, as the run must (exit 5). A create cut so was recorded
    as sent, and the next run looks its key up."""


#: when (``time.monotonic``) the run's ``--timeout`` ends, for the calls on this thread: set
#: by the reconciler's pass on its own thread and by its pool on each worker (``within``)
_deadline: ContextVar[float | None] = ContextVar("batchspec_deadline", default=None)


def within(deadline: float | None) -> Token[float | None]:
    """Bound the calls on this thread by ``deadline``; ``reset_deadline`` undoes it."""
    return _deadline.set(deadline)


def reset_deadline(token: Token[float | None]) -> None:
    _deadline.reset(token)


def seconds_left() -> float | None:
    """Seconds until this thread's calls must end (None: no ``--timeout``)."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def stop_with(event: threading.Event | None) -> Token[threading.Event | None]:
    """Make ``event`` end the retry waits of calls on this thread; ``reset_stop`` undoes it."""
    return _stopping.set(event)


def reset_stop(token: Token[threading.Event | None]) -> None:
    _stopping.reset(token)


#: what admits a request sent on this thread by a step (not by a pool worker, which already
#: holds its place): while a pass's pool is open, ``core.reconcile.prefetch.BoundedCalls``
#: gives each such request a place among the provider's calls in flight, so the serial steps'
#: uploads, creates, lookups and downloads count against ``maxConcurrency`` as the pool's do
CallGate = Callable[[str], AbstractContextManager[object]]
_call_gate: ContextVar[CallGate | None] = ContextVar("batchspec_call_gate", default=None)


@contextmanager
def call_place(provider: str) -> Iterator[None]:
    """Hold a place for one request to ``provider`` while the block runs (at once when no
    gate is open on this thread)."""
    gate = _call_gate.get()
    if gate is None:
        yield
        return
    with gate(provider):
        yield


def open_call_gate(gate: CallGate | None) -> Token[CallGate | None]:
    """Set (None: lift) the current thread's call gate; ``reset_call_gate`` undoes it."""
    return _call_gate.set(gate)


def reset_call_gate(token: Token[CallGate | None]) -> None:
    _call_gate.reset(token)


def parse_batch(data: Mapping[str, Any]) -> RemoteBatch:
    """Parse an OpenAI-shaped batch object leniently (Azure and LiteLLM variants included).

    Fields that only inform (counts, usage, times, metadata) are read as far as they can be:
    a count that is not a number is 0, metadata that is not an object is empty, a time that
    is not one is None. An id (the batch's, or a file's) that is not a string or an integer
    cannot be used and raises ``ProviderError``, as a garbled body does: a raw ``ValueError``
    or ``TypeError`` from a server's wrong types ended a run with a traceback (after the
    create it answered had been made: the next run adopts that batch by its key)."""
    counts = data.get("request_counts")
    usage = data.get("usage")
    errors = data.get("errors") or {}
    error_rows = errors.get("data") if isinstance(errors, Mapping) else None
    metadata = data.get("metadata")
    return RemoteBatch(
        id=required_id(data, "batch"),
        status=normal_status(data.get("status")),
        endpoint=_text_or_none(data.get("endpoint")),
        input_file_id=optional_file_id(data, "input_file_id"),
        output_file_id=optional_file_id(data, "output_file_id"),
        error_file_id=optional_file_id(data, "error_file_id"),
        completion_window=_text_or_none(data.get("completion_window")),
        request_counts=RequestCounts(
            total=lenient_count(counts.get("total")),
            completed=lenient_count(counts.get("completed")),
            failed=lenient_count(counts.get("failed")),
        )
        if isinstance(counts, Mapping)
        else None,
        usage=Usage(
            input_tokens=lenient_count(usage.get("input_tokens")),
            output_tokens=lenient_count(usage.get("output_tokens")),
            total_tokens=lenient_count(usage.get("total_tokens")),
        )
        if isinstance(usage, Mapping)
        else None,
        metadata={str(k): str(v) for k, v in metadata.items()}
        if isinstance(metadata, Mapping)
        else {},
        errors=tuple(
            BatchValidationError(
                code=_text_or_none(row.get("code")),
                message=_text_or_none(row.get("message")),
                line=_line_or_none(row.get("line")),
                param=_text_or_none(row.get("param")),
            )
            for row in (error_rows if isinstance(error_rows, list) else [])
            if isinstance(row, Mapping)
        ),
        created_at=epoch_seconds(data.get("created_at")),
        expires_at=epoch_seconds(data.get("expires_at")),
        completed_at=epoch_seconds(data.get("completed_at")),
        ended_at=_ended_at(data),
    )


def _ended_at(data: Mapping[str, Any]) -> int | None:
    """The latest of a batch object's end times (``RemoteBatch.ended_at``)."""
    ends = (
        epoch_seconds(data.get(key))
        for key in ("completed_at", "cancelled_at", "expired_at", "failed_at")
    )
    return max((end for end in ends if end is not None), default=None)


def parse_file(data: Mapping[str, Any]) -> RemoteFile:
    size = data.get("bytes")
    return RemoteFile(
        id=required_id(data, "file"),
        bytes=size if isinstance(size, int) and not isinstance(size, bool) else None,
        filename=_text_or_none(data.get("filename")),
        purpose=_text_or_none(data.get("purpose")),
        created_at=epoch_seconds(data.get("created_at")),
        expires_at=epoch_seconds(data.get("expires_at")),
    )


def required_id(data: Mapping[str, Any], what: str) -> str:
    """The object's ``id``: a string or an integer, else a ``ProviderError`` (a missing,
    null or structured id taken as its text named a batch ``None`` that was polled for ever)."""
    value = data.get("id")
    text = _id_text(value)
    if text is not None:
        return text
    raise ProviderError(
        f"the provider answered a {what} object whose id is {_kind(value)}, not a string: "
        "the answer cannot be used (is the base URL the provider's API root?)"
    )


def optional_file_id(data: Mapping[str, Any], name: str) -> str | None:
    """A file id field: None when absent, null or empty; else as ``required_id``."""
    value = data.get(name)
    if value is None or value == "":
        return None
    text = _id_text(value)
    if text is not None:
        return text
    raise ProviderError(
        f"the provider answered a batch object whose {name} is {_kind(value)}, not a file "
        "id: the answer cannot be used (is the base URL the provider's API root?)"
    )


def _id_text(value: Any) -> str | None:
    """An id as text: a non-empty string, or an integer (some servers number them); else None."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "missing or null"
    if value == "":
        return "empty"
    return f"a JSON {type(value).__name__}".replace("dict", "object").replace("list", "array")


#: the largest count or time kept: what the state's integer columns hold (SQLite, PostgreSQL
#: BIGINT); a larger one from a server is no count, and would fail its write
_MAX_STORED = 2**63 - 1
_DIGITS = re.compile(r"-?[0-9]+")  # ASCII only: str.isdigit() takes "²", which int() refuses


def lenient_count(value: Any) -> int:
    """A count or a token total: an integer, a whole float or a numeric string, kept if the
    state can store it; else 0."""
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        number: float = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        number = int(value)  # Gemini's int64 counts are strings: exact, not through a float
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return 0
        if not math.isfinite(number):
            return 0
    return int(number) if abs(number) <= _MAX_STORED else 0


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _line_or_none(value: Any) -> int | None:
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_STORED:
        return value
    return None


def epoch_seconds(value: Any) -> int | None:
    """Unix seconds from an int, a numeric string, or an ISO-8601 string (Azure previews).

    None when absent, unreadable, or at or before the epoch: servers write 0, or a Go
    server its zero time (``0001-01-01T00:00:00Z``), for "not set", and no batch or file was
    made then. Taken as a date, such a placeholder on a listed batch ended a key lookup's
    newest-first scan before the key's batch (``BatchListing``), which was then made, and
    paid for, again."""
    seconds = _epoch_seconds(value)
    return seconds if seconds is not None and seconds > 0 else None


def _epoch_seconds(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN, Infinity (Python's json reads both, and 1e400 as Infinity)
    if isinstance(value, (int, float)):
        return int(value) if abs(value) <= _MAX_STORED else None
    text = str(value)
    if _DIGITS.fullmatch(text):
        return int(text) if abs(int(text)) <= _MAX_STORED else None
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except (ValueError, OverflowError, OSError):
        return None
