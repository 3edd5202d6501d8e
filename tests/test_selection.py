"""`--select`: NAME, KEY=VALUE labels and state:modified, as a union, for plan/apply/status.

Workspaces use the embedded engine (`type: local`): no server, real SQLite state.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from workspaces import ResourceSpec, Workspace, local_provider, make_workspace, run_cli

from batchspec.core.selection import (
    Selector,
    modified_resources,
    parse_selector,
    select_resources,
)
from batchspec.errors import ManifestError, UsageError
from batchspec.workspace.manifest import load_workspace

FAST = ["--poll-interval", "0.05"]


def labelled_ws(root: Path, labels: dict[str, dict[str, str]]) -> Workspace:
    """One local-engine resource per entry of ``labels`` (name -> its labels)."""
    ws = make_workspace(
        root,
        providers={"here": local_provider()},
        resources=[ResourceSpec(name, count=2, provider="here") for name in labels],
    )
    for name, lab in labels.items():
        path = ws.manifest_path(name)
        doc = yaml.safe_load(path.read_text())
        doc["metadata"]["labels"] = lab
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return ws


LABELS = {
    "alpha": {"team": "support", "tier": "gold"},
    "bravo": {"team": "search"},
    "charlie": {"team": "support"},
}


def never() -> frozenset[str]:
    raise AssertionError("state:modified was not asked for; the state must not be read")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("triage", Selector("name", "triage"), id="name"),
        pytest.param("team=support", Selector("label", "team", "support"), id="label"),
        pytest.param(
            "app.io/part=a=b", Selector("label", "app.io/part", "a=b"), id="label-eq-in-value"
        ),
        pytest.param("team=", Selector("label", "team", ""), id="label-empty-value"),
        pytest.param("state:modified", Selector("state", "modified"), id="state"),
    ],
)
def test_selectors_parse(text: str, expected: Selector) -> None:
    """Each accepted form parses to its kind, key and value."""
    assert parse_selector(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param("state:changed", "unknown state selector", id="unknown-state"),
        pytest.param("=x", "needs a key", id="no-key"),
        pytest.param("Not A Name", "is not a selector", id="bad-name"),
        # a comma list is not one selector: said how to give several
        pytest.param("alpha,bravo", "repeat it for several", id="comma-list"),
        # read as the label `team!` (or the value `=support`), they selected nothing
        pytest.param("team!=support", "equality only", id="not-equal"),
        pytest.param("team==support", "equality only", id="double-equals"),
    ],
)
def test_malformed_selectors_are_usage_errors(text: str, needle: str) -> None:
    """A selector that is none of the forms exits 64 and says which forms exist."""
    with pytest.raises(UsageError) as caught:
        parse_selector(text)
    assert needle in caught.value.message


def test_selection_is_a_union_in_manifest_order(tmp_path: Path) -> None:
    """Several selectors select what any of them matches, once, in the manifests' order."""
    ws = load_workspace([str(labelled_ws(tmp_path / "ws", LABELS).root)])
    picked = select_resources(ws.resources, ["charlie", "tier=gold", "alpha"], modified=never)
    assert [r.name for r in picked] == ["alpha", "charlie"]
    picked = select_resources(ws.resources, ["team=support", "bravo"], modified=never)
    assert [r.name for r in picked] == ["alpha", "bravo", "charlie"]
    assert [r.name for r in select_resources(ws.resources, [], modified=never)] == [
        "alpha",
        "bravo",
        "charlie",
    ]


def test_an_unknown_name_is_an_error_listing_the_known_ones(tmp_path: Path) -> None:
    """A typo in a name never silently selects nothing."""
    ws = load_workspace([str(labelled_ws(tmp_path / "ws", LABELS).root)])
    with pytest.raises(ManifestError) as caught:
        select_resources(ws.resources, ["alpah", "team=x"], modified=never)
    assert "no resource named 'alpah'" in caught.value.message
    assert "known: alpha, bravo, charlie" in caught.value.message


def test_an_unknown_name_among_many_lists_a_few_and_suggests_the_closest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With 30 resources, a mistyped name (`--select`, `show`, `--replace`, `cancel`) names
    the closest one and lists 10 known names and the count, not all 30."""
    names = [f"job-{i:02d}" for i in range(30)]
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec(name, count=1, provider="here") for name in names],
    )
    assert run_cli(["apply", str(ws.root), "--yes", "--quiet"], capsys)[0] == 0  # recorded
    for argv in (
        ["plan", str(ws.root), "--select", "jbo-07"],
        ["show", "jbo-07", str(ws.root)],
        ["apply", str(ws.root), "--replace", "jbo-07", "--yes"],
        ["cancel", "jbo-07", str(ws.root)],
    ):
        code, _, err = run_cli(argv, capsys)

        assert code == 1, argv
        assert "no resource named 'jbo-07'" in err
        assert "did you mean 'job-07'?" in err
        assert "job-00, job-01, job-02" in err and "(30 in all)" in err
        assert "job-29" not in err


def test_a_label_nothing_carries_is_an_error_listing_the_labels_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in a label (``tema=support``, ``team=suport``) never makes apply do nothing and
    pass: it exits 1 naming the labels in use, and nothing is recorded."""
    ws = labelled_ws(tmp_path / "ws", LABELS)
    for typo in ("tema=support", "team=suport"):
        code, out, err = run_cli(["apply", str(ws.root), "-s", typo, "-s", "alpha"], capsys)
        assert code == 1, (out, err)
        assert f"no resource has the label {typo}" in err
        assert "labels in use: team=search, team=support, tier=gold" in err
    assert not ws.state_path.exists()


def test_a_label_only_an_orphan_carries_selects_it_for_prune(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A label whose manifests are all deleted still selects the recorded orphans, so
    ``apply --prune -s team=search`` prunes bravo alone."""
    ws = labelled_ws(tmp_path / "ws", LABELS)
    root = str(ws.root)
    assert run_cli(["apply", root, "--wait", *FAST], capsys)[0] == 0
    ws.manifest_path("bravo").unlink()

    code, out, err = run_cli(["apply", root, "--prune", "-s", "team=search", "--wait"], capsys)

    assert code == 0, err
    with ws.store() as store:
        assert [r.name for r in store.list_resources()] == ["alpha", "charlie"]


def test_state_modified_without_state_is_everything_and_creates_no_database(
    tmp_path: Path,
) -> None:
    """Nothing recorded yet: every resource would be created, and no state file appears."""
    ws = load_workspace([str(labelled_ws(tmp_path / "ws", LABELS).root)])
    assert modified_resources(ws) == {"alpha", "bravo", "charlie"}
    assert not ws.project.state_path.exists()


def test_state_modified_follows_the_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After alpha converges, state:modified is everything else; a deleted result file (a
    restore) and a suspended resource count as modified / not modified as the plan says."""
    wsdir = labelled_ws(tmp_path / "ws", LABELS)
    root = str(wsdir.root)
    assert run_cli(["apply", root, "-s", "alpha", "--wait", *FAST], capsys)[0] == 0

    code, out, err = run_cli(["plan", root, "-s", "state:modified", "--json"], capsys)
    assert code == 0, err
    assert [a["resource"] for a in json.loads(out)["actions"]] == ["bravo", "charlie"]

    wsdir.output_path("alpha").unlink()
    suspend_path = wsdir.manifest_path("bravo")
    doc = yaml.safe_load(suspend_path.read_text())
    doc["spec"]["suspend"] = True
    suspend_path.write_text(yaml.safe_dump(doc))

    code, out, err = run_cli(["plan", root, "-s", "state:modified", "--json"], capsys)
    actions = {a["resource"]: a["action"] for a in json.loads(out)["actions"]}
    assert actions == {"alpha": "restore", "charlie": "create"}


def test_state_modified_selecting_nothing_says_so_not_that_paths_hold_no_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once every resource is in sync, plan and apply -s state:modified (and the apply of a
    plan saved with it) say nothing matches the selection (apply has nothing to do), not the
    wrong hint that no manifest was found."""
    ws = labelled_ws(tmp_path / "ws", LABELS)
    root = str(ws.root)
    assert run_cli(["apply", root, "--wait", *FAST], capsys)[0] == 0

    for command in ("plan", "apply"):
        code, out, err = run_cli([command, root, "-s", "state:modified"], capsys)
        assert code == 0, err
        assert "no resource matches --select state:modified" in out, out
        assert "no manifest was found" not in out, out
    saved = str(tmp_path / "plan.json")  # a saved plan keeps its selection: so does the text
    assert run_cli(["plan", root, "-s", "state:modified", "--out", saved], capsys)[0] == 0
    code, out, err = run_cli(["apply", saved], capsys)
    assert code == 0, err
    assert "no resource matches --select state:modified" in out, out
    assert "no manifest was found" not in out, out


def test_select_works_for_apply_and_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """apply -s team=support touches only the support resources; status -s shows them."""
    ws = labelled_ws(tmp_path / "ws", LABELS)
    root = str(ws.root)

    code, out, err = run_cli(["apply", root, "-s", "team=support", "--wait", *FAST], capsys)

    assert code == 0, err
    with ws.store() as store:
        assert [r.name for r in store.list_resources()] == ["alpha", "charlie"]
    code, out, err = run_cli(["status", root, "-s", "team=support", "--json"], capsys)
    assert [r["name"] for r in json.loads(out)["resources"]] == ["alpha", "charlie"]
    code, out, err = run_cli(["status", root, "-s", "state:modified", "--json"], capsys)
    assert [r["name"] for r in json.loads(out)["resources"]] == ["bravo"]
