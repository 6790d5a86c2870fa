"""Kernel probes: each optional CPU kernel path run once on a tiny input shaped like the model,
against the plain torch computation (cpu_kernels.py decides what to do with the answer).

Invariant: a probe returns None only when the path's answer matched torch's to a few roundings of
its dtype; otherwise it returns what went wrong (a wrong answer, a shape it cannot take) or raises.
Probes never touch torch's global RNG (their inputs come from their own generator) and flip
oneDNN's process-wide switch only through cpu_gemv's KernelChoice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import cpu_gemv, native
from .attention import AttentionMetadata, PrefillChunk, paged_attention
from .config import ModelConfig
from .linear import Linear
from .rope import rope_tables

TINY = ModelConfig("llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
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
        if not lin.pack_native(k.linear, k.linear_silu_mul, k.linear_argmax):
            return "it cannot take this model's weight shapes"
        y = lin(x)
        bad = _mismatch(y, F.linear(x.float(), w.float(), b.float()), f"linear_bf16, {rows} rows")
        if bad:
            return bad
        best = lin.argmax(x)
        if best is not None and not torch.equal(best, y.float().argmax(dim=-1)):
            return f"linear_argmax_bf16, {rows} rows: not the argmax of linear_bf16's outputs"
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


def probe_one_row_gemv(dtype: torch.dtype, cfg: ModelConfig) -> str | None:
    """One row through F.linear with oneDNN switched off (ATen's GEMV), as cpu_gemv.py runs it."""
    w, b, x = _matmul_case(dtype, cfg.hidden_size, 1)
    with cpu_gemv.kernels.rows(torch.device("cpu"), 1):
        one = F.linear(x, w, b)
    return _mismatch(one, F.linear(x.float(), w.float(), b.float()), "ATen GEMV (one row)")


def _probe_native_ops(dtype: torch.dtype, cfg: ModelConfig) -> str | None:
    """Each native op of the decoder layer against its torch version, in this model's head shapes."""
    from .llama import _rope  # llama.py imports this module's users, not the reverse

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
    cos, sin = rope_tables(cfg, 64, dtype)
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
    bad = _mismatch(got.reshape(2, nq * hd), want, "paged_decode_attention")
    if bad or k.prefill_attention is None or not native.prefill_attention_fits(dtype, hd, nq, nkv):
        return bad
    # prefill attention of a 21-token chunk after 16 cached tokens (positions 16..36)
    C, Q = 37, 21
    cslots = torch.randperm(blocks * bs, generator=g)[:C]
    q = torch.randn(Q, nq, hd, generator=g).to(dtype)
    mask = torch.arange(C).unsqueeze(0) <= torch.arange(C - Q, C).unsqueeze(1)
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), 0, None, None, [PrefillChunk(0, Q, cslots, mask)])
    want = paged_attention(q.float(), q.float()[:, :nkv], q.float()[:, :nkv], kv.float(), meta, write_kv=False)
    return _mismatch(k.prefill_attention(q, kv, cslots, hd**-0.5).reshape(Q, nq * hd), want, "prefill_attention")


def probe_sampling(dtype: torch.dtype, cfg: ModelConfig) -> str | None:
    """The sampler's native op (float32 logits, whatever the model's dtype) against float64 math:
    the tokens each row keeps (top_k, top_p, min_p, both of the first two, a row a grammar masked;
    every boundary well away from float rounding), the draws at points of the kept tokens'
    cumulative probability, a temperature, and a greedy row's argmax."""
    k = native.kernels()
    assert k is not None and k.sample_rows is not None
    logits = torch.randn(6, 64, generator=_gen()) * 2
    logits[4, 40:] = float("-inf")
    temps, ks = [1.0, 1.0, 1.0, 1.0, 1.0, 0.5], [5, 0, 0, 10, 0, 0]
    ps, min_ps = [1.0, 0.6, 1.0, 0.8, 0.7, 1.0], [0.0, 0.0, 0.2, 0.0, 0.0, 0.0]
    kept, cdfs = [], []  # per row, in float64: the tokens a sort keeps (index order: the draw's), their CDF
    for i, row in enumerate((logits / torch.tensor(temps).unsqueeze(1)).double()):
        order = row.argsort(descending=True)
        order = order[torch.isfinite(row[order])][: ks[i] or None]
        probs = torch.softmax(row[order], dim=0)
        order = order[probs.cumsum(0) - probs < ps[i]]
        if min_ps[i]:
            order = order[row[order] >= row.max() + math.log(min_ps[i])]
        kept.append(order.sort().values)
        cdfs.append(torch.softmax(row[kept[i]], dim=0).cumsum(0))
    for u in (0.1, 0.5, 0.9):
        cut = logits.clone()
        tokens = k.sample_rows(cut, temps, ks, ps, min_ps, [u] * 6).tolist()
        for i in range(len(kept)):
            if set(torch.isfinite(cut[i]).nonzero().squeeze(1).tolist()) != set(kept[i].tolist()):
                return f"sample_rows_: row {i} kept the wrong tokens"
            want = int(kept[i][int((cdfs[i] <= u).sum())])
            if tokens[i] != want:
                return f"sample_rows_: row {i} drew token {tokens[i]} at u = {u}, expected {want}"
    greedy = k.sample_rows(logits.clone(), [0.0] * 6, [0] * 6, [1.0] * 6, [0.0] * 6, [0.5] * 6).tolist()
    if greedy != logits.argmax(dim=-1).tolist():
        return "sample_rows_: greedy rows are not their argmax"
    return None


def time_bf16_against_float32(path: str = "native", rounds: int = 7) -> tuple[float, float]:
    """(bf16 ms, torch float32 ms) per one-row matmul by the default model's MLP weight
    (576 -> 1536), for cpu_kernels' dtype=auto decision where the only bf16 path beyond torch is
    the native one that widens bf16 to float32 in registers (AVX2 + FMA, or Arm NEON), or, on an
    Arm CPU with bf16 instructions, torch's own bf16 F.linear (`path` "native" or "torch"). One
    thread (torch's count is restored after): with two, a neighbour holding a core stalls every
    parallel call for a scheduler slice (measured: 7.8 ms instead of 0.03 ms per call on a busy
    2-core machine), which would decide by the neighbour. Each the best
    of `rounds` rounds of 3 calls, taken in alternation after a warm-up round: ~5 ms in all."""
    w = torch.full((1536, 576), 0.01)  # the values do not matter to the time (no denormals)
    x = torch.full((1, 576), 0.5)
    lin = Linear(w.to(torch.bfloat16), None)
    if path == "native":
        k = native.kernels()
        assert k is not None and k.linear is not None and k.linear_silu_mul is not None
        assert lin.pack_native(k.linear, k.linear_silu_mul)
    xb = x.to(torch.bfloat16)
    calls = {"bf16": lambda: lin(xb), "float32": lambda: F.linear(x, w)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for round_ in range(rounds + 1):
            for name, call in calls.items():
                t0 = time.perf_counter()
                for _ in range(3):
                    call()
                if round_:  # round 0 warms up
                    times[name].append((time.perf_counter() - t0) / 3 * 1e3)
    finally:
        torch.set_num_threads(threads)
    return min(times["bf16"]), min(times["float32"])


PROBES: dict[tuple[str, str], Callable[[torch.dtype, ModelConfig], str | None]] = {
    ("matmul", "native"): _probe_native_matmul,
    ("matmul", "onednn"): _probe_onednn_matmul,
    ("ops", "native"): _probe_native_ops,
}
