"""`batchspec apply` end to end on the embedded engine (a project provider of `type: local`).

No server and no network: the local provider drives the engine in this process, with its
data under the workspace's `state/local`. The engine is opened afterwards (not started) to
count what was uploaded and created.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import request_lines
from workspaces import (
    ResourceSpec,
    Workspace,
    json_lines,
    local_provider,
    make_workspace,
    run_cli,
)

from batchspec.core.apply import ApplyOptions, apply_workspace
from batchspec.core.reconcile import Progress
from batchspec.engine import Engine, EngineError
from batchspec.workspace.yamldoc import display_path

REPO = Path(__file__).resolve().parents[1]
FAST = ["--poll-interval", "0.05"]


def local_ws(root: Path, *resources: ResourceSpec) -> Workspace:
    return make_workspace(
        root,
        providers={"here": local_provider()},
        resources=resources or (ResourceSpec("triage", count=4, provider="here"),),
    )


@contextmanager
def engine_of(ws: Workspace) -> Iterator[Engine]:
    """The workspace's engine, opened (not started) once the apply has closed it."""
    engine = Engine(ws.root / "state" / "local")
    try:
        yield engine
    finally:
        engine.close()


def counts(ws: Workspace) -> tuple[int, int]:
    """(files, batches) the engine holds."""
    with engine_of(ws) as engine:
        return len(engine.list_files()["data"]), len(engine.list_batches(None, 100)["data"])


def test_apply_wait_on_the_local_engine_writes_results_in_input_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Results and errors come back in input order, one line per custom_id, the failing
    request in errors; the recorded sha256 is the files' own."""
    ws = local_ws(tmp_path / "ws")
    lines = request_lines(5)
    ids = ["echo", "delta", "alpha", "charlie", "bravo"]
    for line, cid in zip(lines, ids, strict=True):
        line["custom_id"] = cid
    lines[2]["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
    ws.write_input("triage", lines)

    code, out, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)

    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("triage")] == ["echo", "delta", "charlie", "bravo"]
    assert [r["custom_id"] for r in ws.errors("triage")] == ["alpha"]
    with ws.store() as store:
        [gen] = store.generations("triage")
    assert gen.output_sha256 == hashlib.sha256(ws.output_path("triage").read_bytes()).hexdigest()
    assert gen.errors_sha256 == hashlib.sha256(ws.errors_path("triage").read_bytes()).hexdigest()
    assert (gen.status, gen.succeeded, gen.failed) == ("complete", 4, 1)
    assert f"wrote 4 results to {display_path(ws.output_path('triage'))}" in out


def test_a_second_local_apply_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Idempotency on the embedded engine: the second apply uploads and creates nothing."""
    ws = local_ws(
        tmp_path / "ws",
        ResourceSpec("one", count=2, provider="here"),
        ResourceSpec("two", count=3, provider="here"),
    )
    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] == 0
    files, batches = counts(ws)
    assert batches == 2

    code, out, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)

    assert code == 0, err
    assert "No changes" in out
    assert counts(ws) == (files, batches)


def test_a_submitted_local_batch_resumes_and_is_collected_later(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --wait, apply submits and exits; the next apply picks up the same batch."""
    ws = local_ws(tmp_path / "ws")
    code, _, err = run_cli(["apply", str(ws.root)], capsys)
    assert code == 0, err
    with ws.store() as store:
        [batch] = store.batches()
    assert batch.remote_id is not None

    code, _, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)

    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
    assert counts(ws)[1] == 1
    with ws.store() as store:
        assert [b.remote_id for b in store.batches()] == [batch.remote_id]


def test_apply_workspace_reports_progress_and_returns_statuses(tmp_path: Path) -> None:
    """The library use case: the plan comes first, then create ... results, and the result
    says converged with every resource Synced and Healthy."""
    ws = local_ws(tmp_path / "ws")
    seen: list[Progress] = []

    result = apply_workspace(
        [str(ws.root)], ApplyOptions(wait=True, poll_interval=0.05), report=seen.append
    )

    assert (result.outcome, result.exit_code) == ("converged", 0)
    events = [p.event for p in seen]
    assert events[0] == "plan" and seen[0].plan is not None
    assert events.index("create") < events.index("collect") < events.index("results")
    assert [a.kind.value for a in result.plan.actions] == ["create"]
    [status] = result.statuses
    assert (status.name, status.sync, status.health) == ("triage", "Synced", "Healthy")
    assert (status.requests, status.succeeded) == (4, 4)


def test_apply_json_streams_one_json_document_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json: stdout is NDJSON only, progress events and then one `result` document, which
    has `resource` and `message` as every event does (the summary's headline)."""
    ws = local_ws(tmp_path / "ws")
    code, out, _ = run_cli(["apply", str(ws.root), "--wait", "--json", *FAST], capsys)
    assert code == 0
    docs = json_lines(out)
    assert docs[0]["event"] == "plan" and docs[0]["plan"]["summary"] == {"create": 1}
    final = docs[-1]
    assert final["event"] == "result"
    assert (final["outcome"], final["exit_code"]) == ("converged", 0)
    assert final["resources"][0]["sync"] == "Synced"
    assert final["resource"] is None
    assert final["message"] == "Apply complete: every selected resource is in sync."
    assert all({"event", "at", "resource", "message"} <= set(d) for d in docs)
    assert {"create", "collect", "results"} <= {d["event"] for d in docs}


@pytest.mark.parametrize("as_json", [False, True], ids=["plain", "json"])
def test_the_engine_s_warnings_are_shown_as_apply_s_warnings(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    as_json: bool,
) -> None:
    """A warning the in-process engine logs from its worker thread (an upstream out of
    rotation, a failed commit) is shown as apply's own warnings are: a `Warning:` line among
    the progress, or with --json a `warning` object in the NDJSON (stdout still all JSON);
    never bare on stderr. The handler goes with the run."""
    import logging

    from batchspec.engine.worker import Worker

    tick = Worker._tick

    def warn_then_tick(self: Worker) -> None:
        logging.getLogger("batchspec.engine.worker").warning("upstream %s is slow", "gpu1")
        tick(self)

    monkeypatch.setattr(Worker, "_tick", warn_then_tick)
    ws = local_ws(tmp_path / "ws")
    code, out, err = run_cli(
        ["apply", str(ws.root), "--wait", *FAST, *(["--json"] if as_json else [])], capsys
    )
    assert code == 0, err
    assert "gpu1" not in err
    if as_json:
        warnings = [d for d in json_lines(out) if d["event"] == "warning"]  # all of it JSON
        assert warnings[0]["message"] == "local engine: upstream gpu1 is slow"
        assert (warnings[0]["source"], warnings[0]["resource"]) == ("engine", None)
    else:
        assert "Warning: local engine: upstream gpu1 is slow\n" in out
    engine_log = logging.getLogger("batchspec.engine")
    assert not [h for h in engine_log.handlers if type(h).__name__ == "_ReportEngineLog"]


def test_a_bad_input_fails_before_anything_is_spent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One invalid input among two: exit 1 naming file and line, no batch anywhere, no
    engine started, no result written."""
    ws = local_ws(
        tmp_path / "ws",
        ResourceSpec("good", count=2, provider="here"),
        ResourceSpec("bad", count=2, provider="here"),
    )
    with ws.input_path("bad").open("a") as f:
        f.write('{"custom_id": "broken", "method": "POST"\n')

    code, _, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)

    assert code == 1
    assert "bad.jsonl" in err and ":3" in err
    assert not (ws.root / "state" / "local").exists()
    assert not ws.output_path("good").exists()
    if ws.state_path.exists():
        with ws.store() as store:
            assert store.batches() == []


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"messages": [{"role": "usr", "content": "hi"}]}, id="unknown-role"),
        pytest.param({"max_tokens": 0}, id="max-tokens-0"),
    ],
)
def test_a_request_the_local_model_server_refuses_fails_at_its_line_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any]
) -> None:
    """The `local` provider's model servers judge roles and output limits themselves (vLLM
    takes `ipython`, llama.cpp `max_tokens: -1`), so apply sends such a line; the built-in
    stand-in refuses it as OpenAI does (400): that request fails for good (not retried), in
    the errors file with the server's reason, and the other is answered; the run is done
    (exit 0) and says which request failed and why."""
    ws = local_ws(tmp_path / "ws", ResourceSpec("odd", count=2, provider="here"))
    lines = [json.loads(x) for x in ws.input_path("odd").read_text().splitlines()]
    lines[1]["body"].update(change)
    ws.write_input("odd", lines)

    code, out, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)

    assert code == 0, out + err
    assert "1/2 succeeded, 1 failed" in out and "http_400" in out
    assert [r["custom_id"] for r in ws.outputs("odd")] == [lines[0]["custom_id"]]
    [failed] = ws.errors("odd")
    assert failed["custom_id"] == lines[1]["custom_id"]
    assert failed["response"]["status_code"] == 400


def test_a_dangling_result_store_link_stops_apply_before_any_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """state/store a symbolic link to nothing: apply stops before it creates a batch, with an
    error naming the link, its target and what to do; once fixed, the next apply converges."""
    ws = local_ws(tmp_path / "ws")
    store = ws.root / "state" / "store"
    store.parent.mkdir(parents=True, exist_ok=True)
    store.symlink_to(tmp_path / "elsewhere")

    code, _, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)

    assert code == 1 and "Traceback" not in err
    assert f"{store} cannot be used: it is a symbolic link to {tmp_path / 'elsewhere'}" in err
    assert "run the command again" in err
    with ws.store() as recorded:
        assert recorded.batches() == []
    (tmp_path / "elsewhere").mkdir()
    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] == 0
    assert len(ws.outputs("triage")) == 4


def test_a_result_path_made_a_folder_mid_run_is_said_and_nothing_is_lost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output file made a folder after the load checked it (validate refuses one made
    before): the collect fails with an error naming it and what to do, not "Is a directory";
    once it is moved away, apply writes the results from the store, creating no batch."""
    from batchspec.core.reconcile import collect

    ws = local_ws(tmp_path / "ws")
    write = collect.write_results_in_input_order

    def folder_first(*args: Any, **kwargs: Any) -> Any:
        ws.output_path("triage").mkdir(parents=True, exist_ok=True)
        return write(*args, **kwargs)

    monkeypatch.setattr(collect, "write_results_in_input_order", folder_first)
    code, _, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)

    assert code == 1 and "Traceback" not in err and "Is a directory" not in err
    shown = display_path(ws.output_path("triage"))
    assert f"the output file {shown} is a folder now" in err and "spec.output" in err
    monkeypatch.undo()
    ws.output_path("triage").rmdir()
    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] == 0
    assert len(ws.outputs("triage")) == 4
    assert counts(ws)[1] == 1  # the one batch: its answers were kept


def test_the_quickstart_converges_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's first command: the shipped example applies with --wait and exits 0,
    every resource Synced with one output line per input line."""
    root = tmp_path / "quickstart"
    shutil.copytree(REPO / "examples" / "quickstart", root)
    code, _, err = run_cli(["apply", str(root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    code, out, _ = run_cli(["status", str(root), "--json"], capsys)
    statuses = json.loads(out)["resources"]
    assert {s["name"]: (s["sync"], s["health"]) for s in statuses} == {
        "doc-embeddings": ("Synced", "Healthy"),
        "ticket-triage": ("Synced", "Healthy"),
    }
    for s in statuses:
        inputs = root / "data" / f"{'docs' if 'doc' in s['name'] else 'tickets'}.jsonl"
        n = sum(1 for line in inputs.read_text().splitlines() if line.strip())
        assert len(Path(s["output"]).read_text().splitlines()) == n == s["requests"]


@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask-000", "umask-022"])
def test_results_follow_the_umask_and_stored_answers_stay_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], umask: int
) -> None:
    """results/ files get 0666 & ~umask like any file the user makes; state/ itself (the
    database, the input caches), the result store (state/store) and the engine's data
    (state/local) are 0600 files in 0700 folders."""
    import os
    import stat

    def modes(folder: Path) -> tuple[set[int], set[int]]:
        found = [folder, *folder.rglob("*")]
        dirs = {stat.S_IMODE(p.stat().st_mode) for p in found if p.is_dir()}
        files = {stat.S_IMODE(p.stat().st_mode) for p in found if p.is_file()}
        return dirs, files

    old = os.umask(umask)
    try:
        ws = local_ws(tmp_path / "ws")
        code, _, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(ws.output_path("triage").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((ws.root / "state").stat().st_mode) == 0o700
    assert modes(ws.root / "state")[1] == {0o600}
    store_dirs, store_files = modes(ws.root / "state" / "store")
    assert (store_dirs, store_files) == ({0o700}, {0o600})
    assert len(list((ws.root / "state" / "store").rglob("*"))) > 2  # blobs were stored
    engine_dirs, engine_files = modes(ws.root / "state" / "local")
    assert (engine_dirs, engine_files) == ({0o700}, {0o600})


def test_an_apply_waits_its_lock_timeout_for_another_run_on_the_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The engine's folder held by another process's run (here: an engine opened on it) is a
    lock like the state's: --lock-timeout waits for it to be let go, then the apply goes on;
    without it, exit 3 naming the way to wait (it used to ignore --lock-timeout)."""
    ws = local_ws(tmp_path / "ws")
    held = Engine(ws.root / "state" / "local")
    try:
        code, _, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)
        assert code == 3
        assert "--lock-timeout" in err
        threading.Timer(0.3, held.close).start()
        code, _, err = run_cli(
            ["apply", str(ws.root), "--wait", "--lock-timeout", "10", *FAST], capsys
        )
    finally:
        held.close()
    assert code == 0, err
    assert len(ws.outputs("triage")) == 4


def test_an_engine_folder_in_use_is_found_before_anything_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 3 changes nothing: with the engine's folder held (a `batchspec serve` on it), an
    apply that would create or replace exits 3 before recording a generation; it recorded
    the new one first, so status showed a Healthy resource as 'Progressing, 0/4, queued'."""
    ws = local_ws(
        tmp_path / "ws", *(ResourceSpec(n, count=2, provider="here") for n in ("done", "fresh"))
    )
    assert run_cli(["apply", str(ws.root), "--select", "done", "--wait", *FAST], capsys)[0] == 0
    held = Engine(ws.root / "state" / "local")
    try:
        for argv in (
            ["--replace", "done", "--no-reuse", "--select", "done"],
            ["--select", "fresh"],
        ):
            code, _, err = run_cli(["apply", str(ws.root), *argv, *FAST], capsys)
            assert code == 3, err
    finally:
        held.close()
    with ws.store() as store:
        assert len(store.generations("done")) == 1 and store.generations("fresh") == []
    code, out, _ = run_cli(["status", str(ws.root), "--select", "done"], capsys)
    assert "done: Synced, Healthy — 2/2 succeeded" in out


def test_an_engine_folder_in_use_leaves_a_pending_move_unrecorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rename (`moved`) with a spending change, the engine's folder held: exit 3 records
    nothing, the move included (it was recorded before the engine was claimed)."""
    ws = local_ws(tmp_path / "ws", ResourceSpec("done", count=2, provider="here"))
    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] == 0
    manifest = ws.manifest_path("done")
    doc = yaml.safe_load(manifest.read_text())
    doc["metadata"].update(name="renamed", moved={"from": "done"}, labels={"team": "b"})
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    with ws.input_path("done").open("a") as f:  # one request more: a create
        f.write(ws.input_path("done").read_text().splitlines()[0].replace("-0", "-9") + "\n")
    held = Engine(ws.root / "state" / "local")
    try:
        code, _, err = run_cli(["apply", str(ws.root), *FAST], capsys)
    finally:
        held.close()
    assert code == 3, err
    with ws.store() as store:
        assert store.get_resource("renamed") is None and store.get_resource("done") is not None


def test_a_local_engine_forwarding_to_another_host_is_paid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `local` provider whose upstream is another host (a hosted API, another machine) is
    not free: its price is unknown (a dollar budget refuses it) and an apply needs consent.
    It was priced $0 and sent without a word. Nothing is sent: both refusals come first."""
    upstream = "http://10.255.255.1:9/v1"  # never contacted: refused before any request
    ws = make_workspace(
        tmp_path / "ws",
        providers={"fwd": {"type": "local", "options": {"upstream": upstream}}},
        resources=[ResourceSpec("r", count=2, provider="fwd")],
    )
    code, out, err = run_cli(["apply", str(ws.root), *FAST], capsys)
    assert code == 1 and "run it again with --yes" in err, out + err
    manifest = ws.manifest_path("r")
    manifest.write_text(
        manifest.read_text().replace("spec:\n", "spec:\n  budget: {maxCostUSD: 1}\n", 1)
    )
    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 1 and "price" in err, out + err
    with ws.store() as store:
        assert store.batches() == []


def test_a_create_the_engine_refuses_is_recorded_as_made_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine refusing a create (a 400, as for a completion window it does not take) made
    no batch, as an HTTP provider's 4xx: `create-refused`, the intent pending again; it stayed
    'creating', so every later plan said 'not confirmed by the provider (adopts the remote
    batch if it exists)'."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise EngineError(400, "Invalid completion_window '48h': only '24h' is supported.")

    monkeypatch.setattr(Engine, "create_batch", refuse)
    ws = local_ws(tmp_path / "ws", ResourceSpec("wide", count=2, provider="here"))
    code, _, err = run_cli(["apply", str(ws.root), *FAST], capsys)
    assert code == 1 and "only '24h' is supported" in err
    with ws.store() as store:
        assert [b.status for b in store.batches()] == ["pending"]
        assert "create-refused" in [e.action for e in store.events(resource="wide")]
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "not confirmed" not in out


def test_a_damaged_stored_answer_is_downloaded_again_not_restored_without_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stored output file damaged on disk (one flipped bit) makes a restore write content
    other than recorded: it is downloaded again from the provider and the files come out as
    collected (it used to restore the damaged bytes, and `apply --wait` restored them again at
    every pass, without end); with no good copy left, the apply exits 1 saying so."""
    ws = local_ws(tmp_path / "ws")
    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] == 0
    good = ws.output_path("triage").read_bytes()
    [blob] = [p for p in (ws.root / "state" / "store").glob("??/*")]
    damaged = bytearray(blob.read_bytes())
    damaged[10] ^= 1
    blob.write_bytes(bytes(damaged))
    ws.output_path("triage").unlink()

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--timeout", "3", *FAST], capsys)

    assert code == 0, err
    assert ws.output_path("triage").read_bytes() == good
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    with ws.store() as store:
        events = [e.action for e in store.events()]
    assert events.count("blob.repaired") == 1 and events.count("restore") == 1

    blob.write_bytes(bytes(damaged))
    shutil.rmtree(ws.root / "state" / "local")  # the provider's copy is gone too
    ws.output_path("triage").unlink()
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--timeout", "5", *FAST], capsys)
    assert code == 1
    assert "is damaged" in err and "cannot be downloaded again" in err


def test_results_are_restored_from_the_provider_when_the_result_store_was_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """state/store/ deleted (taken for a cache) and a result file gone: the answers are
    downloaded again from the provider, which still has them, and the file restored as
    collected (it used to fail, saying the file was collected on another runner)."""
    ws = local_ws(tmp_path / "ws")
    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] == 0
    good = ws.output_path("triage").read_bytes()
    shutil.rmtree(ws.root / "state" / "store")
    ws.output_path("triage").unlink()

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--timeout", "3", *FAST], capsys)

    assert code == 0, err
    assert ws.output_path("triage").read_bytes() == good
    with ws.store() as store:
        assert [e.action for e in store.events()].count("blob.repaired") == 1


@pytest.mark.parametrize("way_out", ["replace", "cancel"])
def test_a_batch_the_engine_lost_is_got_past_with_replace_or_cancel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], way_out: str
) -> None:
    """The engine's folder is deleted while its batch is in flight: apply fails naming
    `apply --replace NAME`; that (or `batchspec cancel NAME`) records the batch gone and goes
    through. Both failed on the same 404 for good, leaving no way past it."""
    ws = local_ws(tmp_path / "ws")
    assert run_cli(["apply", str(ws.root)], capsys)[0] == 0
    shutil.rmtree(ws.root / "state" / "local")

    code, _, err = run_cli(["apply", str(ws.root)], capsys)

    assert code == 1
    assert "`batchspec apply --replace triage` runs triage again" in err
    if way_out == "cancel":
        code, out, err = run_cli(["cancel", "triage", str(ws.root)], capsys)
        assert code == 0, err
        assert "is gone from the provider" in out + err
    args = ["apply", str(ws.root), "--replace", "triage", "--wait", *FAST]
    code, out, err = run_cli(args, capsys)

    assert code == 0, out + err
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
    with ws.store() as store:
        [gone, new] = store.batches()
        events = [e for e in store.events(resource="triage") if e.detail.get("gone")]
    assert (gone.status, new.status) == ("cancelled", "completed")
    assert [e.batch_id for e in events] == [gone.id]


def test_apply_says_so_before_its_local_engine_waits_for_requests_in_flight(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When apply ends (done, or --timeout reached) while its local engine has requests at the
    upstream, the engine's close lets them finish, up to 30 s: apply says so in a line
    before it waits (an `engine_drain` event with --json). It sat silent that long, a
    `--timeout 2` ending after 30 s with no word, its summary printed only after."""
    from batchspec.providers.local import LocalProvider

    monkeypatch.setattr(LocalProvider, "requests_in_flight", lambda self: (3, 30.0), raising=False)
    ws = local_ws(tmp_path / "ws")
    code, out, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)
    assert code == 0, err
    line = (
        "local engine 'here': waiting for the 3 requests it has sent upstream to finish "
        "(up to 30 s; Ctrl-C does not wait for them, and they are sent again next time)\n"
    )
    assert line in out and out.index(line) < out.index("Apply complete"), out
    ws = local_ws(tmp_path / "ws2")
    code, out, err = run_cli(["apply", str(ws.root), "--wait", *FAST, "--json"], capsys)
    drains = [d for d in json_lines(out) if d["event"] == "engine_drain"]
    assert [(d["provider"], d["requests_in_flight"], d["drain_timeout"]) for d in drains] == [
        ("here", 3, 30.0)
    ]


def test_cancel_says_so_before_its_local_engine_waits_for_requests_in_flight(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`batchspec cancel NAME` on the local engine lets the requests it has sent finish (up to
    30 s) when it closes: it said its one line only after that wait, silent meanwhile. The
    wait is said first, on stderr (stdout stays the result, or only JSON)."""
    from batchspec.providers.local import LocalProvider

    ws = local_ws(tmp_path / "ws")
    assert run_cli(["apply", str(ws.root)], capsys)[0] == 0  # a batch, not run to its end
    monkeypatch.setattr(LocalProvider, "requests_in_flight", lambda self: (2, 30.0), raising=False)
    code, out, err = run_cli(["cancel", "triage", str(ws.root), "--json"], capsys)
    assert code == 0, err
    assert "local engine 'here': waiting for the 2 requests it has sent upstream" in err, err
    json.loads(out)  # stdout: only the result


def test_cancel_of_a_sharded_resource_runs_none_of_the_engines_batches(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    standin_upstream: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`batchspec cancel NAME` on a local resource in 3 shards cancels batch after batch.
    Its engine's worker, started after the first cancel, resumed the other batches and sent
    their requests (paid for) before their own cancels came. The cancel now starts no
    worker: nothing reaches the upstream, and the next apply ends the cancelled batches."""
    slow = standin_upstream(latency=0.3)
    provider = {"type": "local", "options": {"upstream": slow.v1, "concurrency": 1}}
    spec = {"limits": {"maxRequestsPerBatch": 2}}
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": provider},
        resources=[ResourceSpec("triage", count=6, provider="here", spec=spec)],
    )
    assert run_cli(["apply", str(ws.root)], capsys)[0] == 0  # 3 batches, left running
    sent = sum(slow.calls.values())
    assert sent < 6
    cancel = Engine.cancel_batch

    def cancel_once_a_worker_had_time(engine: Engine, batch_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 0.3  # a started worker sends within milliseconds
        while sum(slow.calls.values()) == sent and time.monotonic() < deadline:
            time.sleep(0.01)
        return cancel(engine, batch_id)

    monkeypatch.setattr(Engine, "cancel_batch", cancel_once_a_worker_had_time)

    code, _, err = run_cli(["cancel", "triage", str(ws.root)], capsys)
    monkeypatch.undo()

    assert code == 0, err
    assert sum(slow.calls.values()) == sent  # none of the batches it cancelled ran on
    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] in (0, 4)
    with ws.store() as store:
        assert {b.status for b in store.batches()} == {"cancelled"}


def test_a_ctrl_c_in_one_providers_close_still_closes_the_others() -> None:
    """Ctrl-C during the first local engine's drain (its `engine_drain` line invites it):
    the pool still closes every other provider (their engines would stop with answers
    uncommitted, sent and paid for again), then the interruption goes on."""
    from batchspec.core.session import ProviderPool

    class Closing:
        def __init__(self, interrupted: bool) -> None:
            self.interrupted = interrupted
            self.closed = False

        def close(self) -> None:
            self.closed = True
            if self.interrupted:
                raise KeyboardInterrupt

    pool = ProviderPool(None, {})  # type: ignore[arg-type]
    first, second = Closing(interrupted=True), Closing(interrupted=False)
    pool.built = {"a": first, "b": second}  # type: ignore[dict-item]
    with pytest.raises(KeyboardInterrupt):
        pool.__exit__(None, None, None)
    assert first.closed and second.closed


def test_a_run_ending_on_an_error_still_says_its_local_engine_waits() -> None:
    """An apply that fails (a provider's error) unwinds through the provider pool, whose
    local engine's close lets its requests finish, up to 30 s: the `engine_drain` line said
    so only for a run that ended well, and a failing one sat silent before its error. Only
    after a Ctrl-C (whose own line said it) is it left out."""
    from batchspec.core.session import ProviderPool
    from batchspec.errors import ProviderError

    class Draining:
        def requests_in_flight(self) -> tuple[int, float]:
            return 2, 30.0

        def close(self) -> None:
            pass

    said: list[Progress] = []
    pool = ProviderPool(None, {}, report=said.append)  # type: ignore[arg-type]
    pool.built = {"here": Draining()}  # type: ignore[dict-item]
    pool.__exit__(ProviderError, ProviderError("boom"), None)
    assert [p.event for p in said] == ["engine_drain"]
    pool.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert len(said) == 1
