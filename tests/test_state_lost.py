"""Never pay twice when the state is lost: apply looks the key up before every first create.

A workspace is applied against the engine over loopback (the app ``batchspec serve`` runs,
behind a probe that counts requests), then its whole ``state/`` folder (database, result
store, shard files) is deleted and apply runs again. The provider must end up holding exactly
one batch per shard, the results must be complete and identical, and the lookup must stay
bounded: a keyed batch older than the completion window (plus the margin) is not adopted, and
the scan stops paging at it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from probes import Hold, ProbedServer
from servers import request_lines, wait_for_batch
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    json_lines,
    make_workspace,
    openai_provider,
    run_cli,
    served,
    write_manifest,
)

from batchspec.core.reconcile import adopt
from batchspec.providers.base import BatchListing

FAST = ["--poll-interval", "0.05"]
SHARDED = ResourceSpec("triage", count=6, spec={"limits": {"maxRequestsPerBatch": 2}})


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def lose_state(ws: Workspace) -> None:
    shutil.rmtree(ws.root / "state")


def converge(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    """`apply --wait --yes`, which must exit 0."""
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err


def assert_every_request_answered(ws: Workspace) -> None:
    """triage's results hold one answer (200) per request, in input order."""
    outputs = ws.outputs("triage")
    assert [r["custom_id"] for r in outputs] == ws.input_ids("triage")
    assert all(r["response"]["status_code"] == 200 for r in outputs)


def keys_on_server(srv: ProbedServer) -> list[tuple[str, str]]:
    """(shard, attempt) of every batch the server holds for resource triage (the attempt's
    number, without the digest of a shard file's content)."""
    rows = srv.client().batches.list(limit=100).data
    return sorted(
        (b.metadata["batchspec_shard"], b.metadata["batchspec_attempt"].partition("k")[0])
        for b in rows
        if (b.metadata or {}).get("batchspec_resource") == "triage"
    )


def events(ws: Workspace, action: str) -> list[dict[str, Any]]:
    with ws.store() as store:
        return [e.detail for e in store.events(resource="triage") if e.action == action]


def test_apply_wait_after_the_state_is_deleted_adopts_every_shard_and_restores_results(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """apply --wait, delete state/, apply --wait again: no second create, one batch per shard
    on the server, each adopted after a recorded lookup, results complete and identical."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    first = ws.output_path("triage").read_bytes()
    creates = srv.probe.counts["POST /batches"]
    assert creates == 3
    lose_state(ws)

    converge(ws, capsys)

    assert srv.probe.counts["POST /batches"] == creates
    assert keys_on_server(srv) == [("0", "1"), ("1", "1"), ("2", "1")]
    lookups = events(ws, "lookup")
    assert len(lookups) == 3 and all(d["remote_id"] for d in lookups)
    assert len(events(ws, "adopt")) == 3 and not events(ws, "create")
    assert ws.output_path("triage").read_bytes() == first
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")


def test_apply_after_a_submit_only_run_lost_its_state_adopts_and_collects(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """apply without --wait (batches only submitted), delete state/, apply --wait: the batches
    in flight are adopted, not created again, and their results are collected complete."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0, err
    assert srv.probe.counts["POST /batches"] == 3
    lose_state(ws)

    converge(ws, capsys)

    assert srv.probe.counts["POST /batches"] == 3
    assert keys_on_server(srv) == [("0", "1"), ("1", "1"), ("2", "1")]
    assert len(events(ws, "adopt")) == 3
    assert_every_request_answered(ws)


def spec_hash_of(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code in (0, 2), err
    [action] = json.loads(out)["actions"]
    return str(action["spec_hash"])


def create_aged_batch(
    srv: ProbedServer, metadata: dict[str, str], age: int, data: str | None = None
) -> str:
    """A batch of ``data`` (else two other requests) created through the SDK, then dated
    ``age`` seconds back in the engine."""
    client = srv.client()
    if data is None:
        data = "".join(json.dumps(line) + "\n" for line in request_lines(2, prefix="old"))
    upload = client.files.create(file=("old.jsonl", io.BytesIO(data.encode())), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata,
    )
    with srv.engine.store.write() as db:
        db.execute("UPDATE batches SET created_at = created_at - ? WHERE id = ?", (age, batch.id))
    return str(batch.id)


def test_a_keyed_batch_older_than_the_window_is_not_adopted_and_paging_stops(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch with the shard's whole key but created three days ago, behind four other old
    batches, two per page: the lookup reads one page, stops at the first old batch, adopts
    nothing, and apply creates one new batch."""
    monkeypatch.setattr(adopt, "LOOKUP_PAGE_SIZE", 2)
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    spec = spec_hash_of(ws, capsys)
    key = {
        "batchspec_resource": "triage",
        "batchspec_spec": spec,
        "batchspec_shard": "0",
        "batchspec_attempt": "1",
    }
    three_days = 3 * 86400
    stale = create_aged_batch(srv, key, three_days)
    for n in range(4):
        create_aged_batch(srv, {"project": f"old-{n}"}, three_days)
    lists_before = srv.probe.counts["GET /batches"]
    creates_before = srv.probe.counts["POST /batches"]

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert srv.probe.counts["GET /batches"] - lists_before == 1
    assert srv.probe.counts["POST /batches"] == creates_before + 1
    [lookup] = events(ws, "lookup")
    assert lookup["remote_id"] is None
    assert (lookup["listed"], lookup["stopped_at_window"]) == (1, True)
    [created] = events(ws, "create")
    assert created["remote_id"] != stale


@pytest.mark.parametrize("age", [3600, 23 * 3600 + 1800], ids=["an hour", "23.5 hours"])
def test_a_keyed_batch_within_the_window_is_adopted_even_pages_back(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    age: int,
) -> None:
    """A batch with the shard's whole key made an hour ago (or 23.5 hours ago, late in its
    24-hour window), behind four newer unrelated batches (two per page): the lookup pages on
    to it and apply adopts it, creating none, and collects its results."""
    monkeypatch.setattr(adopt, "LOOKUP_PAGE_SIZE", 2)
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    spec = spec_hash_of(ws, capsys)
    key = {
        "batchspec_resource": "triage",
        "batchspec_spec": spec,
        "batchspec_shard": "0",
        "batchspec_attempt": "1",
    }
    own = create_aged_batch(srv, key, age, ws.input_path("triage").read_text())
    for n in range(4):
        create_aged_batch(srv, {"project": f"new-{n}"}, 0)
    creates_before = srv.probe.counts["POST /batches"]

    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, err
    assert srv.probe.counts["POST /batches"] == creates_before
    [lookup] = events(ws, "lookup")
    assert (lookup["remote_id"], lookup["listed"]) == (own, 5)
    assert [d["remote_id"] for d in events(ws, "adopt")] == [own]
    converge(ws, capsys)
    assert srv.probe.counts["POST /batches"] == creates_before
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")


def typed_workspace(root: Path, kind: str, base_url: str) -> Workspace:
    provider = {"type": kind, "baseUrl": base_url, "apiKeyEnv": KEY_ENV}
    spec = {"limits": {"maxRequestsPerBatch": 2}}
    return make_workspace(
        root, providers={"p": provider}, resources=[ResourceSpec("triage", 4, "p", spec)]
    )


@pytest.mark.parametrize("kind", ["mistral", "gemini"])
def test_mistral_and_gemini_batches_are_adopted_after_the_state_is_lost(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    """Mistral (key in the job's metadata) and Gemini (key in the display name) against serve:
    apply --wait, delete state/, apply --wait: still one batch per shard, results identical."""
    srv = server()
    ws = typed_workspace(tmp_path / "ws", kind, srv.base_url)
    converge(ws, capsys)
    first = ws.output_path("triage").read_bytes()
    assert srv.batch_count() == 2
    lose_state(ws)

    converge(ws, capsys)

    assert srv.batch_count() == 2
    assert len(events(ws, "adopt")) == 2 and not events(ws, "create")
    assert ws.output_path("triage").read_bytes() == first


def test_a_gemini_batch_older_than_the_manifests_window_but_within_geminis_is_adopted(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Gemini runs a batch up to 48 hours whatever completionWindow says (24h): its batches
    made 30 hours ago are adopted after the state is lost, not skipped as older than the
    manifest's window and created, and paid for, again."""
    srv = server()
    ws = typed_workspace(tmp_path / "ws", "gemini", srv.base_url)
    converge(ws, capsys)
    with srv.engine.store.write() as db:
        db.execute("UPDATE batches SET created_at = created_at - ?", (30 * 3600,))
    lose_state(ws)

    converge(ws, capsys)

    assert srv.batch_count() == 2
    assert len(events(ws, "adopt")) == 2 and not events(ws, "create")


def test_anthropic_batches_are_not_recognised_after_the_state_is_lost(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """What docs/state-backends.md says plainly: Anthropic batches carry no metadata and the
    journal under state/ is gone, so the lookup finds nothing and a new batch is created."""
    srv = server()
    ws = typed_workspace(tmp_path / "ws", "anthropic", srv.base_url)
    converge(ws, capsys)
    lose_state(ws)

    converge(ws, capsys)

    assert srv.batch_count() == 4
    assert all(d["remote_id"] is None for d in events(ws, "lookup"))


def test_creates_and_adoptions_say_which_shard_and_how_many_requests(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """What CI reads: each bound batch is reported once, "created" on the first run and
    "adopted" after the state was lost, with its shard counted from 1 in the message and the
    NDJSON (shards of 2, 2 and 1 requests: "1 request" in the singular)."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=5, spec=SHARDED.spec))

    def bound(event: str) -> list[tuple[str, int, int, int]]:
        code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)
        assert code == 0, err
        rows = [e for e in json_lines(out) if e.get("event") in ("create", "adopt")]
        assert {e["event"] for e in rows} == {event}
        return [
            (
                re.sub(r"batch \S+ ", "batch ID ", e["message"]),
                e["shard"],
                e["attempt"],
                e["requests"],
            )
            for e in rows
        ]

    verb = {"create": "created", "adopt": "adopted"}
    for event in ("create", "adopt"):
        assert bound(event) == [
            (f"{verb[event]} batch ID (shard 1, attempt 1, 2 requests)", 1, 1, 2),
            (f"{verb[event]} batch ID (shard 2, attempt 1, 2 requests)", 2, 1, 2),
            (f"{verb[event]} batch ID (shard 3, attempt 1, 1 request)", 3, 1, 1),
        ]
        lose_state(ws)


def test_a_lost_state_does_not_adopt_a_batch_of_a_generation_that_kept_answers(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A generation that keeps earlier answers sends only what changed, in shards of its own
    (here shard 1 = the one changed request, req-5): its keys must not be those of the full
    input's shards, which a lost state computes. Adopted as shard 1 (req-0, req-1), that batch
    answers none of its requests: apply refused the download on every run ('served another
    file's content'), the resource stuck until `--replace` paid for it all again."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    lines = request_lines(6)
    lines[5]["body"]["messages"][0]["content"] = "Say something else."
    ws.write_input("triage", lines)
    converge(ws, capsys)
    assert srv.probe.counts["POST /batches"] == 4  # the changed request alone, in shard 1
    lose_state(ws)

    converge(ws, capsys)

    assert_every_request_answered(ws)


def test_a_lost_state_with_other_shard_limits_does_not_adopt_batches_of_another_layout(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`limits` is not part of the spec hash, but it decides which requests each shard
    holds: after the state is lost and maxRequestsPerBatch changed (2 to 4), shard 2 of
    the new layout (req-4, req-5) must not be bound to the old shard 2's batch (req-2, req-3):
    answering none of its requests, it was refused as another file's content on every run."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    lose_state(ws)
    write_manifest(ws, ResourceSpec("triage", count=6, spec={"limits": {"maxRequestsPerBatch": 4}}))

    converge(ws, capsys)

    assert_every_request_answered(ws)


def test_a_lost_state_adopts_the_batches_a_renamed_resource_made_under_its_old_name(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """triage applied, renamed triage2 with `moved: {from: triage}` (a pure rename), then the
    state lost: the batches made under the old name carry its key (old name, old spec hash),
    so the lookup tries that key too, and nothing is created again. It looked up the new
    name's key only, and paid for every request a second time."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    path = ws.manifest_path("triage")
    doc = yaml.safe_load(path.read_text())
    doc["metadata"].update(name="triage2", moved={"from": "triage"})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    converge(ws, capsys)
    lose_state(ws)

    converge(ws, capsys)

    assert srv.probe.counts["POST /batches"] == 3
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")


def test_a_replacement_after_a_lost_state_does_not_adopt_the_old_names_batches(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """triage applied, renamed triage2 (`moved: {from: triage}`), the state lost, then
    `apply --replace triage2 --no-reuse`: a replacement's keys carry its own spec hash, and
    the name it moved from never made a batch of that spec. The lookup under the old name
    must not take the old name's ordinary batches for the replacement's: the answers asked
    for again would silently be the old ones."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    path = ws.manifest_path("triage")
    doc = yaml.safe_load(path.read_text())
    doc["metadata"].update(name="triage2", moved={"from": "triage"})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    converge(ws, capsys)
    lose_state(ws)

    replace = ["--replace", "triage2", "--no-reuse"]
    code, _, err = run_cli(["apply", str(ws.root), *replace, "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    assert srv.probe.counts["POST /batches"] == 6


def requests_sent(srv: ProbedServer) -> int:
    """How many requests every batch the server holds carried: what the provider bills."""
    return sum(b.request_counts.total for b in srv.client().batches.list(limit=100).data)


def keep_answers_then_lose_the_state(
    ws: Workspace, srv: ProbedServer, capsys: pytest.CaptureFixture[str]
) -> bytes:
    """triage applied (6 requests in 3 batches), then req-5 changed and applied (one batch
    of req-5 alone: the other five keep their answers), then state/ deleted; the results."""
    converge(ws, capsys)
    lines = request_lines(6)
    lines[5]["body"]["messages"][0]["content"] = "Say something else."
    ws.write_input("triage", lines)
    converge(ws, capsys)
    assert requests_sent(srv) == 7
    answered = ws.output_path("triage").read_bytes()
    lose_state(ws)
    return answered


@pytest.mark.parametrize("replace", [False, True], ids=["apply", "apply --replace"])
def test_a_lost_state_after_a_generation_that_kept_answers_sends_no_request_again(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    replace: bool,
) -> None:
    """triage applied (6 requests, 3 batches), req-5 changed and applied again (the other
    five keep their answers: one batch of req-5 alone), then the state lost. Every request's
    answer is at the provider: req-0..req-4 in the first generation's batches, whose
    requests are the very same lines, req-5 in the second's. apply --wait (or apply
    --replace triage, which keeps answers) must send none of them again; it found only keys
    of the current spec, drew its shards afresh and paid for all six."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    answered = keep_answers_then_lose_the_state(ws, srv, capsys)

    argv = ["apply", str(ws.root), "--wait", "--yes", *FAST]
    code, out, err = run_cli([*argv, *(["--replace", "triage"] if replace else [])], capsys)

    assert code == 0, err
    assert requests_sent(srv) == 7
    assert srv.probe.counts["POST /batches"] == 4
    assert ws.output_path("triage").read_bytes() == answered
    # none of the answers kept was recorded by this state: the line does not say so
    said = out + err
    kept = 6 if replace else 5
    assert f"{kept} keep the answers found at the provider" in said, said
    assert "keep their recorded results" not in said, said
    [recovered] = events(ws, "recover")
    assert recovered["requests"] == (6 if replace else 5)
    assert len(recovered["batches"]) == (4 if replace else 3)
    assert len(events(ws, "adopt")) == (0 if replace else 1)


def test_a_lost_state_does_not_keep_answers_of_a_batch_made_after_the_specs_own(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """triage applied (3 batches), then a batch of triage under another spec hash made
    after them, answering req-0 (as `apply --replace` sends a failed request again), then
    the state lost. The spec's own batches were drawn from the whole input: kept from the
    later batch, req-0's answer left it out of the shards drawn now, whose keys then named
    none of the batches made, and five requests were paid for again. apply adopts the
    three and creates nothing."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    first = ws.output_path("triage").read_bytes()
    with srv.engine.store.write() as db:  # made a minute before the later batch
        db.execute("UPDATE batches SET created_at = created_at - 60")
    later = {
        "batchspec_resource": "triage",
        "batchspec_spec": "f" * 64,
        "batchspec_shard": "0",
        "batchspec_attempt": "1",
    }
    req0 = ws.input_path("triage").read_text().splitlines(keepends=True)[0]
    wait_for_batch(srv.client(), create_aged_batch(srv, later, 0, req0))
    lose_state(ws)

    converge(ws, capsys)

    assert srv.probe.counts["POST /batches"] == 4  # the first 3 and the later one
    assert len(events(ws, "adopt")) == 3 and not events(ws, "create")
    assert not events(ws, "recover")
    assert ws.output_path("triage").read_bytes() == first


def test_a_state_restored_from_an_old_backup_keeps_answers_of_generations_it_never_saw(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """triage applied and its state/ backed up; req-5 changed and applied (one batch: req-5),
    then req-4 changed too and applied (one batch: req-4; req-5 kept from the second
    generation); then the backup restored. The restored state knows only the first
    generation, so apply replaces it (the serial step): req-5's new answer is in a batch it
    never saw, and was sent and paid for again with req-4. Kept from that batch, req-4 is
    left alone in its shard, whose batch is adopted by key: nothing is sent."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    backup = tmp_path / "backup"
    shutil.copytree(ws.root / "state", backup)
    lines = request_lines(6)
    lines[5]["body"]["messages"][0]["content"] = "Say something else."
    ws.write_input("triage", lines)
    converge(ws, capsys)
    lines[4]["body"]["messages"][0]["content"] = "Say something new."
    ws.write_input("triage", lines)
    converge(ws, capsys)
    answered = ws.output_path("triage").read_bytes()
    assert (requests_sent(srv), srv.probe.counts["POST /batches"]) == (8, 5)
    lose_state(ws)
    shutil.copytree(backup, ws.root / "state")

    converge(ws, capsys)

    assert (requests_sent(srv), srv.probe.counts["POST /batches"]) == (8, 5)
    assert ws.output_path("triage").read_bytes() == answered
    [recovered] = events(ws, "recover")
    assert recovered["requests"] == 1 and len(recovered["batches"]) == 1


def test_input_files_the_provider_will_not_serve_are_said_and_their_requests_sent_again(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """The provider refuses (400) the download of the first generation's input files (OpenAI
    may, for files of purpose batch): nothing proves those answers are for the very same
    lines, so their requests are sent again, as before the state kept none, and apply does
    not fail for it; the `recover` event names each batch it could not read."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    keep_answers_then_lose_the_state(ws, srv, capsys)
    inputs = [b.input_file_id for b in srv.client().batches.list(limit=100).data]
    refused = {"error": {"message": "Not allowed to download files of purpose: batch"}}
    for file_id in inputs:
        srv.probe.refuse(f"^GET /v1/files/{file_id}/content$", 400, refused)

    converge(ws, capsys)

    assert requests_sent(srv) == 13
    [recovered] = events(ws, "recover")
    assert recovered["requests"] == 0 and recovered["unreadable"].count("purpose: batch") == 3
    assert_every_request_answered(ws)


def test_a_provider_down_while_answers_are_recovered_sends_nothing_until_it_is_back(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """File downloads answer 500 (no retries): apply stops naming triage, having created
    nothing, rather than pay for the requests whose answers it could not read; once the
    provider is back, the next apply keeps them and sends none."""
    srv = server()
    provider = openai_provider(srv.v1, KEY_ENV, maxRetries=0)
    ws = make_workspace(tmp_path / "ws", providers={"srv": provider}, resources=[SHARDED])
    answered = keep_answers_then_lose_the_state(ws, srv, capsys)
    srv.probe.refuse(r"^GET /v1/files/[^/]+/content$", 500, {"error": {"message": "down"}})

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code != 0 and "[triage]" in err
    assert srv.probe.counts["POST /batches"] == 4
    srv.probe.refusals.clear()
    converge(ws, capsys)
    assert (requests_sent(srv), srv.probe.counts["POST /batches"]) == (7, 4)
    assert ws.output_path("triage").read_bytes() == answered


def age_batches(srv: ProbedServer, seconds: int) -> None:
    """Every batch the engine holds made (and ended) ``seconds`` earlier: the steps of a
    test run apart in time, as a user's do (within one second every batch ends "before"
    every other is made)."""
    sets = ", ".join(
        f"{c} = {c} - {int(seconds)}"
        for c in ("created_at", "in_progress_at", "finalizing_at", "completed_at")
    )
    with srv.engine.store.write() as db:
        db.execute(f"UPDATE batches SET {sets}")


def answer_ids(ws: Workspace) -> list[str]:
    """The provider's id of each answer in triage's results (one per batch request)."""
    return [str(r["id"]) for r in ws.outputs("triage")]


def test_a_lost_state_does_not_bring_back_answers_replaced_with_no_reuse(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """triage applied, req-5 changed and applied (req-5 alone sent), then `apply --replace
    triage --no-reuse`: every request sent again, the user keeping none of the answers
    before. Then the state lost. The results must be the replacement's answers, as the state
    that recorded it shows, with nothing sent: they were the first generation's answers the
    user threw away (kept from its batches, made before the spec's own) and req-5's old one."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    age_batches(srv, 600)
    lines = request_lines(6)
    lines[5]["body"]["messages"][0]["content"] = "Say something else."
    ws.write_input("triage", lines)
    converge(ws, capsys)
    age_batches(srv, 300)
    replace = ["--replace", "triage", "--no-reuse"]
    code, _, err = run_cli(["apply", str(ws.root), *replace, "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    fresh = answer_ids(ws)
    sent = requests_sent(srv)
    lose_state(ws)

    converge(ws, capsys)

    assert answer_ids(ws) == fresh
    assert requests_sent(srv) == sent == 13
    [recovered] = events(ws, "recover")
    assert recovered["requests"] == 6


@pytest.mark.parametrize("ending", [b"\r\n", b"\r\r\n"], ids=["CRLF", "CR CRLF"])
@pytest.mark.parametrize("shards", [1, 3], ids=["sent as it is", "in shard files"])
def test_a_lost_state_keeps_the_answers_of_lines_ending_in_carriage_returns(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    ending: bytes,
    shards: int,
) -> None:
    """An input whose lines end "\\r\\r\\n" (a CRLF file converted twice): each request is
    its line without "\\r\\n" ("...}\\r", the request index's rule), which the provider's
    input file holds as "...}\\r\\r\\n" (the input sent as it is) or "...}\\r\\n" (a shard
    file ends the request with "\\n"). Both lines were hashed without every trailing
    "\\r", so none matched: after the state was lost every request the second generation
    kept was sent and paid for again, where the state that recorded them sent none."""
    srv = server()
    limits = {"limits": {"maxRequestsPerBatch": 2}} if shards > 1 else {}
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=6, spec=limits))
    lines = request_lines(6)

    def write(lines: list[dict[str, Any]]) -> None:
        raw = b"".join(json.dumps(line).encode() + ending for line in lines)
        ws.input_path("triage").write_bytes(raw)

    write(lines)
    converge(ws, capsys)
    age_batches(srv, 600)
    lines[5]["body"]["messages"][0]["content"] = "Say something else."
    write(lines)
    converge(ws, capsys)
    answered = answer_ids(ws)
    assert requests_sent(srv) == 7
    lose_state(ws)

    converge(ws, capsys)

    assert requests_sent(srv) == 7
    assert answer_ids(ws) == answered
    [recovered] = events(ws, "recover")
    assert recovered["requests"] == 5


def test_expired_output_files_are_said_on_the_run_output_and_their_requests_sent_again(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """The first generation's output files are gone at the provider (404: OpenAI keeps them
    30 days): the five requests kept from them are sent again, results complete. What the
    run prints says so (text and the `recover` NDJSON event, naming each batch): it was only
    in the state's audit log, and CI saw a plain create of six requests where the plan and
    the last run had kept five."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    keep_answers_then_lose_the_state(ws, srv, capsys)
    listed = srv.client().batches.list(limit=100).data
    gone = [b for b in listed if b.request_counts.total == 2]
    assert len(gone) == 3
    for batch in gone:
        expired = {"error": {"message": f"No such File object: {batch.output_file_id}"}}
        srv.probe.refuse(f"^GET /v1/files/{batch.output_file_id}/content$", 404, expired)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 0, err
    [said] = [e for e in json_lines(out) if e.get("event") == "recover"]
    assert said["recovered"] == 0 and len(said["unreadable"]) == 3
    assert all(b.id in said["message"] for b in gone)
    assert "3 batch(es) of earlier generations could not be read" in said["message"]
    [recorded] = events(ws, "recover")
    assert recorded["requests"] == 0 and recorded["unreadable"].count("HTTP 404") == 3
    converge(ws, capsys)
    assert requests_sent(srv) == 13
    assert_every_request_answered(ws)


def test_a_lost_state_does_not_keep_answers_a_batch_gave_after_it_was_cancelled_late(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """triage applied; its third shard's batch (req-4, req-5) was still stopping when req-5
    changed and the next generation drew its shards (the hold past `replaceHoldSeconds`):
    that generation sent req-4 and req-5 in one batch. The old batch then ended cancelled
    with req-4 answered (no `completed_at`; `cancelled_at` after the new batch was made).
    After the state is lost, req-4 must not be kept from it: the batch was taken as ended
    when it was made, req-4 left req-5 alone in a shard whose key named no batch, and req-5
    was sent and paid for again where the new generation's batch is adopted."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    age_batches(srv, 3600)
    listed = srv.client().batches.list(limit=100).data
    [late] = [b for b in listed if b.metadata["batchspec_shard"] == "2"]
    db = sqlite3.connect(ws.state_path)  # its answers came after the next generation drew
    db.execute("UPDATE requests SET state = 'failed' WHERE custom_id = 'req-4'")
    db.commit()
    db.close()
    lines = request_lines(6)
    lines[5]["body"]["messages"][0]["content"] = "Say something else."
    ws.write_input("triage", lines)
    converge(ws, capsys)
    assert requests_sent(srv) == 8
    answered = ws.output_path("triage").read_bytes()
    [newest] = srv.client().batches.list(limit=1).data
    with srv.engine.store.write() as engine_db:
        engine_db.execute(
            "UPDATE batches SET status = 'cancelled', completed_at = NULL, cancelled_at = ? "
            "WHERE id = ?",
            (newest.created_at + 60, late.id),
        )
    lose_state(ws)

    converge(ws, capsys)

    assert requests_sent(srv) == 8
    assert [d["remote_id"] for d in events(ws, "adopt")] == [newest.id]
    [recovered] = events(ws, "recover")
    assert recovered["requests"] == 4 and late.id not in recovered["batches"]
    assert ws.output_path("triage").read_bytes() == answered


def test_answers_kept_after_a_lost_state_are_downloaded_again_when_the_store_is_gone(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """After a lost state kept five answers from the first generation's output files,
    state/store/ and the results are deleted (a runner that keeps only the database, a
    state moved without its blobs): apply restores the results, downloading those files
    again as it does a collected batch's. No batch of this state names them, so the run
    failed: "the stored file ... is not in state/store/", though the provider had them."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    keep_answers_then_lose_the_state(ws, srv, capsys)
    converge(ws, capsys)
    answered = ws.output_path("triage").read_bytes()
    [recovered] = events(ws, "recover")
    assert len(set(recovered["files"].values())) == 3
    shutil.rmtree(ws.root / "state" / "store")
    ws.output_path("triage").unlink()

    converge(ws, capsys)

    assert ws.output_path("triage").read_bytes() == answered
    assert requests_sent(srv) == 7


def hold_the_nth(srv: ProbedServer, route: str, n: int) -> Hold:
    """Hold the ``n``-th request to ``route`` from now on (30 s, or until released)."""
    probe = srv.probe
    take = probe._take_hold
    hold = Hold(30.0, False, False, None, None)
    nth = probe.counts[route] + n

    def take_nth(seen: str) -> Hold | None:
        found = take(seen)
        return hold if seen == route and probe.counts[seen] == nth else found

    probe._take_hold = take_nth  # type: ignore[method-assign]
    return hold


@pytest.mark.parametrize("nth", [1, 2], ids=["an input file", "an output file"])
def test_apply_killed_while_it_recovers_answers_pays_nothing_twice_on_the_rerun(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    nth: int,
) -> None:
    """SIGKILL of an apply (its own process) while it downloads an earlier generation's
    input file (nothing of the generation recorded yet) or output file (the store holds a
    part): the rerun keeps the same answers, sends nothing more, and writes the results
    the run that never lost its state wrote."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    answered = keep_answers_then_lose_the_state(ws, srv, capsys)
    hold = hold_the_nth(srv, "GET /files/{id}/content", nth)
    argv = ["apply", str(ws.root), "--wait", "--yes", *FAST]
    proc = subprocess.Popen(
        batchspec_cmd(*argv),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert hold.reached.wait(30), "the download never reached the server"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        hold.released.set()
        if proc.poll() is None:
            proc.kill()

    converge(ws, capsys)

    assert (requests_sent(srv), srv.probe.counts["POST /batches"]) == (7, 4)
    assert ws.output_path("triage").read_bytes() == answered
    [recovered] = events(ws, "recover")
    assert recovered["requests"] == 5


def test_an_answer_in_an_earlier_batchs_output_for_a_request_it_was_not_sent_is_not_kept(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """An earlier generation's batch (another spec hash of triage) was sent req-0 alone, but
    its output file also answers req-1 (a provider's or gateway's mix-up). Only req-0 is
    kept: req-1's line is not in that batch's input, so its answer there is for nothing
    this input asks; req-1 and req-2 are sent."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    req0 = ws.input_path("triage").read_text().splitlines(keepends=True)[0]
    key = {
        "batchspec_resource": "triage",
        "batchspec_spec": "f" * 64,
        "batchspec_shard": "0",
        "batchspec_attempt": "1",
    }
    client = srv.client()
    old = wait_for_batch(client, create_aged_batch(srv, key, 600, req0))
    output = client.files.content(old.output_file_id).content
    stray = json.loads(output)
    stray.update(custom_id="req-1", id="batch_req_stray")
    stray["response"]["body"]["choices"][0]["message"]["content"] = "WRONG"
    mixed = output + json.dumps(stray).encode() + b"\n"
    upload = client.files.create(file=("out.jsonl", io.BytesIO(mixed)), purpose="batch")
    with srv.engine.store.write() as db:
        db.execute("UPDATE batches SET output_file_id = ? WHERE id = ?", (upload.id, old.id))

    converge(ws, capsys)

    outputs = ws.outputs("triage")
    assert [r["custom_id"] for r in outputs] == ["req-0", "req-1", "req-2"]
    assert outputs[0]["id"] == json.loads(output)["id"]
    assert "WRONG" not in ws.output_path("triage").read_text()
    [recovered] = events(ws, "recover")
    assert (recovered["requests"], recovered["batches"]) == (1, [old.id])
    assert requests_sent(srv) == 1 + 2


def test_a_no_reuse_replacement_after_one_that_sent_nothing_is_still_seen_after_a_lost_state(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """triage applied (6 answers), then `apply --replace triage` (every answer kept: the
    replacement makes no batch), then `apply --replace triage --no-reuse` (all six sent
    again, the answers before thrown away), then the state lost. The scan for the newest
    no-reuse replacement stopped at replacement 1, which the listing does not hold: the
    second was never seen, and the spec's own batches, the very answers the user threw
    away, were adopted as the results. They must be the no-reuse replacement's, sent
    nothing."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    age_batches(srv, 600)
    argv = ["apply", str(ws.root), "--wait", "--yes", *FAST]
    code, _, err = run_cli([*argv, "--replace", "triage"], capsys)
    assert code == 0, err
    assert srv.probe.counts["POST /batches"] == 3  # every answer kept: no batch made
    code, _, err = run_cli([*argv, "--replace", "triage", "--no-reuse"], capsys)
    assert code == 0, err
    fresh = answer_ids(ws)
    sent = requests_sent(srv)
    assert sent == 12
    lose_state(ws)

    converge(ws, capsys)

    assert requests_sent(srv) == sent
    assert answer_ids(ws) == fresh


def test_a_lost_state_keeps_the_newest_answer_of_a_line_however_the_provider_lists(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """triage applied, then `apply --replace triage --no-reuse` (all six answered again, the
    first answers thrown away), then req-5 changed and applied (the other five keep the
    replacement's answers), then the state lost, on a server that lists its batches oldest
    first (a compatible server may). Two earlier generations answered req-0..req-4 with the
    very same lines: the batches were read in the listing's order and the first answer
    found kept, the oldest, the one the user threw away. The newest is kept, as carry-over
    keeps it."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    age_batches(srv, 900)
    argv = ["apply", str(ws.root), "--wait", "--yes", *FAST]
    code, _, err = run_cli([*argv, "--replace", "triage", "--no-reuse"], capsys)
    assert code == 0, err
    age_batches(srv, 300)
    lines = request_lines(6)
    lines[5]["body"]["messages"][0]["content"] = "Say something else."
    ws.write_input("triage", lines)
    converge(ws, capsys)
    fresh = answer_ids(ws)
    sent = requests_sent(srv)
    assert sent == 13
    lose_state(ws)
    listed_since = BatchListing.listed_since

    def oldest_first(self: BatchListing, since: float) -> list[Any]:
        return list(reversed(listed_since(self, since)))

    monkeypatch.setattr(BatchListing, "listed_since", oldest_first)

    converge(ws, capsys)

    assert requests_sent(srv) == sent
    assert answer_ids(ws) == fresh


def test_a_batch_cancelled_late_is_told_from_its_object_read_back_when_listed_trimmed(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As ``test_a_lost_state_does_not_keep_answers_a_batch_gave_after_it_was_cancelled_late``,
    behind a gateway whose listing trims ended batches (no file ids, no end times: each is
    read back by id). The late batch was judged on its listed object, taken as ended when
    it was made, and its answer kept once read back: req-4 left req-5 alone in a shard whose
    key named no batch, and req-5 was paid for again. Its end is read from the object read
    back."""
    srv = server()
    ws = served(tmp_path / "ws", srv, SHARDED)
    converge(ws, capsys)
    age_batches(srv, 3600)
    listed = srv.client().batches.list(limit=100).data
    [late] = [b for b in listed if b.metadata["batchspec_shard"] == "2"]
    db = sqlite3.connect(ws.state_path)
    db.execute("UPDATE requests SET state = 'failed' WHERE custom_id = 'req-4'")
    db.commit()
    db.close()
    lines = request_lines(6)
    lines[5]["body"]["messages"][0]["content"] = "Say something else."
    ws.write_input("triage", lines)
    converge(ws, capsys)
    assert requests_sent(srv) == 8
    answered = ws.output_path("triage").read_bytes()
    [newest] = srv.client().batches.list(limit=1).data
    with srv.engine.store.write() as engine_db:
        engine_db.execute(
            "UPDATE batches SET status = 'cancelled', completed_at = NULL, cancelled_at = ? "
            "WHERE id = ?",
            (newest.created_at + 60, late.id),
        )
    lose_state(ws)
    listed_since = BatchListing.listed_since

    def trimmed(self: BatchListing, since: float) -> list[Any]:
        return [
            dataclasses.replace(
                r, output_file_id=None, error_file_id=None, completed_at=None, ended_at=None
            )
            if r.is_terminal
            else r
            for r in listed_since(self, since)
        ]

    monkeypatch.setattr(BatchListing, "listed_since", trimmed)

    converge(ws, capsys)

    assert requests_sent(srv) == 8
    [recovered] = events(ws, "recover")
    assert late.id not in recovered["batches"]
    assert ws.output_path("triage").read_bytes() == answered
