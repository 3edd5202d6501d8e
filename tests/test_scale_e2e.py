"""A large job end to end: 120,000 requests → 3 shards → one merged file in input order.

`batchspec apply --wait` (in this process) against `batchspec serve` (its own process, so
the two use both cores) with the default OpenAI limit of 50,000 requests per batch. Kept
lean so it stays a few seconds: tiny `/v1/completions` bodies, 256 requests in flight on the
engine, fast polls. `bench/scale.py` measures time and memory on a 1 GB input.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_faults import apply_wait, serve_processes, served_workspace
from workspaces import KEY_ENV, ResourceSpec

REQUESTS = 120_000


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_processes(tmp_path)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-not-checked")


def test_120k_requests_make_three_shards_and_one_merged_file_in_input_order(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """120,000 requests split 50,000 / 50,000 / 20,000 into three batches tagged with their
    shard; the merged output has exactly one line per custom_id, in input order (ids are
    written in a shuffled order so sorting cannot pass for input order), each line the
    answer to its own request."""
    srv = serve("--concurrency", "256")
    spec = {"endpoint": "/v1/completions"}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("big", count=1, spec=spec))
    # a fixed permutation of the ids (7919 is prime to REQUESTS): input order != sorted order
    ids = [f"r{(i * 7919) % REQUESTS:06d}" for i in range(REQUESTS)]
    assert len(set(ids)) == REQUESTS
    with ws.input_path("big").open("w") as f:
        for n, cid in enumerate(ids):
            f.write(
                f'{{"custom_id":"{cid}","method":"POST","url":"/v1/completions",'
                f'"body":{{"model":"test-model","prompt":"{n}"}}}}\n'
            )

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out[-3000:] + err
    batches = sorted(
        srv.client().batches.list(limit=100), key=lambda b: int(b.metadata["batchspec_shard"])
    )
    assert [b.metadata["batchspec_shard"] for b in batches] == ["0", "1", "2"]
    assert [b.request_counts.total for b in batches] == [50_000, 50_000, 20_000]
    assert [b.status for b in batches] == ["completed"] * 3
    assert len(list((ws.state_path.parent / "shards").glob("*.jsonl"))) == 3
    merged_ids, misplaced = [], 0
    with ws.output_path("big").open("rb") as f:
        for n, line in enumerate(f):  # streamed: holding 120,000 parsed lines costs seconds
            record = json.loads(line)
            merged_ids.append(record["custom_id"])
            # the answer to its own request: the stand-in echoes the prompt (= input line)
            text = record["response"]["body"]["choices"][0]["text"]
            misplaced += not text.endswith(f": {n}")
    assert merged_ids == ids
    assert misplaced == 0
    assert ws.errors("big") == []
    with ws.store() as store:
        [gen] = store.generations("big")
    assert (gen.status, gen.succeeded, gen.failed) == ("complete", REQUESTS, 0)
