"""Tests for batchspec.storage.migrations: the one runner, and the three databases that use it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations as SqliteUtilsMigrations

from batchspec.engine.store import Store
from batchspec.errors import StateError
from batchspec.providers.journal import Journal, JournalEntry
from batchspec.state import store as state_store
from batchspec.state.store import StateStore
from batchspec.storage.migrations import Migrations, split_statements
from batchspec.storage.sql import SqliteSql

TRIGGER_SCRIPT = """
CREATE TABLE items (id INTEGER PRIMARY KEY, note TEXT NOT NULL);
CREATE TABLE audit (item INTEGER, what TEXT);
-- a comment; with a semicolon
CREATE TRIGGER items_audit AFTER INSERT ON items
BEGIN
    INSERT INTO audit (item, what) VALUES (new.id, 'first; of two');
    INSERT INTO audit (item, what) VALUES (new.id, 'second');
END;
INSERT INTO items (note) VALUES ('a;b');
"""


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    yield db
    db.close()


def test_trigger_body_with_semicolons_migrates_whole(conn: sqlite3.Connection) -> None:
    """A trigger whose body holds two statements, and ';' in literals, are run whole."""
    migrations = Migrations("t")
    migrations.script("m001_initial", TRIGGER_SCRIPT)
    assert migrations.apply(conn) == ["m001_initial"]
    conn.execute("INSERT INTO items (note) VALUES ('c')")
    assert conn.execute("SELECT note FROM items ORDER BY id").fetchall() == [("a;b",), ("c",)]
    audit = conn.execute("SELECT item, what FROM audit ORDER BY rowid").fetchall()
    assert audit == [(1, "first; of two"), (1, "second"), (2, "first; of two"), (2, "second")]


def test_split_statements_keeps_triggers_and_literals_whole() -> None:
    """The splitter yields four statements for the trigger script, not one per ';'."""
    statements = split_statements(TRIGGER_SCRIPT)
    assert len(statements) == 4
    assert statements[2].startswith("-- a comment") and statements[2].endswith("END;")


def test_an_unfinished_statement_is_refused_when_declared() -> None:
    """A script ending inside a trigger body fails when registered, not on a user's machine."""
    with pytest.raises(ValueError, match="incomplete SQL"):
        Migrations("t").script("m001_initial", "CREATE TRIGGER t AFTER INSERT ON x BEGIN SELECT 1;")


def test_a_failing_migration_leaves_the_database_unchanged(conn: sqlite3.Connection) -> None:
    """All pending migrations are one transaction: a failure in m002 undoes m001 too."""
    migrations = Migrations("t")
    migrations.script("m001_initial", "CREATE TABLE a (x); INSERT INTO a VALUES (1);")

    @migrations
    def m002_broken(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE b (y)")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        migrations.apply(conn)
    assert not conn.in_transaction
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == set()
    assert migrations.applied(conn) == []


def test_apply_inside_a_transaction_uses_a_savepoint(conn: sqlite3.Connection) -> None:
    """Called inside the caller's transaction, the runner neither commits nor ends it."""
    migrations = Migrations("t")
    migrations.script("m001_initial", "CREATE TABLE a (x);")
    conn.execute("BEGIN")
    migrations.apply(conn)
    assert conn.in_transaction
    conn.execute("ROLLBACK")
    assert migrations.applied(conn) == []


def test_names_must_be_versioned_and_ascending() -> None:
    """Names look like m001_initial and versions only go up in registration order."""
    migrations = Migrations("t")
    with pytest.raises(ValueError, match="not like m001_initial"):
        migrations.script("initial", "SELECT 1;")
    migrations.script("m002_second", "SELECT 1;")
    with pytest.raises(ValueError, match="does not come after m002_second"):
        migrations.script("m001_first", "SELECT 1;")
    assert migrations._migrations[0].version == 2


def test_stop_before_and_later_upgrade_apply_each_once(conn: sqlite3.Connection) -> None:
    """A database stopped at m001 gets m002 later; each name is recorded exactly once."""
    migrations = Migrations("t")
    migrations.script("m001_initial", "CREATE TABLE a (x);")
    migrations.script("m002_more", "CREATE TABLE b (y);")
    assert migrations.apply(conn, stop_before="m002_more") == ["m001_initial"]
    assert migrations.apply(conn) == ["m002_more"]
    assert migrations.apply(conn) == []
    assert migrations.applied(conn) == ["m001_initial", "m002_more"]


def test_unknown_recorded_migration_is_refused(conn: sqlite3.Connection) -> None:
    """A migration recorded by a newer version is a StateError naming it; nothing runs."""
    newer = Migrations("t")
    newer.script("m001_initial", "CREATE TABLE a (x);")
    newer.script("m002_future", "CREATE TABLE b (y);")
    newer.apply(conn)
    older = Migrations("t")
    older.script("m001_initial", "CREATE TABLE a (x);")
    with pytest.raises(StateError, match="newer batchspec.*m002_future"):
        older.apply(conn)


# -- databases written before the shared runner ---------------------------------------------------


def test_state_database_tracked_by_sqlite_utils_is_recognised(tmp_path: Path) -> None:
    """A state DB whose history sqlite-utils' Migrations wrote opens as it is, rows kept."""
    path = tmp_path / "batchspec.db"
    old = SqliteUtilsMigrations("batchspec")  # what batchspec.state.store used before
    for fn in (
        state_store.m001_initial,
        state_store.m002_request_ledger,
        state_store.m003_request_fingerprints,
    ):
        old(name=fn.__name__)(lambda db, fn=fn: fn(SqliteSql(db.conn)))
    with Database(path) as db:
        old.apply(db)
        db.execute("INSERT INTO events (at, action, detail) VALUES ('t', 'old', '{}')")
        db.conn.commit()
    with StateStore.open(path) as store:
        assert store.applied_migrations() == state_store.MIGRATIONS.names
        assert [e.action for e in store.events()] == ["old"]
        rows = store.db.execute("SELECT count(*) FROM _sqlite_migrations").fetchone()[0]
    assert rows == len(state_store.MIGRATIONS.names)


# The engine's schema tracking before the shared runner (batchspec/engine/store.py at f249ec0).
OLD_ENGINE_TRACKING = "CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at INTEGER)"


def test_engine_database_with_its_old_migrations_table_is_adopted(tmp_path: Path) -> None:
    """An engine.db tracked by the old ``migrations`` table is adopted, its rows kept."""
    from batchspec.engine import store as engine_store

    db = sqlite3.connect(tmp_path / "engine.db", isolation_level=None)
    engine_store.m001_initial(db)  # shipped migrations never change
    db.execute(OLD_ENGINE_TRACKING)
    db.execute("INSERT INTO migrations VALUES ('m001_initial', 1700000000)")
    db.execute(
        "INSERT INTO files (id, sha256, bytes, filename, purpose, created_at) "
        "VALUES ('file-old', 'abc', 3, 'in.jsonl', 'batch', 1700000000)"
    )
    db.close()
    store = Store(tmp_path)
    try:
        assert store.db.execute("SELECT id FROM files").fetchall()[0][0] == "file-old"
        assert engine_store.MIGRATIONS.applied(store.db) == ["m001_initial"]
        names = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master")}
    finally:
        store.close()
    assert "migrations" not in names


# The Anthropic journal's schema before the shared runner (no history table at all).
OLD_JOURNAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS creates (
    key TEXT PRIMARY KEY,
    metadata TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    file_id TEXT NOT NULL,
    requests INTEGER NOT NULL,
    ids_sha256 TEXT NOT NULL,
    started_at REAL NOT NULL,
    remote_id TEXT UNIQUE
)
"""


def test_old_anthropic_journal_is_adopted_with_its_creates(tmp_path: Path) -> None:
    """A journal.db made by the old schema setup keeps its creates and gains a history."""
    db = sqlite3.connect(tmp_path / "journal.db", isolation_level=None)
    db.execute(OLD_JOURNAL_SCHEMA)
    db.execute(
        "INSERT INTO creates VALUES ('k1', '{\"a\": \"b\"}', '/v1/messages', 'staged-x', 2, "
        "'ids', 1.5, 'msgbatch_1')"
    )
    db.close()
    journal = Journal(tmp_path)
    try:
        assert journal.get("k1") == JournalEntry(
            "k1", {"a": "b"}, "/v1/messages", "staged-x", 2, "ids", 1.5, "msgbatch_1"
        )
    finally:
        journal.close()
    with sqlite3.connect(tmp_path / "journal.db") as check:
        history = check.execute("SELECT migration_set, name FROM _sqlite_migrations").fetchall()
    assert history == [("anthropic-journal", "m001_initial")]
