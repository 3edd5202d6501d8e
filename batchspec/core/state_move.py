"""Moving the state: ``batchspec state migrate --to URL`` and ``batchspec state export FILE.db``.

The state to move is the project's (``state:`` in batchspec.yaml) or ``--state`` /
``BATCHSPEC_STATE``; the copy itself, and what it promises, is ``batchspec.state.transfer``.

* ``migrate_state``: keeps the source still for the whole copy (``batchspec.state.lock.
  hold_still``: a running ``apply`` makes it wait ``--lock-timeout``, then exit 3; an SQLite
  source is not written at all, a PostgreSQL one holds the run lock),
  copies into an empty PostgreSQL database or a new SQLite file, checks every table, the
  state serial and the result blobs, and leaves the source as it was: no run or event is
  recorded in either, so both audit logs read the same. The project file is not edited:
  ``MigrateResult.switch`` says how to point the project at the new state.
* ``export_state``: a single-file SQLite copy (rollback journal, not WAL) for audits,
  sqlite-utils and Datasette; a read of one snapshot, so it takes no lock. An existing file
  is refused unless ``force``, and the source's own file (or its ``-wal``, ``-shm`` or
  ``-journal`` file) never.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchspec.errors import StateError
from batchspec.state.lock import hold_still
from batchspec.state.runinfo import collect_run_info
from batchspec.state.store import StateStore
from batchspec.state.transfer import StateCopy, check_target, copy_blobs, copy_state
from batchspec.storage.blobstore import BlobStore
from batchspec.storage.database_url import is_database_url, redact_url
from batchspec.storage.remote_blobs import RemoteBlobs, open_blob_location
from batchspec.workspace.project import (
    Project,
    default_project,
    find_project_file,
    load_project,
    load_workspace_project,
    with_state,
)


@contextmanager
def closing_tier(tier: RemoteBlobs | None) -> Iterator[None]:
    """Close the ``state.blobs`` tier (if any) when the move is over."""
    try:
        yield
    finally:
        if tier is not None:
            tier.close()


#: the environment variable the advice names for a PostgreSQL URL
URL_ENV_SUGGESTION = "BATCHSPEC_STATE_URL"


@dataclass(frozen=True)
class MigrateResult:
    """A checked copy of the state, and how to start using it."""

    copy: StateCopy
    #: lines telling the user how to point the project at the new state
    switch: tuple[str, ...]
    #: set when the run lock was taken over from a dead process first
    lock_warning: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.copy.to_json(), "switch": list(self.switch)}


def migrate_state(
    to: str,
    *,
    state_path: str | None = None,
    lock_timeout: float = 0.0,
    start: Path | None = None,
    env: Mapping[str, str] = os.environ,
) -> MigrateResult:
    """``batchspec state migrate --to URL``: copy the project's state into an empty one."""
    project = _project(state_path, start)
    target: str | Path = to if "://" in to else Path(to).resolve()
    _refuse_same(project, target)
    local = BlobStore(project.state_path.parent / "store")
    target_local = BlobStore(target.parent / "store") if isinstance(target, Path) else local
    _require_source(project)
    check_target(target)  # before the lock: a refused target leaves the source untouched
    shared = None if project.state_blobs is None else open_blob_location(project.state_blobs)
    with _open_source(project) as source, closing_tier(shared):
        info = collect_run_info(project.root, env)
        with hold_still(
            source, command="state migrate", info=info, timeout=lock_timeout
        ) as warning:
            copied = copy_state(
                source.db,
                target,
                copy_blobs=lambda src, dst: copy_blobs(
                    src,
                    dst,
                    local=local,
                    target_local=target_local,
                    shared=shared,
                    shards=project.state_path.parent / "shards",
                ),
            )
    return MigrateResult(copied, _switch_advice(project, target), warning)


def export_state(
    file: str,
    *,
    state_path: str | None = None,
    force: bool = False,
    start: Path | None = None,
) -> StateCopy:
    """``batchspec state export FILE.db``: a single-file SQLite copy of the state."""
    project = _project(state_path, start)
    target = Path(file).resolve()
    _refuse_same(project, target)
    _require_source(project)
    check_target(target, replace=True)  # a folder or a device: refused, --force or not
    if target.exists() and not force:
        raise StateError(f"{target} exists already; pass --force to replace it")
    with _open_source(project) as source:
        return copy_state(source.db, target, replace=force, journal_mode="DELETE")


def _project(state_path: str | None, start: Path | None) -> Project:
    """The workspace's project (its state and result store), or the state named outright."""
    if find_project_file(start) is not None:
        return load_project(start, state_path=state_path)
    if state_path is not None:
        return with_state(default_project(start or Path.cwd()), state_path)
    return load_workspace_project(start)  # raises NotAWorkspaceError, saying what to do


def _open_source(project: Project) -> StateStore:
    _require_source(project)
    return StateStore.open(project.state)


def _require_source(project: Project) -> None:
    if not project.has_state():
        raise StateError(
            f"no state database at {project.state_label}; nothing to move (pass --state "
            "PATH|URL, or run from the workspace)"
        )


#: the files SQLite keeps beside a database, named after it: replacing one corrupts the state
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def _refuse_same(project: Project, target: str | Path) -> None:
    """Refuse a target that is the state, or one of its SQLite companion files (symlinks
    resolved): replacing the live WAL or shared memory would corrupt the state."""
    source = project.state
    if isinstance(target, Path) and isinstance(source, Path):
        same = target.resolve() == source.resolve()
        resolved = target.resolve()
        for base in {source.absolute(), source.resolve()}:
            for suffix in SQLITE_COMPANIONS:
                if resolved == base.with_name(base.name + suffix).resolve():
                    raise StateError(
                        f"the target {target} is the state's own {suffix[1:]} file (beside "
                        f"{project.state_label}); replacing it would corrupt the state: "
                        "choose another file"
                    )
    else:
        same = isinstance(target, str) and isinstance(source, str) and target == source
    if same:
        raise StateError(f"the target is the state itself ({project.state_label}); nothing to do")


def _switch_advice(project: Project, target: str | Path) -> tuple[str, ...]:
    """How to point the project at the new state (the project file is left alone)."""
    where = project.file.name if project.file is not None else "batchspec.yaml"
    if isinstance(target, str) and is_database_url(target):
        return (
            f"To use it, keep the URL in an environment variable and name it in {where}:",
            f"  state: {{urlEnv: {URL_ENV_SUGGESTION}}}",
            f"  export {URL_ENV_SUGGESTION}='{redact_url(target)}'   (with its password)",
            f"or for one command: --state URL (or BATCHSPEC_STATE). The old state at "
            f"{project.state_label} is unchanged; keep it until the new one has served a run.",
        )
    path = Path(target)
    try:
        shown = str(path.relative_to(project.root.resolve()))
    except ValueError:
        shown = str(path)
    return (
        f"To use it, set the state in {where}:",
        f"  state: {{path: {shown}}}",
        f"or for one command: --state {shown} (or BATCHSPEC_STATE). The old state at "
        f"{project.state_label} is unchanged; keep it until the new one has served a run.",
    )


__all__ = ["URL_ENV_SUGGESTION", "MigrateResult", "export_state", "migrate_state"]
