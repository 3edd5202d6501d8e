"""The state store: what batchspec has done, in one database that is also the audit log.

Storage format (an SQLite file, ``state/batchspec.db`` by default, or a PostgreSQL database
named by a ``postgresql://`` URL; schema in ``batchspec.state.schema``, in both dialects):

* ``runs``: one row per command that read or changed state, with its provenance
  (``batchspec.state.runinfo.RunInfo``): user, host, pid, git commit (and its time)/branch/dirty,
  CI run URL; ``session_lock`` (PostgreSQL): the run holds a session lock keyed on its id
  until it records its end, so any host can tell a killed run (``batchspec.state.runs``).
* ``resources``: one row per manifest resource ever seen, keyed by name; ``forgotten_at`` is
  set instead of deleting, so history keeps making sense.
* ``generations``: one row per (resource, spec hash), with the spec as JSON, the input's
  sha256 and counts, and the sha256 of the output and errors files written for it.
* ``files``: input files uploaded to a provider, keyed by (provider, sha256) for dedup.
* ``batches``: one row per remote batch *attempt*. A row whose ``remote_id`` is NULL is a
  recorded **intent**: written before the remote create, with the deterministic ``key`` that
  is also sent in the batch metadata, so a crash between create and record can be repaired
  by adopting the remote batch that carries the key (DESIGN.md, invariant 1).
* ``events``: the append-only audit log; triggers make UPDATE and DELETE on it fail.
* ``resource_locks``: one row per locked resource (``*``: the whole workspace), naming the
  run that holds it (see ``batchspec.state.lock``); it replaced the one-row ``lock`` (m005).
* ``requests``: the request ledger, one row per request of a generation (written and read
  by ``batchspec.state.ledger``; created here so that all schema lives in one migration list).
* ``blobs``, ``blob_chunks``: with a PostgreSQL state, the result store's remote tier:
  collected files and shard files in chunks of 1 MiB (``batchspec.storage.remote_blobs``);
  empty in an SQLite state, whose blobs are in ``state/store/``.
* ``state_serial``: one counter, bumped by triggers on every change to resources,
  generations, batches and files: the recorded state a plan is computed from.

Promises:

* The database file is created mode 0600 (and its WAL siblings kept 0600), in WAL mode, with
  foreign keys on and a 30 s busy timeout (a run that is starting: its ``--lock-timeout``
  if longer: ``busy_wait``). Migrations are named (``m001_initial``, ...),
  recorded in ``_sqlite_migrations`` and applied once, in one transaction under the write
  lock, by the one runner, ``batchspec.storage.migrations``.
* Every public write method is one transaction; inside ``atomic()`` it joins the caller's.
  The outermost transaction starts with BEGIN IMMEDIATE, so read-then-write sequences never
  fail half way with SQLITE_BUSY, and two processes never both pass a check (the lock relies
  on this).
* Only a missing file starts a fresh store. An empty, truncated or foreign file at the path
  is refused with a StateError that points at a backup, never taken for an empty state
  (that would submit, and pay for, everything again). Columns we do not know are ignored.
* Timestamps are ISO-8601 UTC strings ending in 'Z' (``utc_timestamp``).
* Nothing here takes, reads or stores an API key or the environment.
* A ``StateStore`` is one connection: use it from one thread only.

Layout: ``StateStore`` is one object composed of a record class per table group, each with
its rows and its SQL: ``runs`` (runs, events), ``resources`` (resources, generations),
``batches`` (batches, files), ``ledger`` (``store.ledger()``), ``lock_row``, and
``snapshot`` (``store.reading()``: bulk reads for a read-only stretch), ``cached`` (a writer
transaction's reads, each made once); over
``connection`` (opening, migrating, transactions) and ``schema`` (the migrations). Callers
import everything from here.
"""

from __future__ import annotations

from batchspec.state.batches import (
    BATCH_INTENT_STATUS,
    BATCH_TERMINAL_STATUSES,
    BatchesAndFiles,
    BatchRow,
    FileRow,
)
from batchspec.state.cached import CachedReads
from batchspec.state.connection import BUSY_TIMEOUT_SECONDS
from batchspec.state.ledger import LedgerAccess
from batchspec.state.lock_row import WORKSPACE, LockRow, LockRows
from batchspec.state.records import parse_timestamp, utc_timestamp
from batchspec.state.resources import (
    GENERATION_STATUSES,
    GenerationRow,
    ResourceRow,
    ResourcesAndGenerations,
)
from batchspec.state.runs import EventRow, RunRow, RunsAndEvents
from batchspec.state.schema import (
    MIGRATION_SET,
    MIGRATIONS,
    m001_initial,
    m002_request_ledger,
    m003_request_fingerprints,
    m004_request_usage,
    m005_resource_locks,
)
from batchspec.state.snapshot import SnapshotReads


class StateStore(
    SnapshotReads,
    CachedReads,
    RunsAndEvents,
    ResourcesAndGenerations,
    BatchesAndFiles,
    LedgerAccess,
    LockRows,
):
    """One connection to the state database. Open with ``StateStore.open(path_or_url)``;
    ``reading()`` serves a read-only stretch's reads in a few queries (``state.snapshot``),
    and a writer transaction reads each of its rows once (``state.cached``)."""


__all__ = [
    "BATCH_INTENT_STATUS",
    "BATCH_TERMINAL_STATUSES",
    "BUSY_TIMEOUT_SECONDS",
    "WORKSPACE",
    "GENERATION_STATUSES",
    "MIGRATIONS",
    "MIGRATION_SET",
    "BatchRow",
    "EventRow",
    "FileRow",
    "GenerationRow",
    "LockRow",
    "ResourceRow",
    "RunRow",
    "StateStore",
    "m001_initial",
    "m002_request_ledger",
    "m003_request_fingerprints",
    "m004_request_usage",
    "m005_resource_locks",
    "parse_timestamp",
    "utc_timestamp",
]
