"""batchspec.workspace.yamldoc: reading YAML is bounded (aliases, file size, FIFOs, devices)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from batchspec.workspace.manifest import load_workspace
from batchspec.workspace.project import load_project
from batchspec.workspace.yamldoc import (
    InvalidManifestError,
    Problem,
    read_yaml_documents,
)

MAX_YAML_FILE_BYTES = 4 * 1024 * 1024  # yamldoc.MAX_YAML_FILE_BYTES, as documented
PROJECT = "apiVersion: batchspec/v1\nkind: Project\n"
MANIFEST = """\
apiVersion: batchspec/v1
kind: Batch
metadata:
  name: triage
spec:
  provider: local
  endpoint: /v1/chat/completions
  input: data.jsonl
"""
REQUEST = {
    "custom_id": "r1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
}


def workspace(root: Path, manifest: str | None = MANIFEST) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "batchspec.yaml").write_text(PROJECT, encoding="utf-8")
    (root / "data.jsonl").write_text(json.dumps(REQUEST) + "\n", encoding="utf-8")
    if manifest is not None:
        (root / "m.yaml").write_text(manifest, encoding="utf-8")
    return root


def laughs(levels: int) -> str:
    """A "billion laughs" manifest: each level is ten aliases of the one before."""
    lines = ["    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return (
        MANIFEST + "  metadata:\n    bomb:\n" + "\n".join(lines).replace("    l", "      l") + "\n"
    )


def load_problems(*paths: Path) -> list[Problem]:
    with pytest.raises(InvalidManifestError) as caught:
        load_workspace(list(paths))
    return list(caught.value.problems)


def test_an_alias_bomb_is_refused_at_the_alias_quickly(tmp_path: Path) -> None:
    """Six levels of ten aliases (a million nodes) is refused with a located alias-limit problem."""
    ws = workspace(tmp_path / "ws", laughs(6))
    found = load_problems(ws / "m.yaml")
    [bomb] = [p for p in found if p.code == "alias-limit"]
    assert bomb.file is not None and bomb.file.name == "m.yaml"
    assert bomb.line is not None and bomb.line > 8
    assert "aliases expand to more than" in bomb.message


def test_a_chain_of_merge_keys_is_refused_before_it_is_flattened(tmp_path: Path) -> None:
    """`<<: [*p, *p]` chained 18 deep doubles a mapping at every level: refused, not built."""
    lines = ["  m0: &m0 {a: 1}"]
    for i in range(1, 19):
        lines.append(f"  m{i}: &m{i}\n    <<: [*m{i - 1}, *m{i - 1}]\n    k{i}: 1")
    path = tmp_path / "merge.yaml"
    path.write_text("x:\n" + "\n".join(lines) + "\n", encoding="utf-8")
    documents, problems = read_yaml_documents(path)
    assert documents == []
    assert [p.code for p in problems] == ["alias-limit"]


def test_a_few_anchors_and_merges_still_work(tmp_path: Path) -> None:
    """Ordinary reuse of a block through anchors stays well under the limit."""
    path = tmp_path / "ok.yaml"
    path.write_text(
        "base: &b {model: m, temperature: 0}\n"
        + "".join(f"r{i}: {{<<: *b, n: {i}}}\n" for i in range(200))
        + "list: [*b, *b, *b]\n",
        encoding="utf-8",
    )
    [doc], problems = read_yaml_documents(path)
    assert problems == []
    assert doc.data["r7"] == {"model": "m", "temperature": 0, "n": 7}


def test_a_manifest_larger_than_the_limit_is_refused_unread(tmp_path: Path) -> None:
    """A manifest over MAX_YAML_FILE_BYTES (4 MB) is a too-large problem naming the file."""
    padding = "# " + "x" * 1000 + "\n"
    ws = workspace(tmp_path / "ws", MANIFEST + padding * (MAX_YAML_FILE_BYTES // len(padding) + 1))
    [problem] = load_problems(ws / "m.yaml")
    assert problem.code == "too-large"
    assert f"larger than {MAX_YAML_FILE_BYTES:,} bytes" in problem.message


def test_a_project_file_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    """batchspec.yaml gets the same size bound as a manifest."""
    ws = workspace(tmp_path / "ws")
    padding = "# " + "x" * 1000 + "\n"
    (ws / "batchspec.yaml").write_text(
        PROJECT + padding * (MAX_YAML_FILE_BYTES // len(padding) + 1), encoding="utf-8"
    )
    with pytest.raises(InvalidManifestError) as caught:
        load_project(ws)
    assert [p.code for p in caught.value.problems] == ["too-large"]


def test_a_fifo_named_as_a_manifest_is_refused_without_opening_it(tmp_path: Path) -> None:
    """A FIFO given as a manifest path is reported (not skipped, never opened: it would block)."""
    ws = workspace(tmp_path / "ws", None)
    os.mkfifo(ws / "pipe.yaml")
    [problem] = load_problems(ws / "pipe.yaml")
    assert problem.code == "not-a-file"
    assert "a FIFO" in problem.message


def _limited() -> None:
    """Cap the child's memory at 1 GiB: a regression must fail, not take the machine down."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize("link", ["manifests/zero.yaml", "batchspec.yaml"])
def test_a_link_to_dev_zero_is_refused_not_read_forever(tmp_path: Path, link: str) -> None:
    """A manifest (found by a folder scan) or project file linked to /dev/zero is refused."""
    ws = workspace(tmp_path / "ws", None)
    (ws / "manifests").mkdir()
    (ws / "batchspec.yaml").write_text(PROJECT + "manifests: ['manifests/*.yaml']\n")
    (ws / link).unlink(missing_ok=True)
    (ws / link).symlink_to("/dev/zero")
    done = subprocess.run(
        [sys.executable, "-m", "batchspec", "validate", str(ws)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limited,
    )
    assert done.returncode == 1, done.stderr
    assert "not a regular file (a device)" in done.stderr
    assert "Traceback" not in done.stderr
