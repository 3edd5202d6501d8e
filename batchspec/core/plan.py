"""The planner: a pure function of what the manifests want and what the state has recorded.

``make_plan(desired, recorded, disk)`` does no I/O: the caller loads manifests
(``manifest.load_workspace``), the recorded view (``recorded.load_recorded``) and the hashes
of result files on disk (``recorded.observe_disk``), and this module decides the next safe
step for every resource. That keeps the decision table in one place, cheap to test.

Decision table, first match wins, for a resource in the manifests:

=====================================================  =========  ================================
recorded state                                         action     spends money
=====================================================  =========  ================================
``suspend: true``                                      none       no  (health Suspended)
``--replace NAME`` asked for it                        replace    yes (consent as for a create;
                                                                      cancels what is in flight)
no generation for the spec hash, an older one active   replace    yes (needs --allow-replace)
no generation for the spec hash, the resource added   create     yes (a new generation of the
again after ``apply --prune`` cancelled its                           same spec, keeping answers:
generation (``replacements.readded_after_prune``)                     ``readded_after``)
no generation for the spec hash                        create     yes
generation cancelled by a user                         refresh /  no  (polls it to its end,
                                                       collect,       collects and writes what
                                                       else none      finished; Suspended;
                                                                      ``apply --replace`` reruns;
                                                                      a create not confirmed is
                                                                      looked up by the drain)
a batch intent with no remote id (a crashed run)       create     yes (adopts the remote batch
                                                                      if it exists: never twice)
generation recorded but nothing submitted              create     yes
a terminal batch whose files are not downloaded        collect    no  (also while other shards'
                                                                      batches are in flight: apply
                                                                      polls those in the same pass)
batches in flight                                      refresh    no
unresolved requests and attempts left                  retry      yes (also when Degraded: a
                                                                      raised retry.maxAttempts
                                                                      retries again)
everything resolved, result files not yet written      collect    no
result (or export) files missing or edited on disk     restore    no  (no network)
otherwise                                              none       no
=====================================================  =========  ================================

A create or replace that records a new generation reuses the answers earlier generations got
for the very same request lines (``DesiredResource.reusable``, counted by the caller exactly as
apply carries them over): its ``requests`` are only those it will submit, and ``reused`` says
how many keep a recorded answer. While a retired generation's batch that may still answer
some of those requests is stopping, apply holds that create (``reconcile.hold``): the caller
says so (``held_by``) and the reason tells it, the kind staying create or replace.
Each spending step says how many remote batches it creates (``Action.shards``, one per
shard): a retry one per shard it resends, queued intents one each, a new generation as many as
the caller counted (``DesiredResource.shards``: the split apply makes, over the requests it
submits).

A resource recorded in the state but absent from the *whole* workspace (every manifest the
project's globs find, not only the PATHS given: ``elsewhere`` names the rest) is ``orphaned``;
with ``--prune`` it is ``prune``, which cancels its in-flight batches and forgets it
(``Action.in_flight``: what it would stop; with none, a prune only forgets, and on a paid
provider needs no consent). With a selection, only the orphans it selects
(``orphan_selected``) are shown or pruned.

An orphan last declared by a commit newer than this checkout's (``declared_by``: one this
checkout is behind, or, on another branch or absent from a shallow clone, one made later) stays
``orphaned`` under ``--prune``, its ``declared_by`` naming that commit: a checkout behind must
not undo what a newer one added. The caller finds those commits (``compute_plan``,
``declared_elsewhere``: its table); naming the resource (``--select NAME``) prunes it anyway,
and when the commits are unknown (no git) it is pruned as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from enum import Enum

from batchspec.wire.batch_status import TERMINAL_STATUSES


class ActionKind(str, Enum):
    CREATE = "create"
    REPLACE = "replace"
    REFRESH = "refresh"
    COLLECT = "collect"
    RETRY = "retry"
    RESTORE = "restore"
    NONE = "none"
    ORPHANED = "orphaned"
    PRUNE = "prune"


SPENDING_KINDS = frozenset({ActionKind.CREATE, ActionKind.REPLACE, ActionKind.RETRY})

# Generation statuses that mean "still being worked on" (an older one of these blocks a
# silent switch to a new spec: that is a replace).
ACTIVE_GENERATION_STATUSES = frozenset({"pending", "in_progress"})
FINISHED_GENERATION_STATUSES = frozenset({"complete", "degraded"})


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class DesiredResource:
    """What the planner needs of a manifest's resource (see ``manifest.Resource``)."""

    name: str
    provider: str
    spec_hash: str
    requests: int
    input_bytes: int
    max_attempts: int
    suspend: bool = False
    # requests (and their bytes) whose very same line succeeded in an earlier generation: a
    # new generation keeps those answers instead of submitting them again
    reusable: int = 0
    reusable_bytes: int = 0
    replace: bool = False  # `--replace NAME`: spec_hash is a new replacement's (no generation)
    # a retired generation still stopping whose answers a new generation reuses: its create
    # waits for it to stop (``reconcile.hold``); ``hold_expired``: past replaceHoldSeconds
    held_by: int | None = None
    hold_expired: bool = False
    # the generation of the same spec `apply --prune` cancelled: the manifest is back, so
    # spec_hash is a new replacement's (no generation) and apply creates it, keeping answers
    readded_after: int | None = None
    # the shards (one remote batch each) a new generation would split its requests into,
    # those it keeps an answer for left out (``sharding.count_shards``, by the caller)
    shards: int = 1


@dataclass(frozen=True)
class RecordedBatch:
    id: int
    shard: int
    attempt: int
    remote_id: str | None
    status: str
    collected: bool
    requests: int

    @property
    def in_flight(self) -> bool:
        return self.remote_id is not None and self.status not in TERMINAL_STATUSES

    @property
    def awaiting_collect(self) -> bool:
        return (
            self.remote_id is not None and self.status in TERMINAL_STATUSES and not self.collected
        )


def still_stopping(remote_id: str | None, status: str, *, collected: bool) -> bool:
    """Whether a batch may still answer requests that its generation's ledger does not hold
    yet: sent and not ended, ended with its answers not collected, or a create not confirmed
    (``creating``, no remote id: it may have landed). The one definition of a retired
    generation's batch "still stopping": the hold waits for it, the drain polls, looks up or
    collects it, and ``plan`` and ``cancel`` say so."""
    if remote_id is None:
        return status == "creating"
    return status not in TERMINAL_STATUSES or not collected


@dataclass(frozen=True)
class ShardProgress:
    """Where one shard stands: attempts used, what is unresolved, when it may go again."""

    shard: int
    attempts_used: int  # attempts that count against retry.maxAttempts (requeues do not)
    unresolved: int  # requests neither succeeded nor finally failed
    unresolved_bytes: int = 0
    not_before: float | None = None  # epoch seconds: a requeued shard waits until then


@dataclass(frozen=True)
class RecordedGeneration:
    id: int
    spec_hash: str
    status: str
    requests: int
    succeeded: int = 0
    failed: int = 0
    output_sha256: str | None = None
    errors_sha256: str | None = None
    batches: tuple[RecordedBatch, ...] = ()
    shards: tuple[ShardProgress, ...] = ()
    output_path: str | None = None  # where its results were last written, as recorded


@dataclass(frozen=True)
class RecordedResource:
    name: str
    provider: str
    generations: tuple[RecordedGeneration, ...] = ()
    forgotten: bool = False  # `batchspec forget`: not tracked; apply tracks it again
    labels: Mapping[str, str] = field(default_factory=dict)  # as last seen in its manifest

    def generation_for(self, spec_hash: str) -> RecordedGeneration | None:
        return next((g for g in self.generations if g.spec_hash == spec_hash), None)


@dataclass(frozen=True)
class DiskFacts:
    """sha256 of the result files as they are on disk now (None: missing)."""

    output_sha256: str | None
    errors_sha256: str | None
    missing_exports: tuple[str, ...] = ()  # ``spec.export`` files not on disk (shown paths)
    #: the output file is missing because ``output:`` now names another file: the one the
    #: results were last written to (as recorded; left where it is)
    output_moved_from: str | None = None


# ---------------------------------------------------------------------------------------------
# Output


#: in a replace's reason: it cancels another generation's batches (``cancels_in_flight``)
STILL_IN_FLIGHT = "still in flight"
#: in a forgotten resource's "none": not a change of the plan, but apply records something
#: (it tracks the resource again), so it is no ``leaves_alone``
TRACKED_AGAIN = "forgotten: apply tracks it again"
#: the start of a renamed resource's reason (``moves.note_moves``): apply records the move
MOVED_FROM = "moved from "
#: the reason of a resource in sync with nothing beside it (``_in_sync_reason``)
_PLAIN_IN_SYNC = re.compile(r"in sync: \d+ succeeded")


@dataclass(frozen=True)
class Action:
    resource: str
    kind: ActionKind
    reason: str
    provider: str | None = None
    spec_hash: str | None = None
    generation_id: int | None = None
    requests: int = 0  # requests this action would submit (create / replace / retry)
    estimated_input_tokens: int = 0
    reused: int = 0  # requests of a new generation that keep an earlier generation's answer
    shards: int = 0  # the remote batches it would create (one per shard): 0 if it submits none
    # an orphan not pruned: the commit that last declared it, newer than this checkout's
    declared_by: str | None = None
    # the generation's batches still in flight (a refresh polls them); a prune's: what it
    # would stop (``_orphan_stops``)
    in_flight: int = 0

    @property
    def spends(self) -> bool:
        return self.kind in SPENDING_KINDS

    @property
    def cancels_in_flight(self) -> bool:
        """A replace that cancels another generation still in flight (spending on it needs
        consent even when it submits nothing: what that generation was paid for stops), or a
        prune of a resource with something to stop (a prune that cancels nothing only
        forgets: no consent to approve)."""
        if self.kind is ActionKind.PRUNE:
            return self.in_flight > 0
        return self.kind is ActionKind.REPLACE and STILL_IN_FLIGHT in self.reason

    @property
    def moves(self) -> bool:
        """Apply records this resource's move from its old name (``moved``), whatever else it
        does: a change of the plan, as a ``moved`` block is one in Terraform's."""
        return self.reason.startswith(MOVED_FROM)

    @property
    def leaves_alone(self) -> bool:
        """Nothing to do, nothing to record and nothing to say: a text plan without --verbose
        counts it instead of listing it. A resource in sync that apply tracks again
        (forgotten), takes over from its old name (``moved``), whose failures are kept
        (degraded) or whose older generation is still stopping has more to say."""
        return self.kind is ActionKind.NONE and _PLAIN_IN_SYNC.fullmatch(self.reason) is not None

    def to_json(self) -> dict[str, object]:
        return {
            "resource": self.resource,
            "action": self.kind.value,
            "reason": self.reason,
            "provider": self.provider,
            "spec_hash": self.spec_hash,
            "generation_id": self.generation_id,
            "requests": self.requests,
            "estimated_input_tokens": self.estimated_input_tokens,
            "reused": self.reused,
            "shards": self.shards,
            **({"declared_by": self.declared_by} if self.declared_by else {}),
        }


@dataclass(frozen=True)
class Drain:
    """A retired generation's batch the next apply polls or collects, or a create not
    confirmed it looks up (a retired generation's, or a user-cancelled current one's:
    ``reconcile.drain``): bookkeeping that spends nothing and changes no resource's sync or
    health, so it is not a change of the plan (``Plan.has_changes``)."""

    resource: str
    generation_id: int
    retired: str  # the generation's status: superseded, cancelled, ...
    remote_id: str
    status: str  # the batch's status as last recorded
    # ``poll`` (not ended when last seen), ``collect`` (ended, not downloaded) or ``lookup``
    # (a create not confirmed: ``remote_id`` is empty)
    step: str
    pruned: bool = False  # the resource was pruned from the workspace

    def to_json(self) -> dict[str, object]:
        return {
            "resource": self.resource,
            "generation_id": self.generation_id,
            "retired": self.retired,
            "remote_id": self.remote_id,
            "status": self.status,
            "step": self.step,
            "pruned": self.pruned,
        }


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = field(default_factory=tuple)

    @property
    def has_changes(self) -> bool:
        """True when apply would do something (an orphan left alone is not a change; a move
        from an old name is, even with nothing to submit)."""
        return any(
            a.kind not in (ActionKind.NONE, ActionKind.ORPHANED) or a.moves for a in self.actions
        )

    @property
    def spending(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.spends)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for action in self.actions:
            counts[action.kind.value] = counts.get(action.kind.value, 0) + 1
        return counts

    def action_for(self, name: str) -> Action | None:
        return next((a for a in self.actions if a.resource == name), None)

    def to_json(self) -> dict[str, object]:
        return {
            "changes": self.has_changes,
            "summary": self.counts(),
            "requests_to_submit": sum(a.requests for a in self.spending),
            "estimated_input_tokens": sum(a.estimated_input_tokens for a in self.spending),
            "requests_reused": sum(a.reused for a in self.spending),
            "actions": [a.to_json() for a in self.actions],
        }


# ---------------------------------------------------------------------------------------------


def estimate_input_tokens(input_bytes: int) -> int:
    """A rough, provider-neutral estimate: about four bytes of JSON per token."""
    return (input_bytes + 3) // 4


def make_plan(
    desired: Iterable[DesiredResource],
    recorded: Mapping[str, RecordedResource],
    disk: Mapping[str, DiskFacts],
    *,
    prune: bool = False,
    include_orphans: bool = True,
    elsewhere: AbstractSet[str] = frozenset(),
    orphan_selected: Callable[[RecordedResource], bool] | None = None,
    now: float | None = None,
    declared_by: Mapping[str, str] | None = None,
) -> Plan:
    """Decide the next step for every desired resource, and report recorded orphans.

    ``elsewhere``: names whose manifests exist in the workspace though they are not planned
    (outside the PATHS given, or not selected): never orphans. ``orphan_selected``: with a
    selection, which orphans it selects (None: all). ``now`` (epoch seconds) decides whether
    a requeued shard's backoff is over; None: it is. ``declared_by``: by name, orphans last
    declared by a commit newer than this checkout's, which ``--prune`` leaves alone.
    """
    desired = list(desired)
    actions = [_planned(d, recorded.get(d.name), disk.get(d.name), now) for d in desired]
    if include_orphans:
        present = {d.name for d in desired} | set(elsewhere)
        for name in sorted(n for n in set(recorded) - present if not recorded[n].forgotten):
            if orphan_selected is None or orphan_selected(recorded[name]):
                newer = (declared_by or {}).get(name)
                actions.append(_orphan_action(recorded[name], prune, newer))
    return Plan(tuple(actions))


def _planned(
    want: DesiredResource,
    have: RecordedResource | None,
    disk: DiskFacts | None,
    now: float | None,
) -> Action:
    """``plan_resource``, and a forgotten resource that is otherwise in sync says so: apply
    tracks it again (status shows it OutOfSync until then)."""
    action = plan_resource(want, have, disk, now)
    if have is not None and have.forgotten and action.kind is ActionKind.NONE:
        return replace(action, reason=f"{action.reason}; {TRACKED_AGAIN}")
    return action


def plan_resource(
    want: DesiredResource,
    have: RecordedResource | None,
    disk: DiskFacts | None,
    now: float | None = None,
) -> Action:
    """The decision table of the module docstring, for one resource."""

    def act(
        kind: ActionKind,
        reason: str,
        gen: RecordedGeneration | None = None,
        *,
        requests: int = 0,
        estimated_input_tokens: int = 0,
        reused: int = 0,
        shards: int = 0,
    ) -> Action:
        return Action(
            resource=want.name,
            kind=kind,
            reason=reason,
            provider=want.provider,
            spec_hash=want.spec_hash,
            generation_id=gen.id if gen else None,
            requests=requests,
            estimated_input_tokens=estimated_input_tokens,
            reused=reused,
            shards=shards if requests else 0,
        )

    def spend(
        kind: ActionKind,
        reason: str,
        gen: RecordedGeneration | None,
        requests: int,
        nbytes: int,
        reused: int = 0,
        shards: int = 1,
    ) -> Action:
        return act(
            kind,
            reason,
            gen,
            requests=requests,
            # nothing to submit costs nothing: leftover bytes (a blank line added to an input
            # whose answers are all kept) are no request and no token
            estimated_input_tokens=estimate_input_tokens(nbytes) if requests else 0,
            reused=reused,
            shards=shards,
        )

    def new_generation(kind: ActionKind, reason: str, gen: RecordedGeneration | None) -> Action:
        """A generation whose ledger is still to be recorded: reusable answers are kept."""
        reused = min(want.reusable, want.requests)
        if reused:
            reason += f"; {reused:,} request(s) keep a recorded answer"
        stopping = _still_stopping(have)
        held_running = any(
            g.id == want.held_by and g.status in ACTIVE_GENERATION_STATUSES
            for g in (have.generations if have else ())
        )
        if want.held_by is not None and not want.hold_expired and held_running:
            # not cancelled yet: only an apply allowed to replace it gets as far as the wait
            reason += (
                f"; apply cancels generation {want.held_by} first, when allowed to replace it, "
                "waits for it to stop (its answers are reused) and creates this one once it "
                "has ended, or after replaceHoldSeconds"
            )
        elif want.held_by is not None and not want.hold_expired:
            reason += (
                f"; waits for generation {want.held_by} to stop first (its answers are reused): "
                "apply creates it once that has ended, or after replaceHoldSeconds"
            )
        elif want.held_by is not None:
            reason += (
                f"; generation {want.held_by} is still stopping past replaceHoldSeconds: "
                "created anyway, what it finishes is sent again"
            )
        elif stopping and want.requests > reused:  # its answers reach the ledger only when
            # it ends: too late for this one (nothing is sent again when nothing is sent)
            reason += (
                f"; generation {stopping.id} is still stopping: what it finishes is sent again"
            )
        return spend(
            kind,
            reason,
            gen,
            want.requests - reused,
            max(want.input_bytes - want.reusable_bytes, 0) if reused else want.input_bytes,
            reused,
            want.shards,
        )

    if want.suspend:
        return act(ActionKind.NONE, "suspended in the manifest")
    gen = have.generation_for(want.spec_hash) if have else None
    others_active = [
        g
        for g in (have.generations if have else ())
        if g.spec_hash != want.spec_hash and g.status in ACTIVE_GENERATION_STATUSES
    ]
    if want.replace and gen is None:
        why = "replacement asked for (--replace): a new generation of the same spec"
        if others_active:
            why += f"; cancels generation {_named(others_active[0])} {STILL_IN_FLIGHT}"
        return new_generation(ActionKind.REPLACE, why, None)
    if others_active:  # a newer or older spec is still running: switching needs consent
        # a revived generation that was superseded goes again; one still active does not
        why = f"spec changed while generation {_named(others_active[0])} is {STILL_IN_FLIGHT}"
        if gen is None:
            return new_generation(ActionKind.REPLACE, why, None)
        requests = want.requests if gen.status == "superseded" else 0
        return spend(
            ActionKind.REPLACE,
            why,
            gen,
            requests,
            want.input_bytes if requests else 0,
            shards=max(len(gen.shards), 1),
        )
    if gen is None and want.readded_after is not None:
        why = (
            f"added again after `apply --prune` cancelled generation {want.readded_after}: "
            "a new generation of the same spec"
        )
        return new_generation(ActionKind.CREATE, why, None)
    if gen is None:
        why = "new resource" if have is None else "spec or input changed"
        return new_generation(ActionKind.CREATE, why, None)
    if gen.status == "cancelled":  # keep what finished before the cancel took effect
        rerun = f"; `batchspec apply --replace {want.name}` runs it again"
        if any(b.in_flight for b in gen.batches):
            return act(
                ActionKind.REFRESH,
                "cancelled by a user; waiting for it to stop; once it has stopped, "
                f"`batchspec apply --replace {want.name}` runs it again, keeping what it finished",
                gen,
            )
        if any(b.awaiting_collect for b in gen.batches) or (
            gen.output_sha256 is None and any(b.collected for b in gen.batches)
        ):
            return act(
                ActionKind.COLLECT, "cancelled by a user; keeping what finished" + rerun, gen
            )
        looked_up = any(b.remote_id is None and b.status == "creating" for b in gen.batches)
        return act(
            ActionKind.NONE,
            f"cancelled by a user; `batchspec apply --replace {want.name}` runs it again"
            + (  # the drain's lookup (``reconcile.drain``): it may have landed since
                "; a create whose answer was lost is looked up by every apply, cancelled and "
                "kept if it shows"
                if looked_up
                else ""
            ),
            gen,
        )

    intents = [b for b in gen.batches if b.remote_id is None and b.status not in TERMINAL_STATUSES]
    if intents:
        n = sum(b.requests for b in intents)
        unsure = sum(b.status == "creating" for b in intents)
        why = f"{len(intents) - unsure} batch(es) queued: recorded, not yet submitted"
        if unsure:
            why = (
                f"{unsure} batch create(s) not confirmed by the provider "
                "(adopts the remote batch if it exists)"
            )
        return spend(ActionKind.CREATE, why, gen, n, _bytes_share(want, n), shards=len(intents))
    if not gen.batches and gen.shards and not any(s.unresolved for s in gen.shards):
        return act(
            ActionKind.COLLECT, "every request keeps a recorded result; results to write", gen
        )
    if not gen.batches and gen.status in ACTIVE_GENERATION_STATUSES:
        why = "generation recorded but nothing submitted yet"
        return new_generation(ActionKind.CREATE, why, gen)
    in_flight = [b for b in gen.batches if b.in_flight]
    uncollected = [b for b in gen.batches if b.awaiting_collect]
    if uncollected:
        # a shard's batch that ended is collected while the others run: its answers are
        # recorded (and safe from the provider's retention) without waiting for the slowest
        still = f", {len(in_flight)} still in flight" if in_flight else ""
        why = f"{len(uncollected)} finished batch(es) to download{still}"
        return replace(act(ActionKind.COLLECT, why, gen), in_flight=len(in_flight))
    if in_flight:
        why = f"{len(in_flight)} batch(es) in flight"
        return replace(act(ActionKind.REFRESH, why, gen), in_flight=len(in_flight))
    # No status guard: a Degraded generation whose retry.maxAttempts was raised has attempts
    # left again and retries, like any other (``retry`` is not part of the spec hash).
    retryable = [s for s in gen.shards if s.unresolved and s.attempts_used < want.max_attempts]
    if retryable:
        ready = [s for s in retryable if s.not_before is None or now is None or now >= s.not_before]
        if not ready:
            wait = min(s.not_before or 0 for s in retryable) - (now or 0)
            return act(
                ActionKind.REFRESH,
                f"requeued after the provider's token_limit_exceeded; resubmitting in {wait:.0f}s",
                gen,
            )
        n = sum(s.unresolved for s in ready)
        nbytes = sum(s.unresolved_bytes for s in ready)
        attempt = max(s.attempts_used for s in ready) + 1
        return spend(
            ActionKind.RETRY,
            f"{n} unresolved request(s); attempt {attempt} of {want.max_attempts}",
            gen,
            n,
            nbytes,
            shards=len(ready),
        )
    if gen.status not in FINISHED_GENERATION_STATUSES:
        return act(ActionKind.COLLECT, "all requests resolved; results to write", gen)
    drift = _disk_drift(gen, disk)
    if drift:
        return act(ActionKind.RESTORE, drift, gen)
    why = _in_sync_reason(want.name, gen)
    stopping = _still_stopping(have)
    if stopping:  # apply's drain polls it: not a change, but not nothing either
        why += (
            f"; generation {stopping.id} is still stopping: `batchspec apply` polls it and "
            "keeps what it finishes"
        )
    return act(ActionKind.NONE, why, gen)


def _named(gen: RecordedGeneration) -> str:
    """A generation as the plan names it: its number (as apply's lines do) and its spec."""
    return f"{gen.id} (spec {gen.spec_hash[:12]})"


def _still_stopping(have: RecordedResource | None) -> RecordedGeneration | None:
    """An ended generation (cancelled, superseded) whose batch is still stopping, if any:
    apply drains it, and only once it has ended can a new generation reuse its answers."""
    return next(
        (
            g
            for g in (have.generations if have else ())
            if g.status not in ACTIVE_GENERATION_STATUSES
            and any(still_stopping(b.remote_id, b.status, collected=b.collected) for b in g.batches)
        ),
        None,
    )


def _bytes_share(want: DesiredResource, requests: int) -> int:
    if not want.requests:
        return 0
    return want.input_bytes * requests // want.requests


def _disk_drift(gen: RecordedGeneration, disk: DiskFacts | None) -> str | None:
    if disk is None:
        return None
    problems = []
    for label, recorded_sha, on_disk in (
        ("output", gen.output_sha256, disk.output_sha256),
        ("errors", gen.errors_sha256, disk.errors_sha256),
    ):
        if recorded_sha is None:
            continue
        if on_disk is None and disk.output_moved_from is not None:
            if label == "output":
                problems.append(
                    f"output moved from {disk.output_moved_from}, which is left as it is"
                )
        elif on_disk is None:
            problems.append(f"{label} file is missing")
        elif on_disk != recorded_sha:
            problems.append(f"{label} file differs from the recorded results")
    problems += [f"export file {shown} is missing" for shown in disk.missing_exports]
    return "; ".join(problems) or None


def _in_sync_reason(name: str, gen: RecordedGeneration) -> str:
    text = f"in sync: {gen.succeeded} succeeded"
    if gen.failed:
        text += f", {gen.failed} failed"
    if gen.status == "degraded":
        # attempts used up, or failures no retry helps: either way apply will not send them
        text += f" (degraded: failed finally; `batchspec apply --replace {name}` runs it again)"
    return text


def _orphan_detail(rec: RecordedResource) -> str:
    """What an orphan still has at the provider: a finished batch not yet downloaded is not
    "in flight" (nothing to cancel; its answers are still collected for reuse)."""
    batches = [b for g in rec.generations for b in g.batches]
    running = sum(b.in_flight for b in batches)
    finished = sum(b.awaiting_collect for b in batches)
    parts = [f"{running} batch(es) in flight"] if running else []
    if finished:
        parts.append(f"{finished} finished batch(es) not collected")
    if parts:
        return " and ".join(parts)
    active = any(g.status in ACTIVE_GENERATION_STATUSES for g in rec.generations)
    return "batches still in flight" if active else "nothing in flight"


def _orphan_stops(rec: RecordedResource) -> int:
    """What pruning ``rec`` would cancel: its batches in flight, and at least one for a
    generation still active without any (a create not confirmed may have landed and be
    running: the cancel looks it up and cancels it), so only an orphan with nothing that may
    be running is pruned as a mere forget."""
    running = sum(b.in_flight for g in rec.generations for b in g.batches)
    active = any(g.status in ACTIVE_GENERATION_STATUSES for g in rec.generations)
    return max(running, int(active))


def _orphan_action(rec: RecordedResource, prune: bool, declared_by: str | None = None) -> Action:
    detail = _orphan_detail(rec)
    if prune and declared_by is not None:
        return Action(
            resource=rec.name,
            kind=ActionKind.ORPHANED,
            provider=rec.provider,
            reason=held_from_prune(rec.name, declared_by, detail),
            declared_by=declared_by,
        )
    if prune:
        stops = _orphan_stops(rec)
        return Action(
            resource=rec.name,
            kind=ActionKind.PRUNE,
            provider=rec.provider,
            # nothing that may still run: nothing to cancel, only its records to forget
            reason=f"manifest is gone, {detail}: {'cancel and forget' if stops else 'forget'}",
            in_flight=stops,
        )
    if declared_by is not None:  # what `--prune` would do: leave it alone
        return Action(
            resource=rec.name,
            kind=ActionKind.ORPHANED,
            provider=rec.provider,
            reason=f"manifest is gone here ({detail}), but commit {declared_by[:12]}, newer "
            "than this checkout's, declared it: `apply --prune` leaves it alone (`apply "
            f"--prune --select {rec.name}` prunes it anyway)",
        )
    return Action(
        resource=rec.name,
        kind=ActionKind.ORPHANED,
        provider=rec.provider,
        reason=f"manifest is gone ({detail}); `apply --prune` "
        + ("cancels and forgets it" if _orphan_stops(rec) else "forgets it"),
    )


def held_from_prune(name: str, commit: str, detail: str = "") -> str:
    """Why ``--prune`` leaves alone an orphan that a commit newer than this checkout's
    declared, and what to do about it."""
    return (
        f"manifest is gone here{f' ({detail})' if detail else ''}, but commit {commit[:12]}, "
        "newer than this checkout's, declared it: not pruned; update the checkout, or name it "
        f"to prune it anyway: `batchspec apply --prune --select {name}`"
    )
