"""Read what the state store has recorded, in the shape the pure planner takes.

This is the edge between the SQLite state and ``plan.make_plan``: it loads resources, their
generations and batches, asks the ledger how many requests each shard still has unresolved,
and hashes the result files on disk so the planner can notice a missing or edited file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from batchspec.blobstore import sha256_file
from batchspec.ledger import RequestLedger
from batchspec.plan import (
    FINISHED_GENERATION_STATUSES,
    DiskFacts,
    RecordedBatch,
    RecordedGeneration,
    RecordedResource,
    ShardProgress,
)
from batchspec.state import BatchRow, GenerationRow, StateStore


def load_recorded(store: StateStore, ledger: RequestLedger) -> dict[str, RecordedResource]:
    """Every resource the state tracks (forgotten ones excluded)."""
    recorded = {}
    for res in store.list_resources():
        gens = tuple(recorded_generation(store, ledger, g) for g in store.generations(res.name))
        recorded[res.name] = RecordedResource(
            name=res.name, provider=res.provider, generations=gens
        )
    return recorded


def recorded_generation(
    store: StateStore, ledger: RequestLedger, gen: GenerationRow
) -> RecordedGeneration:
    batches = store.batches(gen.id)
    latest: dict[int, int] = {}
    for b in batches:
        latest[b.shard] = max(latest.get(b.shard, 0), b.attempt)
    shards = ()
    if gen.status not in FINISHED_GENERATION_STATUSES:
        shards = tuple(
            ShardProgress(
                shard=c.shard,
                latest_attempt=latest.get(c.shard, 0),
                unresolved=c.unresolved,
                unresolved_bytes=c.unresolved_bytes,
            )
            for c in ledger.shard_counts(gen.id)
        )
    return RecordedGeneration(
        id=gen.id,
        spec_hash=gen.spec_hash,
        status=gen.status,
        requests=gen.requests or 0,
        succeeded=gen.succeeded or 0,
        failed=gen.failed or 0,
        output_sha256=gen.output_sha256,
        errors_sha256=gen.errors_sha256,
        batches=tuple(recorded_batch(b) for b in batches),
        shards=shards,
    )


def recorded_batch(b: BatchRow) -> RecordedBatch:
    return RecordedBatch(
        id=b.id,
        shard=b.shard,
        attempt=b.attempt,
        remote_id=b.remote_id,
        status=b.status or "intent",
        collected=b.collected_at is not None,
        requests=b.requests or 0,
    )


def observe_disk(
    paths: Iterable[tuple[str, Path, Path]], recorded: Mapping[str, RecordedResource]
) -> dict[str, DiskFacts]:
    """Hash result files on disk, only for resources whose results were written."""
    facts = {}
    for name, output_path, errors_path in paths:
        rec = recorded.get(name)
        if rec is None or not any(g.output_sha256 for g in rec.generations):
            continue
        facts[name] = DiskFacts(_sha_or_none(output_path), _sha_or_none(errors_path))
    return facts


def _sha_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None
