"""Soak test: a live server under a mix of normal, cancelled, malformed and over-limit requests.

    python benchmarks/soak.py [--duration 300] [--concurrency 32] [--model PATH]
                              [--dtype auto] [--quantization none|gguf|int8]

Starts `python -m atomr_trio` on 127.0.0.1 (the default model unless --model), drives it with
`--concurrency` clients for `--duration` seconds, samples the server's RSS, then checks that:
no response was a 5xx, every KV block is free once the load stops (no leaked blocks), nothing is
left running or waiting, and RSS grew less than 5% after the warm-up. The figures go to
docs/reliability.md (rewritten by every run; never edit it by hand). Exit status 0 = all held.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
SERVER_LOG: list[str] = []
WORDS = "the a river stone light north quiet seven market garden letter window music engine".split()


def start_server(args: argparse.Namespace, config: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "atomr_trio", "--port", "0", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if m:
            # keep reading its output so the server never blocks on a full pipe
            threading.Thread(target=lambda: SERVER_LOG.extend(proc.stdout or []), daemon=True).start()
            return proc, m.group(1)
    raise RuntimeError(f"the server exited ({proc.wait()}) before listening")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Soak:
    def __init__(self, url: str, model: str, seed: int) -> None:
        self.url, self.model = url, model
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()  # kind/status
        self.server_errors: list[str] = []
        self.tokens = 0
        self.refused: set[object] = set()  # clients whose last request got a 429

    def record(self, kind: str, status: int, detail: str = "") -> None:
        self.outcomes[f"{kind} {status}"] += 1
        if status == 429:
            self.refused.add(trio.lowlevel.current_task())
        if status >= 500:
            self.server_errors.append(f"{kind} {status} {detail[:200]}")

    async def client(self, c: httpx.AsyncClient, until: float) -> None:
        while trio.current_time() < until:
            kind = self.rng.choices(["normal", "stream", "cancelled", "malformed", "over-limit"],
                                    [35, 25, 20, 10, 10])[0]
            me = trio.lowlevel.current_task()
            if me in self.refused:  # like a real client after a 429 (Retry-After is 1 s; some come back sooner)
                self.refused.discard(me)
                await trio.sleep(self.rng.uniform(0.2, 1.0))
            try:
                await getattr(self, kind.replace("-", "_"))(c)
            except httpx.TransportError as e:  # no answer (a hang reads as a timeout): a server failure
                self.record(kind, 598, f"{type(e).__name__}: {e}")

    async def normal(self, c: httpx.AsyncClient) -> None:
        rng = self.rng
        if rng.random() < 0.5:
            body = {"model": self.model, "messages": [{"role": "user", "content": text(rng, rng.randint(3, 60))}],
                    "max_tokens": rng.randint(8, 64), "temperature": rng.choice([0, 0.7, 1.0])}
            r = await c.post("/v1/chat/completions", json=body)
            if r.status_code == 200:
                self.tokens += r.json()["usage"]["completion_tokens"]
            self.record("normal", r.status_code, r.text)
        else:
            body = {"model": self.model, "prompt": text(rng, rng.randint(3, 200)), "n": rng.choice([1, 1, 2]),
                    "max_tokens": rng.randint(8, 64), "temperature": 0.8, "seed": rng.randint(0, 99)}
            r = await c.post("/v1/completions", json=body)
            if r.status_code == 200:
                self.tokens += r.json()["usage"]["completion_tokens"]
            self.record("normal", r.status_code, r.text)

    async def stream(self, c: httpx.AsyncClient, cut_after: int | None = None) -> None:
        rng = self.rng
        body = {"model": self.model, "stream": True, "max_tokens": rng.randint(16, 96),
                "messages": [{"role": "user", "content": text(rng, rng.randint(3, 40))}],
                "stream_options": {"include_usage": True}}
        kind = "stream" if cut_after is None else "cancelled"
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                self.record(kind, r.status_code, r.text)
                return
            chunks, done = 0, False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunks += 1
                    event = json.loads(line[6:])
                    if "error" in event:  # a final error event (then [DONE]): a deadline is a 504
                        code = str(event["error"].get("code"))
                        self.record(kind, int(code) if code.isdigit() else 504 if "timeout" in code else 500, line)
                        return
                    if event.get("usage"):
                        self.tokens += event["usage"]["completion_tokens"]
                if cut_after is not None and chunks >= cut_after:
                    break  # leaving the block closes the connection: a disconnect
            self.record(kind, 200 if done or cut_after is not None else 599, "stream ended without [DONE]")

    async def cancelled(self, c: httpx.AsyncClient) -> None:
        if self.rng.random() < 0.5:
            await self.stream(c, cut_after=self.rng.randint(0, 20))
            return
        body = {"model": self.model, "prompt": text(self.rng, 50), "max_tokens": 200, "ignore_eos": True}
        with trio.move_on_after(self.rng.uniform(0.05, 2.0)):  # a non-streaming client gives up
            r = await c.post("/v1/completions", json=body)
            self.record("cancelled", r.status_code, r.text)
            return
        self.record("cancelled", 0)

    async def malformed(self, c: httpx.AsyncClient) -> None:
        rng = self.rng
        bodies: list[Any] = [
            b"{not json", b"[]", b'{"model": ' * 50, "\u0000\ud7ff".encode(),
            {"model": self.model, "messages": "hello"}, {"model": self.model, "prompt": {"a": 1}},
            {"model": self.model, "prompt": "x", "max_tokens": "many"}, {"model": 7, "prompt": "x"},
            {"model": self.model, "prompt": "x", "temperature": -3}, {"model": self.model, "prompt": [[1, -5]]},
            {"model": self.model, "messages": [{"role": "wizard", "content": "hi"}]},
            {"model": "no-such-model", "prompt": "x"}, {"model": self.model, "prompt": "x", "n": 10**9},
        ]
        body = rng.choice(bodies)
        path = rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
        if isinstance(body, bytes):
            r = await c.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = await c.post(path, json=body)
        self.record("malformed", r.status_code, r.text)

    async def over_limit(self, c: httpx.AsyncClient) -> None:
        rng = self.rng
        choice = rng.randrange(5)
        if choice == 0:  # prompt longer than the context
            body: dict[str, Any] = {"model": self.model, "prompt": [7] * 9000, "max_tokens": 4}
        elif choice == 1:  # completion budget past the context
            body = {"model": self.model, "prompt": "hi", "max_tokens": 10**7}
        elif choice == 2:
            body = {"model": self.model, "prompt": "hi", "logit_bias": {str(i): 1 for i in range(5000)}}
        elif choice == 3:
            body = {"model": self.model, "prompt": "hi", "stop": ["x" * 5000] * 50}
        else:  # a body over the size limit
            r = await c.post("/v1/completions", content=b" " * (5 << 20), headers={"Content-Type": "application/json"})
            self.record("over-limit", r.status_code, r.text)
            return
        r = await c.post("/v1/completions", json=body)
        self.record("over-limit", r.status_code, r.text)


async def drive(args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    soak = Soak(url, "default", args.seed)
    samples: list[tuple[float, int]] = []
    t0 = trio.current_time()
    until = t0 + args.duration
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout + 60, limits=limits) as c:
        async def sample_rss() -> None:
            while True:
                samples.append((trio.current_time() - t0, rss_bytes(pid)))
                await trio.sleep(2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_rss)
            async with trio.open_nursery() as clients:
                for _ in range(args.concurrency):
                    clients.start_soon(soak.client, c, until)
                last = 0.0
                while trio.current_time() < until:
                    await trio.sleep(1)
                    now = trio.current_time() - t0
                    if now - last >= 15:
                        last = now
                        done = sum(soak.outcomes.values())
                        print(f"  {now:5.0f} s  {done} requests  5xx={len(soak.server_errors)}  "
                              f"RSS={samples[-1][1] / 2**20:.0f} MiB", flush=True)
            idle_at = trio.current_time()
            state = await settle(c)
            settle_s = trio.current_time() - idle_at
            nursery.cancel_scope.cancel()
    return {"soak": soak, "samples": samples, "state": state, "settle_s": settle_s}


async def settle(c: httpx.AsyncClient) -> dict[str, Any]:
    """Wait (up to 10 s) until the engine is idle; return its last view of itself."""
    replicas: list[dict[str, Any]] = []
    with trio.move_on_after(10):
        while True:
            deps = (await c.get("/admin/deployments")).json()["deployments"]
            replicas = [r for d in deps for r in d["replicas"]]
            if all(r["num_requests_running"] == 0 and r["num_requests_waiting"] == 0
                   and r["num_free_blocks"] == r["num_kv_blocks"] for r in replicas):
                break
            await trio.sleep(0.1)
    return {"replicas": replicas, "health": (await c.get("/health")).status_code}


def report(args: argparse.Namespace, res: dict[str, Any], wall: float) -> tuple[str, bool]:
    soak: Soak = res["soak"]
    samples = res["samples"]
    warm = [r for t, r in samples if t >= args.warmup]
    base, peak, final = warm[0], max(warm), warm[-1]
    growth = (final - base) / base
    replicas = res["state"]["replicas"]
    leaked = sum(r["num_kv_blocks"] - r["num_free_blocks"] for r in replicas)
    left = sum(r["num_requests_running"] + r["num_requests_waiting"] for r in replicas)
    total = sum(soak.outcomes.values())
    checks = [
        ("zero 5xx responses", not soak.server_errors, f"{len(soak.server_errors)} of {total}"),
        ("zero leaked KV blocks once idle", leaked == 0,
         f"{leaked} blocks held, {left} requests left ({res['settle_s']:.2f} s after the load stopped)"),
        ("RSS growth after warm-up < 5%", growth < 0.05,
         f"{growth * 100:+.2f}% ({base / 2**20:.0f} → {final / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB)"),
        ("/health 200 afterwards", res["state"]["health"] == 200, str(res["state"]["health"])),
    ]
    ok = all(c[1] for c in checks)
    by_kind: dict[str, Counter[str]] = {}
    for key, n in soak.outcomes.items():
        kind, status = key.split(" ")
        by_kind.setdefault(kind, Counter())[status] += n
    lines = [
        "# Reliability soak",
        "",
        "Written by `make soak` (`benchmarks/soak.py`); rerun it to refresh this page — never edit it by hand.",
        "",
        f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {wall:.0f} s of load "
        f"(warm-up {args.warmup:.0f} s), concurrency {args.concurrency}, seed {args.seed}.",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}.",
        f"- Server: `python -m atomr_trio --config <soak.toml>` serving {args.model or 'the default model'} "
        f"(dtype {args.dtype}, quantization {args.quantization}, max_num_seqs {args.max_num_seqs}, "
        f"max_queue {args.max_queue}, request_timeout {args.request_timeout} s).",
        f"- Command: `python benchmarks/soak.py --duration {args.duration:g} --concurrency {args.concurrency}"
        f" --dtype {args.dtype} --quantization {args.quantization}`",
        "",
        f"**Result: {'all checks held' if ok else 'FAILED'}.**",
        "",
        "| check | held | figure |",
        "|---|---|---|",
        *[f"| {name} | {'yes' if good else '**no**'} | {fig} |" for name, good, fig in checks],
        "",
        f"{total} requests, {soak.tokens} completion tokens delivered.",
        "",
        "| kind | responses by status (0 = the client gave up first) |",
        "|---|---|",
        *[f"| {kind} | {', '.join(f'{s}: {n}' for s, n in sorted(c.items()))} |"
          for kind, c in sorted(by_kind.items())],
        "",
        "Kinds: *normal* — chat or text completions (n 1–2, greedy or sampled); *stream* — SSE chat read to",
        "`[DONE]`; *cancelled* — streams cut after 0–20 chunks and non-streaming calls abandoned after",
        "0.05–2 s; *malformed* — broken JSON, wrong types, unknown roles and models; *over-limit* — prompts",
        "or completions past the context, oversized logit_bias and stop lists, a 5 MiB body (the limit is 4 MiB).",
        "429s are admission refusals (the deployment's running + queue capacity), expected at this concurrency.",
        "",
        "RSS of the server process (MiB) every ~30 s:",
        "",
        "| t (s) | " + " | ".join(f"{t:.0f}" for t, _ in samples[::15]) + " |",
        "|---|" + "---|" * len(samples[::15]),
        "| RSS | " + " | ".join(f"{r / 2**20:.0f}" for _, r in samples[::15]) + " |",
    ]
    if soak.server_errors:
        lines += ["", "First server errors:", "", *[f"- `{e.strip()}`" for e in soak.server_errors[:10]]]
        first = next((i for i, x in enumerate(SERVER_LOG) if "ERROR" in x), len(SERVER_LOG))
        logged = [x.rstrip() for x in SERVER_LOG[first:first + 40]]
        lines += ["", "Server log errors:", "", "```", *logged[:40], "```"]
    return "\n".join(lines) + "\n", ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline is taken")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--model", default=None, help="model path (default: the built-in default model)")
    p.add_argument("--dtype", default="auto", help="the engine's dtype (auto, bfloat16, float32)")
    p.add_argument("--quantization", default="none",
                   help="none; gguf: keep the GGUF's quantized weights; int8: weights and activations in int8")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=12)
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="the deployment deadline; long, so a 504 means a hang, not a slow queue")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = p.parse_args()
    args.warmup = min(args.warmup, args.duration / 3)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "soak.toml"
        model = f'model = "{args.model}"\n' if args.model else ""
        config.write_text(
            f'[[deployment]]\nname = "default"\n{model}dtype = "{args.dtype}"\n'
            f'quantization = "{args.quantization}"\nmax_num_seqs = {args.max_num_seqs}\n'
            f"max_model_len = 2048\nrequest_timeout = {args.request_timeout}\n"
            f"serving = {{ max_queue = {args.max_queue} }}\n")
        proc, url = start_server(args, config)
        try:
            print(f"soak: {url}, {args.duration:.0f} s at concurrency {args.concurrency}", flush=True)
            t0 = time.monotonic()
            res = trio.run(drive, args, url, proc.pid)
            text_, ok = report(args, res, time.monotonic() - t0)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    args.out.write_text(text_)
    print(text_)
    print(f"server exit code {code}; wrote {args.out}")
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
