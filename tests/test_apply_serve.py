"""`batchspec apply` end to end against the engine's OpenAI API over loopback.

The project's provider is `type: openai` with `baseUrl` pointing at a server on 127.0.0.1
that requires an API key (a sentinel read from `apiKeyEnv`). Most tests serve the engine in
a thread behind a `RequestProbe` (tests/probes.py) so they can count uploads and creates as
the server saw them; one runs a real `batchspec serve --api-key-env` process.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from probes import ProbedServer, start_serve_process
from servers import request_lines
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    make_workspace,
    openai_provider,
    run_cli,
    served,
)

from batchspec.engine.upstreams import BuiltinUpstream, UpstreamResponse
from batchspec.state.lock import current_lock

FAST = ["--poll-interval", "0.05"]


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    return SENTINEL_KEY


served = functools.partial(served, count=4)  # this file's jobs are 4 requests


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shuffled_input(ws: Workspace, name: str) -> list[str]:
    """An input whose custom_ids are not in sorted order, with one request the upstream
    rejects (empty messages: a final 400). Returns the custom_ids in input order."""
    lines = request_lines(6, prefix="q")
    ids = ["zulu", "alpha", "mike", "bravo", "yankee", "charlie"]
    for line, cid in zip(lines, ids, strict=True):
        line["custom_id"] = cid
    lines[3]["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
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


def test_an_apply_that_only_polls_does_not_say_it_submitted(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A second apply that only polls a batch still in flight says so, not "Apply submitted"."""
    srv = server(upstream=BuiltinUpstream(latency=5.0), drain_timeout=0.1)
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert srv.probe.counts["POST /batches"] == 1
    assert "batches are in flight" in out
    assert "submitted" not in out


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
    code, out, _ = run_cli(["history", str(ws.root), "--resource", "triage", "--json"], capsys)
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
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no --yes and no terminal, a plan that creates batches on a paid provider exits 1
    saying how to approve, and nothing reaches the server."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))

    monkeypatch.delenv("CI", raising=False)  # a person's shell, its input not a terminal
    code, out, err = run_cli(["apply", str(ws.root), "--wait"], capsys)

    assert code == 1
    assert "--yes" in err and "3 request(s)" in err and "triage" in err
    # the one reason that applies here (pytest's stdin is no terminal), not all three
    assert "(its input is not a terminal)" in err and "CI" not in err, err
    assert srv.probe.counts["POST /files"] == 0
    assert srv.probe.counts["POST /batches"] == 0
    assert srv.client().files.list().data == []
    with ws.store() as store:
        assert store.batches() == []
        [run] = store.runs()
    assert run.exit_code == 1


def test_the_refusal_to_spend_without_consent_counts_the_resources_past_ten(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --yes in CI, the refusal names the first ten resources it would submit and
    counts the rest, as other messages do (at 300 manifests it was one 3,000-character line
    of every name)."""
    srv = server()
    specs = [ResourceSpec(f"job-{i:02d}", count=1) for i in range(12)]
    ws = served(tmp_path / "ws", srv, *specs)

    monkeypatch.setenv("CI", "true")  # as a CI runner sets it
    code, _, err = run_cli(["apply", str(ws.root)], capsys)

    assert code == 1
    assert "(CI is set)" in err, err
    assert "submit 12 request(s) in new batches (job-00, job-01," in err, err
    assert "job-09, … (12 in all))" in err and "job-10" not in err, err
    assert srv.probe.counts["POST /batches"] == 0


def test_a_replace_that_keeps_every_answer_needs_no_consent(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --replace NAME` of a finished resource keeps every answer (0 requests to
    submit, no batch created): it asked consent to "submit 0 request(s) in new batches"
    and, with no terminal, exited 1 without --yes. It spends nothing: applied, exit 0."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    assert run_cli(["apply", str(ws.root), "--wait", "--yes"], capsys)[0] == 0
    creates = srv.probe.counts["POST /batches"]

    code, out, err = run_cli(["apply", str(ws.root), "--replace", "triage"], capsys)

    assert code == 0, err
    assert "0 request(s)" not in err and "3 keep a recorded answer" in out, out
    assert srv.probe.counts["POST /batches"] == creates


class ClosedTerminal(io.StringIO):
    """A stdin that is a terminal but gives no answer (end of input at once)."""

    def isatty(self) -> bool:
        return True


class InterruptedTerminal(ClosedTerminal):
    """A stdin that is a terminal whose user presses Ctrl-C at the prompt."""

    def readline(self, size: int | None = -1) -> str:
        raise KeyboardInterrupt


def test_ctrl_c_at_the_consent_prompt_is_an_interrupt_not_a_no(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C at apply's consent prompt exits 130 (interrupted, as Ctrl-C anywhere else
    does; it exited 1, as a "no" does), and nothing reaches the server."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stdin", InterruptedTerminal())

    code, _, err = run_cli(["apply", str(ws.root)], capsys)

    assert code == 130, err
    assert "Apply this plan?" in err
    assert srv.probe.counts["POST /files"] == 0
    assert srv.probe.counts["POST /batches"] == 0


def test_the_consent_prompt_shows_the_spend_estimate_first(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """apply asks "Apply this plan?" after the spend estimate `plan` shows (per resource and
    the total), as Terraform asks after the whole plan: it asked with no figure at all."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stdin", ClosedTerminal())  # no answer: a no

    code, _, err = run_cli(["apply", str(ws.root)], capsys)

    assert code == 1, err
    estimate = err.index("Estimated spend (input ~4 bytes/token")
    assert estimate < err.index("  triage: ~") < err.index("  total: ") < err.index("Apply this")
    assert srv.probe.counts["POST /batches"] == 0


def test_in_ci_apply_refuses_to_spend_without_yes_even_on_a_terminal(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With CI set, a runner's pseudo-terminal is no one to ask: apply does not prompt but
    refuses saying --yes, and nothing reaches the server."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(sys, "stdin", ClosedTerminal())

    code, _, err = run_cli(["apply", str(ws.root)], capsys)

    assert code == 1
    assert "Apply this plan?" not in err
    assert "--yes" in err and "3 request(s)" in err
    assert srv.probe.counts["POST /files"] == 0
    assert srv.probe.counts["POST /batches"] == 0


def test_a_prompt_left_unanswered_is_a_no_that_says_nothing_was_submitted(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal whose input ends before an answer, apply's consent prompt counts as a
    no: exit 1 saying nothing was submitted (not a bare "Aborted."), nothing uploaded."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stdin", ClosedTerminal())

    code, _, err = run_cli(["apply", str(ws.root)], capsys)

    assert code == 1
    assert "Apply this plan?" in err
    assert "nothing was submitted" in err
    assert srv.probe.counts["POST /files"] == 0
    assert srv.probe.counts["POST /batches"] == 0


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


# ---------------------------------------------------------------------------------------------
# apply --wait exit codes: 0 converged, 4 degraded, 5 timeout


def test_wait_exits_4_when_attempts_are_exhausted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against `batchspec serve --fault-500 1.0`, every request fails; with one attempt the
    resource ends Degraded: exit 4, every request in the errors file, nothing in output."""
    proc = start_serve_process(tmp_path / "engine", "--fault-500", "1.0", "--max-attempts", "1")
    try:
        spec = {"retry": {"maxAttempts": 1}}
        ws = served(tmp_path / "ws", proc, ResourceSpec("triage", count=3, spec=spec))
        code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
        assert code == 4, err
        assert "Degraded" in out
        assert ws.outputs("triage") == []
        assert [r["custom_id"] for r in ws.errors("triage")] == ws.input_ids("triage")
        assert {r["response"]["status_code"] for r in ws.errors("triage")} == {500}
        with ws.store() as store:
            [gen] = store.generations("triage")
            [run] = store.runs()
        assert (gen.status, gen.failed, run.exit_code) == ("degraded", 3, 4)
        assert len(proc.client().batches.list().data) == 1  # no retry with maxAttempts 1
    finally:
        proc.stop()


class FailFirstSight:
    """An upstream that answers 500 the first time it sees each of ``ids``, then delegates."""

    description = "fails first sight"

    def __init__(self, inner: Any, ids: set[str]) -> None:
        self.inner, self.ids, self.seen = inner, ids, set()

    async def send(self, url: str, body: Any, *, custom_id: str, attempt: int) -> Any:
        if custom_id in self.ids and custom_id not in self.seen:
            self.seen.add(custom_id)
            return UpstreamResponse(
                500, {"error": {"message": "first sight", "type": "server_error"}}
            )
        return await self.inner.send(url, body, custom_id=custom_id, attempt=attempt)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_wait_retries_failed_requests_before_giving_up(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Requests the upstream fails with 500 the first time it sees them are resubmitted in
    attempt 2 (only those) and then succeed: exit 0 and two batches on the server."""
    srv = server(upstream=FailFirstSight(BuiltinUpstream(), {"req-0", "req-2"}), max_attempts=1)
    spec = {"retry": {"maxAttempts": 2}}
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3, spec=spec))
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
    assert srv.probe.counts["POST /batches"] == 2
    with ws.store() as store:
        first, second = store.batches()
    assert (first.attempt, first.requests, second.attempt, second.requests) == (1, 3, 2, 2)


def test_wait_exits_5_at_its_timeout(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """With a slow upstream, --timeout ends the wait with exit 5; the batch stays recorded
    in flight for a later apply."""
    srv = server(upstream=BuiltinUpstream(latency=30.0), drain_timeout=0.1)
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=2))
    started = time.monotonic()
    code, out, err = run_cli(
        ["apply", str(ws.root), "--wait", "--yes", "--timeout", "0.6", *FAST], capsys
    )
    assert code == 5, err
    assert time.monotonic() - started < 10  # far from the 30 s the batch needs
    assert "--timeout" in out
    with ws.store() as store:
        [batch] = store.batches()
        [run] = store.runs()
    assert batch.remote_id is not None and batch.status not in ("completed", "failed")
    assert run.exit_code == 5


# ---------------------------------------------------------------------------------------------
# one writer at a time


def wait_for_lock(ws: Workspace, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ws.state_path.exists():
            with ws.store() as store:
                holder = current_lock(store)
            if holder is not None:
                return holder
        time.sleep(0.02)
    raise AssertionError("no run took the lock")


def test_a_second_apply_exits_3_naming_the_holder_or_waits(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """While one apply holds the lock, another exits 3 naming it (--lock-timeout 0); with a
    --lock-timeout long enough it waits for the holder to finish, then succeeds without
    creating anything. The holder is kept busy by holding its first poll at the server."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=2))
    polling = srv.probe.hold("GET /batches/{id}", 30)
    first = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--wait", "--yes", *FAST),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert polling.wait(20), "the first apply never polled"
        holder = wait_for_lock(ws)
        assert holder.pid == first.pid

        code, _, err = run_cli(["apply", str(ws.root), "--yes", "--lock-timeout", "0"], capsys)
        assert code == 3
        assert holder.holder_id in err and str(first.pid) in err
        assert "batchspec unlock" in err

        threading.Timer(0.5, srv.probe.release, ["GET /batches/{id}"]).start()
        started = time.monotonic()
        code, out, err = run_cli(
            ["apply", str(ws.root), "--wait", "--yes", "--lock-timeout", "30", *FAST], capsys
        )
        assert code == 0, err
        assert time.monotonic() - started >= 0.4  # it waited for the holder
        assert first.wait(timeout=20) == 0
    finally:
        srv.probe.release_all()
        if first.poll() is None:
            first.kill()
        first.wait()
    assert "No changes" in out
    assert srv.probe.counts["POST /batches"] == 1
    with ws.store() as store:
        assert [r.exit_code for r in store.runs()] == [0, 3, 0]


# ---------------------------------------------------------------------------------------------
# the API key never leaks


def leaks(text: str | bytes) -> bool:
    """The sentinel key, whole or by its distinctive middle, in some text."""
    data = text.encode() if isinstance(text, str) else text
    return any(part in data for part in (SENTINEL_KEY.encode(), b"7f3a9c1e5b2d4f60"))


def test_the_api_key_never_reaches_state_history_status_or_output(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """The sentinel key (used successfully, then rejected with 401 by a server expecting
    another key) appears in no byte of the state files, history/status JSON, apply output
    or error message. A connection is kept open meanwhile so the -wal file stays to be read."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=2))
    wrong = server(api_key="sk-the-server-wants-another-key")
    ws2 = served(tmp_path / "ws2", wrong, ResourceSpec("triage", count=2))
    with ws.store(), ws2.store():
        seen = run_all_and_scan(ws, ws2, capsys)
    for text in seen:
        assert not leaks(text)


def run_all_and_scan(
    ws: Workspace, ws2: Workspace, capsys: pytest.CaptureFixture[str]
) -> list[str]:
    seen: list[str] = []
    for argv in (
        ["apply", str(ws.root), "--wait", "--yes", *FAST],
        ["apply", str(ws.root), "--wait", "--yes", "--json", *FAST],
        ["plan", str(ws.root), "--json"],
        ["status", str(ws.root), "--json"],
    ):
        code, out, err = run_cli(argv, capsys)
        assert code == 0, err
        seen += [out, err]

    code, out, err = run_cli(["apply", str(ws2.root), "--wait", "--yes", *FAST], capsys)
    assert code == 1
    assert "401" in err or "API key" in err or "invalid_api_key" in err
    assert KEY_ENV in err  # says which variable to fix, not its value
    seen += [out, err]
    for root in (ws.root, ws2.root):
        code, out, err = run_cli(["history", "--project", str(root), "--json"], capsys)
        assert code == 0
        seen += [out, err]
    assert '"error"' in seen[-2]  # ws2's history holds the recorded 401

    for w in (ws, ws2):
        state_files = [p for p in w.state_path.parent.rglob("*") if p.is_file()]
        wal = w.state_path.with_name(w.state_path.name + "-wal")
        assert w.state_path in state_files and wal in state_files and wal.stat().st_size
        for path in state_files:  # the database, its -wal and -shm, the blob store
            assert not leaks(path.read_bytes()), path
    return seen


def echoing_app() -> Any:
    """A hostile server that echoes the Authorization header back in its 401 message."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def refuse(request: Request) -> JSONResponse:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        body = {
            "error": {"message": f"Incorrect API key provided: {key}.", "code": "invalid_api_key"}
        }
        return JSONResponse(body, status_code=401)

    path = "/{path:path}"
    return Starlette(routes=[Route(path, refuse, methods=["GET", "POST"])])


def test_a_key_echoed_by_the_server_is_redacted_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even when a server puts the key into its error message, the error shown and the
    error event recorded in the state leave it out."""
    from batchspec.engine.server import start_in_thread

    echo = start_in_thread(echoing_app())
    try:
        ws = served(tmp_path / "ws", f"{echo.base_url}/v1")
        code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    finally:
        echo.stop()
    assert code == 1
    assert "Incorrect API key provided" in err
    assert not leaks(out) and not leaks(err)
    code, history, _ = run_cli(["history", "--project", str(ws.root), "--json"], capsys)
    assert "Incorrect API key provided" in history
    assert not leaks(history)
    for path in ws.state_path.parent.rglob("*"):
        if path.is_file():
            assert not leaks(path.read_bytes()), path


def test_a_refused_listing_before_a_first_create_says_why_apply_lists(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A key that may not list batches (403 on GET /v1/batches) stops apply before any
    create, exit 1 and no traceback, with a line saying why a create needs the listing (its
    key is looked up first, so a batch an earlier run made is not paid twice): the provider's
    refusal alone reads as if apply had asked for something it does not need."""
    srv = server()
    srv.probe.refuse(r"^GET /v1/batches$", 403, {"error": {"message": "listing not allowed"}})
    ws = served(tmp_path / "ws", srv)

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 1
    assert "listing not allowed" in err and "Traceback" not in err
    assert "looked up" in err and "before its first create" in err and err.count("looked up") == 1
    assert srv.engine.list_batches(None, 100)["data"] == []
    # asked once: the listing read ahead of the lookups failed, and the lookup raises that
    assert srv.probe.raw_log.count("GET /v1/batches") == 1


def test_a_listing_that_could_not_connect_is_not_blamed_on_the_keys_rights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening at the base URL: the error says it could not connect, with no line
    about a key that may not list batches (that one is for a 401 or 403)."""
    with socket.socket() as sock:  # a port nothing listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(f"http://127.0.0.1:{port}/v1", KEY_ENV, maxRetries=0)},
        resources=(ResourceSpec("triage", count=2),),
    )

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 1
    assert "could not connect" in err and "may not list batches" not in err


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        pytest.param("HTTPS_PROXY", "socks5://user:hunter2@127.0.0.1:1080", "socksio", id="socks"),
        pytest.param("HTTP_PROXY", "ftp://user:hunter2@127.0.0.1:21", "ftp", id="ftp"),
        pytest.param("ALL_PROXY", "user:hunter2@[::1", "Invalid", id="malformed"),
    ],
)
def test_a_proxy_variable_no_client_can_use_is_said_not_a_traceback(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    why: str,
) -> None:
    """A proxy variable the HTTP client cannot use (a SOCKS proxy without httpx's socks
    extra, another scheme, a malformed URL: an SSH tunnel's ALL_PROXY left in a shell) is a
    usage error naming the variable, as the local engine's is, before anything is sent; it
    was a traceback of httpx's ImportError, ValueError or InvalidURL (exit 1)."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("a", count=2))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv(variable, value)

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 64, err
    assert err.startswith("Error: ") and f"{variable}=" in err and why in err
    assert "hunter2" not in err and "Traceback" not in err
    assert srv.probe.counts["POST /files"] == 0
