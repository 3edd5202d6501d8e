"""``apply --replace NAME``: run a resource again as a new generation of the same spec.

A generation is keyed by its spec hash, and every batch's key (and the metadata the provider
keeps) carries that hash, so running the same spec again needs a hash of its own. A
replacement is the resource's semantic spec plus ``"replacement": {"number": N, "reuse": R}``
and its hash is that spec's hash (``replacement_spec``). Numbers count up from 1 per spec;
``reuse`` (``--replace``: true, ``--replace --no-reuse``: false) says whether the new
generation keeps the answers that succeeded in earlier generations.

Promises:

* The *effective* spec hash of a resource (``effective_resources``) is the hash of its newest
  replacement for the manifest's current spec, else the manifest's own: every use case maps
  its resources through it, so plan, apply, status and results all see the replacement as the
  current generation, and a run that dies after recording a replacement resumes it.
* A replacement's batches carry its own hash in their keys, so adopting a batch by key after
  a crash can never pick up a batch of the generation it replaces.
* A changed manifest or input is a new spec with no replacement: the normal create applies.
* Recording one is a ``replace`` event in the audit log (see ``core.lifecycle``).
* A resource added again after ``apply --prune`` cancelled its generation (the manifest
  came back with the same spec: ``readded_after_prune``) is planned as a create of its next
  replacement, keeping answers, with no ``--replace``; one a user cancelled (``batchspec
  cancel NAME``) stays cancelled until ``apply --replace NAME``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from batchspec.core.moves import as_moved, move_source
from batchspec.core.plan import ACTIVE_GENERATION_STATUSES
from batchspec.state.store import GenerationRow, StateStore
from batchspec.wire.request_index import RequestFact
from batchspec.workspace.manifest import ANSWERS_KEY, STAND_IN, Resource, spec_hash

REPLACEMENT_KEY = "replacement"
#: the reason ``apply --prune`` records on the ``cancel`` event of a generation it cancels
PRUNE_REASON = "pruned: its manifest is gone"


def replacement_spec(res: Resource, number: int, *, reuse: bool) -> dict[str, Any]:
    """The recorded spec of ``res``'s replacement ``number`` (its hash keys the generation)."""
    return {**res.semantic_spec(), REPLACEMENT_KEY: {"number": number, "reuse": reuse}}


def replacement_hash(res: Resource, number: int, *, reuse: bool) -> str:
    return spec_hash(replacement_spec(res, number, reuse=reuse))


def current_replacement(store: StateStore, res: Resource) -> GenerationRow | None:
    """The newest recorded replacement of ``res``'s manifest spec, if any. While ``res``'s
    move (``metadata.moved``) is still to apply, it is the old name's, as the move will
    record it: the plan that apply makes before it moves picks the generation the move keeps
    current, not an older one of the manifest's own spec hash."""
    old = move_source(store, res)
    if old is None:
        return _newest_replacement(store, res)
    gen = _newest_replacement(store, replace(res, name=old))
    return None if gen is None else as_moved(gen, res.name)


def _newest_replacement(store: StateStore, res: Resource) -> GenerationRow | None:
    if not any(REPLACEMENT_KEY in g.spec for g in store.generations(res.name)):
        return None  # none recorded: no need to hash the spec (a plan asks of every resource)
    found = None
    number = 1
    while True:
        hashes = (replacement_hash(res, number, reuse=reuse) for reuse in (True, False))
        hit = next((g for h in hashes if (g := store.find_generation(res.name, h))), None)
        if hit is None:
            return found
        found, number = hit, number + 1


def replacement_number(gen: GenerationRow | None) -> int:
    """0 for an ordinary generation; N for replacement N."""
    info = gen.spec.get(REPLACEMENT_KEY) if gen is not None else None
    return int(info.get("number", 0)) if isinstance(info, dict) else 0


def reuses_answers(gen: GenerationRow) -> bool:
    """Whether a new generation keeps earlier generations' succeeded answers (all but
    ``--replace --no-reuse`` replacements do)."""
    info = gen.spec.get(REPLACEMENT_KEY)
    return not isinstance(info, dict) or bool(info.get("reuse", True))


def effective_resources(store: StateStore, resources: Iterable[Resource]) -> list[Resource]:
    """``resources`` with each spec hash swapped for its newest replacement's (if any)."""
    out = []
    for res in resources:
        gen = current_replacement(store, res)
        out.append(res if gen is None else replace(res, spec_hash=gen.spec_hash))
    return out


def readded_after_prune(store: StateStore, res: Resource) -> GenerationRow | None:
    """The generation of ``res``'s spec hash (its effective one) if ``apply --prune``
    cancelled it: ``res`` is in the manifests again, so it runs again as the next
    replacement. ``None`` for any other, a generation a user cancelled included, and while
    another generation of ``res`` is active: the manifest came back with another spec first,
    so this one is a spec change (a replace, with its consent), not a resource added back.

    The *first* ``cancel`` event of the generation says who cancelled it: the drain records
    another one when it later finds, adopts and cancels a create the prune could not confirm
    (``cancel.cancel_retired_batch``), or sends a failed cancel again."""
    gen = store.find_generation(res.name, res.spec_hash)
    if gen is None or gen.status != "cancelled":
        return None
    if any(g.status in ACTIVE_GENERATION_STATUSES for g in store.generations(res.name)):
        return None
    cancel = store.first_generation_event(res.name, gen.id, "cancel")
    return gen if cancel is not None and cancel.detail.get("reason") == PRUNE_REASON else None


def with_readded(
    store: StateStore, resources: Iterable[Resource]
) -> tuple[list[Resource], dict[str, int]]:
    """``resources`` (with their effective spec hashes) with each one added again after
    ``apply --prune`` as its next replacement (keeping answers: what apply records), and by
    name the generation each of those had (``readded_after_prune``)."""
    planned, readded = [], {}
    for res in resources:
        pruned = readded_after_prune(store, res)
        if pruned is not None:
            readded[res.name] = pruned.id
            res = next_replacement(store, res, reuse=True)
        planned.append(res)
    return planned, readded


def next_replacement(store: StateStore, res: Resource, *, reuse: bool) -> Resource:
    """``res`` as its next replacement would be: the spec hash a ``--replace`` records."""
    number = replacement_number(current_replacement(store, res)) + 1
    return replace(res, spec_hash=replacement_hash(res, number, reuse=reuse))


# ---------------------------------------------------------------------------------------------
# What a new generation would reuse (the plan counts it exactly as apply carries it over)


#: a resource's requests from its input's request index (``RunContext.request_facts``)
RequestFacts = Callable[[Resource], Iterable[RequestFact]]


def keeps_answers_of(stand_in: bool, earlier: GenerationRow) -> bool:
    """Whether a new generation (``stand_in``: one the built-in offline stand-in answers)
    keeps ``earlier``'s answers: the stand-in's are fake, so a generation a model answers
    never keeps them (the stand-in's own generations keep any)."""
    return stand_in or earlier.spec.get(ANSWERS_KEY) != STAND_IN


def answer_sources(
    generations: Iterable[GenerationRow], *, stand_in: bool, exclude: Iterable[int | None] = ()
) -> list[int]:
    """The ids of ``generations`` (but ``exclude``) whose answers a new generation keeps
    (``keeps_answers_of``): the one rule carry-over, retries, the plan's counts, the budget
    and the hold all read."""
    left_out = set(exclude)
    return [g.id for g in generations if g.id not in left_out and keeps_answers_of(stand_in, g)]


def answers_by_stand_in(gen: GenerationRow) -> bool:
    """Whether ``gen`` is answered by the built-in stand-in (its recorded spec says so)."""
    return gen.spec.get(ANSWERS_KEY) == STAND_IN


def unreused_requests(
    store: StateStore,
    res: Resource,
    *,
    exclude: Sequence[int] = (),
    requests: RequestFacts,
    generations: Sequence[GenerationRow],
) -> Iterator[RequestFact]:
    """``res``'s requests a new generation would submit: those ``reusable_answers`` does not
    count (no earlier generation got an answer for the very same line)."""
    ids = answer_sources(generations, stand_in=res.stand_in, exclude=exclude)
    answered = store.ledger().succeeded_fingerprints(ids) if ids else set()
    return (f for f in requests(res) if (f.custom_id, f.request_sha) not in answered)


def reusable_answers(
    store: StateStore,
    res: Resource,
    *,
    exclude: Sequence[int] = (),
    requests: RequestFacts,
    generations: Sequence[GenerationRow] | None = None,
) -> tuple[int, int]:
    """``(requests, bytes)`` of ``res``'s input whose very same line succeeded in an earlier
    generation: what ``RequestLedger.carry_over`` keeps when a new generation is recorded.
    ``requests``: the input's request index, read instead of parsing the input again;
    ``generations``: ``res``'s, if already read."""
    if generations is None:
        generations = store.generations(res.name)
    ids = answer_sources(generations, stand_in=res.stand_in, exclude=exclude)
    if not ids:
        return 0, 0
    answered = store.ledger().succeeded_fingerprints(ids)
    if not answered:
        return 0, 0
    count = nbytes = 0
    for fact in requests(res):
        if (fact.custom_id, fact.request_sha) in answered:
            count += 1
            nbytes += fact.length + 1
    return count, nbytes
