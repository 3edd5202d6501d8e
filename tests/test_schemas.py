"""The JSON Schemas in schemas/: well-formed, closed, documented, and in step with the code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from batchspec.workspace import manifest, project
from batchspec.workspace.yamldoc import SCHEMA_DIR, load_schema

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = ("batch", "project")


def walk(schema: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema with its location, depth first."""
    if isinstance(schema, dict):
        yield path, schema
        for key, value in schema.items():
            if key in ("properties", "$defs"):
                for name, sub in value.items():
                    yield from walk(sub, f"{path}/{key}/{name}")
            elif isinstance(value, (dict, list)):
                yield from walk(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for i, item in enumerate(schema):
            yield from walk(item, f"{path}/{i}")


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_is_valid_2020_12(name: str) -> None:
    """Each schema is itself valid JSON Schema 2020-12."""
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_object_with_properties_is_closed(name: str) -> None:
    """Unknown keys are errors everywhere: every object that lists properties forbids others."""
    open_objects = [
        path
        for path, sub in walk(load_schema(name))
        if "properties" in sub and "/if" not in path and "/then" not in path
        if sub.get("additionalProperties") is not False
    ]
    assert open_objects == []


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_property_has_a_description(name: str) -> None:
    """Docs are generated from the schemas, so every property says what it is for."""
    schema = load_schema(name)
    missing = []
    for path, sub in walk(schema):
        for prop, definition in sub.get("properties", {}).items():
            if "/if" in path or "/then" in path:
                continue  # if/then only narrow properties described elsewhere
            described = "description" in definition or (
                "$ref" in definition and "description" in _resolve(schema, definition["$ref"])
            )
            if not described:
                missing.append(f"{path}/properties/{prop}")
    assert missing == []


def _resolve(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = schema
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_package_reads_the_repository_schemas() -> None:
    """batchspec/schemas points at schemas/, so the package and the repo share one copy."""
    for name in SCHEMAS:
        packaged = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
        repo = json.loads((REPO / "schemas" / f"{name}.schema.json").read_text(encoding="utf-8"))
        assert packaged == repo


def test_batch_defaults_match_the_loader() -> None:
    """Defaults documented in the batch schema are the ones the loader applies."""
    spec = load_schema("batch")["properties"]["spec"]["properties"]
    assert spec["completionWindow"]["default"] == manifest.DEFAULT_COMPLETION_WINDOW
    retry = spec["retry"]["properties"]
    assert retry["maxAttempts"]["default"] == manifest.DEFAULT_MAX_ATTEMPTS
    assert tuple(retry["on"]["default"]) == manifest.RETRYABLE_FAILURES
    assert tuple(retry["on"]["items"]["enum"]) == manifest.RETRYABLE_FAILURES


def test_project_defaults_match_the_loader() -> None:
    """Defaults documented in the project schema are the ones load_project applies."""
    props = load_schema("project")["properties"]
    assert props["state"]["properties"]["path"]["default"] == project.DEFAULT_STATE_PATH
    assert tuple(props["manifests"]["default"]) == project.DEFAULT_MANIFEST_GLOBS


def test_budget_is_defined_identically_in_both_schemas() -> None:
    """A manifest's budget and the project's default budget accept exactly the same keys."""
    batch_budget = load_schema("batch")["$defs"]["budget"]
    project_budget = load_schema("project")["$defs"]["budget"]
    assert batch_budget == project_budget


def test_endpoint_enum_lists_the_batch_api_endpoints() -> None:
    """The endpoints are exactly those the OpenAI Batch API accepts, plus Anthropic's Messages
    and Gemini's generateContent."""
    endpoint = load_schema("batch")["properties"]["spec"]["properties"]["endpoint"]
    assert endpoint["enum"] == [
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/moderations",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/videos",
        "/v1/messages",
        "/v1beta/generateContent",
    ]


def test_metadata_limits_leave_room_for_the_reserved_keys() -> None:
    """12 user pairs + 4 batchspec_* pairs = the providers' 16; keys 64 and values 512 chars."""
    metadata = load_schema("batch")["properties"]["spec"]["properties"]["metadata"]
    assert metadata["maxProperties"] + 4 == 16
    assert metadata["propertyNames"]["maxLength"] == 64
    assert metadata["additionalProperties"]["maxLength"] == 512
    validator = Draft202012Validator(metadata)
    assert not validator.is_valid({"batchspec_spec": "x"})
    assert validator.is_valid({"batch_spec": "x"})


@pytest.mark.parametrize(
    ("provider", "valid"),
    [
        pytest.param({"type": "openai", "options": {"organization": "org-1"}}, True, id="openai"),
        pytest.param(
            {"type": "openai", "options": {"apiStyle": "v1"}}, False, id="openai-azure-key"
        ),
        pytest.param({"type": "azure", "baseUrl": "https://x.openai.azure.com"}, True, id="azure"),
        pytest.param({"type": "azure"}, False, id="azure-without-url"),
        pytest.param(
            {"type": "anthropic", "options": {"anthropicVersion": "2023-06-01"}},
            True,
            id="anthropic",
        ),
        pytest.param(
            {"type": "local", "options": {"upstream": "http://127.0.0.1:8080/v1"}},
            True,
            id="local-url",
        ),
        pytest.param(
            {"type": "local", "options": {"upstream": "ollama"}}, False, id="local-bad-upstream"
        ),
        pytest.param(
            {
                "type": "local",
                "options": {
                    "upstreams": ["http://a:1/v1", {"url": "http://b:1/v1", "rpm": 60, "tpm": 9}]
                },
            },
            True,
            id="local-upstreams",
        ),
        pytest.param(
            {"type": "local", "options": {"upstream": "builtin", "upstreams": ["http://a:1"]}},
            False,
            id="local-upstream-and-upstreams",
        ),
        pytest.param(
            {"type": "local", "options": {"upstreams": [{"url": "http://a:1", "rpm": 0}]}},
            False,
            id="local-upstreams-zero-rpm",
        ),
        pytest.param(
            {"type": "local", "options": {"upstreams": ["http://a:1#rpm=5"]}},
            False,
            id="local-upstreams-limits-belong-in-an-object",
        ),
        pytest.param({"type": "openai", "apiKeyEnv": "sk-abc123"}, False, id="key-instead-of-name"),
        pytest.param({"type": "vertex"}, False, id="unknown-type"),
    ],
)
def test_provider_options_are_checked_per_type(provider: dict[str, Any], valid: bool) -> None:
    """Each provider type accepts its own options only; apiKeyEnv must be a variable name."""
    doc = {"apiVersion": "batchspec/v1", "kind": "Project", "providers": {"p": provider}}
    assert Draft202012Validator(load_schema("project")).is_valid(doc) is valid
