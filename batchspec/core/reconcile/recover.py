"""Answers a lost state forgot: kept from an earlier generation's batches at the provider.

A generation that keeps earlier answers sends only what changed, so the answers it keeps live
in batches of *earlier* generations (another spec hash in their keys). A lost or stale state
knows none of them: the key lookup (``adopt.look_up_before_create``) finds the batches of the
current spec alone, and every kept request was sent, and paid for, again (the whole input
when the state was lost after a ``apply --replace NAME``, or after a changed input whose
unchanged requests kept their answers).

So before a new generation's shards are drawn (``intent.record_shards``), ``recover_ahead``
(holding no transaction) reads the pass's listing of the provider's batches back over the
lookup's window (``adopt.lookup_since``: the same pages the lookups read) for batches that:

* carry this resource's key (its name, or the name it moved from) with a spec hash other
  than the ones the lookup adopts (the current spec, a pure rename's former one);
* are bound to no batch of this state (a batch the state knows has its answers recorded,
  and kept by ``RequestLedger.carry_over``), have ended, and name an output file;
* ended before the first listed batch of the current spec was made, if any is listed: that
  generation kept only answers it had then, and drawn without them, its shards would no
  longer be the ones whose keys the lookup adopts (``_ended_before``);
* or, when the listing holds an ``apply --replace NAME --no-reuse`` of the current spec,
  were made since its first batch (``_no_reuse_start``): the answers before it are the ones
  the user threw away, and the state that recorded it shows the replacement's.

The rule is carry-over's own: an answer is kept for a request only when the very same request
line (``custom_id`` and the sha256 of its raw bytes, the ledger's ``request_sha``) was sent.
The batch's input file is downloaded (not kept) and its lines hashed; only when one of them is
a line the new generation would send is its output file downloaded into the result store, and
its succeeded answers (``ok`` lines) are kept for those lines, pointing at that file. Nothing
is recorded here: ``intent.record_shards`` marks them ``ok`` in the new ledger (a ``recover``
event names the batches), after any carry-over, in the transaction that records the intents.
A generation that keeps the answers it was sent before draws the very shards it drew then, so
the current spec's own batches are then adopted by key as usual (nothing is sent).

Not recovered: a ``--replace --no-reuse`` generation (it resends everything), the built-in
stand-in's answers, a batch older than the window (the lookup does not read back that far
either), a batch whose files the provider no longer has (said in the ``recover`` event), and
any provider but those whose input files hold the request lines as they were sent
(``LINES_AS_SENT``: not ``local``, whose stand-in may have answered, nor Anthropic, Gemini,
Mistral or Together, whose files are in their own format or whose batches carry no key):
there those requests are sent again, as before.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from batchspec.core.batches import names_output_file
from batchspec.core.reconcile.adopt import lookup_since, pass_listing, read_back_if_trimmed
from batchspec.core.reconcile.collect import download_to_store, read_result_lines
from batchspec.core.reconcile.context import RunContext
from batchspec.core.replacements import (
    answers_by_stand_in,
    replacement_hash,
    reuses_answers,
    unreused_requests,
)
from batchspec.errors import ProviderError
from batchspec.providers.base import Provider, RemoteBatch
from batchspec.wire.inputs import InputReport
from batchspec.workspace.manifest import Resource, spec_hash

#: a downloaded input file's lines are read this many bytes at a time
_READ_BUFFER = 1 << 20
#: provider types whose batch input file holds the request lines as they were sent (the
#: others convert them into their own format, so no line of theirs hashes as the input's)
LINES_AS_SENT = frozenset({"openai", "azure", "groq"})
#: how many replacement numbers in a row with no batch listed end ``_no_reuse_start``'s scan
UNLISTED_REPLACEMENTS_MAX = 64


@dataclass(frozen=True)
class RecoveredAnswer:
    """A succeeded answer of an earlier batch: its span in the stored output file."""

    blob: str
    offset: int
    length: int


@dataclass
class Recovered:
    """What ``recover_ahead`` found for one resource: answers by ``(custom_id,
    request_sha)``, the batches they came from, and the batches it could not read."""

    answers: dict[tuple[str, str], RecoveredAnswer] = field(default_factory=dict)
    batches: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    #: the output file each stored blob of ``answers`` is a copy of (blob sha256 -> file id):
    #: recorded on the ``recover`` event, so a blob missing later (``state/store/`` deleted,
    #: the state moved to another runner) is downloaded again as a collected batch's is
    files: dict[str, str] = field(default_factory=dict)
    #: how many of ``answers`` the new generation's ledger kept (set when recorded)
    kept: int = 0


def recover_ahead(ctx: RunContext, res: Resource, facts: InputReport) -> None:
    """Find, at the provider, the answers a new generation of ``res`` would send again (see
    the module docstring) and keep them for ``take_recovered``. Makes provider calls: never
    call it inside a transaction."""
    if res.name in ctx.prefetched.recovered:
        return  # looked for in this pass already (what it found is taken once)
    ctx.prefetched.recovered[res.name] = Recovered()
    if not _may_recover(ctx, res):
        return
    provider = ctx.provider_for(res.provider)
    try:
        since = lookup_since(ctx, res)
        listed = _keyed_batches(ctx, provider, since, (res.name, res.moved_from))
    except ProviderError as err:
        # kept for the key lookups, which raise it naming their resource, never create
        ctx.prefetched.listing_failures.setdefault(provider.name, err)
        return
    rejected = _no_reuse_start(res, listed)
    adoptable = _adopted_by_key(res)  # the keys the lookup adopts: never recovered from
    before = _first_adoptable(adoptable, listed)
    candidates = [
        remote
        for remote in listed
        if _is_earlier_generations(ctx, res, provider, remote, adoptable)
        and (
            _made_since(remote, rejected)
            if rejected is not None
            else before is None or _ended_before(remote, before)
        )
    ]
    if not candidates:
        return
    # the newest first, however the provider lists (a compatible server may list oldest
    # first): of several generations that answered the very same line, the newest answer is
    # kept, as carry-over keeps it (an older one may be what a --no-reuse threw away)
    candidates.sort(key=lambda r: -1 if r.created_at is None else r.created_at, reverse=True)
    with ctx.store.reading():
        generations = ctx.store.generations(res.name)
        wanted = {
            (fact.custom_id, fact.request_sha)
            for fact in unreused_requests(
                ctx.store,
                res,
                exclude=[g.id for g in generations if g.spec_hash == res.spec_hash],
                requests=lambda r: ctx.request_facts(r, facts.sha256),
                generations=generations,
            )
        }
    found = Recovered()
    for entry in candidates:
        if not wanted:
            break
        try:
            remote = read_back_if_trimmed(provider, entry)
            if remote is None or not remote.is_terminal or not names_output_file(remote):
                continue
            if rejected is None and before is not None and not _ended_before(remote, before):
                continue  # its end read back: a trimmed listing may not have said it
            kept = _answers_of(ctx, provider, remote, wanted)
        except ProviderError as err:
            if err.retryable:  # a provider down: the lookups would fail too
                err.about(res.name)
                raise  # nothing sent: the next run looks again
            found.unreadable.append(f"{entry.id}: {err.message}")
            continue
        if kept:
            found.batches.append(remote.id)
            found.answers.update(kept)
            for answer in kept.values():
                found.files[answer.blob] = str(remote.output_file_id)
            wanted.difference_update(kept)
    ctx.prefetched.recovered[res.name] = found


def _keyed_batches(
    ctx: RunContext, provider: Provider, since: float, names: Iterable[str | None]
) -> list[RemoteBatch]:
    """The batches of the pass's listing back to ``since`` whose key names one of ``names``:
    the listing is grouped by resource once a pass per provider (a pass that creates 500
    resources walks it once), and again only for a ``since`` further back."""
    cache = ctx.prefetched.keyed_batches
    grouped = cache.get(provider.name)
    if not isinstance(grouped, _Grouped) or grouped.since > since:
        grouped = _Grouped(since)
        for remote in pass_listing(ctx, provider).listed_since(since):
            name = remote.metadata.get("batchspec_resource")
            if name is not None:
                grouped.batches.setdefault(name, []).append(remote)
        cache[provider.name] = grouped
    return [
        remote
        for name in names
        if name is not None
        for remote in grouped.batches.get(name, ())
        if remote.created_at is None or remote.created_at >= since
    ]


@dataclass
class _Grouped:
    """A provider's keyed batches listed back to ``since``, by resource."""

    since: float
    batches: dict[str, list[RemoteBatch]] = field(default_factory=dict)


def take_recovered(ctx: RunContext, res: Resource) -> Recovered | None:
    """The answers ``recover_ahead`` found for ``res`` in this pass, once."""
    found = ctx.prefetched.recovered.pop(res.name, None)
    return found if isinstance(found, Recovered) else None


def _may_recover(ctx: RunContext, res: Resource) -> bool:
    """Whether a create of ``res`` would draw the shards of a new generation that keeps
    earlier answers, on a provider whose batches may be read for them."""
    config = ctx.project.providers.get(res.provider)
    if config is None or config.type not in LINES_AS_SENT or res.stand_in:
        return False
    with ctx.store.reading():
        gen = ctx.store.find_generation(res.name, res.spec_hash)
        if gen is None:  # an ordinary create (a replacement's generation is recorded first)
            return res.spec_hash == spec_hash(res.semantic_spec())
        if ctx.store.batches(gen.id) or ctx.ledger.has_requests(gen.id):
            return False  # its shards are drawn already
        return reuses_answers(gen) and not answers_by_stand_in(gen)


def _is_earlier_generations(
    ctx: RunContext,
    res: Resource,
    provider: Provider,
    remote: RemoteBatch,
    adoptable: set[tuple[str, str]],
) -> bool:
    """Whether ``remote`` is a batch of another generation of ``res`` that this state does not
    know, ended with an output file (as listed; a trimmed one is read back later)."""
    name = remote.metadata.get("batchspec_resource")
    spec = remote.metadata.get("batchspec_spec")
    if name is None or spec is None or name not in (res.name, res.moved_from):
        return False
    if (name, spec) in adoptable:
        return False
    if not remote.is_terminal or remote.status == "failed":
        return False
    return ctx.store.batch_by_remote_id(provider.name, remote.id) is None


def _first_adoptable(adoptable: set[tuple[str, str]], listed: Iterable[RemoteBatch]) -> int | None:
    """When the first of the listed batches whose key the lookup adopts (``adoptable``) was
    created (epoch seconds); None if none is listed (or none has a date)."""
    dates = [
        remote.created_at
        for remote in listed
        if remote.created_at is not None
        and (remote.metadata.get("batchspec_resource"), remote.metadata.get("batchspec_spec"))
        in adoptable
    ]
    return min(dates) if dates else None


def _ended_before(remote: RemoteBatch, created: int) -> bool:
    """Whether ``remote`` ended (as far as it says: else was made) before ``created``.

    However it ended: a batch cancelled (or expired) with part of its answers has no
    ``completed_at``, and one still stopping when the next generation drew its shards (the
    hold past ``replaceHoldSeconds``) was made long before them.

    The current spec's own batches, which the lookup adopts by key, were drawn from what
    the answers kept *then* left: only a batch that had ended by then can have given them.
    Kept from a later one (a replacement's, made after them), an answer would leave its
    request out of the shards drawn now, whose keys then name none of the batches made:
    every request of them was sent again, where the lookup adopted them before."""
    ended = remote.ended_at or remote.completed_at or remote.created_at
    return ended is not None and ended <= created


def _no_reuse_start(res: Resource, listed: Iterable[RemoteBatch]) -> int | None:
    """When the first listed batch of the newest ``apply --replace NAME --no-reuse`` of
    ``res``'s current spec was made (epoch seconds); None if none is listed.

    That replacement sent every request again because the user would keep none of the
    answers before it: those are not kept here either (the lost state would otherwise bring
    back the very answers the user threw away, where the state that recorded the replacement
    shows its own). Its batches, and later ones, are kept from instead; the current spec's
    own batches are then the replaced generation's, which the state never used again.

    A replacement with no batch listed (``apply --replace NAME`` that kept every answer made
    none) does not end the search: the ``--no-reuse`` one after it was missed, and the very
    answers the user threw away were adopted as the results."""
    specs: dict[str, list[int]] = {}
    for remote in listed:
        spec = remote.metadata.get("batchspec_spec")
        if remote.metadata.get("batchspec_resource") == res.name and spec is not None:
            dates = specs.setdefault(spec, [])
            if remote.created_at is not None:
                dates.append(remote.created_at)
    start = None
    # replacements are numbered 1, 2, ...; one may have no batch listed (it kept every
    # answer, so made none, or made them before the window): the scan goes on past it, until
    # every listed spec is told or UNLISTED_REPLACEMENTS_MAX numbers in a row have none
    untold = set(specs) - {res.spec_hash}
    number, unlisted = 1, 0
    while untold and unlisted < UNLISTED_REPLACEMENTS_MAX:
        unlisted += 1
        for reuse in (True, False):
            h = replacement_hash(res, number, reuse=reuse)
            if h in untold:
                untold.discard(h)
                unlisted = 0
                if not reuse and specs[h]:
                    start = min(specs[h])
        number += 1
    return start


def _made_since(remote: RemoteBatch, start: int) -> bool:
    """Whether ``remote`` was made at or after ``start`` (a batch of no known date: not)."""
    return remote.created_at is not None and remote.created_at >= start


def _adopted_by_key(res: Resource) -> set[tuple[str, str]]:
    """``(resource, spec hash)`` of the keys ``adopt.look_up_before_create`` adopts: recovered
    from, those batches' requests would be left out of the shards whose keys name them."""
    keys = {(res.name, res.spec_hash)}
    semantic = res.semantic_spec()
    if res.moved_from is not None and res.spec_hash == spec_hash(semantic):
        keys.add((res.moved_from, spec_hash({**semantic, "name": res.moved_from})))
    return keys


def _answers_of(
    ctx: RunContext,
    provider: Provider,
    remote: RemoteBatch,
    wanted: set[tuple[str, str]],
) -> dict[tuple[str, str], RecoveredAnswer]:
    """The succeeded answers ``remote`` holds for ``wanted`` requests: its input file read
    for the very same lines, then (only if it has any) its output file filed and read."""
    assert remote.input_file_id is not None and remote.output_file_id is not None
    ctx.before_wait()  # downloads: never with a commit group's writer lock held
    with tempfile.TemporaryDirectory(dir=ctx.project.state_path.parent) as tmp:
        path = Path(tmp) / "input.jsonl"
        provider.download_file(remote.input_file_id, path)
        sent = _sent_lines(path, wanted)
    if not sent:
        return {}
    sha = download_to_store(provider, remote.output_file_id, ctx.blobs)
    ctx.filed_blobs.add(sha)
    kept: dict[tuple[str, str], RecoveredAnswer] = {}
    for line in read_result_lines(ctx.blobs.ensure_local(sha)):
        request_sha = sent.get(line.custom_id)
        if request_sha is None or line.outcome.state != "ok":
            continue
        kept.setdefault(
            (line.custom_id, request_sha), RecoveredAnswer(sha, line.offset, line.length)
        )
    return kept


def _sent_lines(path: Path, wanted: set[tuple[str, str]]) -> dict[str, str]:
    """``custom_id -> request_sha`` of the lines of a batch input file that are ``wanted``
    requests; a custom_id the file holds twice is left out (which line was answered?).

    A request is hashed as the request index hashes an input's line: without its ending,
    one ``\n`` then one ``\r``. A line of the file ending ``\r\n`` is either: a request
    line ending in ``\r`` (an input's ``\r\r\n``: a shard file copies the request and
    ends it with ``\n``) or one sent with its ``\r\n`` (an input uploaded as it is). Both
    send the provider these very bytes, so either may be the one wanted."""
    found: dict[str, tuple[str, ...]] = {}
    twice: set[str] = set()
    with path.open("rb", buffering=_READ_BUFFER) as f:
        for raw in f:
            line = raw[:-1] if raw.endswith(b"\n") else raw
            if not line.strip():
                continue
            custom_id = _custom_id(line)
            if custom_id is None:
                continue
            if custom_id in found:
                twice.add(custom_id)
            shas: tuple[str, ...] = (hashlib.sha256(line).hexdigest(),)
            if line.endswith(b"\r"):
                shas = (hashlib.sha256(line[:-1]).hexdigest(), *shas)
            found[custom_id] = shas
    return {
        c: next(s for s in shas if (c, s) in wanted)
        for c, shas in found.items()
        if c not in twice and any((c, s) in wanted for s in shas)
    }


def _custom_id(body: bytes) -> str | None:
    try:
        record = json.loads(body)
    except ValueError:
        return None
    custom_id = record.get("custom_id") if isinstance(record, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def recovered_rows(found: Recovered) -> Iterable[tuple[str, str, str, int, int]]:
    """``(custom_id, request_sha, blob, offset, length)`` of each answer kept."""
    for (custom_id, request_sha), answer in found.answers.items():
        yield custom_id, request_sha, answer.blob, answer.offset, answer.length
