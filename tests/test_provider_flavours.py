"""The OpenAI-compatible family's flavours, end to end against ``batchspec serve``'s dialects.

- Groq (``type: groq``): the official ``groq`` SDK and batchspec against the engine's
  ``/groq/openai/v1`` routes, with Groq's ``24h``-``7d`` windows (``/v1`` stays OpenAI-strict).
- Together (``type: together``): the official ``together`` SDK and batchspec against the
  engine's ``/together/v1`` routes (three-step upload, ``{job, warning}``, bare-array list,
  upper-case statuses, no metadata), and a create whose answer is lost is adopted, not paid
  twice.
- A LiteLLM provider (``options.litellmProvider``): what goes on the wire on every call.

The same apply test runs for openai, groq and together: converge, then the next plan is in sync.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from servers import (
    EngineServer,
    jsonl_bytes,
    request_lines,
    start_server,
    stop_after_test,
    wait_for,
)
from workspaces import KEY_ENV, ResourceSpec, make_workspace, run_cli

from batchspec.engine import BuiltinUpstream, Engine
from batchspec.engine.app import create_app
from batchspec.engine.server import start_in_thread
from batchspec.errors import ProviderError
from batchspec.providers.openai import LITELLM_PROVIDER_HEADER, OpenAIProvider
from batchspec.providers.together import TogetherProvider

API_KEY = "sk-flavour-test-key-6a1c9e"
APPLY = ["--wait", "--yes", "--poll-interval", "0.05", "--timeout", "60"]
#: where each flavour answers on `batchspec serve`
ROOTS = {"openai": "/v1", "groq": "/groq/openai/v1", "together": "/together/v1"}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[EngineServer]:
    server = start_server(tmp_path / "engine", api_key=API_KEY)
    yield server
    stop_after_test([server])


def together_lines(count: int) -> list[dict[str, Any]]:
    """Together's line form: custom_id and body only."""
    return [{"custom_id": r["custom_id"], "body": r["body"]} for r in request_lines(count)]


def test_groq_sdk_runs_a_seven_day_batch(served: EngineServer, tmp_path: Path) -> None:
    """groq SDK: upload, create with completion_window 7d (deadline 7 days), results, list."""
    import groq

    client = groq.Groq(base_url=f"{served.base_url}/groq", api_key=API_KEY, max_retries=0)
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(3)))
    uploaded = client.files.create(file=path, purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="7d"
    )
    assert batch.completion_window == "7d"
    assert batch.expires_at - batch.created_at == 7 * 24 * 3600

    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b)

    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text().splitlines()]
    assert sorted(r["custom_id"] for r in lines) == ["req-0", "req-1", "req-2"]
    assert batch.id in [b.id for b in client.batches.list().data]


@pytest.mark.parametrize(
    ("root", "window", "status"),
    [
        pytest.param("/groq/openai/v1", "48h", 200, id="groq-48h"),
        pytest.param("/groq/openai/v1", "8d", 400, id="groq-over-7d"),
        pytest.param("/groq/openai/v1", "12h", 400, id="groq-under-24h"),
        pytest.param("/v1", "7d", 400, id="openai-stays-24h-only"),
    ],
)
def test_completion_windows_per_dialect(
    served: EngineServer, root: str, window: str, status: int
) -> None:
    """Groq's routes take 24h..7d; OpenAI's /v1 still refuses anything but 24h."""
    file_id = served.engine.create_file(jsonl_bytes(request_lines(1)), "in.jsonl", "batch")["id"]
    import httpx

    answer = httpx.post(
        f"{served.base_url}{root}/batches",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": window,
        },
    )
    assert answer.status_code == status, answer.text


def test_together_presigned_upload_needs_no_key_but_its_token(served: EngineServer) -> None:
    """The PUT URL is a capability: a made-up token is refused even though no key is needed."""
    import httpx

    answer = httpx.put(f"{served.base_url}/together/uploads/not-a-token", content=b"{}\n")
    assert answer.status_code == 403


@pytest.mark.parametrize("flavour", ["openai", "groq", "together"])
def test_apply_converges_and_stays_in_sync(
    flavour: str,
    served: EngineServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """apply --wait through each flavour: every result in input order, then plan is in sync."""
    monkeypatch.setenv(KEY_ENV, API_KEY)
    window = {"groq": "72h"}.get(flavour, "24h")
    ws = make_workspace(
        tmp_path / "ws",
        providers={
            "srv": {
                "type": flavour,
                "baseUrl": served.base_url + ROOTS[flavour],
                "apiKeyEnv": KEY_ENV,
            }
        },
        resources=[ResourceSpec("triage", 4, spec={"completionWindow": window})],
    )

    code, _, err = run_cli(["apply", str(ws.root), *APPLY], capsys)

    assert code == 0, err
    outputs = ws.outputs("triage")
    assert [r["custom_id"] for r in outputs] == ws.input_ids("triage")
    assert all(r["response"]["status_code"] == 200 for r in outputs)
    assert run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)[0] == 0
    [batch] = served.engine.list_batches(None, 100)["data"]
    assert batch["completion_window"] == window


@dataclass
class LoseFirstCreate:
    """ASGI middleware: Together's create reaches the engine, its answer becomes a 502."""

    app: Any
    armed: bool = True
    creates: int = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        is_create = scope["type"] == "http" and (scope["method"], scope["path"]) == (
            "POST",
            "/together/v1/batches",
        )
        if not is_create:
            await self.app(scope, receive, send)
            return
        self.creates += 1
        if not self.armed:
            await self.app(scope, receive, send)
            return
        self.armed = False

        async def swallow(message: Any) -> None:
            return None

        await self.app(scope, receive, swallow)
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def test_together_lost_create_is_adopted_not_paid_twice(tmp_path: Path) -> None:
    """The first create's answer is lost (502): the provider finds the batch that create made
    (same input file, unclaimed) in the journal's light, returns it, sends no second create;
    the batch is listed with batchspec's metadata though Together keeps none."""
    engine = Engine(tmp_path / "engine", BuiltinUpstream(), poll_interval=0.02).start()
    lossy = LoseFirstCreate(create_app(engine, api_key=API_KEY))
    server = start_in_thread(lossy)
    metadata = {
        "batchspec_resource": "r",
        "batchspec_spec": "s",
        "batchspec_shard": "0",
        "batchspec_attempt": "1",
    }
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(2)))
    provider = TogetherProvider(
        "tg",
        base_url=f"{server.base_url}/together/v1",
        api_key=API_KEY,
        data_dir=tmp_path / "journal",
        sleep=lambda _: None,
    )
    try:
        uploaded = provider.upload_file(path, filename="in.jsonl")
        made = provider.create_batch(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=metadata,
        )
        again = provider.create_batch(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=metadata,
        )
        listed = list(provider.list_batches())
    finally:
        provider.close()
        server.stop()
        engine.close()
    assert lossy.creates == 1
    assert made.id == again.id and made.metadata == metadata
    assert [(b.id, b.metadata) for b in listed] == [(made.id, metadata)]
    assert len(engine_batches := [b for b in listed if b.input_file_id == uploaded.id]) == 1
    assert engine_batches[0].status in ("validating", "in_progress", "finalizing", "completed")


def test_together_create_whose_journaled_batch_is_gone_is_sent_again_once(
    tmp_path: Path,
) -> None:
    """The journal names a batch for this key that the provider no longer has (another
    account, an expired job): the create is sent once, anew, and the journal follows the new
    batch, so a third call adopts it instead of paying again."""
    metadata = {
        "batchspec_resource": "r",
        "batchspec_spec": "s",
        "batchspec_shard": "0",
        "batchspec_attempt": "1",
    }
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(2)))
    made = []
    for n in range(2):  # the same journal, against a first then a second (empty) engine
        server = start_server(tmp_path / f"engine-{n}", api_key=API_KEY)
        provider = TogetherProvider(
            "tg",
            base_url=f"{server.base_url}/together/v1",
            api_key=API_KEY,
            data_dir=tmp_path / "journal",
            sleep=lambda _: None,
        )
        try:
            uploaded = provider.upload_file(path, filename="in.jsonl")
            for _ in range(2):
                made.append(
                    provider.create_batch(
                        input_file_id=uploaded.id,
                        endpoint="/v1/chat/completions",
                        completion_window="24h",
                        metadata=metadata,
                    ).id
                )
            listed = [b.id for b in provider.list_batches()]
        finally:
            provider.close()
            server.stop()
        assert listed == [made[-1]]
    assert made[0] == made[1] and made[2] == made[3] and made[1] != made[2]


@dataclass
class Recorder:
    """ASGI middleware: what each request carried (header, query, form field, JSON body)."""

    app: Any
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        headers = dict(scope["headers"])
        self.seen.append(
            {
                "route": f"{scope['method']} {scope['path']}",
                "header": headers.get(LITELLM_PROVIDER_HEADER.encode(), b"").decode() or None,
                "body": body,
            }
        )

        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:  # after the body, pass through (a disconnect, for streaming answers)
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def test_litellm_provider_goes_on_every_call(served: EngineServer, tmp_path: Path) -> None:
    """litellmProvider: the custom-llm-provider header on upload, create, get, list, cancel and
    content; the form field on the upload and the body field on the create, as LiteLLM reads."""
    recorder = Recorder(create_app(served.engine, api_key=API_KEY))
    background = start_in_thread(recorder)
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(2)))
    provider = OpenAIProvider(
        "proxy",
        base_url=f"{background.base_url}/v1",
        api_key=API_KEY,
        litellm_provider="azure",
        max_retries=0,
    )
    try:
        uploaded = provider.upload_file(path, filename="in.jsonl")
        batch = provider.create_batch(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"k": "v"},
        )
        provider.get_batch(batch.id)
        list(provider.list_batches())
        with contextlib.suppress(ProviderError):  # 409 once the batch has already completed
            provider.cancel_batch(batch.id)
        provider.get_file(uploaded.id)
        provider.download_file(uploaded.id, tmp_path / "copy.jsonl")
    finally:
        provider.close()
        background.stop()
    calls = [
        "POST /v1/files",
        "POST /v1/batches",
        f"GET /v1/batches/{batch.id}",
        "GET /v1/batches",
        f"POST /v1/batches/{batch.id}/cancel",
        f"GET /v1/files/{uploaded.id}",
        f"GET /v1/files/{uploaded.id}/content",
    ]
    # a batch that completed before the cancel arrived answers 409; the provider then reads
    # the batch back (one more GET): which happens first is the engine's timing
    after_409 = [*calls[:5], f"GET /v1/batches/{batch.id}", *calls[5:]]
    assert [seen["route"] for seen in recorder.seen] in (calls, after_409)
    assert all(seen["header"] == "azure" for seen in recorder.seen)
    upload, create = recorder.seen[0], recorder.seen[1]
    assert b'name="custom_llm_provider"\r\n\r\nazure' in upload["body"]
    assert json.loads(create["body"])["custom_llm_provider"] == "azure"


def test_together_custom_id_over_64_chars_is_refused_at_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Together takes custom_ids of at most 64 characters: a longer one fails validate with
    its file:line, before anything is uploaded (an openai provider takes the same file)."""
    lines = request_lines(2)
    lines[1]["custom_id"] = "x" * 65
    for flavour, expected in (("together", 1), ("openai", 0)):
        ws = make_workspace(
            tmp_path / flavour,
            providers={"srv": {"type": flavour, "baseUrl": "http://127.0.0.1:9/v1"}},
            resources=[ResourceSpec("long-ids", 2)],
        )
        ws.write_input("long-ids", lines)

        code, out, err = run_cli(["validate", str(ws.root)], capsys)

        assert code == expected, out + err
        if expected:
            assert "long-ids.jsonl:2" in err and "custom_id" in err
