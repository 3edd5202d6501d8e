"""A content-addressed store of downloaded result files, under the state folder.

Invariant 2 of DESIGN.md ("never lose a result"): every output and error file is written
here, named by its sha256, *before* anything else is done with it, so the result files in
the workspace can be rewritten from here at any time, even after the provider has expired
its copy. Blobs are immutable; writing one that exists is a no-op. Layout:
``<root>/<sha[:2]>/<sha>``; partial downloads live in ``<root>/tmp/`` until hashed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_from(self, write: Callable[[Path], object]) -> str:
        """Let ``write(tmp_path)`` produce a file, then file it under its sha256."""
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=".part")
        os.close(fd)
        tmp = Path(name)
        try:
            write(tmp)
            sha = sha256_file(tmp)
            dest = self.path(sha)
            if dest.exists():
                tmp.unlink()
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
            return sha
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(dest: Path, write: Callable[[Path], object]) -> None:
    """Write ``dest`` through a temporary sibling and a rename, so readers never see half."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
