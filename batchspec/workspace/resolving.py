"""``Path.resolve()`` for many paths in a few folders: each folder's symlinks resolved once.

A load names its files in a few shared folders (``../data``, ``results``, ``manifests``), and
a realpath walks every component of every path: most of a small manifest's path work.
``realpath(head/name)`` is ``realpath(head)/name`` unless ``name`` is itself a symlink (then
the whole path is resolved), so the answer is exactly ``Path.resolve()``'s on POSIX. A
resolver is kept for one load or one run only: links may change between them. One made with
``recheck`` (what a run checks result paths with before writing them) answers a folder from
memory only while ``stat`` finds the same directory there, still at the path it resolved to
(two stats, not a walk of every component): a folder swapped for a symlink since is
resolved again.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path


class FolderResolver:
    """Resolves paths as ``Path.resolve()`` does, remembering each folder's resolution."""

    def __init__(self, *, recheck: bool = False, keep_modes: bool = False) -> None:
        self._folders: dict[str, str] = {}
        self._folder_paths: dict[str, Path] = {}  # resolved folder -> its Path, to join onto
        #: ``recheck``: the directory (device, inode) each folder named when it was resolved
        self._recheck = recheck
        self._identities: dict[str, tuple[int, int]] = {}
        #: ``keep_modes``: the mode the lstat of each path resolved found (None: nothing
        #: there), until ``taken_mode`` takes it: a caller that asks next whether the path is
        #: a folder needs no stat of its own
        self._modes: dict[str, int | None] | None = {} if keep_modes else None

    def folder(self, path: str | os.PathLike[str]) -> str:
        """``str(Path(path).resolve())``, remembered (with ``recheck``: while the folder is
        still the directory it was; a missing one is resolved each time)."""
        text = os.fspath(path)
        if self._recheck:
            return self._rechecked(text)
        resolved = self._folders.get(text)
        if resolved is None:
            resolved = self._folders[text] = str(Path(text).resolve())
        return resolved

    def _rechecked(self, text: str) -> str:
        """``folder`` with ``recheck``: the folder ``text`` names now is the directory it
        named when resolved (``stat``), and that directory is still where it was resolved to,
        not moved away with a symlink left in its place (``lstat`` of the resolved path)."""
        try:
            found = os.stat(text)
        except OSError:  # not there (yet): nothing to tell a swap by
            self._folders.pop(text, None)
            return str(Path(text).resolve())
        identity = (found.st_dev, found.st_ino)
        resolved = self._folders.get(text)
        if resolved is not None and self._identities.get(text) == identity:
            with contextlib.suppress(OSError):
                there = os.lstat(resolved)
                if (there.st_dev, there.st_ino) == identity:
                    return resolved
        resolved = self._folders[text] = str(Path(text).resolve())
        self._identities[text] = identity
        return resolved

    def resolve(self, path: str | os.PathLike[str], *, plain: bool = False) -> Path:
        """``Path(path).resolve()``, its folder resolved once (a symlink loop raises as
        ``Path.resolve`` does). ``plain``: the caller knows ``path`` is no symlink (it has
        just renamed a file of its own onto it), so its lstat is spared."""
        return self._resolve(path, None, plain=plain)

    def taken_mode(self, path: str | os.PathLike[str]) -> tuple[bool, int | None]:
        """``(True, mode)`` for a path this resolver gave back (not a symlink), with the mode
        its lstat found then (None: nothing there), forgotten once taken; ``(False, None)``
        when it holds none."""
        if self._modes is None or (text := os.fspath(path)) not in self._modes:
            return False, None
        return True, self._modes.pop(text)

    def resolve_together(self, paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
        """``resolve`` of each of ``paths``, asked at one moment: a folder they share is
        looked at once for them all (with ``recheck``, its two stats are taken once, not once
        a path: nothing runs between the answers that could swap it)."""
        seen: dict[str, str] = {}
        return [self._resolve(path, seen) for path in paths]

    def _resolve(
        self, path: str | os.PathLike[str], seen: dict[str, str] | None, *, plain: bool = False
    ) -> Path:
        text = os.fspath(path)
        head, name = os.path.split(text)
        if not head or name in ("", ".", "..") or os.name != "posix":
            return Path(text).resolve()
        if seen is None:
            folder = self.folder(head)
        else:
            folder = seen.get(head) or seen.setdefault(head, self.folder(head))
        candidate = os.path.join(folder, name)
        if not plain:
            try:  # os.path.islink's lstat, its mode kept (``keep_modes``)
                mode: int | None = os.lstat(candidate).st_mode
            except (OSError, ValueError):
                mode = None
            if mode is not None and stat.S_ISLNK(mode):
                return Path(text).resolve()
            if self._modes is not None:
                self._modes[candidate] = mode
        if candidate == text and isinstance(path, Path):
            return path  # resolved already (a loaded input, a found manifest): no new Path
        parent = self._folder_paths.get(folder)
        if parent is None:
            parent = self._folder_paths[folder] = Path(folder)
        return parent / name  # joins one name: half the cost of parsing the whole path
