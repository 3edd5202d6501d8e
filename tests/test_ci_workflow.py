"""examples/ci/github-actions.yml: its shape, and its batchspec commands run for real.

The test reads the workflow, takes the `batchspec ...` lines of each job's `run:` scripts,
and runs exactly those, in the order the events would trigger them (pull request, push to
main, a scheduled run, the next pull request) against the engine's OpenAI API over loopback.
Each job starts from a fresh copy of the repository plus the folders the workflow persists
on its state branch (BATCHSPEC_PERSIST), so the test also proves those folders are enough.
The job's `env` is applied, with `${{ secrets.X }}` standing for the key the server wants.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from probes import ProbedServer, start_probed_server
from servers import wait_for
from workspaces import SENTINEL_KEY, ResourceSpec, make_workspace, openai_provider, run_cli

from batchspec.cli.render import PLAN_MARKDOWN_MARKER

WORKFLOW = Path(__file__).resolve().parents[1] / "examples" / "ci" / "github-actions.yml"
SHELL_OPERATORS = {">", ">>", "<", "|", "||", "&&", ";", "&", "2>", "2>&1"}
SECRET = re.compile(r"^\$\{\{\s*secrets\.\w+\s*\}\}$")


def load_workflow() -> dict[str, Any]:
    doc = yaml.safe_load(WORKFLOW.read_text())
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


def test_workflow_triggers_and_jobs() -> None:
    """Plans on pull requests, applies on pushes to main and every 30 minutes."""
    doc = load_workflow()
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


# ---------------------------------------------------------------------------------------------
# the same command sequence, for real


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ProbedServer]:
    srv = start_probed_server(tmp_path / "engine", api_key=SENTINEL_KEY)
    yield srv
    srv.stop()


class CiRunner:
    """Runs a job's batchspec commands as a fresh checkout with the persisted folders."""

    def __init__(self, doc: dict[str, Any], repo: Path, tmp: Path) -> None:
        self.doc = doc
        self.repo = repo
        self.branch = tmp / "state-branch"  # what the state branch holds between runs
        self.tmp = tmp
        self.runs = 0
        self.persist = doc["env"]["BATCHSPEC_PERSIST"].split()

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
        checkout = self.tmp / f"run{self.runs}"
        shutil.copytree(self.repo, checkout)
        for folder in self.persist:  # restore
            if (self.branch / folder).is_dir():
                shutil.copytree(self.branch / folder, checkout / folder, dirs_exist_ok=True)
        with monkeypatch.context() as env:
            for key, value in job_env(self.doc, job).items():
                env.setenv(key, SENTINEL_KEY if SECRET.match(str(value)) else str(value))
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
    doc = load_workflow()
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
