"""The OpenAI-compatible provider: OpenAI, a LiteLLM proxy, Groq, and ``batchspec serve``.

Speaks the Files and Batches API under one base URL (``https://api.openai.com/v1``):
``/files``, ``/files/{id}``, ``/files/{id}/content``, ``/batches``, ``/batches/{id}`` and
``/batches/{id}/cancel``. Uploads and downloads are streamed, so memory stays flat whatever
the file size (httpx reads a file object in 64 KiB chunks). Ids are opaque strings of any
length (LiteLLM wraps them in base64) and are percent-quoted into paths.

Retries, backoff and error messages come from ``_http``. Creating a batch is the one call
that costs money, so it is never blindly re-sent after an ambiguous failure: the provider
first looks for a batch it may already have created (same input file, endpoint and
metadata, created since the first attempt) and returns that one instead. A create carrying
batchspec's key (``METADATA_KEYS``) that is not found is never re-sent here: it raises
``AmbiguousOutcome``, and the reconciler keeps looking it up for a bounded window (the
create may still be in transit) before it creates again.

A LiteLLM proxy picks the provider behind it by ``custom_llm_provider``. With
``litellm_provider`` set, it is sent where LiteLLM 1.108.7 reads it on each route: the
``custom-llm-provider`` header on every call (read by upload, create, retrieve, list, cancel
and file content alike), plus the ``custom_llm_provider`` form field of an upload and body
field of a create, the places LiteLLM documents for those two.

The API key is kept in a request header only; ``repr`` and every error leave it out.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import httpx

from batchspec import __version__
from batchspec.providers._http import (
    ErrorContext,
    ProgressReader,
    RetryingClient,
    cancel_or_ended,
    create_or_adopt,
    display_url,
    json_object,
    listed_rows,
    next_page_cursor,
    pooled_client,
    quote_id,
    redact_batch,
    require_http_url,
)
from batchspec.providers.base import (
    METADATA_KEYS,
    RemoteBatch,
    RemoteFile,
    UploadProgress,
    parse_batch,
    parse_file,
    pause_before_retry,
)
from batchspec.wire.retry import client_policy

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: what a base URL must be (said when a body is not the JSON expected)
_API_ROOT = "an OpenAI-compatible API root"
#: how far back (seconds) a batch may have been created to count as ours after an
#: ambiguous create; generous because the server's clock is not ours
_CREATE_CLOCK_SKEW = 300
#: pages of the batch list searched for a batch an ambiguous create may have made
_CREATE_LOOKUP_PAGES = 2
_MAX_PAGE_SIZE = 100
#: the header a LiteLLM proxy reads ``custom_llm_provider`` from on every files/batches route
LITELLM_PROVIDER_HEADER = "custom-llm-provider"


class OpenAIProvider:
    """A ``providers.base.Provider`` for any OpenAI-compatible Files + Batches API."""

    lists_newest_first = True  # OpenAI, Azure and LiteLLM list newest first

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None,
        client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 5,
        timeout: float = 60.0,
        extra_headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = pause_before_retry,
        auth_header: str = "Authorization",
        api_key_env: str | None = "OPENAI_API_KEY",
        rand: Callable[[], float] = random.random,
        litellm_provider: str | None = None,
        more_clients: Callable[[], httpx.Client] | None = None,
    ) -> None:
        """``more_clients``: with a given ``client``, how to make more of it for calls that
        overlap (``_http.pooled_client``)."""
        require_http_url(name, base_url, where="baseUrl in batchspec.yaml or OPENAI_BASE_URL")
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.litellm_provider = litellm_provider
        if litellm_provider:
            extra_headers = {**(extra_headers or {}), LITELLM_PROVIDER_HEADER: litellm_provider}
        self._policy = client_policy(max_retries)
        self._sleep = sleep
        self._rand = rand
        owns_client = client is None
        if client is None:
            client, more_clients = pooled_client(
                self.base_url, transport=transport, timeout=timeout
            )
        context = ErrorContext(
            provider=name,
            base_url=display_url(self.base_url),
            api_key_env=api_key_env,
            key_sent=bool(api_key),
            secrets=(api_key,) if api_key else (),
        )
        self._http = RetryingClient(
            base_url=self.base_url,
            client=client,
            owns_client=owns_client,
            context=context,
            headers=_default_headers(api_key, auth_header, extra_headers),
            policy=self._policy,
            sleep=sleep,
            rand=rand,
            more=more_clients,
        )

    def __repr__(self) -> str:
        return f"OpenAIProvider(name={self.name!r}, base_url={display_url(self.base_url)!r})"

    def __enter__(self) -> OpenAIProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- files ---------------------------------------------------------------------------

    def upload_file(
        self,
        path: Path,
        *,
        filename: str,
        purpose: str = "batch",
        progress: UploadProgress | None = None,
    ) -> RemoteFile:
        """Upload ``path`` as multipart, streamed from disk (never read whole into memory).

        ``filename`` gets a ``.jsonl`` suffix if it lacks one: LiteLLM refuses other names.
        ``progress`` hears the bytes sent so far (``ProgressReader``).
        """
        if not filename.endswith(".jsonl"):
            filename += ".jsonl"
        with open(path, "rb") as handle:
            # httpx seeks the handle back to 0 for every attempt, so retries resend it whole
            body: IO[bytes] | ProgressReader = (
                handle if progress is None else ProgressReader(handle, progress)
            )
            response = self._http.request(
                "POST",
                "/files",
                operation=f"upload of {filename}",
                data=self._routed({"purpose": purpose}),
                files={"file": (filename, body, "application/jsonl")},
            )
        return parse_file(json_object(response, "upload file", self.name, api_root=_API_ROOT))

    def get_file(self, file_id: str) -> RemoteFile:
        response = self._http.request(
            "GET", f"/files/{quote_id(file_id)}", operation=f"get file {file_id}"
        )
        return parse_file(json_object(response, "get file", self.name, api_root=_API_ROOT))

    def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to ``dest`` (via ``<dest>.part``); return bytes written."""
        return self._http.download(
            f"/files/{quote_id(file_id)}/content",
            dest,
            operation=f"download of file {file_id}",
            headers={"Accept": "application/binary"},
        )

    # -- batches -------------------------------------------------------------------------

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
    ) -> RemoteBatch:
        """Create a batch; after an ambiguous failure adopt the batch it made, if any."""
        payload = self._routed(
            {
                "input_file_id": input_file_id,
                "endpoint": endpoint,
                "completion_window": completion_window,
                "metadata": dict(metadata),
            }
        )
        first_sent = time.time()

        def send() -> RemoteBatch:
            response = self._http.request(
                "POST", "/batches", operation="create batch", json=payload, retry_ambiguous=False
            )
            return self._batch(response, "create batch")

        # a keyed create may still be in transit (a gateway holding it past our timeout):
        # never re-sent here; the reconciler looks it up for a bounded window before it
        # creates again
        return create_or_adopt(
            send,
            lambda: self._find_batch_made_by(payload, since=first_sent - _CREATE_CLOCK_SKEW),
            policy=self._policy,
            sleep=self._sleep,
            rand=self._rand,
            resend=not all(k in metadata for k in METADATA_KEYS),
        )

    def get_batch(self, batch_id: str) -> RemoteBatch:
        response = self._http.request(
            "GET", f"/batches/{quote_id(batch_id)}", operation=f"get batch {batch_id}"
        )
        return self._batch(response, "get batch")

    def list_batches(
        self, *, page_size: int = 100, after: str | None = None
    ) -> Iterator[RemoteBatch]:
        """Every listed batch, newest first (``after``: those listed after that batch id);
        the next page is fetched only when needed."""
        limit = max(1, min(page_size, _MAX_PAGE_SIZE))
        used: set[str] = set() if after is None else {after}
        while True:
            params: dict[str, Any] = {"limit": limit}
            if after is not None:
                params["after"] = after
            response = self._http.request(
                "GET", "/batches", operation="list batches", params=params
            )
            page = json_object(response, "list batches", self.name, api_root=_API_ROOT)
            rows = listed_rows(page, self.name, api_root=_API_ROOT)
            yield from (redact_batch(parse_batch(row), self._http.context) for row in rows)
            next_after = page.get("last_id") or (rows[-1].get("id") if rows else None)
            if not page.get("has_more") or not rows or not next_after:
                return
            after = next_page_cursor(
                str(next_after), used, provider=self.name, names="after / last_id / has_more"
            )

    def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Cancel a batch; one that has ended meanwhile (409 ``batch_not_cancellable``; Azure
        and other compatible servers may say 400) is returned as it is, not retried: its
        outcome is decided and waiting will not change it (``_http.cancel_or_ended``)."""
        return cancel_or_ended(
            self._http,
            f"/batches/{quote_id(batch_id)}/cancel",
            batch_id=batch_id,
            get_batch=self.get_batch,
            parse=lambda response: self._batch(response, "cancel batch"),
        )

    def close(self) -> None:
        self._http.close()

    # -- internals -----------------------------------------------------------------------

    def _batch(self, response: httpx.Response, operation: str) -> RemoteBatch:
        """The batch object a response holds, the key taken out of its errors' words."""
        body = json_object(response, operation, self.name, api_root=_API_ROOT)
        return redact_batch(parse_batch(body), self._http.context)

    def _routed(self, fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` plus ``custom_llm_provider`` when a LiteLLM provider is configured."""
        if self.litellm_provider:
            fields["custom_llm_provider"] = self.litellm_provider
        return fields

    def _find_batch_made_by(
        self, payload: Mapping[str, Any], *, since: float
    ) -> RemoteBatch | None:
        """The newest batch matching an ambiguous create's payload, created after ``since``.

        A create carrying batchspec's key (``METADATA_KEYS``) is matched on its metadata
        alone: the key names one attempt, and a proxy may list rewritten file ids or a
        server clock may differ from ours. Other creates must match file, endpoint and time.
        """
        wanted_metadata = payload["metadata"]
        keyed = all(k in wanted_metadata for k in METADATA_KEYS)
        recent = itertools.islice(
            self.list_batches(page_size=_MAX_PAGE_SIZE), _CREATE_LOOKUP_PAGES * _MAX_PAGE_SIZE
        )
        for batch in recent:
            if not all(batch.metadata.get(k) == v for k, v in wanted_metadata.items()):
                continue
            if keyed or (
                (batch.created_at is None or batch.created_at >= since)
                and batch.input_file_id == payload["input_file_id"]
                and batch.endpoint in (None, payload["endpoint"])
            ):
                return batch
        return None


def _default_headers(
    api_key: str | None, auth_header: str, extra_headers: Mapping[str, str] | None
) -> dict[str, str]:
    headers = {"User-Agent": f"batchspec/{__version__}", "Accept": "application/json"}
    headers.update(extra_headers or {})
    if api_key:
        bearer = auth_header.lower() == "authorization"
        headers[auth_header] = f"Bearer {api_key}" if bearer else api_key
    return headers
