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
import errno
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
#: temporary names (the store's and ``write_atomically``'s): this process's random prefix, its
#: pid (a forked child has its own) and a counter are unique as a random name per file is,
#: without a getrandom syscall each (``write_atomically`` passes over a name taken anyway)
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


class BlobFolderError(BatchspecError):
    """The store's folder cannot hold files: a dangling symbolic link, or a file, is there."""


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
        touches its file with each chunk). Returns how many were dropped.

        By age, never by the pid in the name: a shared folder's runners are on other hosts
        (a pid there says nothing here), and containers repeat the same small pids, so "no
        such process" would drop a live runner's write. A runner paused longer than
        ``older_than`` (a suspended machine) finds its write gone at the rename and fails
        there (``FileNotFoundError``): nothing half-written is ever filed."""
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

    def require_usable(self) -> None:
        """Raise ``BlobFolderError`` when ``root`` cannot become the store's folder: a
        symbolic link to nothing, or a file (a missing folder is fine: it is made)."""
        root = self.root
        if os.path.islink(root) and not os.path.exists(root):
            why = f"it is a symbolic link to {os.readlink(root)}, which does not exist"
        elif os.path.lexists(root) and not os.path.isdir(root):
            why = "it is a file, not a folder"
        else:
            return
        raise BlobFolderError(
            f"the stored files' folder {root} cannot be used: {why}",
            details=[
                "create the folder it should be (or remove what is there: batchspec makes "
                "the folder), then run the command again"
            ],
        )

    # -- internals ---------------------------------------------------------------------------

    def _ensure_folders(self, *folders: Path) -> None:
        """Make the store's missing folders; one that cannot be made because of what stands
        at ``root`` is said as such (``require_usable``), not as the OS's terse error."""
        try:
            for folder in folders:
                ensure_private_dir(folder, self.dir_mode)
        except OSError:
            self.require_usable()
            raise

    def _new_tmp(self, create: Callable[[Path], _T]) -> tuple[Path, _T]:
        """A new name under ``tmp_dir`` and what ``create(name)`` made there; the store's
        folders are made when missing (found so, not looked for before every write)."""
        tmp = self.tmp_dir / f"part-{unique_name()}"
        try:
            return tmp, create(tmp)
        except FileNotFoundError:
            self._ensure_folders(self.root, self.tmp_dir)
            return tmp, create(tmp)
        except NotADirectoryError as err:  # a file where the folder should be: name the folder
            raise NotADirectoryError(err.errno, err.strerror, str(self.tmp_dir)) from err

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
            # the root too, private: ``_new_tmp`` made it only if its ``tmp_dir`` was missing
            self._ensure_folders(self.root, dest.parent)
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
    """The sha256 of the file at ``path``, read through its descriptor (no buffered file
    object: its fstat, isatty ioctl and lseek were half the syscalls of hashing a small file)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, CHUNK):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def write_atomically(dest: Path, write: Callable[[Path], object]) -> None:
    """Write ``dest`` through a temporary sibling and a rename, so readers never see half.

    The file is the user's (a result file in the workspace): it gets the mode any new file of
    theirs gets, ``0666 & ~umask``, applied by the kernel when the temporary file is created.
    A failure to write or rename (a full disk, a file size limit, a folder at ``dest``) is
    raised naming ``dest``, not the temporary file the user never asked for.
    ``write(tmp)`` fills the temporary file by its path (``write_file_atomically`` hands it
    the file already open instead).
    """
    _write_through_tmp(dest, lambda fd, tmp: write(tmp), by_path=True)


def write_file_atomically(
    dest: Path, fill: Callable[[RawFileWriter], object]
) -> os.stat_result | None:
    """``write_atomically``, with ``fill`` given the temporary file as created (its
    descriptor, written unbuffered in chunks: ``RawFileWriter``), not its path to open again.

    Returns ``dest``'s stat right after the rename, when it shows the file as the last write
    left it (the same inode, size and mtime: nothing replaced or wrote to it since), so a
    caller that knows its content's hash can key it by that stat as
    ``recorded.observe_disk`` would; else None. The file is closed before the rename (a
    write error some filesystems report only at close keeps the old file)."""

    def by_fd(fd: int, tmp: Path) -> None:
        out = RawFileWriter(fd)
        fill(out)
        out.flush()

    return _write_through_tmp(dest, by_fd, by_path=False)


class RawFileWriter:
    """Writes to an open descriptor, gathering small writes into ``CHUNK``-sized ones (a
    buffered file object opened on it costs an fstat and an lseek; the caller closes it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = bytearray()

    def write(self, data: bytes) -> int:
        if len(self._pending) + len(data) >= CHUNK:
            self.flush()
            if len(data) >= CHUNK:
                self._write_all(data)
                return len(data)
        self._pending += data
        return len(data)

    def flush(self) -> None:
        if self._pending:
            self._write_all(self._pending)
            self._pending.clear()

    def _write_all(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]


_CREATE_NEW = os.O_CREAT | os.O_EXCL | os.O_WRONLY  # os.open's descriptors are close-on-exec
#: tries of fresh names before a taken one is an error (only another process's names collide)
_TMP_NAME_TRIES = 100


def _create_tmp(dest: Path) -> tuple[int, Path]:
    """A new temporary sibling of ``dest``, created (O_EXCL) with mode 0666 & ~umask: its
    descriptor and path. Its folder is made when missing (not asked of every file). A
    failure to create it names ``dest``."""
    made_folder = False
    for _ in range(_TMP_NAME_TRIES):
        # the name's head only: a name near the filesystem's 255-byte limit must stay writable
        tmp = dest.parent / f".{dest.name[:64]}.{unique_name()}.tmp"
        try:
            return os.open(tmp, _CREATE_NEW, 0o666), tmp
        except FileExistsError:
            continue
        except FileNotFoundError as err:
            if made_folder:
                raise _about(dest, err) from err
            dest.parent.mkdir(parents=True, exist_ok=True)  # its own errors name the folder
            made_folder = True
            try:
                return os.open(tmp, _CREATE_NEW, 0o666), tmp
            except FileExistsError:
                continue
            except OSError as again:
                raise _about(dest, again) from again
        except OSError as err:
            raise _about(dest, err) from err
    raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(dest))


def _about(dest: Path, err: OSError) -> OSError:
    """``err`` said of ``dest`` (a failure the temporary file met is the result file's)."""
    return OSError(err.errno, err.strerror or str(err), str(dest))


def _write_through_tmp(
    dest: Path, write: Callable[[int, Path], object], *, by_path: bool
) -> os.stat_result | None:
    """``write_atomically``'s frame: ``write(fd, tmp)`` fills the temporary file (``by_path``:
    closed first, for ``write`` to open by its path), which is then renamed onto ``dest``;
    any failure removes it and names ``dest``. Not ``by_path``: the stat of ``dest`` as
    renamed, if still the file written and unchanged since (``write_file_atomically``)."""
    fd, tmp = _create_tmp(dest)
    written: os.stat_result | None = None
    try:
        try:
            if not by_path:
                write(fd, tmp)
                written = os.fstat(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        # closed before the rename: a filesystem may report a failed write only at close
        # (NFS flushes then: a quota, a full disk), and the old file must stay in place
        os.close(fd)
        if by_path:
            write(-1, tmp)
        os.replace(tmp, dest)
    except OSError as err:
        _discard(tmp)
        if err.filename not in (None, str(tmp)):  # about another file (a blob it read)
            raise
        raise _about(dest, err) from err
    except BaseException:
        _discard(tmp)
        raise
    return None if written is None else _as_renamed(dest, written)


def _as_renamed(dest: Path, written: os.stat_result) -> os.stat_result | None:
    """``dest``'s stat just after the rename when it is still the file written (the same
    inode, size and mtime: nothing replaced or wrote to it since the last write), else None."""
    try:
        renamed = os.lstat(dest)
    except OSError:  # removed already: nothing to key
        return None
    same = (renamed.st_dev, renamed.st_ino, renamed.st_size, renamed.st_mtime_ns) == (
        written.st_dev,
        written.st_ino,
        written.st_size,
        written.st_mtime_ns,
    )
    return renamed if same else None


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
    "RawFileWriter",
    "sha256_file",
    "write_atomically",
    "write_file_atomically",
]
