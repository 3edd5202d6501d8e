"""`batchspec validate`: summary on success, every problem on failure, JSON only with --json."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchspec.cli.main import cli, main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart"
PROJECT = "apiVersion: batchspec/v1\nkind: Project\n"


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the real entry point (which maps errors to exit codes); return code, stdout, stderr."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), out.out, out.err


def request(custom_id: str, url: str = "/v1/chat/completions", model: str = "gpt-4o-mini") -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def manifest(name: str, data: str, *, provider: str = "local", model: str = "gpt-4o-mini") -> str:
    return (
        f"apiVersion: batchspec/v1\nkind: Batch\nmetadata:\n  name: {name}\nspec:\n"
        f"  provider: {provider}\n  endpoint: /v1/chat/completions\n  input: {data}\n"
        f"  model: {model}\n"
    )


def workspace(root: Path, files: dict[str, str], project: str = PROJECT) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "batchspec.yaml").write_text(project, encoding="utf-8")
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text, encoding="utf-8")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_quickstart_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped example passes, with a short summary naming each resource."""
    code, out, err = run_main(["validate", str(QUICKSTART)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "2 resources valid:"
    assert lines[1].startswith("  doc-embeddings (10 requests, ")
    assert lines[2].startswith("  ticket-triage (12 requests, ")
    assert "local /v1/chat/completions gpt-4o-mini" in lines[2]


def test_quickstart_json_reports_counts_and_hashes(capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints one JSON document with each input's request count, size and sha256."""
    code, out, _ = run_main(["validate", str(QUICKSTART), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["valid"] is True and report["problems"] == []
    tickets = QUICKSTART / "data" / "tickets.jsonl"
    [triage] = [r for r in report["resources"] if r["name"] == "ticket-triage"]
    assert triage["requests"] == 12
    assert triage["bytes"] == tickets.stat().st_size
    assert triage["sha256"] == hashlib.sha256(tickets.read_bytes()).hexdigest()
    assert triage["models"] == ["gpt-4o-mini"]
    assert report["project"] == str(QUICKSTART / "batchspec.yaml")


def test_validate_defaults_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without PATHS, the current folder is the workspace."""
    ws = tmp_path / "ws"
    shutil.copytree(QUICKSTART, ws)
    monkeypatch.chdir(ws / "manifests")  # the project is found by walking up
    code, out, _ = run_main(["validate"], capsys)
    assert code == 0 and out.startswith("2 resources valid:")


def test_validate_changes_nothing_on_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No state database, no results folder, no file touched."""
    ws = tmp_path / "ws"
    shutil.copytree(QUICKSTART, ws)
    before = snapshot(ws)
    assert run_main(["validate", str(ws)], capsys)[0] == 0
    assert snapshot(ws) == before


def test_manifest_problems_exit_1_listing_each_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every manifest problem is printed as file:line:column: pointer: message; no traceback."""
    ws = workspace(
        tmp_path / "ws",
        {
            "a.yaml": manifest("a", "a.jsonl").replace("/v1/chat/completions", "/v1/chat"),
            "b.yaml": manifest("b", "missing.jsonl") + "  completionWindw: 24h\n",
        },
    )
    (ws / "a.jsonl").write_text(request("1") + "\n", encoding="utf-8")
    code, out, err = run_main(["validate", str(ws)], capsys)
    assert code == 1 and out == ""
    assert "Traceback" not in err
    assert err.startswith("Error: 3 problems in the workspace; nothing was changed.")
    a, b = ws.resolve() / "a.yaml", ws.resolve() / "b.yaml"
    assert f"{a}:7:13: /spec/endpoint: '/v1/chat' is not one of" in err
    assert f"{b}:8:10: /spec/input: input file not found" in err
    assert f"{b}:10:3: /spec/completionWindw: unknown key 'completionWindw'" in err


def test_input_problems_of_all_resources_are_reported_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad lines in two inputs: one run lists both, each as file:line: message."""
    ws = workspace(
        tmp_path / "ws",
        {
            "a.yaml": manifest("a", "a.jsonl"),
            "b.yaml": manifest("b", "b.jsonl"),
            "a.jsonl": request("1") + "\nnot json\n",
            "b.jsonl": request("1") + "\n" + request("1") + "\n",
        },
    )
    code, out, err = run_main(["validate", str(ws)], capsys)
    assert code == 1 and out == ""
    assert "Traceback" not in err
    assert err.startswith("Error: 2 problems in batch inputs")
    assert f"{ws.resolve() / 'a.jsonl'}:2: " in err
    assert f"{ws.resolve() / 'b.jsonl'}:2: " in err and "line 1" in err


def test_input_is_checked_against_the_manifest_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line whose model differs from spec.model is a problem at that line."""
    ws = workspace(
        tmp_path / "ws",
        {"a.yaml": manifest("a", "a.jsonl", model="gpt-4o"), "a.jsonl": request("1") + "\n"},
    )
    code, _, err = run_main(["validate", str(ws)], capsys)
    assert code == 1
    assert f"{ws.resolve() / 'a.jsonl'}:1: " in err and "gpt-4o" in err


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_a_line_held_to_a_shared_inputs_endpoint_names_whose_endpoint(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    """Two manifests share an input, one with a wrong endpoint: each line's problem names the
    resource and manifest whose endpoint it differs from (it said only "differs from the
    endpoint '/v1/embeddings'", and the input is right for the other one)."""
    wrong = manifest("b", "data.jsonl").replace("/v1/chat/completions", "/v1/embeddings")
    ws = workspace(
        tmp_path / "ws",
        {"a.yaml": manifest("a", "data.jsonl"), "b.yaml": wrong, "data.jsonl": request("1") + "\n"},
    )
    monkeypatch.chdir(ws)
    code, _, err = run_main([command], capsys)
    assert code == 1
    assert (
        "data.jsonl:1: url '/v1/chat/completions' differs from the endpoint '/v1/embeddings' "
        "(set by resource b in b.yaml)"
    ) in err


def test_anthropic_providers_enforce_its_custom_id_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """custom_id must match ^[a-zA-Z0-9_-]{1,64}$ when the provider is anthropic."""
    files = {
        "a.yaml": manifest("a", "a.jsonl", provider="claude"),
        "a.jsonl": request("q.1") + "\n",
    }
    anthropic = PROJECT + "providers:\n  claude: {type: anthropic}\n"
    code, _, err = run_main(["validate", str(workspace(tmp_path / "x", files, anthropic))], capsys)
    assert code == 1 and "a.jsonl:1: " in err
    openai = PROJECT + "providers:\n  claude: {type: openai}\n"
    code, _, _ = run_main(["validate", str(workspace(tmp_path / "y", files, openai))], capsys)
    assert code == 0


def test_json_failure_prints_only_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --json, a failure is still one JSON document on stdout, exit 1."""
    ws = workspace(tmp_path / "ws", {"a.yaml": manifest("Bad_Name", "a.jsonl")})
    (ws / "a.jsonl").write_text(request("1") + "\n", encoding="utf-8")
    code, out, _ = run_main(["validate", str(ws), "--json"], capsys)
    assert code == 1
    report = json.loads(out)
    assert report["valid"] is False
    [problem] = report["problems"]
    assert problem == {
        "file": str(ws.resolve() / "a.yaml"),
        "line": 4,
        "column": 9,
        "pointer": "/metadata/name",
        "code": "invalid-value",
        "message": problem["message"],
    }
    assert "'Bad_Name' does not match" in problem["message"]


def test_json_failure_for_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Input problems in JSON carry the input file, the line and the scanner's code."""
    ws = workspace(tmp_path / "ws", {"a.yaml": manifest("a", "a.jsonl"), "a.jsonl": "[1]\n"})
    code, out, _ = run_main(["validate", str(ws), "--json"], capsys)
    assert code == 1
    [problem] = json.loads(out)["problems"]
    assert (problem["file"], problem["line"], problem["column"], problem["pointer"]) == (
        str(ws.resolve() / "a.jsonl"),
        1,
        None,
        "",
    )
    assert problem["code"] == "not_an_object"


@pytest.mark.parametrize(
    ("change", "code", "says"),
    [
        pytest.param(
            {"messages": [{"role": "usr", "content": "hi"}]},
            "invalid_role",
            'body.messages[0].role "usr" is not one of system, developer, user, assistant, '
            "tool, function (custom_id '2')",
            id="role",
        ),
        pytest.param(
            {"messages": ["hi"]},
            "invalid_message",
            "body.messages[0] must be an object, not a string (custom_id '2')",
            id="message",
        ),
        pytest.param(
            {"max_tokens": -5},
            "invalid_max_tokens",
            "body.max_tokens -5 is not an integer >= 1",
            id="max-tokens",
        ),
        pytest.param(
            {"max_tokens": "9" * 5000},
            "invalid_max_tokens",
            'body.max_tokens "999',
            id="max-tokens-too-many-digits",
        ),
        pytest.param(
            {"top_p": 2},
            "invalid_parameter",
            "body.top_p 2 is not a number from 0 to 1 (custom_id '2')",
            id="top-p",
        ),
        pytest.param(
            {"stream": True},
            "streamed_request",
            "body.stream true: a batched request is not streamed",
            id="stream",
        ),
    ],
)
def test_a_request_every_provider_refuses_fails_validate_at_its_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, object],
    code: str,
    says: str,
) -> None:
    """A chat line with a message of no OpenAI role, a message that is not an object or an
    output limit below 1 exits 1 naming file, line, custom_id and field (in JSON: its code),
    not a traceback: every hosted provider would refuse it, per request, after the upload."""
    bad = json.loads(request("2"))
    bad["body"].update(change)
    data = request("1") + "\n" + json.dumps(bad) + "\n"
    files = {"a.yaml": manifest("a", "a.jsonl", provider="openai"), "a.jsonl": data}
    ws = workspace(tmp_path / "ws", files)
    code_, out, err = run_main(["validate", str(ws)], capsys)
    assert (code_, out) == (1, "")
    assert f"{ws.resolve() / 'a.jsonl'}:2: {says}" in err
    assert "Traceback" not in err
    code_, out, _ = run_main(["validate", str(ws), "--json"], capsys)
    assert code_ == 1
    [problem] = json.loads(out)["problems"]
    assert (problem["line"], problem["code"]) == (2, code)


def test_the_local_providers_model_servers_judge_roles_and_output_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The `local` provider fronts model servers of the user's own: vLLM takes a role such as
    `ipython`, llama.cpp and LM Studio `max_tokens: -1` for no limit. validate leaves those
    to them (exit 0) where an `openai` provider's input is refused at the line; a chat line
    without messages is refused for both."""
    lines = [json.loads(request(str(i))) for i in (1, 2, 3)]
    lines[1]["body"]["messages"].append({"role": "ipython", "content": "42"})
    lines[2]["body"]["max_tokens"] = -1
    data = "".join(json.dumps(line) + "\n" for line in lines)
    local = workspace(tmp_path / "local", {"a.yaml": manifest("a", "a.jsonl"), "a.jsonl": data})
    assert run_main(["validate", str(local)], capsys)[0] == 0
    hosted = {"a.yaml": manifest("a", "a.jsonl", provider="openai"), "a.jsonl": data}
    code, _, err = run_main(["validate", str(workspace(tmp_path / "hosted", hosted))], capsys)
    assert (
        code == 1
        and ':2: body.messages[1].role "ipython"' in err
        and ":3: body.max_tokens -1" in err
    )
    lines[0]["body"]["messages"] = []
    (local / "a.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = run_main(["validate", str(local)], capsys)
    assert code == 1 and ":1: body.messages of custom_id '1' is empty" in err


def test_bad_project_file_fails_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Problems in batchspec.yaml are reported like manifest problems."""
    ws = workspace(tmp_path / "ws", {}, project=PROJECT + "providers:\n  x: {type: vertex}\n")
    code, _, err = run_main(["validate", str(ws)], capsys)
    assert code == 1
    assert (
        f"{ws.resolve() / 'batchspec.yaml'}:4:13: /providers/x/type: 'vertex' is not one of" in err
    )


def test_missing_path_is_a_problem_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path that does not exist exits 1 with its name."""
    code, _, err = run_main(["validate", str(tmp_path / "nope")], capsys)
    assert code == 1
    assert f"{tmp_path / 'nope'}: no such file or folder" in err
    assert "Traceback" not in err


def test_one_problem_is_told_to_fix_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The headline of a single problem says "Fix it", not "Fix them"."""
    assert run_main(["init", str(tmp_path / "ws")], capsys)[0] == 0
    manifest = tmp_path / "ws" / "manifests" / "hello.yaml"
    manifest.write_text(manifest.read_text().replace("completionWindow:", "completionWindw:"))
    code, _, err = run_main(["plan", str(tmp_path / "ws")], capsys)
    assert code == 1
    assert "1 problem in the workspace; nothing was changed. Fix it and run" in err


def test_a_mistyped_path_is_not_called_a_problem_of_the_workspace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan ws/nope`: the headline blames the PATH, not the workspace, and sends nobody to
    `batchspec validate` (which would say the same)."""
    assert run_main(["init", str(tmp_path / "ws")], capsys)[0] == 0
    code, _, err = run_main(["plan", str(tmp_path / "ws" / "nope")], capsys)
    assert code == 1
    assert err.startswith("Error: a PATH given cannot be used (PATHS are manifest files, ")
    assert "nope: no such file or folder" in err and "batchspec validate" not in err


def test_an_input_file_given_as_a_path_is_told_to_give_its_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan ws/data/hello.jsonl`: the batch input given where a manifest goes is named a data
    file, and the user told to give its manifest; read as YAML it was "not a batchspec
    manifest ... narrow `manifests:` in batchspec.yaml" and a YAML syntax error."""
    assert run_main(["init", str(tmp_path / "ws")], capsys)[0] == 0
    code, _, err = run_main(["plan", str(tmp_path / "ws" / "data" / "hello.jsonl")], capsys)
    assert code == 1
    assert err.startswith("Error: a PATH given cannot be used (PATHS are manifest files, ")
    assert "hello.jsonl: a data file (a batch input or rows), not a manifest; give the " in err
    assert "(`batchspec validate FILE.jsonl` checks a batch input alone)" in err
    assert "YAML" not in err and "narrow `manifests:`" not in err


def test_usage_error_exits_64(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad flag is a usage error: exit 64 (not click's 2), a hint, no traceback."""
    code, out, err = run_main(["validate", "--no-such-flag"], capsys)
    assert code == 64 and out == ""
    assert "No such option" in err and "Traceback" not in err


def test_a_folder_with_no_resources_fails_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """validate of a folder holding no resource exits 1 (a typo'd path or glob must not pass
    CI silently), saying nothing was found; --json says valid: false."""
    ws = workspace(tmp_path / "ws", {})
    code, out, err = run_main(["validate", str(ws)], capsys)
    assert code == 1 and out == ""
    assert "no resources found under" in err
    code, out, _ = run_main(["validate", str(ws), "--json"], capsys)
    assert code == 1 and json.loads(out)["valid"] is False


def test_through_click_runner(tmp_path: Path) -> None:
    """The click command itself (as CliRunner sees it) succeeds and fails with exit 0 and 1."""
    runner = CliRunner()
    result = runner.invoke(cli, ["validate", str(QUICKSTART), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["valid"] is True
    ws = workspace(tmp_path / "ws", {"a.yaml": manifest("a", "nope.jsonl")})
    result = runner.invoke(cli, ["validate", str(ws), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["problems"][0]["code"] == "missing-input"


def test_relative_paths_in_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Files below the working directory are named relative to it, as an editor would."""
    ws = workspace(tmp_path / "ws", {"jobs/a.yaml": manifest("a", "nope.jsonl")})
    monkeypatch.chdir(ws)
    code, _, err = run_main(["validate"], capsys)
    assert code == 1
    assert (
        f"\n  jobs{os.sep}a.yaml:8:10: /spec/input: input file not found: jobs{os.sep}nope.jsonl"
        in err
    )


def test_an_input_written_from_the_workspace_root_says_paths_are_relative_to_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest in jobs/ naming `data/x.jsonl` (the newcomer's slip: written from the root)
    is refused with the path looked at and the rule that explains it."""
    ws = workspace(tmp_path / "ws", {"jobs/a.yaml": manifest("a", "data/x.jsonl")})
    (ws / "data").mkdir()
    (ws / "data" / "x.jsonl").write_text(request("1") + "\n", encoding="utf-8")
    monkeypatch.chdir(ws)
    code, _, err = run_main(["validate"], capsys)
    assert code == 1
    assert f"input file not found: jobs{os.sep}data{os.sep}x.jsonl" in err
    assert "relative to the manifest's own folder" in err


def test_apply_on_one_bad_input_says_nothing_was_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """apply stopped by one resource's bad input lists its lines and says nothing was
    uploaded (as it does for several), so the user knows a re-run pays nothing twice."""
    ws = workspace(tmp_path / "ws", {"a.yaml": manifest("a", "a.jsonl")})
    (ws / "a.jsonl").write_text(request("1") + "\n" + request("1") + "\n", encoding="utf-8")
    monkeypatch.chdir(ws)
    code, _, err = run_main(["apply"], capsys)
    assert code == 1
    assert "a.jsonl:2: duplicate custom_id '1'" in err
    assert "1 problem(s) in the input of a; nothing was uploaded" in err
    assert not (ws / "state" / "local").exists()


def test_apply_on_two_bad_inputs_says_nothing_was_uploaded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two resources' bad inputs: each is listed with its lines, and "nothing was uploaded"
    is said once, for all of them, not once more per input."""
    ws = workspace(
        tmp_path / "ws",
        {"a.yaml": manifest("a", "a.jsonl"), "b.yaml": manifest("b", "b.jsonl")},
    )
    for name in ("a", "b"):
        (ws / f"{name}.jsonl").write_text(request("1") + "\n" + request("1") + "\n", "utf-8")
    monkeypatch.chdir(ws)
    code, _, err = run_main(["apply"], capsys)
    assert code == 1
    assert "1 problem(s) in the input of a" in err and "1 problem(s) in the input of b" in err
    assert err.count("nothing was uploaded") == 1, err


def test_a_jsonl_path_is_checked_as_a_batch_input_line_by_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate data.jsonl` scans it as a batch input: every problem with its line (#19)."""
    monkeypatch.chdir(tmp_path)  # no workspace needed for a batch input file
    lines = [request("a"), request("a"), "not json", request("b", model="other")]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = run_main(["validate", "data.jsonl"], capsys)
    assert (code, out) == (1, "")
    assert "data.jsonl:2: duplicate custom_id 'a' (first seen on line 1)" in err
    assert "data.jsonl:3: invalid JSON" in err
    assert "data.jsonl:4: " in err and "other" in err
    assert "manifest" not in err  # never read as YAML
    code, out, _ = run_main(["validate", "data.jsonl", "--json"], capsys)
    assert code == 1
    report = json.loads(out)
    assert report["valid"] is False
    assert [(p["line"], p["code"]) for p in report["problems"]] == [
        (2, "duplicate_custom_id"),
        (3, "invalid_json_line"),
        (4, "model_mismatch"),
    ]


def test_a_valid_jsonl_path_reports_its_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid batch input exits 0 with its request count, url and model (text and JSON)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.jsonl").write_text(request("a") + "\n" + request("b") + "\n")
    code, out, err = run_main(["validate", "ok.jsonl"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("ok.jsonl: valid batch input (2 requests, ")
    assert "/v1/chat/completions gpt-4o-mini" in out
    code, out, _ = run_main(["validate", "ok.jsonl", "--json"], capsys)
    [scan] = json.loads(out)["inputs"]
    assert (code, scan["requests"], scan["models"]) == (0, 2, ["gpt-4o-mini"])
    data = (tmp_path / "ok.jsonl").read_bytes()
    assert scan["sha256"] == hashlib.sha256(data).hexdigest()


def test_mixing_batch_inputs_and_manifests_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate data.jsonl manifests/` is ambiguous: exit 64 saying so."""
    (tmp_path / "ok.jsonl").write_text(request("a") + "\n")
    code, _, err = run_main(["validate", str(tmp_path / "ok.jsonl"), str(QUICKSTART)], capsys)
    assert code == 64
    assert "either batch input files (.jsonl) or manifests" in err


def test_a_manifest_that_is_a_symlink_loop_is_a_problem_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest that links to itself: found by the globs, it is a file problem (exit 1);
    named on the command line, one error line naming it (exit 1). No traceback either way
    (pathlib before 3.13 raises RuntimeError for a loop)."""
    ws = tmp_path / "ws"
    shutil.copytree(QUICKSTART, ws)
    manifests = next(p for p in ws.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
    (manifests / "loop.yaml").symlink_to("loop.yaml")
    code, _, err = run_main(["validate", str(ws)], capsys)
    assert code == 1
    assert "loop.yaml: cannot read file: Too many levels of symbolic links" in err
    code, _, err = run_main(["plan", str(manifests / "loop.yaml")], capsys)
    assert code == 1
    assert err.strip() == f"Error: a symbolic link loops back to itself: {manifests / 'loop.yaml'}"


def test_a_request_larger_than_max_bytes_per_batch_is_refused_before_any_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """limits.maxBytesPerBatch below one line's size: validate, plan and apply refuse it
    naming the file, the line, its size and the limit, as other input problems (not a
    batch of its own, over the limit, that the provider refuses after the upload)."""
    short, long = request("1"), request("2") + " " * 200
    limit = len(short) + 50
    limits = f"  limits: {{maxBytesPerBatch: {limit}}}\n"
    ws = workspace(
        tmp_path / "ws",
        {"a.yaml": manifest("a", "a.jsonl") + limits, "a.jsonl": f"{short}\n{long}\n"},
    )
    said = f"the request is {len(long) + 1:,} bytes, more than maxBytesPerBatch ({limit:,} bytes)"

    code, out, err = run_main(["validate", str(ws)], capsys)
    assert code == 1 and out == ""
    assert f"{ws.resolve() / 'a.jsonl'}:2: {said}" in err
    code, out, _ = run_main(["validate", str(ws), "--json"], capsys)
    [problem] = json.loads(out)["problems"]
    assert (problem["file"], problem["line"], problem["code"]) == (
        str(ws.resolve() / "a.jsonl"),
        2,
        "line_over_batch_limit",
    )
    monkeypatch.chdir(ws)
    # each says what the refusal means for it: plan uploads nothing in any case
    for command, outcome in (
        (["plan"], "; apply would upload nothing"),
        (["apply", "--yes"], "; nothing was uploaded"),
    ):
        code, _, err = run_main(command, capsys)
        assert code == 1 and said in err and "a.jsonl:2: " in err
        assert outcome in err
    assert not (ws / "state" / "local").exists()


def test_every_request_over_max_bytes_per_batch_is_counted_with_the_largest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Several lines over maxBytesPerBatch: the first is located and the others counted with
    the largest size, so one raise of the limit fixes them all (it named only the first:
    raised to fit it, the next validate refused the next line)."""
    short = request("1")
    lines = [short, request("2") + " " * 200, short.replace('"1"', '"3"'), request("4") + " " * 300]
    limit = len(short) + 50
    limits = f"  limits: {{maxBytesPerBatch: {limit}}}\n"
    ws = workspace(
        tmp_path / "ws",
        {"a.yaml": manifest("a", "a.jsonl") + limits, "a.jsonl": "".join(f"{x}\n" for x in lines)},
    )
    code, _, err = run_main(["validate", str(ws)], capsys)
    assert code == 1
    assert f"a.jsonl:2: the request is {len(lines[1]) + 1:,} bytes" in err
    assert f"(1 more line over it too, the largest {len(lines[3]) + 1:,} bytes)" in err


def test_a_manifest_the_project_globs_miss_is_named_by_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `kind: Batch` manifest the `manifests:` globs do not find (at the root, or a .yml
    where the globs say .yaml) is read by no command without PATHS: validate of the workspace
    names each with a warning (it said "1 resource valid" and nothing of them), still exits
    0; other YAML files and PATHS that skip the root are left alone."""
    project = PROJECT + "manifests: [manifests/**/*.yaml]\n"
    ws = workspace(
        tmp_path / "ws",
        {
            "manifests/a.yaml": manifest("a", "../a.jsonl"),
            "manifests/b.yml": manifest("b", "../a.jsonl"),
            "extra.yaml": manifest("extra", "a.jsonl"),
            "compose.yaml": "services: {web: {image: nginx}}\n",
            ".github/ci.yaml": manifest("hidden", "../a.jsonl"),
            "a.jsonl": request("1") + "\n",
        },
        project=project,
    )
    monkeypatch.chdir(ws)
    for argv in (["validate"], ["validate", "."], ["validate", str(ws)]):
        code, out, err = run_main(argv, capsys)
        assert code == 0 and "1 resource valid" in out, (argv, err)
        warned = [line for line in err.splitlines() if line.startswith("Warning: ")]
        assert [w.split()[1] for w in warned] == ["extra.yaml", "manifests/b.yml"], err
        assert "holds a `kind: Batch` document the project's manifests" in warned[0]
        assert "(manifests/**/*.yaml in batchspec.yaml) do not find" in warned[0]
    code, _, err = run_main(["validate", "manifests"], capsys)
    assert code == 0 and "Warning" not in err
    code, out, _ = run_main(["validate", "--json"], capsys)
    assert code == 0 and json.loads(out)["valid"] is True
