"""The one retry policy (wire.retry): its rules as data, its pure decisions, its two instances.

The loops that use it are tested where they live: the provider client in test_http_retry.py
(injected sleep), the engine worker in test_serve_openai_sdk.py and test_engine.py.
"""

from __future__ import annotations

import email.utils

import httpx
import pytest

from batchspec.wire.retry import (
    CLIENT_POLICY,
    UPSTREAM_POLICY,
    RetryPolicy,
    client_policy,
    retry_after_seconds,
    should_retry_header,
    upstream_policy,
)

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("status", "client", "upstream"),
    [
        pytest.param(400, False, False, id="400"),
        pytest.param(401, False, False, id="401"),
        pytest.param(404, False, False, id="404"),
        pytest.param(408, True, True, id="408"),
        pytest.param(409, True, False, id="409-client-only"),
        pytest.param(422, False, False, id="422"),
        pytest.param(429, True, True, id="429"),
        pytest.param(500, True, True, id="500"),
        pytest.param(501, False, False, id="501-not-implemented"),
        pytest.param(503, True, True, id="503"),
        pytest.param(505, False, False, id="505-http-version"),
        pytest.param(529, True, True, id="529-overloaded"),
    ],
)
def test_which_statuses_each_side_retries(status: int, client: bool, upstream: bool) -> None:
    """The client retries 408/409/429/5xx (the SDK's list); the engine 408/429/5xx; neither
    501 or 505, which no wait changes."""
    assert CLIENT_POLICY.retries_status(status) is client
    assert UPSTREAM_POLICY.retries_status(status) is upstream


def test_a_final_code_is_never_retried_and_the_server_verdict_wins() -> None:
    """insufficient_quota is final even on a 429; x-should-retry decides where honoured."""
    assert CLIENT_POLICY.retries_status(429, code="insufficient_quota") is False
    assert CLIENT_POLICY.retries_status(429, code="rate_limit_exceeded") is True
    assert CLIENT_POLICY.retries_status(500, should_retry=False) is False
    assert CLIENT_POLICY.retries_status(400, should_retry=True) is True
    assert CLIENT_POLICY.retries_status(429, code="insufficient_quota", should_retry=True) is False
    # the engine does not read the header: its rules alone decide
    assert UPSTREAM_POLICY.retries_status(500, should_retry=False) is True
    assert UPSTREAM_POLICY.retries_status(400, should_retry=True) is False


def test_max_attempts_counts_the_first_attempt() -> None:
    """A policy of N attempts allows N-1 retries; client_policy(n) means n retries."""
    policy = RetryPolicy(max_attempts=3)
    assert [policy.can_retry(done) for done in range(4)] == [True, True, False, False]
    assert client_policy(5).max_attempts == 6 and client_policy(0).can_retry(0) is False
    assert RetryPolicy(max_attempts=1).max_retries == 0


def test_backoff_doubles_to_its_cap_and_jitter_takes_off_at_most_its_fraction() -> None:
    """Client: 0.5 s doubling to 8 s, minus up to 25 %; engine: to 30 s, minus up to 50 %."""
    assert [CLIENT_POLICY.backoff(n, rand=lambda: 0.0) for n in range(6)] == [0.5, 1, 2, 4, 8, 8]
    assert CLIENT_POLICY.backoff(2, rand=lambda: 1.0) == pytest.approx(1.5)
    assert [UPSTREAM_POLICY.backoff(n, rand=lambda: 0.0) for n in (0, 5, 6, 9)] == [
        0.5,
        16,
        30,
        30,
    ]
    assert UPSTREAM_POLICY.backoff(9, rand=lambda: 1.0) == pytest.approx(15.0)
    assert RetryPolicy(max_attempts=2, jitter=0.0).backoff(1, rand=lambda: 1.0) == 1.0


def test_the_server_s_retry_after_replaces_the_backoff_up_to_the_cap() -> None:
    """Retry-After is used as asked, capped at max_retry_after; one asking for no wait at
    all (0, negative: a past date) gets the backoff, on both sides of the wire."""
    assert CLIENT_POLICY.delay(0, 3.0) == 3.0
    assert CLIENT_POLICY.delay(0, 3600.0) == 60.0
    assert CLIENT_POLICY.delay(0, -4.0, rand=lambda: 0.0) == 0.5
    assert CLIENT_POLICY.delay(2, 0.0, rand=lambda: 0.0) == 2.0
    assert UPSTREAM_POLICY.delay(1, 0.0, rand=lambda: 0.0) == 1.0
    assert CLIENT_POLICY.delay(3, None, rand=lambda: 0.0) == 4.0
    assert UPSTREAM_POLICY.delay(0, 3600.0) == 30.0


def test_the_engine_s_settings_shape_its_policy() -> None:
    """Engine settings map onto the upstream policy; its Retry-After cap follows max_delay."""
    policy = upstream_policy(max_attempts=2, initial_delay=0.001, max_delay=0.01)
    assert (policy.max_attempts, policy.initial_delay, policy.max_delay) == (2, 0.001, 0.01)
    assert policy.delay(0, 5.0) == 0.01
    assert policy.retry_statuses == UPSTREAM_POLICY.retry_statuses


@pytest.mark.parametrize(
    "kwargs",
    [pytest.param({"max_attempts": 0}, id="no-attempt"), pytest.param({"jitter": 1.5}, id="jit")],
)
def test_impossible_policies_are_refused(kwargs: dict[str, float]) -> None:
    """A policy with no attempt or a jitter outside [0, 1] cannot be built."""
    with pytest.raises(ValueError):
        RetryPolicy(**{"max_attempts": 3, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after": "3"}, 3.0, id="seconds"),
        pytest.param({"retry-after": "1.5"}, 1.5, id="fractional-seconds"),
        pytest.param({"retry-after-ms": "250"}, 0.25, id="milliseconds"),
        pytest.param({"retry-after-ms": "250", "retry-after": "9"}, 0.25, id="ms-wins"),
        pytest.param({"retry-after-ms": "soon", "retry-after": "9"}, 9.0, id="bad-ms-falls-back"),
        pytest.param({"retry-after": "garbage"}, None, id="unparseable"),
        pytest.param({"retry-after": "inf"}, None, id="infinite"),
        pytest.param({"retry-after": "-4"}, 0.0, id="negative-is-now"),
        pytest.param({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0, id="past-date"),
        pytest.param(
            {"retry-after": email.utils.formatdate(NOW + 20, usegmt=True)}, 20.0, id="future-date"
        ),
        pytest.param({}, None, id="absent"),
    ],
)
def test_retry_after_parsing(headers: dict[str, str], expected: float | None) -> None:
    """retry-after-ms, then Retry-After as seconds or an HTTP date; unreadable gives None."""
    assert retry_after_seconds(headers, now=lambda: NOW) == expected
    assert retry_after_seconds(httpx.Headers(headers), now=lambda: NOW) == expected


@pytest.mark.parametrize(
    ("value", "verdict"),
    [("true", True), (" False ", False), ("maybe", None), (None, None)],
)
def test_the_x_should_retry_header_is_read_as_a_verdict(
    value: str | None, verdict: bool | None
) -> None:
    """x-should-retry is true, false, or no verdict at all."""
    headers = {} if value is None else {"x-should-retry": value}
    assert should_retry_header(headers) is verdict
