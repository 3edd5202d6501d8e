"""Attacks on issue 13's "a pass that scales", from the outside (each test says which promise).

Against the engine's API on loopback behind a ``RequestProbe`` (tests/probes.py), which
records when each request was answered, so the tests assert on what the server saw.
"""

from __future__ import annotations

import contextvars
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from probes import start_probed_server
from servers import wait_for
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, make_workspace, openai_provider, run_cli

from batchspec.core.reconcile.prefetch import BoundedCalls
from batchspec.core.reconcile.reconciler import Reconciler
from batchspec.engine.upstreams import BuiltinUpstream, Faults, FaultyUpstream
from batchspec.providers.base import call_place
from batchspec.state.store import StateStore

DOWNLOAD = "GET /files/{id}/content"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def overlapping_routes(
    spans: list[tuple[str, float, float]], more_than: float = 0.005
) -> list[tuple[str, str]]:
    """The pairs of routes whose requests the server answered at the same time for more than
    ``more_than`` seconds (a request sent the moment the client has read the last answer
    can arrive a few microseconds before the server has finished with that one)."""
    spans = sorted(spans, key=lambda span: span[1])
    return sorted(
        {
            (a[0], b[0])
            for i, a in enumerate(spans)
            for b in spans[i + 1 :]
            if b[1] < a[2] - more_than
        }
    )


def test_max_concurrency_caps_the_serial_steps_calls_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """maxConcurrency 1: the server never answers two requests at once, though a pass's
    downloads (in the pool) run while a serial step uploads, creates and looks up the
    retries of the resources collected before them."""
    upstream = FaultyUpstream(BuiltinUpstream(), Faults(error_500=0.5, seed=3))
    srv = start_probed_server(tmp_path / "engine", upstream=upstream, max_attempts=1)
    try:
        srv.probe.hold(DOWNLOAD, 0.05)  # downloads last, so the pool still has some running
        ws = make_workspace(
            tmp_path / "ws",
            providers={"srv": openai_provider(srv.v1, KEY_ENV, maxConcurrency=1)},
            resources=[ResourceSpec(f"r{i:02d}", count=4, prefix=f"p{i}") for i in range(12)],
        )
        argv = ["apply", str(ws.root), "--yes", "--wait", "--poll-interval", "0.05"]
        code, _, err = run_cli([*argv, "--timeout", "90", "--parallelism", "8"], capsys)

        assert code in (0, 4), err  # 4: a line failed on every attempt, which is fine here
        assert srv.probe.counts["POST /batches"] > 12  # retries were created
        assert overlapping_routes(srv.probe.spans) == []
    finally:
        srv.stop()


def list_without_file_ids(srv: Any) -> None:
    """Once every batch on ``srv`` has completed, its list endpoint answers with them but
    without their output and error file ids (a gateway's trimmed list objects)."""
    wait_for(
        lambda: all(b["status"] == "completed" for b in srv.engine.list_batches(None, 100)["data"])
    )
    page = srv.engine.list_batches(None, 100)
    for batch in page["data"]:
        batch.update(output_file_id=None, error_file_id=None)
    srv.probe.refuse(r"^GET /v1/batches$", 200, page)


def test_a_listing_that_leaves_out_the_files_of_ended_batches_makes_no_retry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A list endpoint that shows ended batches without their output and error file ids
    (a gateway's trimmed list objects): the pass retrieves those batches by id and collects
    their answers; it does not take them as answerless and pay for the requests again."""
    srv = start_probed_server(tmp_path / "engine", api_key=SENTINEL_KEY)
    try:
        ws = make_workspace(
            tmp_path / "ws",
            providers={"srv": openai_provider(srv.v1, KEY_ENV)},
            resources=[ResourceSpec(f"r{i:02d}", count=2, prefix=f"p{i}") for i in range(4)],
        )
        assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
        list_without_file_ids(srv)

        code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

        assert code == 0, err
        assert srv.probe.counts["POST /batches"] == 4  # no retry was created
        assert srv.probe.counts["GET /batches/{id}"] == 4  # each ended batch retrieved
        assert all(len(ws.outputs(f"r{i:02d}")) == 2 for i in range(4))
    finally:
        srv.stop()


def test_a_lost_state_adopts_from_a_trimmed_listing_without_paying_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The state lost, the ended batches are found by key on a listing that leaves out their
    file ids: they are adopted, read back by id and collected; nothing is created again."""
    srv = start_probed_server(tmp_path / "engine", api_key=SENTINEL_KEY)
    try:
        ws = make_workspace(
            tmp_path / "ws",
            providers={"srv": openai_provider(srv.v1, KEY_ENV)},
            resources=[ResourceSpec(f"r{i:02d}", count=2, prefix=f"p{i}") for i in range(3)],
        )
        assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
        list_without_file_ids(srv)
        for path in ws.state_path.parent.iterdir():  # the state is lost
            if path.is_file():
                path.unlink()

        argv = ["apply", str(ws.root), "--yes", "--wait", "--poll-interval", "0.05"]
        code, _, err = run_cli([*argv, "--timeout", "60"], capsys)

        assert code == 0, err
        assert srv.probe.counts["POST /batches"] == 3  # adopted, none created again
        assert all(len(ws.outputs(f"r{i:02d}")) == 2 for i in range(3))
    finally:
        srv.stop()


def test_a_provider_at_its_cap_does_not_hold_up_the_calls_to_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Provider a (maxConcurrency 1, slow downloads) comes first in resource order: the pool's
    workers do not all sit waiting for a's one place while provider b's downloads, which
    nothing limits, queue behind them; b's files are fetched while a's still trickle in."""
    slow = start_probed_server(tmp_path / "slow", api_key=SENTINEL_KEY)
    fast = start_probed_server(tmp_path / "fast", api_key=SENTINEL_KEY)
    try:
        ws = make_workspace(
            tmp_path / "ws",
            providers={
                "a": openai_provider(slow.v1, KEY_ENV, maxConcurrency=1),
                "b": openai_provider(fast.v1, KEY_ENV),
            },
            resources=[
                *(ResourceSpec(f"a{i}", provider="a", prefix=f"a{i}") for i in range(6)),
                *(ResourceSpec(f"b{i}", provider="b", prefix=f"b{i}") for i in range(6)),
            ],
        )
        assert run_cli(["apply", str(ws.root), "--yes", "--parallelism", "4"], capsys)[0] == 0
        for srv in (slow, fast):
            wait_for(
                lambda srv=srv: all(
                    b["status"] == "completed" for b in srv.engine.list_batches(None, 100)["data"]
                )
            )
        slow.probe.hold(DOWNLOAD, 0.3)
        slow.probe.spans.clear()
        fast.probe.spans.clear()

        code, _, err = run_cli(["apply", str(ws.root), "--yes", "--parallelism", "4"], capsys)

        assert code == 0, err
        a_downloads = sorted(end for route, _, end in slow.probe.spans if route == DOWNLOAD)
        b_downloads = sorted(end for route, _, end in fast.probe.spans if route == DOWNLOAD)
        assert len(a_downloads) == 6 and len(b_downloads) == 6
        # b's files all arrived before a's second file: they did not wait for a's queue
        assert b_downloads[-1] < a_downloads[1]
    finally:
        slow.stop()
        fast.stop()


def test_workers_take_the_calls_of_a_provider_with_a_free_place() -> None:
    """``BoundedCalls`` of 2 workers, provider a capped at 1 with its call stuck: a's next
    call waits without taking a worker, and b's calls, submitted after it, all run."""
    stuck = threading.Event()
    with BoundedCalls(2, lambda provider: 1 if provider == "a" else None) as calls:
        try:
            calls.submit("a", stuck.wait)
            second = calls.submit("a", lambda: "a2")
            others = [calls.submit("b", lambda i=i: i) for i in range(5)]
            assert [f.result(timeout=5) for f in others] == list(range(5))
            assert not second.done()
        finally:
            stuck.set()
        assert second.result(timeout=5) == "a2"


def test_a_request_that_may_not_wait_for_a_place_is_sent_at_once() -> None:
    """The main thread's gate (``admitting``): with provider a's only place taken, a request
    that may wait waits for it; one that may not (its thread holds the state's writer lock)
    goes at once rather than hold that lock through the other call."""
    stuck, released = threading.Event(), threading.Event()
    waits = [True]
    with BoundedCalls(2, lambda provider: 1) as calls, calls.admitting(lambda: waits[0]):
        try:
            calls.submit("a", stuck.wait)
            wait_for(lambda: calls.limit_for("a").active == 1)
            waits[0] = False
            with call_place("a"):
                assert calls.limit_for("a").active == 1  # sent beside the stuck call
            waits[0] = True

            def waiting() -> None:
                with call_place("a"):
                    released.set()

            gated = contextvars.copy_context()  # the gate is this thread's: take it along
            threading.Thread(target=gated.run, args=(waiting,), daemon=True).start()
            assert not released.wait(0.3)
        finally:
            stuck.set()
        assert released.wait(5)


def test_the_main_thread_waits_for_a_place_only_outside_a_steps_transaction(
    tmp_path: Path,
) -> None:
    """``Reconciler._may_wait_for_a_place``: outside any transaction it may wait; inside a
    commit group's own transaction it commits the group first, then may; inside a step's
    ``atomic`` (the writer lock held for a write that must stay whole) it may not."""
    with StateStore.open(tmp_path / "state.db") as store:
        ctx = SimpleNamespace(store=store, before_wait=lambda: None)
        reconciler = SimpleNamespace(ctx=ctx)
        may_wait = Reconciler._may_wait_for_a_place
        assert may_wait(reconciler) is True  # type: ignore[arg-type]
        with store.commit_group() as group:
            ctx.before_wait = group.flush
            group.join()
            assert store.in_transaction
            assert may_wait(reconciler) is True  # type: ignore[arg-type]
            assert not store.in_transaction and group.commits == 1
            with store.atomic():
                assert may_wait(reconciler) is False  # type: ignore[arg-type]
                assert store.in_transaction
            group.join()
            with store.atomic():  # nested in the group's transaction: a savepoint
                assert may_wait(reconciler) is False  # type: ignore[arg-type]
                assert store.in_transaction


RATE_LIMITED = {
    "error": {
        "message": "Rate limit reached for requests",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}


@pytest.mark.parametrize("parallelism", ["1", "8"])
def test_creates_refused_with_429_are_sent_again_by_the_next_apply_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parallelism: str
) -> None:
    """Every create answered 429 (retries spent): the apply fails; the creates were refused,
    not lost in transit, so the next apply creates them at once (one batch per resource),
    instead of waiting out createConfirmSeconds as if they might still arrive."""
    srv = start_probed_server(tmp_path / "engine", api_key=SENTINEL_KEY)
    try:
        ws = make_workspace(
            tmp_path / "ws",
            providers={
                "srv": openai_provider(srv.v1, KEY_ENV, maxRetries=0, createConfirmSeconds=300)
            },
            resources=[ResourceSpec(f"r{i:02d}", count=2, prefix=f"p{i}") for i in range(6)],
        )
        srv.probe.refuse(r"^POST /v1/batches$", 429, RATE_LIMITED)
        argv = ["apply", str(ws.root), "--yes", "--parallelism", parallelism]
        code, _, err = run_cli(argv, capsys)
        assert code == 1 and "429" in err
        assert srv.batch_count() == 0
        srv.probe.refusals.clear()

        wait = ["--wait", "--poll-interval", "0.05", "--timeout", "20"]
        code, _, err = run_cli([*argv, *wait], capsys)

        assert code == 0, err
        assert srv.batch_count() == 6
        assert all(len(ws.outputs(f"r{i:02d}")) == 2 for i in range(6))
    finally:
        srv.stop()
