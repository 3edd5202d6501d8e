"""One SQL connection, two dialects: SQLite (``sqlite3``) and PostgreSQL (psycopg 3).

The state store's record modules write one SQL text for both databases, in the subset the two
share: ``?`` placeholders, ``INSERT ... ON CONFLICT ... DO UPDATE/NOTHING``, ``RETURNING id``,
``UPDATE ... FROM``, ``CASE`` instead of summing booleans, and the two column names that
PostgreSQL reserves quoted (``"user"``, ``"offset"``). Only the schema (DDL, triggers) is
written per dialect, in ``batchspec.state.schema``; the migration history is one list for both.

Why a thin wrapper over hand-written SQL and not SQLAlchemy Core: the SQL exists, is small and
already reviewed for SQLite's locking; the differences that matter (triggers, identity
columns, the writer lock) are DDL and transaction control, which Core does not abstract
either; and the embedded default keeps its one small dependency instead of a large one.

What the wrapper does, and promises:

* ``execute``/``executemany``/``query`` take ``?`` placeholders; for PostgreSQL they become
  psycopg's ``%s`` (a literal ``%`` is doubled), never inside a quoted literal or identifier.
* ``begin_writer()`` starts the outermost transaction so that writers are serialised exactly
  as SQLite's ``BEGIN IMMEDIATE`` does: on PostgreSQL ``BEGIN`` plus a transaction-scoped
  advisory lock (``advisory_key("writer")``), waited for up to the busy timeout. Advisory
  locks are per database, so their keys are derived from the schema the state lives in: two
  states in two schemas of one database never wait for each other. Read-then-write
  sequences therefore never interleave with another process's, on either database.
* Driver failures become one ``StateError`` subclass each, with no password in the message:
  ``IntegrityError`` (a constraint or trigger refused a write), ``DatabaseBusyError`` (the
  writer lock stayed taken), ``DatabaseUnavailableError`` (the server refused or dropped the
  connection; the server rolls back the open transaction, so nothing is half-written), and its
  ``DatabaseNotAnsweringError`` (the server stopped answering: frozen, or its host stuck).
  SQLite's other errors pass through as ``sqlite3.Error`` (disk full, I/O), as before.
* No PostgreSQL round trip waits for ever: the connect gives up after ``connect_timeout``
  (the URL's, else 10 s or the answer timeout if shorter), and every statement is watched by
  ``batchspec.storage.answer_watch``: one with no answer for the answer timeout
  (``BATCHSPEC_STATE_ANSWER_TIMEOUT``, default 60 s) whose server does not answer a ping
  either fails with ``DatabaseNotAnsweringError``; a lock wait or a long statement on a
  server that answers is never cut.
* A connection is used from one thread only.
* ``writer_open`` is True from ``begin_writer()`` until the next statement that begins or ends
  a transaction, and ``on_change``, when set, is told of every statement that may change the
  database (all but those that begin ``SELECT``), before it runs: what the state store's read
  cache (``batchspec.state.cached``) relies on to forget what a write changes.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import secrets
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Protocol

from batchspec.errors import StateError
from batchspec.storage.answer_watch import (
    ANSWER_TIMEOUT_ENV,
    ANSWER_WATCH,
    ServerAddress,
    answer_timeout_from_env,
    shut_down_socket,
)
from batchspec.storage.database_url import misencoded, redact_url, scrub

POSTGRES_EXTRA_HINT = "pip install 'batchspec[postgres]'"


class DatabaseError(StateError):
    """The state database failed a statement (message names the database, never a password)."""


class IntegrityError(DatabaseError):
    """A constraint or trigger refused a write (e.g. the append-only audit log)."""


class DatabaseBusyError(DatabaseError):
    """Another process held the writer lock for longer than the busy timeout."""


class DatabaseUnavailableError(DatabaseError):
    """The database server refused, dropped or never answered the connection."""


class DatabaseNotAnsweringError(DatabaseUnavailableError):
    """The database server stopped answering a statement, and a new connection too."""


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


#: what a statement that only reads begins with (another one may write: ``Sql.on_change``)
_READS = ("SELECT", "select")
#: a statement that begins or ends a transaction (a savepoint's ROLLBACK TO does neither)
_TRANSACTION_EDGE = re.compile(r"\s*(?:begin|commit|end|rollback(?!\s+to\b))\b", re.I)


class Sql(ABC):
    """One connection to one database, in one dialect (``"sqlite"`` or ``"postgresql"``)."""

    dialect: ClassVar[str]
    #: where the database is, fit for messages (a file path, or a URL without its password)
    label: str
    #: inside the transaction ``begin_writer`` began: this connection holds the one writer
    #: lock, so no other one changes the database until it ends
    writer_open: bool = False
    #: told of each statement that may change the database, before it runs (see above)
    on_change: Callable[[str], None] | None = None
    #: seconds a statement waits for another connection's write lock before
    #: ``DatabaseBusyError`` (None: as the connection was opened, not set here)
    busy_timeout: float | None = None

    def set_busy_timeout(self, seconds: float) -> None:
        """Wait up to ``seconds`` for another connection's write lock (SQLite's busy
        timeout, PostgreSQL's ``lock_timeout``); no statement when it is set already."""
        if seconds != self.busy_timeout:
            self._set_busy_timeout(max(1, round(seconds * 1000)))
            self.busy_timeout = seconds

    @abstractmethod
    def _set_busy_timeout(self, milliseconds: int) -> None: ...

    def _busy_message(self, err: str) -> str:
        """``DatabaseBusyError``'s message, naming how long this connection waited."""
        # to a tenth of a second: what was left of a --lock-timeout is 1.99999 s
        waited = f" for {round(self.busy_timeout, 1):g} s" if self.busy_timeout is not None else ""
        return (
            f"the state database {self.label} stayed busy{waited} ({err}): another process "
            "is inside a write transaction; try again"
        )

    def _changing(self, sql: str) -> None:
        """``sql`` may write: a transaction's edge closes ``writer_open``; ``on_change``."""
        if _TRANSACTION_EDGE.match(sql):
            self.writer_open = False
        if self.on_change is not None:
            self.on_change(sql)

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    @abstractmethod
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run ``sql`` once per row; returns the rows changed in all."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """All rows of ``sql`` as dicts keyed by column name."""

    @abstractmethod
    def script(self, sql: str) -> None:
        """Run a script of several statements (DDL) in the current transaction."""

    @abstractmethod
    def stream(self, sql: str, size: int = 2000) -> Iterator[list[tuple[Any, ...]]]:
        """The rows of ``sql`` (no parameters), ``size`` at a time, never all in memory.

        On PostgreSQL, inside a transaction, a server-side cursor holds the rest.
        """

    @property
    @abstractmethod
    def in_transaction(self) -> bool: ...

    @abstractmethod
    def begin_writer(self) -> None:
        """Begin the outermost transaction holding the database's one writer lock."""

    @abstractmethod
    def table_names(self) -> list[str]:
        """Tables of the database (for PostgreSQL: on the search path), sorted."""

    @abstractmethod
    def close(self) -> None: ...

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction:
            self.execute("ROLLBACK")

    def table_exists(self, name: str) -> bool:
        return name in self.table_names()

    @contextmanager
    def savepoint(self, name: str = "nested") -> Iterator[None]:
        """A nested transaction inside the current one: all of it, or none of it."""
        self.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            if self.in_transaction:
                self.execute(f"ROLLBACK TO SAVEPOINT {name}")
                self.execute(f"RELEASE SAVEPOINT {name}")
            raise
        self.execute(f"RELEASE SAVEPOINT {name}")


def checkpoint_now(conn: sqlite3.Connection) -> None:
    """Copy a WAL database's log into its file now, or raise ``sqlite3.OperationalError``.

    Closing the last connection checkpoints too, but says nothing when that fails (a full
    disk): a file then linked into place would lack all the log held. A database in another
    journal mode has nothing to copy."""
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy:
        raise sqlite3.OperationalError("database is locked: its log could not be copied in")


# -- SQLite ------------------------------------------------------------------------------------


class SqliteSql(Sql):
    """An ``sqlite3`` connection in autocommit mode (``isolation_level=None``)."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.label = _sqlite_file(conn)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        if not sql.startswith(_READS):
            self._changing(sql)
        try:
            return self.conn.execute(sql, params)
        except sqlite3.IntegrityError as err:
            raise IntegrityError(f"{self.label}: {err}") from err

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        self._changing(sql)
        try:
            return self.conn.executemany(sql, rows).rowcount
        except sqlite3.IntegrityError as err:
            raise IntegrityError(f"{self.label}: {err}") from err

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.execute(sql, params)
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def script(self, sql: str) -> None:
        # never executescript(): it commits whatever transaction is open
        for statement in split_statements(sql):
            self.execute(statement)

    def stream(self, sql: str, size: int = 2000) -> Iterator[list[tuple[Any, ...]]]:
        cur = self.execute(sql)
        while rows := cur.fetchmany(size):
            yield rows

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def begin_writer(self) -> None:
        self._changing("BEGIN IMMEDIATE")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            if not _sqlite_busy(err):  # a full disk: SQLite cannot grow its -wal or -shm file
                raise DatabaseError(
                    f"cannot write the state database {self.label}: {err}; check that its "
                    "disk has room and its folder is writable, then run the command again"
                ) from err
            raise DatabaseBusyError(self._busy_message(str(err))) from err
        self.writer_open = True

    def _set_busy_timeout(self, milliseconds: int) -> None:
        self.conn.execute(f"PRAGMA busy_timeout = {milliseconds}")  # writes nothing

    def table_names(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        ).fetchall()
        return [row[0] for row in rows]

    def close(self) -> None:
        self.conn.close()


def _sqlite_busy(err: sqlite3.OperationalError) -> bool:
    """Whether SQLite failed for another connection's lock (SQLITE_BUSY, SQLITE_LOCKED), not
    for the disk under it."""
    code = getattr(err, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (5, 6)
    return "locked" in str(err) or "busy" in str(err)


def split_statements(script: str) -> list[str]:
    """The statements of ``script``, each whole: SQLite decides where one ends, not a ';'."""
    statements: list[str] = []
    current = ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if _has_sql(current):
                statements.append(current.strip())
            current = ""
    # the loop appended one ';' too many after the last piece
    rest = current[:-1]
    if _has_sql(rest):
        raise ValueError(f"incomplete SQL statement at the end of the script: {rest.strip()!r}")
    return statements


def _has_sql(text: str) -> bool:
    lines = (line.split("--", 1)[0] for line in text.splitlines())
    return bool("".join(lines).strip(" \t\r\n;"))


def _sqlite_file(conn: sqlite3.Connection) -> str:
    try:
        for _seq, name, file in conn.execute("PRAGMA database_list"):
            if name == "main":
                return file or "the in-memory database"
    except sqlite3.DatabaseError:
        pass
    return "the database"


def as_sql(conn: sqlite3.Connection | Sql) -> Sql:
    """``conn`` itself, or a raw ``sqlite3`` connection wrapped."""
    return conn if isinstance(conn, Sql) else SqliteSql(conn)


# -- PostgreSQL --------------------------------------------------------------------------------

_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|\?|%")


@functools.lru_cache(maxsize=512)
def to_pyformat(sql: str) -> str:
    """``sql`` with ``?`` placeholders as psycopg's ``%s`` and every literal ``%`` doubled."""

    def swap(match: re.Match[str]) -> str:
        token = match.group()
        if token == "?":
            return "%s"
        return token.replace("%", "%%")

    return _TOKEN.sub(swap, sql)


#: libpq's TCP settings unless the URL sets its own: a network that drops the connection
#: silently fails the next statement within about a minute (keepalives while idle, and at
#: most 60 s of data unacknowledged), not after the kernel's defaults (2 h of idle before the
#: first keepalive, some 15 min of retransmissions) while a CI job hangs holding its locks
KEEPALIVE_OPTIONS = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}


#: seconds a connect waits for the server unless the URL (or PGCONNECT_TIMEOUT) says
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10


def _default_options(url: str, answer_timeout: float) -> dict[str, Any]:
    """``KEEPALIVE_OPTIONS`` and a ``connect_timeout`` (10 s, or the answer timeout if shorter),
    each unless the URL sets its own (a URL libpq cannot parse gets none: the connect says
    why)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        given = conninfo_to_dict(url)
    except ProgrammingError:
        return {}
    options = {k: v for k, v in KEEPALIVE_OPTIONS.items() if k not in given}
    if "connect_timeout" not in given and not os.environ.get("PGCONNECT_TIMEOUT"):
        seconds = DEFAULT_CONNECT_TIMEOUT_SECONDS
        if answer_timeout > 0:
            seconds = min(seconds, max(1, math.ceil(answer_timeout)))
        options["connect_timeout"] = str(seconds)
    return options


def _connect_timeout(url: str, options: dict[str, Any]) -> int:
    """The seconds psycopg gives each connection attempt (at least 2, as libpq)."""
    from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo

    return timeout_from_conninfo(conninfo_to_dict(url, **options))


class PostgresSql(Sql):
    """A psycopg 3 connection in autocommit mode (transactions are begun explicitly)."""

    dialect = "postgresql"

    def __init__(self, conn: Any, url: str) -> None:
        self.conn = conn
        self._url = url
        self.label = redact_url(url)
        import psycopg

        self._psycopg = psycopg
        #: the server ended this session on purpose (SQLSTATE 57P01): every later statement
        #: only sees "the connection is closed", so the reason is kept for their messages
        self._ended_by_server = False
        #: the answer watch cut this connection: its server stopped answering (same reason)
        self._not_answering = False

    #: seconds a statement may go without an answer (0: no limit); ``answer_watch``
    answer_timeout = 0.0
    #: where the server listens, for the answer watch's ping (None: not known)
    server: ServerAddress | None = None

    @classmethod
    def connect(
        cls, url: str, *, busy_timeout: float, answer_timeout: float | None = None
    ) -> PostgresSql:
        """Connect to ``url``; one clear ``StateError`` (never the password) if we cannot.

        ``answer_timeout``: seconds a statement may go without an answer before the server is
        called stopped (``batchspec.storage.answer_watch``); None: the environment's, or 60."""
        try:
            import psycopg
        except ImportError as err:
            raise StateError(
                f"the state is a PostgreSQL database ({redact_url(url)}), but PostgreSQL "
                f"support is not installed: {POSTGRES_EXTRA_HINT}"
            ) from err
        reason = misencoded(url)
        if reason is not None:
            raise StateError(f"the state URL {redact_url(url)} is not valid: {reason}")
        if answer_timeout is None:
            answer_timeout = answer_timeout_from_env()
        options = _default_options(url, answer_timeout)
        try:
            conn = psycopg.connect(url, autocommit=True, application_name="batchspec", **options)
        except psycopg.ProgrammingError as err:  # a malformed URL or option
            raise StateError(
                f"the state URL {redact_url(url)} is not valid: {_first_line(err, url)}"
            ) from err
        except psycopg.Error as err:
            raise DatabaseUnavailableError(
                f"cannot connect to the state database {redact_url(url)}: "
                f"{_connect_reason(err, url, _connect_timeout(url, options))}"
            ) from err
        db = cls(conn, url)
        db.answer_timeout = answer_timeout
        db.server = _server_address(conn)
        db.set_busy_timeout(busy_timeout)
        db.schema = db.execute("SELECT coalesce(current_schema(), '')").fetchone()[0]
        if not db.schema:  # else the first CREATE TABLE says "no schema has been selected"
            search_path = db.execute("SHOW search_path").fetchone()[0]
            conn.close()
            raise StateError(
                f"the state database {db.label} has no schema to keep the state in: its "
                f"search_path ({search_path}) names none that exists; create it first "
                "(CREATE SCHEMA name) or fix -csearch_path in the URL's options"
            )
        return db

    schema = ""

    def advisory_key(self, purpose: str) -> int:
        """A bigint advisory-lock key for ``purpose``, unique to this state's schema."""
        digest = hashlib.sha256(f"batchspec\0{self.schema}\0{purpose}".encode()).digest()
        return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF

    def execute(self, sql: str, params: Sequence[Any] = (), *, binary: bool = False) -> Any:
        """``binary``: results in PostgreSQL's binary format (a ``bytea`` comes as its bytes,
        not as hex text twice their size)."""
        if not sql.startswith(_READS):
            self._changing(sql)
        with self._translated():
            if params:
                return self.conn.execute(to_pyformat(sql), tuple(params), binary=binary)
            return self.conn.execute(sql, binary=binary)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        self._changing(sql)
        with self._translated():
            cur = self.conn.cursor()
            cur.executemany(to_pyformat(sql), [tuple(r) for r in rows])
            count: int = cur.rowcount
            return count

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        if not sql.startswith(_READS):
            self._changing(sql)
        with self._translated():
            cur = self.conn.cursor(row_factory=dict_row)
            cur.execute(to_pyformat(sql) if params else sql, tuple(params) or None)
            return list(cur.fetchall())

    def script(self, sql: str) -> None:
        # no parameters: psycopg sends the script as one simple query, so a trigger
        # function's body ($$ ... ; ... $$) needs no splitting
        self.execute(sql)

    def stream(self, sql: str, size: int = 2000) -> Iterator[list[tuple[Any, ...]]]:
        if not self.in_transaction:  # a named cursor needs a transaction to live in
            rows = self.execute(sql).fetchall()
            for start in range(0, len(rows), size):
                yield [tuple(r) for r in rows[start : start + size]]
            return
        name = f"batchspec_stream_{secrets.token_hex(4)}"
        cur = self.conn.cursor(name=name)
        cur.itersize = size
        try:
            with self._translated():  # around each round trip, not around the caller's work
                cur.execute(sql)
            while True:
                with self._translated():
                    rows = cur.fetchmany(size)
                if not rows:
                    break
                yield [tuple(r) for r in rows]
        finally:
            with self._translated():
                cur.close()

    @property
    def in_transaction(self) -> bool:
        status = self.conn.info.transaction_status
        return status in (status.INTRANS, status.INERROR)

    def commit(self) -> None:
        """COMMIT, refused when a statement of the transaction failed: PostgreSQL then answers
        a COMMIT with a silent ROLLBACK, and a caller that went on past the failure would take
        everything it wrote (an intent before its create) for committed."""
        status = self.conn.info.transaction_status
        if status == status.INERROR:
            self.execute("ROLLBACK")
            raise DatabaseError(
                "the state transaction was rolled back: one of its statements failed and "
                "the failure was passed over, so none of it was committed"
            )
        super().commit()

    def begin_writer(self) -> None:
        self.execute("BEGIN")
        try:
            self.execute("SELECT pg_advisory_xact_lock(?)", (self.advisory_key("writer"),))
        except BaseException:
            self.rollback()
            raise
        self.writer_open = True

    def _set_busy_timeout(self, milliseconds: int) -> None:
        with self._translated():  # not ``execute``: it changes no row (``on_change``)
            self.conn.execute(f"SET lock_timeout = {milliseconds}")

    def table_names(self) -> list[str]:
        rows = self.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = ANY (current_schemas(false)) ORDER BY table_name"
        ).fetchall()
        return [row[0] for row in rows]

    def close(self) -> None:
        self.conn.close()

    def stop_waiting(self) -> None:
        """The answer watch found the server stopped answering: end the statement in flight
        (its socket shut down, libpq returns a connection error, reported as such)."""
        self._not_answering = True
        try:
            fileno = self.conn.pgconn.socket
        except self._psycopg.Error:
            return  # closed meanwhile
        shut_down_socket(fileno)

    def _not_answering_error(self) -> DatabaseNotAnsweringError:
        return DatabaseNotAnsweringError(
            f"the state database {self.label} stopped answering: no answer to a statement "
            f"for {self.answer_timeout:g} s, nor to a new connection (its server is stopped "
            "or frozen, or its host or network is stuck while TCP still answers), so "
            "batchspec stopped waiting; the server rolls back the unfinished transaction when "
            "it resumes, so nothing is half-written: run the command again once it answers "
            f"({ANSWER_TIMEOUT_ENV} sets how many seconds to wait)"
        )

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """One round trip: bounded by the answer watch, its driver errors made ours."""
        try:
            with ANSWER_WATCH.waiting(self):
                yield
        except self._psycopg.Error as err:
            raise self._translate(err) from err

    def _translate(self, err: Exception) -> DatabaseError:
        """The ``StateError`` for a psycopg error (never the password in its message)."""
        errors = self._psycopg.errors
        if self._not_answering:  # every later statement only sees "the connection is lost"
            return self._not_answering_error()
        if isinstance(err, errors.IntegrityError | errors.RaiseException):  # RAISE: a trigger
            return IntegrityError(f"{self.label}: {_first_line(err, self._url)}")
        if isinstance(err, errors.LockNotAvailable):
            return DatabaseBusyError(self._busy_message(_first_line(err, self._url)))
        if isinstance(err, self._psycopg.OperationalError):
            if getattr(err, "sqlstate", None) == ADMIN_SHUTDOWN:
                self._ended_by_server = True
            reason = (
                "the server ended this session: `batchspec unlock ID --force` from another "
                "run (then `batchspec history` shows that unlock), an administrator, or a "
                "server shutdown"
                if self._ended_by_server
                else _first_line(err, self._url)
            )
            return DatabaseUnavailableError(
                f"lost the connection to the state database {self.label} ({reason}); the "
                "server rolled back the unfinished transaction, so nothing is half-written: "
                "run the command again to go on"
            )
        return DatabaseError(
            f"the state database {self.label} refused a statement: {_first_line(err, self._url)}"
        )


#: SQLSTATE admin_shutdown: pg_terminate_backend() (``batchspec unlock --force``) or a shutdown
ADMIN_SHUTDOWN = "57P01"


def _first_line(err: BaseException, url: str) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return scrub(lines[0] if lines else type(err).__name__, url)


def _server_address(conn: Any) -> ServerAddress | None:
    """Where ``conn``'s server listens (its numeric address when libpq knows it)."""
    info = conn.info
    try:
        host = info.hostaddr or info.host
    except Exception:  # noqa: BLE001 - hostaddr needs libpq 12; without it, host alone
        host = info.host
    try:
        return ServerAddress.of(host, int(info.port))
    except (TypeError, ValueError):
        return None


def _connect_reason(err: BaseException, url: str, timeout: int) -> str:
    """libpq's reason, shortened to what the user can act on (never the password)."""
    text = scrub(" ".join(str(err).split()), url)
    if "password authentication failed" in text or "no password supplied" in text:
        return "the server refused the user name or password (check the URL's credentials)"
    match = re.search(r'database "([^"]+)" does not exist', text)
    if match:
        return f'the database "{match.group(1)}" does not exist on the server (create it first)'
    if "Connection refused" in text:
        return "the connection was refused (is the server running, on that host and port?)"
    if "timeout expired" in text:
        return (
            f"the server did not answer within {timeout} s (check the host, port and "
            "firewall; a server that accepts connections but never answers is stopped or "
            "stuck; connect_timeout in the URL sets the seconds: by default "
            f"{DEFAULT_CONNECT_TIMEOUT_SECONDS}, or {ANSWER_TIMEOUT_ENV} when shorter)"
        )
    # libpq prefixes each attempt with 'connection failed: connection to server at ...'
    return text.rsplit("failed: ", 1)[-1]


__all__ = [
    "POSTGRES_EXTRA_HINT",
    "Cursor",
    "DatabaseBusyError",
    "DatabaseError",
    "DatabaseNotAnsweringError",
    "DatabaseUnavailableError",
    "IntegrityError",
    "PostgresSql",
    "Sql",
    "SqliteSql",
    "as_sql",
    "split_statements",
    "to_pyformat",
]
