"""A user's ``batchspec cancel`` of a generation whose create's answer was lost, and which the
cancel's own lookup could not find yet, stops that batch too once it shows (``drain``,
``cancel``): every later ``apply`` looks its key up while the generation stays the resource's
current one (its manifest unchanged), cancels and adopts it if found and keeps what it
finished, or records it never made once its confirm window has passed; ``plan`` lists it.

A real ``batchspec serve`` process behind a slow gateway that holds (or resets) creates;
real SQLite. What a paid provider would bill is what the gateway forwarded and what each
batch on the server received and answered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from probes import ServeProcess
from serve_faults import received_batches
from servers import wait_for
from slow_gateway import SlowGateway, start_slow_gateway
from test_replace_hold import (
    CREATE,
    FAST,
    SLOW,
    answered_once,
    in_order,
    killed_while_its_create_is_held,
    serve,
)
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    make_workspace,
    openai_provider,
    run_cli,
)

__all__ = ["serve"]  # a fixture, used by name

LIST = "GET /v1/batches"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def cancelled_with_its_create_reset(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
    **options: object,
) -> tuple[Workspace, SlowGateway]:
    """An apply whose every create the gateway resets (never forwarded: no batch exists),
    leaving it `creating`, then `batchspec cancel`: the generation is cancelled, its create
    still not confirmed. ``options``: the provider's (``createConfirmSeconds: 0`` keeps the
    apply from waiting out the window before it gives up on its create)."""
    srv = serve()
    gw = start_slow_gateway(srv.base_url, hold={})
    gateways.append(gw)
    gw.refuse[CREATE] = 0
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(gw.v1, KEY_ENV, **options)},
        resources=(ResourceSpec("triage", count=5),),
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    code, out, err = run_cli(["cancel", "triage", str(ws.root)], capsys)
    assert code == 0, err
    assert "1 create(s) whose answer was lost not found yet" in out
    assert "every `batchspec apply` that selects triage looks them up" in out
    with ws.store() as store:
        [gen] = store.generations("triage")
        [batch] = store.batches(gen.id)
    assert (gen.status, batch.status, batch.remote_id) == ("cancelled", "creating", None)
    assert gw.forwarded[CREATE] == 0
    return ws, gw


def test_a_create_landing_after_its_cancel_is_cancelled_adopted_and_its_answers_kept(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An apply killed while a gateway holds its create; `batchspec cancel` cannot find it
    yet; the create lands and runs; the next plain `apply` (the manifest unchanged) finds it
    by its key, cancels and adopts it, and keeps what it finished (written as the cancelled
    generation's results); `apply --replace` then pays only for the requests it left."""
    srv = serve(*SLOW, "0")
    ws, gw = killed_while_its_create_is_held(
        tmp_path,
        srv,
        gateways,
        hold=4.0,
        timeout=1,
        resources=(ResourceSpec("triage", count=120),),
    )
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    assert gw.forwarded[CREATE] == 0, "the create landed before the cancel looked it up"
    with ws.store() as store:
        [batch] = store.batches(store.generations("triage")[0].id)
    assert (batch.status, batch.remote_id) == ("creating", None)
    gw.wait_until_forwarded(CREATE, 1)
    client = srv.client()
    [landed] = client.batches.list().data
    wait_for(lambda: client.batches.retrieve(landed.id).request_counts.completed >= 2)

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert client.batches.retrieve(landed.id).status in ("cancelling", "cancelled"), out
    with ws.store() as store:
        assert store.get_batch(batch.id).remote_id == landed.id
        assert store.generations("triage")[0].status == "cancelled"
        actions = [(e.action, e.batch_id) for e in store.events(resource="triage")]
    assert actions.count(("adopt", batch.id)) == 1 and actions.count(("cancel", batch.id)) == 1

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err
    [old] = received_batches(client)
    assert old.status == "cancelled" and 2 <= len(old.output_ids) < 120
    assert [r["custom_id"] for r in ws.outputs("triage")] == old.output_ids
    assert gw.forwarded[CREATE] == 1

    code, out, err = run_cli(
        ["apply", str(ws.root), "--yes", "--replace", "triage", "--wait", *FAST], capsys
    )

    assert code == 0, err
    assert gw.forwarded[CREATE] == 2
    answered_once(in_order(client, landed.id), ws)


def test_a_create_never_found_after_its_cancel_is_recorded_never_made_once(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A cancelled generation's create that never reached the provider, past its confirm
    window (`createConfirmSeconds: 0`): the next `apply` looks its key up once more and
    records it never made (`cancelled`, a `lookup` event); later applies and `plan` leave it
    alone (no lookup sent, none listed)."""
    ws, gw = cancelled_with_its_create_reset(
        tmp_path, serve, gateways, capsys, createConfirmSeconds=0
    )
    lists = gw.received[LIST]

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert "was not found by its key within its confirm window: recorded never made" in out
    assert gw.received[LIST] > lists
    with ws.store() as store:
        [gen] = store.generations("triage")
        [batch] = store.batches(gen.id)
        lookups = [e for e in store.events(resource="triage") if e.action == "lookup"]
    assert (gen.status, batch.status) == ("cancelled", "cancelled")
    assert [e.batch_id for e in lookups if e.detail.get("never_made")] == [batch.id]
    lists = gw.received[LIST]

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert gw.received[LIST] == lists
    with ws.store() as store:
        assert len([e for e in store.events(resource="triage") if e.action == "lookup"]) == len(
            lookups
        )
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["drains"] == []
    assert gw.forwarded[CREATE] == 0


def test_plan_lists_the_lookup_of_a_cancelled_generations_unconfirmed_create(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """After `batchspec cancel` left a create not confirmed, `plan` (text and `--json`)
    lists the `lookup` the next apply makes of it, as for a retired generation's, with the
    action still none (a lookup spends nothing), also when it selects `state:modified`."""
    ws, _ = cancelled_with_its_create_reset(
        tmp_path, serve, gateways, capsys, createConfirmSeconds=0
    )

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)

    assert code == 0, err
    plan = json.loads(out)
    assert plan["drains"] == [
        {
            "resource": "triage",
            "generation_id": 1,
            "retired": "cancelled",
            "remote_id": "",
            "status": "creating",
            "step": "lookup",
            "pruned": False,
        }
    ]
    assert [a["action"] for a in plan["actions"]] == ["none"]
    code, out, err = run_cli(["plan", str(ws.root), "--select", "state:modified", "--json"], capsys)
    assert code == 0, err  # a CI job applying what changed must still look it up
    assert [d["step"] for d in json.loads(out)["drains"]] == ["lookup"]
    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 0, err
    assert "triage: a create not confirmed of cancelled generation 1 (creating): lookup" in out


def test_a_shard_found_after_the_results_were_written_is_written_too(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two shards, one at a time (`maxInFlightBatches: 1`): shard 1 completes, an apply is
    killed while a gateway holds shard 2's create, `batchspec cancel` cannot find it, and the
    next apply writes shard 1's answers as the cancelled generation's results; once shard 2
    lands, the apply that finds, cancels and collects it writes its answers into the result
    files too (they kept shard 1's alone, though `status` counted both)."""
    srv = serve(*SLOW, "0")
    gw = start_slow_gateway(srv.base_url, hold={})
    gateways.append(gw)
    spec = {"limits": {"maxRequestsPerBatch": 20}}
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(gw.v1, KEY_ENV, timeout=1, maxInFlightBatches=1)},
        resources=(ResourceSpec("triage", count=60, spec=spec),),
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0  # shard 1 only
    client = srv.client()
    [first] = client.batches.list().data
    wait_for(lambda: client.batches.retrieve(first.id).status == "completed")
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0  # sees it completed
    gw.hold[CREATE] = 5.0
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes"),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: gw.received[CREATE] == 2, timeout=30)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    gw.hold.clear()
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0, err
    assert gw.forwarded[CREATE] == 1, "shard 2 landed before the results were written"
    assert "wrote 20 results" in out, out
    gw.wait_until_forwarded(CREATE, 2)
    [second] = [b for b in client.batches.list().data if b.id != first.id]
    wait_for(lambda: client.batches.retrieve(second.id).request_counts.completed >= 2)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err
    one, two = received_batches(client)
    assert two.status == "cancelled" and 2 <= len(two.output_ids) < 20
    written = [r["custom_id"] for r in ws.outputs("triage")]
    assert written == [i for i in ws.input_ids("triage") if i in {*one.output_ids, *two.output_ids}]
    code, out, err = run_cli(["status", str(ws.root), "--json"], capsys)
    [status] = json.loads(out)["resources"]
    assert (status["sync"], status["succeeded"]) == ("Synced", len(written))
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert [a["action"] for a in json.loads(out)["actions"]] == ["none"]


def test_cancel_again_and_plan_say_the_create_not_found_is_still_looked_up(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """While a cancelled generation's create is not confirmed (within its window), a second
    `batchspec cancel` counts it in `unconfirmed_creates` and says every apply looks it up
    (not that a batch is stopping and apply collects it), and plan's reason for the resource
    (text and `--json`, which status shows) says so too."""
    ws, _ = cancelled_with_its_create_reset(
        tmp_path, serve, gateways, capsys, createConfirmSeconds=0
    )
    project = yaml.safe_load((ws.root / "batchspec.yaml").read_text())
    project["providers"]["srv"]["options"]["createConfirmSeconds"] = 600  # still unsure
    (ws.root / "batchspec.yaml").write_text(yaml.safe_dump(project, sort_keys=False))

    code, out, err = run_cli(["cancel", "triage", str(ws.root), "--json"], capsys)

    assert code == 0, err
    assert json.loads(out) == {
        "resource": "triage",
        "cancelled_batches": 0,
        "stopping_batches": 0,
        "unconfirmed_creates": 1,
        "ended_batches": 0,
    }
    code, out, err = run_cli(["cancel", "triage", str(ws.root)], capsys)
    assert code == 0, err
    assert out.startswith("triage is already cancelled: 1 create(s) whose answer was lost"), out
    assert "every `batchspec apply` that selects triage looks them up" in out
    assert "still stopping" not in out
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    [action] = json.loads(out)["actions"]
    assert action["action"] == "none"
    assert "a create whose answer was lost is looked up by every apply" in action["reason"]
    code, out, err = run_cli(["status", str(ws.root), "--json"], capsys)
    [status] = json.loads(out)["resources"]
    assert status["reason"] == action["reason"]
