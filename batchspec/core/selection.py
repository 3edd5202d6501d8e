"""Which resources a command acts on: the ``--select`` selectors and their union.

Selectors (repeatable; a resource is selected when *any* selector matches it, as in dbt):

* ``NAME``: the resource whose ``metadata.name`` is NAME. An unknown name is an error, so a
  typo never silently selects nothing.
* ``KEY=VALUE``: every resource whose ``metadata.labels`` maps KEY to VALUE. One that matches
  no manifest and no recorded orphan is an error naming the labels in use, for the same
  reason: ``--select tema=infra`` must not make a CI apply do nothing and pass.
* ``state:modified``: every resource whose planned action is not ``none``: apply would do
  something for it (create, replace, refresh, collect, retry or restore).

A resource recorded in the state whose manifest is gone (an orphan) is selected by its name,
by the labels its manifest last had, and by ``state:modified`` (``orphan_selector``); so
``apply --prune --select NAME`` prunes only that orphan.

Promises:

* No selector selects every resource; the result always keeps the manifests' order.
* ``state:modified`` is decided from the manifests and the recorded state alone: the inputs
  are not read (their content hash is already part of each spec hash, and the request counts
  they would give do not change which action is planned). A missing state database means
  nothing is recorded yet; it is not created.
* A malformed selector is a ``UsageError`` (exit 64) naming the forms that are accepted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from batchspec.core.plan import ActionKind, DesiredResource, RecordedResource, make_plan
from batchspec.core.reconcile.drain import find_retired
from batchspec.core.recorded import (
    DEFAULT_REQUEUE_BACKOFF,
    export_paths,
    load_recorded,
    observe_disk,
)
from batchspec.core.replacements import effective_resources
from batchspec.errors import BatchspecError, ManifestError, UsageError
from batchspec.state.store import StateStore
from batchspec.workspace.manifest import Resource, Workspace, workspace_resource_names
from batchspec.workspace.yamldoc import display_path, unknown_name_hint

STATE_MODIFIED = "modified"
STATE_SELECTORS = (STATE_MODIFIED,)
SELECTOR_FORMS = "NAME, KEY=VALUE (a label) or state:modified"

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Selector:
    """One parsed ``--select`` value."""

    kind: str  # "name" | "label" | "state"
    key: str  # the name, the label key, or the state (e.g. "modified")
    value: str | None = None  # the label value

    def matches(self, res: Resource, modified: Set[str]) -> bool:
        return self.matches_recorded(res.name, res.labels, modified)

    def matches_recorded(self, name: str, labels: Mapping[str, Any], modified: Set[str]) -> bool:
        if self.kind == "name":
            return name == self.key
        if self.kind == "label":
            return labels.get(self.key) == self.value
        return name in modified


def parse_selector(text: str) -> Selector:
    """``"triage"``, ``"team=support"`` or ``"state:modified"`` as a ``Selector``."""
    raw = text.strip()
    if raw.startswith("state:"):
        state = raw.removeprefix("state:")
        if state not in STATE_SELECTORS:
            raise UsageError(
                f"--select {text!r}: unknown state selector "
                f"(known: {', '.join('state:' + s for s in STATE_SELECTORS)})"
            )
        return Selector("state", state)
    if "=" in raw:
        key, value = raw.split("=", 1)
        if not key.strip():
            raise UsageError(f"--select {text!r}: a label selector needs a key (KEY=VALUE)")
        if key.endswith("!") or value.startswith("="):  # not a label `team!` or a value `=x`
            raise UsageError(
                f"--select {text!r}: a label selects by equality only, written KEY=VALUE "
                "(no != or ==)"
            )
        return Selector("label", key.strip(), value.strip())
    if not _NAME.match(raw):
        several = " (one per --select: repeat it for several)" if "," in raw else ""
        raise UsageError(f"--select {text!r} is not a selector; use {SELECTOR_FORMS}{several}")
    return Selector("name", raw)


def names_each(select: Sequence[str]) -> bool:
    """Whether ``--select`` names each resource it selects (NAMEs only): ``state:modified``
    selects every orphan, and a label every orphan that carried it."""
    return bool(select) and all(parse_selector(s).kind == "name" for s in select)


def select_resources(
    resources: Sequence[Resource],
    selectors: Sequence[str],
    *,
    modified: Callable[[], Set[str]] = frozenset,
    also_known: Set[str] = frozenset(),
    recorded_labels: Callable[[], Sequence[Mapping[str, Any]]] = tuple,
) -> list[Resource]:
    """The union of what ``selectors`` match, in the manifests' order (all when none given).

    ``modified`` returns the names ``state:modified`` stands for; it is only called when such
    a selector is present (it reads the state). A NAME in ``also_known`` (a recorded orphan)
    is no error, though it selects no manifest; likewise a label that only recorded resources
    carry (``recorded_labels``, read only when a label selector matches no manifest).
    """
    if not selectors:
        return list(resources)
    parsed = [parse_selector(s) for s in selectors]
    known = {r.name for r in resources} | set(also_known)
    unknown = [s.key for s in parsed if s.kind == "name" and s.key not in known]
    if unknown:
        raise ManifestError(
            f"no resource named {', '.join(map(repr, dict.fromkeys(unknown)))} in the "
            f"manifests ({unknown_name_hint(unknown[0], known)})"
        )
    _refuse_unmatched_labels(resources, parsed, recorded_labels)
    changed = modified() if any(s.kind == "state" for s in parsed) else frozenset()
    return [r for r in resources if any(s.matches(r, changed) for s in parsed)]


def _refuse_unmatched_labels(
    resources: Sequence[Resource],
    parsed: Sequence[Selector],
    recorded_labels: Callable[[], Sequence[Mapping[str, Any]]],
) -> None:
    """Raise when a KEY=VALUE selector matches no manifest and no recorded resource."""
    labels = [dict(r.labels) for r in resources]
    unmatched = [
        s for s in parsed if s.kind == "label" and not any(m.get(s.key) == s.value for m in labels)
    ]
    if not unmatched:
        return
    labels += [dict(m) for m in recorded_labels()]
    unmatched = [s for s in unmatched if not any(m.get(s.key) == s.value for m in labels)]
    if not unmatched:
        return
    in_use = sorted({f"{k}={v}" for m in labels for k, v in m.items()})
    raise ManifestError(
        f"no resource has the label {', '.join(f'{s.key}={s.value}' for s in unmatched)} "
        f"(labels in use: {', '.join(in_use) or 'none'})"
    )


def select_from_workspace(
    ws: Workspace,
    selectors: Sequence[str],
    *,
    requeue_backoff: float = DEFAULT_REQUEUE_BACKOFF,
) -> list[Resource]:
    """``select_resources`` over a workspace, reading its state only for ``state:modified``
    and for a NAME that is in no manifest (it may be a recorded orphan)."""
    names = {r.name for r in ws.resources}
    missing = [
        sel.key
        for sel in map(parse_selector, selectors)
        if sel.kind == "name" and sel.key not in names
    ]
    unknown = bool(missing)
    if missing:
        refuse_names_declared_elsewhere(ws, missing)
    return select_resources(
        ws.resources,
        selectors,
        modified=lambda: modified_resources(ws, requeue_backoff=requeue_backoff),
        also_known=recorded_names(ws) if unknown else frozenset(),
        recorded_labels=lambda: recorded_labels(ws),
    )


def refuse_names_declared_elsewhere(ws: Workspace, missing: Sequence[str]) -> None:
    """Raise when a NAME selects a resource the workspace declares outside the command's
    PATHS (a run from a folder without manifests): it is no orphan, so nothing would select
    it, and apply said "no resource matches" and exited 0 (a CI apply run from the wrong
    folder passed; `show NAME` called it Orphaned)."""
    try:
        declared = workspace_resource_names(ws.project)
    except BatchspecError:  # a broken manifest elsewhere: the other checks say what they can
        return
    moved = {r.moved_from for r in ws.resources}
    elsewhere = [name for name in missing if name in declared and name not in moved]
    if elsewhere:
        raise ManifestError(
            f"resource {', '.join(map(repr, dict.fromkeys(elsewhere)))} is declared in the "
            f"workspace ({display_path(ws.project.root) or '.'}), but in no manifest under "
            "the paths this command reads (by default the current folder): run from the "
            "workspace's root, or give a PATH that holds its manifest"
        )


def recorded_names(ws: Workspace) -> frozenset[str]:
    """Names the state tracks (not forgotten); none when there is no state yet."""
    if not ws.project.has_state():
        return frozenset()
    with StateStore.open(ws.project.state) as store:
        return frozenset(r.name for r in store.list_resources())


def recorded_labels(ws: Workspace) -> list[Mapping[str, Any]]:
    """The labels of every resource the state tracks; none when there is no state yet."""
    if not ws.project.has_state():
        return []
    with StateStore.open(ws.project.state) as store:
        return [r.labels for r in store.list_resources()]


def orphan_selector(selectors: Sequence[str]) -> Callable[[RecordedResource], bool] | None:
    """Which recorded orphans ``selectors`` select (None: no selection, every orphan)."""
    if not selectors:
        return None
    parsed = [parse_selector(s) for s in selectors]
    everything: Set[str] = _Everything()
    return lambda rec: any(s.matches_recorded(rec.name, rec.labels, everything) for s in parsed)


class _Everything(frozenset[str]):
    """``state:modified`` for an orphan: its manifest is gone, which is a change."""

    def __contains__(self, item: object) -> bool:
        return True


def modified_resources(
    ws: Workspace, *, requeue_backoff: float = DEFAULT_REQUEUE_BACKOFF
) -> frozenset[str]:
    """Names of the workspace's resources whose planned action is not ``none``, and of those
    with batches an apply's drain still polls, collects or looks up (``find_retired``: a
    retired generation's still stopping, a cancelled generation's create not confirmed). A
    CI job that applies ``state:modified`` must still stop and collect those: a create that
    landed after its cancel would otherwise run, paid for, until someone applies it by name."""
    recorded: dict[str, RecordedResource] = {}
    if ws.project.has_state():
        with StateStore.open(ws.project.state) as store:
            recorded = load_recorded(store, store.ledger(), requeue_backoff=requeue_backoff)
            resources = effective_resources(store, ws.resources)
            draining = find_retired(
                store, ws.project.providers, resources, (), has_ledger=lambda _: True
            )
            changed = planned_changes(resources, recorded, now=time.time())
            return changed | {item.name for item in draining}
    return planned_changes(ws.resources, recorded, now=time.time())


def planned_changes(
    resources: Sequence[Resource], recorded: dict[str, RecordedResource], *, now: float
) -> frozenset[str]:
    """The pure part of ``modified_resources``: plan without reading inputs."""
    disk = observe_disk(
        [(r.name, r.output_path, r.errors_path) for r in resources],
        recorded,
        export_paths(resources),
    )
    plan = make_plan(
        [desired_without_input(r) for r in resources],
        recorded,
        disk,
        include_orphans=False,
        now=now,
    )
    return frozenset(a.resource for a in plan.actions if a.kind is not ActionKind.NONE)


def desired_without_input(res: Resource) -> DesiredResource:
    """The desired state of ``res`` without reading its input (request counts are 0).

    Request counts only size a spending action's estimate; they never change its kind, so
    this is enough to tell sync and what apply would do next (``status``, ``--select``).
    """
    return DesiredResource(
        name=res.name,
        provider=res.provider,
        spec_hash=res.spec_hash,
        requests=0,
        input_bytes=0,
        max_attempts=res.retry.max_attempts,
        suspend=res.suspend,
    )
