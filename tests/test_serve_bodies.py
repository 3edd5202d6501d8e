"""`batchspec serve` reads JSON request bodies under a cap, and answers bad JSON in each API's
error envelope, over real loopback HTTP.

A create body is read chunk by chunk and refused with 413 as soon as it passes its cap (2 MiB
for OpenAI/Azure creates, Anthropic's documented 256 MB for inline Message Batches); the 413
says ``Connection: close``, so the server stops reading. The client here streams a chunked
body from a generator that counts what it yielded: the server must answer long before the
generator is drained. A JSON body nested 100,000 deep is a 400 in the API's envelope, never a
plain-text 500.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batchspec.engine.bodies import CREATE_BODY_LIMIT

MiB = 1024 * 1024
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
#: route family -> (path, extra headers)
OPENAI_ROUTES = [
    pytest.param("/v1/batches", id="openai"),
    pytest.param("/batches", id="openai-unprefixed"),
    pytest.param("/openai/v1/batches", id="azure-v1"),
    pytest.param("/openai/batches?api-version=2024-10-21", id="azure-versioned"),
]


class CountingBody:
    """A chunked request body of up to ``total`` bytes that counts what the client pulled."""

    def __init__(self, total: int, chunk: int = 64 * 1024, prefix: bytes = b"") -> None:
        self.total = total
        self.chunk = b"x" * chunk
        self.prefix = prefix
        self.yielded = 0

    def __iter__(self) -> Iterator[bytes]:
        yield self.prefix
        self.yielded += len(self.prefix)
        while self.yielded < self.total:
            yield self.chunk
            self.yielded += len(self.chunk)


def post_stream(url: str, body: CountingBody, headers: dict[str, str] | None = None) -> Any:
    with httpx.Client(timeout=60.0) as client:
        return client.post(url, content=body, headers=headers or {})


@pytest.mark.parametrize("path", OPENAI_ROUTES)
def test_an_endless_chunked_create_is_refused_at_the_cap(serve_engine, path: str) -> None:
    """A chunked create body far over 2 MiB gets 413 in OpenAI's envelope after the server
    read about the cap, not the whole body."""
    server = serve_engine()
    body = CountingBody(total=128 * MiB, prefix=b'{"metadata": {"k": "')
    answer = post_stream(server.base_url + path, body)
    assert answer.status_code == 413
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_too_large"
    assert answer.headers["connection"] == "close"
    assert body.yielded < CREATE_BODY_LIMIT + 16 * MiB, f"the client sent {body.yielded} bytes"


def test_an_endless_chunked_message_batch_is_refused_at_its_cap(
    serve_engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Message Batches create stops reading at its cap (here lowered to 4 MiB, to spare the
    test 256 MB) and answers 413 request_too_large in Anthropic's envelope."""
    monkeypatch.setattr("batchspec.engine.anthropic_routes.MAX_BATCH_BODY_BYTES", 4 * MiB)
    server = serve_engine()
    body = CountingBody(total=128 * MiB, prefix=b'{"requests": [{"custom_id": "')
    answer = post_stream(f"{server.v1}/messages/batches", body, ANTHROPIC_HEADERS)
    assert answer.status_code == 413
    assert answer.json()["type"] == "error"
    assert answer.json()["error"]["type"] == "request_too_large"
    assert body.yielded < 4 * MiB + 16 * MiB, f"the client sent {body.yielded} bytes"


def test_a_declared_length_over_256_mb_is_refused_before_reading(serve_engine) -> None:
    """A Message Batches create whose Content-Length passes 256 MB is refused unread."""
    server = serve_engine()
    body = CountingBody(total=300 * MiB)
    headers = {**ANTHROPIC_HEADERS, "content-length": str(300 * MiB)}
    answer = post_stream(f"{server.v1}/messages/batches", body, headers)
    assert answer.status_code == 413
    assert answer.json()["error"]["type"] == "request_too_large"
    assert body.yielded < 16 * MiB


def test_a_body_under_the_cap_still_creates_and_keeps_the_connection(serve_engine) -> None:
    """A normal create read to its end is answered on a connection that stays open."""
    server = serve_engine()
    with httpx.Client(base_url=server.v1, timeout=10.0) as client:
        file_id = client.post(
            "/files", files={"file": ("in.jsonl", b"")}, data={"purpose": "batch"}
        ).json()["id"]
        payload = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        created = client.post("/batches", json=payload)
        assert created.status_code == 200, created.text
        assert created.headers.get("connection") != "close"


DEEP = b"[" * 100_000


@pytest.mark.parametrize("path", OPENAI_ROUTES)
def test_deeply_nested_json_is_a_400_in_openai_s_envelope(serve_engine, path: str) -> None:
    """'[' * 100000 to an OpenAI or Azure create is 400 invalid_request_error, not a 500."""
    server = serve_engine()
    answer = httpx.post(server.base_url + path, content=DEEP, timeout=10.0)
    assert answer.status_code == 400, answer.text[:200]
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_deeply_nested_json_is_a_400_in_anthropic_s_envelope(serve_engine) -> None:
    """'[' * 100000 to the Message Batches create is 400 in Anthropic's envelope."""
    server = serve_engine()
    answer = httpx.post(
        f"{server.v1}/messages/batches", content=DEEP, headers=ANTHROPIC_HEADERS, timeout=10.0
    )
    assert answer.status_code == 400, answer.text[:200]
    assert answer.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "The request body is not valid JSON.",
        },
    }


GEMINI_START = {
    "X-Goog-Upload-Protocol": "resumable",
    "X-Goog-Upload-Command": "start",
    "X-Goog-Upload-Header-Content-Length": "100",
    "X-Goog-Upload-Header-Content-Type": "application/jsonl",
}


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_abandoned_gemini_upload_sessions_do_not_pile_up_open_files(serve_engine) -> None:
    """Starting resumable uploads and never finishing them keeps at most MAX_UPLOAD_SESSIONS
    temporary files open, so a careless client cannot exhaust the server's descriptors."""
    from batchspec.engine import gemini_routes

    cap = getattr(gemini_routes, "MAX_UPLOAD_SESSIONS", 64)  # (absent before the cap existed)
    server = serve_engine()
    with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
        client.get("/v1/batches")  # warm the connection up
        before = _open_fds()
        for _ in range(cap + 200):
            started = client.post(
                "/upload/v1beta/files", json={"file": {"displayName": "x"}}, headers=GEMINI_START
            )
            assert started.status_code == 200, started.text
    assert _open_fds() - before <= cap + 8


def test_a_gemini_upload_chunk_with_a_bad_offset_is_a_400(serve_engine) -> None:
    """A chunk whose X-Goog-Upload-Offset is not a number is 400 in Gemini's envelope, not a
    plain-text 500."""
    server = serve_engine()
    with httpx.Client(timeout=10.0) as client:
        started = client.post(
            server.base_url + "/upload/v1beta/files",
            json={"file": {"displayName": "x"}},
            headers=GEMINI_START,
        )
        url = started.headers["x-goog-upload-url"]
        answer = client.post(
            url,
            content=b"x",
            headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "abc"},
        )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == 400
