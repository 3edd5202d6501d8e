"""What every record module of the state store shares: timestamps, JSON columns, SQL helpers.

Timestamps are ISO-8601 UTC strings ending in 'Z' (``utc_timestamp``); JSON columns are
written with sorted keys, so the same data always gives the same bytes. The SQL helpers build
``WHERE`` clauses and ``UPDATE`` sets from whitelisted column names only, never from callers'
strings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

from batchspec.storage.sql import Cursor

R = TypeVar("R")


def utc_timestamp(moment: datetime | None = None) -> str:
    """``moment`` (default: now) as ISO-8601 UTC with millisecond precision and a 'Z'."""
    moment = moment or datetime.now(timezone.utc)
    if moment.tzinfo is None:
        raise ValueError("utc_timestamp needs an aware datetime")
    text = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    """The aware datetime of a timestamp written by ``utc_timestamp``."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def epoch_or_iso(value: int | float | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return utc_timestamp(datetime.fromtimestamp(value, timezone.utc))


def known_columns(row_class: type, row: Mapping[str, Any]) -> dict[str, Any]:
    """The columns of ``row`` that ``row_class`` (a dataclass) has fields for.

    A column this version does not know (added by hand, or by a tool) is ignored, not a
    TypeError on every read; a newer schema is caught by its migrations, not here.
    """
    names = _field_names(row_class)
    return {name: value for name, value in row.items() if name in names}


def row_of(row_class: type[R], row: Mapping[str, Any], **parsed: Any) -> R:
    """A frozen row dataclass from a database row (its known columns, ``known_columns``) with
    the ``parsed`` columns (JSON ones) in place of their text.

    A row with every field is filled in directly, not through the dataclass's ``__init__``:
    a frozen one sets each field with ``object.__setattr__``, and building rows was a fifth
    of a fleet apply's main-thread CPU (each plan reads its resource's rows again). The row
    classes have no ``__post_init__`` and no slots (``_fillable``); a row missing a field
    goes through the constructor, which says which one."""
    cls: type = row_class
    names = _field_names(cls)
    values = dict(row) if row.keys() == names else known_columns(cls, row)
    values.update(parsed)
    if values.keys() != names or not _fillable(cls):
        return row_class(**values)
    made: R = object.__new__(row_class)
    made.__dict__.update(values)
    return made


@functools.cache
def _fillable(row_class: type) -> bool:
    """Whether ``row_of`` may fill ``row_class``'s fields directly: a dataclass whose
    instances have a ``__dict__`` and whose ``__init__`` only sets fields."""
    return (
        dataclasses.is_dataclass(row_class)
        and not hasattr(row_class, "__post_init__")
        and not hasattr(row_class, "__slots__")
    )


@functools.cache
def _field_names(row_class: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(row_class))


def dump_json(value: Any) -> str:
    # sort_keys: the same data always gives the same bytes, so the audit log diffs cleanly
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def load_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def returned_id(cur: Cursor) -> int:
    """The id an ``INSERT ... RETURNING id`` gave back (both dialects)."""
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def where_clause(**filters: Any) -> tuple[str, list[Any]]:
    used = {name: value for name, value in filters.items() if value is not None}
    if not used:
        return "", []
    return "WHERE " + " AND ".join(f"{name} = ?" for name in used), list(used.values())


def check_fields(method: str, fields: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise TypeError(f"{method}() cannot set {', '.join(unknown)}")


def changed_fields(old: object, fields: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if getattr(old, name) != value}
