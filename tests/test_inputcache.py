"""The input cache: `plan` on unchanged inputs does not read them again, and any change is seen.

"Not read" is observed from outside the process: the kernel's inotify reports every open of
the input file, whoever does it. (Making the file unreadable would prove nothing when tests
run as root, and timing would be flaky.) An edit that keeps the size and puts the old mtime
back must still be noticed: the cache key also holds the ctime and the inode.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from workspaces import ResourceSpec, Workspace, local_provider, make_workspace, run_cli

from batchspec.wire import inputs as inputs_module
from batchspec.wire.inputs import scan_batch_input
from batchspec.workspace.inputcache import RACY_WINDOW_S, InputCache

IN_ACCESS = 0x001
IN_OPEN = 0x020
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (+ name)


class OpenWatch:
    """inotify on one file: ``opened()`` says whether it was opened since the last call."""

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            pytest.skip("inotify is Linux-only")
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip("inotify is not available here")
        if libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN | IN_ACCESS) < 0:
            os.close(self.fd)
            pytest.skip("cannot watch the input file with inotify")

    def opened(self) -> bool:
        masks = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                _, mask, _, name_len = _EVENT.unpack_from(data, offset)
                masks.append(mask)
                offset += _EVENT.size + name_len
        return any(mask & (IN_OPEN | IN_ACCESS) for mask in masks)

    def close(self) -> None:
        os.close(self.fd)


def new_workspace(root: Path) -> Workspace:
    return make_workspace(
        root,
        providers={"here": local_provider()},
        resources=[ResourceSpec("cached", count=50, provider="here")],
    )


@pytest.fixture(scope="module")
def aged_workspaces(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[Workspace]:
    """One fresh workspace for each of this module's tests that takes ``workspace``, all
    written first, then aged past the racy window by one sleep instead of one per test."""
    wanted = [
        item
        for item in request.session.items
        if item.module is request.module and "workspace" in getattr(item, "fixturenames", ())
    ]
    pool = [new_workspace(tmp_path_factory.mktemp("ws")) for _ in wanted]
    time.sleep(RACY_WINDOW_S + 0.1)  # a just-written input is never remembered (racy window)
    return pool


@pytest.fixture
def workspace(aged_workspaces: list[Workspace], tmp_path: Path) -> Workspace:
    """A workspace of its own, with one 50-request input older than the racy window."""
    if aged_workspaces:
        return aged_workspaces.pop()
    ws = new_workspace(tmp_path / "ws")  # more tests than counted (e.g. a rerun)
    time.sleep(RACY_WINDOW_S + 0.1)
    return ws


@pytest.fixture
def watch(workspace: Workspace) -> Iterator[OpenWatch]:
    w = OpenWatch(workspace.input_path("cached"))
    yield w
    w.close()


def plan_json(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def spec_hash(plan: dict[str, object]) -> str:
    [action] = plan["actions"]  # type: ignore[index]
    return action["spec_hash"]  # type: ignore[index]


def cache_rows(ws: Workspace) -> list[tuple[object, ...]]:
    db = ws.state_path.parent / "input-cache.db"
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "select path, size, mtime_ns, ctime_ns, inode from input_scans7"
        ).fetchall()


def rewrite_keeping_size_and_mtime(path: Path, old: bytes, new: bytes) -> None:
    assert len(old) == len(new)
    before = path.stat()
    data = path.read_bytes()
    assert data.count(old) == 1
    with path.open("r+b") as f:  # in place: same inode
        f.write(data.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )


def test_a_warm_plan_does_not_open_the_input(
    workspace: Workspace, watch: OpenWatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first plan reads the input (seen by inotify) and caches its scan keyed by size,
    mtime, ctime and inode; a second plan on the unchanged file never opens it and plans
    the same."""
    first = plan_json(workspace, capsys)
    assert watch.opened()
    st = workspace.input_path("cached").stat()
    [row] = cache_rows(workspace)
    assert row[1:] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    second = plan_json(workspace, capsys)

    assert not watch.opened()
    assert second["actions"] == first["actions"]


def test_an_edit_with_the_same_size_and_mtime_is_seen(
    workspace: Workspace, watch: OpenWatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Changing a request in place without changing the file's size, then restoring its
    mtime, still invalidates the cache: plan reads the file again and the spec hash moves."""
    before = spec_hash(plan_json(workspace, capsys))
    path = workspace.input_path("cached")
    rewrite_keeping_size_and_mtime(path, b"item 17.", b"item 71.")
    watch.opened()  # forget our own write
    time.sleep(RACY_WINDOW_S + 0.1)  # so that the new scan may be remembered

    after = plan_json(workspace, capsys)

    assert watch.opened()
    assert spec_hash(after) != before
    [row] = cache_rows(workspace)
    assert row[3] == path.stat().st_ctime_ns
    plan_json(workspace, capsys)
    assert not watch.opened()  # warm again


def test_a_touch_rereads_but_keeps_the_spec_hash(
    workspace: Workspace, watch: OpenWatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new mtime with the same content is re-read (the cache cannot know it is the same)
    and gives the same spec hash: the hash is of the content, never of the file's times."""
    before = spec_hash(plan_json(workspace, capsys))
    path = workspace.input_path("cached")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    watch.opened()

    after = plan_json(workspace, capsys)

    assert watch.opened()
    assert spec_hash(after) == before


def test_a_just_written_input_is_recalled_only_while_its_bytes_are_that_content(
    tmp_path: Path,
) -> None:
    """A file scanned within the racy window of its last change is kept marked ``verify``:
    recalled while its bytes still hash to the report's sha256 (a same-tick rewrite that
    kept the stamp, forged here by changing the stored sha256, is scanned again), and
    trusted on its stamp once it is older than the window."""
    source = one_request_input(tmp_path)
    db = tmp_path / "input-cache.db"
    with InputCache(db) as cache:
        expected = cache.scan(source)
    with sqlite3.connect(db) as conn:
        assert conn.execute("select verify from input_scans7").fetchall() == [(1,)]
    with InputCache(db) as cache:
        assert cache.scan(source) == expected

    with sqlite3.connect(db) as conn:
        data = json.loads(conn.execute("select report from input_scans7").fetchone()[0])
        conn.execute("update input_scans7 set report = ?", (json.dumps({**data, "sha256": "0"}),))
    with InputCache(db) as cache:
        assert cache.scan(source) == expected  # scanned again: the stored content was another
    with InputCache(db, racy_window=0) as cache:
        cache.scan(source)
    with sqlite3.connect(db) as conn:
        assert conn.execute("select verify from input_scans7").fetchall() == [(0,)]


def test_an_invalid_input_is_never_cached(
    workspace: Workspace, watch: OpenWatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file with problems is scanned again on every plan, so its problems are reported in
    full each time, and nothing is stored for it."""
    path = workspace.input_path("cached")
    path.write_bytes(path.read_bytes() + b"{not json\n")
    watch.opened()

    for _ in range(2):
        code, out, err = run_cli(["plan", str(workspace.root)], capsys)
        assert code == 1
        assert ":51" in err  # the bad line, located
        assert watch.opened()
    assert cache_rows(workspace) == []


def one_request_input(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    line = {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    path.write_text(json.dumps(line) + "\n")
    return path


@pytest.mark.parametrize("damage", ["garbage-file", "folder-is-a-file"])
def test_an_unusable_cache_database_only_costs_a_reread(tmp_path: Path, damage: str) -> None:
    """A cache file that is not SQLite, or a cache folder that cannot be made, never fails the
    run: the scan is done as if there were no cache."""
    source = one_request_input(tmp_path)
    if damage == "garbage-file":
        db = tmp_path / "state" / "input-cache.db"
        db.parent.mkdir()
        db.write_bytes(b"not a database " * 1000)
    else:
        (tmp_path / "state").write_text("a file where the state folder should be")
        db = tmp_path / "state" / "input-cache.db"

    with InputCache(db) as cache:
        report = cache.scan(source)

    assert report.ok and report.requests == 1
    assert report.sha256 == scan_batch_input(source).sha256


def test_an_entry_from_another_version_is_scanned_again(tmp_path: Path) -> None:
    """A cached report that no longer fits ``InputReport`` (written by another version) is
    ignored and the file is scanned again, instead of failing every plan."""
    source = one_request_input(tmp_path)
    db = tmp_path / "input-cache.db"
    with InputCache(db) as cache:
        expected = cache.scan(source)
    with sqlite3.connect(db) as conn:
        conn.execute("update input_scans7 set report = ?", (json.dumps({"sha256": "stale"}),))

    with InputCache(db) as cache:
        again = cache.scan(source)

    assert again == expected


def test_the_entries_of_inputs_gone_are_dropped_when_a_run_stores_new_ones(
    tmp_path: Path,
) -> None:
    """An entry carries a small input's whole request index: inputs named anew each run (a
    dated file, a temporary checkout) must not grow the cache without end. Once a file is
    gone, its entries are dropped by the next run that stores an entry; the others stay."""
    db = tmp_path / "input-cache.db"
    first, second, third = (tmp_path / f"{n}.jsonl" for n in ("a", "b", "c"))
    for path in (first, second, third):
        path.write_bytes(one_request_input(tmp_path).read_bytes())
    with InputCache(db, racy_window=0) as cache:
        cache.scan(first)
        cache.scan(second)
    first.unlink()
    with InputCache(db, racy_window=0) as cache:
        cache.scan(third)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select path, request_index is not null from input_scans7")
        kept = sorted((Path(p).name, bool(indexed)) for p, indexed in rows.fetchall())
    assert kept == [("b.jsonl", True), ("c.jsonl", True)]


def test_stored_inputs_are_recalled_and_new_or_changed_ones_scanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside the inputs a cache holds (recalled unread: their keys are looked up once a
    run), a new input is scanned, and so is a stored one written since."""
    from batchspec.workspace import inputcache

    db = tmp_path / "input-cache.db"
    stored, new = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (stored, new):
        path.write_bytes(one_request_input(tmp_path).read_bytes())
    with InputCache(db, racy_window=0) as cache:
        cache.scan(stored)
    scanned: list[str] = []
    real = inputcache.scan_batch_input

    def counted(path: Path, **options: object) -> object:
        scanned.append(Path(path).name)
        return real(path, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(inputcache, "scan_batch_input", counted)
    with InputCache(db, racy_window=0) as cache:
        assert cache.scan(stored).ok and cache.scan(new).ok
    assert scanned == ["b.jsonl"]
    stored.write_bytes(stored.read_bytes().replace(b'"r1"', b'"r2"'))
    with InputCache(db, racy_window=0) as cache:
        assert cache.scan(stored).ok
    assert scanned == ["b.jsonl", "a.jsonl"]


def test_an_input_is_keyed_by_its_resolved_path_whatever_links_lead_to_it(tmp_path: Path) -> None:
    """Folders are resolved once a run, yet each input's key is still ``Path.resolve()``'s:
    through a linked folder, and a file that is itself a link, to another folder's file."""
    real, other = tmp_path / "real", tmp_path / "other"
    real.mkdir()
    other.mkdir()
    (tmp_path / "linked").symlink_to(real)
    (other / "b.jsonl").write_bytes(one_request_input(tmp_path).read_bytes())
    (real / "a.jsonl").write_bytes(one_request_input(tmp_path).read_bytes())
    (real / "b.jsonl").symlink_to(other / "b.jsonl")
    with InputCache(tmp_path / "input-cache.db") as cache:
        for path in (tmp_path / "linked" / "a.jsonl", tmp_path / "linked" / "b.jsonl"):
            assert cache._resolved(path) == str(path.resolve())
        assert cache._resolved(tmp_path / "linked" / "b.jsonl") == str(other / "b.jsonl")


def test_a_report_is_stored_as_asdict_would_write_it(tmp_path: Path) -> None:
    """report_json (the stored form, without asdict's deep copy when nothing is nested) is
    byte for byte json.dumps(asdict(report)), for a clean report and one with problems, and a
    clean one reads back equal."""
    from dataclasses import asdict

    from batchspec.workspace.inputcache import _report, report_json

    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "é"}]},
    }
    clean, broken = tmp_path / "clean.jsonl", tmp_path / "broken.jsonl"
    clean.write_text(json.dumps(line) + "\n" + json.dumps({**line, "custom_id": "b"}) + "\n")
    broken.write_text(json.dumps(line) + "\nnot json\n" + json.dumps(line) + "\n")
    for path in (clean, broken):
        report = scan_batch_input(path, endpoint="/v1/chat/completions")
        assert report_json(report) == json.dumps(asdict(report))
    report = scan_batch_input(clean, endpoint="/v1/chat/completions")
    assert report.ok and report.models == ("m",) and _report(report_json(report)) == report
    assert not scan_batch_input(broken, endpoint="/v1/chat/completions").ok


def test_a_clean_scan_cached_before_sampling_checks_is_not_taken_for_a_refused_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input scanned clean by the release before ``stream`` and out-of-range sampling
    parameters were refused (``request_checks.sampling_problem``), and unchanged since, is
    scanned again by this one and refused: the cache kept its table, so an upgraded plan
    took the old clean report, said the input was valid and apply uploaded it (every such
    request failed, or streamed, at the provider). The old entry is made here as that
    release made it: a scan without the check, in its table (``input_scans6``)."""
    source = one_request_input(tmp_path)
    line = json.loads(source.read_text())
    line["body"]["stream"] = True
    source.write_text(json.dumps(line) + "\n")
    db = tmp_path / "input-cache.db"
    monkeypatch.setattr(inputs_module, "sampling_problem", lambda body, **_: None)
    with InputCache(db) as cache:
        assert cache.scan(source).ok  # what that release found
    with sqlite3.connect(db) as conn:
        [table] = conn.execute(
            "select name from sqlite_master where type = 'table' and name like 'input_scans%'"
        ).fetchone()
        if table != "input_scans6":
            conn.execute(f"alter table {table} rename to input_scans6")
    monkeypatch.undo()

    with InputCache(db) as cache:
        report = cache.scan(source)

    assert [p.code for p in report.problems] == ["streamed_request"]


def test_the_request_checks_and_the_input_scan_cache_change_together() -> None:
    """Cached clean scans were made by the request checks of their day: a check added or
    widened while the cache kept its table lets every unchanged input it would refuse pass
    (the test above). On a change, rename the table in workspace/inputcache.py
    (input_scansN+1, the old one in ``_OLD_TABLES``) and record both here."""
    import hashlib

    from batchspec.wire import request_checks
    from batchspec.workspace import inputcache

    rules = json.dumps(
        [sorted(request_checks.REQUEST_CHECK_CODES), request_checks._SAMPLING], sort_keys=True
    )
    assert hashlib.sha256(rules.encode()).hexdigest()[:16] == "e4580d0be86b8a8c"
    assert "create table if not exists input_scans7 " in inputcache._SCHEMA
