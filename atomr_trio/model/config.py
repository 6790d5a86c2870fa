"""ModelConfig: the shape of a Llama-family decoder, read from an HF config.json or GGUF metadata.

Invariant: every field the model needs is set explicitly; a missing or unsupported value raises
`ModelLoadError` naming the field and the file, never a silent default that changes the maths
(rope_theta is read from both `rope_theta` and `rope_parameters.rope_theta`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Phi3ForCausalLM": "phi3",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the field or tensor and the file."""


class UnsupportedModel(ModelLoadError):
    """The model is well formed but asks for what this server does not implement (an
    architecture, a rope type, a tokenizer kind); the message names it and what is supported."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a value of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    rotary_dim: int | None = None  # rope over the first rotary_dim dims of each head (None: all)
    sliding_window: int | None = None  # the window of every layer not in `full_attention_layers`
    full_attention_layers: tuple[int, ...] = ()  # layers that see the whole context despite a window
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # the other families (qwen3.py, moe.py, phi3.py): RMSNorm per head on q and k before rope
    qk_norm: bool = False
    # mixture of experts: 0 experts is a dense model; an MoE layer's experts are
    # `moe_intermediate_size` wide, and the layers in `dense_layers` keep the dense MLP
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()
    # Gemma 2 / 3 (gemma.py): scores scaled by query_pre_attn_scalar ** -0.5, tanh soft-capping of
    # the attention scores and of the final logits (None: none), and Gemma 3's rope base for
    # its sliding layers (the global layers keep rope_theta and rope_scaling)
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_theta: float | None = None

    @staticmethod
    def from_hf_dir(path: Path) -> ModelConfig:
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{cfg_path}: no config.json in the model directory")
        cfg = json.loads(cfg_path.read_text())
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModel(
                f"{cfg_path}: field 'architectures' = {archs!r} is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
            )

        def need(key: str) -> Any:
            if key not in cfg:
                raise ModelLoadError(f"{cfg_path}: missing field '{key}'")
            return cfg[key]

        rope_params = cfg.get("rope_parameters") or {}
        if arch == "gemma3":  # transformers 5 keeps one rope dict per layer kind
            cfg = _gemma3_rope(cfg, cfg_path)
            rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta"))
        if rope_theta is None:
            rope_theta = 10000.0  # the Llama paper's value, and HF's documented default
        from .rope import rope_scaling_from_hf  # rope.py imports this module

        rope_scaling = rope_scaling_from_hf(cfg, cfg_path)
        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        sliding = cfg.get("sliding_window")
        if arch == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        if arch == "gemma3" and cfg.get("use_bidirectional_attention"):  # EmbeddingGemma: an encoder
            raise UnsupportedModel(f"{cfg_path}: field 'use_bidirectional_attention' = true is not supported "
                                 "(causal decoders only)")
        num_layers = int(need("num_hidden_layers"))
        eos = cfg.get("eos_token_id")
        gen_path = path / "generation_config.json"
        if gen_path.is_file():
            eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ModelConfig(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads", num_heads)),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=rope_scaling,
            rotary_dim=_rotary_dim(cfg, rope_scaling_params(cfg), int(cfg.get("head_dim") or hidden // num_heads),
                                   cfg_path),
            sliding_window=int(sliding) if sliding else None,
            full_attention_layers=_full_attention_layers(arch, cfg, num_layers) if sliding else (),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            **_family_fields(arch, cfg, need),
        )

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers

    def layer_window(self, i: int) -> int | None:
        """Layer i's sliding window (it sees the last W positions, itself included); None: all."""
        return None if self.sliding_window is None or i in self.full_attention_layers else self.sliding_window

    @property
    def window_of_every_layer(self) -> int | None:
        """The sliding window when every layer has it (older K/V is then never read); else None."""
        return self.sliding_window if not self.full_attention_layers else None

    @property
    def max_model_len(self) -> int:
        """Longest sequence the model serves correctly: sliding windows are attended as such, so
        only the rope bounds it; dynamic and yarn rope scaling extend `max_position_embeddings`
        (rope.context_limit)."""
        from .rope import context_limit  # rope.py imports this module

        return context_limit(self)


def _full_attention_layers(arch: str, cfg: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """The layers that ignore a configured sliding window: `layer_types` where the config lists
    them, else each family's rule as transformers applies it (Mistral: none)."""
    kinds = cfg.get("layer_types")
    if kinds:
        return tuple(i for i, kind in enumerate(kinds) if kind != "sliding_attention")
    if arch == "qwen2":  # the first max_window_layers layers are global
        return tuple(range(min(num_layers, int(cfg.get("max_window_layers", 28)))))
    if arch in ("gemma2", "gemma3"):  # every n-th layer is global (Gemma 2: every other one)
        n = 2 if arch == "gemma2" else int(cfg.get("sliding_window_pattern", 6))
        return tuple(i for i in range(num_layers) if (i + 1) % n == 0)
    return ()


def _gemma3_rope(cfg: dict[str, Any], cfg_path: Path) -> dict[str, Any]:
    """A Gemma 3 config with its global layers' rope as `rope_theta` / `rope_scaling` and its
    sliding layers' base as `rope_local_base_freq` (transformers 5 writes both as
    rope_parameters = {"full_attention": {...}, "sliding_attention": {...}})."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" not in params:
        return cfg
    out = dict(cfg)
    full = dict(params["full_attention"] or {})
    local = params.get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
        raise UnsupportedModel(f"{cfg_path}: field 'rope_parameters.sliding_attention' = {local!r}: "
                             "scaled rope on the sliding layers is not supported")
    out.pop("rope_parameters")
    if out.get("rope_theta") is None:
        out["rope_theta"] = full.pop("rope_theta", None)
    if out.get("rope_local_base_freq") is None:
        out["rope_local_base_freq"] = local.get("rope_theta")
    if out.get("rope_scaling") is None and full.get("rope_type", "default") != "default":
        out["rope_scaling"] = full
    return out


def _family_fields(arch: str, cfg: dict[str, Any], need: Any) -> dict[str, Any]:
    """The fields beyond the Llama decoder's that `arch`'s config.json sets."""
    if arch == "qwen3":
        return {"qk_norm": True}
    if arch == "mixtral":
        return {"num_experts": int(need("num_local_experts")), "num_experts_per_tok": int(need("num_experts_per_tok")),
                "moe_intermediate_size": int(need("intermediate_size")), "norm_topk_prob": True}
    if arch == "qwen3_moe":
        # released checkpoints say num_experts; transformers 5 saves it as num_local_experts
        n = int(cfg["num_experts"] if "num_experts" in cfg else need("num_local_experts"))
        step = int(cfg.get("decoder_sparse_step", 1))
        only_dense = {int(i) for i in cfg.get("mlp_only_layers") or []}
        dense = tuple(i for i in range(int(need("num_hidden_layers")))
                      if i in only_dense or step <= 0 or (i + 1) % step != 0)
        return {"qk_norm": True, "num_experts": n, "num_experts_per_tok": int(need("num_experts_per_tok")),
                "moe_intermediate_size": int(need("moe_intermediate_size")),
                "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)), "dense_layers": dense}
    if arch in ("gemma2", "gemma3"):
        soft = {key: float(cfg[key]) if cfg.get(key) is not None else None
                for key in ("attn_logit_softcapping", "final_logit_softcapping")}
        local = cfg.get("rope_local_base_freq", 10000.0) if arch == "gemma3" else None
        return {"query_pre_attn_scalar": float(need("query_pre_attn_scalar")), **soft,
                "qk_norm": arch == "gemma3", "rope_local_theta": float(local) if local is not None else None}
    return {}


def rope_scaling_params(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}


def _rotary_dim(cfg: dict[str, Any], params: dict[str, Any], head_dim: int, cfg_path: Path) -> int | None:
    """`partial_rotary_factor` (Phi-4-mini: 0.75) as the number of rotated dims per head."""
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if factor is None or float(factor) == 1.0:
        return None
    exact = head_dim * float(factor)
    dim = round(exact)
    if abs(exact - dim) > 1e-6 or not 0 < dim < head_dim or dim % 2 or (head_dim - dim) % 2:
        raise UnsupportedModel(f"{cfg_path}: field 'partial_rotary_factor' = {factor} gives {dim} rotated dims of "
                             f"{head_dim}; an even number below head_dim with an even remainder is needed")
    return dim
