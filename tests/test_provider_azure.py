"""AzureOpenAIProvider against our own engine answering on Azure's paths, over loopback.

The server is the real engine app behind ``AzureFlavour`` (its answers on ``/openai/`` paths
look like Azure's previews: CamelCase statuses, ISO-8601 timestamps, ``request_counts: null``,
unversioned endpoints) and a recorder of what each request carried, so the provider's paths,
``api-version``, ``api-key`` header and lenient parsing are checked for real.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import (
    FAST_ENGINE_OPTIONS,
    jsonl_bytes,
    read_jsonl,
    request_lines,
    stop_after_test,
    wait_for,
)
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, make_workspace, run_cli

from batchspec.engine import BuiltinUpstream, Engine
from batchspec.engine.app import create_app
from batchspec.engine.azure_routes import AzureFlavour
from batchspec.engine.server import BackgroundServer, start_in_thread
from batchspec.errors import ProviderError
from batchspec.providers.azure import AzureOpenAIProvider, azure_root
from batchspec.providers.base import Provider, RemoteBatch
from batchspec.wire.batch_status import KNOWN_STATUSES

CHAT = "/v1/chat/completions"


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Recorder:
    """ASGI middleware remembering every request (and the create bodies) it passes on."""

    app: Any
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        entry = Seen(scope["method"], scope["path"], scope["query_string"].decode(), headers)
        self.seen.append(entry)
        if not scope["path"].endswith("/batches") or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        message = await receive()
        entry.body = message.get("body", b"")
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return message
            return await receive()

        await self.app(scope, replay, send)


@dataclass
class AzureServer:
    base_url: str
    engine: Engine
    background: BackgroundServer
    recorder: Recorder

    def stop(self) -> None:
        self.background.stop()
        self.engine.close()


@pytest.fixture
def azure_server(tmp_path: Path) -> Iterator[Callable[..., AzureServer]]:
    """Start engines served with Azure's flavour, requiring the sentinel key."""
    started: list[AzureServer] = []

    def start() -> AzureServer:
        engine = Engine(
            tmp_path / f"engine{len(started)}", BuiltinUpstream(), **FAST_ENGINE_OPTIONS
        ).start()
        recorder = Recorder(AzureFlavour(create_app(engine, api_key=SENTINEL_KEY)))
        server = AzureServer("", engine, start_in_thread(recorder), recorder)
        server.base_url = server.background.base_url
        started.append(server)
        return server

    yield start
    stop_after_test(started)


def provider_for(server: AzureServer, **kwargs: Any) -> AzureOpenAIProvider:
    options: dict[str, Any] = {"api_key": SENTINEL_KEY, "timeout": 10.0, **kwargs}
    return AzureOpenAIProvider("az", endpoint=server.base_url, **options)


def run_cycle(provider: AzureOpenAIProvider, tmp_path: Path, count: int = 3) -> RemoteBatch:
    source = tmp_path / "input.jsonl"
    source.write_bytes(jsonl_bytes(request_lines(count, model="gpt-4o-mini-batch")))
    uploaded = provider.upload_file(source, filename="input.jsonl")
    created = provider.create_batch(
        input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h", metadata={"k": "v"}
    )
    assert created.status in KNOWN_STATUSES
    assert created.endpoint == CHAT

    def terminal() -> RemoteBatch | None:
        batch = provider.get_batch(created.id)
        return batch if batch.is_terminal else None

    return wait_for(terminal)


def test_provider_satisfies_the_protocol(azure_server: Callable[..., AzureServer]) -> None:
    """AzureOpenAIProvider is a providers.base.Provider."""
    with provider_for(azure_server()) as provider:
        assert isinstance(provider, Provider)


@pytest.mark.parametrize(
    ("endpoint", "style", "root"),
    [
        pytest.param("https://r.openai.azure.com", "v1", "https://r.openai.azure.com/openai/v1"),
        pytest.param("https://r.openai.azure.com/", "legacy", "https://r.openai.azure.com/openai"),
        pytest.param(
            "https://r.openai.azure.com/openai/v1/", "v1", "https://r.openai.azure.com/openai/v1"
        ),
        pytest.param(
            "https://r.openai.azure.com/openai", "legacy", "https://r.openai.azure.com/openai"
        ),
        pytest.param(
            "https://r.openai.azure.com/openai/v1", "legacy", "https://r.openai.azure.com/openai"
        ),
    ],
)
def test_root_from_the_resource_endpoint(endpoint: str, style: str, root: str) -> None:
    """The endpoint, with or without its /openai(/v1) suffix, gives the style's root."""
    assert azure_root(endpoint, api_style=style) == root


def test_v1_paths_full_cycle_parsing_azure_flavoured_answers(
    azure_server: Callable[..., AzureServer], tmp_path: Path
) -> None:
    """On /openai/v1 with the api-key header: CamelCase statuses, ISO times and null counts
    are read as our statuses and epoch seconds, and the output downloads."""
    server = azure_server()
    with provider_for(server) as provider:
        done = run_cycle(provider, tmp_path)
        assert done.status == "completed"
        assert done.request_counts is None
        assert isinstance(done.created_at, int) and done.created_at > 1_600_000_000
        assert done.output_file_id
        dest = tmp_path / "out.jsonl"
        provider.download_file(done.output_file_id, dest)
        assert [r["custom_id"] for r in read_jsonl(dest.read_text())] == [
            "req-0",
            "req-1",
            "req-2",
        ]
        listed = next(iter(provider.list_batches()))
        assert (listed.id, listed.status, listed.endpoint) == (done.id, "completed", CHAT)
    raw = httpx.get(
        f"{server.base_url}/openai/v1/batches/{done.id}", headers={"api-key": SENTINEL_KEY}
    ).json()
    assert raw["status"] == "Completed" and raw["request_counts"] is None  # the flavour held
    assert isinstance(raw["created_at"], str)
    seen = server.recorder.seen
    assert all(s.path.startswith("/openai/v1/") for s in seen[:-1])
    assert all(s.headers.get("api-key") == SENTINEL_KEY for s in seen)
    assert not any("authorization" in s.headers for s in seen)


def test_in_progress_is_read_from_camel_case(
    azure_server: Callable[..., AzureServer], tmp_path: Path
) -> None:
    """While the server says "InProgress", the provider reports in_progress (known, not
    terminal), so the reconciler keeps polling."""
    server = azure_server()
    server.engine.upstream.latency = 1.0  # type: ignore[attr-defined]
    with provider_for(server) as provider:
        source = tmp_path / "input.jsonl"
        source.write_bytes(jsonl_bytes(request_lines(2)))
        file_id = provider.upload_file(source, filename="input.jsonl").id
        created = provider.create_batch(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata={}
        )
        url = f"{server.base_url}/openai/v1/batches/{created.id}"
        headers = {"api-key": SENTINEL_KEY}
        wait_for(lambda: httpx.get(url, headers=headers).json()["status"] == "InProgress")
        running = provider.get_batch(created.id)
        assert running.status == "in_progress"
        assert not running.is_terminal
        provider.cancel_batch(created.id)


def test_a_cancel_of_a_completed_batch_returns_it_completed(
    azure_server: Callable[..., AzureServer], tmp_path: Path
) -> None:
    """Azure inherits the OpenAI provider's cancel: a batch that completed before its cancel
    (refused 409 not cancellable) comes back "Completed" read as completed, with its output
    file, not as an error; the refused cancel is sent once, not retried."""
    server = azure_server()
    with provider_for(server, sleep=lambda _: None) as provider:
        done = run_cycle(provider, tmp_path)
        ended = provider.cancel_batch(done.id)
    assert (ended.id, ended.status, ended.output_file_id) == (
        done.id,
        "completed",
        done.output_file_id,
    )
    cancels = [s for s in server.recorder.seen if s.path.endswith("/cancel")]
    assert len(cancels) == 1


def test_legacy_paths_carry_api_version_on_every_call(
    azure_server: Callable[..., AzureServer], tmp_path: Path
) -> None:
    """apiStyle legacy: /openai/files|batches?api-version=... for upload, create, poll, list
    and download alike; the create names the endpoint unversioned, as Azure documents."""
    server = azure_server()
    with provider_for(server, api_style="legacy", api_version="2024-10-21") as provider:
        done = run_cycle(provider, tmp_path)
        assert done.status == "completed"
        provider.download_file(done.output_file_id or "", tmp_path / "out.jsonl")
        assert [b.id for b in provider.list_batches()] == [done.id]
    seen = server.recorder.seen
    assert {s.path.split("/")[2] for s in seen} == {"files", "batches"}
    assert all(s.path.startswith("/openai/") and "/v1/" not in s.path for s in seen)
    assert all("api-version=2024-10-21" in s.query for s in seen)
    [create] = [s for s in seen if s.method == "POST" and s.path == "/openai/batches"]
    assert json.loads(create.body)["endpoint"] == "/chat/completions"


def test_legacy_path_without_api_version_is_refused(
    azure_server: Callable[..., AzureServer],
) -> None:
    """Azure's versioned paths need api-version; our server says so with a 400."""
    server = azure_server()
    answer = httpx.get(f"{server.base_url}/openai/batches", headers={"api-key": SENTINEL_KEY})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "missing_api_version"


def test_wrong_key_names_the_variable_not_the_key(
    azure_server: Callable[..., AzureServer], tmp_path: Path
) -> None:
    """A 401 says to check $AZURE_OPENAI_API_KEY and never shows the key that was sent."""
    server = azure_server()
    wrong = "sk-wrong-azure-key-0123456789"
    with (
        provider_for(server, api_key=wrong, max_retries=0) as provider,
        pytest.raises(ProviderError) as raised,
    ):
        next(iter(provider.list_batches()))
    assert raised.value.status == 401
    assert "$AZURE_OPENAI_API_KEY" in str(raised.value)
    assert wrong not in str(raised.value)


@pytest.mark.parametrize("style", ["v1", "legacy"])
def test_apply_end_to_end_with_an_azure_provider(
    azure_server: Callable[..., AzureServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    style: str,
) -> None:
    """`batchspec apply --wait` with `type: azure` converges: every result, in input order,
    one upload and one create at the server, on the style's paths."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    server = azure_server()
    provider = {
        "type": "azure",
        "baseUrl": server.base_url,
        "apiKeyEnv": KEY_ENV,
        "options": {"apiStyle": style, "apiVersion": "2024-10-21"},
    }
    ws = make_workspace(
        tmp_path / "ws", providers={"az": provider}, resources=[ResourceSpec("triage", 5, "az")]
    )

    code, _, err = run_cli(
        ["apply", str(ws.root), "--wait", "--yes", "--poll-interval", "0.05"], capsys
    )

    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
    assert all(r["response"]["status_code"] == 200 for r in ws.outputs("triage"))
    posts = [(s.method, s.path) for s in server.recorder.seen if s.method == "POST"]
    prefix = "/openai/v1" if style == "v1" else "/openai"
    assert posts == [("POST", f"{prefix}/files"), ("POST", f"{prefix}/batches")]
    with ws.store() as store:
        [gen] = store.generations("triage")
        assert gen.status == "complete"


def test_an_azure_batch_running_past_a_day_is_adopted_after_the_state_is_lost(
    azure_server: Callable[..., AzureServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Azure does not expire a batch at 24 h (batch-apis.md): one made 30 hours ago may still
    be running, so after the state is lost its key lookup finds and adopts it; it looked back
    over the manifest's 24 h window only, skipped it as too old, and created (and paid for) it
    again."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    server = azure_server()
    provider = {"type": "azure", "baseUrl": server.base_url, "apiKeyEnv": KEY_ENV}
    ws = make_workspace(
        tmp_path / "ws", providers={"az": provider}, resources=[ResourceSpec("triage", 3, "az")]
    )
    wait = ["apply", str(ws.root), "--wait", "--yes", "--poll-interval", "0.05"]
    assert run_cli(wait, capsys)[0] == 0
    with server.engine.store.write() as db:
        db.execute("UPDATE batches SET created_at = created_at - ?", (30 * 3600,))
    shutil.rmtree(ws.root / "state")

    code, _, err = run_cli(wait, capsys)

    assert code == 0, err
    assert len(server.engine.list_batches()["data"]) == 1
    with ws.store() as store:
        actions = [e.action for e in store.events(resource="triage")]
    assert "adopt" in actions and "create" not in actions
