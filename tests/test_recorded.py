"""``core.recorded.observe_disk``: how a run sees its result files on disk.

A run's plans (each resource's after its step, the end-of-run plan, the statuses) hash each
unchanged result file once (``DiskHashes``), and still see every change made between them.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import pytest
from workspaces import ResourceSpec, local_provider, make_workspace, run_cli

from batchspec.core import recorded
from batchspec.core.plan import RecordedGeneration, RecordedResource
from batchspec.core.recorded import DiskHashes, DiskLook, observe_disk, remember_written
from batchspec.storage.blobstore import sha256_file, write_file_atomically


def _written(name: str) -> dict[str, RecordedResource]:
    gen = RecordedGeneration(1, "h", "complete", 1, output_sha256="x")
    return {name: RecordedResource(name, "p", generations=(gen,))}


def test_a_file_changed_in_place_with_the_same_size_is_hashed_again(tmp_path: Path) -> None:
    """A hash kept for a file is not taken once the file was written again, even with the
    same size and the same mtime: its ctime moved; a file gone is None."""
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    out.write_text("aaaa\n")
    hashes: DiskHashes = {}
    first = observe_disk([("r", out, err)], _written("r"), hashes=hashes)["r"]
    assert first.output_sha256 == sha256_file(out) and first.errors_sha256 is None
    mtime = out.stat().st_mtime_ns
    out.write_text("bbbb\n")
    os.utime(out, ns=(mtime, mtime))  # same size, same mtime: only the ctime tells

    again = observe_disk([("r", out, err)], _written("r"), hashes=hashes)["r"]

    assert again.output_sha256 == sha256_file(out) != first.output_sha256
    out.unlink()
    assert observe_disk([("r", out, err)], _written("r"), hashes=hashes)["r"].output_sha256 is None


def test_an_apply_hashes_each_unchanged_result_file_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An apply that collects and writes results never reads them back to hash them (their
    hashes were taken as they were written), though the step's plan, the end-of-run plan
    and the statuses all look at them; the next apply hashes each once in all."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"srv": local_provider()},
        resources=[ResourceSpec("a"), ResourceSpec("b")],
    )
    hashed: Counter[str] = Counter()

    def counted(path: Path) -> str:
        hashed[Path(path).name] += 1
        return sha256_file(path)

    monkeypatch.setattr(recorded, "sha256_file", counted)

    assert (
        run_cli(["apply", str(ws.root), "--yes", "--wait", "--poll-interval", "0.05"], capsys)[0]
        == 0
    )
    assert not hashed, hashed

    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert len(hashed) == 4 and set(hashed.values()) == {1}, hashed


def test_a_result_file_the_run_wrote_is_not_read_back_but_a_change_after_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash of a file the run wrote (``write_file_atomically``'s stat, kept by
    ``remember_written``) is taken without reading the file; written again in place since,
    with the same size and mtime, it is read and hashed again (its ctime moved)."""
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    hashes: DiskHashes = {}
    for path, content in ((out, b"aaaa\n"), (err, b"")):
        st = write_file_atomically(path, lambda f, content=content: f.write(content))
        assert st is not None
        remember_written(hashes, path, hashlib.sha256(content).hexdigest(), st)
    read: list[str] = []

    def counted(path: Path) -> str:
        read.append(Path(path).name)
        return sha256_file(path)

    monkeypatch.setattr(recorded, "sha256_file", counted)
    first = observe_disk([("r", out, err)], _written("r"), hashes=hashes)["r"]
    assert first.output_sha256 == hashlib.sha256(b"aaaa\n").hexdigest()
    assert first.errors_sha256 == hashlib.sha256(b"").hexdigest()
    assert read == []
    mtime = out.stat().st_mtime_ns
    out.write_bytes(b"bbbb\n")
    os.utime(out, ns=(mtime, mtime))  # same size, same mtime: only the ctime tells
    again = observe_disk([("r", out, err)], _written("r"), hashes=hashes)["r"]
    assert again.output_sha256 == hashlib.sha256(b"bbbb\n").hexdigest()
    assert read == ["out.jsonl"]


def test_plans_made_back_to_back_look_at_each_result_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two observations sharing a ``DiskLook`` (apply's end-of-run plan and its statuses)
    stat each result file once between them and answer alike; without one, each stats."""
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    out.write_text("aaaa\n")
    hashes: DiskHashes = {}
    observe_disk([("r", out, err)], _written("r"), hashes=hashes)
    stats: Counter[str] = Counter()
    real_stat = Path.stat

    def counted(self: Path, **kwargs: bool) -> os.stat_result:
        stats[self.name] += 1
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", counted)
    look: DiskLook = {}
    first = observe_disk([("r", out, err)], _written("r"), hashes=hashes, look=look)
    second = observe_disk([("r", out, err)], _written("r"), hashes=hashes, look=look)
    assert first == second and first["r"].output_sha256 == sha256_file(out)
    assert stats == {"out.jsonl": 1, "err.jsonl": 1}
    observe_disk([("r", out, err)], _written("r"), hashes=hashes)
    assert stats == {"out.jsonl": 2, "err.jsonl": 2}
