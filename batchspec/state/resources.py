"""The resources and generations records: every manifest resource seen, and each spec hash of it.

A resource is never deleted (``forgotten_at`` is set), so history keeps making sense; a
generation is one (resource, spec hash) with the spec as JSON, the input's sha256 and counts,
and the sha256 of the output and errors files written for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchspec.errors import StateError
from batchspec.state.connection import StateConnection
from batchspec.state.records import (
    changed_fields,
    check_fields,
    dump_json,
    load_json,
    row_of,
    utc_timestamp,
)

GENERATION_STATUSES = frozenset(
    {"pending", "in_progress", "complete", "degraded", "superseded", "cancelled"}
)


@dataclass(frozen=True)
class ResourceRow:
    name: str
    provider: str
    manifest: str
    labels: dict[str, Any]
    current_generation_id: int | None
    first_seen_run: int | None
    updated_at: str
    forgotten_at: str | None

    @property
    def forgotten(self) -> bool:
        return self.forgotten_at is not None


@dataclass(frozen=True)
class GenerationRow:
    id: int
    resource: str
    spec_hash: str
    spec: dict[str, Any]
    input_sha256: str
    requests: int
    input_bytes: int
    status: str
    output_path: str | None
    errors_path: str | None
    output_sha256: str | None
    errors_sha256: str | None
    succeeded: int
    failed: int
    created_run: int | None
    created_at: str
    completed_at: str | None
    model: str | None = None  # the model its requests name (for pricing), once collected


def _resource_row(d: Mapping[str, Any]) -> ResourceRow:
    return row_of(ResourceRow, d, labels=load_json(d["labels"]))


def _generation_row(d: Mapping[str, Any]) -> GenerationRow:
    return row_of(GenerationRow, d, spec=load_json(d["spec"]))


_GENERATION_FIELDS = frozenset(
    {
        "status",
        "model",
        "output_path",
        "errors_path",
        "output_sha256",
        "errors_sha256",
        "succeeded",
        "failed",
        "completed_at",
    }
)
_GENERATION_DONE = frozenset({"complete", "degraded"})


class ResourcesAndGenerations(StateConnection):
    """Record resources and their generations; read them back."""

    # -- resources ------------------------------------------------------------------------------

    def upsert_resource(
        self,
        name: str,
        *,
        provider: str,
        manifest: str,
        labels: Mapping[str, Any],
        run_id: int | None,
    ) -> ResourceRow:
        """Record a resource seen in the manifests (un-forgetting it); no write if unchanged."""
        with self.atomic(one_write=True):
            old = self.get_resource(name)
            labels_json = dump_json(dict(labels))
            if old is None:
                row = self._one(
                    "INSERT INTO resources (name, provider, manifest, labels, first_seen_run, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING *",
                    (name, provider, manifest, labels_json, run_id, utc_timestamp()),
                )
            elif (old.provider, old.manifest, dump_json(old.labels), old.forgotten_at) != (
                provider,
                manifest,
                labels_json,
                None,
            ):
                row = self._one(
                    "UPDATE resources SET provider = ?, manifest = ?, labels = ?, "
                    "forgotten_at = NULL, updated_at = ? WHERE name = ? RETURNING *",
                    (provider, manifest, labels_json, utc_timestamp(), name),
                )
            else:
                return old
            assert row is not None  # written in this transaction
            return _resource_row(row)

    def get_resource(self, name: str) -> ResourceRow | None:
        row = self._one("SELECT * FROM resources WHERE name = ?", (name,))
        return None if row is None else _resource_row(row)

    def _resource(self, name: str) -> ResourceRow:
        row = self.get_resource(name)
        if row is None:
            raise StateError(f"resource {name!r} is not recorded in {self.label}")
        return row

    def list_resources(self, include_forgotten: bool = False) -> list[ResourceRow]:
        """Recorded resources by name; forgotten ones only if asked."""
        sql = "SELECT * FROM resources"
        if not include_forgotten:
            sql += " WHERE forgotten_at IS NULL"
        return [_resource_row(r) for r in self._all(sql + " ORDER BY name")]

    def set_current_generation(self, name: str, generation_id: int | None) -> ResourceRow:
        """Point a resource at one of its own generations (or at none)."""
        with self.atomic(one_write=True):
            old = self._resource(name)
            if generation_id is not None and self.get_generation(generation_id).resource != name:
                raise StateError(f"generation {generation_id} does not belong to resource {name!r}")
            if old.current_generation_id == generation_id:
                return old
            return _resource_row(
                self._update_returning(
                    "resources",
                    "name",
                    name,
                    {"current_generation_id": generation_id, "updated_at": utc_timestamp()},
                )
            )

    def forget_resource(self, name: str) -> ResourceRow:
        """Mark a resource forgotten; its generations, batches and events stay as history."""
        with self.atomic(one_write=True):
            old = self._resource(name)
            if old.forgotten_at is None:
                now = utc_timestamp()
                self.db.execute(
                    "UPDATE resources SET forgotten_at = ?, updated_at = ? WHERE name = ?",
                    (now, now, name),
                )
            return self._resource(name)

    def rename_resource(
        self,
        old: str,
        new: str,
        *,
        respecs: Mapping[int, tuple[str, Mapping[str, Any]]] | None = None,
    ) -> ResourceRow:
        """Move resource ``old``'s record to the name ``new``, in one transaction.

        The resource row takes the new name (keeping its first-seen run and current
        generation) and its generations follow; ``respecs`` maps a generation id to its new
        ``(spec_hash, spec)``, since the spec hash covers the name (see ``batchspec.core.moves``).
        Batches, the request ledger and results hang off generation ids and are untouched.
        Events are append-only history and keep the old name. ``StateError`` if ``old`` is
        not recorded or ``new`` is (forgotten or not).
        """
        with self.atomic():
            self._resource(old)
            if self.get_resource(new) is not None:
                raise StateError(f"cannot rename {old!r} to {new!r}: {new!r} is recorded already")
            # generations.resource references resources.name: insert the new row first, move
            # the generations, then drop the old row.
            self.db.execute(
                "INSERT INTO resources (name, provider, manifest, labels, current_generation_id, "
                "first_seen_run, updated_at, forgotten_at) SELECT ?, provider, manifest, labels, "
                "current_generation_id, first_seen_run, ?, forgotten_at FROM resources "
                "WHERE name = ?",
                (new, utc_timestamp(), old),
            )
            self.db.execute("UPDATE generations SET resource = ? WHERE resource = ?", (new, old))
            for generation_id, (spec_hash, spec) in (respecs or {}).items():
                self.db.execute(
                    "UPDATE generations SET spec_hash = ?, spec = ? WHERE id = ? AND resource = ?",
                    (spec_hash, dump_json(dict(spec)), generation_id, new),
                )
            self.db.execute("DELETE FROM resources WHERE name = ?", (old,))
            return self._resource(new)

    # -- generations ----------------------------------------------------------------------------

    def create_generation(
        self,
        resource: str,
        *,
        spec_hash: str,
        spec: Mapping[str, Any],
        input_sha256: str,
        requests: int,
        input_bytes: int,
        output_path: str | None,
        errors_path: str | None,
        run_id: int | None,
    ) -> GenerationRow:
        """A new pending generation, or the existing one for (resource, spec_hash) unchanged."""
        with self.atomic(one_write=True):
            existing = self.find_generation(resource, spec_hash)
            if existing is not None:
                return existing
            self._resource(resource)
            return self.insert_generation(
                resource,
                spec_hash=spec_hash,
                spec=spec,
                input_sha256=input_sha256,
                requests=requests,
                input_bytes=input_bytes,
                output_path=output_path,
                errors_path=errors_path,
                run_id=run_id,
            )

    def insert_generation(
        self,
        resource: str,
        *,
        spec_hash: str,
        spec: Mapping[str, Any],
        input_sha256: str,
        requests: int,
        input_bytes: int,
        output_path: str | None,
        errors_path: str | None,
        run_id: int | None,
    ) -> GenerationRow:
        """``create_generation`` for a caller that has just seen, in its transaction, that
        ``resource`` is recorded and has no generation of ``spec_hash``: the row is inserted
        without looking for either again (a missing resource still fails: a foreign key)."""
        with self.atomic(one_write=True):
            row = self._one(
                "INSERT INTO generations (resource, spec_hash, spec, input_sha256, requests, "
                "input_bytes, status, output_path, errors_path, created_run, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?) RETURNING *",
                (
                    resource,
                    spec_hash,
                    dump_json(dict(spec)),
                    input_sha256,
                    requests,
                    input_bytes,
                    output_path,
                    errors_path,
                    run_id,
                    utc_timestamp(),
                ),
            )
            assert row is not None
            return _generation_row(row)

    def get_generation(self, generation_id: int) -> GenerationRow:
        row = self._one("SELECT * FROM generations WHERE id = ?", (generation_id,))
        if row is None:
            raise StateError(f"generation {generation_id} is not recorded in {self.label}")
        return _generation_row(row)

    def find_generation(self, resource: str, spec_hash: str) -> GenerationRow | None:
        row = self._one(
            "SELECT * FROM generations WHERE resource = ? AND spec_hash = ?",
            (resource, spec_hash),
        )
        return None if row is None else _generation_row(row)

    def generations(self, resource: str) -> list[GenerationRow]:
        """A resource's generations, oldest first."""
        rows = self._all("SELECT * FROM generations WHERE resource = ? ORDER BY id", (resource,))
        return [_generation_row(r) for r in rows]

    def update_generation(self, generation_id: int, **fields: Any) -> GenerationRow:
        """Change whitelisted columns; entering complete/degraded stamps ``completed_at``."""
        check_fields("update_generation", fields, _GENERATION_FIELDS)
        status = fields.get("status")
        if status is not None and status not in GENERATION_STATUSES:
            raise ValueError(f"unknown generation status {status!r}")
        with self.atomic(one_write=True):
            old = self.get_generation(generation_id)
            if status in _GENERATION_DONE and old.completed_at is None:
                fields.setdefault("completed_at", utc_timestamp())
            changed = changed_fields(old, fields)
            if not changed:
                return old
            return _generation_row(
                self._update_returning("generations", "id", generation_id, changed)
            )
