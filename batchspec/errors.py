"""The one exception tree of batchspec. Every known failure is a ``BatchspecError``.

Each class carries the process exit code the CLI uses for it (DESIGN.md, "Exit codes"), so
the CLI never maps exceptions to codes by hand and users never see a traceback for a known
failure::

    BatchspecError (1)
     ├── UsageError (64)            bad flags or arguments
     ├── ManifestError (1)          a manifest or project file is invalid
     ├── InputError (1)             a batch input file is invalid
     ├── ProviderError (1)          a provider answered with an error or could not be reached
     ├── StateError (1)             the state store is unusable or inconsistent
     │    └── StateLockedError (3)  another run holds the lock
     ├── BudgetError (1)            a step would exceed a budget; nothing was spent
     ├── ConsentError (1)           spending needs --yes (or a terminal to ask on)
     ├── StalePlanError (1)         a saved plan no longer matches the state or manifests
     ├── StaleResultsError (1)      a result file is not the current spec's finished results
     ├── DegradedError (4)          apply --wait ended with a resource Degraded
     └── WaitTimeoutError (5)       apply --wait reached its timeout before convergence

Messages say what was wrong, where (file:line when there is one) and what to do. They never
contain an API key: provider errors are built from the provider's response, not our request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar


class BatchspecError(Exception):
    """Base of every known failure; ``exit_code`` is what the CLI exits with."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: extra lines (e.g. one per problem found) shown under the message
        self.details: list[str] = list(details or [])
        #: the resource the failure is about, once ``about`` named it
        self.resource: str | None = None

    def about(self, resource: str) -> None:
        """Name the resource this failure is about, once: ``[name] `` before the message, as
        in the progress lines (a run over 500 manifests must say which one failed)."""
        if self.resource is not None:
            return
        self.resource = resource
        if not self.message.startswith(f"[{resource}] "):
            self.message = f"[{resource}] {self.message}"
            self.args = (self.message, *self.args[1:])

    def __str__(self) -> str:
        return self.message


class UsageError(BatchspecError):
    exit_code = 64


class ManifestError(BatchspecError):
    """A manifest or project file failed to load or validate."""


class InputError(BatchspecError):
    """A batch input (JSONL) failed validation; ``details`` holds one line per problem."""


class ProviderError(BatchspecError):
    """A provider call failed. Carries what the provider said, never what we sent."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retryable: bool = False,
        sent_nothing: bool = False,
        provider_down: bool = False,
        rate_limited: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retryable = retryable
        #: set only where the client knows the provider acted on none of the attempts: each
        #: never left this machine, or was refused with a 4xx other than 408/409. A create
        #: failing so made no batch; any other failure may have made one.
        self.sent_nothing = sent_nothing
        #: the provider could not be reached (no connection could be made, or its gateway
        #: answered 502, 503 or 504): the failure is the provider's, whichever resource's
        #: call met it first, and its message names the provider and its base URL
        self.provider_down = provider_down
        #: the provider refused the call with a rate limit (429, not out of quota) through
        #: all its retries: the call was not acted on, and a later pass may make it again
        #: (the resource is still named: which create or poll it was tells what to throttle)
        self.rate_limited = rate_limited

    def about(self, resource: str) -> None:
        """As ``BatchspecError.about``, except for a provider that is down: the failure is
        not the resource's, and naming the first one that met it sent users to its manifest."""
        if not self.provider_down:
            super().about(resource)


def raise_first(errors: Sequence[BatchspecError]) -> None:
    """Raise the first of ``errors`` with the others' messages among its details (none:
    return): a step refused for several reasons says every one at once."""
    if errors:
        first = errors[0]
        first.details += [e.message for e in errors[1:]]
        if any(e.resource != first.resource for e in errors[1:]):
            first.resource = None  # about several: the run as a whole
        raise first


class StateError(BatchspecError):
    """The state store cannot be used as asked."""


class StateLockedError(StateError):
    exit_code = 3


class BudgetError(BatchspecError):
    """A step would exceed a budget; it was refused before anything was uploaded."""


class ConsentError(BatchspecError):
    """Creating batches costs money and needs consent (``--yes`` or an answer on a terminal)."""


class StalePlanError(BatchspecError):
    """A saved plan (``plan --out``) no longer matches the state or the manifests; the apply
    that was given it did nothing."""


class StaleResultsError(BatchspecError):
    """A result file on disk is not what the manifest's current spec produced."""


class DegradedError(BatchspecError):
    exit_code = 4


class WaitTimeoutError(BatchspecError):
    exit_code = 5


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, Kubernetes, ``timeout``, a CI runner cancelling a job),
    taken as Ctrl-C is: the same clean stop and record, exit 143 (128 + SIGTERM) instead of
    130. A ``KeyboardInterrupt``, so every path that handles Ctrl-C handles it; not a known
    failure, so not a ``BatchspecError``."""

    exit_code: ClassVar[int] = 143


__all__ = [
    "BatchspecError",
    "BudgetError",
    "ConsentError",
    "DegradedError",
    "InputError",
    "ManifestError",
    "ProviderError",
    "StalePlanError",
    "StateError",
    "StateLockedError",
    "Terminated",
    "UsageError",
    "WaitTimeoutError",
]
