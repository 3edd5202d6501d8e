"""Hold a new generation's create while a retired generation's batch is still stopping.

A cancelled batch keeps finishing (and billing) requests until the provider stops it
(OpenAI: ``cancelling`` for up to about 10 minutes); its answers reach the ledger only when it
ends and is drained (``drain``). A new generation recorded before that would send again every
request the old batch still finishes: paid twice. So a create that records a new generation
(``submit.create``, ``pipeline``; a replace too, after its cancels) is *held*:

* **When.** The new generation would reuse answers (every create but a ``--replace
  --no-reuse`` replacement) and records its ledger now (no batches and no ledger yet), and a
  retired generation of the same resource (not active, not the new one) has a batch sent and
  not ended, or ended with its answers not collected yet, or a create not confirmed (recorded
  ``creating`` with no remote id, which may have landed: the drain looks it up every pass,
  adopts and cancels it if found, and settles it as never made once its confirm window has
  passed), whose unresolved requests overlap
  the new generation's (same ``custom_id`` and request hash, per the ledger; a generation
  whose ledger is not written yet overlaps with all its batches' requests) and have no
  answer recorded in another generation (that one is kept, so there is nothing to wait
  for). A generation a model answers waits for none of the built-in stand-in's, and counts
  none of its answers as kept (``replacements.keeps_answers_of``). A generation still
  within its bound holds even when an older one's has run out.
* **Polled again first.** The pass's drain polled the old batches before the step sent its
  cancels (a replace) or did its other work: before it holds, the create step polls them once
  more and drains what ended (``drain.drain_again``), so a batch that stopped moments after
  its cancel is reused by this very pass. One poll, no sleep: a plain ``apply`` never waits.
* **What.** Nothing is recorded and nothing is paid: the step reports ``waiting`` ("waiting for
  generation N to stop (its answers are reused)") and the resource stays waiting, so
  ``apply --wait`` keeps polling (the drain polls the old batch every pass) and the pass after
  it ended and was drained creates the new generation reusing what it finished.
* **Level-triggered.** Nothing about the hold is stored: every pass (and ``plan``) derives it
  from the state, so an ``apply`` that exits while held resumes in the next one.
* **A retry too.** A generation that was retired and is current again (a spec put back: a
  checkout on an older commit, applying with ``--allow-replace``) is not recorded anew: its
  unresolved requests are retried. That retry is held the same way (``find_retry_hold``) by
  the generation it just cancelled, for the requests both have unresolved: sent at once,
  whatever the cancelled batch finished while stopping was paid twice.
* **Bounded.** A provider stuck in ``cancelling`` cannot block forever: the hold ends the
  provider's ``replaceHoldSeconds`` (default 900) after the old generation's cancel was
  recorded; the create then goes ahead with a warning (what the old batch finishes after it
  is sent again).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from batchspec.core.moves import former_names
from batchspec.core.plan import ACTIVE_GENERATION_STATUSES
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reconcile.drain import batch_still_stopping, drain_again
from batchspec.core.recorded import History, resource_history
from batchspec.core.replacements import answer_sources, keeps_answers_of, reuses_answers
from batchspec.core.reporting import Progress
from batchspec.state.records import parse_timestamp
from batchspec.state.store import BatchRow, GenerationRow, StateStore
from batchspec.wire.batch_status import TERMINAL_STATUSES
from batchspec.wire.inputs import InputReport
from batchspec.wire.request_index import RequestFact
from batchspec.workspace.manifest import Resource
from batchspec.workspace.project import ProviderConfig

#: seconds a create waits for a retired batch still stopping, unless the provider says
DEFAULT_REPLACE_HOLD_SECONDS = 900.0


@dataclass(frozen=True)
class Hold:
    """A retired generation still stopping whose answers the new generation would reuse."""

    generation_id: int  # the retired generation
    remote_ids: tuple[str, ...]  # its batches not ended
    overlap: int  # requests of the new generation it may still answer
    until: float  # epoch seconds: the hold ends then
    expired: bool
    unconfirmed: int = 0  # its creates not confirmed (no remote id): they may have landed
    retry: bool = False  # it holds a retry of a generation put back, not a create

    @property
    def batches(self) -> str:
        """Its batches as the messages name them."""
        named = [f"batch {remote_id}" for remote_id in self.remote_ids]
        return ", ".join(named + ["a create not confirmed"] * self.unconfirmed)

    def waiting_message(self, now: float) -> str:
        held = (
            "retried request(s); nothing is retried"
            if self.retry
            else ("new generation's request(s); nothing is created")
        )
        return (
            f"waiting for generation {self.generation_id} to stop (its answers are reused): "
            f"{self.batches} may still answer up to {self.overlap:,} of the {held} until it "
            f"has, or for {max(self.until - now, 0):.0f}s more (replaceHoldSeconds)"
        )

    def expired_message(self) -> str:
        return (
            f"generation {self.generation_id} is still stopping past replaceHoldSeconds: "
            f"{'retrying' if self.retry else 'creating'} anyway; what {self.batches} "
            "finishes from now is sent again"
        )


def hold_seconds(providers: Mapping[str, ProviderConfig], provider: str) -> float:
    """The provider's ``replaceHoldSeconds`` (``DEFAULT_REPLACE_HOLD_SECONDS`` when unset)."""
    config = providers.get(provider)
    value = (config.options or {}).get("replaceHoldSeconds") if config is not None else None
    return DEFAULT_REPLACE_HOLD_SECONDS if value is None else float(value)


def find_hold(
    store: StateStore,
    res: Resource,
    history: History,
    *,
    requests: Callable[[], Iterable[RequestFact]] | None,
    hold_for: float,
    now: float,
    reuse: bool = True,
    cancelling: bool = False,
    contentless: Collection[int] = (),
) -> Hold | None:
    """The hold on a create of ``res``'s generation (``res.spec_hash``), if any (see the
    module docstring); ``history``: ``res``'s generations and batches as the caller read
    them (``recorded.load_history``, ``resource_history``); ``requests``: the new
    generation's requests (None: not read, as ``status`` does not; every unresolved request
    of the old batches counts); ``reuse``: whether a generation not recorded yet reuses
    answers; ``cancelling``: the step cancels the active generations of other specs first
    (``plan`` of a replace: they count as stopping from ``now``); ``contentless``:
    generations whose ledger cannot be written (the drain found their input content
    nowhere): their answers could never be reused. Reads the state only (the ledger, and a
    stopping generation's cancel event)."""
    current = [(g, b) for g, b in history if g.spec_hash == res.spec_hash]
    gen, gen_batches = current[0] if current else (None, ())
    ledger = store.ledger()
    if gen is None and not reuse:
        return None
    if gen is not None and (not reuses_answers(gen) or gen_batches or ledger.has_requests(gen.id)):
        return None  # reuses nothing, or already recorded: too late or needless to wait
    return _hold_of_stopping(
        store,
        res,
        history,
        skip=None if gen is None else gen.id,
        wanted=None if requests is None else _fingerprints_of(requests),
        hold_for=hold_for,
        now=now,
        cancelling=cancelling,
        contentless=contentless,
    )


def find_retry_hold(
    store: StateStore,
    res: Resource,
    history: History,
    *,
    hold_for: float,
    now: float,
    contentless: Collection[int] = (),
) -> Hold | None:
    """The hold on a retry of ``res``'s generation (``res.spec_hash``) that exists already:
    one that was retired and is current again (a checkout on another commit, a spec put
    back) retries its unresolved requests while the generation it replaced may still be
    stopping, finishing some of those very requests. Held as a new generation's create is
    (``find_hold``), for the overlap of the retired batches' unresolved requests with the
    retried generation's own."""
    current = [(g, b) for g, b in history if g.spec_hash == res.spec_hash]
    if not current:
        return None
    gen, gen_batches = current[0]
    if not reuses_answers(gen):  # `--replace --no-reuse`: it sends everything again anyway
        return None
    ledger = store.ledger()
    hold = _hold_of_stopping(
        store,
        res,
        history,
        skip=gen.id,
        wanted=lambda: ledger.unresolved_fingerprints(gen.id, {b.shard for b in gen_batches}),
        hold_for=hold_for,
        now=now,
        cancelling=False,
        contentless=contentless,
    )
    return None if hold is None else replace(hold, retry=True)


def _hold_of_stopping(
    store: StateStore,
    res: Resource,
    history: History,
    *,
    skip: int | None,
    wanted: Callable[[], set[tuple[str, str]]] | None,
    hold_for: float,
    now: float,
    cancelling: bool,
    contentless: Collection[int],
) -> Hold | None:
    """The first hold of a retired generation of another spec whose batches are still
    stopping and may answer requests of ``wanted`` (None: any; read only when one is: the
    requests of a large input are many, a generation still stopping is rare)."""
    ledger = store.ledger()
    stopping: list[tuple[GenerationRow, list[BatchRow]]] = []
    for old, rows in history:
        if old.id == skip:
            continue
        if old.spec_hash == res.spec_hash:
            continue
        if old.status in ACTIVE_GENERATION_STATUSES and not cancelling:
            continue
        if old.id in contentless:
            continue
        if not keeps_answers_of(res.stand_in, old):  # the stand-in's: a model keeps none
            continue
        batches = [b for b in rows if batch_still_stopping(b)]
        if batches:
            stopping.append((old, batches))
    if not stopping:
        return None
    wanting = None if wanted is None else wanted()
    if wanting is not None and not wanting:
        return None  # nothing to send: nothing to wait for
    # a request some generation already answered is kept, never sent: nothing to wait for
    answered = ledger.succeeded_fingerprints(
        answer_sources((g for g, _ in history), stand_in=res.stand_in, exclude=[skip])
    )
    holds: list[Hold] = []
    for old, batches in stopping:
        if ledger.has_requests(old.id):
            unresolved = ledger.unresolved_fingerprints(old.id, {b.shard for b in batches})
            unresolved -= answered
            overlap = len(unresolved if wanting is None else unresolved & wanting)
        else:  # no ledger (killed before it): any request a running batch has may be its;
            # an ended one's answers could not be joined to requests (the drain, which runs
            # first, writes the ledger when it can), so waiting for it would buy nothing
            overlap = sum(b.requests for b in batches if b.status not in TERMINAL_STATUSES)
        if not overlap:
            continue
        active = old.status in ACTIVE_GENERATION_STATUSES  # cancelled by this very step
        until = (now if active else _cancelled_at(store, res.name, old, res.moved_from)) + hold_for
        remote_ids = tuple(b.remote_id for b in batches if b.remote_id is not None)
        unconfirmed = len(batches) - len(remote_ids)
        holds.append(Hold(old.id, remote_ids, overlap, until, now >= until, unconfirmed))
    # a generation still within its bound holds, even when an older one's bound has run out
    live = [hold for hold in holds if not hold.expired]
    found = live or holds
    return found[0] if found else None


def _fingerprints_of(
    requests: Callable[[], Iterable[RequestFact]],
) -> Callable[[], set[tuple[str, str]]]:
    return lambda: {(f.custom_id, f.request_sha) for f in requests()}


def _cancelled_at(
    store: StateStore, name: str, gen: GenerationRow, moved_from: str | None = None
) -> float:
    """When ``gen``'s latest cancel was recorded (epoch seconds), else when it was created.

    The latest: a generation put back and retired again (two checkouts taking turns) is
    stopping since its last retirement, not its first; measured from the first, every turn
    after the first outlived the bound at once and was sent beside the batch still stopping.
    A cancel of one batch (a create found after the retirement) is not a retirement, unless
    none was recorded (a run that failed after sending its cancels ahead records only those).

    A resource renamed (``metadata.moved``) recorded its earlier cancels under its former
    names, and under the one it moves from (``moved_from``) while that move is still to
    apply: read there too, else the bound ran from the generation's creation, long over, and
    the new create went ahead beside the batch still stopping, paying again for what it
    finishes."""
    names = dict.fromkeys((name, *former_names(store, name), moved_from))
    cancels = sorted(
        (e for n in names if n for e in store.generation_events(gen.id, "cancel", resource=n)),
        key=lambda e: e.id,
    )
    retired = [e for e in cancels if e.batch_id is None] or cancels
    return parse_timestamp(retired[-1].at if retired else gen.created_at).timestamp()


def hold_on_create(ctx: RunContext, res: Resource, facts: InputReport) -> Hold | None:
    """``find_hold`` for a create this pass is about to record (``res``'s provider options)."""
    return find_hold(
        ctx.store,
        res,
        resource_history(ctx.store, res.name),
        requests=lambda: ctx.request_facts(res, facts.sha256),
        hold_for=hold_seconds(ctx.project.providers, res.provider),
        now=ctx.clock(),
        contentless=ctx.contentless,
    )


def hold_on_retry(ctx: RunContext, res: Resource) -> Hold | None:
    """``find_retry_hold`` for a retry this pass is about to record."""
    return find_retry_hold(
        ctx.store,
        res,
        resource_history(ctx.store, res.name),
        hold_for=hold_seconds(ctx.project.providers, res.provider),
        now=ctx.clock(),
        contentless=ctx.contentless,
    )


def held(ctx: RunContext, res: Resource, facts: InputReport, *, report: bool = True) -> bool:
    """Whether the create of ``res``'s new generation waits now (reported ``waiting``); one
    whose hold has run out goes ahead with a warning. Before it waits, the step (``report``;
    not the pass's look-ahead, ``pipeline``) polls the retired batches once more and drains
    what ended (``drain.drain_again``): one re-poll, no sleep; ``apply --wait`` polls on."""
    return _waits(ctx, res, lambda: hold_on_create(ctx, res, facts), report=report)


def retry_held(ctx: RunContext, res: Resource, *, report: bool = True) -> bool:
    """``held`` for a retry of ``res``'s existing generation (``find_retry_hold``)."""
    return _waits(ctx, res, lambda: hold_on_retry(ctx, res), report=report)


def _waits(
    ctx: RunContext, res: Resource, find: Callable[[], Hold | None], *, report: bool
) -> bool:
    hold = find()
    if hold is not None and not hold.expired and report:
        drain_again(ctx, res)
        hold = find()
    if hold is None:
        return False
    detail = {
        "generation_id": hold.generation_id,
        "remote_ids": list(hold.remote_ids),
        "unconfirmed": hold.unconfirmed,
    }
    if hold.expired:
        ctx.report(Progress("warning", res.name, hold.expired_message(), detail))
        return False
    if report:
        ctx.report(Progress("waiting", res.name, hold.waiting_message(ctx.clock()), detail))
    return True
