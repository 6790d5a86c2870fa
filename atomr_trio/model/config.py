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
    sliding_window: int | None = None
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

    @staticmethod
    def from_hf_dir(path: Path) -> ModelConfig:
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{cfg_path}: no config.json in the model directory")
        cfg = json.loads(cfg_path.read_text())
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"{cfg_path}: field 'architectures' = {archs!r} is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
            )

        def need(key: str) -> Any:
            if key not in cfg:
                raise ModelLoadError(f"{cfg_path}: missing field '{key}'")
            return cfg[key]

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
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads", num_heads)),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=rope_scaling,
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            **_family_fields(arch, cfg, need),
        )

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers

    @property
    def max_model_len(self) -> int:
        """Longest sequence the model serves correctly (sliding-window attention is not used);
        dynamic and yarn rope scaling extend `max_position_embeddings` (rope.context_limit)."""
        from .rope import context_limit  # rope.py imports this module

        if self.sliding_window:
            return min(context_limit(self), self.sliding_window)
        return context_limit(self)


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
    return {}
