"""Paged attention over a flattened batch, in plain torch.

Layout of one layer's cache: `kv[0]` (keys) and `kv[1]` (values), each [kv_heads, num_slots,
head_dim], where slot = block_id * block_size + offset. Gathering the decode sequences' context
slots along dim 1 gives [kv_heads, sequences, context, head_dim] with no further copy, which is
what batched matmuls want (slot rows gather faster than whole-block rows on CPU). The batch
puts all decode tokens (one per sequence) first, then each prompt chunk.

Decode tokens take the native kernel (native.py) when one was loaded: it reads the context slots
in place, with no gather copy. Otherwise they take the torch path below.

Sliding windows: a layer with window W shows a query at position p only the keys at positions
p - W + 1 .. p (W keys, itself included: transformers' sliding-window mask). The metadata holds
the full-context slots and masks; `paged_attention(window=W)` narrows them to the keys a query
can see (`Narrowed`, cached per W on the metadata, so the layers sharing a window share one per
step): the torch path gathers at most W keys per decode row and drops the keys before a chunk's
first window, and the native decode kernel takes W.
Soft-capping (Gemma 2: scores -> cap * tanh(scores / cap) before the mask) runs on every path:
the native decode kernel takes the cap too; the torch paths then leave SDPA for plain matmuls.

Invariant: the step's new K/V are written into their slots before any query reads the cache, so
a query sees exactly the tokens at positions <= its own of its own sequence (and, with a window
W, > its own - W).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from .native import DecodeAttention, PrefillAttention


class TableDecode(Protocol):
    """Decode attention through block tables: `[N, H, D]` queries over one layer's cache, each row
    seeing positions 0 .. ctx_lens[row] - 1 (the last `window` of them with a window); a row
    with ctx_len 0 is padding and gets zeros. Graph-safe: shapes depend on the inputs' shapes
    only (triton_attention.paged_decode_attention on CUDA; `table_decode_torch` anywhere)."""

    def __call__(self, q: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor, ctx_lens: torch.Tensor,
                 block_size: int, scale: float, window: int | None, softcap: float | None) -> torch.Tensor: ...


@dataclass
class PrefillChunk:
    q_start: int  # row of the chunk's first token in the flattened batch
    q_len: int
    kv_slots: torch.Tensor | None  # [ctx_len] slots of positions 0..ctx_len-1; None: no prior context
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, True = may attend; None: causal (prefill_op masks itself)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    num_decode: int  # first num_decode rows are single decode tokens
    decode_slots: torch.Tensor | None  # [num_decode * L] slots of positions 0..L-1 of each, padded
    decode_bias: torch.Tensor | None  # [1, num_decode, 1, L]: 0 where a key is visible, -inf elsewhere
    prefills: list[PrefillChunk]
    decode_ctx_lens: torch.Tensor | None = None  # [num_decode] context lengths (native kernel)
    decode_op: DecodeAttention | None = None  # native decode attention, when loaded (native.py)
    # native bf16 prefill attention, where the build has it; chunks then need no mask
    prefill_op: PrefillAttention | None = None
    # CUDA: the decode rows read the cache through block tables (graph-safe shapes), by `table_op`
    decode_block_table: torch.Tensor | None = None  # [num_decode, max_blocks] int32
    block_size: int = 0
    table_op: TableDecode | None = None
    # window W -> its Narrowed view of the decode rows and prefill chunks; filled on first use in a step
    windowed: dict[int, Narrowed] = field(default_factory=dict)


@dataclass
class Narrowed:
    """What the torch path reads for layers with one window: only the slots a query can see."""

    decode_slots: torch.Tensor | None  # [nd * Lw]: each decode row's last Lw = min(L, W) positions
    decode_bias: torch.Tensor | None  # [1, nd, 1, Lw]: 0 where visible, -inf on padding
    prefills: list[tuple[torch.Tensor | None, torch.Tensor | None]]  # each chunk's (kv_slots, mask)


def _narrow_decode(meta: AttentionMetadata, dtype: torch.dtype, window: int | None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, bias) of the decode rows' visible keys: all L positions (window None), else each
    row's last min(L, W) positions (the gather reads no key outside the window)."""
    assert meta.decode_slots is not None and meta.decode_ctx_lens is not None
    nd, dev = meta.num_decode, meta.decode_slots.device
    L = meta.decode_slots.shape[0] // nd
    if window is None or window >= L:
        if meta.decode_bias is not None:
            return meta.decode_slots, meta.decode_bias
        pos = torch.arange(L, device=dev).unsqueeze(0).expand(nd, L)
        slots = meta.decode_slots
    else:
        first = (meta.decode_ctx_lens - window).clamp(min=0).unsqueeze(1)  # first visible position
        pos = first + torch.arange(window, device=dev).unsqueeze(0)  # [nd, W]; past the context only when len < W
        slots = meta.decode_slots.view(nd, L).gather(1, pos.clamp(max=L - 1)).reshape(-1)
    lw = pos.shape[1]
    hidden = pos >= meta.decode_ctx_lens.unsqueeze(1)
    bias = torch.zeros(1, nd, 1, lw, dtype=dtype, device=dev).masked_fill_(hidden.view(1, nd, 1, lw), float("-inf"))
    return slots, bias


def _narrow_prefill(p: PrefillChunk, window: int | None, dev: torch.device,
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The chunk's (kv_slots, mask) narrowed to `window`: keys before the first query's window
    dropped, and the mask hiding keys more than W - 1 behind each query (None: plain causal)."""
    ctx = p.q_len if p.kv_slots is None else p.kv_slots.shape[0]
    if window is None or ctx <= window:  # every visible key lies inside the window
        return p.kv_slots, p.mask
    first_q = ctx - p.q_len
    lo = 0 if p.kv_slots is None else max(0, first_q - window + 1)  # no query sees a key before lo
    q_pos = torch.arange(first_q, ctx, device=dev).unsqueeze(1)
    key = torch.arange(lo, ctx, device=dev).unsqueeze(0)
    mask = (key <= q_pos) & (key > q_pos - window)
    return (None if p.kv_slots is None else p.kv_slots[lo:]), mask


def _narrowed(meta: AttentionMetadata, dtype: torch.dtype, window: int | None, dev: torch.device) -> Narrowed:
    """The torch path's view of the step for layers with `window` (None: the whole context)."""
    key = window if window is not None else 0
    if key not in meta.windowed:
        decode = meta.num_decode and meta.table_op is None  # the table op narrows by itself
        slots, bias = _narrow_decode(meta, dtype, window) if decode else (None, None)
        native = meta.prefill_op is not None  # the native prefill op narrows by itself
        prefills = [(p.kv_slots, p.mask) if native else _narrow_prefill(p, window, dev) for p in meta.prefills]
        meta.windowed[key] = Narrowed(slots, bias, prefills)
    return meta.windowed[key]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
            softcap: float | None, causal: bool = False) -> torch.Tensor:
    """softmax(cap(q k^T * scale) masked) v over [B, H, Q, D] queries and [B, KVH, K, D] keys/values
    (scale None: head_dim ** -0.5)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=True)
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    if causal:
        n = q.shape[2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    kv: torch.Tensor,  # [2, KVH, num_slots, D]
    meta: AttentionMetadata,
    write_kv: bool = True,  # False: the caller has already stored k, v in their slots
    window: int | None = None,  # sliding window: each query sees its last `window` positions
    scale: float | None = None,  # score scale; None: head_dim ** -0.5
    softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap)
) -> torch.Tensor:
    T, H, D = q.shape
    sc = D**-0.5 if scale is None else scale
    kvh = k.shape[1]
    k_cache, v_cache = kv[0], kv[1]
    if write_kv:
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    outs = []
    nd = meta.num_decode
    native_decode = meta.decode_op is not None
    if window is None and (native_decode or meta.table_op is not None):
        view = Narrowed(None, None, [(p.kv_slots, p.mask) for p in meta.prefills])
    else:
        view = _narrowed(meta, q.dtype, window, q.device)
    if nd and meta.table_op is not None:
        assert meta.decode_block_table is not None and meta.decode_ctx_lens is not None
        od = meta.table_op(q[:nd], kv, meta.decode_block_table, meta.decode_ctx_lens, meta.block_size, sc,
                           window, softcap)
        outs.append(od.reshape(nd, H * D))
    elif nd and native_decode:
        assert meta.decode_op is not None and meta.decode_slots is not None and meta.decode_ctx_lens is not None
        od = meta.decode_op(q[:nd], kv, meta.decode_slots, meta.decode_ctx_lens, sc, window, softcap)
        outs.append(od.view(nd, H * D))
    elif nd:
        bias = view.decode_bias
        assert view.decode_slots is not None and bias is not None
        L = bias.shape[-1]
        # Keys and values of every decode sequence's context in one gather: [2, KVH, nd, L, D].
        kvd = kv.view(2 * kvh, -1, D).index_select(1, view.decode_slots).view(2, kvh, nd, L, D)
        kd, vd = kvd[0], kvd[1]
        # Query heads grouped by the KV head they share: [KVH, nd, H/KVH, D].
        qd = q[:nd].view(nd, kvh, H // kvh, D).transpose(0, 1)
        if softcap is not None:
            od = _attend(qd, kd, vd, bias, scale, softcap)  # bias [1, nd, 1, L] meets [KVH, nd, G, L]
        elif nd == 1:  # one sequence: the fused kernel is cheaper (CPU, bf16: ~half the time)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=bias.transpose(0, 1), scale=scale)
        else:  # many sequences: plain matmuls cost a fraction of the fused CPU kernel
            scores = torch.matmul(qd, kd.transpose(-1, -2)) * sc + bias
            od = torch.matmul(torch.softmax(scores, dim=-1), vd)  # [KVH, nd, H/KVH, D]
        outs.append(od.transpose(0, 1).reshape(nd, H * D))
    for p, (kv_slots, mask) in zip(meta.prefills, view.prefills, strict=True):
        if meta.prefill_op is not None:  # keys read from the cache, in place
            ctx_slots = p.kv_slots if p.kv_slots is not None else meta.slot_mapping[p.q_start : p.q_start + p.q_len]
            op = meta.prefill_op(q[p.q_start : p.q_start + p.q_len], kv, ctx_slots, sc, window, softcap)
            outs.append(op.view(p.q_len, H * D))
            continue
        qp = q[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
        if kv_slots is None:
            kp = k[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
            vp = v[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
            op = _attend(qp, kp, vp, mask, scale, softcap, causal=mask is None)
        else:
            kp = k_cache.index_select(1, kv_slots).unsqueeze(0)
            vp = v_cache.index_select(1, kv_slots).unsqueeze(0)
            op = _attend(qp, kp, vp, mask, scale, softcap)
        outs.append(op.squeeze(0).transpose(0, 1).reshape(p.q_len, H * D))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def table_decode_torch(q: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor, ctx_lens: torch.Tensor,
                       block_size: int, scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """`TableDecode` in plain torch: every row gathers all max_blocks * block_size positions of
    its table (static shapes, no host sync: capturable in a CUDA graph) and masks the ones it
    cannot see. The reference for the Triton kernel, and the CUDA path where Triton is missing."""
    n, H, D = q.shape
    kvh = kv.shape[1]
    L = block_table.shape[1] * block_size
    pos = torch.arange(L, device=q.device)
    slots = (block_table.long().repeat_interleave(block_size, dim=1) * block_size + pos % block_size).reshape(-1)
    kvd = kv.view(2 * kvh, -1, D).index_select(1, slots).view(2, kvh, n, L, D)
    lens = ctx_lens.long().unsqueeze(1)
    visible = pos.unsqueeze(0) < lens
    if window is not None:
        visible &= pos.unsqueeze(0) > lens - 1 - window
    qd = q.view(n, kvh, H // kvh, D).transpose(0, 1)  # [KVH, n, G, D]
    scores = torch.matmul(qd.float(), kvd[0].float().transpose(-1, -2)) * scale  # [KVH, n, G, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible.view(1, n, 1, L), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a padding row sees nothing: zeros
    values = kvd[1].float().masked_fill(~visible.view(1, n, L, 1), 0.0)  # a stale slot may hold anything
    out = torch.matmul(probs, values)  # [KVH, n, G, D]
    return out.transpose(0, 1).reshape(n, H, D).to(q.dtype)
