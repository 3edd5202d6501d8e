"""`batchspec apply` end to end against the engine's OpenAI API over loopback.

The project's provider is `type: openai` with `baseUrl` pointing at a server on 127.0.0.1
that requires an API key (a sentinel read from `apiKeyEnv`). Most tests serve the engine in
a thread behind a `RequestProbe` (tests/probes.py) so they can count uploads and creates as
the server saw them; one runs a real `batchspec serve --api-key-env` process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from probes import ProbedServer, start_probed_server, start_serve_process
from servers import request_lines
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    make_workspace,
    openai_provider,
    run_cli,
)

from batchspec.engine.upstreams import BuiltinUpstream

FAST = ["--poll-interval", "0.05"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., ProbedServer]]:
    """Start probed engine servers (sentinel key required by default); stopped at teardown."""
    started: list[ProbedServer] = []

    def start(**options: Any) -> ProbedServer:
        options.setdefault("api_key", SENTINEL_KEY)
        srv = start_probed_server(tmp_path / f"engine{len(started)}", **options)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    return SENTINEL_KEY


def served(root: Path, srv: Any, *resources: ResourceSpec) -> Workspace:
    return make_workspace(
        root,
        providers={"srv": openai_provider(srv.v1, KEY_ENV)},
        resources=resources or (ResourceSpec("triage", count=4),),
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shuffled_input(ws: Workspace, name: str) -> list[str]:
    """An input whose custom_ids are not in sorted order, with one request the upstream
    rejects (empty messages: a final 400). Returns the custom_ids in input order."""
    lines = request_lines(6, prefix="q")
    ids = ["zulu", "alpha", "mike", "bravo", "yankee", "charlie"]
    for line, cid in zip(lines, ids, strict=True):
        line["custom_id"] = cid
    lines[3]["body"]["messages"] = []  # "bravo" fails for good
    ws.write_input(name, lines)
    return ids


def test_apply_wait_writes_results_in_input_order(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Output and errors files hold one line per custom_id in input order, answered lines in
    output and the rejected one in errors; their sha256 is what the state records."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    ids = shuffled_input(ws, "triage")

    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    outputs, errors = ws.outputs("triage"), ws.errors("triage")
    assert [r["custom_id"] for r in outputs] == [i for i in ids if i != "bravo"]
    assert [r["custom_id"] for r in errors] == ["bravo"]
    assert all(r["response"]["status_code"] == 200 for r in outputs)
    assert errors[0]["response"]["status_code"] == 400
    assert "results/triage.jsonl" in out
    with ws.store() as store:
        [gen] = store.generations("triage")
        assert gen.status == "complete"
        assert (gen.succeeded, gen.failed) == (5, 1)
        assert gen.output_sha256 == sha256(ws.output_path("triage"))
        assert gen.errors_sha256 == sha256(ws.errors_path("triage"))
        actions = [e.action for e in store.events(resource="triage")]
    for step in ("generation", "intent", "upload", "create", "collect", "results"):
        assert step in actions
    assert actions.index("intent") < actions.index("upload") < actions.index("create")
    assert srv.probe.counts["POST /files"] == 1
    assert srv.probe.counts["POST /batches"] == 1


def test_batches_carry_the_adoption_keys_and_the_user_metadata(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """The remote batch's metadata is the user's plus batchspec_resource/spec/shard/attempt."""
    srv = server()
    spec = {"metadata": {"project": "triage", "owner": "qa"}}
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=2, spec=spec))

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    [batch] = srv.client().batches.list().data
    with ws.store() as store:
        [gen] = store.generations("triage")
    assert batch.metadata == {
        "project": "triage",
        "owner": "qa",
        "batchspec_resource": "triage",
        "batchspec_spec": gen.spec_hash,
        "batchspec_shard": "0",
        "batchspec_attempt": "1",
    }


def test_a_second_apply_creates_nothing(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Idempotency: re-applying a converged workspace uploads nothing and creates nothing,
    as counted by the server; the plan then has no changes."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("a", count=3), ResourceSpec("b", count=2))
    assert run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)[0] == 0
    first = dict(srv.probe.counts)
    output = ws.output_path("a").read_bytes()

    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    assert "No changes" in out
    assert first["POST /batches"] == 2 and first["POST /files"] == 2
    assert srv.probe.counts["POST /batches"] == first["POST /batches"]
    assert srv.probe.counts["POST /files"] == first["POST /files"]
    assert len(srv.client().batches.list().data) == 2
    assert len(srv.client().files.list().data) == 2 + 2  # inputs + outputs, nothing new
    assert ws.output_path("a").read_bytes() == output
    assert run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)[0] == 0


def test_an_apply_without_wait_submits_and_a_later_one_collects(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Level-triggered: a CI job may submit and exit; a later apply only polls and collects
    the same batch (no second create)."""
    srv = server(upstream=BuiltinUpstream(latency=0.2))
    ws = served(tmp_path / "ws", srv)

    code, out, _ = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0
    assert "batches are in flight" in out
    assert not ws.output_path("triage").exists()

    code, _, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)
    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
    assert srv.probe.counts["POST /batches"] == 1
    assert srv.batch_count() == 1


def test_apply_against_a_real_serve_process_with_an_api_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batchspec serve --api-key-env` as its own process: apply converges through it with
    the key from `apiKeyEnv`, and the server holds exactly one batch, completed."""
    proc = start_serve_process(
        tmp_path / "engine",
        "--api-key-env",
        "SERVE_KEY_UNDER_TEST",
        env={"SERVE_KEY_UNDER_TEST": SENTINEL_KEY},
        api_key=SENTINEL_KEY,
    )
    try:
        ws = served(tmp_path / "ws", proc, ResourceSpec("triage", count=5))
        code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
        assert code == 0, err
        assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
        [batch] = proc.client().batches.list().data
        assert batch.status == "completed"
        assert batch.request_counts.completed == 5
        with ws.store() as store:
            [row] = store.batches()
        assert row.remote_id == batch.id
    finally:
        proc.stop()


def test_a_spec_change_makes_a_new_generation_and_keeps_the_old_one(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Editing the input is a new generation; the old one stays recorded (with its results'
    sha256 and its stored output blob) and history shows both."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    assert run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)[0] == 0
    old_output = ws.output_path("triage").read_bytes()
    ws.write_input("triage", request_lines(5, prefix="new"))

    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    assert "spec or input changed" in out
    assert [r["custom_id"] for r in ws.outputs("triage")] == [f"new-{i}" for i in range(5)]
    with ws.store() as store:
        old, new = store.generations("triage")
        assert (old.status, new.status) == ("complete", "complete")
        assert old.spec_hash != new.spec_hash
        assert old.output_sha256 == hashlib.sha256(old_output).hexdigest()
        assert (old.requests, new.requests) == (3, 5)
        gens = [
            e.detail["spec_hash"]
            for e in store.events(resource="triage")
            if e.action == "generation"
        ]
    assert gens == [old.spec_hash, new.spec_hash]
    code, out, _ = run_cli(["history", "triage", "--project", str(ws.root), "--json"], capsys)
    events = [e for run in json.loads(out)["runs"] for e in run["events"]]
    assert {e["generation_id"] for e in events if e["action"] == "results"} == {old.id, new.id}
    assert srv.probe.counts["POST /batches"] == 2


def test_a_deleted_output_is_restored_with_the_server_gone(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Restore needs no network: with the server stopped, a deleted output and then an
    edited one are rewritten byte for byte from the state folder, and recorded."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    shuffled_input(ws, "triage")
    assert run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)[0] == 0
    output = ws.output_path("triage").read_bytes()
    errors = ws.errors_path("triage").read_bytes()
    srv.stop()

    ws.output_path("triage").unlink()
    code, out, err = run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)
    assert code == 2 and "output file is missing" in out
    code, out, err = run_cli(["apply", str(ws.root)], capsys)
    assert code == 0, err
    assert ws.output_path("triage").read_bytes() == output

    ws.output_path("triage").write_bytes(output.replace(b"assistant", b"edited!!!"))
    ws.errors_path("triage").write_bytes(b"")
    code, _, err = run_cli(["apply", str(ws.root)], capsys)
    assert code == 0, err
    assert ws.output_path("triage").read_bytes() == output
    assert ws.errors_path("triage").read_bytes() == errors
    with ws.store() as store:
        restores = [e.detail for e in store.events(resource="triage") if e.action == "restore"]
    assert len(restores) == 2
    assert "missing" in restores[0]["reason"] and "differs" in restores[1]["reason"]
    assert run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)[0] == 0


def test_apply_refuses_to_spend_without_consent(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """With no --yes and no terminal, a plan that creates batches on a paid provider exits 1
    saying how to approve, and nothing reaches the server."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))

    code, out, err = run_cli(["apply", str(ws.root), "--wait"], capsys)

    assert code == 1
    assert "--yes" in err and "3 request(s)" in err and "triage" in err
    assert srv.probe.counts["POST /files"] == 0
    assert srv.probe.counts["POST /batches"] == 0
    assert srv.client().files.list().data == []
    with ws.store() as store:
        assert store.batches() == []
        [run] = store.runs()
    assert run.exit_code == 1


def test_the_local_provider_needs_no_consent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The embedded engine costs nothing: apply without --yes and without a terminal runs."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": {"type": "local", "options": {"upstream": "builtin"}}},
        resources=[ResourceSpec("triage", count=2, provider="here")],
    )
    code, _, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)
    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
