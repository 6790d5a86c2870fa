"""The other model families (Qwen3, Qwen3-MoE, Mixtral, Phi-3) against transformers.

Each family is a tiny random HF directory (test_hf_dir.write_tiny_model, several safetensors
shards): our greedy ids must equal transformers' float32 greedy ids for three prompts x 48
tokens, one request at a time and all three batched with 16-token prefill chunks, and each
sampled token's logprob must be within 1e-4 of transformers' log-softmax. The same weights
written as a GGUF (gguf's GGUFWriter, with the family's metadata keys and tensor names) must
decode the same ids. One family also runs on each forced CPU kernel path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kernel_path_unavailable
from test_hf_dir import copy_with_config, write_tiny_model

from atomr_trio import LLM, SamplingParams
from atomr_trio.model import cpu_kernels
from atomr_trio.model.config import ModelLoadError
from atomr_trio.model_source import ModelSource

pytestmark = pytest.mark.slow

FAMILIES = ["qwen3", "qwen3_moe", "mixtral", "phi3"]
PROMPTS = [[5, 17, 99, 3, 200, 41, 41, 7], list(range(30, 70)), [128] * 3]
N_TOKENS = 48
GREEDY = SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=0)
LLM_ARGS = {"dtype": "float32", "num_kv_blocks": 64, "block_size": 8, "max_num_batched_tokens": 16}
MAX_LOGPROB_DIFF: dict[str, float] = {}  # family -> worst |ours - transformers'|, for the report


class Family:
    """A family's tiny HF directory and transformers' greedy ids and their logprobs."""

    def __init__(self, arch: str, path: Path, overrides: dict | None = None) -> None:
        from transformers import AutoModelForCausalLM

        self.arch, self.path = arch, path
        write_tiny_model(path, arch, seed=3, config_overrides=overrides)
        ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.ids: list[list[int]] = []
        self.logprobs: list[list[float]] = []
        for p in PROMPTS:
            with torch.no_grad():
                seq = ref.generate(torch.tensor([p]), max_new_tokens=N_TOKENS, do_sample=False,
                                   min_new_tokens=N_TOKENS, pad_token_id=0)[0]
                logits = ref(seq.unsqueeze(0)).logits[0].double()
            new = seq[len(p):]
            lps = torch.log_softmax(logits[len(p) - 1 : -1], dim=-1).gather(1, new.unsqueeze(1))[:, 0]
            self.ids.append(new.tolist())
            self.logprobs.append(lps.tolist())

    def check(self, outs: list, what: str) -> float:
        worst = 0.0
        for i, out in enumerate(outs):
            got = out.outputs[0]
            assert got.token_ids == self.ids[i], f"{self.arch} {what}: prompt {i} decoded other tokens"
            lps = [next(lp.logprob for t, lp in row.items() if t == tok)
                   for row, tok in zip(got.logprobs, got.token_ids, strict=True)]
            worst = max(worst, max(abs(a - b) for a, b in zip(lps, self.logprobs[i], strict=True)))
        assert worst < 1e-4, f"{self.arch} {what}: logprobs off by {worst:.3g}"
        return worst


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    return {arch: Family(arch, tmp_path_factory.mktemp(f"tiny-{arch}")) for arch in FAMILIES}


@pytest.mark.parametrize("arch", FAMILIES)
def test_hf_dir_matches_transformers(arch: str, families: dict[str, Family]) -> None:
    fam = families[arch]
    assert len(list(fam.path.glob("*.safetensors"))) >= 2
    cfg = ModelSource.open(str(fam.path)).config
    assert cfg.architecture == arch
    with LLM(str(fam.path), **LLM_ARGS) as llm:
        one = [llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0] for p in PROMPTS]
        worst = fam.check(one, "one at a time")
        batched = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        worst = max(worst, fam.check(batched, "batched"))
    MAX_LOGPROB_DIFF[arch] = worst
    print(f"{arch}: max |logprob - transformers'| = {worst:.3g}")


def test_family_configs(families: dict[str, Family]) -> None:
    q3 = ModelSource.open(str(families["qwen3"].path)).config
    assert q3.qk_norm and q3.head_dim == 32 and q3.hidden_size // q3.num_heads == 16
    moe = ModelSource.open(str(families["qwen3_moe"].path)).config
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (4, 2, 48)
    assert moe.dense_layers == (1,) and not moe.norm_topk_prob and moe.qk_norm
    mix = ModelSource.open(str(families["mixtral"].path)).config
    assert (mix.num_experts, mix.num_experts_per_tok, mix.dense_layers, mix.norm_topk_prob) == (4, 2, (), True)


@pytest.mark.parametrize("path", ["native", "torch"])  # float32 has these two: ops native or not
def test_moe_float32_parity_on_each_kernel_path(path: str, families: dict[str, Family],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3-MoE (q/k norms before the rope kernel, experts, a dense layer) on each forced path."""
    why = kernel_path_unavailable(path, torch.float32)
    if why:
        pytest.skip(f"{path} kernel path unavailable here: {why}")
    monkeypatch.setenv(cpu_kernels.ENV, path)
    fam = families["qwen3_moe"]
    with LLM(str(fam.path), **LLM_ARGS) as llm:
        assert llm.stats()["kernels"] == f"matmul=torch, ops={path}"
        fam.check(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False), path)


@pytest.mark.parametrize("arch", ["qwen3_moe", "phi3"])
def test_bf16_on_each_kernel_path_stays_close(arch: str, kernel_path: str, families: dict[str, Family]) -> None:
    """bf16 on each CPU kernel path (native panels and oneDNN packing lay out the experts too):
    the first token's top logprobs stay close to transformers' float32 ones."""
    check_bf16_first_token(families[arch], kernel_path)


@pytest.mark.parametrize("arch", FAMILIES)
def test_bf16_plain_greedy_decodes_what_the_logits_path_decodes(arch: str, families: dict[str, Family]) -> None:
    check_fused_greedy(families[arch])


def check_fused_greedy(fam: Family) -> None:
    """bf16 on the native matmul: plain greedy requests take the lm_head's argmax (the model's
    `greedy_tokens`, the logits never stored) and decode the tokens that the same requests asking
    for logprobs (logits and the sampler) decode. One prompt per call: every step holds one
    sequence in both runs, so their steps are the same."""
    why = kernel_path_unavailable("native")
    if why:
        pytest.skip(f"the native matmul is unavailable here: {why}")
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    scored = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    with LLM(str(fam.path), dtype="bfloat16", num_kv_blocks=64, block_size=8) as llm:
        assert llm.stats()["kernels"].startswith("matmul=native")
        for p in PROMPTS:
            (fused,) = llm.generate([{"prompt_token_ids": p}], plain, use_tqdm=False)
            (via_logits,) = llm.generate([{"prompt_token_ids": p}], scored, use_tqdm=False)
            assert fused.outputs[0].token_ids == via_logits.outputs[0].token_ids, f"{fam.arch}: prompt {p[:4]}..."


def check_bf16_first_token(fam: Family, kernel_path: str) -> None:
    """bf16 on the forced kernel path: each prompt's first token equals transformers' float32
    one and its logprob is within 0.1."""
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=0)
    with LLM(str(fam.path), dtype="bfloat16", num_kv_blocks=64, block_size=8) as llm:
        assert llm.stats()["kernels"].startswith(f"matmul={kernel_path}")
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for i, out in enumerate(outs):
        (tok, lp), = out.outputs[0].logprobs[0].items()
        assert tok == fam.ids[i][0]
        assert abs(lp.logprob - fam.logprobs[i][0]) < 0.1


# ---- the same weights as a GGUF ---------------------------------------------------------------
GGUF_ARCH = {"qwen3": "qwen3", "qwen3_moe": "qwen3moe", "mixtral": "llama", "phi3": "phi3"}
_LAYER = {  # HF name after "model.layers.N." -> GGUF name after "blk.N."
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
}
_EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
            "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The rotary-half interleaving llama.cpp's converter applies to llama-arch attn_q / attn_k rows."""
    d, d_in = w.shape
    return w.reshape(heads, 2, d // heads // 2, d_in).transpose(0, 2, 1, 3).reshape(d, d_in)


def write_gguf(fam: Family, out: Path, per_expert: bool = False) -> None:
    """`per_expert`: experts as older Mixtral files hold them (blk.N.ffn_gate.E.weight), not stacked."""
    import json

    import gguf
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    hf = json.loads((fam.path / "config.json").read_text())
    a = GGUF_ARCH[fam.arch]
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(fam.path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    w = gguf.GGUFWriter(str(out), a)
    n_layers, heads, kv_heads = hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    w.add_uint32(f"{a}.block_count", n_layers)
    w.add_uint32(f"{a}.context_length", hf["max_position_embeddings"])
    w.add_uint32(f"{a}.embedding_length", hf["hidden_size"])
    w.add_uint32(f"{a}.feed_forward_length", hf["intermediate_size"])
    w.add_uint32(f"{a}.attention.head_count", heads)
    w.add_uint32(f"{a}.attention.head_count_kv", kv_heads)
    w.add_uint32(f"{a}.attention.key_length", head_dim)
    w.add_uint32(f"{a}.attention.value_length", head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", hf["rms_norm_eps"])
    w.add_float32(f"{a}.rope.freq_base", hf["rope_parameters"]["rope_theta"])
    experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    if experts:
        w.add_uint32(f"{a}.expert_count", experts)
        w.add_uint32(f"{a}.expert_used_count", hf["num_experts_per_tok"])
    if fam.arch == "qwen3_moe":
        w.add_uint32(f"{a}.expert_feed_forward_length", hf["moe_intermediate_size"])
        w.add_bool(f"{a}.expert_weights_norm", hf["norm_topk_prob"])
    tok = Tokenizer.from_file(str(fam.path / "tokenizer.json"))
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", [t for t, _ in vocab])
    w.add_array("tokenizer.ggml.token_type", [3 if t.startswith("<|") else 1 for t, _ in vocab])
    w.add_uint32("tokenizer.ggml.eos_token_id", tok.token_to_id("<|im_end|>"))

    stacks: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", t)
        elif name == "lm_head.weight":
            w.add_tensor("output.weight", t)
        elif "experts" in parts:  # model.layers.N.<mlp|block_sparse_moe>.experts.E.<proj>.weight
            stacks.setdefault((int(parts[2]), _EXPERTS[parts[6]]), {})[int(parts[5])] = t
        else:
            layer, inner = int(parts[2]), ".".join(parts[3:-1])
            if a == "llama" and inner in ("self_attn.q_proj", "self_attn.k_proj"):
                t = _llama_cpp_permute(t, heads if inner == "self_attn.q_proj" else kv_heads)
            w.add_tensor(f"blk.{layer}.{_LAYER[inner]}.{parts[-1]}", np.ascontiguousarray(t))
    for (layer, gname), by_expert in stacks.items():
        if per_expert:
            for e in range(experts):
                w.add_tensor(f"blk.{layer}.{gname.removesuffix('_exps')}.{e}.weight", by_expert[e])
        else:
            w.add_tensor(f"blk.{layer}.{gname}.weight", np.stack([by_expert[e] for e in range(experts)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", [*FAMILIES, "mixtral-per-expert"])
def test_gguf_matches_the_hf_dir(arch: str, families: dict[str, Family], tmp_path: Path) -> None:
    fam = families[arch.removesuffix("-per-expert")]
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(fam, path, per_expert=arch.endswith("-per-expert"))
    src = ModelSource.open(str(path))
    want = ModelSource.open(str(fam.path)).config
    for field in ("architecture", "head_dim", "qk_norm", "num_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "norm_topk_prob", "dense_layers"):
        assert getattr(src.config, field) == getattr(want, field), field
    with LLM(str(path), **LLM_ARGS) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    fam.check(outs, "GGUF")


def test_unsupported_architecture_lists_the_supported(families: dict[str, Family], tmp_path: Path) -> None:

    bad = copy_with_config(families["qwen3"].path, tmp_path / "bad",
                           lambda cfg: cfg.update(architectures=["Gemma3ForConditionalGeneration"]))
    with pytest.raises(ModelLoadError, match=r"Gemma3ForConditionalGeneration.*supported: .*MixtralForCausalLM.*"
                                             r"Phi3ForCausalLM.*Qwen3ForCausalLM.*Qwen3MoeForCausalLM"):
        ModelSource.open(str(bad))


def test_phi3_config_keeps_its_longrope_scaling(families: dict[str, Family], tmp_path: Path) -> None:

    scaling = {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}
    d = copy_with_config(families["phi3"].path, tmp_path / "phi3-scaled", lambda cfg: cfg.update(rope_scaling=scaling))
    got = ModelSource.open(str(d)).config.rope_scaling  # parity past the original context: test_rope.py
    assert got is not None and got["rope_type"] == "longrope"
    assert got["long_factor"] == scaling["long_factor"] and got["short_factor"] == scaling["short_factor"]


def test_partial_rotary_is_read_and_a_bad_one_refused_by_name(families: dict[str, Family], tmp_path: Path) -> None:
    """Phi-4-mini rotates 3/4 of each head (parity: test_rope.py); a factor that does not give a
    whole, even number of dims is refused by name."""
    import json

    d = tmp_path / "phi4ish"
    d.mkdir()
    for f in families["phi3"].path.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"]["partial_rotary_factor"] = 0.75
    (d / "config.json").write_text(json.dumps(cfg))
    assert ModelSource.open(str(d)).config.rotary_dim == 12  # of 16
    cfg["rope_parameters"]["partial_rotary_factor"] = 0.3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="partial_rotary_factor"):
        ModelSource.open(str(d))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_fused_expert_tensors_load(arch: str, families: dict[str, Family], tmp_path: Path) -> None:
    """transformers 5 holds experts stacked in memory (`mlp.experts.gate_up_proj` [E, 2I, H],
    `mlp.experts.down_proj` [E, H, I]); a checkpoint written with those names loads too."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    fam = families[arch]
    d = tmp_path / "fused"
    d.mkdir()
    for f in fam.path.iterdir():
        if f.suffix == ".json" and "index" not in f.name:
            (d / f.name).write_bytes(f.read_bytes())
    state = AutoModelForCausalLM.from_pretrained(str(fam.path), dtype=torch.float32).state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    names = sorted(state)
    save_file({k: state[k].contiguous() for k in names[::2]}, str(d / "a.safetensors"))
    save_file({k: state[k].contiguous() for k in names[1::2]}, str(d / "b.safetensors"))
    with LLM(str(d), **LLM_ARGS) as llm:
        fam.check(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False), "fused")
