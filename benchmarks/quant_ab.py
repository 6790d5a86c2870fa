"""The matmuls of one decode step of the default model (every layer's q|k|v, o, gate|up + silu,
down, and the lm_head) at B rows, for GGUF blocks (quantization=gguf, bf16 and float32
activations) vs bf16 and float32 weights on the kernel plan's matmul. The configurations run
interleaved, round after round, and the best round of each is reported, so a shared machine's
noise hits them alike.

    python benchmarks/quant_ab.py [--rows 1 16] [--rounds 7] [--steps 10] [--threads N] [--cpu-time]

--cpu-time times the process's CPU seconds instead of the wall clock (with --threads 1: the
kernels' own cost, what a busy shared machine does not inflate).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from atomr_trio.model import cpu_kernels
from atomr_trio.model.families import build_model
from atomr_trio.model.llama import LlamaModel
from atomr_trio.model_source import ModelSource


def load(source: ModelSource, dtype: torch.dtype, quantization: str) -> LlamaModel:
    model = build_model(source.config, dtype, 64)
    model.load_weights(source.weights(quantization), source.path)
    model.use_kernels(cpu_kernels.choose(source.config, dtype))
    return model


def step(model: LlamaModel, rows: int) -> Callable[[], None]:
    cfg = model.cfg
    x = torch.randn(rows, cfg.hidden_size).to(model.dtype)
    attn = torch.randn(rows, cfg.num_heads * cfg.head_dim).to(model.dtype)

    def run() -> None:
        for layer in model.layers:
            layer.qkv(x)
            layer.o(attn)
            layer.mlp(x)
        model.lm_head(x)

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpu-time", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    source = ModelSource.open(None)
    configs = {"gguf, bf16 activations": (torch.bfloat16, "gguf"), "gguf, f32 activations": (torch.float32, "gguf"),
               "bf16 weights": (torch.bfloat16, "none"), "f32 weights": (torch.float32, "none")}
    models = {name: load(source, dtype, q) for name, (dtype, q) in configs.items()}
    with torch.inference_mode():
        for rows in args.rows:
            runs = {name: step(m, rows) for name, m in models.items()}
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(args.rounds):
                for name, run in runs.items():
                    run()
                    t0 = clock()
                    for _ in range(args.steps):
                        run()
                    best[name] = min(best[name], (clock() - t0) / args.steps)
            for name, t in best.items():
                print(f"{rows:3d} rows  {name:24s} {t * 1000:7.2f} ms per step's matmuls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
