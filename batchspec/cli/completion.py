"""Shell completion: the scripts ``batchspec completion bash|zsh|fish`` prints, and the
completion of resource names for ``show``, ``results``, ``cancel``, ``forget`` and ``--select``.

The scripts are click's own (they call back into ``batchspec`` with ``_BATCHSPEC_COMPLETE``
set), so completion always matches the installed commands and options. Resource names come
from the manifests of the workspace found from the current folder and from its state; a
workspace that does not load completes nothing rather than printing an error into the shell.
"""

from __future__ import annotations

from typing import Any

import click
from click.shell_completion import CompletionItem, get_completion_class

SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_BATCHSPEC_COMPLETE"


def completion_script(cli: click.Command, shell: str) -> str:
    """The script that enables completion of ``batchspec`` in ``shell``."""
    cls = get_completion_class(shell)
    if cls is None:  # click.Choice keeps this out of reach; kept for a clear failure
        raise click.UsageError(f"no completion for {shell!r}; choose one of {', '.join(SHELLS)}")
    return cls(cli, {}, "batchspec", COMPLETE_VAR).source()


def complete_resource_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Resource names starting with ``incomplete`` (nothing when the workspace won't load)."""
    from batchspec.core.show import resource_names

    paths: Any = ctx.params.get("paths") or ()
    try:
        names = resource_names(list(paths), state_path=ctx.params.get("state_path"))
    except Exception:  # a broken manifest must not spill a traceback into the shell
        return []
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]
