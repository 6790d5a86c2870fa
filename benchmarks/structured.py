"""Structured outputs against free text, same server, same load: `bench serve` at 16 concurrent
with one shared `json_schema` for every request, and without, alternating, on the default model.
Prints each run's output tok/s, TTFT and TPOT medians, the constrained ÷ free ratio of the median
runs (target ≥ 0.85), and what compiling costs: the first schema of a model (which also builds
the vocabulary table) and a second one, timed in this process.

    python benchmarks/structured.py [--concurrency 16] [--num-prompts 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import trio

from atomr_trio.grammar.spec import StructuredOutputsParams
from atomr_trio.loadgen import serving
from atomr_trio.model_source import ModelSource

# Longer than the 128 tokens a request may generate (at least 40 strings of 3+ characters), so
# constrained requests generate as many tokens as free ones: with shorter answers the same load
# would spend more of each step on prefill, and tok/s would compare workloads, not decoding.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "items": {"type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 16},
                  "minItems": 40, "maxItems": 64},
        "done": {"type": "boolean"},
    },
    "required": ["title", "items", "done"],
    "additionalProperties": False,
}
OTHER: dict[str, Any] = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def compile_times() -> tuple[float, float]:
    """Seconds to compile the schema on a fresh model (vocabulary table included), then another."""
    grammars = ModelSource.open(None).grammars
    t0 = time.perf_counter()
    grammars.compile_sync(StructuredOutputsParams(json=SCHEMA))
    t1 = time.perf_counter()
    grammars.compile_sync(StructuredOutputsParams(json=OTHER))
    return t1 - t0, time.perf_counter() - t1


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "atomr_trio", "--port", "0", *args.server_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout or []], daemon=True).start()
            return proc, m.group(1)
    raise SystemExit("the server did not start")


def bench(url: str, args: argparse.Namespace, constrained: bool) -> dict[str, Any]:
    p = argparse.ArgumentParser()
    serving.add_arguments(p)
    argv = ["--base-url", url, "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
            "--input-len", "128", "--output-len", "128", "--ignore-eos", "--seed", str(args.seed)]
    if constrained:
        body = {"response_format": {"type": "json_schema", "json_schema": {"name": "list", "schema": SCHEMA}}}
        argv += ["--extra-body", json.dumps(body)]
    return trio.run(serving.run, p.parse_args(argv))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                   help="passed to python -m atomr_trio (default: none, the default model)")
    args = p.parse_args()
    cold, warm = compile_times()
    proc, url = start_server(args)
    runs: dict[str, list[dict[str, Any]]] = {"free": [], "json_schema": []}
    try:
        for r in range(args.rounds):
            order = ("free", "json_schema") if r % 2 == 0 else ("json_schema", "free")
            for mode in order:
                s = bench(url, args, mode == "json_schema")
                assert s["failed"] == 0, s
                runs[mode].append(s)
                print(f"round {r + 1} {mode:11s} output {s['output_throughput']:.1f} tok/s, "
                      f"TTFT median {s['ttft_ms']['median']:.0f} ms, TPOT median {s['tpot_ms']['median']:.1f} ms, "
                      f"{s['total_output_tokens'] / max(1, s['completed']):.0f} tokens/request", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)

    def median_rate(mode: str) -> float:
        return statistics.median(s["output_throughput"] for s in runs[mode])

    ratio = median_rate("json_schema") / median_rate("free")
    print(f"\nmachine: {os.cpu_count()} CPUs; server: python -m atomr_trio {' '.join(args.server_args)}".rstrip())
    print(f"{args.concurrency} concurrent, {args.num_prompts} prompts, 128 in / up to 128 out, greedy, "
          f"{args.rounds} rounds alternating")
    print(f"output tok/s (median run): free {median_rate('free'):.1f}, json_schema {median_rate('json_schema'):.1f}; "
          f"json_schema ÷ free = {ratio:.2f} (target ≥ 0.85)")
    print(f"compile: first schema of the model {cold * 1000:.0f} ms (vocabulary table included), "
          f"a second schema {warm * 1000:.0f} ms; requests sharing a schema compile it once")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
