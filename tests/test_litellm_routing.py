"""LiteLLM's ``custom_llm_provider`` routing: one real proxy in front of two providers.

A real, unmodified LiteLLM proxy (1.108.7, from the test extra) fronts two separate
``batchspec serve`` processes: one as its ``openai`` provider (``/v1/...``) and one as its
``azure`` provider (the proxy's Azure client calls ``/openai/files|batches?api-version=``,
which the engine serves). The proxy config gives each provider its ``files_settings`` entry
(uploads) and a ``model_list`` deployment (the other calls take their credentials from the
first deployment of the provider asked for).

Two batchspec providers point at the same proxy and differ only in
``options.litellmProvider``; a manifest on each must land on its own server, converge, and
stay in sync on the next plan. Skipped, saying why, only when litellm[proxy] is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litellm_proxy as litellm
import pytest
from litellm_proxy import LiteLLMProxy, litellm_unavailable, run_litellm_proxy
from probes import ServeProcess, start_serve_process
from workspaces import KEY_ENV, ResourceSpec, make_workspace, openai_provider, run_cli

UPSTREAM_KEY = "sk-upstream-behind-litellm-routing-41d7"
UPSTREAM_KEY_ENV = "BATCHSPEC_UPSTREAM_KEY"
AZURE_API_VERSION = "2024-10-21"
APPLY = ["--wait", "--yes", "--poll-interval", "0.05", "--timeout", "90"]


@dataclass
class Routing:
    proxy: LiteLLMProxy
    as_openai: ServeProcess
    as_azure: ServeProcess


def proxy_config(openai_v1: str, azure_endpoint: str) -> dict[str, Any]:
    """What a user writes in LiteLLM to front an OpenAI-compatible API and an Azure resource."""
    azure = {"api_base": azure_endpoint, "api_key": UPSTREAM_KEY, "api_version": AZURE_API_VERSION}
    return {
        "model_list": [
            {
                "model_name": "openai-batch",
                "litellm_params": {
                    "model": "openai/any-model",
                    "api_base": openai_v1,
                    "api_key": UPSTREAM_KEY,
                },
            },
            {
                "model_name": "azure-batch",
                "litellm_params": {"model": "azure/global-batch-deployment", **azure},
            },
        ],
        "files_settings": [
            {"custom_llm_provider": "openai", "api_base": openai_v1, "api_key": UPSTREAM_KEY},
            {"custom_llm_provider": "azure", **azure},
        ],
    }


def build_routing(root: Path) -> Routing:
    """Two batchspec serve processes and one LiteLLM proxy routing to both."""
    serves: list[ServeProcess] = []
    try:
        for name in ("as-openai", "as-azure"):
            serves.append(
                start_serve_process(
                    root / name,
                    "--api-key-env",
                    UPSTREAM_KEY_ENV,
                    env={UPSTREAM_KEY_ENV: UPSTREAM_KEY},
                    api_key=UPSTREAM_KEY,
                )
            )
        as_openai, as_azure = serves
        proxy = run_litellm_proxy(root / "proxy", proxy_config(as_openai.v1, as_azure.base_url))
    except BaseException:
        for serve in serves:
            serve.stop()
        raise
    return Routing(proxy, as_openai, as_azure)


def stop_routing(routing: Routing) -> None:
    routing.proxy.stop()
    routing.as_openai.stop()
    routing.as_azure.stop()


def start_early(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Called before the session's first test when a test of this module is selected
    (``conftest.pytest_collection_finish``): the proxy starts on a thread of its own."""
    if litellm_unavailable() is None:
        folder = tmp_path_factory.mktemp("litellm-routing")  # here: the factory is not thread-safe
        litellm.start_early("litellm-routing", lambda: build_routing(folder), stop_routing)


@pytest.fixture(scope="module")
def routing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routing]:
    reason = litellm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    started = litellm.take_early("litellm-routing")
    started = started or build_routing(tmp_path_factory.mktemp("litellm-routing"))
    yield started
    stop_routing(started)


def batches_on(serve: ServeProcess) -> dict[str, str]:
    """resource name -> status of every batchspec batch the server holds."""
    listed = serve.client().batches.list(limit=100).data
    return {
        (b.metadata or {}).get("batchspec_resource", "?"): b.status
        for b in listed
        if (b.metadata or {}).get("batchspec_resource")
    }


def test_each_litellm_provider_lands_on_its_own_server(
    routing: Routing,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """litellmProvider openai vs azure: each resource's file and batch reach only the server
    the proxy routes that provider to; both converge; the next plan is in sync."""
    monkeypatch.setenv(KEY_ENV, routing.proxy.master_key)
    ws = make_workspace(
        tmp_path / "ws",
        providers={
            "via-openai": openai_provider(routing.proxy.v1, KEY_ENV, litellmProvider="openai"),
            "via-azure": openai_provider(routing.proxy.v1, KEY_ENV, litellmProvider="azure"),
        },
        resources=[
            ResourceSpec("to-openai", 4, provider="via-openai", prefix="o"),
            ResourceSpec("to-azure", 3, provider="via-azure", prefix="a"),
        ],
    )

    code, _, err = run_cli(["apply", str(ws.root), *APPLY], capsys)

    assert code == 0, err + routing.proxy.log_tail()
    for name in ("to-openai", "to-azure"):
        outputs = ws.outputs(name)
        assert [r["custom_id"] for r in outputs] == ws.input_ids(name)
        assert all(r["response"]["status_code"] == 200 for r in outputs)
    assert batches_on(routing.as_openai) == {"to-openai": "completed"}
    assert batches_on(routing.as_azure) == {"to-azure": "completed"}
    assert run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)[0] == 0
    assert run_cli(["apply", str(ws.root), *APPLY], capsys)[0] == 0
    assert batches_on(routing.as_openai) == {"to-openai": "completed"}
    assert batches_on(routing.as_azure) == {"to-azure": "completed"}
