"""Collect a finished batch: download its files into the blob store, then read them.

The download lands in the content-addressed store *first* (never lose a result); only then
are its lines parsed, classified (``outcomes``) and recorded in the ledger with their byte
offsets, in one transaction with the batch's ``collect`` event, so the result files can be
rebuilt from the store at any time. A batch the provider rejected as a whole has its line
numbers mapped back to the input. When every batch is collected and no retry is left, the
result files are written from the store, in input order, and the generation is finished.

A file that arrives cut off mid-line (a body sent without a length, ended by a closed
connection: to HTTP a whole, shorter body) is downloaded again and never filed
(``download_to_store``). A download that fails (a provider error after the HTTP client's own
retries: a 5xx, a 404, a connection reset, a file cut short on every try) stops only its
resource, as Terraform leaves an independent resource's failure to it: the batch stays
ended-but-not-collected (no ``collect`` event, no request marked failed, never resubmitted),
a ``download-failed`` event and a ``download_failed`` line say what failed, and the pass
goes on with the others (``RunContext.download_failures``; apply then exits 1 naming it). A
later pass of the same run (``apply --wait``, while other resources keep it waiting) tries
it again no sooner than ``DOWNLOAD_RETRY_FIRST`` seconds after the first failure, doubling
to ``DOWNLOAD_RETRY_MAX``; the next apply tries at once.

A 401 or 403 is not such a failure: it says the key cannot read the provider's files, which
is true of every file of that provider, not of one, and no later pass or apply fixes it. The
``download-failed`` event is recorded and the apply stops at once with the provider's error
(which names the key's variable, never the key), as before: carrying on would spend on
batches (retries, ``--wait``'s later passes) whose results could not be downloaded either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from batchspec.core.plan import Action
from batchspec.core.reconcile.context import DownloadFailure, RunContext, now
from batchspec.core.recorded import is_requeued
from batchspec.core.reporting import Progress
from batchspec.core.results import write_results_in_input_order
from batchspec.core.spend import generation_price, generation_usage, priced_usage, usage_detail
from batchspec.errors import ProviderError
from batchspec.providers.base import DeadlineReached, Provider, RemoteNotFound
from batchspec.state.ledger import CollectedLine, ForeignAnswers, UsageTotals
from batchspec.state.store import BatchRow, GenerationRow
from batchspec.storage.result_store import ResultStore
from batchspec.wire.batch_status import TERMINAL_STATUSES
from batchspec.wire.inputs import InputReport
from batchspec.wire.outcomes import RETRY_CATEGORIES, classify_result_line
from batchspec.wire.usage import usage_of_line
from batchspec.workspace.manifest import Resource
from batchspec.workspace.project import ProviderConfig
from batchspec.workspace.yamldoc import display_path

try:  # the optional ``fast`` extra: parsing result lines is most of a large collect's time
    from orjson import loads as _fast_loads
except ImportError:
    _fast_loads = json.loads  # type: ignore[assignment]  # accepts the same bytes


#: seconds before a failed download is tried again by a later pass of the same run, doubled
#: after each further failure up to ``DOWNLOAD_RETRY_MAX``
DOWNLOAD_RETRY_FIRST = 5.0
DOWNLOAD_RETRY_MAX = 300.0
#: HTTP statuses of a download that stop the apply at once: the key, not the file (see above)
CREDENTIAL_STATUSES = (401, 403)


class DownloadFailed(ProviderError):
    """A file of a current generation's ended batch could not be downloaded: the provider's
    error, with which file it was (``kind``: output or errors)."""

    def __init__(self, kind: str, file_id: str, cause: ProviderError) -> None:
        super().__init__(
            cause.message,
            status=cause.status,
            code=cause.code,
            request_id=cause.request_id,
            retryable=cause.retryable,
        )
        self.kind = kind
        self.file_id = file_id


def _loads(body: bytes) -> Any:
    """orjson when installed; the standard library decides what orjson refuses (NaN, lone
    surrogates), so a line is never skipped, and its request retried, for orjson's sake."""
    try:
        try:
            return _fast_loads(body)
        except ValueError:
            return json.loads(body)
    except RecursionError as deep:  # a line nested deeper than Python reads: unreadable
        raise ValueError("JSON nested too deep to read") from deep


def write_exports(res: Resource, provider: ProviderConfig | None) -> list[Path]:
    """``spec.export``'s datasets (``batchspec.core.export``, which brings Jinja2 and the
    formats: imported only for a resource that has exports)."""
    if not res.exports:
        return []
    from batchspec.core.export import write_exports as write

    return write(res, provider)


def download_to_store(provider: Provider, file_id: str, blobs: ResultStore) -> str:
    """Stream a provider file into the result store (and its shared tier); its sha256.

    A file that ends in the middle of a line (``ends_mid_line``) is downloaded again, up to
    ``CUT_SHORT_ATTEMPTS`` times in all, and never filed: a body sent without a length (closed
    by the server to end it) that was cut off arrives as a shorter file, with no error from
    HTTP. Filed, its last answer would be skipped as unreadable, the batch taken as
    collected (its file never fetched again) and that request paid for again by a retry."""
    for attempt in range(1, CUT_SHORT_ATTEMPTS + 1):
        try:
            # over a copy already stored: this one is whole (hashed as filed), that one
            # may have been damaged since, and the results are written from the stored copy
            return blobs.put_from(lambda tmp: _download_whole(provider, file_id, tmp), replace=True)
        except _CutShort as cut:
            if attempt == CUT_SHORT_ATTEMPTS:
                raise ProviderError(
                    f"{provider.name}: download of file {file_id} ended in the middle of a line "
                    f"({cut.size:,} bytes; {CUT_SHORT_ATTEMPTS} tries): the connection was "
                    "closed before the whole file came. Nothing of it was recorded; the next "
                    "`batchspec apply` downloads it again.",
                    retryable=True,
                ) from None
    raise AssertionError("unreachable: the loop returns or raises")


#: downloads of a file that came cut short (``download_to_store``) before it is a failure
CUT_SHORT_ATTEMPTS = 3
_TAIL_CHUNK = 64 * 1024
_READ_BUFFER = 1 << 20
#: a last line longer than this is not read back whole to be checked (memory stays flat)
_LONGEST_LINE = 64 * 1024 * 1024


class _CutShort(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _download_whole(provider: Provider, file_id: str, dest: Path) -> None:
    provider.download_file(file_id, dest)
    if ends_mid_line(dest):
        raise _CutShort(dest.stat().st_size)


def is_blank(path: Path) -> bool:
    """Whether a file holds nothing but whitespace (read only up to its first other byte)."""
    with path.open("rb") as f:
        while chunk := f.read(_TAIL_CHUNK):
            if chunk.strip():
                return False
    return True


def ends_mid_line(path: Path) -> bool:
    """Whether a JSONL file's last line is cut short: no newline ends it and it is not a JSON
    value by itself (a file whose last line lacks only its newline is whole). The last line
    is found by reading back from the end a chunk at a time, then read once (a file that
    ends with a newline, as a whole one does, is told by its last byte alone)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
            return False
    finally:
        os.close(fd)
    with path.open("rb") as f:
        end = f.seek(0, 2)
        start = end  # of the last line, once its newline is found
        while start > 0 and end - start < _LONGEST_LINE:
            chunk_start = max(0, start - _TAIL_CHUNK)
            f.seek(chunk_start)
            newline = f.read(start - chunk_start).rfind(b"\n")
            if newline >= 0:
                start = chunk_start + newline + 1
                break
            start = chunk_start
        if end - start >= _LONGEST_LINE:
            return False
        f.seek(start)
        last = f.read(end - start)
    if not last.strip():
        return False
    try:
        _loads(last)
    except ValueError:
        return True
    return False


@dataclass
class SkippedLines:
    """The non-blank lines of a result file that are no result (``read_result_lines``)."""

    count: int = 0
    first: int | None = None  # the first one's line number, from 1


def read_result_lines(
    path: Path,
    *,
    retry_on: tuple[str, ...] = RETRY_CATEGORIES,
    skipped: SkippedLines | None = None,
) -> Iterator[CollectedLine]:
    """Each parseable line of a result file with its byte span and classification.

    Lines that are not JSON objects with a ``custom_id`` and a ``response`` or an ``error``
    are skipped: they cannot be joined to a request or say nothing of it, and the request
    they would answer stays unresolved (and so is retried). ``skipped`` counts them, so the
    collect can say why a request the provider answered is sent again (a line with bytes
    that are not UTF-8 is not JSON).
    """
    offset = 0
    number = 0
    # buffering given: no isatty ioctl (and a large file is read a MiB, not 8 KiB, at a time)
    with open(path, "rb", buffering=_READ_BUFFER) as f:
        for raw in f:
            start = offset
            offset += len(raw)
            number += 1
            body = raw.rstrip(b"\r\n")
            if not body or body.isspace():  # blank: what ``not body.strip()`` says, uncopied
                continue
            try:
                record = _loads(body)
            except ValueError:
                record = None
            if not _is_result(record):
                if skipped is not None:
                    skipped.count += 1
                    skipped.first = skipped.first or number
                continue
            yield CollectedLine(  # positionally: a line is made for every answer
                record["custom_id"],
                start,
                len(body),
                classify_result_line(record, retry_on=retry_on),
                usage_of_line(record),
            )


def _is_result(record: Any) -> bool:
    """Whether a parsed line is a JSON object with a ``custom_id`` and a ``response`` or an
    ``error``: it says how its request went. A request line (an output file id naming the
    batch's own input file) has neither; classified, it was a final failure of its request,
    and the real answer never fetched."""
    if type(record) is not dict:
        return False
    custom_id = record.get("custom_id")
    if type(custom_id) is not str and not isinstance(custom_id, str):
        return False
    return type(record.get("response")) is dict or bool(record.get("error"))


def collect(ctx: RunContext, res: Resource, facts: InputReport, action: Action) -> bool:
    gen = ctx.generation(res)
    ctx.ensure_ledger(res, gen)
    provider = ctx.provider_for(res.provider)
    pending = [
        b
        for b in ctx.store.batches(gen.id)
        if b.remote_id and b.status in TERMINAL_STATUSES and b.collected_at is None
    ]
    not_collected = False
    for batch in pending:
        if not ctx.download_due(batch.id):
            not_collected = True  # failed earlier this run: tried again after its pause
            continue
        try:
            _collect_batch(ctx, res, gen, batch, provider)
        except DownloadFailed as err:
            if err.status in CREDENTIAL_STATUSES:
                _stop_for_credentials(ctx, res.name, gen, batch, err)
            _note_download_failure(ctx, res.name, gen, batch, err)
            not_collected = True
        else:
            ctx.download_failures.pop(batch.id, None)
    if not_collected:
        return False  # the resource waits for the next pass or apply; the others go on
    if not pending:
        model = res.model or (facts.models[0] if len(facts.models) == 1 else None)
        _finish_generation(ctx, res, gen, model)
    return True


def _collect_batch(
    ctx: RunContext, res: Resource, gen: GenerationRow, batch: BatchRow, provider: Provider
) -> None:
    collect_batch(ctx, res.name, gen, batch, provider, retry_on=retry_on_for(res, gen))


def _stop_for_credentials(
    ctx: RunContext, name: str, gen: GenerationRow, batch: BatchRow, err: DownloadFailed
) -> NoReturn:
    """Record a download the key may not make (401, 403), then raise its error: see above."""
    ctx.download_failures.pop(batch.id, None)
    _record_download_failure(ctx, name, gen, batch, err)
    err.details.append(
        f"batch {batch.remote_id} of {name} stays ended and not collected (nothing is "
        "resubmitted): the next apply collects it once the key may read the provider's files"
    )
    raise err


def _record_download_failure(
    ctx: RunContext, name: str, gen: GenerationRow, batch: BatchRow, err: DownloadFailed
) -> None:
    """The ``download-failed`` event of a batch's file (the provider's message, redacted)."""
    with ctx.store.atomic():
        ctx.store.record_event(
            ctx.run_id,
            "download-failed",
            resource=name,
            generation_id=gen.id,
            batch_id=batch.id,
            detail={
                "file": err.kind,
                "file_id": err.file_id,
                "error": err.message,
                **({"http_status": err.status} if err.status is not None else {}),
            },
        )


def _note_download_failure(
    ctx: RunContext, name: str, gen: GenerationRow, batch: BatchRow, err: DownloadFailed
) -> None:
    """Record (an event) and say (one line) that a batch's file could not be downloaded; keep
    it in ``ctx.download_failures``, with when a later pass of this run may try it again."""
    earlier = ctx.download_failures.get(batch.id)
    failures = 1 if earlier is None else earlier.failures + 1
    pause = min(DOWNLOAD_RETRY_MAX, DOWNLOAD_RETRY_FIRST * 2 ** (failures - 1))
    failure = DownloadFailure(
        resource=name,
        batch_id=batch.id,
        remote_id=batch.remote_id or "",
        file=err.kind,
        file_id=err.file_id,
        error=err.message,
        status=err.status,
        failures=failures,
        retry_at=ctx.monotonic() + pause,
    )
    ctx.download_failures[batch.id] = failure
    _record_download_failure(ctx, name, gen, batch, err)
    ctx.report(
        Progress(
            "download_failed",
            name,
            f"could not download the {err.kind} file of batch {failure.remote_id}: "
            f"{err.message.rstrip('.')}. The batch stays finished and not collected; nothing "
            "is resubmitted, and the next `batchspec apply` tries the download again"
            + (
                f" (if the provider no longer keeps the file, `batchspec apply --replace {name}` "
                "runs the resource again, paying for its requests again)"
                if err.status == 404
                else ""
            ),
            failure.to_json(),
        )
    )


def retry_on_for(res: Resource, gen: GenerationRow) -> tuple[str, ...]:
    """The categories ``res`` retries; a batch a user cancelled is not retried as cancelled."""
    user_cancelled = gen.status == "cancelled"
    return tuple(c for c in res.retry.on if not (c == "cancelled" and user_cancelled)) or ()


def collect_batch(
    ctx: RunContext,
    name: str,
    gen: GenerationRow,
    batch: BatchRow,
    provider: Provider,
    *,
    retry_on: tuple[str, ...] = RETRY_CATEGORIES,
    foreign: bool = False,
    retired: bool = False,
) -> bool:
    """Download a terminal batch's files into the blob store, then record what they say in
    ``gen``'s ledger with the batch's ``collect`` event, in one transaction; False when
    nothing was recorded (``foreign``: ``name`` is not locked by this run and another run
    holds it; the download stays in the store, and that run or the next records it).

    ``retired``: ``gen`` is no longer active (superseded, cancelled and not current, pruned):
    the event's detail and the progress line say so; its answers are kept for reuse by
    request hash, never written as the resource's results. A file of it the provider no
    longer has (404, and 404 for its metadata: ``_file_gone``) is left out and named in the
    event's ``gone``, so that the batch is settled with what could be kept instead of
    failing every pass.

    Files with lines for fewer requests than the batch counted completed (or failed:
    ``_missing_from_files``) are downloaded again, up to ``SHORT_ATTEMPTS`` times in all,
    before what they hold is recorded as all there is (the missing requests unanswered, and
    said to be)."""
    for attempt in range(1, SHORT_ATTEMPTS + 1):
        try:
            return _collect_files(
                ctx,
                name,
                gen,
                batch,
                provider,
                retry_on=retry_on,
                foreign=foreign,
                retired=retired,
                last_try=attempt == SHORT_ATTEMPTS,
            )
        except _ShortOfCounts as short:
            ctx.report(
                Progress(
                    "warning",
                    name,
                    f"the files of batch {batch.remote_id} have {short.shortfall} (cut short "
                    "where a line ended, or a line damaged?): nothing of them recorded, "
                    "downloading them again "
                    f"({attempt + 1} of {SHORT_ATTEMPTS})",
                    {"remote_id": batch.remote_id},
                )
            )
    raise AssertionError("unreachable: the last try records what it has")


#: downloads of a batch's files that are short of its counts (``_missing_from_files``)
#: before what they hold is taken as all there is
SHORT_ATTEMPTS = 3


class _ShortOfCounts(Exception):
    def __init__(self, shortfall: str) -> None:
        super().__init__(shortfall)
        self.shortfall = shortfall


def _collect_files(
    ctx: RunContext,
    name: str,
    gen: GenerationRow,
    batch: BatchRow,
    provider: Provider,
    *,
    retry_on: tuple[str, ...],
    foreign: bool,
    retired: bool,
    last_try: bool,
) -> bool:
    """One download and record of a batch's files (``collect_batch``); ``_ShortOfCounts``,
    with nothing recorded, when they are short of its counts and this is not ``last_try``."""
    shas: dict[str, str | None] = {"output_sha256": None, "errors_sha256": None}
    gone: list[str] = []  # a retired batch's files the provider no longer has
    for column, file_id in (
        ("output_sha256", batch.output_file_id),
        ("errors_sha256", batch.error_file_id),
    ):
        if file_id:
            kind = "output" if column == "output_sha256" else "errors"
            ctx.report(
                Progress(
                    "download",
                    name,
                    f"downloading the {kind} file of batch {batch.remote_id}",
                    {"remote_id": batch.remote_id, "file_id": file_id, "file": kind},
                )
            )
            try:
                sha = ctx.prefetched.take_file(batch.provider, file_id, ctx.before_wait)
                if sha is None:
                    ctx.before_wait()
                    sha = download_to_store(provider, file_id, ctx.blobs)
            except RemoteNotFound as err:
                if not retired:
                    raise DownloadFailed(kind, file_id, err) from err
                if not _file_gone(ctx, provider, file_id):
                    raise ProviderError(
                        f"{err.message.rstrip('.')}; the provider still lists file {file_id}, "
                        "so it is not taken as gone",
                        status=err.status,
                    ) from err
                gone.append(f"{kind} file {file_id}: {err.message}")
                continue
            except DeadlineReached:
                raise  # the run's --timeout: it ends (exit 5), this file is no failure
            except ProviderError as err:
                if retired:
                    raise  # the drain says so and tries again next apply
                raise DownloadFailed(kind, file_id, err) from err
            shas[column] = sha
            ctx.filed_blobs.add(sha)
    changed = 0
    tally = {True: 0, False: 0}  # lines read: answered, not (an error, cancelled, expired)
    repeated = 0  # lines of a custom_id its file had already answered (the first is kept)
    said: set[str] = set()  # the custom_ids either file has a line for
    in_output: set[str] = set()  # of them, those the output file has a line for
    outside: set[str] = set()  # of them, those the batch did not carry (left out)
    unreadable: list[str] = []  # per file with lines that are no result: how many, where
    with ctx.store.atomic():
        if foreign and not ctx.may_touch(name):
            return False
        before = ctx.ledger.usage_totals(gen.id)
        for column, file_id in (
            ("output_sha256", batch.output_file_id),
            ("errors_sha256", batch.error_file_id),
        ):
            sha = shas[column]
            if sha:
                kind = "output" if column == "output_sha256" else "errors"
                path = ctx.blobs.ensure_local(sha)
                read = {True: 0, False: 0}
                seen: set[str] = set()
                skipped = SkippedLines()
                lines = _tallied(
                    read_result_lines(path, retry_on=retry_on, skipped=skipped), read, seen
                )
                try:
                    changed += ctx.ledger.record_outcomes(
                        gen.id, batch.attempt, sha, lines, shard=batch.shard, outside=outside
                    )
                except ForeignAnswers as err:
                    refusal = _served_another(name, batch, err)
                    raise DownloadFailed(kind, file_id or "", refusal) from err
                if not any(read.values()) and not is_blank(path):
                    raise DownloadFailed(kind, file_id or "", _not_results(name, batch, path))
                if not any(read.values()) and kind == "output" and _answered_somewhere(batch):
                    raise DownloadFailed(kind, file_id or "", _served_empty(name, batch))
                for answered, count in read.items():
                    tally[answered] += count
                repeated += sum(read.values()) - len(seen)
                said |= seen
                if kind == "output":
                    in_output = seen
                if skipped.count:
                    unreadable.append(_skipped_text(kind, skipped))
        # a line for a request the batch did not carry is none of its requests' lines
        said -= outside
        in_output -= outside
        missing, what, shortfall = (
            (0, "", "") if gone else _missing_from_files(batch, len(said), len(in_output))
        )
        if missing and not last_try:
            raise _ShortOfCounts(shortfall)  # rolls the transaction back: nothing recorded
        detail: dict[str, Any] = {
            "status": batch.status,
            "answered": changed,
            **{k: v for k, v in shas.items() if v},
            **({"retired": gen.status} if retired else {}),
        }
        detail.update(_collected_usage(ctx, gen, batch, before))
        if gone:
            detail["gone"] = "; ".join(gone)  # a string: the text history shows it
        if repeated:
            detail["repeated"] = repeated
        if unreadable:
            detail["unreadable"] = "; ".join(unreadable)  # a string: the text history shows it
        if outside:
            detail["not_carried"] = len(outside)
        if missing:
            detail["missing"] = missing
        if batch.status == "failed" and is_requeued(batch):
            detail["requeued"] = "token_limit_exceeded: resubmitted after a backoff"
        elif batch.status == "failed":
            detail["errors"] = _fail_batch(ctx, gen, batch)
        ctx.store.update_batch(batch.id, collected_at=now(), **shas)
        ctx.store.record_event(
            ctx.run_id,
            "collect",
            resource=name,
            generation_id=gen.id,
            batch_id=batch.id,
            detail=detail,
        )
    kept = (
        f"; kept for reuse ({gen.status} generation {gen.id}, not its results)" if retired else ""
    )
    ctx.report(
        Progress(
            "collect",
            name,
            f"collected batch {batch.remote_id} ({batch.status}): {_lines_text(tally)}"
            + _repeated_text(repeated)
            + "".join(f"; {u}" for u in unreadable)
            + _not_carried_text(len(outside))
            + _missing_text(missing, what)
            + _rejection_text(detail.get("errors"))
            + kept
            + "".join(f"; gone from the provider, not kept: {g}" for g in gone),
            {"remote_id": batch.remote_id, **({"retired": gen.status} if retired else {})},
        )
    )
    return True


def _served_another(name: str, batch: BatchRow, err: ForeignAnswers) -> ProviderError:
    """Why a downloaded file is not taken as its batch's (``ledger.ForeignAnswers``)."""
    return ProviderError(
        f"{batch.provider} served another file's content for batch {batch.remote_id} (shard "
        f"{batch.shard + 1}): {err.message}. Nothing of it was recorded, so no request of the "
        f"batch is taken as unanswered and paid for again. {_way_out(name)}"
    )


def _not_results(name: str, batch: BatchRow, path: Path) -> ProviderError:
    """Why a downloaded file with content and no result line is not recorded: taken as its
    batch's, the batch was collected with nothing answered, and every request of it retried
    and paid for again (an HTML page or a JSON notice a gateway sent with HTTP 200)."""
    return ProviderError(
        f"{batch.provider} answered the file of batch {batch.remote_id} with content that is "
        f"not batch results ({path.stat().st_size:,} bytes, no line a JSON object with a "
        "custom_id: a page or a notice sent with HTTP 200?). Nothing of it was recorded, so no "
        f"request of the batch is taken as unanswered and paid for again. {_way_out(name)}"
    )


def _answered_somewhere(batch: BatchRow) -> bool:
    """Whether ``batch``'s output file cannot be empty: its counts say requests completed,
    or it has no counts (Together's jobs carry none), ended ``completed`` and names no error
    file, so each of its requests was answered in the output file."""
    if batch.completed is None:
        return batch.status == "completed" and not batch.error_file_id
    return batch.completed > 0


def _served_empty(name: str, batch: BatchRow) -> ProviderError:
    """Why an output file served empty is not recorded while the batch says requests were
    answered there (``_answered_somewhere``): taken as its batch's, every request of it was
    unanswered, and sent again and paid for again by the retries, though the provider had
    done them (a gateway answering 200 with no body, a content route failing quietly)."""
    said = (
        f"counted {batch.completed:,} request(s) of it completed"
        if batch.completed is not None
        else "ended it completed with no counts and no error file"
    )
    return ProviderError(
        f"{batch.provider} served the output file of batch {batch.remote_id} empty, though it "
        f"{said}. Nothing of it was recorded, so no request of the batch is taken as "
        f"unanswered and paid for again. {_way_out(name)}"
    )


def _missing_from_files(batch: BatchRow, said: int, in_output: int) -> tuple[int, str, str]:
    """How many requests ``batch`` counted completed (or failed) that its files have no line
    for, how it counted them (``completed``, ``completed or failed``) and how short the files
    are, said (``said``: the custom_ids they have lines for; ``in_output``: those
    of the output file). Each completed request is answered in the output file, each failed
    one has a line in one of the files, so a file is missing lines: a body sent without a
    length and cut where a line ended, which no half line tells. Recorded at once, those
    requests were taken as unanswered, sent again and paid for twice, and the run said
    nothing of it (``collect_batch`` downloads the files again first).

    The output file is held to the completed count on its own when the counts add up
    (completed and failed at most the total): otherwise the error file's lines (failures,
    and the expired or cancelled requests counted in neither) stood in for the answers the
    output file lost. A server whose ``completed`` counts its failures too (more than the
    total) is held to its completed count over both files, as one that gives no total."""
    if batch.status == "failed" or batch.completed is None:
        return 0, "", ""
    completed, failed = batch.completed, batch.failed or 0
    if batch.total is not None and completed + failed <= batch.total:
        if in_output < completed:
            return (
                completed - in_output,
                "completed",
                f"readable lines for {in_output:,} of the {completed:,} requests it counted "
                "completed (in its output file, where they are answered)",
            )
        counted, what = completed + failed, "completed or failed" if failed else "completed"
    else:
        counted, what = completed, "completed"
    if said >= counted:
        return 0, "", ""
    return (
        counted - said,
        what,
        f"readable lines for {said:,} of the {counted:,} requests it counted {what}",
    )


def _skipped_text(kind: str, skipped: SkippedLines) -> str:
    """``2 lines of the output file (the first: line 7) are no result ...``: lines skipped
    (``read_result_lines``) leave their requests unanswered, sent again by a retry and paid
    for again, so the collect says so rather than count them with nothing."""
    many = skipped.count != 1
    return (
        f"{skipped.count:,} line{'s' if many else ''} of the {kind} file "
        f"({'the first: ' if many else ''}line {skipped.first:,}) {'are' if many else 'is'} no "
        "result (not JSON, or no custom_id, response or error): the request"
        f"{'s' if many else ''} {'they' if many else 'it'} would answer taken as unanswered"
    )


def _not_carried_text(count: int) -> str:
    """Lines for requests the batch did not carry (another shard's, or none of the
    resource's): left out (``RequestLedger.record_outcomes``), and said, not counted as its
    answers in silence."""
    if not count:
        return ""
    many = count != 1
    return (
        f"; {count:,} line{'s' if many else ''} answer{'' if many else 's'} "
        f"{'requests' if many else 'a request'} its batch did not carry (another shard's, or "
        "none of the resource's): left out"
    )


def _missing_text(missing: int, what: str) -> str:
    """Requests the batch counted completed (or failed) that its files, downloaded
    ``SHORT_ATTEMPTS`` times, never had a line for (``_missing_from_files``): unanswered, so
    a retry sends them again (and pays again)."""
    if not missing:
        return ""
    return (
        f"; {missing:,} request{'s' if missing != 1 else ''} it counted {what} had no "
        f"readable line in its files ({SHORT_ATTEMPTS} downloads): taken as unanswered"
    )


def _way_out(name: str) -> str:
    """The next apply downloads the file again; a provider that keeps serving the wrong one
    would keep failing every apply, so the message says how to stop waiting for it."""
    return (
        "The next apply downloads it again; if the provider keeps answering so, `batchspec "
        f"apply --replace {name}` sends the requests again (paying for them again)."
    )


def _file_gone(ctx: RunContext, provider: Provider, file_id: str) -> bool:
    """Whether a file whose content answered 404 is gone from the provider: its metadata
    answers 404 too (an expired or deleted file). A file still listed is not written off: a
    retired batch settled without its answers has them paid again by the generation that
    replaced it (a gateway or a provider failing the content route for a while)."""
    ctx.before_wait()
    try:
        provider.get_file(file_id)
    except RemoteNotFound:
        return True
    return False


def _collected_usage(
    ctx: RunContext, gen: GenerationRow, batch: BatchRow, before: UsageTotals
) -> dict[str, Any]:
    """What the answers a batch's collect just recorded used, priced as its generation's:
    ``gen``'s ledger totals now less ``before`` (a line recorded twice, or an ``ok`` row
    kept, adds nothing), else the batch object's own usage when no line reports any. Every
    ``collect`` event records it: a generation retired before its ``results`` event (or
    never finished) has no other record of what its collected answers cost; a later
    ``results`` event's running total covers the collects before it (``core.history``)."""
    after = ctx.ledger.usage_totals(gen.id)
    price = generation_price(gen, ctx.project.providers)
    if after.requests:
        usage = priced_usage(
            price,
            after.input_tokens - before.input_tokens,
            after.output_tokens - before.output_tokens,
        )
    else:
        usage = priced_usage(
            price, batch.input_tokens or 0, batch.output_tokens or 0, batch.total_tokens or 0
        )
    return usage_detail(usage)


def _tallied(
    lines: Iterator[CollectedLine], tally: dict[bool, int], seen: set[str]
) -> Iterator[CollectedLine]:
    """``lines`` as they are, counted into ``tally`` by whether each is an answer, their
    custom_ids kept in ``seen`` (a file that answers one twice says so: ``_repeated_text``)."""
    for line in lines:
        tally[line.outcome.state == "ok"] += 1
        seen.add(line.custom_id)
        yield line


def _repeated_text(repeated: int) -> str:
    """A provider that answered a request twice in one file (two answers, maybe different):
    the ledger keeps the first, and the line says so rather than pass it over in silence."""
    if not repeated:
        return ""
    return (
        f"; {repeated} line{'s' if repeated != 1 else ''} answered a custom_id its file had "
        "already answered (the provider's first answer of each is kept)"
    )


def _lines_text(tally: dict[bool, int]) -> str:
    """``3 answers``, ``1 answer, 2 errors``: what a collected batch's files held (counts
    grouped by thousands, as the poll lines and the summary give them)."""
    answers, errors = tally[True], tally[False]
    text = f"{answers:,} answer{'' if answers == 1 else 's'}"
    return text + (f", {errors:,} error{'' if errors == 1 else 's'}" if errors else "")


def wrote_text(succeeded: int, failed: int, output: Path, errors: Path) -> str:
    """``wrote 20,000 results to results/x.jsonl, 3 errors to ...``: the results line."""
    text = f"wrote {succeeded:,} results to {display_path(output)}"
    return text + (f", {failed:,} errors to {display_path(errors)}" if failed else "")


def _fail_batch(ctx: RunContext, gen: GenerationRow, batch: BatchRow) -> list[dict[str, Any]]:
    """A batch the provider rejected as a whole: map its line numbers back to the input."""
    errors = batch.provider_errors or []
    lines = ctx.ledger.lines_of_attempt(gen.id, batch.shard, batch.attempt)
    as_is = batch.input_sha256 == gen.input_sha256
    mapped = []
    for err in errors:
        line = err.get("line")
        if isinstance(line, int) and not as_is and 1 <= line <= len(lines):
            line = lines[line - 1]
        mapped.append({**err, "input_line": line})
    code = next((e.get("code") for e in errors if e.get("code")), None) or "batch_failed"
    ctx.ledger.fail_attempt(gen.id, batch.shard, batch.attempt, code)
    return mapped


def _finish_generation(
    ctx: RunContext, res: Resource, gen: GenerationRow, model: str | None
) -> None:
    """Everything is collected and no retry is left: write the result files.

    A stored file this run did not download (an earlier pass's or run's attempt, kept while
    later attempts ran) is checked against its name first and, damaged on disk, downloaded
    again (``ResultStore.repair_local``): the files written now are recorded as the results,
    and every later restore writes them again."""
    ctx.check_result_paths(res)
    shas = ctx.ledger.blobs_of(gen.id)
    earlier = [sha for sha in shas if sha not in ctx.filed_blobs]
    if earlier:
        ctx.before_wait()  # a repair downloads: never with the writer lock held
        for sha in earlier:
            ctx.blobs.ensure_local(sha)
            ctx.blobs.repair_local(sha)
            ctx.filed_blobs.add(sha)
    written = write_results_in_input_order(
        ctx.ledger, gen.id, ctx.blobs, res.output_path, res.errors_path, ctx.disk_hashes, shas
    )
    degraded = written.unresolved > 0 or (written.succeeded == 0 and gen.requests > 0)
    status = gen.status if gen.status == "cancelled" else ("degraded" if degraded else "complete")
    why = _why_degraded(ctx, res, gen, written.unresolved) if status == "degraded" else None
    with ctx.store.atomic():
        finished = ctx.store.update_generation(
            gen.id,
            model=model,
            status=status,
            succeeded=written.succeeded,
            failed=written.failed,
            output_sha256=written.output_sha256,
            errors_sha256=written.errors_sha256,
            completed_at=now(),
        )
        usage = usage_detail(generation_usage(ctx.store, finished, ctx.project.providers))
        ctx.store.record_event(
            ctx.run_id,
            "results",
            resource=res.name,
            generation_id=gen.id,
            detail={
                "status": status,
                "succeeded": written.succeeded,
                "failed": written.failed,
                "unresolved": written.unresolved,
                "output": ctx.relative(res.output_path, written=True),
                "errors": ctx.relative(res.errors_path, written=True),
                **usage,
                **({"degraded": why} if why else {}),
            },
        )
    # after the results are recorded: a failed export is retried by the next plan (restore)
    exported = write_exports(res, ctx.project.providers.get(res.provider))
    ctx.report(
        Progress(
            "results",
            res.name,
            wrote_text(written.succeeded, written.failed, res.output_path, res.errors_path)
            + (f"; degraded: {why}" if why else "")
            + "".join(f"; exported {display_path(p)}" for p in exported),
            {"status": status, "succeeded": written.succeeded, "failed": written.failed},
        )
    )


def _why_degraded(ctx: RunContext, res: Resource, gen: GenerationRow, unresolved: int) -> str:
    """Why a generation ends Degraded, truthfully: which codes were final (never retried
    because they are not retryable), and whether retryable ones used up their attempts."""
    reasons = []
    codes = ctx.ledger.failure_codes(gen.id)
    if codes:
        shown = ", ".join(f"{code} ({n})" for code, n in list(codes.items())[:3])
        more = f" and {len(codes) - 3} more code(s)" if len(codes) > 3 else ""
        reasons.append(f"not retryable: {shown}{more}")
    if unresolved:
        attempts = max(ctx.latest_attempts(gen.id).values(), default=0)
        reasons.append(
            f"{unresolved} request(s) unresolved after {attempts} attempt(s): attempts "
            f"exhausted (retry.maxAttempts {res.retry.max_attempts})"
        )
    return "; ".join(reasons) or "no request succeeded"


def _rejection_text(errors: list[dict[str, Any]] | None) -> str:
    """Why the provider rejected a whole batch, located at the input's lines (first five)."""
    if not errors:
        return ""
    shown = [
        (f"input line {e['input_line']}: " if e.get("input_line") else "")
        + f"{e.get('message') or 'rejected'} ({e.get('code') or 'no code'})"
        for e in errors[:5]
    ]
    more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "; the provider rejected it: " + "; ".join(shown) + more
