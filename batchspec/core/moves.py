"""Renames: ``metadata.moved: {from: old-name}`` hands a recorded resource to a new name.

State is keyed by resource name, and the spec hash covers the name, so without this a renamed
manifest would look like a new resource (and pay again) while the old one turned orphaned.
A move keeps everything instead:

* ``apply_moves`` (``apply``, under the lock, before the reconciler acts) renames the old
  resource's record (``StateStore.rename_resource``): the resource row and its generations
  take the new name, and every generation's recorded spec is rewritten with the new name and
  re-hashed (``manifest.spec_hash``). A generation whose spec differed only by the name now
  has exactly the new resource's spec hash, so a pure rename is in sync: no new generation,
  no new batch, the recorded results kept (result files at a new default path are restored
  from the state store, without network). A rename together with a real spec change is a new
  generation, as any spec change is. Batches, the request ledger and downloaded results hang
  off generation ids and are untouched; in-flight batches are polled and collected under the
  new name. Events are append-only: earlier ones keep the old name, and a ``move`` event is
  recorded under each of the two names.
* ``moved_view`` is what ``plan`` uses (a plan never writes): the recorded view with the old
  name's record shown under the new name, re-hashed the same way, and ``note_moves`` puts
  "moved from X" in front of the action's reason. While a move is still to apply, the
  effective spec hash (``replacements.current_replacement``) of the new name is the old
  name's newest replacement as the move re-hashes it (``as_moved``): apply plans before it
  moves, and a replaced resource keeps its replacement current, not the older generation
  that has the manifest's own spec hash.

When a move applies: the old name is recorded and not forgotten, and the new name is not
recorded. Once done (the old name is gone), or when the old name was never recorded or was
forgotten, a ``moved`` entry does nothing, so it may stay in the manifest. Refused (a
``ManifestError``, nothing changed): both names recorded (a resource already runs under the
new name: ``forget`` one of them, or drop ``moved``; a new name recorded and forgotten keeps
its history, so the move must go to another name), and a move while a batch create of the
old name is unconfirmed (the remote batch carries the old name in its adoption key: run
``apply`` once more under the old name first).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from batchspec.core.plan import MOVED_FROM, ActionKind, Plan, RecordedResource
from batchspec.core.recorded import History
from batchspec.core.reporting import Progress, Reporter
from batchspec.errors import ManifestError
from batchspec.state.store import GenerationRow, StateStore
from batchspec.workspace.manifest import Resource, spec_hash

MOVE_EVENT = "move"


@dataclass(frozen=True)
class Move:
    """One rename: ``old`` -> ``new``, carrying ``generations`` recorded generations."""

    old: str
    new: str
    generations: int

    def to_json(self) -> dict[str, Any]:
        return {"from": self.old, "to": self.new, "generations": self.generations}


def pending_moves(store: StateStore, resources: Iterable[Resource]) -> list[tuple[Resource, str]]:
    """``(resource, old name)`` for every move that would apply now; raises on a conflict."""
    moves = []
    for res in resources:
        old = res.moved_from
        if old is None:
            continue
        old_row = store.get_resource(old)
        if old_row is None or old_row.forgotten:
            continue  # never recorded, forgotten, or moved already
        taken = store.get_resource(res.name)
        if taken is not None and taken.forgotten:
            # forgetting the old name, as for two live records, would leave its answers
            # behind: the new name would send every request again
            raise ManifestError(
                f"{res.source}: '{res.name}' moves from '{old}', but '{res.name}' was "
                "recorded before and forgotten: its history keeps that name",
                details=[
                    f"move '{old}' to a name the state has never recorded to keep its answers "
                    f"(`batchspec forget {old}` would not: '{res.name}' would send every "
                    "request again)"
                ],
            )
        if taken is not None:
            raise ManifestError(
                f"{res.source}: '{res.name}' moves from '{old}', but both names are recorded "
                "in the state",
                details=[
                    f"keep the history of one of them: `batchspec forget {old}` (drops the old "
                    "one's record), or remove `moved` from the manifest"
                ],
            )
        moves.append((res, old))
    return moves


def move_source(store: StateStore, res: Resource) -> str | None:
    """The name ``res`` moves from if that move is still to apply (the old name recorded and
    not forgotten, the new one not recorded), else ``None``. Raises nothing: a conflict is
    ``pending_moves``' to refuse."""
    old = res.moved_from
    if old is None or store.get_resource(res.name) is not None:
        return None
    old_row = store.get_resource(old)
    return old if old_row is not None and not old_row.forgotten else None


def respec(spec: Mapping[str, Any], old: str, new: str) -> tuple[str, dict[str, Any]] | None:
    """A generation's recorded ``spec`` of ``old`` with the name ``new``, and that spec's
    hash; ``None`` for a spec this version did not write (left as history)."""
    if spec.get("name") != old:
        return None
    renamed = {**spec, "name": new}
    return spec_hash(renamed), renamed


def respecs(store: StateStore, old: str, new: str) -> dict[int, tuple[str, dict[str, Any]]]:
    """For each generation of ``old``: its spec with the name ``new``, and that spec's hash."""
    out = {}
    for gen in store.generations(old):
        renamed = respec(gen.spec, old, new)
        if renamed is not None:
            out[gen.id] = renamed
    return out


def as_moved(gen: GenerationRow, new: str) -> GenerationRow:
    """``gen`` (of ``gen.resource``) as ``apply_moves`` will record it under ``new``."""
    renamed = respec(gen.spec, gen.resource, new)
    if renamed is None:
        return replace(gen, resource=new)
    new_hash, spec = renamed
    return replace(gen, resource=new, spec_hash=new_hash, spec=spec)


def apply_moves(
    store: StateStore,
    resources: Sequence[Resource],
    run_id: int,
    report: Reporter = lambda progress: None,
) -> tuple[Move, ...]:
    """Rename the recorded state of every resource that moved (see the module docstring)."""
    done = []
    for res, old in pending_moves(store, resources):
        _refuse_unconfirmed_creates(store, res, old)
        with store.atomic():
            changes = respecs(store, old, res.name)
            store.rename_resource(old, res.name, respecs=changes)
            move = Move(old, res.name, len(store.generations(res.name)))
            for name in (old, res.name):
                store.record_event(run_id, MOVE_EVENT, resource=name, detail=move.to_json())
        done.append(move)
        message = f"moved from {old} ({move.generations} generation(s) kept)"
        report(Progress(MOVE_EVENT, res.name, message, move.to_json()))
    return tuple(done)


def _refuse_unconfirmed_creates(store: StateStore, res: Resource, old: str) -> None:
    for gen in store.generations(old):
        unsure = [
            b for b in store.batches(gen.id) if b.remote_id is None and b.status == "creating"
        ]
        if unsure:
            raise ManifestError(
                f"{res.source}: cannot move '{old}' to '{res.name}' yet: {len(unsure)} batch "
                f"create(s) of '{old}' are not confirmed by the provider, and the remote batch "
                f"is found again by a key that names '{old}'",
                details=[
                    f"run `batchspec apply` once with the manifest still named '{old}' (without "
                    "`moved`), then rename it again"
                ],
            )


def moved_view(
    store: StateStore,
    recorded: Mapping[str, RecordedResource],
    resources: Iterable[Resource],
) -> tuple[dict[str, RecordedResource], dict[str, str]]:
    """The recorded view as it will be after the pending moves, and ``{new: old}``. No writes."""
    view = dict(recorded)
    moved: dict[str, str] = {}
    for res, old in pending_moves(store, resources):
        rec = view.pop(old, None)
        if rec is None:
            continue
        hashes = {gid: new_hash for gid, (new_hash, _) in respecs(store, old, res.name).items()}
        generations = tuple(
            replace(g, spec_hash=hashes.get(g.id, g.spec_hash)) for g in rec.generations
        )
        view[res.name] = replace(rec, name=res.name, generations=generations)
        moved[res.name] = old
    return view, moved


def moved_history(history: Mapping[str, History], moved: Mapping[str, str]) -> dict[str, History]:
    """``history`` (by name) with each old name's generations also under its new name, as
    ``apply_moves`` will record them (``moved``: ``{new: old}``, from ``moved_view``): what a
    new generation of the new name would reuse is counted from them, as apply carries it."""
    out = dict(history)
    for new, old in moved.items():
        out[new] = [(as_moved(gen, new), batches) for gen, batches in history.get(old, ())]
    return out


def note_moves(plan: Plan, moved: Mapping[str, str]) -> Plan:
    """``plan`` with "moved from X; " in front of the reason of each moved resource."""
    if not moved:
        return plan
    return replace(
        plan,
        actions=tuple(
            replace(a, reason=f"{MOVED_FROM}{moved[a.resource]}; {a.reason}")
            if a.resource in moved
            else a
            for a in plan.actions
        ),
    )


def renamed_to(store: StateStore, name: str) -> str | None:
    """The name ``name`` was last renamed to (a ``move`` event from it), if any."""
    moves = store.events(resource=name, action=MOVE_EVENT)
    to = moves[-1].detail.get("to") if moves else None
    return to if isinstance(to, str) and to != name else None


def renamed_error(name: str, new: str, command: str) -> ManifestError:
    """What a command given the old name of a renamed resource says (exit 1)."""
    return ManifestError(
        f"no resource named {name!r}: it was renamed to {new!r} (metadata.moved); its "
        "generations and batches are under the new name",
        details=[f"`batchspec {command.replace('NAME', new)}`"],
    )


def former_names(store: StateStore, name: str) -> list[str]:
    """The names ``name`` was recorded under before, most recent first (from move events)."""
    names: list[str] = []
    current = name
    while True:
        moves = [
            e
            for e in store.events(resource=current, action=MOVE_EVENT)
            if e.detail.get("to") == current
        ]
        if not moves:
            return names
        previous = moves[-1].detail.get("from")
        if not isinstance(previous, str) or previous in names or previous == name:
            return names
        names.append(previous)
        current = previous


def rename_hints(store: StateStore, plan: Plan, input_sha256: Mapping[str, str]) -> list[str]:
    """A warning for each new resource that looks like an orphan renamed without ``moved``:
    its input (``input_sha256``: by resource name; a resource that names ``moved`` is left
    out by the caller) is the one the orphan's current generation ran on the same provider.
    Without ``moved`` the rename submits (and pays for) every request again."""
    orphans = [
        a.resource for a in plan.actions if a.kind in (ActionKind.ORPHANED, ActionKind.PRUNE)
    ]
    ran: dict[tuple[str, str], list[str]] = {}  # by (input, provider): answers are a provider's
    for name in orphans:
        row = store.get_resource(name)
        if row is not None and row.current_generation_id is not None:
            sha = store.get_generation(row.current_generation_id).input_sha256
            ran.setdefault((sha, row.provider), []).append(name)
    hints = []
    for action in plan.actions:
        if action.kind is not ActionKind.CREATE or store.get_resource(action.resource):
            continue
        new = action.resource
        for old in ran.get((input_sha256.get(new, ""), action.provider or ""), ()):
            hints.append(
                f"{new} is new, and {old}, whose manifest is gone, ran the same input: if "
                f"{new} is {old} renamed, add `moved: {{from: {old}}}` under {new}'s "
                f"metadata: apply then takes over what is recorded for {old} (its answers, "
                "results and history) instead of submitting every request again"
            )
    return hints


__all__ = [
    "MOVE_EVENT",
    "Move",
    "apply_moves",
    "as_moved",
    "former_names",
    "move_source",
    "moved_history",
    "moved_view",
    "note_moves",
    "pending_moves",
    "rename_hints",
    "renamed_error",
    "renamed_to",
]
