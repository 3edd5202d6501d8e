"""The planner as a pure function: (desired, recorded, disk) -> one action per resource.

Every row of ``plan.py``'s decision table is a case below, built from plain dataclasses: no
state store, no files, no network.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from batchspec.core.plan import (
    Action,
    ActionKind,
    DesiredResource,
    DiskFacts,
    Plan,
    RecordedBatch,
    RecordedGeneration,
    RecordedResource,
    ShardProgress,
    estimate_input_tokens,
    make_plan,
    plan_resource,
    still_stopping,
)

NEW, OLD = "b" * 64, "a" * 64
OUT, ERR = "1" * 64, "2" * 64


def want(**kw: object) -> DesiredResource:
    base = DesiredResource(
        name="triage",
        provider="openai",
        spec_hash=NEW,
        requests=10,
        input_bytes=400,
        max_attempts=3,
    )
    return replace(base, **kw)


def batch(**kw: object) -> RecordedBatch:
    base = RecordedBatch(
        id=1,
        shard=0,
        attempt=1,
        remote_id="batch_1",
        status="completed",
        collected=True,
        requests=10,
    )
    return replace(base, **kw)


def gen(**kw: object) -> RecordedGeneration:
    base = RecordedGeneration(
        id=7,
        spec_hash=NEW,
        status="complete",
        requests=10,
        succeeded=10,
        output_sha256=OUT,
        errors_sha256=ERR,
        batches=(batch(),),
    )
    return replace(base, **kw)


def have(*generations: RecordedGeneration) -> RecordedResource:
    return RecordedResource(name="triage", provider="openai", generations=generations)


IN_SYNC_DISK = DiskFacts(OUT, ERR)
IN_FLIGHT = gen(status="in_progress", batches=(batch(status="in_progress", collected=False),))

# (desired, recorded, disk) -> (kind, fragment of the reason, requests to submit, tokens)
CASES = [
    pytest.param(
        want(),
        None,
        None,
        (ActionKind.CREATE, "new resource", 10, 100),
        id="new-resource-creates",
    ),
    pytest.param(
        want(),
        have(replace(IN_FLIGHT, id=3, spec_hash=OLD)),
        None,
        (ActionKind.REPLACE, f"generation 3 (spec {OLD[:12]}) is still in flight", 10, 100),
        id="spec-changed-older-in-flight-replaces",
    ),
    pytest.param(
        want(),
        have(gen(id=3, spec_hash=OLD, status="pending", batches=())),
        None,
        (ActionKind.REPLACE, "still in flight", 10, 100),
        id="spec-changed-older-pending-replaces",
    ),
    pytest.param(
        want(),
        have(IN_FLIGHT, replace(IN_FLIGHT, id=3, spec_hash=OLD)),
        None,
        (ActionKind.REPLACE, f"generation 3 (spec {OLD[:12]}) is still in flight", 0, 0),
        id="spec-reverted-to-one-still-running-replaces-submitting-nothing",
    ),
    pytest.param(
        want(),
        have(
            gen(
                status="in_progress",
                batches=(),
                shards=(ShardProgress(0, 1, 0), ShardProgress(1, 1, 0)),
            )
        ),
        None,
        (ActionKind.COLLECT, "every request keeps a recorded result", 0, 0),
        id="nothing-submitted-every-request-recorded-collects",
    ),
    pytest.param(
        want(),
        have(
            gen(
                status="in_progress",
                batches=(),
                shards=(ShardProgress(0, 0, 0), ShardProgress(1, 0, 4)),
            )
        ),
        None,
        (ActionKind.CREATE, "generation recorded but nothing submitted", 10, 100),
        id="nothing-submitted-some-requests-open-creates",
    ),
    pytest.param(
        want(requests=0, input_bytes=0),
        have(gen(status="in_progress", batches=(batch(remote_id=None, status="pending"),))),
        None,
        (ActionKind.CREATE, "1 batch(es) queued: recorded, not yet submitted", 10, 0),
        id="queued-intent-of-an-empty-input-estimates-no-tokens",
    ),
    pytest.param(
        want(),
        have(gen(output_sha256=None)),
        DiskFacts(None, None),
        (ActionKind.RESTORE, "errors file is missing", 0, 0),
        id="no-output-recorded-errors-missing-restores",
    ),
    pytest.param(
        want(),
        have(gen(id=3, spec_hash=OLD)),
        None,
        (ActionKind.CREATE, "spec or input changed", 10, 100),
        id="spec-changed-older-complete-creates",
    ),
    pytest.param(
        want(),
        have(gen(id=3, spec_hash=OLD, status="degraded")),
        None,
        (ActionKind.CREATE, "spec or input changed", 10, 100),
        id="spec-changed-older-degraded-creates",
    ),
    pytest.param(
        want(),
        have(
            gen(id=3, status="superseded", batches=(batch(status="cancelled"),)),
            replace(IN_FLIGHT, id=4, spec_hash=OLD),
        ),
        None,
        (ActionKind.REPLACE, f"generation 4 (spec {OLD[:12]}) is still in flight", 10, 100),
        id="spec-reverted-while-newer-in-flight-replaces",
    ),
    pytest.param(
        want(),
        have(gen(id=3, spec_hash=OLD, status="cancelled")),
        None,
        (ActionKind.CREATE, "spec or input changed", 10, 100),
        id="spec-changed-older-cancelled-creates",
    ),
    pytest.param(
        want(),
        have(
            gen(
                status="in_progress",
                batches=(
                    batch(id=1, remote_id=None, status="intent", collected=False, requests=4),
                    batch(id=2, shard=1, status="in_progress", collected=False, requests=6),
                ),
            )
        ),
        None,
        (ActionKind.CREATE, "1 batch(es) queued: recorded, not yet submitted", 4, 40),
        id="intent-without-remote-id-creates-to-adopt",
    ),
    pytest.param(
        want(),
        have(
            gen(
                status="in_progress",
                batches=(batch(remote_id=None, status="creating", collected=False),),
            )
        ),
        None,
        (ActionKind.CREATE, "1 batch create(s) not confirmed by the provider (adopts", 10, 100),
        id="creating-intent-creates-to-adopt",
    ),
    pytest.param(
        want(),
        have(gen(status="pending", batches=())),
        None,
        (ActionKind.CREATE, "nothing submitted yet", 10, 100),
        id="generation-without-batches-creates",
    ),
    pytest.param(
        want(),
        have(IN_FLIGHT),
        None,
        (ActionKind.REFRESH, "1 batch(es) in flight", 0, 0),
        id="in-flight-refreshes",
    ),
    pytest.param(
        want(),
        have(
            gen(
                status="in_progress",
                batches=(
                    batch(id=1, status="completed", collected=False),
                    batch(id=2, shard=1, status="finalizing", collected=False),
                ),
            )
        ),
        None,
        (ActionKind.COLLECT, "1 finished batch(es) to download, 1 still in flight", 0, 0),
        id="a-finished-shard-is-collected-while-another-runs",
    ),
    pytest.param(
        want(),
        have(gen(status="in_progress", batches=(batch(status="expired", collected=False),))),
        None,
        (ActionKind.COLLECT, "1 finished batch(es) to download", 0, 0),
        id="terminal-uncollected-collects",
    ),
    pytest.param(
        want(),
        have(
            gen(
                status="in_progress",
                shards=(
                    ShardProgress(shard=0, attempts_used=1, unresolved=3, unresolved_bytes=120),
                ),
            )
        ),
        None,
        (ActionKind.RETRY, "3 unresolved request(s); attempt 2 of 3", 3, 30),
        id="unresolved-with-attempts-left-retries",
    ),
    pytest.param(
        want(),
        have(
            gen(
                status="in_progress",
                shards=(
                    ShardProgress(shard=0, attempts_used=3, unresolved=2, unresolved_bytes=80),
                    ShardProgress(shard=1, attempts_used=1, unresolved=5, unresolved_bytes=200),
                ),
            )
        ),
        None,
        (ActionKind.RETRY, "5 unresolved request(s); attempt 2 of 3", 5, 50),
        id="retry-counts-only-shards-with-attempts-left",
    ),
    pytest.param(
        want(),
        have(
            gen(
                status="in_progress",
                shards=(ShardProgress(shard=0, attempts_used=3, unresolved=3),),
            )
        ),
        None,
        (ActionKind.COLLECT, "all requests resolved; results to write", 0, 0),
        id="attempts-exhausted-collects-results",
    ),
    pytest.param(
        want(max_attempts=1),
        have(
            gen(
                status="in_progress",
                shards=(ShardProgress(shard=0, attempts_used=1, unresolved=3),),
            )
        ),
        None,
        (ActionKind.COLLECT, "results to write", 0, 0),
        id="max-attempts-one-never-retries",
    ),
    pytest.param(
        want(),
        have(gen(status="degraded", succeeded=7, failed=3)),
        IN_SYNC_DISK,
        (
            ActionKind.NONE,
            "in sync: 7 succeeded, 3 failed "
            "(degraded: failed finally; `batchspec apply --replace triage` runs it again)",
            0,
            0,
        ),
        id="attempts-exhausted-degraded-is-none",
    ),
    pytest.param(
        want(max_attempts=3),
        have(
            gen(
                status="degraded",
                succeeded=7,
                failed=3,
                shards=(
                    ShardProgress(shard=0, attempts_used=2, unresolved=3, unresolved_bytes=120),
                ),
            )
        ),
        IN_SYNC_DISK,
        (ActionKind.RETRY, "3 unresolved request(s); attempt 3 of 3", 3, 30),
        id="degraded-with-max-attempts-raised-retries",
    ),
    pytest.param(
        want(max_attempts=2),
        have(
            gen(
                status="degraded",
                succeeded=7,
                failed=3,
                shards=(ShardProgress(shard=0, attempts_used=2, unresolved=3),),
            )
        ),
        IN_SYNC_DISK,
        (
            ActionKind.NONE,
            "in sync: 7 succeeded, 3 failed (degraded: failed finally; `batchspec apply --replace "
            "triage` runs it again)",
            0,
            0,
        ),
        id="degraded-with-attempts-still-exhausted-is-none",
    ),
    pytest.param(
        want(),
        have(gen()),
        DiskFacts(None, ERR),
        (ActionKind.RESTORE, "output file is missing", 0, 0),
        id="complete-output-missing-restores",
    ),
    pytest.param(
        want(),
        have(gen()),
        DiskFacts("f" * 64, ERR),
        (ActionKind.RESTORE, "output file differs from the recorded results", 0, 0),
        id="complete-output-edited-restores",
    ),
    pytest.param(
        want(),
        have(gen()),
        DiskFacts(OUT, None),
        (ActionKind.RESTORE, "errors file is missing", 0, 0),
        id="complete-errors-missing-restores",
    ),
    pytest.param(
        want(),
        have(gen(status="degraded", failed=2)),
        DiskFacts(None, "f" * 64),
        (
            ActionKind.RESTORE,
            "output file is missing; errors file differs from the recorded results",
            0,
            0,
        ),
        id="degraded-both-files-drifted-restores",
    ),
    pytest.param(
        want(),
        have(gen()),
        IN_SYNC_DISK,
        (ActionKind.NONE, "in sync: 10 succeeded", 0, 0),
        id="in-sync-is-none",
    ),
    pytest.param(
        want(),
        have(gen(output_sha256=None, errors_sha256=None)),
        DiskFacts(None, None),
        (ActionKind.NONE, "in sync", 0, 0),
        id="nothing-recorded-on-disk-is-not-drift",
    ),
    pytest.param(
        want(suspend=True),
        None,
        None,
        (ActionKind.NONE, "suspended in the manifest", 0, 0),
        id="suspended-new-resource-is-none",
    ),
    pytest.param(
        want(suspend=True),
        have(IN_FLIGHT),
        DiskFacts(None, None),
        (ActionKind.NONE, "suspended in the manifest", 0, 0),
        id="suspended-in-flight-is-none",
    ),
    pytest.param(
        want(),
        have(gen(status="cancelled", batches=(batch(status="cancelling", collected=False),))),
        None,
        (ActionKind.REFRESH, "cancelled by a user; waiting for it to stop", 0, 0),
        id="cancelling-is-polled-to-its-end",
    ),
    pytest.param(
        want(),
        have(gen(status="cancelled", batches=(batch(status="cancelled", collected=False),))),
        None,
        (ActionKind.COLLECT, "cancelled by a user; keeping what finished", 0, 0),
        id="cancelled-keeps-what-finished",
    ),
    pytest.param(
        want(),
        have(gen(status="cancelled", output_sha256=None, batches=(batch(status="cancelled"),))),
        None,
        (ActionKind.COLLECT, "cancelled by a user; keeping what finished", 0, 0),
        id="cancelled-collected-writes-its-results",
    ),
    pytest.param(
        want(),
        have(gen(status="cancelled", batches=(batch(status="cancelled"),))),
        None,
        (ActionKind.NONE, "cancelled by a user", 0, 0),
        id="cancelled-with-results-written-is-none",
    ),
]


def test_a_step_counts_the_batches_it_creates_one_per_shard() -> None:
    """A retry creates one batch per shard it resends; a new generation as many as the caller
    counted (``DesiredResource.shards``); a step that submits nothing, none."""
    retrying = have(
        gen(
            status="in_progress",
            shards=(
                ShardProgress(shard=0, attempts_used=1, unresolved=2, unresolved_bytes=80),
                ShardProgress(shard=1, attempts_used=1, unresolved=0),
                ShardProgress(shard=2, attempts_used=1, unresolved=5, unresolved_bytes=200),
            ),
        )
    )
    assert plan_resource(want(), retrying, None).shards == 2
    assert plan_resource(replace(want(), shards=4), None, None).shards == 4
    assert plan_resource(want(), have(gen()), IN_SYNC_DISK).shards == 0


@pytest.mark.parametrize(("desired", "recorded", "disk", "expected"), CASES)
def test_decision_table(
    desired: DesiredResource,
    recorded: RecordedResource | None,
    disk: DiskFacts | None,
    expected: tuple[ActionKind, str, int, int],
) -> None:
    """Each recorded situation leads to one action, with its reason and what it would submit."""
    kind, reason, requests, tokens = expected
    action = plan_resource(desired, recorded, disk)
    assert action.kind is kind
    assert reason in action.reason
    assert (action.requests, action.estimated_input_tokens) == (requests, tokens)
    assert action.resource == desired.name and action.spec_hash == desired.spec_hash
    assert action.spends == (kind in (ActionKind.CREATE, ActionKind.REPLACE, ActionKind.RETRY))


REQUEUED = have(
    gen(
        status="in_progress",
        shards=(
            ShardProgress(
                shard=0, attempts_used=1, unresolved=4, unresolved_bytes=160, not_before=1000.0
            ),
        ),
    )
)


@pytest.mark.parametrize(
    ("now", "kind", "reason"),
    [
        pytest.param(940.0, ActionKind.REFRESH, "resubmitting in 60s", id="backoff-not-over"),
        pytest.param(1000.0, ActionKind.RETRY, "attempt 2 of 3", id="backoff-over"),
        pytest.param(None, ActionKind.RETRY, "attempt 2 of 3", id="no-clock-means-ready"),
    ],
)
def test_a_requeued_shard_waits_for_its_not_before(
    now: float | None, kind: ActionKind, reason: str
) -> None:
    """A shard requeued with a backoff is retried only once ``now`` reaches its not_before."""
    action = plan_resource(want(), REQUEUED, None, now)
    assert action.kind is kind
    assert reason in action.reason
    assert action.requests == (4 if kind is ActionKind.RETRY else 0)


def test_actions_name_the_generation_they_act_on() -> None:
    """Refresh/collect/restore carry the generation id; a brand-new create carries none."""
    assert plan_resource(want(), have(IN_FLIGHT), None).generation_id == 7
    assert plan_resource(want(), have(gen()), DiskFacts(None, ERR)).generation_id == 7
    assert plan_resource(want(), None, None).generation_id is None
    changed = have(gen(id=3, spec_hash=OLD))
    assert plan_resource(want(), changed, None).generation_id is None


def test_the_generation_for_the_current_spec_is_chosen_among_many() -> None:
    """Old finished generations do not matter: the one for the current spec hash decides."""
    recorded = have(gen(id=3, spec_hash=OLD, status="complete"), replace(IN_FLIGHT, id=8))
    action = plan_resource(want(), recorded, None)
    assert (action.kind, action.generation_id) == (ActionKind.REFRESH, 8)


def test_another_generation_still_in_flight_is_replaced_even_when_ours_runs_too() -> None:
    """Two generations in flight (a reverted spec): the other one must be cancelled first."""
    recorded = have(gen(id=3, spec_hash=OLD, status="in_progress"), replace(IN_FLIGHT, id=8))
    action = plan_resource(want(), recorded, None)
    assert (action.kind, action.generation_id, action.requests) == (ActionKind.REPLACE, 8, 0)


@pytest.mark.parametrize(
    ("nbytes", "tokens"),
    [
        pytest.param(0, 0, id="empty"),
        pytest.param(1, 1, id="rounds-up"),
        pytest.param(4, 1, id="exact"),
        pytest.param(5, 2, id="one-over"),
    ],
)
def test_token_estimate_is_bytes_over_four_rounded_up(nbytes: int, tokens: int) -> None:
    """The provider-neutral estimate: about four bytes of JSON per token, never rounded down."""
    assert estimate_input_tokens(nbytes) == tokens


# ---------------------------------------------------------------------------------------------
# make_plan: orphans, pruning and the plan as a whole


def orphan(name: str, status: str = "complete") -> RecordedResource:
    return RecordedResource(name=name, provider="openai", generations=(gen(status=status),))


def test_orphans_are_reported_sorted_after_the_desired_resources() -> None:
    """A recorded resource without a manifest is `orphaned`, with what is still in flight."""
    zeta = RecordedResource(
        "zeta", "openai", (gen(id=1, status="complete"), gen(id=2, status="in_progress"))
    )
    recorded = {"zeta": zeta, "alpha": orphan("alpha")}
    plan = make_plan([want()], recorded, {})
    assert [(a.resource, a.kind) for a in plan.actions] == [
        ("triage", ActionKind.CREATE),
        ("alpha", ActionKind.ORPHANED),
        ("zeta", ActionKind.ORPHANED),
    ]
    assert "nothing in flight" in plan.actions[1].reason
    assert "batches still in flight" in plan.actions[2].reason  # one generation of two runs
    assert "apply --prune" in plan.actions[1].reason


def test_prune_turns_orphans_into_prune_actions() -> None:
    """With prune, an orphan becomes `prune`, which is a change: "forget" when nothing of it
    may still run, "cancel and forget" when something does; the orphan line without --prune
    says which."""
    plan = make_plan(
        [], {"old": orphan("old"), "live": orphan("live", "in_progress")}, {}, prune=True
    )
    assert [(a.resource, a.kind) for a in plan.actions] == [
        ("live", ActionKind.PRUNE),
        ("old", ActionKind.PRUNE),
    ]
    assert plan.actions[0].reason.endswith(": cancel and forget")
    assert plan.actions[1].reason.endswith(": forget")
    assert plan.has_changes
    # without --prune, what it would do is said the same way
    plan = make_plan([], {"old": orphan("old"), "live": orphan("live", "in_progress")}, {})
    assert plan.actions[0].reason.endswith("`apply --prune` cancels and forgets it")
    assert plan.actions[1].reason.endswith("`apply --prune` forgets it")


def test_a_pruned_orphans_finished_uncollected_batch_is_not_called_in_flight() -> None:
    """A prune's reason counts what is running and what finished but was not downloaded (a
    failed download): it said "batches still in flight" of a batch that had completed, and
    nested its parentheses."""
    waiting = gen(status="in_progress", batches=(batch(collected=False),))
    running = gen(id=8, status="in_progress", batches=(batch(id=2, status="in_progress"),))
    recorded = {
        "done": RecordedResource("done", "openai", (waiting,)),
        "both": RecordedResource("both", "openai", (waiting, running)),
    }

    plan = make_plan([], recorded, {}, prune=True)

    reasons = {a.resource: a.reason for a in plan.actions}
    assert reasons == {
        "both": "manifest is gone, 1 batch(es) in flight and 1 finished batch(es) not "
        "collected: cancel and forget",
        "done": "manifest is gone, 1 finished batch(es) not collected: cancel and forget",
    }


def test_a_prune_cancels_something_only_when_something_may_run() -> None:
    """A prune stops something (and so needs consent on a paid provider) when a batch is in
    flight or a generation is still active (a create not confirmed may be running); an
    orphan whose generations all ended only forgets."""
    running = gen(status="in_progress", batches=(batch(status="in_progress"),))
    unsure = gen(status="in_progress", batches=(batch(remote_id=None, status="creating"),))
    ended = gen(status="complete", batches=(batch(),))
    recorded = {
        name: RecordedResource(name, "openai", (g,))
        for name, g in (("running", running), ("unsure", unsure), ("ended", ended))
    }
    plan = make_plan([], recorded, {}, prune=True)
    stops = {a.resource: a.cancels_in_flight for a in plan.actions}
    assert stops == {"running": True, "unsure": True, "ended": False}


def test_orphans_can_be_left_out() -> None:
    """A --select plan does not report the rest of the state as orphans."""
    plan = make_plan([want()], {"old": orphan("old")}, {}, include_orphans=False)
    assert [a.resource for a in plan.actions] == ["triage"]


def test_a_desired_resource_is_never_an_orphan() -> None:
    """A recorded resource that is still in the manifests is planned, not orphaned."""
    plan = make_plan([want()], {"triage": have(gen())}, {"triage": IN_SYNC_DISK})
    assert [(a.resource, a.kind) for a in plan.actions] == [("triage", ActionKind.NONE)]


def test_make_plan_uses_the_disk_facts_of_each_resource() -> None:
    """Disk facts are matched by name: one resource's drift does not leak to another."""
    other = replace(want(), name="other")
    recorded = {"triage": have(gen()), "other": replace(have(gen()), name="other")}
    disk = {"triage": IN_SYNC_DISK, "other": DiskFacts(None, ERR)}
    plan = make_plan([want(), other], recorded, disk)
    assert [a.kind for a in plan.actions] == [ActionKind.NONE, ActionKind.RESTORE]


@pytest.mark.parametrize(
    ("kinds", "changes"),
    [
        pytest.param([], False, id="empty"),
        pytest.param([ActionKind.NONE], False, id="none"),
        pytest.param([ActionKind.ORPHANED], False, id="orphan-alone"),
        pytest.param([ActionKind.NONE, ActionKind.ORPHANED], False, id="none-and-orphan"),
        pytest.param([ActionKind.NONE, ActionKind.REFRESH], True, id="refresh"),
        pytest.param([ActionKind.COLLECT], True, id="collect"),
        pytest.param([ActionKind.RESTORE], True, id="restore"),
        pytest.param([ActionKind.PRUNE], True, id="prune"),
        pytest.param([ActionKind.ORPHANED, ActionKind.CREATE], True, id="create"),
    ],
)
def test_has_changes(kinds: list[ActionKind], changes: bool) -> None:
    """Anything but `none` and a left-alone orphan is a change (plan --detailed-exitcode 2)."""
    plan = Plan(tuple(Action(f"r{i}", kind, "why") for i, kind in enumerate(kinds)))
    assert plan.has_changes is changes


def test_to_json_shape() -> None:
    """The JSON plan: changes, summary counts, totals over spending actions only, one entry
    per action with every field."""
    recorded = {
        "triage": have(replace(IN_FLIGHT, spec_hash=OLD)),
        "sync": replace(have(gen()), name="sync"),
        "gone": orphan("gone"),
    }
    desired = [
        want(),
        want(name="fresh", requests=4, input_bytes=41),
        want(name="sync"),
    ]
    plan = make_plan(desired, recorded, {"sync": IN_SYNC_DISK})
    doc = plan.to_json()
    assert json.loads(json.dumps(doc)) == doc  # JSON-able as it is
    assert list(doc) == [
        "changes",
        "summary",
        "requests_to_submit",
        "estimated_input_tokens",
        "requests_reused",
        "actions",
    ]
    assert doc["changes"] is True
    assert doc["summary"] == {"replace": 1, "create": 1, "none": 1, "orphaned": 1}
    assert doc["requests_to_submit"] == 10 + 4
    assert doc["estimated_input_tokens"] == 100 + 11
    first = doc["actions"][0]
    assert first == {
        "resource": "triage",
        "action": "replace",
        "reason": first["reason"],
        "provider": "openai",
        "spec_hash": NEW,
        "generation_id": None,
        "requests": 10,
        "estimated_input_tokens": 100,
        "reused": 0,
        "shards": 1,
    }
    assert [a["action"] for a in doc["actions"]] == ["replace", "create", "none", "orphaned"]
    assert doc["actions"][3]["spec_hash"] is None


def test_refresh_and_collect_do_not_count_as_spending() -> None:
    """Only create, replace and retry spend; a plan of refreshes submits nothing."""
    plan = make_plan([want()], {"triage": have(IN_FLIGHT)}, {})
    assert plan.spending == ()
    assert plan.to_json()["requests_to_submit"] == 0
    assert plan.action_for("triage").kind is ActionKind.REFRESH
    assert plan.action_for("missing") is None


def test_planning_is_deterministic_and_leaves_its_inputs_alone() -> None:
    """Same inputs, same plan (pure): the planner neither mutates nor depends on call order."""
    recorded = {"triage": have(IN_FLIGHT), "gone": orphan("gone")}
    before = repr(recorded)
    first = make_plan([want()], recorded, {})
    second = make_plan([want()], recorded, {})
    assert first == second
    assert repr(recorded) == before


def test_replace_asked_for_is_a_replace_that_keeps_reusable_answers() -> None:
    """`--replace NAME` (a replacement hash with no generation) plans replace, submitting
    only the requests with no reusable answer, and says it cancels what is in flight."""
    action = plan_resource(
        want(replace=True, reusable=4, reusable_bytes=160),
        have(replace(IN_FLIGHT, spec_hash=OLD)),
        None,
    )
    assert (action.kind, action.requests, action.reused) == (ActionKind.REPLACE, 6, 4)
    assert action.estimated_input_tokens == estimate_input_tokens(400 - 160)
    assert "--replace" in action.reason and "cancels generation" in action.reason
    # the generation by its number, as apply's lines name it, with its spec hash beside
    assert f"cancels generation 7 (spec {OLD[:12]}) still in flight" in action.reason


STOPPING = gen(
    id=6, spec_hash=OLD, status="cancelled", batches=(batch(status="cancelling", collected=False),)
)


def test_a_cancelled_batch_still_stopping_is_not_told_to_be_replaced_yet() -> None:
    """While a cancelled batch still stops, the hint says to replace once it has stopped
    (a replace now sends again what it is still finishing)."""
    action = plan_resource(want(spec_hash=OLD), have(STOPPING), None)
    assert action.kind is ActionKind.REFRESH
    assert "once it has stopped, `batchspec apply --replace triage`" in action.reason


def test_replace_says_what_a_generation_still_stopping_finishes_is_sent_again() -> None:
    """`--replace` while an older generation's batch is still cancelling warns that the
    answers it is still finishing cannot be reused by this replacement."""
    action = plan_resource(want(replace=True), have(STOPPING), None)
    assert (action.kind, action.requests) == (ActionKind.REPLACE, 10)
    assert "generation 6 is still stopping" in action.reason


def test_in_sync_says_apply_still_drains_an_older_generation_stopping() -> None:
    """A resource in sync whose older generation's batch is still cancelling plans none, and
    says that apply still polls that batch and keeps what it finishes (plan hid it)."""
    action = plan_resource(want(), have(STOPPING, gen()), IN_SYNC_DISK)
    assert action.kind is ActionKind.NONE
    assert "in sync" in action.reason
    assert "generation 6 is still stopping: `batchspec apply` polls it" in action.reason


def test_a_new_generation_counts_reused_answers_apart() -> None:
    """A changed spec's create submits only what has no recorded answer."""
    action = plan_resource(want(reusable=10, reusable_bytes=400), have(gen(spec_hash=OLD)), None)
    assert (action.kind, action.requests, action.reused) == (ActionKind.CREATE, 0, 10)


def test_a_new_generation_that_submits_nothing_estimates_no_tokens() -> None:
    """Every answer kept, and a few bytes left over (a blank line added to the input): no
    request, so no token (it said "0 requests to submit (~1 input tokens)")."""
    kept = want(input_bytes=401, reusable=10, reusable_bytes=400)
    action = plan_resource(kept, have(gen(spec_hash=OLD)), None)
    assert (action.requests, action.estimated_input_tokens) == (0, 0)


def test_orphans_are_only_what_the_whole_workspace_lost_and_what_is_selected() -> None:
    """A recorded name declared elsewhere in the workspace is never an orphan; with a
    selection, only the orphans it selects are planned (pruned)."""
    recorded = {"a": orphan("a"), "b": orphan("b"), "c": orphan("c")}
    plan = make_plan(
        [],
        recorded,
        {},
        prune=True,
        elsewhere={"a"},
        orphan_selected=lambda rec: rec.name == "b",
    )
    assert [(a.resource, a.kind) for a in plan.actions] == [("b", ActionKind.PRUNE)]


@pytest.mark.parametrize(
    ("remote_id", "status", "collected", "stopping"),
    [
        pytest.param("batch_1", "in_progress", False, True, id="in-flight"),
        pytest.param("batch_1", "cancelling", False, True, id="cancelling"),
        pytest.param("batch_1", "finalizing", False, True, id="finalizing"),
        pytest.param("batch_1", "cancelled", False, True, id="ended-not-collected"),
        pytest.param("batch_1", "completed", False, True, id="completed-not-collected"),
        pytest.param("batch_1", "cancelled", True, False, id="ended-and-collected"),
        pytest.param("batch_1", "expired", True, False, id="expired-and-collected"),
        pytest.param(None, "creating", False, True, id="create-not-confirmed"),
        pytest.param(None, "pending", False, False, id="intent-never-sent"),
        pytest.param(None, "cancelled", False, False, id="intent-abandoned"),
        pytest.param(None, "cancelled", True, False, id="never-made"),
    ],
)
def test_still_stopping_is_a_batch_whose_answers_may_still_come(
    remote_id: str | None, status: str, collected: bool, stopping: bool
) -> None:
    """still_stopping (the one definition hold, drain, plan and cancel use): sent and not
    ended, ended and not collected, or a create not confirmed; never an intent never sent."""
    assert still_stopping(remote_id, status, collected=collected) is stopping


def test_plan_says_a_retired_generation_with_an_unconfirmed_create_is_still_stopping() -> None:
    """An in-sync resource whose superseded generation left a create not confirmed: the plan
    says it is still stopping (the drain looks it up), as for a batch still cancelling."""
    creating = batch(remote_id=None, status="creating", collected=False, requests=2)
    old = gen(
        id=1, spec_hash=OLD, status="superseded", requests=2, succeeded=0, batches=(creating,)
    )
    new = gen(
        id=2, requests=2, succeeded=2, batches=(batch(id=2, remote_id="batch_2", requests=2),)
    )
    have = RecordedResource("r", "openai", (old, new))
    want = DesiredResource("r", "openai", NEW, requests=2, input_bytes=10, max_attempts=3)

    action = plan_resource(want, have, DiskFacts(OUT, ERR))

    assert action.kind is ActionKind.NONE
    assert "generation 1 is still stopping" in action.reason
