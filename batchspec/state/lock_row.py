"""The lock rows: one row per locked resource (table ``resource_locks``), naming its holder.

A row's ``resource`` is a resource name, or ``*`` (``WORKSPACE``) for the workspace-wide
lock. One holder (a run) owns one or more rows, all with its ``holder_id`` and the same
details. Only the rows live here; the policy (conflicts, waiting, dead holders, heartbeats)
is ``batchspec.state.lock``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from batchspec.state.connection import StateConnection
from batchspec.state.records import known_columns

#: the key of the workspace-wide lock (never a resource name: those match ^[a-z0-9])
WORKSPACE = "*"


@dataclass(frozen=True)
class LockRow:
    """A run holding locks. ``batchspec.state.lock.LockHolder`` is this class."""

    holder_id: str
    host: str
    pid: int
    command: str
    ci_run_url: str | None
    since: str
    heartbeat: str
    user: str | None = None


def _lock_row(d: Mapping[str, Any]) -> LockRow:
    return LockRow(**known_columns(LockRow, d))


class LockRows(StateConnection):
    """Read, write, touch and delete the lock rows."""

    # -- the lock rows (policy lives in batchspec.state.lock) -------------------------------

    def lock_rows(self) -> dict[str, LockRow]:
        """Every locked key (a resource name or ``*``) and its holder, in key order."""
        rows = self._all("SELECT * FROM resource_locks ORDER BY resource")
        return {row["resource"]: _lock_row(row) for row in rows}

    def lock_row(self, key: str = WORKSPACE) -> LockRow | None:
        """The holder of ``key`` (default: the workspace-wide lock), or None."""
        row = self._one("SELECT * FROM resource_locks WHERE resource = ?", (key,))
        return None if row is None else _lock_row(row)

    def write_lock_row(self, holder: LockRow, keys: Iterable[str] = (WORKSPACE,)) -> None:
        """Make ``holder`` the holder of every key in ``keys``, replacing any other holder
        (policy: batchspec.state.lock)."""
        with self.atomic():
            for key in sorted(set(keys)):
                self.db.execute(
                    "INSERT INTO resource_locks (resource, holder_id, host, pid, command, "
                    'ci_run_url, since, heartbeat, "user") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) '
                    "ON CONFLICT (resource) DO UPDATE SET holder_id = excluded.holder_id, "
                    "host = excluded.host, pid = excluded.pid, command = excluded.command, "
                    "ci_run_url = excluded.ci_run_url, since = excluded.since, "
                    'heartbeat = excluded.heartbeat, "user" = excluded."user"',
                    (
                        key,
                        holder.holder_id,
                        holder.host,
                        holder.pid,
                        holder.command,
                        holder.ci_run_url,
                        holder.since,
                        holder.heartbeat,
                        holder.user,
                    ),
                )

    def touch_lock_row(self, holder_id: str, heartbeat: str) -> bool:
        """Set the heartbeat of ``holder_id``'s rows; False if it holds none."""
        with self.atomic(one_write=True):
            cur = self.db.execute(
                "UPDATE resource_locks SET heartbeat = ? WHERE holder_id = ?",
                (heartbeat, holder_id),
            )
            return cur.rowcount >= 1

    def delete_lock_row(self, holder_id: str) -> bool:
        """Release every row ``holder_id`` holds; False if it holds none."""
        with self.atomic(one_write=True):
            cur = self.db.execute("DELETE FROM resource_locks WHERE holder_id = ?", (holder_id,))
            return cur.rowcount >= 1
