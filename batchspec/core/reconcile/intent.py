"""Record what will be spent before anything is spent: the generation, its ledger, its intents.

Every function here only writes the state store (and shard files: on disk, and in the result
store's shared tier when the state is shared); none calls a provider. It promises the
*intent first* invariant: a batch row (remote id NULL, keyed by ``batch_key``: resource,
spec, shard, attempt) and an ``intent`` event are committed, with the budget checked, before
the submit step uploads or creates anything. Recording an intent whose
key exists already returns the existing row, so a re-run never doubles a batch.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from batchspec.core.batches import batch_key
from batchspec.core.budget import LineBound, check_budget, line_bound, measures_output
from batchspec.core.plan import estimate_input_tokens
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reconcile.recover import Recovered, recovered_rows, take_recovered
from batchspec.core.replacements import answer_sources, answers_by_stand_in, reuses_answers
from batchspec.core.reporting import Progress
from batchspec.core.sharding import (
    ShardWriters,
    copy_shard_spans,
    fits_one_shard,
    indexed_ledger_rows,
    shard_and_write,
    shard_spans,
)
from batchspec.state.store import BatchRow, GenerationRow
from batchspec.wire.inputs import InputReport
from batchspec.wire.request_index import RequestBytes, RequestFact
from batchspec.workspace.manifest import Resource

#: a new generation of this many requests or more writes its ledger after its creates are
#: sent, so they need not wait for the inserts (about 0.13 s per 20,000), keeping a copy of
#: its request index in the result store for a run killed in between; a smaller one writes
#: it with its intents: cheaper than that copy (about 2 ms a generation)
LEDGER_AFTER_CREATE_MIN = 1000


def ensure_generation(ctx: RunContext, res: Resource, facts: InputReport) -> GenerationRow:
    with ctx.store.atomic():
        ctx.upsert_resource(res)
        existing = ctx.store.find_generation(res.name, res.spec_hash)
        # the resource just recorded, and none of its generations has this spec hash
        gen = existing or ctx.store.insert_generation(
            res.name,
            spec_hash=res.spec_hash,
            spec=res.semantic_spec(),
            input_sha256=facts.sha256,
            requests=facts.requests,
            input_bytes=facts.bytes,
            output_path=ctx.relative(res.output_path),
            errors_path=ctx.relative(res.errors_path),
            run_id=ctx.run_id,
        )
        ctx.store.set_current_generation(res.name, gen.id)
        if existing is None:
            ctx.store.record_event(
                ctx.run_id,
                "generation",
                resource=res.name,
                generation_id=gen.id,
                detail={"spec_hash": res.spec_hash, "requests": facts.requests},
            )
    return gen


def record_shards(ctx: RunContext, res: Resource, facts: InputReport, gen: GenerationRow) -> None:
    """Keep the answers an earlier generation has for unchanged requests (recording every
    request in the ledger first), split the rest into shards (writing shard files when the
    input cannot go as it is) and record one attempt-1 intent per shard: one transaction.
    A new generation's ledger is written with its intents, or after its creates are sent
    when it is large (``LEDGER_AFTER_CREATE_MIN``, ``ensure_ledger``).

    The requests come from the input's request index (written by the scan that validated
    it): the input is not parsed again (but for a dollar budget on a generation that keeps
    answers: the requests it sends, to bound their output), and its bytes are read only to
    copy them into shard files, checked against what was validated."""
    limits = ctx.limits_for(res)
    stand_in = answers_by_stand_in(gen)
    previous = answer_sources(ctx.store.generations(res.name), stand_in=stand_in, exclude=[gen.id])
    found = take_recovered(ctx, res)  # answers a lost state forgot (``recover``)
    if not reuses_answers(gen):  # `apply --replace NAME --no-reuse`: resend every request
        previous, found = [], None
    keeps = bool(previous) or (found is not None and bool(found.answers))
    # A file with blank lines is rewritten rather than uploaded as it is: providers
    # differ on whether they accept them.
    single = facts.blank_lines == 0 and fits_one_shard(
        facts.requests, facts.bytes, limits, endpoint=res.endpoint
    )
    # not needed when the input goes as it is: its ledger is written after the create
    index = ctx.request_facts(res, facts.sha256) if keeps or not single else None
    with ctx.store.atomic():
        carried = 0
        if keeps:
            assert index is not None
            ctx.ledger.record_requests(gen.id, indexed_ledger_rows(index))
            carried = ctx.ledger.carry_over(gen.id, previous)
            if found is not None:
                carried += keep_found_answers(ctx, gen, found)
            index = ctx.request_facts(res, facts.sha256)  # a second walk of the index
        if found is not None and (found.kept or found.unreadable):
            record_recovered(ctx, res, gen, found)
        single = single and not carried
        if single and not keeps:
            # The batch file is the input itself: only the intent must precede the create.
            # A large ledger is written while the provider works (``ensure_ledger``).
            check_budget(
                res, facts, submitted=0, new=facts.requests, providers=ctx.project.providers
            )
            late = facts.requests >= LEDGER_AFTER_CREATE_MIN
            record_intent(
                ctx,
                res,
                gen,
                shard=0,
                attempt=1,
                requests=facts.requests,
                nbytes=facts.bytes,
                max_output=facts.max_output_tokens,
                input_sha256=facts.sha256,
                reason="initial submission",
                request_index=keep_request_index(ctx, res, facts.sha256) if late else None,
            )
            if not late:
                ctx.ensure_ledger(res, gen)
            return
        assert index is not None
        todo = index
        if carried:
            done = ctx.ledger.resolved_lines(gen.id)
            todo = (fact for fact in index if fact.line not in done)
        per_shard: dict[int, int] = {}
        shard_bytes: dict[int, int] = {}
        shard_output: dict[int, int] | None = None
        # shard files left unfinished by a refusal (an input changed as it was copied) or
        # any other failure are removed: nothing would ever remove them
        with ShardWriters(ctx.shard_dir, enabled=not single, source=res.input_path) as writers:
            spans = None
            if not keeps:
                # every request of the input, in consecutive runs per shard: the ledger is
                # derived from the intents' counts (``RunContext.ensure_ledger``), a large one
                # while the provider works, so the uploads do not wait for its inserts; a
                # shard's file is its span of the input when its lines are back to back
                spans = shard_spans(todo, limits, res.endpoint, per_shard, shard_bytes)
                if spans is None:
                    per_shard.clear()
                    shard_bytes.clear()
                    todo = ctx.request_facts(res, facts.sha256)  # walked again, copied by line
                else:
                    copy_shard_spans(res.input_path, spans, writers, facts.sha256)
            if spans is None:
                assigned = shard_and_write(
                    todo, limits, res.endpoint, writers, per_shard, shard_bytes
                )
                # what a generation keeping answers sends is not the input's average, and a
                # dollar budget bounds its output: parse those requests again (only for such a
                # budget)
                if carried and measures_output(res):
                    shard_output = {}
                    bound = line_bound(res, ctx.project.providers)
                    assigned = measuring_output(assigned, res.input_path, shard_output, bound)
                if keeps:
                    ctx.ledger.assign_shards(gen.id, ((s, fact.line) for s, fact in assigned))
                else:
                    collections.deque(assigned, maxlen=0)  # drives the shard writers
            # what is sent, measured: requests that keep an answer are rarely of average
            # size; checked before the shard files are finished, so a refusal leaves none
            sent_bytes = sum(shard_bytes.values()) if carried else facts.bytes
            check_budget(
                res,
                facts,
                submitted=0,
                new=sum(per_shard.values()),
                providers=ctx.project.providers,
                new_input_tokens=estimate_input_tokens(sent_bytes),
                new_output_tokens=None if shard_output is None else sum(shard_output.values()),
            )
            shard_files = writers.finish()
        publish_shards(ctx, shard_files.values())
        # the large ledger of a generation that keeps nothing is derived after its creates
        late = not keeps and facts.requests >= LEDGER_AFTER_CREATE_MIN
        kept = keep_request_index(ctx, res, facts.sha256) if late else None
        for shard, n in sorted(per_shard.items()):
            record_intent(
                ctx,
                res,
                gen,
                shard=shard,
                attempt=1,
                requests=n,
                nbytes=shard_bytes.get(shard, 0),
                max_output=None if shard_output is None else shard_output.get(shard, 0),
                input_sha256=shard_files.get(shard, facts.sha256),
                reason="initial submission"
                if len(per_shard) == 1
                else f"initial submission, shard {shard + 1} of {len(per_shard)}",
                request_index=kept if shard == min(per_shard) else None,
            )
        if not keeps and not late:
            ctx.ensure_ledger(res, gen)
    if found is not None and (found.kept or found.unreadable):
        ctx.report(recover_progress(res, found))
    if carried:
        # answers found at the provider were never recorded here (the recover line says so)
        recovered = found.kept if found is not None else 0
        reused: list[str] = []
        if carried > recovered:
            reused.append(f"{carried - recovered} unchanged request(s) keep their recorded results")
        if recovered:
            reused.append(f"{recovered} keep the answers found at the provider")
        ctx.report(
            Progress(
                "reuse",
                res.name,
                f"{', '.join(reused)}; {sum(per_shard.values())} to submit",
                {"reused": carried, **({"recovered": recovered} if recovered else {})},
            )
        )
    if len(per_shard) > 1:
        ctx.report(
            Progress(
                "shard",
                res.name,
                f"split {sum(per_shard.values())} requests into {len(per_shard)} shards",
                {"shards": len(per_shard)},
            )
        )


def keep_found_answers(ctx: RunContext, gen: GenerationRow, found: Recovered) -> int:
    """Mark ``ok`` the requests of ``gen`` whose very same line an earlier generation's batch
    answered, found at the provider by ``recover.recover_ahead`` (the state that recorded
    them is lost); how many were kept."""
    found.kept = ctx.ledger.keep_found_answers(gen.id, recovered_rows(found))
    return found.kept


def recover_progress(res: Resource, found: Recovered) -> Progress:
    """What apply says of the answers ``recover`` kept, and of the batches it could not read:
    their requests are sent again, which the plan (it reads no provider) cannot say."""
    said = []
    if found.kept:
        said.append(
            f"{found.kept} request(s) keep answers found at the provider in "
            f"{len(found.batches)} batch(es) of earlier generations that this state does "
            "not record (its record lost): not sent again"
        )
    if found.unreadable:
        said.append(
            f"{len(found.unreadable)} batch(es) of earlier generations could not be read, "
            "so the requests they answered are sent again: " + "; ".join(found.unreadable)
        )
    data: dict[str, object] = {"recovered": found.kept, "remote_ids": found.batches}
    if found.unreadable:
        data["unreadable"] = found.unreadable
    return Progress("recover", res.name, "; ".join(said), data)


def record_recovered(ctx: RunContext, res: Resource, gen: GenerationRow, found: Recovered) -> None:
    """The ``recover`` event: how many requests kept answers found at the provider, from
    which batches, and the batches whose files could not be read (their requests are sent)."""
    ctx.store.record_event(
        ctx.run_id,
        "recover",
        resource=res.name,
        generation_id=gen.id,
        detail={
            "requests": found.kept,
            "batches": found.batches,
            "provider": res.provider,
            "files": found.files,
            **({"unreadable": "; ".join(found.unreadable)} if found.unreadable else {}),
        },
    )


def record_intent(
    ctx: RunContext,
    res: Resource,
    gen: GenerationRow,
    *,
    shard: int,
    attempt: int,
    requests: int,
    nbytes: int,
    reason: str,
    max_output: int | None = None,
    input_sha256: str | None = None,
    request_index: str | None = None,
) -> BatchRow:
    with ctx.store.atomic():
        if input_sha256 is None:
            input_sha256 = _write_retry_file(ctx, res, gen, shard)
        part = attempt_part(gen, attempt, input_sha256)
        key = batch_key(res.name, res.spec_hash, shard, part)
        existing = ctx.store.batch_by_key(key)
        if existing is not None and existing.generation_id != gen.id:
            # another generation's batch holds the key: a resource moved away keeps its
            # batches' keys (the provider's copies carry them), and a new resource given the
            # old name and the same spec comes to the same key. Taken for this generation's,
            # its batch was never made and `apply --wait` waited for it without end.
            key = batch_key(res.name, res.spec_hash, shard, f"{part}g{gen.id}")
            existing = ctx.store.batch_by_key(key)
        if existing is not None:
            return existing
        batch = ctx.store.record_batch_intent(
            gen.id,
            shard=shard,
            attempt=attempt,
            provider=res.provider,
            key=key,
            input_sha256=input_sha256,
            requests=requests,
            reason=reason,
            key_unused=True,  # looked up above, in this transaction
        )
        ctx.ledger.mark_sent(gen.id, shard, attempt)
        ctx.store.update_generation(gen.id, status="in_progress")
        ctx.store.record_event(
            ctx.run_id,
            "intent",
            resource=res.name,
            generation_id=gen.id,
            batch_id=batch.id,
            detail={
                "shard": shard,
                "attempt": attempt,
                "requests": requests,
                # what the budget counts as sent (``budget.sent_by``)
                "bytes": nbytes,
                **({"max_output_tokens": max_output} if max_output is not None else {}),
                "reason": reason,
                "key": key,
                **({"request_index": request_index} if request_index else {}),
            },
        )
    return batch


def attempt_part(gen: GenerationRow, attempt: int, input_sha256: str) -> str:
    """The attempt's part of its batch key: the attempt number, and, unless the batch file is
    the whole input as validated (which the spec hash names), 12 hex digits of its sha256.

    Which requests a shard or a retry holds is not decided by the spec alone: `limits` (not
    in the spec hash) draw the shards, and a generation that keeps earlier answers sends
    only what they left, in shards of its own. A lost state draws its shards afresh under
    the same spec, and under a key of numbers alone it adopted a batch holding other
    requests as its own shard: one answering none of them was refused as another file's
    content on every apply, the resource stuck until `--replace` paid for it all again."""
    if input_sha256 == gen.input_sha256:
        return str(attempt)
    return f"{attempt}k{input_sha256[:12]}"


def measuring_output(
    assigned: Iterable[tuple[int, RequestFact]],
    path: Path,
    per_shard: dict[int, int],
    bound: LineBound,
) -> Iterator[tuple[int, RequestFact]]:
    """Pass ``(shard, request)`` pairs on, adding each request's output bound to its shard."""
    with RequestBytes(path) as reader:
        for shard, fact in assigned:
            most = bound(json.loads(reader.read(fact)))
            per_shard[shard] = per_shard.get(shard, 0) + most
            yield shard, fact


def keep_request_index(ctx: RunContext, res: Resource, sha256: str) -> str:
    """Put the request index of input content ``sha256`` into the result store; its blob's
    sha256, recorded on the intent of a generation whose ledger is written after its create.

    A run killed after the create and before that ledger leaves the ledger to be derived
    later (``RunContext.ensure_ledger``); by then the input may hold other content and this
    machine's index folder may be gone (another runner, a cleaned workspace). The stored
    copy still joins the batch's answers to its request lines, so that they are reused by
    request hash and never paid for again."""
    assert ctx.inputs is not None
    inputs = ctx.inputs
    return ctx.blobs.put_from(lambda tmp: inputs.copy_request_index(res.input_path, sha256, tmp))


def _write_retry_file(ctx: RunContext, res: Resource, gen: GenerationRow, shard: int) -> str:
    wanted = ctx.ledger.unresolved_lines(gen.id, shard)
    with ShardWriters(ctx.shard_dir, enabled=True, source=res.input_path) as writers:
        for fact in ctx.request_facts(res, gen.input_sha256):
            if fact.line in wanted:
                writers.write_request(0, fact)
        sha = writers.finish()[0]
    publish_shards(ctx, [sha])
    return sha


def publish_shards(ctx: RunContext, shas: Iterable[str]) -> None:
    """Put shard files in the result store's shared tier before their intents are recorded,
    so a queued intent can be submitted by any runner of a shared state."""
    for sha in shas:
        ctx.blobs.publish(sha, ctx.shard_dir / f"{sha}.jsonl")
