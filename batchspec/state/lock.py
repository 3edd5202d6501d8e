"""One writer at a time (DESIGN.md, invariant 3): the lock a run takes before changing state.

The lock is the single row of the state database's ``lock`` table. It is checked and taken
inside one ``StateStore.atomic()`` transaction, which begins with BEGIN IMMEDIATE, so SQLite's
own write lock guarantees that two processes can never both see it free and both take it.

Rules:

* Free: take it.
* Held by a process that is gone, on *this* host (``os.kill(pid, 0)`` says no such process):
  take it over, record a ``lock.takeover`` event, and return a handle whose ``warning`` says so.
* Held by a live process, or by any process on another host: wait up to ``timeout`` seconds,
  polling, then raise ``StateLockedError`` (exit 3) naming the holder and saying how to
  release it (``batchspec unlock ID``). A holder on another host whose heartbeat is older
  than ``stale_after`` is called possibly stale in the message, but never taken over: we
  cannot see whether it is alive.
* A handle releases only its own lock: after ``batchspec unlock`` and a new holder, a late
  ``release()`` of the old handle leaves the new holder's lock alone.

The holder refreshes ``heartbeat`` with ``LockHandle.heartbeat()`` (which fails once the lock
was lost) or a daemon thread started by ``LockHandle.start_heartbeat()``.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from types import TracebackType

from batchspec.errors import StateError, StateLockedError
from batchspec.state.runinfo import RunInfo
from batchspec.state.store import LockRow, StateStore, parse_timestamp, utc_timestamp

#: the lock row's holder; the same class as ``batchspec.state.store.LockRow``
LockHolder = LockRow

STALE_AFTER = timedelta(minutes=10)
HEARTBEAT_INTERVAL_SECONDS = 30.0


def pid_is_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (assumed alive when unsure)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to another user
        return True
    return True


class LockHandle:
    """The lock held by this process; a context manager that releases it on exit."""

    def __init__(self, store: StateStore, holder: LockHolder, warning: str | None = None) -> None:
        self.holder = holder
        #: set when the lock was taken over from a dead process
        self.warning = warning
        #: the last error of the heartbeat thread, if any
        self.heartbeat_error: BaseException | None = None
        self._store = store
        self._released = False
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holder_id(self) -> str:
        return self.holder.holder_id

    @property
    def released(self) -> bool:
        return self._released

    def heartbeat(self) -> None:
        """Refresh the heartbeat; raise StateError if this run no longer holds the lock."""
        if self._lost or not self._store.touch_lock_row(self.holder_id, utc_timestamp()):
            self._lost = True
            raise StateError(
                f"this run no longer holds the state lock {self.holder_id} on "
                f"{self._store.label} (it was released with `batchspec unlock` or taken over); "
                "stopping before changing anything else"
            )

    def start_heartbeat(self, interval: float = HEARTBEAT_INTERVAL_SECONDS) -> None:
        """Refresh the heartbeat every ``interval`` seconds from a daemon thread until release."""
        if self._thread is not None or self._released:
            return
        self._thread = threading.Thread(
            target=self._beat_until_stopped,
            args=(interval,),
            name=f"batchspec-lock-heartbeat-{self.holder_id}",
            daemon=True,
        )
        self._thread.start()

    def _beat_until_stopped(self, interval: float) -> None:
        # Its own connection: a shared one would slip heartbeats into the main thread's
        # transactions (and a connection is not for sharing across threads).
        try:
            store = StateStore.open(self._store.location)
        except Exception as err:  # noqa: BLE001 - recorded for the owner to inspect
            self.heartbeat_error = err
            return
        try:
            while not self._stop.wait(interval):
                try:
                    if not store.touch_lock_row(self.holder_id, utc_timestamp()):
                        self._lost = True
                        return
                except Exception as err:  # noqa: BLE001 - a busy DB must not kill the thread
                    self.heartbeat_error = err
        finally:
            store.close()

    def release(self) -> None:
        """Stop the heartbeat and drop the lock if it is still ours; safe to call twice."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._store.delete_lock_row(self.holder_id)

    def __enter__(self) -> LockHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def acquire_lock(
    store: StateStore,
    *,
    command: str,
    info: RunInfo,
    timeout: float = 0.0,
    poll_interval: float = 0.2,
    stale_after: timedelta = STALE_AFTER,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    run_id: int | None = None,
) -> LockHandle:
    """Take the state lock for ``command``, waiting up to ``timeout`` seconds for a live holder.

    Raises ``StateLockedError`` (exit 3) if it is still held when the time is up. ``run_id``
    only labels the ``lock.takeover`` event, if there is one.
    Must not be called inside ``store.atomic()``: waiting there would keep SQLite's write
    lock and stop the holder from ever releasing.
    """
    if store.in_transaction:
        raise RuntimeError("acquire_lock() must not be called inside StateStore.atomic()")
    deadline = clock() + max(timeout, 0.0)
    while True:
        handle, holder = _try_take(store, command, info, run_id)
        if handle is not None:
            return handle
        assert holder is not None
        remaining = deadline - clock()
        if remaining <= 0:
            raise StateLockedError(_locked_message(store, holder, timeout, stale_after))
        sleep(min(poll_interval, remaining))


def _try_take(
    store: StateStore, command: str, info: RunInfo, run_id: int | None
) -> tuple[LockHandle | None, LockHolder | None]:
    """One check-and-take under SQLite's write lock: (handle, None) or (None, live holder)."""
    now = utc_timestamp()
    mine = LockHolder(
        holder_id=secrets.token_hex(6),
        host=info.host,
        pid=info.pid,
        command=command,
        ci_run_url=info.ci_run_url,
        since=now,
        heartbeat=now,
        user=info.user,
    )
    with store.atomic():
        current = store.lock_row()
        if current is None:
            store.write_lock_row(mine)
            return LockHandle(store, mine), None
        if current.host != info.host or pid_is_alive(current.pid):
            return None, current
        store.write_lock_row(mine)
        store.record_event(
            run_id,
            "lock.takeover",
            detail={"previous": _holder_detail(current), "holder_id": mine.holder_id},
        )
    warning = (
        f"took over the lock of dead process {current.pid} on host {current.host} "
        f"(holder {current.holder_id}, command {current.command!r}, held since {current.since})"
    )
    return LockHandle(store, mine, warning), None


def force_unlock(store: StateStore, holder_id: str, *, run_id: int | None = None) -> LockHolder:
    """Release the lock held by ``holder_id`` (``batchspec unlock ID``); returns that holder."""
    with store.atomic():
        current = store.lock_row()
        if current is None:
            raise StateError(f"no lock is held on {store.label}; nothing to unlock")
        if current.holder_id != holder_id:
            raise StateError(
                f"the lock on {store.label} is held by {describe_holder(current)}, not by "
                f"{holder_id!r}; nothing was released. To release it: "
                f"batchspec unlock {current.holder_id}"
            )
        store.delete_lock_row(holder_id)
        store.record_event(run_id, "lock.force_unlock", detail=_holder_detail(current))
    return current


def current_lock(store: StateStore) -> LockHolder | None:
    """The current holder of the lock, or None if it is free."""
    return store.lock_row()


def describe_holder(holder: LockHolder) -> str:
    """One line naming a holder: id, who, where, which command, which CI run, since when."""
    who = f"{holder.user}@{holder.host}" if holder.user else holder.host
    text = f"{holder.holder_id} ({who}, pid {holder.pid}, command {holder.command!r}"
    if holder.ci_run_url:
        text += f", CI run {holder.ci_run_url}"
    return text + f", since {holder.since})"


def _locked_message(
    store: StateStore, holder: LockHolder, timeout: float, stale_after: timedelta
) -> str:
    waited = f"after waiting {timeout:g} s" if timeout > 0 else "(not waiting: --lock-timeout 0)"
    message = (
        f"the state database {store.label} is locked by another run {waited}: "
        f"{describe_holder(holder)}, last heartbeat {holder.heartbeat}."
    )
    age = _heartbeat_age(holder)
    if age is not None and age > stale_after:
        message += (
            f" Its heartbeat is {int(age.total_seconds() // 60)} minutes old: it is possibly "
            "stale (a crashed run on another machine)."
        )
    return message + (
        " Wait for it to finish or pass --lock-timeout SECONDS to wait; if that run is gone, "
        f"release the lock with: batchspec unlock {holder.holder_id}"
    )


def _heartbeat_age(holder: LockHolder) -> timedelta | None:
    try:
        return datetime.now(timezone.utc) - parse_timestamp(holder.heartbeat)
    except ValueError:
        return None


def _holder_detail(holder: LockHolder) -> dict[str, object]:
    return {
        "holder_id": holder.holder_id,
        "host": holder.host,
        "pid": holder.pid,
        "command": holder.command,
        "ci_run_url": holder.ci_run_url,
        "since": holder.since,
        "heartbeat": holder.heartbeat,
        "user": holder.user,
    }


__all__ = [
    "LockHandle",
    "LockHolder",
    "acquire_lock",
    "current_lock",
    "describe_holder",
    "force_unlock",
    "pid_is_alive",
]
