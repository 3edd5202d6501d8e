"""Retry, backoff and error-message rules of the provider HTTP layer (providers._http).

Every test talks real HTTP over 127.0.0.1. Timing and sequence rules run against a
``ScriptedServer`` (tests/scripted_server.py: one per module, answers scripted per request,
every request recorded as the server received it), so a test asserts what reached the
server: the auth header, a re-sent upload, how many creates. A refused connection is a port
bound but not listening; a read timeout is an answer delayed past the client's timeout; a
connection lost mid-body is a body cut short. Adoption after an ambiguous create runs
against the real engine (``batchspec serve``'s app behind a ``RequestProbe``), which really
makes the batch whose answer is then lost. Waits between attempts go to an injected
``sleep`` that records instead of sleeping. No test here uses ``httpx.MockTransport``.
"""

from __future__ import annotations

import base64
import email.utils
import gzip
import http.server
import itertools
import json
import socketserver
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from probes import ProbedServer
from scripted_server import Answer, ScriptedServer, Seen, json_answer, refused_port
from servers import jsonl_bytes, request_lines

from batchspec.core.apply import outage_message
from batchspec.errors import ProviderError
from batchspec.providers import _http
from batchspec.providers.base import AmbiguousOutcome, RemoteNotFound
from batchspec.providers.openai import OpenAIProvider

SENTINEL_KEY = "sk-SENTINEL-4f1b2c3d9e8a7b6c5d4e3f2a1b0c9d8e"
CHAT = "/v1/chat/completions"
CREATE = "POST /batches"


def batch_json(batch_id: str = "batch_1", **fields: object) -> dict[str, object]:
    data: dict[str, object] = {
        "id": batch_id,
        "object": "batch",
        "endpoint": CHAT,
        "input_file_id": "file-1",
        "completion_window": "24h",
        "status": "in_progress",
        "created_at": int(time.time()),
    }
    data.update(fields)
    return data


def ok(batch_id: str = "batch_1", **fields: object) -> Answer:
    return json_answer(200, batch_json(batch_id, **fields))


def error_answer(
    status: int, message: str = "boom", code: str | None = None, **headers: str
) -> Answer:
    """An OpenAI error envelope; keyword names stand for headers (x_request_id)."""
    body = {"error": {"message": message, "type": "test_error", "param": None, "code": code}}
    return json_answer(status, body, **headers)


def listing(*batches: dict[str, object]) -> Answer:
    return json_answer(200, {"object": "list", "data": list(batches), "has_more": False})


def make_provider(
    srv: ScriptedServer,
    *,
    max_retries: int = 5,
    rand: Callable[[], float] | None = None,
    **options: object,
) -> tuple[OpenAIProvider, list[float]]:
    sleeps: list[float] = []
    settings: dict[str, object] = {"api_key": SENTINEL_KEY, "timeout": 10.0, **options}
    if rand is not None:
        settings["rand"] = rand
    provider = OpenAIProvider(
        "testprov",
        base_url=srv.v1,
        max_retries=max_retries,
        sleep=sleeps.append,
        **settings,  # type: ignore[arg-type]
    )
    return provider, sleeps


# -- Retry-After ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry_after": "3"}, 3.0, id="seconds"),
        pytest.param({"retry_after": "1.5"}, 1.5, id="fractional-seconds"),
        pytest.param({"retry_after_ms": "250"}, 0.25, id="milliseconds"),
        pytest.param({"retry_after_ms": "250", "retry_after": "9"}, 0.25, id="ms-wins"),
        pytest.param({"retry_after": "3600"}, 60.0, id="capped-at-60s"),
    ],
)
def test_429_then_200_waits_what_the_server_asked(
    scripted: ScriptedServer, headers: dict[str, str], expected: float
) -> None:
    """A 429 is retried after the server's Retry-After / retry-after-ms, capped at 60 s."""
    scripted.script(error_answer(429, "slow down", **headers), ok())
    provider, sleeps = make_provider(scripted)
    assert provider.get_batch("batch_1").id == "batch_1"
    assert sleeps == [pytest.approx(expected)]
    assert scripted.methods() == ["GET", "GET"]


def test_retry_after_http_date_is_honoured(scripted: ScriptedServer) -> None:
    """Retry-After given as an HTTP date waits until that moment."""
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    scripted.script(error_answer(429, retry_after=when), ok())
    provider, sleeps = make_provider(scripted)
    provider.get_batch("batch_1")
    assert len(sleeps) == 1
    assert 17.0 <= sleeps[0] <= 20.0


def test_unparseable_retry_after_falls_back_to_backoff(scripted: ScriptedServer) -> None:
    """A Retry-After that cannot be read leads to the normal exponential backoff."""
    scripted.script(error_answer(429, retry_after="soon"), ok())
    provider, sleeps = make_provider(scripted, rand=lambda: 0.0)
    provider.get_batch("batch_1")
    assert sleeps == [0.5]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"retry_after": "0"}, id="zero"),
        pytest.param({"retry_after": "-5"}, id="negative"),
        pytest.param({"retry_after_ms": "0"}, id="zero-ms"),
        pytest.param({"retry_after": "Wed, 21 Oct 2015 07:28:00 GMT"}, id="past-date"),
    ],
)
def test_a_retry_after_asking_for_no_wait_gets_the_backoff(
    scripted: ScriptedServer, headers: dict[str, str]
) -> None:
    """A 429 storm with `Retry-After: 0` (or negative, or a date gone by) waits the client's
    own backoff, doubling, as the official SDK does: honoured, every retry was spent within
    milliseconds of the first refusal."""
    scripted.script(*[error_answer(429, "slow down", **headers)] * 3, ok())
    provider, sleeps = make_provider(scripted, rand=lambda: 0.0)
    assert provider.get_batch("batch_1").id == "batch_1"
    assert sleeps == [0.5, 1.0, 2.0]


# -- backoff -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409])
def test_transient_statuses_are_retried(scripted: ScriptedServer, status: int) -> None:
    """5xx, 408 and 409 are retried until a success arrives."""
    scripted.script(error_answer(status), error_answer(status), ok())
    provider, sleeps = make_provider(scripted)
    assert provider.get_batch("batch_1").status == "in_progress"
    assert len(scripted.requests) == 3
    assert len(sleeps) == 2


def test_backoff_is_exponential_with_bounded_jitter(scripted: ScriptedServer) -> None:
    """Without Retry-After the waits double from 0.5 s to at most 8 s, minus at most 25 %."""
    scripted.script(*[error_answer(503) for _ in range(7)], ok())
    provider, sleeps = make_provider(scripted, max_retries=7)
    provider.get_batch("batch_1")
    bases = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert len(sleeps) == len(bases)
    for slept, base in zip(sleeps, bases, strict=True):
        assert 0.75 * base <= slept <= base


def test_retries_exhausted_reports_status_message_and_request_id(
    scripted: ScriptedServer,
) -> None:
    """After max_retries the last failure is raised with the provider's words and request id."""
    scripted.script(
        then=error_answer(503, "engine overloaded", "overloaded", x_request_id="req_42")
    )
    provider, sleeps = make_provider(scripted, max_retries=3)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    error = caught.value
    assert len(scripted.requests) == 4
    assert len(sleeps) == 3
    assert error.status == 503
    assert error.code == "overloaded"
    assert error.request_id == "req_42"
    assert error.retryable is True
    assert "engine overloaded" in str(error)
    assert "req_42" in str(error)
    assert "HTTP 503" in str(error)


@pytest.mark.parametrize(
    ("max_retries", "said"),
    [
        pytest.param(2, "2 retries were not enough", id="retries-spent"),
        pytest.param(0, "not retried (the provider's maxRetries is 0)", id="no-retries"),
    ],
)
def test_a_429_past_the_retries_names_the_knobs_that_help(
    scripted: ScriptedServer, max_retries: int, said: str
) -> None:
    """A rate limit that outlasts the retries says how many were made and which options
    buy more room (maxRetries, maxConcurrency, --parallelism), not just 'try again later'."""
    scripted.script(then=error_answer(429, "slow down", retry_after="0"))
    provider, _ = make_provider(scripted, max_retries=max_retries)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert len(scripted.requests) == max_retries + 1
    assert said in str(caught.value) and "options.maxRetries" in str(caught.value)


# -- not retried ---------------------------------------------------------------------------


def test_insufficient_quota_is_not_retried(scripted: ScriptedServer) -> None:
    """A 429 with code insufficient_quota fails at once: waiting does not buy quota."""
    scripted.script(then=error_answer(429, "You exceeded your quota", "insufficient_quota"))
    provider, sleeps = make_provider(scripted)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert len(scripted.requests) == 1
    assert sleeps == []
    assert caught.value.status == 429
    assert caught.value.code == "insufficient_quota"
    assert caught.value.retryable is False
    assert "quota" in str(caught.value).lower()


def test_x_should_retry_false_is_respected(scripted: ScriptedServer) -> None:
    """x-should-retry: false stops retries even for a 500."""
    scripted.script(then=error_answer(500, x_should_retry="false"))
    provider, sleeps = make_provider(scripted)
    with pytest.raises(ProviderError):
        provider.get_batch("batch_1")
    assert len(scripted.requests) == 1
    assert sleeps == []


def test_x_should_retry_true_forces_a_retry(scripted: ScriptedServer) -> None:
    """x-should-retry: true makes even a 400 worth another attempt."""
    scripted.script(error_answer(400, x_should_retry="true"), ok())
    provider, _ = make_provider(scripted)
    provider.get_batch("batch_1")
    assert len(scripted.requests) == 2


@pytest.mark.parametrize("status", [501, 505])
def test_a_5xx_no_wait_changes_is_not_retried_and_points_at_the_base_url(
    scripted: ScriptedServer, status: int
) -> None:
    """501 (what a plain web server answers a POST it does not implement: a baseUrl that is
    no Batch API) and 505 fail at once, not after five retries, saying to check baseUrl; and
    a create they answer is no ambiguous outcome (the server did not act): nothing to adopt."""
    scripted.script(then=error_answer(status, "Unsupported method ('POST')"))
    provider, sleeps = make_provider(scripted)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert len(scripted.requests) == 1 and sleeps == []
    assert "not retried" in str(caught.value) and "is baseUrl the root of a Batch API" in str(
        caught.value
    )
    assert not _http.is_ambiguous_status(status)


@pytest.mark.parametrize(
    ("status", "message", "error_class", "hint"),
    [
        pytest.param(400, "endpoint is invalid", ProviderError, "rejected", id="400"),
        pytest.param(401, "Incorrect API key provided", ProviderError, "$OPENAI_API_KEY", id="401"),
        pytest.param(403, "not allowed", ProviderError, "$OPENAI_API_KEY", id="403"),
        pytest.param(404, "No such batch", RemoteNotFound, "unknown", id="404"),
        pytest.param(422, "bad metadata", ProviderError, "rejected", id="422"),
    ],
)
def test_client_errors_are_not_retried_and_carry_the_providers_message(
    scripted: ScriptedServer,
    status: int,
    message: str,
    error_class: type[ProviderError],
    hint: str,
) -> None:
    """4xx answers fail at once with the provider's message and a hint of what to do."""
    scripted.script(then=error_answer(status, message, "some_code", x_request_id="req_7"))
    provider, sleeps = make_provider(scripted)
    with pytest.raises(error_class) as caught:
        provider.get_batch("batch_1")
    assert type(caught.value) is error_class
    assert len(scripted.requests) == 1
    assert sleeps == []
    text = str(caught.value)
    assert message in text
    assert hint in text
    assert "req_7" in text
    assert caught.value.status == status
    assert caught.value.code == "some_code"


def test_a_404_to_a_call_that_names_no_id_blames_the_base_url(scripted: ScriptedServer) -> None:
    """A listing answered 404 (a base URL such as .../v2) says the base URL is not an API
    root, not that "the id is unknown": a listing names no id."""
    scripted.script(then=error_answer(404, "Unknown request URL", "unknown_url"))
    provider, _ = make_provider(scripted)
    with pytest.raises(ProviderError) as caught:
        next(iter(provider.list_batches()))
    text = str(caught.value)
    assert "is not an OpenAI-compatible API root" in text and "id is unknown" not in text


def test_litellm_relayed_404_code_is_not_found(scripted: ScriptedServer) -> None:
    """LiteLLM's relayed 404 (status 400, code "404") is read as not found."""
    scripted.script(error_answer(400, "Error code: 404 - no such file", "404"))
    provider, _ = make_provider(scripted)
    with pytest.raises(RemoteNotFound):
        provider.get_file("file-x")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param(
            Answer(502, b"<html><body>Bad Gateway</body></html>", {"content-type": "text/html"}),
            "Bad Gateway",
            id="html",
        ),
        pytest.param(Answer(400, b"plain words"), "plain words", id="text"),
        pytest.param(Answer(400, b""), "Bad Request", id="empty-uses-reason"),
        pytest.param(json_answer(400, {"detail": "from fastapi"}), "from fastapi", id="detail"),
        pytest.param(json_answer(400, {"error": "flat string"}), "flat string", id="flat"),
        pytest.param(json_answer(400, ["odd"]), "odd", id="json-list"),
    ],
)
def test_non_envelope_error_bodies_are_reported(
    scripted: ScriptedServer, answer: Answer, expected: str
) -> None:
    """Error bodies that are not the OpenAI envelope still make a readable message."""
    scripted.script(then=answer)
    provider, _ = make_provider(scripted)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert expected in str(caught.value)
    assert caught.value.status == answer.status


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_followed_and_says_where_it_points(
    scripted: ScriptedServer, status: int
) -> None:
    """A redirect to another origin is not followed (the Authorization header would go
    with it): the other server sees nothing, and the error names the address the server
    points at and what to set, rather than "See the provider's message" alone."""
    other = ScriptedServer()
    try:
        other.script(then=ok())
        scripted.script(then=Answer(status, b"", {"location": f"{other.v1}/batches/batch_1"}))
        provider, _ = make_provider(scripted)
        with pytest.raises(ProviderError) as caught:
            provider.get_batch("batch_1")
        assert other.requests == []
        assert f"redirects to {other.v1}/batches/batch_1" in str(caught.value)
        assert "set baseUrl" in str(caught.value)
        assert SENTINEL_KEY not in str(caught.value)
    finally:
        other.stop()


def test_success_with_a_body_that_is_not_json_is_a_clear_error(scripted: ScriptedServer) -> None:
    """A 200 whose body is not a JSON object (wrong base URL) is reported, not a crash."""
    scripted.script(Answer(200, b"<html>welcome</html>", {"content-type": "text/html"}))
    provider, _ = make_provider(scripted)
    with pytest.raises(ProviderError, match="not the expected JSON object"):
        provider.get_batch("batch_1")


@pytest.mark.parametrize("status", [200, 400, 500])
def test_a_body_nested_too_deep_to_read_is_a_clear_error(
    scripted: ScriptedServer, status: int
) -> None:
    """A JSON body nested deeper than Python's parser goes (a success, or an error body)
    is a ``ProviderError``, not a RecursionError traceback."""
    headers = {"content-type": "application/json", "x-should-retry": "false"}
    scripted.script(then=Answer(status, b'{"error": ' + b"[" * 200_000, headers))
    provider, _ = make_provider(scripted)
    with pytest.raises(ProviderError):
        provider.get_batch("batch_1")


@pytest.mark.parametrize(
    ("raw", "read"),
    [
        pytest.param(
            b'"request_counts": {"total": "abc", "completed": [1]}', "counts", id="counts"
        ),
        pytest.param(b'"usage": {"input_tokens": "1.5", "output_tokens": {}}', "usage", id="usage"),
        pytest.param(b'"metadata": ["a"]', "metadata", id="metadata-array"),
        pytest.param(b'"metadata": "text"', "metadata", id="metadata-string"),
        pytest.param(b'"created_at": 1e400', "created_at", id="infinite-time"),
        pytest.param(b'"completed_at": NaN', "completed_at", id="nan-time"),
        pytest.param(b'"errors": {"data": [{"code": 5, "line": "x"}]}', "errors", id="errors"),
        pytest.param(b'"output_file_id": 12', "output_file_id", id="numeric-file-id"),
        # text that str.isdigit() takes but int() refuses; numbers no state column can hold
        pytest.param(
            '"request_counts": {"total": "\u00b2", "completed": "--5", "failed": 1e300}'.encode(),
            "counts",
            id="odd-digits-and-huge-counts",
        ),
        pytest.param(
            b'"usage": {"input_tokens": 100000000000000000000000000000}, "created_at": 1e300, '
            b'"errors": {"data": [{"line": "\\u00b2"}]}',
            "usage",
            id="huge-usage-and-time",
        ),
    ],
)
def test_a_batch_object_of_wrong_types_is_read_leniently(
    scripted: ScriptedServer, raw: bytes, read: str
) -> None:
    """Informative fields of the wrong JSON type (a count that is text, metadata that is an
    array, a time of 1e400) are read as far as they can be, not raised as a bare ValueError,
    TypeError or OverflowError (a traceback, after the create had been made)."""
    body = b'{"id": "batch_1", "status": "completed", ' + raw + b"}"
    scripted.script(then=Answer(200, body, {"content-type": "application/json"}))
    provider, _ = make_provider(scripted)
    remote = provider.get_batch("batch_1")
    assert remote.id == "batch_1"
    assert remote.status == "completed"
    if read == "output_file_id":
        assert remote.output_file_id == "12"
    counts, usage = remote.request_counts, remote.usage
    for number in (
        *(() if counts is None else (counts.total, counts.completed, counts.failed)),
        *(() if usage is None else (usage.input_tokens, usage.output_tokens)),
        remote.created_at or 0,
    ):
        assert abs(number) < 2**63  # what the state's integer columns hold


def test_a_download_cut_off_then_whole_lands_in_a_folder_made_for_it(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """A download's folder is made when the body's file is first opened (not before every
    download): into a folder that is not there, a body cut off once and then sent whole is
    written whole, with nothing of the cut copy and no partial file left."""
    body = b"".join(b'{"custom_id": "r%d"}\n' % i for i in range(5000))
    scripted.script(Answer(200, body, cut_after=len(body) // 2), Answer(200, body))
    provider, sleeps = make_provider(scripted)
    dest = tmp_path / "not" / "there" / "out.jsonl"
    assert provider.download_file("file-1", dest) == len(body)
    assert dest.read_bytes() == body
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.jsonl"]
    assert len(sleeps) == 1


def test_a_downloaded_file_quoting_the_key_is_kept_with_the_key_redacted(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """An output or error file whose lines quote the request's Authorization header (a
    gateway relaying a per-request 401 with the key in it), raw or JSON-escaped, is kept
    with the key redacted: it goes to results/ and the result store as it is downloaded."""
    key = 'SENTINEL0"quote0123456789'
    escaped = json.dumps(key)[1:-1]
    body = (
        b'{"custom_id": "a", "error": {"message": "bad Bearer ' + escaped.encode() + b'"}}\n'
        b'{"custom_id": "b", "response": {"body": "key ' + key.encode() + b' x"}}\n'
    )
    scripted.script(Answer(200, body))
    provider, _ = make_provider(scripted, api_key=key)
    dest = tmp_path / "out.jsonl"
    size = provider.download_file("file-1", dest)
    kept = dest.read_bytes()
    assert size == len(kept) and b"SENTINEL0" not in kept
    assert kept.count(b"[redacted]") == 2 and kept.count(b"\n") == 2


@pytest.mark.parametrize("cut", [1, 9, 20])
def test_a_key_split_between_two_chunks_of_a_download_is_found(tmp_path: Path, cut: int) -> None:
    """Downloads look for a secret in the bytes as they arrive (no second read of a file
    holding none): a key whose halves come in two chunks is found all the same, and a body
    without it is not taken for one."""
    key = b"SENTINEL0split0123456789"
    line = b'{"custom_id": "a", "error": {"message": "Bearer ' + key + b'"}}\n'
    at = line.index(key) + cut
    chunks = [b"x" * 70_000, line[:at], line[at:]]
    response = httpx.Response(200, content=iter(chunks))
    written, holds = _http._write_body(
        response, tmp_path / "a.part", stall_seconds=None, provider="p", forms=(key,)
    )
    assert holds and written == sum(map(len, chunks))
    clean = httpx.Response(200, content=iter([b"x" * 70_000, line.replace(key, b"[none]")]))
    assert not _http._write_body(
        clean, tmp_path / "b.part", stall_seconds=None, provider="p", forms=(key,)
    )[1]


def test_a_placeholder_key_is_not_redacted_out_of_a_downloaded_file(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """A placeholder key ("x") is no secret: a downloaded file is kept byte for byte."""
    body = b'{"custom_id": "a", "response": {"body": "x marks Bearer x"}}\n'
    scripted.script(Answer(200, body))
    provider, _ = make_provider(scripted, api_key="x")
    dest = tmp_path / "out.jsonl"
    assert provider.download_file("file-1", dest) == len(body)
    assert dest.read_bytes() == body


def test_a_proxy_password_is_not_redacted_out_of_a_downloaded_answer(
    scripted: ScriptedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy's password is sent only inside its Basic token: a downloaded file is kept with
    the token redacted but an answer that holds the password's word ("elephants") as text
    kept as it is (a message quoting the password still has it redacted)."""
    token = base64.b64encode(b"alice:elephants").decode()
    body = b'{"custom_id": "a", "response": {"body": "elephants, Basic ' + token.encode() + b'"}}\n'
    scripted.script(Answer(200, body))
    monkeypatch.setenv("ALL_PROXY", "http://alice:elephants@127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # set, but this server is reached directly
    provider, _ = make_provider(scripted)
    dest = tmp_path / "out.jsonl"
    provider.download_file("file-1", dest)
    assert dest.read_bytes() == body.replace(token.encode(), b"[redacted]")
    assert "elephants" not in provider._http.context.redact("proxy password elephants")


def test_a_download_error_its_content_encoding_cannot_decode_is_a_provider_error(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """A download answered 503 with a body sent as gzip that is not gzip: a
    ``ProviderError`` naming the status (the next apply downloads it again), not an
    ``httpx.DecodingError`` traceback that stopped every resource's pass."""
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    scripted.script(then=Answer(503, b"\x00not gzip", headers))
    provider, _ = make_provider(scripted)
    with pytest.raises(ProviderError, match="503"):
        provider.download_file("file-1", tmp_path / "out.jsonl")


def test_an_answer_its_content_encoding_cannot_decode_is_a_provider_error(
    scripted: ScriptedServer,
) -> None:
    """A poll's body sent as gzip that is not gzip is a body cut off (retried, then a
    ``ProviderError``), not an ``httpx.DecodingError`` traceback."""
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    scripted.script(then=Answer(200, b"not gzip at all", headers))
    provider, _ = make_provider(scripted)
    with pytest.raises(ProviderError, match="decoded"):
        provider.get_batch("batch_1")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'"id": null', id="null-id"),
        pytest.param(b'"id": {"a": 1}', id="object-id"),
        pytest.param(b'"id": "batch_1", "output_file_id": {"a": 1}', id="object-file-id"),
    ],
)
def test_a_batch_object_whose_ids_cannot_be_used_is_a_provider_error(
    scripted: ScriptedServer, raw: bytes
) -> None:
    """An id that is null or structured is a ``ProviderError`` (sent nothing: False, so a
    create answered so is looked up by its key), never a batch named ``None`` recorded and
    polled for ever, nor a dict bound into the state (a database error)."""
    body = b'{"status": "completed", ' + raw + b"}"
    scripted.script(then=Answer(200, body, {"content-type": "application/json"}))
    provider, _ = make_provider(scripted)
    with pytest.raises(ProviderError, match="not a") as caught:
        provider.get_batch("batch_1")
    assert not caught.value.sent_nothing
    body = b'{"object": "list", "has_more": false, "data": [{"status": "completed", ' + raw + b"}]}"
    scripted.script(Answer(200, body, {"content-type": "application/json"}))
    with pytest.raises(ProviderError, match="not a"):
        list(provider.list_batches())


# -- transport errors ----------------------------------------------------------------------


def test_connect_errors_are_retried_then_reported_clearly() -> None:
    """A refused connection is retried with backoff, then named with the base URL (and
    `apply --wait`'s "tries again" follows it as a sentence of its own)."""
    with refused_port() as port:
        base_url = f"http://127.0.0.1:{port}/v1"
        sleeps: list[float] = []
        provider = OpenAIProvider(
            "testprov", base_url=base_url, api_key=SENTINEL_KEY, max_retries=2, sleep=sleeps.append
        )
        with pytest.raises(ProviderError) as caught:
            provider.get_batch("batch_1")
    assert len(sleeps) == 2
    text = str(caught.value)
    assert "could not connect" in text
    assert base_url in text
    assert "Connection refused" in text
    assert caught.value.retryable is True
    # `apply --wait` adds when it tries again: one sentence after another, never "backoff.; "
    waiting = outage_message(caught.value, 0.5, 30.0)
    assert "retried with backoff. `apply --wait` tries again in 0.5s" in waiting


@pytest.mark.parametrize(
    ("no_proxy", "through_proxy"),
    [
        pytest.param(None, True, id="proxied"),
        pytest.param("localhost", True, id="other-host-bypassed"),
        pytest.param("127.0.0.1", False, id="host-bypassed"),
        pytest.param("10.0.0.0/8", True, id="other-network-bypassed"),
        pytest.param("10.0.0.0/8, 127.0.0.0/8", False, id="network-bypassed"),
    ],
)
def test_a_refused_environment_proxy_is_named_not_the_server(
    scripted: ScriptedServer,
    monkeypatch: pytest.MonkeyPatch,
    no_proxy: str | None,
    through_proxy: bool,
) -> None:
    """With HTTP_PROXY pointing at a proxy that refuses connections, the error names that
    proxy (without its password) and NO_PROXY as the way round it, instead of saying the
    server the user can see running could not be reached; a bypassed host reaches it, and so
    does a host in a network NO_PROXY names (as curl and the engine read it; httpx does not)."""
    scripted.script(ok())
    with refused_port() as port:
        monkeypatch.setenv("HTTP_PROXY", f"http://user:hunter2@127.0.0.1:{port}")
        if no_proxy is None:
            monkeypatch.delenv("NO_PROXY", raising=False)
        else:
            monkeypatch.setenv("NO_PROXY", no_proxy)
        monkeypatch.delenv("no_proxy", raising=False)
        provider, _ = make_provider(scripted, max_retries=0)
        if not through_proxy:
            assert provider.get_batch("batch_1").id == "batch_1"
            return
        with pytest.raises(ProviderError) as caught:
            provider.get_batch("batch_1")
    text = str(caught.value)
    assert f"through the proxy http://127.0.0.1:{port} (set by HTTP_PROXY)" in text
    assert "NO_PROXY=127.0.0.1" in text and "hunter2" not in text


def test_a_proxy_quoting_its_credentials_in_a_407_has_them_redacted(
    scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy from HTTP_PROXY (with user:password) that refuses with a 407 quoting the
    request's Proxy-Authorization: neither the password nor the Basic token that carries it
    is in the error (recorded in the state's events, shown by history and report)."""
    seen = "Basic " + base64.b64encode(b"alice:PROXYSENTINEL0pw").decode()
    scripted.script(
        then=lambda s: error_answer(407, f"bad {s.headers.get('proxy-authorization')} {s.target}")
    )
    monkeypatch.setenv(
        "HTTP_PROXY", scripted.base_url.replace("http://", "http://alice:PROXYSENTINEL0pw@")
    )
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    provider = OpenAIProvider(
        "testprov", base_url="http://api.example.test/v1", api_key=SENTINEL_KEY, max_retries=0
    )
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert scripted.requests[0].headers["proxy-authorization"] == seen
    text = str(caught.value)
    assert "HTTP 407" in text
    assert "PROXYSENTINEL" not in text and seen.split()[1] not in text


def test_a_password_in_the_base_url_is_redacted_when_echoed(scripted: ScriptedServer) -> None:
    """A base URL with user:password@ (sent by httpx as Basic auth): a server quoting the
    request's Authorization header shows neither the password nor its Basic token."""
    token = base64.b64encode(b"bob:URLSENTINEL0pw").decode()
    scripted.script(then=lambda s: error_answer(400, f"auth was {s.headers.get('authorization')}"))
    base_url = scripted.v1.replace("http://", "http://bob:URLSENTINEL0pw@")
    provider = OpenAIProvider("testprov", base_url=base_url, api_key=SENTINEL_KEY, max_retries=0)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    text = str(caught.value)
    assert "URLSENTINEL" not in text and token not in text


def test_timeout_then_success(scripted: ScriptedServer) -> None:
    """A read timeout on a GET is retried (the server answered too late the first time)."""
    scripted.script(replace(ok(), delay=5.0), ok())
    provider, sleeps = make_provider(scripted, timeout=0.2)
    assert provider.get_batch("batch_1").id == "batch_1"
    assert len(sleeps) == 1
    assert scripted.methods() == ["GET", "GET"]


def test_a_transport_error_that_cannot_get_better_is_not_retried(
    scripted: ScriptedServer,
) -> None:
    """A transport error that retrying cannot cure (a header value h11 refuses to send) fails
    at once: no wait, and nothing reached the server."""
    scripted.script(then=ok())
    provider, sleeps = make_provider(scripted, extra_headers={"X-Team": "ops\nteam"})
    with pytest.raises(ProviderError, match="LocalProtocolError") as caught:
        provider.get_batch("batch_1")
    assert caught.value.retryable is False
    assert sleeps == []
    assert scripted.requests == []


def test_a_dropped_connection_on_a_get_is_retried(scripted: ScriptedServer) -> None:
    """A server that hangs up without answering a GET is asked again."""
    scripted.script(Answer(hang_up=True), ok())
    provider, sleeps = make_provider(scripted)
    assert provider.get_batch("batch_1").id == "batch_1"
    assert len(sleeps) == 1
    assert len(scripted.requests) == 2


# -- creating a batch never pays twice -----------------------------------------------------


#: a client timeout the probe's held answers outlast (the engine itself answers in ms)
SHORT_TIMEOUT = 0.3


def _provider(srv: ProbedServer, **options: object) -> OpenAIProvider:
    settings: dict[str, object] = {"api_key": SENTINEL_KEY, "timeout": 10.0, **options}
    return OpenAIProvider("served", base_url=srv.v1, **settings)  # type: ignore[arg-type]


def _stage(provider: OpenAIProvider, tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(jsonl_bytes(request_lines(2, prefix=name)))
    return provider.upload_file(path, filename=name).id


def _create(provider: OpenAIProvider, file_id: str, attempt: str = "1") -> str:
    return provider.create_batch(
        input_file_id=file_id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"batchspec_resource": "triage", "batchspec_attempt": attempt},
    ).id


def _engine_batches(srv: ProbedServer) -> list[dict[str, object]]:
    return list(srv.engine.list_batches(None, 100)["data"])


@pytest.mark.parametrize(
    "lost",
    [
        pytest.param({"replace_status": 500}, id="answered-500"),
        pytest.param({"seconds": 5.0}, id="answer-held-past-the-timeout"),
    ],
)
def test_ambiguous_create_adopts_the_batch_the_server_made(
    server: Callable[..., ProbedServer], tmp_path: Path, lost: dict[str, object]
) -> None:
    """The engine makes the batch but its answer is lost (a 500, or too late): the create is
    not sent again; the batch found in the list (not the other resource's) is returned."""
    srv = server(api_key=SENTINEL_KEY)
    with _provider(srv) as staging:
        other = staging.create_batch(
            input_file_id=_stage(staging, tmp_path, "other"),
            endpoint=CHAT,
            completion_window="24h",
            metadata={"batchspec_resource": "other", "batchspec_attempt": "1"},
        )
        file_id = _stage(staging, tmp_path, "triage")
    sleeps: list[float] = []
    seconds = float(lost.pop("seconds", 0.0))  # type: ignore[arg-type]
    srv.probe.hold(CREATE, seconds, after=True, times=1, **lost)  # type: ignore[arg-type]
    with _provider(srv, timeout=SHORT_TIMEOUT, sleep=sleeps.append) as provider:
        adopted = _create(provider, file_id)
    srv.probe.release_all()
    made = [b for b in _engine_batches(srv) if b["id"] != other.id]
    assert [b["id"] for b in made] == [adopted]
    assert srv.probe.counts[CREATE] == 2  # the other resource's and ours, each once
    assert sleeps == []


def test_ambiguous_create_resends_when_nothing_was_made(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """A create that timed out before the engine saw it is re-sent only after the list shows
    no such batch (an earlier attempt's batch of the same resource does not count)."""
    srv = server(api_key=SENTINEL_KEY)
    with _provider(srv) as staging:
        file_id = _stage(staging, tmp_path, "triage")
        earlier = _create(staging, file_id, attempt="0")
    srv.probe.log.clear()
    srv.probe.hold(CREATE, 5.0, drop=True, times=1)
    sleeps: list[float] = []
    with _provider(srv, timeout=SHORT_TIMEOUT, sleep=sleeps.append) as provider:
        created = _create(provider, file_id)
    srv.probe.release_all()
    assert created != earlier
    assert srv.probe.log == [CREATE, "GET /batches", CREATE]
    assert sorted(str(b["id"]) for b in _engine_batches(srv)) == sorted([earlier, created])
    assert len(sleeps) == 1


def test_ambiguous_create_without_a_match_and_no_retries_left_is_ambiguous(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """With no retry left, a create whose answer was lost and whose batch is not listed fails
    as AmbiguousOutcome, and is not sent a second time."""
    srv = server(api_key=SENTINEL_KEY)
    with _provider(srv) as staging:
        file_id = _stage(staging, tmp_path, "triage")
    srv.probe.hold(CREATE, 5.0, drop=True, times=1)
    provider = _provider(srv, timeout=SHORT_TIMEOUT, max_retries=0)
    with provider, pytest.raises(AmbiguousOutcome):
        _create(provider, file_id)
    srv.probe.release_all()
    assert srv.probe.counts[CREATE] == 1
    assert _engine_batches(srv) == []


KEYED = {
    "batchspec_resource": "triage",
    "batchspec_spec": "ab" * 32,
    "batchspec_shard": "0",
    "batchspec_attempt": "1",
}


def test_ambiguous_keyed_create_is_found_by_its_key_even_with_a_rewritten_file_id(
    scripted: ScriptedServer,
) -> None:
    """A create carrying batchspec's key is recognised by the key alone: a proxy that lists
    rewritten file ids, or a server clock behind ours, must not cause a second create.
    (A scripted server plays the proxy: the engine neither rewrites ids nor skews clocks.)"""
    made = batch_json("batch_made", metadata=KEYED, created_at=1)
    made["input_file_id"] = "file-rewritten-by-a-proxy"
    scripted.script(error_answer(500), listing(made))
    provider, _ = make_provider(scripted)
    created = provider.create_batch(
        input_file_id="file-1", endpoint=CHAT, completion_window="24h", metadata=KEYED
    )
    assert created.id == "batch_made"
    assert scripted.methods() == ["POST", "GET"]


def test_ambiguous_keyed_create_not_found_is_never_re_sent(scripted: ScriptedServer) -> None:
    """A keyed create that timed out and is not listed may still be in transit: the provider
    raises AmbiguousOutcome (the reconciler looks it up through its window) and sends no
    second create, even with retries left."""
    scripted.script(replace(ok(), delay=5.0), listing())
    provider, sleeps = make_provider(scripted, timeout=0.2)
    with pytest.raises(AmbiguousOutcome):
        provider.create_batch(
            input_file_id="file-1", endpoint=CHAT, completion_window="24h", metadata=KEYED
        )
    assert scripted.methods() == ["POST", "GET"]
    assert sleeps == []


def test_a_create_answered_in_an_encoding_not_asked_for_is_adopted_not_sent_again(
    scripted: ScriptedServer,
) -> None:
    """A create answered in ``br`` (refused unread) may have made its batch: it is looked up
    by its key and adopted, never sent a second time."""
    made = batch_json("batch_made", metadata=KEYED)
    scripted.script(Answer(200, b"\x1b\xff", {"content-encoding": "br"}), listing(made))
    provider, _ = make_provider(scripted)
    created = provider.create_batch(
        input_file_id="file-1", endpoint=CHAT, completion_window="24h", metadata=KEYED
    )
    assert created.id == "batch_made"
    assert scripted.methods() == ["POST", "GET"]


def test_a_refusal_after_an_ambiguous_attempt_is_still_ambiguous(
    scripted: ScriptedServer,
) -> None:
    """A create whose first answer was lost (a 500), not listed, then re-sent and refused
    (400): the first may still arrive, so the error is an AmbiguousOutcome, never the plain
    refusal that would let the reconciler create the batch again at once."""
    scripted.script(error_answer(500), listing(), error_answer(400))
    provider, _ = make_provider(scripted)
    with pytest.raises(AmbiguousOutcome):
        _create(provider, "file-1")
    assert scripted.methods() == ["POST", "GET", "POST"]


@pytest.mark.parametrize(
    ("answers", "methods"),
    [
        pytest.param([error_answer(400)], ["POST"], id="a-400"),
        pytest.param([error_answer(429, retry_after="0")] * 3, ["POST"] * 3, id="429s-spent"),
    ],
)
def test_a_create_refused_on_every_attempt_says_it_sent_nothing(
    scripted: ScriptedServer, answers: list[Answer], methods: list[str]
) -> None:
    """A 4xx refusal (a 400, or 429s past the retries) says the create made nothing
    (``sent_nothing``): the reconciler may then create it again at once."""
    scripted.script(*answers)
    provider, _ = make_provider(scripted, max_retries=2)
    with pytest.raises(ProviderError) as caught:
        _create(provider, "file-1")
    assert not isinstance(caught.value, AmbiguousOutcome)
    assert caught.value.sent_nothing is True
    assert scripted.methods() == methods


@pytest.mark.parametrize("status", [501, 505])
def test_a_create_answered_with_a_5xx_no_wait_changes_says_it_sent_nothing(
    scripted: ScriptedServer, status: int
) -> None:
    """A create answered 501 or 505 (the server does not implement it: no batch was made, and
    it is not retried) says so (``sent_nothing``), as a 4xx refusal does: the intent goes back
    to ``pending`` and the next apply creates it at once, instead of waiting out the confirm
    window of a create that may be in transit."""
    scripted.script(error_answer(status, "Unsupported method ('POST')"))
    provider, _ = make_provider(scripted)
    with pytest.raises(ProviderError) as caught:
        _create(provider, "file-1")
    assert not isinstance(caught.value, AmbiguousOutcome)
    assert caught.value.sent_nothing is True
    assert scripted.methods() == ["POST"]


def test_a_create_that_never_connected_says_it_sent_nothing() -> None:
    """Connection refused on every attempt: nothing left this machine."""
    with refused_port() as port:
        base_url = f"http://127.0.0.1:{port}/v1"
        provider = OpenAIProvider(
            "p", base_url=base_url, api_key=SENTINEL_KEY, max_retries=1, sleep=lambda _: None
        )
        with pytest.raises(ProviderError) as caught:
            _create(provider, "file-1")
    assert caught.value.sent_nothing is True


@pytest.mark.parametrize(
    ("answers", "methods", "ambiguous"),
    [
        # the lost create's lookup is throttled past its retries: the 429 is the lookup's
        pytest.param(
            [error_answer(500), error_answer(429, retry_after="0")],
            ["POST", "GET"],
            False,
            id="lookup-throttled",
        ),
        # a 5xx the server says not to retry may still have made the batch
        pytest.param(
            [error_answer(500, x_should_retry="false"), listing()],
            ["POST", "GET"],
            True,
            id="5xx-not-to-retry",
        ),
        # a gateway's 408 may still forward the create: looked up before any second send
        pytest.param(
            [error_answer(408), listing(), error_answer(400)],
            ["POST", "GET", "POST"],
            True,
            id="408-then-400",
        ),
        # made, but its answer did not parse
        pytest.param(
            [Answer(200, b"<html>gateway</html>", {"content-type": "text/html"})],
            ["POST"],
            False,
            id="2xx-unreadable",
        ),
    ],
)
def test_a_create_that_may_have_been_made_never_says_it_sent_nothing(
    scripted: ScriptedServer, answers: list[Answer], methods: list[str], ambiguous: bool
) -> None:
    """Every failure after which the batch may exist leaves ``sent_nothing`` unset, so the
    reconciler keeps the row ``creating`` and looks it up through its confirm window
    instead of creating it again at once (and paying twice if the first arrives)."""
    scripted.script(*answers)
    provider, _ = make_provider(scripted, max_retries=0 if len(answers) < 3 else 1)
    with pytest.raises(ProviderError) as caught:
        _create(provider, "file-1")
    assert caught.value.sent_nothing is False
    assert isinstance(caught.value, AmbiguousOutcome) is ambiguous
    assert scripted.methods() == methods


def test_unambiguous_create_failures_are_retried_directly(scripted: ScriptedServer) -> None:
    """A 429 or 503 on create means nothing was made: the same create is re-sent without a
    lookup."""
    scripted.script(error_answer(429, retry_after="1"), error_answer(503), ok("batch_new"))
    provider, _ = make_provider(scripted)
    assert _create(provider, "file-1") == "batch_new"
    assert scripted.methods() == ["POST", "POST", "POST"]
    bodies = [seen.json() for seen in scripted.requests]
    assert bodies[0]["metadata"]["batchspec_resource"] == "triage"
    assert bodies[0] == bodies[1] == bodies[2]


# -- paths, pagination, streaming ----------------------------------------------------------


def test_opaque_ids_are_quoted_into_paths(scripted: ScriptedServer) -> None:
    """Ids with '/', '+' and '=' (LiteLLM base64) stay one path segment."""
    scripted.script(ok("bGl0ZWxsbTo/+x=="))
    provider, _ = make_provider(scripted)
    provider.get_batch("bGl0ZWxsbTo/+x==")
    assert scripted.requests[0].target == "/v1/batches/bGl0ZWxsbTo%2F%2Bx%3D%3D"


def _page(*ids: str, has_more: bool = True) -> dict[str, object]:
    data = [batch_json(i) for i in ids]
    return {"object": "list", "data": data, "last_id": ids[-1], "has_more": has_more}


def _cycling_pages(seen: Seen) -> Answer:
    """Two pages that point at each other: after p1 comes p2, after p2 comes p1 again."""
    after_p1 = "after=p1" in seen.target
    return json_answer(200, _page("p2") if after_p1 else _page("p1"))


@pytest.mark.parametrize(
    ("answer", "listed"),
    [
        pytest.param(json_answer(200, _page("b1")), ["b1", "b1"], id="cursor-ignored"),
        pytest.param(_cycling_pages, ["p1", "p2", "p1"], id="pages-in-a-cycle"),
    ],
)
def test_list_refuses_pagination_that_comes_back_to_a_page(
    scripted: ScriptedServer, answer: Answer | Callable[[Seen], Answer], listed: list[str]
) -> None:
    """A listing whose next cursor was followed before (the server ignores ``after``, or its
    pages point at each other) with has_more forever raises, naming it: it neither pages
    forever (a key lookup held the run until CI killed it) nor ends as if read whole (a key
    on a page never reached would be taken as absent, and its batch paid for again)."""
    scripted.script(then=answer)
    provider, _ = make_provider(scripted)
    got: list[str] = []
    with pytest.raises(ProviderError, match="pagination came back to a page"):
        for batch in itertools.islice(provider.list_batches(page_size=1), 20):
            got.append(batch.id)
    assert got == listed
    assert len(scripted.requests) == len(listed)


def test_list_refuses_pagination_with_fresh_cursors_for_ever(
    scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing that promises more on every page, with a fresh cursor each time (a row of
    a new batch per page), raises once it has read ``MAX_LIST_PAGES`` pages: no cursor comes
    back, so it was paged for ever (a key lookup holding the run), a page at a time."""
    monkeypatch.setattr(_http, "MAX_LIST_PAGES", 5, raising=False)
    pages = itertools.count(1)

    def fresh_page(seen: Seen) -> Answer:
        n = next(pages)
        return json_answer(200, _page(f"b{n}") if n < 50 else {"data": [], "has_more": False})

    scripted.script(then=fresh_page)
    provider, _ = make_provider(scripted)
    with pytest.raises(ProviderError, match="pages read and more still promised"):
        list(provider.list_batches(page_size=1))
    assert len(scripted.requests) == 6


def test_download_restarts_after_a_connection_lost_mid_body(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """A download cut mid-body restarts, and only the complete content lands at dest."""
    scripted.script(
        Answer(200, b"partial line\nnever sent\n", cut_after=13),
        Answer(200, b"line 1\nline 2\n"),
    )
    provider, sleeps = make_provider(scripted)
    dest = tmp_path / "out" / "results.jsonl"
    assert provider.download_file("file-out", dest) == 14
    assert dest.read_bytes() == b"line 1\nline 2\n"
    assert list(dest.parent.iterdir()) == [dest]
    assert len(sleeps) == 1
    assert scripted.requests[0].headers["accept"] == "application/binary"
    assert (
        scripted.requests[0].target == scripted.requests[1].target == "/v1/files/file-out/content"
    )


def test_failed_download_leaves_nothing_behind(scripted: ScriptedServer, tmp_path: Path) -> None:
    """A download that fails leaves neither dest nor its .part file."""
    scripted.script(error_answer(404, "gone"))
    provider, _ = make_provider(scripted)
    dest = tmp_path / "results.jsonl"
    with pytest.raises(RemoteNotFound):
        provider.download_file("file-out", dest)
    assert list(tmp_path.iterdir()) == []


def test_undecodable_download_is_a_provider_error(scripted: ScriptedServer, tmp_path: Path) -> None:
    """A body that cannot be decoded (bad gzip) fails as ProviderError, leaving no file."""
    scripted.script(then=Answer(200, b"not gzip", {"content-encoding": "gzip"}))
    provider, sleeps = make_provider(scripted)
    with pytest.raises(ProviderError, match="DecodingError"):
        provider.download_file("file-out", tmp_path / "results.jsonl")
    assert list(tmp_path.iterdir()) == []
    assert sleeps == []
    assert len(scripted.requests) == 1


def test_a_download_that_trickles_is_cut_as_stalled_and_bounded(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """A body sent a byte at a time, each in time for the read timeout (which bounds a read,
    not a body), is cut once a read timeout's time brings less than ``STALLED_BELOW_BYTES``,
    downloaded again, then reported as a timeout: the download is bounded, not held for as
    long as the server likes (here 20 s a try), and leaves no file."""
    scripted.script(then=Answer(200, b"x" * 400, trickle=0.05))
    provider, _ = make_provider(scripted, max_retries=1, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(ProviderError, match="stalled"):
        provider.download_file("file-out", tmp_path / "results.jsonl")
    assert time.monotonic() - started < 3
    assert len(scripted.requests) == 2
    assert list(tmp_path.iterdir()) == []


def test_an_api_answer_that_trickles_is_cut_as_stalled_and_bounded(
    scripted: ScriptedServer,
) -> None:
    """A batch object sent a byte at a time, each in time for the read timeout, is cut as a
    download's body is, retried, then reported: a poll is not held for as long as the
    server likes (here 20 s a try)."""
    body = json.dumps(batch_json()).encode().ljust(400)
    scripted.script(then=Answer(200, body, {"content-type": "application/json"}, trickle=0.05))
    provider, _ = make_provider(scripted, max_retries=1, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(ProviderError, match="stalled"):
        provider.get_batch("batch_1")
    assert time.monotonic() - started < 3
    assert len(scripted.requests) == 2


@pytest.mark.parametrize("call", ["download", "get"])
def test_a_decompression_bomb_is_refused_not_inflated(
    scripted: ScriptedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """A gzip body that inflates past ``MAX_INFLATION`` times its bytes on the wire (zeros:
    about 1,000 times) is refused once past ``INFLATED_FLOOR`` decoded, a ``ProviderError``
    naming it, leaving no file: inflated whole, a few megabytes filled the disk (a download)
    or the memory (a poll) before they ended."""
    monkeypatch.setattr(_http, "INFLATED_FLOOR", 1024 * 1024, raising=False)
    bomb = gzip.compress(b"0" * (8 * 1024 * 1024), compresslevel=9)
    scripted.script(then=Answer(200, bomb, {"content-encoding": "gzip"}))
    provider, _ = make_provider(scripted, max_retries=0)
    with pytest.raises(ProviderError, match="decompression bomb"):
        if call == "download":
            provider.download_file("file-out", tmp_path / "results.jsonl")
        else:
            provider.get_batch("batch_1")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given_client", [False, True], ids=["own-client", "given-client"])
def test_only_encodings_the_bomb_cap_bounds_are_asked_for(
    scripted: ScriptedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    given_client: bool,
) -> None:
    """Every request offers ``Accept-Encoding: gzip, deflate`` even where httpx would offer
    ``br`` and ``zstd`` (the optional brotli or zstandard package installed, as patched in
    here): httpx inflates a whole chunk of those before the decompression-bomb cap sees it,
    and without bound. A client given to the provider sends the same."""
    monkeypatch.setattr(httpx._client, "ACCEPT_ENCODING", "gzip, deflate, br, zstd")
    options: dict[str, object] = {}
    if given_client:
        options["client"] = client = httpx.Client(timeout=10.0)
        request.addfinalizer(client.close)
    scripted.script(ok(), Answer(200, b"{}\n"))
    provider, _ = make_provider(scripted, max_retries=0, **options)
    provider.get_batch("batch_1")
    provider.download_file("file-out", tmp_path / "results.jsonl")
    assert [seen.headers["accept-encoding"] for seen in scripted.requests] == [
        _http.ACCEPT_ENCODING
    ] * 2
    assert _http.ACCEPT_ENCODING == "gzip, deflate"


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, br"])
@pytest.mark.parametrize("call", ["download", "get"])
def test_an_answer_in_an_encoding_not_asked_for_is_refused_unread(
    scripted: ScriptedServer, tmp_path: Path, call: str, encoding: str
) -> None:
    """An answer sent as ``br`` or ``zstd`` although only gzip and deflate were asked for is
    a ``ProviderError`` before a byte of it is decoded, leaving no file: with brotli
    installed, 481 bytes of it inflated to 300 MiB in memory at once."""
    scripted.script(then=Answer(200, b"\x1b\xff\xff", {"content-encoding": encoding}))
    provider, _ = make_provider(scripted, max_retries=2)
    with pytest.raises(ProviderError, match="encoded as '(br|zstd)', which was not asked for"):
        if call == "download":
            provider.download_file("file-out", tmp_path / "results.jsonl")
        else:
            provider.get_batch("batch_1")
    assert list(tmp_path.iterdir()) == []
    assert len(scripted.requests) == 1  # not retried: the server chose to send it so


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_an_api_answer_past_the_cap_is_refused_while_a_download_streams(
    scripted: ScriptedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoding: str
) -> None:
    """A JSON answer (a poll) past ``MAX_ANSWER_BYTES`` decoded, plain or inflating less than
    a bomb does, is refused as a ``ProviderError`` naming the URL (never the key), not held
    whole in memory (an endless body was read until the memory ran out); a file's content
    of that size is a download, streamed to disk as before."""
    monkeypatch.setattr(_http, "MAX_ANSWER_BYTES", 64 * 1024, raising=False)
    body = json.dumps(batch_json()).encode().ljust(256 * 1024)
    headers = {"content-type": "application/json"}
    if encoding == "gzip":
        body, headers["content-encoding"] = gzip.compress(body), "gzip"
    scripted.script(then=Answer(200, body, headers))
    provider, _ = make_provider(scripted, max_retries=0)

    with pytest.raises(
        ProviderError, match=r"GET \S+/batches/batch_1 is larger than 65,536"
    ) as err:
        provider.get_batch("batch_1")

    assert SENTINEL_KEY not in str(err.value)
    assert provider.download_file("file-out", tmp_path / "out.jsonl") == 256 * 1024


def test_an_error_answer_to_a_download_is_read_only_as_far_as_its_envelope(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """A download refused with an error body that inflates (gzip, 128 MiB of blanks after
    the envelope) is read only up to ``MAX_ERROR_BODY_BYTES``: the provider's message is
    still told, and the memory held stays well below the body (it was inflated whole, and
    joined: twice its size). What one chunk off the wire inflates to is httpx's to bound."""
    envelope = json.dumps({"error": {"message": "no such file", "type": "invalid"}}).encode()
    body = gzip.compress(envelope + b" " * (128 * 1024 * 1024), compresslevel=1)
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    scripted.script(then=Answer(400, body, headers))
    provider, _ = make_provider(scripted, max_retries=0)
    tracemalloc.start()
    try:
        with pytest.raises(ProviderError, match="no such file"):
            provider.download_file("file-out", tmp_path / "out.jsonl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 96 * 1024 * 1024
    assert list(tmp_path.iterdir()) == []


def _file_json(size: int) -> Answer:
    body = {
        "id": "file-1",
        "object": "file",
        "bytes": size,
        "created_at": 1,
        "filename": "in.jsonl",
        "purpose": "batch",
    }
    return json_answer(200, body)


def test_upload_streams_a_large_file_in_flat_memory(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """A 64 MB upload reaches the server whole while peak Python memory stays far below its
    size (the file is streamed, never read whole)."""
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    scripted.script(_file_json(64 * 1024 * 1024))
    provider, _ = make_provider(scripted)
    tracemalloc.start()
    try:
        provider.upload_file(big, filename="big.jsonl")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scripted.requests[0].size > 64 * 1024 * 1024
    assert peak < 4 * 1024 * 1024


def test_upload_retry_resends_the_whole_file(scripted: ScriptedServer, tmp_path: Path) -> None:
    """After a 503 the upload is re-sent from the first byte, and the name ends in .jsonl."""
    path = tmp_path / "input.jsonl"
    content = b'{"custom_id": "a"}\n' * 1000
    path.write_bytes(content)
    scripted.script(error_answer(503), _file_json(len(content)))
    provider, sleeps = make_provider(scripted)
    assert provider.upload_file(path, filename="shard-0").id == "file-1"
    first, second = scripted.requests
    assert first.size == second.size > len(content)
    for seen in (first, second):
        assert content in seen.body
        assert b'filename="shard-0.jsonl"' in seen.body
    assert len(sleeps) == 1


# -- the key never leaks -------------------------------------------------------------------


def _echo_auth(seen: Seen) -> Answer:
    return error_answer(401, f"bad key {seen.headers['authorization']}", "invalid_api_key")


def _masked_echo(seen: Seen) -> Answer:
    return error_answer(
        401, f"Incorrect API key provided: {SENTINEL_KEY[:8]}****{SENTINEL_KEY[-4:]}"
    )


def _assert_key_absent(error: ProviderError, provider: OpenAIProvider) -> None:
    for text in (str(error), repr(error), error.message, repr(provider), *error.details):
        assert SENTINEL_KEY not in text
        assert SENTINEL_KEY[8:-4] not in text


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(_echo_auth, id="server-echoes-header"),
        pytest.param(_masked_echo, id="server-echoes-masked-key"),
        pytest.param(error_answer(500), id="plain-500"),
        pytest.param(Answer(404, b"Not Found"), id="plain-404"),
    ],
)
def test_sentinel_key_never_appears_in_errors(
    scripted: ScriptedServer, answer: Answer | Callable[[Seen], Answer]
) -> None:
    """The API key appears in no error message, str or repr, even if a server echoes it."""
    scripted.script(then=answer)
    provider, _ = make_provider(scripted, max_retries=1)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    _assert_key_absent(caught.value, provider)
    if caught.value.status == 401:
        assert "$OPENAI_API_KEY" in str(caught.value)


def test_a_key_with_a_stray_newline_is_refused_without_quoting_it(
    scripted: ScriptedServer,
) -> None:
    """A key with a stray newline (httpx would quote the whole header in its error) is refused
    naming the variable, the key left out, and nothing reaches the server."""
    provider, _ = make_provider(scripted, api_key=SENTINEL_KEY + "\n")
    with pytest.raises(ProviderError, match=r"\$OPENAI_API_KEY contains a character") as caught:
        provider.get_batch("batch_1")
    _assert_key_absent(caught.value, provider)
    assert scripted.requests == []


ODD_KEYS = [
    pytest.param("sk-abc\x01SENTINELTAIL0123456789", "authorization", id="sk-control-mid"),
    pytest.param("AZURE0SENT\x1bINELTAIL0123456789", "api-key", id="azure-escape-mid"),
    pytest.param("AZURE0SENT\x7fINELTAIL0123456789", "api-key", id="azure-del"),
    pytest.param("sk-abcé-SENTINELTAIL0123456789", "authorization", id="sk-non-ascii"),
    pytest.param("AZURE0SENT\u2028INELTAIL0123456789", "api-key", id="unicode-line-sep"),
]


def _chain_texts(error: BaseException) -> list[str]:
    """str and repr of ``error`` and of every exception it was raised from or during."""
    texts: list[str] = []
    seen: BaseException | None = error
    while seen is not None:
        texts += [str(seen), repr(seen), *(str(a) for a in seen.args)]
        seen = seen.__cause__ or seen.__context__
    return texts


@pytest.mark.parametrize(("key", "header"), ODD_KEYS)
def test_a_key_with_odd_characters_never_appears_in_any_error(
    scripted: ScriptedServer, key: str, header: str
) -> None:
    """A key holding a control character or a non-ASCII letter is refused with a ProviderError
    naming the variable; no part of the key is in it or in any exception it chains."""
    provider, _ = make_provider(scripted, api_key=key, auth_header=header)
    with pytest.raises(ProviderError, match="cannot be sent in an HTTP header") as caught:
        provider.get_batch("batch_1")
    for text in _chain_texts(caught.value):
        assert "SENTINELTAIL" not in text and "INELTAIL" not in text
    assert scripted.requests == []


@pytest.mark.parametrize(("key", "header"), ODD_KEYS)
def test_redaction_covers_the_escaped_forms_of_a_key(key: str, header: str) -> None:
    """A key quoted escaped (repr of its text or of its bytes, as h11 quotes a header) is
    redacted, not only its raw form."""
    provider = OpenAIProvider("p", base_url="http://127.0.0.1:9/v1", api_key=key)
    context = provider._http.context
    for quoted in (
        f"Illegal header value {('Bearer ' + key).encode('utf-8')!r}",
        f"value {key!r}",
        key.encode("unicode_escape").decode("ascii"),
        key,
    ):
        assert "INELTAIL" not in context.redact(quoted), quoted


def test_a_placeholder_key_is_redacted_only_where_it_stands_alone() -> None:
    """A short key ("x", "EMPTY": what a self-hosted gateway is given) is taken out where it
    is a word of its own, not out of every word that holds it: the message stays readable."""
    for key in ("x", "EMPTY"):
        context = OpenAIProvider("p", base_url="http://127.0.0.1:9/v1", api_key=key)._http.context
        said = context.redact(f"bad key Bearer {key}; key={key}. Examples: x-ray, EMPTY_SET, xx")
        assert said == "bad key Bearer [redacted]; key=[redacted]. Examples: x-ray, EMPTY_SET, xx"


def test_error_context_repr_leaves_the_key_out(scripted: ScriptedServer) -> None:
    """The error context keeps the key only to redact it: its repr never shows it."""
    provider, _ = make_provider(scripted)
    context = provider._http.context
    assert context.secrets == (SENTINEL_KEY,)
    assert SENTINEL_KEY not in repr(context)
    assert SENTINEL_KEY not in repr(provider._http)


def test_the_key_is_sent_as_a_bearer_header(scripted: ScriptedServer) -> None:
    """The key reaches the server in the Authorization header, and nowhere in the URL or body."""
    scripted.script(ok())
    provider, _ = make_provider(scripted)
    provider.get_batch("batch_1")
    [seen] = scripted.requests
    assert seen.headers["authorization"] == f"Bearer {SENTINEL_KEY}"
    assert SENTINEL_KEY not in seen.target
    assert SENTINEL_KEY.encode() not in seen.body


def test_a_custom_auth_header_carries_the_raw_key(scripted: ScriptedServer) -> None:
    """auth_header='api-key' (Azure style) sends the key without 'Bearer'."""
    scripted.script(ok())
    provider, _ = make_provider(scripted, api_key="k1", auth_header="api-key")
    provider.get_batch("batch_1")
    [seen] = scripted.requests
    assert seen.headers["api-key"] == "k1"
    assert "authorization" not in seen.headers


def test_no_key_sends_no_auth_header_and_says_so_on_401(scripted: ScriptedServer) -> None:
    """Without a key nothing is sent, and a 401 says to set the variable."""
    scripted.script(error_answer(401, "missing key"))
    provider, _ = make_provider(scripted, api_key=None)
    with pytest.raises(ProviderError, match=r"No API key was sent: set \$OPENAI_API_KEY"):
        provider.get_batch("batch_1")
    assert "authorization" not in scripted.requests[0].headers


def test_base_url_must_be_http() -> None:
    """A base URL without http(s) fails at construction with a clear message."""
    with pytest.raises(ProviderError, match="must start with http"):
        OpenAIProvider("p", base_url="api.openai.com/v1", api_key="k")


@pytest.mark.parametrize(
    ("base_url", "said"),
    [
        ("http://127.0.0.1:/v1", "has an empty port"),
        ("http://user:hunter2@127.0.0.1:8x/v1", "has the port '8x'"),
        ("http://:8000/v1", "names no host"),
        ("http://user:hunter2@[::1/v1", "is no URL"),
    ],
)
def test_a_base_url_that_names_no_place_fails_at_construction_saying_why(
    base_url: str, said: str
) -> None:
    """``OPENAI_BASE_URL`` is not validated with the project file: a base URL with an empty or
    non-numeric port, or no host, fails at construction saying what is wrong with it (it
    connected to port 80, or said the URL must start with http://), and shows no password."""
    with pytest.raises(ProviderError, match=said) as caught:
        OpenAIProvider("p", base_url=base_url, api_key="k")
    assert "hunter2" not in str(caught.value)
    assert "must start with http" not in str(caught.value)


def test_a_key_of_any_shape_is_redacted_when_echoed(scripted: ScriptedServer) -> None:
    """A key that does not look like sk-… (Azure style) is still redacted if a server echoes it."""
    key = "AZURE0SENTINEL0abcdef0123456789"
    scripted.script(then=lambda seen: error_answer(400, f"header was {seen.headers['api-key']}"))
    provider, _ = make_provider(
        scripted, api_key=key, auth_header="api-key", api_key_env="AZURE_OPENAI_API_KEY"
    )
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert key not in str(caught.value)
    assert "header was [redacted]" in str(caught.value)


def test_a_key_echoed_past_the_length_a_message_keeps_is_not_cut_in_half(
    scripted: ScriptedServer,
) -> None:
    """A server quoting the request's headers (and the key among them) around the 500th
    character of its message: the key is redacted before the message is shortened, so no
    head of it (cut by the "…") is left in the error, and so in the state's audit log."""
    key = "AZURE0SENTINEL0abcdef0123456789"
    for pad in range(470, 505, 4):
        scripted.script(error_answer(400, "x" * pad + f" api-key: {key} end"))
        provider, _ = make_provider(scripted, api_key=key, auth_header="api-key")
        with pytest.raises(ProviderError) as caught:
            provider.get_batch("batch_1")
        assert "AZURE0SEN" not in str(caught.value), pad


@pytest.mark.parametrize(
    "key",
    [
        pytest.param('SENTINEL0"quote\\back0123456789', id="quote-backslash"),
        pytest.param("SENTINEL0'single\"double0123456789", id="both-quotes"),
        pytest.param("SENTINEL0/slash+plus=eq%pct&amp0123", id="url-characters"),
    ],
)
def test_a_key_with_json_escaped_characters_is_redacted_when_echoed_as_json(
    scripted: ScriptedServer, key: str
) -> None:
    """A key holding a character JSON escapes (a quote, a backslash), echoed in a message
    that quotes the request's headers as JSON (once, or JSON inside JSON) or percent-encoded,
    is redacted in each form, not only raw."""
    headers = json.dumps({"Authorization": f"Bearer {key}"})
    for said in (headers, json.dumps(headers), f"url was /v1?key={quote(key, safe='')}"):
        scripted.script(error_answer(400, said))
        provider, _ = make_provider(scripted, api_key=key)
        with pytest.raises(ProviderError) as caught:
            provider.get_batch("batch_1")
        assert "SENTINEL0" not in str(caught.value), said


def test_a_head_of_the_key_quoted_by_a_broken_redirect_is_redacted(
    scripted: ScriptedServer,
) -> None:
    """A redirect whose Location quotes the Authorization header (a key holding a '/'):
    httpx refuses the URL quoting only the part before the '/' as its port, and that head of
    the key (16 characters or more of it) is redacted like the whole key."""
    key = "SENTINEL0abcdef0123/tail0123456789"
    scripted.script(
        then=lambda s: Answer(
            302, b"", {"location": f"http://u:{s.headers['authorization']}@h.test/x"}
        )
    )
    provider, _ = make_provider(scripted, api_key=key, max_retries=0)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert "SENTINEL0abcdef" not in str(caught.value)


def test_a_call_waiting_out_a_retry_after_stops_when_its_pool_closes_on_ctrl_c(
    scripted: ScriptedServer,
) -> None:
    """A pool call in its wait before a retry (a 429 asking for 30 s) gives up as soon as its
    pass's pool closes on Ctrl-C, instead of holding the interrupted run through every
    Retry-After its retries still had to wait; it is not sent again."""
    from batchspec.core.reconcile.prefetch import BoundedCalls
    from batchspec.providers.base import CallStopped

    scripted.script(error_answer(429, "slow down", retry_after="30"), ok())
    provider = OpenAIProvider("testprov", base_url=scripted.v1, api_key=SENTINEL_KEY)
    calls = BoundedCalls(2, lambda _: None)
    waiting = calls.submit("testprov", lambda: provider.get_batch("batch_1"))
    started = time.monotonic()
    deadline = started + 10
    while not scripted.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    calls.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert time.monotonic() - started < 5
    with pytest.raises(CallStopped):
        waiting.result(timeout=1)
    assert scripted.methods() == ["GET"]


class _CountingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """Answers every GET with a batch once ``size`` GETs are in flight together; counts the
    connections opened and closed."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, size: int) -> None:
        self.in_flight = threading.Barrier(size, timeout=10)
        self.opened = 0
        self.closed = 0
        counts = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                counts.opened += 1

            def finish(self) -> None:
                super().finish()
                counts.closed += 1

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                counts.in_flight.wait()  # the round's calls are all in flight before any answer
                body = json.dumps(batch_json()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def rounds(self, call: Callable[[], object], size: int, rounds: int = 2) -> None:
        for _ in range(rounds):
            calls = [threading.Thread(target=call) for _ in range(size)]
            for thread in calls:
                thread.start()
            for thread in calls:
                thread.join(10)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def test_a_client_keeps_a_connection_for_each_call_in_flight_up_to_256() -> None:
    """30 calls in flight at once, twice: the second round reuses the 30 connections of the
    first (httpx's default keeps 20 idle, so 10 were closed at each answer and opened again:
    a handshake per call at a --parallelism above 20)."""
    server = _CountingServer(30)
    client = _http.new_client(server.base)
    try:
        server.rounds(lambda: client.get(f"{server.base}/batches/batch_1").raise_for_status(), 30)
        assert server.opened == 30
    finally:
        client.close()
        server.stop()


def test_calls_in_flight_each_take_a_client_given_back_for_the_next_and_closed_at_the_end() -> None:
    """A provider's overlapping calls each run on a client of their own (one connection
    each: one shared client's pool costs CPU in the square of its connections), given back
    when the call ends: the second round of 12 overlapping calls reuses the 12 connections of
    the first, and closing the provider closes every one of them."""
    server = _CountingServer(12)
    provider = OpenAIProvider("p", base_url=server.base, api_key=SENTINEL_KEY)
    try:
        server.rounds(lambda: provider.get_batch("batch_1"), 12)
        assert server.opened == 12
        provider.close()
        deadline = time.monotonic() + 5
        while server.closed < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.closed == 12
    finally:
        provider.close()
        server.stop()


# -- apply --wait --timeout ------------------------------------------------------------------


def test_a_create_past_the_runs_timeout_is_not_sent_and_says_so(scripted: ScriptedServer) -> None:
    """With the run's --timeout spent, a create is refused before it leaves (``sent_nothing``:
    its intent is ``pending`` again, created at once next run); a 429 whose Retry-After
    outlasts what is left ends the call at once instead of waiting, not marked as unsent
    (after a first attempt, only a lookup could tell)."""
    from batchspec.providers.base import DeadlineReached, reset_deadline, within

    provider, sleeps = make_provider(scripted)
    token = within(time.monotonic() - 1)
    try:
        with pytest.raises(DeadlineReached) as spent:
            provider.create_batch(
                input_file_id="file-1", endpoint=CHAT, completion_window="24h", metadata={}
            )
        assert spent.value.sent_nothing and scripted.methods() == []
    finally:
        reset_deadline(token)
    scripted.script(error_answer(429, retry_after="30"), ok())
    token = within(time.monotonic() + 5)
    try:
        with pytest.raises(DeadlineReached) as waited:
            provider.get_batch("batch_1")
        assert not waited.value.sent_nothing and sleeps == []
        assert scripted.methods() == ["GET"]  # the 429's retry was not waited for
    finally:
        reset_deadline(token)
