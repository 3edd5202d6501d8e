"""Tests for `batchspec unlock ID`: the CLI face of batchspec.core.lifecycle.unlock_state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from batchspec.cli.main import main
from batchspec.state.lock import STALE_AFTER, acquire_lock, current_lock
from batchspec.state.runinfo import RunInfo
from batchspec.state.store import StateStore, utc_timestamp

INFO = RunInfo("alice", socket.gethostname(), os.getpid(), None, None, None, None, None, "0")


def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return int(done.value.code or 0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


def dead_pid() -> int:
    """The pid of a process that has run and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_unlock_releases_the_named_holder(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`unlock ID` of a holder whose process is gone exits 0, says whose lock it released,
    frees it, even though its heartbeat is fresh."""
    monkeypatch.setenv("BATCHSPEC_STATE", str(db_path))
    with StateStore.open(db_path) as store:
        gone = replace(INFO, pid=dead_pid())
        handle = acquire_lock(store, command="apply", info=gone)
        assert run(["unlock", handle.holder_id]) == 0
        assert current_lock(store) is None
    out = capsys.readouterr().out
    assert f"released the locks of {handle.holder_id} (alice@" in out


def test_unlock_of_a_live_holder_is_refused_without_force(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A holder that is alive with a fresh heartbeat (it may be mid-create) is not released:
    exit 3, the lock stays and the message says how to force it; --force releases it."""
    with StateStore.open(db_path) as store:
        handle = acquire_lock(store, command="apply", info=INFO)
        assert run(["unlock", handle.holder_id, "--state", str(db_path)]) == 3
        assert current_lock(store) == handle.holder
        err = capsys.readouterr().err
        assert "may still be running" in err and "Traceback" not in err
        assert f"batchspec unlock {handle.holder_id} --force" in err
        assert run(["unlock", handle.holder_id, "--force", "--state", str(db_path)]) == 0
        assert current_lock(store) is None
        [*_, event] = store.events()
    assert event.action == "lock.force_unlock" and event.detail["forced"] is True


def test_unlock_of_a_holder_elsewhere_needs_a_stale_heartbeat(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A holder on another host (we cannot see its process) is released without --force
    only once its heartbeat is older than the lock's stale threshold."""
    with StateStore.open(db_path) as store:
        remote = replace(INFO, host="ci-runner-7.example")
        handle = acquire_lock(store, command="apply", info=remote)
        assert run(["unlock", handle.holder_id, "--state", str(db_path)]) == 3
        stale = datetime.now(timezone.utc) - STALE_AFTER - timedelta(seconds=5)
        store.write_lock_row(replace(handle.holder, heartbeat=utc_timestamp(stale)))
        assert run(["unlock", handle.holder_id, "--state", str(db_path)]) == 0
        assert current_lock(store) is None


def test_unlock_with_a_wrong_id_exits_1_naming_the_holder(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong id releases nothing, exits 1 and tells the real holder's id."""
    with StateStore.open(db_path) as store:
        handle = acquire_lock(store, command="apply", info=INFO)
        assert run(["unlock", "not-it", "--state", str(db_path)]) == 1
        assert current_lock(store) == handle.holder
    err = capsys.readouterr().err
    assert f"batchspec unlock {handle.holder_id}" in err and "Traceback" not in err


def test_unlock_without_a_lock_or_database_exits_1(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No database, or no lock held: exit 1 with a message, and no database is created."""
    assert run(["unlock", "abc", "--state", str(db_path)]) == 1
    assert "no state database" in capsys.readouterr().err and not db_path.exists()
    StateStore.open(db_path).close()
    assert run(["unlock", "abc", "--state", str(db_path)]) == 1
    assert "no lock is held" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["apply", "forget"])
def test_a_takeover_is_an_event_of_the_run_that_took_the_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """The lock of a dead process taken over by apply (or forget) is recorded under that
    run, so `history` shows it with the run instead of in no run at all."""
    from workspaces import ResourceSpec, local_provider, make_workspace, run_cli

    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("triage")]
    )
    assert run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)[0] == 0
    with StateStore.open(ws.state_path) as store:
        acquire_lock(store, command="apply", info=replace(INFO, pid=dead_pid()))
    argv = ["apply", "--yes"] if command == "apply" else ["forget", "triage"]
    code, _, err = run_cli([*argv, str(ws.root)], capsys)
    assert code == 0, err
    code, out, _ = run_cli(["history", str(ws.root), "--limit", "1", "--json"], capsys)
    [latest] = json.loads(out)["runs"]
    assert latest["run"]["command"] == command
    assert "lock.takeover" in [e["action"] for e in latest["events"]]


def test_history_text_names_the_holder_a_takeover_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`history` (text) shows a lock.takeover's previous holder (id, pid, command), not only
    the new holder's id, and leaves unset values out instead of printing `None`."""
    from workspaces import ResourceSpec, local_provider, make_workspace, run_cli

    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("triage")]
    )
    assert run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)[0] == 0
    gone = replace(INFO, pid=dead_pid())
    with StateStore.open(ws.state_path) as store:
        dead = acquire_lock(store, command="apply", info=gone)
    assert run_cli(["apply", "--yes", str(ws.root)], capsys)[0] == 0
    code, out, _ = run_cli(["history", str(ws.root), "--limit", "1", "--events", "all"], capsys)
    [line] = [ln for ln in out.splitlines() if "lock.takeover" in ln]
    previous = line.split("previous=(", 1)[1]
    assert f"holder_id={dead.holder_id}," in previous
    assert f"pid={gone.pid}," in previous and "command=apply" in previous
    assert "None" not in line


def test_postgresql_unlock_of_a_holder_whose_session_ended_needs_no_force(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """PostgreSQL: a holder on another host whose database session has ended (a killed CI
    runner) is released by `unlock ID` with no --force, however fresh its heartbeat: its
    session says it is gone, as `status` (which no longer lists it) does."""
    elsewhere = replace(INFO, host="ci-runner-7")
    holder_store = StateStore.open(postgres_url)
    handle = acquire_lock(holder_store, command="apply", info=elsewhere, resources=["alpha"])
    holder_store.close()  # the session ends with its lock rows left behind, as after kill -9
    assert run(["unlock", handle.holder_id, "--state", postgres_url]) == 0, capsys.readouterr()
    assert f"released the locks of {handle.holder_id}" in capsys.readouterr().out
    with StateStore.open(postgres_url) as store:
        assert store.lock_rows() == {}


def test_postgresql_refusals_say_the_holder_is_connected_and_how_to_stop_it(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """PostgreSQL: a holder whose session is open is running: the exit-3 messages of a run
    that needs its resource and of `unlock ID` say so and name `unlock ID --force`, never
    "if that run is gone" (a gone run's locks are free already)."""
    from batchspec.errors import StateLockedError

    elsewhere = replace(INFO, host="ci-runner-7")
    with (
        StateStore.open(postgres_url) as store,
        acquire_lock(store, command="apply", info=elsewhere, resources=["alpha"]) as handle,
        StateStore.open(postgres_url) as other,
    ):
        with pytest.raises(StateLockedError) as locked:
            acquire_lock(other, command="apply", info=INFO, resources=["alpha"])
        assert "its database session is open" in str(locked.value)
        assert f"batchspec unlock {handle.holder_id} --force" in str(locked.value)
        assert "if that run is gone" not in str(locked.value)
        assert run(["unlock", handle.holder_id, "--state", postgres_url]) == 3
        err = capsys.readouterr().err
        assert "is still running: its database session is open" in err
        assert f"batchspec unlock {handle.holder_id} --force (ends its database session" in err
        assert other.lock_rows() != {}


def test_history_shows_a_killed_run_and_the_run_that_took_its_locks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run killed while holding its locks has no exit code; once a later run takes its
    locks over, `history` says it was killed and which run took over, instead of `running`
    forever (`--json`: `ended_by`); a run with no exit code that nobody took over stays
    `running`."""
    from workspaces import ResourceSpec, local_provider, make_workspace, run_cli

    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("triage")]
    )
    assert run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)[0] == 0
    gone = replace(INFO, pid=dead_pid())
    with StateStore.open(ws.state_path) as store:
        killed = store.start_run("apply", {}, gone)
        acquire_lock(store, command="apply", info=gone, run_id=killed)
        alive = store.start_run("plan", {}, INFO)  # no exit code, no lock: still running
    assert run_cli(["apply", "--yes", str(ws.root)], capsys)[0] == 0
    code, out, _ = run_cli(["history", str(ws.root), "--limit", "3"], capsys)
    lines = {int(ln.split()[1]): ln for ln in out.splitlines() if ln.startswith("run ")}
    taker = max(lines)
    assert f"killed (no exit code; its locks were taken over by run {taker})" in lines[killed]
    assert "  running  " in lines[alive]
    code, out, _ = run_cli(["history", str(ws.root), "--limit", "3", "--json"], capsys)
    ended = {r["run"]["id"]: r["ended_by"] for r in json.loads(out)["runs"]}
    assert ended[killed] == {"run_id": taker, "action": "lock.takeover"}
    assert ended[alive] is None and ended[taker] is None


@pytest.mark.parametrize(
    ("age", "code"), [(timedelta(minutes=9, seconds=30), 3), (timedelta(minutes=10, seconds=30), 0)]
)
def test_a_heartbeat_counts_as_stale_after_the_documented_10_minutes(
    db_path: Path, capsys: pytest.CaptureFixture[str], age: timedelta, code: int
) -> None:
    """A holder elsewhere whose heartbeat is 9.5 minutes old is refused, naming the 10-minute
    threshold; at 10.5 minutes it is released without --force (docs/concepts.md)."""
    with StateStore.open(db_path) as store:
        handle = acquire_lock(store, command="apply", info=replace(INFO, host="ci-7.example"))
        beat = utc_timestamp(datetime.now(timezone.utc) - age)
        store.write_lock_row(replace(handle.holder, heartbeat=beat))
        assert run(["unlock", handle.holder_id, "--state", str(db_path)]) == code
        if code:
            assert "under the 10 minutes after which" in capsys.readouterr().err
            assert current_lock(store) is not None
        else:
            assert current_lock(store) is None
