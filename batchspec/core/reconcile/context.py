"""The run context every reconcile step shares: the project, the state, the run and its limits.

A ``RunContext`` is built once per run by ``Reconciler``; every step (``submit``, ``poll``,
``collect``, ``retry``, ``restore``, ``cancel``) is a function of it and the resource at hand.
It promises one source of each thing a step needs: one state store and request ledger, one
result store for collected files and shard files (local, with the shared tier when the state
is shared: ``remote_blobs_for``), one input cache (the scans of this run, and the request
indexes that spare re-reading an input: ``request_facts``), one provider factory, and
``still_holds_lock``, the run's lock
check that the submit step calls right before every create so a run whose lock was released
stops spending at once. It makes no decision itself (the plan and the steps do).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from batchspec.core.recorded import DiskHashes
from batchspec.core.reporting import Reporter
from batchspec.core.sharding import ShardLimits, indexed_ledger_rows, ledger_rows_in_shards
from batchspec.errors import BatchspecError, ProviderError
from batchspec.providers.base import BatchListing, Provider, RemoteBatch
from batchspec.state.ledger import RequestLedger
from batchspec.state.store import BatchRow, GenerationRow, ResourceRow, StateStore, utc_timestamp
from batchspec.storage.blobstore import BlobStore
from batchspec.storage.remote_blobs import RemoteBlobs, open_blob_location
from batchspec.storage.result_store import Refetch, ResultStore
from batchspec.wire.request_index import (
    InputChangedError,
    RequestFact,
    is_complete,
    read_request_index,
)
from batchspec.workspace.inputcache import InputCache, index_dir_beside
from batchspec.workspace.manifest import (
    Confinement,
    Project,
    Resource,
    confinement,
    refuse_unconfined_write,
)
from batchspec.workspace.resolving import FolderResolver

ProviderFactory = Callable[[str], Provider]

T = TypeVar("T")


class CallPool(Protocol):
    """A bounded pool of provider calls (``prefetch.BoundedCalls``)."""

    def submit(self, provider: str, call: Callable[[], T]) -> Future[T]: ...


#: how long a step waits for a download fetched ahead before it calls ``before_wait``: the
#: next file of a pass is usually a few milliseconds away, a large one may be minutes
WAIT_GRACE = 0.1


@dataclass(frozen=True)
class DownloadFailure:
    """A current generation's batch that ended but whose file could not be downloaded this
    run (``collect``): nothing of it is recorded as collected and nothing is resubmitted;
    the next apply downloads it again. Within the run it is tried again on a later pass no
    sooner than ``retry_at`` (on ``RunContext.monotonic``), after ``failures`` failures."""

    resource: str
    batch_id: int
    remote_id: str
    file: str  # "output" or "errors"
    file_id: str
    error: str
    status: int | None  # the provider's HTTP status, None when it was not reached
    failures: int
    retry_at: float

    def to_json(self) -> dict[str, object]:
        return {
            "resource": self.resource,
            "remote_id": self.remote_id,
            "file": self.file,
            "file_id": self.file_id,
            "error": self.error,
            "http_status": self.status,
        }


@dataclass(frozen=True)
class _Source:
    """A provider file that a stored blob is a copy of (``RunContext._source_of``)."""

    provider: str
    file_id: str
    #: the batch whose file it is, when this state records it
    batch: BatchRow | None
    generation_id: int | None = None


@dataclass
class Prefetched:
    """Provider calls made ahead (``prefetch``, ``cancel.cancel_ahead``), each taken once by
    the step that would have made it: a poll by (provider, remote id), a file's sha256 in the
    blob store by (provider, file id), a download as its future, waited for when taken; a
    cancel's answer by (provider, remote id), as its future too. A call that failed is
    raised when taken."""

    polls: dict[tuple[str, str], RemoteBatch | BaseException] = field(default_factory=dict)
    files: dict[tuple[str, str], Future[str]] = field(default_factory=dict)
    #: the pass's one newest-first scan of each provider's batches, for key lookups
    listings: dict[str, BatchListing] = field(default_factory=dict)
    #: a provider whose listing, read ahead, failed after its client's retries: the pass's
    #: lookups raise this, not ask again (a server that is down cost its retries twice)
    listing_failures: dict[str, ProviderError] = field(default_factory=dict)
    #: cancels sent ahead, side by side, of the batches the serial cancel steps will cancel
    cancels: dict[tuple[str, str], Future[RemoteBatch]] = field(default_factory=dict)
    #: by resource, the answers a lost state forgot, found at the provider for a new
    #: generation about to draw its shards (``recover.recover_ahead``), taken once
    recovered: dict[str, object] = field(default_factory=dict)
    #: by provider, the keyed batches of its listing grouped by resource (``recover``)
    keyed_batches: dict[str, object] = field(default_factory=dict)

    def take_poll(self, provider: str, remote_id: str) -> RemoteBatch | None:
        return _unwrap(self.polls.pop((provider, remote_id), None))

    def take_file(
        self, provider: str, file_id: str, before_wait: Callable[[], None] = lambda: None
    ) -> str | None:
        """The file's sha256 once its download (still running, perhaps) has ended;
        ``before_wait`` is called if it has not ended within ``WAIT_GRACE`` seconds."""
        download = self.files.pop((provider, file_id), None)
        if download is None:
            return None
        try:
            return download.result(timeout=WAIT_GRACE)
        except FutureTimeout:
            before_wait()
        return download.result()

    def take_cancel(
        self, provider: str, remote_id: str, before_wait: Callable[[], None] = lambda: None
    ) -> RemoteBatch | None:
        """The batch as the cancel sent ahead answered it, once that call has ended (its
        error raised); None if no cancel was sent ahead for it (the step sends it itself)."""
        cancel = self.cancels.pop((provider, remote_id), None)
        if cancel is None:
            return None
        try:
            return cancel.result(timeout=WAIT_GRACE)
        except FutureTimeout:
            before_wait()
        return cancel.result()


def _unwrap(found: T | BaseException | None) -> T | None:
    if isinstance(found, BaseException):
        raise found
    return found


@dataclass
class RunContext:
    """What every step of one run reads and writes through."""

    project: Project
    store: StateStore
    run_id: int
    provider_for: ProviderFactory
    report: Reporter
    limits_for: Callable[[Resource], ShardLimits]
    max_in_flight: Callable[[str], int | None]
    requeue_backoff: float
    clock: Callable[[], float]
    # raises StateLockedError/StateError when this run no longer holds the lock; called
    # right before every create, so a run whose lock was released stops spending at once
    still_holds_lock: Callable[[], None]
    # whether this run may record what it saw of a resource it did not lock (no other run
    # holds that resource's lock); asked inside the transaction that would write
    may_touch: Callable[[str], bool] = lambda resource: True
    # waits between lookups of a create whose answer was lost (injectable: tests run fast)
    sleep: Callable[[float], None] = time.sleep
    # what this pass fetched ahead, in parallel (batchspec.core.reconcile.prefetch)
    prefetched: Prefetched = field(default_factory=Prefetched)
    # the bounded pool of the pass (or of the cancels) under way, None outside one: a step
    # that cancels sends its cancels ahead through it (``cancel.cancel_ahead``)
    calls: CallPool | None = None
    # called before a step waits on a provider (a call, or a download not yet ended): a
    # pass's commit group is committed then, never holding the writer lock while it waits
    before_wait: Callable[[], None] = lambda: None
    # the run's input cache (its scans, and the request indexes they wrote); None: a
    # private one over the state's index folder
    inputs: InputCache | None = None
    # the clock that paces polling (``apply``'s own), and when the run's last create was
    # answered on it (None: no create yet): the polls after a create are counted from it,
    # not from the end of the work the pass does after it
    monotonic: Callable[[], float] = time.monotonic
    last_create_at: float | None = None
    # each batch's last seen progress (its create counts as none done), and how soon the
    # polls of the pass under way expect a batch to finish (``poll.note_progress``)
    progress: dict[str, tuple[float, int]] = field(default_factory=dict)
    done_in: float | None = None
    # generations found this run with no ledger and no copy of their input content left
    # (``drain``): not looked for again per batch and per pass; the next run tries again
    contentless: set[int] = field(default_factory=set)
    # batches seen ended with answers but without their output file this run (``poll``):
    # taken as still finalizing, said once each
    finalizing_said: set[str] = field(default_factory=set)
    # providers whose batch listing failed on this run (``prefetch``): polled by id for the
    # rest of it, not listed (and waited for through the listing's retries) again each pass
    unlisted: set[str] = field(default_factory=set)
    # how many of this run's passes read one batch of each provider's listing by id, to
    # check that the listing is not behind (``prefetch._listing_is_behind``)
    listing_checks: Counter[str] = field(default_factory=Counter)
    # how many of those checks found the listing showing an ended batch running
    listings_behind: Counter[str] = field(default_factory=Counter)
    # the run's hashes of result files on disk: its plans hash an unchanged file once
    disk_hashes: DiskHashes = field(default_factory=dict)
    # the stored files this run downloaded (hashed as they were filed): a generation's
    # result files are written from them as they are; any other of its stored files (an
    # earlier pass's or run's) is checked against its name first (``_finish_generation``)
    filed_blobs: set[str] = field(default_factory=set)
    # the current generations' batches whose files could not be downloaded, by batch row
    # id, until one of this run's later passes collects them (``collect``)
    download_failures: dict[int, DownloadFailure] = field(default_factory=dict)
    # retired generations' batches a drain step failed on this run, by batch row id: how
    # many times, and when a later pass may try again (``drain.drain_retired``)
    drain_failures: dict[int, tuple[int, float]] = field(default_factory=dict)
    ledger: RequestLedger = field(init=False)
    blobs: ResultStore = field(init=False)
    shard_dir: Path = field(init=False)
    _confinement: Confinement | None = field(default=None, init=False, repr=False)
    _root: Path | None = field(default=None, init=False, repr=False)
    # relative() of each path asked: a resolve costs an lstat per component, asked thrice a
    # resource (a symlink changed mid-run changes no recorded path's meaning: it names the file)
    _relative: dict[Path, str] = field(default_factory=dict, init=False, repr=False)
    # each folder's symlinks resolved once (the three paths of a thousand resources lie in
    # a few folders): a Path.resolve() per path walked every component again
    _folders: FolderResolver = field(default_factory=FolderResolver, init=False, repr=False)
    # the folders result files are written into, resolved once a pass while each is still the
    # directory it was (``check_result_paths``)
    _pass_folders: FolderResolver = field(
        default_factory=lambda: FolderResolver(recheck=True), init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.ledger = self.store.ledger()
        local = BlobStore(self.project.state_path.parent / "store")
        local.sweep_stale_tmp()  # a killed run's writes (another run's now are fresh)
        self.blobs = ResultStore(
            local,
            remote_blobs_for(self.project, self.store),
            refetch=self._refetch,
            on_repair=self._blob_repaired,
        )
        self.shard_dir = self.project.state_path.parent / "shards"
        if self.inputs is None:
            self.inputs = InputCache(None, index_dir=index_dir_beside(self.project.state_path))

    def request_facts(self, res: Resource, sha256: str) -> Iterator[RequestFact]:
        """Every request of input content ``sha256`` (``res``'s input), from its request
        index: kept by the scan that validated it, else made by reading the input once more
        (``InputChangedError`` when the input no longer holds that content)."""
        assert self.inputs is not None
        return self.inputs.request_facts(res.input_path, sha256)

    def _kept_request_facts(self, gen: GenerationRow) -> Iterator[RequestFact] | None:
        """The requests of ``gen``'s input content from the index its first shard's intent put into
        the result store (``intent.keep_request_index``); None without one."""
        sha = kept_request_index(self.store, gen)
        if sha is None:
            return None
        try:
            path = self.blobs.ensure_local(sha)
        except BatchspecError:
            return None
        return read_request_index(path) if is_complete(path, gen.input_sha256) else None

    def require_unchanged_input(self, res: Resource, sha256: str) -> None:
        """Refuse (``InputChangedError``) an input that no longer holds content ``sha256``."""
        assert self.inputs is not None
        self.inputs.require_unchanged(res.input_path, sha256)

    def download_due(self, batch_id: int) -> bool:
        """Whether a batch's files are to be downloaded in this pass: none failed this run,
        or the pause after the last failure (``DownloadFailure.retry_at``, or a drain's:
        ``drain_failures``) is over."""
        failure = self.download_failures.get(batch_id)
        drained = self.drain_failures.get(batch_id)
        return (failure is None or self.monotonic() >= failure.retry_at) and (
            drained is None or self.monotonic() >= drained[1]
        )

    def generation(self, res: Resource) -> GenerationRow:
        gen = self.store.find_generation(res.name, res.spec_hash)
        if gen is None:  # the planner only routes here when it exists
            raise BatchspecError(f"no generation recorded for {res.name} {res.spec_hash[:12]}")
        return gen

    def upsert_resource(self, res: Resource) -> ResourceRow:
        return self.store.upsert_resource(
            res.name,
            provider=res.provider,
            manifest=self.relative(res.source.file),
            labels=dict(res.labels),
            run_id=self.run_id,
        )

    def ensure_ledger(self, res: Resource | None, gen: GenerationRow) -> None:
        """Write the ledger of a new generation, if not yet written.

        It is derived from the input and the recorded intents alone: the shards split the
        requests in input order into consecutive runs, shard ``k`` holding as many as its
        attempt-1 intent says (all in shard 0 with no intent yet), each carried by attempt 1.
        So a run that died before writing it loses nothing: the next one writes it here. It
        comes from the request index of the generation's input content, not from parsing
        the input again. (A generation that keeps an earlier one's answers has its ledger
        written with its intents, before anything is sent: ``intent.record_shards``.)
        With no ``res`` (a resource pruned from the workspace: no input to read), only the
        index its intent kept can write it (``InputChangedError`` without one).
        """
        if self.ledger.has_requests(gen.id):
            return
        counts = {b.shard: b.requests for b in self.store.batches(gen.id) if b.attempt == 1}
        try:
            if res is None:
                raise InputChangedError(f"generation {gen.id} has no manifest to read it from")
            facts = self.request_facts(res, gen.input_sha256)
        except InputChangedError:  # the input holds other content now, its index is gone
            kept = self._kept_request_facts(gen)
            if kept is None:
                raise
            facts = kept
        rows = (
            ledger_rows_in_shards(facts, [counts[s] for s in sorted(counts)])
            if len(counts) > 1
            else indexed_ledger_rows(facts)
        )
        with self.store.atomic():
            self.ledger.record_requests(gen.id, rows)

    def latest_attempts(self, generation_id: int) -> dict[int, int]:
        latest: dict[int, int] = {}
        for b in self.store.batches(generation_id):
            latest[b.shard] = max(latest.get(b.shard, 0), b.attempt)
        return latest

    def create_confirm_window(self, provider: str) -> float:
        """Seconds a create whose answer was lost counts as possibly made on ``provider``."""
        from batchspec.providers.registry import create_confirm_seconds  # httpx: on use

        config = self.project.providers.get(provider)
        return create_confirm_seconds(config) if config is not None else 0.0

    def check_result_paths(self, res: Resource) -> None:
        """Refuse to write ``res``'s result files if a symlink now points them somewhere the
        load would have refused (onto the state, out of the workspace).

        Each folder is resolved once a pass (``new_pass``): a thousand resources write into a
        few folders, and a ``Path.resolve()`` per file walked every component of each path
        again (a fifth of collecting a small batch). Each check stats each folder (once for
        the paths it checks in it: ``resolve_together``): one swapped for a symlink since it
        was resolved (between two resources' writes of one pass) is resolved again; a path
        found forbidden is checked again by ``refuse_unconfined_write``, resolved whole,
        which raises with its reasons."""
        if self._confinement is None:
            self._confinement = confinement(self.project)
        exports = [("export", target.path) for target in res.exports]
        writes = [("output", res.output_path), ("errors", res.errors_path), *exports]
        # one look at each folder for all of them (output and errors share theirs)
        manifest, *resolved = self._pass_folders.resolve_together(
            [res.source.file, *(path for _, path in writes)]
        )
        for (key, path), target in zip(writes, resolved, strict=True):
            if self._confinement.forbidden(target, key, manifest) is not None:
                refuse_unconfined_write(
                    self.project, path, key, res.source.file, within=self._confinement
                )

    def new_pass(self) -> None:
        """A pass begins: the folders its result files are written into are resolved anew
        (``check_result_paths``)."""
        self._pass_folders = FolderResolver(recheck=True)

    def _source_of(self, sha256: str) -> _Source | None:
        """Where blob ``sha256`` came from: the output or error file of a batch collected as
        it (the newest such batch), else an earlier generation's output file whose answers a
        lost state kept (named by its ``recover`` event: no batch of this state has it)."""
        for batch in reversed(self.store.batches()):
            if batch.output_sha256 == sha256 and batch.output_file_id:
                return _Source(batch.provider, batch.output_file_id, batch)
            if batch.errors_sha256 == sha256 and batch.error_file_id:
                return _Source(batch.provider, batch.error_file_id, batch)
        for event in reversed(self.store.events(action="recover")):
            files = event.detail.get("files")
            provider = event.detail.get("provider")
            file_id = files.get(sha256) if isinstance(files, dict) else None
            if isinstance(file_id, str) and isinstance(provider, str):
                return _Source(provider, file_id, None, event.generation_id)
        return None

    def _refetch(self, sha256: str) -> Refetch | None:
        """Where a collected file can be downloaded again (a damaged shared copy's repair)."""
        found = self._source_of(sha256)
        if found is None:
            return None

        def write(dest: Path) -> None:
            self.provider_for(found.provider).download_file(found.file_id, dest)

        return Refetch(f"the file {found.file_id} of provider {found.provider}", write)

    def _blob_repaired(self, sha256: str, where: str) -> None:
        found = self._source_of(sha256)
        batch = found.batch if found else None
        self.store.record_event(
            self.run_id,
            "blob.repaired",
            batch_id=batch.id if batch else None,
            generation_id=batch.generation_id if batch else found.generation_id if found else None,
            detail={"sha256": sha256, "from": where},
        )

    def relative(self, path: Path, *, written: bool = False) -> str:
        """``path`` relative to the project's root, resolved (once a run). ``written``: the
        run has just renamed a file of its own onto ``path`` (``write_atomically``), so no
        symlink is there and its lstat is spared."""
        known = self._relative.get(path)
        if known is not None:
            return known
        if self._root is None:
            self._root = self.project.root.resolve()
        resolved = self._folders.resolve(path, plain=written)
        # a prefix of the two resolved paths' texts, as ``relative_to`` finds it (pathlib
        # parsed both again: most of a thousand resources' relative paths)
        text, root = str(resolved), str(self._root).rstrip(os.sep) + os.sep
        if text.startswith(root) and len(text) > len(root):
            found = text[len(root) :]
        else:
            try:
                found = str(resolved.relative_to(self._root))
            except ValueError:
                found = str(path)
        self._relative[path] = found
        return found


def remote_blobs_for(project: Project, store: StateStore) -> RemoteBlobs | None:
    """The result store's shared tier: ``state.blobs`` if the project names one, else the
    state's own (a PostgreSQL state's tables; an SQLite state has none)."""
    if project.state_blobs is not None:
        return open_blob_location(project.state_blobs)
    return store.shared_blobs()


def now() -> str:
    # milliseconds: a requeue backoff of a few seconds is measured from terminal_at
    return utc_timestamp()


def kept_request_index(store: StateStore, gen: GenerationRow) -> str | None:
    """The sha256 of the request index ``gen``'s first shard's intent put into the result
    store (``intent.keep_request_index``: a ledger written after the creates), if any."""
    firsts = [b for b in store.batches(gen.id) if b.attempt == 1]
    first = min(firsts, key=lambda b: b.shard, default=None)
    event = store.last_batch_event(first.id, "intent") if first else None
    sha = (event.detail or {}).get("request_index") if event else None
    return sha if isinstance(sha, str) else None
