"""The state database's schema: its migrations, in order (run by batchspec.storage.migrations).

Tables and what they hold are described in ``batchspec.state.store``. Never edit a migration
that has shipped: add the next one.
"""

from __future__ import annotations

import sqlite3

from batchspec.storage.migrations import Migrations, run_script

MIGRATION_SET = "batchspec"

MIGRATIONS = Migrations(MIGRATION_SET)


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


@MIGRATIONS
def m001_initial(conn: sqlite3.Connection) -> None:
    """Runs, resources, generations, files, batches, the append-only events, the lock."""
    run_script(conn, _M001_SQL + "\n".join(_serial_triggers(t) for t in _SERIAL_TABLES))


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


@MIGRATIONS
def m002_request_ledger(conn: sqlite3.Connection) -> None:
    """The request ledger (batchspec.state.ledger): one row per request of a generation.

    No serial triggers here: ledger rows change only together with a batch or generation
    row, which bumps the serial, and a trigger per row would slow 50,000-row inserts.
    """
    run_script(conn, _M002_SQL)


@MIGRATIONS
def m003_request_fingerprints(conn: sqlite3.Connection) -> None:
    """``requests.request_sha``: the sha256 of each request line, so a new generation can
    keep the results of requests that did not change (row-level incremental apply)."""
    run_script(
        conn,
        "ALTER TABLE requests ADD COLUMN request_sha TEXT;"
        "CREATE INDEX requests_fingerprint ON requests(custom_id, request_sha);",
    )
