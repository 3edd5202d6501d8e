"""A journal of batch creates for providers whose batches carry no metadata.

Anthropic's Message Batches and Together's batches keep none of batchspec's metadata, so
their providers keep locally what OpenAI keeps remotely: one SQLite row per create, keyed by
the batch's metadata, in ``<dataDir>/journal.db`` (``state/<type>/<provider>`` by default,
beside the state store, so it travels with it; schema by batchspec.storage.migrations, set
"anthropic-journal", its name from when only Anthropic had one).

Invariants:

- A journal row is committed *before* the create is sent (``remote_id`` NULL) and confirmed
  with the batch id as soon as the answer arrives. A row still unconfirmed means an earlier
  create may or may not have reached the provider: the provider resolves it before it sends
  another (see ``batchspec.providers.anthropic`` and ``batchspec.providers.together``).
- A remote id is claimed by at most one row (``UNIQUE``).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from batchspec.storage.migrations import Migrations, table_exists
from batchspec.storage.private import create_private_file, ensure_private_dir
from batchspec.storage.sql import Sql


def _adopt_legacy_journal(db: Sql) -> list[str]:
    """Journals made before the shared runner have the ``creates`` table and no history."""
    return ["m001_initial"] if table_exists(db, "creates") else []


MIGRATIONS = Migrations("anthropic-journal", adopt=_adopt_legacy_journal)
MIGRATIONS.script(
    "m001_initial",
    """
CREATE TABLE creates (
    key TEXT PRIMARY KEY,
    metadata TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    file_id TEXT NOT NULL,
    requests INTEGER NOT NULL,
    ids_sha256 TEXT NOT NULL,
    started_at REAL NOT NULL,
    remote_id TEXT UNIQUE
)
""",
)


@dataclass(frozen=True)
class JournalEntry:
    """One create: what was sent (count and custom_id digest) and, once known, the batch id."""

    key: str
    metadata: Mapping[str, str]
    endpoint: str
    file_id: str
    requests: int
    ids_sha256: str
    started_at: float
    remote_id: str | None = None


def metadata_key(metadata: Mapping[str, str]) -> str:
    """The journal key of a create: a digest of its metadata (batchspec's keys make it unique)."""
    canonical = json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def ids_digest(custom_ids: Iterator[str] | list[str] | set[str]) -> str:
    """A digest of a set of custom_ids, whatever their order."""
    return hashlib.sha256("\n".join(sorted(custom_ids)).encode()).hexdigest()


class Journal:
    """The ``creates`` table of ``journal.db`` (see the module invariants)."""

    def __init__(self, root: Path) -> None:
        # beside the state and as private: made 0700/0600 whatever the umask
        ensure_private_dir(root)
        create_private_file(root / "journal.db")
        # one connection shared by the threads of a pass (polls, downloads), one call at a time
        self._db = sqlite3.connect(
            root / "journal.db", isolation_level=None, check_same_thread=False
        )
        self._lock = threading.RLock()
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=10000")
        MIGRATIONS.apply(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, key: str) -> JournalEntry | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM creates WHERE key = ?", (key,)).fetchone()
            return _entry(row) if row is not None else None

    def by_remote_id(self) -> dict[str, JournalEntry]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM creates WHERE remote_id IS NOT NULL")
            return {row["remote_id"]: _entry(row) for row in rows}

    def unconfirmed(self) -> list[JournalEntry]:
        """The creates whose answers never came (oldest first): each may have made a batch."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM creates WHERE remote_id IS NULL ORDER BY started_at, key"
            )
            return [_entry(row) for row in rows]

    def set_aside(self, remote_id: str) -> None:
        """Claim ``remote_id`` for no create (``set-aside:<id>``, no metadata): a batch whose
        maker cannot be told, adopted by none from now on (see ``anthropic._maker``)."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO creates VALUES (?, '{}', '', '', 0, '', 0, ?)",
                (f"set-aside:{remote_id}", remote_id),
            )

    def begin(self, entry: JournalEntry) -> None:
        """Record a create about to be sent (replacing an unconfirmed one with the same key)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO creates VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    entry.key,
                    json.dumps(dict(entry.metadata), sort_keys=True),
                    entry.endpoint,
                    entry.file_id,
                    entry.requests,
                    entry.ids_sha256,
                    entry.started_at,
                ),
            )

    def confirm(self, key: str, remote_id: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # a batch adopted for this key may have been claimed by a stale row: it is ours now
                self._db.execute(
                    "UPDATE creates SET remote_id = NULL WHERE remote_id = ? AND key != ?",
                    (remote_id, key),
                )
                self._db.execute("UPDATE creates SET remote_id = ? WHERE key = ?", (remote_id, key))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def forget(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM creates WHERE key = ?", (key,))


def _entry(row: sqlite3.Row) -> JournalEntry:
    return JournalEntry(
        key=row["key"],
        metadata=json.loads(row["metadata"]),
        endpoint=row["endpoint"],
        file_id=row["file_id"],
        requests=row["requests"],
        ids_sha256=row["ids_sha256"],
        started_at=row["started_at"],
        remote_id=row["remote_id"],
    )
