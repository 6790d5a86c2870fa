"""Gemma 2, Gemma 3 (text) and sliding-window attention against transformers.

Tiny random HF directories (test_hf_dir.write_tiny_model, several safetensors shards) with a
16-token window, shorter than the 40-token prompt and the 48 generated tokens: our greedy ids
must equal transformers' float32 greedy ids for three prompts x 48 tokens, one request at a time
and batched with 16-token prefill chunks, with each sampled token's logprob within 1e-4 of
transformers' — on the native and the torch ops paths. Gemma 2 has attention and final-logit
soft-capping (capped, windowed decode in the native kernel on the native path); Gemma 3 has q/k
norms and two rope tables. A Mistral with a window on every layer and a Qwen2 with one on its
second layer decode as transformers' do past the window; Mistral's sequences also give back the
blocks behind it. The native decode kernel's window and cap are checked on their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import kernel_path_unavailable
from test_families import GREEDY, LLM_ARGS, PROMPTS, Family, check_bf16_first_token, check_fused_greedy
from test_hf_dir import copy_with_config

from atomr_trio import LLM
from atomr_trio.model import cpu_kernels, native
from atomr_trio.model.config import ModelConfig
from atomr_trio.model_source import ModelSource

pytestmark = pytest.mark.slow

# Qwen2 windows only the layers from max_window_layers on: layer 0 global, layer 1 windowed
WINDOWED = {"gemma2": None, "gemma3": None, "mistral": {"sliding_window": 16},
            "qwen2": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    return {arch: Family(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), overrides)
            for arch, overrides in WINDOWED.items()}


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("arch", list(WINDOWED))
def test_windowed_models_match_transformers(arch: str, path: str, models: dict[str, Family],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    why = kernel_path_unavailable(path, torch.float32)
    if why:
        pytest.skip(f"{path} kernel path unavailable here: {why}")
    monkeypatch.setenv(cpu_kernels.ENV, path)
    fam = models[arch]
    assert len(list(fam.path.glob("*.safetensors"))) >= 2
    with LLM(str(fam.path), **LLM_ARGS) as llm:
        assert llm.stats()["kernels"] == f"matmul=torch, ops={path}"
        one = [llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0] for p in PROMPTS]
        worst = fam.check(one, f"{path}, one at a time")
        batched = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        worst = max(worst, fam.check(batched, f"{path}, batched"))
    print(f"{arch} ({path}): max |logprob - transformers'| = {worst:.3g}")


def test_configs(models: dict[str, Family]) -> None:
    g2 = ModelSource.open(str(models["gemma2"].path)).config
    assert (g2.architecture, g2.sliding_window, g2.full_attention_layers) == ("gemma2", 16, (1,))
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.query_pre_attn_scalar) == (3.0, 10.0, 24.0)
    assert [g2.layer_window(i) for i in range(2)] == [16, None]
    g3 = ModelSource.open(str(models["gemma3"].path)).config
    assert g3.qk_norm and g3.full_attention_layers == (1,) and g3.attn_logit_softcapping is None
    assert (g3.rope_theta, g3.rope_local_theta) == (100000.0, 10000.0)
    assert g3.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    qwen2 = ModelSource.open(str(models["qwen2"].path)).config
    assert (qwen2.sliding_window, qwen2.full_attention_layers, qwen2.window_of_every_layer) == (16, (0,), None)
    mistral = ModelSource.open(str(models["mistral"].path)).config
    assert mistral.sliding_window == 16 and mistral.full_attention_layers == ()
    assert mistral.max_model_len == mistral.max_position_embeddings  # no longer capped at the window


def test_gemma3_config_as_released_checkpoints_write_it(models: dict[str, Family], tmp_path: Path) -> None:
    """Released Gemma 3 configs predate transformers 5's per-kind rope_parameters and layer_types:
    rope_theta, rope_local_base_freq, rope_scaling and sliding_window_pattern say the same."""

    fam = models["gemma3"]
    def old_style(cfg: dict[str, Any]) -> None:
        del cfg["rope_parameters"], cfg["layer_types"]
        cfg.update(rope_theta=100000.0, rope_local_base_freq=10000.0, sliding_window_pattern=2,
                   rope_scaling={"rope_type": "linear", "factor": 2.0})

    d = copy_with_config(fam.path, tmp_path / "gemma3-old-config", old_style)
    assert ModelSource.open(str(d)).config == ModelSource.open(str(fam.path)).config
    with LLM(str(d), **LLM_ARGS) as llm:
        fam.check(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False), "old config")


def test_bidirectional_gemma3_is_refused(models: dict[str, Family], tmp_path: Path) -> None:

    from atomr_trio.model.config import ModelLoadError

    d = copy_with_config(models["gemma3"].path, tmp_path / "embedding-gemma",
                         lambda cfg: cfg.update(use_bidirectional_attention=True))
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention"):
        ModelSource.open(str(d))


def test_qwen2_window_layers() -> None:
    """Qwen2 windows only layers >= max_window_layers, and only with use_sliding_window."""
    from atomr_trio.model.config import _full_attention_layers

    assert _full_attention_layers("qwen2", {"max_window_layers": 1}, 3) == (0,)
    assert _full_attention_layers("mistral", {}, 3) == ()
    assert _full_attention_layers("gemma3", {"sliding_window_pattern": 2}, 4) == (1, 3)
    assert ModelConfig.layer_window.__doc__


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("head_dim", [32, 64])  # bf16 64: the AVX512-BF16 kernel where the CPU has it
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_window(dtype: torch.dtype, head_dim: int, softcap: float | None) -> None:
    """decode_attention(window=W, softcap=c) equals attention over the last W positions of each
    context, with scores capped as c * tanh(s / c)."""
    k = native.kernels()
    if k is None:
        pytest.skip("native kernels unavailable here")
    torch.manual_seed(0)
    nd, H, KVH, D, S, L = 3, 4, 2, head_dim, 200, 50
    q = torch.randn(nd, H, D).to(dtype)
    kv = torch.randn(2, KVH, S, D).to(dtype)
    slots = torch.randperm(S)[: nd * L]
    lens = torch.tensor([50, 7, 31])
    for window in (None, 1, 8, 16, 100):
        got = k.decode_attention(q, kv, slots, lens, D**-0.5, window, softcap).float()
        for n in range(nd):
            ln = int(lens[n])
            start = 0 if window is None else max(0, ln - window)
            s = slots[n * L + start : n * L + ln]
            kk, vv = kv[0][:, s].float(), kv[1][:, s].float()  # [KVH, len, D]
            qq = q[n].float().view(KVH, H // KVH, D)
            scores = qq @ kk.transpose(-1, -2) * D**-0.5
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            want = torch.softmax(scores, dim=-1) @ vv
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert torch.allclose(got[n], want.reshape(H, D), atol=tol), (window, n)
    assert torch.equal(k.decode_attention(q, kv, slots, lens, D**-0.5), k.decode_attention(q, kv, slots, lens,
                                                                                          D**-0.5, None))


def write_gemma_gguf(fam: Family, out: Path) -> None:
    """The family's weights as llama.cpp's converter writes a Gemma: tensor names from the gguf
    package's map, every norm weight stored as 1 + w, lm_head left out (tied), the window and
    soft-caps as metadata; the scale (query_pre_attn_scalar = head_dim), the sliding pattern and
    the local rope base are not written (the reader takes llama.cpp's rules)."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    hf = json.loads((fam.path / "config.json").read_text())
    a = fam.arch
    n_layers = hf["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2 if a == "gemma2" else gguf.MODEL_ARCH.GEMMA3, n_layers)
    w = gguf.GGUFWriter(str(out), a)
    rope = hf["rope_parameters"]
    full = rope.get("full_attention", rope)
    for key, value in (("block_count", n_layers), ("context_length", hf["max_position_embeddings"]),
                       ("embedding_length", hf["hidden_size"]), ("feed_forward_length", hf["intermediate_size"]),
                       ("attention.head_count", hf["num_attention_heads"]),
                       ("attention.head_count_kv", hf["num_key_value_heads"]),
                       ("attention.key_length", hf["head_dim"]), ("attention.value_length", hf["head_dim"]),
                       ("attention.sliding_window", hf["sliding_window"])):
        w.add_uint32(f"{a}.{key}", value)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", hf["rms_norm_eps"])
    w.add_float32(f"{a}.rope.freq_base", full["rope_theta"])
    if full.get("rope_type") == "linear":
        w.add_string(f"{a}.rope.scaling.type", "linear")
        w.add_float32(f"{a}.rope.scaling.factor", full["factor"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key) is not None:
            w.add_float32(f"{a}.{key}", hf[key])
    tok = Tokenizer.from_file(str(fam.path / "tokenizer.json"))
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", [t for t, _ in vocab])
    w.add_array("tokenizer.ggml.token_type", [3 if t.startswith("<|") else 1 for t, _ in vocab])
    w.add_uint32("tokenizer.ggml.eos_token_id", tok.token_to_id("<|im_end|>"))
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(fam.path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for name, t in tensors.items():
        if name == "lm_head.weight":
            continue
        base = name.removesuffix(".weight")
        if name.endswith("norm.weight"):
            t = t + np.float32(1.0)
        w.add_tensor(f"{names.get_name(base)}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# GGUF files keep no query_pre_attn_scalar nor (Gemma 3) sliding pattern: the dirs written as GGUF
# use what llama.cpp assumes (scale head_dim; Gemma 3 with 6 layers, the sixth global)
GGUF_OVERRIDES = {"gemma2": {"query_pre_attn_scalar": 32},
                  "gemma3": {"query_pre_attn_scalar": 32, "num_hidden_layers": 6, "layer_types": None}}


@pytest.mark.parametrize("arch", list(GGUF_OVERRIDES))
def test_gguf_matches_transformers(arch: str, tmp_path: Path) -> None:
    fam = Family(arch, tmp_path / "hf", GGUF_OVERRIDES[arch])
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gemma_gguf(fam, path)
    got = ModelSource.open(str(path)).config
    want = ModelSource.open(str(fam.path)).config
    assert want.full_attention_layers == ((1,) if arch == "gemma2" else (5,))
    for name in ("architecture", "head_dim", "qk_norm", "sliding_window", "full_attention_layers",
                 "attn_logit_softcapping", "final_logit_softcapping", "rope_theta", "rope_scaling",
                 "rope_local_theta", "tie_word_embeddings", "query_pre_attn_scalar"):
        assert getattr(got, name) == getattr(want, name), name
    with LLM(str(path), **LLM_ARGS) as llm:
        fam.check(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False), "GGUF")


def test_all_windowed_model_holds_only_its_window(models: dict[str, Family]) -> None:
    """Mistral windows every layer: its sequences release the blocks behind the window as they
    go, so three 88-token sequences run side by side in 12 blocks of 8 (without the release they
    need 33 and take turns through preemption) and still decode transformers' ids."""
    fam = models["mistral"]
    assert ModelSource.open(str(fam.path)).config.window_of_every_layer == 16
    assert ModelSource.open(str(models["gemma2"].path)).config.window_of_every_layer is None
    with LLM(str(fam.path), **{**LLM_ARGS, "num_kv_blocks": 12}) as llm:
        fam.check(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False), "12 blocks")
        assert llm.stats()["num_preemptions"] == 0


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_bf16_on_each_kernel_path_stays_close(arch: str, kernel_path: str, models: dict[str, Family]) -> None:
    """bf16 on each CPU kernel path (native panels and oneDNN packing lay out the GeGLU too):
    the first token's logprob stays close to transformers' float32 one."""
    check_bf16_first_token(models[arch], kernel_path)


@pytest.mark.parametrize("arch", list(WINDOWED))
def test_bf16_plain_greedy_decodes_what_the_logits_path_decodes(arch: str, models: dict[str, Family]) -> None:
    """Soft-capped final logits (these tiny Gemmas) keep the logits path (GemmaModel.greedy_tokens);
    the others take the lm_head's argmax; both decode what the logits path decodes."""
    check_fused_greedy(models[arch])


def test_gemma3_without_a_final_soft_cap_takes_the_argmax_after_its_own_norm(tmp_path: Path) -> None:
    """Gemma 3 as released (final_logit_softcapping null): greedy steps take the lm_head's argmax of
    Gemma's final norm of the hidden states, and decode what the logits path decodes."""
    check_fused_greedy(Family("gemma3", tmp_path / "gemma3", {"final_logit_softcapping": None}))


def test_all_windowed_request_longer_than_the_cache(models: dict[str, Family]) -> None:
    """88-token sequences on a 48-slot cache: refused when every token's K/V must stay, served
    when blocks behind the window go back (6 blocks of 8 hold window + chunk + 2 partial blocks),
    one at a time and batched (taking turns by preemption), with transformers' ids."""
    fam = models["mistral"]
    with LLM(str(fam.path), **{**LLM_ARGS, "num_kv_blocks": 6}) as llm:
        one = [llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0] for p in PROMPTS]
        fam.check(one, "6 blocks, one at a time")
        fam.check(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False), "6 blocks")
    with LLM(str(models["qwen2"].path), **{**LLM_ARGS, "num_kv_blocks": 6}) as llm:  # a global layer
        with pytest.raises(ValueError, match="KV cache"):
            llm.generate([{"prompt_token_ids": PROMPTS[1]}], GREEDY, use_tqdm=False)
