"""The state store's connection: one database, opened safely, migrated, in transactions.

Every record module (runs, resources, batches, the lock row, the ledger) subclasses
``StateConnection`` and writes its SQL through ``atomic()``, ``_one()``, ``_all()`` and
``_update_returning()``, over ``self.db``, a ``batchspec.storage.sql.Sql`` of either dialect;
``batchspec.state.store.StateStore`` composes them into the one store object. This is the only
module that knows how a state database is opened:

* a path (``state/batchspec.db``): an SQLite file;
* a ``postgresql://`` URL: a PostgreSQL database, through psycopg 3 (the ``postgres`` extra).
  An empty database is a fresh state; one holding tables of ours without our migration
  history is refused, like a foreign SQLite file. The URL's password never appears in a
  message (``label`` is the URL without it).

Promises for SQLite:

* Only a missing file starts a fresh store, built beside the path and linked in whole. An
  empty, truncated or foreign file is refused (``StateError``, pointing at a backup), never
  taken for an empty state: that would submit, and pay for, everything again.
* The database file is created mode 0600 (and its WAL siblings kept 0600), in WAL mode, with
  foreign keys on and a 30 s busy timeout; the schema is migrated on open
  (``batchspec.state.schema``). A run that is starting waits for a busy database that long,
  or as long as its ``--lock-timeout`` says if longer (``busy_wait``, ``busy_wait_for``).
* Every public write method is one transaction; inside ``atomic()`` it joins the caller's.
  The outermost transaction starts with BEGIN IMMEDIATE, so read-then-write sequences never
  fail half way with SQLITE_BUSY, and two processes never both pass a check (the lock relies
  on this).
* A connection is used from one thread only.

For PostgreSQL the same promises hold where they apply: every public write method is one
transaction, and the outermost one takes the writer lock first (``Sql.begin_writer``: a
transaction-scoped advisory lock, waited for up to the busy timeout), so read-then-write
sequences are serialised exactly as under SQLite's BEGIN IMMEDIATE.
"""

from __future__ import annotations

import functools
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from batchspec.errors import StateError
from batchspec.state.schema import MIGRATIONS
from batchspec.storage.database_url import is_database_url, redact_url
from batchspec.storage.private import (
    create_private_file,
    ensure_private_dir,
    restrict_sqlite_siblings,
)
from batchspec.storage.remote_blobs import PostgresBlobs, RemoteBlobs
from batchspec.storage.sql import (
    DatabaseUnavailableError,
    PostgresSql,
    Sql,
    SqliteSql,
    checkpoint_now,
)

#: how long a statement waits for another process's write transaction: a run's writes once
#: it holds its locks (a run on other resources beside it is waited for, never cut short
#: half way), and those of a command that takes no ``--lock-timeout`` (``plan``, ``unlock``)
BUSY_TIMEOUT_SECONDS = 30.0
#: the most either database takes: milliseconds in a C int (SQLite's busy timeout,
#: PostgreSQL's lock_timeout), about 24 days; a longer --lock-timeout (inf) waits that long
MAX_BUSY_WAIT_SECONDS = (2**31 - 1) / 1000
#: how long a ``CommitGroup`` keeps its transaction open before it is due for a commit
GROUP_MAX_SECONDS = 0.5

_Conn = TypeVar("_Conn", bound="StateConnection")


#: what ``StateStore.open`` takes: an SQLite file's path, or a ``postgresql://`` URL
StateLocation = Path | str

#: tables of ours: a PostgreSQL database holding one of them without our history is refused
_OUR_TABLES = frozenset(
    {
        "runs",
        "resources",
        "generations",
        "files",
        "batches",
        "events",
        "lock",  # before m005
        "resource_locks",
        "requests",
    }
)


class StateConnection:
    """One connection to the state database. Open with ``StateStore.open(path_or_url)``."""

    def __init__(self, db: Sql, location: StateLocation) -> None:
        self.db = db
        #: what the store was opened from (a Path, or the URL itself: do not print it)
        self.location = location
        #: where the state is, fit for messages: the file, or the URL without its password
        self.label = str(location) if isinstance(location, Path) else redact_url(location)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.db.dialect

    def shared_blobs(self) -> RemoteBlobs | None:
        """The result store's remote tier this state keeps itself: a PostgreSQL state's
        ``blobs`` tables (over a connection of their own, opened on first use and closed with
        the store); None for an SQLite state, whose blobs stay in ``state/store/``."""
        if self.db.dialect != "postgresql":
            return None
        if self._shared_blobs is None:
            assert isinstance(self.location, str)
            self._shared_blobs = PostgresBlobs(self.location, busy_timeout=BUSY_TIMEOUT_SECONDS)
        return self._shared_blobs

    _shared_blobs: PostgresBlobs | None = None

    @contextmanager
    def busy_wait(self, seconds: float) -> Iterator[None]:
        """Inside the block, wait at most ``seconds`` for another process's write
        transaction (SQLite's busy timeout, PostgreSQL's lock_timeout), then
        ``DatabaseBusyError``; the connection's own wait again after it (``busy_wait_for``
        turns a ``--lock-timeout`` into ``seconds``)."""
        before = self.db.busy_timeout
        self.db.set_busy_timeout(seconds)
        try:
            yield
        finally:
            if before is not None:
                # a connection lost meanwhile: its error is the one to tell
                with suppress(DatabaseUnavailableError):
                    self.db.set_busy_timeout(before)

    @property
    def path(self) -> Path:
        """The SQLite file (``StateError`` for a PostgreSQL state, which has none)."""
        if not isinstance(self.location, Path):
            raise StateError(f"the state {self.label} is a PostgreSQL database, not a file")
        return self.location

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def open(cls: type[_Conn], location: StateLocation) -> _Conn:
        """Open and migrate the state database at ``location``: a path or a PostgreSQL URL.

        A missing SQLite file (or an empty PostgreSQL database) starts a fresh state. Anything
        else that is not a batchspec state database (empty, not SQLite, damaged, another
        application's) is refused with a ``StateError``, never taken for an empty state: that
        would submit, and pay for, everything again.
        """
        if is_database_url(location):
            assert isinstance(location, str)
            return cls._open_postgres(location)
        return cls._open_sqlite(Path(location))

    @classmethod
    def _open_postgres(cls: type[_Conn], url: str) -> _Conn:
        db = PostgresSql.connect(url, busy_timeout=BUSY_TIMEOUT_SECONDS)
        store = cls(db, url)
        try:
            store._check_postgres_history()
            store._migrate()
        except BaseException:
            db.close()
            raise
        return store

    def _check_postgres_history(self) -> None:
        refuse_foreign_postgres(self.db)

    @classmethod
    def _open_sqlite(cls: type[_Conn], path: Path) -> _Conn:
        refuse_a_folder(path)
        try:
            ensure_private_dir(path.parent)  # state/ holds requests and answers: private
            if not path.exists():
                _create_fresh(path)
            _check_header(path)
            # isolation_level=None: no implicit transactions, so a write outside atomic() (say
            # a raw executemany) commits at once instead of leaving a transaction open that
            # a later atomic() would join as a savepoint and never commit.
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        except (OSError, sqlite3.Error) as err:  # sqlite's: a full disk while it is built
            reason = (err.strerror if isinstance(err, OSError) else None) or err
            raise StateError(
                f"cannot create the state database {path}: {reason}; check that the folder "
                "is writable and its disk has room, or set state.path in batchspec.yaml"
            ) from err
        store = cls(SqliteSql(conn), path)
        try:
            store._check_history()
            store._configure()
            store._migrate()
            store._check_columns()
        except BaseException:
            conn.close()
            raise
        restrict_sqlite_siblings(path)
        return store

    def _check_history(self) -> None:
        """Refuse, by reading only, a database that batchspec's migrations never touched."""
        assert isinstance(self.db, SqliteSql)
        conn = self.db.conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            if MIGRATIONS.applied(conn):
                return
            tables = [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                )
            ]
        except sqlite3.DatabaseError as err:
            raise _unreadable(self.path, err) from err
        found = f"it has: {', '.join(tables[:8])}" if tables else "it has no tables"
        raise _not_a_state(self.path, f"an SQLite database without batchspec's tables ({found})")

    def _check_columns(self) -> None:
        """Refuse a state whose tables lack columns the migrations made (a column dropped by
        hand, a damaged copy): reading it would fail mid-command, or misread what was paid."""
        assert isinstance(self.db, SqliteSql)
        missing = [
            f"{table}.{column}"
            for table, columns in _expected_columns().items()
            for column in sorted(columns - _sqlite_columns(self.db.conn, table))
        ]
        if missing:
            shown = ", ".join(missing[:6]) + (", …" if len(missing) > 6 else "")
            raise _not_a_state(
                self.path, f"a state database missing columns or tables batchspec needs ({shown})"
            )

    def _configure(self) -> None:
        """SQLite's connection settings: busy timeout, foreign keys, WAL."""
        try:
            self.db.set_busy_timeout(BUSY_TIMEOUT_SECONDS)
            self.db.execute("PRAGMA foreign_keys = ON")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise _unreadable(self.path, err) from err
        if str(mode).lower() != "wal":
            raise StateError(f"cannot switch {self.path} to WAL mode (got {mode!r})")

    def _migrate(self) -> None:
        # an up-to-date database is only read; otherwise one writer's transaction, so
        # concurrent openers migrate one at a time (batchspec.storage.migrations)
        MIGRATIONS.apply(self.db)

    def applied_migrations(self) -> list[str]:
        """Names of the migrations applied to this database, in order."""
        return MIGRATIONS.applied(self.db)

    def close(self) -> None:
        if self._shared_blobs is not None:
            self._shared_blobs.close()
        self.db.close()

    @property
    def in_transaction(self) -> bool:
        """True inside ``atomic()`` (the database's writer lock is held)."""
        return self.db.in_transaction

    @property
    def in_atomic_block(self) -> bool:
        """True inside an ``atomic()`` block, outermost or nested; False in a transaction a
        ``CommitGroup`` opened on its own (whose ``flush`` may commit it at any time)."""
        return self._savepoints > 0 or self._atomic_open

    _atomic_open = False

    def __enter__(self: _Conn) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def atomic(self: _Conn, *, one_write: bool = False, whole: bool = False) -> Iterator[_Conn]:
        """One transaction: everything inside commits together or not at all.

        Nested calls become savepoints. The outermost one takes the database's writer lock up
        front (BEGIN IMMEDIATE, or PostgreSQL's advisory twin), waiting up to the busy timeout.

        ``one_write``: the block writes with one statement at most, and raises nothing after
        it (it only reads back). Nested in an SQLite transaction it then takes no savepoint
        (a SAVEPOINT and a RELEASE saved per call: most of a pass's statements were these):
        SQLite undoes a failed statement by itself and the transaction goes on (every
        constraint and trigger of the schema aborts the statement, never the transaction),
        which is all a rollback to the savepoint would do. A PostgreSQL transaction is
        aborted by any failed statement, so there the savepoint stays.

        ``whole``: nothing inside the block catches an exception and goes on, so the block is
        kept or undone whole: the blocks nested in it (at any depth) take no savepoints,
        whatever the dialect (an exception leaves them and this block together, and this
        block's own rollback undoes them). Savepoints commit nothing, so a kill leaves what
        it left with them: the outermost transaction, all of it or none.
        """
        db = self.db
        if db.in_transaction:
            self._savepoints += 1
            inside_whole = self._whole > 0
            self._whole += int(whole)
            try:
                if inside_whole:
                    try:
                        yield self
                    except BaseException:
                        self._whole_broken = True  # undone only by the whole block's rollback
                        raise
                elif one_write and db.dialect == "sqlite":
                    yield self
                else:
                    with db.savepoint(f"atomic_{self._savepoints}"):
                        yield self
                        if whole:
                            self._refuse_a_broken_whole()
            finally:
                if whole and not inside_whole:
                    self._whole_broken = False
                self._whole -= int(whole)
                self._savepoints -= 1
            return
        db.begin_writer()
        self._atomic_open = True
        self._whole += int(whole)
        try:
            yield self
            if whole:
                self._refuse_a_broken_whole()
        except BaseException:
            db.rollback()
            raise
        finally:
            self._whole_broken = False
            self._whole -= int(whole)
            self._atomic_open = False
        try:
            db.commit()
        except BaseException:
            db.rollback()
            raise

    def _refuse_a_broken_whole(self) -> None:
        """A block nested in an ``atomic(whole=True)`` one raised and the whole block went on
        (caught): with no savepoint, half of that block would be kept (SQLite), or the
        transaction is aborted and its COMMIT a silent ROLLBACK (PostgreSQL). Undone instead."""
        if self._whole_broken:
            raise StateError(
                "a state transaction was undone: a step inside it failed and the failure was "
                "passed over, so none of it is kept (a bug: please report it)"
            )

    _savepoints = 0
    _whole = 0  # ``atomic(whole=True)`` blocks open
    _whole_broken = False  # a block nested in the open whole block raised (``atomic``)

    @contextmanager
    def commit_group(self, *, max_seconds: float | None = None) -> Iterator[CommitGroup]:
        """A ``CommitGroup`` for the block; what it holds uncommitted at the end is committed,
        also when the block raises (each ``atomic()`` inside it kept all of its work or none,
        as it would have committed on its own), then the exception goes on."""
        group = CommitGroup(self, GROUP_MAX_SECONDS if max_seconds is None else max_seconds)
        try:
            yield group
        except BaseException:
            group.close()
            raise
        group.close()

    def _one(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        rows = self.db.query(sql, params)
        return rows[0] if rows else None

    def _all(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return self.db.query(sql, params)

    def serial(self) -> int:
        """A number that changes whenever resources, generations, batches or files change.

        Runs, events and the lock do not count: a plan depends only on the recorded state,
        so ``apply`` compares this with the plan's to detect a stale plan.
        """
        row = self._one("SELECT value FROM state_serial WHERE id = 1")
        return int(row["value"]) if row else 0

    # -- helpers --------------------------------------------------------------------------------

    def _update_returning(
        self, table: str, key: str, value: Any, fields: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Set ``fields`` (column names from the callers' whitelists, never users' strings)
        of a row that exists, giving it back as it now is (``RETURNING *``: the row a
        ``SELECT *`` after it would read, without that read)."""
        assignments = ", ".join(f"{name} = ?" for name in fields)
        row = self._one(
            f"UPDATE {table} SET {assignments} WHERE {key} = ? RETURNING *",
            [*fields.values(), value],
        )
        assert row is not None  # read in this transaction before the update
        return row


class CommitGroup:
    """The records of many steps in one transaction: one commit (one fsync) for all of them.

    ``join()`` opens the group's transaction, if none is open, before a step whose records
    need not be durable before anything else happens (a poll seen, a collected file already
    in the result store, result files written): its ``atomic()`` blocks become savepoints of
    the group. ``flush()`` commits it; call it before a step that must find what it records
    committed before it sends anything (an intent before its upload or create, a cancel):
    that step then runs with no transaction open, exactly as without a group. ``due`` says the
    group has been open ``max_seconds``: flush then, so that a run waiting for the writer
    lock, or a crash, loses no more than that (a lost poll or collect is done again).
    ``commits`` counts the group's commits.
    """

    def __init__(
        self,
        conn: StateConnection,
        max_seconds: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._conn = conn
        self._max_seconds = max_seconds
        self._clock = clock
        self._opened: float | None = None
        self.commits = 0

    @property
    def open(self) -> bool:
        return self._opened is not None

    @property
    def due(self) -> bool:
        return self._opened is not None and self._clock() - self._opened >= self._max_seconds

    def join(self) -> None:
        """Open the group's transaction unless one (the group's or a caller's) is open."""
        if self._opened is None and not self._conn.in_transaction:
            self._conn.db.begin_writer()
            self._opened = self._clock()

    def flush(self) -> None:
        """Commit what the group holds (nothing to do when it holds nothing)."""
        if self._opened is None:
            return
        self._opened = None
        try:
            self._conn.db.commit()
        except BaseException:
            self._conn.db.rollback()
            raise
        self.commits += 1

    def close(self) -> None:
        self.flush()


def busy_wait_for(lock_timeout: float) -> float:
    """How long a run that is starting (recording its run, taking its locks) waits for
    another process's write transaction, then stops with exit 3, having changed nothing: the
    ``BUSY_TIMEOUT_SECONDS`` every write waits, or its ``--lock-timeout`` when longer (at
    most ``MAX_BUSY_WAIT_SECONDS``). Never shorter: a run beside it on other resources holds
    the write lock for seconds while it records a large input's requests (6-10 s for
    200,000), and a short --lock-timeout (0 by default) made this run exit 3 for that
    ordinary write, where runs on different resources proceed side by side."""
    return min(max(lock_timeout, BUSY_TIMEOUT_SECONDS), MAX_BUSY_WAIT_SECONDS)


def refuse_foreign_postgres(db: Sql) -> None:
    """Refuse a PostgreSQL database holding tables named like ours but no migration history."""
    if MIGRATIONS.applied(db):
        return
    ours = sorted(_OUR_TABLES & set(db.table_names()))
    if ours:
        raise StateError(
            f"the PostgreSQL database {db.label} has tables named like batchspec's "
            f"({', '.join(ours)}) but no batchspec migration history, so it is not a "
            "batchspec state; batchspec will not write into it. Point state.url at an "
            "empty database (or a schema of its own: ?options=-csearch_path%3Dbatchspec)"
        )


SQLITE_HEADER = b"SQLite format 3\x00"


@functools.cache
def _expected_columns() -> dict[str, frozenset[str]]:
    """Each of our tables' columns, as the migrations make them on a fresh database."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        MIGRATIONS.apply(SqliteSql(conn))
        return {table: frozenset(_sqlite_columns(conn, table)) for table in _OUR_TABLES}
    finally:
        conn.close()


def _sqlite_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _not_a_state(path: Path, what: str) -> StateError:
    return StateError(
        f"{path} is {what}, so it is not a batchspec state database. batchspec will not start "
        "a fresh state in its place: the state is the record of which batches were submitted "
        "and paid for, and without it everything would be submitted, and paid for, again. If "
        "this file should hold the state, restore it from a backup; if batchspec is looking "
        "at the wrong file, set state.path in batchspec.yaml (or --state, BATCHSPEC_STATE). "
        "Delete the file only if nothing was ever applied with it."
    )


#: SQLite's primary result codes that say the disk, not the file, failed: SQLITE_IOERR (a
#: full disk where the -shm file cannot grow), SQLITE_FULL, SQLITE_CANTOPEN
_DISK_CODES = {10, 13, 14}
_DISK_MESSAGES = ("disk I/O error", "database or disk is full", "unable to open database file")


def _unreadable(path: Path, err: sqlite3.DatabaseError) -> StateError:
    """A state SQLite could not read: damaged (refused, pointing at a backup), or on a disk
    that failed it (a full disk fails the first read: SQLite cannot size its -shm file),
    which leaves the file as good as it was: saying it is damaged had users restore or
    delete a sound state, and a deleted state pays for everything again."""
    code = getattr(err, "sqlite_errorcode", None)  # Python 3.11+
    if (code & 0xFF in _DISK_CODES) if code is not None else str(err) in _DISK_MESSAGES:
        return StateError(
            f"cannot read the state database {path}: {err}; the file itself is left as it "
            "was: check that its disk has room (SQLite needs room beside it for its -wal and "
            "-shm files) and that its folder is writable, then run the command again"
        )
    return _not_a_state(path, f"damaged or truncated ({err})")


def refuse_a_folder(path: Path) -> None:
    """A folder named as the state (``--state state/``): say so, and which file to name."""
    if path.is_dir():
        raise StateError(
            f"{path} is a folder, not a state database: name the SQLite file "
            f"(e.g. {path / 'batchspec.db'}) in --state, BATCHSPEC_STATE or state.path"
        )


def check_state_file(path: Path) -> None:
    """Refuse, by reading 16 bytes only, an existing ``path`` that cannot be a state database
    (a folder, an empty file, one that is not SQLite): before anything is made beside it."""
    refuse_a_folder(path)
    _check_header(path)


def _check_header(path: Path) -> None:
    """Refuse an empty file, or one that is not SQLite, before SQLite sees it."""
    with open(path, "rb") as fh:
        header = fh.read(len(SQLITE_HEADER))
    if not header:
        raise _not_a_state(path, "empty (0 bytes)")
    if header != SQLITE_HEADER:
        raise _not_a_state(path, "not an SQLite database (it does not start with SQLite's header)")


def _create_fresh(path: Path) -> None:
    """Build a new, migrated database beside ``path`` and link it into place whole.

    So the path never holds a half-made (say empty) database that a crash could leave behind
    or a concurrent opener could find and refuse. The link never replaces a file: if another
    process got there first, its database is the one both use.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
    create_private_file(tmp)
    try:
        conn = sqlite3.connect(tmp, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            MIGRATIONS.apply(SqliteSql(conn))
            checkpoint_now(conn)  # else a full disk links in a file without the tables
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not path.exists():
                os.replace(tmp, path)
    finally:
        for leftover in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-wal", "-shm"))):
            leftover.unlink(missing_ok=True)
