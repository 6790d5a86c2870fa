"""CPU kernel plan: which kernel runs each part of a CPU forward, chosen by trying them.

Parts and their paths, fastest first:
- `matmul` over bfloat16 weights: `native` (csrc/linear_bf16.cpp over packed panels; needs
  AVX512-BF16) -> `onednn` (oneDNN-packed weights for steps of 2+ rows; needs AVX512BW/VL/DQ or
  AVX-NE-CONVERT; one-row matmuls take ATen's GEMV where its own probe passes, else oneDNN)
  -> `torch` (F.linear as torch dispatches it).
  float32 weights have `torch` only: the other two are bf16 layouts.
- `ops` — decode attention over the paged cache, residual add + RMS norm, rope + K/V cache
  write: `native` (csrc/*.cpp, built by native.py; needs x86-64 and a C++ compiler) -> `torch`.

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
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from . import cpu_gemv, native
from .attention import AttentionMetadata, paged_attention
from .config import ModelConfig
from .linear import Linear
from .native import Kernels

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


class KernelUnavailable(RuntimeError):
    """A kernel path forced by ATOMR_TRIO_CPU_KERNELS cannot run on this machine."""


@dataclass(frozen=True)
class KernelPlan:
    dtype: torch.dtype
    matmul: str  # "native" | "onednn" | "torch"
    ops: str  # "native" | "torch"
    kernels: Kernels | None  # the native library, when a part runs on it
    passed_over: tuple[str, ...] = ()  # "<part> <path>: <why>" for each faster path not taken
    forced: str | None = None  # the ATOMR_TRIO_CPU_KERNELS value, if any
    one_row_gemv: bool = False  # `onednn` path: one-row matmuls switch oneDNN off for ATen's GEMV

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
            reason = unavailable(part, path, dtype, cfg)
            if reason is None:
                picked[part] = path
                break
            if force:
                raise KernelUnavailable(f"{ENV}={os.environ[ENV]}: the {path} {part} path cannot run here: {reason}")
            passed.append(f"{part} {path}: {reason}")
    gemv = False
    if picked["matmul"] == "onednn":  # its one-row half, probed on its own: without it oneDNN does all rows
        why = _probe_quietly(_probe_one_row_gemv, dtype, cfg)
        gemv = why is None
        if why:
            passed.append(f"one-row ATen GEMV: {why}")
    uses_native = "native" in picked.values()
    return KernelPlan(dtype, picked["matmul"], picked["ops"], native.kernels() if uses_native else None,
                      tuple(passed), os.environ.get(ENV) if force else None, gemv)


def bf16_matmul_is_fast() -> bool:
    """Whether `dtype=auto` should pick bfloat16 on this CPU: a bf16 matmul path other than plain
    torch runs here (forced, or passing its probe). With one, bf16 halves the bytes read per step
    and its matmuls are faster than float32's (16 rows x 576 -> 1536, one thread, 2-core Zen 4:
    bf16 0.22 ms vs float32 0.43 ms). Without one, plain torch's bf16 matmul is the slower: the
    same machine with oneDNN, ATen and MKL capped at AVX2 (what an AVX2-only CPU runs) took 1.42 ms
    in bf16 vs 0.37 ms in float32 at 16 rows, 9.9 vs 1.5 ms at 64 rows, 0.10 vs 0.07 ms at one."""
    force = forced()
    if force:
        return force["matmul"] != "torch"
    return _probed_bf16_matmul()


@cache
def _probed_bf16_matmul() -> bool:
    # oneDNN's probe first: it is cheap, and every CPU with the native path has oneDNN's too
    return any(unavailable("matmul", path, torch.bfloat16) is None for path in ("onednn", "native"))


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
    return _probe_quietly(_PROBES[(part, path)], dtype, cfg or _TINY)


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


def _missing_feature(part: str, path: str) -> str | None:
    if path == "native":
        if not native.is_x86_64():
            return f"the native kernels are x86-64 only (this CPU is {platform.machine()})"
        if os.environ.get("ATOMR_TRIO_NATIVE", "1") == "0":
            return "switched off by ATOMR_TRIO_NATIVE=0"
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            return "no C++ compiler (g++ or $CXX) to build the native kernels"
        flags = cpu_flags()
        if part == "matmul" and flags and "avx512_bf16" not in flags:
            return "this CPU lacks avx512_bf16"
        k = native.kernels()
        if k is None:
            return "the native kernels did not build (see the warning above)"
        if part == "matmul" and k.linear is None:
            return f"the kernels were built without AVX512-BF16 (-march={native.march()})"
    if path == "onednn":
        if not torch.backends.mkldnn.is_available():
            return "this torch build has no oneDNN"
        flags = cpu_flags()
        if flags and not (all(f in flags for f in ONEDNN_BF16_FLAGS) or "avx_ne_convert" in flags):
            return "this CPU lacks avx512bw, avx512vl and avx512dq (or avx_ne_convert) for oneDNN's bf16"
    return None


# ---- probes: the path on a tiny input against plain torch; None when it matches, else why not ------
_TINY = ModelConfig("llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                    num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=64, tie_word_embeddings=True)


def _mismatch(got: torch.Tensor, want: torch.Tensor, what: str) -> str | None:
    """Compare with a tolerance of a few roundings of `got`'s dtype (bf16: 2^-8 relative)."""
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    eps = 2.0**-7 if got.dtype == torch.bfloat16 else 1e-4
    g, w = got.double(), want.double()
    bound = w.abs() * eps + w.abs().max() * eps + 1e-5
    worst = float(((g - w).abs() - bound).max())
    if not bool(torch.isfinite(g).all()) or worst > 0:
        return f"{what}: wrong answer (off by {worst:.3g} beyond the tolerance)"
    return None


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _matmul_case(dtype: torch.dtype, k: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen()
    w = (torch.randn(100, k, generator=g) * k**-0.5).to(dtype)  # 100: not a whole number of panels
    b = torch.randn(100, generator=g).to(dtype)
    x = torch.randn(rows, k, generator=g).to(dtype)
    return w, b, x


def _probe_native_matmul(dtype: torch.dtype, cfg: ModelConfig) -> str | None:
    k = native.kernels()
    assert k is not None and k.linear is not None and k.linear_silu_mul is not None
    widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    if any(w % 2 for w in widths):
        return f"it needs even input widths; this model has {widths}"
    for rows in (1, 9):
        w, b, x = _matmul_case(dtype, cfg.hidden_size, rows)
        lin = Linear(w.clone(), b)
        if not lin.pack_native(k.linear, k.linear_silu_mul):
            return "it cannot take this model's weight shapes"
        bad = _mismatch(lin(x), F.linear(x.float(), w.float(), b.float()), f"linear_bf16, {rows} rows")
        if bad:
            return bad
        gate_up = Linear(w[:96].clone(), gate_up=True)
        gate_up.pack_native(k.linear, k.linear_silu_mul)
        gate, up = F.linear(x.float(), w[:96].float()).chunk(2, dim=-1)
        bad = _mismatch(gate_up.silu_mul(x), F.silu(gate) * up, f"linear_silu_mul_bf16, {rows} rows")
        if bad:
            return bad
    return None


def _probe_onednn_matmul(dtype: torch.dtype, cfg: ModelConfig) -> str | None:
    w, b, x = _matmul_case(dtype, cfg.hidden_size, 9)
    lin = Linear(w, b)
    lin.pack()
    return _mismatch(lin(x), F.linear(x.float(), w.float(), b.float()), "oneDNN packed matmul")


def _probe_one_row_gemv(dtype: torch.dtype, cfg: ModelConfig) -> str | None:
    """One row through F.linear with oneDNN switched off (ATen's GEMV), as cpu_gemv.py runs it."""
    w, b, x = _matmul_case(dtype, cfg.hidden_size, 1)
    with cpu_gemv.kernels.rows(torch.device("cpu"), 1):
        one = F.linear(x, w, b)
    return _mismatch(one, F.linear(x.float(), w.float(), b.float()), "ATen GEMV (one row)")


def _probe_native_ops(dtype: torch.dtype, cfg: ModelConfig) -> str | None:
    """Each native op of the decoder layer against its torch version, in this model's head shapes."""
    from .llama import _rope, _rope_tables  # llama.py imports this module's users, not the reverse

    k = native.kernels()
    assert k is not None
    if dtype not in native.DTYPES:
        return f"they compute in float32 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    g = _gen()
    nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # residual add + RMS norm (transformers' rounding: normalize in float32, round, then scale)
    h, delta = torch.randn(3, cfg.hidden_size, generator=g).to(dtype), torch.randn(3, cfg.hidden_size, generator=g)
    delta, w = delta.to(dtype), (torch.randn(cfg.hidden_size, generator=g) * 0.1 + 1).to(dtype)
    summed = (h + delta).float()
    want = (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).to(dtype) * w
    got_h = h.clone()
    bad = (_mismatch(k.add_rms_norm_(got_h, delta, w, cfg.rms_norm_eps), want, "add_rms_norm_")
           or _mismatch(got_h, h + delta, "add_rms_norm_ (residual)"))
    if bad:
        return bad
    # rope on q and k, k and v into their cache slots
    T, bs, blocks = 5, 16, 4
    cos, sin = _rope_tables(cfg, 64, dtype)
    qkv = torch.randn(T, (nq + 2 * nkv) * hd, generator=g).to(dtype)
    positions = torch.tensor([0, 3, 17, 40, 63])
    slots = torch.tensor([5, 0, 33, 63, 18])
    kv = torch.zeros(2, nkv, blocks * bs, hd, dtype=dtype)
    qk = k.rope_store_kv(qkv, positions, cos, sin, kv, slots, nq, nkv)
    want_qk = _rope(qkv[:, : (nq + nkv) * hd].view(T, nq + nkv, hd), cos[positions].unsqueeze(1),
                    sin[positions].unsqueeze(1))
    bad = (_mismatch(qk, want_qk, "rope_store_kv")
           or _mismatch(kv[0][:, slots].transpose(0, 1), want_qk[:, nq:], "rope_store_kv (keys)")
           or _mismatch(kv[1][:, slots].transpose(0, 1), qkv[:, (nq + nkv) * hd:].view(T, nkv, hd),
                        "rope_store_kv (values)"))
    if bad:
        return bad
    # decode attention of two sequences (contexts 37 and 5) over the paged cache
    kv = torch.randn(2, nkv, blocks * bs, hd, generator=g).to(dtype)
    lens = torch.tensor([37, 5])
    L = int(lens.max())
    table = torch.tensor([[3, 0, 2], [1, 1, 1]])
    pos = torch.arange(L)
    dslots = (table[:, pos // bs] * bs + pos % bs).reshape(-1)
    q = torch.randn(2, nq, hd, generator=g).to(dtype)
    hidden = (pos.unsqueeze(0) >= lens.unsqueeze(1)).view(1, 2, 1, L)
    bias = torch.zeros(1, 2, 1, L).masked_fill_(hidden, float("-inf"))
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), 2, dslots, bias, [], lens)
    want = paged_attention(q.float(), q.float()[:, :nkv], q.float()[:, :nkv], kv.float(), meta, write_kv=False)
    got = k.decode_attention(q, kv, dslots, lens, hd**-0.5)
    return _mismatch(got.reshape(2, nq * hd), want, "paged_decode_attention")


_PROBES: dict[tuple[str, str], Callable[[torch.dtype, ModelConfig], str | None]] = {
    ("matmul", "native"): _probe_native_matmul,
    ("matmul", "onednn"): _probe_onednn_matmul,
    ("ops", "native"): _probe_native_ops,
}
