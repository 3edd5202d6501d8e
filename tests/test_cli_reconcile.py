"""The reconcile commands' faces: plan, status, history, results and cancel; exit codes.

Workspaces use the embedded engine (free, offline), except `cancel`, which needs a batch
that stays in flight: that one runs against the engine's API with a slow upstream.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from probes import ProbedServer, start_probed_server
from servers import request_lines, stop_after_test
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    git_commit_all,
    json_lines,
    local_provider,
    make_workspace,
    openai_provider,
    run_cli,
    served,
)

from batchspec.engine.upstreams import BuiltinUpstream
from batchspec.errors import Terminated
from batchspec.workspace.yamldoc import display_path

FAST = ["--poll-interval", "0.05"]


def local_ws(root: Path, *names: str) -> Workspace:
    return make_workspace(
        root,
        providers={"here": local_provider()},
        resources=[ResourceSpec(n, count=3, provider="here") for n in names or ("triage",)],
    )


@pytest.fixture
def applied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Workspace:
    """A git-tracked workspace of two resources, applied to convergence once."""
    ws = local_ws(tmp_path / "ws", "alpha", "beta")
    git_commit_all(ws.root)
    code, _, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)
    assert code == 0, err
    return ws


# ---------------------------------------------------------------------------------------------
# plan


def test_plan_detailed_exitcode_is_2_with_changes_and_0_without(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--detailed-exitcode: 2 while something is pending, 0 once in sync; plain plan exits
    0 either way and shows a Terraform-style line per resource and a summary."""
    ws = local_ws(tmp_path / "ws")
    code, out, _ = run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)
    assert code == 2
    assert "+ triage: create (new resource): 3 requests" in out
    assert "Plan: 1 to create. 3 requests to submit" in out
    assert run_cli(["plan", str(ws.root)], capsys)[0] == 0

    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] == 0
    code, out, _ = run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)
    assert code == 0
    assert out == "No changes: every resource is in sync.\n"  # as Terraform's "No changes."
    verbose = run_cli(["plan", str(ws.root), "-v"], capsys)[1]
    assert "= triage: none (in sync: 3 succeeded)" in verbose


def test_a_plan_run_is_recorded_with_the_exit_code_it_exits_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The audit log records a plan's own exit code: 2 for changes pending with
    --detailed-exitcode, 1 for a plan apply would refuse (a budget), 0 otherwise."""
    ws = local_ws(tmp_path / "ws")

    def exits_and_records(*flags: str) -> tuple[int, int]:
        code = run_cli(["plan", str(ws.root), *flags], capsys)[0]
        _, out, _ = run_cli(["history", str(ws.root), "--json", "--limit", "1"], capsys)
        return code, json.loads(out)["runs"][0]["run"]["exit_code"]

    assert exits_and_records("--detailed-exitcode") == (2, 2)
    assert exits_and_records() == (0, 0)
    # --out a plan file that cannot be written: exit 1, recorded so, with where it went
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert exits_and_records("--out", str(blocked / "p.plan.json")) == (1, 1)
    _, out, _ = run_cli(["history", str(ws.root), "--json", "--limit", "1"], capsys)
    assert json.loads(out)["runs"][0]["run"]["args"]["out"] == str(blocked / "p.plan.json")
    set_budget(ws, "triage", maxRequests=2)
    assert exits_and_records("--detailed-exitcode") == (1, 1)


def test_plan_counts_unchanged_resources_and_lists_only_those_with_a_step(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """Like apply, a text plan lists only the resources with a step and counts the rest in
    one line (one change among a fleet was a line per resource); -v lists every one."""
    applied.output_path("beta").unlink()
    code, out, _ = run_cli(["plan", str(applied.root)], capsys)
    assert code == 0
    assert "alpha" not in out, out
    assert "< beta: restore (output file is missing)" in out
    assert "  (1 resource in sync, not listed: `plan --verbose` lists every one)" in out
    code, out, _ = run_cli(["plan", str(applied.root), "--verbose"], capsys)
    assert "= alpha: none (in sync" in out and "< beta: restore" in out
    assert "not listed" not in out


def test_a_restore_names_both_files_it_writes(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """A deleted errors file is restored with the output file, and the line names both (it
    named only the output file, beside the reason "errors file is missing")."""
    applied.errors_path("beta").unlink()
    code, out, err = run_cli(["apply", str(applied.root), *FAST], capsys)
    assert code == 0, err
    out_file, errors_file = applied.output_path("beta"), applied.errors_path("beta")
    assert (
        f"[beta] restored {display_path(out_file)} and {display_path(errors_file)} from the "
        "state store (errors file is missing)"
    ) in out
    assert errors_file.exists()


def test_a_no_op_apply_counts_unchanged_resources_and_lists_only_what_it_touched(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second apply that changes nothing prints "No changes" and counts the resources in
    sync instead of listing each (a fleet's no-op run was ~4 lines per resource); one whose
    result file it restores is still listed; --verbose lists all; --json keeps every one."""
    code, out, _ = run_cli(["apply", str(applied.root), "--wait", *FAST], capsys)
    assert code == 0
    assert "alpha" not in out and "beta" not in out, out
    assert out.splitlines()[0] == "No changes: every resource is in sync."
    assert "(2 resources in sync and unchanged, not listed: `apply --verbose`" in out
    assert "2 resources: 2 Synced; 2 Healthy; 6/6 requests succeeded" in out
    assert len(out.splitlines()) <= 6

    code, out, _ = run_cli(["apply", str(applied.root), "--wait", "-v", *FAST], capsys)
    assert "= alpha: none (in sync" in out and "  beta: Synced, Healthy" in out
    assert "not listed" not in out

    code, out, _ = run_cli(["apply", str(applied.root), "--wait", "--json", *FAST], capsys)
    result = json_lines(out)[-1]
    assert [r["name"] for r in result["resources"]] == ["alpha", "beta"]
    assert [a["resource"] for a in result["plan"]["actions"]] == ["alpha", "beta"]

    applied.output_path("beta").unlink()
    code, out, _ = run_cli(["apply", str(applied.root), "--wait", *FAST], capsys)
    assert "< beta: restore" in out and "  beta: Synced, Healthy" in out
    assert "alpha" not in out
    assert "(1 resource in sync and unchanged, not listed" in out


def test_plan_contacts_no_provider_and_spends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """plan of a new resource on an unreachable paid provider succeeds and records no batch."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider("http://127.0.0.1:9/v1", "UNSET_VARIABLE_XYZ")},
        resources=[ResourceSpec("triage")],
    )
    code, _, err = run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)
    assert code == 2, err
    with ws.store() as store:
        assert store.batches() == []
        assert [r.command for r in store.runs()] == ["plan"]


def test_a_provider_that_is_down_is_said_while_retried_and_named_as_the_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider that refuses every connection: apply says each retry as it waits (it was
    silent through ~15 s of backoff), and the error names the provider and its base URL,
    not the first resource that met it (``resource`` null in JSON)."""
    down = "http://127.0.0.1:9/v1"
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(down, KEY_ENV, maxRetries=1)},
        resources=[ResourceSpec("alpha"), ResourceSpec("beta")],
    )
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)

    code, out, _ = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 1
    events = json_lines(out)
    [notice] = [e for e in events if e["event"] == "warning" and e.get("source") == "provider"]
    assert notice["message"].startswith(f"srv: could not connect to {down} (")
    assert "retry 1 of 1 in " in notice["message"] and notice["resource"] is None
    assert (notice["provider"], notice["base_url"], notice["retry"]) == ("srv", down, 1)
    error = events[-1]
    assert error["event"] == "error" and error["resource"] is None
    assert error["message"].startswith("srv: ") and down in error["message"]
    assert "alpha" not in error["message"]


def test_plan_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """plan --json: only JSON on stdout, with serial, spec hashes and one entry per action."""
    ws = local_ws(tmp_path / "ws", "alpha", "beta")
    code, out, _ = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {
        "serial",
        "spec_hashes",
        "changes",
        "summary",
        "requests_to_submit",
        "estimated_input_tokens",
        "requests_reused",
        "actions",
        "refusals",
        "warnings",
        "estimates",
        "drains",
        "needs_consent",
        "estimated_max_cost_usd",
    }
    assert doc["changes"] is True
    assert doc["summary"] == {"create": 2}
    assert doc["requests_to_submit"] == 6
    assert sorted(doc["spec_hashes"]) == ["alpha", "beta"]
    assert all(len(h) == 64 for h in doc["spec_hashes"].values())
    assert [(a["resource"], a["action"]) for a in doc["actions"]] == [
        ("alpha", "create"),
        ("beta", "create"),
    ]
    assert doc["actions"][0]["spec_hash"] == doc["spec_hashes"]["alpha"]


def test_plan_reports_an_orphan_without_counting_it_as_a_change(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest removed after apply: its resource is `orphaned`, and that alone is no
    change (exit 0 with --detailed-exitcode), though the summary does not call it in sync."""
    applied.manifest_path("beta").unlink()
    code, out, _ = run_cli(["plan", str(applied.root), "--detailed-exitcode", "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert [(a["resource"], a["action"]) for a in doc["actions"]] == [
        ("alpha", "none"),
        ("beta", "orphaned"),
    ]
    assert doc["changes"] is False
    code, out, _ = run_cli(["plan", str(applied.root)], capsys)
    assert "every resource is in sync" not in out  # beta is not: its manifest is gone
    assert "1 orphaned resource left alone (`apply --prune`" in out


def test_status_of_an_orphan_keeps_its_recorded_counts(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """A removed manifest's resource is Orphaned in status, with the answers and batches the
    state holds for it (3/3), not '0/0 succeeded'."""
    applied.manifest_path("beta").unlink()
    code, out, _ = run_cli(["status", str(applied.root), "--json"], capsys)
    assert code == 0
    beta = next(r for r in json.loads(out)["resources"] if r["name"] == "beta")
    assert (beta["sync"], beta["requests"], beta["succeeded"]) == ("Orphaned", 3, 3)
    assert [b["status"] for b in beta["batches"]] == ["completed"]
    code, out, _ = run_cli(["status", str(applied.root)], capsys)
    assert "beta: Orphaned, Unknown — 3/3 succeeded" in out


def test_status_of_a_resource_never_applied_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resource nothing was recorded for shows 'not applied yet', not '0/0 succeeded'
    (plan counts its 3 requests: 0/0 read as an empty input)."""
    ws = local_ws(tmp_path / "ws", "alpha")
    code, out, _ = run_cli(["status", str(ws.root)], capsys)
    assert code == 0
    assert "alpha: OutOfSync, Missing — not applied yet" in out and "0/0" not in out


def test_status_of_a_resource_with_only_an_intent_says_pending_as_plan_does(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An intent recorded whose upload failed (as after a crash before the upload): status
    says Pending, "intent recorded, not yet submitted", in text and JSON, not Progressing
    (nothing is at the provider); plan agrees that it is yet to submit."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    srv = server()
    ws = served(tmp_path / "ws", srv)
    srv.probe.refuse(r"^POST /v1/files", 400, {"error": {"message": "not now"}})
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 1
    with ws.store() as store:
        [intent] = store.batches()
    assert (intent.remote_id, intent.status) == (None, "pending")

    _, out, _ = run_cli(["status", str(ws.root)], capsys)
    assert "triage: OutOfSync, Pending — 0/3 succeeded" in out, out
    assert "shard 1 attempt 1: intent recorded, not yet submitted" in out
    assert "Progressing" not in out
    _, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    [status] = json.loads(out)["resources"]
    assert status["health"] == "Pending" and status["action"] == "create"
    assert status["reason"] == "1 batch(es) queued: recorded, not yet submitted"
    _, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "+ triage: create (1 batch(es) queued: recorded, not yet submitted)" in out


def test_status_after_an_input_edit_names_the_earlier_generation(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """An input edited after a finished apply: status (text, --json, report) says the current
    spec is not applied yet and what the earlier spec's generation holds, not 'not applied
    yet' as of a resource never run (its results are still there)."""
    path = applied.input_path("alpha")
    path.write_text(path.read_text().replace("req-2", "req-9"))
    code, out, _ = run_cli(["status", str(applied.root)], capsys)
    assert code == 0
    assert (
        "alpha: OutOfSync, Missing — its current spec not applied yet; generation 1 "
        "(an earlier spec, complete): 3/3 succeeded"
    ) in out
    assert "beta: Synced, Healthy — 3/3 succeeded" in out
    code, out, _ = run_cli(["status", str(applied.root), "--json"], capsys)
    alpha, beta = json.loads(out)["resources"]
    assert alpha["earlier"] == {
        "id": 1,
        "status": "complete",
        "requests": 3,
        "succeeded": 3,
        "failed": 0,
    }
    assert beta["earlier"] is None
    code, out, _ = run_cli(["report", str(applied.root), "-o", "-"], capsys)
    assert "generation 1 (an earlier spec, complete): 3 ok, 0 failed of 3" in out


def test_status_in_a_subfolder_does_not_call_the_other_manifests_gone(
    applied: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """status run in a folder of the workspace with no manifests (data/, say) shows no
    orphans: alpha's and beta's manifests are elsewhere, not gone (plan agrees)."""
    sub = applied.root / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    code, out, err = run_cli(["status", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["resources"] == []
    applied.manifest_path("beta").unlink()
    code, out, _ = run_cli(["status", "--json"], capsys)
    assert [(r["name"], r["sync"]) for r in json.loads(out)["resources"]] == [("beta", "Orphaned")]


def test_an_unknown_select_name_exits_1_naming_the_known_ones(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """--select of a name no manifest defines fails with exit 1, for plan and apply alike."""
    for command in ("plan", "apply", "status"):
        code, out, err = run_cli([command, str(applied.root), "--select", "gamma"], capsys)
        assert code == 1, command
        assert "'gamma'" in err and "alpha, beta" in err


def test_select_limits_plan_and_apply_to_the_named_resources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """apply --select touches only the selected resource; the other stays to be created."""
    ws = local_ws(tmp_path / "ws", "alpha", "beta")
    code, _, err = run_cli(["apply", str(ws.root), "--select", "beta", "--wait", *FAST], capsys)
    assert code == 0, err
    assert ws.output_path("beta").exists() and not ws.output_path("alpha").exists()
    code, out, _ = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert {a["resource"]: a["action"] for a in json.loads(out)["actions"]} == {
        "alpha": "create",
        "beta": "none",
    }


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["plan", "--no-such-flag"], id="unknown-flag"),
        pytest.param(["apply", "--timeout", "-1"], id="negative-timeout"),
        pytest.param(["apply", "--poll-interval", "zero"], id="not-a-number"),
        pytest.param(["results"], id="missing-name"),
        pytest.param(["history", "--limit", "0"], id="limit-below-one"),
    ],
)
def test_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Bad flags or arguments are usage errors: exit 64 with a message on stderr."""
    code, out, err = run_cli(argv, capsys)
    assert code == 64
    assert out == "" and "Error" in err


# ---------------------------------------------------------------------------------------------
# status, history, results


def test_status_json_before_and_after_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status --json: OutOfSync/Missing before anything ran; Synced/Healthy with batch
    counts and result paths after."""
    ws = local_ws(tmp_path / "ws")
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    assert code == 0
    [before] = json.loads(out)["resources"]
    assert (before["sync"], before["health"], before["action"]) == (
        "OutOfSync",
        "Missing",
        "create",
    )
    assert before["batches"] == []

    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] == 0
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    [after] = json.loads(out)["resources"]
    assert (after["sync"], after["health"], after["action"]) == ("Synced", "Healthy", "none")
    assert (after["requests"], after["succeeded"], after["failed"]) == (3, 3, 0)
    assert after["output"] == str(ws.output_path("triage"))
    [batch] = after["batches"]
    assert (batch["shard"], batch["attempt"], batch["status"]) == (1, 1, "completed")
    assert (batch["total"], batch["completed"], batch["failed"]) == (3, 3, 0)
    assert batch["remote_id"]
    code, out, _ = run_cli(["show", "triage", str(ws.root), "--json"], capsys)
    [shown] = json.loads(out)["generations"][0]["batches"]
    assert shown["shard"] == batch["shard"]  # one numbering (from 1) in every command

    code, text, _ = run_cli(["status", str(ws.root)], capsys)
    assert "triage: Synced, Healthy" in text and batch["remote_id"] in text


def test_history_and_show_count_shards_from_1_as_status_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A two-shard apply: the intent and create events in `history` (text and --json) and
    `show` name shards 1 and 2, as `status --json` and apply's progress do; never 0."""
    ws = local_ws(tmp_path / "ws")
    manifest = yaml.safe_load(ws.manifest_path("triage").read_text())
    manifest["spec"]["limits"] = {"maxRequestsPerBatch": 2}  # 3 requests: shards of 2 and 1
    ws.manifest_path("triage").write_text(yaml.safe_dump(manifest))
    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--json", *FAST], capsys)
    assert code == 0, err
    progress = [json.loads(line) for line in out.splitlines()]
    assert sorted(e["shard"] for e in progress if e.get("event") == "create") == [1, 2]
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    assert sorted(b["shard"] for b in json.loads(out)["resources"][0]["batches"]) == [1, 2]

    code, out, _ = run_cli(["history", str(ws.root), "--json"], capsys)
    events = json.loads(out)["runs"][-1]["events"]
    for action in ("intent", "create"):
        shards = [e["detail"]["shard"] for e in events if e["action"] == action]
        assert sorted(shards) == [1, 2], action
    code, text, _ = run_cli(["history", str(ws.root), "--events", "all"], capsys)
    assert "shard=1," in text and "shard=2," in text and "shard=0" not in text
    code, out, _ = run_cli(["show", "triage", str(ws.root), "--json"], capsys)
    shown = [e["detail"]["shard"] for e in json.loads(out)["events"] if "shard" in e["detail"]]
    assert shown and 0 not in shown


def test_history_json_has_runs_with_git_provenance_and_events(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """history --json: newest run first, with user, host, git commit/branch and the events
    of the run; --resource NAME keeps only runs and events of that resource; --limit caps
    runs."""
    head = git_commit_all_head(applied.root)
    run_cli(["plan", str(applied.root)], capsys)
    code, out, _ = run_cli(["history", str(applied.root), "--json"], capsys)
    assert code == 0
    runs = json.loads(out)["runs"]
    assert [r["run"]["command"] for r in runs] == ["plan", "apply"]
    apply_run = runs[1]["run"]
    assert apply_run["git_commit"] == head
    assert apply_run["git_branch"] == "main"
    assert apply_run["exit_code"] == 0 and apply_run["user"] and apply_run["host"]
    actions = [e["action"] for e in runs[1]["events"]]
    assert {"generation", "intent", "upload", "create", "collect", "results"} <= set(actions)
    assert {e["resource"] for e in runs[1]["events"]} >= {"alpha", "beta"}

    code, out, _ = run_cli(["history", str(applied.root), "-r", "alpha", "--json"], capsys)
    only = json.loads(out)["runs"]
    assert [r["run"]["command"] for r in only] == ["apply"]
    assert {e["resource"] for e in only[0]["events"]} <= {"alpha", None}

    code, out, _ = run_cli(["history", str(applied.root), "--json", "--limit", "1"], capsys)
    assert len(json.loads(out)["runs"]) == 1

    code, text, _ = run_cli(["history", str(applied.root)], capsys)
    assert f"@{head[:10]}" in text and "apply  exit 0" in text


def git_commit_all_head(root: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_results_prints_the_merged_file_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """results NAME prints the output file byte for byte; --errors the errors file."""
    ws = local_ws(tmp_path / "ws")
    lines = [json.loads(x) for x in ws.input_path("triage").read_text().splitlines()]
    lines[1]["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
    ws.write_input("triage", lines)
    assert run_cli(["results", "triage", str(ws.root)], capsys)[0] == 1  # nothing yet
    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] == 0

    code, out, _ = run_cli(["results", "triage", str(ws.root)], capsys)
    assert code == 0
    assert out == ws.output_path("triage").read_text()
    assert [json.loads(x)["custom_id"] for x in out.splitlines()] == ["req-0", "req-2"]
    code, out, _ = run_cli(["results", "triage", str(ws.root), "--errors"], capsys)
    assert code == 0
    assert [json.loads(x)["custom_id"] for x in out.splitlines()] == ["req-1"]

    code, _, err = run_cli(["results", "nope", str(ws.root)], capsys)
    assert code == 1 and "'nope'" in err


def test_results_before_apply_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """results of a resource never applied: exit 1, the file is missing, run apply; the
    --json error document names the resource (docs/output.md: `resource` is the one it is
    about)."""
    ws = local_ws(tmp_path / "ws")
    code, out, err = run_cli(["results", "triage", str(ws.root)], capsys)
    assert code == 1 and out == ""
    assert "does not exist yet" in err and "batchspec apply" in err
    code, out, _ = run_cli(["results", "triage", str(ws.root), "--json"], capsys)
    assert code == 1 and json.loads(out)["resource"] == "triage"


def test_a_results_file_that_cannot_be_written_exits_1_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file where the results folder should be exits 1 naming the reason and the path, not
    with a traceback, and before anything is spent (it used to fail once the batch had run)."""
    ws = local_ws(tmp_path / "ws")
    (ws.root / "results").write_text("not a folder")

    code, _, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)

    assert code == 1
    assert "results is a file, not a folder" in err and "Traceback" not in err
    assert not (ws.root / "state" / "local").exists()  # nothing was submitted


def test_a_full_disk_exits_1_without_a_traceback(tmp_path: Path) -> None:
    """With writes capped at 64 KB (as on a full disk), apply fails in the state database or
    a file write; either way it exits 1 with an error line, not a traceback."""
    ws = local_ws(tmp_path / "ws")

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    done = subprocess.run(
        batchspec_cmd("apply", str(ws.root), "--wait", *FAST),
        capture_output=True,
        text=True,
        preexec_fn=cap_file_size,
        timeout=60,
    )

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("Error: ")


# ---------------------------------------------------------------------------------------------
# cancel


@pytest.fixture
def slow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProbedServer]:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    srv = start_probed_server(
        tmp_path / "engine",
        upstream=BuiltinUpstream(latency=2.0),
        api_key=SENTINEL_KEY,
        drain_timeout=0.1,
    )
    yield srv
    stop_after_test([srv])


def test_cancel_stops_in_flight_batches_and_records_it(
    tmp_path: Path, slow_server: ProbedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """cancel NAME cancels the remote batch, records a cancel event, marks the generation
    cancelled; the plan then only polls it to keep what finished (Suspended), never retries."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(slow_server.v1, KEY_ENV)},
        resources=[ResourceSpec("triage", count=3)],
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0

    code, out, err = run_cli(["cancel", "triage", str(ws.root)], capsys)

    assert code == 0, err
    assert "cancelling 1 batch of triage" in out
    assert slow_server.probe.counts["POST /batches/{id}/cancel"] == 1
    [remote] = slow_server.client().batches.list().data
    assert remote.status in ("cancelling", "cancelled")
    with ws.store() as store:
        [gen] = store.generations("triage")
        events = store.events(resource="triage")
        runs = store.runs()
    assert gen.status == "cancelled"
    assert [e.detail for e in events if e.action == "cancel"] == [
        {"reason": "cancelled by a user", "batches": 1}
    ]
    assert runs[0].command == "cancel" and runs[0].exit_code == 0

    code, out, _ = run_cli(["plan", str(ws.root), "--json"], capsys)
    [action] = json.loads(out)["actions"]
    assert action["action"] == "refresh" and "cancelled by a user" in action["reason"]
    assert action["requests"] == 0
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    assert json.loads(out)["resources"][0]["health"] == "Suspended"
    assert slow_server.probe.counts["POST /batches"] == 1


def test_cancel_is_not_stopped_by_an_unusable_result_store_folder(
    tmp_path: Path, slow_server: ProbedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cancel NAME` stops the batches in flight even where state/store is a symbolic link to
    nothing: it downloads nothing, and the check made for apply (before it sends anything)
    refused the cancel, keeping the batches running and spending until the folder was fixed."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(slow_server.v1, KEY_ENV)},
        resources=[ResourceSpec("triage", count=3)],
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    store = ws.root / "state" / "store"
    if store.exists():
        store.rename(tmp_path / "moved-store")
    store.symlink_to(tmp_path / "elsewhere")

    code, out, err = run_cli(["cancel", "triage", str(ws.root)], capsys)

    assert code == 0, err
    assert slow_server.probe.counts["POST /batches/{id}/cancel"] == 1


def test_cancel_of_a_finished_resource_says_there_is_nothing_to_cancel(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """cancel of a resource with nothing in flight says so, not 'cancelled 0 batch(es)'."""
    code, out, err = run_cli(["cancel", "alpha", str(applied.root)], capsys)
    assert code == 0, err
    assert out == "alpha has no batch in flight: nothing to cancel\n"


def test_cancel_of_an_unknown_resource_exits_1(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """cancel of a name the state never recorded fails with exit 1 and changes nothing."""
    code, out, err = run_cli(["cancel", "gamma", str(applied.root)], capsys)
    assert code == 1
    assert "'gamma'" in err
    with applied.store() as store:
        assert [e for e in store.events() if e.action == "cancel"] == []


def apply_once_it_polls(ws: Workspace, *extra: str) -> subprocess.Popen[str]:
    """``apply --wait`` in a process of its own, its output piped, once it polls (its create
    made, its requests at work), ready for a signal. It takes SIGINT as Ctrl-C: a test run
    started as `pytest &` from a script inherits an ignored SIGINT, and exec keeps an
    ignored signal ignored, so the child would never see the Ctrl-C. exec resets a *caught*
    signal to its default: SIGINT is caught here while spawning (no preexec_fn, which is
    unsafe with the server's threads running)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            batchspec_cmd("apply", str(ws.root), "--wait", "--yes", *FAST, *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        if line.startswith("waiting") or line.startswith('{"event": "wait"'):
            break
    return proc


def test_ctrl_c_during_apply_wait_exits_130(tmp_path: Path, slow_server: ProbedServer) -> None:
    """Ctrl-C while apply --wait polls a batch in flight: "Interrupted: ..." and exit 130, as
    docs/exit-codes.md says, with no traceback (also when pytest runs with SIGINT ignored);
    on a remote provider alone the line says nothing of a local engine."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(slow_server.v1, KEY_ENV)},
        resources=[ResourceSpec("triage", count=3)],
    )
    proc = apply_once_it_polls(ws)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)

    assert proc.returncode == 130, err
    assert "Traceback" not in err
    # and that what it created goes on: the next apply picks it up; no local engine runs,
    # so there is none to speak of, nor of waiting for it
    assert err.strip().startswith(
        "Interrupted: batches already created are kept (the provider runs them on); "
        "`batchspec apply` picks them up."
    )
    assert "engine" not in err


def test_ctrl_c_while_a_down_provider_is_retried_says_no_batch_was_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while apply retries a provider that refuses connections, before any upload or
    create: the line says no batch was created (it said "batches already created are kept"),
    exit 130; with batches sent, it still says they are kept (the tests above)."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider("http://127.0.0.1:9/v1", KEY_ENV, maxRetries=20)},
        resources=[ResourceSpec("triage", count=3)],
    )
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as apply_once_it_polls
    try:
        proc = subprocess.Popen(
            batchspec_cmd("apply", str(ws.root), "--yes"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert proc.stdout is not None
    for line in proc.stdout:  # the retries' warnings are progress lines: stdout
        if "retry 1 of 20" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)

    assert proc.returncode == 130, err
    assert "Interrupted: no batch was created" in err and "kept" not in err, err
    with ws.store() as store:
        assert store.batches() == []


def test_ctrl_c_is_said_at_once_while_the_local_engine_lets_its_requests_finish(
    tmp_path: Path, standin_upstream: Any
) -> None:
    """Ctrl-C while a local engine has requests in flight: the stop waits for them (stopped,
    they would be sent, and paid for, again), and the line saying so comes at once, not when
    the wait is over (a Ctrl-C looked ignored); a second Ctrl-C stops at once, the engine
    closed whole."""
    slow = standin_upstream(latency=8.0)
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": {"type": "local", "options": {"upstream": slow.v1}}},
        resources=[ResourceSpec("triage", count=2, provider="here")],
    )
    proc = apply_once_it_polls(ws)
    proc.send_signal(signal.SIGINT)
    said = proc.stderr.readline()
    assert proc.poll() is None  # still letting its requests finish
    assert said.startswith("Interrupted: batches already created are kept")
    assert "A local engine first lets the requests it has sent finish" in said
    # a second press a moment later, as a person's is (one within microseconds of the first,
    # while its handler still runs, is taken as the same one)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=3)  # at once: its requests take 8 s
    assert proc.returncode == 130 and "Traceback" not in err
    assert "Interrupted" not in err  # said once
    # the second press stopped the wait, not the engine's close: it committed what had
    # finished, closed its store (no log left beside it) and freed its folder
    assert not list((ws.root / "state").rglob("*-wal")), "the engine's close was cut short"


def test_a_stderr_that_cannot_be_written_does_not_replace_the_signal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The line a signal handler writes at once goes to a stderr that may be gone (a closed
    pipe): its error must not replace the KeyboardInterrupt or Terminated, whose exit code
    (130, 143) and `interrupted` event would then be an error's (exit 1)."""
    from batchspec.cli.main import Interruption

    def broken(fd: int, data: bytes) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("batchspec.cli.main.os.write", broken)
    said = Interruption(["apply"])
    said.say(KeyboardInterrupt(), in_handler=True)
    assert said.said


def test_a_second_ctrl_c_while_the_line_waits_for_the_bars_still_says_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handler's line waits (briefly) for apply's live bars to be written above; a
    second Ctrl-C in that wait raised out of it, and the line was never written: exit 130
    and no word why. It is written, then the second Ctrl-C goes on."""
    from batchspec.cli.main import Interruption

    written: list[bytes] = []
    monkeypatch.setattr("batchspec.cli.main.os.write", lambda fd, data: written.append(data))

    def bars_interrupted(text: str, write_err: object) -> bool:
        raise KeyboardInterrupt

    said = Interruption(["apply"])
    said.above_bars = bars_interrupted
    with pytest.raises(KeyboardInterrupt):
        said.say(KeyboardInterrupt(), in_handler=True)
    assert len(written) == 1 and written[0].startswith(b"Interrupted: "), written


def test_the_interrupted_line_speaks_of_the_local_engine_only_while_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C on apply names the local engine's wait, and how long it may last (the engine's
    drain timeout), only while an engine runs in the process; before it starts and once it
    has closed, the line speaks of the provider alone."""
    from batchspec.cli.main import Interruption
    from batchspec.engine import Engine

    monkeypatch.setattr("batchspec.engine.core._running", {})  # the suite's own servers

    def said() -> str:
        Interruption(["apply", "--wait"]).say(KeyboardInterrupt())
        return capsys.readouterr().err

    assert "engine" not in said()
    engine = Engine(tmp_path / "engine", drain_timeout=7)
    assert "engine" not in said()  # opened, not started: nothing in flight to wait for
    with engine:
        running = said()
    assert "A local engine first lets the requests it has sent finish (up to 7 s;" in running
    assert "Ctrl-C again does not wait for them" in running
    assert said() == (
        "Interrupted: batches already created are kept (the provider runs them on); "
        "`batchspec apply` picks them up.\n"
    )


def test_sigterm_during_apply_wait_stops_it_as_ctrl_c_does_exit_143(
    tmp_path: Path, slow_server: ProbedServer
) -> None:
    """SIGTERM (a CI runner cancelling the job, docker stop, timeout) while apply --wait
    polls: the same clean stop as Ctrl-C, exit 143, and the run's exit recorded in the state
    (it was a process ended on the spot: history showed it killed, or running elsewhere)."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(slow_server.v1, KEY_ENV)},
        resources=[ResourceSpec("triage", count=3)],
    )
    proc = apply_once_it_polls(ws)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)

    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert err.strip().startswith("Terminated (SIGTERM): batches already created are kept")
    with ws.store() as store:
        [run] = store.runs()
        events = store.events()
    assert run.exit_code == 143 and run.ended_at is not None
    assert [e.detail for e in events if e.action == "interrupted"] == [{"signal": "SIGTERM"}]
    assert slow_server.probe.counts["POST /batches"] == 1


def test_sigterm_during_apply_json_ends_its_output_with_an_error_object(
    tmp_path: Path, slow_server: ProbedServer
) -> None:
    """apply --json promises NDJSON ending in a `result` or `error` object: a SIGTERM (a CI
    runner cancelling the job) ends it with an `error` object saying what stopped it and
    that the batches created go on, exit_code 143; its output stopped at the last event."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(slow_server.v1, KEY_ENV)},
        resources=[ResourceSpec("triage", count=3)],
    )
    proc = apply_once_it_polls(ws, "--json")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)

    assert proc.returncode == 143, err
    last = json.loads(out.splitlines()[-1])
    assert {k: last[k] for k in ("event", "error", "resource", "exit_code")} == {
        "event": "error",
        "error": "Terminated",
        "resource": None,
        "exit_code": 143,
    }
    assert last["message"].startswith("Terminated (SIGTERM): batches already created are kept")


@pytest.mark.parametrize(
    ("signal_error", "name", "code"),
    [
        pytest.param(KeyboardInterrupt, "Interrupted", 130, id="ctrl-c"),
        pytest.param(Terminated, "Terminated", 143, id="sigterm"),
    ],
)
def test_an_interrupted_apply_json_ends_its_events_with_an_error_event(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    signal_error: type[BaseException],
    name: str,
    code: int,
) -> None:
    """Ctrl-C or SIGTERM (a CI runner cancelling the job) after a create of `apply --json`:
    its NDJSON ends with an `error` event (exit 130 or 143, the stderr line's words), as
    every other failure's does; it ended on the last progress event (a `create`), so a
    reader of the last line took a run that stopped for one still at work."""
    import batchspec.core.apply as core_apply

    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    ws = served(tmp_path / "ws", server(), ResourceSpec("triage", count=3))
    real = core_apply.apply_workspace

    def stopped_after_a_create(*args: Any, report: Callable[[Any], None], **kw: Any) -> Any:
        def then_stop(event: Any) -> None:
            report(event)
            if event.event == "create":
                raise signal_error

        return real(*args, report=then_stop, **kw)

    monkeypatch.setattr(core_apply, "apply_workspace", stopped_after_a_create)
    got, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait", "--json", *FAST], capsys)

    assert got == code, err
    events = json_lines(out)
    assert "create" in [e["event"] for e in events]
    last = events[-1]
    assert (last["event"], last["error"], last["exit_code"]) == ("error", name, code), last
    assert last["resource"] is None and last["details"] == []
    said = f"{name}{' (SIGTERM)' if code == 143 else ''}: batches already created are kept"
    assert last["message"].startswith(said) and err.strip().startswith(said), (last, err)
    assert "Traceback" not in err


def test_a_timeout_with_a_resource_already_degraded_exits_4(
    tmp_path: Path, slow_server: ProbedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --wait --timeout` reached while one resource still runs and another is already
    Degraded (failed for good): exit 4, not 5, since no longer wait can fix it (docs/exit-
    codes.md); the result says both (outcome degraded, timed_out) and the headline too."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider(slow_server.v1, KEY_ENV), "here": local_provider()},
        resources=[ResourceSpec("slow", count=1), ResourceSpec("doomed", provider="here")],
    )
    lines = request_lines(2)
    for line in lines:
        line["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
    ws.write_input("doomed", lines)
    argv = ["apply", str(ws.root), "--yes", "--wait", "--json", *FAST, "--timeout", "1"]

    code, out, err = run_cli(argv, capsys)

    assert code == 4, out + err
    result = json.loads(out.splitlines()[-1])
    assert (result["outcome"], result["exit_code"], result["timed_out"]) == ("degraded", 4, True)
    assert result["message"].startswith("Apply stopped at --timeout with resources Degraded")
    health = {r["name"]: r["health"] for r in result["resources"]}
    assert health == {"slow": "Progressing", "doomed": "Degraded"}


def test_timeout_without_wait_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """apply --timeout does nothing without --wait, so asking for it is refused (exit 64)."""
    code, _, err = run_cli(["apply", "--timeout", "5"], capsys)
    assert code == 64
    assert "--timeout only applies with --wait" in err
    # with --json too, and stdout stays empty, as docs/output.md says of a usage error
    code, out, err = run_cli(["apply", "--json", "--timeout", "5"], capsys)
    assert (code, out) == (64, "") and "--timeout only applies with --wait" in err


def test_status_on_a_fresh_workspace_creates_no_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status is read-only: on a workspace never applied it reports Missing and writes nothing."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("fresh", provider="here")],
    )
    code, out, err = run_cli(["status", str(ws.root), "--json"], capsys)
    assert code == 0, err
    [status] = json.loads(out)["resources"]
    assert (status["sync"], status["health"]) == ("OutOfSync", "Missing")
    assert not ws.state_path.exists()


def test_state_option_and_variable_move_the_state_for_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--state (or BATCHSPEC_STATE) replaces the project's state.path for apply, plan, status
    and history alike; the default state file is never created."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("moved-state", provider="here")],
    )
    elsewhere = tmp_path / "elsewhere" / "custom.db"
    code, _, err = run_cli(
        [
            "apply",
            str(ws.root),
            "--yes",
            "--wait",
            "--poll-interval",
            "0.05",
            "--state",
            str(elsewhere),
        ],
        capsys,
    )
    assert code == 0, err
    assert elsewhere.is_file()
    assert not ws.state_path.exists()

    monkeypatch.setenv("BATCHSPEC_STATE", str(elsewhere))
    assert run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)[0] == 0
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    assert json.loads(out)["resources"][0]["health"] == "Healthy"
    code, out, _ = run_cli(["history", "--project", str(ws.root), "--json"], capsys)
    assert [r["run"]["command"] for r in json.loads(out)["runs"]][-1] == "apply"
    assert not ws.state_path.exists()


def test_a_missing_api_key_fails_before_anything_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """apply on a paid provider whose key variable is unset names the variable and records
    no generation or intent: the next plan is still a plain create."""
    monkeypatch.delenv("BATCHSPEC_TEST_UNSET_KEY", raising=False)
    ws = make_workspace(
        tmp_path / "ws",
        providers={"paid": {"type": "openai", "apiKeyEnv": "BATCHSPEC_TEST_UNSET_KEY"}},
        resources=[ResourceSpec("nokey", provider="paid")],
    )
    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 1
    assert "set BATCHSPEC_TEST_UNSET_KEY in the environment" in err
    with ws.store() as store:
        assert store.generations("nokey") == []
        assert store.batches() == []


def test_history_events_n_keeps_each_runs_last_events_and_its_whole_usage(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """history --events N lists only each run's last N events, oldest first (text says how
    many were left out; 0 lists the runs alone), while the run's usage still counts them
    all: a run over hundreds of resources need not print thousands of lines."""
    _, out, _ = run_cli(["history", str(applied.root), "--json"], capsys)
    [whole] = json.loads(out)["runs"]
    assert len(whole["events"]) > 2

    _, out, _ = run_cli(["history", str(applied.root), "--json", "--events", "2"], capsys)
    [cut] = json.loads(out)["runs"]
    assert cut["events"] == whole["events"][-2:] and cut["usage"] == whole["usage"]

    _, text, _ = run_cli(["history", str(applied.root), "--events", "0"], capsys)
    left_out = len(whole["events"])
    assert f"... {left_out} earlier event(s)" in text and "apply  exit 0" in text
    assert not any(line.startswith("    20") for line in text.splitlines())


def test_history_with_no_flag_counts_each_run_s_events_and_says_how_to_list_them(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """history with no flag is one line per run, its usage, and its events counted by action
    (listing them all printed ~14,000 lines after 30 runs of 200 resources); a footer says
    how to list them and that older runs exist; --events all, --resource NAME and --json
    still list every event."""
    run_cli(["plan", str(applied.root)], capsys)
    _, out, _ = run_cli(["history", str(applied.root), "--json"], capsys)
    plan_run, apply_run = json.loads(out)["runs"]
    count = len(apply_run["events"])
    creates = sum(e["action"] == "create" for e in apply_run["events"])

    _, text, _ = run_cli(["history", str(applied.root)], capsys)
    assert not any(line.startswith("    20") for line in text.splitlines()), text
    assert f"    {count} events: " in text and f", {creates} create, " in text
    assert "--events all every one" in text and "Older runs" not in text
    assert len(text.splitlines()) <= 8

    _, text, _ = run_cli(["history", str(applied.root), "--limit", "1"], capsys)
    assert "Older runs not shown: --limit N" in text and "apply" not in text
    _, text, _ = run_cli(["history", str(applied.root), "--limit", "1", "--events", "0"], capsys)
    assert "Older runs not shown" in text and "Events are counted" not in text

    _, text, _ = run_cli(["history", str(applied.root), "--events", "all"], capsys)
    assert sum(line.startswith("    20") for line in text.splitlines()) == count
    _, text, _ = run_cli(["history", str(applied.root), "-r", "alpha"], capsys)
    assert any(line.startswith("    20") and "[alpha]" in line for line in text.splitlines())
    _, out, _ = run_cli(["history", str(applied.root), "--json", "--events", "all"], capsys)
    assert json.loads(out)["runs"] == [plan_run, apply_run]
    code, _, err = run_cli(["history", str(applied.root), "--events", "some"], capsys)
    assert code == 64 and "nor 'all'" in err


def test_history_events_n_above_the_run_s_count_lists_them_all(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """history --events N with N above a run's event count lists every event and claims none
    were left out (N = count + 1 and count + 2 once showed fewer, oldest dropped)."""
    _, out, _ = run_cli(["history", str(applied.root), "--json"], capsys)
    [whole] = json.loads(out)["runs"]
    count = len(whole["events"])
    for more in (count + 1, count + 2, count * 3):
        _, out, _ = run_cli(["history", str(applied.root), "--json", "--events", str(more)], capsys)
        assert json.loads(out)["runs"][0]["events"] == whole["events"], more
        _, text, _ = run_cli(["history", str(applied.root), "--events", str(more)], capsys)
        assert "earlier event" not in text, more
        assert sum(line.startswith("    20") for line in text.splitlines()) == count, more


def test_history_text_shortens_hashes_that_json_keeps_whole(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """People see 12-character hashes in history; --json carries the full sha256 values."""
    sha = re.compile(r"\b[0-9a-f]{64}\b")
    _, text, _ = run_cli(["history", "--project", str(applied.root), "--events", "all"], capsys)
    _, as_json, _ = run_cli(["history", "--project", str(applied.root), "--json"], capsys)
    assert "spec_hash=" in text and not sha.search(text)
    assert sha.search(as_json)


def test_history_text_writes_event_values_as_show_does(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """An event's true/false reads the same in `history` and `show` (JSON's words, as in
    --json), not Python's True/False."""
    _, text, _ = run_cli(["history", "--project", str(applied.root), "--events", "all"], capsys)
    _, shown, _ = run_cli(["show", "alpha", str(applied.root)], capsys)
    assert "stopped_at_window=false" in text and "stopped_at_window=false" in shown
    assert "=False" not in text and "=True" not in text


def test_history_text_links_each_ci_run(
    applied: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run made in CI shows its CI run's URL in history's text (which job ran it, for whom),
    not only the CI system's name; an earlier run does not show it."""
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_SERVER_URL", "https://github.example")
    monkeypatch.setenv("GITHUB_REPOSITORY", "team/jobs")
    monkeypatch.setenv("GITHUB_RUN_ID", "4242")
    code, _, err = run_cli(["plan", str(applied.root)], capsys)
    assert code == 0, err
    _, text, _ = run_cli(["history", "--project", str(applied.root), "--limit", "2"], capsys)
    newest, older = [line for line in text.splitlines() if line.startswith("run ")]
    assert newest.endswith("(https://github.example/team/jobs/actions/runs/4242)"), newest
    assert "4242" not in older


# ---------------------------------------------------------------------------------------------
# plan says what apply will refuse; the same options everywhere


def set_budget(ws: Workspace, name: str, **budget: int) -> None:
    path = ws.manifest_path(name)
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["budget"] = budget
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_an_apply_json_over_one_budget_names_the_resource_in_its_error_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """apply --json refused by one resource's budget ends with an `error` event whose
    `resource` is that one and whose message starts `[NAME] `, as docs/output.md says of a
    failure about one resource (it was `null`, the message `NAME: ...`); refused by two,
    `resource` is `null` (the run as a whole) and the second is among the details."""
    ws = local_ws(tmp_path / "ws", "alpha", "beta", "gamma")
    set_budget(ws, "beta", maxRequests=2)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)
    assert code == 1, err
    last = json_lines(out)[-1]
    assert (last["event"], last["error"], last["resource"]) == ("error", "BudgetError", "beta")
    assert last["message"].startswith("[beta] submitting 3 more request(s)"), last

    set_budget(ws, "gamma", maxRequests=1)
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)
    assert code == 1, err
    last = json_lines(out)[-1]
    assert (last["error"], last["resource"]) == ("BudgetError", None), last
    assert last["message"].startswith("[beta] ") and last["details"][-1].startswith("[gamma] ")


def test_a_plan_over_budget_says_so_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plan apply's budget check would refuse is still shown, then says why on stderr and
    exits 1 (with --detailed-exitcode too); the markdown comment says it as well."""
    ws = local_ws(tmp_path / "ws")
    set_budget(ws, "triage", maxRequests=2)

    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 1
    assert "triage: create" in out
    assert "over its budget (maxRequests 2)" in err
    # what to do, as apply says it, with the manifest's path as every message shows it
    assert "manifests/triage.yaml (it falls back field by field to defaults.budget" in err
    assert run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)[0] == 1
    code, out, _ = run_cli(["plan", str(ws.root), "--format", "markdown"], capsys)
    assert code == 1 and "Apply would refuse this plan" in out
    code, out, _ = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 1 and "maxRequests 2" in json.loads(out)["refusals"][0]
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 1  # as the plan said


def test_plan_warns_of_an_api_key_variable_that_is_unset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider the plan would spend on whose apiKeyEnv is unset is a warning on stderr
    (no network needed); the plan itself still exits 0."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    ws = make_workspace(
        tmp_path / "ws",
        providers={"paid": openai_provider("http://127.0.0.1:9/v1", KEY_ENV)},
        resources=[ResourceSpec("triage", provider="paid")],
    )
    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 0
    assert f"Warning: provider 'paid' needs an API key, but {KEY_ENV} is not set" in err
    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 1 and f"set {KEY_ENV} in the environment" in err
    # apiKeyEnv names exactly KEY_ENV here: the error must not claim it names another one
    assert "names a different variable" not in err
    assert f"{KEY_ENV} is not set" in err
    monkeypatch.setenv(KEY_ENV, " ")  # a CI secret never given to the job: set, but empty
    code, _, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 0 and f"but {KEY_ENV} is set but empty here" in err
    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 1 and f"and {KEY_ENV} is set but empty: set {KEY_ENV}" in err
    assert "providers.paid.apiKeyEnv" in err
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    assert "Warning" not in run_cli(["plan", str(ws.root)], capsys)[2]


def test_apply_says_a_missing_api_key_before_it_asks_consent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """apply without --yes on a provider whose key variable is unset names the variable, not
    --yes: it asked consent first (on a terminal a prompt, answered, then the key error), so
    the user passed --yes only to be told of the key; nothing is recorded either way."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    ws = make_workspace(
        tmp_path / "ws",
        providers={"paid": openai_provider("http://127.0.0.1:9/v1", KEY_ENV)},
        resources=[ResourceSpec("triage", provider="paid")],
    )
    code, _, err = run_cli(["apply", str(ws.root)], capsys)
    assert code == 1 and f"set {KEY_ENV} in the environment" in err, err
    assert "--yes" not in err and "nobody can answer a prompt" not in err
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    assert code == 0 and json.loads(out)["resources"][0]["health"] == "Missing"


def test_plan_says_apply_will_ask_consent_only_for_a_paid_provider(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan that would spend on an openai-type provider (loopback too: a serve may forward
    to a paid upstream) says, in one line and in --json, that apply asks consent (--yes),
    naming only those resources; apply without --yes then refuses, as said; a plan on the
    local engine alone says nothing of it."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    ws = make_workspace(
        tmp_path / "ws",
        providers={
            "paid": openai_provider("http://127.0.0.1:9/v1", KEY_ENV),
            "here": local_provider(),
        },
        resources=[ResourceSpec("priced", provider="paid"), ResourceSpec("free", provider="here")],
    )
    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 0, err
    [line] = [line for line in out.splitlines() if "consent" in line.lower()]
    assert "asks before it spends on paid" in line and "(priced)" in line and "--yes" in line
    assert "free" not in line
    assert json.loads(run_cli(["plan", str(ws.root), "--json"], capsys)[1])["needs_consent"] == [
        "priced"
    ]
    code, _, err = run_cli(["apply", str(ws.root)], capsys)
    assert code == 1 and "--yes" in err
    code, out, _ = run_cli(["plan", str(ws.root), "--select", "free"], capsys)
    assert code == 0 and "onsent" not in out
    doc = json.loads(run_cli(["plan", str(ws.root), "--select", "free", "--json"], capsys)[1])
    assert doc["needs_consent"] == []


def test_history_takes_paths_and_a_resource_option(
    applied: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """history PATH reads that workspace (a folder is not a resource name); --resource NAME
    filters; a NAME never recorded exits 1 listing the known ones; the old positional NAME
    is a usage error that says what to type."""
    monkeypatch.chdir(applied.root.parent)
    code, out, err = run_cli(["history", "ws", "--json"], capsys)
    assert code == 0, err
    assert [r["run"]["command"] for r in json.loads(out)["runs"]] == ["apply"]
    code, out, _ = run_cli(["history", "ws", "--resource", "alpha", "--json"], capsys)
    assert code == 0 and len(json.loads(out)["runs"]) == 1
    code, _, err = run_cli(["history", "ws", "--resource", "nobody"], capsys)
    assert code == 1 and "no resource named 'nobody'" in err
    assert "(known: alpha, beta)" in err  # as `show` and `results` list them
    assert "PATHS" not in err  # the resource is named right; no hint about PATHS
    code, _, err = run_cli(["history", "alpha"], capsys)
    assert code == 64 and "--resource alpha" in err


def test_apply_json_events_carry_timestamps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every NDJSON line of apply --json, the final result included, has an "at" timestamp."""
    ws = local_ws(tmp_path / "ws")
    code, out, _ = run_cli(["apply", str(ws.root), "--json", "--wait", *FAST], capsys)
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs[-1]["event"] == "result"
    for doc in docs:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["at"]), doc


def test_apply_without_wait_on_the_local_provider_says_its_batches_need_a_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin_upstream: Any
) -> None:
    """The local provider's batches advance only while batchspec runs: apply without --wait
    that leaves one in flight says so in its last line."""
    slow = standin_upstream(latency=1.0)
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": {"type": "local", "options": {"upstream": slow.v1}}},
        resources=[ResourceSpec("triage", count=2, provider="here")],
    )
    code, out, err = run_cli(["apply", str(ws.root)], capsys)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert "local provider" in last and "only while a batchspec command runs" in last
    assert last.startswith("Note: triage runs on the local provider"), last  # not "run(s)"


def test_a_refused_replace_on_the_local_provider_is_not_promised_to_run_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin_upstream: Any
) -> None:
    """The input changed while its local batch is in flight: apply --wait exits 1, saying the
    replace needs --allow-replace, and not that --wait runs its batches to the end (no pass
    steps a resource whose replace it refused); the plan says the wait for the old
    generation comes after its cancel, not that apply creates the new one when it ends."""
    slow = standin_upstream(latency=5.0)
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": {"type": "local", "options": {"upstream": slow.v1}}},
        resources=[ResourceSpec("triage", count=2, provider="here")],
    )
    assert run_cli(["apply", str(ws.root)], capsys)[0] == 0
    ws.write_input("triage", request_lines(3))
    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert "apply cancels generation 1 first, when allowed to replace it" in out, out
    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--timeout", "20"], capsys)
    assert code == 1, out + err
    assert "--allow-replace" in out + err
    assert "runs them to the end" not in out


def test_the_local_provider_note_of_a_large_workspace_names_a_few_and_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], standin_upstream: Any
) -> None:
    """The note about local batches in flight names 10 resources and the count, not every
    one of a large workspace on one line."""
    slow = standin_upstream(latency=1.0)
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": {"type": "local", "options": {"upstream": slow.v1}}},
        resources=[ResourceSpec(f"job-{i:02d}", count=1, provider="here") for i in range(12)],
    )
    code, out, err = run_cli(["apply", str(ws.root)], capsys)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("Note: job-00, job-01, ") and "job-09, … (12 in all) run on" in last
    assert "job-11" not in last


def test_status_and_apply_of_several_resources_end_with_their_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After the per-resource lines of several resources, one line counts them by sync and
    health and sums their requests, so a long listing's last line says how things stand;
    one resource gets no such line."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec(f"job-{i}", count=2, provider="here") for i in range(3)],
    )
    code, out, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)
    assert code == 0, err
    totals = "3 resources: 3 Synced; 3 Healthy; 6/6 requests succeeded"
    assert out.strip().splitlines()[-1] == totals
    ws.write_input("job-1", request_lines(3))  # a new generation: OutOfSync, Missing
    code, out, err = run_cli(["status", str(ws.root)], capsys)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last == (
        "3 resources: 2 Synced, 1 OutOfSync; 2 Healthy, 1 Missing; 4/4 requests succeeded"
    )
    code, out, err = run_cli(["status", str(ws.root), "-s", "job-0"], capsys)
    assert "resources:" not in out


def test_a_batch_of_one_request_is_not_called_1_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 'created batch' line counts in the singular for one request."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("one", count=1, provider="here")],
    )
    code, out, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)
    assert code == 0, err
    assert "(shard 1, attempt 1, 1 request)" in out


def test_a_create_sent_with_a_file_already_uploaded_is_seen_before_it_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An apply whose create reuses a file the provider already holds (no upload: here
    `--replace --no-reuse`, the same input) reports a step before that create is sent, so a
    Ctrl-C there does not say "no batch was created" while the create may land (the
    ``Interruption`` flipped only on an upload, a create answered, or an adoption)."""
    from batchspec.cli.main import Interruption
    from batchspec.core.reporting import Progress

    ws = local_ws(tmp_path / "ws")
    assert run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)[0] == 0
    argv = ["apply", str(ws.root), "--replace", "triage", "--no-reuse", "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    events = [e for e in json_lines(out) if "event" in e]
    assert [e["event"] for e in events].count("create") == 1
    assert "upload" not in [e["event"] for e in events]  # the file is the first one's

    interruption = Interruption(["apply"])
    interruption.batches_may_exist = False
    for event in events[: [e["event"] for e in events].index("create")]:
        interruption.saw(Progress(event["event"], event.get("resource"), event["message"]))
    assert interruption.batches_may_exist
