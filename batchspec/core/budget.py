"""Spending limits: ``spec.budget`` (over the project's ``defaults.budget``).

A budget bounds what one *generation* of a resource may submit in all, across every shard
and every retry: ``maxRequests`` request lines, ``maxInputTokens`` estimated input tokens
(``plan.estimate_input_tokens``: about four bytes of request JSON per token), and
``maxCostUSD`` dollars, estimated as an upper bound (``estimate_spend``): those input tokens
plus every request answering its whole output limit (``wire.usage.max_output_of_request``),
priced as ``core.spend`` prices (batch discount, ``pricing`` overrides). A dollar budget on a
model without a known price refuses: an unknown price is never taken for 0. A step that would
go past any of them is refused before anything is uploaded; ``plan`` makes the same check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from batchspec.core.plan import estimate_input_tokens
from batchspec.core.spend import price_for
from batchspec.errors import BudgetError
from batchspec.wire.inputs import InputReport
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
) -> Estimate:
    """The upper bound of ``requests`` of this input (average request size and output
    limit); ``input_tokens`` when the caller measured them exactly."""
    share = requests / facts.requests if facts.requests else 0.0
    if input_tokens is None:
        input_tokens = estimate_input_tokens(int(facts.bytes * share))
    output = math.ceil(facts.max_output_tokens * share)
    model = pricing_model(res, facts)
    price = price_for(providers.get(res.provider), model)
    cost = price.cost(input_tokens, output) if price is not None else None
    if requests == 0:
        cost = 0.0
    return Estimate(requests, input_tokens, output, cost, model, price.source if price else None)


def check_budget(
    res: Resource,
    facts: InputReport,
    *,
    submitted: int,
    new: int,
    providers: Mapping[str, ProviderConfig],
) -> None:
    """Raise ``BudgetError`` if ``new`` more requests would take the generation over budget."""
    budget = res.budget
    if budget is None or new <= 0:
        return
    total = submitted + new
    if budget.max_requests is not None and total > budget.max_requests:
        raise _refusal(res, f"{total:,} requests", f"maxRequests {budget.max_requests:,}", new)
    per_request = facts.bytes / facts.requests if facts.requests else 0
    tokens = estimate_input_tokens(int(per_request * total))
    if budget.max_input_tokens is not None and tokens > budget.max_input_tokens:
        raise _refusal(
            res, f"~{tokens:,} input tokens", f"maxInputTokens {budget.max_input_tokens:,}", new
        )
    if budget.max_cost_usd is None:
        return
    spend = estimate_spend(res, facts, providers, requests=total, input_tokens=tokens)
    if spend.cost_usd is None:
        raise BudgetError(
            f"{res.name}: the price of {spend.model or 'its model (several or none named)'} "
            f"on provider {res.provider!r} is unknown, so its budget (maxCostUSD "
            f"{budget.max_cost_usd:g}) cannot be checked (give it under providers."
            f"{res.provider}.pricing in batchspec.yaml); nothing was uploaded",
            details=["pricing takes USD per million input and output tokens, per model or '*'"],
        )
    if spend.cost_usd > budget.max_cost_usd:
        raise _refusal(
            res,
            f"up to ${spend.cost_usd:,.4f} ({spend.input_tokens:,} input tokens estimated, "
            f"{spend.max_output_tokens:,} output tokens at most; {spend.price_source})",
            f"maxCostUSD {budget.max_cost_usd:g}",
            new,
        )


def _refusal(res: Resource, amount: str, limit: str, new: int) -> BudgetError:
    return BudgetError(
        f"{res.name}: submitting {new:,} more request(s) would bring this generation to "
        f"{amount}, over its budget ({limit}); nothing was uploaded",
        details=[
            f"raise spec.budget in {display_path(res.source.file)} (it falls back field by "
            "field to defaults.budget in batchspec.yaml) or shrink the input to go on"
        ],
    )
