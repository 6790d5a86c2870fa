"""The Llama-family decoder (Llama / SmolLM2, Mistral, Qwen2) as plain torch tensors.

Sliding-window layers (Mistral, Qwen2 with use_sliding_window: `cfg.layer_window(i)`) attend
to the last W positions only, on every attention path (attention.py).

Invariant: `forward` computes one flattened batch — prompt chunks and single decode tokens of
many sequences — in one pass, writing each token's K/V into the paged cache before attention
reads it. Weights are held fused (q|k|v and gate|up) so each layer runs four matmuls.

The other families (qwen3.py, moe.py, phi3.py; families.py picks the class) subclass
`LlamaModel` and override only its hooks: `checkpoint_tensors` (names and splits of the
checkpoint's tensors), `expected_shapes`, `qk_norm` (per-head norms on q and k) and `mlp`
(the dense gate|up/down MLP or another block with the `Mlp` interface). Gemma (gemma.py) reuses
its tensor reading (`read_tensors`), layers and kernel layout but has its own forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .attention import AttentionMetadata, paged_attention
from .config import ModelConfig, ModelLoadError
from .cpu_kernels import KernelPlan
from .int8 import pack_int8
from .int8 import require_kernels as int8_kernels
from .linear import Linear
from .native import Kernels, PrefillAttention, prefill_attention_fits
from .quantized import (
    DEQUANT_ROWS,
    QuantizedWeight,
    QuantLinear,
    cat_rows,
    describe,
    embedding,
    make_linear,
    require_kernels,
)
from .rope import partial_rotary_order, rope_tables

log = logging.getLogger(__name__)
Weight = torch.Tensor | QuantizedWeight


class Mlp(Protocol):
    """A layer's feed-forward block: [T, hidden] -> [T, hidden], over `Linear`s the kernels lay out."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def linears(self) -> list[Linear]: ...


@dataclass
class DenseMlp:
    gate_up: Linear  # gate | up stacked
    down: Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up.silu_mul(x))

    def linears(self) -> list[Linear]:
        return [self.gate_up, self.down]


@dataclass
class FusedDecode:
    """The layer stack as decode_layers.cpp takes it: a decode step's layers in one native call
    (every layer a dense MLP without q/k norms, every matrix on the native bf16 matmul's panels,
    int8 panels or kept as GGUF blocks)."""

    op: Callable[..., torch.Tensor]
    in_norm: list[torch.Tensor]
    post_norm: list[torch.Tensor]
    qkv: list[torch.Tensor]  # bf16 or int8 panels, or GGUF block data
    qkv_bias: list[torch.Tensor | None]
    o: list[torch.Tensor]
    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]
    qtypes: list[int]  # per layer q|k|v, o, gate|up, down: the GGML type of GGUF blocks, -1 bf16 panels, -2 int8
    windows: list[int]  # 0: the whole context
    nq: int
    nkv: int
    ff: int
    scale: float
    eps: float
    max_rows: int | None  # GGUF blocks: larger steps keep the loop, where QuantLinear picks their path

    def runs(self, rows: int) -> bool:
        return self.max_rows is None or rows <= self.max_rows

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kv_cache: torch.Tensor, slot_mapping: torch.Tensor, dslots: torch.Tensor, dlens: torch.Tensor,
                 ) -> torch.Tensor:
        return self.op(h, positions, cos, sin, kv_cache, slot_mapping, dslots, dlens, self.in_norm, self.post_norm,
                       self.qkv, self.qkv_bias, self.o, self.gate_up, self.down, self.qtypes, self.windows, self.nq,
                       self.nkv, self.ff, self.scale, self.eps)


@dataclass
class Layer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear  # q | k | v stacked
    o: Linear
    mlp: Mlp
    qk_norm: torch.Tensor | None = None  # [q heads + kv heads, head_dim]: each head's RMSNorm weight


class LlamaModel:
    graph_safe = True  # a decode step runs with static shapes and no host sync (CUDA graphs may capture it)

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_len: int, device: str = "cpu") -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed: Weight  # a QuantizedWeight with quantization="gguf" (quantized.py)
        self.lm_head: Linear
        self.norm: torch.Tensor
        self.layers: list[Layer] = []
        cos, sin = rope_tables(cfg, max_len, dtype)  # every rope scaling is in them (rope.py)
        self.cos, self.sin = cos.to(self.device), sin.to(self.device)
        self.native: Kernels | None = None  # fused CPU kernels (native.py); None: plain torch ops
        self.prefill_attention: PrefillAttention | None = None  # its prefill kernel, where it runs
        self.fused_decode: FusedDecode | None = None  # decode steps' layers in one native call, where they can
        self.one_row_gemv = False  # one-row steps switch oneDNN off for ATen's GEMV (cpu_gemv.py)
        # the weights kept as GGUF blocks (quantization="gguf"), by name; read_tensors fills it
        self.quantized: dict[str, QuantizedWeight] = {}
        self.int8_isa = ""  # quantization=int8 (use_kernels): the int8 matmul's build: avx512vnni, avx2 or portable

    # ---- loading -------------------------------------------------------------------------
    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor | np.ndarray | QuantizedWeight, Path]], source: Path
    ) -> None:
        cfg = self.cfg
        got = self.read_tensors(weights, source)
        w = self.weight
        self.embed = w(got, "model.embed_tokens.weight")
        self.lm_head = make_linear(w(got, "lm_head.weight"))
        self.norm = got["model.norm.weight"]
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            if cfg.rotary_dim is not None and cfg.qk_norm:
                raise ModelLoadError(f"{source}: rope over part of each head with per-head q/k norms is not supported")
            if cfg.rotary_dim is not None:  # rope over part of each head: see rope.partial_rotary_order
                for x, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
                    if a + f"{x}_proj.weight" in self.quantized:
                        key = a + f"{x}_proj.weight"
                        self.quantized[key] = _reorder_quantized(self.quantized[key], heads, cfg)
                    for kind in ("weight", "bias") if cfg.attention_bias else ("weight",):
                        if a + f"{x}_proj.{kind}" in got:
                            got[a + f"{x}_proj.{kind}"] = _reorder_heads(got[a + f"{x}_proj.{kind}"], heads, cfg)
            bias = torch.cat([got[a + f"{x}_proj.bias"] for x in "qkv"]) if cfg.attention_bias else None
            self.layers.append(Layer(
                in_norm=got[p + "input_layernorm.weight"],
                post_norm=got[p + "post_attention_layernorm.weight"],
                qkv=make_linear(cat_rows([w(got, a + f"{x}_proj.weight") for x in "qkv"], self.dtype), bias),
                o=make_linear(w(got, a + "o_proj.weight")),
                mlp=self.mlp(got, i),
                qk_norm=self.qk_norm(got, i),
            ))

    def read_tensors(
        self, weights: Iterable[tuple[str, torch.Tensor | np.ndarray | QuantizedWeight, Path]], source: Path
    ) -> dict[str, torch.Tensor]:
        """Every tensor of `expected_shapes`, under our names, checked and in the model dtype; the
        GGUF blocks it keeps (`keeps_quantized`) go to `self.quantized` instead (`weight` reads both)."""
        cfg = self.cfg
        expected = self.expected_shapes()
        got: dict[str, torch.Tensor] = {}
        for file_name, value, file in weights:
            if file_name.endswith("rotary_emb.inv_freq"):
                continue
            if isinstance(value, QuantizedWeight):
                value = self._keep_or_dequantize(file_name, value, expected, file)
                if isinstance(value, QuantizedWeight):
                    continue
            tensor = torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value
            for name, t in self.checkpoint_tensors(file_name, tensor, file):
                if name not in expected:
                    raise ModelLoadError(f"{file}: unexpected tensor '{name}' for a {cfg.architecture} model")
                if tuple(t.shape) != expected[name]:
                    raise ModelLoadError(
                        f"{file}: tensor '{name}' has shape {tuple(t.shape)}, expected {expected[name]}"
                    )
                # each tensor goes to the device as it is read: no host copy of the whole model
                got[name] = t.to(device=self.device, dtype=self.dtype).contiguous()
        if cfg.tie_word_embeddings and "model.embed_tokens.weight" in self.quantized:
            self.quantized.setdefault("lm_head.weight", self.quantized["model.embed_tokens.weight"])  # one copy
        if cfg.tie_word_embeddings:
            got.setdefault("lm_head.weight", got.get("model.embed_tokens.weight", torch.empty(0, device=self.device)))
        for name in self.quantized:
            got.pop(name, None)  # a tied float placeholder of a quantized embedding
        missing = [n for n in expected if n not in got and n not in self.quantized]
        if missing:
            raise ModelLoadError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
        return got

    def weight(self, got: dict[str, torch.Tensor], name: str) -> Weight:
        """A weight matrix as loaded: its GGUF blocks if kept, else the float tensor."""
        q = self.quantized.get(name)
        return q if q is not None else got[name]

    def _keep_or_dequantize(self, file_name: str, w: QuantizedWeight, expected: dict[str, tuple[int, ...]],
                            file: Path) -> QuantizedWeight | torch.Tensor:
        """Keep a quantized weight (in `self.quantized`, shape-checked), or its float tensor to read on."""
        pieces = list(self.quantized_tensors(file_name, w, file))
        if not all(self.keeps_quantized(name) for name, _ in pieces):
            return w.dequantize().to(self.dtype)
        for name, piece in pieces:
            if name not in expected:
                raise ModelLoadError(f"{file}: unexpected tensor '{name}' for a {self.cfg.architecture} model")
            if tuple(piece.shape) != expected[name]:
                raise ModelLoadError(
                    f"{file}: tensor '{name}' has shape {tuple(piece.shape)}, expected {expected[name]}")
            self.quantized[name] = piece
        return w

    def keeps_quantized(self, name: str) -> bool:
        """Whether the weight `name` may stay GGUF blocks: the dense matmuls and the embedding, on CPU."""
        dense = name.endswith(("_proj.weight", "embed_tokens.weight", "lm_head.weight")) and ".experts." not in name
        return dense and self.device.type == "cpu"

    # ---- the hooks a family overrides ----------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the model needs (after `checkpoint_tensors`), and its shape."""
        return _expected_shapes(self.cfg)

    def checkpoint_tensors(self, name: str, t: torch.Tensor, file: Path) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors under our names that one checkpoint tensor holds (renamed, or split)."""
        yield name, t

    def quantized_tensors(self, name: str, w: QuantizedWeight, file: Path) -> Iterator[tuple[str, QuantizedWeight]]:
        """`checkpoint_tensors` for a weight kept as GGUF blocks (a split is a split of its rows)."""
        yield name, w

    def qk_norm(self, got: dict[str, torch.Tensor], i: int) -> torch.Tensor | None:
        """Layer i's per-head RMSNorm weights for q and k, [q heads + kv heads, head_dim]; None: no norms."""
        return None

    def mlp(self, got: dict[str, torch.Tensor], i: int) -> Mlp:
        """Layer i's feed-forward block, from the loaded tensors."""
        p = f"model.layers.{i}.mlp."
        gate_up = cat_rows([self.weight(got, p + f"{x}_proj.weight") for x in ("gate", "up")], self.dtype)
        return DenseMlp(gate_up=make_linear(gate_up, gate_up=True),
                        down=make_linear(self.weight(got, p + "down_proj.weight")))

    def use_kernels(self, plan: KernelPlan, int8: bool = False) -> None:
        """Run on the CPU kernels of `plan` (cpu_kernels.py): the native ops or plain torch ones,
        and every weight matrix laid out for the plan's matmul (native panels, which replace the
        plain weight; a oneDNN-packed copy beside it; or nothing for plain F.linear), or, with
        `int8` (quantization="int8"), quantized for the native int8 matmul whatever the plan (int8.py)."""
        self.native = plan.kernels if plan.ops == "native" else None
        cfg = self.cfg
        # the native prefill attention where its build and the head shape have it (else SDPA)
        fits = prefill_attention_fits(self.dtype, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads)
        self.prefill_attention = self.native.prefill_attention if self.native is not None and fits else None
        self.one_row_gemv = plan.one_row_gemv
        linears = [lin for layer in self.layers for lin in (layer.qkv, layer.o, *layer.mlp.linears())]
        linears.append(self.lm_head)
        k = plan.kernels
        if self.quantized:  # the GGUF blocks need the native quantized matmul, whatever the plan
            require_kernels()
            log.info("weights kept as GGUF blocks (quantization=gguf): %s", describe(linears))
        if int8:
            k8 = int8_kernels()
            assert k8.int8_linear is not None and k8.int8_linear_silu_mul is not None
            # an MoE router stays float: it picks each token's experts, where int8's error would
            # send tokens elsewhere, and it is a sliver of the work
            routers = {id(r) for layer in self.layers if (r := getattr(layer.mlp, "router", None)) is not None}
            quantized_linears = [lin for lin in linears if id(lin) not in routers]
            for lin in quantized_linears:
                if lin.weight is None:
                    raise ModelLoadError("quantization=int8 takes float weights (not GGUF blocks kept as such)")
                if lin.in_features % 4:
                    raise ModelLoadError(f"the int8 matmul takes inputs in fours, a weight has {lin.in_features}")
                lin.use_int8(pack_int8(lin.weight, lin.gate_up), k8.int8_linear, k8.int8_linear_silu_mul)
            self.int8_isa = k8.int8_isa
            log.info("%d weight matrices quantized to int8 per output channel (quantization=int8, %s matmul)",
                     len(quantized_linears), k8.int8_isa)
        for lin in linears:
            if lin.int8:
                continue
            if plan.matmul == "native":
                assert k is not None and k.linear is not None and k.linear_silu_mul is not None
                if not lin.pack_native(k.linear, k.linear_silu_mul, k.linear_argmax):
                    raise ModelLoadError(f"the native matmul cannot take a {lin.in_features}-wide weight")
            elif plan.matmul == "onednn":
                lin.pack()
        self.fused_decode = self._fuse_decode(plan)

    def _fuse_decode(self, plan: KernelPlan) -> FusedDecode | None:
        """The layers for decode_layers.cpp, where every part it runs is what forward would run:
        native ops, every matrix on the native bf16 or int8 panels or GGUF blocks, dense MLPs, no q/k
        norms, no biases but q/k/v's."""
        k, cfg = plan.kernels, self.cfg
        if plan.ops != "native" or k is None or k.decode_layers is None:
            return None
        dense = [layer.mlp for layer in self.layers if isinstance(layer.mlp, DenseMlp)]
        if len(dense) != len(self.layers) or any(layer.qk_norm is not None for layer in self.layers):
            return None
        matrices = [lin for layer, m in zip(self.layers, dense, strict=True)
                    for lin in (layer.qkv, layer.o, m.gate_up, m.down)]
        if (any(not isinstance(lin, QuantLinear) and lin.panels is None for lin in matrices)
                or any(lin.bias is not None for i, lin in enumerate(matrices) if i % 4)
                or len({m.gate_up.out_features for m in dense}) != 1):
            return None

        def data(lin: Linear) -> torch.Tensor:
            if isinstance(lin, QuantLinear):
                return lin.qweight.data
            assert lin.panels is not None
            return lin.panels

        return FusedDecode(
            k.decode_layers, [layer.in_norm for layer in self.layers], [layer.post_norm for layer in self.layers],
            [data(layer.qkv) for layer in self.layers], [layer.qkv.bias for layer in self.layers],
            [data(layer.o) for layer in self.layers], [data(m.gate_up) for m in dense], [data(m.down) for m in dense],
            [lin.qweight.ggml_type if isinstance(lin, QuantLinear) else -2 if lin.int8 else -1 for lin in matrices],
            [cfg.layer_window(i) or 0 for i in range(cfg.num_layers)], cfg.num_heads, cfg.num_kv_heads,
            dense[0].gate_up.out_features // 2, cfg.head_dim**-0.5, cfg.rms_norm_eps,
            DEQUANT_ROWS if any(isinstance(lin, QuantLinear) for lin in matrices) else None)

    # ---- compute -------------------------------------------------------------------------
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
        if native is None:
            cos = self.cos[positions].unsqueeze(1)
            sin = self.sin[positions].unsqueeze(1)
        h = embedding(input_ids, self.embed, self.dtype)
        if on_launch is not None:
            on_launch()
        # every row a decode token and the native kernels loaded: attention is the kernel alone,
        # called here (no paged_attention around it: a few ops fewer per layer)
        decode: tuple[torch.Tensor, torch.Tensor] | None = None
        if (native is not None and not meta.prefills and meta.num_decode == len(input_ids)
                and meta.decode_slots is not None and meta.decode_ctx_lens is not None):
            decode = (meta.decode_slots, meta.decode_ctx_lens)
        if decode is not None and self.fused_decode is not None and self.fused_decode.runs(len(input_ids)):
            # the same layers, looped in C++
            return self.fused_decode(h, positions, self.cos, self.sin, kv_cache, meta.slot_mapping, *decode)
        delta: torch.Tensor | None = None  # the previous layer's MLP output, not yet added to h
        for i, w in enumerate(self.layers):
            window = cfg.layer_window(i)
            h, x = self._add_norm(h, delta, w.in_norm)
            qkv = w.qkv(x)
            if w.qk_norm is not None:  # before rope, on every kernel path: q and k rows normalised in place
                qk_rows = qkv[:, : (nq + nkv) * hd].view(-1, nq + nkv, hd)
                normed = F.rms_norm(qk_rows.float(), (hd,), eps=cfg.rms_norm_eps).to(qkv.dtype) * w.qk_norm
                qk_rows.copy_(normed)
            kv = kv_cache[i]
            if native is not None:  # rope on q and k, and k, v into the cache, in one op
                qk = native.rope_store_kv(qkv, positions, self.cos, self.sin, kv, meta.slot_mapping, nq, nkv)
                if decode is not None:
                    attn = native.decode_attention(qk[:, :nq], kv, *decode, hd**-0.5, window).view(-1, nq * hd)
                else:
                    v = qkv[:, (nq + nkv) * hd :].view(-1, nkv, hd)
                    attn = paged_attention(qk[:, :nq], qk[:, nq:], v, kv, meta, write_kv=False, window=window)
            else:
                qk = _rope(qkv[:, : (nq + nkv) * hd].view(-1, nq + nkv, hd), cos, sin)  # q and k in one pass
                v = qkv[:, (nq + nkv) * hd :].view(-1, nkv, hd)
                attn = paged_attention(qk[:, :nq], qk[:, nq:], v, kv, meta, window=window)
            h, x = self._add_norm(h, w.o(attn), w.post_norm)
            delta = w.mlp(x)
        return h if delta is None else h + delta

    def _add_norm(
        self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, rms_norm(h + delta) * weight); the native kernel adds into h in place."""
        eps = self.cfg.rms_norm_eps
        if self.native is not None:
            return h, self.native.add_rms_norm_(h, delta, weight, eps)
        if delta is not None:
            h = h + delta
        return h, F.rms_norm(h, (self.cfg.hidden_size,), weight, eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] for the given rows of hidden states."""
        _, x = self._add_norm(hidden.contiguous(), None, self.norm)
        return self.lm_head(x).float()

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Each row's index of its largest logit — the token greedy sampling takes of `logits(hidden)`,
        the first of equal logits — found without storing the logits, where the lm_head's kernel can
        (native bf16 panels: `Linear.argmax`); else None. A 64-row decode step of the default model
        (2-core Zen 5, AVX512-BF16): lm_head, logits and argmax 4.8 -> 3.7 ms."""
        if not self.lm_head.has_argmax:
            return None
        _, x = self._add_norm(hidden.contiguous(), None, self.norm)
        return self.lm_head.argmax(x)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv, ff = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (cfg.vocab_size, h),
    }
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (ff, h),
            p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
        })
        if cfg.attention_bias:
            for x, n in (("q", q), ("k", kv), ("v", kv)):
                shapes[p + f"self_attn.{x}_proj.bias"] = (n,)
    return shapes


def _reorder_quantized(w: QuantizedWeight, heads: int, cfg: ModelConfig) -> QuantizedWeight:
    """`_reorder_heads` of a projection weight's GGUF block rows (a row permutation)."""
    return w.rows(_reorder_heads(torch.arange(w.shape[0]), heads, cfg))


def _reorder_heads(t: torch.Tensor, heads: int, cfg: ModelConfig) -> torch.Tensor:
    """The rows of a q or k projection (weight or bias) with each head's dims in
    rope.partial_rotary_order."""
    assert cfg.rotary_dim is not None
    order = partial_rotary_order(cfg.head_dim, cfg.rotary_dim)
    rows = t.reshape(heads, cfg.head_dim, *t.shape[1:])
    return rows[:, order].reshape(t.shape).contiguous()
