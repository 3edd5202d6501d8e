"""Admission: a provider's `maxInFlightBatches` caps the batches batchspec keeps in flight on
it; the rest stay queued as intents and are submitted as capacity frees up, never failed.

A thread watches the `batchspec serve` process through the official openai SDK while apply
runs and records the most non-terminal batches it ever saw at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# imported before the watcher thread starts: the openai SDK peeks at sys.modules['httpx'],
# and apply importing it at the same time would show the thread a half-initialised module
import httpx  # noqa: F401
import pytest
from serve_faults import apply_wait, received_batches, serve_processes, served_workspace
from workspaces import KEY_ENV, ResourceSpec, run_cli

TERMINAL = {"completed", "failed", "expired", "cancelled"}
SLOW = ("--upstream-latency", "0.05", "--concurrency", "2")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_processes(tmp_path)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-not-checked")


class InFlightWatcher:
    """Lists the server's batches every few ms; ``peak`` is the most seen in flight at once."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.peak = 0
        self.snapshots = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

        self.error: BaseException | None = None

    def look(self) -> None:
        statuses = [b.status for b in self.client.batches.list(limit=100)]
        self.peak = max(self.peak, sum(s not in TERMINAL for s in statuses))
        self.snapshots += 1

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.look()
                self._stop.wait(0.005)
        except BaseException as err:  # surfaced by __exit__
            self.error = err

    def __enter__(self) -> InFlightWatcher:
        self.look()  # the SDK's lazy imports happen here, not racing apply's thread
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.error is not None:
            raise self.error


def shards(per_batch: int) -> dict[str, Any]:
    return {"limits": {"maxRequestsPerBatch": per_batch}}


def test_one_in_flight_at_a_time_and_all_complete(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """maxInFlightBatches 1 with 3 shards: the server never holds more than one unfinished
    batch, each shard is created only after the previous one finished, and all complete."""
    srv = serve(*SLOW)
    ws = served_workspace(
        tmp_path / "ws",
        srv,
        ResourceSpec("queue", count=18, spec=shards(6)),
        maxInFlightBatches=1,
    )

    with InFlightWatcher(srv.client()) as watcher:
        code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    assert watcher.snapshots > 10
    assert watcher.peak == 1
    batches = received_batches(srv.client())
    assert [(b.shard, b.status) for b in batches] == [
        (0, "completed"),
        (1, "completed"),
        (2, "completed"),
    ]
    for done, following in zip(batches, batches[1:], strict=False):
        assert following.created_at >= done.raw.completed_at
    assert "maxInFlightBatches 1" in out
    assert [r["custom_id"] for r in ws.outputs("queue")] == ws.input_ids("queue")


def test_the_limit_is_per_provider_across_resources(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two resources of 2 shards each on one provider with maxInFlightBatches 2: never more
    than 2 in flight on the server, and both resources converge."""
    srv = serve(*SLOW)
    ws = served_workspace(
        tmp_path / "ws",
        srv,
        ResourceSpec("a", count=12, spec=shards(6), prefix="a"),
        ResourceSpec("b", count=12, spec=shards(6), prefix="b"),
        maxInFlightBatches=2,
    )

    with InFlightWatcher(srv.client()) as watcher:
        code, out, err = apply_wait(ws, capsys)

    assert code == 0, out + err
    assert watcher.peak == 2
    assert len(received_batches(srv.client())) == 4
    for name in ("a", "b"):
        assert [r["custom_id"] for r in ws.outputs(name)] == ws.input_ids(name)


def test_without_wait_the_rest_stays_queued_for_a_later_apply(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """apply without --wait submits what fits (1 of 3 shards), records the other two as
    queued intents and exits 0; plan shows them queued; a later apply submits them."""
    srv = serve(*SLOW)
    ws = served_workspace(
        tmp_path / "ws",
        srv,
        ResourceSpec("later", count=9, spec=shards(3)),
        maxInFlightBatches=1,
    )

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, out + err
    assert len(received_batches(srv.client())) == 1
    # the first shard that finds no capacity ends the resource's pass, said once
    assert out.count("waits:") == 1
    assert "shard 2 attempt 1 waits: 1 batch(es) in flight on srv (maxInFlightBatches 1)" in out
    with ws.store() as store:
        rows = store.batches()
    assert [(r.shard, r.remote_id is None) for r in rows] == [(0, False), (1, True), (2, True)]
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "queued" in out

    code, out, err = apply_wait(ws, capsys)
    assert code == 0, out + err
    assert [b.status for b in received_batches(srv.client())] == ["completed"] * 3
    assert [r["custom_id"] for r in ws.outputs("later")] == ws.input_ids("later")


def test_capacity_held_by_an_unselected_resource_is_freed_by_polling_it(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --select, a resource queued behind another resource's batch (not selected) still
    gets its turn: apply polls the batch holding the capacity until it finishes."""
    srv = serve(*SLOW)
    ws = served_workspace(
        tmp_path / "ws",
        srv,
        ResourceSpec("a", count=4, prefix="a"),
        ResourceSpec("b", count=4, prefix="b"),
        maxInFlightBatches=1,
    )
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--select", "a"], capsys)
    assert code == 0, out + err  # a's batch is in flight now, holding the only slot

    code, out, err = apply_wait(ws, capsys, "--select", "b", "--timeout", "60")

    assert code == 0, out + err
    assert [r["custom_id"] for r in ws.outputs("b")] == ws.input_ids("b")
    with ws.store() as store:
        [a_batch] = [b for b in store.batches() if b.key.startswith("a/")]
        assert a_batch.status == "completed"  # polled by the run that applied only b
