"""The measuring parts of benchmarks/gpu_check.sh, one subcommand per step, each writing one JSON
file into a scratch directory (after every level, so a step stopped by its time box keeps what it
measured); `report` reads them all and writes the table.

    python3 benchmarks/gpu_bench.py offline      --model DIR --scratch S [--enforce-eager]
    python3 benchmarks/gpu_bench.py serve        --model DIR --scratch S [--enforce-eager] --concurrency 1 16 64 256
    python3 benchmarks/gpu_bench.py transformers --model DIR --scratch S --batch 1 16 64 256
    python3 benchmarks/gpu_bench.py report       --scratch S --out OUT

Every run is bfloat16 on the GPU with fixed lengths (input 128, output 128 by default): ours
with ignore_eos (the server: ignore_eos + min_tokens, as `bench serve --ignore-eos` sends),
transformers with min_new_tokens = max_new_tokens, so a random-weights model generates as many
tokens as a real one. `offline` is `LLM.generate` as `python -m atomr_trio bench offline` runs it,
plus the GPU settings that command does not take (device, enforce_eager); `serve` starts
`python3 -m atomr_trio` on 127.0.0.1 and drives it with `bench serve`'s load generator
(atomr_trio.loadgen.serving), one level of concurrency after another, then stops it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SERVED_NAME = "smollm2-shape"


def _save(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mode(args: argparse.Namespace) -> str:
    return "eager" if args.enforce_eager else "graphs"


def _sigterm_exits() -> None:
    """`timeout` sends SIGTERM: leave through `finally` blocks (which stop the server)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))


# ---- offline: LLM.generate ------------------------------------------------------------------
def offline(args: argparse.Namespace) -> int:
    from atomr_trio import LLM, SamplingParams

    out = args.scratch / f"offline-{_mode(args)}.json"
    rng = random.Random(args.seed)
    t_load = time.perf_counter()
    with LLM(str(args.model), device=args.device, dtype="bfloat16", enforce_eager=args.enforce_eager,
             max_num_seqs=args.max_num_seqs) as llm:
        load_s = time.perf_counter() - t_load
        vocab = llm.get_tokenizer().vocab_size
        prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(args.input_len)]}
                   for _ in range(args.num_prompts)]
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                     use_tqdm=False)  # warm-up: first kernels compiled, first graphs replayed
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        took = time.perf_counter() - t0
        stats = llm.stats()
        engine = repr(llm)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    result = {"mode": _mode(args), "engine": engine, "load_s": load_s, "duration_s": took,
              "requests": len(outs), "output_tokens": n_out, "output_tokens_per_s": n_out / took,
              "total_tokens_per_s": (n_in + n_out) / took, "requests_per_s": len(outs) / took,
              "forward_share": stats.get("forward_share"), "engine_steps": stats.get("steps"),
              "num_kv_blocks": stats.get("num_kv_blocks"), "kernels": stats.get("kernels"),
              "config": {k: str(v) for k, v in vars(args).items() if k != "func"}}
    _save(out, result)
    print(f"offline {_mode(args)}: {len(outs)} requests, {n_out} output tokens in {took:.2f} s: "
          f"{n_out / took:.1f} output tok/s (load {load_s:.1f} s; {engine})")
    return 0


# ---- serve: the HTTP server under bench serve's load ------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _bench_args(args: argparse.Namespace, url: str, concurrency: int, num_prompts: int,
                output_len: int) -> argparse.Namespace:
    from atomr_trio.loadgen import serving

    p = argparse.ArgumentParser()
    serving.add_arguments(p)
    return p.parse_args([
        "--base-url", url, "--model", SERVED_NAME, "--tokenizer", str(args.model),
        "--input-len", str(args.input_len), "--output-len", str(output_len),
        "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--seed", str(args.seed),
    ])


def _run_level(bench: argparse.Namespace, budget: float) -> dict[str, Any] | None:
    """One `bench serve` run in this process, given up after `budget` seconds (None then)."""
    import trio

    from atomr_trio.loadgen import serving

    async def main() -> dict[str, Any] | None:
        with trio.move_on_after(budget):
            return await serving.run(bench)
        return None

    return trio.run(main)


def serve(args: argparse.Namespace) -> int:
    out = args.scratch / f"serve-{_mode(args)}.json"
    started = time.monotonic()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "atomr_trio", "--model", str(args.model), "--served-model-name", SERVED_NAME,
           "--device", args.device, "--dtype", "bfloat16", "--max-num-seqs", str(max(args.concurrency)),
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    shown = ["python3", *cmd[1:]]  # the report's command: no path or port of the machine it ran on
    shown[shown.index("--model") + 1], shown[shown.index("--port") + 1] = "MODEL", "PORT"
    result: dict[str, Any] = {"mode": _mode(args), "command": " ".join(shown), "levels": {}}
    log = (args.scratch / f"server-{_mode(args)}.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (args.scratch / "server.pid").write_text(str(proc.pid))  # gpu_check.sh stops it if we cannot
    try:
        _wait_ready(proc, url, timeout=max(10.0, args.budget_s / 2))
        result["ready_s"] = time.monotonic() - started
        print(f"serve {_mode(args)}: server ready in {result['ready_s']:.1f} s", flush=True)
        warm = _run_level(_bench_args(args, url, 16, 16, 8), budget=30)  # kernels and graphs warm
        result["warmup_failed"] = None if warm is None else warm["failed"]
        _save(out, result)
        levels = sorted(args.concurrency)
        for i, c in enumerate(levels):
            # 10 s to stop the server, and 10 s kept for each level still to come, so one slow
            # level cannot take every later one's time
            left = args.budget_s - (time.monotonic() - started) - 10 - 10 * (len(levels) - 1 - i)
            if left < 5:
                result["levels"][str(c)] = {"error": "skipped: the step's time was spent"}
                continue
            n = min(max(2 * c, 8), args.max_prompts)
            summary = _run_level(_bench_args(args, url, c, n, args.output_len), budget=left)
            if summary is None:
                result["levels"][str(c)] = {"error": f"stopped after {left:.0f} s (the step's time box)"}
            else:
                result["levels"][str(c)] = {k: summary[k] for k in (
                    "completed", "failed", "duration_s", "total_output_tokens", "output_throughput",
                    "request_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "errors")}
                print(f"serve {_mode(args)} c={c}: {summary['completed']}/{n} ok, "
                      f"{summary['output_throughput']:.1f} output tok/s, TPOT median "
                      f"{summary['tpot_ms']['median']:.2f} ms", flush=True)
            _save(out, result)
    except Exception as e:  # noqa: BLE001 - the error is a result; the report shows it
        result["error"] = f"{type(e).__name__}: {e}"
        print(f"serve {_mode(args)}: {result['error']}", flush=True)
    finally:
        _stop(proc)
        log.close()
        result["server_exit"] = proc.returncode
        _save(out, result)
        (args.scratch / "server.pid").unlink(missing_ok=True)
    return 1 if "error" in result else 0


# ---- transformers: generate on static batches ---------------------------------------------------
def transformers_static(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    out = args.scratch / "transformers.json"
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.bfloat16).to(args.device).eval()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    vocab = model.config.vocab_size
    rng = random.Random(args.seed)
    result: dict[str, Any] = {"batches": {}, "attn_implementation": model.config._attn_implementation}
    kw = {"do_sample": False, "pad_token_id": 0}

    def timed(ids: torch.Tensor, new: int) -> float:
        mask = torch.ones_like(ids)
        sync()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kw)
        sync()
        return time.perf_counter() - t0

    with torch.inference_mode():
        for b in sorted(args.batch):
            ids = torch.tensor([[rng.randrange(3, vocab) for _ in range(args.input_len)] for _ in range(b)],
                               device=args.device)
            timed(ids[:, :8], 4)  # warm-up at this batch size
            ttft = timed(ids, 1)
            took = timed(ids, args.output_len)
            result["batches"][str(b)] = {
                "output_throughput": b * args.output_len / took, "duration_s": took, "ttft_ms": ttft * 1000,
                "tpot_ms": (took - ttft) / max(args.output_len - 1, 1) * 1000}
            print(f"transformers batch {b}: {b * args.output_len / took:.1f} output tok/s", flush=True)
            _save(out, result)
    return 0


# ---- report ---------------------------------------------------------------------------------------
def _num(x: Any, fmt: str = ".1f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def report(args: argparse.Namespace) -> int:
    s = args.scratch
    data: dict[str, Any] = {name: _load(s / f"{name}.json") for name in (
        "environment", "offline-graphs", "offline-eager", "serve-graphs", "serve-eager", "transformers")}
    steps = []
    if (s / "steps.tsv").is_file():
        for line in (s / "steps.tsv").read_text().splitlines():
            name, rc, secs = line.split("\t")
            steps.append({"step": name, "rc": int(rc), "seconds": int(secs)})
    data["steps"] = steps
    pytest_tail = s / "pytest-summary.txt"
    data["pytest"] = pytest_tail.read_text().strip() if pytest_tail.is_file() else None

    def level(mode: str, c: int) -> dict[str, Any]:
        return ((data.get(f"serve-{mode}") or {}).get("levels") or {}).get(str(c)) or {}

    tf = (data.get("transformers") or {}).get("batches") or {}
    levels = sorted({int(c) for m in ("graphs", "eager") for c in ((data.get(f"serve-{m}") or {}).get("levels") or {})}
                    | {int(b) for b in tf})
    rows = []
    for c in levels:
        g, e, t = level("graphs", c), level("eager", c), tf.get(str(c)) or {}
        gt, et, tt = g.get("output_throughput"), e.get("output_throughput"), t.get("output_throughput")
        rows.append({"concurrency": c, "graphs_tok_s": gt, "eager_tok_s": et, "transformers_tok_s": tt,
                     "graphs_vs_transformers": gt / tt if gt and tt else None,
                     "eager_vs_transformers": et / tt if et and tt else None,
                     "graphs_failed": g.get("failed"), "eager_failed": e.get("failed"),
                     "graphs_note": g.get("error"), "eager_note": e.get("error")})
    data["table"] = rows
    tpot1 = {m: (level(m, 1).get("tpot_ms") or {}).get("median") for m in ("graphs", "eager")}
    tpot1["transformers"] = (tf.get("1") or {}).get("tpot_ms")
    data["tpot_ms_median_at_1"] = tpot1

    cfg = (data.get("serve-graphs") or data.get("serve-eager") or {}).get("command", "")
    lines = ["# GPU check", "",
             "Written by `bash benchmarks/gpu_check.sh` on a GPU machine (its `report` step) — never edit by "
             "hand; rerun it.", ""]
    env = data.get("environment") or {}
    if env:
        lines += [f"- {k}: {v}" for k, v in env.items()] + [""]
    lines += ["Random-weights SmolLM2-135M-shaped model (benchmarks/gpu_model.py), bf16, fixed lengths "
              "(ignore_eos / min_new_tokens). Ours: `bench serve` against the server at each concurrency, "
              "CUDA graphs on and --enforce-eager; transformers: `generate` on one static batch of B = concurrency.",
              "", f"Server: `{cfg}` (MODEL: that model's directory)" if cfg else "", "",
              "| concurrency | ours, graphs (tok/s) | ours, eager (tok/s) | transformers (tok/s) "
              "| graphs / transformers | eager / transformers |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        note = "; ".join(f"{m}: {r[f'{m}_note']}" for m in ("graphs", "eager") if r[f"{m}_note"])
        note += "".join(f"; {m}: {r[f'{m}_failed']} failed" for m in ("graphs", "eager") if r[f"{m}_failed"])
        lines.append(f"| {r['concurrency']} | {_num(r['graphs_tok_s'])} | {_num(r['eager_tok_s'])} "
                     f"| {_num(r['transformers_tok_s'])} | {_num(r['graphs_vs_transformers'], '.2f')} "
                     f"| {_num(r['eager_vs_transformers'], '.2f')} |" + (f" {note.strip('; ')}" if note else ""))
    lines += ["", f"TPOT median at concurrency 1: graphs {_num(tpot1['graphs'], '.2f')} ms, "
              f"eager {_num(tpot1['eager'], '.2f')} ms, transformers {_num(tpot1['transformers'], '.2f')} ms", ""]
    for mode in ("graphs", "eager"):
        o = data.get(f"offline-{mode}")
        if o:
            lines.append(f"Offline (`LLM.generate`, {o['requests']} prompts, {mode}): "
                         f"{_num(o['output_tokens_per_s'])} output tok/s, {_num(o['total_tokens_per_s'])} total tok/s, "
                         f"model forward {_num(100 * (o.get('forward_share') or math.nan))}% of the engine's "
                         f"step time, load {_num(o['load_s'])} s, KV blocks {o.get('num_kv_blocks')}, "
                         f"kernels: {o.get('kernels')}")
        else:
            lines.append(f"Offline ({mode}): no result")
    lines += ["", f"Tests (`pytest -m cuda`): {data['pytest'] or 'no result'}", "",
              "| step | exit | seconds |", "|---|---:|---:|"]
    lines += [f"| {st['step']} | {st['rc']} | {st['seconds']} |" for st in steps]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_results.md").write_text(text)
    _save(args.out / "gpu_results.json", data)
    print(text)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description="the measuring steps of benchmarks/gpu_check.sh")
    sub = p.add_subparsers(dest="step", required=True)

    def common(q: argparse.ArgumentParser, model: bool = True) -> None:
        q.add_argument("--scratch", type=Path, required=True, help="where each step writes its JSON")
        if model:
            q.add_argument("--model", type=Path, required=True, help="HF directory (gpu_model.py export + weights)")
            q.add_argument("--input-len", type=int, default=128)
            q.add_argument("--output-len", type=int, default=128)
            q.add_argument("--seed", type=int, default=0)
            q.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of this script)")

    q = sub.add_parser("offline", help="LLM.generate throughput on the GPU")
    common(q)
    q.add_argument("--enforce-eager", action="store_true")
    q.add_argument("--num-prompts", type=int, default=256)
    q.add_argument("--max-num-seqs", type=int, default=256)
    q.set_defaults(func=offline)

    q = sub.add_parser("serve", help="the server under bench serve's load, level after level")
    common(q)
    q.add_argument("--enforce-eager", action="store_true")
    q.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    q.add_argument("--max-prompts", type=int, default=256, help="most prompts per level")
    q.add_argument("--budget-s", type=float, default=80, help="the step's seconds, server start and stop included")
    q.set_defaults(func=serve)

    q = sub.add_parser("transformers", help="transformers generate on static batches")
    common(q)
    q.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    q.set_defaults(func=transformers_static)

    q = sub.add_parser("report", help="the table, from every step's JSON")
    common(q, model=False)
    q.add_argument("--out", type=Path, required=True)
    q.set_defaults(func=report)

    args = p.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    _sigterm_exits()
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
