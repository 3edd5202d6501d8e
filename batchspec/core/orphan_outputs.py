"""A declared resource whose result files would overwrite an orphan's.

An orphan (its manifest gone, not pruned) still owns the result files its last generation
wrote. A manifest that names one of those files as its ``output`` or ``errors`` would
overwrite it at its first collect, silently: the orphan's answers stay in the state, but the
file its users read is gone, and adding the orphan's manifest back would restore it over the
new resource's results. ``overwritten_orphan_results`` finds each such collision while the
file still holds what the orphan wrote (its sha256 as recorded), for ``plan`` to show and
``apply`` to refuse before anything is submitted. Moving the orphan (``moved: {from: ...}``)
or pruning it says the file is the new resource's; once it holds other bytes (overwritten
already, or edited), nothing of the orphan's is left there to keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

from batchspec.core.plan import ActionKind, Plan
from batchspec.errors import ManifestError
from batchspec.state.store import StateStore
from batchspec.storage.blobstore import sha256_file
from batchspec.workspace.manifest import Resource
from batchspec.workspace.yamldoc import display_path


def overwritten_orphan_results(
    store: StateStore,
    plan: Plan,
    resources: Sequence[Resource],
    root: Path,
    declared: AbstractSet[str] | None,
) -> list[ManifestError]:
    """One error per result file of an orphan that a resource of ``resources`` would write,
    while the file holds the orphan's results. An orphan: ``ORPHANED`` in ``plan``, or, the
    plan being narrowed by ``--select``, any resource recorded and not forgotten that the
    whole workspace does not declare (``declared``; None: not known), unless the plan prunes
    it. ``root``: the project's root, which the state's recorded paths are relative to."""
    orphans = [a.resource for a in plan.actions if a.kind is ActionKind.ORPHANED]
    if declared is not None:
        planned = {a.resource for a in plan.actions}
        orphans += [
            row.name
            for row in store.list_resources()
            if row.name not in declared and row.name not in planned
        ]
    if not orphans:
        return []
    writes: dict[Path, tuple[str, str]] = {}  # a file declared: (resource, "output"/"errors")
    for res in resources:
        for key, path in (("output", res.output_path), ("errors", res.errors_path)):
            writes.setdefault(path.resolve(), (res.name, key))
    errors = []
    for orphan in orphans:
        written = [g for g in store.generations(orphan) if g.output_sha256 or g.errors_sha256]
        if not written:
            continue
        last = written[-1]
        hits: dict[str, list[str]] = {}  # by the resource that would write: its files hit
        for recorded, sha in (
            (last.output_path, last.output_sha256),
            (last.errors_path, last.errors_sha256),
        ):
            if not recorded or not sha:
                continue
            path = (root / recorded).resolve()  # an absolute recorded path stays as it is
            if path in writes and _sha256_or_none(path) == sha:
                name, key = writes[path]
                hits.setdefault(name, []).append(f"{key} file {_shown(path, root)}")
        errors += [_collision(orphan, name, files) for name, files in hits.items()]
    return errors


def _collision(orphan: str, name: str, files: list[str]) -> ManifestError:
    held = " and ".join(files) + (" hold" if len(files) > 1 else " holds")
    return ManifestError(
        f"{name}'s {held} what {orphan} wrote, and {orphan}'s manifest is gone: collecting "
        f"{name} would overwrite {orphan}'s results, so apply submits nothing",
        details=[
            f"if {name} is {orphan} renamed, add `moved: {{from: {orphan}}}` under {name}'s "
            f"metadata: {name} then takes over {orphan}'s answers and results, and submits "
            "nothing again",
            f"if {orphan} is done with, prune it first (`batchspec apply --prune --select "
            f"{orphan}`): its files are then yours, and {name} may overwrite them",
            f"or give {name} other result files (spec.output, spec.errors)",
        ],
    )


def _shown(path: Path, root: Path) -> str:
    """``path`` as the run's other messages show a result file: from the project's root."""
    top = root.resolve()
    return path.relative_to(top).as_posix() if path.is_relative_to(top) else display_path(path)


def _sha256_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:  # gone, or not a readable file: nothing of the orphan's to keep there
        return None


__all__ = ["overwritten_orphan_results"]
