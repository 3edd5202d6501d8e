"""The audit log, read back: runs (who, where, which git commit) and the events of each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from batchspec.state.store import EventRow, RunRow, StateStore
from batchspec.workspace.project import load_project, load_workspace_project


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
    start = paths[0] if paths else None
    # With --state, the database is named: no workspace is needed to read it.
    load = load_project if state_path is not None else load_workspace_project
    project = load(start, state_path=state_path)
    if not project.state_path.exists():
        return []
    with StateStore.open(project.state_path) as store:
        entries = []
        for run in store.runs(resource=resource, limit=limit):
            events = [
                e
                for e in store.events(run_id=run.id)
                if resource is None or e.resource in (resource, None)
            ]
            entries.append(HistoryEntry(run, tuple(events)))
        return entries
