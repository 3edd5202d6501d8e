"""Retry, backoff and error-message rules of the provider HTTP layer (providers._http).

These are timing and sequence rules, so they run against ``httpx.MockTransport`` (httpx's
transport-injection seam) with an injected ``sleep`` that records instead of waiting. The
provider's behaviour against a real server is in test_provider_openai.py.
"""

from __future__ import annotations

import email.utils
import json
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from batchspec.errors import ProviderError
from batchspec.providers.base import AmbiguousOutcome, RemoteNotFound
from batchspec.providers.openai import OpenAIProvider
from batchspec.wire.retry import CLIENT_POLICY

SENTINEL_KEY = "sk-SENTINEL-4f1b2c3d9e8a7b6c5d4e3f2a1b0c9d8e"
BASE_URL = "http://provider.test/v1"

Handler = Callable[[httpx.Request], httpx.Response]


def batch_json(batch_id: str = "batch_1", **fields: object) -> dict[str, object]:
    data: dict[str, object] = {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-1",
        "completion_window": "24h",
        "status": "in_progress",
        "created_at": int(time.time()),
    }
    data.update(fields)
    return data


def error_response(
    status: int, message: str = "boom", code: str | None = None, **headers: str
) -> httpx.Response:
    body = {"error": {"message": message, "type": "test_error", "param": None, "code": code}}
    # keyword names stand for header names: x_request_id -> x-request-id
    return httpx.Response(
        status, json=body, headers={k.replace("_", "-"): v for k, v in headers.items()}
    )


class Script:
    """A transport handler that answers from a list, in order, and records every request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_provider(
    handler: Handler, *, max_retries: int = 5, rand: Callable[[], float] | None = None
) -> tuple[OpenAIProvider, list[float]]:
    sleeps: list[float] = []
    provider = OpenAIProvider(
        "testprov",
        base_url=BASE_URL,
        api_key=SENTINEL_KEY,
        transport=httpx.MockTransport(handler),
        max_retries=max_retries,
        sleep=sleeps.append,
        **({"rand": rand} if rand is not None else {}),
    )
    return provider, sleeps


# -- Retry-After ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after": "3"}, 3.0, id="seconds"),
        pytest.param({"retry-after": "1.5"}, 1.5, id="fractional-seconds"),
        pytest.param({"retry-after-ms": "250"}, 0.25, id="milliseconds"),
        pytest.param({"retry-after-ms": "250", "retry-after": "9"}, 0.25, id="ms-wins"),
        pytest.param({"retry-after": "3600"}, 60.0, id="capped-at-60s"),
    ],
)
def test_429_then_200_waits_what_the_server_asked(headers: dict[str, str], expected: float) -> None:
    """A 429 is retried after the server's Retry-After / retry-after-ms, capped at 60 s."""
    script = Script(
        error_response(429, "slow down", **headers), httpx.Response(200, json=batch_json())
    )
    provider, sleeps = make_provider(script)
    assert provider.get_batch("batch_1").id == "batch_1"
    assert sleeps == [pytest.approx(expected)]
    assert len(script.requests) == 2


def test_retry_after_http_date_is_honoured() -> None:
    """Retry-After given as an HTTP date waits until that moment."""
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    script = Script(error_response(429, retry_after=when), httpx.Response(200, json=batch_json()))
    provider, sleeps = make_provider(script)
    provider.get_batch("batch_1")
    assert len(sleeps) == 1
    assert 17.0 <= sleeps[0] <= 20.0


def test_unparseable_retry_after_falls_back_to_backoff() -> None:
    """A Retry-After that cannot be read leads to the normal exponential backoff."""
    script = Script(error_response(429, retry_after="soon"), httpx.Response(200, json=batch_json()))
    provider, sleeps = make_provider(script, rand=lambda: 0.0)
    provider.get_batch("batch_1")
    assert sleeps == [0.5]


# -- backoff -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409])
def test_transient_statuses_are_retried(status: int) -> None:
    """5xx, 408 and 409 are retried until a success arrives."""
    script = Script(
        error_response(status), error_response(status), httpx.Response(200, json=batch_json())
    )
    provider, sleeps = make_provider(script)
    assert provider.get_batch("batch_1").status == "in_progress"
    assert len(script.requests) == 3
    assert len(sleeps) == 2


def test_backoff_is_exponential_with_bounded_jitter() -> None:
    """Without Retry-After the waits double from 0.5 s to at most 8 s, minus at most 25 %."""
    script = Script(
        *[error_response(503) for _ in range(7)], httpx.Response(200, json=batch_json())
    )
    provider, sleeps = make_provider(script, max_retries=7)
    provider.get_batch("batch_1")
    bases = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert len(sleeps) == len(bases)
    for slept, base in zip(sleeps, bases, strict=True):
        assert 0.75 * base <= slept <= base


def test_backoff_extremes_of_the_jitter() -> None:
    """The jitter factor spans exactly [0.75, 1] of the exponential base."""
    policy = CLIENT_POLICY
    assert [policy.backoff(n, rand=lambda: 0.0) for n in range(6)] == [0.5, 1, 2, 4, 8, 8]
    assert policy.backoff(2, rand=lambda: 1.0) == pytest.approx(1.5)


def test_retries_exhausted_reports_status_message_and_request_id() -> None:
    """After max_retries the last failure is raised with the provider's words and request id."""
    script = Script(
        *[error_response(503, "engine overloaded", "overloaded", x_request_id="req_42")] * 4
    )
    provider, sleeps = make_provider(script, max_retries=3)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    error = caught.value
    assert len(script.requests) == 4
    assert len(sleeps) == 3
    assert error.status == 503
    assert error.code == "overloaded"
    assert error.request_id == "req_42"
    assert error.retryable is True
    assert "engine overloaded" in str(error)
    assert "req_42" in str(error)
    assert "HTTP 503" in str(error)


# -- not retried ---------------------------------------------------------------------------


def test_insufficient_quota_is_not_retried() -> None:
    """A 429 with code insufficient_quota fails at once: waiting does not buy quota."""
    script = Script(error_response(429, "You exceeded your quota", "insufficient_quota"))
    provider, sleeps = make_provider(script)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert len(script.requests) == 1
    assert sleeps == []
    assert caught.value.status == 429
    assert caught.value.code == "insufficient_quota"
    assert caught.value.retryable is False
    assert "quota" in str(caught.value).lower()


def test_x_should_retry_false_is_respected() -> None:
    """x-should-retry: false stops retries even for a 500."""
    script = Script(error_response(500, x_should_retry="false"))
    provider, sleeps = make_provider(script)
    with pytest.raises(ProviderError):
        provider.get_batch("batch_1")
    assert len(script.requests) == 1
    assert sleeps == []


def test_x_should_retry_true_forces_a_retry() -> None:
    """x-should-retry: true makes even a 400 worth another attempt."""
    script = Script(
        error_response(400, x_should_retry="true"), httpx.Response(200, json=batch_json())
    )
    provider, _ = make_provider(script)
    provider.get_batch("batch_1")
    assert len(script.requests) == 2


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
    status: int, message: str, error_class: type[ProviderError], hint: str
) -> None:
    """4xx answers fail at once with the provider's message and a hint of what to do."""
    script = Script(error_response(status, message, "some_code", x_request_id="req_7"))
    provider, sleeps = make_provider(script)
    with pytest.raises(error_class) as caught:
        provider.get_batch("batch_1")
    assert type(caught.value) is error_class
    assert len(script.requests) == 1
    assert sleeps == []
    text = str(caught.value)
    assert message in text
    assert hint in text
    assert "req_7" in text
    assert caught.value.status == status
    assert caught.value.code == "some_code"


def test_litellm_relayed_404_code_is_not_found() -> None:
    """LiteLLM's relayed 404 (status 400, code "404") is read as not found."""
    script = Script(error_response(400, "Error code: 404 - no such file", "404"))
    provider, _ = make_provider(script)
    with pytest.raises(RemoteNotFound):
        provider.get_file("file-x")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        pytest.param(
            httpx.Response(502, text="<html><body>Bad Gateway</body></html>"),
            "Bad Gateway",
            id="html",
        ),
        pytest.param(httpx.Response(400, text="plain words"), "plain words", id="text"),
        pytest.param(httpx.Response(400, content=b""), "Bad Request", id="empty-uses-reason"),
        pytest.param(
            httpx.Response(400, json={"detail": "from fastapi"}), "from fastapi", id="detail"
        ),
        pytest.param(httpx.Response(400, json={"error": "flat string"}), "flat string", id="flat"),
        pytest.param(httpx.Response(400, json=["odd"]), "odd", id="json-list"),
    ],
)
def test_non_envelope_error_bodies_are_reported(response: httpx.Response, expected: str) -> None:
    """Error bodies that are not the OpenAI envelope still make a readable message."""
    provider, _ = make_provider(Script(*[response] * 6))
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert expected in str(caught.value)
    assert caught.value.status == response.status_code


def test_success_with_a_body_that_is_not_json_is_a_clear_error() -> None:
    """A 200 whose body is not a JSON object (wrong base URL) is reported, not a crash."""
    provider, _ = make_provider(Script(httpx.Response(200, text="<html>welcome</html>")))
    with pytest.raises(ProviderError, match="not the expected JSON object"):
        provider.get_batch("batch_1")


# -- transport errors ----------------------------------------------------------------------


def test_connect_errors_are_retried_then_reported_clearly() -> None:
    """A refused connection is retried with backoff, then named with the base URL."""
    script = Script(*[httpx.ConnectError("[Errno 111] Connection refused")] * 3)
    provider, sleeps = make_provider(script, max_retries=2)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert len(script.requests) == 3
    assert len(sleeps) == 2
    text = str(caught.value)
    assert "could not connect" in text
    assert BASE_URL in text
    assert "Connection refused" in text
    assert caught.value.retryable is True


def test_timeout_then_success() -> None:
    """A read timeout on a GET is retried."""
    script = Script(httpx.ReadTimeout("timed out"), httpx.Response(200, json=batch_json()))
    provider, sleeps = make_provider(script)
    provider.get_batch("batch_1")
    assert len(sleeps) == 1


def test_unsupported_protocol_is_not_retried() -> None:
    """A transport error that cannot get better (bad scheme) is not retried."""
    script = Script(httpx.UnsupportedProtocol("no such scheme"))
    provider, sleeps = make_provider(script)
    with pytest.raises(ProviderError):
        provider.get_batch("batch_1")
    assert sleeps == []


# -- creating a batch never pays twice -----------------------------------------------------


def _create(provider: OpenAIProvider) -> str:
    return provider.create_batch(
        input_file_id="file-1",
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"batchspec_resource": "triage", "batchspec_attempt": "1"},
    ).id


def _list(*batches: dict[str, object]) -> httpx.Response:
    return httpx.Response(200, json={"object": "list", "data": list(batches), "has_more": False})


def test_ambiguous_create_adopts_the_batch_the_server_made() -> None:
    """A 500 on create is not re-sent when the batch it made is found in the list."""
    made = batch_json(
        "batch_made", metadata={"batchspec_resource": "triage", "batchspec_attempt": "1"}
    )
    other = batch_json("batch_other", metadata={"batchspec_resource": "other"})
    script = Script(error_response(500), _list(other, made))
    provider, _ = make_provider(script)
    assert _create(provider) == "batch_made"
    posts = [r for r in script.requests if r.method == "POST"]
    assert len(posts) == 1


def test_ambiguous_create_resends_when_nothing_was_made() -> None:
    """A read timeout on create is re-sent only after the list shows no such batch."""
    script = Script(
        httpx.ReadTimeout("timed out"),
        _list(batch_json("batch_old", metadata={"batchspec_resource": "triage"}, created_at=1)),
        httpx.Response(200, json=batch_json("batch_new")),
    )
    provider, sleeps = make_provider(script)
    assert _create(provider) == "batch_new"
    assert [r.method for r in script.requests] == ["POST", "GET", "POST"]
    assert len(sleeps) == 1


KEYED = {
    "batchspec_resource": "triage",
    "batchspec_spec": "ab" * 32,
    "batchspec_shard": "0",
    "batchspec_attempt": "1",
}


def test_ambiguous_keyed_create_is_found_by_its_key_even_with_a_rewritten_file_id() -> None:
    """A create carrying batchspec's key is recognised by the key alone: a proxy that lists
    rewritten file ids, or a server clock behind ours, must not cause a second create."""
    made = batch_json("batch_made", metadata=KEYED, created_at=1)
    made["input_file_id"] = "file-rewritten-by-a-proxy"
    script = Script(error_response(500), _list(made))
    provider, _ = make_provider(script)
    created = provider.create_batch(
        input_file_id="file-1",
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=KEYED,
    )
    assert created.id == "batch_made"
    assert [r.method for r in script.requests] == ["POST", "GET"]


def test_ambiguous_keyed_create_not_found_is_never_re_sent() -> None:
    """A keyed create that timed out and is not listed may still be in transit: the provider
    raises AmbiguousOutcome (the reconciler looks it up through its window) and sends no
    second create."""
    script = Script(httpx.ReadTimeout("timed out"), _list())
    provider, sleeps = make_provider(script)
    with pytest.raises(AmbiguousOutcome):
        provider.create_batch(
            input_file_id="file-1",
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=KEYED,
        )
    assert [r.method for r in script.requests] == ["POST", "GET"]
    assert sleeps == []


def test_unambiguous_create_failures_are_retried_directly() -> None:
    """A 429 or 503 on create means nothing was made: it is re-sent without a lookup."""
    script = Script(
        error_response(429, retry_after="1"),
        error_response(503),
        httpx.Response(200, json=batch_json("batch_new")),
    )
    provider, _ = make_provider(script)
    assert _create(provider) == "batch_new"
    assert [r.method for r in script.requests] == ["POST", "POST", "POST"]
    assert json.loads(script.requests[0].content)["metadata"]["batchspec_resource"] == "triage"


# -- paths, pagination, streaming ----------------------------------------------------------


def test_opaque_ids_are_quoted_into_paths() -> None:
    """Ids with '/', '+' and '=' (LiteLLM base64) stay one path segment."""
    script = Script(httpx.Response(200, json=batch_json("bGl0ZWxsbTo/+x==")))
    provider, _ = make_provider(script)
    provider.get_batch("bGl0ZWxsbTo/+x==")
    assert script.requests[0].url.raw_path == b"/v1/batches/bGl0ZWxsbTo%2F%2Bx%3D%3D"


def test_list_stops_when_a_server_repeats_its_cursor() -> None:
    """A server that returns the same last_id with has_more forever does not loop forever."""
    page = {"object": "list", "data": [batch_json("b1")], "last_id": "b1", "has_more": True}
    provider, _ = make_provider(lambda request: httpx.Response(200, json=page))
    assert [b.id for b in provider.list_batches(page_size=1)] == ["b1", "b1"]


class _BrokenStream(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield b"partial line\n"
        raise httpx.ReadError("connection reset")


def test_download_restarts_after_a_connection_lost_mid_body(tmp_path: Path) -> None:
    """A download cut mid-body restarts, and only the complete content lands at dest."""
    script = Script(
        httpx.Response(200, stream=_BrokenStream()),
        httpx.Response(200, content=b"line 1\nline 2\n"),
    )
    provider, sleeps = make_provider(script)
    dest = tmp_path / "out" / "results.jsonl"
    assert provider.download_file("file-out", dest) == 14
    assert dest.read_bytes() == b"line 1\nline 2\n"
    assert list(dest.parent.iterdir()) == [dest]
    assert len(sleeps) == 1
    assert script.requests[0].headers["accept"] == "application/binary"


def test_failed_download_leaves_nothing_behind(tmp_path: Path) -> None:
    """A download that fails leaves neither dest nor its .part file."""
    provider, _ = make_provider(Script(error_response(404, "gone")))
    dest = tmp_path / "results.jsonl"
    with pytest.raises(RemoteNotFound):
        provider.download_file("file-out", dest)
    assert list(tmp_path.iterdir()) == []


def test_undecodable_download_is_a_provider_error(tmp_path: Path) -> None:
    """A body that cannot be decoded (bad gzip) fails as ProviderError, leaving no file."""
    bad = httpx.Response(
        200, stream=httpx.ByteStream(b"not gzip"), headers={"content-encoding": "gzip"}
    )
    provider, sleeps = make_provider(Script(bad))
    with pytest.raises(ProviderError, match="DecodingError"):
        provider.download_file("file-out", tmp_path / "results.jsonl")
    assert list(tmp_path.iterdir()) == []
    assert sleeps == []


class _ConsumingTransport(httpx.BaseTransport):
    """Reads each request body chunk by chunk without keeping it, like a socket would."""

    def __init__(self, first_status: int = 200) -> None:
        self.statuses = [first_status, 200]
        self.body_sizes: list[int] = []
        self.largest_chunk = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        size = 0
        for chunk in request.stream:  # type: ignore[union-attr]
            size += len(chunk)
            self.largest_chunk = max(self.largest_chunk, len(chunk))
        self.body_sizes.append(size)
        status = self.statuses.pop(0)
        if status != 200:
            return error_response(status)
        body = {
            "id": "file-1",
            "object": "file",
            "bytes": size,
            "created_at": 1,
            "filename": "in.jsonl",
            "purpose": "batch",
        }
        return httpx.Response(200, json=body)


def test_upload_streams_a_large_file_in_flat_memory(tmp_path: Path) -> None:
    """A 64 MB upload is sent in small chunks; peak Python memory stays far below its size."""
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    transport = _ConsumingTransport()
    provider = OpenAIProvider("t", base_url=BASE_URL, api_key=SENTINEL_KEY, transport=transport)
    tracemalloc.start()
    try:
        provider.upload_file(big, filename="big.jsonl")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert transport.body_sizes[0] > 64 * 1024 * 1024
    assert transport.largest_chunk <= 64 * 1024
    assert peak < 4 * 1024 * 1024


def test_upload_retry_resends_the_whole_file(tmp_path: Path) -> None:
    """After a 503 the upload is re-sent from the first byte, and the name ends in .jsonl."""
    path = tmp_path / "input.jsonl"
    path.write_bytes(b'{"custom_id": "a"}\n' * 1000)
    transport = _ConsumingTransport(first_status=503)
    provider = OpenAIProvider(
        "t", base_url=BASE_URL, api_key=SENTINEL_KEY, transport=transport, sleep=lambda s: None
    )
    assert provider.upload_file(path, filename="shard-0").id == "file-1"
    assert len(transport.body_sizes) == 2
    assert transport.body_sizes[0] == transport.body_sizes[1] > path.stat().st_size


# -- the key never leaks -------------------------------------------------------------------


def _echo_auth(request: httpx.Request) -> httpx.Response:
    return error_response(401, f"bad key {request.headers['authorization']}", "invalid_api_key")


def _raise_with_key(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError(f"refused while sending {request.headers['authorization']}")


def _masked_echo(request: httpx.Request) -> httpx.Response:
    return error_response(
        401, f"Incorrect API key provided: {SENTINEL_KEY[:8]}****{SENTINEL_KEY[-4:]}"
    )


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(_echo_auth, id="server-echoes-header"),
        pytest.param(_raise_with_key, id="transport-error-mentions-header"),
        pytest.param(_masked_echo, id="server-echoes-masked-key"),
        pytest.param(lambda r: error_response(500), id="plain-500"),
        pytest.param(lambda r: httpx.Response(404, text="Not Found"), id="plain-404"),
    ],
)
def test_sentinel_key_never_appears_in_errors(handler: Handler) -> None:
    """The API key appears in no error message, str or repr, even if a server echoes it."""
    provider, _ = make_provider(handler, max_retries=1)
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    error = caught.value
    for text in (str(error), repr(error), error.message, repr(provider), *error.details):
        assert SENTINEL_KEY not in text
        assert SENTINEL_KEY[8:-4] not in text
    if error.status == 401:
        assert "$OPENAI_API_KEY" in str(error)


def test_error_context_repr_leaves_the_key_out() -> None:
    """The error context keeps the key only to redact it: its repr never shows it."""
    provider, _ = make_provider(lambda r: error_response(500))
    context = provider._http.context
    assert context.secrets == (SENTINEL_KEY,)
    assert SENTINEL_KEY not in repr(context)
    assert SENTINEL_KEY not in repr(provider._http)


def test_the_key_is_sent_as_a_bearer_header() -> None:
    """The key goes in the Authorization header, and nowhere in the URL or body."""
    script = Script(httpx.Response(200, json=batch_json()))
    provider, _ = make_provider(script)
    provider.get_batch("batch_1")
    request = script.requests[0]
    assert request.headers["authorization"] == f"Bearer {SENTINEL_KEY}"
    assert SENTINEL_KEY not in str(request.url)


def test_a_custom_auth_header_carries_the_raw_key() -> None:
    """auth_header='api-key' (Azure style) sends the key without 'Bearer'."""
    script = Script(httpx.Response(200, json=batch_json()))
    provider = OpenAIProvider(
        "az",
        base_url=BASE_URL,
        api_key="k1",
        auth_header="api-key",
        transport=httpx.MockTransport(script),
    )
    provider.get_batch("batch_1")
    assert script.requests[0].headers["api-key"] == "k1"
    assert "authorization" not in script.requests[0].headers


def test_no_key_sends_no_auth_header_and_says_so_on_401() -> None:
    """Without a key nothing is sent, and a 401 says to set the variable."""
    script = Script(error_response(401, "missing key"))
    provider = OpenAIProvider(
        "p", base_url=BASE_URL, api_key=None, transport=httpx.MockTransport(script)
    )
    with pytest.raises(ProviderError, match=r"No API key was sent: set \$OPENAI_API_KEY"):
        provider.get_batch("batch_1")
    assert "authorization" not in script.requests[0].headers


def test_base_url_must_be_http() -> None:
    """A base URL without http(s) fails at construction with a clear message."""
    with pytest.raises(ProviderError, match="must start with http"):
        OpenAIProvider("p", base_url="api.openai.com/v1", api_key="k")


def test_a_key_of_any_shape_is_redacted_when_echoed() -> None:
    """A key that does not look like sk-… (Azure style) is still redacted if a server echoes it."""
    key = "AZURE0SENTINEL0abcdef0123456789"

    def echo(request: httpx.Request) -> httpx.Response:
        return error_response(400, f"header was {request.headers['api-key']}")

    provider = OpenAIProvider(
        "az",
        base_url=BASE_URL,
        api_key=key,
        auth_header="api-key",
        transport=httpx.MockTransport(echo),
        api_key_env="AZURE_OPENAI_API_KEY",
    )
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert key not in str(caught.value)
    assert "header was [redacted]" in str(caught.value)
