"""Whether a recorded run is still going, as `history` tells it on any host.

A run's row is written before it takes its locks; a run killed in between (waiting for a lock
another run holds) holds no lock for a later run to take over. In PostgreSQL every run holds a
session lock keyed on its id while it runs (``batchspec.state.runs``), so `history` on another
host calls it `killed` once its session is gone, and `running` while it waits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from workspaces import ResourceSpec, local_provider, make_workspace, run_cli

from batchspec.state.lock import _held_advisory_keys, acquire_lock, runs_whose_session_ended
from batchspec.state.runinfo import RunInfo
from batchspec.state.runs import run_session_key
from batchspec.state.store import StateStore

INFO = RunInfo("alice", socket.gethostname(), os.getpid(), None, None, None, None, None, "0")
ELSEWHERE = "runner-9.ci.example"

#: `batchspec ARGS...` in a process that takes its host name to be argv[1] (another machine)
ON_ANOTHER_HOST = textwrap.dedent(
    """
    import socket, sys
    socket.gethostname = lambda: sys.argv[1]
    from batchspec.cli.main import main
    main(sys.argv[2:])
    """
)


def history_outcomes(url: str, capsys: pytest.CaptureFixture[str]) -> dict[int, str]:
    code, out, err = run_cli(["history", "--state", url, "--json"], capsys)
    assert code == 0, err
    return {r["run"]["id"]: r["outcome"] for r in json.loads(out)["runs"]}


def eventually(check: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_run_killed_while_waiting_for_a_lock_is_killed_in_history_on_another_host(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PostgreSQL: an apply on another host that recorded its run and waits for a lock shows
    `running`; SIGKILLed there (no lock of its own for anyone to take over), `history --json`
    here shows it `killed` (it said `running` for ever: its pid means nothing on this host)."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(ResourceSpec("triage", count=2, provider="here"),),
    )
    with (
        StateStore.open(postgres_url) as store,
        acquire_lock(store, command="apply", info=INFO),  # the whole workspace: it waits
    ):
        waiter = subprocess.Popen(
            [sys.executable, "-c", ON_ANOTHER_HOST, ELSEWHERE, "apply", str(ws.root), "--yes"]
            + ["--state", postgres_url, "--lock-timeout", "120"],  # it ends by then anyway
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert waiter.stdout is not None
            line = waiter.stdout.readline()  # said once it has recorded its run and waits
            assert "is locked by another run" in line and "waiting up to 120 s" in line, line
            [run] = [r for r in store.runs() if r.host == ELSEWHERE]
            assert history_outcomes(postgres_url, capsys)[run.id] == "running"
            waiter.send_signal(signal.SIGKILL)
            waiter.wait(timeout=10)
            assert eventually(lambda: history_outcomes(postgres_url, capsys)[run.id] == "killed")
            assert store.get_run(run.id).ended_at is None  # nobody took its locks over
        finally:
            waiter.kill()
            waiter.wait()


def test_a_run_holds_its_session_lock_until_it_records_its_end(postgres_url: str) -> None:
    """PostgreSQL: the run's session lock is held from the transaction that records the run
    to the one that records its end, then let go (a long-lived process leaks none); SQLite
    runs have none, and none is ever called killed for want of one."""
    with StateStore.open(postgres_url) as store, StateStore.open(postgres_url) as other:
        run_id = store.start_run("apply", {}, INFO)
        key = run_session_key(store.db, run_id)
        assert key in _held_advisory_keys(other)
        assert runs_whose_session_ended(other, other.runs()) == frozenset()
        store.finish_run(run_id, 0)
        assert key not in _held_advisory_keys(other)
        killed = store.start_run("apply", {}, INFO)
    with StateStore.open(postgres_url) as store:  # its session ended with no end recorded
        assert runs_whose_session_ended(store, store.runs()) == {killed}


def test_sqlite_runs_hold_no_session_lock(tmp_path: Path) -> None:
    """SQLite: nothing changes; a run's pid tells, on its own host (``run_outcome``)."""
    with StateStore.open(tmp_path / "state.db") as store:
        store.start_run("apply", {}, INFO)
        [row] = store.db.query("SELECT session_lock FROM runs")
        assert row["session_lock"] is None
        assert runs_whose_session_ended(store, store.runs()) == frozenset()


def test_a_run_that_ends_while_history_reads_is_not_called_killed(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: `history` reads the runs with no end, then which session locks are held. A
    run that records its end (exit 0) and lets its lock go between those two reads looked
    like a run with no end and a free lock: `killed`, for a run that succeeded. A run is
    called killed only if it still has no end once the locks were read (its end is committed
    before its lock is let go)."""
    import batchspec.state.lock as lock_module

    with StateStore.open(postgres_url) as store, StateStore.open(postgres_url) as reader:
        run_id = store.start_run("apply", {}, INFO)
        runs = reader.runs()
        real = lock_module._held_advisory_keys

        def run_ends_first(s: StateStore) -> set[int]:
            store.finish_run(run_id, 0)  # between the two reads
            return real(s)

        monkeypatch.setattr(lock_module, "_held_advisory_keys", run_ends_first)
        assert runs_whose_session_ended(reader, runs) == frozenset()
        assert reader.get_run(run_id).exit_code == 0
