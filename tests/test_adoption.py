"""Adoption among many remote batches: after a crash, apply adopts exactly its own batch.

The state holds a ``creating`` intent (the run was SIGKILLed while its create was answered,
or before the create arrived). The engine over loopback (the same app ``batchspec serve``
runs, behind a probe that counts requests) also holds decoy batches created with the
official openai SDK: another resource's, another shard's, another attempt's, one carrying
only some of batchspec's metadata keys, one with none; some older than the intent, some
newer (the provider lists newest first, so the newer decoys are seen first). The re-run must
bind the intent to the batch that carries its whole key, or create one if none does, and
never adopt a decoy nor create a second batch for a key that exists.
"""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from probes import ProbedServer
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

HOLD = 30.0
FAST = ["--poll-interval", "0.05"]

served = functools.partial(served, count=4)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def spec_hash_of(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code in (0, 2), err
    [action] = json.loads(out)["actions"]
    return str(action["spec_hash"])


def key_metadata(resource: str, spec: str, shard: int, attempt: int) -> dict[str, str]:
    return {
        "batchspec_resource": resource,
        "batchspec_spec": spec,
        "batchspec_shard": str(shard),
        "batchspec_attempt": str(attempt),
    }


def create_decoy(client: Any, metadata: dict[str, str]) -> str:
    """A batch someone else created on the same account, with ``metadata``; its id."""
    data = "".join(json.dumps(line) + "\n" for line in request_lines(2, prefix="decoy"))
    upload = client.files.create(file=("decoy.jsonl", io.BytesIO(data.encode())), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata,
    )
    return str(batch.id)


def crash_during_create(ws: Workspace, srv: ProbedServer, *, reached: bool) -> None:
    """Run apply in its own process and SIGKILL it inside its create call: after the engine
    created the batch (``reached``) or before the create arrived."""
    if reached:
        event = srv.probe.hold("POST /batches", HOLD, after=True)
    else:
        event = srv.probe.hold("POST /batches", HOLD, drop=True)
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes"),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert event.wait(20), "the create never reached the server"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        srv.probe.release("POST /batches")
    with ws.store() as store:
        [intent] = store.batches()
    assert (intent.remote_id, intent.status) == (None, "creating")


def bound_events(ws: Workspace) -> list[tuple[str, str]]:
    with ws.store() as store:
        return [
            (e.action, e.detail["remote_id"])
            for e in store.events(resource="triage")
            if e.action in ("create", "adopt")
        ]


def test_adopts_its_own_batch_among_decoys_older_and_newer(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash after the create reached the server, with other resources', other shards' and
    other attempts' batches and a batch carrying a subset of the key listed before and after
    it: the re-run adopts exactly the batch with the whole key and sends no create."""
    srv = server()
    client = srv.client()
    ws = served(tmp_path / "ws", srv)
    spec = spec_hash_of(ws, capsys)
    older = [
        create_decoy(client, key_metadata("other", spec, 0, 1)),  # another resource
        create_decoy(client, key_metadata("triage", spec, 1, 1)),  # another shard
    ]
    crash_during_create(ws, srv, reached=True)
    [own] = [b.id for b in client.batches.list(limit=100).data if b.id not in older]
    subset = key_metadata("triage", spec, 0, 1)
    del subset["batchspec_attempt"]
    newer = [
        create_decoy(client, key_metadata("triage", spec, 0, 2)),  # a later attempt
        create_decoy(client, key_metadata("triage", "f" * 64, 0, 1)),  # another spec
        create_decoy(client, {"project": "unrelated"}),  # no batchspec key at all
        create_decoy(client, subset),  # three of the four keys: not this intent's batch
    ]
    creates_before = srv.probe.counts["POST /batches"]

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    assert srv.probe.counts["POST /batches"] == creates_before  # nothing created again
    assert srv.batch_count() == len(older) + 1 + len(newer)
    assert bound_events(ws) == [("adopt", own)]
    with ws.store() as store:
        [batch] = store.batches()
    assert batch.remote_id == own
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")


def test_creates_once_when_only_decoys_carry_part_of_the_key(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash before the create arrived, with newer batches that share some of the intent's
    metadata (same resource and spec, another shard or attempt, or a subset of the keys): none
    is adopted; the re-run creates exactly one batch of its own."""
    srv = server()
    client = srv.client()
    # the lost create's confirm window (default: timeout + 60 s, waited out in full) is cut
    # to 1 s: the re-run still looks the key up among the decoys before it creates
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV, createConfirmSeconds=1)},
        resources=(ResourceSpec("triage", count=4),),
    )
    spec = spec_hash_of(ws, capsys)
    crash_during_create(ws, srv, reached=False)
    subset = key_metadata("triage", spec, 0, 1)
    del subset["batchspec_shard"]
    decoys = [
        create_decoy(client, key_metadata("triage", spec, 1, 1)),
        create_decoy(client, key_metadata("triage", spec, 0, 2)),
        create_decoy(client, subset),
    ]
    creates_before = srv.probe.counts["POST /batches"]

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    assert srv.probe.counts["POST /batches"] == creates_before + 1
    [(action, remote_id)] = bound_events(ws)
    assert action == "create" and remote_id not in decoys
    [latest] = client.batches.list(limit=1).data
    assert latest.id == remote_id
    assert latest.metadata["batchspec_attempt"] == "1"
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
