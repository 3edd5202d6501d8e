"""Together's provider and the engine's ``/together/v1`` routes, edge by edge, over loopback.

The happy path (upload, create, poll, collect) runs in tests/test_provider_flavours.py; here
are the answers that decide money and data: a create begun but never answered is adopted,
not paid twice; a cancel of a finished job is no error; the upload stages exactly the lines
Together takes; and the routes refuse what Together refuses. A small starlette app plays a
Together that answers oddly (a known checksum, a bare 200, a list that is not JSON).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from probes import ProbedServer, route_of
from servers import (
    EngineServer,
    jsonl_bytes,
    request_lines,
    start_server,
    stop_after_test,
    wait_for,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchspec.engine.server import start_in_thread
from batchspec.errors import ProviderError
from batchspec.providers.base import AmbiguousOutcome
from batchspec.providers.journal import Journal, JournalEntry, metadata_key
from batchspec.providers.together import TogetherProvider

API_KEY = "sk-together-test-key-3f9b"
ROOT = "/together/v1"
METADATA = {
    "batchspec_resource": "r",
    "batchspec_spec": "s",
    "batchspec_shard": "0",
    "batchspec_attempt": "1",
}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[EngineServer]:
    server = start_server(tmp_path / "engine", api_key=API_KEY)
    yield server
    stop_after_test([server])


def provider_for(base_url: str, journal: Path) -> TogetherProvider:
    return TogetherProvider(
        "tg", base_url=base_url, api_key=API_KEY, data_dir=journal, sleep=lambda _: None
    )


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def create(provider: TogetherProvider, file_id: str) -> Any:
    return provider.create_batch(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=METADATA,
    )


# -- the provider against the engine -------------------------------------------------------------


def test_an_upload_sends_only_custom_id_and_body_lines_under_a_jsonl_name(
    served: EngineServer, tmp_path: Path
) -> None:
    """A batch file with blank lines, named without .jsonl: Together receives one
    ``{custom_id, body}`` line per request (no method/url, no blank line it would reject) under
    a .jsonl name, and the staging copy is gone afterwards."""
    lines = request_lines(3)
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(jsonl_bytes([line]).rstrip(b"\n") for line in lines) + b"\n\n\n")
    provider = provider_for(f"{served.base_url}{ROOT}", tmp_path / "journal")
    try:
        uploaded = provider.upload_file(path, filename="triage-s1-a1")
    finally:
        provider.close()
    assert uploaded.filename == "triage-s1-a1.jsonl"
    sent = served.engine.file_content_path(uploaded.id).read_bytes().splitlines()
    assert [json.loads(x) for x in sent] == [
        {"custom_id": r["custom_id"], "body": r["body"]} for r in lines
    ]
    assert list((tmp_path / "journal" / "staging").iterdir()) == []


def test_an_input_line_that_is_not_json_leaves_no_staged_copy(
    served: EngineServer, tmp_path: Path
) -> None:
    """A batch file with a broken line fails the upload before anything is announced, and the
    half-written staging file is removed (a crash loop would otherwise fill the disk)."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(1)) + b"{not json\n")
    provider = provider_for(f"{served.base_url}{ROOT}", tmp_path / "journal")
    try:
        with pytest.raises(ValueError):
            provider.upload_file(path, filename="in.jsonl")
    finally:
        provider.close()
    assert list((tmp_path / "journal" / "staging").iterdir()) == []
    assert served.engine.list_files("batch")["data"] == []


def lost_create(served: EngineServer, provider: Any, tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    """An uploaded input whose create the journal holds as begun and never answered, and the
    batch that create made at the server (sent straight to it): a run killed between its
    create and its state write."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(2)))
    uploaded = provider.upload_file(path, filename="in.jsonl")
    journal = Journal(tmp_path / "journal")
    journal.begin(
        JournalEntry(
            key=metadata_key(METADATA),
            metadata=METADATA,
            endpoint="/v1/chat/completions",
            file_id=uploaded.id,
            requests=0,
            ids_sha256="",
            started_at=time.time(),
        )
    )
    journal.close()
    lost = httpx.post(
        f"{served.base_url}{ROOT}/batches",
        headers=auth(),
        json={"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions"},
    ).json()["job"]
    return uploaded, lost


def test_a_create_begun_but_never_answered_is_adopted_on_the_next_call(
    served: EngineServer, tmp_path: Path
) -> None:
    """The journal holds a create that was sent but whose answer never came (the process died):
    the next create finds the batch that send made (same input file, unclaimed, newer than the
    journal entry) and adopts it with batchspec's metadata; no second batch is paid for."""
    provider = provider_for(f"{served.base_url}{ROOT}", tmp_path / "journal")
    try:
        uploaded, lost = lost_create(served, provider, tmp_path)

        adopted = create(provider, uploaded.id)
        listed = list(provider.list_batches())
    finally:
        provider.close()
    assert adopted.id == lost["id"] and adopted.metadata == METADATA
    assert [(b.id, b.metadata) for b in listed] == [(lost["id"], METADATA)]


def test_a_batch_a_lost_create_made_is_listed_with_its_key(
    served: EngineServer, tmp_path: Path
) -> None:
    """A create sent whose answer never came (the run was killed) made a batch: the listing
    shows that batch with the journaled key at once (the only unclaimed batch of that input
    file made since), so the next run's key lookup adopts it; it found nothing, and the run
    waited out createConfirmSeconds (by default the timeout plus 60 s) before adopting it."""
    provider = provider_for(f"{served.base_url}{ROOT}", tmp_path / "journal")
    try:
        uploaded, lost = lost_create(served, provider, tmp_path)

        listed = [(b.id, b.metadata) for b in provider.list_batches()]
        again = provider.get_batch(lost["id"]).metadata
    finally:
        provider.close()
    assert listed == [(lost["id"], METADATA)]
    assert again == METADATA


def test_a_create_begun_whose_send_made_nothing_is_sent_once(
    served: EngineServer, tmp_path: Path
) -> None:
    """The journal holds a create begun but never answered, and the provider lists no batch it
    could have made: the create is sent (once), so a lost request is not a lost job."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(2)))
    provider = provider_for(f"{served.base_url}{ROOT}", tmp_path / "journal")
    try:
        uploaded = provider.upload_file(path, filename="in.jsonl")
        journal = Journal(tmp_path / "journal")
        entry = JournalEntry(
            key=metadata_key(METADATA),
            metadata=METADATA,
            endpoint="/v1/chat/completions",
            file_id=uploaded.id,
            requests=0,
            ids_sha256="",
            started_at=time.time(),
        )
        journal.begin(entry)
        journal.close()

        made = create(provider, uploaded.id)
        again = create(provider, uploaded.id)
    finally:
        provider.close()
    assert made.id == again.id and made.metadata == METADATA
    assert [b["id"] for b in served.engine.list_batches(None, 100)["data"]] == [made.id]


def test_cancelling_a_finished_job_answers_it_as_it_ended(
    served: EngineServer, tmp_path: Path
) -> None:
    """A cancel that arrives after the job completed (Together answers such a cancel with the
    job): batchspec gets the job back COMPLETED, with its output file, not an error that would
    leave the answers uncollected; a repr names the provider without its key."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(2)))
    provider = provider_for(f"{served.base_url}{ROOT}", tmp_path / "journal")
    try:
        uploaded = provider.upload_file(path, filename="in.jsonl")
        made = create(provider, uploaded.id)
        wait_for(lambda: provider.get_batch(made.id).status == "completed")

        cancelled = provider.cancel_batch(made.id)
        text = repr(provider)
    finally:
        provider.close()
    assert (cancelled.id, cancelled.status, cancelled.metadata) == (made.id, "completed", METADATA)
    assert cancelled.output_file_id is not None
    assert text == f"TogetherProvider(name='tg', base_url='{served.base_url}{ROOT}')"
    assert API_KEY not in text


def test_cancelling_a_running_job_stops_it(tmp_path: Path) -> None:
    """A cancel of a job still running reaches the engine: the job ends CANCELLED, so nothing
    more is bought for it."""
    from batchspec.engine import BuiltinUpstream

    server = start_server(
        tmp_path / "engine", api_key=API_KEY, upstream=BuiltinUpstream(latency=0.2), concurrency=1
    )
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(20)))
    provider = provider_for(f"{server.base_url}{ROOT}", tmp_path / "journal")
    try:
        made = create(provider, provider.upload_file(path, filename="in.jsonl").id)
        provider.cancel_batch(made.id)
        ended = wait_for(lambda: (b := provider.get_batch(made.id)).status == "cancelled" and b)
    finally:
        provider.close()
        server.stop()
    assert ended.metadata == METADATA


# -- the engine's routes refuse what Together refuses --------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"purpose": "batch", "file_name": "a.jsonl"}, "Invalid purpose", id="openai"),
        pytest.param({"purpose": "fine-tune", "file_name": "a.jsonl"}, "batch-api", id="tune"),
        pytest.param({"purpose": "batch-api"}, "file_name is required", id="no-name"),
    ],
)
def test_an_announce_the_engine_cannot_keep_is_refused(
    served: EngineServer, fields: dict[str, str], message: str
) -> None:
    """Announcing a file with OpenAI's purpose, a purpose the engine keeps no files for, or no
    name is a 400 naming the problem, never a 302 to an upload that goes nowhere."""
    answer = httpx.post(
        f"{served.base_url}{ROOT}/files",
        headers=auth(),
        files={k: (None, v) for k, v in fields.items()},
        follow_redirects=False,
    )
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]


def test_bytes_that_do_not_match_the_announced_checksum_are_refused(served: EngineServer) -> None:
    """An upload whose bytes differ from the announced sha256 is refused (400) and stored
    nowhere, and its upload URL cannot be used again (403)."""
    data = jsonl_bytes([{"custom_id": "a", "body": {}}])
    announced = httpx.post(
        f"{served.base_url}{ROOT}/files",
        headers=auth(),
        files={
            "purpose": (None, "batch-api"),
            "file_name": (None, "a.jsonl"),
            "checksum": (None, hashlib.sha256(b"other bytes").hexdigest()),
        },
        follow_redirects=False,
    )
    assert announced.status_code == 302
    location = announced.headers["location"]

    refused = httpx.put(location, content=data)
    again = httpx.put(location, content=data)

    assert refused.status_code == 400 and "checksum" in refused.json()["error"]["message"]
    assert again.status_code == 403
    assert served.engine.list_files("batch")["data"] == []


def test_the_file_list_shows_uploads_as_batch_api_files(served: EngineServer) -> None:
    """GET /files lists each uploaded batch file with Together's purpose and status."""
    made = served.engine.create_file(jsonl_bytes(request_lines(1)), "in.jsonl", "batch")
    answer = httpx.get(f"{served.base_url}{ROOT}/files", headers=auth())
    assert answer.status_code == 200
    [listed] = answer.json()["data"]
    assert (listed["id"], listed["purpose"], listed["processing_status"]) == (
        made["id"],
        "batch-api",
        "COMPLETED",
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({"endpoint": "/v1/chat/completions"}, "input_file_id", id="no-file"),
        pytest.param({"input_file_id": "FILE"}, "endpoint is required", id="no-endpoint"),
        pytest.param(
            {"input_file_id": "NOT_JSON", "endpoint": "/v1/chat/completions"},
            "Line 2 is not a JSON object",
            id="bad-line",
        ),
        pytest.param(
            {"input_file_id": "NO_BODY", "endpoint": "/v1/chat/completions"},
            "Line 1 is not a JSON object with custom_id and body",
            id="no-body",
        ),
    ],
)
def test_a_create_the_engine_cannot_run_is_refused_with_the_line(
    served: EngineServer, body: dict[str, str], message: str
) -> None:
    """A create without a file or an endpoint, or from a file holding a line that is not a
    Together line, is a 400 naming the field or the line, and no batch is made."""
    files = {
        "FILE": jsonl_bytes([{"custom_id": "a", "body": {}}]),
        "NOT_JSON": jsonl_bytes([{"custom_id": "a", "body": {}}]) + b"{oops\n",
        "NO_BODY": jsonl_bytes([{"custom_id": "a"}]),
    }
    if body.get("input_file_id") in files:
        name = body["input_file_id"]
        body = {**body, "input_file_id": served.engine.create_file(files[name], "x", "batch")["id"]}
    answer = httpx.post(f"{served.base_url}{ROOT}/batches", headers=auth(), json=body)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]
    assert served.engine.list_batches(None, 100)["data"] == []


# -- a Together that answers oddly ---------------------------------------------------------------


def test_a_create_still_in_transit_is_not_sent_again(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """A create held on its way past the client's timeout, not listed yet, is never re-sent
    by the provider (AmbiguousOutcome: the journal keeps it unconfirmed, the reconciler waits
    its window); a second create would be a second job paid for once the first arrives."""
    srv = server(api_key=API_KEY)
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(2)))
    route = route_of("POST", f"{ROOT}/batches")
    provider = TogetherProvider(
        "tg",
        base_url=f"{srv.base_url}{ROOT}",
        api_key=API_KEY,
        data_dir=tmp_path / "journal",
        sleep=lambda _: None,
        timeout=0.5,
    )
    try:
        uploaded = provider.upload_file(path, filename="in.jsonl")
        srv.probe.hold(route, 2.0, times=1)
        with pytest.raises(AmbiguousOutcome):
            create(provider, uploaded.id)
    finally:
        provider.close()
        srv.probe.release(route)
    assert srv.probe.counts[route] == 1


def odd_together(answers: dict[str, Response]) -> Any:
    """A loopback server answering each ``METHOD /path`` from ``answers`` (404 otherwise)."""

    async def handle(request: Request) -> Response:
        key = f"{request.method} {request.url.path}"
        return answers.get(key) or JSONResponse({"error": {"message": key}}, status_code=404)

    app = Starlette(routes=[Route("/{rest:path}", handle, methods=["GET", "POST", "PUT"])])
    return start_in_thread(app)


def test_an_upload_together_already_holds_is_not_sent_again(tmp_path: Path) -> None:
    """Together answers the announce with 409 and the id of a file with this checksum: the
    provider takes that file and PUTs no bytes (no second upload of a large file)."""
    known = {"id": "file-known", "bytes": 10, "filename": "in.jsonl", "purpose": "batch-api"}
    server = odd_together(
        {
            "POST /v1/files": JSONResponse({"file_id": "file-known"}, status_code=409),
            "GET /v1/files/file-known": JSONResponse(known),
        }
    )
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(1)))
    provider = provider_for(f"{server.base_url}/v1", tmp_path / "journal")
    try:
        uploaded = provider.upload_file(path, filename="in.jsonl")
    finally:
        provider.close()
        server.stop()
    assert (uploaded.id, uploaded.filename) == ("file-known", "in.jsonl")


def test_an_announce_answered_without_a_redirect_names_the_base_url(tmp_path: Path) -> None:
    """An announce answered 302 without the upload location (not Together's API root) is a
    ProviderError that says what was expected and asks about the base URL."""
    server = odd_together({"POST /v1/files": Response(status_code=302)})
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(1)))
    provider = provider_for(f"{server.base_url}/v1", tmp_path / "journal")
    try:
        with pytest.raises(ProviderError, match="expected a 302 with Location") as caught:
            provider.upload_file(path, filename="in.jsonl")
    finally:
        provider.close()
        server.stop()
    assert "base URL" in str(caught.value)


@pytest.mark.parametrize(
    "listing",
    [
        pytest.param(Response(b"<html>not an API</html>", media_type="text/html"), id="html"),
        pytest.param(JSONResponse({"data": "nope"}), id="not-a-list"),
    ],
)
def test_a_batch_list_that_is_not_a_json_array_is_a_provider_error(
    tmp_path: Path, listing: Response
) -> None:
    """A list of batches that is not a JSON array (an HTML page, a wrong shape) is a
    ProviderError pointing at the base URL, never an empty list (which would make a lost
    create look unmade and pay for it again)."""
    server = odd_together({"GET /v1/batches": listing})
    provider = provider_for(f"{server.base_url}/v1", tmp_path / "journal")
    try:
        with pytest.raises(ProviderError, match="not a JSON array"):
            list(provider.list_batches())
    finally:
        provider.close()
        server.stop()


def test_a_job_without_an_id_is_a_provider_error(tmp_path: Path) -> None:
    """A batch answered without an id cannot be followed: a ProviderError, not a batch row
    with no remote id."""
    server = odd_together({"GET /v1/batches/b-1": JSONResponse({"status": "COMPLETED"})})
    provider = provider_for(f"{server.base_url}/v1", tmp_path / "journal")
    try:
        with pytest.raises(ProviderError, match="without an id"):
            provider.get_batch("b-1")
    finally:
        provider.close()
        server.stop()


@pytest.mark.parametrize(
    ("answered", "ours"), [("CANCELLING", "cancelling"), ("CANCELING", "cancelling")]
)
def test_a_cancel_answered_still_cancelling_is_cancelling_in_either_spelling(
    tmp_path: Path, answered: str, ours: str
) -> None:
    """A cancel answered with the job still stopping (either spelling; Together's SDK has
    weighed American ones) is batchspec's `cancelling`: not an unknown status that a later
    cancel would send again; CANCELED once it ended is `cancelled`, terminal."""
    job = {"id": "b1", "status": answered, "created_at": "2026-01-01T00:00:00Z"}
    server = odd_together(
        {
            "POST /v1/batches/b1/cancel": JSONResponse(job),
            "GET /v1/batches/b1": JSONResponse({**job, "status": "CANCELED"}),
        }
    )
    provider = provider_for(f"{server.base_url}/v1", tmp_path / "journal")
    try:
        cancelling = provider.cancel_batch("b1")
        ended = provider.get_batch("b1")
    finally:
        provider.close()
        server.stop()
    assert (cancelling.status, cancelling.is_terminal) == (ours, False)
    assert (ended.status, ended.is_terminal) == ("cancelled", True)
