"""Ask the provider where each in-flight batch stands and record it.

Polling never spends: it reads a batch and stores its status and counts in one transaction,
with a ``poll`` event only when the status moved. Capacity (``maxInFlightBatches``) frees only
through here, so the submit step polls when it finds the provider full.
"""

from __future__ import annotations

from batchspec.core.batches import (
    batch_fields,
    carries_another_key,
    counts_json,
    ended_without_its_answers,
    requests_done,
    still_finalizing,
)
from batchspec.core.plan import Action
from batchspec.core.reconcile.context import RunContext, now
from batchspec.core.reporting import Progress
from batchspec.errors import ProviderError
from batchspec.providers.base import Provider, RemoteBatch, RemoteNotFound
from batchspec.state.store import BatchRow, GenerationRow
from batchspec.wire.batch_status import TERMINAL_STATUSES
from batchspec.wire.inputs import InputReport
from batchspec.workspace.manifest import Resource


def refresh(
    ctx: RunContext, res: Resource, facts: InputReport | None = None, action: Action | None = None
) -> bool:
    gen = ctx.generation(res)
    ctx.ensure_ledger(res, gen)
    provider = ctx.provider_for(res.provider)
    for batch in ctx.store.batches(gen.id):
        if batch.remote_id is None or batch.status in TERMINAL_STATUSES:
            continue
        try:
            remote = poll_batch(ctx, res.name, batch, provider)
        except RemoteNotFound as err:
            err.details.append(
                f"if {batch.provider} no longer has batch {batch.remote_id} (deleted, or a "
                "server started again on an empty data folder), `batchspec apply --replace "
                f"{res.name}` runs {res.name} again: the batch is recorded gone, the answers "
                "already collected are kept, and the rest are sent again (and paid for)"
            )
            raise
        ctx.report(
            Progress(
                "poll",
                res.name,
                poll_message(remote),
                {
                    "remote_id": remote.id,
                    "status": remote.status,
                    **counts_json(remote),
                    "shard": batch.shard + 1,
                    "attempt": batch.attempt,
                },
            )
        )
    return True


def poll_batch(
    ctx: RunContext, name: str, batch: BatchRow, provider: Provider, *, foreign: bool = False
) -> RemoteBatch:
    """Ask the provider where a batch stands and record it (an event when it moved).

    ``foreign``: the batch is of a resource this run did not lock; what was seen is recorded
    only if no other run holds that resource (its holder records it itself)."""
    assert batch.remote_id is not None
    remote = ctx.prefetched.take_poll(batch.provider, batch.remote_id)
    if remote is None:
        ctx.before_wait()
        remote = provider.get_batch(batch.remote_id)
    if remote.id != batch.remote_id and carries_another_key(remote, batch.key):
        raise ProviderError(
            f"{batch.provider} answered the poll of batch {batch.remote_id} ({name}) with "
            f"another batch, {remote.id}, which carries another batch's key: nothing of it was "
            "recorded (its files hold another batch's answers); the next apply asks again"
        )
    said = None  # what the provider said, when it is not what is recorded
    if ended_without_its_answers(remote):
        if remote.id not in ctx.finalizing_said:
            ctx.finalizing_said.add(remote.id)
            ctx.report(Progress("warning", name, _no_output_text(batch.provider, remote, name)))
        said = f"{remote.status}, naming no output file"
        remote = still_finalizing(remote)
    note_progress(ctx, remote)
    with ctx.store.atomic():
        if foreign and not ctx.may_touch(name):
            return remote
        ctx.store.update_batch(batch.id, **batch_fields(remote))
        if remote.status != batch.status:
            ctx.store.record_event(
                ctx.run_id,
                "poll",
                resource=name,
                generation_id=batch.generation_id,
                batch_id=batch.id,
                detail={
                    "status": remote.status,
                    "from": batch.status,
                    **counts_json(remote),
                    **({"provider_said": said} if said else {}),
                },
            )
    return remote


def _no_output_text(provider: str, remote: RemoteBatch, name: str) -> str:
    counts = remote.request_counts
    named = "its input file as its output file" if remote.output_file_id else "no output file"
    done = (
        f"{counts.completed:,} request(s) completed, but names {named}"
        if counts is not None
        else "no request counts, but names neither an output nor an error file"
    )
    return (
        f"{provider} says batch {remote.id} ({name}) is {remote.status} with {done}: "
        "taken as still writing it (kept "
        "finalizing and polled again), so none of its answers is taken as missing and paid "
        f"for again (if the provider keeps answering so, `batchspec apply --replace {name}` "
        "sends the requests again, paying for them again)"
    )


def note_progress(ctx: RunContext, remote: RemoteBatch) -> None:
    """Keep how far a batch in flight got (and since when: a count seen again keeps the time
    it was first seen), and lower ``ctx.done_in`` to when it should end at the pace its
    counts moved (``remaining_seconds``)."""
    counts = remote.request_counts
    if remote.is_terminal or counts is None or not counts.total:
        return
    # more than the total (a request counted twice, then not) is all done as well: a count
    # flapping above it must keep the time all were first seen done, or the pause stays 0.1 s
    now, done = ctx.monotonic(), min(counts.completed + counts.failed, counts.total)
    seen = ctx.progress.get(remote.id)
    if seen is None or seen[1] != done:
        ctx.progress[remote.id] = (now, done)
    if seen is None:
        return
    eta = remaining_seconds(seen, (now, done), counts.total)
    if eta is not None and (ctx.done_in is None or eta < ctx.done_in):
        ctx.done_in = eta


def remaining_seconds(
    before: tuple[float, int], after: tuple[float, int], total: int
) -> float | None:
    """Seconds until ``total`` requests are done, at the pace of ``before`` -> ``after``
    (``(time, requests done)``, ``before`` when that count was first seen); 0 when all
    became done since ``before`` (the batch ends about now); for a batch all done since
    ``before`` and still finalizing, as long again as it has finalized so far (polled at
    0.1, 0.2, 0.4 s ... up to the interval: a local engine or ``serve`` finalizes in a
    fraction of a second, OpenAI can take minutes, at a few polls more); None when the count
    did not move."""
    (t0, done0), (t1, done1) = before, after
    if done1 >= total:
        return 0.0 if done0 < total else max(t1 - t0, 0.0)
    if done1 <= done0 or t1 <= t0:
        return None
    return (total - done1) * (t1 - t0) / (done1 - done0)


def poll_message(remote: RemoteBatch) -> str:
    """A poll's line: the batch, its status, requests done of its total and how many of
    them failed (as `status` writes it: `completed 3/3` alone reads as success)."""
    c = remote.request_counts
    counts = ""
    if c and c.total:
        counts = f" {requests_done(c.completed, c.failed, c.total):,}/{c.total:,}"
    if c and c.total and c.failed:
        counts += f" ({c.failed:,} failed)"
    return f"batch {remote.id} {remote.status}{counts}"


#: the terminal status of a batch the provider no longer knows: nothing more will come of it
GONE_STATUS = "cancelled"


def record_gone(
    ctx: RunContext,
    name: str,
    gen: GenerationRow,
    batch: BatchRow,
    err: RemoteNotFound,
    *,
    foreign: bool = False,
) -> None:
    """A batch the provider answers 404 for (deleted, expired from its records, a server
    started again on an empty folder, a provider pointed elsewhere) while it is drained or
    cancelled: record it ended, ``cancelled``, with nothing left to collect (``collected_at``
    set), and a ``poll`` event whose ``gone`` says why, in one transaction, so no later pass
    polls or cancels it again; what its generation's ledger already holds (an earlier collect,
    answers carried over) is left as it is. ``foreign``: as for ``poll_batch``."""
    why = f"the provider no longer knows this batch ({err.message})"
    with ctx.store.atomic():
        if foreign and not ctx.may_touch(name):
            return
        ctx.store.update_batch(batch.id, status=GONE_STATUS, collected_at=now())
        ctx.store.record_event(
            ctx.run_id,
            "poll",
            resource=name,
            generation_id=gen.id,
            batch_id=batch.id,
            detail={
                "status": GONE_STATUS,
                "from": batch.status,
                "gone": why,
                "retired": gen.status,
            },
        )
    ctx.report(
        Progress(
            "warning",
            name,
            f"batch {batch.remote_id} of {gen.status} generation {gen.id} is gone from the "
            f"provider ({err.message}): recorded {GONE_STATUS}, not polled again; the answers "
            "it finished and no earlier apply collected are lost",
            {"remote_id": batch.remote_id, "status": GONE_STATUS, "generation_id": gen.id},
        )
    )
