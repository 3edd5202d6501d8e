"""Where each resource stands, on two independent axes (as in Argo CD).

* **sync**: ``Synced`` when apply has nothing to do for it (the plan's action is ``none``),
  ``OutOfSync`` otherwise, ``Orphaned`` when its manifest is gone, ``Unknown`` when it is
  recorded but not among the manifests that loaded while one is broken (``_maybe_broken``).
* **health**: ``Pending`` (intents recorded, nothing submitted yet: no batch of the current
  generation has reached the provider, e.g. after a crash or a failed upload before its
  create), ``Progressing`` (batches in flight), ``Healthy`` (results written),
  ``Degraded`` (attempts exhausted, or nothing succeeded), ``Suspended`` (``suspend: true``
  or cancelled by a user), ``Missing`` (nothing recorded yet for the current spec; an earlier
  spec's generation, when there is one, is in ``earlier``: its answers and result files are
  still there), ``Unknown`` (an orphan: no manifest says what it should be).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from batchspec.core.plan import (
    ACTIVE_GENERATION_STATUSES,
    FINISHED_GENERATION_STATUSES,
    Action,
    ActionKind,
    DesiredResource,
    make_plan,
)
from batchspec.core.reconcile import desired_resource
from batchspec.core.reconcile.hold import find_hold, hold_seconds
from batchspec.core.recorded import (
    DiskHashes,
    DiskLook,
    History,
    export_paths,
    load_history,
    load_recorded,
    observe_disk,
)
from batchspec.core.replacements import effective_resources, with_readded
from batchspec.core.selection import desired_without_input
from batchspec.core.session import select_resources
from batchspec.core.spend import Usage, generation_usage
from batchspec.state.lock import HeldLock, held_locks
from batchspec.state.store import GenerationRow, StateStore
from batchspec.wire.inputs import InputReport
from batchspec.wire.outcomes import error_summary
from batchspec.workspace.manifest import (
    Resource,
    Workspace,
    load_workspace,
    workspace_declarations,
)
from batchspec.workspace.project import Project, ProviderConfig
from batchspec.workspace.yamldoc import InvalidManifestError, Problem

_HEALTH = {
    "pending": "Progressing",
    "in_progress": "Progressing",
    "complete": "Healthy",
    "degraded": "Degraded",
    "cancelled": "Suspended",
    "superseded": "Suspended",
}


@dataclass(frozen=True)
class BatchStatus:
    shard: int  # 1-based, as people count (and as `show` and `apply --json` say it)
    attempt: int
    remote_id: str | None
    status: str
    total: int | None
    completed: int | None
    failed: int | None


@dataclass(frozen=True)
class EarlierGeneration:
    """The generation an edited spec has not replaced yet: what its results hold."""

    id: int
    status: str
    requests: int
    succeeded: int
    failed: int


#: what ``ResourceStatus.usage`` sums: the current generation's answers only (requests it
#: carried over from an earlier generation count there, where they were paid for)
USAGE_SCOPE = "current_generation"


@dataclass(frozen=True)
class ResourceStatus:
    name: str
    sync: str
    health: str
    action: str
    reason: str
    provider: str | None
    spec_hash: str | None
    generation_status: str | None
    requests: int
    succeeded: int
    failed: int
    output: str | None
    errors: str | None
    batches: tuple[BatchStatus, ...] = ()
    #: tokens and dollars of the current generation's answers (cost_usd None: unknown price)
    usage: Usage = Usage()
    #: ``Missing`` after a spec change: the earlier spec's generation, still recorded
    earlier: EarlierGeneration | None = None
    #: the errors file's first line (``custom_id: code: message``) when requests failed
    first_error: str | None = None

    def to_json(self) -> dict[str, object]:
        # `show`'s usage sums every generation: the scope tells the two apart
        return {**asdict(self), "usage_scope": USAGE_SCOPE}


def _with_hold(
    store: StateStore,
    res: Resource,
    want: DesiredResource,
    providers: Mapping[str, ProviderConfig],
    history: History,
) -> DesiredResource:
    """``want`` with the retired generation still stopping that its next create waits for
    (``reconcile.hold``; the input is not read: any unresolved request of it counts)."""
    hold = find_hold(
        store,
        res,
        history,
        requests=None,
        hold_for=hold_seconds(providers, res.provider),
        now=time.time(),
    )
    if hold is None:
        return want
    return replace(want, held_by=hold.generation_id, hold_expired=hold.expired)


def resource_statuses(
    store: StateStore,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport] | None = None,
    *,
    include_orphans: bool = False,
    providers: Mapping[str, ProviderConfig] | None = None,
    elsewhere: AbstractSet[str] = frozenset(),
    disk_hashes: DiskHashes | None = None,
    disk_look: DiskLook | None = None,
) -> list[ResourceStatus]:
    """Each resource's status; ``providers`` (the project's) price its usage. Reads only:
    its reads of the recorded rows cost a few queries in all (``StateStore.reading``);
    ``disk_hashes``: the run's hashes of result files (``recorded.observe_disk``);
    ``disk_look``: what of them a plan made just before saw (``recorded.DiskLook``)."""
    with store.reading():
        return _resource_statuses(
            store,
            resources,
            facts,
            include_orphans=include_orphans,
            providers=providers,
            elsewhere=elsewhere,
            disk_hashes=disk_hashes,
            disk_look=disk_look,
        )


def _resource_statuses(
    store: StateStore,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport] | None,
    *,
    include_orphans: bool,
    providers: Mapping[str, ProviderConfig] | None,
    elsewhere: AbstractSet[str],
    disk_hashes: DiskHashes | None,
    disk_look: DiskLook | None,
) -> list[ResourceStatus]:
    resources = effective_resources(store, resources)  # a replacement is the current one
    resources, readded = with_readded(store, resources)  # as plan shows them: a create
    history = load_history(store)  # read once: the plan and each hold share it
    recorded = load_recorded(store, store.ledger(), history=history)
    disk = observe_disk(
        [(r.name, r.output_path, r.errors_path) for r in resources],
        recorded,
        export_paths(resources),
        disk_hashes,
        disk_look,
    )
    desired = [
        desired_resource(r, facts[r.name])
        if facts and r.name in facts
        else desired_without_input(r)
        for r in resources
    ]
    desired = [
        replace(
            _with_hold(store, r, d, providers or {}, history.get(r.name, ())),
            readded_after=readded.get(r.name),
        )
        for r, d in zip(resources, desired, strict=True)
    ]
    plan = make_plan(desired, recorded, disk, include_orphans=include_orphans, elsewhere=elsewhere)
    by_name = {r.name: r for r in resources}
    statuses = []
    for action in plan.actions:
        res = by_name.get(action.resource)
        gen = store.find_generation(res.name, res.spec_hash) if res else _last(store, action)
        if gen is None and action.kind is ActionKind.REPLACE:
            # a replace apply has not made yet: show the generation still in flight (its
            # batches, Progressing), not "Missing", as if nothing were running
            last = _last(store, action)
            gen = last if last is not None and last.status in ACTIVE_GENERATION_STATUSES else None
        status = _status(store, action.resource, action, res, gen)
        if gen is None and res is not None:
            status = replace(status, earlier=_earlier(store, action))
        if action.kind is ActionKind.COLLECT and gen is not None:
            status = _with_download_failure(store, status, gen)
        if gen is not None:
            status = replace(status, usage=generation_usage(store, gen, providers or {}))
        statuses.append(status)
    return statuses


def _with_download_failure(
    store: StateStore, status: ResourceStatus, gen: GenerationRow
) -> ResourceStatus:
    """``status`` whose reason says that downloading a finished batch's file failed, when the
    last try for a batch still to collect did (``reconcile.collect``): "to download" alone
    read as if no apply had tried, after one exited 1 over it."""
    waiting = {b.id for b in store.batches(gen.id) if b.collected_at is None}
    failures = store.events(resource=status.name, action="download-failed", limit=20)
    last = next((e for e in reversed(failures) if e.batch_id in waiting), None)
    if last is None:
        return status
    code = last.detail.get("http_status")
    how = f"with HTTP {code}" if code else "(no answer)"
    # a 401/403 is the key's (the apply stopped at once): no later apply helps until it is
    # fixed; anything else may pass on its own
    then = "fix the key, then `batchspec apply`" if code in (401, 403) else "`batchspec apply`"
    reason = (
        f"{status.reason}; the last try failed {how} at {last.at}: {then} tries again, "
        f"`batchspec show {status.name}` has the provider's error"
    )
    return replace(status, reason=reason)


def _earlier(store: StateStore, action: Action) -> EarlierGeneration | None:
    """The generation of an earlier spec a resource with none for its current spec still has
    (an edited input, say): status said "not applied yet", as of a resource never run."""
    last = _last(store, action)
    if last is None:
        return None
    succeeded, failed = answer_counts(store, last)
    return EarlierGeneration(last.id, last.status, last.requests, succeeded, failed)


def _last(store: StateStore, action: Action) -> GenerationRow | None:
    """An orphan's (or a broken manifest's) current generation as recorded: its counts and
    batches are still true, though no manifest says what the spec is now."""
    row = store.get_resource(action.resource)
    if row is None or row.current_generation_id is None:
        return None
    return store.get_generation(row.current_generation_id)


def _status(
    store: StateStore, name: str, action: Action, res: Resource | None, gen: GenerationRow | None
) -> ResourceStatus:
    row = store.get_resource(name)
    if action.kind is ActionKind.ORPHANED:
        sync, health = "Orphaned", "Unknown"
    elif row is not None and row.forgotten_at is not None:
        # `forget`: the next apply tracks it again, resuming what is recorded
        sync, health = "OutOfSync", _HEALTH.get(gen.status, "Unknown") if gen else "Missing"
    else:
        sync = "Synced" if action.kind is ActionKind.NONE else "OutOfSync"
        if res is not None and res.suspend:
            health = "Suspended"
        else:
            health = _HEALTH.get(gen.status, "Unknown") if gen else "Missing"
    counts = answer_counts(store, gen)
    batches = tuple(_batches(store, gen)) if gen else ()
    if health == "Progressing" and batches and all(_not_submitted(b) for b in batches):
        health = "Pending"
    return ResourceStatus(
        name=name,
        sync=sync,
        health=health,
        action=action.kind.value,
        reason=action.reason,
        provider=action.provider,
        spec_hash=res.spec_hash if res else None,
        generation_status=gen.status if gen else None,
        requests=gen.requests if gen else 0,
        succeeded=counts[0],
        failed=counts[1],
        output=str(res.output_path) if res else None,
        errors=str(res.errors_path) if res else None,
        batches=batches,
        first_error=first_error(res.errors_path) if res and counts[1] else None,
    )


#: how much of an errors file's first line ``first_error`` reads
_FIRST_ERROR_BYTES = 64 * 1024


def first_error(errors_path: Path) -> str | None:
    """The first line of an errors file (input order: the earliest request that failed) as
    ``custom_id: code: message``, so a Degraded resource says why without opening the file;
    None when the file is missing, unreadable, or its first line is not a JSON object."""
    try:
        with open(errors_path, "rb") as f:
            first = f.readline(_FIRST_ERROR_BYTES)
        line = json.loads(first)
    except (OSError, ValueError):
        return None
    return error_summary(line) if isinstance(line, dict) else None


def _not_submitted(batch: BatchStatus) -> bool:
    """A batch recorded as an intent whose create was never sent: no remote id, and not
    ``creating`` (a create sent whose answer was lost may have made a batch)."""
    return batch.remote_id is None and batch.status == "pending"


def answer_counts(store: StateStore, gen: GenerationRow | None) -> tuple[int, int]:
    """``(succeeded, failed)`` of a generation: as written to its result files once finished;
    before that, the answers its ledger holds, including those carried over from an earlier
    generation (they are answers in hand, not requests to send)."""
    if gen is None:
        return 0, 0
    if gen.status in FINISHED_GENERATION_STATUSES:
        return gen.succeeded, gen.failed
    states = store.ledger().state_counts(gen.id)
    return max(states.get("ok", 0), gen.succeeded), max(states.get("failed", 0), gen.failed)


def _batches(store: StateStore, gen: GenerationRow) -> Iterable[BatchStatus]:
    for b in store.batches(gen.id):
        yield BatchStatus(
            b.shard + 1, b.attempt, b.remote_id, b.status, b.total, b.completed, b.failed
        )


@dataclass(frozen=True)
class StatusReport:
    """``batchspec status``: each resource's status, and the manifest problems passed over."""

    resources: tuple[ResourceStatus, ...]
    #: problems of manifests that did not load; their resources are not (fully) shown
    skipped: tuple[Problem, ...] = ()
    #: the locks held now by runs, per resource (``*``: the whole workspace)
    locks: tuple[HeldLock, ...] = ()
    #: how many resources the workspace declares outside PATHS (none shown: a run from a
    #: folder without manifests is told where they are, not "No resources.")
    declared_elsewhere: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "resources": [s.to_json() for s in self.resources],
            "locks": [lock.to_json() for lock in self.locks],
        }


def workspace_status(
    paths: Sequence[str], *, select: Sequence[str] = (), state_path: str | None = None
) -> StatusReport:
    """``batchspec status``: read-only; takes no lock and contacts no provider.

    A broken manifest does not hide the rest: the resources that loaded are shown from the
    state, and the problems come back in ``skipped`` (for a warning). A resource recorded in
    the state but absent from the manifests that loaded is then ``Unknown``, not Orphaned:
    its manifest may be one of the broken ones. Selecting a resource by a name that did not
    load raises the problems (that resource is needed).
    """
    ws = load_workspace(paths, state_path=state_path, tolerate_broken=True)
    if ws.problems:
        require_loaded(ws, [s for s in select if is_name_selector(s)])
    resources = select_resources(ws, select)
    declared = None if select else _declared_in_workspace(ws, paths)
    elsewhere = None if declared is None else declared[0] | declared[1]
    with read_only_store(ws.project) as store:
        statuses = resource_statuses(
            store,
            resources,
            include_orphans=not select,
            providers=ws.project.providers,
            elsewhere=elsewhere or frozenset(),
        )
        locks = tuple(held_locks(store))
    if ws.problems or elsewhere is None:
        statuses = [_maybe_broken(s) for s in statuses]
    # resources, not the moved.from names among them, and only those PATHS left out
    outside = len(declared[0] - {r.name for r in ws.resources}) if declared else 0
    return StatusReport(tuple(statuses), ws.problems, locks, outside)


def _declared_in_workspace(
    ws: Workspace, paths: Sequence[str]
) -> tuple[frozenset[str], frozenset[str]] | None:
    """The names and ``moved.from`` names the whole workspace declares when PATHS read only
    part of it (none is an orphan: its manifest is not gone), both empty when PATHS read it
    all; None when a manifest cannot be read (then nobody can tell)."""
    root = ws.project.root.resolve()
    if any(Path(p).is_dir() and Path(p).resolve() == root for p in (paths or ["."])):
        return frozenset(), frozenset()  # the whole workspace is loaded already
    try:
        return workspace_declarations(ws.project)
    except InvalidManifestError:
        return None


def is_name_selector(selector: str) -> bool:
    """A selector that names one resource (not ``KEY=VALUE``, not ``state:...``)."""
    return "=" not in selector and not selector.startswith("state:")


def require_loaded(ws: Workspace, names: Sequence[str]) -> None:
    """Raise the workspace's problems if any of ``names`` is not among the loaded resources."""
    loaded = {r.name for r in ws.resources}
    if ws.problems and any(name not in loaded for name in names):
        raise InvalidManifestError(ws.problems)


def _maybe_broken(status: ResourceStatus) -> ResourceStatus:
    if status.sync != "Orphaned":
        return status
    reason = "not in the manifests that loaded: its manifest may be one with problems"
    return replace(status, sync="Unknown", reason=reason)


@contextmanager
def read_only_store(project: Project) -> Iterator[StateStore]:
    """The state store if there is one; else an empty throwaway one (status creates nothing)."""
    if project.has_state():
        with StateStore.open(project.state) as store:
            yield store
        return
    with tempfile.TemporaryDirectory() as empty, StateStore.open(Path(empty) / "none.db") as store:
        yield store
