"""Generate the reference pages in docs/ from their sources of truth.

    python scripts/gen_docs.py            # rewrite the generated pages
    python scripts/gen_docs.py --check    # exit 1 (listing them) if any page is out of date

* ``docs/manifest-reference.md`` from ``schemas/batch.schema.json``;
* ``docs/project-reference.md`` from ``schemas/project.schema.json``;
* ``docs/cli-reference.md`` from each command's ``--help`` (every command registered on
  ``batchspec.cli.main.cli``, so a new command appears on the next run), plus the environment
  variable each option reads.

Every property of a schema is listed with its type, whether it is required, its default and
its constraints, under the description the schema gives it; nested objects get their own
section. Output is deterministic (help is formatted at 80 columns, whatever the terminal), so
``tests/test_docs.py`` can insist that the committed pages equal a fresh generation. This is a
docs tool, kept out of the runtime package; the test imports it by path.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SCHEMAS = REPO / "schemas"
HELP_WIDTH = 80
REGENERATE = "python scripts/gen_docs.py"

Schema = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# JSON Schema -> Markdown


@dataclass(frozen=True)
class Section:
    """One object of the schema: where it sits (``spec.retry``) and its schema."""

    path: str
    schema: Schema
    note: str = ""  # when the section applies, e.g. "when `type` is `openai`"


class SchemaDoc:
    """Renders one schema file; ``$ref``s are resolved against it."""

    def __init__(self, root: Schema) -> None:
        self.root = root

    def resolve(self, schema: Schema) -> Schema:
        """``schema`` with its ``$ref`` followed (its own description wins over the target's)."""
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            return schema
        node: Any = self.root
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        target = self.resolve(node)
        return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}

    # -- sections -------------------------------------------------------------------------------

    def sections(self, path: str, schema: Schema, note: str = "") -> Iterator[Section]:
        """This object and, depth first, every object below it."""
        schema = self.resolve(schema)
        yield Section(path, schema, note)
        for key, prop in schema.get("properties", {}).items():
            yield from self._children(f"{path}.{key}" if path else key, prop)
        for cond_note, then in self._conditionals(schema):
            for key, prop in then.get("properties", {}).items():
                child = self.resolve(prop)
                if child.get("properties"):
                    yield from self.sections(f"{path}.{key}", child, cond_note)

    def _children(self, path: str, prop: Schema) -> Iterator[Section]:
        prop = self.resolve(prop)
        if prop.get("properties"):
            yield from self.sections(path, prop)
        items = prop.get("items")
        if isinstance(items, Mapping) and self.resolve(items).get("properties"):
            yield from self.sections(f"{path}[]", items)  # an array of objects: each item
        values = prop.get("additionalProperties")
        if isinstance(values, Mapping) and self.resolve(values).get("properties"):
            yield from self.sections(f"{path}.<name>", values)
        then = prop.get("then")
        if isinstance(then, Mapping) and self.resolve(then).get("properties"):
            form = " or ".join(_types(self.resolve(then))) or "object"
            yield from self.sections(path, then, f"when it is an {form}")

    def _conditionals(self, schema: Schema) -> Iterator[tuple[str, Schema]]:
        """``allOf: [{if: {properties: {k: {const: v}}}, then: {...}}]`` as (note, then)."""
        for part in schema.get("allOf", []):
            condition, then = part.get("if", {}), part.get("then")
            if not isinstance(then, Mapping):
                continue
            terms = [
                f"`{key}` is `{spec['const']}`"
                for key, spec in condition.get("properties", {}).items()
                if "const" in spec
            ]
            yield f"when {' and '.join(terms)}", then

    # -- one section ----------------------------------------------------------------------------

    def render_section(self, section: Section, level: int = 2) -> list[str]:
        schema = section.schema
        title = f"`{section.path}`" if section.path else "Top level"
        if section.note:
            title += f" ({section.note})"
        lines = [f"{'#' * level} {title}", ""]
        if section.path and schema.get("description"):
            lines += [_one_line(schema["description"]), ""]
        extra_required = self._conditionally_required(schema)
        if extra_required:
            lines += [*extra_required, ""]
        props = schema.get("properties", {})
        if props:
            lines += ["| key | type | required | default | description |", "|---|---|---|---|---|"]
            required = set(schema.get("required", []))
            for key, prop in props.items():
                lines.append(self._row(key, prop, key in required))
            lines.append("")
        values = schema.get("additionalProperties")
        if isinstance(values, Mapping) and not props:
            lines += [f"Keys: {self._key_rules(schema)}. Values: {self.type_text(values)}.", ""]
        return lines

    def _conditionally_required(self, schema: Schema) -> list[str]:
        out = []
        for note, then in self._conditionals(schema):
            for key in then.get("required", []):
                out.append(f"`{key}` is required {note}.")
        return out

    def _row(self, key: str, prop: Schema, required: bool) -> str:
        resolved = self.resolve(prop)
        default = f"`{_json(resolved['default'])}`" if "default" in resolved else ""
        text = _one_line(resolved.get("description", ""))
        constraints = self.constraints(resolved)
        if constraints:
            text = f"{text} *{'; '.join(constraints)}.*".strip()
        cells = [f"`{key}`", self.type_text(resolved), "yes" if required else "", default, text]
        return "| " + " | ".join(_cell(c) for c in cells) + " |"

    def type_text(self, schema: Schema) -> str:
        schema = self.resolve(schema)
        if "const" in schema:
            return f"`{_json(schema['const'])}`"
        types = _types(schema)
        if types == ["array"]:
            items = schema.get("items")
            return f"array of {self.type_text(items)}" if isinstance(items, Mapping) else "array"
        if types == ["object"] and isinstance(schema.get("additionalProperties"), Mapping):
            values = self.type_text(schema["additionalProperties"])
            return f"map of string to {values}"
        return " or ".join(types) or "any"

    def constraints(self, schema: Schema) -> list[str]:
        """Plain-language constraints of a value (not its type, default or description)."""
        out = []
        if "enum" in schema:
            out.append("one of " + ", ".join(f"`{_json(v)}`" for v in schema["enum"]))
        if "pattern" in schema:
            out.append(f"matches `{schema['pattern']}`")
        if "minLength" in schema and schema["minLength"] > 1:
            out.append(f"at least {schema['minLength']} characters")
        elif schema.get("minLength") == 1:
            out.append("not empty")
        if "maxLength" in schema:
            out.append(f"at most {schema['maxLength']} characters")
        for key, word in (
            ("minimum", "at least"),
            ("maximum", "at most"),
            ("exclusiveMinimum", "greater than"),
            ("exclusiveMaximum", "less than"),
        ):
            if key in schema:
                out.append(f"{word} {schema[key]}")
        if "minItems" in schema:
            out.append(f"at least {schema['minItems']} item(s)")
        if "maxProperties" in schema:
            out.append(f"at most {schema['maxProperties']} entries")
        if schema.get("uniqueItems"):
            out.append("no duplicates")
        items = schema.get("items")
        if isinstance(items, Mapping):
            out += [f"each {c}" for c in self.constraints(self.resolve(items))]
        if isinstance(schema.get("propertyNames"), Mapping):
            out.append(f"keys: {self._key_rules(schema)}")
        values = schema.get("additionalProperties")
        if isinstance(values, Mapping):
            out += [f"each value {c}" for c in self.constraints(self.resolve(values))]
        else_ = schema.get("else")
        if isinstance(else_, Mapping) and schema.get("then"):
            out += [f"as a string, {c}" for c in self.constraints(self.resolve(else_))]
        return out

    def _key_rules(self, schema: Schema) -> str:
        names = schema.get("propertyNames", {})
        rules = self.constraints(names)
        forbidden = names.get("not", {}).get("pattern") if isinstance(names, Mapping) else None
        if forbidden:
            rules.append(f"must not match `{forbidden}`")
        return ", ".join(rules) or "any string"


def _types(schema: Schema) -> list[str]:
    kind = schema.get("type")
    if isinstance(kind, list):
        return [str(k) for k in kind]
    return [kind] if isinstance(kind, str) else []


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    # A pipe splits a Markdown table cell even inside backticks.
    return text.replace("|", "\\|")


def schema_page(schema_file: str, title: str, intro: str, example: str, problems: str = "") -> str:
    root = json.loads((SCHEMAS / schema_file).read_text(encoding="utf-8"))
    doc = SchemaDoc(root)
    lines = [
        f"# {title}",
        "",
        f"<!-- Generated from schemas/{schema_file} by `{REGENERATE}`; do not edit. -->",
        "",
        _one_line(root.get("description", "")),
        "",
        intro,
        "",
        "```yaml",
        example.strip("\n"),
        "```",
        "",
        "Keys are camelCase. Unknown keys are errors everywhere (with a did-you-mean). Every",
        "problem is reported at once, each with its `file:line:column` and JSON pointer."
        + problems,
        "",
    ]
    for section in doc.sections("", root):
        lines += doc.render_section(section)
    return "\n".join(lines).rstrip("\n") + "\n"


MANIFEST_EXAMPLE = """
apiVersion: batchspec/v1
kind: Batch
metadata:
  name: ticket-triage
  labels: {team: support}
spec:
  provider: openai
  endpoint: /v1/chat/completions
  input:                                # or a path: input: ../data/tickets.jsonl
    rows: ../data/tickets.csv
    id: "ticket-{{ ticket_id }}"
    body:
      model: gpt-4o-mini
      messages: [{role: user, content: "Classify: {{ text }}"}]
  output: ../results/ticket-triage.jsonl
  retry: {maxAttempts: 3}
  budget: {maxRequests: 10000}
"""

PROJECT_EXAMPLE = """
apiVersion: batchspec/v1
kind: Project
state: {path: state/batchspec.db}
manifests: ["manifests/**/*.yaml"]
defaults:
  provider: openai
  budget: {maxInputTokens: 5000000}
providers:
  openai:
    type: openai
    apiKeyEnv: OPENAI_API_KEY
  gpu-box:
    type: openai
    baseUrl: http://127.0.0.1:8000/v1
    apiKeyEnv: BATCH_KEY
"""


def manifest_reference() -> str:
    intro = (
        "A manifest is a YAML file below the workspace holding one or more `kind: Batch`"
        " documents (separated by `---`). Paths in a manifest are relative to its folder."
        " Concepts: [concepts.md](concepts.md); the project file:"
        " [project-reference.md](project-reference.md)."
    )
    inputs = (
        " The lines of the inputs are checked once the manifests (and their request"
        " templates) are valid: a workspace with both kinds of problem shows the inputs' on"
        " the next run."
    )
    return schema_page(
        "batch.schema.json", "Manifest reference", intro, MANIFEST_EXAMPLE, problems=inputs
    )


def project_reference() -> str:
    intro = (
        "batchspec looks for it in the working folder and its parents, like git; the file is"
        " required. With only `apiVersion` and `kind`, state lives in `state/batchspec.db`,"
        " manifests are `**/*.yaml` and `**/*.yml`, and only the built-in providers `openai`"
        " and `local` exist. API keys are never written here: `apiKeyEnv` names the"
        " environment variable."
    )
    return schema_page("project.schema.json", "Project file reference", intro, PROJECT_EXAMPLE)


# ---------------------------------------------------------------------------------------------
# --help -> Markdown


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    settings = dict(command.context_settings)
    settings.setdefault("terminal_width", HELP_WIDTH)
    settings.setdefault("max_content_width", HELP_WIDTH)
    return click.Context(command, info_name=name, parent=parent, **settings)


def visible_commands() -> list[tuple[str, click.Command, click.Context]]:
    """Every command of the CLI that ``--help`` lists, by its full name (``state migrate``),
    with the context its help is rendered in; a group's commands follow the group."""
    from batchspec.cli.main import cli

    found: list[tuple[str, click.Command, click.Context]] = []

    def walk(group: click.Group, ctx: click.Context, prefix: str) -> None:
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            sub = _context(command, name, ctx)
            found.append((prefix + name, command, sub))
            if isinstance(command, click.Group):
                walk(command, sub, f"{prefix}{name} ")

    walk(cli, _context(cli, "batchspec", None), "")
    return found


def cli_reference() -> str:
    from batchspec.cli.main import cli

    root = _context(cli, "batchspec", None)
    lines = [
        "# CLI reference",
        "",
        f"<!-- Generated from each command's --help by `{REGENERATE}`; do not edit. -->",
        "",
        "Human text goes to stdout and diagnostics to stderr; with `--json`, stdout carries",
        "only JSON. Exit codes: [exit-codes.md](exit-codes.md).",
        "",
        "```text",
        cli.get_help(root),
        "```",
        "",
    ]
    for name, command, ctx in visible_commands():
        lines += [f"## batchspec {name}", "", "```text", command.get_help(ctx), "```", ""]
        lines += _environment(command)
    return "\n".join(lines).rstrip("\n") + "\n"


def _environment(command: click.Command) -> list[str]:
    rows = []
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        if not envvar or getattr(param, "hidden", False):
            continue
        names = [envvar] if isinstance(envvar, str) else list(envvar)
        flag = max(param.opts, key=len) if param.opts else param.name
        for var in names:
            rows.append(f"| `{var}` | `{flag}` |")
    if not rows:
        return []
    return ["| environment variable | sets |", "|---|---|", *rows, ""]


# ---------------------------------------------------------------------------------------------


def generate() -> dict[Path, str]:
    """Every generated page: path -> content."""
    return {
        DOCS / "manifest-reference.md": manifest_reference(),
        DOCS / "project-reference.md": project_reference(),
        DOCS / "cli-reference.md": cli_reference(),
    }


def stale_pages(pages: Mapping[Path, str] | None = None) -> list[Path]:
    """The generated pages whose committed text differs from a fresh generation."""
    pages = generate() if pages is None else pages
    return [
        path
        for path, text in pages.items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a page is out of date")
    args = parser.parse_args(argv)
    pages = generate()
    stale = stale_pages(pages)
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(REPO)} (run `{REGENERATE}`)", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pages[path], encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
