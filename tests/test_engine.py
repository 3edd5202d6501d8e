"""The engine in-process: storage, lifecycle, validation, idempotency, resume and locking."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from servers import FAST_ENGINE_OPTIONS, jsonl_bytes, read_jsonl, request_lines, wait_for

from batchspec.engine import BuiltinUpstream, Engine, EngineError, Faults, FaultyUpstream
from batchspec.engine.store import Store
from batchspec.engine.upstreams import UpstreamUnreachable
from batchspec.errors import StateLockedError

CHAT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")


def open_engine(data_dir: Path, upstream=None, **options) -> Engine:
    return Engine(data_dir, upstream or BuiltinUpstream(), **{**FAST_ENGINE_OPTIONS, **options})


def run_to_end(engine: Engine, batch_id: str, timeout: float = 10.0) -> dict:
    return wait_for(
        lambda: (b := engine.get_batch(batch_id))["status"] in TERMINAL and b, timeout=timeout
    )


def new_batch(engine: Engine, lines: list, **metadata: str) -> dict:
    file = engine.create_file(jsonl_bytes(lines), "input.jsonl", "batch")
    return engine.create_batch(file["id"], CHAT, "24h", metadata or None)


def test_files_are_content_addressed_and_deduplicated(tmp_path):
    """Two uploads of the same bytes are two files sharing one blob named by its sha256."""
    with open_engine(tmp_path) as engine:
        content = jsonl_bytes(request_lines(3))
        a = engine.create_file(content, "a.jsonl", "batch")
        b = engine.create_file(content, "b.jsonl", "batch")
        assert a["id"] != b["id"]
        path = engine.file_content_path(a["id"])
        assert path == engine.file_content_path(b["id"])
        assert path.read_bytes() == content
        import hashlib

        assert path.name == hashlib.sha256(content).hexdigest()
        engine.delete_file(a["id"])
        assert path.exists()  # b still uses it
        engine.delete_file(b["id"])
        assert not path.exists()


def test_file_object_has_openai_required_fields_and_expiry(tmp_path):
    """A FileObject carries id, object, bytes, created_at, filename, purpose, status, expiry."""
    with open_engine(tmp_path) as engine:
        batch_file = engine.create_file(b"{}\n", "in.jsonl", "batch")
        other = engine.create_file(b"{}", "x.json", "user_data", expires_after_seconds=3600)
    for key in ("id", "object", "bytes", "created_at", "filename", "purpose", "status"):
        assert batch_file[key] is not None, key
    assert batch_file["expires_at"] - batch_file["created_at"] == 30 * 24 * 3600
    assert other["expires_at"] - other["created_at"] == 3600


def test_a_files_expiry_counts_from_its_own_created_at(tmp_path, monkeypatch):
    """A new file's expires_at is its created_at plus its lifetime, from one clock read: two
    reads (the expiry before the bytes were stored, created_at after) made a 30-day file's
    expiry a second short whenever a second ticked in between (a flaky CI run found it)."""
    import batchspec.engine.core as core
    import batchspec.engine.store as store

    ticks = itertools.count(1_800_000_000)  # every read a second later
    monkeypatch.setattr(core, "now", lambda: next(ticks))
    monkeypatch.setattr(store, "now", lambda: next(ticks))
    with open_engine(tmp_path) as engine:
        batch_file = engine.create_file(b"{}\n", "in.jsonl", "batch")
        other = engine.create_file(b"{}", "x.json", "user_data", expires_after_seconds=3600)
    assert batch_file["expires_at"] - batch_file["created_at"] == 30 * 24 * 3600
    assert other["expires_at"] - other["created_at"] == 3600


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        pytest.param({"endpoint": "/v1/nope"}, 400, "endpoint", id="unknown-endpoint"),
        pytest.param({"endpoint": "/v1/videos"}, 422, "endpoint", id="unsupported-endpoint"),
        pytest.param({"completion_window": "1h"}, 400, "completion_window", id="window"),
        pytest.param(
            {"metadata": {str(i): "v" for i in range(17)}}, 400, "metadata", id="17-pairs"
        ),
        pytest.param({"metadata": {"k": 1}}, 400, "metadata", id="non-string-value"),
        pytest.param({"metadata": {"k" * 65: "v"}}, 400, "metadata", id="long-key"),
        pytest.param({"input_file_id": "file-unknown"}, 404, "id", id="unknown-file"),
        pytest.param(
            {"output_expires_after": {"anchor": "created_at", "seconds": 5}},
            400,
            "output_expires_after",
            id="expiry-too-short",
        ),
    ],
)
def test_create_batch_refuses_bad_requests(tmp_path, kwargs, status, param):
    """Bad create requests are refused with the right status and param, storing nothing."""
    with open_engine(tmp_path) as engine:
        file = engine.create_file(jsonl_bytes(request_lines(1)), "in.jsonl", "batch")
        args = {"input_file_id": file["id"], "endpoint": CHAT, "completion_window": "24h"}
        with pytest.raises(EngineError) as err:
            engine.create_batch(**{**args, **kwargs})
        assert (err.value.status, err.value.param) == (status, param)
        assert engine.list_batches()["data"] == []


def test_batch_input_must_have_purpose_batch(tmp_path):
    """A file uploaded for another purpose cannot be a batch input (400)."""
    with open_engine(tmp_path) as engine:
        file = engine.create_file(jsonl_bytes(request_lines(1)), "in.jsonl", "user_data")
        with pytest.raises(EngineError) as err:
            engine.create_batch(file["id"], CHAT)
        assert err.value.status == 400 and err.value.param == "input_file_id"


def test_repeated_create_is_idempotent_only_within_the_window(tmp_path):
    """Same create within the window → same batch; after it (and terminal) → a new batch."""
    with open_engine(tmp_path, idempotency_window=0.0) as engine:
        first = new_batch(engine, request_lines(1), run="a")
        file_id = first["input_file_id"]
        assert engine.create_batch(file_id, CHAT, "24h", {"run": "a"})["id"] == first["id"]
        run_to_end(engine, first["id"])
        time.sleep(1.05)  # created_at has one-second resolution
        again = engine.create_batch(file_id, CHAT, "24h", {"run": "a"})
        assert again["id"] != first["id"]


def test_list_cursor_must_name_a_known_object(tmp_path):
    """An unknown `after` cursor is a 400, limits outside 1..100 too."""
    with open_engine(tmp_path) as engine:
        with pytest.raises(EngineError) as err:
            engine.list_batches(after="batch_nope")
        assert err.value.status == 400 and err.value.param == "after"
        with pytest.raises(EngineError):
            engine.list_batches(limit=0)
        with pytest.raises(EngineError):
            engine.list_files(order="sideways")


def test_request_counts_grow_while_the_batch_runs(tmp_path):
    """request_counts are updated during the run, not only at the end."""
    with open_engine(tmp_path, BuiltinUpstream(latency=0.03), concurrency=2) as engine:
        batch = new_batch(engine, request_lines(20))
        seen = set()

        def partly_done() -> bool:
            b = engine.get_batch(batch["id"])
            seen.add(b["request_counts"]["completed"])
            return b["status"] == "in_progress" and 0 < b["request_counts"]["completed"] < 20

        wait_for(partly_done)
        done = run_to_end(engine, batch["id"])
    assert done["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    assert len(seen) >= 2


def test_output_lines_are_in_input_order_with_stable_ids(tmp_path):
    """Output lines follow input order; their batch_req ids are stable per batch and line."""
    lines = request_lines(15)
    with open_engine(tmp_path, concurrency=4) as engine:
        done = run_to_end(engine, new_batch(engine, lines)["id"])
        output = read_jsonl(engine.file_content_path(done["output_file_id"]).read_text())
    assert [r["custom_id"] for r in output] == [line["custom_id"] for line in lines]
    from batchspec.engine.worker import request_record_id

    assert [r["id"] for r in output] == [request_record_id(done["id"], i + 1) for i in range(15)]


def test_closing_mid_batch_and_reopening_resumes_without_resending(tmp_path):
    """close() drains and commits; a new engine on the same folder sends only the rest."""
    first_upstream = FaultyUpstream(BuiltinUpstream(latency=0.03), Faults())
    engine = open_engine(tmp_path, first_upstream, concurrency=2).start()
    batch = new_batch(engine, request_lines(24))
    wait_for(lambda: engine.get_batch(batch["id"])["request_counts"]["completed"] >= 4)
    engine.close()
    stopped = Store(tmp_path)
    try:
        row = stopped.get_batch(batch["id"])
        assert row["status"] == "in_progress"
        finished = stopped.finished_lines(batch["id"])
    finally:
        stopped.close()
    assert len(finished) == row["completed"] == sum(first_upstream.calls.values())

    second_upstream = FaultyUpstream(BuiltinUpstream(), Faults())
    with open_engine(tmp_path, second_upstream) as engine:
        done = run_to_end(engine, batch["id"])
    assert done["request_counts"]["completed"] == 24
    assert set(first_upstream.calls).isdisjoint(second_upstream.calls)
    assert sum(second_upstream.calls.values()) == 24 - len(finished)


def test_a_close_told_not_to_wait_stops_its_requests_at_once(tmp_path):
    """The worker counts the requests at the upstream (what serve's Ctrl-C says it waits
    for); close(wait_for_requests=False), a second Ctrl-C, stops them at once instead of
    for up to the drain timeout: they are not recorded as finished, and the batch resumes."""
    engine = open_engine(tmp_path, BuiltinUpstream(latency=30), concurrency=2).start()
    batch = new_batch(engine, request_lines(3))
    wait_for(lambda: engine.worker.requests_in_flight == 2)
    started = time.monotonic()
    engine.close(wait_for_requests=False)
    assert time.monotonic() - started < 2  # drain_timeout is 5 s, each request 30 s
    assert engine.worker.requests_in_flight == 0
    stopped = Store(tmp_path)
    try:
        assert stopped.get_batch(batch["id"])["status"] == "in_progress"
        assert not stopped.finished_lines(batch["id"])
    finally:
        stopped.close()


@pytest.mark.parametrize("where", ["the wait", "the wait, then the hurry", "the store's close"])
def test_a_ctrl_c_anywhere_in_a_close_stops_the_wait_and_the_close_runs_whole(
    tmp_path, monkeypatch, where
):
    """Ctrl-C (KeyboardInterrupt) while a close waits for its requests, again while it stops
    that wait, or while it closes its store: the close still stops the worker, closes the
    store and frees the folder, then the first interruption goes on. Raised out of the
    middle, it left the worker running (its answers uncommitted) or the folder locked."""
    from batchspec.engine.worker import Worker

    engine = open_engine(
        tmp_path, BuiltinUpstream(latency=30), concurrency=2, drain_timeout=0.5
    ).start()
    new_batch(engine, request_lines(3))
    wait_for(lambda: engine.worker.requests_in_flight == 2)
    first = KeyboardInterrupt("first")
    pending = {"stop": [first]}
    if where == "the wait, then the hurry":
        pending["hurry"] = [KeyboardInterrupt("second")]
    if where == "the store's close":
        pending = {"store": [first]}

    def once(name, real):
        def call(*args, **kwargs):
            if pending.get(name):
                raise pending[name].pop()
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(Worker, "stop", once("stop", Worker.stop))
    monkeypatch.setattr(Worker, "hurry", once("hurry", Worker.hurry))
    monkeypatch.setattr(Store, "close", once("store", Store.close))
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as caught:
        engine.close()
    assert caught.value is first
    if where != "the store's close":  # its requests take 30 s, its drain timeout 0.5 s
        assert time.monotonic() - started < 0.4  # interrupted in the wait: not waited for
    assert not engine.worker._thread  # stopped
    open_engine(tmp_path).close()  # the folder is free again


def test_a_second_engine_on_the_same_folder_is_refused(tmp_path):
    """One engine per data folder: a second one raises StateLockedError naming the folder."""
    with open_engine(tmp_path):
        with pytest.raises(StateLockedError) as err:
            open_engine(tmp_path)
        assert str(tmp_path) in str(err.value)
    open_engine(tmp_path).close()  # free again once the first is closed


def test_cancel_is_refused_on_a_finished_batch_and_repeatable_on_a_cancelled_one(tmp_path):
    """Cancel: 409 on completed; repeating it on a cancelled batch returns it unchanged."""
    with open_engine(tmp_path, BuiltinUpstream(latency=0.05), concurrency=1) as engine:
        finished = run_to_end(engine, new_batch(engine, request_lines(1), n="1")["id"])
        with pytest.raises(EngineError) as err:
            engine.cancel_batch(finished["id"])
        assert err.value.status == 409
        running = new_batch(engine, request_lines(10), n="2")
        assert engine.cancel_batch(running["id"])["status"] == "cancelling"
        done = run_to_end(engine, running["id"])
        assert done["status"] == "cancelled"
        assert engine.cancel_batch(running["id"])["status"] == "cancelled"
        with pytest.raises(EngineError) as missing:
            engine.cancel_batch("batch_missing")
        assert missing.value.status == 404


def test_a_cancel_answers_cancelling_even_when_the_worker_ends_the_batch_at_once(
    tmp_path, monkeypatch
):
    """The cancel's answer is the row as the cancel left it. A worker that finishes the
    cancelled batch right after the move (as a loaded CI machine showed) cannot turn the
    answer into ``cancelled``: a client would take that for the end and read its files early."""
    with open_engine(tmp_path, BuiltinUpstream(latency=0.05), concurrency=1) as engine:
        running = new_batch(engine, request_lines(10))
        plain_read = engine.store.get_batch
        this_thread = threading.get_ident()

        def read_after_the_worker(batch_id, db=None):
            row = plain_read(batch_id, db)
            mine = threading.get_ident() == this_thread
            if mine and db is None and row is not None and row["status"] == "cancelling":
                engine.worker.wake()  # let the worker end it before this read returns
                wait_for(lambda: plain_read(batch_id)["status"] == "cancelled")
                row = plain_read(batch_id)
            return row

        monkeypatch.setattr(engine.store, "get_batch", read_after_the_worker)
        assert engine.cancel_batch(running["id"])["status"] == "cancelling"
        monkeypatch.undo()
        assert run_to_end(engine, running["id"])["status"] == "cancelled"


def test_a_slow_cancel_stays_cancelling_and_keeps_finishing_lines(tmp_path):
    """cancel_delay: a cancelled batch stays cancelling that long, its lines still running
    (its completed count grows), then ends cancelled with those answers in its output file
    and the lines never run as batch_cancelled errors."""
    upstream = BuiltinUpstream(latency=0.05)
    with open_engine(tmp_path, upstream, concurrency=1, cancel_delay=1.0) as engine:
        running = new_batch(engine, request_lines(60))
        wait_for(lambda: engine.get_batch(running["id"])["request_counts"]["completed"] >= 1)
        at_cancel = engine.cancel_batch(running["id"])
        assert at_cancel["status"] == "cancelling"
        time.sleep(0.5)
        later = engine.get_batch(running["id"])
        assert later["status"] == "cancelling"
        assert later["request_counts"]["completed"] > at_cancel["request_counts"]["completed"]
        done = run_to_end(engine, running["id"])
        assert done["status"] == "cancelled"
        answered = read_jsonl(engine.file_content_path(done["output_file_id"]).read_text())
        errors = read_jsonl(engine.file_content_path(done["error_file_id"]).read_text())
        assert len(answered) == done["request_counts"]["completed"] > 1
        assert len(answered) + len(errors) == 60
        assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}


class FirstLineUnreachable(BuiltinUpstream):
    """The built-in model, slowed down, except that ``req-0`` fails at once (unreachable)."""

    async def send(self, url, body, *, custom_id, attempt):
        if custom_id == "req-0":
            raise UpstreamUnreachable("connection refused")
        return await super().send(url, body, custom_id=custom_id, attempt=attempt)


@pytest.mark.parametrize("ending", ["cancelled", "expired"])
def test_a_batch_stopped_with_a_failed_line_ends_with_both_kinds_of_error(tmp_path, ending):
    """A batch cancelled (or expired) after one of its lines failed ends, and its error file
    holds that failure and the lines never run, in input order. The stored failures and the
    unfinished lines are merged by line number: rows of both kinds must compare (a cancelled
    batch stayed ``cancelling`` forever, its finalize failing at every poll)."""
    window = {"completion_window_seconds": 0.5} if ending == "expired" else {}
    upstream = FirstLineUnreachable(latency=0.05)
    with open_engine(tmp_path, upstream, concurrency=1, max_attempts=1, **window) as engine:
        running = new_batch(engine, request_lines(30))
        wait_for(lambda: engine.get_batch(running["id"])["request_counts"]["failed"] >= 1)
        if ending == "cancelled":
            engine.cancel_batch(running["id"])
        done = run_to_end(engine, running["id"], timeout=3.0)
        assert done["status"] == ending
        errors = read_jsonl(engine.file_content_path(done["error_file_id"]).read_text())
    ids = [e["custom_id"] for e in errors]
    assert ids[0] == "req-0" and errors[0]["error"]["code"] == "upstream_unreachable"
    assert ids == sorted(ids, key=lambda cid: int(cid.split("-")[1]))
    assert {e["error"]["code"] for e in errors[1:]} == {f"batch_{ending}"}


class HeldUpstream(BuiltinUpstream):
    """The built-in model, holding every request until ``answer`` is set (``received``
    counts the requests it got), as a model server that is still working on them."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = threading.Event()
        self.received: Counter[str] = Counter()

    async def send(self, url, body, *, custom_id, attempt):
        self.received[custom_id] += 1
        while not self.answer.is_set():
            await asyncio.sleep(0.005)
        return await super().send(url, body, custom_id=custom_id, attempt=attempt)


def test_a_cancel_keeps_the_answers_of_requests_already_sent(tmp_path):
    """A request the upstream has received when its batch is cancelled is paid for: the
    batch waits for its answer and keeps it (output file), and sends nothing more; only the
    lines never sent end ``batch_cancelled``. Aborting them threw away answers being paid
    for, and a replacement sent those requests a second time."""
    upstream = HeldUpstream()
    with open_engine(tmp_path, upstream, concurrency=2) as engine:
        running = new_batch(engine, request_lines(5))
        wait_for(lambda: sum(upstream.received.values()) == 2)
        assert engine.cancel_batch(running["id"])["status"] == "cancelling"
        time.sleep(0.05)  # the worker sees the cancel while both requests are held
        upstream.answer.set()
        done = run_to_end(engine, running["id"], timeout=3.0)
        answered = read_jsonl(engine.file_content_path(done["output_file_id"]).read_text())
        errors = read_jsonl(engine.file_content_path(done["error_file_id"]).read_text())
    assert done["status"] == "cancelled"
    assert [a["custom_id"] for a in answered] == ["req-0", "req-1"]
    assert [e["custom_id"] for e in errors] == ["req-2", "req-3", "req-4"]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert upstream.received == {"req-0": 1, "req-1": 1}


@pytest.mark.parametrize("ending", ["cancelled", "expired"])
def test_a_batch_ending_while_its_answers_wait_for_a_commit_keeps_them(tmp_path, ending):
    """A batch cancelled (or expired) whose last answers cannot be committed yet (a full
    disk) ends once they are: it finalized at once, writing those lines as never run
    (`batch_cancelled`), so answers the upstream gave, and billed, were lost and sent again."""
    upstream = HeldUpstream()
    window = {"completion_window_seconds": 0.3} if ending == "expired" else {}
    engine = open_engine(tmp_path, upstream, concurrency=2, **window)
    record = engine.store.record_results
    refusals = {"left": 0}

    def full_disk(rows):
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return record(rows)

    engine.store.record_results = full_disk  # type: ignore[method-assign]
    with engine.start():
        running = new_batch(engine, request_lines(5))
        wait_for(lambda: sum(upstream.received.values()) == 2)
        refusals["left"] = 5
        if ending == "cancelled":
            engine.cancel_batch(running["id"])
        else:
            time.sleep(0.35)  # the window passes while both requests are held
        time.sleep(0.05)  # the worker sees the cancel (or the deadline) first
        upstream.answer.set()
        done = run_to_end(engine, running["id"], timeout=3.0)
        answered = read_jsonl(engine.file_content_path(done["output_file_id"]).read_text())
        errors = read_jsonl(engine.file_content_path(done["error_file_id"]).read_text())
    assert refusals["left"] == 0
    assert done["status"] == ending
    assert [a["custom_id"] for a in answered] == ["req-0", "req-1"]
    assert [e["custom_id"] for e in errors] == ["req-2", "req-3", "req-4"]
    assert upstream.received == {"req-0": 1, "req-1": 1}


def test_a_batch_expiring_before_validation_ends_expired_without_files(tmp_path):
    """A batch whose window passed before it ever ran is expired with no output or errors."""
    engine = open_engine(tmp_path, completion_window_seconds=0.0)
    batch = new_batch(engine, request_lines(3))  # the worker is not started yet
    engine.start()
    try:
        done = run_to_end(engine, batch["id"])
    finally:
        engine.close()
    assert done["status"] == "expired"
    assert done["output_file_id"] is None and done["error_file_id"] is None


def test_unreachable_upstream_becomes_error_lines(tmp_path):
    """A refused connection is retried, then recorded as error code upstream_unreachable."""
    import socket

    from batchspec.engine import HttpUpstream

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    upstream = HttpUpstream(f"http://127.0.0.1:{port}/v1")
    with open_engine(tmp_path, upstream, max_attempts=2) as engine:
        done = run_to_end(engine, new_batch(engine, request_lines(2))["id"])
        errors = read_jsonl(engine.file_content_path(done["error_file_id"]).read_text())
    assert done["status"] == "completed" and done["output_file_id"] is None
    assert {r["error"]["code"] for r in errors} == {"upstream_unreachable"}


class CrashingUpstream(BuiltinUpstream):
    """The built-in model, except that one custom_id makes ``send`` raise (a bug, not an
    answer): the kind of failure no real server can produce."""

    def __init__(self, crash_on: str) -> None:
        super().__init__()
        self.crash_on = crash_on

    async def send(self, url, body, *, custom_id, attempt):
        if custom_id == self.crash_on:
            raise KeyError("choices")
        return await super().send(url, body, custom_id=custom_id, attempt=attempt)


def test_an_unexpected_exception_fails_its_line_and_the_batch_completes(tmp_path, caplog):
    """A line whose processing raises (a bug) ends as one engine_error record naming the
    exception type, without a traceback; it is logged once and the other lines complete."""
    lines = request_lines(3)
    crash_on = lines[1]["custom_id"]
    with (
        caplog.at_level("ERROR", logger="batchspec.engine"),
        open_engine(tmp_path, CrashingUpstream(crash_on)) as engine,
    ):
        done = run_to_end(engine, new_batch(engine, lines)["id"])
        output = read_jsonl(engine.file_content_path(done["output_file_id"]).read_text())
        error_text = engine.file_content_path(done["error_file_id"]).read_text()
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert [r["custom_id"] for r in output] == [lines[0]["custom_id"], lines[2]["custom_id"]]
    [failed] = read_jsonl(error_text)
    assert failed["custom_id"] == crash_on and failed["response"] is None
    assert failed["error"]["code"] == "engine_error"
    assert "KeyError" in failed["error"]["message"] and "Traceback" not in error_text
    logged = [r for r in caplog.records if crash_on in r.getMessage()]
    assert len(logged) == 1 and "KeyError" in logged[0].getMessage()


def test_results_are_persisted_with_counts_in_one_transaction(tmp_path):
    """Recording the same line twice counts it once (a resumed line can never double-count)."""
    from batchspec.engine.store import LineResult, Tokens

    with open_engine(tmp_path) as engine:
        batch = new_batch(engine, request_lines(1))
        run_to_end(engine, batch["id"])
        store = engine.store
        before = store.get_batch(batch["id"])["completed"]
        again = LineResult(batch["id"], 1, "req-0", True, b"{}", Tokens(input_tokens=5))
        assert store.record_results([again]) == 0
        assert store.get_batch(batch["id"])["completed"] == before


def test_database_uses_wal_and_named_migrations(tmp_path):
    """The engine database is WAL with its migrations recorded by name."""
    open_engine(tmp_path).close()
    db = sqlite3.connect(tmp_path / "engine.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = [
            r[0]
            for r in db.execute(
                "SELECT name FROM _sqlite_migrations WHERE migration_set = 'engine'"
            )
        ]
    finally:
        db.close()
    assert names == ["m001_initial"]


def test_usage_is_summed_from_response_bodies(tmp_path):
    """Batch usage is the sum of the bodies' usage (prompt → input, completion → output)."""
    with open_engine(tmp_path) as engine:
        done = run_to_end(engine, new_batch(engine, request_lines(5))["id"])
        output = read_jsonl(engine.file_content_path(done["output_file_id"]).read_text())
    prompt = sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in output)
    completion = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in output)
    assert done["usage"]["input_tokens"] == prompt
    assert done["usage"]["output_tokens"] == completion
    assert done["usage"]["total_tokens"] == prompt + completion


def test_invalid_input_errors_carry_code_message_line_and_param(tmp_path):
    """errors.data entries have code, message, line and a null param (OpenAI's shape)."""
    lines = [json.dumps(line) for line in request_lines(2)] + ['{"custom_id": 3}']
    with open_engine(tmp_path) as engine:
        file = engine.create_file("\n".join(lines).encode(), "in.jsonl", "batch")
        done = run_to_end(engine, engine.create_batch(file["id"], CHAT)["id"])
    assert done["status"] == "failed"
    assert done["errors"]["object"] == "list"
    entry = done["errors"]["data"][0]
    assert set(entry) == {"code", "message", "line", "param"}
    assert entry["line"] == 3 and entry["param"] is None and entry["message"]


def test_a_data_folder_laid_out_by_earlier_releases_is_read_as_it_is(tmp_path):
    """Blobs at files/<sha[:2]>/<sha> (the layout every release wrote) stay readable; tmp/
    leftovers of a crashed write are dropped at open."""
    import hashlib

    Engine(tmp_path, BuiltinUpstream()).close()  # the schema only
    content = jsonl_bytes(request_lines(2))
    sha = hashlib.sha256(content).hexdigest()
    (tmp_path / "files" / sha[:2]).mkdir(parents=True)
    (tmp_path / "files" / sha[:2] / sha).write_bytes(content)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "tmp" / "part-leftover").write_bytes(b"half")
    with sqlite3.connect(tmp_path / "engine.db") as db:
        db.execute(
            "INSERT INTO files (id, sha256, bytes, filename, purpose, created_at)"
            " VALUES ('file-old', ?, ?, 'old.jsonl', 'batch', 0)",
            (sha, len(content)),
        )
    with open_engine(tmp_path) as engine:
        assert engine.file_content_path("file-old").read_bytes() == content
        assert not (tmp_path / "tmp" / "part-leftover").exists()
        batch = run_to_end(engine, engine.create_batch("file-old", CHAT, "24h")["id"])
        assert batch["request_counts"]["completed"] == 2
        output = engine.file_content_path(batch["output_file_id"])
    assert output.parent.parent == tmp_path / "files"
    assert output.name == hashlib.sha256(output.read_bytes()).hexdigest()
    assert output.parent.name == output.name[:2]


@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask-000", "umask-022"])
def test_the_data_folder_database_and_blobs_are_private_whatever_the_umask(tmp_path, umask):
    """A new engine data folder is 0700 (and its subfolders), engine.db and every blob 0600:
    they hold full requests and answers."""
    import os
    import stat

    data = tmp_path / "engine-data"
    old = os.umask(umask)
    try:
        with open_engine(data) as engine:
            batch = run_to_end(engine, new_batch(engine, request_lines(2))["id"])
            assert batch["status"] == "completed"
    finally:
        os.umask(old)
    mode = {p: stat.S_IMODE(p.stat().st_mode) for p in [data, *data.rglob("*")]}
    folders = {p.relative_to(tmp_path).as_posix(): m for p, m in mode.items() if p.is_dir()}
    files = {p.relative_to(tmp_path).as_posix(): m for p, m in mode.items() if p.is_file()}
    assert set(folders.values()) == {0o700}, folders
    assert set(files.values()) == {0o600}, files
    assert "engine-data/engine.db" in files
    assert sum("/files/" in name for name in files) >= 2  # input and output blobs


def test_a_commit_that_fails_for_a_while_sends_no_line_twice(tmp_path, caplog):
    """While the engine's database refuses its commits (a full disk), a finished line waits in
    memory and is not sent to the upstream again: the batch completes once commits succeed,
    each line called once (the driver used to run every uncommitted line again at each poll)."""
    upstream = BuiltinUpstream()
    engine = open_engine(tmp_path, upstream)
    store = engine.store
    record = store.record_results
    refusals = {"left": 15}

    def full_disk(rows):
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return record(rows)

    store.record_results = full_disk  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="batchspec.engine"), engine.start():
        done = run_to_end(engine, new_batch(engine, request_lines(6))["id"])
    assert refusals["left"] == 0
    assert done["status"] == "completed"
    assert done["request_counts"]["completed"] == 6
    assert sorted(upstream.calls.values()) == [1] * 6
    failures = [r for r in caplog.records if "could not commit" in r.getMessage()]
    assert len(failures) == 1  # said once, not at every try (a log on that disk fills it)
    # one line naming the cause, no traceback: a full disk is the operator's, not a bug
    assert "(disk I/O error)" in failures[0].getMessage()
    assert failures[0].exc_info is None


def test_a_result_file_that_cannot_be_written_is_one_log_line_and_retried(tmp_path, caplog):
    """A batch whose output file cannot be written (ENOSPC while it finalizes, three polls
    running) logs one line naming the cause, without a traceback, not one a poll (a log on
    that disk fills it), and completes once the disk has room, which is said too."""
    import batchspec.engine.worker as worker

    engine = open_engine(tmp_path, BuiltinUpstream())
    write = worker._write_result_file
    refusals = {"left": 3}

    def full_disk(*args, **kwargs):
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise OSError(28, "No space left on device")
        return write(*args, **kwargs)

    worker._write_result_file = full_disk
    try:
        with caplog.at_level("WARNING", logger="batchspec.engine"), engine.start():
            done = run_to_end(engine, new_batch(engine, request_lines(2))["id"])
    finally:
        worker._write_result_file = write
    assert done["status"] == "completed"
    failed = [r for r in caplog.records if "step failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is None
    assert "(No space left on device)" in failed[0].getMessage()
    assert any("step done after failed tries" in r.getMessage() for r in caplog.records)
