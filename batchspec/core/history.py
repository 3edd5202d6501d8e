"""The audit log, read back: runs (who, where, which git commit) and the events of each.

A run's ``usage`` sums the tokens and dollars of the generations it finished (its ``results``
events record them when results are written); ``cost_usd`` is ``None`` when any of them had
an unknown price.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from batchspec.core.spend import Usage
from batchspec.errors import ManifestError
from batchspec.state.store import EventRow, RunRow, StateStore
from batchspec.workspace.manifest import project_for
from batchspec.workspace.project import load_project


@dataclass(frozen=True)
class HistoryEntry:
    run: RunRow
    events: tuple[EventRow, ...]

    @property
    def usage(self) -> Usage:
        total = Usage()
        for usage in self.usage_by_resource().values():
            total += usage
        return total

    def usage_by_resource(self) -> dict[str, Usage]:
        """The run's usage split by the resource whose results it wrote, in event order."""
        split: dict[str, Usage] = {}
        for event in self.events:
            d = event.detail
            if event.action == "results" and "input_tokens" in d:
                cost = d.get("cost_usd", None)  # recorded before costs were: unknown
                key = event.resource or ""
                split[key] = split.get(key, Usage()) + Usage(
                    int(d.get("input_tokens") or 0),
                    int(d.get("output_tokens") or 0),
                    int(d.get("total_tokens") or 0),
                    float(cost) if isinstance(cost, int | float) else None,
                )
        return split

    def to_json(self) -> dict[str, Any]:
        return {
            "run": asdict(self.run),
            "usage": asdict(self.usage),
            "events": [asdict(e) for e in self.events],
        }


def read_history(
    paths: Sequence[str],
    *,
    resource: str | None = None,
    limit: int = 20,
    state_path: str | None = None,
) -> list[HistoryEntry]:
    """Newest runs first; with ``resource``, only runs that touched it and only its events.

    ``paths`` locate the workspace as for every command (a folder, a manifest, a glob); with
    ``state_path`` (a file or a URL) the store is named and no workspace is needed. A
    ``resource`` the state has never recorded is an error (exit 1), not an empty history.
    """
    if state_path is not None:
        project = load_project(paths[0] if paths else None, state_path=state_path)
    else:
        project = project_for(paths)
    if not project.has_state():
        if resource is not None:
            raise ManifestError(_unknown(resource, project.state_label))
        return []
    with StateStore.open(project.state) as store:
        if resource is not None and not _ever_recorded(store, resource):
            known = ", ".join(sorted(r.name for r in store.list_resources())) or "none"
            raise ManifestError(
                f"{_unknown(resource, project.state_label)} (known: {known})",
                details=["`batchspec status` lists the resources; history takes PATHS first"],
            )
        entries = []
        for run in store.runs(resource=resource, limit=limit):
            events = [
                e
                for e in store.events(run_id=run.id)
                if resource is None or e.resource in (resource, None)
            ]
            entries.append(HistoryEntry(run, tuple(events)))
        return entries


def _ever_recorded(store: StateStore, name: str) -> bool:
    """Tracked, forgotten, or named by an event (a pruned or moved-away resource)."""
    return store.get_resource(name) is not None or bool(store.events(resource=name, limit=1))


def _unknown(name: str, state_label: str) -> str:
    return f"no resource named {name!r} is recorded in {state_label}"
