"""An input uploaded as it is, rewritten after its last check and before the upload read it.

Through the pass's pool of uploads (``pipeline.submit_pass``) to the engine's OpenAI API on
loopback: the rewrite happens when the upload is reported, just before the worker reads the
file. (The serial path, on the embedded engine, is in tests/test_read_once.py.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from test_parallel_cancel import api_key, opened, workspace  # noqa: F401, F811
from workspaces import ResourceSpec

from batchspec.core.apply import ApplyOptions, apply_workspace
from batchspec.core.reconcile import Progress
from batchspec.errors import InputError


def test_an_input_rewritten_while_the_pool_uploads_it_is_refused(
    tmp_path: Path,
    opened: Any,  # noqa: F811
) -> None:
    """The same-size rewrite is refused before the batch is created, and the uploaded file is
    not recorded as the validated content's (it was, and the batch ran the new bytes)."""
    srv, upstream = opened
    upstream.gate.set()
    ws = workspace(tmp_path, srv, ResourceSpec("job", count=20), ResourceSpec("other", count=20))
    original = ws.input_path("job").read_bytes()
    changed = original.replace(b"item 1.", b"item 7.")
    assert len(changed) == len(original) and changed != original

    def rewrite_on_upload(progress: Progress) -> None:
        if progress.event == "upload" and progress.resource == "job":
            ws.input_path("job").write_bytes(changed)

    with pytest.raises(InputError, match="changed after it was validated"):
        apply_workspace([str(ws.root)], ApplyOptions(yes=True), report=rewrite_on_upload)

    with ws.store() as store:
        assert store.get_file("srv", hashlib.sha256(original).hexdigest()) is None
        gen = store.generations("job")[0]
        assert [b.remote_id for b in store.batches(gen.id)] == [None]
    assert srv.probe.counts["POST /batches"] == 0
