"""`batchspec show`, `completion`, and one output convention (--json, -o yaml, --quiet)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.shell_completion import BashComplete
from servers import request_lines
from workspaces import ResourceSpec, Workspace, local_provider, make_workspace, run_cli

from batchspec.cli.main import cli

SHOW_FIELDS = {
    "name", "manifest", "labels", "provider", "endpoint", "model", "input", "spec_hash", "sync",
    "health", "action", "reason", "tracked", "usage", "usage_scope", "generations", "results",
    "events",
}  # fmt: skip
BATCH_FIELDS = {
    "shard", "attempt", "remote_id", "status", "requests", "total", "completed", "failed",
    "input_file_id", "output_file_id", "error_file_id", "reason", "usage", "created_at",
    "submitted_at", "terminal_at", "collected_at",
}  # fmt: skip


SHOW_TRIAGE = """\
triage: Synced, Healthy
  manifest:  manifests/triage.yaml:1:1
  provider:  srv
  endpoint:  /v1/chat/completions
  model:     test-model
  input:     data/triage.jsonl
  spec hash: <hash>
  next:      nothing to do
  usage:     39 input + 57 output = 96 tokens, $0.0000 (all generations)

Results
  output: results/triage.jsonl sha256 <hash> from <batch>
  errors: results/triage.errors.jsonl sha256 <hash>

Generations
  generation 2 (current): complete, 3/3 succeeded; spec <hash>; created <time>, completed <time>
    usage: 39 input + 57 output = 96 tokens, $0.0000
    shard 1 attempt 1: <batch> completed 3/3 [initial submission] @ <time>
      files: in <file>, out <file>

Last events
  <time>  run 1   poll          completed=3, failed=0, from=validating, status=completed, total=3
  <time>  run 1   collect       answered=3, cost_usd=0.0, input_tokens=39, output_sha256=<hash>, \
output_tokens=57, status=completed, total_tokens=96
  <time>  run 1   results       cost_usd=0.0, errors=results/triage.errors.jsonl, failed=0, \
input_tokens=39, output=results/triage.jsonl, output_tokens=57, status=complete, succeeded=3, \
total_tokens=96, unresolved=0
"""


@pytest.fixture
def applied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Workspace:
    """A local-engine workspace with `triage` (3 requests) and `other`, applied to the end."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": local_provider()},
        resources=[ResourceSpec("triage"), ResourceSpec("other", count=2)],
    )
    code, _, err = run_cli(
        ["apply", str(ws.root), "--yes", "--wait", "--poll-interval", "0.05"], capsys
    )
    assert code == 0, err
    return ws


def normalised(text: str) -> str:
    """Ids, hashes and timestamps replaced, so the page can be compared as a snapshot."""
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "<time>", text)
    text = re.sub(r"(batch|file)[-_][0-9a-zA-Z]+", r"<\1>", text)
    return re.sub(r"\b[0-9a-f]{12}\b", "<hash>", text)


def test_show_text_snapshot(
    applied: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page: header with sync/health, fields, results with their source batches, the
    generation and its batch, the last events (here: the last 3)."""
    monkeypatch.chdir(applied.root)
    code, out, err = run_cli(["show", "triage", "--events", "3"], capsys)
    assert code == 0, err
    assert normalised(out) == SHOW_TRIAGE
    assert "\x1b" not in out  # captured: not a terminal, so no colour


def test_a_degraded_resource_says_what_to_do_next_in_status_and_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After apply --wait exits 4, status and show do not say "nothing to do": they name the
    errors file as the why and `apply --replace NAME` as the way to send them again."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("doomed")]
    )
    lines = request_lines(3)
    for line in lines:
        line["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
    ws.write_input("doomed", lines)
    root = str(ws.root)
    assert run_cli(["apply", root, "--wait", "--poll-interval", "0.05"], capsys)[0] == 4

    for command in (["status", root], ["show", "doomed", root]):
        code, out, err = run_cli(command, capsys)
        assert code == 0, err
        assert "Degraded" in out and "nothing to do" not in out, out
        assert "errors file" in out and "`batchspec apply --replace doomed`" in out, out


def test_show_json_and_yaml_are_one_documented_document(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json has exactly the documented fields, hashes whole; -o yaml is the same document."""
    _, out, _ = run_cli(["show", "triage", str(applied.root), "--json"], capsys)
    doc = json.loads(out)
    assert set(doc) == SHOW_FIELDS
    [gen] = doc["generations"]
    [batch] = gen["batches"]
    assert set(batch) == BATCH_FIELDS
    assert len(doc["spec_hash"]) == 64 and gen["current"] and gen["succeeded"] == 3
    assert doc["results"][0]["from_batches"] == [batch["remote_id"]]
    assert doc["usage"]["total_tokens"] > 0
    _, out_yaml, _ = run_cli(["show", "triage", str(applied.root), "-o", "yaml"], capsys)
    assert yaml.safe_load(out_yaml) == doc


def test_show_before_any_apply_says_what_status_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before any apply (no state yet) show's `sync`, `health`, `action` and `reason` are
    status's, as docs/output.md says: show's reason was "nothing recorded yet" where status
    (and plan) say "new resource"."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("t")]
    )
    _, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    [status] = json.loads(out)["resources"]
    _, out, _ = run_cli(["show", "t", str(ws.root), "--json"], capsys)
    shown = json.loads(out)
    keys = ("sync", "health", "action", "reason")
    assert {k: shown[k] for k in keys} == {k: status[k] for k in keys}


def test_show_from_a_folder_without_the_manifest_says_where_it_is(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """`show triage` run from data/ (a PATH holding no manifest) fails saying the resource is
    declared elsewhere in the workspace, as `results` and `--select` do; it said "triage:
    Orphaned, Unknown", which its manifest is not."""
    code, out, err = run_cli(["show", "triage", str(applied.root / "data")], capsys)
    assert code == 1 and "Orphaned" not in out
    assert "'triage' is declared in the workspace" in err and "run from the workspace's" in err


def test_status_and_show_say_which_generations_their_usage_sums(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """After an added request makes generation 2, status's usage is the current generation's
    (its one new answer) and show's is every generation's: each says so, in text and JSON."""
    applied.write_input("triage", request_lines(4))  # the first 3 carried over, 1 sent
    root = str(applied.root)
    assert run_cli(["apply", root, "--wait", "--poll-interval", "0.05"], capsys)[0] == 0
    status = json.loads(run_cli(["status", root, "--json"], capsys)[1])["resources"]
    [current] = [r for r in status if r["name"] == "triage"]
    detail = json.loads(run_cli(["show", "triage", root, "--json"], capsys)[1])
    assert current["usage_scope"] == "current_generation"
    assert detail["usage_scope"] == "all_generations"
    assert 0 < current["usage"]["total_tokens"] < detail["usage"]["total_tokens"]
    assert detail["usage"]["total_tokens"] == sum(
        g["usage"]["total_tokens"] for g in detail["generations"]
    )
    status_text = run_cli(["status", root, "--select", "triage"], capsys)[1]
    assert f"{current['usage']['input_tokens']:,} in + " in status_text
    assert "(current generation)" in status_text
    show_text = run_cli(["show", "triage", root], capsys)[1]
    assert f"= {detail['usage']['total_tokens']:,} tokens, $0.0000 (all generations)" in show_text


def test_show_after_a_replace_marks_the_replacement_current(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """After `apply --replace NAME --no-reuse`, the replacement is the current generation (as
    status sees it) and the result files are those it wrote, from its own batch."""
    argv = ["apply", str(applied.root), "--replace", "triage", "--no-reuse", "--wait"]
    assert run_cli([*argv, "--poll-interval", "0.05"], capsys)[0] == 0
    _, out, _ = run_cli(["show", "triage", str(applied.root), "--json"], capsys)
    doc = json.loads(out)
    newest, first = doc["generations"]
    assert (newest["current"], first["current"]) == (True, False)
    assert doc["spec_hash"] == newest["spec_hash"] != first["spec_hash"]  # the replacement's
    [batch] = newest["batches"]
    assert doc["results"][0]["from_batches"] == [batch["remote_id"]]
    assert doc["results"][0]["recorded_sha256"] == newest["output_sha256"]


def test_show_describes_an_orphan_from_the_state(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its manifest removed, a resource is still shown from the state, as Orphaned."""
    applied.manifest_path("other").unlink()
    code, out, err = run_cli(["show", "other", str(applied.root), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["sync"] == "Orphaned" and doc["manifest"] and doc["results"] == []
    assert doc["generations"][0]["succeeded"] == 2


def test_show_an_unknown_name_lists_the_known_ones(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo fails with exit 1 and names what exists; no traceback."""
    code, out, err = run_cli(["show", "triag", str(applied.root)], capsys)
    assert code == 1 and out == ""
    assert "no resource named 'triag'" in err and "other, triage" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--json"],
        ["status", "-o", "json"],
        ["status", "-o", "yaml"],
        ["history", "--json"],
        ["plan", "--json"],
        ["show", "triage", "--json"],
        ["show", "triage", "-o", "yaml"],
    ],
)
def test_a_read_command_asked_for_json_fails_with_an_error_document_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """`status --json | jq` of a failure reads why, not nothing: the error as a document in
    the format asked for, its exit code the process's; the message still goes to stderr."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("triage")]
    )
    ws.state_path.parent.mkdir(parents=True, exist_ok=True)
    ws.state_path.write_bytes(b"not a database")
    code, out, err = run_cli([*argv, str(ws.root)], capsys)
    doc = yaml.safe_load(out) if "yaml" in argv else json.loads(out)
    assert code == 1 and doc["exit_code"] == code
    assert doc["error"] == "StateError" and "is not an SQLite database" in doc["message"]
    assert doc["resource"] is None and isinstance(doc["details"], list)
    assert "Error: " in err and "is not an SQLite database" in err


def test_a_failed_apply_json_writes_its_error_event_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """apply --json writes its own `error` event, not a second error document after it."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("triage")]
    )
    ws.state_path.parent.mkdir(parents=True, exist_ok=True)
    ws.state_path.write_bytes(b"not a database")
    code, out, _ = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)
    [line] = out.splitlines()
    assert code == 1 and json.loads(line)["event"] == "error"


def test_status_yaml_is_the_json_document(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """status -o yaml carries the --json document; --json with -o yaml is a usage error."""
    _, as_json, _ = run_cli(["status", str(applied.root), "--json"], capsys)
    _, as_yaml, _ = run_cli(["status", str(applied.root), "--output", "yaml"], capsys)
    assert yaml.safe_load(as_yaml) == json.loads(as_json)
    code, _, err = run_cli(["status", str(applied.root), "--json", "-o", "yaml"], capsys)
    assert code == 64 and "contradict" in err


def test_apply_quiet_prints_nothing_and_exits_by_its_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quiet: no plan, no progress, no summary; --quiet --json: only the result object."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("triage")]
    )
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--quiet"], capsys)
    assert code == 0 and out == "", err
    code, out, _ = run_cli(
        ["apply", str(ws.root), "--yes", "--quiet", "--json", "--wait", "--poll-interval", "0.05"],
        capsys,
    )
    [line] = out.splitlines()
    assert code == 0 and json.loads(line)["event"] == "result"


def test_apply_quiet_says_on_stderr_why_it_did_not_replace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quiet still explains its exit 1 when the spec changed while a batch is in flight."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("triage")]
    )
    assert run_cli(["apply", str(ws.root), "--yes", "--quiet"], capsys)[0] == 0  # in flight
    ws.write_input("triage", request_lines(3, prefix="changed"))
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--quiet"], capsys)
    assert code == 1 and out == ""
    assert "Error: Apply did not replace triage" in err and "--allow-replace" in err


def test_status_during_a_pending_replace_shows_the_generation_still_in_flight(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The spec changed while a batch runs: status shows that batch, Progressing, not Missing
    with no batch (apply has not replaced anything yet)."""
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("triage")]
    )
    assert run_cli(["apply", str(ws.root), "--yes", "--quiet"], capsys)[0] == 0  # in flight
    ws.write_input("triage", request_lines(3, prefix="changed"))
    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)
    [triage] = json.loads(out)["resources"]
    assert code == 0 and (triage["sync"], triage["action"]) == ("OutOfSync", "replace")
    assert triage["health"] == "Progressing" and len(triage["batches"]) == 1


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_a_script_for_each_shell(
    shell: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The script calls batchspec back with _BATCHSPEC_COMPLETE set for that shell."""
    code, out, _ = run_cli(["completion", shell], capsys)
    assert code == 0
    assert "_BATCHSPEC_COMPLETE" in out and f"{shell}_complete" in out


def test_completion_of_an_unknown_shell_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Only bash, zsh and fish."""
    code, _, err = run_cli(["completion", "tcsh"], capsys)
    assert code == 64 and "tcsh" in err


@pytest.mark.parametrize(
    ("args", "incomplete"),
    [
        pytest.param(["show"], "", id="show"),
        pytest.param(["results"], "", id="results"),
        pytest.param(["cancel"], "", id="cancel"),
        pytest.param(["forget"], "", id="forget"),
        pytest.param(["status", "--select"], "", id="--select"),
        pytest.param(["plan", "-s"], "", id="-s"),
    ],
)
def test_resource_names_complete(
    applied: Workspace, monkeypatch: pytest.MonkeyPatch, args: list[str], incomplete: str
) -> None:
    """Resource names complete where a NAME or a selector goes, from the workspace here."""
    monkeypatch.chdir(applied.root)
    complete = BashComplete(cli, {}, "batchspec", "_BATCHSPEC_COMPLETE")
    assert [c.value for c in complete.get_completions(args, incomplete)] == ["other", "triage"]
    assert [c.value for c in complete.get_completions(args, "tr")] == ["triage"]


def test_name_completion_in_a_broken_workspace_completes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest that does not load completes nothing (no traceback into the shell)."""
    (tmp_path / "bad.yaml").write_text("kind: Batch\nmetadata: [\n")
    monkeypatch.chdir(tmp_path)
    complete = BashComplete(cli, {}, "batchspec", "_BATCHSPEC_COMPLETE")
    assert complete.get_completions(["show"], "") == []


def test_a_fleets_replace_refusal_names_ten_resources_and_counts_the_rest() -> None:
    """`apply` refusing to replace 400 changed resources says so in one readable line: the
    first ten names and how many more (it listed all 400 in one line, ~2,500 characters)."""
    from types import SimpleNamespace

    from batchspec.cli.render import replace_refused_text

    statuses = [SimpleNamespace(name=f"j{i:03d}", action="replace") for i in range(1, 401)]
    text = replace_refused_text(SimpleNamespace(statuses=statuses))  # type: ignore[arg-type]
    assert text.startswith("Apply did not replace j001, j002, ")
    assert "j010 and 390 more: the spec changed" in text and "j011" not in text
