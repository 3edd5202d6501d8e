"""batchspec and a real LiteLLM proxy, both directions, on 127.0.0.1.

One proxy per test session (it takes seconds to start and about 340 MB): in front of a real
``batchspec serve --api-key-env`` process (model ``local-batch`` and the proxy's own Files
and Batches routes) and of an in-thread engine behind ``FailFirstCreate`` (model
``flaky-batch``). So batchspec is the proxy's client and its upstream at once:

(a) ``batchspec apply`` through the proxy converges with complete results;
(b) the proxy's own refusals (a bad line, a wrong key) reach the user as clear messages;
(c) model-routed mode (``litellmModel`` -> ``x-litellm-model``) with the proxy's rewritten
    base64 ids converges and stays in sync;
(d) a create the proxy retries after an upstream 500 makes one batch, not two.

Skipped, saying why, only when litellm[proxy] is not installed (the test extra installs it).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litellm_proxy as litellm
import pytest
from litellm_proxy import (
    FailFirstCreate,
    LiteLLMProxy,
    litellm_unavailable,
    start_litellm_proxy,
)
from probes import ServeProcess, start_serve_process
from servers import FAST_ENGINE_OPTIONS, jsonl_bytes, request_lines
from workspaces import KEY_ENV, ResourceSpec, Workspace, make_workspace, openai_provider, run_cli

from batchspec.engine import BuiltinUpstream, Engine
from batchspec.engine.app import create_app
from batchspec.engine.server import BackgroundServer, start_in_thread
from batchspec.errors import ProviderError
from batchspec.providers.openai import OpenAIProvider

UPSTREAM_KEY = "sk-upstream-behind-litellm-2c4e6a8f"
UPSTREAM_KEY_ENV = "BATCHSPEC_UPSTREAM_KEY"
APPLY = ["--wait", "--yes", "--poll-interval", "0.05", "--timeout", "60"]


@dataclass
class ProxySetup:
    proxy: LiteLLMProxy
    serve: ServeProcess
    flaky: FailFirstCreate
    flaky_engine: Engine
    flaky_server: BackgroundServer


def build_setup(root: Path) -> ProxySetup:
    """batchspec serve + a flaky engine, and one LiteLLM proxy in front of both."""
    serve = start_serve_process(
        root / "serve-data",
        "--api-key-env",
        UPSTREAM_KEY_ENV,
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY},
        api_key=UPSTREAM_KEY,
    )
    engine = Engine(root / "flaky-data", BuiltinUpstream(), **FAST_ENGINE_OPTIONS).start()
    flaky = FailFirstCreate(create_app(engine, api_key=UPSTREAM_KEY))
    flaky_server = start_in_thread(flaky)
    try:
        proxy = start_litellm_proxy(
            root / "proxy",
            models={"local-batch": serve.v1, "flaky-batch": f"{flaky_server.base_url}/v1"},
            files_base=serve.v1,
            upstream_key=UPSTREAM_KEY,
        )
    except BaseException:
        flaky_server.stop()
        engine.close()
        serve.stop()
        raise
    return ProxySetup(proxy, serve, flaky, engine, flaky_server)


def stop_setup(setup: ProxySetup) -> None:
    setup.proxy.stop()
    setup.flaky_server.stop()
    setup.flaky_engine.close()
    setup.serve.stop()


def start_early(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Called before the session's first test when a test of this module is selected
    (``conftest.pytest_collection_finish``): the setup starts on a thread of its own."""
    if litellm_unavailable() is None:
        folder = tmp_path_factory.mktemp("litellm")  # here: the factory is not thread-safe
        litellm.start_early("litellm-proxy", lambda: build_setup(folder), stop_setup)


@pytest.fixture(scope="session")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxySetup]:
    reason = litellm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    started = litellm.take_early("litellm-proxy")
    started = started or build_setup(tmp_path_factory.mktemp("litellm"))
    yield started
    stop_setup(started)


@pytest.fixture
def master_key(monkeypatch: pytest.MonkeyPatch, setup: ProxySetup) -> str:
    monkeypatch.setenv(KEY_ENV, setup.proxy.master_key)
    return setup.proxy.master_key


def proxied(root: Path, setup: ProxySetup, name: str, count: int = 4, **options: Any) -> Workspace:
    """A workspace whose provider `srv` (type openai) is the proxy."""
    return make_workspace(
        root,
        providers={"srv": openai_provider(setup.proxy.v1, KEY_ENV, **options)},
        resources=[ResourceSpec(name, count, prefix=name)],
    )


def served_batches(setup: ProxySetup, resource: str) -> list[Any]:
    """The batches `batchspec serve` holds for ``resource`` (as the upstream saw them)."""
    batches = setup.serve.client().batches.list(limit=100).data
    return [b for b in batches if (b.metadata or {}).get("batchspec_resource") == resource]


def test_apply_through_the_proxy_converges_with_every_result(
    setup: ProxySetup, master_key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(a) apply --wait via the proxy: one batch on our server, every result in input order."""
    ws = proxied(tmp_path / "ws", setup, "via-proxy", count=5)

    code, _, err = run_cli(["apply", str(ws.root), *APPLY], capsys)

    assert code == 0, err + setup.proxy.log_tail()
    outputs = ws.outputs("via-proxy")
    assert [r["custom_id"] for r in outputs] == ws.input_ids("via-proxy")
    assert all(r["response"]["status_code"] == 200 for r in outputs)
    [batch] = served_batches(setup, "via-proxy")
    assert batch.status == "completed" and batch.request_counts.completed == 5
    assert run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)[0] == 0


def test_a_line_the_proxy_refuses_is_a_clear_provider_error(
    setup: ProxySetup, tmp_path: Path
) -> None:
    """(b) The proxy's own 400 for a line without `method` names the line and the field."""
    bad = tmp_path / "bad.jsonl"
    line = request_lines(1)[0]
    del line["method"]
    bad.write_bytes(jsonl_bytes([line]))
    provider = OpenAIProvider(
        "proxy", base_url=setup.proxy.v1, api_key=setup.proxy.master_key, max_retries=0
    )
    with provider, pytest.raises(ProviderError) as raised:
        provider.upload_file(bad, filename="bad.jsonl")
    message = str(raised.value)
    assert raised.value.status == 400
    assert "upload of bad.jsonl failed with HTTP 400" in message
    assert "Missing required parameter: 'method'" in message and "line 1" in message


def test_a_wrong_key_is_a_clear_message_and_creates_nothing(
    setup: ProxySetup,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """(b) A key the proxy does not know (its 400 no_db_connection) tells the user to check
    the key variable; the key is not shown and nothing reaches our server."""
    wrong = "sk-not-the-proxy-key-8d1f3b5a7c9e"
    monkeypatch.setenv(KEY_ENV, wrong)
    ws = proxied(tmp_path / "ws", setup, "wrong-key")

    code, out, err = run_cli(["apply", str(ws.root), *APPLY], capsys)

    assert code == 1
    assert f"check the API key in ${KEY_ENV}" in err
    assert "HTTP 400" in err and "No connected db" in err
    assert wrong not in out + err
    assert served_batches(setup, "wrong-key") == []


def test_model_routed_mode_with_rewritten_ids(
    setup: ProxySetup, master_key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(c) litellmModel: the proxy answers with long base64 ids wrapping the upstream's; apply
    keeps them as they are, converges, and a second apply finds it in sync."""
    ws = proxied(tmp_path / "ws", setup, "routed", litellmModel="local-batch")

    code, _, err = run_cli(["apply", str(ws.root), *APPLY], capsys)

    assert code == 0, err + setup.proxy.log_tail()
    assert [r["custom_id"] for r in ws.outputs("routed")] == ws.input_ids("routed")
    with ws.store() as store:
        [gen] = store.generations("routed")
        [batch] = store.batches(gen.id)
    [upstream] = served_batches(setup, "routed")
    assert batch.remote_id != upstream.id and batch.remote_id.startswith("batch_")
    wrapped = base64.urlsafe_b64decode(batch.remote_id.removeprefix("batch_") + "==").decode()
    assert upstream.id in wrapped and "local-batch" in wrapped
    assert batch.input_file_id and len(batch.input_file_id) > 60
    assert run_cli(["apply", str(ws.root), *APPLY], capsys)[0] == 0
    assert run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)[0] == 0
    assert len(served_batches(setup, "routed")) == 1


def test_a_create_the_proxy_retries_makes_one_batch(
    setup: ProxySetup, master_key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(d) The upstream makes the batch but answers 500; the proxy sends the create again
    (x-stainless-retry-count 1); our engine returns the batch it made: one batch in all."""
    setup.flaky.creates.clear()
    setup.flaky.armed = True
    ws = proxied(tmp_path / "ws", setup, "retried", litellmModel="flaky-batch")

    code, _, err = run_cli(["apply", str(ws.root), *APPLY], capsys)

    assert code == 0, err + setup.proxy.log_tail()
    assert [r["custom_id"] for r in ws.outputs("retried")] == ws.input_ids("retried")
    assert len(setup.flaky.creates) >= 2, "the proxy did not retry the create"
    assert setup.flaky.creates[1] == "1"
    batches = setup.flaky_engine.list_batches(None, 100)["data"]
    mine = [b for b in batches if b["metadata"]["batchspec_resource"] == "retried"]
    assert len(mine) == 1
