"""The ``local`` provider: the embedded batch engine, driven in-process.

Implements ``base.Provider`` by calling ``batchspec.engine.Engine`` directly (no HTTP), and
parses its OpenAI-shaped dicts with the same lenient ``parse_batch`` / ``parse_file`` as the
OpenAI-compatible provider, so the reconciler cannot tell the two apart.

The engine is opened on first use (building the provider does no I/O) and its worker runs
on a background thread only while this provider is open: a batch progresses while a process
holding it runs, and resumes where it stopped at the next open. ``close()`` stops the worker
cleanly (in-flight requests finish, results are committed). One process at a time may hold
a data folder; a second (or a running ``batchspec serve`` on it) raises ``StateLockedError``.

Engine refusals become ``ProviderError`` with the engine's status and code; 404 becomes
``RemoteNotFound``. A cancel of a batch that has already ended returns that batch as it is.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from batchspec.engine import Engine, EngineError, Upstream, UpstreamTarget, make_upstreams
from batchspec.errors import ProviderError
from batchspec.providers.base import (
    RemoteBatch,
    RemoteFile,
    RemoteNotFound,
    UploadProgress,
    parse_batch,
    parse_file,
)
from batchspec.wire.batch_status import NOTHING_TO_CANCEL

T = TypeVar("T")


#: a copy that failed with one of these failed to write (a full disk, a quota, a size limit)
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class LocalProvider:
    """A ``Provider`` over the in-process engine storing its data in ``data_dir``.

    ``upstream`` is ``"builtin"``, an OpenAI-compatible base URL (key from
    ``upstream_api_key_env``), a list of those (``URL`` strings, optionally ``URL#rpm=…``, or
    ``UpstreamTarget``: a rotation, see ``batchspec.engine.balancer``) or an ``Upstream``
    object; ``engine_kwargs`` go to ``Engine``.
    """

    lists_newest_first = True  # the engine lists newest first

    def __init__(
        self,
        name: str,
        data_dir: Path,
        *,
        upstream: str | Sequence[str | UpstreamTarget] | Upstream = "builtin",
        upstream_api_key_env: str | None = None,
        concurrency: int = 8,
        run_batches: bool = True,
        **engine_kwargs: Any,
    ) -> None:
        """``run_batches=False`` (``batchspec cancel``): the engine's worker never starts, so
        the command runs none of the engine's batches (a started worker resumes every batch in
        progress and sends their requests, those of batches about to be cancelled too); the
        next process that runs the engine ends the cancelled ones."""
        self.name = name
        self._run_batches = run_batches
        self.data_dir = Path(data_dir)
        self._upstream_spec = upstream
        self._upstream_api_key_env = upstream_api_key_env
        self._concurrency = concurrency
        self._engine_kwargs = engine_kwargs
        self._engine: Engine | None = None
        self._started = False  # the engine's worker runs (see ``cancel_batch``)

    def __repr__(self) -> str:
        return f"LocalProvider({self.name!r}, data_dir={str(self.data_dir)!r})"

    def __enter__(self) -> LocalProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The running engine, opened and started on first use."""
        engine = self._opened()
        if not self._started and self._run_batches:
            self._started = True
            engine.start()
        return engine

    def claim(self) -> None:
        """Open the engine, taking its data folder's lock (``StateLockedError`` while another
        process holds it), without starting its worker."""
        self._opened()

    def _opened(self) -> Engine:
        """The engine, opened on first use; its worker not started by this (see
        ``cancel_batch``)."""
        if self._engine is None:
            spec = self._upstream_spec
            if isinstance(spec, (str, list, tuple)):
                upstream = make_upstreams(
                    [spec] if isinstance(spec, str) else spec,
                    api_key_env=self._upstream_api_key_env,
                    max_connections=max(2 * self._concurrency, 16),
                    request_timeout=float(self._engine_kwargs.get("request_timeout", 60.0)),
                )
            else:
                upstream = cast("Upstream", spec)
            self._engine = Engine(
                self.data_dir, upstream, concurrency=self._concurrency, **self._engine_kwargs
            )
        return self._engine

    # -- Provider ----------------------------------------------------------------------------

    def upload_file(
        self,
        path: Path,
        *,
        filename: str,
        purpose: str = "batch",
        progress: UploadProgress | None = None,
    ) -> RemoteFile:
        return parse_file(self._call(self.engine.create_file, Path(path), filename, purpose))

    def get_file(self, file_id: str) -> RemoteFile:
        return parse_file(self._call(self.engine.get_file, file_id))

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
    ) -> RemoteBatch:
        created = self._call(
            self.engine.create_batch, input_file_id, endpoint, completion_window, dict(metadata)
        )
        return parse_batch(created)

    def get_batch(self, batch_id: str) -> RemoteBatch:
        return parse_batch(self._call(self.engine.get_batch, batch_id))

    def list_batches(
        self, *, page_size: int = 100, after: str | None = None
    ) -> Iterator[RemoteBatch]:
        while True:
            page = self._call(self.engine.list_batches, after, min(max(page_size, 1), 100))
            for item in page["data"]:
                yield parse_batch(item)
            if not page["has_more"] or not page["data"]:
                return
            after = page["last_id"]

    def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Cancel a batch; one that has ended, or is already stopping or finalizing, meanwhile
        (409: not cancellable) is returned as it is, as the HTTP providers do.

        A command that opens the engine to cancel cancels before the worker starts: started
        first, it resumed the batch and sent (and paid for) requests of the very batch being
        cancelled, then waited for their answers. The worker starts right after (in an apply:
        it ends the batch and runs the others); ``batchspec cancel``, which cancels batch
        after batch, never starts it (``run_batches``)."""
        engine = self._opened()
        try:
            cancelled = engine.cancel_batch(batch_id)
        except EngineError as err:
            if err.status == 409:
                remote = self.get_batch(batch_id)
                if remote.is_terminal or remote.status in NOTHING_TO_CANCEL:
                    return remote
            raise provider_error(self.name, err) from None
        _ = self.engine  # the worker starts now: it ends the cancelled batch
        return parse_batch(cancelled)

    def download_file(self, file_id: str, dest: Path) -> int:
        source = self._call(self.engine.file_content_path, file_id)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        try:
            shutil.copyfile(source, partial)
            os.replace(partial, dest)
        except OSError as err:
            partial.unlink(missing_ok=True)  # on a full disk, the room it took is wanted back
            if err.filename2 != str(partial) or err.errno not in _WRITE_ERRNOS:
                raise
            # shutil names the engine's file first, the copy second: the write failed
            raise OSError(err.errno, err.strerror or str(err), str(dest)) from err
        return dest.stat().st_size

    def requests_in_flight(self) -> tuple[int, float]:
        """The requests this provider's engine has sent upstream and not yet seen answered,
        and how long its close waits for them (``close`` lets them finish: dropped, they
        would be sent, and paid for, again)."""
        if self._engine is None:
            return 0, 0.0
        worker = self._engine.worker
        return worker.requests_in_flight, worker.settings.drain_timeout

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            self._started = False

    # -- errors ------------------------------------------------------------------------------

    def _call(self, method: Callable[..., T], *args: Any) -> T:
        try:
            return method(*args)
        except EngineError as err:
            error = provider_error(self.name, err)
            if err.status == 404:  # the usual cause: another machine's (or checkout's) engine
                error.details.append(
                    f"this local engine keeps its files and batches in {self.data_dir}, on "
                    "this machine only: a batch or file recorded by a run in another checkout "
                    "(a state shared in PostgreSQL, or copied) is in that checkout's folder. "
                    "Several runners need an engine they all reach: `batchspec serve` and a "
                    "provider of type openai pointing at it"
                )
            raise error from None


def provider_error(name: str, err: EngineError) -> ProviderError:
    """The ``ProviderError`` (``RemoteNotFound`` for 404) an engine refusal becomes. A 4xx
    other than 408/409 acted on nothing (``sent_nothing``), as an HTTP provider's: a create
    the engine refused made no batch, so its intent is not left waiting to be confirmed."""
    kind = RemoteNotFound if err.status == 404 else ProviderError
    return kind(
        f"local provider {name!r}: {err.message}",
        status=err.status,
        code=err.code,
        retryable=err.status == 429 or err.status >= 500,
        sent_nothing=400 <= err.status < 500 and err.status not in (408, 409),
    )
