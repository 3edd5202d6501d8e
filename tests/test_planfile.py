"""Saved plans (`plan --out`, `apply plan.json`) and the markdown plan for pull requests.

The pure parts (file round trip, staleness, spending rule, markdown) are tested directly;
the end-to-end tests run the CLI against the engine's OpenAI API over loopback behind a
`RequestProbe`, so "a stale plan touches nothing" is checked where it matters: the server
saw no request and the state serial did not move.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from probes import ProbedServer
from servers import request_lines, wait_for
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    run_cli,
    served,
)

from batchspec import __version__
from batchspec.cli.render import PLAN_MARKDOWN_MARKER, plan_markdown, plan_text
from batchspec.core.plan import Action, ActionKind, Plan
from batchspec.core.planfile import (
    PLAN_FILE_KIND,
    SCHEMA_VERSION,
    PlanResult,
    load_plan_file,
    saved_plan_from_json,
    saved_plan_of,
    stale_reasons,
)
from batchspec.engine import BuiltinUpstream, Faults, FaultyUpstream
from batchspec.errors import UsageError

FAST = ["--poll-interval", "0.05"]
HASH_A = "a" * 64
HASH_B = "b" * 64


# ---------------------------------------------------------------------------------------------
# pure: the file


def action(name: str, kind: ActionKind, requests: int = 0, reason: str = "why") -> Action:
    spends = kind in (ActionKind.CREATE, ActionKind.REPLACE, ActionKind.RETRY)
    return Action(
        resource=name,
        kind=kind,
        reason=reason,
        provider="srv",
        spec_hash=HASH_A,
        generation_id=None if kind is ActionKind.CREATE else 7,
        requests=requests if spends else 0,
        estimated_input_tokens=requests * 10 if spends else 0,
    )


def result(*actions: Action, **kw: Any) -> PlanResult:
    defaults: dict[str, Any] = {
        "serial": 12,
        "spec_hashes": {a.resource: HASH_A for a in actions if a.kind is not ActionKind.ORPHANED},
        "lineage": "lin",
        "paths": ("ws",),
        "selection": (),
        "prune": False,
    }
    return PlanResult(plan=Plan(tuple(actions)), **{**defaults, **kw})


def test_a_saved_plan_survives_its_json_round_trip() -> None:
    """Everything apply needs comes back from the file equal: plan, serial, lineage, hashes,
    paths, selection and prune."""
    saved = saved_plan_of(
        result(
            action("triage", ActionKind.CREATE, 3),
            action("old", ActionKind.ORPHANED),
            selection=("team=a", "triage"),
            prune=True,
        ),
        now=0,
    )
    data = json.loads(json.dumps(saved.to_json()))
    assert data["kind"] == PLAN_FILE_KIND
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["batchspec_version"] == __version__
    assert data["created_at"] == "1970-01-01T00:00:00Z"
    assert data["state"] == {"serial": 12, "lineage": "lin"}
    assert saved_plan_from_json(data) == saved


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param("not json", "is not a batchspec plan file", id="not-json"),
        pytest.param('{"kind": "something"}', '"kind": "batchspec/plan"', id="wrong-kind"),
        pytest.param(
            '{"kind": "batchspec/plan", "schema_version": 99}', "schema_version 99", id="newer"
        ),
        pytest.param(
            '{"kind": "batchspec/plan", "schema_version": 1, "state": {}}',
            "not a valid batchspec plan file",
            id="truncated",
        ),
    ],
)
def test_anything_but_a_plan_file_is_a_usage_error(tmp_path: Path, text: str, needle: str) -> None:
    """A .json that is not a plan file is refused with exit 64 and a reason."""
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        load_plan_file(path)
    assert needle in caught.value.message
    assert caught.value.exit_code == 64


CURRENT = {"lineage": "lin", "serial": 12, "spec_hashes": {"triage": HASH_A}}


@pytest.mark.parametrize(
    ("now", "plan_now", "needle"),
    [
        pytest.param({"lineage": "other"}, None, "another state database", id="lineage"),
        pytest.param({"serial": 13}, None, "serial 12 -> 13", id="serial"),
        pytest.param(
            {"spec_hashes": {"triage": HASH_B}},
            None,
            "triage: the manifest or its input changed",
            id="spec-hash",
        ),
        pytest.param(
            {"spec_hashes": {"triage": HASH_A, "extra": HASH_A}},
            None,
            "selected now but not in the plan: extra",
            id="resource-added",
        ),
        pytest.param(
            {"spec_hashes": {}}, None, "in the plan but not selected now: triage", id="removed"
        ),
        pytest.param(
            {},
            Plan((action("triage", ActionKind.RESTORE, reason="output file is missing"),)),
            "the plan says create, now it would be restore (output file is missing)",
            id="disk-changed",
        ),
    ],
)
def test_stale_reasons_name_what_changed(
    now: dict[str, Any], plan_now: Plan | None, needle: str
) -> None:
    """Each kind of change since the plan was made is reported in words."""
    saved = saved_plan_of(result(action("triage", ActionKind.CREATE, 3)))
    reasons = stale_reasons(saved, **{**CURRENT, **now}, plan_now=plan_now or saved.plan)
    assert any(needle in r for r in reasons), reasons


def test_an_unchanged_world_leaves_the_plan_current() -> None:
    """Same lineage, serial, specs and actions: no reason to refuse."""
    saved = saved_plan_of(result(action("triage", ActionKind.CREATE, 3)))
    assert stale_reasons(saved, **CURRENT, plan_now=saved.plan) == []


@pytest.mark.parametrize(
    ("planned", "asked", "allowed"),
    [
        pytest.param(ActionKind.CREATE, ActionKind.CREATE, True, id="create-planned"),
        pytest.param(ActionKind.RETRY, ActionKind.RETRY, True, id="retry-planned"),
        pytest.param(ActionKind.REFRESH, ActionKind.RETRY, False, id="retry-after-refresh"),
        pytest.param(ActionKind.COLLECT, ActionKind.RETRY, False, id="retry-after-collect"),
        pytest.param(ActionKind.NONE, ActionKind.CREATE, False, id="create-unplanned"),
    ],
)
def test_a_saved_plan_lets_a_resource_spend_only_as_planned(
    planned: ActionKind, asked: ActionKind, allowed: bool
) -> None:
    """Spending is allowed for the resource and kind the plan shows, nothing else."""
    saved = saved_plan_of(result(action("triage", planned, 3)))
    assert saved.may_spend(action("triage", asked, 3)) is allowed
    assert saved.may_spend(action("other", asked, 3)) is False


# ---------------------------------------------------------------------------------------------
# pure: markdown


def test_markdown_plan_has_marker_summary_table_and_details() -> None:
    """The PR comment: marker first, the summary in bold, one table row per resource with
    requests and tokens for spending rows, and a collapsible details section."""
    md = plan_markdown(
        result(
            action("triage", ActionKind.CREATE, 1200),
            action("summaries", ActionKind.NONE, reason="in sync: 3 succeeded"),
            action("gone", ActionKind.ORPHANED, reason="manifest is gone | odd <b>"),
            selection=("team=a",),
        )
    )
    lines = md.splitlines()
    assert lines[0] == PLAN_MARKDOWN_MARKER
    assert "**Plan: 1 to create. 1,200 requests to submit (~12,000 input tokens).**" in lines
    header = lines.index("| resource | action | reason | requests | est. tokens | est. cost |")
    rows = lines[header + 2 : header + 5]
    assert rows[0] == "| `triage` | `+` create | why | 1,200 | ~12,000 |  |"
    assert rows[1] == "| `summaries` | `=` none | in sync: 3 succeeded |  |  |  |"
    assert rows[2] == "| `gone` | `?` orphaned | manifest is gone \\| odd &lt;b&gt; |  |  |  |"
    assert "<details><summary>Details</summary>" in lines
    assert lines[-1] == "</details>"
    assert "- selection: `team=a`" in lines
    assert "- state serial: 12" in lines
    assert f"| `triage` | srv | `{HASH_A[:12]}` |  |" in lines


def test_markdown_plan_without_verbose_counts_the_resources_in_sync() -> None:
    """As the text plan: rows only for resources with a step (an orphan is one), the rest
    counted in one line; a fleet's comment listed every resource in sync, past a code host's
    comment size limit. With nothing to list there is no table, only the count."""
    md = plan_markdown(
        result(
            action("triage", ActionKind.CREATE, 1200),
            action("summaries", ActionKind.NONE, reason="in sync: 3 succeeded"),
            action("gone", ActionKind.ORPHANED, reason="manifest is gone"),
        ),
        unchanged=False,
    )
    lines = md.splitlines()
    assert "| `summaries` | `=` none | in sync: 3 succeeded |  |  |  |" not in lines
    header = lines.index("| resource | action | reason | requests | est. tokens | est. cost |")
    assert [row.split(" | ")[0] for row in lines[header + 2 : header + 4]] == [
        "| `triage`",
        "| `gone`",
    ]
    assert "_1 resource in sync, not listed: `plan --verbose` lists every one._" in lines
    md = plan_markdown(
        result(action("s", ActionKind.NONE, reason="in sync: 3 succeeded")), unchanged=False
    )
    assert "| resource | action |" not in md and "_1 resource in sync, not listed:" in md


def test_a_fleets_spend_estimate_names_the_costliest_and_sums_the_rest() -> None:
    """Past 10 spending resources the text plan's estimate names the 10 costliest (an unknown
    price first) and sums the rest in one line, the total unchanged; every=True lists all."""
    from batchspec.cli.render import plan_costs
    from batchspec.core.budget import Estimate

    costs: list[float | None] = [float(n) for n in range(1, 15)] + [None]
    names = [f"r{n:02d}" for n in range(len(costs))]
    estimates = {
        name: Estimate(1, 10, 20, cost, "m", None if cost is None else "table")
        for name, cost in zip(names, costs, strict=True)
    }
    plan = result(*(action(n, ActionKind.CREATE, 1) for n in names), estimates=estimates)
    lines = plan_costs(plan, every=False).splitlines()
    named = [line.split(":")[0].strip() for line in lines[2:12]]
    assert named == ["r14", "r13", "r12", "r11", "r10", "r09", "r08", "r07", "r06", "r05"]
    assert lines[12] == "  … and 5 more, ≤ $15.00 together (`plan --verbose` lists every one)"
    assert lines[13] == "  total: unknown price"
    assert len(plan_costs(plan).splitlines()) == 2 + 15 + 1 + 1
    # the unknown price says where a price goes, once, naming the model
    assert lines[14].startswith("  unknown price: no price is known for m; give it under")
    assert "`pricing` in batchspec.yaml" in lines[14]
    known = {name: e for name, e in estimates.items() if e.cost_usd is not None}
    priced = plan_costs(result(*(action(n, ActionKind.CREATE, 1) for n in known), estimates=known))
    assert "no price is known" not in priced


def test_a_fleets_markdown_plan_stays_under_a_comment_size_limit() -> None:
    """2,000 resources to create: each table keeps the rows that fit and counts the rest in
    one row, so the comment stays under GitHub's 65,536 characters (the CI example posts it
    whole: past ~470 creates it was refused); a small plan lists every row."""
    names = [f"job-{n:04d}" for n in range(2000)]
    md = plan_markdown(result(*(action(n, ActionKind.CREATE, 5) for n in names)))
    assert len(md) < 65_536
    lines = md.splitlines()
    header = lines.index("| resource | action | reason | requests | est. tokens | est. cost |")
    shown = [line for line in lines[header + 2 :] if line.startswith("| `job-")]
    first = [line for line in shown if "`+` create" in line]
    more = [line for line in lines if line.startswith("| _… ")]
    assert len(more) == 2 and 0 < len(first) < 2000
    assert more[0] == (
        f"| _… {2000 - len(first):,} more resources, not shown: the comment stays under a "
        "code host's size limit; `batchspec plan` lists every one_ |"
    )
    details = len(shown) - len(first)
    assert f"| _… {2000 - details:,} more resources, not shown:" in more[1]
    assert "not shown" not in plan_markdown(
        result(*(action(n, ActionKind.CREATE, 5) for n in names[:50]))
    )


def test_markdown_plan_without_changes_says_so() -> None:
    """An in-sync plan reads 'No changes' in the summary."""
    md = plan_markdown(result(action("triage", ActionKind.NONE, reason="in sync")))
    assert "**No changes: every resource is in sync.**" in md


# ---------------------------------------------------------------------------------------------
# end to end over loopback


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def serial(ws: Workspace) -> int:
    with ws.store() as store:
        return store.serial()


def test_apply_of_a_saved_plan_does_what_it_shows(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """plan --out then `apply plan.json` (no --yes needed) creates the planned batch once;
    the run records which plan file it applied."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    plan_path = tmp_path / "plan.json"

    code, out, err = run_cli(["plan", str(ws.root), "--out", str(plan_path)], capsys)
    assert code == 0, err
    saved = json.loads(plan_path.read_text())
    assert [a["action"] for a in saved["plan"]["actions"]] == ["create"]
    assert saved["resources"] == {"triage": saved["plan"]["actions"][0]["spec_hash"]}
    assert saved["state"]["serial"] == serial(ws)
    assert srv.probe.counts == {}  # plan contacts no provider

    code, out, err = run_cli(["apply", str(plan_path), *FAST], capsys)

    assert code == 0, err
    assert srv.probe.counts["POST /batches"] == 1
    with ws.store() as store:
        run = store.runs(limit=1)[0]
    assert run.command == "apply"
    assert run.args["plan_file"] == str(plan_path)


def test_a_plan_made_stale_by_another_apply_is_refused_and_touches_nothing(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """After another apply changed the state, `apply plan.json` exits 1 naming the serial,
    sends nothing to the provider and leaves the state serial where it was."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    plan_path = tmp_path / "plan.json"
    run_cli(["plan", str(ws.root), "--out", str(plan_path)], capsys)
    assert run_cli(["apply", str(ws.root), "--yes", *FAST], capsys)[0] == 0
    requests_before, serial_before = dict(srv.probe.counts), serial(ws)

    code, out, err = run_cli(["apply", str(plan_path), "--wait", *FAST], capsys)

    assert code == 1
    assert "plan.json is stale: the state changed since it was made" in err
    assert "nothing was done" in err
    assert dict(srv.probe.counts) == requests_before
    assert serial(ws) == serial_before


def test_a_plan_made_stale_by_an_edited_input_is_refused(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """An input edited after the plan changes the spec hash: refused, nothing uploaded."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    plan_path = tmp_path / "plan.json"
    run_cli(["plan", str(ws.root), "--out", str(plan_path)], capsys)
    ws.write_input("triage", request_lines(4))

    code, out, err = run_cli(["apply", str(plan_path)], capsys)

    assert code == 1
    assert "triage: the manifest or its input changed" in err
    assert srv.probe.counts == {}


def test_a_plan_made_stale_by_a_deleted_result_file_is_refused(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Disk drift after the plan (same serial, same specs) still makes it stale."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    plan_path = tmp_path / "plan.json"
    run_cli(["plan", str(ws.root), "--out", str(plan_path)], capsys)
    ws.output_path("triage").unlink()

    code, out, err = run_cli(["apply", str(plan_path)], capsys)

    assert code == 1
    assert "triage: the plan says none, now it would be restore" in err
    assert not ws.output_path("triage").exists()


def test_a_saved_plan_does_not_spend_on_a_retry_it_did_not_show(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan saw a batch in flight (refresh). Applying it collects the batch, whose every
    request failed retryably, but submits no retry; a plain apply afterwards does."""
    srv = server(upstream=FaultyUpstream(BuiltinUpstream(), Faults(error_500=1.0)), max_attempts=1)
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    plan_path = tmp_path / "plan.json"
    run_cli(["plan", str(ws.root), "--out", str(plan_path)], capsys)
    assert [a["action"] for a in json.loads(plan_path.read_text())["plan"]["actions"]] == [
        "refresh"
    ]

    code, out, err = run_cli(["apply", str(plan_path), "--wait", *FAST], capsys)

    assert code == 0, err
    assert "not in the saved plan: retry" in out
    assert srv.probe.counts["POST /batches"] == 1
    with ws.store() as store:
        assert [e.action for e in store.events(resource="triage")].count("collect") == 1

    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert srv.probe.counts["POST /batches"] == 2


def test_apply_refuses_select_or_prune_next_to_a_saved_plan(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan fixes the selection: giving --select again is a usage error (exit 64)."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    plan_path = tmp_path / "plan.json"
    run_cli(["plan", str(ws.root), "--out", str(plan_path)], capsys)

    code, out, err = run_cli(["apply", str(plan_path), "--select", "triage"], capsys)

    assert code == 64
    assert "a saved plan fixes the selection" in err
    assert srv.probe.counts == {}


def test_plan_out_needs_a_json_file_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--out plan.txt` is refused before anything is planned (apply tells plans by .json)."""
    code, out, err = run_cli(["plan", str(tmp_path), "--out", str(tmp_path / "plan.txt")], capsys)
    assert code == 64
    assert "must end in .json" in err


def test_plan_format_markdown_on_the_cli_and_detailed_exit_code(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan --format markdown --detailed-exitcode` prints only the markdown, exits 2 with
    changes; `--json` still prints the plan JSON; both together are a usage error."""
    srv = server()
    ws = served(tmp_path / "ws", srv)

    code, out, err = run_cli(
        ["plan", str(ws.root), "--format", "markdown", "--detailed-exitcode"], capsys
    )
    assert code == 2, err
    assert out.startswith(PLAN_MARKDOWN_MARKER + "\n")
    assert "| `triage` | `+` create | new resource | 3 |" in out

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0
    assert json.loads(out)["actions"][0]["action"] == "create"

    code, out, err = run_cli(["plan", str(ws.root), "--json", "--format", "markdown"], capsys)
    assert code == 64


def test_a_saved_plan_records_the_selection_and_reuses_it(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan --select a --out` saves the selection; applying it touches only `a`."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("a", count=2), ResourceSpec("b", count=2))
    plan_path = tmp_path / "plan.json"
    run_cli(["plan", str(ws.root), "--select", "a", "--out", str(plan_path)], capsys)
    assert json.loads(plan_path.read_text())["selection"] == ["a"]

    code, out, err = run_cli(["apply", str(plan_path)], capsys)

    assert code == 0, err
    with ws.store() as store:
        assert [r.name for r in store.list_resources()] == ["a"]
    wait_for(lambda: srv.batch_count() == 1)


def test_a_saved_replace_plan_is_its_own_consent(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A plan showing `replace` (the input changed while a batch is in flight) warns that a
    bare apply skips it, says it did not replace and exits 1 (CI must not pass with the old
    spec still running); the plan is applied from its file without --allow-replace: the old
    batch is cancelled, and the new one is created once it has stopped (its answers are
    reused: ``reconcile.hold``): by this apply if its re-poll saw it stopped, else the next."""
    srv = server(upstream=BuiltinUpstream(latency=5.0), drain_timeout=0.1)
    ws = served(tmp_path / "ws", srv)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    ws.write_input("triage", request_lines(4))
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 1, (out, err)
    assert "Re-run with --allow-replace" in out  # without a saved plan, consent is needed
    assert "Apply did not replace triage" in out  # not "batches are in flight: apply again"
    assert "Apply done for now" not in out
    assert srv.probe.counts["POST /batches"] == 1
    plan_path = tmp_path / "plan.json"
    _, _, err = run_cli(["plan", str(ws.root), "--out", str(plan_path)], capsys)
    assert "Warning: triage: spec changed" in err and "unless given --allow-replace" in err
    assert [a["action"] for a in json.loads(plan_path.read_text())["plan"]["actions"]] == [
        "replace"
    ]

    code, out, err = run_cli(["apply", str(plan_path)], capsys)

    assert code == 0, err
    assert srv.probe.counts["POST /batches/{id}/cancel"] == 1
    created = srv.probe.counts["POST /batches"] == 2
    assert created != ("waiting for generation 1 to stop (its answers are reused)" in out)
    client = srv.client()
    wait_for(lambda: [b.status for b in client.batches.list().data][-1:] == ["cancelled"])
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert srv.probe.counts["POST /batches"] == 2


def test_a_saved_plan_applies_from_another_folder_and_a_replace_plan_replaces(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plan made inside the workspace (no PATHS) remembers its workspace folder: `apply
    plan.json` from another folder applies it there. A `plan --replace` plan applied so
    creates the replacement; the plan is refused for another workspace."""
    srv = server()
    ws = served(tmp_path / "ws", srv)
    plan_path = tmp_path / "plans" / "plan.json"
    monkeypatch.chdir(ws.root)
    assert run_cli(["plan", "--out", str(plan_path)], capsys)[0] == 0
    assert json.loads(plan_path.read_text())["workspace"] == str(ws.root.resolve())
    monkeypatch.chdir(tmp_path)

    code, out, err = run_cli(["apply", str(plan_path), "--wait", *FAST], capsys)

    assert code == 0, err
    assert srv.probe.counts["POST /batches"] == 1
    assert (
        run_cli(["plan", str(ws.root), "--replace", "triage", "--out", str(plan_path)], capsys)[0]
        == 0
    )
    other = served(tmp_path / "other", srv)
    code, _, err = run_cli(["apply", str(plan_path), str(other.root)], capsys)
    assert code == 1 and "made for the workspace" in err
    code, out, err = run_cli(["apply", str(plan_path), "--wait", *FAST], capsys)
    assert code == 0, err
    with ws.store() as store:
        assert len(store.generations("triage")) == 2
        assert [e.action for e in store.events(resource="triage")].count("replace") == 1


@pytest.mark.parametrize(
    ("reason", "left_alone"),
    [
        ("in sync: 3 succeeded", True),
        ("in sync: 3 succeeded, 1 failed", False),
        ("in sync: 3 succeeded, 1 failed (degraded: failed finally; ...)", False),
        ("in sync: 3 succeeded; generation 2 is still stopping: ...", False),
        ("moved from old; in sync: 3 succeeded", False),
        ("in sync: 3 succeeded; forgotten: apply tracks it again", False),
    ],
)
def test_only_a_resource_in_sync_with_nothing_to_say_is_counted_not_listed(
    reason: str, left_alone: bool
) -> None:
    """Without --verbose the plans count resources in sync instead of listing them, but one
    with failures kept, a generation still stopping, a move or a forget is still listed."""
    assert action("r", ActionKind.NONE, reason=reason).leaves_alone is left_alone
    text = plan_text(Plan((action("r", ActionKind.NONE, reason=reason),)), unchanged=False)
    assert (reason in text) is not left_alone
