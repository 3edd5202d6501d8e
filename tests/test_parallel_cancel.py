"""Cancels side by side (issue 13): `apply --prune`, `batchspec cancel`, `apply --replace`.

Against the engine's OpenAI API on loopback behind a ``RequestProbe`` (tests/probes.py) that
holds every cancel a while and records when each was answered, so that cancels sent side by
side are seen overlapping at the server. Batches are kept in flight by an upstream that
answers nothing until its gate opens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from probes import ProbedServer, start_probed_server
from servers import request_lines, wait_for
from test_parallel_polling import GatedUpstream
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

CANCEL = "POST /batches/{id}/cancel"
HELD = 0.2  # each cancel is held this long at the server
_IDS = re.compile(r"\b(batch|file)[-_][A-Za-z0-9]+")
#: a collected file's sha256: its lines carry the server's batch ids, so two servers differ
_SHAS = re.compile(r"\b[0-9a-f]{64}\b")


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


@pytest.fixture
def gated(tmp_path: Path) -> Any:
    started: list[tuple[ProbedServer, GatedUpstream]] = []

    def start(name: str = "engine") -> ProbedServer:
        upstream = GatedUpstream()
        # drain_timeout 0: a cancel drops the requests its gate holds, so a batch stops at once
        srv = start_probed_server(
            tmp_path / name, upstream=upstream, api_key=SENTINEL_KEY, drain_timeout=0.0
        )
        started.append((srv, upstream))
        return srv

    yield start
    for srv, upstream in started:
        upstream.gate.set()
        srv.stop()


def workspace(root: Path, srv: ProbedServer, *specs: ResourceSpec, **options: Any) -> Workspace:
    return make_workspace(
        root, providers={"srv": openai_provider(srv.v1, KEY_ENV, **options)}, resources=specs
    )


def fleet_specs(n: int) -> list[ResourceSpec]:
    return [ResourceSpec(f"r{i:02d}", count=1) for i in range(n)]


def cancels_at_once(srv: ProbedServer) -> int:
    """The most held cancels that overlapped by more than half a hold: a request just
    answered and the next just started may overlap by microseconds, never by that."""
    held = [(start, end) for route, start, end in srv.probe.spans if route == CANCEL]
    return max(
        (sum(1 for s, e in held if min(end, e) - max(start, s) > HELD / 2) for start, end in held),
        default=0,
    )


def masked(text: str, root: Path) -> str:
    return _SHAS.sub("SHA", _IDS.sub("ID", text.replace(str(root), "WS")))


def audit_log(ws: Workspace) -> list[tuple[str, str, int | None, str]]:
    """The last run's events: action, resource, batch row, detail (ids masked)."""
    with ws.store() as store:
        last = max(e.run_id or 0 for e in store.events())
        return [
            (e.action, e.resource or "", e.batch_id, masked(str(e.detail), ws.root))
            for e in store.events(run_id=last)
        ]


def remote_statuses(srv: ProbedServer) -> dict[str, str]:
    return {b["id"]: b["status"] for b in srv.engine.list_batches(None, 100)["data"]}


def pruning_run(
    root: Path, gated: Any, capsys: pytest.CaptureFixture[str], name: str, **options: Any
) -> tuple[int, list[tuple[str, str, str]], list[tuple[str, str, int | None, str]]]:
    """Eight resources in flight, then their manifests gone and `apply --prune` (a ninth,
    still declared, stays): (most cancels at once, the NDJSON events, the audit log)."""
    srv = gated(name)
    ws = workspace(root, srv, *fleet_specs(8), ResourceSpec("keep", count=1), **options)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    for i in range(8):
        ws.manifest_path(f"r{i:02d}").unlink()
    srv.probe.hold(CANCEL, HELD)
    srv.probe.spans.clear()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune", "--json"], capsys)

    assert code == 0, err
    assert srv.probe.counts[CANCEL] == 8
    events = [
        (e["event"], e.get("resource") or "", masked(e.get("message") or "", root))
        for e in json_lines(out)
        if e.get("event") not in ("plan", "result") and not _drained(e["event"], e.get("resource"))
    ]
    log = [event for event in audit_log(ws) if not _drained(event[0], event[1])]
    return cancels_at_once(srv), events, log


def _drained(event: str, resource: str | None) -> bool:
    """A pruned resource's batch polled (and collected once it ended) by the same run's
    pass (``drain``), or said still stopping at the run's end (``retired``): whether the
    server has ended it by then is the server's timing."""
    draining = ("poll", "download", "collect", "retired")
    return event in draining and (resource or "").startswith("r")


def test_prune_cancels_overlap_and_output_stays_in_resource_order(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --prune` of 8 orphans sends their cancels side by side (the server sees them
    overlap; never more than one with maxConcurrency 1), and the NDJSON and the audit log
    are exactly those of the one-at-a-time run."""
    peak, events, log = pruning_run(tmp_path / "parallel", gated, capsys, "e1")
    serial_peak, serial_events, serial_log = pruning_run(
        tmp_path / "serial", gated, capsys, "e2", maxConcurrency=1
    )

    assert peak > 1
    assert serial_peak == 1
    assert events == serial_events
    assert log == serial_log
    pruned = [resource for kind, resource, _ in events if kind == "prune"]
    assert pruned == [f"r{i:02d}" for i in range(8)]


@pytest.mark.parametrize(("options", "serial"), [((), False), (("--parallelism", "1"), True)])
def test_cancel_of_a_sharded_resource_sends_its_cancels_side_by_side(
    tmp_path: Path,
    gated: Any,
    capsys: pytest.CaptureFixture[str],
    options: tuple[str, ...],
    serial: bool,
) -> None:
    """`batchspec cancel NAME` of a 4-shard resource: the four cancels overlap at the server
    (one at a time with --parallelism 1), and all four are recorded as cancelled."""
    srv = gated()
    spec = {"limits": {"maxRequestsPerBatch": 2}}
    ws = workspace(tmp_path / "ws", srv, ResourceSpec("big", count=8, spec=spec))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    srv.probe.hold(CANCEL, HELD)
    srv.probe.spans.clear()

    code, out, err = run_cli(["cancel", "big", str(ws.root), "--json", *options], capsys)

    assert code == 0, err
    assert json.loads(out) == {
        "resource": "big",
        "cancelled_batches": 4,
        "stopping_batches": 0,
        "unconfirmed_creates": 0,
        "ended_batches": 0,
    }
    at_once = cancels_at_once(srv)
    assert at_once == 1 if serial else at_once > 1
    with ws.store() as store:
        batches = store.batches()
        assert len(batches) == 4
        assert {b.status for b in batches} <= {"cancelling", "cancelled"}
        assert [e.action for e in store.events(resource="big")][-1] == "cancel"


def test_prune_cancels_the_orphans_and_nothing_else(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cancels sent ahead are exactly the orphans': the resources still declared keep
    their batches running at the provider, untouched in the state."""
    srv = gated()
    ws = workspace(tmp_path / "ws", srv, *fleet_specs(8))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    gone = [f"r{i:02d}" for i in range(0, 8, 2)]
    for name in gone:
        ws.manifest_path(name).unlink()
    with ws.store() as store:
        owner = {
            b.remote_id: store.get_generation(b.generation_id).resource for b in store.batches()
        }

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)

    assert code == 0, err
    assert srv.probe.counts[CANCEL] == len(gone)
    statuses = remote_statuses(srv)
    assert sorted(owner[i] for i, s in statuses.items() if s in ("cancelling", "cancelled")) == gone
    assert all(s == "in_progress" for i, s in statuses.items() if owner[i] not in gone)
    with ws.store() as store:
        assert [r.name for r in store.list_resources()] == [f"r{i:02d}" for i in range(1, 8, 2)]
        assert {e.resource for e in store.events() if e.action in ("cancel", "prune")} == set(gone)


def failing_prune(
    root: Path, gated: Any, capsys: pytest.CaptureFixture[str], name: str, **options: Any
) -> tuple[int, str]:
    """Four orphans whose every cancel is refused (503, no retries): (exit code, stderr)."""
    srv = gated(name)
    ws = workspace(root, srv, *fleet_specs(4), maxRetries=0, **options)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    for i in range(4):
        ws.manifest_path(f"r{i:02d}").unlink()
    srv.probe.hold(CANCEL, 0, drop=True)
    with ws.store() as store:
        before = [b.status for b in store.batches()]
    assert "cancelling" not in before

    names = [arg for i in range(4) for arg in ("--select", f"r{i:02d}")]  # every manifest gone
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune", *names], capsys)

    with ws.store() as store:
        assert not [e for e in store.events() if e.action in ("cancel", "prune")]
        assert len(store.list_resources()) == 4  # none forgotten
        assert [b.status for b in store.batches()] == before
    return code, masked(err.replace(srv.v1, "URL"), root)  # the 503's message names it


def test_a_failed_cancel_fails_the_run_as_one_at_a_time_and_records_nothing(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cancel the provider refuses fails `apply --prune` with the exit code and message of
    the one-at-a-time run (a 503: the provider's failure, naming its base URL, not an
    orphan), and nothing is recorded as cancelled."""
    code, err = failing_prune(tmp_path / "parallel", gated, capsys, "e1")
    serial_code, serial_err = failing_prune(
        tmp_path / "serial", gated, capsys, "e2", maxConcurrency=1
    )

    assert code != 0
    assert (code, err) == (serial_code, serial_err)
    assert "cancel batch" in err


SHARDED = ResourceSpec("big", count=8, spec={"limits": {"maxRequestsPerBatch": 2}})


@pytest.mark.parametrize(
    "how",
    [["--replace", "big"], ["--allow-replace"]],
    ids=["apply --replace", "a new spec superseding"],
)
def test_replacing_a_sharded_resource_cancels_its_batches_side_by_side(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str], how: list[str]
) -> None:
    """`apply --replace NAME`, and a changed input applied with --allow-replace, cancel the
    four in-flight batches of the superseded generation side by side, then submit anew."""
    srv = gated()
    ws = workspace(tmp_path / "ws", srv, SHARDED)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    if how == ["--allow-replace"]:
        ws.write_input("big", request_lines(8, prefix="changed"))  # a new spec hash
    srv.probe.hold(CANCEL, HELD)
    srv.probe.spans.clear()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json", *how], capsys)

    assert code == 0, err
    assert srv.probe.counts[CANCEL] == 4
    assert cancels_at_once(srv) > 1
    with ws.store() as store:
        old, new = store.generations("big")
        assert (old.status, new.status) == ("superseded", "in_progress")
        assert {b.status for b in store.batches(old.id)} <= {"cancelling", "cancelled"}
        [cancel] = [e for e in store.events(resource="big") if e.action == "cancel"]
        assert cancel.detail["batches"] == 4


def test_a_cancel_failing_mid_prune_records_the_cancels_answered_beside_it(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A prune whose first cancel to arrive is refused (503, no retries) fails, and records
    the cancels that were sent side by side and answered: no batch the provider cancelled is
    left recorded in flight, the error says how many were recorded, and the re-run sends
    only the refused cancel again and prunes all eight (they were sent, never recorded)."""
    srv = gated()
    specs = (*fleet_specs(8), ResourceSpec("keep", count=1))
    ws = workspace(tmp_path, srv, *specs, maxRetries=0)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    for i in range(8):
        ws.manifest_path(f"r{i:02d}").unlink()
    srv.probe.hold(CANCEL, HELD, drop=True, times=1)

    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)

    assert code != 0
    assert "HTTP 503" in err
    remote = remote_statuses(srv)
    assert sorted(remote.values()).count("in_progress") == 2  # the refused one, and keep's
    with ws.store() as store:
        rows = [b for b in store.in_flight_batches() if b.status not in ("cancelling",)]
    assert sorted(remote[b.remote_id or ""] for b in rows) == ["in_progress", "in_progress"]
    assert "recorded on their batches" in err

    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)

    assert code == 0, err
    assert srv.probe.counts[CANCEL] == 9
    assert sorted(remote_statuses(srv).values()) == ["cancelled"] * 8 + ["in_progress"]
    with ws.store() as store:
        rows = {name: store.get_resource(name) for name in [s.name for s in specs]}
        assert [n for n, row in rows.items() if row and row.forgotten_at is None] == ["keep"]


@pytest.fixture
def opened(tmp_path: Path) -> Any:
    """A probed engine whose upstream answers once its gate is set: (server, upstream)."""
    upstream = GatedUpstream()
    srv = start_probed_server(tmp_path / "engine", upstream=upstream, api_key=SENTINEL_KEY)
    yield srv, upstream
    upstream.gate.set()
    srv.stop()


@pytest.mark.parametrize("how", [["--allow-replace"], ["--replace", "job"]])
def test_a_replace_keeps_the_answers_of_batches_that_ended_before_their_cancel(
    tmp_path: Path, opened: Any, capsys: pytest.CaptureFixture[str], how: list[str]
) -> None:
    """Two shards finish at the provider after the last apply; the input then gains a line
    and `apply --allow-replace` (or `--replace job`) cancels the old generation: the cancels
    find both batches completed, their answers are collected and kept, and only the new
    request is sent (they were recorded completed, never collected, and all five requests
    sent again)."""
    srv, upstream = opened
    spec = {"limits": {"maxRequestsPerBatch": 2}}
    ws = workspace(tmp_path, srv, ResourceSpec("job", count=4, spec=spec))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    upstream.gate.set()
    wait_for(lambda: sorted(remote_statuses(srv).values()) == ["completed"] * 2)
    ws.write_input("job", request_lines(5))

    code, _, err = run_cli(
        ["apply", str(ws.root), "--yes", *how, "--wait", "--poll-interval", "0.05"],
        capsys,
    )

    assert code == 0, err
    totals = [b["request_counts"]["total"] for b in srv.engine.list_batches(None, 100)["data"]]
    assert sorted(totals) == [1, 2, 2]
    assert [o["custom_id"] for o in ws.outputs("job")] == [f"req-{i}" for i in range(5)]


def test_a_superseded_generation_is_cancelled_on_the_provider_that_runs_it(
    tmp_path: Path, gated: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resource forgotten with a batch in flight on provider a, then declared on provider
    b and applied with --allow-replace: the old batch is cancelled on a, where it runs (the
    cancel went to the resource's new provider, which answered 404, and every run failed)."""
    first, second = gated("a"), gated("b")
    ws = make_workspace(
        tmp_path,
        providers={
            "a": openai_provider(first.v1, KEY_ENV),
            "b": openai_provider(second.v1, KEY_ENV),
        },
        resources=[ResourceSpec("job", count=2, provider="a")],
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert run_cli(["forget", "job", str(ws.root)], capsys)[0] == 0
    manifest = ws.manifest_path("job")
    manifest.write_text(manifest.read_text().replace("provider: a", "provider: b"))

    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--allow-replace"], capsys)

    assert code == 0, err
    assert list(remote_statuses(first).values()) == ["cancelled"]
    # the new generation waits for the old batch, recorded cancelling, to stop (its answers
    # are reused: ``reconcile.hold``): created on b by this apply if the step's re-poll saw it
    # stopped already, else by the next one
    assert list(remote_statuses(second).values()) in ([], ["in_progress"])
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert list(remote_statuses(second).values()) == ["in_progress"]
