"""Finding manifest files: the files, folders and glob patterns a command names.

A file is loaded as given; a folder yields the files below it that match the project's
``manifests`` globs (default ``**/*.yaml``, ``**/*.yml``), which are relative to the project
root, so ``validate .`` and ``validate manifests/`` agree; any other argument is a glob
pattern, relative to the working directory. Never loaded as manifests: files named
``batchspec.yaml`` (project files), anything under the state folder, hidden files and
folders, and folders that hold their own ``batchspec.yaml`` (another workspace). Every
document of a manifest must be ``kind: Batch``; empty documents are ignored. A YAML file
found by a folder scan or a glob that is plainly not a batchspec manifest (no document
with ``kind: Batch`` or a ``batchspec/`` apiVersion; see ``not_batchspec``) is skipped;
named as a file, it is reported (a data file, ``.jsonl``, ``.ndjson``, ``.csv`` or
``.parquet``, as one: a batch input given where its manifest goes). Outside any workspace
(no ``batchspec.yaml`` in the first path's folder or above it) nothing is scanned:
``NotAWorkspaceError``.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from batchspec.workspace.project import PROJECT_FILE_NAME, Project, find_project_file
from batchspec.workspace.yamldoc import (
    MAX_YAML_FILE_BYTES,
    Problem,
    YamlDocument,
    display_path,
    read_bounded,
)


def find_manifest_files(
    targets: Sequence[str], project: Project
) -> tuple[list[Path], list[Problem], set[Path]]:
    """Manifest files for ``targets`` (files, folders, globs), in order, each once, and
    which of them were named as files (the rest were found by a glob or a folder scan)."""
    files: dict[Path, None] = {}
    named: set[Path] = set()
    problems: list[Problem] = []
    for target in targets:
        path = Path(target)
        other = find_project_file(start_of(target))
        if not path.exists() and not is_glob(target):
            problems.append(not_found(target))
        elif other is not None and other != project.file:
            message = (
                f"{target} belongs to the workspace of {display_path(other)}, not to that of "
                f"{_project_name(project)}; give one workspace per run"
            )
            problems.append(Problem(None, None, None, "", "other-workspace", message))
        elif path.is_dir():
            files.update(dict.fromkeys(_scan_folder(path.resolve(), project)))
        elif path.is_file() and path.suffix.lower() in DATA_SUFFIXES:
            # `plan data/tickets.jsonl`: read as YAML it was told "not a batchspec manifest
            # ... narrow `manifests:`" and a YAML syntax error, neither of which helps
            message = (
                f"{target}: a data file (a batch input or rows), not a manifest; give the "
                "manifest whose `input` names it, or its folder"
                + (  # `validate FILE.jsonl` scans a batch input on its own (core.validate)
                    " (`batchspec validate FILE.jsonl` checks a batch input alone)"
                    if path.suffix.lower() == ".jsonl"
                    else ""
                )
            )
            problems.append(Problem(None, None, None, "", "data-file", message))
        elif path.is_file() or (path.exists() and not is_glob(target)):
            # Not a regular file (a FIFO, a device): the reader refuses it, with its name.
            if path.name != PROJECT_FILE_NAME:
                files[path.resolve()] = None
                named.add(path.resolve())
        elif is_glob(target):
            matches = _expand_glob(target)
            if not matches:
                problems.append(
                    Problem(None, None, None, "", "not-found", f"{target}: no files match")
                )
            files.update(dict.fromkeys(matches))
    return list(files), problems, named


#: what a file named as a PATH is taken for data by (a manifest is YAML, or JSON as YAML)
DATA_SUFFIXES = frozenset({".jsonl", ".ndjson", ".csv", ".parquet"})

_BATCH_KIND = re.compile(rb"^\s*kind:\s*['\"]?Batch\b", re.MULTILINE)
_TOP_LEVEL_BATCH = re.compile(rb"^kind:\s*['\"]?Batch\b", re.MULTILINE)
_BATCHSPEC_API = re.compile(rb"^apiVersion:\s*['\"]?batchspec/", re.MULTILINE)
#: problems that say a file is hostile or unreadable: reported wherever the file was found
_ALWAYS_REPORTED = frozenset(
    {"unreadable", "not-a-file", "too-large", "encoding", "alias-limit", "too-deep"}
)


def not_batchspec(file: Path, documents: list[YamlDocument], problems: list[Problem]) -> bool:
    """Whether a file found by a glob is plainly not a batchspec manifest (then it is skipped).

    It is one when no document is a mapping with ``kind: Batch`` or a ``batchspec/``
    ``apiVersion`` (or with ``metadata`` and ``spec`` but neither header key); a file with a
    syntax error, when its text mentions neither. A file that
    could not be read (a device, too large, not UTF-8, an alias bomb) is always reported.
    """
    if any(p.code in _ALWAYS_REPORTED for p in problems):
        return False
    if any(_is_batchspec_document(doc) for doc in documents):
        return False
    if not any(p.code == "yaml-syntax" for p in problems):
        return True
    try:
        raw = read_bounded(file, MAX_YAML_FILE_BYTES)
    except Exception:  # unreadable now: let the problems already found speak
        return False
    return b"batchspec" not in raw and _BATCH_KIND.search(raw) is None


def _is_batchspec_document(doc: YamlDocument) -> bool:
    data = doc.data
    if not isinstance(data, Mapping):
        return False
    api_version = data.get("apiVersion")
    if "kind" not in data and "apiVersion" not in data:
        # a Batch whose header lines were lost: skipping it would make `apply --prune`
        # cancel its batches as if its manifest were gone; report the missing header instead
        return isinstance(data.get("metadata"), Mapping) and isinstance(data.get("spec"), Mapping)
    return data.get("kind") == "Batch" or (
        isinstance(api_version, str) and api_version.startswith("batchspec")
    )


def not_found(target: str) -> Problem:
    return Problem(None, None, None, "", "not-found", f"{target}: no such file or folder")


def _project_name(project: Project) -> str:
    return (
        display_path(project.file)
        if project.file
        else f"{display_path(project.root)} (no project file)"
    )


def _scan_folder(folder: Path, project: Project) -> Iterator[Path]:
    """Files below ``folder`` matching the project's globs, pruning what is never a manifest."""
    patterns = [glob_regex(glob) for glob in project.manifest_globs]
    found = [
        here / name
        for relative, here, name in _files_below(folder, project)
        if any(p.fullmatch(relative) for p in patterns)
    ]
    return iter(sorted(found))


def manifests_the_globs_miss(project: Project) -> list[Path]:
    """YAML files of the workspace holding a ``kind: Batch`` document of batchspec that the
    project's globs do not find (one at the root, a ``.yml`` where the globs say ``.yaml``):
    no command reads them unless named as PATHS. Same pruning as a folder scan."""
    patterns = [glob_regex(glob) for glob in project.manifest_globs]
    missed = [
        here / name
        for relative, here, name in _files_below(project.root, project)
        if name.lower().endswith((".yaml", ".yml"))
        and not any(p.fullmatch(relative) for p in patterns)
        and _declares_a_batch(here / name)
    ]
    return sorted(missed)


def _declares_a_batch(file: Path) -> bool:
    try:
        raw = read_bounded(file, MAX_YAML_FILE_BYTES)
    except Exception:  # unreadable or too large: not worth a warning about the globs
        return False
    return _TOP_LEVEL_BATCH.search(raw) is not None and _BATCHSPEC_API.search(raw) is not None


def _files_below(folder: Path, project: Project) -> Iterator[tuple[str, Path, str]]:
    """Each file below ``folder`` as (its path relative to the project root, or to ``folder``
    outside it; its folder; its name), pruning hidden files and folders, the state folder,
    project files and the folders of another workspace."""
    base = project.root if folder.is_relative_to(project.root) else folder
    skipped = {project.root / "state", project.state_path.parent} - {project.root}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and here / d not in skipped
            and not (here / d / PROJECT_FILE_NAME).is_file()  # another workspace
        )
        # (here / name).relative_to(base).as_posix(), its folder part worked out once a
        # folder: pathlib cost ~15 us a file, for every input file beside the manifests too
        prefix = here.relative_to(base).as_posix() + "/" if here != base else ""
        for name in filenames:
            if not name.startswith(".") and name != PROJECT_FILE_NAME:
                yield prefix + name, here, name


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a glob where ``*`` stays within a folder and ``**/`` spans any number."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def is_glob(target: str) -> bool:
    return any(ch in target for ch in "*?[")


def _expand_glob(target: str) -> list[Path]:
    return [
        Path(m).resolve()
        for m in sorted(glob.glob(target, recursive=True))
        if Path(m).is_file() and Path(m).name != PROJECT_FILE_NAME
    ]


def start_of(target: str) -> Path:
    """Where to look for the project of a path or glob: the glob's fixed leading folders."""
    if not is_glob(target):
        return Path(target)
    fixed = []
    for part in Path(target).parts:
        if is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")
