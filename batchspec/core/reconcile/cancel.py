"""Cancel the in-flight batches of a resource's active generations (``cancel``, replace, prune).

An intent never submitted is abandoned; an unsure create (``creating``, no remote id) is first
looked up by key and adopted, since it may have landed and be paid for, then cancelled too.
One not found is left ``creating``: it may still land, so each later apply pass looks it up
again (``drain``): cancels, adopts and keeps what it finishes if found, records it never made
once its confirm window has passed. That holds for a generation retired (superseded, pruned)
and for one a user cancelled whose manifest is unchanged, though that one stays the
resource's current generation (``drain.cancelled_unconfirmed``: once found, its own refresh
and collect steps poll the batch and write what it finished); a new generation's create
waits for it (``hold``).
A batch the provider answers 404 for, its cancel and a read of it both, has nothing left to
stop: it is recorded gone (``poll.record_gone``), so that a cancel, a prune or a replace of a
batch a server lost goes through instead of failing every time. The generation's new status
and a ``cancel`` event are recorded in one transaction. A cancel only starts the stop (the
batch is recorded ``cancelling``); the answers the provider still finishes are kept by the
passes of later applies (``drain``), never by a second cancel.

The cancels of different batches run side by side. While a bounded pool is open
(``RunContext.calls``: ``Reconciler.cancels_ahead`` for ``batchspec cancel``, ``apply
--prune`` and ``apply --replace``, the pass's pool for a new spec superseding an old one),
``cancel_ahead`` sends, before the steps cancel one generation after the other, exactly the
cancels those steps would send: the batches with a remote id, not ended and not
``cancelling``, of the generations they cancel (``apply --prune``: of the plan's ``prune``
resources only). At most ``--parallelism`` calls are in flight, at most a provider's
``maxConcurrency`` (halved on 429) to one provider, and only for the providers whose clients
threads may share (``prefetch.PREFETCH_TYPES``); the others are cancelled one at a time by
the step, as is an unsure create the step adopts. Workers only call the provider: each step
takes its batches' answers (``Prefetched.take_cancel``) and records them on the main thread,
in the order and with the content a serial run records (batch rows, the generation's status,
the ``cancel`` event, progress). A cancel that failed is raised by the step that would have
sent it, recording nothing for it; a run that fails drops the cancels not yet started, and
records the answers of those that had ended (``record_cancels_sent_ahead``): a batch the
provider cancelled is never left recorded in flight, and the error says how many.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from batchspec.core.batches import batch_fields
from batchspec.core.reconcile.adopt import bind_adopted, find_remote
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reconcile.poll import record_gone
from batchspec.core.reconcile.prefetch import shares_client
from batchspec.core.reporting import Progress
from batchspec.errors import BatchspecError
from batchspec.providers.base import RemoteBatch, RemoteNotFound
from batchspec.state.store import BatchRow, GenerationRow
from batchspec.wire.batch_status import TERMINAL_STATUSES

#: generation statuses a cancel acts on (in flight)
ACTIVE = ("pending", "in_progress")


def cancel(
    ctx: RunContext, name: str, *, reason: str = "cancelled by a user", quiet: bool = False
) -> int:
    """Cancel the in-flight batches of a resource's active generations; return how many.
    ``quiet``: report no ``cancel`` line (the caller reports one that says more: a prune)."""
    generations = [gen for gen in ctx.store.generations(name) if gen.status in ACTIVE]
    cancel_ahead(ctx, [(name, gen) for gen in generations])
    return sum(
        cancel_generation(ctx, name, gen, status="cancelled", reason=reason, quiet=quiet)
        for gen in generations
    )


def cancel_ahead(ctx: RunContext, targets: Iterable[tuple[str, GenerationRow]]) -> None:
    """Send the cancels ``cancel_generation`` of each (resource, generation) will send, in
    ``ctx.calls`` (nothing without a pool); each is taken by that step. Recording nothing."""
    calls = ctx.calls
    if calls is None:
        return
    for _, gen in targets:
        for batch in ctx.store.batches(gen.id):
            # the provider that runs the batch (a resource may have moved to another since)
            key = (batch.provider, batch.remote_id or "")
            if not _sends_cancel(batch) or key in ctx.prefetched.cancels:
                continue
            if shares_client(ctx, batch.provider):
                call = functools.partial(ctx.provider_for(batch.provider).cancel_batch, key[1])
                ctx.prefetched.cancels[key] = calls.submit(batch.provider, call)


def cancel_generation(
    ctx: RunContext,
    name: str,
    gen: GenerationRow,
    *,
    status: str,
    reason: str,
    quiet: bool = False,
) -> int:
    n = 0
    # each batch is cancelled on the provider that runs it (``batch.provider``): the
    # resource may have moved to another since
    for batch in ctx.store.batches(gen.id):
        if batch.remote_id is None and batch.status == "creating":
            # the create may have landed: find it (it is paid for) and cancel it too
            remote = find_remote(ctx, ctx.provider_for(batch.provider), batch)
            if remote is not None:
                batch = bind_adopted(ctx, name, batch, remote)
        if batch.remote_id is None:
            # an intent never submitted is abandoned; a create not found may still land: it
            # stays ``creating``, looked up again by every later pass's drain (which cancels
            # it if found), the generation's status cancelled or superseded alike
            if batch.status not in TERMINAL_STATUSES and batch.status != "creating":
                ctx.store.update_batch(batch.id, status="cancelled")
            continue
        if _sends_cancel(batch):
            try:
                remote = ctx.prefetched.take_cancel(
                    batch.provider, batch.remote_id, ctx.before_wait
                )
                if remote is None:  # not sent ahead: send it now
                    remote = ctx.provider_for(batch.provider).cancel_batch(batch.remote_id)
            except RemoteNotFound as err:
                if not _gone(ctx, batch):
                    raise
                record_gone(ctx, name, gen, batch, err)  # nothing left to stop: not an error
                continue
            ctx.store.update_batch(batch.id, **batch_fields(remote))
            # a batch that ended before the cancel reached it keeps its own end (completed,
            # failed, expired): recorded as it is, not counted as cancelled
            n += not remote.is_terminal or remote.status == "cancelled"
    with ctx.store.atomic():
        ctx.store.update_generation(gen.id, status=status)
        ctx.store.record_event(
            ctx.run_id,
            "cancel",
            resource=name,
            generation_id=gen.id,
            detail={"reason": reason, "batches": n},
        )
    if not quiet:  # the event is recorded either way
        # "sent": a batch stops at the provider's pace (cancelling, then cancelled)
        ctx.report(Progress("cancel", name, f"{reason}: cancel sent to {n} batch(es)"))
    return n


def _gone(ctx: RunContext, batch: BatchRow) -> bool:
    """Whether the provider no longer knows ``batch``, its cancel answered 404: only when a
    read of the batch answers 404 too (a gateway without the cancel route answers 404 for a
    batch that still runs, whose answers would be lost if it were written off)."""
    try:
        ctx.provider_for(batch.provider).get_batch(batch.remote_id or "")
    except RemoteNotFound:
        return True
    except BatchspecError:
        return False  # not known either way: the cancel's own error is raised
    return False


def cancel_retired_batch(
    ctx: RunContext,
    name: str,
    gen: GenerationRow,
    batch: BatchRow,
    remote: RemoteBatch,
    *,
    current: bool = False,
) -> BatchRow:
    """Adopt ``remote``, the batch of ``batch``'s create that ``gen``'s cancel could not
    confirm, found only since by its key (the drain's lookup), cancelling it *first*: a
    cancel that fails (or a run that dies) leaves nothing recorded, so the next pass finds
    it again by its key and sends it then; once recorded, it is only polled. Then its row,
    an ``adopt`` and a ``cancel`` event, in one transaction; the row as it is now.

    ``current``: ``gen`` is still its resource's current generation (a user cancelled it,
    its manifest unchanged), whose result files an earlier apply may have written from its
    other batches (another shard, an earlier attempt): the same transaction forgets their
    hashes, so that once this batch is collected the plan writes them again (``collect``)
    with its answers too, however many runs that takes."""
    sent = remote.status not in TERMINAL_STATUSES and remote.status != "cancelling"
    if sent:
        remote = ctx.provider_for(batch.provider).cancel_batch(remote.id)
    with ctx.store.atomic():
        row = bind_adopted(ctx, name, batch, remote)
        if current:  # the results written so far miss what this batch finished
            ctx.store.update_generation(gen.id, output_sha256=None, errors_sha256=None)
        if sent:
            ctx.store.record_event(
                ctx.run_id,
                "cancel",
                resource=name,
                generation_id=gen.id,
                batch_id=batch.id,
                detail={
                    "reason": f"adopted after its {gen.status} generation's cancel",
                    "batches": 1,
                },
            )
    ctx.report(
        Progress(
            "adopt",
            name,
            f"adopted batch {remote.id} ({remote.status}) of {gen.status} generation "
            f"{gen.id}: its create was not confirmed",
            {"remote_id": remote.id, "status": remote.status, "generation_id": gen.id},
        )
    )
    if sent:
        ctx.report(
            Progress(
                "cancel",
                name,
                f"batch {remote.id} of {gen.status} generation {gen.id}, created after all: "
                f"cancel sent ({remote.status})",
                {"remote_id": remote.id, "status": remote.status, "generation_id": gen.id},
            )
        )
    return row


def record_cancels_sent_ahead(ctx: RunContext, err: BaseException) -> int:
    """After ``err`` stopped the run (its pool closed, every cancel started has ended):
    record on its batch row, with a ``cancel`` event, each cancel sent ahead that the
    provider answered and no step took, and say so in ``err``'s details; return how many.

    Their generations are left as they were (no step finished them): the next run sends
    no cancel again for a batch recorded ``cancelling`` or ended, and finishes them."""
    answered = [
        (key, future.result())
        for key, future in ctx.prefetched.cancels.items()
        if future.done() and not future.cancelled() and future.exception() is None
    ]
    ctx.prefetched.cancels.clear()
    taken = 0
    try:
        for (provider, remote_id), remote in answered:
            batch = ctx.store.batch_by_remote_id(provider, remote_id)
            if batch is None or not _sends_cancel(batch):
                continue
            gen = ctx.store.get_generation(batch.generation_id)
            with ctx.store.atomic():
                ctx.store.update_batch(batch.id, **batch_fields(remote))
                ctx.store.record_event(
                    ctx.run_id,
                    "cancel",
                    resource=gen.resource,
                    generation_id=gen.id,
                    batch_id=batch.id,
                    detail={"reason": "sent ahead; the run failed before its step", "batches": 1},
                )
            taken += 1
    except Exception as failed:  # noqa: BLE001 - the run's own error is the one raised
        if isinstance(err, BatchspecError):
            err.details.append(f"cancels sent side by side could not be recorded: {failed}")
    if taken and isinstance(err, BatchspecError):
        err.details.append(
            f"{taken} other batch cancel(s), sent side by side, were answered before this "
            "failure: recorded on their batches (the next run does not send them again)"
        )
    return taken


def _sends_cancel(batch: BatchRow) -> bool:
    """Whether the step sends a cancel for ``batch``: bound, not ended, not cancelling."""
    return (
        batch.remote_id is not None
        and batch.status not in TERMINAL_STATUSES
        and batch.status != "cancelling"
    )
