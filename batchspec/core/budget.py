"""Spending limits: ``spec.budget`` (over the project's ``defaults.budget``).

A budget bounds what one *generation* of a resource may submit in all, across every shard
and every retry: ``maxRequests`` request lines, ``maxInputTokens`` estimated input tokens
(``plan.estimate_input_tokens``: about four bytes of request JSON per token, of the very
requests sent: each intent records the bytes its batch carries, since a retry or a new
generation's changed requests are rarely of the input's average size), and
``maxCostUSD`` dollars, estimated as an upper bound (``estimate_spend``): those input tokens
plus every request answering its whole output limit (``wire.usage.max_output_of_request``),
priced as ``core.spend`` prices (batch discount, ``pricing`` overrides). A dollar budget on a
model without a known price refuses: an unknown price is never taken for 0. A step that would
go past any of them is refused before anything is uploaded; ``plan`` makes the same check.

The output bound of the whole input is the scan's sum. What a retry or a new generation that
keeps answers sends is a part of it, rarely an average part (the one request of a large
``max_tokens`` is the one that fails): under a dollar budget those requests are read back and
parsed (``output_of_unresolved``, ``output_of_unreused``, the same by ``plan`` and by
``apply``) and each intent records the bound of what it carries (``sent_by`` sums them). An
intent that recorded none (an import, an older version, no dollar budget then) counts at the
input's average.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchspec.core.moves import former_names
from batchspec.core.plan import estimate_input_tokens
from batchspec.core.replacements import answer_sources
from batchspec.core.spend import price_for
from batchspec.errors import BudgetError
from batchspec.state.ledger import RequestLedger
from batchspec.state.store import BatchRow, StateStore
from batchspec.wire.inputs import InputReport
from batchspec.wire.request_index import RequestBytes, RequestFact
from batchspec.wire.usage import max_output_of_line, provider_output_limit, unset_output_bound
from batchspec.workspace.manifest import Resource
from batchspec.workspace.project import ProviderConfig
from batchspec.workspace.yamldoc import display_path


@dataclass(frozen=True)
class Estimate:
    """What submitting ``requests`` requests may cost at most."""

    requests: int
    input_tokens: int
    max_output_tokens: int
    cost_usd: float | None  # an upper bound; None: the price is unknown
    model: str | None
    price_source: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "max_cost_usd": None if self.cost_usd is None else round(self.cost_usd, 6),
            "model": self.model,
            "price": self.price_source or "unknown",
        }


def pricing_model(res: Resource, facts: InputReport) -> str | None:
    """The model a resource is priced by: ``spec.model``, else the one its lines name."""
    return res.model or (facts.models[0] if len(facts.models) == 1 else None)


def estimate_spend(
    res: Resource,
    facts: InputReport,
    providers: Mapping[str, ProviderConfig],
    *,
    requests: int,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
) -> Estimate:
    """The upper bound of ``requests`` of this input (average request size and output
    limit); ``input_tokens`` and ``output_tokens`` when the caller measured them."""
    share = requests / facts.requests if facts.requests else 0.0
    if input_tokens is None:
        input_tokens = estimate_input_tokens(int(facts.bytes * share))
    output = math.ceil(facts.max_output_tokens * share) if output_tokens is None else output_tokens
    model = pricing_model(res, facts)
    price = price_for(providers.get(res.provider), model)
    cost = price.cost(input_tokens, output) if price is not None else None
    if requests == 0:
        cost = 0.0
    return Estimate(requests, input_tokens, output, cost, model, price.source if price else None)


def measures_output(res: Resource) -> bool:
    """Whether a spending step measures the output bound of the very requests it sends
    (parsing them again) to check them against a budget: only a dollar budget needs it (the
    plan measures them for its estimates anyway: ``apply.measured_outputs``)."""
    return res.budget is not None and res.budget.max_cost_usd is not None


LineBound = Callable[[Any], int]


def line_bound(res: Resource, providers: Mapping[str, ProviderConfig]) -> LineBound:
    """``wire.usage.max_output_of_line`` as the scan of ``res``'s input reads its lines: a
    line that names no model is sent with the manifest's, one that sets no output limit
    with its provider's (an Anthropic ``defaultMaxTokens``)."""
    config = providers.get(res.provider)
    unset = provider_output_limit(config.type, config.options) if config is not None else None
    return functools.partial(max_output_of_line, model=res.model, unset=unset)


def output_of_requests(path: Path, requests: Iterable[RequestFact], bound: LineBound) -> int:
    """The output bound (``bound``: ``line_bound``) of these indexed requests of the input at
    ``path``, read back and parsed (``InputChangedError`` if the input changed)."""
    total = 0
    with RequestBytes(path) as reader:
        for fact in requests:
            total += bound(json.loads(reader.read(fact)))
    return total


def output_of_unresolved(
    ledger: RequestLedger,
    generation_id: int,
    shards: Iterable[int],
    path: Path,
    requests: Iterable[RequestFact],
    bound: LineBound,
) -> dict[int, int]:
    """Per shard, the output bound of its unresolved requests: what a retry of it sends
    (``requests``: the generation's input's request index)."""
    shards = list(shards)
    owner = {line: s for s in shards for line in ledger.unresolved_lines(generation_id, s)}
    out = dict.fromkeys(shards, 0)
    with RequestBytes(path) as reader:
        for fact in requests:
            shard = owner.get(fact.line)
            if shard is not None:
                out[shard] += bound(json.loads(reader.read(fact)))
    return out


def output_of_unreused(
    store: StateStore,
    res: Resource,
    requests: Iterable[RequestFact],
    bound: LineBound,
    *,
    exclude: int | None,
) -> int:
    """The output bound of the requests of ``res``'s input that no earlier generation (but
    ``exclude``) answered: what a new generation that keeps answers sends (counted as
    ``replacements.reusable_answers`` counts the kept ones: the built-in stand-in's
    answers are not kept by a generation a model answers, so their requests count here)."""
    ids = answer_sources(store.generations(res.name), stand_in=res.stand_in, exclude=[exclude])
    answered = store.ledger().succeeded_fingerprints(ids) if ids else set()
    return output_of_requests(
        res.input_path,
        (f for f in requests if (f.custom_id, f.request_sha) not in answered),
        bound,
    )


@dataclass(frozen=True)
class Sent:
    """What a generation's batches carried so far: request bytes and output bound."""

    bytes: int
    output_tokens: int


def sent_by(store: StateStore, facts: InputReport, batches: Sequence[BatchRow]) -> Sent:
    """What ``batches`` (of one generation) carried, as their intents recorded it; what an
    intent did not record (an import, an older version's, an output bound nobody measured)
    at the input's average request."""
    if not batches:
        return Sent(0, 0)
    gen_id = batches[0].generation_id
    # read by the resource's index; an intent recorded under an earlier name (a move since)
    # under that name's (an import's batch has none: the average)
    name = store.get_generation(gen_id).resource
    events = store.generation_events(gen_id, "intent", resource=name)
    recorded = {e.batch_id: e.detail for e in events}
    if any(b.id not in recorded for b in batches):
        for former in former_names(store, name):
            for e in store.generation_events(gen_id, "intent", resource=former):
                recorded.setdefault(e.batch_id, e.detail)
    nbytes = output = 0
    for batch in batches:
        detail = recorded.get(batch.id) or {}
        size, bound = detail.get("bytes"), detail.get("max_output_tokens")
        if type(size) is int and size >= 0:
            nbytes += size
        else:
            nbytes += _average(facts.bytes, facts, batch.requests)
        if type(bound) is int and bound >= 0:
            output += bound
        else:
            output += _average(facts.max_output_tokens, facts, batch.requests, up=True)
    return Sent(nbytes, output)


def check_budget(
    res: Resource,
    facts: InputReport,
    *,
    submitted: int,
    new: int,
    providers: Mapping[str, ProviderConfig],
    sent: Sent | None = None,
    new_input_tokens: int | None = None,
    new_output_tokens: int | None = None,
    outcome: str = "nothing was uploaded",
) -> None:
    """Raise ``BudgetError`` if ``new`` more requests would take the generation over budget;
    its message ends with ``outcome`` (what the refusal means for the command: ``plan`` uploads
    nothing in any case).

    ``sent`` (what the generation's batches carried so far), ``new_input_tokens`` and
    ``new_output_tokens`` (of exactly the requests to send) are measured by the caller: the
    requests a retry or a new generation sends are rarely of the input's average size or
    output limit (one long request failing, one long request added). Without them, the
    average is taken."""
    budget = res.budget
    if budget is None or new <= 0:
        return
    total = submitted + new
    if budget.max_requests is not None and total > budget.max_requests:
        raise _refusal(
            res, f"{total:,} requests", f"maxRequests {budget.max_requests:,}", new, outcome
        )
    if sent is None:
        sent = Sent(
            _average(facts.bytes, facts, submitted),
            _average(facts.max_output_tokens, facts, submitted, up=True),
        )
    if new_input_tokens is None:
        new_input_tokens = estimate_input_tokens(_average(facts.bytes, facts, new))
    if new_output_tokens is None:
        new_output_tokens = _average(facts.max_output_tokens, facts, new, up=True)
    tokens = estimate_input_tokens(sent.bytes) + new_input_tokens
    if budget.max_input_tokens is not None and tokens > budget.max_input_tokens:
        raise _refusal(
            res,
            f"~{tokens:,} input tokens",
            f"maxInputTokens {budget.max_input_tokens:,}",
            new,
            outcome,
        )
    if budget.max_cost_usd is None:
        return
    spend = estimate_spend(
        res,
        facts,
        providers,
        requests=total,
        input_tokens=tokens,
        output_tokens=sent.output_tokens + new_output_tokens,
    )
    if spend.cost_usd is None:
        unknown = BudgetError(
            f"the price of {spend.model or 'its model (several or none named)'} "
            f"on provider {res.provider!r} is unknown, so its budget (maxCostUSD "
            f"{budget.max_cost_usd:g}) cannot be checked (give it under providers."
            f"{res.provider}.pricing in batchspec.yaml); {outcome}",
            details=["pricing takes USD per million input and output tokens, per model or '*'"],
        )
        unknown.about(res.name)
        raise unknown
    if spend.cost_usd > budget.max_cost_usd:
        refused = _refusal(
            res,
            f"up to ${spend.cost_usd:,.4f} ({spend.input_tokens:,} input tokens estimated, "
            f"{spend.max_output_tokens:,} output tokens at most; {spend.price_source})",
            f"maxCostUSD {budget.max_cost_usd:g}",
            new,
            outcome,
        )
        config = providers.get(res.provider)
        sent_with = provider_output_limit(config.type, config.options) if config else None
        unset = sent_with or unset_output_bound(spend.model)
        whose = (
            "the provider's defaultMaxTokens"
            if sent_with
            else f"what {spend.model or 'its model'} may answer"
        )
        refused.details.append(
            "the output bound is each request's max_completion_tokens (or max_tokens) times "
            f"the choices it asks for; a request that sets none counts {unset:,} ({whose}): "
            "a limit in the request lines lowers it"
        )
        raise refused


def _average(total: int, facts: InputReport, count: int, *, up: bool = False) -> int:
    """``count`` requests' share of ``total`` (the input's bytes or output bound), at the
    input's average request: rounded down, or up."""
    if not facts.requests:
        return 0
    return -(-total * count // facts.requests) if up else total * count // facts.requests


def _refusal(res: Resource, amount: str, limit: str, new: int, outcome: str) -> BudgetError:
    """The refusal, about ``res``: ``[NAME] submitting ...`` (the ``--json`` error names it)."""
    refused = BudgetError(
        f"submitting {new:,} more request(s) would bring this generation to "
        f"{amount}, over its budget ({limit}); {outcome}",
        details=[
            f"raise spec.budget in {display_path(res.source.file)} (it falls back field by "
            "field to defaults.budget in batchspec.yaml) or shrink the input to go on"
        ],
    )
    refused.about(res.name)
    return refused
