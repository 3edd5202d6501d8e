"""Bind a remote batch to its recorded intent: find it by key (adoption), record its id.

A state that was lost or is stale (deleted, restored from an old backup, a runner that never
saw the first run) holds no trace of a batch that was made and paid for. So before the first
create of every intent (a ``pending`` row: no create was ever recorded for it),
``look_up_before_create`` asks the provider for a batch carrying the intent's key, created
within the completion window plus ``ADOPTION_CLOCK_SLACK``, and the submit step adopts it
instead of creating another. One scan of a provider's list serves every lookup of a pass
(``BatchListing``: a page is read once, however many intents look). The scan stops at the
first batch older than that (a bounded cost: the pages back to the window) and is recorded
as a ``lookup`` event. A completed batch adopted this way is collected again: the provider
still holds its output.

A run that dies between the create call and recording the remote id leaves a ``creating``
row. ``find_remote`` pages the provider's batches (newest first, back to the intent's time
less ``ADOPTION_CLOCK_SLACK``) for the one whose metadata carries the intent's key, so the next
run (or a cancel) adopts that batch, which is paid for, instead of creating another.

A create whose answer was lost (a timeout, a reset, a run killed mid-create) may still be in
transit: a gateway can hold it past our timeout and deliver it later. So not finding it is
no proof that it was never made. Such a key counts as *possibly created* until
``confirm_deadline`` (the last ``create-intent`` of the batch plus the provider's
``createConfirmSeconds``, longer than its timeout); until then it is only looked up, never
created again (``look_up_until`` backs off between lookups through ``RunContext.sleep``).
"""

from __future__ import annotations

from batchspec.core.batches import (
    batch_fields,
    batch_key,
    ended_without_its_answers,
    metadata_for_key,
    still_finalizing,
)
from batchspec.core.reconcile.context import RunContext, now
from batchspec.core.reporting import Progress
from batchspec.errors import ProviderError
from batchspec.providers.base import (
    BatchListing,
    KeyLookup,
    Provider,
    RemoteBatch,
    find_batch_by_key,
)
from batchspec.state.store import BatchRow, parse_timestamp
from batchspec.workspace.manifest import Resource, spec_hash

# How far back (seconds) the adoption scan looks past the intent's own time: clocks differ.
ADOPTION_CLOCK_SLACK = 3600
# Pauses (seconds) between lookups of a create whose answer was lost: doubling up to the max.
CONFIRM_FIRST_DELAY = 0.5
CONFIRM_MAX_DELAY = 10.0
# Batches per list page asked for by the lookups (the providers cap it at their own maximum).
LOOKUP_PAGE_SIZE = 100


def listed_whole(remote: RemoteBatch) -> bool:
    """Whether a batch read from a listing says all a step needs: it is still running, or it
    ended with a file to fetch. One that ended without any file id (a gateway's trimmed list
    objects, or a batch that ended with nothing done) must be read back by id: taken as
    listed, the answers it holds would never be collected and its requests would be paid
    for again."""
    if ended_without_its_answers(remote):  # its output file left out, its error file not
        return False
    return not remote.is_terminal or bool(remote.output_file_id or remote.error_file_id)


def read_back_if_trimmed(provider: Provider, remote: RemoteBatch | None) -> RemoteBatch | None:
    """``remote`` as found on a listing, or as retrieved by id when the listing may have left
    out its files (``listed_whole``)."""
    if remote is None or listed_whole(remote):
        return remote
    return provider.get_batch(remote.id)


def find_remote(ctx: RunContext, provider: Provider, batch: BatchRow) -> RemoteBatch | None:
    """Page the provider's batches (newest first) for the one carrying this intent's key."""
    since = parse_timestamp(batch.created_at).timestamp() - ADOPTION_CLOCK_SLACK
    found = find_batch_by_key(
        provider, metadata_for_key(batch.key), since=since, page_size=LOOKUP_PAGE_SIZE
    ).batch
    return read_back_if_trimmed(provider, found)


def look_up_before_create(
    ctx: RunContext, res: Resource, provider: Provider, batch: BatchRow
) -> RemoteBatch | None:
    """The batch an earlier run (whose state is lost) made for this intent's key, if any.

    Looks back over the completion window (the provider's own where it is longer:
    ``OWN_WINDOWS``) plus ``ADOPTION_CLOCK_SLACK``: a batch of this key
    created earlier has expired by now (it is not adopted; the intent is sent anew). Records
    the lookup, and what it cost, as a ``lookup`` event.
    """
    since = lookup_since(ctx, res)
    try:
        listing = pass_listing(ctx, provider)
        found = listing.find_by_key(metadata_for_key(batch.key), since=since)
        former = former_key(res, batch.key)
        if found.batch is None and former is not None:
            moved = listing.find_by_key(metadata_for_key(former), since=since)
            # not one this state binds already (a resource declared again under the old
            # name, its spec the same, made it): two rows would share one batch
            taken = moved.batch and ctx.store.batch_by_remote_id(provider.name, moved.batch.id)
            found = found if taken else moved
    except ProviderError as err:
        # the provider's refusal alone reads as if apply asked for something it need not
        refused = err.status in (401, 403)  # not a server down, a wrong URL: the key's rights
        if refused and _WHY_A_CREATE_LISTS not in err.details:  # a failure is raised again
            err.details.append(_WHY_A_CREATE_LISTS)
        raise
    _record_lookup(ctx, res, batch, found, since)
    return read_back_if_trimmed(provider, found.batch)


def former_key(res: Resource, key: str) -> str | None:
    """``key`` as the resource made it under the name it moved from (``moved: {from: OLD}``):
    that name, and its spec hash then (the spec with the old name). A rename hands the
    recorded state over and sends nothing, so the batches it keeps carry the old name's
    keys; a lost state knows the new name alone, and without this it sent them all again.

    None for a replacement's key (``apply --replace``: its spec hash is not the manifest
    spec's): the old name made batches of the manifest's spec, whose answers a replacement
    is asked to give anew (with ``--no-reuse``, every one)."""
    old = res.moved_from
    resource, spec, shard, attempt = key.split("/")
    if old is None or resource != res.name or spec != res.spec_hash:
        return None
    semantic = res.semantic_spec()
    if spec != spec_hash(semantic):  # a replacement's
        return None
    return batch_key(old, spec_hash({**semantic, "name": old}), int(shard), attempt)


_WHY_A_CREATE_LISTS = (
    "before its first create, each batch's key is looked up in the "
    "provider's batch listing, so that a batch an earlier run made (its state lost) is "
    "adopted, not paid for twice; a key that may not list batches cannot create them "
    "(docs/concepts.md, 'Never pay twice')"
)


#: provider types that run a batch for a window of their own whatever ``completionWindow``
#: says (Gemini up to 48 h, then EXPIRED; Anthropic 24 h): a key lookup looks back over the
#: longer of the two, or a batch still running past the manifest's window was skipped as
#: too old, and created, and paid for, again
#: Azure expires no batch at 24 h (one may run on for days): 7 days back, not forever, so a
#: lookup on a busy resource pages a bounded listing
OWN_WINDOWS = {"gemini": "48h", "anthropic": "24h", "azure": "7d"}


def lookup_since(ctx: RunContext, res: Resource) -> float:
    """How far back (epoch seconds) ``look_up_before_create`` looks for ``res``'s keys."""
    config = ctx.project.providers.get(res.provider)
    own = OWN_WINDOWS.get(config.type) if config is not None else None
    window = max(window_seconds(res.completion_window), window_seconds(own) if own else 0)
    return ctx.clock() - window - ADOPTION_CLOCK_SLACK


def pass_listing(ctx: RunContext, provider: Provider) -> BatchListing:
    """The pass's one scan of ``provider``'s batches, shared by its intents' lookups."""
    failed = ctx.prefetched.listing_failures.get(provider.name)
    if failed is not None:
        raise failed
    listings = ctx.prefetched.listings
    if provider.name not in listings:
        listings[provider.name] = BatchListing(provider, page_size=LOOKUP_PAGE_SIZE)
    return listings[provider.name]


def read_listing_ahead(ctx: RunContext, provider: Provider, since: float) -> None:
    """Read now, holding no transaction, the pages of ``provider``'s listing that lookups
    back to ``since`` will read, so that they are answered from memory: a lookup made
    inside a transaction (the parallel submit pass records intents and looks their keys
    up in one) would otherwise page the provider, through its retries and ``Retry-After``
    waits, while holding the state's writer lock, and another runner of the same state
    waits on it (and fails after its busy timeout). A failure here (after the client's
    retries) is kept for the lookups, which raise it in order without asking again."""
    try:
        pass_listing(ctx, provider).read_back_to(since)
    except ProviderError as err:
        ctx.prefetched.listing_failures[provider.name] = err


def _record_lookup(
    ctx: RunContext, res: Resource, batch: BatchRow, found: KeyLookup, since: float
) -> None:
    ctx.store.record_event(
        ctx.run_id,
        "lookup",
        resource=res.name,
        generation_id=batch.generation_id,
        batch_id=batch.id,
        detail={
            "key": batch.key,
            "remote_id": found.batch.id if found.batch is not None else None,
            "listed": found.listed,
            "stopped_at_window": found.stopped_at_window,
            "since": int(since),
        },
    )


def window_seconds(window: str) -> int:
    """Seconds of a completion window (``"24h"``, ``"7d"``; the schema allows no other form)."""
    digits, unit = window[:-1], window[-1:]
    if not digits.isdigit() or unit not in ("h", "d"):
        return 86400
    return int(digits) * (86400 if unit == "d" else 3600)


def confirm_deadline(ctx: RunContext, provider: str, batch: BatchRow) -> float:
    """Epoch seconds until which the batch's last create counts as possibly made."""
    sent = ctx.store.last_batch_event(batch.id, "create-intent")
    stamp = sent.at if sent is not None else batch.updated_at
    return parse_timestamp(stamp).timestamp() + ctx.create_confirm_window(provider)


def look_up_until(
    ctx: RunContext, provider: Provider, batch: BatchRow, *, until: float
) -> RemoteBatch | None:
    """Look the batch's key up, backing off, until it is found or ``until`` has passed.

    The last lookup happens at or after ``until``. Between lookups the run's lock is
    re-checked (which refreshes its heartbeat), so a run that lost its lock stops here.
    """
    delay = CONFIRM_FIRST_DELAY
    while True:
        remote = find_remote(ctx, provider, batch)
        left = until - ctx.clock()
        if remote is not None or left <= 0:
            return remote
        ctx.still_holds_lock()
        ctx.sleep(min(delay, left))
        delay = min(delay * 2, CONFIRM_MAX_DELAY)


def bind_adopted(ctx: RunContext, name: str, batch: BatchRow, remote: RemoteBatch) -> BatchRow:
    with ctx.store.atomic():
        bound = ctx.store.update_batch(
            batch.id, remote_id=remote.id, submitted_at=now(), **batch_fields(remote)
        )
        ctx.store.record_event(
            ctx.run_id,
            "adopt",
            resource=name,
            generation_id=batch.generation_id,
            batch_id=batch.id,
            detail={"remote_id": remote.id, "status": remote.status},
        )
    return bound


def record_remote(
    ctx: RunContext, res: Resource, batch: BatchRow, remote: RemoteBatch, *, event: str
) -> None:
    if ended_without_its_answers(remote):  # as a poll's (``poll.poll_batch``): its id kept
        remote = still_finalizing(remote)
    with ctx.store.atomic():
        ctx.store.update_batch(
            batch.id, remote_id=remote.id, submitted_at=now(), **batch_fields(remote)
        )
        ctx.store.record_event(
            ctx.run_id,
            event,
            resource=res.name,
            generation_id=batch.generation_id,
            batch_id=batch.id,
            detail={
                "remote_id": remote.id,
                "status": remote.status,
                "shard": batch.shard,
                "attempt": batch.attempt,
                # a create that got no clear answer (a 5xx, a timeout) and was then found
                **({"found_after": remote.found_after} if remote.found_after else {}),
            },
        )
    verb = "adopted" if event == "adopt" else "created"
    ctx.report(
        Progress(
            event,
            res.name,
            f"{verb} batch {remote.id} (shard {batch.shard + 1}, attempt {batch.attempt}, "
            f"{batch.requests:,} request{'' if batch.requests == 1 else 's'})",
            {
                "remote_id": remote.id,
                "shard": batch.shard + 1,
                "attempt": batch.attempt,
                "requests": batch.requests,
            },
        )
    )
