"""Tests for batchspec.state.lock: one writer at a time, across connections and processes.

``store`` and ``other`` are two connections to one state, once per backend (SQLite file,
PostgreSQL database: ``state_location`` in tests/conftest.py).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from batchspec.core.lifecycle import unlock_state
from batchspec.errors import StateError, StateLockedError
from batchspec.state import lock as lock_module
from batchspec.state.lock import (
    LockHolder,
    acquire_lock,
    current_lock,
    force_unlock,
    held_locks,
    pid_is_alive,
)
from batchspec.state.runinfo import RunInfo
from batchspec.state.store import StateStore, utc_timestamp

HOST = socket.gethostname()


def run_info(pid: int | None = None, host: str = HOST) -> RunInfo:
    return RunInfo(
        user="alice",
        host=host,
        pid=os.getpid() if pid is None else pid,
        git_commit=None,
        git_branch=None,
        git_dirty=None,
        ci_system="github-actions",
        ci_run_url="https://ci.example/runs/77",
        version="0.1.0",
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "batchspec.db"


@pytest.fixture
def store(state_location: Path | str) -> Iterator[StateStore]:
    with StateStore.open(state_location) as s:
        yield s


@pytest.fixture
def sqlite_store(db_path: Path) -> Iterator[StateStore]:
    """An SQLite store: for rules only the lock row has (PostgreSQL knows liveness)."""
    with StateStore.open(db_path) as s:
        yield s


@pytest.fixture
def other(state_location: Path | str, store: StateStore) -> Iterator[StateStore]:
    """A second, independent connection to the same database."""
    with StateStore.open(state_location) as s:
        yield s


def dead_pid() -> int:
    """The pid of a process that has run and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def foreign_holder(pid: int, host: str = HOST, heartbeat: str | None = None) -> LockHolder:
    now = utc_timestamp()
    return LockHolder(
        holder_id="0123456789ab",
        host=host,
        pid=pid,
        command="apply",
        ci_run_url=None,
        since=now,
        heartbeat=heartbeat or now,
        user="bob",
    )


def test_free_lock_is_taken_and_released(store: StateStore) -> None:
    """acquire_lock on a free lock records the holder; release frees it."""
    handle = acquire_lock(store, command="apply", info=run_info())
    holder = current_lock(store)
    assert holder is not None and holder.holder_id == handle.holder_id
    assert (holder.host, holder.pid, holder.command) == (HOST, os.getpid(), "apply")
    assert holder.ci_run_url == "https://ci.example/runs/77" and handle.warning is None
    handle.release()
    handle.release()  # idempotent
    assert current_lock(store) is None


def test_second_connection_is_refused_with_exit_code_3(
    store: StateStore, other: StateStore
) -> None:
    """With timeout 0 a second acquire raises StateLockedError (exit 3) naming the holder."""
    with (
        acquire_lock(store, command="apply", info=run_info()) as handle,
        pytest.raises(StateLockedError) as caught,
    ):
        acquire_lock(other, command="cancel", info=run_info())
    err = caught.value
    assert err.exit_code == 3
    holder = handle.holder
    for part in (holder.holder_id, HOST, f"pid {os.getpid()}", "'apply'", holder.since):
        assert part in err.message
    assert "https://ci.example/runs/77" in err.message
    assert f"batchspec unlock {holder.holder_id}" in err.message


def test_waiting_acquire_gets_the_lock_when_it_is_released(
    store: StateStore, other: StateStore
) -> None:
    """A waiting acquire succeeds as soon as the first holder releases during the wait."""
    first = acquire_lock(store, command="apply", info=run_info())
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            first.release()

    second = acquire_lock(
        other, command="apply", info=run_info(), timeout=60, poll_interval=0.5, sleep=sleep
    )
    assert naps == [0.5, 0.5, 0.5]
    assert current_lock(other).holder_id == second.holder_id  # type: ignore[union-attr]


def test_waiting_acquire_gives_up_at_the_timeout(store: StateStore, other: StateStore) -> None:
    """A holder that stays raises StateLockedError once the timeout has been spent polling."""
    now = [0.0]
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        now[0] += seconds

    with (
        acquire_lock(store, command="apply", info=run_info()),
        pytest.raises(StateLockedError, match=r"\(waited 1 s\)"),
    ):
        acquire_lock(
            other,
            command="apply",
            info=run_info(),
            timeout=1.0,
            poll_interval=0.3,
            clock=lambda: now[0],
            sleep=sleep,
        )
    assert naps == pytest.approx([0.3, 0.3, 0.3, 0.1])


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from batchspec.state.lock import acquire_lock
    from batchspec.state.runinfo import collect_run_info
    from batchspec.state.store import StateStore

    import dataclasses
    store = StateStore.open(sys.argv[1])
    info = collect_run_info(env={})
    if len(sys.argv) > 2:  # pretend to run on another machine
        info = dataclasses.replace(info, host=sys.argv[2])
    handle = acquire_lock(store, command="apply", info=info)
    print(handle.holder_id, flush=True)
    sys.stdin.readline()  # hold the lock until the test says so
    handle.release()
    """
)


def start_holder(location: Path | str, *host: str) -> tuple[subprocess.Popen[str], str]:
    """A child process that holds the lock until a line arrives on its stdin (``host``: the
    host name it records, if not this one's)."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(location), *host],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


def test_lock_held_by_another_process_is_refused_then_acquired(
    state_location: Path | str, store: StateStore
) -> None:
    """A real second process holds the lock: refused at once, acquired after it releases."""
    child, holder_id = start_holder(state_location)
    assert child.stdin is not None
    try:
        with pytest.raises(StateLockedError, match=f"pid {child.pid}") as caught:
            acquire_lock(store, command="apply", info=run_info())
        assert holder_id in caught.value.message
        naps: list[float] = []

        def sleep(seconds: float) -> None:
            if not naps:
                child.stdin.write("release\n")  # type: ignore[union-attr]
                child.stdin.flush()  # type: ignore[union-attr]
            naps.append(seconds)
            time.sleep(seconds)

        handle = acquire_lock(
            store, command="apply", info=run_info(), timeout=30, poll_interval=0.05, sleep=sleep
        )
        assert naps, "the lock was free without waiting"
        assert handle.warning is None  # released by its holder, not taken over
        assert child.wait(timeout=10) == 0
        handle.release()
    finally:
        child.kill()
        child.wait()


RACER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from batchspec.errors import StateLockedError
    from batchspec.state.lock import acquire_lock
    from batchspec.state.runinfo import collect_run_info
    from batchspec.state.store import StateStore

    store = StateStore.open(sys.argv[1])
    info = collect_run_info(env={})
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        handle = acquire_lock(store, command="apply", info=info)
    except StateLockedError:
        print("locked", flush=True)
    else:
        print("took", flush=True)
        sys.stdin.readline()
        handle.release()
    """
)


def test_racing_processes_take_the_lock_exactly_once(
    state_location: Path | str, store: StateStore
) -> None:
    """Four processes acquiring at the same moment: one takes it, three get StateLockedError."""
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(state_location)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        assert [r.stdout.readline().strip() for r in racers] == ["ready"] * 4  # type: ignore[union-attr]
        for r in racers:
            r.stdin.write("go\n")  # type: ignore[union-attr]
            r.stdin.flush()  # type: ignore[union-attr]
        outcomes = sorted(r.stdout.readline().strip() for r in racers)  # type: ignore[union-attr]
        assert outcomes == ["locked", "locked", "locked", "took"]
        for r in racers:
            r.stdin.close()  # type: ignore[union-attr]
            assert r.wait(timeout=10) == 0
        assert current_lock(store) is None
    finally:
        for r in racers:
            r.kill()
            r.wait()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(store: StateStore) -> None:
    """A holder whose pid no longer exists on this host is replaced, with a warning and event."""
    pid = dead_pid()
    store.write_lock_row(foreign_holder(pid))
    handle = acquire_lock(store, command="apply", info=run_info())
    assert handle.warning is not None
    # SQLite: "dead process PID on host H"; PostgreSQL: "session has ended: pid PID on host H"
    assert f"{pid} on host {HOST}" in handle.warning
    assert "0123456789ab" in handle.warning
    assert current_lock(store).holder_id == handle.holder_id  # type: ignore[union-attr]
    [event] = store.events()
    assert event.action == "lock.takeover" and event.detail["previous"]["pid"] == pid


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_lock_of_a_killed_process_not_yet_reaped_is_taken_over(sqlite_store: StateStore) -> None:
    """A holder killed by a script that has not reaped it (a zombie: ``kill(pid, 0)`` still
    answers) is gone: the next run takes its lock over (it used to exit 3 "Wait for it to
    finish", while `batchspec unlock` released it once the zombie was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert pid_is_alive(child.pid) is False
        sqlite_store.write_lock_row(foreign_holder(child.pid))
        handle = acquire_lock(sqlite_store, command="apply", info=run_info())
        assert handle.warning is not None and f"dead process {child.pid}" in handle.warning
    finally:
        child.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_a_live_holder_whose_main_thread_ended_is_not_taken_for_a_zombie() -> None:
    """A process whose first thread ended while another runs on (its /proc state reads 'Z',
    as a zombie's does) is alive: it may still hold and use its lock, never taken over."""
    code = (
        "import ctypes, sys, threading, time\n"
        "threading.Thread(target=time.sleep, args=(30,)).start()\n"
        "print(flush=True); ctypes.CDLL(None).pthread_exit(None)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline()
        stat = Path(f"/proc/{child.pid}/stat")
        for _ in range(100):  # the first thread's exit lands a moment after the print
            if stat.read_bytes().rpartition(b")")[2].split()[0] == b"Z":
                break
            time.sleep(0.01)
        assert pid_is_alive(child.pid) is True
    finally:
        child.kill()
        child.wait()


def test_a_holder_that_died_while_this_run_looked_is_named_gone_with_the_unlock_command(
    sqlite_store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A same-host holder whose process is gone by the time the exit-3 message is written is
    said to be gone, with `batchspec unlock ID`, not "Wait for it to finish"."""
    answers = iter([True])  # alive when the take looked, gone afterwards
    monkeypatch.setattr(lock_module, "pid_is_alive", lambda pid: next(answers, False))
    sqlite_store.write_lock_row(foreign_holder(4242))
    with pytest.raises(StateLockedError) as caught:
        acquire_lock(sqlite_store, command="apply", info=run_info())
    message = caught.value.message
    assert "pid 4242) is no longer running on this host" in message
    assert "batchspec unlock 0123456789ab" in message and "Wait for it" not in message


def test_lock_on_another_host_is_never_taken_over(sqlite_store: StateStore) -> None:
    """A holder on another host is not taken over even if its pid is free here (SQLite:
    the row cannot tell whether it is alive)."""
    store = sqlite_store
    store.write_lock_row(foreign_holder(dead_pid(), host="elsewhere.example"))
    with pytest.raises(StateLockedError, match="elsewhere.example") as caught:
        acquire_lock(store, command="apply", info=run_info())
    assert "possibly stale" not in caught.value.message
    assert current_lock(store).holder_id == "0123456789ab"  # type: ignore[union-attr]


def test_old_heartbeat_is_reported_as_possibly_stale(sqlite_store: StateStore) -> None:
    """A holder whose heartbeat is older than stale_after is named possibly stale (SQLite)."""
    store = sqlite_store
    old = utc_timestamp(datetime.now(timezone.utc) - timedelta(minutes=45))
    store.write_lock_row(foreign_holder(1, host="elsewhere.example", heartbeat=old))
    with pytest.raises(StateLockedError, match="45 minutes old: it is possibly stale"):
        acquire_lock(store, command="apply", info=run_info())


def test_force_unlock_releases_only_the_named_holder(store: StateStore, other: StateStore) -> None:
    """force_unlock needs the holder's id; a wrong id names the real holder and keeps the lock."""
    with pytest.raises(StateError, match="no lock is held"):
        force_unlock(store, "nobody")
    handle = acquire_lock(store, command="apply", info=run_info())
    with pytest.raises(StateError, match=f"held by: {handle.holder_id}"):
        force_unlock(other, "wrong-id")
    assert current_lock(other) is not None
    released = force_unlock(other, handle.holder_id, force=True)
    assert released == handle.holder
    assert current_lock(other) is None
    assert [e.action for e in other.events()] == ["lock.force_unlock"]


def test_old_handle_cannot_disturb_the_next_holder(store: StateStore, other: StateStore) -> None:
    """After unlock and a new holder, the old handle's heartbeat fails and release is a no-op."""
    old = acquire_lock(store, command="apply", info=run_info())
    force_unlock(other, old.holder_id, force=True)
    new = acquire_lock(other, command="apply", info=run_info())
    with pytest.raises(StateError, match="no longer holds the state lock"):
        old.heartbeat()
    old.release()
    assert current_lock(other).holder_id == new.holder_id  # type: ignore[union-attr]


def test_postgres_lock_row_without_a_live_session_is_taken_over_on_any_host(
    postgres_url: str,
) -> None:
    """PostgreSQL knows liveness: a row whose session lock is free is a dead run's, taken over
    even from another host; status calls the lock free meanwhile."""
    with StateStore.open(postgres_url) as store:
        store.write_lock_row(foreign_holder(1, host="elsewhere.example"))
        assert current_lock(store) is None
        handle = acquire_lock(store, command="apply", info=run_info())
        assert handle.warning is not None and "session has ended" in handle.warning
        assert "elsewhere.example" in handle.warning
        handle.release()


def test_postgres_lock_of_a_killed_runner_dies_with_its_session(postgres_url: str) -> None:
    """A runner on another machine killed with SIGKILL (no release, no unlock) frees its lock
    at once: the next run takes it over, with the dead holder's details in the warning and
    the event (the row alone could not tell that a process elsewhere is dead)."""
    child, holder_id = start_holder(postgres_url, "runner-7.ci.example")
    with StateStore.open(postgres_url) as store:
        with pytest.raises(StateLockedError, match=holder_id):
            acquire_lock(store, command="apply", info=run_info())
        child.kill()
        child.wait()
        handle = acquire_lock(store, command="apply", info=run_info(), timeout=10)
        assert handle.warning is not None and holder_id in handle.warning
        [event] = store.events()
        assert event.action == "lock.takeover" and event.detail["previous"]["pid"] == child.pid
        handle.release()


def test_postgres_unlock_ends_a_live_holders_session(postgres_url: str) -> None:
    """`unlock ID` on PostgreSQL ends the holder's session, so the lock is free at once and
    the holder's next step fails instead of writing."""
    with StateStore.open(postgres_url) as holder_store, StateStore.open(postgres_url) as other:
        held = acquire_lock(holder_store, command="apply", info=run_info())
        force_unlock(other, held.holder_id, force=True)  # its heartbeat is fresh: --force
        with pytest.raises(StateError):
            holder_store.record_event(None, "must not be written")
        taken = acquire_lock(other, command="apply", info=run_info())
        assert taken.warning is None
        taken.release()
        assert [e.action for e in other.events()] == ["lock.force_unlock"]


def test_lock_is_released_when_the_block_raises(store: StateStore) -> None:
    """Leaving the handle's with-block by an exception still releases the lock."""
    with pytest.raises(RuntimeError), acquire_lock(store, command="apply", info=run_info()):
        raise RuntimeError("apply failed")
    assert current_lock(store) is None


def test_heartbeat_refreshes_the_timestamp(store: StateStore) -> None:
    """heartbeat() moves the recorded heartbeat forward and keeps since unchanged."""
    with acquire_lock(store, command="apply", info=run_info()) as handle:
        stale = utc_timestamp(datetime.now(timezone.utc) - timedelta(hours=1))
        store.write_lock_row(replace(handle.holder, heartbeat=stale))
        handle.heartbeat()
        holder = current_lock(store)
        assert holder is not None and holder.heartbeat > stale
        assert holder.since == handle.holder.since


def test_acquire_inside_a_transaction_is_refused(store: StateStore) -> None:
    """Waiting for the lock inside atomic() would deadlock, so it is refused outright."""
    with store.atomic(), pytest.raises(RuntimeError, match="atomic"):
        acquire_lock(store, command="apply", info=run_info())


def test_unlock_state_finds_the_project_database_and_records_a_run(
    tmp_path: Path, db_path: Path
) -> None:
    """unlock_state resolves the workspace's state DB, releases, and records an unlock run."""
    assert db_path == tmp_path / "state" / "batchspec.db"  # the default project layout
    (tmp_path / "batchspec.yaml").write_text("apiVersion: batchspec/v1\nkind: Project\n")
    with StateStore.open(db_path) as store:
        handle = acquire_lock(store, command="apply", info=run_info(pid=dead_pid()))
        released = unlock_state(handle.holder_id, start=tmp_path)
        assert released.holder_id == handle.holder_id and current_lock(store) is None
        [run] = store.runs()
        args = {"holder_id": handle.holder_id}
        assert (run.command, run.args, run.exit_code) == ("unlock", args, 0)
        [event] = store.events(run_id=run.id)
        assert event.action == "lock.force_unlock" and event.detail["pid"] == handle.holder.pid


def test_unlock_state_never_creates_a_database(tmp_path: Path) -> None:
    """Unlocking where there is no state database fails and leaves no file behind."""
    missing = tmp_path / "nowhere" / "batchspec.db"
    with pytest.raises(StateError, match="no state database"):
        unlock_state("abc", state_path=missing)
    assert not missing.parent.exists()


def test_runs_on_different_resources_hold_their_locks_side_by_side(
    store: StateStore, other: StateStore
) -> None:
    """Locks on disjoint resources are both granted; status sees one lock per resource."""
    with (
        acquire_lock(store, command="apply", info=run_info(), resources=["a", "b"]) as first,
        acquire_lock(other, command="apply", info=run_info(), resources=["c"]) as second,
    ):
        held = {lock.resource: lock.holder.holder_id for lock in held_locks(store)}
        assert held == {"a": first.holder_id, "b": first.holder_id, "c": second.holder_id}
        assert current_lock(store, "c") == second.holder
    assert held_locks(store) == []


def test_a_shared_resource_refuses_the_whole_set_and_takes_none(
    store: StateStore, other: StateStore
) -> None:
    """A run whose set meets another run's is refused naming the resource in conflict, and
    takes none of its other resources (all or none: no partial holds, no deadlock)."""
    with acquire_lock(store, command="apply", info=run_info(), resources=["b"]) as first:
        with pytest.raises(StateLockedError, match="resource b in the state") as caught:
            acquire_lock(other, command="cancel", info=run_info(), resources=["a", "b", "c"])
        assert first.holder_id in caught.value.message
        assert "This run needs resources a, b, c" in caught.value.message
        assert [lock.resource for lock in held_locks(other)] == ["b"]


@pytest.mark.parametrize(
    ("first", "second", "in_conflict"),
    [
        pytest.param(None, ["a"], "the whole workspace", id="workspace-then-resource"),
        pytest.param(["a"], None, "resource a", id="resource-then-workspace"),
    ],
)
def test_the_workspace_lock_conflicts_with_every_resource_lock(
    store: StateStore,
    other: StateStore,
    first: list[str] | None,
    second: list[str] | None,
    in_conflict: str,
) -> None:
    """The workspace-wide lock (prune, resources=None) and any resource lock exclude each other."""
    with (
        acquire_lock(store, command="apply", info=run_info(), resources=first),
        pytest.raises(StateLockedError, match=in_conflict),
    ):
        acquire_lock(other, command="apply", info=run_info(), resources=second)


def test_unlock_releases_every_resource_of_the_holder(store: StateStore, other: StateStore) -> None:
    """`unlock ID` frees all of ID's resources and leaves another holder's alone."""
    first = acquire_lock(store, command="apply", info=run_info(), resources=["a", "b"])
    second = acquire_lock(other, command="apply", info=run_info(), resources=["c"])
    with StateStore.open(other.location) as third:
        released = force_unlock(third, first.holder_id, force=True)
        assert released == first.holder
        assert [lock.resource for lock in held_locks(third)] == ["c"]
        [event] = [e for e in third.events() if e.action == "lock.force_unlock"]
        assert event.detail["resources"] == ["a", "b"]
        taken = acquire_lock(third, command="apply", info=run_info(), resources=["a", "b"])
        taken.release()
    second.release()


def test_a_dead_holders_resources_are_all_taken_over(store: StateStore) -> None:
    """A dead holder's rows (its pid gone on this host; in PostgreSQL no session) are taken
    over by a run that needs one of them: all its rows go, with one lock.takeover event."""
    pid = dead_pid()
    store.write_lock_row(foreign_holder(pid), ["a", "b"])
    with acquire_lock(store, command="apply", info=run_info(), resources=["b"]) as handle:
        assert handle.warning is not None and f"{pid} on host {HOST}" in handle.warning
        assert [lock.resource for lock in held_locks(store)] == ["b"]
    [event] = store.events()
    assert event.action == "lock.takeover" and event.detail["previous"]["pid"] == pid


def test_a_lock_held_across_migration_m005_stays_held_workspace_wide(
    state_location: Path | str,
) -> None:
    """A run that held the old one-row state lock when m005 ran still holds the whole
    workspace afterwards (its row becomes the `*` row), so no run slips in beside it."""
    from batchspec.state.store import MIGRATIONS
    from batchspec.storage.sql import PostgresSql, SqliteSql

    if isinstance(state_location, Path):
        state_location.parent.mkdir(parents=True, exist_ok=True)
        db: Any = SqliteSql(sqlite3.connect(state_location, isolation_level=None))
    else:
        db = PostgresSql.connect(state_location, busy_timeout=5)
    MIGRATIONS.apply(db, stop_before="m005_resource_locks")
    db.execute(
        'INSERT INTO lock (id, holder_id, host, pid, command, since, heartbeat, "user") '
        "VALUES (1, 'oldholder123', ?, ?, 'apply', 't', 't', 'bob')",
        (HOST, os.getpid()),
    )
    if isinstance(db, PostgresSql):  # in PostgreSQL, liveness is the old run lock's session
        db.execute("SELECT pg_advisory_lock(?)", (db.advisory_key("run-lock"),))
    try:
        with StateStore.open(state_location) as store:
            [lock] = held_locks(store)
            assert (lock.resource, lock.holder.holder_id) == ("*", "oldholder123")
            with pytest.raises(StateLockedError, match="the whole workspace"):
                acquire_lock(store, command="apply", info=run_info(), resources=["a"])
    finally:
        db.close()


def test_a_released_holders_next_heartbeat_stops_it_and_never_resurrects_the_lock(
    sqlite_store: StateStore,
) -> None:
    """`batchspec unlock` releases a running holder's lock: the holder's next heartbeat (taken
    before each step that spends) stops it with StateError instead of writing its row back
    (that would lock everyone out), and its release then leaves the lock free."""
    handle = acquire_lock(sqlite_store, command="apply", info=run_info())
    force_unlock(sqlite_store, handle.holder_id, force=True)
    assert held_locks(sqlite_store) == []
    with pytest.raises(StateError, match="no longer holds the state lock"):
        handle.heartbeat()
    assert held_locks(sqlite_store) == []
    handle.release()
    assert handle.released and held_locks(sqlite_store) == []


def test_a_lock_row_naming_pid_0_or_below_counts_as_dead() -> None:
    """pid 0 and negative pids are no process (``kill(0, 0)`` would ask our own process group
    and say "alive", so a corrupt row would hold the lock forever): never alive."""
    assert pid_is_alive(0) is False
    assert pid_is_alive(-5) is False
    assert pid_is_alive(os.getpid()) is True
    assert pid_is_alive(dead_pid()) is False


def test_a_handle_covers_its_resources_and_a_workspace_lock_covers_all(
    store: StateStore, other: StateStore
) -> None:
    """A run holding resources a and b may write a and b only; a workspace-wide holder may
    write any resource; held locks read back as JSON name each key and its holder."""
    with acquire_lock(store, command="apply", info=run_info(), resources=["a", "b"]) as handle:
        assert (handle.covers("a"), handle.covers("b"), handle.covers("c")) == (True, True, False)
        listed = [lock.to_json() for lock in held_locks(other)]
        assert sorted(x["resource"] for x in listed) == ["a", "b"]
        assert all(x["holder_id"] == handle.holder_id for x in listed)
    with acquire_lock(store, command="apply", info=run_info()) as handle:
        assert handle.covers("anything")
        [lock] = held_locks(other)
        assert lock.workspace_wide and lock.to_json()["resource"] == "*"


def test_holding_the_state_still_inside_a_transaction_is_refused(sqlite_store: StateStore) -> None:
    """hold_still() (state migrate) inside an open transaction would read that transaction's
    own uncommitted rows as the state: refused at once, and no lock is left behind."""
    from batchspec.state.lock import hold_still

    inside = pytest.raises(RuntimeError, match="must not be called inside")
    with (
        sqlite_store.atomic(),
        inside,
        hold_still(sqlite_store, command="state migrate", info=run_info()),
    ):
        pass
    assert held_locks(sqlite_store) == []


# -- pid_is_alive: only ever asks, never signals -------------------------------------------------


def test_pid_1_counts_as_alive() -> None:
    """pid 1 (init, always there) is a live process, not a corrupt row's placeholder."""
    assert pid_is_alive(1) is True


def test_checking_a_live_process_leaves_it_running(tmp_path: Path) -> None:
    """Asking whether a holder is alive sends it no signal: the process carries on and ends
    normally (a real signal, such as SIGHUP, would kill the run that holds the lock)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline(); print('still here')"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert pid_is_alive(child.pid) is True
        out, _ = child.communicate("go\n", timeout=10)
        assert (child.returncode, out) == (0, "still here\n")
    finally:
        child.kill()
        child.wait()


def test_a_process_we_may_not_signal_counts_as_alive() -> None:
    """A live process of another user (kill says EPERM, not ESRCH) counts as alive, so its
    lock is never taken over."""
    if os.geteuid() != 0:
        if Path("/proc/1").stat().st_uid == os.geteuid():
            pytest.skip("no process of another user to ask about")
        assert pid_is_alive(1) is True
        return
    # root may signal anyone: ask about this (root's) process from a child that is nobody
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        code = 2
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            code = 0 if pid_is_alive(os.getppid()) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


ADVISORY_HELD = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
)


def test_postgres_release_drops_the_holders_session_lock(postgres_url: str) -> None:
    """Releasing a PostgreSQL lock also drops its session advisory lock: a long-lived process
    taking lock after lock holds none of them afterwards (they would fill the lock table)."""
    with StateStore.open(postgres_url) as store:
        for _ in range(3):
            with acquire_lock(store, command="apply", info=run_info()):
                assert store.db.query(ADVISORY_HELD)[0]["count"] == 1
        assert store.db.query(ADVISORY_HELD)[0]["count"] == 0


# -- hold_still (state migrate) ------------------------------------------------------------------


def file_bytes(db_path: Path) -> tuple[bytes, bytes]:
    """The SQLite file and its write-ahead log, byte for byte."""
    wal = db_path.with_name(db_path.name + "-wal")
    return db_path.read_bytes(), wal.read_bytes() if wal.exists() else b""


class FakeTime:
    """A clock that moves only when slept on; refuses to sleep on forever."""

    def __init__(self) -> None:
        self.now = 0.0
        self.naps: list[float] = []
        self.reads = 0

    def clock(self) -> float:
        self.reads += 1
        assert self.reads < 100, "still polling past the timeout"
        return self.now

    def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += seconds
        assert len(self.naps) < 50, "still waiting past the timeout"


def test_holding_sqlite_still_keeps_writers_out_lets_readers_in_and_writes_nothing(
    db_path: Path, sqlite_store: StateStore
) -> None:
    """hold_still on SQLite holds the writer lock for the whole block: a run starting
    meanwhile cannot write (busy), a reader reads; the file is left byte for byte as it was
    and writable again afterwards."""
    from batchspec.state.lock import hold_still

    sqlite_store.record_event(None, "before")
    before = file_bytes(db_path)
    writer = sqlite3.connect(db_path, timeout=0.2, isolation_level=None)
    try:
        with hold_still(sqlite_store, command="state migrate", info=run_info()) as warning:
            assert warning is None
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                writer.execute("BEGIN IMMEDIATE")
            assert writer.execute("SELECT count(*) FROM events").fetchone() == (1,)
            assert held_locks(sqlite_store) == []
        assert file_bytes(db_path) == before
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("ROLLBACK")
    finally:
        writer.close()


@pytest.mark.parametrize("host", [HOST, "elsewhere.example"], ids=["live-here", "elsewhere"])
def test_holding_sqlite_still_waits_for_a_live_holder_then_exits_3(
    sqlite_store: StateStore, host: str
) -> None:
    """A holder alive on this host, or any holder on another host, is waited for up to the
    timeout (polling), then hold_still exits 3 naming it; its lock stays as it was."""
    from batchspec.state.lock import hold_still

    pid = os.getpid() if host == HOST else dead_pid()
    sqlite_store.write_lock_row(foreign_holder(pid, host=host))
    fake = FakeTime()
    with (
        pytest.raises(StateLockedError, match=r"\(waited 1 s\)") as caught,
        hold_still(
            sqlite_store,
            command="state migrate",
            info=run_info(),
            timeout=1.0,
            poll_interval=0.25,
            clock=fake.clock,
            sleep=fake.sleep,
        ),
    ):
        pass
    assert caught.value.exit_code == 3
    assert "0123456789ab" in caught.value.message and f"pid {pid}" in caught.value.message
    assert fake.naps == [0.25, 0.25, 0.25, 0.25]
    assert [lock.holder.holder_id for lock in held_locks(sqlite_store)] == ["0123456789ab"]
    assert not sqlite_store.in_transaction


def test_holding_sqlite_still_with_timeout_0_exits_3_at_once(sqlite_store: StateStore) -> None:
    """With --lock-timeout 0 a live holder makes hold_still exit 3 without waiting."""
    from batchspec.state.lock import hold_still

    sqlite_store.write_lock_row(foreign_holder(os.getpid()))
    fake = FakeTime()
    with (
        pytest.raises(StateLockedError, match="not waiting: --lock-timeout 0"),
        hold_still(
            sqlite_store,
            command="state migrate",
            info=run_info(),
            clock=fake.clock,
            sleep=fake.sleep,
        ),
    ):
        pass
    assert fake.naps == []


def test_holding_sqlite_still_ignores_a_dead_holders_lock_and_says_so(
    db_path: Path, sqlite_store: StateStore
) -> None:
    """A lock left by a dead process on this host does not stop hold_still: it goes ahead at
    once, warns that the lock is left as it is, and does not take it over (nothing written)."""
    from batchspec.state.lock import hold_still

    pid = dead_pid()
    sqlite_store.write_lock_row(foreign_holder(pid))
    before = file_bytes(db_path)
    fake = FakeTime()
    with hold_still(
        sqlite_store,
        command="state migrate",
        info=run_info(),
        timeout=10,
        clock=fake.clock,
        sleep=fake.sleep,
    ) as warning:
        assert warning is not None
        assert f"dead process {pid} on host {HOST} (holder 0123456789ab)" in warning
        assert "left as it is" in warning
    assert fake.naps == []
    assert file_bytes(db_path) == before
    assert [lock.holder.holder_id for lock in held_locks(sqlite_store)] == ["0123456789ab"]
    assert sqlite_store.events() == []


def test_holding_postgres_still_holds_the_run_lock(postgres_url: str) -> None:
    """hold_still on PostgreSQL holds the workspace-wide run lock: a run starting meanwhile
    exits 3 naming `state migrate`; afterwards no lock row is left."""
    from batchspec.state.lock import hold_still

    with StateStore.open(postgres_url) as store, StateStore.open(postgres_url) as other:
        with hold_still(store, command="state migrate", info=run_info()) as warning:
            assert warning is None
            with pytest.raises(StateLockedError, match="'state migrate'"):
                acquire_lock(other, command="apply", info=run_info(), resources=["a"])
        assert held_locks(other) == []
        acquire_lock(other, command="apply", info=run_info()).release()


# -- force_unlock and the exit-3 messages --------------------------------------------------------


def test_force_unlock_refuses_a_live_holder_unless_forced(sqlite_store: StateStore) -> None:
    """force_unlock's default is the safe one: a live holder with a fresh heartbeat is refused
    (exit 3) and keeps its lock."""
    with acquire_lock(sqlite_store, command="apply", info=run_info()) as handle:
        with pytest.raises(StateLockedError, match="may still be running") as caught:
            force_unlock(sqlite_store, handle.holder_id)
        assert caught.value.exit_code == 3
        assert current_lock(sqlite_store) == handle.holder


def test_a_one_minute_stale_threshold_is_named_in_the_singular(sqlite_store: StateStore) -> None:
    """A refusal under a 1-minute threshold says "under the 1 minute", not "1 minutes"."""
    with (
        acquire_lock(sqlite_store, command="apply", info=run_info()) as handle,
        pytest.raises(StateLockedError, match="under the 1 minute after which"),
    ):
        force_unlock(sqlite_store, handle.holder_id, stale_after=timedelta(minutes=1))


@pytest.mark.parametrize(
    ("needed", "named"),
    [
        (["a"], "resource a."),
        (["a", "b"], "resources a, b."),
        (["a", "b", "c", "d", "e"], "resources a, b, c, d, e."),
        (["a", "b", "c", "d", "e", "f"], "resources a, b, c, d, e and 1 more."),
    ],
)
def test_the_exit_3_message_names_what_the_run_needs(
    sqlite_store: StateStore, needed: list[str], named: str
) -> None:
    """The refusal says which resources the run needs: one by name, up to five listed, more
    counted ("and N more")."""
    sqlite_store.write_lock_row(foreign_holder(os.getpid()), ["a"])
    with pytest.raises(StateLockedError) as caught:
        acquire_lock(sqlite_store, command="apply", info=run_info(), resources=needed)
    assert f"This run needs {named}" in caught.value.message


def test_postgres_unlock_of_a_pre_m005_holder_ends_its_session(postgres_url: str) -> None:
    """`unlock ID --force` of a run that held the old one-row lock across migration m005 ends
    that run's session (it holds the old run lock, not a holder lock), so it stops."""
    from batchspec.state.store import MIGRATIONS
    from batchspec.storage.sql import PostgresSql

    db = PostgresSql.connect(postgres_url, busy_timeout=5)
    try:
        MIGRATIONS.apply(db, stop_before="m005_resource_locks")
        db.execute(
            'INSERT INTO lock (id, holder_id, host, pid, command, since, heartbeat, "user") '
            "VALUES (1, 'oldholder123', ?, ?, 'apply', 't', 't', 'bob')",
            (HOST, os.getpid()),
        )
        db.execute("SELECT pg_advisory_lock(?)", (db.advisory_key("run-lock"),))
        with StateStore.open(postgres_url) as store:
            force_unlock(store, "oldholder123", force=True)
            with pytest.raises(StateError, match="lost the connection"):
                db.execute("SELECT 1")
            acquire_lock(store, command="apply", info=run_info()).release()
    finally:
        db.close()


def test_postgres_a_run_may_unlock_itself_without_ending_its_own_session(
    postgres_url: str,
) -> None:
    """force_unlock through the holder's own connection releases its rows and ends other
    sessions only: the caller's session goes on working."""
    with StateStore.open(postgres_url) as store:
        handle = acquire_lock(store, command="apply", info=run_info())
        force_unlock(store, handle.holder_id, force=True)
        store.record_event(None, "still connected")
        handle.release()
        assert held_locks(store) == []


def test_postgres_a_take_that_fails_writing_its_rows_leaves_no_session_lock(
    postgres_url: str,
) -> None:
    """An acquire that fails after taking its session lock (its rows refused) drops that lock
    again: the session holds nothing it could leak."""
    with StateStore.open(postgres_url) as store:
        store.db.execute(
            "CREATE FUNCTION refuse_locks() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'no locks now'; END $$"
        )
        store.db.execute(
            "CREATE TRIGGER refuse_locks BEFORE INSERT ON resource_locks "
            "FOR EACH ROW EXECUTE FUNCTION refuse_locks()"
        )
        with pytest.raises(StateError, match="no locks now"):
            acquire_lock(store, command="apply", info=run_info())
        assert store.db.query(ADVISORY_HELD)[0]["count"] == 0
        assert store.lock_rows() == {}
