"""Few commits per pass (issue 13): a pass records many resources in one transaction each
time it may, and still commits every intent before the call it allows is sent.

Commits are counted on the state database's own connections with sqlite3's trace callback
(``COMMIT`` statements, and writes made outside any transaction, which commit themselves),
on the thread that runs the apply; the engine's and the caches' databases are not counted.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from probes import ProbedServer, start_probed_server
from serve_faults import apply_wait, serve_processes, served_workspace
from test_parallel_polling import GatedUpstream, wait_all_terminal
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    make_workspace,
    openai_provider,
    run_cli,
)

from batchspec.errors import BatchspecError
from batchspec.providers.openai import OpenAIProvider
from batchspec.state import connection
from batchspec.state.store import StateStore
from batchspec.storage import sql

N = 12


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


class CommitCounter:
    """Counts the state database's commits made on the thread that created it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.commits = 0
        self.thread = threading.get_ident()
        original = sql.SqliteSql.__init__
        counter = self

        def traced(self: sql.SqliteSql, conn: sqlite3.Connection) -> None:
            original(self, conn)

            def on_statement(statement: str) -> None:
                if threading.get_ident() != counter.thread:
                    return
                word = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
                if word in ("COMMIT", "END"):
                    counter.commits += 1
                elif word in ("INSERT", "UPDATE", "DELETE", "REPLACE") and not conn.in_transaction:
                    counter.commits += 1  # autocommit: a transaction (and a sync) of its own

            conn.set_trace_callback(on_statement)

        monkeypatch.setattr(sql.SqliteSql, "__init__", traced)


def fleet(root: Path, srv: ProbedServer, n: int) -> Workspace:
    return make_workspace(
        root,
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[ResourceSpec(f"r{i:02d}", count=1) for i in range(n)],
    )


def test_a_collecting_pass_commits_a_few_times_not_per_resource(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass that polls, collects and writes the results of N resources commits far fewer
    than N times (it used to commit three times per resource), and every result is written."""
    monkeypatch.setattr(connection, "GROUP_MAX_SECONDS", 60.0)  # no group is due in this test
    upstream = GatedUpstream()
    srv = start_probed_server(tmp_path / "engine", upstream=upstream, api_key=SENTINEL_KEY)
    try:
        ws = fleet(tmp_path / "ws", srv, N)
        assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
        upstream.gate.set()
        wait_all_terminal(srv, N)
        counter = CommitCounter(monkeypatch)

        code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

        assert code == 0, err
        assert all(len(ws.outputs(f"r{i:02d}")) == 1 for i in range(N))
        # the run's own records (run start and end, locks) and one group
        assert counter.commits <= 10, counter.commits
        with ws.store() as store:
            assert [e.action for e in store.events() if e.action == "results"] == ["results"] * N
    finally:
        upstream.gate.set()
        srv.stop()


def test_a_submitting_pass_commits_at_most_once_per_intent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submit pass of N one-batch resources commits at most twice per intent (its step's
    records, then its create's; fewer when the calls of several have ended) plus the run's
    own records: nothing of an intent commits on its own (intent, upload, create-intent)."""
    upstream = GatedUpstream()
    srv = start_probed_server(tmp_path / "engine", upstream=upstream, api_key=SENTINEL_KEY)
    try:
        ws = fleet(tmp_path / "ws", srv, N)
        counter = CommitCounter(monkeypatch)

        code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

        assert code == 0, err
        assert counter.commits <= 2 * N + 10, counter.commits
        assert srv.probe.counts["POST /batches"] == N
    finally:
        upstream.gate.set()
        srv.stop()


def test_a_commit_group_keeps_what_finished_when_a_step_fails(tmp_path: Path) -> None:
    """A step that raises inside a group loses only its own records: what the steps before it
    recorded is committed (as when each committed on its own), then the error goes on."""
    with StateStore.open(tmp_path / "state.db") as store:
        run = None  # events need no run
        with pytest.raises(BatchspecError), store.commit_group() as group:
            group.join()
            with store.atomic():
                store.record_event(run, "poll", resource="a", detail={})
            with store.atomic():
                store.record_event(run, "poll", resource="b", detail={})
                raise BatchspecError("step b failed")
        assert not store.in_transaction
    with StateStore.open(tmp_path / "state.db") as again:
        assert [e.resource for e in again.events() if e.action == "poll"] == ["a"]


def test_a_flushed_group_leaves_the_next_write_to_commit_on_its_own(tmp_path: Path) -> None:
    """After ``flush`` no transaction is open: a step that must see its intent committed
    before it sends a call (a create, a retry) writes exactly as without a group."""
    with StateStore.open(tmp_path / "state.db") as store:
        run = None  # events need no run
        with store.commit_group() as group:
            group.join()
            store.record_event(run, "poll", resource="a", detail={})
            assert store.in_transaction
            group.flush()
            assert not store.in_transaction
            with StateStore.open(tmp_path / "state.db") as other:  # another process's view
                assert [e.resource for e in other.events() if e.action == "poll"] == ["a"]
            store.record_event(run, "create-intent", resource="b", detail={})
            with StateStore.open(tmp_path / "state.db") as other:
                assert "create-intent" in [e.action for e in other.events()]
        assert group.commits == 1


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_processes(tmp_path)


def test_a_retry_after_a_grouped_collect_commits_its_intent_before_its_create(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream 500s make apply --wait collect and retry in the same passes: at every create
    sent, another connection already sees a committed create-intent for it (the pass's
    commit group is flushed before a spending step, never holding an intent back)."""
    monkeypatch.setattr(connection, "GROUP_MAX_SECONDS", 60.0)  # only the flush commits
    srv = serve("--fault-500", "0.2", "--fault-seed", "3", "--max-attempts", "1")
    ws = served_workspace(
        tmp_path / "ws",
        srv,
        *(ResourceSpec(f"r{i}", count=20, spec={"retry": {"maxAttempts": 6}}) for i in range(3)),
    )
    creates = 0
    seen: list[tuple[int, int]] = []
    original = OpenAIProvider.create_batch

    def create_batch(self: OpenAIProvider, **kwargs: Any) -> Any:
        nonlocal creates
        creates += 1
        with sqlite3.connect(f"file:{ws.state_path}?mode=ro", uri=True) as other:
            (committed,) = other.execute(
                "SELECT count(*) FROM events WHERE action = 'create-intent'"
            ).fetchone()
        seen.append((creates, committed))
        return original(self, **kwargs)

    monkeypatch.setattr(OpenAIProvider, "create_batch", create_batch)

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    assert creates > 3  # retries were created, after collects in the same run
    assert all(committed >= n for n, committed in seen), seen


def test_a_pass_commits_its_group_before_waiting_on_a_slow_download(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a collect waits on a download that has not ended (held at the server), what the
    pass recorded so far is committed: the writer lock is not held across the wait."""
    monkeypatch.setattr(connection, "GROUP_MAX_SECONDS", 60.0)
    upstream = GatedUpstream()
    srv = start_probed_server(tmp_path / "engine", upstream=upstream, api_key=SENTINEL_KEY)
    try:
        ws = fleet(tmp_path / "ws", srv, 3)
        assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
        upstream.gate.set()
        wait_all_terminal(srv, 3)
        reached = srv.probe.hold("GET /files/{id}/content", 30.0)
        seen: list[int] = []

        def look_while_held() -> None:
            reached.wait(20)
            for _ in range(100):  # the step waits WAIT_GRACE, then commits, then waits on
                with sqlite3.connect(f"file:{ws.state_path}?mode=ro", uri=True) as other:
                    (polls,) = other.execute(
                        "SELECT count(*) FROM events WHERE action = 'poll'"
                    ).fetchone()
                if polls > before:
                    break
                threading.Event().wait(0.05)
            seen.append(polls)
            srv.probe.release_all()

        with ws.store() as store:
            before = len([e for e in store.events() if e.action == "poll"])
        looker = threading.Thread(target=look_while_held)
        looker.start()
        code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
        looker.join()

        assert code == 0, err
        assert seen and seen[0] > before, (before, seen)  # the polls were committed mid-wait
        assert all(len(ws.outputs(f"r{i:02d}")) == 1 for i in range(3))
    finally:
        upstream.gate.set()
        srv.stop()
