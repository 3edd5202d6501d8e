"""Bulk reads for a read-only stretch: the whole recorded state in a few queries, not N.

A plan over a thousand resources asks the store for each one's resource row, generations
and batches, and whether each generation has a ledger: four thousand small queries, most of
the time an ``apply`` spends after its last provider call. ``StateStore.reading()`` opens a
``ReadSnapshot`` for the block: the first of those reads loads every resource, generation
and batch in one query per table (and which generations have ledger rows in one more), and
the rest are answered from memory, in the order and shape the per-row queries give.

Promises:

* **Reads only.** The snapshot serves ``get_resource``, ``list_resources``,
  ``get_generation``, ``find_generation``, ``generations``, ``batches(generation_id)`` and
  ``ledger().has_requests``, and ``ledger().state_counts`` and ``usage_totals`` of the
  generations that are current or active; every other read goes to the database as before.
* **Never stale within the block.** Any write through the store (``atomic()``) inside the
  block ends the snapshot: the reads after it go to the database again (a write is rare in
  a read-only stretch; re-loading everything after each one would cost more than it saves).
* **One state.** The resources, generations and batches are read in one read-only
  transaction: a run committing while they are read is in all three or in none (the
  ledger's presence and counts are read when first asked, as before).
* **Constant queries.** A block costs five queries for these reads (the state's serial and
  the three tables between a BEGIN and a ROLLBACK, and which generations have ledger rows),
  and one per 500 current generations for the ledger counts, whatever the number of
  resources: what the plan at the end of a pass, ``status`` and the start of ``apply`` read
  (issue 13).
* **Loaded once per state.** The state's serial (``state_serial``) changes with every
  committed change to resources, generations and batches: a block that finds the serial the
  last load of the store read is served the rows that load made, without reading the three
  tables again (an ``apply`` loaded them five times, three of them unchanged). Only a load
  read in a transaction of its own is kept (one inside a caller's transaction may see a
  change that is later rolled back); the ledger's presence and counts are read per block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from batchspec.state.batches import BatchesAndFiles, BatchRow, _batch_row
from batchspec.state.ledger import LedgerAccess, RequestLedger, UsageTotals
from batchspec.state.resources import (
    GenerationRow,
    ResourceRow,
    ResourcesAndGenerations,
    _generation_row,
    _resource_row,
)
from batchspec.storage.sql import Sql

#: generation ids per query of ``ReadSnapshot.ledger_counts`` (well under both databases'
#: limits on bound parameters)
COUNT_CHUNK = 500
_ACTIVE = frozenset({"pending", "in_progress"})


@dataclass(frozen=True)
class LoadedTables:
    """The resources, generations and batches one ``ReadSnapshot.load`` read, at the state
    serial ``serial`` (never changed after the load: the blocks that take it only read)."""

    serial: int
    resources: dict[str, ResourceRow]
    generations: dict[str, list[GenerationRow]]
    generation_by_id: dict[int, GenerationRow]
    batches: dict[int, list[BatchRow]]


def _serial(db: Sql) -> int:
    row = db.execute("SELECT value FROM state_serial WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


@dataclass
class ReadSnapshot:
    """Every resource, generation and batch as one block's reads saw them (loaded lazily)."""

    resources: dict[str, ResourceRow] | None = None
    generations: dict[str, list[GenerationRow]] = field(default_factory=dict)
    generation_by_id: dict[int, GenerationRow] = field(default_factory=dict)
    batches: dict[int, list[BatchRow]] = field(default_factory=dict)
    with_requests: set[int] | None = None
    #: per generation (current or active ones only): {state: (count, usage count, in, out)}
    counts: dict[int, dict[str, tuple[int, int, int, int]]] | None = None
    #: (provider, remote id) -> batch, built from ``batches`` when first asked
    by_remote_id: dict[tuple[str, str], BatchRow] | None = None
    live: bool = True

    def batch_by_remote_id(self, provider: str, remote_id: str) -> BatchRow | None:
        """The loaded batch with that id at that provider: one dict for a pass that asks of
        every listed batch (a lost state's recovery), not one query each."""
        if self.by_remote_id is None:
            self.by_remote_id = {}
            for rows in self.batches.values():
                for b in rows:
                    if b.remote_id is not None:  # the first recorded, as the query's row
                        self.by_remote_id.setdefault((b.provider, b.remote_id), b)
        return self.by_remote_id.get((provider, remote_id))

    def load(self, db: Sql, last: LoadedTables | None = None) -> LoadedTables | None:
        """Read the three tables, one query each (rows in id order, as the per-row reads),
        all three in one read of the database (``_one_read``). Read in a transaction of its
        own, the load is kept with the state's serial (``state_serial``: bumped by every
        change to the three tables), and returned; ``last``, a load kept so, is taken as it
        is when the serial is still its own (a committed state has one serial)."""
        own = not db.in_transaction
        with _one_read(db):
            serial = _serial(db) if own else None
            if last is not None and serial == last.serial:
                self.resources = last.resources
                self.generations = last.generations
                self.generation_by_id = last.generation_by_id
                self.batches = last.batches
                return last
            rows = db.query("SELECT * FROM resources ORDER BY name")
            generations = db.query("SELECT * FROM generations ORDER BY id")
            batches = db.query("SELECT * FROM batches ORDER BY id")
        resources = [_resource_row(r) for r in rows]
        self.resources = {r.name: r for r in resources}
        for row in generations:
            gen = _generation_row(row)
            self.generations.setdefault(gen.resource, []).append(gen)
            self.generation_by_id[gen.id] = gen
        for row in batches:
            batch = _batch_row(row)
            self.batches.setdefault(batch.generation_id, []).append(batch)
        if serial is None:
            return None
        return LoadedTables(
            serial, self.resources, self.generations, self.generation_by_id, self.batches
        )

    def generations_with_requests(self, db: Sql) -> set[int]:
        """Ids of the generations whose ledger has rows (one query, an index probe each)."""
        if self.with_requests is None:
            rows = db.query(
                "SELECT g.id AS id FROM generations g WHERE EXISTS "
                "(SELECT 1 FROM requests r WHERE r.generation_id = g.id)"
            )
            self.with_requests = {int(r["id"]) for r in rows}
        return self.with_requests

    def ledger_counts(self, db: Sql) -> dict[int, dict[str, tuple[int, int, int, int]]]:
        """Each current or active generation's ledger rows by state, with their usage sums:
        ``ceil(N / COUNT_CHUNK)`` queries for N such generations (the others are not read:
        a long history's ledgers are asked for one by one, as before)."""
        if self.counts is None:
            ids = {r.current_generation_id for r in (self.resources or {}).values()}
            ids |= {g.id for g in self.generation_by_id.values() if g.status in _ACTIVE}
            wanted = sorted(i for i in ids if i is not None)
            self.counts = {i: {} for i in wanted}
            for start in range(0, len(wanted), COUNT_CHUNK):
                chunk = wanted[start : start + COUNT_CHUNK]
                rows = db.execute(
                    "SELECT generation_id, state, COUNT(*), COUNT(input_tokens), "
                    "SUM(input_tokens), SUM(output_tokens) FROM requests "
                    f"WHERE generation_id IN ({','.join('?' * len(chunk))}) "
                    "GROUP BY generation_id, state",
                    chunk,
                ).fetchall()
                for gen_id, state, n, used, inp, out in rows:
                    self.counts[int(gen_id)][state] = (
                        int(n),
                        int(used or 0),
                        int(inp or 0),
                        int(out or 0),
                    )
        return self.counts


@contextmanager
def _one_read(db: Sql) -> Iterator[None]:
    """The block's queries see one state of the database: a run that commits between two of
    them (another runner's apply on a shared state, which ``plan`` and ``status`` do not
    wait for) is seen by all of them or by none, never a resource row from before it with
    the generations and batches from after. A read-only transaction (PostgreSQL: repeatable
    read, one snapshot for the whole transaction; SQLite: a deferred one, whose first read
    fixes what the others see), rolled back; inside a caller's transaction, that one."""
    if db.in_transaction:
        yield
        return
    pg = db.dialect == "postgresql"
    db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if pg else "BEGIN")
    try:
        yield
    finally:
        db.rollback()


class SnapshotLedger(RequestLedger):
    """The request ledger, answering ``has_requests`` from the block's snapshot."""

    def __init__(self, db: Sql, snapshot: ReadSnapshot) -> None:
        super().__init__(db)
        self._snapshot = snapshot

    def has_requests(self, generation_id: int) -> bool:
        if not self._snapshot.live:
            return super().has_requests(generation_id)
        return generation_id in self._snapshot.generations_with_requests(self.db)

    def _counts(self, generation_id: int) -> dict[str, tuple[int, int, int, int]] | None:
        if not self._snapshot.live:
            return None
        return self._snapshot.ledger_counts(self.db).get(generation_id)

    def state_counts(self, generation_id: int) -> dict[str, int]:
        counts = self._counts(generation_id)
        if counts is None:
            return super().state_counts(generation_id)
        return {state: n for state, (n, *_) in counts.items()}

    def usage_totals(self, generation_id: int) -> UsageTotals:
        counts = self._counts(generation_id)
        if counts is None:
            return super().usage_totals(generation_id)
        rows = counts.values()
        return UsageTotals(
            sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows)
        )


class SnapshotReads(ResourcesAndGenerations, BatchesAndFiles, LedgerAccess):
    """The store's reads of resources, generations and batches, served from a
    ``ReadSnapshot`` inside ``reading()`` (see the module docstring)."""

    _snapshot: ReadSnapshot | None = None
    #: the last load read in a transaction of its own, for a later block at the same serial
    _loaded_tables: LoadedTables | None = None

    @contextmanager
    def reading(self) -> Iterator[None]:
        """A read-only stretch: its reads of resources, generations, batches and ledger
        presence cost a few queries in all. Nested blocks share the outer one's snapshot."""
        if self._snapshot is not None:
            yield
            return
        self._snapshot = ReadSnapshot()
        try:
            yield
        finally:
            self._snapshot.live = False
            self._snapshot = None

    def _loaded(self) -> ReadSnapshot | None:
        """The block's snapshot, loaded, or None outside a block (or after a write)."""
        snap = self._snapshot
        if snap is None or not snap.live:
            return None
        if snap.resources is None:
            self._loaded_tables = snap.load(self.db, self._loaded_tables) or self._loaded_tables
        return snap

    @contextmanager
    def atomic(self, *, one_write: bool = False, whole: bool = False) -> Iterator[Any]:
        if self._snapshot is not None:
            self._snapshot.live = False  # a write: the reads after it see the database
        with super().atomic(one_write=one_write, whole=whole) as conn:
            yield conn

    def get_resource(self, name: str) -> ResourceRow | None:
        snap = self._loaded()
        if snap is None or snap.resources is None:
            return super().get_resource(name)
        return snap.resources.get(name)

    def list_resources(self, include_forgotten: bool = False) -> list[ResourceRow]:
        snap = self._loaded()
        if snap is None or snap.resources is None:
            return super().list_resources(include_forgotten)
        return [r for r in snap.resources.values() if include_forgotten or not r.forgotten]

    def get_generation(self, generation_id: int) -> GenerationRow:
        snap = self._loaded()
        gen = None if snap is None else snap.generation_by_id.get(generation_id)
        return super().get_generation(generation_id) if gen is None else gen

    def find_generation(self, resource: str, spec_hash: str) -> GenerationRow | None:
        snap = self._loaded()
        if snap is None:
            return super().find_generation(resource, spec_hash)
        gens = snap.generations.get(resource, ())
        return next((g for g in gens if g.spec_hash == spec_hash), None)

    def generations(self, resource: str) -> list[GenerationRow]:
        snap = self._loaded()
        if snap is None:
            return super().generations(resource)
        return list(snap.generations.get(resource, ()))

    def batches(
        self, generation_id: int | None = None, *, status: str | None = None
    ) -> list[BatchRow]:
        snap = self._loaded()
        if snap is None or generation_id is None or status is not None:
            return super().batches(generation_id, status=status)
        return list(snap.batches.get(generation_id, ()))

    def batch_by_remote_id(self, provider: str, remote_id: str) -> BatchRow | None:
        snap = self._loaded()
        if snap is None:
            return super().batch_by_remote_id(provider, remote_id)
        return snap.batch_by_remote_id(provider, remote_id)

    def ledger(self) -> RequestLedger:
        snap = self._loaded()
        return super().ledger() if snap is None else SnapshotLedger(self.db, snap)
