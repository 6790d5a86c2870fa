"""Rotary position embedding: the cos/sin tables, with every supported rope scaling folded in.

A rope scaling is described HF-style (config.json `rope_scaling` / `rope_parameters`, or the
same dict built from GGUF metadata in gguf_file.py): `rope_type` (legacy key `type`) and that
type's parameters. Supported: default, linear, dynamic, yarn, longrope (legacy name `su`) and
llama3. A GGUF file's `rope_freqs` divisors travel in the same dict as `freq_factors`.

Invariants:
- The tables are [max_len, head_dim], indexed by absolute position, the two halves of each row
  equal; both the torch path (`llama._rope`) and the native `rope_store_kv` kernel compute
  `x * cos + rotate_half(x) * sin` from them and know nothing of scaling. So all scaling lives in
  the tables, an attention factor included: it is multiplied into cos and sin, so it scales q and
  k alike and the attention scores by its square, as transformers' `attention_scaling` does.
- The tables are built once, for the served max length (EngineConfig.max_model_len), and never
  change: cached keys cannot be rotated again. The length-dependent types are therefore resolved
  for that length: longrope takes its long factors when the served length exceeds the original
  context (transformers takes them when the sequence does), dynamic NTK takes the base scaled for
  the served length (transformers scales for the current sequence length). See `_inv_freq`.
- Inverse frequencies are computed in float32 with the same operations, in the same order, as
  transformers' `ROPE_INIT_FUNCTIONS`, so the tables agree with it to float32 rounding of cos/sin.
- An unsupported rope type raises `ModelLoadError` naming it and the supported ones.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, ModelLoadError, UnsupportedModel

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_ALIASES = {"su": "longrope"}  # Phi-3's first checkpoints name longrope "su"
# the types whose parameters carry the pretraining context (`original_max_position_embeddings`)
_WITH_ORIGINAL = ("llama3", "yarn", "longrope")


def rope_type(params: dict[str, Any] | None, source: str = "rope_scaling") -> str:
    """The canonical rope type of an HF-style scaling dict (None: "default")."""
    p = params or {}
    kind = str(p.get("rope_type", p.get("type", "default")))
    kind = _ALIASES.get(kind, kind)
    if kind not in ROPE_TYPES:
        raise UnsupportedModel(
            f"{source}: rope type {kind!r} is not supported "
            f"(supported: {', '.join(ROPE_TYPES)}, and 'su' for longrope)"
        )
    return kind


def rope_scaling_from_hf(cfg: dict[str, Any], cfg_path: Path) -> dict[str, Any] | None:
    """The rope scaling of an HF config.json, normalised: `rope_type` set (aliases resolved) and,
    for llama3 / yarn / longrope, a top-level `original_max_position_embeddings` folded in (it
    wins over the dict's own, as in transformers: Phi-3 keeps it there). None for plain rope."""
    params = cfg.get("rope_scaling")
    if params is None:
        params = cfg.get("rope_parameters")
    if not params:
        return None
    kind = rope_type(params, f"{cfg_path}: field 'rope_scaling'")
    if kind == "default":
        return None
    out = {k: v for k, v in params.items() if k != "type"}
    out["rope_type"] = kind
    if kind in _WITH_ORIGINAL and cfg.get("original_max_position_embeddings") is not None:
        out["original_max_position_embeddings"] = int(cfg["original_max_position_embeddings"])
    return out


def context_limit(cfg: ModelConfig) -> int:
    """Longest sequence the rope scaling is meant for: `max_position_embeddings`, except dynamic
    NTK (`factor` times it: that field is its original context) and yarn (`factor` times the
    original context, when a config such as Qwen2.5's leaves `max_position_embeddings` there)."""
    p = cfg.rope_scaling or {}
    kind = rope_type(p)
    if kind == "dynamic":
        return int(cfg.max_position_embeddings * float(_need(p, "factor")))
    if kind == "yarn" and p.get("factor"):
        return max(cfg.max_position_embeddings, int(_original(p, cfg.max_position_embeddings) * float(p["factor"])))
    return cfg.max_position_embeddings


def rope_tables(cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [max_len, head_dim] in `dtype`, for positions 0 .. max_len - 1."""
    inv_freq, scale = _inv_freq(cfg, max_len)
    pos = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    rotated = len(inv_freq)
    if rotated < cfg.head_dim // 2:  # partial rotary: the other pairs pass through (cos 1, sin 0)
        cos = torch.cat((cos, torch.ones(max_len, cfg.head_dim // 2 - rotated)), dim=-1)
        sin = torch.cat((sin, torch.zeros(max_len, cfg.head_dim // 2 - rotated)), dim=-1)
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)


def partial_rotary_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """The order of a head's dims that makes partial rope whole-head rope: rotated pair
    (i, i + rotary_dim / 2) lands on (j, j + head_dim / 2) with the pass-through dims after them
    in each half, so `rotate_half` over the whole head (the tables give the pass-through pairs
    cos 1, sin 0) rotates exactly the pairs transformers rotates. Applied alike to the q and k
    rows of the projection it leaves every attention score unchanged."""
    r, rest = rotary_dim // 2, (head_dim - rotary_dim) // 2
    first = [*range(r), *range(rotary_dim, rotary_dim + rest)]
    second = [*range(r, rotary_dim), *range(rotary_dim + rest, head_dim)]
    return torch.tensor(first + second)


def _inv_freq(cfg: ModelConfig, max_len: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary dims / 2], attention factor) for tables of `max_len` rows."""
    p = cfg.rope_scaling or {}
    kind = rope_type(p)
    dim = cfg.rotary_dim or cfg.head_dim
    base = cfg.rope_theta
    if kind == "dynamic":
        # NTK-aware base for the served length L (the static form: cached keys keep their angles).
        # transformers computes the same formula for the current sequence length, so the tables
        # equal its cos/sin for a sequence that reaches L; shorter ones it leaves unscaled up to
        # max_position_embeddings, which serving max_model_len <= max_position_embeddings matches.
        orig = cfg.max_position_embeddings
        if max_len > orig:
            factor = float(_need(p, "factor"))
            base = base * ((factor * max_len / orig) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    wavelen = base**exponents  # per frequency, over 2 pi
    if p.get("freq_factors") is not None:  # a GGUF file's rope_freqs: divisors of each frequency
        wavelen = wavelen * _per_frequency(p, "freq_factors", dim)
    if kind == "longrope":
        return _longrope(cfg, p, wavelen, max_len)
    inv_freq = 1.0 / wavelen
    if kind == "linear":
        return inv_freq / float(_need(p, "factor")), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, p, _original(p, cfg.max_position_embeddings)), 1.0
    if kind == "yarn":
        return _yarn(cfg, p, wavelen, base), yarn_attention_factor(p, cfg.max_position_embeddings)
    return inv_freq, 1.0  # default and dynamic


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any], original: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths (beyond original / low_freq_factor) divided by `factor`, short
    ones (below original / high_freq_factor) kept, the band between blended smoothly."""
    factor = float(_need(p, "factor"))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(cfg: ModelConfig, p: dict[str, Any], wavelen: torch.Tensor, base: float) -> torch.Tensor:
    """YaRN: each frequency interpolated (divided by `factor`) or extrapolated (kept) by how many
    turns it makes over the original context: a linear ramp over the dimensions between the ones
    turning `beta_fast` and `beta_slow` times (bounds floored / ceiled unless `truncate` is false)."""
    dim = cfg.rotary_dim or cfg.head_dim
    factor = _yarn_factor(p, cfg.max_position_embeddings)
    original = _original(p, cfg.max_position_embeddings)
    beta_fast = float(p.get("beta_fast") or 32)
    beta_slow = float(p.get("beta_slow") or 1)

    def dim_of(turns: float) -> float:  # the dimension whose wavelength fits `turns` times in the context
        return (dim * math.log(original / (turns * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return (1.0 / (factor * wavelen)) * (1 - keep) + (1.0 / wavelen) * keep


def yarn_attention_factor(p: dict[str, Any], max_positions: int) -> float:
    """YaRN's attention factor: `attention_factor` when given, else 0.1 ln(factor) + 1, or with
    both `mscale` and `mscale_all_dim` set the ratio of that formula at each of them."""
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    factor = _yarn_factor(p, max_positions)

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if p.get("mscale") and p.get("mscale_all_dim"):
        return float(mscale(float(p["mscale"])) / mscale(float(p["mscale_all_dim"])))
    return mscale(1.0)


def _yarn_factor(p: dict[str, Any], max_positions: int) -> float:
    factor = p.get("factor")
    return float(factor) if factor is not None else max_positions / _original(p, max_positions)


def _longrope(
    cfg: ModelConfig, p: dict[str, Any], wavelen: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): each frequency divided by its own factor, the long set when the served
    length exceeds the original context, else the short set; the attention factor defaults to
    sqrt(1 + ln(factor) / ln(original)), factor = max_position_embeddings / original."""
    original = _original(p, cfg.max_position_embeddings)
    key = "long_factor" if max_len > original else "short_factor"
    inv_freq = 1.0 / (_per_frequency(p, key, cfg.rotary_dim or cfg.head_dim) * wavelen)
    attention = p.get("attention_factor")
    if attention is None:
        factor = float(p.get("factor") or cfg.max_position_embeddings / original)
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq, float(attention)


def _original(p: dict[str, Any], max_positions: int) -> int:
    """The pretraining context of llama3 / yarn / longrope (transformers' default: max_position_embeddings)."""
    return int(p.get("original_max_position_embeddings") or max_positions)


def _per_frequency(p: dict[str, Any], key: str, dim: int) -> torch.Tensor:
    values = torch.tensor([float(x) for x in _need(p, key)], dtype=torch.float32)
    if values.shape != (dim // 2,):
        raise ModelLoadError(
            f"rope_scaling '{key}' has {values.numel()} values, expected {dim // 2} (rotated dims / 2)"
        )
    return values


def _need(p: dict[str, Any], key: str) -> Any:
    if p.get(key) is None:
        raise ModelLoadError(f"rope_scaling of type {rope_type(p)!r} has no '{key}'")
    return p[key]
