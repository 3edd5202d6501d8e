"""``init``: scaffold a workspace that validates (and runs) as it is.

``scaffold_workspace(directory)`` writes a project file using the ``local`` provider (with a
commented-out ``openai`` example), one manifest, a three-request chat data file, and the
state folder's ``.gitignore`` and README.

Promise: it never overwrites anything, nor cuts manifests out of a workspace: a folder with its
own ``batchspec.yaml`` is another workspace, which the enclosing one's scans skip, so a folder
holding manifests of the workspace it lies in is refused (one that holds none is scaffolded,
and ``inside`` names that workspace). Every target is checked before the first byte is
written; if any exists (or a folder on its way is a file), it raises naming each of them and
writes nothing. Files are created with exclusive mode, so a file that appears meanwhile is
not clobbered either.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from batchspec.errors import BatchspecError
from batchspec.storage.private import ensure_private_dir
from batchspec.workspace.discovery import find_manifest_files, not_batchspec
from batchspec.workspace.project import PROJECT_FILE_NAME, find_project_file, load_project
from batchspec.workspace.yamldoc import (
    display_path,
    name_listing,
    read_yaml_documents,
)

PROJECT_TEMPLATE = """\
# The batchspec project file: it marks this folder as a workspace.
apiVersion: batchspec/v1
kind: Project
state:
  path: state/batchspec.db      # the state store and audit log; machine-local, never committed
manifests:                      # where `batchspec validate` and `apply` look for manifests
  - manifests/**/*.yaml
  - manifests/**/*.yml
providers:
  # The embedded batch engine. `upstream: builtin` answers with a deterministic offline
  # stand-in model (not a real LLM), so this workspace runs with no account and no network.
  # Set `upstream` to an OpenAI-compatible server (vLLM, Ollama, ...) for real answers.
  local:
    type: local
    options:
      upstream: builtin
  # The OpenAI Batch API. The key is read from the environment variable named in
  # `apiKeyEnv`, never from this file. Uncomment, then use `provider: openai` in a manifest.
  # openai:
  #   type: openai
  #   baseUrl: https://api.openai.com/v1
  #   apiKeyEnv: OPENAI_API_KEY
"""

MANIFEST_TEMPLATE = """\
# One batch: the requests in ../data/hello.jsonl, run on the local provider.
apiVersion: batchspec/v1
kind: Batch
metadata:
  name: hello
  labels: {example: init}
spec:
  provider: local
  endpoint: /v1/chat/completions
  completionWindow: 24h
  input: ../data/hello.jsonl      # relative to this file
  model: gpt-4o-mini              # every request line must use this model
  output: ../results/hello.jsonl  # one result per request, in input order
  errors: ../results/hello.errors.jsonl
  retry: {maxAttempts: 3}
"""

_QUESTIONS = (
    "Say hello in French.",
    "Name three primary colours.",
    "What is 12 times 12?",
)

STATE_GITIGNORE = """\
# State databases, engine data and the result store are machine-local: never commit them.
*
!.gitignore
!README.md
"""

STATE_README = """\
# state/

The state of this workspace: `batchspec.db` (the SQLite state store and audit log),
`store/` (downloaded results, content-addressed, so they can be restored) and `local/` (the
local engine's data). Machine-local: only this README and `.gitignore` are committed.
"""


@dataclass(frozen=True)
class ScaffoldResult:
    root: Path
    created: tuple[Path, ...]  # in the order written
    next_command: str  # what to run next, as a shell command
    inside: Path | None = None  # the project file of a workspace ``root`` lies in


def scaffold_files() -> dict[str, str]:
    """Relative path -> content of every file ``init`` writes."""
    return {
        PROJECT_FILE_NAME: PROJECT_TEMPLATE,
        "manifests/hello.yaml": MANIFEST_TEMPLATE,
        "data/hello.jsonl": _hello_requests(),
        "state/.gitignore": STATE_GITIGNORE,
        "state/README.md": STATE_README,
    }


def scaffold_workspace(directory: str | Path = ".") -> ScaffoldResult:
    """Create a new workspace in ``directory`` (made if missing); never overwrite anything."""
    root = Path(directory)
    files = {root / relative: content for relative, content in scaffold_files().items()}
    conflicts = _conflicts(root, list(files))
    if conflicts:
        names = ", ".join(display_path(p) for p in conflicts)
        raise BatchspecError(
            f"refusing to overwrite existing files: {names}. Nothing was written; "
            "run `batchspec init` in an empty folder or remove them first."
        )
    outer, cut_out = _enclosing_manifests(root)
    if outer is not None and cut_out:
        shown = name_listing([display_path(p) for p in cut_out])
        raise BatchspecError(
            f"refusing to create a workspace in {display_path(root)}: it lies in the workspace "
            f"of {display_path(outer)}, whose manifests below it ({shown}) would drop out of "
            "that workspace (a folder with its own batchspec.yaml is another workspace): no "
            "longer planned or applied there, and `apply --prune` there would cancel and "
            "forget what they run. Nothing was written; run `batchspec init` in a folder "
            "outside them."
        )
    created = []
    for path, content in files.items():
        if path.parent == root / "state":
            # the state store's folder, private as the store makes it (an existing folder
            # keeps its mode, so the store would leave one made here as it is)
            ensure_private_dir(path.parent)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8", newline="\n") as fh:
            fh.write(content)
        created.append(path)
    return ScaffoldResult(root, tuple(created), _next_command(root), outer)


def _enclosing_manifests(root: Path) -> tuple[Path | None, list[Path]]:
    """The project file of the workspace ``root`` lies in (None: none), and the manifests of
    that workspace below ``root`` (files its globs find that declare ``kind: Batch``)."""
    start = root.resolve()
    outer = find_project_file(start.parent)
    if outer is None or not start.is_dir():
        return outer, []
    try:
        files, _, _ = find_manifest_files([str(start)], load_project(outer))
    except (BatchspecError, OSError):  # a broken project file: nothing to cut out of it
        return outer, []
    # the manifests as the enclosing workspace counts them (``discovery.not_batchspec``)
    return outer, [f for f in files if not not_batchspec(f, *read_yaml_documents(f))]


def _conflicts(root: Path, targets: list[Path]) -> list[Path]:
    """Targets that exist, and folders on their way that exist but are not folders."""
    found: dict[Path, None] = {}
    if root.exists() and not root.is_dir():
        found[root] = None
    for target in targets:
        for folder in reversed(target.relative_to(root).parents[:-1]):
            if (root / folder).exists() and not (root / folder).is_dir():
                found[root / folder] = None
        if target.exists() or target.is_symlink():
            found[target] = None
    return list(found)


def _hello_requests() -> str:
    lines = []
    for number, question in enumerate(_QUESTIONS, 1):
        request = {
            "custom_id": f"hello-{number}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 50,
            },
        }
        lines.append(json.dumps(request, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def _next_command(root: Path) -> str:
    if root.resolve() == Path.cwd().resolve():
        return "batchspec validate"
    return f"batchspec validate {shlex.quote(str(root))}"
