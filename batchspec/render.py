"""Turning library results into text for people and JSON for machines.

Pure functions from frozen results to ``str`` or JSON-able ``dict``; no printing, no click.
Paths are shown relative to the working directory when they lie below it, as in messages.
Sizes use decimal units (1 KB = 1000 bytes), like the providers' documented limits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from batchspec.yamldoc import Problem, display_path

if TYPE_CHECKING:  # rendering needs the shapes, not the machinery behind them
    from batchspec.validate import ValidatedResource, ValidationReport

_UNITS = ("bytes", "KB", "MB", "GB", "TB")


def format_size(size: int) -> str:
    """``4335`` -> ``"4.3 KB"``; below 1 KB, exact bytes."""
    value = float(size)
    for unit in _UNITS:
        if value < 1000 or unit == _UNITS[-1]:
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


# ---------------------------------------------------------------------------------------------
# validate


def validation_text(report: ValidationReport) -> str:
    """``2 resources valid:`` then one line per resource with its request count and size."""
    if not report.resources:
        return f"No resources found under {display_path(report.root)}."
    lines = [f"{_plural(len(report.resources), 'resource')} valid:"]
    for res in report.resources:
        model = f" {res.model}" if res.model else ""
        lines.append(
            f"  {res.name} ({_plural(res.requests, 'request')}, {format_size(res.bytes)}): "
            f"{res.provider} {res.endpoint}{model}"
        )
    return "\n".join(lines)


def validation_json(report: ValidationReport) -> dict[str, Any]:
    return {
        "valid": report.valid,
        "root": str(report.root),
        "project": str(report.project_file) if report.project_file else None,
        "manifests": [display_path(p) for p in report.manifest_files],
        "resources": [_resource_json(res) for res in report.resources],
        "problems": [problem_json(p) for p in report.problems],
    }


def _resource_json(res: ValidatedResource) -> dict[str, Any]:
    return {
        "name": res.name,
        "source": {
            "file": display_path(res.source.file),
            "line": res.source.line,
            "column": res.source.column,
        },
        "provider": res.provider,
        "endpoint": res.endpoint,
        "model": res.model,
        "input": display_path(res.input_path),
        "requests": res.requests,
        "bytes": res.bytes,
        "sha256": res.sha256,
        "models": list(res.models),
    }


def problems_json(problems: Iterable[Problem]) -> dict[str, Any]:
    """The ``--json`` document of a failed validation."""
    return {"valid": False, "problems": [problem_json(p) for p in problems]}


def problem_json(problem: Problem) -> dict[str, Any]:
    return {
        "file": display_path(problem.file) if problem.file else None,
        "line": problem.line,
        "column": problem.column,
        "pointer": problem.pointer,
        "code": problem.code,
        "message": problem.message,
    }
