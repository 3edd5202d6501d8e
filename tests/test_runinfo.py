"""Tests for batchspec.state.runinfo: git provenance, CI detection, and what it refuses to read."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

import batchspec
from batchspec.state.runinfo import CI_VARIABLES, USER_VARIABLES, collect_run_info

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "init.defaultBranch=trunk", *args],
        cwd=repo,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    (path / "batch.yaml").write_text("kind: Batch\n")
    git(path, "add", "batch.yaml")
    git(path, "commit", "-q", "-m", "first")
    return path


def test_git_commit_and_branch_detected_in_a_clean_repo(repo: Path) -> None:
    """Inside a repository the commit is HEAD's sha, the branch its name, and dirty False."""
    info = collect_run_info(repo, env={})
    assert info.git_commit == git(repo, "rev-parse", "HEAD")
    assert info.git_branch == "trunk"
    assert info.git_dirty is False


def test_edited_tracked_file_makes_the_tree_dirty(repo: Path) -> None:
    """A modified tracked file sets git_dirty; an untracked file alone does not."""
    (repo / "results.jsonl").write_text("{}\n")
    assert collect_run_info(repo, env={}).git_dirty is False
    (repo / "batch.yaml").write_text("kind: Batch\nspec: {}\n")
    assert collect_run_info(repo, env={}).git_dirty is True


def test_detached_head_has_commit_but_no_branch(repo: Path) -> None:
    """A detached HEAD (usual in CI) still reports the commit; the branch is None."""
    sha = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "--detach", sha)
    info = collect_run_info(repo, env={})
    assert (info.git_commit, info.git_branch) == (sha, None)


def test_commit_time_is_heads_committer_time(repo: Path) -> None:
    """The run records when HEAD was committed (epoch seconds), not when it was authored: a
    rebased or squash-merged commit is as new as its commit. A file named HEAD does not get
    in the way."""
    (repo / "HEAD").write_text("a file\n")
    git(repo, "add", "HEAD")
    dates = {"GIT_AUTHOR_DATE": "@1700000000 +0100", "GIT_COMMITTER_DATE": "@1767225600 -0500"}
    subprocess.run(
        ["git", "commit", "-q", "-m", "second"],
        cwd=repo,
        env={**os.environ, **GIT_ENV, **dates},
        check=True,
    )
    info = collect_run_info(repo, env={})
    assert (info.git_commit, info.git_commit_time) == (git(repo, "rev-parse", "HEAD"), 1767225600)


def test_a_repository_with_no_commit_yet_has_no_commit_nor_time(tmp_path: Path) -> None:
    """A fresh `git init`: no commit or time, but the branch to be and a clean tree."""
    git(tmp_path, "init", "-q")
    info = collect_run_info(tmp_path, env={})
    assert (info.git_commit, info.git_commit_time) == (None, None)
    assert (info.git_branch, info.git_dirty) == ("trunk", False)


@pytest.mark.parametrize(
    ("env", "branch"),
    [
        pytest.param({"GITLAB_CI": "true", "CI_COMMIT_BRANCH": "main"}, "main", id="gitlab-branch"),
        pytest.param(
            {"GITLAB_CI": "true", "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME": "feat"},
            "feat",
            id="gitlab-merge-request",
        ),
        pytest.param(
            {"GITHUB_ACTIONS": "true", "GITHUB_HEAD_REF": "feat", "GITHUB_REF_NAME": "7/merge"},
            "feat",
            id="github-pull-request",
        ),
        pytest.param(
            {"GITHUB_ACTIONS": "true", "GITHUB_REF_TYPE": "tag", "GITHUB_REF_NAME": "v1"},
            None,
            id="github-tag",
        ),
        pytest.param(
            {"JENKINS_URL": "http://j", "GIT_BRANCH": "origin/main"}, "main", id="jenkins"
        ),
        pytest.param({"CI_COMMIT_BRANCH": "main"}, None, id="not-in-gitlab"),
    ],
)
def test_detached_head_in_ci_takes_the_branch_the_ci_names(
    repo: Path, env: Mapping[str, str], branch: str | None
) -> None:
    """A CI checkout is a detached HEAD (GitLab's always): the branch is the CI's own
    variable for it, so history and history --by commit say which branch spent; it was None."""
    git(repo, "checkout", "-q", "--detach", "HEAD")
    assert collect_run_info(repo, env=env).git_branch == branch


def test_a_checked_out_branch_wins_over_the_ci_variables(repo: Path) -> None:
    """Where git knows the branch (not detached), it is the one recorded."""
    env = {"GITLAB_CI": "true", "CI_COMMIT_BRANCH": "main"}
    assert collect_run_info(repo, env=env).git_branch == "trunk"


def test_subdirectory_of_a_repo_reports_the_repo(repo: Path) -> None:
    """Running from a folder below the repository root still finds the commit."""
    sub = repo / "manifests"
    sub.mkdir()
    assert collect_run_info(sub, env={}).git_commit == git(repo, "rev-parse", "HEAD")


def test_outside_a_repo_git_fields_are_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that is not in a git repository gives None for commit, branch and dirty."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    plain = tmp_path / "plain"
    plain.mkdir()
    info = collect_run_info(plain, env={})
    assert (info.git_commit, info.git_branch, info.git_dirty) == (None, None, None)


def test_without_git_on_path_git_fields_are_none(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no git executable at all, collection still succeeds with None git fields."""
    monkeypatch.setenv("PATH", str(repo / "no-such-bin"))
    info = collect_run_info(repo, env={})
    assert (info.git_commit, info.git_branch, info.git_dirty) == (None, None, None)


def test_process_fields_describe_this_process(tmp_path: Path) -> None:
    """host, pid and version come from this process and the installed package."""
    info = collect_run_info(tmp_path, env={"USER": "alice"})
    assert info.host == socket.gethostname()
    assert info.pid == os.getpid()
    assert info.version == batchspec.__version__
    assert info.user == "alice"


def test_user_variables_are_consulted_in_getpass_order(tmp_path: Path) -> None:
    """LOGNAME wins over USER, as in getpass.getuser."""
    assert collect_run_info(tmp_path, env={"USER": "bob", "LOGNAME": "carol"}).user == "carol"


@pytest.mark.parametrize(
    ("env", "system", "url"),
    [
        pytest.param(
            {
                "GITHUB_ACTIONS": "true",
                "GITHUB_SERVER_URL": "https://github.example.com",
                "GITHUB_REPOSITORY": "acme/triage",
                "GITHUB_RUN_ID": "987654",
                "CI": "true",
            },
            "github-actions",
            "https://github.example.com/acme/triage/actions/runs/987654",
            id="github",
        ),
        pytest.param(
            {"GITHUB_ACTIONS": "true", "GITHUB_REPOSITORY": "acme/t"},
            "github-actions",
            None,
            id="github-without-run-id",
        ),
        pytest.param(
            {"GITLAB_CI": "true", "CI_JOB_URL": "https://gitlab.example/acme/-/jobs/7"},
            "gitlab-ci",
            "https://gitlab.example/acme/-/jobs/7",
            id="gitlab",
        ),
        pytest.param(
            {"CIRCLECI": "true", "CIRCLE_BUILD_URL": "https://circleci.com/gh/acme/t/12"},
            "circleci",
            "https://circleci.com/gh/acme/t/12",
            id="circleci",
        ),
        pytest.param(
            {"BUILDKITE": "true", "BUILDKITE_BUILD_URL": "https://buildkite.com/acme/t/builds/3"},
            "buildkite",
            "https://buildkite.com/acme/t/builds/3",
            id="buildkite",
        ),
        pytest.param(
            {"JENKINS_URL": "https://jenkins.acme/", "BUILD_URL": "https://jenkins.acme/job/t/4/"},
            "jenkins",
            "https://jenkins.acme/job/t/4/",
            id="jenkins",
        ),
        pytest.param({"CI": "true"}, "ci", None, id="generic-ci"),
        pytest.param({"CI": "false"}, None, None, id="ci-false"),
        pytest.param({"GITHUB_ACTIONS": "false"}, None, None, id="github-false"),
        pytest.param({}, None, None, id="no-ci"),
    ],
)
def test_ci_variables_are_mapped(
    tmp_path: Path, env: Mapping[str, str], system: str | None, url: str | None
) -> None:
    """Each well-known CI system is recognised and its run URL built from its variables."""
    info = collect_run_info(tmp_path, env=env)
    assert (info.ci_system, info.ci_run_url) == (system, url)


class RecordingEnv(dict[str, str]):
    """A mapping that remembers every key looked up in it."""

    def __init__(self, data: Mapping[str, str]) -> None:
        super().__init__(data)
        self.seen: set[str] = set()

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.seen.add(str(key))
        return super().__contains__(key)


def test_only_well_known_variables_are_read(tmp_path: Path) -> None:
    """collect_run_info never looks up a variable outside the documented allow-list."""
    env = RecordingEnv({"OPENAI_API_KEY": "sk-sentinel", "GITHUB_ACTIONS": "true"})
    info = collect_run_info(tmp_path, env=env)
    assert "GITHUB_ACTIONS" in env.seen  # the recorder works
    assert env.seen <= set(CI_VARIABLES) | set(USER_VARIABLES)
    assert "OPENAI_API_KEY" not in env.seen
    assert "sk-sentinel" not in repr(info)
