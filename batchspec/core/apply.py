"""The use cases that read or change state: ``plan``, ``apply``, ``cancel``.

Each one loads the workspace, opens the state store, records a *run* (command, arguments,
who, where, which git commit) and, when it writes, holds the lock for its whole duration.
Bad input fails here, before any provider is contacted: every selected resource's input is
validated first, and nothing is uploaded unless all of them pass (DESIGN invariant 5).

``apply`` needs consent to spend: a plan that creates batches on a paid provider runs only
with ``yes=True`` or when ``confirm(plan)`` (the CLI asks on a terminal) says so. The local
engine costs nothing and needs no consent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from batchspec.core.budget import check_budget
from batchspec.core.lifecycle import prune_orphans
from batchspec.core.moves import apply_moves, moved_view, note_moves
from batchspec.core.plan import Action, ActionKind, Plan, make_plan
from batchspec.core.planfile import PlanResult, SavedPlan, load_plan_file, state_lineage
from batchspec.core.reconcile import Reconciler, desired_resource
from batchspec.core.recorded import DEFAULT_REQUEUE_BACKOFF, load_recorded, observe_disk
from batchspec.core.reporting import Progress, Reporter
from batchspec.core.session import (
    ProviderPool,
    open_workspace,
    provider_option,
    recorded_run,
    requeue_backoff,
    select_resources,
    shard_limits,
    validate_inputs,
)
from batchspec.core.status import ResourceStatus, resource_statuses
from batchspec.errors import ConsentError, ManifestError, UsageError
from batchspec.state.lock import acquire_lock
from batchspec.state.runinfo import collect_run_info
from batchspec.state.store import StateStore
from batchspec.wire.inputs import InputReport
from batchspec.workspace.manifest import Resource, Workspace, load_workspace

FIRST_POLL_INTERVAL = 0.5


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


@dataclass(frozen=True)
class ApplyResult:
    run_id: int
    plan: Plan
    statuses: tuple[ResourceStatus, ...]
    outcome: str  # converged | in_progress | degraded | timeout
    exit_code: int


# ---------------------------------------------------------------------------------------------


def plan_workspace(
    paths: Sequence[str],
    *,
    select: Sequence[str] = (),
    prune: bool = False,
    state_path: str | None = None,
) -> PlanResult:
    """``batchspec plan``: what apply would do, with no network and no lock."""
    with open_workspace(paths, state_path) as (ws, cache):
        resources = select_resources(ws, select)
        facts = validate_inputs(ws, resources, cache)
    with (
        StateStore.open(ws.project.state) as store,
        recorded_run(store, ws, "plan", {"paths": list(paths), "select": list(select)}),
    ):
        plan = compute_plan(
            store,
            resources,
            facts,
            prune=prune,
            include_orphans=not select,
            backoff=requeue_backoff(ws),
        )
        return PlanResult(
            plan=plan,
            serial=store.serial(),
            spec_hashes={r.name: r.spec_hash for r in resources},
            lineage=state_lineage(store),
            paths=tuple(paths),
            selection=tuple(select),
            prune=prune,
        )


def apply_workspace(
    paths: Sequence[str],
    options: ApplyOptions,
    *,
    confirm: Callable[[Plan], bool] | None = None,
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
        resources = select_resources(ws, options.select)
        facts = validate_inputs(ws, resources, cache)
    args = {
        "paths": list(paths),
        "select": list(options.select),
        "wait": options.wait,
        "yes": options.yes,
        **({"plan_file": str(saved.source)} if saved is not None else {}),
        **({"prune": True} if options.prune else {}),
    }
    with (
        StateStore.open(ws.project.state) as store,
        recorded_run(store, ws, "apply", args) as run,
    ):
        info = collect_run_info(ws.project.root, env)
        with acquire_lock(store, command="apply", info=info, timeout=options.lock_timeout) as lock:
            if lock.warning:
                report(Progress("warning", None, lock.warning))
            plan = compute_plan(
                store,
                resources,
                facts,
                prune=options.prune,
                include_orphans=not options.select,
                backoff=requeue_backoff(ws),
            )
            if saved is not None:
                saved.require_current(store, resources, plan)
            report(Progress("plan", None, "plan computed", plan=plan))
            require_within_budget(plan, resources, facts, store)
            require_consent(plan, ws, options, confirm)
            apply_moves(store, resources, run.id, report)  # after the plan checks: they saw it
            with ProviderPool(ws, env) as providers:
                # build every provider the plan spends on first: a missing API key fails
                # here, before anything is recorded for it
                for action in plan.spending:
                    providers.get(action.provider or "")
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
                    may_spend=saved.may_spend if saved is not None else None,
                    still_holds_lock=lock.heartbeat,
                )
                prune_orphans(rec, plan)
                outcome = converge(
                    rec, resources, facts, options, lock.heartbeat, report, sleep, clock
                )
            statuses = tuple(resource_statuses(store, resources, facts))
        result = ApplyResult(run.id, plan, statuses, outcome, _exit_code(outcome))
        run.exit_code = result.exit_code
        return result


def cancel_resource(
    paths: Sequence[str],
    name: str,
    *,
    lock_timeout: float = 0.0,
    report: Reporter = lambda p: None,
    env: Mapping[str, str] = os.environ,
    state_path: str | None = None,
) -> int:
    """``batchspec cancel NAME``: cancel a resource's in-flight batches; return how many."""
    ws = load_workspace(paths, state_path=state_path)
    with (
        StateStore.open(ws.project.state) as store,
        recorded_run(store, ws, "cancel", {"name": name}) as run,
    ):
        if store.get_resource(name) is None:
            raise ManifestError(
                f"no resource named {name!r} is recorded in {ws.project.state_label}"
            )
        info = collect_run_info(ws.project.root, env)
        with (
            acquire_lock(store, command="cancel", info=info, timeout=lock_timeout),
            ProviderPool(ws, env) as providers,
        ):
            rec = Reconciler(ws.project, store, run.id, providers.get, report)
            n = rec.cancel(name)
        run.exit_code = 0
        return n


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
) -> str:
    """Advance every resource; with ``wait``, keep polling (backing off) until none waits."""
    deadline = None if options.timeout is None else clock() + options.timeout
    interval = min(FIRST_POLL_INTERVAL, options.poll_interval)
    while True:
        waiting = [r for r in resources if rec.advance(r, facts[r.name]).waiting]
        heartbeat()
        if not waiting or not options.wait:
            break
        if deadline is not None and clock() + interval > deadline:
            return "timeout"
        report(
            Progress(
                "wait",
                None,
                f"waiting {interval:.1f}s for {len(waiting)} resource(s)",
                {"resources": [r.name for r in waiting]},
            )
        )
        sleep(interval)
        interval = min(interval * 1.5, options.poll_interval)
    plan = compute_plan(
        rec.store, resources, facts, include_orphans=False, backoff=rec.requeue_backoff
    )
    if any(a.kind is not ActionKind.NONE for a in plan.actions):
        return "in_progress"
    gens = [rec.store.find_generation(r.name, r.spec_hash) for r in resources if not r.suspend]
    if any(g is not None and g.status == "degraded" for g in gens):
        return "degraded"
    return "converged"


def _exit_code(outcome: str) -> int:
    return {"converged": 0, "in_progress": 0, "degraded": 4, "timeout": 5}[outcome]


def compute_plan(
    store: StateStore,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    *,
    prune: bool = False,
    include_orphans: bool = True,
    backoff: float = DEFAULT_REQUEUE_BACKOFF,
) -> Plan:
    recorded = load_recorded(store, store.ledger(), requeue_backoff=backoff)
    recorded, moved = moved_view(store, recorded, resources)  # plan shows moves, never writes
    disk = observe_disk([(r.name, r.output_path, r.errors_path) for r in resources], recorded)
    desired = [desired_resource(r, facts[r.name]) for r in resources]
    plan = make_plan(
        desired, recorded, disk, prune=prune, include_orphans=include_orphans, now=time.time()
    )
    return note_moves(plan, moved)


def require_consent(
    plan: Plan, ws: Workspace, options: ApplyOptions, confirm: Callable[[Plan], bool] | None
) -> None:
    paid = [a for a in plan.spending if not _is_free(ws, a)]
    if not paid or options.yes:
        return
    if confirm is None:
        raise ConsentError(
            f"this apply would submit {sum(a.requests for a in paid)} request(s) in new batches "
            f"({', '.join(sorted({a.resource for a in paid}))}) and there is no terminal to ask on",
            details=["re-run with --yes to approve spending"],
        )
    if not confirm(plan):
        raise ConsentError("apply cancelled: nothing was submitted")


def require_within_budget(
    plan: Plan, resources: Sequence[Resource], facts: Mapping[str, InputReport], store: StateStore
) -> None:
    """Refuse, before anything is uploaded, a plan whose spending would exceed a budget."""
    by_name = {r.name: r for r in resources}
    for action in plan.spending:
        res = by_name[action.resource]
        if action.kind is not ActionKind.RETRY and store.generations(res.name):
            continue  # unchanged requests may reuse results: checked exactly before upload
        submitted = 0
        if action.generation_id is not None:
            submitted = sum(
                b.requests for b in store.batches(action.generation_id) if b.remote_id is not None
            )
        check_budget(res, facts[res.name], submitted=submitted, new=action.requests)


def _is_free(ws: Workspace, action: Action) -> bool:
    provider = ws.project.providers.get(action.provider or "")
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
    if options.select or options.prune:
        raise UsageError(
            "a saved plan fixes the selection and --prune; give them to `batchspec plan` instead"
        )
    saved = load_plan_file(plan_path)
    options = replace(
        options, select=saved.selection, prune=saved.prune, yes=True, allow_replace=True
    )
    return apply_workspace(list(paths) or list(saved.paths), options, saved=saved, **kwargs)
