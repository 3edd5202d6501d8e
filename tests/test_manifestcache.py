"""The manifest cache: a recalled manifest loads exactly like a fresh read, and any change is seen.

Every test compares a load through the cache with an uncached ``load_workspace`` of the same
files, field by field (``Resource`` is a frozen dataclass, so ``==`` covers every field:
paths, nested dataclasses, source locations, spec hashes), and checks through
``ManifestCache.recalled`` that the cache really answered. Library tests use
``racy_window=0`` so a file written a moment ago may be stored; the end-to-end test goes
through ``batchspec plan`` with the real window.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from workspaces import run_cli

from batchspec.workspace import manifestcache
from batchspec.workspace.manifest import Workspace, load_workspace, project_for
from batchspec.workspace.manifestcache import RACY_WINDOW_S, ManifestCache, encode_documents
from batchspec.workspace.yamldoc import (
    InvalidManifestError,
    YamlDocument,
    display_path,
    read_yaml_documents,
)

PROJECT = """\
apiVersion: batchspec/v1
kind: Project
state: {path: state/batchspec.db}
manifests: ['manifests/**/*.yaml']
defaults:
  budget: {maxRequests: 1000}
providers:
  here: {type: local, options: {upstream: builtin}}
"""

# Two documents in one file, most optional keys, comments, an anchor and a merge key.
RICH = """\
# a comment that shifts every line
apiVersion: batchspec/v1
kind: Batch
metadata:
  name: rich
  labels: &labels {team: support, tier: "1"}
  annotations: *labels
spec:
  provider: here
  endpoint: /v1/chat/completions
  completionWindow: 24h
  input: ../data/a.jsonl
  model: test-model
  metadata: {<<: *labels, project: triage, on: "yes"}
  retry: {maxAttempts: 5, on: [server_error, timeout]}
  limits: {maxRequestsPerBatch: 2}
  budget: {maxInputTokens: 9000}
  suspend: false
---
apiVersion: batchspec/v1
kind: Batch
metadata:
  name: second
  moved: {from: old-second}
spec:
  provider: here
  endpoint: /v1/chat/completions
  input: ../data/b.jsonl
  output: out/second.jsonl
  errors: out/second.errors.jsonl
  suspend: true
"""

PLAIN = """\
apiVersion: batchspec/v1
kind: Batch
metadata: {name: plain}
spec:
  provider: here
  endpoint: /v1/chat/completions
  input: ../../data/c.jsonl
  model: test-model
  metadata: {tag: aa}
"""

ROWS = """\
apiVersion: batchspec/v1
kind: Batch
metadata: {name: from-rows}
spec:
  provider: here
  endpoint: /v1/chat/completions
  model: test-model
  input:
    rows: ../data/rows.csv
    id: "row-{{ k }}"
    body:
      messages: [{role: user, content: "say {{ text }}"}]
"""


def request_line(custom_id: str, text: str) -> str:
    body = {"model": "test-model", "messages": [{"role": "user", "content": text}]}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line) + "\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "manifests" / "sub").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "batchspec.yaml").write_text(PROJECT)
    for name in ("a", "b", "c"):
        (root / "data" / f"{name}.jsonl").write_text(
            request_line(f"{name}-1", "one") + request_line(f"{name}-2", "two")
        )
    (root / "data" / "rows.csv").write_text("k,text\n1,hello\n2,world\n")
    (root / "manifests" / "rich.yaml").write_text(RICH)
    (root / "manifests" / "sub" / "plain.yaml").write_text(PLAIN)
    (root / "manifests" / "rows.yaml").write_text(ROWS)
    return root


def cache_db(root: Path) -> Path:
    return root / "state" / "input-cache.db"


def cached_load(root: Path, *, racy_window: float = 0.0) -> tuple[Workspace, int]:
    """``load_workspace`` through the cache; returns the workspace and how many files it
    recalled."""
    with ManifestCache(cache_db(root), project_for([root]), racy_window=racy_window) as cache:
        ws = load_workspace([root], manifest_cache=cache)
    return ws, cache.recalled


def cached_problems(root: Path) -> tuple[list[str], int]:
    with (
        ManifestCache(cache_db(root), project_for([root]), racy_window=0.0) as cache,
        pytest.raises(InvalidManifestError) as raised,
    ):
        load_workspace([root], manifest_cache=cache)
    return [str(p) for p in raised.value.problems], cache.recalled


def uncached_problems(root: Path) -> list[str]:
    with pytest.raises(InvalidManifestError) as raised:
        load_workspace([root])
    return [str(p) for p in raised.value.problems]


def stored_paths(root: Path) -> list[str]:
    with sqlite3.connect(cache_db(root)) as conn:
        return sorted(path for (path,) in conn.execute("select path from manifest_entries"))


def rewrite_keeping_size_and_mtime(path: Path, old: str, new: str) -> None:
    """Edit in place (same inode), same size, and put the old mtime back: only ctime moves."""
    assert len(old) == len(new)
    before = path.stat()
    text = path.read_text()
    assert text.count(old) == 1
    time.sleep(0.05)  # past the filesystem clock's tick, so the ctime can move
    with path.open("r+") as f:
        f.write(text.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    assert after.st_ctime_ns != before.st_ctime_ns


# ---------------------------------------------------------------------------------------------


def test_a_recalled_workspace_equals_an_uncached_load_field_by_field(root: Path) -> None:
    """Every Resource (paths, nested dataclasses, source, spec hash) and the file list are the
    same whether the manifests were parsed or recalled; the second load recalls all three."""
    first, recalled_first = cached_load(root)
    second, recalled_second = cached_load(root)
    fresh = load_workspace([root])

    assert (recalled_first, recalled_second) == (0, 3)
    assert len(fresh.resources) == 4
    for cached in (first, second):
        assert cached.resources == fresh.resources
        assert cached.manifest_files == fresh.manifest_files
        assert cached.project == fresh.project
        for res, expected in zip(cached.resources, fresh.resources, strict=True):
            assert res.spec_hash == expected.spec_hash
            assert res.semantic_spec() == expected.semantic_spec()
            assert str(res.source) == str(expected.source)
    by_name = {r.name: r for r in second.resources}
    assert by_name["second"].output_path == root / "manifests" / "out" / "second.jsonl"
    assert by_name["second"].moved_from == "old-second"
    assert by_name["from-rows"].input_source == root / "data" / "rows.csv"


def test_recalled_documents_locate_every_node_like_the_parsed_ones(root: Path) -> None:
    """Each document's data and the file:line:column of every value and key survive the round
    trip through the cache's JSON."""
    file = root / "manifests" / "rich.yaml"
    parsed, problems = read_yaml_documents(file)
    assert problems == []
    with ManifestCache(cache_db(root), project_for([root]), racy_window=0.0) as cache:
        assert cache.recall(file) is None
        cache.remember(file, parsed)
    with ManifestCache(cache_db(root), project_for([root])) as cache:
        recalled = cache.recall(file)

    assert recalled is not None
    assert [d.data for d in recalled] == [d.data for d in parsed]
    assert [d.index for d in recalled] == [d.index for d in parsed]
    for got, want in zip(recalled, parsed, strict=True):
        assert set(got.values) == set(want.values) and set(got.keys) == set(want.keys)
        for pointer in [*want.values, "/spec/nowhere", "/metadata/labels/missing"]:
            assert got.location(pointer) == want.location(pointer)
            assert got.key_location(pointer) == want.key_location(pointer)


def test_an_edit_with_the_same_size_and_mtime_is_seen(root: Path) -> None:
    """A manifest edited in place to the same size with its mtime put back is read again
    (its ctime moved), and the new spec hash equals an uncached load's."""
    before, _ = cached_load(root)
    rewrite_keeping_size_and_mtime(root / "manifests" / "sub" / "plain.yaml", "tag: aa", "tag: bb")

    after, recalled = cached_load(root)

    assert recalled == 2  # the other two files
    fresh = load_workspace([root])
    assert after.resources == fresh.resources
    plain = {r.name: r for r in after.resources}["plain"]
    assert plain.metadata == {"tag": "bb"}
    assert plain.spec_hash != {r.name: r for r in before.resources}["plain"].spec_hash


def test_a_manifest_added_since_is_read_beside_the_recalled_ones(root: Path) -> None:
    """A file the cache does not hold yet is read while the stored ones are recalled (the
    stored paths are looked up once a load), and the next load recalls it too."""
    cached_load(root)
    added = PLAIN.replace("name: plain", "name: added")
    (root / "manifests" / "sub" / "added.yaml").write_text(added)

    ws, recalled = cached_load(root)

    assert recalled == 3  # the three stored files; the new one was read
    assert ws.resources == load_workspace([root]).resources
    assert cached_load(root)[1] == 4


def test_a_cached_file_made_invalid_is_fully_revalidated(root: Path) -> None:
    """Breaking a cached manifest reports every problem with file:line:column, on every load,
    exactly as an uncached load does, and the broken version is never stored."""
    cached_load(root)
    plain = root / "manifests" / "sub" / "plain.yaml"
    plain.write_text(PLAIN.replace("endpoint: /v1/chat/completions", "endpoint: /v1/chat"))
    plain.write_text(plain.read_text() + "  completion_window: 24h\n")

    for _ in range(2):
        problems, recalled = cached_problems(root)
        assert recalled == 2
        assert problems == uncached_problems(root)
        assert any(p.startswith(f"{plain}:6:13: /spec/endpoint:") for p in problems), problems
        assert any(p.startswith(f"{plain}:10:3: /spec/completion_window:") for p in problems)
    with sqlite3.connect(cache_db(root)) as conn:
        [(ctime_ns,)] = conn.execute(
            "select ctime_ns from manifest_entries where path = ?", (str(plain),)
        ).fetchall()
    assert ctime_ns != plain.stat().st_ctime_ns  # only the clean version's entry, never used


def test_checks_across_files_still_see_recalled_files(root: Path) -> None:
    """A new manifest reusing a cached resource's name is reported at both places (the cached
    one located from the cache); removing a cached manifest removes its resource."""
    cached_load(root)
    clash = root / "manifests" / "clash.yaml"
    clash.write_text(PLAIN.replace("name: plain", "name: rich").replace("c.jsonl", "a.jsonl"))

    problems, recalled = cached_problems(root)

    assert recalled == 3
    assert problems == uncached_problems(root)
    assert any(f"{root / 'manifests' / 'rich.yaml'}:5:9" in p for p in problems), problems

    clash.unlink()
    (root / "manifests" / "rows.yaml").unlink()
    after, recalled = cached_load(root)
    assert recalled == 2
    assert {r.name for r in after.resources} == {"rich", "second", "plain"}
    assert after.resources == load_workspace([root]).resources


def test_what_a_cached_manifest_points_at_is_checked_every_time(root: Path) -> None:
    """Recalling a manifest skips only parsing and the schema: a changed input changes the spec
    hash, a deleted input is reported at /spec/input, a provider removed from the project is
    reported at /spec/provider, each as an uncached load does."""
    first, _ = cached_load(root)
    (root / "data" / "c.jsonl").write_text(request_line("c-1", "changed"))
    changed, recalled = cached_load(root)
    assert recalled == 3
    assert changed.resources == load_workspace([root]).resources
    spec_hashes = [{r.name: r.spec_hash for r in ws.resources} for ws in (first, changed)]
    assert spec_hashes[0]["plain"] != spec_hashes[1]["plain"]
    assert spec_hashes[0]["rich"] == spec_hashes[1]["rich"]

    (root / "data" / "c.jsonl").unlink()
    problems, recalled = cached_problems(root)
    assert recalled == 3
    assert problems == uncached_problems(root)
    assert any("plain.yaml:7:10: /spec/input: input file not found" in p for p in problems)

    (root / "data" / "c.jsonl").write_text(request_line("c-1", "back"))
    (root / "batchspec.yaml").write_text(PROJECT.replace("here:", "there:"))
    problems, _ = cached_problems(root)
    assert problems == uncached_problems(root)
    assert any("plain.yaml:5:13: /spec/provider: unknown provider 'here'" in p for p in problems)


def test_a_changed_project_file_or_fingerprint_misses(root: Path) -> None:
    """Entries are used only under the fingerprint they were stored with, which covers the
    project file: editing it (even a comment) or another fingerprint means a full re-read."""
    cached_load(root)
    assert cached_load(root)[1] == 3

    (root / "batchspec.yaml").write_text(PROJECT + "# a comment\n")
    again, recalled = cached_load(root)
    assert recalled == 0
    assert again.resources == load_workspace([root]).resources
    assert cached_load(root)[1] == 3

    with sqlite3.connect(cache_db(root)) as conn:
        conn.execute("update manifest_entries set fingerprint = 'another batchspec'")
    assert cached_load(root)[1] == 0


def test_a_retargeted_folder_link_is_followed(root: Path) -> None:
    """Paths are resolved on every load, not cached: when the data folder is a symlink that
    now points elsewhere, the input path and hash follow it, like an uncached load."""
    (root / "data").rename(root / "data-a")
    (root / "data-b").mkdir()
    for name in ("a", "b", "c"):
        (root / "data-b" / f"{name}.jsonl").write_text(request_line(f"{name}-9", "other"))
    (root / "data-b" / "rows.csv").write_text("k,text\n9,other\n")
    (root / "data").symlink_to("data-a")
    first, _ = cached_load(root)

    (root / "data").unlink()
    (root / "data").symlink_to("data-b")
    second, recalled = cached_load(root)

    assert recalled == 3
    assert second.resources == load_workspace([root]).resources
    plain = {r.name: r for r in second.resources}["plain"]
    assert plain.input_path == root / "data-b" / "c.jsonl"
    assert plain.spec_hash != {r.name: r for r in first.resources}["plain"].spec_hash


@pytest.mark.parametrize(
    "spelling",
    [
        pytest.param("../../data/link.jsonl", id="symlinked-file"),
        pytest.param("./../.././data/./c.jsonl", id="dot-components"),
        pytest.param("../..//data/c.jsonl", id="double-slash"),
        pytest.param("../../manifests/../data/c.jsonl", id="dot-dot-inside"),
        pytest.param("../../linked-data/c.jsonl", id="symlinked-folder"),
        pytest.param("ABSOLUTE", id="absolute"),
        pytest.param("../../data/missing.jsonl", id="missing"),
        pytest.param("../../data", id="a-folder"),
        pytest.param("../../data/..", id="ends-in-dot-dot"),
    ],
)
def test_paths_resolve_as_path_resolve_does(root: Path, spelling: str) -> None:
    """However spec.input is spelled (and whatever it is: a symlink, missing, a folder), the
    resolved input path, or the problem reported, equals what Path.resolve() gives."""
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "target.jsonl").write_text(request_line("t-1", "linked"))
    (root / "data" / "link.jsonl").symlink_to(root / "elsewhere" / "target.jsonl")
    (root / "linked-data").symlink_to("data")
    spelled = str(root / "data" / "c.jsonl") if spelling == "ABSOLUTE" else spelling
    plain = root / "manifests" / "sub" / "plain.yaml"
    plain.write_text(PLAIN.replace("../../data/c.jsonl", f"'{spelled}'"))
    expected = (plain.parent / spelled).resolve()

    try:
        ws = load_workspace([root])
    except InvalidManifestError as err:
        what = "is not a file" if expected.exists() else "file not found"
        message = f"{plain}:7:10: /spec/input: input {what}: {display_path(expected)}"
        assert any(str(p).startswith(message) for p in err.problems), err.problems
        assert not expected.is_file()
    else:
        assert {r.name: r for r in ws.resources}["plain"].input_path == expected
        assert expected.is_file()


def test_a_just_written_manifest_is_recalled_only_while_its_bytes_hash_the_same(
    root: Path,
) -> None:
    """With the real racy window, a file changed under RACY_WINDOW_S ago is stored with the
    sha256 of the bytes parsed and recalled while its bytes hash the same; a same-tick
    rewrite (stamp kept, bytes not: forged by changing the entry's sha256) is read in full."""
    cached_load(root, racy_window=RACY_WINDOW_S)
    assert len(stored_paths(root)) == 3
    _, recalled = cached_load(root, racy_window=RACY_WINDOW_S)
    assert recalled == 3

    with sqlite3.connect(cache_db(root)) as conn:
        conn.execute("update manifest_entries set sha256 = ?", ("0" * 64,))
    ws, recalled = cached_load(root, racy_window=RACY_WINDOW_S)
    assert recalled == 0
    assert ws.resources == load_workspace([root]).resources


def test_a_racy_entry_is_hashed_once_a_process_after_its_stamp_settled(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files stored racy (with their bytes' sha256), recalled by later loads once their stamp
    has settled (here: a zero window): the first load hashes each, the next ones none (they
    hashed each file on every recall); an edit still misses."""
    cached_load(root, racy_window=RACY_WINDOW_S)
    with sqlite3.connect(cache_db(root)) as conn:
        assert conn.execute("select count(sha256) from manifest_entries").fetchone()[0] == 3
    hashed: list[Path] = []
    real = manifestcache._bytes_sha256

    def counting(path: Path) -> str | None:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(manifestcache, "_bytes_sha256", counting)
    for _ in range(3):
        assert cached_load(root)[1] == 3
    assert len(hashed) == 3

    plain = root / "manifests" / "sub" / "plain.yaml"
    plain.write_text(plain.read_text() + "\n")
    ws, recalled = cached_load(root)
    assert recalled == 2
    assert ws.resources == load_workspace([root]).resources


def test_data_that_json_cannot_hold_exactly_is_not_encoded(tmp_path: Path) -> None:
    """A document whose data would not come back from JSON unchanged is never stored."""
    file = tmp_path / "odd.yaml"
    file.write_text("a: .nan\n")
    documents, problems = read_yaml_documents(file)
    assert problems == []
    assert encode_documents(documents) is None


class _Labels(dict[str, Any]):
    pass


@pytest.mark.parametrize(
    ("data", "kept"),
    [
        pytest.param({"a": [1, -0.0, 1.5, True, None, "x", {"b": []}]}, True, id="plain"),
        pytest.param({"a": (1, 2)}, False, id="tuple"),
        pytest.param({1: "a"}, False, id="int-key"),
        pytest.param({"a": _Labels(b="c")}, False, id="dict-subclass"),
        pytest.param({"a": [float("inf")]}, False, id="infinity"),
        pytest.param({"a": b"x"}, False, id="bytes"),
    ],
)
def test_only_data_that_comes_back_from_json_unchanged_is_encoded(data: Any, kept: bool) -> None:
    """Data is encoded only when its JSON decodes to an equal value of the same types;
    anything else (a tuple, a key that is no string, a subclass, a non-finite float,
    bytes) is not stored, and costs a re-read."""
    doc = YamlDocument(Path("m.yaml"), 0, data, {}, {})
    text = encode_documents([doc])
    assert (text is not None) == kept
    if text is not None:
        [back] = manifestcache.decode_documents(Path("m.yaml"), text)
        assert back.data == data and repr(back.data) == repr(data)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("!!binary aGVsbG8=", id="bytes"),
        pytest.param("!!timestamp 2024-01-01", id="timestamp"),
    ],
)
def test_data_that_is_no_json_value_is_a_problem(tmp_path: Path, value: str) -> None:
    """bytes or a date never get into a document's data (the file is not clean: not stored)."""
    file = tmp_path / "odd.yaml"
    file.write_text(f"a: {value}\n")
    [document], problems = read_yaml_documents(file)
    assert [(p.pointer, p.code) for p in problems] == [("/a", "invalid-value")]
    assert document.data == {"a": None}


def test_an_unusable_cache_database_only_costs_a_reread(root: Path) -> None:
    """A cache file that is not SQLite never fails a load: every file is read, as uncached."""
    cache_db(root).parent.mkdir()
    cache_db(root).write_bytes(b"not a database " * 1000)

    ws, recalled = cached_load(root)

    assert recalled == 0
    assert ws.resources == load_workspace([root]).resources


def test_a_busy_cache_database_only_costs_a_reread(root: Path) -> None:
    """When another process holds the cache's write lock, the load still succeeds; what it
    could not store is read again next time, and stored once the lock is gone."""
    cached_load(root)  # creates the database
    with sqlite3.connect(cache_db(root)) as conn:
        conn.execute("delete from manifest_entries")
    blocker = sqlite3.connect(cache_db(root), isolation_level=None)
    blocker.execute("begin immediate")
    try:
        ws, _ = cached_load(root)
    finally:
        blocker.execute("rollback")
        blocker.close()

    assert ws.resources == load_workspace([root]).resources
    assert stored_paths(root) == []
    assert cached_load(root)[1] == 0
    assert cached_load(root)[1] == 3


def test_plan_recalls_unchanged_manifests_and_sees_an_edit(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end through `batchspec plan`: once the files are older than the racy window,
    plan stores them, the next plan gives the same answer from the cache, and a same-size
    edit with the mtime restored changes the plan's spec hash."""

    def plan() -> dict[str, Any]:
        code, out, err = run_cli(["plan", str(root), "--json"], capsys)
        assert code == 0, err
        return json.loads(out)

    time.sleep(RACY_WINDOW_S + 0.1)
    first = plan()
    assert len(stored_paths(root)) == 3
    assert plan() == first

    rewrite_keeping_size_and_mtime(root / "manifests" / "sub" / "plain.yaml", "tag: aa", "tag: bb")
    edited = plan()

    hashes = [{a["resource"]: a["spec_hash"] for a in p["actions"]} for p in (first, edited)]
    assert hashes[0]["plain"] != hashes[1]["plain"]
    assert {k: v for k, v in hashes[0].items() if k != "plain"} == {
        k: v for k, v in hashes[1].items() if k != "plain"
    }


def test_a_racy_entry_verified_once_settled_is_not_read_again_by_a_later_process(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A racy entry recalled while its stamp is still racy keeps its sha256 (its bytes are
    hashed at every recall); once recalled settled and hashed the same, it is stored as
    settled, so a later process does not read it either; an edit still misses."""
    cached_load(root, racy_window=RACY_WINDOW_S)
    cached_load(root, racy_window=RACY_WINDOW_S)  # still racy: verified, not settled
    with sqlite3.connect(cache_db(root)) as conn:
        assert conn.execute("select count(sha256) from manifest_entries").fetchone()[0] == 3
    hashed: list[Path] = []
    real = manifestcache._bytes_sha256
    monkeypatch.setattr(manifestcache, "_bytes_sha256", lambda p: hashed.append(p) or real(p))
    assert cached_load(root)[1] == 3  # settled (a zero window): hashed, then marked settled
    assert len(hashed) == 3
    with sqlite3.connect(cache_db(root)) as conn:
        assert conn.execute("select count(sha256) from manifest_entries").fetchone()[0] == 0
    monkeypatch.setattr(manifestcache, "_settled_and_verified", set())  # another process
    assert cached_load(root)[1] == 3
    assert len(hashed) == 3

    plain = root / "manifests" / "sub" / "plain.yaml"
    plain.write_text(plain.read_text().replace("plain", "plaim"))
    ws, recalled = cached_load(root)
    assert recalled == 2
    assert ws.resources == load_workspace([root]).resources


def test_the_fingerprint_names_the_installed_jsonschema_without_importlib_metadata() -> None:
    """The fingerprint holds jsonschema's version (a new release may judge documents anew),
    read from its dist-info folder's name: a run imports neither importlib.metadata (its
    imports cost every run ~30 ms) nor jsonschema for it."""
    from importlib.metadata import version

    assert manifestcache._jsonschema_release() == f"jsonschema-{version('jsonschema')}.dist-info"
    code = (
        "import sys; import batchspec.cli.main; from batchspec.workspace import manifestcache; "
        "manifestcache._jsonschema_release(); "
        "print(sorted(m for m in ('importlib.metadata', 'jsonschema') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_fingerprint_falls_back_to_importlib_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without one dist-info folder beside the package, the version comes from
    importlib.metadata, so an upgrade still changes the fingerprint."""
    from importlib.metadata import version

    monkeypatch.setattr(manifestcache.os, "listdir", lambda folder: [])
    assert manifestcache._jsonschema_release() == version("jsonschema")
