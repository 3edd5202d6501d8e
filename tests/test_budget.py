"""Budgets: `spec.budget` and the project's `defaults.budget` bound what a generation may
submit, first attempt and retries together; a step over budget is refused before anything is
uploaded. Checked against a `batchspec serve` process: refusals are proven by the files and
batches the server holds, not by batchspec's word.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from serve_faults import apply_wait, received_batches, serve_processes, served_workspace
from workspaces import KEY_ENV, ResourceSpec, Workspace, run_cli, write_manifest

from batchspec.core.plan import estimate_input_tokens


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_processes(tmp_path)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-not-checked")


def set_default_budget(ws: Workspace, **budget: int) -> None:
    path = ws.root / "batchspec.yaml"
    project = yaml.safe_load(path.read_text())
    project["defaults"] = {"budget": budget}
    path.write_text(yaml.safe_dump(project, sort_keys=False))


def server_is_empty(client: Any) -> bool:
    return list(client.files.list()) == [] and list(client.batches.list()) == []


def test_plan_shows_requests_and_an_input_token_estimate(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """plan --json reports, per action and in total, the requests it would submit and an
    input-token estimate of about a token per four bytes of input."""
    srv = serve()
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("est", count=12))
    nbytes = ws.input_path("est").stat().st_size

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)

    assert code == 0, err
    plan = json.loads(out)
    [action] = plan["actions"]
    assert action["requests"] == 12
    assert action["estimated_input_tokens"] == estimate_input_tokens(nbytes)
    assert nbytes // 5 < action["estimated_input_tokens"] < nbytes // 3
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "12 requests" in out and f"~{estimate_input_tokens(nbytes):,} input tokens" in out


def test_a_request_budget_refusal_uploads_nothing(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """10 requests against maxRequests 5: apply exits 1 naming the budget, the server holds
    no file and no batch, and the state records no batch."""
    srv = serve()
    spec = {"budget": {"maxRequests": 5}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("capped", count=10, spec=spec))

    code, out, err = apply_wait(ws, capsys)

    assert code == 1
    assert "maxRequests 5" in err and "nothing was uploaded" in err
    assert server_is_empty(srv.client())
    with ws.store() as store:
        assert store.batches() == []
        assert store.runs()[-1].exit_code == 1


def test_the_project_default_budget_applies_and_a_manifest_overrides_it(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """defaults.budget.maxInputTokens too small for the input refuses it (nothing uploaded);
    a manifest raising maxInputTokens overrides that one field and the job runs."""
    srv = serve()
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("tokens", count=8))
    set_default_budget(ws, maxInputTokens=20)

    code, out, err = apply_wait(ws, capsys)

    assert code == 1
    assert "maxInputTokens 20" in err
    assert server_is_empty(srv.client())

    write_manifest(
        ws, ResourceSpec("tokens", count=8, spec={"budget": {"maxInputTokens": 1_000_000}})
    )
    code, out, err = apply_wait(ws, capsys)
    assert code == 0, out + err
    assert [r["custom_id"] for r in ws.outputs("tokens")] == ws.input_ids("tokens")


def test_a_retry_over_budget_is_refused_and_uploads_nothing(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Budget 12 requests, 10 submitted, all of them fail with 500: resubmitting the 10 would
    make 20, so the retry is refused (exit 1) and the server still holds one input file and
    one batch."""
    srv = serve("--fault-500", "1.0", "--max-attempts", "1")
    spec = {"budget": {"maxRequests": 12}, "retry": {"maxAttempts": 3}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("retry", count=10, spec=spec))

    code, out, err = apply_wait(ws, capsys)

    assert code == 1, out + err
    assert "20 requests" in err and "maxRequests 12" in err
    client = srv.client()
    assert len(list(client.files.list(purpose="batch"))) == 1
    [batch] = received_batches(client)
    assert (batch.attempt, len(batch.error_ids)) == (1, 10)
    with ws.store() as store:
        assert [b.attempt for b in store.batches()] == [1]

    code, out, err = apply_wait(ws, capsys)  # a re-run is refused the same way
    assert code == 1 and "maxRequests 12" in err
    assert len(received_batches(client)) == 1
