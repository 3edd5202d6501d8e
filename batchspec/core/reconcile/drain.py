"""Drain retired batches: poll the batches of generations no longer active to their end, and
keep the answers they finished.

A generation is *retired* when it is no longer active and no longer the one its manifest
asks for: superseded (``apply --replace``, a new spec with ``--allow-replace``), cancelled by
``batchspec cancel`` and since followed by a new spec, or pruned (``apply --prune`` cancelled
it and forgot its resource). Its batches were sent a cancel and are recorded ``cancelling``
(or still in flight: a cancel that found one finalizing). The provider keeps finishing
requests until it stops them (OpenAI: up to about 10 minutes), bills them, and keeps them in
the ended batch's output file. Every apply pass (``Reconciler.advance_all``) drains them
before it submits anything, so a generation recorded in that pass already reuses them.

* **Which.** Of the pass's resources (not suspended), every generation that is not active
  (``pending``/``in_progress`` ones are the plan's) and not the one its manifest asks for (its
  spec hash: the plan's too, a user-cancelled one included, whose results it writes); of the
  resources pruned from the workspace (``Reconciler.retired_resources``), every generation
  that is not active. Their batches still stopping (``plan.still_stopping``: sent and not
  ended, ended and not collected, or a create not confirmed), whose generation has a ledger
  to record answers in. Also the one create not confirmed of a generation a user cancelled
  whose manifest is unchanged (``cancelled_unconfirmed``): still the resource's current
  generation (its status and results are the plan's), yet its create may have landed after
  its cancel's lookup missed it, so the drain looks it up as it does a retired one's (below);
  found, the batch is that generation's own refresh and collect steps' from then on.
* **Shown ahead.** ``plan`` lists the same batches (``planned_drains``: the state only, no
  provider call), each with the step the next apply takes: ``poll`` or ``collect``.
* **The same machinery.** Their polls and downloads are fetched ahead in the pass's bounded
  pool with the others (``prefetch.prefetch_pass``: list calls first), then recorded here on
  the main thread (``poll.poll_batch``, ``collect.collect_batch``): in the pass's resource
  order, the pruned ones after them by name, each by generation and batch; text and NDJSON
  output are as deterministic as the rest of the pass.
* **Kept, never revived.** An ended batch's files go to the blob store first; then its lines
  are recorded in *its own* generation's ledger with a ``collect`` event marked ``retired``,
  in one transaction (``keep_ended_answers`` does the same, by the same steps, right after a
  replace's cancel, for the batches that had ended before it reached them): a later
  generation of the same request lines keeps them (``RequestLedger.carry_over``, by request
  hash) instead of paying again. The retired generation's status, the resource's current
  generation, its result files, counts and health are left as they are.
* **Crash-safe.** A run killed between a download and its record leaves the batch ended and
  not collected: the next pass downloads it again (the same content-addressed blob) and
  records it once; an ``ok`` ledger row is final, and ``collected_at`` is set with the event.
* **Reads only, but for one cancel.** A drain never creates and never makes ``apply --wait``
  wait: retired batches stop at the provider's pace, polled by every pass while it runs. The
  one call it may send besides reads is the cancel of an unconfirmed create it finds
  (``cancel.cancel_retired_batch``, sent before anything of it is recorded). A batch
  recorded ``cancelling`` is never cancelled twice (``cancel._sends_cancel``).
* **Unconfirmed creates.** A create of the generation whose answer was lost (``creating``, no
  remote id) that its cancel's lookup did not find may still land: every pass looks its key up
  again (``adopt.find_remote``), cancels and then adopts it if found (the cancel first: one
  that fails leaves it unrecorded, found and cancelled by the next pass; then drains it as any
  other), and records it never made (``cancelled``, with a ``lookup`` event) once its confirm
  window (``adopt.confirm_deadline``) has passed. Until then a new generation's create is held.
  The same for a user-cancelled current generation's (``batchspec cancel``, manifest
  unchanged): a cancel stops the spending even of a create it could not see yet, and what
  that batch finished is kept (its generation's collect, which writes it), so a later
  ``apply --replace`` reuses it rather than paying again.
* **Gone is an end.** A batch the provider answers 404 for when polled is recorded once as
  ended (``cancelled``, nothing left to collect) with a ``poll`` event whose ``gone`` says
  why, and a warning; no later pass polls it (``record_gone``). Its generation's ledger keeps
  what it holds. A file of an ended one that answers 404, content and metadata both (a file
  still listed is tried again, not written off: its answers would be paid again), is left out
  of its collect, named in the event's ``gone`` (``collect.collect_batch``): the batch settles
  with what is left.
* **Never in the way.** A pruned resource, which the run may not lock, is recorded only if no
  other run holds it (``RunContext.may_touch``); a batch on a provider no longer configured
  is skipped; a poll or download that fails is a warning, tried again by the next pass.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from batchspec.core.batches import counts_json
from batchspec.core.plan import ACTIVE_GENERATION_STATUSES, Drain, still_stopping
from batchspec.core.reconcile.adopt import confirm_deadline, find_remote
from batchspec.core.reconcile.cancel import cancel_retired_batch
from batchspec.core.reconcile.collect import (
    CREDENTIAL_STATUSES,
    DOWNLOAD_RETRY_FIRST,
    DOWNLOAD_RETRY_MAX,
    collect_batch,
    retry_on_for,
)
from batchspec.core.reconcile.context import RunContext, kept_request_index
from batchspec.core.reconcile.poll import GONE_STATUS, poll_batch, record_gone
from batchspec.core.reporting import Progress
from batchspec.errors import BatchspecError, InputError
from batchspec.providers.base import RemoteNotFound
from batchspec.state.store import BatchRow, GenerationRow, StateStore
from batchspec.wire.outcomes import RETRY_CATEGORIES
from batchspec.workspace.manifest import Resource


@dataclass(frozen=True)
class RetiredBatch:
    """A batch of a retired generation whose answers may still come."""

    name: str
    generation: GenerationRow
    batch: BatchRow
    resource: Resource | None  # the manifest's resource; None: pruned from the workspace
    # the resource's current generation, cancelled by a user (``cancelled_unconfirmed``): the
    # drain only looks its unconfirmed create up; once found, that generation's own steps
    # (refresh, collect: ``plan``) poll it and write what it finished, as for its other batches
    current: bool = False

    @property
    def foreign(self) -> bool:
        """A pruned resource: this run may not hold its lock."""
        return self.resource is None


def retired_batches(
    ctx: RunContext, resources: Sequence[Resource], pruned: Sequence[str]
) -> list[RetiredBatch]:
    """The batches to drain this pass, in output order (see the module docstring)."""
    return find_retired(
        ctx.store,
        ctx.project.providers,
        resources,
        pruned,
        has_ledger=lambda item: _has_ledger(ctx, item),
    )


def find_retired(
    store: StateStore,
    providers: Collection[str],
    resources: Sequence[Resource],
    pruned: Sequence[str],
    *,
    has_ledger: Callable[[RetiredBatch], bool],
) -> list[RetiredBatch]:
    """The retired batches of ``resources`` and of the ``pruned`` ones, on ``providers`` (the
    configured ones), whose generation ``has_ledger``, in output order; reads the state only
    (``plan`` shows them: ``planned_drains``)."""
    order = {res.name: i for i, res in enumerate(resources) if not res.suspend}
    by_name = {res.name: res for res in resources}
    outside = {name: len(order) + i for i, name in enumerate(sorted(set(pruned) - set(by_name)))}
    generations: dict[int, GenerationRow] = {}
    found: list[tuple[int, int, int, RetiredBatch]] = []
    active = sorted(ACTIVE_GENERATION_STATUSES)
    for batch in store.uncollected_batches(generation_not_in=active):
        if not batch_still_stopping(batch):
            continue
        if batch.provider not in providers:
            continue  # a provider no longer configured: nothing to ask
        gen = generations.get(batch.generation_id)
        if gen is None:
            gen = generations[batch.generation_id] = store.get_generation(batch.generation_id)
        res = by_name.get(gen.resource)
        current = False
        if gen.resource in order and res is not None:
            # the manifest's own generation only for its unconfirmed create, once cancelled
            current = gen.spec_hash == res.spec_hash
            if current and not cancelled_unconfirmed(gen, batch):
                continue
            position = order[gen.resource]
        elif gen.resource in outside:
            position, res = outside[gen.resource], None
        else:
            continue
        item = RetiredBatch(gen.resource, gen, batch, res, current=current)
        found.append((position, gen.id, batch.id, item))
    found.sort(key=lambda item: item[:3])
    return [item[3] for item in found if has_ledger(item[3])]


def cancelled_unconfirmed(gen: GenerationRow, batch: BatchRow) -> bool:
    """Whether ``batch`` is a create not confirmed (``creating``, no remote id) of ``gen``,
    cancelled (``batchspec cancel``): the drain looks it up even while ``gen`` is still its
    resource's current generation (its manifest unchanged), since it may have landed and be
    running, paid for, after the cancel's own lookup missed it."""
    return gen.status == "cancelled" and batch.remote_id is None and batch.status == "creating"


def batch_still_stopping(batch: BatchRow) -> bool:
    """``plan.still_stopping`` of a recorded batch: what it answers is not in the ledger yet."""
    return still_stopping(batch.remote_id, batch.status, collected=batch.collected_at is not None)


def planned_drains(
    store: StateStore,
    providers: Collection[str],
    resources: Sequence[Resource],
    pruned: Sequence[str],
    input_sha256: Mapping[str, str],
) -> tuple[Drain, ...]:
    """What the first pass of an apply would drain, for ``plan``: no provider call, no
    write. A generation with no ledger yet counts when its resource's input still holds its
    content (``input_sha256``, by resource: apply writes the ledger from it)."""
    ledger = store.ledger()

    def has_ledger(item: RetiredBatch) -> bool:
        gen = item.generation
        if ledger.has_requests(gen.id):
            return True
        if item.resource is None:  # pruned: only the index its intent kept lists its requests
            return kept_request_index(store, gen) is not None
        return input_sha256.get(item.name) == gen.input_sha256

    return tuple(
        Drain(
            resource=item.name,
            generation_id=item.generation.id,
            retired=item.generation.status,
            remote_id=item.batch.remote_id or "",
            status=item.batch.status,
            step=_next_step(item.batch),
            pruned=item.foreign,
        )
        for item in find_retired(store, providers, resources, pruned, has_ledger=has_ledger)
    )


def _named(batch: BatchRow) -> str:
    """A retired batch as messages name it."""
    if batch.remote_id is None:
        return f"a create not confirmed (shard {batch.shard + 1})"
    return f"batch {batch.remote_id}"


def _next_step(batch: BatchRow) -> str:
    """What the next apply does with a retired batch: ``lookup`` (a create not confirmed),
    ``poll`` (not ended when last seen) or ``collect`` (ended, not downloaded)."""
    if batch.remote_id is None:
        return "lookup"
    return "collect" if batch.is_terminal else "poll"


def _has_ledger(ctx: RunContext, retired: RetiredBatch) -> bool:
    """Whether the generation has ledger rows to join answers to (written now from the
    manifest's input if it is still there; for a pruned one, from the request index its
    intent kept, if any: a ledger written after the creates, killed before it). One
    found without either is not looked for again by this run: each look reads the input."""
    gen = retired.generation
    if gen.id in ctx.contentless:  # looked for once this run (a full read of the input)
        return False
    if ctx.ledger.has_requests(gen.id):
        return True
    if retired.resource is None and kept_request_index(ctx.store, gen) is None:
        return False  # pruned: only the index its intent kept can list its requests
    try:
        ctx.ensure_ledger(retired.resource, gen)
    except BatchspecError as err:  # nothing to join its answers to: skipped, not fatal
        ctx.contentless.add(gen.id)
        if not isinstance(err, InputError):  # its input gone is expected; anything else is said
            ctx.report(
                Progress(
                    "warning",
                    retired.name,
                    f"the requests of {gen.status} generation {gen.id} could not be listed "
                    f"({err.message}): its stopping batches are not drained",
                )
            )
        return False
    return True


def drain_retired(ctx: RunContext, retired: Sequence[RetiredBatch]) -> None:
    """Poll each retired batch not yet ended, and collect each one ended (see above).

    One that fails (a poll, a look-up, a download) is said once a run and tried again on
    later passes after a pause that doubles (``DOWNLOAD_RETRY_FIRST`` to
    ``DOWNLOAD_RETRY_MAX``), not on every pass: a file the provider keeps refusing is
    neither a line per pass nor a request per poll."""
    for item in retired:
        tried = ctx.drain_failures.get(item.batch.id)
        if tried is not None and ctx.monotonic() < tried[1]:
            continue
        try:
            _drain_one(ctx, item)
        except BatchspecError as err:
            if getattr(err, "status", None) in CREDENTIAL_STATUSES:
                raise  # the key may not read this provider: stop before spending more
            failures = 1 if tried is None else tried[0] + 1
            pause = min(DOWNLOAD_RETRY_MAX, DOWNLOAD_RETRY_FIRST * 2 ** (failures - 1))
            ctx.drain_failures[item.batch.id] = (failures, ctx.monotonic() + pause)
            if tried is None:
                ctx.report(
                    Progress(
                        "warning",
                        item.name,
                        f"{_named(item.batch)} of {item.generation.status} generation "
                        f"{item.generation.id} could not be polled, looked up or collected "
                        f"({err.message}); a later pass of this run or the next apply tries "
                        "again",
                    )
                )
        else:
            ctx.drain_failures.pop(item.batch.id, None)


def _drain_one(ctx: RunContext, item: RetiredBatch) -> None:
    gen, batch = item.generation, item.batch
    provider = ctx.provider_for(batch.provider)
    if batch.remote_id is None:
        found = _look_up_unconfirmed(ctx, item)
        if found is None or not found.is_terminal or item.current:
            # still unconfirmed, or cancelled just now: polled from the next look on (a current
            # generation's by its own refresh and collect steps, later in this very pass)
            return
        batch = found
    if not batch.is_terminal:
        try:
            remote = poll_batch(ctx, item.name, batch, provider, foreign=item.foreign)
        except RemoteNotFound as err:
            record_gone(ctx, item.name, item.generation, item.batch, err, foreign=item.foreign)
            return
        ctx.report(
            Progress(
                "poll",
                item.name,
                f"batch {remote.id} {remote.status} ({gen.status} generation {gen.id}"
                + ("" if remote.is_terminal else ": what it finishes is kept when it ends")
                + ")",
                {
                    "remote_id": remote.id,
                    "status": remote.status,
                    **counts_json(remote),
                    "generation_id": gen.id,
                    "retired": gen.status,
                },
            )
        )
        batch = ctx.store.get_batch(batch.id)
        if not batch.is_terminal:
            return  # still stopping (or another run holds the pruned resource)
    if batch.collected_at is not None:
        return
    retry_on = RETRY_CATEGORIES if item.resource is None else retry_on_for(item.resource, gen)
    collect_batch(
        ctx, item.name, gen, batch, provider, retry_on=retry_on, foreign=item.foreign, retired=True
    )


def _look_up_unconfirmed(ctx: RunContext, item: RetiredBatch) -> BatchRow | None:
    """A create of the retired generation not confirmed: look its key up again; adopt and
    cancel the batch if found (the row as it is then), or record it never made once its
    confirm window has passed; None while it is neither."""
    gen, batch = item.generation, item.batch
    if item.foreign and not ctx.may_touch(item.name):
        return None
    remote = find_remote(ctx, ctx.provider_for(batch.provider), batch)
    if remote is not None:
        return cancel_retired_batch(ctx, item.name, gen, batch, remote, current=item.current)
    if ctx.clock() < confirm_deadline(ctx, batch.provider, batch):
        return None
    with ctx.store.atomic():
        ctx.store.update_batch(batch.id, status=GONE_STATUS)
        ctx.store.record_event(
            ctx.run_id,
            "lookup",
            resource=item.name,
            generation_id=gen.id,
            batch_id=batch.id,
            detail={"key": batch.key, "remote_id": None, "never_made": True, "retired": gen.status},
        )
    ctx.report(
        Progress(
            "lookup",
            item.name,
            f"a create of {gen.status} generation {gen.id} (shard {batch.shard + 1}) was not "
            "found by its key within its confirm window: recorded never made",
            {"generation_id": gen.id, "shard": batch.shard + 1},
        )
    )
    return None


def keep_ended_answers(ctx: RunContext, res: Resource, gen: GenerationRow) -> None:
    """Drain the batches of ``gen``, just superseded (a replace), that ended at the provider
    before the cancel reached them, so that the generation replacing it keeps their answers
    (``RequestLedger.carry_over``) instead of paying for them again; those still stopping
    are the next drain's. Without the ledger of ``gen``'s content there is nothing to join
    them to (``_has_ledger``)."""
    gen = ctx.store.get_generation(gen.id)  # as its cancel left it: superseded
    ended = [
        RetiredBatch(res.name, gen, batch, res)
        for batch in ctx.store.batches(gen.id)
        if batch.remote_id is not None and batch.is_terminal and batch.collected_at is None
    ]
    drain_retired(ctx, [item for item in ended if _has_ledger(ctx, item)])


def drain_again(ctx: RunContext, res: Resource) -> None:
    """Poll ``res``'s retired batches once more and keep what ended since: the create step
    calls this once before it holds (``hold.held``), after the pass's drain and the step's own
    cancels, so a batch that stopped moments after its cancel holds nothing. A poll fetched
    ahead for the pass is dropped: this one asks the provider now."""
    retired = retired_batches(ctx, [res], [])
    for item in retired:
        ctx.prefetched.polls.pop((item.batch.provider, item.batch.remote_id or ""), None)
    drain_retired(ctx, retired)


def report_still_stopping(ctx: RunContext, retired: Sequence[RetiredBatch]) -> None:
    """Say, once a run is done, which retired batches have not ended yet: only a later
    apply keeps the answers they still finish (a ``retired`` event each, in drain order)."""
    for item in retired:
        batch, gen = item.batch, item.generation
        if batch.is_terminal:
            continue
        ctx.report(
            Progress(
                "retired",
                item.name,
                f"{_named(batch)} of {gen.status} generation {gen.id} is still "
                f"{batch.status}: run `batchspec apply` again later to keep the answers it "
                "finishes",
                {"remote_id": batch.remote_id, "status": batch.status, "generation_id": gen.id},
            )
        )
