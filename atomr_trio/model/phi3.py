"""Phi-3 / Phi-4-mini: the Llama decoder with q|k|v and gate|up fused in the checkpoint.

Invariants: `self_attn.qkv_proj.weight` is q rows, then k rows, then v rows, and
`mlp.gate_up_proj.weight` is the gate rows, then the up rows — the layouts `LlamaModel` keeps
fused — so they are split into the Llama names on loading (and concatenated again there),
after their shapes are checked against the config. GGUF `phi3` files hold the same tensors as
`attn_qkv` and `ffn_up` (gguf_file.py names them `qkv_proj` / `gate_up_proj`); kept as GGUF
blocks (quantization="gguf") they split the same way, by rows (`quantized_tensors`). Rope scaling
(`longrope`) is rope.py's concern: the config passes `rope_scaling` through untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ModelLoadError
from .llama import LlamaModel
from .quantized import QuantizedWeight


class Phi3Model(LlamaModel):
    """Phi3ForCausalLM (GGUF `phi3`)."""

    def checkpoint_tensors(self, name: str, t: torch.Tensor, file: Path) -> Iterator[tuple[str, torch.Tensor]]:
        split = self._split(name, t, file)
        if split is None:
            yield name, t
            return
        names, sizes = split
        yield from zip(names, torch.split(t, sizes), strict=True)

    def quantized_tensors(self, name: str, w: QuantizedWeight, file: Path) -> Iterator[tuple[str, QuantizedWeight]]:
        split = self._split(name, w, file)
        if split is None:
            yield name, w
            return
        names, sizes = split
        starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        for part, a, b in zip(names, starts, starts[1:], strict=False):
            yield part, w.rows(torch.arange(a, b))

    def _split(self, name: str, t: torch.Tensor | QuantizedWeight, file: Path) -> tuple[list[str], list[int]] | None:
        """The names and row counts a fused tensor splits into (shape-checked); None: not fused."""
        cfg = self.cfg
        prefix, _, leaf = name.rpartition(".")
        parts: tuple[str, ...]
        if prefix.endswith("self_attn.qkv_proj"):
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            sizes, parts = [q, kv, kv], ("q_proj", "k_proj", "v_proj")
        elif prefix.endswith("mlp.gate_up_proj"):
            sizes, parts = [cfg.intermediate_size] * 2, ("gate_proj", "up_proj")
        else:
            return None
        if t.shape[0] != sum(sizes) or (leaf == "weight" and (t.dim() != 2 or t.shape[1] != cfg.hidden_size)):
            want = (sum(sizes), cfg.hidden_size) if leaf == "weight" else (sum(sizes),)
            raise ModelLoadError(f"{file}: tensor '{name}' has shape {tuple(t.shape)}, expected {want}")
        base = prefix.rpartition(".")[0]
        return [f"{base}.{part}.{leaf}" for part in parts], sizes
