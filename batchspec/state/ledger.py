"""The request ledger: one row per request of a generation, in the state database.

It is what makes retries exact and results deterministic:

* A row is written for every request when a generation is first submitted: its
  ``custom_id``, input ``line``, ``shard`` and size. ``state`` starts ``pending``.
* Collecting a batch file updates the rows it answers: ``ok``, ``retryable`` (with the
  category the retry policy matched) or ``failed``, and *where* the line lives: the sha256
  of the stored blob plus byte offset and length. An ``ok`` row is never overwritten.
* A retry attempt carries exactly the rows of its shard that are still ``pending`` or
  ``retryable`` (``sent_attempt`` records the attempt that last carried each row, so a
  provider's line numbers for attempt k map back to input lines).
* Results are written by walking the rows ``ORDER BY line``: input order, one line per
  ``custom_id``, streamed, whatever the size of the job.

The table is created by the state store's migrations (``requests``); this module only
reads and writes it, in SQL both dialects accept (``batchspec.storage.sql``): ``"offset"`` is
quoted (PostgreSQL reserves it), and rows are read in input order a page at a time, so even a
PostgreSQL client cursor never holds a whole generation in memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from batchspec.errors import ProviderError
from batchspec.state.connection import StateConnection
from batchspec.storage.sql import Sql
from batchspec.wire.outcomes import Outcome
from batchspec.wire.usage import LineUsage

_CHUNK = 5_000
#: the most distinct custom_ids a collected file may answer to be recorded row by row
#: (``record_outcomes``), not through a temporary table
DIRECT_LINES = 100


class ForeignAnswers(ProviderError):
    """A collected file answers none of the requests of the shard its batch carried (its
    ``lines`` distinct custom_ids are all of other requests, or of none): the provider
    served another file's content for this one. Nothing of it was recorded."""

    def __init__(self, lines: int) -> None:
        super().__init__(
            f"its {lines} custom_id{'' if lines == 1 else 's'} answer"
            f"{'s' if lines == 1 else ''} none of the requests the batch carried"
        )
        self.lines = lines


class LedgerRow(NamedTuple):
    """One request's row (a tuple: one is made for every request a result file is written
    from)."""

    custom_id: str
    line: int
    shard: int
    state: str
    category: str | None
    blob: str | None
    offset: int | None
    length: int | None


@dataclass(frozen=True)
class ShardCounts:
    shard: int
    unresolved: int
    unresolved_bytes: int


class CollectedLine(NamedTuple):
    """One parsed line of a collected file (a tuple: one is made for every answer)."""

    custom_id: str
    offset: int
    length: int
    outcome: Outcome
    usage: LineUsage | None = None


@dataclass(frozen=True)
class BackToBack:
    """A generation answered in full by one blob in input order (``back_to_back``)."""

    blob: str
    requests: int
    end: int  # one past the newline that ends the last answer


@dataclass(frozen=True)
class UsageTotals:
    """Tokens the answers of a generation report, summed over the requests that report any."""

    requests: int  # how many requests reported usage
    input_tokens: int
    output_tokens: int


def _of_shard(shard: int | None) -> tuple[str, tuple[int, ...]]:
    """The condition (and its argument) keeping a collected file to the requests of the
    shard its batch carried: a line for another shard's request (a provider mixing files
    up) is no answer of it, and recorded it was final (``ok``), the answer of the batch that
    carried the request dropped when it came. Nothing without ``shard``."""
    return ("", ()) if shard is None else (" and requests.shard = ?", (shard,))


class RequestLedger:
    def __init__(self, db: Sql) -> None:
        self.db = db

    def has_requests(self, generation_id: int) -> bool:
        row = self.db.execute(
            "select 1 from requests where generation_id = ? limit 1", [generation_id]
        ).fetchone()
        return row is not None

    def record_requests(
        self, generation_id: int, rows: Iterable[tuple[str, int, int, int, str]]
    ) -> int:
        """Insert ``(custom_id, line, shard, bytes, request_sha)`` rows as pending."""
        sql = (
            "insert into requests (generation_id, custom_id, line, shard, bytes, "
            "request_sha, state, sent_attempt) values (?, ?, ?, ?, ?, ?, 'pending', 1) "
            "on conflict do nothing"
        )
        total = 0
        chunk: list[tuple[object, ...]] = []
        for custom_id, line, shard, nbytes, request_sha in rows:
            chunk.append((generation_id, custom_id, line, shard, nbytes, request_sha))
            if len(chunk) >= _CHUNK:
                total += len(chunk)
                self._run(sql, chunk)
        if chunk:
            total += len(chunk)
            self._run(sql, chunk)
        return total

    def carry_over(self, generation_id: int, previous: Iterable[int]) -> int:
        """Mark requests that an earlier generation already answered with the very same
        request line as ``ok``, pointing at that answer; a request already ``ok`` keeps its
        own. Returns how many were carried.

        Of several earlier generations that answered the same line, the newest one's answer
        is kept (an ``apply --replace NAME --no-reuse`` sent it again because the user would
        not keep the answer before): an UPDATE ... FROM joined to several rows takes any
        of them (PostgreSQL took the first generation's, which the user had thrown away)."""
        ids = list(previous)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        cursor = self.db.execute(
            "update requests set state = 'ok', category = null, blob = p.blob, "
            '"offset" = p."offset", length = p.length, attempt = 0, sent_attempt = 0 '
            # the newest generation's ok row of each line, by its key: the one row of it
            # (a "not exists" of a newer one probed every answer of every generation per
            # answer, a cost that grew with the square of the generations)
            'from (select o.custom_id, o.request_sha, o.blob, o."offset", o.length '
            "from requests o join (select custom_id, max(generation_id) as newest "
            f"from requests where generation_id in ({marks}) and state = 'ok' "
            "and request_sha is not null group by custom_id, request_sha) m "
            "on o.generation_id = m.newest and o.custom_id = m.custom_id) p "
            "where requests.generation_id = ? and requests.custom_id = p.custom_id "
            "and requests.request_sha = p.request_sha and requests.state != 'ok'",
            [*ids, generation_id],
        )
        return cursor.rowcount

    def keep_found_answers(
        self, generation_id: int, answers: Iterable[tuple[str, str, str, int, int]]
    ) -> int:
        """Mark requests ``ok`` with answers found outside this state, given as ``(custom_id,
        request_sha, blob, offset, length)``: each only where the request is that very line
        and not ``ok`` yet (as ``carry_over`` keeps them). Returns how many were kept."""
        sql = (
            "update requests set state = 'ok', category = null, blob = ?, \"offset\" = ?, "
            "length = ?, attempt = 0, sent_attempt = 0 where generation_id = ? and "
            "custom_id = ? and request_sha = ? and state != 'ok'"
        )
        return self.db.executemany(
            sql,
            [
                (blob, offset, length, generation_id, custom_id, request_sha)
                for custom_id, request_sha, blob, offset, length in answers
            ],
        )

    def succeeded_fingerprints(self, generations: Iterable[int]) -> set[tuple[str, str]]:
        """``(custom_id, request_sha)`` of every ``ok`` row of these generations: what
        ``carry_over`` would keep for a new generation (the plan counts it ahead)."""
        ids = list(generations)
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f"select custom_id, request_sha from requests where generation_id in ({marks}) "
            "and state = 'ok' and request_sha is not null",
            ids,
        ).fetchall()
        return {(r[0], r[1]) for r in rows}

    def resolved_lines(self, generation_id: int) -> set[int]:
        rows = self.db.execute(
            "select line from requests where generation_id = ? and state = 'ok'",
            [generation_id],
        ).fetchall()
        return {r[0] for r in rows}

    def assign_shards(self, generation_id: int, rows: Iterable[tuple[int, int]]) -> None:
        """Set the shard of requests given as ``(shard, line)``."""
        sql = "update requests set shard = ? where generation_id = ? and line = ?"
        chunk: list[tuple[object, ...]] = []
        for shard, line in rows:
            chunk.append((shard, generation_id, line))
            if len(chunk) >= _CHUNK:
                self._run(sql, chunk)
        if chunk:
            self._run(sql, chunk)

    def record_outcomes(
        self,
        generation_id: int,
        attempt: int,
        blob: str,
        lines: Iterable[CollectedLine],
        *,
        shard: int | None = None,
        outside: set[str] | None = None,
    ) -> int:
        """Record what a collected file says; an ``ok`` row is final. Returns rows changed.

        A file of up to ``DIRECT_LINES`` lines updates its requests' rows one by one, in one
        ``executemany``; a larger one's lines go to a temporary table first and are applied
        with one joined UPDATE: several times faster than one UPDATE per line on a
        50,000-line file, and four statements more than the small file's (issue 13: a fleet
        of small batches). A custom_id answered twice in one file keeps its first answer.
        With ``shard`` (the shard the file's batch carried), a file that has lines and
        answers no request of that shard records nothing and raises ``ForeignAnswers``: it
        is another file's content (taken as this one's, its batch would be collected with
        nothing answered, and every request of it paid for again by a retry); its lines for
        requests of other shards are left out (``_of_shard``), their custom_ids added to
        ``outside`` when it is given (the collect neither counts them as lines of its batch's
        requests nor passes them over in silence).
        """
        items = iter(lines)
        first: dict[str, CollectedLine] = {}  # the first line of each custom_id, in order
        for item in items:
            first.setdefault(item.custom_id, item)
            if len(first) > DIRECT_LINES:
                return self._record_through_table(
                    generation_id,
                    attempt,
                    blob,
                    itertools.chain(first.values(), items),
                    shard,
                    outside,
                )
        if not first:
            return 0
        if shard is not None:
            ours = self._refuse_foreign_lines(generation_id, shard, list(first))
            if outside is not None:
                outside.update(c for c in first if c not in ours)
        of_shard, shard_arg = _of_shard(shard)
        return self.db.executemany(
            'update requests set state = ?, category = ?, blob = ?, "offset" = ?, length = ?, '
            "attempt = ?, input_tokens = ?, output_tokens = ? where generation_id = ? and "
            f"custom_id = ? and state != 'ok'{of_shard}",
            [
                (
                    item.outcome.state,
                    item.outcome.category,
                    blob,
                    item.offset,
                    item.length,
                    attempt,
                    item.usage.input_tokens if item.usage else None,
                    item.usage.output_tokens if item.usage else None,
                    generation_id,
                    item.custom_id,
                    *shard_arg,
                )
                for item in first.values()
            ],
        )

    def _refuse_foreign_lines(
        self, generation_id: int, shard: int, custom_ids: list[str]
    ) -> set[str]:
        """``_refuse_foreign`` for a small file's distinct ``custom_ids``, without the table;
        those of them that are requests of ``shard``."""
        rows = self.db.execute(
            "select custom_id from requests where generation_id = ? and shard = ? and "
            f"custom_id in ({','.join('?' * len(custom_ids))})",
            [generation_id, shard, *custom_ids],
        ).fetchall()
        if not rows:
            raise ForeignAnswers(len(custom_ids))
        return {row[0] for row in rows}

    def _record_through_table(
        self,
        generation_id: int,
        attempt: int,
        blob: str,
        lines: Iterable[CollectedLine],
        shard: int | None,
        outside: set[str] | None = None,
    ) -> int:
        """``record_outcomes`` of a large file, through the temporary table ``collected``."""
        db = self.db
        db.execute(_COLLECTED_TABLE[db.dialect])
        db.execute("delete from collected")
        sql = "insert into collected values (?, ?, ?, ?, ?, ?, ?) on conflict do nothing"
        chunk: list[tuple[object, ...]] = []
        sent = 0  # lines put to the table (a custom_id twice counts twice)
        for item in lines:
            sent += 1
            usage = item.usage
            chunk.append(
                (
                    item.custom_id,
                    item.outcome.state,
                    item.outcome.category,
                    item.offset,
                    item.length,
                    usage.input_tokens if usage else None,
                    usage.output_tokens if usage else None,
                )
            )
            if len(chunk) >= _CHUNK:
                self._run(sql, chunk)
        if chunk:
            self._run(sql, chunk)
        if shard is not None:
            self._refuse_foreign(generation_id, shard)
        of_shard, shard_arg = _of_shard(shard)
        cursor = db.execute(
            "update requests set state = c.state, category = c.category, blob = ?, "
            '"offset" = c."offset", length = c.length, attempt = ?, '
            "input_tokens = c.input_tokens, output_tokens = c.output_tokens from collected c "
            "where requests.generation_id = ? and requests.custom_id = c.custom_id "
            f"and requests.state != 'ok'{of_shard}",
            [blob, attempt, generation_id, *shard_arg],
        )
        changed = cursor.rowcount
        # every line changed a row of the shard (the common case): none is outside it, and
        # the join that finds those is not needed
        if shard is not None and outside is not None and changed != sent:
            rows = db.execute(
                "select c.custom_id from collected c where not exists (select 1 from "
                "requests r where r.generation_id = ? and r.shard = ? and "
                "r.custom_id = c.custom_id)",
                [generation_id, shard],
            ).fetchall()
            outside.update(row[0] for row in rows)
        db.execute("delete from collected")
        return changed

    def _refuse_foreign(self, generation_id: int, shard: int) -> None:
        """Raise ``ForeignAnswers`` if the collected lines answer no request of ``shard``."""
        db = self.db
        # the first answer of the shard ends the search: a whole file is joined only to refuse
        ours = db.execute(
            "select 1 from collected c join requests r on r.custom_id = c.custom_id "
            "where r.generation_id = ? and r.shard = ? limit 1",
            [generation_id, shard],
        ).fetchone()
        if ours is not None:
            return
        listed = int(db.execute("select count(*) from collected").fetchone()[0])
        if listed:
            db.execute("delete from collected")
            raise ForeignAnswers(listed)

    def _run(self, sql: str, chunk: list[tuple[object, ...]]) -> int:
        changed = self.db.executemany(sql, chunk)
        chunk.clear()
        return changed

    def mark_sent(self, generation_id: int, shard: int, attempt: int) -> int:
        """Record that ``attempt`` carries every unresolved request of ``shard``."""
        cursor = self.db.execute(
            "update requests set sent_attempt = ? where generation_id = ? and shard = ? "
            "and state in ('pending', 'retryable')",
            [attempt, generation_id, shard],
        )
        return cursor.rowcount

    def fail_attempt(self, generation_id: int, shard: int, attempt: int, code: str) -> int:
        """A batch failed as a whole (e.g. invalid input): its requests fail finally."""
        cursor = self.db.execute(
            "update requests set state = 'failed', category = ? where generation_id = ? "
            "and shard = ? and sent_attempt = ? and state in ('pending', 'retryable')",
            [code, generation_id, shard, attempt],
        )
        return cursor.rowcount

    def lines_of_attempt(self, generation_id: int, shard: int, attempt: int) -> list[int]:
        """Input lines carried by an attempt, in the order its batch file holds them."""
        rows = self.db.execute(
            "select line from requests where generation_id = ? and shard = ? "
            "and sent_attempt = ? order by line",
            [generation_id, shard, attempt],
        ).fetchall()
        return [r[0] for r in rows]

    def unresolved_lines(self, generation_id: int, shard: int) -> set[int]:
        rows = self.db.execute(
            "select line from requests where generation_id = ? and shard = ? "
            "and state in ('pending', 'retryable')",
            [generation_id, shard],
        ).fetchall()
        return {r[0] for r in rows}

    def unresolved_fingerprints(
        self, generation_id: int, shards: Iterable[int]
    ) -> set[tuple[str, str]]:
        """``(custom_id, request_sha)`` of the unresolved rows of these shards: what a batch
        of theirs still in flight may yet answer."""
        ids = list(shards)
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f"select custom_id, request_sha from requests where generation_id = ? "
            f"and shard in ({marks}) and state in ('pending', 'retryable') "
            "and request_sha is not null",
            [generation_id, *ids],
        ).fetchall()
        return {(r[0], r[1]) for r in rows}

    def shard_counts(self, generation_id: int) -> list[ShardCounts]:
        rows = self.db.execute(
            "select shard, sum(case when state in ('pending', 'retryable') then 1 else 0 end), "
            "sum(case when state in ('pending', 'retryable') then bytes else 0 end) "
            "from requests where generation_id = ? group by shard order by shard",
            [generation_id],
        ).fetchall()
        return [ShardCounts(int(r[0]), int(r[1] or 0), int(r[2] or 0)) for r in rows]

    def state_counts(self, generation_id: int) -> dict[str, int]:
        rows = self.db.execute(
            "select state, count(*) from requests where generation_id = ? group by state",
            [generation_id],
        ).fetchall()
        return {state: int(n) for state, n in rows}

    def failure_codes(self, generation_id: int) -> dict[str, int]:
        """How many requests finally failed, per code (their category), most frequent first."""
        rows = self.db.execute(
            "select coalesce(category, 'unknown'), count(*) from requests "
            "where generation_id = ? and state = 'failed' group by 1 order by 2 desc, 1",
            [generation_id],
        ).fetchall()
        return {code: n for code, n in rows}

    def usage_totals(self, generation_id: int) -> UsageTotals:
        """What this generation's answers reported (rows carried over from an earlier
        generation have no usage here: that generation paid for them)."""
        row = self.db.execute(
            "select count(input_tokens), sum(input_tokens), sum(output_tokens) "
            "from requests where generation_id = ? and input_tokens is not null",
            [generation_id],
        ).fetchone()
        return UsageTotals(int(row[0] or 0), int(row[1] or 0), int(row[2] or 0))

    def blobs_of(self, generation_id: int) -> list[str]:
        """The sha256 of every stored file the generation's answers are read from."""
        rows = self.db.execute(
            "select distinct blob from requests where generation_id = ? and blob is not null "
            "order by blob",
            [generation_id],
        ).fetchall()
        return [r[0] for r in rows]

    def back_to_back(self, generation_id: int, blobs: list[str] | None = None) -> BackToBack | None:
        """The one stored blob that answers every request of the generation, ``ok``, back
        to back in input order (the first at offset 0, each next one a byte, its newline,
        after the previous ends), with the number of requests and where the newline after
        the last answer ends; None otherwise, or with no request. What a batch that answered
        every request, in order, looks like: its result file is then that blob as it is.

        Two cheap aggregates decide most generations; the spans are then read by input
        line, ``_CHUNK`` at a time, stopping at the first that is out of place. ``blobs``:
        ``blobs_of(generation_id)`` as the caller just read it (else it is read here)."""
        counts = self.state_counts(generation_id)
        if not counts or set(counts) != {"ok"}:
            return None
        if blobs is None:
            blobs = self.blobs_of(generation_id)
        if len(blobs) != 1:
            return None
        end, after = 0, -1
        while True:
            rows = self.db.execute(
                'select line, "offset", length from requests '
                "where generation_id = ? and line > ? order by line limit ?",
                [generation_id, after, _CHUNK],
            ).fetchall()
            for _line, offset, length in rows:
                if offset != end or length is None:
                    return None
                end = offset + length + 1
            if len(rows) < _CHUNK:
                return BackToBack(blobs[0], counts["ok"], end)
            after = rows[-1][0]

    def in_input_order(self, generation_id: int) -> Iterator[LedgerRow]:
        """The generation's rows by input line, read ``_CHUNK`` at a time (keyset pages)."""
        after = -1
        while True:
            rows = self.db.execute(
                'select custom_id, line, shard, state, category, blob, "offset", length '
                "from requests where generation_id = ? and line > ? order by line limit ?",
                [generation_id, after, _CHUNK],
            ).fetchall()
            yield from map(LedgerRow._make, rows)
            if len(rows) < _CHUNK:
                return
            after = rows[-1][1]


_COLLECTED_TABLE = {
    "sqlite": "create temp table if not exists collected (custom_id text primary key, "
    'state text, category text, "offset" integer, length integer, input_tokens integer, '
    "output_tokens integer) without rowid",
    "postgresql": "create temp table if not exists collected (custom_id text primary key, "
    'state text, category text, "offset" bigint, length bigint, input_tokens bigint, '
    "output_tokens bigint)",
}


class LedgerAccess(StateConnection):
    """The store's door to its request ledger, so callers never hold the connection."""

    def ledger(self) -> RequestLedger:
        """The request ledger in this store's database (same connection and transactions)."""
        return RequestLedger(self.db)
