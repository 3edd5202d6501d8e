"""Saved plans: ``plan --out plan.json`` writes one; ``apply plan.json`` applies exactly it.

File format (JSON, UTF-8, ``schema_version`` 1)::

    {
      "kind": "batchspec/plan",
      "schema_version": 1,
      "batchspec_version": "0.1.0",
      "created_at": "2026-01-31T12:00:00Z",
      "workspace": "/home/me/project",        # the workspace folder (its project file's)
      "paths": ["."],                         # the PATHS plan was given, relative to it
      "selection": ["team=support"],          # the --select values ([]: everything)
      "prune": false,                         # plan --prune: orphans are to be pruned
      "replace": ["triage"], "reuse": true,   # plan --replace NAME [--no-reuse]
      "state": {"serial": 17, "lineage": "3f5c..."},
      "resources": {"triage": "<spec hash>"}, # every selected resource and its spec hash
      "plan": {"changes": true, "summary": {...}, "actions": [...]}  # Plan.to_json()
    }

``state.serial`` is ``StateStore.serial()``: it changes whenever resources, generations,
batches or files change. ``state.lineage`` identifies the state database itself (a hash of
its first recorded run), so a plan made against one database is never applied to another
whose serial happens to be the same. A plan made where no state exists (``plan`` creates
none) has no lineage: it fits a state that records nothing yet (serial 0), as an apply starts.

``apply plan.json`` with no PATHS loads the manifests from ``workspace`` + ``paths``, so it
works from any folder; when that folder is gone (another checkout), PATHS as typed are tried
from the working folder, and a workspace that is not the plan's is refused.

A saved plan is *current* when, read under the apply's lock, the lineage and serial equal
the state's, the selected resources and their spec hashes equal the manifests', and the plan
computed now gives every resource the same action (this catches result files edited on disk
and requeue backoffs that ended). Otherwise ``StalePlanError`` (exit 1) lists every
difference and nothing is touched: not the provider, not the state (the refused run itself is
recorded in history, like any run).

Applying a current plan: the plan is the approval (as with Terraform's saved plans), so no
``--yes`` or ``--allow-replace`` is needed, and the reconciler may spend only as the plan
says: a resource may create, replace or retry only when that is its planned action. A
spending step that becomes due during the apply (a retry after a batch the plan saw in flight
finishes) is skipped and left for the next plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchspec import __version__
from batchspec.core.plan import Action, ActionKind, Drain, Plan
from batchspec.errors import BatchspecError, StalePlanError, StateError, UsageError
from batchspec.state.store import StateStore

if TYPE_CHECKING:
    from batchspec.core.budget import Estimate
    from batchspec.workspace.manifest import Resource

PLAN_FILE_KIND = "batchspec/plan"
SCHEMA_VERSION = 1
PLAN_FILE_SUFFIX = ".json"


@dataclass(frozen=True)
class PlanResult:
    plan: Plan
    serial: int
    spec_hashes: Mapping[str, str] = field(default_factory=dict)
    # what a saved plan (batchspec.core.planfile) records besides the plan itself
    lineage: str | None = None
    paths: tuple[str, ...] = ()
    selection: tuple[str, ...] = ()
    prune: bool = False
    replace: tuple[str, ...] = ()
    reuse: bool = True
    workspace: str | None = None  # the workspace folder, absolute
    # what apply would refuse or may fail on, said ahead (budgets; an unset API key variable)
    refusals: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    #: per spending resource: tokens and the dollar upper bound (``core.budget.Estimate``)
    estimates: Mapping[str, Estimate] = field(default_factory=dict)
    #: the retired batches the next apply polls or collects, in its order (``reconcile.drain``)
    drains: tuple[Drain, ...] = ()
    #: the resources whose steps spend (or cancel) on a paid provider: ``apply`` asks consent
    #: for them (``--yes``, or a yes on a terminal; a plan saved with ``--out`` is consented)
    needs_consent: tuple[str, ...] = ()

    def exit_code(self, *, detailed: bool = False) -> int:
        """``plan``'s exit code: 1 when apply would refuse it; with ``detailed``
        (``--detailed-exitcode``) 2 when it has changes; else 0."""
        if self.refusals:
            return 1
        return 2 if detailed and self.plan.has_changes else 0


@dataclass(frozen=True)
class SavedPlan:
    """A plan as ``plan --out`` saved it, with what it was computed from."""

    plan: Plan
    serial: int
    lineage: str | None
    spec_hashes: Mapping[str, str]
    paths: tuple[str, ...] = ()
    selection: tuple[str, ...] = ()
    prune: bool = False
    replace: tuple[str, ...] = ()
    reuse: bool = True
    workspace: str | None = None
    batchspec_version: str = __version__
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION
    source: Path | None = field(default=None, compare=False)

    # -- applying --------------------------------------------------------------------------

    def manifest_paths(self) -> list[str]:
        """Where ``apply plan.json`` finds the manifests when given no PATHS."""
        if self.workspace is None:  # a plan file from before workspaces were recorded
            return list(self.paths)
        root = Path(self.workspace)
        if not root.is_dir():
            return list(self.paths)  # another checkout: the PATHS, from here
        return [str(root / p) for p in self.paths or (".",)]

    def require_workspace(self, root: Path) -> None:
        """Refuse a plan made for another workspace (compared when it is still there)."""
        if self.workspace is None or not Path(self.workspace).is_dir():
            return
        if Path(self.workspace).resolve() != root.resolve():
            where = self.source.name if self.source else "the saved plan"
            raise StalePlanError(
                f"{where} was made for the workspace {self.workspace}, not for {root}; "
                "nothing was done",
                details=["apply it without PATHS, or from that workspace"],
            )

    def may_spend(self, action: Action) -> bool:
        """True when the plan lets ``action``'s resource spend this way (create/replace/retry)."""
        planned = self.plan.action_for(action.resource)
        return planned is not None and planned.kind is action.kind

    def require_current(
        self, store: StateStore, resources: Sequence[Resource], plan_now: Plan
    ) -> None:
        """Raise ``StalePlanError`` unless the state and manifests are what the plan saw."""
        problems = stale_reasons(
            self,
            lineage=state_lineage(store),
            serial=store.serial(),
            spec_hashes={r.name: r.spec_hash for r in resources},
            plan_now=plan_now,
        )
        if problems:
            where = self.source.name if self.source else "the saved plan"
            raise StalePlanError(
                f"{where} is stale: {problems[0]}; nothing was done",
                details=[
                    *problems[1:],
                    "run `batchspec plan --out FILE` again, review it, and apply the new file",
                ],
            )

    # -- the file ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": PLAN_FILE_KIND,
            "schema_version": self.schema_version,
            "batchspec_version": self.batchspec_version,
            "created_at": self.created_at,
            "workspace": self.workspace,
            "paths": list(self.paths),
            "selection": list(self.selection),
            "prune": self.prune,
            "replace": list(self.replace),
            "reuse": self.reuse,
            "state": {"serial": self.serial, "lineage": self.lineage},
            "resources": dict(self.spec_hashes),
            "plan": self.plan.to_json(),
        }


def stale_reasons(
    saved: SavedPlan,
    *,
    lineage: str | None,
    serial: int,
    spec_hashes: Mapping[str, str],
    plan_now: Plan,
) -> list[str]:
    """Every way the world differs from what ``saved`` was computed from (pure)."""
    reasons = []
    # a plan made where no state existed (lineage None: ``plan`` creates none) fits any state
    # that records nothing yet (serial 0), as one apply starts
    if saved.lineage != lineage and saved.lineage is not None:
        reasons.append("it was made against another state database")
    elif saved.serial != serial:
        reasons.append(f"the state changed since it was made (serial {saved.serial} -> {serial})")
    added = sorted(set(spec_hashes) - set(saved.spec_hashes))
    removed = sorted(set(saved.spec_hashes) - set(spec_hashes))
    if added:
        reasons.append(f"resources selected now but not in the plan: {', '.join(added)}")
    if removed:
        reasons.append(f"resources in the plan but not selected now: {', '.join(removed)}")
    for name in sorted(set(spec_hashes) & set(saved.spec_hashes)):
        if spec_hashes[name] != saved.spec_hashes[name]:
            reasons.append(f"{name}: the manifest or its input changed (spec hash differs)")
    if not reasons:  # same state and specs: any other difference comes from disk or the clock
        before = {a.resource: a.kind for a in saved.plan.actions}
        for action in plan_now.actions:
            was = before.pop(action.resource, None)
            if was is not action.kind:
                planned = was.value if was else "nothing"
                reasons.append(
                    f"{action.resource}: the plan says {planned}, now it would be "
                    f"{action.kind.value} ({action.reason})"
                )
        reasons.extend(
            f"{name}: planned {kind.value}, no longer planned" for name, kind in before.items()
        )
    return reasons


# ---------------------------------------------------------------------------------------------
# Writing and reading


def saved_plan_of(result: PlanResult, *, now: float | None = None) -> SavedPlan:
    """The ``SavedPlan`` for a ``plan_workspace`` result."""
    moment = time.gmtime(time.time() if now is None else now)
    return SavedPlan(
        plan=result.plan,
        serial=result.serial,
        lineage=result.lineage,
        spec_hashes=dict(result.spec_hashes),
        paths=_relative_paths(result.paths, result.workspace),
        selection=tuple(result.selection),
        prune=result.prune,
        replace=tuple(result.replace),
        reuse=result.reuse,
        workspace=result.workspace,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", moment),
    )


def _relative_paths(paths: Sequence[str], workspace: str | None) -> tuple[str, ...]:
    """PATHS relative to the workspace folder, so the plan applies from any folder."""
    if workspace is None:
        return tuple(paths)
    root = Path(workspace)
    out = []
    for p in paths or (".",):
        try:
            out.append(str(Path(os.path.abspath(p)).relative_to(root)))
        except ValueError:
            out.append(os.path.abspath(p))
    return tuple(out)


def write_plan_file(path: str | Path, result: PlanResult) -> SavedPlan:
    """Save ``result`` to ``path`` (replaced atomically: a reader never sees half a plan)."""
    target = Path(path)
    if target.suffix != PLAN_FILE_SUFFIX:
        raise UsageError(
            f"--out {path}: a saved plan's file name must end in {PLAN_FILE_SUFFIX} "
            "(that is how `batchspec apply` tells it from manifests)"
        )
    saved = replace(saved_plan_of(result), source=target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(saved.to_json(), f, indent=2)
            f.write("\n")
        os.replace(tmp, target)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise BatchspecError(
            f"cannot write the plan to {path}: {err.strerror or err}; give --out a path in a "
            "folder you can write"
        ) from err
    return saved


def load_plan_file(path: str | Path) -> SavedPlan:
    """Read a saved plan; anything that is not one is a ``UsageError`` saying why."""
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"{path} is not a batchspec plan file: {err}") from None
    return saved_plan_from_json(data, source=source)


def saved_plan_from_json(data: Any, *, source: Path | None = None) -> SavedPlan:
    where = str(source) if source else "plan"
    if not isinstance(data, dict) or data.get("kind") != PLAN_FILE_KIND:
        raise UsageError(
            f'{where} is not a batchspec plan file (no "kind": "{PLAN_FILE_KIND}"); '
            "write one with `batchspec plan --out FILE.json`"
        )
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsageError(
            f"{where} has plan schema_version {version!r}; this batchspec ({__version__}) "
            f"reads version {SCHEMA_VERSION}: run `batchspec plan --out` again"
        )
    try:
        state = data["state"]
        return SavedPlan(
            plan=Plan(tuple(_action(a) for a in data["plan"]["actions"])),
            serial=int(state["serial"]),
            lineage=state.get("lineage"),
            spec_hashes={str(k): str(v) for k, v in data["resources"].items()},
            paths=tuple(str(p) for p in data.get("paths", ())),
            selection=tuple(str(s) for s in data.get("selection", ())),
            prune=bool(data.get("prune", False)),
            replace=tuple(str(n) for n in data.get("replace", ())),
            reuse=bool(data.get("reuse", True)),
            workspace=str(data["workspace"]) if data.get("workspace") else None,
            batchspec_version=str(data.get("batchspec_version", "")),
            created_at=str(data.get("created_at", "")),
            source=source,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UsageError(f"{where} is not a valid batchspec plan file: {err!r}") from None


def _action(data: Mapping[str, Any]) -> Action:
    return Action(
        resource=str(data["resource"]),
        kind=ActionKind(data["action"]),
        reason=str(data.get("reason", "")),
        provider=data.get("provider"),
        spec_hash=data.get("spec_hash"),
        generation_id=data.get("generation_id"),
        requests=int(data.get("requests") or 0),
        estimated_input_tokens=int(data.get("estimated_input_tokens") or 0),
        reused=int(data.get("reused") or 0),
        shards=int(data.get("shards") or 0),
    )


def is_plan_path(path: str) -> bool:
    """Whether a PATH given to ``apply`` names a saved plan (manifests are YAML)."""
    return path.endswith(PLAN_FILE_SUFFIX)


def state_lineage(store: StateStore) -> str | None:
    """Identifies the state database: a hash of its first recorded run (None: no run yet)."""
    try:
        first = store.get_run(1)
    except StateError:
        return None
    seed = f"{first.id}\0{first.started_at}\0{first.host}\0{first.pid}"
    return hashlib.sha256(seed.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
