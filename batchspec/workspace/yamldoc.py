"""YAML documents that remember where every node came from, checked against our JSON Schemas.

Both the project file and the manifests are read here, so that every problem, whatever finds
it, names ``file:line:column`` and the JSON pointer of the offending node, e.g.::

    manifests/triage.yaml:7:13: /spec/endpoint: '/v1/chat' is not one of ... (did you mean ...?)

Promises:

- Every problem in a file is reported, not just the first: the schema is applied with
  ``iter_errors`` and each error becomes one ``Problem``; nothing stops at the first one.
  A document ``schemafit.schema_accepts`` finds valid skips jsonschema (it would find
  nothing there): the happy path neither imports it nor pays for its generic walk.
- Lines and columns are 1-based. A problem about a scalar points at the value; a problem about
  a mapping or list (too many entries, a missing key) points at the key that holds it, which is
  where a reader looks; an unknown or invalid key points at the key itself.
- The YAML dialect is YAML 1.2-like where 1.1 surprises people: only ``true``/``false`` are
  booleans (so ``on:`` is the string "on", not True) and dates stay strings. Duplicate keys
  and non-string keys are problems, never silently merged, as is an explicit tag that builds
  no JSON value (``!!binary``, ``!!timestamp``). Merge keys (``<<``) and anchors work.
- Reading a file never raises for bad content: syntax errors, bad UTF-8 and unreadable files
  come back as problems, so the caller can report them with everything else.
- Reading is bounded. A file larger than ``MAX_YAML_FILE_BYTES`` is refused unread; a path
  that is not a regular file once symlinks are resolved (a FIFO, a device such as
  ``/dev/zero``, a socket) is refused after one ``stat``, never opened. Aliases cannot blow
  up memory: nodes built through aliases count against ``MAX_ALIAS_NODES`` per document (as
  does a mapping's size once its ``<<`` merge keys are flattened), and past it the document
  is refused with a problem at the alias that crossed the limit ("billion laughs").
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml

from batchspec.errors import ManifestError
from batchspec.wire.upstream_place import misspells_builtin
from batchspec.workspace.schemafit import schema_accepts

if TYPE_CHECKING:  # jsonschema is imported when a schema is first applied (it is slow to load)
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import ValidationError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
#: keys whose value names the variable holding an API key (never quoted: it may be the key)
_KEY_VARIABLE_SUFFIXES = ("/apiKeyEnv", "/upstreamApiKeyEnv")
# Longest value quoted verbatim in a message; longer ones are cut with an ellipsis.
_QUOTE_LIMIT = 60
#: The largest manifest or project file read (bytes); a larger one is refused unread.
MAX_YAML_FILE_BYTES = 4 * 1024 * 1024
#: Nodes one document may build through aliases (and entries merged in by ``<<``); a
#: hand-written manifest reuses a few blocks, a "billion laughs" file needs billions.
MAX_ALIAS_NODES = 100_000


# ---------------------------------------------------------------------------------------------
# Locations and problems


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class SourceLocation:
    """A 1-based position in a file."""

    file: Path
    line: int
    column: int

    def __str__(self) -> str:
        return f"{display_path(self.file)}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong, with where it is (when known) and a stable ``code`` for machines.

    ``pointer`` is the JSON pointer of the offending node inside its document ("" for the
    whole document or the whole file).
    """

    file: Path | None
    line: int | None
    column: int | None
    pointer: str
    code: str
    message: str

    @classmethod
    def at(cls, loc: SourceLocation | None, pointer: str, code: str, message: str) -> Problem:
        if loc is None:
            return cls(None, None, None, pointer, code, message)
        return cls(loc.file, loc.line, loc.column, pointer, code, message)

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = display_path(self.file)
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        pointer = f"{self.pointer}: " if self.pointer else ""
        return f"{where}{pointer}{self.message}"

    def sort_key(self) -> tuple[str, int, int, str]:
        return (str(self.file or ""), self.line or 0, self.column or 0, self.pointer)


#: problems of a PATH argument itself (it does not exist, or is in another workspace)
_PATH_CODES = frozenset({"not-found", "other-workspace", "data-file"})


class InvalidManifestError(ManifestError):
    """Manifests or the project file have problems; ``problems`` holds every one of them."""

    def __init__(
        self,
        problems: Sequence[Problem],
        *,
        what: str = "the workspace",
        hints: Sequence[str] = (),
    ) -> None:
        ordered = sorted(dict.fromkeys(problems), key=Problem.sort_key)
        count = len(ordered)
        noun = "problem" if count == 1 else "problems"
        headline = (
            f"{count} {noun} in {what}; nothing was changed. Fix "
            f"{'it' if count == 1 else 'them'} and run `batchspec validate` again."
        )
        if ordered and all(p.file is None and p.code in _PATH_CODES for p in ordered):
            # a mistyped argument, not a broken workspace: validate would say the same
            headline = (
                f"{'a PATH' if count == 1 else f'{count} PATHS'} given cannot be used "
                "(PATHS are manifest files, folders or globs of one workspace); nothing was "
                "read or changed."
            )
        super().__init__(headline, details=[*(str(p) for p in ordered), *hints])
        self.problems: tuple[Problem, ...] = tuple(ordered)


def raise_if_problems(problems: Sequence[Problem], *, what: str = "the workspace") -> None:
    if problems:
        raise InvalidManifestError(problems, what=what)


def pointer_join(pointer: str, token: str | int) -> str:
    """Append one RFC 6901 reference token (escaping ``~`` and ``/``)."""
    text = str(token)
    if "~" in text or "/" in text:
        text = text.replace("~", "~0").replace("/", "~1")
    return f"{pointer}/{text}"


def pointer_parent(pointer: str) -> str:
    return pointer.rsplit("/", 1)[0] if pointer else ""


# ---------------------------------------------------------------------------------------------
# Loading YAML with positions


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and no implicit timestamps (see module docstring)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
#: a string scalar's tag: its constructor (``construct_yaml_str``) returns the node's value
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
#: an unpaired UTF-16 surrogate: a YAML "\ud800" escape builds one, and no UTF-8 text holds it
_SURROGATE = re.compile("[\ud800-\udfff]")
#: the key tags PyYAML's ``flatten_mapping`` acts on (a mapping with neither is left as is)
_FLATTENED_TAGS = frozenset({_MERGE_TAG, "tag:yaml.org,2002:value"})
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

# libyaml (when PyYAML has it) parses several times faster: 1,000 manifests load in about
# half the time. PyYAML's own parser words syntax errors better, so a file libyaml rejects
# is read again with it; that happens only for a broken file.
_FastLoader: type[Any] = _Loader
if getattr(yaml, "__with_libyaml__", False):

    class _CLoader(yaml.CSafeLoader):
        """``_Loader``'s rules (the same resolvers), parsed by libyaml."""

    _CLoader.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers
    _FastLoader = _CLoader


@dataclass(frozen=True)
class NodePosition:
    mark: yaml.Mark
    is_scalar: bool


@dataclass(frozen=True)
class YamlDocument:
    """One YAML document as plain data (string keys only) plus where each node starts."""

    file: Path
    index: int  # 0-based position of the document in its file
    data: Any
    values: Mapping[str, NodePosition] = field(repr=False)  # pointer -> value node
    keys: Mapping[str, yaml.Mark] = field(repr=False)  # pointer -> the key naming that value

    @property
    def start(self) -> SourceLocation:
        return self.location("")

    def location(self, pointer: str) -> SourceLocation:
        """Where to point for a problem about the node at ``pointer`` (see module docstring).

        Falls back to the nearest ancestor that exists, so a pointer to a missing key lands on
        the mapping that lacks it.
        """
        while True:
            position = self.values.get(pointer)
            if position is not None:
                mark = position.mark
                if not position.is_scalar and pointer in self.keys:
                    mark = self.keys[pointer]
                return self._loc(mark)
            if not pointer:
                return SourceLocation(self.file, 1, 1)
            pointer = pointer_parent(pointer)

    def key_location(self, pointer: str) -> SourceLocation:
        """Where the key naming ``pointer`` is written (the value's location if it has no key)."""
        mark = self.keys.get(pointer)
        return self._loc(mark) if mark is not None else self.location(pointer)

    def _loc(self, mark: yaml.Mark) -> SourceLocation:
        return SourceLocation(self.file, mark.line + 1, mark.column + 1)


class _AliasBomb(Exception):
    """More nodes built through aliases than ``MAX_ALIAS_NODES``; carries where it happened."""

    def __init__(self, mark: yaml.Mark, pointer: str, message: str | None = None) -> None:
        super().__init__(pointer)
        self.mark = mark
        self.pointer = pointer
        self.message = message or (
            f"aliases expand to more than {MAX_ALIAS_NODES:,} nodes; refusing the document "
            "(repeat the content, or reuse fewer anchors)"
        )


class _Builder:
    """Turns one composed node tree into plain data, recording positions and key problems.

    The composer hands back the *same* node object for every alias of an anchor, so a node
    met a second time is being built through an alias: each such build counts against
    ``MAX_ALIAS_NODES``, as does each entry a ``<<`` merge key brings in.
    """

    def __init__(self, loader: _Loader, file: Path) -> None:
        self.loader = loader
        self.file = file
        self.values: dict[str, NodePosition] = {}
        self.keys: dict[str, yaml.Mark] = {}
        self.problems: list[Problem] = []
        self._open: set[int] = set()  # ids of nodes being built, to catch recursive aliases
        self._built: set[int] = set()  # ids of nodes built at least once
        self._aliased = 0  # nodes built through aliases so far
        self._merged: dict[int, int] = {}  # id of a mapping -> its entries once merged

    def build_document(self, node: yaml.Node) -> Any:
        """The document's data; None (with a problem) when its aliases expand too far."""
        try:
            return self.build(node)
        except _AliasBomb as bomb:
            self._problem(bomb.mark, bomb.pointer, "alias-limit", bomb.message)
            return None
        except RecursionError:
            message = "the document nests too deeply to be read"
            self._problem(node.start_mark, "", "too-deep", message)
            return None

    def _count_alias(self, node: yaml.Node, pointer: str, count: int = 1) -> None:
        self._aliased += count
        if self._aliased > MAX_ALIAS_NODES:
            raise _AliasBomb(node.start_mark, pointer)

    def build(self, node: yaml.Node, pointer: str = "", *, aliased: bool = False) -> Any:
        key = id(node)
        aliased = aliased or key in self._built
        self._built.add(key)
        if aliased:
            self._count_alias(node, pointer)
        scalar = type(node) is yaml.ScalarNode or isinstance(node, yaml.ScalarNode)
        self.values[pointer] = NodePosition(node.start_mark, scalar)
        if scalar:
            return self._scalar(cast(yaml.ScalarNode, node), pointer)
        if key in self._open:
            self._problem(node.start_mark, pointer, "recursive-alias", "an alias refers to itself")
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [
                    self.build(item, pointer_join(pointer, i), aliased=aliased)
                    for i, item in enumerate(node.value)
                ]
            mapping = cast(yaml.MappingNode, node)  # neither scalar nor sequence
            return self._mapping(mapping, pointer, aliased=aliased)
        finally:
            self._open.discard(id(node))

    def _merged_size(self, node: yaml.MappingNode, pointer: str, seen: frozenset[int]) -> int:
        """How many entries ``node`` holds once its ``<<`` merges are flattened (memoised).

        Computed before ``flatten_mapping`` runs, because flattening nested merges copies
        entries level by level: a chain of merges doubles the list at every level.
        """
        known = self._merged.get(id(node))
        if known is not None:
            return known
        if id(node) in seen:  # a merge that includes itself: PyYAML would recurse forever
            message = "a `<<` merge key includes the mapping that holds it"
            raise _AliasBomb(node.start_mark, pointer, message)
        total = 0
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":
                total += 1
                continue
            subnodes = (
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
            for sub in subnodes:
                if isinstance(sub, yaml.MappingNode):
                    total += self._merged_size(sub, pointer, seen | {id(node)})
            if total > MAX_ALIAS_NODES:
                raise _AliasBomb(key_node.start_mark, pointer)
        self._merged[id(node)] = total
        return total

    def _scalar(self, node: yaml.ScalarNode, pointer: str) -> Any:
        """A scalar as JSON has it; an explicit tag that builds anything else (``!!binary``
        bytes, a ``!!timestamp`` date) is a problem: no schema type matches it, but an
        open object (a request ``body``) would carry it to a JSON encoder."""
        if node.tag == _STR_TAG:  # most scalars: what the constructor would give, directly
            return self._text(node, pointer, node.value)
        value = self.loader.construct_object(node)
        if type(value) is str:
            return self._text(node, pointer, value)
        if value is None or type(value) in (int, float, bool):
            return value
        self._problem(
            node.start_mark,
            pointer,
            "invalid-value",
            f"{node.tag.replace('tag:yaml.org,2002:', '!!')} values are not JSON: "
            "write a string, a number, true/false or null",
        )
        return None

    def _text(self, node: yaml.Node, pointer: str, value: str) -> str:
        """``value``, unless it holds an unpaired surrogate (a ``"\\ud800"`` escape): no
        Unicode text, so no UTF-8 file, request or database could hold it (it was a
        traceback when the run first wrote it). Then a problem, and the text with ``?`` in
        its place (so the schema checks see a string, and say nothing more of it)."""
        found = None if value.isascii() else _SURROGATE.search(value)
        if found is None:
            return value
        code = f"\\u{ord(found.group()):04x}"
        self._problem(
            node.start_mark,
            pointer,
            "invalid-value",
            f"the text holds {code}, half of a surrogate pair, which is no character: write "
            "the character itself (or its \\U escape)",
        )
        return _SURROGATE.sub("?", value)

    def _mapping(self, node: yaml.MappingNode, pointer: str, *, aliased: bool) -> dict[str, Any]:
        if self._check_duplicates(node, pointer):  # a `<<` or `=` key: flattened first
            self._merged_size(node, pointer, frozenset())  # refuses a chain that explodes
            self.loader.flatten_mapping(node)  # resolves `<<` merge keys in place
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, pointer)
            if key is None:
                continue
            child = pointer_join(pointer, key)
            self.keys[child] = key_node.start_mark  # later keys win, as in the data
            result[key] = self.build(value_node, child, aliased=aliased)
        return result

    def _key(self, key_node: yaml.Node, pointer: str) -> str | None:
        if not isinstance(key_node, yaml.ScalarNode):
            self._problem(key_node.start_mark, pointer, "invalid-key", "keys must be plain strings")
            return None
        if key_node.tag == _STR_TAG:  # as in ``_scalar``
            return self._text(key_node, pointer, key_node.value)  # (no pointer of its own)
        key = self.loader.construct_object(key_node)
        if isinstance(key, str):
            return self._text(key_node, pointer, key)
        text: str = key_node.value
        self._problem(
            key_node.start_mark,
            pointer_join(pointer, text),
            "invalid-key",
            f"key {text} is not a string: quote it ('{text}')",
        )
        return text

    def _check_duplicates(self, node: yaml.MappingNode, pointer: str) -> bool:
        """Report keys written twice; True when a key is one ``flatten_mapping`` rewrites
        (a ``<<`` merge key or a ``=`` value key), else the mapping needs no flattening."""
        seen: dict[str, yaml.Mark] = {}
        flattened = False
        for key_node, _ in node.value:
            tag = key_node.tag
            if tag in _FLATTENED_TAGS:
                flattened = True
            # A merge key may be repeated, and merged keys may be overridden: that is YAML.
            if tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            first = seen.setdefault(key_node.value, key_node.start_mark)
            if first is not key_node.start_mark:
                self._problem(
                    key_node.start_mark,
                    pointer_join(pointer, key_node.value),
                    "duplicate-key",
                    f"duplicate key '{key_node.value}' (first defined at line {first.line + 1})",
                )
        return flattened

    def _problem(self, mark: yaml.Mark, pointer: str, code: str, message: str) -> None:
        loc = SourceLocation(self.file, mark.line + 1, mark.column + 1)
        self.problems.append(Problem.at(loc, pointer, code, message))


def read_yaml_documents(
    path: Path, *, digest: list[str] | None = None
) -> tuple[list[YamlDocument], list[Problem]]:
    """Every document of a YAML file, with the problems met while reading it.

    Empty documents (a stray ``---``) are dropped. Documents before a syntax error are kept,
    so their problems are reported too. ``digest``, if given, gets the sha256 of the bytes
    read (the manifest cache keeps it to recognise those bytes later).
    """
    text, problems = _read_text(path, digest)
    if text is None:
        return [], problems
    documents, found = _read_documents(path, text, _FastLoader)
    if _FastLoader is not _Loader and any(p.code == "yaml-syntax" for p in found):
        documents, found = _read_documents(path, text, _Loader)
    return documents, problems + found


def _read_documents(
    path: Path, text: str, loader_class: type[Any]
) -> tuple[list[YamlDocument], list[Problem]]:
    problems: list[Problem] = []
    documents: list[YamlDocument] = []
    loader = loader_class(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            builder = _Builder(loader, path)
            data = builder.build_document(node)
            problems.extend(builder.problems)
            if data is not None:
                documents.append(YamlDocument(path, index, data, builder.values, builder.keys))
            index += 1
    except yaml.MarkedYAMLError as err:
        problems.append(_syntax_problem(path, err))
    except yaml.YAMLError as err:  # unmarked: rare (e.g. a reader error without position)
        problems.append(Problem.at(SourceLocation(path, 1, 1), "", "yaml-syntax", str(err)))
    except RecursionError:  # the composer recurses per nesting level: `[[[[...` thousands deep
        message = "the YAML nests too deeply to be read"
        problems.append(Problem.at(SourceLocation(path, 1, 1), "", "too-deep", message))
    finally:
        loader.dispose()
    return documents, problems


def _read_text(path: Path, digest: list[str] | None = None) -> tuple[str | None, list[Problem]]:
    try:
        raw = read_bounded(path, MAX_YAML_FILE_BYTES)
        if digest is not None:
            digest.append(hashlib.sha256(raw).hexdigest())
    except _Refused as refused:
        return None, [Problem(path, None, None, "", refused.code, refused.message)]
    except OSError as err:
        reason = err.strerror or str(err)
        return None, [Problem(path, None, None, "", "unreadable", f"cannot read file: {reason}")]
    try:
        return raw.decode("utf-8-sig"), []
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        message = f"not UTF-8: byte 0x{raw[err.start]:02x} cannot be decoded"
        return None, [Problem(path, line, column, "", "encoding", message)]


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; raises ``_Refused`` otherwise.

    The file is ``stat``-ed first (through its symlinks): a FIFO or a device is refused
    without opening it (opening a FIFO blocks until a writer comes; ``/dev/zero`` never
    ends). The file is then opened non-blocking (in case it was swapped for a FIFO since)
    and read to at most ``limit + 1`` bytes, so a file that grew meanwhile is refused too.
    """
    try:
        # the usual case: stat and open follow the symlinks themselves (a realpath would
        # walk every folder of the path first: most of a small manifest's read)
        info, resolved = os.stat(path), path
    except OSError as failed:
        try:
            resolved = path.resolve()  # the same failure, as it was always reported
        except RuntimeError:  # a symlink loop (pathlib before 3.13): stat's ELOOP says it
            raise failed from None
        info = os.stat(resolved)
    if not stat.S_ISREG(info.st_mode):
        kind = _file_kind(info.st_mode)
        raise _Refused("not-a-file", f"not a regular file ({kind}): refusing to read it")
    too_big = (
        f"the file is larger than {limit:,} bytes: refusing to read it "
        "(a manifest or project file is a few kB)"
    )
    if info.st_size > limit:
        raise _Refused("too-large", too_big)
    fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:  # read through the descriptor: a file object's fstat, ioctl and lseek cost as much
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise _Refused("not-a-file", "not a regular file: refusing to read it")
        # sized to the file (a read of ``limit + 1`` bytes allocates that much: 4 MiB a
        # manifest); a file that grew since its fstat is read on, up to the limit
        raw = _read_up_to(fd, min(opened.st_size, limit) + 1)
        if len(raw) > opened.st_size:
            raw += _read_up_to(fd, limit + 1 - len(raw))
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise _Refused("too-large", too_big)
    return raw


def _read_up_to(fd: int, size: int) -> bytes:
    """``size`` bytes from ``fd``, fewer only at its end (as a buffered ``read(size)``)."""
    parts = []
    while size > 0 and (part := os.read(fd, size)):
        parts.append(part)
        size -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a file"


#: what a YAML parser's terse problem usually means in a hand-edited manifest (by its start):
#: nearly always a line indented unlike its neighbours, or a key that lost its colon
_SYNTAX_HINTS = {
    "mapping values are not allowed here": (
        "a key indented deeper than the keys above it, or a value holding ': ' (quote it)"
    ),
    "expected <block end>": (
        "a line indented less or more than the keys beside it (this one or one just above)"
    ),
    "could not find expected ':'": (
        "a key missing its ':', or a line indented unlike its neighbours"
    ),
    "found character '\\t' that cannot start any token": "YAML indents with spaces, never tabs",
}


def _syntax_problem(path: Path, err: yaml.MarkedYAMLError) -> Problem:
    mark = err.problem_mark or err.context_mark
    reason = err.problem or "invalid YAML"
    if err.context:
        reason = f"{reason} ({err.context}"
        if err.context_mark is not None and err.context_mark is not mark:
            reason += f" at line {err.context_mark.line + 1}"
        reason += ")"
    hint = next((h for start, h in _SYNTAX_HINTS.items() if reason.startswith(start)), None)
    if hint:
        reason += f"; likely {hint}"
    line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
    return Problem(path, line, column, "", "yaml-syntax", f"YAML syntax error: {reason}")


# ---------------------------------------------------------------------------------------------
# Schema validation with readable, located messages


@cache
def load_schema(name: str) -> Mapping[str, Any]:
    """A schema from ``schemas/`` by short name (``batch`` or ``project``)."""
    with (SCHEMA_DIR / f"{name}.schema.json").open(encoding="utf-8") as fh:
        schema: Mapping[str, Any] = json.load(fh)
        return schema


@cache
def schema_validator(name: str) -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(load_schema(name))


def schema_problems(doc: YamlDocument, schema: str) -> list[Problem]:
    """Every way ``doc`` breaks the schema, each located and explained; and every
    ``.nan``/``.inf`` in it, which no schema bound catches (NaN compares false with any
    minimum) and no price, budget or request body can mean."""
    problems: list[Problem] = []
    if not schema_accepts(load_schema(schema), doc.data):  # else jsonschema finds nothing
        for error in schema_validator(schema).iter_errors(doc.data):
            problems.extend(_explain(doc, error, load_schema(schema)))
    if not _holds_non_finite(doc.data):  # the usual document: walked, no pointers made
        return problems
    for pointer, value in _non_finite(doc.data, ""):
        shown = ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
        message = f"{shown} is not a number batchspec accepts: write a finite number"
        problems.append(Problem.at(doc.location(pointer), pointer, "invalid-value", message))
    return problems


def _holds_non_finite(node: Any) -> bool:
    """Whether ``_non_finite(node)`` finds anything (a walk without its pointer a node:
    a thousand clean manifests cost it 15 ms, this 2 ms)."""
    kind = type(node)
    if kind is str or kind is int or kind is bool or node is None:
        return False
    if kind is dict:
        values: Iterable[Any] = node.values()
    elif kind is list:
        values = node
    elif isinstance(node, float):  # then as ``_non_finite`` tells them apart
        return not math.isfinite(node)
    elif isinstance(node, Mapping):
        values = node.values()
    elif isinstance(node, list):
        values = node
    else:
        return False
    return any(_holds_non_finite(value) for value in values)


def _non_finite(node: Any, pointer: str) -> Iterator[tuple[str, float]]:
    """``(pointer, value)`` of each NaN or infinite float in ``node``, in document order."""
    if isinstance(node, float) and not math.isfinite(node):
        yield pointer, node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _non_finite(value, pointer_join(pointer, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _non_finite(value, pointer_join(pointer, i))


def _explain(
    doc: YamlDocument, error: ValidationError, root: Mapping[str, Any]
) -> Iterator[Problem]:
    pointer = "".join(pointer_join("", token) for token in error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties":
        yield from _unknown_keys(doc, error, pointer, root)
    elif kind == "required":
        yield from _missing_keys(doc, error, pointer)
    elif "propertyNames" in error.relative_schema_path:
        child = pointer_join(pointer, str(error.instance))  # a key: always a string
        message = _key_message(error, pointer)
        yield Problem.at(doc.key_location(child), child, "invalid-key", message)
    else:
        code = "wrong-type" if kind == "type" else "invalid-value"
        yield Problem.at(doc.location(pointer), pointer, code, _value_message(error, pointer))


def _unknown_keys(
    doc: YamlDocument, error: ValidationError, pointer: str, root: Mapping[str, Any]
) -> Iterator[Problem]:
    schema = cast("Mapping[str, Any]", error.schema)  # set on every error iter_errors yields
    allowed = list(schema.get("properties", {}))
    instance: Any = error.instance
    for key in instance:
        if key in allowed:
            continue
        child = pointer_join(pointer, key)
        hint = suggest(key, allowed)
        parent = _belongs_under(root, schema, instance, key)
        if parent is not None:
            message = (
                f"unknown key '{key}' here: it goes under '{parent}' (one level down: "
                f"{parent}: {{{key}: ...}})"
            )
        elif hint:
            message = f"unknown key '{key}' (did you mean '{hint}'?)"
        elif allowed:
            message = f"unknown key '{key}' (allowed here: {', '.join(allowed)})"
        else:
            message = f"unknown key '{key}'"
        yield Problem.at(doc.key_location(child), child, "unknown-key", message)


def _belongs_under(
    root: Mapping[str, Any], schema: Mapping[str, Any], instance: Mapping[str, Any], key: str
) -> str | None:
    """The key of ``instance`` whose mapping takes ``key``, when ``key`` was written one level
    too high: a provider's ``maxConcurrency`` or ``upstreams`` beside its ``type`` instead of
    under its ``options`` (whose keys depend on that type: the ``then`` of an ``allOf`` branch
    whose ``if`` the instance meets)."""
    from jsonschema import Draft202012Validator

    branches = [schema]
    for branch in schema.get("allOf", ()):
        condition = branch.get("if")
        if condition is not None and Draft202012Validator(condition).is_valid(instance):
            branches.append(branch.get("then", {}))
    found = None
    for branch in branches:
        for parent, sub in branch.get("properties", {}).items():
            ref = sub.get("$ref") if isinstance(sub, Mapping) else None
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                sub = root.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {})
            if isinstance(sub, Mapping) and key in sub.get("properties", {}):
                found = parent  # a type's own branch comes last and wins
    return found


def _missing_keys(doc: YamlDocument, error: ValidationError, pointer: str) -> Iterator[Problem]:
    # jsonschema reports one error per missing key but names it only in prose, so recompute
    # the set; duplicates are removed when the problems are collected.
    required: Any = error.validator_value
    for key in required:
        if isinstance(error.instance, Mapping) and key not in error.instance:
            message = f"missing required key '{key}'"
            yield Problem.at(doc.location(pointer), pointer, "missing-key", message)


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list):
        return "array"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def quote(value: Any) -> str:
    """A short JSON rendering of ``value`` for messages."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, str):
        text = "'" + value + "'"
    if len(text) > _QUOTE_LIMIT:
        text = text[: _QUOTE_LIMIT - 1] + "…"
    return text


#: an upstream URL ending in an endpoint rather than at its base URL (schema: ``upstream``)
_ENDPOINT_AT_END = re.compile(
    r"(/(?:chat/completions|completions|embeddings|responses|moderations|messages))/*$"
)


#: a value that starts as a URL scheme would (``htp:/host``): a typo to show, not a scheme
#: to add
_SCHEME_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def _looks_numeric(text: str, *, integer: bool) -> bool:
    """Whether ``text`` is what YAML reads as a number once unquoted (an int if asked)."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    if isinstance(loaded, bool):
        return False
    return isinstance(loaded, int) if integer else isinstance(loaded, (int, float))


def _value_message(error: ValidationError, pointer: str) -> str:
    kind = error.validator
    expected: Any = error.validator_value  # set on every error iter_errors yields
    value: Any = error.instance
    if kind == "type":
        wanted = " or ".join(expected) if isinstance(expected, list) else expected
        message = f"expected {wanted}, got {json_type(value)}"
        if not isinstance(value, (Mapping, list)):
            message += f" {quote(value)}"
        pattern = error.schema.get("pattern") if isinstance(error.schema, Mapping) else None
        if (
            wanted == "string"
            and not isinstance(value, (Mapping, list))
            and isinstance(pattern, str)
            and not re.search(pattern, str(value))
        ):
            # `completionWindow: 24`: quoting it only trades this for "does not match"
            message += _why(cast("Mapping[str, Any]", error.schema))
        elif wanted == "string" and not isinstance(value, (Mapping, list)):
            message += " (quote it to make it a string)"
        elif (
            wanted in ("integer", "number")
            and isinstance(value, str)
            and _looks_numeric(value.strip(), integer=wanted == "integer")
        ):
            message += f" (drop the quotes: {value.strip()})"
        return message
    if kind == "enum":
        options = ", ".join(quote(o) for o in expected)
        hint = suggest(value, [o for o in expected if isinstance(o, str)])
        tail = f" (did you mean '{hint}'?)" if hint else ""
        return f"{quote(value)} is not one of {options}{tail}"
    if kind == "const":
        tail = ""
        if pointer == "/kind" and value == "Project":
            tail = " (a Project document belongs in the project file batchspec.yaml)"
        return f"expected {quote(expected)}, got {quote(value)}{tail}"
    if kind == "pattern" and pointer.endswith(_KEY_VARIABLE_SUFFIXES):
        # the usual mistake is the key itself in place of its variable's name: never echo it
        return (
            f"is not an environment variable name (it must match {expected}); give the name "
            "of the variable that holds the API key, never the key itself (value not shown)"
        )
    if kind == "pattern" and "/upstream" in pointer and isinstance(value, str) and "#" in value:
        # `batchspec serve --upstream URL#rpm=N` is the command line's form, not the file's
        url, _, limits = value.partition("#")
        pairs = ", ".join(p.replace("=", ": ", 1) for p in limits.split(",") if p)
        return (
            f"{quote(value)}: limits after '#' are the command line's form (--upstream "
            f"URL#rpm=N); in `upstreams:` an upstream with limits is an object: "
            f"{{url: {url}{', ' + pairs if pairs else ''}}}"
        )
    if kind == "pattern" and "/upstream" in pointer and isinstance(value, str):
        host = value.rpartition("@")[2]  # `user:password@host` is never echoed
        if misspells_builtin(value):  # the same advice as `batchspec serve --upstream bultin`
            return f"{quote(value)}: did you mean 'builtin' (the offline stand-in)?"
        if "://" not in value and host and not any(c.isspace() for c in host):
            # the same advice as `batchspec serve --upstream gpu1:8000/v1`
            return (
                f"{quote(host)} has no scheme: did you mean 'http://{host}'? (an upstream is "
                "an http(s) base URL, or 'builtin' for the offline stand-in)"
            )
        endpoint = _ENDPOINT_AT_END.search(value.partition("#")[0])
        if endpoint is not None:  # the same refusal as `batchspec serve --upstream`'s
            base = value[: endpoint.start()]
            return (
                f"{quote(value)} names an endpoint ({endpoint.group(1)}), not a base URL: "
                f"each line's own endpoint is appended to it; use '{base}'"
            )
    if kind == "pattern" and pointer.endswith("/baseUrl") and isinstance(value, str):
        host = value.rpartition("@")[2]  # `user:password@host` is never echoed
        if host and not _SCHEME_LIKE.match(value) and not any(c.isspace() for c in host):
            local = host.startswith(("localhost", "127.", "[::1]", "0.0.0.0"))
            scheme = "http" if local else "https"
            return (
                f"{quote(host)} has no scheme: did you mean '{scheme}://{host}'? (baseUrl is "
                "the API's http(s) base URL, e.g. https://api.openai.com/v1)"
            )
    if kind == "pattern":
        why = _why(cast("Mapping[str, Any]", error.schema))
        return f"{quote(value)} does not match {expected}{why}"
    if kind == "maxLength":
        return f"{quote(value)} is {len(value)} characters long, at most {expected} allowed"
    if kind == "minLength":
        return "must not be empty"
    if kind == "not" and isinstance(expected, Mapping) and list(expected) == ["required"]:
        keys = " and ".join(f"'{k}'" for k in expected["required"])
        return f"{keys} exclude each other: keep one of them"
    if kind == "maxProperties":
        tail = ""
        if pointer == "/spec/metadata":
            tail = " (providers allow 16 metadata pairs and batchspec adds 4 of its own)"
        return f"has {len(value)} entries, at most {expected} allowed{tail}"
    return error.message


def _key_message(error: ValidationError, pointer: str) -> str:
    key: Any = error.instance  # set on every error iter_errors yields
    kind, expected = error.validator, error.validator_value
    if kind == "not":
        return (
            f"key '{key}' is reserved: keys starting with 'batchspec_' are added by batchspec "
            "itself (batchspec_resource, batchspec_spec, batchspec_shard, batchspec_attempt)"
        )
    if kind == "maxLength":
        return f"key {quote(key)} is {len(key)} characters long, at most {expected} allowed"
    if kind == "minLength":
        return "keys must not be empty"
    if kind == "pattern":
        why = _why(cast("Mapping[str, Any]", error.schema))
        return f"key {quote(key)} does not match {expected}{why}"
    return f"key {quote(key)}: {error.message}"


# a full stop and a space end a sentence, except in an abbreviation ("e.g. https://...")
_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)\.\s")


def _why(schema: Mapping[str, Any]) -> str:
    """The first sentence of a schema's description, as a hint after a pattern mismatch."""
    description = schema.get("description")
    if not isinstance(description, str):
        return ""
    sentence = _SENTENCE_END.split(description, maxsplit=1)[0].rstrip(".")
    return f" ({sentence})"


def suggest(word: Any, candidates: Iterable[str]) -> str | None:
    """The candidate ``word`` most likely meant, if any is close (for "did you mean").

    Spelling variants (``completion_window``, ``CompletionWindow``) match exactly; otherwise
    difflib picks the closest, or a candidate that extends what was typed (``/v1/chat``).
    """
    if not isinstance(word, str) or not word:
        return None
    options = list(candidates)

    def norm(text: str) -> str:
        return re.sub(r"[-_\s]", "", text).lower()

    for option in options:
        if norm(option) == norm(word):
            return option
    lowered = {option.lower(): option for option in options}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    if close:
        return lowered[close[0]]
    extending = [option for option in options if option.lower().startswith(word.lower())]
    return extending[0] if len(extending) == 1 else None


#: how many names a message lists before it says how many there are in all
NAMES_SHOWN = 10


def name_listing(names: Iterable[str], *, limit: int = NAMES_SHOWN) -> str:
    """``names`` sorted and comma-separated for a message; past ``limit``, the first ones and
    the count (a workspace of 500 resources must not print 500 names), "none" for none."""
    ordered = sorted(set(names))
    if len(ordered) <= limit:
        return ", ".join(ordered) or "none"
    return ", ".join(ordered[:limit]) + f", … ({len(ordered)} in all)"


def unknown_name_hint(name: str, names: Iterable[str]) -> str:
    """What follows "no resource named NAME": the closest known name, if any, and a listing."""
    known = list(names)
    close = suggest(name, known)
    listing = f"known: {name_listing(known)}"
    return f"did you mean {close!r}? {listing}" if close else listing
