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


@pytest.mark.parametrize("limit", [pytest.param(4096, id="within"), pytest.param(50, id="over")])
def test_a_file_that_grew_after_its_fstat_is_read_on_to_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    """The read is sized to the file's fstat; bytes past it (a write meanwhile) are still
    read up to the limit, so a grown file is read whole, or refused once over the limit."""
    from batchspec.workspace import yamldoc

    path = tmp_path / "m.yaml"
    path.write_bytes(b"x" * 100)
    real_fstat = os.fstat

    def stale_fstat(fd: int) -> os.stat_result:  # the size before the file grew
        st = real_fstat(fd)
        return os.stat_result((*st[:6], 10, *st[7:10]))

    monkeypatch.setattr(yamldoc.os, "fstat", stale_fstat)
    if limit >= 100:
        assert yamldoc.read_bounded(path, limit) == b"x" * 100
    else:
        with pytest.raises(Exception, match="larger than 50 bytes"):
            yamldoc.read_bounded(path, limit)


def test_scalars_and_keys_build_as_the_yaml_constructor_builds_them(tmp_path: Path) -> None:
    """Strings are taken from their nodes directly (not through PyYAML's constructor): every
    kind of scalar and key still comes out as the constructor makes it, quoted, tagged,
    merged, multi-line or not; a mapping is flattened (``<<``, ``=``) only where it holds
    such a key, and then as PyYAML flattens it."""
    import yaml

    from batchspec.workspace import yamldoc

    text = (
        "plain: text\nquoted: '1'\ndouble: \"a\\tb\\u00e9\"\ntagged: !!str 12\non: true\n"
        "n: 12\nf: 1.5e3\nnull_: ~\nno: no\nwhen: 2024-01-01\nfolded: >\n  a\n  b\n"
        "'7': quoted key\n!!str 8: tagged key\nbase: &b {k: v, 'x': !!str 0x1F}\n"
        "merged: {<<: *b, k: w}\nlist: [a, 'b', 3, !!str 4, {y: z}]\neq: {=: x, y: 1}\n"
    )
    path = tmp_path / "s.yaml"
    path.write_text(text, encoding="utf-8")
    [doc], problems = read_yaml_documents(path)
    assert problems == []
    assert doc.data == yaml.load(text, Loader=yamldoc._Loader)  # noqa: S506 - a safe loader
    assert doc.data["tagged"] == "12" and doc.data["on"] is True and doc.data["no"] == "no"
    assert doc.data["when"] == "2024-01-01" and doc.data["base"]["x"] == "0x1F"
    assert doc.data["merged"] == {"k": "w", "x": "0x1F"} and doc.data["eq"] == {"=": "x", "y": 1}


@pytest.mark.parametrize(
    ("text", "pointer"),
    [
        pytest.param("a: [1, [x, .inf]]\n", "/a/1/1", id="in-a-list"),
        pytest.param("a: {b: {c: -.inf}}\n", "/a/b/c", id="in-a-mapping"),
        pytest.param("- .nan\n", "/0", id="top-level-list"),
        pytest.param("a: [1.5, '.nan', {b: 2}]\n", None, id="none"),
    ],
)
def test_every_non_finite_number_is_found_wherever_it_is_nested(
    tmp_path: Path, text: str, pointer: str | None
) -> None:
    """A NaN or infinity anywhere in a document is a problem at its pointer (a clean document
    is walked without making pointers; one holding such a number is walked again for them)."""
    from batchspec.workspace.yamldoc import schema_problems

    path = tmp_path / "d.yaml"
    path.write_text(text, encoding="utf-8")
    [doc], _ = read_yaml_documents(path)
    found = [p.pointer for p in schema_problems(doc, "batch") if "not a number" in p.message]
    assert found == ([pointer] if pointer else [])


@pytest.mark.parametrize(
    ("text", "where"),
    [
        pytest.param('a: {b: "x\\ud800y"}\n', (1, 8, "/a/b"), id="value"),
        pytest.param('a: {"k\\udfff": 1}\n', (1, 5, "/a"), id="key"),
        pytest.param('a: !!str "\\udc80"\n', (1, 4, "/a"), id="tagged"),
    ],
)
def test_an_unpaired_surrogate_escape_is_a_problem_not_a_traceback(
    tmp_path: Path, text: str, where: tuple[int, int, str]
) -> None:
    """A "\\ud800" escape builds half a surrogate pair, which no UTF-8 file or database
    holds: the manifest cache's write and apply's state writes ended in a traceback. It is
    one located problem, and the text carries '?' in its place."""
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    [doc], problems = read_yaml_documents(path)
    [problem] = problems
    assert (problem.line, problem.column, problem.pointer) == where
    assert problem.code == "invalid-value" and "half of a surrogate pair" in problem.message
    assert json.dumps(doc.data, ensure_ascii=False).encode("utf-8")  # no surrogate is left
    assert "?" in json.dumps(doc.data)
