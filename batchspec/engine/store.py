"""The engine's storage: file contents on disk, content-addressed, and metadata in SQLite.

Layout under the data folder::

    engine.db                  SQLite (WAL): files, batches, results; schema by
                               batchspec.storage.migrations (set "engine")
    files/ab/abcdef…           one blob per distinct content, named by its sha256
    tmp/                       uploads and result files while they are being written
    engine.lock                held (flock) by the one engine process using the folder

Invariants:

- Blobs are kept by the one blob store (``batchspec.storage.blobstore``) rooted at ``files/``
  with its writes in progress in ``tmp/``: a blob is hashed while it streams and renamed into
  ``files/`` only when complete, so a blob path always holds complete content whose sha256 is
  its name.
- The folder, the database (and its -wal/-shm), the lock file and every blob hold full
  requests and answers: they are created private (0700 folders, 0600 files), whatever the
  umask; a folder or database that exists keeps the mode its owner gave it.
- ``results`` holds one row per finished request line (``PRIMARY KEY (batch_id, line)``); a
  row is inserted in the same transaction that adds its counts and usage to the batch, so a
  batch's ``request_counts`` always equal its rows, and a line with a row is never run again.
- Every change of a batch's status is one guarded ``UPDATE … WHERE status IN (…)``, so two
  threads (the HTTP app cancelling, the worker finishing) cannot both move it.
- Writes are serialised by one lock per store; readers use their own connection per thread.
  Commits do not fsync (``synchronous=NORMAL``): a process crash loses nothing committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchspec.errors import StateLockedError
from batchspec.storage.blobstore import BlobStore
from batchspec.storage.migrations import Migrations, run_script, table_exists
from batchspec.storage.private import (
    create_private_file,
    ensure_private_dir,
    restrict_sqlite_siblings,
)
from batchspec.storage.sql import Sql
from batchspec.wire.batch_status import ACTIVE_STATUSES

_ACTIVE_SQL = "(" + ", ".join(f"'{s}'" for s in ACTIVE_STATUSES) + ")"


# ---------------------------------------------------------------------------------------------
# SQLite


def _adopt_legacy_history(db: Sql) -> list[str]:
    """Engine databases made before the shared runner kept their own ``migrations`` table."""
    if not table_exists(db, "migrations"):
        return []
    names = [row[0] for row in db.execute("SELECT name FROM migrations ORDER BY rowid")]
    db.execute("DROP TABLE migrations")
    return names


MIGRATIONS = Migrations("engine", adopt=_adopt_legacy_history)


@MIGRATIONS
def m001_initial(db: Sql) -> None:
    run_script(
        db,
        """
        CREATE TABLE files (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            sha256 TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            filename TEXT NOT NULL,
            purpose TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER
        );
        CREATE INDEX files_sha256 ON files(sha256);
        CREATE TABLE batches (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            input_file_id TEXT NOT NULL,
            input_sha256 TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            metadata TEXT,
            output_expires_after TEXT,
            idempotency_key TEXT NOT NULL,
            model TEXT,
            errors TEXT,
            output_file_id TEXT,
            error_file_id TEXT,
            created_at INTEGER NOT NULL,
            in_progress_at INTEGER,
            expires_at INTEGER,
            finalizing_at INTEGER,
            completed_at INTEGER,
            failed_at INTEGER,
            expired_at INTEGER,
            cancelling_at INTEGER,
            cancelled_at INTEGER,
            deadline REAL NOT NULL,
            total INTEGER NOT NULL DEFAULT 0,
            completed INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            total_tokens INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX batches_status ON batches(status);
        CREATE INDEX batches_idempotency_key ON batches(idempotency_key);
        CREATE TABLE results (
            batch_id TEXT NOT NULL,
            line INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            ok INTEGER NOT NULL,
            record BLOB NOT NULL,
            PRIMARY KEY (batch_id, line)
        ) WITHOUT ROWID;
        """,
    )


@dataclass(frozen=True)
class Tokens:
    """Token usage of one response, in the Batch API's vocabulary."""

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class LineResult:
    """One finished request line, ready to persist: ``record`` is its output/error file line."""

    batch_id: str
    line: int
    custom_id: str
    ok: bool
    record: bytes
    tokens: Tokens


@dataclass(frozen=True)
class StoredFile:
    """Where a finished result file's content is and how it is described."""

    sha256: str
    size: int
    filename: str


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Store:
    """SQLite metadata plus blobs for one data folder. Thread-safe; see the module invariants."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        ensure_private_dir(data_dir)
        self.blobs = BlobStore(data_dir / "files", tmp_dir=data_dir / "tmp")
        self.db_path = data_dir / "engine.db"
        create_private_file(self.db_path)
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._connections: list[sqlite3.Connection] = []
        self._migrate()
        restrict_sqlite_siblings(self.db_path)

    # -- connections -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._write_lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, serialised with every other writer of this store."""
        with self._write_lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._write_lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()

    def _migrate(self) -> None:
        with self._write_lock:
            MIGRATIONS.apply(self.db)

    # -- files -------------------------------------------------------------------------------

    def insert_file(
        self,
        *,
        sha256: str,
        size: int,
        filename: str,
        purpose: str,
        expires_after: int | None,
        db: sqlite3.Connection | None = None,
        file_id: str | None = None,
    ) -> sqlite3.Row:
        """Record a file; ``expires_after``: seconds from its ``created_at`` (one clock read:
        two reads a second apart made a 30-day expiry 30 days less a second)."""
        file_id = file_id or new_id("file-")
        created = now()
        expires_at = None if expires_after is None else created + expires_after
        values = (file_id, sha256, size, filename, purpose, created, expires_at)
        sql = (
            "INSERT INTO files (id, sha256, bytes, filename, purpose, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        if db is not None:
            db.execute(sql, values)
        else:
            with self.write() as wdb:
                wdb.execute(sql, values)
        row: sqlite3.Row = (
            (db or self.db).execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        )
        return row

    def get_file(self, file_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(
            "SELECT * FROM files WHERE id = ?", (file_id,)
        ).fetchone()
        return row

    def list_files(
        self, *, purpose: str | None, limit: int, after_seq: int | None, ascending: bool
    ) -> list[sqlite3.Row]:
        clauses: list[str] = []
        params: list[Any] = []
        if purpose is not None:
            clauses.append("purpose = ?")
            params.append(purpose)
        if after_seq is not None:
            clauses.append("seq > ?" if ascending else "seq < ?")
            params.append(after_seq)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "ASC" if ascending else "DESC"
        sql = f"SELECT * FROM files {where} ORDER BY seq {order} LIMIT ?"
        return self.db.execute(sql, (*params, limit)).fetchall()

    def delete_file(self, file_id: str) -> bool:
        """Forget a file; drop its blob when nothing (file or unfinished batch) still uses it."""
        with self.write() as db:
            row = db.execute("SELECT sha256 FROM files WHERE id = ?", (file_id,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
            self._drop_blob_if_unused(db, row["sha256"])
        return True

    def _drop_blob_if_unused(self, db: sqlite3.Connection, sha256: str) -> None:
        in_use = db.execute(
            "SELECT 1 FROM files WHERE sha256 = ? UNION ALL "
            f"SELECT 1 FROM batches WHERE input_sha256 = ? AND status IN {_ACTIVE_SQL}",
            (sha256, sha256),
        ).fetchone()
        if in_use is None:
            self.blobs.remove(sha256)

    # -- batches -----------------------------------------------------------------------------

    def insert_batch(self, db: sqlite3.Connection, values: dict[str, Any]) -> None:
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        db.execute(f"INSERT INTO batches ({columns}) VALUES ({marks})", tuple(values.values()))

    def get_batch(self, batch_id: str, db: sqlite3.Connection | None = None) -> sqlite3.Row | None:
        row: sqlite3.Row | None = (
            (db or self.db).execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        )
        return row

    def find_repeated_create(
        self, db: sqlite3.Connection, idempotency_key: str, since: int
    ) -> sqlite3.Row | None:
        """The newest batch with this key that is unfinished or was created since ``since``."""
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM batches WHERE idempotency_key = ?"
            f" AND (status IN {_ACTIVE_SQL} OR created_at >= ?)"
            " ORDER BY seq DESC LIMIT 1",
            (idempotency_key, since),
        ).fetchone()
        return row

    def list_batches(self, *, limit: int, after_seq: int | None) -> list[sqlite3.Row]:
        if after_seq is None:
            return self.db.execute(
                "SELECT * FROM batches ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        return self.db.execute(
            "SELECT * FROM batches WHERE seq < ? ORDER BY seq DESC LIMIT ?", (after_seq, limit)
        ).fetchall()

    def seq_of(self, table: str, object_id: str) -> int | None:
        assert table in ("files", "batches")
        row = self.db.execute(f"SELECT seq FROM {table} WHERE id = ?", (object_id,)).fetchone()
        return None if row is None else int(row[0])

    def active_batch_states(self) -> list[tuple[str, str, float]]:
        """``(id, status, deadline)`` of every active batch, oldest first: what the worker's
        every tick reads (whole rows cost seven times more, and a tick runs at each create)."""
        cur = self.db.cursor()
        cur.row_factory = None  # plain tuples: no sqlite3.Row per row
        return cur.execute(
            f"SELECT id, status, deadline FROM batches WHERE status IN {_ACTIVE_SQL} ORDER BY seq"
        ).fetchall()

    def move_batch(
        self, batch_id: str, *, from_statuses: Sequence[str], to_status: str, **columns: Any
    ) -> bool:
        """Change a batch's status if it is in one of ``from_statuses``; True if it moved."""
        return self.move_and_read_batch(
            batch_id, from_statuses=from_statuses, to_status=to_status, **columns
        )[0]

    def move_and_read_batch(
        self, batch_id: str, *, from_statuses: Sequence[str], to_status: str, **columns: Any
    ) -> tuple[bool, sqlite3.Row | None]:
        """``move_batch``, and the row as that move left it: read in the same transaction, so
        a worker finishing the batch a moment later cannot show through (a cancel answers
        ``cancelling``, as the provider does, not the ``cancelled`` that followed)."""
        sets = ", ".join(f"{name} = ?" for name in ("status", *columns))
        marks = ", ".join("?" for _ in from_statuses)
        with self.write() as db:
            cur = db.execute(
                f"UPDATE batches SET {sets} WHERE id = ? AND status IN ({marks})",
                (to_status, *columns.values(), batch_id, *from_statuses),
            )
            return cur.rowcount == 1, self.get_batch(batch_id, db)

    # -- results -----------------------------------------------------------------------------

    def record_results(self, results: Iterable[LineResult]) -> int:
        """Persist finished lines and add them to their batches' counts; return rows added."""
        added: dict[str, list[int]] = {}  # batch id -> summed counts and tokens
        with self.write() as db:
            for result in results:
                cur = db.execute(
                    "INSERT OR IGNORE INTO results (batch_id, line, custom_id, ok, record)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (result.batch_id, result.line, result.custom_id, int(result.ok), result.record),
                )
                if cur.rowcount != 1:
                    continue  # already recorded: never count a line twice
                tokens = result.tokens
                sums = added.setdefault(result.batch_id, [0] * 7)
                for index, value in enumerate(
                    (
                        int(result.ok),
                        int(not result.ok),
                        tokens.input_tokens,
                        tokens.cached_tokens,
                        tokens.output_tokens,
                        tokens.reasoning_tokens,
                        tokens.total_tokens,
                    )
                ):
                    sums[index] += value
            for batch_id, sums in added.items():
                db.execute(
                    "UPDATE batches SET completed = completed + ?, failed = failed + ?,"
                    " input_tokens = input_tokens + ?, cached_tokens = cached_tokens + ?,"
                    " output_tokens = output_tokens + ?, reasoning_tokens = reasoning_tokens + ?,"
                    " total_tokens = total_tokens + ? WHERE id = ?",
                    (*sums, batch_id),
                )
        return sum(sums[0] + sums[1] for sums in added.values())

    def finished_lines(self, batch_id: str) -> set[int]:
        rows = self.db.execute("SELECT line FROM results WHERE batch_id = ?", (batch_id,))
        return {int(row[0]) for row in rows}

    def iter_records(self, batch_id: str, *, ok: bool) -> Iterator[tuple[int, bytes]]:
        """``(line, record)`` of a batch's finished lines, in input order, as plain tuples."""
        # A dedicated connection: the caller writes blobs while this cursor is open. Plain
        # tuples, not sqlite3.Row: finalize merges these with the unfinished lines' tuples
        # by line (heapq.merge compares them), and a Row does not order against a tuple.
        conn = self._connect()
        conn.row_factory = None
        try:
            yield from conn.execute(
                "SELECT line, record FROM results WHERE batch_id = ? AND ok = ? ORDER BY line",
                (batch_id, int(ok)),
            )
        finally:
            conn.close()

    def finish_batch(
        self,
        batch_id: str,
        *,
        from_statuses: Sequence[str],
        to_status: str,
        output: StoredFile | None,
        error: StoredFile | None,
        unfinished: int,
        timestamps: dict[str, int],
    ) -> bool:
        """Register the result files and move the batch to its terminal status, atomically."""
        with self.write() as db:
            row = self.get_batch(batch_id, db)
            if row is None or row["status"] not in from_statuses:
                return False
            ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
            for key, stored in (("output_file_id", output), ("error_file_id", error)):
                if stored is not None:
                    ids[key] = self.insert_file(
                        sha256=stored.sha256,
                        size=stored.size,
                        filename=stored.filename,
                        purpose="batch_output",
                        expires_after=None,
                        db=db,
                    )["id"]
            columns = {**ids, **timestamps}
            sets = ", ".join(f"{name} = ?" for name in columns)
            db.execute(
                f"UPDATE batches SET status = ?, failed = failed + ?, {sets} WHERE id = ?",
                (to_status, unfinished, *columns.values(), batch_id),
            )
            if db.execute("SELECT 1 FROM files WHERE id = ?", (row["input_file_id"],)).fetchone():
                return True
            self._drop_blob_if_unused(db, row["input_sha256"])
        return True


def dumps(value: Any) -> str:
    """Compact JSON, as OpenAI writes it (one line, no spaces)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class EngineLock:
    """An exclusive lock on a data folder, so two processes never run the same batches."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "engine.lock"
        self._fh: Any = None

    def acquire(self, timeout: float = 0.0) -> None:
        """Take the lock, waiting up to ``timeout`` seconds for its holder to let it go (a
        command's ``--lock-timeout``: two applies on one workspace's local provider take
        turns, as they do for the state's locks); then ``StateLockedError``."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, trust the user
            return
        ensure_private_dir(self.path.parent)
        create_private_file(self.path)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the engine's lifetime
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                    continue
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                waited = f" (waited {timeout:g}s)" if timeout > 0 else ""
                raise StateLockedError(
                    f"The engine data folder {self.path.parent} is in use by {holder}{waited}: "
                    "another batchspec command on this local provider, or a `batchspec serve`. "
                    "Wait for it to end (a command waits up to --lock-timeout SECONDS for it), "
                    "stop it, or use another data folder (serve --data-dir; a local "
                    "provider's dataDir)."
                ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


__all__ = [
    "EngineLock",
    "LineResult",
    "Store",
    "StoredFile",
    "Tokens",
    "dumps",
    "new_id",
    "now",
]
