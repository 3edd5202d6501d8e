"""Retired batches are drained: the answers a cancelled, superseded or pruned batch finishes
while it stops are downloaded, kept and reused, never lost or paid for twice.

The server keeps a cancelled batch ``cancelling`` a while with its lines still running
(``batchspec serve --fault-cancel-delay``, the engine's ``cancel_delay``), as OpenAI's
may for up to 10 minutes; answers finish after the cancel reached it. What the server
received (inputs, outputs, cancels) is read back from the server itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from probes import ProbedServer, ServeProcess, start_serve_process
from serve_faults import received_batches
from servers import request_lines, stop_after_test, wait_for
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    make_workspace,
    openai_provider,
    run_cli,
    served,
)

from batchspec.engine.upstreams import BuiltinUpstream, Faults, FaultyUpstream
from batchspec.storage.blobstore import BlobStore

FAST = ("--poll-interval", "0.05", "--timeout", "60")
CANCEL = "POST /batches/{id}/cancel"
REQUESTS = 60  # 50 ms each, one at a time: about 3 s of work


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


def slow_server(server: Callable[..., ProbedServer], cancel_delay: float) -> ProbedServer:
    """One line at a time, 50 ms each; a cancel takes ``cancel_delay`` s to stop a batch."""
    return server(upstream=BuiltinUpstream(latency=0.05), concurrency=1, cancel_delay=cancel_delay)


def gone_submitted(
    tmp_path: Path, srv: ProbedServer, capsys: pytest.CaptureFixture[str]
) -> tuple[Workspace, Any, Any]:
    """A workspace of `gone` (``REQUESTS`` requests) and `keep` (1) on ``srv``, only `gone`
    applied: the workspace, an SDK client of ``srv`` and `gone`'s batch as it listed it."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=(ResourceSpec("gone", count=REQUESTS), ResourceSpec("keep", count=1)),
    )
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes", "-s", "gone"], capsys)[0] == 0
    [first] = client.batches.list().data
    return ws, client, first


def completed(client: object, batch_id: str) -> int:
    return client.batches.retrieve(batch_id).request_counts.completed  # type: ignore[attr-defined]


def ended(client: object, batch_id: str) -> object:
    """The batch once the server has ended it (cancelled)."""
    return wait_for(
        lambda: (b := client.batches.retrieve(batch_id)).status == "cancelled" and b,  # type: ignore[attr-defined]
        timeout=30,
    )


def output_ids(client: object, batch: object) -> list[str]:
    text = client.files.content(batch.output_file_id).text  # type: ignore[attr-defined]
    return [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]


def collects_of(ws: Workspace, name: str, generation_id: int) -> list[dict]:
    with ws.store() as store:
        return [
            e.detail
            for e in store.events(resource=name)
            if e.action == "collect" and e.generation_id == generation_id
        ]


def ok_ids(ws: Workspace, generation_id: int) -> set[str]:
    with ws.store() as store:
        ledger = store.ledger()
        return {r.custom_id for r in ledger.in_input_order(generation_id) if r.state == "ok"}


def test_answers_finished_while_cancelling_are_reused_by_the_next_generation(
    tmp_path: Path, serve: Callable[..., ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """`cancel`, then a new spec (two lines added) while the server still runs the cancelled
    batch: once it ends, the next apply collects every answer it finished (those after the
    cancel too) and the new generation keeps them: the server receives none of them again."""
    srv = serve("--upstream-latency", "0.05", "--concurrency", "1", "--fault-cancel-delay", "1.5")
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: completed(client, first.id) >= 2)
    code, _, err = run_cli(["cancel", "triage", str(ws.root)], capsys)
    assert code == 0, err
    at_cancel = completed(client, first.id)
    ws.write_input("triage", request_lines(REQUESTS + 2))  # a new spec: the same lines and two

    stopped = ended(client, first.id)
    answered = output_ids(client, stopped)
    assert at_cancel < len(answered) < REQUESTS  # some finished after the cancel
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err
    second = [b for b in received_batches(client) if b.id != first.id]
    assert len(second) == 1
    assert set(second[0].input_ids).isdisjoint(answered)  # none of them paid for again
    assert f"collected batch {first.id} (cancelled): {len(answered)} answers" in out
    assert sorted(second[0].input_ids + answered) == sorted(ws.input_ids("triage"))
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")


def test_a_replaced_batch_still_cancelling_is_collected_by_a_later_apply(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --replace` leaves the old batch cancelling; a later apply polls it to its end and
    records what it finished in the superseded generation's ledger (a collect event marked
    retired), without making it the resource's generation again or counting it in its status."""
    srv = slow_server(server, cancel_delay=1.5)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: completed(client, first.id) >= 2)
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)
    assert code == 0, err
    with ws.store() as store:
        old, new = store.generations("triage")
        assert [b.status for b in store.batches(old.id)] == ["cancelling"]

    answered = output_ids(client, ended(client, first.id))
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    [detail] = collects_of(ws, "triage", old.id)
    assert (detail["status"], detail["retired"]) == ("cancelled", "superseded")
    assert ok_ids(ws, old.id) == set(answered)
    with ws.store() as store:
        assert store.get_generation(old.id).status == "superseded"
        assert store.get_resource("triage").current_generation_id == new.id
    collected = [e for e in map(json.loads, out.splitlines()) if e.get("event") == "collect"]
    assert collected[0]["resource"] == "triage"
    assert collected[0]["retired"] == "superseded"


def test_a_pruned_batch_still_cancelling_is_collected_later_and_never_cancelled_twice(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --prune` of a resource whose batch then stays cancelling: a later apply (with
    --prune again; not one whose --select leaves it out) downloads what it finished, keeps it
    in the ledger with a collect event of the pruned resource, and sends no second cancel;
    the apply after records nothing more."""
    srv = slow_server(server, cancel_delay=2.0)
    ws, client, batch = gone_submitted(tmp_path, srv, capsys)
    wait_for(lambda: completed(client, batch.id) >= 2)
    ws.manifest_path("gone").unlink()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)
    assert code == 0, err
    assert srv.probe.counts[CANCEL] == 1
    with ws.store() as store:
        [gen] = store.generations("gone")
        assert store.get_resource("gone").forgotten
    assert (
        f"[gone] batch {batch.id} of cancelled generation {gen.id} is still cancelling: "
        "run `batchspec apply` again later" in out
    )

    answered = output_ids(client, ended(client, batch.id))
    assert run_cli(["apply", str(ws.root), "--yes", "-s", "keep"], capsys)[0] == 0
    assert collects_of(ws, "gone", gen.id) == []  # a selection that does not select it
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)

    assert code == 0, err
    assert "still cancelling" not in out
    assert f"[gone] collected batch {batch.id} (cancelled): {len(answered)} answers" in out
    assert srv.probe.counts[CANCEL] == 1
    [detail] = collects_of(ws, "gone", gen.id)
    assert detail["retired"] == "cancelled" and detail["output_sha256"]
    assert ok_ids(ws, gen.id) == set(answered)
    with ws.store() as store:
        events = len(store.events(resource="gone"))
    assert run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)[0] == 0
    with ws.store() as store:
        assert len(store.events(resource="gone")) == events
    assert srv.probe.counts[CANCEL] == 1


#: runs `batchspec apply ARGS`, SIGKILLed the moment it would record a collected file
KILLED_BEFORE_RECORD = """
import os, signal, sys
from batchspec.state.ledger import RequestLedger
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
RequestLedger.record_outcomes = killed
from batchspec.cli.main import main
main(sys.argv[1:])
"""


def test_killed_between_the_download_and_its_record_collects_once_on_the_rerun(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """An apply SIGKILLed after a retired batch's output is in the result store and before
    its lines are recorded: the re-run records them once (one collect event, each answer
    once), and the run after records nothing more."""
    srv = slow_server(server, cancel_delay=1.0)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: completed(client, first.id) >= 2)
    assert run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)[0] == 0
    stopped = ended(client, first.id)
    answered = output_ids(client, stopped)
    with ws.store() as store:
        old = store.generations("triage")[0]

    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_RECORD, "apply", str(ws.root), "--yes"],
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL
    output = client.files.content(stopped.output_file_id).content
    assert BlobStore(ws.state_path.parent / "store").has(hashlib.sha256(output).hexdigest())
    assert collects_of(ws, "triage", old.id) == []
    assert ok_ids(ws, old.id) == set()

    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0

    [detail] = collects_of(ws, "triage", old.id)
    assert detail["answered"] == REQUESTS  # each line once: the answers and the cancelled
    assert ok_ids(ws, old.id) == set(answered)


def test_drained_batches_are_reported_in_resource_order_whatever_their_age(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Four resources submitted last to first, replaced, their old batches ended: the next
    apply's NDJSON and audit log show each drained batch's poll, then its collect, in the
    workspace's resource order (not the batches' age), once each."""
    srv = slow_server(server, cancel_delay=1.0)
    names = [f"r{i}" for i in range(4)]
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[ResourceSpec(name, count=20) for name in names],
    )
    for name in reversed(names):  # the oldest batch is the last resource's
        assert run_cli(["apply", str(ws.root), "--yes", "-s", name], capsys)[0] == 0
    first = {b.id for b in srv.client().batches.list().data}
    replace = [arg for name in names for arg in ("--replace", name)]
    assert run_cli(["apply", str(ws.root), "--yes", *replace], capsys)[0] == 0
    for batch_id in first:
        ended(srv.client(), batch_id)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    drained = [
        (e["event"], e["resource"]) for e in map(json.loads, out.splitlines()) if e.get("retired")
    ]
    assert drained == [(kind, name) for name in names for kind in ("poll", "collect")]
    with ws.store() as store:
        retired = [
            e.resource
            for e in store.events()
            if e.action == "collect" and e.detail.get("retired") == "superseded"
        ]
    assert retired == names


PRICING = {"*": {"input": 1.0, "output": 2.0}}  # USD per million tokens, as charged


def set_pricing(ws: Workspace) -> None:
    path = ws.root / "batchspec.yaml"
    project = yaml.safe_load(path.read_text())
    project["providers"]["srv"]["pricing"] = PRICING
    path.write_text(yaml.safe_dump(project, sort_keys=False))


def ledger_usage(ws: Workspace, generation_id: int) -> tuple[int, int]:
    with ws.store() as store:
        totals = store.ledger().usage_totals(generation_id)
    return totals.input_tokens, totals.output_tokens


def test_drained_answers_count_once_in_history_and_spend_across_a_crash(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """The tokens and dollars of a replaced batch's answers, drained by a re-run after an
    apply killed before recording them, appear once in `history` (on the run that collected
    them, under the resource) and once in `history --by commit`, beside the new generation's."""
    srv = slow_server(server, cancel_delay=1.0)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    set_pricing(ws)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: completed(client, first.id) >= 2)
    assert run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)[0] == 0
    ended(client, first.id)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_RECORD, "apply", str(ws.root), "--yes"],
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    with ws.store() as store:
        old, new = store.generations("triage")
        [drained] = [e for e in store.events(action="collect") if e.generation_id == old.id]
    old_in, old_out = ledger_usage(ws, old.id)
    new_in, new_out = ledger_usage(ws, new.id)
    assert old_in and new_in

    code, out, err = run_cli(["history", str(ws.root), "--json", "--limit", "50"], capsys)
    assert code == 0, err
    runs = json.loads(out)["runs"]
    assert sum(r["usage"]["input_tokens"] for r in runs) == old_in + new_in
    assert sum(r["usage"]["output_tokens"] for r in runs) == old_out + new_out
    [collector] = [r for r in runs if r["run"]["id"] == drained.run_id]
    assert collector["usage"]["input_tokens"] >= old_in
    assert collector["usage"]["cost_usd"] == pytest.approx(
        (collector["usage"]["input_tokens"] + 2 * collector["usage"]["output_tokens"]) / 1e6
    )
    code, out, err = run_cli(["history", str(ws.root), "--json", "--by", "commit"], capsys)
    assert code == 0, err
    [group] = json.loads(out)["commits"]
    assert (group["usage"]["input_tokens"], group["usage"]["output_tokens"]) == (
        old_in + new_in,
        old_out + new_out,
    )
    assert group["usage"]["cost_usd"] == pytest.approx(
        (old_in + new_in + 2 * (old_out + new_out)) / 1e6
    )
    assert group["resources"]["triage"]["input_tokens"] == old_in + new_in


def test_answers_collected_before_a_replace_count_once_with_those_drained_after_it(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A generation whose first attempt is collected while it is active (its retry then
    runs), replaced while the retry still runs (drained after a kill between download and
    record), never writes results: `history` and `history --by commit` count every token of
    both attempts exactly once (no less: the first collect; no more: the re-runs)."""
    faulty = FaultyUpstream(BuiltinUpstream(latency=0.05), Faults(error_500=0.3, seed=3))
    srv = server(upstream=faulty, concurrency=1, cancel_delay=1.0, max_attempts=1)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    set_pricing(ws)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: client.batches.retrieve(first.id).status == "completed", timeout=30)
    for _ in range(2):  # collects the first attempt, then sends the retry
        assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    with ws.store() as store:
        [old] = store.generations("triage")
        assert [(b.attempt, b.collected_at is None) for b in store.batches(old.id)] == [
            (1, False),
            (2, True),
        ]
    [retry] = [b for b in client.batches.list().data if b.id != first.id]
    assert run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)[0] == 0
    ended(client, retry.id)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_RECORD, "apply", str(ws.root), "--yes"],
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL
    for _ in range(2):
        assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    with ws.store() as store:
        old, new = store.generations("triage")
        assert old.status == "superseded" and all(b.collected_at for b in store.batches(old.id))
    old_in, old_out = ledger_usage(ws, old.id)
    new_in, new_out = ledger_usage(ws, new.id)
    assert old_in and new_in
    want = (old_in + new_in, old_out + new_out)

    code, out, err = run_cli(["history", str(ws.root), "--json", "--limit", "50"], capsys)
    assert code == 0, err
    runs = json.loads(out)["runs"]
    got = tuple(sum(r["usage"][k] for r in runs) for k in ("input_tokens", "output_tokens"))
    assert got == want
    code, out, err = run_cli(["history", str(ws.root), "--json", "--by", "commit"], capsys)
    assert code == 0, err
    [group] = json.loads(out)["commits"]
    assert (group["usage"]["input_tokens"], group["usage"]["output_tokens"]) == want
    assert group["usage"]["cost_usd"] == pytest.approx((want[0] + 2 * want[1]) / 1e6)


def forget_on_server(srv: ProbedServer, batch_id: str) -> None:
    """The server loses a batch (deleted, aged out of its records): a retrieve answers 404."""
    db = srv.engine.store.db
    db.execute("DELETE FROM results WHERE batch_id = ?", (batch_id,))
    db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))


def test_a_retired_batch_the_provider_no_longer_knows_is_recorded_ended_once(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A replaced batch the server then forgets (404 on retrieve): the next apply records it
    `cancelled` and settled with one poll event saying it is gone, and warns once; the apply
    after neither asks the server about it nor warns again."""
    srv = slow_server(server, cancel_delay=1.0)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: completed(client, first.id) >= 2)
    assert run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)[0] == 0
    ended(client, first.id)
    forget_on_server(srv, first.id)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", "--json", *FAST], capsys)

    assert code == 0, err
    gone = [
        e
        for e in map(json.loads, out.splitlines())
        if "gone from the provider" in e.get("message", "")
    ]
    assert [(e["event"], e["resource"], e["status"]) for e in gone] == [
        ("warning", "triage", "cancelled")
    ]
    with ws.store() as store:
        old = store.generations("triage")[0]
        [batch] = store.batches(old.id)
        assert (batch.status, batch.collected_at is not None) == ("cancelled", True)
        polls = [e.detail for e in store.events(action="poll") if e.batch_id == batch.id]
        assert polls[-1]["status"] == "cancelled" and "no longer knows" in polls[-1]["gone"]
        assert store.get_generation(old.id).status == "superseded"
        events = len(store.events(resource="triage"))
    retrieves = srv.probe.counts["GET /batches/{id}"]

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    assert "gone" not in out and '"warning"' not in out
    assert srv.probe.counts["GET /batches/{id}"] == retrieves
    with ws.store() as store:
        assert len(store.events(resource="triage")) == events


def test_plan_shows_the_retired_batches_the_next_apply_drains_without_asking_the_provider(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """After `apply --replace`, `plan` (text and --json) lists the superseded batch still
    cancelling that the next apply polls, calling no provider and changing no exit code;
    once an apply has collected it, plan lists nothing."""
    srv = slow_server(server, cancel_delay=1.0)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: completed(client, first.id) >= 2)
    assert run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)[0] == 0
    with ws.store() as store:
        old = store.generations("triage")[0]
    calls = sum(srv.probe.counts.values())

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["drains"] == [
        {
            "resource": "triage",
            "generation_id": old.id,
            "retired": "superseded",
            "remote_id": first.id,
            "status": "cancelling",
            "step": "poll",
            "pruned": False,
        }
    ]
    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 0, err
    assert f"  triage: {first.id} of superseded generation {old.id} (cancelling): poll" in out
    markdown = run_cli(["plan", str(ws.root), "--format", "markdown"], capsys)[1]
    assert f"`triage` {first.id} (cancelling: poll)" in markdown
    assert sum(srv.probe.counts.values()) == calls  # no provider call

    ended(client, first.id)
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["drains"] == []
    assert "Earlier batches" not in run_cli(["plan", str(ws.root)], capsys)[1]


def test_a_retired_batch_whose_output_file_is_gone_is_settled_once_with_what_is_left(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A replaced batch that ended while its output file was then deleted at the server
    (404 on download): the next apply records its collect once, naming the file gone in the
    event, with no warning; the apply after records and downloads nothing more."""
    srv = slow_server(server, cancel_delay=1.0)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: completed(client, first.id) >= 2)
    assert run_cli(["apply", str(ws.root), "--yes", "--replace", "triage"], capsys)[0] == 0
    stopped = ended(client, first.id)
    client.files.delete(stopped.output_file_id)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", "--json", *FAST], capsys)

    assert code == 0, err
    assert '"warning"' not in out
    with ws.store() as store:
        old = store.generations("triage")[0]
    [detail] = collects_of(ws, "triage", old.id)
    assert detail["retired"] == "superseded" and "output_sha256" not in detail
    assert detail["gone"].startswith(f"output file {stopped.output_file_id}: ")
    with ws.store() as store:
        events = len(store.events(resource="triage"))
    downloads = srv.probe.counts["GET /files/{id}/content"]

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    assert '"warning"' not in out
    assert srv.probe.counts["GET /files/{id}/content"] == downloads
    with ws.store() as store:
        assert len(store.events(resource="triage")) == events


def test_a_second_cancel_of_a_batch_still_stopping_says_so(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`cancel` again while the first cancel's batch still stops says it is already cancelled
    and still stopping (not "no batch in flight"), and sends no second cancel."""
    srv = slow_server(server, cancel_delay=30.0)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0

    code, out, err = run_cli(["cancel", "triage", str(ws.root)], capsys)

    assert code == 0, err
    assert out.startswith("triage is already cancelled: 1 batch still stopping")
    assert srv.probe.counts[CANCEL] == 1
    code, out, err = run_cli(["cancel", "triage", str(ws.root), "--json"], capsys)
    assert json.loads(out) == {
        "resource": "triage",
        "cancelled_batches": 0,
        "stopping_batches": 1,
        "unconfirmed_creates": 0,
        "ended_batches": 0,
    }
