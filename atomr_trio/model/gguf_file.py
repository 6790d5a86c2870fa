"""Read a Llama-family GGUF file: config, dequantized weights under HF names, tokenizer pieces.

Invariant: weights come out exactly as an HF checkpoint would hold them — llama.cpp's row
permutation of attn_q / attn_k (llama architecture only, Mixtral included; qwen2/qwen3/phi3
files are not permuted) is undone here, nowhere else. Tensors with no single HF counterpart
keep a name the family module splits: phi3's `attn_qkv` / `ffn_up` (gate|up) become
`self_attn.qkv_proj` / `mlp.gate_up_proj` (phi3.py), stacked `ffn_*_exps` [E, ...] become
`mlp.experts.{gate,up,down}_proj.weight` (moe.py). Rope scaling comes out as an HF config's
would (ModelConfig.rope_scaling, read by rope.py), the rope factor tensors (rope_freqs,
rope_factors_long/short) included: they are config, not weights.

Gemma (`gemma2`, `gemma3`): llama.cpp stores every norm weight as 1 + w (the HF checkpoint's
w); 1 is taken off again here. Its `ffn_norm` is the pre-feedforward norm, `post_attention_norm`
and `post_ffw_norm` the norms after attention and MLP. The files do not hold
query_pre_attn_scalar, the sliding pattern nor (older files) the local rope base: as llama.cpp,
the scale is head_dim (hidden / heads for the 27B models: 46 layers for Gemma 2, 62 for Gemma 3),
every other layer slides (Gemma 2) or five of every six (Gemma 3, unless the file gives
`sliding_window_pattern`), and the local base is `rope.freq_base_swa` or 10000.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig, ModelLoadError, UnsupportedModel
from .gguf_header import GGUFHeader
from .quantized import KEPT, QuantizedWeight, from_gguf
from .rope import yarn_attention_factor

# general.architecture -> ModelConfig.architecture ("llama" with llama.expert_count > 0 is Mixtral)
_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
          "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3"}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_PHI3_NAMES = {**_LAYER_NAMES, "ffn_up": "mlp.gate_up_proj"}  # phi3's ffn_up holds gate|up
_GEMMA_NAMES = {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's test for the 27B attention scale
_EXPERT_NAMES = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass
class GGUFTokenizerData:
    """The tokenizer a GGUF describes, under llama.cpp's `tokenizer.ggml.*` keys, as read: ids
    index `tokens`; `scores` / `token_types` / `merges` are empty when the file has none;
    `add_bos_token` / `add_space_prefix` are None when the file does not say (the default then
    depends on the vocabulary kind, text/tokenizer.py decides)."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SentencePiece), ...
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool | None
    chat_template: str | None
    scores: list[float] = field(default_factory=list)
    add_eos_token: bool = False
    add_space_prefix: bool | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    eot_token_id: int | None = None  # end of turn / end of message: generation stops there too
    eom_token_id: int | None = None
    architecture: str = ""  # general.architecture (Gemma's SentencePiece files differ)


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._reader = GGUFHeader(path)
        except Exception as e:  # a truncated or foreign file
            raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from e
        arch = self.field("general.architecture")
        if arch not in _ARCHS:
            raise UnsupportedModel(
                f"{path}: field 'general.architecture' = {arch!r} is not supported "
                f"(supported: {', '.join(sorted(_ARCHS))})"
            )
        self.arch: str = arch

    def field(self, key: str, default: Any = ...) -> Any:
        f = self._reader.fields.get(key)
        if f is None:
            if default is ...:
                raise ModelLoadError(f"{self.path}: missing metadata field '{key}'")
            return default
        return f

    def config(self) -> ModelConfig:
        a = self.arch
        n_heads = int(self.field(f"{a}.attention.head_count"))
        hidden = int(self.field(f"{a}.embedding_length"))
        names = {t.name for t in self._reader.tensors}
        tokens = self.field("tokenizer.ggml.tokens", None)
        vocab = int(self.field(f"{a}.vocab_size", len(tokens) if tokens else 0))
        eos = self.field("tokenizer.ggml.eos_token_id", None)
        n_layers = int(self.field(f"{a}.block_count"))
        ffn = int(self.field(f"{a}.feed_forward_length", 0))
        experts = int(self.field(f"{a}.expert_count", 0))
        arch = "mixtral" if a == "llama" and experts else _ARCHS[a]
        head_dim = int(self.field(f"{a}.attention.key_length", hidden // n_heads))
        rot = self.field(f"{a}.rope.dimension_count", None)
        rotary_dim = int(rot) if rot is not None and int(rot) != head_dim else None  # Phi-4-mini: 3/4 of a head
        if rotary_dim is not None and (not 0 < rotary_dim < head_dim or rotary_dim % 2 or (head_dim - rotary_dim) % 2):
            raise UnsupportedModel(f"{self.path}: field '{a}.rope.dimension_count' = {rot} is not supported "
                                 f"(an even number of dims below the head's {head_dim}, with an even remainder)")
        moe: dict[str, Any] = {}
        if experts:
            moe = {
                "num_experts": experts,
                "num_experts_per_tok": int(self.field(f"{a}.expert_used_count")),
                "moe_intermediate_size": int(self.field(f"{a}.expert_feed_forward_length", ffn)),
                "norm_topk_prob": bool(self.field(f"{a}.expert_weights_norm", True)),
                "dense_layers": tuple(i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in names),
            }
        return ModelConfig(
            **self._gemma_fields(n_layers, hidden // n_heads, head_dim),
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            # an all-MoE file may give only the experts' width
            intermediate_size=ffn or moe.get("moe_intermediate_size") or int(self.field(f"{a}.feed_forward_length")),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=int(self.field(f"{a}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self.field(f"{a}.context_length")),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            rope_scaling=self.rope_scaling(),
            rotary_dim=rotary_dim,
            bos_token_id=self.field("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=(int(eos),) if eos is not None else (),
            qk_norm="blk.0.attn_q_norm.weight" in names,
            **moe,
        )

    def _gemma_fields(self, n_layers: int, hidden_per_head: int, head_dim: int) -> dict[str, Any]:
        """The Gemma fields of ModelConfig (none for the other architectures)."""
        a = self.arch
        if a not in _GEMMA_27B_LAYERS:
            return {}
        window = self.field(f"{a}.attention.sliding_window", None)
        pattern = int(self.field(f"{a}.attention.sliding_window_pattern", 2 if a == "gemma2" else 6))
        caps = {key: float(v) if (v := self.field(f"{a}.{key}", None)) is not None else None
                for key in ("attn_logit_softcapping", "final_logit_softcapping")}
        from .config import _full_attention_layers

        return {
            "sliding_window": int(window) if window else None,
            "full_attention_layers": _full_attention_layers(a, {"sliding_window_pattern": pattern}, n_layers)
            if window else (),
            "query_pre_attn_scalar": float(hidden_per_head if n_layers == _GEMMA_27B_LAYERS[a] else head_dim),
            "rope_local_theta": float(self.field(f"{a}.rope.freq_base_swa", 10000.0)) if a == "gemma3" else None,
            **caps,
        }

    def rope_scaling(self) -> dict[str, Any] | None:
        """The rope scaling as an HF-style dict (rope.py): from `{arch}.rope.scaling.*` (type none,
        linear, yarn or longrope, the last with its `rope_factors_long/short` tensors), and the
        `rope_freqs` tensor of Llama 3.1+ files (their llama3 scaling, as one divisor per
        frequency) as `freq_factors`. None for plain rope."""
        a, key = self.arch, f"{self.arch}.rope.scaling"
        kind = self.field(f"{key}.type", None)
        factor = self.field(f"{key}.factor", None)
        if kind is None and self.field(f"{a}.rope.scale_linear", None) is not None:  # older files
            kind, factor = "linear", self.field(f"{a}.rope.scale_linear")
        original = self.field(f"{key}.original_context_length", None)
        attn = self.field(f"{key}.attn_factor", None)  # llama.cpp multiplies it into the attention factor
        params: dict[str, Any] = {}
        if kind == "linear" and factor is not None and float(factor) != 1.0:
            params = {"rope_type": "linear", "factor": float(factor)}
        elif kind == "yarn":
            params = {"rope_type": "yarn", "factor": float(self.field(f"{key}.factor"))}
            if original is not None:
                params["original_max_position_embeddings"] = int(original)
            for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                                     ("yarn_attn_factor", "attention_factor")):
                if (value := self.field(f"{key}.{gguf_key}", None)) is not None:
                    params[hf_key] = float(value)
            if float(self.field(f"{key}.yarn_ext_factor", 1.0)) != 1.0:  # transformers' yarn has no such knob
                raise UnsupportedModel(f"{self.path}: field '{key}.yarn_ext_factor' other than 1 is not supported")
            log_mul = float(self.field(f"{key}.yarn_log_multiplier", 0.0))
            if log_mul:  # llama.cpp: the attention factor is mscale(1) / mscale(yarn_log_multiplier)
                params.update(mscale=1.0, mscale_all_dim=log_mul)
            if attn is not None and float(attn) != 1.0:
                max_positions = int(self.field(f"{a}.context_length"))
                params["attention_factor"] = yarn_attention_factor(params, max_positions) * float(attn)
        elif kind == "longrope":
            params = {"rope_type": "longrope", "long_factor": self._tensor_values("rope_factors_long.weight"),
                      "short_factor": self._tensor_values("rope_factors_short.weight")}
            if original is not None:
                params["original_max_position_embeddings"] = int(original)
            if attn is not None:
                params["attention_factor"] = float(attn)
        elif kind not in (None, "none", "linear"):
            raise UnsupportedModel(
                f"{self.path}: field '{key}.type' = {kind!r} is not supported (supported: none, linear, yarn, longrope)"
            )
        elif attn is not None and float(attn) != 1.0:
            raise ModelLoadError(f"{self.path}: field '{key}.attn_factor' = {attn} is supported with yarn and "
                                 f"longrope only, not with scaling type {kind or 'none'!r}")
        if any(t.name == "rope_freqs.weight" for t in self._reader.tensors):
            params.setdefault("rope_type", "default")
            params["freq_factors"] = self._tensor_values("rope_freqs.weight")
        return params or None

    def weights(
        self, cfg: ModelConfig, quantization: str = "none"
    ) -> Iterator[tuple[str, np.ndarray | QuantizedWeight]]:
        """Yield (hf_name, float32 array) for every tensor, dequantized; with quantization="gguf"
        the 2-D Q8_0 / Q4_0 / Q4_1 / Q4_K tensors come as their raw blocks (QuantizedWeight,
        quantized.py), rows in the same order a dequantized tensor's would be."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        for t in self._reader.tensors:
            qtype = GGMLQuantizationType(t.ggml_type)
            gemma = self.arch in _GEMMA_27B_LAYERS
            names = _PHI3_NAMES if self.arch == "phi3" else _GEMMA_NAMES if gemma else _LAYER_NAMES
            name = _hf_name(t.name, names)
            if name is None:
                continue  # e.g. rope_freqs and rope_factors_*: in the config's rope_scaling (rope_scaling())
            if quantization == "gguf" and t.ggml_type in KEPT and len(t.shape) == 2 and not gemma:
                yield name, self._raw(t, cfg)
                continue
            try:
                arr = dequantize(t.data, qtype)
            except NotImplementedError as e:
                raise ModelLoadError(
                    f"{self.path}: tensor '{t.name}' has type {qtype.name}, "
                    f"which cannot be dequantized ({e})"
                ) from e
            arr = np.asarray(arr, dtype=np.float32).reshape(tuple(reversed(t.shape)))
            if self.arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg.num_heads if "attn_q" in t.name else cfg.num_kv_heads
                arr = _unpermute(arr, heads)
            if gemma and name.endswith("norm.weight"):  # llama.cpp holds 1 + w
                arr = arr - 1.0
            yield name, arr

    def _raw(self, t: Any, cfg: ModelConfig) -> QuantizedWeight:
        """A quantized 2-D tensor as its blocks, llama.cpp's q/k row permutation undone on the rows."""
        out, k = int(t.shape[1]), int(t.shape[0])
        w = from_gguf(int(t.ggml_type), (out, k), t.data)
        if self.arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_heads if "attn_q" in t.name else cfg.num_kv_heads
            order = _unpermute(np.arange(out).reshape(out, 1), heads).reshape(-1)
            w = w.rows(torch.from_numpy(np.ascontiguousarray(order)))
        return w

    def _tensor_values(self, name: str) -> list[float]:
        """A small float tensor's values (the rope factors), dequantized."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        t = next((t for t in self._reader.tensors if t.name == name), None)
        if t is None:
            raise ModelLoadError(f"{self.path}: missing tensor '{name}'")
        return [float(x) for x in np.asarray(dequantize(t.data, GGMLQuantizationType(t.ggml_type))).reshape(-1)]

    def tokenizer_data(self) -> GGUFTokenizerData:
        model = self.field("tokenizer.ggml.model", None)
        if model is None:
            raise ModelLoadError(f"{self.path}: no tokenizer in the GGUF metadata")

        def opt_int(key: str) -> int | None:
            v = self.field(f"tokenizer.ggml.{key}", None)
            return int(v) if v is not None else None

        def opt_bool(key: str) -> bool | None:
            v = self.field(f"tokenizer.ggml.{key}", None)
            return bool(v) if v is not None else None

        return GGUFTokenizerData(
            model=str(model),
            pre=self.field("tokenizer.ggml.pre", None),
            tokens=list(self.field("tokenizer.ggml.tokens")),
            token_types=[int(x) for x in self.field("tokenizer.ggml.token_type", [])],
            merges=list(self.field("tokenizer.ggml.merges", [])),
            bos_token_id=opt_int("bos_token_id"),
            eos_token_id=opt_int("eos_token_id"),
            add_bos_token=opt_bool("add_bos_token"),
            chat_template=self.field("tokenizer.chat_template", None),
            scores=[float(x) for x in self.field("tokenizer.ggml.scores", [])],
            add_eos_token=bool(opt_bool("add_eos_token")),
            add_space_prefix=opt_bool("add_space_prefix"),
            unk_token_id=opt_int("unknown_token_id"),
            pad_token_id=opt_int("padding_token_id"),
            eot_token_id=opt_int("eot_token_id"),
            eom_token_id=opt_int("eom_token_id"),
            architecture=self.arch,
        )


def _hf_name(gguf_name: str, layer_names: dict[str, str]) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    if parts[0] == "blk" and len(parts) == 5 and parts[2] in _EXPERT_NAMES and parts[3].isdigit():
        # older Mixtral files: one tensor per expert, blk.N.ffn_gate.E.weight
        return f"model.layers.{parts[1]}.mlp.experts.{parts[3]}.{_EXPERT_NAMES[parts[2]]}.{parts[4]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary halves in q/k projection rows."""
    d, d_in = w.shape
    return w.reshape(n_head, d // n_head // 2, 2, d_in).transpose(0, 2, 1, 3).reshape(d, d_in)
