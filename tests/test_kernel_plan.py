"""The CPU kernel plan (model/cpu_kernels.py): every fast path is probed before it is used; a path
that raises or answers wrong is passed over for the next one and the engine still serves the
same tokens; a forced path that cannot run is a clear error; an AVX2-only CPU gets a working
bf16 engine."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kernel_path_unavailable
from test_hf_dir import write_tiny_model
from test_int8 import build_env

from atomr_trio import LLM, SamplingParams
from atomr_trio.engine.engine_config import EngineConfig
from atomr_trio.model import cpu_kernels, kernel_probes, native
from atomr_trio.model.config import ModelConfig
from atomr_trio.model_source import ModelSource

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["hello there", ("a longer prompt that spans more than one block of the KV cache,"
                          " whether a block holds sixteen or sixty-four tokens"), "x"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-kernels")
    write_tiny_model(path, "llama")
    return path


@pytest.fixture(scope="module")
def tiny_cfg(tiny_dir: Path) -> ModelConfig:
    return ModelSource.open(str(tiny_dir)).config


def _tokens(tiny_dir: Path, dtype: str) -> tuple[str, list[list[int]]]:
    with LLM(str(tiny_dir), dtype=dtype, max_model_len=256, num_kv_blocks=64) as llm:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        return llm.stats()["kernels"], [o.outputs[0].token_ids for o in outs]


def test_the_switch_names_paths_per_part(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, want in [("native", {"matmul": "native", "ops": "native"}),
                        ("onednn", {"matmul": "onednn", "ops": "torch"}),
                        ("torch", {"matmul": "torch", "ops": "torch"}),
                        ("matmul=onednn,ops=native", {"matmul": "onednn", "ops": "native"}),
                        ("ops=native", {"matmul": "torch", "ops": "native"})]:
        monkeypatch.setenv(cpu_kernels.ENV, value)
        assert cpu_kernels.forced() == want, value
    for bad in ("fast", "ops=onednn", "matmul=native,gemm=torch"):
        monkeypatch.setenv(cpu_kernels.ENV, bad)
        with pytest.raises(cpu_kernels.KernelUnavailable, match="native"):
            cpu_kernels.forced()
    monkeypatch.setenv(cpu_kernels.ENV, "auto")
    assert cpu_kernels.forced() is None


def test_auto_dtype_is_bf16_only_with_a_bf16_matmul_path_beyond_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    for forced, want in (("torch", "float32"), ("matmul=torch,ops=native", "float32"), ("onednn", "bfloat16"),
                         ("native", "bfloat16")):
        monkeypatch.setenv(cpu_kernels.ENV, forced)
        assert EngineConfig().resolved_dtype() == want, forced
    monkeypatch.delenv(cpu_kernels.ENV)
    real = cpu_kernels.unavailable
    # a native matmul that widens bf16 (AVX2, NEON) is also timed against float32: the next test's
    # subject; here it times faster
    monkeypatch.setattr(cpu_kernels.kernel_probes, "time_bf16_against_float32", lambda path="native": (0.03, 0.07))
    for lacking in (("native",), ("onednn",), ("native", "onednn")):
        cpu_kernels._probed_bf16_matmul.cache_clear()
        monkeypatch.setattr(cpu_kernels, "unavailable", lambda part, path, dtype, cfg=None, lacking=lacking:
                            "lacks it" if path in lacking else real(part, path, dtype, cfg))
        others = {"native", "onednn"} - set(lacking)  # bf16 if one of them runs on this machine
        expect = "bfloat16" if any(real("matmul", p, torch.bfloat16) is None for p in others) else "float32"
        assert EngineConfig().resolved_dtype() == expect, lacking
        assert EngineConfig(dtype="bfloat16").resolved_dtype() == "bfloat16"  # asked for: always honoured
    cpu_kernels._probed_bf16_matmul.cache_clear()


def test_each_forced_path_is_the_plan(kernel_path: str, tiny_cfg: ModelConfig) -> None:
    plan = cpu_kernels.choose(tiny_cfg, torch.bfloat16)
    assert plan.matmul == kernel_path
    assert plan.ops == ("native" if kernel_path == "native" else "torch")
    assert plan.one_row_gemv == (kernel_path == "onednn")
    assert plan.sampling == (kernel_path == "native")
    f32 = cpu_kernels.choose(tiny_cfg, torch.float32)  # float32 weights have one matmul: F.linear
    assert (f32.matmul, f32.ops) == ("torch", plan.ops)


# ---- a probe that fails: the op raises, or answers wrong --------------------------------------------
def _raise(*args: object, **kwargs: object) -> torch.Tensor:
    raise RuntimeError("illegal instruction (simulated)")


def _wrong(real):  # the op's own answer, off by one everywhere
    def op(*args: object, **kwargs: object) -> torch.Tensor:
        return real(*args, **kwargs) + 1

    return op


def _break_native(monkeypatch: pytest.MonkeyPatch, field: str, how: str) -> None:
    k = native.kernels()
    assert k is not None
    real = getattr(k, field)
    broken = _raise if how == "raise" else _wrong(real)
    monkeypatch.setitem(native._state, "k", dataclasses.replace(k, **{field: broken}))


def _needs(path: str, part: str, dtype: torch.dtype = torch.bfloat16) -> None:
    why = cpu_kernels.unavailable(part, path, dtype)
    if why:
        pytest.skip(f"{path} kernel path unavailable here: {why}")


@pytest.mark.parametrize("how", ["raise", "wrong"])
def test_a_failing_native_matmul_falls_back_and_serves_the_same_tokens(
        how: str, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _needs("native", "matmul")
    _break_native(monkeypatch, "linear", how)
    with caplog.at_level("INFO", logger="atomr_trio.executor.worker"):
        kernels, got = _tokens(tiny_dir, "bfloat16")
    fallback = "onednn" if cpu_kernels.unavailable("matmul", "onednn", torch.bfloat16) is None else "torch"
    assert kernels == f"matmul={fallback}, ops=native"
    line = next(r.message for r in caplog.records if "CPU kernels" in r.message)
    assert f"matmul={fallback}" in line and "not matmul native:" in line
    assert ("raised RuntimeError: illegal instruction" if how == "raise" else "wrong answer") in line
    monkeypatch.setenv(cpu_kernels.ENV, f"matmul={fallback},ops=native")
    assert _tokens(tiny_dir, "bfloat16") == (kernels, got)  # exactly what that path gives when chosen


@pytest.mark.parametrize("how", ["raise", "wrong"])
def test_a_failing_onednn_matmul_falls_back_to_torch(how: str, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs("onednn", "matmul")
    monkeypatch.setenv("ATOMR_TRIO_NATIVE", "0")  # the next path after native, alone
    if how == "raise":  # what an AVX2-only CPU answers
        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", _raise)
    else:
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", _wrong(torch.ops.mkldnn._linear_pointwise))
    kernels, got = _tokens(tiny_dir, "bfloat16")
    assert kernels == "matmul=torch, ops=torch"
    monkeypatch.setenv(cpu_kernels.ENV, "torch")
    assert _tokens(tiny_dir, "bfloat16") == (kernels, got)


def test_a_failing_one_row_gemv_leaves_every_row_to_onednn(tiny_cfg: ModelConfig,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _needs("onednn", "matmul")
    monkeypatch.setenv(cpu_kernels.ENV, "onednn")
    assert cpu_kernels.choose(tiny_cfg, torch.bfloat16).one_row_gemv
    monkeypatch.setattr(torch._C, "_set_mkldnn_enabled", _raise)  # the switch GEMV needs
    plan = cpu_kernels.choose(tiny_cfg, torch.bfloat16)
    assert plan.matmul == "onednn" and not plan.one_row_gemv
    assert "not one-row ATen GEMV: its probe raised RuntimeError" in plan.describe()


@pytest.mark.parametrize("field", ["decode_attention", "add_rms_norm_", "rope_store_kv"])
@pytest.mark.parametrize("how", ["raise", "wrong"])
def test_failing_native_ops_fall_back_with_float32_torch_tokens(
        field: str, how: str, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs("native", "ops", torch.float32)
    monkeypatch.setenv(cpu_kernels.ENV, "torch")
    want = _tokens(tiny_dir, "float32")
    monkeypatch.delenv(cpu_kernels.ENV)
    _break_native(monkeypatch, field, how)
    assert _tokens(tiny_dir, "float32") == want  # served on torch ops, same greedy tokens


SAMPLED = [SamplingParams(temperature=1.0, top_p=0.8, seed=1, max_tokens=12, ignore_eos=True),
           SamplingParams(temperature=0.9, top_k=20, min_p=0.05, seed=2, max_tokens=12, ignore_eos=True)]


def _sampled(tiny_dir: Path) -> list[list[int]]:
    with LLM(str(tiny_dir), dtype="float32", max_model_len=256, num_kv_blocks=64) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], SAMPLED, use_tqdm=False)]


def test_the_sampler_draws_with_the_native_op_and_samples_what_torch_ops_sample(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs("native", "ops", torch.float32)
    monkeypatch.setenv(cpu_kernels.ENV, "torch")
    want = _sampled(tiny_dir)
    monkeypatch.delenv(cpu_kernels.ENV)
    k = native.kernels()
    assert k is not None and k.sample_rows is not None
    calls = []

    def spy(logits: torch.Tensor, *args: list) -> torch.Tensor:
        calls.append(logits.shape[0])
        return k.sample_rows(logits, *args)

    monkeypatch.setitem(native._state, "k", dataclasses.replace(k, sample_rows=spy))
    assert _sampled(tiny_dir) == want
    assert len(calls) > 12  # the probe's call, then the steps'


@pytest.mark.parametrize("how", ["raise", "cuts nothing"])
def test_a_failing_native_sampler_op_leaves_sampling_to_torch_ops_and_the_rest_native(
        how: str, tiny_cfg: ModelConfig, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs("native", "ops", torch.float32)
    want = _sampled(tiny_dir)
    k = native.kernels()
    assert k is not None
    real = k.sample_rows
    assert real is not None

    def uncut(logits: torch.Tensor, temps: list[float], *args: list) -> torch.Tensor:  # draws, cuts nothing
        n = logits.shape[0]
        return real(logits, temps, [0] * n, [1.0] * n, [0.0] * n, *args[3:])

    broken = _raise if how == "raise" else uncut
    monkeypatch.setitem(native._state, "k", dataclasses.replace(k, sample_rows=broken))
    plan = cpu_kernels.choose(tiny_cfg, torch.float32)
    assert plan.ops == "native" and not plan.sampling
    why = "raised RuntimeError" if how == "raise" else "sample_rows_: row 0 kept the wrong tokens"
    assert "not sampling native: " in plan.describe() and why in plan.describe()
    assert _sampled(tiny_dir) == want  # served with the torch cut: the same seeded tokens


def test_a_forced_path_that_cannot_run_is_an_error(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs("native", "ops", torch.float32)
    _break_native(monkeypatch, "decode_attention", "wrong")
    monkeypatch.setenv(cpu_kernels.ENV, "native")
    with pytest.raises(cpu_kernels.KernelUnavailable, match="the native ops path cannot run here: .*wrong answer"):
        _tokens(tiny_dir, "float32")


def test_a_server_whose_every_deployment_failed_exits_non_zero(tmp_path: Path) -> None:
    env = {**os.environ, cpu_kernels.ENV: "fast"}
    done = subprocess.run([sys.executable, "-m", "atomr_trio", "--port", "0", "--log-level", "warning"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "deployment 'SmolLM2-135M-Instruct' failed to start: KernelUnavailable" in done.stderr
    assert "ATOMR_TRIO_CPU_KERNELS='fast'" in done.stderr.splitlines()[-1]


def test_a_cpu_the_kernels_do_not_build_for_skips_the_native_build(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("platform.machine", lambda: "riscv64")
    with caplog.at_level("INFO", logger="atomr_trio.model.native"):
        assert native._load() is None
    assert "x86-64 and 64-bit Arm only" in caplog.text
    assert "x86-64 and 64-bit Arm only" in (cpu_kernels.unavailable("ops", "native", torch.float32) or "")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")  # 64-bit Arm (Linux) builds NEON and portable loops
    assert native.builds_here() and "64-bit Arm only" not in (native.missing() or "")
    assert "x86 CPUs only" in (cpu_kernels.unavailable("matmul", "onednn", torch.bfloat16) or "")


@pytest.mark.slow
def test_an_avx2_only_cpu_serves_bf16(tiny_dir: Path, tmp_path: Path) -> None:
    """This machine pretending to be an AVX2-only x86 (oneDNN and ATen capped at AVX2, kernels
    built for Haswell, or this machine's own build where it takes the same branches): bf16 serves
    on the AVX2 native matmul, dtype=auto is decided by timing it against float32, and forcing a
    path the CPU lacks names the missing feature."""
    if not native.is_x86_cpu():
        pytest.skip("a Haswell build needs an x86-64 CPU")
    env = {**build_env("haswell"), "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    env.pop(cpu_kernels.ENV, None)
    script = ("import json, logging, sys\nfrom atomr_trio import LLM, SamplingParams\n"
              "from atomr_trio.engine.engine_config import EngineConfig\n"
              "logging.basicConfig(level='INFO')\n"
              "print(json.dumps(EngineConfig().resolved_dtype()))\n"
              "with LLM(sys.argv[1], dtype='bfloat16', max_model_len=256, num_kv_blocks=64) as llm:\n"
              "    out = llm.generate(['hello there'], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)\n"
              "    print(json.dumps([llm.stats()['kernels'], out[0].outputs[0].token_ids]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_dir)], env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    dtype = json.loads(done.stdout.splitlines()[0])
    timed = re.search(r"dtype auto: the AVX2 bf16 matmul took ([\d.]+) ms, float32 F.linear ([\d.]+) ms.*: (\w+)",
                      done.stderr)
    assert timed, done.stderr[-2000:]
    assert timed[3] == dtype == ("bfloat16" if float(timed[1]) < float(timed[2]) else "float32")
    kernels, tokens = json.loads(done.stdout.splitlines()[-1])
    assert kernels == "matmul=native, ops=native" and len(tokens) == 8
    done = subprocess.run([sys.executable, "-c", script, str(tiny_dir)], env={**env, cpu_kernels.ENV: "onednn"},
                          capture_output=True, text=True, timeout=400)
    assert done.returncode != 0 and "avx512bw, avx512vl and avx512dq" in done.stderr


@pytest.mark.parametrize("isa", ["avx2", "neon"])
def test_auto_dtype_times_the_widened_matmul_when_it_is_the_only_bf16_path(isa: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the only bf16 path beyond torch is a native matmul that widens bf16 (AVX2, NEON), bf16
    iff it timed faster than float32 (the timing itself is stubbed here; the slow AVX2 test above
    runs it for real)."""
    _needs("native", "matmul")
    k = native.kernels()
    assert k is not None
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    monkeypatch.setitem(native._state, "k", dataclasses.replace(k, matmul_isa=isa))
    monkeypatch.setattr(cpu_kernels, "unavailable", lambda part, path, dtype, cfg=None:
                        "lacks it" if path == "onednn" else None)
    for times, want in (((0.03, 0.07), "bfloat16"), ((0.08, 0.07), "float32")):
        cpu_kernels._probed_bf16_matmul.cache_clear()
        monkeypatch.setattr(cpu_kernels.kernel_probes, "time_bf16_against_float32", lambda path="native", t=times: t)
        assert EngineConfig().resolved_dtype() == want, times
    cpu_kernels._probed_bf16_matmul.cache_clear()


def test_the_widened_timing_measures_both_kernels() -> None:
    _needs("native", "matmul")
    for path in ("native", "torch"):
        bf16_ms, float32_ms = cpu_kernels.kernel_probes.time_bf16_against_float32(path, rounds=2)
        assert 0 < bf16_ms < 50 and 0 < float32_ms < 50


def test_arm_cpus_with_bf16_instructions_keep_torchs_bf16_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """The NEON matmul widens bf16 to float32; on Arm CPUs with FEAT_BF16 torch's bf16 matmul
    multiplies in bf16, so the plan passes the native one over there (unless forced), and
    dtype=auto times torch's bf16 F.linear, the path the plan takes, against float32."""
    _needs("native", "matmul")
    k = native.kernels()
    assert k is not None
    monkeypatch.setitem(native._state, "k", dataclasses.replace(k, matmul_isa="neon"))
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    timed: list[str] = []
    monkeypatch.setattr(cpu_kernels.kernel_probes, "time_bf16_against_float32",
                        lambda path="native": (timed.append(path), (0.03, 0.07))[1])
    for flags, matmul, path in (({"fp", "asimd", "bf16", "i8mm"}, "torch", "torch"),
                                ({"fp", "asimd", "asimddp"}, "native", "native")):
        monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda f=frozenset(flags): f)
        plan = cpu_kernels.choose(kernel_probes.TINY, torch.bfloat16)
        assert plan.matmul == matmul, plan.describe()
        assert ("FEAT_BF16" in plan.describe()) == (matmul == "torch")
        cpu_kernels._probed_bf16_matmul.cache_clear()
        timed.clear()
        assert EngineConfig().resolved_dtype() == "bfloat16" and timed == [path]
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"fp", "asimd", "bf16"}))
    monkeypatch.setenv(cpu_kernels.ENV, "native")  # forced: the NEON matmul runs all the same
    assert cpu_kernels.choose(kernel_probes.TINY, torch.bfloat16).matmul == "native"
    cpu_kernels._probed_bf16_matmul.cache_clear()


def test_kernel_path_skips_name_the_missing_feature(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma", "f16c"}))
    # (off x86 the reason is the CPU's kind, whatever its flags)
    assert ("avx512bw" if native.is_x86_cpu() else "x86 CPUs only") in (kernel_path_unavailable("onednn") or "")
    monkeypatch.setenv("ATOMR_TRIO_NATIVE", "0")
    assert "ATOMR_TRIO_NATIVE=0" in (kernel_path_unavailable("native") or "")
    assert kernel_path_unavailable("torch") is None


def test_bf16_on_each_path_stays_close_to_float32(kernel_path: str, tiny_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The first token's distribution in bf16, on each path, against float32 on plain torch."""
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)

    def first_logprobs(dtype: str) -> list[dict[int, float]]:
        with LLM(str(tiny_dir), dtype=dtype, max_model_len=256, num_kv_blocks=64) as llm:
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
            return [{t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outs]

    got = first_logprobs("bfloat16")
    monkeypatch.setenv(cpu_kernels.ENV, "torch")
    want = first_logprobs("float32")
    for g, w in zip(got, want, strict=True):
        assert max(g, key=g.__getitem__) == max(w, key=w.__getitem__)
        assert max(abs(lp - w[t]) for t, lp in g.items() if t in w) < 0.1
