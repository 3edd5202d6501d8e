"""Write a generation's ``output`` and ``errors`` files in input order, from the ledger.

One line per ``custom_id``, in the order of the input, so result files diff cleanly in git
(DESIGN invariant 4). A succeeded request's line is the provider's output line, byte for byte;
a failed one's is the provider's error line; a request that never got an answer (missing from
every file after the last attempt) gets a line written by batchspec with error code
``batchspec_unresolved``. Files are written through a temporary file and a rename, and only
from the result store: restoring them needs no provider (a blob this runner lacks comes from
the state's shared tier, verified, before the first line is written out). A generation that
one stored file answers whole, back to back in input order (one batch that answered every
request, in order: the common case), gets that file copied as it is, which is the same bytes
the line-by-line writer would write, for a third less work.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchspec.core.recorded import DiskHashes, remember_written
from batchspec.errors import ManifestError
from batchspec.state.ledger import LedgerRow, RequestLedger
from batchspec.storage.blobstore import CHUNK, RawFileWriter, write_file_atomically
from batchspec.storage.result_store import ResultStore
from batchspec.workspace.yamldoc import display_path

UNRESOLVED_CODE = "batchspec_unresolved"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class WrittenResults:
    output_sha256: str
    errors_sha256: str
    succeeded: int
    failed: int
    unresolved: int  # included in ``failed``: requests no attempt answered finally


def write_results_in_input_order(
    ledger: RequestLedger,
    generation_id: int,
    blobs: ResultStore,
    output_path: Path,
    errors_path: Path,
    hashes: DiskHashes | None = None,
    shas: list[str] | None = None,
) -> WrittenResults:
    """Write the generation's result files; ``hashes``: the run's ``DiskHashes``, given the
    two files' hashes as written (``recorded.remember_written``), so the plan that follows
    does not read them back to hash them; ``shas``: its ``blobs_of``, if the caller has just
    read them."""
    try:
        return _write_results(ledger, generation_id, blobs, output_path, errors_path, hashes, shas)
    except IsADirectoryError as err:  # made since the load checked it (validate refuses one)
        path = Path(err.filename) if err.filename else output_path
        key = "errors" if path == errors_path else "output"
        raise ManifestError(
            f"the {key} file {display_path(path)} is a folder now: the results cannot be "
            "written there",
            details=[
                f"move the folder away (or name another file in the manifest's spec.{key}), "
                "then run `batchspec apply` again: the answers are kept in the result store "
                "and the files are written then"
            ],
        ) from None


def _write_results(
    ledger: RequestLedger,
    generation_id: int,
    blobs: ResultStore,
    output_path: Path,
    errors_path: Path,
    hashes: DiskHashes | None,
    shas: list[str] | None,
) -> WrittenResults:
    if shas is None:
        shas = ledger.blobs_of(generation_id)
    # fetched and verified before any writing; their paths, asked once
    local = {sha: blobs.ensure_local(sha) for sha in shas}
    if len(shas) == 1:
        whole = _copy_of_a_whole_blob(
            ledger, generation_id, shas, local, output_path, errors_path, hashes
        )
        if whole is not None:
            return whole
    counts = {"ok": 0, "failed": 0, "unresolved": 0}
    digests = {"out": hashlib.sha256(), "err": hashlib.sha256()}

    def write_both(out: RawFileWriter) -> None:
        def write_errors(err: RawFileWriter) -> None:
            with _BlobReader(blobs, local) as reader:
                answers = _LineWriter(out, digests["out"], reader)
                errors = _LineWriter(err, digests["err"], reader)
                for row in ledger.in_input_order(generation_id):
                    if row.state == "ok":
                        counts["ok"] += 1
                        target = answers
                    else:
                        counts["failed"] += 1
                        counts["unresolved"] += row.state != "failed"
                        target = errors
                    if row.blob is not None and row.offset is not None and row.length is not None:
                        target.stored(row.blob, row.offset, row.length)
                    else:
                        target.written(_line_for(row))
                answers.flush()
                errors.flush()

        errors_stat = write_file_atomically(errors_path, write_errors)
        remember_written(hashes, errors_path, digests["err"].hexdigest(), errors_stat)

    output_stat = write_file_atomically(output_path, write_both)
    remember_written(hashes, output_path, digests["out"].hexdigest(), output_stat)
    return WrittenResults(
        output_sha256=digests["out"].hexdigest(),
        errors_sha256=digests["err"].hexdigest(),
        succeeded=counts["ok"],
        failed=counts["failed"],
        unresolved=counts["unresolved"],
    )


class _NotAsRecorded(Exception):
    """The blob does not hold the answers as the ledger places them (never expected)."""


def _copy_of_a_whole_blob(
    ledger: RequestLedger,
    generation_id: int,
    shas: list[str],
    local: dict[str, Path],
    output_path: Path,
    errors_path: Path,
    hashes: DiskHashes | None,
) -> WrittenResults | None:
    """The result files of a generation answered in full by one blob, its answers back to
    back in input order (``RequestLedger.back_to_back``: one batch that answered every
    request, in order): the output file is that blob byte for byte, the errors file empty,
    as the line-by-line writer would write them. The copy is hashed as it is written, and
    made only if the blob ends where the last answer's newline does and holds as many
    newlines as answers (an answer never holds one: so each newline is the one between two
    answers); else None, and nothing was written."""
    placed = ledger.back_to_back(generation_id, shas)  # ``shas``: its blobs_of, just read
    if placed is None:
        return None
    # read through its descriptor: its size from the open file, no buffered file object
    src = os.open(local[placed.blob], os.O_RDONLY)
    try:
        if os.fstat(src).st_size != placed.end:
            return None
        digest = hashlib.sha256()

        def copy_then_errors(out: RawFileWriter) -> None:
            newlines, last, left = 0, b"", placed.end
            # its size is known (fstat): read to it, not on to an empty read at its end
            while left and (chunk := os.read(src, min(CHUNK, left))):
                left -= len(chunk)
                newlines += chunk.count(b"\n")
                last = chunk[-1:]
                digest.update(chunk)
                out.write(chunk)
            if left or newlines != placed.requests or last != b"\n":
                raise _NotAsRecorded
            errors_stat = write_file_atomically(errors_path, lambda err: None)  # created empty
            remember_written(hashes, errors_path, EMPTY_SHA256, errors_stat)

        try:
            output_stat = write_file_atomically(output_path, copy_then_errors)
        except _NotAsRecorded:
            return None
        remember_written(hashes, output_path, digest.hexdigest(), output_stat)
    finally:
        os.close(src)
    return WrittenResults(
        output_sha256=digest.hexdigest(),
        errors_sha256=EMPTY_SHA256,
        succeeded=placed.requests,
        failed=0,
        unresolved=0,
    )


def _line_for(row: LedgerRow) -> bytes:
    """The line batchspec writes for a request no stored answer holds."""
    if row.state == "failed":  # the whole batch failed (e.g. its input was rejected)
        error = {"code": row.category, "message": "the batch carrying this request failed"}
    else:
        error = {
            "code": UNRESOLVED_CODE,
            "message": "no result from the provider after the last attempt",
        }
    record = {"id": None, "custom_id": row.custom_id, "response": None, "error": error}
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class _LineWriter:
    """One result file's lines, each a stored line plus a newline, written and hashed.

    Lines that lie back to back in one blob (the next starts one byte after the previous
    ends, and that byte is a newline: a file collected in input order) are read and written
    as one run, up to ``RUN_BYTES`` at a time, instead of a read, a write and a hash update
    per line; the bytes written are the same.
    """

    RUN_BYTES = 1 << 20

    def __init__(self, out: RawFileWriter, digest: Any, reader: _BlobReader) -> None:
        self.out = out
        self.digest = digest
        self.reader = reader
        self.sha = ""
        self.start = self.end = 0
        self.run: list[tuple[int, int]] = []  # (offset, length) of the lines of the run

    def stored(self, sha: str, offset: int, length: int) -> None:
        if self.run and (
            sha != self.sha
            or offset != self.end + 1
            or offset + length - self.start > self.RUN_BYTES
        ):
            self.flush()
        if not self.run:
            self.sha, self.start = sha, offset
        self.run.append((offset, length))
        self.end = offset + length

    def written(self, line: bytes) -> None:
        self.flush()
        self._emit(line)

    def flush(self) -> None:
        if not self.run:
            return
        start, run = self.start, self.run
        data = self.reader.read(self.sha, start, self.end - start)
        if all(data[o + n - start : o + n - start + 1] == b"\n" for o, n in run[:-1]):
            self._emit(data + b"\n")
        else:  # not newline-separated after all: line by line
            for o, n in run:
                self._emit(data[o - start : o - start + n] + b"\n")
        run.clear()

    def _emit(self, data: bytes) -> None:
        self.out.write(data)
        self.digest.update(data)


class _BlobReader:
    """Random access into stored blobs (``local``: the paths already asked for, by sha256),
    each opened once and read with ``pread`` (a seek and a read were two syscalls)."""

    def __init__(self, blobs: ResultStore, local: dict[str, Path]) -> None:
        self.blobs = blobs
        self.local = local
        self.files: dict[str, int] = {}

    def read(self, sha: str, offset: int, length: int) -> bytes:
        fd = self.files.get(sha)
        if fd is None:
            path = self.local.get(sha) or self.blobs.ensure_local(sha)
            fd = self.files[sha] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, length, offset)
        if len(data) < length:  # a long read comes in parts; EOF ends it, as f.read did
            parts = [data]
            got = len(data)
            while got < length and (more := os.pread(fd, length - got, offset + got)):
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def __enter__(self) -> _BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.files.values():
            os.close(fd)
