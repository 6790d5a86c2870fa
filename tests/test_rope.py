"""Rope scaling (model/rope.py) against transformers.

Fast: for every supported type our cos/sin tables equal the ones transformers' rotary embedding
computes (its ROPE_INIT_FUNCTIONS, then its forward) past the original context, and differ from
unscaled rope there; an unsupported type is a ModelLoadError naming it and the supported ones;
GGUF rope metadata and rope tensors become the HF-style scaling dict.
Slow: tiny random Llama directories with llama3 and yarn scaling (original context 64,
max_position_embeddings 256) give transformers' float32 greedy ids and logprobs for a 100-token
prompt, and the llama3 one written as a GGUF file with a rope_freqs tensor and no rope scaling
metadata decodes as its HF directory does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from atomr_trio import LLM, SamplingParams
from atomr_trio.model import cpu_kernels, native
from atomr_trio.model.config import ModelConfig, ModelLoadError
from atomr_trio.model.gguf_file import GGUFFile
from atomr_trio.model.rope import ROPE_TYPES, _inv_freq, context_limit, rope_tables
from atomr_trio.model_source import ModelSource

HEAD_DIM = 64
THETA = 10000.0
_GEN = torch.Generator().manual_seed(0)
SHORT = (1 + 0.5 * torch.rand(HEAD_DIM // 2, generator=_GEN)).tolist()
LONG = (1 + 6 * torch.rand(HEAD_DIM // 2, generator=_GEN)).tolist()

# name -> (config.json fields beyond the shape, the original context, the served length)
CASES: dict[str, tuple[dict[str, Any], int, int]] = {
    "llama3": ({"max_position_embeddings": 4096, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024}}, 1024, 4096),
    "yarn": ({"max_position_embeddings": 4096, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}, 1024, 4096),
    "yarn-mscale": ({"max_position_embeddings": 4096, "rope_scaling": {  # DeepSeek-style keys, legacy 'type'
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 0.707,
        "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False}}, 1024, 4096),
    "yarn-attention-factor": ({"max_position_embeddings": 8192, "rope_parameters": {  # transformers 5 key
        "rope_type": "yarn", "rope_theta": THETA, "factor": 8.0, "original_max_position_embeddings": 1024,
        "attention_factor": 1.25}}, 1024, 8192),
    "longrope": ({"max_position_embeddings": 4096, "original_max_position_embeddings": 1024,  # Phi-3 style
                  "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG}}, 1024, 4096),
    "su": ({"max_position_embeddings": 4096, "original_max_position_embeddings": 1024,
            "rope_scaling": {"type": "su", "short_factor": SHORT, "long_factor": LONG}}, 1024, 4096),
    "longrope-short": ({"max_position_embeddings": 4096, "original_max_position_embeddings": 1024,  # served <= original
                        "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG}}, 0, 1024),
    "dynamic": ({"max_position_embeddings": 1024, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, 1024, 2048),
    "linear": ({"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}}, 1024, 4096),
}


def raw_config(fields: dict[str, Any]) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 4 * HEAD_DIM,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": THETA, **fields}


def our_config(tmp_path: Path, raw: dict[str, Any]) -> ModelConfig:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return ModelConfig.from_hf_dir(tmp_path)


def their_rope(raw: dict[str, Any]) -> tuple[Any, torch.nn.Module]:
    """transformers' config and rotary embedding for `raw` (Phi-3's for longrope, as Phi-3 loads)."""
    from transformers import LlamaConfig, Phi3Config
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    kind = (raw.get("rope_scaling") or {}).get("type")
    raw = {k: v for k, v in raw.items() if k != "architectures"}
    if kind in ("longrope", "su"):
        phi3 = Phi3Config(**json.loads(json.dumps(raw)))
        return phi3, Phi3RotaryEmbedding(phi3)
    llama = LlamaConfig(**json.loads(json.dumps(raw)))  # a copy: transformers edits the dicts
    return llama, LlamaRotaryEmbedding(llama)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tables_equal_transformers_past_the_original_context(name: str, tmp_path: Path) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fields, original, served = CASES[name]
    raw = raw_config(fields)
    cfg = our_config(tmp_path, raw)
    cos, sin = rope_tables(cfg, served, torch.float32)
    assert cos.shape == sin.shape == (served, HEAD_DIM)

    their_cfg, rotary = their_rope(raw)
    positions = torch.arange(served)[None]  # one sequence at the served length
    with torch.no_grad():
        want_cos, want_sin = rotary(torch.zeros(1), positions)
    past = slice(original, served)
    err = max((cos[past] - want_cos[0, past]).abs().max().item(), (sin[past] - want_sin[0, past]).abs().max().item())
    print(f"{name}: max |table - transformers| at positions {original}..{served - 1} = {err:.3g}")
    assert err <= 1e-6, err
    assert torch.allclose(cos, want_cos[0], atol=1e-6, rtol=0) and torch.allclose(sin, want_sin[0], atol=1e-6, rtol=0)

    # the same inverse frequencies and attention factor as ROPE_INIT_FUNCTIONS for this length
    kind = cfg.rope_scaling["rope_type"] if cfg.rope_scaling else "default"
    inv, scale = ROPE_INIT_FUNCTIONS[kind](their_cfg, None, seq_len=served)
    ours_inv, ours_scale = _inv_freq(cfg, served)
    assert torch.allclose(ours_inv, inv.float(), rtol=1e-7, atol=0) and ours_scale == pytest.approx(scale, rel=1e-12)

    # and the scaling changes the tables there (the comparison is not between two unscaled ones)
    plain_cos, _ = rope_tables(dataclasses.replace(cfg, rope_scaling=None), served, torch.float32)
    assert (cos[past] - plain_cos[past]).abs().max().item() > 1e-2


def test_longrope_attention_factor_defaults_to_phi3s(tmp_path: Path) -> None:
    cfg = our_config(tmp_path, raw_config(CASES["longrope"][0]))
    _, scale = _inv_freq(cfg, 4096)
    assert scale == pytest.approx(math.sqrt(1 + math.log(4096 / 1024) / math.log(1024)))


def test_context_limit_follows_the_scaling(tmp_path: Path) -> None:
    def limit(fields: dict[str, Any]) -> int:
        return context_limit(our_config(tmp_path, raw_config(fields)))

    assert limit(CASES["llama3"][0]) == 4096
    assert limit(CASES["longrope"][0]) == 4096
    assert limit(CASES["dynamic"][0]) == 2048  # dynamic NTK: max_position_embeddings is its original context
    qwen_style = {"max_position_embeddings": 32768, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert limit(qwen_style) == 131072
    assert our_config(tmp_path, raw_config(qwen_style)).max_model_len == 131072


def test_an_unsupported_rope_type_names_it_and_the_supported_ones(tmp_path: Path) -> None:
    raw = raw_config({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "mrope", "factor": 2.0}})
    with pytest.raises(ModelLoadError, match=r"config\.json.*'mrope'.*supported: " + ", ".join(ROPE_TYPES)):
        our_config(tmp_path, raw)
    cfg = our_config(tmp_path, raw_config({"max_position_embeddings": 4096}))
    bad = dataclasses.replace(cfg, rope_scaling={"type": "ntk-by-parts"})
    with pytest.raises(ModelLoadError, match=r"'ntk-by-parts'.*supported: .*yarn.*longrope"):
        rope_tables(bad, 16, torch.float32)
    half = our_config(tmp_path, raw_config({"max_position_embeddings": 4096, "partial_rotary_factor": 0.5}))
    assert half.rotary_dim == HEAD_DIM // 2
    with pytest.raises(ModelLoadError, match=r"partial_rotary_factor' = 0\.3 gives"):  # 19.2 dims
        our_config(tmp_path, raw_config({"max_position_embeddings": 4096, "partial_rotary_factor": 0.3}))
    wrong_length = {**CASES["longrope"][0], "rope_scaling": {"type": "longrope", "short_factor": SHORT,
                                                             "long_factor": LONG[:-1]}}
    with pytest.raises(ModelLoadError, match=r"'long_factor' has 31 values, expected 32"):
        rope_tables(our_config(tmp_path, raw_config(wrong_length)), 4096, torch.float32)


# ---- GGUF metadata ----------------------------------------------------------------------------
def write_gguf(path: Path, metadata: Callable[[Any], None], tensors: dict[str, np.ndarray] | None = None) -> GGUFFile:
    """A GGUF file with a Llama shape, `metadata` and `tensors` (no weights: enough for config())."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(4 * HEAD_DIM)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(THETA)
    metadata(w)
    for name, arr in (tensors or {}).items():
        w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


def test_gguf_rope_metadata_becomes_the_hf_scaling(tmp_path: Path) -> None:
    import gguf

    def yarn(w: Any) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(1024)
        w.add_rope_scaling_yarn_beta_fast(16.0)
        w.add_rope_scaling_yarn_beta_slow(2.0)

    cfg = write_gguf(tmp_path / "yarn.gguf", yarn).config()
    assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                "beta_fast": 16.0, "beta_slow": 2.0}
    assert cfg.max_model_len == 4096

    def yarn_log_mul(w: Any) -> None:  # llama.cpp: attention factor mscale(1) / mscale(yarn_log_multiplier)
        yarn(w)
        w.add_rope_scaling_yarn_log_mul(0.5)

    cfg = write_gguf(tmp_path / "yarn-mul.gguf", yarn_log_mul).config()
    _, scale = _inv_freq(cfg, 4096)
    assert scale == pytest.approx((0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))

    def linear(w: Any) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    assert write_gguf(tmp_path / "linear.gguf", linear).config().rope_scaling == {"rope_type": "linear", "factor": 2.0}

    def none(w: Any) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_rope_scaling_factor(2.0)  # ignored, as llama.cpp ignores it

    assert write_gguf(tmp_path / "none.gguf", none).config().rope_scaling is None

    def longrope(w: Any) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_orig_ctx_len(1024)
        w.add_rope_scaling_attn_factors(1.19)

    factors = {"rope_factors_long.weight": np.array(LONG), "rope_factors_short.weight": np.array(SHORT)}
    cfg = write_gguf(tmp_path / "longrope.gguf", longrope, factors).config()
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "longrope"
    assert cfg.rope_scaling["long_factor"] == pytest.approx(LONG)
    assert cfg.rope_scaling["short_factor"] == pytest.approx(SHORT)
    assert _inv_freq(cfg, 4096)[1] == pytest.approx(1.19)

    divisors = np.linspace(1.0, 8.0, HEAD_DIM // 2)
    cfg = write_gguf(tmp_path / "freqs.gguf", lambda w: None, {"rope_freqs.weight": divisors}).config()
    assert cfg.rope_scaling == {"rope_type": "default", "freq_factors": pytest.approx(divisors.tolist())}
    plain = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    assert torch.allclose(_inv_freq(cfg, 4096)[0], plain / torch.tensor(divisors, dtype=torch.float32), rtol=1e-6)

    def unknown(w: Any) -> None:
        w.add_string("llama.rope.scaling.type", "ntk")

    with pytest.raises(ModelLoadError, match=r"llama\.rope\.scaling\.type' = 'ntk' is not supported"):
        write_gguf(tmp_path / "unknown.gguf", unknown).config()


# ---- end to end (slow) ------------------------------------------------------------------------
TINY_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    # Phi-3's (a Phi3ForCausalLM): head_dim 16, so 8 factors each
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5],
                 "long_factor": [1.0, 1.3, 1.8, 2.5, 3.5, 4.5, 6.0, 8.0]},
}
PROMPT = [(7 * j + 3) % 250 + 3 for j in range(100)]  # longer than the original context (64)
NEW = 24


def tiny_scaled(path: Path, kind: str) -> Path:
    from test_hf_dir import write_tiny_model

    overrides: dict[str, Any] = {"rope_scaling": dict(TINY_SCALINGS[kind])}
    if kind == "longrope":
        overrides["original_max_position_embeddings"] = 64  # Phi-3 keeps it at the top level
    write_tiny_model(path, "phi3" if kind == "longrope" else "llama", seed=5, max_positions=256,
                     config_overrides=overrides)
    return path


def decode(model: str) -> tuple[list[int], list[float]]:
    """Our greedy ids for PROMPT, and the logprob of every prompt token after the first and of
    every generated token."""
    with LLM(model, dtype="float32", num_kv_blocks=64, block_size=8, max_num_batched_tokens=32) as llm:
        out = llm.generate([{"prompt_token_ids": PROMPT}],
                           SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=0,
                                          prompt_logprobs=0), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert out.prompt_logprobs is not None and comp.logprobs is not None
    ids = list(comp.token_ids)
    lps = [e[t].logprob for e, t in zip(out.prompt_logprobs[1:], PROMPT[1:], strict=True) if e is not None]
    lps += [e[t].logprob for e, t in zip(comp.logprobs, ids, strict=True)]
    assert len(lps) == len(PROMPT) - 1 + NEW
    return ids, lps


def reference(ref: Any, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy ids for PROMPT, and its logprobs of PROMPT + `ids` (ours), position
    by position, as `decode` returns them."""
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                            pad_token_id=0)[0, len(PROMPT):].tolist()
        seq = PROMPT + ids
        logp = torch.log_softmax(ref(torch.tensor([seq])).logits[0].float(), dim=-1)
    return want, logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]


@pytest.mark.slow
@pytest.mark.parametrize("ops", ["native", "torch"])  # rope in the native rope_store_kv kernel, or in torch
@pytest.mark.parametrize("kind", sorted(TINY_SCALINGS))
def test_scaled_tiny_llama_matches_transformers_past_the_original_context(
    kind: str, ops: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    if ops == "native" and native.kernels() is None:
        pytest.skip("no native kernels here")
    monkeypatch.setenv(cpu_kernels.ENV, f"matmul=torch,ops={ops}")
    model_dir = tiny_scaled(tmp_path / kind, kind)
    cfg = ModelSource.open(str(model_dir)).config
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == kind and cfg.max_model_len == 256
    ids, lps = decode(str(model_dir))

    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    assert ref.model.rotary_emb.rope_type == kind
    want, want_lps = reference(ref, ids)
    assert ids == want
    err = (torch.tensor(lps) - want_lps).abs().max().item()
    print(f"{kind} ({ops} ops): max |logprob - transformers| = {err:.3g} over {len(lps)} positions")
    assert err < 1e-4


@pytest.mark.slow
def test_llama3_gguf_with_rope_freqs_decodes_as_its_hf_directory(tmp_path: Path) -> None:
    from test_gguf import write_tiny_gguf
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model_dir = tiny_scaled(tmp_path / "hf", "llama3")
    their_cfg = AutoConfig.from_pretrained(str(model_dir))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](their_cfg, None)
    hd = their_cfg.head_dim
    plain = 1.0 / (THETA ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    divisors = (plain / scaled).numpy()  # what llama.cpp's converter writes for Llama 3.1+
    assert divisors.min() == 1.0 and divisors.max() == pytest.approx(4.0)
    path = tmp_path / "tiny-llama3.gguf"
    write_tiny_gguf(model_dir, path, tensors={"rope_freqs.weight": divisors})

    src = ModelSource.open(str(path))
    assert src.kind == "gguf" and src.config.rope_scaling is not None
    assert set(src.config.rope_scaling) == {"rope_type", "freq_factors"}  # no rope scaling metadata
    ids, lps = decode(str(path))
    want_ids, want_lps = decode(str(model_dir))
    assert ids == want_ids
    err = max(abs(a - b) for a, b in zip(lps, want_lps, strict=True))
    print(f"gguf rope_freqs: max |logprob - HF directory| = {err:.3g} over {len(lps)} positions")
    assert err < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("ops", ["native", "torch"])
def test_partial_rotary_phi4_mini_style_matches_transformers(ops: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Phi-4-mini rotates 3/4 of each head (with longrope): here 12 of 16 dims, long factors past
    the original context. Our kernels rotate whole heads; the q/k rows are reordered so that the
    pairs transformers rotates are the ones rotated (rope.partial_rotary_order)."""
    from test_hf_dir import write_tiny_model
    from transformers import AutoModelForCausalLM

    if ops == "native" and native.kernels() is None:
        pytest.skip("no native kernels here")
    monkeypatch.setenv(cpu_kernels.ENV, f"matmul=torch,ops={ops}")
    scaling = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
               "long_factor": [1.0, 1.4, 2.0, 3.0, 4.5, 7.0]}
    model_dir = tmp_path / "phi4-mini-style"
    write_tiny_model(model_dir, "phi3", seed=6, max_positions=256, config_overrides={
        "rope_scaling": scaling, "original_max_position_embeddings": 64, "partial_rotary_factor": 0.75})
    cfg = ModelSource.open(str(model_dir)).config
    assert cfg.rotary_dim == 12 and cfg.head_dim == 16
    ids, lps = decode(str(model_dir))
    want, want_lps = reference(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval(), ids)
    assert ids == want
    err = (torch.tensor(lps) - want_lps).abs().max().item()
    print(f"partial rotary 12/16 + longrope ({ops} ops): max |logprob - transformers| = {err:.3g}")
    assert err < 1e-4
