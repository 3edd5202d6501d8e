"""The ``validate`` use-case: are the manifests and every batch input they name valid?

``validate_paths(paths)`` is ``batchspec validate``: paths that are all batch input files
(``.jsonl``) are checked as such (``validate_input_files``: each streamed once with the input
scanner, every problem with its line; no workspace needed, nothing parsed as YAML);
otherwise ``validate_workspace(paths)``. Mixing the two is a usage error.

``validate_workspace(paths)`` loads the workspace
(``batchspec.workspace.manifest.load_workspace``) and
scans each resource's input once (``batchspec.wire.inputs.scan_batch_input``) with the resource's
endpoint and model, Anthropic's ``custom_id`` rule and line forms (and what cannot be
converted for it) for ``anthropic`` providers and Azure's
unversioned line URLs for ``azure`` ones. It reads files and writes nothing: no state, no
network, no output files (loading a rows input renders it into the render cache under the
state folder, which is only a cache).

Failures carry every problem at once, each a ``Problem`` (file, line, column, pointer, code,
message), so the CLI can print them or render them as JSON:

- manifest and project problems: ``InvalidManifestError`` (a ``ManifestError``);
- input problems of *all* resources together: ``InvalidInputError`` (an ``InputError``),
  each as ``input-file:line: message``; per file, the first ``inputs.MAX_SHOWN`` are listed
  and one more line counts the rest. A problem in the rendered file of a rows input is
  reported at the rows file instead (rendered line N is row N), as ``rows-file:line: row N:
  message``, so it points at data the user can edit.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from batchspec.core.sharding import ShardLimits, first_line_over, shard_limits
from batchspec.errors import BatchspecError, InputError, UsageError
from batchspec.providers.flavours import flavour_of
from batchspec.wire.inputs import (
    InputReport,
    naming_the_resource,
    rules_for_provider,
    scan_batch_input,
)
from batchspec.workspace.manifest import (
    Resource,
    Workspace,
    load_workspace,
    missed_manifests_warnings,
    require_resources,
    unlisted_manifests_warnings,
)
from batchspec.workspace.templates import row_lines
from batchspec.workspace.yamldoc import Problem, SourceLocation

# "line N" in a problem about a rendered file means row N of the rows file.
_RENDERED_LINE = re.compile(r"\bline (\d+)")


@dataclass(frozen=True)
class ValidatedResource:
    """A valid resource and what the scan of its input found."""

    name: str
    source: SourceLocation
    provider: str
    endpoint: str
    model: str | None
    input_path: Path
    requests: int
    bytes: int
    sha256: str
    models: tuple[str, ...]
    input_source: Path | None = None  # the rows file of a rows input (input_path is rendered)


@dataclass(frozen=True)
class ValidationReport:
    root: Path
    project_file: Path | None
    manifest_files: tuple[Path, ...]
    resources: tuple[ValidatedResource, ...]
    problems: tuple[Problem, ...] = ()  # always empty when returned: problems are raised
    #: what is valid but likely not meant (a manifest the project's globs do not find)
    warnings: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return not self.problems


#: what ``batchspec validate`` treats as a batch input file rather than a manifest
BATCH_INPUT_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class InputFilesReport:
    """``batchspec validate FILE.jsonl ...``: what the scan of each batch input found."""

    inputs: tuple[InputReport, ...]


def validate_paths(paths: Sequence[str | Path] = ()) -> ValidationReport | InputFilesReport:
    """``batchspec validate``: batch input files, or a workspace's manifests and inputs."""
    inputs = [p for p in paths if Path(p).suffix.lower() in BATCH_INPUT_SUFFIXES]
    if not inputs:
        return validate_workspace(paths)
    if len(inputs) != len(paths):
        raise UsageError(
            "give either batch input files (.jsonl) or manifests, folders and globs, not both"
        )
    return validate_input_files(inputs)


def validate_input_files(paths: Sequence[str | Path]) -> InputFilesReport:
    """Scan each batch input file (streamed, never parsed as YAML); raise every problem.

    With no manifest there is no endpoint or model to hold lines to: each file must use one
    url and one model throughout (the first line's), as a batch requires.
    """
    reports: list[InputReport] = []
    problems: list[Problem] = []
    count = 0
    for raw in paths:
        path = Path(raw)
        reason = _not_a_regular_file(path)
        if reason is not None:
            problems.append(Problem(path, None, None, "", "unreadable", reason))
            count += 1
            continue
        report = scan_batch_input(path)
        problems.extend(input_problems(report, path))
        count += report.problem_count
        reports.append(report)
    if problems:
        raise InvalidInputError(problems, count=count)
    return InputFilesReport(tuple(reports))


def _not_a_regular_file(path: Path) -> str | None:
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        return f"cannot read the batch input: {err.strerror or err}"
    if not stat.S_ISREG(mode):
        return "not a regular file: refusing to read it as a batch input"
    return None


class InvalidInputError(InputError):
    """Batch inputs have problems; ``problems`` holds every one of them."""

    def __init__(self, problems: Sequence[Problem], *, count: int | None = None) -> None:
        ordered = tuple(dict.fromkeys(problems))
        count = len(ordered) if count is None else count  # may exceed the problems listed
        noun = "problem" if count == 1 else "problems"
        super().__init__(
            f"{count} {noun} in batch inputs; nothing was changed. Fix "
            f"{'it' if count == 1 else 'them'} and run `batchspec validate` again.",
            details=[str(p) for p in ordered],
        )
        self.problems: tuple[Problem, ...] = ordered


def validate_workspace(paths: Sequence[str | Path] = ()) -> ValidationReport:
    """Validate manifests and inputs under ``paths``; raise listing every problem found."""
    # The scan below hashes each input while validating it; hashing it here as well would
    # read every input twice. The workspace's spec hashes are not used by validate.
    workspace = load_workspace(paths, hash_input=_not_hashed)
    require_resources(workspace, paths)
    scans: dict[tuple[object, ...], InputReport] = {}
    resources: list[ValidatedResource] = []
    problems: list[Problem] = []
    counted: dict[Path, int] = {}  # problems per input file, shown or not
    for res in workspace.resources:
        try:
            report = _scan(res, workspace, scans)
        except InputError as err:  # unreadable file: a problem like any other
            problems.append(Problem(res.input_path, None, None, "", "unreadable", err.message))
            counted[res.input_path] = 1
            continue
        problems.extend(resource_input_problems(report, res))
        if report.ok:
            too_large = batch_size_problems(res, shard_limits(workspace, res))
            problems.extend(too_large)
            report_count = len(too_large)
        else:
            report_count = report.problem_count
        counted[res.input_path] = max(counted.get(res.input_path, 0), report_count)
        resources.append(_validated(res, report))
    if problems:
        raise InvalidInputError(problems, count=sum(counted.values()))
    project = workspace.project
    return ValidationReport(
        root=project.root,
        project_file=project.file,
        manifest_files=workspace.manifest_files,
        resources=tuple(resources),
        warnings=(
            *unlisted_manifests_warnings(workspace),
            *missed_manifests_warnings(workspace, paths),
        ),
    )


def input_problems(report: InputReport, path: Path) -> list[Problem]:
    """The report's problems as located ``Problem``s, plus one counting those not shown."""
    problems = [Problem(path, p.line, None, "", p.code, p.message) for p in report.problems]
    hidden = report.problem_count - len(report.problems)
    if hidden:
        problems.append(Problem(path, None, None, "", "more-problems", f"... and {hidden} more"))
    return problems


def resource_input_problems(report: InputReport, res: Resource) -> list[Problem]:
    """``input_problems`` for a resource, each held to its endpoint or model naming it; a
    rows input's are located in its rows file."""
    problems = input_problems(naming_the_resource(report, res.declared_where), res.input_path)
    if res.input_source is None:
        return problems
    lines = row_lines(res.input_source, [p.line for p in problems if p.line is not None])
    return [_at_row(p, res.input_source, lines) for p in problems]


def rows_problem_lines(report: InputReport, res: Resource) -> list[str]:
    """``resource_input_problems`` as text lines (``rows-file:line: row N: message``)."""
    return [str(p) for p in resource_input_problems(report, res)]


def _at_row(problem: Problem, rows_path: Path, lines: dict[int, int | None]) -> Problem:
    """A problem of rendered line N, moved to row N of the rows file."""
    message = _RENDERED_LINE.sub(r"row \1", problem.message)
    if problem.line is None:
        return Problem(rows_path, None, None, "", problem.code, f"rendered requests: {message}")
    line = lines.get(problem.line)
    return Problem(rows_path, line, None, "", problem.code, f"row {problem.line}: {message}")


def batch_size_problems(res: Resource, limits: ShardLimits) -> list[Problem]:
    """A request line too large for one remote batch (``maxBytesPerBatch``): sharding would
    give it a batch of its own, over the limit, that the provider refuses after the upload.
    A rows input's is located at its row, as its other problems are."""
    found = first_line_over(res.input_path, limits.max_bytes)
    if found is None:
        return []
    others = found.count - 1
    problem = Problem(
        res.input_path,
        found.line,
        None,
        "",
        "line_over_batch_limit",
        f"the request is {found.size:,} bytes, more than maxBytesPerBatch "
        f"({limits.max_bytes:,} bytes) for resource {res.name}: it fits no batch; raise the "
        "limit or shorten it"
        + (
            f" ({others:,} more line{'s' if others > 1 else ''} over it too, the largest "
            f"{found.largest:,} bytes)"
            if others
            else ""
        ),
    )
    if res.input_source is None:
        return [problem]
    return [_at_row(problem, res.input_source, row_lines(res.input_source, [found.line]))]


def problems_of(err: BatchspecError) -> tuple[Problem, ...]:
    """Every problem an error carries; one without a list becomes a single problem."""
    problems = getattr(err, "problems", None)
    if problems:
        return tuple(problems)
    message = "; ".join([err.message, *err.details])
    return (Problem(None, None, None, "", "error", message),)


def _scan(
    res: Resource, workspace: Workspace, scans: dict[tuple[object, ...], InputReport]
) -> InputReport:
    config = workspace.project.providers[res.provider]
    kind = config.type
    options = {
        "endpoint": res.endpoint,
        "model": res.model,
        # Anthropic's and Together's custom_id rules come with their flavour
        **rules_for_provider(
            kind, custom_id_pattern=flavour_of(kind).custom_id_pattern, options=config.options
        ),
    }
    key = (res.input_path, *options.values())
    if key not in scans:  # two resources over one file with the same rules: scan it once
        scans[key] = scan_batch_input(res.input_path, **options)
    return scans[key]


def _validated(res: Resource, report: InputReport) -> ValidatedResource:
    return ValidatedResource(
        name=res.name,
        source=res.source,
        provider=res.provider,
        endpoint=res.endpoint,
        model=res.model,
        input_path=res.input_path,
        requests=report.requests,
        bytes=report.bytes,
        sha256=report.sha256,
        models=report.models,
        input_source=res.input_source,
    )


def _not_hashed(path: Path) -> str:
    return ""
