"""The Azure OpenAI provider: OpenAI's Files and Batches API on an Azure resource.

It is ``OpenAIProvider`` (same retries, streaming, error messages and ambiguous-create
handling) with Azure's differences, and nothing else:

- **Root.** ``baseUrl`` is the resource endpoint, ``https://NAME.openai.azure.com``.
  ``apiStyle: v1`` (default) talks to ``<endpoint>/openai/v1/files|batches``;
  ``apiStyle: legacy`` to ``<endpoint>/openai/files|batches?api-version=<apiVersion>``, the
  ``api-version`` query parameter being sent with every request. An endpoint given with its
  ``/openai`` or ``/openai/v1`` suffix is accepted as the same resource.
- **Key.** Sent as the ``api-key`` header (never ``Authorization``).
- **Endpoint form.** Azure documents and answers the unversioned batch endpoint
  (``/chat/completions``); it is sent that way, and every endpoint read back is put in the
  manifests' form (``/v1/chat/completions``), so comparisons (adoption, import) hold.
- **Parsing.** ``base.parse_batch`` is already lenient where Azure's previews differ:
  capitalised statuses (``Validating``), ISO-8601 timestamps and ``request_counts: null``;
  here a CamelCase status (``InProgress``) is also read as ``in_progress``.
- **No 24-hour expiry.** Azure keeps working on a batch past 24 h; batchspec never assumes a
  batch expires at ``created_at + 24h``: it trusts the status and ``expires_at`` it is given.

Deployment names are used as ``model`` in request lines, one per file, as Azure requires
(``validate`` checks one model per input). Azure's 100,000 requests per file is the shard
limit for ``azure`` providers (``apply.shard_limits``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

from batchspec.errors import ProviderError
from batchspec.providers._http import display_url, pooled_client
from batchspec.providers.base import RemoteBatch
from batchspec.providers.openai import OpenAIProvider
from batchspec.wire.batch_status import KNOWN_STATUSES

API_STYLES = ("v1", "legacy")
#: the api-version used with ``apiStyle: legacy`` when none is configured
DEFAULT_LEGACY_API_VERSION = "2024-10-21"
_ROOT_SUFFIXES = ("/openai/v1", "/openai")
#: known statuses by their letters alone: "inprogress" (from "InProgress") -> "in_progress"
_STATUS_BY_LETTERS = {status.replace("_", ""): status for status in KNOWN_STATUSES}


def azure_root(endpoint: str, *, api_style: str = "v1") -> str:
    """The API root for a resource endpoint: ``<endpoint>/openai/v1`` or ``<endpoint>/openai``."""
    if api_style not in API_STYLES:
        raise ProviderError(
            f"Azure apiStyle {api_style!r} is unknown; use one of {', '.join(API_STYLES)}."
        )
    resource = endpoint.rstrip("/")
    for suffix in _ROOT_SUFFIXES:
        if resource.endswith(suffix):
            resource = resource[: -len(suffix)]
            break
    return resource + ("/openai/v1" if api_style == "v1" else "/openai")


def wire_endpoint(endpoint: str) -> str:
    """Azure's documented form of an endpoint: ``/v1/chat/completions`` -> ``/chat/completions``."""
    return endpoint[3:] if endpoint.startswith("/v1/") else endpoint


def manifest_endpoint(endpoint: str | None) -> str | None:
    """The manifests' form of an endpoint Azure answered: ``/chat/completions`` -> ``/v1/...``."""
    if endpoint is None or endpoint.startswith("/v1/") or not endpoint.startswith("/"):
        return endpoint
    return "/v1" + endpoint


class AzureOpenAIProvider(OpenAIProvider):
    """A ``providers.base.Provider`` for Azure OpenAI's Batch API (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        endpoint: str,
        api_key: str | None,
        api_style: str = "v1",
        api_version: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
        api_key_env: str | None = "AZURE_OPENAI_API_KEY",
        **kwargs: Any,
    ) -> None:
        root = azure_root(endpoint, api_style=api_style)
        params = {}
        if api_style == "legacy":
            params["api-version"] = api_version or DEFAULT_LEGACY_API_VERSION
        # httpx adds client-level params to every request: the legacy api-version rides along
        # on uploads, downloads and paging alike without touching each call
        self._azure_client, more = pooled_client(
            root, transport=transport, timeout=timeout, params=params
        )
        super().__init__(
            name,
            base_url=root,
            api_key=api_key,
            client=self._azure_client,
            more_clients=more,
            auth_header="api-key",
            api_key_env=api_key_env,
            **kwargs,
        )
        self.api_style = api_style
        self.api_version = params.get("api-version")

    def __repr__(self) -> str:
        return f"AzureOpenAIProvider(name={self.name!r}, root={display_url(self.base_url)!r})"

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
    ) -> RemoteBatch:
        created = super().create_batch(
            input_file_id=input_file_id,
            endpoint=wire_endpoint(endpoint),
            completion_window=completion_window,
            metadata=metadata,
        )
        return _in_manifest_form(created)

    def get_batch(self, batch_id: str) -> RemoteBatch:
        return _in_manifest_form(super().get_batch(batch_id))

    def list_batches(
        self, *, page_size: int = 100, after: str | None = None
    ) -> Iterator[RemoteBatch]:
        listed = super().list_batches(page_size=page_size, after=after)
        return (_in_manifest_form(b) for b in listed)

    def cancel_batch(self, batch_id: str) -> RemoteBatch:
        return _in_manifest_form(super().cancel_batch(batch_id))

    def close(self) -> None:
        super().close()
        self._azure_client.close()

    def _find_batch_made_by(
        self, payload: Mapping[str, Any], *, since: float
    ) -> RemoteBatch | None:
        # listed batches come back in the manifests' form; compare the payload in that form
        wanted = {**payload, "endpoint": manifest_endpoint(payload["endpoint"])}
        return super()._find_batch_made_by(wanted, since=since)


def _in_manifest_form(batch: RemoteBatch) -> RemoteBatch:
    status = batch.status
    if status not in KNOWN_STATUSES:
        status = _STATUS_BY_LETTERS.get(status.replace("_", "").replace("-", ""), status)
    return dataclasses.replace(batch, endpoint=manifest_endpoint(batch.endpoint), status=status)
