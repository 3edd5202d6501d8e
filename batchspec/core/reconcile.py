"""The reconciler: take the next safe step for each resource, recording every step first.

``Reconciler.advance(resource)`` re-plans the resource from fresh state and acts, repeating
until the resource has to wait for the provider (``refresh`` of a running batch), is in sync,
or is stuck. The money-touching steps follow DESIGN.md's invariants:

* **Intent first.** A batch row (remote id NULL) and an ``intent`` event are committed before
  any upload; the row is marked ``creating`` before the create call. A run that dies between
  the create and recording its remote id leaves a ``creating`` row, and the next run *adopts*
  the remote batch carrying the same metadata key instead of creating another.
* **Deterministic keys.** Every batch carries ``batchspec_resource``, ``batchspec_spec``,
  ``batchspec_shard`` and ``batchspec_attempt`` in its metadata, next to the user's.
* **Files once per provider.** Uploads are deduplicated by sha256 per provider; a recorded
  file id the provider no longer has is uploaded again.
* **Collect to the store first.** Output and error files go into the blob store before they
  are read; result files are written from there, in input order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchspec.core.batches import (
    batch_fields,
    batch_key,
    batch_metadata,
    counts_json,
    metadata_for_key,
)
from batchspec.core.budget import check_budget
from batchspec.core.collect import download_to_store, read_result_lines
from batchspec.core.plan import (
    Action,
    ActionKind,
    DesiredResource,
    RecordedResource,
    plan_resource,
)
from batchspec.core.recorded import (
    DEFAULT_REQUEUE_BACKOFF,
    is_requeued,
    observe_disk,
    recorded_generation,
)
from batchspec.core.reporting import Progress, Reporter, format_size
from batchspec.core.results import write_results_in_input_order
from batchspec.core.sharding import (
    ShardLimits,
    ShardWriters,
    fits_one_shard,
    ledger_rows,
    shard_and_write,
    with_fingerprints,
)
from batchspec.errors import BatchspecError
from batchspec.providers.base import Provider, RemoteBatch, RemoteNotFound
from batchspec.state.ledger import RequestLedger
from batchspec.state.store import (
    BatchRow,
    GenerationRow,
    StateStore,
    parse_timestamp,
    utc_timestamp,
)
from batchspec.storage.blobstore import BlobStore
from batchspec.wire.batch_status import TERMINAL_STATUSES
from batchspec.wire.inputs import InputReport, iter_requests
from batchspec.workspace.manifest import Project, Resource
from batchspec.workspace.yamldoc import display_path

# How far back (seconds) the adoption scan looks past the intent's own time: clocks differ.
ADOPTION_CLOCK_SLACK = 3600
MAX_STEPS_PER_PASS = 12


ProviderFactory = Callable[[str], Provider]


@dataclass(frozen=True)
class StepResult:
    action: Action
    waiting: bool  # the resource waits on the provider (in flight) or on consent


class Reconciler:
    def __init__(
        self,
        project: Project,
        store: StateStore,
        run_id: int,
        provider_for: ProviderFactory,
        report: Reporter,
        *,
        allow_replace: bool = False,
        limits_for: Callable[[Resource], ShardLimits] | None = None,
        max_in_flight: Callable[[str], int | None] = lambda provider: None,
        requeue_backoff: float = DEFAULT_REQUEUE_BACKOFF,
        clock: Callable[[], float] = time.time,
        may_spend: Callable[[Action], bool] | None = None,
        still_holds_lock: Callable[[], None] = lambda: None,
    ) -> None:
        self.project = project
        # raises StateLockedError/StateError when this run no longer holds the lock; called
        # right before every create, so a run whose lock was released stops spending at once
        self.still_holds_lock = still_holds_lock
        self.store = store
        self.run_id = run_id
        self.provider_for = provider_for
        self.report = report
        self.allow_replace = allow_replace
        self.limits_for = limits_for or (lambda res: ShardLimits())
        self.max_in_flight = max_in_flight
        self.requeue_backoff = requeue_backoff
        self.clock = clock
        # a saved plan (batchspec.core.planfile) limits spending to what it shows; None: no limit
        self.may_spend = may_spend
        self.ledger = RequestLedger(store.db)
        self.blobs = BlobStore(project.state_path.parent / "store")
        self.shard_dir = project.state_path.parent / "shards"

    # -----------------------------------------------------------------------------------------
    # planning from fresh state

    def plan_one(self, res: Resource, facts: InputReport) -> Action:
        desired = desired_resource(res, facts)
        recorded = self._recorded(res.name)
        disk = observe_disk(
            [(res.name, res.output_path, res.errors_path)], {res.name: recorded} if recorded else {}
        )
        return plan_resource(desired, recorded, disk.get(res.name), self.clock())

    def _recorded(self, name: str) -> RecordedResource | None:
        row = self.store.get_resource(name)
        if row is None:
            return None
        gens = tuple(
            recorded_generation(self.store, self.ledger, g, requeue_backoff=self.requeue_backoff)
            for g in self.store.generations(name)
        )
        return RecordedResource(
            name=name,
            provider=row.provider,
            generations=gens,
            forgotten=row.forgotten_at is not None,
        )

    # -----------------------------------------------------------------------------------------
    # one pass for one resource

    def advance(self, res: Resource, facts: InputReport) -> StepResult:
        """Act on ``res`` until it must wait, is in sync, or is stuck."""
        self._track_again_if_forgotten(res)
        action = self.plan_one(res, facts)
        for _ in range(MAX_STEPS_PER_PASS):
            kind = action.kind
            if kind is ActionKind.NONE:
                return StepResult(action, waiting=False)
            if kind is ActionKind.REPLACE and not self.allow_replace:
                message = f"not replacing: {action.reason}; re-run with --allow-replace"
                self.report(Progress("skip", res.name, message))
                return StepResult(action, waiting=False)
            if action.spends and self.may_spend is not None and not self.may_spend(action):
                message = (
                    f"not in the saved plan: {kind.value} ({action.reason}); "
                    "run `batchspec plan` again to review it"
                )
                self.report(Progress("skip", res.name, message))
                return StepResult(action, waiting=False)
            handler = {
                ActionKind.CREATE: self.create,
                ActionKind.REPLACE: self.replace,
                ActionKind.REFRESH: self.refresh,
                ActionKind.COLLECT: self.collect,
                ActionKind.RETRY: self.retry,
                ActionKind.RESTORE: self.restore,
            }[kind]
            progressed = handler(res, facts, action)
            following = self.plan_one(res, facts)
            if not progressed or (
                following.kind is ActionKind.REFRESH and kind is not ActionKind.COLLECT
            ):
                return StepResult(following, waiting=True)
            action = following
        return StepResult(action, waiting=True)

    # -----------------------------------------------------------------------------------------
    # create / replace / retry: everything that spends. Each returns False when a batch had
    # to stay queued (the provider's maxInFlightBatches is reached).

    def create(self, res: Resource, facts: InputReport, action: Action) -> bool:
        gen = self._ensure_generation(res, facts)
        if not self.store.batches(gen.id) and not self.ledger.has_requests(gen.id):
            self._record_shards(res, facts, gen)
        submitted = self._submit_queued(res, gen)
        self._ensure_ledger(res, gen)
        return submitted

    def replace(self, res: Resource, facts: InputReport, action: Action) -> bool:
        for gen in self.store.generations(res.name):
            if gen.spec_hash != res.spec_hash and gen.status in ("pending", "in_progress"):
                self._cancel_generation(
                    res.name, gen, status="superseded", reason="replaced by a new spec"
                )
        return self.create(res, facts, action)

    def retry(self, res: Resource, facts: InputReport, action: Action) -> bool:
        gen = self._generation(res)
        self._ensure_ledger(res, gen)
        rec = recorded_generation(
            self.store, self.ledger, gen, requeue_backoff=self.requeue_backoff
        )
        now = self.clock()
        ready = [
            s
            for s in rec.shards
            if s.unresolved
            and s.attempts_used < res.retry.max_attempts
            and (s.not_before is None or now >= s.not_before)
        ]
        submitted = sum(b.requests for b in self.store.batches(gen.id) if not is_requeued(b))
        check_budget(res, facts, submitted=submitted, new=sum(s.unresolved for s in ready))
        latest = self._latest_attempts(gen.id)
        for shard in ready:
            attempt = latest.get(shard.shard, 0) + 1
            self._record_intent(
                res,
                gen,
                shard=shard.shard,
                attempt=attempt,
                requests=shard.unresolved,
                reason=f"retry {shard.unresolved} unresolved request(s) "
                f"(attempt {shard.attempts_used + 1} of {res.retry.max_attempts})",
            )
        return self._submit_queued(res, gen)

    def _submit_queued(self, res: Resource, gen: GenerationRow) -> bool:
        """Submit every intent of the generation that has no remote batch yet, capacity allowing."""
        for batch in self.store.batches(gen.id):
            if batch.remote_id is None and batch.status in ("pending", "creating"):
                if not self._has_capacity(res, batch):
                    # capacity frees only when a batch in flight is seen finished: poll ours,
                    # or a resource whose plan is create (queued intents) would wait forever
                    self.refresh(res)
                    return False
                self._submit(res, gen, batch)
        return True

    def _has_capacity(self, res: Resource, batch: BatchRow) -> bool:
        limit = self.max_in_flight(res.provider)
        if limit is None or batch.status == "creating":  # an unsure create is resolved first
            return True
        in_flight = self._in_flight_on(res.provider)
        if len(in_flight) >= limit:
            # The capacity may be held by resources this run was not asked about (--select):
            # poll those, so that their finishing frees it (they are collected when applied).
            provider = self.provider_for(res.provider)
            for other in in_flight:
                owner = self.store.get_generation(other.generation_id).resource
                if owner != res.name:
                    self._poll(owner, other, provider)
            in_flight = self._in_flight_on(res.provider)
        if len(in_flight) < limit:
            return True
        self.report(
            Progress(
                "queued",
                res.name,
                f"shard {batch.shard + 1} attempt {batch.attempt} waits: {len(in_flight)} "
                f"batch(es) in flight on {res.provider} (maxInFlightBatches {limit})",
            )
        )
        return False

    def _in_flight_on(self, provider: str) -> list[BatchRow]:
        return [b for b in self.store.in_flight_batches() if b.provider == provider]

    def _track_again_if_forgotten(self, res: Resource) -> None:
        """A forgotten resource whose manifest is still here is tracked again by apply; its
        recorded generations are reused, so nothing is submitted twice."""
        row = self.store.get_resource(res.name)
        if row is None or row.forgotten_at is None:
            return
        with self.store.atomic():
            self._upsert_resource(res)
            self.store.record_event(self.run_id, "track", resource=res.name, detail={})
        self.report(Progress("track", res.name, "tracked again (it was forgotten)"))

    def _upsert_resource(self, res: Resource) -> None:
        self.store.upsert_resource(
            res.name,
            provider=res.provider,
            manifest=self._relative(res.source.file),
            labels=dict(res.labels),
            run_id=self.run_id,
        )

    def _ensure_generation(self, res: Resource, facts: InputReport) -> GenerationRow:
        with self.store.atomic():
            self._upsert_resource(res)
            existing = self.store.find_generation(res.name, res.spec_hash)
            gen = self.store.create_generation(
                res.name,
                spec_hash=res.spec_hash,
                spec=res.semantic_spec(),
                input_sha256=facts.sha256,
                requests=facts.requests,
                input_bytes=facts.bytes,
                output_path=self._relative(res.output_path),
                errors_path=self._relative(res.errors_path),
                run_id=self.run_id,
            )
            self.store.set_current_generation(res.name, gen.id)
            if existing is None:
                self.store.record_event(
                    self.run_id,
                    "generation",
                    resource=res.name,
                    generation_id=gen.id,
                    detail={"spec_hash": res.spec_hash, "requests": facts.requests},
                )
        return gen

    def _record_shards(self, res: Resource, facts: InputReport, gen: GenerationRow) -> None:
        """Record every request in the ledger, keep the answers an earlier generation has for
        unchanged requests, split the rest into shards (writing shard files when the input
        cannot go as it is) and record one attempt-1 intent per shard: one transaction."""
        limits = self.limits_for(res)
        previous = [g.id for g in self.store.generations(res.name) if g.id != gen.id]
        with self.store.atomic():
            carried = 0
            if previous:
                self.ledger.record_requests(gen.id, ledger_rows(res.input_path))
                carried = self.ledger.carry_over(gen.id, previous)
            todo = iter_requests(res.input_path)
            if carried:
                done = self.ledger.resolved_lines(gen.id)
                todo = (req for req in todo if req.line not in done)
            # A file with blank lines is rewritten rather than uploaded as it is: providers
            # differ on whether they accept them.
            as_is = not carried and facts.blank_lines == 0
            single = as_is and fits_one_shard(
                facts.requests, facts.bytes, limits, endpoint=res.endpoint
            )
            if single and not previous:
                # The batch file is the input itself: only the intent must precede the create.
                # The ledger is written while the provider works (``_ensure_ledger``).
                check_budget(res, facts, submitted=0, new=facts.requests)
                self._record_intent(
                    res,
                    gen,
                    shard=0,
                    attempt=1,
                    requests=facts.requests,
                    input_sha256=facts.sha256,
                    reason="initial submission",
                )
                return
            writers = ShardWriters(self.shard_dir, enabled=not single)
            per_shard: dict[int, int] = {}
            assigned = shard_and_write(todo, limits, res.endpoint, writers, per_shard)
            if previous:
                self.ledger.assign_shards(gen.id, ((s, req.line) for s, req in assigned))
            else:
                self.ledger.record_requests(gen.id, with_fingerprints(assigned))
            shard_files = writers.finish()
            check_budget(res, facts, submitted=0, new=sum(per_shard.values()))
            for shard, n in sorted(per_shard.items()):
                self._record_intent(
                    res,
                    gen,
                    shard=shard,
                    attempt=1,
                    requests=n,
                    input_sha256=shard_files.get(shard, facts.sha256),
                    reason="initial submission"
                    if len(per_shard) == 1
                    else f"initial submission, shard {shard + 1} of {len(per_shard)}",
                )
        if carried:
            self.report(
                Progress(
                    "reuse",
                    res.name,
                    f"{carried} unchanged request(s) keep their recorded results; "
                    f"{sum(per_shard.values())} to submit",
                    {"reused": carried},
                )
            )
        if len(per_shard) > 1:
            self.report(
                Progress(
                    "shard",
                    res.name,
                    f"split {sum(per_shard.values())} requests into {len(per_shard)} shards",
                    {"shards": len(per_shard)},
                )
            )

    def _ensure_ledger(self, res: Resource, gen: GenerationRow) -> None:
        """Write the ledger of a generation submitted as one as-is shard, if not yet written.

        It is derived from the input alone (every request in shard 0, carried by attempt 1),
        so a run that died before writing it loses nothing: the next one writes it here.
        """
        if self.ledger.has_requests(gen.id):
            return
        with self.store.atomic():
            self.ledger.record_requests(gen.id, ledger_rows(res.input_path))

    def _record_intent(
        self,
        res: Resource,
        gen: GenerationRow,
        *,
        shard: int,
        attempt: int,
        requests: int,
        reason: str,
        input_sha256: str | None = None,
    ) -> BatchRow:
        key = batch_key(res.name, res.spec_hash, shard, attempt)
        with self.store.atomic():
            existing = self.store.batch_by_key(key)
            if existing is not None:
                return existing
            if input_sha256 is None:
                input_sha256 = self._write_retry_file(res, gen, shard)
            batch = self.store.record_batch_intent(
                gen.id,
                shard=shard,
                attempt=attempt,
                provider=res.provider,
                key=key,
                input_sha256=input_sha256,
                requests=requests,
                reason=reason,
            )
            self.ledger.mark_sent(gen.id, shard, attempt)
            self.store.update_generation(gen.id, status="in_progress")
            self.store.record_event(
                self.run_id,
                "intent",
                resource=res.name,
                generation_id=gen.id,
                batch_id=batch.id,
                detail={
                    "shard": shard,
                    "attempt": attempt,
                    "requests": requests,
                    "reason": reason,
                    "key": key,
                },
            )
        return batch

    def _write_retry_file(self, res: Resource, gen: GenerationRow, shard: int) -> str:
        wanted = self.ledger.unresolved_lines(gen.id, shard)
        writers = ShardWriters(self.shard_dir, enabled=True)
        for req in iter_requests(res.input_path):
            if req.line in wanted:
                writers.write(0, req.raw)
        return writers.finish()[0]

    def _submit(self, res: Resource, gen: GenerationRow, batch: BatchRow) -> None:
        provider = self.provider_for(res.provider)
        if batch.status == "creating":
            adopted = self._find_remote(provider, batch)
            if adopted is not None:
                self._record_remote(res, batch, adopted, event="adopt")
                return
        path = self._batch_file(res, gen, batch)
        file_id = self._ensure_uploaded(provider, res, batch, path)
        with self.store.atomic():
            batch = self.store.update_batch(batch.id, input_file_id=file_id, status="creating")
            self.store.record_event(
                self.run_id,
                "create-intent",
                resource=res.name,
                generation_id=gen.id,
                batch_id=batch.id,
                detail={"input_file_id": file_id, "key": batch.key},
            )
        self.still_holds_lock()
        remote = provider.create_batch(
            input_file_id=file_id,
            endpoint=res.endpoint,
            completion_window=res.completion_window,
            metadata=batch_metadata(res, batch),
        )
        self._record_remote(res, batch, remote, event="create")

    def _find_remote(self, provider: Provider, batch: BatchRow) -> RemoteBatch | None:
        """Page the provider's batches (newest first) for the one carrying this intent's key."""
        wanted = metadata_for_key(batch.key)
        since = parse_timestamp(batch.created_at).timestamp() - ADOPTION_CLOCK_SLACK
        for remote in provider.list_batches():
            if all(remote.metadata.get(k) == v for k, v in wanted.items()):
                return remote
            if remote.created_at is not None and remote.created_at < since:
                break
        return None

    def _bind_adopted(self, name: str, batch: BatchRow, remote: RemoteBatch) -> BatchRow:
        with self.store.atomic():
            bound = self.store.update_batch(
                batch.id, remote_id=remote.id, submitted_at=_now(), **batch_fields(remote)
            )
            self.store.record_event(
                self.run_id,
                "adopt",
                resource=name,
                generation_id=batch.generation_id,
                batch_id=batch.id,
                detail={"remote_id": remote.id, "status": remote.status},
            )
        return bound

    def _record_remote(
        self, res: Resource, batch: BatchRow, remote: RemoteBatch, *, event: str
    ) -> None:
        with self.store.atomic():
            self.store.update_batch(
                batch.id, remote_id=remote.id, submitted_at=_now(), **batch_fields(remote)
            )
            self.store.record_event(
                self.run_id,
                event,
                resource=res.name,
                generation_id=batch.generation_id,
                batch_id=batch.id,
                detail={
                    "remote_id": remote.id,
                    "status": remote.status,
                    "shard": batch.shard,
                    "attempt": batch.attempt,
                },
            )
        verb = "adopted" if event == "adopt" else "created"
        self.report(
            Progress(
                event,
                res.name,
                f"{verb} batch {remote.id} (shard {batch.shard + 1}, attempt {batch.attempt}, "
                f"{batch.requests} requests)",
                {
                    "remote_id": remote.id,
                    "shard": batch.shard + 1,
                    "attempt": batch.attempt,
                    "requests": batch.requests,
                },
            )
        )

    def _batch_file(self, res: Resource, gen: GenerationRow, batch: BatchRow) -> Path:
        stored = self.shard_dir / f"{batch.input_sha256}.jsonl"
        if stored.is_file():
            return stored
        if batch.input_sha256 == gen.input_sha256:
            return res.input_path
        raise BatchspecError(
            f"the batch file for {res.name} shard {batch.shard + 1} attempt {batch.attempt} "
            f"(sha256 {batch.input_sha256[:12]}) is missing from {self.shard_dir}",
        )

    def _ensure_uploaded(
        self, provider: Provider, res: Resource, batch: BatchRow, path: Path
    ) -> str:
        known = self.store.get_file(provider.name, batch.input_sha256)
        if known is not None:
            try:
                provider.get_file(known.remote_id)
                return known.remote_id
            except RemoteNotFound:
                self.store.forget_file(provider.name, batch.input_sha256)
        self.store.record_event(
            self.run_id,
            "upload-intent",
            resource=res.name,
            batch_id=batch.id,
            detail={"sha256": batch.input_sha256, "bytes": path.stat().st_size},
        )
        filename = f"{res.name}-s{batch.shard + 1}-a{batch.attempt}.jsonl"
        size = path.stat().st_size
        self.report(
            Progress(
                "upload",
                res.name,
                f"uploading {filename} ({format_size(size)})",
                {"file": filename, "bytes": size},
            )
        )
        remote = provider.upload_file(path, filename=filename)
        with self.store.atomic():
            self.store.record_file(
                provider.name,
                batch.input_sha256,
                remote.id,
                remote.bytes or path.stat().st_size,
                remote.expires_at,
            )
            self.store.record_event(
                self.run_id,
                "upload",
                resource=res.name,
                batch_id=batch.id,
                detail={"sha256": batch.input_sha256, "file_id": remote.id},
            )
        return remote.id

    # -----------------------------------------------------------------------------------------
    # refresh / collect

    def refresh(
        self, res: Resource, facts: InputReport | None = None, action: Action | None = None
    ) -> bool:
        gen = self._generation(res)
        self._ensure_ledger(res, gen)
        provider = self.provider_for(res.provider)
        for batch in self.store.batches(gen.id):
            if batch.remote_id is None or batch.status in TERMINAL_STATUSES:
                continue
            remote = self._poll(res.name, batch, provider)
            self.report(
                Progress(
                    "poll",
                    res.name,
                    _poll_message(batch, remote),
                    {
                        "remote_id": remote.id,
                        "status": remote.status,
                        **counts_json(remote),
                        "shard": batch.shard + 1,
                        "attempt": batch.attempt,
                    },
                )
            )
        return True

    def _poll(self, name: str, batch: BatchRow, provider: Provider) -> RemoteBatch:
        """Ask the provider where a batch stands and record it (an event when it moved)."""
        assert batch.remote_id is not None
        remote = provider.get_batch(batch.remote_id)
        with self.store.atomic():
            self.store.update_batch(batch.id, **batch_fields(remote))
            if remote.status != batch.status:
                self.store.record_event(
                    self.run_id,
                    "poll",
                    resource=name,
                    generation_id=batch.generation_id,
                    batch_id=batch.id,
                    detail={"status": remote.status, "from": batch.status, **counts_json(remote)},
                )
        return remote

    def collect(self, res: Resource, facts: InputReport, action: Action) -> bool:
        gen = self._generation(res)
        self._ensure_ledger(res, gen)
        provider = self.provider_for(res.provider)
        pending = [
            b
            for b in self.store.batches(gen.id)
            if b.remote_id and b.status in TERMINAL_STATUSES and b.collected_at is None
        ]
        for batch in pending:
            self._collect_batch(res, gen, batch, provider)
        if not pending:
            self._finish_generation(res, gen)
        return True

    def _collect_batch(
        self, res: Resource, gen: GenerationRow, batch: BatchRow, provider: Provider
    ) -> None:
        user_cancelled = gen.status == "cancelled"
        retry_on = tuple(c for c in res.retry.on if not (c == "cancelled" and user_cancelled)) or ()
        shas: dict[str, str | None] = {"output_sha256": None, "errors_sha256": None}
        for column, file_id in (
            ("output_sha256", batch.output_file_id),
            ("errors_sha256", batch.error_file_id),
        ):
            if file_id:
                kind = "output" if column == "output_sha256" else "errors"
                self.report(
                    Progress(
                        "download",
                        res.name,
                        f"downloading the {kind} file of batch {batch.remote_id}",
                        {"remote_id": batch.remote_id, "file_id": file_id, "file": kind},
                    )
                )
                shas[column] = download_to_store(provider, file_id, self.blobs)
        changed = 0
        with self.store.atomic():
            for sha in shas.values():
                if sha:
                    changed += self.ledger.record_outcomes(
                        gen.id,
                        batch.attempt,
                        sha,
                        read_result_lines(self.blobs.path(sha), retry_on=retry_on),
                    )
            detail: dict[str, Any] = {
                "status": batch.status,
                "answered": changed,
                **{k: v for k, v in shas.items() if v},
            }
            if batch.status == "failed" and is_requeued(batch):
                detail["requeued"] = "token_limit_exceeded: resubmitted after a backoff"
            elif batch.status == "failed":
                detail["errors"] = self._fail_batch(res, gen, batch)
            self.store.update_batch(batch.id, collected_at=_now(), **shas)
            self.store.record_event(
                self.run_id,
                "collect",
                resource=res.name,
                generation_id=gen.id,
                batch_id=batch.id,
                detail=detail,
            )
        self.report(
            Progress(
                "collect",
                res.name,
                f"collected batch {batch.remote_id} ({batch.status}): {changed} answers"
                + _rejection_text(detail.get("errors")),
                {"remote_id": batch.remote_id},
            )
        )

    def _fail_batch(
        self, res: Resource, gen: GenerationRow, batch: BatchRow
    ) -> list[dict[str, Any]]:
        """A batch the provider rejected as a whole: map its line numbers back to the input."""
        errors = batch.provider_errors or []
        lines = self.ledger.lines_of_attempt(gen.id, batch.shard, batch.attempt)
        as_is = batch.input_sha256 == gen.input_sha256
        mapped = []
        for err in errors:
            line = err.get("line")
            if isinstance(line, int) and not as_is and 1 <= line <= len(lines):
                line = lines[line - 1]
            mapped.append({**err, "input_line": line})
        code = next((e.get("code") for e in errors if e.get("code")), None) or "batch_failed"
        self.ledger.fail_attempt(gen.id, batch.shard, batch.attempt, code)
        return mapped

    def _finish_generation(self, res: Resource, gen: GenerationRow) -> None:
        """Everything is collected and no retry is left: write the result files."""
        written = write_results_in_input_order(
            self.ledger, gen.id, self.blobs, res.output_path, res.errors_path
        )
        degraded = written.unresolved > 0 or (written.succeeded == 0 and gen.requests > 0)
        status = (
            gen.status if gen.status == "cancelled" else ("degraded" if degraded else "complete")
        )
        with self.store.atomic():
            usage = self._usage(gen.id)
            self.store.update_generation(
                gen.id,
                status=status,
                succeeded=written.succeeded,
                failed=written.failed,
                output_sha256=written.output_sha256,
                errors_sha256=written.errors_sha256,
                completed_at=_now(),
            )
            self.store.record_event(
                self.run_id,
                "results",
                resource=res.name,
                generation_id=gen.id,
                detail={
                    "status": status,
                    "succeeded": written.succeeded,
                    "failed": written.failed,
                    "unresolved": written.unresolved,
                    "output": self._relative(res.output_path),
                    "errors": self._relative(res.errors_path),
                    **usage,
                },
            )
        self.report(
            Progress(
                "results",
                res.name,
                f"wrote {written.succeeded} results to {display_path(res.output_path)}"
                + (
                    f", {written.failed} errors to {display_path(res.errors_path)}"
                    if written.failed
                    else ""
                ),
                {"status": status, "succeeded": written.succeeded, "failed": written.failed},
            )
        )

    def restore(self, res: Resource, facts: InputReport, action: Action) -> bool:
        gen = self._generation(res)
        written = write_results_in_input_order(
            self.ledger, gen.id, self.blobs, res.output_path, res.errors_path
        )
        self.store.record_event(
            self.run_id,
            "restore",
            resource=res.name,
            generation_id=gen.id,
            detail={"reason": action.reason, "output_sha256": written.output_sha256},
        )
        self.report(
            Progress(
                "restore",
                res.name,
                f"restored {display_path(res.output_path)} from the state store ({action.reason})",
            )
        )
        return True

    # -----------------------------------------------------------------------------------------
    # cancel

    def cancel(self, name: str, *, reason: str = "cancelled by a user") -> int:
        """Cancel the in-flight batches of a resource's active generations; return how many."""
        cancelled = 0
        for gen in self.store.generations(name):
            if gen.status in ("pending", "in_progress"):
                cancelled += self._cancel_generation(name, gen, status="cancelled", reason=reason)
        return cancelled

    def _cancel_generation(self, name: str, gen: GenerationRow, *, status: str, reason: str) -> int:
        row = self.store.get_resource(name)
        provider = self.provider_for(row.provider if row else "")
        n = 0
        for batch in self.store.batches(gen.id):
            if batch.remote_id is None and batch.status == "creating":
                # the create may have landed: find it (it is paid for) and cancel it too
                remote = self._find_remote(provider, batch)
                if remote is not None:
                    batch = self._bind_adopted(name, batch, remote)
            if batch.remote_id is None:
                if batch.status not in TERMINAL_STATUSES:  # an intent never submitted: abandon it
                    self.store.update_batch(batch.id, status="cancelled")
                continue
            if batch.status not in TERMINAL_STATUSES and batch.status != "cancelling":
                remote = provider.cancel_batch(batch.remote_id)
                self.store.update_batch(batch.id, **batch_fields(remote))
                n += 1
        with self.store.atomic():
            self.store.update_generation(gen.id, status=status)
            self.store.record_event(
                self.run_id,
                "cancel",
                resource=name,
                generation_id=gen.id,
                detail={"reason": reason, "batches": n},
            )
        self.report(Progress("cancel", name, f"{reason}: {n} batch(es) cancelled"))
        return n

    # -----------------------------------------------------------------------------------------

    def _generation(self, res: Resource) -> GenerationRow:
        gen = self.store.find_generation(res.name, res.spec_hash)
        if gen is None:  # the planner only routes here when it exists
            raise BatchspecError(f"no generation recorded for {res.name} {res.spec_hash[:12]}")
        return gen

    def _latest_attempts(self, generation_id: int) -> dict[int, int]:
        latest: dict[int, int] = {}
        for b in self.store.batches(generation_id):
            latest[b.shard] = max(latest.get(b.shard, 0), b.attempt)
        return latest

    def _usage(self, generation_id: int) -> dict[str, int]:
        totals = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        for b in self.store.batches(generation_id):
            for key in totals:
                totals[key] += getattr(b, key) or 0
        return totals

    def _relative(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.project.root.resolve()))
        except ValueError:
            return str(path)


# ---------------------------------------------------------------------------------------------


def desired_resource(res: Resource, facts: InputReport) -> DesiredResource:
    return DesiredResource(
        name=res.name,
        provider=res.provider,
        spec_hash=res.spec_hash,
        requests=facts.requests,
        input_bytes=facts.bytes,
        max_attempts=res.retry.max_attempts,
        suspend=res.suspend,
    )


def _rejection_text(errors: list[dict[str, Any]] | None) -> str:
    """Why the provider rejected a whole batch, located at the input's lines (first five)."""
    if not errors:
        return ""
    shown = [
        (f"input line {e['input_line']}: " if e.get("input_line") else "")
        + f"{e.get('message') or 'rejected'} ({e.get('code') or 'no code'})"
        for e in errors[:5]
    ]
    more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "; the provider rejected it: " + "; ".join(shown) + more


def _poll_message(batch: BatchRow, remote: RemoteBatch) -> str:
    c = remote.request_counts
    counts = f" {c.completed + c.failed}/{c.total}" if c and c.total else ""
    return f"batch {remote.id} {remote.status}{counts}"


def _now() -> str:
    # milliseconds: a requeue backoff of a few seconds is measured from terminal_at
    return utc_timestamp()
