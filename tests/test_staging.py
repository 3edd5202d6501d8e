"""Staged inputs (the file half of the anthropic and gemini providers): what is found, what
is refused, and what a failed copy leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchspec.providers.base import RemoteNotFound
from batchspec.providers.staging import (
    StagedInputs,
    Staging,
    read_records,
    results_file_id,
)


class Staged(StagedInputs):
    """The staging half as a provider has it; its results are the batch's name, one line."""

    def __init__(self, root: Path) -> None:
        self.name = "p"
        self._staging = Staging(root)

    def _download_results(self, batch: str, succeeded: bool, dest: Path) -> int:
        dest.write_text(json.dumps({"batch": batch, "succeeded": succeeded}) + "\n")
        return dest.stat().st_size


def test_an_input_is_staged_once_by_content_and_read_back_whole(tmp_path: Path) -> None:
    """Two uploads of the same bytes share one staged copy; downloading it returns the bytes
    the create will send, whatever the upload was called."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"custom_id": "a"}\n')
    staged = Staged(tmp_path / "data")
    first = staged.upload_file(source, filename="one.jsonl")
    second = staged.upload_file(source, filename="two.jsonl")

    assert first.id == second.id and first.bytes == len(source.read_bytes())
    assert staged.get_file(first.id).bytes == first.bytes
    assert staged.download_file(first.id, tmp_path / "back.jsonl") == first.bytes
    assert (tmp_path / "back.jsonl").read_bytes() == source.read_bytes()
    assert [p.suffix for p in (tmp_path / "data" / "files").iterdir()] == [".jsonl"]


@pytest.mark.parametrize(
    "file_id", ["file-abc", "staged-../../etc/passwd", "staged-a/b", "staged-" + "0" * 64]
)
def test_an_id_that_is_not_a_staged_file_is_not_found(tmp_path: Path, file_id: str) -> None:
    """Ids without the staged prefix, with a slash (a path out of the folder) or of a file
    removed after its batch was made are "not found", so the input is staged again."""
    staged = Staged(tmp_path / "data")
    with pytest.raises(RemoteNotFound):
        staged.get_file(file_id)
    with pytest.raises(RemoteNotFound):
        staged.download_file(file_id, tmp_path / "x.jsonl")


def test_a_failed_copy_leaves_no_partial_staged_file(tmp_path: Path) -> None:
    """Staging an input that cannot be read leaves nothing in the folder: a partial copy
    would otherwise be sent as the batch."""
    staging = Staging(tmp_path / "data")
    with pytest.raises(FileNotFoundError):
        staging.stage(tmp_path / "missing.jsonl")
    assert list((tmp_path / "data" / "files").iterdir()) == []


def test_results_files_are_offered_per_part_and_others_refused(tmp_path: Path) -> None:
    """``results:<succeeded|failed>:<batch>`` reads that part of that batch; any other part,
    or no batch, is not found rather than read as something else."""
    staged = Staged(tmp_path / "data")
    dest = tmp_path / "out.jsonl"
    staged.download_file(results_file_id("failed", "b-1"), dest)
    assert json.loads(dest.read_text()) == {"batch": "b-1", "succeeded": False}
    staged.download_file(results_file_id("succeeded", "b-1"), dest)
    assert json.loads(dest.read_text()) == {"batch": "b-1", "succeeded": True}
    for bad in (results_file_id("errored", "b-1"), results_file_id("succeeded", "")):
        with pytest.raises(RemoteNotFound):
            staged.download_file(bad, dest)


def test_read_records_skips_what_cannot_be_joined(tmp_path: Path) -> None:
    """Blank, unparseable and non-object lines are skipped (their requests stay unresolved and
    are retried); every object is read in order."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \nnot json\n[1, 2]\n{"b": 2}\n')
    assert list(read_records(path)) == [{"a": 1}, {"b": 2}]


def test_staged_inputs_and_the_journal_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """A provider's data folder holds full requests (staged inputs) and its journal of
    creates, beside the state: folders 0700 and files 0600 even with umask 0 (a
    world-writable files/ let another user swap a staged input before its create read it)."""
    import os
    import stat

    from batchspec.providers.journal import Journal

    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"custom_id": "a"}\n')
    old = os.umask(0)
    try:
        Staged(tmp_path / "data").upload_file(source, filename="in.jsonl")
        Journal(tmp_path / "data").close()
    finally:
        os.umask(old)
    found = [tmp_path / "data", *(tmp_path / "data").rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in found if p.is_dir()} == {0o700}
    assert {stat.S_IMODE(p.stat().st_mode) for p in found if p.is_file()} == {0o600}
