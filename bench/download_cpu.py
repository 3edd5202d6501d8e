"""Benchmark: the CPU one download costs the client, many of them overlapping.

Starts ``batchspec serve`` (builtin upstream) on 127.0.0.1, uploads one small file, then
downloads it ``--calls`` times from ``--parallelism`` threads, three ways, and prints the
client's CPU milliseconds per call (the process's own user + system time) and the wall time:

  provider   batchspec's ``OpenAIProvider.download_file`` into a file (what a pass's workers
             run: a client per call in flight, the body streamed to disk and fsync'ed)
  shared     the same provider given one ``httpx.Client`` for every thread, as before
             ``_http.pooled_client`` (httpcore's pool walks its connections, and for each
             idle one all of them again, at every request and every answer)
  sdk        the openai SDK's ``files.content(...).read()`` (the body kept in memory)

The figures are the client's CPU only, the server's is not counted; on a 2-core machine
shared with the server, compare them within one run.

Run:  .venv/bin/python bench/download_cpu.py
      .venv/bin/python bench/download_cpu.py --calls 3000 --parallelism 32
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
from parallel_apply import BENCH_KEY, KEY_ENV, start_serve

from batchspec.providers.openai import OpenAIProvider

LINE = b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}\n'


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(name: str, call: Callable[[int], object], calls: int, parallelism: int) -> None:
    cpu, start = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(parallelism) as pool:
        list(pool.map(call, range(calls)))
    wall = time.perf_counter() - start
    print(f"{name:9s} {(cpu_seconds() - cpu) / calls * 1000:6.2f} CPU ms/call   {wall:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--parallelism", type=int, default=32)
    args = parser.parse_args()
    os.environ[KEY_ENV] = BENCH_KEY
    tmp = Path(tempfile.mkdtemp(prefix="bench-download-"))
    serve, url = start_serve(tmp / "engine", "builtin")
    try:
        sdk = openai.OpenAI(base_url=url, api_key=BENCH_KEY)
        file_id = sdk.files.create(file=("in.jsonl", LINE * 5), purpose="batch").id
        provider = OpenAIProvider("bench", base_url=url, api_key=BENCH_KEY)
        keep = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        shared = OpenAIProvider(
            "bench", base_url=url, api_key=BENCH_KEY, client=httpx.Client(limits=keep)
        )
        out = tmp / "downloads"
        out.mkdir()
        n, p = args.calls, args.parallelism
        print(f"{n} downloads of a {len(LINE) * 5}-byte file, {p} at a time")
        for _ in range(2):  # twice: the second round's figures are the warm ones
            timed("provider", lambda i: provider.download_file(file_id, out / f"p{i}"), n, p)
            timed("shared", lambda i: shared.download_file(file_id, out / f"s{i}"), n, p)
            timed("sdk", lambda i: sdk.files.content(file_id).read(), n, p)
        provider.close()
        shared.close()
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
