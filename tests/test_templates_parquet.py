"""Rows inputs from Parquet files: `input: {rows: data/t.parquet, id, body}`.

Real Parquet files written with pyarrow (the `parquet` extra), loaded through the real
manifest loader and CLI; one test runs `apply --wait` on the local engine end to end.
"""

from __future__ import annotations

import datetime
import decimal
import json
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from test_templates import CHAT, chat_body, load_one, problems_of, rendered, write_manifest
from workspaces import run_cli

from batchspec.workspace.templates import compile_request_template, render_rows
from batchspec.workspace.yamldoc import SourceLocation

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_parquet(root: Path, columns: dict[str, Any], *, row_group_size: int = 2) -> Path:
    """``data/t.parquet`` holding ``columns`` (name -> values or a pyarrow array)."""
    path = root / "data" / "t.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def contents(res: Any) -> list[str]:
    return [r["body"]["messages"][0]["content"] for r in rendered(res)]


def test_parquet_rows_render_in_row_order_across_row_groups_with_typed_values(
    tmp_path: Path,
) -> None:
    """Five rows in three row groups render five requests in row order; an int stays an int
    (arithmetic works), null is null, a list a list, a struct an object, a decimal a number,
    a timestamp ISO text, a name that is not an identifier is reachable as row["..."]."""
    write_parquet(
        tmp_path,
        {
            "k": [5, 3, 9, 1, 7],
            "score": [0.5, None, 2.0, None, 1.0],
            "tags": [["a", "b"], [], None, ["c"], ["d"]],
            "meta": [{"lang": "en"}, {"lang": "fr"}, None, {"lang": "de"}, {"lang": "it"}],
            "price": pa.array([decimal.Decimal(f"{i}.50") for i in range(5)], pa.decimal128(6, 2)),
            "at": [datetime.datetime(2026, 1, i + 1, 9, 30) for i in range(5)],
            "ticket id": ["t5", "t3", "t9", "t1", "t7"],
        },
    )
    content = (
        "{{ k + 1 }}|{{ score if score is not none else 'none' }}|{{ tags | default([], true) "
        "| join(',') }}|{{ meta.lang if meta else '-' }}|{{ price * 2 }}|{{ at[:10] }}|"
        "{{ row['ticket id'] }}|{{ tags }}"
    )
    body = chat_body(content)
    write_manifest(tmp_path, {"rows": "../data/t.parquet", "id": "r-{{ k }}", "body": body})
    res = load_one(tmp_path)
    assert [r["custom_id"] for r in rendered(res)] == ["r-5", "r-3", "r-9", "r-1", "r-7"]
    assert contents(res) == [
        '6|0.5|a,b|en|1.0|2026-01-01|t5|["a","b"]',
        "4|none||fr|3.0|2026-01-02|t3|[]",
        "10|2.0||-|5.0|2026-01-03|t9|",
        '2|none|c|de|7.0|2026-01-04|t1|["c"]',
        '8|1.0|d|it|9.0|2026-01-05|t7|["d"]',
    ]


def test_parquet_problems_name_the_file_and_the_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Parquet file has no lines: a missing field and a duplicate custom_id are reported at
    the file with the row number (the field list says what the row has)."""
    monkeypatch.chdir(tmp_path)
    write_parquet(tmp_path, {"k": [1, 2, 1], "text": ["a", "b", "c"]})
    write_manifest(tmp_path, {"rows": "../data/t.parquet", "id": "id-{{ k }}", "body": chat_body()})
    assert problems_of(tmp_path) == [
        "data/t.parquet: row 3: duplicate custom_id 'id-1' (first used by row 1)"
    ]
    write_manifest(tmp_path, {"rows": "../data/t.parquet", "body": chat_body("{{ txt }}")})
    problems = problems_of(tmp_path)
    assert len(problems) == 3
    assert problems[1].startswith(
        "data/t.parquet: row 2 has no field 'txt' (the row has: k, text); used by the template"
    )


def _not_parquet(path: Path) -> None:
    path.write_text('{"text": "I am JSON"}\n')


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _no_rows(path: Path) -> None:
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)


def _truncated(path: Path) -> None:
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(100)]}), path)
    path.write_bytes(path.read_bytes()[:-40])


def _twice(path: Path) -> None:
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"])
    pq.write_table(table, path)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(_not_parquet, "data/t.parquet: not a readable Parquet file:", id="json"),
        pytest.param(_empty, "data/t.parquet: not a readable Parquet file:", id="zero-bytes"),
        pytest.param(_no_rows, "data/t.parquet: the rows file has no rows", id="no-rows"),
        pytest.param(_truncated, "data/t.parquet: not a readable Parquet file:", id="truncated"),
        pytest.param(_twice, "data/t.parquet: the file names column 'text' twice", id="dup"),
    ],
)
def test_a_hostile_parquet_file_is_one_clear_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Any, expected: str
) -> None:
    """A .parquet file that is not Parquet, empty (0 bytes), without rows, truncated, or
    naming a column twice: one problem naming the file, no traceback, nothing rendered."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data" / "t.parquet"
    path.parent.mkdir(parents=True)
    make(path)
    write_manifest(tmp_path, {"rows": "../data/t.parquet", "body": chat_body()})
    [problem] = problems_of(tmp_path)
    assert problem.startswith(expected)
    assert not list((tmp_path / "state" / "rendered").glob("*.jsonl"))


def test_column_names_that_are_not_identifiers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Columns named "ticket id", "1st", "a-b" and "" are reachable through row[...]; using
    one as a bare name is a missing field whose message says how to read it."""
    monkeypatch.chdir(tmp_path)
    names = {"ticket id": ["x"], "1st": [1], "a-b": [True], "": ["empty"]}
    write_parquet(tmp_path, names)
    content = "{{ row['ticket id'] }}/{{ row['1st'] }}/{{ row['a-b'] }}/{{ row[''] }}"
    write_manifest(tmp_path, {"rows": "../data/t.parquet", "body": chat_body(content)})
    assert contents(load_one(tmp_path)) == ["x/1/true/empty"]
    write_manifest(tmp_path, {"rows": "../data/t.parquet", "body": chat_body("{{ a-b }}")})
    [problem] = problems_of(tmp_path)
    assert "row 1 has no field 'a'" in problem
    assert "read a name that is not an identifier as {{ row['ticket id'] }}" in problem


def test_without_pyarrow_validate_and_apply_say_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the parquet extra, validate and apply exit 1 with the rows file and the pip
    line, before anything is rendered or submitted; no traceback."""
    monkeypatch.chdir(tmp_path)
    write_parquet(tmp_path, {"text": ["a"]})
    write_manifest(tmp_path, {"rows": "../data/t.parquet", "body": chat_body()})
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    for argv in (["validate", str(tmp_path)], ["apply", str(tmp_path), "--yes", "--wait"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 1, err
        [line] = [ln for ln in err.splitlines() if "pip install" in ln]
        assert "data/t.parquet is Parquet, which needs pyarrow" in line
        assert "pip install 'batchspec[parquet]'" in line and "Traceback" not in err
    assert not (tmp_path / "state" / "rendered").exists()
    assert not (tmp_path / "manifests" / "results").exists()


def test_rendering_parquet_streams_record_batches(tmp_path: Path) -> None:
    """Rendering 12 MB of Parquet rows (row groups of 500) never holds them as Python
    objects: peak Python allocations stay far below the rendered size."""
    filler = "x" * 2000
    path = write_parquet(
        tmp_path, {"k": list(range(6000)), "text": [filler] * 6000}, row_group_size=500
    )
    template, problems = compile_request_template(
        body=chat_body(),
        id_template="{{ k }}",
        endpoint=CHAT,
        model=None,
        pointer="/spec/input",
        locate=lambda pointer: SourceLocation(tmp_path / "m.yaml", 1, 1),
    )
    assert template is not None and not problems
    tracemalloc.start()
    try:
        result, problems = render_rows(template, path, tmp_path / "rendered")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result is not None and not problems
    lines = result.path.read_text().splitlines()
    assert [json.loads(lines[i])["custom_id"] for i in (0, 2999, 5999)] == ["0", "2999", "5999"]
    size = result.path.stat().st_size
    assert size > 12_000_000
    assert peak < size // 4


def test_plan_locates_rendered_input_problems_at_the_parquet_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A problem the input validator finds in a rendered request (a model that differs from
    spec.model) names the Parquet file and the row: exit 1, nothing submitted."""
    monkeypatch.chdir(tmp_path)
    write_parquet(tmp_path, {"k": [1, 2, 3], "m": ["m-1", "m-1", "m-2"]})
    body = {"model": "{{ m }}", "messages": [{"role": "user", "content": "x"}]}
    write_manifest(
        tmp_path, {"rows": "../data/t.parquet", "id": "{{ k }}", "body": body}, model="m-1"
    )
    code, _, err = run_cli(["plan", str(tmp_path)], capsys)
    assert code == 1
    assert "data/t.parquet: row 3: body.model 'm-2' differs from the manifest's model" in err
    assert "rendered" not in err


def test_an_over_long_parquet_row_is_refused_and_the_others_read(tmp_path: Path) -> None:
    """A Parquet row over the row cap is row-too-large, named by its row number; reading
    goes on (the rows after it are still checked) and nothing is rendered."""
    path = write_parquet(tmp_path, {"text": ["short", "x" * 5000, "short", None]})
    template, _ = compile_request_template(
        body=chat_body("{{ text }}{{ nope }}"),
        id_template=None,
        endpoint=CHAT,
        model=None,
        pointer="/spec/input",
        locate=lambda pointer: SourceLocation(tmp_path / "m.yaml", 1, 1),
    )
    assert template is not None
    result, problems = render_rows(template, path, tmp_path / "rendered", max_row_bytes=1000)
    assert result is None
    shown = [str(p) for p in problems]
    assert shown[1].endswith(
        "t.parquet: row 2 is longer than 1,000 bytes (the limit of one row); split it or shorten it"
    )
    assert [p.split(": ", 1)[1][:20] for p in shown] == [
        "row 1 has no field '",
        "row 2 is longer than",
        "row 3 has no field '",
        "row 4 has no field '",
    ]


def test_a_parquet_value_python_cannot_hold_is_a_problem_at_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A timestamp or date beyond year 9999 (valid Parquet, no Python datetime) is one problem
    naming its row, not a traceback; the other rows are still read and nothing is rendered."""
    monkeypatch.chdir(tmp_path)
    far = 10**13  # seconds after 1970: year ~318857
    write_parquet(
        tmp_path,
        {
            "k": [1, 2, 3, 4],
            "text": ["a", "b", "c", "d"],
            "at": pa.array([0, far, 0, 0], pa.timestamp("s")),
            "day": pa.array([0, 0, 0, 10**8], pa.date32()),
        },
        row_group_size=4,
    )
    write_manifest(tmp_path, {"rows": "../data/t.parquet", "id": "r{{ k }}", "body": chat_body()})
    problems = problems_of(tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith("data/t.parquet: row 2: a value cannot be read (")
    assert problems[1].startswith("data/t.parquet: row 4: a value cannot be read (")
    code, _, err = run_cli(["validate", str(tmp_path)], capsys)
    assert code == 1
    assert "Traceback" not in err
    assert "row 2: a value cannot be read" in err
    assert not list((tmp_path / "state" / "rendered").glob("*.jsonl"))


def test_a_wide_parquet_file_is_read_in_batches_bounded_by_cells(tmp_path: Path) -> None:
    """A small file of many columns (2,000 columns of zeros, 1,100 rows: a few hundred KB)
    is not converted 1,024 rows at a time into millions of Python objects: the batch shrinks
    with the width, so peak Python allocations stay far below what a 1,024-row batch takes."""
    from batchspec.workspace.templates import iter_rows

    rows = 1100
    zeros = pa.array([0] * rows, pa.int64())
    columns: dict[str, Any] = {"k": pa.array(range(rows), pa.int64())}
    columns.update({f"c{i}": zeros for i in range(2000)})
    path = write_parquet(tmp_path, columns, row_group_size=rows)
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        count = sum(1 for row in iter_rows(path) if getattr(row, "fields", None))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == rows
    assert peak < 30_000_000, f"peak {peak:,} bytes"
