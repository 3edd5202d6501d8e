"""The audit log, read back: runs (who, where, which git commit) and the events of each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from batchspec.state.store import EventRow, RunRow, StateStore
from batchspec.workspace.project import load_project


@dataclass(frozen=True)
class HistoryEntry:
    run: RunRow
    events: tuple[EventRow, ...]

    def to_json(self) -> dict[str, Any]:
        return {"run": asdict(self.run), "events": [asdict(e) for e in self.events]}


def read_history(
    paths: Sequence[str],
    *,
    resource: str | None = None,
    limit: int = 20,
    state_path: str | None = None,
) -> list[HistoryEntry]:
    """Newest runs first; with ``resource``, only runs that touched it and only its events."""
    project = load_project(paths[0] if paths else None, state_path=state_path)
    if not project.has_state():
        return []
    with StateStore.open(project.state) as store:
        entries = []
        for run in store.runs(resource=resource, limit=limit):
            events = [
                e
                for e in store.events(run_id=run.id)
                if resource is None or e.resource in (resource, None)
            ]
            entries.append(HistoryEntry(run, tuple(events)))
        return entries
