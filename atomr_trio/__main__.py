"""`python -m atomr_trio`: serve the OpenAI-compatible API (see `--help`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from pathlib import Path

import trio
from pydantic import ValidationError

from .model.config import ModelLoadError
from .model_source import DEFAULT_MODEL_NAME
from .runtime.deployment import DeploymentSpec
from .server.serve import ServerSettings, StartupFailed, serve


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
                   help="weight and KV dtype; auto: bfloat16 on CUDA and on CPUs where a bf16 matmul path "
                        "beyond plain torch passes its probe, else float32")
    p.add_argument("--max-model-len", type=int, help="longest prompt + completion (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step (default: 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one engine step; longer prompts are chunked (default: 2048)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30,
                   help="memory for the paged KV cache in bytes (default: 1 GiB)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="engine replicas of the model; the CPU cores are split between them (default: 1)")
    p.add_argument("--config", help="TOML file with [[deployment]] tables (several models); replaces the "
                                    "model flags above")
    p.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer KEY' on every route but /health and /admin/* "
                        "(repeatable; also $ATOMR_API_KEY, comma-separated)")
    p.add_argument("--admin-key", action="append", default=[],
                   help="the keys that open /admin/* (repeatable; also $ATOMR_ADMIN_KEY). Without one, "
                        "/admin/* is closed (403) when --api-key is set, and answers loopback clients only "
                        "when no key is set")
    p.add_argument("--request-timeout", type=float,
                   help="seconds a request may take, queueing included; a deployment may set its own")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after the first SIGTERM/SIGINT (default: 30)")
    p.add_argument("--metrics-prefix", default="atomr", choices=["atomr", "vllm"],
                   help="prefix of the /metrics series; vllm: vLLM's exact names and labels, so its "
                        "dashboards and the Kubernetes inference gateway read them (default: atomr)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging threshold (default: info)")
    return p


def bench_main(argv: list[str]) -> int:
    from .loadgen import offline
    from .loadgen import serving as bench_serve

    p = argparse.ArgumentParser(prog="python -m atomr_trio bench", description="benchmarks")
    sub = p.add_subparsers(dest="kind", required=True)
    bench_serve.add_arguments(sub.add_parser("serve", help="load an OpenAI-compatible server, vLLM's metrics"))
    offline.add_arguments(sub.add_parser("offline", help="LLM.generate throughput"))
    args = p.parse_args(argv)
    logging.basicConfig(level="WARNING")
    return bench_serve.main(args) if args.kind == "serve" else offline.main(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench_main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = list(args.api_key) + _env_keys("ATOMR_API_KEY")
    admin_keys = list(args.admin_key) + _env_keys("ATOMR_ADMIN_KEY")
    try:
        specs = load_config(args.config) if args.config else [spec_from_flags(args)]
        settings = ServerSettings(deployments=specs, host=args.host, port=args.port, api_keys=keys,
                                  admin_keys=admin_keys, request_timeout=args.request_timeout,
                                  shutdown_timeout=args.shutdown_timeout, metrics_prefix=args.metrics_prefix)
        trio.run(serve, settings)
    except (ValueError, ModelLoadError, OSError, tomllib.TOMLDecodeError) as e:
        print(f"atomr_trio: {e}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # trio's nurseries wrap what the server raises
        failed = _sole(group)
        if not isinstance(failed, StartupFailed):
            raise
        print(f"atomr_trio: {failed}", file=sys.stderr)
        return 1
    return 0


def _sole(e: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (or the group itself)."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def _env_keys(name: str) -> list[str]:
    """Keys from an environment variable; several are separated by commas."""
    return [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]


def spec_from_flags(args: argparse.Namespace) -> DeploymentSpec:
    name = args.served_model_name or DEFAULT_MODEL_NAME
    if args.model and not args.served_model_name:
        path = Path(args.model)
        name = path.stem if path.is_file() else path.name
    return DeploymentSpec(
        name=name, model=args.model, dtype=args.dtype, replicas=args.data_parallel_size,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
    )


def load_config(path: str) -> list[DeploymentSpec]:
    """Deployments from a TOML project file: one [[deployment]] table each."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    tables = data.get("deployment")
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"{path}: no [[deployment]] tables")
    try:
        specs = [DeploymentSpec.model_validate(t) for t in tables]
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"{path}: deployment field {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: deployment names must be unique")
    return specs


if __name__ == "__main__":
    sys.exit(main())
