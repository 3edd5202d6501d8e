"""A write transaction's reads of resources, generations and batches, each made once.

``Reconciler.advance`` plans its resource again after every step, and each step reads the
resource's generation and batches again: a resource polled and collected in one pass read
its resource row 4 times, its generations 4, its batches 7 and its ledger's presence 3, most
of a pass's statements (issue 13). Inside the transaction ``begin_writer`` began (an
``atomic()`` block, a pass's ``CommitGroup``) no other connection changes the database: a
row read there stays what it is until this connection writes to its table or the
transaction ends. ``CachedReads`` keeps those reads for that long.

Promises:

* **What the database would answer.** Only reads made while this connection holds the
  writer lock (``Sql.writer_open``, inside a transaction) are kept and served. All of them
  are forgotten at every statement that begins or ends a transaction or rolls back to a
  savepoint, and before any statement that may write (``Sql.on_change``), what it may
  change: an ``INSERT``, ``UPDATE`` or ``DELETE`` forgets its table's rows (the ledger's:
  see below); a savepoint or its release forgets nothing; anything else it cannot place
  forgets all. (No foreign key of the schema cascades; its triggers write only
  ``state_serial`` and refuse writes to ``events``.)
* **A write keeps what it wrote.** ``update_batch`` and ``update_generation`` put the row
  their ``UPDATE ... RETURNING *`` gave back into the list it was read in, when the
  transaction is still the one the list was read in.
* **Served:** ``get_resource``, ``generations``, ``find_generation``, ``get_generation``,
  ``batches(generation_id)``, ``get_batch`` and ``ledger().has_requests`` and
  ``usage_totals``. A write to the ledger forgets its usage totals; only a DELETE of its
  rows forgets which generations have some, only an INSERT which have none. Lists are
  copies; rows are the frozen rows the queries made. A ``reading()`` snapshot, when live,
  answers first (``state.snapshot``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from batchspec.state.batches import BatchesAndFiles, BatchRow
from batchspec.state.ledger import LedgerAccess, RequestLedger, UsageTotals
from batchspec.state.resources import GenerationRow, ResourceRow, ResourcesAndGenerations
from batchspec.storage.sql import Sql

T = TypeVar("T")

#: a write whose table is known: INSERT, UPDATE, DELETE (either case, as both are written)
_WRITE = re.compile(
    r"\s*(insert|update|delete)\s+(?:or\s+\w+\s+)?(?:into\s+|from\s+)?\"?(\w+)", re.IGNORECASE
)
#: statements that change no row: a savepoint and its release; a temporary table's creation
_NO_ROWS = re.compile(
    r"\s*(?:savepoint|release)\b|\s*create\s+temp(?:orary)?\s+table\s+(?:if\s+not\s+exists\s+)?"
    r"(?!resources\b|generations\b|batches\b|requests\b)\w+\b",
    re.IGNORECASE,
)


@dataclass
class RowCache:
    """The rows one writer transaction has read, by what they were read by."""

    resources: dict[str, ResourceRow | None] = field(default_factory=dict)
    generations: dict[str, list[GenerationRow]] = field(default_factory=dict)
    generation_by_id: dict[int, GenerationRow] = field(default_factory=dict)
    batches: dict[int, list[BatchRow]] = field(default_factory=dict)
    batch_by_id: dict[int, BatchRow] = field(default_factory=dict)
    with_requests: dict[int, bool] = field(default_factory=dict)
    usage: dict[int, UsageTotals] = field(default_factory=dict)
    #: bumped each time everything is forgotten (a write kept only within one ``epoch``)
    epoch: int = 0

    def __post_init__(self) -> None:
        self.told: Callable[[str], None] = self.changing  # the hook, as set on the connection

    def changing(self, sql: str) -> None:
        """``Sql.on_change``: forget what ``sql`` may change, before it runs."""
        write = _WRITE.match(sql)
        if write is not None:
            self.forget(write.group(2).lower(), write.group(1).lower())
        elif _NO_ROWS.match(sql) is None:
            self.forget_all()

    def forget(self, table: str, verb: str = "delete") -> None:
        """Forget what an ``verb`` (insert, update, delete) of ``table``'s rows may change."""
        if table == "resources":
            self.resources.clear()
        elif table == "generations":
            self.generations.clear()
            self.generation_by_id.clear()
        elif table == "batches":
            self.batches.clear()
            self.batch_by_id.clear()
        elif table == "requests":
            self.usage.clear()
            if verb == "delete":
                self.with_requests.clear()
            elif verb == "insert":  # a ledger written: only "no rows" may be wrong now
                self.with_requests = {gen: True for gen, has in self.with_requests.items() if has}

    def forget_all(self) -> None:
        self.resources.clear()
        self.generations.clear()
        self.generation_by_id.clear()
        self.batches.clear()
        self.batch_by_id.clear()
        self.with_requests.clear()
        self.usage.clear()
        self.epoch += 1

    def keep_batches(self, generation_id: int, rows: list[BatchRow]) -> None:
        self.batches[generation_id] = rows
        self.batch_by_id.update((row.id, row) for row in rows)

    def generation(self, generation_id: int) -> GenerationRow | None:
        found = self.generation_by_id.get(generation_id)
        if found is not None:
            return found
        for rows in self.generations.values():
            for row in rows:
                if row.id == generation_id:
                    return row
        return None


class CachedReads(ResourcesAndGenerations, BatchesAndFiles, LedgerAccess):
    """The store's reads of resources, generations, batches and ledger presence, kept for
    the writer transaction they were made in (see the module docstring)."""

    _rows: RowCache | None = None

    def _cache(self) -> RowCache | None:
        """The transaction's rows; None outside a transaction holding the writer lock."""
        db = self.db
        if not (db.writer_open and db.in_transaction):
            return None
        rows = self._rows
        if rows is None or db.on_change is not rows.told:
            # told of every change from now on (a store over the same connection that took
            # the hook leaves this one nothing it read before)
            rows = self._rows = RowCache()
            db.on_change = rows.told
        return rows

    def get_resource(self, name: str) -> ResourceRow | None:
        rows = self._cache()
        if rows is None:
            return super().get_resource(name)
        if name in rows.resources:
            return rows.resources[name]
        found = rows.resources[name] = super().get_resource(name)
        return found

    def generations(self, resource: str) -> list[GenerationRow]:
        rows = self._cache()
        if rows is None:
            return super().generations(resource)
        found = rows.generations.get(resource)
        if found is None:
            found = rows.generations[resource] = super().generations(resource)
        return list(found)

    def find_generation(self, resource: str, spec_hash: str) -> GenerationRow | None:
        if self._cache() is None:
            return super().find_generation(resource, spec_hash)
        # (resource, spec_hash) is unique: the one of the resource's generations, if any
        return next((g for g in self.generations(resource) if g.spec_hash == spec_hash), None)

    def get_generation(self, generation_id: int) -> GenerationRow:
        rows = self._cache()
        if rows is None:
            return super().get_generation(generation_id)
        found = rows.generation(generation_id)
        if found is None:
            found = rows.generation_by_id[generation_id] = super().get_generation(generation_id)
        return found

    def update_generation(self, generation_id: int, **fields: Any) -> GenerationRow:
        rows = self._cache()
        read = None if rows is None else rows.generation(generation_id)
        kept = None if read is None or rows is None else rows.generations.get(read.resource)
        epoch = None if rows is None else rows.epoch
        new = super().update_generation(generation_id, **fields)
        if rows is not None and rows.epoch == epoch and self._cache() is rows:
            rows.generation_by_id[generation_id] = new
            if kept is not None:
                rows.generations[new.resource] = [new if g.id == new.id else g for g in kept]
        return new

    def batches(
        self, generation_id: int | None = None, *, status: str | None = None
    ) -> list[BatchRow]:
        rows = self._cache() if generation_id is not None and status is None else None
        if rows is None or generation_id is None:
            return super().batches(generation_id, status=status)
        found = rows.batches.get(generation_id)
        if found is None:
            found = super().batches(generation_id)
            rows.keep_batches(generation_id, found)
        return list(found)

    def get_batch(self, batch_id: int) -> BatchRow:
        rows = self._cache()
        found = None if rows is None else rows.batch_by_id.get(batch_id)
        return super().get_batch(batch_id) if found is None else found

    def update_batch(self, batch_id: int, **fields: Any) -> BatchRow:
        rows = self._cache()
        read = None if rows is None else rows.batch_by_id.get(batch_id)
        kept = None if read is None or rows is None else rows.batches.get(read.generation_id)
        epoch = None if rows is None else rows.epoch
        new = super().update_batch(batch_id, **fields)
        if kept is not None and rows is not None and rows.epoch == epoch and self._cache() is rows:
            rows.keep_batches(new.generation_id, [new if b.id == new.id else b for b in kept])
        return new

    def ledger(self) -> RequestLedger:
        return CachedLedger(self.db, self)


class CachedLedger(RequestLedger):
    """The request ledger, answering ``has_requests`` and ``usage_totals`` from the
    transaction's reads."""

    def __init__(self, db: Sql, store: CachedReads) -> None:
        super().__init__(db)
        self._store = store

    def has_requests(self, generation_id: int) -> bool:
        rows = self._store._cache()
        read = super().has_requests
        return (
            read(generation_id) if rows is None else _kept(rows.with_requests, generation_id, read)
        )

    def usage_totals(self, generation_id: int) -> UsageTotals:
        rows = self._store._cache()
        read = super().usage_totals
        return read(generation_id) if rows is None else _kept(rows.usage, generation_id, read)


def _kept(kept: dict[int, T], generation_id: int, read: Callable[[int], T]) -> T:
    """``kept``'s answer for the generation, read (and kept) the first time it is asked."""
    if generation_id not in kept:
        kept[generation_id] = read(generation_id)
    return kept[generation_id]
