"""Build a ``Provider`` from a project's ``ProviderConfig``.

API keys come from environment variables only (their *names* are configured, never their
values); a missing variable fails with a message naming it. Building a provider does no
network I/O, so the reconciler can build providers lazily, only for resources that need one.
The local engine's module is imported only when a ``local`` provider is built.

Types: ``openai`` (any OpenAI-compatible API; ``litellmModel`` sends LiteLLM's
``x-litellm-model`` header for its model-routed mode, ``litellmProvider`` its
``custom_llm_provider``), ``azure`` (Azure OpenAI), ``groq`` and ``together`` (their
OpenAI-like batch APIs, defaults in ``flavours.FLAVOURS``), ``anthropic`` (Message Batches),
``gemini`` (Gemini Batch Mode), ``mistral`` (Mistral batch jobs) and ``local`` (the embedded
engine).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from batchspec.errors import ProviderError
from batchspec.providers.azure import AzureOpenAIProvider
from batchspec.providers.base import Provider
from batchspec.providers.flavours import FLAVOURS, local_upstream_urls
from batchspec.providers.openai import DEFAULT_BASE_URL, OpenAIProvider
from batchspec.wire.secrets import url_credentials

if TYPE_CHECKING:
    from batchspec.workspace.project import ProviderConfig

DEFAULT_API_KEY_ENV = {
    "openai": "OPENAI_API_KEY",
    "azure": "AZURE_OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "groq": "GROQ_API_KEY",
    "together": "TOGETHER_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "mistral": "MISTRAL_API_KEY",
}
#: where an anthropic provider stages inputs and journals its creates, below the project
DEFAULT_ANTHROPIC_DATA_DIR = "state/anthropic"
#: where a together provider journals its creates (its batches carry no metadata)
DEFAULT_TOGETHER_DATA_DIR = "state/together"
#: the HTTP timeout of one API call when a provider sets none
DEFAULT_TIMEOUT = 60.0
#: how much longer than the timeout a create may stay in transit (a gateway holding it)
CREATE_CONFIRM_MARGIN = 60.0
#: retries of one API call when a provider sets no ``maxRetries``
DEFAULT_MAX_RETRIES = 5


def max_retries(options: Mapping[str, Any]) -> int:
    """How many times one API call is retried (``maxRetries``; default ``DEFAULT_MAX_RETRIES``)."""
    value = options.get("maxRetries")
    return DEFAULT_MAX_RETRIES if value is None else int(value)


def create_confirm_seconds(config: ProviderConfig) -> float:
    """How long a create whose answer was lost counts as possibly made (``createConfirmSeconds``).

    Until then the reconciler only looks the batch up by its key and never creates again.
    Default: the provider's ``timeout`` plus ``CREATE_CONFIRM_MARGIN``; 0 for the local engine,
    whose creates are in-process and never in transit.
    """
    options: Mapping[str, Any] = config.options or {}
    if options.get("createConfirmSeconds") is not None:
        return float(options["createConfirmSeconds"])
    if config.type == "local":
        return 0.0
    return float(options.get("timeout", DEFAULT_TIMEOUT)) + CREATE_CONFIRM_MARGIN


def build_provider(
    config: ProviderConfig,
    *,
    project_root: Path,
    env: Mapping[str, str] = os.environ,
    lock_timeout: float = 0.0,
    run_local_batches: bool = True,
) -> Provider:
    """The provider ``config`` describes, ready to use; raises ``ProviderError`` if it cannot be.

    ``lock_timeout``: how long a local provider waits for another process using its engine
    data folder (the command's ``--lock-timeout``); ``run_local_batches=False``: a local
    provider's engine runs none of its batches (``LocalProvider``'s ``run_batches``)."""
    if config.type == "openai":
        return build_openai_provider(config, env=env)
    if config.type == "azure":
        return build_azure_provider(config, env=env)
    if config.type == "anthropic":
        return build_anthropic_provider(config, project_root=project_root, env=env)
    if config.type == "groq":
        return build_groq_provider(config, env=env)
    if config.type == "together":
        return build_together_provider(config, project_root=project_root, env=env)
    if config.type == "gemini":
        return build_gemini_provider(config, project_root=project_root, env=env)
    if config.type == "mistral":
        return build_mistral_provider(config, project_root=project_root, env=env)
    if config.type == "local":
        return build_local_provider(
            config,
            project_root=project_root,
            env=env,
            lock_timeout=lock_timeout,
            run_batches=run_local_batches,
        )
    raise ProviderError(
        f"provider {config.name!r}: unknown provider type {config.type!r}; "
        "expected one of openai, azure, groq, together, anthropic, gemini, mistral, local."
    )


def build_openai_provider(
    config: ProviderConfig, *, env: Mapping[str, str] = os.environ
) -> OpenAIProvider:
    """An OpenAI-compatible provider: base URL from the config, ``$OPENAI_BASE_URL`` or OpenAI."""
    options: Mapping[str, Any] = config.options or {}
    key_env = config.api_key_env or DEFAULT_API_KEY_ENV["openai"]
    base_url = config.base_url or env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    if config.base_url is None:  # the project file's baseUrl was checked as it loaded
        _refuse_a_password_in(config.name, base_url, "$OPENAI_BASE_URL")
    headers = {}
    if options.get("organization"):
        headers["OpenAI-Organization"] = str(options["organization"])
    if options.get("project"):
        headers["OpenAI-Project"] = str(options["project"])
    if options.get("litellmModel"):
        # LiteLLM's model-routed mode: the proxy picks the deployment by this model name and
        # answers with ids that wrap the upstream's (opaque to us, as every id is)
        headers["x-litellm-model"] = str(options["litellmModel"])
    return OpenAIProvider(
        config.name,
        base_url=base_url,
        api_key=_api_key(config.name, key_env, env),
        api_key_env=key_env,
        extra_headers=headers,
        timeout=float(options.get("timeout", DEFAULT_TIMEOUT)),
        max_retries=max_retries(options),
        # LiteLLM's custom_llm_provider: which provider behind the proxy takes every call
        litellm_provider=options.get("litellmProvider"),
    )


def _refuse_a_password_in(provider: str, base_url: str, source: str) -> None:
    """A base URL with ``user:password@`` (the project file's are refused when it loads):
    httpx would send it as Basic auth in place of the API key, whose 401 then blames the
    key. The URL is named without its user info."""
    if not url_credentials(base_url).passwords:
        return
    parts = urlsplit(base_url)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    raise ProviderError(
        f"provider {provider!r}: its base URL ({shown}, from {source}) holds a "
        "user:password@, which would be sent as Basic auth in place of the API key; take it "
        "out, and reach a gateway that asks for a password through "
        "HTTPS_PROXY=http://USER:PASSWORD@HOST:PORT"
    )


def build_azure_provider(
    config: ProviderConfig, *, env: Mapping[str, str] = os.environ
) -> AzureOpenAIProvider:
    """Azure OpenAI: ``baseUrl`` is the resource endpoint; ``apiStyle`` picks the paths."""
    options: Mapping[str, Any] = config.options or {}
    if not config.base_url:
        raise ProviderError(
            f"provider {config.name!r}: an azure provider needs baseUrl, the resource endpoint "
            "(e.g. https://NAME.openai.azure.com), in batchspec.yaml."
        )
    key_env = config.api_key_env or DEFAULT_API_KEY_ENV["azure"]
    return AzureOpenAIProvider(
        config.name,
        endpoint=config.base_url,
        api_key=_api_key(config.name, key_env, env),
        api_key_env=key_env,
        api_style=str(options.get("apiStyle", "v1")),
        api_version=options.get("apiVersion"),
        timeout=float(options.get("timeout", DEFAULT_TIMEOUT)),
        max_retries=max_retries(options),
    )


def build_groq_provider(
    config: ProviderConfig, *, env: Mapping[str, str] = os.environ
) -> OpenAIProvider:
    """Groq: OpenAI's API under ``https://api.groq.com/openai/v1``, windows ``24h`` to ``7d``."""
    options: Mapping[str, Any] = config.options or {}
    key_env = config.api_key_env or DEFAULT_API_KEY_ENV["groq"]
    return OpenAIProvider(
        config.name,
        base_url=config.base_url or str(FLAVOURS["groq"].base_url),
        api_key=_api_key(config.name, key_env, env),
        api_key_env=key_env,
        timeout=float(options.get("timeout", 60.0)),
        max_retries=max_retries(options),
    )


def build_together_provider(
    config: ProviderConfig, *, project_root: Path, env: Mapping[str, str] = os.environ
) -> Provider:
    """Together: creates are journaled in ``dataDir`` (its batches carry no metadata)."""
    from batchspec.providers.together import TogetherProvider

    options: Mapping[str, Any] = config.options or {}
    key_env = config.api_key_env or DEFAULT_API_KEY_ENV["together"]
    data_dir = project_root / str(options.get("dataDir", DEFAULT_TOGETHER_DATA_DIR))
    provider: Provider = TogetherProvider(
        config.name,
        base_url=config.base_url or str(FLAVOURS["together"].base_url),
        api_key=_api_key(config.name, key_env, env),
        api_key_env=key_env,
        data_dir=data_dir / config.name,
        timeout=float(options.get("timeout", 60.0)),
        max_retries=max_retries(options),
    )
    return provider


def build_anthropic_provider(
    config: ProviderConfig, *, project_root: Path, env: Mapping[str, str] = os.environ
) -> Provider:
    """Anthropic Message Batches; inputs are staged (and creates journaled) in ``dataDir``."""
    from batchspec.providers.anthropic import DEFAULT_BASE_URL as ANTHROPIC_BASE_URL
    from batchspec.providers.anthropic import AnthropicProvider

    options: Mapping[str, Any] = config.options or {}
    key_env = config.api_key_env or DEFAULT_API_KEY_ENV["anthropic"]
    data_dir = project_root / str(options.get("dataDir", DEFAULT_ANTHROPIC_DATA_DIR))
    provider: Provider = AnthropicProvider(
        config.name,
        base_url=config.base_url or ANTHROPIC_BASE_URL,
        api_key=_api_key(config.name, key_env, env),
        api_key_env=key_env,
        data_dir=data_dir / config.name,
        anthropic_version=str(options.get("anthropicVersion", "2023-06-01")),
        default_max_tokens=options.get("defaultMaxTokens"),
        timeout=float(options.get("timeout", DEFAULT_TIMEOUT)),
        max_retries=max_retries(options),
    )
    return provider


def build_gemini_provider(
    config: ProviderConfig, *, project_root: Path, env: Mapping[str, str] = os.environ
) -> Provider:
    """Gemini Batch Mode; inputs are staged in ``dataDir`` and sent inline or as a file."""
    from batchspec.providers.gemini import DEFAULT_BASE_URL as GEMINI_BASE_URL
    from batchspec.providers.gemini import DEFAULT_INLINE_MAX_BYTES, GeminiProvider

    options: Mapping[str, Any] = config.options or {}
    key_env = config.api_key_env or DEFAULT_API_KEY_ENV["gemini"]
    data_dir = project_root / str(options.get("dataDir", "state/gemini"))
    provider: Provider = GeminiProvider(
        config.name,
        base_url=config.base_url or GEMINI_BASE_URL,
        api_key=_api_key(config.name, key_env, env),
        api_key_env=key_env,
        data_dir=data_dir / config.name,
        api_version=str(options.get("apiVersion", "v1beta")),
        inline_max_bytes=int(options.get("inlineMaxBytes", DEFAULT_INLINE_MAX_BYTES)),
        timeout=float(options.get("timeout", 60.0)),
        max_retries=max_retries(options),
    )
    return provider


def build_mistral_provider(
    config: ProviderConfig, *, project_root: Path, env: Mapping[str, str] = os.environ
) -> Provider:
    """Mistral batch jobs; inputs are staged in ``dataDir``, converted and uploaded at create."""
    from batchspec.providers.mistral import DEFAULT_BASE_URL as MISTRAL_BASE_URL
    from batchspec.providers.mistral import MistralProvider

    options: Mapping[str, Any] = config.options or {}
    key_env = config.api_key_env or DEFAULT_API_KEY_ENV["mistral"]
    data_dir = project_root / str(options.get("dataDir", "state/mistral"))
    provider: Provider = MistralProvider(
        config.name,
        base_url=config.base_url or MISTRAL_BASE_URL,
        api_key=_api_key(config.name, key_env, env),
        api_key_env=key_env,
        data_dir=data_dir / config.name,
        timeout=float(options.get("timeout", DEFAULT_TIMEOUT)),
        max_retries=max_retries(options),
    )
    return provider


def build_local_provider(
    config: ProviderConfig,
    *,
    project_root: Path,
    env: Mapping[str, str] = os.environ,
    lock_timeout: float = 0.0,
    run_batches: bool = True,
) -> Provider:
    """The embedded engine, in-process, with its data under the project (``state/local``).

    A named ``upstreamApiKeyEnv`` that is unset fails here, before apply records anything
    (the engine itself reads it only when its first batch runs)."""
    from batchspec.engine import UpstreamTarget
    from batchspec.providers.local import LocalProvider  # the engine is heavy: import on use

    options: Mapping[str, Any] = config.options or {}
    if options.get("upstreamApiKeyEnv") and local_upstream_urls(options):
        variable = str(options["upstreamApiKeyEnv"])
        if not env.get(variable, "").strip():
            raise ProviderError(
                f"provider {config.name!r} needs its upstream API key: set {variable} in the "
                "environment (batchspec reads keys only from environment variables; it is "
                f"named in providers.{config.name}.options.upstreamApiKeyEnv of batchspec.yaml)."
            )
    upstream: str | list[str | UpstreamTarget] = str(options.get("upstream", "builtin"))
    if options.get("upstreams"):  # a rotation: URLs, or {url, rpm, tpm}
        upstream = [
            item
            if isinstance(item, str)
            else UpstreamTarget(str(item["url"]), rpm=item.get("rpm"), tpm=item.get("tpm"))
            for item in options["upstreams"]
        ]
    provider: Provider = LocalProvider(
        config.name,
        data_dir=project_root / str(options.get("dataDir", "state/local")),
        upstream=upstream,
        upstream_api_key_env=options.get("upstreamApiKeyEnv"),
        concurrency=int(options.get("concurrency", 4)),  # the project schema's default
        request_timeout=float(options.get("requestTimeout", 60.0)),
        run_batches=run_batches,
        lock_timeout=lock_timeout,
    )
    return provider


def _api_key(provider: str, variable: str, env: Mapping[str, str]) -> str:
    key = env.get(variable, "")
    if not key.strip():
        # an empty one is often a CI secret that was never given to this job
        found = "is set but empty" if variable in env else "is not set"
        raise ProviderError(
            f"provider {provider!r} needs an API key, and {variable} {found}: "
            f"set {variable} in the environment "
            "(batchspec reads keys only from environment variables; to read another one, "
            f"name it in providers.{provider}.apiKeyEnv of batchspec.yaml)."
        )
    return key.strip()
