"""Moving a state between databases: SQLite to PostgreSQL and back, and SQLite audit copies.

``copy_state(source, target)`` copies every row of an open state into a new one (a
``postgresql://`` URL or an SQLite file's path) and proves the copy before keeping it.
``batchspec.core.state_move`` takes the source's run lock around it and names the target;
``batchspec state migrate`` and ``batchspec state export`` are its faces.

Promises:

* All or nothing. PostgreSQL: the schema (our migrations), every row, the identity sequences
  and the check are one transaction holding the target's writer lock; a failure rolls it all
  back, so the database is as it was. SQLite: the file is built beside the path under a
  temporary name and linked into place only once checked (``replace=True``: renamed over an
  existing file), so the path never holds half a state.
* A target that is not empty is refused before anything is written: a PostgreSQL database
  (or schema) holding a state with any row (a lock included), another application's tables
  named like ours, or a newer batchspec's schema; an SQLite path that exists, unless
  ``replace``.
* Identical rows. Every table but the locks (``resource_locks``) is copied with its ids, so
  events, runs and generations keep their numbers and the audit log reads the same. The
  source is read in one snapshot (SQLite: one read transaction; PostgreSQL: REPEATABLE
  READ), so a ``plan`` that records a run meanwhile cannot tear the copy. Inserting fires
  the target's triggers: the append-only guard on ``events`` (it allows INSERT) and the
  ``state_serial`` bumps, so the serial is set to the source's afterwards; PostgreSQL's
  identity sequences are moved past the copied ids, so the next run gets a new number. Locks
  are never copied: the source's rows are the copying run's own, and a new state starts
  unlocked. The migration history is the target's own (the same names; the dates say when
  its schema was made).
* Checked before it is kept: per table, the target's row count and an order-free digest of
  its rows (sha256 of each row, summed) equal the source's, and so does ``state_serial``; a
  difference is a ``StateError`` and nothing is kept.
* Blobs (the result store the state references) go through ``copy_blobs`` alone: each is
  read from wherever it is, checked against its sha256 as it streams (a damaged one stops
  the move), and written into a PostgreSQL target's blob tables inside the copy's
  transaction, or into the store beside an SQLite target in another folder. Nothing here
  prints.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchspec.errors import StateError
from batchspec.state.connection import BUSY_TIMEOUT_SECONDS, StateLocation, refuse_foreign_postgres
from batchspec.state.schema import MIGRATIONS
from batchspec.storage.blobstore import BlobStore
from batchspec.storage.database_url import is_database_url
from batchspec.storage.private import create_private_file, ensure_private_dir
from batchspec.storage.remote_blobs import (
    RemoteBlobs,
    file_chunks,
    insert_blob,
    stored_blob,
    verified,
)
from batchspec.storage.sql import PostgresSql, Sql, SqliteSql, checkpoint_now

#: the tables copied, in an order that satisfies every foreign key, with their sort keys
#: (``resources.current_generation_id`` points forward: it is filled in after generations)
COPIED_TABLES: tuple[tuple[str, str], ...] = (
    ("runs", "id"),
    ("resources", "name"),
    ("generations", "id"),
    ("files", "provider, sha256"),
    ("batches", "id"),
    ("requests", "generation_id, custom_id"),
    ("events", "id"),
)
#: tables whose ``id`` is an identity column in PostgreSQL (its sequence follows the copy)
IDENTITY_TABLES = ("runs", "generations", "batches", "events")
#: two column names PostgreSQL reserves: quoted in both dialects
_RESERVED = frozenset({"user", "offset"})
_CHUNK = 2000
_DIGEST_MOD = 1 << 256


@dataclass(frozen=True)
class TableCopy:
    """One table as copied: its rows in the source and in the target (checked equal)."""

    table: str
    rows: int


@dataclass(frozen=True)
class BlobReport:
    """The result-store blobs the state references, as ``copy_blobs`` found them."""

    referenced: int = 0
    verified: int = 0
    bytes: int = 0
    #: referenced, but not in this machine's store (collected on another runner, or lost)
    missing: tuple[str, ...] = ()
    #: copied into the target's store (an SQLite target in another folder)
    copied: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "referenced": self.referenced,
            "verified": self.verified,
            "bytes": self.bytes,
            "missing": list(self.missing),
            "copied": self.copied,
        }


@dataclass(frozen=True)
class StateCopy:
    """What ``copy_state`` copied and checked."""

    source: str
    target: str
    #: ``"sqlite"`` or ``"postgresql"``
    target_dialect: str
    tables: tuple[TableCopy, ...]
    state_serial: int
    blobs: BlobReport = field(default_factory=BlobReport)

    @property
    def rows(self) -> dict[str, int]:
        return {t.table: t.rows for t in self.tables}

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "target_dialect": self.target_dialect,
            "tables": self.rows,
            "state_serial": self.state_serial,
            "blobs": self.blobs.to_json(),
        }


#: ``copy_blobs``'s signature: (source db, target db) -> report; run inside both transactions
BlobCopier = Callable[[Sql, Sql], BlobReport]


def copy_state(
    source: Sql,
    target: StateLocation,
    *,
    copy_blobs: BlobCopier | None = None,
    replace: bool = False,
    journal_mode: str = "WAL",
) -> StateCopy:
    """Copy every row of the state ``source`` into the new state ``target``, checked.

    ``source`` is an open, migrated state connection, used from this thread only; the caller
    holds its run lock if it must not change meanwhile. ``target`` is a PostgreSQL URL or an
    SQLite path (``replace``: an existing file is replaced whole; ``journal_mode``: the new
    file's, ``WAL`` for a state, ``DELETE`` for a single-file copy). ``copy_blobs`` is called
    once the rows are in, inside the target's transaction.
    """
    if is_database_url(target):
        assert isinstance(target, str)
        return _copy_to_postgres(source, target, copy_blobs)
    _refuse_url(target)
    return _copy_to_sqlite(source, Path(target), copy_blobs, replace, journal_mode)


def check_target(target: StateLocation, *, replace: bool = False) -> None:
    """Refuse, by reading only, a target ``copy_state`` would refuse: so that a move fails
    before it takes the source's lock or reads a row. (``copy_state`` checks again, inside
    its transaction: this is the early answer, not the guarantee.)"""
    if not is_database_url(target):
        _refuse_url(target)
        _refuse_existing_file(Path(target).expanduser(), replace)
        return
    assert isinstance(target, str)
    db = PostgresSql.connect(target, busy_timeout=BUSY_TIMEOUT_SECONDS)
    try:
        refuse_foreign_postgres(db)
        if MIGRATIONS.applied(db):
            MIGRATIONS.refuse_unknown(db)
            _refuse_non_empty(db)
    finally:
        db.close()


def _refuse_url(target: StateLocation) -> None:
    if isinstance(target, str) and "://" in target:
        scheme = target.partition("://")[0]
        raise StateError(
            f"cannot move the state to a {scheme}:// URL: a state is an SQLite file (a path) "
            "or a PostgreSQL database (postgresql://user@host:5432/db)"
        )


def _refuse_existing_file(path: Path, replace: bool) -> None:
    if path.is_dir():
        raise StateError(f"{path} is a folder; name the SQLite file to write, e.g. {path}/x.db")
    if path.exists() and not path.is_file():  # --force replaces a file, never /dev/null
        raise StateError(
            f"{path} is not a regular file (a device, a FIFO or a socket) and is never "
            "replaced; name the SQLite file to write, e.g. state.db"
        )
    if os.path.lexists(path) and not replace:
        raise StateError(
            f"{path} exists already; the state is copied only into a new file, never over "
            "another (move it away, or choose another path)"
        )


# -- targets -------------------------------------------------------------------------------------


def _copy_to_postgres(source: Sql, url: str, copy_blobs: BlobCopier | None) -> StateCopy:
    db = PostgresSql.connect(url, busy_timeout=BUSY_TIMEOUT_SECONDS)
    try:
        refuse_foreign_postgres(db)
        return _copy_in_transaction(source, db, copy_blobs)
    finally:
        db.close()


def _copy_to_sqlite(
    source: Sql, path: Path, copy_blobs: BlobCopier | None, replace: bool, journal_mode: str
) -> StateCopy:
    path = path.expanduser()
    _refuse_existing_file(path, replace)
    try:
        ensure_private_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
        create_private_file(tmp)
    except OSError as err:
        raise StateError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        conn = sqlite3.connect(tmp, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            conn.execute(f"PRAGMA journal_mode = {journal_mode}")
            conn.execute("PRAGMA foreign_keys = ON")
            db = SqliteSql(conn)
            db.label = str(path)
            result = _copy_in_transaction(source, db, copy_blobs)
            checkpoint_now(conn)  # else a full disk places a file without the rows
        finally:
            conn.close()
        _place(tmp, path, replace)
    except sqlite3.OperationalError as err:  # the copy's disk, not the state's, is full
        raise StateError(
            f"cannot write {path}: {err}; nothing was written there: check that its disk has "
            "room and its folder is writable"
        ) from err
    finally:
        for leftover in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-wal", "-shm"))):
            leftover.unlink(missing_ok=True)
    return result


def _place(tmp: Path, path: Path, replace: bool) -> None:
    """Link the finished file into place: never over a file unless ``replace``."""
    if replace:
        for sibling in (path.with_name(path.name + s) for s in ("-wal", "-shm")):
            sibling.unlink(missing_ok=True)  # an old WAL must not be read into the new file
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError as err:
        raise StateError(
            f"{path} appeared while the state was being copied; nothing written"
        ) from err
    except OSError:  # a filesystem without hard links
        if os.path.lexists(path):
            raise StateError(f"{path} exists already; nothing written") from None
        os.replace(tmp, path)


# -- the copy ------------------------------------------------------------------------------------


def _copy_in_transaction(source: Sql, target: Sql, copy_blobs: BlobCopier | None) -> StateCopy:
    target.begin_writer()
    try:
        MIGRATIONS.apply(target)  # refuses a newer schema; a savepoint inside our transaction
        _refuse_non_empty(target)
        with _snapshot(source):
            expected = _copy_rows(source, target)
            serial = _state_serial(source)
            _finish(target, serial)
            _check(target, expected, serial)
            blobs = copy_blobs(source, target) if copy_blobs is not None else BlobReport()
        target.commit()
    except BaseException:
        target.rollback()
        raise
    tables = tuple(TableCopy(table, count) for table, (count, _) in expected.items())
    return StateCopy(source.label, target.label, target.dialect, tables, serial, blobs)


def _refuse_non_empty(target: Sql) -> None:
    present = set(target.table_names())  # an older schema may lack a table yet
    held = [
        f"{table} ({count})"
        for table in (*(t for t, _ in COPIED_TABLES), "lock", "resource_locks", "blobs")
        if table in present
        and (count := target.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    ]
    if held:
        raise StateError(
            f"the target {target.label} is not empty: it holds a state with rows in "
            f"{', '.join(held)}; moving a state needs an empty database (or schema), so "
            "nothing was written. Point --to at a new database, or a new schema: "
            "?options=-csearch_path%3Dname"
        )


@contextmanager
def _snapshot(source: Sql) -> Iterator[None]:
    """One consistent view of the source for every read of the copy (then rolled back)."""
    if source.in_transaction:  # the caller's transaction is the snapshot
        yield
        return
    if source.dialect == "postgresql":
        source.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    else:
        source.execute("BEGIN")
        source.execute("SELECT count(*) FROM state_serial")  # WAL: the snapshot starts here
    try:
        yield
    finally:
        source.rollback()


def _copy_rows(source: Sql, target: Sql) -> dict[str, tuple[int, int]]:
    """Insert every row of each copied table; (count, digest) per table, as read."""
    expected: dict[str, tuple[int, int]] = {}
    columns = table_columns()
    for table, key in COPIED_TABLES:
        names = columns[table]
        listed = ", ".join(_quote(c) for c in names)
        insert = f"INSERT INTO {table} ({listed}) VALUES ({', '.join('?' for _ in names)})"
        forward = names.index("current_generation_id") if table == "resources" else None
        count, digest = 0, 0
        for rows in source.stream(f"SELECT {listed} FROM {table} ORDER BY {key}", _CHUNK):
            count += len(rows)
            digest = (digest + _rows_digest(rows)) % _DIGEST_MOD
            if forward is not None:  # its generation is not copied yet
                rows = [(*r[:forward], None, *r[forward + 1 :]) for r in rows]
            target.executemany(insert, rows)
        expected[table] = (count, digest)
        if table == "generations":
            _link_current_generations(source, target)
    return expected


def _link_current_generations(source: Sql, target: Sql) -> None:
    for rows in source.stream(
        "SELECT current_generation_id, name FROM resources "
        "WHERE current_generation_id IS NOT NULL ORDER BY name",
        _CHUNK,
    ):
        target.executemany("UPDATE resources SET current_generation_id = ? WHERE name = ?", rows)


def _state_serial(db: Sql) -> int:
    row = db.execute("SELECT value FROM state_serial WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def _finish(target: Sql, serial: int) -> None:
    """Undo what the triggers counted while inserting, and move identity sequences on."""
    target.execute("UPDATE state_serial SET value = ? WHERE id = 1", (serial,))
    if target.dialect != "postgresql":
        return  # SQLite: AUTOINCREMENT follows explicit ids by itself
    for table in IDENTITY_TABLES:
        target.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
            f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
        )


def _check(target: Sql, expected: dict[str, tuple[int, int]], serial: int) -> None:
    columns = table_columns()
    for table, key in COPIED_TABLES:
        listed = ", ".join(_quote(c) for c in columns[table])
        count, digest = 0, 0
        for rows in target.stream(f"SELECT {listed} FROM {table} ORDER BY {key}", _CHUNK):
            count += len(rows)
            digest = (digest + _rows_digest(rows)) % _DIGEST_MOD
        want_count, want_digest = expected[table]
        if count != want_count or digest != want_digest:
            what = f"{count} rows, not {want_count}" if count != want_count else "rows differ"
            raise StateError(
                f"the copy of {table} in {target.label} does not match the source ({what}); "
                "nothing was kept"
            )
    if _state_serial(target) != serial:
        raise StateError(f"the state serial of {target.label} does not match; nothing was kept")


def _rows_digest(rows: Iterable[Sequence[Any]]) -> int:
    total = 0
    for row in rows:
        text = json.dumps(list(row), default=str, ensure_ascii=False, separators=(",", ":"))
        total += int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")
    return total % _DIGEST_MOD


def _quote(column: str) -> str:
    return f'"{column}"' if column in _RESERVED else column


@functools.cache
def table_columns() -> dict[str, list[str]]:
    """Each copied table's columns, in order, as the migrations make them (both dialects)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        MIGRATIONS.apply(SqliteSql(conn))
        return {
            table: [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            for table, _ in COPIED_TABLES
        }
    finally:
        conn.close()


# -- blobs ---------------------------------------------------------------------------------------

#: where a state names blobs of the result store (downloaded output and error files)
_BLOB_REFERENCES = (
    "SELECT output_sha256 FROM batches WHERE output_sha256 IS NOT NULL "
    "UNION SELECT errors_sha256 FROM batches WHERE errors_sha256 IS NOT NULL "
    "UNION SELECT blob FROM requests WHERE blob IS NOT NULL "
    # the shard files of batches not collected yet: whoever runs next may (re)submit them;
    # a batch sent the generation's whole input was sent the checkout's own input file (or
    # its rendering, rebuilt from the rows), which no result store holds
    "UNION SELECT b.input_sha256 FROM batches b JOIN generations g ON g.id = b.generation_id "
    "WHERE b.output_sha256 IS NULL AND b.input_sha256 <> g.input_sha256"
)


#: the request indexes kept in the result store for generations whose ledger is written
#: after their creates (``intent.keep_request_index``, named on an ``intent`` event) and not
#: written yet: a run killed between the create and the ledger leaves it to be derived from
#: that copy, by a runner whose input or index folder may no longer hold that content
_KEPT_REQUEST_INDEXES = (
    "SELECT e.detail FROM events e WHERE e.action = 'intent' "
    "AND e.detail LIKE '%\"request_index\"%' "
    "AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.generation_id = e.generation_id)"
)


def referenced_blobs(db: Sql) -> list[str]:
    """The sha256 of every result-store blob the state ``db`` references, sorted."""
    shas = {row[0] for rows in db.stream(_BLOB_REFERENCES) for row in rows}
    for rows in db.stream(_KEPT_REQUEST_INDEXES):
        for (detail,) in rows:
            kept = json.loads(detail).get("request_index")
            if isinstance(kept, str):
                shas.add(kept)
    return sorted(shas)


def copy_blobs(
    source: Sql,
    target: Sql,
    *,
    local: BlobStore,
    target_local: BlobStore | None = None,
    shared: RemoteBlobs | None = None,
    shards: Path | None = None,
) -> BlobReport:
    """Carry the state's result blobs along with its rows; the one place that does.

    Every blob the source references is looked for, in order, in this machine's result
    store (``local``, ``state/store/``) and shard files (``shards``, ``state/shards/``), in
    the source's own database (a PostgreSQL state
    keeps its blobs there) and in the project's ``state.blobs`` tier (``shared``), and its
    sha256 is checked as it is read: a damaged one is a ``StateError``, the move stops and
    nothing is kept. Where it goes:

    * ``shared`` given: nowhere; the tier stays where it is and serves the target as well.
    * a PostgreSQL target: into its ``blobs`` tables, on ``target`` inside the copy's
      transaction, so the rows and the blobs land together or not at all.
    * an SQLite target in another folder (``target_local``, the store beside it): there.

    A blob found nowhere (collected on a runner whose store is gone) is reported as missing.
    """
    shas = referenced_blobs(source)
    verified_count, size, copied, missing = 0, 0, 0, []
    into_db = shared is None and isinstance(target, PostgresSql)
    into_folder = (
        shared is None
        and not into_db
        and target_local is not None
        and target_local.root.resolve() != local.root.resolve()
    )
    created = into_folder and target_local is not None and not target_local.root.exists()
    try:
        for sha in shas:
            found = _blob_chunks(sha, source, local, shared, shards)
            if found is None:
                missing.append(sha)
                continue
            chunks, where = found
            counted = _Counted(verified(sha, chunks, where))
            if into_db and isinstance(target, PostgresSql) and stored_blob(target, sha, "") is None:
                insert_blob(target, sha, counted)
                copied += 1
            elif into_folder and target_local is not None and not target_local.has(sha):
                with target_local.writer() as writer:
                    for chunk in counted:
                        writer.write(chunk)
                    writer.commit()
                copied += 1
            else:
                for _ in counted:  # read through: the check is the point
                    pass
            verified_count += 1
            size += counted.size
    except BaseException:
        if created and target_local is not None:  # a store made for this move goes with it
            shutil.rmtree(target_local.root, ignore_errors=True)
        raise
    return BlobReport(len(shas), verified_count, size, tuple(missing), copied)


class _Counted:
    """Chunks passed through, their total size counted."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.size += len(chunk)
            yield chunk


def _blob_chunks(
    sha: str, source: Sql, local: BlobStore, shared: RemoteBlobs | None, shards: Path | None
) -> tuple[Iterator[bytes], str] | None:
    """The blob's content (unverified) and where it was found, or None if nowhere."""
    if local.has(sha):
        return file_chunks(local.path(sha)), str(local.path(sha))
    if shards is not None and (shards / f"{sha}.jsonl").is_file():
        return file_chunks(shards / f"{sha}.jsonl"), str(shards / f"{sha}.jsonl")
    if isinstance(source, PostgresSql):
        label = "the source state's database"
        stored = stored_blob(source, sha, label)
        if stored is not None:
            return stored, label
    if shared is not None and shared.has(sha):
        return shared.chunks(sha), shared.label
    return None


__all__ = [
    "COPIED_TABLES",
    "BlobCopier",
    "BlobReport",
    "StateCopy",
    "TableCopy",
    "copy_blobs",
    "check_target",
    "copy_state",
    "referenced_blobs",
    "table_columns",
]
