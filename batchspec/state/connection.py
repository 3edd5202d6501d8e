"""The state store's connection: one SQLite database, opened safely, migrated, in transactions.

Every record module (runs, resources, batches, the lock row, the ledger) subclasses
``StateConnection`` and writes its SQL through ``atomic()``, ``_one()``, ``_all()`` and
``_update()``; ``batchspec.state.store.StateStore`` composes them into the one store object.
This is the only module that knows how the SQLite file is opened: a second backend
(PostgreSQL) provides the same few members.

Promises:

* Only a missing file starts a fresh store, built beside the path and linked in whole. An
  empty, truncated or foreign file is refused (``StateError``, pointing at a backup), never
  taken for an empty state: that would submit, and pay for, everything again.
* The database file is created mode 0600 (and its WAL siblings kept 0600), in WAL mode, with
  foreign keys on and a 30 s busy timeout; the schema is migrated on open
  (``batchspec.state.schema``).
* Every public write method is one transaction; inside ``atomic()`` it joins the caller's.
  The outermost transaction starts with BEGIN IMMEDIATE, so read-then-write sequences never
  fail half way with SQLITE_BUSY, and two processes never both pass a check (the lock relies
  on this).
* A connection is used from one thread only.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database

from batchspec.errors import StateError
from batchspec.state.schema import MIGRATIONS
from batchspec.storage.private import create_private_file, restrict_sqlite_siblings

BUSY_TIMEOUT_SECONDS = 30.0

_Conn = TypeVar("_Conn", bound="StateConnection")


class StateConnection:
    """One connection to the state database. Open with ``StateStore.open(path)``."""

    def __init__(self, db: Database, path: Path) -> None:
        self.db = db
        self.path = path

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def open(cls: type[_Conn], path: Path) -> _Conn:
        """Open and migrate the state database at ``path``; a missing file starts a fresh one.

        Anything else at ``path`` that is not a batchspec state database (empty, not SQLite,
        damaged, another application's) is refused with a ``StateError``, never taken for
        an empty state: that would submit, and pay for, everything again.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                _create_fresh(path)
            _check_header(path)
            # isolation_level=None: no implicit transactions, so a write outside atomic() (say
            # a raw executemany) commits at once instead of leaving a transaction open that
            # a later atomic() would join as a savepoint and never commit.
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        except OSError as err:
            raise StateError(
                f"cannot create the state database {path}: {err.strerror or err}; "
                "check that the folder is writable, or set state.path in batchspec.yaml"
            ) from err
        store = cls(Database(conn), path)
        try:
            store._check_history()
            store._configure()
            store._migrate()
        except BaseException:
            conn.close()
            raise
        restrict_sqlite_siblings(path)
        return store

    def _check_history(self) -> None:
        """Refuse, by reading only, a database that batchspec's migrations never touched."""
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
            raise _not_a_state(self.path, f"damaged or truncated ({err})") from err
        found = f"it has: {', '.join(tables[:8])}" if tables else "it has no tables"
        raise _not_a_state(self.path, f"an SQLite database without batchspec's tables ({found})")

    def _configure(self) -> None:
        try:
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            self.db.execute("PRAGMA foreign_keys = ON")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise _not_a_state(self.path, f"damaged or truncated ({err})") from err
        if str(mode).lower() != "wal":
            raise StateError(f"cannot switch {self.path} to WAL mode (got {mode!r})")

    def _migrate(self) -> None:
        # an up-to-date database is only read; otherwise one BEGIN IMMEDIATE transaction, so
        # concurrent openers migrate one at a time (batchspec.storage.migrations)
        MIGRATIONS.apply(self.db.conn)

    def applied_migrations(self) -> list[str]:
        """Names of the migrations applied to this database, in order."""
        return MIGRATIONS.applied(self.db.conn)

    def close(self) -> None:
        self.db.close()

    @property
    def in_transaction(self) -> bool:
        """True inside ``atomic()`` (SQLite's write lock is held)."""
        return self.db.conn.in_transaction

    def __enter__(self: _Conn) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def atomic(self: _Conn) -> Iterator[_Conn]:
        """One transaction: everything inside commits together or not at all.

        Nested calls become savepoints (``Database.atomic``). The outermost one starts with
        BEGIN IMMEDIATE, taking SQLite's write lock up front (waiting up to the busy timeout).
        """
        conn = self.db.conn
        if conn.in_transaction:
            with self.db.atomic():
                yield self
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise StateError(
                f"the state database {self.path} stayed busy for {BUSY_TIMEOUT_SECONDS:.0f} s "
                f"({err}); another process is writing to it, try again"
            ) from err
        try:
            yield self
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _one(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        return next(iter(self.db.query(sql, params)), None)

    def _all(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def serial(self) -> int:
        """A number that changes whenever resources, generations, batches or files change.

        Runs, events and the lock do not count: a plan depends only on the recorded state,
        so ``apply`` compares this with the plan's to detect a stale plan.
        """
        row = self._one("SELECT value FROM state_serial WHERE id = 1")
        return int(row["value"]) if row else 0

    # -- helpers --------------------------------------------------------------------------------

    def _update(self, table: str, key: str, value: Any, fields: Mapping[str, Any]) -> None:
        # column names come from the whitelists above, never from callers' strings
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(
            f"UPDATE {table} SET {assignments} WHERE {key} = ?", [*fields.values(), value]
        )


SQLITE_HEADER = b"SQLite format 3\x00"


def _not_a_state(path: Path, what: str) -> StateError:
    return StateError(
        f"{path} is {what}, so it is not a batchspec state database. batchspec will not start "
        "a fresh state in its place: the state is the record of which batches were submitted "
        "and paid for, and without it everything would be submitted, and paid for, again. If "
        "this file should hold the state, restore it from a backup; if batchspec is looking "
        "at the wrong file, set state.path in batchspec.yaml (or --state, BATCHSPEC_STATE). "
        "Delete the file only if nothing was ever applied with it."
    )


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
            MIGRATIONS.apply(conn)
        finally:
            conn.close()  # the last connection: checkpoints the WAL into the file
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
