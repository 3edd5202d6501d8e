"""The `local` provider: the engine in-process, through the Provider protocol."""

from __future__ import annotations

import time

import pytest
from servers import jsonl_bytes, read_jsonl, request_lines, wait_for

from batchspec.engine import BuiltinUpstream, Engine
from batchspec.errors import ProviderError, StateLockedError
from batchspec.providers.base import Provider, RemoteNotFound
from batchspec.providers.local import LocalProvider

FAST = {"poll_interval": 0.02, "commit_interval": 0.01, "retry_base_delay": 0.001}


def test_local_provider_satisfies_the_protocol_and_runs_a_batch(tmp_path):
    """upload → create → get until completed → download, all through Provider methods."""
    input_path = tmp_path / "input.jsonl"
    input_path.write_bytes(jsonl_bytes(request_lines(6)))
    with LocalProvider("local", tmp_path / "engine", **FAST) as provider:
        assert isinstance(provider, Provider)
        uploaded = provider.upload_file(input_path, filename="input.jsonl")
        assert provider.get_file(uploaded.id).bytes == input_path.stat().st_size
        batch = provider.create_batch(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"batchspec-key": "k1"},
        )
        assert batch.status == "validating" and batch.metadata == {"batchspec-key": "k1"}
        done = wait_for(lambda: (b := provider.get_batch(batch.id)).is_terminal and b)
        assert done.status == "completed"
        assert done.request_counts.completed == 6
        assert done.usage.total_tokens > 0
        written = provider.download_file(done.output_file_id, tmp_path / "out" / "output.jsonl")
        output = read_jsonl((tmp_path / "out" / "output.jsonl").read_text())
    assert written == (tmp_path / "out" / "output.jsonl").stat().st_size
    assert len(output) == 6


def test_local_provider_lists_all_batches_across_pages(tmp_path):
    """list_batches follows pagination lazily, newest first."""
    input_path = tmp_path / "input.jsonl"
    input_path.write_bytes(jsonl_bytes(request_lines(1)))
    with LocalProvider("local", tmp_path / "engine", **FAST) as provider:
        file_id = provider.upload_file(input_path, filename="input.jsonl").id
        ids = [
            provider.create_batch(
                input_file_id=file_id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"n": str(i)},
            ).id
            for i in range(5)
        ]
        assert [b.id for b in provider.list_batches(page_size=2)] == ids[::-1]
        assert [b.id for b in provider.list_batches(page_size=2, after=ids[3])] == ids[2::-1]


def test_local_provider_maps_engine_errors(tmp_path):
    """404 → RemoteNotFound, other refusals → ProviderError with the engine's status."""
    with LocalProvider("local", tmp_path / "engine", **FAST) as provider:
        with pytest.raises(RemoteNotFound) as missing:
            provider.get_batch("batch_nope")
        assert missing.value.status == 404
        with pytest.raises(RemoteNotFound):
            provider.download_file("file-nope", tmp_path / "x")
        with pytest.raises(ProviderError) as bad:
            provider.create_batch(
                input_file_id="file-nope",
                endpoint="/v1/nope",
                completion_window="24h",
                metadata={},
            )
        assert bad.value.status == 400 and "local" in str(bad.value)


def test_local_provider_cancel_and_resume_after_close(tmp_path):
    """A batch left running at close() resumes at the next open; cancel works in-process."""
    input_path = tmp_path / "input.jsonl"
    input_path.write_bytes(jsonl_bytes(request_lines(10)))
    provider = LocalProvider("local", tmp_path / "engine", concurrency=1, **FAST)
    file_id = provider.upload_file(input_path, filename="input.jsonl").id
    kept = provider.create_batch(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"n": "kept"},
    )  # fmt: skip
    provider.close()  # closed before (or while) the batch runs: it must wait, not be lost
    slow = BuiltinUpstream(latency=0.05)
    with LocalProvider("local", tmp_path / "engine", upstream=slow, **FAST) as again:
        done = wait_for(lambda: (b := again.get_batch(kept.id)).is_terminal and b)
        assert done.status == "completed"
        other = again.create_batch(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"n": "cancelled"},
        )  # fmt: skip
        assert again.cancel_batch(other.id).status == "cancelling"
        ended = wait_for(lambda: (b := again.get_batch(other.id)).is_terminal and b)
        assert ended.status == "cancelled"
        assert ended.request_counts.completed < 10


def test_a_cancel_that_opens_the_engine_sends_nothing_of_the_batch_it_cancels(
    tmp_path, monkeypatch
):
    """`batchspec cancel` on a batch of the local engine (the engine opened to cancel it):
    the cancel lands before the worker starts. Started first, the worker resumed the batch
    and sent requests of the very batch being cancelled (paid for, then waited for)."""
    input_path = tmp_path / "input.jsonl"
    input_path.write_bytes(jsonl_bytes(request_lines(6)))
    slow = BuiltinUpstream(latency=5.0)
    first = LocalProvider("local", tmp_path / "engine", upstream=slow, drain_timeout=0, **FAST)
    file_id = first.upload_file(input_path, filename="input.jsonl").id
    batch = first.create_batch(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={},
    )  # fmt: skip
    wait_for(lambda: first.get_batch(batch.id).status == "in_progress" and slow.calls)
    first.close()  # left in progress, its lines to resume at the next start
    counted = BuiltinUpstream()
    cancel = Engine.cancel_batch

    def cancel_once_a_worker_had_time(engine: Engine, batch_id: str) -> dict:
        deadline = time.monotonic() + 0.3  # a started worker sends within milliseconds
        while not counted.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        return cancel(engine, batch_id)

    monkeypatch.setattr(Engine, "cancel_batch", cancel_once_a_worker_had_time)
    with LocalProvider("local", tmp_path / "engine", upstream=counted, **FAST) as again:
        assert again.cancel_batch(batch.id).status == "cancelling"
        ended = wait_for(lambda: (b := again.get_batch(batch.id)).is_terminal and b)
    assert ended.status == "cancelled"
    assert not counted.calls


def test_local_provider_cancel_of_a_batch_that_ended_returns_it_as_it_is(tmp_path):
    """A cancel that reaches a completed batch (the engine's 409) returns the batch, completed,
    instead of failing, as the OpenAI-compatible provider does."""
    input_path = tmp_path / "input.jsonl"
    input_path.write_bytes(jsonl_bytes(request_lines(2)))
    with LocalProvider("local", tmp_path / "engine", **FAST) as provider:
        file_id = provider.upload_file(input_path, filename="input.jsonl").id
        batch = provider.create_batch(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={},
        )  # fmt: skip
        wait_for(lambda: provider.get_batch(batch.id).is_terminal)

        ended = provider.cancel_batch(batch.id)

        assert (ended.id, ended.status) == (batch.id, "completed")
        assert ended.request_counts.completed == 2


def test_local_provider_opens_lazily_and_refuses_a_busy_folder(tmp_path):
    """Building the provider does no I/O; using a folder another engine holds fails clearly."""
    lazy = LocalProvider("local", tmp_path / "never")
    lazy.close()
    assert not (tmp_path / "never").exists()
    assert lazy.requests_in_flight() == (0, 0.0)  # no engine: nothing for a close to wait for
    with LocalProvider("a", tmp_path / "engine", **FAST) as first:
        assert list(first.list_batches()) == []  # opens the engine
        assert first.requests_in_flight() == (0, 30.0)  # what apply's last line reads
        with pytest.raises(StateLockedError):
            _ = LocalProvider("b", tmp_path / "engine").engine
    with LocalProvider("c", tmp_path / "engine", **FAST) as third:  # free again
        assert list(third.list_batches()) == []


def test_an_unset_upstream_key_fails_apply_before_anything_is_recorded(
    tmp_path, capsys, monkeypatch
):
    """A local provider whose upstreamApiKeyEnv is unset: plan warns, apply exits 1 naming the
    project key and records no generation, so a later spec change is a create, not a replace."""
    from workspaces import ResourceSpec, make_workspace, run_cli

    monkeypatch.delenv("BATCHSPEC_TEST_UPSTREAM_KEY", raising=False)
    provider = {
        "type": "local",
        "options": {
            "upstream": "http://127.0.0.1:9/v1",  # never reached: the key is missing first
            "upstreamApiKeyEnv": "BATCHSPEC_TEST_UPSTREAM_KEY",
        },
    }
    ws = make_workspace(
        tmp_path / "ws", providers={"srv": provider}, resources=[ResourceSpec("triage")]
    )
    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 0 and "BATCHSPEC_TEST_UPSTREAM_KEY is not set here" in err, (out, err)
    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 1
    assert "providers.srv.options.upstreamApiKeyEnv" in err and "--upstream-api-key" not in err
    with ws.store() as store:
        assert store.list_resources() == []
    ws.write_input("triage", request_lines(2, prefix="changed"))
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert code == 0 and "create" in out and "replace" not in out


def test_an_unknown_batch_says_where_this_engine_keeps_its_batches(tmp_path):
    """A batch this engine does not have (recorded by another checkout's engine, through a
    shared state) is RemoteNotFound naming the data folder and the way to share an engine."""
    with (
        LocalProvider("local", tmp_path / "engine", **FAST) as provider,
        pytest.raises(RemoteNotFound) as caught,
    ):
        provider.get_batch("batch_from_another_checkout")
    details = " ".join(caught.value.details)
    assert str(tmp_path / "engine") in details and "batchspec serve" in details


def test_a_local_providers_request_timeout_is_its_request_timeout_option(tmp_path, capsys):
    """`requestTimeout` of a local provider is what `batchspec serve --request-timeout` is:
    how long one request to its model server may take. There was no such option: a model
    server whose long answers take more than 60 s had every request timed out, with no way
    to say otherwise in batchspec.yaml."""
    from servers import start_recording_upstream
    from workspaces import ResourceSpec, make_workspace, run_cli

    slow = start_recording_upstream(latency=0.8)
    try:
        provider = {
            "type": "local",
            "options": {"upstream": slow.v1, "requestTimeout": 0.3, "dataDir": "state/gpus"},
        }
        ws = make_workspace(
            tmp_path / "ws",
            providers={"gpus": provider},
            resources=[
                ResourceSpec("slow", count=1, provider="gpus", spec={"retry": {"maxAttempts": 1}})
            ],
        )
        code, out, err = run_cli(["apply", str(ws.root), "--wait", "--timeout", "60"], capsys)
    finally:
        slow.stop()
    assert code == 4, (out, err)
    [line] = read_jsonl(ws.errors_path("slow").read_bytes())
    assert "did not answer within 0.3 s" in line["error"]["message"]
