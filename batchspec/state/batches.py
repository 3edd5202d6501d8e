"""The batches and files records: one row per remote batch attempt, and the uploaded input files.

A batch row whose ``remote_id`` is NULL is a recorded **intent**: written before the remote
create, with the deterministic ``key`` that is also sent in the batch metadata, so a crash
between create and record can be repaired by adopting the remote batch that carries the key
(DESIGN.md, invariant 1). A recorded ``remote_id`` never changes. Files are keyed by
(provider, sha256), so an input is uploaded once per provider.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batchspec.errors import StateError
from batchspec.state.connection import StateConnection
from batchspec.state.records import (
    changed_fields,
    check_fields,
    dump_json,
    epoch_or_iso,
    known_columns,
    load_json,
    row_of,
    utc_timestamp,
    where_clause,
)
from batchspec.storage.sql import IntegrityError
from batchspec.wire.batch_status import TERMINAL_STATUSES

#: a batch row's status before its remote create (remote statuses are stored as they came)
BATCH_INTENT_STATUS = "pending"
BATCH_TERMINAL_STATUSES = TERMINAL_STATUSES  # completed, failed, expired, cancelled


@dataclass(frozen=True)
class FileRow:
    provider: str
    sha256: str
    remote_id: str
    bytes: int | None
    uploaded_at: str
    expires_at: str | None


@dataclass(frozen=True)
class BatchRow:
    id: int
    generation_id: int
    shard: int
    attempt: int
    provider: str
    key: str
    remote_id: str | None
    input_sha256: str
    input_file_id: str | None
    requests: int
    status: str
    total: int | None
    completed: int | None
    failed: int | None
    output_file_id: str | None
    error_file_id: str | None
    output_sha256: str | None
    errors_sha256: str | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    reason: str | None
    provider_errors: list[Any] | None
    created_at: str
    updated_at: str
    submitted_at: str | None
    terminal_at: str | None
    collected_at: str | None

    @property
    def is_terminal(self) -> bool:
        return self.status in BATCH_TERMINAL_STATUSES


def _batch_row(d: Mapping[str, Any]) -> BatchRow:
    return row_of(BatchRow, d, provider_errors=load_json(d["provider_errors"]))


_BATCH_FIELDS = frozenset(
    {
        "remote_id",
        "input_file_id",
        "requests",
        "status",
        "total",
        "completed",
        "failed",
        "output_file_id",
        "error_file_id",
        "output_sha256",
        "errors_sha256",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "reason",
        "provider_errors",
        "submitted_at",
        "terminal_at",
        "collected_at",
        "updated_at",
    }
)


class BatchesAndFiles(StateConnection):
    """Record batch intents and their remote progress, and uploaded files."""

    # -- batches --------------------------------------------------------------------------------

    def record_batch_intent(
        self,
        generation_id: int,
        *,
        shard: int,
        attempt: int,
        provider: str,
        key: str,
        input_sha256: str,
        requests: int,
        reason: str | None,
        key_unused: bool = False,
    ) -> BatchRow:
        """Record the intent to create a batch (remote_id NULL); idempotent on ``key``.

        ``key_unused``: the caller has just seen, in its transaction, that no batch holds
        ``key``: it is not looked up again (a batch holding it would fail the insert)."""
        with self.atomic(one_write=True):
            existing = None if key_unused else self.batch_by_key(key)
            if existing is not None:
                coords = (existing.generation_id, existing.shard, existing.attempt)
                if coords != (generation_id, shard, attempt):
                    raise StateError(
                        f"batch key {key!r} is already recorded for generation {coords[0]} "
                        f"shard {coords[1]} attempt {coords[2]}, not for generation "
                        f"{generation_id} shard {shard} attempt {attempt}"
                    )
                return existing
            now = utc_timestamp()
            try:
                row = self._one(
                    "INSERT INTO batches (generation_id, shard, attempt, provider, key, "
                    "input_sha256, requests, status, reason, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                    (
                        generation_id,
                        shard,
                        attempt,
                        provider,
                        key,
                        input_sha256,
                        requests,
                        BATCH_INTENT_STATUS,
                        reason,
                        now,
                        now,
                    ),
                )
            except IntegrityError as err:
                raise StateError(
                    f"cannot record batch intent for generation {generation_id} shard {shard} "
                    f"attempt {attempt}: {err} (another key holds that slot, or the "
                    "generation is not recorded)"
                ) from err
            assert row is not None
            return _batch_row(row)

    def update_batch(self, batch_id: int, **fields: Any) -> BatchRow:
        """Change whitelisted columns of a batch; no write if nothing changed.

        Stamps ``updated_at`` (or writes the one given) when something else changed: a poll
        that only brings a new ``updated_at`` writes nothing. Setting ``remote_id`` stamps
        ``submitted_at`` and a terminal ``status`` stamps ``terminal_at`` unless given or
        already set. A recorded remote_id never changes.
        """
        check_fields("update_batch", fields, _BATCH_FIELDS)
        with self.atomic(one_write=True):
            old = self.get_batch(batch_id)
            new_remote = fields.get("remote_id")
            if old.remote_id is not None and "remote_id" in fields and new_remote != old.remote_id:
                raise StateError(
                    f"batch {batch_id} ({old.key}) is already bound to remote batch "
                    f"{old.remote_id}; refusing to re-bind it to {new_remote}"
                )
            now = utc_timestamp()
            if new_remote is not None and old.submitted_at is None:
                fields.setdefault("submitted_at", now)
            if fields.get("status") in BATCH_TERMINAL_STATUSES and old.terminal_at is None:
                fields.setdefault("terminal_at", now)
            changed = changed_fields(old, {k: v for k, v in fields.items() if k != "updated_at"})
            if not changed:
                return old
            changed["updated_at"] = fields.get("updated_at") or now
            if "provider_errors" in changed:
                errors = changed["provider_errors"]
                changed["provider_errors"] = None if errors is None else dump_json(errors)
            return _batch_row(self._update_returning("batches", "id", batch_id, changed))

    def get_batch(self, batch_id: int) -> BatchRow:
        row = self._one("SELECT * FROM batches WHERE id = ?", (batch_id,))
        if row is None:
            raise StateError(f"batch {batch_id} is not recorded in {self.label}")
        return _batch_row(row)

    def batch_by_key(self, key: str) -> BatchRow | None:
        row = self._one("SELECT * FROM batches WHERE key = ?", (key,))
        return None if row is None else _batch_row(row)

    def batch_by_remote_id(self, provider: str, remote_id: str) -> BatchRow | None:
        row = self._one(
            "SELECT * FROM batches WHERE provider = ? AND remote_id = ?", (provider, remote_id)
        )
        return None if row is None else _batch_row(row)

    def batches(
        self, generation_id: int | None = None, *, status: str | None = None
    ) -> list[BatchRow]:
        """Batches in the order they were recorded, optionally of one generation/status."""
        where, params = where_clause(generation_id=generation_id, status=status)
        return [
            _batch_row(r) for r in self._all(f"SELECT * FROM batches {where} ORDER BY id", params)
        ]

    def in_flight_batches(self) -> list[BatchRow]:
        """Batches created remotely whose status is not terminal yet: the ones to poll."""
        marks = ", ".join("?" * len(BATCH_TERMINAL_STATUSES))
        rows = self._all(
            f"SELECT * FROM batches WHERE remote_id IS NOT NULL AND status NOT IN ({marks}) "
            "ORDER BY id",
            sorted(BATCH_TERMINAL_STATUSES),
        )
        return [_batch_row(r) for r in rows]

    def uncollected_batches(self, *, generation_not_in: Sequence[str] = ()) -> list[BatchRow]:
        """Batches not collected (nor settled with nothing to collect): every batch whose
        answers may still come is one (``drain`` looks among them, and decides with
        ``plan.still_stopping``); with ``generation_not_in``, only those of generations whose
        status is not one of these."""
        sql = (
            "SELECT b.* FROM batches b JOIN generations g ON g.id = b.generation_id "
            "WHERE b.collected_at IS NULL"
        )
        params: list[Any] = []
        if generation_not_in:
            sql += f" AND g.status NOT IN ({', '.join('?' * len(generation_not_in))})"
            params += list(generation_not_in)
        return [_batch_row(r) for r in self._all(sql + " ORDER BY b.id", params)]

    # -- files ----------------------------------------------------------------------------------

    def get_file(self, provider: str, sha256: str) -> FileRow | None:
        row = self._one("SELECT * FROM files WHERE provider = ? AND sha256 = ?", (provider, sha256))
        return None if row is None else FileRow(**known_columns(FileRow, row))

    def record_file(
        self,
        provider: str,
        sha256: str,
        remote_id: str,
        bytes: int | None,
        expires_at: int | float | str | None,
    ) -> FileRow:
        """Remember an uploaded file (replacing an older record); ``expires_at`` may be epoch s."""
        with self.atomic(one_write=True):
            row = self._one(
                "INSERT INTO files (provider, sha256, remote_id, bytes, uploaded_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (provider, sha256) DO UPDATE SET "
                "remote_id = excluded.remote_id, bytes = excluded.bytes, "
                "uploaded_at = excluded.uploaded_at, expires_at = excluded.expires_at "
                "RETURNING *",
                (provider, sha256, remote_id, bytes, utc_timestamp(), epoch_or_iso(expires_at)),
            )
            assert row is not None  # inserted or updated: either way returned
            return FileRow(**known_columns(FileRow, row))

    def forget_file(self, provider: str, sha256: str) -> None:
        """Drop a file record (e.g. the provider answered 404); a no-op if there is none."""
        with self.atomic(one_write=True):
            self.db.execute(
                "DELETE FROM files WHERE provider = ? AND sha256 = ?", (provider, sha256)
            )
