"""bench serve: a load generator for any OpenAI-compatible server, reporting vLLM's metrics.

Invariants: the dataset is fixed by the seed (random token ids decoded to text, as vLLM's random
dataset does); every timestamp is taken with one monotonic clock on the client side; TPOT is
(e2e - TTFT) / (output tokens - 1) and ITL is every gap between streamed chunks.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit

import h11
import numpy as np
import trio

from ..text.tokenizer import Tokenizer


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    text: str = ""  # the generated text, to count its tokens when the server reports no usage


def load_tokenizer(tokenizer_model: str | None) -> Tokenizer:
    from ..model_source import ModelSource

    return ModelSource.open(tokenizer_model).tokenizer


def make_prompts(tok: Tokenizer, n: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    specials = set(tok.eos_token_ids) | {tok.bos_token_id}
    pool = [i for i in range(tok.vocab_size) if i not in specials]
    prompts = []
    for _ in range(n):
        ids = [rng.choice(pool) for _ in range(input_len)]
        # Decoding random ids and encoding the text again rarely gives as many tokens (pieces merge
        # or split): drop or add ids until the text encodes to exactly input_len tokens, so every
        # server sees the prompt length asked for (vLLM's random dataset does the same).
        for _ in range(20):
            text = tok.decode(ids, skip_special_tokens=True)
            extra = len(tok.encode(text, add_special_tokens=False)) - input_len
            if extra == 0:
                break
            ids = ids[: len(ids) - extra] if extra > 0 else ids + [rng.choice(pool) for _ in range(-extra)]
        prompts.append(text)
    return prompts


def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()


async def _connect(url: SplitResult, host: str) -> trio.abc.Stream:
    if url.scheme == "https":
        # https_compatible: a server may close without TLS close_notify, which ends a body that
        # runs to the connection's close (as HTTPS clients accept)
        return await trio.open_ssl_over_tcp_stream(host, url.port or 443, ssl_context=_ssl_context(),
                                                   https_compatible=True)
    return await trio.open_tcp_stream(host, url.port or 80)


def _chunks(pending: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """The JSON chunks of the complete SSE events in `pending` (lines ended by LF or CRLF; `data:`
    with or without its space), and what is left of it."""
    *events, rest = pending.replace(b"\r\n", b"\n").split(b"\n\n")
    data = (line[5:].removeprefix(b" ") for event in events for line in event.split(b"\n") if line.startswith(b"data:"))
    return [json.loads(d) for d in data if d != b"[DONE]"], rest


async def one_request(url: str, body: dict[str, Any], headers: dict[str, str]) -> RequestResult:
    """POST `body` to `url` and time its SSE stream, over a connection of its own: h11 on a Trio
    stream, the least a client can spend per chunk on the machine it shares with the server
    (httpx's layers cost ~2x its CPU per streamed token, taken from the server under test).
    TTFT and e2e count from before the connection is made (on loopback ~0.1 ms; a remote https
    server's handshake adds its round trips)."""
    res = RequestResult(ok=False)
    target = urlsplit(url)
    payload = json.dumps(body).encode()
    conn = h11.Connection(h11.CLIENT)
    host = target.hostname or "127.0.0.1"
    request = h11.Request(method="POST", target=target.path + (f"?{target.query}" if target.query else ""),
                          headers=[("Host", f"{host}:{target.port}" if target.port else host),
                                   ("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
                                   ("Connection", "close"), *headers.items()])
    t0 = time.perf_counter()
    last = t0

    def take(chunks: list[dict[str, Any]]) -> None:
        nonlocal last
        for chunk in chunks:
            if chunk.get("usage"):
                res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                res.output_tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            first = choices[0] if choices else {}
            piece = first.get("text") or (first.get("delta") or {}).get("content")
            if piece:
                res.text += piece
                now = time.perf_counter()
                if res.ttft == 0.0:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now

    try:
        async with await _connect(target, host) as stream:
            await stream.send_all(b"".join(conn.send(e) or b"" for e in (request, h11.Data(data=payload),
                                                                        h11.EndOfMessage())))
            status, pending, error = 0, b"", b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(1 << 16)))  # b"": the server closed
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data) and status != 200:
                    error += event.data
                elif isinstance(event, h11.Data):
                    chunks, pending = _chunks(pending + event.data)
                    take(chunks)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            if status == 200 and pending.strip():  # a last event without its blank line
                take(_chunks(pending + b"\n\n")[0])
        if status != 200:
            res.error = f"HTTP {status}: {error[:200]!r}"
            return res
        res.e2e = time.perf_counter() - t0
        res.ok = res.ttft > 0
        if not res.ok:
            res.error = "the stream carried no text"
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"
    return res


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "median": math.nan, "p99": math.nan}
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float, goodput: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    good = 0
    for r in ok:
        r_tpot = (r.e2e - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        if (r.ttft * 1000 <= goodput.get("ttft", math.inf) and r_tpot * 1000 <= goodput.get("tpot", math.inf)
                and r.e2e * 1000 <= goodput.get("e2el", math.inf)):
            good += 1
    return {
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "request_goodput": good / duration if goodput else None,
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpot),
        "itl_ms": _stats([g for r in ok for g in r.itl]), "e2el_ms": _stats([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    base = urlsplit(args.base_url)
    if base.scheme not in ("http", "https") or not base.hostname:
        raise SystemExit(f"--base-url must be an http:// or https:// URL with a host, not {args.base_url!r}")
    tok = await trio.to_thread.run_sync(load_tokenizer, args.tokenizer)
    prompts = make_prompts(tok, args.num_prompts, args.input_len, args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise SystemExit("--extra-body must be a JSON object")
    url = args.base_url.rstrip("/") + args.endpoint
    results: list[RequestResult] = []
    limit = trio.CapacityLimiter(args.max_concurrency or max(1, args.num_prompts))
    rng = random.Random(args.seed)
    bar = tqdm(total=len(prompts), desc="bench", unit="req")

    async def send(prompt: str) -> None:
        async with limit:
            body = {"model": args.model, "prompt": prompt, "max_tokens": args.output_len, "stream": True,
                    "temperature": 0.0, "stream_options": {"include_usage": True}}
            if args.ignore_eos:
                body.update(ignore_eos=True, min_tokens=args.output_len)
            body.update(extra)
            res = await one_request(url, body, headers)
            if res.ok and not res.output_tokens:  # no usage in the stream (llama.cpp): count like vLLM does
                res.output_tokens = len(tok.encode(res.text, add_special_tokens=False))
                res.prompt_tokens = len(tok.encode(prompt))
            results.append(res)
            bar.update(1)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for p in prompts:
            nursery.start_soon(send, p)
            if math.isfinite(args.request_rate):
                await trio.sleep(rng.expovariate(args.request_rate))
    duration = time.perf_counter() - t0
    bar.close()
    goodput = dict((k, float(v)) for k, v in (g.split(":") for g in args.goodput))
    summary = summarize(results, duration, goodput)
    summary["config"] = {k: v for k, v in vars(args).items() if k not in ("api_key", "func")}
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print(f"{'Successful requests:':<40}{s['completed']}")
    print(f"{'Failed requests:':<40}{s['failed']}")
    print(f"{'Benchmark duration (s):':<40}{s['duration_s']:.2f}")
    print(f"{'Total input tokens:':<40}{s['total_input_tokens']}")
    print(f"{'Total generated tokens:':<40}{s['total_output_tokens']}")
    print(f"{'Request throughput (req/s):':<40}{s['request_throughput']:.2f}")
    print(f"{'Output token throughput (tok/s):':<40}{s['output_throughput']:.2f}")
    print(f"{'Total token throughput (tok/s):':<40}{s['total_token_throughput']:.2f}")
    if s["request_goodput"] is not None:
        print(f"{'Request goodput (req/s):':<40}{s['request_goodput']:.2f}")
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        v = s[key]
        print(f"{label + ' (ms) mean / median / p99:':<40}{v['mean']:.2f} / {v['median']:.2f} / {v['p99']:.2f}")
    for e in s["errors"]:
        print("error:", e)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default: %(default)s)")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="the 'model' field sent")
    p.add_argument("--tokenizer", help="model path whose tokenizer builds the prompts (default: the default model)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, help="most requests in flight (default: all)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--ignore-eos", action="store_true", help="force exactly --output-len tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="*", default=[], help="SLOs like ttft:500 tpot:50 e2el:5000 (ms)")
    p.add_argument("--extra-body", help="a JSON object merged into every request body "
                                        "(e.g. a response_format or structured_outputs)")
    p.add_argument("--api-key")
    p.add_argument("--result-file", help="write the results as JSON here")


def main(args: argparse.Namespace) -> int:
    summary = trio.run(run, args)
    print_summary(summary)
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0 if summary["failed"] == 0 else 1


__all__ = ["RequestResult", "add_arguments", "main", "summarize"]
