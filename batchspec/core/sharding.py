"""Split a generation's requests into shards that each fit one remote batch.

A shard closes before a request would take it past the provider's limits: the number of
requests, the bytes of the batch file, and, for ``/v1/embeddings``, the number of embedding
inputs in all. The split depends only on the input's bytes and the limits, so the same input
always gives the same shards and a re-run adopts its batches instead of creating new ones.
Everything streams: a request is looked at once and never held.

``apply`` shards from the input's request index (``batchspec.wire.request_index``: each
request's size, embedding inputs and fingerprint, learnt by the scan that validated it), so
the input is not parsed again: ``assign_indexed_shards`` places requests by their facts alone,
and ``ShardWriters`` copies a request's bytes from the input by offset, checked against its
fingerprint, only when a shard file must be written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from batchspec.errors import BatchspecError
from batchspec.providers.flavours import flavour_of
from batchspec.storage.private import ensure_private_dir
from batchspec.wire.inputs import RequestLine
from batchspec.wire.request_index import InputChangedError, RequestBytes, RequestFact
from batchspec.workspace.manifest import Resource, Workspace

EMBEDDINGS_ENDPOINT = "/v1/embeddings"


@dataclass(frozen=True)
class ShardLimits:
    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    max_embedding_inputs: int = 50_000


def shard_limits(ws: Workspace, res: Resource) -> ShardLimits:
    """Manifest ``limits`` over the provider's options over the provider type's defaults."""
    provider = ws.project.providers.get(res.provider)
    options = provider.options if provider else {}
    # each type's own limits (Azure 100,000 requests, Together 100 MB, ...): providers.flavours
    flavour = flavour_of(provider.type if provider is not None else None)
    base = ShardLimits(
        max_requests=int(options.get("maxRequestsPerBatch") or flavour.max_requests),
        max_bytes=int(options.get("maxBytesPerBatch") or flavour.max_bytes),
    )
    lim = res.limits
    # a manifest may lower the provider's limits, never raise them: the provider would refuse
    return ShardLimits(
        max_requests=min(lim.max_requests_per_batch or base.max_requests, base.max_requests),
        max_bytes=min(lim.max_bytes_per_batch or base.max_bytes, base.max_bytes),
        max_embedding_inputs=min(
            lim.max_embedding_inputs_per_batch or base.max_embedding_inputs,
            base.max_embedding_inputs,
        ),
    )


def assign_shards(
    requests: Iterable[RequestLine], limits: ShardLimits, *, endpoint: str
) -> Iterator[tuple[int, RequestLine]]:
    """Yield ``(shard_index, request)`` in input order, opening a new shard at each limit."""
    count_inputs = endpoint == EMBEDDINGS_ENDPOINT
    place = _Placer(limits, count_inputs)
    for req in requests:
        # each line is written with "\n"
        yield place(len(req.raw) + 1, embedding_inputs(req.raw) if count_inputs else 0), req


def assign_indexed_shards(
    facts: Iterable[RequestFact], limits: ShardLimits, *, endpoint: str
) -> Iterator[tuple[int, RequestFact]]:
    """``assign_shards`` over a request index: the same shards, with no line parsed."""
    count_inputs = endpoint == EMBEDDINGS_ENDPOINT
    place = _Placer(limits, count_inputs)
    for fact in facts:
        yield place(fact.length + 1, fact.inputs if count_inputs else 0), fact


@dataclass(frozen=True)
class LinesOver:
    """The lines of an input that fit no shard on their own: the first (its number and
    size), and how many there are in all and the largest one's size (what a new limit
    must hold)."""

    line: int
    size: int
    count: int
    largest: int


def first_line_over(path: Path, max_bytes: int) -> LinesOver | None:
    """The lines of ``path`` that fit no shard of ``max_bytes`` on their own (sizes in a
    batch file: content and ``\n``), or None. ``_Placer`` would give such a line a shard of
    its own, over the limit: a batch the provider refuses. Streams the file (a line is read
    in pieces, never held whole); cheap when the file itself fits."""
    if os.path.getsize(path) + 1 <= max_bytes:
        return None
    found: LinesOver | None = None

    def over(lineno: int, size: int) -> None:
        nonlocal found
        if found is None:
            found = LinesOver(lineno, size, 1, size)
        else:
            found = LinesOver(found.line, found.size, found.count + 1, max(found.largest, size))

    lineno = size = 0
    with open(path, "rb") as f:
        for piece in iter(lambda: f.readline(64 * 1024), b""):
            size += len(piece)
            if not piece.endswith(b"\n"):
                continue
            lineno += 1
            if size > max_bytes:
                over(lineno, size)
            size = 0
    if size and size + 1 > max_bytes:  # a last line with no "\n": one is added
        over(lineno + 1, size + 1)
    return found


class _Placer:
    """The shard of each next request, given its size in the batch file and its inputs."""

    def __init__(self, limits: ShardLimits, count_inputs: bool) -> None:
        self.limits = limits
        self.count_inputs = count_inputs
        self.shard, self.n, self.nbytes, self.ninputs = 0, 0, 0, 0

    def __call__(self, size: int, inputs: int) -> int:
        limits = self.limits
        if self.n and (
            self.n + 1 > limits.max_requests
            or self.nbytes + size > limits.max_bytes
            or (self.count_inputs and self.ninputs + inputs > limits.max_embedding_inputs)
        ):
            self.shard, self.n, self.nbytes, self.ninputs = self.shard + 1, 0, 0, 0
        self.n, self.nbytes, self.ninputs = self.n + 1, self.nbytes + size, self.ninputs + inputs
        return self.shard


def fits_one_shard(requests: int, nbytes: int, limits: ShardLimits, *, endpoint: str) -> bool:
    """True when the whole input is one shard for sure (so it can be uploaded as it is)."""
    if endpoint == EMBEDDINGS_ENDPOINT:
        return False  # inputs per line are only known by reading them
    return requests <= limits.max_requests and nbytes <= limits.max_bytes


def count_shards(
    requests: int,
    nbytes: int,
    limits: ShardLimits,
    *,
    endpoint: str,
    facts: Callable[[], Iterable[RequestFact]],
) -> int:
    """How many shards ``requests`` requests of ``nbytes`` split into, as apply splits them:
    0 for none, 1 when they fit one for sure; else counted over their request index
    (``facts``, read only then: a plan stays cheap for an input under every limit, except
    an embeddings input, whose inputs per line only the index tells: ``fits_one_shard``)."""
    if not requests:
        return 0
    if fits_one_shard(requests, nbytes, limits, endpoint=endpoint):
        return 1
    return 1 + max(
        (shard for shard, _ in assign_indexed_shards(facts(), limits, endpoint=endpoint)),
        default=0,
    )


def embedding_inputs(raw: bytes) -> int:
    """How many inputs one embeddings request carries (a list counts each element)."""
    body = json.loads(raw).get("body") or {}
    value = body.get("input")
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


# ---------------------------------------------------------------------------------------------
# Shard files and the ledger rows that go with them


class ShardWriters:
    """Writes shard files into the shard folder, each named by the sha256 of its content;
    ``source``: the input that requests written by ``write_request`` are copied from."""

    def __init__(self, folder: Path, *, enabled: bool, source: Path | None = None) -> None:
        self.folder = folder
        self.enabled = enabled
        self._open: dict[int, tuple[BinaryIO, Any, Path]] = {}
        self._source = RequestBytes(source) if source is not None else None

    def write_request(self, shard: int, fact: RequestFact) -> None:
        """Copy an indexed request from the input (``InputChangedError`` if it changed)."""
        if self.enabled:
            assert self._source is not None, "ShardWriters(source=...) copies requests"
            self.write(shard, self._source.read(fact))

    def write(self, shard: int, raw: bytes) -> None:
        """Append one request line (``raw`` and its ``\n``) to shard ``shard``'s file."""
        self.write_bytes(shard, raw + b"\n")

    def write_bytes(self, shard: int, data: bytes | memoryview) -> None:
        """Append ``data`` as it is (whole lines, or a piece of a span of them)."""
        if not self.enabled:
            return
        with self._failing_as_the_folder():
            entry = self._open.get(shard)
            if entry is None:
                # requests, as private as the state (and not open to another user's
                # file under a shard's name, which would be uploaded as it is)
                ensure_private_dir(self.folder)
                fd, name = tempfile.mkstemp(dir=self.folder, suffix=".part")
                entry = self._open[shard] = (os.fdopen(fd, "wb"), hashlib.sha256(), Path(name))
            entry[0].write(data)
        entry[1].update(data)

    def finish(self) -> dict[int, str]:
        if self._source is not None:
            self._source.close()
        shas = {}
        with self._failing_as_the_folder():
            for shard, (handle, digest, tmp) in self._open.items():
                handle.close()
                shas[shard] = digest.hexdigest()
                os.replace(tmp, self.folder / f"{shas[shard]}.jsonl")
        self._open.clear()
        return shas

    def __enter__(self) -> ShardWriters:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        """Leaving the block by an exception discards the files not yet finished."""
        if kind is not None:
            self.discard()

    def discard(self) -> None:
        """Remove every shard file not yet finished (nothing is left of them)."""
        if self._source is not None:
            self._source.close()
        self._remove_partial()

    def _remove_partial(self) -> None:
        for handle, _, tmp in self._open.values():
            with contextlib.suppress(OSError):
                handle.close()
            tmp.unlink(missing_ok=True)
        self._open.clear()

    @contextlib.contextmanager
    def _failing_as_the_folder(self) -> Iterator[None]:
        """A write that fails (a full disk) removes every partial shard file, whose room a
        full disk wants back and which nothing would ever remove, and is raised naming the
        shard folder: a buffered write's error names no file at all."""
        try:
            yield
        except OSError as err:
            self._remove_partial()
            if err.filename is not None and not str(err.filename).endswith(".part"):
                raise
            raise OSError(err.errno, err.strerror or str(err), str(self.folder)) from err


def indexed_ledger_rows(
    facts: Iterable[RequestFact], shard: int = 0
) -> Iterator[tuple[str, int, int, int, str]]:
    """``(custom_id, line, shard, bytes, fingerprint)`` per request of a request index, all in
    ``shard``, no line parsed (the fingerprint of the raw line lets a later generation reuse
    the answers)."""
    for fact in facts:
        yield fact.custom_id, fact.line, shard, fact.length + 1, fact.request_sha


def ledger_rows_in_shards(
    facts: Iterable[RequestFact], counts: Sequence[int]
) -> Iterator[tuple[str, int, int, int, str]]:
    """``indexed_ledger_rows`` of an input split in consecutive runs: the first ``counts[0]``
    requests in shard 0, the next ``counts[1]`` in shard 1, ... (as ``shard_and_write``
    assigned them). ``BatchspecError`` if the counts do not add up to the requests."""
    shard, left = 0, counts[0] if counts else 0
    for fact in facts:
        while left == 0:
            shard += 1
            if shard >= len(counts):
                raise BatchspecError(
                    f"the recorded shards hold {sum(counts)} requests, the input more: "
                    "its ledger cannot be derived from them"
                )
            left = counts[shard]
        left -= 1
        yield fact.custom_id, fact.line, shard, fact.length + 1, fact.request_sha
    if left or any(counts[shard + 1 :]):
        raise BatchspecError(
            f"the recorded shards hold {sum(counts)} requests, the input fewer: "
            "its ledger cannot be derived from them"
        )


def shard_and_write(
    facts: Iterable[RequestFact],
    limits: ShardLimits,
    endpoint: str,
    writers: ShardWriters,
    per_shard: dict[int, int],
    bytes_per_shard: dict[int, int] | None = None,
) -> Iterator[tuple[int, RequestFact]]:
    """Assign each request a shard and write it to that shard's file, counting the requests
    (and, in ``bytes_per_shard``, their bytes as the ledger counts them) of each shard."""
    for shard, fact in assign_indexed_shards(facts, limits, endpoint=endpoint):
        per_shard[shard] = per_shard.get(shard, 0) + 1
        if bytes_per_shard is not None:
            bytes_per_shard[shard] = bytes_per_shard.get(shard, 0) + fact.length + 1
        writers.write_request(shard, fact)
        yield shard, fact


def shard_spans(
    facts: Iterable[RequestFact],
    limits: ShardLimits,
    endpoint: str,
    per_shard: dict[int, int],
    bytes_per_shard: dict[int, int],
) -> list[tuple[int, int]] | None:
    """Assign every request of an input its shard, as ``shard_and_write`` does (counting
    each shard's requests and bytes), and return each shard's span of the input,
    ``(start, end)``: from its first request's first byte to its last request's last.
    Only when each shard's requests are back to back, one ``\n`` between two (no blank
    line, no ``\r\n``): its file is then its span and a ``\n`` (``copy_shard_spans``), the
    very bytes ``write_request`` would write line by line. None when they are not."""
    spans: list[list[int]] = []
    for shard, fact in assign_indexed_shards(facts, limits, endpoint=endpoint):
        per_shard[shard] = per_shard.get(shard, 0) + 1
        bytes_per_shard[shard] = bytes_per_shard.get(shard, 0) + fact.length + 1
        if shard == len(spans):
            spans.append([fact.offset, fact.offset + fact.length])
            continue
        span = spans[shard]
        if fact.offset != span[1] + 1:
            return None  # a blank line or a "\r\n" between two requests: copied line by line
        span[1] = fact.offset + fact.length
    return [(start, end) for start, end in spans]


#: bytes of the input ``copy_shard_spans`` reads at a time
_COPY_BYTES = 1024 * 1024


def copy_shard_spans(
    source: Path, spans: Sequence[tuple[int, int]], writers: ShardWriters, sha256: str
) -> None:
    """Write shard ``k``'s file as ``spans[k]`` of ``source`` and a ``\n``, reading the
    input once, a MiB at a time, with no line looked at. The whole input is hashed as it is
    read: one that no longer holds content ``sha256`` (the content that was validated and
    indexed) is refused (``InputChangedError``), and no shard file is left."""
    whole = hashlib.sha256()
    shard, pos = 0, 0
    try:
        with contextlib.closing(_read_again(source)) as chunks:  # closed on a write's error
            for chunk in chunks:
                whole.update(chunk)
                view, end = memoryview(chunk), pos + len(chunk)
                while shard < len(spans) and spans[shard][0] < end:
                    start, stop = spans[shard]
                    if stop > pos:
                        piece = view[max(start, pos) - pos : min(stop, end) - pos]
                        writers.write_bytes(shard, piece)
                    if stop > end:
                        break
                    writers.write_bytes(shard, b"\n")
                    shard += 1
                pos = end
    except BaseException:
        writers.discard()  # a write's error is the shard folder's, as ``ShardWriters`` says
        raise
    if shard < len(spans) or whole.hexdigest() != sha256:
        writers.discard()
        raise InputChangedError(
            f"{source}: the input changed after it was validated; nothing was submitted from it",
            details=["run the command again: the input is validated anew"],
        )


def _read_again(source: Path) -> Generator[bytes, None, None]:
    """``source`` a MiB at a time; ``InputChangedError`` when it cannot be read (only its
    own errors: a shard file's failing write is the shard folder's, never the input's)."""
    try:
        with open(source, "rb", buffering=0) as f:
            while chunk := f.read(_COPY_BYTES):
                yield chunk
    except OSError as err:
        raise InputChangedError(
            f"{source}: cannot read the input again ({err.strerror or err}); "
            "nothing was submitted from it"
        ) from None


def fingerprint(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
