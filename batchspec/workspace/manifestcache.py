"""Remember manifest files that parsed and passed the schema, so ``plan`` need not redo it.

Parsing YAML with positions and applying the JSON Schema are most of what loading a small
manifest costs, and both are functions of the file's bytes alone. This cache keeps, per
manifest file, what ``read_yaml_documents`` returned for it (each document's plain data and
where each node starts), and ``load_workspace`` skips the reading, the shape check and the
schema check for a file it recalls.

What is *not* cached, so it runs on every load, from the recalled documents, with the same
code: everything that depends on something besides the file's bytes. That is the provider
check (the project), resolving ``input``/``output``/``errors`` (symlinks may change), the
input's existence and content hash (through the input cache, which is keyed by the input's
own stat), rows rendering, and the checks across files (names, moves, shared outputs). A
recalled file therefore yields the same ``Resource`` objects and the same problems, with the
same ``file:line:column``, as a fresh read.

Invariants:

- Only clean files are stored: the file read without problems and every document in it
  became a ``Resource``. A file with any problem is read and checked in full every time.
- An entry is keyed by the file's absolute path and holds the file's (size, mtime_ns,
  ctime_ns, inode) as seen *before* it was read; it is used only while all four are unchanged
  (any write changes the ctime, even one that restores the size and mtime) and while the
  ``fingerprint`` is unchanged: batchspec's version, the bytes of the schemas and of the
  modules that read and check a document, the PyYAML and jsonschema versions, and the
  project file's stamp.
- A racily clean file (changed within ``racy_window`` seconds of being stat'ed) could be
  rewritten within the same timestamp tick without changing its stamp (filesystem clocks
  tick from nanoseconds to 2 s), so its stamp alone proves nothing. Its entry also holds the
  sha256 of the very bytes that were parsed, and is used only when the file's bytes, read
  again, hash the same (as git treats a racily clean index entry): a read and a hash, not a
  parse and a schema check. Without that sha256 (a reader that did not give it) such a file
  is not stored. (A fleet of manifests just checked out, or written by a generator, is all
  racy at the first apply: without this, the second apply would parse every file again.)
  Once such a file's stamp has settled (older than ``racy_window`` when it was stat'ed) and its
  bytes hashed the same, the process remembers it by path, stamp and sha256, and its entry is
  marked settled (its sha256 cleared, where the stamp, fingerprint and sha256 are still the
  ones verified): any later write changes its stamp, so later recalls, in this process or
  another, do not read it again, exactly as for a file stored settled.
- The cache is a table in ``<state folder>/input-cache.db`` (beside the input cache's);
  deleting it only costs a re-read. A busy or broken cache never fails a load: it is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from batchspec import __version__
from batchspec.storage.private import ensure_private_dir
from batchspec.workspace.project import Project
from batchspec.workspace.yamldoc import (
    MAX_YAML_FILE_BYTES,
    SCHEMA_DIR,
    NodePosition,
    YamlDocument,
    read_bounded,
)

#: a file changed this recently is not stored (see the module docstring)
RACY_WINDOW_S = 2.0
#: the modules whose code decides what a clean document is (their bytes go in the fingerprint)
_CHECKING_MODULES = ("yamldoc.py", "schemafit.py", "manifest.py", "manifestcache.py")

_SCHEMA = """
create table if not exists manifest_entries (
    path text primary key,
    size integer, mtime_ns integer, ctime_ns integer, inode integer,
    fingerprint text not null,
    documents text not null,
    sha256 text
)
"""
#: files stored racy that this process hashed the same once their stamp had settled:
#: (path, stamp, sha256)
_settled_and_verified: set[tuple[str, tuple[int, int, int, int], str]] = set()
#: the table before racy entries kept their bytes' sha256 (dropped: it costs one re-read)
_OLD_TABLE = "manifests"


@dataclass(frozen=True)
class _Seen:
    stamp: tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode
    at_ns: int  # the wall clock just before the stat


class ManifestCache:
    """Clean manifest files by path and stamp; ``recall`` then ``remember`` on a miss.

    Entries to store are kept in memory and written in one transaction on ``close``.
    """

    def __init__(
        self, db_path: Path | None, project: Project, *, racy_window: float = RACY_WINDOW_S
    ) -> None:
        self.project = project
        self.racy_window_ns = int(racy_window * 1e9)
        self.recalled = 0  # files answered from the cache by this instance
        self._fingerprint: str | None = None
        self._seen: dict[Path, _Seen] = {}
        self._pending: list[tuple[Any, ...]] = []
        #: racy entries verified once their stamp settled: (path, *stamp, fingerprint, sha256)
        self._settled: list[tuple[Any, ...]] = []
        #: the paths stored when first asked (one query, not one per new manifest)
        self._stored: set[str] | None = None
        self.conn: sqlite3.Connection | None = None
        if db_path is not None:
            with contextlib.suppress(sqlite3.Error, OSError):
                self.conn = _connect(db_path)

    def __enter__(self) -> ManifestCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.conn is None:
            return
        with contextlib.suppress(sqlite3.Error):  # a busy cache costs a re-read next time
            self._flush(self.conn)
        self.conn.close()
        self.conn = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = cache_fingerprint(self.project)
        return self._fingerprint

    def recall(self, file: Path) -> list[YamlDocument] | None:
        """``file``'s documents if it is stored and unchanged; else None (then read it)."""
        at_ns = time.time_ns()
        try:
            stamp = _stamp(file)
        except OSError:
            return None  # the reader reports why it cannot read the file
        self._seen[file] = _Seen(stamp, at_ns)
        if self.conn is None or str(file) not in self._stored_paths(self.conn):
            return None
        try:
            row = self.conn.execute(
                "select size, mtime_ns, ctime_ns, inode, fingerprint, documents, sha256 "
                "from manifest_entries where path = ?",
                (str(file),),
            ).fetchone()
        except sqlite3.Error:
            return None
        if row is None or tuple(row[:4]) != stamp or row[4] != self.fingerprint:
            return None
        if row[6] is not None:
            if not self._same_bytes(file, stamp, row[6], at_ns):
                return None  # stored racy: its stamp proves nothing, and its bytes changed
            if max(stamp[1], stamp[2]) <= at_ns - self.racy_window_ns:
                self._settled.append((str(file), *stamp, row[4], row[6]))
        try:
            documents = decode_documents(file, row[5])
        except (ValueError, KeyError, TypeError):
            return None  # a damaged entry costs a re-read
        del self._seen[file]  # nothing to remember for it
        self.recalled += 1
        return documents

    def _stored_paths(self, conn: sqlite3.Connection) -> set[str]:
        """The paths of the stored entries, read on the first ``recall``: a file not among
        them is a miss without a query of its own (a first load of 1,000 new manifests made
        1,000). Entries are written only on ``close``; another run's written meanwhile are
        only missed."""
        if self._stored is None:
            try:
                self._stored = {
                    path for (path,) in conn.execute("select path from manifest_entries")
                }
            except sqlite3.Error:
                self._stored = set()
        return self._stored

    def _same_bytes(
        self, file: Path, stamp: tuple[int, int, int, int], sha256: str, at_ns: int
    ) -> bool:
        """Whether a file stored racy still holds the bytes of ``sha256``: hashed, once a
        process after its stamp settled (see the module docstring)."""
        key = (str(file), stamp, sha256)
        if key in _settled_and_verified:
            return True
        if _bytes_sha256(file) != sha256:
            return False
        if max(stamp[1], stamp[2]) <= at_ns - self.racy_window_ns:
            _settled_and_verified.add(key)
        return True

    def remember(
        self, file: Path, documents: list[YamlDocument], *, sha256: str | None = None
    ) -> None:
        """Store a clean file's documents, read after a ``recall`` of it missed; ``sha256``:
        of the bytes they were parsed from (needed to store a racily clean file)."""
        seen = self._seen.pop(file, None)
        if seen is None or self.conn is None:
            return
        size, mtime_ns, ctime_ns, _ = seen.stamp
        racy = max(mtime_ns, ctime_ns) > seen.at_ns - self.racy_window_ns
        if racy and sha256 is None:
            return  # a same-tick rewrite would keep this stamp, and nothing else can tell
        encoded = encode_documents(documents)
        if encoded is not None:
            verify = sha256 if racy else None  # a settled stamp is proof enough
            self._pending.append((str(file), *seen.stamp, self.fingerprint, encoded, verify))

    def _flush(self, conn: sqlite3.Connection) -> None:
        if not self._pending and not self._settled:
            return
        conn.execute("begin immediate")  # one transaction: one sync, not one per file
        try:
            conn.executemany(
                "update manifest_entries set sha256 = null where path = ? and size = ? "
                "and mtime_ns = ? and ctime_ns = ? and inode = ? and fingerprint = ? "
                "and sha256 = ?",
                self._settled,
            )
            conn.executemany(
                "insert or replace into manifest_entries values (?, ?, ?, ?, ?, ?, ?, ?)",
                self._pending,
            )
            # Entries of an older fingerprint or of deleted files are never used again.
            conn.execute("delete from manifest_entries where fingerprint != ?", (self.fingerprint,))
            gone = [
                (path,)
                for (path,) in conn.execute("select path from manifest_entries")
                if not os.path.exists(path)
            ]
            conn.executemany("delete from manifest_entries where path = ?", gone)
        except BaseException:
            conn.execute("rollback")
            raise
        conn.execute("commit")
        self._pending.clear()
        self._settled.clear()


def _connect(db_path: Path) -> sqlite3.Connection:
    ensure_private_dir(db_path.parent)
    if not db_path.exists():
        os.close(os.open(db_path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=0.5)
    try:
        conn.execute("pragma journal_mode=wal")
        conn.execute(_SCHEMA)
        conn.execute(f"drop table if exists {_OLD_TABLE}")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _bytes_sha256(path: Path) -> str | None:
    """The sha256 of the file's bytes now, read as the loader reads them; None if it cannot."""
    try:
        return hashlib.sha256(read_bounded(path, MAX_YAML_FILE_BYTES)).hexdigest()
    except Exception:  # noqa: BLE001 - refused or unreadable: a miss, the reader says why
        return None


def _stamp(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def cache_fingerprint(project: Project) -> str:
    """What every entry depends on besides its own file (see the module docstring)."""
    sha = hashlib.sha256()
    parts = [__version__, yaml.__version__, str(yaml.__with_libyaml__), _jsonschema_release()]
    if project.file is not None:
        try:
            parts.append(repr(_stamp(project.file)))
        except OSError:
            parts.append("project?")
    sha.update(json.dumps(parts).encode())
    here = Path(__file__).resolve().parent
    for path in [
        *sorted(SCHEMA_DIR.glob("*.json")),
        *(here / name for name in _CHECKING_MODULES),
    ]:
        sha.update(path.name.encode() + b"\0")
        with contextlib.suppress(OSError):
            sha.update(path.read_bytes())
        sha.update(b"\0")
    return sha.hexdigest()


def _jsonschema_release() -> str:
    """Which jsonschema is installed: the name of its ``.dist-info`` folder beside the
    package (``jsonschema-4.26.0.dist-info``: its version), found without importing it or
    importlib.metadata (whose imports cost every run ~30 ms); else its version from
    importlib.metadata (an install without one such folder), else ``jsonschema?``."""
    spec = importlib.util.find_spec("jsonschema")
    # .../site-packages/jsonschema/__init__.py -> .../site-packages
    folder = os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else None
    with contextlib.suppress(OSError):
        found = [
            name
            for name in (os.listdir(folder) if folder else [])
            if name.startswith("jsonschema-") and name.endswith(".dist-info")
        ]
        if len(found) == 1:
            return found[0]
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jsonschema")
    except PackageNotFoundError:
        return "jsonschema?"


# ---------------------------------------------------------------------------------------------
# Documents as JSON
#
#   [{"index": 0, "data": {...},
#     "values": {pointer: [line, column, is_scalar], ...},   # 0-based, as in yaml.Mark
#     "keys": {pointer: [line, column], ...}}, ...]


def encode_documents(documents: list[YamlDocument]) -> str | None:
    """The JSON text of ``documents``, or None when their data does not survive JSON exactly."""
    payload = [
        {
            "index": doc.index,
            "data": doc.data,
            "values": {
                pointer: [pos.mark.line, pos.mark.column, pos.is_scalar]
                for pointer, pos in doc.values.items()
            },
            "keys": {pointer: [mark.line, mark.column] for pointer, mark in doc.keys.items()},
        }
        for doc in documents
    ]
    # A list and a tuple both become a JSON array; only data that comes back equal is kept.
    if not all(_survives_json(doc.data) for doc in documents):
        return None
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")  # a lone surrogate ("\ud800" in YAML) is no text SQLite stores
    except (TypeError, ValueError):  # (UnicodeEncodeError is a ValueError)
        return None  # NaN, an infinity, a lone surrogate
    return text


def _survives_json(node: Any) -> bool:
    """Whether ``node`` comes back from JSON as it is: plain dicts with string keys, lists,
    strings, ints, bools, None and floats (a NaN or an infinity makes ``dumps`` refuse).
    Anything else (a tuple, a subclass, bytes, a date) is refused here, as a decode of the
    dumped text compared with the data refused it (a thousand manifests took that 20 ms)."""
    kind = type(node)
    if kind is str or kind is int or kind is float or kind is bool or node is None:
        return True
    if kind is dict:
        return all(type(key) is str and _survives_json(value) for key, value in node.items())
    if kind is list:
        return all(_survives_json(value) for value in node)
    return False


def decode_documents(file: Path, text: str) -> list[YamlDocument]:
    return [
        YamlDocument(
            file,
            doc["index"],
            doc["data"],
            _Positions(doc["values"]),
            _KeyMarks(doc["keys"]),
        )
        for doc in json.loads(text)
    ]


class _Positions(Mapping[str, NodePosition]):
    """A recalled document's value positions, built on demand.

    A clean document is asked for two or three locations (its start, its name) out of a
    dozen or more nodes, so building every mark up front would be most of a recall's cost.
    """

    def __init__(self, raw: dict[str, list[Any]]) -> None:
        self._raw = raw

    def __getitem__(self, pointer: str) -> NodePosition:
        line, column, is_scalar = self._raw[pointer]
        return NodePosition(_mark(line, column), is_scalar)

    def __contains__(self, pointer: object) -> bool:
        return pointer in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


class _KeyMarks(Mapping[str, yaml.Mark]):
    """A recalled document's key marks, built on demand (see ``_Positions``)."""

    def __init__(self, raw: dict[str, list[int]]) -> None:
        self._raw = raw

    def __getitem__(self, pointer: str) -> yaml.Mark:
        line, column = self._raw[pointer]
        return _mark(line, column)

    def __contains__(self, pointer: object) -> bool:
        return pointer in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def _mark(line: int, column: int) -> yaml.Mark:
    # Only line and column are ever read from a mark (YamlDocument.location).
    return yaml.Mark("<cached>", 0, line, column, None, 0)  # pointer unused without a buffer
