"""`batchspec results`: which generation a result file belongs to, and stale results refused.

The first generation runs against a fast probed engine server; the changed spec then runs
against a slow one (the provider's address is not part of the spec), so it stays in flight.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from probes import ProbedServer
from servers import request_lines
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, Workspace, run_cli, served

from batchspec.engine.upstreams import BuiltinUpstream

FAST = ["--poll-interval", "0.05"]
SLOW = {"upstream": BuiltinUpstream(latency=5.0), "drain_timeout": 0.1}


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def point_at(ws: Workspace, srv: ProbedServer) -> None:
    path = ws.root / "batchspec.yaml"
    project = yaml.safe_load(path.read_text())
    project["providers"]["srv"]["baseUrl"] = srv.v1
    path.write_text(yaml.safe_dump(project, sort_keys=False))


@pytest.fixture
def changed_and_cancelled(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> Workspace:
    """triage: generation 1 complete (3 answers on disk), then a changed input whose new
    generation was cancelled in flight (nothing of it answered)."""
    ws = served(tmp_path / "ws", server(), ResourceSpec("triage", count=3))
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    point_at(ws, server(**SLOW))
    ws.write_input("triage", request_lines(4))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert run_cli(["cancel", "triage", str(ws.root)], capsys)[0] == 0
    return ws


def test_results_of_an_older_spec_are_refused_not_shown_as_current(
    changed_and_cancelled: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a changed input whose generation was cancelled, `results NAME` exits 1 naming
    the generation the file holds and where the current spec stands; nothing on stdout (with
    --json: the error document, naming the resource)."""
    ws = changed_and_cancelled
    code, out, err = run_cli(["results", "triage", str(ws.root)], capsys)
    assert code == 1 and out == ""
    assert "holds the results of generation 1" in err
    assert "cancelled" in err and "--allow-stale" in err
    code, out, _ = run_cli(["results", "triage", str(ws.root), "--json"], capsys)
    assert code == 1 and json.loads(out)["resource"] == "triage"


def test_results_of_a_changed_input_not_applied_yet_say_to_apply(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """An input edited after its results came in: `results NAME` is refused as stale and
    says `batchspec apply` runs the new spec (it named only `status` and --allow-stale)."""
    ws = served(tmp_path / "ws", server(), ResourceSpec("triage", count=2))
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    ws.write_input("triage", request_lines(3))
    code, out, err = run_cli(["results", "triage", str(ws.root)], capsys)
    assert code == 1 and out == ""
    assert "has no generation yet (`batchspec apply` runs it); nothing was printed" in err


def test_allow_stale_prints_them_flagged_and_json_says_whose_they_are(
    changed_and_cancelled: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """--allow-stale prints the old lines with a warning on stderr; --json says which
    generation wrote them and that they are not current."""
    ws = changed_and_cancelled
    code, out, err = run_cli(["results", "triage", str(ws.root), "--allow-stale"], capsys)
    assert code == 0 and out == ws.output_path("triage").read_text()
    assert err.startswith("Warning: ") and "generation 1" in err
    code, out, _ = run_cli(["results", "triage", str(ws.root), "--allow-stale", "--json"], capsys)
    [doc] = json.loads(out)["resources"]
    assert (doc["resource"], doc["generation_id"], doc["current"]) == ("triage", 1, False)
    assert [r["custom_id"] for r in doc["results"]] == ["req-0", "req-1", "req-2"]


def test_results_take_select_state_and_json_like_every_read_command(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`results --select` prints every selected resource's results (all PATHS after it),
    --state names the database, --json is one document naming the current generation."""
    ws = served(tmp_path / "ws", server(), ResourceSpec("alpha"), ResourceSpec("beta", count=2))
    moved = tmp_path / "elsewhere.db"
    argv = ["apply", str(ws.root), "--yes", "--wait", "--state", str(moved), *FAST]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err

    code, out, err = run_cli(
        ["results", "--select", "alpha", "-s", "beta", str(ws.root), "--state", str(moved)],
        capsys,
    )
    assert code == 0, err
    assert out == ws.output_path("alpha").read_text() + ws.output_path("beta").read_text()
    code, out, _ = run_cli(
        ["results", "beta", str(ws.root), "--state", str(moved), "--json"], capsys
    )
    [doc] = json.loads(out)["resources"]
    assert doc["current"] is True and doc["generation_id"] is not None
    assert len(doc["results"]) == 2
    # without --state, the project's own (empty) state records no generation: stale
    assert run_cli(["results", "beta", str(ws.root)], capsys)[0] == 1


def test_stale_message_counts_answers_as_status_does(
    changed_and_cancelled: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusal counts the current generation's answers as `status` does, the ones carried
    over from generation 1 included (not 0/4 next to status's 3/4)."""
    ws = changed_and_cancelled
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    [st] = json.loads(out)["resources"]
    assert st["succeeded"] == 3  # req-0..req-2 keep generation 1's answers
    code, _, err = run_cli(["results", "triage", str(ws.root)], capsys)
    assert code == 1
    assert f"with {st['succeeded']}/{st['requests']} succeeded" in err


def test_results_with_failed_requests_say_where_the_failures_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished generation with a request failed for good: `results NAME` prints the
    answers and says on stderr how many failed and how to see them (an empty stdout with
    exit 0 said nothing); `--errors` prints them with no such note."""
    from workspaces import local_provider, make_workspace

    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("mixed", count=1, provider="here")],
    )
    lines = request_lines(3, prefix="m")
    lines[1]["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
    ws.write_input("mixed", lines)
    code, out, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)
    assert code == 0, out + err
    code, out, err = run_cli(["results", "mixed", str(ws.root)], capsys)
    assert code == 0 and len(out.splitlines()) == 2
    assert "1 of 3 requests failed for good" in err
    assert "`batchspec results mixed --errors`" in err
    code, out, err = run_cli(["results", "mixed", str(ws.root), "--errors"], capsys)
    assert code == 0 and len(out.splitlines()) == 1 and "failed for good" not in err
