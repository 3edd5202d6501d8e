"""OpenAIProvider against our real engine server (``batchspec serve``) over loopback HTTP."""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from probes import ProbedServer
from servers import EngineServer, jsonl_bytes, read_jsonl, request_lines, wait_for

from batchspec.engine import BuiltinUpstream, Faults, FaultyUpstream
from batchspec.errors import ProviderError
from batchspec.providers._http import tls_verify_for
from batchspec.providers.base import Provider, RemoteBatch, RemoteNotFound
from batchspec.providers.openai import OpenAIProvider
from batchspec.providers.registry import build_provider
from batchspec.workspace.project import ProviderConfig

CHAT = "/v1/chat/completions"
SENTINEL_KEY = "sk-SENTINEL-openai-provider-0123456789abcdef"

ServeEngine = Callable[..., EngineServer]


def provider_for(server: EngineServer, **kwargs: object) -> OpenAIProvider:
    options: dict[str, object] = {"api_key": server.api_key, "timeout": 10.0, **kwargs}
    return OpenAIProvider("served", base_url=server.v1, **options)  # type: ignore[arg-type]


def write_input(tmp_path: Path, count: int, name: str = "input.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(jsonl_bytes(request_lines(count)))
    return path


def wait_terminal(provider: OpenAIProvider, batch_id: str) -> RemoteBatch:
    def terminal() -> RemoteBatch | None:
        batch = provider.get_batch(batch_id)
        return batch if batch.is_terminal else None

    return wait_for(terminal)


def create(provider: OpenAIProvider, file_id: str, **metadata: str) -> RemoteBatch:
    return provider.create_batch(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata=metadata
    )


def test_upload_progress_hears_growing_byte_counts_ending_at_the_file_size(
    serve_engine: ServeEngine, tmp_path: Path
) -> None:
    """A multi-MB upload over loopback reports its bytes sent, increasing, ending at the size."""
    source = tmp_path / "big.jsonl"
    source.write_bytes(jsonl_bytes(request_lines(30_000)))
    size = source.stat().st_size
    assert size > 4_000_000
    seen: list[int] = []
    with provider_for(serve_engine()) as provider:
        uploaded = provider.upload_file(source, filename="big.jsonl", progress=seen.append)
    assert uploaded.bytes == size
    assert len(seen) >= 4 and seen[-1] == size
    assert seen == sorted(set(seen))
    assert all(b - a <= 1024 * 1024 + 65_536 for a, b in itertools.pairwise(seen))


def test_a_failed_upload_names_the_file_as_it_is_uploaded(
    server: Callable[..., ProbedServer], tmp_path: Path
) -> None:
    """An upload's retries and failure name the file as apply says it uploads it
    (``triage-s2-a1.jsonl``), not the staged shard's content-addressed name on disk (64 hex
    digits the user never saw, beside `uploading triage-s2-a1.jsonl`)."""
    srv = server()
    srv.probe.refuse(r"^POST /v1/files$", 429, {"error": {"message": "slow down"}})
    staged = write_input(tmp_path, 1, name=f"{'ab' * 32}.jsonl")
    provider = OpenAIProvider("served", base_url=srv.v1, api_key=SENTINEL_KEY, max_retries=0)
    with provider, pytest.raises(ProviderError) as raised:
        provider.upload_file(staged, filename="triage-s2-a1.jsonl")
    assert "upload of triage-s2-a1.jsonl failed with HTTP 429" in str(raised.value)
    assert "abab" not in str(raised.value)


def test_provider_satisfies_the_protocol(serve_engine: ServeEngine) -> None:
    """OpenAIProvider is a providers.base.Provider."""
    with provider_for(serve_engine()) as provider:
        assert isinstance(provider, Provider)


def test_upload_create_poll_download_output_and_errors(
    serve_engine: ServeEngine, tmp_path: Path
) -> None:
    """Full cycle: lines failing upstream land in the error file, the rest in the output."""
    upstream = FaultyUpstream(BuiltinUpstream(), Faults(error_500=0.3, sticky=True, seed=11))
    server = serve_engine(upstream=upstream, max_attempts=1, api_key="sk-served-key")
    lines = request_lines(20)
    failing = {line["custom_id"] for line in lines if upstream.draw(line["custom_id"], 0) < 0.3}
    assert 0 < len(failing) < 20
    source = tmp_path / "input.jsonl"
    source.write_bytes(jsonl_bytes(lines))

    with provider_for(server) as provider:
        uploaded = provider.upload_file(source, filename="triage-shard-0.jsonl")
        assert (uploaded.bytes, uploaded.filename) == (
            source.stat().st_size,
            "triage-shard-0.jsonl",
        )
        assert uploaded.purpose == "batch"
        created = create(provider, uploaded.id, batchspec_resource="triage")
        assert created.status == "validating"
        assert created.metadata == {"batchspec_resource": "triage"}
        assert created.input_file_id == uploaded.id

        done = wait_terminal(provider, created.id)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert done.request_counts.failed == len(failing)
        assert done.request_counts.completed == 20 - len(failing)
        assert done.output_file_id and done.error_file_id

        out_path, err_path = tmp_path / "got" / "out.jsonl", tmp_path / "got" / "err.jsonl"
        assert provider.download_file(done.output_file_id, out_path) == out_path.stat().st_size
        assert provider.download_file(done.error_file_id, err_path) == err_path.stat().st_size
    output, errors = read_jsonl(out_path.read_text()), read_jsonl(err_path.read_text())
    assert {r["custom_id"] for r in errors} == failing
    assert {r["custom_id"] for r in output} == {line["custom_id"] for line in lines} - failing
    assert all(r["response"]["status_code"] == 200 for r in output)
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["err.jsonl", "out.jsonl"]


def test_file_can_be_got_again_and_names_end_in_jsonl(
    serve_engine: ServeEngine, tmp_path: Path
) -> None:
    """get_file returns what upload_file recorded; a name without .jsonl gets the suffix."""
    source = write_input(tmp_path, 3)
    with provider_for(serve_engine()) as provider:
        uploaded = provider.upload_file(source, filename="shard-7")
        again = provider.get_file(uploaded.id)
    assert again == uploaded
    assert again.filename == "shard-7.jsonl"
    assert again.bytes == source.stat().st_size


def test_list_batches_pages_lazily_newest_first(serve_engine: ServeEngine, tmp_path: Path) -> None:
    """list_batches follows after=last_id across pages, fetching a page only when needed."""
    server = serve_engine()
    list_calls: list[httpx.URL] = []

    def count_lists(request: httpx.Request) -> None:
        if request.method == "GET" and request.url.path.endswith("/batches"):
            list_calls.append(request.url)

    client = httpx.Client(timeout=10.0, event_hooks={"request": [count_lists]})
    with provider_for(server, client=client) as provider:
        file_id = provider.upload_file(write_input(tmp_path, 1), filename="in.jsonl").id
        created = [create(provider, file_id, n=str(i)).id for i in range(5)]

        first_two = list(itertools.islice(provider.list_batches(page_size=2), 2))
        assert [b.id for b in first_two] == created[::-1][:2]
        assert len(list_calls) == 1

        list_calls.clear()
        assert [b.id for b in provider.list_batches(page_size=2)] == created[::-1]
        assert len(list_calls) == 3
        assert [u.params.get("after") for u in list_calls] == [None, created[3], created[1]]

        list_calls.clear()  # from a cursor: the batches listed after it, paging on from there
        assert [b.id for b in provider.list_batches(page_size=2, after=created[4])] == created[
            3::-1
        ]
        assert [u.params.get("after") for u in list_calls] == [created[4], created[2]]
        with pytest.raises(ProviderError):  # a cursor serve does not know: 400
            next(iter(provider.list_batches(after="batch_unknown")))
    client.close()


def test_cancel_keeps_finished_results(serve_engine: ServeEngine, tmp_path: Path) -> None:
    """cancel_batch moves a running batch to cancelled; finished lines stay in the output."""
    server = serve_engine(upstream=BuiltinUpstream(latency=0.05), concurrency=2)
    with provider_for(server) as provider:
        file_id = provider.upload_file(write_input(tmp_path, 40), filename="in.jsonl").id
        batch = create(provider, file_id)
        wait_for(lambda: completed_count(provider, batch.id) >= 2)

        cancelling = provider.cancel_batch(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done = wait_terminal(provider, batch.id)
        assert done.status == "cancelled"
        assert done.output_file_id and done.error_file_id
        provider.download_file(done.error_file_id, tmp_path / "errors.jsonl")
    codes = {r["error"]["code"] for r in read_jsonl((tmp_path / "errors.jsonl").read_text())}
    assert codes == {"batch_cancelled"}


def completed_count(provider: OpenAIProvider, batch_id: str) -> int:
    counts = provider.get_batch(batch_id).request_counts
    return counts.completed if counts else 0


@pytest.mark.parametrize(
    "object_id",
    [
        pytest.param("batch_does_not_exist", id="plain"),
        pytest.param("bGl0ZWxsbTpiYXRjaF8x/+x==" * 8, id="long-base64-with-slash"),
    ],
)
def test_unknown_ids_are_remote_not_found(
    serve_engine: ServeEngine, object_id: str, tmp_path: Path
) -> None:
    """get_batch, get_file, cancel_batch and download_file raise RemoteNotFound for unknown ids."""
    with provider_for(serve_engine()) as provider:
        for call in (
            lambda: provider.get_batch(object_id),
            lambda: provider.get_file(object_id),
            lambda: provider.cancel_batch(object_id),
            lambda: provider.download_file(object_id, tmp_path / "x.jsonl"),
        ):
            with pytest.raises(RemoteNotFound) as caught:
                call()
            assert caught.value.status == 404
            assert caught.value.retryable is False
    assert not (tmp_path / "x.jsonl").exists()


def test_wrong_key_is_401_naming_the_variable_not_the_value(
    serve_engine: ServeEngine, tmp_path: Path
) -> None:
    """With a wrong key the error names the key's variable, never its value; the right key works."""
    server = serve_engine(api_key="sk-the-right-key-for-this-server")
    config = ProviderConfig(
        name="served", type="openai", base_url=server.v1, api_key_env="SERVED_KEY", options={}
    )
    wrong = build_provider(config, project_root=tmp_path, env={"SERVED_KEY": SENTINEL_KEY})
    with pytest.raises(ProviderError) as caught:
        wrong.upload_file(write_input(tmp_path, 2), filename="in.jsonl")
    wrong.close()
    error = caught.value
    assert error.status == 401
    assert error.request_id  # the server's x-request-id travels with the error
    assert "$SERVED_KEY" in str(error)
    for text in (str(error), repr(error), repr(wrong)):
        assert SENTINEL_KEY not in text

    right_env = {"SERVED_KEY": "sk-the-right-key-for-this-server"}
    right = build_provider(config, project_root=tmp_path, env=right_env)
    try:
        assert right.upload_file(write_input(tmp_path, 2), filename="in.jsonl").id
    finally:
        right.close()


def test_create_with_an_unknown_input_file_is_a_clear_error(serve_engine: ServeEngine) -> None:
    """The server's own message for a bad create comes through, without retries."""
    sleeps: list[float] = []
    provider = provider_for(serve_engine(), sleep=sleeps.append)
    with provider, pytest.raises(ProviderError) as caught:
        create(provider, "file-nope")
    assert sleeps == []
    assert caught.value.status in (400, 404)
    assert "file-nope" in str(caught.value)


def test_unreachable_server_is_reported_with_its_url(tmp_path: Path) -> None:
    """A closed port is retried, then reported as unreachable with the base URL."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps: list[float] = []
    provider = OpenAIProvider(
        "gone",
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key=SENTINEL_KEY,
        max_retries=2,
        sleep=sleeps.append,
        timeout=2.0,
    )
    with pytest.raises(ProviderError) as caught:
        provider.get_batch("batch_1")
    assert f"127.0.0.1:{port}/v1" in str(caught.value)
    assert "could not connect" in str(caught.value)
    assert SENTINEL_KEY not in str(caught.value)
    assert len(sleeps) == 2


def test_downloaded_bytes_match_the_servers_content(
    serve_engine: ServeEngine, tmp_path: Path
) -> None:
    """download_file writes exactly the bytes the server serves for a file."""
    server = serve_engine()
    source = write_input(tmp_path, 5)
    with provider_for(server) as provider:
        file_id = provider.upload_file(source, filename="in.jsonl").id
        assert provider.download_file(file_id, tmp_path / "copy.jsonl") == source.stat().st_size
    assert (tmp_path / "copy.jsonl").read_bytes() == source.read_bytes()


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_a_plain_http_root_loads_no_trust_store_and_would_refuse_tls(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    """An http:// base URL with no proxy gets a TLS context with no root to trust (so no
    ~25 ms certifi load) that still requires a verified certificate and hostname: were TLS
    ever spoken, it would refuse the peer, never accept it unverified."""
    verify = tls_verify_for("http://127.0.0.1:8000/v1")

    assert isinstance(verify, ssl.SSLContext)
    assert verify.get_ca_certs() == []
    assert verify.verify_mode == ssl.CERT_REQUIRED and verify.check_hostname


@pytest.mark.parametrize(
    ("base_url", "proxy"),
    [
        pytest.param("https://api.openai.com/v1", None, id="https-root"),
        pytest.param("HTTPS://api.openai.com/v1", None, id="https-root-in-capitals"),
        pytest.param("http://127.0.0.1:8000/v1", "https://proxy.example:3128", id="behind-a-proxy"),
    ],
)
def test_https_roots_and_proxied_ones_keep_httpx_verification(
    no_proxy_env: pytest.MonkeyPatch, base_url: str, proxy: str | None
) -> None:
    """An https:// root, or any root reached through a proxy from the environment, is
    verified against httpx's default trust store."""
    if proxy is not None:
        no_proxy_env.setenv("HTTPS_PROXY", proxy)
        no_proxy_env.setenv("HTTP_PROXY", proxy)

    assert tls_verify_for(base_url) is True


def test_a_provider_on_a_plain_http_root_still_talks_to_the_server(
    serve_engine: ServeEngine, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """The client built without a trust store for an http:// root works over loopback."""
    server = serve_engine(api_key=SENTINEL_KEY)
    with provider_for(server) as provider:
        assert list(provider.list_batches()) == []
