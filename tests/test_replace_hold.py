"""A replace never pays twice for what the old batch is still finishing: the new generation's
create is held while a retired generation's batch is still stopping (``reconcile.hold``).

A real ``batchspec serve`` process over loopback runs one line at a time and keeps a
cancelled batch ``cancelling`` a while with its lines still running (``--fault-cancel-delay``),
as OpenAI does for up to 10 minutes. What each batch received and answered is read back from
the server itself.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from probes import ServeProcess, start_serve_process
from serve_faults import ServerBatch, received_batches
from servers import request_lines, stop_after_test, wait_for
from slow_gateway import SlowGateway, start_slow_gateway
from test_moved import rename
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

from batchspec.storage import sql

FAST = ("--poll-interval", "0.05", "--timeout", "60")
REQUESTS = 60  # 50 ms each, one at a time: about 3 s of work
SLOW = ("--upstream-latency", "0.05", "--concurrency", "1", "--fault-cancel-delay")
WAITING = "waiting for generation 1 to stop (its answers are reused)"
CREATE = "POST /v1/batches"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        proc = start_serve_process(tmp_path / "engine", *args)
        started.append(proc)
        return proc

    yield start
    stop_after_test(started)


def workspace(root: Path, srv: ServeProcess | SlowGateway, **options: object) -> Workspace:
    return make_workspace(
        root,
        providers={"srv": openai_provider(srv.v1, KEY_ENV, **options)},
        resources=(ResourceSpec("triage", count=REQUESTS),),
    )


def started(ws: Workspace, srv: ServeProcess, capsys: pytest.CaptureFixture[str]) -> str:
    """Apply (no wait), then let the server answer a few lines; the batch's id."""
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    client = srv.client()
    [first] = client.batches.list().data
    wait_for(lambda: client.batches.retrieve(first.id).request_counts.completed >= 2)
    return first.id


def in_order(client: object, first: str) -> list[ServerBatch]:
    """The server's batches, the ``first`` one first (both are shard 1, attempt 1)."""
    return sorted(received_batches(client), key=lambda b: b.id != first)


def answered_once(batches: list[ServerBatch], ws: Workspace) -> None:
    """Every request answered by exactly one batch, old or new, and none sent to the new one
    that the old one answered."""
    old, new = batches
    assert set(new.input_ids).isdisjoint(old.output_ids)
    answers = Counter(old.output_ids + new.output_ids)
    assert sorted(answers) == sorted(ws.input_ids("triage"))
    assert set(answers.values()) == {1}
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")


def test_replace_while_cancelling_waits_and_pays_each_request_once(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --replace --wait` while the old batch stays cancelling: the create waits for it
    to stop (said in the pass output and NDJSON), then reuses every answer it finished: the
    server answers each request once in total across both generations."""
    srv = serve(*SLOW, "1.5")
    ws = workspace(tmp_path / "ws", srv)
    first = started(ws, srv, capsys)

    code, out, err = run_cli(
        ["apply", str(ws.root), "--yes", "--replace", "triage", "--wait", "--json", *FAST], capsys
    )

    assert code == 0, err
    batches = in_order(srv.client(), first)
    assert len(batches) == 2 and batches[0].status == "cancelled"
    answered_once(batches, ws)  # none of what the old batch finished paid for again
    assert 0 < len(batches[1].input_ids) < REQUESTS
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    waits = [e for e in events if e.get("event") == "waiting" and WAITING in e.get("message", "")]
    assert waits and waits[0]["resource"] == "triage"
    assert waits[0]["remote_ids"] == [first]


def test_no_reuse_creates_at_once_and_plan_shows_the_hold(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan --replace` says the new generation waits for the old one to stop; with
    `--no-reuse` it does not, and `apply --replace --no-reuse` creates every request at once,
    while the old batch is still cancelling (today's behaviour)."""
    srv = serve(*SLOW, "3")
    ws = workspace(tmp_path / "ws", srv)
    first = started(ws, srv, capsys)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0

    code, out, _ = run_cli(["plan", str(ws.root), "--replace", "triage"], capsys)
    assert "waits for generation 1 to stop first (its answers are reused)" in out
    code, out, _ = run_cli(["plan", str(ws.root), "--replace", "triage", "--no-reuse"], capsys)
    assert "waits for generation" not in out

    code, out, err = run_cli(
        ["apply", str(ws.root), "--yes", "--replace", "triage", "--no-reuse"], capsys
    )

    assert code == 0, err
    assert "waiting for generation" not in out
    client = srv.client()
    assert client.batches.retrieve(first).status == "cancelling"
    [old, new] = in_order(client, first)
    assert old.id == first
    assert sorted(new.input_ids) == sorted(ws.input_ids("triage"))


def test_no_hold_when_every_request_already_has_an_answer_elsewhere(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """Completed once, then `--replace --no-reuse` (in flight), then `--replace`: the batch
    still cancelling could only answer requests generation 1 already answered, so neither plan
    nor apply waits for it: the apply writes the results at once, creating nothing."""
    srv = serve(*SLOW, "30")
    ws = workspace(tmp_path / "ws", srv)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    argv = ["apply", str(ws.root), "--yes", "--replace", "triage"]
    assert run_cli([*argv, "--no-reuse"], capsys)[0] == 0
    created = len(client.batches.list().data)

    code, out, _ = run_cli(["plan", str(ws.root), "--replace", "triage"], capsys)
    assert code == 0 and "waits for generation" not in out, out
    assert "sent again" not in out, out  # nothing is sent at all
    code, out, err = run_cli(argv, capsys)

    assert code == 0, err
    assert "waiting for generation" not in out and "Apply complete" in out, out
    assert len(client.batches.list().data) == created
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")


def test_a_pruned_resource_added_back_with_every_answer_kept_is_written_at_once(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """Completed once, then `--replace --no-reuse` pruned while in flight, then the manifest
    put back: plan neither waits for the stopping batch nor warns that what it finishes is
    sent again (nothing is sent), and apply writes the results at once, creating nothing."""
    srv = serve(*SLOW, "30")
    ws = workspace(tmp_path / "ws", srv)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    argv = ["apply", str(ws.root), "--yes", "--replace", "triage", "--no-reuse"]
    assert run_cli(argv, capsys)[0] == 0
    manifest = ws.manifest_path("triage").read_text()
    ws.manifest_path("triage").unlink()
    argv = ["apply", str(ws.root), "--yes", "--prune", "--select", "triage"]
    assert run_cli(argv, capsys)[0] == 0  # its last manifest gone: pruned by name
    ws.manifest_path("triage").write_text(manifest)
    created = len(client.batches.list().data)

    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert code == 0 and "added again after `apply --prune`" in out, out
    assert "waits for generation" not in out and "sent again" not in out, out
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert "Apply complete" in out, out
    assert len(client.batches.list().data) == created
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")


def test_the_hold_ends_after_replace_hold_seconds_with_a_warning(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """A provider's `replaceHoldSeconds: 0`: the hold is over at once, so the replace creates
    the new generation while the old batch is still cancelling, and warns that what it
    finishes from now is sent again."""
    srv = serve(*SLOW, "3")
    ws = workspace(tmp_path / "ws", srv, replaceHoldSeconds=0)
    first = started(ws, srv, capsys)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)

    assert code == 0, err
    assert "generation 1 is still stopping past replaceHoldSeconds: creating anyway" in out
    assert "waiting for generation" not in out
    client = srv.client()
    assert client.batches.retrieve(first).status == "cancelling"
    assert len(in_order(client, first)) == 2


def test_apply_without_wait_leaves_it_waiting_and_the_next_apply_finishes_it(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """`cancel`, then `apply --replace` (no --wait) while the old batch is cancelling: it exits
    with the resource waiting and nothing created or paid; `plan` and `status` show the hold;
    once the old batch has stopped, a plain `apply --wait` creates the new generation from
    what it did not finish, and every request is answered once."""
    srv = serve(*SLOW, "1.5")
    ws = workspace(tmp_path / "ws", srv)
    first = started(ws, srv, capsys)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)

    assert code == 0, err
    assert WAITING in out
    client = srv.client()
    assert [b.id for b in client.batches.list().data] == [first]
    with ws.store() as store:
        new = store.generations("triage")[-1]
        assert store.batches(new.id) == []
        assert not store.ledger().has_requests(new.id)
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "waits for generation 1 to stop first" in out
    code, out, _ = run_cli(["status", str(ws.root)], capsys)
    assert "waits for generation 1 to stop first" in out, out

    wait_for(lambda: client.batches.retrieve(first).status == "cancelled", timeout=30)
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err
    assert "waiting for generation" not in out
    answered_once(in_order(client, first), ws)


def test_cancel_of_a_held_replacement_says_what_it_cancelled(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --replace` held while the old batch stops, then `cancel`: the replacement,
    never created, is cancelled (plan: cancelled by a user), and the message says so, not
    that the resource "is already cancelled"."""
    srv = serve(*SLOW, "30")
    ws = workspace(tmp_path / "ws", srv)
    started(ws, srv, capsys)
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)
    assert code == 0 and WAITING in out, err

    code, out, err = run_cli(["cancel", "triage", str(ws.root)], capsys)

    assert code == 0, err
    assert "already cancelled" not in out
    assert "cancelled triage: nothing of it was created yet (1 earlier batch still stopping" in out
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "cancelled by a user" in out


def test_an_ended_batch_not_yet_collected_still_holds_the_create(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """The old batch recorded ended but not collected (its download failed): its answers are
    not in the ledger yet, so `plan` still says the new generation waits for it, rather than
    creating one that would send them again."""
    srv = serve(*SLOW, "30")
    ws = workspace(tmp_path / "ws", srv)
    first = started(ws, srv, capsys)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    with ws.store() as store:
        [batch] = store.batches(store.generations("triage")[0].id)
        assert batch.remote_id == first
        store.update_batch(batch.id, status="cancelled", output_file_id="file-kept-by-server")

    code, out, err = run_cli(["plan", str(ws.root), "--replace", "triage"], capsys)

    assert code in (0, 2), err
    assert "waits for generation 1 to stop first (its answers are reused)" in out


def test_a_stopping_generation_with_no_ledger_yet_holds_the_create(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """The old generation's ledger was never written (a run killed between its create and its
    ledger): any request may be one its stopping batch answers, so the create waits."""
    srv = serve(*SLOW, "30")
    ws = workspace(tmp_path / "ws", srv)
    started(ws, srv, capsys)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    with ws.store() as store:
        store.db.execute("delete from requests")  # as a kill before the ledger's commit

    code, out, err = run_cli(["plan", str(ws.root), "--replace", "triage"], capsys)

    assert code in (0, 2), err
    assert "waits for generation 1 to stop first (its answers are reused)" in out


def test_a_renamed_resource_is_held_from_the_cancel_recorded_under_its_old_name(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """Cancelled, renamed (metadata.moved), then `apply --replace NEW` while the old batch
    still stops: the hold runs from the cancel, recorded under the old name, so the create
    waits, instead of going ahead (paying again for what the old batch finishes) on a bound
    counted from the generation's creation, long over."""
    srv = serve(*SLOW, "30")
    ws = workspace(tmp_path / "ws", srv)
    started(ws, srv, capsys)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    with ws.store() as store:  # created long before its cancel
        store.db.execute("update generations set created_at = '2020-01-01T00:00:00.000Z'")
    rename(ws, "triage", "triage-v2")
    code, out, _ = run_cli(["plan", str(ws.root), "--replace", "triage-v2"], capsys)
    assert "waits for generation 1 to stop first" in out, out  # the move still to apply
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0  # the move

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "triage-v2"], capsys)

    assert code == 0, err
    assert WAITING in out and "creating anyway" not in out, out


def test_an_older_expired_hold_does_not_hide_a_newer_live_one(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """Generation 1 still stops past its bound (generation 2 was created with the warning),
    then generation 2 is cancelled too: the third create waits for generation 2, whose bound
    has not run out, instead of going ahead on generation 1's expired one."""
    hold = 5.0
    # half a second a line, one at a time: no batch finishes its 60 lines within the test
    srv = serve("--upstream-latency", "0.5", "--concurrency", "1", "--fault-cancel-delay", "60")
    ws = workspace(tmp_path / "ws", srv, replaceHoldSeconds=hold)
    started(ws, srv, capsys)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    time.sleep(hold + 0.2)
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)
    assert code == 0, err
    assert "generation 1 is still stopping past replaceHoldSeconds" in out
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)

    assert code == 0, err
    assert "waiting for generation 2 to stop (its answers are reused)" in out
    assert "creating anyway" not in out
    with ws.store() as store:
        assert store.batches(store.generations("triage")[-1].id) == []


def test_a_batch_that_stops_moments_after_the_drain_saw_it_is_reused_by_the_same_apply(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The pass's drain sees the old batch `cancelling` and it stops moments later (the
    gateway delays the polls' answers past that): a plain `apply --replace` (no --wait) polls
    it once more before holding, keeps what it finished and creates the new generation in
    the same run, and every request is answered once."""
    srv = serve(*SLOW, "0.3")
    gw = start_slow_gateway(srv.base_url, hold={})
    gateways.append(gw)
    ws = workspace(tmp_path / "ws", gw)
    first = started(ws, srv, capsys)
    gw.hold_answers.update({"GET /v1/batches": 1.5, f"GET /v1/batches/{first}": 1.5})

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)

    assert code == 0, err
    assert "waiting for generation" not in out
    assert f"batch {first} cancelling (superseded generation 1" in out  # the pass's drain
    client = srv.client()
    [old, new] = in_order(client, first)
    assert old.status == "cancelled" and 0 < len(new.input_ids) < REQUESTS
    gw.hold_answers.clear()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
    assert code == 0, err
    answered_once(in_order(client, first), ws)


def killed_while_its_create_is_held(
    tmp_path: Path,
    srv: ServeProcess,
    gateways: list[SlowGateway],
    *,
    hold: float,
    timeout: float,
    resources: tuple[ResourceSpec, ...] = (ResourceSpec("triage", count=REQUESTS),),
    argv: tuple[str, ...] = (),
) -> tuple[Workspace, SlowGateway]:
    """An apply (with ``argv``) of ``resources`` killed while a gateway holds its create
    ``hold`` seconds (its provider's ``timeout`` shorter): the create is left `creating`, and
    lands once the gateway lets it go; the gateway holds no later request."""
    gw = start_slow_gateway(srv.base_url, hold={CREATE: hold})
    gateways.append(gw)
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(gw.v1, KEY_ENV, timeout=timeout)},
        resources=resources,
    )
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes", *argv),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert gw.arrived(CREATE).wait(30), "the create never reached the gateway"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    gw.hold.clear()  # the create in transit is still held; the next ones go through
    return ws, gw


def test_an_unconfirmed_create_of_the_old_generation_holds_until_found_and_cancelled(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An apply killed while a gateway holds its create leaves it `creating` with no remote
    id; `apply --replace` cannot find it yet, so the new create waits for it; once the
    gateway delivers it, the next apply adopts it, cancels it, keeps what it finished and
    only then creates the rest: no request is answered twice."""
    srv = serve(*SLOW, "0")
    ws, gw = killed_while_its_create_is_held(tmp_path, srv, gateways, hold=3.0, timeout=1)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)

    assert code == 0, err
    assert WAITING + ": a create not confirmed may still answer" in out
    with ws.store() as store:
        assert store.batches(store.generations("triage")[-1].id) == []
    gw.wait_until_forwarded(CREATE, 1)
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err
    with ws.store() as store:
        [old] = store.batches(store.generations("triage")[0].id)
        actions = [(e.action, e.generation_id) for e in store.events(resource="triage")]
    assert ("adopt", 1) in actions and actions.count(("cancel", 1)) == 2
    assert gw.forwarded[CREATE] == 2
    answered_once(in_order(srv.client(), old.remote_id or ""), ws)


def test_an_unconfirmed_create_never_found_is_settled_once_its_confirm_window_passed(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """A `creating` row of the old generation whose key no batch carries, past its confirm
    window (`createConfirmSeconds: 0`): `apply --replace` records it never made (a `lookup`
    event) instead of holding for it, and creates the new generation in the same run."""
    srv = serve(*SLOW, "0")
    ws = workspace(tmp_path / "ws", srv, createConfirmSeconds=0)
    started(ws, srv, capsys)
    with ws.store() as store:
        [batch] = store.batches(store.generations("triage")[0].id)
        store.db.execute(
            "update batches set remote_id = null, status = 'creating', key = ? where id = ?",
            ("triage/never-sent/0/9", batch.id),
        )

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)

    assert code == 0, err
    assert "was not found by its key within its confirm window: recorded never made" in out
    assert "waiting for generation" not in out
    with ws.store() as store:
        assert store.get_batch(batch.id).status == "cancelled"
        lookups = [e for e in store.events(resource="triage") if e.action == "lookup"]
        assert [e.batch_id for e in lookups if e.detail.get("never_made")] == [batch.id]
        assert len(store.batches(store.generations("triage")[-1].id)) == 1


def test_plan_and_status_read_the_recorded_rows_in_one_query_per_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`plan` and `status` of resources whose next create is checked for a hold (their input
    changed) read the generations and the batches in one query each, however many
    resources: no query per resource or per generation (``StateStore.reading``)."""
    names = ["r0", "r1", "r2"]
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": local_provider()},
        resources=[ResourceSpec(name, count=2) for name in names],
    )
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    for name in names:
        ws.write_input(name, request_lines(3, prefix=name))
    statements: Counter[str] = Counter()
    opened = sql.SqliteSql.__init__

    def traced(self: sql.SqliteSql, conn: sqlite3.Connection) -> None:
        opened(self, conn)
        conn.set_trace_callback(lambda statement: statements.update([" ".join(statement.split())]))

    monkeypatch.setattr(sql.SqliteSql, "__init__", traced)
    for command in ("plan", "status"):
        statements.clear()

        assert run_cli([command, str(ws.root)], capsys)[0] in (0, 2)

        reads = [
            s
            for s in statements
            if s.startswith("SELECT * FROM generations WHERE resource = ")
            and s.endswith("ORDER BY id")
            or s.startswith("SELECT * FROM batches WHERE generation_id = ")
        ]
        assert reads == [], (command, reads)
        bulk = ["SELECT * FROM generations ORDER BY id", "SELECT * FROM batches ORDER BY id"]
        assert [statements[s] for s in bulk] == [1, 1], (command, statements)


def test_a_batch_ended_before_the_replace_whose_download_fails_is_kept_by_a_later_pass(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The old batch completed before the replace's cancel and its output cannot be
    downloaded yet (503): the replace goes on with a warning (as the drain's, whose steps it
    shares) and its create waits for those answers; a later apply collects them and the new
    generation reuses every one: one batch in all at the server."""
    srv = serve()
    gw = start_slow_gateway(srv.base_url, hold={})
    gateways.append(gw)
    ws = workspace(tmp_path / "ws", gw, maxRetries=0)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    client = srv.client()
    [first] = client.batches.list().data
    done = wait_for(
        lambda: (b := client.batches.retrieve(first.id)).status == "completed" and b, timeout=30
    )
    gw.refuse[f"GET /v1/files/{done.output_file_id}/content"] = 503

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)

    assert code == 0, err
    assert f"batch {first.id} of superseded generation 1 could not be polled" in out
    assert WAITING in out
    gw.refuse.clear()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
    assert code == 0, err
    assert [b.id for b in client.batches.list().data] == [first.id]
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
