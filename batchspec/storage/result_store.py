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
* Without a remote tier it is the local store, exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from batchspec.storage.blobstore import BlobStore
from batchspec.storage.remote_blobs import BlobMissingError, RemoteBlobs, verified


class ResultStore:
    """A local ``BlobStore`` (the working cache) over an optional ``RemoteBlobs`` tier."""

    def __init__(self, local: BlobStore, remote: RemoteBlobs | None = None) -> None:
        self.local = local
        self.remote = remote

    def has(self, sha256: str) -> bool:
        return self.local.has(sha256) or (self.remote is not None and self.remote.has(sha256))

    def put_from(self, write: Callable[[Path], object]) -> str:
        """Let ``write(tmp_path)`` produce a file; file it locally and remotely; its sha256."""
        sha = self.local.put_from(write)
        self.publish(sha, self.local.path(sha))
        return sha

    def publish(self, sha256: str, path: Path) -> None:
        """Make the complete file ``path`` (content ``sha256``) reachable from every runner."""
        if self.remote is not None:
            self.remote.put_file(sha256, path)

    def ensure_local(self, sha256: str) -> Path:
        """The local path of blob ``sha256``, fetched from the remote tier if need be."""
        path = self.local.path(sha256)
        if path.is_file():
            return path
        if self.remote is None or not self.remote.has(sha256):
            where = f"{self.local.root}" + (f" nor in {self.remote.label}" if self.remote else "")
            raise BlobMissingError(
                f"the stored file {sha256[:12]} that the state refers to is not in {where}; "
                "it was collected on another runner: share the state's blobs (a PostgreSQL "
                "state, or state.blobs in batchspec.yaml) or copy that runner's state/store/"
            )
        with self.local.writer() as writer:
            for chunk in verified(sha256, self.remote.chunks(sha256), self.remote.label):
                writer.write(chunk)
            writer.commit()
        return path


__all__ = ["ResultStore"]
