"""Collect a finished batch: download its files into the blob store, then read them.

The download lands in the content-addressed store *first* (never lose a result); only then
are its lines parsed, classified (``outcomes``) and recorded in the ledger with their byte
offsets, so the result files can be rebuilt from the store at any time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchspec.providers.base import Provider
from batchspec.state.ledger import CollectedLine
from batchspec.storage.blobstore import BlobStore
from batchspec.wire.outcomes import RETRY_CATEGORIES, classify_result_line

try:  # the optional ``fast`` extra: parsing result lines is most of a large collect's time
    from orjson import loads as _fast_loads
except ImportError:
    _fast_loads = json.loads


def _loads(body: bytes) -> Any:
    """orjson when installed; the standard library decides what orjson refuses (NaN, lone
    surrogates), so a line is never skipped, and its request retried, for orjson's sake."""
    try:
        return _fast_loads(body)
    except ValueError:
        return json.loads(body)


def download_to_store(provider: Provider, file_id: str, blobs: BlobStore) -> str:
    """Stream a provider file into the store; return its sha256."""
    return blobs.put_from(lambda tmp: provider.download_file(file_id, tmp))


def read_result_lines(
    path: Path, *, retry_on: tuple[str, ...] = RETRY_CATEGORIES
) -> Iterator[CollectedLine]:
    """Each parseable line of a result file with its byte span and classification.

    Lines that are not JSON objects with a ``custom_id`` are skipped: they cannot be joined to
    a request, and the request they would answer stays unresolved (and so is retried).
    """
    offset = 0
    with path.open("rb") as f:
        for raw in f:
            start, size = offset, len(raw)
            offset += size
            body = raw.rstrip(b"\r\n")
            if not body.strip():
                continue
            try:
                record = _loads(body)
            except ValueError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
                continue
            yield CollectedLine(
                custom_id=record["custom_id"],
                offset=start,
                length=len(body),
                outcome=classify_result_line(record, retry_on=retry_on),
            )
