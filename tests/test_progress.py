"""Apply's progress: the pure view (live status line / plain lines), NDJSON with --json,
plain lines without a terminal, and the live line on a real pseudo-terminal.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from probes import ProbedServer
from servers import request_lines
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    run_cli,
    served,
)

from batchspec.cli.progress import ProgressView
from batchspec.core.reconcile import Progress
from batchspec.engine import BuiltinUpstream

FAST = ["--poll-interval", "0.05"]


def poll(done: int, total: int, status: str = "in_progress", remote: str = "b1") -> Progress:
    return Progress(
        "poll",
        "triage",
        f"batch {remote} {status} {done}/{total}",
        {"remote_id": remote, "status": status, "total": total, "completed": done, "failed": 0},
    )


# ---------------------------------------------------------------------------------------------
# the pure view


def test_plain_view_writes_lines_only_when_something_changed() -> None:
    """Without a terminal: no control characters; a poll repeating the last status and
    counts, a wait for the same resources and an upload's byte counts print nothing."""
    view = ProgressView()
    wait = Progress("wait", None, "waiting 0.5s for 1 resource(s)", {"resources": ["triage"]})
    events = [
        Progress("upload", "triage", "uploading in.jsonl (1.0 KB)"),
        Progress("upload_progress", "triage", "uploaded 512 bytes", {"sent": 512, "bytes": 1000}),
        Progress("create", "triage", "created batch b1"),
        poll(0, 4),
        wait,
        poll(0, 4),
        wait,
        poll(2, 4),
        poll(4, 4, "completed"),
        Progress("download", "triage", "downloading the output file of batch b1"),
    ]
    text = "".join(view.render(e) for e in events)
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == [
        "[triage] uploading in.jsonl (1.0 KB)",
        "[triage] created batch b1",
        "[triage] batch b1 in_progress 0/4",
        "waiting 0.5s for 1 resource(s)",
        "[triage] batch b1 in_progress 2/4",
        "[triage] batch b1 completed 4/4",
        "[triage] downloading the output file of batch b1",
    ]


# ---------------------------------------------------------------------------------------------
# the CLI over loopback


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


served = functools.partial(served, count=4)  # this file's jobs are 4 requests


def slow_server(server: Callable[..., ProbedServer]) -> ProbedServer:
    """One request at a time, 0.1 s each: polls see the counts grow."""
    return server(upstream=BuiltinUpstream(latency=0.1), concurrency=1)


def test_apply_json_is_ndjson_ending_in_a_result(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every stdout line of `apply --json --wait` is one JSON object with an event; polls
    carry request counts, downloads their file; the last line is the result."""
    srv = slow_server(server)
    ws = served(tmp_path / "ws", srv)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json", "--wait", *FAST], capsys)

    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert all(isinstance(e, dict) and "event" in e for e in events)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan"
    for step in ("upload", "create", "poll", "download", "collect", "results"):
        assert step in kinds, kinds
    assert kinds[-1] == "result" and kinds.count("result") == 1
    assert events[-1]["outcome"] == "converged" and events[-1]["exit_code"] == 0
    polls = [e for e in events if e["event"] == "poll"]
    assert all({"remote_id", "status", "total", "completed", "failed"} <= set(e) for e in polls)
    assert polls[-1]["completed"] == 4
    [download] = [e for e in events if e["event"] == "download"]
    assert download["file"] == "output"


def test_apply_json_failure_ends_in_an_error_object(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing `apply --json` still prints only JSON lines, the last an error event with
    the exit code; the message also goes to stderr."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    bad = request_lines(2)
    bad[1]["custom_id"] = bad[0]["custom_id"]  # duplicate custom_id: invalid input
    ws.write_input("triage", bad)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 1
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "error"
    assert events[-1]["exit_code"] == 1
    assert events[-1]["error"] == "InputError"
    assert events[-1]["message"] in err
    assert srv.probe.counts == {}


def test_apply_without_a_terminal_writes_plain_lines(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Captured (not a TTY): no carriage returns or escapes, and no two identical lines in
    a row however many polls were made."""
    srv = slow_server(server)
    ws = served(tmp_path / "ws", srv)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)

    assert code == 0, err
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert all(a != b for a, b in zip(lines, lines[1:], strict=False) if a.strip())
    assert any(line.startswith("[triage] batch ") and "/4" in line for line in lines)
    assert srv.probe.counts["GET /batches/{id}"] > len(
        [line for line in lines if line.startswith("[triage] batch ")]
    )
