"""Submit recorded intents: upload the batch file once, re-check the lock, create the batch.

``create`` (and ``replace``, which first supersedes the older spec's generations) records the
generation and its intents (``intent``) unless a retired batch still stopping holds it
(``hold``: nothing recorded, the step waits), then submits every intent that has no remote batch
yet, as the provider's ``maxInFlightBatches`` allows. Per batch it promises, in order: an
unsure create (``creating``) is adopted by key if the provider has it, and is never created
again while it may still be in transit (``adopt.confirm_deadline``: the step reports
"waiting to confirm an earlier create" instead); an intent never sent from this state
(``pending``) is first looked up by key too (``adopt.look_up_before_create``: the state may be
lost or stale) and adopted if an earlier run made it; the file is uploaded at most once per
provider and sha256 (``upload-intent`` recorded first; a file the provider lost is uploaded
again); the row is marked ``creating`` with a ``create-intent`` event; the run's lock is
re-checked; only then is the batch created, with its deterministic key in the metadata. A
create that fails ambiguously (``AmbiguousOutcome``: a timeout, a reset) is recorded as
``create-unconfirmed`` and looked up, backing off, until its window ends; it is adopted if it
appears, and otherwise left ``creating`` for a later pass. A create the provider refused in
so many words (``ProviderError.sent_nothing``) sets the intent back to ``pending``
(``create-refused``) before the error goes on, so the next run looks its key up once and
creates it, instead of waiting out the window of a create in transit.
"""

from __future__ import annotations

from pathlib import Path

from batchspec.core.batches import batch_metadata, carries_another_key
from batchspec.core.plan import Action
from batchspec.core.reconcile.adopt import (
    confirm_deadline,
    find_remote,
    look_up_before_create,
    look_up_until,
    record_remote,
)
from batchspec.core.reconcile.cancel import ACTIVE, cancel_ahead, cancel_generation
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reconcile.drain import keep_ended_answers
from batchspec.core.reconcile.hold import held
from batchspec.core.reconcile.intent import ensure_generation, record_shards
from batchspec.core.reconcile.poll import poll_batch, refresh
from batchspec.core.reconcile.recover import recover_ahead
from batchspec.core.reporting import Progress, format_size
from batchspec.errors import BatchspecError, ProviderError
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


def create(ctx: RunContext, res: Resource, facts: InputReport, action: Action) -> bool:
    if held(ctx, res, facts):  # a retired batch still stopping: its answers are reused
        return False
    recover_ahead(ctx, res, facts)  # answers a lost state forgot: before any transaction
    gen = record_create(ctx, res, facts)
    submitted = submit_queued(ctx, res, gen)
    ctx.ensure_ledger(res, gen)
    return submitted


def record_create(ctx: RunContext, res: Resource, facts: InputReport) -> GenerationRow:
    """The generation and, the first time, its ledger and one intent per shard (refused,
    with nothing recorded, when the input changed after it was validated)."""
    ctx.require_unchanged_input(res, facts.sha256)
    # one transaction: shards refused (an input changed after the check above, as they were
    # copied) leave no generation pending with nothing sent, which the next run took for a
    # spec still in flight and would not replace without --allow-replace
    with ctx.store.atomic():
        gen = ensure_generation(ctx, res, facts)
        if not ctx.store.batches(gen.id) and not ctx.ledger.has_requests(gen.id):
            record_shards(ctx, res, facts, gen)
    return gen


def replace(ctx: RunContext, res: Resource, facts: InputReport, action: Action) -> bool:
    supersede_older(ctx, res)
    return create(ctx, res, facts, action)


def supersede_older(ctx: RunContext, res: Resource) -> None:
    """Cancel the generations of an older spec still in flight (a replace); their remote
    cancels run side by side in the pass's pool (``cancel.cancel_ahead``)."""
    older = [
        gen
        for gen in ctx.store.generations(res.name)
        if gen.spec_hash != res.spec_hash and gen.status in ACTIVE
    ]
    cancel_ahead(ctx, [(res.name, gen) for gen in older])
    for gen in older:
        cancel_generation(ctx, res.name, gen, status="superseded", reason="replaced by a new spec")
        keep_ended_answers(ctx, res, gen)  # a batch that ended first keeps its answers


def submit_queued(ctx: RunContext, res: Resource, gen: GenerationRow) -> bool:
    """Submit every intent of the generation that has no remote batch yet, capacity allowing.

    False when one must wait: for capacity, or to confirm an earlier create.
    """
    all_bound = True
    for batch in ctx.store.batches(gen.id):
        if batch.remote_id is None and batch.status in ("pending", "creating"):
            if not _has_capacity(ctx, res, batch):
                # capacity frees only when a batch in flight is seen finished: poll ours,
                # or a resource whose plan is create (queued intents) would wait forever
                refresh(ctx, res)
                return False
            all_bound = _submit_batch(ctx, res, gen, batch) and all_bound
    return all_bound


def _has_capacity(ctx: RunContext, res: Resource, batch: BatchRow) -> bool:
    limit = ctx.max_in_flight(res.provider)
    if limit is None or batch.status == "creating":  # an unsure create is resolved first
        return True
    in_flight = _in_flight_on(ctx, res.provider)
    if len(in_flight) >= limit:
        # The capacity may be held by resources this run was not asked about (--select):
        # poll those, so that their finishing frees it (they are collected when applied).
        provider = ctx.provider_for(res.provider)
        for other in in_flight:
            owner = ctx.store.get_generation(other.generation_id).resource
            if owner != res.name:
                poll_batch(ctx, owner, other, provider, foreign=True)
        in_flight = _in_flight_on(ctx, res.provider)
    if len(in_flight) < limit:
        return True
    ctx.report(
        Progress(
            "queued",
            res.name,
            f"shard {batch.shard + 1} attempt {batch.attempt} waits: {len(in_flight)} "
            f"batch(es) in flight on {res.provider} (maxInFlightBatches {limit})",
        )
    )
    return False


def _in_flight_on(ctx: RunContext, provider: str) -> list[BatchRow]:
    return [b for b in ctx.store.in_flight_batches() if b.provider == provider]


def _submit_batch(ctx: RunContext, res: Resource, gen: GenerationRow, batch: BatchRow) -> bool:
    """Bind the intent to a remote batch (adopted or created); False: not yet, it waits."""
    provider = ctx.provider_for(res.provider)
    if batch.status == "creating":
        adopted = find_remote(ctx, provider, batch)
        if adopted is not None:
            record_remote(ctx, res, batch, adopted, event="adopt")
            return True
        until = confirm_deadline(ctx, res.provider, batch)
        if ctx.clock() < until:
            _report_unconfirmed(ctx, res, batch, until)
            return False
    else:  # never sent from this state: an earlier run whose state is lost may have made it
        adopted = look_up_before_create(ctx, res, provider, batch)
        if adopted is not None:
            record_remote(ctx, res, batch, adopted, event="adopt")
            return True
    path = batch_file(ctx, res, gen, batch)
    file_id = ensure_uploaded(ctx, provider, res, batch, path)
    batch = mark_creating(ctx, res, batch, file_id)
    ctx.still_holds_lock()
    try:
        remote = send_create(ctx, provider, res, batch, file_id)
    except AmbiguousOutcome as err:
        return confirm_ambiguous_create(ctx, res, provider, batch, err)
    except ProviderError as err:
        record_create_refused(ctx, res, batch, err)
        raise
    record_remote(ctx, res, batch, remote, event="create")
    return True


def record_create_not_sent(ctx: RunContext, res: Resource, batch: BatchRow) -> None:
    """A create dropped before it was sent (a run stopped while it waited for a place under
    ``--parallelism`` or ``maxConcurrency``) made nothing: its intent is ``pending`` again (a
    ``create-not-sent`` event), so the next run creates it at once instead of waiting
    ``createConfirmSeconds`` for a batch that cannot arrive."""
    _pending_again(ctx, res, batch, "create-not-sent", {})


def _pending_again(
    ctx: RunContext, res: Resource, batch: BatchRow, action: str, detail: dict[str, object]
) -> None:
    """A create known to have made nothing: its intent ``pending`` again, with the event
    ``action`` saying why."""
    with ctx.store.atomic():
        ctx.store.update_batch(batch.id, status="pending")
        ctx.store.record_event(
            ctx.run_id,
            action,
            resource=res.name,
            generation_id=batch.generation_id,
            batch_id=batch.id,
            detail={"key": batch.key, **detail},
        )


def record_create_refused(
    ctx: RunContext, res: Resource, batch: BatchRow, err: ProviderError
) -> None:
    """A create the provider refused (``ProviderError.sent_nothing``: a 4xx other than
    408/409 on every attempt, a 429 whose retries were spent, a 501 or 505, a connection
    never opened) made nothing, so the intent is ``pending`` again (a ``create-refused``
    event, reported as ``create_refused``): the next run looks its key up and creates it at
    once, instead of waiting ``createConfirmSeconds`` for a batch that cannot arrive. Any
    other failure (another 5xx, a 2xx whose body did not parse, a failed lookup of a lost
    create) leaves it ``creating``: looked up first."""
    if not err.sent_nothing:
        return
    _pending_again(
        ctx, res, batch, "create-refused", {"http_status": err.status, "error": err.message}
    )
    # said of each one: side by side, only the first failure is raised, and a create said to
    # be "creating" with nothing after it may have made a batch, for all CI can tell
    status = f" (HTTP {err.status})" if err.status else ""
    ctx.report(
        Progress(
            "create_refused",
            res.name,
            f"the provider refused the create of shard {batch.shard + 1}, attempt "
            f"{batch.attempt}{status}: no batch was made; the next apply creates it",
            {"shard": batch.shard + 1, "attempt": batch.attempt, "http_status": err.status},
        )
    )


def mark_creating(ctx: RunContext, res: Resource, batch: BatchRow, file_id: str) -> BatchRow:
    """Record that the create is about to be sent (``creating``, a ``create-intent`` event),
    and report it (a ``creating`` progress event)."""
    with ctx.store.atomic():
        batch = ctx.store.update_batch(batch.id, input_file_id=file_id, status="creating")
        ctx.store.record_event(
            ctx.run_id,
            "create-intent",
            resource=res.name,
            generation_id=batch.generation_id,
            batch_id=batch.id,
            detail={"input_file_id": file_id, "key": batch.key},
        )
    # said before it is sent: a create may land whatever happens next (a Ctrl-C included),
    # and its file may be one uploaded before, with no ``upload`` event of this run
    ctx.report(
        Progress(
            "creating",
            res.name,
            f"creating a batch (shard {batch.shard + 1}, attempt {batch.attempt})",
            {"shard": batch.shard + 1, "attempt": batch.attempt},
        )
    )
    return batch


def send_create(
    ctx: RunContext, provider: Provider, res: Resource, batch: BatchRow, file_id: str
) -> RemoteBatch:
    """The create call itself, with the intent's deterministic key in its metadata; stamps
    ``ctx.last_create_at`` when it is answered (the next poll is paced from there)."""
    remote = provider.create_batch(
        input_file_id=file_id,
        endpoint=res.endpoint,
        completion_window=res.completion_window,
        metadata=batch_metadata(res, batch),
    )
    if carries_another_key(remote, batch.key):
        raise AmbiguousOutcome(
            f"{provider.name} answered the create with batch {remote.id}, which carries "
            f"another batch's key ({_key_text(remote)}): not taken as this one's (its answers "
            "are another batch's); the batch this create made, if any, is looked up by its key"
        )
    ctx.last_create_at = ctx.monotonic()
    ctx.progress[remote.id] = (ctx.last_create_at, 0)
    return remote


def _key_text(remote: RemoteBatch) -> str:
    """The batchspec key ``remote`` carries, as resource/shard/attempt (counted from 1)."""
    meta = remote.metadata
    shard = meta.get("batchspec_shard", "?")
    shown = str(int(shard) + 1) if shard.isascii() and shard.isdigit() else shard
    return (
        f"resource {meta.get('batchspec_resource', '?')}, shard {shown}, "
        f"attempt {meta.get('batchspec_attempt', '?')}"
    )


def confirm_ambiguous_create(
    ctx: RunContext, res: Resource, provider: Provider, batch: BatchRow, err: AmbiguousOutcome
) -> bool:
    """The create may have been made, or may still arrive: look it up through its window."""
    ctx.store.record_event(
        ctx.run_id,
        "create-unconfirmed",
        resource=res.name,
        generation_id=batch.generation_id,
        batch_id=batch.id,
        detail={"key": batch.key, "error": str(err)},
    )
    until = confirm_deadline(ctx, res.provider, batch)
    ctx.report(
        Progress(
            "confirm",
            res.name,
            f"the create of shard {batch.shard + 1} attempt {batch.attempt} got no clear answer "
            f"({err}); looking it up for up to {max(until - ctx.clock(), 0):.0f}s before any "
            "new create",
        )
    )
    remote = look_up_until(ctx, provider, batch, until=until)
    if remote is None:
        _report_unconfirmed(ctx, res, batch, until)
        return False
    record_remote(ctx, res, batch, remote, event="adopt")
    return True


def _report_unconfirmed(ctx: RunContext, res: Resource, batch: BatchRow, until: float) -> None:
    left = until - ctx.clock()
    what = f"shard {batch.shard + 1} attempt {batch.attempt}"
    if left > 0:
        message = (
            f"waiting to confirm an earlier create of {what}: no batch with its key is listed "
            f"yet, and it may still arrive for {left:.0f}s more; nothing is created until then "
            f"(the window is provider {res.provider}'s createConfirmSeconds)"
        )
    else:
        message = (
            f"an earlier create of {what} was not confirmed: no batch with its key appeared "
            "within its window; it is created again on the next pass"
        )
    ctx.report(Progress("waiting", res.name, message, {"key": batch.key}))


def batch_file(ctx: RunContext, res: Resource, gen: GenerationRow, batch: BatchRow) -> Path:
    stored = ctx.shard_dir / f"{batch.input_sha256}.jsonl"
    if stored.is_file():
        return stored
    if batch.input_sha256 == gen.input_sha256:
        # uploaded as it is: only if it still holds what was validated and recorded
        ctx.require_unchanged_input(res, gen.input_sha256)
        return res.input_path
    if ctx.blobs.has(batch.input_sha256):  # written by another runner of a shared state
        return ctx.blobs.ensure_local(batch.input_sha256)
    raise BatchspecError(
        f"the batch file for {res.name} shard {batch.shard + 1} attempt {batch.attempt} "
        f"(sha256 {batch.input_sha256[:12]}) is missing from {ctx.shard_dir}",
    )


def ensure_uploaded(
    ctx: RunContext, provider: Provider, res: Resource, batch: BatchRow, path: Path
) -> str:
    known = known_file(ctx, provider, batch)
    if known is not None:
        return known
    filename = record_upload_intent(ctx, res, batch, path)
    size = path.stat().st_size

    def sent(count: int) -> None:
        report_upload_progress(ctx, res, filename, size, count)

    remote = provider.upload_file(path, filename=filename, progress=sent)
    record_upload(ctx, provider.name, res, batch, remote, path)
    return remote.id


def known_file(ctx: RunContext, provider: Provider, batch: BatchRow) -> str | None:
    """The file id this provider holds for the batch's sha256, if one is recorded and it
    still has it (a file it lost is forgotten, and uploaded again)."""
    known = ctx.store.get_file(provider.name, batch.input_sha256)
    if known is None:
        return None
    try:
        provider.get_file(known.remote_id)
        return known.remote_id
    except RemoteNotFound:
        ctx.store.forget_file(provider.name, batch.input_sha256)
        return None


def record_upload_intent(ctx: RunContext, res: Resource, batch: BatchRow, path: Path) -> str:
    """Record (and report) an upload about to start; return the name it is uploaded as."""
    size = path.stat().st_size
    ctx.store.record_event(
        ctx.run_id,
        "upload-intent",
        resource=res.name,
        batch_id=batch.id,
        detail={"sha256": batch.input_sha256, "bytes": size},
    )
    filename = f"{res.name}-s{batch.shard + 1}-a{batch.attempt}.jsonl"
    ctx.report(
        Progress(
            "upload",
            res.name,
            f"uploading {filename} ({format_size(size)})",
            {"file": filename, "bytes": size},
        )
    )
    return filename


def report_upload_progress(
    ctx: RunContext, res: Resource, filename: str, size: int, count: int
) -> None:
    ctx.report(
        Progress(
            "upload_progress",
            res.name,
            f"uploaded {format_size(count)} of {format_size(size)}",
            {"file": filename, "bytes": size, "sent": count},
        )
    )


def record_upload(
    ctx: RunContext, provider: str, res: Resource, batch: BatchRow, remote: RemoteFile, path: Path
) -> None:
    """Record an uploaded file (deduplicated by sha256 per provider from now on). An input
    uploaded as it is must still hold the validated content once the upload has read it
    (``InputChangedError``: nothing recorded, no batch created from it)."""
    if path == res.input_path:
        ctx.require_unchanged_input(res, batch.input_sha256)
    with ctx.store.atomic():
        ctx.store.record_file(
            provider,
            batch.input_sha256,
            remote.id,
            remote.bytes or path.stat().st_size,
            remote.expires_at,
        )
        ctx.store.record_event(
            ctx.run_id,
            "upload",
            resource=res.name,
            batch_id=batch.id,
            detail={"sha256": batch.input_sha256, "file_id": remote.id},
        )
