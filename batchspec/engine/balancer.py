"""Several upstreams behind one: the engine's scale-out over a team's own model servers.

``BalancedUpstream`` is an ``Upstream`` that sends each request to one of its members
(``batchspec serve --upstream URL --upstream URL …``, or a ``local`` provider's
``upstreams:``). The rules, in the order they are applied to each request:

1. **Rotation.** A member is *in rotation* unless it failed and its back-off has not passed.
   Among members in rotation whose rate limits admit the request now, the one with the
   fewest requests in flight is chosen; ties go round robin (the member after the last one
   chosen comes first).
2. **Rate limits.** A member may have ``rpm`` (requests per minute) and ``tpm`` (tokens per
   minute) limits, each a token bucket refilled continuously at ``limit / 60`` per second that
   holds at most one second's worth (at least one request's cost): so any window of ``T``
   seconds sees at most ``limit × T / 60`` plus that one second's worth. A request may start
   when each bucket holds its cost (or is full), and takes its cost, possibly leaving the
   bucket in debt that later requests wait out. When no member in rotation admits a request,
   it waits for the first that will; that wait is not part of the request timeout.
   The TPM cost is *estimated* before sending (the body's JSON length ÷ 4, plus its
   ``max_tokens``/``max_completion_tokens``/``max_output_tokens``) and *settled* when the
   answer reports ``usage`` (the difference is taken or given back), so over time the bucket
   counts the tokens the upstream reported.
3. **Failures.** A member that fails (connection refused or reset, a 5xx answer, which
   includes a 2xx whose body is not JSON and any 3xx redirect, never followed: ``HttpUpstream``
   turns each into a 502 naming what it got, no answer within the request timeout, or a 401
   or 403: the key it is sent is wrong, ``REFUSED_KEY_STATUSES``) is taken
   out of rotation for a back-off of ``backoff_initial`` seconds, doubling with each further
   failure up to ``backoff_max`` (failures of requests sent before it was taken out are the
   same outage and do not lengthen it). When its back-off has passed, it gets one request
   (the *probe*) and no other until that one ends: any other answer below 500 puts it back
   in rotation, a failure takes it out again for longer. A member that answers 429 is up but
   full: it stays in rotation but, like a member whose rate limit is spent, admits no request
   for its ``Retry-After`` (``backoff_initial`` without a positive one, at most
   ``backoff_max``), so the others take the requests meanwhile instead of it refusing half of
   them.
4. **Failing over.** A request that could not be *sent* (no connection could be opened) is
   sent at once to the next member, each member at most once, without using an attempt: the
   upstream never saw it. So is one a member refused with 401 or 403 (it ran nothing); when
   every member refused it, the last refusal is the answer. A request that failed after it
   was sent (reset, 5xx, timeout) is not re-sent here: the failure goes back to the
   engine's worker, whose retry policy (``wire/retry.py``: 5xx, 408, 429, timeouts and
   connection failures, with back-off) decides, exactly as with one upstream; its next
   attempt goes to a member in rotation.
5. **All out.** When every member is out of rotation, the one due back first is tried anyway
   (then the others, as in 4), so with every server down a batch fails its lines after the
   worker's attempts, as it does with one upstream, instead of waiting forever.

The balancer applies the request timeout itself (``times_requests``), per send to a member,
so time spent waiting for a rate limit never counts against it. ``status()`` is a snapshot
of every member (in flight, failures, in rotation) for logs and tests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from batchspec.engine import jsonfast
from batchspec.engine.upstreams import (
    Faults,
    FaultyUpstream,
    Upstream,
    UpstreamNotConnected,
    UpstreamResponse,
    UpstreamUnreachable,
    make_upstream,
    refuse_a_raw_password,
    refuse_several_urls,
)
from batchspec.errors import UsageError
from batchspec.wire.upstream_place import upstream_place

log = logging.getLogger("batchspec.engine")
Clock = Callable[[], float]
T = TypeVar("T")
DEFAULT_BACKOFF_INITIAL = 1.0
DEFAULT_BACKOFF_MAX = 30.0
#: a member answering these refused serve's credentials: it ran nothing, and it is no line's
#: fault (lines carry no key), so it is a failing member, and the line is sent to the next
#: one. Kept in rotation, it answered fastest and so took its share of the lines, each failed
#: for good with its 401 (not retried) while the other members served
REFUSED_KEY_STATUSES = frozenset({401, 403})
_LIMIT_KEYS = ("rpm", "tpm")
_LIMIT_UNITS = {"rpm": "requests", "tpm": "tokens"}


@dataclass(frozen=True)
class UpstreamTarget:
    """One upstream of a rotation: ``builtin`` or a base URL, with optional rate limits."""

    url: str
    rpm: int | None = None
    tpm: int | None = None


def parse_target(spec: str) -> UpstreamTarget:
    """``URL`` or ``URL#rpm=600,tpm=90000`` (the CLI form) as an ``UpstreamTarget``.

    The fragment of a URL is never sent to a server, so it can carry the limits.
    """
    refuse_several_urls(spec)  # before '#': a password in the second URL may hold one
    refuse_a_raw_password(spec)
    base, _, fragment = spec.partition("#")
    limits: dict[str, int] = {}
    for key, value in parse_qsl(fragment.replace(",", "&"), keep_blank_values=True):
        if key not in _LIMIT_KEYS:
            meant = f" (did you mean {key.lower()!r}?)" if key.lower() in _LIMIT_KEYS else ""
            raise UsageError(
                f"Upstream {_shown(spec)!r}: unknown limit {key!r} after '#'{meant}; "
                "use e.g. http://gpu1:8000/v1#rpm=600,tpm=90000."
            )
        if key in limits:  # which one was meant? neither is taken silently
            raise UsageError(
                f"Upstream {_shown(spec)!r}: {key} is given twice after '#'; give it once."
            )
        try:
            limits[key] = int(value)
        except ValueError:
            limits[key] = 0
        if limits[key] < 1:
            raise UsageError(
                f"Upstream {_shown(spec)!r}: {key} must be a whole number of at least 1 "
                f"({_LIMIT_UNITS[key]} per minute, no unit: e.g. {key}=600), not {value!r}."
            )
    return UpstreamTarget(base, rpm=limits.get("rpm"), tpm=limits.get("tpm"))


def _shown(spec: str) -> str:
    """A spec without any credentials in its URL (up to the last '@', as
    ``without_credentials`` reads them)."""
    scheme, sep, rest = spec.partition("://")
    if sep:
        spec = f"{scheme}://{rest.rpartition('@')[2]}"
    parts = urlsplit(spec)
    if parts.hostname is None:
        return spec
    return urlunsplit(
        (parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", parts.fragment)
    )


class RateBucket:
    """A token bucket refilled at ``per_minute / 60`` a second, holding one second's worth.

    ``wait(cost)`` is how long until a request of ``cost`` may start (0: now); ``take(cost)``
    spends it, possibly into debt; ``give(amount)`` returns (or, negative, takes) tokens.
    """

    def __init__(self, per_minute: int, *, clock: Clock = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError("a rate limit must be at least 1 per minute")
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate, 1.0)
        self._clock = clock
        self._level = self.capacity
        self._at = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def wait(self, cost: float) -> float:
        need = min(cost, self.capacity)
        missing = need - self.level()
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, cost: float) -> None:
        self._level = self.level() - cost

    def give(self, amount: float) -> None:
        self._level = min(self.capacity, self.level() + amount)


def estimated_tokens(body: Any, body_bytes: int) -> int:
    """A request's TPM cost before sending: its JSON length ÷ 4 plus its output-token cap."""
    cap = 0
    if isinstance(body, dict):
        for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            value = body.get(key)
            if isinstance(value, int) and value > 0:
                cap = value
                break
    return math.ceil(body_bytes / 4) + cap


def reported_tokens(body: Any) -> int | None:
    """``usage.total_tokens`` (or input + output) of an answer, None when it reports none."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and total >= 0:
        return total
    parts = [
        usage.get(key)
        for key in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")
    ]
    counted = [p for p in parts if isinstance(p, int) and p >= 0]
    return sum(counted) if counted else None


@dataclass(frozen=True)
class MemberStatus:
    """One member of a rotation as ``BalancedUpstream.status()`` sees it."""

    description: str
    in_flight: int
    sent: int
    failures: int  # consecutive failures; 0 when in rotation
    in_rotation: bool


class _Member:
    def __init__(self, upstream: Upstream, target: UpstreamTarget | None, clock: Clock) -> None:
        self.upstream = upstream
        self.description = upstream.description
        self.rpm = RateBucket(target.rpm, clock=clock) if target and target.rpm else None
        self.tpm = RateBucket(target.tpm, clock=clock) if target and target.tpm else None
        self.in_flight = 0
        self.sent = 0
        self.failures = 0
        self.out_until = 0.0
        self.probing = False
        self.busy_until = 0.0  # it answered 429: nothing more until then, if another can
        self._clock = clock

    def limits_text(self) -> str:
        """`` (rpm 600, tpm 90,000)``, or nothing for a member without limits."""
        limits = [
            f"{name} {round(bucket.rate * 60):,}"
            for name, bucket in (("rpm", self.rpm), ("tpm", self.tpm))
            if bucket is not None
        ]
        return f" ({', '.join(limits)})" if limits else ""

    def available(self, now: float) -> bool:
        """In rotation, or due for its probe (back-off passed, no probe in flight)."""
        return self.failures == 0 or (now >= self.out_until and not self.probing)

    def admission_wait(self, tokens: int) -> float:
        waits = [0.0, self.busy_until - self._clock()]
        if self.rpm is not None:
            waits.append(self.rpm.wait(1))
        if self.tpm is not None:
            waits.append(self.tpm.wait(tokens))
        return max(waits)

    def take(self, tokens: int) -> None:
        if self.rpm is not None:
            self.rpm.take(1)
        if self.tpm is not None:
            self.tpm.take(tokens)

    def give_back(self, tokens: int) -> None:
        if self.rpm is not None:
            self.rpm.give(1)
        if self.tpm is not None:
            self.tpm.give(tokens)


class BalancedUpstream:
    """Members behind one ``Upstream`` (the rules are in the module docstring)."""

    times_requests = True  # the worker leaves the request timeout to ``send``

    def __init__(
        self,
        members: Sequence[Upstream | tuple[Upstream, UpstreamTarget]],
        *,
        request_timeout: float = 60.0,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        clock: Clock = time.monotonic,
    ) -> None:
        if not members:
            raise ValueError("a rotation needs at least one upstream")
        self._clock = clock
        self._members = [
            _Member(m[0], m[1], clock) if isinstance(m, tuple) else _Member(m, None, clock)
            for m in members
        ]
        self._counts_tokens = any(m.tpm is not None for m in self._members)
        self._turn = 0
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        # what `batchspec serve` announces: each member, with the limits it was given
        self.description = " + ".join(m.description + m.limits_text() for m in self._members)

    def status(self) -> list[MemberStatus]:
        now = self._clock()
        return [
            MemberStatus(m.description, m.in_flight, m.sent, m.failures, m.available(now))
            for m in self._members
        ]

    # -- choosing ----------------------------------------------------------------------------

    def _choose(self, tried: set[int], tokens: int) -> tuple[int | None, float]:
        """The member to send to now, or None and how long to wait (inf: every one tried)."""
        now = self._clock()
        count = len(self._members)
        order = [(self._turn + k) % count for k in range(count)]
        untried = [i for i in order if i not in tried]
        if not untried:
            return None, math.inf
        ready = [i for i in untried if self._members[i].available(now)]
        if not ready:  # every untried one is out: the one due back first, anyway
            ready = [min(untried, key=lambda i: self._members[i].out_until)]
        best: int | None = None
        soonest = math.inf
        for i in ready:  # in round-robin order, so the first of equals wins
            wait = self._members[i].admission_wait(tokens)
            if wait > 0:
                soonest = min(soonest, wait)
            elif best is None or self._members[i].in_flight < self._members[best].in_flight:
                best = i
        return best, soonest

    # -- sending -----------------------------------------------------------------------------

    async def send(self, url: str, body: Any, *, custom_id: str, attempt: int) -> UpstreamResponse:
        tokens = 0
        if self._counts_tokens:
            tokens = estimated_tokens(body, len(jsonfast.dumps(body)))
        tried: set[int] = set()
        last_error: UpstreamUnreachable | None = None
        refused: UpstreamResponse | None = None
        while True:
            index, wait = self._choose(tried, tokens)
            if index is None:
                if math.isinf(wait):
                    if refused is not None:  # every member refused its key: say so
                        return refused
                    assert last_error is not None
                    raise last_error
                await asyncio.sleep(wait)
                continue
            member = self._members[index]
            self._turn = (index + 1) % len(self._members)
            try:
                response = await self._send_to(member, url, body, custom_id, attempt, tokens)
            except UpstreamNotConnected as err:  # never sent: the next member, same attempt
                tried.add(index)
                last_error = err
                continue
            if response.status_code not in REFUSED_KEY_STATUSES:
                return response
            tried.add(index)  # it ran nothing: the next member, same attempt
            refused = response

    async def _send_to(
        self, member: _Member, url: str, body: Any, custom_id: str, attempt: int, tokens: int
    ) -> UpstreamResponse:
        member.take(tokens)
        member.in_flight += 1
        member.sent += 1
        probe = member.failures > 0
        member.probing = member.probing or probe
        try:
            response = await _within(
                member.upstream.send(url, body, custom_id=custom_id, attempt=attempt),
                self.request_timeout,
            )
        except UpstreamNotConnected as err:
            member.give_back(tokens)
            member.sent -= 1
            self._failed(member, str(err))
            raise
        except UpstreamUnreachable as err:
            self._failed(member, str(err))
            raise
        except (asyncio.TimeoutError, TimeoutError):
            self._failed(member, f"no answer within {self.request_timeout:g} s")
            raise
        finally:
            member.in_flight -= 1
            if probe:
                member.probing = False
        if response.status_code >= 500 or response.status_code in REFUSED_KEY_STATUSES:
            self._failed(member, f"answered HTTP {response.status_code}{_said(response.body)}")
            if response.status_code in REFUSED_KEY_STATUSES:
                member.give_back(tokens)  # it ran nothing
        elif response.status_code == 429:
            self._busy(member, response.retry_after)
        elif member.failures:
            member.failures = 0
            log.info("upstream %s answers again: back in rotation", member.description)
        if member.tpm is not None:
            reported = reported_tokens(response.body)
            if reported is not None:
                member.tpm.give(tokens - reported)
        return response

    def _busy(self, member: _Member, retry_after: float | None) -> None:
        """A 429: the member is up but full. It gets nothing more for its Retry-After (when
        positive, else ``backoff_initial``; at most ``backoff_max``) while another member can
        take the requests; it stays in rotation, so no back-off doubles and no probe is
        needed."""
        now = self._clock()
        # Retry-After: 0, negative or a past date asks for no pause: as the retry policy, the
        # back-off stands in, or a member refusing at once would keep taking the requests
        pause = retry_after if retry_after is not None and retry_after > 0 else self.backoff_initial
        until = now + min(pause, self.backoff_max)
        if until <= member.busy_until:
            return
        if member.busy_until <= now:
            log.info(
                "upstream %s answered 429: no more requests to it for %.1f s",
                member.description,
                until - now,
            )
        member.busy_until = until

    def _failed(self, member: _Member, why: str) -> None:
        """Rest ``member`` (back-off doubling per failure in a row); ``why`` goes in the
        warning, so an operator sees a refused connection apart from a 503 or a timeout."""
        now = self._clock()
        if member.failures and now < member.out_until:
            return  # a request sent before it was taken out: the same outage, no longer rest
        member.failures += 1
        backoff = min(self.backoff_initial * 2.0 ** (member.failures - 1), self.backoff_max)
        member.out_until = now + backoff
        log.warning(
            "upstream %s failed (%s; %d in a row): out of rotation for %.1f s",
            member.description,
            why or "no reason given",
            member.failures,
            backoff,
        )

    async def aclose(self) -> None:
        for member in self._members:
            await member.upstream.aclose()


#: how much of an upstream's error message a warning that rests it quotes
_SAID_CHARS = 160


def _said(body: Any) -> str:
    """``": <message>"`` of a JSON error body (``{"error": {"message": ...}}``), on one line
    and cut at ``_SAID_CHARS``, so a rest warning tells a redirect (answered as a 502 naming
    it) from a model server's own 503; empty for any other body (an HTML page says little)."""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message.strip():
        return ""
    text = "".join(c if c.isprintable() else " " for c in " ".join(message.split()))
    text = text.rstrip(".")  # it is followed by "; N in a row"
    return ": " + (text if len(text) <= _SAID_CHARS else text[: _SAID_CHARS - 1] + "…")


async def _within(awaitable: Awaitable[T], seconds: float) -> T:
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover - Python 3.10


def make_upstreams(
    specs: Sequence[str | UpstreamTarget],
    *,
    api_key_env: str | None = None,
    max_connections: int = 64,
    request_timeout: float = 60.0,
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
    backoff_max: float = DEFAULT_BACKOFF_MAX,
    latency: float = 0.0,
    faults: Faults | None = None,
) -> Upstream:
    """The upstream for one or more specs (``URL``, ``URL#rpm=…,tpm=…``, ``builtin``).

    One spec without limits is exactly ``make_upstream(spec)``, as before rotations existed;
    anything else is a ``BalancedUpstream`` (every member reads its key from ``api_key_env``;
    ``latency`` delays a builtin member, ``faults`` are injected in front of the rotation).
    """
    targets = [parse_target(s) if isinstance(s, str) else s for s in specs]
    if not targets:
        raise UsageError("Name at least one upstream.")
    if len(targets) == 1 and targets[0].rpm is None and targets[0].tpm is None:
        return make_upstream(
            targets[0].url,
            api_key_env=api_key_env,
            latency=latency,
            faults=faults,
            max_connections=max_connections,
        )
    seen: set[str] = set()
    for target in targets:
        place = upstream_place(target.url)
        if place in seen:
            raise UsageError(
                f"Upstream {_shown(target.url)!r} is named twice (however its URL is spelt, "
                "one server): name each server once, with its limits after '#' if it has any."
            )
        seen.add(place)
    members = [
        (
            make_upstream(
                t.url, api_key_env=api_key_env, latency=latency, max_connections=max_connections
            ),
            t,
        )
        for t in targets
    ]
    rotation = BalancedUpstream(
        members,
        request_timeout=request_timeout,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
    )
    return rotation if faults is None else FaultyUpstream(rotation, faults)
