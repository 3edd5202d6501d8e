"""docs/: generated references match their sources, and the hand-written pages cover the basics."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from batchspec import errors
from batchspec.cli.main import cli
from batchspec.workspace.yamldoc import load_schema

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
REGENERATE = "python scripts/gen_docs.py"


def load_generator() -> ModuleType:
    """scripts/gen_docs.py, imported by path (it is a docs tool, not part of the package)."""
    path = REPO / "scripts" / "gen_docs.py"
    spec = importlib.util.spec_from_file_location("gen_docs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen_docs() -> ModuleType:
    return load_generator()


def test_generated_pages_are_up_to_date(gen_docs: ModuleType) -> None:
    """Regenerating manifest, project and CLI references gives exactly the committed files."""
    stale = [str(p.relative_to(REPO)) for p in gen_docs.stale_pages()]
    assert not stale, f"out of date: {', '.join(stale)}; run `{REGENERATE}` and commit the result"


def test_generation_ignores_the_terminal_width(
    gen_docs: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Help is formatted at a fixed width, so the CLI reference is the same on any terminal."""
    first = gen_docs.generate()
    monkeypatch.setenv("COLUMNS", "43")
    assert gen_docs.generate() == first


def test_every_command_is_in_the_cli_reference() -> None:
    """Each command registered on the CLI (new ones included) has its section."""
    text = (DOCS / "cli-reference.md").read_text(encoding="utf-8")
    missing = [
        name
        for name, command in cli.commands.items()
        if not command.hidden and f"\n## batchspec {name}\n" not in text
    ]
    assert not missing, f"not in docs/cli-reference.md: {missing}; run `{REGENERATE}`"


def properties(schema: Any) -> Iterator[str]:
    """Every property name anywhere in a schema."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "properties":
                yield from value
            yield from properties(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from properties(item)


@pytest.mark.parametrize(
    ("schema", "page"),
    [("batch", "manifest-reference.md"), ("project", "project-reference.md")],
)
def test_every_schema_property_has_a_row(schema: str, page: str) -> None:
    """The references list every property of their schema, each as a table row."""
    text = (DOCS / page).read_text(encoding="utf-8")
    missing = sorted({p for p in properties(load_schema(schema)) if f"| `{p}` |" not in text})
    assert not missing


def test_the_exit_code_table_names_every_error_and_its_code() -> None:
    """docs/exit-codes.md has a row for every exit code an error can have, naming the classes
    of batchspec.errors that use it."""
    rows = {}
    for line in (DOCS / "exit-codes.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| (\d+) \|", line)
        if match:
            rows[int(match.group(1))] = line
    for cls in _subclasses(errors.BatchspecError):
        assert cls.exit_code in rows, cls.__name__
        if cls.__module__ == errors.__name__:  # the tree itself; others refine its classes
            assert f"`{cls.__name__}`" in rows[cls.exit_code], cls.__name__
    assert {0, 1, 2, 3, 4, 5, 64} <= set(rows)


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_concepts_define_the_vocabulary() -> None:
    """concepts.md defines each word of the design's vocabulary and explains the model."""
    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    words = ["Workspace", "Manifest", "Resource", "Spec hash", "Generation", "Shard"]
    words += ["Attempt", "Provider", "Run", "Event"]
    assert [w for w in words if f"**{w}.**" not in text] == []
    for heading in ("## The reconcile model", "## Sync and health"):
        assert heading in text


def test_the_sync_axis_names_every_value_status_reports() -> None:
    """concepts.md's sync bullet names each sync value `status` gives, `Unknown` too (a
    resource recorded but absent from the manifests that loaded while one of them is broken:
    test_cli_workspace pins it), which it left out: a reader met it in `status` unexplained."""
    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    sync = text[text.index("* **sync**") : text.index("* **health**")]
    for value in ("Synced", "OutOfSync", "Orphaned", "Unknown"):
        assert f"`{value}`" in sync, value


def test_the_state_folder_table_gives_the_input_caches_sizes_as_the_code_has_them() -> None:
    """concepts.md's state-folder rows say where a small input's request index lives (the
    cache database, so `input-index/` stays empty) with the code's size limits and keep time,
    and the FAQ lists `input-index/` among the caches safe to delete."""
    from batchspec.workspace import inputcache

    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in text.splitlines()
        if line.startswith("| `input-")
    }
    small_kib = inputcache.INLINE_INPUT_MAX_BYTES // 1024
    total_mib = inputcache.INLINE_TOTAL_MAX_BYTES // (1024 * 1024)
    assert f"up to {small_kib} KiB" in rows["input-cache.db"]
    assert "`input-index/` stays empty" in rows["input-cache.db"]
    assert f"over {small_kib} KiB" in rows["input-index/"]
    assert f"first {total_mib} MiB" in rows["input-index/"]
    assert f"unused for {inputcache.INDEX_KEEP_S // 86400} days" in rows["input-index/"]
    faq = (DOCS / "faq.md").read_text(encoding="utf-8")
    assert "`input-index/`" in faq.split("## Expiry")[1].split("## Retries")[0]


def test_the_faq_answers_cost_expiry_and_retries() -> None:
    """faq.md has its three sections."""
    text = (DOCS / "faq.md").read_text(encoding="utf-8")
    assert [h for h in ("## Cost", "## Expiry", "## Retries") if h not in text] == []


def test_links_between_pages_resolve() -> None:
    """Every relative link in docs/ points at a file that exists."""
    broken = []
    for page in DOCS.glob("*.md"):
        prose = re.sub(r"`[^`\n]*`", "", page.read_text(encoding="utf-8"))  # not code spans
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", prose):
            if not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert broken == []


def test_the_project_reference_does_not_call_the_project_file_optional(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page says what commands do: a folder of manifests with no batchspec.yaml is not a
    workspace (validate exits 1 pointing to init), so the file is not optional."""
    from workspaces import run_cli

    (tmp_path / "m.yaml").write_text("apiVersion: batchspec/v1\nkind: Batch\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["validate"], capsys)
    assert code == 1 and "not a batchspec workspace" in err
    page = (DOCS / "project-reference.md").read_text(encoding="utf-8")
    assert "is optional: without one" not in page
    assert "is required" in page
    # said once, without "Every key is optional" beside a table where two keys are required
    # (its opening paragraph said the same twice, the second time from gen_docs' intro)
    assert page.count("`batchspec init`") == 1, page[:1500]
    assert "Every key is optional" not in page


def test_the_readme_names_every_exit_code_of_the_exit_code_page() -> None:
    """README's one-paragraph list of exit codes leaves none of docs/exit-codes.md out."""
    table = (DOCS / "exit-codes.md").read_text(encoding="utf-8")
    codes = re.findall(r"^\| (\d+) \|", table, flags=re.MULTILINE)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    paragraph = readme[readme.index("Exit codes:") :].split("\n\n")[0]
    assert codes and [c for c in codes if not re.search(rf"\b{c} ", paragraph)] == []


def test_the_exit_codes_page_and_serve_s_help_say_serve_exits_0_on_sigterm() -> None:
    """`serve` stops on SIGTERM with exit 0 (test_engine_serve_cli pins it), not the 143 every
    other command gives: the 143 row said "all", and serve's help named no exit code."""
    from click.testing import CliRunner

    row = next(
        line
        for line in (DOCS / "exit-codes.md").read_text().splitlines()
        if line.startswith("| 143 ")
    )
    assert "all but `serve`" in row and "exit 0" in row, row
    out = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200).output
    assert "0 after SIGTERM" in out, out


def test_every_field_of_a_history_run_and_event_is_documented() -> None:
    """`history --json` is a contract: each key of its `run` and `events` objects (the state's
    run and event rows) is named in the history paragraph of docs/output.md."""
    from dataclasses import fields

    from batchspec.state.runs import EventRow, RunRow

    text = (DOCS / "output.md").read_text(encoding="utf-8")
    history = text[text.index("`batchspec history --json`") : text.index("`batchspec history --by")]
    keys = [f.name for row in (RunRow, EventRow) for f in fields(row)]
    assert [k for k in keys if f"`{k}`" not in history] == []
