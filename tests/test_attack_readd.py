"""Attacks on a pruned resource added back (``replacements.readded_after_prune``): it runs
again as a new generation, whatever the drain recorded on its pruned generation meanwhile, and
never pays twice. A real ``batchspec serve`` process behind a slow gateway, real SQLite."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from probes import ProbedServer, ServeProcess
from serve_faults import received_batches
from servers import wait_for
from slow_gateway import SlowGateway
from test_attack_drain import pruned_while_running
from test_drain import completed, ended, gone_submitted, output_ids, slow_server
from test_replace_hold import (
    CREATE,
    FAST,
    REQUESTS,
    SLOW,
    killed_while_its_create_is_held,
    serve,
)
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    run_cli,
)

from batchspec.core.reconcile import intent

__all__ = ["serve"]  # a fixture, used by name


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def test_a_pruned_resource_whose_lost_create_the_drain_cancelled_runs_again_when_added_back(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An apply killed while a gateway holds its create; the manifest removed and `apply
    --prune` run (its cancel cannot find the create yet); a later apply's drain finds it,
    adopts and cancels it (a second `cancel` event, not the prune's); the manifest comes
    back unchanged: plan and apply run it again as a new generation (it was pruned, not
    cancelled by a user), every line answered once by the old batch or the new one."""
    srv = serve(*SLOW, "0")
    ws, gw = killed_while_its_create_is_held(
        tmp_path,
        srv,
        gateways,
        hold=3.0,
        timeout=1,
        resources=(ResourceSpec("gone", count=REQUESTS), ResourceSpec("keep", count=1)),
        argv=("-s", "gone"),
    )
    manifest = ws.manifest_path("gone").read_text()
    ws.manifest_path("gone").unlink()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)
    assert code == 0, err
    gw.wait_until_forwarded(CREATE, 2)  # gone's, late, and keep's
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0, err
    with ws.store() as store:
        [old] = store.generations("gone")
        [batch] = store.batches(old.id)
        cancels = [e for e in store.events(resource="gone") if e.action == "cancel"]
    assert batch.remote_id and len(cancels) == 2, out
    ws.manifest_path("gone").write_text(manifest)

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0, err
    [action] = [a for a in json.loads(out)["actions"] if a["resource"] == "gone"]
    assert action["action"] == "create", action
    assert f"added again after `apply --prune` cancelled generation {old.id}" in action["reason"]
    before = {b.id for b in received_batches(srv.client())}
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
    assert code == 0, err + out
    batches = received_batches(srv.client())
    [adopted] = [b for b in batches if b.id == batch.remote_id]
    sent = [i for b in batches if b.id not in before for i in b.input_ids]
    assert set(sent).isdisjoint(adopted.output_ids)
    assert sorted(sent + adopted.output_ids) == sorted(ws.input_ids("gone"))
    assert [r["custom_id"] for r in ws.outputs("gone")] == ws.input_ids("gone")
    with ws.store() as store:
        current = store.get_resource("gone").current_generation_id
        assert current != old.id and store.get_generation(current).status == "complete"


def test_pruned_and_added_back_twice_while_running_answers_every_line_once(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """prune (running) → added back → its next replacement runs → prune again (running) →
    added back again: the second time is a create of replacement 2 (named after replacement
    1, the generation the prune cancelled), and over every batch the server ran for it each
    line is answered exactly once; the results hold every line in input order."""
    srv = slow_server(server, cancel_delay=0.5)
    ws, first, old = pruned_while_running(tmp_path, srv, capsys)
    client = srv.client()
    keep = {b.id for b in client.batches.list().data} - {first}
    ended(client, first)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0  # replacement 1
    [second] = [b.id for b in client.batches.list().data if b.id not in keep | {first}]
    wait_for(lambda: completed(client, second) >= 2)
    manifest = ws.manifest_path("gone").read_text()
    ws.manifest_path("gone").unlink()
    assert run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)[0] == 0
    ws.manifest_path("gone").write_text(manifest)
    with ws.store() as store:
        pruned = store.generations("gone")[-1]
    assert pruned.id != old and pruned.status == "cancelled"

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    [action] = [a for a in json.loads(out)["actions"] if a["resource"] == "gone"]
    assert action["action"] == "create", action
    assert f"cancelled generation {pruned.id}" in action["reason"]
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err + out
    ran = [b for b in received_batches(client) if b.id not in keep]
    answers = Counter(i for b in ran for i in b.output_ids)
    assert sorted(answers) == sorted(ws.input_ids("gone"))
    assert set(answers.values()) == {1}
    assert [r["custom_id"] for r in ws.outputs("gone")] == ws.input_ids("gone")
    with ws.store() as store:
        assert len(store.generations("gone")) == 3


def test_a_pruned_generation_killed_before_its_ledger_is_drained_and_its_spend_counted(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An apply killed after its create and before its ledger (written after the creates
    from LEDGER_AFTER_CREATE_MIN requests, lowered here), then its manifest pruned while the
    batch runs: a later apply drains it from the request index its intent kept (no manifest
    is left to read the input from), so what it answered is kept and its tokens appear in
    `history`, instead of the batch staying `cancelling` in the state, uncounted, forever."""
    monkeypatch.setattr(intent, "LEDGER_AFTER_CREATE_MIN", 1)
    srv = slow_server(server, cancel_delay=0.2)
    ws, client, first = gone_submitted(tmp_path, srv, capsys)
    with ws.store() as store:
        store.db.execute("delete from requests")  # as a kill before the ledger's commit
    wait_for(lambda: completed(client, first.id) >= 2)
    ws.manifest_path("gone").unlink()
    assert run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)[0] == 0
    answered = output_ids(client, ended(client, first.id))
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert [(d["resource"], d["pruned"]) for d in json.loads(out)["drains"]] == [("gone", True)]

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    with ws.store() as store:
        [gen] = store.generations("gone")
        [batch] = store.batches(gen.id)
        totals = store.ledger().usage_totals(gen.id)
    assert batch.status == "cancelled" and batch.collected_at is not None, out
    assert totals.requests == len(answered) and totals.input_tokens > 0
    code, out, err = run_cli(["history", str(ws.root), "--json", "--resource", "gone"], capsys)
    assert code == 0, err
    runs = json.loads(out)["runs"]
    assert sum(r["usage"]["input_tokens"] for r in runs) == totals.input_tokens
