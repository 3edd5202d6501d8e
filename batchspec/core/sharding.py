"""Split a generation's requests into shards that each fit one remote batch.

A shard closes before a request would take it past the provider's limits: the number of
requests, the bytes of the batch file, and, for ``/v1/embeddings``, the number of embedding
inputs in all. The split depends only on the input's bytes and the limits, so the same input
always gives the same shards and a re-run adopts its batches instead of creating new ones.
Everything streams: a request is looked at once and never held.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from batchspec.wire.inputs import RequestLine, iter_requests

EMBEDDINGS_ENDPOINT = "/v1/embeddings"


@dataclass(frozen=True)
class ShardLimits:
    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    max_embedding_inputs: int = 50_000


def assign_shards(
    requests: Iterable[RequestLine], limits: ShardLimits, *, endpoint: str
) -> Iterator[tuple[int, RequestLine]]:
    """Yield ``(shard_index, request)`` in input order, opening a new shard at each limit."""
    count_inputs = endpoint == EMBEDDINGS_ENDPOINT
    shard, n, nbytes, ninputs = 0, 0, 0, 0
    for req in requests:
        size = len(req.raw) + 1  # each line is written with "\n"
        inputs = embedding_inputs(req.raw) if count_inputs else 0
        if n and (
            n + 1 > limits.max_requests
            or nbytes + size > limits.max_bytes
            or (count_inputs and ninputs + inputs > limits.max_embedding_inputs)
        ):
            shard, n, nbytes, ninputs = shard + 1, 0, 0, 0
        n, nbytes, ninputs = n + 1, nbytes + size, ninputs + inputs
        yield shard, req


def fits_one_shard(requests: int, nbytes: int, limits: ShardLimits, *, endpoint: str) -> bool:
    """True when the whole input is one shard for sure (so it can be uploaded as it is)."""
    if endpoint == EMBEDDINGS_ENDPOINT:
        return False  # inputs per line are only known by reading them
    return requests <= limits.max_requests and nbytes <= limits.max_bytes


def embedding_inputs(raw: bytes) -> int:
    """How many inputs one embeddings request carries (a list counts each element)."""
    body = json.loads(raw).get("body") or {}
    value = body.get("input")
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


# ---------------------------------------------------------------------------------------------
# Shard files and the ledger rows that go with them


class ShardWriters:
    """Writes shard files into the shard folder, each named by the sha256 of its content."""

    def __init__(self, folder: Path, *, enabled: bool) -> None:
        self.folder = folder
        self.enabled = enabled
        self._open: dict[int, tuple[BinaryIO, Any, Path]] = {}

    def write(self, shard: int, raw: bytes) -> None:
        if not self.enabled:
            return
        entry = self._open.get(shard)
        if entry is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.folder, suffix=".part")
            entry = self._open[shard] = (os.fdopen(fd, "wb"), hashlib.sha256(), Path(name))
        line = raw + b"\n"
        entry[0].write(line)
        entry[1].update(line)

    def finish(self) -> dict[int, str]:
        shas = {}
        for shard, (handle, digest, tmp) in self._open.items():
            handle.close()
            shas[shard] = digest.hexdigest()
            os.replace(tmp, self.folder / f"{shas[shard]}.jsonl")
        self._open.clear()
        return shas


def ledger_rows(path: Path) -> Iterator[tuple[str, int, int, int, str]]:
    """``(custom_id, line, shard 0, bytes, fingerprint)`` per request of an input that goes as
    one shard (the fingerprint of the raw line lets a later generation reuse the answers)."""
    for req in iter_requests(path):
        yield req.custom_id, req.line, 0, len(req.raw) + 1, fingerprint(req.raw)


def shard_and_write(
    requests: Iterator[RequestLine],
    limits: ShardLimits,
    endpoint: str,
    writers: ShardWriters,
    per_shard: dict[int, int],
) -> Iterator[tuple[int, RequestLine]]:
    for shard, req in assign_shards(requests, limits, endpoint=endpoint):
        per_shard[shard] = per_shard.get(shard, 0) + 1
        writers.write(shard, req.raw)
        yield shard, req


def with_fingerprints(
    assigned: Iterator[tuple[int, RequestLine]],
) -> Iterator[tuple[str, int, int, int, str]]:
    for shard, req in assigned:
        yield req.custom_id, req.line, shard, len(req.raw) + 1, fingerprint(req.raw)


def fingerprint(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
