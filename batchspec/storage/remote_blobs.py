"""The result store's remote tier: blobs every runner of a shared state can reach.

The local ``BlobStore`` (``state/store/``) is the working cache; a ``RemoteBlobs`` holds the
same content-addressed blobs where another machine finds them. Three kinds, chosen by the
project (``batchspec.core.reconcile.context.remote_blobs_for``):

* ``PostgresBlobs``: the state's own PostgreSQL database (the default when the state is
  PostgreSQL), over a connection of its own. Storage format (migration ``m006_blobs``)::

      blobs(sha256 TEXT PRIMARY KEY, size BIGINT, chunks INTEGER, stored_at TEXT)
      blob_chunks(sha256 TEXT, seq INTEGER, data BYTEA, PRIMARY KEY (sha256, seq))

  A blob is cut into chunks of ``CHUNK_BYTES`` (1 MiB); its ``blobs`` row is written in the
  same transaction as its chunks, after the last one, so a ``blobs`` row always means every
  chunk is there. SQLite states have the tables too (one schema) and leave them empty.
* ``FolderBlobs``: a shared folder (``state: {blobs: /mnt/shared/batchspec}``), in the local
  store's own layout ``<root>/<sha[:2]>/<sha>``, written through a temporary file and a rename.
* ``FsspecBlobs``: an fsspec URL (``state: {blobs: s3://bucket/prefix}``), same layout; needs
  ``pip install 'batchspec[blobs]'`` (fsspec) and the filesystem's own package (s3fs, gcsfs).

The interface, and what every kind promises:

* ``has(sha)``, ``size(sha)``, ``iter_hashes()`` (sorted), ``close()``.
* ``put(sha, chunks)``: streams an iterable of byte chunks in, hashing as it goes; content
  whose sha256 is not ``sha`` is refused (``BlobCorruptError``) and nothing of it is kept.
  Putting a blob that exists already changes nothing. ``put_file(sha, path)`` reads a file
  and, when the tier has that blob already, reads it back: a damaged or incomplete copy is
  replaced from the file (it returns True then: the caller records a ``blob.repaired``).
* ``replace(sha, chunks)``: puts the blob over whatever copy is there, damaged or not, in one
  step (PostgreSQL: one transaction drops the old chunks and row and writes the new ones; a
  folder or fsspec: a temporary file moved over the old one). The content is verified as for
  ``put``: content that does not hash to ``sha`` is refused and the old copy stays.
* ``intact(sha)``: whether the blob is there and hashes to its name (reads it whole).
* ``chunks(sha)``: the content as an iterator of byte chunks, never the whole blob in memory;
  ``BlobMissingError`` if the blob is not there. It does not verify: read it through
  ``verified(sha, chunks, where)``, which raises ``BlobCorruptError`` after the last chunk if
  the content does not hash to ``sha`` (``batchspec.storage.result_store`` does).
* Memory stays bounded by a few chunks whatever the blob's size. Each kind may be used from
  several threads (``PostgresBlobs`` serialises its connection with a lock).
"""

from __future__ import annotations

import hashlib
import re
import stat
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from batchspec.errors import StateError
from batchspec.storage.blobstore import BlobStore
from batchspec.storage.database_url import is_database_url, redact_url
from batchspec.storage.sql import PostgresSql

CHUNK_BYTES = 1 << 20
_SHA = re.compile(r"^[0-9a-f]{64}$")
FSSPEC_EXTRA_HINT = "pip install 'batchspec[blobs]'"


class BlobCorruptError(StateError):
    """A blob's content does not hash to its name: a damaged copy, refused before use."""


class BlobMissingError(StateError):
    """A blob the state refers to is in none of the places it could be."""


def verified(sha256: str, chunks: Iterable[bytes], where: str) -> Iterator[bytes]:
    """``chunks``, passed through; ``BlobCorruptError`` after the last one if they do not hash
    to ``sha256`` (so a consumer writing a temporary file drops it instead of filing it)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        yield chunk
    if digest.hexdigest() != sha256:
        raise BlobCorruptError(
            f"the blob {sha256[:12]} in {where} is damaged: its content hashes to "
            f"{digest.hexdigest()[:12]}; it was not used. A runner that still has it in its "
            "state/store/ repairs that copy when it files it again; or restore it from a backup"
        )


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            yield chunk


class RemoteBlobs(ABC):
    """Content-addressed blobs somewhere every runner reaches (see the module docstring)."""

    #: where, fit for messages (never a password)
    label: str

    @abstractmethod
    def has(self, sha256: str) -> bool: ...

    @abstractmethod
    def size(self, sha256: str) -> int | None:
        """The blob's size in bytes, or None if it is not there."""

    @abstractmethod
    def put(self, sha256: str, chunks: Iterable[bytes]) -> None: ...

    @abstractmethod
    def chunks(self, sha256: str) -> Iterator[bytes]: ...

    @abstractmethod
    def iter_hashes(self) -> Iterator[str]: ...

    @abstractmethod
    def replace(self, sha256: str, chunks: Iterable[bytes]) -> None:
        """Put the blob over the copy there (a damaged one), verified as for ``put``."""

    def intact(self, sha256: str) -> bool:
        """Whether the blob is there, complete, and hashes to ``sha256`` (reads it whole)."""
        if not self.has(sha256):
            return False
        try:
            for _ in verified(sha256, self.chunks(sha256), self.label):
                pass
        except (BlobCorruptError, BlobMissingError):
            return False
        return True

    def put_file(self, sha256: str, path: Path) -> bool:
        """File ``path`` (content ``sha256``); a copy there already is read back and, if it is
        damaged, replaced from ``path``. True when a damaged copy was repaired."""
        if not self.has(sha256):
            self.put(sha256, file_chunks(path))
            return False
        if self.intact(sha256):
            return False
        self.replace(sha256, file_chunks(path))
        return True

    def close(self) -> None:  # noqa: B027 - most kinds hold nothing to close
        """Release what the tier holds open (a database connection)."""

    def _missing(self, sha256: str) -> BlobMissingError:
        return BlobMissingError(f"the blob {sha256[:12]} is not in {self.label}")


# -- PostgreSQL --------------------------------------------------------------------------------


def insert_blob(db: PostgresSql, sha256: str, chunks: Iterable[bytes]) -> None:
    """Write a blob's chunks, then its ``blobs`` row, on ``db`` inside the caller's
    transaction (``BlobCorruptError`` after the last chunk if the content is not ``sha256``)."""
    size = seq = 0
    for chunk in verified(sha256, _rechunk(chunks), "the content given"):
        db.execute(
            "INSERT INTO blob_chunks (sha256, seq, data) VALUES (?, ?, ?) "
            "ON CONFLICT (sha256, seq) DO UPDATE SET data = excluded.data",
            (sha256, seq, chunk),
        )
        size += len(chunk)
        seq += 1
    db.execute(
        "INSERT INTO blobs (sha256, size, chunks, stored_at) VALUES (?, ?, ?, ?)",
        (sha256, size, seq, _now()),
    )


def stored_blob(db: PostgresSql, sha256: str, label: str) -> Iterator[bytes] | None:
    """A blob's chunks read one at a time from ``db`` (unverified), or None if it has no
    ``blobs`` row there."""
    found = db.execute("SELECT chunks FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
    if found is None:
        return None
    return _read_chunks(db, sha256, int(found[0]), label)


def _read_chunks(db: PostgresSql, sha256: str, count: int, label: str) -> Iterator[bytes]:
    for seq in range(count):
        row = db.execute(
            "SELECT data FROM blob_chunks WHERE sha256 = ? AND seq = ?", (sha256, seq), binary=True
        ).fetchone()
        if row is None:
            raise BlobCorruptError(
                f"the blob {sha256[:12]} in {label} is damaged: chunk {seq} of {count} "
                "is missing; it was not used"
            )
        yield bytes(row[0])


class PostgresBlobs(RemoteBlobs):
    """Blobs in the state's PostgreSQL database, chunked, over a connection of their own.

    The connection is opened on first use, so a command that needs no blob opens none.
    """

    def __init__(self, url: str, *, busy_timeout: float = 30.0) -> None:
        self._url = url
        self._busy_timeout = busy_timeout
        self.label = f"the PostgreSQL state {redact_url(url)}"
        self._db: PostgresSql | None = None
        self._lock = threading.RLock()

    def _conn(self) -> PostgresSql:
        if self._db is None:
            self._db = PostgresSql.connect(self._url, busy_timeout=self._busy_timeout)
        return self._db

    def has(self, sha256: str) -> bool:
        return self.size(sha256) is not None

    def size(self, sha256: str) -> int | None:
        with self._lock:
            row = self._conn().execute("SELECT size FROM blobs WHERE sha256 = ?", (sha256,))
            found = row.fetchone()
        return None if found is None else int(found[0])

    def put(self, sha256: str, chunks: Iterable[bytes]) -> None:
        with self._lock:
            db = self._conn()
            if self.has(sha256):
                return
            db.execute("BEGIN")
            try:
                # two runners filing one blob: the second waits for the first (however long
                # its upload takes) and then finds it there
                db.execute("SET LOCAL lock_timeout = 0")
                db.execute("SELECT pg_advisory_xact_lock(?)", (db.advisory_key("blob:" + sha256),))
                if not self.has(sha256):
                    insert_blob(db, sha256, chunks)
            except BaseException:
                db.rollback()
                raise
            db.commit()

    def replace(self, sha256: str, chunks: Iterable[bytes]) -> None:
        with self._lock:
            db = self._conn()
            db.execute("BEGIN")
            try:
                db.execute("SET LOCAL lock_timeout = 0")
                db.execute("SELECT pg_advisory_xact_lock(?)", (db.advisory_key("blob:" + sha256),))
                db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha256,))
                db.execute("DELETE FROM blob_chunks WHERE sha256 = ?", (sha256,))
                insert_blob(db, sha256, chunks)
            except BaseException:
                db.rollback()
                raise
            db.commit()

    def chunks(self, sha256: str) -> Iterator[bytes]:
        with self._lock:
            found = (
                self._conn()
                .execute("SELECT chunks FROM blobs WHERE sha256 = ?", (sha256,))
                .fetchone()
            )
        if found is None:
            raise self._missing(sha256)
        return self._read(sha256, int(found[0]))

    def _read(self, sha256: str, count: int) -> Iterator[bytes]:
        for seq in range(count):
            with self._lock:
                row = (
                    self._conn()
                    .execute(
                        "SELECT data FROM blob_chunks WHERE sha256 = ? AND seq = ?",
                        (sha256, seq),
                        binary=True,
                    )
                    .fetchone()
                )
            if row is None:
                raise BlobCorruptError(
                    f"the blob {sha256[:12]} in {self.label} is damaged: chunk {seq} of {count} "
                    "is missing; it was not used"
                )
            yield bytes(row[0])

    def iter_hashes(self) -> Iterator[str]:
        after = ""
        while True:
            with self._lock:
                rows = (
                    self._conn()
                    .execute(
                        "SELECT sha256 FROM blobs WHERE sha256 > ? ORDER BY sha256 LIMIT 1000",
                        (after,),
                    )
                    .fetchall()
                )
            if not rows:
                return
            for (sha,) in rows:
                yield sha
            after = rows[-1][0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


# -- a shared folder ---------------------------------------------------------------------------


class FolderBlobs(RemoteBlobs):
    """Blobs in a folder (a mounted share), in the local store's layout."""

    def __init__(self, root: Path) -> None:
        # runners of one state may be different users: what they file in a group share (a
        # folder with set-group-id, `chmod 2770`: what is made in it takes its group) carries
        # the group bits its owner gave it, never others'; in any other folder (a plain
        # mkdir's 0755, a 0770 without set-group-id: files would take the creator's group),
        # and in a folder made here, what is filed stays private
        try:
            mode = root.stat().st_mode if root.is_dir() else 0
        except OSError:
            mode = 0
        group_bits = mode if mode & stat.S_ISGID else 0
        self.store = BlobStore(root, group_bits=group_bits)
        self.store.sweep_stale_tmp()  # a killed runner's writes; other runners' are fresh
        self.label = f"the blob folder {root}"

    def has(self, sha256: str) -> bool:
        return self.store.has(sha256)

    def size(self, sha256: str) -> int | None:
        return self.store.size(sha256) if self.store.has(sha256) else None

    def put(self, sha256: str, chunks: Iterable[bytes]) -> None:
        if self.has(sha256):
            return
        with self.store.writer() as writer:
            for chunk in verified(sha256, chunks, "the content given"):
                writer.write(chunk)
            writer.commit()

    def replace(self, sha256: str, chunks: Iterable[bytes]) -> None:
        with self.store.writer() as writer:
            for chunk in verified(sha256, chunks, "the content given"):
                writer.write(chunk)
            writer.commit(replace=True)

    def chunks(self, sha256: str) -> Iterator[bytes]:
        if not self.has(sha256):
            raise self._missing(sha256)
        return file_chunks(self.store.path(sha256))

    def iter_hashes(self) -> Iterator[str]:
        if not self.store.root.is_dir():
            return iter(())
        found = (
            p.name
            for d in self.store.root.iterdir()
            if d.is_dir() and len(d.name) == 2
            for p in d.iterdir()
            if _SHA.match(p.name) and p.name[:2] == d.name
        )
        return iter(sorted(found))


# -- fsspec ------------------------------------------------------------------------------------


class FsspecBlobs(RemoteBlobs):
    """Blobs behind an fsspec URL (``s3://bucket/prefix``), in the local store's layout.

    A blob is written to a temporary name beside its place and moved there when complete and
    verified, so a reader never finds half of one (on object stores the move is a copy).
    """

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError as err:
            raise StateError(
                f"state.blobs is the URL {redact_url(url)}, but fsspec is not installed: "
                f"{FSSPEC_EXTRA_HINT} (and the filesystem's package, e.g. s3fs)"
            ) from err
        try:
            fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as err:
            raise StateError(f"state.blobs {redact_url(url)} cannot be opened: {err}") from err
        self.fs: Any = fs
        self.root = str(root).rstrip("/")
        self.label = f"the blob store {redact_url(url)}"

    def _path(self, sha256: str) -> str:
        return f"{self.root}/{sha256[:2]}/{sha256}"

    def has(self, sha256: str) -> bool:
        return bool(self.fs.exists(self._path(sha256)))

    def size(self, sha256: str) -> int | None:
        return int(self.fs.size(self._path(sha256))) if self.has(sha256) else None

    def put(self, sha256: str, chunks: Iterable[bytes]) -> None:
        if self.has(sha256):
            return
        self.replace(sha256, chunks)

    def replace(self, sha256: str, chunks: Iterable[bytes]) -> None:
        dest = self._path(sha256)
        tmp = f"{self.root}/tmp/{uuid.uuid4().hex}"
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as out:
                for chunk in verified(sha256, chunks, "the content given"):
                    out.write(chunk)
            self.fs.makedirs(f"{self.root}/{sha256[:2]}", exist_ok=True)
            self.fs.mv(tmp, dest)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def chunks(self, sha256: str) -> Iterator[bytes]:
        if not self.has(sha256):
            raise self._missing(sha256)
        return self._read(self._path(sha256))

    def _read(self, path: str) -> Iterator[bytes]:
        with self.fs.open(path, "rb") as fh:
            while chunk := fh.read(CHUNK_BYTES):
                yield chunk

    def iter_hashes(self) -> Iterator[str]:
        names = (str(p).rsplit("/", 1)[-1] for p in self.fs.find(self.root))
        return iter(sorted(n for n in names if _SHA.match(n)))


def open_blob_location(location: str | Path) -> RemoteBlobs:
    """The tier ``state.blobs`` names: a folder (a path or ``file://``) or an fsspec URL."""
    text = str(location)
    if is_database_url(text):
        raise StateError(
            "state.blobs names a PostgreSQL database: a PostgreSQL state keeps its blobs in its "
            "own database already; give state.blobs a folder or an fsspec URL, or leave it out"
        )
    if text.startswith("file://"):
        return FolderBlobs(Path(text[len("file://") :]))
    if "://" in text:
        return FsspecBlobs(text)
    return FolderBlobs(Path(text))


def _rechunk(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks`` regrouped into pieces of exactly ``CHUNK_BYTES`` (the last one shorter)."""
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        while len(pending) >= CHUNK_BYTES:
            yield bytes(pending[:CHUNK_BYTES])
            del pending[:CHUNK_BYTES]
    if pending:
        yield bytes(pending)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


__all__ = [
    "CHUNK_BYTES",
    "BlobCorruptError",
    "BlobMissingError",
    "FolderBlobs",
    "FsspecBlobs",
    "PostgresBlobs",
    "RemoteBlobs",
    "file_chunks",
    "open_blob_location",
    "verified",
]
