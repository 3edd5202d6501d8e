"""The state store: what batchspec has done, recorded in one SQLite file that is also the audit log.

Storage format (``state/batchspec.db`` by default; schema in ``m001_initial`` below):

* ``runs``: one row per command that read or changed state, with its provenance
  (``batchspec.state.runinfo.RunInfo``): user, host, pid, git commit/branch/dirty, CI run URL.
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
* ``lock``: at most one row, the run holding the writer lock (see ``batchspec.state.lock``).
* ``requests``: the request ledger, one row per request of a generation (written and read
  by ``batchspec.state.ledger``; created here so that all schema lives in one migration list).
* ``state_serial``: one counter, bumped by triggers on every change to resources,
  generations, batches and files: the recorded state a plan is computed from.

Promises:

* The database file is created mode 0600 (and its WAL siblings kept 0600), in WAL mode, with
  foreign keys on and a 30 s busy timeout. Migrations are named (``m001_initial``, ...),
  recorded in ``_sqlite_migrations`` and applied once, under a write lock.
* Every public write method is one transaction; inside ``atomic()`` it joins the caller's.
  The outermost transaction starts with BEGIN IMMEDIATE, so read-then-write sequences never
  fail half way with SQLITE_BUSY, and two processes never both pass a check (the lock relies
  on this).
* Timestamps are ISO-8601 UTC strings ending in 'Z' (``utc_timestamp``).
* Nothing here takes, reads or stores an API key or the environment.
* A ``StateStore`` is one connection: use it from one thread only.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from batchspec.errors import StateError
from batchspec.state.runinfo import RunInfo
from batchspec.wire.batch_status import TERMINAL_STATUSES

BUSY_TIMEOUT_SECONDS = 30.0
DB_FILE_MODE = 0o600
MIGRATION_SET = "batchspec"

GENERATION_STATUSES = frozenset(
    {"pending", "in_progress", "complete", "degraded", "superseded", "cancelled"}
)
#: a batch row's status before its remote create (remote statuses are stored as they came)
BATCH_INTENT_STATUS = "pending"
BATCH_TERMINAL_STATUSES = TERMINAL_STATUSES  # completed, failed, expired, cancelled


# ---------------------------------------------------------------------------------------------
# Timestamps


def utc_timestamp(moment: datetime | None = None) -> str:
    """``moment`` (default: now) as ISO-8601 UTC with millisecond precision and a 'Z'."""
    moment = moment or datetime.now(timezone.utc)
    if moment.tzinfo is None:
        raise ValueError("utc_timestamp needs an aware datetime")
    text = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    """The aware datetime of a timestamp written by ``utc_timestamp``."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _epoch_or_iso(value: int | float | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return utc_timestamp(datetime.fromtimestamp(value, timezone.utc))


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class RunRow:
    id: int
    command: str
    args: dict[str, Any]
    started_at: str
    ended_at: str | None
    exit_code: int | None
    user: str | None
    host: str | None
    pid: int | None
    git_commit: str | None
    git_branch: str | None
    git_dirty: bool | None
    ci_system: str | None
    ci_run_url: str | None
    version: str | None


@dataclass(frozen=True)
class ResourceRow:
    name: str
    provider: str
    manifest: str
    labels: dict[str, Any]
    current_generation_id: int | None
    first_seen_run: int | None
    updated_at: str
    forgotten_at: str | None

    @property
    def forgotten(self) -> bool:
        return self.forgotten_at is not None


@dataclass(frozen=True)
class GenerationRow:
    id: int
    resource: str
    spec_hash: str
    spec: dict[str, Any]
    input_sha256: str
    requests: int
    input_bytes: int
    status: str
    output_path: str | None
    errors_path: str | None
    output_sha256: str | None
    errors_sha256: str | None
    succeeded: int
    failed: int
    created_run: int | None
    created_at: str
    completed_at: str | None


@dataclass(frozen=True)
class FileRow:
    provider: str
    sha256: str
    remote_id: str
    bytes: int | None
    uploaded_at: str
    expires_at: str | None

    def is_expired(self, now: datetime | None = None) -> bool:
        """True if the provider said the file expires at or before ``now``."""
        if self.expires_at is None:
            return False
        return parse_timestamp(self.expires_at) <= (now or datetime.now(timezone.utc))


@dataclass(frozen=True)
class BatchRow:
    id: int
    generation_id: int
    shard: int
    attempt: int
    provider: str
    key: str
    remote_id: str | None
    input_sha256: str
    input_file_id: str | None
    requests: int
    status: str
    total: int | None
    completed: int | None
    failed: int | None
    output_file_id: str | None
    error_file_id: str | None
    output_sha256: str | None
    errors_sha256: str | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    reason: str | None
    provider_errors: list[Any] | None
    created_at: str
    updated_at: str
    submitted_at: str | None
    terminal_at: str | None
    collected_at: str | None

    @property
    def is_intent(self) -> bool:
        """Recorded before the remote create; the remote batch may or may not exist."""
        return self.remote_id is None

    @property
    def is_terminal(self) -> bool:
        return self.status in BATCH_TERMINAL_STATUSES


@dataclass(frozen=True)
class EventRow:
    id: int
    run_id: int | None
    at: str
    resource: str | None
    generation_id: int | None
    batch_id: int | None
    action: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class LockRow:
    """The run holding the writer lock. ``batchspec.state.lock.LockHolder`` is this class."""

    holder_id: str
    host: str
    pid: int
    command: str
    ci_run_url: str | None
    since: str
    heartbeat: str
    user: str | None = None


def _dumps(value: Any) -> str:
    # sort_keys: the same data always gives the same bytes, so the audit log diffs cleanly
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _run_row(d: Mapping[str, Any]) -> RunRow:
    dirty = d["git_dirty"]
    return RunRow(
        **{**d, "args": _loads(d["args"]), "git_dirty": None if dirty is None else bool(dirty)}
    )


def _resource_row(d: Mapping[str, Any]) -> ResourceRow:
    return ResourceRow(**{**d, "labels": _loads(d["labels"])})


def _generation_row(d: Mapping[str, Any]) -> GenerationRow:
    return GenerationRow(**{**d, "spec": _loads(d["spec"])})


def _batch_row(d: Mapping[str, Any]) -> BatchRow:
    return BatchRow(**{**d, "provider_errors": _loads(d["provider_errors"])})


def _event_row(d: Mapping[str, Any]) -> EventRow:
    return EventRow(**{**d, "detail": _loads(d["detail"]) or {}})


def _lock_row(d: Mapping[str, Any]) -> LockRow:
    return LockRow(**{k: v for k, v in d.items() if k != "id"})


# ---------------------------------------------------------------------------------------------
# Migrations. Never edit one that has shipped: add m002_..., m003_... instead.

MIGRATIONS = Migrations(MIGRATION_SET)
_KNOWN_MIGRATIONS: list[str] = []


def _migration(fn: Callable[[Database], None]) -> Callable[[Database], None]:
    _KNOWN_MIGRATIONS.append(fn.__name__)
    return MIGRATIONS()(fn)


_SERIAL_TABLES = ("resources", "generations", "batches", "files")

_M001_SQL = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    command TEXT NOT NULL,
    args TEXT NOT NULL CHECK (json_valid(args)),
    started_at TEXT NOT NULL,
    ended_at TEXT,
    exit_code INTEGER,
    user TEXT,
    host TEXT,
    pid INTEGER,
    git_commit TEXT,
    git_branch TEXT,
    git_dirty INTEGER CHECK (git_dirty IN (0, 1)),
    ci_system TEXT,
    ci_run_url TEXT,
    version TEXT
);
CREATE TABLE resources (
    name TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    manifest TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(labels)),
    current_generation_id INTEGER REFERENCES generations(id),
    first_seen_run INTEGER REFERENCES runs(id),
    updated_at TEXT NOT NULL,
    forgotten_at TEXT
);
CREATE TABLE generations (
    id INTEGER PRIMARY KEY,
    resource TEXT NOT NULL REFERENCES resources(name),
    spec_hash TEXT NOT NULL,
    spec TEXT NOT NULL CHECK (json_valid(spec)),
    input_sha256 TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input_bytes INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN
        ('pending', 'in_progress', 'complete', 'degraded', 'superseded', 'cancelled')),
    output_path TEXT,
    errors_path TEXT,
    output_sha256 TEXT,
    errors_sha256 TEXT,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    created_run INTEGER REFERENCES runs(id),
    created_at TEXT NOT NULL,
    completed_at TEXT,
    UNIQUE (resource, spec_hash)
);
CREATE TABLE files (
    provider TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    bytes INTEGER,
    uploaded_at TEXT NOT NULL,
    expires_at TEXT,
    PRIMARY KEY (provider, sha256)
);
CREATE TABLE batches (
    id INTEGER PRIMARY KEY,
    generation_id INTEGER NOT NULL REFERENCES generations(id),
    shard INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    provider TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,
    remote_id TEXT,
    input_sha256 TEXT NOT NULL,
    input_file_id TEXT,
    requests INTEGER NOT NULL,
    status TEXT NOT NULL,
    total INTEGER,
    completed INTEGER,
    failed INTEGER,
    output_file_id TEXT,
    error_file_id TEXT,
    output_sha256 TEXT,
    errors_sha256 TEXT,
    input_tokens INTEGER,
    output_tokens INTEGER,
    total_tokens INTEGER,
    reason TEXT,
    provider_errors TEXT CHECK (provider_errors IS NULL OR json_valid(provider_errors)),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    submitted_at TEXT,
    terminal_at TEXT,
    collected_at TEXT,
    UNIQUE (generation_id, shard, attempt)
);
CREATE INDEX batches_remote_id ON batches(provider, remote_id);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER REFERENCES runs(id),
    at TEXT NOT NULL,
    resource TEXT,
    generation_id INTEGER REFERENCES generations(id),
    batch_id INTEGER REFERENCES batches(id),
    action TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(detail))
);
CREATE INDEX events_run ON events(run_id);
CREATE INDEX events_resource ON events(resource);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only: UPDATE is not allowed'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only: DELETE is not allowed'); END;
CREATE TABLE lock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder_id TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    command TEXT NOT NULL,
    ci_run_url TEXT,
    since TEXT NOT NULL,
    heartbeat TEXT NOT NULL,
    user TEXT
);
CREATE TABLE state_serial (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO state_serial (id, value) VALUES (1, 0);
"""


def _serial_triggers(table: str) -> str:
    return "\n".join(
        f"CREATE TRIGGER {table}_serial_{op.lower()} AFTER {op} ON {table} "
        "BEGIN UPDATE state_serial SET value = value + 1 WHERE id = 1; END;"
        for op in ("INSERT", "UPDATE", "DELETE")
    )


@_migration
def m001_initial(db: Database) -> None:
    """Runs, resources, generations, files, batches, the append-only events, the lock."""
    db.executescript(_M001_SQL + "\n".join(_serial_triggers(t) for t in _SERIAL_TABLES))


_M002_SQL = """
CREATE TABLE requests (
    generation_id INTEGER NOT NULL REFERENCES generations(id),
    custom_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'retryable', 'ok', 'failed')),
    category TEXT,
    blob TEXT,
    offset INTEGER,
    length INTEGER,
    attempt INTEGER,
    sent_attempt INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (generation_id, custom_id)
) WITHOUT ROWID;
CREATE INDEX requests_line ON requests(generation_id, line);
CREATE INDEX requests_shard ON requests(generation_id, shard, state);
"""


@_migration
def m002_request_ledger(db: Database) -> None:
    """The request ledger (batchspec.state.ledger): one row per request of a generation.

    No serial triggers here: ledger rows change only together with a batch or generation
    row, which bumps the serial, and a trigger per row would slow 50,000-row inserts.
    """
    db.executescript(_M002_SQL)


@_migration
def m003_request_fingerprints(db: Database) -> None:
    """``requests.request_sha``: the sha256 of each request line, so a new generation can
    keep the results of requests that did not change (row-level incremental apply)."""
    db.executescript(
        "ALTER TABLE requests ADD COLUMN request_sha TEXT;"
        "CREATE INDEX requests_fingerprint ON requests(custom_id, request_sha);"
    )


# ---------------------------------------------------------------------------------------------
# The store

_GENERATION_FIELDS = frozenset(
    {
        "status",
        "output_path",
        "errors_path",
        "output_sha256",
        "errors_sha256",
        "succeeded",
        "failed",
        "completed_at",
    }
)
_BATCH_FIELDS = frozenset(
    {
        "remote_id",
        "input_file_id",
        "requests",
        "status",
        "total",
        "completed",
        "failed",
        "output_file_id",
        "error_file_id",
        "output_sha256",
        "errors_sha256",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "reason",
        "provider_errors",
        "submitted_at",
        "terminal_at",
        "collected_at",
        "updated_at",
    }
)
_GENERATION_DONE = frozenset({"complete", "degraded"})


class StateStore:
    """One connection to the state database. Open with ``StateStore.open(path)``."""

    def __init__(self, db: Database, path: Path) -> None:
        self.db = db
        self.path = path

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> StateStore:
        """Open (creating if needed, mode 0600) and migrate the state database at ``path``."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _create_private_file(path)
            # isolation_level=None: no implicit transactions, so a write outside atomic() (say
            # a raw executemany) commits at once instead of leaving a transaction open that
            # a later atomic() would join as a savepoint and never commit.
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        except OSError as err:
            raise StateError(
                f"cannot create the state database {path}: {err.strerror or err}; "
                "check that the folder is writable, or set state.path in batchspec.yaml"
            ) from err
        store = cls(Database(conn), path)
        try:
            store._configure()
            store._migrate()
        except BaseException:
            conn.close()
            raise
        _restrict_siblings(path)
        return store

    def _configure(self) -> None:
        try:
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            self.db.execute("PRAGMA foreign_keys = ON")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise StateError(
                f"{self.path} is not a usable batchspec state database ({err}); "
                "move it away, or set state.path in batchspec.yaml to another file"
            ) from err
        if str(mode).lower() != "wal":
            raise StateError(f"cannot switch {self.path} to WAL mode (got {mode!r})")

    def _migrate(self) -> None:
        unknown = [m.name for m in MIGRATIONS.applied(self.db) if m.name not in _KNOWN_MIGRATIONS]
        if unknown:
            raise StateError(
                f"{self.path} was written by a newer batchspec (unknown migrations: "
                f"{', '.join(unknown)}); upgrade batchspec to use it"
            )
        if not MIGRATIONS.pending(self.db):
            return  # the cheap path: an up-to-date database takes no write lock
        with self.atomic():  # BEGIN IMMEDIATE: concurrent openers migrate one at a time
            MIGRATIONS.apply(self.db)

    def applied_migrations(self) -> list[str]:
        """Names of the migrations applied to this database, in order."""
        return [m.name for m in MIGRATIONS.applied(self.db)]

    def close(self) -> None:
        self.db.close()

    @property
    def in_transaction(self) -> bool:
        """True inside ``atomic()`` (SQLite's write lock is held)."""
        return self.db.conn.in_transaction

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def atomic(self) -> Iterator[StateStore]:
        """One transaction: everything inside commits together or not at all.

        Nested calls become savepoints (``Database.atomic``). The outermost one starts with
        BEGIN IMMEDIATE, taking SQLite's write lock up front (waiting up to the busy timeout).
        """
        conn = self.db.conn
        if conn.in_transaction:
            with self.db.atomic():
                yield self
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise StateError(
                f"the state database {self.path} stayed busy for {BUSY_TIMEOUT_SECONDS:.0f} s "
                f"({err}); another process is writing to it, try again"
            ) from err
        try:
            yield self
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _one(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        return next(iter(self.db.query(sql, params)), None)

    def _all(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def serial(self) -> int:
        """A number that changes whenever resources, generations, batches or files change.

        Runs, events and the lock do not count: a plan depends only on the recorded state,
        so ``apply`` compares this with the plan's to detect a stale plan.
        """
        row = self._one("SELECT value FROM state_serial WHERE id = 1")
        return int(row["value"]) if row else 0

    # -- runs and events ------------------------------------------------------------------------

    def start_run(self, command: str, args: Mapping[str, Any], info: RunInfo) -> int:
        """Record the start of a run; returns its id."""
        dirty = None if info.git_dirty is None else int(info.git_dirty)
        with self.atomic():
            cur = self.db.execute(
                "INSERT INTO runs (command, args, started_at, user, host, pid, git_commit, "
                "git_branch, git_dirty, ci_system, ci_run_url, version) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    command,
                    _dumps(dict(args)),
                    utc_timestamp(),
                    info.user,
                    info.host,
                    info.pid,
                    info.git_commit,
                    info.git_branch,
                    dirty,
                    info.ci_system,
                    info.ci_run_url,
                    info.version,
                ),
            )
            return _lastrowid(cur)

    def finish_run(self, run_id: int, exit_code: int) -> None:
        """Record the end of a run and its exit code."""
        with self.atomic():
            cur = self.db.execute(
                "UPDATE runs SET ended_at = ?, exit_code = ? WHERE id = ?",
                (utc_timestamp(), exit_code, run_id),
            )
            if cur.rowcount != 1:
                raise StateError(f"run {run_id} is not recorded in {self.path}")

    def get_run(self, run_id: int) -> RunRow:
        row = self._one("SELECT * FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise StateError(f"run {run_id} is not recorded in {self.path}")
        return _run_row(row)

    def runs(self, *, resource: str | None = None, limit: int = 20) -> list[RunRow]:
        """Runs, newest first; with ``resource``, only runs that recorded events for it."""
        if resource is None:
            rows = self._all("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._all(
                "SELECT * FROM runs WHERE id IN (SELECT run_id FROM events WHERE resource = ?) "
                "ORDER BY id DESC LIMIT ?",
                (resource, limit),
            )
        return [_run_row(r) for r in rows]

    def record_event(
        self,
        run_id: int | None,
        action: str,
        *,
        resource: str | None = None,
        generation_id: int | None = None,
        batch_id: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one event to the audit log; returns its id."""
        with self.atomic():
            cur = self.db.execute(
                "INSERT INTO events (run_id, at, resource, generation_id, batch_id, action, "
                "detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    utc_timestamp(),
                    resource,
                    generation_id,
                    batch_id,
                    action,
                    _dumps(dict(detail or {})),
                ),
            )
            return _lastrowid(cur)

    def events(
        self, *, run_id: int | None = None, resource: str | None = None, limit: int | None = None
    ) -> list[EventRow]:
        """Events in the order they happened; with ``limit``, the most recent ``limit``."""
        where, params = _where(run_id=run_id, resource=resource)
        sql = f"SELECT * FROM events {where} ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_event_row(r) for r in reversed(self._all(sql, params))]

    def last_batch_event(self, batch_id: int, action: str) -> EventRow | None:
        """The most recent ``action`` event recorded for one batch, if any."""
        row = self._one(
            "SELECT * FROM events WHERE batch_id = ? AND action = ? ORDER BY id DESC LIMIT 1",
            (batch_id, action),
        )
        return None if row is None else _event_row(row)

    # -- resources ------------------------------------------------------------------------------

    def upsert_resource(
        self,
        name: str,
        *,
        provider: str,
        manifest: str,
        labels: Mapping[str, Any],
        run_id: int | None,
    ) -> ResourceRow:
        """Record a resource seen in the manifests (un-forgetting it); no write if unchanged."""
        with self.atomic():
            old = self.get_resource(name)
            labels_json = _dumps(dict(labels))
            if old is None:
                self.db.execute(
                    "INSERT INTO resources (name, provider, manifest, labels, first_seen_run, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (name, provider, manifest, labels_json, run_id, utc_timestamp()),
                )
            elif (old.provider, old.manifest, _dumps(old.labels), old.forgotten_at) != (
                provider,
                manifest,
                labels_json,
                None,
            ):
                self.db.execute(
                    "UPDATE resources SET provider = ?, manifest = ?, labels = ?, "
                    "forgotten_at = NULL, updated_at = ? WHERE name = ?",
                    (provider, manifest, labels_json, utc_timestamp(), name),
                )
            return self._resource(name)

    def get_resource(self, name: str) -> ResourceRow | None:
        row = self._one("SELECT * FROM resources WHERE name = ?", (name,))
        return None if row is None else _resource_row(row)

    def _resource(self, name: str) -> ResourceRow:
        row = self.get_resource(name)
        if row is None:
            raise StateError(f"resource {name!r} is not recorded in {self.path}")
        return row

    def list_resources(self, include_forgotten: bool = False) -> list[ResourceRow]:
        """Recorded resources by name; forgotten ones only if asked."""
        sql = "SELECT * FROM resources"
        if not include_forgotten:
            sql += " WHERE forgotten_at IS NULL"
        return [_resource_row(r) for r in self._all(sql + " ORDER BY name")]

    def set_current_generation(self, name: str, generation_id: int | None) -> ResourceRow:
        """Point a resource at one of its own generations (or at none)."""
        with self.atomic():
            old = self._resource(name)
            if generation_id is not None and self.get_generation(generation_id).resource != name:
                raise StateError(f"generation {generation_id} does not belong to resource {name!r}")
            if old.current_generation_id != generation_id:
                self.db.execute(
                    "UPDATE resources SET current_generation_id = ?, updated_at = ? WHERE name = ?",
                    (generation_id, utc_timestamp(), name),
                )
            return self._resource(name)

    def forget_resource(self, name: str) -> ResourceRow:
        """Mark a resource forgotten; its generations, batches and events stay as history."""
        with self.atomic():
            old = self._resource(name)
            if old.forgotten_at is None:
                now = utc_timestamp()
                self.db.execute(
                    "UPDATE resources SET forgotten_at = ?, updated_at = ? WHERE name = ?",
                    (now, now, name),
                )
            return self._resource(name)

    def rename_resource(
        self,
        old: str,
        new: str,
        *,
        respecs: Mapping[int, tuple[str, Mapping[str, Any]]] | None = None,
    ) -> ResourceRow:
        """Move resource ``old``'s record to the name ``new``, in one transaction.

        The resource row takes the new name (keeping its first-seen run and current
        generation) and its generations follow; ``respecs`` maps a generation id to its new
        ``(spec_hash, spec)``, since the spec hash covers the name (see ``batchspec.core.moves``).
        Batches, the request ledger and results hang off generation ids and are untouched.
        Events are append-only history and keep the old name. ``StateError`` if ``old`` is
        not recorded or ``new`` is (forgotten or not).
        """
        with self.atomic():
            self._resource(old)
            if self.get_resource(new) is not None:
                raise StateError(f"cannot rename {old!r} to {new!r}: {new!r} is recorded already")
            # generations.resource references resources.name: insert the new row first, move
            # the generations, then drop the old row.
            self.db.execute(
                "INSERT INTO resources (name, provider, manifest, labels, current_generation_id, "
                "first_seen_run, updated_at, forgotten_at) SELECT ?, provider, manifest, labels, "
                "current_generation_id, first_seen_run, ?, forgotten_at FROM resources "
                "WHERE name = ?",
                (new, utc_timestamp(), old),
            )
            self.db.execute("UPDATE generations SET resource = ? WHERE resource = ?", (new, old))
            for generation_id, (spec_hash, spec) in (respecs or {}).items():
                self.db.execute(
                    "UPDATE generations SET spec_hash = ?, spec = ? WHERE id = ? AND resource = ?",
                    (spec_hash, _dumps(dict(spec)), generation_id, new),
                )
            self.db.execute("DELETE FROM resources WHERE name = ?", (old,))
            return self._resource(new)

    # -- generations ----------------------------------------------------------------------------

    def create_generation(
        self,
        resource: str,
        *,
        spec_hash: str,
        spec: Mapping[str, Any],
        input_sha256: str,
        requests: int,
        input_bytes: int,
        output_path: str | None,
        errors_path: str | None,
        run_id: int | None,
    ) -> GenerationRow:
        """A new pending generation, or the existing one for (resource, spec_hash) unchanged."""
        with self.atomic():
            existing = self.find_generation(resource, spec_hash)
            if existing is not None:
                return existing
            self._resource(resource)
            cur = self.db.execute(
                "INSERT INTO generations (resource, spec_hash, spec, input_sha256, requests, "
                "input_bytes, status, output_path, errors_path, created_run, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                (
                    resource,
                    spec_hash,
                    _dumps(dict(spec)),
                    input_sha256,
                    requests,
                    input_bytes,
                    output_path,
                    errors_path,
                    run_id,
                    utc_timestamp(),
                ),
            )
            return self.get_generation(_lastrowid(cur))

    def get_generation(self, generation_id: int) -> GenerationRow:
        row = self._one("SELECT * FROM generations WHERE id = ?", (generation_id,))
        if row is None:
            raise StateError(f"generation {generation_id} is not recorded in {self.path}")
        return _generation_row(row)

    def find_generation(self, resource: str, spec_hash: str) -> GenerationRow | None:
        row = self._one(
            "SELECT * FROM generations WHERE resource = ? AND spec_hash = ?",
            (resource, spec_hash),
        )
        return None if row is None else _generation_row(row)

    def generations(self, resource: str) -> list[GenerationRow]:
        """A resource's generations, oldest first."""
        rows = self._all("SELECT * FROM generations WHERE resource = ? ORDER BY id", (resource,))
        return [_generation_row(r) for r in rows]

    def update_generation(self, generation_id: int, **fields: Any) -> GenerationRow:
        """Change whitelisted columns; entering complete/degraded stamps ``completed_at``."""
        _check_fields("update_generation", fields, _GENERATION_FIELDS)
        status = fields.get("status")
        if status is not None and status not in GENERATION_STATUSES:
            raise ValueError(f"unknown generation status {status!r}")
        with self.atomic():
            old = self.get_generation(generation_id)
            if status in _GENERATION_DONE and old.completed_at is None:
                fields.setdefault("completed_at", utc_timestamp())
            changed = _changed(old, fields)
            if changed:
                self._update("generations", "id", generation_id, changed)
            return self.get_generation(generation_id)

    # -- batches --------------------------------------------------------------------------------

    def record_batch_intent(
        self,
        generation_id: int,
        *,
        shard: int,
        attempt: int,
        provider: str,
        key: str,
        input_sha256: str,
        requests: int,
        reason: str | None,
    ) -> BatchRow:
        """Record the intent to create a batch (remote_id NULL); idempotent on ``key``."""
        with self.atomic():
            existing = self.batch_by_key(key)
            if existing is not None:
                coords = (existing.generation_id, existing.shard, existing.attempt)
                if coords != (generation_id, shard, attempt):
                    raise StateError(
                        f"batch key {key!r} is already recorded for generation {coords[0]} "
                        f"shard {coords[1]} attempt {coords[2]}, not for generation "
                        f"{generation_id} shard {shard} attempt {attempt}"
                    )
                return existing
            now = utc_timestamp()
            try:
                cur = self.db.execute(
                    "INSERT INTO batches (generation_id, shard, attempt, provider, key, "
                    "input_sha256, requests, status, reason, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        generation_id,
                        shard,
                        attempt,
                        provider,
                        key,
                        input_sha256,
                        requests,
                        BATCH_INTENT_STATUS,
                        reason,
                        now,
                        now,
                    ),
                )
            except sqlite3.IntegrityError as err:
                raise StateError(
                    f"cannot record batch intent for generation {generation_id} shard {shard} "
                    f"attempt {attempt}: {err} (another key holds that slot, or the "
                    "generation is not recorded)"
                ) from err
            return self.get_batch(_lastrowid(cur))

    def update_batch(self, batch_id: int, **fields: Any) -> BatchRow:
        """Change whitelisted columns of a batch; no write if nothing changed.

        Stamps ``updated_at`` (or writes the one given) when something else changed: a poll
        that only brings a new ``updated_at`` writes nothing. Setting ``remote_id`` stamps
        ``submitted_at`` and a terminal ``status`` stamps ``terminal_at`` unless given or
        already set. A recorded remote_id never changes.
        """
        _check_fields("update_batch", fields, _BATCH_FIELDS)
        with self.atomic():
            old = self.get_batch(batch_id)
            new_remote = fields.get("remote_id")
            if old.remote_id is not None and "remote_id" in fields and new_remote != old.remote_id:
                raise StateError(
                    f"batch {batch_id} ({old.key}) is already bound to remote batch "
                    f"{old.remote_id}; refusing to re-bind it to {new_remote}"
                )
            now = utc_timestamp()
            if new_remote is not None and old.submitted_at is None:
                fields.setdefault("submitted_at", now)
            if fields.get("status") in BATCH_TERMINAL_STATUSES and old.terminal_at is None:
                fields.setdefault("terminal_at", now)
            changed = _changed(old, {k: v for k, v in fields.items() if k != "updated_at"})
            if changed:
                changed["updated_at"] = fields.get("updated_at") or now
                if "provider_errors" in changed:
                    errors = changed["provider_errors"]
                    changed["provider_errors"] = None if errors is None else _dumps(errors)
                self._update("batches", "id", batch_id, changed)
            return self.get_batch(batch_id)

    def get_batch(self, batch_id: int) -> BatchRow:
        row = self._one("SELECT * FROM batches WHERE id = ?", (batch_id,))
        if row is None:
            raise StateError(f"batch {batch_id} is not recorded in {self.path}")
        return _batch_row(row)

    def batch_by_key(self, key: str) -> BatchRow | None:
        row = self._one("SELECT * FROM batches WHERE key = ?", (key,))
        return None if row is None else _batch_row(row)

    def batch_by_remote_id(self, provider: str, remote_id: str) -> BatchRow | None:
        row = self._one(
            "SELECT * FROM batches WHERE provider = ? AND remote_id = ?", (provider, remote_id)
        )
        return None if row is None else _batch_row(row)

    def batches(
        self, generation_id: int | None = None, *, status: str | None = None
    ) -> list[BatchRow]:
        """Batches in the order they were recorded, optionally of one generation/status."""
        where, params = _where(generation_id=generation_id, status=status)
        return [
            _batch_row(r) for r in self._all(f"SELECT * FROM batches {where} ORDER BY id", params)
        ]

    def in_flight_batches(self) -> list[BatchRow]:
        """Batches created remotely whose status is not terminal yet: the ones to poll."""
        marks = ", ".join("?" * len(BATCH_TERMINAL_STATUSES))
        rows = self._all(
            f"SELECT * FROM batches WHERE remote_id IS NOT NULL AND status NOT IN ({marks}) "
            "ORDER BY id",
            sorted(BATCH_TERMINAL_STATUSES),
        )
        return [_batch_row(r) for r in rows]

    def pending_intents(self) -> list[BatchRow]:
        """Intents with no remote id (not abandoned as cancelled): adopt or create these."""
        marks = ", ".join("?" * len(BATCH_TERMINAL_STATUSES))
        rows = self._all(
            f"SELECT * FROM batches WHERE remote_id IS NULL AND status NOT IN ({marks}) "
            "ORDER BY id",
            sorted(BATCH_TERMINAL_STATUSES),
        )
        return [_batch_row(r) for r in rows]

    # -- files ----------------------------------------------------------------------------------

    def get_file(self, provider: str, sha256: str) -> FileRow | None:
        row = self._one("SELECT * FROM files WHERE provider = ? AND sha256 = ?", (provider, sha256))
        return None if row is None else FileRow(**row)

    def record_file(
        self,
        provider: str,
        sha256: str,
        remote_id: str,
        bytes: int | None,
        expires_at: int | float | str | None,
    ) -> FileRow:
        """Remember an uploaded file (replacing an older record); ``expires_at`` may be epoch s."""
        with self.atomic():
            self.db.execute(
                "INSERT OR REPLACE INTO files (provider, sha256, remote_id, bytes, uploaded_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (provider, sha256, remote_id, bytes, utc_timestamp(), _epoch_or_iso(expires_at)),
            )
            found = self.get_file(provider, sha256)
            assert found is not None  # just written in this transaction
            return found

    def forget_file(self, provider: str, sha256: str) -> None:
        """Drop a file record (e.g. the provider answered 404); a no-op if there is none."""
        with self.atomic():
            self.db.execute(
                "DELETE FROM files WHERE provider = ? AND sha256 = ?", (provider, sha256)
            )

    # -- the lock row (policy lives in batchspec.state.lock) --------------------------------

    def lock_row(self) -> LockRow | None:
        row = self._one("SELECT * FROM lock WHERE id = 1")
        return None if row is None else _lock_row(row)

    def write_lock_row(self, holder: LockRow) -> None:
        """Make ``holder`` the lock holder, replacing any other (policy: batchspec.state.lock)."""
        with self.atomic():
            self.db.execute(
                "INSERT OR REPLACE INTO lock (id, holder_id, host, pid, command, ci_run_url, "
                "since, heartbeat, user) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    holder.holder_id,
                    holder.host,
                    holder.pid,
                    holder.command,
                    holder.ci_run_url,
                    holder.since,
                    holder.heartbeat,
                    holder.user,
                ),
            )

    def touch_lock_row(self, holder_id: str, heartbeat: str) -> bool:
        """Set the heartbeat if ``holder_id`` still holds the lock; False if it does not."""
        with self.atomic():
            cur = self.db.execute(
                "UPDATE lock SET heartbeat = ? WHERE id = 1 AND holder_id = ?",
                (heartbeat, holder_id),
            )
            return cur.rowcount == 1

    def delete_lock_row(self, holder_id: str) -> bool:
        """Release the lock if ``holder_id`` holds it; False if it does not."""
        with self.atomic():
            cur = self.db.execute("DELETE FROM lock WHERE id = 1 AND holder_id = ?", (holder_id,))
            return cur.rowcount == 1

    # -- helpers --------------------------------------------------------------------------------

    def _update(self, table: str, key: str, value: Any, fields: Mapping[str, Any]) -> None:
        # column names come from the whitelists above, never from callers' strings
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(
            f"UPDATE {table} SET {assignments} WHERE {key} = ?", [*fields.values(), value]
        )


def _lastrowid(cur: sqlite3.Cursor) -> int:
    assert cur.lastrowid is not None
    return cur.lastrowid


def _where(**filters: Any) -> tuple[str, list[Any]]:
    used = {name: value for name, value in filters.items() if value is not None}
    if not used:
        return "", []
    return "WHERE " + " AND ".join(f"{name} = ?" for name in used), list(used.values())


def _check_fields(method: str, fields: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise TypeError(f"{method}() cannot set {', '.join(unknown)}")


def _changed(old: object, fields: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if getattr(old, name) != value}


def _create_private_file(path: Path) -> None:
    """Create ``path`` mode 0600 before SQLite does, so it is never readable by others."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, DB_FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, DB_FILE_MODE)  # os.open's mode is filtered by the umask; be exact
    finally:
        os.close(fd)


def _restrict_siblings(path: Path) -> None:
    """Keep the -wal and -shm files as private as the database (SQLite copies its mode)."""
    for suffix in ("-wal", "-shm", "-journal"):
        sibling = path.with_name(path.name + suffix)
        try:
            if sibling.stat().st_mode & 0o077:
                os.chmod(sibling, DB_FILE_MODE)
        except (FileNotFoundError, PermissionError):
            continue


__all__ = [
    "BATCH_INTENT_STATUS",
    "BATCH_TERMINAL_STATUSES",
    "GENERATION_STATUSES",
    "MIGRATIONS",
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
    "parse_timestamp",
    "utc_timestamp",
]
