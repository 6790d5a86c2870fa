"""Paged attention over a flattened batch, in plain torch.

Layout of one layer's cache: `kv[0]` (keys) and `kv[1]` (values), each [num_slots, kv_heads,
head_dim], where slot = block_id * block_size + offset. The batch puts all decode tokens (one per
sequence) first, then each prompt chunk.

Invariant: the step's new K/V are written into their slots before any query reads the cache, so
a query sees exactly the tokens at positions <= its own of its own sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    decode_slots: torch.Tensor | None  # [num_decode, L] slots of each sequence's context (padded)
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, L] bool
    prefills: list[PrefillChunk]


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    kv: torch.Tensor,  # [2, num_slots, KVH, D]
    meta: AttentionMetadata,
) -> torch.Tensor:
    T, H, D = q.shape
    kvh = k.shape[1]
    k_cache, v_cache = kv[0], kv[1]
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    outs = []
    nd = meta.num_decode
    if nd:
        assert meta.decode_slots is not None
        slots = meta.decode_slots
        L = slots.shape[1]
        flat = slots.reshape(-1)
        kd = k_cache.index_select(0, flat).view(nd, L, kvh, D).transpose(1, 2)
        vd = v_cache.index_select(0, flat).view(nd, L, kvh, D).transpose(1, 2)
        # Group the query heads that share a KV head: [nd, KVH, H/KVH, D].
        qd = q[:nd].view(nd, kvh, H // kvh, D)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask)
        outs.append(od.reshape(nd, H * D))
    for p in meta.prefills:
        qp = q[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
        if p.kv_slots is None:
            kp = k[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
            vp = v[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
        else:
            kp = k_cache.index_select(0, p.kv_slots).transpose(0, 1).unsqueeze(0)
            vp = v_cache.index_select(0, p.kv_slots).transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, enable_gqa=True)
        outs.append(op.squeeze(0).transpose(0, 1).reshape(p.q_len, H * D))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
