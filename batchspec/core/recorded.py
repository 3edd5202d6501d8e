"""Read what the state store has recorded, in the shape the pure planner takes.

This is the edge between the SQLite state and ``plan.make_plan``: it loads resources, their
generations and batches, asks the ledger how many requests each shard still has unresolved,
and hashes the result files on disk so the planner can notice a missing or edited file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from batchspec.core.plan import (
    DiskFacts,
    RecordedBatch,
    RecordedGeneration,
    RecordedResource,
    ShardProgress,
)
from batchspec.state.ledger import RequestLedger
from batchspec.state.store import BatchRow, GenerationRow, StateStore, parse_timestamp
from batchspec.storage.blobstore import sha256_file
from batchspec.workspace.manifest import Resource
from batchspec.workspace.yamldoc import display_path

TOKEN_LIMIT_CODE = "token_limit_exceeded"
DEFAULT_REQUEUE_BACKOFF = 60.0  # seconds before the first resubmission; doubles, capped
MAX_REQUEUE_BACKOFF = 3600.0


#: a resource's generations, oldest first, each with its batches: the rows the plan is made
#: of, read once (``load_history``) and shared with what else reads them (``reconcile.hold``)
History = Sequence[tuple[GenerationRow, Sequence[BatchRow]]]


def resource_history(store: StateStore, name: str) -> History:
    """``name``'s generations, oldest first, each with its batches."""
    return [(gen, store.batches(gen.id)) for gen in store.generations(name)]


def load_history(store: StateStore) -> dict[str, History]:
    """Every recorded resource's ``History`` (forgotten ones too), by name."""
    return {
        res.name: resource_history(store, res.name)
        for res in store.list_resources(include_forgotten=True)
    }


def load_recorded(
    store: StateStore,
    ledger: RequestLedger,
    *,
    requeue_backoff: float = DEFAULT_REQUEUE_BACKOFF,
    history: Mapping[str, History] | None = None,
) -> dict[str, RecordedResource]:
    """Every resource the state has recorded; forgotten ones are flagged (never orphans);
    ``history``: their rows as ``load_history`` read them (else read here)."""
    recorded = {}
    for res in store.list_resources(include_forgotten=True):
        rows = resource_history(store, res.name) if history is None else history[res.name]
        gens = tuple(
            recorded_generation(store, ledger, g, requeue_backoff=requeue_backoff, batches=b)
            for g, b in rows
        )
        recorded[res.name] = RecordedResource(
            name=res.name,
            provider=res.provider,
            generations=gens,
            forgotten=res.forgotten_at is not None,
            labels=dict(res.labels or {}),
        )
    return recorded


def recorded_generation(
    store: StateStore,
    ledger: RequestLedger,
    gen: GenerationRow,
    *,
    requeue_backoff: float = DEFAULT_REQUEUE_BACKOFF,
    batches: Sequence[BatchRow] | None = None,
) -> RecordedGeneration:
    """``gen`` as the planner sees it; ``batches``: its rows, if already read."""
    batches = store.batches(gen.id) if batches is None else batches
    shards: tuple[ShardProgress, ...] = ()
    # While a batch is an intent, in flight or uncollected, the planner acts on it before it
    # looks at shards: skip the ledger scan (tens of ms per plan on a 50,000-request job).
    # A complete generation has nothing unresolved; a degraded one is scanned, since a raised
    # retry.maxAttempts gives its unresolved requests attempts again.
    busy = any(b.remote_id is None or b.collected_at is None for b in batches)
    if gen.status != "complete" and not busy:
        shards = tuple(
            ShardProgress(
                shard=c.shard,
                attempts_used=sum(1 for b in batches if b.shard == c.shard and not is_requeued(b)),
                unresolved=c.unresolved,
                unresolved_bytes=c.unresolved_bytes,
                not_before=_not_before([b for b in batches if b.shard == c.shard], requeue_backoff),
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
        output_path=gen.output_path,
    )


def is_requeued(b: BatchRow) -> bool:
    """A batch the provider refused for the organisation's enqueued-token limit: it does not
    use up an attempt, and its requests go again after a backoff."""
    return b.status == "failed" and any(
        isinstance(e, dict) and e.get("code") == TOKEN_LIMIT_CODE for e in (b.provider_errors or [])
    )


def _not_before(shard_batches: list[BatchRow], base: float) -> float | None:
    if not shard_batches:
        return None
    latest = max(shard_batches, key=lambda b: b.attempt)
    if not is_requeued(latest) or not latest.terminal_at:
        return None
    requeues = sum(1 for b in shard_batches if is_requeued(b))
    delay: float = min(base * 2 ** (requeues - 1), MAX_REQUEUE_BACKOFF)
    return parse_timestamp(latest.terminal_at).timestamp() + delay


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


#: a run's sha256 of each result file it hashed, with the file's stat when hashed (inode,
#: size, mtime and ctime in ns): the plans of one run hash an unchanged file once
DiskHashes = dict[Path, tuple[tuple[int, int, int, int], str]]

#: what plans made back to back, with nothing written between them, saw of each result
#: file (its sha256, None: not a file): apply's end-of-run plan and its statuses look at
#: the files once between them, not once each
DiskLook = dict[Path, str | None]


def observe_disk(
    paths: Iterable[tuple[str, Path, Path]],
    recorded: Mapping[str, RecordedResource],
    exports: Mapping[str, Iterable[Path]] | None = None,
    hashes: DiskHashes | None = None,
    look: DiskLook | None = None,
) -> dict[str, DiskFacts]:
    """Hash result files on disk, only for resources whose results were written; note the
    ``spec.export`` files (``exports``, by resource) that are missing. ``hashes``: the run's
    earlier hashes, taken again for a file whose stat has not changed since (and kept);
    ``look``: what a plan made just before (nothing written since) saw, taken as it is."""
    facts = {}
    for name, output_path, errors_path in paths:
        rec = recorded.get(name)
        if rec is None or not any(g.output_sha256 for g in rec.generations):
            continue
        gone = [display_path(p) for p in (exports or {}).get(name, ()) if not p.is_file()]
        output_sha = _looked(output_path, hashes, look)
        facts[name] = DiskFacts(
            output_sha,
            _looked(errors_path, hashes, look),
            tuple(gone),
            None if output_sha else _moved_from(output_path, rec),
        )
    return facts


def _moved_from(output_path: Path, rec: RecordedResource) -> str | None:
    """The path the results were last written to, when ``output_path`` is not it. The state
    records it relative to the project's root (or absolute outside it): a recorded path that
    ends ``output_path`` is the same file."""
    written = [g for g in rec.generations if g.output_sha256 and g.output_path]
    if not written:
        return None
    last = written[-1].output_path or ""
    same = Path(last).is_absolute() and Path(last) == output_path
    if same or output_path.as_posix().endswith("/" + Path(last).as_posix()):
        return None
    return last


def export_paths(resources: Iterable[Resource]) -> dict[str, list[Path]]:
    """Each resource's ``spec.export`` files, for ``observe_disk``."""
    return {r.name: [t.path for t in r.exports] for r in resources if r.exports}


def _looked(path: Path, hashes: DiskHashes | None, look: DiskLook | None) -> str | None:
    """``_sha_or_none``, answered from ``look`` when it saw ``path`` (and kept there)."""
    if look is None:
        return _sha_or_none(path, hashes)
    if path in look:
        return look[path]
    sha = look[path] = _sha_or_none(path, hashes)
    return sha


def _sha_or_none(path: Path, hashes: DiskHashes | None = None) -> str | None:
    """The file's sha256; None when it is not a file. A change to it (a write, a rename
    over it) in a later tick of the filesystem's clock changes its ctime, so a hash kept for
    the same stat is the file's (one in the same tick is seen by the next run, whose kept
    hashes start empty)."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    key = disk_key(st)
    kept = None if hashes is None else hashes.get(path)
    if kept is not None and kept[0] == key:
        return kept[1]
    sha = sha256_file(path)
    if hashes is not None:
        hashes[path] = (key, sha)
    return sha


def disk_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What a ``DiskHashes`` entry is kept for: the file's inode, size, mtime and ctime."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def remember_written(
    hashes: DiskHashes | None, path: Path, sha256: str, st: os.stat_result | None
) -> None:
    """Keep the hash of a file the run has just written itself (``sha256``, hashed as it was
    written), for the stat ``st`` it had as written (``blobstore.write_file_atomically``;
    None: unknown, nothing is kept): the plan after the write does not read it back to hash
    it. Any change since changes the stat, as with any kept hash."""
    if hashes is not None and st is not None:
        hashes[path] = (disk_key(st), sha256)
