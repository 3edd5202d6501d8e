"""Where each resource stands, on two independent axes (as in Argo CD).

* **sync**: ``Synced`` when apply has nothing to do for it (the plan's action is ``none``),
  ``OutOfSync`` otherwise, ``Orphaned`` when its manifest is gone.
* **health**: ``Progressing`` (batches pending or in flight), ``Healthy`` (results written),
  ``Degraded`` (attempts exhausted, or nothing succeeded), ``Suspended`` (``suspend: true``
  or cancelled by a user), ``Missing`` (nothing recorded yet).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from batchspec.core.plan import Action, ActionKind, make_plan
from batchspec.core.reconcile import desired_resource
from batchspec.core.recorded import load_recorded, observe_disk
from batchspec.core.selection import desired_without_input
from batchspec.core.session import select_resources
from batchspec.state.store import GenerationRow, StateStore
from batchspec.wire.inputs import InputReport
from batchspec.workspace.manifest import Resource, load_workspace
from batchspec.workspace.project import Project

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
    shard: int
    attempt: int
    remote_id: str | None
    status: str
    total: int | None
    completed: int | None
    failed: int | None


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

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def resource_statuses(
    store: StateStore,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport] | None = None,
    *,
    include_orphans: bool = False,
) -> list[ResourceStatus]:
    recorded = load_recorded(store, store.ledger())
    disk = observe_disk([(r.name, r.output_path, r.errors_path) for r in resources], recorded)
    desired = [
        desired_resource(r, facts[r.name])
        if facts and r.name in facts
        else desired_without_input(r)
        for r in resources
    ]
    plan = make_plan(desired, recorded, disk, include_orphans=include_orphans)
    by_name = {r.name: r for r in resources}
    statuses = []
    for action in plan.actions:
        res = by_name.get(action.resource)
        gen = store.find_generation(res.name, res.spec_hash) if res else None
        statuses.append(_status(store, action.resource, action, res, gen))
    return statuses


def _status(
    store: StateStore, name: str, action: Action, res: Resource | None, gen: GenerationRow | None
) -> ResourceStatus:
    row = store.get_resource(name)
    if action.kind is ActionKind.ORPHANED:
        sync, health = "Orphaned", "Unknown"
    elif row is not None and row.forgotten_at is not None:
        sync, health = "OutOfSync", "Missing"  # `forget`: the next apply tracks it again
    else:
        sync = "Synced" if action.kind is ActionKind.NONE else "OutOfSync"
        if res is not None and res.suspend:
            health = "Suspended"
        else:
            health = _HEALTH.get(gen.status, "Unknown") if gen else "Missing"
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
        succeeded=gen.succeeded if gen else 0,
        failed=gen.failed if gen else 0,
        output=str(res.output_path) if res else None,
        errors=str(res.errors_path) if res else None,
        batches=tuple(_batches(store, gen)) if gen else (),
    )


def _batches(store: StateStore, gen: GenerationRow) -> Iterable[BatchStatus]:
    for b in store.batches(gen.id):
        yield BatchStatus(b.shard, b.attempt, b.remote_id, b.status, b.total, b.completed, b.failed)


def workspace_status(
    paths: Sequence[str], *, select: Sequence[str] = (), state_path: str | None = None
) -> list[ResourceStatus]:
    """``batchspec status``: read-only; takes no lock and contacts no provider."""

    ws = load_workspace(paths, state_path=state_path)
    resources = select_resources(ws, select)
    with _read_only_store(ws.project) as store:
        return resource_statuses(store, resources, include_orphans=not select)


@contextmanager
def _read_only_store(project: Project) -> Iterator[StateStore]:
    """The state store if there is one; else an empty throwaway one (status creates nothing)."""
    if project.has_state():
        with StateStore.open(project.state) as store:
            yield store
        return
    with tempfile.TemporaryDirectory() as empty, StateStore.open(Path(empty) / "none.db") as store:
        yield store
