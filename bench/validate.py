"""Benchmark: validating a 200 MB / 50,000-line chat batch input.

Generates a realistic OpenAI chat JSONL (one ~4 KB user message per line, some non-ASCII
text and escapes) in a temporary folder, then times each of these in its own subprocess, so
the peak RSS (from ``os.wait4``) belongs to that measurement alone:

  bare-json     ``for line in f: json.loads(line); sha.update(line)``  (the reference)
  bare-orjson   the same loop with ``orjson.loads``
  cli           ``batchspec validate <workspace> --json`` on a tiny workspace over the file
  cli-json      the same with orjson hidden (a plain install, without the ``fast`` extra)
  scan          ``python -c`` calling ``batchspec.wire.inputs.scan_batch_input`` directly
  scan-json     the same with orjson hidden, so the standard-library backend runs
  plan-anthropic  ``batchspec plan`` on a workspace whose provider is ``type: anthropic``
                (its dialect and custom_id pattern), its state folder (input cache, request
                indexes) removed first: the first plan of the file under those rules
  plan-together the same with ``type: together`` (a custom_id pattern only)

Times are wall-clock for the whole child process (interpreter start-up included, which is
what a user waits for). Throughput is file MB / median seconds; "x bare" is the ratio to the
bare-json loop. Targets (issue 2): at least 0.7x the bare loop, peak RSS at most 100 MB (the
plan rows are not held to them: a plan also opens the state and records its run).

Run:  .venv/bin/python bench/validate.py [--repeats 3] [--lines 50000] [--keep DIR]
      [--only plan-anthropic,plan-together]   (bare-json always runs: the reference)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TARGET_RATIO = 0.7
TARGET_RSS_MB = 100.0
MODEL = "gpt-4o-mini"
ENDPOINT = "/v1/chat/completions"

BARE_JSON = """
import hashlib, json, sys
sha = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for line in f:
        json.loads(line)
        sha.update(line)
print(sha.hexdigest())
"""

BARE_ORJSON = BARE_JSON.replace(
    "import hashlib, json, sys", "import hashlib, sys\nimport orjson as json"
)

SCAN = """
import sys
from batchspec.wire.inputs import JSON_BACKEND, scan_batch_input
r = scan_batch_input(sys.argv[1], endpoint=sys.argv[2], model=sys.argv[3])
assert r.ok, r.problems
print(r.sha256, r.requests, JSON_BACKEND)
"""

# `batchspec plan WS` with a fresh state folder: no cached scan, no request index
PLAN_FRESH = """
import shutil, sys
shutil.rmtree(sys.argv[1] + "/state", ignore_errors=True)
from batchspec.cli.main import main
main(["plan", sys.argv[1]])
"""

# A None entry in sys.modules makes `import orjson` raise ImportError.
HIDE_ORJSON = "import sys\nsys.modules['orjson'] = None\n"
SCAN_JSON = HIDE_ORJSON + SCAN
CLI_JSON = HIDE_ORJSON + "from batchspec.cli.main import main\nmain(sys.argv[1:])\n"

# Vocabulary for the message text: mostly ASCII, plus accents, CJK, Cyrillic, an emoji and
# characters JSON must escape (quote, backslash, tab, newline), as real tickets have.
VOCABULARY = (
    "the customer reports that order shipment arrived late and the invoice total was wrong "
    "please review account history refund policy escalate priority ticket payment card "
    "declined subscription renewal password reset login error "
    "résumé café naïve façade 東京 数据 привет мир 🙂"
)
WORDS = [*VOCABULARY.split(), '"quoted"', "back\\slash", "tab\tand\nnewline"]


@dataclass(frozen=True)
class Measurement:
    name: str
    seconds: float
    rss_mb: float
    returncode: int
    stdout: str
    stderr: str


def generate(path: Path, lines: int, seed: int = 7) -> None:
    """Write ``lines`` chat requests of about 4 KB each (~200 MB for 50,000)."""
    rng = random.Random(seed)
    pool = " ".join(rng.choice(WORDS) for _ in range(400_000))
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for i in range(lines):
            start = rng.randrange(0, len(pool) - 5000)
            text = pool[start : start + rng.randrange(3150, 3750)]
            request = {
                "custom_id": f"ticket-{i:06d}",
                "method": "POST",
                "url": ENDPOINT,
                "body": {
                    "model": MODEL,
                    "messages": [
                        {"role": "system", "content": "Classify the ticket: billing, bug, other."},
                        {"role": "user", "content": text},
                    ],
                    "max_tokens": 64,
                    "temperature": 0.2,
                },
            }
            f.write(json.dumps(request, ensure_ascii=False) + "\n")


def make_workspace(root: Path, data: Path) -> Path:
    """A tiny workspace (one manifest, local provider) whose input is the generated file."""
    ws = root / "workspace"
    ws.mkdir(exist_ok=True)
    (ws / "bench.yaml").write_text(
        "apiVersion: batchspec/v1\n"
        "kind: Batch\n"
        "metadata:\n  name: bench-validate\n"
        "spec:\n"
        "  provider: local\n"
        f"  endpoint: {ENDPOINT}\n"
        "  completionWindow: 24h\n"
        f"  input: {os.path.relpath(data, ws)}\n"
        f"  model: {MODEL}\n"
        "  output: results/bench.jsonl\n",
        encoding="utf-8",
    )
    return ws


def make_provider_workspace(root: Path, data: Path, provider_type: str) -> Path:
    """A workspace over the generated file whose one provider has type ``provider_type``."""
    ws = root / f"workspace-{provider_type}"
    ws.mkdir(exist_ok=True)
    (ws / "batchspec.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Project\nstate: {path: state/batchspec.db}\n"
        f"providers:\n  p: {{type: {provider_type}, baseUrl: 'http://127.0.0.1:9'}}\n",
        encoding="utf-8",
    )
    (ws / "bench.yaml").write_text(
        "apiVersion: batchspec/v1\n"
        "kind: Batch\n"
        "metadata:\n  name: bench-plan\n"
        "spec:\n"
        "  provider: p\n"
        f"  endpoint: {ENDPOINT}\n"
        f"  input: {os.path.relpath(data, ws)}\n"
        f"  model: {MODEL}\n"
        "  output: results/bench.jsonl\n",
        encoding="utf-8",
    )
    return ws


def run(name: str, argv: list[str]) -> Measurement:
    """Run one child; its own peak RSS comes from wait4, not from all children so far."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Read the pipes before reaping so a chatty child cannot block on a full pipe.
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measurement(
        name, seconds, usage.ru_maxrss / 1024, proc.returncode, out.decode(), err.decode()
    )


def cli_validated(m: Measurement, sha256: str) -> bool:
    """True when the CLI exited 0 and its output shows it scanned this very file."""
    return m.returncode == 0 and (sha256 in m.stdout or "50000" in m.stdout.replace(",", ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    ap.add_argument("--only", help="comma-separated measurements (bare-json always runs)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="batchspec-bench-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = root / "chat.jsonl"
        if not data.exists():
            t = time.perf_counter()
            generate(data, args.lines)
            print(f"generated {data} in {time.perf_counter() - t:.1f} s")
        size_mb = data.stat().st_size / 1e6
        print(f"input: {args.lines:,} lines, {size_mb:.1f} MB; python {sys.version.split()[0]}")
        ws = make_workspace(root, data)
        py = sys.executable
        commands = {
            "bare-json": [py, "-c", BARE_JSON, str(data)],
            "bare-orjson": [py, "-c", BARE_ORJSON, str(data)],
            "cli": [py, "-m", "batchspec", "validate", str(ws), "--json"],
            "cli-json": [py, "-c", CLI_JSON, "validate", str(ws), "--json"],
            "scan": [py, "-c", SCAN, str(data), ENDPOINT, MODEL],
            "scan-json": [py, "-c", SCAN_JSON, str(data), ENDPOINT, MODEL],
            **{
                f"plan-{kind}": [
                    py,
                    "-c",
                    PLAN_FRESH,
                    str(make_provider_workspace(root, data, kind)),
                ]
                for kind in ("anthropic", "together")
            },
        }
        if args.only:
            wanted = {"bare-json", *args.only.split(",")}
            commands = {name: argv for name, argv in commands.items() if name in wanted}
        sha256 = run("warm", commands["bare-json"]).stdout.strip()  # also warms the page cache
        results: dict[str, list[Measurement]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, argv in commands.items():
                m = run(name, argv)
                results[name].append(m)
        return report(results, size_mb, sha256)


def report(results: dict[str, list[Measurement]], size_mb: float, sha256: str) -> int:
    for name in ("plan-anthropic", "plan-together"):
        failed_plan = next((m for m in results.get(name, []) if m.returncode != 0), None)
        if failed_plan is not None:
            print(
                f"error: {name} failed (exit {failed_plan.returncode}): {failed_plan.stderr[-500:]}"
            )
            return 1
    for name in ("cli", "cli-json"):
        if name not in results:
            continue
        cli = results[name][-1]
        if not cli_validated(cli, sha256):
            print(
                f"note: `batchspec validate` ({name}) did not validate the file (exit "
                f"{cli.returncode}); its row is left out, the `scan` rows measure the same "
                f"library call.\n      stderr: {cli.stderr.strip()[:300] or '(empty)'}"
            )
            del results[name]
    for name in ("scan", "scan-json"):
        for m in results.get(name, []):
            if m.returncode != 0 or not m.stdout.startswith(sha256):
                print(f"error: {name} failed (exit {m.returncode}): {m.stderr.strip()[-500:]}")
                return 1
    bare = statistics.median(m.seconds for m in results["bare-json"])
    print(f"\n{'measurement':<14} {'median s':>9} {'MB/s':>8} {'x bare':>7} {'peak RSS MB':>12}")
    failed = False
    for name, runs in results.items():
        seconds = statistics.median(m.seconds for m in runs)
        rss = statistics.median(m.rss_mb for m in runs)
        ratio = bare / seconds
        print(f"{name:<14} {seconds:>9.3f} {size_mb / seconds:>8.1f} {ratio:>6.2f}x {rss:>12.1f}")
        if (
            name not in ("bare-json", "bare-orjson")
            and not name.startswith("plan-")
            and (ratio < TARGET_RATIO or rss > TARGET_RSS_MB)
        ):
            failed = True
    print(
        f"\ntargets: >= {TARGET_RATIO}x bare-json, <= {TARGET_RSS_MB:.0f} MB RSS: "
        + ("MISSED" if failed else "met")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
