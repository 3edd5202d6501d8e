"""Build a ``Provider`` from a project's ``ProviderConfig``.

API keys come from environment variables only (their *names* are configured, never their
values); a missing variable fails with a message naming it. Building a provider does no
network I/O, so the reconciler can build providers lazily, only for resources that need one.
The local engine's module is imported only when a ``local`` provider is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchspec.errors import ProviderError
from batchspec.providers.base import Provider
from batchspec.providers.openai import DEFAULT_BASE_URL, OpenAIProvider

if TYPE_CHECKING:
    from batchspec.project import ProviderConfig

DEFAULT_API_KEY_ENV = {"openai": "OPENAI_API_KEY"}
NOT_YET_SUPPORTED = frozenset({"azure", "anthropic"})


def build_provider(
    config: ProviderConfig, *, project_root: Path, env: Mapping[str, str] = os.environ
) -> Provider:
    """The provider ``config`` describes, ready to use; raises ``ProviderError`` if it cannot be."""
    if config.type == "openai":
        return build_openai_provider(config, env=env)
    if config.type == "local":
        return build_local_provider(config, project_root=project_root)
    if config.type in NOT_YET_SUPPORTED:
        raise ProviderError(
            f"provider {config.name!r}: provider type {config.type} is not supported yet; "
            "use an `openai` or `local` provider for now."
        )
    raise ProviderError(
        f"provider {config.name!r}: unknown provider type {config.type!r}; "
        "expected one of openai, azure, anthropic, local."
    )


def build_openai_provider(
    config: ProviderConfig, *, env: Mapping[str, str] = os.environ
) -> OpenAIProvider:
    """An OpenAI-compatible provider: base URL from the config, ``$OPENAI_BASE_URL`` or OpenAI."""
    options: Mapping[str, Any] = config.options or {}
    key_env = config.api_key_env or DEFAULT_API_KEY_ENV["openai"]
    base_url = config.base_url or env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    headers = {}
    if options.get("organization"):
        headers["OpenAI-Organization"] = str(options["organization"])
    if options.get("project"):
        headers["OpenAI-Project"] = str(options["project"])
    return OpenAIProvider(
        config.name,
        base_url=base_url,
        api_key=_api_key(config.name, key_env, env),
        api_key_env=key_env,
        extra_headers=headers,
        timeout=float(options.get("timeout", 60.0)),
    )


def build_local_provider(config: ProviderConfig, *, project_root: Path) -> Provider:
    """The embedded engine, in-process, with its data under the project (``state/local``)."""
    from batchspec.providers.local import LocalProvider  # the engine is heavy: import on use

    options: Mapping[str, Any] = config.options or {}
    provider: Provider = LocalProvider(
        config.name,
        data_dir=project_root / str(options.get("dataDir", "state/local")),
        upstream=str(options.get("upstream", "builtin")),
        upstream_api_key_env=options.get("upstreamApiKeyEnv"),
        concurrency=int(options.get("concurrency", 4)),  # the project schema's default
    )
    return provider


def _api_key(provider: str, variable: str, env: Mapping[str, str]) -> str:
    key = env.get(variable, "")
    if not key.strip():
        raise ProviderError(
            f"provider {provider!r} needs an API key: set {variable} in the environment "
            "(batchspec reads keys only from environment variables; `apiKeyEnv` in "
            "batchspec.yaml names a different variable)."
        )
    return key.strip()
