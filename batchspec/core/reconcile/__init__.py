"""The reconcile loop, split by step around one shared run context.

``Reconciler`` (``reconciler``) re-plans each resource from fresh state and dispatches to a
step; each step is a module of functions of the ``RunContext`` (``context``):

* ``intent``: record the generation, its ledger and one intent per shard, budget checked,
  before anything is spent;
* ``submit``: upload once per provider and sha256, re-check the lock, create; ``adopt``: find
  a batch whose create went unrecorded by its metadata key instead of creating another;
* ``poll``, ``collect`` (download to the blob store first, then the ledger and result files),
  ``retry``, ``restore`` and ``cancel``;
* ``prefetch``: before each pass (``Reconciler.advance_all``), the polls (list pages first) and
  downloads the pass will make, side by side in a bounded pool; the steps above take them and
  record them on the main thread, in resource order;
* ``drain``: first in each pass, the batches of retired generations (superseded, cancelled,
  pruned) still stopping or not yet collected are polled to their end and their finished
  answers kept in their own ledger, for a later generation to reuse.

The money-touching steps follow DESIGN.md's invariants:

* **Intent first.** A batch row (remote id NULL) and an ``intent`` event are committed before
  any upload; the row is marked ``creating`` before the create call. A run that dies between
  the create and recording its remote id leaves a ``creating`` row, and the next run *adopts*
  the remote batch carrying the same metadata key instead of creating another.
* **Deterministic keys.** Every batch carries ``batchspec_resource``, ``batchspec_spec``,
  ``batchspec_shard`` and ``batchspec_attempt`` in its metadata, next to the user's.
* **Files once per provider.** Uploads are deduplicated by sha256 per provider; a recorded
  file id the provider no longer has is uploaded again.
* **Collect to the store first.** Output and error files go into the blob store before they
  are read; result files are written from there, in input order.
"""

from __future__ import annotations

from batchspec.core.reconcile.adopt import ADOPTION_CLOCK_SLACK
from batchspec.core.reconcile.context import ProviderFactory, RunContext
from batchspec.core.reconcile.reconciler import (
    MAX_STEPS_PER_PASS,
    Reconciler,
    StepResult,
    desired_resource,
)
from batchspec.core.reporting import Progress

__all__ = [
    "ADOPTION_CLOCK_SLACK",
    "MAX_STEPS_PER_PASS",
    "Progress",
    "ProviderFactory",
    "Reconciler",
    "RunContext",
    "StepResult",
    "desired_resource",
]
