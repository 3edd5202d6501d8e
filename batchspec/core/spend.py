"""Tokens and dollars: what a generation's answers used and what that cost.

**Usage** comes from the request ledger: each collected answer's own ``usage``
(``batchspec.wire.usage``), summed per generation. When no answer reported any (an older
state, a provider that reports none), the usage the provider's batch objects reported is used.

**Price** (USD per million tokens, as charged for a *batch* request), first match wins:

==========================================  ===================================================
``pricing:`` of the provider in             that price for the model (or ``"*"``: every model
``batchspec.yaml``                          of the provider), as written: no discount applied
type ``local`` on loopback upstreams, or   0: self-hosted (``batchspec serve``, vLLM, ...)
type ``openai`` on a loopback ``baseUrl``
(no ``litellmProvider``): ``costs_nothing``
the bundled table                           the model's standard price
(``price_table.json``: genai-prices data)   x (1 - the provider's batch discount)
anything else                               unknown: never 0; a dollar budget then refuses
==========================================  ===================================================

The table is keyed by the price family of the provider (``azure`` and a LiteLLM proxy for
``openai``/``azure`` use OpenAI's, ``gemini`` Google's, ...) and matches a model by its id, one
of its listed names, or the longest listed prefix (``gpt-4o-mini-2024-07-18``). Batch
discounts are the documented ones: 50% for every family here. Long-context tiers are not
modelled (the base tier is used), nor the cheaper cached input (counted as input): so a cost
is an upper bound where those apply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from batchspec.providers.flavours import local_upstream_urls
from batchspec.wire.hosts import is_loopback

if TYPE_CHECKING:
    from batchspec.state.store import GenerationRow, StateStore
    from batchspec.workspace.project import ProviderConfig

#: the provider type (or LiteLLM's ``custom_llm_provider``) -> its family in the price table
_FAMILY = {
    "openai": "openai",
    "azure": "openai",
    "anthropic": "anthropic",
    "gemini": "google",
    "vertex_ai": "google",
    "groq": "groq",
    "together": "together",
    "together_ai": "together",
    "mistral": "mistral",
}
#: documented batch discounts (see /docs: OpenAI, Azure Global Batch, Anthropic, Gemini,
#: Mistral, Groq 50%; Together up to 50% on listed models)
BATCH_DISCOUNT = {
    "openai": 0.5,
    "anthropic": 0.5,
    "google": 0.5,
    "groq": 0.5,
    "together": 0.5,
    "mistral": 0.5,
}


@dataclass(frozen=True)
class Price:
    """USD per million tokens, as a batch request is charged, and where that comes from."""

    input: float
    output: float
    source: str

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1_000_000


@dataclass(frozen=True)
class Usage:
    """Tokens, and their cost in USD: ``cost_usd`` is ``None`` when a price is unknown."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.total_tokens + other.total_tokens,
            None if self.cost_usd is None or other.cost_usd is None
            else self.cost_usd + other.cost_usd,
        )  # fmt: skip

    @property
    def tokens(self) -> bool:
        return bool(self.input_tokens or self.output_tokens or self.total_tokens)


@cache
def price_table() -> Mapping[str, Any]:
    """The bundled table (``scripts/update_price_table.py`` regenerates it)."""
    table: Mapping[str, Any] = json.loads(Path(__file__).with_name("price_table.json").read_text())
    return table


def price_for(provider: ProviderConfig | None, model: str | None) -> Price | None:
    """The price of ``model`` on ``provider`` (see the module docstring), or ``None``."""
    if provider is None:
        return None
    overrides = provider.pricing
    own = overrides.get(model) if model else None
    if own is None:
        own = overrides.get("*")
    if own is not None:
        return Price(float(own["input"]), float(own["output"]), f"pricing of {provider.name}")
    if costs_nothing(provider):
        return Price(0.0, 0.0, f"self-hosted ({provider.name})")
    family = _family(provider)
    if model is None or family is None:
        return None
    listed = _lookup(family, model)
    if listed is None:
        return None
    keep = 1.0 - BATCH_DISCOUNT.get(family, 0.0)
    table = price_table()
    return Price(
        listed["input"] * keep,
        listed["output"] * keep,
        f"{table['source'].split(' (')[0]} ({table['extracted']}), batch "
        f"-{round((1 - keep) * 100)}%",
    )


def costs_nothing(provider: ProviderConfig) -> bool:
    """Whether ``provider`` runs on this machine's own model servers, at no price: a
    ``local`` engine whose upstreams are all its built-in stand-in or on loopback (one that
    forwards to another host, a hosted API or another machine's GPUs, is priced as unknown
    unless its ``pricing`` says), or an ``openai`` provider on a loopback ``baseUrl`` that
    is no LiteLLM route (``batchspec serve``, vLLM)."""
    if provider.type == "local":
        return all(_loopback(url) for url in local_upstream_urls(provider.options))
    if provider.type != "openai" or provider.options.get("litellmProvider"):
        return False
    return _loopback(provider.base_url or "")


def _loopback(url: str) -> bool:
    """Whether ``url`` reaches this machine: localhost, 127.0.0.0/8, ::1, or 0.0.0.0 (the
    address model servers print, which a client reaches as this machine)."""
    host = urlsplit(url).hostname or ""
    return is_loopback(host) or host == "0.0.0.0"  # a destination: this machine


def _family(provider: ProviderConfig) -> str | None:
    routed = provider.options.get("litellmProvider") if provider.type == "openai" else None
    return _FAMILY.get(routed or provider.type)


def _lookup(family: str, model: str) -> Mapping[str, float] | None:
    models: Mapping[str, Any] = price_table()["prices"].get(family, {})
    name = model.removeprefix("models/")  # Gemini's resource names
    if name in models:
        found: Mapping[str, float] = models[name]
        return found
    best: tuple[int, Mapping[str, float]] | None = None
    for model_id, entry in models.items():
        if name in entry.get("names", ()):
            named: Mapping[str, float] = entry
            return named
        for prefix in (*entry.get("prefixes", ()), model_id + "-"):
            if name.startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), entry)
    return best[1] if best else None


def priced_usage(
    price: Price | None, input_tokens: int, output_tokens: int, total_tokens: int | None = None
) -> Usage:
    """Tokens with their cost under ``price`` (``None`` when unknown and tokens were used)."""
    total = total_tokens if total_tokens is not None else input_tokens + output_tokens
    used = bool(input_tokens or output_tokens or total)
    if price is None:
        return Usage(input_tokens, output_tokens, total, None if used else 0.0)
    return Usage(input_tokens, output_tokens, total, price.cost(input_tokens, output_tokens))


def generation_usage(
    store: StateStore, gen: GenerationRow, providers: Mapping[str, ProviderConfig]
) -> Usage:
    """What a generation's answers used (the ledger's per-request sums, else the batch
    objects'), priced for its recorded provider and model (``spec.model``, else the one
    model its requests named)."""
    price = generation_price(gen, providers)
    totals = store.ledger().usage_totals(gen.id)
    if totals.requests:
        return priced_usage(price, totals.input_tokens, totals.output_tokens)
    inp = out = tot = 0
    for b in store.batches(gen.id):
        inp += b.input_tokens or 0
        out += b.output_tokens or 0
        tot += b.total_tokens or 0
    return priced_usage(price, inp, out, tot)


def generation_price(gen: GenerationRow, providers: Mapping[str, ProviderConfig]) -> Price | None:
    """The price of a generation's answers: its recorded provider and model (``spec.model``,
    else the one model its requests named)."""
    model = gen.spec.get("model") or gen.model
    return price_for(providers.get(str(gen.spec.get("provider"))), model)


def usage_detail(usage: Usage) -> dict[str, Any]:
    """The usage as an event records it: tokens, and ``cost_usd`` (``null``: unknown price)."""
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "cost_usd": None if usage.cost_usd is None else round(usage.cost_usd, 6),
    }
