"""The one content-addressed blob store: the state's result store and the engine's files.

A blob is immutable content named by its sha256. Both sides of batchspec keep blobs here:

- the state's result store (``state/store/``): invariant 2 of DESIGN.md ("never lose a
  result"): every downloaded output and error file is written here *before* anything else is
  done with it, so the result files in the workspace can be rewritten from here at any time;
- the local engine's files (``<data>/files/``): uploads, request files and result files.

Layout (unchanged since the first release of either side, so existing folders stay readable)::

    <root>/<sha[:2]>/<sha>     one blob per distinct content
    <tmp>/                     writes in progress (``<root>/tmp`` unless told otherwise)

Promises:

- A blob path always holds complete content whose sha256 is its name: content is written to
  ``<tmp>/``, hashed while it streams, and renamed into place only when complete. Filing a
  blob that exists already leaves the existing one alone.
- Blobs hold full requests and answers, so they are private whatever the umask: files 0600,
  the folders the store creates 0700 (see ``private.py``). A store shared by several users
  (``state.blobs``, a folder its owner gave a group) adds that group's bits (``group_bits``):
  files 0660, folders 0770 with the folder's set-group-id bit; never bits for others.
- ``BlobWriter`` can cap a write (``max_bytes``): the moment the content passes the cap it
  drops what it wrote and raises ``BlobTooLargeError`` (or the caller's own error).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from batchspec.errors import BatchspecError
from batchspec.storage.private import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    create_private_file,
    ensure_private_dir,
    open_new_file,
)

CHUNK = 1 << 20
_T = TypeVar("_T")
#: temporary names: this process's random prefix, its pid (a forked child has its own) and a
#: counter are unique as a random name per file is, without a call for random bytes each
_PREFIX = secrets.token_hex(8)
_COUNTER = itertools.count()


def unique_name() -> str:
    """A name no other write in progress has (in this process or another)."""
    return f"{_PREFIX}-{os.getpid()}-{next(_COUNTER)}"


#: a write in progress untouched this long was left by a killed process (``sweep_stale_tmp``)
STALE_TMP_SECONDS = 24 * 3600.0


class BlobTooLargeError(BatchspecError):
    """A capped blob write passed its cap; ``limit`` is the cap in bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"The content is too large: the limit is {limit} bytes.")
        self.limit = limit


class BlobMismatchError(BatchspecError):
    """Content written for an expected sha256 hashes to another: it was not filed."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(
            f"the content expected to be {expected[:12]} hashes to {got[:12]}; it was not kept"
        )
        self.expected = expected
        self.got = got


class BlobStore:
    """Content-addressed files under ``root``; writes in progress under ``tmp_dir``."""

    def __init__(self, root: Path, *, tmp_dir: Path | None = None, group_bits: int = 0) -> None:
        self.root = Path(root)
        self.tmp_dir = Path(tmp_dir) if tmp_dir is not None else self.root / "tmp"
        #: the modes of what the store creates: private, plus the group's bits of a shared
        #: folder (``group_bits``: a folder's mode, of which only 0o070 and S_ISGID count)
        self.dir_mode = PRIVATE_DIR_MODE | (group_bits & (0o070 | stat.S_ISGID))
        self.file_mode = PRIVATE_FILE_MODE | (group_bits & 0o060)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def writer(
        self,
        max_bytes: int | None = None,
        *,
        too_large: Callable[[int], Exception] = BlobTooLargeError,
    ) -> BlobWriter:
        """A streaming write (``write``/``copy_from``, then ``commit`` or ``discard``).

        Past ``max_bytes`` the write is dropped and ``too_large(max_bytes)`` raised (callers
        pass their own error, e.g. the engine's HTTP 413).
        """
        return BlobWriter(self, max_bytes, too_large)

    def put_from(
        self, write: Callable[[Path], object], *, expect: str | None = None, replace: bool = False
    ) -> str:
        """Let ``write(tmp_path)`` produce a file, then file it under its sha256.

        With ``expect``, content that does not hash to it is dropped, never filed
        (``BlobMismatchError``). With ``replace``, it replaces a copy already filed (a damaged
        one being repaired).
        """
        tmp, _ = self._new_tmp(lambda path: create_private_file(path, self.file_mode))
        try:
            write(tmp)
            os.chmod(tmp, self.file_mode)  # in case ``write`` replaced the file
            sha = sha256_file(tmp)
            if expect is not None and sha != expect:
                raise BlobMismatchError(expect, sha)
            self._file(tmp, sha, replace=replace)
            return sha
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def remove(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    def clean_tmp(self) -> None:
        """Drop leftovers of writes a crashed process did not finish (call with no writer open)."""
        if not self.tmp_dir.is_dir():
            return
        for leftover in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    def sweep_stale_tmp(self, older_than: float = STALE_TMP_SECONDS) -> int:
        """Drop the writes in progress untouched for ``older_than`` seconds: a killed process's
        leftovers, in a folder other processes may be writing to now (a write in progress
        touches its file with each chunk). Returns how many were dropped."""
        try:
            parts = [p for p in self.tmp_dir.iterdir() if p.name.startswith("part-")]
        except OSError:  # no tmp folder yet, or not ours to read
            return 0
        cutoff = time.time() - older_than
        dropped = 0
        for part in parts:
            with contextlib.suppress(OSError):
                if part.stat().st_mtime < cutoff:
                    part.unlink()
                    dropped += 1
        return dropped

    # -- internals ---------------------------------------------------------------------------

    def _new_tmp(self, create: Callable[[Path], _T]) -> tuple[Path, _T]:
        """A new name under ``tmp_dir`` and what ``create(name)`` made there; the store's
        folders are made when missing (found so, not looked for before every write)."""
        tmp = self.tmp_dir / f"part-{unique_name()}"
        try:
            return tmp, create(tmp)
        except FileNotFoundError:
            ensure_private_dir(self.root, self.dir_mode)
            ensure_private_dir(self.tmp_dir, self.dir_mode)
            return tmp, create(tmp)

    def _file(self, tmp: Path, sha256: str, *, replace: bool = False) -> None:
        """Move a complete temporary file to its content-addressed place (over a file already
        there only with ``replace``: a damaged copy being repaired)."""
        dest = self.path(sha256)
        if dest.exists() and not replace:
            tmp.unlink()
            return
        try:
            os.replace(tmp, dest)
        except FileNotFoundError:  # its folder (``sha[:2]``) is made the first time
            ensure_private_dir(dest.parent, self.dir_mode)
            os.replace(tmp, dest)


class BlobWriter:
    """Streams content to a temporary file, hashing and counting it, under an optional cap."""

    def __init__(
        self,
        blobs: BlobStore,
        max_bytes: int | None,
        too_large: Callable[[int], Exception] = BlobTooLargeError,
    ) -> None:
        self._blobs = blobs
        self._max_bytes = max_bytes
        self._too_large = too_large
        self._hash = hashlib.sha256()
        self.size = 0
        self.tmp_path, fh = blobs._new_tmp(lambda path: open_new_file(path, blobs.file_mode))
        self._fh: BinaryIO | None = fh

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._max_bytes is not None and self.size > self._max_bytes:
            self.discard()
            raise self._too_large(self._max_bytes)
        self._hash.update(chunk)
        assert self._fh is not None, "blob already committed or discarded"
        with self._naming_the_folder():
            self._fh.write(chunk)

    def copy_from(self, source: BinaryIO) -> None:
        while chunk := source.read(CHUNK):
            self.write(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self, *, replace: bool = False) -> str:
        """Move the content into its content-addressed place; return its sha256 (``replace``:
        over a damaged file of that name)."""
        assert self._fh is not None, "blob already committed or discarded"
        with self._naming_the_folder():
            self._fh.close()
        self._fh = None
        digest = self.sha256
        try:
            self._blobs._file(self.tmp_path, digest, replace=replace)
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise
        return digest

    @contextlib.contextmanager
    def _naming_the_folder(self) -> Iterator[None]:
        """A buffered write that fails (a full disk) names no file: the blob is discarded
        (its room given back) and the error names the folder it was written in."""
        try:
            yield
        except OSError as err:
            with contextlib.suppress(OSError):
                self.discard()
            if err.filename is not None:
                raise
            raise OSError(err.errno, err.strerror or str(err), str(self.tmp_path.parent)) from err

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        with contextlib.suppress(FileNotFoundError):
            self.tmp_path.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self.discard()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(dest: Path, write: Callable[[Path], object]) -> None:
    """Write ``dest`` through a temporary sibling and a rename, so readers never see half.

    The file is the user's (a result file in the workspace): it gets the mode any new file of
    theirs gets, ``0666 & ~umask``, applied by the kernel when the temporary file is created.
    A failure to write or rename (a full disk, a file size limit, a folder at ``dest``) is
    raised naming ``dest``, not the temporary file the user never asked for.
    """
    # the name's head only: a name near the filesystem's 255-byte limit must stay writable
    tmp = dest.parent / f".{dest.name[:64]}.{secrets.token_hex(16)}.tmp"
    try:
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileNotFoundError:  # its folder is made when missing (not asked of every file)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        write(tmp)
        os.replace(tmp, dest)
    except OSError as err:
        _discard(tmp)
        if err.filename not in (None, str(tmp)):  # about another file (a blob it read)
            raise
        raise OSError(err.errno, err.strerror or str(err), str(dest)) from err
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    """Remove a temporary file if it is there (a failure to is not the error to report:
    the one that made the write fail is, as a folder path that is a file)."""
    with contextlib.suppress(OSError):
        tmp.unlink()


__all__ = [
    "CHUNK",
    "BlobMismatchError",
    "BlobStore",
    "BlobTooLargeError",
    "BlobWriter",
    "sha256_file",
    "write_atomically",
]
