"""Manifests: find them, validate them, normalise each ``kind: Batch`` document to a ``Resource``.

``load_workspace(paths)`` takes files, folders and glob patterns (default: the working
directory), finds the project (``batchspec.workspace.project.load_project``, from the first path),
reads every manifest and returns a ``Workspace``, or raises ``InvalidManifestError`` (a
``ManifestError``) listing *every* problem, one line each, as ``file:line:column: pointer:
message``. It reads manifests and hashes input files; it writes nothing.

Finding manifests
    See ``batchspec.workspace.discovery``: files, folders (by the project's ``manifests``
    globs) and glob patterns, never outside the first path's workspace.

Paths
    ``input``, ``output`` and ``errors`` are relative to the manifest's folder and become
    absolute, resolved paths (symlinks resolved). Defaults: ``<manifest folder>/results/
    <name>.jsonl``; errors beside the output, ``<output without .jsonl>.errors.jsonl`` (so a
    manifest that sets only ``output: results/x.jsonl`` writes ``results/x.errors.jsonl``).

Confinement (DESIGN invariant 5: nothing a manifest names is written where it must not be)
    ``output`` and ``errors`` must resolve inside the workspace root (the folder of
    ``batchspec.yaml``) and never onto: the state folder (or the state file and its side
    files, when the state lives in the root itself), its shared blob folder
    (``state.blobs``) or a local provider's ``dataDir``; a
    version control folder (``.git``, ``.hg``, ``.svn``, ``.jj``); the project file; a
    manifest (a file loaded as one, or any path the project's ``manifests`` globs match); the
    input or rows file of any resource; or another resource's output or errors file (the
    problem names both places); "any" and "another" over the whole workspace, whatever
    PATHS were given (``_outside_paths``). Nor may either name a folder (an existing one, or
    a path written with a trailing ``/``, which resolving would turn into a file of that
    name), or lie below a file (neither could ever be written: found before anything is
    spent).
    ``spec.export`` paths are confined the same way, and never onto the resource's own input,
    output or errors file. Each is a ``path-conflict`` problem at the key, so validate, plan
    and apply refuse it alike; collect and restore check again right before writing,
    symlinks resolved then (``refuse_unconfined_write``). Inputs are only read, so they may
    live anywhere, outside the workspace too.

Requests from data
    ``spec.input`` may be an object ``{rows, id, body}`` instead of a path: the rows file is
    rendered through the templates (``batchspec.workspace.templates``) into a content-addressed
    batch JSONL file under ``<state folder>/rendered/``, the one write a load may make (a cache).
    ``Resource.input_path`` is that rendered file, so everything downstream treats it like a
    file input, and ``Resource.input_source`` is the rows file (None for a path input).
    Template and row problems are reported with everything else, located in the manifest
    (syntax) or the rows file (rows).

Renames
    ``metadata.moved: {from: old-name}`` says the resource used to be called ``old-name``;
    ``Resource.moved_from`` carries it (``batchspec.core.moves`` renames the recorded state).
    A resource may not move from its own name, from a name another manifest still declares,
    or from a name another resource also moves from.

Checks beyond the schema
    ``spec.provider`` (or the project's ``defaults.provider``) names a declared or built-in
    provider; the input (or the rows file) exists and is a file; a resource name is used once
    in the workspace (the problem names both places); outputs and errors are confined (see
    "Confinement").

Spec hash
    ``Resource.spec_hash`` is the hex sha256 of the canonical JSON of
    ``Resource.semantic_spec()``::

        {"apiVersion": "batchspec/v1", "name": ..., "provider": ..., "endpoint": ...,
         "completion_window": ..., "model": ... or null, "metadata": {... sorted},
         "input_sha256": <hex sha256 of the input file's bytes>}

    For a rows input, ``input_sha256`` is the hash of the rendered file: a changed row or
    template is a new spec hash, an edit that renders the same requests is not.

    A resource whose answers come from the built-in offline stand-in (a ``local`` provider
    whose ``upstream``, or one of its ``upstreams``, is ``builtin``) also has
    ``"answers": "stand-in"`` (``STAND_IN``; no such key otherwise, so no other hash
    changed): pointing the provider at a model server, or the resource at another provider,
    is a new spec, and its answers are a model's (the stand-in's fake ones are never kept by
    a generation that is not itself the stand-in's: ``replacements.keeps_answers_of``).

    Canonical JSON is ``json.dumps(..., sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` encoded as UTF-8. Defaults are applied first (an omitted
    ``completionWindow`` hashes as ``"24h"``; an omitted ``provider`` as the project's default).
    Deliberately *not* part of the hash, so changing them never resubmits anything: labels and
    annotations, ``moved``, ``output``/``errors`` paths, ``retry``, ``limits``, ``budget``,
    ``suspend``,
    the manifest's own path or name, key order, how the input path is spelled (the file is
    identified by its content), the machine and the time. The same spec on any machine hashes
    the same.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchspec.errors import BatchspecError, ManifestError
from batchspec.wire import inputs
from batchspec.workspace.discovery import (
    find_manifest_files,
    glob_regex,
    is_glob,
    manifests_the_globs_miss,
    not_batchspec,
    not_found,
    start_of,
)
from batchspec.workspace.project import (
    DEFAULT_MANIFEST_GLOBS,
    DEFAULT_OPENAI_BASE_URL,
    PROJECT_FILE_NAME,
    Budget,
    NotAWorkspaceError,
    Project,
    ProviderConfig,
    budget_from,
    load_project,
    load_workspace_project,
)
from batchspec.workspace.resolving import FolderResolver
from batchspec.workspace.yamldoc import (
    InvalidManifestError,
    Problem,
    SourceLocation,
    YamlDocument,
    display_path,
    read_yaml_documents,
    schema_problems,
    suggest,
)

if TYPE_CHECKING:
    from batchspec.workspace.manifestcache import ManifestCache
    from batchspec.workspace.templates import RenderedInput

API_VERSION = "batchspec/v1"
#: below the state folder: the render cache of rows inputs (``batchspec.workspace.templates``)
RENDERED_FOLDER = "rendered"
DEFAULT_COMPLETION_WINDOW = "24h"
DEFAULT_MAX_ATTEMPTS = 3
RETRYABLE_FAILURES: tuple[str, ...] = (
    "server_error",
    "rate_limit",
    "timeout",
    "expired",
    "cancelled",
)

__all__ = [
    "Budget",
    "CheckedInputHasher",
    "InvalidManifestError",
    "Limits",
    "Problem",
    "Project",
    "ProviderConfig",
    "Resource",
    "RetryPolicy",
    "SourceLocation",
    "Workspace",
    "load_project",
    "load_workspace",
    "confinement",
    "overwritten_workspace_file",
    "refuse_unconfined_write",
    "spec_hash",
    "unlisted_manifests_warnings",
]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    on: tuple[str, ...] = RETRYABLE_FAILURES


@dataclass(frozen=True)
class Limits:
    """Per remote batch (shard) limits from the manifest; ``None`` means the provider's."""

    max_requests_per_batch: int | None = None
    max_bytes_per_batch: int | None = None
    max_embedding_inputs_per_batch: int | None = None


@dataclass(frozen=True)
class ExportTarget:
    """One ``spec.export`` entry: a dataset apply writes from the results."""

    path: Path
    format: str  # jsonl, csv or parquet
    join: bool = False


EXPORT_SUFFIXES = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Resource:
    """One ``kind: Batch`` document, normalised. Mappings are plain dicts: treat as read-only."""

    name: str
    labels: Mapping[str, str]
    provider: str
    endpoint: str
    completion_window: str
    input_path: Path
    model: str | None
    metadata: Mapping[str, str]
    output_path: Path
    errors_path: Path
    retry: RetryPolicy
    limits: Limits
    budget: Budget | None  # the manifest's, falling back field by field to the project's
    suspend: bool
    source: SourceLocation  # where the document starts
    input_sha256: str
    spec_hash: str
    #: the rows file of a rows input (``input_path`` is then its rendered JSONL); else None
    input_source: Path | None = None
    #: ``metadata.moved.from``: the name this resource was recorded under before, if any
    moved_from: str | None = None
    #: ``spec.export``: datasets written with the results (not part of the spec hash)
    exports: tuple[ExportTarget, ...] = ()
    #: its answers come from the built-in offline stand-in (see "Spec hash" above)
    stand_in: bool = False

    @property
    def declared_where(self) -> str:
        """``resource NAME in FILE``: names the resource and its manifest in a message about
        something it sets (an input shared by several resources is held to each one's)."""
        return f"resource {self.name} in {display_path(self.source.file)}"

    def semantic_spec(self) -> dict[str, Any]:
        """The normalised, JSON-able spec that ``spec_hash`` covers (see module docstring)."""
        return semantic_spec(
            name=self.name,
            provider=self.provider,
            endpoint=self.endpoint,
            completion_window=self.completion_window,
            model=self.model,
            metadata=self.metadata,
            input_sha256=self.input_sha256,
            stand_in=self.stand_in,
        )


@dataclass(frozen=True)
class Workspace:
    project: Project
    resources: tuple[Resource, ...]
    manifest_files: tuple[Path, ...] = ()
    #: with ``load_workspace(tolerate_broken=True)``: the problems of the documents left out
    problems: tuple[Problem, ...] = ()
    #: manifest files given as PATHS that the project's ``manifests`` globs do not find: a
    #: run without PATHS does not see them, so what they create shows as orphaned there
    unlisted: tuple[Path, ...] = ()


def require_resources(
    ws: Workspace, paths: Sequence[str | Path], *, prune: bool = False, named: bool = False
) -> None:
    """Raise when ``paths`` (default: the current folder) hold no ``kind: Batch`` document
    and the command does not name what it acts on (``named``: ``--select NAME`` only).

    ``validate``, ``plan`` and ``apply`` refuse alike: a mistyped manifest glob, or a run from
    a folder holding none, would otherwise pass having done nothing, and ``--prune`` would
    take every resource the state tracks for one whose manifest is gone, and cancel it. The
    last manifests deleted on purpose are pruned by naming them (``--select NAME``)."""
    if ws.resources or named:
        return
    where = display_path(Path(paths[0]) if paths else Path.cwd())
    globs = ", ".join(ws.project.manifest_globs or ("(none)",))
    root = display_path(ws.project.root) or "."
    headline = f"no resources found under {where}: no `kind: Batch` document in the files it holds"
    everywhere, _, _ = find_manifest_files([str(ws.project.root)], ws.project)
    folders = [Path(p).resolve() for p in paths or ["."] if Path(p).is_dir()]
    if not everywhere:  # a mistyped glob: there are no files to hold anything
        headline = (
            f"no resources found under {where}: the project's manifest globs ({globs}) match "
            f"no file in the workspace ({root})"
        )
        details = [
            f"check `manifests:` in {display_path(ws.project.file or ws.project.root)}"
            if ws.project.manifest_globs != DEFAULT_MANIFEST_GLOBS
            else "add a manifest (`kind: Batch`) to the workspace"
        ]
    elif len(folders) == len(paths or ["."]) and not any(
        f.is_relative_to(folder) for f in everywhere for folder in folders
    ):  # the workspace has manifests, elsewhere: a run from the wrong folder
        details = [
            f"the project's manifest globs ({globs}) find {len(everywhere)} file(s) in the "
            f"workspace ({root}), none under {where}: run from the workspace's root, or give "
            "a PATH that holds its manifests"
        ]
    else:
        details = [f"the project's manifest globs: {globs}"]
    if prune:
        details.append(
            "--prune is refused; to prune a resource whose manifest you deleted, name it: "
            "`batchspec apply --prune --select NAME`"
        )
    raise ManifestError(headline, details=details)


def semantic_spec(
    *,
    name: str,
    provider: str,
    endpoint: str,
    completion_window: str,
    model: str | None,
    metadata: Mapping[str, str],
    input_sha256: str,
    stand_in: bool = False,
) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "name": name,
        "provider": provider,
        "endpoint": endpoint,
        "completion_window": completion_window,
        "model": model,
        "metadata": dict(sorted(metadata.items())),
        "input_sha256": input_sha256,
        **({ANSWERS_KEY: STAND_IN} if stand_in else {}),
    }


#: the spec key (and its value) of a resource the built-in stand-in answers
ANSWERS_KEY = "answers"
STAND_IN = "stand-in"


def answered_by_stand_in(project: Project, provider: str) -> bool:
    """Whether ``provider``'s answers come from the built-in offline stand-in: a ``local``
    provider whose ``upstream`` (``builtin`` when not set), or any of whose ``upstreams``,
    is ``builtin``."""
    config = project.providers.get(provider)
    if config is None or config.type != "local":
        return False
    rotation = config.options.get("upstreams")
    if rotation:
        urls = (u.get("url") if isinstance(u, Mapping) else u for u in rotation)
        return any(url == "builtin" for url in urls)
    return str(config.options.get("upstream", "builtin")) == "builtin"


def spec_hash(semantic: Mapping[str, Any]) -> str:
    """Hex sha256 of the canonical JSON of ``semantic`` (see module docstring)."""
    canonical = json.dumps(semantic, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_workspace(
    paths: Sequence[str | Path] = (),
    *,
    hash_input: Callable[[Path], str] = inputs.file_sha256,
    manifest_cache: ManifestCache | None = None,
    state_path: str | Path | None = None,
    tolerate_broken: bool = False,
    hash_checked_input: CheckedInputHasher | None = None,
    project: Project | None = None,
) -> Workspace:
    """The project and every resource under ``paths``; ``InvalidManifestError`` lists all problems.

    ``hash_input`` computes an input file's content hash (injectable so a caller that reads
    the inputs anyway can avoid reading them twice). ``hash_checked_input``, when given, is
    used instead wherever a resource's provider and endpoint are known: it is told them and
    the model, so a caller that validates the input by its provider's rules can hash it with
    that same read. ``manifest_cache`` recalls files that
    were read clean before and are unchanged, so they are not parsed and schema-checked
    again (``batchspec.workspace.manifestcache``); every other check still runs on them.

    ``tolerate_broken`` is for read-only commands (``status``, ``results``): problems inside
    manifest files do not raise; the resources that loaded are returned and the problems
    are in ``Workspace.problems``. A problem of the project file, a path that does not exist
    or a path of another workspace still raises.

    ``project``: what ``project_for(paths, state_path=state_path)`` returned, when the caller
    has it already; the project file is then not read and checked a second time.
    """
    targets = [str(p) for p in paths] or ["."]
    try:
        if project is None:
            project = load_workspace_project(start_of(targets[0]), state_path=state_path)
    except NotAWorkspaceError:
        missing = [t for t in targets if not is_glob(t) and not Path(t).exists()]
        if missing:  # the precise problem: a mistyped path, not a missing workspace
            raise InvalidManifestError([not_found(t) for t in missing]) from None
        raise
    files, problems, named = find_manifest_files(targets, project)
    resources: list[tuple[Resource, YamlDocument]] = []
    names: list[tuple[str, SourceLocation]] = []
    resolve = _PathResolver()
    loaded: list[Path] = []
    for file in files:
        recalled = manifest_cache.recall(file) if manifest_cache is not None else None
        digest: list[str] = []
        documents, file_problems = (
            (recalled, []) if recalled is not None else read_yaml_documents(file, digest=digest)
        )
        if file not in named and not_batchspec(file, documents, file_problems):
            continue  # found by a glob, and not ours (a CI workflow, a compose file): skipped
        loaded.append(file)
        problems.extend(file_problems)
        clean = not file_problems
        for doc in documents:
            resource, doc_problems = _load_document(
                doc,
                project,
                _Hashers(hash_input, hash_checked_input),
                resolve,
                validated=recalled is not None,
            )
            problems.extend(doc_problems)
            names.extend(_name_of(doc))
            if resource is not None:
                resources.append((resource, doc))
            clean = clean and resource is not None
        if manifest_cache is not None and recalled is None and clean:
            manifest_cache.remember(file, documents, sha256=digest[0] if digest else None)
    others = _outside_paths(targets, project, loaded, resolve, manifest_cache)
    problems.extend(_duplicate_names([*names, *others.names]))
    problems.extend(_conflicting_moves(resources))
    problems.extend(_written_over(resources, loaded, others.claims))
    if problems and not (tolerate_broken and all(p.file is not None for p in problems)):
        hints = _names_given_as_paths(targets, project, manifest_cache)
        raise InvalidManifestError(problems, hints=hints)
    ordered = tuple(sorted(dict.fromkeys(problems), key=Problem.sort_key))
    # A name declared twice has no one resource: neither is kept (the problem says why).
    declared = Counter(name for name, _ in names)
    kept = tuple(res for res, _ in resources if declared[res.name] == 1)
    return Workspace(project, kept, tuple(loaded), ordered, others.unlisted)


def unlisted_manifests_warnings(ws: Workspace) -> list[str]:
    """A warning per manifest given as a PATH that the project's globs do not find."""
    globs = ", ".join(ws.project.manifest_globs) or "(none)"
    return [
        f"{display_path(file)} is not among the project's manifests ({globs} in "
        f"{display_path(ws.project.file or ws.project.root)}): `batchspec apply` without PATHS "
        "does not read it, shows what it creates as orphaned, and `apply --prune` cancels "
        "and forgets that; add it to `manifests:` or move it under them"
        for file in ws.unlisted
    ]


def missed_manifests_warnings(ws: Workspace, paths: Sequence[str | Path]) -> list[str]:
    """When ``paths`` take in the whole workspace (its root folder), a warning per manifest
    the project's globs do not find: in the wrong folder, no run without PATHS reads it."""
    root = ws.project.root.resolve()
    if not any(Path(p).is_dir() and Path(p).resolve() == root for p in (paths or ["."])):
        return []
    globs = ", ".join(ws.project.manifest_globs) or "(none)"
    return [
        f"{display_path(file)} holds a `kind: Batch` document the project's manifests "
        f"({globs} in {display_path(ws.project.file or ws.project.root)}) do not find: "
        "no command reads it unless given as a PATH; move it under them or add it to "
        "`manifests:`"
        for file in manifests_the_globs_miss(ws.project)
    ]


def workspace_resource_names(
    project: Project, *, manifest_cache: ManifestCache | None = None
) -> frozenset[str]:
    """Every resource name the project's manifests declare (and every ``moved.from`` name),
    over the whole workspace: what is *not* orphaned, whatever PATHS a command was given
    (``workspace_declarations``)."""
    declared, moved_from = workspace_declarations(project, manifest_cache=manifest_cache)
    return declared | moved_from


def workspace_declarations(
    project: Project, *, manifest_cache: ManifestCache | None = None
) -> tuple[frozenset[str], frozenset[str]]:
    """The resource names the project's manifests declare, and the ``moved.from`` names they
    carry, over the whole workspace.

    Only names are read (inputs are not hashed). A manifest file that cannot be parsed raises
    ``InvalidManifestError``: then nobody can tell which resources are gone. A file the globs
    find that is plainly not a batchspec manifest (``not_batchspec``: a Helm template, a
    broken compose file) is skipped, as a load of the whole workspace skips it: ``apply
    --prune PATHS`` must not refuse what ``apply --prune`` does.
    """
    files, problems, _ = find_manifest_files([str(project.root)], project)
    names: set[str] = set()
    moved_from: set[str] = set()
    for file in files:
        recalled = manifest_cache.recall(file) if manifest_cache is not None else None
        documents, file_problems = (
            (recalled, []) if recalled is not None else read_yaml_documents(file)
        )
        if not_batchspec(file, documents, file_problems):
            continue
        problems.extend(file_problems)
        for doc in documents:
            name = _resource_name(doc)
            if name is None:
                continue
            names.add(name)
            metadata = doc.data.get("metadata") if isinstance(doc.data, Mapping) else None
            moved = metadata.get("moved") if isinstance(metadata, Mapping) else None
            old = moved.get("from") if isinstance(moved, Mapping) else None
            if isinstance(old, str):
                moved_from.add(old)
    if problems:
        raise InvalidManifestError(problems)
    return frozenset(names), frozenset(moved_from)


def _names_given_as_paths(
    targets: Sequence[str], project: Project, manifest_cache: ManifestCache | None
) -> list[str]:
    """A hint for each missing path that is a resource's name: PATHS are files, not names."""
    missing = [t for t in targets if not is_glob(t) and not Path(t).exists()]
    if not missing:
        return []
    try:
        declared = workspace_resource_names(project, manifest_cache=manifest_cache)
    except InvalidManifestError:  # a broken manifest: its own problem is reported anyway
        return []
    return [
        f"{t} is a resource name, not a path: pick resources with --select {t}"
        for t in missing
        if t in declared
    ]


def project_for(
    paths: Sequence[str | Path] = (), *, state_path: str | Path | None = None
) -> Project:
    """The project ``load_workspace(paths)`` would use (found from the first path)."""
    targets = [str(p) for p in paths] or ["."]
    return load_workspace_project(start_of(targets[0]), state_path=state_path)


# ---------------------------------------------------------------------------------------------
# One document


def _load_document(
    doc: YamlDocument,
    project: Project,
    hash_input: _Hashers,
    resolve: _PathResolver,
    *,
    validated: bool = False,
) -> tuple[Resource | None, list[Problem]]:
    """``validated``: the document is known to pass the shape and schema checks (recalled
    from the manifest cache, which holds only documents that did), so they are skipped."""
    problems: list[Problem] = []
    if not validated:
        problems = _shape_problems(doc)
        if problems:
            return None, problems
        problems = schema_problems(doc, "batch")
    # The checks beyond the schema run wherever their fields are well-typed, so one run
    # reports a missing input file next to a misspelt key.
    checked = _check_spec(doc, project, hash_input, resolve, problems)
    if problems or checked is None:
        return None, problems
    return _resource(doc, project, checked), []


def _shape_problems(doc: YamlDocument) -> list[Problem]:
    """A document that is not a Batch at all gets one clear problem instead of dozens."""
    data = doc.data
    if not isinstance(data, Mapping):
        message = "a manifest document must be a mapping starting with `apiVersion: batchspec/v1`"
        return [Problem.at(doc.start, "", "not-a-mapping", message)]
    kind = data.get("kind")
    if kind is None and data.get("apiVersion") != API_VERSION:
        message = (
            "not a batchspec manifest (no `kind: Batch`); if this file is not a manifest, "
            "narrow `manifests:` in batchspec.yaml or pass the manifest files explicitly"
        )
        return [Problem.at(doc.start, "", "unknown-kind", message)]
    if isinstance(kind, str) and kind != "Batch":
        message = f"unknown kind '{kind}': manifests hold `kind: Batch` documents only"
        if kind == "Project":
            message += f" (a Project document belongs in the project file {PROJECT_FILE_NAME})"
        return [Problem.at(doc.location("/kind"), "/kind", "unknown-kind", message)]
    return []


#: an input's content hash taken by the scan its resource is validated with, given
#: ``(path, provider name, endpoint, model)`` (``load_workspace``'s ``hash_checked_input``)
CheckedInputHasher = Callable[[Path, str, str, str | None], str]


@dataclass(frozen=True)
class _Hashers:
    """How the loader hashes inputs: ``plain`` always works, ``checked`` where it can."""

    plain: Callable[[Path], str]
    checked: CheckedInputHasher | None = None


@dataclass(frozen=True)
class _Checked:
    """What the checks beyond the schema resolved for one document."""

    provider: str
    input_path: Path
    input_sha256: str
    output_path: Path
    errors_path: Path
    input_source: Path | None = None
    exports: tuple[ExportTarget, ...] = ()


def _check_spec(
    doc: YamlDocument,
    project: Project,
    hash_input: _Hashers,
    resolve: _PathResolver,
    problems: list[Problem],
) -> _Checked | None:
    spec = doc.data.get("spec")
    if not isinstance(spec, Mapping):
        return None
    folder = resolve.folder(doc.file.parent)
    provider = _provider(doc, spec, project, problems)
    if provider is not None:
        _check_window(doc, spec, project.providers[provider], problems)
    raw_input = spec.get("input")
    input_path = input_sha256 = input_source = None
    if isinstance(raw_input, str):
        input_path = resolve(folder, raw_input)
        endpoint, model = spec.get("endpoint"), spec.get("model")
        hasher = hash_input.plain
        if (
            hash_input.checked is not None
            and provider is not None
            and isinstance(endpoint, str)
            and (model is None or isinstance(model, str))
        ):
            checked = hash_input.checked
            hasher = lambda path: checked(path, provider, endpoint, model)  # noqa: E731
        input_sha256 = _input_hash(doc, input_path, hasher, problems, raw=raw_input)
    elif isinstance(raw_input, Mapping):
        rendered = _rendered_input(doc, spec, raw_input, project, folder, problems)
        if rendered is not None:
            input_path, input_sha256 = rendered.path, rendered.sha256
            input_source = rendered.rows_path
    outputs = _output_paths(
        doc, spec, folder, resolve, input_source or input_path, project, problems
    )
    taken = (input_source or input_path, *(outputs or ()))
    exports = _export_targets(doc, spec, folder, resolve, taken, project, problems)
    if provider is None or input_path is None or input_sha256 is None or outputs is None:
        return None
    return _Checked(
        provider, input_path, input_sha256, *outputs, input_source=input_source, exports=exports
    )


def _export_targets(
    doc: YamlDocument,
    spec: Mapping[str, Any],
    folder: Path,
    resolve: _PathResolver,
    taken: tuple[Path | None, ...],
    project: Project,
    problems: list[Problem],
) -> tuple[ExportTarget, ...]:
    """``spec.export``, resolved and confined like ``output`` (see "Confinement"); ``taken``
    is the resource's input, output and errors files, which no export may overwrite."""
    targets: list[ExportTarget] = []
    seen: set[Path] = set()
    for i, entry in enumerate(spec.get("export") or []):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
            continue  # the schema has reported it
        pointer = f"/spec/export/{i}/path"
        path = resolve(folder, entry["path"])
        fmt = entry.get("format") or EXPORT_SUFFIXES.get(path.suffix.lower())
        if _names_a_folder(entry["path"]):
            message: str | None = _folder_not_file(
                entry["path"], "export", _resource_name(doc) or "export"
            )
        elif path in taken or path in seen:
            message = (
                f"export file {display_path(path)} is this resource's input, output, errors "
                "or another export file: it would be overwritten"
            )
        else:
            message = resolve.confinement(project).forbidden(path, "export", doc.file)
        if message is None and fmt is None:
            message = (
                f"export file {display_path(path)}: set `format` (jsonl, csv or parquet) or "
                "use one of the extensions .jsonl, .csv, .parquet"
            )
        elif message is None and fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
            message = "a parquet export needs pyarrow: pip install 'batchspec[parquet]'"
        if message is None:
            name = _resource_name(doc) or "export"
            message = _unwritable(path, "export", name, resolve.blocking_file, resolve.is_dir)
        if message is not None:
            problems.append(Problem.at(doc.location(pointer), pointer, "path-conflict", message))
            continue
        seen.add(path)
        targets.append(ExportTarget(path, str(fmt), bool(entry.get("join", False))))
    return tuple(targets)


def _output_paths(
    doc: YamlDocument,
    spec: Mapping[str, Any],
    folder: Path,
    resolve: _PathResolver,
    input_path: Path | None,
    project: Project,
    problems: list[Problem],
) -> tuple[Path, Path] | None:
    """Where results and errors go (see "Paths" and "Confinement" in the module docstring)."""
    name = _resource_name(doc)
    output = spec.get("output", f"results/{name}.jsonl")
    if name is None or not isinstance(output, str) or not isinstance(spec.get("errors", ""), str):
        return None  # the schema has reported it
    output_path = resolve(folder, output)
    errors = spec.get("errors")
    errors_path = resolve(folder, errors) if errors is not None else errors_beside(output_path)
    for key, path, raw in (("output", output_path, output), ("errors", errors_path, errors)):
        pointer = f"/spec/{key}"
        if raw is not None and _home_relative(raw):
            message: str | None = (
                f"{key} path {raw!r} would be written under a folder named '~' beside the "
                f"manifest: {TILDE_NOT_EXPANDED}"
            )
        elif raw is not None and _names_a_folder(raw):
            message = _folder_not_file(raw, key, name)
        elif path == input_path:
            message = f"{key} file is the input file {display_path(path)}: it would be overwritten"
        else:
            message = resolve.confinement(project).forbidden(path, key, doc.file)
        if message is None:  # found now, before anything is spent, not when answers are in
            message = _unwritable(path, key, name, resolve.blocking_file, resolve.is_dir)
        if message is not None:
            problems.append(Problem.at(doc.location(pointer), pointer, "path-conflict", message))
    if output_path == errors_path:
        message = "output and errors are the same file"
        problems.append(
            Problem.at(doc.location("/spec/errors"), "/spec/errors", "path-conflict", message)
        )
    return output_path, errors_path


#: said of a path written from the home folder (``~/data/x.jsonl``): no shell reads it
TILDE_NOT_EXPANDED = (
    "'~' is not expanded in a manifest (no shell reads it): give the path relative to the "
    "manifest's own folder, or absolute"
)


def _home_relative(raw: str) -> bool:
    """Whether a path as written starts from the home folder (``~``, ``~/x``, ``~user/x``);
    ``~draft.jsonl`` alone names a file beside the manifest."""
    first, slash, _ = raw.replace(os.sep, "/").partition("/")
    return first == "~" or (first.startswith("~") and bool(slash))


def _not_found_hint(raw: str) -> str:
    """What a path not found is told: where it is read from, or that ``~`` is not home."""
    return TILDE_NOT_EXPANDED if _home_relative(raw) else RELATIVE_TO_MANIFEST


def _names_a_folder(raw: str) -> bool:
    """Whether a result path as written names a folder, not a file: it ends in a slash
    (``../newdir/``) or in ``.``/``..``. Resolving drops that trailing slash, so a folder
    that does not exist yet would otherwise become a file of that name."""
    last = raw.replace(os.sep, "/").rsplit("/", 1)[-1]
    return last in ("", ".", "..")


def _folder_not_file(raw: str, key: str, name: str) -> str:
    """The problem for a result path that names a folder (``_names_a_folder``)."""
    folder = raw.rstrip("/" + os.sep) or raw
    return (
        f"{key} path {raw!r} names a folder: a result path must name a file "
        f"(e.g. {folder}/{name}.jsonl)"
    )


#: the longest file name (bytes) the common filesystems take (ext4, XFS, APFS, NTFS)
NAME_MAX = 255


def _unwritable(
    path: Path,
    key: str,
    name: str,
    blocking: Callable[[Path], Path | None] | None = None,
    is_dir: Callable[[Path], bool] = os.path.isdir,
) -> str | None:
    """Why a result file could never be written at ``path`` (a folder there, a name too
    long, or a file where one of its folders should be), or None. ``blocking``: the
    load's remembered ``_blocking_file`` (many manifests write into one folder); ``is_dir``:
    the load's answer from the lstat that resolved ``path`` (``_PathResolver.is_dir``)."""
    if is_dir(path):
        return (
            f"{key} file {display_path(path)} is a folder: name a file in it "
            f"(e.g. {display_path(path / f'{name}.jsonl')})"
        )
    if len(os.fsencode(path.name)) > NAME_MAX:
        return f"{key} file name {path.name[:40]}... is longer than {NAME_MAX} bytes"
    blocker = (blocking or _blocking_file)(path.parent)
    if blocker is not None:
        return (
            f"{key} file {display_path(path)} cannot be written: {display_path(blocker)} "
            "is a file, not a folder"
        )
    return None


def _blocking_file(folder: Path) -> Path | None:
    """The file that stands where ``folder`` or a folder above it should be, if any."""
    while not os.path.isdir(folder):  # the usual case, an existing folder: one stat
        if os.path.lexists(folder):
            return folder
        if folder.parent == folder:
            return None
        folder = folder.parent
    return None


def errors_beside(output_path: Path) -> Path:
    """The default errors file: ``x.jsonl`` -> ``x.errors.jsonl`` in the output's folder."""
    stem = (
        output_path.name[: -len(".jsonl")] if output_path.suffix == ".jsonl" else output_path.name
    )
    return output_path.with_name(f"{stem}.errors.jsonl")


#: what the state keeps beside its database: result blobs, shard files, rendered rows, caches
STATE_DATA_NAMES = ("store", "shards", RENDERED_FOLDER, "input-cache.db", "input-index")


def refuse_unconfined_write(
    project: Project, path: Path, key: str, manifest: Path, *, within: Confinement | None = None
) -> None:
    """Check a result file's path again right before it is written, symlinks resolved *now*.

    The load checked it, but a folder swapped for a symlink since (``results`` pointed into
    ``state/``) would redirect the write onto the state database or out of the workspace.
    ``within``: the project's forbidden places as ``confinement(project)`` resolved them once
    for a run (as the load resolves them once), else resolved here.
    """
    places = within if within is not None else _Confinement(project)
    message = places.forbidden(path.resolve(), key, manifest.resolve())
    if message is not None:
        raise ManifestError(
            f"{display_path(manifest)}: {message}. A symlink changed since the manifests were "
            "checked; nothing was written (the answers stay in the state store)."
        )


def overwritten_workspace_file(ws: Workspace, path: Path) -> str | None:
    """What a file a command is told to write (``report -o FILE``) would destroy, or None.

    The workspace's own files: the state (its database, side files and data), the project
    file, a manifest, a resource's input, rows, output or errors file. Anywhere else may be
    written, outside the workspace too (a report in /tmp)."""
    resolved = path.resolve()
    places = _Confinement(ws.project)
    for folder, what in places.folders:
        if _inside(str(resolved), str(folder)):
            return f"{display_path(resolved)} is inside {what} {display_path(folder)}"
    state = places.state
    if resolved.parent == state.parent and resolved.name.startswith(state.name):
        return f"{display_path(resolved)} is the state database (or one of its side files)"
    if resolved == places.project_file:
        return f"{display_path(resolved)} is the project file"
    if resolved in _resolved_files(ws.manifest_files):
        return f"{display_path(resolved)} is a manifest"
    if _inside(str(resolved), places._root_text):  # would be read as a manifest next time
        relative = Path(str(resolved)[len(places._root_text) :].lstrip(os.sep)).as_posix()
        if any(pattern.fullmatch(relative) for pattern in places.patterns):
            return f"{display_path(resolved)} matches the manifest globs (read as a manifest)"
    for res in ws.resources:
        for what, file in (
            ("input", res.input_source or res.input_path),
            ("output", res.output_path),
            ("errors", res.errors_path),
        ):
            if resolved == file:
                return f"{display_path(resolved)} is the {what} file of resource {res.name}"
    return None


def confinement(project: Project) -> Confinement:
    """The project's forbidden places resolved once, for ``refuse_unconfined_write(within=)``
    (a run checks every result path it writes against the same ones)."""
    return _Confinement(project)


#: version control folders: a result written there would overwrite the repository itself
_VCS = frozenset({".git", ".hg", ".svn", ".jj"})


class _Confinement:
    """Where a workspace's resources may not write (see "Confinement"), resolved once a load."""

    def __init__(self, project: Project) -> None:
        self.root = project.root
        self.project_file = project.file.resolve() if project.file is not None else None
        self.state = project.state_path.resolve()
        self.globs = project.manifest_globs
        self.patterns = [glob_regex(pattern) for pattern in project.manifest_globs]
        state_folder = self.state.parent
        if self.root.is_relative_to(state_folder):
            # the state beside or above the workspace (the root itself, --state ../x.db):
            # protect what the state keeps next to its file, not every folder below it
            found = [(state_folder / name, "the state folder's data") for name in STATE_DATA_NAMES]
        else:
            found = [(state_folder, "the state folder")]
        blobs = project.state_blobs
        if blobs is not None and "://" not in blobs:  # the shared tier of the result store
            found.append((Path(blobs).resolve(), "the state's shared blob folder (state.blobs)"))
        for provider in project.providers.values():
            data_dir = provider.options.get("dataDir") if provider.type == "local" else None
            if isinstance(data_dir, str):
                what = f"the data folder of provider '{provider.name}'"
                found.append((Path(data_dir).resolve(), what))
        self.folders = found
        self._root_text = str(self.root)
        # the same as strings (``forbidden`` compares text: resolved paths are normalised)
        self._folder_texts = [(str(folder), folder, what) for folder, what in found]
        self._state_folder_text = str(self.state.parent)
        self._project_file_text = str(self.project_file) if self.project_file else None

    def forbidden(self, path: Path, key: str, manifest: Path) -> str | None:
        """Why ``path`` may not be written as a resource's ``key`` file, or None if it may.

        ``path`` is absolute and resolved: containment is a prefix test on its string (a
        load asks twice per manifest; pathlib's ``is_relative_to`` cost 1,000 manifests
        0.1 s)."""
        text = str(path)
        if not _inside(text, self._root_text):
            return (
                f"{key} file {display_path(path)} is outside the workspace "
                f"{display_path(self.root)} (the folder of {PROJECT_FILE_NAME}); results are "
                "written only inside it"
            )
        for folder_text, folder, what in self._folder_texts:
            if _inside(text, folder_text):
                return (
                    f"{key} file {display_path(path)} is inside {what} {display_path(folder)}: "
                    "writing there could destroy the record of what was paid for; write "
                    "results elsewhere (e.g. results/)"
                )
        relative = text[len(self._root_text) :].lstrip(os.sep)
        vcs = next((part for part in relative.split(os.sep) if part in _VCS), None)
        if vcs is not None:
            return (
                f"{key} file {display_path(path)} is inside the version control folder {vcs}: "
                "it would overwrite the repository's own files; write results elsewhere "
                "(e.g. results/)"
            )
        parent_text, name = os.path.split(text)
        if parent_text == self._state_folder_text and name.startswith(self.state.name):
            state = display_path(self.state)
            return (
                f"{key} file {display_path(path)} is the state database {state} (or one of its "
                "side files)"
            )
        if text == self._project_file_text:
            return f"{key} file {display_path(path)} is the project file: it would be overwritten"
        if text == str(manifest):  # (manifest files are resolved when found)
            return f"{key} file {display_path(path)} is this manifest: it would be overwritten"
        posix = relative if os.sep == "/" else Path(relative).as_posix()
        if any(pattern.fullmatch(posix) for pattern in self.patterns):
            return (
                f"{key} file {display_path(path)} matches the workspace's manifest globs "
                f"({', '.join(self.globs)}): it would overwrite a manifest or be read as one; "
                "use a .jsonl name outside them"
            )
        return None


def _inside(path: str, folder: str) -> bool:
    """``Path(path).is_relative_to(folder)`` for absolute, normalised paths."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


#: the forbidden places of one project, resolved (``confinement``)
Confinement = _Confinement


def _resource(doc: YamlDocument, project: Project, checked: _Checked) -> Resource:
    """The Resource of a document that passed every check."""
    metadata, spec = doc.data["metadata"], doc.data["spec"]
    common = {
        "name": metadata["name"],
        "provider": checked.provider,
        "endpoint": spec["endpoint"],
        "completion_window": spec.get("completionWindow", DEFAULT_COMPLETION_WINDOW),
        "model": spec.get("model"),
        "metadata": dict(spec.get("metadata", {})),
        "input_sha256": checked.input_sha256,
        "stand_in": answered_by_stand_in(project, checked.provider),
    }
    return Resource(
        **common,
        labels=dict(metadata.get("labels", {})),
        input_path=checked.input_path,
        output_path=checked.output_path,
        errors_path=checked.errors_path,
        retry=_retry(spec.get("retry", {})),
        limits=_limits(spec.get("limits", {})),
        budget=_budget(spec.get("budget"), project.default_budget),
        suspend=bool(spec.get("suspend", False)),
        source=doc.start,
        spec_hash=spec_hash(semantic_spec(**common)),
        input_source=checked.input_source,
        moved_from=(metadata.get("moved") or {}).get("from"),
        exports=checked.exports,
    )


def _provider(
    doc: YamlDocument, spec: Mapping[str, Any], project: Project, problems: list[Problem]
) -> str | None:
    name = spec.get("provider") or project.default_provider
    if name is not None and not isinstance(name, str):
        return None  # the schema has reported it
    if name is None:
        message = "missing required key 'provider' (or set `defaults.provider` in batchspec.yaml)"
        problems.append(Problem.at(doc.location("/spec"), "/spec", "missing-key", message))
        return None
    pointer = "/spec/provider" if "provider" in spec else "/spec"
    if name in project.providers:
        shared = _engine_shared_with(project, name)
        if shared is not None:
            message = (
                f"provider '{name}' (built in) keeps its engine in the data folder of provider "
                f"'{shared}', which runs every batch there on its own upstream: declare "
                f"'{name}' in batchspec.yaml with `options: {{dataDir: state/local-{name}}}`, "
                f"or give '{shared}' a dataDir of its own"
            )
            problems.append(Problem.at(doc.location(pointer), pointer, "shared-engine", message))
        return name
    hint = suggest(name, project.providers)
    known = ", ".join(sorted(project.providers))
    tail = f"did you mean '{hint}'?" if hint else f"known: {known}; declare it in batchspec.yaml"
    message = f"unknown provider '{name}' ({tail})"
    problems.append(Problem.at(doc.location(pointer), pointer, "unknown-provider", message))
    return None


#: the completion windows each provider type takes, shortest and longest (docs/providers.md,
#: "Limits per remote batch"); a type not here is not checked: Anthropic and Gemini run in a
#: window of their own whatever is asked, Mistral clamps it (``timeout_hours``), and an
#: OpenAI-compatible proxy (``litellmProvider``) takes what the provider behind it takes
COMPLETION_WINDOWS: dict[str, tuple[str, str]] = {
    "openai": ("24h", "24h"),
    "azure": ("24h", "24h"),
    "together": ("24h", "24h"),
    "local": ("24h", "24h"),
    "groq": ("24h", "7d"),
    # Mistral's timeout_hours (1-168): a longer window was sent as 168 h, silently shorter
    "mistral": ("1h", "7d"),
}


def _windows_known(provider: ProviderConfig) -> bool:
    """Whether ``COMPLETION_WINDOWS`` speaks for the service behind ``provider``: ``openai``
    is any OpenAI-compatible API (a LiteLLM proxy, Groq's, a gateway), checked only at
    OpenAI's own address; a LiteLLM route (``litellmProvider``, ``litellmModel``) takes what
    the service behind it takes."""
    if any(provider.options.get(key) for key in ("litellmProvider", "litellmModel")):
        return False
    if provider.type == "openai":
        return (provider.base_url or "").rstrip("/") == DEFAULT_OPENAI_BASE_URL
    return True


def _hours(window: str) -> int:
    return int(window[:-1]) * (24 if window.endswith("d") else 1)


def _check_window(
    doc: YamlDocument, spec: Mapping[str, Any], provider: ProviderConfig, problems: list[Problem]
) -> None:
    """A ``completionWindow`` the provider's type refuses at create, found before anything is
    uploaded (the provider said so only after the upload, at the create)."""
    window = spec.get("completionWindow")
    bounds = COMPLETION_WINDOWS.get(provider.type)
    if not isinstance(window, str) or bounds is None or not _windows_known(provider):
        return
    if not re.fullmatch(r"[0-9]+[hd]", window):
        return  # the schema has reported it
    shortest, longest = bounds
    if shortest == longest:  # a single window is matched as written: "1d" is refused
        if window == shortest:
            return
    elif _hours(shortest) <= _hours(window) <= _hours(longest):
        return
    takes = f"only {shortest}" if shortest == longest else f"{shortest} to {longest}"
    message = (
        f"completionWindow {window} is not one provider '{provider.name}' (type "
        f"{provider.type}) takes: it takes {takes}"
    )
    pointer = "/spec/completionWindow"
    problems.append(Problem.at(doc.location(pointer), pointer, "completion-window", message))


def _engine_shared_with(project: Project, name: str) -> str | None:
    """The declared ``type: local`` provider whose engine folder the built-in ``local``
    (``name``) would share, if any (two declared ones are the project file's problem)."""
    own = project.providers[name]
    if name != "local" or own.type != "local":
        return None
    folder = own.options.get("dataDir")
    return next(
        (
            other.name
            for other in project.providers.values()
            if other.name != name
            and other.type == "local"
            and other.options.get("dataDir") == folder
        ),
        None,
    )


def _rendered_input(
    doc: YamlDocument,
    spec: Mapping[str, Any],
    raw: Mapping[str, Any],
    project: Project,
    folder: Path,
    problems: list[Problem],
) -> RenderedInput | None:
    """Render a rows input (``{rows, id, body}``) into the state folder's render cache."""
    # Imported here: Jinja2 costs about 30 ms to import, a tenth of loading a warm workspace
    # of 1,000 manifests, and only rows inputs need it.
    from batchspec.workspace.templates import (
        PARQUET_EXTRA,
        compile_request_template,
        parquet_available,
        render_rows,
        rows_format,
    )

    pointer = "/spec/input"
    rows, body, id_template = raw.get("rows"), raw.get("body"), raw.get("id")
    endpoint, model = spec.get("endpoint"), spec.get("model")
    if not (
        isinstance(rows, str)
        and rows
        and isinstance(body, Mapping)
        and isinstance(endpoint, str)
        and (id_template is None or isinstance(id_template, str))
        and (model is None or isinstance(model, str))
    ):
        return None  # the schema has reported it
    found: list[Problem] = []
    rows_path = _input_path(rows, folder)
    rows_pointer = f"{pointer}/rows"
    if not rows_path.is_file():
        what = "not found" if not rows_path.exists() else "not a file"
        message = f"rows file {what}: {display_path(rows_path)}"
        if what == "not found":
            message += f" ({_not_found_hint(rows)})"
        found.append(Problem.at(doc.location(rows_pointer), rows_pointer, "missing-input", message))
    elif rows_format(rows_path) is None:
        message = (
            f"rows file {display_path(rows_path)} must end in .csv (with a header row), "
            ".jsonl or .ndjson (one JSON object a line) or .parquet"
        )
        found.append(Problem.at(doc.location(rows_pointer), rows_pointer, "rows-format", message))
    elif rows_format(rows_path) == "parquet" and not parquet_available():
        message = (
            f"rows file {display_path(rows_path)} is Parquet, which needs pyarrow: {PARQUET_EXTRA}"
        )
        found.append(Problem.at(doc.location(rows_pointer), rows_pointer, "missing-extra", message))
    if "model" not in body and model is None and endpoint != "/v1/moderations":
        body_pointer = f"{pointer}/body"
        message = "the request body has no `model`: add one to the body or set spec.model"
        found.append(Problem.at(doc.location(body_pointer), body_pointer, "missing-model", message))
    template, syntax = compile_request_template(
        body=body,
        id_template=id_template,
        endpoint=endpoint,
        model=model,
        pointer=pointer,
        locate=doc.location,
    )
    found.extend(syntax)
    rendered = None
    if template is not None and not found:
        rendered, row_problems = render_rows(
            template, rows_path, project.state_path.parent / RENDERED_FOLDER
        )
        found.extend(row_problems)
    problems.extend(found)
    return rendered


def _input_path(value: Any, folder: Path) -> Path:
    """The input file a manifest's ``spec.input`` names (a path, relative to the manifest)."""
    return (folder / str(value)).resolve()


class _PathResolver:
    """``(folder / relative).resolve()`` for one load, each folder's symlinks resolved once
    (``FolderResolver``), and the project's confinement rules resolved once."""

    def __init__(self) -> None:
        self._paths = FolderResolver(keep_modes=True)
        self._confinement: _Confinement | None = None
        self._blocking: dict[str, Path | None] = {}

    def blocking_file(self, folder: Path) -> Path | None:
        """``_blocking_file(folder)``, found once a load per folder."""
        key = str(folder)
        if key not in self._blocking:
            self._blocking[key] = _blocking_file(folder)
        return self._blocking[key]

    def confinement(self, project: Project) -> _Confinement:
        """The project's confinement rules, resolved once for this load."""
        if self._confinement is None:
            self._confinement = _Confinement(project)
        return self._confinement

    def folder(self, path: Path) -> Path:
        return Path(self._paths.folder(path))

    def is_dir(self, path: Path) -> bool:
        """``os.path.isdir(path)`` for a path just resolved: from the lstat its resolution
        took (not a symlink, so the same answer), else asked anew."""
        known, mode = self._paths.taken_mode(path)
        if known:
            return mode is not None and stat.S_ISDIR(mode)
        return os.path.isdir(path)

    def __call__(self, folder: Path, relative: str) -> Path:
        return self._paths.resolve(os.path.join(folder, relative))


#: said with a missing input: the usual slip is a path written from the workspace root
RELATIVE_TO_MANIFEST = "a manifest's paths are relative to the manifest's own folder"


#: what ``Path.exists()`` takes for "not there" rather than raising
_NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)


def _stat_if_there(path: Path) -> os.stat_result | None:
    """``path.stat()``, or None where ``path.exists()`` would say False."""
    try:
        return os.stat(path)
    except OSError as err:
        if err.errno in _NOT_THERE:
            return None
        raise
    except ValueError:  # an unrepresentable path (an embedded NUL)
        return None


def _input_hash(
    doc: YamlDocument,
    path: Path,
    hash_input: Callable[[Path], str],
    problems: list[Problem],
    *,
    raw: str = "",
) -> str | None:
    pointer = "/spec/input"
    found = _stat_if_there(path)  # one stat, not ``exists()`` and ``is_file()``'s two
    if found is None:
        reason = f"input file not found: {display_path(path)} ({_not_found_hint(raw)})"
    elif not stat.S_ISREG(found.st_mode):
        reason = f"input is not a file: {display_path(path)}"
    else:
        try:
            return hash_input(path)
        except (OSError, BatchspecError) as err:
            reason = (
                f"cannot read input {display_path(path)}: {getattr(err, 'strerror', None) or err}"
            )
    problems.append(Problem.at(doc.location(pointer), pointer, "missing-input", reason))
    return None


def _retry(data: Mapping[str, Any]) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=data.get("maxAttempts", DEFAULT_MAX_ATTEMPTS),
        on=tuple(data.get("on", RETRYABLE_FAILURES)),
    )


def _limits(data: Mapping[str, Any]) -> Limits:
    return Limits(
        max_requests_per_batch=data.get("maxRequestsPerBatch"),
        max_bytes_per_batch=data.get("maxBytesPerBatch"),
        max_embedding_inputs_per_batch=data.get("maxEmbeddingInputsPerBatch"),
    )


def _budget(data: Mapping[str, Any] | None, default: Budget | None) -> Budget | None:
    if data is None:
        return default
    return budget_from(data).overlay(default)


# ---------------------------------------------------------------------------------------------
# Across documents


def _resource_name(doc: YamlDocument) -> str | None:
    """``metadata.name`` of a Batch document, if it is a string."""
    data = doc.data if isinstance(doc.data, Mapping) else {}
    metadata = data.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return name if data.get("kind") == "Batch" and isinstance(name, str) else None


def _name_of(doc: YamlDocument) -> list[tuple[str, SourceLocation]]:
    name = _resource_name(doc)
    return [] if name is None else [(name, doc.location("/metadata/name"))]


def _duplicate_names(names: list[tuple[str, SourceLocation]]) -> list[Problem]:
    first: dict[str, SourceLocation] = {}
    problems = []
    for name, loc in names:
        if name in first:
            message = f"resource name '{name}' is used twice: at {first[name]} and at {loc}"
            problems.append(Problem.at(loc, "/metadata/name", "duplicate-name", message))
        else:
            first[name] = loc
    return problems


def _conflicting_moves(resources: list[tuple[Resource, YamlDocument]]) -> list[Problem]:
    """A move must name a recorded name nobody else claims: not its own, not a live one."""
    declared = {res.name: res for res, _ in resources}
    movers: dict[str, Resource] = {}
    problems = []
    pointer = "/metadata/moved/from"
    for res, doc in resources:
        old = res.moved_from
        if old is None:
            continue
        message = None
        if old == res.name:
            message = f"'{res.name}' cannot move from its own name; remove `moved`"
        elif old in declared:
            message = (
                f"'{res.name}' moves from '{old}', but '{old}' is still declared at "
                f"{declared[old].source}; rename or remove that resource first"
            )
        elif movers.setdefault(old, res) is not res:
            message = (
                f"'{res.name}' and '{movers[old].name}' ({movers[old].source}) both move "
                f"from '{old}'; only one resource can take over its history"
            )
        if message:
            problems.append(Problem.at(doc.location(pointer), pointer, "invalid-move", message))
    return problems


@dataclass(frozen=True)
class _Claim:
    """A file a resource outside the loaded manifests reads or writes (``_outside_paths``)."""

    name: str  # the resource's name
    key: str  # input, rows, output, errors or export
    doc: YamlDocument
    pointer: str


@dataclass(frozen=True)
class _Outside:
    """The names and files of the workspace's resources that PATHS left out."""

    claims: Mapping[Path, _Claim]
    names: Sequence[tuple[str, SourceLocation]]
    unlisted: tuple[Path, ...] = ()  # loaded files the globs do not find


def _outside_paths(
    targets: Sequence[str],
    project: Project,
    loaded: Sequence[Path],
    resolve: _PathResolver,
    manifest_cache: ManifestCache | None,
) -> _Outside:
    """The names and the input, rows, output, errors and export files of the workspace's
    resources that PATHS left out, so that ``batchspec apply manifests/a.yaml`` cannot write
    over the input of a resource declared in ``b.yaml``, nor run a name ``b.yaml`` declares
    too (confinement and unique names hold for the whole workspace, whatever PATHS were
    given). Empty when PATHS is the workspace root (the usual run: no second scan).

    Only names and paths are worked out (nothing is hashed or rendered); a document too
    broken to name its paths claims none: its own problems are reported when it is loaded.
    """
    root = project.root.resolve()
    if all(not is_glob(t) and Path(t).resolve() == root for t in targets):
        return _Outside({}, ())
    files, _, _ = find_manifest_files([str(root)], project)
    seen = set(_resolved_files(loaded))
    listed = _resolved_files(files)
    unlisted = tuple(f for f in loaded if f not in listed and f.resolve() not in listed)
    claims: dict[Path, _Claim] = {}
    names: list[tuple[str, SourceLocation]] = []
    for file in files:
        if file in seen or file.resolve() in seen:
            continue
        recalled = manifest_cache.recall(file) if manifest_cache is not None else None
        documents, file_problems = (
            (recalled, []) if recalled is not None else read_yaml_documents(file)
        )
        if not_batchspec(file, documents, file_problems):
            continue
        for doc in documents:
            names.extend(_name_of(doc))
            try:
                found = _claimed_paths(doc, resolve)
            except (OSError, ValueError):  # a path no load could resolve: its own problem
                continue
            for path, claim in found:
                claims.setdefault(path, claim)
    return _Outside(claims, names, unlisted)


def _claimed_paths(doc: YamlDocument, resolve: _PathResolver) -> list[tuple[Path, _Claim]]:
    """What one document reads (input or rows file) and writes (output, errors, exports),
    resolved as its load would resolve them."""
    name = _resource_name(doc)
    spec = doc.data.get("spec") if isinstance(doc.data, Mapping) else None
    if name is None or not isinstance(spec, Mapping):
        return []
    folder = resolve.folder(doc.file.parent)
    found: list[tuple[str, str, Any]] = []
    raw_input = spec.get("input")
    if isinstance(raw_input, str):
        found.append(("input", "/spec/input", raw_input))
    elif isinstance(raw_input, Mapping):
        found.append(("input", "/spec/input/rows", raw_input.get("rows")))
    output = spec.get("output", f"results/{name}.jsonl")
    found.append(("output", "/spec/output", output))
    for i, entry in enumerate(spec.get("export") or []):
        if isinstance(entry, Mapping):
            found.append(("export", f"/spec/export/{i}/path", entry.get("path")))
    claims = [
        (resolve(folder, value), _Claim(name, key, doc, pointer))
        for key, pointer, value in found
        if isinstance(value, str) and value
    ]
    errors = spec.get("errors")
    if isinstance(errors, str) and errors:
        claims.append((resolve(folder, errors), _Claim(name, "errors", doc, "/spec/errors")))
    elif errors is None and isinstance(output, str) and output:
        beside = errors_beside(resolve(folder, output))
        claims.append((beside, _Claim(name, "errors", doc, "/spec/output")))
    return claims


def _written_over(
    resources: list[tuple[Resource, YamlDocument]],
    manifest_files: Sequence[Path],
    others: Mapping[Path, _Claim] | None = None,
) -> list[Problem]:
    """No resource writes another's input or rows file, a loaded manifest, or a file another
    resource writes too (that problem names both places). ``others``: the files of the
    workspace's resources outside the loaded manifests (``_outside_paths``)."""
    others = others or {}
    # each input's reader: its resource, document and pointer (located only for a problem)
    inputs: dict[Path, tuple[Resource, YamlDocument, str]] = {}
    for res, doc in resources:
        if res.input_source is not None:
            inputs.setdefault(res.input_source, (res, doc, "/spec/input/rows"))
        else:
            inputs.setdefault(res.input_path, (res, doc, "/spec/input"))
    manifests = _resolved_files(manifest_files)
    # where each path is written first: its resource, document, key and pointer (positions
    # and shown paths are worked out only for a problem: a thousand resources have none)
    writers: dict[Path, tuple[Resource, YamlDocument, str, str]] = {}
    problems = []
    for res, doc in resources:
        written = [("output", res.output_path, "/spec/output")]
        written.append(("errors", res.errors_path, "/spec/errors"))
        written += [("export", t.path, f"/spec/export/{i}/path") for i, t in enumerate(res.exports)]
        for key, path, pointer in written:
            message = None
            reader = inputs.get(path)
            first = writers.setdefault(path, (res, doc, key, pointer))
            outside = others.get(path)
            if reader is not None and reader[0] is not res:
                message = (
                    f"{key} file {display_path(path)} is the input of resource "
                    f"'{reader[0].name}' ({reader[1].location(reader[2])}): it would be "
                    "overwritten"
                )
            elif path in manifests:
                message = f"{key} file {display_path(path)} is a manifest: it would be overwritten"
            # Same name: the duplicate-name problem already says it, and better.
            elif first[0] is not res and first[0].name != res.name:
                message = (
                    f"{key} file {display_path(path)} is written by two resources: "
                    f"'{first[0].name}' (its {first[2]}, at {first[1].location(first[3])}) and "
                    f"'{res.name}' (its {key}, at {doc.location(pointer)})"
                )
            elif outside is not None and outside.name != res.name:
                where = outside.doc.location(outside.pointer)
                message = (
                    f"{key} file {display_path(path)} is the input of resource "
                    f"'{outside.name}' ({where}): it would be overwritten"
                    if outside.key == "input"
                    else f"{key} file {display_path(path)} is written by two resources: "
                    f"'{outside.name}' (its {outside.key}, at {where}) and "
                    f"'{res.name}' (its {key}, at {doc.location(pointer)})"
                )
            if message:
                here = doc.location(pointer)
                problems.append(Problem.at(here, pointer, "path-conflict", message))
    return problems


def _resolved_files(files: Sequence[Path]) -> set[Path]:
    """``files`` resolved (as ``Path.resolve`` does), each folder resolved once."""
    paths = FolderResolver()
    resolved = set()
    for file in files:
        try:
            resolved.add(paths.resolve(file))
        except RuntimeError:  # a symlink loop (pathlib before 3.13): no file, its own path
            resolved.add(file.absolute())
    return resolved
