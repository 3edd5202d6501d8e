"""`batchspec history --by commit`: tokens and dollars per git commit.

Real git repositories, real `apply` runs on the local engine (priced by the provider's
`pricing`, so the dollars are not 0), read back through the CLI; the figures are held to
`history --json`'s per-run usage.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from workspaces import ResourceSpec, local_provider, make_workspace, run_cli

from batchspec.core.history import NO_GIT_LABEL

FAST = ["--poll-interval", "0.05"]


def priced_workspace(root: Path, *resources: ResourceSpec) -> Any:
    provider = {**local_provider(), "pricing": {"*": {"input": 1.0, "output": 2.0}}}
    ws = make_workspace(root, providers={"srv": provider}, resources=list(resources))
    (root / ".gitignore").write_text("state/\nresults/\n")  # so that a run leaves git clean
    return ws


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def commit(root: Path, message: str) -> str:
    if not (root / ".git").exists():
        git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "-qm", message)
    return git(root, "rev-parse", "HEAD")


def cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    code, text, err = run_cli(argv, capsys)
    assert code == 0, err
    return json.loads(text)


def apply(root: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> None:
    code, _, err = run_cli(["apply", str(root), "--yes", *FAST, *extra], capsys)
    assert code == 0, err


def test_spend_is_grouped_by_the_commit_that_created_each_generation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Four groups, newest first: a generation submitted on commit C2 and collected by a
    run on a later commit C3 counts for C2 (C3 has no group); a run from a tree with
    uncommitted changes is `<commit> + uncommitted changes`; a run outside git is
    `no git commit`. Each group's tokens and dollars equal the run that finished its
    generation in `history --json`, and the total equals the sum over runs."""
    root = tmp_path / "ws"
    priced_workspace(root, ResourceSpec("alpha", count=2))
    apply(root, capsys, "--wait")  # outside git
    priced_workspace(root, ResourceSpec("alpha", count=2), ResourceSpec("beta", count=3))
    c1 = commit(root, "add beta")
    apply(root, capsys, "--wait")  # beta, clean on C1
    priced_workspace(root, ResourceSpec("alpha", count=2), ResourceSpec("beta", count=4))
    apply(root, capsys, "--wait")  # beta again, C1 with data/beta.jsonl edited
    priced_workspace(root, ResourceSpec("alpha", count=5), ResourceSpec("beta", count=4))
    c2 = commit(root, "more alpha")
    apply(root, capsys)  # submits alpha's new generation on C2 (no --wait)
    (root / "README.md").write_text("unrelated\n")
    c3 = commit(root, "readme")
    apply(root, capsys, "--wait")  # collects it on C3

    runs = cli_json(["history", str(root), "--json"], capsys)["runs"]
    finished = {  # run id -> (commit, dirty, resources it wrote results for, usage)
        r["run"]["id"]: (
            r["run"]["git_commit"],
            r["run"]["git_dirty"],
            [e["resource"] for e in r["events"] if e["action"] == "results"],
            r["usage"],
        )
        for r in runs
        if any(e["action"] == "results" for e in r["events"])
    }
    assert [(c, d, names) for c, d, names, _ in finished.values()] == [
        (c3, False, ["alpha"]),  # the collecting run is on C3 ...
        (c1, True, ["beta"]),
        (c1, False, ["beta"]),
        (None, None, ["alpha"]),
    ]

    commits = cli_json(["history", str(root), "--by", "commit", "--json"], capsys)["commits"]
    assert (
        [(c["commit"], c["dirty"], c["label"]) for c in commits]
        == [
            (c2, False, c2[:10]),  # ... but the generation counts for C2, which created it
            (c1, True, f"{c1[:10]} + uncommitted changes"),
            (c1, False, c1[:10]),
            (None, False, NO_GIT_LABEL),
        ]
    )
    assert [list(c["resources"]) for c in commits] == [["alpha"], ["beta"], ["beta"], ["alpha"]]
    assert [c["generations"] for c in commits] == [1, 1, 1, 1]
    assert commits[0]["branches"] == ["main"] and commits[3]["branches"] == []
    for group, (_, _, _, usage) in zip(commits, finished.values(), strict=True):
        assert group["usage"]["input_tokens"] == usage["input_tokens"] > 0
        assert group["usage"]["output_tokens"] == usage["output_tokens"]
        assert group["usage"]["cost_usd"] == pytest.approx(usage["cost_usd"], abs=1e-9)
        assert group["usage"]["cost_usd"] > 0
    total = sum(r["usage"]["cost_usd"] for r in runs)
    assert sum(c["usage"]["cost_usd"] for c in commits) == pytest.approx(total, abs=1e-9)

    code, text, err = run_cli(["history", str(root), "--by", "commit"], capsys)
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0].startswith(f"{c2[:10]} on main  1 generation (created by run ")
    assert any(line.startswith(f"{c1[:10]} + uncommitted changes on main") for line in lines)
    assert any(line.startswith(NO_GIT_LABEL) for line in lines)
    assert "    beta: " in text and "$" in text


def test_by_commit_with_resource_and_limit_and_an_empty_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--resource keeps that resource's generations only, --limit the newest commits; a
    workspace never applied says so (exit 0), and an unknown --resource exits 1."""
    root = tmp_path / "ws"
    priced_workspace(root, ResourceSpec("alpha", count=2), ResourceSpec("beta", count=2))
    code, text, _ = run_cli(["history", str(root), "--by", "commit"], capsys)
    assert code == 0 and text.startswith("No results recorded yet")
    commit(root, "first")
    apply(root, capsys, "--wait")
    priced_workspace(root, ResourceSpec("alpha", count=3), ResourceSpec("beta", count=2))
    commit(root, "second")
    apply(root, capsys, "--wait")

    argv = ["history", str(root), "--by", "commit", "--json"]
    both = cli_json(argv, capsys)["commits"]
    assert [list(c["resources"]) for c in both] == [["alpha"], ["alpha", "beta"]]
    beta = cli_json([*argv, "--resource", "beta"], capsys)["commits"]
    assert [list(c["resources"]) for c in beta] == [["beta"]]
    assert beta[0]["usage"] == both[1]["resources"]["beta"]
    assert len(cli_json([*argv, "--limit", "1"], capsys)["commits"]) == 1
    code, _, err = run_cli([*argv, "--resource", "gamma"], capsys)
    assert code == 1 and "no resource named 'gamma'" in err


def test_by_commit_follows_a_rename(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After `metadata.moved` renames alpha to omega, the spend of alpha's generations is
    omega's: listed under omega, and `--resource omega` finds it (as `show omega` does)."""
    root = tmp_path / "ws"
    ws = priced_workspace(root, ResourceSpec("alpha", count=2))
    commit(root, "first")
    apply(root, capsys, "--wait")
    argv = ["history", str(root), "--by", "commit", "--json"]
    [before] = cli_json(argv, capsys)["commits"]
    ws.manifest_path("alpha").rename(ws.manifest_path("omega"))
    text = ws.manifest_path("omega").read_text()
    ws.manifest_path("omega").write_text(
        text.replace("name: alpha", "name: omega\n  moved:\n    from: alpha")
    )
    apply(root, capsys)

    commits = cli_json(argv, capsys)["commits"]
    assert [list(c["resources"]) for c in commits] == [["omega"]]
    assert commits[0]["resources"]["omega"] == before["resources"]["alpha"]
    [only] = cli_json([*argv, "--resource", "omega"], capsys)["commits"]
    assert only["usage"] == before["usage"] and only["usage"]["cost_usd"] > 0


def test_a_run_reading_an_uncommitted_manifest_or_input_is_dirty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest or an input that git does not track is not in the commit a run records: the
    run is `+ uncommitted changes`, as for an edited tracked file (a gitignored one too); an
    untracked file the run does not read (a result, a note, another resource's manifest) leaves
    it clean."""
    root = tmp_path / "repo" / "ws"  # a workspace in a subfolder of its repository
    priced_workspace(root, ResourceSpec("alpha", count=2))
    commit(root.parent, "alpha")
    (root / "notes.txt").write_text("not read by any run\n")
    priced_workspace(root, ResourceSpec("alpha", count=2), ResourceSpec("beta", count=2))

    def dirty_of_a_plan(*paths: str) -> bool | None:
        code, _, err = run_cli(["plan", *paths], capsys)
        assert code == 0, err
        [last, *_] = cli_json(["history", str(root), "--json", "--limit", "1"], capsys)["runs"]
        dirty: bool | None = last["run"]["git_dirty"]
        return dirty

    def commit_index(message: str) -> None:
        git(
            root,
            "-c",
            "user.name=T",
            "-c",
            "user.email=t@example.invalid",
            "commit",
            "-qm",
            message,
        )

    def commit_only(path: str, message: str) -> None:
        git(root, "add", path)
        commit_index(message)

    assert dirty_of_a_plan(str(root / "manifests" / "alpha.yaml")) is False
    commit_only("data/beta.jsonl", "beta's input")
    assert dirty_of_a_plan(str(root)) is True  # manifests/beta.yaml is untracked
    commit_only("manifests/beta.yaml", "beta's manifest")
    git(root, "rm", "-q", "--cached", "data/beta.jsonl")
    commit_index("untrack beta's input")
    assert dirty_of_a_plan(str(root)) is True  # data/beta.jsonl is untracked
    commit_only("data/beta.jsonl", "beta's input again")
    assert dirty_of_a_plan(str(root)) is False
    # a gitignored input is no more in the commit than an untracked one
    git(root, "rm", "-q", "--cached", "data/beta.jsonl")
    (root / ".gitignore").write_text("*.jsonl\n")
    commit_only(".gitignore", "ignore inputs")
    assert dirty_of_a_plan(str(root)) is True
    git(root, "add", "-f", "data/beta.jsonl")
    commit_index("beta's input, ignored but tracked")
    assert dirty_of_a_plan(str(root)) is False
