"""Versioned, transactional schema migrations: one mechanism for every database of batchspec.

Users: the state store (``batchspec.state``: ``state/batchspec.db``, or a PostgreSQL database
through ``batchspec.storage.sql``), the local engine
(``batchspec.engine``: ``engine.db``) and the Anthropic provider's create journal
(``batchspec.providers``: ``journal.db``). Each declares one ``Migrations`` set: an ordered list
of named migrations ``m001_initial``, ``m002_...``, each a function of the connection or an SQL
script. A migration that has shipped is never edited: the next change is the next migration.
The runner takes a raw ``sqlite3`` connection or a ``batchspec.storage.sql.Sql`` (either
dialect) and hands each migration (and ``adopt`` hook) an ``Sql``; a migration for both
dialects picks its DDL by ``db.dialect``.

Storage format: applied migrations are rows of ``_sqlite_migrations`` (``id``,
``migration_set``, ``name``, ``applied_at``: the table sqlite-utils' ``Migrations`` writes), so
state databases written before this module existed are recognised as they are; PostgreSQL
keeps the same table, so one history reads the same in both dialects. A set whose
older code tracked its schema some other way names an ``adopt`` hook, which says on first
contact which migrations such a database already has (and may drop the old bookkeeping).

Promises:

* All pending migrations and their records are applied in one transaction that holds the
  database's writer lock (``BEGIN IMMEDIATE``; on PostgreSQL its advisory twin), so concurrent
  openers migrate one at a time and the second finds nothing to do; or a savepoint inside
  the caller's transaction. PostgreSQL's DDL is transactional too. A failing migration leaves the
  database exactly as it was.
* An SQL script is cut into statements by SQLite's own ``sqlite3.complete_statement``, so a
  trigger body (``BEGIN ...; ...; END``) or a ';' inside a string literal stays whole; never
  ``executescript``, which commits whatever transaction is open.
* A database that records a migration this code does not know was written by a newer
  version: ``StateError``, and nothing is changed.
* An up-to-date database is only read: no write lock is taken.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

from batchspec.errors import StateError
from batchspec.storage.sql import DatabaseBusyError, Sql, as_sql, split_statements

TABLE = "_sqlite_migrations"
_NAME = re.compile(r"^m(\d{3,})_[a-z0-9_]+$")

Step = Callable[[Sql], None]
#: the names of migrations an older, pre-runner database already has (see ``Migrations``)
Adopt = Callable[[Sql], list[str]]


@dataclass(frozen=True)
class Migration:
    name: str
    run: Step

    @property
    def version(self) -> int:
        """The number in the name: ``m003_request_fingerprints`` is version 3."""
        match = _NAME.match(self.name)
        assert match is not None  # checked when registered
        return int(match.group(1))


def run_script(conn: sqlite3.Connection | Sql, script: str) -> None:
    """Execute every statement of ``script`` in the connection's current transaction."""
    as_sql(conn).script(script)


class Migrations:
    """One database's ordered list of named migrations, and the runner that applies them.

    Register with the decorator (``@MIGRATIONS`` on ``def m002_x(conn): ...``) or with
    ``MIGRATIONS.script("m001_initial", SQL)``. Versions must ascend in registration order.
    """

    def __init__(self, migration_set: str, *, adopt: Adopt | None = None) -> None:
        self.migration_set = migration_set
        self._adopt = adopt
        self._migrations: list[Migration] = []

    def __repr__(self) -> str:
        return f"<Migrations {self.migration_set!r}: {', '.join(self.names)}>"

    # -- declaring ----------------------------------------------------------------------------

    def __call__(self, fn: Step) -> Step:
        """Register ``fn`` as the next migration, named by the function."""
        self._register(Migration(fn.__name__, fn))
        return fn

    def script(self, name: str, sql: str) -> Migration:
        """Register an SQL script as the next migration (statements split by ``run_script``)."""
        split_statements(sql)  # a script that cannot be cut up fails at import, not at open

        def run(conn: Sql) -> None:
            run_script(conn, sql)

        migration = Migration(name, run)
        self._register(migration)
        return migration

    def _register(self, migration: Migration) -> None:
        if not _NAME.match(migration.name):
            raise ValueError(f"migration name {migration.name!r} is not like m001_initial")
        if self._migrations and migration.version <= self._migrations[-1].version:
            raise ValueError(
                f"migration {migration.name} does not come after {self._migrations[-1].name}"
            )
        self._migrations.append(migration)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self._migrations]

    # -- reading (no writes) ------------------------------------------------------------------

    def applied(self, conn: sqlite3.Connection | Sql) -> list[str]:
        """Names of the migrations recorded for this set, in the order they were applied."""
        db = as_sql(conn)
        if not db.table_exists(TABLE):
            return []
        rows = db.execute(
            f"SELECT name FROM {TABLE} WHERE migration_set = ? ORDER BY id", (self.migration_set,)
        ).fetchall()
        return [row[0] for row in rows]

    def pending(self, conn: sqlite3.Connection | Sql) -> list[Migration]:
        done = set(self.applied(conn))
        return [m for m in self._migrations if m.name not in done]

    def unknown(self, conn: sqlite3.Connection | Sql) -> list[str]:
        """Recorded migrations this code does not have: the database is from a newer version."""
        known = set(self.names)
        return [name for name in self.applied(conn) if name not in known]

    # -- applying -----------------------------------------------------------------------------

    def apply(self, conn: sqlite3.Connection | Sql, *, stop_before: str | None = None) -> list[str]:
        """Apply the pending migrations (up to ``stop_before``) in one transaction.

        Returns the names applied. ``conn`` must be in autocommit mode (``isolation_level=None``
        for sqlite3) so that the transaction is the one this method begins.
        """
        self.refuse_unknown(conn)
        if not self._needs_work(conn, stop_before):
            return []
        done: list[str] = []
        db = as_sql(conn)
        with _transaction(db):
            _ensure_table(db)
            if not self.applied(db) and self._adopt is not None:
                for name in self._adopt(db):
                    self._record(db, name)
            self.refuse_unknown(db)
            for migration in self.pending(db):  # read again: another opener may have won
                if migration.name == stop_before:
                    break
                migration.run(db)
                self._record(db, migration.name)
                done.append(migration.name)
        return done

    def _needs_work(self, conn: sqlite3.Connection | Sql, stop_before: str | None) -> bool:
        pending = self.pending(conn)
        return bool(pending) and pending[0].name != stop_before

    def refuse_unknown(self, conn: sqlite3.Connection | Sql) -> None:
        """``StateError`` if the database records a migration this code does not know."""
        unknown = self.unknown(conn)
        if unknown:
            raise StateError(
                f"{as_sql(conn).label} was written by a newer batchspec (unknown migrations: "
                f"{', '.join(unknown)}); upgrade batchspec to use it"
            )

    def _record(self, conn: sqlite3.Connection | Sql, name: str) -> None:
        as_sql(conn).execute(
            f"INSERT INTO {TABLE} (migration_set, name, applied_at) VALUES (?, ?, ?)",
            # the format sqlite-utils writes, so both read each other's rows
            (self.migration_set, name, str(datetime.now(timezone.utc))),
        )


def _ensure_table(db: Sql) -> None:
    if db.dialect == "postgresql":
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id BIGINT GENERATED BY DEFAULT AS IDENTITY "
            "PRIMARY KEY, migration_set TEXT, name TEXT, applied_at TEXT)"
        )
    else:
        db.execute(
            f"CREATE TABLE IF NOT EXISTS [{TABLE}] ([id] INTEGER PRIMARY KEY, "
            "[migration_set] TEXT, [name] TEXT, [applied_at] TEXT)"
        )
    db.execute(
        f"CREATE UNIQUE INDEX IF NOT EXISTS idx_{TABLE}_migration_set_name "
        f"ON {TABLE} (migration_set, name)"
    )


def table_exists(conn: sqlite3.Connection | Sql, name: str) -> bool:
    """True if the database has a table ``name`` (for ``adopt`` hooks)."""
    return as_sql(conn).table_exists(name)


@contextmanager
def _transaction(db: Sql) -> Iterator[None]:
    """The writer's transaction (BEGIN IMMEDIATE or its twin), or a savepoint inside one."""
    if db.in_transaction:
        with db.savepoint("migrations"):
            yield
        return
    try:
        db.begin_writer()
    except DatabaseBusyError as err:
        raise StateError(
            f"{db.label} stayed busy while migrating its schema ({err.__cause__ or err}); "
            "another process is writing to it, try again"
        ) from err
    try:
        yield
    except BaseException:
        db.rollback()
        raise
    db.commit()


__all__ = ["TABLE", "Migration", "Migrations", "run_script", "split_statements", "table_exists"]
