"""Rewrite a resource's result files from the state store when they are missing or edited.

Restoring never calls a provider: the answers are in the blob store and the ledger, and the
files are written in input order exactly as collect wrote them, with a ``restore`` event.
A missing ``spec.export`` file also plans a restore: the exports are written again from the
restored files.
"""

from __future__ import annotations

from batchspec.core.plan import Action
from batchspec.core.reconcile.collect import write_exports
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reporting import Progress
from batchspec.core.results import write_results_in_input_order
from batchspec.wire.inputs import InputReport
from batchspec.workspace.manifest import Resource
from batchspec.workspace.yamldoc import display_path


def restore(ctx: RunContext, res: Resource, facts: InputReport, action: Action) -> bool:
    gen = ctx.generation(res)
    ctx.check_result_paths(res)
    written = write_results_in_input_order(
        ctx.ledger, gen.id, ctx.blobs, res.output_path, res.errors_path
    )
    ctx.store.record_event(
        ctx.run_id,
        "restore",
        resource=res.name,
        generation_id=gen.id,
        detail={"reason": action.reason, "output_sha256": written.output_sha256},
    )
    write_exports(res, ctx.project.providers.get(res.provider))
    ctx.report(
        Progress(
            "restore",
            res.name,
            f"restored {display_path(res.output_path)} from the state store ({action.reason})",
        )
    )
    return True
