"""Resource lifecycle outside the reconcile loop: ``import``, ``forget`` and ``apply --prune``.

* ``import_batch`` adopts a batch that was created outside batchspec (by hand, by a script)
  as the current generation of a manifest's resource: a generation for the current spec, a
  ledger row per request, and one batch row (shard 0, attempt 1) bound to the remote id, all
  in one transaction, recorded as an ``import`` event. The next ``apply`` polls and collects
  it like any batch it created itself. It is refused, changing nothing, when the input does
  not fit one shard (one remote batch cannot hold it), when the resource already has a
  generation for this spec or one still in flight, when the remote batch is tracked already,
  or when the remote batch's input cannot be shown to be the resource's input: its input file
  is downloaded and its sha256 compared; a provider that cannot give the file back needs
  ``force``, and a file that differs is refused even then (its answers would not fit the
  requests).
* ``forget_resource`` stops tracking a resource without contacting the provider: its batches
  keep running (the result says which) and its result files stay on disk. A manifest that is
  still there makes the next ``apply`` track it again, resuming its recorded generations
  (nothing is paid twice); ``apply --replace NAME`` runs it afresh.
* ``prune_orphans`` is ``apply --prune``: each resource the plan marks ``prune`` (recorded,
  manifest gone from the whole workspace) has its in-flight batches cancelled and is then
  forgotten.
* ``start_replacements`` is ``apply --replace NAME``: the generations of NAME still in flight
  are cancelled (superseded), and a new generation of the same spec is recorded under its
  replacement hash (``batchspec.core.replacements``) with a ``replace`` event, in one
  transaction; the reconcile loop then submits it as any new generation (reusing succeeded
  answers unless ``--no-reuse``).

Each writes only while holding the locks of the resources it touches (batchspec.state.lock)
and records what it did in the events log.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchspec.core.batches import batch_fields, batch_key
from batchspec.core.plan import ActionKind, Plan
from batchspec.core.reconcile import Reconciler, RunContext
from batchspec.core.reconcile.cancel import cancel_generation
from batchspec.core.reconcile.drain import keep_ended_answers
from batchspec.core.replacements import (
    PRUNE_REASON,
    RequestFacts,
    current_replacement,
    replacement_hash,
    replacement_number,
    replacement_spec,
)
from batchspec.core.reporting import Progress
from batchspec.core.session import (
    ProviderPool,
    indexed_requests,
    open_workspace,
    recorded_run,
    validate_inputs,
)
from batchspec.core.sharding import (
    assign_indexed_shards,
    fits_one_shard,
    indexed_ledger_rows,
    shard_limits,
)
from batchspec.errors import BatchspecError, ManifestError, ProviderError, StateError
from batchspec.providers.base import Provider, RemoteBatch
from batchspec.providers.flavours import FLAVOURS
from batchspec.state.lock import LockHolder, acquire_lock, force_unlock
from batchspec.state.runinfo import collect_run_info
from batchspec.state.store import GenerationRow, StateStore
from batchspec.storage.blobstore import sha256_file
from batchspec.wire.inputs import InputReport
from batchspec.wire.request_index import RequestFact
from batchspec.workspace.manifest import Resource, Workspace, load_workspace
from batchspec.workspace.project import (
    Project,
    ProviderConfig,
    default_project,
    load_workspace_project,
    with_state,
)
from batchspec.workspace.yamldoc import unknown_name_hint

if TYPE_CHECKING:
    from batchspec.core.sharding import ShardLimits

ACTIVE = ("pending", "in_progress")


@dataclass(frozen=True)
class ImportResult:
    name: str
    run_id: int
    remote_id: str
    status: str  # the remote batch's status when it was imported
    generation_id: int
    requests: int
    verified: bool  # the remote input file's sha256 equals the resource's input

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ForgetResult:
    name: str
    run_id: int
    left_running: tuple[str, ...]  # remote ids of batches still in flight at the provider
    in_manifests: bool  # the manifest is still there: the next apply starts it afresh

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "left_running": list(self.left_running)}


# ---------------------------------------------------------------------------------------------
# import


def import_batch(
    paths: Sequence[str],
    name: str,
    batch_id: str,
    *,
    force: bool = False,
    lock_timeout: float = 0.0,
    env: Mapping[str, str] = os.environ,
    state_path: str | None = None,
) -> ImportResult:
    """``batchspec import NAME BATCH_ID``: adopt a remote batch as NAME's current generation."""
    with open_workspace(paths, state_path) as (ws, cache):
        res = resource_named(ws, name)
        facts = validate_inputs(ws, [res], cache, "nothing was imported")[name]
    requests = indexed_requests(cache, {name: facts})  # the validating scan's index: no re-read
    require_one_shard(res, facts, shard_limits(ws, res), requests)
    args = {"paths": list(paths), "name": name, "batch_id": batch_id, "force": force}
    with (
        StateStore.open(ws.project.state) as store,
        recorded_run(store, ws, "import", args, lock_timeout=lock_timeout) as run,
    ):
        info = collect_run_info(ws.project.root, env)
        with (
            acquire_lock(
                store,
                command="import",
                info=info,
                resources=[name],
                timeout=lock_timeout,
                run_id=run.id,
            ),
            ProviderPool(ws, env, lock_timeout=lock_timeout) as providers,
        ):
            require_not_tracked(store, res, batch_id, same_service(ws.project.providers, res))
            provider = providers.get(res.provider)
            remote = provider.get_batch(batch_id)
            require_same_requests(res, facts, remote)
            verified = verify_remote_input(
                provider, remote, facts, ws.project.state_path.parent, force=force
            )
            # the ledger is the validated content's: an input changed since is refused
            cache.require_unchanged(res.input_path, facts.sha256)
            gen = record_import(
                store, run.id, ws, res, facts, remote, requests(res), verified=verified
            )
        run.exit_code = 0
        return ImportResult(
            name=name,
            run_id=run.id,
            remote_id=remote.id,
            status=remote.status,
            generation_id=gen.id,
            requests=facts.requests,
            verified=verified,
        )


def resource_named(ws: Workspace, name: str) -> Resource:
    for res in ws.resources:
        if res.name == name:
            return res
    hint = unknown_name_hint(name, [r.name for r in ws.resources])
    raise ManifestError(f"no resource named {name!r} in the manifests ({hint})")


def require_one_shard(
    res: Resource, facts: InputReport, limits: ShardLimits, requests: RequestFacts
) -> None:
    """An imported batch is shard 0, attempt 1: the whole input must fit one remote batch
    (``requests``: the input's request index, when its counts alone cannot tell)."""
    if fits_one_shard(facts.requests, facts.bytes, limits, endpoint=res.endpoint):
        return
    shards = 1 + max(
        (s for s, _ in assign_indexed_shards(requests(res), limits, endpoint=res.endpoint)),
        default=0,
    )
    if shards > 1:
        lim = res.limits
        own = any(
            (
                lim.max_requests_per_batch,
                lim.max_bytes_per_batch,
                lim.max_embedding_inputs_per_batch,
            )
        )
        by = "its manifest's spec.limits" if own else "the provider's limits"
        raise ManifestError(
            f"cannot import into {res.name}: its input ({facts.requests} requests) is split "
            f"into {shards} shards by {by} (at most {limits.max_requests:,} requests and "
            f"{limits.max_bytes:,} bytes per remote batch), and one remote batch is one shard",
            details=[
                "let `batchspec apply` submit it instead"
                + (", or raise spec.limits to hold the whole input" if own else "")
            ],
        )


def same_service(providers: Mapping[str, ProviderConfig], res: Resource) -> list[str]:
    """The names of the providers that reach the service ``res``'s provider reaches (same
    type and base URL, a missing one read as the type's default; a ``local`` engine: the
    same data folder): a batch id is the service's, whichever name tracked it."""
    own = providers.get(res.provider)
    if own is None:
        return [res.provider]

    def service(p: ProviderConfig) -> tuple[str, str, object]:
        default = FLAVOURS[p.type].base_url if p.type in FLAVOURS else None
        engine = p.options.get("dataDir") if p.type == "local" else None  # one per folder
        return p.type, (p.base_url or default or "").rstrip("/"), engine

    return [res.provider] + [
        name for name, p in providers.items() if name != res.provider and service(p) == service(own)
    ]


def require_not_tracked(
    store: StateStore, res: Resource, batch_id: str, providers: Sequence[str]
) -> None:
    """Refuse a batch some resource tracks already (under any name of its provider
    ``providers``), and a resource that has a generation for its spec or one in flight."""
    known = next((b for b in (store.batch_by_remote_id(p, batch_id) for p in providers) if b), None)
    if known is not None:
        owner = store.get_generation(known.generation_id).resource
        raise StateError(
            f"batch {batch_id} is already tracked (resource {owner}, shard {known.shard + 1}, "
            f"attempt {known.attempt}); nothing was imported"
        )
    existing = current_replacement(store, res) or store.find_generation(res.name, res.spec_hash)
    if existing is not None:
        raise StateError(
            f"{res.name} already has generation {existing.id} for its current spec "
            f"({existing.status}); nothing was imported",
            details=["`batchspec status` shows its batches"],
        )
    active = [g for g in store.generations(res.name) if g.status in ACTIVE]
    if active:
        raise StateError(
            f"{res.name} has generation {active[0].id} still in flight; nothing was imported",
            details=[f"cancel it first (`batchspec cancel {res.name}`), or wait for it"],
        )


def require_same_requests(res: Resource, facts: InputReport, remote: RemoteBatch) -> None:
    """Refuse a remote batch that visibly is not this resource's: endpoint or request count."""
    if remote.endpoint and remote.endpoint != res.endpoint:
        raise ManifestError(
            f"batch {remote.id} runs {remote.endpoint}, but {res.name} "
            f"({res.source.file}:{res.source.line}) asks for {res.endpoint}; nothing was imported"
        )
    total = remote.request_counts.total if remote.request_counts else 0
    if total and total != facts.requests:
        raise ManifestError(
            f"batch {remote.id} holds {total} requests, but the input of {res.name} "
            f"({res.input_path}) has {facts.requests}; nothing was imported"
        )


def verify_remote_input(
    provider: Provider,
    remote: RemoteBatch,
    facts: InputReport,
    scratch: Path,
    *,
    force: bool,
) -> bool:
    """True when the remote input file is byte-for-byte the resource's input.

    A file that differs is refused whatever ``force`` says; a file the provider cannot give
    back (none recorded, expired, not downloadable) is refused unless ``force``.
    """
    why = "the provider reports no input file for it"
    if remote.input_file_id:
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch, prefix="import-") as tmp:
            dest = Path(tmp) / "input.jsonl"
            try:
                provider.download_file(remote.input_file_id, dest)
            except ProviderError as err:
                why = f"its input file {remote.input_file_id} could not be downloaded ({err})"
            else:
                sha = sha256_file(dest)
                if sha == facts.sha256:
                    return True
                raise ManifestError(
                    f"batch {remote.id} was made from a different input than {facts.path}: "
                    f"its input file {remote.input_file_id} has sha256 {sha[:12]}, the "
                    f"resource's input {facts.sha256[:12]}; nothing was imported"
                )
    if force:
        return False
    raise ManifestError(
        f"cannot verify that batch {remote.id} ran {facts.path}: {why}; nothing was imported",
        details=["re-run with --force to import it unverified"],
    )


def record_import(
    store: StateStore,
    run_id: int,
    ws: Workspace,
    res: Resource,
    facts: InputReport,
    remote: RemoteBatch,
    requests: Iterable[RequestFact],
    *,
    verified: bool,
) -> GenerationRow:
    """Generation, ledger (from ``requests``, the input's request index), batch row bound to
    the remote id and the events: one transaction."""
    ledger = store.ledger()
    with store.atomic():
        store.upsert_resource(
            res.name,
            provider=res.provider,
            manifest=_relative(ws, res.source.file),
            labels=dict(res.labels),
            run_id=run_id,
        )
        gen = store.create_generation(
            res.name,
            spec_hash=res.spec_hash,
            spec=res.semantic_spec(),
            input_sha256=facts.sha256,
            requests=facts.requests,
            input_bytes=facts.bytes,
            output_path=_relative(ws, res.output_path),
            errors_path=_relative(ws, res.errors_path),
            run_id=run_id,
        )
        store.set_current_generation(res.name, gen.id)
        store.record_event(
            run_id,
            "generation",
            resource=res.name,
            generation_id=gen.id,
            detail={"spec_hash": res.spec_hash, "requests": facts.requests},
        )
        ledger.record_requests(gen.id, indexed_ledger_rows(requests))
        batch = store.record_batch_intent(
            gen.id,
            shard=0,
            attempt=1,
            provider=res.provider,
            key=batch_key(res.name, res.spec_hash, 0, 1),
            input_sha256=facts.sha256,
            requests=facts.requests,
            reason=f"imported remote batch {remote.id}",
        )
        ledger.mark_sent(gen.id, 0, 1)
        store.update_batch(
            batch.id,
            remote_id=remote.id,
            input_file_id=remote.input_file_id,
            **batch_fields(remote),
        )
        store.update_generation(gen.id, status="in_progress")
        if verified and remote.input_file_id:
            store.record_file(res.provider, facts.sha256, remote.input_file_id, facts.bytes, None)
        store.record_event(
            run_id,
            "import",
            resource=res.name,
            generation_id=gen.id,
            batch_id=batch.id,
            detail={
                "remote_id": remote.id,
                "status": remote.status,
                "input_file_id": remote.input_file_id,
                "verified": verified,
            },
        )
    return store.get_generation(gen.id)


# ---------------------------------------------------------------------------------------------
# forget


def require_recorded_state(project: Project, name: str, command: str) -> None:
    """Refuse ``command NAME`` where no state database exists (a mistyped ``--state``, a
    workspace never applied): nothing is recorded there, and opening it would create the
    folder and an empty state only to fail."""
    if not project.has_state():
        raise StateError(
            f"no state database at {project.state_label}, so no resource named {name!r} is "
            f"recorded there; nothing to {command} (pass --state PATH|URL, or the workspace's "
            "folder)"
        )


def forget_resource(
    paths: Sequence[str],
    name: str,
    *,
    lock_timeout: float = 0.0,
    env: Mapping[str, str] = os.environ,
    state_path: str | None = None,
) -> ForgetResult:
    """``batchspec forget NAME``: stop tracking NAME; the provider is not contacted."""
    ws = load_workspace(paths, state_path=state_path)
    require_recorded_state(ws.project, name, "forget")
    with (
        StateStore.open(ws.project.state) as store,
        recorded_run(
            store, ws, "forget", {"paths": list(paths), "name": name}, lock_timeout=lock_timeout
        ) as run,
    ):
        info = collect_run_info(ws.project.root, env)
        with acquire_lock(
            store,
            command="forget",
            info=info,
            resources=[name],
            timeout=lock_timeout,
            run_id=run.id,
        ):
            row = store.get_resource(name)
            if row is None or row.forgotten_at is not None:
                raise StateError(
                    f"no resource named {name!r} is tracked in {ws.project.state_label}",
                    details=["`batchspec status` lists the tracked resources"],
                )
            running = tuple(
                b.remote_id
                for g in store.generations(name)
                for b in store.batches(g.id)
                if b.remote_id and not b.is_terminal
            )
            in_manifests = any(r.name == name for r in ws.resources)
            with store.atomic():
                store.forget_resource(name)
                store.record_event(
                    run.id,
                    "forget",
                    resource=name,
                    detail={"left_running": list(running), "manifest": in_manifests},
                )
        run.exit_code = 0
        return ForgetResult(name, run.id, running, in_manifests)


# ---------------------------------------------------------------------------------------------
# prune


def prune_orphans(rec: Reconciler, plan: Plan) -> tuple[str, ...]:
    """Cancel and forget every resource ``plan`` marks ``prune``; return their names.

    The remote cancels of all of them run side by side (``Reconciler.cancels_ahead``, given
    the ``prune`` resources and nothing else); each is recorded, then forgotten, in plan order.
    An orphan the plan leaves alone because a commit newer than this checkout's declared it
    (``Action.declared_by``) is recorded (``prune-held``) and warned about instead.
    """
    for held in (a for a in plan.actions if a.declared_by is not None):
        rec.store.record_event(
            rec.run_id, "prune-held", resource=held.resource, detail={"commit": held.declared_by}
        )
        rec.report(
            Progress("warning", held.resource, held.reason, {"declared_by": held.declared_by})
        )
    names = [a.resource for a in plan.actions if a.kind is ActionKind.PRUNE]
    with rec.cancels_ahead(names):
        for name in names:
            # one line a pruned resource: the prune's below, which says the cancels too
            cancelled = rec.cancel(name, reason=PRUNE_REASON, quiet=True)
            with rec.store.atomic():
                rec.store.forget_resource(name)
                rec.store.record_event(
                    rec.run_id, "prune", resource=name, detail={"cancelled_batches": cancelled}
                )
            rec.report(
                Progress(
                    "prune",
                    name,
                    f"pruned: manifest gone, {_cancels_text(cancelled)}, no longer tracked",
                    {"cancelled_batches": cancelled},
                )
            )
    return tuple(names)


def _cancels_text(cancelled: int) -> str:
    """A prune of batches that had all ended (one finished but not downloaded, say) says so,
    not "cancel sent to 0 batch(es)"."""
    if cancelled:
        return f"cancel sent to {cancelled} batch(es)"
    return "nothing to cancel (its batches had ended)"


# ---------------------------------------------------------------------------------------------
# replace


def start_replacements(
    rec: Reconciler,
    plan: Plan,
    resources: Sequence[Resource],
    facts: Mapping[str, InputReport],
    names: Sequence[str],
    readded: Mapping[str, int] | None = None,
) -> tuple[str, ...]:
    """Record the replacement generation of every resource in ``names`` (``--replace NAME``)
    that ``plan`` replaces or creates, and of every one in ``readded`` (added again after
    ``apply --prune``) that it creates (``resources`` carry the replacement's spec hash);
    return their names. A re-added one the plan replaces waits for the consent a replace
    needs, as the plan said."""
    by_name = {r.name: r for r in resources}
    readded = readded or {}
    replaced = []
    for action in plan.actions:
        res = by_name.get(action.resource)
        asked = action.resource in names and action.kind in (ActionKind.REPLACE, ActionKind.CREATE)
        back = action.resource in readded and action.kind is ActionKind.CREATE
        if not (asked or back) or res is None:
            continue
        if rec.store.find_generation(res.name, res.spec_hash) is None:
            _next_replacement(rec.store, res)  # checked before any cancel is sent
            replaced.append(res)
    # the in-flight batches of every one are cancelled side by side, recorded in plan order
    with rec.cancels_ahead([res.name for res in replaced]):
        for res in replaced:
            pruned = readded.get(res.name) if res.name not in names else None
            record_replacement(rec, res, facts[res.name], readded_after=pruned)
    return tuple(res.name for res in replaced)


def _next_replacement(store: StateStore, res: Resource) -> tuple[int, bool]:
    """The replacement number ``res.spec_hash`` is, and whether it reuses answers."""
    number = replacement_number(current_replacement(store, res)) + 1
    reuse = next(
        (r for r in (True, False) if replacement_hash(res, number, reuse=r) == res.spec_hash),
        None,
    )
    if reuse is None:  # the caller passes `next_replacement(...)`: anything else is a bug
        raise StateError(f"{res.name}: {res.spec_hash[:12]} is not its next replacement")
    return number, reuse


def record_replacement(
    rec: Reconciler, res: Resource, facts: InputReport, *, readded_after: int | None = None
) -> GenerationRow:
    """Record ``res``'s next replacement generation, superseding its active ones;
    ``readded_after``: the generation ``apply --prune`` cancelled, its manifest back (said
    so in the ``replace`` event and the progress line)."""
    store = rec.store
    number, reuse = _next_replacement(store, res)
    superseded = []
    for gen in store.generations(res.name):
        if gen.status in ACTIVE:
            cancel_generation(
                rec.ctx, res.name, gen, status="superseded", reason="replaced (apply --replace)"
            )
            keep_ended_answers(rec.ctx, res, gen)  # a batch that ended first keeps its answers
            superseded.append(gen.id)
    row = store.get_resource(res.name)
    with store.atomic():
        rec.ctx.upsert_resource(res)
        gen = store.create_generation(
            res.name,
            spec_hash=res.spec_hash,
            spec=replacement_spec(res, number, reuse=reuse),
            input_sha256=facts.sha256,
            requests=facts.requests,
            input_bytes=facts.bytes,
            output_path=_relative(rec.ctx, res.output_path),
            errors_path=_relative(rec.ctx, res.errors_path),
            run_id=rec.run_id,
        )
        store.set_current_generation(res.name, gen.id)
        detail = {
            "spec_hash": res.spec_hash,
            "replacement": number,
            "reuse": reuse,
            "replaces": row.current_generation_id if row else None,
            "superseded": superseded,
            "requests": facts.requests,
            **({"readded_after_prune": readded_after} if readded_after is not None else {}),
        }
        store.record_event(
            rec.run_id, "replace", resource=res.name, generation_id=gen.id, detail=detail
        )
    how = "keeping answers that succeeded" if reuse else "resending every request"
    if readded_after is not None:
        how = f"added again after `apply --prune` cancelled generation {readded_after}; {how}"
    rec.report(
        Progress(
            "replace",
            res.name,
            f"replacement {number} recorded as generation {gen.id} ({how})",
            {"generation_id": gen.id, "replacement": number, "reuse": reuse},
        )
    )
    return gen


def _relative(ws: Workspace | RunContext, path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ws.project.root.resolve()))
    except ValueError:
        return str(path)


def unlock_state(
    holder_id: str,
    *,
    state_path: Path | str | None = None,
    start: Path | None = None,
    force: bool = False,
) -> LockHolder:
    """``batchspec unlock ID``: release ``holder_id``'s locks, recorded as an ``unlock`` run.

    The state database is ``state_path`` (a file or a PostgreSQL URL), or the project's found
    from ``start`` (default: the current folder). A missing SQLite file is an error, never
    created just to be unlocked. A holder that may still be running (fresh heartbeat) is
    released only with ``force``.
    """
    if state_path is None:
        project = load_workspace_project(start)
    else:  # the state named outright: no project file is read
        project = with_state(default_project(start or Path.cwd()), state_path)
    root = project.root
    if not project.has_state():
        raise StateError(
            f"no state database at {project.state_label}; nothing to unlock (pass --state PATH "
            "or run from the workspace)"
        )
    with StateStore.open(project.state) as store:
        args = {"holder_id": holder_id, **({"force": True} if force else {})}
        run_id = store.start_run("unlock", args, collect_run_info(root))
        try:
            holder = force_unlock(store, holder_id, run_id=run_id, force=force)
        except BatchspecError as err:
            store.finish_run(run_id, err.exit_code)
            raise
        store.finish_run(run_id, 0)
    return holder
