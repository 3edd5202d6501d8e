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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from batchspec.budget import check_budget
from batchspec.errors import BatchspecError, ConsentError, InputError, ManifestError
from batchspec.inputcache import InputCache
from batchspec.inputs import InputReport, problem_lines
from batchspec.ledger import RequestLedger
from batchspec.lifecycle import prune_orphans
from batchspec.lock import acquire_lock
from batchspec.manifest import Resource, Workspace, load_workspace, project_for
from batchspec.manifestcache import ManifestCache
from batchspec.moves import apply_moves, moved_view, note_moves
from batchspec.plan import Action, ActionKind, Plan, make_plan
from batchspec.planfile import SavedPlan, state_lineage
from batchspec.providers.base import Provider
from batchspec.reconcile import Progress, Reconciler, Reporter, desired_resource
from batchspec.recorded import DEFAULT_REQUEUE_BACKOFF, load_recorded, observe_disk
from batchspec.runinfo import collect_run_info
from batchspec.selection import select_from_workspace
from batchspec.sharding import ShardLimits
from batchspec.state import StateStore
from batchspec.status import ResourceStatus, resource_statuses
from batchspec.yamldoc import display_path

ANTHROPIC_CUSTOM_ID = r"^[a-zA-Z0-9_-]{1,64}$"
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


@dataclass(frozen=True)
class PlanResult:
    plan: Plan
    serial: int
    spec_hashes: Mapping[str, str] = field(default_factory=dict)
    # what a saved plan (batchspec.planfile) records besides the plan itself
    lineage: str | None = None
    paths: tuple[str, ...] = ()
    selection: tuple[str, ...] = ()
    prune: bool = False


# ---------------------------------------------------------------------------------------------


@contextmanager
def open_workspace(
    paths: Sequence[str], state_path: str | None = None
) -> Iterator[tuple[Workspace, InputCache]]:
    """Load manifests through the caches beside the state database (inputs and manifests)."""
    project = project_for(paths, state_path=state_path)
    cache_db = project.state_path.parent / "input-cache.db"
    with InputCache(cache_db) as cache:
        with ManifestCache(cache_db, project) as manifests:
            ws = load_workspace(
                paths,
                hash_input=cache.sha256,
                manifest_cache=manifests,
                state_path=state_path,
            )
        yield ws, cache


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
        StateStore.open(ws.project.state_path) as store,
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
    spend only as it says (see batchspec.planfile).
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
        StateStore.open(ws.project.state_path) as store,
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
        StateStore.open(ws.project.state_path) as store,
        recorded_run(store, ws, "cancel", {"name": name}) as run,
    ):
        if store.get_resource(name) is None:
            raise ManifestError(
                f"no resource named {name!r} is recorded in {ws.project.state_path}"
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
    recorded = load_recorded(store, RequestLedger(store.db), requeue_backoff=backoff)
    recorded, moved = moved_view(store, recorded, resources)  # plan shows moves, never writes
    disk = observe_disk([(r.name, r.output_path, r.errors_path) for r in resources], recorded)
    desired = [desired_resource(r, facts[r.name]) for r in resources]
    plan = make_plan(
        desired, recorded, disk, prune=prune, include_orphans=include_orphans, now=time.time()
    )
    return note_moves(plan, moved)


def select_resources(ws: Workspace, select: Sequence[str]) -> list[Resource]:
    """``--select`` NAME / KEY=VALUE / state:modified, as a union (see batchspec.selection)."""
    return select_from_workspace(ws, select, requeue_backoff=requeue_backoff(ws))


def validate_inputs(
    ws: Workspace, resources: Sequence[Resource], cache: InputCache
) -> dict[str, InputReport]:
    """Validate every selected input before anything else happens; fail listing them all."""
    facts: dict[str, InputReport] = {}
    failures: list[BatchspecError] = []
    for res in resources:
        kind = (
            ws.project.providers[res.provider].type
            if res.provider in ws.project.providers
            else None
        )
        try:
            report = cache.facts_for(
                res.input_path,
                endpoint=res.endpoint,
                model=res.model,
                custom_id_pattern=ANTHROPIC_CUSTOM_ID if kind == "anthropic" else None,
                allow_unversioned_url=kind == "azure",
                dialect="anthropic" if kind == "anthropic" else "openai",
            )
        except BatchspecError as err:
            failures.append(err)
            continue
        if report.ok:
            facts[res.name] = report
        else:
            # imported here: it brings in the templates and Jinja2, which `plan` rarely needs
            from batchspec.validate import rows_problem_lines

            failures.append(
                InputError(
                    f"{display_path(res.input_source or res.input_path)}: "
                    f"{report.problem_count} problem(s) in the input of {res.name}",
                    details=rows_problem_lines(report, res)
                    if res.input_source
                    else problem_lines(report, shown_path=display_path(res.input_path)),
                )
            )
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise type(failures[0])(
            f"{len(failures)} batch inputs are invalid; nothing was uploaded",
            details=[line for err in failures for line in [err.message, *err.details]],
        )
    return facts


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


def provider_option(ws: Workspace, name: str, key: str) -> Any:
    config = ws.project.providers.get(name)
    return config.options.get(key) if config is not None else None


def requeue_backoff(ws: Workspace) -> float:
    """The project's requeue backoff (the smallest any provider sets), else the default."""
    values = [
        float(p.options["requeueBackoffSeconds"])
        for p in ws.project.providers.values()
        if p.options.get("requeueBackoffSeconds") is not None
    ]
    return min(values) if values else DEFAULT_REQUEUE_BACKOFF


def _is_free(ws: Workspace, action: Action) -> bool:
    provider = ws.project.providers.get(action.provider or "")
    return provider is not None and provider.type == "local"


def shard_limits(ws: Workspace, res: Resource) -> ShardLimits:
    """Manifest ``limits`` over the provider's options over the provider type's defaults."""
    provider = ws.project.providers.get(res.provider)
    options = provider.options if provider else {}
    # Azure takes 100,000 requests per file; Anthropic 100,000 inline requests per batch
    wide = provider is not None and provider.type in ("azure", "anthropic")
    default_requests = 100_000 if wide else 50_000
    base = ShardLimits(
        max_requests=int(options.get("maxRequestsPerBatch") or default_requests),
        max_bytes=int(options.get("maxBytesPerBatch") or 200 * 1024 * 1024),
    )
    lim = res.limits
    # a manifest may lower the provider's limits, never raise them: the provider would refuse
    return ShardLimits(
        max_requests=min(lim.max_requests_per_batch or base.max_requests, base.max_requests),
        max_bytes=min(lim.max_bytes_per_batch or base.max_bytes, base.max_bytes),
        max_embedding_inputs=min(
            lim.max_embedding_inputs_per_batch or base.max_embedding_inputs,
            base.max_embedding_inputs,
        ),
    )


class ProviderPool:
    """Builds each provider on first use (so a missing key only matters when it is needed)."""

    def __init__(self, ws: Workspace, env: Mapping[str, str]) -> None:
        self.ws = ws
        self.env = env
        self.built: dict[str, Provider] = {}

    def get(self, name: str) -> Provider:
        if name not in self.built:
            config = self.ws.project.providers.get(name)
            if config is None:
                where = self.ws.project.file or "batchspec.yaml"
                raise ManifestError(f"provider {name!r} is not defined in {where}")
            # imported here: it loads httpx (and rich), ~0.15 s that `plan` never needs
            from batchspec.providers.registry import build_provider

            self.built[name] = build_provider(
                config, project_root=self.ws.project.root, env=self.env
            )
        return self.built[name]

    def __enter__(self) -> ProviderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        for provider in self.built.values():
            provider.close()


@dataclass
class RunHandle:
    id: int
    exit_code: int = 1


@contextmanager
def recorded_run(
    store: StateStore, ws: Workspace, command: str, args: Mapping[str, Any]
) -> Iterator[RunHandle]:
    """Record a run around a use case; its exit code is the failure's when one escapes."""
    run = RunHandle(store.start_run(command, args, collect_run_info(ws.project.root)))
    try:
        yield run
        if command == "plan":
            run.exit_code = 0
    except BatchspecError as err:
        run.exit_code = err.exit_code
        store.record_event(
            run.id, "error", detail={"error": type(err).__name__, "message": err.message}
        )
        raise
    except KeyboardInterrupt:
        run.exit_code = 130
        store.record_event(run.id, "interrupted", detail={})
        raise
    except Exception as err:  # an unexpected failure is still recorded, then re-raised
        store.record_event(
            run.id, "error", detail={"error": type(err).__name__, "message": str(err)}
        )
        raise
    finally:
        store.finish_run(run.id, run.exit_code)
