"""Paged attention over a flattened batch, in plain torch.

Layout of one layer's cache: `kv[0]` (keys) and `kv[1]` (values), each [kv_heads, num_slots,
head_dim], where slot = block_id * block_size + offset. Gathering the decode sequences' context
slots along dim 1 gives [kv_heads, sequences, context, head_dim] with no further copy, which is
what batched matmuls want (slot rows gather faster than whole-block rows on CPU). The batch
puts all decode tokens (one per sequence) first, then each prompt chunk.

Decode tokens take the native kernel (native.py) when one was loaded: it reads the context slots
in place, with no gather copy. Otherwise they take the torch path below.

Invariant: the step's new K/V are written into their slots before any query reads the cache, so
a query sees exactly the tokens at positions <= its own of its own sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .native import DecodeAttention


@dataclass
class PrefillChunk:
    q_start: int  # row of the chunk's first token in the flattened batch
    q_len: int
    kv_slots: torch.Tensor | None  # [ctx_len] slots of positions 0..ctx_len-1; None: no prior context
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, True = may attend


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    num_decode: int  # first num_decode rows are single decode tokens
    decode_slots: torch.Tensor | None  # [num_decode * L] slots of positions 0..L-1 of each, padded
    decode_bias: torch.Tensor | None  # [1, num_decode, 1, L]: 0 where a key is visible, -inf elsewhere
    prefills: list[PrefillChunk]
    decode_ctx_lens: torch.Tensor | None = None  # [num_decode] context lengths (native kernel)
    decode_op: DecodeAttention | None = None  # native decode attention, when loaded (native.py)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    kv: torch.Tensor,  # [2, KVH, num_slots, D]
    meta: AttentionMetadata,
    write_kv: bool = True,  # False: the caller has already stored k, v in their slots
) -> torch.Tensor:
    T, H, D = q.shape
    kvh = k.shape[1]
    k_cache, v_cache = kv[0], kv[1]
    if write_kv:
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    outs = []
    nd = meta.num_decode
    if nd and meta.decode_op is not None:
        assert meta.decode_slots is not None and meta.decode_ctx_lens is not None
        od = meta.decode_op(q[:nd], kv, meta.decode_slots, meta.decode_ctx_lens, D**-0.5)
        outs.append(od.view(nd, H * D))
    elif nd:
        assert meta.decode_slots is not None and meta.decode_bias is not None
        L = meta.decode_bias.shape[-1]
        # Keys and values of every decode sequence's context in one gather: [2, KVH, nd, L, D].
        kvd = kv.view(2 * kvh, -1, D).index_select(1, meta.decode_slots).view(2, kvh, nd, L, D)
        kd, vd = kvd[0], kvd[1]
        # Query heads grouped by the KV head they share: [KVH, nd, H/KVH, D].
        qd = q[:nd].view(nd, kvh, H // kvh, D).transpose(0, 1)
        if nd == 1:  # one sequence: the fused kernel is cheaper (CPU, bf16: ~half the time)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_bias.transpose(0, 1))
        else:  # many sequences: plain matmuls cost a fraction of the fused CPU kernel
            scores = torch.matmul(qd, kd.transpose(-1, -2)) * (D**-0.5) + meta.decode_bias
            od = torch.matmul(torch.softmax(scores, dim=-1), vd)  # [KVH, nd, H/KVH, D]
        outs.append(od.transpose(0, 1).reshape(nd, H * D))
    for p in meta.prefills:
        qp = q[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
        if p.kv_slots is None:
            kp = k[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
            vp = v[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
        else:
            kp = k_cache.index_select(1, p.kv_slots).unsqueeze(0)
            vp = v_cache.index_select(1, p.kv_slots).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, enable_gqa=True)
        outs.append(op.squeeze(0).transpose(0, 1).reshape(p.q_len, H * D))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
