"""Property-based tests of the pure planner (batchspec/core/plan.py) with hypothesis.

Random recorded states (generations in any status, batches as intents, unconfirmed creates,
in flight, terminal, collected or not; shards with attempts used and requests unresolved,
requeued or not), random desired manifests and random disk facts. The properties are the
promises that keep money safe, checked against ``make_plan`` / ``plan_resource`` as a whole
rather than case by case (tests/test_plan.py holds the decision table's cases).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from batchspec.core.plan import (
    ACTIVE_GENERATION_STATUSES,
    SPENDING_KINDS,
    ActionKind,
    DesiredResource,
    DiskFacts,
    RecordedBatch,
    RecordedGeneration,
    RecordedResource,
    ShardProgress,
    make_plan,
    plan_resource,
)
from batchspec.wire.batch_status import ACTIVE_STATUSES, TERMINAL_STATUSES

SETTINGS = settings(max_examples=200, deadline=None)

HASHES = ("a" * 64, "b" * 64, "c" * 64)
SHAS = (None, "1" * 64, "2" * 64)
NAMES = ("alpha", "beta", "gamma", "delta")
GENERATION_STATUSES = ("pending", "in_progress", "complete", "degraded", "superseded", "cancelled")
INTENT_STATUSES = ("pending", "creating")  # a recorded intent with no remote id yet


@st.composite
def batches(draw: Any) -> RecordedBatch:
    """A batch as an intent (queued or an unconfirmed create), in flight, terminal but not yet
    collected, or done (the most common, so that plans get past the earlier rows)."""
    kind = draw(st.sampled_from(("intent", "in_flight", "uncollected", "done", "done", "done")))
    statuses = {
        "intent": INTENT_STATUSES,
        "in_flight": tuple(ACTIVE_STATUSES),
        "uncollected": tuple(sorted(TERMINAL_STATUSES)),
        "done": tuple(sorted(TERMINAL_STATUSES)),
    }[kind]
    return RecordedBatch(
        id=draw(st.integers(1, 99)),
        shard=draw(st.integers(0, 3)),
        attempt=draw(st.integers(1, 4)),
        remote_id=None if kind == "intent" else f"batch_{draw(st.integers(1, 99))}",
        status=draw(st.sampled_from(statuses)),
        collected=kind == "done",
        requests=draw(st.integers(1, 50)),
    )


shards = st.builds(
    ShardProgress,
    shard=st.integers(0, 3),
    attempts_used=st.integers(0, 5),
    unresolved=st.integers(0, 20),
    unresolved_bytes=st.integers(0, 4000),
    not_before=st.none() | st.floats(0, 2000),
)


@st.composite
def generations(draw: Any, spec_hash: str) -> RecordedGeneration:
    return RecordedGeneration(
        id=draw(st.integers(1, 99)),
        spec_hash=spec_hash,
        status=draw(st.sampled_from(GENERATION_STATUSES)),
        requests=draw(st.integers(0, 50)),
        succeeded=draw(st.integers(0, 50)),
        failed=draw(st.integers(0, 50)),
        output_sha256=draw(st.sampled_from(SHAS)),
        errors_sha256=draw(st.sampled_from(SHAS)),
        batches=tuple(draw(st.lists(batches(), max_size=4))),
        shards=tuple(draw(st.lists(shards, max_size=3))),
    )


@st.composite
def recorded_resources(draw: Any, name: str) -> RecordedResource:
    hashes = draw(st.lists(st.sampled_from(HASHES), unique=True, max_size=3))
    return RecordedResource(
        name=name,
        provider="openai",
        generations=tuple(draw(generations(h)) for h in hashes),
        forgotten=draw(st.booleans()),
    )


@st.composite
def desired_resources(draw: Any, name: str) -> DesiredResource:
    return DesiredResource(
        name=name,
        provider="openai",
        spec_hash=draw(st.sampled_from(HASHES)),
        requests=draw(st.integers(0, 50)),
        input_bytes=draw(st.integers(0, 10_000)),
        max_attempts=draw(st.integers(1, 5)),
        suspend=draw(st.integers(0, 9)) == 0,
    )


disk_facts = st.builds(DiskFacts, st.sampled_from(SHAS), st.sampled_from(SHAS))
clock = st.none() | st.floats(0, 2000)


@st.composite
def one_resource(draw: Any) -> tuple[DesiredResource, RecordedResource | None, DiskFacts | None]:
    want = draw(desired_resources("alpha"))
    have = None if draw(st.integers(0, 5)) == 0 else draw(recorded_resources("alpha"))
    if have and have.generations and draw(st.integers(0, 4)):
        # mostly plan the spec of a recorded generation: that is where the money decisions are
        spec = draw(st.sampled_from([g.spec_hash for g in have.generations]))
        want = DesiredResource(**{**want.__dict__, "spec_hash": spec})
    return want, have, draw(st.none() | disk_facts)


@st.composite
def workspaces(draw: Any) -> dict[str, Any]:
    """Several desired resources, recorded resources (some of them orphans) and disk facts."""
    wanted = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3))
    recorded_names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4))
    return {
        "desired": [draw(desired_resources(n)) for n in wanted],
        "recorded": {n: draw(recorded_resources(n)) for n in recorded_names},
        "disk": {n: draw(disk_facts) for n in draw(st.sets(st.sampled_from(NAMES)))},
        "prune": draw(st.booleans()),
        "now": draw(clock),
    }


def intents_of(gen: RecordedGeneration) -> list[RecordedBatch]:
    return [b for b in gen.batches if b.remote_id is None and b.status not in TERMINAL_STATUSES]


def other_active(want: DesiredResource, have: RecordedResource | None) -> bool:
    gens = have.generations if have else ()
    return any(
        g.spec_hash != want.spec_hash and g.status in ACTIVE_GENERATION_STATUSES for g in gens
    )


# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(one_resource(), clock)
def test_never_creates_again_while_a_batch_of_the_generation_is_in_flight_or_unconfirmed(
    case: tuple[DesiredResource, RecordedResource | None, DiskFacts | None], now: float | None
) -> None:
    """While the generation has a batch in flight or an intent the provider has not confirmed,
    the only spending is the submission of exactly the recorded intents (which adopts a batch
    that exists): never a new create of the whole input, never a retry; and a recorded intent
    is always submitted before anything else."""
    want, have, disk = case
    gen = have.generation_for(want.spec_hash) if have else None
    action = plan_resource(want, have, disk, now)
    if gen is None or want.suspend or other_active(want, have) or gen.status == "cancelled":
        return
    intents = intents_of(gen)
    if intents:  # submitted (or adopted) first, never left behind nor joined by new ones
        assert action.kind is ActionKind.CREATE
        assert action.requests == sum(b.requests for b in intents)
    if not action.spends:
        return
    assert not any(b.in_flight or b.awaiting_collect for b in gen.batches) or intents
    assert action.kind is not ActionKind.RETRY or not intents


@SETTINGS
@given(one_resource(), clock)
def test_batches_in_flight_are_polled_and_finished_ones_downloaded_before_any_retry(
    case: tuple[DesiredResource, RecordedResource | None, DiskFacts | None], now: float | None
) -> None:
    """A generation with no intent to submit (and not suspended, cancelled or being replaced)
    plans collect while a finished batch is not downloaded (also while another shard's batch
    is in flight: the finished one's answers are recorded without waiting for it), else
    refresh while a batch is in flight: nothing is retried or written while the provider may
    still answer or an answer is not yet in the ledger."""
    want, have, disk = case
    gen = have.generation_for(want.spec_hash) if have else None
    if (
        gen is None
        or want.suspend
        or other_active(want, have)
        or gen.status == "cancelled"
        or intents_of(gen)
    ):
        return
    action = plan_resource(want, have, disk, now)
    in_flight = sum(b.in_flight for b in gen.batches)
    if any(b.awaiting_collect for b in gen.batches):
        assert action.kind is ActionKind.COLLECT
        assert action.in_flight == in_flight
    elif in_flight:
        assert action.kind is ActionKind.REFRESH
        assert action.in_flight == in_flight


@SETTINGS
@given(one_resource(), clock)
def test_a_retry_only_resubmits_unresolved_requests_of_shards_with_attempts_left(
    case: tuple[DesiredResource, RecordedResource | None, DiskFacts | None], now: float | None
) -> None:
    """A retry submits exactly the unresolved requests of the shards that have attempts left
    and whose backoff is over, and names an attempt within retry.maxAttempts; the plan waits
    for a requeue backoff only while no such shard is ready."""
    want, have, disk = case
    action = plan_resource(want, have, disk, now)
    gen = have.generation_for(want.spec_hash) if have else None
    if gen is None:
        return
    retryable = [s for s in gen.shards if s.unresolved and s.attempts_used < want.max_attempts]
    ready = [s for s in retryable if s.not_before is None or now is None or now >= s.not_before]
    if action.kind is ActionKind.REFRESH and "requeued" in action.reason:
        assert retryable and not ready  # waiting out a backoff only while nothing is ready
    if action.kind is not ActionKind.RETRY:
        return
    assert ready
    assert action.requests == sum(s.unresolved for s in ready)
    attempt = max(s.attempts_used for s in ready) + 1
    assert f"attempt {attempt} of {want.max_attempts}" in action.reason
    assert attempt <= want.max_attempts


@SETTINGS
@given(one_resource(), clock)
def test_switching_specs_while_another_generation_runs_always_needs_consent(
    case: tuple[DesiredResource, RecordedResource | None, DiskFacts | None], now: float | None
) -> None:
    """With another generation of the resource still pending or in progress, the plan is a
    replace (which apply does only with --allow-replace), never a silent create or retry;
    a suspended resource never spends at all."""
    want, have, disk = case
    action = plan_resource(want, have, disk, now)
    if want.suspend:
        assert action.kind is ActionKind.NONE and not action.spends
    elif other_active(want, have):
        assert action.kind is ActionKind.REPLACE


@SETTINGS
@given(one_resource(), clock)
def test_spending_is_bounded_by_the_input_and_reported_consistently(
    case: tuple[DesiredResource, RecordedResource | None, DiskFacts | None], now: float | None
) -> None:
    """Only create, replace and retry spend; no action submits requests without spending, and
    a create or replace never submits more requests than the input has, unless it submits
    recorded intents (whose count the state holds)."""
    want, have, disk = case
    action = plan_resource(want, have, disk, now)
    assert action.spends == (action.kind in SPENDING_KINDS)
    assert action.requests >= 0 and action.estimated_input_tokens >= 0
    if not action.spends:
        assert (action.requests, action.estimated_input_tokens) == (0, 0)
    gen = have.generation_for(want.spec_hash) if have else None
    if action.kind in (ActionKind.CREATE, ActionKind.REPLACE) and not (gen and intents_of(gen)):
        assert action.requests <= want.requests


@SETTINGS
@given(workspaces())
def test_prune_never_touches_a_resource_whose_manifest_exists(ws: dict[str, Any]) -> None:
    """Every desired resource gets exactly one action, in manifest order and never prune or
    orphaned; prune and orphaned name only recorded, unforgotten resources without a
    manifest, sorted, and prune appears only with --prune."""
    plan = make_plan(ws["desired"], ws["recorded"], ws["disk"], prune=ws["prune"], now=ws["now"])
    wanted = [d.name for d in ws["desired"]]
    assert [a.resource for a in plan.actions[: len(wanted)]] == wanted
    for action in plan.actions[: len(wanted)]:
        assert action.kind not in (ActionKind.PRUNE, ActionKind.ORPHANED)
    rest = plan.actions[len(wanted) :]
    expected = sorted(n for n, r in ws["recorded"].items() if n not in wanted and not r.forgotten)
    assert [a.resource for a in rest] == expected
    orphan_kind = ActionKind.PRUNE if ws["prune"] else ActionKind.ORPHANED
    assert all(a.kind is orphan_kind and not a.spends for a in rest)


@SETTINGS
@given(workspaces())
def test_planning_is_deterministic_whatever_the_order_of_the_recorded_state(
    ws: dict[str, Any],
) -> None:
    """The same inputs give the same plan, whether the recorded resources arrive in one
    order or another."""
    args = (ws["desired"], ws["recorded"], ws["disk"])
    first = make_plan(*args, prune=ws["prune"], now=ws["now"])
    again = make_plan(*args, prune=ws["prune"], now=ws["now"])
    shuffled = dict(reversed(list(ws["recorded"].items())))
    reordered = make_plan(ws["desired"], shuffled, ws["disk"], prune=ws["prune"], now=ws["now"])
    assert first == again == reordered
    assert first.to_json() == reordered.to_json()


@st.composite
def converged(draw: Any) -> tuple[DesiredResource, RecordedResource, DiskFacts]:
    """A resource whose current generation finished: every batch terminal and collected,
    no shard with both unresolved requests and attempts left, files on disk as recorded;
    older generations finished, superseded or cancelled."""
    want = draw(desired_resources("alpha"))
    want = DesiredResource(**{**want.__dict__, "suspend": False})
    status = draw(st.sampled_from(("complete", "degraded")))
    done = [
        RecordedBatch(
            id=i + 1,
            shard=draw(st.integers(0, 3)),
            attempt=draw(st.integers(1, 4)),
            remote_id=f"batch_{i}",
            status=draw(st.sampled_from(sorted(TERMINAL_STATUSES))),
            collected=True,
            requests=draw(st.integers(1, 50)),
        )
        for i in range(draw(st.integers(1, 4)))
    ]
    exhausted = st.builds(
        ShardProgress,
        shard=st.integers(0, 3),
        attempts_used=st.integers(want.max_attempts, 6),
        unresolved=st.integers(0, 20),
    )
    resolved = st.builds(
        ShardProgress,
        shard=st.integers(0, 3),
        attempts_used=st.integers(0, 6),
        unresolved=st.just(0),
    )
    out, err = draw(st.sampled_from(SHAS)), draw(st.sampled_from(SHAS))
    current = RecordedGeneration(
        id=1,
        spec_hash=want.spec_hash,
        status=status,
        requests=want.requests,
        output_sha256=out,
        errors_sha256=err,
        batches=tuple(done),
        shards=tuple(draw(st.lists(resolved | exhausted, max_size=3))),
    )
    older = [
        RecordedGeneration(
            id=i + 2,
            spec_hash=h,
            status=draw(st.sampled_from(("complete", "degraded", "superseded", "cancelled"))),
            requests=1,
        )
        for i, h in enumerate(h for h in HASHES if h != want.spec_hash)
        if draw(st.booleans())
    ]
    have = RecordedResource("alpha", "openai", tuple(draw(st.permutations([current, *older]))))
    return want, have, DiskFacts(out, err)


@SETTINGS
@given(converged(), clock)
def test_a_converged_resource_plans_no_action(
    case: tuple[DesiredResource, RecordedResource, DiskFacts], now: float | None
) -> None:
    """A finished generation with its files on disk as recorded plans none: nothing to
    submit, poll, download or restore, and the plan reports no changes."""
    want, have, disk = case
    plan = make_plan([want], {"alpha": have}, {"alpha": disk}, now=now)
    [action] = plan.actions
    assert action.kind is ActionKind.NONE, action.reason
    assert not plan.has_changes and plan.spending == ()
    assert action.reason.startswith("in sync")
