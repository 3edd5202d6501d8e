"""Requests from data: `input: {rows, id, body}` rendered through sandboxed Jinja2 templates."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from workspaces import run_cli

from batchspec.core.validate import InvalidInputError, validate_workspace
from batchspec.workspace.manifest import InvalidManifestError, Resource, load_workspace
from batchspec.workspace.templates import compile_request_template, render_rows
from batchspec.workspace.yamldoc import SourceLocation

CHAT = "/v1/chat/completions"


def write_manifest(root: Path, input_: Any, *, name: str = "triage", **spec: Any) -> Path:
    """A workspace (project file + one manifest) whose spec.input is ``input_``."""
    (root / "batchspec.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Project\nmanifests: ['manifests/*.yaml']\n"
    )
    doc = {
        "apiVersion": "batchspec/v1",
        "kind": "Batch",
        "metadata": {"name": name},
        "spec": {"provider": "local", "endpoint": CHAT, "input": input_, **spec},
    }
    path = root / "manifests" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def write_rows(root: Path, name: str, text: str) -> Path:
    path = root / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def chat_body(content: str = "Classify: {{ text }}", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


def load_one(root: Path) -> Resource:
    [res] = load_workspace([root]).resources
    return res


def rendered(res: Resource) -> list[dict[str, Any]]:
    return [json.loads(line) for line in res.input_path.read_text(encoding="utf-8").splitlines()]


def problems_of(root: Path) -> list[str]:
    with pytest.raises(InvalidManifestError) as caught:
        load_workspace([root])
    return [str(p) for p in caught.value.problems]


TICKETS_CSV = 'ticket_id,text\n7,"My printer is on fire"\n9,"two\nlines"\n12,plain\n'


# ---------------------------------------------------------------------------------------------
# Rendering


def test_csv_rows_render_one_request_per_row_in_row_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each CSV row becomes one request: custom_id and body rendered, url/method from the spec."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "tickets.csv", TICKETS_CSV)
    input_ = {"rows": "../data/tickets.csv", "id": "ticket-{{ ticket_id }}", "body": chat_body()}
    write_manifest(tmp_path, input_)
    res = load_one(tmp_path)
    assert rendered(res) == [
        {
            "custom_id": f"ticket-{tid}",
            "method": "POST",
            "url": CHAT,
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]},
        }
        for tid, text in (
            ("7", "Classify: My printer is on fire"),
            ("9", "Classify: two\nlines"),
            ("12", "Classify: plain"),
        )
    ]


def test_the_rendered_file_is_canonical_content_addressed_and_under_the_state_folder(
    tmp_path: Path,
) -> None:
    """input_path is <state>/rendered/<sha256>.jsonl of canonical lines; input_source the rows."""
    rows = write_rows(tmp_path, "tickets.csv", TICKETS_CSV)
    write_manifest(tmp_path, {"rows": "../data/tickets.csv", "body": chat_body()})
    res = load_one(tmp_path)
    data = res.input_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert res.input_path == tmp_path / "state" / "rendered" / f"{digest}.jsonl"
    assert res.input_sha256 == digest
    assert res.input_source == rows.resolve()
    for line in data.decode("utf-8").splitlines():
        obj = json.loads(line)
        assert line == json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert not list(res.input_path.parent.glob("*.part"))


def test_the_rendered_requests_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """The rendered requests (state/rendered, its keys) are as private as the state, even
    with umask 0: folders 0700, files without group or other bits."""
    import os
    import stat

    write_rows(tmp_path, "tickets.csv", TICKETS_CSV)
    write_manifest(tmp_path, {"rows": "../data/tickets.csv", "body": chat_body()})
    old = os.umask(0)
    try:
        res = load_one(tmp_path)
    finally:
        os.umask(old)
    folder = tmp_path / "state" / "rendered"
    assert res.input_path.parent == folder
    found = [folder, *folder.rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in found if p.is_dir()} == {0o700}
    assert {stat.S_IMODE(p.stat().st_mode) & 0o077 for p in found if p.is_file()} == {0}


def test_the_default_custom_id_is_the_row_number(tmp_path: Path) -> None:
    """Without `id`, custom_ids are row-1, row-2, ... (data rows, header and blanks excluded)."""
    write_rows(tmp_path, "t.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n')
    write_manifest(tmp_path, {"rows": "../data/t.jsonl", "body": chat_body()})
    assert [r["custom_id"] for r in rendered(load_one(tmp_path))] == ["row-1", "row-2", "row-3"]


def test_jsonl_values_keep_their_types_and_print_as_json(tmp_path: Path) -> None:
    """JSONL fields print null as '', booleans as true/false, objects as JSON; `row` and
    `row_number` are available; non-string leaves and keys are copied as they are."""
    write_rows(
        tmp_path,
        "t.jsonl",
        json.dumps({"id": 5, "note": None, "vip": True, "tags": {"a": [1, 2]}, "odd key": "x"})
        + "\n",
    )
    body = chat_body(
        "{{ note }}|{{ vip }}|{{ tags }}|{{ row['odd key'] }}|{{ row_number }}|{{ id + 1 }}",
        temperature=0.5,
        max_tokens=7,
        logprobs=False,
        stop=None,
    )
    body["{{ id }}"] = "key stays"
    write_manifest(tmp_path, {"rows": "../data/t.jsonl", "id": "n{{ id }}", "body": body})
    [req] = rendered(load_one(tmp_path))
    assert req["custom_id"] == "n5"
    assert req["body"]["messages"][0]["content"] == '|true|{"a":[1,2]}|x|1|6'
    assert req["body"]["temperature"] == 0.5
    assert req["body"]["max_tokens"] == 7
    assert req["body"]["logprobs"] is False
    assert req["body"]["stop"] is None
    assert req["body"]["{{ id }}"] == "key stays"


def test_a_block_scalar_keeps_its_final_newline(tmp_path: Path) -> None:
    """A YAML `|` leaf renders with its trailing newline, like the YAML value."""
    write_rows(tmp_path, "t.jsonl", '{"text": "hi"}\n')
    path = write_manifest(tmp_path, {"rows": "../data/t.jsonl", "body": chat_body("X")})
    path.write_text(path.read_text().replace("content: X", "content: |\n          Say {{ text }}"))
    [req] = rendered(load_one(tmp_path))
    assert req["body"]["messages"][0]["content"] == "Say hi\n"


def test_spec_model_is_added_to_a_body_without_one(tmp_path: Path) -> None:
    """A body with no model gets spec.model; a body with one keeps it."""
    write_rows(tmp_path, "t.jsonl", '{"text": "a"}\n')
    body = {"messages": [{"role": "user", "content": "{{ text }}"}]}
    write_manifest(tmp_path, {"rows": "../data/t.jsonl", "body": body}, model="m-1")
    [req] = rendered(load_one(tmp_path))
    assert req["body"]["model"] == "m-1"


def test_the_sandbox_refuses_unsafe_attribute_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template reaching for Python internals is a located problem, not code execution."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.jsonl", '{"text": "a"}\n')
    content = "{{ text.__class__.__mro__ }}"
    write_manifest(tmp_path, {"rows": "../data/t.jsonl", "body": chat_body(content)})
    [problem] = problems_of(tmp_path)
    assert problem.startswith("data/t.jsonl:1: row 1: the template at ")
    assert "unsafe" in problem


@pytest.mark.parametrize(
    ("content", "said"),
    [
        pytest.param("{{ text * 30000000 }}", "would exceed", id="repeat-string"),
        pytest.param("{{ [text] * 30000000 }}", "would exceed", id="repeat-list"),
        pytest.param("{{ '%30000000s' % text }}", "passes 10,485,760", id="percent-width"),
        pytest.param("{{ '%30000000s' | format(text) }}", "passes 10,485,760", id="format-filter"),
        pytest.param("{{ '{:>30000000}'.format(text) }}", "passes 10,485,760", id="str-format"),
        pytest.param("{{ text | center(30000000) }}", "padding function", id="center-filter"),
        pytest.param("{{ text.ljust(30000000) }}", "padding function", id="ljust"),
        pytest.param("{{ 7 ** 3000000 }}", "too large a number", id="power"),
    ],
)
def test_a_template_cannot_build_a_huge_value_from_a_few_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, said: str
) -> None:
    """Repetition, padding and powers that would build far more than a row may hold are a
    located row problem raised before the value is built (a pull request's manifest runs in
    CI), while the same operators on small sizes still render."""
    import tracemalloc

    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.jsonl", '{"text": "a"}\n')
    write_manifest(tmp_path, {"rows": "../data/t.jsonl", "body": chat_body(content)})
    tracemalloc.start()
    try:
        [problem] = problems_of(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert problem.startswith("data/t.jsonl:1: row 1: the template at ")
    assert said in problem
    assert peak < 8_000_000


def test_small_repetition_padding_and_powers_still_render(tmp_path: Path) -> None:
    """The bounds leave ordinary uses alone: '*', '%', format, center and '**' on small sizes."""
    write_rows(tmp_path, "t.jsonl", '{"text": "ab", "n": 123456789012}\n')
    content = "{{ text * 2 }}|{{ '%4s' % text }}|{{ '{:>3}'.format(text) }}|{{ 2 ** 10 }}|{{ n }}"
    write_manifest(tmp_path, {"rows": "../data/t.jsonl", "body": chat_body(content)})
    [request] = rendered(load_one(tmp_path))
    assert request["body"]["messages"][0]["content"] == "abab|  ab| ab|1024|123456789012"


# ---------------------------------------------------------------------------------------------
# Hashing and the render cache


def spec_hash_with(root: Path, rows: str, body: dict[str, Any]) -> str:
    write_rows(root, "t.csv", rows)
    write_manifest(root, {"rows": "../data/t.csv", "id": "{{ k }}", "body": body})
    return load_one(root).spec_hash


def test_a_changed_row_or_template_is_a_new_spec_hash(tmp_path: Path) -> None:
    """The spec hash covers the rendered requests: data and template changes count."""
    base = spec_hash_with(tmp_path, "k,text\n1,a\n2,b\n", chat_body())
    assert spec_hash_with(tmp_path, "k,text\n1,a\n2,b\n", chat_body()) == base
    assert spec_hash_with(tmp_path, "k,text\n1,a\n2,CHANGED\n", chat_body()) != base
    assert spec_hash_with(tmp_path, "k,text\n1,a\n2,b\n", chat_body("Sort: {{ text }}")) != base


def test_a_change_that_renders_the_same_requests_keeps_the_spec_hash(tmp_path: Path) -> None:
    """A column no template uses, or reformatted data, renders identically: same spec hash."""
    base = spec_hash_with(tmp_path, "k,text\n1,a\n2,b\n", chat_body())
    assert spec_hash_with(tmp_path, "k,text,unused\n1,a,x\n2,b,y\n", chat_body()) == base
    assert spec_hash_with(tmp_path, 'k,text\r\n"1","a"\r\n2,b\r\n', chat_body()) == base


def test_an_unchanged_input_is_not_rendered_again_and_a_deleted_render_is_rebuilt(
    tmp_path: Path,
) -> None:
    """The render cache reuses the file for unchanged rows + templates; deleting it is safe."""
    write_rows(tmp_path, "t.csv", "k,text\n1,a\n")
    write_manifest(tmp_path, {"rows": "../data/t.csv", "body": chat_body()})
    first = load_one(tmp_path)
    stamp = first.input_path.stat().st_mtime_ns
    again = load_one(tmp_path)
    assert again.input_path == first.input_path
    assert again.input_path.stat().st_mtime_ns == stamp
    first.input_path.unlink()
    rebuilt = load_one(tmp_path)
    assert rebuilt.input_path == first.input_path and rebuilt.input_path.is_file()
    assert rebuilt.spec_hash == first.spec_hash


def test_rendering_streams_rows_without_holding_them(tmp_path: Path) -> None:
    """Peak memory while rendering stays far below the size of the rows and the output."""
    rows = tmp_path / "big.jsonl"
    filler = "x" * 2000
    with rows.open("w", encoding="utf-8") as f:
        for i in range(6000):
            f.write(json.dumps({"k": i, "text": filler}) + "\n")
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
        result, problems = render_rows(template, rows, tmp_path / "rendered")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result is not None and not problems
    size = result.path.stat().st_size
    assert size > 12_000_000
    assert peak < size // 4


def _template(tmp_path: Path) -> Any:
    template, problems = compile_request_template(
        body=chat_body(),
        id_template=None,
        endpoint=CHAT,
        model=None,
        pointer="/spec/input",
        locate=lambda pointer: SourceLocation(tmp_path / "m.yaml", 1, 1),
    )
    assert template is not None and not problems
    return template


def _render_peak(template: Any, rows: Path, folder: Path, **cap: int) -> tuple[Any, list[Any], int]:
    """render_rows' result, problems, and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        result, problems = render_rows(template, rows, folder, **cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, problems, peak


@pytest.mark.parametrize(
    ("name", "huge"),
    [
        pytest.param("rows.jsonl", json.dumps({"text": "x" * 8_000_000}) + "\n", id="jsonl"),
        pytest.param("rows.csv", '"' + "x" * 8_000_000 + '"\n', id="csv"),
    ],
)
def test_an_over_long_row_is_refused_while_streaming_never_read_whole(
    tmp_path: Path, name: str, huge: str
) -> None:
    """An 8 MB row over a 64 KiB cap is row-too-large at its line; memory stays near the cap."""
    header = "text\n" if name.endswith(".csv") else ""
    good = "ok\n" if name.endswith(".csv") else json.dumps({"text": "ok"}) + "\n"
    rows = write_rows(tmp_path, name, header + good + huge + good)
    _, problems, peak = _render_peak(
        _template(tmp_path), rows, tmp_path / "rendered", max_row_bytes=64 * 1024
    )
    [problem] = problems
    assert (problem.code, problem.line) == ("row-too-large", 3 if header else 2)
    assert "row 2 is longer than 65,536 bytes" in problem.message
    assert peak < 4_000_000  # the row is 8 MB: it was never held (hashing reads 1 MiB)


def test_a_row_over_the_default_cap_is_refused_by_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default cap (10 MiB, as a batch input line), a 12 MB row fails the load."""
    monkeypatch.chdir(tmp_path)
    text = json.dumps({"text": "x" * 12_000_000})
    write_rows(tmp_path, "t.jsonl", json.dumps({"text": "a"}) + "\n" + text + "\n")
    write_manifest(tmp_path, {"rows": "../data/t.jsonl", "body": chat_body()})
    [problem] = problems_of(tmp_path)
    assert problem.startswith("data/t.jsonl:2: row 2 is longer than 10,485,760 bytes")


# ---------------------------------------------------------------------------------------------
# Problems, located


def test_a_missing_field_names_the_rows_file_row_line_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CSV: the line is where the record starts (multi-line values count), and the template
    leaf that used the field is named with its manifest location."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.csv", 'k,txt\n1,"multi\nline"\n2,b\n')
    write_manifest(tmp_path, {"rows": "../data/t.csv", "body": chat_body()})
    problems = problems_of(tmp_path)
    leaf = "manifests/triage.yaml:14:18 /spec/input/body/messages/0/content"
    why = "has no field 'text' (the row has: k, txt); used by the template at"
    assert problems == [f"data/t.csv:2: row 1 {why} {leaf}", f"data/t.csv:4: row 2 {why} {leaf}"]


def test_a_semicolon_separated_csv_is_told_to_be_saved_comma_separated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CSV saved with ';' (Excel in many locales) has one field named 'k;text': the missing
    field says so, not "read a name that is not an identifier as {{ row['k;text'] }}"."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.csv", "k;text\n1;a\n")
    write_manifest(tmp_path, {"rows": "../data/t.csv", "body": chat_body()})
    [problem] = problems_of(tmp_path)
    assert "row 1 has no field 'text' (the row has: k;text)" in problem
    assert problem.endswith(
        "the header 'k;text' looks separated by ';': a CSV rows file is read with ',' between "
        "fields: save it comma-separated"
    )
    assert "row[" not in problem


def test_jsonl_problems_carry_the_physical_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JSONL: blank lines count toward the line, not the row; bad lines are located too."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.jsonl", '{"text": "a"}\n\n{"nope": 1}\n[1]\n{bad\n')
    write_manifest(tmp_path, {"rows": "../data/t.jsonl", "body": chat_body()})
    problems = problems_of(tmp_path)
    assert problems[0].startswith("data/t.jsonl:3: row 2 has no field 'text' (the row has: nope)")
    assert problems[1] == "data/t.jsonl:4: row 3 is a JSON array, not an object"
    assert problems[2].startswith("data/t.jsonl:5: row 4 is not valid JSON")


def test_an_attribute_of_a_text_field_is_not_called_a_missing_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`{{ lang.code }}` with lang a text field: the row has lang, so 'row 1 has no field
    'code' (the row has: k, lang)' pointed at the wrong thing; it says a text value has no
    such attribute. `{{ row.nope }}` is still a missing field."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.csv", "k,lang\n1,fr\n")
    write_manifest(tmp_path, {"rows": "../data/t.csv", "body": chat_body("{{ lang.code }}")})
    [problem] = problems_of(tmp_path)
    assert "has no field" not in problem
    assert "reads 'code' of a text value, which has no such attribute" in problem
    assert problem.endswith("the row's fields are: k, lang")
    write_manifest(tmp_path, {"rows": "../data/t.csv", "body": chat_body("{{ row.nope }}")})
    [problem] = problems_of(tmp_path)
    assert "row 1 has no field 'nope' (the row has: k, lang)" in problem


def test_a_template_syntax_error_names_the_manifest_leaf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A syntax error in a body leaf or the id points at the manifest's file:line:column."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.csv", "k,text\n1,a\n")
    write_manifest(tmp_path, {"rows": "../data/t.csv", "id": "{{ k", "body": chat_body("{% if %}")})
    problems = problems_of(tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith("manifests/triage.yaml:10:9: /spec/input/id: template syntax")
    assert problems[1].startswith(
        "manifests/triage.yaml:15:18: /spec/input/body/messages/0/content: template syntax error"
    )


def test_duplicate_custom_ids_are_located_in_the_rows_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rows rendering one custom_id: the second row's line, naming the first row."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.csv", "k,text\n1,a\n2,b\n1,c\n")
    write_manifest(tmp_path, {"rows": "../data/t.csv", "id": "id-{{ k }}", "body": chat_body()})
    assert problems_of(tmp_path) == [
        "data/t.csv:4: row 3: duplicate custom_id 'id-1' (first used by row 1, line 2)"
    ]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        pytest.param("k,text\n1,a,extra\n", "data/t.csv:2: row 1 has 3 field(s)", id="long-row"),
        pytest.param("k,text\n", "data/t.csv: the rows file has no rows", id="no-rows"),
        pytest.param("k,k\n1,2\n", "data/t.csv:1: the header names column 'k' twice", id="header"),
    ],
)
def test_csv_structure_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: str, expected: str
) -> None:
    """A CSV row whose field count differs from the header, no rows, a repeated column."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.csv", rows)
    write_manifest(tmp_path, {"rows": "../data/t.csv", "body": chat_body("{{ row }}")})
    [problem] = problems_of(tmp_path)
    assert problem.startswith(expected)


def test_an_empty_custom_id_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An id template that renders '' for a row is reported at that row."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.jsonl", '{"k": "x"}\n{"k": null}\n')
    write_manifest(tmp_path, {"rows": "../data/t.jsonl", "id": "{{ k }}", "body": chat_body("x")})
    assert problems_of(tmp_path) == [
        "data/t.jsonl:2: row 2: the id template rendered an empty custom_id"
    ]


def test_many_row_problems_are_capped_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row failing shows the first 20 problems, then one line (at the first row not
    shown) counting the rest."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.csv", "k\n" + "".join(f"{i}\n" for i in range(50)))
    write_manifest(tmp_path, {"rows": "../data/t.csv", "body": chat_body()})
    problems = problems_of(tmp_path)
    assert len(problems) == 21
    assert problems[19].startswith("data/t.csv:21: row 20 has no field 'text'")
    assert problems[20] == "data/t.csv:22: ... and 30 more problems from here on"


@pytest.mark.parametrize(
    ("input_", "expected"),
    [
        pytest.param(
            {"rows": "../data/missing.csv", "body": chat_body()},
            "manifests/triage.yaml:9:11: /spec/input/rows: rows file not found: data/missing.csv",
            id="missing",
        ),
        pytest.param(
            {"rows": "../data/t.txt", "body": chat_body()},
            "manifests/triage.yaml:9:11: /spec/input/rows: rows file data/t.txt must end in .csv",
            id="extension",
        ),
        pytest.param(
            {"rows": "../data/t.csv", "body": {"messages": []}},
            "manifests/triage.yaml:10:5: /spec/input/body: the request body has no `model`",
            id="no-model",
        ),
        pytest.param(
            {"rows": "../data/t.csv", "body": chat_body(), "bdy": 1},
            "manifests/triage.yaml:15:5: /spec/input/bdy: unknown key 'bdy' (did you mean 'body'?)",
            id="unknown-key",
        ),
        pytest.param(
            {"body": chat_body()},
            "manifests/triage.yaml:8:3: /spec/input: missing required key 'rows'",
            id="no-rows-key",
        ),
        pytest.param(
            7,
            "manifests/triage.yaml:8:10: /spec/input: expected string or object, got integer 7",
            id="wrong-type",
        ),
    ],
)
def test_manifest_problems_of_a_rows_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, input_: Any, expected: str
) -> None:
    """Schema and loader problems of the input object are located in the manifest."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.csv", "k,text\n1,a\n")
    write_rows(tmp_path, "t.txt", "k,text\n1,a\n")
    write_manifest(tmp_path, input_)
    problems = problems_of(tmp_path)
    assert any(p.startswith(expected) for p in problems), problems


def test_the_output_may_not_overwrite_the_rows_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results written over the rows file would destroy the data: a path conflict."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.jsonl", '{"text": "a"}\n')
    input_ = {"rows": "../data/t.jsonl", "body": chat_body()}
    write_manifest(tmp_path, input_, output="../data/t.jsonl")
    [problem] = problems_of(tmp_path)
    assert "output file is the input file data/t.jsonl" in problem


# ---------------------------------------------------------------------------------------------
# validate and apply


def test_validate_maps_a_rendered_line_problem_back_to_the_rows_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A problem the input validator finds in the rendered file points at the row's line."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.csv", 'k,m\n1,"m-1"\n2,"a\nb"\n3,m-2\n')
    body = {"model": "{{ m }}", "messages": [{"role": "user", "content": "x"}]}
    write_manifest(tmp_path, {"rows": "../data/t.csv", "id": "{{ k }}", "body": body}, model="m-1")
    with pytest.raises(InvalidInputError) as caught:
        validate_workspace([tmp_path])
    shown = [str(p) for p in caught.value.problems]
    assert len(shown) == 2
    assert shown[0].startswith("data/t.csv:3: row 2: ")
    assert shown[1].startswith("data/t.csv:5: row 3: ")
    assert all("model" in p for p in shown)


def test_plan_locates_rendered_input_problems_in_the_rows_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """plan (and apply) validate inputs too: their message names the rows file and row."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.csv", "k,m\n1,m-1\n2,m-2\n")
    body = {"model": "{{ m }}", "messages": [{"role": "user", "content": "x"}]}
    write_manifest(tmp_path, {"rows": "../data/t.csv", "id": "{{ k }}", "body": body}, model="m-1")
    code, _, err = run_cli(["plan", str(tmp_path)], capsys)
    assert code == 1
    assert "data/t.csv: 1 problem(s) in the input of triage" in err
    assert "data/t.csv:3: row 2: body.model 'm-2' differs from the manifest's model" in err
    assert "rendered" not in err


def test_validate_cli_reports_row_problems_with_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batchspec validate --json` lists each row problem with its rows file and line."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path, "t.csv", "k,txt\n1,a\n")
    write_manifest(tmp_path, {"rows": "../data/t.csv", "body": chat_body()})
    code, out, _ = run_cli(["validate", "--json", str(tmp_path)], capsys)
    assert code == 1
    [problem] = json.loads(out)["problems"]
    assert (problem["file"], problem["line"], problem["code"]) == ("data/t.csv", 2, "missing-field")


def test_apply_runs_a_rows_input_and_writes_results_in_row_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end on the local provider: one result per row, in row order, keyed by the id."""
    monkeypatch.chdir(tmp_path)
    ids = ["zz", "aa", "mm", "bb"]
    write_rows(tmp_path, "t.csv", "k,text\n" + "".join(f"{k},text {k}\n" for k in ids))
    write_manifest(tmp_path, {"rows": "../data/t.csv", "id": "{{ k }}", "body": chat_body()})
    code, _, err = run_cli(["apply", str(tmp_path), "--wait", "--poll-interval", "0.05"], capsys)
    assert code == 0, err
    output = tmp_path / "manifests" / "results" / "triage.jsonl"
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ids
