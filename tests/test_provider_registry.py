"""build_provider: which provider a ProviderConfig yields, and where its URL and key come from."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from scripted_server import ScriptedServer, json_answer

from batchspec.errors import ProviderError
from batchspec.providers.anthropic import AnthropicProvider
from batchspec.providers.azure import AzureOpenAIProvider
from batchspec.providers.local import LocalProvider
from batchspec.providers.openai import OpenAIProvider
from batchspec.providers.registry import build_provider
from batchspec.workspace.project import ProviderConfig


def config(
    type_: str = "openai",
    *,
    name: str = "p",
    base_url: str | None = None,
    api_key_env: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> ProviderConfig:
    return ProviderConfig(
        name=name, type=type_, base_url=base_url, api_key_env=api_key_env, options=options or {}
    )


@pytest.mark.parametrize(
    ("base_url", "env", "expected"),
    [
        pytest.param(None, {}, "https://api.openai.com/v1", id="default"),
        pytest.param(
            None, {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, "http://127.0.0.1:9/v1", id="env"
        ),
        pytest.param(
            "http://proxy.test/v1/",
            {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
            "http://proxy.test/v1",
            id="config-wins",
        ),
    ],
)
def test_openai_base_url_precedence(
    tmp_path: Path, base_url: str | None, env: dict[str, str], expected: str
) -> None:
    """baseUrl beats $OPENAI_BASE_URL, which beats OpenAI's own URL."""
    provider = build_provider(
        config(base_url=base_url), project_root=tmp_path, env={"OPENAI_API_KEY": "k", **env}
    )
    assert isinstance(provider, OpenAIProvider)
    assert provider.base_url == expected
    assert provider.name == "p"
    provider.close()


def test_a_password_in_openai_base_url_from_the_environment_is_refused_unshown(
    tmp_path: Path,
) -> None:
    """$OPENAI_BASE_URL with user:password@ (the project file's baseUrl is refused when it
    loads): httpx would send Basic auth in place of the key; the provider is not built, and
    the error names the variable and the URL without the password."""
    env = {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://bob:s3cretpw@gw.test:8080/v1"}
    with pytest.raises(ProviderError) as caught:
        build_provider(config(), project_root=tmp_path, env=env)
    text = str(caught.value)
    assert "$OPENAI_BASE_URL" in text and "http://gw.test:8080/v1" in text
    assert "s3cretpw" not in text and "bob" not in text
    user_only = {**env, "OPENAI_BASE_URL": "http://bob@gw.test:8080/v1"}
    build_provider(config(), project_root=tmp_path, env=user_only).close()


@pytest.mark.parametrize(
    ("api_key_env", "env", "variable"),
    [
        pytest.param(None, {}, "OPENAI_API_KEY", id="default-missing"),
        pytest.param(None, {"OPENAI_API_KEY": "  "}, "OPENAI_API_KEY", id="default-blank"),
        pytest.param("TEAM_KEY", {"OPENAI_API_KEY": "k"}, "TEAM_KEY", id="custom-missing"),
    ],
)
def test_missing_key_names_the_variable(
    tmp_path: Path, api_key_env: str | None, env: dict[str, str], variable: str
) -> None:
    """A missing or blank key variable fails at build time, saying which variable to set."""
    with pytest.raises(ProviderError, match=f"set {variable} in the environment"):
        build_provider(config(api_key_env=api_key_env), project_root=tmp_path, env=env)


def test_key_comes_from_the_configured_variable(tmp_path: Path) -> None:
    """apiKeyEnv names the variable read; the key never shows in the provider's repr."""
    env = {"TEAM_KEY": "sk-team-secret-value-123", "OPENAI_API_KEY": "sk-other"}
    provider = build_provider(config(api_key_env="TEAM_KEY"), project_root=tmp_path, env=env)
    assert "sk-team-secret-value-123" not in repr(provider)
    provider.close()


def test_local_provider_lives_under_the_project(tmp_path: Path) -> None:
    """type local builds the in-process engine provider with its data under the project root."""
    provider = build_provider(
        config("local", name="offline", options={"dataDir": "data/engine"}),
        project_root=tmp_path,
        env={},
    )
    assert isinstance(provider, LocalProvider)
    assert provider.name == "offline"
    assert provider.data_dir == tmp_path / "data" / "engine"
    provider.close()
    assert not (tmp_path / "data").exists()  # building does no I/O


def test_local_provider_default_data_dir(tmp_path: Path) -> None:
    """Without dataDir the local engine keeps its data in state/local."""
    provider = build_provider(config("local"), project_root=tmp_path, env={})
    assert isinstance(provider, LocalProvider)
    assert provider.data_dir == tmp_path / "state" / "local"
    provider.close()


def test_azure_provider_uses_the_resource_endpoint_and_api_key_variable(tmp_path: Path) -> None:
    """azure: the v1 root below the resource endpoint, key from $AZURE_OPENAI_API_KEY."""
    cfg = config("azure", base_url="https://res.openai.azure.com")
    provider = build_provider(cfg, project_root=tmp_path, env={"AZURE_OPENAI_API_KEY": "k"})
    assert isinstance(provider, AzureOpenAIProvider)
    assert provider.base_url == "https://res.openai.azure.com/openai/v1"
    provider.close()


def test_azure_provider_without_base_url_is_an_error(tmp_path: Path) -> None:
    """azure needs its resource endpoint; the message says where to set it."""
    with pytest.raises(ProviderError, match="needs baseUrl"):
        build_provider(config("azure"), project_root=tmp_path, env={"AZURE_OPENAI_API_KEY": "k"})


def test_anthropic_provider_stages_below_the_project(tmp_path: Path) -> None:
    """anthropic: Anthropic's API root by default, data in state/anthropic/<name>."""
    env = {"ANTHROPIC_API_KEY": "k"}
    provider = build_provider(config("anthropic", name="claude"), project_root=tmp_path, env=env)
    assert isinstance(provider, AnthropicProvider)
    assert provider.base_url == "https://api.anthropic.com"
    assert provider.data_dir == tmp_path / "state" / "anthropic" / "claude"
    provider.close()


def test_litellm_model_option_is_sent_as_a_header(tmp_path: Path) -> None:
    """openai with litellmModel sends x-litellm-model (LiteLLM's model-routed mode)."""
    cfg = config("openai", options={"litellmModel": "local-batch"})
    provider = build_provider(cfg, project_root=tmp_path, env={"OPENAI_API_KEY": "k"})
    assert isinstance(provider, OpenAIProvider)
    assert provider._http._headers["x-litellm-model"] == "local-batch"
    provider.close()


def test_unknown_type_is_an_error(tmp_path: Path) -> None:
    """An unknown type (the schema forbids it) still fails clearly rather than guessing."""
    with pytest.raises(ProviderError, match="unknown provider type 'vertex'"):
        build_provider(config("vertex"), project_root=tmp_path, env={})


@pytest.mark.parametrize(("option", "requests"), [(None, 6), (0, 1), (2, 3)])
def test_max_retries_option_sets_how_often_a_call_is_retried(
    tmp_path: Path, scripted: ScriptedServer, option: int | None, requests: int
) -> None:
    """options.maxRetries: a call the server keeps answering 503 is sent 1 + maxRetries
    times (default 5 retries), then fails with the provider's message."""
    busy = json_answer(503, {"error": {"message": "busy"}}, **{"retry-after-ms": "1"})
    scripted.script(then=busy)
    options = {} if option is None else {"maxRetries": option}
    provider = build_provider(
        config(base_url=scripted.v1, api_key_env="K", options=options),
        project_root=tmp_path,
        env={"K": "k"},
    )
    with pytest.raises(ProviderError, match="busy"):
        provider.get_batch("batch_1")
    provider.close()
    assert scripted.methods() == ["GET"] * requests


@pytest.mark.parametrize(
    "type_", ["openai", "azure", "groq", "together", "anthropic", "gemini", "mistral"]
)
def test_every_http_provider_type_takes_max_retries(tmp_path: Path, type_: str) -> None:
    """maxRetries reaches the retry policy of every HTTP provider type."""
    provider = build_provider(
        config(type_, base_url="http://127.0.0.1:9/v1", api_key_env="K", options={"maxRetries": 1}),
        project_root=tmp_path,
        env={"K": "k"},
    )
    assert provider._policy.max_attempts == 2  # type: ignore[attr-defined]
    provider.close()


@pytest.mark.parametrize(
    "type_", ["openai", "azure", "groq", "together", "anthropic", "gemini", "mistral"]
)
def test_a_providers_repr_never_shows_a_password_in_its_base_url(
    tmp_path: Path, type_: str
) -> None:
    """A baseUrl with user:password@ (a gateway behind basic auth): the provider's repr, as
    a log line or a traceback shows it, leaves the password (and the key) out."""
    provider = build_provider(
        config(type_, base_url="http://bob:URLSENTINEL0pw@gw.test/v1", api_key_env="K"),
        project_root=tmp_path,
        env={"K": "SENTINEL-key-0123456789"},
    )
    try:
        text = repr(provider)
    finally:
        provider.close()
    assert "gw.test" in text
    assert "URLSENTINEL" not in text and "SENTINEL-key" not in text
