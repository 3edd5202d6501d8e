"""A pass's provider reads, done ahead and side by side: list-based polls and downloads.

Before a pass advances its resources one by one, ``prefetch_pass`` asks the providers, in a
bounded thread pool, what the serial steps are about to ask: where each in-flight batch
stands, and the output and error files of each batch that is terminal and not yet collected.
It promises:

* **Reads only, nothing recorded.** Workers touch the network and the blob store (whose
  writes are content-addressed and atomic), never the state store: the poll and collect steps
  record what was fetched on the main thread, in resource order, exactly as a serial pass
  would, so the audit log, the progress output and every invariant are unchanged. A fetch
  that failed is kept as its exception and raised by the step that would have made the call.
* **List, then retrieve.** Where a provider lists batches with their full objects as they
  are now (OpenAI, Azure, ``batchspec serve``), the in-flight batches of that provider are
  polled with ``ceil(N/100)`` list calls, read side by side (``listing_segments``): our
  batches, newest first by row id, are cut into segments of 100, and segment k reads the
  listing from the cursor of our batch that ends segment k - 1 (segment 0 from the top), so
  the pages of 1,000 batches cost one round trip, not ten. A segment reads on, page after
  page, until it has seen all of its batches, or the batch the next segment starts after,
  or two pages (``SEGMENT_PAGES``); every batch we wait for that it sees is taken, so other
  clients' batches listed among ours and ours created a little out of order cost at most a
  few more calls. A batch no segment showed, or one showed ended but without any file id
  (``adopt.listed_whole``), is retrieved by id; so are a segment's batches when its cursor
  is refused (a 4xx answered at once): only that segment's, and the listing is read again
  next pass. A segment that fails after its client's retries (5xx, 429, a timeout) fails
  the listing, as the top segment's failure does (see below). A
  LiteLLM proxy (``litellmProvider`` or ``litellmModel`` set, ``LITELLM_OPTIONS``) is polled by
  id only: with a database, LiteLLM lists batches from its own table, refreshed only when a
  batch is retrieved or by its hourly cost job (``PROXY_BATCH_POLLING_INTERVAL``; never with
  ``PROXY_BATCH_POLLING_ENABLED=false``), so a batch that has ended stays listed
  ``in_progress`` for up to an hour, or for ever: each of its batches is retrieved by id.
  A provider whose listing failed from the top, or in any segment after its client's
  retries (a listing slower than the timeout costs them all), is not listed again for the
  rest of the run (``RunContext.unlisted``): each later pass retrieves its batches by id
  at once. So is one whose listing is behind its batches: each pass also retrieves one
  listed batch by id (a different one each pass, beside the listing's calls), and a listing
  that shows it running after it has ended, on two passes, is not taken
  (``_listing_is_behind``, a ``warning`` says so). A check whose read failed takes the
  listing's copy; so does one whose read says running where the listing shows the batch
  ended (the read was answered before it ended: ``_ended_since_read``).
* **Bounded.** At most ``parallelism`` calls are in flight in all, and at most a provider's
  ``maxConcurrency`` to that provider, counting the requests the serial steps send on the
  main thread while the pool's calls run (``BoundedCalls.admitting``: each takes a place
  under the same limit, so a retry uploaded while downloads are under way waits its turn).
  Only OpenAI-compatible clients are shared with the
  workers (``PREFETCH_TYPES``); the in-process ``local`` engine and the adapters that keep a
  journal (Anthropic, Gemini, Together) are left to the serial steps.
* **Retired batches too.** The batches of generations no longer active that the pass drains
  (``drain``: superseded, cancelled, pruned, still stopping or not yet collected) are polled
  and downloaded with the others, in the same calls and the same pool.
* **Files only for terminal batches**, and each file once per pass (a file whose download
  failed earlier in the run only once its pause is over: ``collect``). A download's error is
  kept in its future: the collect step that takes it records it for that resource alone. A
  listing starts the downloads of the terminal batches on each page as the page arrives, so
  they overlap the pages still to come. The pass does not wait for the downloads: the
  collect step of each resource waits for its own files, so the first resources are recorded
  while the later ones still download.

The same pool (``BoundedCalls``, with its per-provider ``AdaptiveLimit``) carries the calls a
pass, or a command, sends ahead of its serial steps that write: ``pipeline.submit_pass``'s
uploads and creates (``pipeline.SUBMIT_TYPES``), and ``cancel.cancel_ahead``'s cancels
(``batchspec cancel``, ``apply --prune``, ``apply --replace``, a new spec superseding an old
one) on the providers reads are fetched ahead from (``shares_client``).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

from batchspec.core.reconcile.adopt import listed_whole
from batchspec.core.reconcile.collect import download_to_store
from batchspec.core.reconcile.context import Prefetched, RunContext
from batchspec.core.reporting import Progress
from batchspec.errors import ProviderError
from batchspec.providers.base import (
    RemoteBatch,
    RetryNotice,
    listen_for_retries,
    listen_for_throttles,
    open_call_gate,
    reset_call_gate,
    reset_deadline,
    reset_retry_listener,
    reset_stop,
    reset_throttle_listener,
    stop_with,
    within,
)
from batchspec.state.store import BatchRow
from batchspec.wire.batch_status import TERMINAL_STATUSES
from batchspec.workspace.manifest import Resource

DEFAULT_PARALLELISM = 16
#: the most calls a pass runs at once (``--parallelism``, ``maxConcurrency``): each is a worker
#: thread, and past a few hundred more threads buy no speed (the round trip bounds a pass,
#: docs/faq.md) while each costs memory and a connection; the CLI and the project schema
#: refuse more, and a caller of the library asking for more gets this many
MAX_PARALLELISM = 256
LIST_PAGE_SIZE = 100
#: pages one segment of a listing reads at most (``listing_segments``): its own batches'
#: page and one more, for other batches listed among ours; past it, what is missing is
#: retrieved by id
SEGMENT_PAGES = 2
#: provider types whose list endpoint returns whole batch objects, paginated with ``after``
LISTING_TYPES = frozenset({"openai", "azure", "anthropic"})
#: options that say a provider is a LiteLLM proxy, whose listing may be stale (see above)
LITELLM_OPTIONS = ("litellmProvider", "litellmModel")
#: provider types whose clients keep no state of their own between calls (no journal), so
#: worker threads may share them; the others are left to the serial steps
PREFETCH_TYPES = frozenset({"openai", "azure", "groq", "anthropic"})

T = TypeVar("T")
#: makes ``_download``'s "not started yet? start it" one step: the segments of a listing run
#: on several workers, and two that both see a batch ended must not download its file twice
_DOWNLOAD_STARTING = threading.Lock()
#: a call waiting for a worker and a place: (rank, sequence, call, its future)
_Queued = tuple[tuple[int, int], int, Callable[[], Any], Future[Any]]


class AdaptiveLimit:
    """How many calls may run at once to one provider: AIMD between 1 and ``ceiling``.

    A call that hears a throttle (a 429 or ``Retry-After``, ``providers.base.report_throttle``)
    halves the limit, once per round: a throttle heard by a call that started before the last
    decrease (the same burst) does not halve it again. Every call that ends without one adds
    ``1/limit``, so the limit grows back by about one per limit's worth of calls. Calls waiting
    for a place wait here; calls already running finish (their own retries included), so the
    calls in flight shrink as they end. ``history`` keeps every change (time, limit).
    """

    def __init__(
        self,
        ceiling: int,
        clock: Callable[[], float] = time.monotonic,
        on_release: Callable[[], None] = lambda: None,
    ) -> None:
        self.ceiling = max(1, ceiling)
        self.limit = float(self.ceiling)
        self.active = 0
        self.peak = 0
        self._clock = clock
        self._round = 0
        self._cond = threading.Condition()
        self._on_release = on_release  # told (outside the lock) each time a place frees
        self.history: list[tuple[float, float]] = [(clock(), self.limit)]
        #: calls that heard a throttle (each waited and was retried by its client)
        self.throttled_calls = 0

    def acquire(self) -> int:
        """Wait for a place; return the round the call starts in."""
        with self._cond:
            while self.active >= max(1, int(self.limit)):
                self._cond.wait()
            return self._take()

    def try_acquire(self) -> int | None:
        """Take a place if one is free now (the round the call starts in), else None."""
        with self._cond:
            if self.active >= max(1, int(self.limit)):
                return None
            return self._take()

    def _take(self) -> int:
        self.active += 1
        self.peak = max(self.peak, self.active)
        return self._round

    def throttled(self, started_in: int) -> int:
        """A call of round ``started_in`` was told to slow down; return the current round."""
        with self._cond:
            if started_in == self._round:
                self.limit = max(1.0, self.limit / 2)
                self._round += 1
                self.history.append((self._clock(), self.limit))
            return self._round

    @property
    def lowest(self) -> int:
        """The fewest calls it ever let run at once."""
        return max(1, int(min(value for _, value in self.history)))

    def release(self, *, throttled: bool, ran: bool = True) -> None:
        """Free a place; a call that ``ran`` without a throttle grows the limit."""
        with self._cond:
            self.active -= 1
            self.throttled_calls += throttled
            if ran and not throttled and self.limit < self.ceiling:
                self.limit = min(float(self.ceiling), self.limit + 1 / self.limit)
                self.history.append((self._clock(), self.limit))
            self._cond.notify_all()
        self._on_release()

    @contextmanager
    def place(self, started_in: int | None = None) -> Iterator[None]:
        """Hold a place while the block runs, hearing its throttles (on this thread); the
        requests the block sends are not admitted again (``providers.base.call_place``).
        ``started_in``: the place was already taken (``try_acquire``) in that round."""
        round_ = [self.acquire() if started_in is None else started_in]
        heard = [False]

        def on_throttle() -> None:
            heard[0] = True
            round_[0] = self.throttled(round_[0])

        token = listen_for_throttles(on_throttle)
        gate = open_call_gate(None)
        try:
            yield
        finally:
            reset_call_gate(gate)
            reset_throttle_listener(token)
            self.release(throttled=heard[0])


class BoundedCalls:
    """A thread pool of ``parallelism`` workers with an adaptive cap on calls per provider
    (``AdaptiveLimit``: at most the provider's ``maxConcurrency``, shrinking on 429).

    Calls start in the order they were submitted, except those given an ``order``: they
    start after the others, lowest ``order`` first. A pass gives its downloads the order the
    main thread takes them in (resource order), whatever order a listing found them in, so
    the first resource's file is not the last one fetched. A worker takes the first call
    whose provider has a free place: a provider at its cap keeps its own calls waiting, not
    the workers, so the calls to other providers behind them in the order start at once."""

    def __init__(
        self,
        parallelism: int,
        cap_for: Callable[[str], int | None],
        *,
        on_retry: Callable[[RetryNotice], None] | None = None,
        deadline: float | None = None,
    ) -> None:
        self.parallelism = max(1, min(parallelism, MAX_PARALLELISM))
        self._deadline = deadline  # the run's --timeout (``time.monotonic``), for each call
        self._cap_for = cap_for
        self._on_retry = on_retry  # hears, on the workers, of calls about to be retried
        self.limits: dict[str, AdaptiveLimit] = {}
        self._pool = ThreadPoolExecutor(self.parallelism, thread_name_prefix="batchspec-io")
        self._queues: dict[str, list[_Queued]] = {}  # per provider, first to start first
        self._ready = threading.Condition()  # guards the queues; told when a place frees
        self._sequence = itertools.count()
        self._limits_lock = threading.Lock()
        self._stopping = threading.Event()  # set when the pool closes on an error or Ctrl-C
        #: per provider, the first call that found it down (``ProviderError.provider_down``:
        #: unreachable, or its gateway answering 502/503/504, through all its retries) or
        #: refusing calls (``rate_limited``: 429 through all of them)
        self._down: dict[str, ProviderError] = {}
        #: calls whose failure says nothing of the provider's other calls (``submit``)
        self._quiet: set[Future[Any]] = set()

    def submit(
        self,
        provider: str,
        call: Callable[[], T],
        order: int | None = None,
        *,
        down_if_failed: bool = True,
    ) -> Future[T]:
        """Queue ``call``. Once a call to ``provider`` has failed with it down or rate limiting
        through all its retries, its calls still queued fail without being sent, with that
        failure (the pass fails on it anyway); ``down_if_failed`` False: this call's failure
        does not count (a listing, which a gateway may time out with a 504 while it answers
        each read)."""
        self.limit_for(provider)
        future: Future[T] = Future()
        if not down_if_failed:
            self._quiet.add(future)
        seq = next(self._sequence)
        rank = (0, seq) if order is None else (1, order)
        with self._ready:
            heapq.heappush(self._queues.setdefault(provider, []), (rank, seq, call, future))
            self._ready.notify()  # a worker waiting for a place may start this one
        self._pool.submit(self._run_next)  # one task per call: it runs the first startable
        return future

    def _run_next(self) -> None:
        with self._ready:
            while True:
                taken = self._take_startable()
                if taken is not None:
                    break
                if not any(self._queues.values()):
                    return
                self._ready.wait()
        provider, started_in, call, future = taken
        limit = self.limits[provider]
        if not future.set_running_or_notify_cancel():
            limit.release(throttled=False, ran=False)
            return
        down = self._down.get(provider)
        if down is not None:  # not sent: it would only wait out every retry again
            limit.release(throttled=False, ran=False)
            future.set_exception(_not_sent(provider, down))
            return
        stop = stop_with(self._stopping)  # a retry's wait ends when the pool closes
        heard = listen_for_retries(self._on_retry)
        bound = within(self._deadline)
        try:
            with limit.place(started_in):
                result = call()
        except BaseException as err:  # noqa: BLE001 - handed to whoever takes the future
            if _unavailable(err) and future not in self._quiet:
                self._down.setdefault(provider, err)
            future.set_exception(err)
        else:
            future.set_result(result)
        finally:
            reset_deadline(bound)
            reset_retry_listener(heard)
            reset_stop(stop)

    def _take_startable(self) -> tuple[str, int, Callable[[], Any], Future[Any]] | None:
        """The first queued call (by rank) whose provider has a place free, its place taken."""
        heads = sorted((queue[0], name) for name, queue in self._queues.items() if queue)
        for _, name in heads:
            started_in = self.limits[name].try_acquire()
            if started_in is not None:
                _, _, call, future = heapq.heappop(self._queues[name])
                return name, started_in, call, future
        return None

    def _wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    @contextmanager
    def admitting(self, may_wait: Callable[[], bool] = lambda: True) -> Iterator[None]:
        """While the block runs, each provider request sent on this thread (a serial step's
        upload, create, lookup, poll or download) takes a place under the same limit as the
        pool's calls, so the calls in flight to a provider never exceed its cap.

        ``may_wait`` is asked when no place is free: False (the thread holds the state's
        writer lock, which another runner would wait on) sends the request at once, over the
        cap by this one, rather than hold the lock through other calls' downloads."""

        def gate(provider: str) -> AbstractContextManager[object]:
            limit = self.limit_for(provider)
            started_in = limit.try_acquire()
            if started_in is not None:
                return limit.place(started_in)
            return limit.place() if may_wait() else nullcontext()

        token = open_call_gate(gate)
        try:
            yield
        finally:
            reset_call_gate(token)

    def limit_for(self, provider: str) -> AdaptiveLimit:
        # asked from the workers too (a listing starts downloads): one limit per provider
        with self._limits_lock:
            if provider not in self.limits:
                cap = self._cap_for(provider)
                width = self.parallelism if cap is None else max(1, min(int(cap), self.parallelism))
                self.limits[provider] = AdaptiveLimit(width, on_release=self._wake)
            return self.limits[provider]

    def __enter__(self) -> BoundedCalls:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Queued calls are dropped *before* the wait for the workers: a worker waiting for a
        # place would otherwise start them as the calls in flight end, so a pass stopped by
        # Ctrl-C (or an error) went on uploading and creating batches nobody would record.
        # Stopped so, the calls in flight give up their waits before a retry (``CallStopped``)
        # instead of holding the run through every Retry-After they still had to wait.
        if exc_type is not None:
            self._stopping.set()
        self._drop_queued()
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
        except BaseException:  # Ctrl-C while the workers end: stop them as above, not later
            self._stopping.set()
            self._drop_queued()
            raise
        self._drop_queued()  # any a listing still in flight queued meanwhile

    def stop(self) -> None:
        """Stop as a pass stopped by Ctrl-C does, before the caller waits for the calls it
        sent: the calls not started yet are dropped (their futures cancelled), and those in
        flight give up before a retry (``CallStopped``)."""
        self._stopping.set()
        self._drop_queued()

    def _drop_queued(self) -> None:
        """Cancel every call not started yet (its future says so); workers waiting for a
        place find nothing left and end."""
        with self._ready:
            for queue in self._queues.values():
                for _, _, _, future in queue:
                    future.cancel()
            self._queues.clear()
            self._ready.notify_all()


def _unavailable(err: BaseException) -> TypeGuard[ProviderError]:
    """Whether ``err`` says its provider takes no call now: down, or rate limiting, through
    all the call's retries (a run stops on it, or ``apply --wait`` waits it out)."""
    return isinstance(err, ProviderError) and (err.provider_down or err.rate_limited)


def _not_sent(provider: str, down: ProviderError) -> ProviderError:
    """The failure of a call not sent because another call of the pass found ``provider``
    down, or rate limiting, through all its retries: a pass with many batches in flight
    otherwise asked for each of them in turn, each call waiting out every retry (an hour for
    a thousand), before the run could say so. Nothing was sent (a create made no batch)."""
    return ProviderError(
        f"{down.message} (the calls to {provider} still queued in this pass were not sent)",
        status=down.status,
        code=down.code,
        retryable=down.retryable,
        sent_nothing=True,
        provider_down=down.provider_down,
        rate_limited=down.rate_limited,
    )


def report_throttles(ctx: RunContext, calls: BoundedCalls) -> None:
    """At the end of a pass, on the main thread: one ``throttled`` event per provider that
    answered some of its calls with 429 or Retry-After, saying how many and how far its
    calls in flight went down. A rate-limited pass is slow and says nothing while it waits,
    so its log says why afterwards (where it comes is fixed; only what it counts is timing)."""
    for provider, limit in sorted(calls.limits.items()):
        if not limit.throttled_calls:
            continue
        now = max(1, int(limit.limit))
        ctx.report(
            Progress(
                "throttled",
                None,
                f"{provider} rate-limited {limit.throttled_calls} call(s) in this pass (429 or "
                f"Retry-After): each waited and was retried; calls in flight to it went down "
                f"to {limit.lowest} of {limit.ceiling} ({now} now). If this keeps up, give it a "
                "lower maxConcurrency (or a lower --parallelism).",
                {
                    "provider": provider,
                    "throttled_calls": limit.throttled_calls,
                    "lowest_limit": limit.lowest,
                    "limit": now,
                    "ceiling": limit.ceiling,
                },
            )
        )


def prefetch_pass(
    ctx: RunContext,
    resources: Sequence[Resource],
    calls: BoundedCalls,
    retired: Sequence[BatchRow] = (),
) -> None:
    """Fill ``ctx.prefetched`` for this pass: polls first, then the files they made due;
    ``retired``: the batches of retired generations the pass drains (``drain``) too."""
    ctx.prefetched = Prefetched()
    # a retired batch the drain failed on this run waits out its pause (``drain_retired``)
    also = [b for b in retired if shares_client(ctx, b.provider) and ctx.download_due(b.id)]
    # in the order the pass takes them: the drain first, then resource by resource
    rows = [b for b in [*also, *_current_batches(ctx, resources)] if b.remote_id is not None]
    order = {(b.provider, b.remote_id or ""): rank for rank, b in enumerate(rows)}
    in_flight = [b for b in rows if b.status not in TERMINAL_STATUSES]
    observed = _poll_all(ctx, in_flight, calls, order)
    for rank, row in enumerate(rows):
        seen = observed.get(row.id)
        if seen is not None and ctx.download_due(row.id):
            _download_files(ctx, calls, row.provider, seen, rank)
        elif (
            row.status in TERMINAL_STATUSES
            and row.collected_at is None
            and ctx.download_due(row.id)  # one that failed this run: after its pause
        ):
            for file_id in (row.output_file_id, row.error_file_id):
                _download(ctx, calls, row.provider, file_id, rank)


def _download_files(
    ctx: RunContext, calls: BoundedCalls, provider: str, seen: RemoteBatch, rank: int
) -> None:
    """Start the downloads of a batch seen terminal (a listing calls this as each page
    arrives, so the first downloads overlap the pages still to come)."""
    if seen.is_terminal:
        for file_id in (seen.output_file_id, seen.error_file_id):
            _download(ctx, calls, provider, file_id, rank)


def _download(
    ctx: RunContext, calls: BoundedCalls, provider: str, file_id: str | None, rank: int
) -> None:
    """Start one download, once a pass, ranked by when the pass takes it (``rank``); the
    collect step takes (waits for) it, so it starts before the downloads end."""
    key = (provider, file_id or "")
    with _DOWNLOAD_STARTING:
        if file_id and key not in ctx.prefetched.files:
            download = _downloader(ctx, provider, file_id)
            ctx.prefetched.files[key] = calls.submit(provider, download, order=rank)


def _current_batches(ctx: RunContext, resources: Iterable[Resource]) -> list[BatchRow]:
    """The batches of each resource's current generation on a provider worth prefetching
    (reads only: a few queries in all, ``StateStore.reading``)."""
    rows: list[BatchRow] = []
    with ctx.store.reading():
        for res in resources:
            if res.suspend:
                continue
            gen = ctx.store.find_generation(res.name, res.spec_hash)
            if gen is not None:
                batches = ctx.store.batches(gen.id)
                rows.extend(b for b in batches if shares_client(ctx, b.provider))
    return rows


def shares_client(ctx: RunContext, provider: str) -> bool:
    """Whether calls to ``provider`` may run on the pool's threads: its type is one of
    ``PREFETCH_TYPES`` and its client could be built (here, on the main thread)."""
    config = ctx.project.providers.get(provider)
    if config is None or config.type not in PREFETCH_TYPES:
        return False
    return provider_ready(ctx, provider)


def provider_ready(ctx: RunContext, provider: str) -> bool:
    """Whether the provider's client can be built; it is built here, on the main thread (the
    factory caches it, unguarded), or left to the step that raises why it cannot be."""
    try:
        ctx.provider_for(provider)
    except Exception:  # noqa: BLE001 - the step that needs it raises this in order
        return False
    return True


def _poll_all(
    ctx: RunContext,
    in_flight: Sequence[BatchRow],
    calls: BoundedCalls,
    order: Mapping[tuple[str, str], int],
) -> dict[int, RemoteBatch]:
    """Poll every in-flight batch (list first where the provider lists); by batch row id."""
    by_provider: dict[str, list[BatchRow]] = {}
    for row in in_flight:
        by_provider.setdefault(row.provider, []).append(row)
    listings = {
        name: [
            calls.submit(name, _lister(ctx, name, segment, calls, order), down_if_failed=False)
            for segment in listing_segments(rows)
        ]
        for name, rows in by_provider.items()
        if _lists(ctx, name) and len(rows) > 1 and name not in ctx.unlisted
    }
    # one batch of each listing, a different one each pass, is also read by id at the same
    # time: the check that the listing is not behind (``_listing_is_behind``)
    retrieves: dict[int, Future[RemoteBatch]] = {}
    checked: dict[str, BatchRow] = {}
    for name in listings:
        rows = by_provider[name]
        row = checked[name] = rows[ctx.listing_checks[name] % len(rows)]
        ctx.listing_checks[name] += 1
        retrieves[row.id] = calls.submit(name, _retriever(ctx, row))
    listed: dict[str, dict[str, RemoteBatch]] = {}
    for name, segments in listings.items():
        listed[name] = {}
        for index, future in enumerate(segments):
            try:
                _keep_ended(listed[name], future.result())
            except Exception as err:  # noqa: BLE001 - the retrieves below ask again, in order
                if index == 0 or _failed_after_retries(err):  # not a cursor refused at once
                    ctx.unlisted.add(name)  # the later passes of this run retrieve its batches
        if name in ctx.unlisted:
            continue
        row = checked[name]
        seen = listed[name].get(row.remote_id or "")
        if seen is not None and listed_whole(seen) and not _read(retrieves[row.id]):
            # the check's read failed: the listing's copy answers for the batch
            retrieves[row.id] = _settled(seen)
        elif _listing_is_behind(ctx, name, seen, retrieves[row.id]):
            listed[name] = {}
            ctx.unlisted.add(name)
        elif seen is not None and _ended_since_read(seen, retrieves[row.id]):
            # the read came before the batch ended: the listing's copy is the newer one (and
            # its files are downloading already); an ended batch never runs again
            retrieves[row.id] = _settled(seen)
    observed: dict[int, RemoteBatch] = {}
    for row in in_flight:
        assert row.remote_id is not None
        if row.id in retrieves:  # the listing's check
            continue
        seen = listed.get(row.provider, {}).get(row.remote_id)
        if seen is not None and listed_whole(seen):
            observed[row.id] = seen
            ctx.prefetched.polls[(row.provider, row.remote_id)] = seen
        else:
            retrieves[row.id] = calls.submit(row.provider, _retriever(ctx, row))
    for row in in_flight:
        if row.id in retrieves:
            result = _outcome(retrieves[row.id])
            ctx.prefetched.polls[(row.provider, row.remote_id or "")] = result
            if isinstance(result, RemoteBatch):
                observed[row.id] = result
    return observed


def _keep_ended(listed: dict[str, RemoteBatch], found: Mapping[str, RemoteBatch]) -> None:
    """Add a segment's batches to ``listed``; where two segments saw one batch, an ended copy
    is kept over a running one (a stale page, say a gateway's cache, may still show it
    running: an ended batch never runs again)."""
    for batch_id, batch in found.items():
        kept = listed.get(batch_id)
        if kept is None or not kept.is_terminal:
            listed[batch_id] = batch


def _failed_after_retries(err: Exception) -> bool:
    """Whether a segment's listing failed as a whole listing may (a 5xx, a 429 or a timeout
    its client retried, backoff and ``Retry-After`` waited, until it gave up), not by a
    refused cursor (a 4xx answered at once): the next pass would pay those retries again,
    and every pass after it, as a failing top would (``RunContext.unlisted``)."""
    return isinstance(err, ProviderError) and err.retryable


def _listing_is_behind(
    ctx: RunContext, provider: str, seen: RemoteBatch | None, check: Future[RemoteBatch]
) -> bool:
    """Whether ``provider``'s listing is behind its batches: it showed ``seen`` still running
    where the check's read by id says it has ended, on two passes of the run. Such a
    gateway (one that lists from its own table, refreshed later or never, as LiteLLM with a
    database does) keeps every batch in progress, and ``apply --wait`` waited to its timeout
    while the answers were ready. Then the listing is not read again this run: its batches
    are read one by one (said once, a ``warning``). Once is not enough: a batch that ended
    between the listing's read and the check's looks the same (the checked batch itself is
    taken from its read either way, so a listing behind costs one pass more, no answer)."""
    truth = _outcome(check)
    if seen is None or seen.is_terminal or not isinstance(truth, RemoteBatch):
        return False
    if not truth.is_terminal:
        return False
    ctx.listings_behind[provider] += 1
    if ctx.listings_behind[provider] < 2:
        return False
    ctx.report(
        Progress(
            "warning",
            None,
            f"{provider}'s batch listing is behind its batches: it lists batch {truth.id} "
            f"{seen.status} where reading the batch says {truth.status}; this run reads each "
            "of its batches by id instead of listing them",
            {"provider": provider, "batch": truth.id, "listed": seen.status, "read": truth.status},
        )
    )
    return True


def _ended_since_read(seen: RemoteBatch, check: Future[RemoteBatch]) -> bool:
    """Whether the listing shows the checked batch ended, whole, where the check's read by
    id (sent at the same time, answered first) says it is still running."""
    truth = _outcome(check)
    if not seen.is_terminal or not listed_whole(seen):
        return False
    return isinstance(truth, RemoteBatch) and not truth.is_terminal


def _read(future: Future[RemoteBatch]) -> bool:
    """Whether a read by id answered (waits for it)."""
    return isinstance(_outcome(future), RemoteBatch)


def _settled(value: RemoteBatch) -> Future[RemoteBatch]:
    future: Future[RemoteBatch] = Future()
    future.set_result(value)
    return future


def _lists(ctx: RunContext, provider: str) -> bool:
    """Whether ``provider``'s in-flight batches are polled with list calls: its type lists
    whole batch objects, and it is not a LiteLLM proxy (its listing may be stale)."""
    config = ctx.project.providers.get(provider)
    if config is None or config.type not in LISTING_TYPES:
        return False
    options = config.options or {}
    return not any(options.get(name) for name in LITELLM_OPTIONS)


@dataclass(frozen=True)
class ListingSegment:
    """One part of a provider's listing, read by one call chain of its own: from ``after``
    (None: the top) down to ``until`` (the next segment's cursor; None: the last segment),
    where the batches of ``own`` are expected; every wanted batch it sees is taken."""

    wanted: frozenset[str]
    own: frozenset[str]
    after: str | None
    until: str | None


def listing_segments(rows: Sequence[BatchRow]) -> list[ListingSegment]:
    """The segments the listing of ``rows`` (one provider's in-flight batches) is read in,
    side by side: the batches newest first (highest row id first: created in about that
    order), ``LIST_PAGE_SIZE`` to a segment, segment k starting after our batch at position
    ``k * LIST_PAGE_SIZE - 1``, the last of segment k - 1, which ends there. The segments
    tile the listing whatever else it holds (other teams' batches, ours created a little out
    of order), so a batch is seen by the segment whose part it is listed in."""
    newest_first = sorted(rows, key=lambda row: row.id, reverse=True)
    ids = list(dict.fromkeys(row.remote_id or "" for row in newest_first))
    wanted = frozenset(ids)
    size = LIST_PAGE_SIZE
    return [
        ListingSegment(
            wanted,
            frozenset(ids[start : start + size]),
            after=ids[start - 1] if start else None,
            until=ids[start + size - 1] if start + size < len(ids) else None,
        )
        for start in range(0, len(ids), size)
    ]


def _lister(
    ctx: RunContext,
    name: str,
    segment: ListingSegment,
    calls: BoundedCalls,
    order: Mapping[tuple[str, str], int],
) -> Callable[[], dict[str, RemoteBatch]]:
    def list_segment() -> dict[str, RemoteBatch]:
        found: dict[str, RemoteBatch] = {}
        missing = set(segment.own)
        listing = ctx.provider_for(name).list_batches(page_size=LIST_PAGE_SIZE, after=segment.after)
        for index, batch in enumerate(listing):
            if batch.id in segment.wanted:
                # a batch listed twice (a gateway's page mixing cached rows with current
                # ones) keeps its ended copy, as across segments: a stale running copy
                # after it left the batch in flight, its answers ready, pass after pass
                _keep_ended(found, {batch.id: batch})
                missing.discard(batch.id)
                _download_files(ctx, calls, name, batch, order[(name, batch.id)])
            if batch.id == segment.until or not missing:
                break  # the next segment reads on from here
            if index + 1 >= SEGMENT_PAGES * LIST_PAGE_SIZE:
                break  # the rest are past a page more than ours: retrieve what is missing
        return found

    return list_segment


def _retriever(ctx: RunContext, row: BatchRow) -> Callable[[], RemoteBatch]:
    remote_id = row.remote_id or ""
    return lambda: ctx.provider_for(row.provider).get_batch(remote_id)


def _downloader(ctx: RunContext, provider: str, file_id: str) -> Callable[[], str]:
    return lambda: download_to_store(ctx.provider_for(provider), file_id, ctx.blobs)


def _outcome(future: Future[Any]) -> Any:
    try:
        return future.result()
    except Exception as err:  # noqa: BLE001 - raised again by the step that needs it
        return err
