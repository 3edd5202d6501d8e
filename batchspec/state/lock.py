"""One writer per resource (DESIGN.md, invariant 3): the locks a run takes before changing state.

A run locks the resources it will touch (``acquire_lock(..., resources=NAMES)``); a command
that touches the whole workspace (``apply --prune``, state-level commands) takes the
workspace-wide lock (``resources=None``, the key ``*``), which conflicts with every resource
lock. Each locked key is a row of the ``resource_locks`` table naming its holder (id, user,
host, pid, command, CI run, since, heartbeat): ``batchspec.state.lock_row``. Two runs whose
keys do not meet proceed side by side.

A run takes all its keys or none, in one ``StateStore.atomic()`` transaction (BEGIN
IMMEDIATE, or PostgreSQL's writer lock), so two runs can never both see a key free, and never
deadlock: nobody waits while holding part of what it needs. It retries until ``timeout``.

Rules, per key in conflict (held by another run):

* Held by a process that is gone, on *this* host (``os.kill(pid, 0)`` says no such process,
  or it is a zombie: killed, and not yet reaped by its parent):
  take over every row of that holder, record a ``lock.takeover`` event, and return a handle
  whose ``warning`` says so. The dead holder's run (the unfinished run of its host and pid
  that started by the time it took its lock) is marked ended with no exit code, which
  ``history`` shows as ``killed``; the event's ``ended_runs`` names it.
* Held by a live process, or by any process on another host: wait up to ``timeout`` seconds,
  polling, then raise ``StateLockedError`` (exit 3) naming the holder *and the resource in
  conflict*, and saying how to release it (``batchspec unlock ID``). A holder on another host
  whose heartbeat is older than ``stale_after`` is called possibly stale in the message, but
  never taken over: we cannot see whether it is alive.
* A handle releases only its own rows: after ``batchspec unlock`` and a new holder, a late
  ``release()`` of the old handle leaves the new holder's rows alone.
* ``batchspec unlock ID`` (``force_unlock``) releases every row of holder ID; it refuses a
  holder that may be alive (heartbeat younger than ``stale_after``, not a process known to be
  gone on this host) unless ``force``: releasing a live run lets a second one spend beside it.

The holder refreshes ``heartbeat`` on all its rows with ``LockHandle.heartbeat()`` (which fails
once its rows were released): a run calls it before each step that spends or cancels.

In PostgreSQL a holder also holds one session-level advisory lock (``_holder_key``: a hash
of its holder id), taken inside the writer transaction that writes its rows, for as long as
it holds any of them. The server drops it when that session ends, however the runner died
(killed, out of memory, its machine gone), so liveness is known on every host: rows whose
holder's advisory lock is free belong to a dead run and are taken over at once
(``lock.takeover``), and rows whose holder's lock is held are a live run's, never taken over,
whatever the heartbeat says. One advisory lock per run, not per resource: a run over 10,000
resources would not fit PostgreSQL's shared lock table (room for some thousands by default),
and every conflict is decided on the rows anyway, under the writer lock. The rows keep the
holder's details for ``status``, the exit-3 message and ``batchspec unlock``.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import TracebackType

from batchspec.errors import StateError, StateLockedError
from batchspec.state.connection import MIN_BUSY_WAIT_SECONDS, busy_wait_for
from batchspec.state.lock_row import WORKSPACE
from batchspec.state.runinfo import RunInfo
from batchspec.state.runs import run_session_key
from batchspec.state.store import LockRow, RunRow, StateStore, parse_timestamp, utc_timestamp
from batchspec.storage.sql import (
    DatabaseBusyError,
    DatabaseError,
    DatabaseNotAnsweringError,
    DatabaseUnavailableError,
    PostgresSql,
)

#: a run holding locks; the same class as ``batchspec.state.store.LockRow``
LockHolder = LockRow

STALE_AFTER = timedelta(minutes=10)


@dataclass(frozen=True)
class HeldLock:
    """One locked key: a resource name, or ``*`` for the whole workspace, and its holder."""

    resource: str
    holder: LockHolder

    @property
    def workspace_wide(self) -> bool:
        return self.resource == WORKSPACE

    def to_json(self) -> dict[str, object]:
        return {"resource": self.resource, **_holder_detail(self.holder)}


def pid_is_alive(pid: int) -> bool:
    """Whether a process with ``pid`` runs on this host (assumed alive when unsure).

    A zombie (a process that has exited but whose parent has not reaped it yet: a run killed
    by a script that never waits for it) answers ``kill(pid, 0)`` like a live one, but can no
    longer do anything: it counts as gone (Linux: its state in ``/proc/PID/stat``)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to another user
        return not _is_zombie(pid)
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits only to be reaped (False when unsure). Its first
    thread reads 'Z' too once it alone ended while others run on (``pthread_exit`` in the
    main thread): a process with threads left is alive."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:  # no /proc (macOS), or the process just went
        return False
    # "PID (COMMAND) STATE ...": COMMAND may hold spaces and parentheses, so split at the last
    fields = stat.rpartition(b")")[2].split()
    if not fields or fields[0] not in (b"Z", b"X"):
        return False
    # num_threads, field 20 of stat(5) (the state is field 3): a zombie has none left
    # but its own entry
    return len(fields) > 17 and fields[17].isdigit() and int(fields[17]) <= 1


def holder_process_gone(holder: LockHolder) -> bool:
    """Whether ``holder`` ran on this host and its process no longer exists (a run killed
    before it released its locks: the next run that needs them takes them over)."""
    return holder.host == socket.gethostname() and not pid_is_alive(holder.pid)


class LockHandle:
    """The locks held by this process; a context manager that releases them on exit."""

    def __init__(
        self,
        store: StateStore,
        holder: LockHolder,
        keys: Collection[str],
        warning: str | None = None,
    ) -> None:
        self.holder = holder
        #: the keys held: resource names, or ``("*",)`` for the whole workspace
        self.keys = tuple(sorted(keys))
        #: set when a lock was taken over from a dead process
        self.warning = warning
        self._store = store
        self._released = False
        self._lost = False

    @property
    def holder_id(self) -> str:
        return self.holder.holder_id

    @property
    def released(self) -> bool:
        return self._released

    def covers(self, resource: str) -> bool:
        """Whether this handle holds ``resource`` (or the whole workspace)."""
        return WORKSPACE in self.keys or resource in self.keys

    def heartbeat(self) -> None:
        """Refresh the heartbeat; raise StateError if this run no longer holds its locks."""
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
        except DatabaseNotAnsweringError:
            raise  # not a lock lost: a server that stopped answering, said as such
        except DatabaseUnavailableError:  # PostgreSQL: the session, and so the lock, is gone
            return False

    def release(self) -> None:
        """Drop the locks that are still ours; safe to call twice."""
        if self._released:
            return
        self._released = True
        try:
            self._store.delete_lock_row(self.holder_id)
            _release_holder_lock(self._store, self.holder_id)
        except DatabaseUnavailableError:
            pass  # PostgreSQL: the session ended, and the server released its locks with it

    def __enter__(self) -> LockHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


@dataclass(frozen=True)
class _Conflict:
    """Why a take failed: the key in conflict, and its live holder (None: not known yet)."""

    key: str
    holder: LockHolder | None


def lock_keys(resources: Iterable[str] | None) -> frozenset[str]:
    """The keys a run on ``resources`` locks: their names; None (or none) is the workspace."""
    names = frozenset(resources or ())
    return names or frozenset({WORKSPACE})


def acquire_lock(
    store: StateStore,
    *,
    command: str,
    info: RunInfo,
    resources: Iterable[str] | None = None,
    timeout: float = 0.0,
    poll_interval: float = 0.2,
    stale_after: timedelta = STALE_AFTER,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    run_id: int | None = None,
    on_wait: Callable[[str, str, LockHolder | None], None] | None = None,
) -> LockHandle:
    """Lock ``resources`` (names; None: the whole workspace) for ``command``: all or none,
    waiting up to ``timeout`` seconds while any of them is held by a live run.

    ``on_wait`` is called once, with one line naming the resource and its holder, the key in
    conflict (a resource, or ``WORKSPACE``) and the holder (None: not known yet), when the run
    starts to wait (so a CI log says why it is quiet); not when ``timeout`` is 0.

    Raises ``StateLockedError`` (exit 3) naming the holder and the resource in conflict if one
    is still held when the time is up. ``run_id`` only labels ``lock.takeover`` events.
    Must not be called inside ``store.atomic()``: waiting there would keep the database's
    write lock and stop the holder from ever releasing.
    """
    if store.in_transaction:
        raise RuntimeError("acquire_lock() must not be called inside StateStore.atomic()")
    keys = lock_keys(resources)
    deadline = clock() + max(timeout, 0.0)
    while True:
        try:
            # a database kept busy by another process is waited for as the lock is: up to
            # the time left (at least MIN_BUSY_WAIT_SECONDS), not the 30 s of a run's writes
            with store.busy_wait(busy_wait_for(deadline - clock())):
                handle, conflict = _try_take(store, command, info, keys, run_id)
        except DatabaseBusyError as busy:
            # another process kept the database's write lock past the busy timeout (a run
            # paused or stuck inside a transaction): locked as surely as by a lock row, and
            # this run has changed nothing yet
            if clock() >= deadline:
                raise busy_as_locked(busy) from busy
            sleep(min(poll_interval, deadline - clock()))
            continue
        if handle is not None:
            return handle
        assert conflict is not None
        remaining = deadline - clock()
        if remaining <= 0:
            err = StateLockedError(_locked_message(store, keys, conflict, timeout, stale_after))
            if conflict.key != WORKSPACE:
                err.resource = conflict.key  # what --json's error names (its message says it)
            raise err
        if on_wait is not None:
            on_wait(_waiting_message(conflict, timeout), conflict.key, conflict.holder)
            on_wait = None
        sleep(min(poll_interval, max(remaining, 0.01)))


def _waiting_message(conflict: _Conflict, timeout: float) -> str:
    what = "the whole workspace" if conflict.key == WORKSPACE else f"resource {conflict.key}"
    holder = "a run that is starting or stopping"
    if conflict.holder is not None:
        holder = describe_holder(conflict.holder)
    return f"{what} is locked by another run: {holder}; waiting up to {timeout:g} s for it"


def _conflicts(rows: dict[str, LockHolder], keys: frozenset[str]) -> list[tuple[str, LockHolder]]:
    """The rows that stand in the way of ``keys``: the same keys, and the workspace-wide lock
    against any resource (or any resource against the workspace-wide lock)."""
    if WORKSPACE in keys:
        return list(rows.items())
    return [(k, h) for k, h in rows.items() if k in keys or k == WORKSPACE]


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
      lock (its --lock-timeout, at least 2 s), then stops with "stayed busy"; readers go on.
      The writer lock is waited for here as the run lock is, up to ``timeout``.
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
    everything = lock_keys(None)
    while True:
        try:
            with store.busy_wait(busy_wait_for(deadline - clock())):  # as acquire_lock's
                store.db.begin_writer()
        except DatabaseBusyError as busy:  # locked as surely as by a run: exit 3
            raise busy_as_locked(busy) from busy
        rows = store.lock_rows()  # any lock on any resource: the whole state is copied
        live = [(key, h) for key, h in rows.items() if h.host != info.host or pid_is_alive(h.pid)]
        if not live:
            break
        store.db.rollback()
        remaining = deadline - clock()
        if remaining <= 0:
            conflict = _Conflict(*live[0])
            raise StateLockedError(
                _locked_message(store, everything, conflict, timeout, STALE_AFTER)
            )
        sleep(min(poll_interval, remaining))
    dead = {h.holder_id: h for h in rows.values()}
    try:
        yield (
            None
            if not dead
            else "; ".join(
                f"the lock of dead process {h.pid} on host {h.host} (holder {h.holder_id}) "
                f"is left as it is in {store.label}"
                for h in dead.values()
            )
        )
    finally:
        store.db.rollback()


def busy_as_locked(err: DatabaseBusyError) -> StateLockedError:
    """A run that found the state database's write lock held past the busy timeout before
    it changed anything (its run row, its locks): exit 3, as a lock held by another run."""
    return StateLockedError(
        f"{err.message.removesuffix('; try again')}; this run changed nothing: run it again "
        "once that process has let go (`batchspec history` shows the runs in progress; a "
        "process stopped with SIGSTOP or a debugger keeps the lock until it goes on), or "
        "pass --lock-timeout SECONDS (BATCHSPEC_LOCK_TIMEOUT) to wait longer for it (at "
        f"least {MIN_BUSY_WAIT_SECONDS:g} s is waited, whatever it says)"
    )


def _try_take(
    store: StateStore, command: str, info: RunInfo, keys: frozenset[str], run_id: int | None
) -> tuple[LockHandle | None, _Conflict | None]:
    """One check-and-take of every key under the writer lock: a handle, or the conflict."""
    if store.dialect == "postgresql":
        return _try_take_with_sessions(store, command, info, keys, run_id)
    mine = _holder(command, info)
    with store.atomic():
        dead: dict[str, LockHolder] = {}
        for key, holder in _conflicts(store.lock_rows(), keys):
            if holder.host != info.host or pid_is_alive(holder.pid):
                return None, _Conflict(key, holder)
            dead[holder.holder_id] = holder
        _take_over(store, dead.values(), mine, run_id)
        store.write_lock_row(mine, keys)
    return LockHandle(store, mine, keys, _takeover_warning(dead.values(), "dead process")), None


def _try_take_with_sessions(
    store: StateStore, command: str, info: RunInfo, keys: frozenset[str], run_id: int | None
) -> tuple[LockHandle | None, _Conflict | None]:
    """PostgreSQL: a holder's session lock says whether it is alive; the rows say what it holds.

    The new holder's session lock is taken inside the writer transaction that writes its rows,
    so a holder's rows never appear to another run without its session lock.
    """
    mine = _holder(command, info)
    my_key = _holder_key(store, mine.holder_id)
    locked = False
    try:
        with store.atomic():
            held = _held_advisory_keys(store)
            dead: dict[str, LockHolder] = {}
            for key, holder in _conflicts(store.lock_rows(), keys):
                if _is_alive(store, key, holder, held):
                    return None, _Conflict(key, holder)
                dead[holder.holder_id] = holder  # its session, and so its lock, is gone
            store.db.execute("SELECT pg_advisory_lock(?)", (my_key,))  # a new id: free
            locked = True
            _take_over(store, dead.values(), mine, run_id)
            store.write_lock_row(mine, keys)
    except BaseException:
        if locked:
            _release_holder_lock(store, mine.holder_id)
        raise
    warning = _takeover_warning(dead.values(), "a run whose database session has ended: pid")
    return LockHandle(store, mine, keys, warning), None


def _take_over(
    store: StateStore, dead: Iterable[LockHolder], mine: LockHolder, run_id: int | None
) -> None:
    for holder in dead:
        store.delete_lock_row(holder.holder_id)
        # the dead holder's run never recorded its end: it ends now, with no exit code
        ended = store.end_dead_runs(holder.host, holder.pid, holder.since)
        store.record_event(
            run_id,
            "lock.takeover",
            detail={
                "previous": _holder_detail(holder),
                "holder_id": mine.holder_id,
                "ended_runs": ended,
            },
        )


def _takeover_warning(dead: Iterable[LockHolder], what: str) -> str | None:
    """``took over the lock of WHAT PID on host H (holder, command, since)``, per holder."""
    parts = [
        f"{what} {h.pid} on host {h.host} (holder {h.holder_id}, command {h.command!r}, "
        f"held since {h.since})"
        for h in dead
    ]
    return f"took over the lock of {'; '.join(parts)}" if parts else None


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


def _holder_key(store: StateStore, holder_id: str) -> int:
    """The session advisory lock a holder holds while it holds any row: one per run, however
    many resources (PostgreSQL's shared lock table has room for some thousands in all)."""
    db = store.db
    assert isinstance(db, PostgresSql)
    return db.advisory_key(f"lock-holder\0{holder_id}")


def _run_lock_key(store: StateStore) -> int:
    """The one run lock's key before migration m005; a run that held it then still holds it."""
    db = store.db
    assert isinstance(db, PostgresSql)
    return db.advisory_key("run-lock")


def _is_alive(store: StateStore, key: str, holder: LockHolder, held: set[int]) -> bool:
    if _holder_key(store, holder.holder_id) in held:
        return True
    # the run lock carried over by m005 as the workspace-wide row: its holder's session lock
    return key == WORKSPACE and _run_lock_key(store) in held


_ADVISORY_KEYS = (
    "SELECT DISTINCT (classid::bigint << 32) | objid::bigint AS key, pid FROM pg_locks "
    "WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def _held_advisory_keys(store: StateStore) -> set[int]:
    """Every bigint advisory key some session of this database holds."""
    return {int(row["key"]) for row in store.db.query(_ADVISORY_KEYS)}


def _release_holder_lock(store: StateStore, holder_id: str) -> None:
    if store.dialect == "postgresql":
        store.db.execute("SELECT pg_advisory_unlock(?)", (_holder_key(store, holder_id),))


def force_unlock(
    store: StateStore,
    holder_id: str,
    *,
    run_id: int | None = None,
    force: bool = False,
    stale_after: timedelta = STALE_AFTER,
) -> LockHolder:
    """Release every lock held by ``holder_id`` (``batchspec unlock ID``); returns that holder.

    A holder that may be alive (fresh heartbeat, not a dead process on this host) is released
    only with ``force``; otherwise ``StateLockedError`` (exit 3) says so and changes nothing.
    """
    with store.atomic():
        rows = store.lock_rows()
        if not rows:
            raise StateError(f"no lock is held on {store.label}; nothing to unlock")
        keys = sorted(k for k, h in rows.items() if h.holder_id == holder_id)
        if not keys:
            others = {h.holder_id: h for h in rows.values()}
            raise StateError(
                f"no lock on {store.label} is held by {holder_id!r}; nothing was released. "
                "Locks are held by: "
                + "; ".join(describe_holder(h) for h in others.values())
                + ". To release one: "
                + ", ".join(f"batchspec unlock {h}" for h in others)
            )
        current = rows[keys[0]]
        if not force:
            if store.dialect != "postgresql":
                _refuse_if_alive(current, stale_after)
            elif _is_alive(store, keys[0], current, _held_advisory_keys(store)):
                # its session is open: alive by definition (a killed run's session ends, and
                # then it needs no --force, however fresh its heartbeat)
                _refuse_if_alive(current, stale_after, connected=True)
        store.delete_lock_row(holder_id)
        store.record_event(
            run_id,
            "lock.force_unlock",
            detail={**_holder_detail(current), "resources": keys, "forced": force},
        )
    if store.dialect == "postgresql":
        _end_holder_sessions(store, holder_id, workspace=WORKSPACE in keys)
    return current


def _end_holder_sessions(store: StateStore, holder_id: str, *, workspace: bool) -> None:
    """PostgreSQL: the locks are their holder's session, so releasing them ends that session.

    The holder's next statement fails ("lost the connection"), so it stops before changing
    anything else, as a run whose lock rows were deleted does at its next heartbeat.
    """
    wanted = {_holder_key(store, holder_id)} | ({_run_lock_key(store)} if workspace else set())
    try:
        pids = {
            int(row["pid"]) for row in store.db.query(_ADVISORY_KEYS) if int(row["key"]) in wanted
        }
        pids.discard(int(store.db.execute("SELECT pg_backend_pid()").fetchone()[0]))
        for pid in sorted(pids):
            store.db.execute("SELECT pg_terminate_backend(?, 5000)", (pid,))
    except DatabaseError as err:
        raise StateError(
            f"released the lock's record on {store.label}, but could not end the holder's "
            f"database session ({err}); a role allowed to (pg_signal_backend) must end it, "
            "or the holder must stop"
        ) from err


def _refuse_if_alive(
    holder: LockHolder, stale_after: timedelta, *, connected: bool = False
) -> None:
    """Refuse (exit 3) to release a holder that may still be running. ``connected``: its
    PostgreSQL session is open, so it is running (not merely may be)."""
    if not connected and holder_process_gone(holder):
        return  # its process is gone: nothing can still be spending under this lock
    age = _heartbeat_age(holder)
    if age is None or age >= stale_after:
        return
    heartbeat = (
        f"its last heartbeat was {int(age.total_seconds())} s ago, under the "
        f"{_minutes(stale_after)} after which a run counts as possibly stale"
    )
    if connected:
        raise StateLockedError(
            f"not unlocking: {describe_holder(holder)} is still running: its database "
            f"session is open ({heartbeat}); releasing a live run lets a second one spend "
            "beside it, and a create it sent may still be in transit",
            details=[
                "wait for that run to finish (a run that ends or is killed frees its locks "
                "by itself)",
                f"to stop it: batchspec unlock {holder.holder_id} --force (ends its database "
                "session; it stops at its next step)",
            ],
        )
    raise StateLockedError(
        f"not unlocking: {describe_holder(holder)} may still be running ({heartbeat}); "
        "releasing a live run lets a second one spend beside it, and a create it sent may "
        "still be in transit",
        details=[
            "wait for that run to finish, or stop it",
            f"if you are sure it is gone: batchspec unlock {holder.holder_id} --force",
        ],
    )


def _minutes(span: timedelta) -> str:
    minutes = span.total_seconds() / 60
    return f"{minutes:g} minutes" if minutes != 1 else "1 minute"


def held_locks(store: StateStore) -> list[HeldLock]:
    """Every lock held now, by key (resource names, ``*`` for the whole workspace).

    In PostgreSQL a row whose session lock nobody holds is a dead run's: that lock is free.
    """
    rows = store.lock_rows()
    if rows and store.dialect == "postgresql":
        held = _held_advisory_keys(store)
        alive = {h.holder_id for k, h in rows.items() if _is_alive(store, k, h, held)}
        rows = {k: h for k, h in rows.items() if h.holder_id in alive}
    return [HeldLock(key, holder) for key, holder in rows.items()]


def runs_whose_session_ended(store: StateStore, runs: Iterable[RunRow]) -> frozenset[int]:
    """PostgreSQL: the ids of those ``runs`` that recorded no end and whose session lock
    (``batchspec.state.runs.run_session_key``) nobody holds now: killed, on whatever host,
    before they recorded their end (one read of the runs and one of ``pg_locks``, however
    many runs, and one more of those found free). Empty for SQLite, and for runs that never
    held one (``m008``'s docstring).

    A run commits its end before it lets its lock go, so one still with no end once the
    locks were read had no end while its lock was free: killed. One that ended between the
    two first reads (its end committed, its lock let go) was called killed after an exit 0."""
    if store.dialect != "postgresql":
        return frozenset()
    candidates = store.unfinished_runs_with_session_lock(r.id for r in runs if r.ended_at is None)
    if not candidates:
        return frozenset()
    held = _held_advisory_keys(store)
    free = [i for i in candidates if run_session_key(store.db, i) not in held]
    return frozenset(store.unfinished_runs_with_session_lock(free))


def current_lock(store: StateStore, resource: str | None = None) -> LockHolder | None:
    """The live holder of ``resource``'s lock (None: of any lock), or None if it is free."""
    for lock in held_locks(store):
        if resource is None or lock.resource in (resource, WORKSPACE):
            return lock.holder
    return None


def describe_holder(holder: LockHolder) -> str:
    """One line naming a holder: id, who, where, which command, which CI run, since when."""
    who = f"{holder.user}@{holder.host}" if holder.user else holder.host
    text = f"{holder.holder_id} ({who}, pid {holder.pid}, command {holder.command!r}"
    if holder.ci_run_url:
        text += f", CI run {holder.ci_run_url}"
    return text + f", since {holder.since})"


def _what(keys: Collection[str]) -> str:
    if WORKSPACE in keys:
        return "the whole workspace"
    names = sorted(keys)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"resource{'s' if len(names) > 1 else ''} {shown}"


def _locked_message(
    store: StateStore,
    keys: Collection[str],
    conflict: _Conflict,
    timeout: float,
    stale_after: timedelta,
) -> str:
    waited = f"(waited {timeout:g} s)" if timeout > 0 else "(not waiting: --lock-timeout 0)"
    holder = conflict.holder
    in_conflict = (
        "the whole workspace (a workspace-wide lock)"
        if conflict.key == WORKSPACE
        else f"resource {conflict.key}"
    )
    if holder is None:
        return (
            f"{in_conflict} in the state database {store.label} is locked by another run "
            f"{waited}: a run that is starting, or whose lock was released with "
            f"`batchspec unlock` and that stops at its next step; try again"
        )
    message = (
        f"{in_conflict} in the state database {store.label} is locked by another run {waited}: "
        f"{describe_holder(holder)}, last heartbeat {holder.heartbeat}. This run needs "
        f"{_what(keys)}."
    )
    age = _heartbeat_age(holder)
    # in PostgreSQL the holder's session is alive by definition: never "possibly stale"
    if age is not None and age > stale_after and store.dialect != "postgresql":
        message += (
            f" Its heartbeat is {int(age.total_seconds() // 60)} minutes old: it is possibly "
            "stale (a crashed run on another machine)."
        )
    if store.dialect == "postgresql":  # a holder that is gone has freed its locks already
        return message + (
            " It is still running (its database session is open; a run that ends or is killed "
            "frees its locks at once): wait for it to finish, or pass --lock-timeout SECONDS "
            "(BATCHSPEC_LOCK_TIMEOUT) to wait for it; to stop it: "
            f"batchspec unlock {holder.holder_id} --force"
        )
    if holder_process_gone(holder):  # it died since this run looked (or cannot be told apart)
        return message + (
            f" Its process (pid {holder.pid}) is no longer running on this host: the run was "
            "killed before it released its lock. Release the lock with: "
            f"batchspec unlock {holder.holder_id}"
        )
    return message + (
        " Wait for it to finish or pass --lock-timeout SECONDS (BATCHSPEC_LOCK_TIMEOUT) to "
        "wait; if that run is gone, release the lock with: "
        f"batchspec unlock {holder.holder_id}"
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
    "WORKSPACE",
    "HeldLock",
    "LockHandle",
    "LockHolder",
    "acquire_lock",
    "current_lock",
    "describe_holder",
    "force_unlock",
    "held_locks",
    "holder_process_gone",
    "lock_keys",
    "pid_is_alive",
    "runs_whose_session_ended",
]
