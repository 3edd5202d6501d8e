"""Regenerate batchspec/core/price_table.json from the ``genai-prices`` package's bundled data.

Run by hand when prices change (``pip install genai-prices`` in a scratch venv first; it is
not a dependency of batchspec): ``python scripts/update_price_table.py``. It writes each
model's *standard* (non-batch) base-tier input and output price per million tokens for the
providers batchspec runs on; batchspec applies the batch discount itself
(``batchspec.core.spend``). Nothing here, nor in batchspec at run time, touches the network.

Why a bundled table and not ``genai-prices`` at run time: checked with 0.2.3, it does work
offline (its data is a bundled module; only ``UpdatePrices()``, never started, fetches; import
and ``calc_price`` ran with no network namespace and a refusing ``socket.connect``), but it
needs pydantic and a second HTTP client (``httpx2``), takes about 1.2 s to import on every
``status``/``plan``, and bundles batch rates only for some models (older Claude models and
embeddings fall back to the standard price), so batchspec would apply its own discount anyway.
"""

from __future__ import annotations

import datetime
import json
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from typing import Any

from genai_prices.data import providers  # type: ignore[import-not-found]

PROVIDERS = ("openai", "anthropic", "google", "mistral", "groq", "together")
OUT = Path(__file__).resolve().parent.parent / "batchspec" / "core" / "price_table.json"


def _base(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, Decimal | int | float):
        return float(value)
    return float(value.base)  # TieredPrices: the first tier


def _standard(prices: Any) -> Any:
    """The price that applies now to a standard (non-batch) request."""
    if not isinstance(prices, list):
        return prices
    today = datetime.date.today()
    chosen = None
    for conditional in prices:  # later entries override earlier ones once they apply
        constraint = conditional.constraint
        if constraint is None:
            chosen = conditional.prices
        elif type(constraint).__name__ == "StartDateConstraint":
            start = constraint.start_date
            start = start.date() if isinstance(start, datetime.datetime) else start
            if start <= today:
                chosen = conditional.prices
    return chosen


def _names(clause: Any, names: set[str], prefixes: set[str]) -> None:
    """Flatten a model's match clause into exact names and name prefixes (the clause kinds
    batchspec matches by; ``contains``/regex clauses are left out)."""
    kind = type(clause).__name__
    if kind == "ClauseEquals":
        names.add(clause.equals)
    elif kind == "ClauseStartsWith":
        prefixes.add(clause.starts_with)
    elif kind == "ClauseOr":
        for inner in clause.or_:
            _names(inner, names, prefixes)


def main() -> None:
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for provider in providers:
        if provider.id not in PROVIDERS:
            continue
        models = table.setdefault(provider.id, {})
        for model in provider.models:
            prices = _standard(model.prices)
            if prices is None:
                continue
            inp, out = _base(prices.input_mtok), _base(prices.output_mtok)
            if inp is None:
                continue
            entry: dict[str, Any] = {"input": inp, "output": out or 0.0}
            names: set[str] = set()
            prefixes: set[str] = set()
            _names(model.match, names, prefixes)
            if names - {model.id}:
                entry["names"] = sorted(names - {model.id})
            if prefixes:
                entry["prefixes"] = sorted(prefixes)
            models[model.id] = entry
    doc = {
        "source": f"genai-prices {version('genai-prices')} bundled data "
        "(https://github.com/pydantic/genai-prices), standard base-tier USD per million tokens",
        "extracted": datetime.date.today().isoformat(),
        "prices": table,
    }
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {sum(len(m) for m in table.values())} models to {OUT}")


if __name__ == "__main__":
    main()
