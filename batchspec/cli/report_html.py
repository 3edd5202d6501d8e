"""``batchspec report`` as one self-contained HTML page: a pure function of a ``WorkspaceReport``.

Promises: the page loads nothing (inline CSS, inline SVG charts, one tiny inline script; a
Content-Security-Policy of ``default-src 'none'`` lets only that script, by its hash, run);
every string that comes from a user (resource names, reasons, paths, git branches, hosts,
event details) is escaped, and a CI link is a link only when it is http(s). Every figure is
also in a ``data-*`` attribute in machine form (``data-cost-usd=""``: unknown price), so a
test can hold the page to ``status --json``, ``history --json`` and ``history --by commit
--json`` (rows ``tr.resource``, ``tr.run``, ``tr.commit``). An unknown price is shown
as "unknown price", never $0.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

from batchspec.cli.render import dollars
from batchspec.core.history import CommitSpend, HistoryEntry
from batchspec.core.report import WorkspaceReport
from batchspec.core.spend import Usage
from batchspec.core.status import ResourceStatus

#: runs the page shows, newest first; the marker lets a test see that the script ran
_SCRIPT = """
document.querySelectorAll("time[datetime]").forEach(function (t) {
  var d = new Date(t.getAttribute("datetime"));
  if (!isNaN(d)) { t.title = d.toLocaleString(); }
});
document.body.setAttribute("data-report-ready", "yes");
"""

_CSS = """
:root { --ok:#2e9d5b; --bad:#d1453b; --wip:#e0a526; --mute:#8a94a6; --ink:#1d2433;
  --line:#e4e8ef; --in:#4c78c8; --out:#9bb8ea; --cost:#7b5cc4; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
  margin: 0; background: #f5f7fa; }
header { background: var(--ink); color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header p { margin: 4px 0 0; color: #b9c2d3; font-size: 12px; }
main { padding: 20px 32px 40px; max-width: 1200px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 16px 20px; margin-bottom: 18px; }
h2 { font-size: 15px; margin: 0 0 12px; }
.cards { display: flex; gap: 14px; flex-wrap: wrap; margin-bottom: 18px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 18px; min-width: 150px; }
.card b { display: block; font-size: 22px; }
.card span { color: var(--mute); font-size: 12px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--mute); font-weight: 500; font-size: 12px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
  color: #fff; background: var(--mute); }
.Healthy, .Synced { background: var(--ok); }
.Degraded, .OutOfSync, .Orphaned { background: var(--bad); }
.Progressing, .Pending { background: var(--wip); }
.bar { display: flex; height: 10px; width: 160px; background: var(--line);
  border-radius: 5px; overflow: hidden; margin-top: 4px; }
.bar i { display: block; height: 100%; }
.small { color: var(--mute); font-size: 12px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 18px; }
code { font-size: 12px; }
details summary { cursor: pointer; color: var(--mute); font-size: 12px; }
details ul { margin: 4px 0; padding-left: 18px; font-size: 12px; }
svg text { font: 11px system-ui, sans-serif; fill: var(--ink); }
"""


def report_html(report: WorkspaceReport) -> str:
    """The whole page."""
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    body = "\n".join(
        [
            _header(report),
            "<main>",
            _cards(report),
            _resources_table(report.resources),
            _charts(report),
            _commits(report.commits),
            _audit_trail(report.runs),
            "</main>",
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{escape(csp)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>batchspec report</title>\n<style>{_CSS}</style></head>\n"
        f"<body>\n{body}\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _cost_attr(cost: float | None) -> str:
    return "" if cost is None else repr(round(cost, 6))


def _usage_attrs(usage: Usage) -> str:
    return (
        f'data-input-tokens="{usage.input_tokens}" data-output-tokens="{usage.output_tokens}" '
        f'data-cost-usd="{_cost_attr(usage.cost_usd)}"'
    )


def _time(at: str | None) -> str:
    if not at:
        return ""
    return f'<time datetime="{_e(at)}">{_e(at[:19].replace("T", " "))}</time>'


def _header(report: WorkspaceReport) -> str:
    return (
        "<header><h1>batchspec report</h1>"
        f"<p>generated {_time(report.generated_at)} UTC &middot; {len(report.resources)} "
        f"resources &middot; last {len(report.runs)} runs</p></header>"
    )


def _cards(report: WorkspaceReport) -> str:
    health: dict[str, int] = {}
    for s in report.resources:
        health[s.health] = health.get(s.health, 0) + 1
    total = report.usage
    cards = [
        (str(len(report.resources)), "resources"),
        (str(health.get("Healthy", 0)), "healthy"),
        (str(health.get("Progressing", 0) + health.get("Pending", 0)), "progressing"),
        (str(health.get("Degraded", 0)), "degraded"),
        (f"{total.input_tokens + total.output_tokens:,}", "tokens (current generations)"),
        _spent(report.resources),
    ]
    items = "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for v, k in cards)
    warn = ""
    if report.skipped:
        warn = (
            f'<p class="small">{len(report.skipped)} manifest problem(s): their resources are '
            "shown from the state only (`batchspec validate` says more)</p>"
        )
    return (
        f'<div class="cards" data-total-cost-usd="{_cost_attr(total.cost_usd)}">{items}</div>{warn}'
    )


def _spent(resources: Sequence[ResourceStatus]) -> tuple[str, str]:
    """The spend card: with an unknown price somewhere, the known part as a lower bound."""
    known = sum(s.usage.cost_usd or 0.0 for s in resources)
    unknown = sum(1 for s in resources if s.usage.cost_usd is None)
    if not unknown:
        return dollars(known), "spent (current generations)"
    label = f"spent; {unknown} resource(s) at unknown price"
    return (f"\u2265 {dollars(known)}" if known else "unknown price"), label


def _progress_bar(s: ResourceStatus) -> str:
    if not s.requests:
        return ""
    ok = 100 * s.succeeded / s.requests
    bad = 100 * s.failed / s.requests
    return (
        f'<div class="bar" title="{s.succeeded} succeeded, {s.failed} failed of {s.requests}">'
        f'<i style="width:{ok:.1f}%;background:var(--ok)"></i>'
        f'<i style="width:{bad:.1f}%;background:var(--bad)"></i></div>'
    )


def _resources_table(resources: Sequence[ResourceStatus]) -> str:
    if not resources:
        return '<section><h2>Resources</h2><p class="small">No resources.</p></section>'
    rows = []
    for s in resources:
        u = s.usage
        progress = f"{s.succeeded:,} ok, {s.failed:,} failed of {s.requests:,}{_progress_bar(s)}"
        if s.health == "Missing" and s.earlier is not None:  # an edited spec: see status
            e = s.earlier
            progress = (
                f'not applied yet<div class="small">generation {e.id} (an earlier spec, '
                f"{_e(e.status)}): {e.succeeded:,} ok, {e.failed:,} failed of {e.requests:,}</div>"
            )
        rows.append(
            f'<tr class="resource" data-resource="{_e(s.name)}" data-sync="{_e(s.sync)}" '
            f'data-health="{_e(s.health)}" data-requests="{s.requests}" '
            f'data-succeeded="{s.succeeded}" data-failed="{s.failed}" {_usage_attrs(u)}>'
            f'<td><b>{_e(s.name)}</b><div class="small">{_e(s.provider)}</div></td>'
            f'<td><span class="badge {_e(s.sync)}">{_e(s.sync)}</span></td>'
            f'<td><span class="badge {_e(s.health)}">{_e(s.health)}</span></td>'
            f"<td>{progress}</td>"
            f'<td class="num">{u.input_tokens:,} in<br>{u.output_tokens:,} out</td>'
            f'<td class="num">{_e(dollars(u.cost_usd))}</td>'
            f'<td class="small">{_e(s.action)}: {_e(s.reason)}<br><code>{_e(s.output)}</code></td>'
            "</tr>"
        )
    head = (
        "<tr><th>resource</th><th>sync</th><th>health</th><th>progress</th>"
        '<th class="num">tokens</th><th class="num">cost</th><th>next step</th></tr>'
    )
    return f"<section><h2>Resources</h2><table>{head}{''.join(rows)}</table></section>"


# ---------------------------------------------------------------------------------------------
# Charts: inline SVG, a <title> on each bar for the exact figure.


def _hbars(
    title: str,
    rows: Sequence[tuple[str, float, float, str]],
    legend: str,
    fill: str = "var(--in)",
) -> str:
    """Horizontal bars, each split in two parts (input/output tokens, or cost and nothing)."""
    if not rows:
        return f'<div><h2>{_e(title)}</h2><p class="small">Nothing recorded yet.</p></div>'
    top = max((a + b for _, a, b, _ in rows), default=0) or 1
    label_w, bar_w, row_h = 150, 260, 22
    parts = []
    for i, (name, a, b, text) in enumerate(rows):
        y = i * row_h
        wa, wb = bar_w * a / top, bar_w * b / top
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_e(name[:22])}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{wa:.1f}" height="14" rx="2" '
            f'fill="{fill}"><title>{_e(name)}: {_e(text)}</title></rect>'
            f'<rect x="{label_w + wa:.1f}" y="{y + 4}" width="{wb:.1f}" height="14" rx="2" '
            f'fill="var(--out)"><title>{_e(name)}: {_e(text)}</title></rect>'
            f'<text x="{label_w + wa + wb + 6:.1f}" y="{y + 15}">{_e(text)}</text>'
        )
    height = len(rows) * row_h + 4
    return (
        f'<div><h2>{_e(title)}</h2><p class="small">{legend}</p>'
        f'<svg role="img" aria-label="{_e(title)}" width="{label_w + bar_w + 130}" '
        f'height="{height}" viewBox="0 0 {label_w + bar_w + 130} {height}">'
        f"{''.join(parts)}</svg></div>"
    )


_PALETTE = ("#4c78c8", "#e0803a", "#2e9d5b", "#b05cc4", "#d1453b", "#3aa6b9", "#c9a227", "#7a8699")

#: one stacked column: its label under the axis, its text on hover, and (resource, value)
#: parts, a value None being an unknown price
Column = tuple[str, str, Sequence[tuple[str, float | None]]]


def _columns(
    title: str, columns: Sequence[Column], colours: dict[str, str], unit: Callable[[float], str]
) -> str:
    """Stacked vertical bars, oldest run on the left, one colour per resource."""
    if not columns:
        return f'<div><h2>{_e(title)}</h2><p class="small">No run used tokens yet.</p></div>'
    totals = [sum(v or 0 for _, v in parts) for _, _, parts in columns]
    top = max(totals) or 1
    col_w = max(14, min(70, 440 // len(columns)))
    plot_h, base, left = 140, 170, 64
    width = left + col_w * len(columns) + 10
    parts_svg = [
        f'<line x1="{left}" y1="{base}" x2="{width}" y2="{base}" stroke="#c8ced8"/>',
        f'<line x1="{left}" y1="{base - plot_h}" x2="{width}" y2="{base - plot_h}" '
        'stroke="#eef1f5"/>',
        f'<text x="{left - 6}" y="{base - plot_h + 4}" text-anchor="end">{_e(unit(top))}</text>',
        f'<text x="{left - 6}" y="{base + 4}" text-anchor="end">0</text>',
    ]
    for i, ((label, text, parts), total) in enumerate(zip(columns, totals, strict=True)):
        x, y = left + i * col_w + 5, float(base)
        for resource, value in parts:
            h = plot_h * (value or 0) / top
            fill = colours.get(resource, _PALETTE[-1]) if value is not None else "#c8ced8"
            shown = "unknown price" if value is None else unit(value)
            y -= max(h, 1.5)
            parts_svg.append(
                f'<rect x="{x}" y="{y:.1f}" width="{col_w - 10}" height="{max(h, 1.5):.1f}" '
                f'fill="{fill}"><title>{_e(text)}, {_e(resource)}: {_e(shown)}</title></rect>'
            )
        unknown = any(v is None for _, v in parts)
        middle = x + (col_w - 10) / 2
        if col_w >= 30:  # room for the run's number under it and its figure above it
            parts_svg.append(
                f'<text x="{middle}" y="{base + 14}" text-anchor="middle">{_e(label)}</text>'
                f'<text x="{middle}" y="{y - 4:.1f}" text-anchor="middle" font-size="9">'
                f"{'?' if unknown else _e(unit(total))}</text>"
            )
    return (
        f'<div><h2>{_e(title)}</h2><p class="small">each run, oldest first (hover for details); '
        f'grey: unknown price</p><svg role="img" aria-label="{_e(title)}" width="{width}" '
        f'height="{base + 22}" viewBox="0 0 {width} {base + 22}">{"".join(parts_svg)}</svg></div>'
    )


def _short_dollars(value: float) -> str:
    return f"${value:.2g}" if value < 1 else f"${value:,.0f}"


def _short_tokens(value: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.0f}"


def _charts(report: WorkspaceReport) -> str:
    names = [s.name for s in report.resources]
    for entry in report.runs:
        names += [n for n in entry.usage_by_resource() if n not in names]
    colours = {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(names)}
    used = [s for s in report.resources if s.usage.tokens]
    tokens = [
        (
            s.name,
            float(s.usage.input_tokens),
            float(s.usage.output_tokens),
            f"{s.usage.input_tokens + s.usage.output_tokens:,} tokens",
        )
        for s in used
    ]
    cost = [(s.name, s.usage.cost_usd or 0.0, 0.0, dollars(s.usage.cost_usd)) for s in used]
    chronological = [e for e in reversed(report.runs) if e.usage.tokens]
    per_run_cost: list[Column] = []
    per_run_tokens: list[Column] = []
    for e in chronological:
        split = e.usage_by_resource()
        text = f"run {e.run.id} ({e.run.command}, {e.run.started_at[:16].replace('T', ' ')})"
        per_run_cost.append((str(e.run.id), text, [(n, u.cost_usd) for n, u in split.items()]))
        per_run_tokens.append(
            (
                str(e.run.id),
                text,
                [(n, float(u.input_tokens + u.output_tokens)) for n, u in split.items()],
            )
        )
    legend = (
        '<span style="color:var(--in)">&#9632;</span> input '
        '<span style="color:var(--out)">&#9632;</span> output'
    )
    resources = " ".join(
        f'<span style="color:{c}">&#9632;</span> {_e(n)}' for n, c in colours.items()
    )
    return (
        '<section><div class="charts">'
        + _hbars("Tokens per resource", tokens, legend)
        + _hbars("Dollars per resource", cost, "current generation, batch prices", "var(--cost)")
        + _columns("Dollars per run", per_run_cost, colours, _short_dollars)
        + _columns("Tokens per run", per_run_tokens, colours, _short_tokens)
        + f'</div><p class="small">runs by resource: {resources}</p></section>'
    )


# ---------------------------------------------------------------------------------------------
# Spend per git commit


def _commit_cell(c: CommitSpend) -> str:
    if c.commit is None:
        return f'<b>{_e(c.label)}</b><div class="small">runs outside a git repository</div>'
    dirty = ' <span class="small">+ uncommitted changes</span>' if c.dirty else ""
    branches = f'<div class="small">on {_e(", ".join(c.branches))}</div>' if c.branches else ""
    return f'<code title="{_e(c.commit)}">{_e(c.commit[:10])}</code>{dirty}{branches}'


def _commits(commits: Sequence[CommitSpend]) -> str:
    title = "Spend per git commit"
    if not commits:
        return f'<section><h2>{title}</h2><p class="small">No results recorded yet.</p></section>'
    rows = []
    for c in commits:
        u = c.usage
        runs = ", ".join(map(str, c.runs))
        resources = "<br>".join(
            f"{_e(name)}: {_e(dollars(ru.cost_usd))}" for name, ru in c.by_resource.items()
        )
        rows.append(
            f'<tr class="commit" data-commit="{_e(c.commit)}" '
            f'data-dirty="{"true" if c.dirty else "false"}" data-generations="{c.generations}" '
            f'data-runs="{_e(runs)}" {_usage_attrs(u)}>'
            f"<td>{_commit_cell(c)}</td>"
            f'<td class="num">{c.generations}</td><td class="small">{_e(runs)}</td>'
            f'<td class="small">{resources}</td>'
            f'<td class="num">{u.input_tokens:,} in<br>{u.output_tokens:,} out</td>'
            f'<td class="num">{_e(dollars(u.cost_usd))}</td></tr>'
        )
    head = (
        '<tr><th>git commit</th><th class="num">generations</th><th>created by runs</th>'
        '<th>per resource</th><th class="num">tokens</th><th class="num">cost</th></tr>'
    )
    note = (
        '<p class="small">each generation is charged to the commit of the run that created '
        "it (not of the run that collected it); a tree with uncommitted changes, and runs "
        "outside git, are groups of their own</p>"
    )
    return f"<section><h2>{title}</h2>{note}<table>{head}{''.join(rows)}</table></section>"


# ---------------------------------------------------------------------------------------------
# The audit trail


def _git(entry: HistoryEntry) -> str:
    run = entry.run
    if not run.git_commit:
        return '<span class="small">not in git</span>'
    dirty = ' <span class="small">(uncommitted changes)</span>' if run.git_dirty else ""
    branch = f' <span class="small">on {_e(run.git_branch)}</span>' if run.git_branch else ""
    return f'<code title="{_e(run.git_commit)}">{_e(run.git_commit[:10])}</code>{branch}{dirty}'


def _ci(entry: HistoryEntry) -> str:
    run = entry.run
    if not run.ci_system:
        return ""
    url = run.ci_run_url or ""
    if url.startswith(("https://", "http://")):
        return f'<br><a class="small" href="{_e(url)}">{_e(run.ci_system)}</a>'
    return f'<br><span class="small">{_e(run.ci_system)}</span>'


def _event(event: Any) -> str:
    detail = ", ".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in event.detail.items()
    )
    target = f" [{event.resource}]" if event.resource else ""
    return f"<li>{_time(event.at)} <b>{_e(event.action)}</b>{_e(target)} {_e(detail[:300])}</li>"


def _audit_trail(runs: Sequence[HistoryEntry]) -> str:
    if not runs:
        return '<section><h2>Audit trail</h2><p class="small">No runs recorded.</p></section>'
    rows = []
    for entry in runs:
        run, u = entry.run, entry.usage
        code = entry.outcome
        events = "".join(_event(ev) for ev in entry.events)
        rows.append(
            f'<tr class="run" data-run-id="{run.id}" data-git-commit="{_e(run.git_commit)}" '
            f"{_usage_attrs(u)}>"
            f'<td class="num">{run.id}</td><td>{_time(run.started_at)}</td>'
            f'<td><b>{_e(run.command)}</b> <span class="small">{_e(code)}</span>'
            f"<details><summary>{len(entry.events)} events</summary>"
            f"<ul>{events}</ul></details></td>"
            f"<td>{_e(run.user)}@{_e(run.host)}{_ci(entry)}</td><td>{_git(entry)}</td>"
            f'<td class="num">{u.input_tokens:,} in<br>{u.output_tokens:,} out</td>'
            f'<td class="num">{_e(dollars(u.cost_usd)) if u.tokens else ""}</td></tr>'
        )
    head = (
        '<tr><th class="num">run</th><th>started (UTC)</th><th>command</th><th>who</th>'
        '<th>git commit</th><th class="num">tokens</th><th class="num">cost</th></tr>'
    )
    return f"<section><h2>Audit trail</h2><table>{head}{''.join(rows)}</table></section>"
