"""The one retry policy of batchspec, for both sides of the wire.

Two callers retry HTTP requests: the provider clients (``providers/_http.py``, batchspec
talking to a Batch API) and the local engine's worker (``engine/worker.py``, the engine
talking to its upstream model server). Their rules differ, so they are two *instances* of
``RetryPolicy``, not two implementations; each caller's loop only asks the policy:

- ``retries_status(status, code=, should_retry=)``: is this answer worth another attempt?
  (``retry_statuses``, every 5xx but ``NOT_TRANSIENT_5XX`` if ``retry_server_errors``, never
  an error ``code`` in
  ``final_codes``; a server's ``x-should-retry: true|false`` wins where ``honour_should_retry``);
- ``can_retry(retries_done)``: are attempts left (``max_attempts`` counts the first one)?
- ``delay(retries_done, retry_after)``: how long to wait: the server's ``Retry-After`` capped
  at ``max_retry_after`` if it sent a positive one, else ``backoff``: exponential from
  ``initial_delay``, capped at ``max_delay``, minus up to ``jitter`` (a fraction) of it at
  random (``Retry-After: 0``, a negative one or a past date get the backoff: no 429 storm
  spends every retry at once).

Transport failures (timeouts, refused or dropped connections) are retried by both callers;
which exception types count as such is the caller's business (httpx's, or the engine's own).

``retry_after_seconds`` reads ``retry-after-ms``, then ``Retry-After`` (seconds or an HTTP
date); every function here is pure apart from the injectable ``rand`` and ``now``.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

#: 5xx answers no wait changes: 501 (the server does not implement the request: a baseUrl that
#: is no Batch API, e.g. a plain file server answering a POST) and 505 (HTTP version)
NOT_TRANSIENT_5XX = frozenset({501, 505})


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures are retried, how often, and how long to wait in between (seconds)."""

    max_attempts: int
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({408, 429}))
    retry_server_errors: bool = True
    final_codes: frozenset[str] = frozenset()
    honour_should_retry: bool = False
    initial_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.25
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter is a fraction between 0 and 1")

    @property
    def max_retries(self) -> int:
        return self.max_attempts - 1

    def retries_status(
        self, status: int, *, code: str | None = None, should_retry: bool | None = None
    ) -> bool:
        """Whether an HTTP answer ``status`` (error ``code``, server verdict) is worth a retry."""
        if self.honour_should_retry and should_retry is False:
            return False
        if code is not None and code in self.final_codes:
            return False
        if self.honour_should_retry and should_retry is True:
            return True
        return status in self.retry_statuses or (
            self.retry_server_errors and status >= 500 and status not in NOT_TRANSIENT_5XX
        )

    def can_retry(self, retries_done: int) -> bool:
        """Whether attempt ``retries_done + 1`` having failed, another one is allowed."""
        return retries_done + 1 < self.max_attempts

    def backoff(self, retries_done: int, rand: Callable[[], float] = random.random) -> float:
        """Exponential delay before retry number ``retries_done + 1``, minus the jitter."""
        base = min(self.initial_delay * 2.0**retries_done, self.max_delay)
        return base * (1.0 - self.jitter * rand())

    def delay(
        self,
        retries_done: int,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """The server's requested delay (capped) if it gave a positive one, else the backoff.

        ``Retry-After: 0`` (or a negative number, or a date already past) asks for no wait at
        all: honoured, a 429 storm would spend every retry within milliseconds, so the
        backoff stands in for it, as in the official OpenAI SDK (which honours a
        Retry-After only in ``0 < seconds <= 60``)."""
        if retry_after is not None and retry_after > 0:
            return min(retry_after, self.max_retry_after)
        return self.backoff(retries_done, rand)


#: batchspec's clients of a Batch API: the official OpenAI SDK's rules (408, 409, 429, 5xx;
#: ``x-should-retry``; 5 retries from 0.5 s to 8 s, 25 % jitter; Retry-After up to 60 s).
#: A 429 ``insufficient_quota`` is final: waiting does not buy quota.
CLIENT_POLICY = RetryPolicy(
    max_attempts=6,
    retry_statuses=frozenset({408, 409, 429}),
    final_codes=frozenset({"insufficient_quota"}),
    honour_should_retry=True,
    initial_delay=0.5,
    max_delay=8.0,
    jitter=0.25,
    max_retry_after=60.0,
)

#: the local engine's worker against its upstream (408, 429, 5xx; 5 attempts in all from
#: 0.5 s to 30 s, up to half the delay off at random; Retry-After capped like the backoff).
UPSTREAM_POLICY = RetryPolicy(
    max_attempts=5,
    retry_statuses=frozenset({408, 429}),
    initial_delay=0.5,
    max_delay=30.0,
    jitter=0.5,
    max_retry_after=30.0,
)


def client_policy(max_retries: int) -> RetryPolicy:
    """``CLIENT_POLICY`` with ``max_retries`` retries after the first attempt."""
    return replace(CLIENT_POLICY, max_attempts=max_retries + 1)


def upstream_policy(*, max_attempts: int, initial_delay: float, max_delay: float) -> RetryPolicy:
    """``UPSTREAM_POLICY`` with the engine's settings; Retry-After is capped at ``max_delay``."""
    return replace(
        UPSTREAM_POLICY,
        max_attempts=max_attempts,
        initial_delay=initial_delay,
        max_delay=max_delay,
        max_retry_after=max_delay,
    )


def retry_after_seconds(
    headers: Mapping[str, str], *, now: Callable[[], float] = time.time
) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, then ``Retry-After``.

    ``Retry-After`` may be seconds or an HTTP date (a past date means 0, which ``delay`` reads
    as no wait asked for: the backoff applies). None when absent
    or unreadable (the caller backs off by itself). ``headers`` is looked up by lower-case name.
    """
    millis = _as_float(headers.get("retry-after-ms"))
    if millis is not None:
        return max(millis / 1000.0, 0.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _as_float(value)
    if seconds is not None:
        return max(seconds, 0.0)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - now(), 0.0)


def should_retry_header(headers: Mapping[str, str]) -> bool | None:
    """The server's ``x-should-retry`` verdict: True, False, or None when it gave none."""
    value = (headers.get("x-should-retry") or "").strip().lower()
    return {"true": True, "false": False}.get(value)


def _as_float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


__all__ = [
    "CLIENT_POLICY",
    "NOT_TRANSIENT_5XX",
    "UPSTREAM_POLICY",
    "RetryPolicy",
    "client_policy",
    "retry_after_seconds",
    "should_retry_header",
    "upstream_policy",
]
