"""The OpenAI-compatible family's flavours, as data: defaults and limits of each provider type.

One table, read by the registry (default base URL and key variable) and by sharding (the
requests and bytes one remote batch may hold). The facts come from each provider's docs
(``/work/shared/reference/batch-apis.md`` collects them); ``docs/providers.md`` shows them.
The completion windows each type takes are checked with the manifest
(``workspace.manifest.COMPLETION_WINDOWS``), before anything is uploaded.

Why ``type: groq`` and ``type: together`` rather than ``type: openai`` with an option: each
has its own default base URL, key variable and limits, and Together its own wire protocol
(three-step upload, wrapped create, no metadata); a type keeps each one's options checked by
the project schema and its limits applied without the user restating them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MB = 1024 * 1024


@dataclass(frozen=True)
class Flavour:
    """What a provider type defaults to and allows per remote batch."""

    type: str
    base_url: str | None
    api_key_env: str | None
    max_requests: int
    max_bytes: int
    custom_id_pattern: str | None = None  # checked at validate time, before any upload


FLAVOURS: dict[str, Flavour] = {
    flavour.type: flavour
    for flavour in (
        Flavour("openai", "https://api.openai.com/v1", "OPENAI_API_KEY", 50_000, 200 * MB),
        Flavour("azure", None, "AZURE_OPENAI_API_KEY", 100_000, 200 * MB),
        Flavour(
            "anthropic",
            "https://api.anthropic.com",
            "ANTHROPIC_API_KEY",
            100_000,
            200 * MB,
            custom_id_pattern=r"^[a-zA-Z0-9_-]{1,64}$",
        ),
        Flavour(
            "groq",
            "https://api.groq.com/openai/v1",
            "GROQ_API_KEY",
            50_000,
            200 * MB,
        ),
        Flavour(
            "together",
            "https://api.together.ai/v1",
            "TOGETHER_API_KEY",
            50_000,
            100 * MB,
            custom_id_pattern=r"^.{1,64}$",
        ),
        Flavour("local", None, None, 50_000, 200 * MB),
    )
}


def flavour_of(provider_type: str | None) -> Flavour:
    """The flavour of a provider type; an unknown type gets OpenAI's limits."""
    return FLAVOURS.get(provider_type or "openai", FLAVOURS["openai"])


def local_upstream_urls(options: Mapping[str, Any]) -> list[str]:
    """The http(s) upstreams of a local provider's options (``builtin`` needs no key)."""
    items = options.get("upstreams") or [options.get("upstream", "builtin")]
    urls = [str(item["url"] if isinstance(item, Mapping) else item) for item in items]
    return [url for url in urls if url.startswith(("http://", "https://"))]
