"""A cancel that reaches a batch after it ended, on every provider, end to end through the CLI.

A batch can end at the provider between batchspec's last poll and its cancel (`batchspec cancel
NAME`, `apply --prune`, `apply --replace`). OpenAI answers such a cancel 409
``batch_not_cancellable`` (tests/test_lifecycle.py covers it); Anthropic, Gemini, Mistral and
Together do not document their answer. ``batchspec serve`` answers it with the ended batch
(tests/test_anthropic_sdk.py, test_gemini_sdk.py, test_mistral_sdk.py, test_together.py), which
batchspec handles; here the server *refuses* it instead, in each provider's documented error
envelope (Anthropic's ``invalid_request_error``, Google's ``FAILED_PRECONDITION``, Mistral's and
Together's OpenAI-like envelope), as the real APIs may. The refusal comes from the probe in
front of the engine (``RequestProbe.refuse``): the engine never sees the cancel, so the batch
really has ended, as it would have at the provider.

Either way batchspec records the batch's own end (completed), collects its answers, and pays
for nothing again; a real failure of the cancel (404, 500 after retries, a refusal of a batch
still running) fails the command with a clear message, exit 1 and no traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from probes import ProbedServer
from servers import wait_for
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, Workspace, make_workspace, run_cli

from batchspec.engine import BuiltinUpstream

FAST = ["--poll-interval", "0.05", "--timeout", "60"]
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True)
class Dialect:
    """One provider type as the probed engine serves it, and how its cancel is refused."""

    type: str
    root: str  # appended to the server's base URL for baseUrl
    cancel: str  # pattern of a cancel request, "METHOD /raw/path"
    refusal: tuple[int, dict[str, Any]]  # what the provider may answer an ended batch's cancel
    not_found: dict[str, Any]  # its 404 body


def _openai_like(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


DIALECTS = {
    "anthropic": Dialect(
        "anthropic",
        "",
        r"^POST /v1/messages/batches/[^/]+/cancel$",
        (
            400,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "This Message Batch has already ended and cannot be canceled.",
                },
            },
        ),
        {"type": "error", "error": {"type": "not_found_error", "message": "Not found."}},
    ),
    "gemini": Dialect(
        "gemini",
        "",
        r"^POST /v1beta/batches/[^/]+:cancel$",
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "The batch is already in a terminal state.",
                    "status": "FAILED_PRECONDITION",
                }
            },
        ),
        {"error": {"code": 404, "message": "Batch not found.", "status": "NOT_FOUND"}},
    ),
    "mistral": Dialect(
        "mistral",
        "",
        r"^POST /v1/batch/jobs/[^/]+/cancel$",
        (400, _openai_like("The job has already finished and cannot be cancelled.")),
        _openai_like("Job not found.", "not_found"),
    ),
    "together": Dialect(
        "together",
        "/together/v1",
        r"^POST /together/v1/batches/[^/]+/cancel$",
        (409, _openai_like("Batch job is already COMPLETED and cannot be cancelled.")),
        _openai_like("Batch job not found.", "not_found"),
    ),
}


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def workspace(
    root: Path, srv: ProbedServer, dialect: Dialect, *names: str, **options: Any
) -> Workspace:
    provider: dict[str, Any] = {
        "type": dialect.type,
        "baseUrl": f"{srv.base_url}{dialect.root}",
        "apiKeyEnv": KEY_ENV,
    }
    if options:
        provider["options"] = options
    resources = [ResourceSpec(name, count=3, provider="p") for name in names]
    return make_workspace(root, providers={"p": provider}, resources=resources)


def engine_statuses(srv: ProbedServer) -> list[str]:
    return [b["status"] for b in srv.engine.list_batches(None, 100)["data"]]


def cancels_sent(srv: ProbedServer) -> int:
    return sum(n for route, n in srv.probe.counts.items() if "cancel" in route)


def submitted_requests(srv: ProbedServer) -> int:
    return sum(b["request_counts"]["total"] for b in srv.engine.list_batches(None, 100)["data"])


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_cancel_and_prune_of_batches_that_ended_record_their_end_and_keep_their_answers(
    name: str,
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Batches that completed after the last poll, whose cancel the provider refuses as not
    cancellable: `cancel NAME` and `apply --prune` exit 0 and record them completed (not
    retried, not failed), and the next apply collects their answers without a new batch."""
    dialect = DIALECTS[name]
    srv = server()
    srv.probe.refuse(dialect.cancel, *dialect.refusal)
    ws = workspace(tmp_path / "ws", srv, dialect, "keep", "gone")
    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0, err
    assert wait_for(lambda: len(engine_statuses(srv)) == 2 and set(engine_statuses(srv)) <= ENDED)
    with ws.store() as store:
        assert not any(b.status in ENDED for b in store.batches())  # not polled since

    code, out, err = run_cli(["cancel", "keep", str(ws.root)], capsys)
    assert code == 0, err
    assert cancels_sent(srv) == 1  # refused once, not retried
    # not "nothing of it was created yet", as of a generation that never made a batch
    assert "its 1 batch(es) had ended before the cancel reached them" in out
    ws.manifest_path("gone").unlink()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune", "--wait", *FAST], capsys)

    assert code == 0, err
    assert "[gone] pruned" in out
    assert cancels_sent(srv) == 2
    with ws.store() as store:
        assert store.get_resource("gone").forgotten_at is not None
        assert {b.status for b in store.batches()} == {"completed"}
        [kept] = store.generations("keep")
        assert kept.status == "cancelled"
    assert [r["custom_id"] for r in ws.outputs("keep")] == ws.input_ids("keep")
    assert submitted_requests(srv) == 6  # both batches' 3 requests, none paid again
    assert engine_statuses(srv) == ["completed", "completed"]


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_a_superseded_batch_that_ended_is_collected_not_paid_again(
    name: str,
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`apply --replace NAME` of a resource whose batch completed after the last poll, its
    cancel refused as not cancellable: the replacement keeps the ended batch's answers and
    sends nothing new to the provider."""
    dialect = DIALECTS[name]
    srv = server()
    srv.probe.refuse(dialect.cancel, *dialect.refusal)
    ws = workspace(tmp_path / "ws", srv, dialect, "triage")
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert wait_for(lambda: engine_statuses(srv) and set(engine_statuses(srv)) <= ENDED)

    argv = ["apply", str(ws.root), "--yes", "--wait", "--replace", "triage", *FAST]
    code, out, err = run_cli(argv, capsys)

    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
    assert submitted_requests(srv) == 3


@pytest.mark.parametrize("name", sorted(DIALECTS))
@pytest.mark.parametrize("failure", ["refused while running", "404", "500 after retries"])
def test_a_cancel_that_really_fails_fails_the_command_clearly(
    name: str,
    failure: str,
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A cancel refused while the batch still runs, a 404 and a 500 that outlasts the retries
    fail `batchspec cancel` with exit 1, the provider's words and no traceback; the batch is
    not recorded as ended, and a refusal is not retried."""
    dialect = DIALECTS[name]
    srv = server(upstream=BuiltinUpstream(latency=5.0), drain_timeout=0.1)  # stays running
    status, body = {
        "refused while running": dialect.refusal,
        "404": (404, dialect.not_found),
        "500 after retries": (500, _openai_like("Internal error.", "api_error")),
    }[failure]
    srv.probe.refuse(dialect.cancel, status, body)
    ws = workspace(tmp_path / "ws", srv, dialect, "keep", maxRetries=1)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0

    code, out, err = run_cli(["cancel", "keep", str(ws.root)], capsys)

    assert code == 1
    assert "Traceback" not in out + err
    assert "cancel batch" in err and f"HTTP {status}" in err
    assert cancels_sent(srv) == (2 if status == 500 else 1)
    if failure == "refused while running":
        assert "is still in_progress" in err or "is still validating" in err
    with ws.store() as store:
        assert not any(b.status in ENDED for b in store.batches())
