"""Who, where and from which commit a run was started: the provenance stored with each run.

``collect_run_info`` gathers the user, host, pid, the git commit/branch/dirty state of the
working directory and the CI system and run URL, so that ``batchspec history`` can answer
"who spent this, from which commit, in which CI job".

Promises:

* It reads only the well-known variables listed in ``USER_VARIABLES`` and ``CI_VARIABLES``
  from the ``env`` mapping it is given, never anything else. An API key in the environment
  can therefore never reach the state store through here.
* It never raises for a missing git, a folder outside a repository, a slow git or an unknown
  user: each such field is ``None``. Every git call has a short timeout.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

import batchspec

#: the variables getpass.getuser() consults, in its order
USER_VARIABLES = ("LOGNAME", "USER", "LNAME", "USERNAME")

#: every CI variable this module may read; nothing outside this tuple and USER_VARIABLES
CI_VARIABLES = (
    "GITHUB_ACTIONS",
    "GITHUB_SERVER_URL",
    "GITHUB_REPOSITORY",
    "GITHUB_RUN_ID",
    "GITLAB_CI",
    "CI_JOB_URL",
    "CIRCLECI",
    "CIRCLE_BUILD_URL",
    "BUILDKITE",
    "BUILDKITE_BUILD_URL",
    "JENKINS_URL",
    "BUILD_URL",
    "CI",
    # the branch a CI job runs for, when its checkout is a detached HEAD (``ci_branch``)
    "GITHUB_HEAD_REF",
    "GITHUB_REF_NAME",
    "GITHUB_REF_TYPE",
    "CI_COMMIT_BRANCH",
    "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME",
    "CIRCLE_BRANCH",
    "BUILDKITE_BRANCH",
    "BRANCH_NAME",
    "GIT_BRANCH",
)

GIT_TIMEOUT_SECONDS = 2.0

_COMMIT = re.compile(r"[0-9a-f]{7,64}")
_HEAD_LINE = re.compile(r"(?P<commit>[0-9a-f]{40,64}) ?(?P<time>[0-9]*)")


@dataclass(frozen=True)
class RunInfo:
    """Provenance of one run; ``None`` means unknown (no git, not a repository, not in CI)."""

    user: str | None
    host: str
    pid: int
    git_commit: str | None
    git_branch: str | None
    git_dirty: bool | None
    ci_system: str | None
    ci_run_url: str | None
    version: str
    git_commit_time: int | None = None  # committer time of git_commit, epoch seconds


@dataclass(frozen=True)
class GitInfo:
    commit: str | None
    branch: str | None
    dirty: bool | None
    commit_time: int | None = None  # HEAD's committer time, epoch seconds


@dataclass(frozen=True)
class HeadCommit:
    """The commit checked out, and its committer time (epoch seconds; None if git says none)."""

    commit: str
    time: int | None


class CommitRelation(Enum):
    """Where a commit stands to a checkout's HEAD (``commit_relation``)."""

    CONTAINED = "contained"  # HEAD itself, or one of its ancestors
    AHEAD = "ahead"  # HEAD is one of its ancestors: the checkout is behind it
    APART = "apart"  # neither: diverged, unrelated, or not in this repository (a shallow clone)


def collect_run_info(cwd: Path | None = None, env: Mapping[str, str] = os.environ) -> RunInfo:
    """Collect the provenance of the current process, for git in ``cwd`` (default: the cwd).

    Only the variables named in ``USER_VARIABLES`` and ``CI_VARIABLES`` are read from ``env``.
    """
    git = git_info(cwd or Path.cwd())
    ci_system, ci_run_url = ci_info(env)
    return RunInfo(
        user=current_user(env),
        host=socket.gethostname(),
        pid=os.getpid(),
        git_commit=git.commit,
        # CI checks out a detached HEAD (GitLab always, GitHub for pull requests): the branch
        # is then the one the CI says the job runs for
        git_branch=git.branch or (ci_branch(env) if git.commit is not None else None),
        git_dirty=git.dirty,
        ci_system=ci_system,
        ci_run_url=ci_run_url,
        version=batchspec.__version__,
        git_commit_time=git.commit_time,
    )


def start_run_info(cwd: Path, env: Mapping[str, str] = os.environ) -> Future[RunInfo]:
    """``collect_run_info`` on a thread of its own, started now: the git commands it spawns
    run while the caller does other work (an ``apply`` validates its inputs meanwhile)."""
    future: Future[RunInfo] = Future()

    def collect() -> None:
        try:
            future.set_result(collect_run_info(cwd, env))
        except BaseException as err:  # noqa: BLE001 - raised again by whoever takes it
            future.set_exception(err)

    threading.Thread(target=collect, name="batchspec-runinfo", daemon=True).start()
    return future


def current_user(env: Mapping[str, str]) -> str | None:
    """The login name, looked up like ``getpass.getuser`` but in ``env``, then the passwd db."""
    for name in USER_VARIABLES:
        if env.get(name):
            return env[name]
    try:
        import pwd  # not on Windows

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError, AttributeError):
        return None


def _is_set(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() not in ("", "0", "false", "no")


def ci_info(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(ci_system, ci_run_url) from the well-known variables of common CI systems."""
    if _is_set(env, "GITHUB_ACTIONS"):
        server = env.get("GITHUB_SERVER_URL") or "https://github.com"
        repo, run_id = env.get("GITHUB_REPOSITORY"), env.get("GITHUB_RUN_ID")
        url = f"{server.rstrip('/')}/{repo}/actions/runs/{run_id}" if repo and run_id else None
        return "github-actions", url
    if _is_set(env, "GITLAB_CI"):
        return "gitlab-ci", env.get("CI_JOB_URL") or None
    if _is_set(env, "CIRCLECI"):
        return "circleci", env.get("CIRCLE_BUILD_URL") or None
    if _is_set(env, "BUILDKITE"):
        return "buildkite", env.get("BUILDKITE_BUILD_URL") or None
    if env.get("JENKINS_URL"):
        return "jenkins", env.get("BUILD_URL") or None
    if _is_set(env, "CI"):
        return "ci", None
    return None, None


def ci_branch(env: Mapping[str, str]) -> str | None:
    """The branch the detected CI system says this job runs for (a pull or merge request's:
    its source branch), or None: outside CI, for a tag, or when the CI does not say."""

    def first(*names: str) -> str | None:
        return next((env[n] for n in names if env.get(n)), None)

    if _is_set(env, "GITHUB_ACTIONS"):
        if env.get("GITHUB_HEAD_REF"):  # set for pull_request events only
            return env["GITHUB_HEAD_REF"]
        return first("GITHUB_REF_NAME") if env.get("GITHUB_REF_TYPE") == "branch" else None
    if _is_set(env, "GITLAB_CI"):
        return first("CI_COMMIT_BRANCH", "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME")
    if _is_set(env, "CIRCLECI"):
        return first("CIRCLE_BRANCH")
    if _is_set(env, "BUILDKITE"):
        return first("BUILDKITE_BRANCH")
    if env.get("JENKINS_URL"):
        name = first("BRANCH_NAME", "GIT_BRANCH")
        return name.removeprefix("origin/") if name else None
    return None


def git_info(cwd: Path) -> GitInfo:
    """Commit (and its time), branch (None when detached) and dirtiness of tracked files in
    ``cwd``'s repo."""
    head = head_commit(cwd)
    inside = head is not None or _git(cwd, "rev-parse", "--git-dir") is not None
    if not inside:
        return GitInfo(None, None, None)
    branch = _git(cwd, "symbolic-ref", "--short", "-q", "HEAD")
    # Untracked files are ignored on purpose: results and state folders would otherwise make
    # every run look dirty; what matters is whether committed manifests were edited.
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    return GitInfo(
        commit=None if head is None else head.commit,
        branch=branch,
        dirty=None if status is None else status != "",
        commit_time=None if head is None else head.time,
    )


def with_untracked_reads(info: RunInfo, cwd: Path, read: Iterable[Path]) -> RunInfo:
    """``info``, dirty if git does not track one of the files the run ``read`` (its manifests,
    inputs, project file), gitignored ones included: the commit it records does not hold them.
    Untracked files the run did not read (results, notes) leave it as it was; so does a git
    that cannot tell."""
    if info.git_dirty is not False:  # dirty already, or outside git
        return info
    # every file of the checkout git does not track, ignored ones too (no --exclude-standard:
    # a gitignored input is no more in the commit than an untracked one), an untracked folder
    # as one entry ("dir/"), named relative to ``cwd``
    out = _git_run(cwd, "ls-files", "--others", "--directory", "-z", ":/")
    if out is None or out.returncode != 0 or not out.stdout:
        return info
    untracked = [(cwd / name).resolve() for name in out.stdout.split("\0") if name]
    for path in {p.resolve() for p in read}:
        if any(path == u or path.is_relative_to(u) for u in untracked):
            return replace(info, git_dirty=True)
    return info


def head_commit(cwd: Path) -> HeadCommit | None:
    """The commit ``cwd``'s checkout has at HEAD, with its committer time, from one git
    process; None when unknown (no git, not a repository, no commit yet, git too slow)."""
    # log.showSignature would put a signature check before the line asked for
    out = _git(cwd, "-c", "log.showSignature=false", "log", "-1", "--format=%H %ct", "HEAD", "--")
    found = _HEAD_LINE.fullmatch(out or "")
    if found is None:
        return None
    return HeadCommit(found["commit"], int(found["time"]) if found["time"] else None)


def commit_relation(cwd: Path, commit: str, head: str) -> CommitRelation | None:
    """Where ``commit`` stands to ``head`` (the HEAD of ``cwd``'s checkout, ``head_commit``),
    from at most one git process; None when git cannot tell (missing, too slow). A commit this
    repository does not hold (another clone's, one a shallow clone did not fetch) is
    ``APART``: the caller decides by the commits' times."""
    if commit == head:
        return CommitRelation.CONTAINED
    if not _COMMIT.fullmatch(commit):  # recorded by another tool, or edited: no option to git
        return CommitRelation.APART
    # the merge base of two commits one of which descends from the other is that one, alone
    done = _git_run(cwd, "merge-base", commit, head)
    if done is None:
        return None
    if done.returncode == 0:
        base = done.stdout.strip()
        if base == commit:
            return CommitRelation.CONTAINED
        return CommitRelation.AHEAD if base == head else CommitRelation.APART
    # 1: no common ancestor; 128: not a commit of this repository
    return CommitRelation.APART if done.returncode in (1, 128) else None


def _git(cwd: Path, *args: str) -> str | None:
    """Stdout of a git command, stripped, or None if git is missing, fails or is too slow."""
    done = _git_run(cwd, *args)
    if done is None or done.returncode != 0:
        return None
    return done.stdout.strip()


def _git_run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    """A git command's outcome, or None if git is missing or too slow."""
    # GIT_OPTIONAL_LOCKS=0 keeps `git status` from taking index.lock, so a concurrent git
    # command in the same repository never fails because batchspec was looking.
    child_env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done


__all__ = [
    "CI_VARIABLES",
    "USER_VARIABLES",
    "CommitRelation",
    "GitInfo",
    "HeadCommit",
    "RunInfo",
    "collect_run_info",
    "commit_relation",
    "head_commit",
    "start_run_info",
    "with_untracked_reads",
]
