"""The fleet bench's contender: a hand-written ``openai`` SDK script doing the same calls.

Run as its own process by ``fleet.py --sdk`` (so its imports and start-up count, as
batchspec's do), once per pass:

  submit   for each manifest of the workspace: upload its input, create its batch
           (``--parallelism`` threads, one manifest at a time each)
  collect  list the batches (100 a page) until every batch of the workspace was seen, then
           download each output file into the workspace's results, ``--parallelism`` at a time

It records nothing, validates nothing and checks nothing: it is what the machine, the
servers and the added latency allow, the figure batchspec's passes are measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai


def submit(client: openai.OpenAI, root: Path, parallelism: int) -> None:
    inputs = sorted((root / "data").glob("*.jsonl"))

    def one(path: Path) -> str:
        with path.open("rb") as handle:
            uploaded = client.files.create(file=handle, purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"sdk_job": path.stem},
        )
        return batch.id

    with ThreadPoolExecutor(parallelism) as pool:
        ids = list(pool.map(one, inputs))
    (root / "sdk-batches.json").write_text(json.dumps(ids))


def collect(client: openai.OpenAI, root: Path, parallelism: int) -> None:
    wanted = set(json.loads((root / "sdk-batches.json").read_text()))
    outputs: dict[str, str] = {}
    for batch in client.batches.list(limit=100):  # pages newest first, as the SDK pages
        if batch.id in wanted:
            if batch.status != "completed" or batch.output_file_id is None:
                raise SystemExit(f"{batch.id} is {batch.status}")
            outputs[batch.metadata["sdk_job"]] = batch.output_file_id
            if len(outputs) == len(wanted):
                break
    results = root / "sdk-results"
    results.mkdir(exist_ok=True)

    def one(item: tuple[str, str]) -> None:
        name, file_id = item
        (results / f"{name}.jsonl").write_bytes(client.files.content(file_id).read())

    with ThreadPoolExecutor(parallelism) as pool:
        list(pool.map(one, outputs.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["submit", "collect"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--parallelism", type=int, default=16)
    args = parser.parse_args()
    key = os.environ["BATCHSPEC_BENCH_KEY"]
    client = openai.OpenAI(base_url=args.base_url, api_key=key, max_retries=2)
    (submit if args.step == "submit" else collect)(client, args.root, args.parallelism)
    sys.exit(0)


if __name__ == "__main__":
    main()
