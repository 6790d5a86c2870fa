"""Native CPU kernels: C++ compiled on this machine at first use and loaded as torch ops.

Why: on a CPU every torch op costs microseconds of dispatch — more than the arithmetic of a
decode step's few rows — and the torch decode attention in attention.py copies each sequence's
context out of the paged cache before a batch of tiny matmuls.
- `csrc/paged_decode_attention.cpp` reads K/V where they lie instead (measured on a 2-core EPYC,
  bf16, 16 sequences x 156 tokens: ~475 -> ~200 us per layer with the portable loops, ~80 us
  with the AVX512-BF16 version; one sequence: 61 -> 26 -> 12 us). Built for AVX2 + FMA without
  AVX512-BF16, or for 64-bit Arm, bf16 caches take a version in vec_wide.h's vectors (AVX2 or
  NEON; the same machine built for Haswell: ~240 -> ~80 us at 16 x 156, 19-31 -> 9-11 us for one
  sequence; see the source).
- `csrc/norm_rope.cpp` fuses residual add + RMS norm, and rotary embedding + the K/V cache write,
  each into one op (one row, bf16: add + norm ~28 -> ~4 us, rope + K/V write ~62 -> ~4 us).
- `csrc/linear_bf16.cpp`: the bf16 matmul over weights packed in panels (see linear.py), built
  for AVX512-BF16 (`vdpbf16ps`) where the -march has it, else for AVX2 + FMA or 64-bit Arm's
  NEON (the bf16 pairs widened to float32 in registers, one source for both through
  `csrc/vec_wide.h`; `Kernels.matmul_isa` says which). Where the -march has none of them,
  `Kernels.linear` is None. The AVX512-BF16 paths of the other kernels are compiled out
  without those instructions (their portable loops remain).
- `csrc/prefill_attention.cpp`: causal attention of a bf16 prompt chunk over its keys in the cache,
  built for AVX512-BF16, AVX2 + FMA or Arm NEON (elsewhere `Kernels.prefill_attention` is None and
  prefills keep torch's SDPA): AVX512-BF16, 128-token prompt, 9 query / 3 KV heads, one layer on a
  2-core Zen 4 ~360 -> ~145 us; AVX2 on a 2-core Zen 2, a whole prefill step of 2 x 128 tokens ~6%
  and of 1024 tokens ~10% faster than with SDPA.
- `csrc/decode_layers.cpp`: a decode step's layers in one call, through the other kernels (bf16
  or int8 panels, or GGUF blocks) called from C++ (`ops.h`) instead of a Python loop over 30 layers x 8 ops:
  one-sequence bf16 step 11.0 -> 9.9 ms, and the GIL left to the Trio thread meanwhile.
- `csrc/sampling.cpp`: a step's random draws from float32 logits — temperature, the top-k / top-p
  / min-p cut (each token's distance below its row's best logit bucketed instead of sorting the
  vocabulary) and the inverse-CDF draw without a softmax (sampler.py; the torch path there stays
  for CUDA and builds without the kernels).
- `csrc/linear_int8.cpp`: the int8 x int8 matmul of `quantization="int8"` (int8.py), built for
  AVX512-VNNI (`vpdpbusd`) where the -march has it, else for AVX2 (`vpmaddubsw`), else as plain
  C++ loops.
- `csrc/quant_matmul.cpp`: the matmul over weights kept in GGUF's quantized blocks (Q8_0, Q4_0,
  Q4_1, Q4_K), dequantized in registers (quantized.py); AVX-512, AVX2 or portable loops. From 32
  bf16 rows it dequantizes panel by panel into linear_bf16.cpp's matmul (ops.h, PanelFill).

How: the system C++ compiler builds the sources against torch's own headers and libraries with
`-O3 -march=native` (or the -march in ATOMR_TRIO_NATIVE_ARCH) into one library, in a cache
directory keyed by the sources, torch's version, the compiler and the CPU, so a machine builds
once (~30 s on 2 cores, one compiler per source at once) and every later process loads it. It is written under a
temporary name and renamed, so processes building at once never load a half-written file.
The sources build for x86-64 (AVX-512 / AVX2 intrinsics where the -march has them, else portable
loops) and for 64-bit Arm (the bf16 matmul and the bf16 decode and prefill attention in NEON
intrinsics, through vec_wide.h as AVX2's; the rest the portable loops, which the compiler
vectorizes for NEON); on other CPUs
nothing is built. With no compiler, a failed build, or ATOMR_TRIO_NATIVE=0, nothing is loaded.
Whether a loaded op is then used is cpu_kernels.py's choice (each is probed first); otherwise
llama.py / attention.py / linear.py keep their torch path (same results to rounding; the native
kernels keep float32 sums and round once, so they are the closer of the two to exact arithmetic).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.utils.cpp_extension as cpp

from .linear import NativeLinear, NativeSiluMul

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "paged_decode_attention.cpp", CSRC / "norm_rope.cpp", CSRC / "linear_bf16.cpp",
           CSRC / "linear_int8.cpp", CSRC / "quant_matmul.cpp", CSRC / "prefill_attention.cpp",
           CSRC / "decode_layers.cpp", CSRC / "sampling.cpp")
# included by the sources: part of the build key too
HEADERS = (CSRC / "vec_avx512.h", CSRC / "vec_avx2.h", CSRC / "vec_wide.h", CSRC / "ops.h", CSRC / "prefetch.h")
DTYPES = (torch.float32, torch.bfloat16)  # what the kernels compute in


class PrefillAttention(Protocol):
    """(q [Q, H, D] at positions C - Q .. C - 1, kv cache, slots [C] of positions 0 .. C - 1, scale,
    window, softcap) -> [Q, H, D]: causal attention of a prompt chunk whose keys and values are
    already in the cache (bfloat16)."""

    def __call__(self, q: torch.Tensor, kv: torch.Tensor, slots: torch.Tensor, scale: float,
                 window: int | None = None, softcap: float | None = None) -> torch.Tensor: ...


def prefill_attention_fits(dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether prefill_attention.cpp takes this model's attention (bf16, head size 64 or 128, at
    most 8 query heads per KV head), where the build has it."""
    return dtype == torch.bfloat16 and head_dim in (64, 128) and num_heads // num_kv_heads <= 8


class DecodeAttention(Protocol):
    """(q [nd, H, D], kv cache, slots [nd * L], ctx_lens [nd], scale, window, softcap) -> [nd, H, D];
    a window W > 0 shows each query only the last W positions of its context (itself included);
    a softcap c > 0 turns each scaled score s into c * tanh(s / c) before the softmax."""

    def __call__(self, q: torch.Tensor, kv: torch.Tensor, slots: torch.Tensor, ctx_lens: torch.Tensor,
                 scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Kernels:
    """The loaded ops; signatures and semantics are in the header comments of their sources."""

    decode_attention: DecodeAttention
    add_rms_norm_: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, float], torch.Tensor]
    rope_store_kv: Callable[..., torch.Tensor]
    # bf16 matmul over packed panels (linear.py); None where the build has none of AVX512-BF16,
    # AVX2 + FMA and Arm NEON
    linear: NativeLinear | None
    linear_silu_mul: NativeSiluMul | None
    matmul_isa: str = ""  # what `linear` was built for: "avx512bf16", "avx2", "neon", or "" (none)
    # (x, panels, n, bias) -> each row's argmax of linear(x, panels, n, bias).float(), the outputs
    # never stored (the lm_head of greedy steps); the AVX512-BF16 build only (linear_bf16.cpp says why)
    linear_argmax: NativeLinear | None = None
    # int8 matmuls (linear_int8.cpp, every build): see int8.py
    int8_linear: NativeLinear | None = None
    int8_linear_silu_mul: NativeSiluMul | None = None
    int8_isa: str = ""  # "avx512vnni", "avx2" or "portable"
    # GGUF-block matmuls (quant_matmul.cpp, every build): see quantized.py
    quant_linear: Callable[..., torch.Tensor] | None = None
    quant_linear_silu_mul: Callable[..., torch.Tensor] | None = None
    quant_dequantize: Callable[..., torch.Tensor] | None = None
    # rows of bf16 x up to which the GGUF matmul quantizes x to 8-bit blocks over Q4_0 / Q4_1
    # (AVX2 builds without AVX-512: 3; else 0)
    quant_int8_x_rows: int = 0
    # bf16 prefill attention (prefill_attention.cpp); None where the build has no bf16 matmul either
    # (none of AVX512-BF16, AVX2 + FMA and NEON)
    prefill_attention: PrefillAttention | None = None
    # every layer of a decode step in one call (decode_layers.cpp), over bf16 or int8 panels or GGUF blocks
    decode_layers: Callable[..., torch.Tensor] | None = None
    # a step's random draws (sampling.cpp): (logits, temperature, top_k, top_p, min_p, u) -> tokens
    sample_rows: Callable[..., torch.Tensor] | None = None


_lock = threading.Lock()
_state: dict[str, Kernels | None] = {}


def kernels() -> Kernels | None:
    """The native kernels, built and loaded on first call; None if unavailable here."""
    with _lock:
        if "k" not in _state:
            _state["k"] = _load()
        return _state["k"]


# the CPUs the kernels build for: x86-64 (intrinsics or portable loops) and 64-bit Arm (NEON or portable loops)
X86_64 = ("x86_64", "amd64")
MACHINES = (*X86_64, "aarch64")


def builds_here() -> bool:
    """Whether this CPU is one the kernels build for (`MACHINES`)."""
    return platform.machine().lower() in MACHINES


def is_x86_cpu() -> bool:
    """Whether this CPU is x86-64 (the AVX-512 / AVX2 builds and oneDNN's bf16 path are x86 only)."""
    return platform.machine().lower() in X86_64


def missing() -> str | None:
    """Why the native kernels cannot be built or loaded here (before trying); None if they may be."""
    if not builds_here():
        return f"the native kernels build for x86-64 and 64-bit Arm only (this CPU is {platform.machine()})"
    if os.environ.get("ATOMR_TRIO_NATIVE", "1") == "0":
        return "the native kernels are switched off by ATOMR_TRIO_NATIVE=0"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++ or $CXX) to build the native kernels"
    return None


class KernelUnavailable(RuntimeError):
    """A kernel path that is forced (ATOMR_TRIO_CPU_KERNELS) or required (a quantization) cannot
    run on this machine."""


Probed = tuple[Kernels | None, str | None]


def probed(has_op: Callable[[Kernels], bool], probe: Callable[[Kernels], str | None]) -> Probed:
    """The kernels and why an op of theirs cannot be used here: missing (`missing()`, or the build
    lacks it: `has_op` false) or answering wrong (`probe` says how; an exception is an answer too);
    None as the reason when it passed."""
    why = missing()
    if why is not None:
        return None, why
    k = kernels()
    if k is None or not has_op(k):
        return None, "the native kernels did not build (see the warning above)"
    try:
        return k, probe(k)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means: not this path
        return k, f"its probe raised {type(e).__name__}: {e}"[:300]


def require(result: Probed, what: str) -> Kernels:
    """The kernels of a `probed` result; KernelUnavailable("<what> needs ...: <why>") if they did not pass."""
    k, why = result
    if why is not None or k is None:
        raise KernelUnavailable(f"{what}: {why}")
    return k


def march() -> str:
    """The -march the kernels are built for: this CPU unless ATOMR_TRIO_NATIVE_ARCH names another
    (e.g. `haswell` builds what an AVX2-only machine gets, to test that build anywhere); set but
    empty (`ATOMR_TRIO_NATIVE_ARCH= cmd`) means this CPU too, not an empty `-march=`."""
    return os.environ.get("ATOMR_TRIO_NATIVE_ARCH") or "native"


def _load() -> Kernels | None:
    if not builds_here():
        log.info("native CPU kernels build for x86-64 and 64-bit Arm only; on this %s CPU plain torch ops run",
                 platform.machine())
        return None
    if os.environ.get("ATOMR_TRIO_NATIVE", "1") == "0":
        log.info("native CPU kernels switched off (ATOMR_TRIO_NATIVE=0)")
        return None
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        log.warning("no C++ compiler found: attention, norms and rope run on plain torch ops (slower)")
        return None
    try:
        lib = _build(cxx)
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native CPU kernels unavailable, using plain torch ops: %s", e)
        return None
    ops = torch.ops.atomr_trio
    isa = ops.bf16_matmul_isa()
    return Kernels(
        ops.paged_decode_attention, ops.add_rms_norm_, ops.rope_store_kv,
        ops.linear_bf16 if isa else None, ops.linear_silu_mul_bf16 if isa else None, isa,
        linear_argmax=ops.linear_argmax_bf16 if isa == "avx512bf16" else None,
        int8_linear=ops.int8_linear, int8_linear_silu_mul=ops.int8_linear_silu_mul, int8_isa=ops.int8_matmul_isa(),
        quant_linear=ops.quant_linear, quant_linear_silu_mul=ops.quant_linear_silu_mul,
        quant_dequantize=ops.quant_dequantize, quant_int8_x_rows=ops.quant_int8_x_rows(),
        prefill_attention=ops.prefill_attention if ops.prefill_attention_isa() else None,
        decode_layers=ops.decode_layers, sample_rows=ops.sample_rows_,
    )


def _flags() -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC
    # keeps a float compare inside a loop as a branch, so the portable loops (Arm, baseline x86-64)
    # with a clamp or a select do not vectorize
    return ["-O3", f"-march={march()}", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-std=c++20",
            "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def _cache_dir() -> Path:
    """$ATOMR_TRIO_CACHE/kernels, else $XDG_CACHE_HOME/atomr_trio/kernels (~/.cache by default)."""
    if os.environ.get("ATOMR_TRIO_CACHE"):
        return Path(os.environ["ATOMR_TRIO_CACHE"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atomr_trio" / "kernels"


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next((ln for ln in lines if ln.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def _run_all(commands: list[list[str]]) -> None:
    """Run the commands at once; RuntimeError with the compiler's message if any fails."""
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    failures = []
    for c, proc in zip(commands, procs, strict=True):
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{Path(c[0]).name} failed ({proc.returncode}): {err.strip()[-2000:]}")
    if failures:
        raise RuntimeError("; ".join(failures))


def _build(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\n".join([
        *[src.read_text() for src in (*SOURCES, *HEADERS)], torch.__version__, version, " ".join(_flags()),
        platform.machine(), _cpu_id(),
    ]).encode()).hexdigest()[:16]
    lib = _cache_dir() / key / "atomr_trio_kernels.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f".{lib.name}.{os.getpid()}.{threading.get_ident()}")
    libdir = cpp.library_paths()[0]
    includes = [f"-I{p}" for p in cpp.include_paths()]
    log.info("building native CPU kernels once for this machine into %s", lib.parent)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=lib.parent) as work:
        # one compiler per source, side by side (the sources are independent), then one link
        objects = [Path(work) / f"{src.stem}.o" for src in SOURCES]
        _run_all([[cxx, *_flags(), *includes, "-c", str(src), "-o", str(obj)]
                  for src, obj in zip(SOURCES, objects, strict=True)])
        _run_all([[cxx, *_flags(), *map(str, objects), "-o", str(tmp),
                   f"-L{libdir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{libdir}"]])
    os.replace(tmp, lib)
    log.info("built native CPU kernels in %.1f s", time.perf_counter() - t0)
    return lib
