"""The request index: what one scan of a batch input learns about each request line.

``scan_batch_input`` can write it as it validates and hashes (``index=``), so the steps after
validation (sharding, the request ledger, shard and retry files) never parse the input again:
they read the index, and take a request's bytes from the input by offset only when they
must copy them. One record per request line, in file order (blank lines have none):

``line``         the 1-based physical line number
``offset``       the byte offset of the line's first byte in the input
``length``       the bytes of the request, without its line ending (``\\n``, ``\\r\\n``)
``inputs``       embedding inputs the request carries (``sharding.embedding_inputs``'s rule)
``fingerprint``  sha256 of those ``length`` bytes (the ledger's ``request_sha``, raw)
``custom_id``    the request's ``custom_id``

Format: the magic ``MAGIC``, then ``_HEADER`` (written last by ``finish``): the file's whole
length, the sha256 of the input content it describes and the sha256 of every byte after the
header; then per record ``_RECORD`` (little-endian: line, offset, length, inputs, custom_id's
UTF-8 length, fingerprint) followed by the custom_id. ``is_complete`` trusts a file only when
all three hold: a file cut short, damaged, or describing another content (an index copied
over another's name) is not used, and the input is scanned again. A file without the magic
is not an index (``read_request_index`` raises ``ValueError``). A process checks a file's
digest once: a file it found whole, or wrote whole (``remember_complete``), is known by its
identity and stamp (device, inode, size, mtime, ctime) until any of them changes (an index is
only ever replaced by a new file; any write in place changes its stamp), so each later use
reads it once, for its records.

``RequestBytes`` reads a request's bytes back from the input and checks them against the
fingerprint: an input that changed after its scan is refused (``InputChangedError``), never
copied into a batch file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Iterator
from typing import IO, Any, NamedTuple

from batchspec.errors import InputError

MAGIC = b"batchspec-request-index-2\n"
_HEADER = struct.Struct("<Q32s32s")
_RECORD = struct.Struct("<QQIII32s")
_READ_BYTES = 1024 * 1024


class RequestFact(NamedTuple):
    """One request line of a scanned input (see the module docstring); a tuple: one is made
    for every request each time an index is read (a frozen dataclass cost three times as
    much to make)."""

    line: int
    offset: int
    length: int
    custom_id: str
    fingerprint: bytes
    inputs: int = 1

    @property
    def request_sha(self) -> str:
        """The fingerprint as the ledger records it (hex)."""
        return self.fingerprint.hex()


class InputChangedError(InputError):
    """The input's bytes are no longer those that were scanned."""


class RequestIndexWriter:
    """Appends records to an open binary file (the scan calls ``add`` per request line)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._file = f
        f.write(MAGIC + _HEADER.pack(0, b"", b""))
        self._digest = hashlib.sha256()

        def write(data: bytes) -> None:
            f.write(data)
            self._digest.update(data)

        self._write = write
        self.records = 0

    def finish(self, sha256: str) -> None:
        """Write the header: the file's length, the sha256 of the input content the records
        describe (hex) and the records' own digest (the file stays open)."""
        end = self._file.tell()
        self._file.seek(len(MAGIC))
        self._file.write(_HEADER.pack(end, bytes.fromhex(sha256), self._digest.digest()))
        self._file.seek(end)

    def add(self, line: int, offset: int, content: bytes, obj: Any) -> None:
        """Record request line ``line`` at ``offset``; ``content`` may end with a ``\\r``;
        ``obj`` is its parsed JSON (a line without a string ``custom_id`` is not recorded:
        the scan reports it, and an index of a file with problems is never used)."""
        custom_id = obj.get("custom_id") if type(obj) is dict else None
        if type(custom_id) is not str:
            return
        raw = content[:-1] if content.endswith(b"\r") else content
        cid = custom_id.encode("utf-8", "surrogatepass")
        record = _RECORD.pack(
            line, offset, len(raw), _embedding_inputs(obj), len(cid), hashlib.sha256(raw).digest()
        )
        self._write(record + cid)  # one write and digest update a record, not two
        self.records += 1


def _embedding_inputs(obj: dict[str, Any]) -> int:
    """How many inputs one embeddings request carries (a list counts each element)."""
    body = obj.get("body") or {}
    value = body.get("input") if isinstance(body, dict) else None
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


#: the indexes this process found whole or wrote whole: (identity and stamp, content sha256)
_known_complete: set[tuple[tuple[int, ...], str]] = set()


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def remember_complete(path: str | os.PathLike[str], sha256: str) -> None:
    """Note that ``path`` was just written whole (``finish``) as the index of ``sha256``."""
    with contextlib.suppress(OSError):
        _known_complete.add((_identity(os.stat(path)), sha256))


def is_complete(path: str | os.PathLike[str], sha256: str) -> bool:
    """True when ``path`` is a whole, undamaged index of input content ``sha256`` (hex), as
    ``finish`` left it (its records are read to check their digest, once a process: see the
    module docstring)."""
    try:
        if (_identity(os.stat(path)), sha256) in _known_complete:
            return True
    except OSError:
        return False
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + _HEADER.size)
            stat = os.fstat(f.fileno())
            size = stat.st_size
            if len(head) != len(MAGIC) + _HEADER.size or not head.startswith(MAGIC):
                return False
            length, content, records = _HEADER.unpack_from(head, len(MAGIC))
            if length != size or content.hex() != sha256:
                return False
            while chunk := f.read(_READ_BYTES):
                digest.update(chunk)
    except OSError:
        return False
    if digest.digest() != records:
        return False
    _known_complete.add((_identity(stat), sha256))
    return True


def read_request_index(path: str | os.PathLike[str]) -> Iterator[RequestFact]:
    """Stream an index file's records in file order (a chunk of the file at a time)."""
    with open(path, "rb", buffering=0) as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{os.fspath(path)} is not a request index")
        f.read(_HEADER.size)
        yield from _records(iter(lambda: f.read(_READ_BYTES), b""), os.fspath(path))


def index_bytes_complete(data: bytes, sha256: str) -> bool:
    """``is_complete`` for an index held in memory (``data``: the whole file's bytes)."""
    head = len(MAGIC) + _HEADER.size
    if len(data) < head or not data.startswith(MAGIC):
        return False
    length, content, records = _HEADER.unpack_from(data, len(MAGIC))
    if length != len(data) or content.hex() != sha256:
        return False
    return hashlib.sha256(memoryview(data)[head:]).digest() == bytes(records)


def read_request_index_bytes(data: bytes) -> Iterator[RequestFact]:
    """The records of an index held in memory, in file order."""
    if not data.startswith(MAGIC):
        raise ValueError("not a request index")
    yield from _records(iter([data[len(MAGIC) + _HEADER.size :]]), "a request index")


def _records(chunks: Iterator[bytes], name: str) -> Iterator[RequestFact]:
    """Decode records from the bytes after the header, given in chunks of any size."""
    size = _RECORD.size
    unpack = _RECORD.unpack_from
    buf = b""
    pos = 0
    for chunk in chunks:
        buf = buf[pos:] + chunk
        pos = 0
        while len(buf) - pos >= size:
            line, offset, length, inputs, id_len, digest = unpack(buf, pos)
            if len(buf) - pos < size + id_len:
                break
            start = pos + size
            custom_id = buf[start : start + id_len].decode("utf-8", "surrogatepass")
            pos = start + id_len
            yield RequestFact(line, offset, length, custom_id, digest, inputs)
    if pos != len(buf):
        raise ValueError(f"{name} ends inside a record")


class RequestBytes:
    """Reads requests' bytes from the input they were indexed from, each checked against its
    fingerprint. Requests read in file order cost one sequential pass over the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file: IO[bytes] | None = None

    def read(self, fact: RequestFact) -> bytes:
        """The request's bytes, without its line ending; ``InputChangedError`` if they are not
        the bytes that were scanned."""
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115  # closed by close()
        f = self._file
        if f.tell() != fact.offset:
            f.seek(fact.offset)
        raw = f.read(fact.length)
        if hashlib.sha256(raw).digest() != fact.fingerprint:
            raise InputChangedError(
                f"{self.path}:{fact.line}: the input changed after it was validated; "
                "nothing was submitted from it",
                details=["run the command again: the input is validated anew"],
            )
        return raw

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RequestBytes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "MAGIC",
    "InputChangedError",
    "RequestBytes",
    "RequestFact",
    "RequestIndexWriter",
    "index_bytes_complete",
    "is_complete",
    "read_request_index",
    "read_request_index_bytes",
    "remember_complete",
]
