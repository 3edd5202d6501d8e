"""Helpers for the large-job tests: `batchspec serve` with fault flags, and what it received.

``serve_processes(tmp_path)`` backs a fixture that starts real ``batchspec serve --port 0``
processes (``probes.start_serve_process``: the engine polls every 20 ms) with any hidden
fault flags (``--fault-500 0.1``, ``--completion-window-seconds``, ``--fault-token-limit``,
...) and stops them at teardown. Running the server as its own process keeps it off the test
process's GIL, so apply (in the test process) and the engine use both cores.

``served_workspace`` writes a project whose ``openai`` provider points at such a server.
``received_batches(client)`` reads back, through the official ``openai`` SDK, every batch the
server holds with the custom_ids of its input, output and error files: the tests assert on
what the server *received*, not on what batchspec says it sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from probes import ServeProcess, start_serve_process
from servers import stop_after_test
from workspaces import KEY_ENV, ResourceSpec, Workspace, make_workspace, openai_provider, run_cli

#: apply flags that keep waiting tests fast (polls back off from 0.5 s to at most this)
FAST_POLL = ("--poll-interval", "0.05")
#: a hung convergence fails the test (exit 5) instead of hanging the suite
WAIT_LIMIT = ("--timeout", "90")


def serve_processes(tmp_path: Path) -> Iterator[Any]:
    """Body of a fixture: yields ``start(*flags) -> ServeProcess``; stops them all after."""
    started: list[ServeProcess] = []

    def start(*flags: str) -> ServeProcess:
        proc = start_serve_process(tmp_path / f"engine{len(started)}", *flags)
        started.append(proc)
        return proc

    yield start
    stop_after_test(started)


def served_workspace(
    root: Path, srv: ServeProcess, *resources: ResourceSpec, **provider_options: Any
) -> Workspace:
    """A project with one ``openai`` provider ``srv`` (options as given) and these resources."""
    return make_workspace(
        root,
        providers={"srv": openai_provider(srv.v1, KEY_ENV, **provider_options)},
        resources=resources,
    )


def apply_wait(
    ws: Workspace, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, str]:
    """``batchspec apply ROOT --wait --yes`` with fast polling; (exit code, stdout, stderr)."""
    return run_cli(
        ["apply", str(ws.root), "--wait", "--yes", *FAST_POLL, *WAIT_LIMIT, *extra], capsys
    )


def custom_ids(data: bytes) -> list[str]:
    return [json.loads(line)["custom_id"] for line in data.splitlines() if line.strip()]


def error_code(record: dict[str, Any]) -> str:
    """What failed, for a result line: the top-level error code or the HTTP status."""
    if record.get("error"):
        return str(record["error"].get("code"))
    return f"http_{record['response']['status_code']}"


@dataclass
class ServerBatch:
    """One batch as the server holds it, with the custom_ids of its files."""

    id: str
    status: str
    shard: int
    attempt: int
    created_at: int
    input_ids: list[str]
    output_ids: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    raw: Any = None

    @property
    def error_ids(self) -> list[str]:
        return [e["custom_id"] for e in self.errors]


def attempt_number(part: str) -> int:
    """The number an attempt's key part starts with ("2", "1k3f…" of a generation keeping
    earlier answers, "1g4" of a name used again)."""
    match = re.match(r"-?\d+", part)
    return int(match.group()) if match else -1


def received_batches(client: Any) -> list[ServerBatch]:
    """Every batch on the server, ordered by (shard, attempt), with its files read back."""

    def content(file_id: str | None) -> bytes:
        return client.files.content(file_id).content if file_id else b""

    batches = []
    for b in client.batches.list(limit=100):
        meta = b.metadata or {}
        errors = [json.loads(line) for line in content(b.error_file_id).splitlines() if line]
        batches.append(
            ServerBatch(
                id=b.id,
                status=b.status,
                shard=int(meta.get("batchspec_shard", -1)),
                attempt=attempt_number(meta.get("batchspec_attempt", "-1")),
                created_at=b.created_at,
                input_ids=custom_ids(content(b.input_file_id)),
                output_ids=custom_ids(content(b.output_file_id)),
                errors=errors,
                raw=b,
            )
        )
    return sorted(batches, key=lambda b: (b.shard, b.attempt))


def uploaded_batch_files(client: Any) -> list[Any]:
    """Files uploaded to the server for batches (purpose ``batch``)."""
    return list(client.files.list(purpose="batch"))


def in_input_order(ids: Sequence[str], order: Sequence[str]) -> list[str]:
    """``ids`` sorted by their position in ``order`` (the input's custom_ids)."""
    position = {cid: i for i, cid in enumerate(order)}
    return sorted(ids, key=position.__getitem__)
