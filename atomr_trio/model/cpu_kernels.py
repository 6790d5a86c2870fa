"""CPU kernel plan: which kernel runs each part of a CPU forward, chosen by trying them.

Parts and their paths, fastest first:
- `matmul` over bfloat16 weights: `native` (csrc/linear_bf16.cpp over packed panels; built for
  AVX512-BF16 where the -march has it, else for AVX2 + FMA, or NEON on 64-bit Arm (where a CPU
  with bf16 instructions keeps torch's bf16 matmul instead): the CPU must have what the build
  used; the AVX2 build stays first on AVX-512 CPUs without AVX512-BF16 too: built for
  skylake-avx512 with oneDNN capped at AVX512_CORE, one core, it took half oneDNN's time at
  1-256 rows, e.g. 16 x 576 -> 1536 0.46 vs 1.01 ms) -> `onednn` (oneDNN-packed weights for
  steps of 2+ rows; needs AVX512BW/VL/DQ or AVX-NE-CONVERT; one-row matmuls take ATen's GEMV
  where its own probe passes, else oneDNN) -> `torch` (F.linear as torch dispatches it).
  float32 weights have `torch` only: the other two are bf16 layouts.
- `ops` — decode attention over the paged cache, residual add + RMS norm, rope + K/V cache
  write, and bf16 prefill attention where the build has AVX512-BF16, AVX2 + FMA or NEON (else
  prefills keep SDPA):
  `native` (csrc/*.cpp, built by native.py; needs x86-64 or 64-bit Arm and a C++ compiler) -> `torch`. With
  native ops the sampler's random draws (temperature, top-k / top-p / min-p, the draw:
  csrc/sampling.cpp) are probed on their own and run native where they pass (else the sampler's
  torch ops), like the one-row GEMV below.

Invariants:
- A path runs only after its probe ran it here, on a tiny input shaped like this model's, and
  matched the plain torch computation. A path that raises, or answers wrong, is passed over for
  the next one, and the one log line of the plan says which path each part runs and why the
  faster ones did not.
- `ATOMR_TRIO_CPU_KERNELS` forces paths: one name (`native`, `onednn`, `torch`) for every part
  that has that path (the others run plain torch), or per part (`matmul=onednn,ops=native`).
  A forced path is never swapped for another: if it cannot run here, building the model fails
  with `KernelUnavailable`, naming what is missing.
- The plain torch path always exists and needs nothing.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from . import kernel_probes, native
from .config import ModelConfig
from .native import Kernels, KernelUnavailable

log = logging.getLogger(__name__)

ENV = "ATOMR_TRIO_CPU_KERNELS"
PATHS = {"matmul": ("native", "onednn", "torch"), "ops": ("native", "torch")}


# the environment variables that steer CPU kernels (listed in docs/configuration.md)
ENVIRONMENT = {
    ENV: "force CPU kernel paths: `native`, `onednn` or `torch` for every part that has that path "
         "(plain torch for the others), or per part, e.g. `matmul=onednn,ops=native`; unset or `auto`: "
         "the fastest path whose probe passes. A forced path that cannot run stops the start with the reason",
    "ATOMR_TRIO_NATIVE": "`0`: do not build or load the native kernels (plain torch ops)",
    "ATOMR_TRIO_NATIVE_ARCH": "the `-march` the native kernels are built for (default `native`; e.g. "
                              "`haswell` builds what an AVX2-only CPU gets)",
    "ATOMR_TRIO_CACHE": "where the built kernels are kept (`$ATOMR_TRIO_CACHE/kernels`; default "
                        "`~/.cache/atomr_trio/kernels`)",
    "CXX": "the C++ compiler for the native kernels (default `g++`)",
    "ATOMR_API_KEY, ATOMR_ADMIN_KEY": "API / admin keys, comma-separated, beside `--api-key` / `--admin-key`",
}


@dataclass(frozen=True)
class KernelPlan:
    dtype: torch.dtype
    matmul: str  # "native" | "onednn" | "torch"
    ops: str  # "native" | "torch"
    kernels: Kernels | None  # the native library, when a part runs on it
    passed_over: tuple[str, ...] = ()  # "<part> <path>: <why>" for each faster path not taken
    forced: str | None = None  # the ATOMR_TRIO_CPU_KERNELS value, if any
    one_row_gemv: bool = False  # `onednn` path: one-row matmuls switch oneDNN off for ATen's GEMV
    sampling: bool = False  # `native` ops: the sampler's random rows are drawn natively too

    def summary(self) -> str:
        return f"matmul={self.matmul}, ops={self.ops}"

    def describe(self) -> str:
        """The plan's log line: each part's path, and why each faster path was passed over."""
        head = f"CPU kernels ({str(self.dtype).removeprefix('torch.')}): {self.summary()}"
        if self.one_row_gemv:
            head += " (one-row matmuls: ATen's GEMV)"
        if self.forced:
            head += f" (forced by {ENV}={self.forced})"
        return head + "".join(f"; not {p}" for p in self.passed_over)


def forced() -> dict[str, str] | None:
    """The paths ATOMR_TRIO_CPU_KERNELS forces, per part; None when unset or `auto`."""
    value = os.environ.get(ENV, "").strip()
    if value in ("", "auto"):
        return None
    names = sorted({p for paths in PATHS.values() for p in paths})
    if "=" not in value:
        if value not in names:
            raise KernelUnavailable(f"{ENV}={value!r}: give one of auto, {', '.join(names)}, "
                                    "or per part like matmul=onednn,ops=native")
        return {part: value if value in paths else "torch" for part, paths in PATHS.items()}
    chosen: dict[str, str] = {}
    for item in value.split(","):
        part, _, path = (s.strip() for s in item.partition("="))
        if part not in PATHS or path not in PATHS[part]:
            raise KernelUnavailable(
                f"{ENV}={value!r}: {item!r} is not a part=path pair; parts and their paths: "
                + "; ".join(f"{p}={'|'.join(ps)}" for p, ps in PATHS.items()))
        chosen[part] = path
    return {part: chosen.get(part, "torch") for part in PATHS}


def choose(cfg: ModelConfig, dtype: torch.dtype) -> KernelPlan:
    """Probe each part's paths, fastest first, and return the plan (see the module docstring)."""
    force = forced()
    passed: list[str] = []
    picked: dict[str, str] = {}
    for part in PATHS:
        candidates = paths(part, dtype)
        if force:  # a part whose paths this dtype does not have (float32 matmul) runs plain torch
            candidates = [force[part]] if force[part] in candidates else ["torch"]
        for path in candidates:
            preferred = _prefers_torch_bf16() if not force and (part, path) == ("matmul", "native") else None
            if preferred:
                passed.append(f"{part} {path}: {preferred}")
                continue
            reason = unavailable(part, path, dtype, cfg)
            if reason is None:
                picked[part] = path
                break
            if force:
                raise KernelUnavailable(f"{ENV}={os.environ[ENV]}: the {path} {part} path cannot run here: {reason}")
            passed.append(f"{part} {path}: {reason}")
    gemv = False
    if picked["matmul"] == "onednn":  # its one-row half, probed on its own: without it oneDNN does all rows
        why = _probe_quietly(kernel_probes.probe_one_row_gemv, dtype, cfg)
        gemv = why is None
        if why:
            passed.append(f"one-row ATen GEMV: {why}")
    sampling = False
    if picked["ops"] == "native":  # the sampler's op, probed on its own: without it the sampler runs torch ops
        why = _probe_quietly(kernel_probes.probe_sampling, dtype, cfg)
        sampling = why is None
        if why:
            passed.append(f"sampling native: {why}")
    uses_native = "native" in picked.values()
    return KernelPlan(dtype, picked["matmul"], picked["ops"], native.kernels() if uses_native else None,
                      tuple(passed), os.environ.get(ENV) if force else None, gemv, sampling)


def bf16_matmul_is_fast() -> bool:
    """Whether `dtype=auto` should pick bfloat16 on this CPU.

    - Forced paths: bf16 unless the forced matmul is plain torch.
    - oneDNN's bf16 path or the AVX512-BF16 native one passes its probe: bf16. Steps bound by
      reading weights read half the bytes, and those matmuls are faster than float32's
      (16 rows x 576 -> 1536, one thread, 2-core Zen 4: bf16 0.22 ms vs float32 0.43 ms).
    - Only a native matmul that widens the weights in registers passes (AVX2 + FMA, or NEON on
      64-bit Arm; no bf16 dot instruction): decided by timing it (on an Arm CPU with bf16
      instructions, where the plan takes torch's bf16 F.linear instead, by timing that), once
      per process (15-45 ms with the setup), against plain torch float32 `F.linear` on the
      default model's MLP weight (1536 x 576) at one row,
      the batch-1 decode GEMV, one thread each, best of 7 alternated rounds
      (`kernel_probes.time_bf16_against_float32`); bf16 only if it is faster. Measured so
      on a 2-core Zen 4 built for Haswell with oneDNN, ATen and MKL capped at AVX2: 0.034 ms vs
      0.070 ms; streaming 24 such weights on 2 threads 0.073 vs 0.374 ms (2.8 vs 13.4 ms for the
      49152 x 576 lm_head), and a whole batch-1 decode step of the default model 12.1 vs 56.8 ms.
    - Nothing beyond plain torch: float32. Plain torch's bf16 matmul there is the slower: the
      same capped machine took 1.42 ms in bf16 vs 0.37 ms in float32 at 16 rows, 9.9 vs 1.5 ms
      at 64 rows, 0.10 vs 0.07 ms at one."""
    force = forced()
    if force:
        return force["matmul"] != "torch"
    return _probed_bf16_matmul()


@cache
def _probed_bf16_matmul() -> bool:
    # oneDNN's probe first: it is cheap, and every CPU with the AVX512-BF16 path has oneDNN's too
    if unavailable("matmul", "onednn", torch.bfloat16) is None:
        return True
    if _prefers_torch_bf16():  # the plan takes torch's bf16 matmul there: that is the one to time
        bf16_ms, float32_ms = kernel_probes.time_bf16_against_float32("torch")
        name = "torch bf16 F.linear"
    else:
        if unavailable("matmul", "native", torch.bfloat16) is not None:
            return False
        k = native.kernels()
        if k is None or k.matmul_isa not in WIDENED_MATMULS:
            return True
        bf16_ms, float32_ms = kernel_probes.time_bf16_against_float32("native")
        name = f"the {k.matmul_isa.upper()} bf16 matmul"
    faster = bf16_ms < float32_ms
    log.info("dtype auto: %s took %.3f ms, float32 F.linear %.3f ms (1 x 576 -> 1536): %s",
             name, bf16_ms, float32_ms, "bfloat16" if faster else "float32")
    return faster


def paths(part: str, dtype: torch.dtype) -> list[str]:
    """The paths `part` has for weights of `dtype`, fastest first (float32 matmuls: torch only)."""
    if part == "matmul" and dtype != torch.bfloat16:
        return ["torch"]
    return list(PATHS[part])


def unavailable(part: str, path: str, dtype: torch.dtype, cfg: ModelConfig | None = None) -> str | None:
    """Why `path` cannot run `part` here (a missing feature, or what its probe saw); None if it can."""
    if path == "torch":
        return None
    if path not in paths(part, dtype):
        return f"it multiplies bfloat16 weights, these are {str(dtype).removeprefix('torch.')}"
    missing = _missing_feature(part, path)
    if missing:
        return missing
    return _probe_quietly(kernel_probes.PROBES[(part, path)], dtype, cfg or kernel_probes.TINY)


def _probe_quietly(probe: Callable[[torch.dtype, ModelConfig], str | None], dtype: torch.dtype,
                   cfg: ModelConfig) -> str | None:
    try:
        return probe(dtype, cfg)
    except Exception as e:  # noqa: BLE001 - any failure of a probe means: not this path
        return f"its probe raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


# ---- what each path needs ---------------------------------------------------------------------------
@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`), from /proc/cpuinfo; empty if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


ONEDNN_BF16_FLAGS = ("avx512bw", "avx512vl", "avx512dq")
# ONEDNN_MAX_CPU_ISA values that leave oneDNN no bf16 instructions (AVX2_VNNI_2 has avx_ne_convert)
ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI")


def _missing_feature(part: str, path: str) -> str | None:
    if path == "native":
        why = native.missing()
        if why is not None:
            return why
        k = native.kernels()
        if k is None:
            return "the native kernels did not build (see the warning above)"
        if part == "matmul":
            return _native_matmul_missing(k)
    if path == "onednn":
        if not torch.backends.mkldnn.is_available():
            return "this torch build has no oneDNN"
        if not native.is_x86_cpu():
            return f"oneDNN's bf16 path is taken on x86 CPUs only (this CPU is {platform.machine()})"
        flags = cpu_flags()
        if flags and not (all(f in flags for f in ONEDNN_BF16_FLAGS) or "avx_ne_convert" in flags):
            return "this CPU lacks avx512bw, avx512vl and avx512dq (or avx_ne_convert) for oneDNN's bf16"
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
        if cap in ONEDNN_CAPS_WITHOUT_BF16:  # how an AVX2-only CPU is emulated on a newer one
            return (f"oneDNN is capped at ONEDNN_MAX_CPU_ISA={cap}, without avx512bw, avx512vl and avx512dq "
                    "(or avx_ne_convert) for its bf16")
    return None


# the CPU flags each build of the native matmul executes (Kernels.matmul_isa)
NATIVE_MATMUL_FLAGS = {"avx512bf16": ("avx512_bf16",), "avx2": ("avx2", "fma"), "neon": ("asimd",)}
# the builds whose matmul widens bf16 to float32 in registers: dtype=auto times them against float32
WIDENED_MATMULS = ("avx2", "neon")


def _native_matmul_missing(k: Kernels) -> str | None:
    """The build's matmul decides what the CPU must have: a build for another -march
    (ATOMR_TRIO_NATIVE_ARCH=haswell on an AVX-512 CPU) runs its own instructions, not the CPU's best."""
    if k.linear is None:
        return f"the kernels were built without AVX512-BF16, AVX2 + FMA or Arm NEON (-march={native.march()})"
    flags = cpu_flags()
    lacking = [f for f in NATIVE_MATMUL_FLAGS.get(k.matmul_isa, ()) if flags and f not in flags]
    return f"this CPU lacks {' and '.join(lacking)}" if lacking else None


def _prefers_torch_bf16() -> str | None:
    """Why the plan passes over a NEON build's matmul on this CPU, unless forced; None if it does not.
    Arm CPUs with bf16 instructions (FEAT_BF16: Graviton3 and later, Neoverse V1/V2/N2) have torch's
    own bf16 matmul through oneDNN / Arm's libraries, which multiply in bf16 (BFMMLA); ours widens
    to float32 and would be the slower for prefills. Neither is measured on such a CPU here."""
    if "bf16" not in cpu_flags() or native.missing() is not None:  # (x86 flags name it avx512_bf16)
        return None
    k = native.kernels()
    if k is None or k.matmul_isa != "neon":
        return None
    return "this Arm CPU has bf16 instructions (FEAT_BF16), which torch's bf16 matmul uses"
