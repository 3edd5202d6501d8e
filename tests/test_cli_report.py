"""`batchspec report`: one self-contained HTML page, opened in a real browser.

The browser tests apply against `batchspec serve` over loopback (its builtin upstream reports
usage; the provider's `pricing` makes the dollars non-zero), write the page, and open it in
Debian's headless chromium: no console message at all (a blocked network request, a script
error or a CSP violation would be one), the page's own script ran, the figures in the dumped
DOM equal `history --json` and `status --json`, and a screenshot is saved. Without chromium
they skip; with CI=true that skip is a failure (tests/ci_skips.py), and .ci/run installs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from probes import ProbedServer
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    git_commit_all,
    local_provider,
    make_workspace,
    openai_provider,
    run_cli,
)

from batchspec.cli.report_html import report_html
from batchspec.core.history import CommitSpend, HistoryEntry
from batchspec.core.report import WorkspaceReport
from batchspec.core.spend import Usage
from batchspec.core.status import ResourceStatus
from batchspec.state.store import EventRow, RunRow

FAST = ["--poll-interval", "0.05"]
HOSTILE = "<script>document.body.setAttribute('data-pwned','1')</script>"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    return path


class Elements(HTMLParser):
    """Every element's tag and attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []
        self.row: dict[str, str] | None = None  # the table row being read: its text goes in

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {k: v or "" for k, v in attrs}))
        if tag == "tr":
            self.row = self.found[-1][1]
            self.row["text"] = ""

    def handle_data(self, data: str) -> None:
        if self.row is not None:
            self.row["text"] += data + " "

    def rows(self, cls: str) -> list[dict[str, str]]:
        return [a for t, a in self.found if t == "tr" and a.get("class") == cls]


def elements(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    return parser


def open_in_chromium(chromium: str, page: Path, screenshot: Path) -> str:
    """The DOM after the page's scripts ran; fails on any console message; saves a PNG."""
    flags = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-gpu"]
    url = page.resolve().as_uri()
    dumped = subprocess.run(
        [chromium, *flags, "--enable-logging=stderr", "--v=0", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dumped.returncode == 0, dumped.stderr
    console = [
        line for line in dumped.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line
    ]
    assert console == [], "\n".join(console)
    shot = subprocess.run(
        [chromium, *flags, "--window-size=1280,1600", f"--screenshot={screenshot}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0, shot.stderr
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return dumped.stdout


def priced_workspace(root: Path, srv: ProbedServer, *names: str) -> Any:
    provider = {
        **openai_provider(srv.v1, KEY_ENV),
        "pricing": {"test-model": {"input": 2.0, "output": 10.0}},
    }
    return make_workspace(
        root, providers={"srv": provider}, resources=[ResourceSpec(n, count=3) for n in names]
    )


def cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    code, text, err = run_cli(argv, capsys)
    assert code == 0, err
    return json.loads(text)


def test_report_in_chromium_shows_the_figures_of_history_and_status(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    chromium: str,
) -> None:
    """Two applies (a second resource added in between, each run committed in git): the page
    opens in chromium with no console message, its script ran, each run's tokens, dollars and
    git commit equal `history --json`, each commit's equal `history --by commit --json`, each
    resource's figures equal `status --json`."""
    ws = priced_workspace(tmp_path / "ws", server(), "triage")
    git_commit_all(ws.root, "first")
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    second = priced_workspace(tmp_path / "ws", server(), "triage", "summaries")
    subprocess.run(["git", "add", "-A"], cwd=ws.root, check=True)
    subprocess.run(
        ["git", "-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "-qm", "2"],
        cwd=ws.root,
        check=True,
    )
    code, _, err = run_cli(["apply", str(second.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err

    page = tmp_path / "report.html"
    code, out, err = run_cli(["report", str(ws.root), "-o", str(page)], capsys)
    assert code == 0, err
    assert "Wrote" in out
    dom = elements(open_in_chromium(chromium, page, tmp_path / "report.png"))
    [body] = [a for t, a in dom.found if t == "body"]
    assert body.get("data-report-ready") == "yes"

    runs = cli_json(["history", str(ws.root), "--json"], capsys)["runs"]
    shown = {int(r["data-run-id"]): r for r in dom.rows("run")}
    assert sorted(shown) == sorted(r["run"]["id"] for r in runs)
    priced = 0
    for run in runs:
        row, usage = shown[run["run"]["id"]], run["usage"]
        assert int(row["data-input-tokens"]) == usage["input_tokens"]
        assert int(row["data-output-tokens"]) == usage["output_tokens"]
        assert float(row["data-cost-usd"]) == pytest.approx(usage["cost_usd"], abs=1e-6)
        assert row["data-git-commit"] == run["run"]["git_commit"]
        shown_text = row["text"]  # what a person reads says the same
        assert f"{usage['input_tokens']:,} in" in shown_text
        assert f"${usage['cost_usd']:,.4f}" in shown_text
        assert run["run"]["git_commit"][:10] in shown_text
        priced += usage["cost_usd"] > 0
    assert priced == 2  # both applies spent something, so the figures were really compared

    commits = cli_json(["history", str(ws.root), "--by", "commit", "--json"], capsys)["commits"]
    shown_commits = dom.rows("commit")
    assert len(commits) == 2  # the two commits each created a generation
    assert [r["data-commit"] for r in shown_commits] == [c["commit"] for c in commits]
    for row, c in zip(shown_commits, commits, strict=True):
        assert row["data-dirty"] == str(c["dirty"]).lower()
        assert int(row["data-generations"]) == c["generations"]
        assert int(row["data-input-tokens"]) == c["usage"]["input_tokens"]
        assert float(row["data-cost-usd"]) == pytest.approx(c["usage"]["cost_usd"], abs=1e-6)
        assert c["commit"][:10] in row["text"]
        assert f"${c['usage']['cost_usd']:,.4f}" in row["text"]

    statuses = cli_json(["status", str(ws.root), "--json"], capsys)["resources"]
    rows = {r["data-resource"]: r for r in dom.rows("resource")}
    assert sorted(rows) == sorted(s["name"] for s in statuses)
    for s in statuses:
        row = rows[s["name"]]
        assert (row["data-sync"], row["data-health"]) == (s["sync"], s["health"])
        assert int(row["data-succeeded"]) == s["succeeded"]
        assert int(row["data-input-tokens"]) == s["usage"]["input_tokens"]
        assert float(row["data-cost-usd"]) == pytest.approx(s["usage"]["cost_usd"], abs=1e-6)
        assert f"${s['usage']['cost_usd']:,.4f}" in row["text"]
        assert f"{s['succeeded']:,} ok" in row["text"]


def test_hostile_strings_stay_text_in_chromium(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    capsys: pytest.CaptureFixture[str],
    chromium: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A git branch and an output path that are script tags, and a CI run URL that is a
    javascript: URL, are shown as text: the browser runs only the page's own script and the
    URL is no link."""
    ws = priced_workspace(tmp_path / "ws", server(), "triage")
    manifest = ws.manifest_path("triage")
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["output"] = "../results/<img src=x onerror=alert(1)>.jsonl"
    manifest.write_text(yaml.safe_dump(doc))
    git_commit_all(ws.root)
    subprocess.run(["git", "checkout", "-qb", HOSTILE], cwd=ws.root, check=True)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_SERVER_URL", "javascript:alert(1)//")
    monkeypatch.setenv("GITHUB_REPOSITORY", "o/r")
    monkeypatch.setenv("GITHUB_RUN_ID", "1")
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err

    page = tmp_path / "report.html"
    code, _, err = run_cli(["report", str(ws.root), "-o", str(page)], capsys)
    assert code == 0, err
    html = open_in_chromium(chromium, page, tmp_path / "report.png")
    dom = elements(html)
    [body] = [a for t, a in dom.found if t == "body"]
    assert "data-pwned" not in body and body.get("data-report-ready") == "yes"
    assert [t for t, _ in dom.found].count("script") == 1
    assert not [t for t, _ in dom.found if t == "img"]
    assert not [a for t, a in dom.found if t == "a" and "javascript" in a.get("href", "")]
    assert "&lt;script&gt;document.body" in html  # shown, as text


def fabricated(cost: float | None, text: str) -> WorkspaceReport:
    usage = Usage(1200, 300, 1500, cost)
    status = ResourceStatus(
        name=text, sync="Synced", health="Healthy", action="none", reason=text,
        provider=text, spec_hash="0" * 64, generation_status="complete", requests=4,
        succeeded=3, failed=1, output=text, errors=text, usage=usage,
    )  # fmt: skip
    run = RunRow(
        id=7, command="apply", args={}, started_at="2026-11-30T10:00:00.000Z", ended_at=None,
        exit_code=0, user=text, host=text, pid=1, git_commit="a" * 40, git_branch=text,
        git_dirty=False, ci_system=text, ci_run_url="javascript:alert(1)", version="x",
    )  # fmt: skip
    detail = {
        "input_tokens": 1200, "output_tokens": 300, "total_tokens": 1500, "cost_usd": cost,
        "message": text,
    }  # fmt: skip
    event = EventRow(1, 7, "2026-11-30T10:00:01.000Z", text, 1, None, "results", detail)
    commits = (
        CommitSpend("a" * 40, True, (text,), (7,), 1, usage, {text: usage}, run.started_at),
        CommitSpend(None, False, (), (7,), 1, usage, {text: usage}, run.started_at),
    )
    entries = (HistoryEntry(run, (event,)),)
    return WorkspaceReport((status,), entries, "2026-11-30T11:00:00.000Z", (), commits)


def test_every_user_string_is_escaped() -> None:
    """A resource, reason, provider, path, user, host, branch, CI name and event detail that
    are markup come out escaped, and a javascript: CI URL is not a link."""
    html = report_html(fabricated(0.5, '"><script>alert(1)</script>'))
    assert "<script>alert" not in html
    assert html.count("<script>") == 1  # the page's own
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "href=" not in html


def test_an_unknown_price_is_shown_as_unknown_never_zero() -> None:
    """A resource and a run with an unknown price say "unknown price" and carry an empty
    data-cost-usd; no "$0" appears."""
    html = report_html(fabricated(None, "triage"))
    assert "unknown price" in html
    assert "$0" not in html
    dom = elements(html)
    assert dom.rows("resource")[0]["data-cost-usd"] == ""
    assert dom.rows("run")[0]["data-cost-usd"] == ""
    assert [r["data-cost-usd"] for r in dom.rows("commit")] == ["", ""]


def test_commit_groups_say_dirty_and_no_git_in_words() -> None:
    """A commit group from a dirty tree reads "+ uncommitted changes", runs outside git
    "no git commit"; their rows carry data-dirty and an empty data-commit."""
    dom = elements(report_html(fabricated(0.25, "triage")))
    dirty, no_git = dom.rows("commit")
    assert (dirty["data-commit"], dirty["data-dirty"]) == ("a" * 40, "true")
    assert "aaaaaaaaaa + uncommitted changes" in " ".join(dirty["text"].split())
    assert (no_git["data-commit"], no_git["data-dirty"]) == ("", "false")
    assert "no git commit" in no_git["text"] and "$0.2500" in no_git["text"]


def test_report_to_stdout_and_without_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o -` prints the page; a workspace never applied gives a page that says so, and
    writes no state."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": openai_provider("http://127.0.0.1:9/v1", KEY_ENV)},
        resources=[ResourceSpec("triage")],
    )  # fmt: skip
    code, out, err = run_cli(["report", str(ws.root), "-o", "-"], capsys)
    assert code == 0, err
    assert out.startswith("<!DOCTYPE html>")
    assert "No runs recorded." in out
    assert 'data-resource="triage"' in out
    assert not ws.state_path.exists()


def test_the_written_line_counts_one_resource_and_one_run_in_the_singular() -> None:
    """`report` says "(1 resource, 1 run)", not "1 resources", and thousands get separators."""
    from batchspec.cli import render

    assert render.report_written_text("r.html", 1, 1) == "Wrote r.html (1 resource, 1 run)."
    assert render.report_written_text("r.html", 1200, 2) == (
        "Wrote r.html (1,200 resources, 2 runs)."
    )


def test_report_json_prints_the_page_data_as_status_and_history_print_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`report --json` prints, and only prints, the page's data: its resources equal
    `status --json`'s, its runs `history --json`'s, its commits `history --by commit
    --json`'s; no page is written."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": local_provider()},
        resources=[ResourceSpec("triage"), ResourceSpec("summaries")],
    )
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "report.html"  # the default --output

    data = cli_json(["report", str(ws.root), "--json"], capsys)

    assert not page.exists()
    assert data["resources"] == cli_json(["status", str(ws.root), "--json"], capsys)["resources"]
    assert data["runs"] == cli_json(["history", str(ws.root), "--json"], capsys)["runs"]
    commits = cli_json(["history", str(ws.root), "--by", "commit", "--json"], capsys)
    assert data["commits"] == commits["commits"]
    assert [r["name"] for r in data["resources"]] == ["summaries", "triage"]
    assert set(data["usage"]) == {"input_tokens", "output_tokens", "total_tokens", "cost_usd"}


@pytest.mark.parametrize("output", ["data.json", "-", "report.html"])
def test_report_json_with_output_is_a_usage_error_not_an_ignored_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str
) -> None:
    """`report --json -o FILE` exits 64 saying --json writes no page (it used to print the
    JSON and silently ignore -o, so `-o data.json` left no file and an old page in place)."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("triage")]
    )
    target = tmp_path / output

    code, out, err = run_cli(["report", str(ws.root), "--json", "-o", str(target)], capsys)

    assert code == 64, (out, err)
    assert out == "" and "--json" in err and "batchspec report --json > report.json" in err
    assert not target.exists()


def test_report_to_a_missing_folder_exits_1_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`report -o` into a folder that does not exist exits 1 with the path, no traceback."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("triage")]
    )
    target = tmp_path / "missing" / "r.html"

    code, out, err = run_cli(["report", str(ws.root), "-o", str(target)], capsys)

    assert code == 1 and str(target) in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        pytest.param("state/batchspec.db", "inside the state folder", id="state-db"),
        pytest.param("state/batchspec.db-wal", "inside the state folder", id="state-wal"),
        pytest.param("batchspec.yaml", "the project file", id="project-file"),
        pytest.param("manifests/triage.yaml", "is a manifest", id="manifest"),
        pytest.param("manifests/page.yaml", "manifest globs", id="read-as-a-manifest"),
        pytest.param("data/triage.jsonl", "input file of resource triage", id="input"),
        pytest.param("results/triage.jsonl", "output file of resource triage", id="output"),
    ],
)
def test_report_output_onto_a_file_of_the_workspace_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str, reason: str
) -> None:
    """`report -o` naming the state database (the record of what was paid for), the project
    file, a manifest, an input or a result file exits 64 and leaves it as it was (the page
    used to replace it)."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("triage", provider="here")],
    )
    assert run_cli(["apply", str(ws.root), "--wait"], capsys)[0] == 0
    path = ws.root / target
    before = path.read_bytes() if path.exists() else None
    code, _, err = run_cli(["report", str(ws.root), "-o", str(path)], capsys)
    assert code == 64, err
    assert reason in err
    assert (path.read_bytes() if path.exists() else None) == before
