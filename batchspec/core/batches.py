"""How batchspec's batches look at a provider, and what their state rows record of them.

Every remote batch carries a deterministic key in its metadata (``batchspec_resource``,
``batchspec_spec``, ``batchspec_shard``, ``batchspec_attempt``) next to the user's own pairs,
so a run that died between its create and recording the answer finds the batch again and
adopts it instead of paying for it twice. The attempt part ends with a digest of the batch
file's content when that file is not the whole input (``intent.attempt_part``): which requests
a shard holds depends on more than the spec, and a key must never name two contents.
``batch_fields`` turns what a provider reports of a batch into the columns of its state row.
A shard is counted from 0 in the state (its rows, the key, the events the audit log keeps)
and from 1 wherever people read it (``event_detail_shown``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from batchspec.providers.base import METADATA_KEYS, RemoteBatch
from batchspec.state.store import BatchRow, utc_timestamp
from batchspec.workspace.manifest import Resource


def batch_key(resource: str, spec_hash: str, shard: int, attempt: int | str) -> str:
    return f"{resource}/{spec_hash}/{shard}/{attempt}"


def metadata_for_key(key: str) -> dict[str, str]:
    """The four metadata pairs carried by the remote batch of the state row with this key.

    Taken from the recorded key, not recomputed from the manifest, so an intent recorded
    under an earlier name or spec is still recognised at the provider.
    """
    return dict(zip(METADATA_KEYS, key.split("/"), strict=True))


def carries_another_key(remote: RemoteBatch, key: str) -> bool:
    """Whether ``remote`` carries batchspec's metadata of a key other than ``key``: it is
    another batch (another resource's, shard's or attempt's), whatever call answered with it.

    A provider or gateway that answers a create or a get with another batch's object (a
    cache keyed wrongly, a retried create answered with the first one's batch) would have
    that batch's answers collected as this one's: with custom_ids shared between resources
    (``req-1``, ``req-2``…), another resource's answers written into this one's results."""
    wanted = metadata_for_key(key)
    return any(k in remote.metadata and remote.metadata[k] != v for k, v in wanted.items())


def ended_without_its_answers(remote: RemoteBatch) -> bool:
    """Whether ``remote`` says it ended with requests answered but names no output file: a
    gateway's trimmed object, or a provider still writing the file. Recorded as it is, the
    batch was collected with nothing in it (a terminal batch is never polled again), and its
    answered requests, taken as unanswered, were sent again and paid for twice.

    A server whose ``completed`` counts every finished request, failed ones included (its
    counts add up past the total), answered ``completed - failed``: all of them failed, with
    an error file only, is a batch that ended as it says.

    Without counts (Together's jobs carry none; a gateway may trim them), a ``completed``
    batch that names neither file is one whose files are still to come: each request of a
    completed batch is answered in one of them."""
    counts = remote.request_counts
    if not remote.is_terminal or remote.status == "failed" or names_output_file(remote):
        return False  # "failed": rejected whole, its requests fail and are never retried
    if counts is None:
        return remote.status == "completed" and remote.error_file_id is None
    answered = counts.completed
    if counts.total > 0 and counts.completed + counts.failed > counts.total:
        answered = counts.completed - counts.failed
    return answered > 0


def names_output_file(remote: RemoteBatch) -> bool:
    """Whether ``remote`` names an output file that can hold its answers: not its own input
    file (a gateway mixing up the two ids). Collected, that file's request lines were each
    recorded as a final failure and the real answers never fetched (a terminal batch is not
    polled again); taken as named by no one, the batch is polled until the provider names
    the right file (``ended_without_its_answers``)."""
    return remote.output_file_id is not None and remote.output_file_id != remote.input_file_id


def still_finalizing(remote: RemoteBatch) -> RemoteBatch:
    """``remote`` (``ended_without_its_answers``) taken as still writing its files: recorded
    in flight (``finalizing``) and polled again, never collected with nothing in it."""
    return dataclasses.replace(remote, status="finalizing")


def batch_metadata(res: Resource, batch: BatchRow) -> dict[str, str]:
    """The user's metadata plus batchspec's four keys (the schema keeps the total <= 16)."""
    return {**res.metadata, **metadata_for_key(batch.key)}


def batch_fields(remote: RemoteBatch) -> dict[str, Any]:
    """What the state records of ``remote``, by every step that records one (poll, create,
    adoption, cancel, import): a batch that ended with answers but names no output file is
    recorded ``finalizing`` (``still_finalizing``), never ended with nothing to collect.

    An output file id naming the batch's own input file (``names_output_file``) of a batch
    whose counts say it ended with nothing answered is recorded as none: it is collected
    from its error file alone. With that id, every collect downloaded the input, found
    request lines and failed (exit 1), on every apply, its failures never recorded. Without
    counts nothing says the real output file holds no answer, so the id is kept: the collect
    refuses the file (exit 1), and nothing is taken as unanswered and paid for again."""
    if ended_without_its_answers(remote):
        remote = still_finalizing(remote)
    counts = remote.request_counts
    usage = remote.usage
    output = remote.output_file_id
    if counts is not None and not names_output_file(remote):
        output = None  # its input file; the counts say nothing was answered (else finalizing)
    fields: dict[str, Any] = {
        "status": remote.status,
        "output_file_id": output,
        "error_file_id": remote.error_file_id,
    }
    if counts is not None:
        fields.update(total=counts.total, completed=counts.completed, failed=counts.failed)
    if usage is not None:
        fields.update(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
        )
    if remote.errors:
        fields["provider_errors"] = [
            {"code": e.code, "message": e.message, "line": e.line, "param": e.param}
            for e in remote.errors
        ]
    if remote.is_terminal:
        fields["terminal_at"] = utc_timestamp()
    return fields


def requests_done(completed: int | None, failed: int | None, total: int) -> int:
    """How many of a batch's ``total`` requests are done, as its counts say: completed and
    failed, but never more than the total (some servers count failures among the completed
    too: "5/4 (1 failed)" was shown for a batch of four)."""
    return min((completed or 0) + (failed or 0), total)


def counts_json(remote: RemoteBatch) -> dict[str, int]:
    c = remote.request_counts
    return {"total": c.total, "completed": c.completed, "failed": c.failed} if c else {}


def event_detail_shown(detail: dict[str, Any]) -> dict[str, Any]:
    """An event's detail as ``history``, ``show`` and ``report`` give it (text and JSON):
    its batch's ``shard`` counted from 1, as ``status``, ``show`` and ``apply``'s progress
    count it; the audit log keeps the state's own index, from 0 (an ``intent``, ``create``
    or ``adopt`` event's, the only ones that name a shard)."""
    shard = detail.get("shard")
    if not isinstance(shard, int) or isinstance(shard, bool):
        return detail
    return {**detail, "shard": shard + 1}
