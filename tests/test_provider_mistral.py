"""The mistral provider: statuses and lines, the provider against our server, validate and apply.

The server is the engine's Mistral dialect (``/v1/batch/jobs`` beside ``/v1/files``) on
loopback, behind a ``RequestProbe`` (tests/probes.py) that counts requests per route and
can hold one, so a create whose answer is lost is real timing, not a mock.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from probes import ProbedServer, route_of
from scripted_server import ScriptedServer, json_answer
from servers import jsonl_bytes, read_jsonl, request_lines, wait_for
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    batchspec_cmd,
    make_workspace,
    run_cli,
)

from batchspec.engine import BuiltinUpstream
from batchspec.engine.mistral_routes import MistralJobs
from batchspec.errors import InputError, ProviderError
from batchspec.providers.base import Provider, RemoteBatch, RemoteNotFound, find_batch_by_key
from batchspec.providers.mistral import MistralProvider, parse_job
from batchspec.wire import mistral_lines
from batchspec.wire.outcomes import classify_result_line

MODEL = "mistral-small-latest"
CREATE = route_of("POST", "/v1/batch/jobs")
UPLOAD = route_of("POST", "/v1/files")
CHAT = "/v1/chat/completions"
FAST = ["--poll-interval", "0.05"]
MISTRAL_LINES = [{"custom_id": "d-0", "body": {"messages": [{"role": "user", "content": "Hi"}]}}]
KEYS = {
    "batchspec_resource": "t",
    "batchspec_spec": "ab" * 32,
    "batchspec_shard": "0",
    "batchspec_attempt": "1",
}


# ---------------------------------------------------------------------------------------------
# statuses, windows and lines (pure)


@pytest.mark.parametrize(
    ("mistral", "ours"),
    [
        ("QUEUED", "validating"),
        ("RUNNING", "in_progress"),
        ("SUCCESS", "completed"),
        ("FAILED", "failed"),
        ("TIMEOUT_EXCEEDED", "expired"),
        ("CANCELLATION_REQUESTED", "cancelling"),
        ("CANCELLED", "cancelled"),
        ("PAUSED", "paused"),
    ],
)
def test_job_statuses_map_to_ours(mistral: str, ours: str) -> None:
    """Each Mistral job status maps as documented; an unknown one is kept (never terminal)."""
    batch = parse_job({"id": "j", "status": mistral})
    assert batch.status == ours
    assert batch.is_terminal == (ours in ("completed", "failed", "expired", "cancelled"))


def test_a_job_object_reads_as_a_remote_batch() -> None:
    """Counts, files, metadata, errors and times of a BatchJobOut become a RemoteBatch."""
    batch = parse_job(
        {
            "id": "j1",
            "status": "SUCCESS",
            "input_files": ["f1", "f2"],
            "endpoint": CHAT,
            "output_file": "out",
            "error_file": None,
            "metadata": {"batchspec_resource": "t"},
            "errors": [{"message": "2 lines had no body", "count": 2}],
            "total_requests": 5,
            "succeeded_requests": 4,
            "failed_requests": 1,
            "created_at": 100,
            "completed_at": 200,
        }
    )
    assert (batch.input_file_id, batch.output_file_id, batch.error_file_id) == ("f1", "out", None)
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (5, 4)
    assert batch.request_counts.failed == 1 and batch.metadata == {"batchspec_resource": "t"}
    assert batch.errors[0].message == "2 lines had no body"
    assert (batch.created_at, batch.completed_at) == (100, 200)


@pytest.mark.parametrize(
    ("window", "hours"), [("24h", 24), ("2d", 48), ("7d", 168), ("30d", 168), ("soon", 24)]
)
def test_completion_windows_become_timeout_hours(window: str, hours: int) -> None:
    """completion_window -> timeout_hours, capped at 168, Mistral's default for nonsense."""
    assert mistral_lines.timeout_hours(window) == hours


def test_a_line_loses_method_url_and_model_which_goes_to_the_job() -> None:
    """to_line keeps custom_id and the body without its model; the model is returned."""
    [line] = request_lines(1, model=MODEL)
    converted, model = mistral_lines.to_line(line)
    assert model == MODEL
    assert converted == {
        "custom_id": "req-0",
        "body": {"messages": line["body"]["messages"]},
    }


# ---------------------------------------------------------------------------------------------
# The provider against our server


def provider_for(srv: ProbedServer, data_dir: Path, **kwargs: Any) -> MistralProvider:
    options: dict[str, Any] = {"api_key": SENTINEL_KEY, "timeout": 10.0, **kwargs}
    return MistralProvider("mis", base_url=srv.base_url, data_dir=data_dir, **options)


def stage(provider: MistralProvider, tmp_path: Path, lines: list[dict[str, Any]]) -> str:
    source = tmp_path / f"in-{time.monotonic_ns()}.jsonl"
    source.write_bytes(jsonl_bytes(lines))
    return provider.upload_file(source, filename="in.jsonl").id


def create(provider: MistralProvider, file_id: str, **keys: str) -> RemoteBatch:
    return provider.create_batch(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata={**KEYS, **keys}
    )


def ended(provider: MistralProvider, batch_id: str) -> RemoteBatch:
    return wait_for(lambda: (b := provider.get_batch(batch_id)).is_terminal and b)


def test_provider_satisfies_the_protocol(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """MistralProvider is a providers.base.Provider."""
    with provider_for(server(), tmp_path / "p") as provider:
        assert isinstance(provider, Provider)


def test_stage_convert_upload_create_and_collect(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """Nothing is sent on upload; the create uploads Mistral's lines (no method, url or
    model) and creates one job naming the model and batchspec's key; the job ends
    completed with its counts, its output downloads as our lines, and the listed job reads
    its metadata back."""
    srv = server()
    with provider_for(srv, tmp_path / "p") as provider:
        file_id = stage(provider, tmp_path, request_lines(3, model=MODEL))
        assert file_id.startswith("staged-") and sum(srv.probe.counts.values()) == 0
        batch = create(provider, file_id, team="triage")
        assert batch.metadata == {**KEYS, "team": "triage"} and batch.status == "validating"
        done = ended(provider, batch.id)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed) == (3, 3)
        assert done.output_file_id and done.error_file_id is None
        provider.download_file(done.output_file_id, tmp_path / "out.jsonl")
        lines = read_jsonl((tmp_path / "out.jsonl").read_text())
        assert sorted(r["custom_id"] for r in lines) == ["req-0", "req-1", "req-2"]
        assert all(classify_result_line(r).state == "ok" for r in lines)
        assert [b.id for b in provider.list_batches()] == [batch.id]
        uploaded = provider.get_file(str(done.input_file_id))
        assert uploaded.bytes
    assert srv.probe.counts[CREATE] == 1 and srv.probe.counts[UPLOAD] == 1
    [job] = srv.engine.list_batches(None, 100)["data"]
    assert job["model"] == MODEL
    sent = srv.engine.list_files("batch", order="asc")["data"][0]
    sent_lines = read_jsonl(srv.engine.file_content_path(sent["id"]).read_text())
    assert set(sent_lines[0]) == {"custom_id", "body"} and "model" not in sent_lines[0]["body"]


def test_a_staged_input_mixing_models_is_refused_before_anything_is_sent(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """A Mistral job runs one model: an input whose lines name two (one that escaped validate)
    fails the create at its line with nothing uploaded nor created, rather than billing every
    line at the first line's model."""
    srv = server()
    lines = [*request_lines(1, model=MODEL), *request_lines(1, model="mistral-large-latest")]
    with provider_for(srv, tmp_path / "p") as provider:
        file_id = stage(provider, tmp_path, lines)
        with pytest.raises(InputError, match=r":2: a Mistral batch job takes one model"):
            create(provider, file_id)
    assert sum(srv.probe.counts.values()) == 0


def test_a_staged_input_reads_back_until_it_is_removed(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """A staged input downloads byte for byte; once its file is gone it is "not found", so
    the submit step stages it again instead of creating a job from nothing."""
    lines = request_lines(2, model=MODEL)
    with provider_for(server(), tmp_path / "p") as provider:
        file_id = stage(provider, tmp_path, lines)
        assert provider.download_file(file_id, tmp_path / "back.jsonl") > 0
        assert (tmp_path / "back.jsonl").read_bytes() == jsonl_bytes(lines)
        for staged in (tmp_path / "p" / "files").iterdir():
            staged.unlink()
        with pytest.raises(RemoteNotFound):
            provider.get_file(file_id)


def test_list_pages_through_every_job(server: Callable[..., ProbedServer], tmp_path: Path) -> None:
    """list_batches follows page/page_size to the end, newest first; from a cursor (read on
    our side: Mistral pages by number), the jobs listed after that one."""
    srv = server()
    with provider_for(srv, tmp_path / "p") as provider:
        made = [
            create(provider, stage(provider, tmp_path, request_lines(1, model=MODEL)), n=str(i)).id
            for i in range(5)
        ]
        assert [b.id for b in provider.list_batches(page_size=2)] == list(reversed(made))
        assert [b.id for b in provider.list_batches(page_size=2, after=made[3])] == [
            made[2],
            made[1],
            made[0],
        ]


def test_a_key_lookup_reads_past_an_older_job_listed_before_the_keys_job(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """Mistral documents no order for its listing: a job older than the lookup's window,
    listed before the key's job, must not end the scan (it did: the key's job was missed, and
    a lost state or a lost create answer had it created, and paid for, again)."""
    srv = server()
    with provider_for(srv, tmp_path / "p") as provider:
        lines = request_lines(1, model=MODEL)
        wanted = create(provider, stage(provider, tmp_path, lines))
        other = create(provider, stage(provider, tmp_path, lines), batchspec_shard="1")
        with srv.engine.store.write() as db:  # made three days ago, and listed first
            db.execute(
                "UPDATE batches SET created_at = created_at - 259200 WHERE id = ?", (other.id,)
            )
        listed = [(b.id, b.created_at or 0) for b in provider.list_batches()]
        found = find_batch_by_key(provider, KEYS, since=time.time() - 25 * 3600)
    assert [i for i, _ in listed] == [other.id, wanted.id] and listed[0][1] < listed[1][1]
    assert found.batch is not None and found.batch.id == wanted.id
    assert (found.listed, found.stopped_at_window) == (2, False)


def test_cancel_ends_cancelled_and_unrun_requests_are_retryable(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """cancel -> cancelling/cancelled; requests that never ran are batch_cancelled lines."""
    srv = server(upstream=BuiltinUpstream(latency=0.5), concurrency=1)
    with provider_for(srv, tmp_path / "p") as provider:
        batch = create(provider, stage(provider, tmp_path, request_lines(6, model=MODEL)))
        wait_for(lambda: provider.get_batch(batch.id).status == "in_progress")
        assert provider.cancel_batch(batch.id).status in ("cancelling", "cancelled")
        done = ended(provider, batch.id)
        assert done.status == "cancelled" and done.error_file_id
        provider.download_file(done.error_file_id, tmp_path / "e.jsonl")
    lines = read_jsonl((tmp_path / "e.jsonl").read_text())
    assert lines and all(classify_result_line(r).state == "retryable" for r in lines)


def test_lost_create_answer_is_found_by_metadata_not_sent_again(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """The create's answer is held past the client's timeout, and meanwhile a newer job of
    another attempt appears: the provider lists the jobs with batchspec's key as the
    metadata filter and returns the one its create made; the create was sent once."""
    srv = server()
    held = srv.probe.hold(CREATE, 2.0, after=True)
    decoy_input = srv.engine.create_file(jsonl_bytes(MISTRAL_LINES), "decoy.jsonl", "batch")
    decoy_create = {
        "input_files": [decoy_input["id"]],
        "endpoint": CHAT,
        "model": MODEL,
        "metadata": {**KEYS, "batchspec_attempt": "2"},
    }
    decoy = threading.Thread(
        target=lambda: held.wait(10) and MistralJobs(srv.engine).create(decoy_create)
    )
    decoy.start()
    with provider_for(srv, tmp_path / "p", timeout=0.5) as provider:
        batch = create(provider, stage(provider, tmp_path, request_lines(2, model=MODEL)))
    decoy.join()
    srv.probe.release(CREATE)
    assert batch.metadata == KEYS and batch.request_counts is not None
    assert batch.request_counts.total == 2
    assert srv.probe.counts[CREATE] == 1 and srv.batch_count() == 2


def test_a_listing_that_gives_the_same_page_again_raises(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """A server that ignores ``page`` and never says ``total`` answers every page with the
    first one, full: the listing raises at the second, naming it, instead of paging forever
    (a lost create's lookup by metadata held the run until CI killed it)."""
    jobs = [{"id": f"job-{n}", "status": "RUNNING", "metadata": {}} for n in range(2)]
    scripted.script(then=json_answer(200, {"object": "list", "data": jobs}))
    provider = MistralProvider(
        "mis", base_url=scripted.base_url, data_dir=tmp_path, api_key=SENTINEL_KEY
    )
    listed = provider.list_batches(page_size=2)
    with pytest.raises(ProviderError, match="pagination came back to a page"):
        list(itertools.islice(listed, 10))
    assert len(scripted.requests) == 2


def test_a_listing_answered_200_with_no_data_list_raises(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """A 200 whose JSON object holds no ``data`` list is not an empty listing: it raises
    (read as one, a lookup by key found nothing and the job was created, and paid, again)."""
    scripted.script(then=json_answer(200, {"detail": "busy"}))
    provider = MistralProvider(
        "mis", base_url=scripted.base_url, data_dir=tmp_path, api_key=SENTINEL_KEY
    )
    with pytest.raises(ProviderError, match="not a listing"):
        next(iter(provider.list_batches()))


def test_wrong_key_is_a_clear_401(server: Callable[..., ProbedServer], tmp_path: Path) -> None:
    """A wrong bearer key: HTTP 401 naming $MISTRAL_API_KEY, the key never shown."""
    srv = server()
    wrong = "mistral-wrong-0123456789abcdef"
    with (
        provider_for(srv, tmp_path / "p", api_key=wrong, max_retries=0) as provider,
        pytest.raises(ProviderError) as raised,
    ):
        next(iter(provider.list_batches()))
    assert raised.value.status == 401
    assert "$MISTRAL_API_KEY" in str(raised.value) and wrong not in str(raised.value)


# ---------------------------------------------------------------------------------------------
# validate and apply with a mistral provider


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    return SENTINEL_KEY


def mistral_workspace(root: Path, base_url: str, *resources: ResourceSpec) -> Any:
    provider: dict[str, Any] = {"type": "mistral", "baseUrl": base_url, "apiKeyEnv": KEY_ENV}
    return make_workspace(root, providers={"mis": provider}, resources=resources)


def test_validate_refuses_a_line_without_a_model_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batchspec validate` names file:line of a chat line with no model, of a moderation
    line with no model (which OpenAI would take), and of an endpoint Mistral does not run."""
    moderation = "/v1/moderations"
    ws = mistral_workspace(
        tmp_path,
        "http://127.0.0.1:9",
        ResourceSpec("c", 3, "mis"),
        ResourceSpec("m", 2, "mis", {"endpoint": moderation}),
        ResourceSpec("p", 1, "mis", {"endpoint": "/v1/completions"}),
    )
    for name in ("c", "m"):  # no manifest model: the lines must name it
        doc = yaml.safe_load(ws.manifest_path(name).read_text())
        del doc["spec"]["model"]
        ws.manifest_path(name).write_text(yaml.safe_dump(doc))
    chat = request_lines(3)
    del chat[1]["body"]["model"]
    ws.write_input("c", chat)
    unnamed = [{**line, "body": {"input": "x"}} for line in request_lines(2, endpoint=moderation)]
    ws.write_input("m", unnamed)
    ws.write_input("p", request_lines(1, endpoint="/v1/completions", model="test-model"))
    code, out, err = run_cli(["validate", str(ws.root)], capsys)
    assert code == 1
    assert "c.jsonl:2" in out + err and "body.model is missing" in out + err
    assert "m.jsonl:1" in out + err and "m.jsonl:2" in out + err
    assert "p.jsonl:1" in out + err and "cannot run in a Mistral batch job" in out + err


def test_apply_end_to_end_with_a_mistral_provider(
    server: Callable[..., ProbedServer],
    tmp_path: Path,
    api_key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`batchspec apply --wait` converges on Mistral batch jobs against serve: results in
    input order, one upload and one create, and the next plan has nothing to do."""
    srv = server(api_key=SENTINEL_KEY)
    ws = mistral_workspace(tmp_path / "ws", srv.base_url, ResourceSpec("t", 4, "mis"))

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    outputs = ws.outputs("t")
    assert [r["custom_id"] for r in outputs] == ws.input_ids("t")
    assert all(r["response"]["body"]["choices"] for r in outputs)
    assert srv.probe.counts[CREATE] == 1 and srv.probe.counts[UPLOAD] == 1
    [job] = srv.engine.list_batches(None, 100)["data"]
    assert job["metadata"]["batchspec_resource"] == "t"
    code, _, err = run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)
    assert code == 0, err


def test_apply_killed_after_the_create_reached_mistral_adopts_it(
    server: Callable[..., ProbedServer],
    tmp_path: Path,
    api_key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGKILL after the engine created the job but before its answer arrived: the re-run
    finds it by its metadata and adopts it; one create in all, complete results."""
    srv = server(api_key=SENTINEL_KEY)
    ws = mistral_workspace(tmp_path / "ws", srv.base_url, ResourceSpec("t", 3, "mis"))
    created = srv.probe.hold(CREATE, 30.0, after=True)
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes"),
        env={**os.environ, KEY_ENV: SENTINEL_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert created.wait(20), "the create never reached the server"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    srv.probe.release(CREATE)
    with ws.store() as store:
        [intent] = store.batches()
    assert (intent.remote_id, intent.status) == (None, "creating")

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)

    assert code == 0, err
    assert srv.probe.counts[CREATE] == 1 and srv.batch_count() == 1
    assert [r["custom_id"] for r in ws.outputs("t")] == ws.input_ids("t")
    with ws.store() as store:
        actions = [e.action for e in store.events(resource="t")]
    assert "adopt" in actions and "create" not in actions
    assert json.dumps(srv.engine.list_batches(None, 100)["data"][0]["metadata"])
