"""The one blob store (storage.blobstore) and the private-file helpers (storage.private)."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from workspaces import ResourceSpec, local_provider, make_workspace, run_cli

from batchspec.storage import blobstore
from batchspec.storage.blobstore import (
    CHUNK,
    STALE_TMP_SECONDS,
    BlobFolderError,
    BlobStore,
    BlobTooLargeError,
    RawFileWriter,
    write_atomically,
    write_file_atomically,
)
from batchspec.storage.database_url import redact_url, scrub, url_password
from batchspec.storage.remote_blobs import FolderBlobs


@pytest.fixture(params=[0o000, 0o022], ids=["umask-000", "umask-022"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_put_from_files_content_under_its_sha256_privately(tmp_path: Path, umask: int) -> None:
    """A blob filed by put_from (the result store's download path) is 0600 in 0700 folders,
    even when the writer replaced the temporary file with one of its own."""
    blobs = BlobStore(tmp_path / "store")

    def download(tmp: Path) -> None:  # as RetryingClient.download does: write, then rename
        partial = tmp.with_name(tmp.name + ".part")
        partial.write_bytes(b"answer\n")
        os.replace(partial, tmp)

    sha = blobs.put_from(download)
    assert sha == hashlib.sha256(b"answer\n").hexdigest()
    assert blobs.path(sha) == tmp_path / "store" / sha[:2] / sha
    assert blobs.path(sha).read_bytes() == b"answer\n"
    assert mode(blobs.path(sha)) == 0o600
    assert {mode(p) for p in [blobs.root, *blobs.root.rglob("*")] if p.is_dir()} == {0o700}


def test_the_store_s_folders_removed_mid_run_are_made_again_private(
    tmp_path: Path, umask: int
) -> None:
    """The store no longer looks for its folders before every write: a root, temporary
    folder or ``sha[:2]`` folder removed since the last write (a user's cleanup between two
    downloads) is found missing by the write and made again, 0700, and the blob filed."""
    import shutil

    blobs = BlobStore(tmp_path / "store")
    first = blobs.put_from(lambda tmp: tmp.write_bytes(b"one\n"))
    shutil.rmtree(blobs.root)
    second = blobs.put_from(lambda tmp: tmp.write_bytes(b"two\n"))
    assert blobs.path(second).read_bytes() == b"two\n"
    shutil.rmtree(blobs.tmp_dir)
    shutil.rmtree(blobs.path(second).parent)
    with blobs.writer() as writer:
        writer.write(b"two\n")
        assert writer.commit() == second
    assert blobs.path(second).read_bytes() == b"two\n"
    assert not blobs.has(first)
    assert mode(blobs.path(second)) == 0o600
    assert {mode(p) for p in [blobs.root, *blobs.root.rglob("*")] if p.is_dir()} == {0o700}


def test_a_missing_root_beside_a_temporary_folder_elsewhere_is_made_private(
    tmp_path: Path, umask: int
) -> None:
    """A store whose writes in progress live outside its root (the engine's ``<data>/tmp``
    beside ``<data>/files``) and whose root is missing (never made, or removed) makes the
    root 0700 when it files a blob, not with the umask's mode as a plain mkdir would."""
    blobs = BlobStore(tmp_path / "files", tmp_dir=tmp_path / "tmp")
    (tmp_path / "tmp").mkdir(mode=0o700)
    sha = blobs.put_from(lambda tmp: tmp.write_bytes(b"answer\n"))
    assert blobs.path(sha).read_bytes() == b"answer\n"
    assert {mode(p) for p in [blobs.root, *blobs.root.rglob("*")] if p.is_dir()} == {0o700}


def test_a_file_where_the_store_s_temporary_folder_should_be_is_named(tmp_path: Path) -> None:
    """A file in place of the store's temporary folder: the error names that folder (the
    one to move away), not the temporary file the write would have made in it."""
    blobs = BlobStore(tmp_path / "store")
    blobs.root.mkdir()
    blobs.tmp_dir.write_bytes(b"not a folder\n")
    with pytest.raises(NotADirectoryError) as caught:
        blobs.put_from(lambda tmp: tmp.write_bytes(b"x\n"))
    assert caught.value.filename == str(blobs.tmp_dir)
    with pytest.raises(NotADirectoryError) as caught:
        blobs.writer()
    assert caught.value.filename == str(blobs.tmp_dir)


def test_a_store_folder_that_is_a_dangling_link_or_a_file_is_said_as_such(tmp_path: Path) -> None:
    """A symbolic link to nothing (or a file) where the store's folder should be: a write
    raises BlobFolderError naming the folder, what is there and what to do (not the OS's
    terse "File exists"), leaves nothing behind, and works once the folder is made."""
    root = tmp_path / "store"
    root.symlink_to(tmp_path / "gone")
    blobs = BlobStore(root)
    for attempt in (lambda: blobs.put_from(lambda tmp: tmp.write_bytes(b"x\n")), blobs.writer):
        with pytest.raises(BlobFolderError) as caught:
            attempt()
        message = str(caught.value)
        assert str(root) in message and f"symbolic link to {tmp_path / 'gone'}" in message
        assert (
            "which does not exist" in message and "run the command again" in caught.value.details[0]
        )
    assert not (tmp_path / "gone").exists()
    (tmp_path / "gone").mkdir()
    assert blobs.has(blobs.put_from(lambda tmp: tmp.write_bytes(b"x\n")))
    root.unlink()
    root.write_bytes(b"not a folder\n")
    with pytest.raises(BlobFolderError, match="it is a file, not a folder"):
        blobs.require_usable()


def test_temporary_names_differ_across_writes_and_in_a_forked_child() -> None:
    """Names of writes in progress come from a per-process prefix and a counter, not random
    bytes per file: each differs from the last, and a forked child (same prefix, same
    counter) still names its writes apart from its parent's, by its pid."""
    from batchspec.storage.blobstore import unique_name

    names = {unique_name() for _ in range(1000)}
    assert len(names) == 1000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next name, to the parent
        os.write(write, unique_name().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    os.close(read)
    assert child != unique_name()
    assert child.rsplit("-", 2)[0] == unique_name().rsplit("-", 2)[0]  # the same prefix


def test_a_streamed_write_is_hashed_counted_and_deduplicated(tmp_path: Path) -> None:
    """The streaming writer names the blob by its sha256, counts its size, and filing the same
    content twice keeps one blob and leaves no temporary file."""
    blobs = BlobStore(tmp_path / "files", tmp_dir=tmp_path / "tmp")
    shas = []
    for _ in range(2):
        with blobs.writer() as writer:
            writer.write(b"abc")
            writer.write(b"def")
            shas.append(writer.commit())
        assert writer.size == 6
    assert shas[0] == shas[1] == hashlib.sha256(b"abcdef").hexdigest()
    assert blobs.size(shas[0]) == 6
    assert list((tmp_path / "tmp").iterdir()) == []
    blobs.remove(shas[0])
    assert not blobs.has(shas[0])


def test_a_capped_write_stops_at_the_cap_and_leaves_nothing(tmp_path: Path) -> None:
    """Passing max_bytes raises (the default error or the caller's) and drops the partial file."""
    blobs = BlobStore(tmp_path / "files", tmp_dir=tmp_path / "tmp")
    writer = blobs.writer(max_bytes=4)
    writer.write(b"1234")
    with pytest.raises(BlobTooLargeError) as caught:
        writer.write(b"5")
    assert caught.value.limit == 4
    assert list((tmp_path / "tmp").iterdir()) == []

    class Refused(Exception):
        pass

    with pytest.raises(Refused):
        blobs.writer(max_bytes=1, too_large=lambda limit: Refused(limit)).write(b"12")


def test_a_failed_atomic_write_names_the_file_asked_for_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    """A folder where the result file goes (or a full disk) fails naming that file, not the
    hidden temporary file, and leaves nothing behind."""
    dest = tmp_path / "results" / "a.jsonl"
    dest.mkdir(parents=True)
    with pytest.raises(IsADirectoryError) as caught:
        write_atomically(dest, lambda tmp: tmp.write_bytes(b"x\n"))
    assert caught.value.filename == str(dest)

    def full_disk(tmp: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as caught:
        write_atomically(tmp_path / "b.jsonl", full_disk)
    assert caught.value.filename == str(tmp_path / "b.jsonl")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.jsonl", "results"]


def test_write_atomically_makes_a_missing_folder_and_names_the_file_when_a_folder_is_a_file(
    tmp_path: Path,
) -> None:
    """The result file's folder is made when it is missing (it is not asked for before each
    write); a file where a folder of the path should be fails naming the result file."""
    dest = tmp_path / "new" / "deeper" / "a.jsonl"
    write_atomically(dest, lambda tmp: tmp.write_bytes(b"x\n"))
    assert dest.read_bytes() == b"x\n"
    (tmp_path / "plain").write_bytes(b"")
    for blocked in (tmp_path / "plain" / "a.jsonl", tmp_path / "plain" / "sub" / "a.jsonl"):
        with pytest.raises(OSError) as caught:
            write_atomically(blocked, lambda tmp: tmp.write_bytes(b"x\n"))
        assert caught.value.filename == str(blocked)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "plain"]


def test_a_file_name_near_the_filesystem_limit_is_written_atomically(tmp_path: Path) -> None:
    """A 250-byte result file name is writable: the temporary file's name stays under the
    255-byte limit too (it used to add 38 bytes to the whole name and fail, after the batch
    had been paid for)."""
    dest = tmp_path / ("r" * 244 + ".jsonl")
    write_atomically(dest, lambda tmp: tmp.write_bytes(b"x\n"))
    assert dest.read_bytes() == b"x\n"


def test_write_atomically_gives_the_user_s_file_the_umask_mode(tmp_path: Path, umask: int) -> None:
    """A result file in the workspace is 0666 & ~umask, like any file the user creates."""
    dest = tmp_path / "results" / "out.jsonl"
    write_atomically(dest, lambda tmp: tmp.write_bytes(b"x\n"))
    assert dest.read_bytes() == b"x\n"
    assert mode(dest) == 0o666 & ~umask
    assert [p.name for p in dest.parent.iterdir()] == ["out.jsonl"]


def test_a_failed_put_leaves_no_blob_and_no_partial_file(tmp_path: Path) -> None:
    """A download that dies half way (the writer raises) files nothing under any sha256 and
    leaves no partial file behind: a half result file is never taken for a whole one."""
    blobs = BlobStore(tmp_path / "store")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b'{"custom_id": "a"}\n{"custom_')
        raise ConnectionError("reset mid-download")

    with pytest.raises(ConnectionError):
        blobs.put_from(half_then_fail)

    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []


def test_an_unfinished_streamed_write_is_discarded_on_exit(tmp_path: Path) -> None:
    """A streamed write left without ``commit`` (an upload whose client vanished) is dropped
    when its ``with`` block ends: nothing is filed and no temporary file stays."""
    blobs = BlobStore(tmp_path / "store")
    with blobs.writer() as writer:
        writer.write(b"part of a body")
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []


def test_a_failed_rewrite_keeps_the_previous_result_file_whole(tmp_path: Path) -> None:
    """Rewriting a result file that fails half way leaves the old file byte for byte and no
    temporary sibling: users never read half a results file, nor lose the last good one."""
    dest = tmp_path / "results" / "out.jsonl"
    write_atomically(dest, lambda tmp: tmp.write_bytes(b"old\n"))

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(dest, half_then_fail)

    assert dest.read_bytes() == b"old\n"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.jsonl"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            "postgresql://ci@db/x?sslmode=require&password=hunter2",
            "postgresql://ci@db/x?sslmode=require&password=***",
            id="password-in-query",
        ),
        pytest.param("postgresql://ci:hunter2@[::1/x", "postgresql://***", id="unparseable"),
    ],
)
def test_a_password_outside_the_userinfo_is_hidden_too(url: str, shown: str) -> None:
    """A state URL's password in its query, or in a URL too broken to parse, never reaches a
    message: the query's password is masked, an unparseable URL is shown as scheme only."""
    assert redact_url(url) == shown
    assert "hunter2" not in scrub(f"could not connect to {url}", url)


def test_password_is_read_from_the_query_and_scrub_without_url_is_a_no_op() -> None:
    """``url_password`` finds a query password (decoded), and the password of a URL whose host
    does not parse (so messages about that bad URL can still scrub it); with no URL, scrub
    leaves text be."""
    assert url_password("postgresql://ci@db/x?password=p%40ss") == "p@ss"
    assert url_password("postgresql://ci@db/x?sslmode=require") is None
    assert url_password("postgresql://ci:pw@[::1/x") == "pw"
    assert scrub("text with p@ss", None) == "text with p@ss"


def _part(folder: Path, name: str, age: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / name
    part.write_bytes(b"half a download")
    then = time.time() - age
    os.utime(part, (then, then))
    return part


def test_a_killed_writers_leftovers_are_swept_from_a_shared_folder_and_live_writes_kept(
    tmp_path: Path,
) -> None:
    """A runner killed mid-download leaves `tmp/part-*` in a blob folder other runners share:
    the next runner to open the folder drops what nobody has touched for a day, and keeps a
    write another runner has in progress (fresh) and files that are not parts."""
    root = tmp_path / "shared"
    stale = _part(root / "tmp", "part-" + "a" * 32, STALE_TMP_SECONDS + 60)
    fresh = _part(root / "tmp", "part-" + "b" * 32, 60)
    other = _part(root / "tmp", "notes.txt", STALE_TMP_SECONDS + 60)
    with BlobStore(root).writer() as live:
        live.write(b"in progress")
        FolderBlobs(root)
        assert live.tmp_path.exists()
        live.commit()
    assert (stale.exists(), fresh.exists(), other.exists()) == (False, True, True)


def test_an_apply_sweeps_a_killed_runs_leftovers_from_the_state_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same for the state's own store: an apply drops a killed run's stale part, and
    keeps a fresh one (another apply on this machine may be writing it)."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("triage", count=2, provider="here")],
    )
    assert run_cli(["apply", str(ws.root), "--wait", "--poll-interval", "0.05"], capsys)[0] == 0
    tmp = ws.state_path.parent / "store" / "tmp"
    stale = _part(tmp, "part-" + "c" * 32, STALE_TMP_SECONDS + 60)
    fresh = _part(tmp, "part-" + "d" * 32, 5)
    assert run_cli(["apply", str(ws.root)], capsys)[0] == 0
    assert (stale.exists(), fresh.exists()) == (False, True)


def test_write_file_atomically_fills_the_file_it_created_and_drops_it_on_failure(
    tmp_path: Path,
) -> None:
    """``write_file_atomically`` hands ``fill`` the temporary file it created (no second
    open); a failure half way keeps the old file whole, leaves no temporary sibling and names
    the result file; small writes and a write past CHUNK come out in order."""
    dest = tmp_path / "results" / "out.jsonl"
    big = b"y" * (CHUNK + 3)
    write_file_atomically(dest, lambda out: (out.write(b"a\n"), out.write(big), out.write(b"z")))
    assert dest.read_bytes() == b"a\n" + big + b"z"

    def half_then_full_disk(out: RawFileWriter) -> None:
        out.write(b"new, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as caught:
        write_file_atomically(dest, half_then_full_disk)
    assert caught.value.filename == str(dest)
    assert dest.read_bytes() == b"a\n" + big + b"z"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.jsonl"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_write_error_reported_only_at_close_keeps_the_old_result_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that reports a failed write only when the file is closed (NFS: a quota
    or a full disk, found as the dirty pages are flushed at close) leaves the old result
    file in place: the temporary file is closed, and its error raised, before the rename."""
    dest = tmp_path / "results" / "out.jsonl"
    write_file_atomically(dest, lambda out: out.write(b"old\n"))
    real_close = os.close

    def quota_at_close(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        real_close(fd)
        if target.startswith(str(dest.parent)):
            raise OSError(122, "Disk quota exceeded")

    monkeypatch.setattr(os, "close", quota_at_close)
    with pytest.raises(OSError, match="Disk quota exceeded") as caught:
        write_file_atomically(dest, lambda out: out.write(b"new, not on the server\n"))
    monkeypatch.undo()

    assert caught.value.filename == str(dest)
    assert dest.read_bytes() == b"old\n"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.jsonl"]


def test_a_temporary_name_already_taken_is_passed_over(tmp_path: Path) -> None:
    """Temporary names are a per-process prefix and a counter (no getrandom per file): a
    name some other file already holds is never written into (O_EXCL), the next is taken."""
    dest = tmp_path / "out.jsonl"
    write_atomically(dest, lambda tmp: tmp.write_bytes(b"1\n"))
    prefix, pid, count = blobstore.unique_name().rsplit("-", 2)
    taken = tmp_path / f".out.jsonl.{prefix}-{pid}-{int(count) + 2}.tmp"
    taken.write_bytes(b"someone else's\n")
    write_atomically(dest, lambda tmp: tmp.write_bytes(b"2\n"))
    write_atomically(dest, lambda tmp: tmp.write_bytes(b"3\n"))
    assert dest.read_bytes() == b"3\n"
    assert taken.read_bytes() == b"someone else's\n"


def test_whole_file_reads_and_result_writes_use_no_buffered_file_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing a file (``sha256_file``), writing a result file (``write_file_atomically``),
    reading a manifest (``read_bounded``) and scanning an input go through descriptors or an
    unbuffered file: a buffered file object's fstat, isatty ioctl and lseeks were most of
    the syscalls the apply's main thread made per resource (each a GIL hand-off)."""
    import builtins
    import io

    from batchspec.wire.inputs import file_sha256, scan_batch_input
    from batchspec.workspace.yamldoc import read_bounded

    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    (tmp_path / "in.jsonl").write_bytes(line)
    (tmp_path / "m.yaml").write_bytes(b"a: 1\n")
    real_open = builtins.open

    def unbuffered_only(file: object, mode: str = "r", buffering: int = -1, **kw: object) -> object:
        assert buffering == 0, f"a buffered open of {file}"
        return real_open(file, mode, buffering, **kw)  # type: ignore[call-overload]

    def no_file_object(*args: object, **kwargs: object) -> object:
        raise AssertionError("a file object was opened")

    monkeypatch.setattr(builtins, "open", unbuffered_only)
    monkeypatch.setattr(io, "open", unbuffered_only)
    monkeypatch.setattr(os, "fdopen", no_file_object)
    monkeypatch.setattr(Path, "open", no_file_object)
    out = tmp_path / "out.jsonl"
    write_file_atomically(out, lambda f: f.write(b"x\n"))
    assert blobstore.sha256_file(out) == hashlib.sha256(b"x\n").hexdigest()
    assert read_bounded(tmp_path / "m.yaml", 100) == b"a: 1\n"
    assert file_sha256(tmp_path / "in.jsonl") == hashlib.sha256(line).hexdigest()
    report = scan_batch_input(tmp_path / "in.jsonl")
    assert (report.requests, report.bytes) == (1, len(line))
