"""Turning library results into text for people and JSON for machines.

Pure functions from frozen results to ``str`` or JSON-able ``dict``; no printing, no click.
Paths are shown relative to the working directory when they lie below it, as in messages.
Sizes use decimal units (1 KB = 1000 bytes), like the providers' documented limits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchspec import __version__
from batchspec.cli.colour import PLAIN, Style
from batchspec.core.batches import requests_done
from batchspec.core.reporting import format_size
from batchspec.wire.batch_status import TERMINAL_STATUSES
from batchspec.workspace.yamldoc import NAMES_SHOWN, Problem, display_path, name_listing

if TYPE_CHECKING:  # rendering needs the shapes, not the machinery behind them
    from batchspec.core.apply import ApplyResult
    from batchspec.core.budget import Estimate
    from batchspec.core.history import CommitSpend, HistoryEntry
    from batchspec.core.lifecycle import ForgetResult, ImportResult
    from batchspec.core.plan import Drain, Plan
    from batchspec.core.planfile import PlanResult
    from batchspec.core.spend import Usage
    from batchspec.core.state_move import MigrateResult
    from batchspec.core.status import ResourceStatus
    from batchspec.core.validate import InputFilesReport, ValidatedResource, ValidationReport
    from batchspec.errors import BatchspecError
    from batchspec.state.lock import HeldLock
    from batchspec.state.transfer import StateCopy


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def report_written_text(output: object, resources: int, runs: int) -> str:
    """What ``batchspec report`` says once it wrote its page."""
    return f"Wrote {output} ({_plural(resources, 'resource')}, {_plural(runs, 'run')})."


# ---------------------------------------------------------------------------------------------
# validate


def validation_text(report: ValidationReport | InputFilesReport) -> str:
    """``2 resources valid:`` then one line per resource with its request count and size."""
    from batchspec.core.validate import InputFilesReport

    if isinstance(report, InputFilesReport):
        return _input_files_text(report)
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


def _input_files_text(report: InputFilesReport) -> str:
    lines = []
    for scan in report.inputs:
        models = ", ".join(scan.models) or "no model"
        urls = ", ".join(scan.urls) or "no url"
        lines.append(
            f"{display_path(Path(scan.path))}: valid batch input "
            f"({_plural(scan.requests, 'request')}, {format_size(scan.bytes)}): {urls} {models}"
        )
    return "\n".join(lines)


def validation_json(report: ValidationReport | InputFilesReport) -> dict[str, Any]:
    from batchspec.core.validate import InputFilesReport

    if isinstance(report, InputFilesReport):
        return {
            "valid": True,
            "inputs": [
                {
                    "file": display_path(Path(scan.path)),
                    "requests": scan.requests,
                    "bytes": scan.bytes,
                    "sha256": scan.sha256,
                    "models": list(scan.models),
                    "urls": list(scan.urls),
                }
                for scan in report.inputs
            ],
            "problems": [],
        }
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


# ---------------------------------------------------------------------------------------------
# plan, apply progress, status, history


_SYMBOLS = {
    "create": "+",
    "replace": "-/+",
    "refresh": "~",
    "collect": "<",
    "retry": "+",
    "restore": "<",
    "none": "=",
    "orphaned": "?",
    "prune": "-",
}


def plan_text(
    plan: Plan,
    style: Style = PLAIN,
    selection: Sequence[str] = (),
    *,
    unchanged: bool = True,
    unlisted_hint: str = "",
) -> str:
    """A Terraform-style plan: one line per resource, then a summary line.

    With ``unchanged=False`` (plan or apply without ``--verbose``) resources with nothing to
    do get no line: a no-op run over a fleet says "No changes" rather than list each one.
    ``unlisted_hint`` (plan's) adds one line counting them and saying how to list them;
    apply gives none, its summary counts them. With an enabled ``style`` the symbol and
    action are in the action's colour."""
    lines = []
    unlisted = 0
    for action in plan.actions:
        kind = action.kind.value
        if not unchanged and action.leaves_alone:
            unlisted += 1
            continue
        symbol = style.action(kind, f"{_SYMBOLS[kind]:>3}")
        name, verb = style.bold(action.resource), style.action(kind, kind)
        line = f"  {symbol} {name}: {verb} ({action.reason})"
        if action.spends:
            shards = f" in {action.shards:,} shards" if action.shards > 1 else ""
            tokens = action.estimated_input_tokens
            line += f": {_plural(action.requests, 'request')} to submit{shards}" + (
                f", ~{tokens:,} input tokens" if action.requests else ""
            )
            line += f" on {action.provider}"
        lines.append(line)
    if not plan.actions:
        lines.append("  no resources selected")
    if unlisted and unlisted_hint and lines:  # with none listed, "No changes: ..." says it
        lines.append(f"  ({_plural(unlisted, 'resource')} in sync, not listed: {unlisted_hint})")
    return "\n".join([*lines, *([""] if lines else []), style.bold(plan_summary(plan, selection))])


def nothing_selected(selection: Sequence[str] = ()) -> str:
    """Why plan or apply has no resource: ``--select`` matched none (only ``state:modified``
    can, when nothing is to do; PATHS holding no manifest are refused before a plan)."""
    if not selection:
        return "no resource selected"
    text = f"no resource matches --select {', '.join(selection)}"
    if any(s.strip() == "state:modified" for s in selection):
        text += " (apply has nothing to do for any resource)"
    return text


def plan_summary(plan: Plan, selection: Sequence[str] = ()) -> str:
    counts = plan.counts()
    if not plan.actions:
        return f"No changes: {nothing_selected(selection)}."
    if not plan.has_changes:
        orphans = counts.get("orphaned", 0)
        if not orphans:
            return "No changes: every resource is in sync."
        rest = "; every other resource is in sync." if counts.get("none") else "."
        return (
            f"No changes: {_plural(orphans, 'orphaned resource')} left alone "
            f"(`apply --prune` cancels and forgets them){rest}"
        )
    parts = [
        f"{counts[k]} to {k}"
        for k in ("create", "replace", "retry", "refresh", "collect", "restore", "prune")
        if counts.get(k)
    ]
    moves = sum(a.moves for a in plan.actions)
    if moves:  # besides what each does (a pure rename does nothing else)
        parts.append(f"{moves} to move")
    text = "Plan: " + ", ".join(parts) + "."
    spending = plan.spending
    if spending:
        requests = sum(a.requests for a in spending)
        tokens = sum(a.estimated_input_tokens for a in spending)
        text += f" {_plural(requests, 'request')} to submit"
        text += f" (~{tokens:,} input tokens)" if requests else ""  # no estimate for nothing
        reused = sum(a.reused for a in spending)
        text += f"; {reused:,} keep a recorded answer." if reused else "."
    return text


#: resources the text plan's spend estimate names before it counts the rest (without -v)
COSTS_SHOWN = 10


def plan_costs(result: PlanResult, *, every: bool = True) -> str:
    """The spend estimate under a text plan: per resource and in total, as upper bounds.

    Without ``every`` (plan without ``--verbose``) past ``COSTS_SHOWN`` resources it names
    the costliest (an unknown price first: it may be any amount) and counts the rest with
    their sum: a fleet's estimate was a line per new resource under a line per new resource.
    """
    if not result.estimates:
        return ""
    return "\n".join(["", *estimate_lines(result.estimates, every=every)])


def estimate_lines(estimates: Mapping[str, Estimate], *, every: bool = True) -> list[str]:
    """``plan_costs``'s lines (apply's prompt shows them too)."""
    lines = [
        "Estimated spend (input ~4 bytes/token; output at each request's max_tokens, "
        "its model's most where unset):"
    ]
    shown = list(estimates.items())
    if not every and len(shown) > COSTS_SHOWN:
        shown.sort(key=lambda item: -math.inf if item[1].cost_usd is None else -item[1].cost_usd)
        shown = shown[:COSTS_SHOWN]
    for name, e in shown:
        lines.append(
            f"  {name}: ~{e.input_tokens:,} input + ≤ {e.max_output_tokens:,} output tokens, "
            f"{_upper(e.cost_usd)}" + (f" ({e.price_source})" if e.price_source else "")
        )
    rest = [e for name, e in estimates.items() if name not in dict(shown)]
    if rest:
        costs = [e.cost_usd for e in rest]
        sum_of_rest = None if None in costs else sum(c or 0.0 for c in costs)
        lines.append(
            f"  … and {len(rest):,} more, {_upper(sum_of_rest)} together "
            "(`plan --verbose` lists every one)"
        )
    lines.append(f"  total: {_upper(_total_cost(estimates))}")
    unpriced = sorted(
        {e.model or "several models" for e in estimates.values() if e.cost_usd is None}
    )
    if unpriced:  # say where a price goes: "unknown price" alone left a new user guessing
        lines.append(
            f"  unknown price: no price is known for {', '.join(unpriced)}; give it under the "
            "provider's `pricing` in batchspec.yaml (USD per million input and output tokens, "
            "per model or '*')"
        )
    return lines


def plan_drains(result: PlanResult) -> str:
    """The retired batches apply drains, one line per resource under a text plan (nothing
    when there are none): read-only, they spend nothing."""
    if not result.drains:
        return ""
    lines = [
        "",
        "Earlier batches apply polls or looks up, and keeps what they finished "
        "(no spend, no change):",
    ]
    for name, drains in _by_resource(result.drains).items():
        pruned = " (pruned)" if drains[0].pruned else ""
        batches = "; ".join(
            f"{d.remote_id or 'a create not confirmed'} of {d.retired} generation "
            f"{d.generation_id} ({d.status}): {d.step}"
            for d in drains
        )
        lines.append(f"  {name}{pruned}: {batches}")
    return "\n".join(lines)


def _by_resource(drains: Sequence[Drain]) -> dict[str, list[Drain]]:
    grouped: dict[str, list[Drain]] = {}
    for drain in drains:
        grouped.setdefault(drain.resource, []).append(drain)
    return grouped


def _upper(cost: float | None) -> str:
    return "unknown price" if cost is None else f"≤ {dollars(cost)}"


def _total_cost(estimates: Mapping[str, Estimate]) -> float | None:
    costs = [e.cost_usd for e in estimates.values()]
    return None if any(c is None for c in costs) else sum(c or 0.0 for c in costs)


def plan_consent(result: PlanResult) -> str:
    """The line under a text plan saying apply will ask consent to spend (nothing when it
    will not: a free provider, or nothing to submit or cancel)."""
    if not result.needs_consent:
        return ""
    actions = [a for a in result.plan.actions if a.resource in set(result.needs_consent)]
    providers = sorted({a.provider or "?" for a in actions})
    verb = "spends" if any(a.spends for a in actions) else "cancels batches"
    return (
        f"\nConsent: `apply` asks before it {verb} on {', '.join(providers)}, which may charge "
        f"({name_listing(result.needs_consent)}); where nobody can answer (CI) give it --yes, "
        "or apply this plan saved with --out."
    )


def plan_notes(result: PlanResult) -> list[str]:
    """What apply would refuse (budgets) and may fail on (API keys), for stderr."""
    return [f"Error: {r}" for r in result.refusals] + [f"Warning: {w}" for w in result.warnings]


def plan_result_json(result: PlanResult) -> dict[str, Any]:
    return {
        "serial": result.serial,
        "spec_hashes": dict(result.spec_hashes),
        **result.plan.to_json(),
        "refusals": list(result.refusals),
        "warnings": list(result.warnings),
        "estimates": {name: e.to_json() for name, e in result.estimates.items()},
        "drains": [d.to_json() for d in result.drains],
        "needs_consent": list(result.needs_consent),
        "estimated_max_cost_usd": (
            None if (cost := _total_cost(result.estimates)) is None else round(cost, 6)
        ),
    }


PLAN_MARKDOWN_MARKER = "<!-- batchspec-plan -->"
#: characters a markdown plan's two tables may take in all: GitHub refuses a comment over
#: 65,536 (GitLab's limit is larger), and the text around them stays well under the rest
MARKDOWN_TABLES_BUDGET = 56_000


def plan_markdown(result: PlanResult, *, unchanged: bool = True) -> str:
    """A plan for a pull-request comment: summary, a table, and collapsible details.

    The first line is an HTML comment (``PLAN_MARKDOWN_MARKER``) so a CI job can find and
    update its earlier comment instead of adding one per push. With ``unchanged=False``
    (plan without ``--verbose``) the table has a row per resource with a step and one line
    counts the others, as the text plan does: a fleet's comment stays far under a code
    host's comment size limit.
    """
    plan = result.plan
    summary = plan_summary(plan, result.selection)
    lines = [PLAN_MARKDOWN_MARKER, "#### batchspec plan", "", f"**{summary}**", ""]
    if result.estimates:
        lines += [
            f"Estimated spend: {_upper(_total_cost(result.estimates))} (input ~4 bytes/token; "
            "output at each request's max_tokens, its model's most where unset; batch prices)",
            "",
        ]
    if consent := plan_consent(result).strip():
        lines += [_md_cell(consent), ""]
    for refusal in result.refusals:
        lines += [f"> **Apply would refuse this plan:** {_md_cell(refusal)}", ""]
    for warning in result.warnings:
        lines += [f"> **Warning:** {_md_cell(warning)}", ""]
    if result.drains:
        lines += [
            "Earlier batches apply polls or looks up, and keeps what they finished (no spend): "
            + ", ".join(
                f"`{d.resource}` {d.remote_id or 'a create not confirmed'} ({d.status}: {d.step})"
                for d in result.drains
            ),
            "",
        ]
    listed = [a for a in plan.actions if unchanged or not a.leaves_alone]
    room = MARKDOWN_TABLES_BUDGET  # what the two tables may still take
    if listed:
        lines += [
            "| resource | action | reason | requests | est. tokens | est. cost |",
            "|:--|:--|:--|--:|--:|--:|",
        ]
        rows: list[str] = []
        for a in listed:
            requests = f"{a.requests:,}" if a.spends else ""
            tokens = f"~{a.estimated_input_tokens:,}" if a.spends else ""
            estimate = result.estimates.get(a.resource) if a.spends else None
            if estimate is not None:
                tokens += f" in, ≤ {estimate.max_output_tokens:,} out"
            cost = _upper(estimate.cost_usd) if estimate is not None else ""
            symbol = _SYMBOLS[a.kind.value]
            rows.append(
                f"| `{a.resource}` | `{symbol}` {a.kind.value} | {_md_cell(a.reason)} "
                f"| {requests} | {tokens} | {cost} |"
            )
        kept = _within(rows, int(room * 0.8))  # the details table gets the rest
        room -= sum(len(row) + 1 for row in kept)
        lines += kept
    if not plan.actions:
        lines.append("_No resources selected._")
    elif len(listed) < len(plan.actions):
        unlisted = _plural(len(plan.actions) - len(listed), "resource")
        lines += [
            *([""] if listed else []),
            f"_{unlisted} in sync, not listed: `plan --verbose` lists every one._",
        ]
    lines += ["", "<details><summary>Details</summary>", ""]
    selection = ", ".join(f"`{s}`" for s in result.selection) or "all resources"
    lines += [
        f"- selection: {selection}" + (" (with `--prune`)" if result.prune else ""),
        *(
            [f"- replace: {', '.join(f'`{n}`' for n in result.replace)}"]
            + ([] if result.reuse else ["  (`--no-reuse`: every request is sent again)"])
            if result.replace
            else []
        ),
        f"- state serial: {result.serial}",
        f"- batchspec {__version__}",
        "",
    ]
    if plan.actions:
        lines += ["| resource | provider | spec hash | generation |", "|:--|:--|:--|--:|"]
        rows = []
        for a in plan.actions:
            spec = f"`{a.spec_hash[:12]}`" if a.spec_hash else ""
            generation = "" if a.generation_id is None else str(a.generation_id)
            rows.append(f"| `{a.resource}` | {a.provider or ''} | {spec} | {generation} |")
        lines += [*_within(rows, room), ""]
    lines.append("</details>")
    return "\n".join(lines) + "\n"


def _within(rows: list[str], room: int) -> list[str]:
    """The table ``rows`` that fit in ``room`` characters, then a row saying how many were
    left out: a fleet's plan comment stays postable."""
    kept: list[str] = []
    for row in rows:
        room -= len(row) + 1
        if room < 0:
            break
        kept.append(row)
    if len(kept) < len(rows):
        left = _plural(len(rows) - len(kept), "more resource")
        kept.append(
            f"| _… {left}, not shown: the comment stays under a code host's size limit; "
            "`batchspec plan` lists every one_ |"
        )
    return kept


def _md_cell(text: str) -> str:
    """Text that stays inside one markdown table cell and renders no HTML."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def apply_text(
    result: ApplyResult,
    style: Style = PLAIN,
    selection: Sequence[str] = (),
    *,
    verbose: bool = False,
) -> str:
    """Apply's summary: the headline, then the resources something happened to or that need
    a look (all of them with ``verbose``), then the totals over every one.

    A resource the run left alone (planned ``none``) that is Synced and Healthy with nothing
    next is counted, not listed: a no-op apply over 200 resources is a few lines, not 800.
    ``--json`` lists every resource whatever this says."""
    shown = result.statuses if verbose else tuple(_touched(result))
    left_out = len(result.statuses) - len(shown)
    listed, alike = (shown, {}) if verbose else _alike_failures_counted(shown)
    lines = [
        style.bold(apply_headline(result, selection)),
        *(f"  {line}" for line in not_collected_lines(result)),
        *status_lines(listed, style),
    ]
    for first_error, count in alike.items():
        lines.append(
            f"  … and {_plural(count, 'more resource')} Degraded with the same first error "
            f"({first_error}), not listed: `apply --verbose` lists every one"
        )
    if left_out:
        lines.append(
            f"  ({_plural(left_out, 'resource')} in sync and unchanged, not listed: "
            "`apply --verbose` lists every one)"
        )
    lines += totals_lines(result.statuses)
    if result.local_in_flight:
        lines.append(
            f"Note: {name_listing(result.local_in_flight)} "
            f"{'runs' if len(result.local_in_flight) == 1 else 'run'} on the local provider, whose "
            "batches advance only while a batchspec command runs: nothing happens until "
            "`batchspec apply` runs again (`batchspec apply --wait` runs them to the end)."
        )
    return "\n".join(lines)


#: Degraded resources listed per first error in apply's summary; the others are counted
ALIKE_FAILURES_SHOWN = 5


def _alike_failures_counted(
    statuses: Sequence[ResourceStatus],
) -> tuple[list[ResourceStatus], dict[str, int]]:
    """The statuses to list, and how many Degraded ones were left out per first error: past
    ``ALIKE_FAILURES_SHOWN`` with one first error (an upstream down for a whole fleet), the
    rest say nothing the first ones did not, 300 times over."""
    listed: list[ResourceStatus] = []
    seen: dict[str, int] = {}
    for s in statuses:
        # ``custom_id: code: message``: alike when all but their request's id are
        key = s.first_error.partition(": ")[2] if s.health == "Degraded" and s.first_error else None
        if key:
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > ALIKE_FAILURES_SHOWN:
                continue
        listed.append(s)
    return listed, {
        k: n - ALIKE_FAILURES_SHOWN for k, n in seen.items() if n > ALIKE_FAILURES_SHOWN
    }


def _touched(result: ApplyResult) -> Iterator[ResourceStatus]:
    """The statuses apply's summary lists without ``--verbose``: every resource the plan had
    a step for, or that is not Synced and Healthy with nothing next, or not collected."""
    acted = {a.resource for a in result.plan.actions if not a.leaves_alone}  # moved, too
    failed = {f.resource for f in result.not_collected}
    for s in result.statuses:
        unchanged = s.sync == "Synced" and s.health == "Healthy" and s.action == "none"
        if s.name in acted or s.name in failed or not unchanged:
            yield s


def apply_headline(result: ApplyResult, selection: Sequence[str] = ()) -> str:
    """The first line of apply's summary: its outcome in words (also the ``message`` of the
    ``--json`` result)."""
    headline = {
        "converged": "Apply complete: every selected resource is in sync.",
        "in_progress": "Apply done for now: batches are in flight. "
        "Run `batchspec apply` again (or with --wait) to collect.",
        "degraded": "Apply finished with resources Degraded: some requests failed for good "
        "(not retryable, or out of attempts); the errors files hold them.",
        "timeout": "Apply stopped at --timeout before every resource was in sync.",
        "replace_refused": "",
        "not_collected": "",
    }[result.outcome]
    if result.outcome == "degraded" and result.timed_out:
        headline = (
            "Apply stopped at --timeout with resources Degraded: some requests failed for "
            "good (not retryable, or out of attempts; the errors files hold them), and other "
            "resources were not in sync yet."
        )
    if result.outcome == "not_collected":
        headline = not_collected_text(result)
    if result.outcome == "replace_refused":  # apply again would refuse them again
        headline = replace_refused_text(result)
    if not result.plan.actions:
        headline = f"Apply did nothing: {nothing_selected(selection)}."
    return headline


def some_names(names: Sequence[str]) -> str:
    """``a, b, c``, or the first ``NAMES_SHOWN`` and how many more: a fleet's headline stays
    one readable line (the per-resource lines above it name every one)."""
    if len(names) <= NAMES_SHOWN:
        return ", ".join(names)
    return f"{', '.join(names[:NAMES_SHOWN])} and {len(names) - NAMES_SHOWN:,} more"


def replace_refused_text(result: ApplyResult) -> str:
    """Why apply exits 1 without replacing: also what `apply --quiet` says on stderr."""
    refused = [s.name for s in result.statuses if s.action == "replace"]
    return (
        f"Apply did not replace {some_names(refused)}: the spec changed while a generation "
        "is in flight. Re-run with --allow-replace to cancel it and submit the new spec."
    )


def not_collected_text(result: ApplyResult) -> str:
    """Why apply exits 1 after a failed download: also what `apply --quiet` says on stderr."""
    names = list(dict.fromkeys(f.resource for f in result.not_collected))
    return (
        f"Apply did not collect {some_names(names)}: downloading the files of finished "
        "batches failed. Nothing was resubmitted; the next `batchspec apply` tries the "
        f"downloads again (`batchspec show {names[0] if len(names) == 1 else 'NAME'}` lists "
        "the failure under its last events)."
    )


def not_collected_lines(result: ApplyResult) -> list[str]:
    """One line per batch whose file could not be downloaded."""
    return [
        f"not collected: {f.resource}: the {f.file} file of batch {f.remote_id}: {f.error}"
        for f in result.not_collected
    ]


def apply_json(result: ApplyResult) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        "outcome": result.outcome,
        "exit_code": result.exit_code,
        "timed_out": result.timed_out,
        "not_collected": [f.to_json() for f in result.not_collected],
        "plan": result.plan.to_json(),
        "resources": [s.to_json() for s in result.statuses],
    }


def error_json(err: BatchspecError) -> dict[str, Any]:
    """What a command asked for JSON writes on stdout when it fails; ``resource`` is the one
    the failure is about (None: the command as a whole)."""
    return {
        "error": type(err).__name__,
        "message": err.message,
        "details": list(err.details),
        "resource": err.resource,
        "exit_code": err.exit_code,
    }


def error_event_json(err: BatchspecError) -> dict[str, Any]:
    """The last NDJSON line of an ``apply --json`` that failed, as on every event."""
    return {"event": "error", **error_json(err)}


def import_text(result: ImportResult) -> str:
    verified = "input verified by sha256" if result.verified else "input NOT verified (--force)"
    return (
        f"imported batch {result.remote_id} ({result.status}, "
        f"{_plural(result.requests, 'request')}) as {result.name} "
        f"generation {result.generation_id}; {verified}.\n"
        "Next: `batchspec apply` polls and collects it."
    )


def state_copy_text(copy: StateCopy, verb: str = "Copied") -> str:
    """The tables copied, with their row counts (checked equal in source and target)."""
    width = max(len(t.table) for t in copy.tables) + 2
    source, target = (_location(label) for label in (copy.source, copy.target))
    lines = [f"{verb} the state {source} to {target}:"]
    lines += [
        f"  {t.table:<{width}}{t.rows:>10,} {'row' if t.rows == 1 else 'rows'}" for t in copy.tables
    ]
    lines.append(f"  {'state_serial':<{width}}{copy.state_serial:>10,}")
    lines.append(
        "Checked: every table's rows and the state serial equal the source's; the source is "
        "unchanged."
    )
    return "\n".join(lines)


def _location(label: str) -> str:
    """A state's label: a URL (already without its password) as it is, a path shortened."""
    return label if "://" in label else display_path(Path(label))


def migrate_text(result: MigrateResult) -> str:
    blobs = result.copy.blobs
    lines = [state_copy_text(result.copy, "Migrated")]
    line = (
        f"Result blobs: {blobs.verified:,} of {blobs.referenced:,} checked by sha256 "
        f"({format_size(blobs.bytes)})"
    )
    if blobs.copied:
        line += f", {blobs.copied:,} copied into the new state's store"
    lines.append(line + ".")
    if blobs.missing:
        lines.append(
            f"Warning: {len(blobs.missing):,} referenced blob(s) are not in this machine's "
            "result store (collected on another runner?): "
            + ", ".join(sha[:12] for sha in blobs.missing[:5])
            + (", …" if len(blobs.missing) > 5 else "")
        )
    return "\n".join([*lines, "", *result.switch])


def forget_text(result: ForgetResult) -> str:
    lines = [f"{result.name} is no longer tracked; its result files were left as they are."]
    if result.left_running:
        lines.append(
            f"{len(result.left_running)} batch(es) keep running at the provider "
            f"(not cancelled): {', '.join(result.left_running)}"
        )
    if result.in_manifests:
        lines.append(
            f"Its manifest is still there: the next apply tracks {result.name} again, "
            "resuming what is recorded for its current spec (no batch is created twice); "
            f"`batchspec apply --replace {result.name}` runs it afresh instead. "
            "Remove the manifest to stop tracking it for good."
        )
    return "\n".join(lines)


def status_lines(statuses: Iterable[ResourceStatus], style: Style = PLAIN) -> list[str]:
    lines = []
    for s in statuses:
        counts = f"{s.succeeded:,}/{s.requests:,} succeeded" + (
            style.paint(f", {s.failed:,} failed", "red") if s.failed else ""
        )
        if s.health == "Missing" and not s.requests:  # nothing recorded ("0/0" says less)
            counts = "not applied yet"
            if s.earlier is not None:  # an edited spec: the earlier one's results are there
                e = s.earlier
                counts = (
                    f"its current spec not applied yet; generation {e.id} (an earlier spec, "
                    f"{e.status}): {e.succeeded:,}/{e.requests:,} succeeded"
                    + (f", {e.failed:,} failed" if e.failed else "")
                )
        answering = sum(
            (b.completed or 0) + (b.failed or 0)
            for b in s.batches
            if b.status not in TERMINAL_STATUSES
        )
        if answering:  # "0/20,000 succeeded" beside a batch at 6,880/20,000 read as no progress
            counts += f" ({answering:,} answered in batches still running, collected as they end)"
        sync, health = style.state(s.sync), style.state(s.health)
        lines.append(f"  {style.bold(s.name)}: {sync}, {health} — {counts}")
        if s.action != "none":
            lines.append(f"      next: {s.action} ({s.reason})")
        elif s.health == "Degraded":
            lines.append(f"      next: {degraded_next(s.name)}")
        if s.usage.tokens:
            lines.append(f"      usage: {usage_text(s.usage)} (current generation)")
        if s.health in ("Healthy", "Degraded") and s.output:
            lines.append(f"      results: {display_path(Path(s.output))}")
            if s.failed and s.errors:
                lines.append(f"      errors:  {display_path(Path(s.errors))}")
                if s.first_error:
                    lines.append(f"      first error: {s.first_error}")
        for b in s.batches:
            done = ""
            if b.total:
                done = f" {requests_done(b.completed, b.failed, b.total):,}/{b.total:,}"
            if b.failed:  # ended is not answered: a cancelled batch's "3/3" is 3 not run
                done += f" ({b.failed:,} failed)"
            if b.remote_id is None and b.status == "pending":
                where = "intent recorded, not yet submitted"
            else:
                where = f"{b.remote_id or '(intent)'} {b.status}{done}"
            lines.append(f"      shard {b.shard} attempt {b.attempt}: {where}")
    return lines


#: problems listed in a warning about skipped manifests; the rest are counted
_WARNING_SHOWN = 5


def skipped_manifests_warning(problems: Sequence[Problem]) -> str:
    """The stderr warning of a read command that went on past broken manifests."""
    count = len(problems)
    noun = "problem" if count == 1 else "problems"
    lines = [
        f"Warning: {count} {noun} in manifests, passed over since this command only reads "
        "(`batchspec validate` lists them all):"
    ]
    lines += [f"  {p}" for p in problems[:_WARNING_SHOWN]]
    if count > _WARNING_SHOWN:
        lines.append(f"  ... and {count - _WARNING_SHOWN} more")
    return "\n".join(lines)


def degraded_next(name: str) -> str:
    """What a Degraded resource with nothing planned waits for: a person, and what to run."""
    return (
        "nothing until you act: the errors file says why each request failed for good; "
        f"fix the cause, then `batchspec apply --replace {name}` sends them again"
    )


def status_text(
    statuses: Sequence[ResourceStatus],
    style: Style = PLAIN,
    locks: Sequence[HeldLock] = (),
    *,
    declared_elsewhere: int = 0,
) -> str:
    none = "No resources."
    if declared_elsewhere:
        none = (
            f"No resources here: the workspace declares {declared_elsewhere} in manifests "
            "outside the paths read (by default the current folder); run from its root, or "
            "give a PATH that holds them."
        )
    lines = list(status_lines(statuses, style)) if statuses else [none]
    return "\n".join([*lines, *totals_lines(statuses), *lock_lines(locks)])


#: the order the totals line counts states in; any other state follows, by name
_STATE_ORDER = ("Synced", "OutOfSync", "Orphaned", "Unknown") + (
    "Healthy",
    "Pending",
    "Progressing",
    "Degraded",
    "Suspended",
    "Missing",
)


def totals_lines(statuses: Sequence[ResourceStatus]) -> list[str]:
    """One closing line over several resources, so the end of a long listing says how the
    whole workspace stands: ``200 resources: 198 Synced, 2 OutOfSync; 199 Healthy, ...``."""
    if len(statuses) < 2:
        return []

    def tally(states: Iterable[str]) -> str:
        seen: dict[str, int] = {}
        for state in states:
            seen[state] = seen.get(state, 0) + 1
        rank = {state: i for i, state in enumerate(_STATE_ORDER)}
        ordered = sorted(seen, key=lambda state: (rank.get(state, len(rank)), state))
        return ", ".join(f"{seen[state]} {state}" for state in ordered)

    succeeded = sum(s.succeeded for s in statuses)
    requests = sum(s.requests for s in statuses)
    failed = sum(s.failed for s in statuses)
    counts = f"{succeeded:,}/{requests:,} requests succeeded" + (
        f", {failed:,} failed" if failed else ""
    )
    sync, health = tally(s.sync for s in statuses), tally(s.health for s in statuses)
    return [f"{_plural(len(statuses), 'resource')}: {sync}; {health}; {counts}"]


def lock_lines(locks: Sequence[HeldLock]) -> list[str]:
    """``Locks:`` and one line per locked resource (``*``: the whole workspace) and holder."""
    if not locks:
        return []
    from batchspec.state.lock import describe_holder, holder_process_gone

    lines = ["", "Locks:"]
    for lock in locks:
        what = "whole workspace" if lock.workspace_wide else lock.resource
        line = f"  {what}: {describe_holder(lock.holder)}"
        if holder_process_gone(lock.holder):  # killed: no `unlock` needed, say so
            line += "; its process is gone: the next run that needs it takes it over"
        lines.append(line)
    return lines


def usage_text(u: Usage) -> str:
    """``1,200 in + 300 out tokens, $0.0012`` (or ``unknown price``)."""
    return f"{u.input_tokens:,} in + {u.output_tokens:,} out tokens, {dollars(u.cost_usd)}"


def dollars(cost: float | None) -> str:
    """A cost for people: ``unknown price`` when it is not known (never $0)."""
    if cost is None:
        return "unknown price"
    return f"${cost:,.4f}" if cost < 1 else f"${cost:,.2f}"


def history_text(
    entries: Sequence[HistoryEntry],
    *,
    events: int | None = None,
    summary: bool = False,
    older: bool = False,
) -> str:
    """Each run on one line, then its events (with ``events``: its last ones, and how many
    earlier ones were left out).

    With ``summary`` (``history`` with no flag) each run's events are counted by action on
    one line instead of listed (30 runs over 200 resources listed ~14,000 lines), and a
    footer says how to list them; ``older``: runs older than those shown exist."""
    if not entries:
        return "No runs recorded."
    lines = []
    for entry in entries:
        lines.append(_run_line(entry))
        if entry.usage.tokens:
            lines.append(f"    usage: {usage_text(entry.usage)}")
        lines += _events_counted(entry) if summary else _events_listed(entry, events)
    footer = []
    if older:
        footer.append(f"Older runs not shown: --limit N shows the newest N ({len(entries)} here).")
    if summary:
        footer.append(
            "Events are counted, not listed: --events N lists each run's last N, --events all "
            "every one, --resource NAME one resource's."
        )
    return "\n".join([*lines, *([""] if footer else []), *footer])


def _run_line(entry: HistoryEntry) -> str:
    run = entry.run
    git = f" @{run.git_commit[:10]}{'*' if run.git_dirty else ''}" if run.git_commit else ""
    ci = f" ({run.ci_run_url or run.ci_system})" if run.ci_system else ""
    return (
        f"run {run.id}  {run.started_at}  {run.command}  {entry.outcome_text}  "
        f"{run.user}@{run.host}{git}{ci}"
    )


def _events_counted(entry: HistoryEntry) -> list[str]:
    """``    2,000 events: 200 intent, 200 upload, ...`` (nothing for a run with none)."""
    counts = entry.event_counts()
    if not counts:
        return []
    by_action = ", ".join(f"{n:,} {action}" for action, n in counts.items())
    return [f"    {_plural(len(entry.events), 'event')}: {by_action}"]


def _events_listed(entry: HistoryEntry, events: int | None) -> list[str]:
    """The run's last ``events`` events (None: all), after how many earlier were left out."""
    lines = []
    shown = entry.last_events(events)
    if len(shown) < len(entry.events):
        left_out = len(entry.events) - len(shown)
        lines.append(f"    ... {left_out:,} earlier event(s) (--events to see more)")
    for event in shown:
        target = f" [{event.resource}]" if event.resource else ""
        lines.append(f"    {event.at}  {event.action}{target}  {_detail_text(event.detail)}")
    return lines


def _detail_text(detail: dict[str, object]) -> str:
    """An event's detail on one line: ``k=v`` pairs, unset values left out, a nested record
    of plain values (a taken-over lock's ``previous`` holder) as ``k=(a=1, b=2)``; lists and
    deeper records only in ``--json``."""
    parts = []
    for key, value in detail.items():
        if isinstance(value, dict):
            if any(isinstance(v, (dict, list)) for v in value.values()):
                continue
            value = f"({_detail_text(value)})"
        elif value is None or isinstance(value, list):
            continue
        elif isinstance(value, bool):  # as `show` and --json write it: false, not False
            value = "true" if value else "false"
        parts.append(f"{key}={_short_hashes(str(value))}")
    return ", ".join(parts)


def commits_text(commits: Sequence[CommitSpend]) -> str:
    """``history --by commit``: one line per commit group, one more per resource."""
    if not commits:
        return "No results recorded yet: spend is counted when batches are collected."
    lines = []
    for c in commits:
        branches = f" on {', '.join(c.branches)}" if c.branches else ""
        runs = ", ".join(map(str, c.runs)) or "unknown"
        noun = "generation" if c.generations == 1 else "generations"
        lines.append(
            f"{c.label}{branches}  {c.generations} {noun} (created by run {runs}): "
            f"{usage_text(c.usage)}"
        )
        for name, usage in c.by_resource.items():
            lines.append(f"    {name or '(no resource)'}: {usage_text(usage)}")
    return "\n".join(lines)


_SHA256 = re.compile(r"\b[0-9a-f]{64}\b")


def _short_hashes(text: str) -> str:
    """sha256 values cut to 12 characters for people (``--json`` keeps them whole)."""
    return _SHA256.sub(lambda m: m.group()[:12], text)
