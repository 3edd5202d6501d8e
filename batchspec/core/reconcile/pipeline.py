"""A pass's submissions side by side: the uploads and creates of different batches overlap.

Before a pass advances its resources one by one, ``submit_pass`` takes each resource whose
plan is to spend now (a create, an allowed replace, a retry) on a provider whose client the
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
  the provider (one shared list scan a pass, ``adopt.look_up_before_create``) and adopted if
  an earlier run made it; files are deduplicated by sha256 per provider (within the pass too);
  ``maxInFlightBatches`` is respected; an unsure create (``creating``) is left to the serial
  step, which confirms it before anything is created again.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from batchspec.core.plan import Action, ActionKind
from batchspec.core.reconcile.adopt import look_up_before_create, record_remote
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reconcile.prefetch import BoundedCalls, provider_ready
from batchspec.core.reconcile.retry import record_retries
from batchspec.core.reconcile.submit import (
    batch_file,
    confirm_ambiguous_create,
    ensure_uploaded,
    mark_creating,
    record_create,
    record_upload,
    record_upload_intent,
    report_upload_progress,
    send_create,
    supersede_older,
)
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
    _submit(ctx, calls, _jobs(ctx, resources, facts, spending_action, handled))
    return handled


def _jobs(
    ctx: RunContext,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    spending_action: Callable[[Resource, InputReport], Action | None],
    handled: set[str],
) -> Iterator[_Job]:
    """The intents to upload and create, in resource order, recorded as they are asked for
    (so the first uploads start while later resources are still being recorded). Each key is
    looked up first (one list scan per provider a pass), and a batch an earlier run made for
    it is adopted instead."""
    budget = _InFlightBudget(ctx)
    for res in resources:
        taken = _intents_of(ctx, res, facts[res.name], spending_action)
        if taken is None:
            continue
        gen, rows = taken
        if not budget.take(res.provider, len(rows)):
            continue  # the serial step reports the queue and polls for capacity
        handled.add(res.name)
        provider = ctx.provider_for(res.provider)
        todo = []
        for row in rows:
            adopted = look_up_before_create(ctx, res, provider, row)
            if adopted is None:
                todo.append(_Job(res, gen, row, provider))
            else:
                record_remote(ctx, res, row, adopted, event="adopt")
        if not todo:
            ctx.ensure_ledger(res, gen)
            continue
        todo[-1].last_of_resource = True
        yield from todo


def _intents_of(
    ctx: RunContext,
    res: Resource,
    facts: InputReport,
    spending_action: Callable[[Resource, InputReport], Action | None],
) -> tuple[GenerationRow, list[BatchRow]] | None:
    """Record ``res``'s intents if this pass submits it: its generation and unbound rows."""
    config = ctx.project.providers.get(res.provider)
    if res.suspend or config is None or config.type not in SUBMIT_TYPES:
        return None
    if not provider_ready(ctx, res.provider):
        return None
    action = spending_action(res, facts)
    if action is None or action.kind not in SPENDING:
        return None
    if action.kind is ActionKind.RETRY:
        gen = record_retries(ctx, res, facts)
    else:
        if action.kind is ActionKind.REPLACE:
            supersede_older(ctx, res)
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
    """Upload and create every job, overlapping, on the schedule of the module docstring."""
    window = calls.parallelism
    uploading: dict[tuple[str, str], _Job] = {}
    todo: list[_Job] = []
    i = recorded = 0
    try:
        while True:
            while len(todo) <= i + window:  # start the uploads up to W ahead
                job = next(jobs, None)
                if job is None:
                    break
                _start_upload(ctx, calls, job, uploading)
                todo.append(job)
            if i >= len(todo):
                break
            _finish_upload(ctx, todo[i])
            _start_create(ctx, calls, todo[i])
            while recorded <= i - window:
                _finish_create(ctx, todo[recorded])
                recorded += 1
            i += 1
        while recorded < len(todo):
            _finish_create(ctx, todo[recorded])
            recorded += 1
    except Exception:
        # record every create already sent, so that none is left unsure without need
        for job in todo[recorded:]:
            if job.create is not None:
                try:
                    _finish_create(ctx, job)
                except Exception:  # noqa: BLE001, S112 - the first error is the one raised
                    continue
        raise


def _start_upload(
    ctx: RunContext, calls: BoundedCalls, job: _Job, uploading: dict[tuple[str, str], _Job]
) -> None:
    job.path = path = batch_file(ctx, job.res, job.gen, job.batch)
    provider = job.provider
    key = (provider.name, job.batch.input_sha256)
    if key in uploading:
        job.same_file_as = uploading[key]
        return
    uploading[key] = job
    known = ctx.store.get_file(provider.name, job.batch.input_sha256)
    if known is not None:
        job.reuses_known = True
        job.upload = calls.submit(provider.name, _still_there(provider, known.remote_id))
        return
    job.filename = record_upload_intent(ctx, job.res, job.batch, path)
    filename = job.filename
    job.upload = calls.submit(
        provider.name,
        lambda: provider.upload_file(path, filename=filename, progress=job.sent.append),
    )


def _still_there(provider: Provider, file_id: str) -> Callable[[], RemoteFile | None]:
    def check() -> RemoteFile | None:
        try:
            return provider.get_file(file_id)
        except RemoteNotFound:
            return None

    return check


def _finish_upload(ctx: RunContext, job: _Job) -> None:
    """Wait for the job's file (reporting its upload's progress as it goes); record it."""
    assert job.path is not None
    if job.same_file_as is not None:
        job.file_id = job.same_file_as.file_id
        return
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
    if job.reuses_known:
        if remote is None:  # the provider lost it: forget it and upload here, one at a time
            ctx.store.forget_file(job.provider.name, job.batch.input_sha256)
            job.file_id = ensure_uploaded(ctx, job.provider, job.res, job.batch, job.path)
        else:
            job.file_id = remote.id
        return
    assert remote is not None
    record_upload(ctx, job.provider.name, job.res, job.batch, remote, job.path)
    job.file_id = remote.id


def _start_create(ctx: RunContext, calls: BoundedCalls, job: _Job) -> None:
    file_id = job.file_id
    assert file_id is not None
    job.batch = batch = mark_creating(ctx, job.res, job.batch, file_id)
    ctx.still_holds_lock()
    provider, res = job.provider, job.res
    job.create = calls.submit(provider.name, lambda: send_create(provider, res, batch, file_id))
    if job.last_of_resource:  # while the provider works: the ledger of an as-is input
        ctx.ensure_ledger(res, job.gen)


def _finish_create(ctx: RunContext, job: _Job) -> None:
    assert job.create is not None
    try:
        remote = job.create.result()
    except AmbiguousOutcome as err:
        confirm_ambiguous_create(ctx, job.res, job.provider, job.batch, err)
        return
    record_remote(ctx, job.res, job.batch, remote, event="create")
