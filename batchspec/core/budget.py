"""Spending limits: ``spec.budget`` (over the project's ``defaults.budget``).

A budget bounds what one *generation* of a resource may submit in all, across every shard
and every retry: ``maxRequests`` request lines, and ``maxInputTokens`` estimated input
tokens (``plan.estimate_input_tokens``: about four bytes of request JSON per token). A step
that would go past either is refused before anything is uploaded.
"""

from __future__ import annotations

from batchspec.core.plan import estimate_input_tokens
from batchspec.errors import BudgetError
from batchspec.wire.inputs import InputReport
from batchspec.workspace.manifest import Resource


def check_budget(res: Resource, facts: InputReport, *, submitted: int, new: int) -> None:
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


def _refusal(res: Resource, amount: str, limit: str, new: int) -> BudgetError:
    return BudgetError(
        f"{res.name}: submitting {new:,} more request(s) would bring this generation to "
        f"{amount}, over its budget ({limit}); nothing was uploaded",
        details=[f"raise spec.budget in {res.source.file} or shrink the input to go on"],
    )
