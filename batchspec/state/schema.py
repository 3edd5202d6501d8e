"""The state database's schema: its migrations, in order (run by batchspec.storage.migrations).

Tables and what they hold are described in ``batchspec.state.store``. Never edit a migration
that has shipped: add the next one.

One schema, two dialects, one history: each migration holds its DDL for SQLite and for
PostgreSQL and runs the one of the database it is given (``db.dialect``); both record the same
migration names. The PostgreSQL DDL keeps the same tables, columns, keys and JSON checks;
``INTEGER PRIMARY KEY`` becomes an identity column (never reused, like ``AUTOINCREMENT``), counts
are ``BIGINT``, and the triggers (append-only ``events``, the ``state_serial`` counter) are
PL/pgSQL functions. ``events`` refuses TRUNCATE as well as UPDATE and DELETE there.
"""

from __future__ import annotations

from batchspec.storage.migrations import Migrations
from batchspec.storage.sql import Sql

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


_M001_POSTGRES = """
CREATE TABLE runs (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    command TEXT NOT NULL,
    args TEXT NOT NULL CHECK ((args::json) IS NOT NULL),
    started_at TEXT NOT NULL,
    ended_at TEXT,
    exit_code INTEGER,
    "user" TEXT,
    host TEXT,
    pid BIGINT,
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
    labels TEXT NOT NULL DEFAULT '{}' CHECK ((labels::json) IS NOT NULL),
    current_generation_id BIGINT,
    first_seen_run BIGINT REFERENCES runs(id),
    updated_at TEXT NOT NULL,
    forgotten_at TEXT
);
CREATE TABLE generations (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    resource TEXT NOT NULL REFERENCES resources(name),
    spec_hash TEXT NOT NULL,
    spec TEXT NOT NULL CHECK ((spec::json) IS NOT NULL),
    input_sha256 TEXT NOT NULL,
    requests BIGINT NOT NULL,
    input_bytes BIGINT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN
        ('pending', 'in_progress', 'complete', 'degraded', 'superseded', 'cancelled')),
    output_path TEXT,
    errors_path TEXT,
    output_sha256 TEXT,
    errors_sha256 TEXT,
    succeeded BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    created_run BIGINT REFERENCES runs(id),
    created_at TEXT NOT NULL,
    completed_at TEXT,
    UNIQUE (resource, spec_hash)
);
-- resources and generations reference each other: the second key comes after both tables
ALTER TABLE resources ADD FOREIGN KEY (current_generation_id) REFERENCES generations(id);
CREATE TABLE files (
    provider TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    bytes BIGINT,
    uploaded_at TEXT NOT NULL,
    expires_at TEXT,
    PRIMARY KEY (provider, sha256)
);
CREATE TABLE batches (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    generation_id BIGINT NOT NULL REFERENCES generations(id),
    shard INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    provider TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,
    remote_id TEXT,
    input_sha256 TEXT NOT NULL,
    input_file_id TEXT,
    requests BIGINT NOT NULL,
    status TEXT NOT NULL,
    total BIGINT,
    completed BIGINT,
    failed BIGINT,
    output_file_id TEXT,
    error_file_id TEXT,
    output_sha256 TEXT,
    errors_sha256 TEXT,
    input_tokens BIGINT,
    output_tokens BIGINT,
    total_tokens BIGINT,
    reason TEXT,
    provider_errors TEXT CHECK (provider_errors IS NULL OR (provider_errors::json) IS NOT NULL),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    submitted_at TEXT,
    terminal_at TEXT,
    collected_at TEXT,
    UNIQUE (generation_id, shard, attempt)
);
CREATE INDEX batches_remote_id ON batches(provider, remote_id);
CREATE TABLE events (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    run_id BIGINT REFERENCES runs(id),
    at TEXT NOT NULL,
    resource TEXT,
    generation_id BIGINT REFERENCES generations(id),
    batch_id BIGINT REFERENCES batches(id),
    action TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}' CHECK ((detail::json) IS NOT NULL)
);
CREATE INDEX events_run ON events(run_id);
CREATE INDEX events_resource ON events(resource);
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % is not allowed', TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();
CREATE TABLE lock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder_id TEXT NOT NULL,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    command TEXT NOT NULL,
    ci_run_url TEXT,
    since TEXT NOT NULL,
    heartbeat TEXT NOT NULL,
    "user" TEXT
);
CREATE TABLE state_serial (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO state_serial (id, value) VALUES (1, 0);
CREATE FUNCTION bump_state_serial() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE state_serial SET value = value + 1 WHERE id = 1;
    RETURN NULL;
END;
$$;
"""


def _serial_triggers_postgres(table: str) -> str:
    return "\n".join(
        f"CREATE TRIGGER {table}_serial_{op.lower()} AFTER {op} ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION bump_state_serial();"
        for op in ("INSERT", "UPDATE", "DELETE")
    )


@MIGRATIONS
def m001_initial(db: Sql) -> None:
    """Runs, resources, generations, files, batches, the append-only events, the lock."""
    if db.dialect == "postgresql":
        db.script(_M001_POSTGRES + "\n".join(_serial_triggers_postgres(t) for t in _SERIAL_TABLES))
    else:
        db.script(_M001_SQL + "\n".join(_serial_triggers(t) for t in _SERIAL_TABLES))


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


_M002_POSTGRES = """
CREATE TABLE requests (
    generation_id BIGINT NOT NULL REFERENCES generations(id),
    custom_id TEXT NOT NULL,
    line BIGINT NOT NULL,
    shard INTEGER NOT NULL,
    bytes BIGINT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'retryable', 'ok', 'failed')),
    category TEXT,
    blob TEXT,
    "offset" BIGINT,
    length BIGINT,
    attempt INTEGER,
    sent_attempt INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (generation_id, custom_id)
);
CREATE INDEX requests_line ON requests(generation_id, line);
CREATE INDEX requests_shard ON requests(generation_id, shard, state);
"""


@MIGRATIONS
def m002_request_ledger(db: Sql) -> None:
    """The request ledger (batchspec.state.ledger): one row per request of a generation.

    No serial triggers here: ledger rows change only together with a batch or generation
    row, which bumps the serial, and a trigger per row would slow 50,000-row inserts.
    """
    db.script(_M002_POSTGRES if db.dialect == "postgresql" else _M002_SQL)


@MIGRATIONS
def m003_request_fingerprints(db: Sql) -> None:
    """``requests.request_sha``: the sha256 of each request line, so a new generation can
    keep the results of requests that did not change (row-level incremental apply)."""
    db.script(  # the same SQL in both dialects
        "ALTER TABLE requests ADD COLUMN request_sha TEXT;"
        "CREATE INDEX requests_fingerprint ON requests(custom_id, request_sha);"
    )


_M004 = {
    "sqlite": "ALTER TABLE requests ADD COLUMN input_tokens INTEGER;"
    "ALTER TABLE requests ADD COLUMN output_tokens INTEGER;"
    "ALTER TABLE generations ADD COLUMN model TEXT;",
    "postgresql": "ALTER TABLE requests ADD COLUMN input_tokens BIGINT;"
    "ALTER TABLE requests ADD COLUMN output_tokens BIGINT;"
    "ALTER TABLE generations ADD COLUMN model TEXT;",
}


@MIGRATIONS
def m004_request_usage(db: Sql) -> None:
    """``requests.input_tokens`` / ``output_tokens``: the usage a collected answer reports
    (``batchspec.wire.usage``), so tokens and dollars sum per generation, resource and run.
    NULL when the answer reports none (or the row was carried over from an earlier generation,
    which paid for it). ``generations.model``: the model its requests name, for pricing
    when ``spec.model`` is not given."""
    db.script(_M004[db.dialect])


_M005 = {
    "sqlite": """
CREATE TABLE resource_locks (
    resource TEXT PRIMARY KEY,
    holder_id TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    command TEXT NOT NULL,
    ci_run_url TEXT,
    since TEXT NOT NULL,
    heartbeat TEXT NOT NULL,
    user TEXT
);
""",
    "postgresql": """
CREATE TABLE resource_locks (
    resource TEXT PRIMARY KEY,
    holder_id TEXT NOT NULL,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    command TEXT NOT NULL,
    ci_run_url TEXT,
    since TEXT NOT NULL,
    heartbeat TEXT NOT NULL,
    "user" TEXT
);
""",
}


@MIGRATIONS
def m005_resource_locks(db: Sql) -> None:
    """``resource_locks``: one row per locked resource, naming its holder, instead of the one
    ``lock`` row per state (``batchspec.state.lock``). The key ``*`` is the workspace-wide
    lock, which conflicts with every resource's. A run that held the old lock while this
    migration ran keeps it, as the workspace-wide lock (in PostgreSQL its old session lock
    still counts as alive: ``batchspec.state.lock._is_alive``)."""
    db.script(
        _M005[db.dialect]
        + "CREATE INDEX resource_locks_holder ON resource_locks(holder_id);"
        + "INSERT INTO resource_locks (resource, holder_id, host, pid, command, ci_run_url, "
        + "since, heartbeat, \"user\") SELECT '*', holder_id, host, pid, command, ci_run_url, "
        + 'since, heartbeat, "user" FROM lock;'
        + "DROP TABLE lock;"
    )


_M006 = {
    "sqlite": """
CREATE TABLE blobs (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    stored_at TEXT NOT NULL
);
CREATE TABLE blob_chunks (
    sha256 TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (sha256, seq)
) WITHOUT ROWID;
""",
    "postgresql": """
CREATE TABLE blobs (
    sha256 TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    chunks INTEGER NOT NULL,
    stored_at TEXT NOT NULL
);
CREATE TABLE blob_chunks (
    sha256 TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (sha256, seq)
);
""",
}


@MIGRATIONS
def m006_blobs(db: Sql) -> None:
    """``blobs`` and ``blob_chunks``: the result store's remote tier when the state is shared
    (``batchspec.storage.remote_blobs.PostgresBlobs``): collected files and shard files, in
    chunks of 1 MiB, so every runner can restore results. An SQLite state has the tables too
    (one schema for both) and leaves them empty: its blobs are in ``state/store/``."""
    db.script(_M006[db.dialect])


_M007 = {
    "sqlite": "ALTER TABLE runs ADD COLUMN git_commit_time INTEGER;",
    "postgresql": "ALTER TABLE runs ADD COLUMN git_commit_time BIGINT;",
}


@MIGRATIONS
def m007_run_commit_time(db: Sql) -> None:
    """``runs.git_commit_time``: the committer time (epoch seconds) of the run's
    ``git_commit``, so ``apply --prune`` can tell a commit newer than its checkout's from an
    older one it has no object of (a shallow clone, a squash-merged branch). NULL when
    unknown: no git, or a run recorded before this migration."""
    db.script(_M007[db.dialect])


_M008 = "ALTER TABLE runs ADD COLUMN session_lock INTEGER CHECK (session_lock IN (0, 1));"


@MIGRATIONS
def m008_run_session_lock(db: Sql) -> None:
    """``runs.session_lock``: 1 for a run recorded in PostgreSQL, which holds a session
    advisory lock keyed on its id (``batchspec.state.runs.run_session_key``) from the
    transaction that records it until it records its end, or its session ends: a run with no
    end whose lock is free was killed, as seen from any host. NULL: an SQLite state (the pid
    tells, on the run's own host), or a run recorded before this migration, or by a
    batchspec that predates it (whether it holds a lock is unknown: never called killed)."""
    db.script(_M008)
