"""`apply --replace NAME`: run a resource again as a new generation of the same spec.

Against a probed engine server (batches stay in flight with a slow upstream) where the
provider's own counters prove what was created or cancelled, and against the embedded engine
where a fast round trip is enough.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from probes import ProbedServer
from servers import request_lines, wait_for, wait_for_batch
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    json_lines,
    local_provider,
    make_workspace,
    run_cli,
    served,
    write_manifest,
)

from batchspec.engine.upstreams import BuiltinUpstream
from batchspec.state.lock import current_lock

FAST = ["--poll-interval", "0.05"]
#: batches stay in flight; a cancel drops what they have in flight (no drain), so they stop at once
SLOW = {"upstream": BuiltinUpstream(latency=5.0), "drain_timeout": 0.0}
CREATE = "POST /batches"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def local_ws(root: Path) -> Workspace:
    return make_workspace(
        root,
        providers={"here": local_provider()},
        resources=[ResourceSpec("triage", count=3, provider="here")],
    )


def plan_json(ws: Workspace, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code, out, err = run_cli(["plan", str(ws.root), "--json", *args], capsys)
    assert code == 0, err
    return json.loads(out)


def test_after_cancel_the_advice_given_reruns_the_resource(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """After `cancel`, the plan's advice names `apply --replace NAME`; following it (with
    consent) creates a new batch at the provider for a new generation, recorded as a
    `replace` event, where forget + apply only resumed the cancelled generation."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "`batchspec apply --replace triage` runs it again" in out
    assert "forget" not in out
    creates = srv.probe.counts[CREATE]

    plan = plan_json(ws, capsys, "--replace", "triage")
    [action] = plan["actions"]
    assert (action["action"], action["requests"]) == ("replace", 3)
    code, _, err = run_cli(["apply", str(ws.root), "--replace", "triage"], capsys)
    assert code == 1 and "--yes" in err  # consent as for a create: nothing sent
    assert srv.probe.counts[CREATE] == creates

    code, out, err = run_cli(["apply", str(ws.root), "--replace", "triage", "--yes"], capsys)

    assert code == 0, err
    assert srv.probe.counts[CREATE] == creates + 1
    with ws.store() as store:
        old, new = store.generations("triage")
        assert (old.status, new.status) == ("cancelled", "in_progress")
        assert store.get_resource("triage").current_generation_id == new.id
        [event] = [e for e in store.events(resource="triage") if e.action == "replace"]
        assert event.generation_id == new.id and event.detail["replaces"] == old.id
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    [status] = json.loads(out)["resources"]
    assert status["generation_status"] == "in_progress" and status["health"] == "Progressing"
    assert plan_json(ws, capsys)["actions"][0]["action"] == "refresh"  # the replacement stays


def test_replace_cancels_what_is_in_flight_and_submits_again(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """--replace on a resource in flight cancels its batch at the provider (superseded) and
    creates the replacement's: the plan says so first, apply that it sent the cancel (the
    batch is still cancelling, not yet cancelled)."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [action] = plan_json(ws, capsys, "--replace", "triage")["actions"]
    assert action["action"] == "replace" and "cancels generation" in action["reason"]

    code, out, err = run_cli(["apply", str(ws.root), "--replace", "triage", "--yes"], capsys)

    assert code == 0, err
    assert "[triage] replaced (apply --replace): cancel sent to 1 batch(es)" in out
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 1
    assert srv.probe.counts[CREATE] == 2
    with ws.store() as store:
        assert [g.status for g in store.generations("triage")] == ["superseded", "in_progress"]


def test_a_replace_skipped_for_want_of_allow_replace_is_said_once_while_apply_waits(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A spec changed while its batch runs, beside another resource still in flight: `apply
    --wait` passes over the skipped replace at every poll, and said "not replacing" at each;
    it is said once, and nothing is cancelled or created."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage"), ResourceSpec("other"))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    ws.write_input("triage", request_lines(4))
    argv = ["apply", str(ws.root), "--yes", "--wait", "--timeout", "0.6", *FAST]

    code, out, _ = run_cli(argv, capsys)

    assert code == 5, out
    assert out.count("not replacing") == 1, out
    assert srv.probe.counts[CREATE] == 2 and not srv.probe.counts["POST /batches/{id}/cancel"]


def test_replaces_skipped_for_many_resources_are_one_line_and_one_hint(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Specs changed for three resources in flight: apply's text says "not replacing" once
    and gives the --allow-replace hint once, in the summary that names all three (it said
    both once per resource); NDJSON still has one skip event per resource."""
    srv = server(**SLOW)
    names = ("a", "b", "c")
    ws = served(tmp_path / "ws", srv, *(ResourceSpec(n) for n in names))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    for name in names:
        ws.write_input(name, request_lines(4))

    code, out, _ = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 1, out
    assert out.count("not replacing") == 1 and out.count("--allow-replace") == 1, out
    assert "Apply did not replace a, b, c:" in out
    code, out, _ = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)
    skips = [e for e in json_lines(out) if e["event"] == "skip"]
    assert [e["resource"] for e in skips] == list(names)
    assert all("re-run with --allow-replace" in e["message"] for e in skips)
    assert srv.probe.counts[CREATE] == 3


def test_switching_back_to_a_spec_that_cancels_the_running_one_needs_consent(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Spec A completed, spec B running, then A put back: the replace submits nothing (A's
    answers are all there) but cancels B's batch, paid for. Taken for "nothing to approve"
    (0 requests), `apply --allow-replace` with no --yes and no terminal cancelled it; it
    needs consent, as any cancel on a paid provider does."""
    upstream = BuiltinUpstream()
    srv = server(upstream=upstream, drain_timeout=0.0)
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=2))
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    spec_a = ws.input_path("triage").read_text()
    upstream.latency = 30.0  # B stays in flight
    ws.write_input("triage", request_lines(3))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    ws.input_path("triage").write_text(spec_a)
    cancels = srv.probe.counts["POST /batches/{id}/cancel"]

    code, _, err = run_cli(["apply", str(ws.root), "--allow-replace"], capsys)

    assert code == 1 and "--yes" in err, err
    assert "cancel the batches in flight of triage" in err, err
    assert srv.probe.counts["POST /batches/{id}/cancel"] == cancels  # nothing cancelled
    argv = ["apply", str(ws.root), "--allow-replace", "--yes"]
    assert run_cli(argv, capsys)[0] == 0  # with consent: cancelled, A's answers written
    assert srv.probe.counts["POST /batches/{id}/cancel"] == cancels + 1
    with ws.store() as store:  # the audit log says which run gave that consent
        [consented, *_] = store.runs(limit=1)
    assert consented.args["allow_replace"] is True


@pytest.mark.parametrize("how", ["replace", "new-spec"])
def test_a_superseded_batch_that_ended_before_its_cancel_is_collected_not_paid_again(
    how: str,
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A batch that completed at the provider after the last poll, then superseded (`apply
    --replace`, or `--allow-replace` of a changed spec keeping unchanged answers): its cancel
    finds it ended, and its answers are collected and kept, never submitted and paid again."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [remote] = srv.client().batches.list().data
    assert wait_for_batch(srv.client(), remote.id).status == "completed"
    if how == "replace":
        argv = ["--replace", "triage"]
    else:  # one more request: the three answered ones are unchanged
        ws.write_input("triage", request_lines(4))
        argv = ["--allow-replace"]

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *argv, *FAST], capsys)

    assert code == 0, err
    assert srv.probe.counts["GET /files/{id}/content"] >= 1  # the ended batch's answers
    batches = srv.client().batches.list().data
    submitted = sum(b.request_counts.total for b in batches if b.request_counts)
    assert submitted == (3 if how == "replace" else 4)  # the first batch's 3, and 1 new
    assert [line["custom_id"] for line in ws.outputs("triage")] == ws.input_ids("triage")


def test_replace_reuses_succeeded_answers_unless_no_reuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--replace keeps the answers that succeeded (nothing to submit, results rewritten);
    --replace --no-reuse sends every request again; plan counts each exactly."""
    ws = local_ws(tmp_path / "ws")
    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] == 0

    plan = plan_json(ws, capsys, "--replace", "triage")
    assert (plan["requests_to_submit"], plan["requests_reused"]) == (0, 3)
    assert run_cli(["apply", str(ws.root), "--replace", "triage", "--wait", *FAST], capsys)[0] == 0
    with ws.store() as store:
        gens = store.generations("triage")
        assert len(gens) == 2 and gens[1].status == "complete"
        assert store.batches(gens[1].id) == []  # every answer kept: nothing submitted

    plan = plan_json(ws, capsys, "--replace", "triage", "--no-reuse")
    assert (plan["requests_to_submit"], plan["requests_reused"]) == (3, 0)
    argv = ["apply", str(ws.root), "--replace", "triage", "--no-reuse", "--wait", *FAST]
    assert run_cli(argv, capsys)[0] == 0
    with ws.store() as store:
        gens = store.generations("triage")
        assert len(gens) == 3 and gens[2].status == "complete"
        assert sum(b.requests for b in store.batches(gens[2].id)) == 3
        [event] = [e for e in store.events(resource="triage") if e.action == "replace"][-1:]
        assert event.detail["reuse"] is False
    assert len(ws.outputs("triage")) == 3
    assert plan_json(ws, capsys)["changes"] is False


def test_a_changed_input_after_a_no_reuse_replacement_keeps_the_replacements_answers(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    state_location: Path | str,
) -> None:
    """triage applied, then `apply --replace triage --no-reuse` (every request sent again:
    the user keeps none of the first answers), then req-5 changed: the five unchanged
    requests keep the replacement's answers, the newest for their very same lines. Two
    earlier generations answered each, and the carry-over took either: on PostgreSQL the
    first one's, the answers the user had thrown away."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=6))

    def apply(*extra: str) -> list[str]:
        argv = ["apply", str(ws.root), "--wait", "--yes", "--state", str(state_location)]
        code, out, err = run_cli([*argv, *FAST, *extra], capsys)
        assert code == 0, out + err
        return [str(r["id"]) for r in ws.outputs("triage")]

    first = apply()
    fresh = apply("--replace", "triage", "--no-reuse")
    assert not set(first) & set(fresh)
    lines = request_lines(6)
    lines[5]["body"]["messages"][0]["content"] = "Say something else."
    ws.write_input("triage", lines)

    kept = apply()

    assert kept[:5] == fresh[:5]
    assert kept[5] not in first + fresh


@pytest.mark.parametrize("how", ["replace", "metadata"])
def test_a_generation_that_keeps_every_answer_is_written_by_the_same_apply(
    how: str,
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a remote provider, a new generation with nothing to submit (`--replace`, or a
    changed `spec.metadata`: every answer kept) is written by the apply that records it, not
    left "in flight" for the next apply with no batch running."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    creates = srv.probe.counts[CREATE]
    if how == "replace":
        argv = ["--replace", "triage"]
    else:
        write_manifest(ws, ResourceSpec("triage", spec={"metadata": {"team": "a"}}))
        argv = []

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *argv], capsys)

    assert code == 0, err
    assert "Apply complete" in out and "in flight" not in out
    assert srv.probe.counts[CREATE] == creates  # nothing sent
    with ws.store() as store:
        assert [g.status for g in store.generations("triage")] == ["complete", "complete"]
    assert plan_json(ws, capsys)["changes"] is False


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--replace", "nobody"], id="unknown-name"),
        pytest.param(["--no-reuse"], id="no-reuse-without-replace"),
    ],
)
def test_replace_refuses_what_it_cannot_replace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """--replace of a name no manifest declares exits 1; --no-reuse alone is a usage error."""
    ws = local_ws(tmp_path / "ws")
    code, _, err = run_cli(["apply", str(ws.root), *argv], capsys)
    assert code in (1, 64) and "Error" in err
    assert not ws.state_path.exists() or "nobody" in err


def test_a_serial_create_is_not_sent_once_the_run_has_lost_its_lock(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A replace creates one batch at a time (its cancels come first). `unlock --force` of the
    run while its upload is held: the run stops before it sends the create, saying it lost
    the lock, and no batch of the new input reaches the provider."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    creates = srv.probe.counts[CREATE]
    ws.input_path("triage").write_text(
        "".join(json.dumps(line) + "\n" for line in request_lines(3, prefix="new"))
    )
    held = srv.probe.hold("POST /files", 60)
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes", "--allow-replace"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert held.wait(30), "the replace never uploaded its new input"
        with ws.store() as store:
            holder = current_lock(store)
        assert holder is not None
        unlock = ["unlock", holder.holder_id, "--force", "--state", str(ws.state_path)]
        assert run_cli(unlock, capsys)[0] == 0
    finally:
        srv.probe.release("POST /files")
    _, err = proc.communicate(timeout=60)

    assert proc.returncode != 0
    assert "no longer holds the state lock" in err and "Traceback" not in err
    assert srv.probe.counts[CREATE] == creates


def test_switching_back_to_an_unfinished_spec_waits_for_the_one_it_stops(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Two checkouts on two commits sharing one state, each applying its spec with
    --allow-replace: A's generation was replaced while unfinished, B's batch runs, then A
    again. A's generation exists, so its unanswered requests are retried, not created anew;
    that retry must wait, as a new generation's create does, for B's cancelled batch to stop
    (it keeps answering what it has in flight). It was sent at once: the requests B's batch
    finished while cancelling were sent and paid twice."""
    upstream = BuiltinUpstream(latency=0.3)
    srv = server(upstream=upstream, concurrency=1)
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    spec_a = ws.input_path("triage").read_text()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    wait_for(lambda: upstream.calls)  # A's first request is being answered
    ws.write_input("triage", request_lines(4))
    argv = ["apply", str(ws.root), "--yes", "--allow-replace", "--wait", "--timeout", "0.5", *FAST]
    assert run_cli(argv, capsys)[0] == 5  # A cancelled and drained, B created and running
    with ws.store() as store:
        assert [g.status for g in store.generations("triage")] == ["superseded", "in_progress"]
    ws.input_path("triage").write_text(spec_a)

    assert run_cli(["apply", str(ws.root), "--yes", "--allow-replace"], capsys)[0] == 0
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)  # B's batch may still be stopping
    held = "waits for generation 2 to stop first"
    with ws.store() as store:
        stopping = any(b.status == "cancelling" for b in store.batches(2))
    assert stopping and held in out, out
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err
    assert [line["custom_id"] for line in ws.outputs("triage")] == ws.input_ids("triage")
    assert max(upstream.calls.values()) == 1, upstream.calls


def test_a_generation_retired_again_is_held_from_its_latest_retirement(tmp_path: Path) -> None:
    """Two checkouts taking turns retire the same generation again and again: the hold on
    its requests counts from its latest retirement (a generation-wide ``cancel`` event), not
    its first, else every turn after the first outlived ``replaceHoldSeconds`` at once and its
    retry was sent beside the batch still stopping (paid twice)."""
    from batchspec.core.reconcile.hold import _cancelled_at
    from batchspec.state.records import parse_timestamp
    from batchspec.state.store import GenerationRow, StateStore

    with StateStore.open(tmp_path / "state.db") as store:
        store.upsert_resource("triage", provider="p", manifest="m.yaml", labels={}, run_id=None)

        def generation(spec_hash: str) -> GenerationRow:
            return store.create_generation(
                "triage",
                spec_hash=spec_hash,
                spec={},
                input_sha256="b" * 64,
                requests=3,
                input_bytes=10,
                output_path=None,
                errors_path=None,
                run_id=None,
            )

        gen = generation("a" * 64)
        first = store.record_event(None, "cancel", resource="triage", generation_id=gen.id)
        time.sleep(0.02)
        store.record_event(None, "cancel", resource="triage", generation_id=gen.id)
        events = store.generation_events(gen.id, "cancel", resource="triage")
        assert events[0].id == first and len(events) == 2
        assert _cancelled_at(store, "triage", gen) == parse_timestamp(events[-1].at).timestamp()
        assert _cancelled_at(store, "triage", gen) > parse_timestamp(events[0].at).timestamp()
        # a generation whose only cancels are its batches' (a run that failed after sending
        # its cancels ahead records those only): the latest of them, not its creation
        other = generation("c" * 64)
        batch = store.record_batch_intent(
            other.id,
            shard=0,
            attempt=1,
            provider="p",
            key="k",
            input_sha256="b" * 64,
            requests=3,
            reason=None,
        )
        time.sleep(0.02)
        store.record_event(
            None, "cancel", resource="triage", generation_id=other.id, batch_id=batch.id
        )
        [sent] = store.generation_events(other.id, "cancel", resource="triage")
        assert _cancelled_at(store, "triage", other) == parse_timestamp(sent.at).timestamp()


def test_a_held_retry_is_worded_as_a_retry() -> None:
    """The hold of a retry (a spec put back) says what it holds: retried requests, retrying
    anyway past its bound; a create's says created."""
    from batchspec.core.reconcile.hold import Hold

    retry = Hold(2, ("batch_1",), 3, until=100.0, expired=False, retry=True)
    assert "up to 3 of the retried request(s); nothing is retried until" in (
        retry.waiting_message(40.0)
    )
    assert "retrying anyway" in retry.expired_message()
    create = Hold(2, ("batch_1",), 3, until=100.0, expired=False)
    assert "nothing is created until it has, or for 60s more" in create.waiting_message(40.0)
    assert "creating anyway" in create.expired_message()
