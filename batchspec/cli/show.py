"""``batchspec show NAME`` for people: a ``ResourceDetail`` as sections of aligned text.

Pure: ``show_text(detail, style)`` returns the page; ``--json``/``--output yaml`` print
``detail.to_json()`` instead. Hashes are cut to 12 characters here (the JSON keeps them
whole), as in ``history``.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from batchspec.cli.colour import PLAIN, Style
from batchspec.cli.render import degraded_next, dollars
from batchspec.core.batches import requests_done

if TYPE_CHECKING:
    from batchspec.core.show import BatchDetail, GenerationDetail, ResourceDetail
    from batchspec.core.spend import Usage

HASH = 12


def _next(d: ResourceDetail) -> str:
    if d.action != "none":
        return f"{d.action} ({d.reason})"
    return degraded_next(d.name) if d.health == "Degraded" else "nothing to do"


def show_text(d: ResourceDetail, style: Style = PLAIN) -> str:
    lines = [
        f"{style.bold(d.name)}: {style.state(d.sync)}, {style.state(d.health)}",
        *_fields(
            [
                ("manifest", d.manifest or "(gone)"),
                ("labels", ", ".join(f"{k}={v}" for k, v in d.labels.items())),
                ("provider", d.provider),
                ("endpoint", d.endpoint),
                ("model", d.model),
                ("input", d.input),
                ("spec hash", _short(d.spec_hash)),
                ("next", _next(d)),
                ("usage", _usage(d.usage, " (all generations)")),
            ]
        ),
    ]
    if not d.tracked:
        lines.append(style.dim("  (not tracked in the state)"))
    lines += ["", style.bold("Results")]
    if not d.results:
        lines.append("  (none: the manifest is gone)")
    for r in d.results:
        where = r.path + ("" if r.exists else style.paint(" (missing)", "red"))
        source = f" from {', '.join(r.from_batches)}" if r.from_batches else ""
        sha = f" sha256 {_short(r.recorded_sha256)}" if r.recorded_sha256 else ""
        lines.append(f"  {r.kind + ':':<8}{where}{sha}{source}")
    lines += ["", style.bold("Generations")]
    if not d.generations:
        lines.append("  (none recorded)")
    for g in d.generations:
        lines += _generation(g, style)
    lines += ["", style.bold("Last events")]
    if not d.events:
        lines.append("  (none)")
    for e in d.events:
        detail = ", ".join(
            f"{k}={_short_value(v)}" for k, v in e.detail.items() if not isinstance(v, dict | list)
        )
        run = f"run {e.run_id}" if e.run_id is not None else "-"
        lines.append(f"  {e.at}  {run:<7} {e.action:<13} {detail}".rstrip())
    return "\n".join(lines)


def _generation(g: GenerationDetail, style: Style) -> list[str]:
    mark = style.paint(" (current)", "cyan") if g.current else ""
    failed = style.paint(f", {g.failed:,} failed", "red") if g.failed else ""
    lines = [
        f"  generation {g.id}{mark}: {g.status}, {g.succeeded:,}/{g.requests:,} succeeded"
        f"{failed}; spec {_short(g.spec_hash)}; created {g.created_at}"
        + (f", completed {g.completed_at}" if g.completed_at else ""),
    ]
    if g.usage.total_tokens or g.usage.input_tokens:
        lines.append(f"    usage: {_usage(g.usage)}")
    lines += [_batch(b) for b in g.batches]
    return lines


def _batch(b: BatchDetail) -> str:
    counts = f" {requests_done(b.completed, b.failed, b.total):,}/{b.total:,}" if b.total else ""
    failed = f" ({b.failed:,} failed)" if b.failed else ""
    when = b.terminal_at or b.submitted_at or b.created_at
    files = ", ".join(
        f"{k} {v}"
        for k, v in (("in", b.input_file_id), ("out", b.output_file_id), ("err", b.error_file_id))
        if v
    )
    reason = f" [{b.reason}]" if b.reason else ""
    head = (
        f"    shard {b.shard} attempt {b.attempt}: {b.remote_id or '(intent)'} "
        f"{b.status}{counts}{failed}{reason} @ {when}"
    )
    return head + (f"\n      files: {files}" if files else "")


def _fields(pairs: list[tuple[str, str | None]]) -> list[str]:
    return [f"  {k + ':':<11}{v}" for k, v in pairs if v]


def _usage(u: Usage, scope: str = "") -> str:
    if not (u.input_tokens or u.output_tokens or u.total_tokens):
        return ""
    return (
        f"{u.input_tokens:,} input + {u.output_tokens:,} output = {u.total_tokens:,} tokens, "
        + dollars(u.cost_usd)
        + scope
    )


def _short(value: str | None) -> str:
    return value[:HASH] if value else ""


_SHA256 = re.compile(r"\b[0-9a-f]{64}\b")


def _short_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return _SHA256.sub(lambda m: m.group()[:HASH], text)
