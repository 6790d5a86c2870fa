"""`python -m atomr_trio`: serve the OpenAI-compatible API (see `--help`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import trio

from .config import EngineConfig
from .model.config import ModelLoadError
from .server.serve import ServerSettings, serve


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m atomr_trio",
        description="Serve an OpenAI-compatible API (chat and text completions, streaming) with "
                    "continuous batching. With no --model, serves SmolLM2-135M-Instruct.",
    )
    p.add_argument("--model", help="HF model directory or GGUF file (default: the built-in SmolLM2-135M)")
    p.add_argument("--served-model-name", help="the name clients use in 'model' (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weight and KV dtype; auto: bfloat16 where the device computes it fast")
    p.add_argument("--max-model-len", type=int, help="longest prompt + completion (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step (default: 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one engine step; longer prompts are chunked (default: 2048)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30,
                   help="memory for the paged KV cache in bytes (default: 1 GiB)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: all cores)")
    p.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer KEY' (repeatable; also $ATOMR_API_KEY)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after the first SIGTERM/SIGINT (default: 30)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = list(args.api_key)
    if os.environ.get("ATOMR_API_KEY"):
        keys.append(os.environ["ATOMR_API_KEY"])
    try:
        engine = EngineConfig(
            dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes, torch_threads=args.torch_threads,
        )
        settings = ServerSettings(model=args.model, served_model_name=args.served_model_name,
                                  host=args.host, port=args.port, api_keys=keys, engine=engine,
                                  shutdown_timeout=args.shutdown_timeout)
        trio.run(serve, settings)
    except (ValueError, ModelLoadError) as e:
        print(f"atomr_trio: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
