"""Together's Batch API (``type: together``): OpenAI-like, with Together's differences.

It is ``OpenAIProvider`` (same retries, error messages, downloads, ``get_file``) except:

- **Upload in three steps.** ``POST /files`` with form fields ``purpose=batch-api``,
  ``file_name``, ``file_type=jsonl`` and the sha256 ``checksum`` answers 302 with a
  ``Location`` (a presigned URL) and ``X-Together-File-Id``; the bytes are PUT there, with
  no API key (the URL may be another host's: our key never leaves for it); then
  ``POST /files/{id}/preprocess`` returns the file. A 409 names a file already uploaded with
  that content, which is used as it is.
- **Lines.** Together's lines are ``{"custom_id", "body"}``: the input is converted while it
  is staged (``method``/``url`` dropped; the batch's endpoint says where lines go), streamed
  line by line, so memory stays flat.
- **Answers.** A create answers ``{"job": {...}, "warning"}``; a list is a bare array (no
  paging); statuses are upper case and timestamps ISO-8601 (``parse_batch`` reads both);
  ``job_deadline`` is the expiry; ``error`` (a string) becomes the batch's one error.
- **No metadata.** Together's batches carry none, so the provider journals its creates in
  ``<dataDir>/journal.db`` (the journal the ``anthropic`` provider keeps, keyed by batchspec's
  metadata): the row is written *before* the create is sent and confirmed with the batch id.
  Batches are listed with their journaled metadata, so a re-run adopts them; a listing also
  confirms a lost create's row with the one unclaimed batch of its input file made since it
  was sent, when no other lost create could have made that batch, so a run killed mid-create
  is adopted by the next run's key lookup at once. A create whose
  answer was lost leaves its row unconfirmed and is not re-sent (it may still be in transit;
  the reconciler waits its confirm window); the next create for the same key first looks for
  a batch made from the same input file since then and not claimed by another row, and adopts
  it rather than paying twice. Keep ``state/`` whole between runs: without the journal a
  Together batch cannot be recognised as batchspec's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from batchspec import __version__
from batchspec.errors import ProviderError
from batchspec.providers._http import (
    FileBody,
    RetryingClient,
    cancel_or_ended,
    create_or_adopt,
    display_url,
    json_object,
    quote_id,
    redact_batch,
)
from batchspec.providers.base import (
    BatchValidationError,
    RemoteBatch,
    RemoteFile,
    RemoteNotFound,
    UploadProgress,
    listed_after,
    parse_batch,
    parse_file,
)
from batchspec.providers.journal import Journal, JournalEntry, metadata_key
from batchspec.providers.openai import OpenAIProvider
from batchspec.storage.private import ensure_private_dir

TOGETHER_PURPOSE = "batch-api"
#: how far back (seconds) a listed batch may have been created to be a lost create's
_CLOCK_SKEW = 300
_CHUNK = 64 * 1024


class TogetherProvider(OpenAIProvider):
    """A ``providers.base.Provider`` for Together's Batch API (see the module docstring)."""

    lists_newest_first = False  # Together's listing (one bare array) has no documented order

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None,
        data_dir: Path,
        api_key_env: str | None = "TOGETHER_API_KEY",
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            name,
            base_url=base_url,
            api_key=api_key,
            api_key_env=api_key_env,
            transport=transport,
            timeout=timeout,
            **kwargs,
        )
        self.data_dir = data_dir
        self._journal = Journal(data_dir)
        # the presigned upload URL gets the bytes and a user agent, never our key
        self._presigned = RetryingClient(
            base_url="",
            client=httpx.Client(transport=transport, timeout=httpx.Timeout(timeout)),
            owns_client=True,
            context=self._http.context,
            headers={"User-Agent": f"batchspec/{__version__}"},
            policy=self._policy,
            sleep=self._sleep,
            rand=self._rand,
        )

    def __repr__(self) -> str:
        return f"TogetherProvider(name={self.name!r}, base_url={display_url(self.base_url)!r})"

    # -- files ---------------------------------------------------------------------------

    def upload_file(
        self,
        path: Path,
        *,
        filename: str,
        purpose: str = "batch",
        progress: UploadProgress | None = None,
    ) -> RemoteFile:
        """Stage ``path`` as Together lines, then announce, PUT and preprocess it."""
        if not filename.endswith(".jsonl"):
            filename += ".jsonl"
        staged, checksum, size = self._stage_together_lines(path)
        try:
            fields = {
                "purpose": TOGETHER_PURPOSE,
                "file_name": filename,
                "file_type": "jsonl",
                "checksum": checksum,
            }
            announced = self._http.request(
                "POST",
                "/files",
                operation=f"upload of {filename}",
                files={key: (None, value) for key, value in fields.items()},
                ok_statuses=frozenset({302, 409}),
            )
            if announced.status_code == 409:  # this content is there already
                return self.get_file(str(_json(announced, "upload", self.name).get("file_id")))
            location = announced.headers.get("location")
            file_id = announced.headers.get("x-together-file-id")
            if announced.status_code != 302 or not location or not file_id:
                raise ProviderError(
                    f"{self.name}: upload of {filename}: expected a 302 with Location and "
                    f"X-Together-File-Id, got HTTP {announced.status_code}; is the base URL "
                    "Together's API root (https://api.together.ai/v1)?"
                )
            self._presigned.request(
                "PUT",
                location,
                operation=f"upload of {filename} (bytes)",
                content=FileBody(staged, _CHUNK),
                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            )
            done = self._http.request(
                "POST", f"/files/{quote_id(file_id)}/preprocess", operation=f"upload of {filename}"
            )
            return parse_file(_json(done, "upload", self.name))
        finally:
            staged.unlink(missing_ok=True)

    def _stage_together_lines(self, path: Path) -> tuple[Path, str, int]:
        """``path`` as ``{"custom_id", "body"}`` lines in a staging file: (path, sha256, size)."""
        folder = self.data_dir / "staging"
        ensure_private_dir(self.data_dir)  # full requests: as private as the state
        ensure_private_dir(folder)
        fd, name = tempfile.mkstemp(dir=folder, suffix=".jsonl")
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as lines:
                for raw in lines:
                    if not raw.strip():
                        continue
                    line = json.loads(raw)
                    together = {"custom_id": line["custom_id"], "body": line["body"]}
                    data = (json.dumps(together, ensure_ascii=False) + "\n").encode()
                    digest.update(data)
                    out.write(data)
                    size += len(data)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name), digest.hexdigest(), size

    # -- batches -------------------------------------------------------------------------

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
    ) -> RemoteBatch:
        """Create a batch, journaled first; a create the journal knows is adopted, not re-sent."""
        key = metadata_key(metadata)
        entry = self._journal.get(key)
        if entry is not None and entry.remote_id is not None:
            try:
                return self.get_batch(entry.remote_id)
            except RemoteNotFound:
                self._journal.forget(key)
                entry = None
        elif entry is not None:
            lost = self._unclaimed_batch_of(entry)
            if lost is not None:
                return lost
        entry = JournalEntry(
            key=key,
            metadata=dict(metadata),
            endpoint=endpoint,
            file_id=input_file_id,
            requests=0,
            ids_sha256="",
            started_at=entry.started_at if entry is not None else time.time(),
        )
        self._journal.begin(entry)
        payload = {
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
        }

        def send() -> RemoteBatch:
            response = self._http.request(
                "POST", "/batches", operation="create batch", json=payload, retry_ambiguous=False
            )
            body = _json(response, "create batch", self.name)
            job = body["job"] if isinstance(body.get("job"), Mapping) else body
            created = redact_batch(_parse_job(job, metadata), self._http.context)
            self._journal.confirm(key, created.id)
            return created

        # a lost create may still be in transit: never re-sent here (the journal keeps it
        # unconfirmed; the reconciler waits its bounded window before creating again, and
        # that create adopts the lost one's job if it has arrived by then)
        return create_or_adopt(
            send,
            functools.partial(self._unclaimed_batch_of, entry),
            policy=self._policy,
            sleep=self._sleep,
            rand=self._rand,
            resend=False,
        )

    def get_batch(self, batch_id: str) -> RemoteBatch:
        response = self._http.request(
            "GET", f"/batches/{quote_id(batch_id)}", operation=f"get batch {batch_id}"
        )
        return self._with_journal(
            redact_batch(
                _parse_job(_json(response, "get batch", self.name), {}), self._http.context
            )
        )

    def list_batches(
        self, *, page_size: int = 100, after: str | None = None
    ) -> Iterator[RemoteBatch]:
        """Every batch Together lists (one page: it does not page), in its order; ``after``:
        those listed after that batch."""
        listed = self._listed()
        self._claim_lost_creates(listed)
        known = self._journal.by_remote_id()
        for batch in listed_after(listed, after):
            entry = known.get(batch.id)
            yield dataclasses.replace(batch, metadata=entry.metadata) if entry else batch

    def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Cancel a job. One that has ended before the cancel arrived is returned as it is
        (COMPLETED -> completed, ...), whether Together answers it ended or refuses the
        cancel (``_http.cancel_or_ended``); CANCELLING (or CANCELING) is cancelling."""
        return cancel_or_ended(
            self._http,
            f"/batches/{quote_id(batch_id)}/cancel",
            batch_id=batch_id,
            get_batch=self.get_batch,
            parse=lambda response: self._with_journal(
                redact_batch(
                    _parse_job(_json(response, "cancel batch", self.name), {}), self._http.context
                )
            ),
        )

    def close(self) -> None:
        super().close()
        self._presigned.close()
        self._journal.close()

    # -- internals -----------------------------------------------------------------------

    def _listed(self) -> list[RemoteBatch]:
        response = self._http.request("GET", "/batches", operation="list batches")
        try:
            body = response.json()
        except (ValueError, RecursionError):  # RecursionError: nested too deep to read
            body = None
        rows = body.get("data") if isinstance(body, Mapping) else body
        if not isinstance(rows, list):
            raise ProviderError(
                f"{self.name}: list batches answered with a body that is not a JSON array; "
                "is the base URL Together's API root (https://api.together.ai/v1)?"
            )
        batches = [
            redact_batch(_parse_job(row, {}), self._http.context)
            for row in rows
            if isinstance(row, Mapping) and "id" in row
        ]
        return sorted(batches, key=lambda b: b.created_at or 0, reverse=True)

    def _unclaimed_batch_of(self, entry: JournalEntry) -> RemoteBatch | None:
        """The newest listed batch a lost create of ``entry`` made, confirmed as its own."""
        claimed = self._journal.by_remote_id()
        for batch in self._listed():
            if batch.id not in claimed and _could_have_made(entry, batch):
                self._journal.confirm(entry.key, batch.id)
                return dataclasses.replace(batch, metadata=entry.metadata)
        return None

    def _claim_lost_creates(self, listed: list[RemoteBatch]) -> None:
        """Confirm each lost create (journaled, never answered) that made exactly one of the
        listed unclaimed batches and is the only lost create that batch could be (same input
        file and endpoint, made since it was sent), so a key lookup finds it at once: the
        create would adopt it anyway once the reconciler's window passed
        (``_unclaimed_batch_of``). Two lost creates of one input file (Together keeps one
        file per content) are left to that."""
        lost = self._journal.unconfirmed()
        if not lost:
            return
        claimed = self._journal.by_remote_id()
        unclaimed = [batch for batch in listed if batch.id not in claimed]
        made = {e.key: [b for b in unclaimed if _could_have_made(e, b)] for e in lost}
        for entry in lost:
            if len(made[entry.key]) != 1:
                continue
            [batch] = made[entry.key]
            if sum(batch in made[other.key] for other in lost) == 1:
                self._journal.confirm(entry.key, batch.id)

    def _with_journal(self, batch: RemoteBatch) -> RemoteBatch:
        entry = self._journal.by_remote_id().get(batch.id)
        return dataclasses.replace(batch, metadata=entry.metadata) if entry else batch


def _could_have_made(entry: JournalEntry, batch: RemoteBatch) -> bool:
    """Whether the lost create ``entry`` could have made ``batch``: same input file and
    endpoint, made since the create was sent."""
    return (
        batch.input_file_id == entry.file_id
        and batch.endpoint in (None, entry.endpoint)
        and (batch.created_at is None or batch.created_at >= entry.started_at - _CLOCK_SKEW)
    )


def _json(response: httpx.Response, operation: str, provider: str) -> Mapping[str, Any]:
    return json_object(
        response,
        operation,
        provider,
        api_root="Together's API root (https://api.together.ai/v1)",
        required=None,
    )


def _parse_job(job: Mapping[str, Any], metadata: Mapping[str, str]) -> RemoteBatch:
    """A Together BatchJob as a ``RemoteBatch`` (see the module docstring)."""
    if "id" not in job:
        raise ProviderError("Together answered a batch without an id.")
    batch = parse_batch(
        {
            **job,
            "expires_at": job.get("job_deadline"),
            "metadata": None,
            "errors": None,
            "request_counts": None,
            "usage": None,
        }
    )
    error = job.get("error")
    errors = (BatchValidationError(code=None, message=str(error)),) if error else ()
    return dataclasses.replace(batch, metadata=dict(metadata), errors=errors)
