"""Which workspace a command works on (issue 10, #15, #16).

Outside any workspace, commands say so and how to start one, and read nothing. YAML files that
are not batchspec manifests are skipped when a glob finds them and reported when named. Read
commands (`status`, `results`, `history`) work from the state when an unrelated manifest is
broken: a warning on stderr, exit 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workspaces import ResourceSpec, local_provider, make_workspace, run_cli

FAST = ["--poll-interval", "0.05"]


def scattered_yaml(folder: Path) -> None:
    """YAML that is not ours, the way /tmp holds other projects' files."""
    for relative, text in {
        "venv/lib/site-packages/pkg/config.yaml": "key: [unclosed\n",
        "other-project/docker-compose.yml": "services: {web: {image: nginx}}\n",
        "notes.yaml": "- a\n- b\n",
    }.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["validate"], id="validate"),
        pytest.param(["plan"], id="plan"),
        pytest.param(["apply", "--yes"], id="apply"),
        pytest.param(["status"], id="status"),
        pytest.param(["history"], id="history"),
        pytest.param(["results", "x"], id="results"),
        pytest.param(["validate", "."], id="validate-dot"),
    ],
)
def test_outside_a_workspace_a_command_says_so_and_reads_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    """No batchspec.yaml here or above: exit 1 pointing at `batchspec init`; no YAML is read."""
    scattered_yaml(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert code == 1
    assert "not a batchspec workspace: no batchspec.yaml in" in err
    assert "batchspec init" in err
    assert "config.yaml" not in err + out and "notes.yaml" not in err + out
    assert not (tmp_path / "state").exists()  # nothing written either


def test_a_mistyped_path_outside_any_workspace_is_named_as_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply examples/quickstrat` (a typo) says the path does not exist, not that it is a
    folder without batchspec.yaml, which sent the user to `batchspec init` it."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["apply", "examples/quickstrat", "--wait"], capsys)
    assert code == 1
    assert "examples/quickstrat: no such file or folder" in err
    assert "not a batchspec workspace" not in err
    assert not (tmp_path / "examples").exists()


def test_a_yaml_file_that_is_not_a_manifest_is_skipped_when_found_and_reported_when_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Default globs find a compose file and a broken template: skipped; named: reported."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here")],
    )
    (ws.root / "batchspec.yaml").write_text("apiVersion: batchspec/v1\nkind: Project\n")
    (ws.root / "compose.yaml").write_text("services: {web: {image: nginx}}\n")
    (ws.root / "chart").mkdir()
    (ws.root / "chart" / "values.yaml").write_text("image: {{ .Values.image }\n")
    (ws.root / "manifests" / "a.yaml").write_text(
        (ws.root / "manifests" / "a.yaml").read_text().replace("provider: here", "provider: local")
    )
    code, out, err = run_cli(["validate", str(ws.root)], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("1 resource valid:")
    code, _, err = run_cli(["validate", str(ws.root / "compose.yaml")], capsys)
    assert code == 1
    assert "compose.yaml:1:1: not a batchspec manifest" in err


def test_a_broken_manifest_found_by_a_glob_is_still_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest with a syntax error (it says batchspec) is not mistaken for foreign YAML."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here")],
    )
    (ws.root / "manifests" / "b.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Batch\nmetadata: {name: [b\n"
    )
    code, _, err = run_cli(["validate", str(ws.root)], capsys)
    assert code == 1
    assert "manifests/b.yaml:" in err and "YAML syntax error" in err


@pytest.fixture
def applied_with_a_broken_neighbour(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A workspace with `a` applied and collected, then an unrelated manifest `b` broken."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here"), ResourceSpec("b", provider="here")],
    )
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    (ws.root / "manifests" / "b.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Batch\nspec: [\n"
    )
    return ws.root


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["status"], id="status"),
        pytest.param(["status", "--json"], id="status-json"),
        pytest.param(["results", "a"], id="results"),
        pytest.param(["history"], id="history"),
    ],
)
def test_read_commands_work_past_an_unrelated_broken_manifest(
    applied_with_a_broken_neighbour: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    """status, results and history exit 0 from the state, warning about b.yaml on stderr."""
    root = applied_with_a_broken_neighbour
    monkeypatch.chdir(root)
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    if argv[0] == "history":
        assert "apply" in out
        return
    # b is in status (Unknown), so the warning must not say it is "left out"
    assert "Warning: 1 problem in manifests, passed over since this command only reads" in err
    assert "manifests/b.yaml:" in err
    if argv == ["results", "a"]:
        assert len(out.splitlines()) == 3  # a's three answers
    elif "--json" in argv:
        doc = json.loads(out)
        [a, b] = doc["resources"]
        assert (a["name"], a["sync"], a["health"]) == ("a", "Synced", "Healthy")
        assert (b["name"], b["sync"]) == ("b", "Unknown")  # not Orphaned: it may be b.yaml
        # the warning's problems are in the document too (stderr alone left a program blind)
        [problem] = doc["problems"]
        assert problem["file"] == "manifests/b.yaml" and problem["line"] and problem["message"]
        assert doc["declared_elsewhere"] == 0
    else:
        assert "a: Synced, Healthy" in out


def test_results_of_the_broken_resource_itself_report_its_problems(
    applied_with_a_broken_neighbour: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`results b` needs b's manifest: its problem is the error (exit 1), not a guess."""
    monkeypatch.chdir(applied_with_a_broken_neighbour)
    code, out, err = run_cli(["results", "b"], capsys)
    assert (code, out) == (1, "")
    assert "manifests/b.yaml:" in err


def test_a_resource_name_given_as_a_path_says_to_use_select(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status triage` (or `results triage --select triage`, where every argument is a PATH)
    names the mistake: triage is a resource, pick it with --select; a mere typo gets no hint."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("triage", count=2, provider="here")],
    )
    monkeypatch.chdir(ws.root)
    for args in (["status", "triage"], ["results", "triage", "--select", "triage"]):
        code, _, err = run_cli(args, capsys)
        assert code == 1
        assert "triage: no such file or folder" in err
        assert "triage is a resource name, not a path" in err and "--select triage" in err
    code, _, err = run_cli(["status", "triagge"], capsys)
    assert code == 1 and "resource name" not in err


def test_plan_and_apply_from_a_folder_without_manifests_fail_as_validate_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run from the workspace's data/ folder (no manifest below it), plan and apply exit 1
    as validate does, saying no manifest was found there and that the workspace's are
    elsewhere, instead of exiting 0 having done nothing (a CI job run from the wrong folder
    would pass)."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("triage", count=2, provider="here")],
    )
    monkeypatch.chdir(ws.root / "data")
    for args in (["validate"], ["plan"], ["apply"], ["apply", "--prune", "--yes"]):
        code, out, err = run_cli(args, capsys)
        assert code == 1, (args, out, err)
        assert "no resources found under" in err and "manifest globs" in err, err
        # it says where the manifests are: a folder away, not missing
        assert "find 1 file(s) in the workspace" in err and "none under ." in err, err
        assert "run from the workspace's root" in err, err
        assert "in sync" not in out, out
    assert not ws.output_path("triage").exists()


def test_a_name_selected_from_a_folder_without_its_manifest_fails_naming_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run from data/, `apply --select NAME` of a resource the workspace declares (and the
    state tracks) under manifests/ said "no resource matches --select NAME" and exited 0:
    a CI job run from the wrong folder passed having done nothing. Now exit 1, saying the
    resource is declared outside the paths read and what to do."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("triage", count=2, provider="here")],
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0  # now tracked
    monkeypatch.chdir(ws.root / "data")
    for args in (["apply", "-s", "triage"], ["apply", "--prune", "-s", "triage"]):
        code, out, err = run_cli(args, capsys)
        assert code == 1, (args, out, err)
        assert "'triage' is declared in the workspace" in err, err
        assert "run from the workspace's root" in err, err
        assert "no resource matches" not in out + err, out


def test_status_from_a_folder_without_manifests_says_where_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status` run from data/ said "No resources." of a workspace that declares (and
    tracks) one under manifests/, as of an empty one: it says how many are declared
    elsewhere and to run from the root (still exit 0: a read command)."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("triage", count=2, provider="here")],
    )
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    monkeypatch.chdir(ws.root / "data")
    code, out, err = run_cli(["status"], capsys)
    assert code == 0, err
    assert "the workspace declares 1 in manifests outside the paths read" in out, out
    assert "run from its root" in out, out
    # --json says it too: `{"resources": []}` alone was an empty workspace to a program
    code, out, err = run_cli(["status", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["resources"], doc["declared_elsewhere"], doc["problems"]) == ([], 1, [])


def test_status_counts_only_the_resources_declared_outside_the_paths_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`declared_elsewhere` (and the text's "declares N") counts the resources outside the
    PATHS read: it counted every name of the workspace, those shown included, and each
    `moved.from` as one more (status from manifests/ said 3 of a workspace showing its 2)."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here"), ResourceSpec("b", provider="here")],
    )
    manifest = ws.manifest_path("b")
    manifest.write_text(
        manifest.read_text().replace("  name: b\n", "  name: b\n  moved: {from: old-b}\n")
    )
    assert "moved: {from: old-b}" in manifest.read_text()
    monkeypatch.chdir(ws.root / "manifests")
    for argv, shown, elsewhere in (
        (["status", "--json"], 2, 0),
        (["status", "--json", "a.yaml"], 1, 1),
        (["status", "--json", "../data"], 0, 2),
    ):
        code, out, err = run_cli(argv, capsys)
        assert code == 0, err
        doc = json.loads(out)
        assert (len(doc["resources"]), doc["declared_elsewhere"]) == (shown, elsewhere), argv
    code, out, _ = run_cli(["status", "../data"], capsys)
    assert code == 0 and "the workspace declares 2 in manifests outside the paths read" in out


def test_a_mistyped_manifest_glob_prunes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in the project's `manifests:` glob finds no manifest, and says so (not that
    the files hold no document). `apply --prune --yes` refused, as validate does, and left
    every tracked resource's batches running: before, it took all of them for resources
    whose manifests were deleted and cancelled them."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here"), ResourceSpec("b", provider="here")],
    )
    root = str(ws.root)
    assert run_cli(["apply", root, "--yes"], capsys)[0] == 0  # created, still in flight
    project = ws.root / "batchspec.yaml"
    project.write_text(project.read_text().replace("manifests/", "manifest/"))
    for args in (["plan", root, "--prune"], ["apply", root, "--prune", "--yes"]):
        code, out, err = run_cli(args, capsys)
        assert code == 1, (args, out, err)
        # the glob matches no file at all: said so, not "no document in the files it holds"
        assert "(manifest/*.yaml) match no file in the workspace" in err, err
        assert "check `manifests:` in" in err and "files it holds" not in err, err
        assert "--prune is refused" in err and "--prune --select NAME" in err, err
        assert "prune" not in out, out
    project.write_text(project.read_text().replace("manifest/", "manifests/"))
    code, out, err = run_cli(["status", root, "--json"], capsys)
    assert code == 0, err
    tracked = {r["name"]: r for r in json.loads(out)["resources"]}
    assert set(tracked) == {"a", "b"}, tracked
    assert run_cli(["apply", root, "--wait", "--yes"], capsys)[0] == 0
    assert ws.output_path("a").exists() and ws.output_path("b").exists()


def test_a_foreign_broken_yaml_file_does_not_refuse_a_prune_given_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A YAML file the manifest globs find that is plainly not batchspec's (a Helm values
    template, invalid YAML) is skipped by `apply --prune`; `apply --prune PATHS` refused the
    same prune as 'cannot tell which resources' manifests are gone', naming that file."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here"), ResourceSpec("b", provider="here")],
    )
    root = str(ws.root)
    assert run_cli(["apply", root, "--yes"], capsys)[0] == 0
    (ws.root / "manifests" / "values.yaml").write_text("image: {{ .Values.image }}\n  x: [\n")
    ws.manifest_path("b").unlink()
    a = str(ws.manifest_path("a"))
    code, out, err = run_cli(["plan", a, "--prune", "--json"], capsys)
    assert code == 0, err
    assert {x["resource"]: x["action"] for x in json.loads(out)["actions"]}["b"] == "prune", out
    code, out, err = run_cli(["apply", a, "--prune", "--yes"], capsys)
    assert code == 0, err
    with ws.store() as store:
        assert [r.name for r in store.list_resources()] == ["a"]


def test_prune_refuses_a_state_none_of_whose_resources_the_workspace_declares(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Workspace b pointed at workspace a's state (--state, BATCHSPEC_STATE): every resource
    there is an orphan to b, so `apply --prune` cancelled and forgot all of a's batches. It
    is now refused, naming the state and what to check; a keeps its batch. Pruning by name
    (--select) still works, for resources deleted or renamed all at once."""
    a = make_workspace(
        tmp_path / "a",
        providers={"here": local_provider()},
        resources=[ResourceSpec("alpha", provider="here")],
    )
    b = make_workspace(
        tmp_path / "b",
        providers={"here": local_provider()},
        resources=[ResourceSpec("beta", provider="here")],
    )
    assert run_cli(["apply", str(a.root), "--yes"], capsys)[0] == 0
    a_state = str(a.root / "state" / "batchspec.db")
    for command in (["plan", "--prune"], ["apply", "--prune", "--yes"]):
        code, out, err = run_cli([*command, str(b.root), "--state", a_state], capsys)
        assert code == 1, (command, out, err)
        assert "every resource the state at" in err and "(alpha)" in err, err
        assert "another workspace's state" in err and "--prune --select NAME" in err, err
    with a.store() as store:
        assert [r.name for r in store.list_resources()] == ["alpha"]
        assert not [e for e in store.events() if e.action in ("cancel", "prune")]
        assert not [r for r in store.list_resources() if r.name == "beta"]
    assert run_cli(["apply", str(a.root), "--wait", "--yes"], capsys)[0] == 0
    assert a.output_path("alpha").exists()

    # a's one manifest renamed: with a state named by --state, the old name is pruned when
    # named; with the workspace's own state (it cannot be another's), as before
    a.manifest_path("alpha").write_text(
        a.manifest_path("alpha").read_text().replace("name: alpha", "name: gamma")
    )
    code, _, err = run_cli(["apply", str(a.root), "--prune", "--state", a_state], capsys)
    assert code == 1 and "(alpha)" in err, err
    argv = ["apply", str(a.root), "--prune", "--yes", "--state", a_state, "--select", "alpha"]
    assert run_cli(argv, capsys)[0] == 0
    with a.store() as store:
        assert [r.name for r in store.list_resources()] == []
    a.manifest_path("alpha").write_text(
        a.manifest_path("alpha").read_text().replace("name: gamma", "name: delta")
    )
    assert run_cli(["apply", str(a.root), "--yes"], capsys)[0] == 0
    a.manifest_path("alpha").write_text(
        a.manifest_path("alpha").read_text().replace("name: delta", "name: omega")
    )
    assert run_cli(["apply", str(a.root), "--prune", "--yes"], capsys)[0] == 0
    with a.store() as store:
        assert [r.name for r in store.list_resources()] == ["omega"]


@pytest.mark.parametrize("select", ["state:modified", "team=ml"])
def test_a_selector_that_takes_in_orphans_does_not_lift_the_prune_guards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], select: str
) -> None:
    """`--select state:modified` selects every orphan, and a label every orphan that carried
    it, so neither names what a prune cancels: after a mistyped manifest glob, and from
    another workspace pointed at this one's state, `apply --prune --select ...` is refused
    as a bare `--prune` is (both cancelled and forgot every resource)."""
    specs = [ResourceSpec(n, provider="here") for n in ("a1", "a2")]
    a = make_workspace(tmp_path / "a", providers={"here": local_provider()}, resources=specs)
    for name in ("a1", "a2"):
        path = a.manifest_path(name)
        path.write_text(
            path.read_text().replace(f"name: {name}\n", f"name: {name}\n  labels: {{team: ml}}\n")
        )
    b = make_workspace(
        tmp_path / "b",
        providers={"here": local_provider()},
        resources=[ResourceSpec("beta", provider="here")],
    )
    root = str(a.root)
    assert run_cli(["apply", root, "--yes"], capsys)[0] == 0
    a_state = str(a.root / "state" / "batchspec.db")
    argv = ["apply", str(b.root), "--state", a_state, "--prune", "--yes", "--select", select]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "another workspace's state" in err, err
    project = a.root / "batchspec.yaml"
    project.write_text(project.read_text().replace("manifests/", "manifest/"))
    code, _, err = run_cli(["apply", root, "--prune", "--yes", "--select", select], capsys)
    assert code == 1 and "no resources found" in err, err
    project.write_text(project.read_text().replace("manifest/", "manifests/"))
    with a.store() as store:
        assert [r.name for r in store.list_resources()] == ["a1", "a2"]
        assert not [e for e in store.events() if e.action in ("cancel", "prune")]


def test_state_modified_from_a_folder_without_manifests_fails_as_validate_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CI form `apply --select state:modified`, run from a folder holding no manifest,
    exits 1 as a bare apply does, not 0 having done nothing."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("triage", count=2, provider="here")],
    )
    monkeypatch.chdir(ws.root / "data")
    for args in (["plan", "-s", "state:modified"], ["apply", "--yes", "-s", "state:modified"]):
        code, out, err = run_cli(args, capsys)
        assert code == 1 and "no resources found" in err, (args, out, err)


def test_a_manifest_outside_the_project_globs_is_run_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """validate, plan and apply of jobs/x.yaml, which `manifests:` does not list, warn that a
    run without PATHS shows it orphaned (and --prune cancels it); listed manifests do not."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here"), ResourceSpec("x", provider="here")],
    )
    (ws.root / "jobs").mkdir()
    (ws.root / "manifests" / "x.yaml").rename(ws.root / "jobs" / "x.yaml")
    monkeypatch.chdir(ws.root)
    for argv in (["validate"], ["plan"], ["apply", "--yes", *FAST]):
        code, out, err = run_cli([*argv, "jobs/x.yaml"], capsys)
        assert code == 0, err
        said = out + err  # apply's warnings are among its progress lines
        assert "Warning: jobs/x.yaml is not among the project's manifests" in said, argv
        assert "`apply --prune` cancels" in said
        code, out, err = run_cli([*argv, "manifests/a.yaml"], capsys)
        assert code == 0 and "not among the project's manifests" not in out + err, argv
