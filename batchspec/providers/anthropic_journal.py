"""What an ``anthropic`` provider keeps on disk: staged inputs and a journal of its creates.

Anthropic's Message Batches take their requests inline (no file upload) and carry no
metadata, so the provider keeps locally what OpenAI would keep remotely. Layout under the
provider's data folder (``state/anthropic/<provider>`` by default, beside the state store,
so it travels with it)::

    files/<sha256>.jsonl    an input as "uploaded": a copy, named by its content's sha256
    journal.db              SQLite: one row per create, keyed by the batch's metadata
                            (schema by batchspec.storage.migrations, set "anthropic-journal")

Invariants:

- A staged file is complete and its name is its content's sha256 (written to a temporary
  name, hashed while copied, renamed into place). It is removed once its batch exists.
- A journal row is committed *before* the create is sent (``remote_id`` NULL) and confirmed
  with the batch id as soon as the answer arrives. A row still unconfirmed means an earlier
  create may or may not have reached Anthropic: ``AnthropicProvider`` resolves it before it
  sends another (see ``batchspec.providers.anthropic``).
- A remote id is claimed by at most one row (``UNIQUE``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from batchspec.storage.migrations import Migrations, table_exists
from batchspec.storage.sql import Sql

STAGED_PREFIX = "staged-"
_CHUNK = 1024 * 1024


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
class StagedFile:
    id: str
    path: Path
    size: int
    created_at: int


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


class Staging:
    """Content-addressed copies of inputs under ``root/files``."""

    def __init__(self, root: Path) -> None:
        self.folder = root / "files"

    def stage(self, source: Path) -> StagedFile:
        """Copy ``source`` in (hashing as it streams); an identical copy is reused."""
        self.folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(dir=self.folder, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            file_id = STAGED_PREFIX + digest.hexdigest()
            os.replace(tmp, self.path(file_id))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.get(file_id)

    def path(self, file_id: str) -> Path:
        return self.folder / f"{file_id.removeprefix(STAGED_PREFIX)}.jsonl"

    def get(self, file_id: str) -> StagedFile:
        """The staged file ``file_id``; ``FileNotFoundError`` if it is not (or no longer) here."""
        if not file_id.startswith(STAGED_PREFIX) or "/" in file_id:
            raise FileNotFoundError(file_id)
        path = self.path(file_id)
        stat = path.stat()
        return StagedFile(file_id, path, stat.st_size, int(stat.st_mtime))

    def remove(self, file_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(file_id).unlink()


class Journal:
    """The ``creates`` table of ``journal.db`` (see the module invariants)."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(root / "journal.db", isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=10000")
        MIGRATIONS.apply(self._db)

    def close(self) -> None:
        self._db.close()

    def get(self, key: str) -> JournalEntry | None:
        row = self._db.execute("SELECT * FROM creates WHERE key = ?", (key,)).fetchone()
        return _entry(row) if row is not None else None

    def by_remote_id(self) -> dict[str, JournalEntry]:
        rows = self._db.execute("SELECT * FROM creates WHERE remote_id IS NOT NULL")
        return {row["remote_id"]: _entry(row) for row in rows}

    def begin(self, entry: JournalEntry) -> None:
        """Record a create about to be sent (replacing an unconfirmed one with the same key)."""
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
