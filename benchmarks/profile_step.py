"""Where one engine step's time goes: decode steps of B sequences (context ~ 128 + 64 tokens) on the
real Context/ModelRunner, under torch.profiler; prints a markdown summary (or writes it to --out).

    python benchmarks/profile_step.py [--batch 16] [--model PATH] [--dtype auto] [--quantization none|gguf|int8]
                                      [--out FILE]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from atomr_trio.engine.engine_config import EngineConfig
from atomr_trio.executor.context import Context
from atomr_trio.executor.model_runner import BatchItem, StepBatch
from atomr_trio.executor.sampler import SampleRow
from atomr_trio.model_source import ModelSource
from atomr_trio.sampling_params import SamplingParams


def run(args: argparse.Namespace) -> str:
    source = ModelSource.open(args.model)
    settings = EngineConfig(dtype=args.dtype, quantization=args.quantization, max_model_len=1024)
    per = -(-256 // settings.resolved_block_size())  # blocks for 256 tokens a sequence
    cfg = settings.model_copy(update={"num_kv_blocks": args.batch * per + 8}).resolve(source.config)
    torch.set_num_threads(cfg.torch_threads or 1)
    ctx = Context(source, cfg)
    runner = ctx.runner
    rng = random.Random(0)
    greedy = SamplingParams(temperature=0)
    row = SampleRow(greedy, None, None, None, 0)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(args.batch)]
    prompt = 128
    runner.execute(StepBatch([BatchItem(i, [rng.randrange(100, 40000) for _ in range(prompt)], 0, tables[i], row)
                              for i in range(args.batch)]))
    pos = prompt

    def decode() -> None:
        nonlocal pos
        runner.execute(StepBatch([BatchItem(i, [rng.randrange(100, 40000)], pos, tables[i], row)
                                  for i in range(args.batch)]))
        pos += 1

    for _ in range(8):
        decode()
    steps = args.steps
    t0 = time.perf_counter()
    for _ in range(steps):
        decode()
    plain = (time.perf_counter() - t0) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            decode()
    groups: dict[str, float] = defaultdict(float)
    total_self = 0.0
    for ev in prof.key_averages():
        us = ev.self_cpu_time_total
        total_self += us
        groups[_group(ev.key)] += us
    step_ms = plain * 1000
    lines = [
        f"Decode step, batch {args.batch}, context ≈ {prompt + 8 + steps} tokens, {cfg.dtype}, "
        f"quantization {cfg.quantization}, {cfg.torch_threads} threads: **{step_ms:.1f} ms per step** "
        f"({args.batch / plain:.0f} tok/s from the "
        f"model alone), measured over {steps} steps without the profiler. Self time per op group under "
        "torch.profiler (its own overhead inflates small ops):",
        "",
        "| op group | ms per step | share |",
        "|---|---|---|",
    ]
    for name, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        if us / total_self < 0.005:
            continue
        lines.append(f"| {name} | {us / 1000 / steps:.2f} | {us / total_self:.0%} |")
    return "\n".join(lines) + "\n"


def _group(op: str) -> str:
    if op in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm", "mkldnn::_linear_pointwise"):
        return "matmul (linear layers, lm_head, attention)"
    if op in ("aten::index_select", "aten::index", "aten::index_copy_", "aten::embedding"):
        return "KV gather / scatter, embedding"
    if op in ("aten::_softmax", "aten::softmax", "aten::topk", "aten::sort", "aten::argmax", "aten::max"):
        return "softmax / sampling"
    if op.startswith("aten::rms_norm") or op in ("aten::_fused_rms_norm", "aten::rsqrt", "aten::pow", "aten::mean"):
        return "rms_norm"
    if op in ("aten::mul", "aten::add", "aten::cat", "aten::neg", "aten::silu", "aten::sub", "aten::div",
              "aten::copy_", "aten::clone", "aten::contiguous", "aten::masked_fill_", "aten::add_"):
        return "elementwise (rope, silu, residual, copies)"
    if op == "atomr_trio::add_rms_norm_":
        return "residual add + rms_norm (native kernel)"
    if op == "atomr_trio::rope_store_kv":
        return "rope + K/V cache write (native kernel)"
    if op == "atomr_trio::linear_bf16":
        return "matmul (native bf16 kernel: linear layers, lm_head)"
    if op == "atomr_trio::linear_silu_mul_bf16":
        return "matmul gate|up + silu * up (native bf16 kernel)"
    if op == "atomr_trio::quant_linear":
        return "matmul (GGUF blocks, quant_matmul.cpp: linear layers, lm_head)"
    if op == "atomr_trio::quant_linear_silu_mul":
        return "matmul gate|up + silu * up (GGUF blocks, quant_matmul.cpp)"
    if op == "atomr_trio::quant_dequantize":
        return "embedding rows dequantized (GGUF blocks)"
    if op == "atomr_trio::paged_decode_attention":
        return "decode attention (native kernel, reads the paged cache in place)"
    if op == "atomr_trio::prefill_attention":
        return "prefill attention (native kernel, reads the paged cache in place)"
    if op.startswith("aten::_scaled_dot") or "flash" in op:
        return "attention kernel (SDPA: prefills; decodes without the native kernel)"
    return "other (" + op + ")" if op.startswith("aten::") else "Python / dispatch (" + op + ")"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="none", choices=["none", "gguf", "int8"])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    texts = []
    for b in args.batch:
        texts.append(run(argparse.Namespace(**{**vars(args), "batch": b})))
    text = "\n".join(texts)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
