"""Attacks on the drain of retired batches: answers kept and reused only for the very same
request line, never lost, never paid twice (real ``batchspec serve``, real SQLite)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from probes import ProbedServer
from serve_faults import received_batches
from servers import request_lines, wait_for
from test_drain import FAST, REQUESTS, completed, ended, gone_submitted, output_ids, slow_server
from test_read_once import count_parses
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    run_cli,
    served,
)

from batchspec.core.reconcile import intent
from batchspec.engine.upstreams import BuiltinUpstream, Faults, FaultyUpstream


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def test_a_drained_answer_whose_line_changed_is_sent_again(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A cancelled batch answers req-0 while it stops; the new input changes req-0's body:
    the new generation sends req-0 again (the old answer is for another request)."""
    srv = slow_server(server, cancel_delay=1.5)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: completed(client, first.id) >= 2)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    lines = request_lines(REQUESTS)
    lines[0]["body"]["messages"][0]["content"] = "Something else entirely."
    ws.write_input("triage", lines)
    answered = output_ids(client, ended(client, first.id))
    assert "req-0" in answered
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
    assert code == 0, err
    [second] = [b for b in received_batches(client) if b.id != first.id]
    assert "req-0" in second.input_ids
    assert set(second.input_ids) == ({"req-0"} | set(ws.input_ids("triage"))) - (
        set(answered) - {"req-0"}
    )


@pytest.mark.parametrize("per_batch", [None, 25], ids=["one-shard", "three-shards"])
def test_a_retired_generation_killed_before_its_ledger_keeps_its_answers(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    per_batch: int | None,
) -> None:
    """An apply killed after its creates and before the ledger (no ledger rows; a ledger is
    written after its creates from LEDGER_AFTER_CREATE_MIN requests, lowered here), then a
    new input (two lines added) on a runner without the request-index folder: the old
    batches' answers are still kept and reused, not paid for again."""
    monkeypatch.setattr(intent, "LEDGER_AFTER_CREATE_MIN", 1)
    srv = slow_server(server, cancel_delay=1.5)
    spec = {"limits": {"maxRequestsPerBatch": per_batch}} if per_batch else {}
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=REQUESTS, spec=spec))
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    firsts = client.batches.list().data
    assert len(firsts) == (3 if per_batch else 1)
    first = min(firsts, key=lambda b: b.created_at)
    with ws.store() as store:
        store.db.execute("delete from requests")  # as a kill before the ledger's commit
    shutil.rmtree(ws.state_path.parent / "input-index", ignore_errors=True)  # small: none
    wait_for(lambda: completed(client, first.id) >= 2)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    ws.write_input("triage", request_lines(REQUESTS + 2))
    answered = [i for b in firsts for i in output_ids(client, ended(client, b.id))]
    assert answered
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
    assert code == 0, err
    old = {b.id for b in firsts}
    second = [i for b in received_batches(client) if b.id not in old for i in b.input_ids]
    assert set(second).isdisjoint(answered), out
    assert sorted(second + answered) == sorted(ws.input_ids("triage"))


def test_a_generation_killed_before_its_ledger_keeps_its_answers_after_a_state_move(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An apply killed after its create and before its ledger (as the test above), then
    `state migrate` to an SQLite state in another folder and the old state folder gone (a
    runner that has only the moved state): the kept request index moved with it, so once the
    input changes the old batch's answers are still reused, not paid for again."""
    monkeypatch.setattr(intent, "LEDGER_AFTER_CREATE_MIN", 1)
    srv = slow_server(server, cancel_delay=1.5)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    with ws.store() as store:
        store.db.execute("delete from requests")  # as a kill before the ledger's commit
    moved = tmp_path / "elsewhere" / "batchspec.db"
    monkeypatch.chdir(ws.root)
    code, _, err = run_cli(["state", "migrate", "--to", str(moved)], capsys)
    assert code == 0, err
    shutil.rmtree(ws.state_path.parent)  # its result store and input-index folder too
    wait_for(lambda: completed(client, first.id) >= 2)
    assert run_cli(["cancel", "triage", str(ws.root), "--state", str(moved)], capsys)[0] == 0
    ws.write_input("triage", request_lines(REQUESTS + 2))
    answered = output_ids(client, ended(client, first.id))
    argv = ["apply", str(ws.root), "--yes", "--wait", "--state", str(moved), *FAST]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    second = [i for b in received_batches(client) if b.id != first.id for i in b.input_ids]
    assert set(second).isdisjoint(answered), out
    assert sorted(second + answered) == sorted(ws.input_ids("triage"))


def test_a_pruned_resource_added_again_with_another_input_reuses_exactly(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --prune` leaves a batch cancelling; the resource comes back under the same name
    with req-0 changed: the next apply drains the old batch and submits what no drained
    answer covers (req-0 again) and writes a result for every line."""
    srv = slow_server(server, cancel_delay=1.5)
    ws, first, _ = pruned_while_running(tmp_path, srv, capsys)
    client = srv.client()
    answered = output_ids(client, ended(client, first))
    before = {b.id for b in client.batches.list().data}
    lines = request_lines(REQUESTS)
    lines[0]["body"]["messages"][0]["content"] = "Something else entirely."
    ws.write_input("gone", lines)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err + out
    sent = [i for b in received_batches(client) if b.id not in before for i in b.input_ids]
    reused = set(answered) - {"req-0"}
    assert sorted(sent) == sorted(set(ws.input_ids("gone")) - reused), out
    assert [r["custom_id"] for r in ws.outputs("gone")] == ws.input_ids("gone")


def pruned_while_running(
    tmp_path: Path, srv: ProbedServer, capsys: pytest.CaptureFixture[str], *, cancel: bool = False
) -> tuple[Workspace, str, int]:
    """`gone` submitted, (with ``cancel``: `batchspec cancel gone` first,) then its manifest
    removed and `apply --prune` run while its batch still runs; its remote batch id and
    generation id."""
    ws, client, first = gone_submitted(tmp_path, srv, capsys)
    wait_for(lambda: completed(client, first.id) >= 2)
    if cancel:
        assert run_cli(["cancel", "gone", str(ws.root)], capsys)[0] == 0
    manifest = ws.manifest_path("gone").read_text()
    ws.manifest_path("gone").unlink()
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)
    assert code == 0, err
    ws.manifest_path("gone").write_text(manifest)  # added back, the very same spec
    with ws.store() as store:
        [gen] = store.generations("gone")
    return ws, first.id, gen.id


def test_a_pruned_resource_added_again_unchanged_runs_again_paying_nothing_twice(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --prune` cancels a running batch; the manifest comes back unchanged: `plan`
    shows a create of a new generation (not the cancelled one kept), and apply sends only
    what the drained batch did not answer and writes a result for every line."""
    srv = slow_server(server, cancel_delay=1.5)
    ws, first, old = pruned_while_running(tmp_path, srv, capsys)
    client = srv.client()
    before = {b.id for b in client.batches.list().data}  # gone's and keep's

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0, err
    [action] = [a for a in json.loads(out)["actions"] if a["resource"] == "gone"]
    assert action["action"] == "create" and action["generation_id"] is None
    assert f"added again after `apply --prune` cancelled generation {old}" in action["reason"]
    code, out, _ = run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)
    assert code == 2 and "+ gone: create (added again after `apply --prune`" in out
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    [status] = [r for r in json.loads(out)["resources"] if r["name"] == "gone"]
    assert status["action"] == "create" and status["sync"] == "OutOfSync"

    answered = output_ids(client, ended(client, first))
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err + out
    assert f"added again after `apply --prune` cancelled generation {old}" in out
    sent = [i for b in received_batches(client) if b.id not in before for i in b.input_ids]
    assert set(sent).isdisjoint(answered)
    assert sorted(sent + answered) == sorted(ws.input_ids("gone"))
    assert [r["custom_id"] for r in ws.outputs("gone")] == ws.input_ids("gone")
    with ws.store() as store:
        current = store.get_resource("gone").current_generation_id
        assert current != old and store.get_generation(current).status == "complete"
        [replace] = store.events(action="replace", resource="gone")
        assert replace.detail["readded_after_prune"] == old
    code, out, _ = run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)
    assert code == 0, out


def test_a_resource_a_user_cancelled_stays_cancelled_when_added_again_after_a_prune(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`batchspec cancel gone`, then its manifest pruned and added back unchanged: it stays
    the cancelled generation (only `apply --replace` runs it again); nothing is created."""
    srv = slow_server(server, cancel_delay=0.2)
    ws, first, old = pruned_while_running(tmp_path, srv, capsys, cancel=True)
    client = srv.client()
    ended(client, first)
    before = {b.id for b in client.batches.list().data}  # gone's and keep's

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    [action] = [a for a in json.loads(out)["actions"] if a["resource"] == "gone"]
    assert action["action"] != "create" and action["generation_id"] == old
    assert "cancelled by a user" in action["reason"]
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    assert {b.id for b in client.batches.list().data} == before
    with ws.store() as store:
        assert store.get_resource("gone").current_generation_id == old


def test_a_retired_generation_without_its_content_is_not_read_again_per_batch_and_pass(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three retired batches of a generation whose ledger was never written and whose input
    content is gone everywhere (input changed, index folder and stored index removed): an
    `apply --wait` of many passes reads the new input a bounded number of times, not once
    per retired batch and pass."""
    srv = slow_server(server, cancel_delay=1.5)
    spec = {"limits": {"maxRequestsPerBatch": 25}}
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=REQUESTS, spec=spec))
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    firsts = client.batches.list().data
    with ws.store() as store:
        store.db.execute("delete from requests")  # as a kill before the ledger's commit
    shutil.rmtree(ws.state_path.parent / "input-index", ignore_errors=True)  # small: none
    shutil.rmtree(ws.state_path.parent / "store", ignore_errors=True)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    ws.write_input("triage", request_lines(REQUESTS + 2))
    for b in firsts:
        ended(client, b.id)
    parsed = count_parses(monkeypatch)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err + out
    passes = out.count("completed 25/25") + out.count("in_progress")
    assert passes > 3, out  # several passes polled the new batches
    assert len(parsed) <= 3 * (REQUESTS + 2), (len(parsed), out)


def test_a_retry_does_not_resend_a_line_a_drained_batch_answered(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A new generation recorded while the cancelled batch still stops (both run the same
    lines: the provider's `replaceHoldSeconds: 0` ends the create's hold at once); lines of
    the new batch fail with 500s: once the old batch has ended and been drained, the retry
    sends only the failed lines no drained answer covers."""
    upstream = FaultyUpstream(BuiltinUpstream(latency=0.02), Faults(error_500=0.4, seed=7))
    srv = server(upstream=upstream, concurrency=1, cancel_delay=2.0, max_attempts=1)
    ws = served(tmp_path / "ws", srv, count=REQUESTS)
    project = ws.root / "batchspec.yaml"
    config = yaml.safe_load(project.read_text())
    config["providers"]["srv"].setdefault("options", {})["replaceHoldSeconds"] = 0
    project.write_text(yaml.safe_dump(config, sort_keys=False))
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: completed(client, first.id) >= 5)
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    ws.write_input("triage", request_lines(REQUESTS + 2))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0  # old one still stopping
    [second] = [b for b in client.batches.list().data if b.id != first.id]
    answered = set(output_ids(client, ended(client, first.id)))
    wait_for(lambda: client.batches.retrieve(second.id).status == "completed", timeout=60)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code in (0, 4), err + out  # 4: a line that failed every attempt (degraded)
    retried = [
        i
        for b in received_batches(client)
        if b.id not in (first.id, second.id)
        for i in b.input_ids
    ]
    assert retried, out  # the new batch had failures to retry
    assert answered.isdisjoint(retried), (sorted(answered & set(retried)), out)
    written = [r["custom_id"] for r in ws.outputs("triage") + ws.errors("triage")]
    assert sorted(written) == sorted(ws.input_ids("triage"))  # a line each, in one file
    assert answered <= {r["custom_id"] for r in ws.outputs("triage")}


def test_a_retired_generation_whose_ledger_cannot_be_derived_does_not_stop_every_apply(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retired generation with no ledger whose intents' counts no longer add up to its
    input's requests (a damaged state): the drain warns once and skips it, and the new
    generation is created and finished; it does not fail every later apply."""
    monkeypatch.setattr(intent, "LEDGER_AFTER_CREATE_MIN", 1)
    srv = slow_server(server, cancel_delay=0.5)
    spec = {"limits": {"maxRequestsPerBatch": 25}}
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=REQUESTS, spec=spec))
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    firsts = client.batches.list().data
    with ws.store() as store:
        store.db.execute("delete from requests")  # as a kill before the ledger's commit
        store.db.execute("update batches set requests = requests + 5 where shard = 0")
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    ws.write_input("triage", request_lines(REQUESTS + 2))
    for b in firsts:
        ended(client, b.id)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err + out
    assert out.count("could not be listed") == 1, out
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")


def test_a_pruned_spec_coming_back_over_a_running_generation_is_a_replace_needing_consent(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --prune` cancels generation 1; the manifest comes back with another input
    (generation 2, running); then a revert brings the first spec back. That is a spec change
    over a running generation: a plain `apply --yes` neither cancels generation 2 nor
    creates anything (a replace needs --allow-replace), whatever the pruned generation."""
    srv = slow_server(server, cancel_delay=0.2)
    ws, first, old = pruned_while_running(tmp_path, srv, capsys)
    client = srv.client()
    ended(client, first)
    original = ws.input_path("gone").read_bytes()
    lines = request_lines(REQUESTS)
    lines[0]["body"]["messages"][0]["content"] = "Something else entirely."
    ws.write_input("gone", lines)
    assert run_cli(["apply", str(ws.root), "--yes", "-s", "gone"], capsys)[0] == 0
    with ws.store() as store:
        running = store.get_resource("gone").current_generation_id
    assert running != old
    ws.input_path("gone").write_bytes(original)  # the revert: the pruned spec again
    before = {b.id: b.status for b in client.batches.list().data}

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "-s", "gone"], capsys)

    assert "Re-run with --allow-replace" in err + out, err + out
    after = {b.id: b.status for b in client.batches.list().data}
    assert after.keys() == before.keys()  # nothing created
    assert "cancelling" not in after.values() or "cancelling" in before.values()
    with ws.store() as store:
        assert store.get_resource("gone").current_generation_id == running
        assert store.get_generation(running).status in ("pending", "in_progress")
        assert not store.events(action="replace", resource="gone")


def test_a_later_cancel_of_a_pruned_generations_batch_does_not_hide_the_prune(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A pruned generation whose batch the drain cancels later (a create found after its
    retirement records a cancel event of its own) is still one `apply --prune` retired: its
    manifest added back is planned as a create, not as "cancelled by a user"."""
    srv = slow_server(server, cancel_delay=0.2)
    ws, first, old = pruned_while_running(tmp_path, srv, capsys)
    ended(srv.client(), first)
    with ws.store() as store:
        [run] = store.runs(limit=1)
        store.record_event(
            run.id,
            "cancel",
            resource="gone",
            generation_id=old,
            detail={"reason": "adopted after its generation was retired"},
        )

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)

    assert code == 0, err
    [action] = [a for a in json.loads(out)["actions"] if a["resource"] == "gone"]
    assert action["action"] == "create", action
    assert f"added again after `apply --prune` cancelled generation {old}" in action["reason"]
