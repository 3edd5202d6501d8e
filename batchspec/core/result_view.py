"""``batchspec results``: a resource's result files, tied to the generation that wrote them.

A result file on disk is only what the manifest asks for when the manifest's current spec
(its effective spec hash, a replacement included) has a finished generation whose recorded
sha256 equals the file's; a generation a user cancelled counts as finished (its results are
what finished before the cancel, flagged with a note). Anything else (the results of an
older spec, the partial results of a generation still running, a file edited by hand) is
*stale*: refused with
``StaleResultsError`` (exit 1), or, with ``allow_stale``, returned flagged with the reason,
so the CLI prints it and says on stderr whose results they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from batchspec.core import export
from batchspec.core.moves import renamed_error, renamed_to
from batchspec.core.replacements import effective_resources
from batchspec.core.session import select_resources
from batchspec.core.status import (
    answer_counts,
    is_name_selector,
    read_only_store,
    require_loaded,
)
from batchspec.errors import ManifestError, StaleResultsError, StateError, UsageError
from batchspec.state.store import GenerationRow, StateStore
from batchspec.storage.blobstore import sha256_file
from batchspec.workspace.manifest import Resource, load_workspace
from batchspec.workspace.project import ProviderConfig
from batchspec.workspace.yamldoc import Problem, display_path, unknown_name_hint

FINISHED = ("complete", "degraded")
#: a user's cancel ends a generation too: what finished before it is that spec's final answer
ENDED = (*FINISHED, "cancelled")


@dataclass(frozen=True)
class ResultsFile:
    """A resource's merged results (or errors) file, and which generation wrote it."""

    name: str
    path: Path
    spec_hash: str  # the manifest's current (effective) spec hash
    generation_id: int | None  # the generation whose recorded results the file holds
    generation_spec_hash: str | None
    current: bool  # the file is what the current spec's finished generation wrote
    stale_reason: str | None = None
    note: str | None = None  # current, but worth saying (the partial results of a cancel)
    #: the resource (its input, output and errors paths), for an export
    resource: Resource | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "resource": self.name,
            "file": display_path(self.path),
            "generation_id": self.generation_id,
            "generation_spec_hash": self.generation_spec_hash,
            "spec_hash": self.spec_hash,
            "current": self.current,
            "stale_reason": self.stale_reason,
            "note": self.note,
        }


@dataclass(frozen=True)
class ResultsView:
    """The files ``batchspec results`` prints, and the manifest problems it passed over."""

    files: list[ResultsFile]
    #: problems of other manifests, which did not stop this read (shown as a warning)
    skipped: tuple[Problem, ...] = ()
    #: the project's providers (an export prices its rows with them)
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)


def result_files(
    paths: Sequence[str],
    *,
    select: Sequence[str] = (),
    errors: bool = False,
    allow_stale: bool = False,
    state_path: str | None = None,
) -> ResultsView:
    """``batchspec results``: the selected resources' result files, each tied to the
    generation that wrote it. A file that is not the current spec's finished results (an
    older spec's, an unfinished generation's, edited on disk) is refused with
    ``StaleResultsError`` unless ``allow_stale``; every refusal is listed at once.

    Only the selected resources' manifests must load: problems in others come back in
    ``skipped``; a selected name that did not load raises them (its manifest may be broken).
    """
    ws = load_workspace(paths, state_path=state_path, tolerate_broken=True)
    require_loaded(ws, [s for s in select if is_name_selector(s)])
    names = {r.name for r in ws.resources}
    gone = [s for s in select if "=" not in s and ":" not in s and s not in names]
    if gone:  # renamed (metadata.moved): say to what, not "did you mean"
        with read_only_store(ws.project) as store:
            moved_to = renamed_to(store, gone[0])
        if moved_to is not None:
            raise renamed_error(gone[0], moved_to, "results NAME")
    resources = select_resources(ws, select)
    if gone:  # a recorded orphan: its manifest (and so its result path) is gone
        hint = unknown_name_hint(gone[0], names)
        raise ManifestError(f"no resource named {gone[0]!r} in the manifests ({hint})")
    found = []
    with read_only_store(ws.project) as store:
        for res in effective_resources(store, resources):
            path = res.errors_path if errors else res.output_path
            if not path.is_file():
                missing = StateError(
                    f"{display_path(path)} does not exist yet",
                    details=["run `batchspec apply` to collect the results, or to restore it"],
                )
                missing.about(res.name)  # the --json error document names it
                raise missing
            tied = _tie_to_generation(store, res, path, errors=errors)
            found.append(replace(tied, resource=res))
    stale = [f for f in found if not f.current]
    if stale and not allow_stale:
        refused = StaleResultsError(
            f"{stale[0].stale_reason}; nothing was printed",
            details=[
                *(f.stale_reason or "" for f in stale[1:]),
                "`batchspec status` shows where each resource stands; pass --allow-stale to "
                "print stale results anyway",
            ],
        )
        if len(stale) == 1:  # the --json error document names it
            refused.about(stale[0].name)
        raise refused
    return ResultsView(found, ws.problems, ws.project.providers)


def _tie_to_generation(
    store: StateStore, res: Resource, path: Path, *, errors: bool
) -> ResultsFile:
    sha = sha256_file(path)
    gens = store.generations(res.name)
    current = next((g for g in gens if g.spec_hash == res.spec_hash), None)

    def recorded(g: GenerationRow) -> str | None:
        return g.errors_sha256 if errors else g.output_sha256

    writer = next(
        (g for g in sorted(gens, key=lambda g: (g is not current, -g.id)) if recorded(g) == sha),
        None,
    )
    shown = display_path(path)
    if current is not None and writer is current and current.status in ENDED:
        note = None
        if current.status == "cancelled":
            note = (
                f"{shown}: generation {current.id} was cancelled; these are the "
                f"{current.succeeded}/{current.requests} answers that finished before it stopped"
            )
        elif current.failed and not errors:
            # an output short of requests (empty, even) with exit 0 would say nothing of them
            note = (
                f"{shown}: {current.failed:,} of {current.requests:,} requests failed for good "
                f"and are not here; `batchspec results {res.name} --errors` prints them "
                f"({display_path(res.errors_path)})"
            )
        return ResultsFile(
            res.name, path, res.spec_hash, current.id, current.spec_hash, True, note=note
        )
    if current is None:
        now = (
            f"its current spec {res.spec_hash[:12]} has no generation yet "
            "(`batchspec apply` runs it)"
        )
    else:
        succeeded = answer_counts(store, current)[0]  # as `status` counts them
        now = (
            f"its current spec {res.spec_hash[:12]} is generation {current.id}, "
            f"{current.status} with {succeeded}/{current.requests} succeeded"
        )
    if writer is None:
        why = (
            f"{shown} is not what any recorded generation of {res.name} wrote (edited on disk, "
            f"or from another state); {now}"
        )
    elif writer is current:
        why = f"{shown} holds the partial results of generation {current.id} ({current.status})"
    else:
        why = (
            f"{shown} holds the results of generation {writer.id} (spec "
            f"{writer.spec_hash[:12]}), not of the current spec of {res.name}: {now}"
        )
    return ResultsFile(
        res.name,
        path,
        res.spec_hash,
        writer.id if writer else None,
        writer.spec_hash if writer else None,
        False,
        why,
    )


def copy_results(files: Sequence[ResultsFile], out: BinaryIO) -> None:
    """The files' bytes as they are, one after another (result lines are not re-encoded)."""
    for f in files:
        with f.path.open("rb") as src:
            while chunk := src.read(1 << 16):
                out.write(chunk)


def write_results_json(files: Sequence[ResultsFile], out: BinaryIO) -> None:
    """One JSON document: each file's generation facts and its result lines as a list,
    streamed (every line already is a JSON object, written as it is)."""
    out.write(b'{"resources": [')
    for i, f in enumerate(files):
        head = json.dumps(f.to_json())[:-1].encode()
        out.write((b", " if i else b"") + head + b', "results": [')
        first = True
        with f.path.open("rb") as src:
            for line in src:
                line = line.strip()
                if not line:
                    continue
                out.write(line if first else b", " + line)
                first = False
        out.write(b"]}")
    out.write(b"]}\n")


def export_results(
    files: Sequence[ResultsFile],
    providers: Mapping[str, ProviderConfig],
    fmt: str,
    out: BinaryIO,
    *,
    join: bool = False,
) -> int:
    """``batchspec results NAME --format FMT``: the resource's rows (``batchspec.core.export``)
    written to ``out``; one resource at a time."""
    if len(files) != 1:
        names = ", ".join(f.name for f in files)
        raise UsageError(f"--format exports one resource at a time; selected: {names}")
    res = files[0].resource
    if res is None:
        raise StateError(f"no resource behind {files[0].path}")
    source = export.ExportSource(res, res.output_path, res.errors_path, providers.get(res.provider))
    layout = export.layout_of(source, join=join)
    return export.write_export(
        export.export_rows(source, join=join), layout, export.check_format(fmt), out
    )
