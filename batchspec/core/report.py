"""``batchspec report``: what one HTML page shows, gathered from the read-only library calls.

A ``WorkspaceReport`` is the status of every resource (``workspace_status``: sync, health,
progress, tokens and dollars of its current generation), the last runs of the audit log
(``read_history``: who, where, which git commit, tokens and dollars each run finished) and
the spend per git commit (``spend_by_commit``, as ``history --by commit`` prints it). It
reads the manifests and the state only: no lock, no network, nothing written. The figures are
the very objects ``status --json`` and ``history --json`` print, so the page cannot disagree
with them; rendering is the face's job (``batchspec.cli.report_html``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batchspec.core.history import CommitSpend, HistoryEntry, read_history, spend_by_commit
from batchspec.core.spend import Usage
from batchspec.core.status import ResourceStatus, workspace_status
from batchspec.errors import UsageError
from batchspec.state.store import utc_timestamp
from batchspec.storage.blobstore import write_atomically
from batchspec.workspace.manifest import load_workspace, overwritten_workspace_file
from batchspec.workspace.yamldoc import Problem


@dataclass(frozen=True)
class WorkspaceReport:
    resources: tuple[ResourceStatus, ...]
    #: newest run first, as ``history`` lists them
    runs: tuple[HistoryEntry, ...]
    generated_at: str
    #: problems of manifests that did not load (their resources are shown from the state)
    skipped: tuple[Problem, ...] = ()
    #: newest commit first, as ``history --by commit`` lists them
    commits: tuple[CommitSpend, ...] = ()

    @property
    def usage(self) -> Usage:
        """Tokens and dollars of every resource's current generation (``None``: unknown)."""
        total = Usage()
        for status in self.resources:
            total += status.usage
        return total

    def to_json(self) -> dict[str, Any]:
        """What the page shows, as ``report --json`` prints it: each part in the shape
        ``status --json``, ``history --json`` and ``history --by commit --json`` print."""
        return {
            "generated_at": self.generated_at,
            "usage": asdict(self.usage),
            "resources": [s.to_json() for s in self.resources],
            "runs": [e.to_json() for e in self.runs],
            "commits": [c.to_json() for c in self.commits],
        }


def require_report_target(
    paths: Sequence[str], output: Path, *, state_path: str | None = None
) -> None:
    """Refuse a page written over one of the workspace's own files (``report -o
    state/batchspec.db`` would destroy the record of what was paid for), before writing."""
    ws = load_workspace(paths, state_path=state_path, tolerate_broken=True)
    overwritten = overwritten_workspace_file(ws, output)
    if overwritten is not None:
        raise UsageError(
            f"--output {output}: {overwritten}, which the page may not replace; write it "
            "elsewhere (the default is report.html)."
        )


def write_report_page(output: Path, page: str) -> None:
    """Write the page through a temporary file and a rename: a full disk fails the command
    naming ``output`` and leaves the page that was there (or none), never an empty or cut
    one (it was opened in place: a new page on a full disk was an empty file). A symbolic
    link gets its target replaced; a device or pipe (``-o /dev/stdout``) is written to."""
    if output.exists() and not output.is_file():  # followed through links
        with output.open("w", encoding="utf-8") as fh:
            fh.write(page)
        return
    target = Path(os.path.realpath(output))
    if not target.parent.is_dir():  # a mistyped folder is not created
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(output))
    write_atomically(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))


def workspace_report(
    paths: Sequence[str], *, runs: int = 50, state_path: str | None = None
) -> WorkspaceReport:
    """The status of every resource, the last ``runs`` runs and the spend of the last ``runs``
    commits of the workspace at ``paths``."""
    status = workspace_status(paths, state_path=state_path)
    entries = read_history(paths, limit=runs, state_path=state_path)
    commits = spend_by_commit(paths, limit=runs, state_path=state_path)
    return WorkspaceReport(
        status.resources, tuple(entries), utc_timestamp(), status.skipped, tuple(commits)
    )
