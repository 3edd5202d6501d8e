"""`batchspec import`, `batchspec forget`, `apply --prune` and `suspend: true`.

Everything runs against the engine's OpenAI API over loopback behind a `RequestProbe`, so
"does not touch the provider" is counted at the server. Batches made "outside batchspec"
are made with the official openai SDK.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from probes import ProbedServer
from servers import jsonl_bytes, request_lines, wait_for, wait_for_batch
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    json_lines,
    local_provider,
    make_workspace,
    run_cli,
    served,
    write_manifest,
)

from batchspec.core.apply import declared_elsewhere
from batchspec.engine import BuiltinUpstream
from batchspec.providers.local import LocalProvider
from batchspec.state import runinfo
from batchspec.state.runinfo import RunInfo
from batchspec.state.store import StateStore

FAST = ["--poll-interval", "0.05"]
SLOW = {"upstream": BuiltinUpstream(latency=5.0), "drain_timeout": 0.1}  # batches stay in flight


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def remote_batch(srv: ProbedServer, content: bytes) -> tuple[str, str]:
    """Upload ``content`` and create a chat batch from it with the SDK: (batch id, file id)."""
    client = srv.client()
    uploaded = client.files.create(file=("input.jsonl", content), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id, uploaded.id


def ledger(ws: Workspace, name: str) -> list[tuple[Any, ...]]:
    with ws.store() as store:
        [gen] = [g for g in store.generations(name)]
        return [
            tuple(r)
            for r in store.db.execute(
                "select custom_id, line, shard, bytes, request_sha, state from requests "
                "where generation_id = ? order by line",
                [gen.id],
            ).fetchall()
        ]


def set_spec(ws: Workspace, name: str, **spec: Any) -> None:
    path = ws.manifest_path(name)
    doc = yaml.safe_load(path.read_text())
    doc["spec"].update(spec)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# import


def test_import_adopts_a_remote_batch_and_apply_collects_it(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch made with the SDK from the resource's very input is imported (verified by
    sha256): generation, shard-0 attempt-1 batch row, ledger rows as the reconciler writes
    them, an import event. apply then collects it and creates nothing itself."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    batch_id, file_id = remote_batch(srv, ws.input_path("triage").read_bytes())

    code, out, err = run_cli(["import", "triage", batch_id, str(ws.root), "--json"], capsys)

    assert code == 0, err
    result = json.loads(out)
    assert (result["remote_id"], result["requests"], result["verified"]) == (batch_id, 3, True)
    with ws.store() as store:
        [gen] = store.generations("triage")
        [batch] = store.batches(gen.id)
        events = [e for e in store.events(resource="triage") if e.action == "import"]
        assert store.get_resource("triage").current_generation_id == gen.id
    assert gen.status == "in_progress"
    assert (batch.remote_id, batch.shard, batch.attempt, batch.requests) == (batch_id, 0, 1, 3)
    assert batch.input_file_id == file_id
    assert events[0].detail["verified"] is True
    assert srv.probe.counts["GET /files/{id}/content"] == 1

    wait_for_batch(srv.client(), batch_id)
    code, out, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)

    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
    assert srv.probe.counts["POST /batches"] == 1  # the SDK's; batchspec created none
    assert srv.probe.counts["POST /files"] == 1

    # The ledger rows match what the reconciler records for the same input by itself.
    other = served(tmp_path / "other", srv)
    other.input_path("triage").write_bytes(ws.input_path("triage").read_bytes())
    assert run_cli(["apply", str(other.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    assert ledger(ws, "triage") == ledger(other, "triage")


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        pytest.param(request_lines(3, prefix="other"), "made from a different input", id="content"),
        pytest.param(request_lines(2), "holds 2 requests", id="count"),
    ],
)
def test_import_refuses_a_batch_of_another_input_even_with_force(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    lines: list[dict[str, Any]],
    needle: str,
) -> None:
    """A remote batch whose input is not the resource's is refused; nothing is recorded."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    batch_id, _ = remote_batch(srv, jsonl_bytes(lines))
    wait_for(lambda: srv.client().batches.retrieve(batch_id).request_counts.total)

    code, out, err = run_cli(["import", "triage", batch_id, str(ws.root), "--force"], capsys)

    assert code == 1
    assert needle in err
    assert "nothing was imported" in err
    with ws.store() as store:
        assert store.list_resources() == []


def test_import_of_a_resource_whose_input_is_invalid_imports_nothing(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A resource whose own input has a bad line is refused before the batch is read: the
    error says nothing was imported (it uploads nothing in any case), nothing is recorded."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    batch_id, _ = remote_batch(srv, ws.input_path("triage").read_bytes())
    with ws.input_path("triage").open("a") as f:
        f.write("{not json\n")

    code, out, err = run_cli(["import", "triage", batch_id, str(ws.root)], capsys)

    assert code == 1
    assert "problem(s) in the input of triage; nothing was imported" in err
    assert "uploaded" not in err
    with ws.store() as store:
        assert store.list_resources() == []


def test_import_of_an_unverifiable_batch_needs_force(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """When the provider cannot give the input file back, import refuses without --force
    and records an unverified import with it."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    batch_id, file_id = remote_batch(srv, ws.input_path("triage").read_bytes())
    wait_for_batch(srv.client(), batch_id)
    srv.client().files.delete(file_id)

    code, out, err = run_cli(["import", "triage", batch_id, str(ws.root)], capsys)
    assert code == 1
    assert "could not be downloaded" in err
    assert "--force" in err
    with ws.store() as store:
        assert store.list_resources() == []

    code, out, err = run_cli(["import", "triage", batch_id, str(ws.root), "--force"], capsys)
    assert code == 0, err
    assert "NOT verified" in out
    with ws.store() as store:
        [event] = [e for e in store.events(resource="triage") if e.action == "import"]
    assert event.detail["verified"] is False


def test_import_refuses_an_input_of_several_shards(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """An input the limits split into shards cannot be one imported batch."""
    srv = server()
    spec = {"limits": {"maxRequestsPerBatch": 2}}
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3, spec=spec))
    batch_id, _ = remote_batch(srv, ws.input_path("triage").read_bytes())
    before = dict(srv.probe.counts)

    code, out, err = run_cli(["import", "triage", batch_id, str(ws.root)], capsys)

    assert code == 1
    assert "split into 2 shards by its manifest's spec.limits (at most 2 requests" in err
    assert "or raise spec.limits" in err  # the manifest's limits, not the provider's, split it
    assert dict(srv.probe.counts) == before  # refused before any provider call


def test_import_refuses_what_is_already_tracked(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Importing twice, or into a resource apply already submitted, is refused."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage"), ResourceSpec("other"))
    batch_id, _ = remote_batch(srv, ws.input_path("triage").read_bytes())
    assert run_cli(["import", "triage", batch_id, str(ws.root)], capsys)[0] == 0

    code, out, err = run_cli(["import", "triage", batch_id, str(ws.root)], capsys)
    assert code == 1
    assert f"batch {batch_id} is already tracked (resource triage" in err

    assert run_cli(["apply", str(ws.root), "-s", "other", "--yes"], capsys)[0] == 0
    second, _ = remote_batch(srv, ws.input_path("other").read_bytes())
    code, out, err = run_cli(["import", "other", second, str(ws.root)], capsys)
    assert code == 1
    assert "other already has generation" in err


def test_import_refuses_a_batch_tracked_under_another_name_of_its_provider(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Two provider names for one server: a batch `triage` tracks through `srv` is refused
    for `copy` through `alias` (else both would collect it and its spend count twice), and
    nothing is recorded for `copy`."""
    srv = server()
    ws = make_workspace(
        tmp_path / "ws",
        providers={
            "srv": {"type": "openai", "baseUrl": srv.v1, "apiKeyEnv": KEY_ENV},
            "alias": {"type": "openai", "baseUrl": srv.v1 + "/", "apiKeyEnv": KEY_ENV},
        },
        resources=[ResourceSpec("triage"), ResourceSpec("copy", provider="alias")],
    )
    ws.input_path("copy").write_bytes(ws.input_path("triage").read_bytes())
    batch_id, _ = remote_batch(srv, ws.input_path("triage").read_bytes())
    assert run_cli(["import", "triage", batch_id, str(ws.root)], capsys)[0] == 0

    code, out, err = run_cli(["import", "copy", batch_id, str(ws.root)], capsys)

    assert code == 1
    assert f"batch {batch_id} is already tracked (resource triage" in err
    with ws.store() as store:
        assert store.generations("copy") == []


def test_two_names_of_a_provider_on_its_default_url_are_one_service() -> None:
    """Providers without a baseUrl (Gemini, Mistral, Groq, Together: their adapter's default)
    reach the same service when their types match, and so does one naming that default: an
    import through one is refused for a batch the other tracks. Another type, or another
    URL, is another service."""
    from types import SimpleNamespace

    from batchspec.core.lifecycle import same_service
    from batchspec.workspace.project import ProviderConfig

    def config(name: str, type_: str, url: str | None = None) -> ProviderConfig:
        return ProviderConfig(name, type_, url, "KEY", {})

    providers = {
        "g1": config("g1", "gemini"),
        "g2": config("g2", "gemini"),
        "m": config("m", "mistral"),
        "g3": config("g3", "gemini", "http://127.0.0.1:9/v1beta"),
        "q1": config("q1", "groq"),
        "q2": config("q2", "groq", "https://api.groq.com/openai/v1/"),  # its default, named
    }
    res: Any = SimpleNamespace(provider="g1")
    assert same_service(providers, res) == ["g1", "g2"]
    assert same_service(providers, SimpleNamespace(provider="q1")) == ["q1", "q2"]


def test_import_refusal_names_the_current_replacement(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """After `apply --replace`, import's refusal names the replacement, not the first generation."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage"))
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    replace = ["apply", str(ws.root), "--yes", "--wait", "--replace", "triage", "--no-reuse"]
    assert run_cli([*replace, *FAST], capsys)[0] == 0
    with ws.store() as store:
        first, current = store.generations("triage")
    batch_id, _ = remote_batch(srv, ws.input_path("triage").read_bytes())

    code, out, err = run_cli(["import", "triage", batch_id, str(ws.root)], capsys)

    assert code == 1
    assert f"triage already has generation {current.id} for its current spec" in err
    assert f"generation {first.id} " not in err


# ---------------------------------------------------------------------------------------------
# forget


def test_forget_stops_tracking_without_touching_the_provider(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """forget on an in-flight resource sends nothing to the provider, names the batch left
    running, records a forget event; plan then shows what apply would really do (pick the
    recorded generation up again: refresh, nothing to submit)."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    with ws.store() as store:
        [batch] = store.batches()
    before = dict(srv.probe.counts)

    code, out, err = run_cli(["forget", "triage", str(ws.root)], capsys)

    assert code == 0, err
    assert dict(srv.probe.counts) == before
    assert batch.remote_id in out
    assert "keep running at the provider" in out
    assert "the next apply tracks triage again" in out
    with ws.store() as store:
        assert store.get_resource("triage").forgotten_at is not None
        assert store.list_resources() == []
        [event] = [e for e in store.events(resource="triage") if e.action == "forget"]
    assert event.detail["left_running"] == [batch.remote_id]
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    [action] = json.loads(out)["actions"]
    assert (action["action"], action["requests"]) == ("refresh", 0)


def test_forget_keeps_the_result_files(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Forgetting a finished resource leaves its results and errors files as they are."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    results = ws.output_path("triage").read_bytes()

    code, out, err = run_cli(["forget", "triage", str(ws.root), "--json"], capsys)

    assert code == 0, err
    assert json.loads(out) == {
        "name": "triage",
        "run_id": json.loads(out)["run_id"],
        "left_running": [],
        "in_manifests": True,
    }
    assert ws.output_path("triage").read_bytes() == results


def test_plan_after_forget_says_apply_tracks_it_again(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A forgotten resource whose manifest is here: status says OutOfSync, and plan (and
    status's reason) says why (apply tracks it again), not a bare "in sync"; its health is
    its recorded generation's (Healthy, 3/3), not Missing as if nothing were recorded."""
    ws = served(tmp_path / "ws", server())
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    assert run_cli(["forget", "triage", str(ws.root)], capsys)[0] == 0
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert code == 0 and "= triage: none (in sync: 3 succeeded; forgotten: apply tracks" in out
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    [st] = json.loads(out)["resources"]
    assert st["sync"] == "OutOfSync" and "forgotten: apply tracks it again" in st["reason"]
    assert (st["health"], st["succeeded"]) == ("Healthy", 3)


def test_forget_of_an_untracked_resource_fails(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """forget NAME for a name the state does not track exits 1 and says so."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    with ws.store():  # a state that tracks nothing (where none exists: no state database)
        pass
    code, out, err = run_cli(["forget", "nobody", str(ws.root)], capsys)
    assert code == 1
    assert "no resource named 'nobody' is tracked" in err


# ---------------------------------------------------------------------------------------------
# prune


def test_orphans_are_shown_and_left_alone_until_apply_prune(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A resource whose manifest is gone is `orphaned` in plan (no change for
    --detailed-exitcode) and untouched by apply; `plan --prune` shows prune and `apply
    --prune` cancels its in-flight batch at the provider and forgets it, in one line (the
    prune's, not a cancel line as well)."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv, ResourceSpec("keep", count=1), ResourceSpec("gone"))
    assert run_cli(["apply", str(ws.root), "--yes", "-s", "gone"], capsys)[0] == 0
    ws.manifest_path("gone").unlink()

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    actions = {a["resource"]: a["action"] for a in json.loads(out)["actions"]}
    assert actions == {"keep": "create", "gone": "orphaned"}
    code, out, err = run_cli(["plan", str(ws.root), "-s", "keep", "--prune", "--json"], capsys)
    assert [a["resource"] for a in json.loads(out)["actions"]] == ["keep"]
    code, out, err = run_cli(["plan", str(ws.root), "--prune"], capsys)
    assert "gone: prune" in out

    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert run_cli(["apply", str(ws.root), "--yes", "-s", "keep", "--prune"], capsys)[0] == 0
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 0  # --select did not pick it
    with ws.store() as store:
        assert store.get_resource("gone").forgotten_at is None

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)

    assert code == 0, err
    assert [
        line.strip() for line in out.splitlines() if "[gone]" in line and "cancel sent" in line
    ] == ["[gone] pruned: manifest gone, cancel sent to 1 batch(es), no longer tracked"]
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 1
    with ws.store() as store:
        assert [r.name for r in store.list_resources()] == ["keep"]
        actions = [e.action for e in store.events(resource="gone")]
        cancelled = actions.index("cancel")
        assert actions[cancelled : cancelled + 2] == ["cancel", "prune"]
        assert set(actions[cancelled + 2 :]) <= {"poll", "collect"}  # drained as it stops
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert "gone" not in {a["resource"] for a in json.loads(out)["actions"]}


def test_prune_of_a_batch_that_ended_since_the_last_poll_forgets_it_without_failing(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """An orphan's batch that completed at the provider after batchspec last looked (its
    cancel answers 409 batch_not_cancellable) is recorded as ended and pruned: exit 0, no
    retries of the refused cancel, the resource forgotten, and its line says there was
    nothing to cancel (not "cancel sent to 0 batch(es)")."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("keep", count=1), ResourceSpec("gone"))
    assert run_cli(["apply", str(ws.root), "--yes", "-s", "gone"], capsys)[0] == 0
    with ws.store() as store:
        [batch] = store.batches()
    assert batch.status not in ("completed", "failed", "expired", "cancelled")
    assert wait_for_batch(srv.client(), batch.remote_id).status == "completed"
    ws.manifest_path("gone").unlink()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "-s", "gone", "--prune"], capsys)

    assert code == 0, err
    assert [line.strip() for line in out.splitlines() if "[gone] pruned" in line] == [
        "[gone] pruned: manifest gone, nothing to cancel (its batches had ended), no longer tracked"
    ]
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 1
    with ws.store() as store:
        assert store.get_resource("gone").forgotten_at is not None
        [batch] = store.batches()
        assert batch.status == "completed"


def test_prune_and_cancel_on_the_local_provider_of_batches_that_ended_meanwhile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the `local` provider, whose batches run on while any command holds the engine, a
    batch that completed after the last poll neither fails `batchspec cancel` nor blocks
    `apply --prune` forever: both exit 0 and record the batch as it ended."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"local": local_provider()},
        resources=[ResourceSpec("keep", provider="local"), ResourceSpec("gone", provider="local")],
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    with LocalProvider("local", ws.root / "state" / "local", poll_interval=0.02) as engine:
        with ws.store() as store:
            ids = [b.remote_id for b in store.batches()]
        assert all(wait_for(lambda i=i: engine.get_batch(i).is_terminal) for i in ids)

    code, out, err = run_cli(["cancel", "keep", str(ws.root)], capsys)
    assert code == 0, err
    ws.manifest_path("gone").unlink()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)

    assert code == 0, err
    assert "[gone] pruned" in out
    with ws.store() as store:
        assert store.get_resource("gone").forgotten_at is not None
        assert {b.status for b in store.batches()} == {"completed"}


# ---------------------------------------------------------------------------------------------
# suspend


def test_a_suspended_resource_keeps_its_batches_in_flight_untouched(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """suspend: true makes apply neither poll nor cancel the resource's in-flight batch, and
    status reports it Suspended; unsuspending resumes polling."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    set_spec(ws, "triage", suspend=True)
    before = dict(srv.probe.counts)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err
    assert dict(srv.probe.counts) == before  # no poll, no cancel, nothing
    code, out, err = run_cli(["status", str(ws.root), "--json"], capsys)
    [status] = json.loads(out)["resources"]
    assert (status["health"], status["generation_status"]) == ("Suspended", "in_progress")
    assert status["batches"][0]["status"] not in ("cancelled", "cancelling")
    code, out, err = run_cli(["status", str(ws.root)], capsys)
    assert "triage: Synced, Suspended" in out

    set_spec(ws, "triage", suspend=False)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert srv.probe.counts["GET /batches/{id}"] == before.get("GET /batches/{id}", 0) + 1


def test_apply_tracks_a_forgotten_resource_again_without_resubmitting(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """After forget, apply with the manifest still present un-forgets the resource, records a
    track event and collects the batch already running: no second create at the provider."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert run_cli(["forget", "triage", str(ws.root)], capsys)[0] == 0

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err
    assert srv.probe.counts["POST /batches"] == 1
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
    with ws.store() as store:
        assert store.get_resource("triage").forgotten_at is None
        assert [e.action for e in store.events(resource="triage")].count("track") == 1


def _lose_the_create_answer(ws: Workspace) -> None:
    """Put the state where a run that died after its create reached the provider left it:
    the batch row is ``creating`` and has no remote id (the answer was never recorded)."""
    with ws.store() as store:
        store.db.execute("update batches set remote_id = null, status = 'creating'")


def test_cancel_finds_and_cancels_a_batch_whose_create_was_never_confirmed(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """cancel adopts the remote batch of an unconfirmed create (by its metadata key) and
    cancels it: a batch that is paid for is never left running unseen."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [remote] = srv.client().batches.list().data
    _lose_the_create_answer(ws)

    code, out, err = run_cli(["cancel", "triage", str(ws.root)], capsys)

    assert code == 0, err
    assert srv.client().batches.retrieve(remote.id).status in ("cancelling", "cancelled")
    with ws.store() as store:
        [batch] = store.batches()
        assert batch.remote_id == remote.id
        assert "adopt" in [e.action for e in store.events(resource="triage")]


def test_cancel_abandons_an_intent_that_never_reached_the_provider(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """An intent whose create never landed is marked cancelled, and no later apply submits it."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    with ws.store() as store:  # a second, never-sent intent beside the real batch
        [gen] = store.generations("triage")
        store.record_batch_intent(
            gen.id,
            shard=1,
            attempt=1,
            provider="srv",
            key=f"triage/{gen.spec_hash}/1/1",
            input_sha256=gen.input_sha256,
            requests=1,
            reason="test",
        )
    creates = srv.probe.counts["POST /batches"]

    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0

    assert srv.probe.counts["POST /batches"] == creates
    with ws.store() as store:
        assert {b.status for b in store.batches() if b.remote_id is None} == {"cancelled"}


def git(root: Path, *args: str, at: int | None = None) -> str:
    """Run git in ``root``; ``at``: the author and committer time (epoch seconds) of a commit."""
    author = ["-c", "user.name=T", "-c", "user.email=t@example.invalid"]
    dated = (
        {}
        if at is None
        else {"GIT_AUTHOR_DATE": f"@{at} +0000", "GIT_COMMITTER_DATE": f"@{at} +0000"}
    )
    return subprocess.run(
        ["git", *author, *args],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **dated},
    ).stdout.strip()


T0 = 1_767_225_600  # 2026-01-01: commits made an hour apart from here (``git(..., at=)``)
HOUR = 3600


def committed_workspace(root: Path, srv: ProbedServer, *, at: int = T0) -> Workspace:
    """A workspace declaring `keep`, committed on `main` at ``at`` (results, state ignored)."""
    ws = served(root, srv, ResourceSpec("keep", count=1))
    (ws.root / ".gitignore").write_text("state/\nresults/\n")
    git(ws.root, "init", "-q", "-b", "main")
    git(ws.root, "add", "-A")
    git(ws.root, "commit", "-qm", "C1", at=at)
    return ws


def commit_added(ws: Workspace, *, at: int) -> str:
    """Commit a manifest for `added` at ``at``; its sha."""
    ws.write_input("added", request_lines(1, prefix="add"))
    write_manifest(ws, ResourceSpec("added", count=1))
    git(ws.root, "add", "-A")
    git(ws.root, "commit", "-qm", "adds `added`", at=at)
    return git(ws.root, "rev-parse", "HEAD")


def shallow_clone(ws: Workspace, branch: str, into: Path) -> Path:
    """A depth-1 clone of ``branch`` (as CI checks out), holding no other commit."""
    url = ws.root.resolve().as_uri()
    git(into.parent, "clone", "-q", "--depth", "1", "-b", branch, url, into.name)
    return into


def pruning(out: str, name: str) -> tuple[str, str | None]:
    """``plan --json``'s action for ``name``, and the commit it names as declaring it."""
    [action] = [a for a in json.loads(out)["actions"] if a["resource"] == name]
    return action["action"], action.get("declared_by")


def test_prune_from_an_older_commit_leaves_alone_what_a_newer_commit_added(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runners share one state: one on commit C2 applies `added`, which C2 adds; one
    still on C1 (no `added`) runs `apply --prune`: `added` is left alone (no cancel, still
    tracked), plan and apply saying so and naming C2 (`declared_by`, a warning, a
    `prune-held` event). Naming it (`--select added`) prunes it anyway, and a checkout that
    descends from C2 and deletes it prunes it as before."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv, ResourceSpec("keep", count=1))
    (ws.root / ".gitignore").write_text("state/\nresults/\n")
    git(ws.root, "init", "-q", "-b", "main")
    git(ws.root, "add", "-A")
    git(ws.root, "commit", "-qm", "C1")
    c1 = git(ws.root, "rev-parse", "HEAD")
    ws.write_input("added", request_lines(1, prefix="add"))
    write_manifest(ws, ResourceSpec("added", count=1))
    git(ws.root, "add", "-A")
    git(ws.root, "commit", "-qm", "C2 adds a resource")
    c2 = git(ws.root, "rev-parse", "HEAD")
    assert run_cli(["apply", str(ws.root), "--yes", "-s", "added"], capsys)[0] == 0

    git(ws.root, "checkout", "-q", c1)  # the runner on the older commit
    assert not ws.manifest_path("added").exists()
    code, out, err = run_cli(["plan", str(ws.root), "--prune", "--json"], capsys)
    [held] = [a for a in json.loads(out)["actions"] if a["resource"] == "added"]
    assert (held["action"], held["declared_by"]) == ("orphaned", c2)
    assert c2[:12] in held["reason"] and "--select added" in held["reason"]
    code, out, err = run_cli(["plan", str(ws.root)], capsys)  # no --prune: its hint agrees
    assert f"commit {c2[:12]}, newer than this checkout's, declared it: `apply --prune` " in out
    assert "leaves it alone" in out and "cancels and forgets" not in out
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune", "--json"], capsys)

    assert code == 0, err
    warned = [e for e in json_lines(out) if e["event"] == "warning" and e["resource"] == "added"]
    assert [e["declared_by"] for e in warned] == [c2]
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 0
    with ws.store() as store:
        assert store.get_resource("added").forgotten_at is None
        [event] = store.events(resource="added", action="prune-held")
        assert event.detail == {"commit": c2}
    code, out, _ = run_cli(["plan", str(ws.root), "--prune", "-s", "added", "--json"], capsys)
    assert [a["action"] for a in json.loads(out)["actions"]] == ["prune"]

    git(ws.root, "checkout", "-q", "main")
    git(ws.root, "rm", "-q", str(ws.manifest_path("added")))
    git(ws.root, "commit", "-qm", "C3 deletes it")
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)
    assert code == 0, err
    assert "[added] pruned" in out
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 1


def test_a_shallow_clone_behind_holds_what_a_newer_commit_added_unless_times_are_unknown(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A depth-1 clone of C1 holds no C2, which added `added` an hour later and applied it:
    `plan --prune` holds it, by the commit time C2's run recorded. A state whose runs
    recorded no commit time (made before it was recorded) cannot tell: it prunes as before."""
    ws = committed_workspace(tmp_path / "ws", server(**SLOW))
    git(ws.root, "branch", "old")
    c2 = commit_added(ws, at=T0 + HOUR)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    clone = shallow_clone(ws, "old", tmp_path / "ci")
    plan = ["plan", str(clone), "--state", str(ws.state_path), "--prune", "--json"]

    code, out, err = run_cli(plan, capsys)
    assert code == 0, err
    assert pruning(out, "added") == ("orphaned", c2)
    with ws.store() as store:
        assert store.last_declared_at("added") == (c2, T0 + HOUR)
        store.db.execute("UPDATE runs SET git_commit_time = NULL")
    code, out, err = run_cli(plan, capsys)
    assert code == 0, err
    assert pruning(out, "added") == ("prune", None)


def test_a_shallow_clone_of_a_newer_commit_prunes_what_it_deleted(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """C2 added `added` and applied it; C3, an hour later, deletes it. CI's depth-1 clone of
    C3 holds no C2, yet C2 is older: `apply --prune` there cancels and forgets `added`."""
    srv = server(**SLOW)
    ws = committed_workspace(tmp_path / "ws", srv)
    commit_added(ws, at=T0 + HOUR)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    git(ws.root, "rm", "-q", str(ws.manifest_path("added")))
    git(ws.root, "commit", "-qm", "C3 deletes it", at=T0 + 2 * HOUR)
    clone = shallow_clone(ws, "main", tmp_path / "ci")

    argv = ["apply", str(clone), "--state", str(ws.state_path), "--yes", "--prune"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "[added] pruned" in out
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 1


def test_a_squash_merged_branch_prunes_what_main_deleted_later(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`added` is applied from a pull request's commit P, then squash-merged into main as M
    (not a descendant of P) and in sync there, so P stays its last declaring commit. A later
    commit of main deletes it: `apply --prune` prunes it (P is older, not newer)."""
    ws = committed_workspace(tmp_path / "ws", server())
    git(ws.root, "checkout", "-q", "-b", "pr")
    p = commit_added(ws, at=T0 + HOUR)
    apply = ["apply", str(ws.root), "--yes", "--prune", "--wait", *FAST]
    assert run_cli(apply, capsys)[0] == 0
    git(ws.root, "checkout", "-q", "main")
    git(ws.root, "merge", "-q", "--squash", "pr")
    git(ws.root, "commit", "-qm", "M: squash-merged", at=T0 + 2 * HOUR)
    assert run_cli(apply, capsys)[0] == 0
    with ws.store() as store:
        assert store.last_declared_at("added") == (p, T0 + HOUR)
    git(ws.root, "rm", "-q", str(ws.manifest_path("added")))
    git(ws.root, "commit", "-qm", "deletes it", at=T0 + 3 * HOUR)

    code, out, err = run_cli(apply, capsys)
    assert code == 0, err
    assert "[added] pruned" in out
    with ws.store() as store:
        assert store.get_resource("added").forgotten_at is not None


def test_prune_holds_what_a_newer_commit_declared_asking_git_once_per_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``declared_elsewhere``'s table, HEAD at B (time T0+2h): a commit HEAD contains is
    pruned; one descending from HEAD is held whatever its time; one apart (another branch, or
    absent from the repository) is held only when its recorded time is later than HEAD's.
    Git runs once for HEAD, then once per distinct other commit."""
    repo = tmp_path / "repo"
    repo.mkdir()

    def commit(message: str, at: int) -> str:
        git(repo, "commit", "-q", "--allow-empty", "-m", message, at=at)
        return git(repo, "rev-parse", "HEAD")

    git(repo, "init", "-q", "-b", "main")
    a = commit("A", T0)
    b = commit("B", T0 + 2 * HOUR)
    git(repo, "checkout", "-q", "-b", "ahead")
    ahead = commit("ahead of B, with a clock behind", T0)
    git(repo, "checkout", "-q", "-b", "side", a)
    side_older, side_newer = commit("S1", T0 + HOUR), commit("S2", T0 + 3 * HOUR)
    git(repo, "checkout", "-q", "main")
    declared: dict[str, tuple[str, int | None]] = {
        "head": (b, T0 + 2 * HOUR),
        "ancestor": (a, T0),
        "ahead": (ahead, T0),
        "side-older": (side_older, T0 + HOUR),
        "side-newer": (side_newer, T0 + 3 * HOUR),
        "absent-newer": ("f" * 40, T0 + 3 * HOUR),
        "absent-newer-too": ("f" * 40, T0 + 3 * HOUR),
        "absent-older": ("e" * 40, T0 + HOUR),
        "absent-untimed": ("d" * 40, None),
        "untracked-by-git": ("--all", T0 + 3 * HOUR),  # an edited row: never an option to git
    }
    with StateStore.open(tmp_path / "state.db") as store:
        for name, (sha, when) in declared.items():
            info = RunInfo("t", "h", 1, sha, "main", False, None, None, "0", git_commit_time=when)
            store.record_event(store.start_run("apply", {}, info), "create", resource=name)
        calls: list[tuple[str, ...]] = []
        real = runinfo._git_run

        def counted(cwd: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
            calls.append(args)
            return real(cwd, *args)

        monkeypatch.setattr(runinfo, "_git_run", counted)
        held = declared_elsewhere(store, repo, list(declared))

    assert held == {
        "ahead": ahead,
        "side-newer": side_newer,
        "absent-newer": "f" * 40,
        "absent-newer-too": "f" * 40,
        "untracked-by-git": "--all",
    }
    assert len(calls) == 1 + 7  # HEAD, then A, ahead, 2 sides, f…, e…, d… (not B, not --all)


def test_prune_with_paths_never_cancels_resources_whose_manifests_exist(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --prune PATHS` treats as gone only what the whole workspace no longer
    declares: a resource outside PATHS whose manifest is there is neither pruned nor
    cancelled (nor shown as orphaned by plan)."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv, ResourceSpec("hello"), ResourceSpec("other"))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    other = str(ws.manifest_path("other"))

    code, out, _ = run_cli(["plan", other, "--prune", "--json"], capsys)
    assert [a["resource"] for a in json.loads(out)["actions"]] == ["other"]
    code, out, err = run_cli(["apply", other, "--prune", "--yes"], capsys)

    assert code == 0, err
    assert "prune" not in out
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 0
    with ws.store() as store:
        assert [r.name for r in store.list_resources()] == ["hello", "other"]
        assert not [e for e in store.events() if e.action in ("cancel", "prune")]


def test_prune_never_cancels_a_resource_whose_manifest_lost_its_header_lines(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest that lost its `apiVersion`/`kind` lines (metadata and spec still there) is
    reported, not skipped as a foreign YAML file: `apply --prune` refuses instead of
    cancelling its in-flight batches as if the manifest were gone."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv, ResourceSpec("hello"), ResourceSpec("other"))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    path = ws.manifest_path("other")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(x for x in lines if not x.startswith(("apiVersion", "kind"))))

    code, out, err = run_cli(["apply", str(ws.root), "--prune", "--yes"], capsys)

    assert code != 0 and "other.yaml" in err, out
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 0
    with ws.store() as store:
        assert [r.name for r in store.list_resources()] == ["hello", "other"]


def test_prune_with_select_prunes_only_the_selected_orphans(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --prune --select NAME` cancels and forgets that orphan only."""
    srv = server(**SLOW)
    specs = [ResourceSpec("keep", count=1), ResourceSpec("gone-a"), ResourceSpec("gone-b")]
    ws = served(tmp_path / "ws", srv, *specs)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    ws.manifest_path("gone-a").unlink()
    ws.manifest_path("gone-b").unlink()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune", "-s", "gone-a"], capsys)

    assert code == 0, err
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 1
    with ws.store() as store:
        assert [r.name for r in store.list_resources()] == ["gone-b", "keep"]
        assert [e.resource for e in store.events() if e.action == "prune"] == ["gone-a"]


def test_a_prune_on_a_paid_provider_with_nothing_in_flight_needs_no_consent(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Pruning an orphan whose batches have all ended cancels nothing, so it needs no --yes
    (it refused, saying it "would cancel and forget" a resource with nothing to cancel)."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("keep", count=1), ResourceSpec("gone"))
    assert run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)[0] == 0
    ws.manifest_path("gone").unlink()

    code, out, err = run_cli(["apply", str(ws.root), "--prune"], capsys)

    assert code == 0, out + err
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 0
    with ws.store() as store:
        assert store.get_resource("gone").forgotten_at is not None


def test_prune_on_a_paid_provider_needs_consent(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Cancelling a paid provider's batches by --prune needs --yes (or a terminal) as
    creating does: without it apply exits 1 and cancels nothing."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv, ResourceSpec("keep", count=1), ResourceSpec("gone"))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    ws.manifest_path("gone").unlink()

    code, out, err = run_cli(["apply", str(ws.root), "--prune"], capsys)

    assert code == 1
    assert "cancel and forget gone" in err and "--yes" in err
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 0
    with ws.store() as store:
        assert store.get_resource("gone").forgotten_at is None
