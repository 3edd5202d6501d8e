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
* ``batchspec unlock ID`` (``force_unlock``) refuses a holder that may be alive: its heartbeat
  is younger than ``stale_after`` and it is not a process known to be gone on this host.
  Releasing a live run lets a second one spend beside it (a create of the first may still
  be in transit), so that needs ``force``.

The holder refreshes ``heartbeat`` with ``LockHandle.heartbeat()`` (which fails once the lock
was lost) or a daemon thread started by ``LockHandle.start_heartbeat()``.

In PostgreSQL the row is paired with a session-level advisory lock (``_run_lock_key``) held by
the store's connection for as long as the run holds the lock. The server drops it when that
session ends, however the runner died (killed, out of memory, its machine gone), so liveness
is known on every host: a row whose advisory lock is free belongs to a dead run and is taken
over at once (``lock.takeover``), and a row whose advisory lock is held is a live run, never
taken over, whatever its heartbeat says. The row keeps the holder's details for ``status``,
the exit-3 message and ``batchspec unlock``.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from types import TracebackType

from batchspec.errors import StateError, StateLockedError
from batchspec.state.runinfo import RunInfo
from batchspec.state.store import LockRow, StateStore, parse_timestamp, utc_timestamp
from batchspec.storage.sql import DatabaseError, DatabaseUnavailableError, PostgresSql

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
        if self._lost or not self._touch():
            self._lost = True
            raise StateError(
                f"this run no longer holds the state lock {self.holder_id} on "
                f"{self._store.label} (it was released with `batchspec unlock` or taken over); "
                "stopping before changing anything else"
            )

    def _touch(self) -> bool:
        try:
            return self._store.touch_lock_row(self.holder_id, utc_timestamp())
        except DatabaseUnavailableError:  # PostgreSQL: the session, and so the lock, is gone
            return False

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
        try:
            self._store.delete_lock_row(self.holder_id)
            _release_session_lock(self._store)
        except DatabaseUnavailableError:
            pass  # PostgreSQL: the session ended, and the server released its lock with it

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
        remaining = deadline - clock()
        if holder is None:  # PostgreSQL: a live session holds it but has not written its row
            if remaining <= 0:
                raise StateLockedError(
                    f"the state database {store.label} is locked by another run that is "
                    "starting, or whose lock was released with `batchspec unlock` and that "
                    "stops at its next step; try again"
                )
            sleep(min(poll_interval, max(remaining, 0.01)))
            continue
        if remaining <= 0:
            raise StateLockedError(_locked_message(store, holder, timeout, stale_after))
        sleep(min(poll_interval, remaining))


@contextmanager
def hold_still(
    store: StateStore,
    *,
    command: str,
    info: RunInfo,
    timeout: float = 0.0,
    poll_interval: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[str | None]:
    """Keep the state from changing while the block reads it (``batchspec state migrate``).

    A run holding the lock is waited for as ``acquire_lock`` does (``timeout``, then
    ``StateLockedError``, exit 3). Then:

    * SQLite: the database's writer lock (BEGIN IMMEDIATE) is held for the whole block, and
      the block reads inside that transaction, which is rolled back: nothing is written, so
      the file stays byte for byte as it was. A run starting meanwhile waits for the writer
      lock (the busy timeout), then stops with "stayed busy"; readers go on.
    * PostgreSQL: the run lock itself (``acquire_lock``); its row is written and removed, so
      the rows end as they were, and a run starting meanwhile exits 3 naming this one.

    Yields a warning, or None. A dead holder's lock (SQLite) is left as it is, not taken over.
    """
    if store.dialect == "postgresql":
        with acquire_lock(store, command=command, info=info, timeout=timeout) as handle:
            yield handle.warning
        return
    if store.in_transaction:
        raise RuntimeError("hold_still() must not be called inside StateStore.atomic()")
    deadline = clock() + max(timeout, 0.0)
    while True:
        store.db.begin_writer()
        holder = store.lock_row()
        if holder is None or (holder.host == info.host and not pid_is_alive(holder.pid)):
            break
        store.db.rollback()
        remaining = deadline - clock()
        if remaining <= 0:
            raise StateLockedError(_locked_message(store, holder, timeout, STALE_AFTER))
        sleep(min(poll_interval, remaining))
    try:
        yield (
            None
            if holder is None
            else (
                f"the lock of dead process {holder.pid} on host {holder.host} (holder "
                f"{holder.holder_id}) is left as it is in {store.label}"
            )
        )
    finally:
        store.db.rollback()


def _try_take(
    store: StateStore, command: str, info: RunInfo, run_id: int | None
) -> tuple[LockHandle | None, LockHolder | None]:
    """One check-and-take under the writer lock: (handle, None) or (None, live holder)."""
    if store.dialect == "postgresql":
        return _try_take_session_lock(store, command, info, run_id)
    mine = _holder(command, info)
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


def _try_take_session_lock(
    store: StateStore, command: str, info: RunInfo, run_id: int | None
) -> tuple[LockHandle | None, LockHolder | None]:
    """PostgreSQL: the advisory lock decides; the row only describes its holder."""
    key = _run_lock_key(store)
    got = store.db.execute("SELECT pg_try_advisory_lock(?)", (key,)).fetchone()[0]
    if not got:
        return None, store.lock_row()  # None: the live holder has not written its row yet
    mine = _holder(command, info)
    try:
        with store.atomic():
            previous = store.lock_row()
            store.write_lock_row(mine)
            if previous is not None:
                store.record_event(
                    run_id,
                    "lock.takeover",
                    detail={"previous": _holder_detail(previous), "holder_id": mine.holder_id},
                )
    except BaseException:
        _release_session_lock(store)
        raise
    if previous is None:
        return LockHandle(store, mine), None
    warning = (
        f"took over the lock of a run whose database session has ended: pid {previous.pid} on "
        f"host {previous.host} (holder {previous.holder_id}, command {previous.command!r}, "
        f"held since {previous.since})"
    )
    return LockHandle(store, mine, warning), None


def _holder(command: str, info: RunInfo) -> LockHolder:
    now = utc_timestamp()
    return LockHolder(
        holder_id=secrets.token_hex(6),
        host=info.host,
        pid=info.pid,
        command=command,
        ci_run_url=info.ci_run_url,
        since=now,
        heartbeat=now,
        user=info.user,
    )


def _run_lock_key(store: StateStore) -> int:
    db = store.db
    assert isinstance(db, PostgresSql)
    return db.advisory_key("run-lock")


def _release_session_lock(store: StateStore) -> None:
    if store.dialect == "postgresql":
        store.db.execute("SELECT pg_advisory_unlock(?)", (_run_lock_key(store),))


def force_unlock(
    store: StateStore,
    holder_id: str,
    *,
    run_id: int | None = None,
    force: bool = False,
    stale_after: timedelta = STALE_AFTER,
) -> LockHolder:
    """Release the lock held by ``holder_id`` (``batchspec unlock ID``); returns that holder.

    A holder that may be alive (fresh heartbeat, not a dead process on this host) is released
    only with ``force``; otherwise ``StateLockedError`` (exit 3) says so and changes nothing.
    """
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
        if not force:
            _refuse_if_alive(current, stale_after)
        store.delete_lock_row(holder_id)
        store.record_event(
            run_id, "lock.force_unlock", detail={**_holder_detail(current), "forced": force}
        )
    if store.dialect == "postgresql":
        _end_holder_sessions(store)
    return current


def _end_holder_sessions(store: StateStore) -> None:
    """PostgreSQL: the lock is its holder's session, so releasing it ends that session.

    The holder's next statement fails ("lost the connection"), so it stops before changing
    anything else, as a run whose lock row was deleted does at its next heartbeat.
    """
    key = _run_lock_key(store)
    try:
        store.db.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_locks WHERE locktype = 'advisory' "
            "AND granted AND classid::bigint = ? AND objid::bigint = ? AND objsubid = 1 "
            "AND pid <> pg_backend_pid()",
            (key >> 32, key & 0xFFFFFFFF),
        )
    except DatabaseError as err:
        raise StateError(
            f"released the lock's record on {store.label}, but could not end the holder's "
            f"database session ({err}); a role allowed to (pg_signal_backend) must end it, "
            "or the holder must stop"
        ) from err


def _refuse_if_alive(holder: LockHolder, stale_after: timedelta) -> None:
    if holder.host == socket.gethostname() and not pid_is_alive(holder.pid):
        return  # its process is gone: nothing can still be spending under this lock
    age = _heartbeat_age(holder)
    if age is None or age >= stale_after:
        return
    raise StateLockedError(
        f"not unlocking: {describe_holder(holder)} may still be running (its last heartbeat "
        f"was {int(age.total_seconds())} s ago, under the {_minutes(stale_after)} after which "
        "a run counts as possibly stale); releasing a live run lets a second one spend beside "
        "it, and a create it sent may still be in transit",
        details=[
            "wait for that run to finish, or stop it",
            f"if you are sure it is gone: batchspec unlock {holder.holder_id} --force",
        ],
    )


def _minutes(span: timedelta) -> str:
    minutes = span.total_seconds() / 60
    return f"{minutes:g} minutes" if minutes != 1 else "1 minute"


def current_lock(store: StateStore) -> LockHolder | None:
    """The current holder of the lock, or None if it is free.

    In PostgreSQL a row whose session lock nobody holds is a dead run's: the lock is free.
    """
    row = store.lock_row()
    if row is not None and store.dialect == "postgresql" and not _session_lock_held(store):
        return None
    return row


def _session_lock_held(store: StateStore) -> bool:
    """Whether any session holds the run lock (a bigint key: classid high, objid low)."""
    key = _run_lock_key(store)
    high, low = key >> 32, key & 0xFFFFFFFF
    row = store.db.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid::bigint = ? AND objid::bigint = ? AND objsubid = 1 "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (high, low),
    ).fetchone()
    return bool(row[0])


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
    # in PostgreSQL the holder's session is alive by definition: never "possibly stale"
    if age is not None and age > stale_after and store.dialect != "postgresql":
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
    "hold_still",
    "pid_is_alive",
]
