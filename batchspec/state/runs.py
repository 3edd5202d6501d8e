"""The runs and events records: who ran what (``runs``) and the append-only audit log (``events``).

A run is one command that read or changed state, with its provenance (``RunInfo``). Events are
never updated or deleted: the schema's triggers refuse it.

In PostgreSQL a run holds a session advisory lock keyed on its id (``run_session_key``), taken
in the transaction that records it (``runs.session_lock`` = 1) and released once its end is
recorded, or by the server when its session ends, however the process died. So any host can
tell a run that is still going (waiting for a lock, say, holding none yet) from one that was
killed before it recorded its end (``batchspec.state.lock.runs_whose_session_ended``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from batchspec.errors import StateError
from batchspec.state.connection import StateConnection
from batchspec.state.records import (
    dump_json,
    known_columns,
    load_json,
    returned_id,
    row_of,
    utc_timestamp,
    where_clause,
)
from batchspec.state.runinfo import RunInfo
from batchspec.storage.sql import DatabaseError, DatabaseUnavailableError, PostgresSql, Sql

#: events an apply records for a resource whose manifest it does not have (``last_declared_at``)
NOT_DECLARING_EVENTS = ("prune", "prune-held", "cancel", "forget")


@dataclass(frozen=True)
class RunRow:
    id: int
    command: str
    args: dict[str, Any]
    started_at: str
    ended_at: str | None
    exit_code: int | None
    user: str | None
    host: str | None
    pid: int | None
    git_commit: str | None
    git_branch: str | None
    git_dirty: bool | None
    ci_system: str | None
    ci_run_url: str | None
    version: str | None
    git_commit_time: int | None = None  # committer time of git_commit, epoch seconds

    @property
    def outcome(self) -> str:
        """``running`` (no end recorded), ``killed`` (ended with no exit code: its process
        died and a later run found out), or ``exit N``; what the row alone says (a run with
        no end may be dead: ``batchspec.core.history.run_outcome``)."""
        if self.ended_at is None:
            return "running"
        return "killed" if self.exit_code is None else f"exit {self.exit_code}"


@dataclass(frozen=True)
class EventRow:
    id: int
    run_id: int | None
    at: str
    resource: str | None
    generation_id: int | None
    batch_id: int | None
    action: str
    detail: dict[str, Any]


def run_session_key(db: Sql, run_id: int) -> int:
    """PostgreSQL: the session advisory lock run ``run_id`` holds until it records its end."""
    assert isinstance(db, PostgresSql)
    return db.advisory_key(f"run\0{run_id}")


def _run_row(d: Mapping[str, Any]) -> RunRow:
    dirty = d["git_dirty"]
    return RunRow(
        **{
            **known_columns(RunRow, d),
            "args": load_json(d["args"]),
            "git_dirty": None if dirty is None else bool(dirty),
        }
    )


def _event_row(d: Mapping[str, Any]) -> EventRow:
    return row_of(EventRow, d, detail=load_json(d["detail"]) or {})


class RunsAndEvents(StateConnection):
    """Record runs and append events; read them back."""

    # -- runs and events ------------------------------------------------------------------------

    def start_run(self, command: str, args: Mapping[str, Any], info: RunInfo) -> int:
        """Record the start of a run; returns its id. PostgreSQL: the run's session lock is
        taken in the same transaction (module docstring), so no other session ever sees the
        row without it."""
        dirty = None if info.git_dirty is None else int(info.git_dirty)
        session = self.dialect == "postgresql"
        locked: int | None = None
        try:
            # one_write: SQLite writes the row alone; PostgreSQL keeps its savepoint anyway
            with self.atomic(one_write=True):
                cur = self.db.execute(
                    'INSERT INTO runs (command, args, started_at, "user", host, pid, git_commit, '
                    "git_branch, git_dirty, ci_system, ci_run_url, version, git_commit_time, "
                    "session_lock) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (
                        command,
                        dump_json(dict(args)),
                        utc_timestamp(),
                        info.user,
                        info.host,
                        info.pid,
                        info.git_commit,
                        info.git_branch,
                        dirty,
                        info.ci_system,
                        info.ci_run_url,
                        info.version,
                        info.git_commit_time,
                        1 if session else None,
                    ),
                )
                run_id = returned_id(cur)
                if session:
                    key = run_session_key(self.db, run_id)
                    self.db.execute("SELECT pg_advisory_lock(?)", (key,))  # a new id: free
                    locked = key
            return run_id
        except BaseException:
            if locked is not None:  # a session lock outlives the rollback: let it go
                with suppress(DatabaseError):
                    self.db.execute("SELECT pg_advisory_unlock(?)", (locked,))
            raise

    def finish_run(self, run_id: int, exit_code: int) -> None:
        """Record the end of a run and its exit code."""
        with self.atomic():
            cur = self.db.execute(
                "UPDATE runs SET ended_at = ?, exit_code = ? WHERE id = ?",
                (utc_timestamp(), exit_code, run_id),
            )
            if cur.rowcount != 1:
                raise StateError(f"run {run_id} is not recorded in {self.label}")
        if self.dialect == "postgresql" and not self.in_transaction:
            # only once the end is committed: a reader must never see the row open and the
            # lock free (killed); inside a caller's transaction the session's end frees it
            with suppress(DatabaseUnavailableError):  # the end is recorded: nothing lost
                self.db.execute("SELECT pg_advisory_unlock(?)", (run_session_key(self.db, run_id),))

    def end_dead_runs(self, host: str, pid: int, started_by: str) -> list[int]:
        """Mark ended the unfinished runs of a process known dead (``pid`` on ``host``) that
        started by ``started_by`` (when it took its lock); returns their ids, oldest first.

        Their ``exit_code`` stays NULL: no exit code was ever recorded, and an ended run with
        none is one whose process died (``RunRow.outcome`` "killed"). A later run of a new
        process that reused the pid started after ``started_by`` and is left alone.
        """
        with self.atomic():
            rows = self._all(
                "SELECT id FROM runs WHERE ended_at IS NULL AND host = ? AND pid = ? "
                "AND started_at <= ? ORDER BY id",
                (host, pid, started_by),
            )
            ids = [int(row["id"]) for row in rows]
            now = utc_timestamp()
            for run_id in ids:
                self.db.execute("UPDATE runs SET ended_at = ? WHERE id = ?", (now, run_id))
            return ids

    def unfinished_runs_with_session_lock(self, run_ids: Iterable[int]) -> set[int]:
        """Which of ``run_ids`` recorded no end and hold a session lock while they run (a
        PostgreSQL run recorded since ``m008_run_session_lock``; module docstring)."""
        wanted = set(run_ids)
        if not wanted:
            return set()
        # a range, not a list: `history --limit` has no bound, a statement's parameters have
        rows = self._all(
            "SELECT id FROM runs WHERE ended_at IS NULL AND session_lock = 1 "
            "AND id BETWEEN ? AND ?",
            (min(wanted), max(wanted)),
        )
        return {int(row["id"]) for row in rows} & wanted

    def get_run(self, run_id: int) -> RunRow:
        row = self._one("SELECT * FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise StateError(f"run {run_id} is not recorded in {self.label}")
        return _run_row(row)

    def runs(self, *, resource: str | None = None, limit: int = 20) -> list[RunRow]:
        """Runs, newest first; with ``resource``, only runs that recorded events for it."""
        if resource is None:
            rows = self._all("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._all(
                "SELECT * FROM runs WHERE id IN (SELECT run_id FROM events WHERE resource = ?) "
                "ORDER BY id DESC LIMIT ?",
                (resource, limit),
            )
        return [_run_row(r) for r in rows]

    def last_declared_at(self, resource: str) -> tuple[str, int | None] | None:
        """The git commit of the most recent ``apply`` (or ``import``) run that recorded an
        event for ``resource`` other than pruning, cancelling or forgetting it (the last
        checkout known to declare it), with that commit's time as the run recorded it (epoch
        seconds; None: unknown). None: no such run, or it recorded no commit."""
        row = self._one(
            "SELECT runs.git_commit AS commit_id, runs.git_commit_time AS commit_time "
            "FROM events JOIN runs ON runs.id = events.run_id "
            "WHERE events.resource = ? AND runs.command IN ('apply', 'import') "
            f"AND events.action NOT IN ({', '.join('?' * len(NOT_DECLARING_EVENTS))}) "
            "ORDER BY events.id DESC LIMIT 1",
            (resource, *NOT_DECLARING_EVENTS),
        )
        if row is None or not row["commit_id"]:
            return None
        time = row["commit_time"]
        return row["commit_id"], None if time is None else int(time)

    def record_event(
        self,
        run_id: int | None,
        action: str,
        *,
        resource: str | None = None,
        generation_id: int | None = None,
        batch_id: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one event to the audit log; returns its id."""
        with self.atomic(one_write=True):
            cur = self.db.execute(
                "INSERT INTO events (run_id, at, resource, generation_id, batch_id, action, "
                "detail) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    run_id,
                    utc_timestamp(),
                    resource,
                    generation_id,
                    batch_id,
                    action,
                    dump_json(dict(detail or {})),
                ),
            )
            return returned_id(cur)

    def events(
        self,
        *,
        run_id: int | None = None,
        resource: str | None = None,
        action: str | None = None,
        limit: int | None = None,
    ) -> list[EventRow]:
        """Events in the order they happened; with ``limit``, the most recent ``limit``."""
        where, params = where_clause(run_id=run_id, resource=resource, action=action)
        sql = f"SELECT * FROM events {where} ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_event_row(r) for r in reversed(self._all(sql, params))]

    def first_generation_event(
        self, resource: str, generation_id: int, action: str
    ) -> EventRow | None:
        """The earliest ``action`` event recorded for one generation of ``resource`` (by the
        indexed resource), if any: for ``cancel``, the one that retired it (a later cancel of
        one of its batches, e.g. a create found after its retirement, does not say why)."""
        row = self._one(
            "SELECT * FROM events WHERE resource = ? AND generation_id = ? AND action = ? "
            "ORDER BY id LIMIT 1",
            (resource, generation_id, action),
        )
        return None if row is None else _event_row(row)

    def generation_events(
        self, generation_id: int, action: str, *, resource: str
    ) -> list[EventRow]:
        """Every ``action`` event of one generation recorded under the name ``resource``, in
        the order they happened, read by the resource's index (the events table has none on
        generations); a resource renamed since recorded its older ones under its former names."""
        rows = self._all(
            "SELECT * FROM events WHERE resource = ? AND generation_id = ? AND action = ? "
            "ORDER BY id",
            (resource, generation_id, action),
        )
        return [_event_row(r) for r in rows]

    def last_batch_event(self, batch_id: int, action: str) -> EventRow | None:
        """The most recent ``action`` event recorded for one batch, if any."""
        row = self._one(
            "SELECT * FROM events WHERE batch_id = ? AND action = ? ORDER BY id DESC LIMIT 1",
            (batch_id, action),
        )
        return None if row is None else _event_row(row)
