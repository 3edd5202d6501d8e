"""Retry the unresolved requests of a generation: one new attempt per shard that may retry.

A shard is retried while it has unresolved requests, attempts left (``retry.maxAttempts``) and
its requeue backoff has passed. The budget is checked against everything already submitted
plus the new requests, and each attempt is recorded as an intent before the submit step
spends on it (with its own key: resource, spec, shard, attempt).
"""

from __future__ import annotations

from batchspec.core.budget import (
    check_budget,
    line_bound,
    measures_output,
    output_of_unresolved,
    sent_by,
)
from batchspec.core.plan import Action, estimate_input_tokens
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reconcile.hold import retry_held
from batchspec.core.reconcile.intent import record_intent
from batchspec.core.reconcile.submit import submit_queued
from batchspec.core.recorded import is_requeued, recorded_generation
from batchspec.core.replacements import answer_sources, answers_by_stand_in, reuses_answers
from batchspec.state.store import GenerationRow
from batchspec.wire.inputs import InputReport
from batchspec.workspace.manifest import Resource


def retry(ctx: RunContext, res: Resource, facts: InputReport, action: Action) -> bool:
    ctx.ensure_ledger(res, ctx.generation(res))  # the hold reads it
    # a retired batch still stopping may answer what it retries (the hold counts answers
    # drained into any generation: ``record_retries`` carries them over, once)
    if retry_held(ctx, res):
        return False
    return submit_queued(ctx, res, record_retries(ctx, res, facts))


def record_retries(ctx: RunContext, res: Resource, facts: InputReport) -> GenerationRow:
    """Record one new attempt's intent per shard that may retry now (budget checked)."""
    gen = ctx.generation(res)
    ctx.ensure_ledger(res, gen)
    keep_drained_answers(ctx, res, gen)
    rec = recorded_generation(ctx.store, ctx.ledger, gen, requeue_backoff=ctx.requeue_backoff)
    now = ctx.clock()
    ready = [
        s
        for s in rec.shards
        if s.unresolved
        and s.attempts_used < res.retry.max_attempts
        and (s.not_before is None or now >= s.not_before)
    ]
    sent = [b for b in ctx.store.batches(gen.id) if not is_requeued(b)]
    output: dict[int, int] | None = None
    if ready and measures_output(res):  # a dollar budget: the output bound of what is resent
        output = output_of_unresolved(
            ctx.ledger,
            gen.id,
            (s.shard for s in ready),
            res.input_path,
            ctx.request_facts(res, gen.input_sha256),
            line_bound(res, ctx.project.providers),
        )
    check_budget(
        res,
        facts,
        submitted=sum(b.requests for b in sent),
        new=sum(s.unresolved for s in ready),
        providers=ctx.project.providers,
        sent=sent_by(ctx.store, facts, sent) if res.budget is not None else None,
        new_input_tokens=estimate_input_tokens(sum(s.unresolved_bytes for s in ready)),
        new_output_tokens=None if output is None else sum(output.values()),
    )
    latest = ctx.latest_attempts(gen.id)
    for shard in ready:
        attempt = latest.get(shard.shard, 0) + 1
        record_intent(
            ctx,
            res,
            gen,
            shard=shard.shard,
            attempt=attempt,
            requests=shard.unresolved,
            nbytes=shard.unresolved_bytes,
            max_output=None if output is None else output[shard.shard],
            reason=f"retry {shard.unresolved} unresolved request(s) "
            f"(attempt {shard.attempts_used + 1} of {res.retry.max_attempts})",
        )
    return gen


def keep_drained_answers(ctx: RunContext, res: Resource, gen: GenerationRow) -> int:
    """Before a retry: keep for ``gen``'s unresolved requests the answers earlier generations
    have for the very same request lines (``RequestLedger.carry_over``), those that retired
    batches finished after ``gen`` was recorded (``drain``) included, so that a retry never
    pays for them again. Returns how many were kept."""
    if not reuses_answers(gen):  # `apply --replace NAME --no-reuse`: resend every request
        return 0
    stand_in = answers_by_stand_in(gen)
    previous = answer_sources(ctx.store.generations(res.name), stand_in=stand_in, exclude=[gen.id])
    if not previous:
        return 0
    with ctx.store.atomic():
        return ctx.ledger.carry_over(gen.id, previous)
