"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks each token's top-k experts.

Routing maths (as transformers 5 computes it): router logits = x @ gate^T; softmax over all
experts in float32; the top k probabilities, renormalised to sum to one when
`cfg.norm_topk_prob` (always for Mixtral); each chosen expert's silu(x gate_e^T) * (x up_e^T)
@ down_e^T, weighted by its probability and summed.

Invariants:
- Routing is one batched top-k over all T tokens; the T*k (token, expert) pairs are sorted by
  expert, each expert with tokens runs one fused gate|up matmul and one down matmul over its
  group, and the weighted rows are scatter-added back (`index_add_`) in expert order. The only
  Python loop is over experts, never over tokens.
- Each expert's weights are held once, as a `Linear` pair like a dense MLP's, so every CPU kernel
  path (native panels, oneDNN packing, plain torch) lays them out as it does a dense layer.
- Checkpoint names accepted: per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` (Qwen3-MoE,
  and what transformers 5.25's `save_pretrained` writes for both), Mixtral's
  `block_sparse_moe.{gate,experts.{e}.w1|w3|w2}.weight`, and stacked [E, ...] tensors —
  transformers' in-memory `mlp.experts.gate_up_proj` / `down_proj`, and GGUF's
  `ffn_{gate,up,down}_exps` (named `mlp.experts.{gate,up,down}_proj` by gguf_file.py).
  All are split per expert on loading; a layer in `cfg.dense_layers` keeps the dense MLP.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelLoadError
from .linear import Linear
from .llama import DenseMlp, LlamaModel, Mlp
from .qwen3 import QkNormModel

_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_STACKED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|gate_proj|up_proj|down_proj)$")


@dataclass
class MoeMlp:
    router: Linear  # [experts, hidden]
    experts: list[DenseMlp]
    top_k: int
    renormalise: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [T, k] each
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        rows = order // self.top_k  # each pair's token
        pair_weights = weights.reshape(-1)[order].to(x.dtype).unsqueeze(1)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n:
                group = rows[start : start + n]
                out.index_add_(0, group, expert(x[group]) * pair_weights[start : start + n])
                start += n
        return out

    def linears(self) -> list[Linear]:
        return [self.router, *(lin for e in self.experts for lin in e.linears())]


class MoeModel(LlamaModel):
    """A `LlamaModel` whose MLPs (but those of `cfg.dense_layers`) are mixtures of experts."""

    graph_safe = False  # tokens are grouped by expert on the host (bincount().tolist())

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.cfg
        shapes = super().expected_shapes()
        h, ff = cfg.hidden_size, cfg.moe_intermediate_size
        for i in range(cfg.num_layers):
            if not cfg.is_moe_layer(i):
                continue
            p = f"model.layers.{i}.mlp."
            for dense in ("gate_proj", "up_proj", "down_proj"):
                del shapes[p + dense + ".weight"]
            shapes[p + "gate.weight"] = (cfg.num_experts, h)
            for e in range(cfg.num_experts):
                q = f"{p}experts.{e}."
                shapes.update({q + "gate_proj.weight": (ff, h), q + "up_proj.weight": (ff, h),
                               q + "down_proj.weight": (h, ff)})
        return shapes

    def checkpoint_tensors(self, name: str, t: torch.Tensor, file: Path) -> Iterator[tuple[str, torch.Tensor]]:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        parts = name.split(".")
        if len(parts) == 8 and parts[3:5] == ["mlp", "experts"] and parts[6] in _MIXTRAL_EXPERT:
            parts[6] = _MIXTRAL_EXPERT[parts[6]]  # model.layers.N.mlp.experts.E.w1 -> ...gate_proj
            name = ".".join(parts)
        m = _STACKED.match(name.removesuffix(".weight"))
        if m is None:
            yield from super().checkpoint_tensors(name, t, file)
            return
        base, kind = m.groups()
        cfg = self.cfg
        h, ff, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        want = {"gate_up_proj": (n, 2 * ff, h), "down_proj": (n, h, ff)}.get(kind, (n, ff, h))
        if tuple(t.shape) != want:
            raise ModelLoadError(f"{file}: tensor '{name}' has shape {tuple(t.shape)}, expected {want}")
        for e in range(n):
            if kind == "gate_up_proj":
                yield f"{base}.{e}.gate_proj.weight", t[e, :ff]
                yield f"{base}.{e}.up_proj.weight", t[e, ff:]
            else:
                yield f"{base}.{e}.{kind}.weight", t[e]

    def mlp(self, got: dict[str, torch.Tensor], i: int) -> Mlp:
        cfg = self.cfg
        if not cfg.is_moe_layer(i):
            return super().mlp(got, i)
        p = f"model.layers.{i}.mlp."
        experts = []
        for e in range(cfg.num_experts):
            q = f"{p}experts.{e}."
            gate_up = torch.cat([got.pop(q + "gate_proj.weight"), got.pop(q + "up_proj.weight")])
            experts.append(DenseMlp(Linear(gate_up, gate_up=True), Linear(got.pop(q + "down_proj.weight"))))
        return MoeMlp(Linear(got[p + "gate.weight"]), experts, cfg.num_experts_per_tok, cfg.norm_topk_prob)


class MixtralModel(MoeModel):
    """MixtralForCausalLM (GGUF `llama` with `llama.expert_count`)."""


class Qwen3MoeModel(QkNormModel, MoeModel):
    """Qwen3MoeForCausalLM (GGUF `qwen3moe`): Qwen3's q/k norms and the MoE MLP."""
