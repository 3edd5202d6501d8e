"""When ``apply --wait`` polls next: paced from the create, brought forward by progress.

``poll_pause`` is the whole rule (``batchspec.core.apply.converge`` sleeps what it says);
``remaining_seconds`` reads a batch's pace from two of its polls. Both are pure.
"""

from __future__ import annotations

import pytest

from batchspec.core.apply import SHORTEST_POLL_PAUSE, poll_pause
from batchspec.core.reconcile.poll import poll_message, remaining_seconds
from batchspec.providers.base import RemoteBatch, RequestCounts


@pytest.mark.parametrize(
    ("interval", "since_create", "done_in", "expected"),
    [
        pytest.param(0.5, None, None, 0.5, id="a-plain-poll-waits-the-interval"),
        pytest.param(0.5, 0.13, None, 0.37, id="counted-from-the-create"),
        pytest.param(0.5, 0.8, None, 0.0, id="work-after-the-create-longer-than-the-interval"),
        pytest.param(0.5, None, 0.3, 0.3, id="progress-says-sooner"),
        pytest.param(0.5, None, 2.0, 0.5, id="progress-never-makes-it-longer"),
        pytest.param(0.5, None, 0.0, SHORTEST_POLL_PAUSE, id="all-done-finalizing"),
        pytest.param(0.05, None, 0.0, 0.05, id="an-interval-below-the-floor-stays"),
        pytest.param(0.5, 0.3, 0.4, 0.2, id="the-sooner-of-both"),
    ],
)
def test_poll_pause(
    interval: float, since_create: float | None, done_in: float | None, expected: float
) -> None:
    """The pause is never longer than the interval; it counts from the last create, and a
    batch whose counts say it ends sooner is polled then, but never sooner than the floor
    (unless the interval itself is shorter)."""
    assert poll_pause(interval, since_create, done_in) == pytest.approx(expected)


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
    ],
)
def test_remaining_seconds_without_a_pace(
    before: tuple[float, int], after: tuple[float, int], expected: float | None
) -> None:
    """Counts that did not move (or no time between the polls) give no estimate, so the
    interval stands; every request done (a batch finalizing) is 0."""
    assert remaining_seconds(before, after, 20) == expected


def test_a_poll_message_groups_thousands_as_status_does() -> None:
    """apply's poll line reads 1,500/20,000, as `status` and the totals line write counts."""
    remote = RemoteBatch("batch_1", "in_progress", request_counts=RequestCounts(20000, 1400, 100))
    assert poll_message(remote) == "batch batch_1 in_progress 1,500/20,000"
