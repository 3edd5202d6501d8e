"""Cancel the in-flight batches of a resource's active generations (``cancel``, replace, prune).

An intent never submitted is abandoned; an unsure create (``creating``, no remote id) is first
looked up by key and adopted, since it may have landed and be paid for, then cancelled too.
The generation's new status and a ``cancel`` event are recorded in one transaction.

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
sent it, recording nothing for it; a run that fails drops the cancels not yet started.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from batchspec.core.batches import batch_fields
from batchspec.core.reconcile.adopt import bind_adopted, find_remote
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reconcile.prefetch import shares_client
from batchspec.core.reporting import Progress
from batchspec.state.store import BatchRow, GenerationRow
from batchspec.wire.batch_status import TERMINAL_STATUSES

#: generation statuses a cancel acts on (in flight)
ACTIVE = ("pending", "in_progress")


def cancel(ctx: RunContext, name: str, *, reason: str = "cancelled by a user") -> int:
    """Cancel the in-flight batches of a resource's active generations; return how many."""
    generations = [gen for gen in ctx.store.generations(name) if gen.status in ACTIVE]
    cancel_ahead(ctx, [(name, gen) for gen in generations])
    return sum(
        cancel_generation(ctx, name, gen, status="cancelled", reason=reason) for gen in generations
    )


def cancel_ahead(ctx: RunContext, targets: Iterable[tuple[str, GenerationRow]]) -> None:
    """Send the cancels ``cancel_generation`` of each (resource, generation) will send, in
    ``ctx.calls`` (nothing without a pool); each is taken by that step. Recording nothing."""
    calls = ctx.calls
    if calls is None:
        return
    for name, gen in targets:
        provider_name = _provider_name(ctx, name)
        if not shares_client(ctx, provider_name):
            continue
        provider = ctx.provider_for(provider_name)
        for batch in ctx.store.batches(gen.id):
            key = (provider_name, batch.remote_id or "")
            if _sends_cancel(batch) and key not in ctx.prefetched.cancels:
                call = functools.partial(provider.cancel_batch, key[1])
                ctx.prefetched.cancels[key] = calls.submit(provider_name, call)


def cancel_generation(
    ctx: RunContext, name: str, gen: GenerationRow, *, status: str, reason: str
) -> int:
    provider_name = _provider_name(ctx, name)
    provider = ctx.provider_for(provider_name)
    n = 0
    for batch in ctx.store.batches(gen.id):
        if batch.remote_id is None and batch.status == "creating":
            # the create may have landed: find it (it is paid for) and cancel it too
            remote = find_remote(ctx, provider, batch)
            if remote is not None:
                batch = bind_adopted(ctx, name, batch, remote)
        if batch.remote_id is None:
            if batch.status not in TERMINAL_STATUSES:  # an intent never submitted: abandon it
                ctx.store.update_batch(batch.id, status="cancelled")
            continue
        if _sends_cancel(batch):
            remote = ctx.prefetched.take_cancel(provider_name, batch.remote_id, ctx.before_wait)
            if remote is None:  # not sent ahead: send it now
                remote = provider.cancel_batch(batch.remote_id)
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
    # "sent": a batch stops at the provider's pace (cancelling, then cancelled)
    ctx.report(Progress("cancel", name, f"{reason}: cancel sent to {n} batch(es)"))
    return n


def _sends_cancel(batch: BatchRow) -> bool:
    """Whether the step sends a cancel for ``batch``: bound, not ended, not cancelling."""
    return (
        batch.remote_id is not None
        and batch.status not in TERMINAL_STATUSES
        and batch.status != "cancelling"
    )


def _provider_name(ctx: RunContext, name: str) -> str:
    row = ctx.store.get_resource(name)
    return row.provider if row else ""
