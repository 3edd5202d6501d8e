"""The lock row: at most one row, the run holding the writer lock.

Only the row lives here; the policy (waiting, stale holders, heartbeats) is
``batchspec.state.lock``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchspec.state.connection import StateConnection
from batchspec.state.records import known_columns


@dataclass(frozen=True)
class LockRow:
    """The run holding the writer lock. ``batchspec.state.lock.LockHolder`` is this class."""

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
    """Read, write, touch and delete the lock row."""

    # -- the lock row (policy lives in batchspec.state.lock) --------------------------------

    def lock_row(self) -> LockRow | None:
        row = self._one("SELECT * FROM lock WHERE id = 1")
        return None if row is None else _lock_row(row)

    def write_lock_row(self, holder: LockRow) -> None:
        """Make ``holder`` the lock holder, replacing any other (policy: batchspec.state.lock)."""
        with self.atomic():
            self.db.execute(
                "INSERT INTO lock (id, holder_id, host, pid, command, ci_run_url, since, "
                'heartbeat, "user") VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE '
                "SET holder_id = excluded.holder_id, host = excluded.host, pid = excluded.pid, "
                "command = excluded.command, ci_run_url = excluded.ci_run_url, "
                'since = excluded.since, heartbeat = excluded.heartbeat, "user" = excluded."user"',
                (
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
        """Set the heartbeat if ``holder_id`` still holds the lock; False if it does not."""
        with self.atomic():
            cur = self.db.execute(
                "UPDATE lock SET heartbeat = ? WHERE id = 1 AND holder_id = ?",
                (heartbeat, holder_id),
            )
            return cur.rowcount == 1

    def delete_lock_row(self, holder_id: str) -> bool:
        """Release the lock if ``holder_id`` holds it; False if it does not."""
        with self.atomic():
            cur = self.db.execute("DELETE FROM lock WHERE id = 1 AND holder_id = ?", (holder_id,))
            return cur.rowcount == 1
