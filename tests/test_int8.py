"""int8 weights and activations (`quantization="int8"`, model/int8.py, csrc/linear_int8.cpp):
every build of the kernel against the rule computed exactly in float64 (int8.py's
`reference_linear`), tile edges and odd shapes included; the packing held once; the engine with
every matrix int8 (the fused decode call giving the Python loop's tokens); and (real_model) the
default model against float32: first tokens and logprob gap, and its memory."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from atomr_trio import LLM, SamplingParams
from atomr_trio.model import int8, native
from atomr_trio.model.cpu_kernels import cpu_flags
from atomr_trio.model.int8 import GROUP, pack_int8, quantize_activations, quantize_weight, reference_linear

needs_native = pytest.mark.skipif(native.kernels() is None, reason="the native kernels did not build here")

ROWS = [1, 3, 8, 9, 17, 64, 130]  # one tile and its edges (8 rows a tile), many tiles
# (n, k): n not a multiple of a panel's 48 columns (padding must not leak), k a whole number of
# groups, k ending in a short group (68 = 64 + 4, 200 = 3 * 64 + 8), the default model's shapes
SHAPES = [(100, 64), (37, 68), (96, 200), (576, 576), (40, 1536)]


def _magnitude(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float64 [M, N]: sw * sum_g sx_g * sum |qx| (|qw| + 128), the size of the float32 terms the
    kernel adds (the unsigned weight's 128 included), for its rounding bound."""
    qx, sx = quantize_activations(x)
    qw, sw = quantize_weight(w)
    out = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for g in range(sx.shape[1]):
        part = slice(g * GROUP, (g + 1) * GROUP)
        out += (qx[:, part].abs().double() @ (qw[:, part].abs().double() + 128).T) * sx[:, g].double()[:, None]
    return out * sw.double()[None, :]


def _excess(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor) -> float:
    """The worst error beyond float32 summation over the groups plus one rounding to got's dtype
    (<= 0: within)."""
    groups = magnitude.new_tensor(-(-4096 // GROUP))  # at most this many groups in these cases
    ulp = 2.0**-8 if got.dtype == torch.bfloat16 else 2.0**-23
    bound = (groups + 4) * 2.0**-23 * magnitude + want.abs() * ulp + 1e-30
    return float(((got.double() - want).abs() - bound).max())


def excess_table() -> dict[str, Any]:
    """Every case's worst excess over its bound, for the kernels this process built (run here, and
    in subprocesses for the other builds)."""
    k = native.kernels()
    assert k is not None and k.int8_linear is not None and k.int8_linear_silu_mul is not None
    out: dict[str, Any] = {"isa": k.int8_isa}
    for n, kin in SHAPES:
        g = torch.Generator().manual_seed(n * 7 + kin)
        w = torch.randn(n, kin, generator=g) * kin**-0.5
        w[0, :] *= 40  # one column far larger than the rest: its own scale
        bias = torch.randn(n, generator=g)
        gate_up = torch.cat([w, w.roll(1, 0)]).contiguous()
        packed, packed_gu = pack_int8(w), pack_int8(gate_up, gate_up=True)
        for rows in ROWS:
            x = torch.randn(rows, kin, generator=g)
            x[:, kin // 2] *= 50  # an outlier input, as real activations have
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                want = reference_linear(xd, w, bias)
                mag = _magnitude(xd, w) + bias.double().abs()
                got = k.int8_linear(xd, packed, n, bias)
                assert got.dtype == dtype
                out[f"linear {rows}x{kin}->{n} {dtype}"] = _excess(got, want, mag)
                both = reference_linear(xd, gate_up)
                want = F.silu(both[:, :n]) * both[:, n:]
                m2 = _magnitude(xd, gate_up)
                # silu's slope is at most 1.1 and up's term carries silu(gate) as a factor
                mag = 1.1 * m2[:, :n] * both[:, n:].abs() + F.silu(both[:, :n]).abs() * m2[:, n:] + want.abs() * 1e-6
                got = k.int8_linear_silu_mul(xd, packed_gu, n)
                out[f"silu_mul {rows}x{kin}->{n} {dtype}"] = _excess(got, want, mag)
    return out


@pytest.fixture(scope="module")
def native_excess() -> dict[str, Any]:
    if native.kernels() is None:
        pytest.skip("the native kernels did not build here")
    return excess_table()


# what a host needs to run code built with ATOMR_TRIO_NATIVE_ARCH=<arch> (-march=<arch>)
ARCH_FLAGS = {"x86-64": set(), "haswell": {"avx2", "fma", "f16c", "bmi2"},
              "skylake-avx512": {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "f16c"}}


def skip_unless_host_runs(arch: str) -> None:
    """Skip unless this host can build the native kernels for `arch` and execute them."""
    if not native.is_x86_cpu() or shutil.which("g++") is None:
        pytest.skip("the x86 builds need x86-64 and g++")
    if native.kernels() is None:
        pytest.skip("the native kernels are off or did not build here")
    lacking = ARCH_FLAGS[arch] - cpu_flags()
    if lacking:
        pytest.skip(f"this CPU cannot run a {arch} build (no {', '.join(sorted(lacking))})")


@functools.cache
def native_is_like(arch: str) -> bool:
    """Does this machine's own kernel build (-march=native, or ATOMR_TRIO_NATIVE_ARCH) take the same
    preprocessor branches of the kernel sources as a build for `arch`? It does when the compiler
    predefines the same value for every macro the sources test (__AVX2__, __AVX512BF16__, ...)
    under both flags, as on an AVX2-only CPU for haswell. False wherever that cannot be told."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if not native.is_x86_cpu() or cxx is None:
        return False  # (the x86 builds need both; the callers skip or fail without them as before)
    sources = (*native.SOURCES, *native.HEADERS)
    tested = {m for src in sources for m in re.findall(r"\b__[A-Z0-9_]+__\b", src.read_text())}

    def defined(march: str) -> set[str] | None:
        try:
            done = subprocess.run([cxx, f"-march={march}", "-dM", "-E", "-x", "c++", "-"], input="",
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0:
            return None
        return {line for line in done.stdout.splitlines() if line.split()[1:2] and line.split()[1] in tested}

    own = defined(native.march())
    return own is not None and own == defined(arch)


def skip_if_native_is_like(arch: str) -> None:
    """Skip a test that would build the kernels for `arch` only to run what this process already ran."""
    if native_is_like(arch):
        pytest.skip(f"this machine's build compiles the same kernel branches as a {arch} build: its tests ran here")


def build_env(arch: str) -> dict[str, str]:
    """The environment of a subprocess whose kernels are built for `arch`: a second cached build, or
    this machine's own where it compiles the same branches (no second build)."""
    return dict(os.environ) if native_is_like(arch) else {**os.environ, "ATOMR_TRIO_NATIVE_ARCH": arch}


def assert_tests_pass_on_build(arch: str, tests: list[str], k: str, timeout: int = 600) -> None:
    """Run pytest on `tests` (selected by -k `k`) in a subprocess whose native kernels are built
    for `arch` (a second cached build): it passes, and no selected test is skipped. Skipped where
    this machine's build is like `arch`'s: the main run has run those tests on it."""
    skip_if_native_is_like(arch)
    env = {**os.environ, "ATOMR_TRIO_NATIVE_ARCH": arch}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k", k],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-500:]


def _other_build(arch: str) -> dict[str, Any]:
    skip_unless_host_runs(arch)
    skip_if_native_is_like(arch)  # (then test_this_machines_build_... checks the same table)
    script = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_int8; "
              "print(json.dumps(test_int8.excess_table()))")
    env = {**os.environ, "ATOMR_TRIO_NATIVE_ARCH": arch}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return table


@pytest.fixture(scope="module")
def haswell_excess() -> dict[str, Any]:
    """The AVX2 build (no AVX-512: the AVX2 byte products, scalar quantization and epilogue)."""
    return _other_build("haswell")


@pytest.fixture(scope="module")
def skylake_excess() -> dict[str, Any]:
    """An AVX-512 build without VNNI: vector quantization and epilogue around the AVX2 byte products."""
    return _other_build("skylake-avx512")


@pytest.fixture(scope="module")
def portable_excess() -> dict[str, Any]:
    """The baseline x86-64 build (no AVX2): the portable loops throughout."""
    return _other_build("x86-64")


CASES = [f"{op} {rows}x{k}->{n} {dtype}" for op in ("linear", "silu_mul") for n, k in SHAPES for rows in ROWS
         for dtype in (torch.float32, torch.bfloat16)]


@needs_native
def test_this_machines_build_matches_the_rule_to_float32_rounding(native_excess: dict[str, Any]) -> None:
    worst = {case: native_excess[case] for case in CASES if native_excess[case] > 0}
    assert not worst, worst


@pytest.mark.slow
def test_the_avx2_build_matches_the_rule_to_float32_rounding(haswell_excess: dict[str, Any]) -> None:
    assert haswell_excess["isa"] == "avx2"
    worst = {case: haswell_excess[case] for case in CASES if haswell_excess[case] > 0}
    assert not worst, worst


@pytest.mark.slow
def test_an_avx512_build_without_vnni_matches_the_rule_to_float32_rounding(skylake_excess: dict[str, Any]) -> None:
    assert skylake_excess["isa"] == "avx2"
    worst = {case: skylake_excess[case] for case in CASES if skylake_excess[case] > 0}
    assert not worst, worst


@pytest.mark.slow
def test_the_portable_build_matches_the_rule_to_float32_rounding(portable_excess: dict[str, Any]) -> None:
    assert portable_excess["isa"] == "portable"
    worst = {case: portable_excess[case] for case in CASES if portable_excess[case] > 0}
    assert not worst, worst


def test_the_rule_is_int8_arithmetic_not_float() -> None:
    """The reference the kernels are held to differs from the float product by the quantization
    (so matching it is not matching float math), and stays within the quantization's error."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 200, generator=g), torch.randn(30, 200, generator=g)
    exact = x.double() @ w.double().T
    ref = reference_linear(x, w)
    err = (ref - exact).abs().max() / exact.abs().max()
    assert 1e-4 < float(err) < 0.02
    qx, sx = quantize_activations(x)
    assert qx.abs().max() == 127 and sx.shape == (5, 4)  # 200 inputs: groups of 64, 64, 64 and 8
    qw, sw = quantize_weight(w)
    assert qw.dtype == torch.int8 and qw.abs().max() == 127 and sw.shape == (30,)


@needs_native
def test_rows_of_zeros_and_non_finite_rows() -> None:
    k = native.kernels()
    assert k is not None and k.int8_linear is not None
    w = torch.randn(20, 128)
    x = torch.randn(4, 128)
    x[1] = 0
    x[2, 70] = float("inf")
    x[3, 5] = float("nan")
    x[0, 64:128] = 1e-38  # a group too small to scale (127 / max overflows): zeros at int8's precision
    y = k.int8_linear(x, pack_int8(w), 20, torch.ones(20))
    assert torch.equal(y[1], torch.ones(20))  # zeros times anything, plus the bias
    assert bool(y[2].isnan().all()) and bool(y[3].isnan().all())  # as a float matmul spreads them
    x[0, 64:128] = 0
    assert torch.allclose(y[0].double(), reference_linear(x[:1], w, torch.ones(20))[0], rtol=1e-5, atol=1e-5)
    assert k.int8_linear(x[:0], pack_int8(w), 20, None).shape == (0, 20)


@needs_native
def test_bad_input_is_a_clear_error() -> None:
    k = native.kernels()
    assert k is not None and k.int8_linear is not None
    w = pack_int8(torch.randn(20, 64))
    with pytest.raises(RuntimeError, match="packed in panels"):
        k.int8_linear(torch.randn(2, 64), w, 49, None)  # 49 outputs need two panels, these bytes hold one
    with pytest.raises(RuntimeError, match="inputs in fours"):
        k.int8_linear(torch.randn(2, 62), w, 20, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        k.int8_linear(torch.randn(2, 64).half(), w, 20, None)
    with pytest.raises(ValueError, match="inputs in fours"):
        pack_int8(torch.randn(8, 6))


def test_a_packed_weight_is_one_byte_per_weight_plus_its_scales() -> None:
    assert pack_int8(torch.randn(96, 64)).numel() == 96 * 64 + 96 * 4  # two whole panels of 48
    assert pack_int8(torch.randn(100, 64)).numel() == 144 * 64 + 144 * 4  # padded to three
    assert pack_int8(torch.randn(2 * 40, 64), gate_up=True).numel() == 96 * 64 + 96 * 4  # 3 x (16 + 16)


# ---- in the engine -----------------------------------------------------------------------------------


def _first(llm: LLM, prompts: list[str]) -> list[tuple[int, dict[int, float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids[0], {t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()})
            for o in outs]


def _model(llm: LLM) -> Any:
    from conftest import worker_of

    return worker_of(llm).context.runner.model  # type: ignore[union-attr]


def _float_and_int8(model_dir: Path, prompts: list[str]) -> tuple[list[Any], list[Any], Any]:
    """First tokens and logprobs in float32 and with every matrix int8 (float32 activations), the
    gap between them, and a view of the int8 model's matrices taken while it was loaded."""
    with LLM(str(model_dir), dtype="float32", num_kv_blocks=32) as llm:
        want = _first(llm, prompts)
    with LLM(str(model_dir), dtype="float32", quantization="int8", num_kv_blocks=32) as llm:
        got = _first(llm, prompts)
        model = _model(llm)
        seen = {"layers": [(layer.qkv, layer.o, layer.mlp.linears(), getattr(layer.mlp, "router", None))
                           for layer in model.layers], "lm_head": model.lm_head}
    gap = max(abs(lp - w[1][t]) for w, (_, lps) in zip(want, got, strict=True) for t, lp in lps.items() if t in w[1])
    return want, got, (gap, seen)


@needs_native
def test_every_matrix_is_int8_and_the_tiny_model_stays_close(tiny_model_dir: Path) -> None:
    prompts = ["hello there", ("a longer prompt that spans more than one block of the KV cache,"
                          " whether a block holds sixteen or sixty-four tokens"), "1 2 3"]
    want, got, (gap, seen) = _float_and_int8(tiny_model_dir, prompts)
    linears = [lin for qkv, o, mlp, _ in seen["layers"] for lin in (qkv, o, *mlp)]
    assert all(lin.int8 and lin.weight is None for lin in [*linears, seen["lm_head"]])
    assert seen["layers"][0][0].bias is not None  # qwen2: the bias stays float, added to int8 products
    assert [t for t, _ in got] == [t for t, _ in want]
    assert gap < 0.3, gap  # measured 0.12; a wrong product (a misplaced scale, a lost group) gives nats


@needs_native
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma2", "gemma3"])
def test_each_family_in_int8_stays_close_to_float32(arch: str, tmp_path: Path) -> None:
    """Every family's matrices int8 (an MoE's router excepted: it picks the experts, so it stays
    float): the same greedy first tokens as float32, logprobs close."""
    from test_hf_dir import write_tiny_model

    write_tiny_model(tmp_path, arch, seed=3)
    want, got, (gap, seen) = _float_and_int8(tmp_path, ["hello there", "1 2 3 4", "x"])
    for qkv, o, mlp, router in seen["layers"]:
        assert qkv.int8 and o.int8
        assert all(lin.int8 for lin in mlp if lin is not router)
        assert router is None or (not router.int8 and router.weight is not None)
    assert seen["lm_head"].int8
    print(f"{arch}: worst top-5 logprob gap {gap:.3f}")
    assert gap < 0.4, gap  # measured 0.05-0.23 across these families; a wrong product gives nats
    for (t_want, lps_want), (t_got, _) in zip(want, got, strict=True):
        # the same greedy token, or one the float model all but tied with (random tiny models have near ties)
        assert t_got == t_want or lps_want[t_want] - lps_want.get(t_got, -1e9) < 2 * gap


@needs_native
def test_int8_without_native_kernels_fails_the_start(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8, "_probed", lambda: (None, "the native kernels are switched off"))
    with pytest.raises(Exception, match="needs the native int8 matmul: the native kernels are switched off"):
        with LLM(str(tiny_model_dir), dtype="float32", quantization="int8", num_kv_blocks=16):
            pass


@pytest.mark.real_model
@pytest.mark.slow
@needs_native
def test_default_model_in_int8_stays_close_to_float32(make_llm: Any) -> None:
    """int8 weights and activations against float32 on the same weights: a quality check (measured
    on this model: 7-8 of 8 first tokens, worst top-5 logprob gap ~0.5), and the memory it holds."""
    from test_parity import PROMPTS
    from test_quantized import _weight_bytes

    ref = _first(make_llm(dtype="float32", max_model_len=1024, num_kv_blocks=256), PROMPTS)
    llm = make_llm(dtype="bfloat16", quantization="int8", max_model_len=1024, num_kv_blocks=256)
    got = _first(llm, PROMPTS)
    same = sum(a[0] == b[0] for a, b in zip(ref, got, strict=True))
    gap = max(abs(lp - r[1][t]) for r, (_, lps) in zip(ref, got, strict=True) for t, lp in lps.items() if t in r[1])
    held = _weight_bytes(_model(llm))
    print(f"quantization=int8: {same}/{len(PROMPTS)} first tokens as float32, worst logprob gap {gap:.3f}, "
          f"weights held {held / 2**20:.1f} MiB")
    assert same >= len(PROMPTS) - 1
    assert gap < 0.8, gap
    assert held < 200 * 2**20  # int8 matrices (+ scales) and the bf16 embedding; bf16 panels hold ~310 MiB
