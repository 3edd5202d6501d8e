"""examples/ci/: both workflows' shape, and their batchspec commands run for real.

The tests read a workflow, take the `batchspec ...` lines of each job's `run:` scripts, and
run exactly those, in the order the events would trigger them (pull request, push to main, a
scheduled run, the next pull request) against the engine's OpenAI API over loopback. Each
job starts from a fresh copy of the repository: for github-actions-sqlite.yml plus the
folders the workflow persists on its state branch (BATCHSPEC_PERSIST), so the test also
proves those folders are enough; for github-actions.yml (state in PostgreSQL) plus nothing
at all. The job's `env` is applied, with `${{ secrets.X }}` standing for the API key the
server wants, or for the throwaway PostgreSQL database's URL.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from probes import ProbedServer, start_probed_server
from servers import stop_after_test, wait_for
from workspaces import SENTINEL_KEY, ResourceSpec, make_workspace, openai_provider, run_cli

from batchspec.cli.render import PLAN_MARKDOWN_MARKER

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ci"
WORKFLOW = EXAMPLES / "github-actions.yml"  # the state in PostgreSQL
WORKFLOW_SQLITE = EXAMPLES / "github-actions-sqlite.yml"  # SQLite carried on a git branch
STATE_SECRET = "${{ secrets.BATCHSPEC_STATE_URL }}"
SHELL_OPERATORS = {">", ">>", "<", "|", "||", "&&", ";", "&", "2>", "2>&1"}
SECRET = re.compile(r"^\$\{\{\s*secrets\.\w+\s*\}\}$")


def load_workflow(path: Path = WORKFLOW_SQLITE) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def batchspec_commands(job: dict[str, Any]) -> list[list[str]]:
    """argv (after `batchspec`) of every line of the job's scripts that runs batchspec."""
    commands = []
    for step in job["steps"]:
        for line in str(step.get("run", "")).splitlines():
            words = shlex.split(line, comments=True)
            if not words or words[0] != "batchspec":
                continue
            argv = []
            for word in words[1:]:
                if word in SHELL_OPERATORS:
                    break
                argv.append(word)
            commands.append(argv)
    return commands


def job_env(doc: dict[str, Any], job: dict[str, Any]) -> dict[str, str]:
    return {**doc.get("env", {}), **job.get("env", {})}


# ---------------------------------------------------------------------------------------------
# the workflow's shape


@pytest.mark.parametrize("path", [WORKFLOW, WORKFLOW_SQLITE], ids=["postgresql", "sqlite"])
def test_workflow_triggers_and_jobs(path: Path) -> None:
    """Plans on pull requests, applies on pushes to main and every 30 minutes."""
    doc = load_workflow(path)
    on = doc["on"]
    assert "pull_request" in on
    assert on["push"]["branches"] == ["main"]
    assert {"cron": "*/30 * * * *"} in on["schedule"]
    jobs = doc["jobs"]
    assert jobs["plan"]["if"] == "github.event_name == 'pull_request'"
    assert jobs["apply"]["if"] == "github.event_name != 'pull_request'"
    assert batchspec_commands(jobs["plan"]) == [
        ["plan", "--format", "markdown", "--detailed-exitcode"]
    ]
    assert batchspec_commands(jobs["apply"]) == [["apply", "--yes", "--json"]]


def test_workflow_keeps_one_writer_and_gives_plans_no_key() -> None:
    """Apply runs queue in one concurrency group and never cancel one another; only apply
    sees the API key and may push; the plan job can comment on the pull request."""
    doc = load_workflow()
    plan, apply = doc["jobs"]["plan"], doc["jobs"]["apply"]
    assert apply["concurrency"]["cancel-in-progress"] is False
    assert plan["concurrency"]["group"] != apply["concurrency"]["group"]
    assert not any(SECRET.match(str(v)) for v in job_env(doc, plan).values())
    assert any(SECRET.match(str(v)) for v in job_env(doc, apply).values())
    assert apply["permissions"] == {"contents": "write"}
    assert plan["permissions"]["pull-requests"] == "write"
    assert plan["permissions"]["contents"] == "read"


def test_workflow_persists_state_and_results_and_comments_with_the_marker() -> None:
    """The state branch carries state/ and results/, is saved even after a failed apply,
    and the comment step looks for the marker every markdown plan starts with."""
    doc = load_workflow()
    assert doc["env"]["BATCHSPEC_PERSIST"].split() == ["state", "results"]
    steps = {s.get("name"): s for s in doc["jobs"]["apply"]["steps"]}
    assert steps["Save the state"]["if"] == "always()"
    assert "git push" in steps["Save the state"]["run"]
    comment = next(s for s in doc["jobs"]["plan"]["steps"] if "github-script" in s.get("uses", ""))
    assert f'"{PLAN_MARKDOWN_MARKER}"' in comment["with"]["script"]
    assert "plan.md" in comment["with"]["script"]


@pytest.mark.parametrize("path", [WORKFLOW, WORKFLOW_SQLITE], ids=["postgresql", "sqlite"])
def test_a_failed_plan_replaces_the_comment_and_then_fails_the_job(
    path: Path, tmp_path: Path
) -> None:
    """The Plan step's script, run by bash as GitHub runs it, on an invalid input: plan.md
    says the plan failed (so the comment no longer shows the last plan that worked), and a
    step after the comment fails the job; the pull request kept a stale, green plan."""
    steps = load_workflow(path)["jobs"]["plan"]["steps"]
    names = [s.get("name") for s in steps]
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": openai_provider("http://127.0.0.1:9/v1", "NO_KEY_HERE")},
        resources=[ResourceSpec("triage", count=2)],
    )
    ws.input_path("triage").write_text("not json\n", encoding="utf-8")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "batchspec").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m batchspec "$@"\n')
    (bin_dir / "batchspec").chmod(0o755)
    outputs = tmp_path / "github_output"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "GITHUB_OUTPUT": str(outputs),
        "BATCHSPEC_STATE": str(ws.state_path),  # the secret: set
    }
    script = steps[names.index("Plan")]["run"]
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=ws.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr  # the comment step must still run
    assert outputs.read_text() == "exitcode=1\n"
    body = (ws.root / "plan.md").read_text()
    assert body.startswith(PLAN_MARKDOWN_MARKER + "\n")
    assert "batchspec plan failed (exit 1)" in body
    assert "triage" in done.stderr  # the log says why
    comment = next(i for i, s in enumerate(steps) if "github-script" in s.get("uses", ""))
    fail = steps[names.index("Fail if the plan failed")]
    assert names.index("Fail if the plan failed") > comment > names.index("Plan")
    assert fail["if"] == "steps.plan.outputs.exitcode != '0' && steps.plan.outputs.exitcode != '2'"
    assert fail["run"].rstrip().endswith("exit 1")


# ---------------------------------------------------------------------------------------------
# the same command sequence, for real


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ProbedServer]:
    srv = start_probed_server(tmp_path / "engine", api_key=SENTINEL_KEY)
    yield srv
    stop_after_test([srv])


class CiRunner:
    """Runs a job's batchspec commands as a fresh checkout with the persisted folders."""

    def __init__(
        self, doc: dict[str, Any], repo: Path, tmp: Path, secrets: dict[str, str] | None = None
    ) -> None:
        self.doc = doc
        self.repo = repo
        self.branch = tmp / "state-branch"  # what the state branch holds between runs
        self.tmp = tmp
        self.runs = 0
        self.persist = doc["env"].get("BATCHSPEC_PERSIST", "").split()
        self.secrets = secrets or {}  # "${{ secrets.X }}" -> value; any other: the API key
        self.checkout = tmp

    def secret(self, value: str) -> str:
        return self.secrets.get(value, SENTINEL_KEY)

    def run_job(
        self,
        name: str,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        *,
        save: bool,
    ) -> list[tuple[int, str, str]]:
        job = self.doc["jobs"][name]
        self.runs += 1
        checkout = self.checkout = self.tmp / f"run{self.runs}"
        shutil.copytree(self.repo, checkout)
        for folder in self.persist:  # restore
            if (self.branch / folder).is_dir():
                shutil.copytree(self.branch / folder, checkout / folder, dirs_exist_ok=True)
        with monkeypatch.context() as env:
            for key, value in job_env(self.doc, job).items():
                env.setenv(key, self.secret(value) if SECRET.match(str(value)) else str(value))
            env.chdir(checkout)
            results = [run_cli(argv, capsys) for argv in batchspec_commands(job)]
        if save:
            for folder in self.persist:
                shutil.rmtree(self.branch / folder, ignore_errors=True)
                if (checkout / folder).is_dir():
                    shutil.copytree(checkout / folder, self.branch / folder)
        return results


def test_the_workflow_commands_plan_apply_collect_and_settle(
    tmp_path: Path,
    server: ProbedServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pull request: plan exits 2 with a markdown plan; push to main: apply exits 0 having
    submitted; scheduled run: apply exits 0 having collected the results; next pull
    request: plan exits 0. Every apply prints NDJSON ending in a result."""
    doc = load_workflow(WORKFLOW_SQLITE)
    key_env = next(k for k, v in job_env(doc, doc["jobs"]["apply"]).items() if SECRET.match(v))
    repo = make_workspace(
        tmp_path / "repo",
        providers={"openai": openai_provider(server.v1, key_env)},
        resources=[ResourceSpec("triage", count=3, provider="openai")],
    ).root
    ci = CiRunner(doc, repo, tmp_path)

    [(code, out, err)] = ci.run_job("plan", monkeypatch, capsys, save=False)
    assert code == 2, err
    assert out.startswith(PLAN_MARKDOWN_MARKER)
    assert "| `triage` | `+` create |" in out
    assert server.probe.counts == {}  # a plan contacts no provider

    [(code, out, err)] = ci.run_job("apply", monkeypatch, capsys, save=True)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events].count("create") == 1
    assert events[-1]["event"] == "result" and events[-1]["outcome"] == "in_progress"
    assert server.probe.counts["POST /batches"] == 1

    wait_for(lambda: server.engine.list_batches(None, 10)["data"][0]["status"] == "completed")
    [(code, out, err)] = ci.run_job("apply", monkeypatch, capsys, save=True)  # the schedule
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert "results" in [e["event"] for e in events]
    assert events[-1]["outcome"] == "converged"
    assert server.probe.counts["POST /batches"] == 1  # collected, never created again
    assert (ci.branch / "results" / "triage.jsonl").is_file()

    [(code, out, err)] = ci.run_job("plan", monkeypatch, capsys, save=False)
    assert code == 0, err
    assert "No changes" in out


# ---------------------------------------------------------------------------------------------
# github-actions.yml: the state in PostgreSQL


def test_postgres_workflow_needs_no_state_branch_and_no_serialising_group() -> None:
    """Both jobs point BATCHSPEC_STATE at the state URL secret and install the postgres extra;
    only apply gets the API key; apply pushes nothing and is not serialised by a concurrency
    group (per-resource locks keep runs side by side safe) but waits for a held lock, and
    refuses to run when the state secret is unset (batchspec would fall back to an empty
    SQLite state on the runner and pay again)."""
    doc = load_workflow(WORKFLOW)
    plan, apply = doc["jobs"]["plan"], doc["jobs"]["apply"]
    assert "BATCHSPEC_PERSIST" not in doc["env"]
    assert "concurrency" not in apply
    assert apply["permissions"] == {"contents": "read"}
    assert job_env(doc, plan)["BATCHSPEC_STATE"].startswith(STATE_SECRET)
    assert job_env(doc, apply)["BATCHSPEC_STATE"] == STATE_SECRET
    assert int(job_env(doc, apply)["BATCHSPEC_LOCK_TIMEOUT"]) > 0
    secrets_of = {
        name: {k for k, v in job_env(doc, job).items() if SECRET.match(str(v))}
        for name, job in doc["jobs"].items()
    }
    assert secrets_of == {
        "plan": {"BATCHSPEC_STATE"},
        "apply": {"OPENAI_API_KEY", "BATCHSPEC_STATE"},
    }
    for job in (plan, apply):
        install = next(s for s in job["steps"] if s.get("name") == "Install batchspec")
        assert "batchspec[postgres]" in install["run"]
    assert not any("git push" in str(s.get("run", "")) for s in apply["steps"])
    step = next(s for s in apply["steps"] if s.get("name") == "Apply")
    guard, command = [ln for ln in step["run"].splitlines() if not ln.strip().startswith("#")]
    assert guard.startswith(': "${BATCHSPEC_STATE:?')  # never apply against an empty state
    assert command.startswith("batchspec apply")


def test_postgres_workflow_commands_from_fresh_runners_never_pay_twice(
    tmp_path: Path,
    server: ProbedServer,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every job starts from a bare checkout (nothing carried between runs): the plan sees
    the shared state, the scheduled apply on another runner collects the batch the push's
    apply created (never a second create), the next plan only restores results/, and the
    next apply restores them from the database's result store with no provider call."""
    doc = load_workflow(WORKFLOW)
    repo = make_workspace(
        tmp_path / "repo",
        providers={"openai": openai_provider(server.v1, "OPENAI_API_KEY")},
        resources=[ResourceSpec("triage", count=3, provider="openai")],
    ).root
    ci = CiRunner(doc, repo, tmp_path, secrets={STATE_SECRET: postgres_url})
    assert ci.persist == []

    [(code, out, err)] = ci.run_job("plan", monkeypatch, capsys, save=False)
    assert code == 2, err
    assert "| `triage` | `+` create |" in out

    [(code, out, err)] = ci.run_job("apply", monkeypatch, capsys, save=False)
    assert code == 0, err
    assert server.probe.counts["POST /batches"] == 1
    assert not (ci.checkout / "state" / "batchspec.db").exists()  # the state is not on disk

    wait_for(lambda: server.engine.list_batches(None, 10)["data"][0]["status"] == "completed")
    [(code, out, err)] = ci.run_job("apply", monkeypatch, capsys, save=False)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["outcome"] == "converged"
    assert server.probe.counts["POST /batches"] == 1  # collected on another runner
    assert len((ci.checkout / "results" / "triage.jsonl").read_text().splitlines()) == 3

    [(code, out, err)] = ci.run_job("plan", monkeypatch, capsys, save=False)
    assert code == 2, err  # a fresh runner has no results/: it would restore them, not create
    assert "**Plan: 1 to restore.**" in out

    calls = dict(server.probe.counts)
    [(code, out, err)] = ci.run_job("apply", monkeypatch, capsys, save=False)  # next schedule
    assert code == 0, err
    assert len((ci.checkout / "results" / "triage.jsonl").read_text().splitlines()) == 3
    assert server.probe.counts == calls  # restored from the database: no provider call
