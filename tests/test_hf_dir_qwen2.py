"""A small randomly initialised Qwen2-style HF directory (q/k/v biases, several safetensors
shards) written by the test: our loader and transformers must decode the same greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atomr_trio import LLM, SamplingParams
from atomr_trio.model.config import ModelLoadError
from atomr_trio.model.source import ModelSource

pytestmark = pytest.mark.slow


def write_tiny_qwen2(path: Path, seed: int = 0) -> None:
    """A byte-level BPE tokenizer with no merges (vocab = 256 bytes + 2 specials) and a
    2-layer Qwen2 with non-zero biases, saved in shards of at most ~200 kB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    im_end = tok.token_to_id("<|im_end|>")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                         "{% endif %}",
    }))
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
        tie_word_embeddings=False, eos_token_id=im_end, initializer_range=0.2,
    )
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    model.save_pretrained(str(path), max_shard_size="200KB", safe_serialization=True)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen2")
    write_tiny_qwen2(path)
    return path


def test_tiny_qwen2_is_sharded_with_biases(qwen2_dir: Path) -> None:
    assert len(list(qwen2_dir.glob("*.safetensors"))) >= 2
    src = ModelSource.open(str(qwen2_dir))
    assert src.config.architecture == "qwen2" and src.config.attention_bias


def test_qwen2_greedy_parity_with_transformers(qwen2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(qwen2_dir), dtype=torch.float32).eval()
    prompts = [[5, 17, 99, 3, 200, 41, 41, 7], list(range(30, 70)), [128] * 3]
    with LLM(str(qwen2_dir), dtype="float32", num_kv_blocks=64, block_size=8,
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
