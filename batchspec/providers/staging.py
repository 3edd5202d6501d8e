"""Staged inputs for providers that take no file upload (``anthropic``, ``gemini``).

Message Batches take their requests inline and Gemini's create decides between inline
requests and a file, so ``upload_file`` only *stages* the input locally and the create reads
it back. Layout under the provider's data folder::

    files/<sha256>.jsonl    an input as "uploaded": a copy, named by its content's sha256

A staged file is complete and its name is its content's sha256 (written to a temporary
name, hashed while copied, renamed into place); its file id is ``staged-<sha256>``. It is
removed once its batch exists. ``StagedInputs`` is the ``upload_file`` / ``get_file`` /
``download_file`` part of the ``Provider`` protocol both providers share; results are
offered as files ``results:<succeeded|failed>:<batch>``, and ``read_records`` reads the JSONL
the providers download them through, leniently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchspec.providers.base import RemoteBatch, RemoteFile, RemoteNotFound, UploadProgress
from batchspec.storage.private import ensure_private_dir

STAGED_PREFIX = "staged-"
RESULTS_PREFIX = "results:"
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StagedFile:
    id: str
    path: Path
    size: int
    created_at: int


class Staging:
    """Content-addressed copies of inputs under ``root/files``."""

    def __init__(self, root: Path) -> None:
        self.folder = root / "files"

    def stage(self, source: Path) -> StagedFile:
        """Copy ``source`` in (hashing as it streams); an identical copy is reused."""
        # full requests, as private as the state, and no one else's to swap before the create
        ensure_private_dir(self.folder.parent)
        ensure_private_dir(self.folder)
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(dir=self.folder, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            file_id = STAGED_PREFIX + digest.hexdigest()
            os.replace(tmp, self.path(file_id))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.get(file_id)

    def path(self, file_id: str) -> Path:
        return self.folder / f"{file_id.removeprefix(STAGED_PREFIX)}.jsonl"

    def get(self, file_id: str) -> StagedFile:
        """The staged file ``file_id``; ``FileNotFoundError`` if it is not (or no longer) here."""
        if not file_id.startswith(STAGED_PREFIX) or "/" in file_id:
            raise FileNotFoundError(file_id)
        path = self.path(file_id)
        stat = path.stat()
        return StagedFile(file_id, path, stat.st_size, int(stat.st_mtime))

    def remove(self, file_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(file_id).unlink()


class StagedInputs:
    """The file half of a ``Provider`` whose inputs are staged (see the module docstring).

    The provider sets ``name`` and ``_staging`` and reads its results in
    ``_download_results``.
    """

    name: str
    _staging: Staging

    def upload_file(
        self,
        path: Path,
        *,
        filename: str,
        purpose: str = "batch",
        progress: UploadProgress | None = None,
    ) -> RemoteFile:
        """Stage ``path`` (nothing is sent: the create reads it back)."""
        staged = self._staging.stage(path)
        return RemoteFile(
            id=staged.id,
            bytes=staged.size,
            filename=filename,
            purpose=purpose,
            created_at=staged.created_at,
        )

    def get_batch(self, batch_id: str) -> RemoteBatch:  # the provider's own
        raise NotImplementedError

    def get_file(self, file_id: str) -> RemoteFile:
        """A staged input's facts; for a batch's results (``results:<part>:<batch>``), they
        are there while the batch is (``RemoteNotFound`` once it is gone): a results route
        failing for a while does not make them gone."""
        if file_id.startswith(RESULTS_PREFIX):
            batch = self.get_batch(file_id[len(RESULTS_PREFIX) :].partition(":")[2])
            return RemoteFile(id=file_id, created_at=batch.created_at)
        try:
            staged = self._staging.get(file_id)
        except FileNotFoundError:
            raise RemoteNotFound(
                f"{self.name}: file {file_id} is not staged (any more); it is staged again "
                "on the next upload.",
                status=404,
            ) from None
        return RemoteFile(id=staged.id, bytes=staged.size, created_at=staged.created_at)

    def download_file(self, file_id: str, dest: Path) -> int:
        """A staged input (copied), or one part of a batch's results in our line format."""
        if file_id.startswith(RESULTS_PREFIX):
            part, _, batch = file_id[len(RESULTS_PREFIX) :].partition(":")
            if part not in ("succeeded", "failed") or not batch:
                raise RemoteNotFound(f"{self.name}: no such results file {file_id}", status=404)
            return self._download_results(batch, part == "succeeded", dest)
        source = self.get_file(file_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._staging.path(source.id), dest)
        return dest.stat().st_size

    def _download_results(self, batch: str, succeeded: bool, dest: Path) -> int:
        raise NotImplementedError


def results_file_id(part: str, batch: str) -> str:
    """The file id under which ``download_file`` offers one part of ``batch``'s results."""
    return f"{RESULTS_PREFIX}{part}:{batch}"


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file, skipping blank and unparseable lines (a request whose
    line cannot be read stays unresolved and is retried)."""
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: nested too deep to read
                continue
            if isinstance(record, dict):
                yield record
