"""Results as a dataset: one row per request, in input order, as JSONL, CSV or Parquet.

``export_rows`` walks a resource's input requests in order and, beside them, its output and
errors files (each already in input order, DESIGN invariant 4), so it streams: memory is one
row, never the whole job. A request with a line in the output file is ``succeeded``, one in
the errors file ``failed``; one in neither is ``missing`` (stale files only: the current
generation answers every request). Lines of the files that no input request names (stale
results of another input) are never dropped: they follow, in file order.

Columns, in this order (``EXPORT_COLUMNS``):

=================  =============================================================================
``custom_id``      the request's id
``status``         ``succeeded``, ``failed`` or ``missing``
``answer``         by the shape of the answer, first match wins: chat ``choices[0].message``
                   text; completions ``choices[0].text``; embeddings ``data[0].embedding`` (the
                   vector); Anthropic ``content`` text blocks joined; Responses ``output_text``
                   parts joined; Gemini ``candidates[0]`` text parts joined
``parsed``         when the request asked for JSON (``response_format`` ``json_schema`` or
                   ``json_object``, Responses ``text.format``, Gemini ``responseMimeType``
                   ``application/json``): the answer parsed. A flat schema (every property a
                   scalar) becomes one column per property, ``parsed.NAME``, in CSV and Parquet
``parse_error``    the answer was asked for as JSON but does not parse: why (the text stays in
                   ``answer``; the row is kept)
``input_tokens``,  what the answer reports (``batchspec.wire.usage``); empty when it reports none
``output_tokens``
``cost_usd``       those tokens at the provider's batch price (``batchspec.core.spend``); empty
                   when the price is unknown, never 0 for unknown
``error_code``,    the error of a failed request: its ``error`` object, else the answer body's
``error_message``  ``error``, else the HTTP status
=================  =============================================================================

``join=True`` appends the input: a rows input's fields as ``input.FIELD`` (the rendered line N
is row N), else the request's ``messages`` (or ``input``/``prompt``/``contents``) as
``request``. In Parquet, a joined field is a string column (JSON text for a list or an
object) except the integer, floating, decimal and boolean columns of a Parquet rows file,
which keep their type (int64, double, bool).

``spec.export`` (``write_exports``) writes the same datasets to files after apply has written
and recorded the result files (collect and restore), each through a temporary file and a
rename; a missing export file is a restore in the plan.

Parquet needs the optional extra ``batchspec[parquet]`` (pyarrow); it is written in row
groups of ``PARQUET_ROW_GROUP`` rows.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from batchspec.core.spend import Price, price_for
from batchspec.errors import BatchspecError, UsageError
from batchspec.storage.blobstore import write_atomically
from batchspec.wire.inputs import iter_requests
from batchspec.wire.usage import usage_of_line
from batchspec.workspace.manifest import ExportTarget, Resource
from batchspec.workspace.project import ProviderConfig
from batchspec.workspace.templates import Row, iter_rows, rows_format
from batchspec.workspace.yamldoc import display_path

FORMATS = ("jsonl", "csv", "parquet")
EXPORT_COLUMNS = (
    "custom_id",
    "status",
    "answer",
    "parsed",
    "parse_error",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "error_code",
    "error_message",
)
PARQUET_ROW_GROUP = 10_000
_SCALARS = {"string", "number", "integer", "boolean", "null"}


class ExportError(BatchspecError):
    """The results cannot be exported as asked (a missing extra, an input that moved on)."""


@dataclass(frozen=True)
class ExportSource:
    """What one export reads: the resource, its result files, and its provider's prices."""

    resource: Resource
    output_path: Path
    errors_path: Path
    provider: ProviderConfig | None


@dataclass(frozen=True)
class Layout:
    """The columns of an export: the fixed ones, a flat schema's, the joined input's."""

    #: ``(name, JSON type)`` of a flat JSON schema's properties (CSV/Parquet columns)
    flat: tuple[tuple[str, str], ...] = ()
    joined: tuple[str, ...] = ()  # joined column names
    vector: bool = False  # the answer is an embedding (a list of floats in Parquet)
    #: JSON type of joined columns known to be scalar (a Parquet rows file's typed columns)
    joined_kinds: tuple[tuple[str, str], ...] = ()

    def columns(self, fmt: str) -> list[str]:
        fixed = list(EXPORT_COLUMNS)
        if self.flat and fmt != "jsonl":
            at = fixed.index("parsed")
            fixed[at : at + 1] = [f"parsed.{name}" for name, _ in self.flat]
        return [*fixed, *self.joined]


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


# ---------------------------------------------------------------------------------------------
# Rows


def layout_of(source: ExportSource, *, join: bool) -> Layout:
    """Columns known before the first row: a flat schema of the first request, the joined
    input's fields (a rows input's first row, else ``request``)."""
    first = next(iter(_requests(source.resource.input_path)), None)
    flat = _flat_properties(first[1]) if first else ()
    joined: tuple[str, ...] = ()
    kinds: tuple[tuple[str, str], ...] = ()
    if join:
        rows_path = source.resource.input_source
        if rows_path is None:
            joined = ("request",)
        elif rows_format(rows_path) == "parquet":
            kinds = _parquet_kinds(rows_path)
            joined = tuple(name for name, _ in kinds)
            kinds = tuple((name, kind) for name, kind in kinds if kind)
        else:
            row = next((r for r in iter_rows(rows_path) if isinstance(r, Row)), None)
            joined = tuple(f"input.{k}" for k in (row.fields if row else {}))
    vector = source.resource.endpoint.rstrip("/").endswith("/embeddings")
    return Layout(flat, joined, vector, kinds)


def _parquet_kinds(path: Path) -> tuple[tuple[str, str], ...]:
    """``(input.NAME, JSON type)`` of each column of a Parquet rows file, the type ``""``
    where the column is not a scalar (written as JSON text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pyarrow.types as t

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise ExportError(
            f"cannot read the rows file {display_path(path)} to join it: {err}",
            details=["run `batchspec validate` (or export without --join)"],
        ) from None
    found = []
    for field in schema:
        kind = ""
        if t.is_integer(field.type):
            kind = "integer"
        elif t.is_floating(field.type) or t.is_decimal(field.type):
            kind = "number"
        elif t.is_boolean(field.type):
            kind = "boolean"
        found.append((f"input.{field.name}", kind))
    return tuple(found)


def export_rows(source: ExportSource, *, join: bool = False) -> Iterator[dict[str, Any]]:
    """One row per request of the resource, in input order (see the module docstring)."""
    priced = _Prices(source.provider, source.resource.model)
    rows = _joined_rows(source.resource) if join else None
    with (
        _Lines(source.output_path, "succeeded") as out,
        _Lines(source.errors_path, "failed") as err,
    ):
        for custom_id, body in _requests(source.resource.input_path):
            row: dict[str, Any]
            if out.head_id == custom_id:
                row = _row(out.take(), "succeeded", body, priced)
            elif err.head_id == custom_id:
                row = _row(err.take(), "failed", body, priced)
            else:
                row = {**dict.fromkeys(EXPORT_COLUMNS), "custom_id": custom_id}
                row["status"] = "missing"
            if join:
                row.update(_join_fields(rows, body))
            yield row
        for lines, status in ((out, "succeeded"), (err, "failed")):
            while lines.head is not None:
                yield _row(lines.take(), status, None, priced)


def _requests(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for req in iter_requests(path):
        obj = json.loads(req.raw)
        body = obj.get("body") if isinstance(obj.get("body"), dict) else obj.get("params")
        yield req.custom_id, body if isinstance(body, dict) else {}


def _joined_rows(res: Resource) -> Iterator[Row] | None:
    if res.input_source is None:
        return None
    return (r for r in iter_rows(res.input_source) if isinstance(r, Row))


def _join_fields(rows: Iterator[Row] | None, body: Mapping[str, Any]) -> dict[str, Any]:
    if rows is None:
        for key in ("messages", "input", "prompt", "contents"):
            if key in body:
                return {"request": body[key]}
        return {"request": None}
    row = next(rows, None)
    if row is None:
        raise ExportError(
            "the rows file has fewer rows than the rendered input: it changed since the run",
            details=["run `batchspec apply` (or export without --join)"],
        )
    return {f"input.{k}": v for k, v in row.fields.items()}


class _Lines:
    """A result file read one line ahead, so the merge can peek at the next custom_id."""

    def __init__(self, path: Path, status: str) -> None:
        self.f: BinaryIO | None = path.open("rb") if path.is_file() else None
        self.path = path
        self.lineno = 0
        self.head: dict[str, Any] | None = None
        self.status = status
        self._advance()

    @property
    def head_id(self) -> Any:
        return self.head.get("custom_id") if self.head is not None else None

    def take(self) -> dict[str, Any]:
        line = self.head
        assert line is not None
        self._advance()
        return line

    def _advance(self) -> None:
        self.head = None
        while self.f is not None:
            raw = self.f.readline()
            if not raw:
                return
            self.lineno += 1
            if raw.strip():
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    raise ExportError(
                        f"{display_path(self.path)}:{self.lineno}: not a JSON result line",
                        details=["run `batchspec apply` to restore the result files"],
                    ) from None
                self.head = parsed if isinstance(parsed, dict) else {"custom_id": None}
                return

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.f is not None:
            self.f.close()


class _Prices:
    """The provider's price per model, looked up once a model."""

    def __init__(self, provider: ProviderConfig | None, model: str | None) -> None:
        self.provider = provider
        self.model = model
        self.known: dict[str | None, Price | None] = {}

    def cost(self, model: str | None, input_tokens: int, output_tokens: int) -> float | None:
        model = model or self.model
        if model not in self.known:
            self.known[model] = price_for(self.provider, model)
        price = self.known[model]
        return None if price is None else round(price.cost(input_tokens, output_tokens), 9)


def _row(
    line: Mapping[str, Any], status: str, request: Mapping[str, Any] | None, prices: _Prices
) -> dict[str, Any]:
    response = line.get("response")
    body = response.get("body") if isinstance(response, Mapping) else None
    body = body if isinstance(body, Mapping) else {}
    answer = answer_of(body) if status == "succeeded" else None
    parsed, parse_error = (None, None)
    if isinstance(answer, str) and request is not None and _asks_json(request):
        parsed, parse_error = _parse(answer)
    usage = usage_of_line(line)
    code, message = _error_of(line, body) if status == "failed" else (None, None)
    cost = None
    if usage is not None:
        model = body.get("model") if isinstance(body.get("model"), str) else None
        cost = prices.cost(model or (request or {}).get("model"), *_tokens(usage))
    return {
        "custom_id": line.get("custom_id"),
        "status": status,
        "answer": answer,
        "parsed": parsed,
        "parse_error": parse_error,
        "input_tokens": usage.input_tokens if usage else None,
        "output_tokens": usage.output_tokens if usage else None,
        "cost_usd": cost,
        "error_code": code,
        "error_message": message,
    }


def _tokens(usage: Any) -> tuple[int, int]:
    return usage.input_tokens, usage.output_tokens


def answer_of(body: Mapping[str, Any]) -> Any:
    """The answer an endpoint gave, by its shape (see the module docstring), or ``None``."""
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        message = choices[0].get("message")
        if isinstance(message, Mapping):
            return _text(message.get("content"))
        return choices[0].get("text")
    data = body.get("data")
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        return data[0].get("embedding")
    if isinstance(body.get("content"), list):  # Anthropic
        return _text(body["content"])
    if isinstance(body.get("output"), list):  # Responses API
        parts = [
            c for o in body["output"] if isinstance(o, Mapping) for c in o.get("content") or []
        ]
        return _text([{"type": "text", "text": p.get("text")} for p in parts if _is_text(p)])
    candidates = body.get("candidates")
    if isinstance(candidates, list) and candidates and isinstance(candidates[0], Mapping):
        content = candidates[0].get("content")
        found = content.get("parts") if isinstance(content, Mapping) else None
        pieces: list[Any] = found if isinstance(found, list) else []
        return _text([{"type": "text", "text": p.get("text")} for p in pieces if "text" in p])
    return None


def _is_text(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") in ("output_text", "text")


def _text(content: Any) -> str | None:
    if isinstance(content, str) or content is None:
        return content
    if isinstance(content, list):
        texts = [b.get("text") for b in content if _is_text(b) and isinstance(b.get("text"), str)]
        return "".join(texts) if texts else None
    return None


def _asks_json(body: Mapping[str, Any]) -> bool:
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") in ("json_schema", "json_object"):
        return True
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") in ("json_schema", "json_object"):
        return True
    config = body.get("generationConfig") or body.get("generation_config")
    return isinstance(config, Mapping) and config.get("responseMimeType") == "application/json"


def _flat_properties(body: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """``(name, JSON type)`` of each property of a flat ``json_schema``; () when not flat."""
    fmt = body.get("response_format")
    schema = None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(props, Mapping) or not props:
        return ()
    found = []
    for name, prop in props.items():
        kind = prop.get("type") if isinstance(prop, Mapping) else None
        kinds = [str(k) for k in (kind if isinstance(kind, list) else [kind]) if k != "null"]
        if isinstance(prop, Mapping) and "enum" in prop and not kinds:
            kinds = ["string"]
        if not kinds or not all(k in _SCALARS for k in kinds):
            return ()
        found.append((str(name), kinds[0] if len(kinds) == 1 else "string"))
    return tuple(found)


def _parse(answer: str) -> tuple[Any, str | None]:
    try:
        return json.loads(answer), None
    except ValueError as err:
        return None, f"the answer is not JSON: {err}"


def _error_of(line: Mapping[str, Any], body: Mapping[str, Any]) -> tuple[Any, Any]:
    for error in (line.get("error"), body.get("error")):
        if isinstance(error, Mapping):
            return error.get("code") or error.get("type"), error.get("message")
        if isinstance(error, str):
            return None, error
    response = line.get("response")
    status = response.get("status_code") if isinstance(response, Mapping) else None
    return (f"http_{status}" if status else None), None


# ---------------------------------------------------------------------------------------------
# Writers


def write_export(rows: Iterable[dict[str, Any]], layout: Layout, fmt: str, out: BinaryIO) -> int:
    """Write ``rows`` to ``out`` as ``fmt``; returns how many were written."""
    columns = layout.columns(fmt)
    if fmt == "parquet":
        return _write_parquet(rows, layout, columns, out)
    count = 0
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
            count += 1
        return count
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    try:
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(v) for v in _ordered(row, columns)])
            count += 1
    finally:
        text.detach()  # leave ``out`` open for the caller
    return count


def _ordered(row: Mapping[str, Any], columns: list[str]) -> list[Any]:
    parsed = row.get("parsed")
    flat = parsed if isinstance(parsed, Mapping) else {}
    return [
        flat.get(c[len("parsed.") :]) if c.startswith("parsed.") else row.get(c) for c in columns
    ]


def _cell(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def _write_parquet(
    rows: Iterable[dict[str, Any]], layout: Layout, columns: list[str], out: IO[bytes]
) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError(
            "--format parquet needs pyarrow: pip install 'batchspec[parquet]'"
        ) from None
    kinds = {"input_tokens": "integer", "output_tokens": "integer", "cost_usd": "number"}
    kinds.update((f"parsed.{name}", kind) for name, kind in layout.flat)
    kinds.update(layout.joined_kinds)
    if layout.vector:
        kinds["answer"] = "vector"
    arrow = {
        "integer": pa.int64(),
        "number": pa.float64(),
        "boolean": pa.bool_(),
        "vector": pa.list_(pa.float64()),
    }
    schema = pa.schema([(c, arrow.get(kinds.get(c, ""), pa.string())) for c in columns])
    count = 0
    with pq.ParquetWriter(out, schema) as writer:
        batch: list[list[Any]] = []
        for row in rows:
            values = _ordered(row, columns)
            batch.append([_typed(v, kinds.get(c)) for c, v in zip(columns, values, strict=True)])
            count += 1
            if len(batch) >= PARQUET_ROW_GROUP:
                writer.write_table(_table(pa, schema, batch))
                batch = []
        if batch or not count:
            writer.write_table(_table(pa, schema, batch))
    return count


def _typed(value: Any, kind: str | None) -> Any:
    """``value`` as its Parquet column holds it; a value of another type is null there (a
    model that answered a number as text): the row keeps its ``answer``."""
    if value is None:
        return None
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value if ok else None
    if kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else None
    if kind == "boolean":
        return value if isinstance(value, bool) else None
    if kind == "vector":
        return value if isinstance(value, list) else None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _table(pa: Any, schema: Any, batch: list[list[Any]]) -> Any:
    arrays = {name: [r[i] for r in batch] for i, name in enumerate(schema.names)}
    return pa.Table.from_pydict(arrays, schema=schema)


def write_exports(res: Resource, provider: ProviderConfig | None) -> list[Path]:
    """``spec.export``: write each dataset from the resource's result files (through a
    temporary file and a rename), after apply has written them; returns the paths."""
    source = ExportSource(res, res.output_path, res.errors_path, provider)
    for target in res.exports:

        def write(tmp: Path, target: ExportTarget = target) -> None:
            _export_to(source, target, tmp)

        write_atomically(target.path, write)
    return [t.path for t in res.exports]


def _export_to(source: ExportSource, target: ExportTarget, tmp: Path) -> None:
    layout = layout_of(source, join=target.join)
    with tmp.open("wb") as out:
        write_export(export_rows(source, join=target.join), layout, target.format, out)
