"""The lookup by key that keeps a lost or unsure create from being paid for twice.

``find_batch_by_key`` runs here against the real local engine in this process (the provider
``type: local`` drives), its batches dated back in the engine's own database; the end-to-end
runs are in tests/test_state_lost.py, tests/test_crash_safety.py and tests/test_adoption.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from probes import ProbedServer
from scripted_server import ScriptedServer, json_answer
from servers import request_lines
from workspaces import SENTINEL_KEY

from batchspec.core.batches import batch_metadata, metadata_for_key
from batchspec.core.reconcile.adopt import window_seconds
from batchspec.errors import ProviderError
from batchspec.providers import base
from batchspec.providers.base import ORDER_SLACK, BatchListing, RemoteBatch, find_batch_by_key
from batchspec.providers.local import LocalProvider
from batchspec.providers.openai import OpenAIProvider

KEY = "triage/abc123/0/1"


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[LocalProvider]:
    with LocalProvider("here", tmp_path / "engine") as p:
        yield p


def make_batch(
    provider: LocalProvider, tmp_path: Path, metadata: dict[str, str], age: int
) -> tuple[str, int]:
    """A batch carrying ``metadata``, dated ``age`` seconds back: (its id, its created_at)."""
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in request_lines(1)))
    upload = provider.upload_file(path, filename="in.jsonl")
    batch = provider.create_batch(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata,
    )
    with provider.engine.store.write() as db:
        db.execute("UPDATE batches SET created_at = created_at - ? WHERE id = ?", (age, batch.id))
        [(created,)] = db.execute("SELECT created_at FROM batches WHERE id = ?", (batch.id,))
    return batch.id, int(created)


@pytest.mark.parametrize(
    ("window", "seconds"),
    [("24h", 86_400), ("48h", 172_800), ("1h", 3_600), ("7d", 604_800), ("2d", 172_800)],
)
def test_window_seconds_reads_hours_and_days(window: str, seconds: int) -> None:
    """The look-back before a first create spans the whole completion window: a window read
    too short misses a batch a lost state made earlier, and it is created (and paid) again."""
    assert window_seconds(window) == seconds


@pytest.mark.parametrize("window", ["", "h", "24", "24m", "x1d"])
def test_window_seconds_falls_back_to_a_day(window: str) -> None:
    """A form the schema does not allow still looks back a full day, never zero seconds."""
    assert window_seconds(window) == 86_400


def test_the_key_travels_whole_and_beside_the_users_metadata() -> None:
    """A batch carries all four parts of its recorded key next to the user's own pairs, so
    a later run recognises it; the key's parts are taken from the recorded key as they are."""
    assert metadata_for_key(KEY) == {
        "batchspec_resource": "triage",
        "batchspec_spec": "abc123",
        "batchspec_shard": "0",
        "batchspec_attempt": "1",
    }

    class Res:
        metadata = {"team": "ml"}

    class Row:
        key = KEY

    assert batch_metadata(Res(), Row()) == {"team": "ml", **metadata_for_key(KEY)}  # type: ignore[arg-type]


def test_only_a_batch_with_the_whole_key_is_found(provider: LocalProvider, tmp_path: Path) -> None:
    """Batches sharing three of the four key parts are passed over (adopting one would bind
    the intent to another shard's or attempt's answers); the one with the whole key is found
    even behind them."""
    key = metadata_for_key(KEY)
    own, _ = make_batch(provider, tmp_path, key, 60)
    for part in key:
        make_batch(provider, tmp_path, {k: v for k, v in key.items() if k != part}, 0)
    make_batch(provider, tmp_path, {**key, "batchspec_attempt": "2"}, 0)

    found = find_batch_by_key(provider, key, since=0, page_size=2)

    assert found.batch is not None and found.batch.id == own
    assert (found.listed, found.stopped_at_window) == (6, False)
    missing = find_batch_by_key(provider, {**key, "batchspec_shard": "9"}, since=0)
    assert (missing.batch, missing.listed, missing.stopped_at_window) == (None, 6, False)


def test_a_batch_made_at_the_edge_of_the_window_is_still_found(
    provider: LocalProvider, tmp_path: Path
) -> None:
    """A keyed batch created exactly at ``since`` is inside the window and adopted; one second
    earlier it is outside and not taken, but the scan reads on past it (a newest-first
    listing may list a batch up to ``ORDER_SLACK`` seconds newer after it); older than the
    window by more than that, the scan stops there and says it stopped at the window."""
    key = metadata_for_key(KEY)
    own, created = make_batch(provider, tmp_path, key, 3600)

    at_edge = find_batch_by_key(provider, key, since=created)
    past_edge = find_batch_by_key(provider, key, since=created + 1)
    past_slack = find_batch_by_key(provider, key, since=created + ORDER_SLACK + 1)

    assert at_edge.batch is not None and at_edge.batch.id == own
    assert (at_edge.listed, at_edge.stopped_at_window) == (1, False)
    assert (past_edge.batch, past_edge.listed, past_edge.stopped_at_window) == (None, 1, False)
    assert (past_slack.batch, past_slack.listed, past_slack.stopped_at_window) == (None, 1, True)


def test_a_newest_first_listing_a_moment_out_of_order_is_still_read_as_newest_first(
    scripted: ScriptedServer,
) -> None:
    """Batches made within moments of each other may be listed a second out of order: that
    does not make the listing one of no known order (read to its end, up to 10,000 batches),
    and the scan still stops at the window."""
    key = metadata_for_key(KEY)
    now = int(time.time())
    rows = [
        {
            "id": f"b{i}",
            "status": "completed",
            "created_at": now - 10 - i + 2 * (i % 2),
            "metadata": {},
        }
        for i in range(20)
    ] + [
        {"id": f"old{i}", "status": "completed", "created_at": now - 7200 - i, "metadata": {}}
        for i in range(50)
    ]
    scripted.script(json_answer(200, {"object": "list", "data": rows, "has_more": False}))
    provider = OpenAIProvider("srv", base_url=scripted.v1, api_key=None, max_retries=0)

    found = find_batch_by_key(provider, key, since=now - 3600)

    assert (found.batch, found.listed, found.stopped_at_window) == (None, 21, True)


@pytest.mark.parametrize(
    "unset",
    [
        pytest.param(0, id="zero"),
        pytest.param("0001-01-01T00:00:00Z", id="go-zero-time"),
        pytest.param("1970-01-01T00:00:00Z", id="epoch"),
    ],
)
def test_a_batch_listed_with_an_unset_creation_time_does_not_end_the_scan(
    scripted: ScriptedServer, unset: object
) -> None:
    """A listing (newest first) that dates a batch with a placeholder for "not set" (0, or a
    Go server's zero time) before the key's batch: the placeholder is no date, so the scan
    reads on and finds the key. Taken as a date, the scan stopped there, before the window,
    as if the key had never been made, and its batch was created, and paid for, again."""
    key = metadata_for_key(KEY)
    now = int(time.time())
    rows = [
        {"id": "batch_other", "status": "completed", "created_at": unset, "metadata": {}},
        {"id": "batch_ours", "status": "in_progress", "created_at": now - 60, "metadata": key},
    ]
    scripted.script(json_answer(200, {"object": "list", "data": rows, "has_more": False}))
    provider = OpenAIProvider("srv", base_url=scripted.v1, api_key=None, max_retries=0)

    found = find_batch_by_key(provider, key, since=now - 3600)

    assert found.batch is not None and found.batch.id == "batch_ours"
    assert (found.listed, found.stopped_at_window) == (2, False)


def test_a_listing_seen_oldest_first_is_read_on_past_an_old_batch(
    scripted: ScriptedServer,
) -> None:
    """An OpenAI-compatible server that lists oldest first (whatever OpenAI documents): the
    batch after the first old one is newer, so the listing is read on, and the key's batch
    at its end is found. Taken as newest first, the scan stopped at the first old batch as
    if at the window's edge, and the key's batch was created, and paid for, again."""
    key = metadata_for_key(KEY)
    now = int(time.time())
    rows = [
        {"id": "batch_old", "status": "completed", "created_at": now - 7200, "metadata": {}},
        {"id": "batch_old_key", "status": "completed", "created_at": now - 7100, "metadata": key},
        {"id": "batch_ours", "status": "in_progress", "created_at": now - 60, "metadata": key},
    ]
    scripted.script(json_answer(200, {"object": "list", "data": rows, "has_more": False}))
    provider = OpenAIProvider("srv", base_url=scripted.v1, api_key=None, max_retries=0)

    found = find_batch_by_key(provider, key, since=now - 3600)

    assert found.batch is not None and found.batch.id == "batch_ours"
    assert (found.listed, found.stopped_at_window) == (3, False)


@pytest.mark.parametrize(
    "body",
    [pytest.param({"detail": "busy"}, id="a-notice"), pytest.param({"data": None}, id="null")],
)
def test_a_listing_answered_200_with_no_data_list_fails_the_lookup(
    scripted: ScriptedServer, body: dict[str, object]
) -> None:
    """A 200 whose JSON object holds no ``data`` list (a gateway's notice, an error sent
    without an error status) is not an empty listing: the lookup raises, naming it. Read as
    one, it ended the scan with the key absent, and the key's batch was created, and paid
    for, again."""
    scripted.script(then=json_answer(200, body))
    provider = OpenAIProvider("srv", base_url=scripted.v1, api_key=None, max_retries=0)
    with pytest.raises(ProviderError, match="not a listing"):
        find_batch_by_key(provider, metadata_for_key(KEY), since=0)


def test_a_listing_that_failed_half_way_starts_again_and_still_finds_the_key(
    tmp_path: Path, server: Callable[..., ProbedServer]
) -> None:
    """A listing whose second page could not be read raises; the next lookup on it reads
    the listing again and finds the key's batch on that page. Taken as a listing that had
    ended, it answered "no batch", and the batch was created, and paid for, again."""
    srv = server()
    provider = OpenAIProvider("srv", base_url=srv.v1, api_key=SENTINEL_KEY, max_retries=0)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in request_lines(1)))
    file_id = provider.upload_file(path, filename="in.jsonl").id
    made = [
        provider.create_batch(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=metadata_for_key(key),
        )
        for key in (KEY, "other/abc123/0/1")
    ]
    listing = BatchListing(provider, page_size=1)  # newest first: the key's is page 2
    assert listing.find_by_key(metadata_for_key("other/abc123/0/1"), since=0).batch
    srv.probe.refuse(r"^GET /v1/batches$", 500, {"error": {"message": "down"}})
    with pytest.raises(ProviderError):  # page 2
        listing.read_back_to(0)
    srv.probe.refusals.clear()
    found = listing.find_by_key(metadata_for_key(KEY), since=0)
    assert found.batch is not None and found.batch.id == made[0].id


class _EndlessListing:
    """A provider whose newest-first listing never ends: a fresh batch, dated now, on every
    page (fresh cursors each time, so no cursor comes back)."""

    name = "endless"
    lists_newest_first = True

    def __init__(self) -> None:
        self.listed = 0

    def list_batches(
        self, *, page_size: int = 100, after: str | None = None
    ) -> Iterator[RemoteBatch]:
        while True:
            self.listed += 1
            assert self.listed < 1_000, "paged for ever"
            yield RemoteBatch(
                id=f"batch_{self.listed}", status="completed", created_at=int(time.time())
            )


def test_a_newest_first_listing_that_never_ends_fails_the_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A listing with fresh rows and cursors on every page, never reaching a batch older
    than the window: the lookup fails after ``NEWEST_FIRST_SCAN_MAX`` batches, saying so,
    and takes the key as neither found nor absent. It paged for ever, holding the run and
    its memory, until CI killed it."""
    monkeypatch.setattr(base, "NEWEST_FIRST_SCAN_MAX", 20, raising=False)
    provider = _EndlessListing()
    with pytest.raises(ProviderError, match="never ends"):
        find_batch_by_key(provider, metadata_for_key(KEY), since=time.time() - 3600)  # type: ignore[arg-type]
    assert provider.listed <= 22
