"""Remember what a scan of an unchanged input file found, so ``plan`` need not re-read it.

An entry is keyed by the file's absolute path and the scan's options, and is valid only while
the file's size, mtime, ctime and inode are what they were when it was scanned (any write
changes at least one of them). A file changed under ``RACY_WINDOW_S`` before its scan could
change again in the same timestamp tick without changing its stamp: its entry is marked
``verify`` and used only when the file's bytes, hashed again, are still the content the
report describes (its sha256), as git treats a racily clean index entry: a read and a hash
instead of a scan and a new request index. Such an entry is trusted on its stamp alone once
the file is older than the window. Only clean reports are kept: a file with problems is
always re-scanned, so its problems are reported in full every time.

One read of a new input does both jobs of the loader and the validator: the loader hashes an
input with the scan its resource is validated by (``facts_for``), so the validation that
follows finds that scan in memory. For OpenAI's rules that scan is a *generic* one (no
endpoint or model given) when it settles them: one url equal to the manifest's endpoint and
one model equal to the manifest's model, and the stricter scan would find nothing more. Rules
a generic scan cannot settle (a dialect, a custom_id pattern, moderations) go straight to
their own scan: it hashes the input as well as any. A file's content hash is then whatever
scan of it this run holds for its current stat (``sha256``, ``require_unchanged``). The cache
is a small SQLite file beside the state database; deleting it only costs a re-read.

The same read writes the input's request index (``batchspec.wire.request_index``) into
``index_dir``, named by the content's sha256, when the input is clean: what sharding, the
request ledger and batch files need of every request line, so that ``apply`` parses an input
once (``request_index``). An index describes content, not a path: it is used only for a
file whose sha256 is the one asked for, and a file that changed since its scan is scanned
again (``require_unchanged``), never trusted. Deleting the folder only costs a re-read, so
indexes unused for ``INDEX_KEEP_S`` are removed when a new one is written.

The index of a small input (``INLINE_INPUT_MAX_BYTES``) is kept in memory and in the cache
database, on its scan's entry, instead of a file of its own: a fleet of small manifests would
otherwise create a file per input on its first pass (1,000 of them cost a first ``plan`` about
a second on a slow disk). It is trusted on the same terms as a file (whole, undamaged, of
the content asked for: ``index_bytes_complete``). The entries of files that no longer
exist are dropped by the next run that stores an entry, as unused index files are pruned.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from batchspec.storage.private import ensure_private_dir
from batchspec.wire.inputs import InputReport, file_sha256, scan_batch_input
from batchspec.wire.request_index import (
    InputChangedError,
    RequestFact,
    RequestIndexWriter,
    index_bytes_complete,
    is_complete,
    read_request_index,
    read_request_index_bytes,
    remember_complete,
)
from batchspec.workspace.resolving import FolderResolver

_SCHEMA = """
create table if not exists input_scans7 (
    path text not null, options text not null,
    size integer, mtime_ns integer, ctime_ns integer, inode integer,
    report text not null,
    verify integer not null,
    request_index blob,
    primary key (path, options)
)
"""
#: earlier tables (dropped: it costs one re-read): before racy entries were kept, before
#: small inputs' request indexes were kept on their entries, before the output bound
#: counted every choice a request asks for (``n``) and limits given as ``100.0`` or ``"100"``,
#: before a chat line without messages was refused, and before a message of no known role
#: or an output-token limit below 1 (or not an integer) was (their scans said it was valid),
#: before a request without an output limit was bounded at its model's most, not 4,096,
#: and before ``stream`` and sampling parameters out of range were refused
#: (``request_checks.sampling_problem``: an upgraded run took the old clean scan and
#: uploaded them)
_OLD_TABLES = (
    "scans",
    "input_scans",
    "input_scans2",
    "input_scans3",
    "input_scans4",
    "input_scans5",
    "input_scans6",
)


#: seconds a file must be unchanged before its scan is kept (timestamps tick up to 2 s)
RACY_WINDOW_S = 2.0
#: seconds a request index is kept after its last use (a lost one costs one re-read)
INDEX_KEEP_S = 14 * 24 * 3600
#: inputs up to this size keep their request index in memory and the cache database, while
#: the indexes a run holds so take up to ``INLINE_TOTAL_MAX_BYTES`` (then files again)
INLINE_INPUT_MAX_BYTES = 64 * 1024
INLINE_TOTAL_MAX_BYTES = 32 * 1024 * 1024


class InputCache:
    def __init__(
        self,
        db_path: Path | None,
        *,
        racy_window: float | None = None,
        index_dir: Path | None = None,
    ) -> None:
        self.racy_window = RACY_WINDOW_S if racy_window is None else racy_window
        self.memory: dict[tuple[str, str], tuple[tuple[int, ...], InputReport]] = {}
        # per resolved path: the stat and content hash of the last scan of it (any rules)
        self.hashed: dict[str, tuple[tuple[int, ...], str]] = {}
        self._pending: list[tuple[Any, ...]] = []  # entries to store: one transaction on close
        self._resolved_paths: dict[Path, str] = {}
        self._folders = FolderResolver()  # each input's folder resolved once a run
        self.conn: sqlite3.Connection | None = None
        if db_path is not None:
            self.conn = _open_db(db_path)
        self.index_dir = index_dir
        self._private_dir: str | None = None  # indexes when index_dir cannot be written
        self._written_to: set[Path] = set()  # folders pruned on close: once a run, not per write
        self._inline: dict[str, bytes] = {}  # small inputs' indexes, by content sha256
        self._inline_bytes = 0
        #: the keys the cache held when first asked (one query, not one per new input)
        self._stored: set[tuple[str, str]] | None = None

    def close(self) -> None:
        for folder in self._written_to:
            _prune_indexes(folder)
        self._written_to.clear()
        if self.conn is not None:
            self._flush(self.conn)
            self.conn.close()
            self.conn = None
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    def __enter__(self) -> InputCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sha256(self, path: Path) -> str:
        """The content hash: from this run's scan of ``path`` with any rules while its stat is
        unchanged, else from a generic scan (cached): the loader's ``hash_input``."""
        known = self.hashed.get(self._resolved(path))
        if known is not None and known[0] == _stamp(path):
            return known[1]
        return self.scan(path).sha256

    def scan(self, path: Path, **options: Any) -> InputReport:
        key = (self._resolved(path), json.dumps(options, sort_keys=True))
        seen_ns = time.time_ns()
        stamp = _stamp(path)
        hit = self.memory.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        # a file changed within the racy window could be rewritten within the same
        # timestamp tick, keeping its stamp: its entry is then checked against its bytes
        racy = max(stamp[1], stamp[2]) > seen_ns - int(self.racy_window * 1e9)
        report = self._load(key, stamp, path, racy=racy)
        if report is None:
            report = self._scan_and_index(path, options, self._writable_index_dir)
            if report.ok:
                self._store(key, stamp, report, verify=racy, index=self._inline.get(report.sha256))
        self.memory[key] = (stamp, report)
        self.hashed[key[0]] = (stamp, report.sha256)
        return report

    def _resolved(self, path: Path) -> str:
        """The cache key's path, resolved once per path a run (an lstat per component each
        time otherwise; an input is scanned five times a pass). Only a key: what a hit means
        is decided by the stamp of ``path`` itself, so a symlink moved mid-run to another
        file misses (another inode) and that file is scanned."""
        resolved = self._resolved_paths.get(path)
        if resolved is None:
            resolved = self._resolved_paths[path] = str(self._folders.resolve(path))
        return resolved

    def facts_for(
        self,
        path: Path,
        *,
        endpoint: str,
        model: str | None,
        custom_id_pattern: str | None = None,
        allow_unversioned_url: bool = False,
        dialect: str = "openai",
        strict_params: bool = True,
        default_max_tokens: int | None = None,
    ) -> InputReport:
        """The scan with the manifest's rules, reusing the generic scan when it settles it
        (a generic scan holds requests to the strict rules: a clean one settles lax ones).

        Rules a generic scan can never settle skip it: the file is read once, by their scan."""
        settles = (
            custom_id_pattern is None and dialect == "openai" and endpoint != "/v1/moderations"
        )
        if settles:
            generic = self.scan(path)
            url_key = _versioned if allow_unversioned_url else (lambda u: u)
            if (
                generic.ok
                and tuple(url_key(u) for u in generic.urls) == (url_key(endpoint),)
                and (model is None or generic.models == (model,))
            ):
                return generic
        return self.scan(
            path,
            endpoint=endpoint,
            model=model,
            custom_id_pattern=custom_id_pattern,
            allow_unversioned_url=allow_unversioned_url,
            # only when set: the cache keys of OpenAI-dialect scans stay what they were
            **({"dialect": dialect} if dialect != "openai" else {}),
            **({} if strict_params else {"strict_params": False}),
            **({"default_max_tokens": default_max_tokens} if default_max_tokens else {}),
        )

    def request_facts(self, path: Path, sha256: str) -> Iterator[RequestFact]:
        """The requests of content ``sha256``, the content of ``path``, from its request
        index: the one kept from an earlier scan, or made by reading ``path`` once more
        (``InputChangedError`` if it no longer holds that content)."""
        index = self._request_index(path, sha256)
        if isinstance(index, bytes):
            return read_request_index_bytes(index)
        return read_request_index(index)

    def copy_request_index(self, path: Path, sha256: str, dest: Path) -> None:
        """Write the request index of content ``sha256`` (see ``request_facts``) to ``dest``."""
        index = self._request_index(path, sha256)
        if isinstance(index, bytes):
            dest.write_bytes(index)
        else:
            shutil.copyfile(index, dest)

    def _request_index(self, path: Path, sha256: str) -> bytes | Path:
        """A small input's index (its bytes), else the index file."""
        inline = self._inline.get(sha256)
        if inline is not None:
            return inline
        folder = self._writable_index_dir() or self._private_index_dir()
        kept = folder / f"{sha256}.idx"
        if is_complete(kept, sha256):  # whole, undamaged, and of this content
            with contextlib.suppress(OSError):  # in use: not pruned
                os.utime(kept)
                remember_complete(kept, sha256)  # its new stamp: still the bytes checked
            return kept
        # the content was validated under its resource's rules: its index is kept even when
        # the generic scan that remakes it objects (an Anthropic {custom_id, params} line)
        report = self._scan_and_index(path, {}, folder, keep=sha256)
        if report.sha256 != sha256:
            raise _changed(path)
        inline = self._inline.get(sha256)
        if inline is not None:
            return inline
        if not is_complete(kept, sha256):  # a line without a custom_id: never validated
            raise InputChangedError(f"{path}: the input has problems; validate it first")
        return kept

    def require_unchanged(self, path: Path, sha256: str) -> None:
        """Raise ``InputChangedError`` unless ``path`` still holds content ``sha256`` (a stat
        when it is unchanged since its scan, whatever its rules; a changed file is scanned
        again)."""
        if self.sha256(path) != sha256:
            raise _changed(path)

    def _scan_and_index(
        self,
        path: Path,
        options: dict[str, Any],
        folder: Path | Callable[[], Path | None] | None,
        *,
        keep: str = "",
    ) -> InputReport:
        """Scan ``path``, writing its request index into ``folder`` in the same pass; the index
        is kept when the scan is clean, or when the content is ``keep`` (a sha256 validated
        before) and every request line was indexed. A small input's index is kept in
        ``_inline`` instead (``folder`` is not needed for it: given as a callable, it is
        asked for only when a file is written, so a fleet of small inputs does not make and
        check the folder once per input)."""
        with contextlib.suppress(OSError):
            if (
                os.stat(path).st_size <= INLINE_INPUT_MAX_BYTES
                and self._inline_bytes < INLINE_TOTAL_MAX_BYTES
            ):
                buffer = io.BytesIO()
                writer = RequestIndexWriter(buffer)
                report = scan_batch_input(path, **options, index=writer)
                writer.finish(report.sha256)
                if report.ok or (report.sha256 == keep and writer.records == report.requests):
                    self._keep_inline(report.sha256, buffer.getvalue())
                return report
        if callable(folder):
            folder = folder()
        if folder is None:
            return scan_batch_input(path, **options)
        try:
            return self._scan_into(path, options, folder, keep)
        except OSError as err:
            if err.errno not in _WRITE_ERRNOS or folder != self.index_dir:
                raise
            # the index folder's disk is full: a cache, so this run indexes in a folder of
            # its own (removed on close) instead of failing as if the input were unreadable
            self.index_dir = None
            return self._scan_into(path, options, self._private_index_dir(), keep)

    def _scan_into(
        self, path: Path, options: dict[str, Any], folder: Path, keep: str
    ) -> InputReport:
        """``_scan_and_index`` writing the index into the file ``folder/<sha256>.idx``."""
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        except OSError as err:
            raise _index_unwritable(folder, err) from err
        try:
            with os.fdopen(fd, "wb") as f:
                writer = RequestIndexWriter(f)
                report = scan_batch_input(path, **options, index=writer)
                writer.finish(report.sha256)
            whole = report.sha256 == keep and writer.records == report.requests
            if report.ok or whole:
                os.replace(tmp, folder / f"{report.sha256}.idx")
                remember_complete(folder / f"{report.sha256}.idx", report.sha256)
                self._written_to.add(folder)
        except OSError as err:
            if err.errno not in _WRITE_ERRNOS or err.filename not in (None, tmp):
                raise  # the input's own (a read that failed): said as such
            raise _index_unwritable(folder, err) from err
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return report

    def _keep_inline(self, sha256: str, index: bytes) -> None:
        """Hold a small input's index, unless the run holds ``INLINE_TOTAL_MAX_BYTES`` of them
        (one not held is read again from its input when needed, into a file)."""
        if sha256 not in self._inline and self._inline_bytes < INLINE_TOTAL_MAX_BYTES:
            self._inline[sha256] = index
            self._inline_bytes += len(index)

    def _writable_index_dir(self) -> Path | None:
        if self.index_dir is None:
            return None
        try:
            ensure_private_dir(self.index_dir)  # indexes of requests: private as the state
        except OSError:
            return None
        return self.index_dir if os.access(self.index_dir, os.W_OK) else None

    def _private_index_dir(self) -> Path:
        """Indexes of a cache without a writable ``index_dir``: removed by ``close``."""
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="batchspec-index-")
        return Path(self._private_dir)

    def _load(
        self, key: tuple[str, str], stamp: tuple[int, ...], path: Path, *, racy: bool
    ) -> InputReport | None:
        if self.conn is None or key not in self._stored_keys(self.conn):
            return None
        try:
            row = self.conn.execute(
                "select size, mtime_ns, ctime_ns, inode, report, verify, request_index "
                "from input_scans7 where path = ? and options = ?",
                key,
            ).fetchone()
        except sqlite3.Error:  # a damaged cache costs a re-read, never the run
            return None
        if row is None or tuple(row[:4]) != stamp:
            return None
        report = _report(row[4])
        index = row[6]
        if report is not None and isinstance(index, bytes):
            if not index_bytes_complete(index, report.sha256):
                return None  # damaged: scanned again, which writes it anew
            self._keep_inline(report.sha256, index)
        if report is None or not row[5]:
            return report
        try:  # stored racy: the stamp proves nothing, the bytes must still be that content
            same = file_sha256(path) == report.sha256
        except OSError:
            return None
        if same and not racy:  # settled since: its stamp is proof enough from now on
            self._store(key, stamp, report, verify=False, index=index)
        return report if same else None

    def _stored_keys(self, conn: sqlite3.Connection) -> set[tuple[str, str]]:
        """The ``(path, options)`` keys of the stored entries, read on the first lookup: a
        key not among them is a miss without a query of its own (a first pass over 1,000 new
        inputs made 1,000). Entries are written only on ``close``, and another run's written
        meanwhile would only be missed: a cache."""
        if self._stored is None:
            try:
                self._stored = set(conn.execute("select path, options from input_scans7"))
            except sqlite3.Error:  # a damaged cache costs a re-read, never the run
                self._stored = set()
        return self._stored

    def _store(
        self,
        key: tuple[str, str],
        stamp: tuple[int, ...],
        report: InputReport,
        *,
        verify: bool,
        index: bytes | None,
    ) -> None:
        if self.conn is None:
            return
        self._pending.append((*key, *stamp, report_json(report), int(verify), index))

    def _flush(self, conn: sqlite3.Connection) -> None:
        """Store the run's new entries in one transaction (one per entry cost a first pass
        over 1,000 new inputs 0.3 s), and drop the entries of files gone (``_gone_paths``);
        a busy or damaged cache only costs a re-read."""
        if not self._pending:
            return
        with contextlib.suppress(sqlite3.Error):
            gone = _gone_paths(conn)  # stat'ed before the write lock is taken
            conn.execute("begin immediate")
            try:
                conn.executemany(
                    "insert or replace into input_scans7 values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    self._pending,
                )
                conn.executemany("delete from input_scans7 where path = ?", gone)
            except BaseException:
                conn.execute("rollback")
                raise
            conn.execute("commit")
        self._pending.clear()


#: a write that failed with one of these failed for its disk (full, a quota, a size limit)
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _index_unwritable(folder: Path, err: OSError) -> OSError:
    """The error of an index that could not be written, naming the folder written to (a
    buffered write's error names no file; the manifest's error would blame the input)."""
    return OSError(err.errno, f"{err.strerror or err}: {folder}", str(folder))


def _gone_paths(conn: sqlite3.Connection) -> list[tuple[str]]:
    """The cached paths that no longer exist, for deletion: an entry carries a small input's
    whole request index, and inputs named anew each run (dated files, temporary checkouts)
    would otherwise grow the cache without end, where index files are pruned
    (``INDEX_KEEP_S``). A stat per path, on runs that store new entries only."""
    paths = [row[0] for row in conn.execute("select distinct path from input_scans7")]
    return [(path,) for path in paths if not os.path.exists(path)]


_REPORT_FIELDS = tuple(f.name for f in fields(InputReport))


def report_json(report: InputReport) -> str:
    """``json.dumps(asdict(report))``, the stored form of a report: where it holds no
    problems (nothing nested) without asdict's deep copy of every value, a fifth of a
    small input's first scan."""
    if report.problems:
        return json.dumps(asdict(report))
    return json.dumps({name: getattr(report, name) for name in _REPORT_FIELDS})


def _report(text: str) -> InputReport | None:
    """A stored report, or None when it no longer fits ``InputReport``."""
    try:
        data = json.loads(text)
        return InputReport(
            **{
                **data,
                "models": tuple(data["models"]),
                "urls": tuple(data["urls"]),
                "max_output_tokens": int(data["max_output_tokens"]),  # older: scan again
                "problems": (),
            }
        )
    except (ValueError, TypeError, KeyError):  # written by another version: scan again
        return None


def _open_db(db_path: Path) -> sqlite3.Connection | None:
    """The cache database, or None when it cannot be used (read-only folder, damaged file):
    the cache only saves re-reads, so the run goes on without it."""
    conn = None
    try:
        ensure_private_dir(db_path.parent)
        if not db_path.exists():
            os.close(os.open(db_path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(db_path, isolation_level=None)
        conn.execute("pragma journal_mode=wal")
        # a cache: no fsync per entry (WAL keeps it whole; a power cut costs a re-read)
        conn.execute("pragma synchronous=normal")
        conn.execute(_SCHEMA)
        for old in _OLD_TABLES:
            conn.execute(f"drop table if exists {old}")
    except (OSError, sqlite3.Error):
        if conn is not None:
            conn.close()
        return None
    return conn


def _prune_indexes(folder: Path) -> None:
    """Remove request indexes (and leftover partial ones) unused for ``INDEX_KEEP_S``; one
    written or used by this run is fresh, so it stays."""
    old = time.time() - INDEX_KEEP_S
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < old:
                    os.unlink(entry.path)


def index_dir_beside(state_path: Path) -> Path:
    """The folder of request indexes beside a state database (``state/input-index/``)."""
    return state_path.parent / "input-index"


def _changed(path: Path) -> InputChangedError:
    return InputChangedError(
        f"{path}: the input changed after it was validated; nothing was submitted from it",
        details=["run the command again: the input is validated anew"],
    )


def _stamp(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _versioned(url: str) -> str:
    return url if url.startswith("/v1/") else "/v1" + url
