"""The native bf16 matmul (model/csrc/linear_bf16.cpp via linear.py): right to bf16 rounding at
every row count and shape, silu(gate) * up in one pass, clear errors on bad input, weights held once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
    assert lin.pack_native(k.linear, k.linear_silu_mul)
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
