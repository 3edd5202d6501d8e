"""The executor: runs every unfinished batch's request lines against the upstream.

The worker owns one thread with its own asyncio event loop, so it runs the same way inside
``batchspec serve`` (next to uvicorn's loop, which stays responsive) and in-process under the
``local`` provider. Each active batch gets one driver task::

    validating ──validate──▶ in_progress ──run lines──▶ finalizing ──write files──▶ completed
         │                       │  (deadline passed)                 ▲
         └───────────────────────┴──────▶ expired  (unfinished lines: batch_expired)
    cancel (HTTP/API) ─▶ cancelling ─▶ cancelled   (unfinished lines: batch_cancelled)

Invariants:

- At most ``concurrency`` requests are in flight across all batches (one semaphore).
- A finished line is buffered and committed within ``commit_interval`` (on a thread, so
  the event loop keeps serving responses) together with its batch's counts; a line with a stored
  or buffered result is skipped when a batch resumes, so after a clean stop, or while commits
  fail (a full disk: the buffer is kept and committed later), no line is sent twice. After a
  crash, only lines that were in flight or finished within the last commit interval are sent
  again (the upstream gives no way to ask whether it saw a request).
- A clean stop (``stop``) sends no new lines, lets in-flight ones finish for up to
  ``drain_timeout`` seconds, commits, and leaves batches ``in_progress`` to resume.
- A cancel or an expiry sends no new lines and no further attempt, and lets the requests
  in flight answer for up to ``drain_timeout`` seconds: their answers are kept (in the output
  file, as OpenAI keeps what a cancelled batch finished), never dropped to be sent again.
- Each attempt is timed by ``request_timeout`` (by the upstream itself when it says
  ``times_requests``: a rotation does not count its wait for a rate limit).
- An unexpected exception while executing one line (a bug) fails that line alone with error
  code ``engine_error`` naming the exception type (the traceback goes to the log, once); the
  batch goes on and completes.
- Retries follow ``WorkerSettings.retry`` (``batchspec.wire.retry``, ``UPSTREAM_POLICY`` by
  default): 408, 429 and 5xx answers, timeouts and connection failures are retried up to
  ``max_attempts`` in all, after ``Retry-After`` when the upstream sent one, else exponential
  backoff with jitter; both are capped at the policy's ``max_delay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from batchspec.engine.jsonfast import dumps as _dumps
from batchspec.engine.jsonfast import loads as _loads
from batchspec.engine.store import LineResult, Store, StoredFile, Tokens, now
from batchspec.engine.upstreams import Upstream, UpstreamResponse, UpstreamUnreachable
from batchspec.wire.batch_status import TERMINAL_STATUSES
from batchspec.wire.inputs import DEFAULT_MAX_LINE_BYTES, iter_requests, scan_batch_input
from batchspec.wire.retry import UPSTREAM_POLICY, RetryPolicy

log = logging.getLogger("batchspec.engine")

T = TypeVar("T")
MAX_REQUESTS_PER_BATCH = 50_000


@dataclass(frozen=True)
class WorkerSettings:
    """How the worker executes; every duration is in seconds."""

    concurrency: int = 8
    request_timeout: float = 60.0
    retry: RetryPolicy = UPSTREAM_POLICY
    poll_interval: float = 0.5
    commit_interval: float = 0.05
    drain_timeout: float = 30.0
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_requests: int = MAX_REQUESTS_PER_BATCH
    # Fault injection (tests): the first N batches validated fail with token_limit_exceeded,
    # as OpenAI refuses a batch over the organisation's enqueued-token limit.
    token_limit_refusals: int = 0
    # Slow cancels (tests): a cancelled batch stays ``cancelling`` this long, still running
    # its lines, as OpenAI's may for up to 10 minutes; then it stops and ends ``cancelled``
    # with every line that finished meanwhile in its output file.
    cancel_delay: float = 0.0


class BatchControl:
    """Why a batch's driver should stop (cancelled, expired, shutdown) and its in-flight tasks.

    A stop starts no new line and lets the requests already sent to the upstream finish for
    up to ``drain_timeout`` seconds: the upstream is working on them (and may bill them), so
    their answers are kept rather than thrown away and sent again by the next batch. A cancel
    or an expiry also retries nothing more (``ends_lines``: a line whose attempt failed keeps
    that failure); past the timeout, what is still in flight is dropped (``abort``).
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.cancel_seen: float | None = None  # monotonic time the worker saw ``cancelling``

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    @property
    def ends_lines(self) -> bool:
        """The batch is ending (cancelled, expired): a line sends no further attempt. A clean
        stop (shutdown) lets a line go on retrying while it drains, as it would have."""
        return self.reason is not None and self.reason != "shutdown"

    def abort(self) -> None:
        """Drop the requests still in flight (their lines end as never run)."""
        for task in list(self.tasks):
            task.cancel()


async def _within(awaitable: Awaitable[T], seconds: float) -> T:
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover - Python 3.10


def request_record_id(batch_id: str, line: int) -> str:
    """A stable ``batch_req_…`` id, so a resumed batch writes the same lines."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:32]


def tokens_of(body: Any) -> Tokens:
    """A response body's token usage (chat, completions, embeddings or responses shape)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return _gemini_tokens(body)

    def count(value: Any) -> int:
        return value if isinstance(value, int) and value > 0 else 0

    def detail(*keys: str, field: str) -> int:
        for key in keys:
            if isinstance(usage.get(key), dict):
                return count(usage[key].get(field))
        return 0

    input_tokens = count(usage.get("input_tokens", usage.get("prompt_tokens")))
    output_tokens = count(usage.get("output_tokens", usage.get("completion_tokens")))
    return Tokens(
        input_tokens=input_tokens,
        cached_tokens=detail(
            "input_tokens_details", "prompt_tokens_details", field="cached_tokens"
        ),
        output_tokens=output_tokens,
        reasoning_tokens=detail(
            "output_tokens_details", "completion_tokens_details", field="reasoning_tokens"
        ),
        total_tokens=count(usage.get("total_tokens")) or input_tokens + output_tokens,
    )


def _gemini_tokens(body: Any) -> Tokens:
    """A GenerateContentResponse's ``usageMetadata`` (Gemini lines), else none."""
    usage = body.get("usageMetadata") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return Tokens()
    prompt = usage.get("promptTokenCount")
    output = usage.get("candidatesTokenCount")
    prompt = prompt if isinstance(prompt, int) and prompt > 0 else 0
    output = output if isinstance(output, int) and output > 0 else 0
    return Tokens(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output)


class Worker:
    """Executes batches on a thread of its own; ``start``, ``wake`` and ``stop`` are thread-safe."""

    def __init__(self, store: Store, upstream: Upstream, settings: WorkerSettings) -> None:
        self.store = store
        self.upstream = upstream
        self.settings = settings
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._shutdown: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None  # set: a drain under way stops waiting
        self._slots: asyncio.Semaphore | None = None
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._controls: dict[str, BatchControl] = {}
        self._pending: list[LineResult] = []
        self._flush_lock: asyncio.Lock | None = None
        self._commit_failing = False
        self._steps_failing: set[str] = set()  # batches whose last step failed (said once)
        self._token_limit_refusals = settings.token_limit_refusals
        self._in_flight = 0  # requests sent (or being retried) and not yet finished
        self._drain_timeout = settings.drain_timeout

    # -- thread-safe control ---------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="batchspec-engine-worker", daemon=True
        )
        self._thread.start()
        ready.wait()

    def wake(self, created: str | None = None) -> None:
        """Look at the batches now rather than at the next poll (a cancel happened); with
        ``created``, the id of a batch just created: only it is given a driver now (a scan
        of every active batch at each create costs a submit of n batches n²/2 rows); its
        deadline is watched from the next poll on, as every batch's is."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                if created is None:
                    loop.call_soon_threadsafe(event.set)
                else:
                    loop.call_soon_threadsafe(self._created, created)

    @property
    def requests_in_flight(self) -> int:
        """How many requests are at the upstream now (a stop waits for them). Read from any
        thread, a signal handler's too: one int, no lock."""
        return self._in_flight

    def stop(self, *, wait_for_requests: bool = True) -> None:
        """Stop cleanly: drain in-flight requests, commit, leave unfinished batches to resume.
        Without ``wait_for_requests`` (asked to stop at once), those still in flight are
        stopped (and sent again at the next start); what finished is still committed."""
        thread, loop, shutdown = self._thread, self._loop, self._shutdown
        if thread is None:
            return
        if not wait_for_requests:
            self.hurry()
        if loop is not None and shutdown is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(shutdown.set)
        thread.join()
        self._thread = None

    def hurry(self) -> None:
        """Stop waiting for the requests in flight, also in a stop already draining (a second
        Ctrl-C): they are stopped and sent again at the next start. Any thread, a signal
        handler's too."""
        self._drain_timeout = 0.0
        loop, hurry = self._loop, self._hurry
        if loop is not None and hurry is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(hurry.set)

    # -- the loop ----------------------------------------------------------------------------

    def _thread_main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
        except Exception:  # pragma: no cover - a bug; keep the process alive and say so
            log.exception("the engine worker stopped unexpectedly")
        finally:
            ready.set()

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._shutdown = asyncio.Event()
        self._hurry = asyncio.Event()
        if self._drain_timeout <= 0:
            self._hurry.set()
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._flush_lock = asyncio.Lock()
        ready.set()
        flusher = asyncio.create_task(self._flush_periodically())
        try:
            while not self._shutdown.is_set():
                try:
                    self._tick()
                except Exception:  # e.g. the database is briefly unreadable: try again
                    log.exception("the engine worker could not look at its batches")
                await self._sleep_until_woken()
        finally:
            await self._drain()
            async with self._flush_lock:  # never cancel the flusher in the middle of a commit
                flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await self._flush()
            await self.upstream.aclose()
            self._loop = None

    async def _sleep_until_woken(self) -> None:
        assert self._wake is not None and self._shutdown is not None
        waiters = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._shutdown.wait()),
        ]
        await asyncio.wait(
            waiters, timeout=self.settings.poll_interval, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in waiters:
            waiter.cancel()
        self._wake.clear()

    async def _drain(self) -> None:
        for control in self._controls.values():
            control.stop("shutdown")
        drivers = list(self._drivers.values())
        if drivers:
            assert self._hurry is not None
            finished = asyncio.ensure_future(asyncio.wait(drivers))
            hurried = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait(
                {finished, hurried},
                timeout=self._drain_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            finished.cancel()
            hurried.cancel()
            for task in drivers:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*drivers, return_exceptions=True)

    def _tick(self) -> None:
        """Give every active batch a driver and tell drivers of cancels and passed deadlines."""
        wall = time.time()
        for batch_id, status, deadline in self.store.active_batch_states():
            control = self._controls.get(batch_id) or self._start_driver(batch_id)
            if status == "cancelling":
                self._stop_cancelled(control)
            elif status in ("validating", "in_progress") and wall >= deadline:
                self._end_lines(control, "expired")

    def _end_lines(self, control: BatchControl, reason: str) -> None:
        """Stop a batch that is being cancelled or has expired: no new line starts, and the
        requests in flight get ``drain_timeout`` seconds to answer before they are dropped."""
        if control.reason is not None:
            return
        control.stop(reason)
        grace = self.settings.drain_timeout
        if grace <= 0 or self._loop is None:
            control.abort()
        else:
            self._loop.call_later(grace, control.abort)

    def _created(self, batch_id: str) -> None:
        """A batch was just created (``wake(created=...)``): give it a driver, which reads
        its row and takes its first step; not once the worker is stopping (the next start
        resumes it)."""
        if self._shutdown is None or self._shutdown.is_set() or batch_id in self._controls:
            return
        self._start_driver(batch_id)

    def _start_driver(self, batch_id: str) -> BatchControl:
        control = self._controls[batch_id] = BatchControl()
        task = asyncio.create_task(self._drive(batch_id, control))
        self._drivers[batch_id] = task

        def forget(_t: asyncio.Task[None], b: str = batch_id) -> None:
            self._forget(b)

        task.add_done_callback(forget)
        return control

    def _stop_cancelled(self, control: BatchControl) -> None:
        """Stop a ``cancelling`` batch's lines, once ``cancel_delay`` has passed since the
        worker first saw it cancelling (at once by default); until then its lines run on."""
        delay = self.settings.cancel_delay
        if control.cancel_seen is None:
            control.cancel_seen = time.monotonic()
            if delay > 0 and self._loop is not None and self._wake is not None:
                self._loop.call_later(delay + 0.01, self._wake.set)  # a tick once it is over
        if time.monotonic() - control.cancel_seen >= delay:
            self._end_lines(control, "cancelled")

    def _forget(self, batch_id: str) -> None:
        self._drivers.pop(batch_id, None)
        self._controls.pop(batch_id, None)
        if self._wake is not None:
            self._wake.set()  # look again: the batch may need another step

    # -- one batch ---------------------------------------------------------------------------

    async def _drive(self, batch_id: str, control: BatchControl) -> None:
        try:
            row = self.store.get_batch(batch_id)
            if row is not None and row["status"] == "validating" and control.reason is None:
                if self._token_limit_refusals > 0:  # decided here, on the loop: no race
                    self._token_limit_refusals -= 1
                    await asyncio.to_thread(self._refuse_over_token_limit, batch_id)
                else:
                    await asyncio.to_thread(
                        self._validate, batch_id, row["input_sha256"], row["endpoint"]
                    )
                row = self.store.get_batch(batch_id)
            if row is not None and row["status"] == "in_progress" and control.reason is None:
                await self._run_lines(batch_id, row["input_sha256"], control)
            if control.reason == "shutdown":
                return
            await self._flush()  # every result of this batch is stored before it finalizes
            if any(result.batch_id == batch_id for result in self._pending):
                # a commit failing (a full disk, said once by _flush): a cancelled or expired
                # batch finalized now would write the answers it holds as never run, lost
                # though the upstream gave (and billed) them; the next poll tries again
                await asyncio.sleep(self.settings.poll_interval)
                return
            await asyncio.to_thread(self._finalize, batch_id)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if batch_id not in self._steps_failing:  # once, not every poll: a full disk
                _log_failure(err, "batch %s: step failed; it is retried at the next poll", batch_id)
            self._steps_failing.add(batch_id)
            await asyncio.sleep(self.settings.poll_interval)
        else:
            if batch_id in self._steps_failing:
                self._steps_failing.discard(batch_id)
                log.warning("batch %s: step done after failed tries", batch_id)

    def _validate(self, batch_id: str, input_sha256: str, endpoint: str) -> None:
        report = scan_batch_input(
            self.store.blobs.path(input_sha256),
            endpoint=endpoint,
            max_line_bytes=self.settings.max_line_bytes,
            max_requests=self.settings.max_requests,
            check_messages=False,  # answered per line, as OpenAI does
        )
        if not report.ok:
            errors = [
                {"code": p.code, "message": p.message, "param": None, "line": p.line}
                for p in report.problems
            ]
            self.store.move_batch(
                batch_id,
                from_statuses=("validating",),
                to_status="failed",
                failed_at=now(),
                errors=_dumps(errors).decode(),
            )
            return
        self.store.move_batch(
            batch_id,
            from_statuses=("validating",),
            to_status="in_progress",
            in_progress_at=now(),
            total=report.requests,
            model=report.models[0] if len(report.models) == 1 else None,
        )

    def _refuse_over_token_limit(self, batch_id: str) -> None:
        error = {
            "code": "token_limit_exceeded",
            "message": "Enqueued token limit reached in organization org-local (injected "
            "fault). Please try again once some in_progress batches have been completed.",
            "param": None,
            "line": None,
        }
        self.store.move_batch(
            batch_id,
            from_statuses=("validating",),
            to_status="failed",
            failed_at=now(),
            errors=_dumps([error]).decode(),
        )

    async def _run_lines(self, batch_id: str, input_sha256: str, control: BatchControl) -> None:
        assert self._slots is not None
        # lines finished but not committed yet (a commit that keeps failing: a full disk) are
        # done too: run again, they would be sent to the upstream again at every poll
        buffered = {result.line for result in self._pending if result.batch_id == batch_id}
        done = buffered | await asyncio.to_thread(self.store.finished_lines, batch_id)
        path = self.store.blobs.path(input_sha256)
        slots = self._slots
        for request in iter_requests(path, max_line_bytes=self.settings.max_line_bytes):
            if request.line in done:
                continue
            await slots.acquire()
            if control.reason is not None:
                slots.release()
                break
            task = asyncio.create_task(
                self._execute(batch_id, request.line, request.custom_id, request.raw, control)
            )
            control.tasks.add(task)
            self._in_flight += 1

            # Runs even when the task is cancelled before it starts (its finally would not).
            def settled(t: asyncio.Task[None]) -> None:
                slots.release()
                control.tasks.discard(t)
                self._in_flight -= 1

            task.add_done_callback(settled)
        if control.tasks:
            await asyncio.wait(set(control.tasks))

    async def _execute(
        self, batch_id: str, line: int, custom_id: str, raw: bytes, control: BatchControl
    ) -> None:
        try:
            record, ok, tokens = await self._call_with_retries(
                batch_id, line, custom_id, raw, control
            )
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug (ours or an upstream's): this line fails, not the batch
            log.error(
                "batch %s line %d (custom_id %r): the engine failed on this request: %s",
                batch_id, line, custom_id, type(err).__name__, exc_info=True,
            )  # fmt: skip
            record = _error_record(
                request_record_id(batch_id, line),
                custom_id,
                "engine_error",
                f"The engine failed on this request ({type(err).__name__}); "
                "its log has the details.",
            )
            ok, tokens = False, Tokens()
        self._pending.append(LineResult(batch_id, line, custom_id, ok, record, tokens))

    async def _call_with_retries(
        self, batch_id: str, line: int, custom_id: str, raw: bytes, control: BatchControl
    ) -> tuple[bytes, bool, Tokens]:
        settings = self.settings
        request = _loads(raw)
        url, body = request.get("url"), request.get("body")
        record_id = request_record_id(batch_id, line)
        failure: UpstreamResponse | tuple[str, str] = ("request_failed", "not attempted")
        policy = settings.retry
        # a rotation (balancer.py) times each send itself, after any wait for a rate limit
        times_itself = getattr(self.upstream, "times_requests", False)
        for attempt in range(policy.max_attempts):
            retry_after: float | None = None
            try:
                sending = self.upstream.send(url, body, custom_id=custom_id, attempt=attempt)
                response = await (
                    sending if times_itself else _within(sending, settings.request_timeout)
                )
            except (asyncio.TimeoutError, TimeoutError):
                failure = (
                    "request_timeout",
                    f"The upstream did not answer within {settings.request_timeout:g} s "
                    f"({attempt + 1} attempt(s)).",
                )
            except UpstreamUnreachable as err:
                failure = ("upstream_unreachable", f"The upstream could not be reached: {err}")
            else:
                if response.status_code < 300:
                    return (
                        self._response_record(record_id, custom_id, response),
                        True,
                        tokens_of(response.body),
                    )
                failure = response
                if not policy.retries_status(response.status_code):
                    break
                retry_after = response.retry_after
            if not policy.can_retry(attempt) or control.ends_lines:
                break
            await asyncio.sleep(policy.delay(attempt, retry_after))
            if control.ends_lines:  # cancelled or expired while it waited: no new attempt
                break
        if isinstance(failure, UpstreamResponse):
            record = self._response_record(record_id, custom_id, failure)
            return record, False, tokens_of(failure.body)
        code, message = failure
        return _error_record(record_id, custom_id, code, message), False, Tokens()

    @staticmethod
    def _response_record(record_id: str, custom_id: str, response: UpstreamResponse) -> bytes:
        return _dumps(
            {
                "id": record_id,
                "custom_id": custom_id,
                "response": {
                    "status_code": response.status_code,
                    "request_id": response.request_id or f"req_{uuid.uuid4().hex}",
                    "body": response.body,
                },
                "error": None,
            }
        )

    # -- persistence -------------------------------------------------------------------------

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.commit_interval)
            await self._flush()

    async def _flush(self) -> None:
        """Commit the buffered results; one flush at a time, so a finalize after it sees all."""
        assert self._flush_lock is not None
        async with self._flush_lock:
            if not self._pending:
                return
            rows = list(self._pending)  # left buffered until committed: see _run_lines
            try:
                await asyncio.to_thread(self.store.record_results, rows)
            except Exception as err:  # keep them; the next flush tries again
                if not self._commit_failing:  # once, not every commit_interval: a full disk
                    _log_failure(err, "could not commit %d results; retrying", len(rows))
                self._commit_failing = True
            else:
                del self._pending[: len(rows)]  # lines finished meanwhile were appended
                if self._commit_failing:
                    log.warning("committed %d results after failed tries", len(rows))
                self._commit_failing = False

    def _finalize(self, batch_id: str) -> None:
        finalize_batch(self.store, batch_id, max_line_bytes=self.settings.max_line_bytes)


def _log_failure(err: Exception, message: str, *args: object) -> None:
    """Log a failed step: one line naming the cause when the disk or the store failed (a
    full disk, a read-only folder: the operator's to fix, and the next try may succeed),
    the traceback for anything else (a bug)."""
    if isinstance(err, (OSError, sqlite3.Error)):
        reason = (err.strerror if isinstance(err, OSError) else None) or str(err)
        log.warning(message.replace(";", f" ({reason});", 1), *args)
    else:
        log.exception(message, *args)


def _error_record(record_id: str, custom_id: str, code: str, message: str) -> bytes:
    return _dumps(
        {
            "id": record_id,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )


_UNFINISHED_MESSAGES = {
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
    "batch_expired": "This request could not be executed before the completion window expired.",
}


def finalize_batch(store: Store, batch_id: str, *, max_line_bytes: int) -> None:
    """Write a batch's output and error files and move it to its terminal status.

    Decides from the stored status and deadline: ``cancelling`` → cancelled; lines left when
    the deadline passed → expired; every line finished → completed (via ``finalizing``).
    Unfinished lines go to the error file with ``batch_cancelled`` / ``batch_expired``.
    Safe to repeat after a crash: nothing is visible until the one final transaction.
    """
    row = store.get_batch(batch_id)
    if row is None or row["status"] in TERMINAL_STATUSES:
        return
    status = row["status"]
    if status == "validating":  # never validated: nothing ran, nothing to write
        if time.time() < row["deadline"]:
            return
        store.finish_batch(
            batch_id,
            from_statuses=("validating",),
            to_status="expired",
            output=None,
            error=None,
            unfinished=0,
            timestamps={"expired_at": now()},
        )
        return
    unfinished = row["total"] - (row["completed"] + row["failed"])
    if status == "cancelling":
        terminal, code, stamp = "cancelled", "batch_cancelled", "cancelled_at"
    elif unfinished > 0 and time.time() >= row["deadline"]:
        terminal, code, stamp = "expired", "batch_expired", "expired_at"
    elif unfinished > 0:
        return  # the run stopped early (e.g. a shutdown); the next start resumes it
    else:
        terminal, code, stamp = "completed", None, "completed_at"
        store.move_batch(
            batch_id, from_statuses=("in_progress",), to_status="finalizing", finalizing_at=now()
        )
    from_statuses = {
        "cancelled": ("cancelling",),
        "expired": ("in_progress",),
        "completed": ("finalizing",),
    }[terminal]
    output = _write_result_file(
        store, store.iter_records(batch_id, ok=True), f"{batch_id}_output.jsonl"
    )
    errors: Iterator[tuple[int, bytes]] = store.iter_records(batch_id, ok=False)
    if code is not None:
        errors = heapq.merge(
            errors,
            _unfinished_records(store, batch_id, row["input_sha256"], code, max_line_bytes),
        )
    error = _write_result_file(store, errors, f"{batch_id}_error.jsonl")
    store.finish_batch(
        batch_id,
        from_statuses=from_statuses,
        to_status=terminal,
        output=output,
        error=error,
        unfinished=max(unfinished, 0),
        timestamps={stamp: now()},
    )


def _unfinished_records(
    store: Store, batch_id: str, input_sha256: str, code: str, max_line_bytes: int
) -> Iterator[tuple[int, bytes]]:
    done = store.finished_lines(batch_id)
    path = store.blobs.path(input_sha256)
    for request in iter_requests(path, max_line_bytes=max_line_bytes):
        if request.line not in done:
            record_id = request_record_id(batch_id, request.line)
            message = _UNFINISHED_MESSAGES[code]
            yield request.line, _error_record(record_id, request.custom_id, code, message)


def _write_result_file(
    store: Store, records: Iterator[tuple[int, bytes]], filename: str
) -> StoredFile | None:
    """Stream records (in line order) into a blob; None when there were none."""
    with store.blobs.writer() as writer:
        for _, record in records:
            writer.write(record + b"\n")
        if writer.size == 0:
            writer.discard()
            return None
        return StoredFile(sha256=writer.commit(), size=writer.size, filename=filename)
