"""Locks per resource, with real `batchspec apply` processes against one `batchspec serve`.

Runs on different resources of one state proceed side by side; a second run on the same
resource exits 3 naming the holder and the resource; a holder killed with SIGKILL frees its
locks with no `unlock` (PostgreSQL: its session ends; SQLite: its pid is gone on this host).
Each test runs once per backend (``state_location``: an SQLite file or a PostgreSQL database).
alpha's server delays its answers (``--upstream-latency``), so a run on alpha holds its lock
for a while: overlap is proven by a second process finishing while the first still holds
its lock, never by sleeping in the product.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_faults import serve_processes
from servers import request_lines
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    local_provider,
    make_workspace,
    openai_provider,
    run_cli,
)

from batchspec.state.lock import acquire_lock, describe_holder, held_locks
from batchspec.state.runinfo import collect_run_info
from batchspec.state.store import EventRow, StateStore

#: seconds each answer for alpha takes: long enough that its run surely holds its lock while
#: a second process starts and finishes, however loaded the machine
HOLD = "20"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_processes(tmp_path)


def workspace(tmp_path: Path, serve: Any, alpha_latency: str) -> tuple[Workspace, Any]:
    """alpha on a server whose answers take ``alpha_latency`` s, beta on a prompt one;
    returns the workspace and alpha's server."""
    slow = serve("--upstream-latency", alpha_latency)
    fast = serve()
    return make_workspace(
        tmp_path / "ws",
        providers={
            "slow": openai_provider(slow.v1, KEY_ENV),
            "fast": openai_provider(fast.v1, KEY_ENV),
        },
        resources=[
            ResourceSpec("alpha", count=2, provider="slow"),
            ResourceSpec("beta", count=2, provider="fast"),
        ],
    ), slow


def env_for(state: Path | str) -> dict[str, str]:
    return {**os.environ, KEY_ENV: SENTINEL_KEY, "BATCHSPEC_STATE": str(state)}


def start(ws: Workspace, state: Path | str, *args: str) -> subprocess.Popen[str]:
    """A separate `batchspec ARGS` process on ``ws`` with the state at ``state``."""
    return subprocess.Popen(
        batchspec_cmd(*args),
        cwd=ws.root,
        env=env_for(state),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_apply(ws: Workspace, state: Path | str, name: str, *extra: str) -> subprocess.Popen[str]:
    return start(
        ws, state, "apply", "--select", name, "--yes", "--wait", "--poll-interval", "0.1",
        "--timeout", "90", *extra,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def events(state: Path | str, action: str, resource: str) -> list[EventRow]:
    with StateStore.open(state) as store:
        return [e for e in store.events(resource=resource) if e.action == action]


def wait_for_event(
    state: Path | str, action: str, resource: str, proc: subprocess.Popen[str]
) -> EventRow:
    """The first ``action`` event of ``resource``, once ``proc`` (still running) records it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = events(state, action, resource)
        if found:
            return found[0]
        assert proc.poll() is None, finish(proc)
        time.sleep(0.05)
    raise AssertionError(f"no {action} event for {resource}")


def test_runs_on_different_resources_overlap(
    tmp_path: Path, serve: Any, state_location: Path | str
) -> None:
    """Two applies on different --select run side by side: with --lock-timeout 0, the second
    creates, collects and exits 0 while the first still runs, holding its lock."""
    ws, slow = workspace(tmp_path, serve, HOLD)
    first = start_apply(ws, state_location, "alpha")
    try:
        wait_for_event(state_location, "create", "alpha", first)
        code, _, err = finish(start_apply(ws, state_location, "beta", "--lock-timeout", "0"))
        assert code == 0, err
        assert first.poll() is None  # alpha's answers are not due yet: it still runs
        with StateStore.open(state_location) as store:
            assert [lock.resource for lock in held_locks(store)] == ["alpha"]
        assert events(state_location, "collect", "alpha") == []
        assert len(ws.outputs("beta")) == 2
    finally:
        stop_now(first, slow)


def test_second_run_on_the_same_resource_exits_3_naming_holder_and_resource(
    tmp_path: Path, serve: Any, state_location: Path | str
) -> None:
    """A run on a resource another run holds says at once that it waits and for whom, waits
    --lock-timeout, then exits 3 naming the holder (id, pid, command) and the resource;
    status --json shows the held lock."""
    ws, slow = workspace(tmp_path, serve, HOLD)
    first = start_apply(ws, state_location, "alpha")
    try:
        wait_for_event(state_location, "create", "alpha", first)
        code, out, err = finish(start(ws, state_location, "status", "--json"))
        assert code == 0, err
        [lock] = json.loads(out)["locks"]
        assert (lock["resource"], lock["pid"], lock["command"]) == ("alpha", first.pid, "apply")
        began = time.monotonic()
        code, out, err = finish(start_apply(ws, state_location, "alpha", "--lock-timeout", "0.5"))
        assert code == 3, err
        assert time.monotonic() - began >= 0.5
        waiting = "resource alpha is locked by another run: " + lock["holder_id"]
        assert waiting in out and "waiting up to 0.5 s for it" in out, out
        for part in ("resource alpha", lock["holder_id"], f"pid {first.pid}", "'apply'"):
            assert part in err
        assert f"batchspec unlock {lock['holder_id']}" in err
        assert first.poll() is None
    finally:
        stop_now(first, slow)
    assert len(events(state_location, "create", "alpha")) == 1  # one batch, not two


def test_a_killed_holder_frees_its_locks_without_unlock(
    tmp_path: Path, serve: Any, state_location: Path | str
) -> None:
    """kill -9 a run holding a resource: the next run on it proceeds with no `unlock`
    (PostgreSQL: the session lock died with the session; SQLite: the pid is gone on this
    host), takes the lock over, and adopts the killed run's batch instead of paying again."""
    ws, _ = workspace(tmp_path, serve, "2")
    first = start_apply(ws, state_location, "alpha")
    wait_for_event(state_location, "create", "alpha", first)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    code, out, err = finish(start_apply(ws, state_location, "alpha", "--lock-timeout", "10"))
    assert code == 0, err
    assert "took over the lock" in out and f"{first.pid} on host" in out
    [takeover] = events_of(state_location, "lock.takeover")
    assert takeover.detail["previous"]["pid"] == first.pid
    assert len(events(state_location, "create", "alpha")) == 1
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ws.input_ids("alpha")


def test_a_killed_run_shows_as_killed_in_history_and_ends_at_takeover(
    tmp_path: Path, serve: Any, state_location: Path | str
) -> None:
    """kill -9 a run: `history` shows it killed (not running) at once, and the run that takes
    its lock over marks its runs row ended (no exit code), naming it in `lock.takeover`."""
    ws, _ = workspace(tmp_path, serve, "2")
    first = start_apply(ws, state_location, "alpha")
    wait_for_event(state_location, "create", "alpha", first)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    with StateStore.open(state_location) as store:
        [killed] = [r for r in store.runs() if r.pid == first.pid]
    assert killed.ended_at is None  # nothing has found out yet but history
    code, out, err = finish(start(ws, state_location, "history", "--json"))
    assert code == 0, err
    [entry] = json.loads(out)["runs"]
    assert entry["outcome"] == "killed"
    code, out, err = finish(start(ws, state_location, "history"))
    assert code == 0, err
    assert f"run {killed.id} " in out and "killed" in out and "running" not in out
    code, out, err = finish(start_apply(ws, state_location, "alpha", "--lock-timeout", "10"))
    assert code == 0, err
    [takeover] = events_of(state_location, "lock.takeover")
    assert takeover.detail["ended_runs"] == [killed.id]
    with StateStore.open(state_location) as store:
        ended = store.get_run(killed.id)
        assert ended.ended_at is not None and ended.exit_code is None
        assert ended.outcome == "killed"
        assert store.get_run(takeover.run_id or 0).outcome == "exit 0"


def test_takeover_ends_only_the_dead_holders_run_not_a_later_one_of_the_same_pid(
    tmp_path: Path, state_location: Path | str
) -> None:
    """A takeover ends the dead holder's unfinished run (started by the time it locked), not
    a run recorded later under the same pid (a reused pid), and not a finished run."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    assert gone.wait(timeout=30) == 0  # a real pid whose process is gone on this host
    dead = dataclasses.replace(collect_run_info(tmp_path, env={}), pid=gone.pid)
    with StateStore.open(state_location) as holder_store:  # closed: its PG session ends
        finished = holder_store.start_run("plan", {}, dead)
        holder_store.finish_run(finished, 0)
        killed = holder_store.start_run("apply", {}, dead)
        acquire_lock(holder_store, command="apply", info=dead, resources=["alpha"])
    time.sleep(0.01)  # timestamps are to the millisecond
    with StateStore.open(state_location) as store:
        later = store.start_run("apply", {}, dead)
        info = collect_run_info(tmp_path, env={})
        taker = store.start_run("apply", {}, info)
        with acquire_lock(
            store, command="apply", info=info, resources=["alpha"], run_id=taker
        ) as handle:
            assert handle.warning and "took over the lock" in handle.warning
        [takeover] = store.events(action="lock.takeover")
        assert takeover.detail["ended_runs"] == [killed]
        outcomes = {run.id: run.outcome for run in store.runs()}
    assert outcomes[killed] == "killed" and outcomes[finished] == "exit 0"
    assert outcomes[later] == "running" and outcomes[taker] == "running"


def stop_now(first: subprocess.Popen[str], slow: Any) -> None:
    """Kill the first run and alpha's server (whose answers are not due for a while)."""
    for process in (first, slow.process):
        process.kill()
        process.wait()


def events_of(state: Path | str, action: str) -> list[EventRow]:
    with StateStore.open(state) as store:
        return [e for e in store.events() if e.action == action]


def test_status_text_lists_each_held_lock_with_its_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status` ends with a Locks: section, one line per locked resource naming its holder."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("alpha")]
    )
    info = collect_run_info(ws.root, env={})
    with (
        StateStore.open(ws.state_path) as store,
        acquire_lock(store, command="cancel", info=info, resources=["alpha"]) as handle,
    ):
        code, out, err = run_cli(["status", str(ws.root)], capsys)
    assert code == 0, err
    locks = out.split("Locks:\n", 1)[1].splitlines()
    assert locks == [f"  alpha: {describe_holder(handle.holder)}"]
    assert f"pid {os.getpid()}" in locks[0] and "'cancel'" in locks[0]


def test_apply_json_lock_wait_event_names_the_lock_and_its_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """apply --json's lock_wait event carries the lock waited for as status --json lists
    locks (resource, holder id, pid, command, ...): it had them only inside its message."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("alpha")]
    )
    info = collect_run_info(ws.root, env={})
    with (
        StateStore.open(ws.state_path) as store,
        acquire_lock(store, command="cancel", info=info, resources=["alpha"]) as handle,
    ):
        code, out, err = run_cli(
            ["apply", str(ws.root), "--json", "--yes", "--lock-timeout", "0.2"], capsys
        )
    assert code == 3, err
    wait = json.loads(out.splitlines()[0])
    assert (wait["event"], wait["resource"]) == ("lock_wait", None)
    lock = wait["lock"]
    assert (lock["resource"], lock["holder_id"]) == ("alpha", handle.holder.holder_id)
    assert (lock["pid"], lock["command"]) == (os.getpid(), "cancel")
    # the exit-3 error that ends it is about the resource held, as its message says
    error = json.loads(out.splitlines()[-1])
    assert (error["event"], error["exit_code"], error["resource"]) == ("error", 3, "alpha")
    assert "resource alpha" in error["message"]


def test_status_says_when_a_lock_holder_on_this_host_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After an apply is killed (kill -9), `status` still lists its lock, but says its process
    is gone and the next run takes it over, so nobody reaches for `unlock --force`."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("alpha")]
    )
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    gone = dataclasses.replace(collect_run_info(ws.root, env={}), pid=ended.pid)
    with StateStore.open(ws.state_path) as store:  # the "killed" run never releases it
        handle = acquire_lock(store, command="apply", info=gone, resources=["alpha"])
    code, out, err = run_cli(["status", str(ws.root)], capsys)
    assert code == 0, err
    [line] = out.split("Locks:\n", 1)[1].splitlines()
    assert line.startswith(f"  alpha: {describe_holder(handle.holder)}")
    assert "its process is gone: the next run that needs it takes it over" in line


def test_cancel_of_a_resource_an_apply_holds_says_how_to_cancel_now(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cancel` refused by another run's lock (an `apply --wait` may hold it for hours) says to
    stop that run and cancel again, besides waiting for it."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("alpha")]
    )
    assert run_cli(["apply", str(ws.root)], capsys)[0] == 0
    info = collect_run_info(ws.root, env={})
    with (
        StateStore.open(ws.state_path) as store,
        acquire_lock(store, command="apply", info=info, resources=["alpha"]),
    ):
        code, out, err = run_cli(["cancel", "alpha", str(ws.root)], capsys)
    assert code == 3, err
    assert "is locked by another run" in err
    assert "to cancel now, stop that run (Ctrl-C: batches it created are kept)" in err


def test_apply_wait_timeout_bounds_the_wait_for_a_lock_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --wait --timeout T` waits for another run's lock at most T (then exit 3, as a
    lock wait that runs out), not the whole --lock-timeout: a CI step's `--timeout 3600`
    beside BATCHSPEC_LOCK_TIMEOUT=300 (the example workflow's) ran up to 3,900 s."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("alpha")]
    )
    info = collect_run_info(ws.root, env={})
    with (
        StateStore.open(ws.state_path) as store,
        acquire_lock(store, command="cancel", info=info, resources=["alpha"]),
    ):
        began = time.monotonic()
        code, out, err = run_cli(
            ["apply", str(ws.root), "--yes", "--wait", "--timeout", "0.3", "--lock-timeout", "8"],
            capsys,
        )
        took = time.monotonic() - began
    assert code == 3, err
    assert took < 4, took  # the lock wait stopped at --timeout, not at --lock-timeout
    assert "locked by another run" in err


@pytest.mark.parametrize("step", ["run-row", "locks"])
def test_a_process_holding_the_database_write_lock_is_a_lock_exit_3(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    """A run paused (SIGSTOP, a debugger) inside a state transaction keeps the database's
    write lock: a run that cannot get it past the busy timeout, at its first write or while
    taking its locks, has changed nothing and exits 3 saying so (it exited 1, "stayed busy",
    which CI cannot tell from a real error); once the holder lets go, the same apply runs."""
    import sqlite3

    import batchspec.state.connection as connection
    import batchspec.state.lock as lock_module

    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(ResourceSpec("triage", count=2, provider="here"),),
    )
    assert run_cli(["apply", str(ws.root), "--wait"], capsys)[0] == 0
    ws.write_input("triage", request_lines(3))  # a request more: something to do
    monkeypatch.setattr(connection, "BUSY_TIMEOUT_SECONDS", 0.2)
    holder = sqlite3.connect(ws.state_path, isolation_level=None)
    try:
        if step == "locks":  # the run row is written; the lock rows find the database held
            real_take = lock_module._try_take

            def held_then_take(*args: Any) -> Any:
                holder.execute("BEGIN IMMEDIATE")
                monkeypatch.setattr(lock_module, "_try_take", real_take)
                return real_take(*args)

            monkeypatch.setattr(lock_module, "_try_take", held_then_take)
        else:
            holder.execute("BEGIN IMMEDIATE")
        code, out, err = run_cli(["apply", str(ws.root), "--wait", "--json"], capsys)
        assert code == 3, err
        assert "stayed busy" in err and "this run changed nothing" in err
        assert json.loads(out.splitlines()[-1])["error"] == "StateLockedError"
    finally:
        holder.close()
    code, _, err = run_cli(["apply", str(ws.root), "--wait"], capsys)
    assert code == 0, err


#: a second process that holds the SQLite state's write lock (BEGIN IMMEDIATE) until stdin ends
HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def write_lock_held(state: Path | str) -> Iterator[None]:
    """The state's database write lock held by another connection for the block: another
    process's BEGIN IMMEDIATE on the SQLite file; PostgreSQL's writer lock (a transaction)."""
    if isinstance(state, Path):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_WRITE_LOCK, str(state)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            yield
        finally:
            holder.kill()
            holder.wait()
        return
    with StateStore.open(state) as store:
        store.db.begin_writer()
        try:
            yield
        finally:
            store.db.rollback()


def test_a_busy_database_is_waited_for_as_long_as_the_lock_timeout_if_longer(
    tmp_path: Path,
    state_location: Path | str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another connection inside a write transaction on the state: a starting `apply` waits
    the busy timeout every write waits, or its `--lock-timeout` when that is longer, then
    exits 3 naming the wait and --lock-timeout, and records nothing (its run row included).
    The busy timeout is made 1 s here (it is 30 s)."""
    import batchspec.state.connection as connection

    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(ResourceSpec("triage", count=2, provider="here"),),
    )
    monkeypatch.setenv("BATCHSPEC_STATE", str(state_location))
    monkeypatch.delenv("BATCHSPEC_LOCK_TIMEOUT", raising=False)
    argv = ["apply", str(ws.root), "--yes", "--wait"]
    assert run_cli(argv, capsys)[0] == 0
    with StateStore.open(state_location) as store:
        runs_before = len(store.runs())
    monkeypatch.setattr(connection, "BUSY_TIMEOUT_SECONDS", 1.0)
    for extra, waited in (
        ([], 1.0),
        (["--lock-timeout", "0"], 1.0),
        (["--lock-timeout", "2.5"], 2.5),
    ):
        with write_lock_held(state_location):
            began = time.monotonic()
            code, _, err = run_cli([*argv, *extra], capsys)
            took = time.monotonic() - began
        assert code == 3, err
        assert waited <= took < waited + 8, (extra, took)
        assert f"stayed busy for {waited:g} s" in err, err
        assert "this run changed nothing" in err and "--lock-timeout" in err
    with StateStore.open(state_location) as store:
        assert len(store.runs()) == runs_before


#: a second process that holds the SQLite state's write lock for argv[2] seconds, then commits
HOLD_WRITE_LOCK_FOR = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def test_a_run_beside_a_long_write_of_another_run_waits_for_it_at_the_default_lock_timeout(
    tmp_path: Path,
) -> None:
    """A run on other resources holds the SQLite writer lock for seconds while it records a
    large input's requests (6-10 s for 200,000; held here 4 s by a second process): an
    `apply` of another resource started meanwhile, at the default --lock-timeout (0), waits
    for it and runs, as runs on different resources do side by side. It exited 3 after 2 s
    ("stayed busy"), for an ordinary write."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(
            ResourceSpec("alpha", count=2, provider="here"),
            ResourceSpec("beta", count=2, provider="here"),
        ),
    )
    env = {k: v for k, v in os.environ.items() if k != "BATCHSPEC_LOCK_TIMEOUT"}
    argv = batchspec_cmd("apply", str(ws.root), "--yes", "--wait")
    first = subprocess.run([*argv, "--select", "alpha"], env=env, capture_output=True, timeout=120)
    assert first.returncode == 0, first.stderr
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE_LOCK_FOR, str(ws.state_path), "4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        began = time.monotonic()
        done = subprocess.run(
            [*argv, "--select", "beta"], env=env, capture_output=True, text=True, timeout=120
        )
        took = time.monotonic() - began
    finally:
        holder.wait(timeout=30)
    assert done.returncode == 0, done.stderr
    assert took >= 3, took  # it waited for the write, rather than finding the state free
    assert (ws.root / "results" / "beta.jsonl").exists()
