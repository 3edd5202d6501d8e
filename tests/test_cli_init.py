"""`batchspec init`: a workspace that validates as is, and never an overwritten file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchspec.cli.main import cli, main
from batchspec.workspace.scaffold import scaffold_files

EXPECTED = [
    "batchspec.yaml",
    "manifests/hello.yaml",
    "data/hello.jsonl",
    "state/.gitignore",
    "state/README.md",
]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the real entry point (which maps errors to exit codes); return code, stdout, stderr."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), out.out, out.err


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_init_creates_the_workspace_and_says_what_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It prints each file it created and the next command to run."""
    target = tmp_path / "new" / "ws"
    code, out, err = run_main(["init", str(target)], capsys)
    assert (code, err) == (0, "")
    assert files_under(target) == sorted(EXPECTED)
    for relative in EXPECTED:
        assert f"created {target / relative}" in out
    assert out.rstrip().endswith(f"Next: batchspec validate {target}")


def test_init_makes_the_state_folder_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """state/ that init makes (for its .gitignore and README) is 0700 whatever the umask, as
    the state store makes it: it was made 0755, and a folder that exists keeps its mode, so
    the quickstart's state (requests and answers) sat in a folder anyone could list."""
    target = tmp_path / "ws"
    old = os.umask(0o022)
    try:
        assert run_main(["init", str(target)], capsys)[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((target / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((target / "data").stat().st_mode) == 0o755  # the rest as the user's


def test_scaffolded_workspace_passes_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What init writes is a valid workspace: project, manifest and its three requests."""
    target = tmp_path / "ws"
    assert run_main(["init", str(target)], capsys)[0] == 0
    code, out, _ = run_main(["validate", str(target), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    [resource] = report["resources"]
    assert (resource["name"], resource["requests"], resource["provider"]) == ("hello", 3, "local")
    assert report["project"] == str((target / "batchspec.yaml").resolve())


def test_a_yml_manifest_beside_the_scaffolded_one_is_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest saved as manifests/two.yml is a resource of the new workspace, as .yaml is
    (the scaffold's globs left .yml out: the file was silently ignored)."""
    target = tmp_path / "ws"
    assert run_main(["init", str(target)], capsys)[0] == 0
    hello = (target / "manifests" / "hello.yaml").read_text()
    two = hello.replace("name: hello", "name: two").replace("results/hello", "results/two")
    (target / "manifests" / "two.yml").write_text(two)
    code, out, err = run_main(["validate", str(target), "--json"], capsys)
    assert code == 0, err
    assert sorted(r["name"] for r in json.loads(out)["resources"]) == ["hello", "two"]


def test_init_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without DIR it scaffolds here, and the next command needs no path."""
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(["init"], capsys)
    assert code == 0
    assert "created batchspec.yaml" in out
    assert out.rstrip().endswith("Next: batchspec validate")
    assert run_main(["validate"], capsys)[0] == 0


@pytest.mark.parametrize("existing", EXPECTED)
def test_init_refuses_to_overwrite_any_file(
    tmp_path: Path, existing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """If any target exists, init exits 1 naming it and writes nothing at all."""
    target = tmp_path / "ws"
    (target / existing).parent.mkdir(parents=True)
    (target / existing).write_text("mine\n", encoding="utf-8")
    code, out, err = run_main(["init", str(target)], capsys)
    assert code == 1 and out == ""
    assert str(target / existing) in err and "Nothing was written" in err
    assert "Traceback" not in err
    assert files_under(target) == [existing]
    assert (target / existing).read_text(encoding="utf-8") == "mine\n"


def test_init_refuses_a_folder_holding_manifests_of_the_workspace_it_lies_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """init in a workspace's manifests/ would make it a workspace of its own, which the outer
    one skips: its manifests there would drop out (pruned by the next apply --prune). It is
    refused, naming them; a folder of that workspace holding none is scaffolded, with a note."""
    outer = tmp_path / "ws"
    assert run_main(["init", str(outer)], capsys)[0] == 0

    code, out, err = run_main(["init", str(outer / "manifests")], capsys)

    assert code == 1
    assert "lies in the workspace of" in err and "manifests/hello.yaml" in err
    assert not (outer / "manifests" / "batchspec.yaml").exists()
    code, out, err = run_main(["init", str(outer / "tools" / "sub")], capsys)
    assert code == 0, err
    assert "Note: this workspace lies in the workspace of" in out
    # a manifest in flow style is one too, as the workspace reads it (no `kind: Batch` line)
    flow = outer / "manifests" / "more"
    flow.mkdir()
    (flow / "flow.yaml").write_text(
        "{apiVersion: batchspec/v1, kind: Batch, metadata: {name: flow}, spec: {}}\n"
    )
    code, out, err = run_main(["init", str(flow)], capsys)
    assert code == 1 and "flow.yaml" in err, out + err


def test_init_refuses_when_a_folder_it_needs_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file where a folder must go is a conflict too, found before anything is written."""
    target = tmp_path / "ws"
    target.mkdir()
    (target / "manifests").write_text("", encoding="utf-8")
    code, _, err = run_main(["init", str(target)], capsys)
    assert code == 1 and str(target / "manifests") in err
    assert files_under(target) == ["manifests"]


def test_init_into_a_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DIR naming an existing file is a bad argument: exit 64, nothing written."""
    path = tmp_path / "file.txt"
    path.write_text("", encoding="utf-8")
    code, _, err = run_main(["init", str(path)], capsys)
    assert code == 64 and "Traceback" not in err
    assert files_under(tmp_path) == ["file.txt"]


def test_scaffold_data_file_is_three_chat_requests() -> None:
    """The data file holds three chat requests using the manifest's model."""
    lines = scaffold_files()["data/hello.jsonl"].splitlines()
    requests = [json.loads(line) for line in lines]
    assert len(requests) == 3
    assert {r["url"] for r in requests} == {"/v1/chat/completions"}
    assert {r["body"]["model"] for r in requests} == {"gpt-4o-mini"}
    assert len({r["custom_id"] for r in requests}) == 3


def test_project_template_keeps_the_openai_example_commented_out() -> None:
    """The openai provider is shown but not declared; no API key appears anywhere."""
    project = scaffold_files()["batchspec.yaml"]
    assert "  # openai:\n  #   type: openai\n" in project
    assert "apiKeyEnv: OPENAI_API_KEY" in project and "sk-" not in project


def test_through_click_runner(tmp_path: Path) -> None:
    """The click command itself creates the files (as CliRunner sees it)."""
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "ws")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path / "ws") == sorted(EXPECTED)
