"""Attacks on the ledger written after the create: SIGKILL an apply while its creates are in
the provider's hands (one shard, several, with answers carried over from an earlier
generation), then re-run: exactly one batch per shard, no request paid twice, every result."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from probes import ProbedServer
from serve_faults import received_batches
from servers import request_lines
from test_crash_safety import HOLD, kill, start_apply
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    make_workspace,
    openai_provider,
    run_cli,
)

FAST = ["--poll-interval", "0.05"]


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


@pytest.mark.parametrize(
    ("per_batch", "carried"),
    [(None, False), (2, False), (2, True)],
    ids=["one-shard", "three-shards", "three-shards-carried"],
)
def test_killed_while_its_creates_are_answered_pays_each_request_once(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    per_batch: int | None,
    carried: bool,
) -> None:
    """SIGKILL while the engine has made the batch of the first create and its answer is held
    (the ledger of a generation that keeps nothing is written after its creates): the re-run
    adopts it, creates each other shard once, and sends no request twice."""
    srv = server()
    spec = {"limits": {"maxRequestsPerBatch": per_batch}} if per_batch else {}
    # a create the kill cut off before the engine made a batch of it is looked up for its
    # confirm window before it is sent again (default: timeout + 60 s; 3 s here)
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(srv.v1, KEY_ENV, createConfirmSeconds=3)},
        resources=(ResourceSpec("triage", count=6, spec=spec),),
    )
    earlier: set[str] = set()
    if carried:  # an earlier generation answered the first 6 lines
        code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
        assert code == 0, err
        earlier = {b.id for b in received_batches(srv.client())}
        ws.write_input("triage", request_lines(12))
    creates_before = srv.probe.counts["POST /batches"]
    held = srv.probe.hold("POST /batches", HOLD, after=True)
    proc = start_apply(ws)
    assert held.wait(20), "the create never reached the server"
    kill(proc)
    srv.probe.release("POST /batches")

    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)
    assert code == 0, err
    new = [b for b in received_batches(srv.client()) if b.id not in earlier]
    shards = 1 if per_batch is None else 3
    assert len(new) == shards
    # each shard made once; a create the kill cut off before the engine read it made nothing
    # and is sent again (so it can arrive once more than the batches it made)
    assert shards <= srv.probe.counts["POST /batches"] - creates_before <= shards + 1
    sent = [i for b in new for i in b.input_ids]
    expected = ws.input_ids("triage")[6:] if carried else ws.input_ids("triage")
    assert sorted(sent) == sorted(expected)  # each once, none answered before
    outputs = [json.loads(line)["custom_id"] for line in ws.output_path("triage").open()]
    assert outputs == ws.input_ids("triage")
