"""A pass's submissions side by side, rate limits and Anthropic list polling (issue 13).

Against the engine's APIs on loopback behind a ``RequestProbe`` (tests/probes.py) that counts
every request by route and records when each was answered. Batches are kept in flight by an
upstream that answers nothing until the test opens its gate (``GatedUpstream``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from probes import ProbedServer, start_probed_server
from test_parallel_polling import GatedUpstream
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    json_lines,
    make_workspace,
    openai_provider,
    run_cli,
)

from batchspec.core.apply import ApplyOptions, apply_workspace
from batchspec.core.reconcile import prefetch
from batchspec.core.reporting import Progress
from batchspec.engine.api_faults import ApiFaults
from batchspec.storage.sql import Sql, SqliteSql

UPLOAD = "POST /files"
CREATE = "POST /batches"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


@pytest.fixture
def gated(tmp_path: Path) -> Any:
    started: list[tuple[ProbedServer, GatedUpstream]] = []

    def start(name: str = "engine", **options: Any) -> tuple[ProbedServer, GatedUpstream]:
        upstream = GatedUpstream()
        srv = start_probed_server(
            tmp_path / name, upstream=upstream, api_key=SENTINEL_KEY, **options
        )
        started.append((srv, upstream))
        return srv, upstream

    yield start
    for srv, upstream in started:
        upstream.gate.set()
        srv.stop()


def fleet(root: Path, srv: ProbedServer, n: int, **options: Any) -> Workspace:
    """``n`` one-request resources r00, r01, ... and one of three shards, "sharded"."""
    return make_workspace(
        root,
        providers={"srv": openai_provider(srv.v1, KEY_ENV, **options)},
        resources=[
            *(ResourceSpec(f"r{i:02d}", count=1, prefix=f"p{i}") for i in range(n)),
            ResourceSpec("sharded", count=6, spec={"limits": {"maxRequestsPerBatch": 2}}),
        ],
    )


def overlapping(spans: list[tuple[str, float, float]], route: str) -> int:
    """The most ``route`` requests (each held 0.1 s) that overlapped by more than 0.05 s."""
    held = [(start, end) for r, start, end in spans if r == route]
    return max(
        (sum(1 for s, e in held if min(end, e) - max(start, s) > 0.05) for start, end in held),
        default=0,
    )


def keys_on_server(srv: ProbedServer) -> list[tuple[str, str, str]]:
    rows = srv.engine.list_batches(None, 100)["data"]
    return sorted(
        (
            b["metadata"]["batchspec_resource"],
            b["metadata"]["batchspec_shard"],
            b["metadata"]["batchspec_attempt"].partition("k")[0],  # no shard file's digest
        )
        for b in rows
    )


def audit_log(ws: Workspace) -> list[tuple[str, str]]:
    with ws.store() as store:
        return [(e.action, e.resource or "") for e in store.events() if e.resource]


def submitting_pass(
    root: Path, gated: Any, capsys: pytest.CaptureFixture[str], name: str, **options: Any
) -> tuple[int, int, list[tuple[str, str]], list[tuple[str, str]], ProbedServer, Workspace]:
    """The submit pass of 10 resources and a 3-shard one, uploads and creates held 0.1 s at
    the server: (uploads at once, creates at once, audit log, NDJSON events, server, ws)."""
    srv, _ = gated(name)
    ws = fleet(root, srv, 10, **options)
    srv.probe.hold(UPLOAD, 0.1)
    srv.probe.hold(CREATE, 0.1)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    events = [
        (e["event"], e.get("resource") or "")
        for e in json_lines(out)
        if e.get("event") not in ("plan", "result", "upload_progress")
    ]
    spans = srv.probe.spans
    return overlapping(spans, UPLOAD), overlapping(spans, CREATE), audit_log(ws), events, srv, ws


def test_uploads_and_creates_overlap_one_batch_per_shard_and_the_log_is_deterministic(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The uploads and the creates of different resources overlap at the server, every shard
    gets exactly one batch, and the audit log and NDJSON are exactly those of a run with one
    call at a time (maxConcurrency 1), each kind of event in resource order."""
    uploads, creates, log, events, srv, ws = submitting_pass(
        tmp_path / "parallel", gated, capsys, "e1"
    )
    serial_uploads, serial_creates, serial_log, serial_events, _, _ = submitting_pass(
        tmp_path / "serial", gated, capsys, "e2", maxConcurrency=1
    )

    assert uploads > 1 and creates > 1
    assert serial_uploads == 1 and serial_creates == 1
    names = [f"r{i:02d}" for i in range(10)] + ["sharded"]
    expected = sorted([(n, "0", "1") for n in names[:-1]] + [("sharded", s, "1") for s in "012"])
    assert keys_on_server(srv) == expected
    assert srv.probe.counts[CREATE] == 13
    assert log == serial_log and events == serial_events
    for kind in ("intent", "upload-intent", "upload", "create-intent", "create"):
        order = [resource for action, resource in log if action == kind]
        assert order == sorted(order, key=names.index), kind
    for i, (action, resource) in enumerate(log):  # intent first, for every batch
        if action == "create":
            assert ("create-intent", resource) in log[:i]
            assert ("upload", resource) in log[:i]
    created = [resource for kind, resource in events if kind == "create"]
    assert created == names[:-1] + ["sharded"] * 3
    with ws.store() as store:
        assert all(b.remote_id for b in store.batches())


def test_a_kill_in_the_middle_of_a_parallel_submit_then_apply_creates_no_duplicate(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL while several creates are held at the server after the engine made their
    batches: the re-run adopts what was made, creates the rest, and the server ends with
    exactly one batch per shard."""
    srv, upstream = gated()
    # a create marked as sent but still queued in the pool at the kill is unsure: the re-run
    # waits this long for it to appear before it creates it (default: timeout + a margin)
    ws = fleet(tmp_path / "ws", srv, 12, createConfirmSeconds=1)
    reached = srv.probe.hold(CREATE, 30.0, after=True)
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes", "--parallelism", "4"),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert reached.wait(30), "no create reached the server"
    deadline = time.monotonic() + 10
    # batches made (their answers held), not creates counted: the probe counts a request at
    # its headers, and a create the kill cuts off before its body has come makes no batch
    while srv.batch_count() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    srv.probe.release(CREATE)
    sent = srv.probe.counts[CREATE]
    deadline = time.monotonic() + 3  # a create whose body had all come is made by then
    while srv.batch_count() < sent and time.monotonic() < deadline:
        time.sleep(0.01)
    made = srv.batch_count()
    assert 3 <= made <= sent < 15  # killed in the middle: some made, not all

    upstream.gate.set()
    code, _, err = run_cli(
        ["apply", str(ws.root), "--wait", "--yes", "--poll-interval", "0.05"], capsys
    )

    assert code == 0, err
    names = [f"r{i:02d}" for i in range(12)]
    expected = sorted([(n, "0", "1") for n in names] + [("sharded", s, "1") for s in "012"])
    assert keys_on_server(srv) == expected
    assert all(len(ws.outputs(n)) == 1 for n in names)
    assert len(ws.outputs("sharded")) == 6
    # the re-run sent only the creates never made (one cut off by the kill is one of them)
    assert srv.probe.counts[CREATE] == 15 + (sent - made)
    with ws.store() as store:
        adopted = [e for e in store.events() if e.action == "adopt"]
    assert len(adopted) == made


def test_the_key_lookups_page_the_provider_without_holding_the_states_writer_lock(
    tmp_path: Path, server: Callable[..., ProbedServer]
) -> None:
    """While the pass's key lookups page a slow provider listing, another runner of the same
    state can write (the pages are read before the intents' transaction opens); it could
    not, and failed after its busy timeout, when the lookups paged inside it."""
    srv = server()
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[ResourceSpec("a", count=1, prefix="a"), ResourceSpec("b", count=1)],
    )
    listed = srv.probe.hold("GET /batches", 1.5, times=1)
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes"),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert listed.wait(30), "no list call reached the server"
    time.sleep(0.2)  # the run is now waiting on the first page
    other = sqlite3.connect(ws.state_path, timeout=0.5, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # raises "database is locked" if it is held
        other.execute("ROLLBACK")
    finally:
        other.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert srv.probe.counts["GET /batches"] == 1 and srv.batch_count() == 2


@pytest.mark.parametrize("failing", [1, 3], ids=["while-sending", "after-the-last-send"])
def test_a_failure_while_recording_creates_leaves_no_made_batch_unrecorded(
    tmp_path: Path, server: Callable[..., ProbedServer], failing: int
) -> None:
    """The report of the ``failing``-th create raises (as a closed stdout did): every batch
    the server made is still recorded with its remote id. When it raised while the creates
    after the last send were recorded, their transaction rolled back and they were left
    ``creating`` with no remote id (a batch made, paid for, and not known to the state)."""

    class Raised(Exception):
        pass

    creates = 0

    def report(progress: Progress) -> None:
        nonlocal creates
        if progress.event == "create":
            creates += 1
            if creates == failing:
                raise Raised

    srv = server()
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[ResourceSpec(f"r{i}", count=1, prefix=f"p{i}") for i in range(4)],
    )
    options = ApplyOptions(yes=True, parallelism=2)
    with pytest.raises(Raised):
        apply_workspace([str(ws.root)], options, report=report)
    made = {b["id"] for b in srv.engine.list_batches(None, 100)["data"]}
    with ws.store() as store:
        recorded = {b.remote_id for b in store.batches() if b.remote_id}
    assert made and made == recorded


def test_a_submit_pass_records_its_steps_without_savepoints(
    tmp_path: Path, server: Callable[..., ProbedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass's transactions are kept or undone whole (``atomic(whole=True)``): the steps'
    blocks inside them, and the write methods, take no savepoint on an SQLite state (they
    were half of its statements), and every batch is recorded as before; a resource is
    planned from the row read to see whether it was forgotten, not read again."""
    savepoints: list[str] = []  # taken in the submit pass
    real = Sql.savepoint

    def counted(self: Sql, name: str = "nested") -> Any:
        if any(f.name == "submit_pass" for f in traceback.extract_stack()):
            savepoints.append(name)
        return real(self, name)

    monkeypatch.setattr(Sql, "savepoint", counted)
    reads: list[str] = []  # of r1's resource row, in the submit pass
    query = SqliteSql.query

    def queried(self: SqliteSql, sql: str, params: Any = ()) -> Any:
        mine = "FROM resources WHERE name" in sql and list(params) == ["r1"]
        if mine and any(f.name == "submit_pass" for f in traceback.extract_stack()):
            reads.append(sql)
        return query(self, sql, params)

    monkeypatch.setattr(SqliteSql, "query", queried)
    srv = server()
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[ResourceSpec(f"r{i}", count=2, prefix=f"p{i}") for i in range(3)],
    )
    apply_workspace([str(ws.root)], ApplyOptions(yes=True, parallelism=2), report=lambda _: None)
    assert savepoints == []
    # planned from the row read to see whether it was forgotten; then upsert_resource reads
    # it, and set_current_generation has it from that read, in the same transaction
    # (``state.cached``; its new generation is inserted without another look)
    assert len(reads) == 2
    with ws.store() as store:
        assert len(store.batches()) == 3 and all(b.remote_id for b in store.batches())
        assert [e.action for e in store.events(resource="r1")] == [
            "generation",
            "intent",
            "lookup",
            "upload-intent",
            "upload",
            "create-intent",
            "create",
        ]


GOLDEN_STATE = Path(__file__).parent / "golden" / "state_after_submit_and_collect.json"
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
_REMOTE_ID = re.compile(r"\b(file|batch|req)[-_][A-Za-z0-9]{6,}")
_SHA256 = re.compile(r"\b[0-9a-f]{64}\b")
_EPOCH = re.compile(r'"since": [0-9.]+')  # a lookup's horizon: now less the window
#: tables whose rows say who ran and when (runs), or are gone once the run ends
_NOT_COMPARED = {"runs", "resource_locks", "_sqlite_migrations", "sqlite_sequence"}


def state_dump(db: Path, root: Path) -> dict[str, list[list[Any]]]:
    """Every row of every state table, in rowid order, with what differs from one run to the
    next masked: timestamps (and a lookup's ``since``), the engine's ids, the workspace's
    path, and each sha256 named by the order it first appears in (a result file holds the
    engine's ids and times)."""
    names: dict[str, str] = {}

    def masked(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = _TIMESTAMP.sub("T", value.replace(str(root), "ROOT"))
        value = _REMOTE_ID.sub(r"\1-X", _EPOCH.sub('"since": "T"', value))
        return _SHA256.sub(lambda m: names.setdefault(m.group(0), f"sha{len(names)}"), value)

    conn = sqlite3.connect(db)
    try:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {
            table: [[masked(v) for v in row] for row in conn.execute(f"SELECT * FROM {table}")]
            for table in sorted(set(tables) - _NOT_COMPARED)
        }
    finally:
        conn.close()


def test_a_submit_then_collect_records_the_rows_and_events_they_always_recorded(
    tmp_path: Path, server: Callable[..., ProbedServer]
) -> None:
    """A submit pass, then (every batch completed) a poll+collect pass, leave every state
    table as they did before the state's statements were cut (a savepoint, a read after a
    write, a read the step had just made): the same rows, values and events, in the same
    order (``GOLDEN_STATE``, made by the build before; ids and times masked). A change that
    means to record something else rewrites it: ``state_dump`` of this test's state."""
    srv = server()
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[
            ResourceSpec("r0", count=2, prefix="p0"),
            ResourceSpec("r1", count=3, prefix="p1"),
        ],
    )
    options = ApplyOptions(yes=True, parallelism=2)
    apply_workspace([str(ws.root)], options, report=lambda _: None)
    deadline = time.monotonic() + 30
    while any(b["status"] != "completed" for b in srv.engine.list_batches(None, 100)["data"]):
        assert time.monotonic() < deadline, "the engine did not complete the batches"
        time.sleep(0.02)
    apply_workspace([str(ws.root)], options, report=lambda _: None)

    dump = state_dump(ws.state_path, ws.root)
    assert dump == json.loads(GOLDEN_STATE.read_text())


class RecordedLimit(prefetch.AdaptiveLimit):
    """An ``AdaptiveLimit`` that keeps every instance made, for the test to read."""

    made: list[prefetch.AdaptiveLimit] = []

    def __init__(self, ceiling: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(ceiling, *args, **kwargs)
        RecordedLimit.made.append(self)


def test_429s_shrink_the_calls_in_flight_and_they_grow_back_never_above_n(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve refusing requests 5 to 10 with 429 + Retry-After: the provider's limit halves
    (to at most 3 calls at once), grows back to --parallelism once the refusals stop,
    the server never sees more than N requests at once, and every resource gets one batch."""
    RecordedLimit.made = []
    monkeypatch.setattr(prefetch, "AdaptiveLimit", RecordedLimit)
    srv, _ = gated(api_faults=ApiFaults(start=5, count=6, retry_after=0.02))
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[ResourceSpec(f"r{i:02d}", count=1, prefix=f"p{i}") for i in range(40)],
    )

    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--parallelism", "6"], capsys)

    assert code == 0, err
    [limit] = [lim for lim in RecordedLimit.made if lim.history[0][1] == 6]
    values = [value for _, value in limit.history]
    lowest = values.index(min(values))
    assert min(values) <= 3  # halved at least once
    assert max(values) <= 6 and limit.peak <= 6
    assert values[-1] == 6 and max(values[lowest:]) == 6  # grown back
    assert srv.probe.peak <= 6
    assert len(keys_on_server(srv)) == 40


def test_a_rate_limited_pass_says_so_at_its_end(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pass whose calls met 429s (absorbed by the retries) ends with one `throttled` event
    for that provider, in the NDJSON and the plain log: how many calls waited and how low
    the calls in flight went, so a slow, silent pass explains itself; a pass without 429s
    has none."""
    srv, _ = gated(api_faults=ApiFaults(start=5, count=6, retry_after=0.02))
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[ResourceSpec(f"r{i:02d}", count=1, prefix=f"p{i}") for i in range(20)],
    )

    code, out, err = run_cli(
        ["apply", str(ws.root), "--yes", "--json", "--parallelism", "6"], capsys
    )
    assert code == 0, err
    [throttled] = [e for e in json_lines(out) if e["event"] == "throttled"]
    assert throttled["provider"] == "srv" and throttled["resource"] is None
    assert 1 <= throttled["throttled_calls"] <= 6
    assert throttled["lowest_limit"] <= 3 and throttled["ceiling"] == 6
    assert json_lines(out)[-1]["event"] == "result"

    code, text, _ = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0 and "rate-limited" not in text


def test_a_429_without_retries_left_still_fails_the_run_clearly(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A provider that keeps answering 429 past the client's retries fails apply with the
    rate-limit message, not a traceback, and nothing was created."""
    srv, _ = gated(api_faults=ApiFaults(start=1, count=1000, retry_after=0.01))
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[ResourceSpec(f"r{i:02d}", count=1) for i in range(3)],
    )

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 1
    assert "Rate limited" in err and "Traceback" not in err
    assert "srv rate-limited" in out + err  # the pass says so, though it did not end
    with ws.store() as store:
        assert all(b.remote_id is None for b in store.batches())
    assert srv.batch_count() == 0

    code, out, _ = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 1  # the pass the 429s stopped says so before its error
    events = [e["event"] for e in json_lines(out)]
    assert "throttled" in events and events.index("throttled") < events.index("error"), events


def test_anthropic_batches_are_polled_with_list_pages_and_files_fetched_only_when_ended(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 Message Batches in flight cost ceil(12/5) list calls a pass (pages of 5), one
    retrieve (the check that the listing is not behind) and no results; once they have
    ended, one results fetch per part and still that one retrieve, and every resource is
    collected in order."""
    monkeypatch.setattr(prefetch, "LIST_PAGE_SIZE", 5)
    srv, upstream = gated()
    provider = {"type": "anthropic", "baseUrl": srv.base_url, "apiKeyEnv": KEY_ENV}
    names = [f"r{i:02d}" for i in range(12)]
    ws = make_workspace(
        tmp_path / "ws",
        providers={"claude": provider},
        resources=[ResourceSpec(n, count=1, provider="claude", prefix=n) for n in names],
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    srv.probe.counts.clear()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    lists = srv.probe.counts["GET /messages/batches"]
    others = sum(n for r, n in srv.probe.counts.items() if r.startswith("GET /messages/batches/"))
    assert (lists, others) == (3, 1)
    polled = [e["resource"] for e in json_lines(out) if e.get("event") == "poll"]
    assert polled == names

    upstream.gate.set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = srv.engine.list_batches(None, 100)["data"]
        if all(r["status"] == "completed" for r in rows):
            break
        time.sleep(0.02)
    srv.probe.counts.clear()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    routes = srv.probe.counts
    assert routes["GET /messages/batches"] == 3
    results = sum(n for r, n in routes.items() if r.endswith("/results"))
    retrieves = sum(n for r, n in routes.items() if r.startswith("GET /messages/batches/"))
    assert results == 12 and retrieves == results + 1  # the results routes and the check
    collected = [e["resource"] for e in json_lines(out) if e.get("event") == "collect"]
    assert collected == names
    assert all(len(ws.outputs(n)) == 1 for n in names)


CREATE_ROUTES = [
    pytest.param("openai", r"^POST /v1/batches$", id="side-by-side"),
    pytest.param("anthropic", r"^POST /v1/messages/batches$", id="one-at-a-time"),
]


def refusing_late(
    root: Path,
    gated: Any,
    capsys: pytest.CaptureFixture[str],
    provider_type: str,
    route: str,
    status: int = 429,
) -> tuple[Workspace, ProbedServer]:
    """Three resources applied, then a fourth, "late", whose creates the server answers
    ``status`` (429: rate-limited)."""
    srv, _ = gated(root.name)
    provider = {"type": provider_type, "apiKeyEnv": KEY_ENV, "options": {"maxRetries": 0}}
    provider["baseUrl"] = srv.v1 if provider_type == "openai" else srv.base_url
    specs = [ResourceSpec(f"r{i:02d}", count=1, prefix=f"p{i}") for i in range(3)]
    first = make_workspace(root, providers={"srv": provider}, resources=specs)
    assert run_cli(["apply", str(first.root), "--yes"], capsys)[0] == 0
    limited = {"error": {"type": "rate_limit_error", "message": "Slow down."}}
    srv.probe.refuse(route, status, limited)
    resources = [*specs, ResourceSpec("late")]
    return make_workspace(root, providers={"srv": provider}, resources=resources), srv


@pytest.mark.parametrize(("provider_type", "create_route"), CREATE_ROUTES)
def test_a_create_refused_past_its_retries_names_its_resource(
    tmp_path: Path,
    gated: Any,
    capsys: pytest.CaptureFixture[str],
    provider_type: str,
    create_route: str,
) -> None:
    """In a workspace of many resources, a create the provider keeps refusing (429 past
    maxRetries) fails apply with an error that names that resource, on stderr, in the
    --json error event and in the audit log, whether creates run side by side or serially."""
    ws, _ = refusing_late(tmp_path / "text", gated, capsys, provider_type, create_route)
    ws_json, _ = refusing_late(tmp_path / "json", gated, capsys, provider_type, create_route)
    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    json_code, out, _ = run_cli(["apply", str(ws_json.root), "--yes", "--json"], capsys)

    assert code == json_code == 1
    assert "Error: [late] srv: create" in err and "Traceback" not in err
    assert json_lines(out)[-1]["message"].startswith("[late] srv: create")
    with ws.store() as store:
        [error] = [e for e in store.events() if e.action == "error"]
    assert error.detail["message"].startswith("[late] srv: create")
    assert error.resource == "late"  # so `show late` lists it among its last events
    assert "[late] srv: create" in run_cli(["show", "late", str(ws.root)], capsys)[1]


@pytest.mark.parametrize(
    ("route", "status"),
    [(r"^POST /v1/batches$", 400), (r"^GET /v1/batches$", 500)],
    ids=["create-refused", "key-lookup-failed"],
)
def test_the_json_error_event_of_a_refused_create_carries_its_resource(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], route: str, status: int
) -> None:
    """An apply whose create for "late" the provider refuses with a 400, or whose lookup of
    late's key before it fails (it named no resource), ends its --json output with an error
    event whose `resource` is "late", like every other event's."""
    ws, _ = refusing_late(tmp_path / "ws", gated, capsys, "openai", route, status)
    code, out, _ = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 1
    *events, error = json_lines(out)
    assert error["event"] == "error" and error["resource"] == "late", error
    assert error["message"].startswith("[late] ")
    assert all("resource" in event for event in events)


@pytest.mark.parametrize(("provider_type", "create_route"), CREATE_ROUTES)
def test_a_create_refused_with_429_is_created_at_once_by_the_next_apply(
    tmp_path: Path,
    gated: Any,
    capsys: pytest.CaptureFixture[str],
    provider_type: str,
    create_route: str,
) -> None:
    """A create the provider refused (429 past maxRetries) made no batch: once the limit
    lifts, the next apply creates it in that run (one lookup, no 'waiting to confirm' for
    createConfirmSeconds, meant for creates whose answer was lost), and only once."""
    ws, srv = refusing_late(tmp_path / "ws", gated, capsys, provider_type, create_route)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 1
    srv.probe.refusals.clear()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    late = [e["event"] for e in json_lines(out) if e.get("resource") == "late"]
    assert "waiting" not in late and "create" in late
    assert srv.batch_count() == 4
    with ws.store() as store:
        assert [e.action for e in store.events() if e.action.startswith("create-")].count(
            "create-refused"
        ) == 1


def beta_lost_then_alpha(
    tmp_path: Path,
    gated: Any,
    capsys: pytest.CaptureFixture[str],
    alpha_status: int,
    alpha: str = "alpha",
) -> tuple[Workspace, ProbedServer, Any]:
    """Anthropic resources ``alpha`` (settled before beta unless named after it) and beta,
    both of requests req-0..req-2 (custom_ids teams reuse) with other prompts. beta's create
    makes a batch and loses its answer (a 500 after the engine acted; the batch, still
    running, cannot be checked, so the apply fails); then alpha's create is answered
    ``alpha_status`` without reaching the engine. The batch then ends."""
    srv, upstream = gated()
    provider = {
        "type": "anthropic",
        "baseUrl": srv.base_url,
        "apiKeyEnv": KEY_ENV,
        "options": {"maxRetries": 0, "createConfirmSeconds": 0},
    }
    ws = make_workspace(
        tmp_path / "ws",
        providers={"claude": provider},
        resources=[ResourceSpec(n, provider="claude") for n in (alpha, "beta")],
    )
    lines = [json.loads(line) for line in ws.input_path("beta").read_text().splitlines()]
    for line in lines:
        line["body"]["messages"][0]["content"] += " (beta)"
    ws.write_input("beta", lines)
    srv.probe.hold("POST /messages/batches", 0, after=True, times=1, replace_status=500)
    assert run_cli(["apply", str(ws.root), "--yes", "-s", "beta"], capsys)[0] == 1
    refusal = {"type": "error", "error": {"type": "api_error", "message": "try again"}}
    srv.probe.refuse(r"^POST /v1/messages/batches$", alpha_status, refusal)
    assert run_cli(["apply", str(ws.root), "--yes", "-s", alpha], capsys)[0] == 1
    srv.probe.refusals.clear()
    upstream.gate.set()
    return ws, srv, upstream


def answers_to_beta(ws: Workspace, name: str) -> list[bool]:
    return ["(beta)" in json.dumps(o) for o in ws.outputs(name)]


def test_a_refused_anthropic_create_does_not_take_another_resources_lost_batch(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """alpha's create was refused (429: it made nothing); beta's made a batch and lost its
    answer. The next apply settles alpha first: beta's batch (as many requests, the same
    custom_ids, unclaimed) is not alpha's. alpha was left journaled as a lost create and
    took it: beta's answers written as alpha's results, alpha's prompts never sent."""
    ws, srv, _ = beta_lost_then_alpha(tmp_path, gated, capsys, 429)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", "--timeout", "30"], capsys)

    assert code == 0, out + err
    assert srv.batch_count() == 2
    assert answers_to_beta(ws, "alpha") == [False] * 3
    assert answers_to_beta(ws, "beta") == [True] * 3


@pytest.mark.parametrize("alpha", ["alpha", "gamma"])
def test_two_lost_anthropic_creates_with_the_same_ids_do_not_take_each_others_batch(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], alpha: str
) -> None:
    """beta's and alpha's (gamma's) creates both lost their answers (a gateway's 500s), a
    moment apart; only beta's made a batch. Which of them made it cannot be told (no
    metadata, the same custom_ids, sent within a second or two): it is set aside, whichever
    is settled first, and both are created again, each answering its own prompts (beta's
    requests paid for once more). alpha took beta's batch, its answers, as its own; and
    set aside by the first only, the second took it once the first was settled."""
    ws, srv, _ = beta_lost_then_alpha(tmp_path, gated, capsys, 500, alpha)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", "--timeout", "30"], capsys)

    assert code == 0, out + err
    assert srv.batch_count() == 3
    assert answers_to_beta(ws, alpha) == [False] * 3
    assert answers_to_beta(ws, "beta") == [True] * 3


def test_every_create_said_to_be_sent_is_followed_by_what_became_of_it(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Creates sent side by side and all refused (400: nothing made): the --json output says
    of each one that it was refused, not only of the first, whose error ends the run. The
    others were said to be 'creating' and then nothing: CI could not tell a batch that may
    have been made (and pays) from one refused."""
    srv, _ = gated()
    ws = fleet(tmp_path / "ws", srv, 3, maxRetries=0)
    srv.probe.refuse(r"^POST /v1/batches$", 400, {"error": {"message": "No."}})

    code, out, _ = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 1
    events = json_lines(out)
    creating = [(e["resource"], e["shard"]) for e in events if e["event"] == "creating"]
    refused = [(e["resource"], e["shard"]) for e in events if e["event"] == "create_refused"]
    assert len(creating) == 6 and refused == creating
    assert srv.batch_count() == 0
