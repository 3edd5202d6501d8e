"""Upstreams: the builtin stand-in's answers, fault injection, and the HTTP client over loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from batchspec.engine import BuiltinUpstream, Faults, FaultyUpstream, HttpUpstream, make_upstream
from batchspec.engine.http11 import Http11Pool, proxy_for
from batchspec.engine.server import start_in_thread
from batchspec.engine.upstreams import UpstreamNotConnected, UpstreamUnreachable, answer
from batchspec.errors import BatchspecError, UsageError


def test_chat_answer_is_openai_shaped_deterministic_and_marked_as_stand_in():
    """Chat answers have id/object/created/model/choices/usage and depend only on the body."""
    body = {"model": "m", "messages": [{"role": "user", "content": "one two three four"}]}
    first, second = answer("/v1/chat/completions", body), answer("/v1/chat/completions", body)
    assert first.status_code == 200
    assert first.body["id"] == second.body["id"]
    assert first.body["choices"] == second.body["choices"]
    assert first.body["object"] == "chat.completion" and first.body["model"] == "m"
    message = first.body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"].startswith("[builtin stand-in]")
    assert "one two three four" in message["content"]
    usage = first.body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_chat_honours_max_tokens_with_finish_reason_length():
    """A tight max_tokens truncates the reply and reports finish_reason 'length'."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    choice = answer("/v1/chat/completions", body).body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"]) <= 8


@pytest.mark.parametrize("dimensions", [16, 5])
def test_embeddings_are_deterministic_unit_vectors(dimensions):
    """Each input gets a unit vector of the asked dimensions, the same for the same text."""
    body = {"model": "e", "input": ["alpha", "beta", "alpha"], "dimensions": dimensions}
    if dimensions == 16:
        del body["dimensions"]  # the default
    data = answer("/v1/embeddings", body).body["data"]
    vectors = [item["embedding"] for item in data]
    assert [item["index"] for item in data] == [0, 1, 2]
    assert all(len(v) == dimensions for v in vectors)
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-6) for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]


def test_responses_moderations_and_completions_shapes():
    """Responses, moderations and completions answer in their OpenAI shapes."""
    response = answer("/v1/responses", {"model": "m", "input": "hello there"}).body
    assert response["object"] == "response" and response["status"] == "completed"
    assert response["output"][0]["content"][0]["type"] == "output_text"
    assert response["usage"]["input_tokens"] > 0
    moderation = answer("/v1/moderations", {"input": ["a", "b"]}).body
    assert [r["flagged"] for r in moderation["results"]] == [False, False]
    completion = answer("/v1/completions", {"model": "m", "prompt": "Once"}).body
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"]


@pytest.mark.parametrize(
    ("url", "body", "status"),
    [
        pytest.param("/v1/chat/completions", {"messages": []}, 400, id="no-model"),
        pytest.param("/v1/chat/completions", {"model": "m"}, 400, id="no-messages"),
        pytest.param("/v1/images/generations", {"model": "m"}, 404, id="unknown-url"),
        pytest.param("/v1/embeddings", ["not", "an", "object"], 400, id="not-an-object"),
        pytest.param(
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            400,
            id="temperature-out-of-range",
        ),
        pytest.param(
            "/v1/chat/completions",
            {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
            404,
            id="a-model-it-does-not-serve",
        ),
        pytest.param(
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "usr", "content": "x"}]},
            400,
            id="a-role-openai-does-not-know",
        ),
        pytest.param(
            "/v1/chat/completions", {"model": "m", "messages": ["x"]}, 400, id="a-bare-message"
        ),
        pytest.param(
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
            400,
            id="a-negative-max-tokens",
        ),
        pytest.param(
            "/v1/responses", {"model": "m", "input": "x", "max_output_tokens": 0}, 400, id="zero"
        ),
    ],
)
def test_stand_in_refuses_what_openai_refuses(url, body, status):
    """Bad bodies get OpenAI's error envelope with a 4xx status."""
    result = answer(url, body)
    assert result.status_code == status
    assert set(result.body["error"]) == {"message", "type", "param", "code"}


def test_faults_are_reproducible_and_near_their_fractions():
    """Fault draws depend only on seed, custom_id and attempt; fractions hold on average."""
    faults = Faults(error_500=0.2, error_429=0.1, seed=11)
    a, b = FaultyUpstream(BuiltinUpstream(), faults), FaultyUpstream(BuiltinUpstream(), faults)
    draws = [a.draw(f"id-{i}", 0) for i in range(2000)]
    assert draws == [b.draw(f"id-{i}", 0) for i in range(2000)]
    assert 0.17 < sum(d < 0.2 for d in draws) / 2000 < 0.23
    assert a.draw("x", 0) != a.draw("x", 1)
    sticky = FaultyUpstream(BuiltinUpstream(), Faults(sticky=True))
    assert sticky.draw("x", 0) == sticky.draw("x", 5)


def test_fault_kinds_answer_500_429_with_retry_after_and_hang():
    """Each fault kind produces its answer: 500, 429 with retry_after, or no answer at all."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    async def send(faults: Faults, attempt: int = 0):
        upstream = FaultyUpstream(BuiltinUpstream(), faults)
        return await asyncio.wait_for(
            upstream.send("/v1/chat/completions", chat, custom_id="c", attempt=attempt), 0.2
        )

    assert asyncio.run(send(Faults(error_500=1.0))).status_code == 500
    limited = asyncio.run(send(Faults(error_429=1.0, retry_after=1.5)))
    assert (limited.status_code, limited.retry_after) == (429, 1.5)
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(send(Faults(timeout=1.0)))
    assert asyncio.run(send(Faults(fail_first=2), attempt=1)).status_code == 500
    assert asyncio.run(send(Faults(fail_first=2), attempt=2)).status_code == 200


@pytest.mark.parametrize(
    ("base", "url", "target"),
    [
        pytest.param("http://h:1/v1", "/v1/chat/completions", "/v1/chat/completions", id="v1"),
        pytest.param("http://h:1", "/v1/embeddings", "/v1/embeddings", id="bare"),
        pytest.param("http://h:1/proxy/v1/", "/v1/responses", "/proxy/v1/responses", id="prefix"),
    ],
)
def test_http_upstream_maps_line_urls_onto_the_base_url(base, url, target):
    """A base URL ending in /v1 takes /v1/x as /x; others get the full /v1/x appended."""
    assert HttpUpstream(base).target(url) == target


def test_http_upstream_description_hides_credentials():
    """user:password in the upstream URL never shows in its description."""
    upstream = HttpUpstream("http://user:secret@127.0.0.1:8000/v1")
    assert "secret" not in upstream.description
    assert upstream.description == "http://127.0.0.1:8000/v1"


def test_make_upstream_needs_its_key_variable(monkeypatch):
    """An upstream key variable that is unset fails clearly; bad specs are usage errors."""
    monkeypatch.delenv("BATCHSPEC_TEST_UPSTREAM_KEY", raising=False)
    with pytest.raises(BatchspecError, match="BATCHSPEC_TEST_UPSTREAM_KEY"):
        make_upstream("http://127.0.0.1:1/v1", api_key_env="BATCHSPEC_TEST_UPSTREAM_KEY")
    with pytest.raises(UsageError):
        make_upstream("ftp://example")
    assert isinstance(make_upstream("builtin"), BuiltinUpstream)


def _echo_app() -> Starlette:
    async def chat(request):
        seen = {
            "auth": request.headers.get("authorization"),
            "body": json.loads(await request.body()),
        }
        if request.query_params.get("chunked") or seen["body"].get("chunked"):

            async def pieces():
                text = json.dumps(seen)
                for i in range(0, len(text), 7):
                    yield text[i : i + 7].encode()

            return StreamingResponse(pieces(), media_type="application/json")
        return JSONResponse(seen, headers={"x-request-id": "req_echo", "retry-after": "2"})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_http_upstream_round_trip_with_key_chunked_bodies_and_keep_alive():
    """Requests carry the bearer key; plain and chunked answers parse; connections are reused."""
    server = start_in_thread(_echo_app())
    try:

        async def run():
            upstream = HttpUpstream(
                f"{server.base_url}/v1", api_key="sk-upstream", max_connections=2
            )
            try:
                plain = await upstream.send(
                    "/v1/chat/completions", {"n": 1}, custom_id="a", attempt=0
                )
                chunked = await upstream.send(
                    "/v1/chat/completions", {"chunked": True}, custom_id="b", attempt=0
                )
                many = await asyncio.gather(
                    *(
                        upstream.send("/v1/chat/completions", {"n": i}, custom_id=str(i), attempt=0)
                        for i in range(20)
                    )
                )
                return plain, chunked, many, len(upstream._pool._idle)
            finally:
                await upstream.aclose()

        plain, chunked, many, idle = asyncio.run(run())
    finally:
        server.stop()
    # the key was sent (and, echoed back, is redacted from the answer the engine records)
    assert plain.status_code == 200 and plain.body["auth"] == "Bearer [redacted]"
    assert (plain.request_id, plain.retry_after) == ("req_echo", 2.0)
    assert chunked.body["body"] == {"chunked": True}
    assert [r.body["body"]["n"] for r in many] == list(range(20))
    assert idle <= 2


def chat_answers(handler: Any, key: str, *bodies: dict[str, Any]) -> list[Any]:
    """What an HttpUpstream sending API key ``key`` gets for each of ``bodies`` from a
    loopback server whose /v1/chat/completions is ``handler``."""
    server = start_in_thread(
        Starlette(routes=[Route("/v1/chat/completions", handler, methods=["POST"])])
    )

    async def run() -> list[Any]:
        upstream = HttpUpstream(f"{server.base_url}/v1", api_key=key)
        try:
            return [
                await upstream.send("/v1/chat/completions", body, custom_id="a", attempt=0)
                for body in bodies
            ]
        finally:
            await upstream.aclose()

    try:
        return asyncio.run(run())
    finally:
        server.stop()


def test_an_upstream_quoting_its_key_in_an_answer_gets_it_redacted():
    """An upstream (a careless proxy) whose 401 quotes the Authorization header, as JSON or
    as text: the key is not in the answer the engine records as the line's result, so not in
    the batch's error file that clients download into results/ and the state store."""
    key = "PLAIN-upstream-key-0a1b2c3d4e5f"

    async def refuse(request):
        said = f"invalid credentials: {request.headers.get('authorization')}"
        if (await request.json()).get("text"):
            return PlainTextResponse(said, status_code=401)
        return JSONResponse({"error": {"message": said, "code": "invalid_api_key"}}, 401)

    as_json, as_text = chat_answers(refuse, key, {}, {"text": True})
    assert as_json.status_code == as_text.status_code == 401
    assert as_json.body["error"]["message"] == "invalid credentials: Bearer [redacted]"
    assert as_text.body == "invalid credentials: Bearer [redacted]"


def test_an_upstream_quoting_its_key_in_a_header_or_escaped_gets_it_redacted():
    """An upstream that quotes the Authorization header in its request id, or in a message
    that holds the request's headers as JSON inside JSON (a key with a quote or backslash is
    escaped twice there): the key is in neither the request id nor the body the engine
    records as the line's result (its error file, results/, the state store)."""
    key = 'SENTINEL0"quote\\back/0123456789'

    async def refuse(request):
        auth = request.headers.get("authorization")
        said = json.dumps({"headers": json.dumps({"Authorization": auth})})
        body = {"error": {"message": said, "code": "invalid_api_key"}}
        return JSONResponse(body, 401, headers={"x-request-id": f"req {auth}"})

    [got] = chat_answers(refuse, key, {})
    assert got.status_code == 401
    assert got.request_id == "req Bearer [redacted]"
    assert "SENTINEL0" not in json.dumps(got.body), got.body


def test_a_placeholder_key_is_not_redacted_out_of_answers():
    """A gateway's placeholder key ("x", vLLM's "EMPTY") is no secret: the answers that
    contain it are recorded as they came, not with every "x" turned into "[redacted]"."""

    async def answer(request):
        said = f"text: {request.headers.get('authorization')}; max x-ray"
        return JSONResponse({"choices": [{"message": {"content": said}}], "index": 0})

    [got] = chat_answers(answer, "x", {})
    assert got.body == {
        "choices": [{"message": {"content": "text: Bearer x; max x-ray"}}],
        "index": 0,
    }


def test_http_pool_retries_a_stale_keep_alive_connection_once():
    """When the server silently closed an idle connection, the request goes out once, fresh."""
    received: list[bytes] = []

    async def one_request_per_connection(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        received.append(await reader.readexactly(length))
        body = b'{"ok": true}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()  # no "Connection: close": the client believes it may reuse it

    async def run():
        server = await asyncio.start_server(one_request_per_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = HttpUpstream(f"http://127.0.0.1:{port}/v1", max_connections=1)
        try:
            first = await upstream.send("/v1/chat/completions", {"n": 1}, custom_id="a", attempt=0)
            await asyncio.sleep(0.05)  # let the close reach the client
            second = await upstream.send("/v1/chat/completions", {"n": 2}, custom_id="b", attempt=0)
        finally:
            await upstream.aclose()
            server.close()
        return first, second

    first, second = asyncio.run(run())
    assert first.body == second.body == {"ok": True}
    assert [json.loads(b)["n"] for b in received] == [1, 2]


def test_http_pool_gets_past_several_stale_keep_alive_connections():
    """Three idle connections the server closed (it restarted) do not fail the next request."""
    received: list[bytes] = []

    async def one_request_per_connection(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        received.append(await reader.readexactly(length))
        await asyncio.sleep(0.05)  # keep the three first requests on three connections
        body = b'{"ok": true}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()  # no "Connection: close": the client believes it may reuse it

    async def run():
        server = await asyncio.start_server(one_request_per_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = HttpUpstream(f"http://127.0.0.1:{port}/v1", max_connections=3)
        try:
            first = await asyncio.gather(
                *(
                    upstream.send("/v1/chat/completions", {"n": n}, custom_id=str(n), attempt=0)
                    for n in range(3)
                )
            )
            await asyncio.sleep(0.05)  # let the closes reach the client
            last = await upstream.send("/v1/chat/completions", {"n": 3}, custom_id="3", attempt=0)
        finally:
            await upstream.aclose()
            server.close()
        return first, last

    first, last = asyncio.run(run())
    assert [r.body for r in first] == [{"ok": True}] * 3
    assert last.body == {"ok": True}
    assert sorted(json.loads(b)["n"] for b in received) == [0, 1, 2, 3]


class ForwardProxy:
    """A loopback HTTP forward proxy: absolute-form requests in, origin-form requests out."""

    def __init__(self, *, refuse_connect: bool = False) -> None:
        self.seen: list[tuple[str, str | None]] = []  # (request target, Proxy-Authorization)
        self.refuse_connect = refuse_connect

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
                method, target, version = request_line.split(" ")
                headers = dict(line.split(": ", 1) for line in header_lines)
                lowered = {k.lower(): v for k, v in headers.items()}
                body = await reader.readexactly(int(lowered.get("content-length", "0")))
                self.seen.append((target, lowered.get("proxy-authorization")))
                if method == "CONNECT":
                    await self.tunnel(target, reader, writer)
                    return
                origin = urlsplit(target)
                assert origin.scheme == "http", target  # absolute form, or this is no proxy
                up_reader, up_writer = await asyncio.open_connection(origin.hostname, origin.port)
                kept = "".join(
                    f"{k}: {v}\r\n"
                    for k, v in headers.items()
                    if k.lower() not in ("proxy-authorization", "connection")
                )
                path = origin.path + (f"?{origin.query}" if origin.query else "")
                up_writer.write(
                    f"{method} {path} {version}\r\n{kept}Connection: close\r\n\r\n".encode() + body
                )
                answer = await up_reader.read()  # the origin closes after one answer
                up_writer.close()
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.split(b"\r\n\r\n")[0].lower():
                    return
        finally:
            writer.close()

    async def tunnel(
        self, authority: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.refuse_connect:
            writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            return
        host, port = authority.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def _through_proxy(upstream_url: str) -> tuple[object, ForwardProxy]:
    proxy = ForwardProxy()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    os.environ["HTTP_PROXY"] = f"http://user:pa%3Ass@127.0.0.1:{port}"
    try:
        upstream = HttpUpstream(upstream_url)
        try:
            answers = [
                await upstream.send("/v1/chat/completions", {"n": i}, custom_id=str(i), attempt=0)
                for i in range(3)
            ]
        finally:
            await upstream.aclose()
    finally:
        server.close()
    return answers, proxy


def test_http_upstream_goes_through_http_proxy_with_its_credentials(monkeypatch):
    """HTTP_PROXY carries every request, in absolute form, with Proxy-Authorization."""
    server = start_in_thread(_echo_app())
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HTTP_PROXY", "")  # restored by monkeypatch after the test
    try:
        answers, proxy = asyncio.run(_through_proxy(f"{server.base_url}/v1"))
    finally:
        server.stop()
    assert [a.body["body"]["n"] for a in answers] == [0, 1, 2]
    expected_auth = "Basic " + base64.b64encode(b"user:pa:ss").decode()
    assert proxy.seen == [(f"{server.base_url}/v1/chat/completions", expected_auth)] * 3
    assert all(a.body["auth"] is None for a in answers)  # the proxy's key stays with the proxy


def test_a_proxy_quoting_its_credentials_in_a_407_has_them_redacted(monkeypatch):
    """A proxy from HTTP_PROXY (user:password) that refuses with a 407 quoting the request's
    Proxy-Authorization and its own URL: neither the password nor the Basic token is in the
    answer the engine records as the line's result (its error file, results/, the store)."""
    token = base64.b64encode(b"alice:PROXYSENTINEL0pw").decode()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        said = json.dumps({"error": {"message": f"407: {head}", "code": "proxy_auth"}}).encode()
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
        writer.write(b"content-type: application/json\r\nx-request-id: " + token.encode())
        writer.write(b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(said))
        writer.write(said)
        await writer.drain()
        writer.close()

    async def run():
        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        monkeypatch.setenv("HTTP_PROXY", f"http://alice:PROXYSENTINEL0pw@127.0.0.1:{port}")
        try:
            upstream = HttpUpstream("http://api.example.test/v1", api_key="SENTINEL-upstream-k")
            try:
                return await upstream.send("/v1/chat/completions", {}, custom_id="a", attempt=0)
            finally:
                await upstream.aclose()
        finally:
            server.close()

    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    got = asyncio.run(run())
    assert got.status_code == 407
    recorded = json.dumps(got.body) + str(got.request_id)
    assert "Proxy-Authorization: Basic [redacted]" in recorded
    assert token not in recorded and "PROXYSENTINEL" not in recorded


def test_a_proxy_quoting_its_credentials_in_a_refused_connect_has_them_redacted(monkeypatch):
    """A proxy from HTTPS_PROXY that refuses a CONNECT with a status line quoting the
    request's Proxy-Authorization: the error the engine records for the line (its error
    file, results/) leaves the Basic token out."""
    token = base64.b64encode(b"alice:PROXYSENTINEL0pw").decode()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        said = head.split("Proxy-Authorization: ", 1)[1].split("\r\n", 1)[0]
        writer.write(f"HTTP/1.1 407 bad {said}\r\ncontent-length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    async def run() -> str:
        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        monkeypatch.setenv("HTTPS_PROXY", f"http://alice:PROXYSENTINEL0pw@127.0.0.1:{port}")
        try:
            upstream = HttpUpstream("https://api.example.test/v1", api_key="SENTINEL-upstream-k")
            try:
                await upstream.send("/v1/chat/completions", {}, custom_id="a", attempt=0)
            except UpstreamUnreachable as err:
                return str(err)
            finally:
                await upstream.aclose()
        finally:
            server.close()
        raise AssertionError("the CONNECT was not refused")

    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    said = asyncio.run(run())
    assert "407 bad Basic [redacted]" in said
    assert token not in said


@pytest.mark.parametrize(
    "no_proxy", [pytest.param("127.0.0.1", id="host"), pytest.param("*", id="star")]
)
def test_no_proxy_sends_requests_directly(monkeypatch, no_proxy):
    """A host NO_PROXY names is reached directly: the proxy sees nothing."""
    server = start_in_thread(_echo_app())
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("HTTP_PROXY", "")
    try:
        answers, proxy = asyncio.run(_through_proxy(f"{server.base_url}/v1"))
    finally:
        server.stop()
    assert [a.body["body"]["n"] for a in answers] == [0, 1, 2]
    assert proxy.seen == []


@pytest.mark.parametrize(
    ("url", "environ", "proxied"),
    [
        pytest.param("http://gpu1:8000/v1", {"http_proxy": "http://p:3128"}, True, id="lower"),
        pytest.param("http://gpu1:8000/v1", {"HTTP_PROXY": "p:3128"}, True, id="no-scheme"),
        pytest.param("https://api.x/v1", {"HTTPS_PROXY": "http://p:3128"}, True, id="https"),
        pytest.param("https://api.x/v1", {"HTTP_PROXY": "http://p:3128"}, False, id="per-scheme"),
        pytest.param(
            "http://gpu1.lan:8000/v1",
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "lan"},
            False,
            id="suffix",
        ),
        pytest.param("http://gpu1:8000/v1", {}, False, id="unset"),
        pytest.param(
            "http://10.1.2.3:8000/v1",
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "localhost, 10.0.0.0/8"},
            False,
            id="network",
        ),
        pytest.param(
            "http://10.1.2.3:8000/v1",
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "192.168.0.0/16,fd00::/8"},
            True,
            id="other-network",
        ),
        pytest.param(
            "http://[fd00::5]:8000/v1",
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "fd00::/8"},
            False,
            id="ipv6-network",
        ),
        pytest.param(
            "http://[::1]:8000/v1",
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "[::1]"},
            False,
            id="ipv6-brackets",
        ),
        pytest.param(
            "http://[::1]:8000/v1",
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "[::1]:9000"},
            True,
            id="ipv6-other-port",
        ),
        pytest.param(
            "http://gpu1/v1",
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "gpu1:80"},
            False,
            id="default-port",
        ),
        pytest.param(
            "http://gpu1.lan:8000/v1",
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": ".lan:8000"},
            False,
            id="suffix-port",
        ),
        pytest.param(
            "http://notlan:8000/v1",
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "lan"},
            True,
            id="not-a-suffix",
        ),
        # an address is no domain: ".0.0.1" did exempt 127.0.0.1 (curl does not)
        pytest.param(
            "http://127.0.0.1:8000/v1",
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": ".0.0.1"},
            True,
            id="address-not-a-domain",
        ),
        pytest.param(
            "http://10.1.2.3:8000/v1",
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "2.3"},
            True,
            id="address-not-a-domain-bare",
        ),
    ],
)
def test_proxy_for_reads_the_proxy_variables(url, environ, proxied):
    """HTTP_PROXY/HTTPS_PROXY (any case, scheme optional) per URL scheme; NO_PROXY wins with a
    host suffix, host:port (the scheme's port by default), an IPv6 address or a network."""
    proxy = proxy_for(url, environ)
    assert (proxy is not None) == proxied
    if proxy is not None:
        assert (proxy.host, proxy.port) == ("p", 3128)


@pytest.mark.parametrize(
    ("proxy", "said", "not_said"),
    [
        pytest.param("https://p:3128", "proxies reached over TLS", None, id="tls"),
        pytest.param("socks5://p:1080", "SOCKS proxies are not supported", "TLS", id="socks"),
    ],
)
def test_a_proxy_the_engine_cannot_use_is_refused_for_what_it_is(proxy, said, not_said):
    """A proxy reached over TLS, or a SOCKS one, is refused saying which: a socks5:// proxy
    (an SSH tunnel's) was told that "proxies reached over TLS are not supported"."""
    with pytest.raises(ValueError, match="must be an http:// URL") as raised:
        proxy_for("http://gpu1:8000/v1", {"HTTP_PROXY": proxy})
    assert said in str(raised.value)
    assert not_said is None or not_said not in str(raised.value)


async def _tls_origin(ca: trustme.CA) -> asyncio.base_events.Server:
    """A keep-alive HTTPS origin on 127.0.0.1 answering every POST with its body, echoed."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                answer = json.dumps({"echo": json.loads(body), "head": head.decode()}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(answer))
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)


def test_https_upstream_goes_through_a_connect_tunnel(monkeypatch):
    """HTTPS_PROXY: one CONNECT per connection with the proxy's credentials, TLS end to end."""
    ca = trustme.CA()
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def run():
        origin = await _tls_origin(ca)
        proxy = ForwardProxy()
        proxy_server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        proxy_port = proxy_server.sockets[0].getsockname()[1]
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:pw@127.0.0.1:{proxy_port}")
        origin_port = origin.sockets[0].getsockname()[1]
        pool = Http11Pool(
            f"https://127.0.0.1:{origin_port}", max_connections=1, ssl_context=client_context
        )
        try:
            answers = [await pool.post("/v1/chat/completions", b'{"n": %d}' % i) for i in range(3)]
        finally:
            await pool.aclose()
            proxy_server.close()
            origin.close()
        return answers, proxy, origin_port

    answers, proxy, origin_port = asyncio.run(run())
    assert [json.loads(a.body)["echo"]["n"] for a in answers] == [0, 1, 2]
    heads = [json.loads(a.body)["head"] for a in answers]
    assert all(h.startswith("POST /v1/chat/completions HTTP/1.1") for h in heads)
    assert not any("proxy-authorization" in h.lower() for h in heads)  # never to the origin
    expected_auth = "Basic " + base64.b64encode(b"user:pw").decode()
    assert proxy.seen == [(f"127.0.0.1:{origin_port}", expected_auth)]  # one tunnel, kept


def test_a_refused_connect_means_the_request_was_never_sent(monkeypatch):
    """A proxy refusing CONNECT is a connect failure: safe to send the request elsewhere."""
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def run():
        proxy = ForwardProxy(refuse_connect=True)
        proxy_server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        monkeypatch.setenv(
            "HTTPS_PROXY", f"http://127.0.0.1:{proxy_server.sockets[0].getsockname()[1]}"
        )
        upstream = HttpUpstream("https://api.example.invalid/v1")
        try:
            with pytest.raises(UpstreamNotConnected, match="403"):
                await upstream.send("/v1/chat/completions", {}, custom_id="a", attempt=0)
        finally:
            await upstream.aclose()
            proxy_server.close()
        return proxy

    proxy = asyncio.run(run())
    assert proxy.seen == [("api.example.invalid:443", None)]


def test_a_proxy_that_refuses_the_connection_says_how_to_go_round_it(monkeypatch):
    """HTTP_PROXY pointing at nothing (a proxy for the internet, set machine-wide, in front of
    a model server on the LAN): each line's error names the proxy and says to name the
    upstream's host in NO_PROXY, as the providers' errors do."""
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")

    async def run():
        upstream = HttpUpstream("http://gpu1.lan:8000/v1")
        try:
            await upstream.send("/v1/chat/completions", {}, custom_id="a", attempt=0)
        finally:
            await upstream.aclose()

    with pytest.raises(UpstreamNotConnected) as raised:
        asyncio.run(run())
    assert "the proxy from HTTP_PROXY" in str(raised.value)
    assert "NO_PROXY=gpu1.lan" in str(raised.value)
