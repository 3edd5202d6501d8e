"""Cancel the in-flight batches of a resource's active generations (``cancel``, replace, prune).

An intent never submitted is abandoned; an unsure create (``creating``, no remote id) is first
looked up by key and adopted, since it may have landed and be paid for, then cancelled too.
The generation's new status and a ``cancel`` event are recorded in one transaction.
"""

from __future__ import annotations

from batchspec.core.batches import batch_fields
from batchspec.core.reconcile.adopt import bind_adopted, find_remote
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reporting import Progress
from batchspec.state.store import GenerationRow
from batchspec.wire.batch_status import TERMINAL_STATUSES


def cancel(ctx: RunContext, name: str, *, reason: str = "cancelled by a user") -> int:
    """Cancel the in-flight batches of a resource's active generations; return how many."""
    cancelled = 0
    for gen in ctx.store.generations(name):
        if gen.status in ("pending", "in_progress"):
            cancelled += cancel_generation(ctx, name, gen, status="cancelled", reason=reason)
    return cancelled


def cancel_generation(
    ctx: RunContext, name: str, gen: GenerationRow, *, status: str, reason: str
) -> int:
    row = ctx.store.get_resource(name)
    provider = ctx.provider_for(row.provider if row else "")
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
        if batch.status not in TERMINAL_STATUSES and batch.status != "cancelling":
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
    ctx.report(Progress("cancel", name, f"{reason}: {n} batch(es) cancelled"))
    return n
