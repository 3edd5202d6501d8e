"""A pass's submissions side by side: the uploads and creates of different batches overlap.

Before a pass advances its resources one by one, ``submit_pass`` takes each resource whose
plan is to spend now (a create or a retry; a replace, which cancels first, is left to the
serial step) on a provider whose client the
pool's threads may share (``SUBMIT_TYPES``), records its intents, and binds them to remote
batches with the uploads and creates running in the pass's ``BoundedCalls`` pool. It promises:

* **State written on this thread only, intent first.** Workers make provider calls and
  nothing else. The generation, the ledger and the ``intent`` rows are recorded exactly as the
  serial steps record them (``submit.record_create``, ``retry.record_retries``); each upload's
  ``upload-intent`` is committed before the upload is handed to a worker, and each create's
  ``creating`` row and ``create-intent`` event, and the run's lock re-check, before the create
  is. A kill at any moment leaves what a serial run killed there leaves: ``pending`` intents
  (looked up by key, then uploaded again) or ``creating`` ones (adopted by key).
* **The same checks as one at a time.** Before its upload, every intent's key is looked up on
  the provider (one shared list scan a pass, ``adopt.look_up_before_create``, its pages read
  before any transaction opens: the state's writer lock is never held across them) and
  adopted if an earlier run made it; files are deduplicated by sha256 per provider (within
  the pass too); ``maxInFlightBatches`` is respected; an unsure create (``creating``) is
  left to the serial step, which confirms it before anything is created again.
* **Few commits.** What one step records (an upload, a ``create-intent``, an earlier create,
  the next ``upload-intent``) commits at once, before the calls it allows are sent; the
  following steps whose calls have already ended (up to ``W``) join that commit. Nothing
  inside the pass's transactions catches an exception and goes on (each one raised leaves
  the transaction, which is rolled back whole), so they are ``atomic(whole=True)``: the
  steps' own blocks nested in them take no savepoints (a SAVEPOINT and a RELEASE each).
* **Deterministic output.** Events and progress follow a fixed schedule over the intents in
  resource order, whatever the timing: resources are recorded as the window reaches them, the
  upload of intent ``i + W`` is started (its
  ``upload-intent`` recorded) before intent ``i``'s upload is recorded, and intent ``i``'s
  create is recorded once intent ``i + W``'s create is sent (``W`` = ``parallelism``). Each kind
  of event comes in resource order, and two runs write the same audit log and NDJSON.
* **A failure stops the pass where the serial pass would have stopped**: the creates already
  sent are recorded first, then the error of the earliest failed intent is raised.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from batchspec.core.plan import Action, ActionKind
from batchspec.core.reconcile.adopt import (
    look_up_before_create,
    lookup_since,
    read_listing_ahead,
    record_remote,
)
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reconcile.hold import held, retry_held
from batchspec.core.reconcile.prefetch import BoundedCalls, provider_ready
from batchspec.core.reconcile.recover import recover_ahead
from batchspec.core.reconcile.retry import record_retries
from batchspec.core.reconcile.submit import (
    batch_file,
    confirm_ambiguous_create,
    ensure_uploaded,
    mark_creating,
    record_create,
    record_create_not_sent,
    record_create_refused,
    record_upload,
    record_upload_intent,
    report_upload_progress,
    send_create,
)
from batchspec.errors import ProviderError
from batchspec.providers.base import (
    AmbiguousOutcome,
    Provider,
    RemoteBatch,
    RemoteFile,
    RemoteNotFound,
)
from batchspec.state.store import BatchRow, GenerationRow
from batchspec.wire.inputs import InputReport
from batchspec.workspace.manifest import Resource

#: provider types whose uploads and creates may run on the pool's threads: stateless HTTP
#: clients (the adapters that stage files or keep a journal submit one at a time)
SUBMIT_TYPES = frozenset({"openai", "azure", "groq"})
SPENDING = (ActionKind.CREATE, ActionKind.REPLACE, ActionKind.RETRY)
T = TypeVar("T")


@dataclass
class _Job:
    """One intent on its way to a remote batch."""

    res: Resource
    gen: GenerationRow
    batch: BatchRow
    provider: Provider
    last_of_resource: bool = False
    path: Path | None = None
    filename: str = ""
    upload: concurrent.futures.Future[RemoteFile | None] | None = None
    reuses_known: bool = False  # the future checks a recorded file instead of uploading
    same_file_as: _Job | None = None  # an earlier job of this pass uploads the same file
    file_id: str | None = None
    create: concurrent.futures.Future[RemoteBatch] | None = None
    sent: list[int] = field(default_factory=list)  # upload progress, appended by a worker
    finished: bool = False  # how its create ended is recorded (``_finish_create``)


def submit_pass(
    ctx: RunContext,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    calls: BoundedCalls,
    *,
    spending_action: Callable[[Resource, InputReport], Action | None],
) -> set[str]:
    """Record and submit the intents of every resource that spends now; return the names of
    the resources dealt with (the pass leaves them waiting on their batches).

    ``spending_action(res, facts)`` is the action the pass may take for ``res`` (its plan, if it
    spends and is allowed), or None to leave it to the serial steps.
    """
    handled: set[str] = set()
    planned = _read_listings_ahead(ctx, resources, facts, spending_action)
    _submit(ctx, calls, _jobs(ctx, resources, facts, spending_action, planned, handled))
    return handled


def _read_listings_ahead(
    ctx: RunContext,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    spending_action: Callable[[Resource, InputReport], Action | None],
) -> dict[str, Action | None]:
    """Before the pass records anything (holding no transaction), plan its resources in
    order until each provider it submits to has met its first resource that spends, and read
    that provider's listing back as far as the lookups of its resources' keys will look
    (``adopt.read_listing_ahead``): those lookups are made inside the transactions that
    record the intents, and are then answered from memory instead of paging the provider
    while the state's writer lock is held. The answers a lost state forgot are found here
    too, for each resource whose new generation may draw its shards in the pass
    (``recover.recover_ahead``: it downloads). Returns the actions planned, by resource name
    (None: it does not spend now), which ``_intents_of`` takes instead of planning again."""
    providers = {res.provider for res in resources if _submits_to(ctx, res)}
    planned: dict[str, Action | None] = {}
    spends: list[str] = []
    # reads only (a few queries in all): where nothing spends, every resource is planned here
    with ctx.store.reading():
        for res in resources:
            if len(spends) == len(providers):
                break
            if res.provider in spends or not _submits_to(ctx, res):
                continue
            planned[res.name] = _spending(spending_action(res, facts[res.name]))
            if planned[res.name] is not None:
                spends.append(res.provider)
    for name in spends:
        since = min(lookup_since(ctx, res) for res in resources if res.provider == name)
        read_listing_ahead(ctx, ctx.provider_for(name), since)
    # the state read once for all (a cache, no transaction: the downloads hold none); not
    # for a resource planned not to spend now (a replace without --allow-replace, outside a
    # saved plan): its shards are not drawn in this pass, and looking paged the provider's
    # listing (and downloaded a lost state's earlier batches) at every poll of `apply --wait`
    with ctx.store.reading():
        for res in resources:
            if res.name in planned and planned[res.name] is None:
                continue
            if _submits_to(ctx, res):  # its shards may be drawn inside this pass's transactions
                recover_ahead(ctx, res, facts[res.name])
    return planned


def _submits_to(ctx: RunContext, res: Resource) -> bool:
    """Whether this pass may submit ``res`` (its provider's client is shared with workers)."""
    config = ctx.project.providers.get(res.provider)
    if res.suspend or config is None or config.type not in SUBMIT_TYPES:
        return False
    return provider_ready(ctx, res.provider)


def _spending(action: Action | None) -> Action | None:
    """``action`` if this pass takes it (a create or a retry), else None (a replace cancels
    first: one at a time, by the serial step)."""
    if action is None or action.kind not in SPENDING or action.kind is ActionKind.REPLACE:
        return None
    return action


def _jobs(
    ctx: RunContext,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    spending_action: Callable[[Resource, InputReport], Action | None],
    planned: dict[str, Action | None],
    handled: set[str],
) -> Iterator[_Job]:
    """The intents to upload and create, in resource order, recorded as they are asked for
    (so the first uploads start while later resources are still being recorded). Each key is
    looked up first (one list scan per provider a pass, read ahead: ``_read_listings_ahead``),
    and a batch an earlier run made for it is adopted instead."""
    budget = _InFlightBudget(ctx)
    for res in resources:
        todo = []
        # one commit for what is recorded of a resource before its uploads (intents, lookups)
        with ctx.store.atomic(whole=True):
            taken = _intents_of(ctx, res, facts[res.name], spending_action, planned)
            if taken is None:
                continue
            gen, rows = taken
            if not rows:  # every request keeps a recorded answer: the serial step writes them
                ctx.ensure_ledger(res, gen)
                continue
            if not budget.take(res.provider, len(rows)):
                continue  # the serial step reports the queue and polls for capacity
            handled.add(res.name)
            provider = ctx.provider_for(res.provider)
            for row in rows:
                try:
                    adopted = look_up_before_create(ctx, res, provider, row)
                except ProviderError as err:
                    err.about(res.name)  # the failure stops the pass: it names the resource
                    raise
                if adopted is None:
                    todo.append(_Job(res, gen, row, provider))
                else:
                    record_remote(ctx, res, row, adopted, event="adopt")
            if not todo:
                ctx.ensure_ledger(res, gen)
        if todo:
            todo[-1].last_of_resource = True
            yield from todo


def _intents_of(
    ctx: RunContext,
    res: Resource,
    facts: InputReport,
    spending_action: Callable[[Resource, InputReport], Action | None],
    planned: dict[str, Action | None],
) -> tuple[GenerationRow, list[BatchRow]] | None:
    """Record ``res``'s intents if this pass submits it: its generation and unbound rows
    (its action as ``_read_listings_ahead`` planned it, or planned now)."""
    if not _submits_to(ctx, res):
        return None
    if res.name in planned:
        action = planned.pop(res.name)
    else:
        action = _spending(spending_action(res, facts))
    if action is None:
        return None
    if action.kind is ActionKind.RETRY:
        ctx.ensure_ledger(res, ctx.generation(res))
        if retry_held(ctx, res, report=False):
            return None  # the serial step says what it waits for (``hold``)
        gen = record_retries(ctx, res, facts)
    else:
        if held(ctx, res, facts, report=False):
            return None  # the serial step says what it waits for (``hold``)
        gen = record_create(ctx, res, facts)
    rows = [b for b in ctx.store.batches(gen.id) if b.remote_id is None]
    rows = [b for b in rows if b.status in ("pending", "creating")]
    if any(b.status == "creating" for b in rows):
        return None  # an unsure create: the serial step confirms it before any other
    return gen, rows


class _InFlightBudget:
    """What ``maxInFlightBatches`` leaves free per provider for this pass's creates."""

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self._left: dict[str, int | None] = {}

    def take(self, provider: str, n: int) -> bool:
        if provider not in self._left:
            limit = self._ctx.max_in_flight(provider)
            in_flight = [b for b in self._ctx.store.in_flight_batches() if b.provider == provider]
            self._left[provider] = None if limit is None else limit - len(in_flight)
        left = self._left[provider]
        if left is None:
            return True
        if n > left:
            self._left[provider] = 0  # later resources queue behind this one, in order
            return False
        self._left[provider] = left - n
        return True


def _submit(ctx: RunContext, calls: BoundedCalls, jobs: Iterator[_Job]) -> None:
    """Upload and create every job, overlapping, on the schedule of the module docstring.

    Each step waits (holding no transaction) for upload ``i`` and create ``i - W``, then
    records in one transaction what they did, intent ``i``'s ``create-intent`` (lock
    re-checked inside it) and the ``upload-intent`` of the next upload, and only after the
    commit sends create ``i`` and that upload. The steps after ``i`` whose upload and create
    have already ended (``_ready``; at most ``W`` in all) are recorded in the same transaction,
    in the same order, their calls sent after the same commit: when recording is what the
    pass waits for, one commit serves many intents.
    """
    window = calls.parallelism
    uploading: dict[tuple[str, str], _Job] = {}
    todo: list[_Job] = []
    i = recorded = 0
    try:
        with ctx.store.atomic(whole=True):
            starting = _take_jobs(ctx, jobs, todo, window + 1, uploading)
        _send_uploads(calls, starting)
        while i < len(todo):
            job = todo[i]
            remote = _wait_upload(ctx, job)
            done = todo[recorded] if recorded <= i - window else None
            outcome = _wait_create(done) if done is not None else None
            creating: list[_Job] = []
            starting = []
            step_recorded = recorded  # counted as recorded once the chunk commits
            with ctx.store.atomic(whole=True):
                # step i, then the steps after it whose calls have already ended, up to a
                # window's worth: the same records in the same order, one commit for all
                while True:
                    _record_file(ctx, job, remote)
                    job.batch = mark_creating(ctx, job.res, job.batch, job.file_id or "")
                    if isinstance(outcome, RemoteBatch):
                        assert done is not None
                        record_remote(ctx, done.res, done.batch, outcome, event="create")
                    starting += _take_jobs(ctx, jobs, todo, i + window + 2, uploading)
                    creating.append(job)
                    i += 1
                    if done is not None:
                        step_recorded += 1
                    if isinstance(outcome, AmbiguousOutcome) or len(creating) >= window:
                        break  # an unsure create is confirmed after the commit, as before
                    following = todo[step_recorded] if step_recorded <= i - window else None
                    if i >= len(todo) or not _ready(todo[i], following):
                        break
                    job, done = todo[i], following
                    remote = _wait_upload(ctx, job)  # ended: returns at once
                    outcome = _wait_create(done) if done is not None else None
                # the lock re-checked in the transaction that records the creates it allows
                ctx.still_holds_lock()
            recorded = step_recorded
            for sent in creating:
                _send_create(ctx, calls, sent)
            _send_uploads(calls, starting)
            _write_ledgers_while_creating(ctx, creating)
            if isinstance(outcome, AmbiguousOutcome):
                assert done is not None
                confirm_ambiguous_create(ctx, done.res, done.provider, done.batch, outcome)
        while recorded < len(todo):
            first = todo[recorded]
            assert first.create is not None
            concurrent.futures.wait([first.create])
            if first.create.exception() is not None:  # unsure (confirmed) or failed (raised)
                _finish_create(ctx, first)
                recorded += 1
                continue
            step_recorded = recorded
            try:
                # this create and those after it that have ended
                with ctx.store.atomic(whole=True):
                    while step_recorded < len(todo) and _created(todo[step_recorded]):
                        _finish_create(ctx, todo[step_recorded])
                        step_recorded += 1
            except BaseException:
                for job in todo[recorded : step_recorded + 1]:
                    job.finished = False  # rolled back: recorded again on the way out
                raise
            recorded = step_recorded
    except Exception:
        # record every create already sent, so that none is left unsure without need
        _finish_sent(ctx, todo[recorded:])
        raise
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: the creates already sent go on in their threads, which the run
        # waits for on its way out anyway; their answers are recorded as they come, so the
        # audit says what this run paid for (a second Ctrl-C stops this wait: the next run
        # adopts what they made); a create still queued for a place is dropped, not sent
        calls.stop()
        _finish_sent(ctx, todo[recorded:])
        raise


def _finish_sent(ctx: RunContext, jobs: list[_Job]) -> None:
    """Record how each of these jobs' creates ended, if it was sent (the first error is the
    one the caller raises; these are only recorded)."""
    for job in jobs:
        if job.create is None:
            continue
        if job.create.cancelled():  # dropped from the queue (a stop): it never left
            record_create_not_sent(ctx, job.res, job.batch)
            continue
        try:
            _finish_create(ctx, job)
        except Exception:  # noqa: BLE001, S112 - the first error is the one raised
            continue


def _write_ledgers_while_creating(ctx: RunContext, sent: list[_Job]) -> None:
    """The as-is ledger of each resource whose last create was just sent, written while the
    provider works (as the serial ``submit.create`` does): it is derived from the input
    alone, so a kill before it is written loses nothing (``RunContext.ensure_ledger``), and
    the creates need not wait for its 20,000 inserts."""
    last = [job for job in sent if job.last_of_resource]
    if last:
        with ctx.store.atomic(whole=True):
            for job in last:
                ctx.ensure_ledger(job.res, job.gen)


def _ready(job: _Job, done: _Job | None) -> bool:
    """Whether the step of ``job`` (recording ``done``'s create) can be recorded at once:
    its upload ended well (not a recorded file the provider lost, which is uploaded again one
    at a time) and ``done``'s create ended with a batch (an unsure one is confirmed after a
    commit, a failed one raises after one)."""
    if job.same_file_as is None:
        upload = job.upload
        if upload is None or not upload.done() or upload.exception() is not None:
            return False
        if job.reuses_known and upload.result() is None:
            return False
    if done is not None:
        create = done.create
        if create is None or not create.done() or create.exception() is not None:
            return False
    return True


def _created(job: _Job) -> bool:
    """Whether the job's create has ended with a batch."""
    create = job.create
    return create is not None and create.done() and create.exception() is None


def _take_jobs(
    ctx: RunContext,
    jobs: Iterator[_Job],
    todo: list[_Job],
    until: int,
    uploading: dict[tuple[str, str], _Job],
) -> list[_Job]:
    """Take jobs until ``todo`` holds ``until``; record their uploads' intents; return the
    jobs whose upload (or check of a recorded file) is to be sent once this commits."""
    starting = []
    while len(todo) < until:
        job = next(jobs, None)
        if job is None:
            break
        todo.append(job)
        if _record_upload_intent(ctx, job, uploading):
            starting.append(job)
    return starting


def _record_upload_intent(
    ctx: RunContext, job: _Job, uploading: dict[tuple[str, str], _Job]
) -> bool:
    """Decide how the job gets its file; record an ``upload-intent`` if it is to be sent.
    False: an earlier job of the pass sends the same file."""
    job.path = batch_file(ctx, job.res, job.gen, job.batch)
    key = (job.provider.name, job.batch.input_sha256)
    if key in uploading:
        job.same_file_as = uploading[key]
        return False
    uploading[key] = job
    known = ctx.store.get_file(job.provider.name, job.batch.input_sha256)
    if known is not None:
        job.reuses_known = True
        job.file_id = known.remote_id
        return True
    job.filename = record_upload_intent(ctx, job.res, job.batch, job.path)
    return True


def _send_uploads(calls: BoundedCalls, starting: list[_Job]) -> None:
    for job in starting:
        provider, path, filename = job.provider, job.path, job.filename
        assert path is not None
        if job.reuses_known:
            call = _still_there(provider, job.file_id or "")
        else:
            call = functools.partial(
                provider.upload_file, path, filename=filename, progress=job.sent.append
            )
        job.upload = calls.submit(provider.name, _about(job.res, call))


def _wait_upload(ctx: RunContext, job: _Job) -> RemoteFile | None:
    """Wait for the job's upload, reporting its progress as it goes; None: nothing to record
    (the same file as an earlier job's, or a recorded file still there)."""
    assert job.path is not None
    if job.same_file_as is not None:
        job.file_id = job.same_file_as.file_id
        return None
    assert job.upload is not None
    reported = 0
    while True:
        done, _ = concurrent.futures.wait([job.upload], timeout=0.1)
        for count in job.sent[reported:]:
            report_upload_progress(ctx, job.res, job.filename, job.path.stat().st_size, count)
        reported = len(job.sent)
        if done:
            break
    remote = job.upload.result()
    if not job.reuses_known:
        return remote
    if remote is None:  # the provider lost it: forget it and upload here, one at a time
        ctx.store.forget_file(job.provider.name, job.batch.input_sha256)
        job.file_id = ensure_uploaded(ctx, job.provider, job.res, job.batch, job.path)
    return None


def _record_file(ctx: RunContext, job: _Job, remote: RemoteFile | None) -> None:
    if remote is not None:
        assert job.path is not None
        record_upload(ctx, job.provider.name, job.res, job.batch, remote, job.path)
        job.file_id = remote.id


def _send_create(ctx: RunContext, calls: BoundedCalls, job: _Job) -> None:
    provider, res, batch, file_id = job.provider, job.res, job.batch, job.file_id or ""
    job.create = calls.submit(
        provider.name, _about(res, lambda: send_create(ctx, provider, res, batch, file_id))
    )


def _about(res: Resource, call: Callable[[], T]) -> Callable[[], T]:
    """``call``, whose failure names ``res`` (``BatchspecError.about``) when it stops the pass;
    an unsure create is confirmed by the pass itself, never shown as it is."""

    def named() -> T:
        try:
            return call()
        except AmbiguousOutcome:
            raise
        except ProviderError as err:
            err.about(res.name)
            raise

    return named


def _wait_create(job: _Job) -> RemoteBatch | AmbiguousOutcome:
    assert job.create is not None
    try:
        return job.create.result()
    except AmbiguousOutcome as err:
        return err


def _still_there(provider: Provider, file_id: str) -> Callable[[], RemoteFile | None]:
    def check() -> RemoteFile | None:
        try:
            return provider.get_file(file_id)
        except RemoteNotFound:
            return None

    return check


def _finish_create(ctx: RunContext, job: _Job) -> None:
    """Record how the job's create ended, once: made (``create``), unsure (confirmed by
    lookups), or refused (the intent ``pending`` again, and the error raised)."""
    assert job.create is not None
    if job.finished:
        return
    job.finished = True
    try:
        remote = job.create.result()
    except AmbiguousOutcome as err:
        confirm_ambiguous_create(ctx, job.res, job.provider, job.batch, err)
        return
    except ProviderError as err:
        record_create_refused(ctx, job.res, job.batch, err)
        raise
    record_remote(ctx, job.res, job.batch, remote, event="create")
