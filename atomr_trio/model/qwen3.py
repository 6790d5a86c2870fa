"""Qwen3: the Llama decoder with an RMSNorm on each head of q and of k, applied before rope.

Invariants: the checkpoint holds `self_attn.q_norm.weight` and `self_attn.k_norm.weight`, each
[head_dim] and shared by every head of its kind; `head_dim` is the config's own (it may differ
from hidden / heads) and there are no q/k/v biases. The norms run as one torch op on the q|k
rows of the fused projection, before rope and the K/V cache write on every kernel path.
"""

from __future__ import annotations

import torch

from .llama import LlamaModel


class QkNormModel(LlamaModel):
    """A `LlamaModel` whose layers normalise q and k per head (`cfg.qk_norm`)."""

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes()
        for i in range(self.cfg.num_layers):
            for which in ("q_norm", "k_norm"):
                shapes[f"model.layers.{i}.self_attn.{which}.weight"] = (self.cfg.head_dim,)
        return shapes

    def qk_norm(self, got: dict[str, torch.Tensor], i: int) -> torch.Tensor | None:
        a = f"model.layers.{i}.self_attn."
        q, k = got[a + "q_norm.weight"], got[a + "k_norm.weight"]
        return torch.cat([q.expand(self.cfg.num_heads, -1), k.expand(self.cfg.num_kv_heads, -1)]).contiguous()


class Qwen3Model(QkNormModel):
    """Qwen3ForCausalLM (GGUF `qwen3`)."""
