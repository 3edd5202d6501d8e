"""Benchmark: `results --format` (``batchspec.core.export``) over a large job, per format.

The job: N chat requests (default 200,000) asking for a flat JSON schema, and an output file
of N OpenAI-shaped answers (JSON text, usage) written by this script: no engine runs, since
only the export is measured. Each format is exported by its own process (``python
bench/export.py one WS FMT OUT``), so its peak RSS (``os.wait4``'s ``ru_maxrss``) is the
export's alone; streaming means it stays flat as N grows. Prints rows/s, output size and RSS.

    .venv/bin/python bench/export.py                      # 200,000 requests
    .venv/bin/python bench/export.py --requests 20000 --formats csv jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "triage",
        "schema": {
            "type": "object",
            "properties": {"label": {"type": "string"}, "score": {"type": "number"}},
        },
    },
}


def make_workspace(root: Path, n: int) -> None:
    """A workspace (local provider) whose resource ``triage`` has n requests and n answers."""
    (root / "manifests").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "results").mkdir()
    (root / "batchspec.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Project\nmanifests: [manifests/*.yaml]\n"
        "providers: {srv: {type: local, options: {upstream: builtin}}}\n"
    )
    (root / "manifests" / "triage.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Batch\nmetadata: {name: triage}\nspec:\n"
        "  provider: srv\n  endpoint: /v1/chat/completions\n  model: m\n"
        "  input: ../data/triage.jsonl\n  output: ../results/triage.jsonl\n"
    )
    with (
        (root / "data" / "triage.jsonl").open("w") as inp,
        (root / "results" / "triage.jsonl").open("w") as out,
    ):
        for i in range(n):
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": f"Classify ticket {i}."}],
                "response_format": SCHEMA,
            }
            inp.write(json.dumps({"custom_id": f"r-{i}", "method": "POST",
                                  "url": "/v1/chat/completions", "body": body}) + "\n")  # fmt: skip
            answer = json.dumps({"label": "bug" if i % 3 else "ask", "score": i % 100 / 100})
            response = {
                "status_code": 200,
                "body": {
                    "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
                },
            }
            out.write(json.dumps({"id": f"b-{i}", "custom_id": f"r-{i}",
                                  "response": response, "error": None}) + "\n")  # fmt: skip


def export_one(ws: str, fmt: str, out_path: str) -> None:
    """Run in a child process: export the workspace's resource to ``out_path``."""
    from batchspec.core.export import ExportSource, export_rows, layout_of, write_export
    from batchspec.workspace.manifest import load_workspace

    loaded = load_workspace([ws])
    [res] = loaded.resources
    source = ExportSource(res, res.output_path, res.errors_path, loaded.project.providers["srv"])
    with open(out_path, "wb") as out:
        write_export(export_rows(source), layout_of(source, join=False), fmt, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--formats", nargs="+", default=["jsonl", "csv", "parquet"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        make_workspace(ws, args.requests)
        print(f"{args.requests:,} requests; results file "
              f"{(ws / 'results' / 'triage.jsonl').stat().st_size / 1e6:.1f} MB")  # fmt: skip
        for fmt in args.formats:
            out = Path(tmp) / f"triage.{fmt}"
            started = time.perf_counter()
            child = subprocess.Popen(
                [sys.executable, __file__, "one", str(ws), fmt, str(out)], cwd=tmp
            )
            _, status, usage = os.wait4(child.pid, 0)
            took = time.perf_counter() - started
            if status != 0:
                print(f"{fmt:8} failed (status {status})")
                continue
            print(
                f"{fmt:8} {args.requests / took:>10,.0f} rows/s  {took:6.2f} s  "
                f"{out.stat().st_size / 1e6:7.1f} MB  peak RSS {usage.ru_maxrss / 1024:6.1f} MB"
            )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "one":
        export_one(*sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
