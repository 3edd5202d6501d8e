"""A pass's provider reads: list-based polling and bounded parallel calls (issue 13).

Against the engine's OpenAI API on loopback behind a ``RequestProbe`` (tests/probes.py) that
counts every request by route and records how many it answered at once. Batches are kept in
flight by an upstream that answers nothing until the test opens its gate.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from probes import ProbedServer, start_probed_server
from servers import wait_for
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    json_lines,
    make_workspace,
    openai_provider,
    run_cli,
)

from batchspec.core.reconcile import prefetch
from batchspec.engine.upstreams import BuiltinUpstream, UpstreamResponse
from batchspec.state.ledger import RequestLedger

LIST = "GET /batches"
RETRIEVE = "GET /batches/{id}"
DOWNLOAD = "GET /files/{id}/content"


class GatedUpstream:
    """The built-in stand-in model, answering only once ``gate`` is set."""

    description = "gated builtin"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.inner = BuiltinUpstream()

    async def send(self, url: str, body: Any, *, custom_id: str, attempt: int) -> UpstreamResponse:
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        return await self.inner.send(url, body, custom_id=custom_id, attempt=attempt)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


@pytest.fixture
def gated(tmp_path: Path) -> Any:
    started: list[ProbedServer] = []
    upstreams: list[GatedUpstream] = []

    def start(name: str = "engine") -> tuple[ProbedServer, GatedUpstream]:
        upstream = GatedUpstream()
        srv = start_probed_server(tmp_path / name, upstream=upstream, api_key=SENTINEL_KEY)
        started.append(srv)
        upstreams.append(upstream)
        return srv, upstream

    yield start
    for upstream in upstreams:
        upstream.gate.set()
    for srv in started:
        srv.stop()


def fleet(root: Path, srv: ProbedServer, n: int, **options: Any) -> Workspace:
    """``n`` one-request resources r00, r01, ... on provider ``srv``."""
    return make_workspace(
        root,
        providers={"srv": openai_provider(srv.v1, KEY_ENV, **options)},
        resources=[ResourceSpec(f"r{i:02d}", count=1) for i in range(n)],
    )


def wait_all_terminal(srv: ProbedServer, n: int) -> None:
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = srv.engine.list_batches(None, 100)["data"]
        if len(rows) >= n and all(r["status"] == "completed" for r in rows):
            return
        time.sleep(0.02)
    raise AssertionError(f"the engine did not finish its batches: {[r['status'] for r in rows]}")


def finish_behind_a_stale_listing(srv: ProbedServer, upstream: GatedUpstream, n: int) -> None:
    """Freeze the listing as it is (every batch in progress), then let the ``n`` batches
    finish: a gateway whose listing is behind its batches."""
    stale = [
        {**row, "status": "in_progress", "output_file_id": None}
        for row in srv.engine.list_batches(None, 100)["data"]
    ]
    srv.probe.refuse(r"^GET /v1/batches$", 200, {"object": "list", "data": stale})
    upstream.gate.set()
    wait_all_terminal(srv, n)
    srv.probe.counts.clear()


def test_one_pass_polls_in_flight_batches_with_list_pages(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """N in-flight batches cost ceil(N/page) list calls per pass, read side by side (each
    page from the cursor of our batch that ends the page before it, all in flight at once,
    where they were one after the other: a fleet's poll waited ten round trips for its
    listing), one retrieve (the check that the listing is not behind) and no file."""
    monkeypatch.setattr(prefetch, "LIST_PAGE_SIZE", 5)  # 12 batches: three pages
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 12)
    newest_first = created_in_order(ws, srv, capsys)
    srv.probe.counts.clear()
    srv.probe.targets.clear()
    srv.probe.hold(LIST, 0.2)  # each page a slow round trip: they overlap, or take 0.6 s

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    assert srv.probe.counts[LIST] == 3
    assert set(list_cursors(srv)) == {None, newest_first[4], newest_first[9]}
    assert lists_at_once(srv) == 3
    assert srv.probe.counts[RETRIEVE] == 1
    assert srv.probe.counts[DOWNLOAD] == 0
    polled = [e["resource"] for e in json_lines(out) if e.get("event") == "poll"]
    assert polled == [f"r{i:02d}" for i in range(12)]  # every one, in resource order


def created_in_order(ws: Workspace, srv: ProbedServer, capsys: Any) -> list[str]:
    """Submit ``ws`` one batch at a time (the server lists them in our row order); the
    remote ids newest first."""
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--parallelism", "1"], capsys)
    assert code == 0, err
    return [row["id"] for row in srv.engine.list_batches(None, 100)["data"]]


def list_cursors(srv: ProbedServer) -> list[str | None]:
    """The ``after`` cursor of each list request the server saw (None: from the top)."""
    cursors: list[str | None] = []
    for target in srv.probe.targets:
        if target.startswith("GET /v1/batches?"):
            query = parse_qs(target.split("?", 1)[1])
            cursors.append(query["after"][0] if "after" in query else None)
    return cursors


def lists_at_once(srv: ProbedServer) -> int:
    """The most list requests (held 0.2 s each) that overlapped by more than 0.1 s."""
    held = [(start, end) for route, start, end in srv.probe.spans if route == LIST]
    return max(
        (sum(1 for s, e in held if min(end, e) - max(start, s) > 0.1) for start, end in held),
        default=0,
    )


def reorder_listing(srv: ProbedServer, newest_first: list[str]) -> None:
    """Make the server list its batches in the order ``newest_first`` (its ``seq``): a
    creation order other than ours, other clients' batches among ours."""
    db = srv.engine.store.db
    with db:
        top = db.execute("SELECT MAX(seq) FROM batches").fetchone()[0]
        for offset, batch_id in enumerate(newest_first):
            db.execute("UPDATE batches SET seq = ? WHERE id = ?", (top + 1000 - offset, batch_id))


def test_foreign_batches_and_a_creation_order_other_than_ours_lose_no_batch(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The segments of a listing start at our batches' ids, but the server may list other
    clients' batches among ours and ours a little out of our order (creates run side by
    side): every batch is still polled (read by id at worst), within a few more calls, and
    collected whole."""
    monkeypatch.setattr(prefetch, "LIST_PAGE_SIZE", 5)  # 12 batches: three segments
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 12)
    ours = created_in_order(ws, srv, capsys)
    input_file = srv.engine.get_batch(ours[0])["input_file_id"]
    foreign = [
        srv.engine.create_batch(input_file, "/v1/chat/completions", "24h", {"team": f"o{n}"})
        for n in range(8)
    ]
    foreign_ids = [batch["id"] for batch in foreign]
    shuffled = list(ours)
    # both segment ends listed in the next segment's part, and more moved within a part
    for i, j in ((4, 6), (9, 10), (0, 2), (3, 5)):
        shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
    listing = []
    for index, batch_id in enumerate(shuffled):
        listing.append(batch_id)
        if index % 2 == 1 and foreign_ids:
            listing.append(foreign_ids.pop())
    reorder_listing(srv, foreign_ids + listing)
    srv.probe.counts.clear()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    polled = [e["resource"] for e in json_lines(out) if e.get("event") == "poll"]
    assert polled == [f"r{i:02d}" for i in range(12)]
    assert srv.probe.counts[LIST] <= 6  # three segments, two pages each at most
    assert srv.probe.counts[LIST] + srv.probe.counts[RETRIEVE] <= 9
    upstream.gate.set()
    wait_all_terminal(srv, 20)

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    for i in range(12):
        assert [r["custom_id"] for r in ws.outputs(f"r{i:02d}")] == ws.input_ids(f"r{i:02d}")


def test_a_segment_whose_cursor_is_refused_reads_its_batches_by_id(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that refuses a segment's cursor (an error answer) costs that segment alone:
    its batches are read by id, the others come from the listing, nothing is lost, and the
    listing is asked again on the next pass (it did not fail as a whole)."""
    monkeypatch.setattr(prefetch, "LIST_PAGE_SIZE", 5)
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 12)
    newest_first = created_in_order(ws, srv, capsys)
    refused = newest_first[9]  # the last segment's cursor: r01 and r00 are its batches
    error = {"error": {"message": "bad cursor", "type": "invalid_request_error"}}
    srv.probe.refuse(rf"after={refused}", 400, error, query=True)
    srv.probe.counts.clear()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    polled = [e["resource"] for e in json_lines(out) if e.get("event") == "poll"]
    assert polled == [f"r{i:02d}" for i in range(12)]
    assert srv.probe.counts[LIST] == 3
    assert srv.probe.counts[RETRIEVE] == 2  # r00 (also the listing's check) and r01
    upstream.gate.set()
    wait_all_terminal(srv, 12)
    srv.probe.counts.clear()

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert srv.probe.counts[LIST] == 3  # listed again
    for i in range(12):
        assert [r["custom_id"] for r in ws.outputs(f"r{i:02d}")] == ws.input_ids(f"r{i:02d}")


@pytest.mark.parametrize("option", ["litellmProvider", "litellmModel"])
def test_a_litellm_proxys_batches_are_retrieved_by_id_not_taken_from_a_stale_listing(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    """A LiteLLM proxy with a database lists batches from its own table, refreshed hourly
    or never: it still lists both batches in_progress after they ended. Each is retrieved
    by id and collected in one pass; taken from the listing, they stayed in progress (apply
    --wait ran to its timeout while the answers waited)."""
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 2, **{option: "openai"})
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    finish_behind_a_stale_listing(srv, upstream, 2)

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert (srv.probe.counts[LIST], srv.probe.counts[RETRIEVE]) == (0, 2)
    assert [r["custom_id"] for r in ws.outputs("r00")] == ws.input_ids("r00")
    assert [r["custom_id"] for r in ws.outputs("r01")] == ws.input_ids("r01")


def test_a_listing_behind_its_batches_is_found_by_its_check_and_not_read_again(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any gateway's listing may lag (not only LiteLLM's, which is known and never listed):
    one listed batch is read by id each pass, and a listing that shows it running when it
    has ended, on two passes (once may be a batch that ended between the two reads), is not
    taken: every batch is read by id, a warning says why, and the rest of the run lists no
    more (taken, apply --wait ran to --timeout with every answer ready)."""
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 3)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    finish_behind_a_stale_listing(srv, upstream, 3)

    code, out, err = run_cli(
        ["apply", str(ws.root), "--yes", "--json", "--wait", "--timeout", "20"], capsys
    )

    assert code == 0, err
    # pass 1: the listing and its check (r00, collected from its read); pass 2: the listing,
    # its check (r02), behind again: r01 is read by id too
    assert (srv.probe.counts[LIST], srv.probe.counts[RETRIEVE]) == (2, 3)
    [warning] = [e for e in json_lines(out) if e["event"] == "warning"]
    assert "batch listing is behind its batches" in warning["message"]
    for name in ("r00", "r01", "r02"):
        assert [r["custom_id"] for r in ws.outputs(name)] == ws.input_ids(name)


def test_a_check_whose_read_failed_takes_the_listings_copy(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check that a listing is not behind reads one batch by id; when that read fails,
    the listing's copy of the batch answers for it, as it did before the check: the pass is
    not failed by a call it did not need."""
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 3)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    upstream.gate.set()
    wait_all_terminal(srv, 3)
    srv.probe.hold(RETRIEVE, 0, after=True, replace_status=400, times=1)
    srv.probe.counts.clear()

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert (srv.probe.counts[LIST], srv.probe.counts[RETRIEVE]) == (1, 1)
    for name in ("r00", "r01", "r02"):
        assert [r["custom_id"] for r in ws.outputs(name)] == ws.input_ids(name)


def test_batches_the_listing_does_not_show_are_retrieved(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches pushed past the listed pages by newer ones are retrieved by id, and collected."""
    monkeypatch.setattr(prefetch, "LIST_PAGE_SIZE", 2)
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 3)
    # one at a time: the server lists ours in our order, so which segment sees which of
    # them (and what is left to read by id) does not depend on how the creates overlapped
    assert run_cli(["apply", str(ws.root), "--yes", "--parallelism", "1"], capsys)[0] == 0
    # six newer batches of someone else: ours are past the two pages a pass lists
    other = make_workspace(
        tmp_path / "other",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[ResourceSpec(f"o{i}", count=1, prefix="other") for i in range(6)],
    )
    assert run_cli(["apply", str(other.root), "--yes"], capsys)[0] == 0
    upstream.gate.set()
    wait_all_terminal(srv, 9)
    srv.probe.counts.clear()

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert srv.probe.counts[LIST] == 3  # the top segment's two pages, the second's one
    # the listing's check, and what no segment saw: the top one reads only others' batches;
    # the second, from our second newest, sees the oldest only if the server made them in
    # the order we recorded them (the three creates went side by side): 1 + 2, or 1 + 1
    assert srv.probe.counts[RETRIEVE] in (2, 3)
    assert srv.probe.counts[DOWNLOAD] == 3
    assert all(ws.outputs(f"r{i:02d}") for i in range(3))


def test_downloads_start_while_the_listing_still_pages(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The terminal batches on a listing's page are downloaded as soon as the page comes,
    while its other pages are still being fetched, not after the whole listing: a slow page
    holds back no download but its own."""
    monkeypatch.setattr(prefetch, "LIST_PAGE_SIZE", 5)  # 12 batches: three pages
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 12)
    created_in_order(ws, srv, capsys)
    upstream.gate.set()
    wait_all_terminal(srv, 12)
    srv.probe.hold(LIST, 1.0, times=1)  # one page a slow round trip (long: a loaded CI machine)
    srv.probe.spans.clear()

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert all(len(ws.outputs(f"r{i:02d}")) == 1 for i in range(12))
    lists = sorted(span for span in srv.probe.spans if span[0] == LIST)
    downloads = sorted(span for span in srv.probe.spans if span[0] == DOWNLOAD)
    assert len(lists) == 3 and len(downloads) == 12
    last_page_ends = max(end for _, _, end in lists)
    early = [span for span in downloads if span[2] < last_page_ends]
    assert len(early) >= 7  # at least the other pages' batches, downloaded meanwhile


def test_downloads_are_fetched_in_the_order_the_pass_records_them(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing shows the newest batches first, but the pass records resources in order and
    waits for each one's file: the downloads start in resource order (the first resource's
    file first), not in the order the listing found the batches, or the pass would wait for
    the last download before recording anything."""
    monkeypatch.setattr(prefetch, "LIST_PAGE_SIZE", 5)  # 12 batches: three pages
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 12)
    assert run_cli(["apply", str(ws.root), "--yes", "--parallelism", "1"], capsys)[0] == 0
    upstream.gate.set()
    wait_all_terminal(srv, 12)
    # created one at a time in resource order; listed newest first: the last is r00's
    batches = srv.engine.list_batches(None, 100)["data"][::-1]
    resource_of = {b["output_file_id"]: f"r{i:02d}" for i, b in enumerate(batches)}
    assert len(resource_of) == 12
    srv.probe.raw_log.clear()

    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--parallelism", "1"], capsys)

    assert code == 0, err
    fetched = [
        resource_of[path.split("/")[-2]]
        for path in srv.probe.raw_log
        if path.startswith("GET ") and path.endswith("/content")
    ]
    assert fetched == [f"r{i:02d}" for i in range(12)]


def test_ordered_calls_start_after_the_others_lowest_order_first() -> None:
    """``BoundedCalls``: calls without an order start in submission order, before any call
    given one; those start lowest order first, whatever order they were submitted in."""
    started: list[str] = []
    gate = threading.Event()
    with prefetch.BoundedCalls(1, lambda _: None) as calls:
        blocker = calls.submit("p", lambda: gate.wait(10))  # holds the worker: the rest queue
        futures = [
            calls.submit("p", lambda n=name: started.append(n), order=order)
            for name, order in (("c", 3), ("a", 1), ("b", 2))
        ]
        futures += [calls.submit("p", lambda n=name: started.append(n)) for name in ("x", "y")]
        gate.set()
        for future in [blocker, *futures]:
            future.result(timeout=10)
    assert started == ["x", "y", "a", "b", "c"]


def test_a_library_caller_asking_for_more_workers_than_the_cap_gets_the_cap() -> None:
    """``BoundedCalls(100000)`` (a caller past the CLI's check) runs at most MAX_PARALLELISM
    workers, not a thread per queued call."""
    with prefetch.BoundedCalls(100_000, lambda _: None) as calls:
        assert calls.parallelism == prefetch.MAX_PARALLELISM == 256


def test_calls_still_queued_when_the_pool_closes_are_cancelled() -> None:
    """Closing the pool while calls wait for a worker cancels them (their futures say so)
    instead of leaving futures that never end."""
    gate = threading.Event()
    calls = prefetch.BoundedCalls(1, lambda _: None)
    blocker = calls.submit("p", lambda: gate.wait(10))
    queued = calls.submit("p", lambda: "ran", order=1)
    threading.Timer(0.2, gate.set).start()
    calls.__exit__(None, None, None)
    assert blocker.result(timeout=10) is True
    assert queued.cancelled()


_IDS = re.compile(r"\b(batch|file)[-_][A-Za-z0-9]+")


def collecting_pass(
    root: Path, gated: Any, capsys: pytest.CaptureFixture[str], name: str, **options: Any
) -> tuple[int, list[tuple[str, str, str]]]:
    """20 resources submitted, then answered; the pass that collects them all, its downloads
    slowed down at the server: (most downloads answered at once, its NDJSON without ids)."""
    srv, upstream = gated(name)
    ws = fleet(root, srv, 20, **options)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    upstream.gate.set()
    wait_all_terminal(srv, 20)
    srv.probe.hold(DOWNLOAD, 0.1)
    srv.probe.spans.clear()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    assert all(len(ws.outputs(f"r{i:02d}")) == 1 for i in range(20))
    events = [
        (
            e["event"],
            e.get("resource") or "",
            _IDS.sub("ID", (e.get("message") or "").replace(str(root), "WS")),
        )
        for e in json_lines(out)
        if e.get("event") not in ("plan", "result")
    ]
    return downloads_at_once(srv.probe.spans), events


def downloads_at_once(spans: list[tuple[str, float, float]]) -> int:
    """The most held downloads (0.1 s each) that overlapped by more than 0.05 s: a request
    just answered and the next just started may overlap by microseconds, never by that."""
    held = [(start, end) for route, start, end in spans if route == DOWNLOAD]
    return max(
        (sum(1 for s, e in held if min(end, e) - max(start, s) > 0.05) for start, end in held),
        default=0,
    )


def test_downloads_overlap_and_output_stays_in_resource_order(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pass's downloads run side by side (the server sees them overlap), while the NDJSON
    events come out exactly as a one-at-a-time pass (maxConcurrency 1) writes them."""
    peak, events = collecting_pass(tmp_path / "parallel", gated, capsys, "e1")
    serial_peak, serial_events = collecting_pass(
        tmp_path / "serial", gated, capsys, "e2", maxConcurrency=1
    )

    assert peak > 1
    assert serial_peak == 1
    assert events == serial_events
    collected = [resource for kind, resource, _ in events if kind == "collect"]
    assert collected == [f"r{i:02d}" for i in range(20)]


def test_a_failing_list_endpoint_falls_back_to_retrieving_each_batch(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A provider whose list call fails (here a 400) is polled batch by batch, as before."""
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 3)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    srv.probe.hold(LIST, 0, after=True, replace_status=400)
    srv.probe.counts.clear()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    assert srv.probe.counts[LIST] == 1
    assert srv.probe.counts[RETRIEVE] == 3
    polled = [e["resource"] for e in json_lines(out) if e.get("event") == "poll"]
    assert polled == ["r00", "r01", "r02"]


def test_a_listing_that_failed_is_not_asked_again_by_the_later_passes_of_the_run(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A listing that fails (after its client's retries: one slower than the timeout costs
    them all) is asked once a run: the later passes of apply --wait retrieve the batches
    by id at once, instead of waiting through the failing listing again every pass."""
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 2)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    srv.probe.hold(LIST, 0, after=True, replace_status=400)
    srv.probe.counts.clear()
    threading.Timer(0.3, upstream.gate.set).start()  # a few passes in flight, then done

    code, _, err = run_cli(
        ["apply", str(ws.root), "--yes", "--wait", "--poll-interval", "0.05"], capsys
    )

    assert code == 0, err
    assert srv.probe.counts[LIST] == 1
    assert srv.probe.counts[RETRIEVE] > 2  # polled by id on every pass
    assert [r["custom_id"] for r in ws.outputs("r01")] == ws.input_ids("r01")


def test_calls_waiting_for_a_place_never_start_once_the_pool_closes() -> None:
    """A pass stopped (Ctrl-C, an error) while calls wait for a place under a provider's cap
    starts none of them: before, the workers already waiting took them as the calls in flight
    ended, so an interrupted apply went on uploading and creating batches for many seconds."""
    gate = threading.Event()
    started: list[str] = []
    calls = prefetch.BoundedCalls(3, lambda _: 1)  # three workers, one place: two wait
    blocker = calls.submit("p", lambda: gate.wait(10))
    queued = [calls.submit("p", lambda n=n: started.append(n)) for n in ("b", "c")]
    wait_for(lambda: calls.limits["p"].active == 1)
    threading.Timer(0.1, gate.set).start()
    calls.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert blocker.result(timeout=10) is True
    assert started == [] and all(f.cancelled() for f in queued)


def test_ctrl_c_while_a_good_pass_closes_its_pool_stops_the_calls_waiting_to_retry() -> None:
    """A Ctrl-C that lands while the pool of a pass that went well waits for its workers
    stops the calls waiting out a Retry-After too, as one during the pass does: the process
    would otherwise wait for them to wake, and retry, before it could end."""
    import time

    from batchspec.providers.base import CallStopped, pause_before_retry

    calls = prefetch.BoundedCalls(2, lambda _: 2)
    waiting = threading.Event()

    def retry_later() -> str:
        waiting.set()
        pause_before_retry(5.0)
        return "retried"

    future = calls.submit("p", retry_later)
    assert waiting.wait(5)
    shutdown = calls._pool.shutdown

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    calls._pool.shutdown = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        calls.__exit__(None, None, None)
    started = time.monotonic()
    with pytest.raises(CallStopped):
        future.result(timeout=4)
    assert time.monotonic() - started < 1
    shutdown(wait=True)


def test_a_server_that_ignores_the_cursor_costs_calls_not_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compatible server that ignores ``after`` lists every segment from the top: the
    segments that start at a cursor see the first segment's batches (and fail at the page
    that comes back again); every batch is still polled and collected, each file fetched
    once, though two segments saw its batch ended."""
    from hostile_openai import HostileOpenAI, Reply, SeenRequest

    monkeypatch.setattr(prefetch, "LIST_PAGE_SIZE", 5)  # 12 batches: 3 segments
    hostile = HostileOpenAI()
    hostile.initial_status = "in_progress"

    def from_the_top(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        return server.listing({"limit": ["5"]})

    try:
        ws = _ended_on(hostile, tmp_path, 12, capsys)
        hostile.hooks["GET /v1/batches"] = from_the_top
        hostile.seen.clear()

        code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

        assert code == 0, err
        polled = [e["resource"] for e in json_lines(out) if e.get("event") == "poll"]
        assert polled == [f"r{i:02d}" for i in range(12)]
        for i in range(12):
            assert [r["custom_id"] for r in ws.outputs(f"r{i:02d}")] == ws.input_ids(f"r{i:02d}")
        downloads = [r for r in hostile.routes() if r == "GET /v1/files/{id}/content"]
        assert len(downloads) == 12
    finally:
        hostile.stop()


def test_a_segments_stale_copy_of_a_batch_does_not_hide_the_ended_copy_another_saw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two segments list one batch, one from a stale page (a gateway's cache) that still
    shows it running: the ended copy is kept, whichever segment came later (an ended batch
    never runs again). The stale copy used to win, and the batch waited a pass more."""
    from hostile_openai import HostileOpenAI, Reply, SeenRequest

    monkeypatch.setattr(prefetch, "LIST_PAGE_SIZE", 5)  # 12 batches: 3 segments
    hostile = HostileOpenAI()
    hostile.initial_status = "in_progress"

    def stale_top_first(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        if "after=" not in seen.path:
            return reply
        top = json.loads(server.listing({"limit": ["5"]}).body)["data"]
        stale = [{**b, "status": "in_progress", "output_file_id": None} for b in top]
        page = json.loads(reply.body)
        return Reply.of({**page, "data": stale + page["data"]})

    try:
        ws = _ended_on(hostile, tmp_path, 12, capsys)
        hostile.hooks["GET /v1/batches"] = stale_top_first

        code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

        assert code == 0, err
        for i in range(12):  # every one collected in this one pass
            assert [r["custom_id"] for r in ws.outputs(f"r{i:02d}")] == ws.input_ids(f"r{i:02d}")
    finally:
        hostile.stop()


def test_a_segment_that_fails_after_its_retries_is_not_listed_again_in_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server whose pages from a cursor fail after the client's retries (a 5xx, a timeout:
    not a refused cursor) fails the listing as a failing top does: the later passes of an
    ``apply --wait`` read its batches by id at once, instead of paying every segment's
    retries (and their backoff, or a timeout each) again at every pass."""
    from hostile_openai import HostileOpenAI, Reply, SeenRequest

    monkeypatch.setattr(prefetch, "LIST_PAGE_SIZE", 3)  # 7 batches: 3 segments
    hostile = HostileOpenAI()
    hostile.initial_status = "in_progress"
    asked: set[str] = set()

    def cursors_fail(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        if "after=" in seen.path:
            return Reply.of({"error": {"message": "overloaded", "type": "server_error"}}, 500)
        return reply

    def finish_in_the_second_pass(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        batch_id = seen.path.split("?", 1)[0].rsplit("/", 1)[-1]
        if batch_id in asked:  # read by id again: a later pass
            server.finish_all()
            return Reply.of(server.batches[batch_id])
        asked.add(batch_id)
        return reply

    try:
        ws = make_workspace(
            tmp_path / "ws",
            providers={"srv": openai_provider(hostile.v1, KEY_ENV, maxRetries=0)},
            resources=[ResourceSpec(f"r{i:02d}", count=1) for i in range(7)],
        )
        code, _, err = run_cli(["apply", str(ws.root), "--yes", "--parallelism", "1"], capsys)
        assert code == 0, err
        hostile.hooks["GET /v1/batches"] = cursors_fail
        hostile.hooks["GET /v1/batches/{id}"] = finish_in_the_second_pass
        hostile.seen.clear()

        argv = ["apply", str(ws.root), "--yes", "--wait", "--poll-interval", "0.05"]
        code, _, err = run_cli([*argv, "--timeout", "30"], capsys)

        assert code == 0, err
        from_a_cursor = [s for s in hostile.seen if "after=" in s.path]
        assert len(from_a_cursor) == 2  # the first pass's two segments, never again
        for i in range(7):
            assert [r["custom_id"] for r in ws.outputs(f"r{i:02d}")] == ws.input_ids(f"r{i:02d}")
    finally:
        hostile.stop()


def test_a_check_read_before_its_batch_ended_takes_the_listings_ended_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check's read by id and the listing run side by side: when the read came first
    (running) and the listing shows the batch ended, whole, the pass takes the listing's
    copy (an ended batch never runs again). Taking the read's, it left the file the listing
    had started downloading unused, and the next pass downloaded it again."""
    from hostile_openai import HostileOpenAI, Reply, SeenRequest

    hostile = HostileOpenAI()
    hostile.initial_status = "in_progress"

    def read_before_it_ended(server: HostileOpenAI, seen: SeenRequest, reply: Reply) -> Reply:
        batch = json.loads(reply.body)
        return Reply.of({**batch, "status": "in_progress", "output_file_id": None})

    try:
        ws = _ended_on(hostile, tmp_path, 3, capsys)
        hostile.hooks["GET /v1/batches/{id}"] = read_before_it_ended
        hostile.seen.clear()

        code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

        assert code == 0, err
        reads = [s for s in hostile.seen if re.fullmatch(r"/v1/batches/[^/?]+", s.path)]
        assert len(reads) == 1  # the listing's check
        collected = [e["resource"] for e in json_lines(out) if e.get("event") == "collect"]
        assert collected == ["r00", "r01", "r02"]
        hostile.hooks.clear()
        assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
        downloads = [s.path for s in hostile.seen if s.path.endswith("/content")]
        assert len(downloads) == len(set(downloads)) == 3  # each file once
    finally:
        hostile.stop()


def _ended_on(
    hostile: Any, tmp_path: Path, count: int, capsys: pytest.CaptureFixture[str]
) -> Workspace:
    """A workspace of ``count`` one-request resources whose batches ``hostile`` (a
    ``HostileOpenAI``) made one at a time, in resource order, and has ended."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(hostile.v1, KEY_ENV, maxRetries=0)},
        resources=[ResourceSpec(f"r{i:02d}", count=1) for i in range(count)],
    )
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--parallelism", "1"], capsys)
    assert code == 0, err
    hostile.finish_all()
    return ws


class ShardGatedUpstream(GatedUpstream):
    """The built-in stand-in, holding only the requests whose custom_id is in ``held``."""

    def __init__(self, held: set[str]) -> None:
        super().__init__()
        self.held = held

    async def send(self, url: str, body: Any, *, custom_id: str, attempt: int) -> UpstreamResponse:
        if custom_id in self.held:
            return await super().send(url, body, custom_id=custom_id, attempt=attempt)
        return await self.inner.send(url, body, custom_id=custom_id, attempt=attempt)


def test_a_finished_shard_is_collected_while_another_shard_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard's batch that ended is downloaded and recorded by the next pass, while another
    shard of the same resource is still in flight (its answers are safe from the provider's
    retention, and a large job's collecting overlaps the slowest shard's work, where it all
    waited for the slowest); the results file is written once every shard is in."""
    upstream = ShardGatedUpstream({"req-2", "req-3"})  # the second shard's requests
    srv = start_probed_server(tmp_path / "engine", upstream=upstream, api_key=SENTINEL_KEY)
    try:
        ws = make_workspace(
            tmp_path / "ws",
            providers={"srv": openai_provider(srv.v1, KEY_ENV)},
            resources=[ResourceSpec("job", count=4, spec={"limits": {"maxRequestsPerBatch": 2}})],
        )
        assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
        wait_for(
            lambda: (
                sorted(b["status"] for b in srv.engine.list_batches(None, 10)["data"])
                == ["completed", "in_progress"]
            )
        )
        srv.probe.counts.clear()

        code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

        assert code == 0, err
        events = json_lines(out)
        collected = [e for e in events if e.get("event") == "collect"]
        assert len(collected) == 1 and collected[0]["resource"] == "job"
        assert srv.probe.counts[DOWNLOAD] == 1
        with ws.store() as store:
            counts = RequestLedger(store.db).shard_counts(store.generations("job")[0].id)
        assert [(c.shard, c.unresolved) for c in counts] == [(0, 0), (1, 2)]
        assert not ws.output_path("job").exists()  # not before every shard is in

        upstream.gate.set()
        code, _, err = run_cli(
            ["apply", str(ws.root), "--yes", "--wait", "--poll-interval", "0.05"], capsys
        )
        assert code == 0, err
        assert [o["custom_id"] for o in ws.outputs("job")] == [f"req-{i}" for i in range(4)]
    finally:
        upstream.gate.set()
        srv.stop()


def test_a_provider_down_through_a_pass_is_not_asked_once_per_batch(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A provider down (its gateway answering 503 to every call) while many batches are in
    flight fails the pass after the calls in flight gave up, not after each in-flight batch
    was retrieved through all its retries: the listing failed, every batch was then asked by
    id, and each of those calls waited out every retry, so a fleet of 60 batches on a
    maxConcurrency of 4 took 3.5 minutes to exit 1 (a thousand: an hour). The calls still
    queued when one found the provider down are not sent; the run exits 1 naming it."""
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 12, maxConcurrency=2, maxRetries=1)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    srv.probe.refuse(r"^GET ", 503, {"error": {"message": "upstream connect error"}})
    srv.probe.counts.clear()

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 1
    assert "HTTP 503" in err and srv.v1 in err
    # the listing and its check (each sent twice: maxRetries 1), and the calls in flight
    # beside them when they gave up: at most two at once (maxConcurrency 2)
    assert srv.probe.counts[LIST] + srv.probe.counts[RETRIEVE] <= 2 * 4


def test_a_listing_a_gateway_times_out_does_not_stop_the_reads_by_id(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A listing its gateway answers 504 (a large listing slower than the gateway's timeout)
    while each read by id is answered says nothing of the provider's other calls: the pass
    reads every batch by id, as when the provider was not said down by one failing call."""
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 6, maxConcurrency=2, maxRetries=0)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    srv.probe.refuse(r"^GET /v1/batches$", 504, {"error": {"message": "gateway timeout"}})
    srv.probe.counts.clear()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    assert srv.probe.counts[LIST] == 1 and srv.probe.counts[RETRIEVE] == 6
    polled = [e["resource"] for e in json_lines(out) if e.get("event") == "poll"]
    assert polled == [f"r{i:02d}" for i in range(6)]


def test_a_provider_rate_limiting_through_a_pass_is_not_asked_once_per_batch(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A provider refusing every call with 429 while many batches are in flight: once a read
    was refused through all its retries (the run stops on it, or waits it out), the reads
    still queued are not sent. Before, each in-flight batch was read in turn through all its
    retries, at the one call at a time the 429s had halved the calls to: 20 batches on
    Retry-After 2 s and maxRetries 2 took 80 s to exit 1, a thousand over an hour."""
    srv, upstream = gated()
    ws = fleet(tmp_path / "ws", srv, 12, maxConcurrency=2, maxRetries=1)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    srv.probe.refuse(r"^GET ", 429, {"error": {"message": "rate limited", "type": "requests"}})
    srv.probe.counts.clear()

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 1
    assert "HTTP 429" in err
    assert srv.probe.counts[LIST] + srv.probe.counts[RETRIEVE] <= 2 * 4


def test_creates_not_sent_behind_a_provider_found_down_are_made_once_by_the_next_apply(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A submit pass whose provider goes down mid-way (its gateway answering 503 to every
    create): the creates still queued are not sent, and the next apply makes one batch per
    resource, none twice and none lost."""
    srv, upstream = gated()
    upstream.gate.set()
    # a create answered 503 may still arrive: looked up, not waited for (createConfirmSeconds)
    ws = fleet(tmp_path / "ws", srv, 12, maxConcurrency=2, maxRetries=1, createConfirmSeconds=0)
    srv.probe.refuse(r"^POST /v1/batches$", 503, {"error": {"message": "no healthy upstream"}})

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 1 and "HTTP 503" in err
    assert srv.probe.counts["POST /batches"] <= 2 * 2  # those in flight when one gave up
    srv.probe.refusals.clear()
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait", "--timeout", "60"], capsys)
    assert code == 0, err
    assert len(srv.engine.list_batches(None, 100)["data"]) == 12
    for i in range(12):
        assert [r["custom_id"] for r in ws.outputs(f"r{i:02d}")] == ws.input_ids(f"r{i:02d}")
