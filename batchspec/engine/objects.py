"""OpenAI-shaped JSON objects built from the engine's SQLite rows.

Every object carries every field OpenAI marks required, with a valid value, and the optional
fields as ``null`` when unset, because strict re-serialisers (a LiteLLM proxy) answer 500 on a
missing required field. The same dicts are what the HTTP API returns and what the in-process
``local`` provider parses.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

_BATCH_TIMESTAMPS = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def file_object(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "expires_at": row["expires_at"],
        "status_details": None,
        # Mistral's SDK shares /v1/files and requires these three (mistral_routes.py)
        "sample_type": _sample_type(row),
        "source": "mistral" if row["purpose"] == "batch_output" else "upload",
        "deleted": False,
    }


def _sample_type(row: sqlite3.Row) -> str:
    if row["purpose"] != "batch_output":
        return "batch_request" if row["purpose"] == "batch" else "instruct"
    return "batch_error" if str(row["filename"]).endswith("_error.jsonl") else "batch_result"


def batch_object(row: sqlite3.Row) -> dict[str, Any]:
    errors = json.loads(row["errors"]) if row["errors"] else None
    metadata = json.loads(row["metadata"]) if row["metadata"] else None
    return {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "model": row["model"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": row["created_at"],
        **{name: row[name] for name in _BATCH_TIMESTAMPS},
        "request_counts": {
            "total": row["total"],
            "completed": row["completed"],
            "failed": row["failed"],
        },
        "usage": {
            "input_tokens": row["input_tokens"],
            "input_tokens_details": {"cached_tokens": row["cached_tokens"]},
            "output_tokens": row["output_tokens"],
            "output_tokens_details": {"reasoning_tokens": row["reasoning_tokens"]},
            "total_tokens": row["total_tokens"],
        },
        "metadata": metadata,
    }


def list_object(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def deleted_file_object(file_id: str) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "deleted": True}
