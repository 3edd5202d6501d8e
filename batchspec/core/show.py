"""Everything recorded about one resource, for ``batchspec show NAME``.

``describe_resource(paths, name)`` reads the manifests and the state (no lock, no network,
creates nothing) and returns a frozen ``ResourceDetail``: where its manifest is, its spec
hash, sync and health (as ``status`` computes them), every generation newest first with its
batches (remote ids, status, counts, attempts, file ids, timestamps, token usage), its
result files (whether they are on disk, and the recorded sha256 and the batches whose
output and error files they were merged from), and its last events. A resource whose
manifest is gone is still described from the state (sync ``Orphaned``); a name known to
neither is a ``ManifestError`` listing the names that are.

``ResourceDetail.to_json()`` is the ``--json`` document; its field names are documented in
docs/json-output.md and only ever grow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batchspec.core.batches import event_detail_shown
from batchspec.core.moves import renamed_error, renamed_to
from batchspec.core.replacements import effective_resources
from batchspec.core.selection import refuse_names_declared_elsewhere
from batchspec.core.spend import Price, Usage, generation_usage, price_for, priced_usage
from batchspec.core.status import ResourceStatus, resource_statuses
from batchspec.errors import ManifestError
from batchspec.state.store import BatchRow, EventRow, GenerationRow, StateStore
from batchspec.workspace.manifest import Resource, load_workspace
from batchspec.workspace.project import ProviderConfig
from batchspec.workspace.yamldoc import display_path, unknown_name_hint

LAST_EVENTS = 10


@dataclass(frozen=True)
class BatchDetail:
    shard: int  # 1-based, as people count
    attempt: int
    remote_id: str | None  # None: an intent recorded before the remote create
    status: str
    requests: int
    total: int | None
    completed: int | None
    failed: int | None
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    reason: str | None
    usage: Usage
    created_at: str
    submitted_at: str | None
    terminal_at: str | None
    collected_at: str | None


@dataclass(frozen=True)
class GenerationDetail:
    id: int
    spec_hash: str
    current: bool  # the generation of the manifest's spec as it is now (its replacement's)
    status: str
    requests: int
    succeeded: int
    failed: int
    input_sha256: str
    output_sha256: str | None
    errors_sha256: str | None
    created_at: str
    completed_at: str | None
    usage: Usage
    batches: tuple[BatchDetail, ...]


@dataclass(frozen=True)
class ResultFile:
    kind: str  # "output" or "errors"
    path: str
    exists: bool
    recorded_sha256: str | None  # what the last write recorded (restore compares with it)
    from_batches: tuple[str, ...]  # remote ids whose collected files it was merged from


@dataclass(frozen=True)
class EventDetail:
    at: str
    run_id: int | None
    action: str
    detail: dict[str, Any]


#: what ``ResourceDetail.usage`` sums: every generation's answers (each has its own too)
USAGE_SCOPE = "all_generations"


@dataclass(frozen=True)
class ResourceDetail:
    name: str
    manifest: str | None  # file:line:column, None when the manifest is gone
    labels: dict[str, str]
    provider: str | None
    endpoint: str | None
    model: str | None
    input: str | None
    spec_hash: str | None
    sync: str
    health: str
    action: str
    reason: str
    tracked: bool  # recorded in the state and not forgotten
    usage: Usage  # every generation together; cost_usd None: a price is unknown
    generations: tuple[GenerationDetail, ...]  # newest first
    results: tuple[ResultFile, ...]
    events: tuple[EventDetail, ...]  # the last ones, oldest first

    def to_json(self) -> dict[str, Any]:
        # `status`'s usage is the current generation's: the scope tells the two apart
        return {**asdict(self), "usage_scope": USAGE_SCOPE}


def describe_resource(
    paths: Sequence[str], name: str, *, state_path: str | None = None, events: int = LAST_EVENTS
) -> ResourceDetail:
    """``batchspec show NAME``: read-only; takes no lock and contacts no provider."""
    ws = load_workspace(paths, state_path=state_path)
    res = next((r for r in ws.resources if r.name == name), None)
    if res is None:  # run from a folder without its manifest: not an orphan, say where it is
        refuse_names_declared_elsewhere(ws, [name])
    if not ws.project.has_state():
        if res is None:
            raise _unknown(name, [r.name for r in ws.resources])
        return _describe(None, res, name, events, ws.project.providers)
    with StateStore.open(ws.project.state) as store:
        if res is None and store.get_resource(name) is None:
            moved_to = renamed_to(store, name)
            if moved_to is not None:
                raise renamed_error(name, moved_to, "show NAME")
            recorded = [r.name for r in store.list_resources()]
            raise _unknown(name, [r.name for r in ws.resources] + recorded)
        return _describe(store, res, name, events, ws.project.providers)


def _unknown(name: str, known: Sequence[str]) -> ManifestError:
    return ManifestError(
        f"no resource named {name!r} in the manifests or the state "
        f"({unknown_name_hint(name, known)})"
    )


def _describe(
    store: StateStore | None,
    res: Resource | None,
    name: str,
    events: int,
    providers: Mapping[str, ProviderConfig],
) -> ResourceDetail:
    row = store.get_resource(name) if store else None
    status = _status_of(store, res, name)
    gens = sorted(store.generations(name), key=lambda g: g.id, reverse=True) if store else []
    # a replacement (`apply --replace`) is the current generation, as status and plan see it
    effective = effective_resources(store, [res])[0].spec_hash if store and res else None
    details = tuple(_generation(store, g, effective, providers) for g in gens) if store else ()
    current = next((g for g in details if g.current), details[0] if details else None)
    usage = sum((g.usage for g in details), Usage())
    return ResourceDetail(
        name=name,
        manifest=str(res.source) if res else (row.manifest if row else None),
        labels=dict(res.labels) if res else dict(row.labels if row else {}),
        provider=res.provider if res else (row.provider if row else None),
        endpoint=res.endpoint if res else None,
        model=res.model if res else None,
        input=display_path(res.input_source or res.input_path) if res else None,
        # the current generation's: a replacement's own hash, not the manifest's
        spec_hash=effective or (res.spec_hash if res else None),
        sync=status.sync,
        health=status.health,
        action=status.action,
        reason=status.reason,
        tracked=row is not None and not row.forgotten,
        usage=usage,
        generations=details,
        results=_result_files(res, current),
        events=tuple(_event(e) for e in store.events(resource=name, limit=events)) if store else (),
    )


def _status_of(store: StateStore | None, res: Resource | None, name: str) -> ResourceStatus:
    if store is not None:
        statuses = resource_statuses(store, [res] if res else [], include_orphans=res is None)
        found = next((s for s in statuses if s.name == name), None)
        if found is not None:
            return found
    if res is None:  # forgotten, and its manifest gone too: only history remains
        return ResourceStatus(
            name, "Orphaned", "Unknown", "none", "forgotten; its manifest is gone", None,
            None, None, 0, 0, 0, None, None,
        )  # fmt: skip
    return ResourceStatus(
        name, "OutOfSync", "Missing", "create", "new resource", res.provider,
        res.spec_hash, None, 0, 0, 0, str(res.output_path), str(res.errors_path),
    )  # fmt: skip


def _generation(
    store: StateStore,
    gen: GenerationRow,
    current_hash: str | None,
    providers: Mapping[str, ProviderConfig],
) -> GenerationDetail:
    price = price_for(
        providers.get(str(gen.spec.get("provider"))), gen.spec.get("model") or gen.model
    )
    batches = tuple(_batch(b, price) for b in store.batches(gen.id))
    return GenerationDetail(
        id=gen.id,
        spec_hash=gen.spec_hash,
        current=gen.spec_hash == current_hash,
        status=gen.status,
        requests=gen.requests,
        succeeded=gen.succeeded,
        failed=gen.failed,
        input_sha256=gen.input_sha256,
        output_sha256=gen.output_sha256,
        errors_sha256=gen.errors_sha256,
        created_at=gen.created_at,
        completed_at=gen.completed_at,
        usage=generation_usage(store, gen, providers),
        batches=batches,
    )


def _batch(b: BatchRow, price: Price | None) -> BatchDetail:
    return BatchDetail(
        shard=b.shard + 1,
        attempt=b.attempt,
        remote_id=b.remote_id,
        status=b.status,
        requests=b.requests,
        total=b.total,
        completed=b.completed,
        failed=b.failed,
        input_file_id=b.input_file_id,
        output_file_id=b.output_file_id,
        error_file_id=b.error_file_id,
        reason=b.reason,
        usage=priced_usage(price, b.input_tokens or 0, b.output_tokens or 0, b.total_tokens or 0),
        created_at=b.created_at,
        submitted_at=b.submitted_at,
        terminal_at=b.terminal_at,
        collected_at=b.collected_at,
    )


def _result_files(res: Resource | None, gen: GenerationDetail | None) -> tuple[ResultFile, ...]:
    if res is None:
        return ()
    out: list[ResultFile] = []
    for kind, path in (("output", res.output_path), ("errors", res.errors_path)):
        sha = (gen.output_sha256 if kind == "output" else gen.errors_sha256) if gen else None
        sources = tuple(
            b.remote_id
            for b in (gen.batches if gen else ())
            if b.remote_id and (b.output_file_id if kind == "output" else b.error_file_id)
        )
        out.append(ResultFile(kind, display_path(Path(path)), path.is_file(), sha, sources))
    return tuple(out)


def _event(e: EventRow) -> EventDetail:
    return EventDetail(
        at=e.at, run_id=e.run_id, action=e.action, detail=event_detail_shown(dict(e.detail))
    )


def resource_names(paths: Sequence[str] = (), *, state_path: str | None = None) -> list[str]:
    """Names in the manifests and, tracked or orphaned, in the state (for shell completion)."""
    ws = load_workspace(paths, state_path=state_path)
    names = {r.name for r in ws.resources}
    if ws.project.has_state():
        with StateStore.open(ws.project.state) as store:
            names.update(r.name for r in store.list_resources())
    return sorted(names)
