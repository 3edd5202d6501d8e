"""The audit log, read back: runs (who, where, which git commit) and the events of each.

Every paid token counts once, on one event, whatever the order of collects, retires and
kills. Two kinds of event record usage (``records_spend``): a generation's ``results`` event
records its *running total* (everything its ledger holds when its results are written), and
each ``collect`` event records what the answers *it* recorded used (one transaction with
them: a run killed before it records nothing, and the re-run records it once). So a
generation counts with its latest ``results`` event plus the ``collect`` events recorded after
that one; a ``collect`` before it, or an earlier ``results`` event (a generation finished
again after more retries: retry.maxAttempts raised), is *covered* (in that running total
already) and counts nothing. A generation superseded, cancelled or pruned before its results
are written (its drained batches' ``collect`` events are marked ``retired``) counts with its
collects alone.

Events are read as people count: a batch's ``shard`` from 1 (``batches.event_detail_shown``).

A run's ``usage`` sums those counted events of the run: the generations it finished and the
answers it collected that no later ``results`` event covers; ``cost_usd`` is ``None`` when any
of them had an unknown price. (Until a generation is finished, its collects count on the runs
that made them; once its results are written, that run counts them all.)

Spend per git commit (``spend_by_commit``) charges each generation to the commit of the run
that *created* it (its ``created_run``: the apply that planned and submitted it), not to the
run that happened to collect it: a scheduled ``apply`` on a later commit that collects a
batch submitted from an earlier one does not make the later commit look expensive. A
generation counts once, as above, under the resource it belongs to now (a rename,
``metadata.moved``, takes its generations' spend along). Groups, newest first (by the newest
run in them):

==================================  =========================================================
the run's commit, clean tree        that commit
the run's commit, ``git_dirty``     ``<commit> + uncommitted changes``: a group of its own,
                                    since what ran is not what the commit holds
no commit recorded                  ``no git commit``: a folder outside git, git missing, or
                                    a repository with no commit yet
==================================  =========================================================
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from batchspec.core.batches import event_detail_shown
from batchspec.core.spend import Usage
from batchspec.errors import ManifestError, StateError
from batchspec.state.lock import pid_is_alive, runs_whose_session_ended
from batchspec.state.store import EventRow, RunRow, StateStore
from batchspec.workspace.manifest import project_for
from batchspec.workspace.project import Project, load_project
from batchspec.workspace.yamldoc import unknown_name_hint


@dataclass(frozen=True)
class EndedBy:
    """Why a run with no exit code is not running: a later run took over its locks
    (``lock.takeover``: it was killed, or its session ended) or released them
    (``lock.force_unlock``: ``batchspec unlock``)."""

    run_id: int | None
    action: str

    @property
    def text(self) -> str:
        """``no exit code; its locks were taken over by run 15``."""
        verb = "taken over" if self.action == "lock.takeover" else "released"
        by = f" by run {self.run_id}" if self.run_id is not None else ""
        return f"no exit code; its locks were {verb}{by}"


@dataclass(frozen=True)
class HistoryEntry:
    run: RunRow
    events: tuple[EventRow, ...]
    #: ``running``, ``killed`` or ``exit N`` (see ``run_outcome``); None: the run's own
    outcome_seen: str | None = None
    #: for a run with no exit code whose locks a later run took over or released: that run
    ended_by: EndedBy | None = None
    #: ids of its ``collect`` and ``results`` events that a later ``results`` event of the
    #: same generation covers (module docstring)
    covered: frozenset[int] = frozenset()

    @property
    def outcome(self) -> str:
        """``exit N``; ``running``; ``killed`` (it died: a later run took its locks over, its
        process is gone from this host, or its PostgreSQL session is gone); ``stopped``
        (``batchspec unlock`` released it)."""
        if self.run.exit_code is not None:
            return f"exit {self.run.exit_code}"
        if self.ended_by is not None:
            return "killed" if self.ended_by.action == "lock.takeover" else "stopped"
        return self.outcome_seen or self.run.outcome

    @property
    def outcome_text(self) -> str:
        """``outcome``, with who ended the run when a later one did."""
        if self.run.exit_code is None and self.ended_by is not None:
            return f"{self.outcome} ({self.ended_by.text})"
        return self.outcome

    @property
    def usage(self) -> Usage:
        total = Usage()
        for usage in self.usage_by_resource().values():
            total += usage
        return total

    def usage_by_resource(self) -> dict[str, Usage]:
        """The run's usage split by the resource whose results it wrote or answers it
        collected, in event order."""
        split: dict[str, Usage] = {}
        for event in self.events:
            if records_spend(event) and event.id not in self.covered:
                key = event.resource or ""
                split[key] = split.get(key, Usage()) + _event_usage(event)
        return split

    def last_events(self, limit: int | None) -> tuple[EventRow, ...]:
        """The run's last ``limit`` events, oldest first (None: all of them)."""
        if limit is None:
            return self.events
        return self.events[-limit:] if limit > 0 else ()

    def event_counts(self) -> dict[str, int]:
        """How many events of each action the run recorded, in the order each first came."""
        counts: dict[str, int] = {}
        for event in self.events:
            counts[event.action] = counts.get(event.action, 0) + 1
        return counts

    def to_json(self, *, events: int | None = None) -> dict[str, Any]:
        """``events``: list only the last ones (the usage still counts them all)."""
        return {
            "run": asdict(self.run),
            "outcome": self.outcome,
            "usage": asdict(self.usage),
            "events": [asdict(e) for e in self.last_events(events)],
            "ended_by": None if self.ended_by is None else asdict(self.ended_by),
        }


@dataclass(frozen=True)
class HistoryPage:
    """The newest runs asked for, and whether older ones were left out (``--limit``)."""

    entries: tuple[HistoryEntry, ...]
    older: bool


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
    page = read_history_page(paths, resource=resource, limit=limit, state_path=state_path)
    return list(page.entries)


def read_history_page(
    paths: Sequence[str],
    *,
    resource: str | None = None,
    limit: int = 20,
    state_path: str | None = None,
) -> HistoryPage:
    """``read_history``, saying too whether runs older than the ``limit`` newest exist."""
    with _history_store(paths, state_path, resource) as store:
        if store is None:
            return HistoryPage((), older=False)
        runs = store.runs(resource=resource, limit=limit + 1)
        older = len(runs) > limit
        runs = runs[:limit]
        released = _lock_releases(store) if any(r.exit_code is None for r in runs) else []
        finished = _latest_results(store)  # under any name: a renamed resource's too
        session_ended = runs_whose_session_ended(store, runs)  # PostgreSQL: killed anywhere
        entries = []
        for run in runs:
            events = [
                replace(e, detail=event_detail_shown(e.detail))
                for e in store.events(run_id=run.id)
                if resource is None or e.resource in (resource, None)
            ]
            ended = None if run.exit_code is not None else _ended_by(run, released)
            # a later ``results`` event's running total holds the generation's collects
            # before it, and its earlier ``results`` events' totals too
            covered = frozenset(
                e.id
                for e in events
                if e.generation_id is not None and finished.get(e.generation_id, 0) > e.id
            )
            seen = run_outcome(run, session_ended=run.id in session_ended)
            entries.append(HistoryEntry(run, tuple(events), seen, ended, covered))
        return HistoryPage(tuple(entries), older=older)


def _latest_results(store: StateStore) -> dict[int | None, int]:
    """The id of each generation's latest ``results`` event: it covers its collects before
    (those recorded under a resource's old name, before a move, too)."""
    return {e.generation_id: e.id for e in store.events(action="results")}


def _lock_releases(store: StateStore) -> list[tuple[EventRow, dict[str, Any]]]:
    """Every ``lock.takeover`` and ``lock.force_unlock`` event, with the holder it ended."""
    found = []
    for action in ("lock.takeover", "lock.force_unlock"):
        for event in store.events(action=action):
            holder = event.detail.get("previous") if action == "lock.takeover" else event.detail
            if isinstance(holder, dict):
                found.append((event, holder))
    return sorted(found, key=lambda pair: pair[0].id)


def _ended_by(run: RunRow, released: list[tuple[EventRow, dict[str, Any]]]) -> EndedBy | None:
    """The first later run that took over or released a lock ``run`` took: same host and
    pid, taken at or after the run started."""
    for event, holder in released:
        if (
            event.run_id != run.id
            and holder.get("host") == run.host
            and holder.get("pid") == run.pid
            and str(holder.get("since") or "") >= run.started_at
        ):
            return EndedBy(event.run_id, event.action)
    return None


def run_outcome(run: RunRow, host: str | None = None, *, session_ended: bool = False) -> str:
    """How a run ended: ``exit N``; ``killed`` when it ended with no exit code (a later run
    took over its locks), or never recorded an end while its process is gone from this host
    (``host``, default this one), or, in PostgreSQL, while its session lock is free
    (``session_ended``: ``batchspec.state.lock.runs_whose_session_ended``, seen from any
    host): it was killed, or its machine lost power; else ``running``.
    """
    outcome = run.outcome
    if outcome != "running":
        return outcome
    here = host if host is not None else socket.gethostname()
    if session_ended or (run.host == here and run.pid and not pid_is_alive(run.pid)):
        return "killed"
    return outcome


NO_GIT_LABEL = "no git commit"


@dataclass(frozen=True)
class CommitSpend:
    """Tokens and dollars of the generations created from one git commit (see the module
    docstring); ``commit`` None: runs with no git commit recorded."""

    commit: str | None
    dirty: bool  # created from a working tree with uncommitted changes to tracked files
    branches: tuple[str, ...]  # the branches those runs were on, in order of first use
    runs: tuple[int, ...]  # the runs that created the generations, newest first
    generations: int
    usage: Usage
    by_resource: dict[str, Usage]
    last_run_at: str  # when the newest of those runs started

    @property
    def label(self) -> str:
        if self.commit is None:
            return NO_GIT_LABEL
        return f"{self.commit[:10]} + uncommitted changes" if self.dirty else self.commit[:10]

    def to_json(self) -> dict[str, Any]:
        return {
            "commit": self.commit,
            "dirty": self.dirty,
            "label": self.label,
            "branches": list(self.branches),
            "runs": list(self.runs),
            "generations": self.generations,
            "last_run_at": self.last_run_at,
            "usage": asdict(self.usage),
            "resources": {name: asdict(u) for name, u in self.by_resource.items()},
        }


def spend_by_commit(
    paths: Sequence[str],
    *,
    resource: str | None = None,
    limit: int = 20,
    state_path: str | None = None,
) -> list[CommitSpend]:
    """The ``limit`` newest commit groups and what their generations used (module docstring);
    with ``resource``, only that resource's generations (a name never recorded exits 1)."""
    with _history_store(paths, state_path, resource) as store:
        if store is None:
            return []
        counted: dict[object, list[EventRow]] = {}
        owners: dict[int, str] = {}
        # every name's events: a results event under a resource's new name (after a move)
        # covers the collects recorded under its old one; with ``resource``, the generations
        # that are its now (``_owner``)
        for event in _spend_events(store):
            if resource is not None and _owner(store, event, owners) != resource:
                continue
            key = event.generation_id if event.generation_id is not None else ("e", event.id)
            if event.action == "results":
                counted[key] = [event]  # a running total: it holds every event before it
            else:
                counted.setdefault(key, []).append(event)
        runs: dict[int, RunRow | None] = {}
        groups: dict[tuple[str | None, bool], list[tuple[RunRow | None, list[EventRow]]]] = {}
        for events in counted.values():
            run = _creating_run(store, events[0], runs)
            commit = run.git_commit if run is not None else None
            dirty = bool(run.git_dirty) if run is not None and commit else False
            groups.setdefault((commit, dirty), []).append((run, events))
        spends = [
            _commit_spend(commit, dirty, members, lambda e: _owner(store, e, owners))
            for (commit, dirty), members in groups.items()
        ]
    spends.sort(key=lambda c: max(c.runs, default=0), reverse=True)
    return spends[:limit]


def records_spend(event: EventRow) -> bool:
    """Whether ``event`` records usage (module docstring): a ``results`` event (a
    generation's running total) or a ``collect`` event (what one batch's answers used; an
    older state recorded it on retired ones only)."""
    return event.action in ("results", "collect") and "input_tokens" in event.detail


def _owner(store: StateStore, event: EventRow, cache: dict[int, str]) -> str:
    """The resource the event's generation belongs to now (a rename, ``metadata.moved``,
    hands its generations to the new name), else the one the event was recorded under."""
    gen_id = event.generation_id
    if gen_id is None:
        return event.resource or ""
    if gen_id not in cache:
        try:
            cache[gen_id] = store.get_generation(gen_id).resource
        except StateError:  # a generation the state lost: the name the event recorded
            cache[gen_id] = event.resource or ""
    return cache[gen_id]


def _spend_events(store: StateStore) -> list[EventRow]:
    """Every event that records spend (``records_spend``), in event order."""
    found = [
        e
        for action in ("results", "collect")
        for e in store.events(action=action)
        if records_spend(e)
    ]
    return sorted(found, key=lambda e: e.id)


def _creating_run(
    store: StateStore, event: EventRow, cache: dict[int, RunRow | None]
) -> RunRow | None:
    """The run that created the event's generation (else the run that recorded the event)."""
    run_id = event.run_id
    if event.generation_id is not None:
        # a generation the event names but the state lost: charge the event's run
        with contextlib.suppress(StateError):
            run_id = store.get_generation(event.generation_id).created_run or run_id
    if run_id is None:
        return None
    if run_id not in cache:
        try:
            cache[run_id] = store.get_run(run_id)
        except StateError:
            cache[run_id] = None
    return cache[run_id]


def _commit_spend(
    commit: str | None,
    dirty: bool,
    members: list[tuple[RunRow | None, list[EventRow]]],
    owner: Callable[[EventRow], str],
) -> CommitSpend:
    total = Usage()
    by_resource: dict[str, Usage] = {}
    branches: dict[str, None] = {}
    run_ids: set[int] = set()
    last = ""
    for run, events in sorted(members, key=lambda m: m[1][-1].id):
        usage = sum((_event_usage(e) for e in events), Usage())
        total += usage
        name = owner(events[0])
        by_resource[name] = by_resource.get(name, Usage()) + usage
        if run is not None:
            run_ids.add(run.id)
            last = max(last, run.started_at)
            if run.git_branch:
                branches.setdefault(run.git_branch)
    return CommitSpend(
        commit=commit,
        dirty=dirty,
        branches=tuple(branches),
        runs=tuple(sorted(run_ids, reverse=True)),
        generations=len(members),
        usage=total,
        by_resource=by_resource,
        last_run_at=last,
    )


def _event_usage(event: EventRow) -> Usage:
    """The tokens and dollars a ``results`` or retired ``collect`` event recorded (an older
    one: unknown cost)."""
    d = event.detail
    cost = d.get("cost_usd", None)
    return Usage(
        int(d.get("input_tokens") or 0),
        int(d.get("output_tokens") or 0),
        int(d.get("total_tokens") or 0),
        float(cost) if isinstance(cost, int | float) else None,
    )


@contextlib.contextmanager
def _history_store(
    paths: Sequence[str], state_path: str | None, resource: str | None
) -> Iterator[StateStore | None]:
    """The project's state store (None when there is none yet), after checking that
    ``resource``, if given, was ever recorded there (exit 1 otherwise)."""
    project = _project(paths, state_path)
    if not project.has_state():
        if resource is not None:
            raise ManifestError(_unknown(resource, project.state_label))
        yield None
        return
    with StateStore.open(project.state) as store:
        if resource is not None:
            _check_recorded(store, resource, project.state_label)
        yield store


def _project(paths: Sequence[str], state_path: str | None) -> Project:
    if state_path is not None:
        return load_project(paths[0] if paths else None, state_path=state_path)
    return project_for(paths)


def _check_recorded(store: StateStore, resource: str, state_label: str) -> None:
    if not _ever_recorded(store, resource):
        known = [r.name for r in store.list_resources()]
        raise ManifestError(
            f"{_unknown(resource, state_label)} ({unknown_name_hint(resource, known)})",
            details=["`batchspec status` lists the resources tracked now"],
        )


def _ever_recorded(store: StateStore, name: str) -> bool:
    """Tracked, forgotten, or named by an event (a pruned or moved-away resource)."""
    return store.get_resource(name) is not None or bool(store.events(resource=name, limit=1))


def _unknown(name: str, state_label: str) -> str:
    return f"no resource named {name!r} is recorded in {state_label}"
