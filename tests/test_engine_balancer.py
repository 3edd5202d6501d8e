"""A rotation of upstreams: spreading, failing over, probing back, rate limits, the CLI form."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from servers import (
    jsonl_bytes,
    read_jsonl,
    request_lines,
    start_recording_upstream,
    start_server,
    wait_for,
    wait_for_batch,
)

from batchspec.engine import (
    BalancedUpstream,
    BuiltinUpstream,
    Faults,
    FaultyUpstream,
    HttpUpstream,
    UpstreamTarget,
    make_upstreams,
)
from batchspec.engine.balancer import RateBucket, estimated_tokens, parse_target
from batchspec.engine.upstreams import make_upstream
from batchspec.errors import UsageError

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run_batch(server, lines: int, *, prefix: str = "req", timeout: float = 60.0):
    client = server.client()
    file_id = client.files.create(
        file=("in.jsonl", jsonl_bytes(request_lines(lines, prefix=prefix))), purpose="batch"
    ).id
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    return client, batch


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- construction -----------------------------------------------------------------------------


def test_one_upstream_without_limits_is_exactly_the_upstream_of_before():
    """A single URL (or builtin) without limits builds the plain upstream, no rotation."""
    assert type(make_upstreams(["http://127.0.0.1:1/v1"])) is HttpUpstream
    assert type(make_upstreams(["builtin"])) is BuiltinUpstream
    limited = make_upstreams(["http://127.0.0.1:1/v1#rpm=60"])
    assert isinstance(limited, BalancedUpstream)
    assert limited.description == "http://127.0.0.1:1/v1 (rpm 60)"


def test_a_rotation_announces_each_members_limits():
    """What `serve` prints on start shows the limits each upstream was given, so a limit
    mistyped in a shell (a lost '#' fragment) is seen at once."""
    rotation = make_upstreams(["http://u:secret@h:1/v1#tpm=90000,rpm=600", "builtin"])
    assert rotation.description == (
        "http://h:1/v1 (rpm 600, tpm 90,000) + builtin (offline stand-in, not a model)"
    )


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        pytest.param("http://h:1/v1", UpstreamTarget("http://h:1/v1"), id="plain"),
        pytest.param(
            "http://h:1/v1#rpm=600,tpm=90000",
            UpstreamTarget("http://h:1/v1", rpm=600, tpm=90000),
            id="both",
        ),
        pytest.param("builtin#tpm=5", UpstreamTarget("builtin", tpm=5), id="builtin"),
    ],
)
def test_cli_form_carries_limits_in_the_fragment(spec, target):
    """URL#rpm=N,tpm=N parses into the URL and its limits."""
    assert parse_target(spec) == target


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param("http://u:secret@h:1/v1#rpm=0", id="zero"),
        pytest.param("http://u:secret@h:1/v1#rpm=many", id="not-a-number"),
        pytest.param("http://u:secret@h:1/v1#qps=3", id="unknown-key"),
        pytest.param("http://u:secret@h:1/v1#rpm=5,rpm=6", id="given-twice"),
    ],
)
def test_bad_limits_are_usage_errors_that_hide_credentials(spec):
    """A bad limit is a usage error naming the upstream without its password."""
    with pytest.raises(UsageError) as raised:
        parse_target(spec)
    assert "secret" not in str(raised.value) and "h:1" in str(raised.value)


def test_a_limit_in_capitals_is_told_its_name():
    """#RPM=5 is not a limit: the message says which one was meant."""
    with pytest.raises(UsageError, match="unknown limit 'RPM' after '#' \\(did you mean 'rpm'"):
        parse_target("http://h:1/v1#RPM=5")


@pytest.mark.parametrize(
    "second",
    [
        pytest.param("http://127.0.0.1:1/v1", id="same"),
        pytest.param("http://127.0.0.1:1/v1/", id="trailing-slash"),
        pytest.param("HTTP://127.0.0.1:1/v1#rpm=60", id="scheme-case-and-limits"),
        pytest.param("http://user:secret@127.0.0.1:1/v1", id="credentials"),
    ],
)
def test_the_same_upstream_twice_is_refused(second):
    """Naming one server twice is a usage error (it would double its share and its limits),
    however the URL is spelt; its password is never shown."""
    with pytest.raises(UsageError, match="named twice") as raised:
        make_upstreams(["http://127.0.0.1:1/v1", second])
    assert "secret" not in str(raised.value)
    assert "name each server once" in str(raised.value)


def test_the_default_port_spelt_out_is_the_same_upstream():
    """http://gpu1/v1 and http://GPU1:80/v1 are one server: named twice."""
    with pytest.raises(UsageError, match="named twice"):
        make_upstreams(["http://gpu1/v1", "http://GPU1:80/v1"])


def test_two_paths_or_ports_of_one_host_are_two_upstreams():
    """Different ports (or paths) of one host are different upstreams: both kept."""
    upstream = make_upstreams(["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"])
    assert len(upstream.status()) == 2


# -- token buckets (pure, on a fake clock) ---------------------------------------------------


def test_rpm_bucket_allows_one_seconds_burst_then_the_rate():
    """rpm=120: two at once, then one every half second; never more in any window."""
    clock = FakeClock()
    bucket = RateBucket(120, clock=clock)
    starts = []
    while len(starts) < 10:
        wait = bucket.wait(1)
        clock.now += wait
        bucket.take(1)
        starts.append(clock.now)
    assert starts[:2] == [0.0, 0.0]
    assert starts[2:] == pytest.approx([0.5 * k for k in range(1, 9)])


def test_tpm_bucket_goes_into_debt_for_a_large_request_and_settles_with_usage():
    """A request costlier than a second's worth may start on a full bucket; debt is waited out."""
    clock = FakeClock()
    bucket = RateBucket(600, clock=clock)  # 10 tokens a second, holds 10
    assert bucket.wait(50) == 0.0  # more than the bucket holds: a full bucket lets it go
    bucket.take(50)
    assert bucket.wait(5) == pytest.approx(4.5)  # 40 in debt, then 5 more to gather
    bucket.give(50 - 20)  # the answer reported 20 tokens, not the 50 estimated
    assert bucket.wait(5) == pytest.approx(1.5)  # 10 in debt (10 held - 20 used), 5 more


def test_tpm_estimate_is_json_length_over_four_plus_the_output_cap():
    """The estimate before sending: body bytes / 4, plus max_tokens when given."""
    assert estimated_tokens({"max_tokens": 100}, 40) == 110
    assert estimated_tokens({"max_completion_tokens": 7}, 41) == 18
    assert estimated_tokens({}, 8) == 2


# -- the rotation, in-process ----------------------------------------------------------------


def test_a_refused_connection_fails_over_at_once_and_rests_the_member(caplog):
    """Nothing was sent to a refused upstream: the same attempt goes to the next one; the
    warning that rests it says why (it said only "failed (1 in a row)")."""
    dead = HttpUpstream(f"http://127.0.0.1:{_closed_port()}/v1")
    alive = BuiltinUpstream()
    rotation = BalancedUpstream([dead, alive], backoff_initial=60)

    async def run():
        answers = [await rotation.send(CHAT, BODY, custom_id=f"c{i}", attempt=0) for i in range(4)]
        await rotation.aclose()
        return answers

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200] * 4
    assert sum(alive.calls.values()) == 4
    dead_status, alive_status = rotation.status()
    assert (dead_status.failures, dead_status.in_rotation) == (1, False)  # tried once only
    assert alive_status.in_rotation
    [rested] = [r.getMessage() for r in caplog.records if "out of rotation" in r.getMessage()]
    assert re.search(
        r"failed \(cannot connect to 127\.0\.0\.1:\d+ \(Connection refused\); 1 in a row\)", rested
    ), rested


def test_a_5xx_is_returned_to_the_worker_not_resent_and_rests_the_member(caplog):
    """A request the upstream may have processed is never re-sent by the rotation itself;
    the warning that rests the member names the status it answered."""
    failing = FaultyUpstream(BuiltinUpstream(), Faults(error_500=1.0))
    other = BuiltinUpstream()
    rotation = BalancedUpstream([failing, other], backoff_initial=60)

    async def run():
        first = await rotation.send(CHAT, BODY, custom_id="a", attempt=0)
        second = await rotation.send(CHAT, BODY, custom_id="a", attempt=1)
        return first, second

    first, second = asyncio.run(run())
    assert first.status_code == 500 and sum(other.calls.values()) == 1
    assert second.status_code == 200  # the worker's retry went to the member in rotation
    assert failing.calls["a"] == 1
    said = [r.getMessage() for r in caplog.records if "out of rotation" in r.getMessage()]
    assert len(said) == 1 and "failed (answered HTTP 500: " in said[0], said
    assert "server error; 1 in a row): out of rotation" in said[0], said


class RefusingUpstream:
    """A member whose key is wrong: it answers ``status`` to every request, at once."""

    def __init__(self, status: int) -> None:
        self.description = f"refusing-{status}"
        self.status = status
        self.calls = 0

    async def send(self, url, body, *, custom_id, attempt):
        from batchspec.engine.upstreams import UpstreamResponse

        self.calls += 1
        error = {"message": "Incorrect API key provided", "type": "invalid_request_error"}
        return UpstreamResponse(self.status, {"error": error})

    async def aclose(self):
        pass


@pytest.mark.parametrize("status", [401, 403])
def test_a_member_refusing_its_key_fails_over_and_rests_the_member(status):
    """A member answering 401/403 (the key serve sends it is wrong: no line's fault, and it
    ran nothing) is a failing member: the same attempt goes to the next one and it rests.
    It stayed in rotation and, answering fastest, took about half the lines, which failed
    for good with its 401 (not retried) while the other member served."""
    refusing = RefusingUpstream(status)
    alive = BuiltinUpstream()
    rotation = BalancedUpstream([refusing, alive], backoff_initial=60)

    async def run():
        return [await rotation.send(CHAT, BODY, custom_id=f"c{i}", attempt=0) for i in range(6)]

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200] * 6
    assert refusing.calls == 1 and sum(alive.calls.values()) == 6
    assert [m.in_rotation for m in rotation.status()] == [False, True]


def test_every_member_refusing_its_key_returns_the_refusal():
    """With every member refusing, the line gets the refusal itself (as with one upstream),
    each member asked once, not a made-up error."""
    members = [RefusingUpstream(401), RefusingUpstream(401)]
    rotation = BalancedUpstream(members, backoff_initial=60)
    answer = asyncio.run(rotation.send(CHAT, BODY, custom_id="c", attempt=0))
    assert answer.status_code == 401 and [m.calls for m in members] == [1, 1]


def test_failures_during_a_rest_do_not_lengthen_it():
    """Requests that fail while their upstream already rests are one outage: one failure."""
    failing = FaultyUpstream(BuiltinUpstream(), Faults(error_500=1.0))
    rotation = BalancedUpstream([(failing, UpstreamTarget("x", rpm=6000))], backoff_initial=60)

    async def run():
        return [await rotation.send(CHAT, BODY, custom_id=f"f{i}", attempt=0) for i in range(5)]

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [500] * 5  # all down: tried anyway, as before
    assert rotation.status()[0].failures == 1


def test_a_hanging_member_times_out_and_is_probed_after_its_backoff(caplog):
    """No answer within the timeout rests the member, saying so; after the back-off it gets
    one probe."""
    slow = BuiltinUpstream(latency=30)
    fast = BuiltinUpstream()
    rotation = BalancedUpstream([slow, fast], request_timeout=0.2, backoff_initial=0.3)

    async def run():
        with pytest.raises(TimeoutError):
            await rotation.send(CHAT, BODY, custom_id="a", attempt=0)
        resting = rotation.status()[0]
        await rotation.send(CHAT, BODY, custom_id="b", attempt=0)  # not to the resting one
        await asyncio.sleep(0.35)
        slow.latency = 0
        await asyncio.gather(
            *(rotation.send(CHAT, BODY, custom_id=f"c{i}", attempt=0) for i in range(6))
        )
        return resting

    resting = asyncio.run(run())
    assert (resting.failures, resting.in_rotation) == (1, False)
    assert slow.calls["b"] == 0 and fast.calls["b"] == 1
    said = [r.getMessage() for r in caplog.records]
    assert any("failed (no answer within 0.2 s; 1 in a row)" in m for m in said), said
    assert sum(slow.calls[f"c{i}"] for i in range(6)) >= 1  # probed, answered, back
    assert rotation.status()[0].in_rotation


def test_waiting_for_a_rate_limit_does_not_count_against_the_request_timeout():
    """rpm=120 delays the 4th request by ~1 s; with a 0.3 s timeout every request still succeeds."""
    member = BuiltinUpstream()
    rotation = BalancedUpstream([(member, UpstreamTarget("builtin", rpm=120))], request_timeout=0.3)

    async def run():
        return await asyncio.gather(
            *(rotation.send(CHAT, BODY, custom_id=f"r{i}", attempt=0) for i in range(4))
        )

    assert [a.status_code for a in asyncio.run(run())] == [200] * 4


def test_the_worker_leaves_the_timeout_to_the_rotation(tmp_path):
    """In the engine, lines queued behind an rpm limit do not time out (one attempt, 0.3 s)."""
    rotation = BalancedUpstream(
        [(BuiltinUpstream(), UpstreamTarget("builtin", rpm=240))], request_timeout=0.3
    )
    server = start_server(
        tmp_path / "engine", upstream=rotation, concurrency=8, request_timeout=0.3, max_attempts=1
    )
    try:
        client, batch = _run_batch(server, 8)
        done = wait_for_batch(client, batch.id, timeout=60)
    finally:
        server.stop()
    assert (done.request_counts.completed, done.request_counts.failed) == (8, 0)


# -- the rotation in the engine, over loopback -----------------------------------------------


def test_requests_are_spread_least_in_flight_first(tmp_path):
    """Both upstreams serve; the slow one never holds more than its share of in-flight slots."""
    fast = start_recording_upstream(latency=0.005)
    slow = start_recording_upstream(latency=0.4)
    rotation = make_upstreams([fast.v1, slow.v1])
    server = start_server(tmp_path / "engine", upstream=rotation, concurrency=4)
    try:
        client, batch = _run_batch(server, 60)
        done = wait_for_batch(client, batch.id, timeout=60)
    finally:
        server.stop()
        fast.stop()
        slow.stop()
    assert done.status == "completed" and done.request_counts.completed == 60
    assert len(fast.arrivals) + len(slow.arrivals) == 60
    assert slow.arrivals, "the slow upstream got no request"
    # round robin would give each half and pile requests up on the slow one
    assert len(fast.arrivals) > 2 * len(slow.arrivals)
    assert slow.max_in_flight <= 2 and fast.max_in_flight <= 2


def test_a_stopped_upstream_is_worked_around_then_probed_back(tmp_path):
    """One upstream dies mid-batch: the batch completes on the other; restarted, it serves again."""
    first = start_recording_upstream(latency=0.01)
    second = start_recording_upstream(latency=0.01)
    port = second.port
    rotation = BalancedUpstream(
        [HttpUpstream(first.v1), HttpUpstream(second.v1)],
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    server = start_server(tmp_path / "engine", upstream=rotation, concurrency=4)
    try:
        client, batch = _run_batch(server, 300)
        wait_for(lambda: len(second.arrivals) >= 10)
        second.stop()
        done = wait_for_batch(client, batch.id, timeout=60)
        assert done.status == "completed", done
        assert (done.request_counts.completed, done.request_counts.failed) == (300, 0)
        errors = client.files.content(done.error_file_id).text if done.error_file_id else ""
        assert read_jsonl(errors) == []
        assert rotation.status()[1].failures >= 1  # it was taken out of rotation
        served_before = len(first.arrivals)

        restarted = start_recording_upstream(latency=0.01, port=port)
        try:
            client, again = _run_batch(server, 60, prefix="again")
            done_again = wait_for_batch(client, again.id, timeout=60)
        finally:
            restarted.stop()
    finally:
        server.stop()
        first.stop()
    assert done_again.status == "completed" and done_again.request_counts.completed == 60
    assert restarted.arrivals, "the restarted upstream was never probed back into rotation"
    assert len(first.arrivals) > served_before


def test_rpm_limit_is_honoured_at_the_upstream(tmp_path):
    """rpm=120: the upstream never sees more than the burst plus the rate in any 1 s window."""
    upstream = start_recording_upstream()
    rotation = make_upstreams([f"{upstream.v1}#rpm=120"])
    server = start_server(tmp_path / "engine", upstream=rotation, concurrency=8)
    try:
        client, batch = _run_batch(server, 10)
        done = wait_for_batch(client, batch.id, timeout=60)
    finally:
        server.stop()
        upstream.stop()
    assert done.status == "completed" and done.request_counts.completed == 10
    arrivals = sorted(upstream.arrivals)
    most = max(sum(1 for t in arrivals if start <= t < start + 1.0) for start in arrivals)
    # 2 at once (one second's worth) + 2 a second, and 2 of slack for loopback jitter;
    # without the limit all 10 arrive within a fraction of a second
    assert most <= 6, arrivals


# -- batchspec serve --------------------------------------------------------------------------


def test_serve_spreads_a_batch_over_two_upstreams(tmp_path):
    """`batchspec serve --upstream A --upstream B` names both and sends requests to both."""
    first = start_recording_upstream(latency=0.02)
    second = start_recording_upstream(latency=0.02)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchspec", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "engine"), "--poll-interval", "0.02",
         "--upstream", first.v1, "--upstream", f"{second.v1}#rpm=6000", "--concurrency", "4"],
        stderr=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.fullmatch(r"serving on (\S+) \(data: .+, upstream: (.+)\)\n", line)
        assert match, line
        assert match.group(2) == f"{first.v1} + {second.v1} (rpm 6,000)"
        import openai

        client = openai.OpenAI(base_url=f"{match.group(1)}/v1", api_key="x", max_retries=0)
        file_id = client.files.create(
            file=("in.jsonl", jsonl_bytes(request_lines(40))), purpose="batch"
        ).id
        batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        done = wait_for_batch(client, batch.id, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        first.stop()
        second.stop()
    assert done.status == "completed" and done.request_counts.completed == 40
    assert first.arrivals and second.arrivals
    assert len(first.arrivals) + len(second.arrivals) == 40


def test_local_provider_reads_upstreams_with_limits_from_the_project(tmp_path):
    """`upstreams:` in a local provider's options builds a rotation with per-upstream limits."""
    from batchspec.providers.registry import build_local_provider
    from batchspec.workspace.project import ProviderConfig

    config = ProviderConfig(
        name="gpus",
        type="local",
        base_url=None,
        api_key_env=None,
        options={
            "upstreams": [
                "builtin",
                {"url": "http://127.0.0.1:1/v1", "rpm": 60, "tpm": 1000},
            ]
        },
    )
    provider = build_local_provider(config, project_root=tmp_path)
    try:
        rotation = provider.engine.upstream
        assert isinstance(rotation, BalancedUpstream)
        members = rotation._members
        assert [m.rpm is not None for m in members] == [False, True]
        assert members[1].tpm is not None and members[1].tpm.rate == pytest.approx(1000 / 60)
    finally:
        provider.close()


@pytest.mark.parametrize(
    ("specs", "said"),
    [
        pytest.param(["http://127.0.0.1:99999/v1"], "Port out of range", id="out-of-range"),
        pytest.param(["http://u:secret@h:bad/v1"], "Port could not be cast", id="not-a-number"),
        pytest.param(["http://u:secret@h:bad/v1#rpm=5"], "Port could not", id="with-limits"),
        pytest.param(["http://u:secret@h:bad/v1#rpm=x"], "h:bad/v1#rpm=x': rpm", id="bad-limit"),
        pytest.param(
            ["http://127.0.0.1:1/v1", "http://u:secret@h:99999/v1"], "h:99999", id="in-a-rotation"
        ),
        pytest.param(["ftp://u:secret@h/v1"], "Unknown upstream 'ftp://h/v1'", id="ftp"),
    ],
)
def test_an_upstream_with_a_bad_port_is_a_usage_error_without_credentials(specs, said):
    """A port out of range or not a number (or a scheme not http) is a usage error naming the
    upstream without its password, alone, in a rotation or with limits (not a traceback)."""
    with pytest.raises(UsageError) as raised:
        make_upstreams(specs)
    assert "secret" not in str(raised.value) and said in str(raised.value)


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        pytest.param(
            "http://u:secret@h:1/v1/chat/completions",
            "names an endpoint (/chat/completions), not a base URL",
            id="endpoint-path",
        ),
        pytest.param("http://h:1/v1/chat/completions/", "Use 'http://h:1/v1'", id="trailing-slash"),
        pytest.param("http://h:1/embeddings#rpm=5", "Use 'http://h:1'", id="bare-with-limits"),
        pytest.param(
            "u:secret@localhost:8000/v1",
            "did you mean 'http://localhost:8000/v1'?",
            id="no-scheme",
        ),
        pytest.param("bultin", "did you mean 'builtin' (the offline stand-in)?", id="bultin"),
        pytest.param("Built-in", "did you mean 'builtin'", id="built-in"),
        pytest.param("http://h:1/v1#tpm=90k", "tokens per minute, no unit", id="tpm-with-unit"),
        pytest.param(
            "http://h:1/v1,http://u:secret@g:2/v1",
            "holds more than one URL: repeat --upstream",
            id="comma-separated",
        ),
    ],
)
def test_a_misspelt_upstream_is_refused_with_the_url_it_should_be(spec, said):
    """An upstream URL that names an endpoint (every line would 404 on .../chat/completions
    /chat/completions), lacks its scheme, carries a unit in a limit, or is two URLs joined by
    a comma (read as one with a strange path) is a usage error that says what to write
    instead, without any URL's password."""
    with pytest.raises(UsageError) as raised:
        make_upstreams([spec, "http://127.0.0.1:2/v1"])
    assert said in str(raised.value) and "secret" not in str(raised.value)


@pytest.mark.parametrize(
    ("spec", "secrets"),
    [
        pytest.param("http://bob:p@ss@gpu1/v1,http://gpu2/v1", ("bob", "p@ss", "ss@"), id="at"),
        pytest.param("http://bob:pa/ss@gpu1/v1,http://gpu2/v1", ("bob", "pa/", "ss@"), id="slash"),
        pytest.param(
            "http://gpu1/v1,http://alice:s3cr#t@gpu2/v1", ("alice", "s3cr", "t@"), id="hash"
        ),
    ],
)
def test_several_urls_in_one_upstream_are_shown_without_any_password(spec, secrets):
    """'A,B' in one --upstream is refused showing both URLs without their passwords, even a
    password holding '@', '/' or '#' (a regex once showed 'ss@gpu1', 'bob:pa/ss@...' and,
    through the '#' limits, 'alice:s3cr')."""
    for refuse in (lambda: make_upstreams([spec]), lambda: make_upstream(spec)):
        with pytest.raises(UsageError) as raised:
            refuse()
        said = str(raised.value)
        assert "'http://gpu1/v1,http://gpu2/v1' holds more than one URL" in said, said
        assert not any(secret in said for secret in secrets), said


@pytest.mark.parametrize(
    "spec",
    [
        "http://bob:pa/ss@gpu1/v1",
        "http://bob:pa?ss@gpu1/v1",
        "http://bob:pa#ss@gpu1/v1",
        "http://bob:pa#ss@gpu1/v1#rpm=5",
    ],
)
def test_a_password_with_a_slash_or_hash_is_refused_without_showing_it(spec):
    """A password holding '/', '?' or '#' (which end the host) is a usage error asking to
    percent-encode it, not a port error quoting 'pa' or an unknown '#' limit 'ss@gpu1/v1'."""
    for refuse in (lambda: make_upstreams([spec]), lambda: make_upstream(spec)):
        with pytest.raises(UsageError) as raised:
            refuse()
        said = str(raised.value)
        assert "'http://gpu1/v1': its user:password holds" in said, said
        assert not any(secret in said for secret in ("bob", "'pa", "pa/", "ss@")), said


def test_serve_with_a_bad_upstream_port_is_one_line_not_a_traceback(tmp_path):
    """`batchspec serve --upstream http://127.0.0.1:99999/v1` exits with one error line."""
    proc = subprocess.run(
        [sys.executable, "-m", "batchspec", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "engine"), "--upstream", "http://127.0.0.1:99999/v1"],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("Error: Upstream") and "99999" in line


def test_a_2xx_that_is_not_json_is_not_a_result_and_goes_to_another_member(tmp_path):
    """A member answering 200 with an HTML page (a captive portal, a wrong path) gives no
    line a result: the answer counts as a failure of that member (502, rested) and the
    worker's retry gets the line a real answer from the other member; none completes with
    the page as its body."""
    from scripted_server import Answer, ScriptedServer

    portal = ScriptedServer()
    page = Answer(200, b"<html>please log in</html>", {"Content-Type": "text/html"})
    portal.script(then=page)
    good = start_recording_upstream()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchspec", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "engine"), "--poll-interval", "0.02",
         "--upstream", portal.v1, "--upstream", good.v1, "--max-attempts", "4"],
        stderr=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.fullmatch(r"serving on (\S+) \(data: .+\)\n", line)
        assert match, line
        import openai

        client = openai.OpenAI(base_url=f"{match.group(1)}/v1", api_key="x", max_retries=0)
        file_id = client.files.create(
            file=("in.jsonl", jsonl_bytes(request_lines(6))), purpose="batch"
        ).id
        batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        done = wait_for_batch(client, batch.id, timeout=60)
        output = read_jsonl(client.files.content(done.output_file_id).text)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        portal.stop()
        good.stop()
    assert portal.requests, "the portal got no request: the test proves nothing"
    assert done.request_counts.completed == 6 and done.request_counts.failed == 0
    assert all(isinstance(r["response"]["body"], dict) for r in output)
    assert all(r["response"]["body"].get("object") == "chat.completion" for r in output)


def test_a_redirecting_upstream_is_a_named_failure_never_followed():
    """A member answering 302 gives no result and is not followed: HttpUpstream answers a 502
    naming the redirect and its Location without credentials or query, the Location's server
    gets nothing, and the rotation takes that member out and keeps the good one in."""
    from scripted_server import Answer, ScriptedServer

    elsewhere = ScriptedServer()
    elsewhere.script(then=Answer(200, b'{"object": "chat.completion"}'))
    host = elsewhere.v1.split("://", 1)[1]
    redirector = ScriptedServer()
    location = f"http://who:s3cret@{host}/login?token=t0ken"
    redirector.script(then=Answer(302, b"", {"Location": location}))
    good = start_recording_upstream()
    upstream = HttpUpstream(redirector.v1)
    rotation = BalancedUpstream([HttpUpstream(redirector.v1), HttpUpstream(good.v1)])

    async def go():
        try:
            alone = await upstream.send(CHAT, BODY, custom_id="a", attempt=1)
            answers = [
                await rotation.send(CHAT, BODY, custom_id=f"r{i}", attempt=1) for i in range(4)
            ]
            return alone, answers
        finally:
            await upstream.aclose()
            await rotation.aclose()

    try:
        alone, answers = asyncio.run(go())
    finally:
        elsewhere.stop()
        redirector.stop()
        good.stop()
    assert alone.status_code == 502, alone
    message = alone.body["error"]["message"]
    assert "redirect (302)" in message
    assert f"http://{host}/login" in message
    assert "s3cret" not in message and "t0ken" not in message
    assert elsewhere.requests == [], "the redirect was followed"
    assert [a.status_code for a in answers].count(502) == 1
    assert [a.status_code for a in answers].count(200) == 3
    sick, healthy = rotation.status()
    assert sick.failures == 1 and not sick.in_rotation and healthy.in_rotation


def test_a_redirecting_member_fails_no_line_the_other_answers_them(tmp_path):
    """`batchspec serve` over a member answering 302 and a good one: every line completes
    with a real answer from the good member (the worker's retry), none fails with the 302."""
    from scripted_server import Answer, ScriptedServer

    redirector = ScriptedServer()
    redirector.script(then=Answer(302, b"", {"Location": "https://login.example/sso"}))
    good = start_recording_upstream()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchspec", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "engine"), "--poll-interval", "0.02",
         "--upstream", redirector.v1, "--upstream", good.v1, "--max-attempts", "4"],
        stderr=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.fullmatch(r"serving on (\S+) \(data: .+\)\n", line)
        assert match, line
        import openai

        client = openai.OpenAI(base_url=f"{match.group(1)}/v1", api_key="x", max_retries=0)
        file_id = client.files.create(
            file=("in.jsonl", jsonl_bytes(request_lines(6))), purpose="batch"
        ).id
        batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        done = wait_for_batch(client, batch.id, timeout=60)
        output = read_jsonl(client.files.content(done.output_file_id).text)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        redirector.stop()
        good.stop()
    assert redirector.requests, "the redirector got no request: the test proves nothing"
    assert done.request_counts.completed == 6 and done.request_counts.failed == 0
    assert all(r["response"]["status_code"] == 200 for r in output)
    assert all(r["response"]["body"].get("object") == "chat.completion" for r in output)


def test_a_member_that_is_another_serve_fails_no_line_the_other_answers_them(tmp_path):
    """An engine spreading over a `batchspec serve` (a Batch API: it answers no request) and
    a model server: the serve is taken out of rotation, said as a failing member is, and
    every line gets a real answer from the other. Before, its 404 was each line's result:
    the lines sent to it failed for good, and serve said nothing of why."""
    other = start_server(tmp_path / "other")
    good = start_recording_upstream()
    rotation = BalancedUpstream([HttpUpstream(other.v1), HttpUpstream(good.v1)])
    engine = start_server(tmp_path / "engine", upstream=rotation, max_attempts=4)
    try:
        client, batch = _run_batch(engine, 6)
        done = wait_for_batch(client, batch.id, timeout=60)
        output = read_jsonl(client.files.content(done.output_file_id).text)
    finally:
        engine.stop()
        other.stop()
        good.stop()
    assert done.request_counts.completed == 6 and done.request_counts.failed == 0
    assert all(r["response"]["status_code"] == 200 for r in output)
    assert rotation.status()[0].failures >= 1  # out of rotation, as a failing member is


def test_a_member_answering_429_gets_no_requests_for_its_retry_after():
    """A member that answers 429 with Retry-After is full, not down: while another member
    can take them, the next requests go there, not every other one to the refusing member
    (before, round robin sent it half of them, each refused and retried)."""
    clock = FakeClock()
    full = FaultyUpstream(BuiltinUpstream(), Faults(error_429=1.0, retry_after=30.0))
    other = BuiltinUpstream()
    rotation = BalancedUpstream([full, other], clock=clock)

    async def run(first: int, last: int) -> list[int]:
        sends = [
            rotation.send(CHAT, BODY, custom_id=f"c{i}", attempt=0) for i in range(first, last)
        ]
        return [(await send).status_code for send in sends]

    assert asyncio.run(run(0, 5)) == [429, 200, 200, 200, 200]
    assert sum(full.calls.values()) == 1 and rotation.status()[0].in_rotation
    clock.now = 31.0  # its Retry-After has passed: its turn comes again
    assert asyncio.run(run(5, 7)).count(429) == 1


def test_a_member_answering_429_with_retry_after_0_is_paused_by_the_back_off():
    """`Retry-After: 0` asks for no pause: honoured, a member that refuses at once took
    every other request (each refused and retried), as with no pause at all. It is paused
    for the back-off instead, as a 429 without the header is (the retry policy's rule)."""
    clock = FakeClock()
    full = FaultyUpstream(BuiltinUpstream(), Faults(error_429=1.0, retry_after=0.0))
    rotation = BalancedUpstream([full, BuiltinUpstream()], clock=clock, backoff_initial=1.0)

    async def run(first: int, last: int) -> list[int]:
        sends = [
            rotation.send(CHAT, BODY, custom_id=f"c{i}", attempt=0) for i in range(first, last)
        ]
        return [(await send).status_code for send in sends]

    assert asyncio.run(run(0, 5)) == [429, 200, 200, 200, 200]
    clock.now = 1.5  # the back-off has passed: its turn comes again
    assert asyncio.run(run(5, 7)).count(429) == 1
