"""The native bf16 matmul (model/csrc/linear_bf16.cpp via linear.py): right to bf16 rounding at
every row count and shape, silu(gate) * up in one pass, clear errors on bad input, weights held once."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_int8 import build_env

from atomr_trio.model import cpu_kernels, native
from atomr_trio.model.linear import Linear, pack_panels

BF16_ULP = 2.0**-8  # bfloat16's relative rounding step


def _matmul_kernels() -> native.Kernels:
    why = cpu_kernels.unavailable("matmul", "native", torch.bfloat16)
    if why:
        pytest.skip(f"native kernel path unavailable here: {why}")
    k = native.kernels()
    assert k is not None
    return k


def _native_linear(w: torch.Tensor, bias: torch.Tensor | None = None, gate_up: bool = False) -> Linear:
    k = _matmul_kernels()
    assert k.linear is not None and k.linear_silu_mul is not None
    lin = Linear(w, bias, gate_up=gate_up)
    assert lin.pack_native(k.linear, k.linear_silu_mul, k.linear_argmax)
    return lin


def _close_to_bf16(got: torch.Tensor, exact: torch.Tensor) -> None:
    """Each value within about one bf16 rounding of the float64 result (plus float32 summation)."""
    assert got.dtype == torch.bfloat16
    err = (got.double() - exact).abs()
    bound = exact.abs() * BF16_ULP + exact.abs().max() * 1e-5 + 1e-6
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 17, 64, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_products_match_float64_to_bf16_rounding(rows: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    n, k = 100, 192  # n not a multiple of a panel's 48 columns: the padding must not leak
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    exact = x.double() @ w.double().T + (b.double() if b is not None else 0)
    _close_to_bf16(_native_linear(w, b)(x), exact)


def test_model_shapes_and_batched_input() -> None:
    g = torch.Generator().manual_seed(1)
    for n, k in ((960, 576), (576, 1536), (49152, 64)):
        w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
        x = torch.randn(2, 3, k, generator=g).to(torch.bfloat16)  # leading dims are kept
        got = _native_linear(w)(x)
        assert got.shape == (2, 3, n)
        _close_to_bf16(got, x.double() @ w.double().T)


@pytest.mark.parametrize("rows", [1, 5, 16, 33])
def test_silu_mul_matches_the_two_step_product(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    inter, k = 72, 128
    gate_up = (torch.randn(2 * inter, k, generator=g) * 0.2).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    both = x.double() @ gate_up.double().T
    exact = F.silu(both[:, :inter]) * both[:, inter:]
    lin = _native_linear(gate_up, gate_up=True)
    got = lin.silu_mul(x)
    assert got.shape == (rows, inter)
    err = (got.double() - exact).abs()
    assert bool((err <= exact.abs() * 2 * BF16_ULP + 1e-4).all()), err.max()
    plain = Linear(gate_up, gate_up=True).silu_mul(x)  # the torch path rounds each step to bf16
    assert (got.double() - exact).abs().max() <= (plain.double() - exact).abs().max() * 1.01 + 1e-6


def test_the_plain_weight_is_dropped_once_packed() -> None:
    w = torch.randn(50, 32).to(torch.bfloat16)
    lin = _native_linear(w)
    assert lin.weight is None and lin.panels is not None
    assert lin.panels.shape == (2, 16, 48, 2)  # 2 panels of 48 columns (the last padded) x 16 input pairs


def test_what_the_native_kernel_cannot_take_stays_on_torch() -> None:
    k = _matmul_kernels()
    assert k.linear is not None and k.linear_silu_mul is not None
    odd = Linear(torch.randn(16, 33).to(torch.bfloat16))  # an odd number of inputs
    f32 = Linear(torch.randn(16, 32))
    assert not odd.pack_native(k.linear, k.linear_silu_mul)
    assert not f32.pack_native(k.linear, k.linear_silu_mul)
    assert odd.weight is not None and f32.weight is not None


def test_bad_input_is_a_clear_error() -> None:
    k = _matmul_kernels()
    assert k.linear is not None
    wp = pack_panels(torch.randn(48, 32).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="inputs"):
        k.linear(torch.randn(2, 30).to(torch.bfloat16), wp, 48, None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        k.linear(torch.randn(2, 32), wp, 48, None)
    with pytest.raises(RuntimeError, match="does not fit"):
        k.linear(torch.randn(2, 32).to(torch.bfloat16), wp, 200, None)
    with pytest.raises(RuntimeError, match="packed"):
        k.linear(torch.randn(2, 32).to(torch.bfloat16), torch.randn(48, 32).to(torch.bfloat16), 48, None)


# ---- the matmul that widens bf16 in registers: AVX2 + FMA (no AVX512-BF16), or NEON on Arm -------
# On x86 one subprocess builds that library for Haswell (a second cached one: the build key holds
# the -march); on 64-bit Arm the native build is it. The subprocess measures every case; the tests
# below read its answers. Shapes: out features not a multiple of
# 16 or 48 (the padding of the last panel, the 8-column half stores), in features even but not a
# multiple of 32; rows 1 (the one-pass GEMV), 2-5, 7-9, 17, 64 (the AVX2 build widens them in
# registers tile by tile) and 65, 67-69 (widened panels in a buffer, whose last tiles hold 5, 1, 2
# and 3 rows; on Arm the buffer takes every count from 2): a panel's first tile, which asks for
# the thread's next panel, of 2-6 rows, and later tiles of 1-6 rows; 2 threads, so that a thread
# holds several panels of the larger shapes. And each row's result the same bits whatever the
# number of rows beside it (every path keeps one order of sums).
WIDE_ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 17, 64, 65, 67, 68, 69)
WIDE_SHAPES = ((100, 34), (61, 194), (40, 578), (1541, 2))
WIDE_SCRIPT = r"""
import json
import math
import torch
import torch.nn.functional as F
from atomr_trio.model import native
from atomr_trio.model.linear import Linear

def bound(exact, err32):
    # half a bf16 step of the exact value (its rounding) plus what float32 sums may be off by
    half_ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 8)
    return half_ulp * (1 + 2**-7) + err32 + 1e-30

def excess(got, exact, b):
    return float(((got.double() - exact).abs() - b).max())

torch.set_num_threads(2)
k = native.kernels()
out = {"isa": k.matmul_isa if k else None}
g = torch.Generator().manual_seed(0)
for rows in ROWS:
    for n, kin in SHAPES:
        w = torch.randn(n, kin, generator=g).to(torch.bfloat16)
        b = torch.randn(n, generator=g).to(torch.bfloat16)
        x = torch.randn(rows, kin, generator=g).to(torch.bfloat16)
        lin = Linear(w.clone(), b)
        assert lin.pack_native(k.linear, k.linear_silu_mul, k.linear_argmax)
        xd, wd = x.double(), w.double()
        exact = xd @ wd.T + b.double()
        err32 = 2 * (kin + 1) * 2.0**-24 * (xd.abs() @ wd.abs().T + b.double().abs())
        out[f"linear {rows}x{kin}->{n}"] = excess(lin(x), exact, bound(exact, err32))
        gate_up = torch.cat([w, w.roll(1, 0)]).contiguous()
        lin = Linear(gate_up.clone(), gate_up=True)
        assert lin.pack_native(k.linear, k.linear_silu_mul, k.linear_argmax)
        both = xd @ gate_up.double().T
        gate, up = both[:, :n], both[:, n:]
        exact = F.silu(gate) * up
        e = 2 * kin * 2.0**-24 * (xd.abs() @ gate_up.double().abs().T)
        err32 = 1.1 * e[:, :n] * up.abs() + F.silu(gate).abs() * e[:, n:] + 8 * 2.0**-24 * exact.abs()
        out[f"silu_mul {rows}x{kin}->{n}"] = excess(lin.silu_mul(x), exact, bound(exact, err32))
# (a big shape: float32 sums summed in another order differ in their last bits, which show in few
# of the bf16 roundings; 3001 x 1538 shows them in dozens of outputs)
for n, kin in [(3001, 1538)]:
    w = torch.randn(n, kin, generator=g).to(torch.bfloat16)
    x = torch.randn(70, kin, generator=g).to(torch.bfloat16)
    lin = Linear(w.clone())
    gate_up = Linear(torch.cat([w, w.roll(1, 0)]).contiguous(), gate_up=True)
    assert lin.pack_native(k.linear, k.linear_silu_mul) and gate_up.pack_native(k.linear, k.linear_silu_mul)
    for op, f in (("linear", lin), ("silu_mul", gate_up.silu_mul)):
        full = f(x)
        differ = [r for r in ROWS if r > 1 and not torch.equal(f(x[70 - r:]), full[70 - r:])]
        if not torch.equal(torch.cat([f(x[i : i + 1]) for i in range(70)]), full):  # every row alone
            differ.insert(0, 1)
        out[f"same rows {op} {kin}->{n}"] = differ
    # an x of more than 1 << 20 floats is widened once and shared by the threads (each widens its
    # own copy of a smaller one): its rows give the bits they give in a smaller input
    xb = torch.randn(700, kin, generator=g).to(torch.bfloat16)
    for op, f in (("linear", lin), ("silu_mul", gate_up.silu_mul)):
        big = f(xb)
        out[f"shared copy {op}"] = torch.equal(big[:64], f(xb[:64])) and torch.equal(big[630:], f(xb[630:]))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def widened_excess() -> dict[str, Any]:
    """Each case's worst error beyond its bound (<= 0: within it), and for each shape the rows
    counts whose rows differed from the same rows of a larger input, from the Haswell build on x86
    (this machine's own where it takes the same branches: an AVX2-only CPU), or this machine's
    build on 64-bit Arm."""
    if native.is_x86_cpu():
        if shutil.which("g++") is None:
            pytest.skip("the Haswell build needs g++")
        env, isa = build_env("haswell"), "avx2"
    else:
        k = native.kernels()
        if k is None or k.matmul_isa != "neon":
            pytest.skip("no matmul that widens bf16 builds here (x86-64 with g++, or 64-bit Arm)")
        env, isa = dict(os.environ), "neon"
    script = WIDE_SCRIPT.replace("ROWS", repr(WIDE_ROWS)).replace("SHAPES", repr(WIDE_SHAPES))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    answers: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    assert answers.pop("isa") == isa
    return answers


@pytest.mark.parametrize("rows", WIDE_ROWS)
@pytest.mark.parametrize("n,k", WIDE_SHAPES)
@pytest.mark.parametrize("op", ["linear", "silu_mul"])
def test_widened_build_matches_float64_to_rounding(widened_excess: dict[str, Any], op: str, rows: int,
                                                   n: int, k: int) -> None:
    """The AVX2 + FMA or NEON matmul (and its fused silu_mul) round the float32 sum once to bf16:
    within half a bf16 step of the float64 product, plus float32 summation error."""
    assert widened_excess[f"{op} {rows}x{k}->{n}"] <= 0


@pytest.mark.parametrize("op", ["linear", "silu_mul"])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(widened_excess: dict[str, Any], op: str) -> None:
    """The last r rows of a 70-row input (1538 -> 3001), computed alone, give the same bits for
    every r of WIDE_ROWS, and so does each of the 70 rows alone (the GEMV, on AVX2 the tiles
    widened in registers, the widened buffer): a sequence's tokens do not change with the batch
    it shares a step with."""
    assert widened_excess[f"same rows {op} 1538->3001"] == []


@pytest.mark.parametrize("op", ["linear", "silu_mul"])
def test_a_big_input_gives_the_bits_of_a_small_one(widened_excess: dict[str, Any], op: str) -> None:
    """700 rows x 1538 inputs, past what each thread widens for itself (the threads then widen
    one shared copy together): its first 64 and last 70 rows give the same bits as those rows alone."""
    assert widened_excess[f"shared copy {op}"]


@pytest.fixture(params=[1, 2, 3])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch's thread count for the test (1: one thread sees every panel; 3: more threads than
    some matmuls have panels)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _with_argmax(lin: Linear) -> Linear:
    if not lin.has_argmax:
        pytest.skip("linear_argmax_bf16 is the AVX512-BF16 build's (the AVX2 one keeps logits)")
    return lin


def _argmax_case(rows: int, n: int, seed: int) -> tuple[Linear, torch.Tensor]:
    """A weight whose rows' largest outputs tie: column 23 (a panel's second block) equals column
    40 (its third) and two columns in later panels (later threads), each with a bias that makes
    the tie the row's maximum, so the first of them, 23, must win."""
    g = torch.Generator().manual_seed(seed)
    k = 64
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.zeros(n)
    for col in (40, n // 2, n - 3):
        w[col] = w[23]
    b[[23, 40, n // 2, n - 3]] = 50.0
    lin = _with_argmax(_native_linear(w, b.to(torch.bfloat16)))
    return lin, torch.randn(rows, k, generator=g).to(torch.bfloat16)


def _numpy_argmax(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(lin(x).float().numpy().argmax(axis=-1))


@pytest.mark.parametrize("rows", [1, 2, 8, 9, 17, 64])
@pytest.mark.parametrize("n", [100, 4099])
def test_argmax_is_the_first_largest_of_the_rounded_outputs(rows: int, n: int, threads: int) -> None:
    """linear_argmax_bf16 (the lm_head of greedy steps) picks what NumPy's argmax picks of
    linear_bf16(...).float() — the sampler's greedy choice — ties to the first column, padding
    columns past n never chosen, on any number of threads."""
    lin, x = _argmax_case(rows, n, rows)
    got = lin.argmax(x)
    assert got is not None and got.dtype == torch.int64
    assert torch.equal(got, _numpy_argmax(lin, x))
    y = lin(x).float()
    tied = y[:, 23] == y.amax(dim=-1)
    assert bool(tied.any()) and bool((got[tied] == 23).all())


@pytest.mark.parametrize("special", ["nan", "inf", "-inf", "nan-in-one-row"])
def test_argmax_of_nan_and_infinite_outputs_is_numpys(special: str, threads: int) -> None:
    """A NaN output counts as the largest (the first NaN wins), inf beats every number, and a row
    of nothing but -inf takes column 0: NumPy's argmax, as the sampler's greedy rows. In one row
    only, a NaN in the last panels (the last thread's) beats that row's +inf outputs before it."""
    n = 4099
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n, 64, generator=g).to(torch.bfloat16)
    x = torch.randn(9, 64, generator=g).to(torch.bfloat16)
    b = torch.zeros(n)
    want = None
    if special == "-inf":
        b[:] = -math.inf
        want = [0] * 9
    elif special == "nan-in-one-row":
        w[4000, 0] = 0.0  # 0 * inf: NaN in column 4000 of the row whose input 0 is inf; +-inf elsewhere
        x[4, 0] = math.inf
    else:
        b[[40, 3000, 4000]] = float(special)
        want = [40] * 9
    lin = _with_argmax(_native_linear(w, b.to(torch.bfloat16)))
    got = lin.argmax(x)
    assert got is not None and torch.equal(got, _numpy_argmax(lin, x))
    if want is not None:
        assert got.tolist() == want
    else:
        assert got[4] == 4000 and bool((got[torch.arange(9) != 4] != 4000).all())


def test_argmax_runs_only_on_plain_native_panels() -> None:
    """A gate|up weight (silu panels) and a weight left to torch have no argmax kernel: None."""
    x = torch.randn(2, 64).to(torch.bfloat16)
    gate_up = _native_linear(torch.randn(64, 64).to(torch.bfloat16), gate_up=True)
    plain = Linear(torch.randn(100, 64).to(torch.bfloat16))
    for lin in (gate_up, plain):
        assert not lin.has_argmax and lin.argmax(x) is None
