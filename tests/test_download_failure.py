"""A failed download stops only its own resource (``reconcile.collect``): the others of the
same apply are collected, the failed one stays ended-but-not-collected (never resubmitted),
apply exits 1 naming it, and the next apply collects it once the provider serves the file.
A real engine served over loopback behind a gateway that refuses one file's content (a 500 or
a reset, after the client's retry, or a 404); real SQLite; the CLI's own entry point."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from servers import EngineServer, wait_for
from slow_gateway import (
    SlowGateway,
    gated_and_slow_workspace,
    gated_workspace,
)
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, Workspace, run_cli

from batchspec.core.reconcile import collect
from batchspec.engine.upstreams import BuiltinUpstream, UpstreamResponse
from batchspec.state.store import BatchRow

CREATE = "POST /v1/batches"
FAST = ("--poll-interval", "0.05", "--timeout", "60")


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def _submitted_and_ended(
    ws: Workspace, srv: EngineServer, capsys: pytest.CaptureFixture[str]
) -> dict[str, str]:
    """Submit both resources (no wait), wait until the engine ended their batches; each
    resource's output file id."""
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    client = srv.client()
    files = {}
    with ws.store() as store:
        for name in ("alpha", "beta"):
            [batch] = store.batches(store.generations(name)[0].id)
            assert batch.remote_id is not None
            remote = wait_for(
                lambda rid=batch.remote_id: (
                    b if (b := client.batches.retrieve(rid)).status == "completed" else None
                )
            )
            files[name] = remote.output_file_id
    return files


def _result(out: str) -> dict[str, object]:
    return next(doc for line in out.splitlines() if (doc := json.loads(line))["event"] == "result")


@pytest.mark.parametrize(
    "status",
    [pytest.param(500, id="500"), pytest.param(404, id="404"), pytest.param(0, id="reset")],
)
def test_a_failed_download_leaves_the_others_collected_and_the_next_apply_collects_it(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
    status: int,
) -> None:
    """alpha's output download fails (a 500 or a reset after the client's retry, a 404):
    beta is collected by the same apply, which exits 1 naming alpha (JSON result, a download-failed
    event, no collect of alpha's batch, nothing failed or resubmitted; `status` says the last
    download failed and what to do); once the gateway
    serves the file again the next apply collects alpha from the same batch; the provider
    saw two creates in all and answered every request once; a 404's hint says the file is not
    served, not that the base URL (where the batch was found) may be wrong."""
    upstream = BuiltinUpstream()
    ws, srv, gw = gated_workspace(tmp_path, serve_engine, gateways, upstream)
    files = _submitted_and_ended(ws, srv, capsys)
    content = f"GET /v1/files/{files['alpha']}/content"
    gw.refuse[content] = status

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 1, err
    result = _result(out)
    assert result["outcome"] == "not_collected" and result["exit_code"] == 1
    assert err.startswith("Error: ") and "alpha" in err  # a CI log's stderr says why too
    [failed] = result["not_collected"]  # type: ignore[misc]
    assert failed["resource"] == "alpha" and failed["file_id"] == files["alpha"]
    assert failed["http_status"] == (status or None)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["resource"] for d in lines if d["event"] == "download_failed"] == ["alpha"]
    assert gw.received[content] == (1 if status == 404 else 2)  # a 500 or reset is retried
    assert [r["custom_id"] for r in ws.outputs("beta")] == ws.input_ids("beta")
    assert not ws.output_path("alpha").exists()
    with ws.store() as store:
        gen = store.generations("alpha")[0]
        [batch] = store.batches(gen.id)
        events = [(e.action, e.batch_id) for e in store.events(resource="alpha")]
        assert batch.collected_at is None and batch.status == "completed"
        assert ("download-failed", batch.id) in events and ("collect", batch.id) not in events
        assert store.generations("alpha")[0].failed == 0
    assert gw.received[CREATE] == 2
    code, out, err = run_cli(["status", str(ws.root), "--json"], capsys)
    reason = {r["name"]: r["reason"] for r in json.loads(out)["resources"]}["alpha"]
    tried = f"with HTTP {status}" if status else "(no answer)"
    assert reason.startswith("1 finished batch(es) to download; the last try failed " + tried)
    assert reason.endswith("`batchspec show alpha` has the provider's error")

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)  # still refused

    assert code == 1
    assert "the next `batchspec apply` tries the download again" in out
    if status == 404:  # the batch was found at this base URL: it is the file that is gone
        assert "does not serve this file now" in out and "API root" not in out
        assert "`batchspec apply --replace alpha` runs the resource again, paying" in out
    assert "Apply did not collect alpha" in out and "`batchspec show alpha` lists" in out
    assert gw.received[CREATE] == 2
    gw.refuse.clear()

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, out + err
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ws.input_ids("alpha")
    with ws.store() as store:
        [again] = store.batches(store.generations("alpha")[0].id)
    assert again.id == batch.id and again.collected_at is not None
    assert gw.received[CREATE] == 2 and len(srv.client().batches.list().data) == 2
    assert set(upstream.calls.values()) == {1} and len(upstream.calls) == 9


def test_apply_wait_does_not_wait_for_a_download_that_keeps_failing(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`apply --wait` with alpha's file refused (404, as from a wrong base URL) collects
    beta and exits 1 after the pass, neither spinning until --timeout (exit 5) nor creating
    anything again; `apply --quiet` says why on stderr."""
    ws, srv, gw = gated_workspace(tmp_path, serve_engine, gateways, BuiltinUpstream())
    files = _submitted_and_ended(ws, srv, capsys)
    gw.refuse[f"GET /v1/files/{files['alpha']}/content"] = 404

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 1, out + err
    assert "not collected: alpha: the output file" in out
    assert [r["custom_id"] for r in ws.outputs("beta")] == ws.input_ids("beta")
    assert gw.received[CREATE] == 2

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--quiet"], capsys)

    assert code == 1 and out == ""
    assert "Error: Apply did not collect alpha" in err


def _failed_downloads_recorded(ws: Workspace) -> int:
    """How many download-failed events the state holds (read beside a running apply)."""
    with sqlite3.connect(f"file:{ws.state_path}?mode=ro", uri=True) as db:
        query = "SELECT count(*) FROM events WHERE action = 'download-failed'"
        return int(db.execute(query).fetchone()[0])


def test_apply_wait_collects_a_failed_download_on_a_later_poll_while_others_run(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With --wait, alpha's download fails (500) in the first pass while beta's batch still
    runs on a slow provider; once the file is served again, a later pass of the same apply
    collects alpha from its one batch (after the download pause), and the apply exits 0."""
    monkeypatch.setattr(collect, "DOWNLOAD_RETRY_FIRST", 0.1)
    ws, srv, gw = gated_and_slow_workspace(tmp_path, serve_engine, gateways, 0.4)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    with ws.store() as store:
        [batch] = store.batches(store.generations("alpha")[0].id)
    client = srv.client()
    ended = wait_for(
        lambda: b if (b := client.batches.retrieve(batch.remote_id or "")).completed_at else None
    )
    gw.refuse[f"GET /v1/files/{ended.output_file_id}/content"] = 500

    def serve_again() -> None:
        wait_for(lambda: _failed_downloads_recorded(ws), timeout=30)
        gw.refuse.clear()

    clearer = threading.Thread(target=serve_again, daemon=True)
    clearer.start()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
    clearer.join(timeout=30)

    assert code == 0, out + err
    assert "could not download the output file" in out
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ws.input_ids("alpha")
    assert [r["custom_id"] for r in ws.outputs("beta")] == ws.input_ids("beta")
    with ws.store() as store:
        actions = [(e.action, e.batch_id) for e in store.events(resource="alpha")]
    assert actions.count(("download-failed", batch.id)) == 1
    assert actions.count(("collect", batch.id)) == 1
    assert gw.received[CREATE] == 1


class HeldUpstream(BuiltinUpstream):
    """The built-in stand-in, holding the requests whose custom_id is in ``held`` until
    ``gate`` is set."""

    def __init__(self, held: set[str]) -> None:
        super().__init__()
        self.held = held
        self.gate = threading.Event()

    async def send(self, url: str, body: Any, *, custom_id: str, attempt: int) -> UpstreamResponse:
        while custom_id in self.held and not self.gate.is_set():
            await asyncio.sleep(0.01)
        return await super().send(url, body, custom_id=custom_id, attempt=attempt)


def _first_shard_ended_its_file_refused(
    ws: Workspace, srv: EngineServer, gw: SlowGateway, capsys: pytest.CaptureFixture[str]
) -> tuple[Any, BatchRow, BatchRow]:
    """Apply ``job`` (two shards, the second held), wait for its first shard's batch to end
    and make the gateway refuse that batch's output file (404): the SDK client and the two
    batch rows."""
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    client = srv.client()
    with ws.store() as store:
        first, second = store.batches(store.generations("job")[0].id)
    wait_for(lambda: client.batches.retrieve(first.remote_id or "").completed_at)
    ended = client.batches.retrieve(first.remote_id or "")
    gw.refuse[f"GET /v1/files/{ended.output_file_id}/content"] = 404
    return client, first, second


def test_a_shard_whose_download_fails_does_not_keep_the_other_shards_from_being_polled(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A finished shard's download that keeps failing (a 404) does not stop the polls of
    its resource's other shards: one that ended since is recorded and collected by the
    same apply (its answers safe from the provider's retention), as when the collect
    waited for every shard to end."""
    upstream = HeldUpstream({"req-2", "req-3"})  # the second shard's requests
    job = ResourceSpec("job", count=4, spec={"limits": {"maxRequestsPerBatch": 2}})
    ws, srv, gw = gated_workspace(tmp_path, serve_engine, gateways, upstream, job)
    try:
        client, first, second = _first_shard_ended_its_file_refused(ws, srv, gw, capsys)
        run_cli(["apply", str(ws.root), "--yes"], capsys)  # the first shard seen ended
        upstream.gate.set()
        wait_for(lambda: client.batches.retrieve(second.remote_id or "").completed_at)

        code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

        assert code == 1, out + err
        with ws.store() as store:
            rows = {b.id: b for b in store.batches(store.generations("job")[0].id)}
        assert rows[second.id].status == "completed" and rows[second.id].collected_at
        assert rows[first.id].collected_at is None  # still refused: never resubmitted
        assert gw.received[CREATE] == 2
    finally:
        upstream.gate.set()


def test_apply_wait_waits_for_the_other_shards_of_a_resource_whose_download_failed(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`apply --wait` whose download of one shard's file fails (a 404) while another shard
    of the resource is still in flight keeps waiting for that shard and collects it before
    it exits 1 (it stopped at the failed download, leaving the other shard in flight)."""
    upstream = HeldUpstream({"req-2", "req-3"})  # the second shard's requests
    job = ResourceSpec("job", count=4, spec={"limits": {"maxRequestsPerBatch": 2}})
    ws, srv, gw = gated_workspace(tmp_path, serve_engine, gateways, upstream, job)
    try:
        client, first, second = _first_shard_ended_its_file_refused(ws, srv, gw, capsys)

        def release() -> None:  # once the download failed (or soon: a collect that waits)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: _failed_downloads_recorded(ws), timeout=2)
            upstream.gate.set()

        releaser = threading.Thread(target=release, daemon=True)
        releaser.start()
        code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
        releaser.join(timeout=30)

        assert code == 1, out + err
        with ws.store() as store:
            rows = {b.id: b for b in store.batches(store.generations("job")[0].id)}
        assert rows[second.id].status == "completed" and rows[second.id].collected_at
        assert rows[first.id].collected_at is None
        assert gw.received[CREATE] == 2
    finally:
        upstream.gate.set()
