"""A decode step's layers in one native call (csrc/decode_layers.cpp, `LlamaModel.fused_decode`):
the same tokens and logprobs, bit for bit, as the Python loop over the same kernels; used only
where every part it runs is what that loop would run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import worker_of
from test_hf_dir import write_tiny_model

from atomr_trio import LLM, SamplingParams
from atomr_trio.async_llm import engine_config
from atomr_trio.executor.context import Context
from atomr_trio.executor.model_runner import BatchItem, StepBatch
from atomr_trio.executor.sampler import SampleRow
from atomr_trio.model import cpu_kernels, llama, native
from atomr_trio.model_source import ModelSource

PROMPTS = ["hello there", ("a longer prompt that spans more than one block of the KV cache,"
                          " whether a block holds sixteen or sixty-four tokens"), "x", "1 2 3"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3)


def _needs_native() -> None:
    for part in ("matmul", "ops"):
        why = cpu_kernels.unavailable(part, "native", torch.bfloat16)
        if why:
            pytest.skip(f"native {part} kernel path unavailable here: {why}")


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])  # q/k/v biases; a sliding window
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(f"tiny-fused-{request.param}")
    overrides = {"sliding_window": 6} if request.param == "mistral" else None  # shorter than most contexts
    write_tiny_model(path, request.param, seed=5, config_overrides=overrides)
    return path


def _generate(model_dir: Path, **settings: Any) -> tuple[Any, list[tuple[list[int], list[Any]]]]:
    with LLM(str(model_dir), **{"dtype": "bfloat16", "max_model_len": 256, "num_kv_blocks": 64, **settings}) as llm:
        model = worker_of(llm).context.runner.model
        outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        return model.fused_decode, [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]


def _fused_equals_loop(model_dir: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> Any:
    """Generate with the fused call (counted) and with the Python loop: the same tokens and
    logprobs, bit for bit. Returns the FusedDecode used."""
    _needs_native()
    k = native.kernels()
    assert k is not None and k.decode_layers is not None
    calls = []

    def counted(*args: Any) -> torch.Tensor:
        calls.append(args[0].shape[0])
        return k.decode_layers(*args)  # type: ignore[misc]

    with monkeypatch.context() as mp:
        mp.setitem(native._state, "k", dataclasses.replace(k, decode_layers=counted))
        fused, got = _generate(model_dir, **settings)
        assert fused is not None and calls, "decode steps took the fused call"
        assert max(calls) == len(PROMPTS) and min(calls) >= 1  # batched decode rows, and single ones
        mp.setattr(llama.LlamaModel, "_fuse_decode", lambda self, plan: None)
        unfused, want = _generate(model_dir, **settings)
    assert unfused is None
    assert got == want
    return fused


def test_fused_decode_gives_the_python_loops_tokens_and_logprobs(tiny_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fused = _fused_equals_loop(tiny_dir, monkeypatch)
    assert set(fused.qtypes) == {-1}  # every matrix on the bf16 panels


def test_fused_decode_of_many_rows(tiny_dir: Path) -> None:
    """A decode step of 12 rows (more than one tile of rows: each matmul asks for its next panels
    and, in the fused call, for the next matmul's first ones, linear_bf16.cpp): the fused call's
    hidden states are the Python loop's, bit for bit. (At the model's forward, not through LLM:
    there how many of 12 prompts the first step takes depends on when they arrive, which moves
    where the 256-token prompt budget cuts a prompt into chunks, and with it the prompt's bits.)"""
    _needs_native()
    source = ModelSource.open(str(tiny_dir))
    cfg = engine_config(dtype="bfloat16", max_model_len=256, num_kv_blocks=64).resolve(source.config)
    runner = Context(source, cfg).runner
    model = runner.model
    assert model.fused_decode is not None
    row = SampleRow(SamplingParams(temperature=0.0), None, None, None, 0)
    rows = 12
    tables = [[2 * i, 2 * i + 1] for i in range(rows)]
    runner.execute(StepBatch([BatchItem(i, [(7 * i + 3 * j) % 200 + 3 for j in range(10)], 0, tables[i], row)
                              for i in range(rows)]))
    ids, positions, meta, _ = runner._prepare([BatchItem(i, [i + 5], 10, tables[i], row) for i in range(rows)])
    fused = model.forward(ids, positions, meta, runner.kv_cache).clone()
    model.fused_decode = None
    loop = model.forward(ids, positions, meta, runner.kv_cache)
    assert torch.equal(fused, loop)


def test_fused_decode_over_int8_panels(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fused = _fused_equals_loop(tiny_dir, monkeypatch, quantization="int8")
    assert set(fused.qtypes) == {-2}  # every matrix int8 (model/int8.py)


def test_fused_decode_over_gguf_blocks_and_panels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF kept quantized whose layer 0 has a q|k|v group dequantized (bf16 panels there, GGUF
    blocks elsewhere: Q4_0, Q4_1, Q8_0): the fused call gives the loop's tokens and logprobs."""
    from test_quantized import _write_quantized_gguf

    write_tiny_model(tmp_path / "hf", "llama", seed=3)
    _write_quantized_gguf(tmp_path / "hf", tmp_path / "tiny-q.gguf", monkeypatch)
    fused = _fused_equals_loop(tmp_path / "tiny-q.gguf", monkeypatch, quantization="gguf")
    assert -1 in fused.qtypes and {2, 3, 8} <= set(fused.qtypes)
    assert fused.max_rows is not None and fused.runs(fused.max_rows) and not fused.runs(fused.max_rows + 1)


def test_fused_decode_only_where_the_python_loop_would_run_the_same_kernels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k norms (Qwen3) and MoE MLPs keep the Python loop; so does any plan but native ops with
    the native matmul."""
    _needs_native()
    for arch in ("qwen3", "qwen3_moe"):
        write_tiny_model(tmp_path / arch, arch)
        fused, got = _generate(tmp_path / arch)
        assert fused is None, arch
        assert all(len(ids) == PARAMS.max_tokens for ids, _ in got)
    write_tiny_model(tmp_path / "llama", "llama")
    monkeypatch.setenv(cpu_kernels.ENV, "matmul=torch,ops=native")
    assert _generate(tmp_path / "llama")[0] is None
    monkeypatch.setenv(cpu_kernels.ENV, "native")
    assert _generate(tmp_path / "llama")[0] is not None
