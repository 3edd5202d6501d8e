"""The use cases that read or change state: ``plan``, ``apply``, ``cancel``.

Each one loads the workspace, opens the state store, records a *run* (command, arguments,
who, where, which git commit) and, when it writes, holds the locks of the resources it touches
(``locked_resources``; the whole workspace for ``apply --prune``) for its whole duration, so
runs on other resources of the same state proceed beside it (batchspec.state.lock).
Bad input fails here, before any provider is contacted: every selected resource's input is
validated first, and nothing is uploaded unless all of them pass (DESIGN invariant 5).

``apply`` needs consent to spend or cancel: a plan that creates batches on a paid provider
(create, replace, retry) or cancels them there (prune) runs only with ``yes=True`` or when
``confirm(plan, estimates)`` (the CLI asks on a terminal, showing the spend estimate) says
so. The local engine costs nothing and needs no consent.

``plan`` tells the truth about what ``apply`` will do (DESIGN invariant 6): its request and
token counts leave out the answers a new generation reuses, it checks the budgets apply
checks (``PlanResult.refusals``), and it warns of a provider it would spend on whose API key
variable is unset (``PlanResult.warnings``). ``apply --replace NAME`` (and ``plan --replace``)
runs a resource again as a new generation (see ``batchspec.core.replacements``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from batchspec.core.budget import (
    Estimate,
    check_budget,
    estimate_spend,
    line_bound,
    output_of_unresolved,
    output_of_unreused,
    sent_by,
)
from batchspec.core.lifecycle import prune_orphans, require_recorded_state, start_replacements
from batchspec.core.moves import (
    apply_moves,
    moved_history,
    moved_view,
    note_moves,
    rename_hints,
    renamed_error,
    renamed_to,
)
from batchspec.core.orphan_outputs import overwritten_orphan_results
from batchspec.core.plan import (
    ACTIVE_GENERATION_STATUSES,
    Action,
    ActionKind,
    DesiredResource,
    Plan,
    RecordedResource,
    estimate_input_tokens,
    make_plan,
)
from batchspec.core.planfile import (
    PlanResult,
    SavedPlan,
    load_plan_file,
    state_lineage,
    write_plan_file,
)
from batchspec.core.reconcile import Reconciler, desired_resource
from batchspec.core.reconcile.context import DownloadFailure
from batchspec.core.reconcile.drain import batch_still_stopping, planned_drains
from batchspec.core.reconcile.hold import (
    DEFAULT_REPLACE_HOLD_SECONDS,
    find_hold,
    find_retry_hold,
    hold_seconds,
)
from batchspec.core.reconcile.prefetch import DEFAULT_PARALLELISM
from batchspec.core.recorded import (
    DEFAULT_REQUEUE_BACKOFF,
    DiskHashes,
    DiskLook,
    History,
    export_paths,
    is_requeued,
    load_history,
    load_recorded,
    observe_disk,
    recorded_generation,
)
from batchspec.core.replacements import (
    RequestFacts,
    effective_resources,
    next_replacement,
    reusable_answers,
    reuses_answers,
    unreused_requests,
    with_readded,
)
from batchspec.core.reporting import Progress, Reporter, engine_log_reported
from batchspec.core.selection import names_each, orphan_selector
from batchspec.core.session import (
    ProviderPool,
    indexed_requests,
    missing_api_keys,
    open_workspace,
    provider_option,
    recorded_run,
    requeue_backoff,
    select_resources,
    validate_inputs,
    workspace_names,
)
from batchspec.core.sharding import ShardLimits, count_shards, shard_limits
from batchspec.core.spend import costs_nothing
from batchspec.core.status import ResourceStatus, read_only_store, resource_statuses
from batchspec.errors import (
    BatchspecError,
    BudgetError,
    ConsentError,
    ManifestError,
    ProviderError,
    StateError,
    StateLockedError,
    UsageError,
    raise_first,
)
from batchspec.providers.base import DeadlineReached
from batchspec.state.lock import HeldLock, LockHolder, acquire_lock, current_lock
from batchspec.state.runinfo import (
    CommitRelation,
    collect_run_info,
    commit_relation,
    head_commit,
    start_run_info,
)
from batchspec.state.store import BatchRow, StateStore
from batchspec.wire.batch_status import TERMINAL_STATUSES
from batchspec.wire.inputs import InputReport
from batchspec.wire.request_index import RequestFact
from batchspec.workspace.manifest import (
    Resource,
    Workspace,
    load_workspace,
    require_resources,
    unlisted_manifests_warnings,
)
from batchspec.workspace.project import ProviderConfig
from batchspec.workspace.yamldoc import name_listing, unknown_name_hint

FIRST_POLL_INTERVAL = 0.5
# the shortest pause a batch's own progress may bring the next poll forward to
SHORTEST_POLL_PAUSE = 0.1
# right after a create, polls fall on this grid counted from the create's answer, for
# QUICK_POLL_SECONDS: a batch that ends within seconds is seen no later than by a script
# polling every 0.5 s from its create (then the interval backs off from FIRST_POLL_INTERVAL)
QUICK_POLL_GRID = 0.25
QUICK_POLL_SECONDS = 2.0
# how plan ends an input or budget refusal (apply's: "nothing was uploaded"; plan uploads
# nothing in any case)
PLAN_REFUSAL = "apply would upload nothing"


@dataclass(frozen=True)
class ApplyOptions:
    select: tuple[str, ...] = ()
    yes: bool = False
    wait: bool = False
    timeout: float | None = None
    poll_interval: float = 30.0  # the longest pause between polls; polling starts faster
    lock_timeout: float = 0.0
    allow_replace: bool = False
    prune: bool = False
    state_path: str | None = None  # --state: overrides the project's state.path
    replace: tuple[str, ...] = ()  # --replace NAME: a new generation of the same spec
    reuse: bool = True  # with replace: keep answers that succeeded (--no-reuse: resend all)
    parallelism: int = DEFAULT_PARALLELISM  # provider calls in flight at once (--parallelism)
    #: why nobody can be asked to approve (with no ``confirm``), for the refusal to say
    no_prompt: str = "no terminal, CI set, or --json"


@dataclass(frozen=True)
class ApplyResult:
    run_id: int
    plan: Plan
    statuses: tuple[ResourceStatus, ...]
    outcome: str  # converged | in_progress | replace_refused | not_collected | degraded | timeout
    exit_code: int
    # resources with batches in flight on a `local` provider: they advance only while a
    # batchspec command runs (the engine lives in its process)
    local_in_flight: tuple[str, ...] = ()
    # ended batches whose files could not be downloaded (outcome not_collected, or with a
    # timeout): nothing of them recorded as collected; the next apply collects them
    not_collected: tuple[DownloadFailure, ...] = ()
    # --timeout was reached (outcome ``timeout``, or ``degraded``: a resource already
    # Degraded outranks the timeout, see ``_exit_code``)
    timed_out: bool = False


# ---------------------------------------------------------------------------------------------


def plan_workspace(
    paths: Sequence[str],
    *,
    select: Sequence[str] = (),
    prune: bool = False,
    state_path: str | None = None,
    replace: Sequence[str] = (),
    reuse: bool = True,
    env: Mapping[str, str] = os.environ,
    detailed_exitcode: bool = False,
    out: str | None = None,
) -> PlanResult:
    """``batchspec plan``: what apply would do, with no network and no lock; its run is
    recorded with the exit code ``PlanResult.exit_code(detailed=detailed_exitcode)``, or the
    failure's when ``out`` (``--out``: where to save it) cannot be written."""
    # a state named by --state or BATCHSPEC_STATE that does not exist (a typo?) is not made
    named = state_path is not None
    with open_workspace(paths, state_path, read_only=named) as (ws, cache):
        require_resources(ws, paths, prune=prune, named=names_each(select))
        resources = select_resources(ws, select)
        require_replaceable(resources, replace)
        facts = validate_inputs(ws, resources, cache, PLAN_REFUSAL)
    elsewhere, warnings = _names_elsewhere(ws, paths, prune=prune)
    warnings = [*unlisted_manifests_warnings(ws), *warnings]
    args = {
        "paths": list(paths),
        "select": list(select),
        **({"replace": list(replace), "reuse": reuse} if replace else {}),
        **({"out": out} if out is not None else {}),
    }
    recorded = not named or ws.project.has_state()  # else planned against an empty one
    with (
        read_only_store(ws.project) if named else StateStore.open(ws.project.state) as store,
        recorded_run(store, ws, "plan", args) as run,
        store.reading(),  # reads only: a few queries in all, however many resources
    ):
        if prune and not names_each(select) and state_may_be_anothers(ws, state_path):
            refuse_pruning_another_workspace(store, elsewhere)
        warnings += new_state_warnings(ws, store, state_path)
        resources, readded = planned_resources(store, resources, replace, reuse=reuse)
        plan = compute_plan(
            store,
            resources,
            facts,
            readded=readded,
            prune=prune,
            elsewhere=elsewhere,
            orphan_selected=orphan_selector(select),
            include_orphans=elsewhere is not None,
            replacing=frozenset(replace),
            reuse=reuse,
            backoff=requeue_backoff(ws),
            requests=indexed_requests(cache, facts),
            hold_for=lambda name: hold_seconds(ws.project.providers, name),
            checkout=ws.project.root,
            named=frozenset(select) if names_each(select) else frozenset(),
            limits_for=lambda r: shard_limits(ws, r),
        )
        outputs = measured_outputs(plan, resources, store, indexed_requests(cache, facts), ws)
        refusals: list[BatchspecError] = [
            *budget_refusals(
                plan, resources, facts, store, ws.project.providers, outputs, PLAN_REFUSAL
            ),
            *overwritten_orphan_results(store, plan, resources, ws.project.root, elsewhere),
        ]
        warnings += rename_hints(store, plan, _unmoved_inputs(resources, facts))
        warnings += [f"{a.resource}: {a.reason}" for a in plan.actions if a.declared_by]
        warnings += missing_api_keys(ws, (a.provider or "" for a in plan.spending), env)
        warnings += [
            f"{a.resource}: {a.reason}; `apply` skips it unless given --allow-replace "
            "(which cancels the batches in flight), or apply this plan saved with --out"
            for a in plan.actions
            if a.kind is ActionKind.REPLACE and a.resource not in replace
        ]
        estimates = plan_estimates(plan, resources, facts, ws.project.providers, outputs, store)
        drains = planned_drains(
            store,
            ws.project.providers,
            resources,
            pruned_resources(store, resources, select),
            {name: report.sha256 for name, report in facts.items()},
        )
        result = PlanResult(
            plan=plan,
            serial=store.serial(),
            spec_hashes={r.name: r.spec_hash for r in resources},
            lineage=state_lineage(store) if recorded else None,  # None: made against none
            paths=tuple(paths),
            selection=tuple(select),
            prune=prune,
            replace=tuple(replace),
            reuse=reuse,
            workspace=str(ws.project.root.resolve()),
            warnings=tuple(warnings),
            # with what to do about each, as apply says it
            refusals=tuple("; ".join([err.message, *err.details]) for err in refusals),
            estimates=estimates,
            drains=drains,
            needs_consent=tuple(a.resource for part in consent_needed(plan, ws) for a in part),
        )
        if out is not None:
            write_plan_file(out, result)
        run.exit_code = result.exit_code(detailed=detailed_exitcode)
        return result


def state_may_be_anothers(ws: Workspace, state_path: str | None) -> bool:
    """Whether the state may hold another workspace's resources: one named by ``--state`` or
    ``BATCHSPEC_STATE``, a PostgreSQL server, or a file outside the workspace."""
    if state_path is not None or ws.project.shared_state:
        return True
    return not ws.project.state_path.resolve().is_relative_to(ws.project.root.resolve())


def refuse_pruning_another_workspace(store: StateStore, declared: AbstractSet[str] | None) -> None:
    """Refuse ``--prune`` (without ``--select NAME``) where the state tracks resources and this
    workspace declares none of them: with a state that ``state_may_be_anothers``, another
    workspace's, whose every resource the prune would cancel and forget. Resources renamed
    all at once, or deleted, are pruned by naming them (``--select NAME``)."""
    if declared is None:  # orphans unknown: --prune is refused already (_names_elsewhere)
        return
    tracked = [row.name for row in store.list_resources()]
    if not tracked or declared & set(tracked):
        return
    raise StateError(
        f"--prune would cancel and forget every resource the state at {store.db.label} tracks "
        f"({name_listing(tracked)}), and no manifest of this workspace declares any of them, "
        "so it is refused",
        details=[
            "is it another workspace's state? check --state and BATCHSPEC_STATE (each "
            "workspace needs a state, or a PostgreSQL schema, of its own)",
            "to prune resources whose manifests you deleted or renamed, name them: "
            "`batchspec apply --prune --select NAME`",
        ],
    )


def _names_elsewhere(
    ws: Workspace, paths: Sequence[str], *, prune: bool
) -> tuple[frozenset[str] | None, list[str]]:
    """Names the whole workspace declares; None (orphans unknown) with a warning when a
    manifest outside PATHS cannot be read, which ``--prune`` refuses: it would cancel
    resources whose manifests may well be there."""
    try:
        return workspace_names(ws, paths), []
    except BatchspecError as err:
        if prune:
            raise ManifestError(
                "cannot tell which resources' manifests are gone: a manifest of the workspace "
                f"outside the PATHS given cannot be read ({err.message}); --prune is refused",
                details=[*err.details, "fix it, or prune from a workspace that loads"],
            ) from None
        return None, [f"orphaned resources are not shown: {err.message}"]


def apply_workspace(
    paths: Sequence[str],
    options: ApplyOptions,
    *,
    confirm: Confirm | None = None,
    report: Reporter = lambda progress: None,
    env: Mapping[str, str] = os.environ,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    saved: SavedPlan | None = None,
) -> ApplyResult:
    """``batchspec apply``: converge the selected resources, or take one step each.

    With ``saved`` (``apply plan.json``), refuse unless the saved plan is still current, and
    spend only as it says (see batchspec.core.planfile).
    """
    with open_workspace(paths, options.state_path) as (ws, cache):
        require_resources(ws, paths, prune=options.prune, named=names_each(options.select))
        # git's answers (the run's provenance) arrive while the inputs are validated
        run_info = start_run_info(ws.project.root, env)
        resources = select_resources(ws, options.select)
        require_replaceable(resources, options.replace)
        if saved is not None:
            saved.require_workspace(ws.project.root)
        facts = validate_inputs(ws, resources, cache)
    elsewhere, _ = _names_elsewhere(ws, paths, prune=options.prune)
    args = {
        "paths": list(paths),
        "select": list(options.select),
        "wait": options.wait,
        "yes": options.yes,
        **({"plan_file": str(saved.source)} if saved is not None else {}),
        **({"prune": True} if options.prune else {}),
        # the consent to cancel a generation in flight (paid for) to submit the new spec
        **({"allow_replace": True} if options.allow_replace else {}),
        **({"replace": list(options.replace), "reuse": options.reuse} if options.replace else {}),
    }
    info = run_info.result()
    with (
        StateStore.open(ws.project.state) as store,
        recorded_run(store, ws, "apply", args, info, lock_timeout=_lock_wait(options)) as run,
    ):
        _warn_if_new_state(ws, store, options.state_path, report)
        lock_wait_began = time.monotonic()
        with acquire_lock(
            store,
            command="apply",
            info=info,
            resources=locked_resources(resources, prune=options.prune),
            timeout=_lock_wait(options),
            run_id=run.id,
            on_wait=lambda message, key, holder: report(lock_wait_event(message, key, holder)),
        ) as lock:
            options = _less_lock_wait(options, time.monotonic() - lock_wait_began)
            if lock.warning:
                report(Progress("warning", None, lock.warning))
            for warning in unlisted_manifests_warnings(ws):
                report(Progress("warning", None, warning))
            with store.reading():  # the plan's reads: a few queries, however many resources
                foreign = state_may_be_anothers(ws, options.state_path)
                if options.prune and not names_each(options.select) and foreign:
                    refuse_pruning_another_workspace(store, elsewhere)
                resources, readded = planned_resources(
                    store, resources, options.replace, reuse=options.reuse
                )
                # the run's hashes of result files, from its first plan on (each unchanged
                # file hashed once a run, not again by the passes)
                disk_hashes: DiskHashes = {}
                plan = compute_plan(
                    store,
                    resources,
                    facts,
                    disk_hashes=disk_hashes,
                    readded=readded,
                    prune=options.prune,
                    elsewhere=elsewhere,
                    orphan_selected=orphan_selector(options.select),
                    include_orphans=elsewhere is not None,
                    replacing=frozenset(options.replace),
                    reuse=options.reuse,
                    backoff=requeue_backoff(ws),
                    requests=indexed_requests(cache, facts),
                    hold_for=lambda name: hold_seconds(ws.project.providers, name),
                    checkout=ws.project.root,
                    named=frozenset(options.select) if names_each(options.select) else frozenset(),
                    limits_for=lambda r: shard_limits(ws, r),
                )
                if saved is not None:
                    saved.require_current(store, resources, plan)
                report(Progress("plan", None, "plan computed", plan=plan))
                for hint in rename_hints(store, plan, _unmoved_inputs(resources, facts)):
                    report(Progress("warning", None, hint))
                outputs = measured_outputs(
                    plan, resources, store, indexed_requests(cache, facts), ws
                )
                require_within_budget(plan, resources, facts, store, ws.project.providers, outputs)
                raise_first(
                    overwritten_orphan_results(store, plan, resources, ws.project.root, elsewhere)
                )
            with (
                engine_log_reported(report),
                ProviderPool(ws, env, lock_timeout=_lock_wait(options), report=report) as providers,
            ):
                # build every provider the plan spends on first: a missing API key fails here,
                # before consent is asked (a yes it could not act on) and anything recorded
                for action in plan.spending:
                    providers.get(action.provider or "")
                require_consent(
                    plan,
                    ws,
                    options,
                    confirm,
                    lambda: plan_estimates(
                        plan, resources, facts, ws.project.providers, outputs, store
                    ),
                )
                # then their engine folders: one in use (exit 3) fails before anything is
                # recorded
                for action in plan.spending:
                    providers.claim(action.provider or "")
                apply_moves(store, resources, run.id, report)  # after the plan checks: they saw it
                rec = Reconciler(
                    ws.project,
                    store,
                    run.id,
                    providers.get,
                    report,
                    allow_replace=options.allow_replace,
                    limits_for=lambda r: shard_limits(ws, r),
                    max_in_flight=lambda name: provider_option(ws, name, "maxInFlightBatches"),
                    requeue_backoff=requeue_backoff(ws),
                    may_spend=_may_spend(saved, options.replace),
                    still_holds_lock=lock.heartbeat,
                    may_touch=lambda name: lock.covers(name) or current_lock(store, name) is None,
                    parallelism=options.parallelism,
                    max_concurrency=lambda name: provider_option(ws, name, "maxConcurrency"),
                    inputs=cache,
                    retired_resources=lambda: pruned_resources(store, resources, options.select),
                    monotonic=clock,
                )
                rec.ctx.disk_hashes = disk_hashes
                # the result store's folder, checked before anything is sent rather than at
                # the first download (not by `cancel`: stopping batches downloads nothing)
                rec.ctx.blobs.local.require_usable()
                prune_orphans(rec, plan)
                start_replacements(rec, plan, resources, facts, options.replace, readded)
                timed_out = converge(
                    rec, resources, facts, options, lock.heartbeat, report, sleep, clock
                )
            # the outcome's plan and the statuses read the state once between them, and
            # look at the result files once between them (nothing writes them meanwhile)
            look: DiskLook = {}
            with store.reading():
                outcome = (
                    "timeout" if timed_out else end_of_run_outcome(rec, resources, facts, look)
                )
                statuses = tuple(
                    resource_statuses(
                        store,
                        resources,
                        facts,
                        providers=ws.project.providers,
                        disk_hashes=rec.ctx.disk_hashes,
                        disk_look=look,
                    )
                )
        # a replace refused for want of --allow-replace is said so, not that --wait would end
        # its batches (no pass steps a resource whose replace it refused)
        refused = set() if options.allow_replace else replaces_in(plan)
        local = tuple(
            s.name
            for s in statuses
            if _is_local(ws, s.provider)
            and s.name not in refused
            and any(b.status not in TERMINAL_STATUSES for b in s.batches)
        )
        if timed_out and any(s.health == "Degraded" for s in statuses):
            outcome = "degraded"  # failed for good: waiting longer would not have fixed it
        result = ApplyResult(
            run.id,
            plan,
            statuses,
            outcome,
            _exit_code(outcome),
            local,
            rec.not_collected(),
            timed_out,
        )
        run.exit_code = result.exit_code
        return result


def replaces_in(plan: Plan) -> set[str]:
    """The resources ``plan`` replaces (a spec changed while a generation is in flight)."""
    return {a.resource for a in plan.actions if a.kind is ActionKind.REPLACE}


def pruned_resources(
    store: StateStore, resources: Sequence[Resource], select: Sequence[str]
) -> list[str]:
    """Resources pruned from the workspace (forgotten, no manifest among ``resources``) that
    the selection, as it selects orphans, takes in: each pass drains their retired batches
    (``reconcile.drain``)."""
    selected = orphan_selector(select)
    planned = {r.name for r in resources}
    return [
        row.name
        for row in store.list_resources(include_forgotten=True)
        if row.forgotten
        and row.name not in planned
        and (
            selected is None
            or selected(RecordedResource(row.name, row.provider, labels=row.labels))
        )
    ]


def locked_resources(resources: Sequence[Resource], *, prune: bool) -> list[str] | None:
    """What an apply locks: the selected resources and the names they were moved from; None
    (the whole workspace) with ``--prune``, which may cancel and forget any orphan."""
    if prune:
        return None
    names = {r.name for r in resources} | {r.moved_from for r in resources if r.moved_from}
    return sorted(names) or None


def lock_wait_event(message: str, key: str, holder: LockHolder | None) -> Progress:
    """The ``lock_wait`` event; its ``lock`` is the lock waited for, as ``status --json``
    lists locks (``resource``, ``"*"`` for the workspace-wide one, and the holder's id, user,
    host, pid, command, CI run, since), so a pipeline need not parse the message."""
    lock = {"resource": key} if holder is None else HeldLock(key, holder).to_json()
    return Progress("lock_wait", None, message, {"lock": lock})


@dataclass(frozen=True)
class CancelResult:
    cancelled: int  # batches this cancel was sent to
    stopping: int  # batches cancelled earlier, sent, that are still stopping
    generations: int = 0  # active generations it cancelled (one not created yet included)
    # creates whose answer was lost that no lookup found yet, this cancel's or an earlier
    # one's: each later apply looks them up (``drain``), cancels one found and keeps what
    # it finished
    unconfirmed: int = 0
    #: batches of the generations it cancelled that had ended on their own (completed,
    #: failed, expired) by the time the cancel reached them: nothing left to stop
    ended: int = 0


def cancel_resource(
    paths: Sequence[str],
    name: str,
    *,
    lock_timeout: float = 0.0,
    report: Reporter = lambda p: None,
    env: Mapping[str, str] = os.environ,
    state_path: str | None = None,
    parallelism: int = DEFAULT_PARALLELISM,
) -> CancelResult:
    """``batchspec cancel NAME``: cancel a resource's in-flight batches (at most
    ``parallelism`` cancels at once, a provider's ``maxConcurrency`` to it); say how many, and
    how many cancelled before are still stopping (a cancel is never sent to them again)."""
    ws = load_workspace(paths, state_path=state_path)
    require_recorded_state(ws.project, name, "cancel")
    with (
        StateStore.open(ws.project.state) as store,
        recorded_run(store, ws, "cancel", {"name": name}, lock_timeout=lock_timeout) as run,
    ):
        if store.get_resource(name) is None:
            moved_to = renamed_to(store, name)
            if moved_to is not None:
                raise renamed_error(name, moved_to, "cancel NAME")
            known = [r.name for r in store.list_resources()]
            raise ManifestError(
                f"no resource named {name!r} is recorded in {ws.project.state_label} "
                f"({unknown_name_hint(name, known)})"
            )
        info = collect_run_info(ws.project.root, env)
        try:
            lock = acquire_lock(
                store,
                command="cancel",
                info=info,
                resources=[name],
                timeout=lock_timeout,
                run_id=run.id,
            )
        except StateLockedError as err:  # an `apply --wait` may hold it for hours
            err.details.append(
                "to cancel now, stop that run (Ctrl-C: batches it created are kept) and "
                f"run `batchspec cancel {name}` again"
            )
            raise
        with (
            lock,
            engine_log_reported(report),
            # the cancel runs none of a local engine's batches (those it is about to cancel
            # among them): a started worker would resume and send their requests
            ProviderPool(
                ws, env, lock_timeout=lock_timeout, report=report, run_local_batches=False
            ) as providers,
        ):
            rec = Reconciler(
                ws.project,
                store,
                run.id,
                providers.get,
                report,
                parallelism=parallelism,
                max_concurrency=lambda provider: provider_option(ws, provider, "maxConcurrency"),
            )
            stopping = sum(  # of generations cancelled (or superseded) before
                1
                for gen in store.generations(name)
                if gen.status not in ACTIVE_GENERATION_STATUSES
                for batch in store.batches(gen.id)
                if batch.remote_id is not None and batch_still_stopping(batch)
            )
            active = [g for g in store.generations(name) if g.status in ACTIVE_GENERATION_STATUSES]
            # ended (and collected) before this cancel: not what the cancel found ended
            done_before = {
                b.id
                for gen in active
                for b in store.batches(gen.id)
                if b.status in TERMINAL_STATUSES and b.collected_at is not None
            }
            n = rec.cancel(name)  # its batches' cancels side by side
            # this cancel's and earlier ones': every apply's drain looks each one up
            unconfirmed = sum(
                1
                for gen in store.generations(name)
                if gen.status not in ACTIVE_GENERATION_STATUSES
                for batch in store.batches(gen.id)
                if batch.remote_id is None and batch.status == "creating"
            )
            ended = sum(
                1
                for gen in active
                for batch in store.batches(gen.id)
                if batch.remote_id is not None
                and batch.status in TERMINAL_STATUSES
                and batch.status != "cancelled"
                and batch.id not in done_before
            )
        run.exit_code = 0
        return CancelResult(n, stopping, len(active), unconfirmed, ended)


# ---------------------------------------------------------------------------------------------


def converge(
    rec: Reconciler,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    options: ApplyOptions,
    heartbeat: Callable[[], None],
    report: Reporter,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> bool:
    """Advance every resource; with ``wait``, keep polling (backing off) until none waits;
    True if ``--timeout`` ended the wait first (``end_of_run_outcome`` says how it ended
    otherwise).

    For ``QUICK_POLL_SECONDS`` after a create, polls fall on a ``QUICK_POLL_GRID`` counted
    from the create's answer (``poll_pause``), so the ledger and records a pass writes after
    its create do not delay the first poll, and a batch that ends within seconds is collected
    no later than by a script that polls every 0.5 s from its create; then the pause is the
    interval, which grows from ``FIRST_POLL_INTERVAL`` to ``poll_interval``. A create opens a
    grid only ``QUICK_POLL_SECONDS`` plus ``poll_interval`` after the last one opened: a run
    that keeps creating (a queue of shards behind ``maxInFlightBatches``, each pass creating
    one more) would otherwise poll every batch in flight on the grid for as long as it runs.
    A pause is never longer than the interval, and shorter when a polled batch's request
    counts, at the pace they moved since it was last seen, say it will be done sooner (never
    below ``SHORTEST_POLL_PAUSE``): a batch that ends just after one poll is collected then,
    not a whole interval later."""
    deadline = None if options.timeout is None else clock() + options.timeout
    if options.timeout is not None:  # the provider calls' own clock
        rec.deadline = time.monotonic() + options.timeout
    interval = min(FIRST_POLL_INTERVAL, options.poll_interval)
    grid_from: float | None = None  # when the create that opened the last grid was answered
    answered = False  # a pass of this run ended well: the providers' set-up is right
    while True:
        polled_at = clock()  # a pass sends its polls first (``prefetch``)
        try:
            waiting = rec.advance_all(resources, facts)
        except ProviderError as err:
            heartbeat()
            if isinstance(err, DeadlineReached):
                return True  # a call under way when --timeout ran out
            if not _outage_to_wait_out(err, options, answered):
                raise
            if deadline is not None and clock() + interval > deadline:
                return True
            report(Progress("warning", None, outage_message(err, interval, options.timeout)))
            sleep(interval)
            interval = min(interval * 1.5, options.poll_interval)
            continue
        answered = True
        heartbeat()
        if not waiting or not options.wait:
            break
        since_create = rec.seconds_since_create()
        if since_create is not None:
            created_at = clock() - since_create
            if grid_from is None or created_at - grid_from >= QUICK_POLL_SECONDS + (
                options.poll_interval
            ):
                grid_from = created_at  # opens a grid
            since_create = clock() - grid_from  # a later create keeps to the open grid
        since_poll = clock() - polled_at
        pause = poll_pause(interval, since_create, rec.expected_done_in(), since_poll)
        if deadline is not None and clock() + pause > deadline:
            return True
        if pause >= 0.0005:  # a pass that ran past its grid point polls at once: no wait
            report(
                Progress(
                    "wait",
                    None,
                    wait_message(pause, len(waiting)),
                    {"resources": [r.name for r in waiting]},
                )
            )
            sleep(pause)
        if not polls_quickly(since_create, since_poll):  # backs off once the grid is over
            interval = min(interval * 1.5, options.poll_interval)
    rec.report_retired_stopping(resources)
    return False


def end_of_run_outcome(
    rec: Reconciler,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    disk_look: DiskLook | None = None,
) -> str:
    """How a run whose passes ended (not timed out) ends, from a plan of the state it left.
    Reads only: inside the caller's ``reading()`` block, a few queries, not a few per
    resource; ``disk_look``: what it saw of the result files, kept for the caller's
    statuses (``DiskLook``)."""
    with rec.store.reading():
        plan = compute_plan(
            rec.store,
            resources,
            facts,
            include_orphans=False,
            backoff=rec.requeue_backoff,
            requests=lambda r: rec.ctx.request_facts(r, facts[r.name].sha256),
            disk_hashes=rec.ctx.disk_hashes,
            disk_look=disk_look,
        )
        gens = [rec.store.find_generation(r.name, r.spec_hash) for r in resources if not r.suspend]
    if not rec.allow_replace and any(a.kind is ActionKind.REPLACE for a in plan.actions):
        return "replace_refused"  # exit 1: CI must not pass with the old spec still running
    if rec.not_collected():
        return "not_collected"  # exit 1: a finished batch's results are not in yet
    if any(a.kind is not ActionKind.NONE for a in plan.actions):
        return "in_progress"
    if any(g is not None and g.status == "degraded" for g in gens):
        return "degraded"
    return "converged"


def _lock_wait(options: ApplyOptions) -> float:
    """How long to wait for another run's lock: ``--lock-timeout``, bounded under ``--wait``
    by ``--timeout``, which bounds the whole run (a CI step's ``--timeout 3600`` beside
    ``BATCHSPEC_LOCK_TIMEOUT=300`` ran up to 3,900 s)."""
    if options.wait and options.timeout is not None:
        return min(options.lock_timeout, options.timeout)
    return options.lock_timeout


def _less_lock_wait(options: ApplyOptions, waited: float) -> ApplyOptions:
    """``options`` with what the wait for a lock took off ``--timeout``."""
    if options.timeout is None or waited <= 0:
        return options
    return replace(options, timeout=max(options.timeout - waited, 0.0))


def _outage_to_wait_out(err: ProviderError, options: ApplyOptions, answered: bool) -> bool:
    """Whether ``apply --wait`` waits out a pass that failed because a provider is down
    (unreachable, or its gateway answering 502/503/504 through all the call's retries) or
    throttling (429 through all of them: the account's rate limit, the call not acted on): a
    blip must not end a long wait in CI. Only once a pass of this run has gone well, or with
    an explicit ``--timeout`` bounding the wait: a provider down from the first call (a
    wrong base URL) otherwise fails at once, as without ``--wait``."""
    unavailable = err.provider_down or err.rate_limited
    return options.wait and unavailable and (answered or options.timeout is not None)


def outage_message(err: ProviderError, pause: float, timeout: float | None) -> str:
    until = "until --timeout" if timeout is not None else "until it answers; Ctrl-C stops"
    text = str(err)
    joint = " " if text.endswith((".", "!", "?")) else "; "  # never "backoff.; `apply"
    return f"{text}{joint}`apply --wait` tries again in {pause:.1f}s ({until})"


def wait_message(pause: float, resources: int) -> str:
    """The line a wait between passes prints; under 0.1 s (the quick-poll grid) in ms, so it
    never reads "0.0s"."""
    shown = f"{pause * 1000:.0f} ms" if pause < 0.1 else f"{pause:.1f}s"
    return f"waiting {shown} for {resources} resource(s)"


def poll_pause(
    interval: float,
    since_create: float | None,
    done_in: float | None,
    since_poll: float = 0.0,
) -> float:
    """The pause before the next poll (see ``converge``).

    ``since_create``: seconds since the run's last create was answered (None: none yet);
    ``since_poll``: seconds since the last pass sent its polls. Polls sent before the create,
    or within ``QUICK_POLL_SECONDS`` after it, are followed by one at the next point of the
    ``QUICK_POLL_GRID`` counted from the create (at once if the pass ran past it); later
    ones by ``interval``. Either is shortened to when a batch should be done (``done_in``),
    but not below ``SHORTEST_POLL_PAUSE`` for that, and is never longer than ``interval``."""
    pause = interval
    if since_create is not None and polls_quickly(since_create, since_poll):
        polled = since_create - since_poll  # on the create's clock: < 0 before the create
        # a poll that lands on a grid point (give or take float error) counts as on it
        step = 1 if polled < 0 else math.floor(polled / QUICK_POLL_GRID + 1e-6) + 1
        pause = max(0.0, step * QUICK_POLL_GRID - since_create)
    if done_in is not None:
        pause = min(pause, max(SHORTEST_POLL_PAUSE, done_in))
    return min(pause, interval)


def polls_quickly(since_create: float | None, since_poll: float) -> bool:
    """Whether the last polls went out before the run's last create, or within
    ``QUICK_POLL_SECONDS`` after it: the next one is due on the ``QUICK_POLL_GRID``."""
    return since_create is not None and since_create - since_poll < QUICK_POLL_SECONDS


def _exit_code(outcome: str) -> int:
    """The exit code of an apply's outcome (picked by ``converge``, and by
    ``apply_workspace`` at the timeout: a resource already Degraded (4) outranks ``--timeout``
    reached (5), since it failed for good and no longer wait fixes it; the timeout still
    outranks a file not collected, which the next apply collects; docs/exit-codes.md)."""
    codes = {
        "converged": 0,
        "in_progress": 0,
        "replace_refused": 1,
        "not_collected": 1,
        "degraded": 4,
        "timeout": 5,
    }
    return codes[outcome]


def _warn_if_new_state(
    ws: Workspace, store: StateStore, state_path: str | None, report: Reporter
) -> None:
    """A state named by ``--state`` / ``BATCHSPEC_STATE`` (an SQLite file) that records no
    resource yet: a mistyped path would otherwise start over unnoticed (a ``plan`` run there
    first has already created the file, so its existence proves nothing)."""
    for warning in new_state_warnings(ws, store, state_path, command="apply"):
        report(Progress("warning", None, warning))


def new_state_warnings(
    ws: Workspace, store: StateStore, state_path: str | None, *, command: str = "plan"
) -> list[str]:
    """The warning of ``_warn_if_new_state``, for ``command`` (``plan`` gave none: it showed
    every resource as new for a mistyped --state; it creates no file there any more)."""
    if state_path is None or ws.project.shared_state:
        return []
    if store.list_resources(include_forgotten=True):
        return []
    starts = (
        "this apply starts it" if command == "apply" else "this plan shows every resource as new"
    )
    if command == "plan" and not ws.project.has_state():
        starts = f"no state database is there (plan creates none); {starts.removeprefix('this ')}"
    return [
        f"the state at {ws.project.state_path} records nothing yet: {starts} (if you meant "
        "an existing state, stop and check --state or BATCHSPEC_STATE)"
    ]


def compute_plan(
    store: StateStore,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    *,
    prune: bool = False,
    include_orphans: bool = True,
    elsewhere: AbstractSet[str] | None = frozenset(),
    orphan_selected: Callable[[RecordedResource], bool] | None = None,
    replacing: AbstractSet[str] = frozenset(),
    readded: Mapping[str, int] | None = None,
    reuse: bool = True,
    backoff: float = DEFAULT_REQUEUE_BACKOFF,
    requests: RequestFacts,
    hold_for: Callable[[str], float] = lambda provider: DEFAULT_REPLACE_HOLD_SECONDS,
    disk_hashes: DiskHashes | None = None,
    disk_look: DiskLook | None = None,
    checkout: Path | None = None,
    named: AbstractSet[str] = frozenset(),
    limits_for: Callable[[Resource], ShardLimits] | None = None,
) -> Plan:
    """The plan for ``resources`` (spec hashes as ``planned_resources`` gives them, with
    ``readded``); ``requests``: their inputs' request indexes (what a new generation would
    reuse); ``disk_hashes``: the run's hashes of result files (``observe_disk``);
    ``disk_look``: what of them a plan made just before saw (``DiskLook``).
    ``checkout``: the workspace's folder, whose git HEAD decides which orphans ``prune``
    leaves alone, a newer commit having declared them (``declared_elsewhere``); ``named``:
    orphans named by ``--select NAME``, pruned even so; ``limits_for``: each resource's shard
    limits, to count the shards a new generation makes (``plan`` and apply's plan say them)."""
    history = load_history(store)  # read once: the plan and each hold (``find_hold``) share it
    recorded = load_recorded(store, store.ledger(), requeue_backoff=backoff, history=history)
    recorded, moved = moved_view(store, recorded, resources)  # plan shows moves, never writes
    history = moved_history(history, moved)  # a moved resource's reuse is its old name's
    disk = observe_disk(
        [(r.name, r.output_path, r.errors_path) for r in resources],
        recorded,
        export_paths(resources),
        disk_hashes,
        disk_look,
    )
    readded = readded or {}
    desired = [
        desired_with_reuse(
            store,
            r,
            facts[r.name],
            replace=r.name in replacing,
            reuse=reuse,
            requests=requests,
            hold_for=hold_for(r.provider),
            history=history.get(r.name, ()),
            readded_after=readded.get(r.name),
            limits=limits_for(r) if limits_for else None,
        )
        for r in resources
    ]
    plan = make_plan(
        desired,
        recorded,
        disk,
        prune=prune,
        include_orphans=include_orphans,
        elsewhere=elsewhere or frozenset(),
        orphan_selected=orphan_selected,
        now=time.time(),
        declared_by=declared_elsewhere(
            store,
            checkout,
            [
                name
                for name, rec in recorded.items()
                if not rec.forgotten
                and name not in named
                and name not in {r.name for r in resources} | set(elsewhere or ())
            ]
            if checkout is not None  # without --prune too: the orphan's hint says it is held
            else [],
        ),
    )
    plan = _retries_held(
        store, _queued_as_recorded(store, plan, facts), resources, history, hold_for
    )
    return note_moves(plan, moved)


def declared_elsewhere(
    store: StateStore, checkout: Path | None, names: Sequence[str]
) -> dict[str, str]:
    """By name, the resources among ``names`` whose last declaring run (an apply's, see
    ``last_declared_at``) was on a commit newer than ``checkout``'s HEAD: another runner on
    a newer commit added them, and ``--prune`` from a checkout behind it must not undo that.

    For a resource last declared by commit X, the checkout being at H (first match wins):

    * X is H or one of its ancestors: pruned.
    * H is one of X's ancestors (the checkout is behind): held.
    * otherwise (diverged: another branch, a squash merge; X not in this repository: a
      shallow clone, another clone's; git cannot tell): held when both commits' times are
      known and X's is later than H's, else pruned.

    X's time is the one its run recorded (``runs.git_commit_time``), H's git's. Without git,
    or a run that recorded no commit, nothing is held (pruned as before). One git process
    tells H, then one per distinct X (orphans often share one).
    """
    head = head_commit(checkout) if checkout is not None and names else None
    if checkout is None or head is None:
        return {}
    held: dict[str, str] = {}
    relations: dict[str, CommitRelation | None] = {}
    for name in names:
        declared = store.last_declared_at(name)
        if declared is None:
            continue
        commit, commit_time = declared
        if commit not in relations:
            relations[commit] = commit_relation(checkout, commit, head.commit)
        relation = relations[commit]
        if relation is CommitRelation.AHEAD or (
            relation is not CommitRelation.CONTAINED
            and commit_time is not None
            and head.time is not None
            and commit_time > head.time
        ):
            held[name] = commit
    return held


def _retries_held(
    store: StateStore,
    plan: Plan,
    resources: Sequence[Resource],
    history: Mapping[str, History],
    hold_for: Callable[[str], float],
) -> Plan:
    """The plan with each retry that waits for a retired generation still stopping saying
    so, as a held create does (``hold.find_retry_hold``: the spec of a generation put back)."""
    by_name = {r.name: r for r in resources}
    actions = []
    now = time.time()
    for action in plan.actions:
        res = by_name.get(action.resource)
        if action.kind is ActionKind.RETRY and res is not None:
            hold = find_retry_hold(
                store, res, history.get(res.name, ()), hold_for=hold_for(res.provider), now=now
            )
            if hold is not None and not hold.expired:
                action = dataclasses.replace(
                    action,
                    reason=f"{action.reason}; waits for generation {hold.generation_id} to "
                    "stop first (its answers are reused): apply retries once that has ended, "
                    "or after replaceHoldSeconds",
                )
        actions.append(action)
    return dataclasses.replace(plan, actions=tuple(actions))


def _queued_as_recorded(store: StateStore, plan: Plan, facts: Mapping[str, InputReport]) -> Plan:
    """The plan with each create of intents already recorded estimated from what they
    recorded (the bytes of their own requests), not from the input's average request: a
    small shard queued behind a large one is small (the budget checks count the same)."""
    actions = []
    for action in plan.actions:
        queued = _sent_and_queued(store, action)[1] if action.kind is ActionKind.CREATE else []
        if queued and action.resource in facts:
            carried = sent_by(store, facts[action.resource], queued)
            tokens = estimate_input_tokens(carried.bytes)
            action = dataclasses.replace(action, estimated_input_tokens=tokens)
        actions.append(action)
    return dataclasses.replace(plan, actions=tuple(actions))


def planned_resources(
    store: StateStore, resources: Sequence[Resource], replace: Sequence[str], *, reuse: bool
) -> tuple[list[Resource], dict[str, int]]:
    """``resources`` with their effective spec hashes, and the next replacement's for every
    name in ``replace`` and every one added again after ``apply --prune`` cancelled its
    generation (keeping answers); and, by name, the generation each of those re-added ones
    had (see batchspec.core.replacements)."""
    planned, readded = with_readded(store, effective_resources(store, resources))
    for name in replace:  # `--replace NAME` says how: a replace, reusing as asked
        readded.pop(name, None)
    planned = [next_replacement(store, r, reuse=reuse) if r.name in replace else r for r in planned]
    return planned, readded


def desired_with_reuse(
    store: StateStore,
    res: Resource,
    facts: InputReport,
    *,
    replace: bool,
    reuse: bool,
    requests: RequestFacts,
    history: History,
    hold_for: float = DEFAULT_REPLACE_HOLD_SECONDS,
    readded_after: int | None = None,
    limits: ShardLimits | None = None,
) -> DesiredResource:
    """The planner's view of ``res``, with the answers a new generation of it would reuse:
    counted as ``RequestLedger.carry_over`` keeps them when apply records its ledger; and
    the retired generation still stopping its create would wait for (``reconcile.hold``);
    ``history``: ``res``'s generations and batches as the plan read them;
    ``readded_after``: as ``planned_resources`` gives it; ``limits``: the resource's shard
    limits, to count the shards a new generation would make (else it says 1).

    Made with one ``dataclasses.replace`` (three cost a plan of 1,000 resources ~13 ms)."""
    want = desired_resource(res, facts)
    given: dict[str, Any] = {"replace": replace, "readded_after": readded_after}
    # from ``history``, not the store: a move still to apply records it under the new name
    gen = next((g for g, _ in history if g.spec_hash == res.spec_hash), None)
    if gen is not None and (not reuses_answers(gen) or store.ledger().has_requests(gen.id)):
        return dataclasses.replace(want, **given)  # no ledger to record, or nothing to carry
    if gen is None and replace and not reuse:
        shards = _shards(res, want.requests, want.input_bytes, limits, lambda: requests(res))
        return dataclasses.replace(want, **given, shards=shards)
    exclude, generations = (gen.id,) if gen else (), [g for g, _ in history]
    count, nbytes = reusable_answers(
        store, res, exclude=exclude, requests=requests, generations=generations
    )
    shards = _shards(
        res,
        want.requests - count,
        want.input_bytes - nbytes if count else want.input_bytes,
        limits,
        lambda: unreused_requests(
            store, res, exclude=exclude, requests=requests, generations=generations
        ),
    )
    hold = find_hold(
        store,
        res,
        history,
        requests=lambda: requests(res),
        hold_for=hold_for,
        now=time.time(),
        cancelling=True,  # a replace cancels what is in flight first
    )
    return dataclasses.replace(
        want,
        **given,
        reusable=count,
        reusable_bytes=nbytes,
        shards=shards,
        held_by=hold.generation_id if hold else None,
        hold_expired=bool(hold and hold.expired),
    )


def _shards(
    res: Resource,
    requests: int,
    nbytes: int,
    limits: ShardLimits | None,
    facts: Callable[[], Iterable[RequestFact]],
) -> int:
    """The shards a new generation of ``res`` submitting ``requests`` would make (1: not
    counted, with no ``limits``)."""
    if limits is None:
        return 1
    return count_shards(requests, nbytes, limits, endpoint=res.endpoint, facts=facts)


def require_replaceable(resources: Sequence[Resource], names: Sequence[str]) -> None:
    """``--replace NAME``: NAME must be a selected resource that is not suspended."""
    known = {r.name: r for r in resources}
    for name in names:
        res = known.get(name)
        if res is None:
            raise ManifestError(
                f"--replace {name}: no resource named {name!r} among the selected manifests "
                f"({unknown_name_hint(name, known).replace('known:', 'selected:', 1)})"
            )
        if res.suspend:
            raise UsageError(
                f"--replace {name}: it is suspended in {res.source}; remove `suspend: true` "
                "to run it again"
            )


def _may_spend(saved: SavedPlan | None, replace: Sequence[str]) -> Callable[[Action], bool] | None:
    """A saved plan's spending limit; a replacement it planned is submitted as a create."""
    if saved is None:
        return None
    return lambda a: saved.may_spend(a) or (a.resource in replace and a.kind is ActionKind.CREATE)


#: asks a person to approve ``plan`` (the CLI: a prompt on the terminal), shown what each
#: spending resource may cost at most
Confirm = Callable[[Plan, Mapping[str, Estimate]], bool]


def require_consent(
    plan: Plan,
    ws: Workspace,
    options: ApplyOptions,
    confirm: Confirm | None,
    estimates: Callable[[], Mapping[str, Estimate]] = dict,
) -> None:
    """Spending or cancelling on a paid provider needs --yes or a yes on the terminal; the
    prompt is shown the spend estimate (``estimates``, worked out only when it is asked)."""
    paid, pruned = consent_needed(plan, ws)
    if not (paid or pruned) or options.yes:
        return
    if confirm is None:
        what = []
        submitting = [a for a in paid if a.requests]
        if submitting:
            what.append(
                f"submit {sum(a.requests for a in submitting)} request(s) in new batches "
                f"({name_listing(a.resource for a in submitting)})"
            )
        if cancelling := [a for a in paid if a.cancels_in_flight and not a.requests]:
            what.append(
                "cancel the batches in flight of "
                f"{name_listing(a.resource for a in cancelling)} on a paid provider"
            )
        if pruned:
            what.append(
                f"cancel and forget {name_listing(a.resource for a in pruned)} on a paid provider"
            )
        raise ConsentError(
            f"this apply would {' and '.join(what)}, and nobody can answer a prompt here "
            f"({options.no_prompt})",
            details=["run it again with --yes to approve"],
        )
    if not confirm(plan, estimates()):
        raise ConsentError("apply cancelled: nothing was submitted or cancelled")


def consent_needed(plan: Plan, ws: Workspace) -> tuple[list[Action], list[Action]]:
    """The actions ``apply`` asks consent for (``require_consent``; ``plan`` says so ahead):
    those that create or cancel batches on a paid provider, and the prunes there that
    cancel something (one with nothing in flight only forgets: it stops no paid work)."""
    # an action that keeps every answer (0 to submit) creates no batch: nothing to approve,
    # unless it cancels a generation in flight (a spec switched back to, while another runs)
    paid = [a for a in plan.spending if (a.requests or a.cancels_in_flight) and not _is_free(ws, a)]
    pruned = [
        a
        for a in plan.actions
        if a.kind is ActionKind.PRUNE and a.cancels_in_flight and not _is_free(ws, a)
    ]
    return paid, pruned


def _unmoved_inputs(
    resources: Sequence[Resource], facts: Mapping[str, InputReport]
) -> dict[str, str]:
    """The input hash of each resource that names no ``moved`` (``rename_hints``: one that
    does is a rename already, and takes one name only)."""
    return {
        r.name: facts[r.name].sha256 for r in resources if r.moved_from is None and r.name in facts
    }


def measured_outputs(
    plan: Plan,
    resources: Sequence[Resource],
    store: StateStore,
    requests: RequestFacts,
    ws: Workspace,
) -> dict[str, int]:
    """The output bound of what each spending action sends, when that is not the whole input
    (whose bound the scan summed): a retry's unresolved requests, a new generation's requests
    without a kept answer. Measured as apply measures them, budget or not: the plan and the
    consent prompt show it as "≤", and a share of the whole input's bound (its average) is
    no bound for the requests actually sent (a long essay asked without a limit among short
    answers already kept). Each line is bounded as the scan of ``ws``'s inputs bounds it."""
    by_name = {r.name: r for r in resources}
    providers, backoff = ws.project.providers, requeue_backoff(ws)
    out: dict[str, int] = {}
    now = time.time()
    for action in plan.spending:
        res = by_name.get(action.resource)
        if res is None or not action.requests:
            continue
        if action.kind is ActionKind.RETRY and action.generation_id is not None:
            gen = store.get_generation(action.generation_id)
            rec = recorded_generation(store, store.ledger(), gen, requeue_backoff=backoff)
            ready = [
                s.shard
                for s in rec.shards
                if s.unresolved
                and s.attempts_used < res.retry.max_attempts
                and (s.not_before is None or now >= s.not_before)
            ]
            bounds = output_of_unresolved(
                store.ledger(),
                gen.id,
                ready,
                res.input_path,
                requests(res),
                line_bound(res, providers),
            )
            out[res.name] = sum(bounds.values())
        elif action.reused:
            out[res.name] = output_of_unreused(
                store,
                res,
                requests(res),
                line_bound(res, providers),
                exclude=action.generation_id,
            )
    return out


def plan_estimates(
    plan: Plan,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    providers: Mapping[str, ProviderConfig],
    outputs: Mapping[str, int],
    store: StateStore,
) -> dict[str, Estimate]:
    """What each spending action may cost at most: its measured input tokens, its requests'
    output limits (``outputs``, where measured; a create of intents already recorded: what
    they recorded), priced as ``core.spend`` prices (``None``: unknown price)."""
    by_name = {r.name: r for r in resources}
    estimates = {}
    for a in plan.spending:
        if a.resource not in by_name or a.resource not in facts:
            continue
        output_tokens = outputs.get(a.resource)
        queued = _sent_and_queued(store, a)[1]
        if queued:  # what they recorded, as the budget checks count them
            output_tokens = sent_by(store, facts[a.resource], queued).output_tokens
        estimates[a.resource] = estimate_spend(
            by_name[a.resource],
            facts[a.resource],
            providers,
            requests=a.requests,
            input_tokens=a.estimated_input_tokens,
            output_tokens=output_tokens,
        )
    return estimates


def require_within_budget(
    plan: Plan,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    store: StateStore,
    providers: Mapping[str, ProviderConfig],
    outputs: Mapping[str, int],
) -> None:
    """Refuse, before anything is uploaded, a plan whose spending would exceed a budget."""
    raise_first(budget_refusals(plan, resources, facts, store, providers, outputs))


def budget_refusals(
    plan: Plan,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    store: StateStore,
    providers: Mapping[str, ProviderConfig],
    outputs: Mapping[str, int],
    outcome: str = "nothing was uploaded",
) -> list[BudgetError]:
    """Every spending action that would take its generation over budget: the same check
    apply makes before recording intents and retries, on the same counts (``outputs``:
    ``measured_outputs``); each refusal ends with ``outcome``."""
    by_name = {r.name: r for r in resources}
    refusals = []
    for action in plan.spending:
        res = by_name[action.resource]
        if res.budget is None:  # nothing to check: no events to read
            continue
        sent, queued = _sent_and_queued(store, action)
        new_output_tokens = outputs.get(res.name)
        if queued:  # intents recorded (and checked) already: their own sizes, not averages
            # (their bytes are the action's estimate already: ``_queued_as_recorded``)
            new_output_tokens = sent_by(store, facts[res.name], queued).output_tokens
        try:
            check_budget(
                res,
                facts[res.name],
                submitted=sum(b.requests for b in sent),
                new=action.requests,
                providers=providers,
                sent=sent_by(store, facts[res.name], sent),
                new_input_tokens=action.estimated_input_tokens,
                new_output_tokens=new_output_tokens,
                outcome=outcome,
            )
        except BudgetError as err:
            refusals.append(err)
    return refusals


def _sent_and_queued(store: StateStore, action: Action) -> tuple[list[BatchRow], list[BatchRow]]:
    """The batches of the action's generation that count as sent, as the retry step counts
    them (a requeued batch's requests go again: not counted twice), and, for a create, its
    intents recorded but not sent yet (``plan``: "queued: recorded, not yet submitted", or
    unconfirmed)."""
    if action.generation_id is None:
        return [], []
    batches = [b for b in store.batches(action.generation_id) if not is_requeued(b)]
    if action.kind is ActionKind.RETRY:
        return batches, []
    sent = [b for b in batches if b.remote_id is not None]
    queued = [b for b in batches if b.remote_id is None and b.status not in TERMINAL_STATUSES]
    return sent, queued


def _is_free(ws: Workspace, action: Action) -> bool:
    """Whether an action's spending needs no consent: a ``local`` engine on this machine's
    own model servers (``spend.costs_nothing``), or one whose ``pricing`` says every model
    costs nothing (another machine's GPUs); one that forwards elsewhere is paid."""
    provider = ws.project.providers.get(action.provider or "")
    if provider is None or provider.type != "local":
        return False
    free = {"input": 0, "output": 0}
    return costs_nothing(provider) or provider.pricing.get("*") == free  # your own GPUs


def _is_local(ws: Workspace, provider_name: str | None) -> bool:
    provider = ws.project.providers.get(provider_name or "")
    return provider is not None and provider.type == "local"


def apply_saved_plan(
    plan_path: str | Path,
    paths: Sequence[str],
    options: ApplyOptions,
    **kwargs: Any,
) -> ApplyResult:
    """``batchspec apply plan.json [PATHS]``: apply exactly the saved plan, or refuse it.

    The selection and ``prune`` come from the plan (giving them again is a usage error); the
    manifests are PATHS if given, else the paths the plan was made with.
    """
    if options.select or options.prune or options.replace:
        raise UsageError(
            "a saved plan fixes the selection, --prune and --replace; give them to "
            "`batchspec plan` instead"
        )
    saved = load_plan_file(plan_path)
    options = replace(
        options,
        select=saved.selection,
        prune=saved.prune,
        replace=saved.replace,
        reuse=saved.reuse,
        yes=True,
        allow_replace=True,
    )
    return apply_workspace(list(paths) or saved.manifest_paths(), options, saved=saved, **kwargs)
