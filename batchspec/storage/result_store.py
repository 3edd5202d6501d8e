"""The state's result store: the runner's local blob cache, and a remote tier when shared.

Collected output and error files and shard files are content-addressed blobs. Every runner
keeps them in its local ``BlobStore`` (``state/store/``), which is where consumers read them
from (the result writer seeks into them by offset). When the state is shared, a
``RemoteBlobs`` tier (``batchspec.storage.remote_blobs``: the PostgreSQL state's own tables, a
shared folder, an fsspec URL) holds them as well, so a runner that never saw a blob, or a
fresh checkout with an empty ``state/``, gets it back from there with no provider call.

Promises:

* ``put_from`` and ``publish`` return only once the blob is in the remote tier too, so the
  state never refers to a blob (a ledger row, a batch's input) that only one runner has:
  callers file blobs before they record them.
* ``ensure_local(sha)`` returns a local path holding exactly that content: fetched from the
  remote tier when the local cache lacks it, streamed chunk by chunk into a temporary file,
  verified against its sha256 and only then renamed into the cache. Damaged remote content
  is refused (``BlobCorruptError``) and leaves nothing behind; a blob found nowhere is a
  ``BlobMissingError`` naming both places.
* Repair, never a mix: a damaged remote copy is replaced only by content that hashes to its
  name. ``publish`` reads back a copy the tier has already and replaces it from the local
  file when it is damaged or incomplete. ``ensure_local`` that finds the remote copy damaged
  asks ``refetch`` (the state's record of which provider file the blob was downloaded from)
  for the file again, files it locally only if it hashes to the recorded sha256, and replaces
  the remote copy with it; if the provider no longer has the file, the damage is reported as
  before and nothing is kept. A blob found in no tier (``state/store/`` deleted) is asked of
  ``refetch`` the same way, and filed in every tier. Each repair is told to ``on_repair``
  (an audit event).
* Local copies are trusted as they are read (hashing every blob at every read would double a
  restore's reading); ``repair_local(sha)`` checks one, and replaces a copy that no longer
  hashes to its name (a damaged disk, an edit) from the remote tier or the provider's file,
  filed only if it hashes to ``sha``; with no good copy to be had it says so
  (``BlobCorruptError``) and leaves the damaged copy as it is. A restore whose files do not
  come out as recorded asks it (``batchspec.core.reconcile.restore``).
* Without a remote tier it is the local store, exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchspec.errors import BatchspecError
from batchspec.storage.blobstore import BlobMismatchError, BlobStore, sha256_file
from batchspec.storage.remote_blobs import (
    BlobCorruptError,
    BlobMissingError,
    RemoteBlobs,
    file_chunks,
    verified,
)


@dataclass(frozen=True)
class Refetch:
    """Where a blob's content can be had again: the provider file it was downloaded from."""

    where: str  # for messages and the audit event, e.g. "file-abc of provider srv"
    write: Callable[[Path], object]  # downloads the file to the path given


class ResultStore:
    """A local ``BlobStore`` (the working cache) over an optional ``RemoteBlobs`` tier."""

    def __init__(
        self,
        local: BlobStore,
        remote: RemoteBlobs | None = None,
        *,
        refetch: Callable[[str], Refetch | None] | None = None,
        on_repair: Callable[[str, str], None] | None = None,
    ) -> None:
        self.local = local
        self.remote = remote
        self.refetch = refetch
        # (sha256, where the good copy came from): told after the remote copy is replaced
        self.on_repair = on_repair

    def has(self, sha256: str) -> bool:
        return self.local.has(sha256) or (self.remote is not None and self.remote.has(sha256))

    def put_from(self, write: Callable[[Path], object], *, replace: bool = False) -> str:
        """Let ``write(tmp_path)`` produce a file; file it locally and remotely; its sha256.
        ``replace``: over a local copy already filed (the content just written was hashed
        whole, a copy filed earlier may have been damaged on disk since)."""
        sha = self.local.put_from(write, replace=replace)
        self.publish(sha, self.local.path(sha))
        return sha

    def publish(self, sha256: str, path: Path) -> None:
        """Make the complete file ``path`` (content ``sha256``) reachable from every runner."""
        if self.remote is not None and self.remote.put_file(sha256, path):
            self._repaired(sha256, "this runner's local copy")

    def ensure_local(self, sha256: str) -> Path:
        """The local path of blob ``sha256``, fetched from the remote tier if need be."""
        path = self.local.path(sha256)
        if path.is_file():
            return path
        if self.remote is None or not self.remote.has(sha256):
            return self._download_missing(sha256)
        try:
            with self.local.writer() as writer:
                for chunk in verified(sha256, self.remote.chunks(sha256), self.remote.label):
                    writer.write(chunk)
                writer.commit()
        except BlobCorruptError as damaged:
            self._download_again(sha256, damaged)
        return path

    def _download_missing(self, sha256: str) -> Path:
        """A blob in no tier (collected on another runner, or ``state/store/`` deleted): the
        provider's file again (``refetch``), filed only if it hashes to ``sha256``; else a
        ``BlobMissingError`` naming the places looked in and the way out."""
        where = f"{self.local.root}" + (f" nor in {self.remote.label}" if self.remote else "")
        missing = (
            f"the stored file {sha256[:12]} that the state refers to is not in {where}; it "
            "was collected on another runner, or deleted: share the state's blobs (a "
            "PostgreSQL state, or state.blobs in batchspec.yaml) or copy that runner's "
            "state/store/"
        )
        source = self.refetch(sha256) if self.refetch is not None else None
        if source is None:
            raise BlobMissingError(missing)
        try:
            self.local.put_from(source.write, expect=sha256)
        except BatchspecError as err:  # the provider no longer has it, or other content
            raise BlobMissingError(
                f"{missing}; downloading {source.where} again failed: {err}"
            ) from err
        self.publish(sha256, self.local.path(sha256))
        self._repaired(sha256, source.where)
        return self.local.path(sha256)

    def repair_local(self, sha256: str) -> bool:
        """Replace the local copy of ``sha256`` if it no longer hashes to its name (see the
        module docstring); False if it is sound or absent, True once replaced."""
        path = self.local.path(sha256)
        if not path.is_file() or sha256_file(path) == sha256:
            return False
        damaged = (
            f"the stored file {sha256[:12]} in {self.local.root} is damaged (its content no "
            "longer hashes to its name)"
        )
        remote = self.remote
        if remote is not None and remote.has(sha256):

            def from_remote(dest: Path) -> None:
                with dest.open("wb") as out:
                    for chunk in verified(sha256, remote.chunks(sha256), remote.label):
                        out.write(chunk)

            try:
                self.local.put_from(from_remote, expect=sha256, replace=True)
            except BlobCorruptError:
                pass  # damaged there too: the provider's file is the last resort
            else:
                self._repaired(sha256, remote.label)
                return True
        source = self.refetch(sha256) if self.refetch is not None else None
        if source is None:
            raise BlobCorruptError(
                f"{damaged}, and no other copy of it is known; restore state/store/ from a "
                "backup, or `batchspec apply --replace NAME` to run the requests again"
            )
        self._file_again(sha256, source, damaged, replace=True)
        self._repaired(sha256, source.where)
        self.publish(sha256, path)  # a shared copy damaged too is replaced from it
        return True

    def _file_again(self, sha256: str, source: Refetch, damaged: object, *, replace: bool) -> None:
        """File ``source`` (the provider's file) locally as ``sha256``, or raise
        ``BlobCorruptError`` saying, after ``damaged``, why it could not be."""
        try:
            self.local.put_from(source.write, expect=sha256, replace=replace)
        except BlobMismatchError as err:
            raise BlobCorruptError(
                f"{damaged}; downloading {source.where} again gave other content "
                f"({err.got[:12]}), which was not used either"
            ) from err
        except BatchspecError as err:
            raise BlobCorruptError(
                f"{damaged}; it cannot be downloaded again from {source.where}: {err}"
            ) from err

    def _download_again(self, sha256: str, damaged: BlobCorruptError) -> None:
        """The remote copy is damaged: file the provider's file again if it hashes to
        ``sha256``, and replace the remote copy with it; else ``damaged``, nothing kept."""
        assert self.remote is not None
        source = self.refetch(sha256) if self.refetch is not None else None
        if source is None:
            raise damaged
        self._file_again(sha256, source, damaged, replace=False)
        self.remote.replace(sha256, file_chunks(self.local.path(sha256)))
        self._repaired(sha256, source.where)

    def _repaired(self, sha256: str, where: str) -> None:
        if self.on_repair is not None:
            self.on_repair(sha256, where)


__all__ = ["Refetch", "ResultStore"]
