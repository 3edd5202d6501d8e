"""Sharding: splitting a generation's requests into batches that fit the provider's limits.

The pure part (``batchspec.core.sharding.assign_shards``) is checked on in-memory request lines;
the rest end to end: `batchspec apply --wait` against a `batchspec serve` process, asserting
on the shard files in the state folder, the files and batch metadata the server received,
and the merged output. (The 120,000-request run is in ``test_scale_e2e.py``.)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_faults import apply_wait, received_batches, serve_processes, served_workspace
from servers import request_lines
from workspaces import (
    KEY_ENV,
    ResourceSpec,
    Workspace,
    make_workspace,
    run_cli,
    write_manifest,
)

from batchspec.core.sharding import ShardLimits, assign_shards, embedding_inputs
from batchspec.wire.inputs import RequestLine


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_processes(tmp_path)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-not-checked")


def lines_of(records: list[dict[str, Any]]) -> list[RequestLine]:
    return [
        RequestLine(line=i + 1, custom_id=r["custom_id"], raw=json.dumps(r).encode())
        for i, r in enumerate(records)
    ]


def split(requests: list[RequestLine], limits: ShardLimits, endpoint: str) -> list[list[str]]:
    shards: list[list[str]] = []
    for shard, req in assign_shards(iter(requests), limits, endpoint=endpoint):
        if shard == len(shards):
            shards.append([])
        assert shard == len(shards) - 1, "shards are consecutive and in input order"
        shards[shard].append(req.custom_id)
    return shards


# ---------------------------------------------------------------------------------------------
# The pure split


def test_request_limit_splits_in_input_order() -> None:
    """25 requests at 10 per shard: 10, 10, 5, in input order; the same input gives the same
    shards every time."""
    requests = lines_of(request_lines(25))
    limits = ShardLimits(max_requests=10)

    shards = split(requests, limits, "/v1/chat/completions")

    assert [len(s) for s in shards] == [10, 10, 5]
    assert [cid for s in shards for cid in s] == [r.custom_id for r in requests]
    assert split(requests, limits, "/v1/chat/completions") == shards


def test_byte_limit_counts_each_line_with_its_newline() -> None:
    """Every shard's file (lines + newlines) fits the byte limit, and no shard could have
    taken the next line: the split is greedy and exact at the boundary."""
    requests = lines_of(request_lines(40))
    sizes = {r.custom_id: len(r.raw) + 1 for r in requests}
    limit = sum(sizes[r.custom_id] for r in requests[:3])  # exactly three first lines

    shards = split(requests, ShardLimits(max_bytes=limit), "/v1/chat/completions")

    assert len(shards[0]) == 3
    for shard, following in zip(shards, shards[1:], strict=False):
        total = sum(sizes[c] for c in shard)
        assert total <= limit
        assert total + sizes[following[0]] > limit
    assert sum(sizes[c] for c in shards[-1]) <= limit


@pytest.mark.parametrize(
    ("value", "inputs"),
    [
        pytest.param("one text", 1, id="string"),
        pytest.param(["a", "b", "c"], 3, id="list-of-strings"),
        pytest.param([1, 2, 3, 4], 1, id="one-token-array"),
        pytest.param([[1, 2], [3], [4, 5]], 3, id="list-of-token-arrays"),
    ],
)
def test_embedding_inputs_are_counted_per_element(value: Any, inputs: int) -> None:
    """A string or one token array is one input; a list of strings or of token arrays is
    one input per element."""
    raw = json.dumps({"custom_id": "e", "body": {"model": "m", "input": value}}).encode()
    assert embedding_inputs(raw) == inputs


def test_embedding_inputs_limit_closes_shards_on_the_sum() -> None:
    """For /v1/embeddings a shard closes before its summed inputs would pass the limit; the
    same lines on another endpoint are not counted."""
    records = [
        {"custom_id": f"e{i}", "body": {"model": "m", "input": ["x"] * n}}
        for i, n in enumerate([3, 3, 2, 5, 1, 7, 1])
    ]
    requests = lines_of(records)
    limits = ShardLimits(max_embedding_inputs=7)

    shards = split(requests, limits, "/v1/embeddings")

    assert shards == [["e0", "e1"], ["e2", "e3"], ["e4"], ["e5"], ["e6"]]
    assert split(requests, limits, "/v1/chat/completions") == [[f"e{i}" for i in range(7)]]


# ---------------------------------------------------------------------------------------------
# End to end against `batchspec serve`


def shard_files(ws: Workspace) -> dict[str, bytes]:
    folder = ws.state_path.parent / "shards"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.jsonl"))}


def test_manifest_limit_shards_uploads_and_merges_in_input_order(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """25 requests with limits.maxRequestsPerBatch 10: three shard files named by their
    sha256 holding input lines 1-10, 11-20, 21-25 byte for byte; three batches whose input
    files are those shard files and whose metadata names the shard; one merged output with
    one line per custom_id in input order; a second apply creates nothing."""
    srv = serve()
    spec = {"limits": {"maxRequestsPerBatch": 10}, "metadata": {"team": "qa"}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("split", count=25, spec=spec))
    input_lines = ws.input_path("split").read_bytes().splitlines(keepends=True)
    ids = ws.input_ids("split")

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    expected = [b"".join(input_lines[a:b]) for a, b in ((0, 10), (10, 20), (20, 25))]
    files = shard_files(ws)
    assert sorted(files.values()) == sorted(expected)
    for name, data in files.items():
        assert name == hashlib.sha256(data).hexdigest() + ".jsonl"
    client = srv.client()
    batches = received_batches(client)
    with ws.store() as store:
        [gen] = store.generations("split")
    assert [(b.shard, b.attempt, b.status) for b in batches] == [
        (0, 1, "completed"),
        (1, 1, "completed"),
        (2, 1, "completed"),
    ]
    for b, data in zip(batches, expected, strict=True):
        assert client.files.content(b.raw.input_file_id).content == data
        assert b.raw.metadata == {
            "team": "qa",
            "batchspec_resource": "split",
            "batchspec_spec": gen.spec_hash,
            "batchspec_shard": str(b.shard),
            # the digest of the shard file's content: a key never names two contents
            "batchspec_attempt": "1k" + hashlib.sha256(data).hexdigest()[:12],
        }
        assert b.output_ids == b.input_ids
    outputs = ws.outputs("split")
    assert [r["custom_id"] for r in outputs] == ids
    by_batch = {cid: b.id for b in batches for cid in b.output_ids}
    assert all(by_batch[r["custom_id"]] == batches[i // 10].id for i, r in enumerate(outputs))
    assert ws.errors("split") == []

    code, out, err = apply_wait(ws, capsys)
    assert code == 0, out + err
    assert len(received_batches(client)) == 3


def test_a_sharded_ledger_lost_before_it_was_written_is_derived_from_the_intents(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new generation's ledger is written after its creates are sent; a run killed between
    the two (its rows deleted here) loses nothing: the next apply derives every request's
    shard from the recorded intents (lines 1-10, 11-20, 21-25), creates no batch and merges
    one output line per custom_id in input order."""
    srv = serve()
    spec = {"limits": {"maxRequestsPerBatch": 10}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("lost", count=25, spec=spec))
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0, out + err
    with ws.store() as store:
        [gen] = store.generations("lost")
        written = store.db.execute(
            "select line, shard from requests where generation_id = ? order by line", [gen.id]
        ).fetchall()
        with store.atomic():
            store.db.execute("delete from requests where generation_id = ?", [gen.id])
    expected = [(line, (line - 1) // 10) for line in range(1, 26)]
    assert [tuple(r) for r in written] == expected

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    assert len(received_batches(srv.client())) == 3
    with ws.store() as store:
        derived = store.db.execute(
            "select line, shard, state from requests where generation_id = ? order by line",
            [gen.id],
        ).fetchall()
    assert [(line, shard) for line, shard, _ in derived] == expected
    assert {state for _, _, state in derived} == {"ok"}
    assert [r["custom_id"] for r in ws.outputs("lost")] == ws.input_ids("lost")


def test_ledger_rows_in_shards_refuses_counts_that_do_not_add_up() -> None:
    """Deriving a ledger from intents whose counts miss or exceed the input's requests
    raises rather than mis-assigning a request to a shard that never carried it."""
    from batchspec.core.sharding import ledger_rows_in_shards
    from batchspec.errors import BatchspecError
    from batchspec.wire.request_index import RequestFact

    facts = [RequestFact(i, i * 10, 9, f"c{i}", bytes(32)) for i in range(1, 6)]
    assert [row[2] for row in ledger_rows_in_shards(facts, [2, 3])] == [0, 0, 1, 1, 1]
    for counts in ([2, 2], [2, 4], [6]):
        with pytest.raises(BatchspecError):
            list(ledger_rows_in_shards(facts, counts))


def test_the_same_input_gives_the_same_shards_in_another_state(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sharding depends only on the input and the limits: a copy of the workspace with a
    fresh state writes the same shard files (names and bytes) and the same batch keys."""
    srv = serve()
    spec = {"limits": {"maxRequestsPerBatch": 4}}
    ws = served_workspace(tmp_path / "a", srv, ResourceSpec("same", count=10, spec=spec))
    shutil.copytree(ws.root, tmp_path / "b")
    other = Workspace(tmp_path / "b")

    for w in (ws, other):
        code, out, err = run_cli(["apply", str(w.root), "--yes"], capsys)
        assert code == 0, out + err

    assert len(shard_files(ws)) == 3
    assert shard_files(ws) == shard_files(other)
    keys = []
    for w in (ws, other):
        with w.store() as store:
            keys.append([(b.key, b.input_sha256, b.requests) for b in store.batches()])
    assert keys[0] == keys[1]


def test_byte_limit_end_to_end(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """limits.maxBytesPerBatch: every input file the server received fits the limit, none
    could have taken the next line, and together they are the input in order."""
    srv = serve()
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("bytes", count=12))
    data = ws.input_path("bytes").read_bytes()
    lines = data.splitlines(keepends=True)
    limit = len(lines[0]) * 3 + 5
    spec = {"limits": {"maxBytesPerBatch": limit}}
    write_manifest(ws, ResourceSpec("bytes", count=12, spec=spec))

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    client = srv.client()
    received = [client.files.content(b.raw.input_file_id).content for b in received_batches(client)]
    assert len(received) >= 4
    assert b"".join(received) == data
    for part, following in zip(received, received[1:], strict=False):
        assert len(part) <= limit
        assert len(part) + len(following.splitlines(keepends=True)[0]) > limit
    assert [r["custom_id"] for r in ws.outputs("bytes")] == ws.input_ids("bytes")


def test_embedding_inputs_limit_end_to_end(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """/v1/embeddings with limits.maxEmbeddingInputsPerBatch 7: no batch the server received
    carries more than 7 inputs in all; results are merged in input order."""
    srv = serve()
    spec = {"endpoint": "/v1/embeddings", "limits": {"maxEmbeddingInputsPerBatch": 7}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("vectors", count=1, spec=spec))
    sizes = [3, 3, 2, 5, 1, 7, 1, 4, 2]
    ws.write_input(
        "vectors",
        [
            {
                "custom_id": f"v{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "test-model", "input": [f"text {i}.{k}" for k in range(n)]},
            }
            for i, n in enumerate(sizes)
        ],
    )

    code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    batches = received_batches(srv.client())
    inputs = {f"v{i}": n for i, n in enumerate(sizes)}
    per_batch = [sum(inputs[c] for c in b.input_ids) for b in batches]
    assert max(per_batch) <= 7
    assert len(batches) == 5  # 3+3 | 2+5 | 1 | 7 | 1+4+2: greedy, never a shard too many
    outputs = ws.outputs("vectors")
    assert [r["custom_id"] for r in outputs] == list(inputs)
    assert [len(r["response"]["body"]["data"]) for r in outputs] == sizes


# ---------------------------------------------------------------------------------------------
# Where the limits come from


@pytest.mark.parametrize(
    ("provider", "manifest_limits", "expected"),
    [
        pytest.param({"type": "openai"}, {}, (50_000, 200 * 1024 * 1024, 50_000), id="openai"),
        pytest.param({"type": "azure"}, {}, (100_000, 200 * 1024 * 1024, 50_000), id="azure"),
        pytest.param(
            {"type": "openai", "options": {"maxRequestsPerBatch": 1_000, "maxBytesPerBatch": 9}},
            {},
            (1_000, 9, 50_000),
            id="provider-options",
        ),
        pytest.param(
            {"type": "openai", "options": {"maxRequestsPerBatch": 1_000}},
            {"maxRequestsPerBatch": 10, "maxEmbeddingInputsPerBatch": 7},
            (10, 200 * 1024 * 1024, 7),
            id="manifest-lowers",
        ),
        pytest.param(
            {"type": "openai", "options": {"maxRequestsPerBatch": 1_000}},
            {"maxRequestsPerBatch": 5_000, "maxBytesPerBatch": 300 * 1024 * 1024},
            (1_000, 200 * 1024 * 1024, 50_000),
            id="manifest-cannot-raise",
        ),
    ],
)
def test_shard_limits_from_provider_type_options_and_manifest(
    tmp_path: Path, provider: dict[str, Any], manifest_limits: dict[str, int], expected: Any
) -> None:
    """The provider type's defaults, lowered by the provider's options, lowered further by
    the manifest's `limits`; a manifest never raises a provider's limit (the provider would
    reject the batch)."""
    from batchspec.core.sharding import shard_limits
    from batchspec.workspace.manifest import load_workspace

    config = {"baseUrl": "http://127.0.0.1:9/v1", "apiKeyEnv": KEY_ENV, **provider}
    spec = {"limits": manifest_limits} if manifest_limits else {}
    ws = make_workspace(
        tmp_path / "ws",
        providers={"p": config},
        resources=[ResourceSpec("r", count=1, provider="p", spec=spec)],
    )
    loaded = load_workspace([str(ws.root)])

    limits = shard_limits(loaded, loaded.resources[0])

    assert (limits.max_requests, limits.max_bytes, limits.max_embedding_inputs) == expected
