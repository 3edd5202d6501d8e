"""build_provider: which provider a ProviderConfig yields, and where its URL and key come from."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from batchspec.errors import ProviderError
from batchspec.project import ProviderConfig
from batchspec.providers.local import LocalProvider
from batchspec.providers.openai import OpenAIProvider
from batchspec.providers.registry import build_provider


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


@pytest.mark.parametrize("type_", ["azure", "anthropic"])
def test_later_provider_types_say_not_supported_yet(tmp_path: Path, type_: str) -> None:
    """azure and anthropic are declared in the schema but not built yet: a clear error."""
    with pytest.raises(ProviderError, match=f"provider type {type_} is not supported yet"):
        build_provider(config(type_), project_root=tmp_path, env={})


def test_unknown_type_is_an_error(tmp_path: Path) -> None:
    """An unknown type (the schema forbids it) still fails clearly rather than guessing."""
    with pytest.raises(ProviderError, match="unknown provider type 'gemini'"):
        build_provider(config("gemini"), project_root=tmp_path, env={})
