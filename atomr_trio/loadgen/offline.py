"""bench offline: LLM.generate throughput for N prompts of given (or random) lengths."""

from __future__ import annotations

import argparse
import json
import random
import time

from ..llm import LLM
from ..sampling_params import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF directory or GGUF file (default: the default model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn from [len*(1-r), len*(1+r)] (default: exact)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file")


def main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)

    def length(n: int) -> int:
        r = args.random_range_ratio
        return max(1, rng.randint(int(n * (1 - r)), int(n * (1 + r))))

    with LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs) as llm:
        vocab = llm.get_tokenizer().vocab_size
        prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(length(args.input_len))]}
                   for _ in range(args.num_prompts)]
        params = [SamplingParams(temperature=0, max_tokens=length(args.output_len), ignore_eos=True)
                  for _ in prompts]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        took = time.perf_counter() - t0
        stats = llm.stats()
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"requests_per_s": len(outs) / took, "output_tokens_per_s": n_out / took,
              "total_tokens_per_s": (n_in + n_out) / took, "duration_s": took, "forward_share": stats["forward_share"],
              "engine_steps": stats["steps"], "config": vars(args)}
    print(f"{len(outs)} requests in {took:.2f} s: {result['requests_per_s']:.2f} req/s, "
          f"{result['output_tokens_per_s']:.1f} output tok/s, {result['total_tokens_per_s']:.1f} total tok/s; "
          f"model forward {100 * stats['forward_share']:.1f}% of step time")
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0
