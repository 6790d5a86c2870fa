"""Gemma 2 and Gemma 3 (text): the Llama decoder with Gemma's norms, GeGLU, score scaling and
soft-capping, and sliding-window layers alternating with global ones.

What differs from `LlamaModel`, as transformers computes it:
- the embedding rows are multiplied by sqrt(hidden_size), rounded to the model dtype first;
- every RMSNorm multiplies by (1 + weight), in float32, and rounds once to the model dtype; the
  checkpoint holds `weight` (kept here as float32 1 + weight). Each layer has four: before and
  after attention (`input_layernorm`, `post_attention_layernorm`) and before and after the MLP
  (`pre_feedforward_layernorm`, `post_feedforward_layernorm`); each block's output is normed
  before it joins the residual stream;
- the MLP is down(gelu_tanh(gate x) * up x);
- attention scores are scaled by query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5) and, where
  `attn_logit_softcapping` is set (Gemma 2), capped as cap * tanh(s / cap) before the mask;
  the final logits likewise with `final_logit_softcapping`;
- `cfg.layer_window(i)` gives each layer's window (Gemma 2: even layers sliding, odd global;
  Gemma 3: `layer_types`);
- Gemma 3 normalises q and k per head (the same (1 + weight) norm) before rope, and its sliding
  layers rotate with their own base (`rope_local_theta`, unscaled) while its global layers use
  `rope_theta` and `rope_scaling`: two cos/sin tables.

Kernels: attention is attention.py's paged attention on every path; with the native ops loaded
its decode rows take the native kernel, windows and Gemma 2's soft-cap included (prompt chunks
stay on torch, as for every family). The native rope + K/V store runs with the layer's own table.
Norms are torch ops (the native add + norm kernel multiplies by the plain weight in the model
dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .attention import AttentionMetadata, paged_attention
from .config import ModelConfig
from .linear import Linear
from .llama import Layer, LlamaModel, _rope
from .quantized import QuantizedWeight, embedding
from .rope import rope_tables


@dataclass
class GeGluMlp:
    gate_up: Linear  # gate | up stacked (plain layout: gelu is not the kernels' silu)
    down: Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.gelu(gate, approximate="tanh") * up)

    def linears(self) -> list[Linear]:
        return [self.gate_up, self.down]


@dataclass
class GemmaLayer(Layer):
    # in_norm, post_norm (after attention), pre_ff, post_ff and qk_norm hold float32 1 + weight
    pre_ff: torch.Tensor | None = None
    post_ff: torch.Tensor | None = None


class GemmaModel(LlamaModel):
    """Gemma2ForCausalLM and Gemma3ForCausalLM (their differences are all in the config)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_len: int, device: str = "cpu") -> None:
        super().__init__(cfg, dtype, max_len, device)
        # made once: a tensor built in forward would copy from the host inside a captured CUDA graph
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=dtype, device=self.device)
        if cfg.rope_local_theta is not None:
            local = replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None)
            local_cos, local_sin = rope_tables(local, max_len, dtype)
            self.local_cos, self.local_sin = local_cos.to(self.device), local_sin.to(self.device)
        else:
            self.local_cos, self.local_sin = self.cos, self.sin
        self.final_norm: torch.Tensor

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes()
        cfg = self.cfg
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "pre_feedforward_layernorm.weight"] = (cfg.hidden_size,)
            shapes[p + "post_feedforward_layernorm.weight"] = (cfg.hidden_size,)
            if cfg.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (cfg.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (cfg.head_dim,)
        return shapes

    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor | np.ndarray | QuantizedWeight, Path]], source: Path
    ) -> None:
        cfg = self.cfg
        got = self.read_tensors(weights, source)

        def norm(name: str) -> torch.Tensor:
            return 1.0 + got[name].float()

        self.embed = got["model.embed_tokens.weight"]
        self.lm_head = Linear(got["lm_head.weight"])
        self.final_norm = norm("model.norm.weight")
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            qk = None
            if cfg.qk_norm:
                qk = torch.cat([norm(a + "q_norm.weight").expand(cfg.num_heads, -1),
                                norm(a + "k_norm.weight").expand(cfg.num_kv_heads, -1)]).contiguous()
            mlp = p + "mlp."
            self.layers.append(GemmaLayer(
                in_norm=norm(p + "input_layernorm.weight"),
                post_norm=norm(p + "post_attention_layernorm.weight"),
                qkv=Linear(torch.cat([got[a + f"{x}_proj.weight"] for x in "qkv"])),
                o=Linear(got[a + "o_proj.weight"]),
                mlp=GeGluMlp(Linear(torch.cat([got[mlp + "gate_proj.weight"], got[mlp + "up_proj.weight"]])),
                             Linear(got[mlp + "down_proj.weight"])),
                qk_norm=qk,
                pre_ff=norm(p + "pre_feedforward_layernorm.weight"),
                post_ff=norm(p + "post_feedforward_layernorm.weight"),
            ))

    def _gemma_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rms_norm(x) * (1 + w) in float32 (`weight` holds 1 + w), rounded once to x's dtype."""
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.cfg.rms_norm_eps) * weight).to(x.dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        on_launch: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] for the T flattened tokens (before the final norm).
        `on_launch()` runs once, after the embedding, before the layers."""
        cfg = self.cfg
        nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        native = self.native
        assert cfg.query_pre_attn_scalar is not None
        scale = cfg.query_pre_attn_scalar**-0.5
        norm = self._gemma_norm
        h = embedding(input_ids, self.embed, self.dtype) * self.embed_scale
        if on_launch is not None:
            on_launch()
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(table) -> the tokens' cos, sin
        for i, w in enumerate(self.layers):
            assert isinstance(w, GemmaLayer) and w.pre_ff is not None and w.post_ff is not None
            window = cfg.layer_window(i)
            cos, sin = (self.local_cos, self.local_sin) if window is not None else (self.cos, self.sin)
            qkv = w.qkv(norm(h, w.in_norm))
            qk_rows = qkv[:, : (nq + nkv) * hd].view(-1, nq + nkv, hd)
            if w.qk_norm is not None:  # before rope, on every kernel path
                qk_rows.copy_(norm(qk_rows, w.qk_norm))
            v = qkv[:, (nq + nkv) * hd :].view(-1, nkv, hd)
            kv = kv_cache[i]
            if native is not None:  # rope on q and k, and k, v into the cache, in one op
                qk = native.rope_store_kv(qkv, positions, cos, sin, kv, meta.slot_mapping, nq, nkv)
                attn = paged_attention(qk[:, :nq], qk[:, nq:], v, kv, meta, write_kv=False, window=window,
                                       scale=scale, softcap=cfg.attn_logit_softcapping)
            else:
                if id(cos) not in rows:
                    rows[id(cos)] = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
                qk = _rope(qk_rows, *rows[id(cos)])
                attn = paged_attention(qk[:, :nq], qk[:, nq:], v, kv, meta, window=window,
                                       scale=scale, softcap=cfg.attn_logit_softcapping)
            h = h + norm(w.o(attn), w.post_norm)
            h = h + norm(w.mlp(norm(h, w.pre_ff)), w.post_ff)
        return h

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab], soft-capped where the config says so."""
        out = self.lm_head(self._gemma_norm(hidden.contiguous(), self.final_norm)).float()
        cap = self.cfg.final_logit_softcapping
        return out if cap is None else torch.tanh(out / cap) * cap

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """LlamaModel's, after Gemma's final norm; None with soft-capped logits (two logits that
        differ may cap to one float32, whose first index would then win)."""
        if not self.lm_head.has_argmax or self.cfg.final_logit_softcapping is not None:
            return None
        return self.lm_head.argmax(self._gemma_norm(hidden.contiguous(), self.final_norm))
