"""Files and folders only their owner can read, whatever the umask.

The state database, the result store and the local engine's data folder hold full requests
and answers (and the audit log): they are created mode 0600 (files) and 0700 (folders). The
mode is set exactly (``fchmod``/``chmod`` after creating), since ``open``/``mkdir`` modes are
only filtered by the umask and a umask like 0277 would otherwise leave a file unwritable.

What exists already is left alone: an owner who chose another mode for their database or
folder keeps it. Only what these helpers create is made private.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def ensure_private_dir(path: Path, mode: int = PRIVATE_DIR_MODE) -> None:
    """Create ``path`` mode 0700 (or ``mode``) if missing (its missing ancestors get the
    usual mode)."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=mode & 0o777)
    except FileExistsError:
        return  # another thread or process made it first: its mode is its business
    os.chmod(path, mode)


def create_private_file(path: Path, mode: int = PRIVATE_FILE_MODE) -> None:
    """Create ``path`` empty and mode 0600 (or ``mode``) unless it exists (before SQLite or a
    writer opens it)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def open_new_file(path: Path, mode: int = PRIVATE_FILE_MODE) -> BinaryIO:
    """Create ``path`` (it must not exist) with exactly ``mode``; open it for binary writing."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.fchmod(fd, mode)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def restrict_sqlite_siblings(path: Path) -> None:
    """Keep a database's -wal, -shm and -journal files as private as a private database."""
    for suffix in ("-wal", "-shm", "-journal"):
        sibling = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if sibling.stat().st_mode & 0o077:
                os.chmod(sibling, PRIVATE_FILE_MODE)


__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "create_private_file",
    "ensure_private_dir",
    "open_new_file",
    "restrict_sqlite_siblings",
]
