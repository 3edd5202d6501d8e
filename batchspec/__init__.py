"""batchspec: run LLM batch jobs the GitOps way."""

from __future__ import annotations

#: the one place the version is written (pyproject.toml reads it from here); a constant,
#: not an importlib.metadata lookup: that import (email, zipfile, csv) cost every run ~30 ms
__version__ = "0.1.0"

__all__ = ["__version__"]
