"""Requests from data: render a rows file through the manifest's templates into batch JSONL.

A manifest's ``spec.input`` may be an object instead of a path::

    input:
      rows: data/tickets.csv            # .csv (header row), .jsonl/.ndjson (one object a
                                        # line) or .parquet (needs the ``parquet`` extra)
      id: "ticket-{{ ticket_id }}"      # optional; default "row-{{ row_number }}": row-1, ...
      body:                             # the request body; every string leaf is a template
        model: gpt-4o-mini
        messages: [{role: user, content: "Classify: {{ text }}"}]

``compile_request_template`` turns the ``id`` and ``body`` into one compiled template (syntax
errors come back as problems at the manifest's ``file:line:column`` of the leaf), and
``render_rows`` streams the rows file through it, one row at a time, into an OpenAI batch
JSONL file. The rest of batchspec never sees rows or templates: a rendered input is an
ordinary input file, validated, hashed, sharded and merged like any other.

Rendering
    Jinja2 in a sandbox (``SandboxedEnvironment``) with ``StrictUndefined`` and autoescape
    off, bounded so that a few bytes of template cannot build gigabytes: repetition (``*``),
    padding (``%`` widths, ``format``, ``center``/``indent``/``ljust``...) past the row cap
    and huge powers are refused as the row's problem before the value is built. A template
    sees the row's fields as variables, ``row`` (all fields, for names that are
    not identifiers: ``{{ row["ticket id"] }}``) and ``row_number`` (1-based); a field named
    ``row`` or ``row_number`` wins over the built-in. CSV values are strings; JSONL values keep
    their JSON type; Parquet values keep theirs as JSON would hold them (``parquet_value``), and
    ``{{ }}`` prints null as an empty string, booleans as ``true``/``false``
    and objects and arrays as compact JSON. Strings that hold no ``{{``, ``{%`` or ``{#`` are
    copied as they are; so are non-string leaves (numbers, booleans, null) and mapping keys.
    A trailing newline in a leaf is kept. When the body has no ``model`` and the manifest sets
    ``spec.model``, that model is added to every body.

Output
    One line per row, in row order, so rendered line N is row N: ``{"body": ..., "custom_id":
    ..., "method": "POST", "url": <spec.endpoint>}`` as canonical JSON (sorted keys, no
    spaces, UTF-8). The file is written to a temporary name beside its destination and moved
    to ``<folder>/<sha256>.jsonl`` when complete, so it is content-addressed and never seen half
    written; an existing file of that name is reused. ``<folder>/keys/<key>`` remembers which
    rendered file a (templates, rows content, renderer version) triple produced, so unchanged
    data is not rendered again: a load reads the rows file once to hash it. Everything under
    the folder is a cache: deleting it only costs a re-render.

Parquet
    Read with pyarrow (the optional ``parquet`` extra: the manifest loader refuses a Parquet
    rows file without it, before anything runs) in record batches of ``PARQUET_BATCH_ROWS``
    rows, row group after row group, in file order: memory is one batch, never the file.
    A Parquet file has no lines, so its problems carry no line: they name the file and the
    row (``data/t.parquet: row 3 has no field ...``). A file that is not Parquet (whatever its
    name), a truncated one, and one naming a column twice are one problem each.

Problems (``yamldoc.Problem``, never raised)
    Template syntax: at the manifest leaf. Rows: at ``rows-file:line``, naming the row (CSV:
    the line where the record starts; JSONL: the physical line; Parquet: no line) and, for a
    missing field, the field, the fields the row has and the template leaf that used it.
    Structural problems of the rows file (a CSV row with too many or too few fields, a JSONL
    line that is not a JSON object), an empty ``custom_id`` and a ``custom_id`` two rows share
    are reported the same
    way. The first ``MAX_SHOWN`` are listed and one more line counts the rest. Memory is one
    row plus the set of ``custom_id``s seen (needed to name a duplicate's first row): a row
    longer than ``DEFAULT_MAX_ROW_BYTES`` (10 MiB, as a batch input's line) is a
    ``row-too-large`` problem found while streaming, never read whole (JSONL: skipped, and
    reading goes on; CSV: reading stops there, since a cut record may hide where the next
    one starts).
"""

from __future__ import annotations

import base64
import csv
import datetime
import decimal
import functools
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import jinja2
from jinja2 import StrictUndefined
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from batchspec.storage.private import ensure_private_dir
from batchspec.wire.inputs import DEFAULT_MAX_LINE_BYTES, MAX_SHOWN
from batchspec.workspace.yamldoc import Problem, SourceLocation, display_path, pointer_join

DEFAULT_ID_TEMPLATE = "row-{{ row_number }}"
#: The longest row read (bytes; for CSV, characters of one record): a longer one is a
#: ``row-too-large`` problem, skipped as it streams by, as batch inputs cap a line.
DEFAULT_MAX_ROW_BYTES = DEFAULT_MAX_LINE_BYTES
ROWS_FORMATS: Mapping[str, str] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
#: rows of a Parquet file converted to Python at a time (one record batch)
PARQUET_BATCH_ROWS = 1024
#: at most this many values (rows x leaf columns) per record batch: a wide file (thousands of
#: columns) is read a few rows at a time, so its Python objects stay bounded
PARQUET_BATCH_CELLS = 1 << 16
#: what to install for Parquet rows files (the extra ``results --format parquet`` uses too)
PARQUET_EXTRA = "pip install 'batchspec[parquet]'"
#: Bumped when the rendered output for the same templates and rows would change.
RENDER_VERSION = 1
_TEMPLATE_MARKERS = ("{{", "{%", "{#")
_UNDEFINED_NAME = re.compile(r"^'([^']*)' is undefined$|^'(.+?)' has no attribute '([^']*)'$")
#: jinja's names of the values a template may read an attribute of, as a message says them
_VALUE_KINDS = {"str object": "text", "int object": "number", "float object": "number"}

Locate = Callable[[str], SourceLocation]
Context = Mapping[str, Any]


def _finalize(value: Any) -> Any:
    """How ``{{ value }}`` prints JSON values: no Python reprs in prompts."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return value


#: operators whose result a template can make arbitrarily large from a few bytes
_GROWING_BINOPS = frozenset({"*", "**", "%"})
#: the largest integer power a template may compute, in bits (str() stops at 4300 digits)
_MAX_POWER_BITS = 16 * 1024


class _BoundedSandbox(SandboxedEnvironment):
    """The sandbox, plus bounds on ``*``, ``**`` and ``%``: ``{{ text * 10**10 }}`` or
    ``{{ '%999999999s' % x }}`` would otherwise build gigabytes for one row before the row's
    size cap could see it (a manifest in a pull request runs in CI on ``plan``)."""

    intercepted_binops = _GROWING_BINOPS

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_growth(operator, left, right, DEFAULT_MAX_ROW_BYTES)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Any:
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and getattr(value, "__name__", None) in ("format", "format_map"):
            _check_widths(owner, DEFAULT_MAX_ROW_BYTES)
        return super().wrap_str_format(value)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(__obj, "__name__", None)
        if isinstance(getattr(__obj, "__self__", None), str):
            if name in _PADDING_METHODS:
                _check_args([*args, *kwargs.values()], DEFAULT_MAX_ROW_BYTES)
            elif name in ("format", "format_map"):
                _check_widths(__obj.__self__, DEFAULT_MAX_ROW_BYTES)
        return super().call(__context, __obj, *args, **kwargs)


#: str methods and filters whose numeric argument sets the size of what they build
_PADDING_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_PADDING_FILTERS = frozenset({"center", "indent", "wordwrap"})


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Filter ``name`` refusing a width past the row cap (``center(999999999)``, or a
    ``format`` string padding that far); any other filter as it is."""
    if name not in _PADDING_FILTERS and name != "format":
        return func

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        value_at = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
        if name == "format" and isinstance(args[value_at], str):
            _check_widths(args[value_at], DEFAULT_MAX_ROW_BYTES)
        elif name != "format":
            _check_args([*args[value_at + 1 :], *kwargs.values()], DEFAULT_MAX_ROW_BYTES)
        return func(*args, **kwargs)

    return bounded


def _check_growth(operator: str, left: Any, right: Any, limit: int) -> None:
    """Raise SecurityError if ``left operator right`` would build more than ``limit``."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if (
                isinstance(seq, (str, bytes, list, tuple))
                and _is_int(times)
                and len(seq) * times > limit
            ):
                raise SecurityError(
                    f"repeating {len(seq):,} characters or items {times:,} times would "
                    f"exceed {limit:,}, the most a row may hold"
                )
    elif operator == "**":
        if (
            _is_int(left)
            and _is_int(right)
            and right > 0
            and abs(left) > 1
            and left.bit_length() * right > _MAX_POWER_BITS
        ):
            raise SecurityError(f"{left} ** {right} is too large a number to compute")
    elif operator == "%" and isinstance(left, str):
        _check_widths(left, limit)


def _check_widths(text: str, limit: int) -> None:
    """Refuse a format string (``%`` or ``{}`` style) whose width or precision passes
    ``limit``: ``'%999999999s'`` pads one value to a gigabyte."""
    if any(int(n) > limit for n in re.findall(r"\d{7,}", text)):
        raise SecurityError(f"a width or precision in {text[:40]!r} passes {limit:,} characters")


def _check_args(args: Iterable[Any], limit: int) -> None:
    """Refuse a padding call or filter given a size past ``limit`` (``center(999999999)``)."""
    if any(_is_int(a) and a > limit for a in args):
        raise SecurityError(f"a size over {limit:,} passed to a padding function")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_ENV = _BoundedSandbox(
    undefined=StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,  # a YAML block scalar's final newline is part of the value
    finalize=_finalize,
)
_ENV.filters = {name: _bounded_filter(name, f) for name, f in _ENV.filters.items()}


# ---------------------------------------------------------------------------------------------
# Compiling


class _LeafError(Exception):
    """A template leaf failed for one row; carries the leaf's pointer and the cause."""

    def __init__(self, pointer: str, cause: Exception) -> None:
        super().__init__(str(cause))
        self.pointer = pointer
        self.cause = cause


Renderer = Callable[[Context], Any]


@dataclass(frozen=True)
class RequestTemplate:
    """The compiled ``id`` and ``body`` of a rows input; ``key`` identifies the definition."""

    endpoint: str
    render_id: Renderer
    render_body: Renderer
    leaves: Mapping[str, SourceLocation]  # pointer of every templated leaf -> where it is
    key: str

    def request(self, context: Context) -> tuple[str, Any]:
        """``(custom_id, body)`` for one row; raises ``_LeafError`` naming the failing leaf."""
        return str(self.render_id(context)), self.render_body(context)


def compile_request_template(
    *,
    body: Mapping[str, Any],
    id_template: str | None,
    endpoint: str,
    model: str | None,
    pointer: str,
    locate: Locate,
) -> tuple[RequestTemplate | None, list[Problem]]:
    """Compile every templated leaf of ``body`` and the id; syntax errors are problems.

    ``pointer`` is the JSON pointer of the ``input`` object in the manifest and ``locate``
    maps a pointer to its place in the manifest file.
    """
    if model is not None and "model" not in body:
        body = {"model": model, **body}
    problems: list[Problem] = []
    leaves: dict[str, SourceLocation] = {}
    id_pointer = pointer_join(pointer, "id")
    render_id = _compile(
        id_template if id_template is not None else DEFAULT_ID_TEMPLATE,
        id_pointer,
        locate,
        problems,
        leaves,
    )
    render_body = _compile(body, pointer_join(pointer, "body"), locate, problems, leaves)
    if problems:
        return None, problems
    definition = {"id": id_template, "body": body, "endpoint": endpoint}
    key = _sha256_text(_canonical(definition))
    return RequestTemplate(endpoint, render_id, render_body, leaves, key), []


def _compile(
    node: Any,
    pointer: str,
    locate: Locate,
    problems: list[Problem],
    leaves: dict[str, SourceLocation],
) -> Renderer:
    """A function of the row context that rebuilds ``node`` with its templates rendered."""
    if isinstance(node, Mapping):
        items = [
            (k, _compile(v, pointer_join(pointer, k), locate, problems, leaves))
            for k, v in node.items()
        ]
        return lambda ctx: {k: render(ctx) for k, render in items}
    if isinstance(node, list):
        parts = [
            _compile(v, pointer_join(pointer, i), locate, problems, leaves)
            for i, v in enumerate(node)
        ]
        return lambda ctx: [render(ctx) for render in parts]
    if not isinstance(node, str) or not any(m in node for m in _TEMPLATE_MARKERS):
        return lambda ctx: node
    where = locate(pointer)
    try:
        template = _ENV.from_string(node)
    except jinja2.TemplateSyntaxError as err:
        message = f"template syntax error: {err.message}"
        if node.count("\n") and err.lineno:
            message += f" (line {err.lineno} of the template)"
        problems.append(Problem.at(where, pointer, "template-syntax", message))
        return lambda ctx: node
    leaves[pointer] = where

    def render(ctx: Context) -> str:
        try:
            return template.render(ctx)
        except Exception as err:  # a template is user code: any failure is the row's problem
            raise _LeafError(pointer, err) from None

    return render


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Row:
    number: int  # 1-based, data rows only
    line: int | None  # where the row starts in the rows file (1-based); None: Parquet
    fields: Mapping[str, Any]


class _RowProblem(Exception):
    """A row that cannot be read (bad JSON, wrong field count); reading goes on after it."""

    def __init__(self, line: int | None, code: str, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.code = code
        self.message = message


def rows_format(path: Path) -> str | None:
    """``csv``, ``jsonl`` or ``parquet`` by the file's extension; None when it is none of them."""
    return ROWS_FORMATS.get(path.suffix.lower())


def parquet_available() -> bool:
    """Whether pyarrow (the ``parquet`` extra) can be imported."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def iter_rows(
    path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
) -> Iterator[Row | _RowProblem]:
    """Every row of a rows file in order, or a problem in its place. Streams; never holds all:
    a row over ``max_row_bytes`` is reported and read past in bounded pieces."""
    fmt = rows_format(path)
    if fmt == "csv":
        return _csv_rows(path, max_row_bytes)
    if fmt == "parquet":
        return _parquet_rows(path, max_row_bytes)
    return _jsonl_rows(path, max_row_bytes)


class _RecordTooLarge(Exception):
    """The CSV record being read is longer than the cap (raised through ``csv.reader``)."""


class _CountingLines:
    """Feeds a file to ``csv.reader``, remembers where each record starts, and caps a record.

    Lines are read with ``readline(limit)``, so an over-long line is never read whole: once
    the record passes ``max_chars`` characters, ``_RecordTooLarge`` stops the reader.
    """

    def __init__(self, f: IO[str], max_chars: int) -> None:
        self.f = f
        self.max_chars = max_chars
        self.count = 0
        self.first: int | None = None  # first line of the record being read
        self.record_chars = 0  # characters of the record being read so far

    def start_record(self) -> None:
        self.first = None
        self.record_chars = 0

    def __iter__(self) -> _CountingLines:
        return self

    def __next__(self) -> str:
        line = self.f.readline(self.max_chars - self.record_chars + 1)
        if not line:
            raise StopIteration
        self.count += 1
        if self.first is None:
            self.first = self.count
        self.record_chars += len(line)
        if self.record_chars > self.max_chars:
            raise _RecordTooLarge
        return line


def _csv_rows(path: Path, max_row_bytes: int) -> Iterator[Row | _RowProblem]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = _CountingLines(f, max_row_bytes)
        reader = csv.reader(lines)
        header: list[str] | None = None
        number = 0
        while True:
            lines.start_record()
            try:
                record = next(reader)
            except StopIteration:
                return
            except _RecordTooLarge:
                # Where the next record starts is unknown once a record is cut (it may be
                # inside quotes), so reading stops here, as for any broken CSV.
                message = (
                    f"row {number + 1} is longer than {max_row_bytes:,} bytes (the limit of "
                    "one row); split it or shorten it"
                )
                yield _RowProblem(lines.first or lines.count, "row-too-large", message)
                return
            except (csv.Error, UnicodeDecodeError) as err:
                yield _RowProblem(
                    lines.first or lines.count, "invalid-csv", f"not valid CSV: {err}"
                )
                return
            start = lines.first or lines.count
            if not record:  # a blank line
                continue
            if header is None:
                header = record
                duplicate = _first_duplicate(header)
                if duplicate is not None:
                    message = f"the header names column {duplicate!r} twice"
                    yield _RowProblem(start, "invalid-header", message)
                    return
                continue
            number += 1
            if len(record) != len(header):
                message = (
                    f"row {number} has {len(record)} field(s) but the header has {len(header)}"
                )
                yield _RowProblem(start, "field-count", message)
                continue
            yield Row(number, start, dict(zip(header, record, strict=True)))


def _first_duplicate(names: list[str]) -> str | None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def _jsonl_rows(path: Path, max_row_bytes: int) -> Iterator[Row | _RowProblem]:
    with open(path, "rb") as f:
        number = 0
        for lineno, raw in _bounded_lines(f, max_row_bytes):
            if raw is None:  # skipped unread, as it streamed by
                number += 1
                message = (
                    f"row {number} is longer than {max_row_bytes:,} bytes (the limit of one "
                    "row); split it or shorten it"
                )
                yield _RowProblem(lineno, "row-too-large", message)
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            number += 1
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield _RowProblem(lineno, "invalid-utf8", f"row {number} is not valid UTF-8")
                continue
            except ValueError as err:
                message = f"row {number} is not valid JSON: {err}"
                yield _RowProblem(lineno, "invalid-json", message)
                continue
            if not isinstance(value, dict):
                kind = type(value).__name__.replace("dict", "object").replace("list", "array")
                message = f"row {number} is a JSON {kind}, not an object"
                yield _RowProblem(lineno, "not-an-object", message)
                continue
            yield Row(number, lineno, value)


def _parquet_rows(path: Path, max_row_bytes: int) -> Iterator[Row | _RowProblem]:
    """The rows of a Parquet file, one record batch in memory at a time, in file order."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        yield _RowProblem(None, "missing-extra", f"reading Parquet needs pyarrow: {PARQUET_EXTRA}")
        return
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        yield _RowProblem(None, "invalid-parquet", f"not a readable Parquet file: {err}")
        return
    try:
        duplicate = _first_duplicate(parquet.schema_arrow.names)
        if duplicate is not None:
            message = f"the file names column {duplicate!r} twice"
            yield _RowProblem(None, "invalid-header", message)
            return
        number = 0
        leaves = max(1, parquet.metadata.num_columns, len(parquet.schema_arrow.names))
        rows_per_batch = max(1, min(PARQUET_BATCH_ROWS, PARQUET_BATCH_CELLS // leaves))
        batches = parquet.iter_batches(batch_size=rows_per_batch, use_threads=False)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as err:
                message = f"cannot read row {number + 1} or after it: {err}"
                yield _RowProblem(None, "invalid-parquet", message)
                return
            for fields in _batch_rows(batch, pa):
                number += 1
                if isinstance(fields, Exception):
                    message = (
                        f"row {number}: a value cannot be read ({fields}); valid Parquet, but "
                        "not a value batchspec can use (e.g. a date after the year 9999)"
                    )
                    yield _RowProblem(None, "invalid-value", message)
                    continue
                values = {str(k): parquet_value(v) for k, v in fields.items()}
                if _size(values) > max_row_bytes:
                    message = (
                        f"row {number} is longer than {max_row_bytes:,} bytes (the limit of one "
                        "row); split it or shorten it"
                    )
                    yield _RowProblem(None, "row-too-large", message)
                    continue
                yield Row(number, None, values)
    finally:
        parquet.close()


#: what converting a Parquet value to Python may raise (a timestamp beyond year 9999:
#: OverflowError; a time zone the machine lacks: ArrowInvalid)
_CONVERSION_ERRORS = (OverflowError, ValueError, TypeError)


def _batch_rows(batch: Any, pa: Any) -> list[dict[str, Any] | Exception]:
    """A record batch's rows as dicts; a row holding a value Python cannot hold is, in its
    place, the error converting it (so the other rows are still read)."""
    try:
        return list(_pylist(batch))
    except (pa.ArrowException, *_CONVERSION_ERRORS):
        pass
    rows: list[dict[str, Any] | Exception] = []
    for i in range(batch.num_rows):
        try:
            rows.extend(_pylist(batch.slice(i, 1)))
        except (pa.ArrowException, *_CONVERSION_ERRORS) as err:
            rows.append(err)
    return rows


def _pylist(batch: Any) -> list[dict[str, Any]]:
    """A record batch's rows as dicts; maps as dicts where pyarrow can (16+), else as the
    ``(key, value)`` pairs ``parquet_value`` turns into one."""
    try:
        rows: list[dict[str, Any]] = batch.to_pylist(maps_as_pydicts="lossy")
    except TypeError:
        rows = batch.to_pylist()
    return rows


def parquet_value(value: Any) -> Any:
    """One value of a Parquet row as JSON would hold it, for templates and ``results --join``.

    Integers stay integers and floats floats (NaN and infinities become null: JSON has
    neither); booleans, strings and null are as they are; decimals become numbers (an integer
    when whole); dates, times and timestamps ISO 8601 text; durations seconds; binary base64
    text; lists lists; structs and maps objects (keys as text).
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): parquet_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return {str(k): parquet_value(v) for k, v in value}  # a map: (key, value) pairs
        return [parquet_value(v) for v in value]
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return str(value)


def _size(value: Any) -> int:
    """About how many bytes ``value`` takes as JSON: enough to enforce the row cap."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(len(k) + _size(v) + 4 for k, v in value.items())
    if isinstance(value, list):
        return sum(_size(v) + 1 for v in value)
    return 8


def _bounded_lines(f: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """``(line_number, line)`` for each physical line; ``line`` is None for one longer than
    ``max_bytes`` (not counting its line ending), which is read past in 64 KiB pieces."""
    lineno = 0
    while line := f.readline(max_bytes + 2):  # + room for "\r\n"
        lineno += 1
        content = len(line) - (2 if line.endswith(b"\r\n") else line.endswith(b"\n"))
        if content <= max_bytes:
            yield lineno, line
            continue
        while not line.endswith(b"\n") and (line := f.readline(1 << 16)):
            pass
        yield lineno, None


def row_lines(path: Path, numbers: Iterable[int]) -> dict[int, int | None]:
    """Where each of the rows ``numbers`` starts in the rows file (rendered line N is row N);
    None for a Parquet file, which has no lines."""
    wanted = set(numbers)
    found: dict[int, int | None] = {}
    if rows_format(path) == "parquet":
        return dict.fromkeys(wanted)
    if not wanted:
        return found
    for row in iter_rows(path):
        if isinstance(row, Row) and row.number in wanted:
            found[row.number] = row.line
            if len(found) == len(wanted):
                break
    return found


def row_context(row: Row) -> dict[str, Any]:
    """The variables a template sees for ``row`` (see the module docstring)."""
    return {"row": row.fields, "row_number": row.number, **row.fields}


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class RenderedInput:
    """A rendered batch input: ``path`` is ``<folder>/<sha256>.jsonl``."""

    path: Path
    sha256: str
    rows_path: Path


def render_rows(
    template: RequestTemplate,
    rows_path: Path,
    folder: Path,
    *,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> tuple[RenderedInput | None, list[Problem]]:
    """Render every row of ``rows_path`` into ``folder`` (reusing an earlier render).

    Returns the rendered input, or None and the problems found (nothing is left behind).
    """
    try:
        rows_sha256 = _file_sha256(rows_path)
    except OSError as err:
        reason = f"cannot read rows file {display_path(rows_path)}: {err.strerror or err}"
        return None, [Problem(rows_path, None, None, "", "unreadable", reason)]
    key = _sha256_text(
        _canonical(
            {
                "renderer": RENDER_VERSION,
                "jinja2": jinja2.__version__,
                "template": template.key,
                "format": rows_format(rows_path),
                "rows": rows_sha256,
            }
        )
    )
    cached = _cached_render(folder, key)
    if cached is not None:
        return RenderedInput(folder / f"{cached}.jsonl", cached, rows_path), []
    tmp: Path | None = None
    try:
        ensure_private_dir(folder)  # requests, private as the state
        fd, tmp_name = tempfile.mkstemp(dir=folder, suffix=".part")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as out:
            sha256, problems = _write_requests(template, rows_path, out, max_row_bytes)
        if problems:
            return None, problems
        final = folder / f"{sha256}.jsonl"
        os.replace(tmp, final)  # same content, same name: replacing an existing copy is harmless
        _remember(folder, key, sha256)
        return RenderedInput(final, sha256, rows_path), []
    except OSError as err:
        reason = (
            f"cannot write the rendered input under {display_path(folder)}: {err.strerror or err}"
        )
        return None, [Problem(rows_path, None, None, "", "unwritable", reason)]
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


class _Collector:
    """Keeps the first ``MAX_SHOWN`` problems and counts them all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shown: list[Problem] = []
        self.count = 0
        self.first_hidden_line: int | None = None

    def add(self, line: int | None, code: str, message: str) -> None:
        self.count += 1
        if len(self.shown) < MAX_SHOWN:
            self.shown.append(Problem(self.path, line, None, "", code, message))
        elif self.first_hidden_line is None:
            self.first_hidden_line = line

    def problems(self) -> list[Problem]:
        hidden = self.count - len(self.shown)
        if not hidden:
            return self.shown
        # Located at the first row not shown, so that sorting problems by place keeps it last.
        message = f"... and {hidden} more problems from here on"
        more = Problem(self.path, self.first_hidden_line, None, "", "more-problems", message)
        return [*self.shown, more]


def _write_requests(
    template: RequestTemplate, rows_path: Path, out: IO[bytes], max_row_bytes: int
) -> tuple[str, list[Problem]]:
    """Stream the rendered requests into ``out``; return their sha256 and any problems."""
    sha = hashlib.sha256()
    found = _Collector(rows_path)
    seen: dict[str, tuple[int, int | None]] = {}  # custom_id -> (row, line) that used it first
    rows = 0
    try:
        for row in iter_rows(rows_path, max_row_bytes):
            if isinstance(row, _RowProblem):
                found.add(row.line, row.code, row.message)
                continue
            rows += 1
            try:
                custom_id, body = template.request(row_context(row))
            except _LeafError as err:
                found.add(row.line, *_leaf_problem(err, row, template))
                continue
            if not custom_id:
                found.add(
                    row.line,
                    "empty-custom-id",
                    f"row {row.number}: the id template rendered an empty custom_id",
                )
                continue
            first = seen.setdefault(custom_id, (row.number, row.line))
            if first[0] != row.number:
                line_of_first = "" if first[1] is None else f", line {first[1]}"
                message = (
                    f"row {row.number}: duplicate custom_id {custom_id!r} "
                    f"(first used by row {first[0]}{line_of_first})"
                )
                found.add(row.line, "duplicate_custom_id", message)
                continue
            if found.count:
                continue  # the file will not be used: only keep looking for problems
            line = (
                _canonical(
                    {
                        "custom_id": custom_id,
                        "method": "POST",
                        "url": template.endpoint,
                        "body": body,
                    }
                ).encode("utf-8")
                + b"\n"
            )
            sha.update(line)
            out.write(line)
    except (OSError, UnicodeDecodeError) as err:
        found.add(None, "unreadable", f"cannot read the rows file: {err}")
    if rows == 0 and not found.count:
        found.add(None, "no-rows", "the rows file has no rows")
    return sha.hexdigest(), found.problems()


def _leaf_problem(err: _LeafError, row: Row, template: RequestTemplate) -> tuple[str, str]:
    """``(code, message)`` for a template that failed on ``row``."""
    where = f"{template.leaves.get(err.pointer, '')} {err.pointer}".strip()
    cause = err.cause
    if isinstance(cause, jinja2.UndefinedError):
        match = _UNDEFINED_NAME.search(str(cause))
        undefined, owner, attribute = match.groups() if match else (None, None, None)
        field = undefined or (attribute if owner == "dict object" else None)
        if owner is not None and attribute is not None and field is None:
            # `{{ lang.foo }}` with lang a field of text: not a field the row lacks
            kind = _VALUE_KINDS.get(owner, owner.removesuffix(" object"))
            return "template-error", (
                f"row {row.number}: the template at {where} reads {attribute!r} of a {kind} "
                "value, which has no such attribute (only the row and objects have fields); "
                f"the row's fields are: {', '.join(map(str, row.fields)) or 'none'}"
            )
        if field is not None:
            names = ", ".join(map(str, row.fields)) or "no fields"
            message = (
                f"row {row.number} has no field {field!r} (the row has: {names}); "
                f"used by the template at {where}"
            )
            odd = next((str(n) for n in row.fields if not str(n).isidentifier()), None)
            separator = next((c for c in ";\t|" if odd and field in odd.split(c)), None)
            if odd is not None and separator is not None:
                # a CSV saved with `;` (Excel in many locales): one field named `id;text`
                message += (
                    f"; the header {odd!r} looks separated by {separator!r}: a CSV rows file "
                    "is read with ',' between fields: save it comma-separated"
                )
            elif odd is not None:
                message += f"; read a name that is not an identifier as {{{{ row[{odd!r}] }}}}"
            return "missing-field", message
    reason = getattr(cause, "message", None) or str(cause) or type(cause).__name__
    return "template-error", f"row {row.number}: the template at {where} failed: {reason}"


# ---------------------------------------------------------------------------------------------
# The render cache


def _cached_render(folder: Path, key: str) -> str | None:
    try:
        sha256 = (folder / "keys" / key).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if re.fullmatch(r"[0-9a-f]{64}", sha256) and (folder / f"{sha256}.jsonl").is_file():
        return sha256
    return None


def _remember(folder: Path, key: str, sha256: str) -> None:
    keys = folder / "keys"
    tmp: str | None = None
    try:
        ensure_private_dir(keys)
        fd, tmp = tempfile.mkstemp(dir=keys, suffix=".part")
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(sha256 + "\n")
        os.replace(tmp, keys / key)
        tmp = None
    except OSError:
        pass  # the cache only saves a re-render next time
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            sha.update(chunk)
    return sha.hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = [
    "DEFAULT_ID_TEMPLATE",
    "PARQUET_EXTRA",
    "ROWS_FORMATS",
    "RenderedInput",
    "RequestTemplate",
    "Row",
    "compile_request_template",
    "iter_rows",
    "parquet_available",
    "parquet_value",
    "render_rows",
    "row_context",
    "row_lines",
    "rows_format",
]
