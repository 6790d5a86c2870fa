"""Our GGUF header reader against gguf's own reader, on the default model's file, and the errors a
broken file gives. `write_tiny_gguf` writes a tiny HF Llama directory (test_hf_dir.write_tiny_model)
as a float32 GGUF file, the way llama.cpp's converter lays it out."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from atomr_trio.model.config import ModelLoadError
from atomr_trio.model.gguf_file import GGUFFile
from atomr_trio.model.gguf_header import GGUFHeader
from atomr_trio.model_source import ModelSource, default_model_path


def test_header_matches_the_gguf_package() -> None:
    import gguf

    path = default_model_path()
    ours = GGUFHeader(path)
    theirs = gguf.GGUFReader(str(path))
    want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.fields) == set(want)
    for key, value in want.items():
        if isinstance(value, float):
            assert ours.fields[key] == pytest.approx(value), key
        else:
            assert ours.fields[key] == value, key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.shape, a.ggml_type) == (b.name, tuple(int(x) for x in b.shape), int(b.tensor_type))
        assert np.array_equal(a.data, np.asarray(b.data).reshape(-1).view(np.uint8))


@pytest.mark.parametrize(
    "cut, message",
    [(0, "the file is empty"), (3, "past the end"), (20, "past the end"), (200_000, "past the end"),
     (-1000, "past the end of the file")],
)
def test_a_truncated_file_is_a_clear_load_error(tmp_path: Path, cut: int, message: str) -> None:
    data = default_model_path().read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError, match=message):
        f = GGUFFile(bad)
        for _ in f.weights(f.config()):
            pass


def test_a_foreign_file_is_a_clear_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        ModelSource.open(str(bad))


_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GGUF_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def write_tiny_gguf(hf_dir: Path, path: Path, tensors: dict[str, np.ndarray] | None = None,
                    metadata: Callable[[Any], None] | None = None) -> None:
    """The Llama model in `hf_dir` as a float32 GGUF file: llama.cpp's tensor names, its row order
    for attn_q / attn_k, the byte-level tokenizer as a 'gpt2' vocabulary. `tensors` are added
    as they are (e.g. rope_freqs.weight); `metadata(writer)` may add keys."""
    import gguf
    from safetensors.torch import load_file

    cfg = ModelSource.open(str(hf_dir)).config
    assert cfg.architecture == "llama"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    pieces = {i: (t, int(gguf.TokenType.NORMAL)) for t, i in tok["model"]["vocab"].items()}
    pieces.update({a["id"]: (a["content"], int(gguf.TokenType.CONTROL)) for a in tok["added_tokens"]})
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([pieces[i][0] for i in range(len(pieces))])
    w.add_token_types([pieces[i][1] for i in range(len(pieces))])
    if cfg.eos_token_ids:
        w.add_eos_token_id(cfg.eos_token_ids[0])
    if metadata is not None:
        metadata(w)
    for file in sorted(hf_dir.glob("*.safetensors")):
        for name, t in load_file(str(file)).items():
            stem, _, kind = name.rpartition(".")
            if stem.startswith("model.layers."):
                _, _, layer, part = stem.split(".", 3)
                gname = f"blk.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
            else:
                gname = f"{_GGUF_GLOBAL_NAMES[stem]}.{kind}"
            arr = t.float().numpy()
            if gname.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp interleaves the rotary halves
                heads = cfg.num_heads if "attn_q" in gname else cfg.num_kv_heads
                arr = arr.reshape(heads, 2, arr.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(arr.shape)
            w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
    for name, arr in (tensors or {}).items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
