"""bfloat16 against float32 on this CPU, for the `dtype=auto` rule: the real Context/ModelRunner of
the default model in both dtypes in one process, timed in alternation (so a busy neighbour slows
both alike), for decode steps of 1, 16 and 64 sequences and a 16 x 128-token prefill. Prints each
dtype's kernel plan and ms per step, and the bf16/float32 ratio (< 1: bf16 is faster).

    python benchmarks/dtype_ab.py [--rounds 5]

To see what an AVX2-only x86 CPU gets on a newer one, cap oneDNN, ATen and MKL at AVX2 and build
the native kernels for Haswell:
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
    ATOMR_TRIO_NATIVE_ARCH=haswell python benchmarks/dtype_ab.py
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from atomr_trio.engine.engine_config import EngineConfig
from atomr_trio.executor.context import Context
from atomr_trio.executor.model_runner import BatchItem, StepBatch
from atomr_trio.executor.sampler import SampleRow
from atomr_trio.model_source import ModelSource
from atomr_trio.sampling_params import SamplingParams

PROMPT = 128


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per case and round")
    args = p.parse_args()
    source = ModelSource.open(None)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rng = random.Random(0)
    row = SampleRow(SamplingParams(temperature=0), None, None, None, 0)
    contexts = {}
    for dtype in ("bfloat16", "float32"):
        settings = EngineConfig(dtype=dtype, max_model_len=1024)
        per = -(-256 // settings.resolved_block_size())  # blocks for 256 tokens a sequence
        cfg = settings.model_copy(update={"num_kv_blocks": 64 * per + 8}).resolve(source.config)
        ctx = Context(source, cfg)
        assert ctx.plan is not None
        contexts[dtype] = ctx
        print(f"{dtype}: {ctx.plan.describe()}")

    def prompt_ids() -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(PROMPT)]

    def tables(n: int) -> list[list[int]]:
        return [list(range(i * per, (i + 1) * per)) for i in range(n)]

    def prefill(ctx: Context, n: int) -> None:
        ctx.runner.execute(StepBatch([BatchItem(i, prompt_ids(), 0, t, row) for i, t in enumerate(tables(n))]))

    def decode(ctx: Context, n: int) -> None:
        ctx.runner.execute(StepBatch([BatchItem(i, [rng.randrange(100, 40000)], PROMPT, t, row)
                                      for i, t in enumerate(tables(n))]))

    cases = {"decode x1": lambda c: decode(c, 1), "decode x16": lambda c: decode(c, 16),
             "decode x64": lambda c: decode(c, 64), "prefill 16x128": lambda c: prefill(c, 16)}
    for ctx in contexts.values():
        prefill(ctx, 64)  # fill the cache the decodes read
        for case in cases.values():
            case(ctx)  # warm up
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, case in cases.items():
            for dtype, ctx in contexts.items():
                steps = 1 if name.startswith("prefill") else args.steps
                t0 = time.perf_counter()
                for _ in range(steps):
                    case(ctx)
                times.setdefault((name, dtype), []).append((time.perf_counter() - t0) / steps * 1000)
    print(f"\n{torch.get_num_threads()} threads, median of {args.rounds} alternating rounds (ms per step)")
    print("| case | bfloat16 | float32 | bf16 / fp32 |\n|---|---|---|---|")
    for name in cases:
        bf, fp = (statistics.median(times[(name, d)]) for d in ("bfloat16", "float32"))
        print(f"| {name} | {bf:.1f} | {fp:.1f} | {bf / fp:.2f} |")


if __name__ == "__main__":
    main()
