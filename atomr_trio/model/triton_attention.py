"""Paged decode attention in Triton: the CUDA path's `TableDecode` (attention.py).

What it computes: for each decode row i (one query token of one sequence, at position
ctx_lens[i] - 1) and each query head h, softmax(cap(q . k * scale)) . v over the keys/values at
positions 0 .. ctx_lens[i] - 1 of the row's own sequence (only the last `window` of them with a
sliding window; cap(s) = softcap * tanh(s / softcap) when soft-capping). Query head h reads KV
head h // (H // KVH) (GQA). A row with ctx_len 0 is padding: it reads nothing and gets zeros.
Scores, softmax and the weighted sum accumulate in float32 whatever the cache dtype; the output
takes q's dtype. `table_decode_torch` in attention.py is the same op in plain torch.

Layout: one layer's cache `kv` is [2, KVH, num_slots, D] (kv[0] keys, kv[1] values), where
slot = block_id * block_size + offset and row i's blocks are block_table[i, 0 ..] in order.

How: one program per (row, KV head, split) loads the row's query heads that share the KV head
as one [G, D] tile (padded to 16 rows for tl.dot), so every K/V tile is read once per KV head,
and walks its share of the visible positions BLOCK_N at a time with an online softmax. With few
rows (N * KVH small against the GPU's SMs) and a long block table, the context is split across
`num_splits` programs (flash-decoding): each writes its partial (max, sum, acc) to a scratch
buffer and a second kernel merges them. With one split the first kernel writes the output.
Both tl.dot products take float32 operands: exact ("ieee") for a float32 cache, TF32 for a
16-bit one (exact for bf16 keys and values; the probabilities keep 10 mantissa bits, more than
a bf16 P). Tiles are [32, BLOCK_D] for D <= 64, else [16, BLOCK_D] (~145 registers a thread on
sm_90, no spills); BLOCK_D is D rounded up to a power of two, the padding masked.

Invariant (CUDA-graph safe): nothing reads a tensor's values on the host; the grid, the split
count and the scratch buffers depend on the shapes only (the scratch is allocated on the first
call per shape and device and kept: one made during a capture stays in the graph's pool, and
calls must not run concurrently on two streams). Positions outside a row's visible range are
never loaded (masked loads, block-table entries past the context included), and masked scores
and values are zeroed by tl.where, so a stale slot holding NaN cannot leak.

Triton is imported lazily: importing this module never imports it, and the kernels are built
on the first call (`_kernels`, cached), so tests can set TRITON_INTERPRET=1 first and run the
kernels on CPU tensors through Triton's interpreter (tests/test_triton_attention.py: Triton
itself must be imported with the variable set, as triton.language's own jit functions read it
then; the tests compare with a plain-torch reference, NaN in every slot a row may not read).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch

MAX_SPLITS = 16
SPLIT_MIN_POSITIONS = 256  # a split covers at least this many positions of the block table's capacity
TARGET_PROGRAMS = 264  # ~2 programs per SM on an H200 (132 SMs)

# Triton's modules, bound by `_kernels` on first use: the kernels (and the interpreter, which
# patches triton.language where a kernel's globals name it) look them up as module globals.
triton: Any = None
tl: Any = None
_scratch: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
_scratch_lock = threading.Lock()


def available() -> bool:
    """Whether Triton can be imported (never raises; Triton is not a declared dependency)."""
    try:
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - a missing or broken Triton means: the plain-torch op
        return False
    return True


def num_splits(n: int, kv_heads: int, capacity: int) -> int:
    """How many programs share one (row, KV head)'s context: enough to fill the GPU when the
    rows are few, each split covering at least SPLIT_MIN_POSITIONS of the table's `capacity`
    (max_blocks * block_size); shapes only, so the same under a captured graph."""
    programs = max(1, n * kv_heads)
    wanted = -(-TARGET_PROGRAMS // programs)
    return max(1, min(MAX_SPLITS, wanted, capacity // SPLIT_MIN_POSITIONS))


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any]:
    """Build the two kernels (decode, merge) on first use: triton.jit reads TRITON_INTERPRET now."""
    global triton, tl
    import triton as triton_module
    import triton.language as language

    triton, tl = triton_module, language

    @triton.jit
    def decode_kernel(q_ptr, kv_ptr, table_ptr, lens_ptr, out_ptr, part_ptr, stat_ptr,
                      sq_n, sq_h, sk_kv, sk_h, sk_s, st_n, so_n, so_h,
                      block_size, scale, window, softcap,
                      G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < G
        d_ok = d < D
        heads = kvh * G + g
        q = tl.load(q_ptr + row * sq_n + heads[:, None] * sq_h + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        ctx = tl.load(lens_ptr + row)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(ctx - window, 0)
        chunk = tl.cdiv(tl.cdiv(ctx - lo, SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * chunk
        end = tl.minimum(start + chunk, ctx)
        k_base = kv_ptr + kvh.to(tl.int64) * sk_h
        v_base = k_base + sk_kv
        m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)  # finite: exp2(m_i - m) is 0, never NaN
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        LOG2E: tl.constexpr = 1.4426950408889634
        for tile in range(start, end, BLOCK_N):
            pos = tile + tl.arange(0, BLOCK_N)
            seen = pos < end
            block = tl.load(table_ptr + row * st_n + pos // block_size, mask=seen, other=0)
            slot = block.to(tl.int64) * block_size + pos % block_size
            kv_mask = seen[:, None] & d_ok[None, :]
            offs = slot[:, None] * sk_s + d[None, :]
            k = tl.load(k_base + offs, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION)
            s = s * scale
            if HAS_SOFTCAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
            s = tl.where(seen[None, :], s * LOG2E, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.where(seen[None, :], tl.exp2(s - m_new[:, None]), 0.0)
            v = tl.load(v_base + offs, mask=kv_mask, other=0.0)
            v = tl.where(kv_mask, v, 0.0)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        if SPLITS == 1:
            o = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
            tl.store(out_ptr + row * so_n + heads[:, None] * so_h + d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=g_ok[:, None] & d_ok[None, :])
        else:
            # scratch: part [N, H, SPLITS, BLOCK_D], stat [2, N, H, SPLITS] (max in log2 units, sum)
            rh = (row * (tl.num_programs(1) * G) + heads) * SPLITS + split
            tl.store(part_ptr + rh[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
            plane = tl.num_programs(0) * tl.num_programs(1) * G * SPLITS
            tl.store(stat_ptr + rh, m_i, mask=g_ok)
            tl.store(stat_ptr + plane + rh, l_i, mask=g_ok)

    @triton.jit
    def merge_kernel(part_ptr, stat_ptr, out_ptr, so_n, so_h, H,
                     D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        sp = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        s_ok = sp < SPLITS
        rh = (row * H + head) * SPLITS + sp
        plane = tl.num_programs(0) * H * SPLITS
        m = tl.load(stat_ptr + rh, mask=s_ok, other=-1.0e30)
        l_s = tl.load(stat_ptr + plane + rh, mask=s_ok, other=0.0)
        m_all = tl.max(m, 0)
        w = tl.where(s_ok, tl.exp2(m - m_all), 0.0)
        acc = tl.load(part_ptr + rh[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
        total = tl.sum(l_s * w, 0)
        o = tl.sum(acc * w[:, None], 0)
        o = tl.where(total > 0, o / tl.maximum(total, 1e-30), 0.0)
        tl.store(out_ptr + row * so_n + head * so_h + d, o.to(out_ptr.dtype.element_ty), mask=d < D)

    return decode_kernel, merge_kernel


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's precision on float32 operands: exact for a float32 cache; TF32 for a 16-bit cache
    (exact for its bf16 keys and values, and close for the float32 probabilities)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _scratch_for(n: int, h: int, block_d: int, splits: int, device: torch.device,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The split kernels' partials ([N, H, splits, BLOCK_D] acc; [2, N, H, splits] max and sum),
    allocated on the first call per shape and device and kept (a graph captured later, or
    during that call, reads and writes the same buffers on every replay)."""
    # per calling thread: two replicas on one GPU (one device thread each) must not merge each
    # other's partials
    key = (threading.get_ident(), n, h, block_d, splits, device)
    with _scratch_lock:
        if key not in _scratch:
            _scratch[key] = (torch.empty(n, h, splits, block_d, dtype=torch.float32, device=device),
                             torch.empty(2, n, h, splits, dtype=torch.float32, device=device))
        return _scratch[key]


def _check(q: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor, ctx_lens: torch.Tensor,
           out: torch.Tensor) -> None:
    """Shape and layout checks (shapes and strides only: nothing reads the device)."""
    n, h, d = q.shape
    assert kv.dim() == 4 and kv.shape[0] == 2 and kv.shape[3] == d and kv.stride(3) == 1, "kv: [2, KVH, slots, D]"
    assert h % kv.shape[1] == 0, "query heads must be a multiple of KV heads"
    assert q.stride(2) == 1 and out.stride(2) == 1 and out.shape == q.shape, "q, out: [N, H, D], D contiguous"
    assert block_table.dim() == 2 and block_table.shape[0] == n and block_table.stride(1) == 1
    assert block_table.dtype in (torch.int32, torch.int64) and ctx_lens.shape == (n,)
    assert ctx_lens.dtype in (torch.int32, torch.int64) and ctx_lens.is_contiguous()


def paged_decode_attention(
    q: torch.Tensor,  # [N, H, D]
    kv: torch.Tensor,  # [2, KVH, num_slots, D]
    block_table: torch.Tensor,  # [N, max_blocks] int32
    ctx_lens: torch.Tensor,  # [N] int32; 0: a padding row (zeros)
    block_size: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,  # [N, H, D] to write into (CUDA graphs: a static buffer)
) -> torch.Tensor:
    """Decode attention of each row over its own context through its block table (module doc)."""
    n, h, d = q.shape
    out = torch.empty_like(q) if out is None else out
    _check(q, kv, block_table, ctx_lens, out)
    if n == 0:
        return out
    kvh = kv.shape[1]
    g = h // kvh
    block_d = max(16, _next_pow2(d))
    block_n = 32 if block_d <= 64 else 16  # a [BLOCK_N, BLOCK_D] tile: ~140 registers a thread on sm_90
    splits = num_splits(n, kvh, block_table.shape[1] * block_size)
    part, stat = _scratch_for(n, h, block_d, splits, q.device) if splits > 1 else (out, out)
    decode_kernel, merge_kernel = _kernels()
    decode_kernel[(n, kvh, splits)](
        q, kv, block_table, ctx_lens, out, part, stat,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), kv.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1),
        block_size, scale, window if window is not None else 0, softcap if softcap is not None else 1.0,
        G=g, D=d, SPLITS=splits, BLOCK_G=max(16, _next_pow2(g)), BLOCK_D=block_d, BLOCK_N=block_n,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, PRECISION=_precision(kv.dtype),
        num_warps=4)
    if splits > 1:
        merge_kernel[(n, h)](part, stat, out, out.stride(0), out.stride(1), h,
                             D=d, SPLITS=splits, BLOCK_S=_next_pow2(splits), BLOCK_D=block_d, num_warps=4)
    return out
