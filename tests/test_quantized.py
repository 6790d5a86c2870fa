"""Weights kept as GGUF blocks (`quantization="gguf"`, model/quantized.py, csrc/quant_matmul.cpp):
each block type's kernel against the gguf package's own dequantize followed by a float64 matmul,
a tiny quantized GGUF file loaded both ways, and (real_model) the default Q4_1 / Q8_0 model
against our own float32 path on the same file: first tokens and logprob gap, and its memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_int8 import assert_tests_pass_on_build, skip_unless_host_runs
from test_parity import PROMPTS  # the prompts of the other default-model checks

from atomr_trio import LLM, SamplingParams
from atomr_trio.model import native, quantized
from atomr_trio.model.linear import pack_gate_up_panels, pack_panels
from atomr_trio.model.quantized import QuantizedWeight, QuantLinear, random_blocks

gguf = pytest.importorskip("gguf")
from gguf.constants import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

needs_native = pytest.mark.skipif(native.kernels() is None, reason="the native kernels did not build here")
TYPES = {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3, "Q4_K": 12}


def _blocks(ggml_type: int, out: int, k: int, seed: int) -> QuantizedWeight:
    """Random weights quantized by the gguf package (Q4_K, which it cannot quantize: random valid blocks)."""
    g = torch.Generator().manual_seed(seed)
    if ggml_type == 12:
        return QuantizedWeight(ggml_type, (out, k), random_blocks(ggml_type, out, k, g))
    w = (torch.randn(out, k, generator=g) * k**-0.5).numpy()
    raw = quantize(w, GGMLQuantizationType(ggml_type))
    return QuantizedWeight(ggml_type, (out, k), torch.from_numpy(np.ascontiguousarray(raw)))


def _reference(w: QuantizedWeight) -> torch.Tensor:
    """The gguf package's dequantization, float64: the independent reference."""
    arr = dequantize(w.data.numpy(), GGMLQuantizationType(w.ggml_type))
    return torch.from_numpy(np.asarray(arr, dtype=np.float64).reshape(w.shape))


def _close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rtol: float) -> None:
    """|got - want| within rtol of |x_m| |w_n| (the scale of float32 rounding in a dot product)."""
    bound = rtol * (x.double().norm(dim=1, keepdim=True) * w.norm(dim=1)) + 1e-30
    err = ((got.double() - want).abs() / bound).max()
    assert float(err) <= 1.0, f"off by {float(err):.3g} x the tolerance"


def _x_as_taken(name: str, x: torch.Tensor) -> torch.Tensor:
    """x (float64) as the kernel multiplies it. Builds whose `quant_int8_x_rows` covers these rows
    of bf16 x over Q4_0 / Q4_1 (AVX2 without AVX-512) round each 32-value block of x to
    d * q: d = max|x| / 127 and q = x * (1 / d) rounded to nearest even, in float32 (the same
    operations as quant_matmul.cpp); every other case takes x as it is."""
    k = native.kernels()
    if (k is None or x.dtype != torch.bfloat16 or x.shape[0] > k.quant_int8_x_rows
            or name not in ("Q4_0", "Q4_1")):
        return x.double()
    xb = x.float().reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d >= torch.finfo(torch.float32).tiny, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv).double() * d.double()).reshape(x.shape)


def _within_one_rounding(got: torch.Tensor, exact: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got is exact rounded once to bf16 (half a step: 2^-8 of the value at most) after float32 sums."""
    slack = 1e-5 * (x.double().norm(dim=1, keepdim=True) * w.norm(dim=1)) + 1e-30
    err = ((got.double() - exact).abs() / (2.0**-8 * exact.abs() + slack)).max()
    assert float(err) <= 1.0, f"off by {float(err):.3g} x one bf16 rounding"


@needs_native
@pytest.mark.parametrize("name", list(TYPES))
def test_dequantize_matches_the_gguf_package(name: str) -> None:
    t = TYPES[name]
    k = 512 if t == 12 else 96
    w = _blocks(t, 37, k, seed=1)
    assert torch.equal(w.dequantize().double(), _reference(w))  # every format's arithmetic is exact
    rows = torch.tensor([5, 0, 36, 5])
    assert torch.equal(w.dequantize(rows).double(), _reference(w)[rows])


@needs_native
@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 17, 64, 80])  # 1-3: in registers; then buffered, or (bf16) panels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_matches_dequantize_then_matmul(name: str, rows: int, dtype: torch.dtype) -> None:
    t = TYPES[name]
    k = 512 if t == 12 else 160  # several blocks; out = 45: no whole number of tiles or grains
    w = _blocks(t, 45, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    bias = torch.randn(45, generator=torch.Generator().manual_seed(3))
    ref = _reference(w)
    want = x.double() @ ref.T + bias.double()
    got = QuantLinear(w, bias.to(dtype))(x)
    assert got.dtype == dtype and got.shape == (rows, 45)
    # float32: float32 rounding only; bf16: the output (and from 4 rows on, the weight) rounded to bf16
    _close(got, want, x, ref, 1e-5 if dtype == torch.float32 else 2e-2)
    if dtype == torch.float32:
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)
    elif rows <= 3:  # few rows: the weight enters exactly (and x as taken), so one rounding of the float32 sum to bf16
        exact = _x_as_taken(name, x) @ ref.T + bias.to(dtype).double()
        _within_one_rounding(got, exact, x, ref)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_chunks_of_every_length_reach_the_float_matmul_in_few_shapes(
        monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """torch's bf16 matmul keeps state per shape: a server's prefill chunks of every length once
    made its memory grow for as long as it ran. Rows that reach F.linear are padded to whole
    DEQUANT_ROWS; bf16 rows on a build with the native bf16 matmul never reach it (the kernel
    dequantizes panels into that matmul's tiles)."""
    seen: set[tuple[int, ...]] = set()
    linear = F.linear

    def spy(x: torch.Tensor, *args: Any) -> torch.Tensor:
        seen.add(tuple(x.shape))
        return linear(x, *args)

    monkeypatch.setattr(quantized.F, "linear", spy)
    w = _blocks(TYPES["Q8_0"], 45, 64, seed=4)
    layer = QuantLinear(w)
    for rows in range(quantized.DEQUANT_ROWS + 1, 3 * quantized.DEQUANT_ROWS + 1):
        x = torch.randn(rows, 64, dtype=dtype)
        got = layer(x)
        assert got.shape == (rows, 45)
        torch.testing.assert_close(got, (x.double() @ _reference(w).T).to(dtype), rtol=2e-2, atol=2e-2)
    kernels = native.kernels()
    in_panels = dtype == torch.bfloat16 and kernels is not None and kernels.matmul_isa != ""
    assert seen == (set() if in_panels else {(2 * quantized.DEQUANT_ROWS, 64), (3 * quantized.DEQUANT_ROWS, 64)})


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


needs_matmul = pytest.mark.skipif(not (native.kernels() and native.kernels().matmul_isa),  # type: ignore[union-attr]
                                  reason="the build has no native bf16 matmul")


@needs_matmul
@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("rows", [32, 33, 80])  # from kPanelRows (32): whole tiles of rows and a part
def test_many_bf16_rows_are_the_bf16_matmul_over_the_rounded_weight(name: str, rows: int, two_threads: None) -> None:
    """Many bf16 rows take dequantized panels through the native bf16 matmul: bit for bit what
    that matmul gives over the weight dequantized, rounded to bf16 and packed (linear.py) — which
    the block tiles of fewer rows, summing in another order, would not be. That in turn is the
    float64 product to within one rounding. 100 outputs make three panels of 48 (the last padded),
    2 x 37 gate|up outputs three of 16; with 2 threads a thread fills its buffer for a second
    panel whatever the host's core count."""
    kernels = native.kernels()
    assert kernels is not None and kernels.linear is not None and kernels.linear_silu_mul is not None
    t = TYPES[name]
    k = 512 if t == 12 else 96
    w = _blocks(t, 100, k, seed=rows + 7)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    bias = torch.randn(100, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    rounded = w.dequantize().to(torch.bfloat16)
    got = QuantLinear(w, bias)(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 100)
    assert torch.equal(got, kernels.linear(x, pack_panels(rounded), 100, bias))
    ref = _reference(w).to(torch.bfloat16).double()
    _within_one_rounding(got, x.double() @ ref.T + bias.double(), x, ref)

    gu = _blocks(t, 2 * 37, k, seed=rows + 8)
    got = QuantLinear(gu, gate_up=True).silu_mul(x)
    assert got.shape == (rows, 37)
    assert torch.equal(got, kernels.linear_silu_mul(x, pack_gate_up_panels(gu.dequantize().to(torch.bfloat16)), 37))
    gate, up = (x.double() @ _reference(gu).to(torch.bfloat16).double().T).chunk(2, dim=-1)
    want = F.silu(gate) * up
    assert torch.allclose(got.double(), want, rtol=2.0**-7, atol=1e-5 * float(want.abs().max()))


@needs_native
@pytest.mark.parametrize("rows", [3, 40])  # the block tiles' row counts, and the panels' (which n = 0 skips)
def test_a_weight_of_no_rows_gives_empty_products_and_a_bad_x_a_clear_error(rows: int) -> None:
    k = native.kernels()
    assert k is not None and k.quant_linear is not None and k.quant_linear_silu_mul is not None
    none = torch.empty(0, 34, dtype=torch.uint8)  # Q8_0 rows of 32 values
    x = torch.randn(rows, 32).to(torch.bfloat16)
    assert k.quant_linear(x, none, 8, 32, None).shape == (rows, 0)
    assert k.quant_linear_silu_mul(x, none, 8, 32).shape == (rows, 0)
    w = _blocks(TYPES["Q8_0"], 4, 64, seed=1).data
    with pytest.raises(RuntimeError, match="with 64 columns"):
        k.quant_linear(x, w, 8, 64, None)  # x has 32
    with pytest.raises(RuntimeError, match="2-D"):
        k.quant_linear_silu_mul(torch.randn(64).to(torch.bfloat16), w, 8, 64)


@needs_native
@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 17, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 4-31 rows: the vector epilogue
def test_quant_silu_mul_matches_the_reference(name: str, rows: int, dtype: torch.dtype) -> None:
    t = TYPES[name]
    k = 256 if t == 12 else 64
    w = _blocks(t, 2 * 21, k, seed=5)  # 21 outputs: the last run of 16 products holds 5 pairs
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(6)).to(dtype)
    gate, up = (x.double() @ _reference(w).T).chunk(2, dim=-1)
    want = F.silu(gate) * up
    if dtype == torch.bfloat16 and rows <= 3:  # few rows: x as taken (8-bit blocks on AVX2 builds)
        gate, up = (_x_as_taken(name, x) @ _reference(w).T).chunk(2, dim=-1)
        want = F.silu(gate) * up
    got = QuantLinear(w, gate_up=True).silu_mul(x)
    assert got.shape == (rows, 21) and got.dtype == dtype
    if dtype == torch.float32:
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    elif rows <= 3:  # few rows: exact weights, float32 sums and silu, one rounding to bf16
        assert torch.allclose(got.double(), want, rtol=2.0**-8, atol=1e-5 * float(want.abs().max()))
    else:  # the output rounded to bf16, and the weight too (the bf16 tiles and panels; F.linear)
        assert torch.allclose(got.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@needs_native
@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("rows", [3, 5])  # 3: the few-row paths (8-bit blocks of x on AVX2); 5: buffered
def test_an_infinite_or_nan_x_gives_products_that_are_not_finite(name: str, rows: int) -> None:
    """A non-finite value in a row of x makes that row's products non-finite on every path (the
    8-bit blocks of x included), and leaves the other rows' products finite."""
    t = TYPES[name]
    k = 512 if t == 12 else 96
    w = _blocks(t, 21, k, seed=4)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    x[0, 40] = float("nan")
    x[1, 70] = float("inf")
    got = QuantLinear(w)(x)
    assert not got[:2].isfinite().any()
    assert got[2:].isfinite().all()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["x86-64", "haswell", "skylake-avx512"])
def test_other_builds_pass_the_block_kernel_tests(arch: str) -> None:
    """The block kernels built for a baseline x86-64 CPU (x86-64: the portable loops), an AVX2-only
    CPU (haswell: 8-lane vectors, one-row tiles of the 4-bit path) and AVX-512 without BF16
    (skylake-avx512: float32 x in the block tiles) pass the tests above, in a subprocess whose
    library is a second cached build (skipped where this machine's own build takes the same
    branches: the tests above ran on it)."""
    skip_unless_host_runs(arch)
    tests = "matches_the_gguf_package or matches_dequantize_then_matmul or silu_mul_matches or not_finite"
    if arch != "x86-64":  # the panels of many bf16 rows (haswell: 8 x 8 transposes, the AVX2 matmul;
        tests += " or are_the_bf16_matmul"  # skylake-avx512: 16 x 16, bf16 by integer rounding, AVX2 matmul)
    assert_tests_pass_on_build(arch, [__file__], tests)


def test_row_operations_act_on_block_rows() -> None:
    w = _blocks(8, 12, 64, seed=9)
    ref = _reference(w)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_reference(quantized.permute_rows(w, order)), ref[order])  # type: ignore[arg-type]
    parts = quantized.split_rows(w, [4, 8])
    assert [p.shape for p in parts] == [(4, 64), (8, 64)]
    back = quantized.cat_rows(parts, torch.float32)
    assert isinstance(back, QuantizedWeight) and torch.equal(back.data, w.data)
    mixed = quantized.cat_rows([w, _blocks(2, 3, 64, seed=1)], torch.float32)  # mixed types: dequantized
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (15, 64)


# ---- a tiny GGUF file with quantized tensors ----------------------------------------------------------
_TINY_TYPES = {"attn_q": 2, "attn_k": 2, "attn_v": 2, "attn_output": 2, "ffn_gate": 3, "ffn_up": 3,
               "ffn_down": 8, "token_embd": 8}
_MIXED = {"attn_v": 8}  # layer 0: v in Q8_0 beside q, k in Q4_0: that q|k|v group is dequantized


def _write_quantized_gguf(hf_dir: Path, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """test_gguf.write_tiny_gguf, each 2-D weight quantized as it is added (types: _TINY_TYPES)."""
    from test_gguf import write_tiny_gguf

    add = gguf.GGUFWriter.add_tensor

    def add_quantized(self: Any, name: str, arr: np.ndarray, **kw: Any) -> None:
        kind = name.split(".")[-2]
        t = (_MIXED if name.startswith("blk.0.") else {}).get(kind, _TINY_TYPES.get(kind))
        if t is None or arr.ndim != 2:
            return add(self, name, arr, **kw)
        return add(self, name, quantize(arr, GGMLQuantizationType(t)), raw_dtype=GGMLQuantizationType(t))

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", add_quantized)
    write_tiny_gguf(hf_dir, path)
    monkeypatch.undo()


@pytest.fixture(scope="module")
def tiny_quantized_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_hf_dir import write_tiny_model

    root = tmp_path_factory.mktemp("tiny-quant")
    write_tiny_model(root / "hf", "llama", seed=3)
    path = root / "tiny-q.gguf"
    with pytest.MonkeyPatch.context() as mp:
        _write_quantized_gguf(root / "hf", path, mp)
    return path


def _resident(llm: LLM) -> Any:
    from conftest import worker_of

    return worker_of(llm).context.runner.model  # type: ignore[union-attr]


@needs_native
def test_tiny_quantized_gguf_generates_as_its_dequantized_self(tiny_quantized_gguf: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    prompts = ["hello world", "abc abc abc", "The quick brown fox"]
    runs = {}
    for q in ("none", "gguf"):
        with LLM(str(tiny_quantized_gguf), dtype="float32", quantization=q, num_kv_blocks=64) as llm:
            runs[q] = llm.generate(prompts, params, use_tqdm=False)
            if q == "gguf":
                model = _resident(llm)
                kinds = {type(lin).__name__ for layer in model.layers for lin in (layer.qkv, layer.o)}
                assert isinstance(model.embed, QuantizedWeight) and isinstance(model.lm_head, QuantLinear)
                assert model.lm_head.qweight is model.embed  # tied: one copy of the blocks
                assert isinstance(model.layers[1].qkv, QuantLinear) and kinds == {"Linear", "QuantLinear"}
                assert not isinstance(model.layers[0].qkv, QuantLinear)  # the mixed group went float
    for plain, quant in zip(runs["none"], runs["gguf"], strict=True):
        assert quant.outputs[0].token_ids == plain.outputs[0].token_ids
        for a, b in zip(plain.outputs[0].logprobs, quant.outputs[0].logprobs, strict=True):
            for token, lp in a.items():
                assert b[token].logprob == pytest.approx(lp.logprob, abs=1e-4)


@needs_native
@pytest.mark.parametrize("arch", ["phi3", "qwen3", "qwen3_moe", "mixtral"])
def test_family_gguf_quantized_generates_as_its_dequantized_self(
        arch: str, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each family's GGUF (test_families.write_gguf) with its 2-D weights in Q8_0: phi3's fused
    q|k|v and gate|up split by block rows, q/k norms, MoE experts and routers dequantized."""
    from test_families import Family, write_gguf

    fam = Family(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
    path = tmp_path_factory.mktemp("q") / f"{arch}.gguf"
    add = gguf.GGUFWriter.add_tensor

    def add_q8(self: Any, name: str, arr: np.ndarray, **kw: Any) -> None:
        if arr.ndim != 2 or arr.shape[1] % 32 or kw:
            return add(self, name, arr, **kw)
        q8 = GGMLQuantizationType.Q8_0
        return add(self, name, quantize(np.ascontiguousarray(arr, dtype=np.float32), q8), raw_dtype=q8)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", add_q8)
    write_gguf(fam, path)
    monkeypatch.undo()
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    prompts: Any = [{"prompt_token_ids": p} for p in ([5, 17, 99, 3], list(range(30, 60)))]
    runs = {}
    for q in ("none", "gguf"):
        with LLM(str(path), dtype="float32", quantization=q, num_kv_blocks=64, block_size=8) as llm:
            runs[q] = llm.generate(prompts, params, use_tqdm=False)
            if q == "gguf":
                assert isinstance(_resident(llm).layers[0].qkv, QuantLinear)
    for plain, quant in zip(runs["none"], runs["gguf"], strict=True):
        assert quant.outputs[0].token_ids == plain.outputs[0].token_ids
        for a, b in zip(plain.outputs[0].logprobs, quant.outputs[0].logprobs, strict=True):
            for token, lp in a.items():
                assert b[token].logprob == pytest.approx(lp.logprob, abs=1e-4)


def test_gguf_quantization_refuses_an_hf_checkpoint(tiny_model_dir: Path) -> None:
    with pytest.raises(Exception, match="quantization='gguf'"):
        with LLM(str(tiny_model_dir), dtype="float32", quantization="gguf", num_kv_blocks=16):
            pass


@pytest.mark.parametrize("quantization", ["gguf", "int8"])
def test_quantization_refuses_cuda(quantization: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused when the config resolves, before a GPU is touched (checked here as if torch saw one)."""
    from atomr_trio.engine.engine_config import EngineConfig, engine_config
    from atomr_trio.model.config import ModelConfig

    monkeypatch.setattr(EngineConfig, "resolved_device", lambda self: "cuda:0")
    cfg = engine_config(quantization=quantization, device="cuda")
    with pytest.raises(ValueError, match="runs on the CPU only"):
        cfg.resolve(ModelConfig("llama", 64, 64, 96, 1, 4, 2, 16, 1e-5, 1e4, 64, True))


def test_unknown_quantization_is_refused() -> None:
    from atomr_trio.engine.engine_config import engine_config

    with pytest.raises(ValueError, match="quantization"):
        engine_config(quantization="awq")


@needs_native
def test_gguf_quantization_without_native_kernels_fails_the_start(
        tiny_quantized_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantized, "_probed", lambda: (None, "the native kernels are switched off"))
    with pytest.raises(Exception, match="needs the native quantized matmul"):
        with LLM(str(tiny_quantized_gguf), dtype="float32", quantization="gguf", num_kv_blocks=16):
            pass


# ---- the default model -----------------------------------------------------------------------------


def _first_tokens(llm: LLM) -> list[tuple[int, dict[int, float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [(o.outputs[0].token_ids[0], {t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()})
            for o in outs]


def _weight_bytes(model: Any) -> int:
    """Bytes of the weight matrices and embedding the model holds (each storage once)."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    add(model.embed.data if isinstance(model.embed, QuantizedWeight) else model.embed)
    for layer in model.layers:
        for lin in (layer.qkv, layer.o, *layer.mlp.linears()):
            add(lin.qweight.data if isinstance(lin, QuantLinear) else lin.weight if lin.weight is not None
                else lin.panels)
    lm = model.lm_head
    add(lm.qweight.data if isinstance(lm, QuantLinear) else lm.weight if lm.weight is not None else lm.panels)
    return sum(seen.values())


@pytest.mark.real_model
@pytest.mark.slow
@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_model_quantized_stays_close_to_float32(dtype: str, make_llm: Any) -> None:
    """Q4_1 / Q8_0 blocks with `dtype` activations against our float32 path on the same file's
    dequantized weights: the same weights, so the gap is only float rounding and bf16 activations."""
    ref = _first_tokens(make_llm(dtype="float32", max_model_len=1024, num_kv_blocks=256))
    quant_llm = make_llm(dtype=dtype, quantization="gguf", max_model_len=1024, num_kv_blocks=256)
    got = _first_tokens(quant_llm)
    same = sum(a[0] == b[0] for a, b in zip(ref, got, strict=True))
    gap = max(abs(lp - ref_lps[t]) for (_, ref_lps), (_, lps) in zip(ref, got, strict=True)
              for t, lp in lps.items() if t in ref_lps)
    print(f"quantization=gguf, {dtype}: {same}/{len(PROMPTS)} first tokens as float32, worst logprob gap {gap:.4f}")
    model = _resident(quant_llm)
    print(f"weights held: {_weight_bytes(model) / 2**20:.1f} MiB")
    assert same >= len(PROMPTS) - (0 if dtype == "float32" else 1)
    assert gap < (1e-3 if dtype == "float32" else 0.5), gap
    assert isinstance(model.embed, QuantizedWeight) and model.embed.type_name == "Q8_0"
    assert all(isinstance(lin, QuantLinear) and lin.qweight.type_name == "Q4_1"
               for layer in model.layers for lin in (layer.qkv, layer.o, *layer.mlp.linears()))
    assert _weight_bytes(model) < 120 * 2**20  # Q4_1 layers + one Q8_0 embedding, tied


@pytest.mark.real_model
@pytest.mark.slow
@needs_native
def test_default_model_quantized_batch_one_decode_stays_close_to_float32(make_llm: Any) -> None:
    """The second token of each prompt, decoded alone (a step of one row: on AVX2 builds the
    integer path over x in 8-bit blocks, see _x_as_taken), with bf16 activations against float32
    on the same GGUF blocks: the bound of the first tokens' bf16 check."""
    params = SamplingParams(temperature=0.0, max_tokens=2, logprobs=5, ignore_eos=True)
    ref = make_llm(dtype="float32", quantization="gguf", max_model_len=1024, num_kv_blocks=256)
    want = [o.outputs[0] for o in ref.generate(PROMPTS, params, use_tqdm=False)]
    llm = make_llm(dtype="bfloat16", quantization="gguf", max_model_len=1024, num_kv_blocks=256)
    got = [llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in PROMPTS]
    pairs = [(a, b) for a, b in zip(want, got, strict=True) if a.token_ids[0] == b.token_ids[0]]
    assert len(pairs) >= len(PROMPTS) - 1
    same = sum(a.token_ids[1] == b.token_ids[1] for a, b in pairs)
    gap = max(abs(b.logprobs[1][t].logprob - lp.logprob) for a, b in pairs
              for t, lp in a.logprobs[1].items() if t in b.logprobs[1])
    print(f"batch-1 decode, gguf bf16: {same}/{len(pairs)} second tokens as float32, worst logprob gap {gap:.4f}")
    assert same >= len(pairs) - 1
    assert gap < 0.5, gap
