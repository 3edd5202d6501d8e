"""The confirm loop of an unsure create: look its key up, backing off, until the deadline.

``look_up_until`` runs against the real local engine in this process (as in
tests/test_adoption_lookup.py). The run's clock and sleep are the test's: each sleep moves
the clock, and the batch the lost create made appears at the engine during a chosen sleep,
as a create still in transit lands there. What is pinned: the lookups back off by doubling
(0.5 s, 1 s, 2 s, … capped by the time left), the lock is re-checked before every wait, the
last lookup happens at the deadline (never a second early: a create landing in the last
second is adopted, not paid for again), and a batch that appears is returned at once.
End to end (a real gateway holding a create past the client's timeout):
tests/test_create_in_transit.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_adoption_lookup import KEY, make_batch

from batchspec.core.batches import metadata_for_key
from batchspec.core.reconcile.adopt import look_up_until
from batchspec.errors import StateLockedError
from batchspec.providers.base import RemoteBatch
from batchspec.providers.local import LocalProvider
from batchspec.state.records import utc_timestamp


@dataclass
class Intent:
    """The two columns of a batch row the lookup reads."""

    key: str = KEY
    created_at: str = field(default_factory=utc_timestamp)


@dataclass
class Run:
    """The parts of a run the loop uses: its clock, its sleep, its lock re-check."""

    provider: LocalProvider
    tmp_path: Path
    appear_after: int | None = None  # the batch lands during this sleep (1-based), if ever
    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    lock_lost_after: int | None = None
    reads: int = 0

    def clock(self) -> float:
        self.reads += 1
        if self.reads > 100:  # a loop whose waits do not move the clock never ends
            raise AssertionError("the lookups do not advance towards the deadline")
        return self.now

    def sleep(self, seconds: float) -> None:
        self.events.append("sleep")
        self.sleeps.append(seconds)
        self.now += seconds
        if len(self.sleeps) == self.appear_after:
            make_batch(self.provider, self.tmp_path, metadata_for_key(KEY), age=0)

    def still_holds_lock(self) -> None:
        self.events.append("lock")
        if self.lock_lost_after is not None and self.events.count("lock") > self.lock_lost_after:
            raise StateLockedError("the lock was taken over")


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[LocalProvider]:
    with LocalProvider("here", tmp_path / "engine") as p:
        yield p


def confirm(run: Run, *, within: float) -> RemoteBatch | None:
    return look_up_until(run, run.provider, Intent(), until=run.now + within)  # type: ignore[arg-type]


def test_backs_off_by_doubling_and_adopts_the_batch_when_it_lands(
    provider: LocalProvider, tmp_path: Path
) -> None:
    """A create that lands during the third wait is found by the lookup right after it, and
    the waits before were 0.5 s, 1 s and 2 s, the lock re-checked before each."""
    run = Run(provider, tmp_path, appear_after=3)

    found = confirm(run, within=60)

    assert found is not None and found.metadata == {**metadata_for_key(KEY)}
    assert run.sleeps == [0.5, 1.0, 2.0]
    assert run.events == ["lock", "sleep"] * 3


def test_a_batch_already_there_is_found_without_waiting(
    provider: LocalProvider, tmp_path: Path
) -> None:
    """The first lookup that finds the key returns it: no wait, no lock re-check."""
    make_batch(provider, tmp_path, metadata_for_key(KEY), age=0)
    run = Run(provider, tmp_path)

    assert confirm(run, within=60) is not None
    assert run.sleeps == []


def test_the_last_lookup_is_at_the_deadline_and_finds_a_late_create(
    provider: LocalProvider, tmp_path: Path
) -> None:
    """With 4 s to go, the waits are 0.5, 1, 2 and then the 0.5 s left (never past the
    deadline); a create landing in that last half second is still adopted."""
    run = Run(provider, tmp_path, appear_after=4)

    found = confirm(run, within=4)

    assert found is not None
    assert run.sleeps == [0.5, 1.0, 2.0, 0.5]


def test_nothing_found_by_the_deadline_returns_none_after_a_last_lookup(
    provider: LocalProvider, tmp_path: Path
) -> None:
    """A create that never lands: the loop waits out exactly the window (capped waits,
    doubling up to 10 s) and answers None, so the caller reports it unconfirmed."""
    run = Run(provider, tmp_path)

    assert confirm(run, within=30) is None
    assert run.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 4.5]
    assert sum(run.sleeps) == 30


def test_a_run_that_lost_its_lock_stops_looking(provider: LocalProvider, tmp_path: Path) -> None:
    """Between lookups the lock is re-checked: a run whose lock was taken over stops at once
    (it may not go on to create) instead of waiting out the window."""
    run = Run(provider, tmp_path, lock_lost_after=2)

    with pytest.raises(StateLockedError):
        confirm(run, within=60)
    assert run.sleeps == [0.5, 1.0]
