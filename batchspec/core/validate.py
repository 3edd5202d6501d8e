"""The ``validate`` use-case: are the manifests and every batch input they name valid?

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

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from batchspec.errors import BatchspecError, InputError
from batchspec.wire.inputs import InputReport, rules_for_provider, scan_batch_input
from batchspec.workspace.manifest import Resource, Workspace, load_workspace
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

    @property
    def valid(self) -> bool:
        return not self.problems


class InvalidInputError(InputError):
    """Batch inputs have problems; ``problems`` holds every one of them."""

    def __init__(self, problems: Sequence[Problem], *, count: int | None = None) -> None:
        ordered = tuple(dict.fromkeys(problems))
        count = len(ordered) if count is None else count  # may exceed the problems listed
        noun = "problem" if count == 1 else "problems"
        super().__init__(
            f"{count} {noun} in batch inputs; nothing was changed. Fix them and run "
            "`batchspec validate` again.",
            details=[str(p) for p in ordered],
        )
        self.problems: tuple[Problem, ...] = ordered


def validate_workspace(paths: Sequence[str | Path] = ()) -> ValidationReport:
    """Validate manifests and inputs under ``paths``; raise listing every problem found."""
    # The scan below hashes each input while validating it; hashing it here as well would
    # read every input twice. The workspace's spec hashes are not used by validate.
    workspace = load_workspace(paths, hash_input=_not_hashed)
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
        counted[res.input_path] = max(counted.get(res.input_path, 0), report.problem_count)
        resources.append(_validated(res, report))
    if problems:
        raise InvalidInputError(problems, count=sum(counted.values()))
    project = workspace.project
    return ValidationReport(
        root=project.root,
        project_file=project.file,
        manifest_files=workspace.manifest_files,
        resources=tuple(resources),
    )


def input_problems(report: InputReport, path: Path) -> list[Problem]:
    """The report's problems as located ``Problem``s, plus one counting those not shown."""
    problems = [Problem(path, p.line, None, "", p.code, p.message) for p in report.problems]
    hidden = report.problem_count - len(report.problems)
    if hidden:
        problems.append(Problem(path, None, None, "", "more-problems", f"... and {hidden} more"))
    return problems


def resource_input_problems(report: InputReport, res: Resource) -> list[Problem]:
    """``input_problems`` for a resource; a rows input's are located in its rows file."""
    problems = input_problems(report, res.input_path)
    if res.input_source is None:
        return problems
    lines = row_lines(res.input_source, [p.line for p in problems if p.line is not None])
    return [_at_row(p, res.input_source, lines) for p in problems]


def rows_problem_lines(report: InputReport, res: Resource) -> list[str]:
    """``resource_input_problems`` as text lines (``rows-file:line: row N: message``)."""
    return [str(p) for p in resource_input_problems(report, res)]


def _at_row(problem: Problem, rows_path: Path, lines: dict[int, int]) -> Problem:
    """A problem of rendered line N, moved to row N of the rows file."""
    message = _RENDERED_LINE.sub(r"row \1", problem.message)
    if problem.line is None:
        return Problem(rows_path, None, None, "", problem.code, f"rendered requests: {message}")
    line = lines.get(problem.line)
    return Problem(rows_path, line, None, "", problem.code, f"row {problem.line}: {message}")


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
    kind = workspace.project.providers[res.provider].type
    options = {"endpoint": res.endpoint, "model": res.model, **rules_for_provider(kind)}
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
