"""Rewrite a resource's result files from the state store when they are missing or edited.

Restoring calls no provider: the answers are in the blob store and the ledger, and the
files are written in input order exactly as collect wrote them, with a ``restore`` event.
Unless a stored file is missing (``state/store/`` deleted) or damaged: files that do not come
out as recorded are not taken for restored, which the next pass would find differing and
restore again, without end. A missing file, or one that no longer hashes to its name, is
fetched from the shared tier or downloaded again from the provider (``ResultStore``, a
``blob.repaired`` event; the pass's transaction is committed first, as before any wait on a
provider), and the files written again; if they still differ, or no good copy can be had,
the restore fails (exit 1).
A missing ``spec.export`` file also plans a restore: the exports are written again from the
restored files.
"""

from __future__ import annotations

from batchspec.core.plan import Action
from batchspec.core.reconcile.collect import write_exports
from batchspec.core.reconcile.context import RunContext
from batchspec.core.reporting import Progress
from batchspec.core.results import WrittenResults, write_results_in_input_order
from batchspec.errors import StateError
from batchspec.state.resources import GenerationRow
from batchspec.wire.inputs import InputReport
from batchspec.workspace.manifest import Resource
from batchspec.workspace.yamldoc import display_path


def restore(ctx: RunContext, res: Resource, facts: InputReport, action: Action) -> bool:
    gen = ctx.generation(res)
    ctx.check_result_paths(res)
    if not all(ctx.blobs.local.has(sha) for sha in ctx.ledger.blobs_of(gen.id)):
        ctx.before_wait()  # fetched from elsewhere: never with the writer lock held
    written = write_results_in_input_order(
        ctx.ledger, gen.id, ctx.blobs, res.output_path, res.errors_path, ctx.disk_hashes
    )
    if not _as_recorded(gen, written):
        ctx.before_wait()
        repaired = [sha for sha in ctx.ledger.blobs_of(gen.id) if ctx.blobs.repair_local(sha)]
        if repaired:
            written = write_results_in_input_order(
                ctx.ledger, gen.id, ctx.blobs, res.output_path, res.errors_path, ctx.disk_hashes
            )
        if not _as_recorded(gen, written):
            raise StateError(
                f"{display_path(res.output_path)} restored from the state store does not hold "
                f"the results recorded for {res.name} (sha256 {written.output_sha256[:12]}, "
                f"recorded {(gen.output_sha256 or '')[:12]}); the stored answers are not as "
                f"they were collected. `batchspec apply --replace {res.name}` runs the requests "
                "again."
            )
    at = (ctx.relative(res.output_path, written=True), ctx.relative(res.errors_path, written=True))
    if (gen.output_path, gen.errors_path) != at:  # ``output:`` moved: record where they are now
        ctx.store.update_generation(gen.id, output_path=at[0], errors_path=at[1])
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
            # both files are written again: name both (a missing errors file was said as
            # "restored results/x.jsonl (errors file is missing)")
            f"restored {display_path(res.output_path)} and {display_path(res.errors_path)} "
            f"from the state store ({action.reason})",
        )
    )
    return True


def _as_recorded(gen: GenerationRow, written: WrittenResults) -> bool:
    """The files written are the ones collect recorded (a generation recorded before their
    hashes were kept counts as such: nothing to compare)."""
    return gen.output_sha256 is None or (
        written.output_sha256 == gen.output_sha256
        and (gen.errors_sha256 is None or written.errors_sha256 == gen.errors_sha256)
    )
