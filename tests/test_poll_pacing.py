"""When ``apply --wait`` polls next: paced from the create, brought forward by progress.

``poll_pause`` is the whole rule (``batchspec.core.apply.converge`` sleeps what it says);
``remaining_seconds`` reads a batch's pace from two of its polls. Both are pure. The grid
the first polls keep after a create is also watched from the server's side, on a real
engine served over loopback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from probes import ProbedServer
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, served

from batchspec.core.apply import (
    SHORTEST_POLL_PAUSE,
    ApplyOptions,
    apply_workspace,
    converge,
    poll_pause,
    wait_message,
)
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reconcile.poll import note_progress, poll_message, remaining_seconds
from batchspec.engine.upstreams import BuiltinUpstream
from batchspec.providers.base import RemoteBatch, RequestCounts


@pytest.mark.parametrize(
    ("interval", "since_create", "done_in", "since_poll", "expected"),
    [
        pytest.param(0.5, None, None, 0.0, 0.5, id="no-create-waits-the-interval"),
        pytest.param(0.5, 0.13, None, 0.3, 0.12, id="first-poll-a-grid-step-after-the-create"),
        pytest.param(0.5, 0.8, None, 0.9, 0.0, id="work-after-the-create-past-the-grid-step"),
        pytest.param(0.5, 0.27, None, 0.01, 0.23, id="next-grid-point-after-the-last-poll"),
        pytest.param(0.5, 0.26, None, 0.01 + 1e-9, 0.24, id="a-poll-on-a-grid-point-is-on-it"),
        pytest.param(0.5, 0.7, None, 0.2, 0.05, id="a-slow-pass-keeps-to-the-grid"),
        pytest.param(0.5, 0.7, None, 0.3, 0.0, id="a-pass-past-the-next-point-polls-at-once"),
        pytest.param(0.5, 1.95, None, 0.01, 0.05, id="the-last-grid-point"),
        pytest.param(0.5, 2.05, None, 0.01, 0.5, id="then-the-interval"),
        pytest.param(30.0, 5.0, None, 4.0, 0.0, id="a-create-after-a-long-pass-polls-at-once"),
        pytest.param(0.1, 0.02, None, 0.1, 0.1, id="a-shorter-interval-than-the-grid-stays"),
        pytest.param(0.5, None, 0.3, 0.0, 0.3, id="progress-says-sooner"),
        pytest.param(0.5, None, 2.0, 0.0, 0.5, id="progress-never-makes-it-longer"),
        pytest.param(0.5, None, 0.0, 0.0, SHORTEST_POLL_PAUSE, id="all-done-finalizing"),
        pytest.param(0.05, None, 0.0, 0.0, 0.05, id="an-interval-below-the-floor-stays"),
        pytest.param(0.5, 0.3, 0.15, 0.01, 0.15, id="the-sooner-of-both"),
    ],
)
def test_poll_pause(
    interval: float,
    since_create: float | None,
    done_in: float | None,
    since_poll: float,
    expected: float,
) -> None:
    """The pause is never longer than the interval; for two seconds after the run's last
    create the next poll falls on the next point of a 0.25 s grid counted from the create
    (at once when the pass ran past it), then the interval applies; a batch whose counts say
    it ends sooner is polled then, but never sooner than the floor (unless the interval
    itself is shorter)."""
    assert poll_pause(interval, since_create, done_in, since_poll) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pause", "text"),
    [
        (0.012, "waiting 12 ms"),
        (0.0004, "waiting 0 ms"),
        (0.25, "waiting 0.2s"),
        (5, "waiting 5.0s"),
    ],
)
def test_a_short_wait_is_said_in_milliseconds_not_as_no_wait(pause: float, text: str) -> None:
    """A pause under a tenth of a second (on the quick-poll grid) reads in milliseconds:
    "waiting 0.0s for 169 resource(s)" looked like no wait at all."""
    assert wait_message(pause, 169) == f"{text} for 169 resource(s)"


def test_remaining_seconds_extrapolates_the_pace_between_two_polls() -> None:
    """6,000 of 20,000 done 0.5 s after the create (none then): 14,000 left at 12,000/s."""
    assert remaining_seconds((10.0, 0), (10.5, 6_000), 20_000) == pytest.approx(14_000 / 12_000)
    assert remaining_seconds((10.5, 6_000), (11.0, 16_000), 20_000) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        pytest.param((1.0, 5), (2.0, 5), None, id="no-progress-no-guess"),
        pytest.param((1.0, 5), (1.0, 9), None, id="no-time-passed"),
        pytest.param((1.0, 5), (2.0, 20), 0.0, id="all-done"),
        pytest.param((1.0, 20), (2.0, 20), 1.0, id="still-finalizing"),
        pytest.param((1.0, 20), (1.25, 20), 0.25, id="still-finalizing-sooner"),
    ],
)
def test_remaining_seconds_without_a_pace(
    before: tuple[float, int], after: tuple[float, int], expected: float | None
) -> None:
    """Counts that did not move (or no time between the polls) give no estimate, so the
    interval stands; every request just done (a batch finalizing) is 0, once; a batch all
    done since ``before`` and still finalizing is polled again after as long as it has
    finalized (0.1, 0.2, 0.4 s ... to the interval: not every 0.1 s for the minutes OpenAI
    may finalize, nor a whole interval late for an engine that finalizes in 0.2 s)."""
    assert remaining_seconds(before, after, 20) == expected


def test_a_finalizing_batch_whose_counts_flap_still_backs_off_to_the_interval() -> None:
    """A batch all done whose counts keep changing above its total (a provider counting a
    request twice, then not) is polled after as long as it has been all done, not after as
    long as since its last change: every 0.1 s for as long as it finalizes."""
    clock = [0.0]
    ctx = SimpleNamespace(monotonic=lambda: clock[0], progress={}, done_in=None)
    pauses: list[float] = []
    for poll in range(12):
        done = 19 if poll == 0 else 20 + poll % 2  # 19, 21, 20, 21, 20 ... of 20
        ctx.done_in = None
        note_progress(
            cast("RunContext", ctx),
            RemoteBatch("batch_1", "finalizing", request_counts=RequestCounts(20, done, 0)),
        )
        pause = poll_pause(5.0, None, ctx.done_in)
        pauses.append(pause)
        clock[0] += pause
    assert pauses[-1] == 5.0, pauses


def test_a_poll_message_groups_thousands_as_status_does() -> None:
    """apply's poll line reads 1,500/20,000, as `status` and the totals line write counts."""
    remote = RemoteBatch("batch_1", "in_progress", request_counts=RequestCounts(20000, 1400, 100))
    assert poll_message(remote) == "batch batch_1 in_progress 1,500/20,000 (100 failed)"


def test_a_poll_message_counts_the_failed_requests_as_status_does() -> None:
    """A batch whose requests all failed polls as `completed 3/3 (3 failed)`, as `status`
    and apply's summary write it: the plain line (a CI log) said `completed 3/3`, success's
    words, for a batch that answered nothing."""
    remote = RemoteBatch("batch_1", "completed", request_counts=RequestCounts(3, 0, 3))
    assert poll_message(remote) == "batch batch_1 completed 3/3 (3 failed)"
    clean = RemoteBatch("batch_2", "completed", request_counts=RequestCounts(3, 3, 0))
    assert poll_message(clean) == "batch batch_2 completed 3/3"


def test_the_first_polls_after_a_create_keep_a_quarter_second_grid(
    tmp_path: Path, server: Callable[..., ProbedServer]
) -> None:
    """Seen by the server: a batch that takes ~1.6 s is polled at least three times in the
    first second after its create answered, each of the first two polls no later than a
    script polling every 0.5 s from the create would send it (it was polled at +0.5 s and
    +1.0 s, each a little after that script's)."""
    srv = server(api_key=SENTINEL_KEY, upstream=BuiltinUpstream(latency=0.4), concurrency=1)
    ws = served(tmp_path / "ws", srv, ResourceSpec("job", count=4))
    options = ApplyOptions(yes=True, wait=True, poll_interval=0.5, timeout=30)

    result = apply_workspace([str(ws.root)], options, env={KEY_ENV: SENTINEL_KEY})

    assert result.exit_code == 0
    spans = srv.probe.spans
    created = next(end for route, _, end in spans if route == "POST /batches")
    polls = sorted(start - created for route, start, _ in spans if route == "GET /batches/{id}")
    assert len([p for p in polls if p <= 1.0]) >= 3, polls
    assert polls[0] <= 0.5 and polls[1] <= 1.0, polls


class _KeepsCreating:
    """A run's reconciler as ``converge`` sees it, on a fake clock: every pass finds the
    resource still waiting, and a queue of shards behind ``maxInFlightBatches`` frees a slot
    every ``every`` seconds, which the next pass fills with a create."""

    def __init__(self, clock: list[float], every: float, pass_takes: float = 0.0) -> None:
        self.clock, self.every, self.pass_takes = clock, every, pass_takes
        self.created_at: float | None = None
        self.passes = 0

    def advance_all(self, resources: object, facts: object) -> list[SimpleNamespace]:
        self.passes += 1
        self.clock[0] += self.pass_takes
        now = self.clock[0]
        if self.created_at is None or now - self.created_at >= self.every:
            self.created_at = now
        return [SimpleNamespace(name="job")]

    def seconds_since_create(self) -> float | None:
        return None if self.created_at is None else self.clock[0] - self.created_at

    def expected_done_in(self) -> float | None:
        return None


def test_a_run_that_keeps_creating_does_not_poll_on_the_grid_for_ever() -> None:
    """A create every 1.5 s for 10 minutes (a queue of shards, one more each time a slot
    frees) polls on the quarter-second grid after the first create, then at most two seconds
    of grid per poll interval: not ~2,400 passes (every batch in flight polled every 0.25 s)."""
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    rec = _KeepsCreating(clock, every=1.5)
    options = ApplyOptions(yes=True, wait=True, poll_interval=30.0, timeout=600.0)

    def now() -> float:
        return clock[0]

    timed_out = converge(rec, [], {}, options, lambda: None, lambda p: None, sleep, now)  # type: ignore[arg-type]

    assert timed_out
    assert rec.passes <= 600 / 32 * (2 / 0.25 + 8), rec.passes
    assert rec.passes >= 8  # the first create still got its grid


def test_a_pass_that_ran_past_its_grid_point_polls_again_without_a_wait_line() -> None:
    """Passes of 0.3 s over a fleet run past the quarter-second grid: the next poll is due at
    once, and no "waiting 0 ms for 300 resource(s)" line (one per pass, in a new user's log)
    says so; the real waits of the run are still reported."""
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    rec = _KeepsCreating(clock, every=1000.0, pass_takes=0.3)
    options = ApplyOptions(yes=True, wait=True, poll_interval=2.0, timeout=20.0)
    said: list[str] = []

    def now() -> float:
        return clock[0]

    converge(rec, [], {}, options, lambda: None, lambda p: said.append(p.message), sleep, now)  # type: ignore[arg-type]

    waits = [m for m in said if m.startswith("waiting")]
    assert waits and not [m for m in waits if m.startswith("waiting 0 ms")], waits
    assert rec.passes > len(waits)  # passes on the grid went on without a wait line
