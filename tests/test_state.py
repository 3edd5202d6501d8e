"""Tests for batchspec.state.store: the state store and its append-only audit log.

Tests taking ``store`` or ``state_location`` run once per backend (an SQLite file, a PostgreSQL
database: tests/conftest.py); those taking ``db_path`` pin what only the SQLite file has.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database

from batchspec.errors import StateError
from batchspec.state.ledger import CollectedLine, UsageTotals
from batchspec.state.runinfo import RunInfo, collect_run_info
from batchspec.state.store import MIGRATIONS, LockRow, StateStore, parse_timestamp, utc_timestamp
from batchspec.storage.sql import IntegrityError
from batchspec.wire.outcomes import Outcome
from batchspec.wire.usage import LineUsage

INFO = RunInfo(
    user="alice",
    host="build-1",
    pid=4242,
    git_commit="0123abc",
    git_branch="main",
    git_dirty=True,
    ci_system="github-actions",
    ci_run_url="https://github.com/acme/t/actions/runs/1",
    version="0.1.0",
    git_commit_time=4_102_444_800,  # 2100-01-01: past 2**31, as a BIGINT must hold
)
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "batchspec.db"


@pytest.fixture
def store(state_location: Path | str) -> Iterator[StateStore]:
    with StateStore.open(state_location) as s:
        yield s


def make_generation(store: StateStore, name: str = "triage", spec_hash: str = "h1") -> int:
    store.upsert_resource(name, provider="local", manifest="m.yaml", labels={}, run_id=None)
    gen = store.create_generation(
        name,
        spec_hash=spec_hash,
        spec={"model": "m"},
        input_sha256="in-sha",
        requests=10,
        input_bytes=1000,
        output_path="results/out.jsonl",
        errors_path="results/err.jsonl",
        run_id=None,
    )
    return gen.id


def intent(store: StateStore, generation_id: int, key: str = "k-1", attempt: int = 1):
    return store.record_batch_intent(
        generation_id,
        shard=0,
        attempt=attempt,
        provider="local",
        key=key,
        input_sha256="in-sha",
        requests=10,
        reason="first attempt",
    )


# -- opening ------------------------------------------------------------------------------------


def test_database_and_wal_siblings_are_owner_only(db_path: Path) -> None:
    """Even with umask 0 the database and its -wal/-shm files are created mode 0600."""
    old = os.umask(0)
    try:
        with StateStore.open(db_path) as s:
            s.record_event(None, "probe")
            modes = {
                p.name: stat.S_IMODE(p.stat().st_mode)
                for p in db_path.parent.iterdir()
                if p.name.startswith(db_path.name)
            }
    finally:
        os.umask(old)
    assert set(modes) >= {"batchspec.db", "batchspec.db-wal", "batchspec.db-shm"}
    assert set(modes.values()) == {0o600}


def test_existing_database_mode_is_left_alone(db_path: Path) -> None:
    """Opening an existing database does not change the mode its owner chose."""
    StateStore.open(db_path).close()
    os.chmod(db_path, 0o640)
    StateStore.open(db_path).close()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o640


def test_wal_foreign_keys_and_busy_timeout_are_on(db_path: Path) -> None:
    """The connection uses WAL, enforces foreign keys and waits 30 s on a busy database."""
    with StateStore.open(db_path) as store:
        pragma = lambda name: store.db.execute(f"PRAGMA {name}").fetchone()[0]  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") == 30000


def test_postgres_connection_waits_30_s_for_the_writer_lock(postgres_url: str) -> None:
    """PostgreSQL's twin of the busy timeout: lock waits give up after 30 s."""
    with StateStore.open(postgres_url) as store:
        assert store.db.execute("SHOW lock_timeout").fetchone()[0] == "30s"


MIGRATION_NAMES = [
    "m001_initial",
    "m002_request_ledger",
    "m003_request_fingerprints",
    "m004_request_usage",
    "m005_resource_locks",
    "m006_blobs",
    "m007_run_commit_time",
    "m008_run_session_lock",
]


def test_migrations_are_named_recorded_and_applied_once(state_location: Path | str) -> None:
    """Each named migration is recorded once in _sqlite_migrations however often we open."""
    for _ in range(3):
        with StateStore.open(state_location) as s:
            assert s.applied_migrations() == MIGRATION_NAMES
    with StateStore.open(state_location) as s:
        sql = "SELECT migration_set, name FROM _sqlite_migrations ORDER BY id"
        rows = [tuple(row) for row in s.db.execute(sql).fetchall()]
    assert rows == [("batchspec", name) for name in MIGRATION_NAMES]


def test_older_database_is_upgraded_in_place(db_path: Path) -> None:
    """A database left at m001_initial gets the later migrations on open, keeping its rows."""
    db_path.parent.mkdir(parents=True)
    with Database(sqlite3.connect(db_path, isolation_level=None)) as old:
        MIGRATIONS.apply(old.conn, stop_before="m002_request_ledger")
        old.execute("INSERT INTO events (at, action, detail) VALUES ('t', 'old', '{}')")
        assert "requests" not in old.table_names()
    with StateStore.open(db_path) as s:
        assert s.applied_migrations() == MIGRATION_NAMES
        assert "requests" in s.db.table_names()
        assert [e.action for e in s.events()] == ["old"]


def test_database_from_a_newer_batchspec_is_refused(state_location: Path | str) -> None:
    """An unknown applied migration means a newer schema: open fails with a clear StateError."""
    with StateStore.open(state_location) as s:
        s.db.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
            "VALUES ('batchspec', 'm999_future', 'x')"
        )
    with pytest.raises(StateError, match="newer batchspec.*m999_future") as caught:
        StateStore.open(state_location)
    assert "pw-" not in str(caught.value)  # the test cluster's password never shows


def test_a_file_that_is_not_sqlite_is_a_state_error(db_path: Path) -> None:
    """Pointing at a non-database file gives a StateError naming the path, not a traceback."""
    db_path.parent.mkdir(parents=True)
    db_path.write_text("name: not a database\n" * 200)
    with pytest.raises(StateError, match=re.escape(str(db_path))):
        StateStore.open(db_path)


def test_a_truncated_state_file_is_refused_and_left_as_it_is(db_path: Path) -> None:
    """A state database cut short (a partial copy, a full disk) is a StateError saying it is
    damaged, and is never replaced by a fresh state: a fresh one would forget every batch
    already paid for and submit them all again."""
    StateStore.open(db_path).close()
    cut = db_path.read_bytes()[:4096]
    db_path.write_bytes(cut)
    with pytest.raises(StateError, match="damaged or truncated") as caught:
        StateStore.open(db_path)
    assert str(db_path) in str(caught.value)
    assert db_path.read_bytes() == cut


# -- transactions ---------------------------------------------------------------------------------


def test_atomic_rolls_back_every_write_on_an_exception(store: StateStore) -> None:
    """An exception inside atomic() undoes runs, resources, generations and events alike."""
    serial = store.serial()
    with pytest.raises(RuntimeError), store.atomic():
        run_id = store.start_run("apply", {}, INFO)
        make_generation(store)
        store.record_event(run_id, "create", resource="triage")
        raise RuntimeError("crash mid-step")
    assert store.runs() == []
    assert store.list_resources(include_forgotten=True) == []
    assert store.events() == []
    assert store.serial() == serial


def test_failed_write_inside_atomic_leaves_the_outer_transaction_usable(store: StateStore) -> None:
    """A write method that fails inside atomic() rolls back only itself (it is a savepoint)."""
    with store.atomic():
        store.upsert_resource("kept", provider="local", manifest="m.yaml", labels={}, run_id=None)
        with pytest.raises(StateError, match="not recorded"):
            store.create_generation(
                "missing",
                spec_hash="h",
                spec={},
                input_sha256="s",
                requests=1,
                input_bytes=1,
                output_path=None,
                errors_path=None,
                run_id=None,
            )
    assert [r.name for r in store.list_resources()] == ["kept"]


def test_one_write_methods_take_no_savepoint_and_a_failed_one_undoes_only_itself(
    state_location: Path | str,
) -> None:
    """Nested in an SQLite transaction, a write method of one statement takes no savepoint
    (``atomic(one_write=True)``), and when its statement fails (a foreign key here) the
    transaction goes on holding exactly what it held, as a rollback to a savepoint left it."""
    with StateStore.open(state_location) as store:
        gen_id = make_generation(store)
        statements: list[str] = []
        if store.dialect == "sqlite":
            store.db.conn.set_trace_callback(statements.append)  # type: ignore[attr-defined]
        with store.atomic():
            store.record_event(None, "first", resource="triage")
            batch = store.update_batch(intent(store, gen_id).id, status="creating")
            with pytest.raises(IntegrityError):
                store.record_event(None, "lost", generation_id=10_000)  # no such generation
            with pytest.raises(StateError, match="cannot record batch intent"):
                store.record_batch_intent(
                    10_000,
                    shard=0,
                    attempt=1,
                    provider="local",
                    key="k-x",
                    input_sha256="s",
                    requests=1,
                    reason=None,
                )
            store.record_event(None, "last", resource="triage")
        if store.dialect == "sqlite":
            store.db.conn.set_trace_callback(None)  # type: ignore[attr-defined]
            assert [s for s in statements if s.startswith(("SAVEPOINT", "RELEASE"))] == []
        assert [e.action for e in store.events()] == ["first", "last"]
        assert store.get_batch(batch.id) == batch
        assert batch.status == "creating"
        assert [b.key for b in store.batches(gen_id)] == ["k-1"]


def test_blocks_nested_in_a_whole_block_take_no_savepoint_and_go_with_it(
    state_location: Path | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside ``atomic(whole=True)`` nested blocks take no savepoints; an exception leaving
    the whole block (itself nested here) undoes their writes with it, and the transaction
    around it goes on; a block outside it still takes its savepoint."""
    savepoints: list[str] = []
    with StateStore.open(state_location) as store:
        real = store.db.savepoint

        def counted(name: str = "nested") -> Any:
            savepoints.append(name)
            return real(name)

        monkeypatch.setattr(store.db, "savepoint", counted)
        with store.atomic():
            make_generation(store, "kept")
            savepoints.clear()  # PostgreSQL's write methods take theirs
            with pytest.raises(RuntimeError), store.atomic(whole=True):
                gen_id = make_generation(store, "undone")
                with store.atomic():  # as a step's own block (several writes) is
                    store.update_generation(gen_id, status="complete")
                    store.record_event(None, "inside", resource="undone")
                assert savepoints == ["atomic_1"]  # the whole block's own, nothing inside
                raise RuntimeError("leaves the whole block")
            with store.atomic():
                store.record_event(None, "after", resource="kept")
            assert savepoints[:2] == ["atomic_1", "atomic_1"]
        assert [r.name for r in store.list_resources()] == ["kept"]
        assert [e.action for e in store.events()] == ["after"]


def test_write_methods_return_the_row_as_written_without_reading_it_again(
    state_location: Path | str,
) -> None:
    """The row a write method returns is the row as stored (``RETURNING *``), equal to a fresh
    read, and no SELECT follows the write to fetch it (SQLite's statements traced)."""
    with StateStore.open(state_location) as store:
        statements: list[str] = []
        if store.dialect == "sqlite":
            store.db.conn.set_trace_callback(statements.append)  # type: ignore[attr-defined]
        res = store.upsert_resource("t", provider="p", manifest="m", labels={"a": 1}, run_id=None)
        gen = store.create_generation(
            "t",
            spec_hash="h",
            spec={"k": [1]},
            input_sha256="s",
            requests=2,
            input_bytes=9,
            output_path=None,
            errors_path=None,
            run_id=None,
        )
        moved = store.upsert_resource("t", provider="q", manifest="m", labels={}, run_id=None)
        current = store.set_current_generation("t", gen.id)
        batch = intent(store, gen.id)
        bound = store.update_batch(batch.id, remote_id="b-1", status="in_progress", total=2)
        errs = store.update_batch(batch.id, status="failed", provider_errors=[{"code": "x"}])
        done = store.update_generation(gen.id, status="complete", succeeded=2)
        file = store.record_file("p", "s", "f-1", 9, 1_700_000_000)
        again = store.record_file("p", "s", "f-2", None, None)
        if store.dialect == "sqlite":
            store.db.conn.set_trace_callback(None)  # type: ignore[attr-defined]
            writes = [i for i, s in enumerate(statements) if s.startswith(("INSERT", "UPDATE"))]
            after = [statements[i + 1] for i in writes if i + 1 < len(statements)]
            assert not [s for s in after if s.startswith("SELECT")], after
        assert (res.name, moved.provider, moved.labels) == ("t", "q", {})
        assert current == store.get_resource("t") and current.current_generation_id == gen.id
        assert gen.status == "pending" and done == store.get_generation(gen.id)
        assert bound.remote_id == "b-1" and bound.submitted_at is not None
        assert errs == store.get_batch(batch.id) and errs.provider_errors == [{"code": "x"}]
        assert errs.terminal_at is not None and file.remote_id == "f-1"
        assert again == store.get_file("p", "s") and again.remote_id == "f-2"


def test_an_intent_whose_key_the_caller_saw_unused_is_inserted_without_a_lookup(
    store: StateStore,
) -> None:
    """``record_batch_intent(key_unused=True)`` does not look its key up again (the caller
    just did, in its transaction); a key that is in fact held still fails the insert."""
    gen_id = make_generation(store)
    statements: list[str] = []
    if store.dialect == "sqlite":
        store.db.conn.set_trace_callback(statements.append)  # type: ignore[attr-defined]
    fields: dict[str, Any] = {
        "shard": 0,
        "attempt": 1,
        "provider": "local",
        "input_sha256": "s",
        "requests": 1,
        "reason": None,
    }
    row = store.record_batch_intent(gen_id, key="k-1", key_unused=True, **fields)
    if store.dialect == "sqlite":
        store.db.conn.set_trace_callback(None)  # type: ignore[attr-defined]
        assert not [s for s in statements if s.startswith("SELECT")], statements
    assert row == store.batch_by_key("k-1")
    with pytest.raises(StateError, match="cannot record batch intent"):
        store.record_batch_intent(gen_id, key="k-1", key_unused=True, **{**fields, "shard": 1})
    assert store.record_batch_intent(gen_id, key="k-1", **fields) == row  # idempotent still


def test_atomic_holds_the_write_lock_against_other_connections(
    state_location: Path | str,
) -> None:
    """While one store is inside atomic(), another connection cannot write (BEGIN IMMEDIATE,
    or PostgreSQL's advisory twin), and gets a StateError saying the database is busy."""
    with StateStore.open(state_location) as first, StateStore.open(state_location) as second:
        if second.dialect == "sqlite":
            second.db.execute("PRAGMA busy_timeout = 50")
        else:
            second.db.execute("SET lock_timeout = 50")
        with first.atomic():
            first.serial()  # only a read: the write lock is taken at BEGIN, not at first write
            with pytest.raises(StateError, match="busy"):
                second.record_event(None, "blocked")
            first.record_event(None, "holding")
        second.record_event(None, "after")
        assert [e.action for e in first.events()] == ["holding", "after"]


def test_raw_write_outside_atomic_is_committed_at_once(state_location: Path | str) -> None:
    """A raw statement outside atomic() commits by itself and leaves no transaction open."""
    with StateStore.open(state_location) as first, StateStore.open(state_location) as second:
        first.db.executemany(
            "INSERT INTO events (at, action) VALUES (?, ?)", [("t", "a"), ("t", "b")]
        )
        assert not first.in_transaction
        assert [e.action for e in second.events()] == ["a", "b"]


# -- events ---------------------------------------------------------------------------------------


def test_events_cannot_be_updated_or_deleted(store: StateStore) -> None:
    """Triggers make UPDATE and DELETE on events fail, so the audit log is append-only."""
    event_id = store.record_event(None, "create", detail={"n": 1})
    with pytest.raises(IntegrityError, match="append-only"):
        store.db.execute("UPDATE events SET action = 'x' WHERE id = ?", (event_id,))
    with pytest.raises(IntegrityError, match="append-only"):
        store.db.execute("DELETE FROM events")
    assert [(e.id, e.action, e.detail) for e in store.events()] == [(event_id, "create", {"n": 1})]


def test_events_filter_and_limit_keep_chronological_order(store: StateStore) -> None:
    """events() filters by run and resource; limit keeps the latest N, oldest first."""
    run_a = store.start_run("apply", {}, INFO)
    run_b = store.start_run("apply", {}, INFO)
    for i in range(5):
        store.record_event(run_a if i % 2 else run_b, f"step-{i}", resource=f"r{i % 2}")
    assert [e.action for e in store.events(run_id=run_a)] == ["step-1", "step-3"]
    assert [e.action for e in store.events(resource="r0")] == ["step-0", "step-2", "step-4"]
    assert [e.action for e in store.events(limit=2)] == ["step-3", "step-4"]
    assert all(TIMESTAMP.match(e.at) for e in store.events())


def test_event_ids_never_reused(state_location: Path | str) -> None:
    """Event ids only grow (AUTOINCREMENT; an identity column), across reopenings."""
    with StateStore.open(state_location) as s:
        first = s.record_event(None, "a")
    with StateStore.open(state_location) as s:
        assert s.record_event(None, "b") == first + 1


# -- runs -----------------------------------------------------------------------------------------


def test_run_round_trip_with_provenance(store: StateStore) -> None:
    """A run keeps its command, JSON args, provenance, end time and exit code."""
    run_id = store.start_run("apply", {"paths": ["a", "b"], "wait": True}, INFO)
    running = store.get_run(run_id)
    assert (running.ended_at, running.exit_code) == (None, None)
    store.finish_run(run_id, 4)
    run = store.get_run(run_id)
    assert run.args == {"paths": ["a", "b"], "wait": True}
    assert (run.user, run.host, run.pid) == ("alice", "build-1", 4242)
    assert (run.git_commit, run.git_branch, run.git_dirty) == ("0123abc", "main", True)
    assert run.git_commit_time == 4_102_444_800
    assert (run.ci_system, run.ci_run_url) == (INFO.ci_system, INFO.ci_run_url)
    assert run.exit_code == 4 and TIMESTAMP.match(run.ended_at or "")
    assert parse_timestamp(run.ended_at or "") >= parse_timestamp(run.started_at)


def test_finish_unknown_run_is_a_state_error(store: StateStore) -> None:
    """finish_run on an id that was never started raises StateError."""
    with pytest.raises(StateError, match="run 99"):
        store.finish_run(99, 0)


def test_runs_are_newest_first_and_filter_by_resource(store: StateStore) -> None:
    """runs() lists newest first; with resource, only runs that recorded events for it."""
    ids = [store.start_run(f"cmd-{i}", {}, INFO) for i in range(4)]
    store.record_event(ids[1], "create", resource="triage")
    store.record_event(ids[3], "poll", resource="triage")
    store.record_event(ids[2], "poll", resource="other")
    assert [r.id for r in store.runs()] == ids[::-1]
    assert [r.id for r in store.runs(limit=2)] == [ids[3], ids[2]]
    assert [r.id for r in store.runs(resource="triage")] == [ids[3], ids[1]]


# -- resources and generations --------------------------------------------------------------------


def test_upsert_resource_updates_and_unforgets(store: StateStore) -> None:
    """upsert_resource creates, updates and un-forgets; first_seen_run stays the first."""
    run1 = store.start_run("apply", {}, INFO)
    run2 = store.start_run("apply", {}, INFO)
    store.upsert_resource("a", provider="local", manifest="a.yaml", labels={"t": "x"}, run_id=run1)
    store.forget_resource("a")
    assert store.list_resources() == []
    assert store.get_resource("a").forgotten  # type: ignore[union-attr]
    row = store.upsert_resource(
        "a", provider="openai", manifest="b.yaml", labels={"t": "y"}, run_id=run2
    )
    assert (row.provider, row.manifest, row.labels) == ("openai", "b.yaml", {"t": "y"})
    assert (row.first_seen_run, row.forgotten_at) == (run1, None)
    assert [r.name for r in store.list_resources()] == ["a"]


def test_create_generation_is_idempotent_per_spec_hash(store: StateStore) -> None:
    """The same (resource, spec_hash) returns the existing generation and writes nothing."""
    first = make_generation(store)
    serial = store.serial()
    again = store.create_generation(
        "triage",
        spec_hash="h1",
        spec={"different": True},
        input_sha256="other",
        requests=1,
        input_bytes=1,
        output_path=None,
        errors_path=None,
        run_id=None,
    )
    assert again.id == first and again.spec == {"model": "m"} and again.status == "pending"
    assert store.serial() == serial
    second = make_generation(store, spec_hash="h2")
    assert [g.id for g in store.generations("triage")] == [first, second]
    assert store.find_generation("triage", "h2").id == second  # type: ignore[union-attr]
    assert store.find_generation("triage", "nope") is None


def test_set_current_generation_checks_ownership(store: StateStore) -> None:
    """A resource may point only at one of its own generations."""
    mine = make_generation(store, "a")
    theirs = make_generation(store, "b")
    assert store.set_current_generation("a", mine).current_generation_id == mine
    with pytest.raises(StateError, match="does not belong"):
        store.set_current_generation("a", theirs)
    assert store.get_resource("a").current_generation_id == mine  # type: ignore[union-attr]


def test_update_generation_whitelists_and_stamps_completion(store: StateStore) -> None:
    """update_generation sets known columns, validates status, stamps completed_at once."""
    gen_id = make_generation(store)
    gen = store.update_generation(gen_id, status="complete", succeeded=9, failed=1)
    assert (gen.status, gen.succeeded, gen.failed) == ("complete", 9, 1)
    assert TIMESTAMP.match(gen.completed_at or "")
    with pytest.raises(TypeError, match="spec_hash"):
        store.update_generation(gen_id, spec_hash="forged")
    with pytest.raises(ValueError, match="status"):
        store.update_generation(gen_id, status="done")
    assert store.update_generation(gen_id, status="degraded").completed_at == gen.completed_at


# -- batches --------------------------------------------------------------------------------------


def test_intent_then_remote_id_then_terminal(store: StateStore) -> None:
    """An intent is pending until bound to a remote id, in flight until terminal."""
    gen_id = make_generation(store)
    row = intent(store, gen_id)
    assert row.remote_id is None and row.status == "pending"
    assert store.in_flight_batches() == []

    bound = store.update_batch(row.id, remote_id="batch_abc", status="validating")
    assert bound.submitted_at is not None and bound.remote_id == "batch_abc"
    assert [b.remote_id for b in store.in_flight_batches()] == ["batch_abc"]

    done = store.update_batch(row.id, status="completed", total=10, completed=10, failed=0)
    assert done.is_terminal and TIMESTAMP.match(done.terminal_at or "")
    assert store.in_flight_batches() == []
    assert store.batch_by_key("k-1") == done
    assert store.batch_by_remote_id("local", "batch_abc") == done
    assert store.batches(gen_id, status="completed") == [done]


def test_batches_by_remote_id_are_read_from_the_snapshot_of_a_reading_block(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside ``reading()`` a batch is found by its remote id in the block's snapshot, as
    the query finds it, not by one query each: a lost state's recovery asks of every batch
    a provider lists (1,000 changed resources, ~10 earlier batches each: 10,000 queries,
    each a round trip on PostgreSQL)."""
    gen_id = make_generation(store)
    rows = [intent(store, gen_id, key=f"k-{i}", attempt=i + 1) for i in range(3)]
    bound = [store.update_batch(r.id, remote_id=f"batch_{i}") for i, r in enumerate(rows)]
    asked: list[str] = []
    real_one = type(store)._one

    def counted(self: StateStore, sql: str, params: Any = ()) -> Any:
        asked.append(sql)
        return real_one(self, sql, params)

    monkeypatch.setattr(type(store), "_one", counted)
    with store.reading():
        store.get_resource("r")  # the snapshot's load
        found = [store.batch_by_remote_id("local", f"batch_{i}") for i in range(3)]
        unknown = store.batch_by_remote_id("local", "batch_9")
        elsewhere = store.batch_by_remote_id("other", "batch_0")
    assert found == bound and unknown is None and elsewhere is None
    assert not [sql for sql in asked if "remote_id = ?" in sql], asked
    assert store.batch_by_remote_id("local", "batch_1") == bound[1]  # outside: the query


def test_uncollected_batches_are_every_batch_not_collected(store: StateStore) -> None:
    """uncollected_batches: every batch not collected (an intent too: the drain decides
    which may still answer); with generation_not_in, only those of generations in none of
    those statuses."""
    gen_id = make_generation(store)
    row = intent(store, gen_id)
    assert [b.id for b in store.uncollected_batches()] == [row.id]
    store.update_batch(row.id, remote_id="batch_abc", status="cancelling")
    assert [b.remote_id for b in store.uncollected_batches()] == ["batch_abc"]
    store.update_generation(gen_id, status="superseded")
    store.update_batch(row.id, status="cancelled")
    assert [b.id for b in store.uncollected_batches(generation_not_in=["in_progress"])] == [row.id]
    assert store.uncollected_batches(generation_not_in=["superseded"]) == []
    store.update_batch(row.id, collected_at="2026-01-01T00:00:00.000Z")
    assert store.uncollected_batches() == []


def test_recorded_remote_id_is_never_rebound(store: StateStore) -> None:
    """Once a batch is bound to a remote id, binding it to another raises StateError."""
    row = intent(store, make_generation(store))
    store.update_batch(row.id, remote_id="batch_1")
    with pytest.raises(StateError, match="already bound"):
        store.update_batch(row.id, remote_id="batch_2")
    assert store.get_batch(row.id).remote_id == "batch_1"


def test_record_batch_intent_is_idempotent_on_key(store: StateStore) -> None:
    """Recording the same key twice returns the first row; a key reused elsewhere is refused."""
    gen_id = make_generation(store)
    first = intent(store, gen_id)
    serial = store.serial()
    assert intent(store, gen_id) == first
    assert store.serial() == serial
    with pytest.raises(StateError, match="already recorded"):
        intent(store, gen_id, attempt=2)  # same key, other attempt
    with pytest.raises(StateError, match="attempt 1"):
        intent(store, gen_id, key="k-other")  # same slot, other key
    assert len(store.batches()) == 1


def test_cancelled_intent_is_no_longer_pending(store: StateStore) -> None:
    """An intent abandoned with a terminal status is not in flight."""
    row = intent(store, make_generation(store))
    store.update_batch(row.id, status="cancelled")
    assert store.in_flight_batches() == []


def test_update_batch_whitelist_and_noop(store: StateStore) -> None:
    """update_batch refuses unknown columns and writes nothing when nothing changed."""
    row = intent(store, make_generation(store))
    with pytest.raises(TypeError, match="key"):
        store.update_batch(row.id, key="other")
    serial = store.serial()
    assert store.update_batch(row.id, status="pending", requests=10) == row
    assert store.update_batch(row.id, status="pending", updated_at="2999-01-01T00:00:00Z") == row
    assert store.serial() == serial
    moved = store.update_batch(row.id, status="validating", updated_at="2999-01-01T00:00:00Z")
    assert (moved.status, moved.updated_at) == ("validating", "2999-01-01T00:00:00Z")


def test_json_columns_round_trip(store: StateStore) -> None:
    """args, labels, spec, provider_errors and detail come back as the same Python values."""
    spec = {"model": "gpt", "metadata": {"ünï": "cödé"}, "retry": {"maxAttempts": 3}, "n": [1, 2]}
    errors = [{"code": "invalid", "line": 3, "message": None}]
    run_id = store.start_run("plan", {"select": ["a"], "json": True}, INFO)
    store.upsert_resource("a", provider="p", manifest="m", labels={"team": "s"}, run_id=run_id)
    gen = store.create_generation(
        "a",
        spec_hash="h",
        spec=spec,
        input_sha256="s",
        requests=1,
        input_bytes=1,
        output_path=None,
        errors_path=None,
        run_id=run_id,
    )
    batch = intent(store, gen.id)
    store.update_batch(batch.id, provider_errors=errors)
    store.record_event(run_id, "x", detail={"nested": {"list": [None, True, 1.5]}})
    assert store.get_run(run_id).args == {"select": ["a"], "json": True}
    assert store.get_resource("a").labels == {"team": "s"}  # type: ignore[union-attr]
    assert store.get_generation(gen.id).spec == spec
    assert store.get_batch(batch.id).provider_errors == errors
    assert store.events()[0].detail == {"nested": {"list": [None, True, 1.5]}}


# -- serial ---------------------------------------------------------------------------------------


def test_serial_tracks_recorded_state_only(store: StateStore) -> None:
    """serial() moves on resource/generation/batch/file changes, not on runs, events or lock."""
    values = [store.serial()]
    run_id = store.start_run("plan", {}, INFO)
    store.record_event(run_id, "plan")
    store.write_lock_row(LockRow("h", "host", 1, "apply", None, "t", "t"))
    assert store.serial() == values[-1]
    for step in (
        lambda: make_generation(store),
        lambda: intent(store, 1),
        lambda: store.update_batch(1, remote_id="b"),
        lambda: store.record_file("local", "sha", "file_1", 10, None),
        lambda: store.forget_file("local", "sha"),
        lambda: store.forget_resource("triage"),
    ):
        step()
        assert store.serial() > values[-1]
        values.append(store.serial())


# -- files ----------------------------------------------------------------------------------------


def test_files_are_recorded_per_provider_and_expire(store: StateStore) -> None:
    """record_file keys by (provider, sha256), converts epoch expiry, and can be forgotten."""
    future = int((datetime.now(timezone.utc) + timedelta(days=1)).timestamp())
    row = store.record_file("openai", "abc", "file-1", 123, future)
    assert TIMESTAMP.match(row.expires_at or "")
    assert parse_timestamp(row.expires_at or "").timestamp() == future
    assert store.get_file("local", "abc") is None
    replaced = store.record_file("openai", "abc", "file-2", 123, None)
    assert (replaced.remote_id, replaced.expires_at) == ("file-2", None)
    store.forget_file("openai", "abc")
    assert store.get_file("openai", "abc") is None


def test_timestamps_are_utc_with_z() -> None:
    """utc_timestamp writes UTC with a Z and parse_timestamp reads it back."""
    moment = datetime(2024, 5, 1, 14, 30, 5, 123000, tzinfo=timezone(timedelta(hours=2)))
    text = utc_timestamp(moment)
    assert text == "2024-05-01T12:30:05.123Z"
    assert parse_timestamp(text) == moment


# -- secrets --------------------------------------------------------------------------------------


def test_api_key_in_environment_never_reaches_the_database(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sentinel API key in the environment appears nowhere in the database files."""
    sentinel = "sk-SENTINEL-9f8e7d6c5b4a"
    monkeypatch.setenv("OPENAI_API_KEY", sentinel)
    monkeypatch.setenv("ANTHROPIC_API_KEY", sentinel)
    monkeypatch.setenv("CI", "true")
    with StateStore.open(db_path) as s:
        run_id = s.start_run("apply", {"paths": ["examples"]}, collect_run_info(db_path.parent))
        s.record_event(run_id, "create", resource="a")
        s.finish_run(run_id, 0)
        assert s.get_run(run_id).ci_system == "ci"  # the environment was really read
        raw = b"".join(p.read_bytes() for p in db_path.parent.iterdir())
    raw += b"".join(p.read_bytes() for p in db_path.parent.iterdir())  # after checkpoint
    assert sentinel.encode() not in raw


# -- reading(): bulk reads for a read-only stretch -----------------------------------------------


def _reads(store: StateStore, names: list[str]) -> list[object]:
    """Everything ``reading()`` serves, read for ``names``."""
    out: list[object] = [store.list_resources(), store.list_resources(include_forgotten=True)]
    ledger = store.ledger()
    for name in names:
        out.append(store.get_resource(name))
        for gen in store.generations(name):
            out += [gen, store.find_generation(name, gen.spec_hash), store.get_generation(gen.id)]
            out += [store.batches(gen.id), ledger.has_requests(gen.id)]
            out += [ledger.state_counts(gen.id), ledger.usage_totals(gen.id)]
    return out


def test_reading_answers_as_the_per_row_queries_in_a_constant_number_of_queries(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside ``reading()`` the rows of resources, generations and batches and the ledger's
    counts read the same as outside it, in a few queries whatever the number of resources."""
    names = [f"r{i}" for i in range(6)]
    for name in names:
        for spec_hash in ("h1", "h2"):
            gen_id = make_generation(store, name, spec_hash)
            intent(store, gen_id, key=f"{name}-{spec_hash}")
            store.set_current_generation(name, gen_id)
        store.ledger().record_requests(gen_id, [("a", 0, 0, 10, "sha-a"), ("b", 1, 0, 10, None)])
    store.forget_resource("r5")
    outside = _reads(store, [*names, "missing"])
    calls = _counting(store, monkeypatch)
    with store.reading():
        inside = _reads(store, [*names, "missing"])
    assert inside == outside
    reads = [c for c in calls if not c.startswith(("BEGIN", "ROLLBACK"))]
    assert len(reads) == 6, calls  # the serial and three tables in one read-only transaction
    calls.clear()
    with store.reading():  # the state unchanged: the rows of the last load, not read again
        assert _reads(store, [*names, "missing"]) == outside
    assert not [c for c in calls if "FROM resources" in c or "FROM batches" in c], calls
    store.update_batch(store.batches(store.generations("r0")[0].id)[0].id, status="expired")
    calls.clear()
    with store.reading():  # changed: read again
        assert _reads(store, [*names, "missing"]) == _reads(store, [*names, "missing"])
        assert store.batches(store.generations("r0")[0].id)[0].status == "expired"
    assert [c for c in calls if "FROM batches" in c], calls


def test_a_write_inside_reading_is_seen_by_the_reads_after_it(store: StateStore) -> None:
    """A write through the store inside ``reading()`` ends its snapshot: the reads after it
    see the database, never the rows read before the write."""
    gen_id = make_generation(store)
    with store.reading():
        assert store.batches(gen_id) == []
        assert not store.ledger().has_requests(gen_id)
        intent(store, gen_id)
        with store.atomic():
            store.ledger().record_requests(gen_id, [("a", 0, 0, 10, "sha-a")])
        assert [b.key for b in store.batches(gen_id)] == ["k-1"]
        assert store.ledger().has_requests(gen_id)
        assert store.find_generation("triage", "h2") is None
        make_generation(store, spec_hash="h2")
        assert store.find_generation("triage", "h2") is not None


def test_reading_sees_a_run_that_commits_meanwhile_in_all_its_tables_or_none(
    store: StateStore, state_location: Path | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another runner (its own connection) commits a new generation and its batch right after
    ``reading()`` has read the resources: the block's generations and batches are those of
    the state its resource rows came from (the resource's current generation is the newest
    it shows), not a resource row from before that commit with generations from after."""
    first = make_generation(store)
    intent(store, first, key="k-first")
    store.set_current_generation("triage", first)
    real_query = store.db.query
    done = [False]

    def then_another_runner_commits(sql: str, *args: Any, **kwargs: Any) -> Any:
        rows = real_query(sql, *args, **kwargs)
        if "FROM resources" in sql and not done[0]:
            done[0] = True
            with StateStore.open(state_location) as other:
                second = make_generation(other, spec_hash="h2")
                intent(other, second, key="k-second")
                other.set_current_generation("triage", second)
        return rows

    monkeypatch.setattr(store.db, "query", then_another_runner_commits)
    with store.reading():
        row = store.get_resource("triage")
        gens = store.generations("triage")
        assert row is not None and done[0]
        assert [g.id for g in gens] == [first] == [row.current_generation_id]
        assert store.find_generation("triage", "h2") is None
    assert store.find_generation("triage", "h2") is not None  # seen once the block is over


def test_rows_filled_directly_are_the_rows_the_constructor_makes(tmp_path: Path) -> None:
    """``row_of`` fills a row with every field without its ``__init__``: the row equals and
    hashes as the constructor's, stays frozen, ignores a column this version does not know,
    and a row missing a field still fails as the constructor does (naming it)."""
    import dataclasses

    from batchspec.state.batches import BatchRow
    from batchspec.state.records import row_of

    with StateStore.open(tmp_path / "s.db") as store:
        batch = intent(store, make_generation(store))
    columns = {f.name: getattr(batch, f.name) for f in dataclasses.fields(BatchRow)}
    built = BatchRow(**columns)
    filled = row_of(BatchRow, {**columns, "added_by_hand": 1})
    assert filled == built and hash(filled) == hash(built)
    with pytest.raises(dataclasses.FrozenInstanceError):
        filled.status = "completed"  # type: ignore[misc]
    assert dataclasses.replace(filled, status="completed").status == "completed"
    del columns["reason"]
    with pytest.raises(TypeError, match="reason"):
        row_of(BatchRow, columns)


def test_a_failure_passed_over_inside_a_whole_block_undoes_the_block_not_half_of_it(
    state_location: Path | str,
) -> None:
    """``atomic(whole=True)`` takes no savepoints inside, trusting that nothing in it catches
    an exception and goes on. If a step ever does, the whole block is refused and undone:
    without the guard SQLite kept the first write of the failed nested block without its
    second, and PostgreSQL's COMMIT of the aborted transaction was a silent ROLLBACK that
    the caller took for committed. (Found by a review.)"""
    with StateStore.open(state_location) as store:
        gen_id = make_generation(store)
        with (  # noqa: PT012
            pytest.raises(StateError, match="failure was passed over"),
            store.atomic(whole=True),
        ):
            store.record_event(None, "kept-only-whole", generation_id=gen_id)
            try:
                with store.atomic():  # a step's block of two writes
                    store.update_generation(gen_id, status="in_progress")
                    store.record_event(None, "lost", generation_id=10_000)  # fails (FK)
            except StateError:
                pass  # caught and gone on: what whole=True says never happens
        assert store.get_generation(gen_id).status == "pending"
        assert not store.events(action="kept-only-whole")
        with store.atomic(whole=True):  # the next whole block is not taken for broken
            store.update_generation(gen_id, status="in_progress")
        assert store.get_generation(gen_id).status == "in_progress"


def test_postgres_refuses_to_commit_a_transaction_a_failed_statement_aborted(
    postgres_url: str,
) -> None:
    """A COMMIT of an aborted PostgreSQL transaction is answered with a ROLLBACK and no
    error: the commit raises instead, and the connection is usable after it."""
    with StateStore.open(postgres_url) as store:
        gen_id = make_generation(store)
        store.db.begin_writer()
        store.db.execute("UPDATE generations SET status = 'in_progress' WHERE id = ?", (gen_id,))
        with pytest.raises(StateError):
            store.db.execute("INSERT INTO events (run_id) VALUES (1)")  # not null: fails
        with pytest.raises(StateError, match="none of it was committed"):
            store.db.commit()
        assert store.get_generation(gen_id).status == "pending"


# -- a writer transaction's reads (state.cached) ---------------------------------------------------


def _counting(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements the store sends from now on (``query`` counted once, not its ``execute``)."""
    calls: list[str] = []
    depth = [0]

    def counted(real: Any) -> Any:
        def call(sql: str, *args: Any, **kwargs: Any) -> Any:
            if not depth[0]:
                calls.append(sql)
            depth[0] += 1
            try:
                return real(sql, *args, **kwargs)
            finally:
                depth[0] -= 1

        return call

    for method in ("query", "execute"):
        monkeypatch.setattr(store.db, method, counted(getattr(store.db, method)))
    return calls


def test_a_writer_transaction_reads_each_row_once_and_sees_its_own_writes(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a writer transaction the rows of a resource, its generations and batches and its
    ledger's presence are read once (an advance re-plans after each step), and every write
    (a write method, the ledger's, a raw statement, a savepoint rolled back) is seen by the
    reads after it: they answer as the database does."""
    gen_id = make_generation(store)
    batch_id = intent(store, gen_id).id
    outside = _reads(store, ["triage"]) + [store.get_batch(batch_id)]
    calls = _counting(store, monkeypatch)
    with store.atomic():
        first = _reads(store, ["triage"]) + [store.get_batch(batch_id)]
        queried = len(calls)
        again = _reads(store, ["triage"]) + [store.get_batch(batch_id)]
        kept = ("WHERE name", "FROM generations", "FROM batches", "select 1 from requests")
        assert [c for c in calls[queried:] if any(k in c for k in kept)] == []
        assert first == again == outside
        polled = store.update_batch(batch_id, status="in_progress", remote_id="b-1")
        done = store.update_generation(gen_id, status="degraded", succeeded=1)
        queried = len(calls)
        assert store.batches(gen_id) == [polled] and store.get_batch(batch_id) == polled
        assert store.find_generation("triage", "h1") == done == store.get_generation(gen_id)
        assert store.generations("triage") == [done]
        assert [c for c in calls[queried:] if c.lstrip().upper().startswith("SELECT")] == []
        assert not store.ledger().has_requests(gen_id)
        store.ledger().record_requests(gen_id, [("a", 0, 0, 10, "sha-a")])
        assert store.ledger().has_requests(gen_id)
        assert store.ledger().usage_totals(gen_id).requests == 0
        answer = CollectedLine("a", 0, 1, Outcome("ok", None), LineUsage(3, 2))
        store.ledger().record_outcomes(gen_id, 1, "sha", [answer])
        queried = len(calls)
        assert store.ledger().has_requests(gen_id)  # an UPDATE of the ledger keeps its rows
        assert not [c for c in calls[queried:] if "select 1 from requests" in c]
        assert store.ledger().usage_totals(gen_id) == UsageTotals(1, 3, 2)
        assert store.ledger().usage_totals(gen_id) == UsageTotals(1, 3, 2)
        assert len([c for c in calls[queried:] if "sum(input_tokens)" in c]) == 1
        store.db.execute("DELETE FROM requests WHERE generation_id = ?", (gen_id,))
        assert not store.ledger().has_requests(gen_id)
        assert store.ledger().usage_totals(gen_id) == UsageTotals(0, 0, 0)
        store.ledger().record_requests(gen_id, [("a", 0, 0, 10, "sha-a")])
        assert store.ledger().has_requests(gen_id)
        store.db.execute("UPDATE batches SET status = 'completed' WHERE id = ?", (batch_id,))
        store.db.execute("UPDATE resources SET manifest = 'n.yaml' WHERE name = 'triage'")
        assert store.get_batch(batch_id).status == "completed"
        assert store.batches(gen_id)[0].status == "completed"
        assert store.get_resource("triage").manifest == "n.yaml"  # type: ignore[union-attr]
        with pytest.raises(RuntimeError), store.atomic():
            store.update_batch(batch_id, status="failed")
            store.update_generation(gen_id, status="complete")
            assert store.get_batch(batch_id).status == "failed"
            raise RuntimeError("the step fails: its savepoint is rolled back")
        assert store.get_batch(batch_id).status == "completed"
        assert store.batches(gen_id)[0].status == "completed"
        assert store.get_generation(gen_id).status == "degraded"
        inside = _reads(store, ["triage"]) + [store.get_batch(batch_id)]
    monkeypatch.undo()
    assert inside == _reads(store, ["triage"]) + [store.get_batch(batch_id)]


def test_reads_are_kept_only_while_the_writer_lock_is_held(
    store: StateStore, state_location: Path | str
) -> None:
    """Outside a writer transaction, and from one to the next, another runner's commits
    are seen: nothing read before them is answered after."""
    gen_id = make_generation(store)
    batch_id = intent(store, gen_id).id

    def another_runner_polls(status: str) -> None:
        with StateStore.open(state_location) as other:
            other.update_batch(batch_id, status=status)

    with store.atomic():
        assert store.get_batch(batch_id).status == "pending"
        assert store.batches(gen_id)[0].status == "pending"
    another_runner_polls("in_progress")
    assert store.batches(gen_id)[0].status == "in_progress"
    with store.atomic():
        assert store.batches(gen_id)[0].status == "in_progress"
    another_runner_polls("completed")
    with store.atomic():
        assert store.get_batch(batch_id).status == "completed"
        assert store.batches(gen_id)[0].status == "completed"
    group_reads = []
    with store.commit_group() as group:
        group.join()
        group_reads.append(store.batches(gen_id)[0].status)
        group.flush()
        another_runner_polls("expired")
        group.join()
        group_reads.append(store.batches(gen_id)[0].status)
    assert group_reads == ["completed", "expired"]


def test_two_stores_over_one_connection_never_answer_a_read_the_other_made_stale(
    store: StateStore,
) -> None:
    """A second store object over the same connection takes the change hook: the first
    then forgets what it read rather than answer rows the second's writes changed."""
    gen_id = make_generation(store)
    batch_id = intent(store, gen_id).id
    other = StateStore(store.db, store.location)
    with store.atomic():
        assert store.batches(gen_id)[0].status == "pending"
        assert other.batches(gen_id)[0].status == "pending"
        other.update_batch(batch_id, status="in_progress")
        store.db.execute("UPDATE batches SET status = 'completed' WHERE id = ?", (batch_id,))
        assert store.batches(gen_id)[0].status == "completed"
        assert other.batches(gen_id)[0].status == "completed"
