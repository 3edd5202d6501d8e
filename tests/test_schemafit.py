"""The schema checks' happy path (batchspec.workspace.schemafit) against jsonschema itself."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from batchspec.workspace import yamldoc
from batchspec.workspace.schemafit import (
    UnsupportedSchema,
    _Unsure,
    compile_schema,
    schema_accepts,
)
from batchspec.workspace.yamldoc import load_schema, read_yaml_documents, schema_problems

BATCH: dict[str, Any] = {
    "apiVersion": "batchspec/v1",
    "kind": "Batch",
    "metadata": {
        "name": "triage-1",
        "labels": {"team": "support"},
        "annotations": {"note": "x"},
        "moved": {"from": "old-name"},
    },
    "spec": {
        "provider": "openai",
        "endpoint": "/v1/chat/completions",
        "completionWindow": "24h",
        "input": "data/in.jsonl",
        "model": "gpt-4o-mini",
        "metadata": {"project": "triage"},
        "output": "results/o.jsonl",
        "errors": "results/e.jsonl",
        "export": [{"path": "o.csv", "format": "csv", "join": True}],
        "retry": {"maxAttempts": 3, "on": ["timeout", "expired"]},
        "limits": {
            "maxRequestsPerBatch": 10,
            "maxBytesPerBatch": 100,
            "maxEmbeddingInputsPerBatch": 5,
        },
        "budget": {"maxRequests": 10, "maxInputTokens": 100, "maxCostUSD": 1.5},
        "suspend": False,
    },
}
ROWS_INPUT = {"rows": "rows.csv", "id": "{{ id }}", "body": {"messages": []}}

PROJECT: dict[str, Any] = {
    "apiVersion": "batchspec/v1",
    "kind": "Project",
    "state": {"path": "state/batchspec.db"},
    "manifests": ["manifests/*.yaml"],
    "defaults": {"provider": "local"},
    "providers": {
        "local": {"type": "local", "options": {"upstream": "builtin"}},
        "oai": {"type": "openai", "baseUrl": "https://api.openai.com/v1", "apiKeyEnv": "K"},
    },
}

#: values each node is replaced by: every JSON type, the edges of the bounds and lengths,
#: NaN, 1.0 (an integer to Draft 2020-12), strings a pattern refuses, reserved keys
ODD_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 20, 21, 1.0, 1.5, 0.0, math.nan, math.inf, "", "x", "24h",
    "Bad Name", "a" * 64, "batchspec_key", "/v1/chat/completions", "csv", "timeout", [],
    ["timeout", "timeout"], ["timeout", 1], [{"path": "p"}], {}, {"x": 1}, {"x": "y"},
    {"": "y"}, {"batchspec_x": "y"}, {"rows": "r", "body": {}}, {"from": "a"}, {"path": "p"},
]  # fmt: skip


def _pointers(node: Any, pointer: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield pointer
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _pointers(value, (*pointer, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _pointers(value, (*pointer, i))


def _mutants(base: dict[str, Any], under: tuple[Any, ...]) -> Iterator[Any]:
    """Each node at or below ``under`` replaced by each odd value, each key dropped, an
    unknown key in each mapping."""
    for pointer in [under + p for p in _pointers(_get(base, under))]:
        for value in ODD_VALUES:
            yield _set(base, pointer, value)
        if pointer:
            doc = copy.deepcopy(base)
            parent = _get(doc, pointer[:-1])
            del parent[pointer[-1]]
            yield doc
        if isinstance(_get(base, pointer), dict):
            doc = copy.deepcopy(base)
            _get(doc, pointer)["zzUnknown"] = 1
            yield doc


def _get(node: Any, pointer: tuple[Any, ...]) -> Any:
    for token in pointer:
        node = node[token]
    return node


def _set(base: dict[str, Any], pointer: tuple[Any, ...], value: Any) -> Any:
    if not pointer:
        return copy.deepcopy(value)
    doc = copy.deepcopy(base)
    _get(doc, pointer[:-1])[pointer[-1]] = copy.deepcopy(value)
    return doc


@pytest.mark.parametrize("name", ["batch", "project"])
def test_every_shipped_schema_compiles(name: str) -> None:
    """Both shipped schemas use only keywords the fast checker reproduces (else every
    document would silently go to jsonschema, and the happy path would be gone)."""
    compile_schema(load_schema(name))


@pytest.mark.parametrize(
    ("name", "base", "under"),
    [
        pytest.param("batch", BATCH, (), id="batch"),
        pytest.param(
            "batch",
            {**BATCH, "spec": {**BATCH["spec"], "input": ROWS_INPUT}},
            ("spec", "input"),
            id="rows",
        ),
        pytest.param("project", PROJECT, (), id="project"),
    ],
)
def test_the_fast_check_agrees_with_jsonschema_on_every_mutant(
    name: str, base: Any, under: tuple[Any, ...]
) -> None:
    """For a valid document and hundreds of mutants of it (each node given each odd value,
    each key dropped, an unknown key added), the fast check says valid exactly when
    jsonschema finds no error; it is never valid where jsonschema finds one."""
    schema = load_schema(name)
    check = compile_schema(schema)
    jsonschema = Draft202012Validator(schema)
    assert check(base) and jsonschema.is_valid(base)
    judged = invalid = 0
    for doc in _mutants(base, under):
        valid = jsonschema.is_valid(doc)
        assert not schema_accepts(schema, doc) or valid, doc
        try:
            fast = check(doc)
        except _Unsure:
            continue
        judged += 1
        invalid += not valid
        assert fast == valid, doc
    assert judged > 100 and invalid > 50, (judged, invalid)  # both answers are covered


def test_values_yaml_does_not_give_plainly_are_left_to_jsonschema() -> None:
    """A dict subclass, a date or bytes, and a uniqueness check over other than strings: not
    judged (False), so jsonschema decides."""
    import datetime

    class Odd(dict[str, Any]):
        pass

    schema = load_schema("batch")
    assert not schema_accepts(schema, Odd(BATCH))
    for value in (datetime.date(2024, 1, 1), b"x"):
        assert not schema_accepts(schema, _set(BATCH, ("metadata", "labels", "team"), value))
    doc = _set(BATCH, ("spec", "retry", "on"), ["timeout", 1, 1.0])
    with pytest.raises(_Unsure):
        compile_schema(schema)(doc)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "format": "date"},
        {"patternProperties": {"^x": {}}},
        {"const": 1},
        {"enum": ["a", None]},
        {"$ref": "https://example.com/s.json"},
        {"multipleOf": 2},
    ],
)
def test_a_schema_it_cannot_reproduce_is_left_whole_to_jsonschema(schema: Any) -> None:
    """A keyword or value not reproduced exactly refuses to compile, and then nothing is
    ever accepted by the fast path."""
    with pytest.raises(UnsupportedSchema):
        compile_schema(schema)
    assert not schema_accepts(schema, "anything")


BAD_MANIFESTS = {
    "unknown-key": "apiVersion: batchspec/v1\nkind: Batch\nmetadata: {name: a, lables: {}}\n"
    "spec: {endpoint: /v1/chat/completions, input: in.jsonl}\n",
    "bad-name": "apiVersion: batchspec/v1\nkind: Batch\nmetadata: {name: Bad_Name}\n"
    "spec: {endpoint: /v1/chat/completions, input: in.jsonl}\n",
    "missing": "apiVersion: batchspec/v1\nkind: Batch\nmetadata: {name: a}\nspec: {input: x}\n",
    "enum": "apiVersion: batchspec/v1\nkind: Batch\nmetadata: {name: a}\n"
    "spec: {endpoint: /v1/chat, input: in.jsonl, completionWindow: 2w}\n",
    "types": "apiVersion: batchspec/v1\nkind: Batch\nmetadata: {name: a, labels: {t: 1}}\n"
    "spec: {endpoint: /v1/embeddings, input: '', retry: {maxAttempts: 0, on: [x, x]},\n"
    "  budget: {maxCostUSD: 0}, suspend: 'no', metadata: {batchspec_k: v}}\n",
    "rows": "apiVersion: batchspec/v1\nkind: Batch\nmetadata: {name: a}\n"
    "spec: {endpoint: /v1/embeddings, input: {rows: r.csv, bdy: {}}}\n",
    "nan": "apiVersion: batchspec/v1\nkind: Batch\nmetadata: {name: a}\n"
    "spec: {endpoint: /v1/embeddings, input: x, budget: {maxCostUSD: .nan}}\n",
    "good": "apiVersion: batchspec/v1\nkind: Batch\nmetadata: {name: a, labels: {t: x}}\n"
    "spec: {endpoint: /v1/embeddings, input: x, retry: {maxAttempts: 2, on: [timeout]}}\n",
}


@pytest.mark.parametrize("text", BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_schema_problems_are_the_same_with_and_without_the_fast_path(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each manifest's problems (file, line, column, pointer, code, message) are the same
    whether the fast check runs first or jsonschema checks it alone."""
    file = tmp_path / "m.yaml"
    file.write_text(text)
    (doc,), read_problems = read_yaml_documents(file)
    assert not read_problems
    fast = schema_problems(doc, "batch")
    monkeypatch.setattr(yamldoc, "schema_accepts", lambda schema, data: False)
    assert schema_problems(doc, "batch") == fast
    assert bool(fast) == (text != BAD_MANIFESTS["good"])


def test_a_valid_manifest_and_project_never_reach_jsonschema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the happy path jsonschema is neither built nor asked (its import is ~50 ms)."""

    def refused(name: str) -> Any:
        raise AssertionError(f"jsonschema asked about a valid {name}")

    monkeypatch.setattr(yamldoc, "schema_validator", refused)
    file = tmp_path / "m.yaml"
    file.write_text(BAD_MANIFESTS["good"])
    (doc,), _ = read_yaml_documents(file)
    assert schema_problems(doc, "batch") == []


@pytest.mark.parametrize(
    "types",
    [
        pytest.param("integer", id="integer"),
        pytest.param(["number", "integer"], id="number-integer"),
        pytest.param(["integer", "string"], id="integer-string"),
        pytest.param(["string", "null"], id="string-null"),
        pytest.param(["object", "array", "boolean"], id="object-array-boolean"),
    ],
)
def test_type_checks_agree_with_jsonschema_on_every_kind_of_value(types: Any) -> None:
    """``type`` (one name or several, checked as one lookup of the value's type) accepts
    exactly what jsonschema accepts: 1.0 is an integer, True is not, NaN is a number only."""
    schema = {"type": types}
    jsonschema = Draft202012Validator(schema)
    values = [1, 0, 1.0, 1.5, -2.0, math.nan, math.inf, True, False, None, "1", "", [], {}]
    for value in values:
        assert compile_schema(schema)(value) == jsonschema.is_valid(value), (types, value)
